"""
The database configuration applied live: a real node (C{twistd qvd-hkd} and
C{twistd qvd-l7r} of L{qvd.testing.e2e}), changed with the real C{qvd-admin
config set} globally and per tenant, each change seen in the daemons'
behaviour within a second, without restarting anything.
"""

import base64
import os
import socket
import ssl
import subprocess
import time

from twisted.trial import unittest

from qvd.testing import e2e

QVD_ADMIN = os.path.join(os.path.dirname(os.path.realpath(e2e.TWISTD)), "qvd-admin")


def _node():
    stack = e2e.Stack("live", subnet_base=225)
    stack.start()
    stack.add_user("ana", "ana-secret")
    return stack


NODE = e2e.SharedStack(_node)


class LiveConfigTests(unittest.TestCase):
    timeout = 300

    def setUp(self):
        self.stack = NODE.get()

    def admin(self, *argv):
        done = subprocess.run([QVD_ADMIN, "--config", self.stack.conf, *argv],
                              capture_output=True, text=True, env=e2e.env(), timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout

    def request(self, target, login=None, password=None):
        """One request to the real L7R over TLS: its status code."""
        context = ssl.create_default_context(cafile=self.stack.cert)
        context.check_hostname = False
        headers = f"GET {target} HTTP/1.1\r\nHost: node1\r\nConnection: close\r\n"
        if login:
            token = base64.b64encode(f"{login}:{password}".encode()).decode()
            headers += f"Authorization: Basic {token}\r\n"
        with socket.create_connection(("127.0.0.1", self.stack.port), timeout=10) as raw:
            with context.wrap_socket(raw) as s:
                s.sendall((headers + "\r\n").encode())
                reply = b""
                while b"\r\n" not in reply:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
        return int(reply.split(b" ", 2)[1])

    def within(self, condition, seconds=1.0):
        """Seconds until C{condition()} holds; fails after C{seconds}."""
        started = time.monotonic()
        while not condition():
            if time.monotonic() - started > seconds:
                self.fail(f"not seen within {seconds} s")
            time.sleep(0.02)
        return time.monotonic() - started

    def test_http_limit(self):
        """
        l7r.http.max_line set globally: a 300-byte request line answered 200
        before is answered 414 within a second, and 200 again once deleted.
        """
        target = "/qvd/ping?" + "x" * 290
        self.assertEqual(self.request(target), 200)
        self.admin("config", "set", "l7r.http.max_line", "100")
        self.addCleanup(subprocess.run, [QVD_ADMIN, "--config", self.stack.conf, "config",
                                         "del", "l7r.http.max_line"], capture_output=True)
        self.within(lambda: self.request(target) == 414)
        self.assertEqual(self.request("/qvd/ping"), 200)
        self.admin("config", "del", "l7r.http.max_line")
        self.within(lambda: self.request(target) == 200)

    def test_auth_chain_per_tenant(self):
        """
        l7r.auth.plugins.head = totp set for tenant acme only: acme's user is
        refused without a code within a second, the default tenant's user
        still logs in; deleting the key lets acme's user in again.
        """
        self.admin("tenant", "add", "acme")
        self.admin("--tenant", "acme", "user", "add", "bea", "--password", "bea-secret")
        self.assertEqual(self.request("/qvd/list_of_vm", "bea@acme", "bea-secret"), 200)
        self.admin("--tenant", "acme", "config", "set", "l7r.auth.plugins.head", "totp")
        # A refusal takes l7r.auth.failure.delay (1 s) to be answered: allow for it.
        self.within(lambda: self.request("/qvd/list_of_vm", "bea@acme", "bea-secret") == 401,
                    seconds=2.5)
        self.assertEqual(self.request("/qvd/list_of_vm", "ana", "ana-secret"), 200)
        self.admin("--tenant", "acme", "config", "del", "l7r.auth.plugins.head")
        self.within(lambda: self.request("/qvd/list_of_vm", "bea@acme", "bea-secret") == 200,
                    seconds=2.5)

    def test_hkd_timer(self):
        """
        hkd.ticker.interval (the heartbeat, 0.5 s on this node) set to 60:
        the heartbeats stop within a second; set to 0.2 they come back
        within a second.
        """
        def ok_ts():
            return self.stack.query("SELECT ok_ts FROM host_runtimes WHERE host_id = %s",
                                    (self.stack.host,))[0]["ok_ts"]
        first = ok_ts()
        self.within(lambda: ok_ts() != first)
        self.admin("config", "set", "hkd.ticker.interval", "60")
        self.addCleanup(subprocess.run, [QVD_ADMIN, "--config", self.stack.conf, "config",
                                         "del", "hkd.ticker.interval"], capture_output=True)
        time.sleep(1.0)
        quiet = ok_ts()
        time.sleep(1.5)
        self.assertEqual(ok_ts(), quiet, "heartbeats went on at the old interval")
        self.admin("config", "set", "hkd.ticker.interval", "0.2")
        self.within(lambda: ok_ts() != quiet)
        self.assertIn("configuration reloaded from the database",
                      open(self.stack.hkd_log).read())

    def test_z_nothing_restarted(self):
        """Neither daemon (nor an L7R worker process) was restarted by the changes."""
        self.assertIsNone(self.stack.hkd.poll())
        self.assertIsNone(self.stack.l7r.poll())
        with open(self.stack.l7r_log) as f:
            text = f.read()
        self.assertEqual(text.count("L7R listening on"), 1)
        self.assertNotIn("starting it again", text, "no L7R worker process was restarted")
