"""
The HKD store's suite (qvd.testing.hkd_store_suite) against the real store
on PostgreSQL, as the HKD's role, and against the fake the supervisor's
tests use.
"""

import itertools

from twisted.internet import defer, reactor
from twisted.trial import unittest

from qvd.db.pool import Database
from qvd.hkd.store import StartError, Store
from qvd.testing import pg
from qvd.testing.fakestore import FakeStore
from qvd.testing.hkd_store_suite import HKDStoreTests


class FakeHKDStoreTests(HKDStoreTests, unittest.TestCase):

    def setUp(self):
        self.node, self.other = 1, 2
        self.store = FakeStore(host_id=self.node)

    def add_vm(self, **fields):
        return self.store.add_vm(**fields)

    def vm(self, vm_id):
        return self.store.vms[vm_id]

    def set_node(self, state=None, cmd=None):
        if state is not None:
            self.store.node["state"] = state
        if cmd is not None:
            self.store.node["cmd"] = cmd

    def lease_left(self):
        return self.store.node.get("lease")

    def node_load(self):
        load = (None, None)
        for reported in self.store.loads_reported:
            load = (load[0] if reported.free_ram is None else reported.free_ram,
                    load[1] if reported.cpu_idle is None else reported.cpu_idle)
        return load

    def set_other(self, state, heartbeat_age):
        self.store.other_nodes = int(state == "running" and heartbeat_age < 10)


class RealHKDStoreTests(HKDStoreTests, pg.DatabaseTestMixin, unittest.TestCase):

    def setUp(self):
        super().setUp()
        self._n = itertools.count(1)
        self.node = self.add_host("n1")
        self.other = self.add_host("n2")
        self.user = self.query("INSERT INTO users (tenant_id, login, password)"
                               " VALUES (1, 'u', 'x') RETURNING id")[0]["id"]
        osf = self.query("INSERT INTO osfs (tenant_id, name) VALUES (1, 'o') RETURNING id")
        self.osf = osf[0]["id"]
        di = self.query("INSERT INTO dis (osf_id, path, version) VALUES (%s, 'd.tar', '1')"
                        " RETURNING id", (self.osf,))[0]["id"]
        self.query("INSERT INTO di_tags (di_id, osf_id, tag) VALUES (%s, %s, 'default')",
                   (di, self.osf))
        self.db = Database(pg.role_dsn(self.dbname, "hkd"), reactor, size=2)
        self.addCleanup(self.db.stop)
        self.store = Store(self.db, self.node)
        return self.db.start()

    def add_host(self, name):
        host = self.query("INSERT INTO hosts (name, address) VALUES (%s, %s) RETURNING id",
                          (name, f"10.7.0.{next(self._n)}"))[0]["id"]
        self.query("INSERT INTO host_runtimes (host_id) VALUES (%s)", (host,))
        return host

    def add_vm(self, host_id=None, vm_state="stopped", vm_cmd=None):
        n = next(self._n)
        vm = self.query("INSERT INTO vms (name, user_id, osf_id, ip, mac) VALUES"
                        " (%s, %s, %s, %s, %s) RETURNING id",
                        (f"vm{n}", self.user, self.osf, f"10.6.0.{n}",
                         f"02:00:00:00:01:{n:02x}"))[0]["id"]
        # oldest first: each VM's state is a second older than the next one's
        self.query("INSERT INTO vm_runtimes (vm_id, host_id, vm_state, vm_cmd, vm_state_ts)"
                   " VALUES (%s, %s, %s, %s, now() - make_interval(secs => %s))",
                   (vm, host_id, vm_state, vm_cmd, 1000 - n))
        return vm

    def vm(self, vm_id):
        return self.query("SELECT host_id, vm_state, vm_cmd, vm_state_reason FROM vm_runtimes"
                          " WHERE vm_id = %s", (vm_id,))[0]

    def set_node(self, state=None, cmd=None):
        if state is not None:
            self.query("UPDATE host_runtimes SET state = %s WHERE host_id = %s",
                       (state, self.node))
        if cmd is not None:
            self.query("UPDATE host_runtimes SET cmd = %s WHERE host_id = %s", (cmd, self.node))

    def node_load(self):
        row = self.query("SELECT free_ram, cpu_idle FROM host_runtimes WHERE host_id = %s",
                         (self.node,))[0]
        return row["free_ram"], row["cpu_idle"]

    def set_other(self, state, heartbeat_age):
        self.query("UPDATE host_runtimes SET state = %s, ok_ts = now() - make_interval(secs => %s)"
                   " WHERE host_id = %s", (state, heartbeat_age, self.other))

    def lease_left(self):
        left = self.query("SELECT extract(epoch FROM lease_expires - now())::float AS s"
                          " FROM host_runtimes WHERE host_id = %s", (self.node,))[0]["s"]
        return left

    @defer.inlineCallbacks
    def test_load_for_start_released_meanwhile(self):
        """
        A VM released from this node between the load's read and its write is
        not started: the write's own condition sees the release.
        """
        mine = self.add_vm(host_id=self.node, vm_state="starting")
        read = self.store._vm_row

        async def read_then_release(cur, vm_id):
            row = await read(cur, vm_id)
            self.query("UPDATE vm_runtimes SET host_id = NULL, vm_state = 'stopped'"
                       " WHERE vm_id = %s", (vm_id,))
            return row
        self.store._vm_row = read_then_release
        e = yield self.assertFailure(self.store.load_for_start(mine), StartError)
        self.assertIn("no longer assigned to this node", str(e))
        self.assertIsNone(self.vm(mine)["host_id"])

    @defer.inlineCallbacks
    def test_loads_for_start_together(self):
        """
        VMs starting together load without failing each other's transactions
        (no serialization retry), each with its own secret.
        """
        import qvd.db.pool
        retries = []
        real_uniform = qvd.db.pool.random.uniform
        self.patch(qvd.db.pool.random, "uniform",
                   lambda a, b: (retries.append(b), real_uniform(a, b))[1])
        db = Database(pg.role_dsn(self.dbname, "hkd"), reactor, size=5)
        self.addCleanup(db.stop)
        store = Store(db, self.node)
        vms = [self.add_vm(host_id=self.node, vm_state="starting") for _ in range(5)]
        specs = yield defer.gatherResults([store.load_for_start(v) for v in vms])
        self.assertEqual([s.vm_id for s in specs], vms)
        self.assertEqual(len({s.vma_secret for s in specs}), 5)
        self.assertEqual(retries, [])
