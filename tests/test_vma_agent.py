"""
The VMA's functions, provisioning and session handling, with fakes only
(no process is spawned, no user created, nothing signalled).
"""

import os
import socket
import tempfile

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.internet.error import ProcessDone
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from qvd.config import Config, ConfigError
from qvd.testing.vma import FakeHost, FakeProcessControl, FakeProcessReactor, FakeRunner
from qvd.vma.agent import VMA, VMASettings, write_xauthority
from qvd.vma.options import OptionsError, SessionSettings, fill_props, nxagent_options
from qvd.vma.provision import ProvisioningSettings
from qvd.vma.rpcserver import RPCError
from qvd.vma.system import CommandResult, ICommandRunner, IHost, IProcessControl

PARAMS = {"qvd.vm.user.name": "alice", "qvd.client.keyboard": "pc105/es",
          "qvd.client.os": "linux", "qvd.client.link": "adsl",
          "qvd.client.geometry": "1024x768", "qvd.client.fullscreen": "0",
          "qvd.slave.key": "s3cret"}
COOKIE = "0123456789abcdef0123456789abcdef"


class OptionsTests(unittest.TestCase):

    def test_options_line(self):
        """The options line is the reference's, display 100 by default."""
        props = fill_props(PARAMS, SessionSettings())
        self.assertEqual(
            nxagent_options(props, SessionSettings()),
            "nx/nx,keyboard=pc105/es,client=linux,link=adsl,geometry=1024x768,"
            "fullscreen=0,tolerancechecks=risky:100")

    def test_channels_and_defaults(self):
        """Defaults fill missing values; media, slave, extra args and cups follow settings."""
        settings = SessionSettings(display=150, audio=True, slave=True, printing=True,
                                   defaults={"qvd.client.link": "lan"})
        props = fill_props({"qvd.client.nxagent.extra_args": "cache=8M,images=64M",
                            "qvd.client.printing.enabled": "1"}, settings)
        self.assertEqual(nxagent_options(props, settings),
                         "nx/nx,link=lan,media=1,slave=1,tolerancechecks=risky,"
                         "cache=8M,images=64M,cups=2150:150")
        self.assertEqual(settings.nx_port, 4150)

    def test_bad_value(self):
        """A value with other characters is refused, naming the property."""
        props = fill_props({"qvd.client.geometry": "800x600,listen=1"}, SessionSettings())
        e = self.assertRaises(OptionsError, nxagent_options, props, SessionSettings())
        self.assertIn("qvd.client.geometry", str(e))
        props = fill_props({"qvd.client.nxagent.extra_args": "a=b:7"}, SessionSettings())
        self.assertRaises(OptionsError, nxagent_options, props, SessionSettings())

    def test_cookie(self):
        """With the L7R's cookie the line starts nx/nx,cookie=<cookie>; a cookie
        that is not 32 hex digits is refused without echoing it."""
        props = fill_props(PARAMS, SessionSettings())
        self.assertEqual(
            nxagent_options(props, SessionSettings(), cookie=COOKIE),
            f"nx/nx,cookie={COOKIE},keyboard=pc105/es,client=linux,link=adsl,"
            "geometry=1024x768,fullscreen=0,tolerancechecks=risky:100")
        for bad in ("abc", COOKIE + ",listen=1", COOKIE[:-1] + "g"):
            e = self.assertRaises(OptionsError, nxagent_options, props, SessionSettings(),
                                  cookie=bad)
            self.assertIn("qvd.nx.cookie", str(e))
            self.assertNotIn(bad, str(e))

    def test_client_cannot_set_cookie(self):
        """qvd.client.nxagent.extra_args cannot set nxagent's cookie."""
        props = fill_props({"qvd.client.nxagent.extra_args": f"cache=8M,cookie={COOKIE}"},
                           SessionSettings())
        e = self.assertRaises(OptionsError, nxagent_options, props, SessionSettings())
        self.assertIn("cookie", str(e))

    def test_client_cannot_move_the_listener(self):
        """
        Nor where nxagent listens and whom it accepts (the relay path): listen,
        port, accept and loopback are refused; harmless tuning passes.
        """
        for option in ("listen=4200", "port=4200", "accept=10.0.0.9", "loopback=0"):
            props = fill_props({"qvd.client.nxagent.extra_args": f"cache=8M,{option}"},
                               SessionSettings())
            e = self.assertRaises(OptionsError, nxagent_options, props, SessionSettings())
            self.assertIn(option.split("=")[0], str(e))
        props = fill_props({"qvd.client.nxagent.extra_args": "cache=8M,images=64M"},
                           SessionSettings())
        self.assertIn("cache=8M,images=64M", nxagent_options(props, SessionSettings()))

    def test_fill_props(self):
        """User defaults to vma.user.default.name and home is always <home>/<user>."""
        props = fill_props({"qvd.vm.user.home": "/etc"}, SessionSettings())
        self.assertEqual((props["qvd.vm.user.name"], props["qvd.vm.user.home"],
                          props["qvd.vm.user.groups"]), ("qvd", "/home/qvd", "qvduser"))
        self.assertRaises(OptionsError, fill_props, {"qvd.vm.user.name": "../root"},
                          SessionSettings())


class AgentTestCase(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="qvd-vma-test-")
        self.addCleanup(lambda: os.system(f"rm -rf {self.tmp}"))
        self.reactor = FakeProcessReactor()
        self.runner = FakeRunner()
        self.host = FakeHost(users={"root": (0, 0, "/root")}, groups={"root"}, paths={"/"})
        self.procs = FakeProcessControl()

        def side_effects(argv):
            if argv[0] == "useradd":
                self.host.users[argv[-1]] = (1234, 1234, f"/home/{argv[-1]}")
                self.host.paths.add(f"/home/{argv[-1]}")
        self.runner.on_run = side_effects
        self.settings = self.make_settings()
        self.vma = VMA(self.reactor, self.settings, self.runner, self.host, self.procs)

    def make_settings(self, **kw):
        run = os.path.join(self.tmp, "run")
        kw.setdefault("provisioning", ProvisioningSettings(hooks={}))
        return VMASettings(run_path=run, nxagent_config=os.path.join(run, "nxagent.conf"),
                           log_path=os.path.join(self.tmp, "log"), **kw)

    def read(self, name):
        with open(os.path.join(self.tmp, "run", name)) as f:
            return f.read()

    @defer.inlineCallbacks
    def start(self, params=PARAMS):
        result = yield self.vma.x_start(dict(params))
        self.assertEqual(result, "starting")
        return self.reactor.spawned[-1] if self.reactor.spawned else None

    def lines(self, process, *lines):
        process.proto.outReceived("".join(line + "\n" for line in lines).encode())

    @defer.inlineCallbacks
    def connected(self):
        p = yield self.start()
        self.procs.alive.add(777)
        self.procs.sessions[777] = p.pid
        self.lines(p, "Info: Agent running with pid '777'.",
                   "Session: Starting session at 'x'.", "Session: Session started at 'x'.")
        return p


class AgentTests(AgentTestCase):

    def test_fakes(self):
        """The fakes provide the interfaces the VMA uses."""
        verifyObject(ICommandRunner, self.runner)
        verifyObject(IHost, self.host)
        verifyObject(IProcessControl, self.procs)

    @defer.inlineCallbacks
    def test_start_provisions_and_spawns(self):
        """x_start on a stopped session creates the user and runs xinit/nxagent as them."""
        states = []
        original = self.vma.state_changed
        self.vma.state_changed = lambda old, new: (states.append(new), original(old, new))
        p = yield self.start()
        self.assertEqual(self.runner.commands, [
            ["groupadd", "alice"], ["groupadd", "qvduser"],
            ["useradd", "-m", "-d", "/home/alice", "-g", "alice", "-s", "/bin/bash",
             "-G", "qvduser", "alice"]])
        self.assertEqual(states, ["starting", "provisioning", "starting"])
        conf = self.settings.nxagent_config
        xauth = os.path.join(self.tmp, "run", "xauthority-alice")
        self.assertEqual(p.argv, [
            "/usr/bin/setsid", "--wait", "/usr/bin/xinit", "/etc/X11/Xsession", "--",
            "/usr/bin/nxagent", ":100", "-nolisten", "tcp", "-auth", xauth, "-name", "QVD",
            "-display", f"nx/nx,options={conf}:100"])
        self.assertEqual((p.kwargs["uid"], p.kwargs["gid"]), (1234, 1234))
        env = p.kwargs["env"]
        self.assertEqual(env["XAUTHORITY"], xauth)
        self.assertEqual((env["HOME"], env["USER"], env["LOGNAME"]),
                         ("/home/alice", "alice", "alice"))
        self.assertIn("LANG", env)
        self.assertEqual(self.read("nxagent.conf"),
                         "nx/nx,keyboard=pc105/es,client=linux,link=adsl,geometry=1024x768,"
                         "fullscreen=0,tolerancechecks=risky:100\n")
        self.assertEqual(self.read("slave.conf"), "s3cret")
        self.assertEqual(self.vma.machine.state, "starting")
        self.assertTrue(self.read("nxagent.state").startswith("starting:"))

    @defer.inlineCallbacks
    def test_start_waits_for_the_boot(self):
        """
        The first session starts only once vma.boot.wait.command has returned
        (the agent answers while the system still boots); later sessions do
        not wait again, and a failing wait does not stop the session.
        """
        booting = defer.Deferred()
        self.runner.results["systemctl"] = booting
        self.vma = VMA(self.reactor, self.make_settings(
            boot_wait_command=("systemctl", "is-system-running", "--wait")),
            self.runner, self.host, self.procs)
        result = yield self.vma.x_start(dict(PARAMS))
        self.assertEqual(result, "starting")
        self.assertEqual(self.runner.commands, [["systemctl", "is-system-running", "--wait"]])
        self.assertEqual(self.reactor.spawned, [])
        booting.callback(CommandResult(1, "degraded\n"))
        self.assertEqual(self.runner.commands[1], ["groupadd", "alice"])
        self.assertEqual(len(self.reactor.spawned), 1)
        self.reactor.spawned[-1].proto.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(self.vma.machine.state, "stopped")
        before = len(self.runner.commands)
        yield self.vma.x_start(dict(PARAMS))
        self.assertNotIn(["systemctl", "is-system-running", "--wait"],
                         self.runner.commands[before:])
        self.assertEqual(len(self.reactor.spawned), 2)

    @defer.inlineCallbacks
    def test_xauthority_private(self):
        """
        The session's X cookie is a fresh 16-byte MIT-MAGIC-COOKIE-1 in a file
        only the session user can read; each session gets another cookie.
        """
        p = yield self.start()
        path = p.kwargs["env"]["XAUTHORITY"]
        st = os.stat(path)
        self.assertEqual((st.st_mode & 0o777, st.st_uid, st.st_gid), (0o600, 1234, 1234))
        with open(path, "rb") as f:
            first = f.read()
        host = socket.gethostname().encode()
        local = b"\x01\x00" + len(host).to_bytes(2, "big") + host
        self.assertTrue(first.startswith(local))
        self.assertIn(b"\xff\xff\x00\x00\x00\x03100", first)
        self.assertEqual(first.count(b"\x00\x03100\x00\x12MIT-MAGIC-COOKIE-1\x00\x10"), 2)
        self.assertEqual(len(first), 2 * (4 + 5 + 20 + 18) + len(host))
        write_xauthority(path, 100, b"x" * 16)
        with open(path, "rb") as f:
            self.assertNotEqual(f.read(), first)

    @defer.inlineCallbacks
    def test_privileged_user_refused(self):
        """
        x_start refuses root, uids and gids below 1000, privileged groups and an
        existing system account, whatever the caller sends; nothing is run.
        """
        self.host.users["daemon"] = (1, 1, "/usr/sbin")
        for params in ({"qvd.vm.user.name": "root"},
                       {"qvd.vm.user.name": "daemon"},
                       {"qvd.vm.user.uid": "0"},
                       {"qvd.vm.user.gid": "0"},
                       {"qvd.vm.user.group": "root"},
                       {"qvd.vm.user.groups": "shadow,disk,sudo"},
                       {"qvd.vm.user.groups": "qvduser, disk"}):
            e = yield self.assertFailure(self.vma.x_start(dict(PARAMS, **params)), RPCError)
            self.assertTrue(any(w in e.message for w in ("root", "ordinary", "privileged")),
                            e.message)
        self.assertEqual((self.runner.commands, self.reactor.spawned), ([], []))
        self.assertEqual(self.vma.machine.state, "stopped")

    @defer.inlineCallbacks
    def test_existing_user_not_provisioned(self):
        """A user that exists with its home is not provisioned again."""
        self.host.users["alice"] = (1000, 1000, "/home/alice")
        self.host.paths.add("/home/alice")
        p = yield self.start()
        self.assertEqual(self.runner.commands, [])
        self.assertEqual(p.kwargs["uid"], 1000)

    @defer.inlineCallbacks
    def test_bad_option_refused(self):
        """x_start with a bad option value fails naming it and starts nothing."""
        e = yield self.assertFailure(
            self.vma.x_start(dict(PARAMS, **{"qvd.client.link": "lan,listen=9"})), RPCError)
        self.assertIn("qvd.client.link", e.message)
        self.assertEqual((self.vma.machine.state, self.reactor.spawned), ("stopped", []))

    @defer.inlineCallbacks
    def test_lines_drive_state(self):
        """nxagent's output drives x_state to listening and connected; pid file written."""
        p = yield self.start()
        self.lines(p, "Info: Agent running with pid '777'.", "Session: Starting session at 'x'.")
        self.assertEqual(self.vma.x_state({}), "listening")
        self.assertEqual(self.read("nxagent.pid"), "777\n")
        self.lines(p, "Session: Session started at 'x'.")
        self.assertEqual(self.vma.x_state({}), "connected")
        with open(os.path.join(self.tmp, "log", "qvd-nxagent.log"), "rb") as f:
            self.assertIn(b"Session: Session started", f.read())

    @defer.inlineCallbacks
    def test_start_when_connected(self):
        """x_start on a connected session HUPs nxagent and fails with 'retry later'."""
        yield self.connected()
        e = yield self.assertFailure(self.vma.x_start(dict(PARAMS)), RPCError)
        self.assertIn("retry later", e.message)
        self.assertEqual(self.procs.sent[-1], (777, "HUP"))

    @defer.inlineCallbacks
    def test_resume(self):
        """x_start on a suspended session rewrites the options and HUPs nxagent."""
        p = yield self.connected()
        self.lines(p, "Session: Suspending session at 'x'.", "Session: Session suspended at 'x'.")
        self.assertEqual(self.vma.x_state({}), "suspended")
        n = len(self.reactor.spawned)
        yield self.start(dict(PARAMS, **{"qvd.client.geometry": "800x600"}))
        self.assertEqual(len(self.reactor.spawned), n)
        self.assertIn("geometry=800x600", self.read("nxagent.conf"))
        self.assertEqual(self.procs.sent[-1], (777, "HUP"))
        self.assertEqual(self.vma.x_state({}), "starting")
        self.lines(p, "Session: Resuming session at 'x'.")
        self.assertEqual(self.vma.x_state({}), "listening")

    @defer.inlineCallbacks
    def test_cookie_in_options_only(self):
        """
        The L7R's NX cookie goes into the options file, readable by the
        session user only; hooks (whose arguments the desktop can read) and
        the session's environment and command line never see it.
        """
        self.vma = VMA(self.reactor, self.make_settings(
            on_action={"pre-connect": "/hooks/pre", "connect": "/hooks/conn"}),
            self.runner, self.host, self.procs)
        p = yield self.start(dict(PARAMS, **{"qvd.nx.cookie": COOKIE}))
        self.assertTrue(self.read("nxagent.conf").startswith(f"nx/nx,cookie={COOKIE},"))
        st = os.stat(self.settings.nxagent_config)
        self.assertEqual((st.st_mode & 0o777, st.st_uid, st.st_gid), (0o600, 1234, 1234))
        hooks = [c for c in self.runner.commands if c[0].startswith("/hooks/")]
        self.assertEqual(len(hooks), 2)
        for argv in hooks + [p.argv, list(p.kwargs["env"].values())]:
            self.assertFalse(any(COOKIE in a for a in argv), argv)
        self.assertNotIn("qvd.nx.cookie", self.vma._props)

    @defer.inlineCallbacks
    def test_resume_takes_new_cookie(self):
        """A resume writes the new connection's cookie before nxagent gets its HUP
        (nxagent reads its options again when it resumes)."""
        p = yield self.connected()
        self.lines(p, "Session: Suspending session at 'x'.", "Session: Session suspended at 'x'.")
        other = "f" * 32
        yield self.start(dict(PARAMS, **{"qvd.nx.cookie": other}))
        self.assertTrue(self.read("nxagent.conf").startswith(f"nx/nx,cookie={other},"))
        self.assertEqual(self.procs.sent[-1], (777, "HUP"))

    @defer.inlineCallbacks
    def test_bad_cookie_refused(self):
        """An x_start whose cookie is not 32 hex digits fails and starts nothing."""
        e = yield self.assertFailure(
            self.vma.x_start(dict(PARAMS, **{"qvd.nx.cookie": "x,listen=9"})), RPCError)
        self.assertIn("qvd.nx.cookie", e.message)
        self.assertEqual((self.vma.machine.state, self.reactor.spawned), ("stopped", []))

    @defer.inlineCallbacks
    def test_start_in_other_state(self):
        """x_start while listening (or starting) is refused."""
        p = yield self.start()
        self.lines(p, "Session: Starting session at 'x'.")
        e = yield self.assertFailure(self.vma.x_start(dict(PARAMS)), RPCError)
        self.assertIn("in state listening", e.message)

    @defer.inlineCallbacks
    def test_provisioning_failure(self):
        """A failing useradd removes the user again and leaves the session stopped."""
        self.runner.on_run = None
        self.runner.results["useradd"] = CommandResult(1, "useradd: cannot lock /etc/passwd")
        yield self.start()
        self.assertEqual(self.runner.commands[-2:], [["userdel", "-rf", "alice"],
                                                     ["groupdel", "alice"]])
        self.assertEqual(self.vma.x_state({}), "stopped")
        self.assertIn("cannot lock", self.vma.last_error)
        self.assertEqual(self.reactor.spawned, [])
        self.flushLoggedErrors()

    @defer.inlineCallbacks
    def test_stop_during_provisioning(self):
        """x_stop while provisioning stops at once; the late provisioning spawns nothing."""
        slow = defer.Deferred()
        self.runner.on_run = None
        self.runner.results["useradd"] = slow
        yield self.start()
        self.assertEqual(self.vma.x_state({}), "provisioning")
        self.assertEqual((yield self.vma.x_stop({})), "stopped")
        self.host.users["alice"] = (1000, 1000, "/home/alice")
        self.host.paths.add("/home/alice")
        yield self.start()                       # a new session starts at once
        self.assertEqual(len(self.reactor.spawned), 1)
        slow.callback(CommandResult(0))          # the first provisioning ends late
        self.assertEqual(len(self.reactor.spawned), 1)
        self.assertEqual(self.vma.x_state({}), "starting")

    @defer.inlineCallbacks
    def test_home_drive_first_use(self):
        """A home drive without partition is partitioned, formatted and mounted."""
        self.host.paths.add("/dev/vdb")
        yield self.start()
        self.assertEqual(self.runner.commands[:3], [
            ["sfdisk", "/dev/vdb"], ["mkfs.ext4", "/dev/vdb1"],
            ["mount", "/dev/vdb1", "/home"]])

    @defer.inlineCallbacks
    def test_home_drive_reuse(self):
        """A home drive with a partition is only mounted; a /home already mounted is left."""
        self.host.paths.update({"/dev/vdb", "/dev/vdb1"})
        yield self.start()
        self.assertEqual(self.runner.commands[0], ["mount", "/dev/vdb1", "/home"])

    @defer.inlineCallbacks
    def test_home_already_mounted(self):
        """If /home is not on the root file system the drive is not touched."""
        self.host.paths.add("/dev/vdb")
        self.host.home_on_root = False
        yield self.start()
        self.assertEqual(self.runner.commands[0][0], "groupadd")

    @defer.inlineCallbacks
    def test_provisioning_disabled(self):
        """With provisioning off the session runs as the VMA's user, no command run."""
        self.vma = VMA(self.reactor, self.make_settings(provisioning_enabled=False),
                       self.runner, self.host, self.procs)
        p = yield self.start()
        self.assertEqual(self.runner.commands, [])
        self.assertIsNone(p.kwargs["uid"])
        self.assertEqual(p.kwargs["env"]["HOME"], os.environ.get("HOME"))

    @defer.inlineCallbacks
    def test_action_hooks(self):
        """pre-connect and connect hooks get the props, state and action as arguments."""
        self.host.users["alice"] = (1000, 1000, "/home/alice")
        self.host.paths.add("/home/alice")
        self.vma = VMA(self.reactor, self.make_settings(
            on_action={"pre-connect": "/hooks/pre", "connect": "/hooks/conn"}),
            self.runner, self.host, self.procs)
        yield self.start({"qvd.vm.user.name": "alice"})
        pre, conn = self.runner.commands
        self.assertEqual(pre[0], "/hooks/pre")
        self.assertEqual(pre[-4:], ["qvd.vm.session.state", "stopped",
                                    "qvd.hook.on_action", "pre-connect"])
        self.assertIn("qvd.vm.user.home", pre)
        self.assertEqual(conn[-1], "connect")

    @defer.inlineCallbacks
    def test_failing_hook(self):
        """A failing pre-connect hook fails x_start and the session stays stopped."""
        self.vma = VMA(self.reactor, self.make_settings(on_action={"pre-connect": "/h"}),
                       self.runner, self.host, self.procs)
        self.runner.results["h"] = CommandResult(3, "no licence")
        e = yield self.assertFailure(self.vma.x_start(dict(PARAMS)), RPCError)
        self.assertIn("no licence", e.message)
        self.assertEqual(self.vma.x_state({}), "stopped")

    @defer.inlineCallbacks
    def test_state_hooks(self):
        """State hooks run detached on connected, suspended and stopped (disconnected)."""
        self.vma = VMA(self.reactor, self.make_settings(
            on_state={"connected": "/c", "suspended": "/s", "disconnected": "/d"}),
            self.runner, self.host, self.procs)
        p = yield self.connected()
        self.lines(p, "Session: Session suspended at 'x'.")
        p.proto.processEnded(Failure(ProcessDone(0)))
        self.assertEqual([d[0] for d in self.runner.detached], ["/c", "/s", "/d"])
        self.assertEqual(self.runner.detached[0][-2:], ["qvd.hook.on_state", "connected"])

    @defer.inlineCallbacks
    def test_suspend_and_stop(self):
        """x_suspend HUPs nxagent; x_stop TERMs it; its exit cleans the session up."""
        p = yield self.connected()
        yield self.vma.x_suspend({})
        self.assertEqual(self.procs.sent[-1], (777, "HUP"))
        state = yield self.vma.x_stop({})
        self.assertEqual((state, self.procs.sent[-1]), ("stopping", (777, "TERM")))
        p.proto.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(self.vma.x_state({}), "stopped")
        self.assertEqual(self.procs.sent[-1], (("session", p.pid), "TERM"))
        self.reactor.advance(2)
        self.assertEqual(self.procs.sent[-1], (("session", p.pid), "KILL"))
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "run", "nxagent.state")))

    @defer.inlineCallbacks
    def test_stop_kills_after_timeout(self):
        """A session ignoring TERM for vma.timeout.stopping gets KILL on its whole session."""
        p = yield self.connected()
        yield self.vma.x_stop({})
        self.reactor.advance(20)
        self.assertIn((("session", p.pid), "KILL"), self.procs.sent)
        self.assertIn("KILL", p.signals)

    @defer.inlineCallbacks
    def test_crash(self):
        """The session process dying makes the state stopped."""
        p = yield self.connected()
        p.proto.processEnded(Failure(ProcessDone(1)))
        self.assertEqual(self.vma.x_state({}), "stopped")

    @defer.inlineCallbacks
    def test_poweroff(self):
        """poweroff runs the hook, answers, then runs vma.poweroff.command."""
        self.vma = VMA(self.reactor, self.make_settings(
            on_action={"poweroff": "/h"}, poweroff_command=("kill", "-PWR", "1")),
            self.runner, self.host, self.procs)
        yield self.vma.poweroff({})
        self.assertEqual(self.runner.commands[-1][0], "/h")
        self.reactor.advance(0.2)
        self.assertEqual(self.runner.commands[-1], ["kill", "-PWR", "1"])

    @defer.inlineCallbacks
    def test_expire(self):
        """expire runs the expire hook with the expiration params."""
        self.vma = VMA(self.reactor, self.make_settings(on_action={"expire": "/h"}),
                       self.runner, self.host, self.procs)
        yield self.vma.expire({"vm.expiration.soft": "1"})
        cmd = self.runner.commands[-1]
        self.assertEqual((cmd[0], cmd[-1]), ("/h", "expire"))
        self.assertIn("vm.expiration.soft", cmd)

    def test_startup_ends_leftover(self):
        """At start, a session left by a previous VMA is ended and the state files removed."""
        os.makedirs(os.path.join(self.tmp, "run"))
        with open(os.path.join(self.tmp, "run", "nxagent.pid"), "w") as f:
            f.write("555\n")
        self.procs.nxagents.add(555)
        self.procs.sessions[555] = 550
        self.vma.startup()
        self.assertEqual(self.procs.sent, [(("session", 550), "TERM")])
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "run", "nxagent.pid")))


class SettingsTests(unittest.TestCase):

    def load(self, text):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return VMASettings.from_config(Config.load(path))

    def test_defaults(self):
        """The declared defaults give port 3030's usual session: display 100, /home, qvd."""
        s = self.load("")
        self.assertEqual((s.session.display, s.session.nx_port, s.session.default_user,
                          s.nxagent_config, s.poweroff_command, s.timeouts.listening,
                          s.boot_wait_command),
                         (100, 4100, "qvd", "/var/run/qvd/nxagent.conf", ("poweroff",), 30.0,
                          ("systemctl", "is-system-running", "--wait")))

    def test_keys(self):
        """vma.conf keys reach the settings: hooks, defaults, timeouts, commands."""
        s = self.load("vma.display = 150\nvma.on_action.connect = /bin/true\n"
                      "vma.default.qvd.client.link = lan\nvma.timeout.stopping = 5\n"
                      "vma.poweroff.command = kill -PWR 1\nvma.provisioning.enable = 0\n"
                      "vma.nxagent.args.extra = -nolisten tcp\n"
                      "vma.boot.wait.command = /bin/true\n")
        self.assertEqual(s.session.display, 150)
        self.assertEqual(s.on_action, {"connect": "/bin/true"})
        self.assertEqual(s.session.defaults, {"qvd.client.link": "lan"})
        self.assertEqual(s.timeouts.stopping, 5.0)
        self.assertEqual(s.poweroff_command, ("kill", "-PWR", "1"))
        self.assertFalse(s.provisioning_enabled)
        self.assertEqual(s.nxagent_extra, ("-nolisten", "tcp"))
        self.assertEqual(s.boot_wait_command, ("/bin/true",))

    def test_unknown_hook(self):
        """A misspelt action hook is a configuration error naming it."""
        e = self.assertRaises(ConfigError, self.load, "vma.on_action.conect = /bin/true\n")
        self.assertIn("conect", str(e))
