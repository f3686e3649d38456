"""
Least privilege for the daemons' database access, on real PostgreSQL: the
private cluster authenticates by peer (never trust), each kind of program has
its own role, none a superuser, and each role can do what its program needs
and nothing more (qvd/db/roles.py). The daemons refuse to run as a superuser.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import psycopg2
from twisted.trial import unittest

from qvd.db import migrate, sync
from qvd.db.cluster import PrivateCluster, _find_binary
from qvd.testing import pg

BIN = os.path.dirname(sys.executable)
TWISTD = os.path.join(BIN, "twistd")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_as_nobody(socketdir, user):
    """psql as the operating-system user nobody, as database role C{user}."""
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", _find_binary("psql"), "-X", "-w", "-h", socketdir,
         "-U", user, "-d", "postgres", "-Atc", "SELECT current_user"],
        capture_output=True, text=True, timeout=30, cwd="/")


class ClusterAuthenticationTests(unittest.TestCase):
    """
    A cluster of its own, whose socket directory is opened to everybody as
    a careless administrator might: only peer authentication stands between
    another local user and the database.
    """

    def setUp(self):
        base = tempfile.mkdtemp(prefix="qvdt-dbauth-")
        self.addCleanup(shutil.rmtree, base, True)
        os.chmod(base, 0o755)
        self.cluster = PrivateCluster(os.path.join(base, "db"), fast=True)
        self.addCleanup(self.cluster.destroy)
        self.cluster.ensure()
        os.chmod(self.cluster.root, 0o755)
        os.chmod(self.cluster.socketdir, 0o777)

    def hba_methods(self):
        with open(os.path.join(self.cluster.datadir, "pg_hba.conf")) as f:
            lines = [line.split() for line in f if line.strip() and not line.startswith("#")]
        return lines

    def test_peer_only(self):
        """pg_hba.conf: unix socket, peer with qvd's map, nothing else (no trust, no host)."""
        self.assertEqual(self.hba_methods(), [["local", "all", "all", "peer", "map=qvd"]])

    def test_other_local_user_refused(self):
        """
        nobody reaches the socket but is refused as the superuser and as
        every role of qvd; root is admitted as each of them.
        """
        for role in ("postgres", "qvd", "qvd_l7r", "qvd_hkd"):
            proc = run_as_nobody(self.cluster.socketdir, role)
            self.assertNotEqual(proc.returncode, 0, proc.stdout)
            self.assertIn("Peer authentication failed", proc.stderr)
        with sync.connect(self.cluster.dsn()) as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT current_user")
                self.assertEqual(cur.fetchone()[0], "postgres")

    def test_trust_cluster_converted(self):
        """
        A cluster an older qvd made with trust is made peer-only again by the
        next start of any program (PrivateCluster.ensure), without a restart.
        """
        hba = os.path.join(self.cluster.datadir, "pg_hba.conf")
        with open(hba, "w") as f:
            f.write("local all all trust\n")
        subprocess.run(["runuser", "-u", "postgres", "--", _find_binary("pg_ctl"), "-D",
                        self.cluster.datadir, "reload"], check=True, capture_output=True)
        proc = run_as_nobody(self.cluster.socketdir, "postgres")
        self.assertEqual(proc.stdout.strip(), "postgres", "the trust line did not take effect")
        self.cluster.ensure()
        self.assertEqual(self.hba_methods(), [["local", "all", "all", "peer", "map=qvd"]])
        proc = run_as_nobody(self.cluster.socketdir, "postgres")
        self.assertIn("Peer authentication failed", proc.stderr)


class GrantTests(pg.DatabaseTestMixin, unittest.TestCase):
    """Each daemon's role against the statements it must and must not run."""

    def setUp(self):
        super().setUp()
        rows = self.query(
            "INSERT INTO users (tenant_id, login, password) VALUES (1, 'alice', 'x')"
            " RETURNING id")
        self.user = rows[0]["id"]
        osf = self.query("INSERT INTO osfs (tenant_id, name) VALUES (1, 'o') RETURNING id")
        self.vm = self.query("INSERT INTO vms (name, user_id, osf_id, ip, mac) VALUES"
                             " ('v', %s, %s, '10.0.0.5', '02:00:00:00:00:05') RETURNING id",
                             (self.user, osf[0]["id"]))[0]["id"]
        self.query("INSERT INTO vm_runtimes (vm_id) VALUES (%s)", (self.vm,))
        self.query("INSERT INTO hosts (name, address) VALUES ('n1', '10.0.0.1')")

    def attempt(self, kind, statement, args=None):
        """Run C{statement} as C{kind}'s role; None, or the SQLSTATE of its refusal."""
        with sync.connect(pg.role_dsn(self.dbname, kind)) as conn:
            try:
                with conn.cursor() as cur:
                    cur.execute(statement, args)
                conn.rollback()
            except psycopg2.Error as e:
                conn.rollback()
                return e.pgcode
        return None

    def assertRefused(self, kind, statement, args=None):
        self.assertEqual(self.attempt(kind, statement, args), "42501",
                         f"{kind} may run: {statement}")

    def assertAllowed(self, kind, statement, args=None):
        self.assertIsNone(self.attempt(kind, statement, args), f"{kind} may not run: {statement}")

    def test_no_superuser_no_role_rights(self):
        rows = self.query("SELECT rolname, rolsuper, rolcreaterole, rolcreatedb, rolreplication,"
                          " rolbypassrls FROM pg_roles WHERE rolname IN"
                          " ('qvd', 'qvd_l7r', 'qvd_hkd') ORDER BY rolname")
        self.assertEqual([r["rolname"] for r in rows], ["qvd", "qvd_hkd", "qvd_l7r"])
        for row in rows:
            self.assertFalse(any(v for k, v in row.items() if k != "rolname"), row)

    def test_l7r(self):
        for ok in ("SELECT login, password, blocked FROM users",
                   "SELECT vma_secret, vm_state, user_state FROM vm_runtimes",
                   "UPDATE users SET password = 'y' WHERE login = 'alice'",
                   "UPDATE vm_runtimes SET user_state = 'connecting'",
                   "INSERT INTO user_tokens (user_id, token, expiration)"
                   " VALUES (%s, 'tok', 0)" % self.user,
                   "SELECT value FROM configs"):
            self.assertAllowed("l7r", ok)
        for refused in ("UPDATE users SET blocked = true",
                        "UPDATE users SET login = 'root'",
                        "DELETE FROM users",
                        "UPDATE vms SET ip = '10.0.0.9'",
                        "UPDATE vm_runtimes SET blocked = false",
                        "UPDATE vm_runtimes SET vma_secret = 'known'",
                        "UPDATE vm_runtimes SET vm_state = 'stopped'",
                        "DELETE FROM vms",
                        "INSERT INTO configs (tenant_id, key, value) VALUES (-1, 'k', 'v')",
                        "UPDATE configs SET value = 'x'",
                        "DELETE FROM configs",
                        "SELECT password FROM administrators",
                        "INSERT INTO administrators (tenant_id, name, password)"
                        " VALUES (1, 'evil', 'x')",
                        "UPDATE hosts SET address = '10.6.6.6'",
                        "UPDATE host_runtimes SET state = 'lost'",
                        "DELETE FROM log",
                        "SELECT * FROM log",
                        "CREATE TABLE evil (x int)",
                        "DROP TABLE vm_runtimes"):
            self.assertRefused("l7r", refused)

    def test_hkd(self):
        for ok in ("SELECT id, login, tenant_id FROM users",
                   "UPDATE vm_runtimes SET vm_state_reason = 'x', vma_secret = 'y'",
                   "SELECT vma_secret FROM vm_runtimes",
                   "SELECT value FROM configs",
                   "SELECT name, address FROM hosts"):
            self.assertAllowed("hkd", ok)
        for refused in ("SELECT password FROM users",
                        "SELECT * FROM users",
                        "UPDATE users SET password = 'y'",
                        "SELECT token FROM user_tokens",
                        "SELECT * FROM user_auth_parameters",
                        "INSERT INTO vms (name, user_id, osf_id, ip, mac) VALUES"
                        " ('w', 1, 1, '10.0.0.6', '02:00:00:00:00:06')",
                        "DELETE FROM vm_runtimes",
                        "UPDATE configs SET value = 'x'",
                        "INSERT INTO configs (tenant_id, key, value) VALUES (-1, 'k', 'v')",
                        "UPDATE hosts SET address = '10.6.6.6'",
                        "SELECT password FROM administrators",
                        "CREATE TABLE evil (x int)"):
            self.assertRefused("hkd", refused)

    def test_admin_owns_the_schema(self):
        rows = self.query("SELECT DISTINCT pg_get_userbyid(relowner) AS owner FROM pg_class c"
                          " JOIN pg_namespace n ON n.oid = c.relnamespace"
                          " WHERE n.nspname = 'public'")
        self.assertEqual([r["owner"] for r in rows], ["qvd"])
        self.assertAllowed("admin", "UPDATE configs SET value = 'x'")
        self.assertAllowed("admin", "SELECT password FROM administrators")


class AdminInitTests(unittest.TestCase):
    """'qvd-admin db init' on a private cluster of its own."""

    def setUp(self):
        base = tempfile.mkdtemp(prefix="qvdt-dbinit-")
        self.addCleanup(shutil.rmtree, base, True)
        os.chmod(base, 0o755)
        self.root = os.path.join(base, "db")
        self.cluster = PrivateCluster(self.root, fast=True)
        self.addCleanup(self.cluster.destroy)
        self.config = os.path.join(base, "node.conf")
        with open(self.config, "w") as f:
            f.write(f"path.db = {self.root}\n")

    def admin(self, *argv):
        proc = subprocess.run([os.path.join(BIN, "qvd-admin"), "--config", self.config,
                               *argv], capture_output=True, text=True, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return proc.stdout

    def owners(self):
        with sync.connect(self.cluster.dsn("qvd")) as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT DISTINCT pg_get_userbyid(relowner) FROM pg_class c"
                            " JOIN pg_namespace n ON n.oid = c.relnamespace"
                            " WHERE n.nspname = 'public'")
                return sorted(r[0] for r in cur.fetchall())

    def test_fresh(self):
        """A fresh cluster: roles, database and schema, then the same again is a no-op."""
        out = self.admin("db", "init")
        self.assertIn("created", out)
        self.assertIn("qvd_hkd", out)
        self.assertEqual(self.owners(), ["qvd"])
        out = self.admin("db", "init")
        self.assertIn("exists", out)
        self.assertIn("schema up to date", out)
        self.assertNotIn("role", out)

    def test_database_of_an_older_qvd(self):
        """
        A database made and migrated by the superuser (qvd before roles): its
        objects are given to the admin role and the daemons' grants follow.
        """
        self.cluster.ensure()
        sync.ensure_database(self.cluster.dsn(), "qvd")
        with sync.connect(self.cluster.dsn("qvd")) as conn:
            migrate.upgrade(conn)
        self.assertEqual(self.owners(), ["postgres"])
        out = self.admin("db", "init")
        self.assertIn("given to 'qvd'", out)
        self.assertEqual(self.owners(), ["qvd"])
        with sync.connect(self.cluster.dsn("qvd", user="qvd_hkd")) as conn:
            with conn.cursor() as cur:
                cur.execute("SELECT count(*) FROM hosts")
                self.assertEqual(cur.fetchone()[0], 0)

    def test_superuser_as_admin_refused(self):
        """database.user naming the superuser: db init refuses, in one line."""
        with open(self.config, "a") as f:
            f.write("database.user = postgres\n")
        proc = subprocess.run([os.path.join(BIN, "qvd-admin"), "--config", self.config,
                               "db", "init"], capture_output=True, text=True, timeout=120)
        self.assertEqual(proc.returncode, 1)
        self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
        self.assertIn("superuser", proc.stderr)


class DaemonSuperuserTests(pg.DatabaseTestMixin, unittest.TestCase):
    """The real daemons, configured to connect as the superuser, refuse to run."""

    def setUp(self):
        super().setUp()
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.query("INSERT INTO hosts (name, address) VALUES ('node1', '10.0.0.1')")
        self.conf = os.path.join(self.dir, "node.conf")
        with open(self.conf, "w") as f:
            f.write(f"nodename = node1\ndatabase.host = {pg.cluster().socketdir}\n"
                    f"database.name = {self.dbname}\npath.run = {self.dir}\n"
                    f"hkd.lock.path = {self.dir}/hkd.lock\n"
                    "database.user.l7r = postgres\ndatabase.user.hkd = postgres\n")

    def run_daemon(self, *argv):
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.run([TWISTD, "-n", "--pidfile=", *argv, "--config", self.conf],
                              env=env, capture_output=True, text=True, timeout=60, cwd=self.dir)

    def test_hkd(self):
        proc = self.run_daemon("qvd-hkd")
        self.assertNotEqual(proc.returncode, 0, proc.stdout + proc.stderr)
        self.assertNotIn("Traceback", proc.stdout + proc.stderr)
        self.assertIn("the HKD (database.user.hkd) connects to the database as 'postgres', "
                      "a superuser: refused", proc.stdout + proc.stderr)

    def test_l7r(self):
        proc = self.run_daemon("qvd-l7r", "--listen", "tcp:0:interface=127.0.0.1")
        self.assertEqual(proc.returncode, 1, proc.stdout + proc.stderr)
        self.assertNotIn("Traceback", proc.stdout + proc.stderr)
        errors = [line for line in proc.stdout.splitlines() if "#critical]" in line]
        self.assertEqual(len(errors), 1, proc.stdout)
        self.assertIn("the L7R (database.user.l7r) connects to the database as 'postgres', "
                      "a superuser: refused", errors[0])
