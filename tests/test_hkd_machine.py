"""
Tests for qvd.hkd.machine: the VM state machine as a pure table.
"""

from twisted.trial import unittest

from qvd.hkd.machine import ENTER, PERSISTED, TRANSITIONS, Liveness, VMMachine


class MachineTableTests(unittest.TestCase):

    def test_every_state_has_a_timeout_edge(self):
        """
        Every state but 'stopped' leaves on a timeout (no state can hang).
        """
        for state in PERSISTED:
            if state == "stopped":
                continue
            self.assertIn((state, "timeout"), TRANSITIONS, state)

    def test_every_target_is_a_state_with_entry_actions(self):
        """
        Every transition leads to a known state that says what to do on entry.
        """
        for (state, event), target in TRANSITIONS.items():
            self.assertIn(state, PERSISTED)
            self.assertIn(target, PERSISTED)
            self.assertIn(target, ENTER)

    def test_every_state_reaches_stopped(self):
        """
        From every state, following failure edges (failed, timeout) leads to
        'stopped' through states whose happy edge ends there.
        """
        happy = {"loading": "failed", "preparing": "failed", "booting": "failed",
                 "waiting_vma": "timeout", "running": "stop", "debugging": "stop",
                 "powering_off": "timeout", "shutting_down": "timeout",
                 "killing": "killed", "cleaning": "cleaned", "zombie": "reaped"}
        for start in happy:
            state, seen = start, []
            while state != "stopped":
                self.assertNotIn(state, seen, f"loop from {start}: {seen}")
                seen.append(state)
                state = TRANSITIONS[(state, happy[state])]

    def test_start_path(self):
        """
        start -> loading -> preparing -> booting -> waiting_vma -> running,
        persisted as starting until the agent answers; run_ok is counted then.
        """
        m = VMMachine()
        steps = [m.handle(e) for e in ("start", "loaded", "prepared", "booted", "vma_ok")]
        self.assertEqual([s.new for s in steps],
                         ["loading", "preparing", "booting", "waiting_vma", "running"])
        self.assertEqual(PERSISTED["waiting_vma"], "starting")
        self.assertEqual(steps[-1].actions[0], "count_ok")
        self.assertEqual(m.persisted, "running")

    def test_unexpected_event_is_ignored(self):
        """
        An event the current state does not expect changes nothing.
        """
        m = VMMachine()
        self.assertIsNone(m.handle("prepared"))
        self.assertEqual(m.state, "stopped")

    def test_first_reason_is_kept(self):
        """
        The first failure reason is kept through the stop sequence; a new
        start clears it.
        """
        m = VMMachine()
        m.handle("start")
        m.handle("failed", "no usable disk image")
        m.handle("failed", "cleanup failed")
        self.assertEqual(m.state, "zombie")
        self.assertEqual(m.reason, "no usable disk image")
        m.handle("reaped")
        m.handle("start")
        self.assertIsNone(m.reason)

    def test_dead_agent_with_debug(self):
        """
        With debugging enabled a dead agent leads to 'debugging', and an
        answer brings the VM back to 'running'; without, to a shutdown.
        """
        m = VMMachine(debug=True, state="running")
        self.assertEqual(m.handle("vma_dead").new, "debugging")
        self.assertEqual(m.handle("vma_ok").new, "running")
        self.assertEqual(VMMachine(state="running").handle("vma_dead").new, "shutting_down")


class LivenessTests(unittest.TestCase):

    def test_needs_failures_and_seconds(self):
        """
        The agent is dead only after both enough failures and enough silence.
        """
        live = Liveness(max_failures=3, max_seconds=20)
        live.reset(100)
        self.assertFalse(live.failed(101))
        self.assertFalse(live.failed(102))
        self.assertFalse(live.failed(119))   # 3 failures, 19 s
        self.assertTrue(live.failed(120))
        live.ok(121)
        self.assertFalse(live.failed(150))   # 30 s but 1 failure
