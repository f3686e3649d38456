"""
An in-memory L{qvd.hkd.store.IStore} for unit tests of the VM supervisor and
the node: the same answers as the real store (it passes
hkd_store_suite.py), plus knobs to fail loads and writes.

    store = FakeStore(host_id=1)
    vm = store.add_vm(host_id=1, vm_cmd="start")   # rows, as in vm_runtimes
    store.load_error = StartError("no usable disk image ...")
    store.down = True              # writes fail as if PostgreSQL were down
    store.states[vm_id]            # [(state, reason), ...] as written

Until a test adds VMs, any VM counts as this node's (unless C{owned} is
False): the supervisor's tests drive one VM without setting up rows; once
it added some, any other VM id is a VM that no longer exists.
"""

import itertools
import secrets

import attrs
from twisted.internet import defer
from zope.interface import implementer

from qvd.db.pool import DatabaseUnavailable
from qvd.hkd.store import IStore, StartError
from qvd.virt.interfaces import VMSpec


def make_spec(vm_id, ip=None):
    return VMSpec(vm_id=vm_id, name=f"vm{vm_id}", login="alice", memory=256, di_id=1,
                  di_path="/images/test.tar", ip=ip or f"10.3.0.{vm_id % 250 + 1}",
                  mac="54:52:00:00:00:01", netmask="255.255.0.0", bridge="qvdnet")


_RELEASED = dict(vm_state="stopped", host_id=None, vm_cmd=None)


@implementer(IStore)
class FakeStore:
    def __init__(self, host_id=1):
        self.host_id = host_id
        self.vms = {}
        self.node = dict(state="stopped", cmd=None, pid=None)
        self.states = {}
        self.load_error = None
        self.load_result = None
        self.down = False
        self.owned = True
        self.ok_counts = {}
        self.loads = []
        self.other_nodes = 1        # peers(): other live nodes (1: this one holds a lease)
        self._ids = itertools.count(1)

    # -- set-up, for tests --------------------------------------------------

    def add_vm(self, host_id=None, vm_state="stopped", vm_cmd=None):
        vm_id = next(self._ids)
        self.vms[vm_id] = dict(host_id=host_id, vm_state=vm_state, vm_cmd=vm_cmd,
                               vm_state_reason=None, order=vm_id)
        return vm_id

    def _mine(self, vm_id):
        row = self.vms.get(vm_id)
        if row is None:
            return self.owned
        return row["host_id"] == self.host_id

    # -- IStore ------------------------------------------------------------------

    def load_for_start(self, vm_id):
        self.loads.append(vm_id)
        if self.load_result is not None:
            return self.load_result
        if self.load_error is not None:
            return defer.fail(self.load_error)
        if self.vms and vm_id not in self.vms:
            return defer.fail(StartError(f"VM {vm_id} no longer exists"))
        if not self._mine(vm_id):
            return defer.fail(StartError(f"VM {vm_id} is no longer assigned to this node"))
        return defer.succeed(attrs.evolve(make_spec(vm_id), vma_secret=secrets.token_hex(32)))

    def load_for_cleanup(self, vm_id):
        return defer.succeed(make_spec(vm_id))

    def minimal_spec(self, vm_id):
        return make_spec(vm_id)

    def save_state(self, vm_id, state, reason):
        if self.down:
            return defer.fail(DatabaseUnavailable("the database is down (fake)"))
        self.states.setdefault(vm_id, []).append((state, reason))
        if not self._mine(vm_id):
            return defer.succeed(0)
        row = self.vms.get(vm_id)
        if row is not None:
            if state == "stopped":
                row.update(_RELEASED)
                row["vm_state_reason"] = reason
            else:
                row["vm_state"] = state
                if reason is not None:
                    row["vm_state_reason"] = reason
        return defer.succeed(1)

    def last(self, vm_id):
        return self.states.get(vm_id, [(None, None)])[-1]

    def count_ok(self, vm_id):
        self.ok_counts[vm_id] = self.ok_counts.get(vm_id, 0) + 1
        return defer.succeed(None)

    def set_pid(self, vm_id, pid):
        return defer.succeed(None)

    def touch_vma(self, vm_id):
        return defer.succeed(None)

    def claim_starts(self, limit):
        waiting = sorted((r["order"], vm_id) for vm_id, r in self.vms.items()
                         if r["host_id"] == self.host_id and r["vm_cmd"] == "start"
                         and r["vm_state"] == "stopped")[:limit]
        for _, vm_id in waiting:
            self.vms[vm_id].update(vm_cmd=None, vm_state="starting", vm_state_reason=None)
        return defer.succeed([vm_id for _, vm_id in waiting])

    def claim_stops(self):
        taken = []
        for vm_id, row in sorted(self.vms.items()):
            if row["host_id"] == self.host_id and row["vm_cmd"] == "stop":
                row["vm_cmd"] = None
                taken.append((vm_id, row["vm_state"]))
        return defer.succeed(taken)

    def release_stopped(self, vm_id):
        row = self.vms.get(vm_id)
        if row is None or row["host_id"] != self.host_id or row["vm_state"] != "stopped":
            return defer.succeed(False)
        row.update(_RELEASED)
        return defer.succeed(True)

    def my_vms(self):
        return defer.succeed([(vm_id, r["vm_state"]) for vm_id, r in sorted(self.vms.items())
                              if r["host_id"] == self.host_id and r["vm_state"] != "stopped"])

    def node_starting(self, pid, hypervisor, usable_cpu, usable_ram, lease=0.0):
        self.node.update(state="starting", cmd=None, pid=pid, lease=lease or None)
        return defer.succeed(None)

    def node_state(self, state):
        self.node["state"] = state
        return defer.succeed(True)

    def tick(self, pid, lease=0.0):
        if self.node["state"] == "lost":
            return defer.succeed(None)
        self.node.update(pid=pid, lease=lease or None)
        return defer.succeed(self.node["state"])

    def peers(self, seconds):
        return defer.succeed(self.other_nodes)

    def rejoin(self, pid, lease=0.0):
        if self.node["state"] != "lost":
            return defer.succeed(False)
        self.node.update(state="running", pid=pid, lease=lease or None)
        return defer.succeed(True)

    def claim_node_stop(self):
        had = self.node["cmd"] == "stop"
        self.node["cmd"] = None
        return defer.succeed(had)
