"""
A SimpleRPC client for the VMA, for the HKD and the L7R (outside qvd.vma: a
desktop image carries the agent, not its callers).

    client = VMAClient(reactor, "10.3.15.2", port=3030, timeout=4.0)
    d = client.x_state()          # fires with "stopped", "listening", ...
    d = client.x_start({"qvd.vm.user.name": "alice", "qvd.client.os": "linux"})
    d.addErrback(lambda f: f.trap(VMAError))      # the agent said no: f.value.message
    d.addErrback(lambda f: f.trap(VMAUnreachable)) # no answer, or not a VMA

Each call is one plain HTTP/1.1 C{GET} on a fresh connection (Twisted's
C{Agent}, connecting to a VM's address without a resolver:
L{qvd._endpoints}); C{timeout} bounds the connection and the whole call.
"""

from twisted.internet import defer
from twisted.internet.error import TimeoutError as _TxTimeoutError
from twisted.web import client as _webclient
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from qvd._endpoints import LiteralEndpointFactory
from qvd.protocols.simplerpc import (
    SECRET_HEADER, SimpleRPCError, SimpleRPCProtocolError, build_request_path,
    parse_response_body)

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
        self._agent = Agent.usingEndpointFactory(
            reactor, LiteralEndpointFactory(reactor, timeout), pool=_quiet_pool(reactor))

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
            path = build_request_path(fn, params)
        except ValueError as e:
            return defer.fail(VMAError(str(e), fn))
        url = f"http://{address}{path}".encode("ascii")
        headers = Headers({b"User-Agent": [b"qvd-vma-client"]})
        if self.secret:
            headers.setRawHeaders(SECRET_HEADER.encode(), [self.secret.encode()])
        d = self._agent.request(b"GET", url, headers)

        def got_response(response):
            if response.code != 200:
                response.deliverBody(_Discard())
                raise VMAUnreachable(
                    f"VMA at {address} answered {fn} with HTTP {response.code} "
                    f"{response.phrase.decode('latin-1', 'replace')} (is it a VMA?)")
            return readBody(response)

        def got_body(body):
            try:
                return parse_response_body(body)
            except SimpleRPCError as e:
                raise VMAError(e.message, fn)
            except SimpleRPCProtocolError as e:
                raise VMAUnreachable(f"VMA at {address}: {e}")

        timed_out = []

        def on_timeout(result, timeout):
            timed_out.append(timeout)
            return result

        def failed(failure):
            if failure.check(VMAError, VMAUnreachable):
                return failure
            if timed_out or failure.check(defer.CancelledError, _TxTimeoutError):
                reason = f"no answer within {self.timeout:g} s"
            else:
                reason = _describe(failure.value)
            raise VMAUnreachable(f"VMA at {address} unreachable calling {fn}: {reason}")

        d.addCallback(got_response)
        d.addCallback(got_body)
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
    reasons = getattr(exc, "reasons", None)   # ResponseFailed / ResponseNeverReceived
    if reasons:
        return "; ".join(_describe(r.value) for r in reasons)
    text = str(exc) or type(exc).__name__
    return text


class _Discard:
    def makeConnection(self, transport):
        transport.stopProducing()

    def dataReceived(self, data):
        pass

    def connectionLost(self, reason):
        pass


class _QuietFactory(_webclient._HTTP11ClientFactory):
    # One connection per call: the default factory logs two lines for each
    # (a node pings every agent every few seconds).
    noisy = False


def _quiet_pool(reactor):
    pool = HTTPConnectionPool(reactor, persistent=False)
    pool._factory = _QuietFactory
    return pool
