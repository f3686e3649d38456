"""
The boot files of KVM disk images: the kernel and initramfs stored next to
an image (L{kernel_files}), copied out of an image registered without them
(L{extract_boot_files}), and the uncompressed kernel QEMU boots faster
(L{uncompressed_kernel}).

Shared by the image builder (L{qvd.di.qcow2}, which writes them) and the KVM
driver (L{qvd.virt.kvm}, which boots them), so that the driver does not
import the builder.
"""

import lzma
import os
import re
import struct
import subprocess
import tempfile

import attrs


class ImageError(Exception):
    """
    The image cannot be built; the message says what is missing and what to do.
    """


@attrs.frozen
class Image:
    """
    A built KVM image and its direct-boot files.
    """
    path: str
    kernel: str
    initrd: str
    kernel_version: str


def kernel_files(image_path):
    """
    The C{(kernel, initrd)} paths stored next to the image C{image_path}.
    """
    return image_path + ".kernel", image_path + ".initrd"


def _has_pvh_note(elf):
    """
    Whether the ELF image C{elf} (bytes) carries the Xen PVH entry note
    (type 18) that lets QEMU boot it uncompressed.
    """
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        ptype, _flags, offset, _va, _pa, filesz = struct.unpack_from("<IIQQQQ", elf, phoff + i * phentsize)
        if ptype != 4:  # PT_NOTE
            continue
        pos, end = offset, offset + filesz
        while pos + 12 <= end:
            namesz, descsz, ntype = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and ntype == 18:
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def uncompressed_kernel(vmlinuz):
    """
    The ELF C{vmlinux} inside the bzImage bytes C{vmlinuz} when it is
    xz-compressed and has a PVH entry, else None.
    """
    start = vmlinuz.find(b"\xfd7zXZ\x00")
    while start != -1:
        try:
            elf = lzma.LZMADecompressor().decompress(vmlinuz[start:])
        except lzma.LZMAError:
            elf = b""
        if elf[:4] == b"\x7fELF":
            return elf if _has_pvh_note(elf) else None
        start = vmlinuz.find(b"\xfd7zXZ\x00", start + 1)
    return None


def version_key(v):
    """A kernel version as a sort key: its numbers compared as numbers (6.1.10 > 6.1.9)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", v)]


def extract_boot_files(image, kernel_out, initrd_out, image_format="qcow2", run=subprocess.run):
    """
    Copy the newest kernel and initramfs out of the image C{image} (an ext4
    filesystem on the whole disk, as L{build_image} writes) into
    C{kernel_out} and C{initrd_out}, for a DI registered without its
    C{.kernel}/C{.initrd} files. Needs no loop device: a qcow2 is first
    converted to a sparse raw file next to C{kernel_out} (seconds).

    @return: an L{Image} (C{initrd} empty when the image has none).
    @raise ImageError: the image has no ext4 filesystem or no kernel.
    """
    work = os.path.dirname(os.path.abspath(kernel_out))
    os.makedirs(work, exist_ok=True)
    raw, tmp = image, None
    try:
        if image_format != "raw":
            fd, tmp = tempfile.mkstemp(prefix=".qvd-boot-", suffix=".raw", dir=work)
            os.close(fd)
            result = run(["qemu-img", "convert", "-f", image_format, "-O", "raw", image, tmp],
                         capture_output=True, text=True)
            if result.returncode != 0:
                raise ImageError(f"cannot read the disk image {image}: {result.stderr.strip()[-300:]}")
            raw = tmp
        result = run(["debugfs", "-R", "ls -p /boot", raw], capture_output=True, text=True)
        names = [line.split("/")[5] for line in result.stdout.splitlines() if line.count("/") >= 6]
        kernels = sorted((n[len("vmlinuz-"):] for n in names if n.startswith("vmlinuz-")), key=version_key)
        if result.returncode != 0 or not kernels:
            raise ImageError(
                f"no /boot/vmlinuz-* in the disk image {image}: KVM images are one ext4 "
                f"filesystem with a kernel (build them with 'qvd-di build --format qcow2')")
        version = kernels[-1]
        initrd_name = f"initrd.img-{version}" if f"initrd.img-{version}" in names else ""
        for name, out in ((f"vmlinuz-{version}", kernel_out), (initrd_name, initrd_out)):
            if not name:
                continue
            result = run(["debugfs", "-R", f"dump /boot/{name} {out}.part", raw],
                         capture_output=True, text=True)
            if result.returncode != 0 or not os.path.exists(out + ".part"):
                raise ImageError(f"cannot copy /boot/{name} out of {image}: {result.stderr.strip()[-300:]}")
        with open(kernel_out + ".part", "rb") as f:
            vmlinuz = f.read()
        elf = uncompressed_kernel(vmlinuz)
        if elf is not None:
            with open(kernel_out + ".part", "wb") as f:
                f.write(elf)
        for name, out in ((True, kernel_out), (initrd_name, initrd_out)):
            if name:
                os.chmod(out + ".part", 0o644)
                os.replace(out + ".part", out)
        return Image(image, kernel_out, initrd_out if initrd_name else "", version)
    finally:
        if tmp is not None:
            os.unlink(tmp)
        for out in (kernel_out, initrd_out):
            if os.path.exists(out + ".part"):
                os.unlink(out + ".part")
