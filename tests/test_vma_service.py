"""
The VMA service and its twistd plugin options, in-process on a real port 0.
"""
import socket

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.internet.task import deferLater
from twisted.python import usage
from twisted.trial import unittest

from qvd.config import Config, declared_keys
from qvd.vma import tap
from qvd.vmaclient import VMAClient, VMAError
from qvd.vma.service import make_service


class ServiceTests(unittest.TestCase):

    def config(self, **extra):
        tmp = self.mktemp()
        node = {"vma.port": "0", "vma.address": "127.0.0.1", "vma.run.path": f"{tmp}/run",
                "vma.log.path": f"{tmp}/log", "vma.provisioning.enable": "0"}
        node.update(extra)
        return Config(keys=declared_keys(), node=node)

    @defer.inlineCallbacks
    def test_serves_simplerpc(self):
        """The service answers SimpleRPC on its port and stops cleanly."""
        svc = make_service(self.config(), reactor)
        svc.startService()
        self.addCleanup(lambda: svc.running and svc.stopService())
        client = VMAClient(reactor, "127.0.0.1", svc.rpc.port.getHost().port)
        self.assertIsNone((yield client.ping()))
        self.assertEqual((yield client.x_state()), "stopped")
        self.assertEqual((yield client.x_stop()), "stopped")
        e = yield self.assertFailure(
            client.x_start({"qvd.client.geometry": "1x1;rm -rf /"}), VMAError)
        self.assertIn("qvd.client.geometry", e.message)
        yield svc.stopService()

    @defer.inlineCallbacks
    def test_raw_wire(self):
        """On the wire: pipelined calls answered in order, then HTTP/1.0 gets 505 and a close."""
        svc = make_service(self.config(), reactor)
        svc.startService()
        self.addCleanup(lambda: svc.running and svc.stopService())

        class Collect(protocol.Protocol):
            def __init__(self):
                self.data = b""
                self.done = defer.Deferred()

            def connectionMade(self):
                self.transport.write(b"GET /vma/ping HTTP/1.1\r\nHost: x\r\n\r\n"
                                     b"GET /vma/x_state?a=1 HTTP/1.1\r\n\r\n"
                                     b"GET /vma/ping HTTP/1.0\r\n\r\n")

            def dataReceived(self, data):
                self.data += data

            def connectionLost(self, reason):
                self.done.callback(self.data)
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1",
                                                svc.rpc.port.getHost().port)
        proto = yield endpoints.connectProtocol(endpoint, Collect())
        data = yield proto.done
        self.assertEqual(
            data,
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json-simplerpc\r\n"
            b"Content-Length: 6\r\n\r\nnull\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json-simplerpc\r\n"
            b"Content-Length: 11\r\n\r\n\"stopped\"\r\n"
            b"HTTP/1.1 505 HTTP Version Not Supported\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 113\r\n\r\n505 HTTP Version Not Supported\n"
            b"    The server does not support the HTTP protocol version used in the\n"
            b"    request.")
        yield svc.stopService()

    @defer.inlineCallbacks
    def test_serves_early_socket(self):
        """
        Given the socket the entry point bound before importing Twisted, the
        service serves it: a ping that connected before the service started
        is answered once it runs.
        """
        from qvd.vma.__main__ import listen_early
        cfg = self.config()
        sock = listen_early(cfg)
        self.assertIsNotNone(sock)
        port = sock.getsockname()[1]
        early = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.addCleanup(early.close)
        early.sendall(b"GET /vma/ping HTTP/1.1\r\nHost: x\r\n\r\n")
        svc = make_service(cfg, reactor, listening=sock)
        svc.startService()
        self.addCleanup(lambda: svc.running and svc.stopService())
        self.assertEqual(svc.rpc.port.getHost().port, port)
        self.assertEqual(sock.fileno(), -1)         # taken over and closed
        early.setblocking(False)
        answer = b""
        for _ in range(100):
            try:
                answer += early.recv(4096)
            except BlockingIOError:
                pass
            if answer.endswith(b"null\r\n"):
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer)
        client = VMAClient(reactor, "127.0.0.1", port)
        self.assertEqual((yield client.x_state()), "stopped")
        yield svc.stopService()

    def test_early_socket_not_bindable(self):
        """
        An address that cannot be bound at that moment gives no early socket
        (the service then listens as usual, and fails there with the reason).
        """
        from qvd.vma.__main__ import listen_early
        self.assertIsNone(listen_early(self.config(**{"vma.address": "192.0.2.1"})))

    def test_socket_from_systemd(self):
        """
        Under socket activation (LISTEN_PID, LISTEN_FDS=1, fd 3) the entry point
        takes systemd's socket when it listens on vma.port, and removes the
        variables; a socket on another port is left alone.
        """
        import os
        import subprocess
        import sys
        import qvd
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(5)
        port = listener.getsockname()[1]
        probe = (
            "import os, sys\n"
            "from qvd.config import Config, declared_keys\n"
            "from qvd.vma.__main__ import socket_from_systemd\n"
            "cfg = Config(keys=declared_keys(), node={'vma.port': sys.argv[1]})\n"
            "sock = socket_from_systemd(cfg)\n"
            "print(sock and sock.getsockname()[1], sock and sock.getblocking(),\n"
            "      sorted(k for k in os.environ if k.startswith('LISTEN_')))\n")
        tree = os.path.dirname(os.path.dirname(os.path.abspath(qvd.__file__)))
        # as systemd starts a service: the socket on fd 3, LISTEN_PID its pid
        activate = ("import os, sys\n"
                    "os.dup2(int(sys.argv[1]), 3)\n"
                    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1')\n"
                    "os.execv(sys.executable, [sys.executable, '-c'] + sys.argv[2:])\n")
        fd = listener.fileno()
        for wanted, expected in ((port, f"{port} False []"), (port + 1, "None None []")):
            out = subprocess.run(
                [sys.executable, "-c", activate, str(fd), probe, str(wanted)],
                env=dict(os.environ, PYTHONPATH=tree), pass_fds=(fd,),
                capture_output=True, text=True, timeout=60, cwd="/")
            self.assertEqual(out.stdout.strip(), expected, out.stderr[-1000:])

    def test_tap_bad_config(self):
        """twistd qvd-vma with a missing or wrong config is a usage error naming it."""
        options = tap.Options()
        e = self.assertRaises(usage.UsageError, options.parseOptions,
                              ["--config", "/nonexistent/vma.conf"])
        self.assertIn("/nonexistent/vma.conf", str(e))
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("vma.on_action.bogus = /bin/true\n")
        self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["--config", path])

    def test_tap_service(self):
        """twistd qvd-vma builds the agent and the SimpleRPC listener."""
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("vma.port = 0\n")
        options = tap.Options()
        options.parseOptions(["--config", path])
        svc = tap.makeService(options)
        self.assertEqual(len(list(svc)), 2)
