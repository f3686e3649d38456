"""
qvd._listen: a daemon's TCP port checked before its reactor runs.
"""

import socket

from twisted.trial import unittest

from qvd._listen import check_port, tcp_address


class TCPAddressTests(unittest.TestCase):

    def test_descriptions(self):
        """tcp:, ssl: and tcp6: descriptions give (interface, port); others give None."""
        self.assertEqual(tcp_address("tcp:8443"), ("", 8443))
        self.assertEqual(tcp_address("ssl:443:interface=10.0.0.1"), ("10.0.0.1", 443))
        self.assertEqual(tcp_address("tcp:port=80:backlog=5"), ("", 80))
        self.assertEqual(tcp_address(r"tcp:8443:interface=\:\:1"), ("::1", 8443))
        self.assertEqual(tcp_address("tcp6:8443"), ("::", 8443))
        self.assertIsNone(tcp_address("unix:/run/qvd/l7r.sock"))
        self.assertIsNone(tcp_address("tcp:http"))


class CheckPortTests(unittest.TestCase):

    def hold(self):
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        return sock.getsockname()[1]

    def test_port_in_use(self):
        """A port another socket listens on is one line naming the address and the setting."""
        port = self.hold()
        problem = check_port(f"tcp:{port}:interface=127.0.0.1", "l7r.port")
        self.assertEqual(
            problem, f"cannot listen on 127.0.0.1:{port}: the port is already in use; stop "
                     "what listens there or choose another port (l7r.port)")

    def test_wildcard_against_held_port(self):
        """Listening on every address is refused when one address has the port."""
        port = self.hold()
        self.assertIn(f"*:{port}: the port is already in use", check_port(f"tcp:{port}"))

    def test_free_port(self):
        """A free port, port 0 and non-TCP endpoints pass; the check leaves no socket behind."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        self.assertIsNone(check_port(f"tcp:{port}:interface=127.0.0.1"))
        self.assertIsNone(check_port(f"tcp:{port}:interface=127.0.0.1"))
        self.assertIsNone(check_port("tcp:0"))
        self.assertIsNone(check_port("unix:/nonexistent/x.sock"))

    def test_foreign_address(self):
        """An address this machine does not have is named as such."""
        self.assertIn("not an address of this machine",
                      check_port("tcp:8443:interface=192.0.2.1"))
