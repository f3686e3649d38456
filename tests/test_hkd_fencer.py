"""
The fencer's decisions (qvd.hkd.fencer): the watchdog's table, the fencer's
loop on task.Clock, the commands that stop the desktops, the HKD's handle,
and the process itself (no desktops: hypervisor 'nothing').
"""

import os
import subprocess
import sys
import tempfile
import time

from twisted.internet import task
from twisted.trial import unittest

from qvd.hkd import fencer as F

LEASE, MARGIN = 10.0, 3.0


class WatchdogTableTests(unittest.TestCase):

    def test_every_state_has_a_timeout_edge(self):
        """Every state of the watchdog has a timeout edge, and every event an edge in each."""
        states = {s for s, _ in F.TRANSITIONS} | set(F.TRANSITIONS.values())
        self.assertEqual(states, set(F.ENTER))
        for state in states:
            self.assertIn((state, "timeout"), F.TRANSITIONS, state)
            for event in ("fed", "release"):
                self.assertIn((state, event), F.TRANSITIONS, (state, event))

    def test_unexpected_event_is_loud(self):
        """An event the table does not know raises; it is never dropped in silence."""
        w = F.Watchdog(LEASE, MARGIN, started=0.0)
        self.assertRaises(F.UnexpectedEvent, w.handle, "bogus", 0.0)

    def test_never_fed_fences_after_lease_minus_margin(self):
        """A watchdog never fed fences lease - margin seconds after it started."""
        w = F.Watchdog(LEASE, MARGIN, started=100.0)
        self.assertIsNone(w.poll(100.0 + LEASE - MARGIN - 0.01))
        step = w.poll(100.0 + LEASE - MARGIN)
        self.assertEqual((step.new, step.actions), ("fenced", ("fence",)))

    def test_fed_deadline_moves_the_fence(self):
        """
        Fed with a deadline, it fences at deadline - margin; a later feed
        moves that, an older (stale) deadline does not bring it forward.
        """
        w = F.Watchdog(LEASE, MARGIN, started=0.0)
        w.feed(0.0, 10.0)
        w.feed(1.0, 5.0)
        self.assertEqual(w.due(), 7.0)
        w.feed(6.0, 16.0)
        self.assertIsNone(w.poll(12.9))
        self.assertEqual(w.poll(13.0).new, "fenced")

    def test_fenced_rearms_when_fed(self):
        """After a fence a renewal arms it again; unrenewed, it fences again a lease later."""
        w = F.Watchdog(LEASE, MARGIN, started=0.0)
        w.poll(7.0)
        self.assertEqual(w.state, "fenced")
        self.assertEqual(w.poll(17.0).actions, ("fence",))
        w.feed(18.0, 28.0)
        self.assertEqual(w.state, "armed")
        self.assertIsNone(w.poll(24.9))

    def test_release_exits(self):
        step = F.Watchdog(LEASE, MARGIN, started=0.0).handle("release", 1.0)
        self.assertEqual((step.new, step.actions), ("released", ("exit",)))


class FeedTests(unittest.TestCase):

    def test_round_trip(self):
        """A deadline of this boot is read back; one of another boot or garbage is not."""
        self.assertEqual(F.parse_feed(F.encode_feed(12.5, boot="b1"), boot="b1"), ("fed", 12.5))
        self.assertIsNone(F.parse_feed(F.encode_feed(12.5, boot="b1"), boot="b2"))
        self.assertEqual(F.parse_feed(F.encode_feed(None)), ("release", None))
        for text in ("", "junk", "qvd-fence 1 b1 x", "qvd-fence 2 release"):
            self.assertIsNone(F.parse_feed(text, boot="b1"), text)


class FencerLoopTests(unittest.TestCase):
    """The fencer's loop on task.Clock, reading a feed kept in memory."""

    def setUp(self):
        self.clock = task.Clock()
        self.feed = ""
        self.stops = []
        self.ends = []
        settings = F.FenceSettings(path="/nonexistent/feed", lease=LEASE, margin=MARGIN,
                                   hypervisor="nothing", interval=0.25)
        self.fencer = F.Fencer(settings, self.clock, self.clock.seconds,
                               stop=lambda: self.stops.append(self.clock.seconds()),
                               done=self.ends.append, read=lambda path: self.feed)
        self.fencer.start()

    def give(self, deadline):
        self.feed = F.encode_feed(deadline)

    def advance(self, seconds):
        """Advance the clock in steps of the loop's interval (exact in binary)."""
        for _ in range(int(round(seconds / 0.25))):
            self.clock.advance(0.25)

    def test_not_fed_for_lease_minus_margin_stops_the_desktops(self):
        """
        A fencer fed once (at 0) and not again stops the desktops lease -
        margin seconds later, not before, and ends.
        """
        self.give(LEASE)
        self.advance(LEASE - MARGIN - 0.25)
        self.assertEqual(self.stops, [])
        self.advance(0.25)
        self.assertEqual(len(self.stops), 1)
        self.assertAlmostEqual(self.stops[0], LEASE - MARGIN, places=3)
        self.assertEqual(self.ends, ["fenced"])
        self.advance(30)
        self.assertEqual(len(self.stops), 1, "the fencer ended")

    def test_fed_at_lease_minus_margin_minus_one_does_not(self):
        """Fed again at lease - margin - 1, it does not stop the desktops at lease - margin."""
        self.give(LEASE)
        self.advance(LEASE - MARGIN - 1)
        self.give(self.clock.seconds() + LEASE)
        self.advance(1 + 0.5)
        self.assertEqual(self.stops, [])
        self.advance(LEASE - MARGIN - 1 - 0.5 - 0.25)
        self.assertEqual(self.stops, [])
        self.advance(0.25)
        self.assertEqual(len(self.stops), 1)

    def test_never_fed(self):
        """A fencer nobody feeds stops the desktops lease - margin after it started."""
        self.advance(LEASE - MARGIN - 0.25)
        self.assertEqual(self.stops, [])
        self.advance(0.25)
        self.assertEqual(len(self.stops), 1)

    def test_deadline_already_past(self):
        """A fencer that finds a deadline already past (the HKD died long ago) fences at once."""
        self.clock.advance(50)
        self.fencer.watchdog.started = 50
        self.give(20.0)
        self.clock.advance(0.25)
        self.assertEqual(len(self.stops), 1)

    def test_release(self):
        """Released by a clean HKD stop, it ends without stopping anything."""
        self.give(LEASE)
        self.advance(1)
        self.feed = F.encode_feed(None)
        self.advance(0.25)
        self.assertEqual((self.stops, self.ends), ([], ["released"]))


class StopCommandTests(unittest.TestCase):

    def test_lxc_containers_by_prefix(self):
        """The LXC desktops are the containers <prefix><id> of the LXC path, no other."""
        lxcpath = tempfile.mkdtemp()
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", lxcpath]))
        for name in ("qvd-1", "qvd-22", "qvd-x", "other-3", "qvd-"):
            os.mkdir(os.path.join(lxcpath, name))
        settings = F.FenceSettings(path="p", lease=1, margin=1, lxcpath=lxcpath)
        self.assertEqual(F.stop_commands(settings, run=None), [
            ["lxc-stop", "-n", "qvd-1", "-P", lxcpath, "-k"],
            ["lxc-stop", "-n", "qvd-22", "-P", lxcpath, "-k"]])

    def test_kvm_domains_by_prefix(self):
        """The KVM desktops are libvirt's domains <prefix><id>, destroyed."""
        settings = F.FenceSettings(path="p", lease=1, margin=1, hypervisor="kvm",
                                   kvm_uri="qemu:///x", kvm_prefix="t-")
        listed = []

        def run(argv):
            listed.append(argv)
            return "t-4\nother-5\nt-y\n"
        self.assertEqual(F.stop_commands(settings, run), [
            ["virsh", "-q", "-c", "qemu:///x", "destroy", "t-4"]])
        self.assertEqual(listed, [["virsh", "-q", "-c", "qemu:///x", "list", "--name"]])

    def test_all_stopped_in_parallel(self):
        """Every desktop's stop starts before the first is waited for."""
        lxcpath = tempfile.mkdtemp()
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", lxcpath]))
        for name in ("qvd-1", "qvd-2"):
            os.mkdir(os.path.join(lxcpath, name))
        events = []

        class Proc:
            def __init__(self, argv, **kw):
                self.name = argv[2]
                events.append(("spawn", self.name))

            def wait(self, timeout):
                events.append(("wait", self.name))
                return 0
        settings = F.FenceSettings(path="p", lease=1, margin=1, lxcpath=lxcpath)
        F.stop_desktops(settings, log=lambda m: None, spawn=Proc)
        self.assertEqual(events, [("spawn", "qvd-1"), ("spawn", "qvd-2"),
                                  ("wait", "qvd-1"), ("wait", "qvd-2")])


class FencerProcessTests(unittest.TestCase):
    """The real fencer process, guarding no desktops (hypervisor 'nothing')."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="qvdt-fence-")
        self.addCleanup(lambda: subprocess.run(["rm", "-rf", self.dir]))
        self.settings = F.FenceSettings(path=os.path.join(self.dir, "fence"), lease=2.0,
                                        margin=0.5, hypervisor="nothing", interval=0.05)
        self.handle = F.FencerProcess(self.settings)
        self.addCleanup(self._kill)

    def _kill(self):
        proc = self.handle._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def wait_exit(self, timeout):
        proc = self.handle._proc
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"the fencer still runs after {timeout} s")
        with open(self.settings.path + ".log") as f:
            return f.read()

    def test_one_fencer_per_node(self):
        """
        The HKD spawns a fencer, in a session of its own; a second ensure()
        (a restarted HKD) finds it alive and spawns none; released, it exits.
        """
        self.handle.feed(time.monotonic() + 30)
        self.assertTrue(self.handle.ensure())
        proc = self.handle._proc
        deadline = time.monotonic() + 10
        while not self.handle.lock.held() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(self.handle.lock.holder(), proc.pid)
        self.assertEqual(os.getsid(proc.pid), proc.pid, "the fencer has a session of its own")
        again = F.FencerProcess(self.settings)
        self.assertFalse(again.ensure())
        self.assertFalse(self.handle.ensure())
        again.release()
        self.assertIn("released by the HKD", self.wait_exit(5))
        self.assertEqual(proc.returncode, 0)

    def test_unfed_fencer_fences(self):
        """A fencer whose lease is not renewed stops the desktops before its end and exits."""
        started = time.monotonic()
        self.handle.feed(started + self.settings.lease)
        self.handle.ensure()
        log = self.wait_exit(10)
        elapsed = time.monotonic() - started
        self.assertIn("stopping this node's desktops", log)
        self.assertLess(elapsed, self.settings.lease + 1.0)
