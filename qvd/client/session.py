"""
One TLS connection to the L7R: a few requests, then (after a 101) the NX stream.

    protocol = L7RProtocol(clock=reactor)
    await connectProtocol(tls_endpoint, protocol)
    response = await protocol.request(list_of_vm_request(auth))
    outcome = await protocol.request(connect_request, on_interim=show)
    # outcome is an Upgraded: protocol.attach(sink) then relays the stream

The protocol only adapts bytes to L{qvd.client.protocol.ResponseParser} and
back. Its states:

    idle     -- request() -->  waiting
    waiting  -- final response --> idle          (Deferred fires with Response)
    waiting  -- 101 --> upgraded                 (Deferred fires with Upgraded;
                                                  reading paused, later bytes kept)
    waiting  -- no byte for `response_timeout` s --> closed (ResponseTimeout)
    upgraded -- attach(sink) --> relaying        (the bytes after the 101, then every
                                                  byte received, go to sink)
    any      -- connection lost --> closed       (pending Deferred fails)

The response timeout restarts at every interim response, so a long VM start
that keeps sending C{102 Processing} lines never times out.
"""

from twisted.internet import defer
from twisted.internet.interfaces import IHandshakeListener, INegotiated
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from qvd.client.protocol import ProtocolError, Response, Upgraded


class ResponseTimeout(Exception):
    """
    The server sent nothing for too long while a response was expected.
    """


class ConnectionClosed(Exception):
    """
    The server closed the connection while a response was expected.

    @ivar reason: the L{Failure} given to C{connectionLost}.
    """

    def __init__(self, reason):
        Exception.__init__(self, f"connection closed: {reason.getErrorMessage()}")
        self.reason = reason


@implementer(IHandshakeListener)
class L7RProtocol(Protocol):
    """
    Client end of one L7R connection; see the module docstring.

    @ivar ready: fires with this protocol once the TLS handshake is done
        (or immediately for a plain transport), fails if the connection is
        lost first.
    @ivar closed: fires with C{None} when the connection ends; the reason
        is then in C{lost_reason}.
    """

    def __init__(self, clock, response_timeout=60.0, parser_factory=None):
        from qvd.client.protocol import ResponseParser
        self.clock = clock
        self.response_timeout = response_timeout
        self.state = "connecting"
        self._parser = (parser_factory or ResponseParser)()
        self._pending = None
        self._on_interim = None
        self._timer = None
        self._kept = []
        self._sink = None
        self.lost_reason = None
        self.ready = defer.Deferred()
        self.closed = defer.Deferred()

    # --- Twisted side -------------------------------------------------------

    def connectionMade(self):
        # Over TLS, wait for the handshake (handshakeCompleted).
        if not INegotiated.providedBy(self.transport):
            self._ready()

    def handshakeCompleted(self):
        self._ready()

    def _ready(self):
        if self.state == "connecting":
            self.state = "idle"
            self.ready.callback(self)

    def dataReceived(self, data):
        if self.state == "relaying":
            self._sink.dataReceived(data)
            return
        if self.state == "upgraded":
            self._kept.append(data)
            return
        if self.state != "waiting":
            # Unsolicited bytes: the server is not speaking our protocol.
            self._fail(ProtocolError(f"unexpected data from the server: {data[:80]!r}"))
            return
        try:
            events = self._parser.feed(data)
        except ProtocolError as e:
            self._fail(e)
            return
        for event in events:
            if isinstance(event, Response):
                self._finish(event)
            elif isinstance(event, Upgraded):
                self.state = "upgraded"
                self.transport.pauseProducing()
                if event.rest:
                    self._kept.append(event.rest)
                self._finish(event, state="upgraded")
            else:
                self._restart_timer()
                if self._on_interim is not None:
                    self._on_interim(event)

    def connectionLost(self, reason=None):
        previous = self.state
        self.state = "closed"
        self._cancel_timer()
        if previous == "connecting":
            self.ready.errback(reason)
        elif self._pending is not None:
            try:
                final = self._parser.connection_lost()
            except ProtocolError as e:
                final = None
                error = Failure(e)
            else:
                error = Failure(ConnectionClosed(reason))
            pending, self._pending = self._pending, None
            if final is not None:
                pending.callback(final)
            else:
                pending.errback(error)
        if self._sink is not None:
            self._sink.connectionLost(reason)
        self.lost_reason = reason
        self.closed.callback(None)

    # --- API ----------------------------------------------------------------

    def request(self, data, on_interim=None):
        """
        Send one request; the Deferred fires with the L{Response} or the
        L{Upgraded}, or fails with L{ResponseTimeout}, L{ConnectionClosed}
        or L{ProtocolError}. C{on_interim} is called with each L{Interim}.
        """
        if self.state != "idle":
            raise RuntimeError(f"request() while {self.state}")
        self.state = "waiting"
        self._pending = defer.Deferred()
        self._on_interim = on_interim
        self._restart_timer()
        self.transport.write(data)
        return self._pending

    def attach(self, sink):
        """
        After the 101: deliver the bytes kept so far, then every byte received,
        to C{sink.dataReceived}; C{sink.connectionLost} when the connection
        ends. Resumes reading.
        """
        if self.state != "upgraded":
            raise RuntimeError(f"attach() while {self.state}")
        self.state = "relaying"
        self._sink = sink
        kept, self._kept = b"".join(self._kept), []
        if kept:
            sink.dataReceived(kept)
        self.transport.resumeProducing()

    def write(self, data):
        self.transport.write(data)

    def close(self):
        if self.transport is not None and self.state != "closed":
            self.transport.loseConnection()

    # --- internals ----------------------------------------------------------

    def _finish(self, event, state="idle"):
        self._cancel_timer()
        self.state = state
        pending, self._pending = self._pending, None
        self._on_interim = None
        if pending is not None:
            pending.callback(event)

    def _fail(self, error):
        self._cancel_timer()
        pending, self._pending = self._pending, None
        self.state = "failing"
        if pending is not None:
            pending.errback(Failure(error))
        self.transport.abortConnection()

    def _restart_timer(self):
        self._cancel_timer()
        self._timer = self.clock.callLater(self.response_timeout, self._timed_out)

    def _cancel_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self):
        self._timer = None
        self._fail(ResponseTimeout(
            f"the server sent nothing for {self.response_timeout:g} s"))
