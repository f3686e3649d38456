"""
Helpers for tests that run a real HKD service in-process against the test
database (qvd.testing.pg).

    class T(HKDTestMixin, DatabaseTestMixin, unittest.TestCase):
        async def test_x(self):
            host = self.add_host("node1")
            vm = self.add_vm("alice")
            hkd = await self.start_hkd(host)           # fake driver + fake agents
            self.command(vm, "start", host)
            await self.wait_state(vm, "running")
"""

import atexit
import os
import subprocess
import sys
import tempfile

from twisted.internet import defer, reactor, task

from qvd.config import Config, declared_keys
from qvd.db.listen import Listener
from qvd.db.pool import Database
from qvd.hkd.node import HKD
from qvd.testing import pg
from qvd.testing.processes import stop_fencer
from qvd.testing.fakevirt import FakeHypervisor, FakeVMA

#: fast settings for tests; any key may be overridden per test
FAST = {
    "hkd.ticker.interval": "0.2",
    "hkd.command.poll.interval": "30",
    "hkd.database.retry.delay": "0.2",
    "hkd.vm.vma.ping.starting": "0.05",
    "hkd.vm.vma.ping.interval": "0.2",
    "hkd.vm.vma.dead.failures": "2",
    "hkd.vm.vma.dead.seconds": "0.5",
    "hkd.vm.timeout.waiting_vma": "3",
    "hkd.vm.timeout.powering_off": "1",
    "hkd.vm.timeout.shutting_down": "1",
    "hkd.vm.expiration.interval": "0.2",
    "hkd.l7r.check.interval": "0.2",
    "hkd.cluster.check.interval": "0.2",
    "hkd.lease.seconds": "10",
    "hkd.lease.fence.margin": "3",
    "hkd.lease.release.margin": "0.5",
    "database.listen.keepalive": "0.5",
    "path.storage.images": "/nonexistent/images",
    # this process's own nftables table, removed at exit (tests kill HKDs)
    "vm.network.firewall.table": f"qvdt_hkd{os.getpid()}",
}


@atexit.register
def _drop_nft_table():
    subprocess.run(["nft", "delete", "table", "bridge", FAST["vm.network.firewall.table"]],
                   capture_output=True)


def hkd_config(**overrides):
    values = dict(FAST)
    values.update({k.replace("__", "."): str(v) for k, v in overrides.items()})
    if "hkd.lock.path" not in values:
        values["hkd.lock.path"] = os.path.join(tempfile.mkdtemp(prefix="qvdt-hkd-"), "hkd.lock")
    config = Config(keys=declared_keys(), node=values)
    config.validate(values, "the test")
    return config


_TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
_TREE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class HKDTestMixin:
    """
    Needs C{self.query} and C{self.dsn} (L{qvd.testing.pg.DatabaseTestMixin}).
    """
    _ips = 0

    def add_host(self, name="node1", address=None):
        HKDTestMixin._ips += 1
        address = address or f"10.9.{HKDTestMixin._ips // 250}.{HKDTestMixin._ips % 250 + 1}"
        return self.query("INSERT INTO hosts (name, address) VALUES (%s, %s) RETURNING id",
                          (name, address))[0]["id"]

    def add_osf(self, name="desktop", di_path="test.tar", tag="default", blocked=False):
        osf = self.query("INSERT INTO osfs (tenant_id, name) VALUES (1, %s) RETURNING id",
                         (name,))[0]["id"]
        di = self.query("INSERT INTO dis (osf_id, path, version, blocked) VALUES"
                        " (%s, %s, '1', %s) RETURNING id", (osf, di_path, blocked))[0]["id"]
        self.query("INSERT INTO di_tags (di_id, osf_id, tag) VALUES (%s, %s, %s)",
                   (di, osf, tag))
        return osf, di

    def add_vm(self, login="alice", osf=None, ip=None, di_tag="default"):
        HKDTestMixin._ips += 1
        n = HKDTestMixin._ips
        if osf is None:
            osf = getattr(self, "_osf", None)
            if osf is None:
                osf = self._osf = self.add_osf()[0]
        user = self.query("INSERT INTO users (tenant_id, login) VALUES (1, %s)"
                          " ON CONFLICT (login, tenant_id) DO UPDATE SET login = EXCLUDED.login"
                          " RETURNING id", (login,))[0]["id"]
        ip = ip or f"10.8.{n // 250}.{n % 250 + 1}"
        mac = "54:52:00:%02x:%02x:%02x" % (n >> 16 & 255, n >> 8 & 255, n & 255)
        vm = self.query("INSERT INTO vms (name, user_id, osf_id, ip, mac, di_tag) VALUES"
                        " (%s, %s, %s, %s, %s, %s) RETURNING id",
                        (f"vm{n}", user, osf, ip, mac, di_tag))[0]["id"]
        self.query("INSERT INTO vm_runtimes (vm_id) VALUES (%s)", (vm,))
        self.query("INSERT INTO vm_counters (vm_id) VALUES (%s)", (vm,))
        return vm

    def command(self, vm_id, cmd, host_id, notify=True):
        """
        What the L7R / qvd-admin do: assign the host, set vm_cmd, NOTIFY.
        """
        self.query("UPDATE vm_runtimes SET host_id = %s, vm_cmd = %s WHERE vm_id = %s",
                   (host_id, cmd, vm_id))
        if notify:
            self.query(f"NOTIFY qvd_cmd_for_vm_on_host{int(host_id)}")

    def vm_row(self, vm_id):
        return self.query("SELECT * FROM vm_runtimes WHERE vm_id = %s", (vm_id,))[0]

    def twistd(self):
        """
        Run C{twistd -n qvd-hkd} as a process on the node values C{self.values},
        as node1, against this test's database; its log is C{self.root}/hkd.log.
        Killed at cleanup if still running. Needs L{pg.DatabaseTestMixin}.
        """
        cluster = pg.cluster()
        conf = os.path.join(self.root, "node.conf")
        with open(conf, "w") as f:
            for key, value in self.values.items():
                f.write(f"{key} = {value}\n")
            f.write(f"nodename = node1\ndatabase.host = {cluster.socketdir}\n"
                    f"database.name = {self.dbname}\n")
        env = dict(os.environ, PYTHONPATH=_TREE + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.Popen(
            [_TWISTD, "-n", "--pidfile=", "-l", os.path.join(self.root, "hkd.log"),
             "qvd-hkd", "--config", conf], env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run = self.values.get("path.run", "/run/qvd")
        self.addCleanup(stop_fencer, self.values.get("hkd.lease.path", f"{run}/hkd-fence"))
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        return proc

    def node_state(self):
        rows = self.query("SELECT state FROM host_runtimes WHERE host_id = %s", (self.host,))
        return rows[0]["state"] if rows else None

    async def start_hkd(self, host_id, hv=None, vma=None, config=None, **kw):
        """
        A real HKD service with the fake driver and fake agents (or those
        given), started and running; stopped at the end of the test.
        """
        config = config or hkd_config()
        hv = hv if hv is not None else FakeHypervisor(reactor)
        vma = vma if vma is not None else FakeVMA(hv)
        dsn = pg.role_dsn(self.dbname, "hkd")
        db = Database(dsn, reactor)
        listener = Listener(dsn, reactor, keepalive=0.5, max_backoff=0.5)
        hkd = HKD(config, reactor, db, listener, hv, vma, host_id, dsn=dsn, **kw)
        hkd.hv, hkd.vma = hv, vma
        hkd.startService()
        self.addCleanup(lambda: defer.ensureDeferred(self._stop_hkd(hkd, db)))
        await self.within(10, hkd.ready)
        return hkd

    async def _stop_hkd(self, hkd, db):
        """
        Stop the HKD and wait until its database connections are closed, so
        that dropping the test database never kills a transaction under it
        (txpostgres logs a failed rollback as an unhandled error then).
        """
        if hkd.running:
            await hkd.stopService()
        waited = 0.0
        while db._open > 0 and waited < 10:
            await task.deferLater(reactor, 0.05, lambda: None)
            waited += 0.05

    async def within(self, seconds, d):
        timer = reactor.callLater(seconds, d.cancel)
        try:
            return await d
        finally:
            if timer.active():
                timer.cancel()

    async def until(self, predicate, timeout=10.0, what="condition"):
        """
        Poll C{predicate()} (may return a Deferred) every 50 ms until true.
        """
        waited = 0.0
        while True:
            try:
                value = await defer.maybeDeferred(predicate)
            except Exception:
                value = None
            if value:
                return value
            if waited >= timeout:
                self.fail(f"{what} not reached within {timeout} s")
            await task.deferLater(reactor, 0.05, lambda: None)
            waited += 0.05

    async def wait_state(self, vm_id, state, timeout=10.0):
        return await self.until(
            lambda: self.vm_row(vm_id)["vm_state"] == state and self.vm_row(vm_id),
            timeout, f"VM {vm_id} in state {state!r}")
