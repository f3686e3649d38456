"""
Choosing the CPU acceleration of KVM desktops (C{vm.kvm.accel}).

    host = HostFacts.read()                     # files only, no process
    decision = choose(setting, host)            # pure
    if decision.probe:                          # auto on a plausible KVM host
        ok, why = run_probe(probe_argv(kernel))  # blocking: run it in a thread
        decision = after_probe(ok, why)

C{kvm} and C{tcg} are taken as given. C{auto} first looks at the host: no
usable C{/dev/kvm}, the C{kvm_pvm} module (PVM runs only guests made for it:
an ordinary kernel hangs in its decompressor or fails with "KVM internal
error"), or a CPU without vmx/svm all mean TCG at once. Otherwise a probe
proves it: the DI's own kernel is booted under KVM without a root disk and
must reach its panic (and QEMU exit, thanks to C{panic=-1 -no-reboot})
within C{vm.kvm.accel.probe_timeout}.
"""

import os
import subprocess

import attrs

SETTINGS = ("auto", "kvm", "tcg")


@attrs.frozen
class HostFacts:
    """
    What the host says about KVM, read from files.

    @ivar dev_kvm: C{/dev/kvm} exists and can be opened for reading and writing.
    @ivar pvm: the C{kvm_pvm} module is loaded.
    @ivar cpu_virt: the CPU flags include vmx or svm.
    """
    dev_kvm: bool
    pvm: bool
    cpu_virt: bool

    @classmethod
    def read(cls, dev="/dev/kvm", sys_module="/sys/module", cpuinfo="/proc/cpuinfo"):
        try:
            with open(cpuinfo) as f:
                flags = set(f.read().split())
        except OSError:
            flags = set()
        return cls(
            dev_kvm=os.access(dev, os.R_OK | os.W_OK),
            pvm=os.path.isdir(os.path.join(sys_module, "kvm_pvm")),
            cpu_virt=bool(flags & {"vmx", "svm"}))


@attrs.frozen
class Decision:
    """
    @ivar domain_type: libvirt domain type, C{kvm} or C{qemu} (TCG); None
        while a probe must decide.
    @ivar probe: a probe guest must be booted to decide.
    @ivar warning: the text to log once when falling back to TCG, or empty.
    """
    domain_type: str | None
    probe: bool = False
    warning: str = ""


def choose(setting, host):
    """
    The acceleration for C{vm.kvm.accel = setting} on a host described by
    C{host} (a L{HostFacts}).

    @raise ValueError: C{setting} is not one of L{SETTINGS}.
    """
    if setting not in SETTINGS:
        raise ValueError(f"vm.kvm.accel = {setting!r}: use one of {', '.join(SETTINGS)}")
    if setting == "kvm":
        return Decision("kvm")
    if setting == "tcg":
        return Decision("qemu")
    if not host.dev_kvm:
        why = "/dev/kvm is missing or not readable and writable"
    elif host.pvm:
        why = "/dev/kvm is PVM (kvm_pvm), which cannot run ordinary guest kernels"
    elif not host.cpu_virt:
        why = "the CPU has no vmx/svm flag"
    else:
        return Decision(None, probe=True)
    return Decision("qemu", warning=_fallback(why))


def after_probe(ok, why=""):
    """
    The decision once the probe guest booted (C{ok}) or not (C{why}).
    """
    if ok:
        return Decision("kvm")
    return Decision("qemu", warning=_fallback(f"a probe guest did not boot under KVM ({why})"))


def _fallback(why):
    return (f"vm.kvm.accel = auto: {why}; KVM desktops run under QEMU software "
            f"emulation (TCG), several times slower. Set vm.kvm.accel = tcg to "
            f"silence this, or fix KVM on this node.")


def probe_argv(kernel, emulator="qemu-system-x86_64", accel="kvm"):
    """
    The QEMU command that boots C{kernel} under C{accel} (KVM; tests check
    the command itself under tcg) to its panic (no root).
    """
    return [emulator or "qemu-system-x86_64", "-accel", accel, "-machine", "pc",
            "-m", "256", "-nodefaults", "-no-user-config", "-display", "none",
            "-serial", "stdio", "-no-reboot", "-kernel", kernel,
            "-append", "console=ttyS0 panic=-1 root=/dev/qvd-probe-none"]


def run_probe(argv, timeout):
    """
    Run the probe C{argv} (blocking). The guest must print its kernel's
    version and panic, making QEMU exit, within C{timeout} seconds.

    @return: C{(ok, why)}.
    """
    try:
        result = subprocess.run(argv, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"no kernel panic within {timeout} s"
    except OSError as e:
        return False, f"cannot run {argv[0]}: {e.strerror}"
    out = result.stdout.decode("utf-8", "replace")
    if "Kernel panic" in out:
        return True, ""
    err = result.stderr.decode("utf-8", "replace").strip().splitlines()
    return False, f"exit status {result.returncode}: {err[-1] if err else 'no output'}"
