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
