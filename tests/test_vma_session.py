"""
The VMA's X-session state machine, fed nxagent's real lines, with task.Clock.
"""

from twisted.internet import task
from twisted.trial import unittest
from zope.interface import implementer
from zope.interface.verify import verifyObject

from qvd.vma.session import (
    ISessionEffects, InvalidTransition, NxLine, SessionMachine, Timeouts, parse_nxagent_line)

# Lines as nx-libs 3.5.99.26's nxagent prints them (captured on this machine).
PID = "Info: Agent running with pid '15118'."
STARTING = "Session: Starting session at 'Thu Nov 26 01:19:21 2026'."
STARTED = "Session: Session started at 'Thu Nov 26 01:19:27 2026'."
FAILURE = "Session: Display failure detected at 'Thu Nov 26 01:19:32 2026'."
SUSPENDING = "Session: Suspending session at 'Thu Nov 26 01:19:32 2026'."
SUSPENDED = "Session: Session suspended at 'Thu Nov 26 01:19:33 2026'."
RESUMING = "Session: Resuming session at 'Thu Nov 26 01:19:34 2026'."
RESUMED = "Session: Session resumed at 'Thu Nov 26 01:19:36 2026'."
TERMINATING = "Session: Terminating session at 'Thu Nov 26 01:19:44 2026'."
TERMINATED = "Session: Session terminated at 'Thu Nov 26 01:19:44 2026'."
ABORTING = "Session: Aborting session at 'Thu Nov 26 01:19:45 2026'."


@implementer(ISessionEffects)
class RecordingEffects:
    def __init__(self):
        self.events = []
        self.alive = True

    def state_changed(self, old, new):
        self.events.append(("state", old, new))

    def signal(self, name):
        self.events.append(("signal", name))
        return self.alive


class LineTests(unittest.TestCase):

    def test_lines(self):
        """nxagent's pid, state, slave and media lines are recognised; others are not."""
        self.assertEqual(parse_nxagent_line(PID), NxLine("pid", 15118))
        self.assertEqual(parse_nxagent_line(STARTING), NxLine("state", "starting"))
        self.assertEqual(parse_nxagent_line(STARTED), NxLine("state", "started"))
        self.assertEqual(parse_nxagent_line(SUSPENDED), NxLine("state", "suspended"))
        self.assertEqual(
            parse_nxagent_line("Info: Listening to slave connections on port '11100'."),
            NxLine("slave", 11100))
        self.assertEqual(
            parse_nxagent_line("Info: Listening to multimedia connections on port 'tcp:localhost:7100'."),
            NxLine("media", 7100))
        self.assertIsNone(parse_nxagent_line(FAILURE))
        self.assertIsNone(parse_nxagent_line("Info: Waiting for connection from any host on socket 'tcp:*:4100'."))


class MachineTests(unittest.TestCase):

    def setUp(self):
        self.clock = task.Clock()
        self.effects = RecordingEffects()
        self.machine = SessionMachine(self.clock, Timeouts(), self.effects)

    def feed(self, *lines):
        for line in lines:
            self.machine.line(line)

    def states(self):
        return [e[2] for e in self.effects.events if e[0] == "state"]

    def running(self):
        self.machine.start()
        self.machine.provisioning()
        self.machine.spawned()
        self.feed(PID, STARTING, STARTED)

    def test_effects_interface(self):
        """The recording fake provides ISessionEffects."""
        verifyObject(ISessionEffects, self.effects)

    def test_full_life(self):
        """A session goes through every state in order, driven by nxagent's lines."""
        self.running()
        self.assertEqual(self.machine.pid, 15118)
        self.feed(FAILURE, SUSPENDING, SUSPENDED)
        self.machine.resume()
        self.feed(RESUMING, RESUMED)
        self.machine.stop()
        self.feed(TERMINATING, TERMINATED)
        self.assertEqual(self.machine.state, "stopping")
        self.machine.exited()
        self.assertEqual(self.states(), [
            "starting", "provisioning", "starting", "listening", "connected", "suspending",
            "suspended", "starting", "listening", "connected", "stopping", "stopped"])
        self.assertEqual([e for e in self.effects.events if e[0] == "signal"],
                         [("signal", "HUP"), ("signal", "TERM")])

    def test_resume_retried_until_resuming(self):
        """
        A resume HUPs nxagent again every resume_retry seconds until it says
        "Resuming" (it drops the first HUP after a broken-link suspend);
        then no more HUPs.
        """
        self.running()
        self.feed(FAILURE, SUSPENDING, SUSPENDED)
        self.machine.resume()
        hups = lambda: [e for e in self.effects.events if e == ("signal", "HUP")]
        self.assertEqual(len(hups()), 1)
        self.clock.advance(Timeouts().resume_retry)
        self.assertEqual(len(hups()), 2)
        self.clock.advance(Timeouts().resume_retry)
        self.assertEqual(len(hups()), 3)
        self.feed(RESUMING)
        self.clock.advance(Timeouts().resume_retry * 3)  # < the listening timeout
        self.assertEqual(len(hups()), 3)
        self.assertEqual(self.machine.state, "listening")

    def test_resume_retry_stops_on_any_change(self):
        """
        No resume retry HUPs a session that left that starting state another
        way (stopped, or resumed and suspended again).
        """
        self.running()
        self.feed(SUSPENDING, SUSPENDED)
        self.machine.resume()
        self.machine.stop()
        n = len(self.effects.events)
        self.clock.advance(Timeouts().resume_retry * 3)
        self.assertEqual(len(self.effects.events), n)

    def test_start_only_when_stopped(self):
        """start is refused in any state but stopped; resume only when suspended."""
        self.running()
        self.assertRaises(InvalidTransition, self.machine.start)
        self.assertRaises(InvalidTransition, self.machine.resume)

    def test_suspend_request(self):
        """suspend HUPs a connected session; the state follows nxagent's lines."""
        self.running()
        self.machine.suspend()
        self.assertEqual(self.machine.state, "connected")
        self.assertEqual(self.effects.events[-1], ("signal", "HUP"))
        self.feed(SUSPENDING, SUSPENDED)
        self.assertEqual(self.machine.state, "suspended")

    def test_suspend_ignored_when_suspended(self):
        """suspend does nothing to a suspended session."""
        self.running()
        self.feed(SUSPENDING, SUSPENDED)
        n = len(self.effects.events)
        self.machine.suspend()
        self.assertEqual(len(self.effects.events), n)

    def test_starting_timeout(self):
        """If nxagent never listens within timeouts.starting, it gets TERM."""
        self.machine.start()
        self.clock.advance(19.9)
        self.assertEqual(self.machine.state, "starting")
        self.clock.advance(0.1)
        self.assertEqual(self.machine.state, "stopping")
        self.assertEqual(self.effects.events[-1], ("signal", "TERM"))

    def test_provisioning_timeout(self):
        """Provisioning hung for timeouts.provisioning stops the session."""
        self.machine.start()
        self.machine.provisioning()
        self.clock.advance(599)
        self.assertEqual(self.machine.state, "provisioning")
        self.effects.alive = False
        self.clock.advance(1)
        self.assertEqual(self.machine.state, "stopped")

    def test_listening_timeout_fresh(self):
        """A new session nobody connects to within timeouts.listening is terminated."""
        self.machine.start()
        self.feed(PID, STARTING)
        self.clock.advance(10)
        self.assertEqual(self.machine.state, "stopping")
        self.assertEqual(self.effects.events[-1], ("signal", "TERM"))

    def test_listening_timeout_resumed(self):
        """A resume nobody picks up suspends the session again instead of killing it."""
        self.running()
        self.feed(SUSPENDING, SUSPENDED)
        self.machine.resume()
        self.feed(RESUMING)
        self.clock.advance(10)
        self.assertEqual(self.machine.state, "suspending")
        self.assertEqual(self.effects.events[-1], ("signal", "HUP"))
        self.feed(SUSPENDED)
        self.assertEqual(self.machine.state, "suspended")

    def test_connected_no_limit(self):
        """By default a connected session has no time limit."""
        self.running()
        self.clock.advance(10 ** 7)
        self.assertEqual(self.machine.state, "connected")

    def test_connected_limit(self):
        """With timeouts.connected set, a session connected that long is suspended."""
        self.machine = SessionMachine(self.clock, Timeouts(connected=3600), self.effects)
        self.running()
        self.clock.advance(3600)
        self.assertEqual(self.effects.events[-1], ("signal", "HUP"))

    def test_suspended_limit(self):
        """With timeouts.suspended set, a session suspended that long is ended."""
        self.machine = SessionMachine(self.clock, Timeouts(suspended=60), self.effects)
        self.running()
        self.feed(SUSPENDING, SUSPENDED)
        self.clock.advance(59)
        self.assertEqual(self.machine.state, "suspended")
        self.clock.advance(1)
        self.assertEqual((self.machine.state, self.effects.events[-1]), ("stopping", ("signal", "TERM")))

    def test_suspending_timeout(self):
        """nxagent stuck suspending for timeouts.suspending gets TERM."""
        self.running()
        self.feed(SUSPENDING)
        self.clock.advance(20)
        self.assertEqual((self.machine.state, self.effects.events[-1]), ("stopping", ("signal", "TERM")))

    def test_stopping_timeout_kills(self):
        """A session that ignores TERM for timeouts.stopping gets KILL, and again after that."""
        self.running()
        self.machine.stop()
        self.clock.advance(20)
        self.assertEqual(self.effects.events[-1], ("signal", "KILL"))
        self.clock.advance(20)
        self.assertEqual(self.effects.events[-1], ("signal", "KILL"))
        self.machine.exited()
        self.assertEqual(self.machine.state, "stopped")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unused_session_killed_soon(self):
        """
        A session no client ever connected to that aborts (a client gone
        before NX negotiated) or is stopped gets KILL after stopping_unused
        (0.5 s), not after stopping (20 s): nothing in it to save.
        """
        for end in ("abort", "stop"):
            self.setUp()
            self.machine.start()
            self.machine.spawned()
            self.feed(PID, STARTING)
            if end == "abort":
                self.feed(ABORTING)
            else:
                self.machine.stop()
            self.assertEqual(self.machine.state, "stopping")
            self.clock.advance(0.4)
            self.assertNotEqual(self.effects.events[-1], ("signal", "KILL"))
            self.clock.advance(0.1)
            self.assertEqual(self.effects.events[-1], ("signal", "KILL"))
            self.machine.exited()
            self.assertEqual(self.machine.state, "stopped")

    def test_used_session_keeps_its_grace(self):
        """A session that was connected once keeps the full TERM grace before KILL."""
        self.running()
        self.feed(FAILURE, SUSPENDING, SUSPENDED)
        self.machine.resume()
        self.feed(RESUMING, ABORTING)
        self.clock.advance(19.9)
        self.assertNotIn(("signal", "KILL"), self.effects.events)
        self.clock.advance(0.1)
        self.assertEqual(self.effects.events[-1], ("signal", "KILL"))

    def test_stop_without_process(self):
        """Stopping when no process exists goes straight to stopped."""
        self.machine.start()
        self.effects.alive = False
        self.machine.stop()
        self.assertEqual(self.machine.state, "stopped")

    def test_terminated_waits_for_exit(self):
        """nxagent saying 'terminated' is stopping until the process has exited."""
        self.running()
        self.feed(TERMINATING, TERMINATED)
        self.assertEqual(self.machine.state, "stopping")
        self.machine.exited()
        self.assertEqual(self.machine.state, "stopped")

    def test_no_comeback_while_stopping(self):
        """Once stopping, late lines do not bring the session back."""
        self.running()
        self.machine.stop()
        self.feed(SUSPENDED)
        self.assertEqual(self.machine.state, "stopping")

    def test_crash(self):
        """The session process dying in any state is stopped, with no timer left."""
        self.running()
        self.machine.exited()
        self.assertEqual(self.machine.state, "stopped")
        self.assertIsNone(self.machine.pid)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_lines_when_stopped_ignored(self):
        """Lines arriving after the session stopped change nothing."""
        self.feed(STARTED)
        self.assertEqual(self.machine.state, "stopped")
