"""
Benchmark of the L7R relay: N concurrent sessions relayed by a real L7R over
TLS to an echo server (standing in for nxagent), compared with N direct TLS
connections to a TLS echo server, measured in the same run. Each L7R session
starts with an NX greeting (the relay puts the session's cookie into it); its
echo ends the session's setup.

    PYTHONPATH=. /work/main/.venv/bin/python bench/bench_relay.py -n 1000 -r 20 -s 4096

A child process runs the servers (PostgreSQL test cluster, the L7R, a fake
VMA, the plain echo and a TLS echo); this process runs the clients, so the
two share the machine's cores like real clients and server would. For each
mode it prints session setup time, round-trip latency p50/p95 and echo
throughput, then the L7R/direct ratios. Everything listens on 127.0.0.1.
"""

import argparse
import base64
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def serve(n):
    """Child: start everything, print the ports as JSON, run until stdin closes."""
    import tempfile

    from twisted.internet import defer, reactor, ssl, stdio
    from twisted.protocols import basic

    from qvd.config import Config
    from qvd.l7r import tls
    from qvd.l7r.service import L7RService
    from qvd.passwords import legacy_hash
    from qvd.testing import pg
    from qvd.testing.fakeauth import FakeAuthenticator
    from qvd.testing.fakevma import EchoFactory, FakeVMA

    tmp = tempfile.mkdtemp(prefix="qvd-bench-l7r-")
    ssl_dir = os.path.join(tmp, "ssl")
    key, cert = tls.self_signed(ssl_dir, "localhost")
    name, dsn = pg.fresh_database()
    vma_port = reactor.listenTCP(0, FakeVMA().site(), interface="127.0.0.1")
    echo_port = reactor.listenTCP(0, EchoFactory(), interface="127.0.0.1", backlog=4096)
    with open(key, "rb") as k, open(cert, "rb") as c:
        options = ssl.CertificateOptions(
            privateKey=ssl.KeyPair.load(k.read(), 1).original,
            certificate=ssl.Certificate.loadPEM(c.read()).original)
    tls_echo_port = reactor.listenSSL(0, EchoFactory(), options, interface="127.0.0.1",
                                      backlog=4096)
    from qvd.db import sync
    with sync.connect(dsn) as conn:
        def seed(cur):
            cur.execute("INSERT INTO hosts (name, address) VALUES ('bench', '127.0.0.1') RETURNING id")
            host = cur.fetchone()["id"]
            cur.execute("INSERT INTO host_runtimes (host_id, state) VALUES (%s, 'running')", (host,))
            password = legacy_hash("secret", "qvd1234")
            cur.execute("INSERT INTO osfs (tenant_id, name) VALUES (1, 'o') RETURNING id")
            osf = cur.fetchone()["id"]
            ids = []
            for i in range(n):
                # One user per session, as in real life (a user has one session).
                cur.execute("INSERT INTO users (tenant_id, login, password) VALUES (1, %s, %s)"
                            " RETURNING id", (f"u{i}", password))
                user = cur.fetchone()["id"]
                cur.execute("INSERT INTO vms (name, user_id, osf_id, ip, mac) VALUES"
                            " (%s, %s, %s, %s, %s) RETURNING id",
                            (f"vm{i}", user, osf, f"10.{i // 65536}.{i // 256 % 256}.{i % 256}",
                             "54:52:00:%02x:%02x:%02x" % (i >> 16 & 255, i >> 8 & 255, i & 255)))
                vm = cur.fetchone()["id"]
                ids.append(vm)
                cur.execute("INSERT INTO vm_runtimes (vm_id, host_id, vm_state, vm_address,"
                            " vm_vma_port, vm_x_port) VALUES (%s, %s, 'running', '127.0.0.1', %s, %s)",
                            (vm, host, vma_port.getHost().port, echo_port.getHost().port))
            return ids
        ids = sync.transaction(conn, seed)
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("ANALYZE")
    config = Config.load(os.devnull, overrides={
        "nodename": "bench", "path.state": tmp, "path.l7r.ssl": ssl_dir,
        "database.pool.size": "8", "internal.l7r.poll_time.x": "0.05"})
    svc = L7RService(config, "ssl:0:interface=127.0.0.1:backlog=4096", reactor=reactor,
                     dsn=pg.role_dsn(name, "l7r"), authenticator=FakeAuthenticator)

    class Stdin(basic.LineReceiver):
        delimiter = b"\n"

        def connectionLost(self, reason):
            reactor.stop()

    async def start():
        await svc.start()
        print(json.dumps({"l7r": svc.port.getHost().port, "tls_echo": tls_echo_port.getHost().port,
                          "vms": ids}), flush=True)
    stdio.StandardIO(Stdin())
    defer.ensureDeferred(start()).addErrback(lambda f: (f.printTraceback(), reactor.stop()))
    reactor.run()


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))] if values else float("nan")


def run_clients(ports, n, rounds, size, mode, concurrency):
    from twisted.internet import defer, endpoints, protocol, reactor, ssl

    payload = os.urandom(size)
    # What nxproxy sends first; the L7R echoes it back with a cookie inserted.
    greeting = b"NXPROXY-3.5.0-3.5.99 stream=default,data=default "
    greeting_echo = len(greeting) + len(b"cookie=,") + 32
    latencies, setups, spans = [], [], []
    ready = []

    def set_ready(client):
        # A barrier: the echo phase starts for every session at once, so both
        # modes measure the same load (setup is measured apart).
        ready.append(client)
        if len(ready) + len(failures) >= n:
            for c in ready:
                c.send()
    failures = []

    from twisted.internet.interfaces import IHandshakeListener
    from zope.interface import implementer

    @implementer(IHandshakeListener)
    class Client(protocol.Protocol):
        def __init__(self, vm_id, index):
            self.vm_id = vm_id
            self.index = index
            self.buf = bytearray()
            self.phase = "http" if mode == "l7r" else "echo"
            self.done = defer.Deferred()
            self.round = 0

        def connectionMade(self):
            self.t0 = time.perf_counter()
            self.handshake = self.t0
            if self.phase == "http":
                basic = base64.b64encode(f"u{self.index}:secret".encode()).decode()
                self.transport.write(
                    f"GET /qvd/connect_to_vm?id={self.vm_id}&qvd.client.os=linux HTTP/1.1\r\n"
                    f"Authorization: Basic {basic}\r\nConnection: Upgrade\r\nUpgrade: QVD/1.0\r\n\r\n"
                    .encode() + greeting)

        def handshakeCompleted(self):
            # Direct mode: ready once TLS is up (the L7R mode is ready at its 101).
            if mode != "l7r":
                setups.append(time.perf_counter() - self.t0)
                set_ready(self)

        def send(self):
            self.sent = time.perf_counter()
            if self.round == 0:
                self.echo_start = self.sent
            self.transport.write(payload)

        def dataReceived(self, data):
            self.buf += data
            if self.phase == "http":
                while b"\r\n\r\n" in self.buf:
                    head, _, rest = bytes(self.buf).partition(b"\r\n\r\n")
                    self.buf = bytearray(rest)
                    status = int(head.split(b" ")[1])
                    if status == 101:
                        self.phase = "greeting"
                        break
                    if status != 102:
                        failures.append(head)
                        self.transport.loseConnection()
                        return
                else:
                    return
            if self.phase == "greeting":
                # The NX greeting back from the echo, cookie and all: set up.
                if len(self.buf) >= greeting_echo:
                    del self.buf[:greeting_echo]
                    setups.append(time.perf_counter() - self.t0)
                    self.phase = "echo"
                    set_ready(self)
                return
            if len(self.buf) >= size:
                latencies.append(time.perf_counter() - self.sent)
                del self.buf[:size]
                self.round += 1
                if self.round >= rounds:
                    spans.append((self.echo_start, time.perf_counter()))
                    self.transport.loseConnection()
                else:
                    self.send()

        def connectionLost(self, reason):
            if self.round < rounds:
                failures.append(str(reason.value))
            self.done.callback(None)

    port = ports["l7r"] if mode == "l7r" else ports["tls_echo"]
    vms = ports["vms"]

    async def one(i):
        endpoint = endpoints.SSL4ClientEndpoint(reactor, "127.0.0.1", port,
                                                ssl.CertificateOptions(), timeout=60)
        client = Client(vms[i % len(vms)], i % len(vms))
        try:
            await endpoints.connectProtocol(endpoint, client)
        except Exception as e:
            failures.append(str(e))
            return
        await client.done

    async def main(_):
        sem = defer.DeferredSemaphore(concurrency)
        began = time.perf_counter()
        await defer.gatherResults([sem.run(lambda i=i: defer.ensureDeferred(one(i)))
                                   for i in range(n)])
        return time.perf_counter() - began

    result = {}

    def go():
        d = defer.ensureDeferred(main(reactor))
        d.addCallback(lambda elapsed: result.update(elapsed=elapsed))
        d.addErrback(lambda f: (f.printTraceback(), result.update(elapsed=float("nan"))))
        d.addBoth(lambda _: reactor.stop())
    reactor.callWhenRunning(go)
    reactor.run()
    if spans:
        result["elapsed"] = max(e for _, e in spans) - min(b for b, _ in spans)
    return result["elapsed"], latencies, setups, failures


def client_process(args):
    ports = json.loads(args.ports)
    elapsed, lat, setups, failures = run_clients(ports, args.n, args.rounds, args.size, args.mode,
                                                 args.concurrency)
    print(json.dumps({"elapsed": elapsed, "lat": lat, "setups": setups,
                      "failures": failures[:5], "nfail": len(failures)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=500, help="concurrent sessions")
    parser.add_argument("-r", "--rounds", type=int, default=20, help="round trips per session")
    parser.add_argument("-s", "--size", type=int, default=4096, help="bytes per round trip")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.n)
    if args.mode:
        return client_process(args)
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    env = dict(os.environ, PYTHONPATH=ROOT)
    server = subprocess.Popen([sys.executable, __file__, "--serve", "-n", str(args.n)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    try:
        ports = server.stdout.readline()
        if not ports:
            raise SystemExit("the server process did not start")
        results = {}
        for mode in ("direct", "l7r"):
            out = subprocess.run(
                [sys.executable, __file__, "--mode", mode, "--ports", ports.strip(), "-n",
                 str(args.n), "-r", str(args.rounds), "-s", str(args.size),
                 "--concurrency", str(args.n)],
                capture_output=True, text=True, env=env, timeout=900)
            if out.returncode:
                raise SystemExit(out.stderr[-3000:])
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    print(f"{args.n} concurrent sessions, {args.rounds} round trips of {args.size} bytes each")
    summary = {}
    for mode, r in results.items():
        total = 2 * args.size * len(r["lat"])
        thr = total / r["elapsed"] / 1e6
        p50, p95 = percentile(r["lat"], 0.5) * 1e3, percentile(r["lat"], 0.95) * 1e3
        setup50 = percentile(r["setups"], 0.5) * 1e3
        summary[mode] = (thr, p50, p95)
        print(f"{mode:>6}: {thr:8.1f} MB/s  rtt p50 {p50:7.2f} ms  p95 {p95:7.2f} ms"
              f"  setup p50 {setup50:8.1f} ms  relay phase {r['elapsed']:.2f} s  failures {r['nfail']}"
              + (f" {r['failures']}" if r["nfail"] else ""))
    d, l = summary["direct"], summary["l7r"]
    print(f"ratio l7r/direct: throughput {l[0] / d[0]:.2f}  p50 {l[1] / d[1]:.2f}  p95 {l[2] / d[2]:.2f}")


if __name__ == "__main__":
    main()
