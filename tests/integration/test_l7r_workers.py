"""
C{twistd qvd-l7r} with two worker processes (C{l7r.workers = 2}), on the real
PostgreSQL: connections spread by client address, a session taken over from
the other worker, a killed worker replaced without losing the port, the
per-address cap exact across workers, a clean stop, a failed start.

The desktop is a fake agent and an echo server standing in for nxagent,
served by this test's reactor; clients are TLS sockets bound to 127.0.0.1
and 127.0.0.2, which the kernel hands to different workers
(L{qvd.l7r._sockets.worker_of}).
"""

import base64
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from qvd.db import sync
from qvd.l7r import tls
from qvd.l7r._sockets import worker_of
from qvd.passwords import legacy_hash
from qvd.testing import pg
from qvd.testing.e2e import TWISTD, env
from qvd.testing.fakevma import EchoFactory, FakeVMA

GREETING = b"NXPROXY-3.5.0-3.5.99 stream=default,data=default "
GREETING_ECHO = len(GREETING) + len(b"cookie=,") + 32
A, B = "127.0.0.1", "127.0.0.2"       # one address for each worker of two


def _descendants(pid):
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children") as f:
                children = [int(c) for c in f.read().split()]
        except OSError:
            continue
        found.update(children)
        todo.extend(children)
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class Client:
    """A blocking TLS client of the L7R from a chosen source address."""

    def __init__(self, port, source):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        raw = socket.create_connection(("127.0.0.1", port), timeout=10,
                                       source_address=(source, 0))
        self.sock = context.wrap_socket(raw)
        self.rest = b""

    def request(self, target, login=None):
        headers = f"GET {target} HTTP/1.1\r\nHost: l7r\r\n"
        if login:
            token = base64.b64encode(f"{login}:secret".encode()).decode()
            headers += f"Authorization: Basic {token}\r\n"
        self.sock.sendall(headers.encode() + b"\r\n")
        return self._head()

    def _head(self):
        data, self.rest = self.rest, b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError(f"closed after {data!r}")
            data += chunk
        head, _, self.rest = data.partition(b"\r\n\r\n")
        return int(head.split(b" ")[1])

    def connect_vm(self, vm_id, login):
        """The connect sequence up to the relay; True once the greeting came back."""
        token = base64.b64encode(f"{login}:secret".encode()).decode()
        self.sock.sendall(
            f"GET /qvd/connect_to_vm?id={vm_id}&qvd.client.os=linux HTTP/1.1\r\n"
            f"Authorization: Basic {token}\r\nConnection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n"
            .encode() + GREETING)
        while True:
            status = self._head()
            if status == 101:
                break
            if status != 102:
                return status
        data = self.rest
        while len(data) < GREETING_ECHO:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("closed before the greeting came back")
            data += chunk
        return 101

    def echo(self, payload=b"x" * 1000):
        self.sock.sendall(payload)
        data = b""
        while len(data) < len(payload):
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            data += chunk
        return data == payload

    def closed_within(self, seconds):
        self.sock.settimeout(seconds)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except (socket.timeout, TimeoutError):
            return False
        except (ssl.SSLError, OSError):
            return True

    def close(self):
        self.sock.close()


class WorkersTests(unittest.TestCase):

    timeout = 180

    def setUp(self):
        self.root = tempfile.mkdtemp(prefix="qvdt-l7rw-", dir="/var/tmp")
        self.addCleanup(shutil.rmtree, self.root, True)
        self.dbname, self.dsn = pg.fresh_database()
        self.addCleanup(pg.drop_database, self.dbname)
        self.vma = reactor.listenTCP(0, FakeVMA().site(), interface="127.0.0.1")
        self.addCleanup(self.vma.stopListening)
        self.echo = reactor.listenTCP(0, EchoFactory(), interface="127.0.0.1")
        self.addCleanup(self.echo.stopListening)
        self.vms = self.seed()
        self.ssl_dir = os.path.join(self.root, "ssl")
        tls.self_signed(self.ssl_dir, "node1")
        self.proc = None

    def seed(self):
        password = legacy_hash("secret", "qvd1234")

        def run(cur):
            cur.execute("INSERT INTO hosts (name, address) VALUES ('node1', '127.0.0.1')"
                        " RETURNING id")
            host = cur.fetchone()["id"]
            cur.execute("INSERT INTO host_runtimes (host_id, state) VALUES (%s, 'running')",
                        (host,))
            cur.execute("INSERT INTO osfs (tenant_id, name) VALUES (1, 'o') RETURNING id")
            osf = cur.fetchone()["id"]
            vms = {}
            for i, login in enumerate(("alice", "bob")):
                cur.execute("INSERT INTO users (tenant_id, login, password) VALUES (1, %s, %s)"
                            " RETURNING id", (login, password))
                user = cur.fetchone()["id"]
                cur.execute("INSERT INTO vms (name, user_id, osf_id, ip, mac) VALUES"
                            " (%s, %s, %s, %s, %s) RETURNING id",
                            (f"vm{i}", user, osf, f"10.9.0.{i + 10}", f"54:52:00:00:09:{i:02x}"))
                vm = cur.fetchone()["id"]
                cur.execute("INSERT INTO vm_runtimes (vm_id, host_id, vm_state, vm_address,"
                            " vm_vma_port, vm_x_port) VALUES (%s, %s, 'running', '127.0.0.1',"
                            " %s, %s)", (vm, host, self.vma.getHost().port,
                                         self.echo.getHost().port))
                vms[login] = vm
            return vms
        with sync.connect(self.dsn) as conn:
            return sync.transaction(conn, run)

    def query(self, sql, args=None):
        with sync.connect(self.dsn) as conn:
            def run(cur):
                cur.execute(sql, args)
                return [dict(r) for r in cur.fetchall()] if cur.description else []
            return sync.transaction(conn, run)

    def start_l7r(self, **extra):
        values = {
            "nodename": "node1", "database.host": pg.cluster().socketdir,
            "database.name": self.dbname, "database.listen.keepalive": "1",
            "path.state": f"{self.root}/state", "path.l7r.ssl": self.ssl_dir,
            "internal.l7r.poll_time.x": "0.05", "l7r.workers": "2",
            "l7r.auth.hash.workers": "1",
        }
        values.update(extra)
        self.conf = os.path.join(self.root, "node.conf")
        with open(self.conf, "w") as f:
            f.writelines(f"{k} = {v}\n" for k, v in values.items())
        self.log = os.path.join(self.root, "l7r.log")
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "-l", self.log, "qvd-l7r", "--config", self.conf,
             "--listen", "ssl:0:interface=127.0.0.1"],
            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        self.addCleanup(self.kill_all)

    def kill_all(self):
        if self.proc is not None and self.proc.poll() is None:
            for pid in _descendants(self.proc.pid):
                with_suppressed(os.kill, pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait()

    def log_text(self):
        try:
            with open(self.log) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    async def wait_for(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None and what != "exit":
                raise AssertionError(f"the L7R exited ({self.proc.returncode}) waiting for "
                                     f"{what}:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not seen within {timeout} s:\n"
                                     f"{self.log_text()[-3000:]}")
            await task.deferLater(reactor, 0.05, lambda: None)

    async def started(self, **extra):
        self.start_l7r(**extra)
        found = await self.wait_for(
            lambda: re.search(r"L7R listening on .*port=(\d+)\) \(2 worker processes, pids "
                              r"(\d+) (\d+)\)", self.log_text()), 60, "the L7R listening")
        self.port = int(found.group(1))
        return [int(found.group(2)), int(found.group(3))]

    def client(self, source):
        return threads.deferToThread(Client, self.port, source)

    def blocking(self, function, *args):
        return threads.deferToThread(function, *args)

    def holder(self, login):
        return self.query("SELECT user_state, l7r_pid FROM vm_runtimes WHERE vm_id = %s",
                          (self.vms[login],))[0]

    def test_spread_by_address(self):
        """
        Every connection of one client address reaches the same worker, and
        the two addresses reach the two workers: the session's row carries
        the process id of the worker the address belongs to.
        """
        async def go():
            pids = await self.started()
            for source, login in ((A, "alice"), (B, "bob")):
                c = await self.client(source)
                self.assertEqual(await self.blocking(c.connect_vm, self.vms[login], login), 101)
                self.assertTrue(await self.blocking(c.echo))
                row = self.holder(login)
                self.assertEqual(row["user_state"], "connected")
                self.assertEqual(row["l7r_pid"], pids[worker_of(source, 2)], source)
                c.close()
            for _ in range(6):
                c = await self.client(A)
                self.assertEqual(await self.blocking(c.request, "/qvd/ping"), 200)
                c.close()
        return defer.ensureDeferred(go())

    def test_takeover_from_the_other_worker(self):
        """
        alice connected through one worker; her second client arrives at the
        other: the first client's connection is cut, the second gets the
        relay, and the row names the second worker.
        """
        async def go():
            pids = await self.started()
            first = await self.client(A)
            self.assertEqual(await self.blocking(first.connect_vm, self.vms["alice"], "alice"), 101)
            second = await self.client(B)
            self.assertEqual(await self.blocking(second.connect_vm, self.vms["alice"], "alice"), 101)
            self.assertTrue(await self.blocking(second.echo))
            self.assertTrue(await self.blocking(first.closed_within, 10),
                            "the first client's relay is cut")
            row = self.holder("alice")
            self.assertEqual((row["user_state"], row["l7r_pid"]),
                             ("connected", pids[worker_of(B, 2)]))
            first.close()
            second.close()
        return defer.ensureDeferred(go())

    def test_killed_worker_replaced(self):
        """
        A worker killed with SIGKILL while it relays alice's session is
        started again; connections meanwhile wait in its socket's queue
        (none is refused), and alice's next connection, landing on the new
        worker, gets her desktop: the dead process's claim does not hold it.
        """
        async def go():
            pids = await self.started()
            victim = pids[worker_of(A, 2)]
            c = await self.client(A)
            self.assertEqual(await self.blocking(c.connect_vm, self.vms["alice"], "alice"), 101)
            os.kill(victim, signal.SIGKILL)
            self.assertTrue(await self.blocking(c.closed_within, 5))
            # At once, before the new worker runs: the connection waits for it.
            again = await self.client(A)
            self.assertEqual(await self.blocking(again.connect_vm, self.vms["alice"], "alice"), 101)
            self.assertTrue(await self.blocking(again.echo))
            self.assertIn("starting it again", self.log_text())
            row = self.holder("alice")
            self.assertNotIn(row["l7r_pid"], pids)
            self.assertEqual(row["user_state"], "connected")
            workers = [p for p in _descendants(self.proc.pid) if p not in pids
                       and "qvd.l7r.worker" in open(f"/proc/{p}/cmdline").read()]
            self.assertEqual(workers, [row["l7r_pid"]])
            self.assertFalse(_alive(victim))
            again.close()
        return defer.ensureDeferred(go())

    def test_per_address_cap_across_workers(self):
        """
        With l7r.connections.per_address = 3, a fourth connection from one
        address is refused although two processes accept, and another
        address is still served.
        """
        async def go():
            await self.started(**{"l7r.connections.per_address": "3"})
            held = []
            for _ in range(3):
                c = await self.client(A)
                self.assertEqual(await self.blocking(c.request, "/qvd/ping"), 200)
                held.append(c)
            refused = await self.blocking(self._refused, A)
            self.assertTrue(refused, "the 4th connection from one address is closed")
            other = await self.client(B)
            self.assertEqual(await self.blocking(other.request, "/qvd/ping"), 200)
            for c in held + [other]:
                c.close()
        return defer.ensureDeferred(go())

    def _refused(self, source):
        try:
            c = Client(self.port, source)
            c.request("/qvd/ping")
        except (OSError, ConnectionError, ssl.SSLError):
            return True
        c.close()
        return False

    def test_stop(self):
        """
        SIGTERM to twistd stops every worker and their password-check
        processes, releases the sessions, and shuts down cleanly.
        """
        async def go():
            pids = await self.started()
            c = await self.client(A)
            self.assertEqual(await self.blocking(c.connect_vm, self.vms["alice"], "alice"), 101)
            everything = _descendants(self.proc.pid)
            self.assertTrue(set(pids) <= everything)
            self.assertGreaterEqual(len(everything), 4, "two workers and their hash processes")
            self.proc.send_signal(signal.SIGTERM)
            await self.wait_for(lambda: self.proc.poll() is not None, 30, "exit")
            # twistd ends with the signal that stopped it, once all is shut down
            self.assertEqual(self.proc.returncode, -signal.SIGTERM, self.log_text()[-3000:])
            self.assertIn("Server Shut Down.", self.log_text())
            await self.wait_for(lambda: not any(_alive(p) for p in everything), 5, "exit")
            self.assertEqual(self.holder("alice")["user_state"], "disconnected")
            c.close()
        return defer.ensureDeferred(go())

    def test_supervisor_killed(self):
        """
        When the twistd process is killed (SIGKILL: no chance to stop
        anything), its workers and their password-check processes die too.
        """
        async def go():
            await self.started()
            everything = _descendants(self.proc.pid)
            self.assertGreaterEqual(len(everything), 4)
            self.proc.kill()
            self.proc.wait()
            await self.wait_for(lambda: not any(_alive(p) for p in everything), 10,
                                "exit")
        return defer.ensureDeferred(go())

    def test_worker_cannot_start(self):
        """
        When the workers cannot start (a certificate in the database that is
        no certificate), the L7R exits 1 saying why, without a traceback,
        and leaves no process behind.
        """
        self.query("INSERT INTO ssl_configs (key, value) VALUES ('l7r.ssl.key', 'junk'),"
                   " ('l7r.ssl.cert', 'junk')")

        async def go():
            self.start_l7r()
            await self.wait_for(lambda: self.proc.poll() is not None, 60, "exit")
            text = self.log_text()
            self.assertEqual(self.proc.returncode, 1, text[-3000:])
            self.assertNotIn("Traceback", text)
            self.assertIn("is not PEM", text)
            self.assertIn("could not start", text)
            self.assertEqual(subprocess.run(["pgrep", "-f", self.conf]).returncode, 1,
                             "no worker left")
        return defer.ensureDeferred(go())


def with_suppressed(function, *args):
    try:
        function(*args)
    except OSError:
        pass
