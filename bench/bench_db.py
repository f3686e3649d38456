"""
Cost of the test database fixture: a fresh database cloned from the migrated
template (what qvd.testing.pg does) against the peer, creating an empty
database and applying the migrations to it, measured in the same run.
Also prints the private cluster's initdb + start time.

    .venv/bin/python bench/bench_db.py [N]
"""

import statistics
import sys
import tempfile
import time

from qvd.db import migrate, sync
from qvd.db.cluster import PrivateCluster


def main(n=20):
    root = tempfile.mkdtemp(prefix="qvd-bench-db-")
    import os
    os.chmod(root, 0o755)
    cluster = PrivateCluster(root, fast=True)
    began = time.monotonic()
    cluster.init()
    init_s = time.monotonic() - began
    began = time.monotonic()
    cluster.start()
    start_s = time.monotonic() - began
    try:
        sync.ensure_database(cluster.dsn(), "tmpl")
        with sync.connect(cluster.dsn("tmpl")) as conn:
            migrate.upgrade(conn)
        clone, fresh = [], []
        for i in range(n):
            began = time.monotonic()
            sync.ensure_database(cluster.dsn(), f"c{i}", template="tmpl")
            clone.append(time.monotonic() - began)
            began = time.monotonic()
            sync.ensure_database(cluster.dsn(), f"m{i}")
            with sync.connect(cluster.dsn(f"m{i}")) as conn:
                migrate.upgrade(conn)
            fresh.append(time.monotonic() - began)
        print(f"private cluster: initdb {init_s * 1000:.0f} ms, start {start_s * 1000:.0f} ms")
        for name, xs in (("clone from template", clone), ("create + migrate (peer)", fresh)):
            print(f"{name:26s} p50 {statistics.median(xs) * 1000:7.1f} ms  "
                  f"max {max(xs) * 1000:7.1f} ms  (n={n})")
        print(f"ratio clone/peer: {statistics.median(clone) / statistics.median(fresh):.2f}")
    finally:
        cluster.destroy()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
