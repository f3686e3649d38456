"""
Tests for L{qvd.virt._accel}: choosing KVM or TCG (C{vm.kvm.accel}).
"""

import os
import sys

from twisted.trial import unittest

from qvd.virt import _accel
from qvd.virt._accel import Decision, HostFacts, after_probe, choose

GOOD = HostFacts(dev_kvm=True, pvm=False, cpu_virt=True)


class ChooseTests(unittest.TestCase):

    def test_explicitSettings(self):
        """
        kvm and tcg are taken as given, whatever the host looks like.
        """
        bad = HostFacts(dev_kvm=False, pvm=True, cpu_virt=False)
        self.assertEqual(choose("kvm", bad), Decision("kvm"))
        self.assertEqual(choose("tcg", GOOD), Decision("qemu"))

    def test_unknownSetting(self):
        """
        Another value is refused, naming the key and the allowed values.
        """
        e = self.assertRaises(ValueError, choose, "fast", GOOD)
        self.assertIn("vm.kvm.accel = 'fast'", str(e))
        self.assertIn("auto, kvm, tcg", str(e))

    def test_autoWithoutDevKvm(self):
        """
        auto without a usable /dev/kvm falls back to TCG with a warning that says why.
        """
        d = choose("auto", HostFacts(dev_kvm=False, pvm=False, cpu_virt=True))
        self.assertEqual(d.domain_type, "qemu")
        self.assertFalse(d.probe)
        self.assertIn("/dev/kvm is missing", d.warning)
        self.assertIn("TCG", d.warning)

    def test_autoOnPVM(self):
        """
        auto on a PVM host (this project's machines) runs TCG without a probe.
        """
        d = choose("auto", HostFacts(dev_kvm=True, pvm=True, cpu_virt=False))
        self.assertEqual(d.domain_type, "qemu")
        self.assertIn("PVM", d.warning)

    def test_autoWithoutCpuFlag(self):
        """
        auto on a CPU without vmx/svm runs TCG.
        """
        d = choose("auto", HostFacts(dev_kvm=True, pvm=False, cpu_virt=False))
        self.assertEqual(d.domain_type, "qemu")
        self.assertIn("vmx/svm", d.warning)

    def test_autoPlausibleHostProbes(self):
        """
        auto on a host that looks able to run KVM asks for a probe guest.
        """
        self.assertEqual(choose("auto", GOOD), Decision(None, probe=True))

    def test_afterProbe(self):
        """
        A probe that booted means KVM, silently; one that did not means TCG
        with a warning carrying the probe's reason.
        """
        self.assertEqual(after_probe(True), Decision("kvm"))
        d = after_probe(False, "no kernel panic within 10 s")
        self.assertEqual(d.domain_type, "qemu")
        self.assertIn("no kernel panic within 10 s", d.warning)


class HostFactsTests(unittest.TestCase):

    def test_read(self):
        """
        The facts come from /dev/kvm's access, /sys/module/kvm_pvm and the CPU flags.
        """
        tmp = self.mktemp()
        os.makedirs(os.path.join(tmp, "module", "kvm_pvm"))
        dev = os.path.join(tmp, "kvm")
        open(dev, "w").close()
        cpuinfo = os.path.join(tmp, "cpuinfo")
        with open(cpuinfo, "w") as f:
            f.write("flags\t\t: fpu vme svm\n")
        facts = HostFacts.read(dev, os.path.join(tmp, "module"), cpuinfo)
        self.assertEqual(facts, HostFacts(dev_kvm=True, pvm=True, cpu_virt=True))
        facts = HostFacts.read(dev + "-missing", os.path.join(tmp, "none"), cpuinfo + "-missing")
        self.assertEqual(facts, HostFacts(dev_kvm=False, pvm=False, cpu_virt=False))


class ProbeTests(unittest.TestCase):

    def fake(self, script):
        return [sys.executable, "-c", script]

    def test_probeArgv(self):
        """
        The probe boots the kernel under KVM, panicking and exiting without a root.
        """
        argv = _accel.probe_argv("/images/x.kernel", "")
        self.assertEqual(argv[:3], ["qemu-system-x86_64", "-accel", "kvm"])
        self.assertIn("-no-reboot", argv)
        self.assertIn("/images/x.kernel", argv)
        self.assertIn("panic=-1", argv[-1])

    def test_probeSucceedsOnPanic(self):
        """
        A guest that printed its kernel panic proves KVM works.
        """
        self.assertEqual(_accel.run_probe(self.fake("print('Kernel panic - not syncing')"), 10), (True, ""))

    def test_probeFailsOnError(self):
        """
        QEMU failing reports its exit status and last error line.
        """
        ok, why = _accel.run_probe(self.fake("import sys; sys.exit('KVM internal error')"), 10)
        self.assertFalse(ok)
        self.assertIn("KVM internal error", why)

    def test_probeTimesOut(self):
        """
        A guest that hangs (PVM's decompressor hang) fails after the timeout.
        """
        ok, why = _accel.run_probe(self.fake("import time; time.sleep(30)"), 0.5)
        self.assertFalse(ok)
        self.assertIn("within 0.5 s", why)
