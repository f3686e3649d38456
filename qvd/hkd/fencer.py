"""
Self-fencing: a node that cannot renew its lease stops its own desktops
before the lease runs out, so that the VMs the cluster monitor of another node
then releases never run on two nodes (Proxmox HA's watchdog, in user space).

On the HKD's side (L{FencerProcess}):

    fencer = FencerProcess(FenceSettings.from_config(config))
    fencer.feed(time.monotonic() + lease)    # after each successful renewal
    fencer.ensure()                          # a fencer runs (spawned if none)
    fencer.release()                         # clean stop without desktops: it exits

The fencer itself is C{python -m qvd.hkd.fencer --path P --lease L --margin M
--hypervisor lxc ...}: a small process in a session of its own, so that it
outlives the HKD (SIGKILL, a crash, a kill of the HKD's process group). It
holds C{P.lock} (an exclusive flock with its pid: one fencer per node; a
restarted HKD finds it alive and feeds it) and reads C{P} every
C{--interval} seconds: the last lease deadline the HKD renewed, in
CLOCK_MONOTONIC seconds of this boot. When the deadline minus the margin
passes without a newer one it stops every desktop of the node by local means
only (no database: it must work when the database is gone): C{lxc-stop -k} on
the containers named C{<vm.lxc.name.prefix><id>} in C{path.run.lxc}, C{virsh
destroy} on the libvirt domains C{<vm.kvm.domain.prefix><id>}; then it exits.
A fencer never fed fences C{lease - margin} seconds after it started.

The decisions are L{Watchdog}'s, a pure table with a clock passed in
(tested with task.Clock); L{Fencer} is the process's loop around it.

A later hardening: arm the kernel's watchdog (softdog, /dev/watchdog) from the
fencer, so that a node whose fencer hangs too is reset by the kernel.
"""

import argparse
import fcntl
import os
import subprocess
import sys
import time

import attrs

#: (state, event) -> new state. States: unfed (started, no deadline yet),
#: armed (a deadline), fenced (the desktops were stopped), released (the HKD
#: stopped cleanly without desktops: nothing to guard).
TRANSITIONS = {
    ("unfed", "fed"): "armed",
    ("unfed", "timeout"): "fenced",
    ("unfed", "release"): "released",
    ("armed", "fed"): "armed",
    ("armed", "timeout"): "fenced",
    ("armed", "release"): "released",
    ("fenced", "fed"): "armed",
    ("fenced", "timeout"): "fenced",
    ("fenced", "release"): "released",
    ("released", "fed"): "armed",
    ("released", "timeout"): "released",
    ("released", "release"): "released",
}

#: what entering each state asks for
ENTER = {
    "unfed": (),
    "armed": (),
    "fenced": ("fence",),
    "released": ("exit",),
}


class UnexpectedEvent(Exception):
    """An event the watchdog's table has no edge for (a bug: never dropped in silence)."""


@attrs.frozen
class Step:
    old: str
    new: str
    event: str
    actions: tuple


@attrs.define
class Watchdog:
    """
    When the desktops of a node whose lease is not renewed must stop.

    @ivar lease: seconds of a lease.
    @ivar margin: the desktops stop this long before the lease's end.
    @ivar started: when the watchdog began (a never-fed one fences at
        C{started + lease - margin}).
    @ivar deadline: when the current lease ends (local clock), or None.
    """
    lease: float
    margin: float
    started: float
    state: str = "unfed"
    deadline: float | None = None
    fenced_at: float | None = None

    def due(self):
        """When the current state's timeout edge fires (None: never)."""
        if self.state == "unfed":
            return self.started + self.lease - self.margin
        if self.state == "armed":
            return self.deadline - self.margin
        if self.state == "fenced":
            # desktops started after a fence (by hand) are stopped too
            return self.fenced_at + self.lease
        return None

    def handle(self, event, now, deadline=None):
        """Apply C{event} at time C{now}; return the L{Step}. Raises L{UnexpectedEvent}."""
        new = TRANSITIONS.get((self.state, event))
        if new is None:
            raise UnexpectedEvent(f"fencer watchdog: no edge for {event!r} in state "
                                  f"{self.state!r}")
        old, self.state = self.state, new
        if event == "fed":
            self.deadline = deadline if self.deadline is None else max(self.deadline, deadline)
        if new == "fenced":
            self.fenced_at = now
        return Step(old, new, event, ENTER[new])

    def feed(self, now, deadline):
        """The lease was renewed until C{deadline}."""
        return self.handle("fed", now, deadline)

    def poll(self, now):
        """The timeout edge if it is due at C{now}, else None."""
        due = self.due()
        if due is not None and now >= due:
            return self.handle("timeout", now)
        return None


# -- the feed file -------------------------------------------------------------------

_MAGIC = "qvd-fence 1"


def boot_id():
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def encode_feed(deadline=None, boot=None):
    """The feed file's text: a deadline of this boot, or C{release} (deadline None)."""
    if deadline is None:
        return f"{_MAGIC} release\n"
    return f"{_MAGIC} {boot or boot_id()} {deadline:.3f}\n"


def parse_feed(text, boot=None):
    """
    ("fed", deadline), ("release", None), or None (empty, garbled, or a
    deadline of another boot: CLOCK_MONOTONIC restarts at every boot).
    """
    fields = text.split()
    if fields[:2] != _MAGIC.split():
        return None
    if fields[2:] == ["release"]:
        return ("release", None)
    if len(fields) != 4 or fields[2] != (boot or boot_id()):
        return None
    try:
        return ("fed", float(fields[3]))
    except ValueError:
        return None


def write_feed(path, text):
    """Replace the feed file atomically (a reader never sees half of it)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_feed(path):
    try:
        with open(path) as f:
            return f.read(200)
    except OSError:
        return ""


# -- stopping the desktops -------------------------------------------------------------

@attrs.frozen
class FenceSettings:
    path: str
    lease: float
    margin: float
    hypervisor: str = "lxc"
    lxcpath: str = "/run/qvd/lxc"
    lxc_prefix: str = "qvd-"
    kvm_uri: str = "qemu:///system"
    kvm_prefix: str = "qvd-"
    interval: float = 0.2

    @classmethod
    def from_config(cls, config):
        return cls(path=config.get("hkd.lease.path"),
                   lease=config.getfloat("hkd.lease.seconds"),
                   margin=config.getfloat("hkd.lease.fence.margin"),
                   hypervisor=config.get("vm.hypervisor"),
                   lxcpath=config.get("path.run.lxc"),
                   lxc_prefix=config.get("vm.lxc.name.prefix"),
                   kvm_uri=config.get("vm.kvm.uri"),
                   kvm_prefix=config.get("vm.kvm.domain.prefix"))

    def argv(self):
        return ["--path", self.path, "--lease", repr(self.lease), "--margin", repr(self.margin),
                "--hypervisor", self.hypervisor, "--lxcpath", self.lxcpath,
                "--lxc-prefix", self.lxc_prefix, "--kvm-uri", self.kvm_uri,
                "--kvm-prefix", self.kvm_prefix, "--interval", repr(self.interval)]


def _is_desktop(name, prefix):
    return name.startswith(prefix) and name[len(prefix):].isdigit()


def stop_commands(settings, run):
    """
    The commands that stop this node's desktops now (as argv lists), found
    by local means: the LXC containers' directories, libvirt's domain list
    (C{run(argv)} returns the command's output).
    """
    if settings.hypervisor == "lxc":
        try:
            names = sorted(os.listdir(settings.lxcpath))
        except OSError:
            return []
        return [["lxc-stop", "-n", name, "-P", settings.lxcpath, "-k"] for name in names
                if _is_desktop(name, settings.lxc_prefix)]
    if settings.hypervisor == "kvm":
        listed = run(["virsh", "-q", "-c", settings.kvm_uri, "list", "--name"])
        return [["virsh", "-q", "-c", settings.kvm_uri, "destroy", name]
                for name in listed.split() if _is_desktop(name, settings.kvm_prefix)]
    return []


def _output(argv):
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def stop_desktops(settings, log, run=_output, spawn=subprocess.Popen):
    """
    Stop every desktop of the node at once (all commands in parallel: the
    margin is for all of them); returns the commands run.
    """
    commands = stop_commands(settings, run)
    procs = []
    for argv in commands:
        try:
            procs.append((argv, spawn(argv, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)))
        except OSError as e:
            log(f"cannot run {' '.join(argv)}: {e}")
    for argv, proc in procs:
        try:
            code = proc.wait(timeout=max(settings.margin, 5))
        except subprocess.TimeoutExpired:
            code = "timeout"
        log(f"{' '.join(argv)}: {code}")
    return commands


# -- the fencer process ----------------------------------------------------------------

class Fencer:
    """
    The fencer process's loop: reads the feed every C{settings.interval}
    seconds, feeds the L{Watchdog}, stops the desktops when it times out and
    exits then, or when released.

    @param clock: schedules the loop (the reactor, or task.Clock).
    @param now: the time of the feed's deadlines (CLOCK_MONOTONIC).
    @param stop: called with no argument to stop the desktops.
    @param done: called with the final state when the fencer ends.
    """

    def __init__(self, settings, clock, now, stop, done, log=lambda message: None,
                 read=read_feed):
        self.settings = settings
        self.clock = clock
        self.now = now
        self.stop = stop
        self.done = done
        self.log = log
        self.read = read
        self.watchdog = Watchdog(settings.lease, settings.margin, started=now())
        self._last = None
        self._loop = None

    def start(self):
        from twisted.internet import task
        self._loop = task.LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(self.settings.interval, now=True)

    def check(self):
        now = self.now()
        item = parse_feed(self.read(self.settings.path))
        steps = []
        if item is not None and item != self._last:
            self._last = item
            kind, deadline = item
            if kind == "release":
                steps.append(self.watchdog.handle("release", now))
            elif deadline != self.watchdog.deadline:
                steps.append(self.watchdog.feed(now, deadline))
        if self.watchdog.state not in ("released",):
            step = self.watchdog.poll(now)
            if step is not None:
                steps.append(step)
        for step in steps:
            if "fence" in step.actions:
                late = now - (self.watchdog.deadline or self.watchdog.started)
                self.log(f"lease not renewed (deadline {late:+.1f} s from now): "
                         f"stopping this node's desktops")
                self.stop()
                self._end("fenced")
                return
            if "exit" in step.actions:
                self.log("released by the HKD (no desktops to guard)")
                self._end("released")
                return

    def _end(self, state):
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.done(state)


class FencerLock:
    """The fencer's C{<path>.lock}: an exclusive flock holding the fencer's pid."""

    def __init__(self, path):
        self.path = path + ".lock"
        self._fd = None

    def acquire(self):
        """True when taken (then held until exit); False when a fencer holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return True

    def held(self):
        """Whether some process (a fencer) holds the lock now."""
        if not os.path.exists(self.path):
            return False
        if self.acquire():
            fd, self._fd = self._fd, None
            os.close(fd)
            return False
        return True

    def holder(self):
        """The pid recorded by the holder, or None."""
        try:
            with open(self.path) as f:
                return int(f.read().strip() or 0) or None
        except (OSError, ValueError):
            return None


class FencerProcess:
    """
    The HKD's handle on the node's fencer: feeds it, spawns one when none
    runs, releases it.
    """

    def __init__(self, settings, spawn=subprocess.Popen, python=sys.executable):
        self.settings = settings
        self.spawn = spawn
        self.python = python
        self.lock = FencerLock(settings.path)
        self._proc = None

    def feed(self, deadline):
        """The lease runs until C{deadline} (CLOCK_MONOTONIC seconds)."""
        directory = os.path.dirname(self.settings.path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        write_feed(self.settings.path, encode_feed(deadline))

    def release(self):
        """Nothing to guard any more: the fencer exits."""
        write_feed(self.settings.path, encode_feed(None))

    def ensure(self):
        """
        Spawn a fencer unless one runs (ours, or one a previous HKD left);
        True when one was spawned now.
        """
        if self._proc is not None and self._proc.poll() is None:
            return False
        self._proc = None
        if self.lock.held():
            return False
        with open(self.settings.path + ".log", "a") as log:
            self._proc = self.spawn(
                [self.python, "-m", "qvd.hkd.fencer", *self.settings.argv()],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, close_fds=True,
                start_new_session=True)
        return True


def main(argv=None, reactor=None):
    parser = argparse.ArgumentParser(prog="python -m qvd.hkd.fencer",
                                     description="Stops this node's desktops when the "
                                                 "HKD stops renewing its lease.")
    parser.add_argument("--path", required=True)
    parser.add_argument("--lease", type=float, required=True)
    parser.add_argument("--margin", type=float, required=True)
    parser.add_argument("--hypervisor", default="lxc")
    parser.add_argument("--lxcpath", default="/run/qvd/lxc")
    parser.add_argument("--lxc-prefix", default="qvd-")
    parser.add_argument("--kvm-uri", default="qemu:///system")
    parser.add_argument("--kvm-prefix", default="qvd-")
    parser.add_argument("--interval", type=float, default=0.2)
    a = parser.parse_args(argv)
    settings = FenceSettings(path=a.path, lease=a.lease, margin=a.margin,
                             hypervisor=a.hypervisor, lxcpath=a.lxcpath,
                             lxc_prefix=a.lxc_prefix, kvm_uri=a.kvm_uri,
                             kvm_prefix=a.kvm_prefix, interval=a.interval)

    def log(message):
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
        print(f"{stamp} qvd-fencer[{os.getpid()}]: {message}", file=sys.stderr, flush=True)

    lock = FencerLock(settings.path)
    if not lock.acquire():
        log(f"another fencer (pid {lock.holder()}) guards this node; exiting")
        return 0
    if reactor is None:
        from twisted.internet import reactor
    result = {}

    def done(state):
        result["state"] = state
        reactor.stop()
    fencer = Fencer(settings, reactor, time.monotonic,
                    stop=lambda: stop_desktops(settings, log), done=done, log=log)
    log(f"guarding this node's {settings.hypervisor} desktops (lease {settings.lease:g} s, "
        f"margin {settings.margin:g} s)")
    reactor.callWhenRunning(fencer.start)
    reactor.run(installSignalHandlers=False)
    log(f"exiting ({result.get('state', 'stopped')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
