"""
A small bootable KVM test image, built once and cached under
C{/var/cache/qvd-test/kvm/<hash of its inputs>/} (the packages, the
files L{qvd.di.qcow2} writes and its C{LAYOUT_VERSION}: bump that when the
build itself changes).

    from qvd.testing import kvm_image
    path = kvm_image.test_image()   # builds it (~2 min) when missing
    # path + ".kernel" and path + ".initrd" lie next to it

The image is Debian bookworm (minbase + L{qvd.di.qcow2.VM_PACKAGES}) made
bootable by L{qvd.di.qcow2}, with a stand-in for the VMA: a unit that
answers HTTP on C{READY_PORT} (3030, the VMA's port) once the guest's
network is up. mmdebstrap runs without a mirror argument (its default mirror).
Raises L{unittest.SkipTest}-friendly L{ImageUnavailable} when it cannot be
built (no mmdebstrap, not root, no network).
"""

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile

from qvd.di import qcow2

CACHE = os.environ.get("QVD_TEST_CACHE", "/var/cache/qvd-test")
READY_PORT = 3030
EXTRA_PACKAGES = ("python3", "iproute2")
#: What tests add to the minimal KVM desktop: the QEMU guest agent, through
#: which they run commands inside the guest (L{qvd.testing.guest}; the HKD
#: gives domains its channel with C{vm.kvm.guest_agent = 1}). Product images
#: have none.
GUEST_AGENT_PACKAGES = ("qemu-guest-agent",)

_LISTENER_UNIT = """\
[Unit]
Description=qvd test stand-in for the VMA: HTTP on port 3030
After=network-online.target systemd-networkd.service
Wants=network-online.target

[Service]
ExecStart=/usr/bin/python3 -m http.server 3030 --directory /srv
Restart=always

[Install]
WantedBy=multi-user.target
"""


class ImageUnavailable(Exception):
    """
    The test image cannot be built here; the message says why.
    """


def _key():
    h = hashlib.sha256()
    for part in (qcow2.LAYOUT_VERSION, qcow2.VM_PACKAGES + EXTRA_PACKAGES, qcow2.INITRAMFS_MODULES,
                 qcow2._INITRAMFS_CONF, qcow2._NO_UDEV_SCRIPT, qcow2._FSTAB, qcow2._ENABLE,
                 qcow2._UNMASK, qcow2.BOOT_MODULES, qcow2._MODULES_LOAD, qcow2.VMA_CONF_KVM,
                 _LISTENER_UNIT):
        h.update(repr(part).encode())
    return h.hexdigest()[:16]


def _customise(rootfs):
    with open(os.path.join(rootfs, "etc", "systemd", "system", "qvd-test-listener.service"), "w") as f:
        f.write(_LISTENER_UNIT)
    wants = os.path.join(rootfs, "etc", "systemd", "system", "multi-user.target.wants")
    os.makedirs(wants, exist_ok=True)
    os.symlink("/etc/systemd/system/qvd-test-listener.service",
               os.path.join(wants, "qvd-test-listener.service"))
    os.makedirs(os.path.join(rootfs, "srv"), exist_ok=True)
    with open(os.path.join(rootfs, "srv", "index.html"), "w") as f:
        f.write("qvd kvm test image\n")
    with open(os.path.join(rootfs, "etc", "hostname"), "w") as f:
        f.write("qvd-test\n")


def test_image():
    """
    The path of the cached test image, built when missing.

    @raise ImageUnavailable: it cannot be built on this machine.
    """
    directory = os.path.join(CACHE, "kvm", _key())
    image = os.path.join(directory, "image.qcow2")
    kernel, initrd = qcow2.kernel_files(image)
    if all(os.path.exists(p) for p in (image, kernel, initrd)):
        return image
    if os.geteuid() != 0:
        raise ImageUnavailable("building the KVM test image needs root (mmdebstrap, mkfs)")
    for tool in ("mmdebstrap", "mkfs.ext4", "qemu-img"):
        if shutil.which(tool) is None:
            raise ImageUnavailable(f"{tool} is not installed (deploy/apt-packages.txt)")
    os.makedirs(directory, mode=0o755, exist_ok=True)
    os.chmod(os.path.join(CACHE, "kvm"), 0o755)
    with open(os.path.join(directory, "lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if all(os.path.exists(p) for p in (image, kernel, initrd)):
            return image
        work = tempfile.mkdtemp(prefix="rootfs-", dir=directory)
        try:
            rootfs = os.path.join(work, "rootfs")
            result = subprocess.run(
                ["mmdebstrap", "--variant=minbase", "--quiet",
                 "--include=" + ",".join(qcow2.VM_PACKAGES + EXTRA_PACKAGES),
                 "bookworm", rootfs],
                capture_output=True, text=True)
            if result.returncode != 0:
                raise ImageUnavailable(f"mmdebstrap failed: {result.stderr.strip()[-800:]}")
            _customise(rootfs)
            qcow2.prepare_rootfs(rootfs)
            qcow2.build_image(rootfs, image, free_mb=256)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return image


def minimal_kvm_image(stream=None):
    """
    The minimal test desktop of L{qvd.testing.images} (the real VMA,
    nxagent, a session painting L{qvd.testing.images.TEST_COLOUR}) built
    with L{qcow2.VM_PACKAGES} and made a bootable KVM disk; cached as
    C{/var/cache/qvd-test/kvm-minimal-<key>.qcow2} (key: the recipe's base
    and code layers and the qcow2 layout).

    @raise ImageUnavailable: it cannot be built here.
    """
    from qvd.config import Config, declared_keys
    from qvd._locks import locked
    from qvd.di.build import BuildError, Progress, build_image
    from qvd.di.recipe import Recipe
    from qvd.testing import images

    why = images.cannot_build_reason()
    if why:
        raise ImageUnavailable(why)
    config = Config(keys=declared_keys())
    recipe = Recipe.from_config(config, "minimal", images.TEST_COLOUR,
                                qcow2.VM_PACKAGES + GUEST_AGENT_PACKAGES)
    key = hashlib.sha256(
        f"{recipe.base_key()}|{recipe.code_key(images.QVD_SOURCE)}|{_key()}".encode()
    ).hexdigest()[:16]
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"kvm-minimal-{key}.qcow2")
    with locked(path + ".lock"):
        if not all(os.path.exists(p) for p in (path, *qcow2.kernel_files(path))):
            tar = path[:-len(".qcow2")] + ".rootfs.tar"
            try:
                build_image(recipe, tar, images.QVD_SOURCE, config.get("di.build.cache"),
                            Progress(stream), quiet=True)
                qcow2.build_from_tarball(tar, path)
            except (BuildError, qcow2.ImageError) as e:
                raise ImageUnavailable(f"cannot build the minimal KVM image: {e}")
            finally:
                if os.path.exists(tar):
                    os.unlink(tar)
        os.utime(path)
    images.prune(os.path.join(CACHE, "kvm-minimal-*.qcow2"), keep=2, age=PRUNE_AGE,
                 companions=qcow2.kernel_files)
    return path


#: Seconds an older cached image must have gone unused before it is removed
#: (another test run may still be booting it).
PRUNE_AGE = 900
