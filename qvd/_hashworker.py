"""
The first thing each password-check process of the L7R runs
(L{qvd.l7r.auth.hashpool}): standard library only, so that it runs before
anything slow is imported.
"""

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def die_with(parent_pid):
    """
    Be killed when the process C{parent_pid} (the L7R) dies, however it
    dies; exit at once if it is already gone.
    """
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(0)
    import qvd.passwords  # noqa: F401  (what the checks need, before the first one)
