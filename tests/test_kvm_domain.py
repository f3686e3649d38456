"""
Tests for L{qvd.virt._domain}: the libvirt XML of a KVM desktop.
"""

import xml.etree.ElementTree as ET

import attrs

from twisted.trial import unittest

from qvd.protocols.simplerpc import FW_CFG_SECRET
from qvd.virt._domain import (
    BootFiles, DomainDisks, DomainSettings, console_log, dac_owner, domain_name, domain_xml,
    ip_option, kernel_cmdline, tap_name, vm_id_of,
)
from qvd.virt.interfaces import VMSpec

SPEC = VMSpec(vm_id=12, name="Ana's desktop", login="ana", memory=512, di_id=7,
              di_path="/images/7-deb.qcow2", ip="10.0.255.254", mac="54:52:00:00:FF:FE",
              netmask="255.255.0.0", bridge="qvdnet", gateway="10.0.0.1")
SETTINGS = DomainSettings(accel="qemu", cpus=2, console_dir="/var/log/qvd/kvm/")
BOOT = BootFiles("/images/7-deb.qcow2.kernel", "/images/7-deb.qcow2.initrd")
DISKS = DomainDisks("/ov/7-12-overlay.qcow2")


SECRET_FILE = "/run/qvd/kvm/qvd-12.vma-secret"

CAPABILITIES = """<capabilities><host>
  <secmodel><model>none</model><doi>0</doi></secmodel>
  <secmodel><model>dac</model><doi>0</doi>
    <baselabel type='kvm'>+64055:+108</baselabel>
    <baselabel type='qemu'>+64055:+64055</baselabel>
  </secmodel>
</host></capabilities>"""


def parse(spec=SPEC, settings=SETTINGS, boot=BOOT, disks=DISKS, secret_file=""):
    return ET.fromstring(domain_xml(spec, settings, boot, disks, secret_file=secret_file))


class NamesTests(unittest.TestCase):

    def test_domainNameRoundTrip(self):
        """
        A domain is named <prefix><vm_id>, and that name gives the id back.
        """
        self.assertEqual(domain_name("qvd-", 12), "qvd-12")
        self.assertEqual(vm_id_of("qvd-", "qvd-12"), 12)

    def test_foreignDomainsAreNotOurs(self):
        """
        Domains with another prefix or no plain number after it are not VMs.
        """
        for name in ("other-12", "qvd-", "qvd-12a", "qvd-012", "qvdt-12"):
            self.assertIsNone(vm_id_of("qvd-", name), name)

    def test_tapNameTooLong(self):
        """
        A tap prefix that makes the device name longer than 15 characters is
        refused, naming the key to change.
        """
        self.assertEqual(tap_name("qvdtap", 12), "qvdtap12")
        e = self.assertRaises(ValueError, tap_name, "averylongprefix", 12)
        self.assertIn("vm.kvm.tap.prefix", str(e))

    def test_unknownAccel(self):
        """
        A domain type other than kvm or qemu is refused.
        """
        self.assertRaises(ValueError, DomainSettings, accel="xen")


class CmdlineTests(unittest.TestCase):

    def test_ipOption(self):
        """
        The guest's static network is ip=<ip>::<gw>:<mask>:<hostname>:eth0:off,
        with the VM name made a valid host name.
        """
        self.assertEqual(ip_option(SPEC), "ip=10.0.255.254::10.0.0.1:255.255.0.0:Ana-s-desktop:eth0:off")

    def test_ipOptionWithoutGateway(self):
        """
        Without a gateway the field stays empty.
        """
        spec = attrs.evolve(SPEC, gateway="", name="x")
        self.assertEqual(ip_option(spec), "ip=10.0.255.254:::255.255.0.0:x:eth0:off")

    def test_cmdline(self):
        """
        The kernel boots the virtio disk read-write with the console on the
        first serial port and eth0 named eth0, then the extra options.
        """
        line = kernel_cmdline(SPEC, DomainSettings(cmdline_extra=" quiet "))
        self.assertEqual(line.split()[:4], ["root=/dev/vda", "rw", "console=ttyS0", "net.ifnames=0"])
        self.assertTrue(line.endswith(" quiet"))

    def test_cmdlineReadonly(self):
        """
        A root disk without overlay (the shared DI) is mounted read-only.
        """
        self.assertIn(" ro ", kernel_cmdline(SPEC, SETTINGS, readonly=True))


class DomainXMLTests(unittest.TestCase):

    def test_identity(self):
        """
        The domain has the VM's name, type, memory in MiB and vCPUs.
        """
        root = parse()
        self.assertEqual(root.get("type"), "qemu")
        self.assertEqual(root.findtext("name"), "qvd-12")
        self.assertEqual(root.find("memory").get("unit"), "MiB")
        self.assertEqual(root.findtext("memory"), "512")
        self.assertEqual(root.findtext("vcpu"), "2")

    def test_cpuShares(self):
        """
        The domain's cgroup weighs like one task per vCPU (1024 shares each),
        not like a single task for all of them.
        """
        self.assertEqual(parse().findtext("cputune/shares"), "2048")
        self.assertEqual(parse(settings=DomainSettings(cpus=1)).findtext("cputune/shares"), "1024")

    def test_kvmType(self):
        """
        Under KVM the domain type is kvm and the host CPU is passed through.
        """
        root = parse(settings=DomainSettings(accel="kvm"))
        self.assertEqual(root.get("type"), "kvm")
        self.assertEqual(root.find("cpu").get("mode"), "host-passthrough")

    def test_acpiAndPowerOff(self):
        """
        ACPI is on (a guest power-off ends the domain) and power-off or crash
        destroy the domain.
        """
        root = parse()
        self.assertIsNotNone(root.find("features/acpi"))
        self.assertEqual(root.findtext("on_poweroff"), "destroy")
        self.assertEqual(root.findtext("on_crash"), "destroy")

    def test_directKernelBoot(self):
        """
        The DI's kernel and initramfs are booted directly with the command line.
        """
        os_ = parse().find("os")
        self.assertEqual(os_.findtext("kernel"), BOOT.kernel)
        self.assertEqual(os_.findtext("initrd"), BOOT.initrd)
        self.assertEqual(os_.findtext("cmdline"), kernel_cmdline(SPEC, SETTINGS))
        self.assertEqual(os_.find("type").get("machine"), "pc")

    def test_noInitrd(self):
        """
        Without an initramfs there is no initrd element.
        """
        self.assertIsNone(parse(boot=BootFiles("/k")).find("os/initrd"))

    def test_rootDiskOverlay(self):
        """
        The root disk is the qcow2 overlay on virtio vda, writable.
        """
        disks = parse().findall("devices/disk")
        self.assertEqual(len(disks), 1)
        self.assertEqual(disks[0].find("source").get("file"), DISKS.root)
        self.assertEqual(disks[0].find("driver").get("type"), "qcow2")
        self.assertEqual(disks[0].find("target").attrib, {"dev": "vda", "bus": "virtio"})
        self.assertIsNone(disks[0].find("readonly"))

    def test_rootDiskWithoutOverlay(self):
        """
        Without overlay the DI itself is attached read-only in its format.
        """
        disk = parse(disks=DomainDisks("/images/7-deb.raw", "raw", True)).find("devices/disk")
        self.assertEqual(disk.find("driver").get("type"), "raw")
        self.assertIsNotNone(disk.find("readonly"))

    def test_homeDisk(self):
        """
        A home disk is the second virtio disk, vdb (the VMA's home drive).
        """
        disks = parse(disks=DomainDisks("/ov/o.qcow2", home="/homes/12-data.qcow2")).findall("devices/disk")
        self.assertEqual([d.find("target").get("dev") for d in disks], ["vda", "vdb"])
        self.assertEqual(disks[1].find("source").get("file"), "/homes/12-data.qcow2")

    def test_network(self):
        """
        One virtio NIC with the VM's MAC on the node bridge, with a tap named
        after the VM and no vhost.
        """
        nics = parse().findall("devices/interface")
        self.assertEqual(len(nics), 1)
        nic = nics[0]
        self.assertEqual(nic.get("type"), "bridge")
        self.assertEqual(nic.find("mac").get("address"), "54:52:00:00:ff:fe")
        self.assertEqual(nic.find("source").get("bridge"), "qvdnet")
        self.assertEqual(nic.find("target").get("dev"), "qvdtap12")
        self.assertEqual(nic.find("model").get("type"), "virtio")
        self.assertEqual(nic.find("driver").get("name"), "qemu")

    def test_serialConsoleToFile(self):
        """
        The serial console is written to <console dir>/<domain>-console.log.
        """
        serial = parse().find("devices/serial")
        self.assertEqual(serial.get("type"), "file")
        self.assertEqual(serial.find("source").get("path"), "/var/log/qvd/kvm/qvd-12-console.log")
        self.assertEqual(console_log(SETTINGS, 12), "/var/log/qvd/kvm/qvd-12-console.log")

    def test_vnc(self):
        """
        VNC, when enabled, listens on 127.0.0.1 only; by default there is none.
        """
        self.assertIsNone(parse().find("devices/graphics"))
        graphics = parse(settings=DomainSettings(vnc=True)).find("devices/graphics")
        self.assertEqual(graphics.get("type"), "vnc")
        self.assertEqual(graphics.get("listen"), "127.0.0.1")

    def test_escaping(self):
        """
        Values with XML metacharacters are escaped.
        """
        spec = attrs.evolve(SPEC, name="<b>&'\"")
        root = parse(spec=spec, boot=BootFiles("/k&<'\".kernel"))
        self.assertEqual(root.findtext("title"), "qvd/12/<b>&'\"")
        self.assertEqual(root.findtext("os/kernel"), "/k&<'\".kernel")

    def test_emulator(self):
        """
        An emulator setting names the QEMU binary; without it libvirt picks.
        """
        self.assertIsNone(parse().find("devices/emulator"))
        root = parse(settings=DomainSettings(emulator="/usr/bin/qemu-system-x86_64"))
        self.assertEqual(root.findtext("devices/emulator"), "/usr/bin/qemu-system-x86_64")


class SecretTests(unittest.TestCase):
    """
    The agent's secret reaches the guest as a fw_cfg entry read from a file.
    """

    def test_fwCfgEntryFromFile(self):
        """
        With a secret file the domain has one sysinfo of type fwcfg whose
        only entry, opt/org.qvd/vma.secret, names that file and holds no
        value of its own.
        """
        root = parse(secret_file=SECRET_FILE)
        sysinfos = root.findall("sysinfo")
        self.assertEqual([s.get("type") for s in sysinfos], ["fwcfg"])
        entries = sysinfos[0].findall("entry")
        self.assertEqual([e.attrib for e in entries],
                         [{"name": "opt/org.qvd/vma.secret", "file": SECRET_FILE}])
        self.assertEqual(FW_CFG_SECRET, "opt/org.qvd/vma.secret")
        self.assertEqual((entries[0].text or "").strip(), "")

    def test_noSecretNoEntry(self):
        """
        Without a secret file (a VM started without a secret) there is no
        fwcfg sysinfo.
        """
        self.assertEqual(parse().findall("sysinfo"), [])

    def test_fwCfgNameFits(self):
        """
        The entry's name fits fw_cfg's 56-byte file names (55 and a NUL).
        """
        self.assertLessEqual(len(FW_CFG_SECRET.encode()), 55)

    def test_dacOwner(self):
        """
        QEMU's uid and gid come from the DAC base label of the domain type
        in libvirt's host capabilities.
        """
        self.assertEqual(dac_owner(CAPABILITIES, "qemu"), (64055, 64055))
        self.assertEqual(dac_owner(CAPABILITIES, "kvm"), (64055, 108))

    def test_dacOwnerUnknown(self):
        """
        Without a DAC driver (or unreadable capabilities) there is no owner
        to give the file: QEMU runs as the caller.
        """
        self.assertIsNone(dac_owner("<capabilities><host/></capabilities>", "qemu"))
        self.assertIsNone(dac_owner("<not xml", "qemu"))
        self.assertIsNone(dac_owner(CAPABILITIES.replace("+64055:+64055", "x"), "qemu"))


class GuestAgentChannelTests(unittest.TestCase):

    def test_guestAgentChannel(self):
        """
        With guest_agent the domain has a virtio channel named
        org.qemu.guest_agent.0 (libvirt picks its socket); by default none.
        """
        self.assertEqual(parse().findall("devices/channel"), [])
        channels = parse(settings=DomainSettings(guest_agent=True)).findall("devices/channel")
        self.assertEqual(len(channels), 1)
        self.assertEqual(channels[0].get("type"), "unix")
        self.assertEqual(channels[0].find("target").attrib,
                         {"type": "virtio", "name": "org.qemu.guest_agent.0"})
