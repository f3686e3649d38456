"""
The libvirt domain of a KVM desktop, as pure functions of values.

    settings = DomainSettings(accel="qemu", prefix="qvd-", ...)
    boot = BootFiles(kernel="/images/7-deb.qcow2.kernel", initrd="...initrd")
    disks = DomainDisks(root="/overlays/7-12-overlay.qcow2", home=None)
    xml = domain_xml(spec, settings, boot, disks, secret_file="/run/qvd/kvm/qvd-12.vma-secret")

Nothing here touches libvirt, files or the clock: the driver (L{qvd.virt.kvm})
resolves paths and the acceleration, these functions only build text.

Guest network configuration: static, on the kernel command line, in the
dracut/kernel syntax C{ip=<ip>::<gateway>:<netmask>:<hostname>:eth0:off}
plus C{net.ifnames=0} (so the NIC is called eth0). The image enables
systemd-network-generator, which turns that option into a systemd-networkd
configuration at boot (L{qvd.di.qcow2}); no DHCP server is needed on the
node bridge.

The agent's secret (L{qvd.protocols.simplerpc}) reaches the guest as the
fw_cfg entry C{opt/org.qvd/vma.secret} read by QEMU from a file (QEMU's
command line names the file, never the secret).
"""

import re
import xml.etree.ElementTree as ET
from xml.sax.saxutils import escape, quoteattr

import attrs

from qvd.protocols.simplerpc import FW_CFG_SECRET

ACCELS = ("kvm", "qemu")
_HOSTNAME = re.compile(r"[^A-Za-z0-9-]")


@attrs.frozen
class DomainSettings:
    """
    The node-wide part of every domain (from the C{vm.kvm.*} keys).

    @ivar accel: libvirt domain type: C{kvm} (hardware) or C{qemu} (TCG).
    @ivar prefix: domain name prefix (C{vm.kvm.domain.prefix}).
    @ivar tap_prefix: tap device prefix (C{vm.kvm.tap.prefix}).
    @ivar cpus: virtual CPUs.
    @ivar machine: QEMU machine type.
    @ivar emulator: QEMU binary, or empty for libvirt's default.
    @ivar console_dir: directory of the serial console logs.
    @ivar vnc: offer VNC on 127.0.0.1.
    @ivar cmdline_extra: appended to the kernel command line.
    @ivar guest_agent: give the domain a QEMU guest agent channel
        (C{org.qemu.guest_agent.0}).
    """
    accel: str = "qemu"
    prefix: str = "qvd-"
    tap_prefix: str = "qvdtap"
    cpus: int = 1
    machine: str = "pc"
    emulator: str = ""
    console_dir: str = "/var/log/qvd/kvm"
    vnc: bool = False
    cmdline_extra: str = ""
    guest_agent: bool = False

    def __attrs_post_init__(self):
        if self.accel not in ACCELS:
            raise ValueError(f"domain type {self.accel!r} is neither of {ACCELS}")


@attrs.frozen
class BootFiles:
    """
    The kernel and initramfs booted directly by QEMU (taken from the DI).
    """
    kernel: str
    initrd: str = ""


@attrs.frozen
class DomainDisks:
    """
    @ivar root: the root disk (an overlay over the DI, or the DI itself).
    @ivar root_format: C{qcow2} or C{raw}.
    @ivar root_readonly: the root disk is the shared DI (no overlay).
    @ivar home: the persistent home disk (qcow2), or None.
    """
    root: str
    root_format: str = "qcow2"
    root_readonly: bool = False
    home: str | None = None


def domain_name(prefix, vm_id):
    """
    The libvirt name of VM C{vm_id}'s domain.
    """
    return f"{prefix}{int(vm_id)}"


def vm_id_of(prefix, name):
    """
    The VM id a domain name stands for, or None when the domain is not one
    of ours (other prefix, or not a number after it).
    """
    if not name.startswith(prefix):
        return None
    rest = name[len(prefix):]
    if not rest.isdigit() or (len(rest) > 1 and rest[0] == "0"):
        return None
    return int(rest)


def tap_name(tap_prefix, vm_id):
    """
    The host tap device of VM C{vm_id} (Linux allows 15 characters).
    """
    name = f"{tap_prefix}{int(vm_id)}"
    if len(name) > 15:
        raise ValueError(
            f"tap device name {name!r} is longer than 15 characters: "
            f"shorten vm.kvm.tap.prefix ({tap_prefix!r})")
    return name


def console_log(settings, vm_id):
    """
    The file the VM's serial console is written to.
    """
    return f"{settings.console_dir.rstrip('/')}/{domain_name(settings.prefix, vm_id)}-console.log"


def ip_option(spec):
    """
    The C{ip=} kernel option that configures the guest's eth0 statically.
    """
    hostname = _HOSTNAME.sub("-", spec.name)[:63].strip("-")
    return f"ip={spec.ip}::{spec.gateway}:{spec.netmask}:{hostname}:eth0:off"


def kernel_cmdline(spec, settings, readonly=False):
    """
    The guest kernel's command line: root on the virtio disk, console on the
    first serial port, the static network, then C{vm.kvm.cmdline.extra}.
    A C{readonly} root (the DI without overlay) is mounted C{ro}.
    """
    parts = ["root=/dev/vda", "ro" if readonly else "rw", "console=ttyS0",
             "net.ifnames=0", ip_option(spec)]
    if settings.cmdline_extra.strip():
        parts.append(settings.cmdline_extra.strip())
    return " ".join(parts)


def dac_owner(capabilities, domain_type):
    """
    The C{(uid, gid)} QEMU runs as for domains of C{domain_type}, from the
    DAC base label (C{+64055:+64055}) in libvirt's host C{capabilities}
    XML, or None when libvirt names none (no DAC driver: QEMU runs as the
    caller).
    """
    try:
        root = ET.fromstring(capabilities)
    except ET.ParseError:
        return None
    for model in root.iterfind("host/secmodel"):
        if model.findtext("model") != "dac":
            continue
        for label in model.iterfind("baselabel"):
            if label.get("type") == domain_type:
                found = re.fullmatch(r"\+?(\d+):\+?(\d+)", (label.text or "").strip())
                if found:
                    return int(found.group(1)), int(found.group(2))
    return None


def domain_xml(spec, settings, boot, disks, secret_file=""):
    """
    The libvirt domain XML of the VM described by C{spec} (a
    L{qvd.virt.interfaces.VMSpec}).

    The domain powers off on a guest power-off and on a crash (the HKD
    decides what follows), reboots in place, has ACPI (needed for a guest
    power-off and for libvirt's shutdown), a virtio root disk C{vda}, an
    optional virtio home disk C{vdb} (reference 3.3: the VMA formats it), a
    virtio NIC on C{spec.bridge} with C{spec.mac} and the tap named
    L{tap_name}, the serial console in L{console_log}, and no USB, balloon
    or video (lighter under TCG). With C{secret_file} the guest finds that
    file's content as the fw_cfg entry C{opt/org.qvd/vma.secret}; with
    C{settings.guest_agent} the domain has a guest agent channel.
    """
    name = domain_name(settings.prefix, spec.vm_id)
    a = quoteattr
    lines = [
        f"<domain type={a(settings.accel)}>",
        f"  <name>{escape(name)}</name>",
        f"  <title>{escape(f'qvd/{spec.vm_id}/{spec.name}')}</title>",
        f"  <memory unit='MiB'>{int(spec.memory)}</memory>",
        f"  <vcpu>{int(settings.cpus)}</vcpu>",
        # libvirt puts the domain in a cgroup of its own, which by default
        # weighs like one task: give it one task's weight per vCPU.
        f"  <cputune><shares>{1024 * int(settings.cpus)}</shares></cputune>",
    ]
    if secret_file:
        lines += [
            "  <sysinfo type='fwcfg'>",
            f"    <entry name={a(FW_CFG_SECRET)} file={a(secret_file)}/>",
            "  </sysinfo>",
        ]
    lines += [
        "  <os>",
        f"    <type arch='x86_64' machine={a(settings.machine)}>hvm</type>",
        f"    <kernel>{escape(boot.kernel)}</kernel>",
    ]
    if boot.initrd:
        lines.append(f"    <initrd>{escape(boot.initrd)}</initrd>")
    lines += [
        f"    <cmdline>{escape(kernel_cmdline(spec, settings, disks.root_readonly))}</cmdline>",
        "  </os>",
        "  <features><acpi/></features>",
    ]
    if settings.accel == "kvm":
        lines.append("  <cpu mode='host-passthrough'/>")
    lines += [
        "  <clock offset='utc'/>",
        "  <on_poweroff>destroy</on_poweroff>",
        "  <on_reboot>restart</on_reboot>",
        "  <on_crash>destroy</on_crash>",
        "  <devices>",
    ]
    if settings.emulator:
        lines.append(f"    <emulator>{escape(settings.emulator)}</emulator>")
    lines += [
        "    <disk type='file' device='disk'>",
        f"      <driver name='qemu' type={a(disks.root_format)}/>",
        f"      <source file={a(disks.root)}/>",
        "      <target dev='vda' bus='virtio'/>",
    ]
    if disks.root_readonly:
        lines.append("      <readonly/>")
    lines.append("    </disk>")
    if disks.home:
        lines += [
            "    <disk type='file' device='disk'>",
            "      <driver name='qemu' type='qcow2'/>",
            f"      <source file={a(disks.home)}/>",
            "      <target dev='vdb' bus='virtio'/>",
            "    </disk>",
        ]
    lines += [
        "    <interface type='bridge'>",
        f"      <mac address={a(spec.mac.lower())}/>",
        f"      <source bridge={a(spec.bridge)}/>",
        f"      <target dev={a(tap_name(settings.tap_prefix, spec.vm_id))}/>",
        "      <model type='virtio'/>",
        "      <driver name='qemu'/>",
        "    </interface>",
        "    <serial type='file'>",
        f"      <source path={a(console_log(settings, spec.vm_id))}/>",
        "      <target port='0'/>",
        "    </serial>",
        "    <controller type='usb' model='none'/>",
        "    <memballoon model='none'/>",
    ]
    if settings.guest_agent:
        lines += [
            "    <channel type='unix'>",
            "      <target type='virtio' name='org.qemu.guest_agent.0'/>",
            "    </channel>",
        ]
    if settings.vnc:
        lines += [
            "    <graphics type='vnc' autoport='yes' listen='127.0.0.1'>",
            "      <listen type='address' address='127.0.0.1'/>",
            "    </graphics>",
            "    <video><model type='vga'/></video>",
        ]
    lines += [
        "  </devices>",
        "</domain>",
    ]
    return "\n".join(lines) + "\n"
