"""
Login -> desktop for a STOPPED minimal LXC desktop, through the whole qvd
stack, against the same desktop brought up by hand (root).

    .venv/bin/python bench/bench_e2e.py [N] [--fast]     # N = 3 by default

The daemons run with the shipped defaults, or with --fast with the tests'
shorter polling intervals (L{qvd.testing.e2e.Stack.FAST}).

qvd: N sequential logins of distinct users, each with its own stopped VM,
through the real daemons (L{qvd.testing.e2e.Stack}: PostgreSQL, twistd
qvd-hkd with the LXC driver, twistd qvd-l7r over TLS) by a real headless
qvd-client process; timed from the client's spawn to the desktop's colour
covering half its Xvfb screen (so it includes the client's own start and
its Xvfb, also reported apart).

peer: the same image and the same work without qvd's daemons, database,
TLS or client: the LXC driver's prepare + start (overlay mount and
lxc-start of the same rootfs), the agent's x_start over SimpleRPC as soon
as it answers, x_state polled until listening, then nxproxy -S drawing into
an Xvfb started beforehand; timed from prepare to the colour.

Both sides first do one untimed warm-up (it unpacks the DI's base tree).
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from qvd.testing import e2e  # noqa: E402

PID = os.getpid()


def pct(values, p):
    values = sorted(values)
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summary(name, values):
    return (f"{name}: p50 {pct(values, 50):.2f} s, p95 {pct(values, 95):.2f} s "
            f"(n={len(values)}: {', '.join(f'{v:.2f}' for v in values)})")


# --- qvd ----------------------------------------------------------------------

def bench_qvd(n, fast):
    stack = e2e.Stack("bench", subnet_base=218, fast=fast)
    began = time.monotonic()
    stack.start()
    print(f"qvd node up in {time.monotonic() - began:.1f} s", flush=True)
    totals, local = [], []
    try:
        for i in range(n + 1):
            login = f"user{i}"
            stack.add_user(login, "pw")
            client = stack.client(login, "pw")
            seconds = client.wait_for_colour()
            xvfb_ready = client.said("headless: Xvfb on display")[0]
            code = client.wait(60)
            if code != 0:
                raise SystemExit(f"qvd-client failed ({code}):\n{client.stderr()}")
            what = "warm-up" if i == 0 else f"login {i}"
            print(f"qvd {what} ({login}): spawn -> colour {seconds:.2f} s "
                  f"(client + its Xvfb ready after {xvfb_ready:.2f} s)",
                  flush=True)
            if i:
                totals.append(seconds)
                local.append(xvfb_ready)
        print(f"timeline of the last login (client's progress lines; colour at {seconds:.2f} s):\n"
              + client.timeline(), flush=True)
    finally:
        stack.stop()
        left = stack.leftovers()
        if left:
            print(f"warning: left behind: {left}", file=sys.stderr)
    return totals, local


# --- peer ---------------------------------------------------------------------

def start_xvfb():
    read, write = os.pipe()
    proc = subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1024x768x24",
                             "-nolisten", "tcp", "-br", "-noreset"], pass_fds=(write,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(write)
    with os.fdopen(read) as f:
        return proc, ":" + f.readline().strip()


def _sleep(reactor, seconds):
    return task.deferLater(reactor, seconds, lambda: None)


@defer.inlineCallbacks
def bench_peer(reactor, image, n, out):
    from twisted.internet import threads

    from qvd.config import Config, declared_keys
    from qvd.virt._lxcconfig import mounts_below
    from qvd.virt.interfaces import VMSpec
    from qvd.virt.lxc import LXCDriver
    from qvd.vmaclient import VMAClient, VMAError, VMAUnreachable

    subnet, bridge = f"10.219.{PID % 200}", f"qbp{PID % 10000}"
    root = tempfile.mkdtemp(prefix="qvd-bench-e2e-peer-", dir="/var/tmp")
    config = Config(keys=declared_keys(), node={
        "path.run": f"{root}/run", "path.storage.root": f"{root}/storage", "path.storage.local": f"{root}/local",
        "vm.lxc.name.prefix": f"qvdbp{PID}-", "vm.lxc.veth.prefix": f"qp{PID % 1000}v",
        "vm.network.bridge": bridge, "vm.lxc.bridge.address": f"{subnet}.1/24"})
    driver = LXCDriver(config, reactor)
    xvfb, display = start_xvfb()
    try:
        yield driver.setUp()
        for i in range(n + 1):
            spec = VMSpec(vm_id=i + 1, name=f"peer{i}", login=f"u{i}", memory=512, di_id=1,
                          di_path=image, ip=f"{subnet}.{10 + i}",
                          mac=f"54:52:00:bb:{PID % 256:02x}:{i + 10:02x}",
                          netmask="255.255.255.0", bridge=bridge)
            t0 = time.monotonic()
            yield driver.prepare(spec)
            yield driver.start(spec)
            vma = VMAClient(reactor, spec.ip, 3030, timeout=2)
            while True:
                try:
                    yield vma.x_start({
                        "qvd.vm.user.name": f"u{i}", "qvd.client.geometry": "1024x768",
                        "qvd.client.fullscreen": "1", "qvd.client.link": "adsl",
                        "qvd.client.keyboard": "pc105/us", "qvd.client.os": "linux"})
                    break
                except (VMAError, VMAUnreachable):
                    if time.monotonic() - t0 > 60:
                        raise
                    yield _sleep(reactor, 0.05)
            while (yield vma.x_state()) != "listening":
                if time.monotonic() - t0 > 60:
                    raise RuntimeError("nxagent never listened")
                yield _sleep(reactor, 0.05)
            home = os.path.join(root, f"home{i}")
            os.makedirs(home)
            proxy = subprocess.Popen(
                ["nxproxy", "-S", f"nx/nx,connect={spec.ip},port=4100:{60 + i}"],
                env={"PATH": os.environ["PATH"], "HOME": home, "DISPLAY": display},
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                while (yield threads.deferToThread(e2e.screen_colour, display)) < 0.5:
                    if time.monotonic() - t0 > 60:
                        raise RuntimeError("the colour never showed")
                    yield _sleep(reactor, 0.05)
                seconds = time.monotonic() - t0
            finally:
                proxy.terminate()
                proxy.wait(10)
            what = "warm-up" if i == 0 else f"run {i}"
            print(f"peer {what}: prepare -> colour {seconds:.2f} s", flush=True)
            if i:
                out.append(seconds)
            stopped = driver.watch(spec.vm_id)
            yield driver.kill(spec.vm_id)
            yield stopped
            yield driver.cleanup(spec)
            # a black screen again for the next run
            subprocess.run(["xsetroot", "-solid", "black", "-display", display],
                           stderr=subprocess.DEVNULL)
    finally:
        xvfb.terminate()
        xvfb.wait(10)
        lxcpath = f"{root}/run/lxc"
        if os.path.isdir(lxcpath):
            for name in os.listdir(lxcpath):
                subprocess.run(["lxc-stop", "-k", "-n", name, "-P", lxcpath],
                               capture_output=True)
        for point in mounts_below(open("/proc/self/mounts").read(), root):
            subprocess.run(["umount", "-l", point])
        for iface in os.listdir("/sys/class/net"):
            if iface == bridge or iface.startswith(f"qp{PID % 1000}v"):
                subprocess.run(["ip", "link", "delete", iface], stderr=subprocess.DEVNULL)
        shutil.rmtree(root, ignore_errors=True)


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    fast = "--fast" in sys.argv
    n = int(args[0]) if args else 3
    why = e2e.missing()
    if why:
        raise SystemExit(f"bench_e2e: {why}")
    from qvd.testing.images import minimal_lxc_image
    image = minimal_lxc_image(stream=sys.stderr)
    print(f"host {socket.gethostname()}, {os.cpu_count()} CPUs, image {image}", flush=True)
    print("qvd polling: " + ("the tests' faster settings " + str(e2e.Stack.FAST) if fast
                             else "the shipped defaults (--fast: the tests' settings)"))
    qvd, local = bench_qvd(n, fast)
    peer = []
    task.react(lambda reactor: bench_peer(reactor, image, n, peer).addCallback(
        lambda _: report(qvd, local, peer)))


def report(qvd, local, peer):
    print()
    print(summary("qvd  login -> desktop colour (stopped VM)", qvd))
    print(summary("     of which the client + its Xvfb start", local))
    print(summary("peer prepare -> desktop colour (by hand) ", peer))
    print(f"ratio qvd/peer: p50 {pct(qvd, 50) / pct(peer, 50):.2f}, "
          f"p95 {pct(qvd, 95) / pct(peer, 95):.2f}")


if __name__ == "__main__":
    main()
