"""
Unit tests of L{qvd.virt.kvm.KVMDriver} with a fake libvirt connection and a
synchronous thread pool (no libvirtd, no QEMU).
"""

import os
import shutil
import subprocess

import libvirt
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from qvd.virt._accel import HostFacts
from qvd.virt.interfaces import RunningVM, VirtError, VMSpec
from qvd.virt.kvm import (
    KVMDriver, KVMSettings, home_path, image_format, overlay_path, secret_path,
)

CAPABILITIES = """<capabilities><host><secmodel><model>dac</model><doi>0</doi>
<baselabel type='qemu'>+%d:+%d</baselabel></secmodel></host></capabilities>"""


class SyncPool:
    """
    A thread pool that runs each call at once, in the calling thread.
    """
    started = True

    def callInThreadWithCallback(self, onResult, f, *args, **kw):
        try:
            result = f(*args, **kw)
        except BaseException as e:
            from twisted.python.failure import Failure
            onResult(False, Failure(e))
        else:
            onResult(True, result)


class Reactor(MemoryReactorClock):
    """
    A memory reactor whose callFromThread runs the call at once.
    """

    def callFromThread(self, f, *args, **kw):
        f(*args, **kw)


class FakeDomain:
    def __init__(self, name, active=True, persistent=False):
        self._name, self.active, self.persistent = name, active, persistent
        self.calls = []

    def name(self):
        return self._name

    def isActive(self):
        return self.active

    def isPersistent(self):
        return self.persistent

    def destroy(self):
        self.calls.append("destroy")
        self.active = False

    def shutdownFlags(self, flags):
        self.calls.append(("shutdown", flags))

    def undefineFlags(self, flags):
        self.calls.append("undefine")
        self.persistent = False


class NoDomain(libvirt.libvirtError):
    def __init__(self):
        Exception.__init__(self, "no domain")

    def get_error_code(self):
        return libvirt.VIR_ERR_NO_DOMAIN

    def get_error_message(self):
        return "Domain not found"


class Refused(libvirt.libvirtError):
    def __init__(self):
        Exception.__init__(self, "refused")

    def get_error_code(self):
        return libvirt.VIR_ERR_INTERNAL_ERROR

    def get_error_message(self):
        return "internal error: qemu unexpectedly closed the monitor"


class FakeConn:
    def __init__(self):
        self.domains = {}
        self.created = []
        self.secrets = []       # (mode, uid, gid, text) of the secret file at each create
        self.refuse = False
        # the caller's own ids: the tests need not be root to chown to them
        self.capabilities = CAPABILITIES % (os.getuid(), os.getgid())

    def getCapabilities(self):
        return self.capabilities

    def lookupByName(self, name):
        if name not in self.domains:
            raise NoDomain()
        return self.domains[name]

    def listAllDomains(self, flags):
        return [d for d in self.domains.values() if d.active]

    def createXML(self, xml, flags):
        self.created.append(xml)
        if "opt/org.qvd/vma.secret" in xml:
            path = xml.split("name=\"opt/org.qvd/vma.secret\" file=\"")[1].split("\"")[0]
            st = os.stat(path)
            with open(path) as f:
                self.secrets.append((st.st_mode & 0o7777, st.st_uid, st.st_gid, f.read()))
        if self.refuse:
            raise Refused()
        name = xml.split("<name>")[1].split("</name>")[0]
        self.domains[name] = FakeDomain(name)
        return self.domains[name]


class DriverTests(unittest.TestCase):

    def setUp(self):
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.settings = KVMSettings(
            overlays=os.path.join(self.tmp, "ov"), homes=os.path.join(self.tmp, "homes"),
            console_dir=os.path.join(self.tmp, "log"), secret_dir=os.path.join(self.tmp, "run"),
            prefix="qvd-", uri="test:///fake")
        self.reactor = Reactor()
        self.driver = KVMDriver(self.reactor, self.settings, threadpool=SyncPool(),
                                hostFacts=HostFacts(dev_kvm=True, pvm=True, cpu_virt=False))
        self.conn = FakeConn()
        self.driver._conn = self.conn
        self.driver.domainType = "qemu"
        self.image = os.path.join(self.tmp, "7-deb.qcow2")
        for path in (self.image + ".kernel", self.image + ".initrd"):
            open(path, "w").close()

    def spec(self, vm_id=5, **kw):
        return VMSpec(vm_id=vm_id, name="x", login="ana", memory=256, di_id=7, di_path=self.image,
                      ip="10.0.0.5", mac="54:52:00:00:00:05", netmask="255.255.0.0",
                      bridge="qvdnet", **kw)

    def makeImage(self):
        if shutil.which("qemu-img") is None:
            raise unittest.SkipTest("qemu-img is not installed")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", self.image, "16M"], check=True)

    def test_watchFiresOnStoppedEvent(self):
        """
        watch() of a running VM fires when libvirt's stopped event for its
        domain arrives, not before, and not for another domain's event.
        """
        self.conn.domains["qvd-5"] = FakeDomain("qvd-5")
        d = self.driver.watch(5)
        self.assertFalse(d.called)
        self.driver._domainEvent("qvd-6", libvirt.VIR_DOMAIN_EVENT_STOPPED, 0)
        self.driver._domainEvent("other-5", libvirt.VIR_DOMAIN_EVENT_STOPPED, 0)
        self.driver._domainEvent("qvd-5", libvirt.VIR_DOMAIN_EVENT_STARTED, 0)
        self.assertFalse(d.called)
        self.driver._domainEvent("qvd-5", libvirt.VIR_DOMAIN_EVENT_STOPPED, 0)
        self.assertIsNone(self.successResultOf(d))

    def test_watchNotRunning(self):
        """
        watch() of a VM without a running domain fires at once.
        """
        self.assertIsNone(self.successResultOf(self.driver.watch(5)))

    def test_watchCancel(self):
        """
        A cancelled watch is forgotten.
        """
        self.conn.domains["qvd-5"] = FakeDomain("qvd-5")
        d = self.driver.watch(5)
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.driver._watchers, {})

    def test_eventFromThread(self):
        """
        The libvirt event thread's callback goes to the reactor with callFromThread.
        """
        calls = []
        self.reactor.callFromThread = lambda f, *a: calls.append((f, a))
        self.driver._onLifecycle(None, FakeDomain("qvd-5"), libvirt.VIR_DOMAIN_EVENT_STOPPED, 0, None)
        self.assertEqual(calls, [(self.driver._domainEvent, ("qvd-5", libvirt.VIR_DOMAIN_EVENT_STOPPED, 0))])

    def test_prepareCreatesOverlayAndHome(self):
        """
        prepare makes a qcow2 overlay backed by the DI (format given) and a
        home disk of user_storage_size MB.
        """
        self.makeImage()
        spec = self.spec(user_storage_size=10)
        self.successResultOf(self.driver.prepare(spec))
        info = subprocess.run(["qemu-img", "info", overlay_path(self.settings, spec)],
                              capture_output=True, text=True).stdout
        self.assertIn(f"backing file: {self.image}", info)
        self.assertIn("backing file format: qcow2", info)
        info = subprocess.run(["qemu-img", "info", home_path(self.settings, 5)],
                              capture_output=True, text=True).stdout
        self.assertIn("virtual size: 10 MiB", info)

    def test_prepareRecreatesOverlay(self):
        """
        A non-persistent overlay left from an earlier boot is replaced.
        """
        self.makeImage()
        spec = self.spec()
        overlay = overlay_path(self.settings, spec)
        os.makedirs(os.path.dirname(overlay))
        with open(overlay, "w") as f:
            f.write("old")
        self.successResultOf(self.driver.prepare(spec))
        with open(overlay, "rb") as f:
            self.assertEqual(f.read(4), b"QFI\xfb")

    def test_prepareWithoutKernel(self):
        """
        A DI without its .kernel beside it is refused with a message saying
        how to build one.
        """
        self.makeImage()
        os.unlink(self.image + ".kernel")
        f = self.failureResultOf(self.driver.prepare(self.spec()), VirtError)
        self.assertIn("qvd-di build --format qcow2", f.getErrorMessage())

    def test_startCreatesTransientDomain(self):
        """
        start creates a domain from the VM's XML and reports it running.
        """
        self.makeImage()
        spec = self.spec()
        self.successResultOf(self.driver.prepare(spec))
        running = self.successResultOf(self.driver.start(spec))
        self.assertEqual(running, RunningVM(5, None))
        self.assertIn("<name>qvd-5</name>", self.conn.created[0])
        self.assertIn('<domain type="qemu">', self.conn.created[0])

    def test_startHandsOverSecret(self):
        """
        start with a secret writes it to the VM's secret file, mode 0600,
        owned by the user libvirt runs QEMU as (its DAC base label), before
        the domain is created; the XML names that file and never holds the
        secret itself (so neither does QEMU's command line); cleanup removes
        the file.
        """
        self.makeImage()
        spec = self.spec(vma_secret="s3cret-value")
        self.successResultOf(self.driver.prepare(spec))
        self.successResultOf(self.driver.start(spec))
        self.assertEqual(self.conn.secrets, [(0o600, os.getuid(), os.getgid(), "s3cret-value")])
        path = secret_path(self.settings, 5)
        self.assertEqual(path, os.path.join(self.tmp, "run", "qvd-5.vma-secret"))
        self.assertIn(f'file="{path}"', self.conn.created[0])
        self.assertNotIn("s3cret-value", self.conn.created[0])
        self.assertEqual(os.stat(os.path.dirname(path)).st_mode & 0o777, 0o711)
        self.successResultOf(self.driver.cleanup(spec))
        self.assertFalse(os.path.exists(path))
        self.assertEqual(os.listdir(os.path.dirname(path)), [])

    def test_startWithoutSecret(self):
        """
        A VM started without a secret gets no fw_cfg entry and no file.
        """
        self.makeImage()
        spec = self.spec()
        self.successResultOf(self.driver.prepare(spec))
        self.successResultOf(self.driver.start(spec))
        self.assertNotIn("fwcfg", self.conn.created[0])
        self.assertFalse(os.path.exists(secret_path(self.settings, 5)))

    def test_refusedStartLeavesNoSecret(self):
        """
        When libvirt refuses the domain the secret file is removed at once
        and the VirtError says what libvirt said.
        """
        self.makeImage()
        spec = self.spec(vma_secret="s3cret-value")
        self.successResultOf(self.driver.prepare(spec))
        self.conn.refuse = True
        f = self.failureResultOf(self.driver.start(spec), VirtError)
        self.assertIn("qemu unexpectedly closed the monitor", f.getErrorMessage())
        self.assertEqual(len(self.conn.secrets), 1)
        self.assertEqual(os.listdir(os.path.join(self.tmp, "run")), [])

    def test_secretOwnerAskedOnce(self):
        """
        libvirt's capabilities are read once per domain type, not per start.
        """
        self.makeImage()
        asked = []
        caps = self.conn.getCapabilities
        self.conn.getCapabilities = lambda: asked.append(1) or caps()
        for vm_id in (5, 6):
            spec = self.spec(vm_id, vma_secret="x")
            self.successResultOf(self.driver.prepare(spec))
            self.successResultOf(self.driver.start(spec))
        self.assertEqual(asked, [1])

    def test_shutdownKillCleanup(self):
        """
        shutdown presses the ACPI power button, kill destroys, cleanup
        undefines a persistent leftover and removes the overlay.
        """
        self.makeImage()
        spec = self.spec()
        self.successResultOf(self.driver.prepare(spec))
        dom = self.conn.domains["qvd-5"] = FakeDomain("qvd-5", persistent=True)
        self.successResultOf(self.driver.shutdown(5))
        self.assertEqual(dom.calls, [("shutdown", libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)])
        self.successResultOf(self.driver.kill(5))
        self.assertFalse(dom.active)
        self.successResultOf(self.driver.cleanup(spec))
        self.assertIn("undefine", dom.calls)
        self.assertFalse(os.path.exists(overlay_path(self.settings, spec)))

    def test_listRunning(self):
        """
        listRunning reports the running domains with our prefix only.
        """
        self.conn.domains = {n: FakeDomain(n) for n in ("qvd-3", "qvd-12", "vm-4", "qvd-x")}
        self.conn.domains["qvd-7"] = FakeDomain("qvd-7", active=False)
        self.assertEqual(self.successResultOf(self.driver.listRunning()),
                         [RunningVM(3), RunningVM(12)])

    def test_notConnected(self):
        """
        Without a libvirt connection calls fail with a VirtError saying how
        to start libvirtd.
        """
        self.driver._conn = None
        f = self.failureResultOf(self.driver.isRunning(5), VirtError)
        self.assertIn("deploy/services.sh", f.getErrorMessage())

    def test_imageFormat(self):
        """
        .img and .raw DIs are raw, anything else qcow2.
        """
        self.assertEqual(image_format("/i/1-a.img"), "raw")
        self.assertEqual(image_format("/i/1-a.raw"), "raw")
        self.assertEqual(image_format("/i/1-a.qcow2"), "qcow2")

    def test_cleanupUnknownDI(self):
        """
        cleanup of a VM whose DI the HKD no longer knows (di_id 0) removes
        any overlay of that VM, and only of that VM.
        """
        os.makedirs(self.settings.overlays)
        names = ["7-5-overlay.qcow2", "8-5-overlay.qcow2", "7-15-overlay.qcow2", "x-5-overlay.qcow2"]
        for name in names:
            open(os.path.join(self.settings.overlays, name), "w").close()
        import attrs
        self.successResultOf(self.driver.cleanup(attrs.evolve(self.spec(), di_id=0, di_path="")))
        self.assertEqual(sorted(os.listdir(self.settings.overlays)),
                         ["7-15-overlay.qcow2", "x-5-overlay.qcow2"])

    def test_makeHypervisor(self):
        """
        The HKD's loader gets a KVM driver configured from the vm.kvm keys.
        """
        from qvd.config import Config
        from qvd.virt.kvm import makeHypervisor
        config = Config.load(path=os.devnull, overrides={"vm.kvm.domain.prefix": "t-", "vm.kvm.cpus": "2"})
        driver = makeHypervisor(config, self.reactor)
        self.assertEqual(driver.name, "kvm")
        self.assertEqual(driver.settings.prefix, "t-")
        self.assertEqual(driver.settings.cpus, 2)
        self.assertEqual(driver.settings.uri, "qemu:///system")
        self.assertTrue(driver.settings.overlays.endswith("/overlays"))

    def test_bridgeAddress(self):
        """
        The node's bridge address is vm.kvm.bridge.address, else the first
        host of the VM network; a wrong value is named in the error.
        """
        import attrs
        self.assertEqual(self.settings.nodeBridgeAddress(), "10.0.0.1/16")
        self.assertEqual(attrs.evolve(self.settings, bridge_address="10.9.0.254/24").nodeBridgeAddress(),
                         "10.9.0.254/24")
        e = self.assertRaises(VirtError, attrs.evolve(self.settings, bridge_address="nope").nodeBridgeAddress)
        self.assertIn("vm.kvm.bridge.address 'nope'", str(e))

    def test_reconnectAfterLibvirtdRestart(self):
        """
        When libvirt closes the connection (libvirtd restarted) the driver
        reconnects after reconnectDelay seconds, and a watch whose VM
        stopped meanwhile (no event could arrive) fires.
        """
        self.conn.domains["qvd-5"] = FakeDomain("qvd-5")
        watched = self.driver.watch(5)
        old = self.conn
        self.driver._connectionClosed(old, 0)
        self.assertIsNone(self.driver._conn)
        new = FakeConn()  # the VM stopped while libvirtd was away
        self.driver._connectSync = lambda: (new, [1])
        self.reactor.advance(self.driver.reconnectDelay - 0.1)
        self.assertIsNone(self.driver._conn)
        self.reactor.advance(0.1)
        self.assertIs(self.driver._conn, new)
        self.assertIsNone(self.successResultOf(watched))

    def test_reconnectRetries(self):
        """
        A failed reconnection is tried again after reconnectDelay.
        """
        self.driver._connectionClosed(self.conn, 0)
        attempts = []

        def connect():
            attempts.append(1)
            if len(attempts) < 2:
                raise VirtError("cannot connect")
            return FakeConn(), []
        self.driver._connectSync = connect
        self.reactor.advance(self.driver.reconnectDelay)
        self.assertIsNone(self.driver._conn)
        self.reactor.advance(self.driver.reconnectDelay)
        self.assertIsNotNone(self.driver._conn)
        self.assertEqual(len(attempts), 2)
        self.flushLoggedErrors()
