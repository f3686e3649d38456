"""
qvd.l7r.auth.hashpool: password checks in processes of their own, bounded,
with the real argon2id of qvd.passwords.
"""

import os
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

from qvd import passwords
from qvd.l7r.auth.hashpool import HashPool
from qvd.l7r.auth.interfaces import AuthBusy


def _pid_after(seconds):
    time.sleep(seconds)
    return os.getpid()


class HashPoolTests(unittest.TestCase):

    def pool(self, workers, queue):
        pool = HashPool(reactor, workers=workers, queue=queue)
        pool.start()
        self.addCleanup(pool.stop)
        return pool

    @defer.inlineCallbacks
    def test_checks_run_in_other_processes(self):
        """A real argon2id check runs in a worker process and gives its answer."""
        pool = self.pool(2, 4)
        stored = passwords.hash_password("s3cret")
        ok = yield pool(passwords.verify_password, stored, "s3cret", "")
        wrong = yield pool(passwords.verify_password, stored, "guess", "")
        self.assertEqual((ok, wrong), ((True, False), (False, False)))
        pids = yield defer.gatherResults([pool(_pid_after, 0.2) for _ in range(2)])
        self.assertNotIn(os.getpid(), pids)
        self.assertEqual(pool.in_flight, 0)

    @defer.inlineCallbacks
    def test_over_the_bound_is_busy_at_once(self):
        """
        With 1 process and 1 waiting, a third call fails with AuthBusy at
        once; the first two finish, and then calls are taken again.
        """
        pool = self.pool(1, 1)
        yield pool(_pid_after, 0)           # the process is up
        first, second = pool(_pid_after, 0.5), pool(_pid_after, 0.5)
        began = time.monotonic()
        third = pool(_pid_after, 0)
        self.failureResultOf(third, AuthBusy)
        self.assertLess(time.monotonic() - began, 0.1)
        self.assertEqual(pool.refused, 1)
        yield defer.gatherResults([first, second])
        self.assertIsInstance((yield pool(_pid_after, 0)), int)

    @defer.inlineCallbacks
    def test_errors_come_back(self):
        """An exception in the worker fails the call with it."""
        pool = self.pool(1, 0)
        with self.assertRaises(ValueError):
            yield pool(passwords.hash_password, "")
        self.assertEqual(pool.in_flight, 0)


_CHILD = """
import sys, time
from twisted.internet import reactor
from qvd.l7r.auth.hashpool import HashPool
pool = HashPool(reactor, workers=2, queue=1)
pool.start()
print(" ".join(str(pid) for pid in pool._executor._processes), flush=True)
time.sleep(60)
"""


class WorkerLifetimeTests(unittest.TestCase):

    def test_workers_die_with_a_killed_l7r(self):
        """
        SIGKILL of the process that owns the pool, as soon as its workers
        exist (they may still be starting), leaves none of them behind.
        """
        import signal
        import subprocess
        import sys
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        child = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE,
                                 text=True, env=dict(os.environ, PYTHONPATH=root))
        try:
            pids = [int(p) for p in child.stdout.readline().split()]
            self.assertTrue(pids)
            for pid in pids:
                os.kill(pid, 0)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        deadline = time.monotonic() + 3
        alive = pids
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = [pid for pid in pids if os.path.exists(f"/proc/{pid}")
                     and open(f"/proc/{pid}/stat").read().split(") ")[1][0] != "Z"]
        self.assertEqual(alive, [], "workers outlived the L7R")
