"""
qvd's L7R beside HAProxy, in one run (issue 10): both terminate TLS in front
of the same plain TCP backend and relay bytes; the L7R does its whole connect
sequence first (token or password login, claim, x_start/x_state on an agent
that answers at once, the NX greeting with the session's cookie).

    PYTHONPATH=. QVD_CONFIG=/dev/null .venv/bin/python bench/bench_l7r_peers.py \\
        [-n 100] [--seconds 10] [--runs 3] [--only haproxy|qvd] [--direction down|up]

Figures, each the median of the runs, with the ratio qvd/HAProxy of the same
run (the median of the per-run ratios):

- relay CPU-s per GB with 1 and with N streams: utime+stime from /proc of the
  server's whole process tree (HAProxy's process; C{twistd -n qvd-l7r} and
  every process under it: password-check workers, and worker processes when
  the L7R gets them). Not counted: the backend, the agent, PostgreSQL (shown
  apart, per session), the clients (shown apart);
- aggregate MB/s with N streams;
- resident memory per session (the tree's RSS with C{--idle} sessions held
  open without traffic, less before) and CPU while they idle;
- CPU-ms per new session and new sessions/s with 50 concurrent clients: a
  session is a new TCP connection, the TLS handshake, for qvd the
  C{connect_to_vm} request through the 101, the NX greeting, the backend's
  first bytes back, and the close.

The same client for both: stdlib C{ssl} in blocking threads spread over
several forked processes, 256 KiB reads, 1 MiB writes; TLS 1.3 (and 1.2 rows
with C{ECDHE-ECDSA-AES256-GCM-SHA384}); the cipher negotiated is printed per
server. The backend moves bulk bytes with C{sendfile}/C{recv_into} of 1 MiB
(its CPU is printed so a reader sees it is not the bottleneck). The bulk
direction C{down} (default) is the display traffic of NX: backend -> relay
(encrypts) -> client; C{up} is the other way (the relay decrypts).

Everything listens on 127.0.0.1 and is removed at the end, also on Ctrl-C:
the PostgreSQL test cluster, the L7R, HAProxy, the backend and agent
processes, the client processes and the temp dir.
"""

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
CLK = os.sysconf("SC_CLK_TCK")

#: What nxproxy sends first (the L7R puts the session's cookie into it).
GREETING = b"NXPROXY-3.5.0-3.5.99 stream=default,data=default "
#: What the session backend answers to the greeting.
SESSION_REPLY = b"NXOK\n"
#: The cipher of the TLS 1.2 rows (the certificate is EC P-256).
TLS12_CIPHER = "ECDHE-ECDSA-AES256-GCM-SHA384"
#: qvd's l7r.ssl.ciphers default (TLS 1.2), given to HAProxy too.
QVD_CIPHERS = ("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!MD5:!RC4:!3DES:"
               "!DES:!MEDIUM:!LOW:!EXPORT")
#: OpenSSL's default TLS 1.3 suites, which the L7R's context keeps.
TLS13_SUITES = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256"
SESSION_CLIENTS = 50
VMS_PER_SESSION_CLIENT = 20
READ_SIZE = 256 * 1024
WRITE_SIZE = 1024 * 1024


# --- /proc ----------------------------------------------------------------------

def _stat(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after the name: state ppid ... utime(11) stime(12) cutime(13) cstime(14)
    return int(fields[1]), sum(int(x) for x in fields[11:15])


def tree_cpu(*roots):
    """
    CPU seconds (user+system) of the processes C{roots} and all their
    descendants, plus what their reaped children used (cutime/cstime), so
    worker processes that come and go are counted once.
    """
    parents, cpu = {}, {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                parents[int(name)], cpu[int(name)] = _stat(name)
            except (OSError, IndexError, ValueError):
                pass
    children = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    total, todo, seen = 0, [r for r in roots if r in cpu], set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        total += cpu[pid]
        todo += children.get(pid, [])
    return total / CLK


def tree_rss(root):
    """Resident bytes of C{root} and all its descendants (VmRSS summed)."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parents[int(name)] = _stat(name)[0]
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        todo += [p for p, pp in parents.items() if pp == pid]
    return total


def machine_cpu():
    """(busy, softirq) CPU seconds of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / CLK, softirq / CLK


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- backend: the stand-in for nxagent -------------------------------------------

def backend_main():
    """
    Three listening ports, a thread per connection; each connection first
    reads the client's greeting. C{down}: then sends bulk bytes with
    sendfile until the peer goes; C{up}: reads and drops; C{session}:
    answers L{SESSION_REPLY} and waits for the close.
    """
    fd = os.memfd_create("qvd-bench-backend")
    chunk = os.urandom(16 * 1024 * 1024)
    os.write(fd, chunk)

    def read_greeting(conn):
        return conn.recv(65536)

    def down(conn):
        if not read_greeting(conn):
            return
        out, offset = conn.fileno(), 0
        while True:
            sent = os.sendfile(out, fd, offset, len(chunk) - offset)
            if sent == 0:
                return
            offset = (offset + sent) % len(chunk)

    def up(conn):
        buf = bytearray(WRITE_SIZE)
        while conn.recv_into(buf):
            pass

    def session(conn):
        if not read_greeting(conn):
            return
        conn.sendall(SESSION_REPLY)
        while conn.recv(65536):
            pass

    def serve(listener, handler):
        def run(conn):
            with conn, contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                handler(conn)
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=run, args=(conn,), daemon=True).start()

    ports = {}
    for name, handler in (("down", down), ("up", up), ("session", session)):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(4096)
        ports[name] = s.getsockname()[1]
        threading.Thread(target=serve, args=(s, handler), daemon=True).start()
    print(json.dumps(ports), flush=True)
    sys.stdin.read()                    # until the parent goes


def vma_main():
    """The fake agent (x_start, x_state: listening at once) on a port printed as JSON."""
    from twisted.internet import reactor, stdio
    from twisted.internet.protocol import Protocol

    from qvd.testing.fakevma import FakeVMA

    port = reactor.listenTCP(0, FakeVMA().site(), interface="127.0.0.1", backlog=4096)

    class Control(Protocol):
        def connectionLost(self, reason):
            if reactor.running:
                reactor.stop()
    stdio.StandardIO(Control())
    print(json.dumps({"port": port.getHost().port}), flush=True)
    reactor.run()


# --- the clients ------------------------------------------------------------------

def client_context(version):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if version == "1.2":
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers(TLS12_CIPHER)
    else:
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def request_for(who):
    """The connect_to_vm request of one qvd session (C{who}: (vm, authorization))."""
    vm, authorization = who
    return (f"GET /qvd/connect_to_vm?id={vm}&qvd.client.os=linux&qvd.client.geometry=1024x768"
            f" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {authorization}\r\n"
            f"Connection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n").encode()


#: The client addresses the streams and sessions come from, in turn (--sources).
SOURCES = ["127.0.0.1"]


def open_stream(port, ctx, who, slot=0):
    """
    A TLS connection through to the backend (for qvd: after the 101), the
    greeting sent; (socket, bytes already read past the HTTP answer).
    C{slot} chooses the client address (L{SOURCES}).
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=60,
                                   source_address=(SOURCES[slot % len(SOURCES)], 0))
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s = ctx.wrap_socket(raw)
    rest = b""
    if who is not None:
        s.sendall(request_for(who))
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError(f"the L7R closed the connection: {buf[-300:]!r}")
            buf += chunk
            done = False
            while b"\r\n\r\n" in buf:
                head, _, buf = buf.partition(b"\r\n\r\n")
                status = head.split(b" ", 2)[1]
                if status == b"101":
                    done = True
                    break
                if status != b"102":
                    raise ConnectionError(f"the L7R answered {head[:300]!r}")
            if done:
                rest = buf
                break
    s.sendall(GREETING)
    return s, rest


def client_proc(kind, port, version, whos, counts, slot0, stop, ready, errors, info):
    """
    One client process: a thread per entry of C{whos} (None for HAProxy, or
    a list of (vm, authorization) for qvd). C{kind} is C{down}/C{up} (one
    stream per thread, C{counts} in bytes) or C{session} (new sessions one
    after the other, C{counts} in sessions).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = client_context(version)
    said = []
    lock = threading.Lock()

    def error(text):
        # a few per process: the queue is a pipe the parent reads at the end
        with lock:
            said.append(text)
            if len(said) <= 5:
                errors.put(text)
            elif len(said) % 1000 == 0:
                errors.put(f"... {len(said)} errors so far in this client process")
    payload = memoryview(os.urandom(WRITE_SIZE))

    def stream(i, who):
        try:
            s, rest = open_stream(port, ctx, who[0] if who else None, slot0 + i)
        except Exception as e:
            error(f"stream setup: {e!r}")
            ready[slot0 + i] = -1
            return
        if i == 0:
            info.put(s.version() + " " + s.cipher()[0])
        counts[slot0 + i] += len(rest)
        ready[slot0 + i] = 1
        try:
            with s:
                if kind == "idle":
                    while not stop[0]:
                        time.sleep(0.2)
                elif kind == "down":
                    buf = bytearray(READ_SIZE)
                    while not stop[0]:
                        n = s.recv_into(buf)
                        if not n:
                            raise ConnectionError("the server closed the stream")
                        counts[slot0 + i] += n
                else:
                    while not stop[0]:
                        s.sendall(payload)
                        counts[slot0 + i] += WRITE_SIZE
        except Exception as e:
            if not stop[0]:
                error(f"stream: {e!r}")

    def sessions(i, who):
        ready[slot0 + i] = 1
        k = 0
        while not stop[0]:
            try:
                s, rest = open_stream(port, ctx, who[k % len(who)] if who else None,
                                      slot0 + i + k)
                with s:
                    if k == 0 and i == 0:
                        info.put(s.version() + " " + s.cipher()[0])
                    while len(rest) < len(SESSION_REPLY):
                        chunk = s.recv(4096)
                        if not chunk:
                            raise ConnectionError("closed before the backend's first bytes")
                        rest += chunk
                counts[slot0 + i] += 1
            except Exception as e:
                if not stop[0]:
                    error(f"session: {e!r}")
                    time.sleep(0.05)
            k += 1

    threads = [threading.Thread(target=sessions if kind == "session" else stream,
                                args=(i, who), daemon=True) for i, who in enumerate(whos)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# --- the servers --------------------------------------------------------------------

class Bench:
    """Owns every process, port, database and file the run makes."""

    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="qvd-bench-peers-")
        self.procs = []
        self.pg = None
        self.dbname = None

    # -- life cycle --

    def spawn(self, argv, **kw):
        proc = subprocess.Popen(argv, start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def close(self):
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
        if self.dbname is not None:
            from qvd.testing import pg
            with contextlib.suppress(Exception):
                pg.drop_database(self.dbname)
        if self.pg is not None:
            self.pg.destroy()           # the private cluster of qvd.testing.pg
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def helper(self, mode):
        proc = self.spawn([sys.executable, os.path.abspath(__file__), mode],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          env=dict(os.environ, PYTHONPATH=ROOT), text=True)
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"the {mode} helper did not start")
        return proc, json.loads(line)

    def start(self):
        from qvd.l7r import tls
        self.ssl_dir = os.path.join(self.tmp, "ssl")
        self.key, self.cert = tls.self_signed(self.ssl_dir, "localhost")
        self.backend, self.backend_ports = self.helper("--backend")
        if self.args.only != "haproxy":
            self.vma, vma = self.helper("--vma")
            self.vma_port = vma["port"]
            self.start_database()
            self.start_l7r()
        if self.args.only != "qvd":
            self.start_haproxy()

    # -- HAProxy --

    def start_haproxy(self):
        pem = os.path.join(self.tmp, "haproxy.pem")
        with open(pem, "wb") as out:
            for path in (self.cert, self.key):
                with open(path, "rb") as f:
                    out.write(f.read())
        os.chmod(pem, 0o600)
        self.haproxy_ports = {name: free_port() for name in self.backend_ports}
        threads = f"    nbthread {self.args.haproxy_threads}\n" if self.args.haproxy_threads else ""
        sections = "".join(
            f"frontend f_{name}\n    bind 127.0.0.1:{self.haproxy_ports[name]} ssl crt {pem}\n"
            f"    default_backend b_{name}\n"
            f"backend b_{name}\n    server s_{name} 127.0.0.1:{port}\n"
            for name, port in self.backend_ports.items())
        cfg = os.path.join(self.tmp, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(
                "global\n    maxconn 4000\n" + threads
                + f"    ssl-default-bind-ciphers {QVD_CIPHERS}\n"
                f"    ssl-default-bind-ciphersuites {TLS13_SUITES}\n"
                "    ssl-default-bind-options ssl-min-ver TLSv1.2 ssl-max-ver TLSv1.3\n"
                "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 120s\n"
                "    timeout server 120s\n" + sections)
        self.haproxy = self.spawn(["haproxy", "-db", "-f", cfg], stdout=subprocess.DEVNULL,
                                  stderr=open(os.path.join(self.tmp, "haproxy.log"), "w"))
        for port in self.haproxy_ports.values():
            self.wait_listening(port, self.haproxy, "HAProxy",
                                os.path.join(self.tmp, "haproxy.log"))

    def wait_listening(self, port, proc, what, log, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                with open(log, errors="replace") as f:
                    raise SystemExit(f"{what} exited ({proc.returncode}):\n{f.read()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                return
            time.sleep(0.05)
        raise SystemExit(f"{what} does not listen on {port} after {timeout} s")

    # -- qvd --

    def start_database(self):
        from qvd.passwords import hash_password
        from qvd.testing import pg
        self.pg = pg.cluster()
        self.dbname, self.dsn = pg.fresh_database()
        self.hashed = hash_password("secret")
        rows = self.query("INSERT INTO hosts (name, address) VALUES ('bench', '127.0.0.1')"
                          " RETURNING id")
        self.host = rows[0]["id"]
        self.query("INSERT INTO host_runtimes (host_id, state) VALUES (%s, 'running')",
                   (self.host,))
        self.osf = self.query("INSERT INTO osfs (tenant_id, name) VALUES (1, 'o') RETURNING id"
                              )[0]["id"]
        self.users = 0

    def query(self, sql, args=None):
        from qvd.db import sync
        with sync.connect(self.dsn) as conn:
            def run(cur):
                cur.execute(sql, args)
                return [dict(r) for r in cur.fetchall()] if cur.description else []
            return sync.transaction(conn, run)

    def make_vms(self, count, backend, auth):
        """
        C{count} new users, each with a running VM whose NX port is the
        backend's C{backend} port; [(vm id, Authorization value)].
        """
        import base64
        first = self.users
        self.users += count
        x_port = self.backend_ports[backend]
        rows = self.query(
            "WITH u AS (INSERT INTO users (tenant_id, login, password)"
            "  SELECT 1, 'u' || i, %(pw)s FROM generate_series(%(a)s, %(b)s) i RETURNING id, login),"
            " v AS (INSERT INTO vms (name, user_id, osf_id, ip, mac)"
            "  SELECT 'vm-' || login, id, %(osf)s,"
            "   ('10.' || (id / 65536) || '.' || (id / 256 %% 256) || '.' || (id %% 256))::inet,"
            "   ('54:52:00:' || lpad(to_hex(id / 65536), 2, '0') || ':'"
            "   || lpad(to_hex(id / 256 %% 256), 2, '0') || ':' || lpad(to_hex(id %% 256), 2, '0'))::macaddr"
            "  FROM u RETURNING id, user_id),"
            " r AS (INSERT INTO vm_runtimes (vm_id, host_id, vm_state, vm_address, vm_vma_port,"
            "   vm_x_port) SELECT id, %(host)s, 'running', '127.0.0.1', %(vma)s, %(x)s FROM v),"
            " c AS (INSERT INTO vm_counters (vm_id) SELECT id FROM v)"
            " SELECT v.id AS vm, u.login FROM v JOIN u ON u.id = v.user_id ORDER BY v.id",
            {"pw": self.hashed, "a": first, "b": first + count - 1, "osf": self.osf,
             "host": self.host, "vma": self.vma_port, "x": x_port})
        out = []
        for row in rows:
            if auth == "password":
                value = "Basic " + base64.b64encode(f"{row['login']}:secret".encode()).decode()
            else:
                token = f"bench-{row['login']}-{os.getpid()}"
                out.append((row["vm"], token))
                continue
            out.append((row["vm"], value))
        if auth == "token":
            from qvd.l7r.auth.tokens import encode_token
            self.query("INSERT INTO user_tokens (token, user_id, vm_id, expiration, multi_use)"
                       " SELECT t, v.user_id, v.id, %s, true FROM vms v"
                       " JOIN unnest(%s::int[], %s::text[]) AS x(vm, t) ON x.vm = v.id",
                       (int(time.time()) + 86400, [v for v, _ in out], [t for _, t in out]))
            out = [(vm, "Bearer " + encode_token(t)) for vm, t in out]
        self.query("ANALYZE")
        return out

    def start_l7r(self):
        from qvd.config import Config, ConfigError
        from qvd.testing import pg
        big = "1000000000"
        values = {
            "nodename": "bench",
            "database.host": self.pg.socketdir,
            "database.name": self.dbname,
            "path.state": f"{self.tmp}/state",
            "path.run": f"{self.tmp}/run",
            "path.log": f"{self.tmp}/log",
            "path.l7r.ssl": self.ssl_dir,
            "l7r.auth.failure.delay": "0",
            "l7r.auth.ratelimit.login.max": big,
            "l7r.auth.ratelimit.login_global.max": big,
            "l7r.auth.ratelimit.address.max": big,
            "l7r.connections.per_address": "100000",
        }
        if self.args.workers is not None:
            try:
                Config.load(os.devnull).get("l7r.workers")
            except ConfigError:
                raise SystemExit("--workers: this L7R has no l7r.workers setting yet")
            values["l7r.workers"] = str(self.args.workers)
        conf = os.path.join(self.tmp, "node.conf")
        with open(conf, "w") as f:
            f.writelines(f"{k} = {v}\n" for k, v in values.items())
        del pg
        self.l7r_log = os.path.join(self.tmp, "l7r.log")
        self.l7r = self.spawn(
            [TWISTD, "-n", "--pidfile=", "-l", self.l7r_log, "qvd-l7r", "--config", conf,
             "--listen", "ssl:0:interface=127.0.0.1:backlog=4096"],
            env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            if self.l7r.poll() is not None:
                raise SystemExit(f"the L7R exited ({self.l7r.returncode}):\n" + self.l7r_tail())
            with contextlib.suppress(FileNotFoundError), open(self.l7r_log) as f:
                found = re.search(r"L7R listening on .*port=(\d+)", f.read())
                if found:
                    self.l7r_port = int(found.group(1))
                    break
            if time.monotonic() > deadline:
                raise SystemExit("the L7R does not listen after 60 s:\n" + self.l7r_tail())
            time.sleep(0.1)

    def l7r_tail(self, lines=20):
        with contextlib.suppress(FileNotFoundError), open(self.l7r_log, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
        return ""

    # -- one measurement --

    def server(self, name):
        """(pid of the tree's root, port per backend kind)."""
        if name == "haproxy":
            return self.haproxy.pid, self.haproxy_ports
        return self.l7r.pid, {k: self.l7r_port for k in self.backend_ports}

    def others(self):
        """The processes shown apart: {label: root pids}."""
        found = {"backend": [self.backend.pid]}
        if self.args.only != "haproxy":
            found["agent"] = [self.vma.pid]
            with open(os.path.join(self.pg.datadir, "postmaster.pid")) as f:
                found["postgres"] = [int(f.readline())]
        return found

    def measure(self, server, kind, streams, version, auth=None):
        """
        Run C{streams} client threads of C{kind} against C{server}; the
        figures of the measured window.
        """
        args = self.args
        root, ports = self.server(server)
        port = ports["session" if kind == "idle" else kind]
        rss_before = tree_rss(root)
        if server == "qvd":
            if kind == "idle":
                whos = [[vm] for vm in self.make_vms(streams, "session", auth)]
            elif kind == "session":
                whos = [self.make_vms(VMS_PER_SESSION_CLIENT, kind, auth) for _ in range(streams)]
            else:
                whos = [[vm] for vm in self.make_vms(streams, kind, auth)]
        else:
            whos = [None] * streams
        nprocs = max(1, min(args.client_procs, streams))
        counts = multiprocessing.RawArray("Q", streams)
        ready = multiprocessing.RawArray("b", streams)
        stop = multiprocessing.RawArray("b", 1)
        errors, info = multiprocessing.SimpleQueue(), multiprocessing.SimpleQueue()
        clients, slot = [], 0
        for p in range(nprocs):
            mine = whos[p::nprocs]
            proc = multiprocessing.Process(
                target=client_proc, daemon=True,
                args=(kind, port, version, mine, counts, slot, stop, ready, errors, info))
            # the slots of process p are slot .. slot+len(mine)-1
            clients.append(proc)
            proc.start()
            slot += len(mine)
        try:
            deadline = time.monotonic() + (600 if kind == "idle" else 120)
            while sum(1 for r in ready if r) < streams:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{server} {kind}: streams not set up in time")
                time.sleep(0.05)
            failed = sum(1 for r in ready if r < 0)
            time.sleep(args.warmup)
            others = self.others()
            client_pids = [c.pid for c in clients]

            def snapshot():
                others_cpu = {k: tree_cpu(*v) for k, v in others.items()}
                others_cpu["machine"], others_cpu["softirq"] = machine_cpu()
                return (time.monotonic(), sum(counts), tree_cpu(root), tree_cpu(*client_pids),
                        others_cpu)
            a = snapshot()
            time.sleep(args.seconds)
            b = snapshot()
            rss_after = tree_rss(root)
        finally:
            stop[0] = 1
            for c in clients:
                c.join(10)
                if c.is_alive():
                    c.terminate()
                    c.join(5)
        errs = []
        while not errors.empty():
            errs.append(errors.get())
        cipher = info.get() if not info.empty() else "?"
        wall = b[0] - a[0]
        done = b[1] - a[1]
        result = {"wall": wall, "count": done, "server_cpu": b[2] - a[2],
                  "client_cpu": b[3] - a[3],
                  "others": {k: b[4][k] - a[4][k] for k in b[4]},
                  "errors": errs, "failed_streams": failed, "cipher": cipher,
                  "streams": streams, "rss_delta": rss_after - rss_before}
        if server == "qvd":
            time.sleep(0.5)             # the sessions' release, before the next phase
        return result


# --- report -------------------------------------------------------------------------

SCENARIOS = [
    # (label, kind, streams (None: -n), version, qvd auth, figure)
    ("1 stream", "bulk", 1, "1.3", "token"),
    ("N streams", "bulk", None, "1.3", "token"),
    ("sessions", "session", SESSION_CLIENTS, "1.3", "token"),
    ("sessions pw", "session", SESSION_CLIENTS, "1.3", "password"),
    ("N streams 1.2", "bulk", None, "1.2", "token"),
    ("sessions 1.2", "session", SESSION_CLIENTS, "1.2", "token"),
    ("idle", "idle", None, "1.3", "token"),
]


def figures(label, kind, r):
    """The printed figures of one measurement."""
    out = {}
    if kind == "idle":
        held = r["streams"] - r["failed_streams"]
        out["kib_per_session"] = r["rss_delta"] / 1024 / held if held else float("nan")
        out["idle_cpu_ms_per_s"] = 1e3 * r["server_cpu"] / r["wall"]
        out["failed_sessions"] = r["failed_streams"]
    elif kind == "bulk":
        gb = r["count"] / 1e9
        out["cpu_s_per_gb"] = r["server_cpu"] / gb if gb else float("nan")
        out["mb_s"] = r["count"] / 1e6 / r["wall"]
        out["client_cpu_s_per_gb"] = r["client_cpu"] / gb if gb else float("nan")
    else:
        n = r["count"]
        out["cpu_ms_per_session"] = 1e3 * r["server_cpu"] / n if n else float("nan")
        out["sessions_s"] = n / r["wall"]
        out["client_cpu_ms_per_session"] = 1e3 * r["client_cpu"] / n if n else float("nan")
        if "postgres" in r["others"]:
            out["pg_cpu_ms_per_session"] = 1e3 * r["others"]["postgres"] / n if n else float("nan")
            out["agent_cpu_ms_per_session"] = 1e3 * r["others"]["agent"] / n if n else float("nan")
    out["server_cores"] = r["server_cpu"] / r["wall"]
    out["client_cores"] = r["client_cpu"] / r["wall"]
    out["backend_cores"] = r["others"]["backend"] / r["wall"]
    out["machine_cores"] = r["others"]["machine"] / r["wall"]
    out["softirq_cores"] = r["others"]["softirq"] / r["wall"]
    return out


def median(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def report(args, results, ciphers):
    servers = [s for s in ("haproxy", "qvd") if args.only in (None, s)]
    print()
    print(f"{os.cpu_count()} CPUs, {args.runs} run(s) of {args.seconds:g} s per figure, "
          f"{args.n} streams, bulk direction {args.direction}, "
          f"{args.client_procs} client processes from {len(SOURCES)} addresses, L7R workers "
          f"{'l7r.workers default' if args.workers is None else args.workers}; medians (ratio: "
          f"median of the per-run qvd/HAProxy ratios)")
    for server in servers:
        print(f"  {server}: " + ", ".join(f"{label} {c}" for label, c in ciphers.get(server, {}).items()))
    rows = [
        ("relay CPU-s per GB, 1 stream, TLS 1.3", "1 stream", "cpu_s_per_gb", "{:.2f}"),
        (f"relay CPU-s per GB, {args.n} streams, TLS 1.3", "N streams", "cpu_s_per_gb", "{:.2f}"),
        (f"aggregate MB/s, {args.n} streams, TLS 1.3", "N streams", "mb_s", "{:.0f}"),
        (f"relay CPU-s per GB, {args.n} streams, TLS 1.2", "N streams 1.2", "cpu_s_per_gb", "{:.2f}"),
        (f"aggregate MB/s, {args.n} streams, TLS 1.2", "N streams 1.2", "mb_s", "{:.0f}"),
        ("CPU-ms per new session, token, TLS 1.3", "sessions", "cpu_ms_per_session", "{:.2f}"),
        ("new sessions/s, 50 clients, token, TLS 1.3", "sessions", "sessions_s", "{:.0f}"),
        ("CPU-ms per new session, password, TLS 1.3", "sessions pw", "cpu_ms_per_session", "{:.2f}"),
        ("new sessions/s, 50 clients, password, TLS 1.3", "sessions pw", "sessions_s", "{:.1f}"),
        ("CPU-ms per new session, token, TLS 1.2", "sessions 1.2", "cpu_ms_per_session", "{:.2f}"),
        ("new sessions/s, 50 clients, token, TLS 1.2", "sessions 1.2", "sessions_s", "{:.0f}"),
        (f"RSS KiB per session, {args.idle} idle sessions", "idle", "kib_per_session", "{:.1f}"),
        (f"CPU-ms per s, {args.idle} idle sessions", "idle", "idle_cpu_ms_per_s", "{:.1f}"),
        (f"sessions not set up, of {args.idle}", "idle", "failed_sessions", "{:.0f}"),
    ]
    width = max(len(r[0]) for r in rows) + 2
    print()
    print(f"{'':{width}}" + "".join(f"{s:>12}" for s in servers)
          + ("  qvd/HAProxy" if len(servers) == 2 else ""))
    for title, label, key, fmt in rows:
        per = {s: [figures(label, kind_of(label), r)[key]
                   for r in results.get((s, label), [])] for s in servers}
        if not any(per.values()):
            continue
        line = f"{title:{width}}"
        for s in servers:
            line += f"{fmt.format(median(per[s])) if per[s] else '-':>12}"
        if len(servers) == 2:
            # password sessions are compared with HAProxy's (token-free) TLS session
            base = "sessions" if label == "sessions pw" else label
            hap = [figures(base, kind_of(base), r)[key]
                   for r in results.get(("haproxy", base), [])]
            ratios = [q / h for q, h in zip(per["qvd"], hap) if h]
            line += f"{median(ratios):>12.2f}x" if ratios else f"{'-':>13}"
        print(line)
    print()
    print("Beside the figures (medians): cores busy in the window (server, client, backend,"
          " the whole machine and its softirq part: loopback TCP work, charged to whichever"
          " process ran, or to none); per session: client, PostgreSQL and agent CPU-ms;"
          " client CPU-s per GB")
    for (server, label), rs in sorted(results.items()):
        fs = [figures(label, kind_of(label), r) for r in rs]
        keys = ["server_cores", "client_cores", "backend_cores", "machine_cores",
                "softirq_cores", "client_cpu_s_per_gb",
                "client_cpu_ms_per_session", "pg_cpu_ms_per_session", "agent_cpu_ms_per_session"]
        parts = [f"{k.replace('_', ' ')} {median([f[k] for f in fs]):.2f}"
                 for k in keys if k in fs[0]]
        errs = sum(len(r["errors"]) for r in rs) + sum(r["failed_streams"] for r in rs)
        print(f"  {server:8s} {label:14s} " + ", ".join(parts) + f", errors {errs}")
        for r in rs:
            for e in r["errors"][:3]:
                print(f"      {e}")


def kind_of(label):
    if label == "idle":
        return "idle"
    return "session" if label.startswith("sessions") else "bulk"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=100, help="concurrent bulk streams (default 100)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window per figure")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each window")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", choices=("haproxy", "qvd"))
    parser.add_argument("--direction", choices=("down", "up"), default="down",
                        help="bulk bytes backend->client (down, NX display) or client->backend")
    parser.add_argument("--scenarios", default=None,
                        help="comma list of: " + ", ".join(s[0] for s in SCENARIOS))
    parser.add_argument("--client-procs", type=int, default=4, help="client processes")
    parser.add_argument("--haproxy-threads", type=int, default=None,
                        help="HAProxy's nbthread (default: its own, one per CPU)")
    parser.add_argument("--idle", type=int, default=5000,
                        help="sessions held open without traffic in the 'idle' scenario")
    parser.add_argument("--sources", type=int, default=8,
                        help="client addresses 127.0.0.1..N the connections come from in turn, "
                             "as users come from many (default 8; the L7R's workers are "
                             "chosen by client address)")
    parser.add_argument("--workers", type=int, default=None,
                        help="the L7R's l7r.workers (when the L7R has the setting)")
    parser.add_argument("--backend", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--vma", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    SOURCES[:] = [f"127.0.0.{i}" for i in range(1, max(1, args.sources) + 1)]
    if args.backend:
        return backend_main()
    if args.vma:
        return vma_main()
    if shutil.which("haproxy") is None and args.only != "qvd":
        raise SystemExit("haproxy is not installed (apt-get install haproxy; deploy/setup.sh does)")
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    multiprocessing.set_start_method("fork")
    wanted = args.scenarios.split(",") if args.scenarios else [s[0] for s in SCENARIOS]
    servers = [s for s in ("haproxy", "qvd") if args.only in (None, s)]
    # Ctrl-C (also when started with SIGINT ignored, as from a script's "&") and
    # SIGTERM both unwind through Bench.close.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    results, ciphers = {}, {}
    with Bench(args) as bench:
        bench.start()
        for run in range(args.runs):
            for label, kind, streams, version, auth in SCENARIOS:
                if label not in wanted:
                    continue
                for server in servers:
                    if auth == "password" and server == "haproxy":
                        continue
                    k = args.direction if kind == "bulk" else kind
                    if kind == "idle":
                        streams = args.idle
                    r = bench.measure(server, k, streams or args.n, version, auth)
                    results.setdefault((server, label), []).append(r)
                    ciphers.setdefault(server, {})[f"TLS {version}"] = r["cipher"]
                    f = figures(label, kind, r)
                    print(f"run {run + 1} {server:8s} {label:14s} "
                          + " ".join(f"{k} {v:.2f}" for k, v in f.items())
                          + (f" errors {len(r['errors'])}" if r["errors"] else ""), flush=True)
    report(args, results, ciphers)


if __name__ == "__main__":
    main()
