"""
A Monday 9:00 login storm against a real L7R: N password logins (argon2id,
one user each) arriving evenly within T seconds, each a new TLS connection
asking /qvd/list_of_vm. A login answered 503 retries after its Retry-After.
Two L7Rs in one run: qvd's (password checks in the bounded process pool) and
the peer, the same L7R with the checks in the reactor's thread pool as
before. Prints, for each: logins that succeeded, 503s seen, timeouts and
other failures, and p50/p95/max seconds from arrival to the 200.

    PYTHONPATH=. .venv/bin/python bench/bench_login_storm.py [-n 500] [-t 10]

A child process runs PostgreSQL's test cluster and the L7R; this process
runs the clients (a thread each, at most 128 at once).
"""

import argparse
import base64
import concurrent.futures
import json
import os
import socket
import ssl as stdlib_ssl
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def serve(n, mode, queue):
    """Child: the L7R on a port printed as JSON; runs until stdin closes."""
    import tempfile

    from twisted.internet import defer, reactor, stdio
    from twisted.protocols import basic

    from qvd import passwords
    from qvd.config import Config
    from qvd.db import sync
    from qvd.l7r import tls
    from qvd.l7r.service import L7RService, make_authenticator
    from qvd.testing import pg

    tmp = tempfile.mkdtemp(prefix="qvd-bench-storm-")
    tls.self_signed(os.path.join(tmp, "ssl"), "localhost")
    name, dsn = pg.fresh_database()
    hashed = passwords.hash_password("secret")
    with sync.connect(dsn) as conn:
        def seed(cur):
            cur.execute("INSERT INTO hosts (name, address) VALUES ('bench', '127.0.0.1')"
                        " RETURNING id")
            host = cur.fetchone()["id"]
            cur.execute("INSERT INTO host_runtimes (host_id, state) VALUES (%s, 'running')",
                        (host,))
            for i in range(n):
                cur.execute("INSERT INTO users (tenant_id, login, password) VALUES (1, %s, %s)",
                            (f"u{i}", hashed))
        sync.transaction(conn, seed)
    config = Config.load(os.devnull, overrides={
        "nodename": "bench", "path.state": tmp, "path.l7r.ssl": os.path.join(tmp, "ssl"),
        "database.pool.size": "8", "l7r.auth.failure.delay": "0",
        "l7r.auth.ratelimit.login.max": str(n), "l7r.auth.ratelimit.address.max": str(10 * n),
        "l7r.auth.hash.queue": str(queue)})
    authenticator = None
    if mode == "threads":
        def authenticator(db):
            return make_authenticator(config, db, reactor)      # the reactor's thread pool
    svc = L7RService(config, "ssl:0:interface=127.0.0.1:backlog=4096", reactor=reactor,
                     dsn=pg.role_dsn(name, "l7r"), authenticator=authenticator)

    class Control(basic.LineReceiver):
        delimiter = b"\n"

        def connectionLost(self, reason):
            reactor.stop()

    async def start():
        await svc.start()
        print(json.dumps({"port": svc.port.getHost().port}), flush=True)
        stdio.StandardIO(Control())
    defer.ensureDeferred(start()).addErrback(lambda f: (f.printTraceback(), reactor.stop()))
    reactor.run()


def login(port, user, timeout):
    """One attempt: the HTTP status (None: no answer within C{timeout})."""
    ctx = stdlib_ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, stdlib_ssl.CERT_NONE
    basic = base64.b64encode(f"{user}:secret".encode()).decode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw:
            with ctx.wrap_socket(raw) as s:
                s.sendall(f"GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: Basic {basic}\r\n"
                          f"\r\n".encode())
                head = b""
                while b"\r\n" not in head:
                    chunk = s.recv(4096)
                    if not chunk:
                        return "closed"
                    head += chunk
        return int(head.split(b" ", 2)[1])
    except (socket.timeout, TimeoutError):
        return None
    except OSError as e:
        return f"error {e.errno}"


def one_user(port, user, arrival, timeout):
    """Wait for the arrival time, log in, retry after 1 s on 503: (seconds, statuses)."""
    delay = arrival - time.monotonic()
    if delay > 0:
        time.sleep(delay)
    began = time.monotonic()
    statuses = []
    for _ in range(30):
        status = login(port, user, timeout)
        statuses.append(status)
        if status != 503:
            break
        time.sleep(1.0)
    return time.monotonic() - began, statuses


def storm(mode, n, seconds, timeout, queue):
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve", str(n),
                              mode, str(queue)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        port = json.loads(child.stdout.readline())["port"]
        start = time.monotonic() + 1
        with concurrent.futures.ThreadPoolExecutor(128) as pool:
            results = list(pool.map(
                lambda i: one_user(port, f"u{i}", start + seconds * i / n, timeout), range(n)))
    finally:
        child.stdin.close()
        child.wait(30)
    ok = sorted(t for t, s in results if s[-1] == 200)
    busy = sum(s.count(503) for _, s in results)
    timeouts = sum(1 for _, s in results if s[-1] is None)
    other = sum(1 for _, s in results if s[-1] not in (200, None))

    def pct(p):
        return ok[min(len(ok) - 1, int(p * len(ok)))] if ok else float("nan")
    label = "qvd (process pool)" if mode == "pool" else "peer (thread pool)"
    print(f"{label:20s} ok {len(ok):4d}/{n}  503s {busy:4d}  timeouts {timeouts:4d}  "
          f"other {other:3d}  to 200: p50 {pct(0.5):6.2f} s  p95 {pct(0.95):6.2f} s  "
          f"max {ok[-1] if ok else float('nan'):6.2f} s")
    return ok, timeouts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=500, help="logins (default 500)")
    parser.add_argument("-t", type=float, default=10.0, help="within seconds (default 10)")
    parser.add_argument("--queue", type=int, default=1000,
                        help="l7r.auth.hash.queue of qvd's L7R (default 1000, its default)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="client's wait for an answer (default 30 s)")
    args = parser.parse_args()
    print(f"{args.n} password logins arriving within {args.t:.0f} s, {os.cpu_count()} CPUs")
    mine, _ = storm("pool", args.n, args.t, args.timeout, args.queue)
    peer, _ = storm("threads", args.n, args.t, args.timeout, args.queue)
    if mine and peer:
        p95 = lambda v: v[min(len(v) - 1, int(0.95 * len(v)))]  # noqa: E731
        print(f"ratio qvd/peer: p95 to 200 {p95(mine) / p95(peer):.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
    else:
        main()
