"""
The L7R as a Twisted service: database, LISTEN, TLS, listening endpoint.

    svc = L7RService(config, "ssl:8443", reactor=reactor, authenticator=auth)
    svc.startService()            # or: await svc.start()
    svc.port                      # the listening port (getHost() for port 0)

An endpoint string C{ssl:PORT[:interface=ADDR]} listens on TCP and speaks TLS
with qvd's own context (L{qvd.l7r.tls}); any other Twisted server endpoint
(C{tcp:...}, C{unix:...}) is used as it is, without TLS. The certificate is
re-read when its files change (checked every C{l7r.ssl.reload_interval}) or
on NOTIFY C{qvd_config_changed} (ssl_configs changed); new connections use the
new one, live sessions are kept. A bad new certificate is logged and the old
one kept.

Connections from the load balancers of C{l7r.proxy_protocol.from} start
with a PROXY header (L{qvd.l7r.proxyheader}, outside the connection caps
and TLS): the client address it names is the connection's peer for the
caps and the whole L7R.

The configuration is the node's under the database's layers
(L{qvd.config.live}), read before anything else and followed while running:
a change of a C{live} key (docs/config.md) applies to the next request or
connection within a second of its NOTIFY; the authentication chain reads it,
per tenant, on every login.

If it cannot start (it cannot listen, the certificate is bad) it logs why
once, in one line, stops the reactor and calls C{on_failed} (C{twistd
qvd-l7r} makes the process exit 1).
"""

from twisted.application import service
from twisted.internet import defer, endpoints, error as net_error, task
from qvd.logs import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from qvd.config.live import LiveConfig
from qvd.db import roles
from qvd.db.listen import Listener
from qvd.db.pool import Database, DatabaseUnavailable
from qvd.l7r import tls
from qvd.l7r.auth.hashpool import HashPool
from qvd.l7r.auth.interfaces import IAuthenticator
from qvd.l7r.broker import BrokerSettings
from qvd.l7r.limits import CappedFactory, ConnectionCaps
from qvd.l7r.proxyheader import BalancerConfigError, Balancers, ProxyHeaderFactory
from qvd.l7r.server import L7R, L7RFactory, ServerSettings

log = Logger()


def split_endpoint(description):
    """
    (use TLS?, the endpoint description to listen on) for C{description}.
    """
    kind, _, rest = description.partition(":")
    if kind != "ssl":
        return False, description
    parts = [p for p in rest.split(":") if p and not p.split("=", 1)[0] in (
        "privateKey", "certKey", "extraCertChain", "sslmethod", "dhParameters")]
    return True, "tcp:" + ":".join(parts)


def default_endpoint(config):
    address = config.get("l7r.address")
    kind = "ssl" if config.getbool("l7r.use_ssl") else "tcp"
    description = f"{kind}:{config.getint('l7r.port')}"
    if address and address != "*":
        description += f":interface={address}"
    return description


class L7RService(service.Service):
    def __init__(self, config, listen, reactor=None, dsn=None, authenticator=None,
                 vma_factory=None, pid=None, on_failed=None, adopt=None, workers=1,
                 on_ready=None):
        """
        @param authenticator: an L{IAuthenticator}, or a callable taking the
            L{Database} and returning one; None: the configured plugin chain.
        @param on_failed: called with no arguments when the service could not
            start (after the reason is logged).
        @param adopt: (file descriptor, address family) of a listening socket
            to accept on instead of listening on C{listen} (whose kind still
            says whether to speak TLS): a worker of L{qvd.l7r.workers}.
        @param workers: the L7R processes of this node sharing the port; the
            cap on all connections (C{l7r.connections.max}) is shared out.
        @param on_ready: called with no arguments once it accepts connections.
        """
        if reactor is None:
            from twisted.internet import reactor
        self.config = config
        self.listen = listen
        self.reactor = reactor
        self.dsn = dsn
        self.authenticator = authenticator
        self.hash_pool = None
        self.vma_factory = vma_factory
        self.pid = pid
        self.on_failed = on_failed
        self.adopt = adopt
        self.workers = workers
        self.on_ready = on_ready
        self.port = None
        self.proxy_headers = None
        self.context_factory = None
        self._stamps = None
        self._reload_loop = None
        self._material = None
        self._stopping = False

    def startService(self):
        service.Service.startService(self)
        d = defer.ensureDeferred(self.start())
        d.addErrback(self._failed)
        return d

    def _failed(self, failure):
        if failure.check(defer.CancelledError) and self._stopping:
            return      # stopped while it waited for the database
        if failure.check(tls.TLSConfigError, roles.SuperuserRefused, BalancerConfigError):
            log.critical("the L7R cannot start: {error}", error=failure.getErrorMessage())
        elif failure.check(net_error.CannotListenError):
            e = failure.value
            where = e.port.decode() if isinstance(e.port, bytes) else str(e.port)
            if not isinstance(e.port, (str, bytes)):
                where = f"{e.interface or '*'}:{where}"
            log.critical("the L7R cannot listen on {address}: {error}",
                         address=where, error=e.socketError)
        else:
            log.failure("the L7R cannot start", failure)
        if self.on_failed is not None:
            self.on_failed()
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    async def start(self):
        config = self.config
        if self.dsn is None:
            from qvd.db.settings import database_dsn
            self.dsn = database_dsn(config, "l7r")
        self.db = Database(self.dsn, self.reactor, size=config.getint("database.pool.size"),
                           retries=config.getint("database.retry.max"))
        self.listener = Listener(self.dsn, self.reactor,
                                 keepalive=config.getfloat("database.listen.keepalive"))
        use_tls, description = split_endpoint(self.listen)
        await self._wait_for_database()
        rows = await self.db.runQuery(roles.WHO_AM_I)
        roles.check_not_superuser(rows[0], "the L7R (database.user.l7r)")
        self.live = LiveConfig(config, self.db, self.listener)
        await self.live.start()
        self.config = config = self.live.current
        if use_tls:
            # Checked before listening: a bad key or certificate is one clear error.
            material = await tls.load_material(config, self.db)
            self.context_factory = tls.SwappableContextFactory(self._context(material))
            self._material = material
            self._stamps = tls.file_stamps(config)
        await self.listener.start()
        if self.authenticator is None:
            self.hash_pool = HashPool(self.reactor, config.getint("l7r.auth.hash.workers"),
                                      config.getint("l7r.auth.hash.queue"))
            self.hash_pool.start()
            self.authenticator = make_authenticator(self.live, self.db, self.reactor,
                                                    self.hash_pool)
        elif not IAuthenticator.providedBy(self.authenticator):
            self.authenticator = self.authenticator(self.db)
        self.l7r = L7R(self.reactor, self.db, self.listener, self.authenticator,
                       config.get("nodename"), ServerSettings.from_config(config),
                       BrokerSettings.from_config(config), self.vma_factory, pid=self.pid)
        self.l7r.broker.configure(config)
        await self.l7r.start()
        self.live.subscribe(self._configure)
        factory = L7RFactory(self.l7r)
        if use_tls:
            factory = TLSMemoryBIOFactory(self.context_factory, False, factory)
            self._reload_loop = task.LoopingCall(self._check_files)
            self._reload_loop.clock = self.reactor
            self._reload_loop.start(config.getfloat("l7r.ssl.reload_interval"), now=False)
        self.caps = ConnectionCaps(config.getint("l7r.connections.per_address"),
                                   self._share(config.getint("l7r.connections.max")))
        factory = CappedFactory(factory, self.caps, self.reactor)
        # Outside the caps: a balancer's connection is capped by the client
        # address its PROXY header names.
        factory = self.proxy_headers = ProxyHeaderFactory(
            factory, Balancers.from_config(config), self.reactor,
            config.getfloat("l7r.proxy_protocol.timeout"))
        if self.adopt is not None:
            fd, family = self.adopt
            self.port = self.reactor.adoptStreamPort(fd, family, factory)
        else:
            endpoint = endpoints.serverFromString(self.reactor, description)
            self.port = await endpoint.listen(factory)
        # A worker's supervisor says "L7R listening" once all its workers accept.
        log.info("L7R {what} on {address} ({tls})", address=self.port.getHost(),
                 what="listening" if self.adopt is None else "worker accepting",
                 tls=("TLS" if use_tls else "no TLS") + (
                     f", PROXY protocol from {', '.join(map(str, headers.networks))}"
                     if (headers := self.proxy_headers.balancers) else ""))
        if self.on_ready is not None:
            self.on_ready()

    def _share(self, cap):
        """This process's part of a cap of the whole node (0: no cap)."""
        return cap if cap <= 0 else max(1, -(-cap // self.workers))

    async def _wait_for_database(self):
        """
        Wait until PostgreSQL answers (it may start after the L7R).
        """
        delay = 0.5
        while True:
            if self._stopping:
                raise defer.CancelledError("the L7R was stopped while waiting for the database")
            try:
                await self.db.start()
                return
            except DatabaseUnavailable as e:
                log.warn("the L7R waits for the database ({error}); retrying in {delay}s",
                         error=e, delay=delay)
                await task.deferLater(self.reactor, delay, lambda: None)
                delay = min(delay * 2, 10)

    def _configure(self, config):
        """A new configuration from the database: apply its live keys."""
        self.config = config
        l7r = getattr(self, "l7r", None)
        if l7r is not None:
            l7r.settings = ServerSettings.from_config(config)
            l7r.broker.configure(config)
        caps = getattr(self, "caps", None)
        if caps is not None:
            caps.per_address = config.getint("l7r.connections.per_address")
            caps.total = self._share(config.getint("l7r.connections.max"))
        headers = self.proxy_headers
        if headers is not None:
            try:
                headers.balancers = Balancers.from_config(config)
            except BalancerConfigError as e:
                log.error("the new l7r.proxy_protocol.from is not used (the old one "
                          "stays): {error}", error=e)
            headers.timeout = config.getfloat("l7r.proxy_protocol.timeout")
        log.info("configuration reloaded from the database")
        if self.context_factory is not None:
            self.reload_tls()

    def _context(self, material):
        return tls.make_context(material, self.config.get("l7r.ssl.ciphers"),
                                self.config.getbool("l7r.client.cert.require"))

    def _check_files(self):
        stamps = tls.file_stamps(self.config)
        if stamps != self._stamps:
            self._stamps = stamps
            return self.reload_tls()

    def reload_tls(self):
        """
        Re-read the certificate; new connections use it, live ones are kept.
        """
        async def reload():
            material = await tls.load_material(self.config, self.db)
            if material == self._material:
                return False
            self.context_factory.swap(self._context(material))
            self._material = material
            log.info("L7R certificate reloaded from {source}", source=material.source)
            return True
        d = defer.ensureDeferred(reload())

        def failed(f):
            log.error("the new L7R certificate is not used (the old one stays): {error}",
                      error=f.getErrorMessage())
            return False
        return d.addErrback(failed)

    def stopService(self):
        service.Service.stopService(self)
        return defer.ensureDeferred(self.stop())

    async def stop(self):
        self._stopping = True
        if self._reload_loop is not None and self._reload_loop.running:
            self._reload_loop.stop()
        port, self.port = self.port, None
        if port is not None:
            await defer.maybeDeferred(port.stopListening)
        if self.hash_pool is not None:
            self.hash_pool.stop()
        if getattr(self, "live", None) is not None:
            self.live.unsubscribe(self._configure)
            await self.live.stop()
        l7r, self.l7r = getattr(self, "l7r", None), None
        if l7r is not None:
            await l7r.stop()
        if getattr(self, "listener", None) is not None:
            await self.listener.stop()
        if getattr(self, "db", None) is not None:
            await self.db.stop()


def make_authenticator(config, db, reactor, blocking=None):
    """
    The authenticator of the configured plugin chain (L{qvd.l7r.auth});
    C{blocking} runs its password checks (a L{HashPool}).
    """
    from qvd.l7r.auth import make_authenticator as make
    return make(config, db, reactor, blocking)
