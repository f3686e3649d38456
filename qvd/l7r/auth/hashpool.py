"""
Password checks in processes of their own, bounded: a login storm uses every
core and answers "busy, retry" instead of making every login wait.

    pool = HashPool(reactor, workers=4, queue=1000)
    pool.start()
    ok, upgrade = await pool(passwords.verify_password, stored, password, salt)
    ...
    pool.stop()

A call runs C{function(*args)} in one of C{workers} processes (started once,
with the C{spawn} method: no fork of a threaded reactor; the program's main
module must be import-safe, as twistd's is) and fires with its result. The
processes die with the L7R however it ends (L{qvd._hashworker}). At most C{workers + queue} calls are in flight; one more fails at
once with L{AuthBusy}, which the L7R answers C{503} with C{Retry-After}. The
functions and their arguments must be picklable (module-level functions,
plain values): L{qvd.passwords} and the default plugin's are.

Why processes: argon2id costs hundreds of milliseconds of CPU per check, and
the reactor's thread pool (where the checks ran) is also where Twisted
resolves names; a burst of logins there starved the agent calls, and threads
share one core's worth of the interpreter for the Python around the hash.
"""

import concurrent.futures
import concurrent.futures.process
import multiprocessing
import os

from twisted.internet import defer

from qvd._hashworker import die_with
from qvd.l7r.auth.interfaces import AuthBusy
from qvd.logs import Logger

log = Logger()


def _ready():
    """A first call in each worker, so that the processes are up before a login."""
    return os.getpid()


class HashPool:
    """
    @ivar workers: processes that run the checks.
    @ivar queue: calls that may wait for a free process.
    @ivar in_flight: calls running or waiting now.
    @ivar refused: calls refused with L{AuthBusy} since start.
    """

    def __init__(self, reactor, workers=None, queue=1000):
        self.reactor = reactor
        self.workers = workers or os.cpu_count() or 1
        self.queue = queue
        self.in_flight = 0
        self.refused = 0
        self._executor = None

    def start(self):
        """Start the processes (the first logins do not pay for it)."""
        if self._executor is None:
            self._executor = concurrent.futures.ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=die_with, initargs=(os.getpid(),))
            for _ in range(self.workers):
                self._executor.submit(_ready)

    def stop(self):
        """
        Stop the processes (calls still waiting fail; a check running ends
        first, tens of milliseconds) and wait until they are gone.
        """
        if self._executor is not None:
            executor, self._executor = self._executor, None
            executor.shutdown(wait=True, cancel_futures=True)

    def __call__(self, function, *args):
        if self.in_flight >= self.workers + self.queue:
            self.refused += 1
            return defer.fail(AuthBusy(
                f"{self.in_flight} password checks in flight ({self.workers} processes, "
                f"{self.queue} waiting): retry"))
        self.start()
        d = defer.Deferred()
        self.in_flight += 1

        def done(future):
            self.reactor.callFromThread(self._finish, d, future)
        try:
            future = self._submit(function, *args)
        except Exception:
            self.in_flight -= 1
            return defer.fail()
        future.add_done_callback(done)
        return d

    def _submit(self, function, *args):
        try:
            return self._executor.submit(function, *args)
        except concurrent.futures.process.BrokenProcessPool:
            log.warn("the password check processes died; starting new ones")
            self._drop_broken()
            self.start()
            return self._executor.submit(function, *args)

    def _drop_broken(self):
        """Let a broken executor go (its manager thread and what is left of its processes)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    def _finish(self, d, future):
        self.in_flight -= 1
        if future.cancelled():
            d.errback(defer.CancelledError("the password check was cancelled"))
            return
        error = future.exception()
        if isinstance(error, concurrent.futures.process.BrokenProcessPool):
            self._drop_broken()     # the next call starts new processes
        if error is not None:
            d.errback(error)
        else:
            d.callback(future.result())
