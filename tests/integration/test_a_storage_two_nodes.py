"""
A home written on node A is the home on node B: two nodes on this machine
sharing one GlusterFS volume (L{qvd.testing.gluster}), LXC desktops.

Known defect (2026-12-04): run late in the whole suite (as
test_storage_shared, after the other integration modules), node B's desktop
boots but its agent never answers; alone, or early, it passes. Until the
interference is found this module's name makes it run first; see issue 11.
"""


from twisted.trial import unittest

from qvd import storage
from qvd.testing import gluster

class TwoNodeHomeTests(unittest.TestCase):
    """
    Two nodes on this machine (two HKDs with their own hosts rows, bridges,
    run dirs and container names, one database), each with its own FUSE
    mount of one GlusterFS volume as path.storage.root, LXC desktops of the
    minimal image (on the volume).
    """

    def setUp(self):
        from qvd.testing import e2e
        why = gluster.missing() or e2e.missing("lxc")
        if why:
            raise unittest.SkipTest(why)
        self.volume = gluster.Volume("qvdtn").start()
        self.addCleanup(self.volume.stop)
        mount_a, mount_b = self.volume.mount(), self.volume.mount()
        storage.write_marker(mount_a, "two-nodes")
        shared = {"path.storage.shared": "1"}
        self.a = e2e.Stack("gnode", subnet_base=233, nodename="node-a",
                           storage_root=mount_a, config=shared, storage_id="two-nodes")
        self.addCleanup(self.a.stop)
        self.a.start()
        self.b = e2e.Stack("hnode", subnet_base=235, nodename="node-b", join=self.a,
                           storage_root=mount_b, config=shared)
        self.addCleanup(self.b.stop)
        self.b.start()

    def test_home_follows_the_vm(self):
        """
        A file the user's desktop writes into its home on node A is in the
        home when the VM next starts on node B.
        """
        vm = self.a.add_user("alice", "secret")
        self.a.start_vms(vm)
        done = self.a.attach(vm, "sh", "-c", "echo written-on-a > /home/proof.txt && sync")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.a.stop_vms()
        # Each test node has its own VM subnet (the VM network across nodes
        # is another part of issue 11): the VM gets node B's address.
        self.a.query("UPDATE vms SET ip = %s WHERE id = %s", (f"{self.b.subnet}.50", vm))
        try:
            # node B's first start of the DI unpacks it from the volume (over FUSE)
            self.b.start_vms(vm, timeout=180)
        except AssertionError as e:
            raise AssertionError(f"{e}; the VM: {self.b.vm_row(vm)}\nnode B's HKD:\n"
                                 + self.b.log_tail(self.b.hkd_log, 40))
        self.assertEqual(self.b.vm_row(vm)["host_id"], self.b.host)
        done = self.b.attach(vm, "cat", "/home/proof.txt")
        self.assertEqual((done.returncode, done.stdout), (0, "written-on-a\n"), done.stderr)
        self.b.stop_vms()
