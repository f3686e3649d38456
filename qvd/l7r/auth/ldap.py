"""
The C{ldap} plugin: passwords checked by an LDAP directory (reference 2.1),
through ldaptor, without blocking the reactor.

    auth.ldap.host = ldaps://ds.example.org:636      (or a host name, host:port)
    auth.ldap.base = ou=People,dc=example,dc=org
    auth.ldap.scope = sub
    l7r.auth.plugins = auto,ldap

authenticate_basic: if C{auth.ldap.userbindpattern} is set, bind directly as
that DN (C{%u} = the DN-escaped login) and accept on success. Otherwise bind
as C{auth.ldap.binddn}/C{bindpass} (anonymous when unset; without bindpass the
user's password is used), search C{auth.ldap.base} with C{auth.ldap.filter}
(C{%u} = the login escaped for filters, RFC 4515), require exactly one entry
and bind as its DN with the user's password. The entry's C{uidNumber},
C{gidNumber}, C{uid} and C{homeDirectory} become the params
C{qvd.vm.user.uid}, C{.gid}, C{.ldap.name}, C{.ldap.home};
C{auth.ldap.name.normalize} makes the LDAP C{uid} the login and
C{auth.ldap.home.set} sets C{qvd.vm.user.home}. Every LDAP operation is
bounded by C{auth.ldap.timeout}. A directory that cannot be reached is logged
and the plugin declines, so a later plugin of the chain may still accept.

cache_verified: C{l7r.auth.cache.ldap} (default off). The directory, not the
database, says whether the password is still right and the account still
enabled, and no row version tells the L7R when that changes: with the
cache on, a password changed or an account disabled in the directory still
logs in until the entry's C{l7r.auth.cache.lifetime} runs out (blocks in
qvd's database still apply at once). A bind costs the L7R a round trip, not
a hash, so the cache buys little here; turn it on to spare the directory in
login storms.
"""

import re
from urllib.parse import urlsplit

from ldaptor.protocols import pureldap
from ldaptor.protocols.ldap import ldaperrors, ldapsyntax
from ldaptor.protocols.ldap.ldapclient import LDAPClient
from twisted.internet import defer
from twisted.internet.endpoints import connectProtocol, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS
from qvd.logs import Logger

from qvd._endpoints import client_endpoint
from qvd.l7r.auth.credentials import escape_dn_value, escape_filter_value
from qvd.l7r.auth.plugin import AuthConfigError, Plugin

log = Logger()

SCOPES = {"base": pureldap.LDAP_SCOPE_baseObject, "one": pureldap.LDAP_SCOPE_singleLevel,
          "sub": pureldap.LDAP_SCOPE_wholeSubtree}
DEREFS = {"never": pureldap.LDAP_DEREF_neverDerefAliases,
          "search": pureldap.LDAP_DEREF_derefInSearching,
          "find": pureldap.LDAP_DEREF_derefFindingBaseObj,
          "always": pureldap.LDAP_DEREF_derefAlways}
ATTRIBUTES = ("uid", "uidNumber", "gidNumber", "homeDirectory")


def parse_ldap_host(host):
    """
    Parse C{auth.ldap.host}: C{host}, C{host:port}, C{ldap://host[:port]} or
    C{ldaps://host[:port]}.

    @return: (tls: bool, host, port)
    @raise AuthConfigError: naming the value when it is none of those.
    """
    text = (host or "").strip()
    if not text:
        raise AuthConfigError("auth.ldap.host is not set; set it to the directory's "
                              "host name or ldap(s):// URI")
    if "://" not in text:
        text = "ldap://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise AuthConfigError(f"auth.ldap.host={host!r} is not a host or ldap(s):// URI")
    if parts.scheme not in ("ldap", "ldaps") or not parts.hostname:
        raise AuthConfigError(
            f"auth.ldap.host={host!r}: use a host name or an ldap:// or ldaps:// URI")
    tls = parts.scheme == "ldaps"
    return tls, parts.hostname, port or (636 if tls else 389)


def _first(entry, name):
    values = entry.get(name)
    if not values:
        return None
    value = sorted(values)[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class LdapPlugin(Plugin):
    name = "ldap"

    def _settings(self, ctx):
        scope = ctx.cfg("auth.ldap.scope").strip().lower()
        deref = ctx.cfg("auth.ldap.deref").strip().lower()
        if scope not in SCOPES:
            raise AuthConfigError(f"auth.ldap.scope={scope!r} must be base, one or sub")
        if deref not in DEREFS:
            raise AuthConfigError(
                f"auth.ldap.deref={deref!r} must be never, search, find or always")
        racf = ctx.cfg("auth.ldap.racf_allowregex")
        try:
            racf = re.compile(racf) if racf else None
        except re.error as e:
            raise AuthConfigError(f"auth.ldap.racf_allowregex={racf!r} is not a regex: {e}")
        return SCOPES[scope], DEREFS[deref], racf

    async def _connect(self, ctx, timeout):
        tls, host, port = parse_ldap_host(ctx.cfg("auth.ldap.host"))
        endpoint = client_endpoint(self.reactor, host, port, timeout)
        if tls:
            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        return await connectProtocol(endpoint, LDAPClient())

    def _timed(self, d, timeout):
        return d.addTimeout(timeout, self.reactor)

    def cache_verified(self, ctx):
        return ctx.config.getbool("l7r.auth.cache.ldap", tenant=ctx.tenant_id)

    async def authenticate_basic(self, ctx, login, password):
        if not password:
            return False
        scope, deref, racf = self._settings(ctx)
        timeout = float(ctx.cfg("auth.ldap.timeout"))
        try:
            client = await self._timed(defer.ensureDeferred(self._connect(ctx, timeout)),
                                       timeout)
        except AuthConfigError:
            raise
        except Exception as e:
            log.error("cannot reach the LDAP server {host} to authenticate {login}: {e}",
                      host=ctx.cfg("auth.ldap.host"), login=login, e=e)
            return False
        try:
            return await self._authenticate(ctx, client, login, password, scope, deref,
                                            racf, timeout)
        except ldaperrors.LDAPException as e:
            log.error("LDAP error authenticating {login}: {e}", login=login, e=e)
            return False
        except defer.TimeoutError:
            log.error("the LDAP server {host} did not answer within {t} s (auth.ldap.timeout)"
                      " authenticating {login}", host=ctx.cfg("auth.ldap.host"), t=timeout,
                      login=login)
            return False
        finally:
            if client.connected:
                client.transport.loseConnection()

    async def _authenticate(self, ctx, client, login, password, scope, deref, racf, timeout):
        dn_login = escape_dn_value(login)
        pattern = ctx.cfg("auth.ldap.userbindpattern")
        if pattern:
            dn = pattern.replace("%u", dn_login)
            try:
                await self._timed(client.bind(dn, password), timeout)
            except ldaperrors.LDAPException as e:
                log.info("direct bind as {dn} failed ({e}); searching the user", dn=dn, e=e)
            else:
                entries = await self._search(client, dn, "(objectClass=*)",
                                             pureldap.LDAP_SCOPE_baseObject, deref, timeout)
                if len(entries) == 1:
                    self._set_params(ctx, entries[0])
                return True

        binddn = ctx.cfg("auth.ldap.binddn")
        if binddn:
            bindpass = ctx.cfg("auth.ldap.bindpass") or password
            await self._timed(client.bind(binddn.replace("%u", dn_login), bindpass), timeout)

        base = ctx.cfg("auth.ldap.base")
        if not base:
            raise AuthConfigError("auth.ldap.base is not set; set it to the DN below which "
                                  "the users are, e.g. ou=People,dc=example,dc=org")
        search_filter = ctx.cfg("auth.ldap.filter").replace("%u", escape_filter_value(login))
        entries = await self._search(client, base, search_filter, scope, deref, timeout)
        if len(entries) != 1:
            log.info("LDAP search below {base} for {filter} found {n} entries, not 1:"
                     " {login} refused", base=base, filter=search_filter, n=len(entries),
                     login=login)
            return False
        entry = entries[0]
        dn = entry.dn.getText()
        try:
            await self._timed(client.bind(dn, password), timeout)
        except ldaperrors.LDAPInvalidCredentials as e:
            message = e.message.decode("utf-8", "replace") if isinstance(e.message, bytes) \
                else str(e.message or "")
            if racf is None or not racf.search(message):
                return False
            ctx.params["qvd.auth.ldap.racf_detailed_error"] = message
        self._set_params(ctx, entry)
        return True

    async def _search(self, client, base, search_filter, scope, deref, timeout):
        try:
            base_entry = ldapsyntax.LDAPEntry(client, base)
            d = base_entry.search(filterText=search_filter, scope=scope, derefAliases=deref,
                                  attributes=ATTRIBUTES, sizeLimit=2, sizeLimitIsNonFatal=True)
        except Exception as e:
            raise AuthConfigError(f"LDAP search base {base!r} / filter {search_filter!r} is "
                                  f"not valid ({e}); check auth.ldap.base and auth.ldap.filter")
        try:
            return await self._timed(d, timeout)
        except ldaperrors.LDAPNoSuchObject:
            return []

    def _set_params(self, ctx, entry):
        for attribute, param in (("uidNumber", "qvd.vm.user.uid"),
                                 ("gidNumber", "qvd.vm.user.gid"),
                                 ("uid", "qvd.vm.user.ldap.name"),
                                 ("homeDirectory", "qvd.vm.user.ldap.home")):
            value = _first(entry, attribute)
            if value is not None:
                ctx.params[param] = value
        uid = _first(entry, "uid")
        if uid is not None and ctx.config.getbool("auth.ldap.name.normalize",
                                                  tenant=ctx.tenant_id):
            ctx.login = uid
        home = _first(entry, "homeDirectory")
        if home is not None and ctx.config.getbool("auth.ldap.home.set", tenant=ctx.tenant_id):
            ctx.params["qvd.vm.user.home"] = home
