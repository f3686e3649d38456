"""
Exclusive file locks between processes: L{locked}.
"""

import contextlib
import fcntl
import os


@contextlib.contextmanager
def locked(path, mode=0o644):
    """
    Hold an exclusive flock on C{path} (created, with its directory, if
    missing) for the duration of the block.
    """
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
