"""
A SimpleRPC client for the VMA, for the HKD and the L7R (outside qvd.vma: a
desktop image carries the agent, not its callers).

    client = VMAClient(reactor, "10.3.15.2", port=3030, timeout=4.0)
    d = client.x_state()          # fires with "stopped", "listening", ...
    d = client.x_start({"qvd.vm.user.name": "alice", "qvd.client.os": "linux"})
    d.addErrback(lambda f: f.trap(VMAError))      # the agent said no: f.value.message
    d.addErrback(lambda f: f.trap(VMAUnreachable)) # no answer, or not a VMA

Each call is one plain HTTP/1.1 C{GET} on a fresh connection (to a VM's
address without a resolver: L{qvd._endpoints}), read with the sans-IO
L{qvd.protocols.simplerpc.ResponseReader} and closed once the reply is in:
no HTTP client machinery for a reply of a few bytes. C{timeout} bounds the
connection and the whole call.
"""

from twisted.internet import defer, protocol
from twisted.internet.error import TimeoutError as _TxTimeoutError

from qvd._endpoints import client_endpoint
from qvd.protocols.simplerpc import (
    ResponseReader, SimpleRPCError, SimpleRPCProtocolError, build_request, parse_response_body)

DEFAULT_PORT = 3030


class VMAError(Exception):
    """
    The VMA answered the call with an error.

    @ivar message: the VMA's error text.
    @ivar function: the function called.
    """

    def __init__(self, message, function=None):
        super().__init__(message)
        self.message = message
        self.function = function


class VMAUnreachable(Exception):
    """
    No SimpleRPC answer: connection refused or timed out, or the peer did not
    speak SimpleRPC (the message says which, with the address).
    """


class VMAClient:
    """
    Calls the VMA at C{host}:C{port}.

    @param reactor: the reactor (an C{IReactorTCP} + C{IReactorTime}).
    @param timeout: seconds for connecting and for the whole call.
    @param secret: the VM's agent secret, sent with every call (C{""}: none).
    """

    def __init__(self, reactor, host, port=DEFAULT_PORT, timeout=4.0, secret=""):
        self._reactor = reactor
        self.secret = secret
        self.host = host
        self.port = int(port)
        self.timeout = timeout

    def _address(self):
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def call(self, fn, /, **params):
        """
        Call C{fn} with C{params} (keys may contain dots: pass C{**dict}).

        @return: a Deferred firing with the result, or failing with
            L{VMAError} or L{VMAUnreachable}.
        """
        address = self._address()
        try:
            request = build_request(address, fn, params, secret=self.secret)
        except ValueError as e:
            return defer.fail(VMAError(str(e), fn))
        factory = protocol.Factory.forProtocol(lambda: _Call(request))
        factory.noisy = False
        calls = []

        def connected(call):
            calls.append(call)
            return call.done
        d = client_endpoint(self._reactor, self.host, self.port, self.timeout).connect(factory)
        d.addCallback(connected)

        def got_reply(reply):
            status, body = reply
            if status != 200:
                raise VMAUnreachable(
                    f"VMA at {address} answered {fn} with HTTP {status} (is it a VMA?)")
            try:
                return parse_response_body(body)
            except SimpleRPCError as e:
                raise VMAError(e.message, fn)
            except SimpleRPCProtocolError as e:
                raise VMAUnreachable(f"VMA at {address}: {e}")

        timed_out = []

        def on_timeout(result, timeout):
            timed_out.append(timeout)
            for call in calls:
                call.transport.abortConnection()
            return result

        def failed(failure):
            if failure.check(VMAError, VMAUnreachable):
                return failure
            if timed_out or failure.check(defer.CancelledError, _TxTimeoutError):
                reason = f"no answer within {self.timeout:g} s"
            elif failure.check(SimpleRPCProtocolError):
                raise VMAUnreachable(f"VMA at {address} calling {fn}: {failure.value} "
                                     "(is it a VMA?)")
            else:
                reason = _describe(failure.value)
            raise VMAUnreachable(f"VMA at {address} unreachable calling {fn}: {reason}")

        d.addCallback(got_reply)
        d.addTimeout(self.timeout, self._reactor, onTimeoutCancel=on_timeout)
        d.addErrback(failed)
        return d

    def ping(self):
        """Fires with C{None} when the VMA is alive."""
        return self.call("ping")

    def x_state(self):
        """Fires with the X-session state (C{stopped}, C{listening}, ...)."""
        return self.call("x_state")

    def x_start(self, params):
        """Start or resume the X session with C{params} (reference 2.4)."""
        return self.call("x_start", **dict(params))

    def x_suspend(self):
        return self.call("x_suspend")

    def x_stop(self):
        return self.call("x_stop")

    def poweroff(self):
        return self.call("poweroff")

    def expire(self, kind=None, soft=None, hard=None):
        """
        Tell the VMA its DI expires (runs its C{vma.on_action.expire} hook).

        As the original HKD, C{soft}/C{hard} are the expiration times (sent
        as C{vm.expiration.soft}/C{vm.expiration.hard}, each only if given).
        C{kind} (C{"soft"} or C{"hard"}) alone sends that key with C{1}.
        """
        params = {}
        if kind is not None and soft is None and hard is None:
            if kind not in ("soft", "hard"):
                raise ValueError(f"expire kind must be 'soft' or 'hard', not {kind!r}")
            params[f"vm.expiration.{kind}"] = "1"
        if soft is not None:
            params["vm.expiration.soft"] = str(soft)
        if hard is not None:
            params["vm.expiration.hard"] = str(hard)
        return self.call("expire", **params)


def _describe(exc):
    return str(exc) or type(exc).__name__


class _Call(protocol.Protocol):
    """
    One call's connection: sends the request, reads the reply, closes.

    @ivar done: fires with (status, body), or fails with
        L{SimpleRPCProtocolError} or the reason the connection was lost.
    """

    def __init__(self, request):
        self.request = request
        self.reader = ResponseReader()
        self.done = defer.Deferred()

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        if self.done.called:
            return
        try:
            reply = self.reader.feed(data)
        except SimpleRPCProtocolError as e:
            self.done.errback(e)
            self.transport.abortConnection()
            return
        if reply is not None:
            self.done.callback(reply)
            self.transport.loseConnection()

    def connectionLost(self, reason):
        if self.done.called:
            return
        try:
            reply = self.reader.finish()
        except SimpleRPCProtocolError as e:
            # nothing came back: say why the connection ended
            self.done.errback(e if self.reader.started else reason)
            return
        self.done.callback(reply)
