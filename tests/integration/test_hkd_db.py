"""
The HKD service against the real PostgreSQL (qvd.testing.pg), with the fake
hypervisor and fake agents: commands, adoption, the cluster monitor, sessions
of dead L7Rs and a PostgreSQL restart.
"""

import gc
import os

import psycopg2
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from qvd.hkd.cluster import ClusterMonitor
from qvd.hkd.lock import LockHeld, NodeLock
from qvd.db.pool import Database
from qvd.testing import pg
from qvd.testing.fakevirt import FakeHypervisor, FakeVMA
from qvd.testing.hkd import HKDTestMixin, hkd_config


def _starts(hv, vm_id=None):
    return [v for c, v in hv.calls if c == "start" and (vm_id is None or v == vm_id)]


class CommandTests(HKDTestMixin, pg.DatabaseTestMixin, unittest.TestCase):

    async def test_start_and_stop(self):
        """
        vm_cmd='start' + NOTIFY makes the VM running with its runtime row
        filled in; vm_cmd='stop' makes it stopped and released, with nothing
        left on the driver. The node row shows running, the hypervisor, pid
        and capacity.
        """
        host = self.add_host()
        vm = self.add_vm()
        hkd = await self.start_hkd(host)
        node = self.query("SELECT * FROM host_runtimes WHERE host_id = %s", (host,))[0]
        self.assertEqual((node["state"], node["hypervisor"], node["pid"]),
                         ("running", "nothing", os.getpid()))
        self.assertGreater(node["usable_ram"], 0)
        self.assertGreater(node["usable_cpu"], 0)

        self.command(vm, "start", host)
        row = await self.wait_state(vm, "running", timeout=5)
        vms = self.query("SELECT host(ip) AS ip, osf_id FROM vms WHERE id = %s", (vm,))[0]
        self.assertEqual((row["vm_address"], row["vm_vma_port"], row["vm_x_port"]),
                         (vms["ip"], 3030, 4100))
        self.assertEqual(row["current_osf_id"], vms["osf_id"])
        self.assertIsNotNone(row["current_di_id"])
        self.assertIsNone(row["vm_cmd"])
        counters = self.query("SELECT * FROM vm_counters WHERE vm_id = %s", (vm,))[0]
        self.assertEqual((counters["run_attempts"], counters["run_ok"]), (1, 1))

        self.command(vm, "stop", host)
        row = await self.wait_state(vm, "stopped", timeout=5)
        for column in ("host_id", "vm_address", "vm_vma_port", "vm_x_port", "vm_cmd",
                       "current_di_id", "vm_expiration_hard"):
            self.assertIsNone(row[column], column)
        self.assertEqual(hkd.hv.running, {})
        self.assertEqual(hkd.hv.prepared, {})

    async def test_concurrent_start_commands_start_once(self):
        """
        Start commands that arrive together (NOTIFYs, polls, a repeated
        command while it runs) start the VM once.
        """
        host = self.add_host()
        vm = self.add_vm()
        hkd = await self.start_hkd(host)
        self.command(vm, "start", host)
        await defer.gatherResults([hkd.check_commands(), hkd.check_commands(), hkd.poll()])
        await self.wait_state(vm, "running")
        self.command(vm, "start", host)
        await hkd.poll()
        await task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(_starts(hkd.hv), [vm])
        self.assertEqual(self.vm_row(vm)["vm_state"], "running")

    async def test_starting_max(self):
        """
        With hkd.vm.starting.max = 1, three start commands are served one at
        a time: a second prepare only begins once the first VM is running.
        """
        host = self.add_host()
        vms = [self.add_vm(f"u{i}") for i in range(3)]
        hv = FakeHypervisor(reactor)
        hv.delay["prepare"] = 0.3
        await self.start_hkd(host, hv=hv, config=hkd_config(hkd__vm__starting__max=1))
        for vm in vms:
            self.command(vm, "start", host)
        await task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(len([c for c, _ in hv.calls if c == "prepare"]), 1)
        pending = self.query("SELECT count(*) AS n FROM vm_runtimes WHERE vm_cmd = 'start'")
        self.assertEqual(pending[0]["n"], 2)
        for vm in vms:
            await self.wait_state(vm, "running")
        self.assertEqual(sorted(_starts(hv)), sorted(vms))

    async def test_missing_di_recorded(self):
        """
        A VM whose DI tag does not exist ends stopped with the reason in
        vm_state_reason.
        """
        host = self.add_host()
        vm = self.add_vm(di_tag="nope")
        await self.start_hkd(host)
        self.command(vm, "start", host)
        await self.until(lambda: self.vm_row(vm)["vm_state_reason"], what="a reason")
        row = await self.wait_state(vm, "stopped")
        self.assertIn("no usable disk image", row["vm_state_reason"])
        self.assertIn("'nope'", row["vm_state_reason"])
        self.assertIsNone(row["host_id"])

    async def test_silent_agent(self):
        """
        A VM whose agent never answers is stopped after hkd.vm.timeout.waiting_vma.
        """
        host = self.add_host()
        vm = self.add_vm()
        hkd = await self.start_hkd(host, config=hkd_config(hkd__vm__timeout__waiting_vma=0.5))
        hkd.vma.silent.add(self.query("SELECT host(ip) AS ip FROM vms")[0]["ip"])
        self.command(vm, "start", host)
        await self.until(lambda: self.vm_row(vm)["vm_state_reason"], what="a reason")
        row = await self.wait_state(vm, "stopped", timeout=5)
        self.assertIn("agent did not answer", row["vm_state_reason"])
        self.assertEqual(hkd.hv.running, {})

    async def test_hard_expiration(self):
        """
        A running VM whose hard expiration has passed is stopped.
        """
        host = self.add_host()
        vm = self.add_vm()
        await self.start_hkd(host)
        self.command(vm, "start", host)
        await self.wait_state(vm, "running")
        self.query("UPDATE vm_runtimes SET vm_expiration_hard = now() - interval '1 s'")
        row = await self.wait_state(vm, "stopped")
        self.assertIn("hard expiration", row["vm_state_reason"])

    async def test_node_stop_command(self):
        """
        host_runtimes.cmd='stop' + NOTIFY qvd_cmd_for_host<id> stops every VM,
        marks the node stopped and ends the daemon.
        """
        host = self.add_host()
        vm = self.add_vm()
        ended = defer.Deferred()
        hkd = await self.start_hkd(host, on_node_stopped=lambda: ended.callback(None))
        self.command(vm, "start", host)
        await self.wait_state(vm, "running")
        self.query("UPDATE host_runtimes SET cmd = 'stop' WHERE host_id = %s", (host,))
        self.query(f"NOTIFY qvd_cmd_for_host{host}")
        await self.within(5, ended)
        self.assertEqual(self.vm_row(vm)["vm_state"], "stopped")
        self.assertEqual(hkd.hv.running, {})
        node = self.query("SELECT state, cmd FROM host_runtimes")[0]
        self.assertEqual((node["state"], node["cmd"]), ("stopped", None))


class RestartTests(HKDTestMixin, pg.DatabaseTestMixin, unittest.TestCase):

    def flushConnectionNoise(self):
        """
        txpostgres leaves an unhandled "cursor already closed" failure behind
        when a transaction's connection is killed under it (its rollback path);
        the HKD itself handled the error (logged, retried). Collect and drop it.
        """
        gc.collect()
        self.flushLoggedErrors(psycopg2.InterfaceError)

    async def test_restart_adopts_and_reaps(self):
        """
        After an HKD stop (SIGTERM) the VMs keep running; a new HKD adopts
        the running ones without restarting them, reaps one that died in the
        meantime (stopped, with a reason) and kills a container nobody owns.
        """
        host = self.add_host()
        vms = [self.add_vm(f"u{i}") for i in range(3)]
        hv = FakeHypervisor(reactor)
        hkd = await self.start_hkd(host, hv=hv)
        for vm in vms:
            self.command(vm, "start", host)
        for vm in vms:
            await self.wait_state(vm, "running")
        await hkd.stopService()
        self.assertEqual(self.query("SELECT state FROM host_runtimes")[0]["state"], "stopped")
        self.assertEqual(sorted(hv.running), sorted(vms))
        hv.die(vms[2])
        hv.seed(9999)
        calls = len(hv.calls)

        hkd2 = await self.start_hkd(host, hv=hv, vma=FakeVMA(hv))
        row = await self.wait_state(vms[2], "stopped")
        self.assertIn("not running when the HKD started", row["vm_state_reason"])
        await self.until(lambda: 9999 not in hv.running, what="zombie killed")
        for vm in vms[:2]:
            self.assertEqual(self.vm_row(vm)["vm_state"], "running")
            self.assertEqual(hkd2.supervisors[vm].state, "running")
        self.assertEqual([c for c, _ in hv.calls[calls:] if c in ("prepare", "start")], [])
        # the adopted VMs are supervised: a stop works
        self.command(vms[0], "stop", host)
        await self.wait_state(vms[0], "stopped")
        self.assertNotIn(vms[0], hv.running)

    async def test_survives_postgresql_restart(self):
        """
        The HKD survives a restart of PostgreSQL: heartbeats resume, the
        listener re-subscribes and a start command sent afterwards is served.
        """
        host = self.add_host()
        vm = self.add_vm()
        await self.start_hkd(host)
        cluster = pg.cluster()
        cluster.stop()
        try:
            await task.deferLater(reactor, 1.0, lambda: None)
        finally:
            cluster.start()
        before = self.query("SELECT now() AS t")[0]["t"]
        await self.until(lambda: self.query(
            "SELECT ok_ts > %s AS ok FROM host_runtimes", (before,))[0]["ok"],
            what="a heartbeat after the restart")
        self.command(vm, "start", host)
        await self.wait_state(vm, "running", timeout=10)
        self.flushConnectionNoise()

    async def test_survives_terminated_connections(self):
        """
        Connections killed by PostgreSQL (pg_terminate_backend) while VMs run
        do not disturb the HKD: a stop command afterwards is served.
        """
        host = self.add_host()
        vm = self.add_vm()
        await self.start_hkd(host)
        self.command(vm, "start", host)
        await self.wait_state(vm, "running")
        self.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                   " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        await task.deferLater(reactor, 1.0, lambda: None)
        self.command(vm, "stop", host)
        await self.wait_state(vm, "stopped", timeout=10)
        self.flushConnectionNoise()


class ClusterTests(HKDTestMixin, pg.DatabaseTestMixin, unittest.TestCase):

    def lost_node(self):
        """
        A second node whose lease ran out an hour ago, running a VM with a
        connected session through its own L7R.
        """
        other = self.add_host("node2")
        self.query("INSERT INTO host_runtimes (host_id, state, ok_ts, lease_expires) VALUES"
                   " (%s, 'running', now() - interval '1 hour', now() - interval '1 hour')",
                   (other,))
        vm = self.add_vm("bob")
        self.query("UPDATE vm_runtimes SET host_id = %s, vm_state = 'running',"
                   " vm_address = '10.8.0.1', user_state = 'connected',"
                   " l7r_host_id = %s, l7r_pid = 4242 WHERE vm_id = %s", (other, other, vm))
        return other, vm

    async def test_lost_node_released(self):
        """
        The cluster monitor marks a node with an old heartbeat lost, releases
        its VMs (stopped, host NULL) and disconnects sessions routed via it.
        """
        host = self.add_host()
        other, vm = self.lost_node()
        await self.start_hkd(host)
        await self.until(lambda: self.query(
            "SELECT state FROM host_runtimes WHERE host_id = %s", (other,))[0]["state"] == "lost",
            what="node2 lost")
        row = self.vm_row(vm)
        self.assertEqual((row["vm_state"], row["host_id"], row["user_state"], row["l7r_host_id"]),
                         ("stopped", None, "disconnected", None))
        self.assertIn("was lost", row["vm_state_reason"])
        self.assertEqual(self.query("SELECT state FROM host_runtimes WHERE host_id = %s",
                                    (host,))[0]["state"], "running")

    async def test_lost_node_comes_back(self):
        """
        A node that was marked lost (its VMs released) notices at its next
        heartbeat, kills its local copies of the released VMs and is running
        again.
        """
        host = self.add_host()
        vm = self.add_vm()
        hkd = await self.start_hkd(host)
        self.command(vm, "start", host)
        await self.wait_state(vm, "running")
        self.query("UPDATE host_runtimes SET state = 'lost' WHERE host_id = %s", (host,))
        self.query("UPDATE vm_runtimes SET vm_state = 'stopped', host_id = NULL")
        await self.until(lambda: not hkd.hv.running, what="local copy killed")
        await self.until(lambda: self.query(
            "SELECT state FROM host_runtimes WHERE host_id = %s", (host,))[0]["state"]
            == "running", what="node running again")
        self.assertEqual(self.vm_row(vm)["vm_state"], "stopped")

    async def test_fence(self):
        """
        A node that cannot renew its lease for hkd.lease.seconds minus
        hkd.lease.fence.margin kills its VMs (another node may start them
        once the lease has run out).
        """
        host = self.add_host()
        vm = self.add_vm()
        hkd = await self.start_hkd(host, config=hkd_config(hkd__lease__seconds=1.5,
                                                           hkd__lease__fence__margin=0.5))
        self.command(vm, "start", host)
        await self.wait_state(vm, "running")
        hkd.store.tick = lambda pid, lease=0: defer.fail(RuntimeError("database unreachable (test)"))
        await self.until(lambda: not hkd.hv.running, what="VM killed by the fence")
        self.flushLoggedErrors(RuntimeError)

    async def test_lost_only_after_lease_and_margin(self):
        """
        The monitor declares a node lost only once its lease ran out more
        than hkd.lease.release.margin ago (database clock): not while it runs,
        not within the margin, never without a lease; a stopped node is lost
        only while it still holds VMs.
        """
        host = self.add_host()
        nodes = {}
        for name, state, lease, holds in [
                ("valid", "running", "now() + interval '5 s'", False),
                ("margin", "running", "now() - interval '0.2 s'", False),
                ("nolease", "running", "NULL", False),
                ("expired", "running", "now() - interval '3 s'", False),
                ("stopped", "stopped", "now() - interval '3 s'", False),
                ("stopped_vms", "stopped", "now() - interval '3 s'", True)]:
            other = self.add_host(name)
            self.query("INSERT INTO host_runtimes (host_id, state, lease_expires) VALUES"
                       f" (%s, %s, {lease})", (other, state))
            if holds:
                vm = self.add_vm(f"u{name}")
                self.query("UPDATE vm_runtimes SET host_id = %s, vm_state = 'running'"
                           " WHERE vm_id = %s", (other, vm))
            nodes[name] = other
        await self.start_hkd(host, config=hkd_config(hkd__lease__release__margin=1))
        await self.until(lambda: self.query(
            "SELECT state FROM host_runtimes WHERE host_id = %s",
            (nodes["stopped_vms"],))[0]["state"] == "lost", what="stopped node with VMs lost")
        states = {name: self.query("SELECT state FROM host_runtimes WHERE host_id = %s",
                                   (other,))[0]["state"] for name, other in nodes.items()}
        self.assertEqual(states, {"valid": "running", "margin": "running",
                                  "nolease": "running", "expired": "lost",
                                  "stopped": "stopped", "stopped_vms": "lost"})

    async def test_feeds_and_releases_the_fencer(self):
        """
        The HKD feeds the fencer the lease's local deadline at its start and
        every heartbeat (and makes sure one runs); a clean stop without
        desktops releases it.
        """
        class Fencer:
            def __init__(self):
                self.fed, self.ensured, self.released = [], 0, 0

            def feed(self, deadline):
                self.fed.append(deadline)

            def ensure(self):
                self.ensured += 1

            def release(self):
                self.released += 1
        fencer = Fencer()
        host = self.add_host()
        hkd = await self.start_hkd(host, fencer=fencer, monotonic=lambda: 1000.0)
        await self.until(lambda: len(fencer.fed) >= 3, what="three renewals")
        self.assertEqual(set(fencer.fed), {1010.0})
        self.assertEqual(fencer.ensured, len(fencer.fed))
        await hkd.stopService()
        self.assertEqual(fencer.released, 1)

    async def test_singleton(self):
        """
        Of two cluster monitors only one holds the advisory lock; when its
        connection goes, the other takes over.
        """
        h1, h2 = self.add_host("a"), self.add_host("b")
        dsn = pg.role_dsn(self.dbname, "hkd")
        db = Database(dsn, reactor)
        self.addCleanup(db.stop)
        m1 = ClusterMonitor(dsn, db, reactor, h1)
        m2 = ClusterMonitor(dsn, db, reactor, h2)
        self.addCleanup(m1.stop)
        self.addCleanup(m2.stop)
        await m1.tick()
        await m2.tick()
        self.assertEqual((m1.holding, m2.holding), (True, False))
        await m1.stop()
        await task.deferLater(reactor, 0.1, lambda: None)
        await m2.tick()
        self.assertTrue(m2.holding)

    async def test_dead_l7r_session_reset(self):
        """
        A session recorded as routed through an L7R process of this node that
        no longer exists is reset to disconnected; one of a live pid is kept.
        """
        host = self.add_host()
        dead, live = self.add_vm("c"), self.add_vm("d")
        for vm, pid in ((dead, 999999), (live, os.getpid())):
            self.query("UPDATE vm_runtimes SET user_state = 'connected', l7r_host_id = %s,"
                       " l7r_pid = %s, user_cmd = 'abort' WHERE vm_id = %s", (host, pid, vm))
        await self.start_hkd(host, pid_alive=lambda pid: pid != 999999)
        await self.until(lambda: self.vm_row(dead)["user_state"] == "disconnected",
                         what="session reset")
        row = self.vm_row(dead)
        self.assertEqual((row["l7r_host_id"], row["l7r_pid"], row["user_cmd"]), (None, None, None))
        self.assertEqual(self.vm_row(live)["user_state"], "connected")


class LockTests(unittest.TestCase):

    def test_second_lock_refused(self):
        """
        A second HKD for the same node is refused with the holder's pid.
        """
        path = os.path.join(self.mktemp(), "hkd.lock")
        first = NodeLock(path)
        first.acquire()
        self.addCleanup(first.release)
        with self.assertRaises(LockHeld) as e:
            NodeLock(path).acquire()
        self.assertIn(str(os.getpid()), str(e.exception))
        first.release()
        again = NodeLock(path)
        again.acquire()
        again.release()
