"""
The broker's takeover (claim a VM's session, abort the client that holds
it) on a task.Clock with the in-memory runtime store: the same decisions
the real store makes on PostgreSQL (both pass the store's suite).
"""

from twisted.internet import defer, task
from twisted.trial import unittest

from qvd.l7r.broker import Broker, BrokerError, BrokerSettings, Session
from qvd.testing.fakeruntime import FakeRuntimeStore


class _Conn:
    def __init__(self):
        self.written = []

    def write(self, data):
        self.written.append(data)


class TakeoverTests(unittest.TestCase):

    def setUp(self):
        self.clock = task.Clock()
        self.store = FakeRuntimeStore(now=self.clock.seconds)
        self.node = self.store.add_host("n1")
        self.other = self.store.add_host("n2")
        self.broker = Broker(self.clock, None, BrokerSettings(takeover=10.0, poll_vm=2.0),
                             None, pid=100, store=self.store)
        self.broker.host_id = self.node

    def session(self, vm_id):
        session = Session(self.clock, vm_id, _Conn())
        session.settings = self.broker.settings
        session.step("connect")
        return session

    def test_free_vm_claimed_at_once(self):
        """A VM nobody holds is claimed in one step: connecting, by this process."""
        vm = self.store.add_vm()
        session = self.session(vm)
        self.successResultOf(defer.ensureDeferred(self.broker.takeover(session)))
        row = self.store.vms[vm]
        self.assertEqual((row["user_state"], row["l7r_session"], row["l7r_pid"]),
                         ("connecting", session.id, 100))

    def test_holder_aborted_then_claimed(self):
        """
        Another node's live client holds the VM: it is told to abort (its
        node notified) every poll; once it let go, the claim is ours.
        """
        vm = self.store.add_vm(user_state="connected", l7r_host_id=self.other, l7r_pid=7,
                               l7r_session="theirs")
        session = self.session(vm)
        d = defer.ensureDeferred(self.broker.takeover(session))
        self.assertNoResult(d)
        self.assertEqual(self.store.vms[vm]["user_cmd"], "abort")
        self.assertEqual(self.store.notified, [f"qvd_cmd_for_user_on_host{self.other}"])
        self.assertEqual(session.machine.state, "claiming")
        self.clock.advance(2.0)
        self.assertNoResult(d)
        self.assertEqual(len(self.store.notified), 2, "asked again after poll_vm")
        self.successResultOf(self.store.release(vm, "theirs"))
        self.clock.advance(2.0)
        self.successResultOf(d)
        self.assertEqual(self.store.vms[vm]["l7r_session"], session.id)

    def test_gives_up_after_takeover_seconds(self):
        """A holder that never lets go: the claim fails after 'takeover' seconds, theirs kept."""
        vm = self.store.add_vm(user_state="connected", l7r_host_id=self.other, l7r_pid=7,
                               l7r_session="theirs")
        session = self.session(vm)
        d = defer.ensureDeferred(self.broker.takeover(session))
        self.clock.pump([2.0] * 5)
        self.assertNoResult(d)
        self.clock.advance(2.0)
        failure = self.failureResultOf(d, BrokerError)
        self.assertEqual(str(failure.value), "Unable to acquire VM, close other clients")
        self.assertEqual(self.store.vms[vm]["l7r_session"], "theirs")

    def test_claim_of_a_lost_node_taken(self):
        """The holder's node is lost: its claim is taken without waiting."""
        lost = self.store.add_host("n3", state="lost")
        vm = self.store.add_vm(user_state="connected", l7r_host_id=lost, l7r_pid=7,
                               l7r_session="theirs")
        session = self.session(vm)
        self.successResultOf(defer.ensureDeferred(self.broker.takeover(session)))
        self.assertEqual(self.store.vms[vm]["l7r_session"], session.id)
        self.assertEqual(self.store.notified, [])


class NotifyTests(unittest.TestCase):

    def setUp(self):
        self.clock = task.Clock()
        self.broker = Broker(self.clock, None, BrokerSettings(), None, pid=100,
                             store=FakeRuntimeStore(now=self.clock.seconds))

    def test_wakes_only_the_sessions_of_that_vm(self):
        """A state change of VM 7 wakes VM 7's sessions, no other, and none once released."""
        mine = [self.broker.new_session(7, _Conn()) for _ in range(2)]
        other = self.broker.new_session(8, _Conn())
        sleeps = {s: s.sleep(60) for s in mine + [other]}
        self.broker.vm_state_changed("7:running")
        for s in mine:
            self.successResultOf(sleeps[s])
        self.assertNoResult(sleeps[other])
        for s in mine:
            self.broker.release(s)
        again = mine[0].sleep(60)
        self.broker.vm_state_changed("7:stopped")
        self.assertNoResult(again)
        self.clock.advance(60)
        self.successResultOf(sleeps[other])

    def test_bad_payload_logged(self):
        """A payload without a VM id is logged and ignored, never raised."""
        from twisted.logger import globalLogPublisher
        seen = []
        observer = seen.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        waiting = self.broker.new_session(7, _Conn()).sleep(60)
        self.broker.vm_state_changed("garbage")
        self.broker.vm_state_changed("")
        self.assertNoResult(waiting)
        payloads = [e.get("payload") for e in seen
                    if "names no VM" in e.get("log_format", "")]
        self.assertEqual(payloads, ["garbage", ""])
