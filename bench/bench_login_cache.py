"""
Repeated password logins of the same users through the real authentication
chain (PostgreSQL's test cluster, argon2id in the L7R's process pool), with
and without the verified-credentials cache, in one run: what a client's
connect sequence and its reconnects cost.

    PYTHONPATH=. .venv/bin/python bench/bench_login_cache.py [-u 20] [-r 25] [-c 16] [--runs 3]

Each of U users logs in R times with its right password, C logins in flight
at once; runs alternate between the chain without the cache
(l7r.auth.cache.size = 0) and with it (the defaults). Prints, for each, the
median over the runs of logins per second, of the reactor process's CPU-ms
per login and of the password checks sent to the pool, and the ratio.
"""

import argparse
import base64
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def _basic(login, password):
    value = base64.b64encode(f"{login}:{password}".encode()).decode()
    return {"authorization": "Basic " + value}


async def one_run(reactor, db, pool, users, repeats, concurrency, cached):
    from twisted.internet import defer

    from qvd.config import Config, declared_keys
    from qvd.l7r.auth.chain import Authenticator

    node = {"l7r.auth.failure.delay": "0", "l7r.auth.ratelimit.login.max": "0",
            "l7r.auth.ratelimit.login_global.max": "0", "l7r.auth.ratelimit.address.max": "0"}
    if not cached:
        node["l7r.auth.cache.size"] = "0"
    checks = []

    def counting(function, *args):
        checks.append(function.__name__)
        return pool(function, *args)
    auth = Authenticator(db, Config(keys=declared_keys(), node=node), reactor,
                         blocking=counting)
    # Every user's logins spread over the run, as reconnects are.
    todo = [f"u{i}" for _ in range(repeats) for i in range(users)]
    began, cpu = time.perf_counter(), time.process_time()

    async def worker():
        while todo:
            login = todo.pop()
            await auth.authenticate(_basic(login, "secret"), "192.0.2.1")
    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(concurrency)])
    wall, cpu = time.perf_counter() - began, time.process_time() - cpu
    n = users * repeats
    return n / wall, 1000 * cpu / n, len(checks)


async def bench(reactor, args):
    from qvd import passwords
    from qvd.db import sync
    from qvd.db.pool import Database
    from qvd.l7r.auth.hashpool import HashPool
    from qvd.testing import pg

    name, dsn = pg.fresh_database()
    hashed = passwords.hash_password("secret")
    with sync.connect(dsn) as conn:
        def seed(cur):
            for i in range(args.u):
                cur.execute("INSERT INTO users (tenant_id, login, password) VALUES (1, %s, %s)",
                            (f"u{i}", hashed))
        sync.transaction(conn, seed)
    db = Database(pg.role_dsn(name, "l7r"), reactor, size=8)
    pool = HashPool(reactor)
    pool.start()
    try:
        results = {False: [], True: []}
        for _ in range(args.runs):
            for cached in (False, True):
                results[cached].append(await one_run(reactor, db, pool, args.u, args.r,
                                                     args.c, cached))
    finally:
        pool.stop()
        await db.stop()
    print(f"{args.u} users x {args.r} logins, {args.c} in flight, {pool.workers} hash "
          f"processes, {os.cpu_count()} CPUs; medians of {args.runs} alternating runs")
    medians = {}
    for cached, label in ((False, "without cache"), (True, "with cache")):
        rate, cpu, checks = (statistics.median(r[i] for r in results[cached]) for i in range(3))
        medians[cached] = rate
        print(f"{label:14s} {rate:8.0f} logins/s  {cpu:6.2f} CPU-ms/login (reactor)  "
              f"{checks:5.0f} password checks")
    print(f"ratio with/without: {medians[True] / medians[False]:.1f}x logins/s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-u", type=int, default=20, help="users (default 20)")
    parser.add_argument("-r", type=int, default=25, help="logins per user (default 25)")
    parser.add_argument("-c", type=int, default=16, help="logins in flight (default 16)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each (default 3)")
    args = parser.parse_args()
    from twisted.internet import defer, task
    task.react(lambda reactor: defer.ensureDeferred(bench(reactor, args)))


if __name__ == "__main__":
    main()
