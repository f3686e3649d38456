"""
Boot times of LXC desktops through the driver (root): prepare (first one
unpacks the DI), start() to RUNNING, start() to the VMA's port 3030 answering
GET /vma/ping, shutdown() to stopped. A bridge and subnet of this process,
removed afterwards.

    .venv/bin/python bench/bench_lxc.py [IMAGE.tar] [N]

Without IMAGE the minimal test image (qvd.testing.images) is used.
"""

import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, task, threads

from qvd.config import Config, declared_keys
from qvd.virt._lxcconfig import mounts_below
from qvd.virt.interfaces import VMSpec
from qvd.virt.lxc import LXCDriver

PID = os.getpid()
SUBNET = f"10.214.{PID % 200}"
BRIDGE = f"qbb{PID % 1000}"


def vma_ping(ip, timeout):
    """
    Seconds until GET /vma/ping on ip:3030 gets an HTTP answer, or None.
    """
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with socket.create_connection((ip, 3030), timeout=1) as s:
                s.sendall(b"GET /vma/ping HTTP/1.0\r\nHost: vm\r\n\r\n")
                if s.recv(64).startswith(b"HTTP/"):
                    return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.05)
    return None


@defer.inlineCallbacks
def bench(reactor, image, n):
    root = tempfile.mkdtemp(prefix="qvd-bench-lxc-", dir="/var/tmp")
    os.chmod(root, 0o755)  # containers' root (unprivileged) walks through it
    config = Config(keys=declared_keys(), node={
        "path.run": f"{root}/run", "path.storage.root": f"{root}/storage", "path.storage.local": f"{root}/local",
        "vm.lxc.name.prefix": f"qvdb{PID}-", "vm.lxc.veth.prefix": f"qb{PID % 1000}v",
        "vm.network.bridge": BRIDGE, "vm.lxc.bridge.address": f"{SUBNET}.1/24"})
    driver = LXCDriver(config, reactor)
    rows = []
    try:
        yield driver.setUp()
        for i in range(n):
            spec = VMSpec(vm_id=1, name="bench", login="u", memory=512, di_id=1,
                          di_path=image, ip=f"{SUBNET}.10", mac="54:52:00:aa:bb:10",
                          netmask="255.255.255.0", bridge=BRIDGE)
            t0 = time.monotonic()
            yield driver.prepare(spec)
            t1 = time.monotonic()
            yield driver.start(spec)
            t2 = time.monotonic()
            vma = yield threads.deferToThread(vma_ping, spec.ip, 30)
            stopped = driver.watch(1)
            t3 = time.monotonic()
            yield driver.shutdown(1)
            yield stopped
            t4 = time.monotonic()
            yield driver.cleanup(spec)
            t5 = time.monotonic()
            rows.append((t1 - t0, t2 - t1, None if vma is None else t2 - t1 + vma,
                         t4 - t3, t5 - t4))
            print(f"run {i}: prepare {rows[-1][0]:.3f} s, start->RUNNING {rows[-1][1]:.3f} s, "
                  f"start->VMA ping {'-' if vma is None else f'{rows[-1][2]:.2f} s'}, "
                  f"shutdown {rows[-1][3]:.2f} s, cleanup {rows[-1][4]:.3f} s")
    finally:
        subprocess.run(["ip", "link", "delete", BRIDGE], stderr=subprocess.DEVNULL)
        for point in mounts_below(open("/proc/self/mounts").read(), root):
            subprocess.run(["umount", "-l", point])
        shutil.rmtree(root, ignore_errors=True)
    if len(rows) > 1:
        later = rows[1:]
        print("median of runs after the first: start->RUNNING "
              f"{statistics.median(r[1] for r in later):.3f} s, VMA "
              + (f"{statistics.median(r[2] for r in later if r[2]):.2f} s"
                 if all(r[2] for r in later) else "not answering"))


def main():
    image = sys.argv[1] if len(sys.argv) > 1 else None
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    if image is None:
        from qvd.testing.images import minimal_lxc_image
        image = minimal_lxc_image(stream=sys.stderr)
    task.react(bench, (image, n))


if __name__ == "__main__":
    main()
