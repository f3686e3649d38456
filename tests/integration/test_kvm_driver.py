"""
Integration tests of L{qvd.virt.kvm.KVMDriver} against the real libvirtd and
QEMU of this machine (TCG here: /dev/kvm is PVM), booting the cached minimal
desktop image (L{qvd.testing.kvm_image.minimal_kvm_image}: the real agent
answers on 3030) on a bridge of the test's own.

Each test creates (and removes) a bridge C{qbk<pid>} with its own /24, temp
directories for overlays, homes and console logs, and domains named
C{qvdtk<pid>-<n>}. Two tests wait for a full guest boot: the life cycle
(L{KVMDriverTests.test_bootAnswersAndPowersOff}) and the agent's secret
(L{KVMAgentSecretTests}: one guest with the guest agent channel, commands run
inside it through L{qvd.testing.guest}).
"""

import os
import shutil
import subprocess
import tempfile

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial import unittest

from zope.interface.verify import verifyObject

from qvd.testing.virt_interface import HypervisorInterfaceTests
from qvd.virt.interfaces import IHypervisor, VMSpec

try:
    import libvirt
except ImportError:
    libvirt = None

from qvd.testing import kvm_image

PID = os.getpid() % 1000
BRIDGE = f"qbk{PID}"
SUBNET = f"10.252.{PID % 250}"
HERE = os.path.dirname(os.path.abspath(__file__))
SERVICES = os.path.join(HERE, "..", "..", "deploy", "services.sh")
BOOT_TIMEOUT = 120

_image = None
_skip = None


def _requirements():
    """
    Why these tests cannot run here (None if they can), and the image path.
    """
    global _image, _skip
    if _image or _skip:
        return _skip
    if os.geteuid() != 0:
        _skip = "needs root (libvirt qemu:///system, bridges)"
    elif libvirt is None:
        _skip = "libvirt-python is not installed"
    elif shutil.which("qemu-system-x86_64") is None or shutil.which("libvirtd") is None:
        _skip = "qemu-system-x86 or libvirt-daemon-system is not installed"
    else:
        subprocess.run([SERVICES], check=False)
        if not os.path.exists("/run/libvirt/libvirt-sock"):
            _skip = "libvirtd does not run and deploy/services.sh could not start it"
        else:
            try:
                _image = kvm_image.minimal_kvm_image()
            except kvm_image.ImageUnavailable as e:
                _skip = f"no KVM test image: {e}"
    return _skip


def _ip(*args):
    return subprocess.run(["ip", *args], capture_output=True, text=True)


def _waitForPort(host, port, timeout):
    """
    Fires with the seconds it took once C{host:port} accepts a TCP
    connection; fails after C{timeout} seconds.
    """
    start = reactor.seconds()

    @defer.inlineCallbacks
    def attempt():
        while True:
            try:
                proto = yield connectProtocol(TCP4ClientEndpoint(reactor, host, port, timeout=2), Protocol())
            except Exception:
                if reactor.seconds() - start > timeout:
                    raise AssertionError(f"{host}:{port} did not answer within {timeout} s")
                yield task.deferLater(reactor, 0.5, lambda: None)
            else:
                proto.transport.loseConnection()
                return reactor.seconds() - start
    return attempt()


def _within(d, seconds, what):
    """
    C{d}, failing if it has not fired after C{seconds}.
    """
    timeout = reactor.callLater(seconds, d.cancel)

    def done(result):
        if timeout.active():
            timeout.cancel()
        return result

    def cancelled(f):
        f.trap(defer.CancelledError)
        raise AssertionError(f"{what} did not happen within {seconds} s")

    return d.addBoth(done).addErrback(cancelled)


def _environment(test):
    """
    Skip C{test} unless KVM desktops can run here; else give it a bridge of
    its own (removed afterwards), C{test.base} (a temp dir), C{test.settings}
    and C{test.makeDriver}.
    """
    why = _requirements()
    if why:
        raise unittest.SkipTest(why)
    from qvd.virt.kvm import KVMDriver, KVMSettings
    test.base = tempfile.mkdtemp(prefix="qvd-kvm-test-")
    os.chmod(test.base, 0o755)
    test.addCleanup(shutil.rmtree, test.base, True)
    test.settings = KVMSettings(
        overlays=os.path.join(test.base, "overlays"),
        homes=os.path.join(test.base, "homes"),
        console_dir=os.path.join(test.base, "console"),
        secret_dir=os.path.join(test.base, "secrets"),
        accel="auto", prefix=f"qvdtk{PID}-", tap_prefix=f"qtk{PID}t", threads=3)
    test.makeDriver = lambda: KVMDriver(reactor, test.settings)
    # the bridge, with the host on .1 and VMs above
    _ip("link", "del", BRIDGE)
    for args in (("link", "add", BRIDGE, "type", "bridge"),
                 ("addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE),
                 ("link", "set", BRIDGE, "up")):
        result = _ip(*args)
        if result.returncode != 0:
            raise AssertionError(f"ip {' '.join(args)}: {result.stderr}")
    test.addCleanup(_ip, "link", "del", BRIDGE)


def _spec(vm_id, **kw):
    return VMSpec(vm_id=vm_id, name=f"test-{vm_id}", login="ana", memory=384, di_id=1,
                  di_path=_image, ip=f"{SUBNET}.{10 + vm_id % 200}",
                  mac=f"54:52:00:fc:{PID % 250:02x}:{vm_id % 256:02x}",
                  netmask="255.255.255.0", bridge=BRIDGE, gateway=f"{SUBNET}.1", **kw)


class AccelProbeTests(unittest.TestCase):
    """
    The auto acceleration probe with a real kernel.
    """

    def test_probeCommandBootsKernel(self):
        """
        The probe command boots the DI's kernel to its panic and QEMU exits:
        run under TCG here (KVM cannot run it on this machine), it succeeds,
        so on a real KVM host only KVM itself can make it fail.
        """
        why = _requirements()
        if why:
            raise unittest.SkipTest(why)
        from qvd.virt import _accel
        argv = _accel.probe_argv(_image + ".kernel", accel="tcg")
        self.assertEqual(_accel.run_probe(argv, 60), (True, ""))


class KVMInterfaceTests(HypervisorInterfaceTests, unittest.TestCase):
    """
    The behaviour every driver shows (qvd.testing.virt_interface), on KVM.
    """
    timeout = 120

    def setUp(self):
        _environment(self)

    @defer.inlineCallbacks
    def makeHypervisor(self):
        driver = self.makeDriver()
        self.addCleanup(driver.tearDown)
        yield driver.setUp()
        return driver

    def makeSpec(self, vm_id):
        return _spec(vm_id)


class KVMDriverTests(unittest.TestCase):
    timeout = 300

    def setUp(self):
        _environment(self)
        self.driver = self.makeDriver()
        self.addCleanup(self.driver.tearDown)
        self.specs = []
        self.addCleanup(self.killAll)
        return self.driver.setUp()

    @defer.inlineCallbacks
    def killAll(self):
        for spec in self.specs:
            try:
                yield self.driver.cleanup(spec)
            except Exception:
                pass

    def spec(self, vm_id, **kw):
        spec = _spec(vm_id, **kw)
        self.specs.append(spec)
        return spec

    def domainExists(self, vm_id):
        conn = libvirt.open(self.settings.uri)
        try:
            conn.lookupByName(f"{self.settings.prefix}{vm_id}")
            return True
        except libvirt.libvirtError:
            return False
        finally:
            conn.close()

    def assertNothingLeft(self, spec):
        from qvd.virt.kvm import overlay_path, secret_path
        self.assertFalse(self.domainExists(spec.vm_id), "the domain is still defined")
        self.assertFalse(os.path.exists(secret_path(self.settings, spec.vm_id)),
                         "the secret file is left")
        self.assertFalse(os.path.exists(overlay_path(self.settings, spec)), "the overlay is left")
        self.assertFalse(os.path.exists(f"/sys/class/net/{self.settings.tap_prefix}{spec.vm_id}"),
                         "the tap is left")

    def test_interface(self):
        """
        The driver provides IHypervisor and is named kvm.
        """
        self.assertTrue(verifyObject(IHypervisor, self.driver))
        self.assertEqual(self.driver.name, "kvm")
        self.assertEqual(self.driver.domainType, "qemu")

    @defer.inlineCallbacks
    def test_bootAnswersAndPowersOff(self):
        """
        A started VM boots from its overlay, configures its static address
        from the kernel command line and answers on port 3030; it is listed
        as running; a shutdown makes the guest power off, which fires
        watch() from libvirt's lifecycle event; cleanup then leaves no
        domain, overlay or tap, and the home disk stays.
        """
        from qvd.virt.kvm import home_path, overlay_path
        spec = self.spec(1, user_storage_size=64)
        yield self.driver.prepare(spec)
        self.assertTrue(os.path.exists(overlay_path(self.settings, spec)))
        running = yield self.driver.start(spec)
        self.assertEqual(running.vm_id, 1)
        self.assertIsInstance(running.pid, int)
        took = yield _waitForPort(spec.ip, kvm_image.READY_PORT, BOOT_TIMEOUT)
        print(f"\nKVM (TCG) boot to port {kvm_image.READY_PORT}: {took:.1f} s")
        self.assertTrue((yield self.driver.isRunning(1)))
        self.assertIn(1, [r.vm_id for r in (yield self.driver.listRunning())])
        stopped = self.driver.watch(1)
        self.assertFalse(stopped.called)
        yield self.driver.shutdown(1)
        yield _within(stopped, 60, "the stopped event after an ACPI power-off")
        self.assertFalse((yield self.driver.isRunning(1)))
        yield self.driver.cleanup(spec)
        self.assertNothingLeft(spec)
        self.assertTrue(os.path.exists(home_path(self.settings, 1)))

    @defer.inlineCallbacks
    def test_killAdoptAndHomeSurvives(self):
        """
        A second driver (an HKD restarted) finds the running domain with
        listRunning and its watch() fires when the domain is destroyed; the
        home disk keeps its data across stop and prepare, while a
        non-persistent overlay is made anew.
        """
        from qvd.virt.kvm import home_path, overlay_path
        spec = self.spec(2, user_storage_size=32)
        yield self.driver.prepare(spec)
        home = home_path(self.settings, 2)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 4k", home],
                       check=True, capture_output=True)
        yield self.driver.start(spec)
        other = self.makeDriver()
        yield other.setUp()
        self.addCleanup(other.tearDown)
        self.assertIn(2, [r.vm_id for r in (yield other.listRunning())])
        stopped = other.watch(2)
        yield self.driver.kill(2)
        yield _within(stopped, 30, "the stopped event after a destroy")
        yield self.driver.cleanup(spec)
        self.assertNothingLeft(spec)
        yield self.driver.prepare(spec)
        check = subprocess.run(["qemu-io", "-f", "qcow2", "-c", "read -P 0x5a 0 4k", home],
                               capture_output=True, text=True)
        self.assertNotIn("Pattern verification failed", check.stdout)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        self.assertTrue(os.path.exists(overlay_path(self.settings, spec)))
        yield self.driver.cleanup(spec)
        self.assertNothingLeft(spec)

    @defer.inlineCallbacks
    def test_watchNotRunning(self):
        """
        watch() of a VM that does not run fires at once; kill, shutdown and
        cleanup of a VM that never started do nothing and succeed.
        """
        yield _within(self.driver.watch(3), 10, "watch of a stopped VM")
        yield self.driver.kill(3)
        yield self.driver.shutdown(3)
        yield self.driver.cleanup(self.spec(3))
        self.assertEqual([r for r in (yield self.driver.listRunning()) if r.vm_id == 3], [])

    @defer.inlineCallbacks
    def test_persistentOverlay(self):
        """
        A persistent overlay survives cleanup and the next prepare; a
        non-persistent one is removed.
        """
        from qvd.virt.kvm import overlay_path
        spec = self.spec(4, persistent_overlay=True)
        yield self.driver.prepare(spec)
        overlay = overlay_path(self.settings, spec)
        inode = os.stat(overlay).st_ino
        yield self.driver.cleanup(spec)
        yield self.driver.prepare(spec)
        self.assertEqual(os.stat(overlay).st_ino, inode)
        os.unlink(overlay)

    @defer.inlineCallbacks
    def test_missingImage(self):
        """
        prepare of a DI file that does not exist fails with a VirtError
        naming the file, and leaves nothing behind.
        """
        from qvd.virt.interfaces import VirtError
        from qvd.virt.kvm import overlay_path
        spec = self.spec(5)
        import attrs
        spec = attrs.evolve(spec, di_path=os.path.join(self.base, "nope.qcow2"))
        e = yield self.assertFailure(self.driver.prepare(spec), VirtError)
        self.assertIn("nope.qcow2", str(e))
        self.assertFalse(os.path.exists(overlay_path(self.settings, spec)))

    @defer.inlineCallbacks
    def test_kernelExtractedFromImage(self):
        """
        A DI registered without its .kernel and .initrd (qvd-admin copies
        only the image) gets them copied out of the image by prepare, once,
        and its domain XML boots those copies.
        """
        images = os.path.join(self.base, "images")
        os.makedirs(images)
        di = os.path.join(images, "9-desktop.qcow2")
        os.link(_image, di)
        import attrs
        spec = attrs.evolve(self.spec(6), di_id=9, di_path=di)
        yield self.driver.prepare(spec)
        kernel, initrd = self.driver._bootCache(spec)
        for extracted, original in ((kernel, _image + ".kernel"), (initrd, _image + ".initrd")):
            with open(extracted, "rb") as a, open(original, "rb") as b:
                self.assertTrue(a.read() == b.read(), f"{extracted} differs from {original}")
        self.assertIn(f"<kernel>{kernel}</kernel>", self.driver.xmlFor(spec, "qemu"))
        yield self.driver.cleanup(spec)


CALL = """
import sys, urllib.request, urllib.error
url, secret = sys.argv[1], sys.argv[2]
request = urllib.request.Request(url, headers={"X-QVD-VMA-Secret": secret} if secret else {})
try:
    with urllib.request.urlopen(request, timeout=10) as r:
        print(r.status, r.read().decode().strip())
except urllib.error.HTTPError as e:
    print(e.code)
except OSError as e:
    print(type(e).__name__)
"""

READ = """
import os, stat, sys
for path in sys.argv[1:]:
    try:
        st = os.stat(path)
        mode = "%o %d:%d" % (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    except OSError as e:
        mode = type(e).__name__
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError as e:
        text = type(e).__name__
    print(path, mode, text)
"""


def _call(url, secret=""):
    """
    One SimpleRPC call from the host with urllib (in a thread): "200 <body>",
    or the HTTP status of a refusal.
    """
    import urllib.error
    import urllib.request

    def call():
        request = urllib.request.Request(url, headers={"X-QVD-VMA-Secret": secret} if secret else {})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return f"{r.status} {r.read().decode().strip()}"
        except urllib.error.HTTPError as e:
            return str(e.code)
    from twisted.internet import threads
    return threads.deferToThread(call)


class KVMAgentSecretTests(unittest.TestCase):
    """
    The agent's secret in a real KVM guest (the minimal desktop image, the
    real VMA): handed over through fw_cfg, required by the agent, readable by
    the guest's root only. One guest for all of it (TCG boots are slow).
    """
    timeout = 400
    SECRET = "kvm-agent-secret-" + "x" * 26

    def setUp(self):
        _environment(self)
        import attrs
        self.settings = attrs.evolve(self.settings, guest_agent=True)
        self.driver = self.makeDriver()
        self.addCleanup(self.driver.tearDown)
        return self.driver.setUp()

    def inGuest(self, guest, user, code, *args):
        from twisted.internet import threads
        return threads.deferToThread(
            guest.run_as, user, ["/usr/bin/python3", "-c", code, *args], 60)

    @defer.inlineCallbacks
    def test_secretForTheNodeAndTheGuestRootOnly(self):
        """
        A guest started with a secret: QEMU reads it from a file of mode
        0600 owned by QEMU's user (not from its command line); the agent
        answers a call without it or with another 403 and one with it 200;
        in the guest the fw_cfg file is mode 0400 root and holds the secret,
        which the guest's root reads and the desktop user (uid 1000, made by
        the agent's x_start) cannot; the agent's call from inside the guest
        without the secret is refused as well. Cleanup leaves no file.
        """
        from twisted.internet import threads

        from qvd.protocols.simplerpc import FW_CFG_SECRET_RAW
        from qvd.testing.guest import GuestAgent
        from qvd.vmaclient import VMAClient
        from qvd.virt.kvm import secret_path
        spec = _spec(7, vma_secret=self.SECRET)
        self.addCleanup(self.driver.cleanup, spec)
        yield self.driver.prepare(spec)
        t0 = reactor.seconds()
        running = yield self.driver.start(spec)

        # the host side: a private file, the secret not on QEMU's command line
        path = secret_path(self.settings, 7)
        st = os.stat(path)
        self.assertEqual(oct(st.st_mode & 0o7777), oct(0o600))
        qemu = _owner_of(running.pid)
        self.assertEqual((st.st_uid, st.st_gid), qemu, "the file is not QEMU's")
        with open(f"/proc/{running.pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode()
        self.assertIn(f"name=opt/org.qvd/vma.secret,file={path}", cmdline)
        self.assertNotIn(self.SECRET, cmdline)

        took = yield _waitForPort(spec.ip, 3030, BOOT_TIMEOUT)
        print(f"\nKVM (TCG) boot to the agent's port: {took:.1f} s")
        url = f"http://{spec.ip}:3030/vma/ping"
        self.assertEqual((yield _call(url)), "403")
        self.assertEqual((yield _call(url, "wrong-" + self.SECRET)), "403")
        self.assertEqual((yield _call(url, self.SECRET)), "200 null")

        # inside: x_start makes the desktop user, as for a login
        client = VMAClient(reactor, spec.ip, 3030, timeout=20, secret=self.SECRET)
        self.assertEqual((yield client.x_start({"qvd.vm.user.name": "alice"})), "starting")
        guest = GuestAgent(self.settings.uri, f"{self.settings.prefix}7")
        ready = yield threads.deferToThread(guest.wait_ready, 120)
        print(f"guest agent answering {ready:.1f} s later; "
              f"{reactor.seconds() - t0:.1f} s after the start")
        deadline = reactor.seconds() + 60
        while True:
            done = yield threads.deferToThread(guest.run, ["/usr/bin/id", "-u", "alice"])
            if done.returncode == 0:
                break
            self.assertLess(reactor.seconds(), deadline, f"no user alice: {done.stderr}")
            yield task.deferLater(reactor, 1, lambda: None)
        self.assertEqual(done.stdout.strip(), "1000")

        files = [FW_CFG_SECRET_RAW, "/etc/qvd/vma.secret"]
        as_root = yield self.inGuest(guest, "root", READ, *files)
        as_user = yield self.inGuest(guest, "alice", READ, *files)
        print(f"as root:\n{as_root.stdout}as alice:\n{as_user.stdout}", end="")
        root_lines = as_root.stdout.splitlines()
        self.assertEqual(root_lines[0], f"{FW_CFG_SECRET_RAW} 400 0:0 {self.SECRET}")
        self.assertEqual(root_lines[1], "/etc/qvd/vma.secret FileNotFoundError FileNotFoundError")
        user_lines = as_user.stdout.splitlines()
        self.assertEqual(user_lines[0], f"{FW_CFG_SECRET_RAW} 400 0:0 PermissionError")
        self.assertNotIn(self.SECRET, as_user.stdout + as_user.stderr)
        local = yield self.inGuest(guest, "alice", CALL, "http://127.0.0.1:3030/vma/ping", "")
        self.assertEqual(local.stdout.strip(), "403")

        yield self.driver.cleanup(spec)
        self.assertFalse(os.path.exists(path))
        self.assertEqual(os.listdir(self.settings.secret_dir), [])


def _owner_of(pid):
    """The (uid, gid) process C{pid} runs as."""
    st = os.stat(f"/proc/{pid}")
    return st.st_uid, st.st_gid
