"""
Run a command without blocking the reactor.

    result = yield run(reactor, ["ip", "link", "show", "qvdnet"])
    if result.code != 0: ...

L{run} never fails for a non-zero exit status (the caller decides); it fails
with L{VirtError} when the program cannot be started.
"""

import os
import shutil

import attrs
from twisted.internet import defer, error, protocol

from qvd.virt.interfaces import VirtError

#: Where programs are looked for: the daemon's PATH, then the system's
#: directories (a daemon started with a user's PATH may lack /usr/sbin).
SEARCH_PATH = ":".join(
    [p for p in os.environ.get("PATH", "").split(":") if p]
    + ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"])


@attrs.frozen
class ProcessResult:
    """
    How a command ended: C{code} (exit status, or -signal), C{out}, C{err}.
    """
    argv: tuple
    code: int
    out: str = ""
    err: str = ""

    def describe(self):
        text = (self.err or self.out).strip()
        return f"'{' '.join(self.argv)}' exited with {self.code}" + (f": {text}" if text else "")


class _Collector(protocol.ProcessProtocol):
    def __init__(self, argv, done, wait_for_pipes, stdin=b""):
        self.argv = argv
        self.stdin = stdin
        self.done = done
        self.wait_for_pipes = wait_for_pipes
        self.out = []
        self.err = []

    def connectionMade(self):
        if self.stdin:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data):
        self.out.append(data)

    def errReceived(self, data):
        self.err.append(data)

    def _finish(self, reason):
        if self.done.called:
            return
        value = reason.value
        if isinstance(value, error.ProcessDone):
            code = 0
        elif value.exitCode is not None:
            code = value.exitCode
        else:
            code = -(value.signal or 1)
        self.done.callback(ProcessResult(
            tuple(self.argv), code,
            b"".join(self.out).decode(errors="replace"),
            b"".join(self.err).decode(errors="replace")))

    def processExited(self, reason):
        if not self.wait_for_pipes:
            self._finish(reason)

    def processEnded(self, reason):
        self._finish(reason)


def run(reactor, argv, log_path=None, env=None, timeout=60.0, stdin=b""):
    """
    Run C{argv} (given C{stdin} as its standard input) and fire with a
    L{ProcessResult}.

    @param timeout: seconds after which the process is killed (SIGKILL) and
        the result's C{code} is C{-9}, with C{err} saying so.
    @param log_path: send standard output and error to this file (appended)
        instead of collecting them, and fire as soon as the process exits even
        if a daemonised child keeps the file open (C{lxc-start -d}).
    """
    executable = argv[0] if os.path.isabs(argv[0]) else shutil.which(argv[0], path=SEARCH_PATH)
    if executable is None:
        return defer.fail(VirtError(f"{argv[0]} is not installed (needed for '{' '.join(argv)}')"))
    done = defer.Deferred()
    collector = _Collector(argv, done, wait_for_pipes=log_path is None, stdin=stdin)
    if env is None:
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL")}
        env["PATH"] = SEARCH_PATH
    if log_path is None:
        process = reactor.spawnProcess(collector, executable, list(argv), env=env)
    else:
        log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        try:
            process = reactor.spawnProcess(collector, executable, list(argv), env=env,
                                           childFDs={0: null_fd, 1: log_fd, 2: log_fd})
        finally:
            os.close(log_fd)
            os.close(null_fd)
    if timeout:
        def expire():
            collector.err.append(f"killed after {timeout} s\n".encode())
            try:
                process.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass
        timer = reactor.callLater(timeout, expire)
        done.addBoth(lambda result: (timer.active() and timer.cancel(), result)[1])
    return done
