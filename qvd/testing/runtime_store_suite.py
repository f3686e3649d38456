"""
The behaviour every L{qvd.runtime.store.IRuntimeStore} must have, as a test
mixin run against the real store on PostgreSQL and against the fake
(tests/test_runtime_store.py).

A test case mixing in L{RuntimeStoreTests} provides C{self.store} and:

    add_host(name, state="running", hypervisor="lxc") -> host id
    add_vm(host_id=None, vm_state="stopped", vm_cmd=None, di_path="desk.tar",
           di_blocked=False, **runtime_columns) -> vm id
    row(vm_id) -> {column: value} of the store's columns
    user_of(vm_id) -> the id of the VM's user
    age_claim(vm_id, seconds)       # the claim was made that long ago
    assertNotified(channel)         # that channel was notified (waits a moment)
"""

from twisted.internet import defer

from qvd import loadbalancer
from qvd.runtime.session import Claimant
from qvd.runtime.store import VM_COLUMNS

WEIGHTS = loadbalancer.Weights(1, 1, 0)


def claimant(host_id, pid=100, live=("s1",), alive=()):
    return Claimant(host_id=host_id, pid=pid, pids=frozenset({pid}),
                    live_sessions=set(live), pid_alive=lambda p: p in alive)


class RuntimeStoreTests:

    @defer.inlineCallbacks
    def test_claim_free(self):
        node = self.add_host("n1")
        vm = self.add_vm()
        verdict, claim, _ = yield self.store.claim(vm, "s1", claimant(node), 330, self.user_of(vm))
        self.assertEqual((verdict, claim.user_state), ("free", "disconnected"))
        row = self.row(vm)
        self.assertEqual((row["user_state"], row["l7r_host_id"], row["l7r_pid"],
                          row["l7r_session"], row["user_cmd"], row["real_user_id"]),
                         ("connecting", node, 100, "s1", None, self.user_of(vm)))
        self.assertTrue((yield self.store.claim_is_ours(vm, "s1")))
        self.assertFalse((yield self.store.claim_is_ours(vm, "s2")))

    @defer.inlineCallbacks
    def test_claim_fires_with_the_row(self):
        """
        A claim fires with the VM's row as it is after the claim (what the
        session goes on with, no second read); a held one with None.
        """
        node = self.add_host("n1")
        vm = self.add_vm(host_id=node, vm_state="running")
        _, _, row = yield self.store.claim(vm, "s1", claimant(node), 330)
        self.assertEqual(set(row), set(VM_COLUMNS))
        self.assertEqual((row["vm_id"], row["host_id"], row["vm_state"], row["user_state"],
                          row["l7r_session"]), (vm, node, "running", "connecting", "s1"))
        self.assertIsInstance(row["name"], str)      # the VM's name, from vms
        _, _, row = yield self.store.claim(vm, "s2", claimant(node, pid=101, alive=(100,)), 330)
        self.assertIsNone(row)

    @defer.inlineCallbacks
    def test_claim_records_user_ip(self):
        """A claim records its client's address, which stays after the release."""
        node = self.add_host("n1")
        vm = self.add_vm()
        yield self.store.claim(vm, "s1", claimant(node), 330, self.user_of(vm), "203.0.113.7")
        self.assertEqual(self.row(vm)["user_ip"], "203.0.113.7")
        yield self.store.release(vm, "s1")
        self.assertEqual(self.row(vm)["user_ip"], "203.0.113.7")
        yield self.store.claim(vm, "s2", claimant(node, live=("s2",)), 330)
        self.assertEqual(self.row(vm)["user_ip"], "203.0.113.7")

    @defer.inlineCallbacks
    def test_claim_held_aborts_the_holder(self):
        """A live session of another client: told to abort, its L7R notified; no claim."""
        node = self.add_host("n1")
        other = self.add_host("n2")
        vm = self.add_vm(user_state="connected", l7r_host_id=other, l7r_pid=7,
                         l7r_session="theirs")
        verdict, claim, _ = yield self.store.claim(vm, "s1", claimant(node), 330)
        self.assertEqual((verdict, claim.l7r_session, claim.owner_state),
                         ("held", "theirs", "running"))
        row = self.row(vm)
        self.assertEqual((row["user_state"], row["l7r_session"], row["user_cmd"]),
                         ("connected", "theirs", "abort"))
        self.assertNotified(f"qvd_cmd_for_user_on_host{other}")
        self.assertFalse((yield self.store.claim_is_ours(vm, "theirs")))
        # once the holder released it, the next claim succeeds
        yield self.store.release(vm, "theirs")
        verdict, _, _ = yield self.store.claim(vm, "s1", claimant(node), 330)
        self.assertEqual(verdict, "free")

    @defer.inlineCallbacks
    def test_claim_of_a_dead_or_stale_holder_is_taken(self):
        node = self.add_host("n1")
        lost = self.add_host("n2", state="lost")
        cases = [(dict(user_state="connected", l7r_host_id=lost, l7r_pid=7,
                       l7r_session="x"), "dead_l7r", None),
                 (dict(user_state="connected", l7r_host_id=node, l7r_pid=555,
                       l7r_session="y"), "dead_l7r", None),
                 (dict(user_state="connecting", l7r_host_id=node, l7r_pid=555,
                       l7r_session="z"), "expired", 400)]
        # pid 555 of this node is dead; a live one (556) still holds its claim
        vm = self.add_vm(user_state="connected", l7r_host_id=node, l7r_pid=556,
                         l7r_session="w")
        verdict, _, _ = yield self.store.claim(vm, "s1", claimant(node, alive=(556,)), 330)
        self.assertEqual(verdict, "held")
        for runtime, expected, age in cases:
            vm = self.add_vm(**runtime)
            if age:
                self.age_claim(vm, age)
            verdict, _, _ = yield self.store.claim(vm, "s1", claimant(node), 330)
            self.assertEqual(verdict, expected, runtime)
            self.assertEqual(self.row(vm)["l7r_session"], "s1")

    @defer.inlineCallbacks
    def test_claim_of_missing_vm(self):
        node = self.add_host("n1")
        with self.assertRaises(LookupError):
            yield self.store.claim(9999, "s1", claimant(node), 330)

    @defer.inlineCallbacks
    def test_mark_connected_only_for_our_live_claim(self):
        node = self.add_host("n1")
        vm = self.add_vm()
        yield self.store.claim(vm, "s1", claimant(node), 330)
        self.assertFalse((yield self.store.mark_connected(vm, "s2")))
        self.assertTrue((yield self.store.mark_connected(vm, "s1")))
        self.assertEqual(self.row(vm)["user_state"], "connected")
        self.assertFalse((yield self.store.mark_connected(vm, "s1")), "connected twice")
        vm2 = self.add_vm()
        yield self.store.claim(vm2, "s3", claimant(node), 330)
        yield self.store.abort_session(vm2)
        self.assertFalse((yield self.store.mark_connected(vm2, "s3")), "aborted")

    @defer.inlineCallbacks
    def test_release_only_our_claim(self):
        node = self.add_host("n1")
        vm = self.add_vm()
        yield self.store.claim(vm, "s1", claimant(node), 330)
        self.assertFalse((yield self.store.release(vm, "s2")))
        self.assertEqual(self.row(vm)["l7r_session"], "s1")
        self.assertTrue((yield self.store.release(vm, "s1")))
        row = self.row(vm)
        self.assertEqual((row["user_state"], row["l7r_host_id"], row["l7r_session"]),
                         ("disconnected", None, None))

    @defer.inlineCallbacks
    def test_reset_claim_and_claims_on_node(self):
        node = self.add_host("n1")
        a = self.add_vm(user_state="connected", l7r_host_id=node, l7r_pid=5, l7r_session="a")
        b = self.add_vm(user_state="disconnected", user_cmd="abort", l7r_host_id=node,
                        l7r_pid=6, l7r_session=None)
        self.add_vm()
        claims = yield self.store.claims_on_node(node)
        self.assertEqual(sorted(claims), [(a, 5, "a", None), (b, 6, None, "abort")])
        self.assertFalse((yield self.store.reset_claim(a, "other")))
        self.assertTrue((yield self.store.reset_claim(a, "a")))
        self.assertTrue((yield self.store.reset_claim(b, None)))
        self.assertEqual((yield self.store.claims_on_node(node)), [])

    @defer.inlineCallbacks
    def test_abort_session(self):
        node = self.add_host("n1")
        idle = self.add_vm()
        self.assertIsNone((yield self.store.abort_session(idle)))
        self.assertIsNone(self.row(idle)["user_cmd"])
        busy = self.add_vm(user_state="connecting", l7r_host_id=node, l7r_pid=5,
                           l7r_session="a")
        self.assertEqual((yield self.store.abort_session(busy)), node)
        self.assertEqual(self.row(busy)["user_cmd"], "abort")
        self.assertNotified(f"qvd_cmd_for_user_on_host{node}")

    @defer.inlineCallbacks
    def test_assign_and_commands(self):
        node = self.add_host("n1")
        vm = self.add_vm()
        self.assertIsNone((yield self.store.send_vm_cmd(vm, "start", ("stopped",))),
                          "no node yet")
        self.assertTrue((yield self.store.assign_host(vm, node)))
        self.assertFalse((yield self.store.assign_host(vm, node)), "already has one")
        self.assertEqual((yield self.store.send_vm_cmd(vm, "start", ("stopped",))), node)
        row = self.row(vm)
        self.assertEqual((row["host_id"], row["vm_cmd"]), (node, "start"))
        self.assertNotified(f"qvd_cmd_for_vm_on_host{node}")
        running = self.add_vm(host_id=node, vm_state="running")
        self.assertIsNone((yield self.store.send_vm_cmd(running, "stop", ("stopped",))))
        self.assertEqual((yield self.store.send_vm_cmd(running, "stop", ("running",))), node)
        self.assertFalse((yield self.store.assign_host(running, node)))

    @defer.inlineCallbacks
    def test_start_and_cancel(self):
        node, other = self.add_host("n1"), self.add_host("n2")
        vm = self.add_vm()
        self.assertEqual((yield self.store.start_vm(vm, node)), node)
        self.assertIsNone((yield self.store.start_vm(vm, node)), "a start is pending")
        self.assertEqual((yield self.store.cancel_start(vm)), node)
        row = self.row(vm)
        self.assertEqual((row["host_id"], row["vm_cmd"]), (None, None))
        self.assertIsNone((yield self.store.cancel_start(vm)), "nothing pending")
        bound = self.add_vm(host_id=other)
        self.assertEqual((yield self.store.start_vm(bound, node)), other, "keeps its node")
        running = self.add_vm(host_id=node, vm_state="running")
        self.assertIsNone((yield self.store.start_vm(running, node)))

    @defer.inlineCallbacks
    def test_placement(self):
        """One placement for everybody: kind of DI, node state and load."""
        self.add_host("busy", usable_ram=100, usable_cpu=100)
        idle = self.add_host("idle", usable_ram=4000, usable_cpu=4000)
        self.add_host("kvm", hypervisor="kvm", usable_ram=9000, usable_cpu=9000)
        self.add_host("down", state="stopped", usable_ram=9000, usable_cpu=9000)
        vm = self.add_vm()
        chosen = yield self.store.choose_host(vm, "desk", WEIGHTS, lambda: 0.5)
        self.assertEqual(chosen.host_id, idle)
        disk = self.add_vm(di_path="desk.qcow2")
        chosen = yield self.store.choose_host(disk, "disk", WEIGHTS, lambda: 0.5)
        self.assertEqual(chosen.name, "kvm")
        blocked = self.add_vm(di_blocked=True)
        with self.assertRaises(loadbalancer.NoHostAvailable):
            yield self.store.choose_host(blocked, "blocked", WEIGHTS, lambda: 0.5)
        no_di = self.add_vm(di_path=None)
        with self.assertRaises(loadbalancer.NoHostAvailable):
            yield self.store.choose_host(no_di, "no-di", WEIGHTS, lambda: 0.5)
