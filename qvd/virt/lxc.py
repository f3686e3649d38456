"""
The LXC virt driver: desktops as privileged system containers.

    driver = LXCDriver(config, reactor)
    yield driver.setUp()                  # directories, the node bridge
    yield driver.prepare(spec)            # base fs, overlay, home, config
    running = yield driver.start(spec)    # RunningVM(vm_id, pid of init)
    stopped = driver.watch(spec.vm_id)    # fires when the container stops
    yield driver.shutdown(spec.vm_id)     # init's power-off signal
    yield driver.kill(spec.vm_id)         # or: lxc-stop -k
    yield driver.cleanup(spec)            # mounts, veth, cgroups, dirs

Per VM (reference 4.6; paths from L{qvd.virt._lxcconfig.Layout}):
- the DI (a rootfs tarball) is unpacked once into
  C{path.storage.basefs/<name>.u<uid>-g<gid>} with its ids shifted into the
  containers' range (C{vm.lxc.idmap.*}) and shared read-only by all its VMs;
- each container runs in a user namespace (its root is host uid
  C{vm.lxc.idmap.uid}), without the capabilities of
  L{qvd.virt._lxcconfig.CAP_DROP}, under the seccomp policy
  C{vm.lxc.seccomp.profile} and with C{pids.max} = C{vm.lxc.pids.max};
- an overlayfs (upper and work dirs in C{path.storage.overlayfs}) is mounted
  on C{path.storage.rootfs/<vm_id>-fs}; the upper dir is emptied at each boot
  unless C{spec.persistent_overlay};
- the persistent home C{path.storage.homefs/<vm_id>-fs} (or C{<login>} with
  C{vm.lxc.home.per.user}) is bind-mounted on C{/home} by LXC, inside the
  container's mount namespace only;
- the container C{<vm.lxc.name.prefix><vm_id>} lives in C{path.run.lxc}; its
  config comes from a template (C{vm.lxc.template}) plus C{vm.lxc.conf.extra}.

liblxc is only used through its command-line tools run with C{spawnProcess}
(the Python bindings fork the calling process); blocking file-system work runs
in the reactor's thread pool. C{lxc-start -d} daemonises LXC's monitor, so
containers outlive an HKD restart and L{LXCDriver.listRunning} finds them.
"""

import os
import shutil

from twisted.internet import defer, task, threads
from qvd.logs import Logger
from zope.interface import implementer

from qvd.virt import _lxcfs
from qvd.virt._lxcconfig import (
    Layout, LXCSettings, mounts_below, overlay_options, parse_lxc_info, render_config)
from qvd.virt._process import SEARCH_PATH, run as run_process
from qvd.virt.interfaces import IHypervisor, RunningVM, VirtError

_STOPPED = (None, "STOPPED")
REQUIRED_PROGRAMS = ("lxc-start", "lxc-stop", "lxc-info", "ip", "mount", "umount", "tar")


@implementer(IHypervisor)
class LXCDriver:
    """
    L{IHypervisor} on liblxc's tools.

    @param config: a L{qvd.config.Config} (C{path.run.lxc}, C{path.storage.*},
        C{vm.lxc.*}, C{vm.network.*}).
    @param reactor: provides C{spawnProcess}, C{callLater}, C{addReader} and
        a thread pool.
    @param run: replaces L{qvd.virt._process.run} (C{run(argv, log_path=None)}
        -> Deferred of L{ProcessResult}); for tests.
    @param to_thread: replaces C{deferToThreadPool}; for tests.
    """

    name = "lxc"
    log = Logger()

    def __init__(self, config, reactor, run=None, to_thread=None, settings=None):
        self._config = config
        self._reactor = reactor
        self.settings = settings or LXCSettings.from_config(config)
        self._run = run or (lambda argv, log_path=None: run_process(reactor, argv, log_path))
        self._to_thread = to_thread or (
            lambda f, *a: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *a))
        self.bridge = config.get("vm.network.bridge")
        #: vm_id -> pid of the init this driver just started (its watch then
        #: needs no lxc-info)
        self._started = {}

    # -- helpers ---------------------------------------------------------

    def _layout(self, spec):
        return Layout.of(self.settings, spec)

    def _name(self, vm_id):
        return self.settings.container_name(vm_id)

    def port_name(self, vm_id):
        """The host side of the VM's veth: its port on the bridge."""
        return self.settings.veth_name(vm_id)

    @defer.inlineCallbacks
    def _info(self, vm_id):
        """
        (state, pid) of the VM's container; (None, None) if LXC does not know it.
        """
        if not os.path.exists(os.path.join(self.settings.lxcpath, self._name(vm_id), "config")):
            return (None, None)
        result = yield self._run(
            ["lxc-info", "-n", self._name(vm_id), "-P", self.settings.lxcpath, "-s", "-p"])
        if result.code != 0:
            return (None, None)
        return parse_lxc_info(result.out)

    def _sleep(self, seconds):
        return task.deferLater(self._reactor, seconds, lambda: None)

    @defer.inlineCallbacks
    def _unmount_below(self, path):
        """
        Unmount everything mounted at or below C{path}, deepest first (lazily
        when busy); L{VirtError} if something stays mounted.
        """
        for point in mounts_below(_lxcfs.read_text("/proc/self/mounts"), path):
            result = yield self._run(["umount", point])
            if result.code != 0:
                self.log.warn("umount {point} failed ({why}); detaching it lazily",
                              point=point, why=result.describe())
                yield self._run(["umount", "-l", point])
        left = mounts_below(_lxcfs.read_text("/proc/self/mounts"), path)
        if left:
            raise VirtError(f"cannot unmount {', '.join(left)}: see 'fuser -m' for users")

    @defer.inlineCallbacks
    def _delete_veth(self, veth):
        """
        Delete the host side of a stopped container's veth if it was left
        (LXC normally deletes it; a crash may not).
        """
        if os.path.exists(f"/sys/class/net/{veth}"):
            result = yield self._run(["ip", "link", "delete", veth])
            if result.code != 0 and os.path.exists(f"/sys/class/net/{veth}"):
                raise VirtError(f"cannot delete the interface {veth}: {result.describe()}")

    # -- IHypervisor -----------------------------------------------------

    @defer.inlineCallbacks
    def setUp(self):
        """
        Check the LXC tools, create the storage and run directories and the
        node bridge (with C{vm.lxc.bridge.address}) when it is missing.
        """
        missing = [p for p in REQUIRED_PROGRAMS if not _which(p)]
        if missing:
            raise VirtError(f"LXC driver needs {', '.join(missing)}: apt-get install lxc iproute2")
        s = self.settings
        for path in (s.lxcpath, s.basefs, s.overlayfs, s.rootfs, s.homefs):
            yield self._to_thread(_lxcfs.open_to_containers, path)
        yield self.ensure_bridge(self.bridge)

    @defer.inlineCallbacks
    def ensure_bridge(self, bridge):
        """
        Create C{bridge} with the node's address unless it exists; bring it up.
        """
        if not os.path.exists(f"/sys/class/net/{bridge}"):
            address = self.settings.node_bridge_address()
            for argv in (["ip", "link", "add", "name", bridge, "type", "bridge"],
                         ["ip", "address", "add", address, "dev", bridge]):
                result = yield self._run(argv)
                if result.code != 0:
                    raise VirtError(f"cannot create the bridge {bridge}: {result.describe()}")
            self.log.info("created bridge {bridge} with address {address}",
                          bridge=bridge, address=address)
        result = yield self._run(["ip", "link", "set", bridge, "up"])
        if result.code != 0:
            raise VirtError(f"cannot bring the bridge {bridge} up: {result.describe()}")

    @defer.inlineCallbacks
    def prepare(self, spec):
        layout = self._layout(spec)
        state, _ = yield self._info(spec.vm_id)
        if state not in _STOPPED:
            raise VirtError(f"VM {spec.vm_id}: container {layout.name} is {state}; stop it first")
        try:
            lower, extra = yield self._to_thread(
                _lxcfs.ensure_basefs, layout, spec.di_path, self.settings.basefs,
                self.settings.idmap)
            yield self._unmount_below(layout.rootfs)
            yield self._delete_veth(layout.veth)
            yield self._to_thread(_lxcfs.prepare_dirs, layout, spec.persistent_overlay, lower,
                                  self.settings.idmap)
            if spec.use_overlay:
                argv = ["mount", "-t", "overlay", "-o", overlay_options(lower, layout),
                        "overlay", layout.rootfs]
            else:
                argv = ["mount", "--bind", "-o", "ro", lower, layout.rootfs]
            result = yield self._run(argv)
            if result.code != 0:
                raise VirtError(f"VM {spec.vm_id}: cannot mount its root: {result.describe()}")
            template = yield self._to_thread(_lxcfs.read_text, self.settings.template)
            if not template:
                raise VirtError(f"LXC config template {self.settings.template} is missing or empty")
            if spec.vma_secret:
                # Readable by the container's root only (its host ids).
                yield self._to_thread(_lxcfs.write_secret, layout.secret_path, spec.vma_secret,
                                      self.settings.root_uid, self.settings.root_gid)
            text = render_config(self.settings, spec, layout, template,
                                 self.settings.template, extra)
            yield self._to_thread(_lxcfs.write_atomically, layout.config_path, text)
        except Exception as e:
            yield self._undo(spec)
            if isinstance(e, VirtError):
                raise
            raise VirtError(f"VM {spec.vm_id}: preparing the container failed: {e}")

    @defer.inlineCallbacks
    def _undo(self, spec):
        try:
            yield self.cleanup(spec)
        except Exception:
            self.log.failure("cleaning up VM {vm_id} after a failed prepare", vm_id=spec.vm_id)

    @defer.inlineCallbacks
    def start(self, spec):
        layout = self._layout(spec)
        if not os.path.exists(layout.config_path):
            raise VirtError(f"VM {spec.vm_id} is not prepared (no {layout.config_path})")
        result = yield self._run(
            ["lxc-start", "-n", layout.name, "-P", self.settings.lxcpath, "-d",
             "-o", layout.log_path, "-l", self.settings.log_level],
            log_path=os.path.join(layout.container_dir, "lxc-start.out"))
        state, pid = yield self._info(spec.vm_id)
        if result.code != 0 or state != "RUNNING":
            errors = [l for l in _lxcfs.tail(layout.log_path, 40) if "ERROR" in l][:4]
            yield self._stop(spec.vm_id)
            raise VirtError(
                f"VM {spec.vm_id}: container {layout.name} did not start (lxc-start exit "
                f"status {result.code}, state {state}): "
                + (" / ".join(e.split(" - ", 1)[-1] for e in errors) or
                   f"see {layout.log_path}"))
        self._started[spec.vm_id] = pid
        return RunningVM(spec.vm_id, pid)

    @defer.inlineCallbacks
    def shutdown(self, vm_id):
        state, pid = yield self._info(vm_id)
        if state in _STOPPED or pid is None:
            return
        try:
            os.kill(pid, self.settings.halt_signum())
        except ProcessLookupError:
            pass

    @defer.inlineCallbacks
    def _stop(self, vm_id):
        self._started.pop(vm_id, None)
        state, _ = yield self._info(vm_id)
        if state in _STOPPED:
            return
        result = yield self._run(
            ["lxc-stop", "-n", self._name(vm_id), "-P", self.settings.lxcpath, "-k"])
        deadline = self._reactor.seconds() + self.settings.stop_timeout
        while True:
            state, _ = yield self._info(vm_id)
            if state in _STOPPED:
                return
            if self._reactor.seconds() >= deadline:
                raise VirtError(
                    f"VM {vm_id}: container {self._name(vm_id)} is still {state} "
                    f"{self.settings.stop_timeout} s after lxc-stop -k ({result.describe()})")
            yield self._sleep(0.1)

    def kill(self, vm_id):
        return self._stop(vm_id)

    @defer.inlineCallbacks
    def cleanup(self, spec):
        layout = Layout.of(self.settings, spec, for_cleanup=True)
        yield self._stop(spec.vm_id)
        problems = []
        left = yield self._to_thread(_lxcfs.kill_cgroups, layout.name)
        if left:
            problems.append(f"cgroups {', '.join(left)} remain")
        try:
            yield self._delete_veth(layout.veth)
        except VirtError as e:
            problems.append(str(e))
        try:
            yield self._unmount_below(layout.rootfs)
        except VirtError as e:
            problems.append(str(e))
        else:
            yield self._to_thread(_lxcfs.remove_vm_dirs, layout, spec.persistent_overlay)
        if problems:
            raise VirtError(f"VM {spec.vm_id}: cleanup incomplete: {'; '.join(problems)}")

    @defer.inlineCallbacks
    def isRunning(self, vm_id):
        state, _ = yield self._info(vm_id)
        return state not in _STOPPED

    @defer.inlineCallbacks
    def listRunning(self):
        try:
            names = sorted(os.listdir(self.settings.lxcpath))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            vm_id = self.settings.vm_id_of(name)
            if vm_id is None:
                continue
            state, pid = yield self._info(vm_id)
            if state not in _STOPPED:
                found.append(RunningVM(vm_id, pid))
        return found

    @defer.inlineCallbacks
    def watch(self, vm_id):
        pid = self._started.pop(vm_id, None)
        if pid is None:
            state, pid = yield self._info(vm_id)
            if state in _STOPPED or pid is None:
                return None
        yield _ProcessWatch(self._reactor, pid, self.settings.watch_interval).ended


class _ProcessWatch:
    """
    Fires C{ended} when process C{pid} (not our child) exits: a pidfd
    watched by the reactor, or polling of /proc where pidfds are missing.
    """

    def __init__(self, reactor, pid, interval):
        self._reactor = reactor
        self._pid = pid
        self._fd = None
        self._poll = None
        self.ended = defer.Deferred(lambda d: self._stop())
        try:
            self._fd = os.pidfd_open(pid)
        except ProcessLookupError:
            self.ended.callback(None)
            return
        except (AttributeError, OSError):
            self._start_time = _start_time(pid)
            self._poll = task.LoopingCall(self._check)
            self._poll.clock = reactor
            self._poll.start(interval, now=False)
            return
        reactor.addReader(self)

    def _check(self):
        if _start_time(self._pid) != self._start_time:
            self._stop()
            self.ended.callback(None)

    def _stop(self):
        if self._fd is not None:
            self._reactor.removeReader(self)
            os.close(self._fd)
            self._fd = None
        if self._poll is not None and self._poll.running:
            self._poll.stop()

    # IReadDescriptor
    def fileno(self):
        return self._fd if self._fd is not None else -1

    def doRead(self):
        self._stop()
        if not self.ended.called:
            self.ended.callback(None)

    def connectionLost(self, reason):
        self._stop()

    def logPrefix(self):
        return "lxc-watch"


def _start_time(pid):
    text = _lxcfs.read_text(f"/proc/{pid}/stat")
    return text.rsplit(")", 1)[-1].split()[19] if text else None


def _which(program):
    return shutil.which(program, path=SEARCH_PATH)


def makeHypervisor(config, reactor):
    """
    The HKD's entry point (C{vm.hypervisor = lxc}): an L{LXCDriver}.
    """
    return LXCDriver(config, reactor)
