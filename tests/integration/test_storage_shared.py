"""
Shared storage on a real GlusterFS volume (L{qvd.testing.gluster}): the
HKD's checks at start and before each VM's start (twistd qvd-hkd with the
fake hypervisor of fake_hkd.tac), qvd-admin storage init, and what di del /
vm del free, on the volume and on the node. The home that follows its VM
from one node to another, with LXC desktops, is in test_a_storage_two_nodes.
"""

import io
import os
import shlex
import subprocess
import sys

from twisted.trial import unittest

from qvd import storage
from qvd.admin import cli
from qvd.testing import gluster, pg
from qvd.testing.hkd import HKDTestMixin

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TAC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_hkd.tac")


class VolumeMixin:
    """A fresh volume per test, mounted once as C{self.mount}."""

    def setUp(self):
        super().setUp()
        why = gluster.missing()
        if why:
            raise unittest.SkipTest(why)
        self.volume = gluster.Volume("qvdts").start()
        self.addCleanup(self.volume.stop)
        self.mount = self.volume.mount()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)


class CheckTests(VolumeMixin, HKDTestMixin, pg.DatabaseTestMixin, unittest.TestCase):

    def write_conf(self, root, **extra):
        cluster = pg.cluster()
        values = {
            "nodename": "node1",
            "database.host": cluster.socketdir,
            "database.name": self.dbname,
            "hkd.lock.path": f"{self.dir}/hkd.lock",
            "hkd.ticker.interval": "0.2",
            "path.run": self.dir,
            "path.state": f"{self.dir}/state",
            "path.storage.root": root,
            "path.storage.shared": "1",
            "hkd.storage.sweep.interval": "0.3",
        }
        values.update({k.replace("__", "."): v for k, v in extra.items()})
        self.conf = os.path.join(self.dir, "node.conf")
        with open(self.conf, "w") as f:
            for key, value in values.items():
                f.write(f"{key} = {value}\n")
        return self.conf

    def admin(self, *argv):
        out, err = io.StringIO(), io.StringIO()
        status = cli.main(["--config", self.conf, *argv], stdout=out, stderr=err)
        return status, out.getvalue() + err.getvalue()

    def twistd(self):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   QVD_HKD_ARGS=shlex.join(["--config", self.conf]))
        proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "-l", os.path.join(self.dir, "hkd.log"), "-y", TAC],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        return proc

    def refused(self, text):
        proc = self.twistd()
        out, _ = proc.communicate(timeout=30)
        self.assertNotEqual(proc.returncode, 0, out)
        self.assertIn(text, out)
        self.assertNotIn("Traceback", out)
        return out

    def storage_id(self):
        rows = self.query("SELECT storage_id FROM storage_identity")
        return rows[0]["storage_id"] if rows else None

    async def running(self, host):
        await self.until(lambda: self.node_state_of(host) == "running", timeout=20,
                         what="node running")

    def node_state_of(self, host):
        rows = self.query("SELECT state FROM host_runtimes WHERE host_id = %s", (host,))
        return rows[0]["state"] if rows else None

    def test_refuses_local_directory(self):
        """
        With path.storage.shared = 1, a local directory holding the right
        marker (a copy of the volume's) is refused at start: it is not on a
        shared mount; the message says to mount the volume there.
        """
        self.add_host("node1")
        self.write_conf(self.mount)
        self.assertEqual(self.admin("storage", "init")[0], 0)
        local = os.path.join(self.dir, "looks-like-it")
        os.makedirs(local)
        storage.write_marker(local, self.storage_id())
        self.write_conf(local)
        out = self.refused(f"path.storage.root {local} is not on shared storage")
        self.assertIn("mount -t glusterfs SERVER:/VOLUME", out)

    def test_refuses_other_marker_and_uninitialised(self):
        """
        A gluster mount whose marker is not the database's id is refused
        (another cluster's volume), and so is a database without an id.
        """
        self.add_host("node1")
        self.write_conf(self.mount)
        self.refused("the database has no storage id")
        storage.write_marker(self.mount, "another-cluster")
        self.query("INSERT INTO storage_identity (storage_id) VALUES ('ours')")
        self.refused("holds the storage of another cluster (marker another-cluster, "
                     "the database's id is ours)")
        status, out = self.admin("storage", "init")
        self.assertEqual(status, 1, out)
        self.assertIn("holds the marker of another storage", out)

    def test_refuses_local_overlay_dirs_on_volume(self):
        """
        The node-local directories (overlay upper dirs) may not be on the
        volume: overlayfs cannot write to a FUSE upper dir.
        """
        self.add_host("node1")
        self.write_conf(self.mount, path__storage__overlayfs=f"{self.mount}/overlayfs")
        self.assertEqual(self.admin("storage", "init")[0], 0)
        self.refused(f"path.storage.overlayfs {self.mount}/overlayfs is on the shared volume")

    async def test_starts_on_the_volume(self):
        """
        storage init writes one id to the database and to the marker on the
        volume (seen through a second mount); the HKD starts on the mount.
        """
        host = self.add_host("node1")
        self.write_conf(self.mount)
        status, out = self.admin("storage", "init")
        self.assertEqual(status, 0, out)
        other = self.volume.mount()
        self.assertEqual(storage.read_marker(other), self.storage_id())
        self.assertEqual(self.admin("storage", "init")[1].split()[0], "storage")
        proc = self.twistd()
        await self.running(host)
        proc.terminate()
        proc.communicate(timeout=30)

    async def test_mount_lost_while_running(self):
        """
        The volume is unmounted while the HKD runs: the next VM start fails
        with a reason naming the problem, and nothing is written under the
        bare mount point.
        """
        host = self.add_host("node1")
        self.write_conf(self.mount)
        self.assertEqual(self.admin("storage", "init")[0], 0)
        self.twistd()
        await self.running(host)
        vm = self.add_vm()
        self.volume.unmount(self.mount)
        self.command(vm, "start", host)
        await self.until(lambda: self.vm_row(vm)["vm_state_reason"], timeout=20,
                         what="a failure reason")
        row = self.vm_row(vm)
        self.assertEqual(row["vm_state"], "stopped")
        self.assertIn(f"VM {vm} not started: path.storage.root {self.mount} is not on shared "
                      "storage", row["vm_state_reason"])
        self.assertEqual(os.listdir(self.mount), [])

    async def test_del_frees_storage(self):
        """
        vm del removes the VM's home from the volume at once; di del removes
        the DI's file from the volume, and the node's sweep removes the DI's
        unpacked tree and the VM's overlay dirs on the node; the tree of a DI
        that still exists and a directory nobody knows are kept.
        """
        host = self.add_host("node1")
        self.write_conf(self.mount)
        self.assertEqual(self.admin("storage", "init")[0], 0)
        osf, di = self.add_osf(di_path="gone.tar")
        vm = self.add_vm(osf=osf)
        images = os.path.join(self.mount, "images")
        home = os.path.join(self.mount, "homefs", f"{vm}-fs")
        os.makedirs(images)
        os.makedirs(os.path.join(home, "alice"))
        with open(os.path.join(home, "alice", "notes.txt"), "w") as f:
            f.write("mine\n")
        with open(os.path.join(images, "gone.tar"), "wb") as f:
            f.write(b"x" * 1024)
        local = os.path.join(self.dir, "state", "local")
        tree = os.path.join(local, "basefs", "gone.u1000000-g1000000")
        kept = os.path.join(local, "basefs", "other.u1000000-g1000000")
        upper = os.path.join(local, "overlayfs", f"{di}-{vm}-overlayfs")
        for path in (tree, kept, upper, os.path.join(tree, "etc")):
            os.makedirs(path)
        self.twistd()
        await self.running(host)

        # a DI in use by a VM that is not stopped is refused
        self.query("UPDATE vm_runtimes SET vm_state = 'running', current_di_id = %s, "
                   "host_id = %s WHERE vm_id = %s", (di, host, vm))
        status, out = self.admin("di", "del", str(di))
        self.assertEqual(status, 1, out)
        self.assertIn("in use by 1 VM(s)", out)
        self.query("UPDATE vm_runtimes SET vm_state = 'stopped' WHERE vm_id = %s", (vm,))

        status, out = self.admin("vm", "del", str(vm))
        self.assertEqual(status, 0, out)
        self.assertFalse(os.path.exists(home))
        status, out = self.admin("di", "del", str(di))
        self.assertEqual(status, 0, out)
        self.assertFalse(os.path.exists(os.path.join(images, "gone.tar")))
        await self.until(lambda: not os.path.exists(tree) and not os.path.exists(upper),
                         timeout=20, what="the sweep")
        self.assertTrue(os.path.isdir(kept))
        self.assertEqual(sorted(os.listdir(os.path.join(local, "basefs"))),
                         [".locks", "other.u1000000-g1000000"])
