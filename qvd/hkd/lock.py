"""
The node lock: at most one HKD per node.

    lock = NodeLock("/run/qvd/hkd.lock")
    lock.acquire()        # raises LockHeld naming the holder's pid
    lock.release()

An exclusive C{flock} on a file that records the holder's pid. The descriptor is
close-on-exec, so desktops started by the HKD never inherit it: they outlive the
HKD, and a restarted HKD adopts them.
"""

import fcntl
import os


class LockHeld(Exception):
    """
    Another HKD holds the node lock.
    """


class NodeLock:
    def __init__(self, path):
        self.path = path
        self._fd = None

    def acquire(self):
        directory = os.path.dirname(self.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise LockHeld(
                f"another HKD (pid {holder}) already runs for this node: it holds "
                f"{self.path}; stop it first, or set hkd.lock.path for a second node")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def update_pid(self):
        """
        Record the current pid (after twistd forked into the background).
        """
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self):
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
