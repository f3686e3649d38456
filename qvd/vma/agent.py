"""
The VMA: the SimpleRPC functions of reference 3.1 over the session machine.

    settings = VMASettings.from_config(Config.load("/etc/qvd/vma.conf"))
    vma = VMA(reactor, settings, ProcessRunner(reactor), LocalHost())
    vma.startup()                        # clean what a previous VMA left
    factory = SimpleRPCServerFactory(vma.functions(), clock=reactor)

x_start on a C{stopped} session validates the properties (the nxagent options
must be clean, else the call fails naming the value), runs the C{pre-connect}
hook and answers C{starting}; provisioning, the C{connect} hook, the options
file and C{xinit <session> -- nxagent :<display> ...} (as the user) follow in
the background while the L7R polls x_state. On C{suspended} it rewrites the
options and HUPs nxagent (resume); on C{connected} it HUPs (suspend) and fails
with "retry later"; in any other state it fails.

The L7R sends a new NX cookie with every x_start (C{qvd.nx.cookie}); it goes
into the options file (mode 0600, the session user's) as C{cookie=}, so
nxagent refuses NX connections that did not come through the L7R's relay,
which puts the cookie into the client's greeting. nxagent reads its options
again when it resumes, so a resume takes the new connection's cookie. An
x_start without one (an original QVD L7R) starts a session without a cookie.
"""

import contextlib
import os
import secrets
import shlex
import socket
import struct
import time

import attrs
from twisted.internet import defer, protocol
from qvd.logs import Logger
from zope.interface import implementer

from qvd.protocols.nx import COOKIE_PARAM
from qvd.vma.options import (
    OptionsError, SessionSettings, fill_props, hook_arguments, nxagent_options)
from qvd.vma.provision import Provisioner, ProvisioningError, ProvisioningSettings
from qvd.vma.rpcserver import RPCError
from qvd.vma.session import ISessionEffects, SessionMachine, Timeouts
from qvd.vma.system import LocalProcessControl

log = Logger()

ACTION_HOOKS = ("pre-connect", "connect", "stop", "suspend", "poweroff", "expire")
STATE_HOOKS = {"connected": "connected", "suspended": "suspended", "stopped": "disconnected"}


def _split(text):
    return shlex.split(text) if text and text.strip() else []


@attrs.frozen
class VMASettings:
    """
    Everything the VMA reads from its configuration (C{vma.*} keys).
    """
    session: SessionSettings = attrs.field(factory=SessionSettings)
    provisioning: ProvisioningSettings = attrs.field(factory=ProvisioningSettings)
    provisioning_enabled: bool = True
    timeouts: Timeouts = attrs.field(factory=Timeouts)
    run_path: str = "/var/run/qvd"
    nxagent_config: str = "/var/run/qvd/nxagent.conf"
    log_path: str = "/var/log/qvd"
    xinit: str = "/usr/bin/xinit"
    x_session: str = "/etc/X11/Xsession"
    x_session_extra: tuple = ()
    nxagent: str = "/usr/bin/nxagent"
    nxagent_extra: tuple = ()
    setsid: str = "/usr/bin/setsid"
    nx_client: str = ""
    slave_command: str = ""
    on_action: dict = attrs.field(factory=dict)   # action -> hook path
    on_state: dict = attrs.field(factory=dict)    # connected/suspended/disconnected -> path
    hook_timeout: float = 120.0
    poweroff_command: tuple = ("poweroff",)
    #: run (once) before the first session starts, to wait for the system to
    #: finish booting: the agent starts early in the boot, not after it
    boot_wait_command: tuple = ()

    @classmethod
    def from_config(cls, cfg):
        """Read the C{vma.*} keys of a L{qvd.config.Config}."""
        def family(prefix):
            return {name[len(prefix):]: value
                    for name, value in cfg.prefixed(prefix).items() if value}
        defaults = family("vma.default.")
        hook_timeout = cfg.getfloat("vma.hook.timeout")
        session = SessionSettings(
            uid_min=cfg.getint("vma.user.uid.min"),
            denied_groups=frozenset(
                g.strip() for g in cfg.get("vma.user.groups.denied").split(",") if g.strip()),
            display=cfg.getint("vma.display"),
            default_user=cfg.get("vma.user.default.name"),
            default_groups=cfg.get("vma.user.default.groups"),
            home_path=cfg.get("vma.user.home.path"),
            audio=cfg.getbool("vma.audio.enable"),
            slave=cfg.getbool("vma.slave.enable"),
            printing=cfg.getbool("vma.printing.enable"),
            defaults=defaults)
        provisioning = ProvisioningSettings(
            home_path=cfg.get("vma.user.home.path"),
            home_drive=cfg.get("vma.user.home.drive"),
            home_fs=cfg.get("vma.user.home.fs"),
            shell=cfg.get("vma.user.shell"),
            groupadd=cfg.get("vma.command.groupadd"),
            useradd=cfg.get("vma.command.useradd"),
            userdel=cfg.get("vma.command.userdel"),
            groupdel=cfg.get("vma.command.groupdel"),
            sfdisk=cfg.get("vma.command.sfdisk"),
            mount=cfg.get("vma.command.mount"),
            hooks=family("vma.on_provisioning."),
            hook_timeout=hook_timeout)
        timeouts = Timeouts(**{f.name: cfg.getfloat(f"vma.timeout.{f.name}")
                               for f in attrs.fields(Timeouts)})
        on_action = family("vma.on_action.")
        unknown = set(on_action) - set(ACTION_HOOKS)
        if unknown:
            from qvd.config import ConfigError
            raise ConfigError(
                f"unknown hook vma.on_action.{sorted(unknown)[0]} "
                f"(known: {', '.join(ACTION_HOOKS)})")
        poweroff = _split(cfg.get("vma.poweroff.command"))
        return cls(
            session=session, provisioning=provisioning,
            provisioning_enabled=cfg.getbool("vma.provisioning.enable"),
            timeouts=timeouts,
            run_path=cfg.get("vma.run.path"),
            nxagent_config=cfg.get("vma.nxagent.config"),
            log_path=cfg.get("vma.log.path"),
            xinit=cfg.get("vma.xinit.command"),
            x_session=cfg.get("vma.x-session.command"),
            x_session_extra=tuple(_split(cfg.get("vma.x-session.args.extra"))),
            nxagent=cfg.get("vma.nxagent.command"),
            nxagent_extra=tuple(_split(cfg.get("vma.nxagent.args.extra"))),
            setsid=cfg.get("vma.setsid.command"),
            nx_client=cfg.get("vma.nxagent.nx_client"),
            slave_command=cfg.get("vma.slave.command"),
            on_action=on_action,
            on_state=family("vma.on_state."),
            hook_timeout=hook_timeout,
            poweroff_command=tuple(poweroff),
            boot_wait_command=tuple(_split(cfg.get("vma.boot.wait.command"))))


def read_env_file(path, owner_uid=None):
    """
    C{KEY=VALUE} lines of an environment file (C{/etc/environment} style;
    quotes removed, C{export} allowed) -> dict. A missing file is empty; with
    C{owner_uid}, a file not owned by that uid or a symlink is ignored.
    """
    env = {}
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return env
    with os.fdopen(fd, "rb") as f:
        if owner_uid is not None and os.fstat(f.fileno()).st_uid != owner_uid:
            log.warn("ignoring {path}: not owned by uid {uid}", path=path, uid=owner_uid)
            return env
        text = f.read(65536).decode("utf-8", "replace")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].strip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "a").isalnum():
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key] = value
    return env


FAMILY_LOCAL, FAMILY_WILD = 256, 0xFFFF


def xauthority_entry(display, cookie, family=FAMILY_WILD, address=b""):
    """
    One Xauthority file entry: an MIT-MAGIC-COOKIE-1 for display number
    C{display}, as C{xauth add} writes it.
    """
    def counted(data):
        return struct.pack(">H", len(data)) + data
    return (struct.pack(">H", family) + counted(address) + counted(str(display).encode())
            + counted(b"MIT-MAGIC-COOKIE-1") + counted(cookie))


def write_xauthority(path, display, cookie, uid=None, gid=None):
    """
    Write the session's Xauthority file (mode 0600, owned by C{uid}:C{gid}
    when given) anew: nxagent reads it with C{-auth}, the session's clients
    through C{XAUTHORITY}; nobody else can read the cookie.
    """
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        if uid is not None:
            os.fchown(f.fileno(), uid, gid if gid is not None else -1)
        # hostname/unix:N as xauth writes it (what python-xlib looks for),
        # then any host (what libX11 also takes).
        f.write(xauthority_entry(display, cookie, FAMILY_LOCAL, socket.gethostname().encode())
                + xauthority_entry(display, cookie))
    os.replace(tmp, path)


class _SessionProtocol(protocol.ProcessProtocol):
    """Feeds the session's output, line by line, to the VMA."""

    def __init__(self, vma, log_file):
        self._vma = vma
        self._log_file = log_file
        self._buffer = b""

    def outReceived(self, data):
        if self._log_file is not None:
            try:
                self._log_file.write(data)
                self._log_file.flush()
            except OSError:
                pass
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > 65536:
            self._buffer = b""
        for line in lines:
            self._vma._session_line(line.decode("utf-8", "replace").rstrip("\r"))

    errReceived = outReceived

    def processEnded(self, reason):
        if self._log_file is not None:
            try:
                self._log_file.write(f"=== session ended: {reason.getErrorMessage()}\n".encode())
                self._log_file.close()
            except OSError:
                pass
        self._vma._session_ended(self, reason)


@implementer(ISessionEffects)
class VMA:
    """
    The agent. C{runner} (an L{ICommandRunner}) runs hooks and provisioning
    commands, C{host} (an L{IHost}) answers questions about users and files,
    C{reactor} spawns the session and is the clock, C{procs} (an
    L{IProcessControl}) signals nxagent and what the session left.
    """

    def __init__(self, reactor, settings, runner, host, procs=None):
        self._reactor = reactor
        self._procs = procs if procs is not None else LocalProcessControl()
        self.settings = settings
        self._runner = runner
        self._host = host
        self._provisioner = Provisioner(runner, host, settings.provisioning)
        self.machine = SessionMachine(reactor, settings.timeouts, self)
        self._process = None        # the running _SessionProtocol's transport
        self._protocol = None
        self._sid = None
        self._props = {}
        self._busy = False          # an x_start is between its checks and its answer
        self._generation = 0        # counts session starts (a stale background start stops)
        self._booted = False        # vma.boot.wait.command has run
        self.last_error = None

    # -- SimpleRPC functions (params: dict of text) ----------------------------

    def functions(self):
        return {"ping": self.ping, "x_state": self.x_state, "x_start": self.x_start,
                "x_suspend": self.x_suspend, "x_stop": self.x_stop,
                "poweroff": self.poweroff, "expire": self.expire}

    def ping(self, params):
        return None

    def x_state(self, params):
        return self.machine.state

    @defer.inlineCallbacks
    def x_start(self, params):
        if self._busy:
            raise RPCError("Unable to start/resume X session: another x_start is in "
                           "progress, try again in a few seconds")
        state = self.machine.state
        log.info("x_start in state {state}, user {user}", state=state,
                 user=params.get("qvd.vm.user.name"))
        if state == "connected":
            self.machine.suspend()
            raise RPCError("Can't connect to X session in state connected, "
                           "suspending it, retry later")
        if state not in ("stopped", "suspended"):
            raise RPCError(f"Unable to start/resume X session in state {state}, "
                           "try again in a few minutes")
        # The session's NX cookie goes into nxagent's options only: hooks
        # (whose arguments every process of the desktop can read) never see it.
        params = dict(params)
        cookie = params.pop(COOKIE_PARAM, None) or None
        try:
            props = fill_props(params, self.settings.session)
            options = nxagent_options(props, self.settings.session, cookie=cookie)
            if self.settings.provisioning_enabled:
                self._check_account(props["qvd.vm.user.name"])
        except OptionsError as e:
            raise RPCError(str(e))
        self._busy = True
        try:
            yield self._action_hook("pre-connect", props)
            self._save_side_configs(props)
            if state == "suspended":
                if self.machine.state != "suspended":
                    raise RPCError(f"Unable to resume X session: it went "
                                   f"{self.machine.state} meanwhile, try again")
                self._props = props
                self._write_options(options, props)
                self.machine.resume()
                yield self._action_hook("connect", props)
            else:
                if self.machine.state != "stopped":
                    raise RPCError(f"Unable to start X session: it went "
                                   f"{self.machine.state} meanwhile, try again")
                self._props = props
                self.last_error = None
                self.machine.start()
                self._generation += 1
                self._start_in_background(props, options, self._generation)
        finally:
            self._busy = False
        return "starting"

    def _check_account(self, user):
        """
        Refuse an existing account that is not an ordinary user (uid or gid
        below C{vma.user.uid.min}: root, daemon, bin, ...).

        @raise OptionsError: naming the user and its ids.
        """
        entry = self._host.user(user)
        uid_min = self.settings.session.uid_min
        if entry is not None and (entry[0] < uid_min or entry[1] < uid_min):
            raise OptionsError(
                f"user {user!r} exists with uid {entry[0]}, gid {entry[1]}: a session "
                f"runs only as an ordinary user (ids from {uid_min} up, vma.user.uid.min)")

    @defer.inlineCallbacks
    def x_suspend(self, params):
        if self.machine.state in ("listening", "connected") and self._process is not None:
            yield self._action_hook("suspend", dict(self._props, **params))
            self.machine.suspend()
        return self.machine.state

    @defer.inlineCallbacks
    def x_stop(self, params):
        if self._process is not None or self.machine.state != "stopped":
            yield self._action_hook("stop", dict(self._props, **params))
            self.machine.stop()
        return self.machine.state

    @defer.inlineCallbacks
    def poweroff(self, params):
        yield self._action_hook("poweroff", dict(self._props, **params))
        argv = list(self.settings.poweroff_command)
        if not argv:
            raise RPCError("vma.poweroff.command is empty: cannot power off")
        log.info("powering off: {argv}", argv=argv)
        # Answer first, then power off.
        self._reactor.callLater(0.2, self._run_poweroff, argv)
        return None

    def _run_poweroff(self, argv):
        d = self._runner.run(argv, timeout=60)
        d.addCallback(lambda r: r.ok or log.error(
            "poweroff command {argv} failed ({rc}): {out}", argv=argv, rc=r.rc, out=r.output))

    @defer.inlineCallbacks
    def expire(self, params):
        log.info("the disk image expired: {params}", params=params)
        yield self._action_hook("expire", dict(self._props, **params))
        return None

    # -- hooks and files --------------------------------------------------------

    @defer.inlineCallbacks
    def _action_hook(self, action, props):
        path = self.settings.on_action.get(action)
        if not path:
            return None
        args = hook_arguments(props, "qvd.vm.session.state", self.machine.state,
                              "qvd.hook.on_action", action)
        result = yield self._runner.run([path] + args, timeout=self.settings.hook_timeout)
        if not result.ok:
            raise RPCError(f"hook vma.on_action.{action} ({path}) failed with exit code "
                           f"{result.rc}: {result.output.strip()[-300:]}")
        return None

    def _state_hook(self, state):
        name = STATE_HOOKS.get(state)
        path = self.settings.on_state.get(name) if name else None
        if path:
            self._runner.spawn_detached(
                [path] + hook_arguments(self._props, "qvd.hook.on_state", name))

    def _path(self, name):
        return os.path.join(self.settings.run_path, name)

    def _write_file(self, path, text, mode=0o644, owner=None):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "w") as f:
            if owner is not None:
                os.fchown(f.fileno(), *owner)
            f.write(text)
        os.replace(tmp, path)

    def _session_owner(self, props):
        """
        C{(uid, gid)} of the session user for files only its nxagent may
        read, or C{None} when the VMA does not provision users (the session
        then runs as the VMA's own user).
        """
        if not self.settings.provisioning_enabled:
            return None
        entry = self._host.user(props["qvd.vm.user.name"])
        return None if entry is None else (entry[0], entry[1])

    def _write_options(self, options, props):
        """
        Write the options line for nxagent, readable by the session user
        only (it may hold the session's NX cookie).
        """
        path = self.settings.nxagent_config
        try:
            self._write_file(path, options + "\n", 0o600, self._session_owner(props))
        except OSError as e:
            raise RPCError(f"Unable to write nxagent configuration to {path}: {e.strerror}")

    def _save_side_configs(self, props):
        key = props.get("qvd.slave.key")
        session = self.settings.session
        try:
            if key:
                self._write_file(self._path("slave.conf"), key, 0o600)
            printing = session.printing and str(
                props.get("qvd.client.printing.enabled", "0")).lower() in ("1", "true", "yes")
            self._write_file(self._path("printing.conf"), (
                f"qvd.printing.enabled = {int(printing)}\n"
                f"qvd.client.os = {props.get('qvd.client.os', '')}\n"
                f"qvd.printing.port = {session.printing_port}\n"))
        except OSError as e:
            log.warn("cannot write slave/printing configuration in {path}: {e}",
                     path=self.settings.run_path, e=e)

    def _write_state_files(self, state):
        try:
            if state == "stopped":
                for name in ("nxagent.state", "nxagent.pid"):
                    try:
                        os.unlink(self._path(name))
                    except FileNotFoundError:
                        pass
                return
            self._write_file(self._path("nxagent.state"), f"{state}:{int(time.time())}\n")
            if self.machine.pid:
                self._write_file(self._path("nxagent.pid"), f"{self.machine.pid}\n")
        except OSError as e:
            log.warn("cannot write state files in {path}: {e}", path=self.settings.run_path, e=e)

    # -- ISessionEffects ----------------------------------------------------------

    def state_changed(self, old, new):
        log.info("X session: {old} -> {new}", old=old, new=new)
        self._write_state_files(new)
        self._state_hook(new)

    def signal(self, name):
        if self._process is None:
            return False
        if name == "KILL":
            if self._sid:
                self._procs.signal_session(self._sid, "KILL")
            self._signal_process("KILL")
            return True
        pid = self.machine.pid
        if pid:
            try:
                if self._procs.kill(pid, name):
                    return True
            except OSError as e:
                log.warn("cannot send {sig} to nxagent {pid}: {e}", sig=name, pid=pid, e=e)
        self._signal_process(name)
        return True

    def _signal_process(self, name):
        try:
            self._process.signalProcess(name)
        except Exception:
            pass

    # -- the session process -------------------------------------------------------

    @defer.inlineCallbacks
    def _start_in_background(self, props, options, generation):
        def current():
            return (generation == self._generation
                    and self.machine.state in ("starting", "provisioning"))

        def on_work():
            if current():
                self.machine.provisioning()
        try:
            yield self._wait_for_boot()
            if self.settings.provisioning_enabled and current():
                yield self._provisioner.provision(props, on_work=on_work)
            if current():
                yield self._action_hook("connect", props)
            if not current():
                log.info("x_start abandoned: the session went {s} meanwhile",
                         s=self.machine.state)
                if generation == self._generation and self._process is None:
                    self.machine.exited()
                return
            self._write_options(options, props)
            self._spawn(props)
            self.machine.spawned()
        except (RPCError, ProvisioningError, OptionsError, OSError) as e:
            message = getattr(e, "message", None) or str(e)
            log.error("Unable to start the X session: {e}", e=message)
            self._start_failed(generation, message)
        except Exception as e:
            log.failure("Unable to start the X session")
            self._start_failed(generation, str(e))

    @defer.inlineCallbacks
    def _wait_for_boot(self):
        """
        Run C{vma.boot.wait.command} once in the agent's life: the agent
        answers while the system is still booting (its unit has no default
        dependencies), and a session must not start before the boot's own
        set-up is done (systemd-tmpfiles empties /tmp and /tmp/.X11-unix,
        /run/nologin bars logins until systemd-user-sessions). Its exit status
        does not matter (C{degraded}, or no systemd: the system is as up as it
        gets); it is bounded by C{vma.timeout.starting}.
        """
        argv = self.settings.boot_wait_command
        if not argv or self._booted:
            return None
        started = self._reactor.seconds()
        result = yield self._runner.run(list(argv),
                                        timeout=self.settings.timeouts.starting or None)
        self._booted = True
        waited = self._reactor.seconds() - started
        if waited >= 0.5:
            log.info("waited {s:.1f} s for the system to finish booting ({argv}: {out})",
                     s=waited, argv=" ".join(argv), out=result.output.strip()[-100:])
        return None

    def _start_failed(self, generation, message):
        if generation == self._generation and self._process is None:
            self.last_error = message
            self.machine.exited()

    def session_argv(self, xauthority):
        """
        The command line of a session (reference 3.3, step 4), without the
        original's C{-ac}: X listens on no TCP port and its local clients
        need the cookie in C{xauthority}.
        """
        s = self.settings
        display = s.session.display
        argv = [s.xinit, s.x_session, *s.x_session_extra, "--",
                s.nxagent, f":{display}", "-nolisten", "tcp", "-auth", xauthority,
                "-name", "QVD",
                "-display", f"nx/nx,options={s.nxagent_config}:{display}", *s.nxagent_extra]
        if s.setsid:
            argv = [s.setsid, "--wait"] + argv
        return argv

    def session_env(self, user, home, uid):
        """The environment of the session (reference 3.3, step 4)."""
        env = {}
        env.update(read_env_file("/etc/default/locale"))
        env.update(read_env_file("/etc/environment"))
        env.update(read_env_file(os.path.join(home, ".qvd_environment"), owner_uid=uid))
        env.setdefault("LANG", "en_US.UTF-8")
        env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/games")
        env.update({"HOME": home, "USER": user, "LOGNAME": user,
                    "MAIL": f"/var/mail/{user}", "SHELL": self.settings.provisioning.shell})
        if self.settings.nx_client:
            env["NX_CLIENT"] = self.settings.nx_client
        if self.settings.slave_command:
            env["QVD_SLAVE_CMD"] = env["NX_SLAVE_CMD"] = self.settings.slave_command
        if self.settings.session.audio:
            env["PULSE_SERVER"] = f"tcp:localhost:{self.settings.session.display + 7000}"
        return env

    def _spawn(self, props):
        s = self.settings
        if s.provisioning_enabled:
            user = props["qvd.vm.user.name"]
            entry = self._host.user(user)
            if entry is None:
                raise ProvisioningError(f"user {user!r} does not exist after provisioning")
            self._check_account(user)
            uid, gid, home = entry
            home = home or props["qvd.vm.user.home"]
        else:
            import pwd
            entry = pwd.getpwuid(os.geteuid())
            user = entry.pw_name
            home = os.environ.get("HOME") or entry.pw_dir
            uid = gid = None
        env = self.session_env(user, home, uid if uid is not None else os.geteuid())
        xauthority = self._path(f"xauthority-{user}")
        write_xauthority(xauthority, s.session.display, secrets.token_bytes(16), uid, gid)
        env["XAUTHORITY"] = xauthority
        argv = self.session_argv(xauthority)
        log_file = None
        try:
            os.makedirs(s.log_path, exist_ok=True)
            log_file = open(os.path.join(s.log_path, "qvd-nxagent.log"), "ab")
            log_file.write(f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} running "
                           f"{shlex.join(argv)}\n".encode())
        except OSError as e:
            log.warn("cannot open the nxagent log in {path}: {e}", path=s.log_path, e=e)
        proto = _SessionProtocol(self, log_file)
        cwd = home if os.path.isdir(home) else "/"
        log.info("starting the X session as {user}: {argv}", user=user, argv=shlex.join(argv))
        self._process = self._reactor.spawnProcess(
            proto, argv[0], argv, env=env, path=cwd, uid=uid, gid=gid,
            childFDs={0: "w", 1: "r", 2: "r"})
        self._protocol = proto
        self._sid = self._process.pid

    def _session_line(self, line):
        event = self.machine.line(line)
        if event is not None and event.kind == "pid":
            self._sid = self._procs.session_of(event.value) or self._sid
            self._write_state_files(self.machine.state)

    def _session_ended(self, proto, reason):
        if proto is not self._protocol:
            return
        log.info("X session process ended: {r}", r=reason.getErrorMessage())
        sid = self._sid
        self._process = self._protocol = self._sid = None
        if sid and self._procs.signal_session(sid, "TERM"):
            self._reactor.callLater(2.0, self._procs.signal_session, sid, "KILL")
        self.machine.exited()

    # -- life cycle -------------------------------------------------------------------

    def startup(self):
        """
        Clean what a previous VMA left: a session it ran cannot be adopted (its
        output pipe is gone), so it is ended, and the state files removed.
        """
        try:
            with open(self._path("nxagent.pid")) as f:
                pid = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pid = None
        if pid and self._procs.is_nxagent(pid):
            sid = self._procs.session_of(pid)
            log.warn("ending the X session (nxagent {pid}) a previous VMA left", pid=pid)
            if sid and self._procs.signal_session(sid, "TERM"):
                self._reactor.callLater(2.0, self._procs.signal_session, sid, "KILL")
            else:
                self._procs.kill(pid, "TERM")
        self._write_state_files("stopped")

    def shutdown(self):
        """End the session (the VMA is stopping). Returns a Deferred."""
        if self._process is None:
            return defer.succeed(None)
        done = defer.Deferred()
        proto = self._protocol
        original = self._session_ended

        def ended(p, reason):
            original(p, reason)
            if not done.called:
                done.callback(None)
        self._session_ended = ended
        self.machine.stop()
        self._reactor.callLater(5.0, lambda: proto is self._protocol and self.signal("KILL"))
        timeout = self._reactor.callLater(8.0, lambda: done.called or done.callback(None))
        done.addBoth(lambda r: timeout.active() and timeout.cancel())
        return done

