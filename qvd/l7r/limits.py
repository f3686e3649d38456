"""
Connection caps of the front door, outside TLS: a source address may hold at
most C{per_address} connections at once, all sources together C{total}.

    caps = ConnectionCaps(per_address=500, total=50000)
    factory = CappedFactory(TLSMemoryBIOFactory(..., L7RFactory(l7r)), caps, clock)
    endpoint.listen(factory)

A connection over a cap is closed at once, before any TLS work (its
C{buildProtocol} answers None); refusals are logged at most once per
C{log_interval} seconds, with how many were refused meanwhile.

Behind a load balancer the service wraps it in
L{qvd.l7r.proxyheader.ProxyHeaderFactory}: a balancer's connection is given
to C{buildProtocol} once its PROXY header is read, with the client's address.
"""

import collections

from twisted.protocols.policies import WrappingFactory

from qvd.logs import Logger

log = Logger()


class ConnectionCaps:
    """
    Counts open connections per source address, pure.
    """

    def __init__(self, per_address, total):
        self.per_address = per_address
        self.total = total
        self.open = 0
        self._by_address = collections.Counter()

    def admit(self, address):
        """
        Take a place for one connection from C{address}; False when a cap
        is reached (nothing is taken then).
        """
        if (self.total and self.open >= self.total) or (
                self.per_address and self._by_address[address] >= self.per_address):
            return False
        self.open += 1
        self._by_address[address] += 1
        return True

    def release(self, address):
        """Give back the place of one connection from C{address}."""
        self.open -= 1
        self._by_address[address] -= 1
        if self._by_address[address] <= 0:
            del self._by_address[address]

    def held(self, address):
        return self._by_address.get(address, 0)


class CappedFactory(WrappingFactory):
    """
    Wraps the listening factory: each connection takes a place in C{caps}
    for its whole life, or is refused.
    """

    noisy = False

    def __init__(self, wrapped, caps, clock, log_interval=10.0):
        super().__init__(wrapped)
        self.caps = caps
        self.clock = clock
        self.log_interval = log_interval
        self.refused = 0
        self._last_log = None
        self._unlogged = 0

    def buildProtocol(self, addr):
        host = getattr(addr, "host", "")
        if not self.caps.admit(host):
            self.refused += 1
            self._log_refusal(host)
            return None
        try:
            wrapper = super().buildProtocol(addr)
        except BaseException:
            self.caps.release(host)
            raise
        wrapper.qvd_source = host
        return wrapper

    def unregisterProtocol(self, p):
        super().unregisterProtocol(p)
        self.caps.release(p.qvd_source)

    def _log_refusal(self, host):
        now = self.clock.seconds()
        self._unlogged += 1
        if self._last_log is None or now - self._last_log >= self.log_interval:
            log.warn("refused {n} connection(s) over the caps (latest from {ip}: "
                     "{held} open from it, {open} in all; l7r.connections.per_address "
                     "{per}, l7r.connections.max {total})", n=self._unlogged, ip=host,
                     held=self.caps.held(host), open=self.caps.open,
                     per=self.caps.per_address, total=self.caps.total)
            self._last_log = now
            self._unlogged = 0
