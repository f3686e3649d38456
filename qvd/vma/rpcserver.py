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

Floods cost the flooder, not the node (L{RPCLimits}): at most C{per_source}
open connections from one address and C{total} in all (one more is closed
before a byte is read); a request must arrive whole within
C{request_timeout} seconds of its first byte; refusals are logged at most
once a minute, with their count.
"""

import attr
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


@attr.s(frozen=True, auto_attribs=True)
class RPCLimits:
    """
    What one peer, and all of them, may hold of the agent.

    @ivar per_source: open connections from one address.
    @ivar total: open connections in all.
    @ivar request_timeout: seconds from a request's first byte to its end.
    """

    per_source: int = 32
    total: int = 256
    request_timeout: float = 5.0

    @classmethod
    def from_config(cls, cfg):
        return cls(per_source=cfg.getint("vma.rpc.connections.per_source"),
                   total=cfg.getint("vma.rpc.connections.max"),
                   request_timeout=cfg.getfloat("vma.rpc.request_timeout"))


class SimpleRPCServerProtocol(Protocol, TimeoutMixin):
    log = Logger()

    def __init__(self, functions, base="/vma", idle_timeout=60.0, clock=None, secret=None,
                 request_timeout=None):
        self._functions = functions
        self._secret = secret
        self._base = base
        self._idle_timeout = idle_timeout
        self._request_timeout = request_timeout
        self._request_deadline = None
        self._parser = RequestParser()
        self._pending = []
        self._busy = False
        self._closing = False
        self._clock = clock
        if clock is not None:
            self.callLater = clock.callLater

    def connectionMade(self):
        self.setTimeout(self._idle_timeout)

    def dataReceived(self, data):
        self.resetTimeout()
        self._pending.extend(self._parser.feed(data))
        self._watch_request()
        self._next()

    def _watch_request(self):
        """Start the request deadline at a request's first byte, stop it at its end."""
        if self._request_timeout is None:
            return
        if self._parser.partial and not self._closing:
            if self._request_deadline is None:
                self._request_deadline = self.callLater(self._request_timeout, self._too_slow)
        elif self._request_deadline is not None:
            self._request_deadline.cancel()
            self._request_deadline = None

    def _too_slow(self):
        self._request_deadline = None
        self.factory.refused("request not complete in time", self.transport.getPeer())
        self._closing = True
        self.transport.abortConnection()

    def timeoutConnection(self):
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.setTimeout(None)
        if self._request_deadline is not None:
            self._request_deadline.cancel()
            self._request_deadline = None
        self._pending = []
        self._closing = True
        self.factory.lost(self)

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
                self.factory.refused("no or wrong VM secret", self.transport.getPeer())
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
                         fn=call.function, params=_loggable(call.params))
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
    Builds L{SimpleRPCServerProtocol}s serving C{functions} under C{base},
    within C{limits} (an L{RPCLimits}; C{None}: no limits).

    @ivar refusals: how many connections and calls were refused, by reason.
    """

    def __init__(self, functions, base="/vma", idle_timeout=60.0, clock=None, secret=None,
                 limits=None):
        self.functions = functions
        self.base = base
        self.idle_timeout = idle_timeout
        self.clock = clock
        self.secret = secret
        self.limits = limits
        self.refusals = {}
        self._open = {}             # source address -> open connections
        self._logged_at = {}

    @property
    def open_connections(self):
        return sum(self._open.values())

    def buildProtocol(self, addr):
        source = getattr(addr, "host", None)
        if self.limits is not None:
            if self.open_connections >= self.limits.total:
                self.refused("too many connections", addr)
                return None         # Twisted closes the socket unread
            if self._open.get(source, 0) >= self.limits.per_source:
                self.refused("too many connections from its address", addr)
                return None
        self._open[source] = self._open.get(source, 0) + 1
        p = SimpleRPCServerProtocol(
            self.functions, self.base, self.idle_timeout, self.clock, self.secret,
            request_timeout=self.limits.request_timeout if self.limits is not None else None)
        p.factory = self
        p.source = source
        return p

    def lost(self, protocol):
        left = self._open.get(protocol.source, 0) - 1
        if left > 0:
            self._open[protocol.source] = left
        else:
            self._open.pop(protocol.source, None)

    def refused(self, reason, peer):
        """Count a refusal; log each reason at most once a minute, with its count."""
        self.refusals[reason] = n = self.refusals.get(reason, 0) + 1
        now = self.clock.seconds() if self.clock is not None else None
        last = self._logged_at.get(reason)
        if now is None or last is None or now - last >= 60:
            self._logged_at[reason] = now
            SimpleRPCServerProtocol.log.warn(
                "SimpleRPC: {peer} refused: {reason} ({n} so far)",
                peer=peer, reason=reason, n=n)


__all__ = ["RPCError", "RPCLimits", "SimpleRPCServerFactory", "SimpleRPCServerProtocol",
           "http_error"]


#: x_start parameters whose values are secrets: never logged.
SECRET_PARAMS = frozenset(("qvd.nx.cookie", "qvd.slave.key", "auth_token"))


def _loggable(params):
    """C{params} with the values of L{SECRET_PARAMS} masked."""
    return {k: ("***" if k in SECRET_PARAMS else v) for k, v in params.items()}
