"""
The behaviour every L{qvd.hkd.store.IStore} must have, as a test mixin run
against the real store on PostgreSQL and against the fake
(tests/test_hkd_store.py).

A test case mixing in L{HKDStoreTests} provides C{self.store} (the store of
node C{self.node}), C{self.other} (another node's id) and:

    add_vm(host_id=None, vm_state="stopped", vm_cmd=None) -> vm id
    vm(vm_id) -> {"host_id", "vm_state", "vm_cmd", "vm_state_reason"}
    set_node(state=None, cmd=None)           # this node's host_runtimes row
    lease_left() -> seconds left of this node's lease (database clock), or None
    set_other(state, heartbeat_age)          # the other node's state, seconds since its heartbeat
"""

from twisted.internet import defer

from qvd.hkd.store import IStore, StartError


class HKDStoreTests:

    def assertLease(self, seconds):
        left = self.lease_left()
        self.assertTrue(left is not None and seconds - 1 < left <= seconds,
                        f"{left} s of lease left, not {seconds}")

    def test_provides_interface(self):
        self.assertTrue(IStore.providedBy(self.store))

    @defer.inlineCallbacks
    def test_save_state_only_for_own_vms(self):
        mine = self.add_vm(host_id=self.node, vm_state="starting")
        theirs = self.add_vm(host_id=self.other, vm_state="running")
        self.assertEqual((yield self.store.save_state(mine, "running", None)), 1)
        self.assertEqual((yield self.store.save_state(mine, "running", "slow agent")), 1)
        self.assertEqual((yield self.store.save_state(mine, "running", None)), 1)
        row = self.vm(mine)
        self.assertEqual((row["vm_state"], row["vm_state_reason"]), ("running", "slow agent"))
        self.assertEqual((yield self.store.save_state(theirs, "stopped", "x")), 0)
        self.assertEqual((self.vm(theirs)["vm_state"], self.vm(theirs)["host_id"]),
                         ("running", self.other))

    @defer.inlineCallbacks
    def test_stopped_releases_the_vm(self):
        mine = self.add_vm(host_id=self.node, vm_state="running", vm_cmd="stop")
        self.assertEqual((yield self.store.save_state(mine, "stopped", "powered off")), 1)
        row = self.vm(mine)
        self.assertEqual((row["vm_state"], row["host_id"], row["vm_cmd"], row["vm_state_reason"]),
                         ("stopped", None, None, "powered off"))
        self.assertEqual((yield self.store.save_state(mine, "running", None)), 0,
                         "a released VM is no longer this node's")

    @defer.inlineCallbacks
    def test_claim_starts_oldest_first_within_limit(self):
        first, second, third = (self.add_vm(host_id=self.node, vm_cmd="start") for _ in range(3))
        self.add_vm(host_id=self.other, vm_cmd="start")
        self.add_vm(host_id=self.node)
        taken = yield self.store.claim_starts(2)
        self.assertEqual(sorted(taken), [first, second])
        for vm in (first, second):
            self.assertEqual((self.vm(vm)["vm_state"], self.vm(vm)["vm_cmd"]), ("starting", None))
        self.assertEqual(self.vm(third)["vm_cmd"], "start")
        self.assertEqual((yield self.store.claim_starts(5)), [third])
        self.assertEqual((yield self.store.claim_starts(5)), [])

    @defer.inlineCallbacks
    def test_claim_stops(self):
        running = self.add_vm(host_id=self.node, vm_state="running", vm_cmd="stop")
        stopped = self.add_vm(host_id=self.node, vm_cmd="stop")
        theirs = self.add_vm(host_id=self.other, vm_state="running", vm_cmd="stop")
        taken = yield self.store.claim_stops()
        self.assertEqual(sorted(taken), sorted([(running, "running"), (stopped, "stopped")]))
        self.assertEqual(self.vm(running)["vm_cmd"], None)
        self.assertEqual(self.vm(theirs)["vm_cmd"], "stop")
        self.assertEqual((yield self.store.claim_stops()), [])

    @defer.inlineCallbacks
    def test_release_stopped_and_my_vms(self):
        stopped = self.add_vm(host_id=self.node)
        running = self.add_vm(host_id=self.node, vm_state="running")
        self.add_vm(host_id=self.other, vm_state="running")
        self.assertEqual(sorted((yield self.store.my_vms())), [(running, "running")])
        self.assertTrue((yield self.store.release_stopped(stopped)))
        self.assertEqual(self.vm(stopped)["host_id"], None)
        self.assertFalse((yield self.store.release_stopped(running)))
        self.assertEqual(self.vm(running)["host_id"], self.node)

    @defer.inlineCallbacks
    def test_node_state_and_heartbeat(self):
        yield self.store.node_starting(4242, "lxc", 800.0, 4096.0)
        self.assertEqual((yield self.store.tick(4242)), "starting")
        yield self.store.node_state("running")
        self.assertEqual((yield self.store.tick(4242)), "running")
        self.set_node(state="lost")
        self.assertIsNone((yield self.store.tick(4242)), "a lost node's heartbeat is refused")

    @defer.inlineCallbacks
    def test_heartbeat_renews_the_lease(self):
        """
        A heartbeat with a lease of L seconds leaves L seconds of lease (by
        the database clock); one with no lease (0) leaves none; a lost node's
        heartbeat renews nothing, and its rejoin is running with a new lease.
        """
        yield self.store.node_starting(4242, "lxc", 800.0, 4096.0, 10.0)
        self.assertLease(10.0)
        self.assertEqual((yield self.store.tick(4242, 0)), "starting")
        self.assertIsNone(self.lease_left())
        self.assertEqual((yield self.store.tick(4242, 6.0)), "starting")
        self.assertLease(6.0)
        self.assertFalse((yield self.store.rejoin(4242, 9.0)), "only a lost node rejoins")
        self.set_node(state="lost")
        self.assertIsNone((yield self.store.tick(4242, 30.0)))
        self.assertLease(6.0)
        self.assertTrue((yield self.store.rejoin(4242, 9.0)))
        self.assertEqual((yield self.store.tick(4242, 9.0)), "running")
        self.assertLease(9.0)

    @defer.inlineCallbacks
    def test_peers(self):
        """
        peers(10) counts the other nodes that run and sent a heartbeat in
        the last 10 s: not a stopped one, not a silent one, never this node.
        """
        self.set_other("running", 1)
        self.assertEqual((yield self.store.peers(10)), 1)
        self.set_other("running", 30)
        self.assertEqual((yield self.store.peers(10)), 0)
        self.set_other("stopped", 1)
        self.assertEqual((yield self.store.peers(10)), 0)

    @defer.inlineCallbacks
    def test_claim_node_stop(self):
        yield self.store.node_starting(1, "lxc", 1.0, 1.0)
        self.assertFalse((yield self.store.claim_node_stop()))
        self.set_node(cmd="stop")
        self.assertTrue((yield self.store.claim_node_stop()))
        self.assertFalse((yield self.store.claim_node_stop()))

    @defer.inlineCallbacks
    def test_load_for_start(self):
        """A VM of this node gets a new secret at every start; others cannot start here."""
        mine = self.add_vm(host_id=self.node, vm_state="starting")
        spec = yield self.store.load_for_start(mine)
        again = yield self.store.load_for_start(mine)
        self.assertEqual(spec.vm_id, mine)
        self.assertEqual(len(spec.vma_secret), len(again.vma_secret))
        self.assertGreaterEqual(len(spec.vma_secret), 32)
        self.assertNotEqual(spec.vma_secret, again.vma_secret)
        theirs = self.add_vm(host_id=self.other, vm_state="starting")
        e = yield self.assertFailure(self.store.load_for_start(theirs), StartError)
        self.assertIn("no longer assigned to this node", str(e))
        e = yield self.assertFailure(self.store.load_for_start(99999), StartError)
        self.assertIn("no longer exists", str(e))
