"""
An in-memory stand-in for L{qvd.hkd.store.Store}, for unit tests of the VM
supervisor: records every state written, can fail loads and writes.

    store = FakeStore()
    store.load_error = StartError("no usable disk image ...")
    store.down = True              # writes fail as if PostgreSQL were down
    store.states[vm_id]            # [(state, reason), ...] as written
"""

from twisted.internet import defer

from qvd.db.pool import DatabaseUnavailable
from qvd.virt.interfaces import VMSpec


def make_spec(vm_id, ip=None):
    return VMSpec(vm_id=vm_id, name=f"vm{vm_id}", login="alice", memory=256, di_id=1,
                  di_path="/images/test.tar", ip=ip or f"10.3.0.{vm_id % 250 + 1}",
                  mac="54:52:00:00:00:01", netmask="255.255.0.0", bridge="qvdnet")


class FakeStore:
    def __init__(self):
        self.states = {}
        self.load_error = None
        self.load_result = None
        self.down = False
        self.owned = True
        self.ok_counts = {}
        self.loads = []

    def load_for_start(self, vm_id):
        self.loads.append(vm_id)
        if self.load_result is not None:
            return self.load_result
        if self.load_error is not None:
            return defer.fail(self.load_error)
        return defer.succeed(make_spec(vm_id))

    def load_for_cleanup(self, vm_id):
        return defer.succeed(make_spec(vm_id))

    def minimal_spec(self, vm_id):
        return make_spec(vm_id)

    def save_state(self, vm_id, state, reason):
        if self.down:
            return defer.fail(DatabaseUnavailable("the database is down (fake)"))
        self.states.setdefault(vm_id, []).append((state, reason))
        return defer.succeed(1 if self.owned else 0)

    def last(self, vm_id):
        return self.states.get(vm_id, [(None, None)])[-1]

    def count_ok(self, vm_id):
        self.ok_counts[vm_id] = self.ok_counts.get(vm_id, 0) + 1
        return defer.succeed(None)

    def set_pid(self, vm_id, pid):
        return defer.succeed(None)

    def touch_vma(self, vm_id):
        return defer.succeed(None)
