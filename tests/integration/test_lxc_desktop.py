"""
A desktop end to end on real LXC (root): a container from the minimal test
image (qvd.testing.images) started by the LXC driver, its VMA (booted by
systemd) asked for a session with x_start, and a host nxproxy drawing the
session into an Xvfb display: the root window has the image's colour and the
minimal desktop's marker process runs inside the container.

Bridge, subnet, container names and displays are this process's own and are
removed afterwards. Timings go to stderr ("lxc-desktop-timing: ...").
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from qvd.config import Config, declared_keys
from qvd.di.recipe import MARKER_NAME
from qvd.virt._lxcconfig import mounts_below
from qvd.testing.screen import CONVERT, colour_fraction
from qvd.virt.interfaces import VMSpec
from qvd.virt.lxc import LXCDriver

PID = os.getpid()
SUBNET = f"10.215.{PID % 200}"
BRIDGE = f"qbd{PID % 1000}"
COLOUR = (0x2A, 0x7F, 0xD4)


def _skip_reason():
    if os.geteuid() != 0:
        return "LXC desktops need root"
    for program in ("lxc-start", "lxc-attach", "mmdebstrap", "nxproxy", "Xvfb", "xwd"):
        if shutil.which(program) is None:
            return f"{program} is not installed"
    if not os.path.exists(CONVERT):
        return f"{CONVERT} (imagemagick) is not installed"
    try:
        import qvd.vmaclient  # noqa: F401
    except ImportError:
        return "qvd.vma is not on this branch"
    return None


def _free_display(start):
    n = start + PID % 200
    while (os.path.exists(f"/tmp/.X{n}-lock") or os.path.exists(f"/tmp/.X11-unix/X{n}")):
        n += 1
    return n


def _sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


def _timing(text):
    sys.stderr.write(f"lxc-desktop-timing: {text}\n")


class LXCDesktopTests(unittest.TestCase):

    skip = _skip_reason()
    timeout = 240

    def setUp(self):
        from qvd.testing.images import lxc_test_basefs, minimal_lxc_image
        self.image = minimal_lxc_image(stream=sys.stderr)
        self.root = tempfile.mkdtemp(prefix="qvdt-lxcd-", dir="/var/tmp")
        os.chmod(self.root, 0o755)  # containers' root (unprivileged) walks through it
        self.addCleanup(self.scrub)
        self.config = Config(keys=declared_keys(), node={
            "path.run": f"{self.root}/run",
            "path.storage.root": f"{self.root}/storage",
            "path.storage.local": f"{self.root}/storage",
            "path.storage.basefs": lxc_test_basefs(),
            "vm.lxc.name.prefix": f"qvdt-lxcd{PID}-",
            "vm.lxc.veth.prefix": f"qtd{PID % 1000}v",
            "vm.network.bridge": BRIDGE,
            "vm.lxc.bridge.address": f"{SUBNET}.1/24",
        })
        self.driver = LXCDriver(self.config, reactor)
        self.processes = []
        return self.driver.setUp()

    def scrub(self):
        for p in self.processes:
            if p.poll() is None:
                p.kill()
                p.wait(5)
        subprocess.run(["ip", "link", "delete", BRIDGE], stderr=subprocess.DEVNULL)
        for point in mounts_below(open("/proc/self/mounts").read(), self.root):
            subprocess.run(["umount", "-l", point])
        subprocess.run(["rm", "-rf", "--one-file-system", self.root])

    def popen(self, argv, name, env):
        out = open(os.path.join(self.root, f"{name}.log"), "ab")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env=env)
        out.close()
        self.processes.append(p)
        return p

    def colour_fraction(self, display):
        return colour_fraction(display, COLOUR)

    @defer.inlineCallbacks
    def until(self, what, check, seconds):
        deadline = time.monotonic() + seconds
        value = None
        while time.monotonic() < deadline:
            value = yield defer.maybeDeferred(check)
            if value:
                return value
            yield _sleep(0.2)
        self.fail(f"{what} not reached in {seconds} s (last {value!r})" + self.logs())

    def logs(self):
        """
        The tails of the VMA's and nxagent's logs inside the container.
        """
        rootfs = os.path.join(self.root, "storage", "rootfs", "1-fs")
        text = ""
        for name in ("qvd-vma.log", "qvd-nxagent.log"):
            path = os.path.join(rootfs, "var", "log", "qvd", name)
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    text += f"\n--- {name} ---\n" + f.read()[-3000:]
        return text

    @defer.inlineCallbacks
    def test_session_draws_painted_root(self):
        """
        A container's VMA starts a session on x_start; a host nxproxy shows
        the minimal desktop's colour and its marker process runs in the
        container; x_stop ends the marker; cleanup leaves nothing.
        """
        from qvd.vmaclient import VMAClient
        spec = VMSpec(vm_id=1, name="desk1", login="alice", memory=256, di_id=1,
                      di_path=self.image, ip=f"{SUBNET}.10", mac="54:52:00:d7:00:0a",
                      netmask="255.255.255.0", bridge=BRIDGE, gateway=f"{SUBNET}.1")
        self.addCleanup(lambda: self.driver.cleanup(spec))
        yield self.driver.prepare(spec)
        t0 = time.monotonic()
        yield self.driver.start(spec)
        client = VMAClient(reactor, spec.ip, 3030, timeout=4.0)

        def pinged():
            return client.ping().addCallbacks(lambda _: True, lambda _: False)
        yield self.until("VMA ping", pinged, 60)
        t_vma = time.monotonic() - t0
        params = {"qvd.client.link": "lan", "qvd.client.geometry": "800x600",
                  "qvd.client.fullscreen": "0", "qvd.client.keyboard": "pc105/us"}
        t1 = time.monotonic()
        self.assertEqual((yield client.x_start(params)), "starting")
        yield self.until("x_state listening",
                         lambda: client.x_state().addCallback(lambda s: s == "listening"), 60)
        t_listening = time.monotonic() - t1

        xvfb = _free_display(420)
        self.popen(["Xvfb", f":{xvfb}", "-screen", "0", "1024x768x24", "-nolisten", "tcp"],
                   "xvfb", {"PATH": os.environ["PATH"]})
        yield self.until("Xvfb", lambda: os.path.exists(f"/tmp/.X11-unix/X{xvfb}"), 10)
        home = os.path.join(self.root, "proxy-home")
        os.makedirs(home)
        proxy_display = _free_display(620)
        self.popen(["nxproxy", "-S", f"nx/nx,connect={spec.ip},port=4100:{proxy_display}"],
                   "nxproxy", {"PATH": os.environ["PATH"], "HOME": home,
                               "DISPLAY": f":{xvfb}"})
        yield self.until("x_state connected",
                         lambda: client.x_state().addCallback(lambda s: s == "connected"), 30)
        yield self.until("painted root", lambda: self.colour_fraction(xvfb) > 0.05, 30)
        t_drawn = time.monotonic() - t1
        layout_name = self.driver.settings.container_name(1)

        def marker_running():
            result = subprocess.run(
                ["lxc-attach", "-n", layout_name, "-P", self.driver.settings.lxcpath,
                 "--", "pgrep", "-x", MARKER_NAME], capture_output=True, text=True)
            return result.returncode == 0
        yield self.until("marker process", marker_running, 10)
        _timing(f"start() to VMA ping {t_vma:.2f} s; x_start to listening "
                f"{t_listening:.2f} s, to painted root {t_drawn:.2f} s")

        self.assertEqual((yield client.x_stop()), "stopping")
        yield self.until("x_state stopped",
                         lambda: client.x_state().addCallback(lambda s: s == "stopped"), 30)
        yield self.until("marker gone", lambda: not marker_running(), 10)
        yield self.driver.cleanup(spec)
