"""
SimpleRPC, QVD's internal RPC (reference 3.1), as pure functions: no sockets.

Client side::

    path = build_request_path("x_start", {"qvd.client.os": "linux"})
    # -> "/vma/x_start?qvd.client.os=linux"; GET it over HTTP/1.1
    result = parse_response_body(body)   # or raises SimpleRPCError(message)

    request = build_request("10.3.15.2:3030", "x_state", secret=secret)   # bytes to send
    reader = ResponseReader()
    reply = reader.feed(data)            # (status, body) once complete, else None
    reply = reader.finish()              # at the end of the stream

Server side::

    parser = RequestParser()
    for event in parser.feed(data):
        if isinstance(event, Malformed):      # answer event.response, then close
            ...
        else:                                 # a Request
            routed = route(event, known_functions)
            # routed is a Call(function, params) to run, or a Response to send
    ok = result_response(value)               # 200, JSON(value)\\r\\n
    bad = error_response("message")           # 200, "",JSON(message)\\r\\n

The wire is the original's byte for byte (C{QVD::SimpleRPC::Server},
C{QVD::HTTPD}, C{QVD::SimpleRPC::Client}): a call is C{GET /vma/<fn>?k=v&k=v}
(keys and values URI-escaped) in HTTP/1.1; the reply is always C{200} with
C{Content-Type: application/json-simplerpc} and the body C{JSON(result)\\r\\n}
on success or C{"",JSON(error)\\r\\n} on failure (the client parses
C{[body]}: two elements mean an error). An unknown function, a method other
than GET or a path outside the base is a C{404} with the original's
C{text/plain} description; a request line that does not parse is a C{400} and
an HTTP version other than 1.1 a C{505}, after which the connection closes.

qvd adds one header: every call of the HKD and the L7R carries the VM's
secret (L{SECRET_HEADER}, made by L{new_secret} at each start); the VMA
answers a call without it C{403} (L{secret_matches}). Original QVD agents
ignore the header, so the wire stays compatible. A KVM desktop finds the
secret in QEMU's firmware configuration, the fw_cfg entry L{FW_CFG_SECRET}
(in the guest L{FW_CFG_SECRET_RAW}, readable by its root only); an LXC
desktop in a bind-mounted file.

Only the standard library is imported here (the VMA runs it on Debian's python3).
"""

import hmac
import json
import re
import secrets
from urllib.parse import quote, unquote

CONTENT_TYPE = "application/json-simplerpc"
SECRET_HEADER = "X-QVD-VMA-Secret"
#: The fw_cfg entry that carries the secret into a KVM desktop, and where the
#: guest kernel's C{qemu_fw_cfg} module shows it (mode 0400, root).
FW_CFG_SECRET = "opt/org.qvd/vma.secret"
FW_CFG_SECRET_RAW = f"/sys/firmware/qemu_fw_cfg/by_name/{FW_CFG_SECRET}/raw"
DEFAULT_BASE = "/vma"

# Status lines and text/plain bodies of the original's error replies
# (QVD::HTTP::StatusCodes: message, description paragraph).
_STATUS = {
    200: ("OK", "200 OK\n"
          "    Standard response for successful HTTP requests. The actual\n"
          "    response will depend on the request method used. In a GET request,\n"
          "    the response will contain an entity corresponding to the requested\n"
          "    resource. In a POST request the response will contain an entity\n"
          "    describing or containing the result of the action."),
    400: ("Bad Request", "400 Bad Request\n"
          "    The request contains bad syntax or cannot be fulfilled."),
    403: ("Forbidden", "403 Forbidden\n"
          "    The request was a legal request, but the server is refusing to\n"
          "    respond to it."),
    404: ("Not Found", "404 Not Found\n"
          "    The requested resource could not be found but may be available\n"
          "    again in the future. Subsequent requests by the client are\n"
          "    permissible."),
    500: ("Internal Server Error", "500 Internal Server Error\n"
          "    A generic error message, given when no more specific message is\n"
          "    suitable."),
    505: ("HTTP Version Not Supported", "505 HTTP Version Not Supported\n"
          "    The server does not support the HTTP protocol version used in the\n"
          "    request."),
}

_FUNCTION = re.compile(r"\w+\Z", re.ASCII)
_REQUEST_LINE = re.compile(r"(\w+)\s+(.*?)\s*((?:\bHTTP/\d+\.\d+)?)", re.ASCII)
_HEADER = re.compile(r"([!#$%&'*+\-.0-9a-zA-Z]+)\s*:\s*(.*?)\s*")
_CONTINUATION = re.compile(r"\s+(.*?)\s*")
# URI::Split's regular expression (RFC 3986 appendix B).
_URI_SPLIT = re.compile(r"(?:([^:/?#]+):)?(?://([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?",
                        re.DOTALL)

MAX_LINE = 16384
MAX_HEADERS = 100


class SimpleRPCError(Exception):
    """
    The remote side answered the call with an error.

    @ivar message: the error text the server sent (trailing newline removed).
    """

    def __init__(self, message):
        if not isinstance(message, str):
            message = json.dumps(message)
        self.message = message.rstrip("\r\n")
        super().__init__(self.message)


class SimpleRPCProtocolError(ValueError):
    """
    A reply body is not SimpleRPC (not JSON, not UTF-8): the peer is not a VMA.
    """


# ---------------------------------------------------------------- client side

def _escape(value):
    if value is None:
        value = ""
    elif value is True:
        value = "1"
    elif value is False:
        value = "0"
    return quote(str(value), safe="")


def build_request_path(function, params=None, base=DEFAULT_BASE):
    """
    The request target of a call: C{<base>/<function>?k=v&...}, URI-escaped.

    @param function: the remote function name (word characters only).
    @param params: a mapping or a sequence of C{(key, value)} pairs; C{None}
        is sent empty and booleans as C{1}/C{0}, as Perl would.
    @raise ValueError: C{function} is not a word.
    """
    if not isinstance(function, str) or not _FUNCTION.match(function):
        raise ValueError(
            f"SimpleRPC function name {function!r} must be letters, digits and '_'")
    items = params.items() if hasattr(params, "items") else (params or ())
    query = "&".join(f"{_escape(k)}={_escape(v)}" for k, v in items)
    path = f"{base.rstrip('/')}/{function}"
    return f"{path}?{query}" if query else path


def build_request(host, function, params=None, base=DEFAULT_BASE, secret=""):
    """
    The bytes of a whole call (request line and headers) for C{host}
    (C{"addr:port"}), for callers that write to a raw transport; with the
    agent's C{secret} header when one is given.
    """
    path = build_request_path(function, params, base)
    extra = f"{SECRET_HEADER}: {secret}\r\n" if secret else ""
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode("ascii")


def parse_response_body(body):
    """
    The result of a call from the body of its C{200} reply.

    @param body: the reply body (bytes or text).
    @return: the decoded JSON result (C{None} for the original's C{undef}).
    @raise SimpleRPCError: the server answered with an error.
    @raise SimpleRPCProtocolError: the body is not SimpleRPC.
    """
    if isinstance(body, bytes):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError:
            raise SimpleRPCProtocolError(f"SimpleRPC reply is not UTF-8: {body[:80]!r}")
    try:
        data = json.loads(f"[{body}]")
    except ValueError:
        raise SimpleRPCProtocolError(f"SimpleRPC reply is not JSON: {body[:80]!r}")
    if len(data) >= 2:
        raise SimpleRPCError(data[1])
    return data[0] if data else None


# ---------------------------------------------------------------- server side

class Request:
    """
    One parsed HTTP request head.

    @ivar method: e.g. C{"GET"}.
    @ivar target: the request target as sent (C{"/vma/ping?x=1"}).
    @ivar version: C{"HTTP/1.1"}.
    @ivar headers: list of C{(name, value)} in order.
    """
    __slots__ = ("method", "target", "version", "headers")

    def __init__(self, method, target, version, headers):
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers

    def header(self, name):
        """The value of the last header C{name} (case-insensitive), or C{None}."""
        value = None
        for key, val in self.headers:
            if key.lower() == name.lower():
                value = val
        return value

    def __repr__(self):
        return f"Request({self.method!r}, {self.target!r}, {self.version!r})"


class Response:
    """
    A reply to send: status code, content type and body (bytes).
    """
    __slots__ = ("status", "content_type", "body")

    def __init__(self, status, content_type, body):
        self.status = status
        self.content_type = content_type
        self.body = body

    def to_bytes(self):
        """The reply on the wire, headers as the original sends them."""
        message = _STATUS.get(self.status, (f"{self.status} Unknown error",))[0]
        head = (f"HTTP/1.1 {self.status} {message}\r\n"
                f"Content-Type: {self.content_type}\r\n"
                f"Content-Length: {len(self.body)}\r\n\r\n")
        return head.encode("ascii") + self.body

    def __repr__(self):
        return f"Response({self.status}, {self.content_type!r}, {self.body!r})"


class Malformed:
    """
    The peer sent something that is not an HTTP/1.1 request: answer
    C{response} and close the connection.
    """
    __slots__ = ("response", "reason")

    def __init__(self, response, reason):
        self.response = response
        self.reason = reason

    def __repr__(self):
        return f"Malformed({self.response.status}, {self.reason!r})"


class Call:
    """
    A routed call: run C{function} with C{params} (a dict; a repeated key keeps
    its last value, as the original's hash did).
    """
    __slots__ = ("function", "params")

    def __init__(self, function, params):
        self.function = function
        self.params = params

    def __eq__(self, other):
        return (isinstance(other, Call) and self.function == other.function
                and self.params == other.params)

    def __repr__(self):
        return f"Call({self.function!r}, {self.params!r})"


def new_secret():
    """A new per-VM agent secret: 43 URL-safe characters (256 bits)."""
    return secrets.token_urlsafe(32)


def secret_matches(expected, given):
    """Whether C{given} (a header value, or None) is the non-empty C{expected}."""
    if not expected or given is None:
        return False
    return hmac.compare_digest(expected.encode(), given.strip().encode())


def http_error(status):
    """The original's C{text/plain} error reply for C{status}."""
    description = _STATUS.get(status, (None, f"{status} Unknown status code"))[1]
    return Response(status, "text/plain", description.encode("ascii"))


def result_response(value):
    """The success reply: C{JSON(value)\\r\\n}."""
    return Response(200, CONTENT_TYPE, (json.dumps(value) + "\r\n").encode("ascii"))


def error_response(message):
    """The error reply: C{"",JSON(message)\\r\\n}, still a C{200}."""
    return Response(200, CONTENT_TYPE, ('"",' + json.dumps(str(message)) + "\r\n").encode("ascii"))


#: The largest reply a client reads (head and body): SimpleRPC replies are small.
MAX_REPLY = 1 << 20


class ResponseReader:
    """
    Reads one reply: L{feed} the bytes as they come; it returns (status,
    body) once the head and C{Content-Length} bytes of body are in (None
    before); L{finish} at the end of the stream returns it when there was no
    C{Content-Length} (the body is what came). Raises
    L{SimpleRPCProtocolError} for bytes that are no HTTP reply, a reply
    longer than L{MAX_REPLY}, or a stream that ends too early.
    """

    def __init__(self, limit=MAX_REPLY):
        self.limit = limit
        self._data = bytearray()
        self._status = None
        self._length = None
        self._body_at = None

    def feed(self, data):
        self._data += data
        if len(self._data) > self.limit:
            raise SimpleRPCProtocolError(f"reply longer than {self.limit} bytes")
        if self._body_at is None:
            end = self._data.find(b"\r\n\r\n")
            if end < 0:
                if not self._data.startswith(b"HTTP/"[:len(self._data)]):
                    raise SimpleRPCProtocolError(
                        f"not an HTTP reply: {bytes(self._data[:40])!r}")
                return None
            self._head(bytes(self._data[:end]))
            self._body_at = end + 4
        if self._length is not None and len(self._data) - self._body_at >= self._length:
            return self._status, bytes(self._data[self._body_at:self._body_at + self._length])
        return None

    def _head(self, head):
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise SimpleRPCProtocolError(f"not an HTTP reply: {lines[0][:40]!r}")
        self._status = int(parts[1])
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise SimpleRPCProtocolError(f"bad header line in the reply: {line[:40]!r}")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    self._length = int(value.strip())
                except ValueError:
                    raise SimpleRPCProtocolError(f"bad Content-Length {value.strip()[:20]!r}")
            elif name == b"transfer-encoding" and value.strip().lower() != b"identity":
                raise SimpleRPCProtocolError("chunked replies are not SimpleRPC's")

    @property
    def started(self):
        """Whether any byte of the reply came."""
        return bool(self._data)

    def finish(self):
        """The reply at the end of the stream (raises if it is not whole)."""
        if self._body_at is None:
            raise SimpleRPCProtocolError(
                "the connection closed before a reply" if not self._data else
                f"the connection closed in the reply's head: {bytes(self._data[:40])!r}")
        body = bytes(self._data[self._body_at:])
        if self._length is not None:
            if len(body) < self._length:
                raise SimpleRPCProtocolError(
                    f"the connection closed after {len(body)} of {self._length} bytes of body")
            body = body[:self._length]
        return self._status, body


class RequestParser:
    """
    Turns the bytes a peer sends into L{Request} heads (pipelining allowed).

    Feed it with L{feed}; it returns the events completed by that data. After a
    L{Malformed} event it is C{closed} and ignores further data. Request bodies
    are not supported (SimpleRPC has none), as in the original.
    """

    def __init__(self, max_line=MAX_LINE, max_headers=MAX_HEADERS):
        self._buffer = b""
        self._max_line = max_line
        self._max_headers = max_headers
        self._head = None          # (method, target, version) while reading headers
        self._headers = []
        self.closed = False

    @property
    def partial(self):
        """True while a request has begun arriving but is not complete."""
        return not self.closed and (self._head is not None or bool(self._buffer.strip()))

    def feed(self, data):
        events = []
        if self.closed:
            return events
        self._buffer += data
        while not self.closed:
            index = self._buffer.find(b"\n")
            if index < 0:
                if len(self._buffer) > self._max_line:
                    events.append(self._fail(400, "line too long"))
                break
            raw, self._buffer = self._buffer[:index], self._buffer[index + 1:]
            if len(raw) > self._max_line:
                events.append(self._fail(400, "line too long"))
                break
            try:
                line = raw.decode("latin-1").removesuffix("\r")
            except UnicodeDecodeError:  # pragma: no cover (latin-1 decodes anything)
                line = ""
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _fail(self, status, reason):
        self.closed = True
        self._buffer = b""
        return Malformed(http_error(status), reason)

    def _line(self, line):
        if self._head is None:
            if not line.strip():
                return None
            match = _REQUEST_LINE.fullmatch(line)
            if match is None:
                return self._fail(400, f"bad request line {line[:80]!r}")
            method, target, version = match.groups()
            if version != "HTTP/1.1":
                return self._fail(505, f"HTTP version {version or '(none)'!r} is not HTTP/1.1")
            self._head = (method, target, version)
            self._headers = []
            return None
        if line == "":
            method, target, version = self._head
            self._head = None
            return Request(method, target, version, self._headers)
        match = _HEADER.fullmatch(line)
        if match is not None:
            if len(self._headers) >= self._max_headers:
                return self._fail(400, "too many headers")
            self._headers.append((match.group(1), match.group(2)))
            return None
        match = _CONTINUATION.fullmatch(line)
        if match is not None and self._headers:
            name, value = self._headers[-1]
            self._headers[-1] = (name, f"{value} {match.group(1)}")
            return None
        return self._fail(400, f"bad header line {line[:80]!r}")


def split_query(query):
    """
    C{k=v&k=v} -> dict (URI-unescaped; C{+} is not a space, as in Perl's
    C{uri_unescape}; a key without C{=} has an empty value; the last of a
    repeated key wins).
    """
    params = {}
    for part in (query or "").split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        params[unquote(key)] = unquote(value)
    return params


def route(request, functions, base=DEFAULT_BASE):
    """
    Decide what a request asks for.

    @param functions: the names callable remotely (a container).
    @return: a L{Call} to run, or a L{Response} (a C{404}) to send.
    """
    path, query = _URI_SPLIT.match(request.target).group(3, 4)
    base = base.rstrip("/")
    if request.method != "GET" or not (path == base or path.startswith(base + "/")):
        return http_error(404)
    match = re.search(r"(\w+)\Z", path, re.ASCII)
    if match is None or match.group(1) not in functions:
        return http_error(404)
    return Call(match.group(1), split_query(query))
