"""
Tests for qvd.runtime.session: the user session machine as a table, driven
on a task.Clock with the real BrokerSettings, and the verdict on claims.
"""

from twisted.internet import task
from twisted.trial import unittest

from qvd.l7r.broker import BrokerSettings
from qvd.runtime.session import (
    CONNECTING, ENDING, ENTER, ROW, TIMEOUTS, TRANSITIONS, Claim, Claimant, UnexpectedEvent,
    UserSession, claim_verdict)


class TableTests(unittest.TestCase):

    def test_every_state_has_a_timeout_edge(self):
        """Every state but 'disconnected' has a timeout, and an edge for it."""
        for state in ROW:
            if state == "disconnected":
                self.assertNotIn(state, TIMEOUTS)
                continue
            self.assertIn((state, "timeout"), TRANSITIONS, state)
            self.assertGreater(TIMEOUTS[state](BrokerSettings()), 0, state)

    def test_every_target_is_a_state_with_entry_actions(self):
        for (state, event), target in TRANSITIONS.items():
            self.assertIn(state, ROW)
            self.assertIn(target, ENTER)

    def test_every_state_reaches_disconnected(self):
        """
        From every state, by failures and timeouts only (the client gone,
        the L7R's pace), the session ends 'disconnected' after a release;
        and 'released' is the only way in.
        """
        for start in ROW:
            if start == "disconnected":
                continue
            m = UserSession(state=start)
            seen = []
            while m.state != "disconnected":
                self.assertLess(len(seen), 10, f"no way out from {start}: {seen}")
                seen.append(m.state)
                event = "released" if m.state == "releasing" else "client_gone"
                self.assertIsNotNone(m.handle(event), (m.state, event))
        entries = {event for (state, event), new in TRANSITIONS.items()
                   if new == "disconnected"}
        self.assertEqual(entries, {"released"})

    def test_every_connecting_state_can_be_aborted(self):
        """Takeover, a failure, a timeout or the client leaving end each step."""
        for state in CONNECTING + ("connected",):
            for event in ("abort", "failed", "client_gone"):
                self.assertEqual(TRANSITIONS[(state, event)], "releasing", (state, event))

    def test_happy_path(self):
        m = UserSession()
        events = ("connect", "claimed", "assigned", "vm_running", "x_started", "x_listening",
                  "nx_connected")
        steps = [m.handle(e) for e in events]
        self.assertEqual([s.new for s in steps],
                         ["claiming", "assigning", "starting_vm", "starting_x", "waiting_x",
                          "connecting_x", "connected"])
        self.assertEqual([s.actions for s in steps],
                         [("claim",), ("assign",), ("start_vm",), ("start_x",), ("wait_x",),
                          ("connect_x",), ("relay",)])
        self.assertEqual([ROW[s.new] for s in steps],
                         [None] + ["connecting"] * 5 + ["connected"])
        end = [m.handle("client_gone"), m.handle("released")]
        self.assertEqual([s.new for s in end], ["releasing", "disconnected"])
        self.assertEqual(m.row, "disconnected")

    def test_held_claim_aborts_the_other_and_claims_again(self):
        m = UserSession(state="claiming")
        step = m.handle("held")
        self.assertEqual((step.new, step.actions), ("claiming", ("abort_other", "wait", "claim")))

    def test_connected_timeout_checks_the_claim(self):
        m = UserSession(state="connected")
        step = m.handle("timeout")
        self.assertEqual((step.new, step.actions), ("connected", ("check_claim",)))
        step = m.handle("abort", "Aborted by contending session VM VM_ID: 3")
        self.assertEqual((step.new, step.actions), ("releasing", ("cut_relay", "release")))

    def test_failed_release_is_retried(self):
        m = UserSession(state="releasing")
        self.assertEqual(m.handle("failed").actions, ("wait", "release"))
        self.assertEqual(m.handle("timeout").actions, ("release",))
        self.assertEqual(m.state, "releasing")

    def test_late_events_are_ignored(self):
        """Once the session ends, an answer of an abandoned step moves nothing."""
        for state in ENDING:
            m = UserSession(state=state)
            for event in ("claimed", "vm_running", "x_listening", "nx_connected", "abort",
                          "client_gone"):
                self.assertIsNone(m.handle(event), (state, event))
            self.assertEqual(m.state, state)

    def test_unexpected_events_are_loud(self):
        """A connecting state given an event it has no edge for raises."""
        for state in CONNECTING + ("connected",):
            m = UserSession(state=state)
            with self.assertRaises(UnexpectedEvent):
                m.handle("released")
            self.assertEqual(m.state, state)
        with self.assertRaises(UnexpectedEvent):
            UserSession(state="waiting_x").handle("vm_running")

    def test_first_reason_is_kept(self):
        m = UserSession(state="waiting_x")
        m.handle("failed", "Unable to start X session on VM 1, state went to stopped")
        m.handle("failed", "later")
        self.assertEqual(m.reason, "Unable to start X session on VM 1, state went to stopped")
        m.handle("released")
        m.handle("connect")
        self.assertIsNone(m.reason)


class ClockTests(unittest.TestCase):
    """
    The machine run as the broker runs it: every state entered arms its
    timeout from the session's settings on a clock; the step's answer, or
    the timeout, moves it.
    """

    def run_machine(self, settings, answers):
        """
        Drive a session through its states; C{answers[state]} is (seconds,
        event) of the step's outcome, or missing for a step that never
        answers. Returns [(time, state)] of every state entered.
        """
        clock = task.Clock()
        m = UserSession()
        entered = []
        timer, answer = [], []

        def cancel(calls):
            for call in calls:
                if call.active():
                    call.cancel()
            calls.clear()

        def enter(step):
            # every transition re-arms the state's timeout; a new state also
            # gets its step's answer (a state re-entered keeps the pending one)
            cancel(timer)
            entered.append((clock.seconds(), step.new))
            if step.new != step.old:
                cancel(answer)
                if step.new in answers:
                    seconds, event = answers[step.new]
                    answer.append(clock.callLater(seconds, feed, event))
            if step.new != "disconnected":
                timer.append(clock.callLater(m.timeout(settings), feed, "timeout"))

        def feed(event):
            step = m.handle(event)
            if step is not None:
                enter(step)

        enter(m.handle("connect"))
        for _ in range(2000):
            if m.state == "disconnected":
                break
            clock.advance(0.5)
        return entered

    def test_login(self):
        settings = BrokerSettings()
        answers = {"claiming": (0.01, "claimed"), "assigning": (0.02, "assigned"),
                   "starting_vm": (1.3, "vm_running"), "starting_x": (0.1, "x_started"),
                   "waiting_x": (0.4, "x_listening"), "connecting_x": (0.01, "nx_connected"),
                   "connected": (600, "client_gone"), "releasing": (0.01, "released")}
        entered = self.run_machine(settings, answers)
        states = [s for _, s in entered]
        self.assertEqual(states[:7], ["claiming", "assigning", "starting_vm", "starting_x",
                                      "waiting_x", "connecting_x", "connected"])
        self.assertEqual(states[-2:], ["releasing", "disconnected"])
        # connected is checked again every abort_poll seconds until the client goes
        checks = [t for t, s in entered if s == "connected"]
        self.assertEqual(len(checks), 1 + int(600 // settings.abort_poll))
        self.assertAlmostEqual(entered[-2][0] - checks[0], 600, delta=0.6)

    def test_vm_that_never_starts_ends_at_its_timeout(self):
        """A VM that never runs: the session gives up after vm_start seconds."""
        settings = BrokerSettings(vm_start=20.0)
        answers = {"claiming": (0.0, "claimed"), "assigning": (0.0, "assigned"),
                   "releasing": (0.0, "released")}
        entered = dict((s, t) for t, s in self.run_machine(settings, answers))
        self.assertAlmostEqual(entered["releasing"] - entered["starting_vm"], 20.0, delta=0.5)
        self.assertIn("disconnected", entered)

    def test_release_retried_until_the_database_answers(self):
        settings = BrokerSettings(release_retry=5.0)
        answers = {"claiming": (0.0, "failed")}
        clock_states = self.run_machine(settings, answers)
        # the release never answers: retried every 5 s, never 'disconnected'
        releases = [t for t, s in clock_states if s == "releasing"]
        self.assertGreater(len(releases), 100)
        self.assertEqual({b - a for a, b in zip(releases, releases[1:])}, {5.0})
        self.assertNotIn("disconnected", [s for _, s in clock_states])


class ClaimVerdictTests(unittest.TestCase):
    """claim_verdict: every case of a claim found on a VM's row."""

    me = Claimant(host_id=1, pid=100, pids=frozenset({100}), live_sessions={"mine"},
                  pid_alive=lambda pid: pid == 200)

    def verdict(self, **row):
        return claim_verdict(Claim(**row), self.me, claim_max_age=330)

    def test_table(self):
        cases = [
            (dict(user_state="disconnected"), "free"),
            (dict(user_state="connected", l7r_host_id=None), "free"),
            (dict(user_state="connecting", l7r_host_id=2, age=331, owner_state="running"),
             "expired"),
            (dict(user_state="connected", l7r_host_id=2, age=3310, owner_state="running"),
             "held"),
            (dict(user_state="connected", l7r_host_id=1, l7r_pid=100, l7r_session="mine"),
             "held"),
            (dict(user_state="connected", l7r_host_id=1, l7r_pid=100, l7r_session="gone"),
             "dead_l7r"),
            (dict(user_state="connecting", l7r_host_id=1, l7r_pid=200, l7r_session="x"),
             "held"),
            (dict(user_state="connecting", l7r_host_id=1, l7r_pid=300, l7r_session="x"),
             "dead_l7r"),
            (dict(user_state="connected", l7r_host_id=2, owner_state="lost"), "dead_l7r"),
            (dict(user_state="connected", l7r_host_id=2, owner_state=None), "dead_l7r"),
            (dict(user_state="connected", l7r_host_id=2, owner_state="running"), "held"),
        ]
        for row, expected in cases:
            self.assertEqual(self.verdict(**row), expected, row)
