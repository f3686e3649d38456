"""
The VMA's seams to the operating system: running commands and looking at users
and file systems. Tests pass fakes of them.

    runner = ProcessRunner(reactor, log_path="/var/log/qvd/qvd-hooks.log")
    result = yield runner.run(["useradd", "-m", "alice"], timeout=60)
    result.rc, result.output

    host = LocalHost()
    host.user_exists("alice"); host.path_exists("/home/alice")
"""

import grp
import os
import pwd
import signal

import attrs
from twisted.internet import defer, protocol
from qvd.logs import Logger
from zope.interface import Interface, implementer

log = Logger()


@attrs.frozen
class CommandResult:
    """
    How a command ended.

    @ivar rc: exit code, or C{-signal} if a signal ended it, or C{None} if it
        could not be started.
    @ivar output: its standard output and error, decoded.
    """
    rc: object
    output: str = ""

    @property
    def ok(self):
        return self.rc == 0


class ICommandRunner(Interface):
    """
    Runs programs without blocking the reactor.
    """

    def run(argv, stdin=b"", timeout=None, env=None):
        """
        Run C{argv} (a list of text; C{argv[0]} looked up on C{PATH}), feeding
        it C{stdin}; kill it (process group) after C{timeout} seconds.

        @return: a Deferred firing with a L{CommandResult} (never failing: a
            program that cannot start has C{rc=None}).
        """

    def spawn_detached(argv, env=None):
        """
        Start C{argv} and do not wait for it (detached state hooks).
        """


class IHost(Interface):
    """
    Read-only facts about the machine.
    """

    def user_exists(name):
        """C{True} if the user C{name} exists."""

    def user(name):
        """C{(uid, gid, home)} of user C{name}, or C{None}."""

    def group_exists(name):
        """C{True} if the group C{name} exists."""

    def path_exists(path):
        """C{True} if C{path} exists."""

    def same_filesystem(a, b):
        """C{True} if C{a} and C{b} are on the same file system (device)."""


@implementer(IHost)
class LocalHost:
    """L{IHost} of this machine."""

    def user_exists(self, name):
        return self.user(name) is not None

    def user(self, name):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            return None
        return (entry.pw_uid, entry.pw_gid, entry.pw_dir)

    def group_exists(self, name):
        return group_exists(name)

    def path_exists(self, path):
        return os.path.exists(path)

    def same_filesystem(self, a, b):
        try:
            return os.stat(a).st_dev == os.stat(b).st_dev
        except OSError:
            return False


def group_exists(name):
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def which(program, path=None):
    """The absolute path of C{program} on C{path} (C{$PATH}), or C{None}."""
    if "/" in program:
        return program if os.access(program, os.X_OK) else None
    for directory in (path or os.environ.get("PATH") or "/usr/sbin:/usr/bin:/sbin:/bin").split(":"):
        candidate = os.path.join(directory, program)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    return None


class _Collector(protocol.ProcessProtocol):
    def __init__(self, stdin, log_file):
        self._stdin = stdin
        self._log_file = log_file
        self._chunks = []
        self.done = defer.Deferred()

    def connectionMade(self):
        if self._stdin:
            self.transport.write(self._stdin)
        self.transport.closeStdin()

    def outReceived(self, data):
        self._chunks.append(data)
        if self._log_file is not None:
            self._log_file.write(data)
            self._log_file.flush()

    errReceived = outReceived

    def processEnded(self, reason):
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        rc = -sig if sig is not None and code is None else code
        self.done.callback(CommandResult(rc, b"".join(self._chunks).decode("utf-8", "replace")))


@implementer(ICommandRunner)
class ProcessRunner:
    """
    L{ICommandRunner} with C{spawnProcess}; output also appended to C{log_path}.
    """

    def __init__(self, reactor, log_path=None, env=None):
        self._reactor = reactor
        self._log_path = log_path
        self._env = env if env is not None else {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LANG": os.environ.get("LANG", "C.UTF-8")}

    def _open_log(self):
        if not self._log_path:
            return None
        try:
            return open(self._log_path, "ab")
        except OSError as e:
            log.warn("cannot open {path}: {e}", path=self._log_path, e=e)
            return None

    def run(self, argv, stdin=b"", timeout=None, env=None):
        argv = [str(a) for a in argv]
        env = dict(self._env if env is None else env)
        executable = which(argv[0], env.get("PATH"))
        if executable is None:
            return defer.succeed(CommandResult(None, f"{argv[0]}: command not found"))
        log_file = self._open_log()
        collector = _Collector(stdin, log_file)
        try:
            transport = self._reactor.spawnProcess(collector, executable, argv, env=env)
        except OSError as e:
            if log_file is not None:
                log_file.close()
            return defer.succeed(CommandResult(None, f"{argv[0]}: {e}"))
        timer = None
        if timeout:
            def kill():
                log.warn("{argv} ran longer than {t} s: killing it", argv=argv, t=timeout)
                try:
                    transport.signalProcess("KILL")
                except Exception:
                    pass
            timer = self._reactor.callLater(timeout, kill)

        def ended(result):
            if timer is not None and timer.active():
                timer.cancel()
            if log_file is not None:
                log_file.close()
            return result
        return collector.done.addBoth(ended)

    def spawn_detached(self, argv, env=None):
        d = self.run(argv, env=env)
        d.addCallback(lambda r: r.ok or log.warn("detached {argv} ended with {rc}: {out}",
                                                 argv=argv, rc=r.rc, out=r.output[-500:]))
        return None


def session_processes(sid, proc="/proc"):
    """The pids of every process whose session id is C{sid} (from /proc)."""
    pids = []
    try:
        entries = os.listdir(proc)
    except OSError:
        return pids
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(proc, entry, "stat"), "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        # fields after the command: state ppid pgrp session ...
        if len(fields) > 3 and fields[3] == str(sid):
            pids.append(int(entry))
    return pids


def signal_session(sid, signame):
    """
    Send C{signame} to every process of session C{sid}.

    @return: how many processes got it.
    """
    signum = getattr(signal, "SIG" + signame)
    count = 0
    if not sid or sid <= 1 or sid == os.getsid(0):
        return count          # never our own session (or init's)
    for pid in session_processes(sid):
        try:
            os.kill(pid, signum)
            count += 1
        except OSError:
            pass
    return count


class IProcessControl(Interface):
    """
    Signals to processes the VMA did not spawn itself (nxagent, the session's
    children). Tests pass a fake of it.
    """

    def kill(pid, signame):
        """Send C{signame} (C{"HUP"}, ...) to C{pid}; C{False} if it is gone."""

    def session_of(pid):
        """The session id of C{pid}, or C{None}."""

    def signal_session(sid, signame):
        """Send C{signame} to every process of session C{sid}; how many got it."""

    def is_nxagent(pid):
        """C{True} if C{pid} is a running nxagent."""


@implementer(IProcessControl)
class LocalProcessControl:
    """L{IProcessControl} of this machine (/proc and kill(2))."""

    def kill(self, pid, signame):
        try:
            os.kill(pid, getattr(signal, "SIG" + signame))
        except ProcessLookupError:
            return False
        return True

    def session_of(self, pid):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
            return int(stat[stat.rfind(")") + 2:].split()[3])
        except (OSError, ValueError, IndexError):
            return None

    def signal_session(self, sid, signame):
        return signal_session(sid, signame)

    def is_nxagent(self, pid):
        try:
            with open(f"/proc/{pid}/comm") as f:
                return f.read().strip() == "nxagent"
        except OSError:
            return False
