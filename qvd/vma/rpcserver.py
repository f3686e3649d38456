"""
The SimpleRPC server: adapts L{qvd.protocols.simplerpc} to Twisted.

    functions = {"ping": lambda params: None, "x_state": agent.x_state, ...}
    factory = SimpleRPCServerFactory(functions, clock=reactor)
    reactor.listenTCP(3030, factory)

Each function takes the call's params (a dict of text) and returns a
JSON-able value or a Deferred of one; an exception (or failed Deferred)
becomes a SimpleRPC error reply with its message, never a crash. Requests on
one connection are answered in order; a connection idle for C{idle_timeout}
seconds is closed. With a L{qvd.vma.secret.AgentSecret}, a call without the
VM's secret is answered C{403} and the connection closed (logged at most
once a minute, with the count).
"""

from twisted.internet import defer
from twisted.internet.protocol import Factory, Protocol
from qvd.logs import Logger
from twisted.protocols.policies import TimeoutMixin

from qvd.protocols.simplerpc import (
    SECRET_HEADER, Call, Malformed, RequestParser, error_response, http_error,
    result_response, route)


class RPCError(Exception):
    """
    Raise this from a function to answer with exactly C{message} (an expected
    refusal, logged at info level; other exceptions are logged as failures).
    """

    def __init__(self, message):
        super().__init__(message)
        self.message = message


class SimpleRPCServerProtocol(Protocol, TimeoutMixin):
    log = Logger()

    def __init__(self, functions, base="/vma", idle_timeout=60.0, clock=None, secret=None):
        self._functions = functions
        self._secret = secret
        self._base = base
        self._idle_timeout = idle_timeout
        self._parser = RequestParser()
        self._pending = []
        self._busy = False
        self._closing = False
        if clock is not None:
            self.callLater = clock.callLater

    def connectionMade(self):
        self.setTimeout(self._idle_timeout)

    def dataReceived(self, data):
        self.resetTimeout()
        self._pending.extend(self._parser.feed(data))
        self._next()

    def timeoutConnection(self):
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.setTimeout(None)
        self._pending = []
        self._closing = True

    def _next(self):
        while self._pending and not self._busy and not self._closing:
            event = self._pending.pop(0)
            if isinstance(event, Malformed):
                self.log.info("SimpleRPC: malformed request from {peer}: {reason}",
                              peer=self.transport.getPeer(), reason=event.reason)
                self._send(event.response, close=True)
                return
            if self._secret is not None and not self._secret.allows(
                    event.header(SECRET_HEADER)):
                self.factory.refused(self.transport.getPeer())
                self._send(http_error(403), close=True)
                return
            routed = route(event, self._functions, self._base)
            close = (event.header("Connection") or "").lower() == "close"
            if not isinstance(routed, Call):
                self._send(routed, close)
                continue
            self._busy = True
            self.setTimeout(None)           # a slow call is not an idle connection
            d = defer.maybeDeferred(self._functions[routed.function], routed.params)
            d.addCallbacks(self._succeeded, self._failed, errbackArgs=(routed,))
            d.addCallback(self._answer, close)
            d.addErrback(lambda f: self.log.failure("SimpleRPC: cannot answer", f))

    def _succeeded(self, value):
        try:
            return result_response(value)
        except (TypeError, ValueError) as e:
            self.log.error("SimpleRPC: result {value!r} is not JSON: {e}", value=value, e=e)
            return error_response(f"internal error: result is not JSON ({e})")

    def _failed(self, failure, call):
        if failure.check(RPCError):
            self.log.info("SimpleRPC {fn}: {message}", fn=call.function,
                          message=failure.value.message)
            return error_response(failure.value.message)
        self.log.failure("SimpleRPC {fn}({params}) failed", failure,
                         fn=call.function, params=call.params)
        return error_response(f"{call.function} failed: {failure.getErrorMessage()}")

    def _answer(self, response, close):
        self._busy = False
        if self._closing:
            return
        self.setTimeout(self._idle_timeout)
        self._send(response, close)
        self._next()

    def _send(self, response, close):
        self.transport.write(response.to_bytes())
        if close:
            self._closing = True
            self.transport.loseConnection()


class SimpleRPCServerFactory(Factory):
    """
    Builds L{SimpleRPCServerProtocol}s serving C{functions} under C{base}.
    """

    def __init__(self, functions, base="/vma", idle_timeout=60.0, clock=None, secret=None):
        self.functions = functions
        self.base = base
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.secret = secret
        self.refusals = 0
        self._logged_at = None

    def buildProtocol(self, addr):
        p = SimpleRPCServerProtocol(self.functions, self.base, self.idle_timeout, self.clock,
                                    self.secret)
        p.factory = self
        return p

    def refused(self, peer):
        """Count a call refused for its secret; log at most once a minute."""
        self.refusals += 1
        now = self.clock.seconds() if self.clock is not None else None
        if now is None or self._logged_at is None or now - self._logged_at >= 60:
            self._logged_at = now
            SimpleRPCServerProtocol.log.warn(
                "SimpleRPC: call from {peer} refused: no or wrong VM secret "
                "({n} refused so far)", peer=peer, n=self.refusals)


__all__ = ["RPCError", "SimpleRPCServerFactory", "SimpleRPCServerProtocol", "http_error"]
