"""
Tests for qvd.storage (the shared-storage verdict, pure) and the sweep's
choice of leftovers (qvd.hkd.storage.leftovers).
"""

import os

from twisted.trial import unittest

from qvd import storage
from qvd.hkd.storage import SweepSettings, leftovers

MOUNTINFO = (
    "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
    "45 22 0:40 / /srv/qvd\\040store rw,relatime - fuse.glusterfs 10.0.0.1:/qvd rw,user_id=0\n"
)
SHARED = storage.StorageSettings(root="/srv/qvd store", shared=True,
                                 fstypes=("fuse.glusterfs",),
                                 local=(("path.storage.basefs", "/var/lib/qvd/local/basefs"),))


class VerdictTests(unittest.TestCase):

    def test_parse(self):
        """mountinfo lines give mount point (unescaped), type and source."""
        mounts = storage.parse_mountinfo(MOUNTINFO)
        self.assertEqual(mounts[1], storage.Mount("/srv/qvd store", "fuse.glusterfs",
                                                  "10.0.0.1:/qvd"))

    def test_ok(self):
        """A root on a gluster mount whose marker is the database's id passes."""
        mounts = storage.parse_mountinfo(MOUNTINFO)
        self.assertIsNone(storage.judge(SHARED, "id1", "/srv/qvd store", mounts, "id1"))
        self.assertIsNone(storage.judge(SHARED, "id1", "/srv/qvd store/sub", mounts, "id1"))

    def test_local_directory(self):
        """A root on the local disk fails, naming the type found and the fix."""
        mounts = storage.parse_mountinfo(MOUNTINFO)
        error = storage.judge(SHARED, "id1", "/srv/other", mounts, "id1")
        self.assertIn("is not on shared storage (it is on ext4 mounted on /", str(error))
        self.assertIn("mount -t glusterfs", str(error))

    def test_markers(self):
        """Missing marker, other marker, no id in the database, unreadable marker."""
        mounts = storage.parse_mountinfo(MOUNTINFO)
        root = "/srv/qvd store"
        self.assertIn("has no storage marker",
                      str(storage.judge(SHARED, "id1", root, mounts, None)))
        self.assertIn("another cluster (marker id2",
                      str(storage.judge(SHARED, "id1", root, mounts, "id2")))
        self.assertIn("database has no storage id",
                      str(storage.judge(SHARED, None, root, mounts, "id2")))
        lost = OSError(107, "Transport endpoint is not connected")
        self.assertIn("Transport endpoint is not connected",
                      str(storage.judge(SHARED, "id1", root, mounts, lost)))

    def test_not_shared(self):
        """With path.storage.shared = 0 nothing is judged."""
        import attrs
        self.assertIsNone(storage.judge(attrs.evolve(SHARED, shared=False), None, "/x", [], None))

    def test_marker_round_trip(self):
        """write_marker then read_marker gives the id back; no file: None."""
        root = self.mktemp()
        os.makedirs(root)
        self.assertIsNone(storage.read_marker(root))
        storage.write_marker(root, "abc")
        self.assertEqual(storage.read_marker(root), "abc")


class LeftoverTests(unittest.TestCase):
    settings = SweepSettings(interval=0, basefs="/l/basefs", overlayfs="/l/ov",
                             homefs="/s/homefs", overlays="/s/overlays", homes="/s/homes")
    names = {"/l/basefs": [".locks", "old.u1-g1", "kept.u1-g1", "reused.u1-g1", "untar-1"],
             "/l/ov": ["3-7-overlayfs", "7-overlayfs-work", "3-8-overlayfs"],
             "/s/homefs": ["7-fs", "8-fs", "alice"],
             "/s/overlays": ["3-7-overlay.qcow2"], "/s/homes": ["7-data.qcow2", "8-data.qcow2"]}

    def test_only_what_was_deleted(self):
        """
        Only entries of deleted DIs (not reused by a DI) and deleted VMs are
        chosen; busy paths are kept; shared ones only when the storage is ok.
        """
        found = leftovers(self.settings, self.names, ["kept.tar", "reused.tar.gz"],
                          ["old.tar", "reused.tar"], [7], busy=set(), shared_ok=True)
        self.assertEqual(found, ["/l/basefs/old.u1-g1", "/l/ov/3-7-overlayfs",
                                 "/l/ov/7-overlayfs-work", "/s/homefs/7-fs",
                                 "/s/overlays/3-7-overlay.qcow2", "/s/homes/7-data.qcow2"])
        found = leftovers(self.settings, self.names, [], ["old.tar"], [7],
                          busy={"/l/basefs/old.u1-g1/rootfs"}, shared_ok=False)
        self.assertEqual(found, ["/l/ov/3-7-overlayfs", "/l/ov/7-overlayfs-work"])
