"""
The QVD HTTP-lite parser and response builder (reference 1.1), byte-exact.
"""

from twisted.trial import unittest

from qvd.protocols import http


class ParserTests(unittest.TestCase):
    def parse(self, data, limits=None):
        parser = http.RequestParser(limits)
        parser.feed(data)
        return parser, parser.next_request()

    def test_crlf_request(self):
        """A request with CRLF line ends gives method, path, query pairs and headers."""
        _, req = self.parse(b"GET /qvd/connect_to_vm?id=1&qvd.client.os=linux&x HTTP/1.1\r\n"
                            b"Authorization: Basic YTpi\r\nConnection: Upgrade\r\n\r\n")
        self.assertEqual(req.method, "GET")
        self.assertEqual(req.path, "/qvd/connect_to_vm")
        self.assertEqual(req.query, (("id", "1"), ("qvd.client.os", "linux"), ("x", None)))
        self.assertEqual(req.header("authorization"), "Basic YTpi")
        self.assertEqual(req.headers_dict()["connection"], "Upgrade")

    def test_bare_lf_and_no_host(self):
        """Bare LF line ends (the C client) and no Host header are accepted."""
        _, req = self.parse(b"GET /qvd/ping HTTP/1.1\nUser-Agent: x\n\n")
        self.assertEqual((req.path, req.header("host")), ("/qvd/ping", None))

    def test_trailing_question_mark(self):
        """The Perl client's 'list_of_vm?' has an empty query."""
        _, req = self.parse(b"GET /qvd/list_of_vm? HTTP/1.1\r\n\r\n")
        self.assertEqual((req.path, req.query), ("/qvd/list_of_vm", ()))

    def test_query_unescaping(self):
        """'+' is a space and %XX is unescaped, as uri_query_split does."""
        _, req = self.parse(b"GET /a?k=pc105%2Fes&g=a+b HTTP/1.1\n\n")
        self.assertEqual(req.query, (("k", "pc105/es"), ("g", "a b")))

    def test_continuation(self):
        """A line starting with blanks continues the previous header."""
        _, req = self.parse(b"GET / HTTP/1.1\nX-A: one\n   two  \n\n")
        self.assertEqual(req.header("x-a"), "one two")

    def test_continuation_first(self):
        """A continuation line before any header is 400."""
        e = self.assertRaises(http.HTTPParseError, self.parse, b"GET / HTTP/1.1\n two\n\n")
        self.assertEqual(e.status, 400)

    def test_version(self):
        """A request line without HTTP/1.1 is 505."""
        for line in (b"GET / HTTP/1.0\n\n", b"GET /\n\n"):
            e = self.assertRaises(http.HTTPParseError, self.parse, line)
            self.assertEqual(e.status, 505)

    def test_malformed(self):
        """A request line or header line that does not parse is 400."""
        for data in (b"GET\n\n", b"\x00\x01 / HTTP/1.1\n\n", b"GET / HTTP/1.1\nno colon\n\n",
                     b"GET / HTTP/1.1\nbad header: x\n\n"):
            e = self.assertRaises(http.HTTPParseError, self.parse, data)
            self.assertEqual(e.status, 400, data)

    def test_blank_lines_skipped(self):
        """Blank lines before a request are skipped."""
        _, req = self.parse(b"\r\n  \n\nGET /x HTTP/1.1\n\n")
        self.assertEqual(req.path, "/x")

    def test_several_requests(self):
        """Requests are returned one at a time from one buffer."""
        parser, first = self.parse(b"GET /a HTTP/1.1\n\nGET /b HTTP/1.1\r\n\r\nGET /c")
        self.assertEqual(first.path, "/a")
        self.assertEqual(parser.next_request().path, "/b")
        self.assertIsNone(parser.next_request())
        parser.feed(b" HTTP/1.1\n\n")
        self.assertEqual(parser.next_request().path, "/c")

    def test_byte_by_byte(self):
        """A request fed one byte at a time is parsed once complete."""
        data = b"GET /qvd/ping HTTP/1.1\r\nA: b\r\n\r\n"
        parser = http.RequestParser()
        for i in range(len(data) - 1):
            parser.feed(data[i:i + 1])
            self.assertIsNone(parser.next_request())
        parser.feed(data[-1:])
        self.assertEqual(parser.next_request().header("a"), "b")

    def test_take_buffer(self):
        """Bytes after a request (an upgraded stream) are handed over untouched."""
        parser, req = self.parse(b"GET /x HTTP/1.1\n\nNXPROXY-3.5.0 \x00\xff")
        self.assertEqual(parser.take_buffer(), b"NXPROXY-3.5.0 \x00\xff")
        self.assertEqual(parser.buffered, 0)

    def test_limits(self):
        """Over-long request lines are 414; over-long headers, too many headers or
        too large requests are 400, even before the line ends."""
        limits = http.Limits(max_line=50, max_headers=3, max_request=200)
        cases = [(b"GET /" + b"a" * 60, 414), (b"GET / HTTP/1.1\nA: " + b"b" * 60, 400),
                 (b"GET / HTTP/1.1\n" + b"A: b\n" * 4, 400),
                 (b"\n" * 201, 400)]
        for data, status in cases:
            e = self.assertRaises(http.HTTPParseError, self.parse, data, limits)
            self.assertEqual(e.status, status, data)

    def test_error_sticks(self):
        """After an error the parser keeps raising it."""
        parser = http.RequestParser()
        parser.feed(b"BAD\n")
        self.assertRaises(http.HTTPParseError, parser.next_request)
        parser.feed(b"GET / HTTP/1.1\n\n")
        self.assertRaises(http.HTTPParseError, parser.next_request)


class ResponseTests(unittest.TestCase):
    def test_body(self):
        """A body carries Content-Type then Content-Length after other headers."""
        self.assertEqual(
            http.response_with_body(200, "text/plain", b"I am alive!\r\n"),
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\n"
            b"I am alive!\r\n")

    def test_error_description(self):
        """An error without message has the original's description as body."""
        self.assertEqual(
            http.error_response(426),
            b"HTTP/1.1 426 Upgrade Required\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 73\r\n\r\n"
            b"426 Upgrade Required (RFC 2817 )\n    The client should switch to TLS/1.0.")

    def test_error_message(self):
        """An error with a message has it as body, unchanged."""
        self.assertEqual(
            http.error_response(422, "parameter id is missing"),
            b"HTTP/1.1 422 Unprocessable Entity\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 23\r\n\r\nparameter id is missing")

    def test_unauthorized(self):
        """401 asks for Basic credentials in realm QVD before the body headers."""
        data = http.unauthorized()
        self.assertTrue(data.startswith(
            b'HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm="QVD"\r\n'
            b"Content-Type: text/plain\r\nContent-Length: 349\r\n\r\n401 Unauthorized\n"))
        self.assertEqual(len(data.split(b"\r\n\r\n", 1)[1]), 349)

    def test_processing(self):
        """A 102 carries X-QVD-VM-Info and no body."""
        self.assertEqual(http.processing("Starting virtual machine"),
                         b"HTTP/1.1 102 Processing\r\nX-QVD-VM-Info: Starting virtual machine\r\n\r\n")

    def test_switching(self):
        """The 101 carries a 64-char slave key; other keys are refused."""
        key = "aB3" * 21 + "x"
        self.assertEqual(http.switching_protocols(key),
                         b"HTTP/1.1 101 Switching Protocols\r\nX-QVD-Slave-Key: " + key.encode()
                         + b"\r\n\r\n")
        self.assertRaises(ValueError, http.switching_protocols, "short")

    def test_messages(self):
        """Reason phrases drop the original's remarks in parentheses."""
        self.assertEqual([http.status_message(c) for c in (505, 422, 503, 599)],
                         ["HTTP Version Not Supported", "Unprocessable Entity",
                          "Service Unavailable", "599 Unknown error"])
