"""
End to end on the real components (issue 4's acceptance): qvd-client ->
twistd qvd-l7r (TLS on 127.0.0.1) -> an LXC desktop started by twistd
qvd-hkd from the minimal test image (agent + nxagent), all on a private
PostgreSQL database, an own bridge and subnet, under one temp dir
(L{qvd.testing.e2e.Stack}).

One node and alice's VM are shared by the tests of the class, in order:
the first connection starts the stopped VM (cold start), later ones resume
the session it left. Tests that need an earlier step do it themselves when
run alone. Timings go to stderr ("e2e-timing: ...").
"""

import glob
import os
import subprocess
import sys
import time

from twisted.trial import unittest

from qvd.testing import e2e

PASSWORD = "alice-secret"
_shared = {"stack": None, "users": 0}


def _timing(text):
    sys.stderr.write(f"e2e-timing: {text}\n")


def _stack():
    if _shared["stack"] is None:
        stack = e2e.Stack("e2e")
        _shared["stack"] = stack
        began = time.monotonic()
        stack.start()
        _timing(f"node up (database, HKD, L7R) in {time.monotonic() - began:.1f} s")
        stack.alice = stack.add_user("alice", PASSWORD)
    return _shared["stack"]


class EndToEndTests(unittest.TestCase):
    timeout = 300

    def setUp(self):
        why = e2e.missing()
        if why:
            raise unittest.SkipTest(why)
        self.stack = _stack()
        if not self.stack.started:
            raise unittest.SkipTest("the shared node was already taken down")

    def client(self, *extra, password=PASSWORD, **kw):
        client = self.stack.client("alice", password, *extra, **kw)
        self.addCleanup(client.stop)
        return client

    def connect(self, host="127.0.0.1"):
        """
        One headless connection to alice's VM: seconds from the client's
        start to the desktop's colour on its screen; the screenshot checked.
        """
        client = self.client(host=host)
        seconds = client.wait_for_colour()
        self.assertEqual(client.wait(60), 0, client.stderr())
        self.assert_desktop(client.shot)
        return seconds

    def assert_desktop(self, path):
        width, height, rgb = e2e.read_png(path)
        fraction, box = e2e.colour_area(width, height, rgb)
        self.assertEqual((width, height), (1024, 768))
        self.assertGreater(fraction, 0.95, f"only {fraction:.0%} of the screenshot shows "
                                           f"#2a7fd4 (within {box})")

    def ensure_running(self):
        """
        alice's VM is running with a suspended session (connect once if not).
        """
        if self.stack.vm_row(self.stack.alice)["vm_state"] != "running":
            self.connect()

    def test_1_cold_start_shows_desktop(self):
        """
        A client connecting to a stopped VM gets the desktop session's colour
        (#2a7fd4, painted inside the container and carried by NX through the
        L7R) over its whole headless screen. (It connects to "localhost":
        the L7R's certificate names it.)
        """
        self.assertEqual(self.stack.vm_row(self.stack.alice)["vm_state"], "stopped")
        seconds = self.connect(host="localhost")
        _timing(f"login -> screenshot colour, stopped VM (cold start, first VM of the node:"
                f" includes unpacking the DI): {seconds:.2f} s")
        row = self.stack.vm_row(self.stack.alice)
        self.assertEqual((row["vm_state"], row["user_state"]), ("running", "disconnected"))

    def test_2_reconnect_resumes(self):
        """
        Disconnecting and connecting again resumes the same session: the
        desktop's marker process has the same PID before and after.
        """
        self.ensure_running()
        before = self.stack.marker_pids(self.stack.alice)
        self.assertEqual(len(before), 1, before)
        seconds = self.connect()
        _timing(f"login -> screenshot colour, running VM (resume): {seconds:.2f} s")
        self.assertEqual(self.stack.marker_pids(self.stack.alice), before)

    def test_3_second_client_takes_over(self):
        """
        A second client connecting to the same VM takes it over: the first
        client's process ends and the second gets the desktop.
        """
        self.ensure_running()
        before = self.stack.marker_pids(self.stack.alice)
        screen = e2e.Xvfb(self.stack)
        self.addCleanup(screen.stop)
        first = self.client(headless=False, display=screen.display)
        first.wait_for_colour(display=screen.display)
        e2e.wait_until(lambda: self.stack.vm_row(self.stack.alice)["user_state"] == "connected",
                       10, "alice connected")
        self.assertIsNone(first.proc.poll())
        seconds = self.connect()
        _timing(f"login -> screenshot colour, taking over a connected session: {seconds:.2f} s")
        first.wait(30)
        self.assertIn("session ended (closed by server)", first.stderr())
        self.assertEqual(self.stack.marker_pids(self.stack.alice), before)

    def test_4_wrong_password(self):
        """
        A wrong password gets the client's login error and exit code 4, and
        alice's VM row stays disconnected (and is not started or changed).
        """
        before = self.stack.vm_row(self.stack.alice)
        client = self.client(password="not-" + PASSWORD)
        code = client.wait(30)
        self.assertEqual(code, 4, client.stderr())
        self.assertIn("rejected your login", client.stderr())
        self.assertFalse(os.path.exists(client.shot))
        after = self.stack.vm_row(self.stack.alice)
        self.assertEqual(after["user_state"], "disconnected")
        self.assertEqual((after["vm_state"], after["vm_cmd"], after["user_state_ts"]),
                         (before["vm_state"], before["vm_cmd"], before["user_state_ts"]))

    def test_5_second_user_cold_start(self):
        """
        Another user's stopped VM starts at login and shows the desktop, from
        the DI's base tree the node already unpacked (the timing of a cold
        start without the one-off unpack).
        """
        stack = self.stack
        basefs = os.path.join(stack.root, "storage", "basefs")
        unpacked = os.path.isdir(basefs) and bool(os.listdir(basefs))
        bob = stack.add_user("bob", "bob-secret")
        client = stack.client("bob", "bob-secret")
        self.addCleanup(client.stop)
        seconds = client.wait_for_colour()
        self.assertEqual(client.wait(60), 0, client.stderr())
        self.assert_desktop(client.shot)
        _timing(f"login -> screenshot colour, stopped VM (cold start"
                f"{', DI already unpacked' if unpacked else ', includes unpacking the DI'}):"
                f" {seconds:.2f} s")
        self.assertEqual(stack.vm_row(bob)["vm_state"], "running")
        self.assertEqual(len(stack.marker_pids(bob)), 1)

    def test_9_nothing_left_behind(self):
        """
        Taking the node down leaves no container, mount, veth, bridge,
        process, Xvfb, file or database of the test.
        """
        stack = self.stack
        self.ensure_running()
        container = stack.container(stack.alice)
        stack.stop()
        self.assertEqual(stack.leftovers(), [])
        listed = subprocess.run(["lxc-ls", "-1", "-P", stack.lxcpath],
                                capture_output=True, text=True).stdout.split()
        self.assertNotIn(container, listed)
        mine = []
        for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
            try:
                with open(cmdline, "rb") as f:
                    text = f.read().decode(errors="replace")
            except OSError:
                continue
            if stack.root in text or container in text:
                mine.append(text.replace("\0", " "))
        self.assertEqual(mine, [])
        from qvd.db import sync
        from qvd.testing import pg
        with sync.connect(pg.cluster().dsn()) as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM pg_database WHERE datname = %s",
                            (stack.dbname,))
                self.assertEqual(cur.fetchone()[0], 0)
