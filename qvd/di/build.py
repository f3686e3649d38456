"""
Build an LXC disk image in two cached layers (blocking: for the CLI and the
test image helper, never for a daemon).

    progress = Progress(sys.stderr)
    path = build_image(recipe, "/tmp/out.tar", qvd_source, cache_dir, progress)

1. The base layer: C{mmdebstrap} of the recipe, cached as
   C{<cache>/base-<suite>-<desktop>-<hash>.tar}; built under a lock so two
   builders share one run.
2. The code layer: the base tarball copied and the qvd files appended
   (L{qvd.di.recipe.Recipe.code_files}), written to a temporary name and
   renamed, so the output is either complete or absent.
"""

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

from qvd._locks import locked


class BuildError(Exception):
    """
    The image could not be built; the message says why and what to do.
    """


class Progress:
    """
    Prints build phases with the seconds elapsed since the build began.
    """

    def __init__(self, stream=None, clock=time.monotonic):
        self._stream = stream
        self._clock = clock
        self._start = clock()
        self.phases = []

    def phase(self, text):
        elapsed = self._clock() - self._start
        self.phases.append((elapsed, text))
        if self._stream is not None:
            self._stream.write(f"[{elapsed:7.1f}s] {text}\n")
            self._stream.flush()

    def elapsed(self):
        return self._clock() - self._start


def build_base(recipe, cache_dir, progress, quiet=False):
    """
    Return the path of the recipe's base layer, running mmdebstrap when it is
    not cached.
    """
    os.makedirs(cache_dir, exist_ok=True)
    target = os.path.join(cache_dir, recipe.base_name())
    with locked(target + ".lock"):
        if os.path.exists(target):
            progress.phase(f"base layer cached: {target}")
            return target
        if shutil.which("mmdebstrap") is None:
            raise BuildError("mmdebstrap is not installed: apt-get install mmdebstrap")
        progress.phase(
            f"base layer not cached: running mmdebstrap ({recipe.suite}, "
            f"{recipe.variant}, {len(recipe.packages)} packages, desktop {recipe.desktop})")
        partial = f"{target}.partial-{os.getpid()}.tar"
        try:
            result = subprocess.run(
                recipe.mmdebstrap_argv(partial),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL if quiet else None,
                stderr=subprocess.PIPE if quiet else None)
            if result.returncode != 0:
                tail = (result.stderr or b"").decode(errors="replace")[-2000:]
                raise BuildError(
                    f"mmdebstrap failed (exit status {result.returncode}); check the "
                    f"network, the apt sources and the package names.\n{tail}")
            os.replace(partial, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
        progress.phase(f"base layer built: {target} ({_mb(target)} MB)")
        return target


def add_code_layer(base, recipe, qvd_source, output, progress, vma_present=None):
    """
    Write C{output}: the base tarball plus the code layer, atomically.
    """
    directory = os.path.dirname(os.path.abspath(output)) or "."
    os.makedirs(directory, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=".qvd-di-", suffix=".tar", dir=directory)
    try:
        with os.fdopen(fd, "wb") as out, open(base, "rb") as src:
            shutil.copyfileobj(src, out, 4 << 20)
        progress.phase("base layer copied; adding the qvd code layer")
        files = recipe.code_files(qvd_source, vma_present)
        now = time.time()
        with tarfile.open(partial, "a", format=tarfile.PAX_FORMAT) as tar:
            existing = set()
            for info in _new_directories(files):
                existing.add(info.name)
                info.mtime = now
                tar.addfile(info)
            for item in files:
                info = tarfile.TarInfo("./" + item.path)
                info.uid = info.gid = 0
                info.uname = info.gname = "root"
                info.mtime = now
                info.mode = item.mode
                if item.link is not None:
                    info.type = tarfile.SYMTYPE
                    info.linkname = item.link
                    tar.addfile(info)
                else:
                    info.size = len(item.data)
                    tar.addfile(info, io.BytesIO(item.data))
        os.chmod(partial, 0o644)
        os.replace(partial, output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)
        raise
    progress.phase(f"image written: {output} ({_mb(output)} MB, {len(files)} qvd files)")
    return output


def _new_directories(files):
    """
    Directory entries for the parents of the code layer's files (root-owned,
    0755), parents first; existing directories of the base are re-stated with
    the same owner and mode, which is harmless.
    """
    seen = {}
    for item in files:
        parts = item.path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            seen.setdefault("/".join(parts[:i]), None)
    result = []
    for name in sorted(seen, key=lambda n: (n.count("/"), n)):
        info = tarfile.TarInfo("./" + name)
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        info.uid = info.gid = 0
        info.uname = info.gname = "root"
        result.append(info)
    return result


def build_image(recipe, output, qvd_source, cache_dir, progress, quiet=False,
                vma_present=None):
    """
    Build the image of C{recipe} into C{output}; return C{output}.
    """
    base = build_base(recipe, cache_dir, progress, quiet=quiet)
    return add_code_layer(base, recipe, qvd_source, output, progress, vma_present)


def admin_command():
    """
    How to run qvd-admin: the installed command, else this Python's module.
    """
    found = shutil.which("qvd-admin")
    return [found] if found else [sys.executable, "-m", "qvd.admin.cli"]


def register(path, osf, version, config=None, admin=None):
    """
    Register the image with C{qvd-admin [--config FILE] di add FILE --osf OSF
    --version V}; return its output.
    """
    argv = list(admin or admin_command())
    if config:
        argv += ["--config", config]
    argv += ["di", "add", path, "--osf", osf, "--version", version]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    except OSError as e:
        raise BuildError(f"cannot run {argv[0]} to register the image: {e.strerror}")
    if result.returncode != 0:
        raise BuildError(
            f"'{' '.join(argv)}' failed (exit status {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()}; the image is at {path}")
    return result.stdout


def _mb(path):
    return os.path.getsize(path) // (1 << 20)
