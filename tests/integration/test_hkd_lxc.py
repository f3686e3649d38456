"""
The HKD with the real LXC driver, the real agent (qvd-vma inside the minimal
test DI of qvd.testing.images) and the real PostgreSQL: start/stop through
the database, adoption after kill -9 of the HKD, a silent agent, persistent
homes. Needs root, LXC and the minimal image (built once, cached).

Everything created is named after this process: bridge qbh<pid>, containers
qvdt-hkd<pid>-<vm>, veths qh<pid>v..., storage under a temp dir in /var/tmp;
all removed afterwards.
"""

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile

from twisted.internet import reactor, task
from twisted.trial import unittest

from qvd.config import Config, declared_keys
from qvd.testing import pg
from qvd.testing.hkd import FAST, HKDTestMixin

PID = os.getpid()
SUBNET = f"10.216.{PID % 200}"
BRIDGE = f"qbh{PID % 1000}"
PREFIX = f"qvdt-hkd{PID % 100000}-"


def _missing():
    if os.geteuid() != 0:
        return "LXC desktops need root"
    for program in ("lxc-start", "lxc-attach", "lxc-info"):
        if shutil.which(program) is None:
            return f"{program} is not installed (apt-get install lxc)"
    try:
        import qvd.testing.images  # noqa: F401
        import qvd.virt.lxc  # noqa: F401
        import qvd.vmaclient  # noqa: F401
    except ImportError as e:
        return f"the LXC driver, the agent or the test images are not on this branch ({e})"
    from qvd.testing.images import cannot_build_reason
    return cannot_build_reason()


def _scrub(root, everything=False):
    """
    Remove every container, mount and interface of this test process under
    C{root}, and the per-VM storage; with C{everything}, also the bridge, the
    unpacked DI and C{root} itself.
    """
    lxcpath = f"{root}/run/lxc"
    if os.path.isdir(lxcpath):
        for name in os.listdir(lxcpath):
            subprocess.run(["lxc-stop", "-k", "-n", name, "-P", lxcpath], capture_output=True)
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f if f" {root}/" in line]
    keep = f"{root}/storage/basefs"
    for point in sorted(points, key=len, reverse=True):
        if everything or not point.startswith(keep):
            subprocess.run(["umount", "-l", point], capture_output=True)
    for iface in os.listdir("/sys/class/net"):
        if iface.startswith(f"qh{PID % 1000}v") or (everything and iface == BRIDGE):
            subprocess.run(["ip", "link", "delete", iface], capture_output=True)
    if everything:
        shutil.rmtree(root, ignore_errors=True)
        return
    for sub in ("run", "storage/rootfs", "storage/overlayfs", "storage/homefs"):
        shutil.rmtree(os.path.join(root, sub), ignore_errors=True)


class HKDOnLXCTests(HKDTestMixin, pg.DatabaseTestMixin, unittest.TestCase):
    timeout = 300

    root = None

    @classmethod
    def shared_root(cls):
        """
        One storage root per test process, so the DI is unpacked once
        (basefs); each test removes its containers, overlays and homes, and
        the root goes when the process exits (trial has no setUpClass).
        """
        if HKDOnLXCTests.root is None:
            from qvd.testing.images import minimal_lxc_image
            image = minimal_lxc_image(stream=sys.stderr)
            root = tempfile.mkdtemp(prefix=f"qvdt-hkd{PID}-", dir="/var/tmp")
            os.chmod(root, 0o755)  # containers' root (unprivileged) walks through it
            images = os.path.join(root, "storage", "images")
            os.makedirs(images)
            # Named after the cached image, so the shared unpacked tree
            # (lxc_test_basefs) is never one of an older image.
            os.symlink(image, os.path.join(images, os.path.basename(image)))
            HKDOnLXCTests.image = os.path.basename(image)
            atexit.register(_scrub, root, True)
            HKDOnLXCTests.root = root
        return HKDOnLXCTests.root

    def setUp(self):
        from qvd.testing.images import lxc_test_basefs
        why = _missing()
        if why:
            raise unittest.SkipTest(why)
        super().setUp()
        self.root = self.shared_root()
        self.addCleanup(_scrub, self.root)
        images = os.path.join(self.root, "storage", "images")
        self.values = dict(FAST)
        self.values.update({
            "path.run": f"{self.root}/run",
            "path.storage.root": f"{self.root}/storage",
            "path.storage.local": f"{self.root}/storage",
            "path.storage.images": images,
            "path.storage.basefs": lxc_test_basefs(),
            "vm.hypervisor": "lxc",
            "vm.lxc.name.prefix": PREFIX,
            "vm.lxc.veth.prefix": f"qh{PID % 1000}v",
            "vm.network.bridge": BRIDGE,
            "vm.network.netmask": "255.255.255.0",
            "vm.lxc.bridge.address": f"{SUBNET}.1/24",
            "hkd.lock.path": f"{self.root}/run/hkd.lock",
            "hkd.vm.timeout.waiting_vma": "60",
            "hkd.vm.timeout.powering_off": "15",
            "hkd.vm.timeout.shutting_down": "15",
            "hkd.vm.vma.dead.failures": "5",
            "hkd.vm.vma.dead.seconds": "10",
            "hkd.vm.vma.ping.interval": "1",
            "hkd.vm.vma.ping.starting": "0.2",
        })
        self.host = self.add_host("node1", address=f"{SUBNET}.1")
        self.osf, _ = self.add_osf(di_path=self.image)
        self.next_ip = 10

    def config(self, **overrides):
        values = dict(self.values)
        values.update({k.replace("__", "."): str(v) for k, v in overrides.items()})
        return Config(keys=declared_keys(), node=values)

    def driver(self, config=None):
        from qvd.virt.lxc import LXCDriver
        return LXCDriver(config or self.config(), reactor)

    def vm(self, login="alice"):
        self.next_ip += 1
        return self.add_vm(login, osf=self.osf, ip=f"{SUBNET}.{self.next_ip}")

    def ip(self, vm_id):
        return self.query("SELECT host(ip) AS ip FROM vms WHERE id = %s", (vm_id,))[0]["ip"]

    async def start_lxc_hkd(self, **overrides):
        from qvd.hkd.tap import make_vma_factory
        config = self.config(**overrides)
        return await self.start_hkd(self.host, hv=self.driver(config),
                                    vma=make_vma_factory(config, reactor), config=config)

    def container(self, vm_id):
        return f"{PREFIX}{vm_id}"

    def attach(self, vm_id, command):
        return subprocess.run(
            ["lxc-attach", "-n", self.container(vm_id), "-P", f"{self.root}/run/lxc",
             "--", "sh", "-c", command], capture_output=True, text=True, timeout=30)

    def lxc_running(self):
        lxcpath = f"{self.root}/run/lxc"
        out = subprocess.run(["lxc-ls", "-P", lxcpath, "--running", "-1"],
                             capture_output=True, text=True).stdout.split()
        return sorted(name for name in out if name.startswith(PREFIX))

    async def vma_ping(self, vm_id):
        from qvd.vmaclient import VMAClient
        secret = self.vm_row(vm_id)["vma_secret"]
        return await VMAClient(reactor, self.ip(vm_id), 3030, timeout=4, secret=secret).ping()

    async def test_start_stop(self):
        """
        A start command makes the container run and its agent answer on 3030;
        a stop command stops it and leaves no container, mount or interface.
        """
        vm = self.vm()
        await self.start_lxc_hkd()
        self.command(vm, "start", self.host)
        await self.wait_state(vm, "running", timeout=90)
        await self.vma_ping(vm)
        self.assertEqual(self.lxc_running(), [self.container(vm)])
        self.command(vm, "stop", self.host)
        row = await self.wait_state(vm, "stopped", timeout=60)
        self.assertIsNone(row["vm_state_reason"])
        self.assertEqual(self.lxc_running(), [])
        self.assertEqual((await self.driver().listRunning()), [])
        with open("/proc/self/mounts") as f:
            self.assertEqual([l for l in f if f"{self.root}/storage/rootfs" in l], [])
        self.assertEqual([i for i in os.listdir("/sys/class/net")
                          if i.startswith(f"qh{PID % 1000}v")], [])

    async def test_silent_agent(self):
        """
        An agent that never answers (the HKD pings a port nothing listens on)
        gets the VM stopped after the configured limit, with the reason.
        """
        vm = self.vm()
        await self.start_lxc_hkd(hkd__vm__vma__port=3999, hkd__vm__timeout__waiting_vma=5)
        self.command(vm, "start", self.host)
        await self.until(lambda: self.vm_row(vm)["vm_state_reason"], timeout=90,
                         what="a reason")
        row = await self.wait_state(vm, "stopped", timeout=60)
        self.assertIn("agent did not answer within 5", row["vm_state_reason"])
        self.assertEqual(self.lxc_running(), [])

    async def test_broken_image(self):
        """
        A DI that fails to unpack leaves the VM stopped with the reason in its
        row, and no container, mount or interface of it.
        """
        images = os.path.join(self.root, "storage", "images")
        with open(os.path.join(images, f"broken-{PID}.tar"), "wb") as f:
            f.write(b"this is not a tar archive\n" * 100)
        osf, _ = self.add_osf(name="broken", di_path=f"broken-{PID}.tar")
        self.next_ip += 1
        vm = self.add_vm("bob", osf=osf, ip=f"{SUBNET}.{self.next_ip}")
        await self.start_lxc_hkd()
        self.command(vm, "start", self.host)
        await self.until(lambda: self.vm_row(vm)["vm_state_reason"], timeout=90,
                         what="a reason")
        row = await self.wait_state(vm, "stopped", timeout=60)
        self.assertIn(f"broken-{PID}.tar", row["vm_state_reason"])
        self.assertEqual(self.lxc_running(), [])
        with open("/proc/self/mounts") as f:
            self.assertEqual([l for l in f if f"{self.root}/storage/rootfs" in l], [])
        self.assertEqual([i for i in os.listdir("/sys/class/net")
                          if i.startswith(f"qh{PID % 1000}v")], [])

    async def test_home_survives_restart(self):
        """
        A file written in /home survives a stop and a start of the VM.
        """
        vm = self.vm()
        await self.start_lxc_hkd()
        self.command(vm, "start", self.host)
        await self.wait_state(vm, "running", timeout=90)
        wrote = self.attach(vm, "echo kept > /home/qvd-hkd-marker")
        self.assertEqual(wrote.returncode, 0, wrote.stderr)
        self.command(vm, "stop", self.host)
        await self.until(lambda: self.vm_row(vm)["host_id"] is None, timeout=60,
                         what="stopped")
        self.command(vm, "start", self.host)
        await self.wait_state(vm, "running", timeout=90)
        read = self.attach(vm, "cat /home/qvd-hkd-marker")
        self.assertEqual(read.stdout.strip(), "kept", read.stderr)

    async def test_kill_9_adoption(self):
        """
        kill -9 of the HKD while 3 desktops run leaves them running; a
        restarted HKD adopts the 2 still running (no new start) and reaps the
        one killed meanwhile to stopped.
        """
        vms = [self.vm(f"user{i}") for i in range(3)]
        proc = self.twistd()
        await self.until(lambda: self.node_state() == "running", timeout=30, what="node up")
        for vm in vms:
            self.command(vm, "start", self.host)
        for vm in vms:
            await self.wait_state(vm, "running", timeout=120)
        attempts = self.query("SELECT sum(run_attempts) AS n FROM vm_counters")[0]["n"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        await task.deferLater(reactor, 1, lambda: None)
        self.assertEqual(self.lxc_running(), sorted(self.container(v) for v in vms))
        for vm in vms:
            await self.vma_ping(vm)
        await self.driver().kill(vms[2])

        proc = self.twistd()
        row = await self.until(
            lambda: self.vm_row(vms[2])["vm_state"] == "stopped" and self.vm_row(vms[2]),
            timeout=60, what="the killed VM reaped")
        self.assertIn("not running when the HKD started", row["vm_state_reason"])
        await self.until(lambda: self.node_state() == "running", timeout=30, what="node up")
        for vm in vms[:2]:
            self.assertEqual(self.vm_row(vm)["vm_state"], "running")
        self.assertEqual(
            self.query("SELECT sum(run_attempts) AS n FROM vm_counters")[0]["n"], attempts)
        self.assertEqual(self.lxc_running(), sorted(self.container(v) for v in vms[:2]))
        for vm in vms[:2]:
            self.command(vm, "stop", self.host)
        for vm in vms[:2]:
            await self.until(lambda vm=vm: self.vm_row(vm)["host_id"] is None, timeout=60,
                             what="stopped")
        self.assertEqual(self.lxc_running(), [])
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)

    async def test_x_start_listening(self):
        """
        Once the HKD says running, x_start (what the L7R does next) brings
        nxagent to 'listening' on port 4100 of the VM.
        """
        from qvd.vmaclient import VMAClient
        vm = self.vm()
        await self.start_lxc_hkd()
        self.command(vm, "start", self.host)
        row = await self.wait_state(vm, "running", timeout=90)
        mode = os.stat(os.path.join(self.root, "storage", "rootfs", f"{vm}-fs")).st_mode
        if not mode & 0o005:
            raise unittest.SkipTest(
                f"the container's / has mode {mode & 0o777:o}: the desktop user cannot run "
                "the X session (qvd/virt/_lxcfs.py prepare_dirs creates the overlay upper "
                "dir with mode 0700)")
        client = VMAClient(reactor, row["vm_address"], row["vm_vma_port"], timeout=10,
                           secret=row["vma_secret"])
        await client.x_start({"qvd.vm.user.name": "qvd", "qvd.client.os": "linux",
                              "qvd.client.geometry": "800x600", "qvd.client.link": "lan",
                              "qvd.client.keyboard": "pc105/us",
                              "qvd.client.fullscreen": "0"})
        await self.until(lambda: client.x_state().addCallback(lambda s: s == "listening"),
                         timeout=30, what="nxagent listening")
        # nxagent says it starts the session a moment before it listens (the
        # L7R's connect_x retries a refused connection for the same reason)
        import socket
        for attempt in range(40):
            try:
                with socket.create_connection((row["vm_address"], row["vm_x_port"]), timeout=5):
                    break
            except ConnectionRefusedError:
                if attempt == 39:
                    raise
                await task.deferLater(reactor, 0.05, lambda: None)
