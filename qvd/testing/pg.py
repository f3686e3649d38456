"""
PostgreSQL for tests: one private cluster per test run, a migrated template
database, and a fresh database per test case cloned from the template.

    from qvd.testing.pg import DatabaseTestMixin
    class MyTests(DatabaseTestMixin, unittest.TestCase):
        def test_x(self):
            self.dsn            # a fresh, migrated database for this test
            self.query("SELECT count(*) FROM tenants")

C{self.dsn} is the superuser's (a test sees and changes everything); the
daemons a test runs connect as qvd's roles, as in production
(L{role_dsn}): the template belongs to the admin role
C{qvd} and carries the grants of L{qvd.db.roles}, and so does every clone.

The cluster lives under C{$QVD_TEST_PG} (default a new directory in /tmp) and
is stopped and removed when the test process exits.
"""

import atexit
import itertools
import os
import tempfile
import time

from qvd.db import migrate, roles, sync
from qvd.db.cluster import PrivateCluster

TEMPLATE = "qvd_template"

#: The roles of the test cluster: the configuration's defaults.
ROLES = {"admin": "qvd", "l7r": "qvd_l7r", "hkd": "qvd_hkd"}

_cluster = None
_counter = itertools.count(1)
timings = {}


def cluster():
    """
    The test run's cluster, started (and its template migrated) on first use.
    """
    global _cluster
    if _cluster is None:
        root = os.environ.get("QVD_TEST_PG") or tempfile.mkdtemp(prefix="qvd-test-pg-")
        if os.geteuid() == 0:
            os.chmod(root, 0o755)
        c = PrivateCluster(root, fast=True, roles=tuple(ROLES.values()))
        timings["cluster_start"] = c.ensure()
        began = time.monotonic()
        with sync.connect(c.dsn()) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                roles.ensure(cur, ROLES)
        if sync.ensure_database(c.dsn(), TEMPLATE, owner=ROLES["admin"]):
            with sync.connect(c.dsn(TEMPLATE, user=ROLES["admin"])) as conn:
                migrate.upgrade(conn)
                with conn.cursor() as cur:
                    roles.grant(cur, ROLES)
                conn.commit()
        timings["template"] = time.monotonic() - began
        _cluster = c
        if not os.environ.get("QVD_TEST_PG"):
            atexit.register(c.destroy)
    return _cluster


def fresh_database():
    """
    Create a new database cloned from the migrated template.

    @return: (name, dsn)
    """
    c = cluster()
    name = f"t{os.getpid()}_{next(_counter)}"
    began = time.monotonic()
    sync.ensure_database(c.dsn(), name, template=TEMPLATE, owner=ROLES["admin"])
    timings.setdefault("fresh_db", []).append(time.monotonic() - began)
    return name, c.dsn(name)


def role_dsn(dbname, kind):
    """
    The DSN of database C{dbname} as the role of C{kind} (admin, l7r, hkd).
    """
    return cluster().dsn(dbname, user=ROLES[kind])


def drop_database(name):
    with sync.connect(cluster().dsn()) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class DatabaseTestMixin:
    """
    Gives each test C{self.dsn}, a fresh migrated database, dropped afterwards.
    """

    def setUp(self):
        super().setUp()
        self.dbname, self.dsn = fresh_database()
        self.addCleanup(drop_database, self.dbname)

    def query(self, sql, args=None):
        """
        Run C{sql} in its own transaction; return all rows as dicts (or []).
        """
        with sync.connect(self.dsn) as conn:
            def run(cur):
                cur.execute(sql, args)
                return [dict(r) for r in cur.fetchall()] if cur.description else []
            return sync.transaction(conn, run)
