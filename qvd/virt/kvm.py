"""
The KVM virt driver: desktops as libvirt/QEMU domains (C{vm.hypervisor = kvm}).

    driver = KVMDriver.fromConfig(reactor, config)
    yield driver.setUp()              # bridge, connect, warm libvirt up, pick the accel
    yield driver.prepare(spec)        # overlay over the DI, home disk
    running = yield driver.start(spec)
    stopped = driver.watch(spec.vm_id)   # fires on the domain's "stopped" event
    yield driver.shutdown(spec.vm_id)    # ACPI power button
    yield driver.kill(spec.vm_id)        # destroy
    yield driver.cleanup(spec)           # no domain, overlay, tap or secret file left
    yield driver.tearDown()              # close libvirt, stop the threads

Every blocking libvirt or C{qemu-img} call runs in the driver's own thread
pool (C{vm.kvm.threads}); lifecycle events come from libvirt's default event
loop, run in one daemon thread per process (L{_EventLoop}), and reach the
reactor through C{callFromThread}: L{KVMDriver.watch} never polls.

Each VM is a transient domain C{<vm.kvm.domain.prefix><vm_id>} created from
the XML of L{qvd.virt._domain.domain_xml}: the DI's kernel and initramfs
(C{<di>.kernel}, C{<di>.initrd}, written by L{qvd.di.qcow2}; when a DI was registered without
them, L{KVMDriver.prepare} copies them out of the image once into
C{path.storage.overlays/boot/}) are booted directly, the root disk is a qcow2 overlay
C{path.storage.overlays/<di_id>-<vm_id>-overlay.qcow2} over the DI (new at
each boot unless C{spec.persistent_overlay}), the home disk is
C{path.storage.homes/<vm_id>-data.qcow2} (created once, never removed here),
and the guest gets its static address on the kernel command line.

The agent's secret (C{spec.vma_secret}) goes to the guest through QEMU's
fw_cfg: L{KVMDriver.start} writes it to L{secret_path} (mode 0600, owned
by the user libvirt runs QEMU as, so the secret is never on QEMU's command
line) and L{KVMDriver.cleanup} removes that file; inside, the guest's root
reads it (L{qvd.protocols.simplerpc.FW_CFG_SECRET_RAW}), its users cannot.
"""

import contextlib
import fcntl
import ipaddress
import os
import subprocess
import threading

import attrs
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from qvd.logs import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from qvd import bootfiles
from qvd.bootfiles import kernel_files
from qvd.virt import _accel
from qvd.virt._dirs import make_dirs
from qvd.virt._domain import (
    BootFiles, DomainDisks, DomainSettings, dac_owner, domain_name, domain_xml, tap_name,
    vm_id_of,
)
from qvd.virt.interfaces import IHypervisor, RunningVM, VirtError

try:
    import libvirt
except ImportError:  # pragma: no cover - reported by setUp
    libvirt = None

log = Logger(namespace="qvd.virt.kvm")

RAW_SUFFIXES = (".img", ".raw")


@attrs.frozen
class KVMSettings:
    """
    The driver's configuration (the C{vm.kvm.*} keys and storage paths).
    """
    overlays: str
    homes: str
    console_dir: str
    secret_dir: str = "/run/qvd/kvm"
    uri: str = "qemu:///system"
    accel: str = "auto"
    probe_timeout: float = 10.0
    cpus: int = 1
    machine: str = "pc"
    emulator: str = ""
    prefix: str = "qvd-"
    tap_prefix: str = "qvdtap"
    vnc: bool = False
    cmdline_extra: str = "quiet"
    guest_agent: bool = False
    threads: int = 4
    bridge: str = ""
    bridge_address: str = ""
    ip_start: str = "10.0.0.100"
    netmask: str = "255.255.0.0"

    @classmethod
    def fromConfig(cls, config):
        """
        Read the settings from a L{qvd.config.Config}.
        """
        return cls(
            overlays=config.get("path.storage.overlays"),
            homes=config.get("path.storage.homes"),
            console_dir=config.get("vm.kvm.console.dir"),
            secret_dir=config.get("vm.kvm.secret.dir"),
            uri=config.get("vm.kvm.uri"),
            accel=config.get("vm.kvm.accel"),
            probe_timeout=config.getfloat("vm.kvm.accel.probe_timeout"),
            cpus=config.getint("vm.kvm.cpus"),
            machine=config.get("vm.kvm.machine"),
            emulator=config.get("vm.kvm.emulator"),
            prefix=config.get("vm.kvm.domain.prefix"),
            tap_prefix=config.get("vm.kvm.tap.prefix"),
            vnc=config.getbool("vm.kvm.vnc"),
            cmdline_extra=config.get("vm.kvm.cmdline.extra"),
            guest_agent=config.getbool("vm.kvm.guest_agent"),
            threads=config.getint("vm.kvm.threads"),
            bridge=config.get("vm.network.bridge"),
            bridge_address=config.get("vm.kvm.bridge.address"),
            ip_start=config.get("vm.network.ip.start"),
            netmask=config.get("vm.network.netmask"))

    def nodeBridgeAddress(self):
        """
        The CIDR address the node puts on the bridge it creates.

        @raise VirtError: the configured address or network is not valid.
        """
        if self.bridge_address:
            try:
                return str(ipaddress.ip_interface(self.bridge_address))
            except ValueError:
                raise VirtError(f"vm.kvm.bridge.address {self.bridge_address!r} is not an "
                                f"address/prefix such as 10.0.0.1/16")
        try:
            network = ipaddress.ip_network(f"{self.ip_start}/{self.netmask}", strict=False)
        except ValueError:
            raise VirtError(f"vm.network.ip.start {self.ip_start!r} / vm.network.netmask "
                            f"{self.netmask!r} do not make a network; fix them or set "
                            f"vm.kvm.bridge.address")
        return f"{network.network_address + 1}/{network.prefixlen}"

    def domainSettings(self, domain_type):
        return DomainSettings(
            accel=domain_type, prefix=self.prefix, tap_prefix=self.tap_prefix,
            cpus=self.cpus, machine=self.machine, emulator=self.emulator,
            console_dir=self.console_dir, vnc=self.vnc, cmdline_extra=self.cmdline_extra,
            guest_agent=self.guest_agent)


def overlay_path(settings, spec):
    """
    The copy-on-write overlay of C{spec}'s VM over its DI.
    """
    return os.path.join(settings.overlays, f"{spec.di_id}-{spec.vm_id}-overlay.qcow2")


def home_path(settings, vm_id):
    """
    The persistent home disk of VM C{vm_id}.
    """
    return os.path.join(settings.homes, f"{int(vm_id)}-data.qcow2")


def secret_path(settings, vm_id):
    """
    The file QEMU reads VM C{vm_id}'s agent secret from (fw_cfg).
    """
    return os.path.join(settings.secret_dir, f"{domain_name(settings.prefix, vm_id)}.vma-secret")


def write_secret(path, text, owner=None):
    """
    Write the agent's secret to C{path}: mode 0600, owned by C{owner}
    (C{(uid, gid)}, or the caller when None), replaced atomically.
    """
    tmp = f"{path}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        if owner is not None:
            os.fchown(f.fileno(), *owner)
        f.write(text)
    os.replace(tmp, path)


def image_format(path):
    """
    The qemu format of the DI file C{path}: raw for C{.img}/C{.raw}, else qcow2.
    """
    return "raw" if path.endswith(RAW_SUFFIXES) else "qcow2"


class _EventLoop:
    """
    libvirt's default event loop, registered once per process and run in a
    daemon thread. Must be started before the first connection is opened.
    """
    _lock = threading.Lock()
    _thread = None

    @classmethod
    def ensureRunning(cls):
        with cls._lock:
            if cls._thread is not None:
                return
            libvirt.virEventRegisterDefaultImpl()
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

            def run():
                while True:
                    libvirt.virEventRunDefaultImpl()

            cls._thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
            cls._thread.start()


def _qemu_img(*args):
    result = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise VirtError(f"qemu-img {' '.join(args)} failed: {result.stderr.strip()}")


def _describe(e):
    return e.get_error_message() if hasattr(e, "get_error_message") else str(e)


@implementer(IHypervisor)
class KVMDriver:
    """
    Runs desktops as libvirt domains on this node.

    @ivar settings: the L{KVMSettings}.
    @ivar domainType: C{kvm} or C{qemu} once decided (L{setUp} or the first
        start, when the auto probe needs the DI's kernel).
    """
    name = "kvm"
    reconnectDelay = 2.0

    def __init__(self, reactor, settings, threadpool=None, hostFacts=None):
        self._reactor = reactor
        self.settings = settings
        self._ownPool = threadpool is None
        self._pool = threadpool or ThreadPool(minthreads=0, maxthreads=settings.threads, name="qvd-kvm")
        self._hostFacts = hostFacts
        self._conn = None
        self._callbackIds = []
        self._watchers = {}
        self._decision = None
        self._accelLock = defer.DeferredLock()
        self._reconnectCall = None
        self._stopped = False
        self._shutdownTrigger = None
        self._qemuOwner = {}
        self.domainType = None

    @classmethod
    def fromConfig(cls, reactor, config):
        return cls(reactor, KVMSettings.fromConfig(config))

    # -- plumbing ---------------------------------------------------------

    def _inThread(self, fn, *args):
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    def port_name(self, vm_id):
        """The VM's tap device: its port on the bridge."""
        return tap_name(self.settings.tap_prefix, vm_id)

    def _connected(self):
        conn = self._conn
        if conn is None:
            raise VirtError(
                f"not connected to libvirt at {self.settings.uri}: is libvirtd running? "
                f"(deploy/services.sh starts virtlogd and libvirtd)")
        return conn

    def _lookup(self, vm_id):
        """
        The domain of C{vm_id}, or None (in a pool thread).
        """
        try:
            return self._connected().lookupByName(domain_name(self.settings.prefix, vm_id))
        except libvirt.libvirtError as e:
            if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return None
            raise VirtError(f"libvirt lookup of VM {vm_id} failed: {_describe(e)}")

    def _pid(self, name):
        if not self.settings.uri.startswith("qemu:///system"):
            return None
        try:
            with open(f"/run/libvirt/qemu/{name}.pid") as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    # -- connection and events ----------------------------------------------

    def _connectSync(self):
        if libvirt is None:
            raise VirtError("the libvirt Python bindings are not installed (pip install libvirt-python)")
        _EventLoop.ensureRunning()
        try:
            conn = libvirt.open(self.settings.uri)
        except libvirt.libvirtError as e:
            raise VirtError(
                f"cannot connect to libvirt at {self.settings.uri} ({_describe(e)}): "
                f"start virtlogd and libvirtd (deploy/services.sh)")
        ids = [conn.domainEventRegisterAny(
            None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._onLifecycle, None)]
        conn.registerCloseCallback(self._onClose, None)
        try:
            conn.setKeepAlive(5, 3)
        except libvirt.libvirtError:
            pass
        # The first call needing QEMU's capabilities after a libvirtd start
        # probes QEMU for seconds: pay it here rather than in a VM's start.
        conn.getDomainCapabilities(self.settings.emulator or None, "x86_64", self.settings.machine, None)
        return conn, ids

    def _onLifecycle(self, conn, dom, event, detail, opaque):
        """
        libvirt event thread: forward to the reactor.
        """
        self._reactor.callFromThread(self._domainEvent, dom.name(), event, detail)

    def _onClose(self, conn, reason, opaque):
        self._reactor.callFromThread(self._connectionClosed, conn, reason)

    def _domainEvent(self, name, event, detail):
        vm_id = vm_id_of(self.settings.prefix, name)
        if vm_id is None:
            return
        if event == libvirt.VIR_DOMAIN_EVENT_CRASHED:
            log.warn("VM {vm_id}: domain {name} crashed (detail {detail})",
                     vm_id=vm_id, name=name, detail=detail)
        elif event in (libvirt.VIR_DOMAIN_EVENT_STOPPED, libvirt.VIR_DOMAIN_EVENT_UNDEFINED):
            self._fireWatchers(vm_id)

    def _fireWatchers(self, vm_id):
        for d in self._watchers.pop(vm_id, []):
            if not d.called:
                d.callback(None)

    def _connectionClosed(self, conn, reason):
        if conn is not self._conn or self._stopped:
            return
        log.warn("lost the libvirt connection to {uri} (reason {reason}); reconnecting",
                 uri=self.settings.uri, reason=reason)
        self._conn = None
        self._callbackIds = []
        self._scheduleReconnect()

    def _scheduleReconnect(self):
        if self._stopped or (self._reconnectCall and self._reconnectCall.active()):
            return
        self._reconnectCall = self._reactor.callLater(self.reconnectDelay, self._reconnect)

    def _reconnect(self):
        def connected(result):
            self._conn, self._callbackIds = result
            log.info("reconnected to libvirt at {uri}", uri=self.settings.uri)
            # Domains may have stopped while no event could reach us.
            for vm_id in list(self._watchers):
                self.isRunning(vm_id).addCallback(
                    lambda running, v=vm_id: running or self._fireWatchers(v))

        def failed(f):
            log.warn("reconnecting to libvirt failed: {error}", error=f.getErrorMessage())
            self._scheduleReconnect()

        self._inThread(self._connectSync).addCallbacks(connected, failed)

    # -- IHypervisor -----------------------------------------------------------

    @defer.inlineCallbacks
    def setUp(self):
        """
        Start the thread pool, connect to libvirt (events included), warm up
        QEMU's capability probe, make the directories and decide the
        acceleration as far as the host tells without a probe guest.
        """
        if self._ownPool and not self._pool.started:
            self._pool.start()
            self._shutdownTrigger = self._reactor.addSystemEventTrigger(
                "during", "shutdown", self._stopPool)
        self._stopped = False
        self._conn, self._callbackIds = yield self._inThread(self._connectSync)
        for d in (self.settings.overlays, self.settings.homes, self.settings.console_dir):
            make_dirs(d, 0o755)
        self._makeSecretDir()
        if self.settings.bridge:
            yield self._inThread(self._ensureBridge, self.settings.bridge)
        facts = self._hostFacts or _accel.HostFacts.read()
        self._decision = _accel.choose(self.settings.accel, facts)
        self._applyDecision()

    def _ensureBridge(self, bridge):
        """
        Create the node bridge with the node's address unless it exists;
        bring it up (in a pool thread).
        """
        argvs = []
        if not os.path.exists(f"/sys/class/net/{bridge}"):
            argvs += [["ip", "link", "add", "name", bridge, "type", "bridge"],
                      ["ip", "address", "add", self.settings.nodeBridgeAddress(), "dev", bridge]]
        argvs.append(["ip", "link", "set", bridge, "up"])
        for argv in argvs:
            result = subprocess.run(argv, capture_output=True, text=True)
            if result.returncode != 0:
                raise VirtError(f"cannot set up the bridge {bridge} ({' '.join(argv)}): "
                                f"{result.stderr.strip()}")

    def _makeSecretDir(self):
        """
        The secrets' directory: 0711 (QEMU must reach its file by name, nobody
        may list the others).
        """
        make_dirs(os.path.dirname(self.settings.secret_dir), 0o755)
        make_dirs(self.settings.secret_dir, 0o711)
        os.chmod(self.settings.secret_dir, 0o711)

    def _ownerForQemu(self, conn, domain_type):
        """
        The (uid, gid) QEMU runs as (libvirt's DAC base label), or None;
        asked once per domain type (in a pool thread).
        """
        if domain_type not in self._qemuOwner:
            try:
                caps = conn.getCapabilities()
            except libvirt.libvirtError as e:
                raise VirtError(f"libvirt could not tell its capabilities: {_describe(e)}")
            self._qemuOwner[domain_type] = dac_owner(caps, domain_type)
        return self._qemuOwner[domain_type]

    def _applyDecision(self):
        decision = self._decision
        if decision.domain_type and self.domainType is None:
            self.domainType = decision.domain_type
            if decision.warning:
                log.warn("{text}", text=decision.warning)
            log.info("KVM desktops run with domain type {type}", type=self.domainType)

    @defer.inlineCallbacks
    def tearDown(self):
        """
        Drop the event callbacks, close the connection and stop the threads
        (the HKD calls this when it stops; the domains keep running).
        """
        self._stopped = True
        if self._reconnectCall and self._reconnectCall.active():
            self._reconnectCall.cancel()
        conn, ids, self._conn, self._callbackIds = self._conn, self._callbackIds, None, []
        if conn is not None:
            def close():
                for cid in ids:
                    try:
                        conn.domainEventDeregisterAny(cid)
                    except libvirt.libvirtError:
                        pass
                try:
                    conn.unregisterCloseCallback()
                except libvirt.libvirtError:
                    pass
                conn.close()
            yield self._inThread(close)
        if self._shutdownTrigger is not None:
            self._reactor.removeSystemEventTrigger(self._shutdownTrigger)
        self._stopPool()

    def _stopPool(self):
        self._shutdownTrigger = None
        if self._ownPool and self._pool.started:
            self._pool.stop()

    @defer.inlineCallbacks
    def _domainTypeFor(self, kernel):
        """
        The domain type, running the auto probe with C{kernel} on first use.
        """
        if self.domainType is not None:
            return self.domainType
        yield self._accelLock.acquire()
        try:
            if self.domainType is None:
                argv = _accel.probe_argv(kernel, self.settings.emulator)
                ok, why = yield self._inThread(_accel.run_probe, argv, self.settings.probe_timeout)
                self._decision = _accel.after_probe(ok, why)
                self._applyDecision()
        finally:
            self._accelLock.release()
        return self.domainType

    def _bootCache(self, spec):
        """
        Where the DI's kernel and initramfs are kept when they were not
        registered beside the image (extracted from it by L{prepare}).
        """
        base = os.path.join(self.settings.overlays, "boot", os.path.basename(spec.di_path))
        return base + ".kernel", base + ".initrd"

    def _bootFiles(self, spec):
        """
        The DI's kernel and initramfs: C{<di>.kernel}/C{<di>.initrd} beside
        the image, else the copies L{prepare} extracted from it.
        """
        for kernel, initrd in (kernel_files(spec.di_path), self._bootCache(spec)):
            if os.path.exists(kernel):
                return BootFiles(kernel, initrd if os.path.exists(initrd) else "")
        raise VirtError(
            f"DI {spec.di_id} ({spec.di_path}) has no kernel beside it and none was "
            f"extracted: prepare the VM first, or build KVM images with 'qvd-di build "
            f"--format qcow2' (one ext4 filesystem with a kernel in /boot)")

    def _extractBootFiles(self, spec):
        """
        Copy the kernel and initramfs out of a DI registered without them,
        once per DI and node (in a pool thread, under a file lock).
        """
        kernel, initrd = self._bootCache(spec)
        os.makedirs(os.path.dirname(kernel), mode=0o755, exist_ok=True)
        with open(kernel + ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.path.exists(kernel):
                return
            log.info("VM {vm_id}: extracting the kernel of DI {di_id} from {path}",
                     vm_id=spec.vm_id, di_id=spec.di_id, path=spec.di_path)
            try:
                bootfiles.extract_boot_files(spec.di_path, kernel, initrd, image_format(spec.di_path))
            except bootfiles.ImageError as e:
                raise VirtError(f"DI {spec.di_id} cannot boot under KVM: {e}")

    def _disks(self, spec):
        home = home_path(self.settings, spec.vm_id) if spec.user_storage_size > 0 else None
        if spec.use_overlay:
            return DomainDisks(overlay_path(self.settings, spec), "qcow2", False, home)
        return DomainDisks(spec.di_path, image_format(spec.di_path), True, home)

    def _prepareSync(self, spec):
        if not os.path.isfile(spec.di_path):
            raise VirtError(f"the disk image {spec.di_path} of DI {spec.di_id} does not exist")
        if not os.path.exists(kernel_files(spec.di_path)[0]):
            self._extractBootFiles(spec)
        for d in (self.settings.overlays, self.settings.homes, self.settings.console_dir):
            make_dirs(d, 0o755)
        created = []
        try:
            if spec.use_overlay:
                overlay = overlay_path(self.settings, spec)
                if os.path.exists(overlay) and not spec.persistent_overlay:
                    os.unlink(overlay)
                if not os.path.exists(overlay):
                    _qemu_img("create", "-q", "-f", "qcow2", "-b", os.path.abspath(spec.di_path),
                              "-F", image_format(spec.di_path), overlay)
                    created.append(overlay)
            if spec.user_storage_size > 0:
                home = home_path(self.settings, spec.vm_id)
                if not os.path.exists(home):
                    _qemu_img("create", "-q", "-f", "qcow2", home, f"{int(spec.user_storage_size)}M")
                    created.append(home)
        except BaseException:
            for path in created:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            raise

    def prepare(self, spec):
        return self._inThread(self._prepareSync, spec)

    def xmlFor(self, spec, domain_type):
        """
        The domain XML of C{spec} under C{domain_type} (for tests and logs).
        """
        secret = secret_path(self.settings, spec.vm_id) if spec.vma_secret else ""
        return domain_xml(spec, self.settings.domainSettings(domain_type),
                          self._bootFiles(spec), self._disks(spec), secret_file=secret)

    @defer.inlineCallbacks
    def start(self, spec):
        """
        Create the domain; with C{spec.vma_secret}, first write the file
        QEMU reads it from (removed again when libvirt refuses the domain).
        """
        boot = self._bootFiles(spec)
        domain_type = yield self._domainTypeFor(boot.kernel)
        xml = self.xmlFor(spec, domain_type)

        def create():
            conn = self._connected()
            secret = secret_path(self.settings, spec.vm_id)
            if spec.vma_secret:
                self._makeSecretDir()
                write_secret(secret, spec.vma_secret, self._ownerForQemu(conn, domain_type))
            try:
                dom = conn.createXML(xml, 0)
            except libvirt.libvirtError as e:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(secret)
                raise VirtError(f"libvirt could not start VM {spec.vm_id}: {_describe(e)}")
            return RunningVM(spec.vm_id, self._pid(dom.name()))

        running = yield self._inThread(create)
        log.info("VM {vm_id} started as domain {name} ({type})", vm_id=spec.vm_id,
                 name=domain_name(self.settings.prefix, spec.vm_id), type=domain_type)
        return running

    def shutdown(self, vm_id):
        def shutdown():
            dom = self._lookup(vm_id)
            if dom is None:
                return
            try:
                if dom.isActive():
                    dom.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
            except libvirt.libvirtError as e:
                if e.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                    raise VirtError(f"libvirt could not shut VM {vm_id} down: {_describe(e)}")
        return self._inThread(shutdown)

    def _destroySync(self, vm_id):
        dom = self._lookup(vm_id)
        if dom is None:
            return None
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError as e:
            if e.get_error_code() not in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
                raise VirtError(f"libvirt could not destroy VM {vm_id}: {_describe(e)}")
        return dom

    def kill(self, vm_id):
        return self._inThread(lambda: self._destroySync(vm_id) and None)

    def _cleanupSync(self, spec):
        dom = self._destroySync(spec.vm_id)
        if dom is not None:
            try:
                if dom.isPersistent():
                    dom.undefineFlags(
                        libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
                        | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                        | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
            except libvirt.libvirtError as e:
                if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
                    raise VirtError(f"libvirt could not undefine VM {spec.vm_id}: {_describe(e)}")
        for path in (secret_path(self.settings, spec.vm_id),
                     secret_path(self.settings, spec.vm_id) + ".tmp"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if not spec.persistent_overlay:
            if spec.di_id:
                overlays = [overlay_path(self.settings, spec)]
            else:  # the HKD no longer knows the DI: any overlay of this VM
                suffix = f"-{int(spec.vm_id)}-overlay.qcow2"
                overlays = [os.path.join(self.settings.overlays, name)
                            for name in (os.listdir(self.settings.overlays)
                                         if os.path.isdir(self.settings.overlays) else ())
                            if name.endswith(suffix) and name[:-len(suffix)].isdigit()]
            for path in overlays:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        tap = tap_name(self.settings.tap_prefix, spec.vm_id)
        if os.path.exists(f"/sys/class/net/{tap}"):
            result = subprocess.run(["ip", "link", "del", tap], capture_output=True, text=True)
            if result.returncode != 0 and os.path.exists(f"/sys/class/net/{tap}"):
                raise VirtError(f"cannot remove the tap {tap} of VM {spec.vm_id}: {result.stderr.strip()}")

    def cleanup(self, spec):
        return self._inThread(self._cleanupSync, spec)

    def isRunning(self, vm_id):
        def running():
            dom = self._lookup(vm_id)
            try:
                return bool(dom is not None and dom.isActive())
            except libvirt.libvirtError as e:
                if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                    return False
                raise VirtError(f"libvirt could not tell whether VM {vm_id} runs: {_describe(e)}")
        return self._inThread(running)

    def listRunning(self):
        def running():
            try:
                doms = self._connected().listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
            except libvirt.libvirtError as e:
                raise VirtError(f"libvirt could not list domains: {_describe(e)}")
            found = []
            for dom in doms:
                vm_id = vm_id_of(self.settings.prefix, dom.name())
                if vm_id is not None:
                    found.append(RunningVM(vm_id, self._pid(dom.name())))
            return sorted(found, key=lambda r: r.vm_id)
        return self._inThread(running)

    def watch(self, vm_id):
        """
        Fires when the domain's "stopped" lifecycle event arrives, or at once
        when the domain does not run (checked after registering, so no
        event is lost in between).
        """
        d = defer.Deferred(lambda d: self._forget(vm_id, d))
        self._watchers.setdefault(vm_id, []).append(d)

        def check(running):
            if not running and not d.called:
                self._forget(vm_id, d)
                d.callback(None)

        def failed(f):
            log.warn("VM {vm_id}: cannot check whether it runs ({error}); waiting for its event",
                     vm_id=vm_id, error=f.getErrorMessage())

        self.isRunning(vm_id).addCallbacks(check, failed)
        return d

    def _forget(self, vm_id, d):
        waiting = self._watchers.get(vm_id, [])
        if d in waiting:
            waiting.remove(d)
        if not waiting:
            self._watchers.pop(vm_id, None)


def makeHypervisor(config, reactor):
    """
    The HKD's entry point (C{vm.hypervisor = kvm}): a L{KVMDriver} configured
    from C{config}; the HKD calls its C{setUp()} before anything else.
    """
    return KVMDriver.fromConfig(reactor, config)
