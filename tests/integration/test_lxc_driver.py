"""
The LXC driver on real LXC (root): containers from the minimal test image on
a bridge and subnet of this test process, removed afterwards.

Timings are printed to stderr ("lxc-timing: ...").
"""

import atexit
import errno
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from qvd.config import Config, declared_keys
from qvd.virt._lxcconfig import mounts_below
from qvd.virt._lxcfs import cgroup_dirs
from qvd.virt._process import run
from qvd.virt.interfaces import IHypervisor, VMSpec, VirtError
from qvd.virt.lxc import LXCDriver

PID = os.getpid()
SUBNET = f"10.213.{PID % 200}"
BRIDGE = f"qbl{PID % 1000}"
VETH_PREFIX = f"qtl{PID % 1000}v"
NAME_PREFIX = f"qvdt-lxc{PID}-"


def _skip_reason():
    if os.geteuid() != 0:
        return "LXC integration tests need root"
    for program in ("lxc-start", "lxc-attach", "mmdebstrap", "ip"):
        if shutil.which(program) is None:
            return f"{program} is not installed"
    return None


def _timing(text):
    sys.stderr.write(f"lxc-timing: {text}\n")


class LXCDriverIntegrationTests(unittest.TestCase):
    """
    Real containers from the minimal image.
    """

    skip = _skip_reason()
    timeout = 180

    image = root = config = None

    @classmethod
    def _fixture(cls):
        """
        Once per process: the test image, a storage root and a config; removed
        at exit (trial has no per-class teardown).
        """
        if cls.config is not None:
            return
        from qvd.testing.images import minimal_lxc_image
        start = time.monotonic()
        cls.image = minimal_lxc_image(stream=sys.stderr)
        _timing(f"test image ready in {time.monotonic() - start:.1f} s")
        cls.root = tempfile.mkdtemp(prefix="qvdt-lxc-", dir="/var/tmp")
        atexit.register(_remove_fixture, cls.root)
        cls.config = Config(keys=declared_keys(), node={
            "path.run": os.path.join(cls.root, "run"),
            "path.storage.root": os.path.join(cls.root, "storage"),
            "vm.lxc.name.prefix": NAME_PREFIX,
            "vm.lxc.veth.prefix": VETH_PREFIX,
            "vm.network.bridge": BRIDGE,
            "vm.lxc.bridge.address": f"{SUBNET}.1/24",
            "vm.network.ip.start": f"{SUBNET}.2",
            "vm.network.netmask": "255.255.255.0",
        })

    def setUp(self):
        self._fixture()
        self.driver = LXCDriver(self.config, reactor)
        self.specs = []
        return self.driver.setUp()

    @defer.inlineCallbacks
    def tearDown(self):
        for spec in self.specs:
            yield self.driver.cleanup(spec)
            self.assertNothingLeft(spec)

    def spec(self, vm_id, di_path=None, **kw):
        spec = VMSpec(
            vm_id=vm_id, name=f"desk{vm_id}", login="alice", memory=192,
            di_id=7, di_path=di_path or self.image, ip=f"{SUBNET}.{10 + vm_id}",
            mac=f"54:52:00:d5:{PID % 200:02x}:{10 + vm_id:02x}",
            netmask="255.255.255.0", bridge=BRIDGE, gateway=f"{SUBNET}.1", **kw)
        self.specs.append(spec)
        return spec

    def layout(self, spec):
        from qvd.virt._lxcconfig import Layout
        return Layout.of(self.driver.settings, spec)

    def assertNothingLeft(self, spec, pid=None):
        layout = self.layout(spec)
        self.assertEqual(mounts_below(open("/proc/self/mounts").read(), layout.rootfs), [])
        self.assertFalse(os.path.exists(f"/sys/class/net/{layout.veth}"), layout.veth)
        self.assertEqual(cgroup_dirs(layout.name), [])
        for path in (layout.container_dir, layout.rootfs, layout.work):
            self.assertFalse(os.path.exists(path), path)
        if not spec.persistent_overlay:
            self.assertFalse(os.path.exists(layout.upper), layout.upper)
        if pid is not None:
            self.assertFalse(os.path.exists(f"/proc/{pid}"), f"process {pid} remains")

    @defer.inlineCallbacks
    def attach(self, spec, command):
        result = yield run(reactor, [
            "lxc-attach", "-n", self.layout(spec).name, "-P", self.driver.settings.lxcpath,
            "--clear-env", "--", "/bin/sh", "-c", command])
        return result

    @defer.inlineCallbacks
    def boot(self, spec):
        t0 = time.monotonic()
        yield self.driver.prepare(spec)
        t1 = time.monotonic()
        running = yield self.driver.start(spec)
        t2 = time.monotonic()
        _timing(f"VM {spec.vm_id}: prepare {t1 - t0:.2f} s, start() to RUNNING {t2 - t1:.3f} s")
        return running

    def test_provides_interface(self):
        """
        LXCDriver provides IHypervisor.
        """
        self.assertTrue(IHypervisor.providedBy(self.driver))

    @defer.inlineCallbacks
    def test_container_runs_with_address_home_and_memory_limit(self):
        """
        A started VM runs, answers on its IP, has the memory limit of its
        spec, keeps files in /home across stop and start, loses files
        elsewhere (non-persistent overlay); after cleanup nothing remains.
        """
        spec = self.spec(1)
        running = yield self.boot(spec)
        self.assertTrue(running.pid)
        self.assertTrue((yield self.driver.isRunning(1)))
        layout = self.layout(spec)
        limit = open(f"/sys/fs/cgroup/memory/lxc.payload.{layout.name}/"
                     f"memory.limit_in_bytes").read().strip()
        self.assertEqual(int(limit), 192 * 1024 * 1024)

        t0 = time.monotonic()
        outcome = yield threads.deferToThread(_probe, spec.ip, 3030, 20)
        _timing(f"VM 1: TCP {spec.ip}:3030 {outcome} after {time.monotonic() - t0:.2f} s")
        self.assertIn(outcome, ("open", "refused"))
        address = yield self.attach(spec, "ip -4 -o addr show eth0")
        self.assertIn(f"{spec.ip}/24", address.out)
        # Users other than root can walk the tree (the overlay's root is 0755).
        modes = yield self.attach(spec, "stat -c %a / /home")
        self.assertEqual(modes.out.split(), ["755", "755"], modes.describe())

        result = yield self.attach(spec, "echo kept > /home/probe; echo lost > /root/probe")
        self.assertEqual(result.code, 0, result.describe())
        self.assertTrue(os.path.exists(os.path.join(layout.home_dir, "probe")))

        stopped = self.driver.watch(1)
        t0 = time.monotonic()
        yield self.driver.shutdown(1)
        yield stopped
        _timing(f"VM 1: shutdown() to stopped {time.monotonic() - t0:.2f} s")
        yield self.driver.cleanup(spec)
        self.assertNothingLeft(spec, running.pid)

        running = yield self.boot(spec)
        result = yield self.attach(spec, "cat /home/probe; ls /root/probe")
        self.assertIn("kept", result.out)
        self.assertIn("No such file", result.err)
        yield self.driver.cleanup(spec)
        self.assertNothingLeft(spec, running.pid)

    @defer.inlineCallbacks
    def test_list_running_and_kill(self):
        """
        listRunning finds a running VM with its init pid; kill stops it at
        once and watch fires; cleanup then leaves nothing.
        """
        spec = self.spec(2)
        running = yield self.boot(spec)
        found = yield self.driver.listRunning()
        self.assertIn(running, found)
        stopped = self.driver.watch(2)
        t0 = time.monotonic()
        yield self.driver.kill(2)
        yield stopped
        _timing(f"VM 2: kill() {time.monotonic() - t0:.2f} s")
        self.assertFalse((yield self.driver.isRunning(2)))
        self.assertNotIn(2, [r.vm_id for r in (yield self.driver.listRunning())])
        yield self.driver.cleanup(spec)
        yield self.driver.cleanup(spec)
        self.assertNothingLeft(spec, running.pid)

    @defer.inlineCallbacks
    def test_persistent_overlay_and_shared_base(self):
        """
        Two VMs of one DI prepared at once share one unpacked base fs; with
        persistent_overlay a file outside /home survives cleanup and a new
        boot, and cleanup keeps the upper dir.
        """
        image = os.path.join(self.root, f"shared-{PID}.tar")
        if not os.path.exists(image):
            os.link(self.image, image)
        first = self.spec(5, di_path=image, persistent_overlay=True)
        second = self.spec(6, di_path=image)
        yield defer.gatherResults([self.driver.prepare(first), self.driver.prepare(second)])
        basefs = self.driver.settings.basefs
        self.assertEqual(sorted(n for n in os.listdir(basefs) if n.startswith("shared-")),
                         [f"shared-{PID}"])
        self.assertEqual([n for n in os.listdir(basefs) if n.startswith("untar-")], [])
        yield self.driver.start(first)
        result = yield self.attach(first, "echo kept > /root/probe")
        self.assertEqual(result.code, 0, result.describe())
        yield self.driver.cleanup(first)
        upper = self.layout(first).upper
        self.addCleanup(shutil.rmtree, upper, True)
        self.assertTrue(os.path.exists(os.path.join(upper, "root", "probe")))
        yield self.driver.prepare(first)
        yield self.driver.start(first)
        result = yield self.attach(first, "cat /root/probe")
        self.assertEqual(result.out.strip(), "kept")

    @defer.inlineCallbacks
    def test_without_overlay_root_is_read_only_base(self):
        """
        Without use_overlay the VM's root is the base fs bound read-only, and
        cleanup unmounts it; leftovers of a crash (a veth of the VM's name)
        are removed by prepare.
        """
        spec = self.spec(7, use_overlay=False)
        layout = self.layout(spec)
        subprocess.run(["ip", "link", "add", layout.veth, "type", "veth",
                        "peer", "name", f"{layout.veth}p"], check=True)
        yield self.driver.prepare(spec)
        self.assertFalse(os.path.exists(f"/sys/class/net/{layout.veth}"))
        [line] = [l for l in open("/proc/self/mounts") if f" {layout.rootfs} " in l]
        self.assertIn("ro", line.split()[3].split(","))
        self.assertTrue(os.path.exists(os.path.join(layout.rootfs, "etc", "os-release")))
        yield self.driver.cleanup(spec)

    @defer.inlineCallbacks
    def test_corrupt_image_fails_and_leaves_nothing(self):
        """
        A DI that is not a valid tarball makes prepare fail with a VirtError
        naming it, and leaves no base fs, temporary tree or VM directory.
        """
        bad = os.path.join(self.root, f"corrupt-{PID}.tar")
        with open(bad, "wb") as f:
            f.write(b"this is not a tarball\n" * 100)
        spec = self.spec(3, di_path=bad)
        with self.assertRaises(VirtError) as caught:
            yield self.driver.prepare(spec)
        self.assertIn(bad, str(caught.exception))
        basefs = self.driver.settings.basefs
        self.assertEqual([n for n in os.listdir(basefs)
                          if n.startswith(("untar-", f"corrupt-{PID}"))], [])
        self.assertNothingLeft(spec)

    @defer.inlineCallbacks
    def test_watch_of_stopped_vm_fires_at_once(self):
        """
        watch() of a VM that does not run fires at once; cleanup of a VM that
        never started succeeds.
        """
        spec = self.spec(4)
        yield self.driver.watch(4)
        self.assertFalse((yield self.driver.isRunning(4)))
        yield self.driver.cleanup(spec)


def _remove_fixture(root):
    subprocess.run(["ip", "link", "delete", BRIDGE], stderr=subprocess.DEVNULL)
    for point in mounts_below(open("/proc/self/mounts").read(), root):
        subprocess.run(["umount", "-l", point])
    shutil.rmtree(root, ignore_errors=True)


def _probe(ip, port, timeout):
    """
    Connect to ip:port until it answers or refuses (both prove the address
    is up): 'open', 'refused' or the last error.
    """
    deadline = time.monotonic() + timeout
    last = "timeout"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((ip, port), timeout=1):
                return "open"
        except ConnectionRefusedError:
            return "refused"
        except OSError as e:
            last = errno.errorcode.get(e.errno, str(e))
            time.sleep(0.05)
    return last
