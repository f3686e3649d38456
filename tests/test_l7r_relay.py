"""
The relay's wiring, socket-free: producers registered both ways, buffered
bytes forwarded, one end closing closes the other and ends the session once.
"""

from twisted.internet import task
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from qvd.l7r.relay import PeerProtocol, Relay


class FakeClient:
    def __init__(self):
        self.transport = StringTransport()


def wired():
    clock = task.Clock()
    client = FakeClient()
    peer = PeerProtocol()
    peer.makeConnection(StringTransport())
    ended = []
    relay = Relay(client, peer, ended.append, clock=clock.seconds)
    return clock, client, peer, relay, ended


class RelayTests(unittest.TestCase):
    def test_producers(self):
        """Each side's transport is the streaming producer of the other's."""
        clock, client, peer, relay, ended = wired()
        relay.start()
        self.assertIs(client.transport.producer, peer.transport)
        self.assertIs(peer.transport.producer, client.transport)
        self.assertTrue(client.transport.streaming and peer.transport.streaming)

    def test_buffered_bytes(self):
        """Bytes the client sent after its request and bytes nxagent sent before
        the relay started are delivered first, in order."""
        clock, client, peer, relay, ended = wired()
        peer.dataReceived(b"NXPROXY-3.5.0 ")
        relay.start(b"early")
        relay.from_client(b" more")
        peer.dataReceived(b"link=LAN")
        self.assertEqual(peer.transport.value(), b"early more")
        self.assertEqual(client.transport.value(), b"NXPROXY-3.5.0 link=LAN")

    def test_client_closes(self):
        """When the client leaves, nxagent's connection is closed and the session
        ends once, with its duration."""
        clock, client, peer, relay, ended = wired()
        relay.start()
        clock.advance(42)
        relay.client_lost(None)
        peer.connectionLost(None)
        self.assertTrue(peer.transport.disconnecting)
        self.assertEqual(ended, [relay])
        self.assertEqual(relay.duration, 42)

    def test_peer_closes(self):
        """When nxagent closes, the client's connection is closed."""
        clock, client, peer, relay, ended = wired()
        relay.start()
        peer.connectionLost(None)
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(ended, [relay])

    def test_stop(self):
        """Stopping a relay (takeover) closes both connections."""
        clock, client, peer, relay, ended = wired()
        relay.start()
        relay.stop("taken over")
        self.assertTrue(client.transport.disconnecting and peer.transport.disconnecting)
        self.assertEqual(relay.reason, "taken over")

    def test_peer_closed_before_start(self):
        """A relay whose nxagent connection closed before it started ends at once."""
        clock, client, peer, relay, ended = wired()
        peer.dataReceived(b"bye")
        peer.connectionLost(None)
        relay.start()
        self.assertEqual(client.transport.value(), b"bye")
        self.assertTrue(client.transport.disconnecting)
        self.assertEqual(ended, [relay])
