"""
The byte relay after the 101: the client's (TLS) transport and a plain TCP
connection to the VM's nxagent port, joined with producer/consumer
back-pressure both ways.

    peer = await connect_peer(reactor, vm_address, vm_x_port, timeout)  # before the 101
    relay = Relay(client_protocol, peer, on_end, nx_cookie=cookie)
    relay.start(already_buffered_bytes)

Each side's transport is registered as the streaming producer of the other's,
so a slow reader pauses the other side's socket instead of growing a buffer.
Data moves in whole chunks (no per-byte work). When either side closes, the
other is closed and C{on_end(relay)} is called once. Nothing here touches the
database: a PostgreSQL outage does not affect running relays.

With C{nx_cookie}, the client's first bytes are its clear-text NX greeting:
they are held (at most L{qvd.protocols.nx.MAX_GREETING} bytes) until the
greeting is complete, which is passed on with the session's cookie in it
(L{qvd.protocols.nx.GreetingRewriter}); a stream that is no greeting closes
the relay. From then on C{from_client} is the VM side's C{write} itself: the
bytes after the greeting are not looked at or copied.
"""

import time

from twisted.internet import defer, protocol
from qvd.logs import Logger
from qvd._endpoints import client_endpoint
from qvd.protocols import nx

log = Logger()


def tcp_transport(transport):
    """
    The TCP transport under C{transport} (which may be TLS over TCP).
    """
    while transport is not None and not hasattr(transport, "setTcpNoDelay"):
        transport = getattr(transport, "transport", None)
    return transport


def tune(transport):
    """
    TCP_NODELAY and SO_KEEPALIVE on the socket under C{transport}.
    """
    tcp = tcp_transport(transport)
    if tcp is None:
        return
    try:
        tcp.setTcpNoDelay(True)
        tcp.setTcpKeepAlive(True)
    except (OSError, AttributeError):
        pass


class PeerProtocol(protocol.Protocol):
    """
    The VM side of a relay: hands bytes to the relay once it is started.
    """
    relay = None
    closed = False

    def __init__(self):
        self.lost = defer.Deferred()
        self._early = []

    def connectionMade(self):
        tune(self.transport)

    def dataReceived(self, data):
        if self.relay is not None:
            self.relay.client.transport.write(data)
        else:
            self._early.append(data)

    def connectionLost(self, reason):
        self.closed = True
        if self.relay is not None:
            self.relay.peer_lost(reason)
        self.lost.callback(None)


def connect_peer(reactor, host, port, timeout):
    """
    Connect to C{host}:C{port}; fire with a L{PeerProtocol}.
    """
    endpoint = client_endpoint(reactor, host, port, timeout)
    factory = protocol.Factory.forProtocol(PeerProtocol)
    factory.noisy = False       # no two log lines for every session
    return endpoint.connect(factory)


class Relay:
    """
    One running relay.

    @ivar client: the client's protocol (its C{transport} is the TLS one);
        it must pass the bytes it receives to L{from_client}.
    @ivar peer: the L{PeerProtocol} of the VM side.
    @ivar started: monotonic time the relay started.
    @ivar reason: why the relay was cut (L{stop}), else C{None}.
    @ivar from_client: call it with the bytes the client sends (until the
        greeting is rewritten a method, then the VM side's C{write}).
    """

    def __init__(self, client, peer, on_end, clock=time.monotonic, nx_cookie=None):
        self.client = client
        self.peer = peer
        self.on_end = on_end
        self.clock = clock
        self.started = None
        self.ended = False
        self.reason = None
        self._greeting = None if nx_cookie is None else nx.GreetingRewriter(nx_cookie)
        self.from_client = self._from_client

    def start(self, buffered=b""):
        self.started = self.clock()
        self.peer.relay = self
        tune(self.client.transport)
        self.client.transport.registerProducer(self.peer.transport, True)
        self.peer.transport.registerProducer(self.client.transport, True)
        early, self.peer._early = self.peer._early, []
        for data in early:
            self.client.transport.write(data)
        if self._greeting is None:
            self.from_client = self.peer.transport.write
        if buffered:
            self.from_client(buffered)
        if self.peer.closed:
            # nxagent closed between the connect and the 101.
            self.peer_lost(None)

    def _from_client(self, data):
        """
        The client's bytes while its NX greeting is incomplete (or before
        L{start}): rewritten, then the VM side's C{write} takes over.
        """
        if self._greeting is None:
            self.peer.transport.write(data)
            return
        try:
            out = self._greeting.feed(data)
        except nx.GreetingError as e:
            self.stop(str(e))           # on_end logs the reason
            self.from_client = _drop
            return
        if out is not None:
            self._greeting = None
            self.from_client = self.peer.transport.write
            self.peer.transport.write(out)

    def stop(self, reason):
        """
        Cut the relay (both connections), e.g. when the session is taken over.
        """
        self.reason = reason
        self.client.transport.loseConnection()
        self.peer.transport.loseConnection()

    def client_lost(self, reason):
        self.peer.transport.loseConnection()
        self._end()

    def peer_lost(self, reason):
        self.client.transport.loseConnection()
        self._end()

    def _end(self):
        if not self.ended:
            self.ended = True
            self.on_end(self)

    @property
    def duration(self):
        return 0.0 if self.started is None else self.clock() - self.started


def _drop(data):
    """What a cut relay does with what the client still sends."""
