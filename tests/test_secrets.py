"""
No secret is ever printed or logged: DSN passwords, URI passwords, tokens.
qvd._redact and the places that show a database connection string.
"""

import io
import os
import re

from twisted.trial import unittest

from qvd._redact import redact

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RedactTests(unittest.TestCase):

    def test_keyword_dsn(self):
        """A libpq keyword/value password, plain or quoted, becomes ***; the rest stays."""
        self.assertEqual(redact("host=db port=5432 dbname=qvd user=qvd password=s3cret"),
                         "host=db port=5432 dbname=qvd user=qvd password=***")
        self.assertEqual(redact(r"password='s3 c\'ret' user=qvd"), "password=*** user=qvd")
        self.assertEqual(redact("PASSWORD = hunter2"), "PASSWORD = ***")

    def test_uri(self):
        """The password of a URI becomes ***; a URI without one is unchanged."""
        self.assertEqual(redact("postgresql://qvd:pw%40x@db:5432/qvd?sslmode=require"),
                         "postgresql://qvd:***@db:5432/qvd?sslmode=require")
        self.assertEqual(redact("postgresql://qvd@db/qvd"), "postgresql://qvd@db/qvd")
        self.assertEqual(redact("postgresql://db/qvd?password=pw&x=1"),
                         "postgresql://db/qvd?password=***&x=1")

    def test_other_secrets(self):
        """Tokens, secrets and LDAP bind passwords are hidden the same way."""
        self.assertEqual(redact("auth_token=abc123 vma.secret=xyz auth.ldap.bindpass = p"),
                         "auth_token=*** vma.secret=*** auth.ldap.bindpass = ***")

    def test_plain_text(self):
        """Text that only mentions passwords is not changed."""
        for text in ("wrong password for alice", "passwordless", "no token given"):
            self.assertEqual(redact(text), text)


class DatabaseMessageTests(unittest.TestCase):

    def write_config(self, password):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("database.host = 127.0.0.1\ndatabase.port = 1\nnodename = n1\n")
            for key in ("database.password", "database.password.superuser",
                        "database.password.l7r", "database.password.hkd"):
                f.write(f"{key} = {password}\n")
        return path

    def test_admin_connection_error(self):
        """
        qvd-admin that cannot reach the database names the DSN without its
        password, in one line, with a non-zero status.
        """
        from qvd.admin.cli import main
        for argv in (["tenant", "list"], ["db", "init"], ["db", "upgrade"]):
            out, err = io.StringIO(), io.StringIO()
            status = main(["--config", self.write_config("s3cr3t-pw")] + argv,
                          stdout=out, stderr=err)
            self.assertEqual(status, 1)
            self.assertEqual(len(err.getvalue().splitlines()), 1, err.getvalue())
            self.assertIn("cannot connect to the database (", err.getvalue())
            self.assertIn("password=***", err.getvalue())
            self.assertNotIn("s3cr3t-pw", err.getvalue() + out.getvalue())

    def test_hkd_connection_error(self):
        """The HKD's start-up check for the database shows no password either."""
        from qvd.config import Config
        from qvd.db.settings import database_dsn
        from qvd.hkd.tap import find_host
        dsn = database_dsn(Config.load(self.write_config("'s3 cr3t'")), "hkd")
        e = self.assertRaises(SystemExit, find_host, dsn, "n1")
        self.assertIn("password=***", str(e))
        self.assertNotIn("cr3t", str(e))

    def test_no_dsn_in_messages(self):
        """No product module formats a DSN into a message except through redact()."""
        pattern = re.compile(r"(?<![A-Z])\{(?:self\.)?\w*dsn\w*\}")
        for top, _, files in os.walk(os.path.join(ROOT, "qvd")):
            if os.path.basename(top) == "testing":
                continue
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(top, name)
                    with open(path) as f:
                        for number, line in enumerate(f, 1):
                            self.assertIsNone(pattern.search(line), f"{path}:{number}: {line}")
