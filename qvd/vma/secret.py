"""
The agent's side of the per-VM secret: the file the HKD put into the desktop
(readable by its root only), and the check of every SimpleRPC call.

    secret = AgentSecret("/etc/qvd/vma.secret", required=True)
    if not secret.allows(request.header(SECRET_HEADER)):
        answer 403

The file is read again whenever it changes (a new start brings a new
secret). Without a file, every call is refused unless C{required} is off
(C{vma.secret.required = 0}: an image run by an HKD that hands out no
secret; anyone who can reach the agent then drives it).
"""

import os

from qvd.protocols.simplerpc import secret_matches


class AgentSecret:

    def __init__(self, path, required=True):
        self.path = path
        self.required = required
        self._stamp = None
        self._value = None

    def current(self):
        """The secret in the file, or None when there is none (or it is empty)."""
        try:
            st = os.stat(self.path)
        except OSError:
            self._stamp = self._value = None
            return None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            try:
                with open(self.path) as f:
                    self._value = f.read().strip() or None
            except OSError:
                self._value = None
            self._stamp = stamp
        return self._value

    def allows(self, given):
        """Whether a call carrying C{given} (the header's value, or None) may run."""
        expected = self.current()
        if expected is None:
            return not self.required
        return secret_matches(expected, given)
