"""
Tests for L{qvd.di.qcow2}: making a rootfs bootable under KVM and writing it
as a qcow2 image with its kernel and initramfs beside it.
"""

import lzma
import os
import shutil
import struct
import subprocess

from twisted.trial import unittest

from qvd.di import qcow2


def elf_with_notes(notes):
    """
    A minimal ELF64 image with one PT_NOTE segment holding C{notes}
    (a list of (name, type, desc)).
    """
    body = b""
    for name, ntype, desc in notes:
        n = name + b"\0"
        body += struct.pack("<III", len(n), len(desc), ntype)
        body += n + b"\0" * (-len(n) % 4) + desc + b"\0" * (-len(desc) % 4)
    ehdr = bytearray(64)
    ehdr[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", ehdr, 0x20, 64)          # e_phoff
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)      # e_phentsize, e_phnum
    phdr = struct.pack("<IIQQQQQQ", 4, 0, 64 + 56, 0, 0, len(body), len(body), 4)
    return bytes(ehdr) + phdr + body


def make_rootfs(path, version="6.1.0-9-amd64"):
    os.makedirs(os.path.join(path, "boot"))
    os.makedirs(os.path.join(path, "lib", "modules", version))
    os.makedirs(os.path.join(path, "etc", "systemd", "system"))
    with open(os.path.join(path, "boot", f"vmlinuz-{version}"), "wb") as f:
        f.write(b"MZ not a real kernel")
    return version


class KernelTests(unittest.TestCase):

    def test_pvhKernelIsUncompressed(self):
        """
        An xz-compressed ELF with the Xen PVH entry note (type 18) is
        extracted from the bzImage bytes around it.
        """
        elf = elf_with_notes([(b"GNU", 3, b"abcd"), (b"Xen", 18, b"\0" * 4)])
        vmlinuz = b"MZ\0setup" + b"\x11" * 100 + lzma.compress(elf, format=lzma.FORMAT_XZ) + b"\0" * 8
        self.assertEqual(qcow2.uncompressed_kernel(vmlinuz), elf)

    def test_noPvhNote(self):
        """
        An ELF without the PVH note is not used (QEMU could not boot it).
        """
        elf = elf_with_notes([(b"Xen", 17, b"\0" * 4)])
        self.assertIsNone(qcow2.uncompressed_kernel(b"MZ" + lzma.compress(elf, format=lzma.FORMAT_XZ)))

    def test_notXz(self):
        """
        A kernel compressed otherwise is kept as it is.
        """
        self.assertIsNone(qcow2.uncompressed_kernel(b"MZ" + b"\x1f\x8b" + b"x" * 100))

    def test_noKernel(self):
        """
        A rootfs without a kernel is refused, naming the packages it needs.
        """
        root = self.mktemp()
        os.makedirs(root)
        e = self.assertRaises(qcow2.ImageError, qcow2.kernel_version, root)
        self.assertIn("linux-image-amd64", str(e))

    def test_newestKernel(self):
        """
        The newest kernel (by version, not by text) that has both its
        modules and its vmlinuz is chosen.
        """
        root = self.mktemp()
        make_rootfs(root, "6.1.0-9-amd64")
        os.makedirs(os.path.join(root, "lib", "modules", "6.1.0-11-amd64"))
        os.makedirs(os.path.join(root, "lib", "modules", "6.1.0-10-amd64"))
        open(os.path.join(root, "boot", "vmlinuz-6.1.0-10-amd64"), "w").close()
        self.assertEqual(qcow2.kernel_version(root), "6.1.0-10-amd64")


class PrepareTests(unittest.TestCase):

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.version = make_rootfs(self.root)
        self.calls = []

    def run_(self, argv, **kw):
        self.calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    def read(self, *parts):
        with open(os.path.join(self.root, *parts)) as f:
            return f.read()

    def test_prepare(self):
        """
        prepare_rootfs writes a list-only initramfs configuration with the
        virtio modules, fstab on /dev/vda, no-udev initramfs scripts,
        enables networkd and its generator, and rebuilds the initramfs in a
        chroot.
        """
        self.assertEqual(qcow2.prepare_rootfs(self.root, run=self.run_), self.version)
        self.assertIn("MODULES=list", self.read("etc", "initramfs-tools", "conf.d", "qvd-kvm"))
        self.assertIn("virtio_blk", self.read("etc", "initramfs-tools", "modules").split())
        self.assertIn("/dev/vda / ext4", self.read("etc", "fstab"))
        self.assertIn("exit 0", self.read("etc", "initramfs-tools", "scripts", "init-top", "udev"))
        link = os.path.join(self.root, "etc", "systemd", "system", "sysinit.target.wants",
                            "systemd-network-generator.service")
        self.assertEqual(os.readlink(link), "/lib/systemd/system/systemd-network-generator.service")
        self.assertEqual(self.calls, [["chroot", self.root, "mkinitramfs", "-o",
                                       f"/boot/initrd.img-{self.version}", self.version]])

    def test_unmask(self):
        """
        What an LXC-oriented rootfs masks for containers (udev, sysctl, TRIM,
        the disk generators...) is unmasked; other masks stay (apt's timers:
        a desktop does not update itself).
        """
        system = os.path.join(self.root, "etc", "systemd", "system")
        generators = os.path.join(self.root, "etc", "systemd", "system-generators")
        os.makedirs(generators, exist_ok=True)
        for unit in ("systemd-udevd.service", "systemd-sysctl.service", "fstrim.timer",
                     "apt-daily.service", "apt-daily.timer"):
            os.symlink("/dev/null", os.path.join(system, unit))
        os.symlink("/dev/null", os.path.join(generators, "systemd-cryptsetup-generator"))
        qcow2.prepare_rootfs(self.root, run=self.run_)
        for unit in ("systemd-udevd.service", "systemd-sysctl.service", "fstrim.timer"):
            self.assertFalse(os.path.lexists(os.path.join(system, unit)), unit)
        self.assertFalse(os.path.lexists(os.path.join(generators, "systemd-cryptsetup-generator")))
        self.assertTrue(os.path.lexists(os.path.join(system, "apt-daily.service")))
        self.assertTrue(os.path.lexists(os.path.join(system, "apt-daily.timer")))

    def test_prepareIdempotent(self):
        """
        Preparing twice is harmless.
        """
        qcow2.prepare_rootfs(self.root, run=self.run_)
        qcow2.prepare_rootfs(self.root, run=self.run_)
        self.assertEqual(self.read("etc", "qvd", "vma.conf").count("vma.secret.required"), 1)

    def test_agentSecretFromFwCfg(self):
        """
        The guest loads qemu_fw_cfg at boot and the image's VMA reads its
        secret from the fw_cfg entry's sysfs file and requires it; the
        keys are appended after those the image builder wrote (the last
        one counts).
        """
        from qvd.config import parse_properties
        os.makedirs(os.path.join(self.root, "etc", "qvd"))
        with open(os.path.join(self.root, "etc", "qvd", "vma.conf"), "w") as f:
            f.write("vma.port = 3030\nvma.secret.required = 0")
        qcow2.prepare_rootfs(self.root, run=self.run_)
        self.assertIn("qemu_fw_cfg", self.read("etc", "modules-load.d", "qvd-kvm.conf").split())
        conf = parse_properties(self.read("etc", "qvd", "vma.conf"))
        self.assertEqual(conf, {
            "vma.port": "3030", "vma.secret.required": "1",
            "vma.secret.file": "/sys/firmware/qemu_fw_cfg/by_name/opt/org.qvd/vma.secret/raw"})

    def test_mkinitramfsFails(self):
        """
        A failing mkinitramfs is reported with its error output.
        """
        def fail(argv, **kw):
            return subprocess.CompletedProcess(argv, 1, "", "E: no such module virtio_blk")
        e = self.assertRaises(qcow2.ImageError, qcow2.prepare_rootfs, self.root, run=fail)
        self.assertIn("no such module virtio_blk", str(e))


class BuildTests(unittest.TestCase):

    def test_build(self):
        """
        build_image writes an ext4 filesystem as qcow2 plus .kernel and
        .initrd next to it, world-readable.
        """
        for tool in ("mkfs.ext4", "qemu-img"):
            if shutil.which(tool) is None:
                raise unittest.SkipTest(f"{tool} is not installed")
        root = os.path.abspath(self.mktemp())
        version = make_rootfs(root)
        with open(os.path.join(root, "boot", f"initrd.img-{version}"), "wb") as f:
            f.write(b"initrd")
        out = os.path.join(os.path.abspath(self.mktemp()), "di.qcow2")
        image = qcow2.build_image(root, out, size_mb=16)
        self.assertEqual((image.kernel, image.initrd), qcow2.kernel_files(out))
        info = subprocess.run(["qemu-img", "info", out], capture_output=True, text=True).stdout
        self.assertIn("file format: qcow2", info)
        self.assertIn("virtual size: 16 MiB", info)
        with open(image.kernel, "rb") as f:
            self.assertEqual(f.read(), b"MZ not a real kernel")
        self.assertEqual(os.stat(image.initrd).st_mode & 0o777, 0o644)
        self.assertEqual(sorted(os.listdir(os.path.dirname(out))),
                         ["di.qcow2", "di.qcow2.initrd", "di.qcow2.kernel"])

    def test_extractBootFiles(self):
        """
        The kernel and initramfs are copied back out of a built image (for
        a DI registered without its .kernel and .initrd).
        """
        for tool in ("mkfs.ext4", "qemu-img", "debugfs"):
            if shutil.which(tool) is None:
                raise unittest.SkipTest(f"{tool} is not installed")
        root = os.path.abspath(self.mktemp())
        version = make_rootfs(root)
        with open(os.path.join(root, "boot", f"initrd.img-{version}"), "wb") as f:
            f.write(b"initrd bytes")
        out = os.path.join(os.path.abspath(self.mktemp()), "di.qcow2")
        qcow2.build_image(root, out, size_mb=16)
        cache = os.path.abspath(self.mktemp())
        image = qcow2.extract_boot_files(out, os.path.join(cache, "k"), os.path.join(cache, "i"))
        self.assertEqual(image.kernel_version, version)
        with open(image.kernel, "rb") as f:
            self.assertEqual(f.read(), b"MZ not a real kernel")
        with open(image.initrd, "rb") as f:
            self.assertEqual(f.read(), b"initrd bytes")
        self.assertEqual(sorted(os.listdir(cache)), ["i", "k"])

    def test_extractFromImageWithoutKernel(self):
        """
        An image without /boot/vmlinuz-* is refused, saying how to build one.
        """
        for tool in ("qemu-img", "debugfs"):
            if shutil.which(tool) is None:
                raise unittest.SkipTest(f"{tool} is not installed")
        out = os.path.join(os.path.abspath(self.mktemp()), "empty.qcow2")
        os.makedirs(os.path.dirname(out))
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", out, "16M"], check=True)
        e = self.assertRaises(qcow2.ImageError, qcow2.extract_boot_files, out,
                              out + ".k", out + ".i")
        self.assertIn("qvd-di build --format qcow2", str(e))
        self.assertEqual(os.listdir(os.path.dirname(out)), ["empty.qcow2"])


class CLITests(unittest.TestCase):

    def setUp(self):
        from qvd.di import cli
        self.cli = cli
        self.built = []
        self.converted = []
        self.patch(cli.os, "geteuid", lambda: 0)
        self.patch(cli.sys, "stderr", __import__("io").StringIO())
        self.patch(cli, "build_image", self.fake_build)
        self.patch(cli.qcow2, "build_from_tarball", self.fake_convert)

    def fake_build(self, recipe, output, source, cache, progress, quiet=False):
        self.built.append((recipe, output))
        open(output, "w").close()
        return output

    def fake_convert(self, tarball, out, size_mb=None):
        self.converted.append((tarball, out))
        return qcow2.Image(out, out + ".kernel", out + ".initrd", "6.1")

    def test_qcow2Format(self):
        """
        qvd-di build --format qcow2 builds the rootfs with the VM packages,
        converts it next to the output and removes the intermediate tarball.
        """
        out = os.path.join(os.path.abspath(self.mktemp()), "desk.qcow2")
        os.makedirs(os.path.dirname(out))
        self.assertEqual(self.cli.main(["build", "--desktop", "minimal", "--format", "qcow2",
                                        "-o", out]), 0)
        [(recipe, tarball)] = self.built
        self.assertTrue(set(qcow2.VM_PACKAGES) <= set(recipe.packages))
        self.assertEqual(self.converted, [(tarball, out)])
        self.assertEqual(os.listdir(os.path.dirname(out)), [])

    def test_formatFromExtension(self):
        """
        An output ending in .qcow2 means --format qcow2; .tar stays a tarball
        without the VM packages.
        """
        out = os.path.join(os.path.abspath(self.mktemp()), "desk.tar")
        os.makedirs(os.path.dirname(out))
        self.assertEqual(self.cli.main(["build", "--desktop", "minimal", "-o", out]), 0)
        self.assertNotIn("linux-image-amd64", self.built[0][0].packages)
        self.assertEqual(self.converted, [])

    def test_wrongExtension(self):
        """
        A qcow2 build whose output does not end in .qcow2 is refused.
        """
        self.assertEqual(self.cli.main(["build", "--format", "qcow2", "-o", "/tmp/x.tar"]), 1)
        self.assertEqual(self.built, [])
