"""
An in-memory L{qvd.runtime.store.IRuntimeStore} for fast tests of the L7R's
logic: the same answers as the real store (it passes
L{qvd.testing.runtime_store_suite}), no database.

    store = FakeRuntimeStore(now=clock.seconds)
    host = store.add_host("n1")
    vm = store.add_vm(host_id=None)
    broker = Broker(reactor, None, settings, vma_factory, store=store)
"""

import itertools

import attrs
from twisted.internet import defer
from zope.interface import implementer

from qvd import loadbalancer
from qvd.runtime.session import Claim, claim_verdict
from qvd.runtime.store import VM_COLUMNS, IRuntimeStore

_NOBODY = dict(user_state="disconnected", user_cmd=None, l7r_host_id=None, l7r_pid=None,
               l7r_session=None)


@attrs.define
class _Host:
    id: int
    name: str
    state: str = "running"
    blocked: bool = False
    hypervisor: str = "lxc"
    usable_ram: int = 1000
    usable_cpu: int = 1000
    backend: bool = True


@implementer(IRuntimeStore)
class FakeRuntimeStore:
    """
    @ivar vms: vm id -> its runtime row (a dict with the columns the store moves).
    @ivar notified: every channel notified, in order.
    """

    def __init__(self, now=None):
        import time
        self.now = now or time.time
        self.vms = {}
        self.hosts = {}
        self.notified = []
        self._ids = itertools.count(1)

    # -- set-up, for tests --------------------------------------------------

    def add_host(self, name, **fields):
        host = _Host(next(self._ids), name, **fields)
        self.hosts[host.id] = host
        return host.id

    def add_vm(self, name="vm", di_path="desk.tar", di_blocked=False, **fields):
        vm_id = next(self._ids)
        row = dict(_NOBODY, host_id=None, vm_state="stopped", vm_cmd=None, real_user_id=None,
                   user_ip=None,
                   user_state_ts=self.now(), name=name, di_path=di_path, di_blocked=di_blocked)
        row.update(fields)
        self.vms[vm_id] = row
        return vm_id

    def _notify(self, channel):
        self.notified.append(channel)

    # -- IRuntimeStore ----------------------------------------------------------

    def claim(self, vm_id, session_id, claimant, claim_max_age, user_id=None, user_ip=None):
        row = self.vms.get(vm_id)
        if row is None:
            return defer.fail(LookupError(f"VM {vm_id} does not exist any more"))
        owner = self.hosts.get(row["l7r_host_id"])
        claim = Claim(row["user_state"], row["l7r_host_id"], row["l7r_pid"],
                      row["l7r_session"], self.now() - row["user_state_ts"],
                      owner.state if owner else None)
        verdict = claim_verdict(claim, claimant, claim_max_age)
        if verdict == "held":
            self._abort(vm_id)
            return defer.succeed((verdict, claim, None))
        row.update(user_state="connecting", user_state_ts=self.now(),
                   l7r_host_id=claimant.host_id, l7r_pid=claimant.pid,
                   l7r_session=session_id, user_cmd=None)
        if user_id is not None:
            row["real_user_id"] = user_id
        if user_ip:
            row["user_ip"] = user_ip
        found = dict({c: row.get(c) for c in VM_COLUMNS}, vm_id=vm_id)
        return defer.succeed((verdict, claim, found))

    def _abort(self, vm_id):
        row = self.vms[vm_id]
        if row["user_state"] not in ("connecting", "connected"):
            return None
        row["user_cmd"] = "abort"
        if row["l7r_host_id"] is not None:
            self._notify(f"qvd_cmd_for_user_on_host{row['l7r_host_id']}")
        return row["l7r_host_id"]

    def abort_session(self, vm_id):
        return defer.succeed(self._abort(vm_id))

    def claim_is_ours(self, vm_id, session_id):
        row = self.vms.get(vm_id)
        return defer.succeed(row is not None and row["user_cmd"] != "abort"
                             and row["l7r_session"] == session_id)

    def assign_host(self, vm_id, host_id):
        row = self.vms.get(vm_id)
        if row is None or row["host_id"] is not None or row["vm_state"] != "stopped":
            return defer.succeed(False)
        row["host_id"] = host_id
        return defer.succeed(True)

    def send_vm_cmd(self, vm_id, cmd, from_states):
        row = self.vms.get(vm_id)
        if row is None or row["vm_state"] not in from_states or row["host_id"] is None:
            return defer.succeed(None)
        row["vm_cmd"] = cmd
        self._notify(f"qvd_cmd_for_vm_on_host{row['host_id']}")
        return defer.succeed(row["host_id"])

    def start_vm(self, vm_id, host_id):
        row = self.vms.get(vm_id)
        if row is None or row["vm_state"] != "stopped" or row["vm_cmd"] is not None:
            return defer.succeed(None)
        if row["host_id"] is None:
            row["host_id"] = host_id
        row["vm_cmd"] = "start"
        self._notify(f"qvd_cmd_for_vm_on_host{row['host_id']}")
        return defer.succeed(row["host_id"])

    def cancel_start(self, vm_id):
        row = self.vms.get(vm_id)
        if row is None or row["vm_state"] != "stopped" or row["vm_cmd"] != "start":
            return defer.succeed(None)
        host_id = row["host_id"]
        row.update(vm_cmd=None, host_id=None)
        self._notify(f"qvd_cmd_for_vm_on_host{host_id}")
        return defer.succeed(host_id)

    def mark_connected(self, vm_id, session_id):
        row = self.vms.get(vm_id)
        if (row is None or row["l7r_session"] != session_id
                or row["user_state"] != "connecting" or row["user_cmd"] is not None):
            return defer.succeed(False)
        row["user_state"] = "connected"
        return defer.succeed(True)

    def release(self, vm_id, session_id):
        row = self.vms.get(vm_id)
        if row is None or row["l7r_session"] != session_id:
            return defer.succeed(False)
        row.update(_NOBODY)
        return defer.succeed(True)

    def reset_claim(self, vm_id, session_id):
        row = self.vms.get(vm_id)
        if row is None or row["l7r_session"] != session_id:
            return defer.succeed(False)
        row.update(_NOBODY)
        return defer.succeed(True)

    def claims_on_node(self, l7r_host_id):
        return defer.succeed(sorted(
            (vm_id, r["l7r_pid"], r["l7r_session"], r["user_cmd"])
            for vm_id, r in self.vms.items()
            if r["l7r_host_id"] == l7r_host_id
            and (r["user_cmd"] == "abort" or r["user_state"] != "disconnected")))

    def choose_host(self, vm_id, vm_name, weights, random):
        row = self.vms[vm_id]
        try:
            if row["di_path"] is None:
                raise loadbalancer.NoHostAvailable(
                    f"VM {vm_name!r} cannot start: its OSF has no DI with the VM's tag")
            if row["di_blocked"]:
                raise loadbalancer.NoHostAvailable(f"VM {vm_name!r} cannot start: its DI is blocked")
            hosts = [loadbalancer.HostLoad(
                h.id, h.name, h.state, h.blocked, h.hypervisor, h.usable_ram, h.usable_cpu,
                sum(1 for r in self.vms.values() if r["host_id"] == h.id))
                for h in sorted(self.hosts.values(), key=lambda h: h.id) if h.backend]
            return defer.succeed(loadbalancer.choose_host(
                vm_name, loadbalancer.di_hypervisor(row["di_path"]), hosts, weights, random))
        except Exception:
            return defer.fail()
