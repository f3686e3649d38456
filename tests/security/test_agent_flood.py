"""
The agent under a connection flood: the real VMA daemon (C{python3 -m
qvd.vma}) on this machine's loopback, flooded from 127.0.0.2 and trickled
from 127.0.0.3 while "the node" (127.0.0.1) calls it.

Inside a desktop, the node's packet filter keeps every other desktop away
from an agent (test_network.py); these limits are what is left when a peer
the filter admits misbehaves, or the filter is off.
"""

import os
import resource
import socket
import subprocess
import sys
import time

from twisted.trial import unittest

SECRET = "flood-test-secret"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(port, function="ping", secret=SECRET, source="127.0.0.1", timeout=3.0):
    """One SimpleRPC call on its own connection: (status line, seconds)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                  source_address=(source, 0)) as s:
        s.sendall(f"GET /vma/{function} HTTP/1.1\r\nHost: x\r\n"
                  f"X-QVD-VMA-Secret: {secret}\r\nConnection: close\r\n\r\n".encode())
        reply = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.split(b"\r\n", 1)[0].decode(), time.monotonic() - started


class AgentFloodTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < 4096:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
            self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        with open(os.path.join(tmp, "secret"), "w") as f:
            f.write(SECRET + "\n")
        self.port = _free_port()
        settings = {"vma.port": self.port, "vma.address": "0.0.0.0",
                    "vma.run.path": f"{tmp}/run", "vma.log.path": f"{tmp}/log",
                    "vma.pid.file": f"{tmp}/run/vma.pid",
                    "vma.provisioning.enable": 0, "vma.secret.file": f"{tmp}/secret",
                    "vma.secret.required": 1}
        argv = [sys.executable, "-m", "qvd.vma", "--config", os.devnull, "--log",
                f"{tmp}/vma.log"]
        for key, value in settings.items():
            argv += ["--set", f"{key}={value}"]
        # An agent as images start it: the usual soft limit of 1,024 descriptors.
        self.agent = subprocess.Popen(
            ["prlimit", f"--nofile=1024:{resource.getrlimit(resource.RLIMIT_NOFILE)[1]}",
             "--"] + argv, stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(
                os.path.dirname(os.path.abspath(__file__)))))
        self.addCleanup(self._stop)
        self.log = f"{tmp}/vma.log"
        deadline = time.monotonic() + 20
        while True:
            try:
                self.assertEqual(_call(self.port)[0], "HTTP/1.1 200 OK")
                break
            except OSError:
                if self.agent.poll() is not None or time.monotonic() > deadline:
                    self.fail(f"agent did not start: {self.agent.stderr.read()!r}")
                time.sleep(0.1)

    def _stop(self):
        self.agent.terminate()
        try:
            self.agent.wait(10)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            self.agent.wait()
        self.agent.stderr.close()

    def descriptors(self):
        return len(os.listdir(f"/proc/{self.agent.pid}/fd"))

    def test_idle_flood(self):
        """
        1,100 idle connections from one address (more than the agent's
        1,024 descriptors): the agent keeps 32 of them, closes the rest
        unread, and the node's calls are still answered at once.
        """
        flood = []
        self.addCleanup(lambda: [s.close() for s in flood])
        for _ in range(1100):
            # One at a time: each connection is in the agent's accept queue
            # (the kernel completed it) before the next one is made.
            s = socket.create_connection(("127.0.0.1", self.port), timeout=10,
                                         source_address=("127.0.0.2", 0))
            s.setblocking(False)
            flood.append(s)
        status, seconds = _call(self.port)
        self.assertEqual(status, "HTTP/1.1 200 OK")
        self.assertLess(seconds, 1.0)
        deadline = time.monotonic() + 30
        while True:
            closed = sum(1 for s in flood if _closed(s))
            if closed >= 1100 - 32 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        self.assertGreaterEqual(closed, 1100 - 32)
        self.assertLessEqual(self.descriptors(), 32 + 40)
        for s in flood:
            s.close()
        flood.clear()
        time.sleep(0.5)
        self.assertEqual(_call(self.port, source="127.0.0.2")[0], "HTTP/1.1 200 OK")
        with open(self.log) as f:
            refusals = [line for line in f if "too many connections from its address" in line]
        self.assertEqual(len(refusals), 1, refusals)

    def test_trickle(self):
        """
        Requests trickled a byte a second from 127.0.0.3 are cut 5 s after
        their first byte; the node's calls meanwhile are answered.
        """
        slow = [socket.create_connection(("127.0.0.1", self.port),
                                         source_address=("127.0.0.3", 0)) for _ in range(20)]
        self.addCleanup(lambda: [s.close() for s in slow])
        started = time.monotonic()
        cut = {}
        request = b"GET /vma/ping HTTP/1.1\r\n"
        for i in range(len(request)):
            for n, s in enumerate(slow):
                if n in cut:
                    continue
                try:
                    s.sendall(request[i:i + 1])
                except OSError:
                    cut[n] = time.monotonic() - started
            if len(cut) == len(slow):
                break
            self.assertEqual(_call(self.port)[0], "HTTP/1.1 200 OK")
            time.sleep(1)
        for n, s in enumerate(slow):
            if n not in cut and _closed(s, wait=2.0):
                cut[n] = time.monotonic() - started
        self.assertEqual(len(cut), 20)
        self.assertTrue(all(4.5 < t < 9 for t in cut.values()), cut)


def _closed(s, wait=0.0):
    """True if the peer closed C{s} (EOF or reset)."""
    s.settimeout(wait or 0.001)
    try:
        return s.recv(1) == b""
    except (BlockingIOError, socket.timeout):
        return False
    except OSError:
        return True
