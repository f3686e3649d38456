"""
QVD's HTTP/1.1 "lite", sans-IO: the request parser and the response builder
of the client <-> L7R protocol (reference 1.1), byte-compatible with the
original C{QVD::HTTPD}.

    parser = RequestParser(Limits(max_line=8192))
    parser.feed(data)                       # bytes from the wire
    try:
        request = parser.next_request()     # a Request, or None: need more
    except HTTPParseError as e:
        transport.write(error_response(e.status, e.message))
        transport.loseConnection()
    ...
    transport.write(response_with_body(200, "text/plain", b"I am alive!\\r\\n"))
    transport.write(processing("Starting virtual machine"))     # 102
    transport.write(switching_protocols(slave_key))             # 101
    rest = parser.take_buffer()             # bytes the client sent after it

The grammar is the original's, line by line: lines end in C{\\n} or C{\\r\\n};
blank lines before a request are skipped; the request line is
C{METHOD SP url [SP HTTP/x.y]}; a version other than C{HTTP/1.1} (or none) is
C{505}; header lines are C{token: value} (value trimmed), a line starting with
blanks continues the previous header (joined with one space), an empty line
ends the request; anything else is C{400}. No C{Host} is required and
requests have no body: the next request (or, after an upgrade, the relayed
stream) starts right after the empty line.

Limits the original did not have (it read lines forever); each one, when
passed, is a L{HTTPParseError} after which the connection is closed:
a request line longer than C{Limits.max_line} is C{414 Request-URI Too Long};
a header line longer than C{max_line}, more than C{max_headers} header lines
or a request larger than C{max_request} bytes in all is C{400 Bad Request}
(the original's status for any request it cannot read; 431 is unknown to QVD
clients).

Responses are C{HTTP/1.1 <code> <message>\\r\\n<headers>\\r\\n\\r\\n[body]};
bodies carry C{Content-Type} then C{Content-Length} after the other headers;
an error without a message has the original's multi-line description of the
status as its C{text/plain} body.
"""

import re
from urllib.parse import unquote_to_bytes

import attrs

__all__ = [
    "Limits", "Request", "HTTPParseError", "RequestParser",
    "status_message", "status_description", "response", "response_with_body",
    "error_response", "processing", "switching_protocols", "unauthorized",
    "parse_query",
]


# The status lines and descriptions of QVD::HTTP::StatusCodes, for the codes
# the L7R sends. The message is the first line without its "(...)" remarks;
# the description (an error's default body) is the whole block.
_DESCRIPTIONS = {
    100: None,
    101: "101 Switching Protocols\n"
         "    This means the requester has asked the server to switch protocols\n"
         "    and the server is acknowledging that it will do so.[3]",
    102: "102 Processing (WebDAV) (RFC 2518 )",
    200: "200 OK\n"
         "    Standard response for successful HTTP requests. The actual\n"
         "    response will depend on the request method used. In a GET request,\n"
         "    the response will contain an entity corresponding to the requested\n"
         "    resource. In a POST request the response will contain an entity\n"
         "    describing or containing the result of the action.",
    400: "400 Bad Request\n"
         "    The request contains bad syntax or cannot be fulfilled.",
    401: "401 Unauthorized\n"
         "    Similar to 403 Forbidden, but specifically for use when\n"
         "    authentication is possible but has failed or not yet been\n"
         "    provided. The response must include a WWW-Authenticate header\n"
         "    field containing a challenge applicable to the requested\n"
         "    resource. See Basic access authentication and Digest access\n"
         "    authentication.",
    403: "403 Forbidden\n"
         "    The request was a legal request, but the server is refusing to\n"
         "    respond to it. Unlike a 401 Unauthorized response, authenticating\n"
         "    will make no difference.",
    404: "404 Not Found\n"
         "    The requested resource could not be found but may be available\n"
         "    again in the future. Subsequent requests by the client are\n"
         "    permissible.",
    405: "405 Method Not Allowed\n"
         "    A request was made of a resource using a request method not\n"
         "    supported by that resource; for example, using GET on a form which\n"
         "    requires data to be presented via POST, or using PUT on a\n"
         "    read-only resource.",
    408: "408 Request Timeout\n"
         "    The server timed out waiting for the request.",
    413: "413 Request Entity Too Large\n"
         "    The request is larger than the server is willing or able to\n"
         "    process.",
    414: "414 Request-URI Too Long\n"
         "    The URI provided was too long for the server to process.",
    422: "422 Unprocessable Entity (WebDAV) (RFC 4918 )\n"
         "    The request was well-formed but was unable to be followed due to\n"
         "    semantic errors.",
    426: "426 Upgrade Required (RFC 2817 )\n"
         "    The client should switch to TLS/1.0.",
    500: "500 Internal Server Error\n"
         "    A generic error message, given when no more specific message is\n"
         "    suitable.",
    502: "502 Bad Gateway\n"
         "    The server was acting as a gateway or proxy and received an\n"
         "    invalid response from the downstream server.",
    503: "503 Service Unavailable\n"
         "    The server is currently unavailable (because it is overloaded or\n"
         "    down for maintenance). Generally, this is a temporary state.",
    504: "504 Gateway Timeout\n"
         "    The server was acting as a gateway or proxy and did not receive a\n"
         "    timely request from the downstream server.",
    505: "505 HTTP Version Not Supported\n"
         "    The server does not support the HTTP protocol version used in the\n"
         "    request.",
}
_MESSAGE = re.compile(r"^(\d+)\s+(.*?)\s*(?:\(.*)?$", re.M)


def status_message(code):
    """
    The reason phrase of C{code} as the original sends it (C{"Processing"}
    for 102, C{"Upgrade Required"} for 426); C{"<code> Unknown error"} for a
    code it does not know.
    """
    description = _DESCRIPTIONS.get(code)
    if description is None:
        return f"{code} Unknown error"
    return _MESSAGE.match(description).group(2)


def status_description(code):
    """
    The original's multi-line description of C{code} (an error's default body).
    """
    return _DESCRIPTIONS.get(code) or f"{code} Unknown status code"


def _header_line(header):
    # The original folds a header value that spans lines with "\r\n  ".
    return "\r\n  ".join(header.splitlines())


def response(code, headers=()):
    """
    A response without a body: status line, C{headers} (C{"Name: value"}
    texts, in order), empty line.
    """
    lines = [f"HTTP/1.1 {code} {status_message(code)}"]
    lines.extend(_header_line(h) for h in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


def response_with_body(code, content_type, body, headers=()):
    """
    A response with C{body} (bytes or text, encoded UTF-8), after C{headers},
    C{Content-Type} and C{Content-Length}.
    """
    if isinstance(body, str):
        body = body.encode("utf-8")
    return response(code, list(headers) + [
        f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]) + body


def error_response(code, message=None, headers=()):
    """
    An error: C{text/plain} body C{message}, or the status description when
    no message is given (the original's C{send_http_error}).
    """
    body = status_description(code) if message is None else message
    return response_with_body(code, "text/plain", body, headers)


def processing(info):
    """
    An interim C{102 Processing} with C{X-QVD-VM-Info: <info>} (no body).
    """
    return response(102, [f"X-QVD-VM-Info: {info}"])


_SLAVE_KEY = re.compile(r"^[A-Za-z0-9]{64}$")


def switching_protocols(slave_key):
    """
    The C{101 Switching Protocols} that starts the relay, with the 64-char
    C{X-QVD-Slave-Key}.
    """
    if not _SLAVE_KEY.match(slave_key):
        raise ValueError(f"a slave key is 64 characters of [A-Za-z0-9], got {slave_key!r}")
    return response(101, [f"X-QVD-Slave-Key: {slave_key}"])


def unauthorized():
    """
    The C{401} asking for Basic credentials in realm QVD.
    """
    return error_response(401, headers=['WWW-Authenticate: Basic realm="QVD"'])


def parse_query(query):
    """
    Split a query string like the original's C{uri_query_split}: pairs in
    order, C{+} is a space, C{%XX} unescaped (UTF-8, bad bytes replaced); a
    key without C{=} has the value None.
    """
    pairs = []
    if not query:
        return pairs
    for part in query.split("&"):
        key, sep, value = part.partition("=")
        pairs.append((_unescape(key), _unescape(value) if sep else None))
    return pairs


def _unescape(text):
    return unquote_to_bytes(text.replace("+", " ")).decode("utf-8", "replace")


@attrs.frozen
class Limits:
    """
    Bounds on what one request may use.

    @ivar max_line: longest request line or header line, in bytes (without
        its line end).
    @ivar max_headers: most header lines (continuations count).
    @ivar max_request: most bytes of one request, blank lines before it
        included.
    """
    max_line: int = 8192
    max_headers: int = 100
    max_request: int = 65536


@attrs.frozen
class Request:
    """
    One parsed request.

    @ivar method: e.g. C{"GET"}.
    @ivar target: the URL as sent (path and query).
    @ivar path: the target without its query string.
    @ivar query: the query's (key, value) pairs in order (L{parse_query}).
    @ivar headers: (name, value) pairs in order, names as sent.
    """
    method: str
    target: str
    path: str
    query: tuple
    headers: tuple

    def header(self, name, default=None):
        """
        The value of the first header called C{name} (any case).
        """
        low = name.lower()
        for key, value in self.headers:
            if key.lower() == low:
                return value
        return default

    def headers_dict(self):
        """
        Header names lower-cased -> value (the first of repeated headers).
        """
        result = {}
        for key, value in self.headers:
            result.setdefault(key.lower(), value)
        return result


class HTTPParseError(Exception):
    """
    The client sent something that is not a request we accept. C{status} is
    the response to send (400, 414 or 505) before closing the connection;
    C{message} its body (None: the status description).
    """

    def __init__(self, status, reason, message=None):
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason
        self.message = message


_REQUEST_LINE = re.compile(r"^(\w+)\s+(.*?)\s*((?:\bHTTP/\d+\.\d+)?)$", re.A | re.S)
_TOKEN = r"[!#$%&'*+\-.0-9a-zA-Z]+"
_HEADER = re.compile(rf"^({_TOKEN})\s*:\s*(.*?)\s*$", re.A | re.S)
_CONTINUATION = re.compile(r"^\s+(.*?)\s*$", re.A | re.S)
_BLANK = re.compile(r"^\s*$", re.A)


class RequestParser:
    """
    Turns bytes into L{Request}s, one at a time.

    Feed it with L{feed}; take requests with L{next_request} only when ready
    for the next one (after an upgrade, the rest of the buffer is not HTTP:
    take it with L{take_buffer}). Once it raised L{HTTPParseError} the
    connection is unusable and the parser keeps raising it.
    """

    def __init__(self, limits=None):
        self.limits = limits or Limits()
        self._buffer = bytearray()
        self._error = None
        # Progress through the request being read, kept so that a request
        # arriving byte by byte is not re-parsed from its start each time.
        self._scan = 0          # offset up to which lines were consumed
        self._line = None       # (method, target) once the request line is in
        self._headers = []
        self._header_lines = 0

    @property
    def buffered(self):
        """
        How many bytes are waiting in the buffer.
        """
        return len(self._buffer)

    def feed(self, data):
        """
        Add bytes received from the client.
        """
        self._buffer += data

    def take_buffer(self):
        """
        Return and forget every byte not yet parsed (for the relay).
        """
        data = bytes(self._buffer[self._scan:])
        self._buffer = bytearray()
        self._reset()
        return data

    def _reset(self):
        self._scan = 0
        self._line = None
        self._headers = []
        self._header_lines = 0

    def _fail(self, status, reason):
        self._error = HTTPParseError(status, reason)
        self._buffer = bytearray()
        raise self._error

    def next_request(self):
        """
        The next complete request, or None when more bytes are needed.

        @raise HTTPParseError: the bytes are not an acceptable request.
        """
        if self._error is not None:
            raise self._error
        limits = self.limits
        while True:
            end = self._buffer.find(b"\n", self._scan)
            if end < 0:
                pending = len(self._buffer) - self._scan
                if pending > limits.max_line + 1:
                    if self._line is None:
                        self._fail(414, "request line too long")
                    self._fail(400, "header line too long")
                if len(self._buffer) > limits.max_request:
                    self._fail(400, "request too large")
                return None
            raw = bytes(self._buffer[self._scan:end])
            self._scan = end + 1
            if self._scan > limits.max_request:
                self._fail(400, "request too large")
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if len(raw) > limits.max_line:
                if self._line is None:
                    self._fail(414, "request line too long")
                self._fail(400, "header line too long")
            line = raw.decode("latin-1")
            if self._line is None:
                if _BLANK.match(line):
                    continue
                match = _REQUEST_LINE.match(line)
                if match is None:
                    self._fail(400, "malformed request line")
                method, target, version = match.groups()
                if version != "HTTP/1.1":
                    self._fail(505, f"HTTP version {version or 'missing'}")
                self._line = (method, target)
                continue
            if line == "":
                return self._complete()
            self._header_lines += 1
            if self._header_lines > limits.max_headers:
                self._fail(400, "too many header lines")
            match = _HEADER.match(line)
            if match is not None:
                self._headers.append([match.group(1), match.group(2)])
                continue
            match = _CONTINUATION.match(line)
            if match is not None:
                if not self._headers:
                    self._fail(400, "continuation line before any header")
                self._headers[-1][1] += " " + match.group(1)
                continue
            self._fail(400, "malformed header line")

    def _complete(self):
        method, target = self._line
        headers = tuple((name, value) for name, value in self._headers)
        del self._buffer[:self._scan]
        self._reset()
        path, _, query = target.partition("?")
        return Request(method=method, target=target, path=path,
                       query=tuple(parse_query(query)), headers=headers)
