"""
How long a KVM desktop takes from `vm start` to its agent answering, with
qvd's driver and with a bare qemu-system-x86_64 of the same image.

    deploy/services.sh        # virtlogd + libvirtd
    PYTHONPATH=. .venv/bin/python bench/bench_kvm_start.py [--runs 3] [--image minimal|test|X.qcow2] [--port 3030]

For each run, alternately:
  qvd:  KVMDriver.prepare + start (overlay, home disk, libvirt domain) until
        the guest accepts TCP on --port (the VMA's 3030);
  bare: qemu-img overlay + qemu-system-x86_64 with the same kernel, initrd,
        command line, memory, vCPUs, accel, virtio root and home disks and
        virtio NIC on the same bridge, until the same port answers.
Prints every run, the medians and their ratio (qvd / bare; target <= 1.15).
The image defaults to the cached minimal desktop with the real VMA
(qvd.testing.kvm_image.minimal_kvm_image); --image test uses the smaller
test image whose stand-in for the VMA listens on 3030. Needs root. Creates and removes its own bridge.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from qvd.virt._accel import HostFacts, choose
from qvd.virt._domain import kernel_cmdline
from qvd.virt.interfaces import VMSpec
from qvd.virt.kvm import KVMDriver, KVMSettings

PID = os.getpid() % 1000
BRIDGE = f"qbkb{PID}"
SUBNET = f"10.253.{PID % 250}"


def ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


@defer.inlineCallbacks
def wait_for_port(reactor, host, port, timeout):
    start = time.monotonic()
    while True:
        try:
            proto = yield connectProtocol(TCP4ClientEndpoint(reactor, host, port, timeout=1), Protocol())
        except Exception:
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"{host}:{port} did not answer within {timeout} s")
            yield task.deferLater(reactor, 0.1, lambda: None)
        else:
            proto.transport.loseConnection()
            return


@defer.inlineCallbacks
def run_qvd(reactor, driver, spec, port, timeout):
    t0 = time.monotonic()
    yield driver.prepare(spec)
    yield driver.start(spec)
    t_started = time.monotonic()
    yield wait_for_port(reactor, spec.ip, port, timeout)
    took = time.monotonic() - t0
    yield driver.kill(spec.vm_id)
    yield driver.cleanup(spec)
    return took, t_started - t0


@defer.inlineCallbacks
def run_bare(reactor, spec, image, settings, domain_type, base, port, timeout):
    tap = f"qbkt{PID}b"
    ip("link", "del", tap, check=False)
    ip("tuntap", "add", "dev", tap, "mode", "tap")
    ip("link", "set", tap, "master", BRIDGE, "up")
    overlay = os.path.join(base, "bare-overlay.qcow2")
    proc = None
    try:
        t0 = time.monotonic()
        if os.path.exists(overlay):
            os.unlink(overlay)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", image, "-F", "qcow2", overlay],
                       check=True)
        home = os.path.join(base, "bare-home.qcow2")
        if not os.path.exists(home):  # like qvd's home disk: created once
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", home,
                            f"{spec.user_storage_size}M"], check=True)
        argv = [
            "qemu-system-x86_64", "-accel", "kvm" if domain_type == "kvm" else "tcg",
            "-machine", settings.machine, "-m", str(spec.memory), "-smp", str(settings.cpus),
            "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", image + ".kernel", "-initrd", image + ".initrd",
            "-append", kernel_cmdline(spec, settings),
            "-drive", f"file={overlay},if=virtio,format=qcow2",
            "-drive", f"file={home},if=virtio,format=qcow2",
            "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=n0,mac={spec.mac}",
            "-serial", f"file:{os.path.join(base, 'bare-console.log')}",
        ]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        yield wait_for_port(reactor, spec.ip, port, timeout)
        return time.monotonic() - t0
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        ip("link", "del", tap, check=False)


@defer.inlineCallbacks
def main(reactor, args):
    if os.geteuid() != 0:
        raise SystemExit("bench_kvm_start needs root (libvirt qemu:///system, bridge, tap)")
    here = os.path.dirname(os.path.abspath(__file__))
    subprocess.run([os.path.join(here, "..", "deploy", "services.sh")], check=False)
    image = args.image
    if image in (None, "test", "minimal"):
        from qvd.testing import kvm_image
        image = kvm_image.minimal_kvm_image() if image == "minimal" else kvm_image.test_image()
    image = os.path.abspath(image)
    base = tempfile.mkdtemp(prefix="qvd-kvm-bench-")
    os.chmod(base, 0o755)
    ip("link", "del", BRIDGE, check=False)
    ip("link", "add", BRIDGE, "type", "bridge")
    ip("addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
    ip("link", "set", BRIDGE, "up")
    settings = KVMSettings(
        overlays=os.path.join(base, "overlays"), homes=os.path.join(base, "homes"),
        console_dir=os.path.join(base, "console"), accel=args.accel,
        prefix=f"qvdbench{PID}-", tap_prefix=f"qbkt{PID}q", cpus=args.cpus)
    driver = KVMDriver(reactor, settings)
    spec = VMSpec(vm_id=1, name="bench", login="bench", memory=args.memory, di_id=1, di_path=image,
                  ip=f"{SUBNET}.10", mac=f"54:52:00:fd:{PID % 250:02x}:01", netmask="255.255.255.0",
                  bridge=BRIDGE, gateway=f"{SUBNET}.1", user_storage_size=64)
    qvd_times, bare_times, start_calls = [], [], []
    try:
        yield driver.setUp()
        domain_type = driver.domainType or choose(args.accel, HostFacts.read()).domain_type or "kvm"
        dsettings = settings.domainSettings(domain_type)
        print(f"image {image}; accel {domain_type}; {args.cpus} vCPU; memory {args.memory} MB; "
              f"port {args.port}; {args.runs} run(s) each", flush=True)
        for n in range(args.runs):
            took, start_call = yield run_qvd(reactor, driver, spec, args.port, args.timeout)
            qvd_times.append(took)
            start_calls.append(start_call)
            print(f"run {n + 1}: qvd  {took:6.2f} s (prepare+start calls {start_call:.2f} s)", flush=True)
            took = yield run_bare(reactor, spec, image, dsettings, domain_type, base, args.port, args.timeout)
            bare_times.append(took)
            print(f"run {n + 1}: bare {took:6.2f} s", flush=True)
    finally:
        yield driver.cleanup(spec)
        yield driver.tearDown()
        ip("link", "del", BRIDGE, check=False)
        shutil.rmtree(base, ignore_errors=True)
    q, b = statistics.median(qvd_times), statistics.median(bare_times)
    print(f"median: qvd {q:.2f} s, bare qemu {b:.2f} s, ratio {q / b:.3f} (target <= 1.15); "
          f"qvd's own calls (prepare+start) median {statistics.median(start_calls):.2f} s")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--runs", type=int, default=2)
    p.add_argument("--image", default="minimal",
                   help="a qcow2 DI with .kernel/.initrd beside it, or 'minimal' (the minimal "
                        "desktop with the real agent, default) or 'test' (a stand-in on 3030)")
    p.add_argument("--port", type=int, default=3030)
    p.add_argument("--memory", type=int, default=384)
    p.add_argument("--accel", default="auto")
    p.add_argument("--cpus", type=int, default=1, help="virtual CPUs (vm.kvm.cpus)")
    p.add_argument("--timeout", type=float, default=240)
    return p.parse_args(argv)


if __name__ == "__main__":
    task.react(main, [parse(sys.argv[1:])])
