"""
A throw-away OpenLDAP server for tests: its own slapd.conf and mdb database in
a temporary directory, listening on 127.0.0.1 at a free port.

    server = Slapd.start_or_skip(suffix="dc=example,dc=org")   # SkipTest without slapd
    server.add_ldif(LDIF)                                        # through ldapadd
    server.uri        # 'ldap://127.0.0.1:40123'
    server.stop()     # kills it and removes the directory

Starting takes a fraction of a second; it is synchronous (test fixtures only).
"""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from twisted.trial.unittest import SkipTest

SLAPD = "/usr/sbin/slapd"
LDAPADD = "/usr/bin/ldapadd"
SCHEMA_DIR = "/etc/ldap/schema"
MODULE_DIR = "/usr/lib/ldap"
SCHEMAS = ("core", "cosine", "nis", "inetorgperson")

CONF = """\
{includes}
pidfile {dir}/slapd.pid
argsfile {dir}/slapd.args
modulepath {modules}
moduleload back_mdb
database mdb
maxsize 16777216
suffix "{suffix}"
rootdn "{rootdn}"
rootpw {rootpw}
directory {dir}/data
index objectClass eq
index uid eq
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Slapd:
    """
    One running slapd; see the module docstring.
    """

    def __init__(self, directory, process, uri, suffix, rootdn, rootpw):
        self.directory = directory
        self.process = process
        self.uri = uri
        self.suffix = suffix
        self.rootdn = rootdn
        self.rootpw = rootpw

    @property
    def port(self):
        return int(self.uri.rsplit(":", 1)[1])

    @classmethod
    def start_or_skip(cls, suffix="dc=example,dc=org", rootpw="rootsecret", timeout=10):
        """
        Start a slapd serving C{suffix} with root DN C{cn=admin,<suffix>}.

        @raise SkipTest: if slapd, ldapadd or the schemas are not installed.
        """
        for path in (SLAPD, LDAPADD, os.path.join(SCHEMA_DIR, "core.schema"),
                     os.path.join(MODULE_DIR, "back_mdb.so")):
            if not os.path.exists(path):
                raise SkipTest(f"{path} is missing: install the Debian packages slapd and "
                               "ldap-utils to run the LDAP tests")
        directory = tempfile.mkdtemp(prefix=f"qvdt-auth-slapd-{os.getpid()}-")
        try:
            return cls._start(directory, suffix, rootpw, timeout)
        except Exception:
            shutil.rmtree(directory, ignore_errors=True)
            raise

    @classmethod
    def _start(cls, directory, suffix, rootpw, timeout):
        os.mkdir(os.path.join(directory, "data"))
        rootdn = f"cn=admin,{suffix}"
        includes = "\n".join(f"include {SCHEMA_DIR}/{name}.schema" for name in SCHEMAS)
        conf = os.path.join(directory, "slapd.conf")
        with open(conf, "w") as f:
            f.write(CONF.format(includes=includes, dir=directory, modules=MODULE_DIR,
                                suffix=suffix, rootdn=rootdn, rootpw=rootpw))
        last_error = ""
        for _ in range(3):
            uri = f"ldap://127.0.0.1:{_free_port()}"
            log = open(os.path.join(directory, "slapd.log"), "wb")
            process = subprocess.Popen([SLAPD, "-d", "0", "-f", conf, "-h", uri + "/"],
                                       stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            log.close()
            server = cls(directory, process, uri, suffix, rootdn, rootpw)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and process.poll() is None:
                try:
                    socket.create_connection(("127.0.0.1", server.port), 0.2).close()
                    return server
                except OSError:
                    time.sleep(0.05)
            server._kill()
            with open(os.path.join(directory, "slapd.log"), "rb") as f:
                last_error = f.read().decode("utf-8", "replace")[-2000:]
        raise RuntimeError(f"slapd did not start in {directory}: {last_error}")

    def add_ldif(self, ldif):
        """
        Load C{ldif} (text) as the root DN through ldapadd.
        """
        result = subprocess.run(
            [LDAPADD, "-x", "-H", self.uri, "-D", self.rootdn, "-w", self.rootpw],
            input=ldif.encode("utf-8"), capture_output=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"ldapadd failed ({result.returncode}): "
                               f"{result.stderr.decode('utf-8', 'replace')}")

    def _kill(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def stop(self):
        """
        Stop slapd and remove its directory.
        """
        self._kill()
        shutil.rmtree(self.directory, ignore_errors=True)
