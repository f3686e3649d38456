"""
Pure parsing of what a client sends to authenticate (reference 1.2, 2.1).

    creds = parse_authorization(headers.get("authorization"))
    if isinstance(creds, BasicCredentials): creds.login, creds.password
    if isinstance(creds, BearerCredentials): creds.token
    split_login("alice@acme", "@#")                 # ('alice', 'acme')
    normalize_login("  Alice ", case_sensitive=False)   # 'alice'

Also the escaping of a login placed into an LDAP filter (RFC 4515) or DN
(RFC 4514), and the C{Auth-<hex(NAME)>: base64(value)} headers the client uses
to share environment variables with the plugins.
"""

import base64
import binascii

import attrs

from qvd.l7r.auth.interfaces import AuthFailed


@attrs.frozen
class BasicCredentials:
    login: str
    password: str = attrs.field(repr=False)


@attrs.frozen
class BearerCredentials:
    token: str = attrs.field(repr=False)


def _b64decode_text(value, what):
    try:
        raw = base64.b64decode(value.strip() + "=" * (-len(value.strip()) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise AuthFailed(f"malformed Authorization header: {what} is not base64")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def parse_authorization(value):
    """
    Parse an C{Authorization} header value.

    @return: L{BasicCredentials} or L{BearerCredentials}.
    @raise AuthFailed: if the header is missing, of another scheme or malformed.
    """
    if not value or not value.strip():
        raise AuthFailed("no Authorization header")
    scheme, _, rest = value.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        text = _b64decode_text(rest, "the Basic credentials")
        login, sep, password = text.partition(":")
        if not sep:
            raise AuthFailed("malformed Authorization header: Basic credentials without ':'")
        return BasicCredentials(login, password)
    if scheme == "bearer":
        token = _b64decode_text(rest, "the Bearer token").strip()
        if not token:
            raise AuthFailed("malformed Authorization header: empty Bearer token")
        return BearerCredentials(token)
    raise AuthFailed(f"unsupported authorization scheme {scheme[:20]!r}")


def client_environment(headers):
    """
    The variables shared by the client as C{Auth-<hex(NAME)>: base64(value)}
    headers; malformed ones are skipped.
    """
    env = {}
    for name, value in headers.items():
        if not name.lower().startswith("auth-"):
            continue
        try:
            key = bytes.fromhex(name[5:]).decode("utf-8")
            env[key] = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (ValueError, UnicodeDecodeError):
            continue
    return env


def split_login(login, separators):
    """
    Split C{user<sep>tenant} at the last separator character.

    @return: (user, tenant) with tenant None when there is no separator or
        nothing follows it.
    """
    cut = max((login.rfind(c) for c in separators), default=-1) if separators else -1
    if cut < 0:
        return login, None
    user, tenant = login[:cut], login[cut + 1:]
    return user, (tenant or None)


def normalize_login(login, case_sensitive=False):
    """
    Trim C{login}, and lower-case it unless logins are case-sensitive.
    """
    login = login.strip()
    return login if case_sensitive else login.lower()


_FILTER_SPECIALS = {"\\": r"\5c", "*": r"\2a", "(": r"\28", ")": r"\29", "\0": r"\00"}


def escape_filter_value(value):
    """
    Escape C{value} for use inside an LDAP search filter (RFC 4515).
    """
    return "".join(_FILTER_SPECIALS.get(c, c) for c in value)


def escape_dn_value(value):
    """
    Escape C{value} for use as an attribute value inside a DN (RFC 4514).
    """
    out = []
    for i, c in enumerate(value):
        if c in ',+"\\<>;=':
            out.append("\\" + c)
        elif c == "\0":
            out.append("\\00")
        elif (c == " " and (i == 0 or i == len(value) - 1)) or (c == "#" and i == 0):
            out.append("\\" + c)
        else:
            out.append(c)
    return "".join(out)
