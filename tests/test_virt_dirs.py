"""
qvd.virt._dirs.make_dirs: directories for other users get their modes
whatever the umask (the daemons run under twistd's 077).
"""

import os
import stat

from twisted.trial import unittest

from qvd.virt._dirs import make_dirs


class MakeDirsTests(unittest.TestCase):

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        old = os.umask(0o077)
        self.addCleanup(os.umask, old)

    def mode(self, path):
        return stat.S_IMODE(os.stat(path).st_mode)

    def test_modes_despite_umask(self):
        leaf = os.path.join(self.root, "a", "b", "c")
        make_dirs(leaf, 0o711)
        for path in (os.path.join(self.root, "a"), os.path.join(self.root, "a", "b"), leaf):
            self.assertEqual(self.mode(path), 0o711, path)

    def test_existing_kept(self):
        existing = os.path.join(self.root, "kept")
        os.mkdir(existing, 0o700)
        make_dirs(os.path.join(existing, "new"), 0o755)
        self.assertEqual(self.mode(existing), 0o700)
        self.assertEqual(self.mode(os.path.join(existing, "new")), 0o755)
        make_dirs(existing, 0o755)
        self.assertEqual(self.mode(existing), 0o700)
