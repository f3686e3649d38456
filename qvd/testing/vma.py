"""
Fakes for testing the VMA (and anything that drives one) without touching the
host: L{FakeRunner} (an L{ICommandRunner}), L{FakeHost} (an L{IHost}),
L{FakeProcessControl} (an L{IProcessControl}) and
L{FakeProcessReactor} (a C{task.Clock} whose C{spawnProcess} records).

    runner = FakeRunner()
    runner.results["useradd"] = CommandResult(1, "useradd: no")
    host = FakeHost(users={"root": (0, 0, "/root")}, paths={"/"})
    ...
    runner.commands   # every argv run, in order
"""

from twisted.internet import defer, task
from zope.interface import implementer

from qvd.vma.system import CommandResult, ICommandRunner, IHost, IProcessControl


@implementer(ICommandRunner)
class FakeRunner:
    """
    Records commands; answers from C{results} (keyed by the program's base
    name, or by the full argv tuple), else C{CommandResult(0)}. A result may
    be a Deferred (a command still running). C{on_run}, if set, is called with
    each argv (to simulate side effects, e.g. useradd creating the user).
    """

    def __init__(self):
        self.commands = []
        self.detached = []
        self.results = {}
        self.on_run = None

    def run(self, argv, stdin=b"", timeout=None, env=None):
        argv = [str(a) for a in argv]
        self.commands.append(argv)
        if self.on_run is not None:
            self.on_run(argv)
        result = self.results.get(tuple(argv), self.results.get(argv[0].rsplit("/", 1)[-1]))
        if result is None:
            result = CommandResult(0, "")
        if isinstance(result, defer.Deferred):
            return result
        return defer.succeed(result)

    def spawn_detached(self, argv, env=None):
        self.detached.append([str(a) for a in argv])


@implementer(IHost)
class FakeHost:
    """
    A machine described by sets: C{users} (name -> (uid, gid, home)),
    C{groups}, C{paths}; C{home_on_root} says whether the home path is on the
    root file system.
    """

    def __init__(self, users=None, groups=(), paths=(), home_on_root=True):
        self.users = dict(users or {})
        self.groups = set(groups)
        self.paths = set(paths)
        self.home_on_root = home_on_root

    def user_exists(self, name):
        return name in self.users

    def user(self, name):
        return self.users.get(name)

    def group_exists(self, name):
        return name in self.groups

    def path_exists(self, path):
        return path in self.paths

    def same_filesystem(self, a, b):
        return self.home_on_root


class FakeProcessTransport:
    def __init__(self, reactor, proto, argv, kwargs, pid):
        self.reactor = reactor
        self.proto = proto
        self.argv = argv
        self.kwargs = kwargs
        self.pid = pid
        self.signals = []

    def signalProcess(self, name):
        self.signals.append(name)

    def closeStdin(self):
        pass


class FakeProcessReactor(task.Clock):
    """
    A clock that records C{spawnProcess} calls in C{spawned} (each a
    L{FakeProcessTransport}, its protocol already connected).
    """

    def __init__(self, first_pid=40000):
        super().__init__()
        self.spawned = []
        self._pid = first_pid

    def spawnProcess(self, proto, executable, args=(), env=None, path=None,
                     uid=None, gid=None, usePTY=False, childFDs=None):
        self._pid += 1
        transport = FakeProcessTransport(self, proto, list(args),
                                         dict(env=env, path=path, uid=uid, gid=gid), self._pid)
        self.spawned.append(transport)
        proto.makeConnection(transport)
        return transport


@implementer(IProcessControl)
class FakeProcessControl:
    """
    Records signals (C{sent}: list of (pid or ("session", sid), signame)).
    C{alive}: pids that exist; C{sessions}: pid -> sid; C{nxagents}: pids
    that are nxagent.
    """

    def __init__(self):
        self.sent = []
        self.alive = set()
        self.sessions = {}
        self.nxagents = set()

    def kill(self, pid, signame):
        self.sent.append((pid, signame))
        return pid in self.alive

    def session_of(self, pid):
        return self.sessions.get(pid)

    def signal_session(self, sid, signame):
        self.sent.append((("session", sid), signame))
        return 1

    def is_nxagent(self, pid):
        return pid in self.nxagents
