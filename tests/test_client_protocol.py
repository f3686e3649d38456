"""
Tests for qvd.client.protocol and qvd.client.errors (pure code, no I/O).
"""

import base64

from twisted.trial import unittest

from qvd.client import errors
from qvd.client.protocol import (
    BasicAuth, BearerAuth, ConnectParameters, Headers, Interim, ParameterError,
    ProtocolError, Response, ResponseParser, Upgraded, connect_to_vm_request,
    list_of_vm_request, parse_vm_list, uri_escape)


class RequestTests(unittest.TestCase):

    def test_list_of_vm_exact_bytes(self):
        """
        list_of_vm is sent exactly as the Perl client sends it: trailing '?',
        Basic auth, Accept, User-Agent, no Host header, CRLF lines.
        """
        request = list_of_vm_request(BasicAuth("alice@acme", "s3cret"))
        token = base64.b64encode(b"alice@acme:s3cret").decode()
        self.assertEqual(
            request,
            b"GET /qvd/list_of_vm? HTTP/1.1\r\n"
            b"Authorization: Basic " + token.encode() + b"\r\n"
            b"Accept: application/json\r\n"
            b"User-Agent: QVD::HTTPC/0.01 (linux)\r\n"
            b"\r\n")

    def test_list_of_vm_file_name(self):
        """
        A file name is sent as the query of list_of_vm, URI-escaped.
        """
        request = list_of_vm_request(BasicAuth("a", "b"), file_name="my doc.odt")
        self.assertTrue(request.startswith(b"GET /qvd/list_of_vm?file_name=my%20doc.odt HTTP/1.1\r\n"))

    def test_bearer(self):
        """
        A token is sent as Bearer, exactly as given.
        """
        request = list_of_vm_request(BearerAuth("dG9rZW4=\n"))
        self.assertIn(b"\r\nAuthorization: Bearer dG9rZW4=\r\n", request)

    def test_connect_to_vm(self):
        """
        connect_to_vm asks for the QVD/1.0 upgrade and carries id and every
        qvd.client.* parameter of the reference, URI-escaped.
        """
        request = connect_to_vm_request(
            BasicAuth("a", "b"), 7, ConnectParameters(keyboard="pc105/es", link="lan"))
        lines = request.split(b"\r\n")
        self.assertEqual(
            lines[0],
            b"GET /qvd/connect_to_vm?id=7&qvd.client.keyboard=pc105%2Fes&qvd.client.os=linux"
            b"&qvd.client.link=lan&qvd.client.geometry=1024x768&qvd.client.fullscreen="
            b"&qvd.client.nxagent.extra_args=&qvd.client.printing.enabled=0"
            b"&qvd.client.usb.enabled=0&qvd.client.usb.implementation=USBIP"
            b"&qvd.client.audio.compression.enable=0&qvd.client.audio.redirect.enable=0"
            b"&qvd.client.audio.redirect.server=&qvd.client.audio.redirect.port= HTTP/1.1")
        self.assertEqual(lines[2:], [b"Connection: Upgrade", b"Upgrade: QVD/1.0",
                                     b"User-Agent: QVD::HTTPC/0.01 (linux)", b"", b""])
        self.assertNotIn(b"Host:", request)

    def test_fullscreen_flag(self):
        """
        Full screen is sent as qvd.client.fullscreen=1.
        """
        query = dict(ConnectParameters(fullscreen=True).query(1))
        self.assertEqual(query["qvd.client.fullscreen"], "1")

    def test_bad_parameters(self):
        """
        A link, geometry or keyboard the VMA would refuse is rejected early,
        naming the value.
        """
        self.assertRaisesRegex(ParameterError, "'fast'", ConnectParameters, link="fast")
        self.assertRaisesRegex(ParameterError, "'big'", ConnectParameters, geometry="big")
        self.assertRaisesRegex(ParameterError, "'us,es'", ConnectParameters, keyboard="us,es")

    def test_uri_escape_like_perl(self):
        """
        uri_escape leaves A-Za-z0-9-._~ and escapes everything else, UTF-8 first.
        """
        self.assertEqual(uri_escape("a-b_c.d~e/f g@ñ"), "a-b_c.d~e%2Ff%20g%40%C3%B1")


class ParserTests(unittest.TestCase):

    def test_final_response_with_body(self):
        """
        A 200 with Content-Length yields one Response with that body.
        """
        parser = ResponseParser()
        events = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 2\r\n\r\n[]")
        self.assertEqual(events, [Response(200, "OK", Headers((
            ("Content-Type", "application/json"), ("Content-Length", "2"))), b"[]")])
        self.assertEqual(parser.state, "head")

    def test_byte_by_byte(self):
        """
        The same response fed one byte at a time gives the same result.
        """
        data = b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\n\r\ngone!"
        parser = ResponseParser()
        events = []
        for i in range(len(data)):
            events += parser.feed(data[i:i + 1])
        self.assertEqual([(e.code, e.body) for e in events], [(404, b"gone!")])

    def test_interleaved_102(self):
        """
        102 Processing lines give Interim events carrying X-QVD-VM-Info, in
        order, before the 101.
        """
        parser = ResponseParser()
        events = parser.feed(
            b"HTTP/1.1 102 Processing\r\nX-QVD-VM-Info: Starting virtual machine\r\n\r\n"
            b"HTTP/1.1 102 Processing\r\nX-QVD-VM-Info: Waiting for VM")
        self.assertEqual([e.info for e in events], ["Starting virtual machine"])
        events = parser.feed(b" to reach state 'running'\r\n\r\nHTTP/1.1 101 Switching Protocols\r\n"
                             b"X-QVD-Slave-Key: abc\r\n\r\n")
        self.assertIsInstance(events[0], Interim)
        self.assertEqual(events[0].info, "Waiting for VM to reach state 'running'")
        self.assertIsInstance(events[1], Upgraded)
        self.assertEqual(events[1].slave_key, "abc")
        self.assertEqual(events[1].rest, b"")

    def test_101_followed_by_binary_in_same_read(self):
        """
        Bytes after the 101 head in the same read are NX data: returned in
        Upgraded.rest untouched (even CRLFs and NULs), and the parser takes
        no more data.
        """
        nx = b"NXPROXY-3.5.0\r\n\r\n\x00\xff\x10HTTP/1.1 200 OK\r\n\r\n"
        parser = ResponseParser()
        events = parser.feed(b"HTTP/1.1 102 Processing\r\nX-QVD-VM-Info: Connection established\r\n\r\n"
                             b"HTTP/1.1 101 Switching Protocols\r\nX-QVD-Slave-Key: k\r\n\r\n" + nx)
        self.assertEqual(len(events), 2)
        self.assertEqual(events[1].rest, nx)
        self.assertEqual(parser.state, "upgraded")
        self.assertRaises(ProtocolError, parser.feed, b"more")

    def test_bare_newlines_and_continuations(self):
        """
        Lines ending in a bare LF and header continuation lines are accepted.
        """
        parser = ResponseParser()
        events = parser.feed(b"HTTP/1.1 503 Service Unavailable\nX-Note: one\n  two\n"
                             b"Content-Length: 4\n\nbusy")
        self.assertEqual(events[0].headers.get("x-note"), "one two")
        self.assertEqual(events[0].body, b"busy")

    def test_body_until_close(self):
        """
        A response without Content-Length ends when the server closes.
        """
        parser = ResponseParser()
        self.assertEqual(parser.feed(b"HTTP/1.1 500 Oops\r\n\r\nbroken"), [])
        response = parser.connection_lost()
        self.assertEqual((response.code, response.body), (500, b"broken"))

    def test_cut_response(self):
        """
        A response cut by the server closing is a ProtocolError.
        """
        parser = ResponseParser()
        parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        self.assertRaises(ProtocolError, parser.connection_lost)

    def test_garbage(self):
        """
        Something that is not an HTTP/1.1 status line is a ProtocolError
        showing the bytes.
        """
        self.assertRaisesRegex(ProtocolError, "SSH-2.0", ResponseParser().feed,
                               b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        self.assertRaisesRegex(ProtocolError, "HTTP/1.0", ResponseParser().feed,
                               b"HTTP/1.0 200 OK\r\n\r\n")

    def test_head_too_long(self):
        """
        A head that never ends is refused once it passes the limit.
        """
        parser = ResponseParser(max_head=100)
        self.assertRaises(ProtocolError, parser.feed, b"HTTP/1.1 200 OK\r\nX: " + b"a" * 200)


class VMListTests(unittest.TestCase):

    def test_parse(self):
        """
        The list_of_vm JSON becomes VM values.
        """
        vms = parse_vm_list(b'[ { "id": 1, "state": "stopped", "name": "desk1", '
                            b'"blocked": 0, "is_application": 0 } ]')
        self.assertEqual([(v.id, v.name, v.state, v.blocked) for v in vms],
                         [(1, "desk1", "stopped", False)])

    def test_bad(self):
        """
        Non-JSON, a non-list or an entry without numeric id is a ProtocolError.
        """
        for body in (b"<html>", b"{}", b'[{"id": "1"}]'):
            self.assertRaises(ProtocolError, parse_vm_list, body)


class ErrorMessageTests(unittest.TestCase):

    def response(self, code, body=b""):
        return Response(code, "Reason", Headers(), body)

    def test_connect_statuses(self):
        """
        Each connect_to_vm status maps to the original client's message and
        its own exit code; 503 shows the server's body.
        """
        cases = {
            404: ("does not exist any more", errors.EXIT_VM_GONE),
            426: ("more up-to-date client", errors.EXIT_UPGRADE),
            401: ("Login error", errors.EXIT_LOGIN),
            403: ("under maintenance", errors.EXIT_MAINTENANCE),
            503: ("not available: vm broken, retry later.", errors.EXIT_UNAVAILABLE),
            418: ("replied 418 Reason", errors.EXIT_ERROR),
        }
        for code, (text, exit_code) in cases.items():
            e = errors.error_for_response(
                "connect", self.response(code, b"The requested virtual machine is not "
                                               b"available: vm broken, retry later.\r\n"), "h")
            self.assertIn(text, e.message)
            self.assertEqual(e.exit_code, exit_code)

    def test_list_statuses(self):
        """
        list_of_vm: 401 is a login error, 503 maintenance with the server's words.
        """
        e = errors.error_for_response("list", self.response(401), "h")
        self.assertEqual(e.exit_code, errors.EXIT_LOGIN)
        e = errors.error_for_response("list", self.response(503, b"Server is blocked"), "h")
        self.assertIn("Server is blocked", e.message)
        self.assertEqual(e.exit_code, errors.EXIT_UNAVAILABLE)

    def test_rejected_token(self):
        """
        A 401 to a request with --token says the token was rejected, and
        nothing about a user or password.
        """
        for phase in ("list", "connect"):
            e = errors.error_for_response(phase, self.response(401), "h", token=True)
            self.assertEqual(e.exit_code, errors.EXIT_LOGIN)
            self.assertIn("rejected your token", e.message)
            self.assertNotIn("password are", e.message)
            self.assertNotIn("user and password", e.message)
            self.assertNotIn("username", e.message)
