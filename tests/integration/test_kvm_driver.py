"""
Integration tests of L{qvd.virt.kvm.KVMDriver} against the real libvirtd and
QEMU of this machine (TCG here: /dev/kvm is PVM), booting the cached minimal
desktop image (L{qvd.testing.kvm_image.minimal_kvm_image}: the real agent
answers on 3030) on a bridge of the test's own.

Each test creates (and removes) a bridge C{qbk<pid>} with its own /24, temp
directories for overlays, homes and console logs, and domains named
C{qvdtk<pid>-<n>}. Only one test waits for a full guest boot.
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
        from qvd.virt.kvm import overlay_path
        self.assertFalse(self.domainExists(spec.vm_id), "the domain is still defined")
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
