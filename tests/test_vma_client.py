"""
VMAClient against real local servers on port 0.
"""

import socket

from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from qvd.vmaclient import VMAClient, VMAError, VMAUnreachable
from qvd.vma.rpcserver import RPCError, SimpleRPCServerFactory


class VMAClientTests(unittest.TestCase):

    def serve(self, factory):
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return VMAClient(reactor, "127.0.0.1", port.getHost().port, timeout=2.0)

    def rpc(self, **functions):
        self.calls = []

        def recorder(name, fn):
            def call(params):
                self.calls.append((name, params))
                return fn(params)
            return call
        return self.serve(SimpleRPCServerFactory(
            {name: recorder(name, fn) for name, fn in functions.items()}))

    @defer.inlineCallbacks
    def test_result(self):
        """A call fires with the agent's result and sends the params."""
        client = self.rpc(x_start=lambda p: "starting")
        result = yield client.x_start({"qvd.vm.user.name": "al ice", "qvd.client.os": "linux"})
        self.assertEqual(result, "starting")
        self.assertEqual(self.calls, [("x_start", {"qvd.vm.user.name": "al ice",
                                                   "qvd.client.os": "linux"})])

    @defer.inlineCallbacks
    def test_helpers(self):
        """ping, x_state, x_suspend, x_stop, poweroff and expire call their functions."""
        client = self.rpc(**{fn: (lambda p, fn=fn: fn) for fn in
                             ["ping", "x_state", "x_suspend", "x_stop", "poweroff", "expire"]})
        self.assertEqual((yield client.ping()), "ping")
        self.assertEqual((yield client.x_state()), "x_state")
        self.assertEqual((yield client.x_suspend()), "x_suspend")
        self.assertEqual((yield client.x_stop()), "x_stop")
        self.assertEqual((yield client.poweroff()), "poweroff")
        self.assertEqual((yield client.expire("hard")), "expire")
        self.assertEqual(self.calls[-1], ("expire", {"vm.expiration.hard": "1"}))
        yield client.expire(soft="2026-11-26 10:00:00", hard="2026-11-27 10:00:00")
        self.assertEqual(self.calls[-1], ("expire", {"vm.expiration.soft": "2026-11-26 10:00:00",
                                                     "vm.expiration.hard": "2026-11-27 10:00:00"}))

    @defer.inlineCallbacks
    def test_error(self):
        """An error reply fails with VMAError carrying the message."""
        def refuse(params):
            raise RPCError("Can't connect to X session in state connected, retry later")
        client = self.rpc(x_start=refuse)
        e = yield self.assertFailure(client.x_start({}), VMAError)
        self.assertEqual(e.message, "Can't connect to X session in state connected, retry later")

    @defer.inlineCallbacks
    def test_unknown_function(self):
        """A 404 (function the agent does not have) is VMAUnreachable naming the code."""
        client = self.rpc()
        e = yield self.assertFailure(client.call("vnc_connect"), VMAUnreachable)
        self.assertIn("404", str(e))

    @defer.inlineCallbacks
    def test_refused(self):
        """A closed port fails with VMAUnreachable naming the address."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        e = yield self.assertFailure(VMAClient(reactor, "127.0.0.1", port).ping(), VMAUnreachable)
        self.assertIn(f"127.0.0.1:{port}", str(e))

    @defer.inlineCallbacks
    def test_timeout(self):
        """A server that accepts but never answers fails with VMAUnreachable after timeout."""
        client = self.serve(protocol.Factory.forProtocol(protocol.Protocol))
        client.timeout = 0.3
        e = yield self.assertFailure(client.ping(), VMAUnreachable)
        self.assertIn("no answer within 0.3 s", str(e))

    @defer.inlineCallbacks
    def test_garbage(self):
        """A server that does not speak SimpleRPC fails with VMAUnreachable."""
        class Garbage(protocol.Protocol):
            def dataReceived(self, data):
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n<html>")
                self.transport.loseConnection()
        client = self.serve(protocol.Factory.forProtocol(Garbage))
        e = yield self.assertFailure(client.x_state(), VMAUnreachable)
        self.assertIn("not JSON", str(e))

    @defer.inlineCallbacks
    def test_closes_after_reply(self):
        """
        The client closes the connection once the reply is in (the agent
        keeps connections open for more requests), and sends the secret.
        """
        lost = defer.Deferred()
        seen = []

        class KeepAlive(protocol.Protocol):
            def dataReceived(self, data):
                seen.append(data)
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nnull\r\n")

            def connectionLost(self, reason):
                lost.callback(None)
        client = self.serve(protocol.Factory.forProtocol(KeepAlive))
        client.secret = "s3cret"
        self.assertIsNone((yield client.ping()))
        yield lost
        self.assertIn(b"X-QVD-VMA-Secret: s3cret\r\n", b"".join(seen))

    @defer.inlineCallbacks
    def test_closed_without_reply(self):
        """A server that closes without a byte fails with VMAUnreachable saying so."""
        class Closer(protocol.Protocol):
            def connectionMade(self):
                self.transport.loseConnection()
        client = self.serve(protocol.Factory.forProtocol(Closer))
        e = yield self.assertFailure(client.ping(), VMAUnreachable)
        self.assertIn("unreachable calling ping", str(e))

    @defer.inlineCallbacks
    def test_not_http(self):
        """A server that answers non-HTTP bytes fails with VMAUnreachable."""
        class Junk(protocol.Protocol):
            def dataReceived(self, data):
                self.transport.write(b"SSH-2.0-OpenSSH\r\n")
                self.transport.loseConnection()
        client = self.serve(protocol.Factory.forProtocol(Junk))
        yield self.assertFailure(client.ping(), VMAUnreachable)
