"""
Unit tests of qvd-di: recipes, cache keys, the code layer. No root, no
network (mmdebstrap is never run here).
"""

import importlib.util
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

from twisted.trial import unittest

from qvd.config import Config, declared_keys
from qvd.di import cli
from qvd.di.build import Progress, add_code_layer, build_base
from qvd.di.recipe import (
    BASE_CUSTOMIZE_HOOK, CONTAINER_MASKED_GENERATORS, CONTAINER_MASKED_UNITS,
    DESKTOP_MASKED_UNITS, MARKER_NAME, Recipe, RecipeError, source_hash, vma_unit)


def recipe(desktop="minimal", **kw):
    return Recipe.from_config(Config(keys=declared_keys()), desktop, **kw)


class RecipeTests(unittest.TestCase):

    def test_packages(self):
        """
        A recipe holds the base packages plus its desktop's, sorted, once.
        """
        r = recipe("xfce")
        for package in ("systemd-sysv", "iproute2", "python3-twisted", "nxagent",
                        "xinit", "xauth", "xkb-data", "x11-xserver-utils", "xfce4"):
            self.assertIn(package, r.packages)
        self.assertEqual(list(r.packages), sorted(set(r.packages)))

    def test_base_key(self):
        """
        The base key is stable, and changes with the desktop or a package but
        not with the minimal desktop's colour (the colour is in the code layer).
        """
        self.assertEqual(recipe().base_key(), recipe().base_key())
        self.assertNotEqual(recipe().base_key(), recipe("xfce").base_key())
        self.assertNotEqual(recipe().base_key(), recipe(extra=["vim"]).base_key())
        self.assertEqual(recipe().base_key(), recipe(colour="#ff0000").base_key())

    def test_bad_values(self):
        """
        An unknown desktop, a bad package name or colour is refused by name.
        """
        self.assertRaises(RecipeError, recipe, "kde")
        with self.assertRaises(RecipeError) as caught:
            recipe(extra=["rm -rf"])
        self.assertIn("rm -rf", str(caught.exception))
        self.assertRaises(RecipeError, recipe, colour="'; reboot")

    def test_mmdebstrap_has_no_mirror(self):
        """
        mmdebstrap gets the suite and the target only: no mirror URL.
        """
        argv = recipe().mmdebstrap_argv("/tmp/x.tar")
        self.assertEqual(argv[-2:], ["bookworm", "/tmp/x.tar"])
        self.assertFalse([a for a in argv if "://" in a])

    def test_minimal_session(self):
        """
        The minimal session starts the marker process, then paints the root
        window its colour.
        """
        text = recipe(colour="#123456").session_script()
        self.assertIn("xsetroot -solid '#123456'", text)
        self.assertLess(text.index(f"/usr/local/bin/{MARKER_NAME} "), text.index("xsetroot"))

    def test_vma_unit(self):
        """
        The VMA unit runs python3 -m qvd.vma with /etc/qvd/vma.conf; without
        qvd.vma it is a placeholder.
        """
        self.assertIn("python3 -m qvd.vma --config /etc/qvd/vma.conf", vma_unit(True))
        self.assertNotIn("-m qvd.vma", vma_unit(False))

    def test_vma_unit_starts_early(self):
        """
        The VMA unit has no default dependencies (it starts when systemd does,
        not after sysinit.target and basic.target; the agent waits for the
        boot before a session) and still stops before the system shuts down.
        """
        unit = vma_unit(True)
        self.assertIn("DefaultDependencies=no\n", unit)
        self.assertIn("Conflicts=shutdown.target\n", unit)
        self.assertIn("Before=shutdown.target\n", unit)
        ordering = [l for l in unit.splitlines() if l.startswith(("After=", "Requires="))]
        self.assertEqual(ordering, ["After=network.target"])

    def test_base_masks(self):
        """
        The base hook masks every unit and generator of the masked lists.
        """
        words = BASE_CUSTOMIZE_HOOK.replace(";", " ").split()
        for name in CONTAINER_MASKED_UNITS + DESKTOP_MASKED_UNITS + CONTAINER_MASKED_GENERATORS:
            self.assertIn(name, words)
        self.assertIn('/etc/systemd/system-generators/$g"', BASE_CUSTOMIZE_HOOK)


class CodeLayerTests(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.source = os.path.join(self.dir, "qvd")
        os.makedirs(os.path.join(self.source, "vma", "__pycache__"))
        with open(os.path.join(self.source, "__init__.py"), "w") as f:
            f.write("")
        with open(os.path.join(self.source, "vma", "__main__.py"), "w") as f:
            f.write("print('vma')\n")
        with open(os.path.join(self.source, "vma", "__pycache__", "x.pyc"), "wb") as f:
            f.write(b"\0")
        self.base = os.path.join(self.dir, "base.tar")
        with tarfile.open(self.base, "w") as tar:
            info = tarfile.TarInfo("./etc/os-release")
            data = b"ID=debian\n"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    def test_append(self):
        """
        The image is the base plus the qvd package (no caches), the enabled
        VMA unit and the minimal session, and no temporary file remains.
        """
        out = os.path.join(self.dir, "out", "image.tar")
        add_code_layer(self.base, recipe(), self.source, out, Progress())
        with tarfile.open(out) as tar:
            names = {m.name: m for m in tar.getmembers()}
        self.assertIn("./etc/os-release", names)
        self.assertIn("./usr/lib/python3/dist-packages/qvd/vma/__main__.py", names)
        self.assertNotIn("./usr/lib/python3/dist-packages/qvd/vma/__pycache__/x.pyc", names)
        wants = names["./etc/systemd/system/multi-user.target.wants/qvd-vma.service"]
        self.assertEqual(wants.linkname, "/etc/systemd/system/qvd-vma.service")
        wants = names["./etc/systemd/system/sockets.target.wants/qvd-vma.socket"]
        self.assertEqual(wants.linkname, "/etc/systemd/system/qvd-vma.socket")
        self.assertIn("./etc/systemd/system/qvd-vma.socket", names)
        self.assertEqual(names["./usr/bin/x-session-manager"].linkname,
                         "/usr/local/bin/qvd-minimal-session")
        self.assertEqual(names["./usr/local/bin/qvd-minimal-session"].mode, 0o755)
        self.assertEqual(os.listdir(os.path.dirname(out)), ["image.tar"])

    def test_source_hash(self):
        """
        The source hash changes when a qvd file changes, not when a cache does.
        """
        before = source_hash(self.source)
        with open(os.path.join(self.source, "vma", "__pycache__", "y.pyc"), "wb") as f:
            f.write(b"\1")
        self.assertEqual(source_hash(self.source), before)
        with open(os.path.join(self.source, "vma", "__main__.py"), "a") as f:
            f.write("# changed\n")
        self.assertNotEqual(source_hash(self.source), before)

    def test_code_key(self):
        """
        The code key is stable and changes with any file of the code layer:
        a qvd module, the minimal desktop's colour, the VMA's unit.
        """
        from qvd.di import recipe as recipe_module
        r = recipe()
        before = r.code_key(self.source)
        self.assertEqual(recipe().code_key(self.source), before)
        self.assertNotEqual(recipe(colour="#ff0000").code_key(self.source), before)
        self.patch(recipe_module, "vma_unit", lambda present=True: "[Unit]\n")
        self.assertNotEqual(r.code_key(self.source), before)
        self.patch(recipe_module, "vma_unit", vma_unit)
        with open(os.path.join(self.source, "vma", "__main__.py"), "a") as f:
            f.write("# changed\n")
        self.assertNotEqual(r.code_key(self.source), before)

    def test_bytecode(self):
        """
        Each module of the code layer comes with its checked-hash bytecode for
        this Python, which this Python loads instead of compiling the module.
        """
        files = {f.path: f for f in recipe().code_files(self.source)}
        tag = sys.implementation.cache_tag
        pyc = files[f"usr/lib/python3/dist-packages/qvd/vma/__pycache__/__main__.{tag}.pyc"]
        self.assertEqual(pyc.data[:4], importlib.util.MAGIC_NUMBER)
        self.assertEqual(pyc.data[4:8], b"\x03\0\0\0")       # hash-based, checked
        self.assertEqual(pyc.data[8:16], importlib.util.source_hash(b"print('vma')\n"))
        root = os.path.join(self.dir, "image")
        for f in files.values():
            if f.link is None:
                os.makedirs(os.path.join(root, os.path.dirname(f.path)), exist_ok=True)
                with open(os.path.join(root, f.path), "wb") as out:
                    out.write(f.data)
        env = dict(os.environ, PYTHONPATH=os.path.join(root, "usr/lib/python3/dist-packages"))
        out = subprocess.run([sys.executable, "-B", "-v", "-c", "import qvd.vma.__main__"],
                             env=env, capture_output=True, text=True, cwd="/")
        self.assertIn("vma", out.stdout)
        self.assertIn(f"code object from '{root}/{pyc.path}'", out.stderr)
        self.assertEqual(recipe().code_files(self.source, bytecode=False),
                         [f for f in files.values() if not f.path.endswith(".pyc")])

    def test_cached_base_is_reused(self):
        """
        A base layer already in the cache is used without running mmdebstrap.
        """
        r = recipe()
        shutil.copy(self.base, os.path.join(self.dir, r.base_name()))
        progress = Progress()
        self.assertEqual(build_base(r, self.dir, progress),
                         os.path.join(self.dir, r.base_name()))
        self.assertIn("cached", progress.phases[-1][1])

    def test_progress_elapsed(self):
        """
        Progress lines carry the seconds since the build began.
        """
        now = [10.0]
        out = io.StringIO()
        progress = Progress(out, clock=lambda: now[0])
        now[0] = 12.5
        progress.phase("copying")
        self.assertEqual(out.getvalue(), "[    2.5s] copying\n")


class CLITests(unittest.TestCase):

    def test_show_key(self):
        """
        qvd-di show-key prints the base layer's file name.
        """
        out = io.StringIO()
        self.patch(cli.sys, "stdout", out)
        self.assertEqual(cli.main(["show-key", "--desktop", "minimal"]), 0)
        self.assertEqual(out.getvalue().strip(), recipe().base_name())

    def test_register_needs_osf_and_version(self):
        """
        --register without --osf and --version is a usage error.
        """
        self.patch(cli.sys, "stderr", io.StringIO())
        with self.assertRaises(SystemExit):
            cli.main(["build", "-o", "/tmp/x.tar", "--register"])
