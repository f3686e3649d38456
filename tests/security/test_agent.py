"""
An agent that only its node can drive, tried from inside a real LXC desktop:
bob logs in through the real L7R, then calls his own agent (the node's
packet filter keeps him from every other desktop's: tests/security/
test_network.py) as his desktop user and as his container's root.
"""

from twisted.trial import unittest

from qvd.testing import e2e


CALL = """
import sys, urllib.request, urllib.error
url, secret = sys.argv[1], sys.argv[2]
request = urllib.request.Request(url, headers={"X-QVD-VMA-Secret": secret} if secret else {})
try:
    with urllib.request.urlopen(request, timeout=5) as r:
        print(r.status, r.read().decode().strip())
except urllib.error.HTTPError as e:
    print(e.code)
"""

READ = """
try:
    print(open("/etc/qvd/vma.secret").read().strip())
except OSError as e:
    print(type(e).__name__)
"""


def _node():
    stack = e2e.Stack("agt", subnet_base=221)
    stack.start()
    stack.bob = stack.add_user("bob", "bob-secret")
    stack.client("bob", "bob-secret").wait_for_colour()
    return stack


NODE = e2e.SharedStack(_node)


class AgentSecretTests(unittest.TestCase):
    timeout = 300

    def setUp(self):
        self.stack = NODE.get()

    def call(self, user, function, secret=""):
        done = self.stack.python_as(
            self.stack.bob, user, "import sys; sys.argv[1:] = %r\n%s" % (
                [f"http://127.0.0.1:3030/vma/{function}", secret], CALL))
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout.strip()

    def test_1_secret_private(self):
        """
        The desktop's user cannot read the agent's secret; its root can, and
        it is the secret of this start in the database.
        """
        self.assertEqual(self.stack.python_as(self.stack.bob, "bob", READ).stdout.strip(),
                         "PermissionError")
        secret = self.stack.python_as(self.stack.bob, "root", READ).stdout.strip()
        self.assertEqual(secret, self.stack.vm_row(self.stack.bob)["vma_secret"])
        self.assertEqual(len(secret), 43)

    def test_2_calls_without_secret_refused(self):
        """
        x_state, x_start and poweroff without the secret (or with a wrong one)
        are answered 403, as the user and as root; the VM keeps running.
        """
        for user in ("bob", "root"):
            for function in ("x_state", "x_start", "poweroff"):
                self.assertEqual(self.call(user, function), "403")
                self.assertEqual(self.call(user, function, "not-the-secret"), "403")
        self.assertEqual(self.stack.vm_row(self.stack.bob)["vm_state"], "running")

    def test_3_root_with_secret_cannot_make_root_sessions(self):
        """
        Even with his own agent's secret, container root cannot get a session
        run as root or with privileged groups: x_start refuses them.
        """
        secret = self.stack.vm_row(self.stack.bob)["vma_secret"]
        self.assertRegex(self.call("root", "x_state", secret),
                         r'^200 "(stopped|suspended|suspending|connected|listening)"$')
        for query in ("qvd.vm.user.name=root", "qvd.vm.user.name=daemon",
                      "qvd.vm.user.name=eve&qvd.vm.user.groups=shadow,disk,sudo",
                      "qvd.vm.user.name=eve&qvd.vm.user.gid=0"):
            answer = self.call("root", f"x_start?{query}", secret)
            self.assertTrue(answer.startswith('200 "",'), f"{query}: {answer}")
        found = self.stack.attach(self.stack.bob, "getent", "passwd", "eve")
        self.assertNotEqual(found.returncode, 0, found.stdout)

    def test_4_node_still_drives_it(self):
        """The HKD's pings (with the secret) keep the VM running; bob logs in again."""
        self.assertEqual(self.stack.vm_row(self.stack.bob)["vm_state"], "running")
        client = self.stack.client("bob", "bob-secret")
        self.addCleanup(client.stop)
        client.wait_for_colour()

    def test_9_nothing_left_behind(self):
        """After the stack stops nothing of it remains."""
        self.stack.stop()
        self.assertEqual(self.stack.leftovers(), [])
