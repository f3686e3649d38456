"""
The VMA inside a real desktop image (the DI builder's Debian bookworm tree):
Debian's python3 + python3-twisted 22.4, real provisioning (useradd inside the
image only) and a session run as the new user, in a private mount and pid
namespace chrooted into an overlay over the image (extracted once into
/var/cache/qvd-test). nxproxy on the host draws it into an Xvfb.

The image is C{$QVD_TEST_VMA_IMAGE_TAR} or the base layer of the minimal
test image (L{qvd.testing.images.minimal_base_layer}, built when missing).
"""

import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from twisted.internet import defer, reactor
from twisted.trial import unittest

import qvd
from qvd.vmaclient import VMAClient
from qvd.testing.processes import ProcessesMixin
from qvd.testing.screen import colour_fraction
from tests.integration.test_vma_nx import COLOUR, _free_displays, _sleep

TREE = os.path.dirname(os.path.dirname(os.path.abspath(qvd.__file__)))


CACHE = "/var/cache/qvd-test"


def _extracted(tar):
    """
    The image tar extracted once under /var/cache/qvd-test (keyed by the
    tar's path, size and mtime), used read-only as the overlay's lower layer.
    """
    st = os.stat(tar)
    key = hashlib.sha256(f"{tar}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = os.path.join(CACHE, f"vma-rootfs-{key}")
    if os.path.isdir(target):
        return target
    os.makedirs(CACHE, exist_ok=True)
    with open(target + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isdir(target):
            partial = f"{target}.partial-{os.getpid()}"
            shutil.rmtree(partial, ignore_errors=True)
            os.makedirs(partial)
            subprocess.run(["tar", "-xf", tar, "-C", partial], check=True, timeout=600)
            os.rename(partial, target)
    return target


def _image_tar():
    tar = os.environ.get("QVD_TEST_VMA_IMAGE_TAR")
    if tar:
        return tar if os.path.exists(tar) else None
    # The base layer of the test image: built (and cached) when missing, so
    # that this test never depends on another one having run first.
    from qvd.testing.images import minimal_base_layer
    return minimal_base_layer()


SESSION = """#!/bin/sh
id > /tmp/session-id.txt
xsetroot -solid '#2a7fd4'
sleep 100000 &
wait
"""


class VMAInImage(ProcessesMixin, unittest.TestCase):

    timeout = 180

    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("needs root (unshare, chroot, useradd inside the image)")
        for tool in ("unshare", "chroot", "nxproxy", "Xvfb", "xwd"):
            if shutil.which(tool) is None:
                raise unittest.SkipTest(f"{tool} is missing")
        self.tar = _image_tar()
        if self.tar is None:
            raise unittest.SkipTest(
                "no desktop image tar (set QVD_TEST_VMA_IMAGE_TAR or build one with qvd-di "
                "into /var/cache/qvd-di/base-bookworm-*.tar)")
        self.lower = _extracted(self.tar)
        for needed in ("usr/bin/nxagent", "usr/bin/xinit", "usr/bin/xsetroot",
                       "usr/lib/python3/dist-packages/twisted", "usr/sbin/useradd"):
            if not os.path.exists(os.path.join(self.lower, needed)):
                raise unittest.SkipTest(f"image {self.tar} lacks /{needed}")
        self.tmp = tempfile.mkdtemp(prefix="qvd-vma-image-")
        self.root = os.path.join(self.tmp, "root")      # the overlay, seen only by the test's namespace
        self.upper = os.path.join(self.tmp, "upper")    # what the test and the VMA change
        for d in (self.root, self.upper, os.path.join(self.tmp, "work")):
            os.makedirs(d)
        self.addCleanup(self.remove_tree)
        self.start_processes()

    def remove_tree(self):
        # The mounts live in the test's private namespace, gone with it; never
        # delete through a mount point that is still there.
        if os.path.ismount(self.root):
            raise RuntimeError(f"{self.root} is still mounted: not removing {self.tmp}")
        shutil.rmtree(self.tmp, ignore_errors=True)

    def write(self, path, text, mode=0o644):
        full = os.path.join(self.upper, path.lstrip("/"))
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "w") as f:
            f.write(text)
        os.chmod(full, mode)

    def log(self, name):
        with open(os.path.join(self.tmp, f"{name}.log"), errors="replace") as f:
            return f.read()[-3000:]

    def in_image(self, path):
        """A file of the running image (its /tmp and /run are namespace-private)."""
        pid = self.vma_pid()
        with open(f"/proc/{pid}/root{path}") as f:
            return f.read()

    def vma_pid(self):
        children = subprocess.run(["pgrep", "-P", str(self.unshare.pid)],
                                  capture_output=True, text=True).stdout.split()
        return int(children[0])

    @defer.inlineCallbacks
    def wait_state(self, client, wanted, seconds=30):
        deadline = time.monotonic() + seconds
        state = None
        while time.monotonic() < deadline:
            state = yield client.x_state()
            if state == wanted:
                return
            yield _sleep(0.2)
        self.fail(f"x_state stayed {state!r}, wanted {wanted!r}\n{self.log('vma')}")

    def colour_seen(self, display):
        return colour_fraction(display, COLOUR) > 0.05

    @defer.inlineCallbacks
    def test_provision_and_run_as_user(self):
        """
        In the image, x_start for a new user creates it (uid and groups as
        asked), runs the session as that user, nxproxy sees it; x_stop and
        a SIGTERM to the VMA leave no process behind.
        """
        agent_display, xvfb_display, proxy_display = _free_displays(3, 320)
        self.write("/usr/local/bin/test-session", SESSION, 0o755)
        self.write("/etc/qvd/vma.conf",
                   f"vma.port = 0\nvma.address = 127.0.0.1\nvma.display = {agent_display}\n"
                   "vma.x-session.command = /usr/local/bin/test-session\n"
                   "vma.user.home.drive =\n")
        shutil.copytree(os.path.join(TREE, "qvd"), os.path.join(self.upper, "opt/qvdsrc/qvd"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        script = (f"mount -t overlay overlay -o lowerdir={self.lower},upperdir=upper,"
                  "workdir=work root && "
                  "mount -t proc proc root/proc && mount --rbind /dev root/dev && "
                  "mount -t tmpfs tmpfs root/tmp && mount -t tmpfs tmpfs root/run && "
                  "exec chroot root env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "
                  "PYTHONPATH=/opt/qvdsrc LANG=C.UTF-8 "
                  "python3 -m qvd.vma --config /etc/qvd/vma.conf --log -")
        self.unshare = self.popen(["unshare", "--mount", "--propagation", "private", "--pid",
                                   "--fork", "--kill-child", "sh", "-c", script],
                                  "vma", cwd=self.tmp)
        port = None
        for _ in range(150):
            match = re.search(r"SimpleRPCServerFactory starting on (\d+)", self.log("vma"))
            if match:
                port = int(match.group(1))
                break
            self.assertIsNone(self.unshare.poll(), self.log("vma"))
            yield _sleep(0.1)
        self.assertIsNotNone(port, self.log("vma"))
        client = VMAClient(reactor, "127.0.0.1", port)

        self.assertEqual((yield client.x_start({
            "qvd.vm.user.name": "alice", "qvd.vm.user.uid": "2345",
            "qvd.client.link": "lan", "qvd.client.geometry": "800x600"})), "starting")
        yield self.wait_state(client, "listening")
        self.assertIn("alice:x:2345:", self.in_image("/etc/passwd"))

        self.popen(["Xvfb", f":{xvfb_display}", "-screen", "0", "1024x768x24",
                    "-nolisten", "tcp"], "xvfb")
        home = os.path.join(self.tmp, "home")
        os.makedirs(home)
        yield _sleep(0.5)
        proxy = self.popen(["nxproxy", "-S", f"nx/nx,connect=127.0.0.1,port="
                            f"{4000 + agent_display}:{proxy_display}"], "nxproxy",
                           env={"PATH": os.environ["PATH"], "HOME": home,
                                "DISPLAY": f":{xvfb_display}"})
        yield self.wait_state(client, "connected")
        deadline = time.monotonic() + 20
        while not self.colour_seen(xvfb_display):
            self.assertLess(time.monotonic(), deadline, "painted colour never appeared")
            yield _sleep(0.3)
        identity = self.in_image("/tmp/session-id.txt")
        self.assertIn("uid=2345(alice)", identity)
        self.assertIn("(qvduser)", identity)

        self.assertEqual((yield client.x_stop()), "stopping")
        yield self.wait_state(client, "stopped")
        proxy.wait(10)
        t_stopped = time.monotonic()
        while True:
            left = subprocess.run(["ps", "-o", "pid=,stat=,args=", "-u", "2345"],
                                  capture_output=True, text=True).stdout.strip()
            if not left or time.monotonic() - t_stopped > 5:
                break
            yield _sleep(0.2)
        self.assertEqual(left, "", "processes of the session's user are left")

        os.kill(self.vma_pid(), signal.SIGTERM)      # the VMA stops; its namespace ends
        self.unshare.wait(15)
        with socket.socket() as s:
            self.assertNotEqual(s.connect_ex(("127.0.0.1", port)), 0)
