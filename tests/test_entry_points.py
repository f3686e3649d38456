"""
The programs setup.py installs: every console script resolves to a function,
and each one's bad arguments end in one line and a non-zero exit.
"""

import ast
import importlib
import os
import subprocess
import sys

from twisted.trial import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def console_scripts():
    """(name, module, function) of each console_scripts entry of setup.py."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    for item in ast.literal_eval(value):
                        name, _, target = (part.strip() for part in item.partition("="))
                        module, _, function = target.partition(":")
                        yield name, module, function


class ConsoleScriptTests(unittest.TestCase):

    def test_every_script_resolves(self):
        """Each console script of setup.py names a module and function that exist."""
        scripts = list(console_scripts())
        self.assertTrue(scripts)
        for name, module, function in scripts:
            target = getattr(importlib.import_module(module), function, None)
            self.assertTrue(callable(target), f"{name}: {module}:{function} is not callable")

    def test_no_qvd_up(self):
        """qvd-up is not installed and no message sends users to it (deploy/up.sh is)."""
        self.assertNotIn("qvd-up", [name for name, _, _ in console_scripts()])
        for top, _, files in os.walk(os.path.join(ROOT, "qvd")):
            for name in files:
                if name.endswith(".py"):
                    with open(os.path.join(top, name)) as f:
                        self.assertNotIn("qvd-up", f.read(), os.path.join(top, name))


class CommandLineErrorTests(unittest.TestCase):
    """
    Bad arguments to each program of setup.py: one line on stderr, nothing
    on stdout, a non-zero exit status, never a traceback. (Run as the real
    console scripts, next to the test's Python; no database is touched.)
    """

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        # A node file whose database cannot be reached: never the private
        # cluster of this machine, never /etc/qvd/node.conf.
        self.conf = os.path.join(self.dir, "node.conf")
        with open(self.conf, "w") as f:
            f.write("database.host = 127.0.0.1\ndatabase.port = 1\n"
                    "database.password = pw-not-to-show\n")
        self.env = dict(os.environ, HOME=self.dir, QVD_CONFIG=self.conf,
                        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.env.pop("QVD_DEBUG", None)
        self.env.pop("QVD_PASSWORD", None)

    def script(self, name):
        path = os.path.join(os.path.dirname(sys.executable), name)
        if not os.path.exists(path):
            self.fail(f"{path} is not installed: run deploy/setup.sh")
        return path

    def assertOneLineError(self, name, argv, status=None):
        proc = subprocess.run([self.script(name), *argv], env=self.env, capture_output=True,
                              text=True, timeout=60, cwd=self.dir, stdin=subprocess.DEVNULL)
        what = f"{name} {' '.join(argv)}: {proc.stderr!r}"
        self.assertNotEqual(proc.returncode, 0, what)
        if status is not None:
            self.assertEqual(proc.returncode, status, what)
        self.assertNotIn("Traceback", proc.stderr, what)
        self.assertEqual(len(proc.stderr.splitlines()), 1, what)
        self.assertTrue(proc.stderr.startswith(f"{name}"), what)
        self.assertEqual(proc.stdout, "", what)
        self.assertNotIn("pw-not-to-show", proc.stderr, what)
        return proc.stderr

    def test_qvd_admin(self):
        """qvd-admin: missing and unknown words, bad values, an unreachable database."""
        for argv in ([], ["bogus"], ["tenant"], ["tenant", "bogus"], ["osf", "add"],
                     ["osf", "add", "d", "--memory", "abc"], ["--config", "/nonexistent", "tenant",
                                                            "list"]):
            self.assertOneLineError("qvd-admin", argv)
        err = self.assertOneLineError("qvd-admin", ["tenant", "list"], status=1)
        self.assertIn("password=***", err)

    def test_qvd_client(self):
        """qvd-client: missing and unknown words, bad values, bad files."""
        missing = os.path.join(self.dir, "missing", "x.png")
        for argv in ([], ["bogus"], ["--port", "abc", "list"], ["connect", "--vm", "abc"],
                     ["--config", "/nonexistent", "list"],
                     ["--host", "h", "--port", "99999", "--token", "t", "list"],
                     ["--host", "h", "--token", "t", "connect", "--link", "warp"],
                     ["--host", "h", "--token", "t", "connect", "--headless",
                      "--screenshot", missing],
                     ["--host", "h", "--token", "t", "connect", "--display", ":0",
                      "--nxproxy", "/nonexistent/nxproxy"],
                     ["--host", "127.0.0.1", "--port", "1", "--token", "t", "list"]):
            self.assertOneLineError("qvd-client", argv)
        os.makedirs(os.path.join(self.dir, ".qvd"))
        with open(os.path.join(self.dir, ".qvd", "client.conf"), "w") as f:
            f.write("client.host.port = many\n")
        err = self.assertOneLineError("qvd-client", ["--token", "t", "list"], status=2)
        self.assertIn(os.path.join(self.dir, ".qvd", "client.conf"), err)

    def test_qvd_di(self):
        """qvd-di: missing and unknown words, bad values (nothing is built)."""
        for argv in ([], ["bogus"], ["build"], ["show-key", "--desktop", "bogus"],
                     ["build", "-o", "x.tar", "--register"],
                     ["build", "-o", "x.tar", "--source", "/nonexistent"],
                     ["build", "-o", "x.img", "--desktop", "minimal"],
                     ["--config", "/nonexistent", "show-key"]):
            self.assertOneLineError("qvd-di", argv)
