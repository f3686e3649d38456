"""
The cluster monitor: one HKD of the cluster at a time marks silent nodes
'lost' and releases their VMs so they can start elsewhere (reference 4.2).

    monitor = ClusterMonitor(dsn, db, reactor, host_id=3, margin=2, interval=2)
    monitor.start()
    ...
    monitor.stop()

The singleton is claimed with a session-level PostgreSQL advisory lock held on
a connection of its own (Buildbot's ClusteredBuildbotService does the same
through its database): whoever holds it checks every C{interval} seconds; if
that connection dies, PostgreSQL drops the lock and another HKD takes over at
its next attempt.

Each check, in one transaction:
  - nodes other than this one whose lease (C{host_runtimes.lease_expires},
    renewed by their heartbeats) ran out more than C{margin} seconds ago by
    the database clock become 'lost' (those not stopped, and stopped ones
    still holding VMs): by then they have stopped their desktops themselves
    (L{qvd.hkd.fencer});
  - their VMs become 'stopped' with host, ports, address, command, expirations
    and DI cleared, and the reason recorded;
  - sessions routed through a lost node's L7R become 'disconnected';
    sessions of a released VM held by a live L7R get C{user_cmd='abort'} and
    their L7R's node is notified (channel qvd_cmd_for_user_on_host<id>).
"""

from twisted.internet import defer, task
from qvd.logs import Logger

from qvd.db.pool import Connection, fetch_dicts
from qvd.runtime import store as runtime_store

log = Logger()

#: the advisory lock key of the cluster monitor ('qvdCM' in ASCII)
LOCK_KEY = 0x7176_6443_4D


class ClusterMonitor:
    def __init__(self, dsn, db, reactor, host_id, margin=2.0, interval=2.0):
        self.dsn = dsn
        self.db = db
        self.reactor = reactor
        self.host_id = host_id
        self.margin = margin
        self.interval = interval
        self.holding = False
        self._conn = None
        self._loop = None
        self._busy = False

    def start(self):
        self._loop = task.LoopingCall(self.tick)
        self._loop.clock = self.reactor
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("cluster monitor loop died", f))

    def stop(self):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._drop()
        return defer.succeed(None)

    def _drop(self):
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
        self._conn = None
        if self.holding:
            log.info("cluster monitor: lock released")
        self.holding = False

    @defer.inlineCallbacks
    def _claim(self):
        if self._conn is None or self._conn.closed:
            self.holding = False
            conn = Connection(reactor=self.reactor)
            conn.lostCallback = lambda reason, conn=conn: self._lost(conn)
            yield conn.connect(self.dsn)
            self._conn = conn
        if not self.holding:
            rows = yield self._conn.runQuery("SELECT pg_try_advisory_lock(%s)", (LOCK_KEY,))
            self.holding = bool(rows[0][0])
            if self.holding:
                log.info("cluster monitor: this node (host {host_id}) is the cluster monitor",
                         host_id=self.host_id)
        else:
            yield self._conn.runQuery("SELECT 1")
        return self.holding

    def _lost(self, conn):
        if conn is self._conn:
            self._conn = None
            self.holding = False

    @defer.inlineCallbacks
    def tick(self):
        """
        Claim the singleton if free; if held, check the cluster once.
        Fires with the ids of the nodes marked lost (or None when not held).
        """
        if self._busy:
            return None
        self._busy = True
        try:
            try:
                held = yield self._claim()
            except Exception as e:
                log.warn("cluster monitor: cannot reach the database ({error})",
                         error=str(e).strip())
                self._drop()
                return None
            if not held:
                return None
            try:
                lost = yield self.check()
            except Exception as e:
                log.warn("cluster monitor: check failed ({error})", error=str(e).strip())
                return None
            return lost
        finally:
            self._busy = False

    def check(self):
        """
        One check (see the module docstring). Fires with the lost node ids.
        """
        async def txn(cur):
            ex = runtime_store.TransactionExecutor(cur)
            lost = await runtime_store.mark_lost_nodes_in(ex, self.host_id, self.margin)
            if not lost:
                return [], []
            await runtime_store.reset_claims_of_nodes_in(ex, lost)
            notify = await runtime_store.abort_sessions_on_nodes_in(ex, lost)
            released = await runtime_store.release_vms_of_nodes_in(ex, lost)
            for host in notify:
                await cur.execute(f"NOTIFY qvd_cmd_for_user_on_host{int(host)}")
            await cur.execute(
                "SELECT h.id, h.name, r.ok_ts, r.lease_expires FROM hosts h JOIN host_runtimes r"
                " ON r.host_id = h.id WHERE h.id = ANY(%s)", (lost,))
            return fetch_dicts(cur), released

        def report(result):
            nodes, released = result
            for node in nodes:
                log.error("cluster monitor: node {name} (host {id}) is lost: its lease ran out "
                          "at {lease_expires} (last heartbeat {ok_ts}); its VMs were released",
                          **node)
            if released:
                log.info("cluster monitor: released VMs {vms}", vms=released)
            return [n["id"] for n in nodes]
        return self.db.transaction(txn).addCallback(report)
