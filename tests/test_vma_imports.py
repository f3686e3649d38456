"""
The VMA runs inside desktop images on Debian's python3 with python3-twisted
(22.4), python3-attr and python3-zope.interface only: it must import nothing
else (no psycopg2, txpostgres, Automat, argon2, pyOpenSSL...).
"""

import os
import subprocess
import sys

from twisted.trial import unittest

import qvd

TREE = os.path.dirname(os.path.dirname(os.path.abspath(qvd.__file__)))
DEBIAN_PYTHON = "/usr/bin/python3"

PROBE = r'''
import sys

# What the interpreter imported before this probe (site, .pth files of the
# machine) is not the VMA's doing.
BEFORE = {m.split(".")[0] for m in sys.modules}

FORBIDDEN = {"psycopg2", "txpostgres", "automat", "argon2", "libvirt", "lxc", "ldaptor",
             "hypothesis", "OpenSSL", "cryptography", "service_identity", "treq"}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FORBIDDEN:
            raise ImportError(f"the VMA must not import {name}")
        return None

sys.meta_path.insert(0, Blocker())

import qvd.vma, qvd.vma.__main__, qvd.vma.service, qvd.vma.agent, qvd.vma.tap
import qvd.protocols.simplerpc, qvd.config
from twisted.internet import reactor
from qvd.config import Config, declared_keys
from qvd.vma.service import make_service
cfg = Config(keys=declared_keys(), node={"vma.port": "0", "vma.log.path": sys.argv[1]})
make_service(cfg, reactor)

ALLOWED = {"twisted", "attr", "attrs", "zope", "qvd", "constantly", "incremental",
           "typing_extensions", "hyperlink", "_distutils_hack", "sitecustomize", "__main__"}
stdlib = set(sys.stdlib_module_names)
others = sorted({m.split(".")[0] for m in sys.modules} - BEFORE - stdlib - ALLOWED)
print("OTHERS", others)
import twisted
print("TWISTED", twisted.__version__)
'''


def image_tree(where):
    """The qvd files a desktop image gets (qvd.di.recipe), written under C{where}."""
    from qvd.di.recipe import _package_files
    for path, data in _package_files(os.path.join(TREE, "qvd")):
        full = os.path.join(where, "qvd", path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        with open(full, "wb") as f:
            f.write(data)
    return where


class ImportTests(unittest.TestCase):

    def probe(self, python, tree=TREE):
        env = dict(os.environ, PYTHONPATH=tree)
        out = subprocess.run([python, "-c", PROBE, self.mktemp()], env=env,
                             capture_output=True, text=True, timeout=60, cwd="/")
        self.assertEqual(out.returncode, 0, out.stderr[-2000:])
        self.assertIn("OTHERS []", out.stdout, out.stdout)
        return out.stdout

    def test_venv(self):
        """Under the development Python the VMA imports only stdlib, Twisted, attrs, zope."""
        self.probe(sys.executable)

    def test_debian_python(self):
        """Under Debian's python3 with python3-twisted the VMA imports and builds its service."""
        if not os.path.exists(DEBIAN_PYTHON):
            raise unittest.SkipTest(f"{DEBIAN_PYTHON} missing")
        check = subprocess.run([DEBIAN_PYTHON, "-c", "import twisted, attr, zope.interface"],
                               capture_output=True, cwd="/")
        if check.returncode != 0:
            raise unittest.SkipTest(
                "Debian's python3 lacks python3-twisted/python3-attr/python3-zope.interface "
                "(apt-get install python3-twisted python3-attr python3-zope.interface)")
        out = self.probe(DEBIAN_PYTHON)
        self.assertIn("TWISTED", out)

    def test_image_carries_the_agent_only(self):
        """
        A desktop image's qvd tree is the agent and what it imports: the VMA
        builds its service from it alone, and nothing of the L7R, the HKD,
        the database, the CLI, the drivers or the test fakes is in it.
        """
        tree = image_tree(os.path.abspath(self.mktemp()))
        self.probe(DEBIAN_PYTHON if os.path.exists(DEBIAN_PYTHON) else sys.executable, tree)
        packages = sorted(os.listdir(os.path.join(tree, "qvd")))
        self.assertEqual(packages, ["__init__.py", "_listen.py", "config", "logs.py", "protocols", "vma"])
        for absent in ("l7r", "hkd", "db", "admin", "virt", "testing", "client", "di"):
            self.assertFalse(os.path.exists(os.path.join(tree, "qvd", absent)), absent)

    def test_entry_point_leaves_tls_out(self):
        """
        The agent's entry point keeps Twisted's reactor from loading pyOpenSSL,
        cryptography and service_identity even where they are installed (they
        cost a desktop's boot 0.2-0.3 s), and the reactor still serves TCP.
        """
        probe = (
            "import sys\n"
            "import qvd.vma.__main__ as entry\n"
            "entry.without_tls()\n"
            "from twisted.internet import reactor, protocol\n"
            "port = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol),"
            " interface='127.0.0.1')\n"
            "port.stopListening()\n"
            "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in"
            " ('OpenSSL', 'cryptography', 'service_identity') and sys.modules[m]))\n")
        for python in (sys.executable, DEBIAN_PYTHON):
            if not os.path.exists(python):
                continue
            env = dict(os.environ, PYTHONPATH=TREE)
            out = subprocess.run([python, "-c", probe], env=env, capture_output=True,
                                 text=True, timeout=60, cwd="/")
            self.assertEqual(out.returncode, 0, out.stderr[-2000:])
            self.assertIn("LOADED []", out.stdout, (python, out.stdout))
