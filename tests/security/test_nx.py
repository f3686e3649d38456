"""
nxagent reachable only through the L7R's relay, tried on real components: a
real LXC desktop, the real L7R and HKD, real nxproxy clients. The L7R makes
a cookie per connection, the VMA puts it in nxagent's options, the relay
puts it into the client's clear-text NX greeting; a client going straight
to the desktop's NX port (from the node, the only place the packet filter
lets one start: tests/security/test_network.py) without it is refused by
nxagent itself.
"""

import json
import os
import re
import subprocess
import time
import urllib.parse
import urllib.request

from twisted.trial import unittest

from qvd.protocols import nx
from qvd.testing import e2e

OPTIONS = "/var/run/qvd/nxagent.conf"
NX_LOG = "/var/log/qvd/qvd-nxagent.log"


def _node():
    stack = e2e.Stack("kk", subnet_base=227)
    stack.start()
    stack.bob = stack.add_user("bob", "bob-secret")
    return stack


NODE = e2e.SharedStack(_node)


class NXCookieTests(unittest.TestCase):
    timeout = 400

    def setUp(self):
        self.stack = NODE.get()

    # -- helpers --------------------------------------------------------------

    def login(self):
        """bob logs in through the L7R with qvd-client and sees his desktop."""
        client = self.stack.client("bob", "bob-secret")
        self.addCleanup(client.stop)
        client.wait_for_colour()
        self.assertEqual(client.wait(60), 0, client.stderr())

    def options(self):
        done = self.stack.attach(self.stack.bob, "cat", OPTIONS)
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout.strip()

    def cookie(self):
        found = re.search(r"(?:^|,)cookie=([0-9a-f]+)(?:,|:)", self.options())
        return found and found.group(1)

    def nx_log(self):
        return self.stack.attach(self.stack.bob, "cat", NX_LOG).stdout

    def vma(self, function, **params):
        """Call bob's agent from the node with its secret, as the L7R does."""
        row = self.stack.vm_row(self.stack.bob)
        query = urllib.parse.urlencode(params)
        request = urllib.request.Request(
            f"http://{row['vm_address']}:{row['vm_vma_port']}/vma/{function}?{query}",
            headers={"X-QVD-VMA-Secret": row["vma_secret"]})
        with urllib.request.urlopen(request, timeout=5) as r:
            answer = json.loads("[" + r.read().decode().strip() + "]")
        if len(answer) == 2:
            raise AssertionError(f"{function}: {answer[1]}")
        return answer[0]

    def wait_state(self, *states, timeout=30):
        def reached():
            state = self.vma("x_state")
            return state if state in states else None
        return e2e.wait_until(reached, timeout, f"bob's X session {' or '.join(states)}",
                              poll=0.2)

    def direct_nxproxy(self, cookie=None):
        """
        nxproxy from the node straight to bob's NX port (no relay), drawing
        into an Xvfb of the test's; returns its exit code and output.
        """
        row = self.stack.vm_row(self.stack.bob)
        xvfb = e2e.Xvfb(self.stack)
        self.addCleanup(xvfb.stop)
        home = os.path.join(self.stack.root, f"direct{self.stack.next_name()}")
        os.makedirs(home)
        options = f"nx/nx,connect={row['vm_address']},port={row['vm_x_port']}"
        if cookie:
            options += f",cookie={cookie}"
        proc = subprocess.Popen(
            ["nxproxy", "-S", f"{options},display={xvfb.display}:{xvfb.display[1:]}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(e2e.env(), HOME=home),
            start_new_session=True)
        self.stack.processes.append(proc)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise AssertionError("nxproxy was not refused within 60 s:\n"
                                 + out.decode(errors="replace")[-2000:])
        return proc.returncode, out.decode(errors="replace")

    def make_listen(self):
        """
        bob's suspended session listening again, as after the L7R's x_start
        (with a cookie of this connection the direct client does not know).
        """
        self.wait_state("suspended")
        self.assertEqual(self.vma("x_start", **{"qvd.vm.user.name": "bob",
                                               nx.COOKIE_PARAM: nx.new_cookie()}), "starting")
        self.wait_state("listening")

    # -- tests ----------------------------------------------------------------

    def test_1_login_through_relay(self):
        """
        bob's first login (a cold start) shows his desktop through the L7R:
        nxagent got a cookie (options file 0600, bob's) that the client never
        saw; the client's NX greeting got it from the relay.
        """
        self.login()
        cookie = self.cookie()
        self.assertTrue(nx.valid_cookie(cookie), self.options())
        mode = self.stack.attach(self.stack.bob, "stat", "-c", "%a %U", OPTIONS).stdout.split()
        self.assertEqual(mode, ["600", "bob"])
        self.stack.bob_cookie = cookie
        self.stack.bob_markers = self.stack.marker_pids(self.stack.bob)
        self.assertEqual(len(self.stack.bob_markers), 1)

    def test_2_reconnect_resumes_with_new_cookie(self):
        """
        bob connecting again resumes the same session (same marker process)
        under a new cookie: nxagent read its options again on resume.
        """
        self.wait_state("suspended")
        self.login()
        self.assertEqual(self.stack.marker_pids(self.stack.bob), self.stack.bob_markers)
        cookie = self.cookie()
        self.assertTrue(nx.valid_cookie(cookie))
        self.assertNotEqual(cookie, self.stack.bob_cookie)
        self.assertIn("Session: Session resumed", self.nx_log())

    def test_3_direct_without_cookie_refused(self):
        """
        From the node, straight to bob's listening nxagent without a cookie:
        nxagent refuses it and bob's session goes back to suspended, alive.
        """
        self.make_listen()
        before = self.nx_log()
        rc, out = self.direct_nxproxy()
        new = self.nx_log()[len(before):]
        self.assertIn("The remote peer didn't specify the option 'cookie'", new)
        self.assertNotIn("Session: Session resumed", new)
        self.assertNotIn("Session: Session resumed", out)
        self.wait_state("suspended")
        self.assertEqual(self.stack.marker_pids(self.stack.bob), self.stack.bob_markers)

    def test_4_direct_with_wrong_cookie_refused(self):
        """The same with a cookie of the client's own choosing: refused."""
        self.make_listen()
        before = self.nx_log()
        rc, out = self.direct_nxproxy(cookie=nx.new_cookie())
        new = self.nx_log()[len(before):]
        self.assertRegex(new, r"Authentication cookie '[0-9a-f]{32}' doesn't match")
        self.assertNotIn("Session: Session resumed", new)
        self.wait_state("suspended")
        self.assertEqual(self.stack.marker_pids(self.stack.bob), self.stack.bob_markers)

    def test_5_relay_still_works(self):
        """After the refused attempts bob logs in through the L7R again: same session."""
        self.login()
        self.assertEqual(self.stack.marker_pids(self.stack.bob), self.stack.bob_markers)

    def test_9_nothing_left_behind(self):
        """After the stack stops nothing of it remains."""
        time.sleep(0.5)
        self.stack.stop()
        self.assertEqual(self.stack.leftovers(), [])
