"""
The HKD's side of the storage: the shared-storage check before each VM's
start, and the sweep that frees what deleted DIs and VMs left on this node
and on the shared volume.

    storage_id = read_storage_id(dsn)                 # blocking, before the reactor
    qvd.storage.check(settings, storage_id)           # at start: refuse to run
    driver = StorageGuard(driver, settings, storage_id, reactor)  # before each prepare
    Sweeper(reactor, db, SweepSettings.from_config(config), storage_ok).setServiceParent(top)

L{StorageGuard} wraps the node's virt driver: its C{prepare} first runs
L{qvd.storage.problem} in a thread (a FUSE mount whose server is gone makes
the reads fail, it does not hang them) and fails the start with the
problem's text (the VM's C{vm_state_reason}) instead of letting the driver
create the VM's home under a bare mount point on the local disk. Everything
else goes to the wrapped driver unchanged.

L{Sweeper} runs at start and every C{hkd.storage.sweep.interval} seconds:
it reads the DIs and VMs that were deleted (table C{deleted_storage}, filled
by triggers whatever deleted them) and the DI file names that exist, and
removes, in a thread, only what belongs to a deleted one (a directory it
does not know, such as a tree shared with another database, is left alone):
 - on this node: the unpacked trees of deleted DIs whose file name no DI
   uses any more (C{path.storage.basefs}, unless a mount still uses them),
   the overlay upper and work dirs of deleted VMs (C{path.storage.overlayfs});
 - on the shared storage (only while its check passes): the homes of
   deleted VMs (C{path.storage.homefs/<vm_id>-fs}) and their KVM overlay
   and home disks, which C{qvd-admin vm del} removes itself when it sees
   the storage (this is the backstop when it does not).
"""

import os
import re
import shutil

import attrs
from twisted.application import service
from twisted.internet import defer, task, threads
from zope.interface import implementer

from qvd import storage
from qvd._locks import locked
from qvd.logs import Logger
from qvd.virt.interfaces import IHypervisor, VirtError

log = Logger()


def read_storage_id(dsn):
    """The database's storage id (None when it has none), read with a blocking connection."""
    from qvd.db import sync
    with sync.connect(dsn) as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT storage_id FROM storage_identity")
            row = cur.fetchone()
        conn.rollback()
    return row[0] if row else None


@implementer(IHypervisor)
class StorageGuard:
    """
    The node's driver, with the shared-storage check before each C{prepare}.
    Every other attribute is the wrapped driver's.
    """

    def __init__(self, driver, settings, storage_id, reactor, to_thread=None):
        self.wrapped = driver
        self._settings = settings
        self._storage_id = storage_id
        self._to_thread = to_thread or (
            lambda f, *a: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *a))

    def __getattr__(self, name):
        return getattr(self.wrapped, name)

    @defer.inlineCallbacks
    def prepare(self, spec):
        error = yield self._to_thread(storage.problem, self._settings, self._storage_id)
        if error is not None:
            raise VirtError(f"VM {spec.vm_id} not started: {error}")
        result = yield self.wrapped.prepare(spec)
        return result

    # the rest of IHypervisor, spelled out so that verifyObject sees them
    def setUp(self):
        return self.wrapped.setUp()

    def start(self, spec):
        return self.wrapped.start(spec)

    def shutdown(self, vm_id):
        return self.wrapped.shutdown(vm_id)

    def kill(self, vm_id):
        return self.wrapped.kill(vm_id)

    def cleanup(self, spec):
        return self.wrapped.cleanup(spec)

    def isRunning(self, vm_id):
        return self.wrapped.isRunning(vm_id)

    def listRunning(self):
        return self.wrapped.listRunning()

    def watch(self, vm_id):
        return self.wrapped.watch(vm_id)


# -- the sweep -------------------------------------------------------------------

_TREE = re.compile(r"^(?P<base>.+)\.u\d+-g\d+$")
_UPPER = re.compile(r"^\d+-(?P<vm>\d+)-overlayfs$")
_WORK = re.compile(r"^(?P<vm>\d+)-overlayfs-work$")
_HOME = re.compile(r"^(?P<vm>\d+)-fs$")
_KVM_OVERLAY = re.compile(r"^\d+-(?P<vm>\d+)-overlay\.qcow2$")
_KVM_HOME = re.compile(r"^(?P<vm>\d+)-data\.qcow2$")
#: archive suffixes of LXC DIs (qvd.virt._lxcconfig.DI_SUFFIXES), longest first
_DI_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar")


def di_base(path):
    """A DI's file name without its archive suffix (the name of its unpacked trees)."""
    name = os.path.basename(path)
    for suffix in _DI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)]
    return name


@attrs.frozen
class SweepSettings:
    """
    @ivar interval: seconds between sweeps (0: only at start).
    @ivar node: the node-local directories: C{basefs}, C{overlayfs}.
    @ivar shared: the shared ones: C{homefs}, C{overlays}, C{homes}.
    """
    interval: float
    basefs: str
    overlayfs: str
    homefs: str
    overlays: str
    homes: str

    @classmethod
    def from_config(cls, config):
        return cls(interval=config.getfloat("hkd.storage.sweep.interval"),
                   basefs=config.get("path.storage.basefs"),
                   overlayfs=config.get("path.storage.overlayfs"),
                   homefs=config.get("path.storage.homefs"),
                   overlays=config.get("path.storage.overlays"),
                   homes=config.get("path.storage.homes"))


def _listdir(path):
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def listing(settings):
    """What the sweep looks at: directory -> names in it."""
    return {d: _listdir(d) for d in (settings.basefs, settings.overlayfs, settings.homefs,
                                     settings.overlays, settings.homes)}


def leftovers(settings, names, di_paths, deleted_dis, deleted_vms, busy, shared_ok):
    """
    The paths to remove (pure): entries of C{names} (L{listing}) of a
    deleted DI (file names C{deleted_dis}) that no DI of C{di_paths} uses
    again, or of a deleted VM (ids C{deleted_vms}), not in C{busy} (paths a
    mount uses); the shared directories only when C{shared_ok}.
    """
    bases = {di_base(p) for p in deleted_dis} - {di_base(p) for p in di_paths}
    vms = {int(v) for v in deleted_vms}
    found = []

    def add(directory, name):
        path = os.path.join(directory, name)
        if not any(b == path or b.startswith(path + "/") for b in busy):
            found.append(path)

    for name in names.get(settings.basefs, ()):
        m = _TREE.match(name)
        if m and m.group("base") in bases:
            add(settings.basefs, name)
    for name in names.get(settings.overlayfs, ()):
        m = _UPPER.match(name) or _WORK.match(name)
        if m and int(m.group("vm")) in vms:
            add(settings.overlayfs, name)
    if shared_ok:
        for directory, patterns in ((settings.homefs, (_HOME,)),
                                    (settings.overlays, (_KVM_OVERLAY,)),
                                    (settings.homes, (_KVM_HOME,))):
            for name in names.get(directory, ()):
                m = next((m for m in (p.match(name) for p in patterns) if m), None)
                if m and int(m.group("vm")) in vms:
                    add(directory, name)
    return found


def busy_paths(mountinfo=storage.MOUNTINFO):
    """Every path named in a mount's source or options (an overlay's lowerdir=...)."""
    with open(mountinfo) as f:
        text = f.read()
    paths = set()
    for line in text.splitlines():
        for word in re.split(r"[\s,=:]", line):
            if word.startswith("/"):
                paths.add(word)
    return paths


def remove(settings, path):
    """
    Remove C{path}: an unpacked tree is first renamed away under the lock its
    unpacking takes (a DI added again under the same name unpacks afresh).
    """
    if os.path.dirname(path) == settings.basefs:
        name = os.path.basename(path)
        trash = os.path.join(settings.basefs, f"deleted-{name}-{os.getpid()}")
        with locked(os.path.join(settings.basefs, ".locks", name + ".lock"), mode=0o600):
            try:
                os.rename(path, trash)
            except FileNotFoundError:
                return
        path = trash
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


class Sweeper(service.Service):
    """
    Frees the storage of deleted DIs and VMs (see the module docstring).

    @param storage_ok: C{() -> bool}, blocking (run in a thread): whether the
        shared storage may be touched now.
    """

    def __init__(self, reactor, db, settings, storage_ok, to_thread=None,
                 busy=busy_paths):
        self.reactor = reactor
        self.db = db
        self.settings = settings
        self.storage_ok = storage_ok
        self.busy = busy
        self._to_thread = to_thread or (
            lambda f, *a: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *a))
        self._loop = None
        self._busy = False
        self.removed = []

    def startService(self):
        service.Service.startService(self)
        self._loop = task.LoopingCall(self._sweep_logged)
        self._loop.clock = self.reactor
        interval = self.settings.interval
        if interval > 0:
            self._loop.start(interval, now=True)
        else:
            self.reactor.callLater(0, self._sweep_logged)

    def stopService(self):
        service.Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def _sweep_logged(self):
        if self._busy:
            return None
        d = self.sweep()
        d.addErrback(lambda f: log.warn("storage sweep failed ({error}); trying again later",
                                        error=str(f.value).strip() or repr(f.value)))
        return d

    @defer.inlineCallbacks
    def sweep(self):
        """
        One sweep; fires with the paths removed.
        """
        self._busy = True
        try:
            names = yield self._to_thread(listing, self.settings)
            dis = yield self.db.runQuery("SELECT path FROM dis")
            deleted = yield self.db.runQuery("SELECT kind, object_id, name FROM deleted_storage")
            shared_ok = yield self._to_thread(self.storage_ok)
            busy = yield self._to_thread(self.busy)
            paths = leftovers(self.settings, names, [r[0] for r in dis],
                              [r[2] for r in deleted if r[0] == "di"],
                              [r[1] for r in deleted if r[0] == "vm"], busy, shared_ok)
            for path in paths:
                log.info("storage sweep: removing {path} (its DI or VM was deleted)", path=path)
                yield self._to_thread(remove, self.settings, path)
            self.removed.extend(paths)
            return paths
        finally:
            self._busy = False
