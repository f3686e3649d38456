"""
Disk images for integration tests, built once and cached outside the clone.

    from qvd.testing.images import cannot_build_reason, minimal_lxc_image
    if cannot_build_reason(): raise SkipTest(cannot_build_reason())
    path = minimal_lxc_image()      # /var/cache/qvd-test/lxc-minimal-<key>.tar

The key hashes the recipe's base layer (suite, packages, desktop, the base
hooks' format) and every file of its code layer (the qvd package copied into
the image, the VMA's unit, the session scripts and colour: so a change to
qvd/vma or to the unit gives a new image); only the cheap code layer is
rebuilt when just those changed (the mmdebstrap base layer is cached in
C{di.build.cache}).
"""

import contextlib
import glob
import hashlib
import os
import shutil
import subprocess
import time

import qvd
from qvd.config import Config, declared_keys
from qvd._locks import locked
from qvd.di.build import Progress, build_image
from qvd.di.recipe import Recipe

CACHE = "/var/cache/qvd-test"
#: Unpacked test images (an LXC base fs cache shared by test runs: the
#: driver's lock-and-rename unpacking makes sharing safe; deleting a tree
#: costs more than unpacking it).
BASEFS_CACHE = os.path.join(CACHE, "lxc-basefs")
#: Test images kept in the cache (the most recently used); older ones go
#: once unused for PRUNE_AGE seconds (another test run may be using them).
KEEP = 4
PRUNE_AGE = 3600
QVD_SOURCE = os.path.dirname(os.path.abspath(qvd.__file__))
TEST_COLOUR = "#2a7fd4"


def cannot_build_reason():
    """
    Why images cannot be built here (None if they can): for C{SkipTest}.
    """
    if os.geteuid() != 0:
        return "building disk images needs root"
    if shutil.which("mmdebstrap") is None:
        return "mmdebstrap is not installed (apt-get install mmdebstrap)"
    return None


def minimal_recipe(colour=TEST_COLOUR):
    config = Config(keys=declared_keys())
    return Recipe.from_config(config, "minimal", colour)


def minimal_lxc_image(colour=TEST_COLOUR, stream=None):
    """
    The path of the minimal test image, built when missing.
    """
    recipe = minimal_recipe(colour)
    key = hashlib.sha256(
        f"{recipe.base_key()}|{recipe.code_key(QVD_SOURCE)}".encode()).hexdigest()[:16]
    os.makedirs(CACHE, exist_ok=True)
    path = os.path.join(CACHE, f"lxc-minimal-{key}.tar")
    with locked(path + ".lock"):
        if not os.path.exists(path):
            config = Config(keys=declared_keys())
            build_image(recipe, path, QVD_SOURCE, config.get("di.build.cache"),
                        Progress(stream), quiet=True)
        os.utime(path)
        prune(os.path.join(CACHE, "lxc-minimal-*.tar"), KEEP, companions=_unpacked)
    return path


def minimal_base_layer(stream=None):
    """
    The mmdebstrap base layer of the minimal image (no qvd code in it),
    built when missing.
    """
    from qvd.di.build import build_base
    config = Config(keys=declared_keys())
    return build_base(minimal_recipe(), config.get("di.build.cache"), Progress(stream),
                      quiet=True)


def lxc_test_basefs():
    """
    A C{path.storage.basefs} for tests that use L{minimal_lxc_image}: its
    unpacked tree is kept across test runs (and pruned with the image).
    """
    os.makedirs(BASEFS_CACHE, exist_ok=True)
    return BASEFS_CACHE


def prune(pattern, keep, age=PRUNE_AGE, companions=lambda path: ()):
    """
    Remove all but the C{keep} most recently used files matching C{pattern},
    with their lock file and C{companions(path)} (files or trees), if unused
    for C{age} seconds (another test run may still be using them).
    """
    paths = sorted(glob.glob(pattern), key=_mtime, reverse=True)
    for old in paths[keep:]:
        if time.time() - _mtime(old) < age:
            continue
        for path in (old, old + ".lock", *companions(old)):
            if os.path.isdir(path):
                subprocess.run(["rm", "-rf", "--one-file-system", path])
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


def _unpacked(image):
    """The image's unpacked trees (one per id mapping: <name>.u<uid>-g<gid>)."""
    name = os.path.basename(image)[:-len(".tar")]
    return [os.path.join(BASEFS_CACHE, name),
            *glob.glob(os.path.join(BASEFS_CACHE, glob.escape(name) + ".u*-g*"))]


def _mtime(path):
    try:
        return os.path.getmtime(path)
    except FileNotFoundError:
        return 0
