"""
The HKD (twistd qvd-hkd) with the real KVM driver: libvirtd + QEMU (TCG
here), the minimal desktop image as a bootable qcow2 with the real agent
(qvd.testing.kvm_image.minimal_kvm_image), the real PostgreSQL, and the
host's nxproxy drawing the desktop into an Xvfb.

One guest boot covers it all (TCG boots take tens of seconds): start
through the database -> running with the agent answering; kill -9 of the
HKD leaves the domain running and a new HKD adopts it; x_start (with the
VM's secret, which the agent took from fw_cfg; a call without it is
refused) -> nxproxy shows the colour the desktop painted; stop -> no
domain, overlay, tap or secret file left; the home disk keeps the user's
home the agent made on it.

Everything created is named after this process: bridge qbhk<pid>, domains
qvdt-hkdk<pid>-<vm>, taps qhk<pid>t<vm>, storage under a temp dir.
"""

import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

from twisted.internet import reactor, task
from twisted.trial import unittest

from qvd.testing import pg
from qvd.testing.hkd import FAST, HKDTestMixin
from qvd.testing.screen import colour_fraction

try:
    import libvirt
except ImportError:
    libvirt = None

PID = os.getpid()
SUBNET = f"10.217.{PID % 200}"
BRIDGE = f"qbhk{PID % 1000}"
PREFIX = f"qvdt-hkdk{PID % 100000}-"
TAPS = f"qhk{PID % 1000}t"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SERVICES = os.path.join(ROOT, "deploy", "services.sh")
COLOUR = (0x2A, 0x7F, 0xD4)


def _missing():
    if os.geteuid() != 0:
        return "KVM desktops need root"
    if libvirt is None:
        return "libvirt-python is not installed"
    for program in ("libvirtd", "qemu-system-x86_64", "nxproxy", "Xvfb", "xwd", "debugfs"):
        if shutil.which(program) is None:
            return f"{program} is not installed"
    subprocess.run([SERVICES], check=False)
    if not os.path.exists("/run/libvirt/libvirt-sock"):
        return "libvirtd does not run and deploy/services.sh could not start it"
    return None


def _sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class HKDOnKVMTests(HKDTestMixin, pg.DatabaseTestMixin, unittest.TestCase):
    timeout = 900

    def setUp(self):
        why = _missing()
        if why:
            raise unittest.SkipTest(why)
        from qvd.testing import kvm_image
        try:
            image = kvm_image.minimal_kvm_image(stream=sys.stderr)
        except kvm_image.ImageUnavailable as e:
            raise unittest.SkipTest(str(e))
        super().setUp()
        self.root = tempfile.mkdtemp(prefix=f"qvdt-hkdk{PID}-", dir="/var/tmp")
        os.chmod(self.root, 0o755)
        self.addCleanup(self.scrub)
        images = os.path.join(self.root, "storage", "images")
        os.makedirs(images)
        # as qvd-admin registers it: the image alone, no .kernel/.initrd
        os.link(image, os.path.join(images, "minimal.qcow2"))
        self.values = dict(FAST)
        self.values.update({
            "path.run": f"{self.root}/run",
            "path.log": f"{self.root}/log",
            "path.storage.root": f"{self.root}/storage",
            "path.storage.local": f"{self.root}/storage",
            "path.storage.images": images,
            "vm.hypervisor": "kvm",
            "vm.kvm.domain.prefix": PREFIX,
            "vm.kvm.tap.prefix": TAPS,
            "vm.kvm.bridge.address": f"{SUBNET}.1/24",
            "vm.network.bridge": BRIDGE,
            "vm.network.netmask": "255.255.255.0",
            "hkd.lock.path": f"{self.root}/run/hkd.lock",
            "hkd.vm.timeout.waiting_vma": "400",
            "hkd.vm.timeout.powering_off": "90",
            "hkd.vm.timeout.shutting_down": "60",
            "hkd.vm.vma.dead.failures": "20",
            "hkd.vm.vma.dead.seconds": "60",
            "hkd.vm.vma.ping.interval": "2",
            "hkd.vm.vma.ping.starting": "0.5",
        })
        self.host = self.add_host("node1", address=f"{SUBNET}.1")
        self.osf, _ = self.add_osf(di_path="minimal.qcow2")
        self.query("UPDATE osfs SET memory = 512, user_storage_size = 64 WHERE id = %s", (self.osf,))

    def scrub(self):
        """
        Remove every domain, interface and file of this test.
        """
        conn = libvirt.open("qemu:///system")
        try:
            for dom in conn.listAllDomains():
                if dom.name().startswith(PREFIX):
                    try:
                        if dom.isActive():
                            dom.destroy()
                        if dom.isPersistent():
                            dom.undefine()
                    except libvirt.libvirtError:
                        pass  # gone meanwhile
        finally:
            conn.close()
        for iface in os.listdir("/sys/class/net"):
            if iface.startswith(TAPS) or iface == BRIDGE:
                subprocess.run(["ip", "link", "delete", iface], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def domains(self):
        conn = libvirt.open("qemu:///system")
        try:
            return sorted(d.name() for d in conn.listAllDomains() if d.name().startswith(PREFIX))
        finally:
            conn.close()

    def hkd_log(self):
        try:
            with open(os.path.join(self.root, "hkd.log"), errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def console(self, vm):
        try:
            with open(os.path.join(self.root, "log", "kvm", f"{PREFIX}{vm}-console.log"),
                      errors="replace") as f:
                return f.read()[-3000:]
        except OSError:
            return ""

    def colour_seen(self, display):
        return colour_fraction(display, COLOUR) > 0.05

    def home_entries(self, home_disk):
        """
        The names in the root of the home disk's first partition (as the
        agent partitioned and formatted it), read without mounting, and the
        UUID of that filesystem: (names, uuid).
        """
        raw = os.path.join(self.root, "home.raw")
        subprocess.run(["qemu-img", "convert", "-O", "raw", home_disk, raw], check=True)
        with open(raw, "rb") as f:
            mbr = f.read(512)
        self.assertEqual(mbr[510:], b"\x55\xaa", "the home disk has no partition table")
        start, size = struct.unpack_from("<II", mbr, 446 + 8)  # first MBR entry
        fs = os.path.join(self.root, "home.fs")
        subprocess.run(["dd", f"if={raw}", f"of={fs}", "bs=512", f"skip={start}",
                        f"count={size}", "status=none"], check=True)
        out = subprocess.run(["debugfs", "-R", "ls -p /", fs], capture_output=True, text=True).stdout
        names = [line.split("/")[5] for line in out.splitlines() if line.count("/") >= 6]
        header = subprocess.run(["dumpe2fs", "-h", fs], capture_output=True, text=True).stdout
        uuid = [line.split(":", 1)[1].strip() for line in header.splitlines()
                if line.startswith("Filesystem UUID:")]
        return names, uuid[0] if uuid else None

    async def test_desktop_on_kvm(self):
        """
        A start command boots the KVM desktop until its agent answers
        (running); after kill -9 of the HKD the domain still runs and a new
        HKD adopts it without starting it again; x_start runs the session
        and the host's nxproxy draws the colour the desktop painted; a stop
        command powers it off and leaves no domain, overlay or tap; the home
        disk holds the user's home the agent created on it, and after another
        start and session it is the same filesystem (not formatted again).
        """
        from qvd.vmaclient import VMAClient
        vm = self.add_vm("alice", osf=self.osf, ip=f"{SUBNET}.20")
        proc = self.twistd()
        await self.until(lambda: self.node_state() == "running", timeout=60,
                         what=f"node up\n{self.hkd_log()}")
        t0 = time.monotonic()
        self.command(vm, "start", self.host)
        try:
            await self.wait_state(vm, "running", timeout=420)
        except Exception:
            self.fail(f"not running\nHKD: {self.hkd_log()}\nconsole: {self.console(vm)}")
        print(f"\nKVM desktop start -> running with the agent answering: {time.monotonic() - t0:.1f} s")
        self.assertEqual(self.domains(), [f"{PREFIX}{vm}"])
        self.assertEqual(self.query("SELECT hypervisor FROM host_runtimes WHERE host_id = %s",
                                    (self.host,))[0]["hypervisor"], "kvm")

        # kill -9 of the HKD: the domain lives on, a new HKD adopts it
        attempts = self.query("SELECT run_attempts FROM vm_counters WHERE vm_id = %s", (vm,))[0]
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        await _sleep(1)
        self.assertEqual(self.domains(), [f"{PREFIX}{vm}"])
        proc = self.twistd()
        await self.until(lambda: self.node_state() == "running", timeout=60,
                         what=f"node up again\n{self.hkd_log()}")
        await _sleep(2)
        self.assertEqual(self.vm_row(vm)["vm_state"], "running")
        self.assertEqual(self.query("SELECT run_attempts FROM vm_counters WHERE vm_id = %s",
                                    (vm,))[0], attempts)

        # the desktop through NX; the agent takes only calls with the secret
        # of this start (it read it from fw_cfg)
        from qvd.vmaclient import VMAUnreachable
        anonymous = VMAClient(reactor, f"{SUBNET}.20", 3030, timeout=10)
        with self.assertRaises(VMAUnreachable) as refused:
            await anonymous.x_state()
        self.assertIn("HTTP 403", str(refused.exception))
        secret = self.vm_row(vm)["vma_secret"]
        self.assertTrue(secret)
        client = VMAClient(reactor, f"{SUBNET}.20", 3030, timeout=10, secret=secret)
        self.assertEqual(await client.x_start({
            "qvd.vm.user.name": "alice", "qvd.client.link": "lan",
            "qvd.client.geometry": "800x600"}), "starting")
        deadline = time.monotonic() + 120
        states = []
        while True:
            state = await client.x_state()
            if not states or states[-1] != state:
                states.append(state)
            if state == "listening":
                break
            self.assertLess(time.monotonic(), deadline,
                            f"the session never listened: x_state {states}\n{self.console(vm)}")
            await _sleep(1)
        display = 400 + PID % 200
        while os.path.exists(f"/tmp/.X11-unix/X{display}") or os.path.exists(f"/tmp/.X{display}-lock"):
            display += 1
        xvfb = subprocess.Popen(["Xvfb", f":{display}", "-screen", "0", "1024x768x24",
                                 "-nolisten", "tcp"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: (xvfb.kill(), xvfb.wait()))
        home = os.path.join(self.root, "client-home")
        os.makedirs(home)
        await _sleep(1)
        proxy = subprocess.Popen(
            ["nxproxy", "-S", f"nx/nx,connect={SUBNET}.20,port=4100:{display + 1}"],
            env={"PATH": os.environ["PATH"], "HOME": home, "DISPLAY": f":{display}"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: proxy.poll() is None and (proxy.kill(), proxy.wait()))
        deadline = time.monotonic() + 180
        while not self.colour_seen(display):
            self.assertLess(time.monotonic(), deadline, "the painted colour never appeared")
            await _sleep(1)

        # stop: nothing left but the home disk
        self.command(vm, "stop", self.host)
        await self.until(lambda: self.vm_row(vm)["vm_state"] == "stopped", timeout=240,
                         what=f"stopped\n{self.hkd_log()}")
        self.assertIsNone(self.vm_row(vm)["vm_state_reason"])
        self.assertEqual(self.domains(), [])
        self.assertEqual(os.listdir(os.path.join(self.root, "run", "kvm")), [],
                         "a secret file is left")
        overlays = os.path.join(self.root, "storage", "overlays")
        self.assertEqual([n for n in os.listdir(overlays) if n.endswith("-overlay.qcow2")], [])
        self.assertEqual([i for i in os.listdir("/sys/class/net") if i.startswith(TAPS)], [])
        home_disk = os.path.join(self.root, "storage", "homes", f"{vm}-data.qcow2")
        names, uuid = self.home_entries(home_disk)
        self.assertIn("alice", names)
        self.assertTrue(uuid)

        # start again: the session uses the same home filesystem
        proxy.kill()
        proxy.wait()
        self.command(vm, "start", self.host)
        await self.wait_state(vm, "running", timeout=420)
        self.assertNotEqual(self.vm_row(vm)["vma_secret"], secret, "a new start, a new secret")
        client = VMAClient(reactor, f"{SUBNET}.20", 3030, timeout=10,
                           secret=self.vm_row(vm)["vma_secret"])
        self.assertEqual(await client.x_start({
            "qvd.vm.user.name": "alice", "qvd.client.link": "lan"}), "starting")
        deadline = time.monotonic() + 120
        while (await client.x_state()) != "listening":
            self.assertLess(time.monotonic(), deadline, f"no session after restart\n{self.console(vm)}")
            await _sleep(1)
        self.command(vm, "stop", self.host)
        await self.until(lambda: self.vm_row(vm)["vm_state"] == "stopped", timeout=240,
                         what=f"stopped again\n{self.hkd_log()}")
        self.assertEqual(self.home_entries(home_disk), (names, uuid))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
