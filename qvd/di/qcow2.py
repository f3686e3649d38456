"""
Turn a DI root filesystem into a bootable qcow2 disk image for KVM nodes.

    from qvd.di import qcow2
    # the rootfs must contain qcow2.VM_PACKAGES (the builder adds them to
    # its mmdebstrap --include list when --format qcow2 is asked for)
    qcow2.prepare_rootfs("/tmp/rootfs")                 # initramfs, fstab, network
    image = qcow2.build_image("/tmp/rootfs", "/srv/images/desktop.qcow2")
    image.path, image.kernel, image.initrd

or from the command line, from a rootfs tarball or directory:

    python -m qvd.di.qcow2 rootfs.tar desktop.qcow2

What the image is: one ext4 filesystem on the whole disk (no partition table,
the guest sees it as C{/dev/vda}), made with C{mkfs.ext4 -d} (no loop device)
and converted to qcow2. The guest's kernel and initramfs are also written
next to the image as C{<image>.kernel} and C{<image>.initrd}: the KVM driver
boots them directly (no boot loader), which is much faster under TCG. When
the kernel was built with PVH support the C{.kernel} file is the uncompressed
ELF C{vmlinux} (QEMU enters it directly: about 2 s less of decompression in
software emulation), else the C{vmlinuz} itself.

What L{prepare_rootfs} changes in the tree: a small initramfs (only the
virtio and ext4 modules, and no udev: 1.7 s instead of 7 s under a loaded
TCG), the units and generators an LXC rootfs masks (L{qvd.di.recipe})
unmasked, C{/etc/fstab} with C{/dev/vda} as root, and systemd-networkd plus systemd-network-generator enabled: the
driver passes the VM's static address as C{ip=<ip>::<gw>:<mask>:<host>:eth0:off}
on the kernel command line (L{qvd.virt._domain}) and the generator turns it
into a networkd configuration at boot. The agent's secret comes through QEMU's
fw_cfg: the C{qemu_fw_cfg} module is loaded at boot (C{/etc/modules-load.d})
and the VMA's configuration (C{/etc/qvd/vma.conf}) reads the secret from its
sysfs file (mode 0400: the guest's root only) and requires it
(L{VMA_CONF_KVM}).
"""

import os
import shutil
import subprocess
import sys
import tempfile

from qvd.bootfiles import (  # noqa: F401 (part of the builder's API)
    Image, ImageError, extract_boot_files, kernel_files, uncompressed_kernel, version_key)
from qvd.di.recipe import CONTAINER_MASKED_GENERATORS, CONTAINER_MASKED_UNITS
from qvd.protocols.simplerpc import FW_CFG_SECRET_RAW

#: Debian packages a rootfs needs to boot as a KVM guest (dbus: systemd-logind
#: needs it to act on the ACPI power button, i.e. libvirt's shutdown; fdisk and
#: e2fsprogs: the agent partitions and formats the home disk, reference 3.3).
VM_PACKAGES = ("linux-image-amd64", "initramfs-tools", "udev", "systemd-sysv", "dbus", "zstd",
               "fdisk", "e2fsprogs")

#: Kernel modules the initramfs needs to mount a virtio root.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "virtio_net", "crc32c_generic", "ext4")

#: Bumped whenever the image layout or prepare_rootfs changes (caches key on it).
LAYOUT_VERSION = "qcow2-3"

#: Modules the real system loads at boot (systemd-modules-load): the fw_cfg
#: sysfs files through which the agent's secret arrives.
BOOT_MODULES = ("qemu_fw_cfg",)

_MODULES_LOAD = "# Written by qvd.di.qcow2: the agent's secret arrives through fw_cfg.\n"

#: Appended to the image's /etc/qvd/vma.conf: the KVM driver hands the secret
#: over as a fw_cfg entry (qvd.virt.kvm), the VMA reads it there and refuses
#: every call without it.
VMA_CONF_KVM = f"""\
# Written by qvd.di.qcow2: a KVM desktop's agent secret is the fw_cfg entry the
# node's HKD gives QEMU; only the guest's root can read it. No secret, no call.
vma.secret.file = {FW_CFG_SECRET_RAW}
vma.secret.required = 1
"""

_INITRAMFS_CONF = """\
# Written by qvd.di.qcow2: a small initramfs for KVM desktops (virtio root).
MODULES=list
BUSYBOX=n
COMPRESS=gzip
"""

_FSTAB = """\
# Written by qvd.di.qcow2: the KVM guest's root is the whole virtio disk.
/dev/vda / ext4 rw,noatime,errors=remount-ro 0 1
"""

# initramfs-tools' udev scripts take seconds under TCG; with devtmpfs and the
# modules loaded from the list, /dev/vda exists without udev. Scripts under
# /etc/initramfs-tools/scripts replace those of the same name.
_NO_UDEV_SCRIPT = """\
#!/bin/sh
# Written by qvd.di.qcow2: no udev in the KVM initramfs (devtmpfs is enough
# for a virtio root; the real system starts udev itself).
case "$1" in prereqs) exit 0;; esac
exit 0
"""

# Units an LXC-oriented rootfs may mask that a KVM guest needs: every unit
# and generator qvd-di masks for containers (qvd.di.recipe), and a few more.
_UNMASK = tuple(sorted(set(CONTAINER_MASKED_UNITS) | {
    "systemd-udevd.service", "systemd-udev-trigger.service", "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket", "systemd-modules-load.service", "systemd-remount-fs.service",
    "getty@tty1.service", "serial-getty@ttyS0.service",
}))

_ENABLE = (
    ("multi-user.target.wants", "systemd-networkd.service"),
    ("sockets.target.wants", "systemd-networkd.socket"),
    ("sysinit.target.wants", "systemd-network-generator.service"),
)


def kernel_version(rootfs):
    """
    The version of the newest kernel installed in C{rootfs}.

    @raise ImageError: no kernel is installed.
    """
    modules = os.path.join(rootfs, "lib", "modules")
    versions = sorted(
        (v for v in (os.listdir(modules) if os.path.isdir(modules) else ())
         if os.path.exists(os.path.join(rootfs, "boot", f"vmlinuz-{v}"))),
        key=version_key)
    if not versions:
        raise ImageError(
            f"no kernel in {rootfs}/boot: build the rootfs with the packages "
            f"{', '.join(VM_PACKAGES)} (qvd.di.qcow2.VM_PACKAGES)")
    return versions[-1]


def prepare_rootfs(rootfs, run=subprocess.run):
    """
    Make the tree C{rootfs} bootable as a KVM guest: small initramfs, fstab,
    systemd-networkd configured from the kernel command line, the agent's
    secret read from fw_cfg (L{BOOT_MODULES}, L{VMA_CONF_KVM}).

    @param run: L{subprocess.run} or a stand-in (tests).
    @return: the kernel version.
    """
    version = kernel_version(rootfs)
    conf_dir = os.path.join(rootfs, "etc", "initramfs-tools")
    os.makedirs(os.path.join(conf_dir, "conf.d"), exist_ok=True)
    with open(os.path.join(conf_dir, "conf.d", "qvd-kvm"), "w") as f:
        f.write(_INITRAMFS_CONF)
    with open(os.path.join(conf_dir, "modules"), "w") as f:
        f.write("# Written by qvd.di.qcow2\n" + "\n".join(INITRAMFS_MODULES) + "\n")
    for stage in ("init-top", "init-bottom"):
        d = os.path.join(conf_dir, "scripts", stage)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "udev"), "w") as f:
            f.write(_NO_UDEV_SCRIPT)
        os.chmod(os.path.join(d, "udev"), 0o755)
    masked = [os.path.join(rootfs, "etc", "systemd", "system", unit) for unit in _UNMASK]
    masked += [os.path.join(rootfs, "etc", "systemd", "system-generators", generator)
               for generator in CONTAINER_MASKED_GENERATORS]
    for path in masked:
        if os.path.islink(path) and os.readlink(path) == "/dev/null":
            os.unlink(path)
    with open(os.path.join(rootfs, "etc", "fstab"), "w") as f:
        f.write(_FSTAB)
    os.makedirs(os.path.join(rootfs, "etc", "modules-load.d"), exist_ok=True)
    with open(os.path.join(rootfs, "etc", "modules-load.d", "qvd-kvm.conf"), "w") as f:
        f.write(_MODULES_LOAD + "\n".join(BOOT_MODULES) + "\n")
    vma_conf = os.path.join(rootfs, "etc", "qvd", "vma.conf")
    os.makedirs(os.path.dirname(vma_conf), exist_ok=True)
    try:
        with open(vma_conf) as f:
            current = f.read()
    except FileNotFoundError:
        current = ""
    if VMA_CONF_KVM not in current:
        with open(vma_conf, "a") as f:
            f.write(("\n" if current and not current.endswith("\n") else "") + VMA_CONF_KVM)
    for wants, unit in _ENABLE:
        d = os.path.join(rootfs, "etc", "systemd", "system", wants)
        os.makedirs(d, exist_ok=True)
        link = os.path.join(d, unit)
        if not os.path.lexists(link):
            os.symlink(f"/lib/systemd/system/{unit}", link)
    result = run(["chroot", rootfs, "mkinitramfs", "-o", f"/boot/initrd.img-{version}", version],
                 capture_output=True, text=True)
    if result.returncode != 0:
        raise ImageError(f"mkinitramfs {version} failed in {rootfs}: {result.stderr.strip()[-500:]}")
    return version


def _du_mb(path):
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files + dirs:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total // (1 << 20)


def build_image(rootfs, out, size_mb=None, free_mb=1024, run=subprocess.run):
    """
    Write the tree C{rootfs} (already through L{prepare_rootfs}) as the qcow2
    image C{out}, and its kernel and initramfs next to it.

    @param size_mb: size of the guest's root filesystem; default the tree's
        size plus C{free_mb}.
    @return: an L{Image}.
    """
    version = kernel_version(rootfs)
    initrd_src = os.path.join(rootfs, "boot", f"initrd.img-{version}")
    if not os.path.exists(initrd_src):
        raise ImageError(f"no initramfs {initrd_src}: run prepare_rootfs first")
    if size_mb is None:
        size_mb = int(_du_mb(rootfs) * 1.15) + free_mb
    out = os.path.abspath(out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fd, raw = tempfile.mkstemp(prefix=".qvd-di-", suffix=".raw", dir=os.path.dirname(out))
    os.close(fd)
    try:
        for argv in (["mkfs.ext4", "-q", "-F", "-L", "qvdroot", "-d", rootfs, raw, f"{size_mb}M"],
                     ["qemu-img", "convert", "-O", "qcow2", raw, out + ".part"]):
            result = run(argv, capture_output=True, text=True)
            if result.returncode != 0:
                raise ImageError(f"{argv[0]} failed building {out}: {result.stderr.strip()[-500:]}")
    finally:
        os.unlink(raw)
    kernel, initrd = kernel_files(out)
    with open(os.path.join(rootfs, "boot", f"vmlinuz-{version}"), "rb") as f:
        vmlinuz = f.read()
    with open(kernel + ".part", "wb") as f:
        f.write(uncompressed_kernel(vmlinuz) or vmlinuz)
    shutil.copyfile(initrd_src, initrd + ".part")
    for path in (kernel, initrd, out):
        os.chmod(path + ".part", 0o644)
        os.replace(path + ".part", path)
    return Image(out, kernel, initrd, version)


def build_from_tarball(tarball, out, size_mb=None):
    """
    L{prepare_rootfs} and L{build_image} on the rootfs tarball C{tarball}
    (the LXC DI format), unpacked in a temporary directory next to C{out}.
    """
    work = tempfile.mkdtemp(prefix=".qvd-di-rootfs-", dir=os.path.dirname(os.path.abspath(out)))
    try:
        result = subprocess.run(["tar", "-xf", tarball, "-C", work, "--numeric-owner"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise ImageError(f"cannot unpack {tarball}: {result.stderr.strip()[-300:]}")
        prepare_rootfs(work)
        return build_image(work, out, size_mb)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv=None):
    """
    C{python -m qvd.di.qcow2 ROOTFS(.tar*|dir) OUT.qcow2}: build a KVM image.
    """
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m qvd.di.qcow2 ROOTFS.tar|ROOTFS_DIR OUT.qcow2", file=sys.stderr)
        return 2
    source, out = argv
    try:
        if os.path.isdir(source):
            prepare_rootfs(source)
            image = build_image(source, out)
        else:
            image = build_from_tarball(source, out)
    except (ImageError, OSError) as e:
        print(f"qvd-di: {e}", file=sys.stderr)
        return 1
    print(f"{image.path}\n{image.kernel}\n{image.initrd}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
