"""
A whole qvd node for end-to-end tests and benchmarks, on the REAL components:
a private PostgreSQL database (L{qvd.testing.pg}), C{twistd qvd-hkd} with the
LXC driver and the minimal test image (L{qvd.testing.images}), C{twistd
qvd-l7r} speaking TLS on 127.0.0.1 (port chosen by the kernel, certificate
made here) and C{qvd-client} processes.

    stack = Stack("e2e")
    stack.start()                                   # blocking; seconds
    vm = stack.add_user("alice", "secret")
    client = stack.client("alice", "secret")        # headless, screenshot
    seconds = client.wait_for_colour()              # login -> colour on its Xvfb
    client.wait()
    stack.stop()                                    # removes everything

Everything is named after the process (bridge C{qbe<pid>}, containers
C{qvdt-e2e<pid>-<vm>}, veths C{qe<pid>v...}) and lives under one temp dir
in /var/tmp; L{Stack.stop} (also run at exit) removes containers, mounts,
interfaces, processes, files and the database. The calls block: the tests
that use this drive subprocesses only.

C{Stack("vnet", subnet_base=229, hypervisor="kvm")} runs the same node with
KVM desktops (libvirtd + QEMU, TCG here) of the minimal KVM image
(L{qvd.testing.kvm_image.minimal_kvm_image}): domains C{qvdt-vnet<pid>-<vm>},
taps C{qv<pid>v<vm>}; commands run inside through the QEMU guest agent
(L{qvd.testing.guest}), L{Stack.attach} and L{Stack.attach_as} work alike.
TCG boots take tens of seconds: L{Stack.start_vms} boots desktops before
their users log in.
"""

import atexit
import contextlib
import glob
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib

from qvd.testing import pg

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
COLOUR = 0x2A7FD4  # qvd.testing.images.TEST_COLOUR


HYPERVISORS = ("lxc", "kvm")
LIBVIRT_URI = "qemu:///system"


def missing(hypervisor="lxc"):
    """
    Why the end-to-end stack cannot run here (None if it can): for SkipTest.
    """
    if os.geteuid() != 0:
        return f"the end-to-end tests need root ({hypervisor.upper()} desktops)"
    programs = {"lxc": ("lxc-start", "lxc-attach", "lxc-stop"),
                "kvm": ("libvirtd", "qemu-system-x86_64", "qemu-img")}[hypervisor]
    for program in programs + ("nxproxy", "Xvfb", "ip", "nft"):
        if shutil.which(program) is None:
            return f"{program} is not installed"
    if not os.path.exists(TWISTD):
        return f"twistd not found next to {sys.executable}"
    if hypervisor == "kvm":
        try:
            import libvirt_qemu  # noqa: F401 (the guest agent's commands)
        except ImportError:
            return "libvirt-python is not installed"
    from qvd.testing.images import cannot_build_reason
    return cannot_build_reason()


def env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def wait_until(predicate, timeout, what, poll=0.05):
    """
    Call C{predicate()} until it returns something true; return that.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:g} s")
        time.sleep(poll)


# --- pixels -------------------------------------------------------------------

def read_png(path):
    """
    (width, height, rgb bytes) of an 8-bit RGB or RGBA, non-interlaced PNG.
    """
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"{path} is not a PNG file")
    i, idat, header = 8, [], None
    while i < len(data):
        (length,) = struct.unpack(">I", data[i:i + 4])
        kind, body = data[i + 4:i + 8], data[i + 8:i + 8 + length]
        i += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
    width, height, depth, ctype, _, _, interlace = header
    if depth != 8 or ctype not in (2, 6) or interlace:
        raise ValueError(f"{path}: only 8-bit RGB/RGBA non-interlaced PNGs are read here")
    bpp = 3 if ctype == 2 else 4
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    rows, prev = [], bytearray(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        row = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            a = row[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if kind == 1:
                row[x] = (row[x] + a) & 255
            elif kind == 2:
                row[x] = (row[x] + b) & 255
            elif kind == 3:
                row[x] = (row[x] + (a + b) // 2) & 255
            elif kind == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                row[x] = (row[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(row))
        prev = row
    rgb = b"".join(rows)
    if bpp == 4:
        rgb = b"".join(rgb[i:i + 3] for i in range(0, len(rgb), 4))
    return width, height, rgb


def colour_area(width, height, rgb, colour=COLOUR, step=8, tolerance=8):
    """
    Sample every C{step}-th pixel of every C{step}-th row: the fraction of
    samples within C{tolerance} of C{colour}, and the bounding box
    (x0, y0, x1, y1) of those samples (None if none).
    """
    r, g, b = (colour >> 16) & 255, (colour >> 8) & 255, colour & 255
    hits = total = 0
    box = None
    for y in range(0, height, step):
        base = y * width * 3
        for x in range(0, width, step):
            i = base + x * 3
            total += 1
            if (abs(rgb[i] - r) <= tolerance and abs(rgb[i + 1] - g) <= tolerance
                    and abs(rgb[i + 2] - b) <= tolerance):
                hits += 1
                box = (x, y, x, y) if box is None else (
                    min(box[0], x), min(box[1], y), max(box[2], x), max(box[3], y))
    return (hits / total if total else 0.0), box


def screen_colour(display, colour=COLOUR):
    """
    The fraction of C{display}'s screen showing C{colour} (0.0 if unreadable).
    """
    from qvd.client._x11 import X11Error
    from qvd.client.headless import grab
    try:
        image = grab(display)
    except (X11Error, OSError):
        return 0.0
    return colour_area(image.width, image.height, image.rgb, colour, step=16)[0]


# --- the node -----------------------------------------------------------------

class Client:
    """
    One C{qvd-client connect} process; stdout/stderr go to files.
    """

    def __init__(self, stack, login, password, *extra, headless=True, display=None,
                 host="127.0.0.1", wait=90):
        self.stack = stack
        n = stack.next_name()
        self.home = os.path.join(stack.root, f"client{n}")
        os.makedirs(self.home)
        self.shot = os.path.join(self.home, "desktop.png") if headless else None
        self.out_path = os.path.join(self.home, "stdout")
        self.err_path = os.path.join(self.home, "stderr")
        argv = [sys.executable, "-m", "qvd.client", "--host", host,
                "--port", str(stack.port), "--ca", stack.cert, "--user", login,
                "--password", password, "connect", *extra]
        if headless:
            argv += ["--headless", "--screenshot", self.shot, "--wait", str(wait)]
        else:
            argv += ["--display", display]
        self.began = time.monotonic()
        self.lines = []     # (seconds since spawn, stderr line), as they came
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.PIPE, env=dict(
                env(), HOME=self.home), cwd=self.home, start_new_session=True)
        stack.processes.append(self.proc)
        self._reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._reader.start()

    def _read_stderr(self):
        with self.proc.stderr, open(self.err_path, "wb") as err:
            for raw in self.proc.stderr:
                self.lines.append((time.monotonic() - self.began,
                                   raw.decode(errors="replace").rstrip("\n")))
                err.write(raw)
                err.flush()

    def stderr(self):
        return "".join(line + "\n" for _, line in list(self.lines))

    def said(self, pattern):
        """
        (seconds since spawn, match) of the first stderr line matching
        C{pattern}, or None.
        """
        for t, line in list(self.lines):
            found = re.search(pattern, line)
            if found:
                return t, found
        return None

    def timeline(self):
        """
        The client's progress lines with their time since its spawn.
        """
        return "\n".join(f"  {t:6.2f} s  {line}" for t, line in self.lines)

    def display(self):
        """
        The headless client's own Xvfb display, once it has said it.
        """
        found = self.said(r"headless: Xvfb on display (:\d+)")
        return found and found[1].group(1)

    def wait_for_colour(self, display=None, timeout=120, fraction=0.5):
        """
        Poll the client's screen until at least C{fraction} of it shows the
        desktop's colour; return the seconds since the client started.
        """
        def seen():
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"qvd-client exited ({self.proc.returncode}) before the desktop showed:\n"
                    + self.stderr())
            where = display or self.display()
            return where and screen_colour(where) >= fraction
        wait_until(seen, timeout, "the desktop's colour on the client's screen")
        return time.monotonic() - self.began

    def wait(self, timeout=60):
        try:
            code = self.proc.wait(timeout)
            self._reader.join(5)
            return code
        except subprocess.TimeoutExpired:
            raise AssertionError(f"qvd-client still runs after {timeout} s:\n" + self.stderr())

    def stop(self):
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class Stack:
    """
    Database + HKD + L7R on this machine, with its own bridge and subnet.
    """

    #: faster polling than the shipped defaults (tests); Stack(fast=False)
    #: runs with the defaults of qvd/config/defaults (benchmarks)
    FAST = {
        "hkd.ticker.interval": "0.5",
        "hkd.vm.vma.ping.interval": "2",
        "hkd.vm.vma.ping.starting": "0.1",
        "internal.l7r.poll_time.x": "0.2",
        "hkd.firewall.refresh.interval": "0.5",
    }

    #: The subnets and interface letters of the stacks started in this
    #: process and not stopped yet: two of them sharing either would share a
    #: bridge or addresses, and both would break.
    _live = {}

    def __init__(self, tag="e2e", subnet_base=217, fast=True, hypervisor="lxc",
                 nodename="node1", storage_root=None, join=None, config=None,
                 storage_id=None):
        if hypervisor not in HYPERVISORS:
            raise ValueError(f"hypervisor {hypervisor!r} is neither of {HYPERVISORS}")
        self.hypervisor = hypervisor
        self.fast = fast
        # Another node of a cluster (tests/integration/test_storage_shared.py):
        # its own hosts row, HKD, L7R, bridge and run dirs, and the database
        # (and DI) of the stack C{join}; C{storage_root} as path.storage.root
        # (a mount of a shared volume) and C{storage_id} as the database's
        # storage id; C{config}: more node values.
        self.nodename = nodename
        self.storage_root = storage_root
        self.join = join
        self.extra = dict(config or {})
        self.storage_id = storage_id
        pid = os.getpid()
        self.tag = tag
        self.subnet = f"10.{subnet_base}.{pid % 200}"
        self.bridge = f"qb{tag[0]}{pid % 10000}"
        self.prefix = f"qvdt-{tag}{pid % 100000}-"
        self.veth = f"q{tag[0]}{pid % 1000}v"
        self.nft_table = f"qvdt_{tag}{pid}"
        self.root = None
        self.processes = []
        self.started = False
        self._names = 0
        self._ips = 10

    def next_name(self):
        self._names += 1
        return self._names

    @property
    def lxcpath(self):
        return f"{self.root}/run/lxc"

    # -- life cycle --

    def start(self, stream=sys.stderr):
        from qvd.l7r import tls
        for other in Stack._live.values():
            if other.subnet == self.subnet or other.tag[0] == self.tag[0]:
                raise AssertionError(
                    f"stack {self.tag!r} would share {self.subnet} or the interface letter"
                    f" {self.tag[0]!r} with the running stack {other.tag!r}")
        if self.hypervisor == "kvm":
            from qvd.testing.kvm_image import minimal_kvm_image
            subprocess.run([os.path.join(ROOT, "deploy", "services.sh")], check=False)
            image, di_name = minimal_kvm_image(stream=stream), "minimal.qcow2"
        else:
            from qvd.testing.images import minimal_lxc_image
            image, di_name = minimal_lxc_image(stream=stream), "minimal.tar"
        Stack._live[id(self)] = self
        pg.cluster()  # started (and its exit hook registered) before ours: ours runs first
        self.root = tempfile.mkdtemp(prefix=f"qvdt-{self.tag}{os.getpid()}-", dir="/var/tmp")
        os.chmod(self.root, 0o755)
        atexit.register(self.stop)
        self.started = True
        storage_root = self.storage_root or os.path.join(self.root, "storage")
        images = os.path.join(storage_root, "images")
        if self.join is None or not os.path.exists(os.path.join(images, di_name)):
            os.makedirs(images, exist_ok=True)
            if self.storage_root is None:
                os.symlink(image, os.path.join(images, di_name))
            else:  # a shared volume: the image itself on it
                shutil.copyfile(image, os.path.join(images, di_name))
        if self.hypervisor == "kvm":  # the kernel and initramfs beside it: no extraction
            for suffix in (".kernel", ".initrd"):
                os.symlink(image + suffix, os.path.join(images, di_name + suffix))
        cluster = pg.cluster()
        if self.join is None:
            self.dbname, self.dsn = pg.fresh_database()
        else:
            self.dbname, self.dsn = self.join.dbname, self.join.dsn
        self.host = self.query("INSERT INTO hosts (name, address) VALUES (%s, %s)"
                               " RETURNING id", (self.nodename, f"{self.subnet}.1"))[0]["id"]
        if self.join is None:
            self.osf = self.query("INSERT INTO osfs (tenant_id, name, memory) VALUES"
                                  " (1, 'desktop', 512) RETURNING id")[0]["id"]
            di = self.query("INSERT INTO dis (osf_id, path, version) VALUES"
                            " (%s, %s, '1') RETURNING id", (self.osf, di_name))[0]["id"]
            self.query("INSERT INTO di_tags (di_id, osf_id, tag) VALUES (%s, %s, 'default')",
                       (di, self.osf))
            if self.storage_id is not None:
                self.query("INSERT INTO storage_identity (storage_id) VALUES (%s)",
                           (self.storage_id,))
        else:
            self.osf = self.join.osf
        ssl_dir = os.path.join(self.root, "ssl")
        _, self.cert = tls.self_signed(ssl_dir, self.nodename)
        values = {
            "nodename": self.nodename,
            "database.host": cluster.socketdir,
            "database.name": self.dbname,
            "database.listen.keepalive": "1",
            "path.state": f"{self.root}/state",
            "path.run": f"{self.root}/run",
            "path.log": f"{self.root}/log",
            "path.storage.root": storage_root,
            "path.storage.images": images,
            "path.l7r.ssl": ssl_dir,
            "vm.hypervisor": self.hypervisor,
            "vm.network.bridge": self.bridge,
            "vm.network.firewall.table": self.nft_table,
            "vm.network.netmask": "255.255.255.0",
            "hkd.lock.path": f"{self.root}/run/hkd.lock",
            "hkd.vm.timeout.waiting_vma": "60",
        }
        if self.hypervisor == "kvm":
            values.update({
                "vm.kvm.uri": LIBVIRT_URI,
                "vm.kvm.domain.prefix": self.prefix,
                "vm.kvm.tap.prefix": self.veth,
                "vm.kvm.bridge.address": f"{self.subnet}.1/24",
                "vm.kvm.guest_agent": "1",
                # TCG boots: tens of seconds, more with two guests on two cores
                "hkd.vm.timeout.waiting_vma": "400",
                "hkd.vm.timeout.powering_off": "90",
                "hkd.vm.timeout.shutting_down": "60",
                "hkd.vm.vma.dead.failures": "20",
                "hkd.vm.vma.dead.seconds": "60",
            })
        else:
            values.update({
                "vm.lxc.name.prefix": self.prefix,
                "vm.lxc.veth.prefix": self.veth,
                "vm.lxc.bridge.address": f"{self.subnet}.1/24",
            })
        if self.fast:
            values.update(self.FAST)
        values.update(self.extra)
        self.conf = os.path.join(self.root, "node.conf")
        with open(self.conf, "w") as f:
            for key, value in values.items():
                f.write(f"{key} = {value}\n")
        self.hkd_log = os.path.join(self.root, "hkd.log")
        self.l7r_log = os.path.join(self.root, "l7r.log")
        self.hkd = self._twistd(self.hkd_log, "qvd-hkd", "--config", self.conf)
        self.l7r = self._twistd(self.l7r_log, "qvd-l7r", "--config", self.conf,
                                "--listen", "ssl:0:interface=127.0.0.1")
        self.port = int(wait_until(self._l7r_port, 30, "the L7R listening"))
        wait_until(lambda: self.node_state() == "running", 30, "the HKD running")

    def _twistd(self, log, *argv):
        proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "-l", log, *argv], env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self.processes.append(proc)
        return proc

    def _l7r_port(self):
        if self.l7r.poll() is not None:
            raise AssertionError(f"the L7R exited ({self.l7r.returncode}):\n"
                                 + self.log_tail(self.l7r_log))
        with contextlib.suppress(FileNotFoundError):
            with open(self.l7r_log) as f:
                found = re.search(r"L7R listening on .*port=(\d+)", f.read())
                return found and found.group(1)

    def log_tail(self, path, lines=30):
        with contextlib.suppress(FileNotFoundError):
            with open(path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        return ""

    def stop(self):
        """
        Stop everything and remove every trace (idempotent).
        """
        if not self.started:
            return
        self.started = False
        Stack._live.pop(id(self), None)
        for proc in reversed(self.processes):
            if proc in (self.hkd, self.l7r) or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(Exception):
            self.stop_vms()
        for proc in (self.l7r, self.hkd):
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        from qvd.testing.processes import stop_fencer
        stop_fencer(f"{self.root}/run/hkd-fence")  # a killed HKD's fencer lives on
        # What a daemon started ends after it (the L7R's resource tracker of
        # its password-check processes reads the end of its pipe, then exits).
        sessions = {p.pid for p in self.processes}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(
                sid in sessions for _, sid in _sessions()):
            time.sleep(0.05)
        self.scrub()
        if self.join is None:
            with contextlib.suppress(Exception):
                pg.drop_database(self.dbname)

    def stop_vms(self, timeout=None):
        """
        Ask the HKD to stop every VM that is not stopped; wait for it.
        """
        if timeout is None:
            timeout = 240 if self.hypervisor == "kvm" else 60
        rows = self.query("SELECT vm_id FROM vm_runtimes WHERE vm_state <> 'stopped'"
                          " AND (host_id = %s OR host_id IS NULL)", (self.host,))
        for row in rows:
            self.command(row["vm_id"], "stop")
        for row in rows:
            wait_until(lambda: self.vm_row(row["vm_id"])["vm_state"] == "stopped", timeout,
                       f"VM {row['vm_id']} stopped")

    def scrub(self):
        """
        Remove every container or domain, mount, interface and file of this stack.
        """
        for name in self.domains():
            subprocess.run(["virsh", "-q", "-c", LIBVIRT_URI, "destroy", name], capture_output=True)
            subprocess.run(["virsh", "-q", "-c", LIBVIRT_URI, "undefine", name], capture_output=True)
        if os.path.isdir(self.lxcpath):
            for name in os.listdir(self.lxcpath):
                subprocess.run(["lxc-stop", "-k", "-n", name, "-P", self.lxcpath],
                               capture_output=True)
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f if f" {self.root}" in line]
        for point in sorted(points, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True)
        for iface in self.interfaces():
            subprocess.run(["ip", "link", "delete", iface], capture_output=True)
        if self.nft_rules():
            subprocess.run(["nft", "delete", "table", "bridge", self.nft_table],
                           capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)

    def nft_rules(self):
        """The text of the stack's nftables table ("" when it has none)."""
        done = subprocess.run(["nft", "list", "table", "bridge", self.nft_table],
                              capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else ""

    def domains(self):
        """The libvirt domains of this stack (KVM desktops), running or not."""
        if self.hypervisor != "kvm":
            return []
        done = subprocess.run(["virsh", "-q", "-c", LIBVIRT_URI, "list", "--all", "--name"],
                              capture_output=True, text=True)
        return sorted(n for n in done.stdout.split() if n.startswith(self.prefix))

    def interfaces(self):
        return sorted(i for i in os.listdir("/sys/class/net")
                      if i.startswith(self.veth) or i == self.bridge)

    def leftovers(self):
        """
        What of this stack still exists (for the "nothing left behind" check).
        """
        found = []
        with open("/proc/self/mounts") as f:
            found += [line.split()[1] for line in f if f" {self.root}" in line]
        found += self.interfaces()
        found += [f"domain {name}" for name in self.domains()]
        if self.nft_rules():
            found.append(f"nft table bridge {self.nft_table}")
        found += [f"process {p.pid}" for p in self.processes if p.poll() is None]
        found += [f"process {pid} of session {sid}" for pid, sid in _sessions()
                  if sid in {p.pid for p in self.processes}]
        if os.path.exists(self.root):
            found.append(self.root)
        return found

    # -- database --

    def query(self, sql, args=None):
        from qvd.db import sync
        with sync.connect(self.dsn) as conn:
            def run(cur):
                cur.execute(sql, args)
                return [dict(r) for r in cur.fetchall()] if cur.description else []
            return sync.transaction(conn, run)

    def add_user(self, login, password):
        """
        A user of the default tenant with one VM of the minimal desktop; its id.
        """
        from qvd.passwords import hash_password
        self._ips += 1
        n = self._ips
        user = self.query("INSERT INTO users (tenant_id, login, password) VALUES (1, %s, %s)"
                          " RETURNING id", (login, hash_password(password)))[0]["id"]
        vm = self.query("INSERT INTO vms (name, user_id, osf_id, ip, mac, di_tag) VALUES"
                        " (%s, %s, %s, %s, %s, 'default') RETURNING id",
                        (f"{login}-desktop", user, self.osf, f"{self.subnet}.{n}",
                         "54:52:00:e2:%02x:%02x" % (os.getpid() % 256, n)))[0]["id"]
        self.query("INSERT INTO vm_runtimes (vm_id) VALUES (%s)", (vm,))
        self.query("INSERT INTO vm_counters (vm_id) VALUES (%s)", (vm,))
        return vm

    def vm_row(self, vm_id):
        return self.query("SELECT * FROM vm_runtimes WHERE vm_id = %s", (vm_id,))[0]

    def node_state(self):
        if self.hkd.poll() is not None:
            raise AssertionError(f"the HKD exited ({self.hkd.returncode}):\n"
                                 + self.log_tail(self.hkd_log))
        rows = self.query("SELECT state FROM host_runtimes WHERE host_id = %s", (self.host,))
        return rows[0]["state"] if rows else None

    def command(self, vm_id, cmd):
        """
        What qvd-admin vm start/stop does: assign the node, set vm_cmd, NOTIFY.
        """
        self.query("UPDATE vm_runtimes SET host_id = %s, vm_cmd = %s WHERE vm_id = %s",
                   (self.host, cmd, vm_id))
        self.query(f"NOTIFY qvd_cmd_for_vm_on_host{int(self.host)}")

    # -- desktops --

    def container(self, vm_id):
        """The name of the VM's container (LXC) or domain (KVM)."""
        return f"{self.prefix}{vm_id}"

    def guest(self, vm_id):
        """The guest agent of the VM's KVM domain (L{qvd.testing.guest})."""
        from qvd.testing.guest import GuestAgent
        return GuestAgent(LIBVIRT_URI, self.container(vm_id))

    def start_vms(self, *vm_ids, timeout=None):
        """
        Start the VMs through the HKD (all at once) and wait until each runs
        (its agent answers the HKD); with KVM also until its guest agent
        answers. The seconds until the last one did.
        """
        began = time.monotonic()
        for vm_id in vm_ids:
            self.command(vm_id, "start")
        if timeout is None:
            timeout = 420 if self.hypervisor == "kvm" else 60
        for vm_id in vm_ids:
            wait_until(lambda: self.vm_row(vm_id)["vm_state"] == "running",
                       timeout - (time.monotonic() - began), f"VM {vm_id} running", poll=0.5)
            if self.hypervisor == "kvm":
                self.guest(vm_id).wait_ready(timeout - (time.monotonic() - began))
        return time.monotonic() - began

    def attach(self, vm_id, *argv, timeout=30):
        """
        Run C{argv} inside the VM as its root (looked up on the usual PATH);
        a C{subprocess.CompletedProcess} (text).
        """
        if self.hypervisor == "kvm":
            return self.guest(vm_id).run(
                ["/usr/bin/env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                 *argv], timeout)
        return subprocess.run(["lxc-attach", "-P", self.lxcpath, "-n", self.container(vm_id),
                               "--", *argv], capture_output=True, text=True, timeout=timeout)

    def attach_as(self, vm_id, user, *argv, timeout=30):
        """
        Run C{argv} inside the VM's container or guest as C{user} (a login
        the VMA provisioned, or C{root}): what that user can do from a shell
        of the desktop. A C{subprocess.CompletedProcess} (text).
        """
        if user == "root":
            return self.attach(vm_id, *argv, timeout=timeout)
        if self.hypervisor == "kvm":
            return self.attach(vm_id, "setpriv", f"--reuid={user}", f"--regid={user}",
                               "--init-groups", "--reset-env", "--", *argv, timeout=timeout)
        return subprocess.run(
            ["lxc-attach", "-P", self.lxcpath, "-n", self.container(vm_id), "--",
             "setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups",
             "--reset-env", "--", *argv],
            capture_output=True, text=True, timeout=timeout)

    def python_as(self, vm_id, user, code, timeout=30):
        """
        Run Python C{code} with the desktop's python3 as C{user} (see
        L{attach_as}): the attacks of tests/security are small scripts.
        """
        return self.attach_as(vm_id, user, "python3", "-c", code, timeout=timeout)

    def marker_pids(self, vm_id):
        """
        The PIDs (inside the container) of the minimal session's marker.
        """
        done = self.attach(vm_id, "pgrep", "-f", "qvd-test-marker")
        return sorted(int(p) for p in done.stdout.split())

    def client(self, login, password, *extra, **kw):
        return Client(self, login, password, *extra, **kw)


class SharedStack:
    """
    One L{Stack}, built by C{build()} on first use, shared by the ordered
    tests of a class (the last one stops it):

        node = SharedStack(lambda: ...)        # module level
        def setUp(self):
            self.stack = node.get()
    """

    def __init__(self, build, hypervisor="lxc"):
        self._build = build
        self.hypervisor = hypervisor
        self.stack = None

    def get(self):
        from twisted.trial.unittest import SkipTest
        why = missing(self.hypervisor)
        if why:
            raise SkipTest(why)
        if self.stack is None:
            self.stack = self._build()
        if not self.stack.started:
            raise SkipTest("the shared node was already taken down")
        return self.stack


def _sessions():
    """
    (pid, session id) of every process; the daemons, the clients (and their
    Xvfb and nxproxy) each run in a session of their own.
    """
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        yield int(stat.split("/")[2]), int(fields[3])


class Xvfb:
    """
    A test-owned Xvfb on a free display (for a non-headless client).
    """

    def __init__(self, stack, geometry="1024x768"):
        read, write = os.pipe()
        self.proc = subprocess.Popen(
            ["Xvfb", "-displayfd", str(write), "-screen", "0", f"{geometry}x24",
             "-nolisten", "tcp", "-br", "-noreset"], pass_fds=(write,),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        os.close(write)
        stack.processes.append(self.proc)
        with os.fdopen(read) as f:
            self.display = ":" + f.readline().strip()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
