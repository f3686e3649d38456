"""
A real VMA process running a real nxagent session, seen through a real
nxproxy drawing into an Xvfb display (no container: provisioning off, the
session runs as the current user with a test HOME).
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

import qvd
from qvd.testing.processes import ProcessesMixin
from qvd.testing.screen import CONVERT, colour_fraction
from qvd.vmaclient import VMAClient, VMAError

TREE = os.path.dirname(os.path.dirname(os.path.abspath(qvd.__file__)))
COLOUR = (0x2A, 0x7F, 0xD4)
TOOLS = ["nxagent", "nxproxy", "Xvfb", "xinit", "xsetroot", "xwd", "setsid"]


def _debian_python():
    """Debian's python3 with python3-twisted if present (what images run), else ours."""
    if os.path.exists("/usr/bin/python3") and subprocess.run(
            ["/usr/bin/python3", "-c", "import twisted, attr, zope.interface"],
            capture_output=True, cwd="/").returncode == 0:
        return "/usr/bin/python3"
    return sys.executable


def _port_free(port):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _display_free(n):
    return (not os.path.exists(f"/tmp/.X{n}-lock")
            and not os.path.exists(f"/tmp/.X11-unix/X{n}")
            and _port_free(4000 + n) and _port_free(6000 + n))


def _free_displays(count, start):
    found = []
    n = start + os.getpid() % 200
    while len(found) < count:
        if _display_free(n):
            found.append(n)
        n += 1
    return found


def _sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class VMAWithNX(ProcessesMixin, unittest.TestCase):

    timeout = 180

    def setUp(self):
        missing = [t for t in TOOLS if shutil.which(t) is None]
        if not os.path.exists(CONVERT):
            missing.append(CONVERT)
        if missing:
            raise unittest.SkipTest(
                f"missing {', '.join(missing)} (apt-get install nxagent nxproxy xvfb xinit "
                "x11-xserver-utils x11-apps util-linux imagemagick)")
        self.tmp = tempfile.mkdtemp(prefix="qvd-vma-nx-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.home = os.path.join(self.tmp, "home")
        os.makedirs(self.home)
        self.agent_display, self.xvfb_display, self.proxy_display = _free_displays(3, 150)
        self.start_processes()

    @property
    def process_cwd(self):
        return self.tmp

    def write_config(self, port_file):
        session = os.path.join(self.tmp, "session.sh")
        self.marker_file = os.path.join(self.tmp, "marker.pid")
        with open(session, "w") as f:
            f.write("#!/bin/sh\n"
                    "xsetroot -solid '#2a7fd4'\n"
                    f"sleep 100000 &\necho $! > {self.marker_file}\nwait\n")
        os.chmod(session, 0o755)
        conf = os.path.join(self.tmp, "vma.conf")
        with open(conf, "w") as f:
            f.write(f"vma.port = 0\nvma.address = 127.0.0.1\n"
                    f"vma.display = {self.agent_display}\n"
                    f"vma.provisioning.enable = 0\n"
                    f"vma.x-session.command = {session}\n"
                    f"vma.run.path = {self.tmp}/run\nvma.log.path = {self.tmp}/log\n"
                    f"vma.timeout.listening = 60\n")
        return conf

    @defer.inlineCallbacks
    def start_vma(self):
        conf = self.write_config(None)
        python = _debian_python()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.home,
               "PYTHONPATH": TREE, "LANG": "C.UTF-8"}
        self.vma = self.popen([python, "-m", "qvd.vma", "--config", conf, "--log", "-"],
                              "vma", env=env)
        log_path = os.path.join(self.tmp, "vma.log")
        for _ in range(100):
            with open(log_path) as f:
                match = re.search(r"SimpleRPCServerFactory starting on (\d+)", f.read())
            if match:
                return VMAClient(reactor, "127.0.0.1", int(match.group(1)), timeout=4.0)
            self.assertIsNone(self.vma.poll(), self.vma_log())
            yield _sleep(0.1)
        self.fail("VMA did not start listening: " + self.vma_log())

    def vma_log(self):
        with open(os.path.join(self.tmp, "vma.log")) as f:
            return f.read()[-3000:]

    def start_proxy(self):
        port = 4000 + self.agent_display
        env = {"PATH": os.environ.get("PATH"), "HOME": self.home,
               "DISPLAY": f":{self.xvfb_display}"}
        return self.popen(["nxproxy", "-S",
                           f"nx/nx,connect=127.0.0.1,port={port}:{self.proxy_display}"],
                          "nxproxy", env=env)

    def colour_fraction(self):
        return colour_fraction(self.xvfb_display, COLOUR)

    @defer.inlineCallbacks
    def wait_state(self, client, wanted, seconds=30):
        deadline = time.monotonic() + seconds
        state = None
        while time.monotonic() < deadline:
            state = yield client.x_state()
            if state == wanted:
                return state
            yield _sleep(0.2)
        self.fail(f"x_state stayed {state!r}, wanted {wanted!r}\n" + self.vma_log()
                  + self.nx_log())

    def nx_log(self):
        path = os.path.join(self.tmp, "log", "qvd-nxagent.log")
        if not os.path.exists(path):
            return ""
        with open(path, errors="replace") as f:
            return "\n--- nxagent ---\n" + f.read()[-3000:]

    @defer.inlineCallbacks
    def wait_colour(self, present, seconds=20):
        deadline = time.monotonic() + seconds
        fraction = None
        while time.monotonic() < deadline:
            fraction = self.colour_fraction()
            if (fraction > 0.05) == present:
                return fraction
            yield _sleep(0.3)
        self.fail(f"painted colour {'missing' if present else 'still there'} "
                  f"(fraction {fraction})" + self.nx_log())

    def marker_pid(self):
        with open(self.marker_file) as f:
            return int(f.read())

    def alive(self, pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"

    @defer.inlineCallbacks
    def test_start_suspend_resume_stop(self):
        """
        x_start brings a session to listening; nxproxy sees the painted root;
        killing nxproxy suspends it; x_start resumes the same session (same
        processes) and a new nxproxy sees it again; x_start on the connected
        session suspends it and says "retry later"; x_stop leaves nothing.
        """
        self.popen(["Xvfb", f":{self.xvfb_display}", "-screen", "0", "1024x768x24",
                    "-nolisten", "tcp"], "xvfb")
        client = yield self.start_vma()
        self.assertIsNone((yield client.ping()))
        self.assertEqual((yield client.x_state()), "stopped")
        params = {"qvd.client.link": "lan", "qvd.client.geometry": "800x600",
                  "qvd.client.fullscreen": "0", "qvd.client.keyboard": "pc105/us"}
        t0 = time.monotonic()
        self.assertEqual((yield client.x_start(params)), "starting")
        yield self.wait_state(client, "listening")
        t_listening = time.monotonic() - t0

        proxy = self.start_proxy()
        yield self.wait_state(client, "connected")
        yield self.wait_colour(True)
        t_drawn = time.monotonic() - t0
        yield self.wait_state_marker()
        marker = self.marker_pid()
        self.assertTrue(self.alive(marker))

        proxy.terminate()
        proxy.wait(5)
        yield self.wait_state(client, "suspended")
        yield self.wait_colour(False)

        self.assertEqual((yield client.x_start(params)), "starting")
        yield self.wait_state(client, "listening")
        t1 = time.monotonic()
        proxy = self.start_proxy()
        yield self.wait_state(client, "connected")
        yield self.wait_colour(True)
        t_resumed = time.monotonic() - t1
        self.assertEqual(self.marker_pid(), marker)
        self.assertTrue(self.alive(marker))

        # x_start on a connected session suspends it (nxproxy is let go) and says retry
        e = yield self.assertFailure(client.x_start(params), VMAError)
        self.assertIn("retry later", e.message)
        yield self.wait_state(client, "suspended")
        proxy.wait(10)
        self.assertTrue(self.alive(marker))

        self.assertEqual((yield client.x_stop()), "stopping")
        yield self.wait_state(client, "stopped")
        yield _sleep(0.5)
        self.assertFalse(self.alive(marker))
        with socket.socket() as s:
            self.assertNotEqual(s.connect_ex(("127.0.0.1", 4000 + self.agent_display)), 0,
                                "nxagent still listens after x_stop")
        self.assertFalse(os.path.exists(f"/tmp/.X11-unix/X{self.agent_display}"))
        print(f"\nVMA on {_debian_python()}: listening after {t_listening:.2f}s, painted after {t_drawn:.2f}s, "
              f"resumed and painted in {t_resumed:.2f}s")

    @defer.inlineCallbacks
    def test_connection_dropped_before_negotiation(self):
        """
        A client gone right after the 101, before NX negotiates (the relay
        connects to nxagent, then closes): nxagent aborts the session. It was
        never used, so the VMA kills it at once instead of waiting for
        nxagent's own exit (15 s on nx-libs 3.5.99.26), and a new x_start
        (the user's next login) is taken within a second.
        """
        client = yield self.start_vma()
        params = {"qvd.client.link": "lan", "qvd.client.geometry": "800x600"}
        self.assertEqual((yield client.x_start(params)), "starting")
        yield self.wait_state(client, "listening")
        with socket.create_connection(("127.0.0.1", 4000 + self.agent_display), 5):
            pass
        t0 = time.monotonic()
        states = []
        while time.monotonic() - t0 < 30:
            state = yield client.x_state()
            if not states or states[-1][1] != state:
                states.append((round(time.monotonic() - t0, 2), state))
            if state == "stopped":
                break
            yield _sleep(0.05)
        torn_down = time.monotonic() - t0
        self.assertEqual(states[-1][1], "stopped", f"{states}\n{self.vma_log()}{self.nx_log()}")
        self.assertLess(torn_down, 2.0, f"{states}\n{self.vma_log()}")
        self.assertEqual((yield client.x_start(params)), "starting")
        yield self.wait_state(client, "listening")
        print(f"\nunused session dropped before negotiation: stopped after {torn_down:.2f} s "
              f"({states}); a new x_start listening {time.monotonic() - t0:.2f} s after the drop")
        self.assertEqual((yield client.x_stop()), "stopping")
        yield self.wait_state(client, "stopped")

    @defer.inlineCallbacks
    def wait_state_marker(self, seconds=10):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not os.path.exists(self.marker_file):
            yield _sleep(0.1)
