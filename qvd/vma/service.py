"""
The VMA as a Twisted service, for both entry points.

    svc = make_service(Config.load("/etc/qvd/vma.conf"), reactor)
    svc.startService()      # SimpleRPC on vma.address:vma.port; old session cleaned

C{twistd qvd-vma} (L{qvd.vma.tap}) and C{python3 -m qvd.vma} (L{qvd.vma.__main__})
both build it here.
"""

from twisted.application import service
from qvd.logs import Logger

from qvd.vma.agent import VMA, VMASettings
from qvd.vma.rpcserver import RPCLimits, SimpleRPCServerFactory
from qvd.vma.secret import AgentSecret
from qvd.vma.system import LocalHost, ProcessRunner

log = Logger()


class ListeningService(service.Service):
    """
    Listens on C{port}/C{interface} while running (like
    C{twisted.application.internet.TCPServer}, which pulls in Automat: the
    VMA must import only the stdlib, Twisted, attrs and zope.interface).

    @param listening: a socket already bound and listening there
        (L{qvd.vma.__main__.listen_early}), served instead of a new one; the
        service takes it over (and closes it).
    """

    def __init__(self, reactor, port, factory, interface="", listening=None):
        self._reactor = reactor
        self._port_number = port
        self._factory = factory
        self._interface = interface
        self._listening = listening
        self.port = None

    def startService(self):
        super().startService()
        if self._listening is not None:
            sock, self._listening = self._listening, None
            try:
                self.port = self._reactor.adoptStreamPort(sock.fileno(), sock.family,
                                                          self._factory)
            finally:
                sock.close()        # the reactor serves a duplicate of it
            return
        self.port = self._reactor.listenTCP(self._port_number, self._factory,
                                            interface=self._interface)

    def stopService(self):
        super().stopService()
        if self.port is not None:
            port, self.port = self.port, None
            return port.stopListening()


class VMAService(service.Service):
    """Starts the agent (cleaning leftovers) and ends the session when stopped."""

    def __init__(self, vma):
        self.vma = vma

    def startService(self):
        super().startService()
        self.vma.startup()

    def stopService(self):
        super().stopService()
        return self.vma.shutdown()


def _fit_descriptors(needed):
    """Raise the soft descriptor limit to C{needed} if the hard one allows."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            log.warn("descriptor limit {hard} is below the {needed} the SimpleRPC limits need",
                     hard=hard, needed=needed)


def make_service(cfg, reactor, listening=None):
    """
    The VMA service of configuration C{cfg} (a L{qvd.config.Config}).

    @param listening: a socket already listening on C{vma.address}:C{vma.port}
        to serve (see L{ListeningService}), or None.
    """
    import os

    from qvd import logs
    logs.set_level(cfg.get("log.level"))
    settings = VMASettings.from_config(cfg)
    hooks_log = os.path.join(settings.log_path, "qvd-hooks.log")
    try:
        os.makedirs(settings.log_path, exist_ok=True)
    except OSError:
        hooks_log = None
    runner = ProcessRunner(reactor, log_path=hooks_log)
    vma = VMA(reactor, settings, runner, LocalHost())
    secret = AgentSecret(cfg.get("vma.secret.file"), cfg.getbool("vma.secret.required"))
    if secret.current() is None:
        log.warn("no VM secret in {path}: " + (
            "every call will be refused until the HKD hands one over" if secret.required
            else "vma.secret.required is off: anyone who reaches the agent drives it"),
            path=secret.path)
    limits = RPCLimits.from_config(cfg)
    _fit_descriptors(limits.total + 64)
    factory = SimpleRPCServerFactory(vma.functions(), base="/vma",
                                     idle_timeout=cfg.getfloat("vma.rpc.idle_timeout"),
                                     clock=reactor, secret=secret, limits=limits)
    address = cfg.get("vma.address").strip() or "0.0.0.0"
    top = service.MultiService()
    agent = VMAService(vma)
    agent.setServiceParent(top)
    rpc = ListeningService(reactor, cfg.getint("vma.port"), factory, interface=address,
                           listening=listening)
    rpc.setServiceParent(top)
    top.vma = vma
    top.rpc = rpc
    return top
