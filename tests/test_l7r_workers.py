"""
The L7R's worker processes: the shared listening sockets on real loopback
sockets (the kernel runs the spreading program), and the supervisor's
decisions (restart, back-off, a failed start, stop) on a task.Clock with
processes that are only recorded.
"""

import select
import signal
import socket

from twisted.internet import error, task
from twisted.python import failure
from twisted.trial import unittest

from qvd.l7r import _sockets
from qvd.l7r.workers import RESTART_MAX, L7RWorkers


def accepted_by(sockets, source):
    """Which of C{sockets} accepts a connection from C{source}."""
    port = sockets[0].getsockname()[1]
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    target = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family) as client:
        client.bind((source, 0))
        client.connect((target, port))
        readable, _, _ = select.select(sockets, [], [], 2)
        assert len(readable) == 1, readable
        conn, _ = readable[0].accept()
        conn.close()
        return sockets.index(readable[0])


class SocketTests(unittest.TestCase):

    def make(self, interface, count, spread):
        sockets = _sockets.reuseport_sockets(interface, 0, count, spread)
        self.addCleanup(lambda: [s.close() for s in sockets])
        return sockets

    def test_spread_by_address(self):
        """
        With spread 'address', every connection of one client address goes
        to the socket L{worker_of} names, for 2 and 3 sockets.
        """
        for count in (2, 3):
            sockets = self.make("127.0.0.1", count, "address")
            for i in range(1, 13):
                source = f"127.0.0.{i}"
                for _ in range(2):
                    self.assertEqual(accepted_by(sockets, source),
                                     _sockets.worker_of(source, count), (count, source))

    def test_spread_by_address_ipv6(self):
        """On an IPv6 socket, IPv4 (mapped) and IPv6 clients are spread by address too."""
        sockets = self.make("::", 2, "address")
        for source in ("127.0.0.1", "127.0.0.2", "::1"):
            self.assertEqual(accepted_by(sockets, source), _sockets.worker_of(source, 2))

    def test_spread_by_connection(self):
        """With spread 'connection', connections of one address reach several sockets."""
        sockets = self.make("127.0.0.1", 2, "connection")
        seen = {accepted_by(sockets, "127.0.0.1") for _ in range(40)}
        self.assertEqual(seen, {0, 1})

    def test_one_port(self):
        """Port 0: the kernel's choice, the same for every socket; non-blocking, inheritable."""
        sockets = self.make("127.0.0.1", 3, "address")
        self.assertEqual(len({s.getsockname()[1] for s in sockets}), 1)
        self.assertTrue(all(s.get_inheritable() and not s.getblocking() for s in sockets))

    def test_bad_spread(self):
        """An unknown spread is one clear error naming the key."""
        e = self.assertRaises(_sockets.SocketError, _sockets.reuseport_sockets,
                              "127.0.0.1", 0, 2, "random")
        self.assertIn("l7r.workers.spread must be one of address, connection", str(e))

    def test_port_in_use(self):
        """A port another socket listens on (without SO_REUSEPORT) is refused by the bind."""
        other = socket.socket()
        self.addCleanup(other.close)
        other.bind(("127.0.0.1", 0))
        other.listen()
        e = self.assertRaises(OSError, _sockets.reuseport_sockets, "127.0.0.1",
                              other.getsockname()[1], 2)
        self.assertEqual(e.errno, 98)


class _Transport:
    def __init__(self, pid):
        self.pid = pid
        self.signals = []

    def closeStdin(self):
        pass

    def signalProcess(self, number):
        self.signals.append(number)


class _Reactor(task.Clock):
    running = True

    def __init__(self):
        super().__init__()
        self.spawned = []
        self.stopped = False

    def spawnProcess(self, proto, executable, args, env=None, childFDs=None):
        proto.makeConnection(_Transport(1000 + len(self.spawned)))
        self.spawned.append((proto, args, childFDs))

    def stop(self):
        self.stopped = True


def _ended(proto, status=None, sig=None):
    if status == 0 and sig is None:
        reason = failure.Failure(error.ProcessDone(0))
    else:
        reason = failure.Failure(error.ProcessTerminated(status, sig))
    proto.processEnded(reason)


class SupervisorTests(unittest.TestCase):

    def setUp(self):
        self.reactor = _Reactor()
        self.sockets = [socket.socket(), socket.socket()]
        for s in self.sockets:
            self.addCleanup(s.close)
        self.failed = []
        self.svc = L7RWorkers("/etc/qvd/node.conf", "ssl:8443", self.sockets,
                              reactor=self.reactor, on_failed=lambda: self.failed.append(1),
                              python="/usr/bin/python3")
        self.svc.startService()

    def ready_all(self):
        for proto, _, _ in self.reactor.spawned:
            proto.childDataReceived(4, b"ready\n")

    def test_one_worker_per_socket(self):
        """Each worker gets its socket as fd 3, a ready pipe as fd 4, and its index."""
        self.assertEqual(len(self.reactor.spawned), 2)
        for index, (proto, args, fds) in enumerate(self.reactor.spawned):
            self.assertEqual(fds[3], self.sockets[index].fileno())
            self.assertEqual(fds[4], "r")
            self.assertEqual(args[args.index("--index") + 1], str(index))
            self.assertEqual(args[args.index("--count") + 1], "2")
            self.assertEqual(args[args.index("--config") + 1], "/etc/qvd/node.conf")

    def test_restart_with_backoff(self):
        """
        A worker that dies after it was ready is started again after 1 s,
        and after twice as long each time it dies again soon, up to
        RESTART_MAX; one that lived long is started again after 1 s.
        """
        self.ready_all()
        delays = []
        for _ in range(7):
            proto = self.svc.workers[0]
            proto.childDataReceived(4, b"ready\n")
            before = len(self.reactor.spawned)
            _ended(proto, 1)
            waited = 0.0
            while len(self.reactor.spawned) == before:
                self.reactor.advance(0.5)
                waited += 0.5
            delays.append(waited)
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 16.0, RESTART_MAX, RESTART_MAX])
        proto = self.svc.workers[0]
        proto.childDataReceived(4, b"ready\n")
        self.reactor.advance(60)
        before = len(self.reactor.spawned)
        _ended(proto, None, signal.SIGKILL)
        self.reactor.advance(1.0)
        self.assertEqual(len(self.reactor.spawned), before + 1)
        self.assertEqual(self.svc.restarts, 8)
        self.assertEqual(self.failed, [])

    def test_failed_start(self):
        """A worker that exits before it was ready stops the L7R: the others get SIGTERM."""
        first, second = (p for p, _, _ in self.reactor.spawned)
        second.childDataReceived(4, b"ready\n")
        _ended(first, 1)
        self.assertEqual(second.transport.signals, [signal.SIGTERM])
        self.assertEqual(self.failed, [])
        _ended(second, 0)
        self.assertEqual(self.failed, [1])
        self.assertTrue(self.reactor.stopped)
        self.assertEqual(len(self.reactor.spawned), 2, "nothing started again")

    def test_stop(self):
        """
        Stopping sends SIGTERM to each worker, waits for them, SIGKILLs one
        that is still there after the timeout, starts none again.
        """
        self.ready_all()
        first, second = self.svc.workers[0], self.svc.workers[1]
        d = self.svc.stopService()
        self.assertEqual(first.transport.signals, [signal.SIGTERM])
        _ended(first, 0)
        self.assertNoResult(d)
        self.reactor.advance(15)
        self.assertEqual(second.transport.signals, [signal.SIGTERM, signal.SIGKILL])
        _ended(second, None, signal.SIGKILL)
        self.successResultOf(d)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertEqual([s.fileno() for s in self.sockets], [-1, -1], "sockets closed")

    def test_log_records(self):
        """
        A worker's JSON log records are logged with its index, also when a
        record arrives in pieces cut inside a character; stderr lines too.
        """
        from twisted.logger import globalLogPublisher
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        proto = self.reactor.spawned[1][0]
        record = ('\x1e{"log_format": "VM {vm}: hello", "vm": 7, "log_namespace": "x",'
                  ' "log_level": {"name": "warn", "__class_uuid__":'
                  ' "02e59486-f24d-46ad-8224-3acdf2a5732a"}, "log_time": 5.0}\n')
        record = record.replace("hello", "h\u00e9llo").encode()
        cut = record.index("\u00e9".encode()) + 1          # inside the two bytes of é
        proto.childDataReceived(1, record[:cut])
        self.assertEqual(events, [])
        proto.childDataReceived(1, record[cut:])
        proto.childDataReceived(2, b"boom\n")
        from twisted.logger import LogLevel, formatEvent
        self.assertEqual([formatEvent(e) for e in events],
                         ["[worker 1] VM 7: h\u00e9llo", "[worker 1] boom"])
        self.assertEqual(events[0]["log_level"], LogLevel.warn)
        self.assertEqual(events[0]["log_namespace"], "x")
