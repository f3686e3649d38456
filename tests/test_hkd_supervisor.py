"""
Tests for qvd.hkd.supervisor: one VM's supervisor with a fake clock, the fake
hypervisor, fake agents and an in-memory store.
"""

from twisted.internet import defer, task
from twisted.trial import unittest

from qvd.hkd.store import StartError
from qvd.hkd.supervisor import Supervisor, SupervisorSettings
from qvd.testing.fakestore import FakeStore, make_spec
from qvd.testing.fakevirt import FakeHypervisor, FakeVMA
from qvd.virt.interfaces import VirtError

TIMEOUTS = {"loading": 10, "preparing": 20, "booting": 30, "waiting_vma": 40,
            "running": 0, "debugging": 50, "powering_off": 60, "shutting_down": 70,
            "killing": 80, "cleaning": 90, "zombie": 100}
VM = 7


class SupervisorTestCase(unittest.TestCase):

    def setUp(self):
        self.clock = task.Clock()
        self.hv = FakeHypervisor(self.clock)
        self.vma = FakeVMA(self.hv)
        self.store = FakeStore()
        self.ip = make_spec(VM).ip

    def supervisor(self, debug=False, **settings):
        s = SupervisorSettings(timeouts=TIMEOUTS, debug=debug, ping_starting=0.5,
                               ping_interval=5, dead_failures=3, dead_seconds=20,
                               retry_delay=1, **settings)
        self.changes = []
        sup = Supervisor(VM, self.clock, self.store, self.hv, self.vma, s,
                         on_change=lambda sup, step: self.changes.append(step.new))
        return sup

    def running(self, **kw):
        sup = self.supervisor(**kw)
        sup.handle("start")
        self.clock.advance(0)
        self.assertEqual(sup.state, "running")
        return sup

    def advance(self, seconds, step=0.25):
        """
        Advance the clock in small steps, so periodic calls run as they would.
        """
        while seconds > 1e-9:
            chunk = min(step, seconds)
            self.clock.advance(chunk)
            seconds -= chunk

    def persisted(self):
        return [s for s, r in self.store.states[VM]]

    def assertStoppedWith(self, sup, text):
        self.assertEqual(sup.state, "stopped")
        state, reason = self.store.last(VM)
        self.assertEqual(state, "stopped")
        if text is None:
            self.assertIsNone(reason)
        else:
            self.assertIn(text, reason or "")
        self.assertNotIn(VM, self.hv.running)
        self.assertNotIn(VM, self.hv.prepared)


class StartTests(SupervisorTestCase):

    def test_start_reaches_running(self):
        """
        A start loads, prepares, starts and waits for the agent; its first
        answer makes the VM running, persisted, with run_ok counted.
        """
        sup = self.supervisor()
        sup.handle("start")
        self.clock.advance(0)
        self.assertEqual(sup.state, "running")
        self.assertEqual(self.persisted(), ["starting", "running"])
        self.assertEqual(self.store.ok_counts, {VM: 1})
        self.assertEqual([c for c, _ in self.hv.calls], ["prepare", "start"])

    def test_agent_answers_late(self):
        """
        The agent is pinged every 0.5 s while the VM starts; the VM is running
        at the first answer.
        """
        self.vma.silent.add(self.ip)
        sup = self.supervisor()
        sup.handle("start")
        self.clock.advance(0)
        self.clock.advance(3)
        self.assertEqual(sup.state, "waiting_vma")
        self.vma.silent.discard(self.ip)
        self.clock.advance(0.5)
        self.assertEqual(sup.state, "running")

    def test_missing_di(self):
        """
        A VM whose OSF has no usable DI ends stopped, with the reason recorded
        and nothing left on the driver.
        """
        self.store.load_error = StartError("no usable disk image: OSF 1 has no DI tagged 'x'")
        sup = self.supervisor()
        sup.handle("start")
        self.assertStoppedWith(sup, "no usable disk image")
        self.assertNotIn("prepare", [c for c, _ in self.hv.calls])

    def test_prepare_failure(self):
        """
        A failed prepare (unpack failure) ends stopped with the driver's
        message, after a cleanup.
        """
        self.hv.fail["prepare"] = VirtError("cannot unpack the DI: disk full")
        sup = self.supervisor()
        sup.handle("start")
        self.assertStoppedWith(sup, "disk full")
        self.assertEqual([c for c, _ in self.hv.calls], ["prepare", "cleanup"])

    def test_start_failure_kills_and_cleans(self):
        """
        A failed driver start kills and cleans up, and ends stopped with the reason.
        """
        self.hv.fail["start"] = VirtError("lxc-start failed")
        sup = self.supervisor()
        sup.handle("start")
        self.assertStoppedWith(sup, "lxc-start failed")
        self.assertEqual([c for c, _ in self.hv.calls], ["prepare", "start", "kill", "cleanup"])

    def test_stop_while_preparing_waits_for_prepare(self):
        """
        A stop during a slow prepare cleans up only after the prepare has
        finished (driver calls never overlap), and the VM never starts.
        """
        self.hv.delay["prepare"] = 5
        sup = self.supervisor()
        sup.handle("start")
        self.clock.advance(1)
        sup.handle("stop")
        self.assertEqual(self.hv.calls, [("prepare", VM)])
        self.clock.advance(4)
        self.assertEqual([c for c, _ in self.hv.calls], ["prepare", "cleanup"])
        self.assertStoppedWith(sup, None)


class TimeoutTests(SupervisorTestCase):
    """
    Each state leaves on its timeout, not a moment earlier.
    """

    def edge(self, sup, state, seconds, after):
        self.clock.advance(seconds - 0.01)
        self.assertEqual(sup.state, state)
        self.clock.advance(0.01)
        self.assertNotEqual(sup.state, state)
        self.assertIn(after, self.changes)

    def test_loading(self):
        """
        Reading the VM's rows longer than the loading timeout ends stopped.
        """
        self.store.load_result = defer.Deferred()
        sup = self.supervisor()
        sup.handle("start")
        self.edge(sup, "loading", 10, "cleaning")
        self.assertStoppedWith(sup, "reading the VM's configuration")

    def test_preparing(self):
        """
        A prepare that hangs is cancelled at the preparing timeout and cleaned up.
        """
        self.hv.hang.add("prepare")
        sup = self.supervisor()
        sup.handle("start")
        self.edge(sup, "preparing", 20, "cleaning")
        self.assertStoppedWith(sup, "preparing the VM's storage")

    def test_booting(self):
        """
        A driver start that hangs is abandoned at the booting timeout; the VM
        is killed and cleaned up.
        """
        self.hv.hang.add("start")
        sup = self.supervisor()
        sup.handle("start")
        self.edge(sup, "booting", 30, "killing")
        self.assertStoppedWith(sup, "did not start the VM within 30")

    def test_waiting_vma(self):
        """
        An agent that never answers stops the VM at the waiting_vma timeout.
        """
        self.vma.silent.add(self.ip)
        sup = self.supervisor()
        sup.handle("start")
        self.clock.advance(0)
        self.edge(sup, "waiting_vma", 40, "shutting_down")
        self.assertStoppedWith(sup, "agent did not answer within 40")

    def test_powering_off_then_shutting_down_then_killing(self):
        """
        Stop escalation: agent poweroff ignored -> driver shutdown after the
        powering_off timeout; shutdown ignored -> kill after the shutting_down
        timeout; then cleanup and stopped.
        """
        sup = self.running()
        self.vma.poweroff_works = False
        self.hv.shutdown_stops = False
        sup.handle("stop")
        self.assertEqual(self.vma.calls[-1][0], "poweroff")
        self.edge(sup, "powering_off", 60, "shutting_down")
        self.assertEqual(self.hv.calls[-1], ("shutdown", VM))
        self.edge(sup, "shutting_down", 70, "killing")
        self.assertStoppedWith(sup, "did not power off within 60")
        self.assertEqual([c for c, _ in self.hv.calls][-3:], ["shutdown", "kill", "cleanup"])

    def test_poweroff_works(self):
        """
        A stop of a running VM whose agent powers off ends stopped without a
        reason and without a driver shutdown.
        """
        sup = self.running()
        self.vma.poweroff_delay = 3
        sup.handle("stop")
        self.clock.advance(3)
        self.assertStoppedWith(sup, None)
        self.assertNotIn("shutdown", [c for c, _ in self.hv.calls])
        self.assertEqual(self.persisted(), ["starting", "running", "stopping", "stopped"])

    def test_killing_then_zombie_then_reaped(self):
        """
        A kill that hangs makes the VM a zombie at the killing timeout; the
        zombie is reaped again every zombie timeout until it works.
        """
        sup = self.running()
        self.hv.hang.add("kill")
        sup.handle("disowned", "test")
        self.edge(sup, "killing", 80, "zombie")
        self.assertEqual(self.store.last(VM)[0], "zombie")
        self.clock.advance(100)
        self.assertEqual(sup.state, "zombie")
        self.hv.hang.discard("kill")
        self.clock.advance(100)
        self.assertStoppedWith(sup, "test")

    def test_cleaning(self):
        """
        A cleanup that hangs makes the VM a zombie at the cleaning timeout.
        """
        sup = self.running()
        self.hv.hang.add("cleanup")
        self.hv.die(VM)
        self.edge(sup, "cleaning", 90, "zombie")

    def test_debugging(self):
        """
        A VM kept in 'debugging' is shut down at the debugging timeout.
        """
        sup = self.running(debug=True)
        self.vma.silent.add(self.ip)
        self.advance(20)
        self.assertEqual(sup.state, "debugging")
        self.edge(sup, "debugging", 50, "shutting_down")
        self.assertStoppedWith(sup, "did not answer")


class MonitorTests(SupervisorTestCase):

    def test_silent_agent_stops_vm(self):
        """
        A running VM whose agent stays silent for 3 pings AND 20 s is stopped,
        with the reason recorded; at 19.99 s it still runs.
        """
        sup = self.running()
        self.vma.silent.add(self.ip)
        self.advance(19.99)
        self.assertEqual(sup.state, "running")
        self.advance(0.01)
        self.assertStoppedWith(sup, "did not answer 4 pings in 20 s")

    def test_silent_agent_debugging_and_back(self):
        """
        With hkd.vm.debug.enable the VM goes 'debugging' instead, and comes
        back to 'running' when the agent answers again.
        """
        sup = self.running(debug=True)
        self.vma.silent.add(self.ip)
        self.advance(20)
        self.assertEqual(sup.state, "debugging")
        self.assertEqual(self.store.last(VM)[0], "debugging")
        self.assertIn(VM, self.hv.running)
        self.vma.silent.discard(self.ip)
        self.advance(5)
        self.assertEqual(sup.state, "running")
        self.assertEqual(self.store.ok_counts, {VM: 1})

    def test_vm_dies(self):
        """
        A VM that stops by itself is cleaned up and recorded as stopped, with
        the reason.
        """
        sup = self.running()
        self.hv.die(VM)
        self.assertStoppedWith(sup, "stopped by itself")

    def test_hard_expiration(self):
        """
        A hard expiration stops the VM through the agent.
        """
        sup = self.running()
        sup.handle("expire_hard", "the VM's hard expiration has passed")
        self.assertStoppedWith(sup, "hard expiration")

    def test_soft_expiration_once(self):
        """
        A soft expiration is told to the agent once per expiration time.
        """
        sup = self.running()
        sup.expire_soft("t1")
        sup.expire_soft("t1")
        sup.expire_soft("t2")
        self.assertEqual([a for m, h, a in self.vma.calls if m == "expire"],
                         [("soft",), ("soft",)])


class PersistenceTests(SupervisorTestCase):

    def test_writes_retry_while_database_down(self):
        """
        State writes that fail (PostgreSQL down) are retried every
        hkd.database.retry.delay seconds; the newest state wins.
        """
        sup = self.running()
        self.store.down = True
        sup.handle("stop")
        self.clock.advance(0)
        self.assertEqual(sup.state, "stopped")
        self.assertEqual(self.store.last(VM)[0], "running")
        stopped = sup.whenStopped()
        self.assertFalse(stopped.called)
        self.store.down = False
        self.clock.advance(1)
        self.assertEqual(self.store.last(VM), ("stopped", None))
        self.assertTrue(stopped.called)

    def test_disowned_vm_is_killed(self):
        """
        If a state write finds the VM no longer assigned to this node, the
        local copy is killed and cleaned up.
        """
        sup = self.running()
        self.store.owned = False
        self.vma.silent.add(self.ip)
        self.hv.shutdown_stops = False
        sup.handle("stop")
        self.assertEqual(sup.state, "stopped")
        self.assertIn(("kill", VM), self.hv.calls)
        self.assertNotIn(VM, self.hv.running)

    def test_detach_leaves_vm_running(self):
        """
        Detaching (HKD shutdown) stops pings and timers but not the VM.
        """
        sup = self.running()
        sup.detach()
        pings = len(self.vma.calls)
        self.clock.advance(100)
        self.assertEqual(len(self.vma.calls), pings)
        self.assertIn(VM, self.hv.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SecretAndFilterTests(SupervisorTestCase):

    def test_pings_carry_the_secret(self):
        """The HKD's agent calls carry the secret of the VM's current start."""
        import attrs
        self.store.load_result = defer.succeed(attrs.evolve(make_spec(VM), vma_secret="k7"))
        self.running()
        self.assertEqual(self.vma.secrets[self.ip], "k7")

    def test_filter_while_preparing(self):
        """
        The packet filter is installed while the driver prepares the VM (the
        two overlap), and the driver starts the VM only once both are done.
        """
        events = []
        allowed = defer.Deferred()

        class Firewall:
            def allow(self, port):
                events.append("allow")
                return allowed

            def forget(self, vm_id):
                return defer.succeed(None)
        self.hv.port_name = lambda vm_id: f"qvd{vm_id}"
        self.hv.delay["prepare"] = 1.0
        original = self.hv.start
        self.hv.start = lambda spec: (events.append("start"), original(spec))[1]
        sup = self.supervisor()
        sup.firewall = Firewall()
        sup.handle("start")
        self.clock.advance(0)
        self.assertEqual((sup.state, events), ("preparing", ["allow"]))
        self.advance(1.5)
        self.assertEqual((sup.state, events), ("booting", ["allow"]))
        allowed.callback(None)
        self.clock.advance(0)
        self.assertEqual(events, ["allow", "start"])
        self.assertEqual(sup.state, "running")

    def test_filter_before_start_and_removed_after(self):
        """
        The VM's packet filter is installed before the driver starts it and
        removed once it is cleaned up; a filter that cannot be installed
        fails the start without starting anything.
        """
        events = []

        class Firewall:
            fail = False

            def allow(self, port):
                events.append(("allow", port.interface, self.fail))
                return defer.fail(VirtError("nft refused")) if self.fail else defer.succeed(None)

            def forget(self, vm_id):
                events.append(("forget", vm_id))
                return defer.succeed(None)
        self.hv.port_name = lambda vm_id: f"qvd{vm_id}"
        original = self.hv.start
        self.hv.start = lambda spec: (events.append(("start", spec.vm_id)), original(spec))[1]
        firewall = Firewall()
        sup = self.running()
        sup.firewall = firewall
        sup.handle("stop")
        self.advance(5)
        sup2 = self.supervisor()
        sup2.firewall = firewall
        sup2.handle("start")
        self.clock.advance(0)
        self.assertEqual(sup2.state, "running")
        firewall.fail = True
        sup2.handle("stop")
        self.advance(5)
        sup3 = self.supervisor()
        sup3.firewall = firewall
        sup3.handle("start")
        self.advance(5)
        self.assertEqual(sup3.state, "stopped")
        self.assertEqual(events[-4:-1], [("start", VM), ("forget", VM), ("allow", f"qvd{VM}", True)])
        self.assertEqual(events.count(("start", VM)), 2)
