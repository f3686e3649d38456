"""
A private PostgreSQL cluster, reachable only through a unix socket.

    cluster = PrivateCluster("/var/lib/qvd/db")
    cluster.ensure()            # initdb when new, pg_ctl start when stopped
    dsn = cluster.dsn("qvd", user="qvd_l7r")
                                # "host=/var/lib/qvd/db/run dbname=qvd user=qvd_l7r"
    cluster.stop()

Used by every qvd program when the configuration names no database host, and
by the test suite (one cluster per test run). PostgreSQL refuses to run as root,
so when we are root the server runs as the C{postgres} user, which owns the
data directory.

Authentication is C{peer} on the unix socket, never C{trust}: the operating
system users root, postgres and the one running us may log in as the
superuser and as the roles of C{roles} (qvd's programs, L{qvd.db.roles}),
nobody else as anyone (pg_ident.conf's map C{qvd}). C{pg_hba.conf} and
C{pg_ident.conf} are qvd's: L{ensure} writes them again when they differ
(a cluster made by an older qvd with C{trust}, a role renamed) and reloads.
"""

import os
import pwd
import shutil
import subprocess
import time

import attrs

from qvd.db import DatabaseError


def _find_binary(name):
    found = shutil.which(name)
    if found:
        return found
    base = "/usr/lib/postgresql"
    if os.path.isdir(base):
        for version in sorted(os.listdir(base), reverse=True):
            candidate = os.path.join(base, version, "bin", name)
            if os.access(candidate, os.X_OK):
                return candidate
    raise DatabaseError(
        f"PostgreSQL's {name!r} was not found on PATH nor under {base}: "
        "install postgresql-15 (deploy/setup.sh does)")


def _user_exists(name):
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@attrs.define
class PrivateCluster:
    """
    A PostgreSQL cluster in C{root}: data in C{root}/data, socket in C{root}/run.

    @ivar root: the directory that holds everything of the cluster.
    @ivar fast: trade durability for speed (fsync off); for tests only.
    """
    root: str
    fast: bool = False
    superuser: str = "postgres"
    roles: tuple = ("qvd", "qvd_l7r", "qvd_hkd")

    @property
    def datadir(self):
        return os.path.join(self.root, "data")

    @property
    def socketdir(self):
        return os.path.join(self.root, "run")

    @property
    def logfile(self):
        return os.path.join(self.root, "postgresql.log")

    def dsn(self, dbname="postgres", user=None):
        return f"host={self.socketdir} dbname={dbname} user={user or self.superuser}"

    def auth_files(self):
        """
        The text of pg_hba.conf and pg_ident.conf for this cluster.
        """
        hba = ("# Written by qvd (qvd/db/cluster.py); rewritten when it differs.\n"
               "# Unix socket only, peer authentication through the map \"qvd\"\n"
               "# of pg_ident.conf: no trust, no TCP.\n"
               "local all all peer map=qvd\n")
        system_users = ["root"]
        for name in ("postgres", pwd.getpwuid(os.geteuid()).pw_name):
            if name not in system_users and _user_exists(name):
                system_users.append(name)
        lines = ["# Written by qvd (qvd/db/cluster.py); rewritten when it differs.",
                 "# MAPNAME  SYSTEM-USER  DATABASE-ROLE"]
        for system_user in system_users:
            for role in dict.fromkeys((self.superuser,) + tuple(self.roles)):
                lines.append(f"qvd {system_user} {role}")
        return hba, "\n".join(lines) + "\n"

    def _write_auth(self):
        """
        Write pg_hba.conf and pg_ident.conf when they differ. Returns True
        when something was written.
        """
        owner = self._owner()
        changed = False
        for name, text in zip(("pg_hba.conf", "pg_ident.conf"), self.auth_files()):
            path = os.path.join(self.datadir, name)
            try:
                with open(path) as f:
                    if f.read() == text:
                        continue
            except FileNotFoundError:
                pass
            with open(path + ".new", "w") as f:
                f.write(text)
            os.chmod(path + ".new", 0o600)
            if owner is not None:
                os.chown(path + ".new", owner.pw_uid, owner.pw_gid)
            os.replace(path + ".new", path)
            changed = True
        return changed

    def _owner(self):
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam("postgres")
        except KeyError:
            raise DatabaseError(
                "running as root, but there is no 'postgres' user to run the "
                "private PostgreSQL cluster: install postgresql-15")

    def _run(self, argv):
        owner = self._owner()
        kwargs = {}
        if owner is not None:
            kwargs = dict(user=owner.pw_uid, group=owner.pw_gid, extra_groups=[])
        proc = subprocess.run(argv, capture_output=True, text=True, cwd="/", **kwargs)
        if proc.returncode != 0:
            raise DatabaseError(
                f"{os.path.basename(argv[0])} failed for the cluster in {self.root} "
                f"(exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-800:]}")
        return proc.stdout

    def _prepare_dirs(self):
        owner = self._owner()
        os.makedirs(self.root, exist_ok=True)
        for path in (self.datadir, self.socketdir):
            os.makedirs(path, mode=0o700, exist_ok=True)
        if owner is not None:
            for path in (self.root, self.datadir, self.socketdir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            if not os.path.exists(self.logfile):
                open(self.logfile, "a").close()
            os.chown(self.logfile, owner.pw_uid, owner.pw_gid)

    @property
    def initialized(self):
        return os.path.exists(os.path.join(self.datadir, "PG_VERSION"))

    @property
    def running(self):
        pidfile = os.path.join(self.datadir, "postmaster.pid")
        try:
            with open(pidfile) as f:
                pid = int(f.readline())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        return os.path.exists(os.path.join(self.socketdir, ".s.PGSQL.5432"))

    def init(self):
        self._prepare_dirs()
        argv = [_find_binary("initdb"), "-D", self.datadir, "-U", self.superuser,
                "--auth-local=peer", "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C"]
        if self.fast:
            argv.append("--no-sync")
        self._run(argv)
        self._write_auth()

    def start(self, timeout=30):
        options = (f"-c listen_addresses='' -k {self.socketdir} "
                   "-c max_connections=300 -c max_pred_locks_per_transaction=256")
        if self.fast:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run([_find_binary("pg_ctl"), "-D", self.datadir, "-l", self.logfile,
                   "-o", options, "-w", "-t", str(timeout), "start"])

    def stop(self, mode="fast"):
        if self.running:
            self._run([_find_binary("pg_ctl"), "-D", self.datadir, "-m", mode, "-w", "stop"])

    def ensure(self):
        """
        Make the cluster exist and run. Returns the seconds it took.
        """
        began = time.monotonic()
        if not self.initialized:
            self.init()
        changed = self._write_auth()
        if not self.running:
            self._prepare_dirs()
            self.start()
        elif changed:
            self._run([_find_binary("pg_ctl"), "-D", self.datadir, "reload"])
        return time.monotonic() - began

    def destroy(self):
        self.stop(mode="immediate")
        shutil.rmtree(self.root, ignore_errors=True)
