"""
Start N LXC desktops together through the HKD and compare with bare LXC (root).

    .venv/bin/python bench/bench_lxc_start.py [N]        # N defaults to 5

What runs, all on this machine, named after this process and removed afterwards
(bridge qbk<pid>, containers qvdb<pid>-..., storage in a temp dir in /var/tmp, a
private PostgreSQL cluster of qvd.testing.pg):

1. qvd: a real HKD service (qvd.hkd.node.HKD) with the LXC driver and the real
   agent client; the minimal test DI (qvd.testing.images); N VMs get
   vm_cmd='start' in one UPDATE + NOTIFY, one transaction on an open connection
   (what the L7R does). Measured per VM, from sending that transaction: start -> 'running' (seen through LISTEN qvd_vm_state),
   and start -> nxagent listening (the bench calls x_start as soon as the VM is
   running, as the L7R does, then polls x_state until 'listening').
2. bare peer, same run, same rootfs: for each of N containers an overlayfs over
   the DI tree the HKD unpacked, a hand-written LXC config (veth on the same
   bridge, static address, the same user namespace mapping as qvd's: the
   tree's ids are shifted for it, a VM secret bind-mounted as qvd does) and
   `lxc-start -d`, all N at once (spawned from the reactor, as the HKD does);
   measured per container: lxc-start -> the agent answering a ping. The probe
   is the HKD's: each container pinged on its own as soon as its lxc-start
   returned, with the agent client the HKD uses, the same timeout
   (hkd.vm.vma.timeout) and the same pause between pings
   (hkd.vm.vma.ping.starting, QVD_OVERRIDES); then the same x_start as qvd's
   desktops get, and lxc-start -> nxagent listening.

Prints p50/p95 of each and the ratio qvd / bare for "agent answering"
(qvd's start -> running is the moment the HKD got the agent's first answer).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time

from twisted.internet import defer, task

PID = os.getpid()
SUBNET = f"10.218.{PID % 200}"
BRIDGE = f"qbk{PID % 1000}"
PREFIX = f"qvdb{PID % 100000}-"
VETH = f"qk{PID % 1000}v"

#: The HKD's agent pings while a VM starts (the bare peer is probed the same way).
QVD_OVERRIDES = {"hkd.vm.vma.ping.starting": "0.1", "hkd.vm.vma.ping.interval": "2",
                 "hkd.vm.vma.timeout": "4"}

X_PARAMS = {"qvd.vm.user.name": "qvd", "qvd.client.os": "linux",
            "qvd.client.geometry": "1024x768", "qvd.client.link": "lan",
            "qvd.client.keyboard": "pc105/us", "qvd.client.fullscreen": "0"}


def pct(values, p):
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summary(name, values):
    if not values:
        return f"{name:38s} no samples"
    return (f"{name:38s} n={len(values)}  p50 {pct(values, 50):6.2f} s  "
            f"p95 {pct(values, 95):6.2f} s  max {max(values):6.2f} s")


def scrub(root):
    lxcpath = os.path.join(root, "run", "lxc")
    for path in (lxcpath, os.path.join(root, "bare")):
        if os.path.isdir(path):
            for name in os.listdir(path):
                subprocess.run(["lxc-stop", "-k", "-n", name, "-P", path], capture_output=True)
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f if f" {root}/" in line]
    for point in sorted(points, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True)
    for iface in os.listdir("/sys/class/net"):
        if iface.startswith(VETH) or iface == BRIDGE:
            subprocess.run(["ip", "link", "delete", iface], capture_output=True)
    subprocess.run(["nft", "delete", "table", "bridge", f"qvdb{PID}"], capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


async def x_session(reactor, client, since):
    """
    What the L7R does once a desktop runs: x_start, then x_state every 0.05 s
    until nxagent listens. Returns that moment (time.monotonic()).
    """
    await client.x_start(X_PARAMS)
    while True:
        state = await client.x_state()
        if state in ("listening", "connected"):
            return time.monotonic()
        if state == "stopped" and time.monotonic() - since > 5:
            raise RuntimeError("the X session stopped")
        await task.deferLater(reactor, 0.05, lambda: None)


async def run_qvd(reactor, root, image, n, overrides=None):
    from qvd.config import Config, declared_keys
    from qvd.db import sync
    from qvd.db.listen import Listener
    from qvd.db.pool import Database
    from qvd.hkd.node import HKD
    from qvd.hkd.tap import make_vma_factory
    from qvd.testing import pg
    from qvd.testing.hkd import FAST
    from qvd.virt.lxc import LXCDriver
    from qvd.vmaclient import VMAClient

    images = os.path.join(root, "storage", "images")
    os.makedirs(images, exist_ok=True)
    os.symlink(image, os.path.join(images, "minimal.tar"))
    values = dict(FAST)
    values.update({
        "path.run": f"{root}/run", "path.storage.root": f"{root}/storage", "path.storage.local": f"{root}/local",
        "path.storage.images": images, "vm.lxc.name.prefix": PREFIX,
        "vm.lxc.veth.prefix": VETH, "vm.network.bridge": BRIDGE,
        "vm.network.netmask": "255.255.255.0", "vm.lxc.bridge.address": f"{SUBNET}.1/24",
        "hkd.lock.path": f"{root}/run/hkd.lock", "hkd.vm.starting.max": str(n),
        "hkd.vm.timeout.waiting_vma": "120", "hkd.vm.timeout.preparing": "600",
        "hkd.vm.vma.dead.seconds": "60", "hkd.vm.vma.dead.failures": "10",
        "hkd.vm.timeout.powering_off": "20", "hkd.vm.timeout.shutting_down": "20",
        "vm.network.firewall.table": f"qvdb{PID}"})
    values.update(QVD_OVERRIDES)
    values.update(overrides or {})
    config = Config(keys=declared_keys(), node=values)
    name, dsn = pg.fresh_database()

    def q(sql, args=None):
        with sync.connect(dsn) as conn:
            def run(cur):
                cur.execute(sql, args)
                return [dict(r) for r in cur.fetchall()] if cur.description else []
            return sync.transaction(conn, run)

    host = q("INSERT INTO hosts (name, address) VALUES ('bench', %s) RETURNING id",
             (f"{SUBNET}.1",))[0]["id"]
    osf = q("INSERT INTO osfs (tenant_id, name) VALUES (1, 'bench') RETURNING id")[0]["id"]
    di = q("INSERT INTO dis (osf_id, path, version) VALUES (%s, 'minimal.tar', '1')"
           " RETURNING id", (osf,))[0]["id"]
    q("INSERT INTO di_tags (di_id, osf_id, tag) VALUES (%s, %s, 'default')", (di, osf))
    vms = {}
    for i in range(n):
        user = q("INSERT INTO users (tenant_id, login) VALUES (1, %s) RETURNING id",
                 (f"bench{i}",))[0]["id"]
        ip = f"{SUBNET}.{20 + i}"
        vm = q("INSERT INTO vms (name, user_id, osf_id, ip, mac) VALUES (%s, %s, %s, %s, %s)"
               " RETURNING id", (f"b{i}", user, osf, ip, f"54:52:00:bb:00:{i:02x}"))[0]["id"]
        q("INSERT INTO vm_runtimes (vm_id) VALUES (%s)", (vm,))
        vms[vm] = ip

    driver = LXCDriver(config, reactor)
    hkd_dsn = pg.role_dsn(name, "hkd")
    db = Database(hkd_dsn, reactor)
    hkd = HKD(config, reactor, db, Listener(hkd_dsn, reactor), driver,
              make_vma_factory(config, reactor), host, dsn=hkd_dsn)
    hkd.startService()
    await hkd.ready

    # warm-up: unpack the DI once, outside the measurement (both sides share it)
    first = next(iter(vms))
    q("UPDATE vm_runtimes SET host_id = %s, vm_cmd = 'start' WHERE vm_id = %s", (host, first))
    q(f"NOTIFY qvd_cmd_for_vm_on_host{host}")
    while q("SELECT vm_state FROM vm_runtimes WHERE vm_id = %s", (first,))[0]["vm_state"] \
            != "running":
        await task.deferLater(reactor, 0.2, lambda: None)
    q("UPDATE vm_runtimes SET vm_cmd = 'stop' WHERE vm_id = %s", (first,))
    q(f"NOTIFY qvd_cmd_for_vm_on_host{host}")
    while q("SELECT host_id FROM vm_runtimes WHERE vm_id = %s", (first,))[0]["host_id"]:
        await task.deferLater(reactor, 0.2, lambda: None)

    running_at, listening_at, errors = {}, {}, {}
    listener = Listener(dsn, reactor)

    async def x_listening(vm_id):
        secret = q("SELECT vma_secret FROM vm_runtimes WHERE vm_id = %s", (vm_id,))[0]
        client = VMAClient(reactor, vms[vm_id], 3030, timeout=10, secret=secret["vma_secret"])
        try:
            listening_at[vm_id] = await x_session(reactor, client, running_at[vm_id])
        except Exception as e:
            errors[vm_id] = f"x_start: {e}"

    def on_state(channel, payload):
        vm_id, state, _ = payload.split(":")
        vm_id = int(vm_id)
        if state == "running" and vm_id in vms and vm_id not in running_at:
            running_at[vm_id] = time.monotonic()
            defer.ensureDeferred(x_listening(vm_id))
    listener.subscribe("qvd_vm_state", on_state)
    await listener.start()

    def command_start(cur):
        cur.execute("UPDATE vm_runtimes SET host_id = %s, vm_cmd = 'start'"
                    " WHERE vm_id = ANY(%s)", (host, list(vms)))
        cur.execute(f"NOTIFY qvd_cmd_for_vm_on_host{host}")
    with sync.connect(dsn) as conn:
        # as the L7R does it: on a connection it has, one transaction (the
        # NOTIFY goes out at its commit); the clock starts when it is sent
        t0 = time.monotonic()
        sync.transaction(conn, command_start)
    deadline = t0 + 180
    while len(listening_at) + len(errors) < n and time.monotonic() < deadline:
        await task.deferLater(reactor, 0.1, lambda: None)
    for vm_id, reason in q("SELECT vm_id, vm_state_reason FROM vm_runtimes"
                           " WHERE vm_state_reason IS NOT NULL"):
        errors.setdefault(vm_id, reason)
    q("UPDATE vm_runtimes SET vm_cmd = 'stop' WHERE host_id IS NOT NULL")
    q(f"NOTIFY qvd_cmd_for_vm_on_host{host}")
    deadline = time.monotonic() + 60
    while q("SELECT count(*) AS n FROM vm_runtimes WHERE host_id IS NOT NULL")[0]["n"] \
            and time.monotonic() < deadline:
        await task.deferLater(reactor, 0.2, lambda: None)
    await listener.stop()
    await hkd.stopService()
    for _ in range(200):            # let in-flight queries finish before the drop
        if db._open == 0:
            break
        await task.deferLater(reactor, 0.05, lambda: None)
    pg.drop_database(name)
    trees = config.get("path.storage.basefs")
    basefs = [os.path.join(trees, d) for d in os.listdir(trees)
              if not d.startswith(".")]         # not .locks
    return ([running_at[v] - t0 for v in running_at],
            [listening_at[v] - t0 for v in listening_at], errors, basefs[0])


BARE_CONFIG = """lxc.include = /usr/share/lxc/config/common.conf
lxc.uts.name = {name}
lxc.rootfs.path = dir:{rootfs}
lxc.autodev = 1
lxc.tty.max = 0
lxc.console.path = none
lxc.signal.halt = SIGRTMIN+4
lxc.net.0.type = veth
lxc.net.0.veth.pair = {veth}
lxc.net.0.link = {bridge}
lxc.net.0.name = eth0
lxc.net.0.hwaddr = 54:52:00:cc:00:{i:02x}
lxc.net.0.flags = up
lxc.net.0.ipv4.address = {ip}/24
lxc.idmap = u 0 {uid} 65536
lxc.idmap = g 0 {gid} 65536
lxc.tty.dir =
lxc.mount.entry = {secret} {secret_target} none bind,ro,create=file 0 0
"""


async def run_bare(reactor, root, basefs, n):
    """
    N plain lxc-start -d over overlays of the same unpacked DI, all at once,
    probed the way the HKD probes its VMs (L{qvd.hkd.supervisor}): each
    container on its own, from the moment its lxc-start returned, with the
    same agent client (L{qvd.vmaclient.VMAClient}: the VM's secret, the
    timeout C{hkd.vm.vma.timeout}) and the same pause between pings
    (C{hkd.vm.vma.ping.starting}). Returns seconds from the start of all to
    each agent answering, and to each nxagent listening (the bare peer's
    desktops get the same x_start as qvd's, as soon as they answer: the
    sessions starting compete with the desktops still booting on both sides).
    """
    from qvd.config import Config, declared_keys
    from qvd.virt._lxcconfig import SECRET_TARGET
    from qvd.virt._process import run as run_process
    from qvd.vmaclient import VMAClient

    config = Config(keys=declared_keys(), node=QVD_OVERRIDES)
    timeout = config.getfloat("hkd.vm.vma.timeout")
    cadence = config.getfloat("hkd.vm.vma.ping.starting")
    lxcpath = os.path.join(root, "bare")
    os.makedirs(lxcpath, exist_ok=True)
    containers = []
    for i in range(n):
        name = f"{PREFIX}bare{i}"
        d = os.path.join(root, "bare-fs", str(i))
        upper, work, merged = (os.path.join(d, x) for x in ("upper", "work", "merged"))
        for x in (upper, work, merged):
            os.makedirs(x)
        owner = os.stat(basefs)         # the tree's ids are shifted for the user namespace
        os.chown(upper, owner.st_uid, owner.st_gid)
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir={basefs},upperdir={upper},workdir={work}", merged],
                       check=True)
        os.makedirs(os.path.join(lxcpath, name))
        secret, secret_path = os.urandom(16).hex(), os.path.join(lxcpath, name, "vma.secret")
        fd = os.open(secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchown(f.fileno(), owner.st_uid, owner.st_gid)
            f.write(secret + "\n")
        ip = f"{SUBNET}.{120 + i}"
        with open(os.path.join(lxcpath, name, "config"), "w") as f:
            f.write(BARE_CONFIG.format(name=name, rootfs=merged, veth=f"{VETH}b{i}",
                                       bridge=BRIDGE, i=i, ip=ip, uid=owner.st_uid,
                                       gid=owner.st_gid, secret=secret_path,
                                       secret_target=SECRET_TARGET))
        containers.append((name, ip, secret))
    answered, listening = {}, {}

    async def start_and_probe(name, ip, secret):
        result = await run_process(reactor, ["lxc-start", "-d", "-n", name, "-P", lxcpath])
        if result.code != 0:
            print(f"bare {name}: lxc-start failed: {result.describe()}", file=sys.stderr)
            return
        client = VMAClient(reactor, ip, 3030, timeout=timeout, secret=secret)
        while time.monotonic() - t0 < 120:
            try:
                await client.ping()
            except Exception:
                await task.deferLater(reactor, cadence, lambda: None)
                continue
            answered[name] = time.monotonic() - t0
            try:
                listening[name] = await x_session(reactor, VMAClient(
                    reactor, ip, 3030, timeout=10, secret=secret), t0 + answered[name]) - t0
            except Exception as e:
                print(f"bare {name}: x_start: {e}", file=sys.stderr)
            return

    t0 = time.monotonic()
    await defer.gatherResults([defer.ensureDeferred(start_and_probe(*c)) for c in containers])
    for name, _, _ in containers:
        await run_process(reactor, ["lxc-stop", "-k", "-n", name, "-P", lxcpath])
    return list(answered.values()), list(listening.values())


async def bench(reactor, n):
    from qvd.testing.images import minimal_lxc_image
    image = minimal_lxc_image(stream=sys.stderr)
    root = tempfile.mkdtemp(prefix=f"qvdb{PID}-", dir="/var/tmp")
    os.chmod(root, 0o755)  # containers' root (unprivileged) walks through it
    try:
        running, listening, errors, basefs = await run_qvd(reactor, root, image, n)
        bare, bare_listening = await run_bare(reactor, root, basefs, n)
    finally:
        scrub(root)
    print(f"\n{n} desktops started together (minimal DI, LXC, {os.cpu_count()} CPUs)")
    print(summary("qvd: start -> running (agent answered)", running))
    print(summary("qvd: start -> nxagent listening", listening))
    print(summary("bare lxc-start -> agent answering", bare))
    print(summary("bare lxc-start -> nxagent listening", bare_listening))
    if running and bare:
        print(f"ratio qvd/bare (agent answering): p50 "
              f"{pct(running, 50) / pct(bare, 50):.2f}x, p95 "
              f"{pct(running, 95) / pct(bare, 95):.2f}x")
    for vm_id, reason in sorted(errors.items()):
        print(f"VM {vm_id}: {reason}")


def main():
    args = sys.argv[1:]
    n = int(args[0]) if args else 5
    if os.geteuid() != 0:
        sys.exit("bench_lxc_start: needs root (LXC containers)")
    task.react(lambda reactor: defer.ensureDeferred(bench(reactor, n)))


if __name__ == "__main__":
    main()
