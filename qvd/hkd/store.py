"""
The HKD's database access, over a L{qvd.db.pool.Database}: what it reads
to start a VM, and the statements that move VM commands, VM states, the
node's state and sessions, which are L{qvd.runtime.store}'s (one copy for
every program).

    store = Store(db, host_id=3, settings=StoreSettings.from_config(config))
    spec = await store.load_for_start(vm_id)     # VMSpec, or raises StartError
    await store.save_state(vm_id, "running", None)

Writes about a VM always carry C{host_id = me}: once the cluster monitor has
released a VM, this node's writes no longer touch it (the methods then return
0 rows so the supervisor knows).
"""

import os

import attrs
from twisted.internet import defer
from zope.interface import Interface, implementer

from qvd.db.pool import fetch_dicts
from qvd.protocols.simplerpc import new_secret
from qvd.runtime import store as runtime_store
from qvd.virt.interfaces import VMSpec


class IStore(Interface):
    """
    The HKD's database access for one node: every method fires (a Deferred)
    with what it says. The real one is L{Store}; the fake of the test
    fixtures (fakestore.py) passes the same suite (hkd_store_suite.py).
    """

    def load_for_start(vm_id):
        """
        The L{VMSpec} of a VM of this node about to start, with a new agent
        secret (recorded on its row); fails with L{StartError} when the VM is
        gone, on another node, or has no usable DI.
        """

    def load_for_cleanup(vm_id):
        """The best L{VMSpec} known for a VM to stop or clean up (minimal if none)."""

    def minimal_spec(vm_id):
        """A L{VMSpec} with only the VM's id and the node's network (no I/O)."""

    def save_state(vm_id, state, reason):
        """
        The VM's state (C{stopped} also releases it from the node); fires
        with the rows changed: 0 when the VM is no longer this node's.
        """

    def count_ok(vm_id):
        """One more successful start of the VM."""

    def set_pid(vm_id, pid):
        """The VM's process (its init, or QEMU)."""

    def touch_vma(vm_id):
        """The VM's agent answered now."""

    def claim_starts(limit):
        """Take at most C{limit} pending starts, oldest first: the VM ids, now C{starting}."""

    def claim_stops():
        """Take every pending stop: [(vm_id, vm_state)]."""

    def release_stopped(vm_id):
        """A stop for a VM that does not run here: its row is released; True if so."""

    def my_vms():
        """[(vm_id, vm_state)] of this node's VMs that are not stopped."""

    def node_starting(pid, hypervisor, usable_cpu, usable_ram, lease=0.0):
        """
        The node's HKD starts: C{starting}, with its capacity and a lease of
        C{lease} seconds by the database clock (0: none).
        """

    def node_state(state):
        """The node's state."""

    def tick(pid, lease=0.0, load=None):
        """
        The heartbeat, renewing the node's lease for C{lease} seconds by the
        database clock (0: none) and recording its live C{load} (a
        L{qvd.hkd.load.NodeLoad}, or None): the node's state, or None when it
        is C{lost} (nothing written).
        """

    def rejoin(pid, lease=0.0):
        """A lost node is C{running} again with a new lease: True if it was lost."""

    def peers(seconds):
        """
        Fire with the number of other nodes running that sent a heartbeat in
        the last C{seconds}: those that could start this node's VMs.
        """

    def claim_node_stop():
        """Take the node's pending stop command: True when there was one."""


class StartError(Exception):
    """
    A VM cannot start; the message is for the administrator.
    """


@attrs.frozen
class StoreSettings:
    images: str = "/var/lib/qvd/storage/images"
    bridge: str = "qvdnet"
    netmask: str = "255.255.0.0"
    gateway: str = ""
    persistent_overlay: bool = False
    vma_port: int = 3030
    x_port: int = 4100

    @classmethod
    def from_config(cls, config):
        return cls(
            images=config.get("path.storage.images"),
            bridge=config.get("vm.network.bridge"),
            netmask=config.get("vm.network.netmask"),
            gateway=config.get("vm.network.gateway"),
            persistent_overlay=config.getbool("vm.overlay.persistent"),
            vma_port=config.getint("hkd.vm.vma.port"),
            x_port=config.getint("hkd.vm.x.port"),
        )



@implementer(IStore)
class Store:
    def __init__(self, db, host_id, settings=None):
        self.db = db
        self.host_id = host_id
        self.settings = settings or StoreSettings()
        self._pool = runtime_store.PoolExecutor(db)

    def _one(self, statement, *args):
        """One statement of L{qvd.runtime.store} in autocommit: a Deferred."""
        return defer.ensureDeferred(statement(self._pool, *args))

    # -- VMs ---------------------------------------------------------------

    async def _vm_row(self, cur, vm_id):
        await cur.execute(
            "SELECT v.id, v.name, host(v.ip) AS ip, v.mac::text AS mac, v.di_tag, v.osf_id,"
            " u.login, o.memory, o.use_overlay, o.user_storage_size,"
            " r.current_di_id, r.host_id, r.vma_secret"
            " FROM vms v JOIN users u ON u.id = v.user_id JOIN osfs o ON o.id = v.osf_id"
            " LEFT JOIN vm_runtimes r ON r.vm_id = v.id WHERE v.id = %s", (vm_id,))
        rows = fetch_dicts(cur)
        return rows[0] if rows else None

    def _spec(self, row, di_id, di_path, vma_secret=None):
        s = self.settings
        return VMSpec(
            vm_id=row["id"], name=row["name"], login=row["login"], memory=row["memory"],
            di_id=di_id, di_path=di_path, ip=row["ip"], mac=row["mac"], netmask=s.netmask,
            bridge=s.bridge, gateway=s.gateway, use_overlay=row["use_overlay"],
            persistent_overlay=s.persistent_overlay,
            user_storage_size=row["user_storage_size"] or 0,
            vma_secret=vma_secret if vma_secret is not None else (row["vma_secret"] or ""))

    def load_for_start(self, vm_id):
        """
        Read the VM, its user, OSF and DI (by C{vms.di_tag} within the OSF, not
        blocked); write the runtime row (address, ports, current DI/OSF) and
        count the attempt. Fires with a L{VMSpec}; fails with L{StartError}.

        READ COMMITTED, like L{load_for_cleanup}: the one thing that must hold
        at the write, that the VM is still this node's, is the runtime row
        UPDATE's own condition (re-checked on the row's newest version), and
        the counter is one atomic upsert. Under SERIALIZABLE, VMs starting
        together on the small runtime tables failed each other's loads
        (relation and page predicate locks) and retried: the fifth of five
        waited 0.1-0.3 s.
        """
        async def txn(cur):
            row = await self._vm_row(cur, vm_id)
            if row is None:
                raise StartError(f"VM {vm_id} no longer exists")
            if row["host_id"] != self.host_id:
                raise StartError(f"VM {vm_id} is no longer assigned to this node")
            await cur.execute(
                "SELECT d.id, d.path FROM dis d JOIN di_tags t ON t.di_id = d.id"
                " WHERE t.osf_id = %s AND t.tag = %s AND NOT d.blocked",
                (row["osf_id"], row["di_tag"]))
            dis = fetch_dicts(cur)
            if not dis:
                raise StartError(
                    f"no usable disk image: OSF {row['osf_id']} has no unblocked DI "
                    f"tagged {row['di_tag']!r} (tag one, or unblock it, with qvd-admin di)")
            di = dis[0]
            secret = new_secret()
            await cur.execute(
                "UPDATE vm_runtimes SET vm_address = %s, vm_vma_port = %s, vm_x_port = %s,"
                " vm_ssh_port = 22, current_di_id = %s, current_osf_id = %s, vma_secret = %s"
                " WHERE vm_id = %s AND host_id = %s",
                (row["ip"], self.settings.vma_port, self.settings.x_port, di["id"],
                 row["osf_id"], secret, vm_id, self.host_id))
            if cur.rowcount != 1:
                raise StartError(f"VM {vm_id} is no longer assigned to this node")
            await cur.execute(
                "INSERT INTO vm_counters (vm_id, run_attempts) VALUES (%s, 1)"
                " ON CONFLICT (vm_id) DO UPDATE SET run_attempts = vm_counters.run_attempts + 1",
                (vm_id,))
            return self._spec(row, di["id"], os.path.join(self.settings.images, di["path"]),
                              vma_secret=secret)
        return self.db.transaction(txn, isolation="READ COMMITTED")

    async def load_for_cleanup(self, vm_id):
        """
        The best L{VMSpec} known for a VM that must be stopped or cleaned up
        (its current DI if any); a minimal one when the VM has no row.
        """
        async def txn(cur):
            row = await self._vm_row(cur, vm_id)
            if row is None:
                return None
            di_path = ""
            di_id = row["current_di_id"] or 0
            if di_id:
                await cur.execute("SELECT path FROM dis WHERE id = %s", (di_id,))
                found = cur.fetchall()
                if found:
                    di_path = os.path.join(self.settings.images, found[0][0])
            return self._spec(row, di_id, di_path)
        try:
            spec = await self.db.transaction(txn, isolation="READ COMMITTED")
        except Exception:
            spec = None
        return spec or self.minimal_spec(vm_id)

    async def host_addresses(self):
        """The addresses of every node (hosts.address), as a list."""
        rows = await self.db.runQuery("SELECT address FROM hosts ORDER BY id")
        return [r[0] for r in rows]

    def minimal_spec(self, vm_id):
        s = self.settings
        return VMSpec(vm_id=vm_id, name=f"vm{vm_id}", login="", memory=0, di_id=0,
                      di_path="", ip="", mac="", netmask=s.netmask, bridge=s.bridge)

    def save_state(self, vm_id, state, reason):
        """
        Persist C{state} (and C{reason}, if given); C{stopped} also releases
        the VM from this node. Fires with the number of rows changed (0: the
        VM is no longer ours).
        """
        return self._one(runtime_store.save_vm_state_in, vm_id, self.host_id, state, reason)

    def count_ok(self, vm_id):
        return self.db.runOperation(
            "UPDATE vm_counters SET run_ok = run_ok + 1 WHERE vm_id = %s", (vm_id,))

    def set_pid(self, vm_id, pid):
        return self.db.runOperation(
            "UPDATE vm_runtimes SET vm_pid = %s WHERE vm_id = %s AND host_id = %s",
            (pid, vm_id, self.host_id))

    def touch_vma(self, vm_id):
        return self.db.runOperation(
            "UPDATE vm_runtimes SET vma_ok_ts = now() WHERE vm_id = %s AND host_id = %s",
            (vm_id, self.host_id))

    # -- commands ------------------------------------------------------------

    def claim_stops(self):
        """
        Take every pending stop command of this node: fires with [(vm_id, vm_state)].
        """
        return self._one(runtime_store.take_stops_in, self.host_id)

    def claim_starts(self, limit):
        """
        Take at most C{limit} pending start commands of stopped VMs of this
        node, oldest first, in one statement: they become 'starting'. Fires
        with the list of VM ids.
        """
        return self.db.transaction(lambda cur: runtime_store.take_starts_in(
            runtime_store.TransactionExecutor(cur), self.host_id, limit))

    def release_stopped(self, vm_id):
        """
        A stop command for a VM that does not run here: release its row.
        """
        return self._one(runtime_store.release_stopped_in, vm_id, self.host_id)

    def my_vms(self):
        """
        Fires with [(vm_id, vm_state)] of the VMs this node holds (not stopped).
        """
        return self.db.runQuery(
            "SELECT vm_id, vm_state FROM vm_runtimes WHERE host_id = %s"
            " AND vm_state <> 'stopped'", (self.host_id,))

    def expirations(self):
        """
        Fires with [(vm_id, soft_due, hard_due, soft_ts)] of this node's VMs
        with an expiration in the past.
        """
        return self.db.runQuery(
            "SELECT vm_id, vm_expiration_soft < now(), vm_expiration_hard < now(),"
            " vm_expiration_soft FROM vm_runtimes WHERE host_id = %s"
            " AND vm_state IN ('running', 'debugging')"
            " AND (vm_expiration_soft < now() OR vm_expiration_hard < now())",
            (self.host_id,))

    # -- L7R sessions ----------------------------------------------------------

    def l7r_sessions(self):
        """
        Fires with [(vm_id, l7r_pid)] of sessions routed through this node.
        """
        return self.db.runQuery(
            "SELECT vm_id, l7r_pid FROM vm_runtimes WHERE l7r_host_id = %s"
            " AND l7r_pid IS NOT NULL", (self.host_id,))

    def reset_session(self, vm_id, pid):
        """Reset VM C{vm_id}'s claim held by L7R process C{pid} of this node (dead)."""
        return self._one(runtime_store.reset_claims_of_process_in, vm_id, self.host_id, pid)

    # -- the node ---------------------------------------------------------------

    def node_starting(self, pid, hypervisor, usable_cpu, usable_ram, lease=0.0):
        return self.db.transaction(lambda cur: runtime_store.node_starting_in(
            runtime_store.TransactionExecutor(cur), self.host_id, pid, hypervisor, usable_cpu,
            usable_ram, lease))

    def node_state(self, state):
        return self._one(runtime_store.node_state_in, self.host_id, state)

    def tick(self, pid, lease=0.0, load=None):
        """
        The heartbeat, renewing the lease and recording the load. Fires with
        the node's state, or None if it was marked 'lost' (then nothing is written).
        """
        return self._one(runtime_store.heartbeat_in, self.host_id, pid, lease, load)

    def rejoin(self, pid, lease=0.0):
        return self._one(runtime_store.rejoin_in, self.host_id, pid, lease)

    def peers(self, seconds):
        return self._one(runtime_store.peers_in, self.host_id, seconds)

    def claim_node_stop(self):
        return self._one(runtime_store.take_node_stop_in, self.host_id)
