"""
The clear-text NX greeting, sans-IO: the L7R puts the session's cookie into
the greeting a client's nxproxy sends, so nxagent (which requires that
cookie) accepts only connections that came through the relay.

    cookie = new_cookie()                    # per session; the VMA gets it too
    rewriter = GreetingRewriter(cookie)
    out = rewriter.feed(data)                # None: need more bytes
    ...                                      # GreetingError: close the relay
    peer.write(out)                          # the greeting rewritten + what followed
    # from now on: bytes pass untouched, the rewriter is no longer used

The connecting side of an NX link speaks first (nx-libs 3.5.99, measured):

    NXPROXY-3.5.0-3.5.99 stream=default,data=default         (no cookie)
    NXPROXY-3.5.0-3.5.99 cookie=<32 hex>,stream=default,data=default

that is C{NXPROXY-<version>}, one space, the options (C{name=value} items
separated by commas), one space; binary frames or C{cachefile=none } follow.
L{rewrite} drops every C{cookie=} item the client sent and puts
C{cookie=<ours>} first, as nxproxy itself writes it; the version and the
other items are kept byte for byte. An nxagent without a cookie ignores one
in the greeting (measured), so this is safe with agents that set none.

A greeting longer than L{MAX_GREETING} bytes (nxcomp reads at most 512), a
version or an option with a byte it never sends, or a stream not starting
with C{NXPROXY-} is a L{GreetingError}: the relay is closed, nothing is
passed on.
"""

import re
import secrets

__all__ = ["COOKIE_PARAM", "MAX_GREETING", "GreetingError", "GreetingRewriter", "new_cookie",
           "valid_cookie", "rewrite"]

#: The x_start parameter that carries a session's cookie from the L7R to the
#: VMA (never from the client: the L7R admits only qvd.client.* and custom.*).
COOKIE_PARAM = "qvd.nx.cookie"

#: Bytes of a greeting (both spaces included) the L7R buffers at most.
MAX_GREETING = 1024

_MAGIC = b"NXPROXY-"
_COOKIE = re.compile(r"[0-9a-fA-F]{32}\Z")
# A greeting, complete: magic, version, space, options, space.
_GREETING = re.compile(rb"NXPROXY-([0-9.\-]{1,64}) ([\x21-\x7e]*) ")
# The start of one, incomplete: what may still become a greeting.
_PARTIAL = re.compile(rb"NXPROXY-(?:[0-9.\-]{0,64}|[0-9.\-]{1,64} [\x21-\x7e]*)\Z")


class GreetingError(ValueError):
    """
    The client's stream does not start with an NX greeting we can rewrite;
    the message says what was wrong (never the bytes: they may hold a cookie).
    """


def new_cookie():
    """A random NX session cookie: 32 lower-case hex digits."""
    return secrets.token_hex(16)


def valid_cookie(value):
    """Whether C{value} (text) is an NX cookie: 32 hex digits."""
    return isinstance(value, str) and bool(_COOKIE.match(value))


def rewrite(version, options, cookie):
    """
    The greeting C{NXPROXY-<version> cookie=<cookie>[,<options>] } with every
    C{cookie=} item of C{options} (bytes, comma-separated) removed.
    """
    kept = [item for item in options.split(b",")
            if item and not item.startswith(b"cookie=")]
    items = b",".join([b"cookie=" + cookie.encode("ascii")] + kept)
    return _MAGIC + version + b" " + items + b" "


class GreetingRewriter:
    """
    Finds the greeting at the start of a client's stream and rewrites it
    (see the module docstring). Feed it bytes until it returns some; then it
    is L{done} and must not be fed again.

    @ivar done: the greeting was found and rewritten.
    """

    def __init__(self, cookie, limit=MAX_GREETING):
        if not valid_cookie(cookie):
            raise ValueError("an NX cookie is 32 hex digits")
        self._cookie = cookie
        self._limit = limit
        self._buffer = b""
        self.done = False

    def feed(self, data):
        """
        Take the next bytes of the client's stream.

        @return: C{None} while the greeting is incomplete; once it is
            complete, the rewritten greeting followed by every byte the
            client sent after it.
        @raise GreetingError: the stream is not a greeting, or the greeting
            is longer than the limit.
        """
        if self.done:
            raise RuntimeError("the greeting was already rewritten")
        buffer = self._buffer + data if self._buffer else data
        match = _GREETING.match(buffer, 0, self._limit)
        if match is not None:
            self.done = True
            self._buffer = b""
            return rewrite(match.group(1), match.group(2), self._cookie) + buffer[match.end():]
        head = buffer[:len(_MAGIC)]
        if not _MAGIC.startswith(head):
            raise GreetingError("the client's NX stream does not start with NXPROXY-")
        if len(buffer) >= self._limit:
            raise GreetingError(
                f"no complete NX greeting in the first {self._limit} bytes")
        if len(buffer) > len(_MAGIC) and not _PARTIAL.match(buffer):
            raise GreetingError(
                "the client's NX greeting has a byte an NX proxy never sends "
                "(version: digits, '.', '-'; options: printable ASCII)")
        self._buffer = buffer
        return None
