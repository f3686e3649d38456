"""
Is C{path.storage.root} the cluster's shared storage? The check the HKD runs
at start and before each VM's start, and qvd-admin's C{storage init}.

    settings = StorageSettings.from_config(config)
    problem = settings.problem(expected_id=db_id)   # None, or a StorageError
    check(settings, db_id)                          # raises StorageError
    write_marker(settings.root, new_storage_id())   # qvd-admin storage init

The storage is shared (C{path.storage.shared = 1}) when C{path.storage.root}
lies on a mount whose file system type is one of
C{path.storage.shared.fstypes} (C{fuse.glusterfs} for a GlusterFS volume,
read from C{/proc/self/mountinfo}) AND the marker file L{MARKER} at the root
holds the storage id of the database (table C{storage_identity}). A local
directory that only looks like the volume (the volume not mounted, mounted
somewhere else, or another cluster's volume) fails one of the two. The
checks are cheap: one read of C{/proc/self/mountinfo}, one stat of the root
and one small file read, so they run before every VM start. A mount whose
server went away makes those calls fail with ENOTCONN at once (FUSE), which
is a failed check too.

With C{path.storage.shared = 0} (one node) nothing is checked.

The pure part (L{parse_mountinfo}, L{mount_of}, L{judge}) takes texts and
values; L{check} does the reads.
"""

import errno
import os
import uuid

import attrs

#: the marker file at the root of the shared storage: the storage id, one line
MARKER = ".qvd-storage-id"
MOUNTINFO = "/proc/self/mountinfo"
#: node-local path keys that must not be on the shared storage
LOCAL_KEYS = ("path.storage.basefs", "path.storage.overlayfs", "path.storage.rootfs")


class StorageError(Exception):
    """The storage is not the cluster's shared storage; the text says why and what to do."""


@attrs.frozen
class Mount:
    """One line of /proc/self/mountinfo: where, what type, from what."""
    point: str
    fstype: str
    source: str


@attrs.frozen
class StorageSettings:
    """
    @ivar root: C{path.storage.root}.
    @ivar shared: C{path.storage.shared}.
    @ivar fstypes: C{path.storage.shared.fstypes}.
    @ivar local: key -> path of the node-local directories (L{LOCAL_KEYS}).
    """
    root: str
    shared: bool = False
    fstypes: tuple = ("fuse.glusterfs",)
    local: tuple = ()

    @classmethod
    def from_config(cls, config):
        return cls(root=config.get("path.storage.root"),
                   shared=config.getbool("path.storage.shared"),
                   fstypes=tuple(config.getlist("path.storage.shared.fstypes")),
                   local=tuple((k, config.get(k)) for k in LOCAL_KEYS))


def new_storage_id():
    """A fresh random storage id."""
    return str(uuid.uuid4())


def _unescape(field):
    # mountinfo escapes space, tab, newline and backslash as \ooo
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text):
    """
    The L{Mount}s of a C{/proc/<pid>/mountinfo} text, in its order (a later
    mount on the same point hides an earlier one).
    """
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields:
            continue
        dash = fields.index("-")
        if dash < 5 or len(fields) < dash + 3:
            continue
        mounts.append(Mount(_unescape(fields[4]), fields[dash + 1], _unescape(fields[dash + 2])))
    return mounts


def _below(path, point):
    return point == "/" or path == point or path.startswith(point.rstrip("/") + "/")


def mount_of(path, mounts):
    """
    The L{Mount} that holds C{path} (an absolute, resolved path): the
    longest mount point at or above it, the latest of equal ones; None when
    nothing does.
    """
    best = None
    for m in mounts:
        if _below(path, m.point) and (best is None or len(m.point) >= len(best.point)):
            best = m
    return best


def judge(settings, expected_id, root_path, mounts, marker):
    """
    The verdict on the storage (pure): None when it is the cluster's shared
    storage or sharing is off, else a L{StorageError} that says what is wrong
    and how to fix it.

    @param expected_id: the database's storage id, or None when it has none.
    @param root_path: C{settings.root} resolved (symbolic links followed).
    @param mounts: the L{Mount}s of this process.
    @param marker: the marker file's id, None when it is missing, or an
        C{OSError} raised while reading it.
    """
    if not settings.shared:
        return None
    root = settings.root
    mount = mount_of(root_path, mounts)
    if mount is None or mount.fstype not in settings.fstypes:
        found = (f"{mount.fstype} mounted on {mount.point}" if mount is not None
                 else "no mount")
        return StorageError(
            f"path.storage.root {root} is not on shared storage (it is on {found}; "
            f"path.storage.shared = 1 wants one of {', '.join(settings.fstypes)}): mount the "
            f"cluster's volume there (e.g. mount -t glusterfs SERVER:/VOLUME {root}) or set "
            "path.storage.shared = 0 on a single node")
    for key, path in settings.local:
        resolved = os.path.realpath(path)
        if mount_of(resolved, mounts) == mount:
            return StorageError(
                f"{key} {path} is on the shared volume ({mount.source} on {mount.point}), "
                "but it holds this node's own trees and overlayfs cannot write to a "
                f"{mount.fstype} upper dir: set it to a local disk (below path.storage.local)")
    if isinstance(marker, OSError):
        return StorageError(
            f"cannot read the storage marker {os.path.join(root, MARKER)} on {mount.source} "
            f"({marker.strerror or marker}): is the volume's server reachable? remount "
            f"{mount.point}")
    if expected_id is None:
        return StorageError(
            "the database has no storage id (path.storage.shared = 1): run 'qvd-admin "
            f"storage init' on a node where the cluster's volume is mounted on {root}")
    if marker is None:
        return StorageError(
            f"{root} ({mount.source}) has no storage marker {MARKER}: it is not the "
            "cluster's volume, or it was never initialised; mount the cluster's volume "
            "there, or run 'qvd-admin storage init' to adopt this one")
    if marker != expected_id:
        return StorageError(
            f"{root} ({mount.source}) holds the storage of another cluster (marker "
            f"{marker}, the database's id is {expected_id}): mount this cluster's "
            "volume there, or run 'qvd-admin storage init --force' to adopt this one")
    return None


def read_marker(root):
    """
    The id in C{root}'s marker file; None when it has none. Raises
    C{OSError} when the file cannot be read for another reason (a lost
    FUSE connection: ENOTCONN).
    """
    try:
        with open(os.path.join(root, MARKER)) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def write_marker(root, storage_id):
    """Write C{storage_id} into C{root}'s marker file (atomically)."""
    path = os.path.join(root, MARKER)
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "w") as f:
        f.write(storage_id + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.chmod(temp, 0o644)
    os.rename(temp, path)


def read_mounts(mountinfo=MOUNTINFO):
    with open(mountinfo) as f:
        return parse_mountinfo(f.read())


def inspect(settings, mountinfo=MOUNTINFO):
    """
    (resolved root, mounts, marker) as L{judge} takes them; the reads of
    L{check}, which never raise for an unreachable volume.
    """
    mounts = read_mounts(mountinfo)
    try:
        root_path = os.path.realpath(settings.root)
        os.stat(root_path)
        marker = read_marker(root_path)
    except OSError as e:
        if e.errno == errno.ENOENT and not os.path.lexists(settings.root):
            root_path, marker = os.path.abspath(settings.root), None
        else:
            root_path, marker = os.path.abspath(settings.root), e
    return root_path, mounts, marker


def problem(settings, expected_id, mountinfo=MOUNTINFO):
    """The L{StorageError} describing what is wrong now, or None (see L{judge})."""
    if not settings.shared:
        return None
    return judge(settings, expected_id, *inspect(settings, mountinfo))


def check(settings, expected_id, mountinfo=MOUNTINFO):
    """Raise the L{StorageError} of L{problem}, if any."""
    error = problem(settings, expected_id, mountinfo)
    if error is not None:
        raise error
