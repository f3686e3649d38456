"""
The qvd-hkd service under twistd as a real process against the test
PostgreSQL, with the fake hypervisor passed in by fake_hkd.tac: start-up
checks, node life cycle, SIGTERM.
"""

import os
import shlex
import signal
import subprocess
import sys

from twisted.trial import unittest

from qvd.testing import pg
from qvd.testing.hkd import HKDTestMixin

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class TwistdTests(HKDTestMixin, pg.DatabaseTestMixin, unittest.TestCase):

    def setUp(self):
        super().setUp()
        if not os.path.exists(TWISTD):
            raise unittest.SkipTest(f"twistd not found at {TWISTD}")
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        cluster = pg.cluster()
        self.conf = os.path.join(self.dir, "node.conf")
        with open(self.conf, "w") as f:
            f.write(f"nodename = node1\n"
                    f"database.host = {cluster.socketdir}\n"
                    f"database.name = {self.dbname}\n"
                    f"hkd.lock.path = {self.dir}/hkd.lock\n"
                    f"hkd.ticker.interval = 0.2\n"
                    f"path.run = {self.dir}\n")

    def twistd(self, *args):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   QVD_HKD_ARGS=shlex.join(["--config", self.conf, *args]))
        return subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "-l", os.path.join(self.dir, "hkd.log"),
             "-y", os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_hkd.tac")],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def test_unknown_node(self):
        """
        A node name missing from the hosts table ends the daemon at once with
        one message that says how to register it.
        """
        proc = self.twistd("--nodename", "ghost")
        out, _ = proc.communicate(timeout=30)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("this node, 'ghost', is not registered in the hosts table", out)
        self.assertNotIn("Traceback", out)

    async def test_life_cycle_and_lock(self):
        """
        The daemon marks its node running with its pid and heartbeats; a
        second one for the same node is refused (node lock); SIGTERM marks
        the node stopped.
        """
        host = self.add_host("node1")
        proc = self.twistd()
        self.addCleanup(lambda: proc.poll() is None and proc.kill())

        def node():
            rows = self.query("SELECT * FROM host_runtimes WHERE host_id = %s", (host,))
            return rows[0] if rows else None
        await self.until(lambda: node() and node()["state"] == "running", timeout=20,
                         what="node running")
        self.assertEqual(node()["pid"], proc.pid)
        first = node()["ok_ts"]
        await self.until(lambda: node()["ok_ts"] > first, what="a heartbeat")

        second = self.twistd()
        out, _ = second.communicate(timeout=30)
        self.assertNotEqual(second.returncode, 0)
        self.assertIn(f"another HKD (pid {proc.pid}) already runs for this node", out)

        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        self.assertEqual(node()["state"], "stopped")
