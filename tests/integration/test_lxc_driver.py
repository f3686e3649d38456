"""
The LXC driver on real LXC (root): containers from the minimal test image on
a bridge and subnet of this test process, removed afterwards.

Timings are printed to stderr ("lxc-timing: ...").
"""

import errno
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

import qvd
from qvd.config import Config, declared_keys
from qvd.testing.virt_interface import HypervisorInterfaceTests
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
#: The image runs the VMA (python3 -m qvd.vma) when this tree has it.
VMA_IN_IMAGE = os.path.exists(
    os.path.join(os.path.dirname(qvd.__file__), "vma", "__main__.py"))


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

    def setUp(self):
        self.image, self.root, self.config = _fixture()
        self.addCleanup(_remove_fixture, self.root)
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
        A started VM runs, its VMA answers on its IP (or the port refuses
        when the image has no VMA), has the memory limit of its
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
        outcome = yield threads.deferToThread(_probe, spec.ip, 3030, 30, VMA_IN_IMAGE)
        _timing(f"VM 1: VMA port {spec.ip}:3030 {outcome} {time.monotonic() - t0:.2f} s "
                f"after RUNNING")
        self.assertIn(outcome, ("open",) if VMA_IN_IMAGE else ("open", "refused"))
        address = yield self.attach(spec, "ip -4 -o addr show eth0")
        self.assertIn(f"{spec.ip}/24", address.out)
        # Users other than root can walk the tree (the overlay's root is 0755).
        modes = yield self.attach(spec, "stat -c %a / /home")
        self.assertEqual(modes.out.split(), ["755", "755"], modes.describe())

        result = yield self.attach(spec, "stat -c %a /")
        self.assertEqual(result.out.strip(), "755", "the overlay's root must be 0755")
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
    def test_daemon_umask(self):
        """
        Under twistd's daemon umask (077, deploy/up.sh's daemons) the driver
        makes its storage, unpacks the DI and starts a desktop whose agent
        answers and whose users walk its tree; a storage directory an
        earlier such start left at 0700 is opened (o+x) again.
        """
        storage = os.path.join(self.root, "umask-storage")
        os.makedirs(os.path.join(storage, "rootfs"))
        os.chmod(os.path.join(storage, "rootfs"), 0o700)
        config = Config(keys=declared_keys(), node={
            "path.run": os.path.join(self.root, "umask-run"),
            "path.storage.root": storage,
            "path.storage.local": storage,
            "vm.lxc.name.prefix": NAME_PREFIX,
            "vm.lxc.veth.prefix": VETH_PREFIX,
            "vm.network.bridge": BRIDGE,
            "vm.lxc.bridge.address": f"{SUBNET}.1/24",
            "vm.network.netmask": "255.255.255.0",
        })
        driver = LXCDriver(config, reactor)
        spec = VMSpec(
            vm_id=9, name="desk9", login="alice", memory=192, di_id=8, di_path=self.image,
            ip=f"{SUBNET}.19", mac=f"54:52:00:d5:{PID % 200:02x}:19",
            netmask="255.255.255.0", bridge=BRIDGE, gateway=f"{SUBNET}.1")
        old = os.umask(0o077)
        try:
            yield driver.setUp()
            yield driver.prepare(spec)
            yield driver.start(spec)
        finally:
            os.umask(old)
        try:
            self.assertEqual(os.stat(os.path.join(storage, "rootfs")).st_mode & 0o011, 0o011)
            outcome = yield threads.deferToThread(_probe, spec.ip, 3030, 30, VMA_IN_IMAGE)
            self.assertEqual(outcome, "open" if VMA_IN_IMAGE else "refused")
            from qvd.virt._lxcconfig import Layout
            layout = Layout.of(driver.settings, spec)
            modes = yield run(reactor, [
                "lxc-attach", "-n", layout.name, "-P", driver.settings.lxcpath, "--clear-env",
                "--", "/bin/sh", "-c",
                "stat -c %a / /home /etc; su -s /bin/sh nobody -c 'ls /etc >/dev/null && echo walked'"])
            self.assertEqual(modes.out.split(), ["755", "755", "755", "walked"], modes.describe())
        finally:
            yield driver.cleanup(spec)

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
    def test_concurrent_prepares_share_one_base(self):
        """
        Two VMs of one DI prepared at once share one unpacked base fs and no
        temporary tree remains.
        """
        image = _tiny_image(self.root, f"tiny-{PID}")
        basefs = self.driver.settings.basefs
        self.addCleanup(_remove_base, basefs, f"tiny-{PID}")
        first, second = self.spec(5, di_path=image), self.spec(6, di_path=image)
        yield defer.gatherResults([self.driver.prepare(first), self.driver.prepare(second)])
        self.assertEqual([n for n in os.listdir(basefs) if n.startswith(f"tiny-{PID}")],
                         [f"tiny-{PID}{self.driver.settings.id_suffix}"])
        self.assertEqual([n for n in os.listdir(basefs) if n.startswith(f"untar-{os.getpid()}-")],
                         [])
        for spec in (first, second):
            self.assertTrue(os.path.exists(os.path.join(
                self.layout(spec).rootfs, "etc", "os-release")))

    @defer.inlineCallbacks
    def test_persistent_overlay(self):
        """
        With persistent_overlay a file outside /home survives cleanup and a
        new boot, and cleanup keeps the upper dir.
        """
        first = self.spec(8, persistent_overlay=True)
        yield self.driver.prepare(first)
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
                          if n.startswith((f"untar-{os.getpid()}-", f"corrupt-{PID}"))], [])
        _remove_base(basefs, f"corrupt-{PID}")
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


def _tiny_image(directory, name):
    """
    A DI holding just enough to count as a root filesystem (not bootable).
    """
    tree = os.path.join(directory, name + ".tree")
    for sub in ("etc", "sbin"):
        os.makedirs(os.path.join(tree, sub), exist_ok=True)
    with open(os.path.join(tree, "etc", "os-release"), "w") as f:
        f.write("ID=tiny\n")
    path = os.path.join(directory, name + ".tar")
    subprocess.run(["tar", "-c", "-f", path, "-C", tree, "."], check=True)
    return path


def _remove_base(basefs, name):
    """
    Remove a test DI's base fs and lock from the shared base fs cache.
    """
    for tree in glob.glob(os.path.join(basefs, name + ".u*-g*")):
        subprocess.run(["rm", "-rf", "--one-file-system", tree])
    for path in glob.glob(os.path.join(basefs, ".locks", name + ".u*-g*.lock")):
        if os.path.exists(path):
            os.unlink(path)


def _fixture():
    """
    Per test: the test image (built once, cached), a storage root and a
    config using the shared base fs cache (so nothing big is unpacked or
    deleted per test). Removed by L{_remove_fixture}.
    """
    from qvd.testing.images import lxc_test_basefs, minimal_lxc_image
    start = time.monotonic()
    image = minimal_lxc_image(stream=sys.stderr)
    if time.monotonic() - start > 1:
        _timing(f"test image ready in {time.monotonic() - start:.1f} s")
    root = tempfile.mkdtemp(prefix="qvdt-lxc-", dir="/var/tmp")
    os.chmod(root, 0o755)  # containers' root (unprivileged) walks through it
    config = Config(keys=declared_keys(), node={
        "path.run": os.path.join(root, "run"),
        "path.storage.root": os.path.join(root, "storage"),
        "path.storage.basefs": lxc_test_basefs(),
        "vm.lxc.name.prefix": NAME_PREFIX,
        "vm.lxc.veth.prefix": VETH_PREFIX,
        "vm.network.bridge": BRIDGE,
        "vm.lxc.bridge.address": f"{SUBNET}.1/24",
        "vm.network.ip.start": f"{SUBNET}.2",
        "vm.network.netmask": "255.255.255.0",
    })
    return image, root, config


def _remove_fixture(root):
    start = time.monotonic()
    subprocess.run(["ip", "link", "delete", BRIDGE], stderr=subprocess.DEVNULL)
    for point in mounts_below(open("/proc/self/mounts").read(), root):
        subprocess.run(["umount", "-l", point])
    subprocess.run(["rm", "-rf", "--one-file-system", root])
    if time.monotonic() - start > 1:
        _timing(f"storage removed in {time.monotonic() - start:.1f} s")


def _probe(ip, port, timeout, wait_for_open=False):
    """
    Connect to ip:port until it answers an HTTP GET /vma/ping ('open') or,
    unless C{wait_for_open}, refuses ('refused': the address is up, nothing
    listens); else the last error.
    """
    deadline = time.monotonic() + timeout
    last = "timeout"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((ip, port), timeout=1) as s:
                s.sendall(b"GET /vma/ping HTTP/1.0\r\nHost: vm\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/"):
                    return "open"
                last = "no HTTP answer"
        except ConnectionRefusedError:
            if not wait_for_open:
                return "refused"
            last = "refused"
        except OSError as e:
            last = errno.errorcode.get(e.errno, str(e))
        time.sleep(0.05)
    return last


class LXCInterfaceTests(HypervisorInterfaceTests, unittest.TestCase):
    """
    The behaviour every IHypervisor shows (qvd.testing.virt_interface), on
    real LXC with the minimal image.
    """

    skip = _skip_reason()
    timeout = 120

    def makeHypervisor(self):
        self.image, self.root, self.config = _fixture()
        self.addCleanup(_remove_fixture, self.root)
        driver = LXCDriver(self.config, reactor)
        return driver.setUp().addCallback(lambda _: driver)

    def makeSpec(self, vm_id):
        return VMSpec(
            vm_id=vm_id, name=f"desk{vm_id}", login="bob", memory=192, di_id=7,
            di_path=self.image, ip=f"{SUBNET}.{vm_id % 100 + 100}",
            mac=f"54:52:00:d5:{PID % 200:02x}:{vm_id % 100 + 100:02x}",
            netmask="255.255.255.0", bridge=BRIDGE)
