"""
Blocking file-system work of the LXC driver; the driver runs each function in
a thread (never on the reactor thread).

    lower, extra = ensure_basefs(layout, di_path, basefs_root)
    prepare_dirs(layout, persistent=False)
    remove_vm_dirs(layout, persistent=False)
    leftover = kill_cgroups(name)
"""

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import time

from qvd._locks import locked
from qvd.virt.interfaces import VirtError

CGROUP_ROOT = "/sys/fs/cgroup"


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


def ensure_basefs(layout, di_path, basefs_root):
    """
    Unpack the DI once into C{layout.basefs} (under a lock, through a
    temporary directory renamed into place) and return (lower dir, the DI's
    extra LXC config text). Raises L{VirtError} and leaves nothing behind when
    the DI cannot be unpacked.
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
            os.makedirs(temp)
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


def prepare_dirs(layout, persistent, lower):
    """
    Create the VM's directories: a fresh work dir, the upper dir (emptied
    unless C{persistent}), the root mount point, the home and the container
    directory. The upper dir gets the owner and mode of the C{lower} root:
    overlayfs shows the upper dir's as those of C{/}.
    """
    if not persistent:
        _discard(layout.upper)
    _discard(layout.work)
    for path in (layout.upper, layout.work, layout.rootfs, layout.container_dir):
        os.makedirs(path, mode=0o700 if path != layout.rootfs else 0o755, exist_ok=True)
    root = os.stat(lower)
    os.chown(layout.upper, root.st_uid, root.st_gid)
    os.chmod(layout.upper, root.st_mode & 0o7777)
    if not os.path.isdir(layout.home_dir):
        os.makedirs(layout.home_dir, mode=0o755)


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
        for line in read_text(os.path.join(sub, "cgroup.procs")).split():
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
