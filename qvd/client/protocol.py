"""
The client side of the QVD client <-> L7R protocol, without I/O (reference 1.2-1.4).

Build requests, then feed whatever the server sends to a L{ResponseParser}:

    request = list_of_vm_request(BasicAuth("alice@acme", "secret"))
    transport.write(request)
    parser = ResponseParser()
    for event in parser.feed(data):     # call again with each chunk received
        ...                             # Interim / Response / Upgraded

    vms = parse_vm_list(response.body)
    transport.write(connect_to_vm_request(auth, vms[0].id, ConnectParameters()))

A C{102 Processing} yields an L{Interim} (its C{X-QVD-VM-Info} is the progress
text), a C{101 Switching Protocols} an L{Upgraded} carrying the bytes that came
after it in the same read (they belong to the NX stream and must be relayed),
anything else a final L{Response}. After L{Upgraded} the parser refuses more data.

The requests are byte for byte what the original Perl client (QVD::HTTPC)
sends: request line (list_of_vm with its trailing C{?}), C{Authorization},
C{Accept} or C{Connection}/C{Upgrade}, C{User-Agent}; no C{Host} header.
"""

import base64
import json
import re
from urllib.parse import quote

import attrs

USER_AGENT = "QVD::HTTPC/0.01 (linux)"
LINKS = ("modem", "isdn", "adsl", "wan", "lan", "local")
MAX_HEAD = 64 * 1024

_GEOMETRY = re.compile(r"^\d{1,5}x\d{1,5}$")
_KEYBOARD = re.compile(r"^[\w/\-+]+$")


class ProtocolError(ValueError):
    """
    The server sent something that is not the QVD HTTP dialect; the message
    says what and shows the offending bytes.
    """


class ParameterError(ValueError):
    """
    A connection parameter has a value the server would refuse; the message
    names the parameter and the accepted values.
    """


@attrs.frozen
class BasicAuth:
    """
    C{Authorization: Basic base64(login:password)}; C{login} may embed the
    tenant as C{user@tenant} or C{user#tenant}.
    """
    login: str
    password: str

    def header(self):
        raw = f"{self.login}:{self.password}".encode("utf-8")
        return "Basic " + base64.b64encode(raw).decode("ascii")


@attrs.frozen
class BearerAuth:
    """
    C{Authorization: Bearer <token>}, the token exactly as C{create_auth_token}
    returned it (already base64).
    """
    token: str

    def header(self):
        return "Bearer " + self.token.strip()


def _check_link(instance, attribute, value):
    if value not in LINKS:
        raise ParameterError(
            f"link {value!r} is not one of {', '.join(LINKS)}")


def _check_geometry(instance, attribute, value):
    if not _GEOMETRY.match(value):
        raise ParameterError(
            f"geometry {value!r} must be WIDTHxHEIGHT, e.g. 1024x768")


def _check_keyboard(instance, attribute, value):
    if not _KEYBOARD.match(value):
        raise ParameterError(
            f"keyboard {value!r} must look like MODEL/LAYOUT, e.g. pc105/us")


@attrs.frozen
class ConnectParameters:
    """
    The C{qvd.client.*} parameters of C{connect_to_vm} (reference 1.2). The
    VMA puts them on the nxagent options line, so each must match
    C{^[\\w/\\-+]+$} or be empty.
    """
    keyboard: str = attrs.field(default="pc105/us", validator=_check_keyboard)
    os: str = "linux"
    link: str = attrs.field(default="adsl", validator=_check_link)
    geometry: str = attrs.field(default="1024x768", validator=_check_geometry)
    fullscreen: bool = False
    nxagent_extra_args: str = ""
    printing: bool = False
    usb: bool = False
    usb_implementation: str = "USBIP"
    audio_compression: bool = False
    audio_redirect: bool = False

    def query(self, vm_id):
        """
        The query string pairs, in the order the reference shows them.
        """
        flag = lambda value: "1" if value else "0"
        return [
            ("id", str(vm_id)),
            ("qvd.client.keyboard", self.keyboard),
            ("qvd.client.os", self.os),
            ("qvd.client.link", self.link),
            ("qvd.client.geometry", self.geometry),
            ("qvd.client.fullscreen", "1" if self.fullscreen else ""),
            ("qvd.client.nxagent.extra_args", self.nxagent_extra_args),
            ("qvd.client.printing.enabled", flag(self.printing)),
            ("qvd.client.usb.enabled", flag(self.usb)),
            ("qvd.client.usb.implementation", self.usb_implementation),
            ("qvd.client.audio.compression.enable", flag(self.audio_compression)),
            ("qvd.client.audio.redirect.enable", flag(self.audio_redirect)),
            ("qvd.client.audio.redirect.server", ""),
            ("qvd.client.audio.redirect.port", ""),
        ]


def uri_escape(text):
    """
    Percent-encode like Perl's C{URI::Escape::uri_escape}: everything except
    C{A-Za-z0-9-._~}, UTF-8 first.
    """
    return quote(str(text).encode("utf-8"), safe="~")


def encode_query(pairs):
    return "&".join(f"{uri_escape(k)}={uri_escape(v)}" for k, v in pairs)


def build_request(path, headers):
    """
    A C{GET} request: C{path} (with its query), then C{headers} (name, value)
    in order, then C{User-Agent}; lines end in CRLF; no body.
    """
    lines = [f"GET {path} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines.append(f"User-Agent: {USER_AGENT}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def list_of_vm_request(auth, file_name=None):
    """
    C{GET /qvd/list_of_vm?} (the trailing C{?} is the original's).
    """
    query = encode_query([("file_name", file_name)]) if file_name else ""
    return build_request(
        "/qvd/list_of_vm?" + query,
        [("Authorization", auth.header()), ("Accept", "application/json")])


def connect_to_vm_request(auth, vm_id, parameters):
    """
    C{GET /qvd/connect_to_vm?id=N&qvd.client.*} asking to upgrade to C{QVD/1.0}.
    """
    return build_request(
        "/qvd/connect_to_vm?" + encode_query(parameters.query(vm_id)),
        [("Authorization", auth.header()),
         ("Connection", "Upgrade"),
         ("Upgrade", "QVD/1.0")])


@attrs.frozen
class Headers:
    """
    Response headers in arrival order; lookups ignore case.
    """
    items: tuple = ()

    def get(self, name, default=None):
        low = name.lower()
        for key, value in self.items:
            if key.lower() == low:
                return value
        return default


@attrs.frozen
class Interim:
    """
    A C{1xx} response other than 101 (QVD sends C{102 Processing}).

    @ivar info: the C{X-QVD-VM-Info} text, or C{None}.
    """
    code: int
    reason: str
    headers: Headers

    @property
    def info(self):
        return self.headers.get("X-QVD-VM-Info")


@attrs.frozen
class Response:
    """
    A final response with its body (bytes).
    """
    code: int
    reason: str
    headers: Headers
    body: bytes

    @property
    def text(self):
        return self.body.decode("utf-8", "replace").strip()


@attrs.frozen
class Upgraded:
    """
    C{101 Switching Protocols}: from here on the connection is the NX stream.

    @ivar rest: bytes received after the 101 head; they are NX data.
    """
    headers: Headers
    rest: bytes

    @property
    def slave_key(self):
        return self.headers.get("X-QVD-Slave-Key")


@attrs.frozen
class VM:
    """
    One entry of C{list_of_vm}.
    """
    id: int
    name: str
    state: str
    blocked: bool


def parse_vm_list(body):
    """
    Decode the C{list_of_vm} JSON body into L{VM}s; raise L{ProtocolError}
    if it is not a list of objects with a numeric C{id}.
    """
    try:
        data = json.loads(body.decode("utf-8") if isinstance(body, bytes) else body)
    except ValueError as e:
        raise ProtocolError(f"the VM list is not valid JSON ({e}): {body[:200]!r}")
    if not isinstance(data, list):
        raise ProtocolError(f"the VM list is not a JSON list: {body[:200]!r}")
    vms = []
    for entry in data:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int):
            raise ProtocolError(f"a VM list entry has no numeric id: {entry!r}")
        vms.append(VM(
            id=entry["id"],
            name=str(entry.get("name", "")),
            state=str(entry.get("state", "")),
            blocked=bool(int(entry.get("blocked") or 0)),
        ))
    return vms


_STATUS_LINE = re.compile(rb"^(HTTP/\d\.\d)\s+(\d{3})(?:\s+(.*?))?\s*$")
_HEADER_LINE = re.compile(rb"^([^\s:]+)\s*:\s*(.*?)\s*$")


class ResponseParser:
    """
    Incremental parser of the server's responses on one connection.

    States: C{head} (collecting a status line and headers), C{body}
    (collecting C{Content-Length} bytes), C{upgraded} (done: everything
    after the 101 went out in L{Upgraded.rest}), C{failed}.
    """

    def __init__(self, max_head=MAX_HEAD):
        self._buffer = b""
        self._state = "head"
        self._pending = None
        self._max_head = max_head

    @property
    def state(self):
        return self._state

    def feed(self, data):
        """
        Add C{data}; return the list of events it completes (possibly empty).
        Raises L{ProtocolError} on malformed input or data after an upgrade.
        """
        if self._state == "upgraded":
            raise ProtocolError("data fed to the response parser after the 101")
        if self._state == "failed":
            raise ProtocolError("the response parser already failed")
        self._buffer += data
        events = []
        try:
            while True:
                event = self._step()
                if event is None:
                    break
                events.append(event)
                if isinstance(event, Upgraded):
                    break
        except ProtocolError:
            self._state = "failed"
            raise
        return events

    def connection_lost(self):
        """
        The server closed the connection. A body without C{Content-Length}
        ends here and is returned as a L{Response}; otherwise C{None}.
        Raises L{ProtocolError} if a response was cut in the middle.
        """
        if self._state == "body" and self._pending[3] is None:
            code, reason, headers, _ = self._pending
            self._state = "head"
            body, self._buffer = self._buffer, b""
            return Response(code, reason, headers, body)
        if self._state == "body" or (self._state == "head" and self._buffer.strip()):
            self._state = "failed"
            raise ProtocolError(
                "the server closed the connection in the middle of a response")
        return None

    def _step(self):
        if self._state == "head":
            return self._parse_head()
        if self._state == "body":
            return self._parse_body()
        return None

    def _parse_head(self):
        # Blank lines before a status line are skipped, as QVD::HTTPC does.
        stripped = self._buffer.lstrip(b"\r\n")
        self._buffer = stripped
        end, sep_len = _find_head_end(self._buffer)
        if end < 0:
            if len(self._buffer) > self._max_head:
                raise ProtocolError(
                    f"response head longer than {self._max_head} bytes: "
                    f"{self._buffer[:80]!r}")
            return None
        head, self._buffer = self._buffer[:end], self._buffer[end + sep_len:]
        lines = head.replace(b"\r\n", b"\n").split(b"\n")
        match = _STATUS_LINE.match(lines[0])
        if match is None:
            raise ProtocolError(f"not an HTTP status line: {lines[0][:120]!r}")
        if match.group(1) != b"HTTP/1.1":
            raise ProtocolError(
                f"unsupported HTTP version {match.group(1).decode()!r} "
                f"in {lines[0][:120]!r}")
        code = int(match.group(2))
        reason = (match.group(3) or b"").decode("latin-1")
        items = []
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t"):
                if not items:
                    raise ProtocolError(f"header continuation without a header: {line!r}")
                name, value = items[-1]
                items[-1] = (name, value + " " + line.strip().decode("latin-1"))
                continue
            header = _HEADER_LINE.match(line)
            if header is None:
                raise ProtocolError(f"malformed header line: {line[:120]!r}")
            items.append((header.group(1).decode("latin-1"),
                          header.group(2).decode("latin-1")))
        headers = Headers(tuple(items))
        if code == 101:
            self._state = "upgraded"
            rest, self._buffer = self._buffer, b""
            return Upgraded(headers, rest)
        if 100 <= code < 200:
            return Interim(code, reason, headers)
        length = headers.get("Content-Length")
        if length is not None:
            if not length.strip().isdigit():
                raise ProtocolError(f"bad Content-Length {length!r}")
            length = int(length)
        elif code in (204, 304):
            length = 0
        self._pending = (code, reason, headers, length)
        self._state = "body"
        return self._parse_body()

    def _parse_body(self):
        code, reason, headers, length = self._pending
        if length is None or len(self._buffer) < length:
            return None
        body, self._buffer = self._buffer[:length], self._buffer[length:]
        self._state = "head"
        self._pending = None
        return Response(code, reason, headers, body)


def _find_head_end(buffer):
    """
    Index and length of the blank line ending a head; lines may end in
    CRLF or a bare LF. (-1, 0) if not there yet.
    """
    best = (-1, 0)
    for sep in (b"\r\n\r\n", b"\n\n", b"\r\n\n", b"\n\r\n"):
        i = buffer.find(sep)
        if i >= 0 and (best[0] < 0 or i < best[0]):
            best = (i, len(sep))
    return best
