"""
A daemon that cannot listen ends with one line naming the port and a
non-zero exit status: the real C{twistd qvd-l7r} (against the test
PostgreSQL), C{twistd qvd-vma} and C{python3 -m qvd.vma}, on ports this test
holds. (The HKD listens on no port.)
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile

from twisted.trial import unittest

from qvd.testing import pg

BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PortTestMixin:

    def setUp(self):
        super().setUp()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def hold_port(self):
        sock = socket.socket()
        self.addCleanup(sock.close)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        return sock.getsockname()[1]

    def run_daemon(self, *argv):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.run(list(argv), env=env, capture_output=True, text=True,
                              timeout=60, cwd=self.dir)

    def assertOneLine(self, proc, text):
        self.assertNotEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertNotIn("Traceback", proc.stdout + proc.stderr)
        lines = proc.stderr.strip().splitlines()
        self.assertEqual(len(lines), 1, proc.stderr)
        self.assertIn(text, lines[0])


class L7RPortTests(PortTestMixin, pg.DatabaseTestMixin, unittest.TestCase):

    def setUp(self):
        super().setUp()
        cluster = pg.cluster()
        self.conf = os.path.join(self.dir, "node.conf")
        with open(self.conf, "w") as f:
            f.write(f"nodename = node1\n"
                    f"database.host = {cluster.socketdir}\n"
                    f"database.name = {self.dbname}\n"
                    f"path.run = {self.dir}\n")

    def l7r(self, *args):
        return self.run_daemon(TWISTD, "-n", "--pidfile=", "qvd-l7r", "--config", self.conf,
                               *args)

    def test_tcp_port_in_use(self):
        """
        twistd qvd-l7r on a TCP port in use exits 1 before it starts, with one
        line that names the address and where the port is set.
        """
        port = self.hold_port()
        proc = self.l7r("--listen", f"tcp:{port}:interface=127.0.0.1")
        self.assertOneLine(proc, f"qvd-l7r: cannot listen on 127.0.0.1:{port}: the port is "
                                 "already in use")
        self.assertIn("l7r.port", proc.stderr)
        self.assertEqual(proc.stdout, "")

    def test_configured_port_in_use(self):
        """Without --listen the port of l7r.port/l7r.address is checked the same way."""
        port = self.hold_port()
        with open(self.conf, "a") as f:
            f.write(f"l7r.port = {port}\nl7r.address = 127.0.0.1\nl7r.use_ssl = 0\n")
        proc = self.l7r()
        self.assertOneLine(proc, f"cannot listen on 127.0.0.1:{port}")

    def test_bad_endpoint(self):
        """--listen that is no Twisted endpoint is one line naming it, exit 1."""
        for listen in ("bogus:1", "tcp:abc"):
            proc = self.l7r("--listen", listen)
            self.assertOneLine(proc, f"qvd-l7r: the endpoint {listen!r} is not a Twisted server "
                                     "endpoint")

    def test_listen_fails_after_start(self):
        """
        When listening fails only once the daemon runs (here a UNIX socket
        path in use), the reason is logged in one line, without a
        traceback, and the process exits 1.
        """
        short = tempfile.mkdtemp(prefix="qvdt-l7r-")     # AF_UNIX paths are short
        self.addCleanup(shutil.rmtree, short, True)
        path = os.path.join(short, "l7r.sock")
        sock = socket.socket(socket.AF_UNIX)
        self.addCleanup(sock.close)
        sock.bind(path)
        sock.listen()
        proc = self.l7r("--listen", f"unix:{path}")
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertNotIn("Traceback", proc.stdout + proc.stderr)
        errors = [line for line in proc.stdout.splitlines() if "#critical]" in line]
        self.assertEqual(len(errors), 1, proc.stdout)
        self.assertIn(f"the L7R cannot listen on {path}", errors[0])


class VMAPortTests(PortTestMixin, unittest.TestCase):

    def write_config(self, port):
        path = os.path.join(self.dir, "vma.conf")
        with open(path, "w") as f:
            f.write(f"vma.port = {port}\nvma.address = 127.0.0.1\n"
                    f"vma.secret.file = {self.dir}/vma.secret\n"
                    f"vma.pid.file = {self.dir}/vma.pid\nvma.log.path = {self.dir}\n"
                    f"vma.log.filename = {self.dir}/vma.log\n")
        return path

    def test_twistd_port_in_use(self):
        """twistd qvd-vma on a port in use exits 1 with one line naming it."""
        port = self.hold_port()
        proc = self.run_daemon(TWISTD, "-n", "--pidfile=", "qvd-vma",
                               "--config", self.write_config(port))
        self.assertOneLine(proc, f"qvd-vma: cannot listen on 127.0.0.1:{port}: the port is "
                                 "already in use")
        self.assertIn("vma.port", proc.stderr)

    def test_module_port_in_use(self):
        """python3 -m qvd.vma on a port in use exits non-zero with one line naming it."""
        port = self.hold_port()
        proc = self.run_daemon(sys.executable, "-m", "qvd.vma",
                               "--config", self.write_config(port))
        self.assertOneLine(proc, f"127.0.0.1:{port}")
