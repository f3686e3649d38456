"""
The real LXC driver passes the same interface suite as the fake hypervisor
(qvd.testing.virt_interface). Needs root, LXC and the minimal test image.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

from twisted.internet import reactor
from twisted.trial import unittest

from qvd.config import Config, declared_keys
from qvd.testing.virt_interface import HypervisorInterfaceTests
from qvd.virt.interfaces import VMSpec

PID = os.getpid()
SUBNET = f"10.217.{PID % 200}"
BRIDGE = f"qbi{PID % 1000}"
PREFIX = f"qvdt-hki{PID % 100000}-"
_root = None


def _why_not():
    if os.geteuid() != 0:
        return "LXC containers need root"
    if shutil.which("lxc-start") is None:
        return "lxc-start is not installed (apt-get install lxc)"
    try:
        import qvd.testing.images  # noqa: F401
        import qvd.virt.lxc  # noqa: F401
    except ImportError as e:
        return f"the LXC driver or the test images are not on this branch ({e})"
    from qvd.testing.images import cannot_build_reason
    return cannot_build_reason()


def _cleanup(root):
    lxcpath = f"{root}/run/lxc"
    if os.path.isdir(lxcpath):
        for name in os.listdir(lxcpath):
            subprocess.run(["lxc-stop", "-k", "-n", name, "-P", lxcpath], capture_output=True)
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f if f" {root}/" in line]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    for iface in os.listdir("/sys/class/net"):
        if iface.startswith(f"qi{PID % 1000}v") or iface == BRIDGE:
            subprocess.run(["ip", "link", "delete", iface], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


class LXCInterfaceTests(HypervisorInterfaceTests, unittest.TestCase):
    timeout = 120

    def setUp(self):
        global _root
        why = _why_not()
        if why:
            raise unittest.SkipTest(why)
        if _root is None:
            from qvd.testing.images import minimal_lxc_image
            image = minimal_lxc_image(stream=sys.stderr)
            _root = tempfile.mkdtemp(prefix=f"qvdt-hki{PID}-", dir="/var/tmp")
            os.makedirs(f"{_root}/storage")
            self.__class__.image = image
            atexit.register(_cleanup, _root)
        self.root = _root

    def makeHypervisor(self):
        from qvd.virt.lxc import LXCDriver
        config = Config(keys=declared_keys(), node={
            "path.run": f"{self.root}/run", "path.storage.root": f"{self.root}/storage",
            "vm.lxc.name.prefix": PREFIX, "vm.lxc.veth.prefix": f"qi{PID % 1000}v",
            "vm.network.bridge": BRIDGE, "vm.lxc.bridge.address": f"{SUBNET}.1/24"})
        driver = LXCDriver(config, reactor)
        return driver.setUp().addCallback(lambda _: driver)

    def makeSpec(self, vm_id):
        return VMSpec(vm_id=vm_id, name=f"vm{vm_id}", login="alice", memory=256, di_id=1,
                      di_path=self.image, ip=f"{SUBNET}.{vm_id % 200 + 10}",
                      mac=f"54:52:00:aa:00:{vm_id % 200:02x}", netmask="255.255.255.0",
                      bridge=BRIDGE)
