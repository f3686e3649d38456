"""
The runtime store's suite (qvd.testing.runtime_store_suite) against the real
store on PostgreSQL, as the L7R's role, and against the fake; and the
blocking path qvd-admin takes through the same statements.
"""

import itertools
import select
import time

import psycopg2
from twisted.internet import reactor
from twisted.trial import unittest

from qvd.db import sync
from qvd.db.pool import Database
from qvd.runtime import store as runtime_store
from qvd.runtime.store import IRuntimeStore, RuntimeStore
from qvd.testing import pg
from qvd.testing.fakeruntime import FakeRuntimeStore
from qvd.testing.runtime_store_suite import RuntimeStoreTests


class FakeRuntimeStoreTests(RuntimeStoreTests, unittest.TestCase):

    def setUp(self):
        self.clock_now = 1000.0
        self.store = FakeRuntimeStore(now=lambda: self.clock_now)

    def add_host(self, name, **fields):
        return self.store.add_host(name, **fields)

    def add_vm(self, **fields):
        return self.store.add_vm(**fields)

    def row(self, vm_id):
        return self.store.vms[vm_id]

    def user_of(self, vm_id):
        return 77

    def age_claim(self, vm_id, seconds):
        self.store.vms[vm_id]["user_state_ts"] = self.clock_now - seconds

    def assertNotified(self, channel):
        self.assertIn(channel, self.store.notified)

    def test_provides_interface(self):
        self.assertTrue(IRuntimeStore.providedBy(self.store))


class RealRuntimeStoreTests(RuntimeStoreTests, pg.DatabaseTestMixin, unittest.TestCase):

    COLUMNS = ("user_state", "user_cmd", "l7r_host_id", "l7r_pid", "l7r_session", "host_id",
               "vm_state", "vm_cmd", "real_user_id", "user_ip")

    def setUp(self):
        super().setUp()
        self.db = Database(pg.role_dsn(self.dbname, "l7r"), reactor, size=2)
        self.addCleanup(self.db.stop)
        self.store = RuntimeStore(self.db)
        self.user = self.query("INSERT INTO users (tenant_id, login, password)"
                               " VALUES (1, 'u', 'x') RETURNING id")[0]["id"]
        self._n = itertools.count(1)
        self.listener = psycopg2.connect(self.dsn)
        self.listener.autocommit = True
        self.addCleanup(self.listener.close)
        self.channels = []
        return self.db.start()

    def add_host(self, name, state="running", hypervisor="lxc", usable_ram=1000,
                 usable_cpu=1000):
        n = next(self._n)
        host = self.query("INSERT INTO hosts (name, address) VALUES (%s, %s) RETURNING id",
                          (name, f"10.9.0.{n}"))[0]["id"]
        self.query("INSERT INTO host_runtimes (host_id, state, hypervisor, usable_ram,"
                   " usable_cpu) VALUES (%s, %s, %s, %s, %s)",
                   (host, state, hypervisor, usable_ram, usable_cpu))
        with self.listener.cursor() as cur:
            cur.execute(f"LISTEN qvd_cmd_for_vm_on_host{host};"
                        f" LISTEN qvd_cmd_for_user_on_host{host}")
        return host

    def add_vm(self, di_path="desk.tar", di_blocked=False, host_id=None, vm_state="stopped",
               **runtime):
        n = next(self._n)
        osf = self.query("INSERT INTO osfs (tenant_id, name) VALUES (1, %s) RETURNING id",
                         (f"o{n}",))[0]["id"]
        if di_path is not None:
            di = self.query("INSERT INTO dis (osf_id, path, version, blocked)"
                            " VALUES (%s, %s, '1', %s) RETURNING id",
                            (osf, di_path, di_blocked))[0]["id"]
            self.query("INSERT INTO di_tags (di_id, osf_id, tag) VALUES (%s, %s, 'default')",
                       (di, osf))
        vm = self.query("INSERT INTO vms (name, user_id, osf_id, ip, mac) VALUES"
                        " (%s, %s, %s, %s, %s) RETURNING id",
                        (f"vm{n}", self.user, osf, f"10.8.{n // 250}.{n % 250 + 1}",
                         f"02:00:00:00:{n // 250:02x}:{n % 250 + 1:02x}"))[0]["id"]
        columns = dict(runtime, host_id=host_id, vm_state=vm_state)
        names = ", ".join(columns)
        self.query(f"INSERT INTO vm_runtimes (vm_id, {names}) VALUES"
                   f" (%s{', %s' * len(columns)})", [vm] + list(columns.values()))
        return vm

    def row(self, vm_id):
        return self.query(f"SELECT {', '.join(self.COLUMNS)} FROM vm_runtimes"
                          " WHERE vm_id = %s", (vm_id,))[0]

    def user_of(self, vm_id):
        return self.user

    def age_claim(self, vm_id, seconds):
        self.query("UPDATE vm_runtimes SET user_state_ts = now() - make_interval(secs => %s)"
                   " WHERE vm_id = %s", (seconds, vm_id))

    def assertNotified(self, channel):
        deadline = time.monotonic() + 2
        while channel not in self.channels and time.monotonic() < deadline:
            select.select([self.listener], [], [], 0.05)
            self.listener.poll()
            self.channels.extend(n.channel for n in self.listener.notifies)
            self.listener.notifies.clear()
        self.assertIn(channel, self.channels)

    def test_blocking_path_is_the_same_statement(self):
        """
        qvd-admin's path (a psycopg2 cursor in its transaction) runs the very
        statements the daemons run: a start through it is seen by the
        async store, and the other way round.
        """
        node = self.add_host("n1")
        vm = self.add_vm()
        with sync.connect(pg.role_dsn(self.dbname, "admin")) as conn:
            def start(cur):
                ex = runtime_store.BlockingCursor(cur)
                return runtime_store.run_blocking(runtime_store.start_vm_in(ex, vm, node))
            self.assertEqual(sync.transaction(conn, start), node)
        self.assertEqual(self.row(vm)["vm_cmd"], "start")
        self.assertNotified(f"qvd_cmd_for_vm_on_host{node}")

    def test_run_blocking_refuses_a_suspending_statement(self):
        async def suspends():
            import asyncio
            await asyncio.sleep(0)
        with self.assertRaises(RuntimeError):
            runtime_store.run_blocking(suspends())
