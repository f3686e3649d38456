"""
Processes a test starts and must stop: L{ProcessesMixin}.

    class T(ProcessesMixin, unittest.TestCase):
        def setUp(self):
            self.tmp = tempfile.mkdtemp()
            self.start_processes()          # stop_all() runs at cleanup
            self.popen(["Xvfb", ":5"], "xvfb")   # output in self.tmp/xvfb.log
"""

import os
import subprocess


class ProcessesMixin:
    #: Working directory of the processes (None: the test's own).
    process_cwd = None

    def start_processes(self):
        self.processes = []
        self.addCleanup(self.stop_all)

    def popen(self, argv, name, **kw):
        """
        Start C{argv} with its output in C{self.tmp}/C{name}.log; stopped by
        L{stop_all}.
        """
        kw.setdefault("cwd", self.process_cwd)
        out = open(os.path.join(self.tmp, f"{name}.log"), "ab")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, **kw)
        out.close()
        self.processes.append(p)
        return p

    def stop_all(self):
        """
        Terminate every process still running, newest first (kill after 10 s).
        """
        for p in reversed(self.processes):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


def stop_fencer(path, timeout=10.0):
    """
    End the node fencer of C{path} (hkd.lease.path) if one runs: what a test
    that killed its HKD leaves behind, and which would otherwise stop the
    desktops of the next test on that path.
    """
    import signal
    import time

    from qvd.hkd.fencer import FencerLock
    lock = FencerLock(path)
    deadline = time.monotonic() + timeout
    while lock.held() and time.monotonic() < deadline:
        pid = lock.holder()
        if pid:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
