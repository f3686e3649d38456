"""
Process ids of this node: L{pid_alive}.
"""

import os


def pid_alive(pid):
    """
    True when a process C{pid} exists on this machine (whoever owns it);
    False for no pid (None, 0).
    """
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
