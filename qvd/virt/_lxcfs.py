"""
Blocking file-system work of the LXC driver; the driver runs each function in
a thread (never on the reactor thread).

    lower, extra = ensure_basefs(layout, di_path, basefs_root, idmap)
    prepare_dirs(layout, persistent=False, lower=lower, idmap=idmap)
    shift_ids(tree, idmap)               # (what ensure_basefs does to a new tree)
    remove_vm_dirs(layout, persistent=False)
    leftover = kill_cgroups(name)
"""

import contextlib
import glob
import os
import shutil
import signal
import stat
import struct
import subprocess
import time

from qvd._locks import locked
from qvd.virt._dirs import make_dirs
from qvd.virt.interfaces import VirtError
from qvd.virt._lxcconfig import IdMap  # noqa: F401 (re-exported for callers)

CGROUP_ROOT = "/sys/fs/cgroup"
_CAPS = "security.capability"
_ACLS = ("system.posix_acl_access", "system.posix_acl_default")
_ACL_USER, _ACL_GROUP = 0x02, 0x08
_VFS_CAP_REVISION_2, _VFS_CAP_REVISION_3 = 0x02000000, 0x03000000


def _shift_caps(value, idmap):
    """
    A file capability xattr made a v3 one whose root is the containers'
    root (honoured inside the containers only); None if it is not one.
    """
    if len(value) < 20:
        return None
    (magic,) = struct.unpack_from("<I", value)
    if magic & 0xFF000000 == _VFS_CAP_REVISION_2:
        body = struct.pack("<I", _VFS_CAP_REVISION_3 | (magic & 0x00FFFFFF)) + value[4:20]
        return body + struct.pack("<I", idmap.uid)
    if magic & 0xFF000000 == _VFS_CAP_REVISION_3 and len(value) >= 24:
        (root,) = struct.unpack_from("<I", value, 20)
        return value[:20] + struct.pack("<I", idmap.host_uid(root))
    return None


def _shift_acl(value, idmap):
    """A POSIX ACL xattr with its named users' and groups' ids shifted."""
    if len(value) < 4 or (len(value) - 4) % 8:
        return value
    out = bytearray(value)
    for at in range(4, len(value), 8):
        tag, _perm, ident = struct.unpack_from("<HHI", value, at)
        if tag == _ACL_USER:
            struct.pack_into("<I", out, at + 4, idmap.host_uid(ident))
        elif tag == _ACL_GROUP:
            struct.pack_into("<I", out, at + 4, idmap.host_gid(ident))
    return bytes(out)


def _xattrs(path, names):
    found = {}
    try:
        present = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return found
    for name in names:
        if name in present:
            with contextlib.suppress(OSError):
                found[name] = os.getxattr(path, name, follow_symlinks=False)
    return found


def shift_ids(tree, idmap):
    """
    Shift the owner of every file of C{tree} (not crossing mounts) into the
    containers' range: id C{n < idmap.count} becomes C{idmap.uid + n} (gid
    likewise); ids already outside (shifted ones) stay. setuid/setgid bits
    survive (chown clears them), file capabilities become v3 ones rooted at
    the containers' root, and the ids named in POSIX ACLs move too. Hard
    links are shifted once. Idempotent.

    @return: the number of entries changed.
    """
    seen = set()
    changed = 0
    root_dev = os.lstat(tree).st_dev

    def shift(path):
        nonlocal changed
        st = os.lstat(path)
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            if (st.st_dev, st.st_ino) in seen:
                return
            seen.add((st.st_dev, st.st_ino))
        uid, gid = idmap.host_uid(st.st_uid), idmap.host_gid(st.st_gid)
        link = stat.S_ISLNK(st.st_mode)
        extra = {} if link else _xattrs(path, (_CAPS,) + _ACLS)
        chowned = (uid, gid) != (st.st_uid, st.st_gid)
        if chowned:
            os.lchown(path, uid, gid)
            if not link and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(path, stat.S_IMODE(st.st_mode))
            changed += 1
        for name, value in extra.items():
            if name == _CAPS:
                new = _shift_caps(value, idmap)
                if new is not None and (chowned or new != value):   # chown removed it
                    os.setxattr(path, name, new, follow_symlinks=False)
            else:
                new = _shift_acl(value, idmap)
                if new != value:
                    os.setxattr(path, name, new, follow_symlinks=False)

    shift(tree)
    for top, dirs, files in os.walk(tree):
        for name in files:
            shift(os.path.join(top, name))
        kept = []
        for name in dirs:
            path = os.path.join(top, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode) or st.st_dev != root_dev:
                if stat.S_ISLNK(st.st_mode):
                    shift(path)     # os.walk lists symlinks to dirs as dirs
                continue
            shift(path)
            kept.append(name)
        dirs[:] = kept
    return changed


def _lower_of(tree):
    """
    The root filesystem inside an unpacked DI: the tree itself ("basic"
    layout) or its C{rootfs/} ("extended" layout); None if neither holds one.
    """
    def is_root(path):
        return (os.path.isdir(os.path.join(path, "etc"))
                and any(os.path.lexists(os.path.join(path, d, "init")) or
                        os.path.isdir(os.path.join(path, d))
                        for d in ("sbin", "usr/sbin")))
    if is_root(tree):
        return tree
    if is_root(os.path.join(tree, "rootfs")):
        return os.path.join(tree, "rootfs")
    return None


def ensure_basefs(layout, di_path, basefs_root, idmap):
    """
    Unpack the DI once into C{layout.basefs} (under a lock, through a
    temporary directory renamed into place) with its ids shifted into
    C{idmap}'s range (L{shift_ids}), and return (lower dir, the DI's extra
    LXC config text). Raises L{VirtError} and leaves nothing behind when the
    DI cannot be unpacked.
    """
    name = os.path.basename(layout.basefs)
    with locked(os.path.join(basefs_root, ".locks", name + ".lock"), mode=0o600):
        if not os.path.isdir(layout.basefs):
            if not os.path.isfile(di_path):
                raise VirtError(
                    f"disk image {di_path} does not exist on this node: check "
                    f"path.storage.images (it must be shared by all nodes)")
            temp = os.path.join(
                basefs_root, f"untar-{os.getpid()}-{int(time.time())}-{os.urandom(4).hex()}")
            make_dirs(temp, 0o755)
            try:
                argv = ["tar", "-x", "-f", di_path, "-C", temp, "--numeric-owner"]
                if layout.tar_option:
                    argv.append(layout.tar_option)
                result = subprocess.run(argv, stdin=subprocess.DEVNULL,
                                        capture_output=True, text=True)
                if result.returncode != 0:
                    lines = [l for l in result.stderr.strip().splitlines() if l][-3:]
                    raise VirtError(
                        f"disk image {di_path} could not be unpacked (tar exit status "
                        f"{result.returncode}: {' / '.join(lines)}); rebuild or "
                        f"re-upload it")
                if _lower_of(temp) is None:
                    raise VirtError(
                        f"disk image {di_path} holds no root filesystem (no etc/ and "
                        f"sbin/ at its top or under rootfs/)")
                shift_ids(temp, idmap)
                os.rename(temp, layout.basefs)
            except BaseException:
                shutil.rmtree(temp, ignore_errors=True)
                raise
    lower = _lower_of(layout.basefs)
    if lower is None:
        raise VirtError(
            f"{layout.basefs} holds no root filesystem: remove it so the DI is unpacked again")
    extra = ""
    extra_path = os.path.join(layout.basefs, "lxc", "config-extra")
    if lower != layout.basefs and os.path.isfile(extra_path):
        with open(extra_path, encoding="utf-8") as f:
            extra = f.read()
    return lower, extra


def _discard(path):
    """
    Remove a directory tree quickly: rename it aside, then delete it.
    """
    if not os.path.lexists(path):
        return
    aside = f"{path}.deleteme-{os.getpid()}-{os.urandom(3).hex()}"
    try:
        os.rename(path, aside)
    except OSError:
        aside = path
    shutil.rmtree(aside, ignore_errors=True)
    if os.path.lexists(aside):
        raise VirtError(f"cannot remove {aside}: remove it by hand")


def prepare_dirs(layout, persistent, lower, idmap):
    """
    Create the VM's directories: a fresh work dir, the upper dir (emptied
    unless C{persistent}), the root mount point, the home and the container
    directory. The upper dir gets the owner and mode of the C{lower} root:
    overlayfs shows the upper dir's as those of C{/}. The home belongs to the
    containers' root; a home made for a privileged container (owned by host
    root) has its ids shifted once (L{shift_ids}). A persistent upper dir
    made before the mapping is shifted likewise.

    The container's root (an unprivileged host uid) must reach the root
    mount point, the home and the agent's secret: the container directory
    is 0711 and every parent must be searchable by others
    (L{check_searchable}).
    """
    if not persistent:
        _discard(layout.upper)
    _discard(layout.work)
    for path, mode in ((layout.upper, 0o700), (layout.work, 0o700),
                       (layout.rootfs, 0o755), (layout.container_dir, 0o711)):
        make_dirs(os.path.dirname(path))
        make_dirs(path, mode)
    os.chmod(layout.container_dir, 0o711)
    root = os.stat(lower)
    if persistent and os.stat(layout.upper).st_uid < idmap.count:
        shift_ids(layout.upper, idmap)
    os.chown(layout.upper, root.st_uid, root.st_gid)
    os.chmod(layout.upper, root.st_mode & 0o7777)
    if not os.path.isdir(layout.home_dir):
        make_dirs(os.path.dirname(layout.home_dir))
        make_dirs(layout.home_dir, 0o755)
        os.chown(layout.home_dir, idmap.uid, idmap.gid)
    elif os.stat(layout.home_dir).st_uid < idmap.count:
        shift_ids(layout.home_dir, idmap)
    check_searchable(layout.rootfs, layout.home_dir, layout.container_dir)


def open_to_containers(path):
    """
    Make qvd's own storage directory C{path} exist and be searchable by
    others (o+x: the containers' root must pass through it), repairing one
    an earlier start made under a 077 umask.
    """
    make_dirs(path)
    current = stat.S_IMODE(os.stat(path).st_mode)
    if not current & stat.S_IXOTH:
        os.chmod(path, current | stat.S_IXGRP | stat.S_IXOTH)


def check_searchable(*paths):
    """
    L{VirtError} naming the first parent directory of C{paths} that others
    cannot search (no o+x): the container's root, an unprivileged host
    user, could not reach what LXC mounts into the container.
    """
    for path in paths:
        parent = os.path.dirname(os.path.abspath(path))
        while True:
            if not os.stat(parent).st_mode & stat.S_IXOTH:
                raise VirtError(
                    f"{parent} is not searchable by others (mode "
                    f"{stat.S_IMODE(os.stat(parent).st_mode):o}): unprivileged containers "
                    f"cannot reach {path}; run chmod o+x {parent}")
            if parent == "/":
                break
            parent = os.path.dirname(parent)


def write_secret(path, text, uid=0, gid=0):
    """
    Write the agent's secret to C{path}: mode 0600, owned by the host ids
    of the container's root, replaced atomically.
    """
    tmp = f"{path}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchown(f.fileno(), uid, gid)
        f.write(text + "\n")
    os.replace(tmp, path)


def write_atomically(path, text):
    temp = f"{path}.tmp-{os.getpid()}"
    with open(temp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temp, path)


def read_text(path):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def tail(path, lines=5):
    return [l for l in read_text(path).splitlines() if l.strip()][-lines:]


def remove_vm_dirs(layout, persistent):
    """
    Remove the container directory, the work dir, the upper dir (unless
    C{persistent}) and the empty root mount point. The caller has unmounted.
    """
    shutil.rmtree(layout.container_dir, ignore_errors=True)
    _discard(layout.work)
    if not persistent:
        _discard(layout.upper)
    with contextlib.suppress(FileNotFoundError):
        os.rmdir(layout.rootfs)


def cgroup_dirs(name, root=CGROUP_ROOT):
    """
    The cgroup directories LXC made for container C{name} (payload and
    monitor, every v1 hierarchy and the v2 tree), each once.
    """
    found = {}
    for pattern in (f"{root}/*/lxc.payload.{name}", f"{root}/*/lxc.monitor.{name}",
                    f"{root}/lxc.payload.{name}", f"{root}/lxc.monitor.{name}"):
        for path in glob.glob(pattern):
            found.setdefault(os.path.realpath(path), path)
    return sorted(found)


def _procs(directory):
    pids = set()
    for sub, _, _ in os.walk(directory):
        try:
            text = read_text(os.path.join(sub, "cgroup.procs"))
        except OSError:     # ENODEV: the cgroup went while we read it
            continue
        for line in text.split():
            if line.isdigit():
                pids.add(int(line))
    return pids


def kill_cgroups(name, root=CGROUP_ROOT, grace=2.0, wait=2.0):
    """
    Wait up to C{grace} seconds for the processes in container C{name}'s
    cgroups (a stopping container, LXC's monitor) to end, kill those left,
    and remove the cgroups.

    @return: the cgroup directories that could not be removed.
    """
    dirs = cgroup_dirs(name, root)
    graceful = time.monotonic() + grace
    deadline = graceful + wait
    while dirs:
        pids = set()
        for directory in dirs:
            pids |= _procs(directory)
        if not pids:
            break
        if time.monotonic() < graceful:
            time.sleep(0.05)
            continue
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    left = []
    for directory in dirs:
        subdirs = sorted((d for d, _, _ in os.walk(directory)), key=len, reverse=True)
        for sub in subdirs:
            with contextlib.suppress(FileNotFoundError, OSError):
                os.rmdir(sub)
        if os.path.exists(directory):
            left.append(directory)
    return left
