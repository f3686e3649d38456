"""
The L7R on every core: C{twistd qvd-l7r} with C{l7r.workers} above 1 runs
this supervisor, which holds the listening sockets and keeps one L7R worker
process (L{qvd.l7r.worker}) per socket running.

    sockets = reuseport_sockets(interface, port, count, spread)   # in makeService
    svc = L7RWorkers(config_path, listen, sockets, on_failed=...)
    svc.startService()

Each worker is a whole L7R (database pool, LISTEN, TLS, password-check
processes) on its own socket of the port's group (L{qvd.l7r._sockets}); the
sessions it holds carry its process id in C{vm_runtimes}, so takeovers,
aborts and the cleanup after a dead process work between the workers of one
node as between the L7Rs of several.

Its log events arrive here as JSON and are logged with C{[worker N]} in
front. The supervisor writes "L7R listening on ..." once every worker
accepts. A worker that exits after it was ready is started again (after 1 s,
doubling up to C{RESTART_MAX} while it keeps dying within C{STABLE} seconds
of its start); its socket stays open meanwhile, so connections wait in its
queue rather than being refused. A worker that exits before it was ready
(a bad certificate, a superuser database login) could not start: the
supervisor stops all of them and calls C{on_failed} (twistd exits 1).
Stopping the service sends SIGTERM to every worker and waits for them
(SIGKILL after C{STOP_TIMEOUT} seconds).
"""

import os
import signal
import socket
import sys

from twisted.application import service
from twisted.internet import defer, error, protocol
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import LogLevel, eventFromJSON, formatEvent, globalLogPublisher

from qvd.logs import Logger

log = Logger()

RESTART_MAX = 30.0
STABLE = 10.0
STOP_TIMEOUT = 15.0
_RECORD = "\x1e"      # before each JSON record; "\n" after it
_QVD_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class WorkerProtocol(protocol.ProcessProtocol):
    """
    The supervisor's side of one worker process: its log, its readiness,
    its end.
    """

    def __init__(self, supervisor, index):
        self.supervisor = supervisor
        self.index = index
        self.ready = False
        self.ended = defer.Deferred()
        self._out = b""
        self._err = b""

    def childDataReceived(self, fd, data):
        # whole lines only: a read may end inside a UTF-8 character
        if fd == 1:
            *records, self._out = (self._out + data).split(b"\n")
            for record in records:
                self._log_record(record.decode("utf-8", "replace"))
        elif fd == 2:
            *lines, self._err = (self._err + data).split(b"\n")
            for line in lines:
                self._log_stderr(line.decode("utf-8", "replace"))
        elif fd == 4 and not self.ready:
            self.ready = True
            self.supervisor.worker_ready(self)

    def _log_stderr(self, line):
        if line.strip():
            log.warn("[worker {index}] {line}", index=self.index, line=line)

    def _log_record(self, record):
        record = record.strip().lstrip(_RECORD)
        if not record:
            return
        try:
            event = eventFromJSON(record)
        except ValueError:
            log.warn("[worker {index}] {line}", index=self.index, line=record)
            return
        text = formatEvent(event)
        level = event.get("log_level", LogLevel.info)
        if level == LogLevel.critical:
            # Every worker says why it cannot start: the reason once is enough.
            if text in self.supervisor.criticals:
                return
            if len(self.supervisor.criticals) < 100:
                self.supervisor.criticals.add(text)
        failure = event.get("log_failure")
        if failure is not None:
            try:
                text += "\n" + failure.getTraceback()
            except Exception:
                pass
        globalLogPublisher({
            "log_format": "[worker {log_worker}] {log_text}", "log_text": text,
            "log_worker": self.index, "log_level": level,
            "log_namespace": event.get("log_namespace", "qvd.l7r.worker"),
            "log_time": event.get("log_time") or self.supervisor.reactor.seconds()})

    def processEnded(self, reason):
        self._log_record(self._out.decode("utf-8", "replace"))
        self._log_stderr(self._err.decode("utf-8", "replace"))
        self.status = reason.value.exitCode if reason.check(error.ProcessTerminated) else 0
        self.signal = getattr(reason.value, "signal", None)
        self.supervisor.worker_ended(self)
        self.ended.callback(None)


class L7RWorkers(service.Service):
    """
    @ivar workers: index -> L{WorkerProtocol} of the running worker.
    @ivar restarts: workers started again since the start.
    @ivar criticals: the critical messages logged (each is logged once,
        whichever workers say it).
    """

    def __init__(self, config_path, listen, sockets, reactor=None, on_failed=None,
                 python=sys.executable, env=None):
        if reactor is None:
            from twisted.internet import reactor
        self.config_path = config_path
        self.listen = listen
        self.sockets = sockets
        self.reactor = reactor
        self.on_failed = on_failed
        self.python = python
        self.env = env
        self.workers = {}
        self.restarts = 0
        self.criticals = set()
        self._delays = {}
        self._started_at = {}
        self._calls = {}
        self._stopping = False
        self._announced = False

    @property
    def count(self):
        return len(self.sockets)

    def startService(self):
        service.Service.startService(self)
        for index in range(self.count):
            self._spawn(index)

    def _spawn(self, index):
        self._calls.pop(index, None)
        if self._stopping:
            return
        sock = self.sockets[index]
        proto = WorkerProtocol(self, index)
        argv = [self.python, "-m", "qvd.l7r.worker", "--parent", str(os.getpid()),
                "--index", str(index), "--count", str(self.count),
                "--listen", self.listen, "--fd", "3", "--family", str(int(sock.family)),
                "--ready-fd", "4"]
        if self.config_path:
            argv += ["--config", self.config_path]
        env = dict(os.environ if self.env is None else self.env)
        # The worker imports the qvd this process runs.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_QVD_ROOT, env.get("PYTHONPATH")) if p)
        self.reactor.spawnProcess(proto, self.python, argv, env=env,
                                  childFDs={0: "w", 1: "r", 2: "r", 3: sock.fileno(), 4: "r"})
        proto.transport.closeStdin()
        self.workers[index] = proto
        self._started_at[index] = self.reactor.seconds()

    def worker_ready(self, proto):
        if self.workers.get(proto.index) is not proto:
            return
        if not self._announced and all(p.ready for p in self.workers.values()) \
                and len(self.workers) == self.count:
            self._announced = True
            log.info("L7R listening on {address} ({count} worker processes, pids {pids})",
                     address=_address(self.sockets[0]), count=self.count,
                     pids=" ".join(str(p.transport.pid) for p in self.workers.values()))

    def worker_ended(self, proto):
        if self.workers.get(proto.index) is proto:
            del self.workers[proto.index]
        if self._stopping:
            return
        how = (f"signal {proto.signal}" if proto.signal else f"status {proto.status}")
        if not proto.ready:
            log.error("L7R worker {index} could not start (it exited with {how}); "
                      "the L7R stops", index=proto.index, how=how)
            self._fail()
            return
        lived = self.reactor.seconds() - self._started_at.get(proto.index, 0)
        delay = 1.0 if lived >= STABLE else min(self._delays.get(proto.index, 0.5) * 2,
                                                RESTART_MAX)
        self._delays[proto.index] = delay
        self.restarts += 1
        log.warn("L7R worker {index} ended ({how}); starting it again in {delay}s "
                 "(its connections wait for it)", index=proto.index, how=how, delay=delay)
        self._calls[proto.index] = self.reactor.callLater(delay, self._spawn, proto.index)

    def _fail(self):
        d = self.stopService() if self.running else defer.succeed(None)

        def stopped(_):
            if self.on_failed is not None:
                self.on_failed()
            if self.reactor.running:
                self.reactor.stop()
        d.addBoth(stopped)

    def stopService(self):
        service.Service.stopService(self)
        self._stopping = True
        for call in self._calls.values():
            if call.active():
                call.cancel()
        self._calls.clear()
        waits = []
        for proto in list(self.workers.values()):
            waits.append(proto.ended)
            _signal(proto, signal.SIGTERM)
        killer = self.reactor.callLater(STOP_TIMEOUT, self._kill_all)

        def done(_):
            if killer.active():
                killer.cancel()
            for sock in self.sockets:
                sock.close()
        return defer.DeferredList(waits).addBoth(done)

    def _kill_all(self):
        for proto in list(self.workers.values()):
            log.warn("L7R worker {index} did not stop within {timeout}s; killing it",
                     index=proto.index, timeout=STOP_TIMEOUT)
            _signal(proto, signal.SIGKILL)


def _signal(proto, number):
    try:
        proto.transport.signalProcess(number)
    except (error.ProcessExitedAlready, OSError):
        pass


def _address(sock):
    """The listening address of C{sock} as Twisted prints a port's host."""
    host, port = sock.getsockname()[:2]
    kind = IPv6Address if sock.family == socket.AF_INET6 else IPv4Address
    return kind("TCP", host, port)
