"""
Fuzzing the QVD HTTP-lite parser and the L7R's connection protocol with
hypothesis, and the request timeouts with task.Clock (socket-free).
"""

import re

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.internet import defer, task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from qvd.l7r.server import L7RProtocol, ServerSettings
from qvd.protocols import http

LIMITS = http.Limits(max_line=200, max_headers=10, max_request=1000)
FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def chunked(data, cuts):
    points = sorted({c % (len(data) + 1) for c in cuts})
    last = 0
    for p in points + [len(data)]:
        yield data[last:p]
        last = p


tokens = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.",
                 min_size=1, max_size=12)
values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
eols = st.sampled_from([b"\n", b"\r\n"])


@st.composite
def valid_requests(draw):
    eol = draw(eols)
    path = "/" + draw(tokens)
    headers = draw(st.lists(st.tuples(tokens, values), max_size=5))
    data = f"GET {path} HTTP/1.1".encode() + eol
    for name, value in headers:
        data += f"{name}: {value}".encode() + eol
    return data + eol, path, [(n, v.strip()) for n, v in headers]


@st.composite
def mangled(draw):
    """A valid request with a few bytes replaced, inserted or cut."""
    data, _, _ = draw(valid_requests())
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["replace", "insert", "delete"]))
        pos = draw(st.integers(0, len(data)))
        byte = draw(st.integers(0, 255))
        if op == "replace" and pos < len(data):
            data[pos] = byte
        elif op == "insert":
            data.insert(pos, byte)
        elif pos < len(data):
            del data[pos]
    return bytes(data)


inputs = st.one_of(st.binary(max_size=3000), mangled(),
                   st.builds(lambda a, b: a + b, valid_requests().map(lambda r: r[0]), st.binary(max_size=300)),
                   st.binary(max_size=5).map(lambda b: b * 400))


def drain(parser):
    requests = []
    while True:
        request = parser.next_request()
        if request is None:
            return requests
        requests.append(request)


class ParserFuzzTests(unittest.TestCase):
    @FUZZ
    @given(data=inputs, cuts=st.lists(st.integers(0, 5000), max_size=8))
    def test_only_parse_errors_escape(self, data, cuts):
        """Whatever bytes arrive, in whatever chunks, the parser returns requests,
        None, or raises HTTPParseError with 400/414/505, and never holds more
        than max_request bytes."""
        parser = http.RequestParser(LIMITS)
        try:
            for chunk in chunked(data, cuts):
                parser.feed(chunk)
                drain(parser)
                self.assertLessEqual(parser.buffered, LIMITS.max_request)
        except http.HTTPParseError as e:
            self.assertIn(e.status, (400, 414, 505))

    @FUZZ
    @given(request=valid_requests(), cuts=st.lists(st.integers(0, 500), max_size=6))
    def test_valid_requests_parse(self, request, cuts):
        """A well-formed request parses to its path and trimmed headers however
        it is chunked."""
        data, path, headers = request
        parser = http.RequestParser(LIMITS)
        got = []
        for chunk in chunked(data, cuts):
            parser.feed(chunk)
            got.extend(drain(parser))
        self.assertEqual(len(got), 1)
        self.assertEqual(got[0].path, path)
        self.assertEqual(list(got[0].headers), headers)


class StubL7R:
    """
    Answers every request at once: 200 for /ok, 404 otherwise.
    """

    def __init__(self, clock, settings):
        self.reactor = clock
        self.settings = settings
        self.connections = set()
        self.requests = []

    def handle(self, request, conn):
        self.requests.append(request)
        if request.path == "/ok":
            conn.write(http.response_with_body(200, "text/plain", b"ok"))
        else:
            conn.write(http.error_response(404))
        return defer.succeed(None)


def responses(data):
    """
    The status codes of the responses in C{data}; fails on anything else.
    """
    codes = []
    while data:
        match = re.match(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n((?:[^\r\n]+\r\n)*)\r\n", data)
        assert match, data
        length = re.search(rb"Content-Length: (\d+)\r\n", match.group(2))
        size = match.end() + (int(length.group(1)) if length else 0)
        assert len(data) >= size, data
        codes.append(int(match.group(1)))
        data = data[size:]
    return codes


def make_protocol(request_timeout=5, idle_timeout=60):
    clock = task.Clock()
    l7r = StubL7R(clock, ServerSettings(request_timeout=request_timeout,
                                        idle_timeout=idle_timeout, limits=LIMITS))
    proto = L7RProtocol(l7r)
    transport = StringTransport()
    proto.makeConnection(transport)
    return clock, l7r, proto, transport


class ProtocolFuzzTests(unittest.TestCase):
    @FUZZ
    @given(data=inputs, cuts=st.lists(st.integers(0, 5000), max_size=8))
    def test_never_hangs(self, data, cuts):
        """Through the real protocol every input ends in well-formed responses and,
        once the timeouts passed, a closed connection; a malformed request is
        answered 4xx/505 before the close."""
        clock, l7r, proto, transport = make_protocol()
        for chunk in chunked(data, cuts):
            if transport.disconnecting:
                break
            proto.dataReceived(chunk)
            clock.advance(0.1)
        clock.advance(61)
        self.assertTrue(transport.disconnecting)
        codes = responses(transport.value())
        self.assertEqual(len([c for c in codes if c in (200, 404)]), len(l7r.requests))
        self.assertTrue(codes, "closed without a response")
        self.assertIn(codes[-1], (200, 404, 400, 408, 414, 505))


class TimeoutTests(unittest.TestCase):
    def test_slow_loris(self):
        """A client that trickles a request byte by byte is answered 408 and cut
        request_timeout seconds after its first byte."""
        clock, l7r, proto, transport = make_protocol(request_timeout=5)
        for byte in b"GET /ok HTTP/1.1\r\nX-Slow: yes":
            if transport.disconnecting:
                break
            proto.dataReceived(bytes([byte]))
            clock.advance(0.2)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), http.error_response(408))
        self.assertEqual(l7r.requests, [])

    def test_just_in_time(self):
        """A request completed just before request_timeout is answered."""
        clock, l7r, proto, transport = make_protocol(request_timeout=5)
        proto.dataReceived(b"GET /ok HTTP/1.1\r\n")
        clock.advance(4.9)
        proto.dataReceived(b"\r\n")
        self.assertFalse(transport.disconnecting)
        self.assertEqual(responses(transport.value()), [200])

    def test_idle(self):
        """A connection idle between requests is cut after idle_timeout, not before."""
        clock, l7r, proto, transport = make_protocol(request_timeout=5, idle_timeout=60)
        proto.dataReceived(b"GET /ok HTTP/1.1\n\n")
        clock.advance(59)
        self.assertFalse(transport.disconnecting)
        proto.dataReceived(b"GET /x HTTP/1.1\n\n")
        clock.advance(59)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(responses(transport.value()), [200, 404, 408])

    def test_pipelined(self):
        """Several requests in one segment are answered in order."""
        clock, l7r, proto, transport = make_protocol()
        proto.dataReceived(b"GET /ok HTTP/1.1\n\nGET /no HTTP/1.1\r\n\r\nGET /ok HTTP/1.1\n\n")
        self.assertEqual(responses(transport.value()), [200, 404, 200])

    def test_busy_buffer_paused(self):
        """While a request is being answered, a client sending more than
        max_request bytes is paused, and resumed when the answer is done."""
        clock, l7r, proto, transport = make_protocol()
        pending = defer.Deferred()
        l7r.handle = lambda request, conn: pending
        proto.dataReceived(b"GET /slow HTTP/1.1\n\n")
        proto.dataReceived(b"x" * (LIMITS.max_request + 1))
        self.assertEqual(transport.producerState, "paused")
        pending.callback(None)
        self.assertEqual(transport.producerState, "producing")
