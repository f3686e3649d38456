"""
deploy/trial.py, the README's test runner: a skip fails the run unless the
allow-list names the test with a reason.
"""

import os
import subprocess
import sys

from twisted.trial import unittest

GATE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "deploy", "trial.py")

MODULE = """
from twisted.trial import unittest

class T(unittest.TestCase):
    def test_ok(self):
        pass

    def test_skipped(self):
        raise unittest.SkipTest("no frobnicator here")
"""


class GateTests(unittest.TestCase):

    def run_gate(self, allowed, module=MODULE):
        where = os.path.abspath(self.mktemp())
        os.makedirs(where)
        with open(os.path.join(where, "gate_demo.py"), "w") as f:
            f.write(module)
        allow_list = os.path.join(where, "allowed.txt")
        with open(allow_list, "w") as f:
            f.write(allowed)
        env = dict(os.environ, QVD_ALLOWED_SKIPS=allow_list)
        return subprocess.run([sys.executable, GATE, "--temp-directory", f"{where}/_trial",
                               "gate_demo"], cwd=where, env=env, capture_output=True,
                              text=True)

    def test_skip_fails(self):
        """A skip not on the allow-list fails the run, naming the test and its reason."""
        done = self.run_gate("# nothing allowed\n")
        self.assertEqual(done.returncode, 1, done.stdout)
        self.assertIn("gate_demo.T.test_skipped: no frobnicator here", done.stderr)

    def test_allowed_skip(self):
        """A skip on the allow-list with its reason passes."""
        done = self.run_gate("gate_demo.T.test_skipped  needs a frobnicator (none on CI)\n")
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)

    def test_reason_required(self):
        """An allow-list line without a reason is refused."""
        done = self.run_gate("gate_demo.T.test_skipped\n")
        self.assertNotEqual(done.returncode, 0)
        self.assertIn("needs a reason", done.stderr)

    def test_failure_still_fails(self):
        """A failing test fails the run as with plain trial."""
        done = self.run_gate("", MODULE.replace("pass", "self.fail('broken')"))
        self.assertEqual(done.returncode, 1)
