"""
SimpleRPC: the sans-IO codec and the server protocol, socket-free.
"""

import os

from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from qvd.protocols import simplerpc
from qvd.protocols.simplerpc import (
    SECRET_HEADER, Call, Malformed, Request, RequestParser, SimpleRPCError,
    SimpleRPCProtocolError, build_request, build_request_path, new_secret,
    parse_response_body, route, secret_matches)
from qvd.vma.rpcserver import (
    RPCError, RPCLimits, SimpleRPCServerFactory, SimpleRPCServerProtocol)
from qvd.vma.secret import AgentSecret

NOT_FOUND = (b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: 160\r\n\r\n"
             b"404 Not Found\n    The requested resource could not be found but may be available\n"
             b"    again in the future. Subsequent requests by the client are\n    permissible.")


class RequestPathTests(unittest.TestCase):

    def test_plain(self):
        """A call without params is /vma/<fn>."""
        self.assertEqual(build_request_path("ping"), "/vma/ping")

    def test_escaped(self):
        """Keys and values are URI-escaped like Perl's uri_escape, in order."""
        path = build_request_path("x_start", {"qvd.client.os": "linux", "a b": "x&y=z/é"})
        self.assertEqual(path, "/vma/x_start?qvd.client.os=linux&a%20b=x%26y%3Dz%2F%C3%A9")

    def test_none_and_bool(self):
        """None is sent empty and booleans as 1/0."""
        self.assertEqual(build_request_path("f", [("a", None), ("b", True), ("c", False)]),
                         "/vma/f?a=&b=1&c=0")

    def test_bad_function(self):
        """A function name that is not a word is refused before anything is sent."""
        self.assertRaises(ValueError, build_request_path, "x/../y")

    def test_request_bytes(self):
        """build_request gives a whole HTTP/1.1 GET with a Host header."""
        self.assertEqual(build_request("10.0.0.2:3030", "ping"),
                         b"GET /vma/ping HTTP/1.1\r\nHost: 10.0.0.2:3030\r\n\r\n")


class ResponseBodyTests(unittest.TestCase):

    def test_result(self):
        """A one-element body is the result."""
        self.assertEqual(parse_response_body(b'"listening"\r\n'), "listening")

    def test_null(self):
        """null (Perl's undef) is None."""
        self.assertIsNone(parse_response_body(b"null\r\n"))

    def test_pretty_perl(self):
        """The original's pretty JSON (trailing newline) parses too."""
        self.assertEqual(parse_response_body(b'{\n   "a" : 1\n}\n\r\n'), {"a": 1})

    def test_error(self):
        """A two-element body raises SimpleRPCError with the message."""
        e = self.assertRaises(SimpleRPCError, parse_response_body,
                              b'"","Can\'t connect, retry later\\n"\r\n')
        self.assertEqual(e.message, "Can't connect, retry later")

    def test_garbage(self):
        """A body that is not JSON is a protocol error, not a result."""
        self.assertRaises(SimpleRPCProtocolError, parse_response_body, b"<html>")
        self.assertRaises(SimpleRPCProtocolError, parse_response_body, b"\xff\xfe")

    def test_roundtrip(self):
        """Server-built replies parse back on the client side."""
        self.assertEqual(parse_response_body(simplerpc.result_response([1, "x"]).body), [1, "x"])
        self.assertEqual(simplerpc.error_response("no").body, b'"","no"\r\n')
        self.assertRaises(SimpleRPCError, parse_response_body,
                          simplerpc.error_response("no").body)

    def test_response_bytes(self):
        """A reply is 200 with the SimpleRPC content type and a Content-Length."""
        self.assertEqual(
            simplerpc.result_response("stopped").to_bytes(),
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json-simplerpc\r\n"
            b"Content-Length: 11\r\n\r\n\"stopped\"\r\n")


class ParserTests(unittest.TestCase):

    def test_request(self):
        """A request head split across feeds is one Request with its headers."""
        p = RequestParser()
        self.assertEqual(p.feed(b"\r\nGET /vma/ping HTTP/1.1\r\nHost: x\r\n"), [])
        [req] = p.feed(b"X-A:  b \r\n\r\n")
        self.assertEqual((req.method, req.target, req.version), ("GET", "/vma/ping", "HTTP/1.1"))
        self.assertEqual(req.headers, [("Host", "x"), ("X-A", "b")])

    def test_pipelined(self):
        """Two requests in one packet are two events."""
        events = RequestParser().feed(b"GET /a HTTP/1.1\n\nGET /b HTTP/1.1\n\n")
        self.assertEqual([e.target for e in events], ["/a", "/b"])

    def test_bad_line(self):
        """Garbage is a 400 and the parser closes."""
        p = RequestParser()
        [e] = p.feed(b"\x16\x03\x01 hello\r\n")
        self.assertIsInstance(e, Malformed)
        self.assertEqual(e.response.status, 400)
        self.assertTrue(p.closed)
        self.assertEqual(p.feed(b"GET / HTTP/1.1\r\n\r\n"), [])

    def test_http10(self):
        """HTTP/1.0 is answered 505, as the original does."""
        [e] = RequestParser().feed(b"GET /vma/ping HTTP/1.0\r\n")
        self.assertEqual(e.response.status, 505)

    def test_bad_header(self):
        """A header line that is not a header is a 400."""
        [e] = RequestParser().feed(b"GET /vma/ping HTTP/1.1\r\n: nope\r\n")
        self.assertEqual(e.response.status, 400)

    def test_long_line(self):
        """An endless line is cut off with a 400."""
        [e] = RequestParser(max_line=100).feed(b"G" * 200)
        self.assertEqual(e.response.status, 400)


class RouteTests(unittest.TestCase):

    def req(self, target, method="GET"):
        return Request(method, target, "HTTP/1.1", [])

    def test_call(self):
        """A known function under /vma/ is a Call with unescaped params; last key wins."""
        self.assertEqual(route(self.req("/vma/x_start?a=1&b=x%20y+z&a=2&c"), {"x_start"}),
                         Call("x_start", {"a": "2", "b": "x y+z", "c": ""}))

    def test_unknown(self):
        """An unknown function, another base or another method is the original's 404."""
        for req in [self.req("/vma/nope"), self.req("/other/ping"), self.req("/vma/"),
                    self.req("/vma/ping", "POST")]:
            self.assertEqual(route(req, {"ping"}).to_bytes(), NOT_FOUND)


class ServerProtocolTests(unittest.TestCase):

    def connect(self, functions):
        self.clock = task.Clock()
        factory = SimpleRPCServerFactory(functions, idle_timeout=30, clock=self.clock)
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_success(self):
        """A call is answered with its JSON result."""
        proto, t = self.connect({"ping": lambda p: None})
        proto.dataReceived(b"GET /vma/ping HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(t.value().endswith(b"\r\n\r\nnull\r\n"))
        self.assertFalse(t.disconnecting)

    def test_exception(self):
        """A function that raises becomes an error reply and the server keeps serving."""
        def boom(params):
            raise KeyError("k")
        proto, t = self.connect({"boom": boom, "ping": lambda p: "pong"})
        proto.dataReceived(b"GET /vma/boom HTTP/1.1\r\n\r\nGET /vma/ping HTTP/1.1\r\n\r\n")
        out = t.value()
        self.assertIn(b'"","boom failed: ', out)
        self.assertTrue(out.endswith(b'"pong"\r\n'))
        self.flushLoggedErrors(KeyError)

    def test_exception_log_hides_secrets(self):
        """The log of a failed call masks the NX cookie, slave key and token."""
        from twisted.logger import globalLogPublisher
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)

        def boom(params):
            raise KeyError("k")
        proto, t = self.connect({"x_start": boom})
        proto.dataReceived(b"GET /vma/x_start?qvd.nx.cookie=c00c1e&qvd.slave.key=s1ave"
                           b"&auth_token=t0ken&qvd.client.os=linux HTTP/1.1\r\n\r\n")
        self.flushLoggedErrors(KeyError)
        logged = [e for e in events if e.get("fn") == "x_start"]
        self.assertEqual(len(logged), 1)
        text = repr(logged[0].get("params"))
        for secret in ("c00c1e", "s1ave", "t0ken"):
            self.assertNotIn(secret, text)
        self.assertIn("linux", text)

    def test_rpc_error(self):
        """An RPCError is answered with exactly its message."""
        def no(params):
            raise RPCError("retry later")
        proto, t = self.connect({"no": no})
        proto.dataReceived(b"GET /vma/no HTTP/1.1\r\n\r\n")
        self.assertTrue(t.value().endswith(b'\r\n\r\n"","retry later"\r\n'))

    def test_deferred_in_order(self):
        """Pipelined calls are answered in order even if the first is slow."""
        slow = defer.Deferred()
        proto, t = self.connect({"slow": lambda p: slow, "fast": lambda p: p})
        proto.dataReceived(b"GET /vma/slow HTTP/1.1\r\n\r\nGET /vma/fast?k=v HTTP/1.1\r\n\r\n")
        self.assertEqual(t.value(), b"")
        slow.callback(1)
        out = t.value()
        self.assertLess(out.index(b"\r\n\r\n1\r\n"), out.index(b'{"k": "v"}'))

    def test_malformed_closes(self):
        """A malformed request gets a 400 and the connection is closed."""
        proto, t = self.connect({})
        proto.dataReceived(b"\x00\x01garbage\r\n")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 400 Bad Request\r\n"))
        self.assertTrue(t.disconnecting)

    def test_unknown_404(self):
        """An unknown function is a 404 and the connection stays open."""
        proto, t = self.connect({})
        proto.dataReceived(b"GET /vma/vnc_connect HTTP/1.1\r\n\r\n")
        self.assertEqual(t.value(), NOT_FOUND)
        self.assertFalse(t.disconnecting)

    def test_connection_close(self):
        """Connection: close is honoured after the reply."""
        proto, t = self.connect({"ping": lambda p: None})
        proto.dataReceived(b"GET /vma/ping HTTP/1.1\r\nConnection: close\r\n\r\n")
        self.assertTrue(t.disconnecting)

    def test_idle_timeout(self):
        """A connection that sends nothing for idle_timeout seconds is closed."""
        proto, t = self.connect({})
        self.clock.advance(29)
        self.assertFalse(t.disconnecting)
        self.clock.advance(1)
        self.assertTrue(t.disconnecting)

    def test_slow_call_not_idle(self):
        """A call that takes longer than idle_timeout is still answered."""
        slow = defer.Deferred()
        proto, t = self.connect({"slow": lambda p: slow})
        proto.dataReceived(b"GET /vma/slow HTTP/1.1\r\n\r\n")
        self.clock.advance(100)
        self.assertFalse(t.disconnecting)
        slow.callback("done")
        self.assertTrue(t.value().endswith(b'"done"\r\n'))
        self.clock.advance(30)
        self.assertTrue(t.disconnecting)

    def test_unserialisable(self):
        """A result that is not JSON is an error reply, not a crash."""
        proto, t = self.connect({"bad": lambda p: object()})
        proto.dataReceived(b"GET /vma/bad HTTP/1.1\r\n\r\n")
        self.assertIn(b'"","internal error', t.value())


class FuzzTests(unittest.TestCase):

    def test_parser_never_raises(self):
        """Arbitrary bytes, in arbitrary chunks, never make the parser or router raise."""
        try:
            from hypothesis import given, settings, strategies as st
        except ImportError:
            raise unittest.SkipTest("hypothesis is not installed")

        @settings(max_examples=120, deadline=None)
        @given(st.lists(st.binary(max_size=200), max_size=8))
        def check(chunks):
            parser = RequestParser(max_line=256)
            for chunk in chunks:
                for event in parser.feed(chunk):
                    if isinstance(event, Request):
                        result = route(event, {"ping", "x_start"})
                        if isinstance(result, Call):
                            build_request_path(result.function, result.params)
                        else:
                            result.to_bytes()
                    else:
                        event.response.to_bytes()
        check()

    def test_target_roundtrip(self):
        """Any params survive build_request_path -> route unchanged."""
        try:
            from hypothesis import given, settings, strategies as st
        except ImportError:
            raise unittest.SkipTest("hypothesis is not installed")

        @settings(max_examples=120, deadline=None)
        @given(st.dictionaries(st.text(min_size=1), st.text()))
        def check(params):
            target = build_request_path("x_start", params)
            call = route(Request("GET", target, "HTTP/1.1", []), {"x_start"})
            self.assertEqual(call, Call("x_start", params))
        check()


class SecretTests(unittest.TestCase):
    """The per-VM secret on the agent's side (qvd.vma.secret) and in its server."""

    def setUp(self):
        self.path = self.mktemp()
        self.clock = task.Clock()

    def write(self, text):
        with open(self.path, "w") as f:
            f.write(text + "\n")

    def serve(self, secret):
        factory = SimpleRPCServerFactory({"ping": lambda p: "pong"}, clock=self.clock,
                                         secret=secret)
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return factory, proto, transport

    def call(self, header=None):
        factory, proto, t = self.serve(self.secret)
        extra = f"{SECRET_HEADER}: {header}\r\n" if header is not None else ""
        proto.dataReceived(f"GET /vma/ping HTTP/1.1\r\nHost: x\r\n{extra}\r\n".encode())
        return t.value(), t.disconnecting

    def test_calls_need_the_secret(self):
        """
        With a secret file, a call without the secret or with a wrong one is
        answered 403 and its connection closed; with it, the call runs.
        """
        self.write("s3cret-value")
        self.secret = AgentSecret(self.path, required=True)
        for header in (None, "", "wrong", "s3cret-valuE", "s3cret-value-and-more"):
            body, closed = self.call(header)
            self.assertTrue(body.startswith(b"HTTP/1.1 403 Forbidden"), (header, body))
            self.assertTrue(closed)
        body, closed = self.call("s3cret-value")
        self.assertTrue(body.endswith(b'"pong"\r\n'), body)
        self.assertFalse(closed)

    def test_new_secret_read(self):
        """A new start's secret replaces the old one at once."""
        self.write("first")
        self.secret = AgentSecret(self.path)
        self.assertTrue(self.secret.allows("first"))
        os.unlink(self.path)
        self.write("second-secret")
        self.assertFalse(self.secret.allows("first"))
        self.assertTrue(self.secret.allows("second-secret"))

    def test_missing_file(self):
        """Without a file, calls are refused when required, answered when not."""
        self.assertFalse(AgentSecret(self.path, required=True).allows("x"))
        self.assertTrue(AgentSecret(self.path, required=False).allows(None))

    def test_refusals_logged_rarely(self):
        """Refusals are counted; a flood of them is logged once a minute."""
        self.write("k")
        factory, proto, t = self.serve(AgentSecret(self.path))
        for _ in range(5):
            p = factory.buildProtocol(None)
            p.makeConnection(StringTransport())
            p.dataReceived(b"GET /vma/ping HTTP/1.1\r\n\r\n")
        self.assertEqual(factory.refusals, {"no or wrong VM secret": 5})

    def test_new_secret(self):
        """Secrets are 43 URL-safe characters, different every time."""
        a, b = new_secret(), new_secret()
        self.assertEqual((len(a), a == b), (43, False))
        self.assertFalse(secret_matches("", ""))
        self.assertFalse(secret_matches("a", None))


class LimitTests(unittest.TestCase):
    """The agent's connection limits (RPCLimits) on a clock."""

    def setUp(self):
        self.clock = task.Clock()
        self.factory = SimpleRPCServerFactory(
            {"ping": lambda p: "pong"}, clock=self.clock,
            limits=RPCLimits(per_source=3, total=5, request_timeout=5.0))

    def connect(self, host):
        proto = self.factory.buildProtocol(IPv4Address("TCP", host, 40000))
        if proto is None:
            return None, None
        transport = StringTransport()
        proto.makeConnection(transport)
        return proto, transport

    def test_per_source(self):
        """
        A fourth connection from one address is refused unread while another
        address still gets in; a closed connection frees its place.
        """
        opened = [self.connect("10.0.0.9") for _ in range(4)]
        self.assertEqual([p is not None for p, _ in opened], [True, True, True, False])
        other, t = self.connect("10.0.0.1")
        other.dataReceived(b"GET /vma/ping HTTP/1.1\r\n\r\n")
        self.assertTrue(t.value().endswith(b'"pong"\r\n'))
        opened[0][0].connectionLost(None)
        self.assertIsNotNone(self.connect("10.0.0.9")[0])
        self.assertEqual(self.factory.refusals, {"too many connections from its address": 1})

    def test_total(self):
        """Past C{total} open connections, every address is refused."""
        for i in range(5):
            self.assertIsNotNone(self.connect(f"10.0.1.{i}")[0])
        self.assertIsNone(self.connect("10.0.2.1")[0])
        self.assertEqual(self.factory.open_connections, 5)
        self.assertEqual(self.factory.refusals, {"too many connections": 1})

    def test_slow_request_cut(self):
        """
        A request trickled byte by byte is cut 5 s after its first byte; an
        idle connection (no request begun) is not, nor a request sent in time.
        """
        slow, t = self.connect("10.0.0.9")
        idle, ti = self.connect("10.0.0.9")
        quick, tq = self.connect("10.0.0.9")
        for i, byte in enumerate(b"GET /vma/ping HTT"):
            self.clock.advance(0.3)
            slow.dataReceived(bytes([byte]))
            if i == 3:
                quick.dataReceived(b"GET /vma/ping HTTP/1.1\r\n\r\n")
        self.assertFalse(t.disconnected)
        self.clock.advance(0.3)
        self.assertTrue(t.disconnecting or t.disconnected)
        self.assertEqual(self.factory.refusals, {"request not complete in time": 1})
        self.assertFalse(ti.disconnecting)
        self.assertTrue(tq.value().endswith(b'"pong"\r\n'))
        self.clock.advance(10)
        self.assertFalse(tq.disconnecting)

    def test_refusals_logged_once_a_minute(self):
        """A flood of refusals logs one line a minute per reason, with the count."""
        logged = []

        class Log:
            def warn(self, fmt, **kw):
                logged.append(kw["n"])
        self.patch(SimpleRPCServerProtocol, "log", Log())
        for _ in range(3):
            self.connect("10.0.0.9")
        for _ in range(100):
            self.connect("10.0.0.9")
        self.clock.advance(61)
        self.connect("10.0.0.9")
        self.assertEqual(logged, [1, 101])


class ResponseReaderTests(unittest.TestCase):
    """The client's reader of one reply, fed as the bytes come."""

    REPLY = b'HTTP/1.1 200 OK\r\nContent-Type: application/json-simplerpc\r\nContent-Length: 12\r\n\r\n"listening"\n'

    def test_in_pieces(self):
        """A reply is complete once the head and Content-Length bytes are in, not before."""
        reader = simplerpc.ResponseReader()
        for i in range(len(self.REPLY) - 1):
            self.assertIsNone(reader.feed(self.REPLY[i:i + 1]))
        self.assertEqual(reader.feed(self.REPLY[-1:]), (200, b'"listening"\n'))

    def test_secret_header(self):
        """build_request sends the agent's secret when given one."""
        self.assertEqual(build_request("10.0.0.2:3030", "ping", secret="s3"),
                         b"GET /vma/ping HTTP/1.1\r\nHost: 10.0.0.2:3030\r\n"
                         + SECRET_HEADER.encode() + b": s3\r\n\r\n")

    def test_no_length(self):
        """Without Content-Length the body is what came before the end of the stream."""
        reader = simplerpc.ResponseReader()
        self.assertIsNone(reader.feed(b"HTTP/1.0 200 OK\r\n\r\nnull\r\n"))
        self.assertEqual(reader.finish(), (200, b"null\r\n"))

    def test_not_http(self):
        """Bytes that are no HTTP reply fail at once, naming them."""
        e = self.assertRaises(SimpleRPCProtocolError, simplerpc.ResponseReader().feed,
                              b"SSH-2.0-OpenSSH\r\n")
        self.assertIn("SSH-2.0", str(e))
        e = self.assertRaises(SimpleRPCProtocolError, simplerpc.ResponseReader().feed,
                              b"HTTP/1.1 abc OK\r\n\r\n")
        self.assertIn("not an HTTP reply", str(e))

    def test_too_long(self):
        """A reply longer than the limit fails, head or body."""
        reader = simplerpc.ResponseReader(limit=100)
        self.assertRaises(SimpleRPCProtocolError, reader.feed, b"HTTP/1.1 200 OK\r\nX: " + b"a" * 100)
        reader = simplerpc.ResponseReader(limit=100)
        self.assertRaises(SimpleRPCProtocolError, reader.feed,
                          b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"1" * 80)

    def test_truncated(self):
        """A stream that ends in the head or before the body's length is an error."""
        reader = simplerpc.ResponseReader()
        reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n\"list")
        e = self.assertRaises(SimpleRPCProtocolError, reader.finish)
        self.assertIn("after 5 of 12 bytes", str(e))
        reader = simplerpc.ResponseReader()
        reader.feed(b"HTTP/1.1 200")
        self.assertRaises(SimpleRPCProtocolError, reader.finish)
        self.assertRaises(SimpleRPCProtocolError, simplerpc.ResponseReader().finish)

    def test_bad_headers(self):
        """A chunked reply, a bad Content-Length or a header without colon are refused."""
        for head in (b"Transfer-Encoding: chunked", b"Content-Length: x", b"junk"):
            self.assertRaises(SimpleRPCProtocolError, simplerpc.ResponseReader().feed,
                              b"HTTP/1.1 200 OK\r\n" + head + b"\r\n\r\n")
