"""
A real GlusterFS volume on this machine for tests and benchmarks: one brick
in a temp dir, mounted over FUSE at as many mount points as there are
"nodes".

    volume = Volume("qvdt-storage")     # starts glusterd if it is not running
    volume.start()                      # create + start the volume (blocking)
    a = volume.mount()                  # a FUSE mount point (a temp dir)
    b = volume.mount()                  # a second one, standing for another node
    volume.unmount(a)                   # the mount goes away (a node loses it)
    volume.stop()                       # unmount all, stop + delete, remove the brick

The volume is named C{<name><pid>} and its server is this machine's own
address (glusterd refuses 127.0.0.1 for a brick). glusterd is started only
when it is not running, and left running afterwards (other volumes may be
served by it); L{Volume.stop} (also run at exit) removes everything else it
made.
"""

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time


def missing():
    """Why a volume cannot be made here (None if it can): for SkipTest."""
    if os.geteuid() != 0:
        return "GlusterFS volumes need root"
    for program in ("glusterd", "gluster", "mount.glusterfs"):
        if shutil.which(program) is None and not os.path.exists(f"/sbin/{program}"):
            return f"{program} is not installed: apt-get install glusterfs-server glusterfs-client"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    return None


def own_address():
    """An IPv4 address of this machine that is not a loopback one."""
    done = subprocess.run(["hostname", "-I"], capture_output=True, text=True)
    for word in done.stdout.split():
        if "." in word and not word.startswith("127."):
            return word
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))
        return s.getsockname()[0]


def gluster(*argv, check=True, timeout=60):
    done = subprocess.run(["gluster", "--mode=script", *argv], capture_output=True, text=True,
                          timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"gluster {' '.join(argv)} failed ({done.returncode}): "
                           f"{(done.stdout + done.stderr).strip()}")
    return done


def ensure_glusterd(timeout=20):
    """Start glusterd unless it runs; wait until it answers."""
    if subprocess.run(["pgrep", "-x", "glusterd"], capture_output=True).returncode != 0:
        subprocess.run(["glusterd"], check=True, capture_output=True)
    deadline = time.monotonic() + timeout
    while gluster("volume", "list", check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise RuntimeError("glusterd does not answer 'gluster volume list'")
        time.sleep(0.1)


class Volume:
    """A one-brick GlusterFS volume and its FUSE mounts."""

    def __init__(self, name="qvdt"):
        self.name = f"{name}{os.getpid()}"
        self.server = None
        self.root = None
        self.brick = None
        self.mounts = []
        self.started = False

    @property
    def source(self):
        return f"{self.server}:/{self.name}"

    def start(self):
        ensure_glusterd()
        self.server = own_address()
        self.root = tempfile.mkdtemp(prefix=f"qvdt-gluster-{self.name}-", dir="/var/tmp")
        os.chmod(self.root, 0o755)
        self.brick = os.path.join(self.root, "brick")
        os.mkdir(self.brick)
        atexit.register(self.stop)
        self.started = True
        gluster("volume", "create", self.name, "transport", "tcp",
                f"{self.server}:{self.brick}", "force")
        gluster("volume", "start", self.name)
        return self

    def mount(self, point=None):
        """Mount the volume at C{point} (a new dir under the volume's temp dir); the point."""
        if point is None:
            point = tempfile.mkdtemp(prefix="mnt-", dir=self.root)
        os.makedirs(point, exist_ok=True)
        os.chmod(point, 0o755)
        done = subprocess.run(["mount", "-t", "glusterfs", self.source, point],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"mount -t glusterfs {self.source} {point} failed: "
                               f"{(done.stdout + done.stderr).strip()}")
        self.mounts.append(point)
        return point

    def unmount(self, point):
        """Unmount C{point} (lazily if busy); the directory stays."""
        if subprocess.run(["umount", point], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True)
        if point in self.mounts:
            self.mounts.remove(point)

    def stop(self):
        """Unmount everything, stop and delete the volume, remove the brick (idempotent)."""
        if not self.started:
            return
        self.started = False
        with open("/proc/self/mounts") as f:
            points = [line.split()[1] for line in f if f" {self.root}" in line]
        for point in sorted(set(points) | set(self.mounts), key=len, reverse=True):
            self.unmount(point)
        with contextlib.suppress(Exception):
            gluster("volume", "stop", self.name, check=False)
            gluster("volume", "delete", self.name, check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def leftovers(self):
        """What of this volume still exists."""
        found = []
        with open("/proc/self/mounts") as f:
            found += [line.split()[1] for line in f if self.name in line]
        if gluster("volume", "info", self.name, check=False).returncode == 0:
            found.append(f"volume {self.name}")
        if self.root and os.path.exists(self.root):
            found.append(self.root)
        return found
