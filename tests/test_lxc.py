"""
Unit tests of the LXC driver's pure parts (paths, container config, parsers)
and of the driver against a fake command runner. No root, no LXC.
"""

import os
import signal
import tempfile

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from qvd.config import Config, declared_keys
from qvd.virt import _lxcfs
from qvd.virt._lxcconfig import (
    CAP_DROP, DEFAULT_SECCOMP, DEFAULT_TEMPLATE, NO_NESTED_USERNS, IdMap, Layout, LXCSettings, di_base_name, mounts_below, parse_lxc_info,
    parse_signal, render_config)
from qvd.virt._process import ProcessResult
from qvd.virt.interfaces import IHypervisor, RunningVM, VMSpec, VirtError
from qvd.virt.lxc import LXCDriver, _ProcessWatch, makeHypervisor


def settings(**kw):
    values = dict(lxcpath="/run/qvd/lxc", basefs="/s/basefs", overlayfs="/s/overlayfs",
                  rootfs="/s/rootfs", homefs="/s/homefs")
    values.update(kw)
    return LXCSettings(**values)


def spec(**kw):
    values = dict(vm_id=42, name="desk 42", login="alice", memory=512, di_id=3,
                  di_path="/s/images/3-xfce.tar.gz", ip="10.0.255.254",
                  mac="54:52:00:00:FF:FE", netmask="255.255.0.0", bridge="qvdnet",
                  gateway="10.0.0.1")
    values.update(kw)
    return VMSpec(**values)


def template():
    with open(DEFAULT_TEMPLATE) as f:
        return f.read()


class LayoutTests(unittest.TestCase):

    def test_reference_paths(self):
        """
        A VM's files have the reference's names: basefs/<DI name without
        suffix> (plus the id mapping it was shifted for), overlayfs/<di>-<vm>-overlayfs and <vm>-overlayfs-work,
        rootfs/<vm>-fs, homefs/<vm>-fs on /home, container <prefix><vm>.
        """
        layout = Layout.of(settings(), spec())
        self.assertEqual(layout.name, "qvd-42")
        self.assertEqual(layout.container_dir, "/run/qvd/lxc/qvd-42")
        self.assertEqual(layout.config_path, "/run/qvd/lxc/qvd-42/config")
        self.assertEqual(layout.basefs, "/s/basefs/3-xfce.u1000000-g1000000")
        self.assertEqual(layout.tar_option, "-z")
        self.assertEqual(layout.upper, "/s/overlayfs/3-42-overlayfs")
        self.assertEqual(layout.work, "/s/overlayfs/42-overlayfs-work")
        self.assertEqual(layout.rootfs, "/s/rootfs/42-fs")
        self.assertEqual((layout.home_dir, layout.home_target), ("/s/homefs/42-fs", "home"))
        self.assertEqual(layout.veth, "qvd42")

    def test_home_per_user(self):
        """
        With vm.lxc.home.per.user the home is homefs/<login> on /home/<login>;
        a login that cannot name a directory is refused.
        """
        layout = Layout.of(settings(home_per_user=True), spec())
        self.assertEqual((layout.home_dir, layout.home_target),
                         ("/s/homefs/alice", "home/alice"))
        self.assertRaises(VirtError, Layout.of, settings(home_per_user=True),
                          spec(login="../root"))

    def test_long_veth_refused(self):
        """
        A veth name longer than 15 characters is refused, naming the prefix key.
        """
        with self.assertRaises(VirtError) as caught:
            Layout.of(settings(veth_prefix="averylongprefix"), spec())
        self.assertIn("vm.lxc.veth.prefix", str(caught.exception))

    def test_di_suffixes(self):
        """
        Tarball suffixes map to tar's decompression option; anything else
        (a KVM image) is refused.
        """
        self.assertEqual(di_base_name("/i/1-a.tar"), ("1-a", None))
        self.assertEqual(di_base_name("/i/1-a.tgz"), ("1-a", "-z"))
        self.assertEqual(di_base_name("/i/1-a.tar.xz"), ("1-a", "-J"))
        self.assertRaises(VirtError, di_base_name, "/i/1-a.qcow2")

    def test_unsafe_path_refused(self):
        """
        Paths with commas or colons (which overlayfs options cannot hold) are
        refused.
        """
        self.assertRaises(VirtError, Layout.of, settings(overlayfs="/s/a,b"), spec())


class ConfigTextTests(unittest.TestCase):

    def render(self, s=None, vm=None, extra=""):
        s = s or settings()
        vm = vm or spec()
        return render_config(s, vm, Layout.of(s, vm), template(), extra=extra)

    def lines(self, text):
        return [l.strip() for l in text.splitlines() if l.strip() and not l.startswith("#")]

    def test_network_lines(self):
        """
        The config joins the veth qvd<id> to the bridge with the VM's MAC,
        static address with prefix length, and gateway.
        """
        lines = self.lines(self.render())
        for expected in ("lxc.net.0.type = veth", "lxc.net.0.veth.pair = qvd42",
                         "lxc.net.0.link = qvdnet", "lxc.net.0.hwaddr = 54:52:00:00:ff:fe",
                         "lxc.net.0.ipv4.address = 10.0.255.254/16",
                         "lxc.net.0.ipv4.gateway = 10.0.0.1", "lxc.uts.name = desk-42"):
            self.assertIn(expected, lines)

    def test_dhcp_has_no_address(self):
        """
        With vm.network.use_dhcp no static address lines are written.
        """
        lines = self.lines(self.render(settings(use_dhcp=True)))
        self.assertEqual([l for l in lines if "ipv4" in l], [])

    def test_limits_home_and_signal(self):
        """
        Memory limit in bytes from spec.memory (cgroup v1 and v2 keys), CPU
        shares per CPU, the home bind mount and the halt signal.
        """
        lines = self.lines(self.render(vm=spec(cpus=2)))
        self.assertIn(f"lxc.cgroup.memory.limit_in_bytes = {512 << 20}", lines)
        self.assertIn(f"lxc.cgroup2.memory.max = {512 << 20}", lines)
        self.assertIn("lxc.cgroup.cpu.shares = 2048", lines)
        self.assertIn("lxc.mount.entry = /s/homefs/42-fs home none bind,create=dir 0 0", lines)
        self.assertIn("lxc.signal.halt = SIGRTMIN+4", lines)
        self.assertIn("lxc.rootfs.path = dir:/s/rootfs/42-fs", lines)

    def test_extra_lines_appended(self):
        """
        The DI's config-extra, then vm.lxc.conf.extra (lines split on \\n),
        come after the template.
        """
        text = self.render(settings(conf_extra=r"lxc.a = 1\nlxc.b = 2"), extra="lxc.di = x\n")
        self.assertTrue(text.endswith("lxc.di = x\nlxc.a = 1\nlxc.b = 2\n"), text[-60:])

    def test_template_error_names_placeholders(self):
        """
        A template with an unknown placeholder fails naming the known ones.
        """
        s, vm = settings(), spec()
        with self.assertRaises(VirtError) as caught:
            render_config(s, vm, Layout.of(s, vm), "lxc.x = $nonsense\n", "my.tpl")
        self.assertIn("my.tpl", str(caught.exception))
        self.assertIn("$veth", str(caught.exception))

    def test_bad_values_refused(self):
        """
        A bad MAC, IP or memory is refused with a message naming the value.
        """
        for vm, word in ((spec(mac="nope"), "nope"), (spec(ip="10.0.0.300"), "10.0.0.300"),
                         (spec(memory=0), "memory")):
            with self.assertRaises(VirtError) as caught:
                self.render(vm=vm)
            self.assertIn(word, str(caught.exception))


    def test_unprivileged_lines(self):
        """
        The container gets a user namespace mapping vm.lxc.idmap.size ids
        from vm.lxc.idmap.uid/gid, drops the capabilities of CAP_DROP, loads
        the shipped seccomp policy, has pids.max (v1 and v2) and no nested
        user namespaces.
        """
        lines = self.lines(self.render(settings(root_uid=200000, root_gid=300000,
                                                id_count=65536, pids_max=512)))
        self.assertIn("lxc.idmap = u 0 200000 65536", lines)
        self.assertIn("lxc.idmap = g 0 300000 65536", lines)
        self.assertIn(f"lxc.cap.drop = {' '.join(CAP_DROP)}", lines)
        for cap in ("sys_module", "sys_rawio", "mknod", "bpf", "syslog", "sys_time"):
            self.assertIn(cap, CAP_DROP)
        self.assertIn(f"lxc.seccomp.profile = {DEFAULT_SECCOMP}", lines)
        self.assertIn("lxc.cgroup.pids.max = 512", lines)
        self.assertIn("lxc.cgroup2.pids.max = 512", lines)
        self.assertIn(NO_NESTED_USERNS, lines)
        nested = self.lines(self.render(settings(nested_userns=True)))
        self.assertEqual([l for l in nested if "max_user_namespaces" in l], [])

    def test_shipped_seccomp_policy(self):
        """
        The shipped policy is LXC's format 2 deny list and refuses LXC's
        defaults plus the keyring, bpf, perf, kexec and module syscalls.
        """
        with open(DEFAULT_SECCOMP) as f:
            lines = [l.split("#")[0].strip() for l in f]
        self.assertEqual(lines[:2], ["2", "denylist"])
        rules = {l.split()[0]: l.split()[1:] for l in lines[3:] if l and not l.startswith("[")}
        for call in ("kexec_load", "kexec_file_load", "open_by_handle_at", "init_module",
                     "finit_module", "delete_module", "keyctl", "add_key", "request_key",
                     "bpf", "perf_event_open", "userfaultfd"):
            self.assertEqual(rules.get(call, [None])[0], "errno", call)


class SettingsTests(unittest.TestCase):

    def test_idmap_checked(self):
        """
        A mapping that would overlap the node's own ids (base below the
        size) or a tiny pids.max is refused naming the key.
        """
        for kw, word in ((dict(root_uid=1000), "vm.lxc.idmap.uid"),
                         (dict(root_gid=0), "vm.lxc.idmap.gid"),
                         (dict(pids_max=1), "vm.lxc.pids.max")):
            with self.assertRaises(VirtError) as caught:
                settings(**kw)
            self.assertIn(word, str(caught.exception))

    def test_from_config_defaults(self):
        """
        The declared defaults give the layout under /run/qvd/lxc and
        /var/lib/qvd/local (the node-local trees, docs/storage.md).
        """
        s = LXCSettings.from_config(Config(keys=declared_keys()))
        self.assertEqual(s.lxcpath, "/run/qvd/lxc")
        self.assertEqual(s.basefs, "/var/lib/qvd/local/basefs")
        self.assertEqual(s.template, DEFAULT_TEMPLATE)
        self.assertEqual(s.halt_signum(), signal.SIGRTMIN + 4)
        self.assertEqual((s.root_uid, s.root_gid, s.id_count, s.pids_max),
                         (1000000, 1000000, 65536, 2048))
        self.assertEqual(s.seccomp_profile, DEFAULT_SECCOMP)

    def test_bridge_address(self):
        """
        The bridge gets vm.lxc.bridge.address, or else the first address of
        the VM network.
        """
        self.assertEqual(settings().node_bridge_address(), "10.0.0.1/16")
        self.assertEqual(settings(bridge_address="10.9.0.7/24").node_bridge_address(),
                         "10.9.0.7/24")
        self.assertRaises(VirtError, settings(bridge_address="x").node_bridge_address)

    def test_vm_id_of(self):
        """
        Only names of the prefix followed by digits are our containers.
        """
        s = settings()
        self.assertEqual(s.vm_id_of("qvd-17"), 17)
        self.assertIsNone(s.vm_id_of("qvd-x"))
        self.assertIsNone(s.vm_id_of("other-17"))


class ParserTests(unittest.TestCase):

    def test_signals(self):
        """
        Signal names with or without SIG, real-time offsets and numbers parse.
        """
        self.assertEqual(parse_signal("SIGUSR1"), signal.SIGUSR1)
        self.assertEqual(parse_signal("pwr"), signal.SIGPWR)
        self.assertEqual(parse_signal("SIGRTMIN+3"), signal.SIGRTMIN + 3)
        self.assertEqual(parse_signal("15"), 15)
        self.assertRaises(VirtError, parse_signal, "SIGNOPE")

    def test_lxc_info(self):
        """
        lxc-info -s -p output gives the state and the pid.
        """
        self.assertEqual(parse_lxc_info("State:          RUNNING\nPID:            19666\n"),
                         ("RUNNING", 19666))
        self.assertEqual(parse_lxc_info("State:          STOPPED\n"), ("STOPPED", None))

    def test_mounts_below(self):
        """
        Mount points at or below a path are found, deepest first, with
        /proc/mounts escapes decoded; a sibling with the same prefix is not.
        """
        text = ("overlay /s/rootfs/4-fs overlay rw 0 0\n"
                "tmpfs /s/rootfs/4-fs/dev tmpfs rw 0 0\n"
                "overlay /s/rootfs/42-fs overlay rw 0 0\n"
                "x /s/rootfs/4-fs/a\\040b x rw 0 0\n")
        self.assertEqual(mounts_below(text, "/s/rootfs/4-fs"),
                         ["/s/rootfs/4-fs/a b", "/s/rootfs/4-fs/dev", "/s/rootfs/4-fs"])


class FakeRunner:
    """
    Answers commands from a table of argv[0] -> ProcessResult (or a
    callable), recording every call.
    """

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def __call__(self, argv, log_path=None):
        self.calls.append(list(argv))
        answer = self.answers.get(argv[0], ProcessResult(tuple(argv), 0))
        if callable(answer):
            answer = answer(argv)
        return defer.succeed(answer)


class DriverTests(unittest.TestCase):

    def setUp(self):
        self.root = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.root, True))
        self.clock = task.Clock()
        # Unique names: cleanup() looks for (and kills) the container's real
        # cgroups, which must never be another user's.
        self.settings = settings(lxcpath=os.path.join(self.root, "lxc"),
                                 name_prefix=f"qvdt-unit{os.getpid()}-",
                                 veth_prefix=f"qtu{os.getpid() % 1000}v")

    def driver(self, answers):
        runner = FakeRunner(answers)
        driver = LXCDriver(Config(keys=declared_keys()), self.clock, run=runner,
                           to_thread=lambda f, *a: defer.maybeDeferred(f, *a),
                           settings=self.settings)
        return driver, runner

    def container(self, vm_id):
        path = os.path.join(self.settings.lxcpath, self.settings.container_name(vm_id))
        os.makedirs(path)
        with open(os.path.join(path, "config"), "w") as f:
            f.write("lxc.uts.name = x\n")
        return path

    def test_interface(self):
        """
        The driver (also through the HKD's makeHypervisor) provides
        IHypervisor and is named lxc.
        """
        driver, _ = self.driver({})
        self.assertTrue(verifyObject(IHypervisor, driver))
        self.assertEqual(driver.name, "lxc")
        self.assertTrue(verifyObject(IHypervisor, makeHypervisor(
            Config(keys=declared_keys()), self.clock)))

    def test_list_running(self):
        """
        listRunning reports our containers that lxc-info says run, with the
        init pid, and ignores stopped ones and foreign names.
        """
        for vm_id in (1, 2):
            self.container(vm_id)
        os.makedirs(os.path.join(self.settings.lxcpath, "someone-else"))

        def info(argv):
            if argv[2] == self.settings.container_name(1):
                return ProcessResult(tuple(argv), 0, "State: RUNNING\nPID: 4321\n")
            return ProcessResult(tuple(argv), 0, "State: STOPPED\n")
        driver, runner = self.driver({"lxc-info": info})
        found = self.successResultOf(driver.listRunning())
        self.assertEqual(found, [RunningVM(1, 4321)])

    def test_unknown_vm_is_not_running(self):
        """
        A VM without a container directory is not running and LXC is not asked.
        """
        driver, runner = self.driver({})
        self.assertFalse(self.successResultOf(driver.isRunning(9)))
        self.assertIsNone(self.successResultOf(driver.watch(9)))
        self.assertEqual(runner.calls, [])

    def test_start_failure_reports_lxc_errors(self):
        """
        When lxc-start fails, start fails with a VirtError quoting LXC's log
        errors.
        """
        path = self.container(5)
        with open(os.path.join(path, "lxc.log"), "w") as f:
            f.write("lxc-start x-5 1 ERROR conf - conf.c:1 - Failed to mount rootfs\n")
        driver, _ = self.driver({
            "lxc-start": ProcessResult(("lxc-start",), 1),
            "lxc-info": ProcessResult(("lxc-info",), 0, "State: STOPPED\n")})
        failure = self.failureResultOf(driver.start(spec(vm_id=5)), VirtError)
        self.assertIn("Failed to mount rootfs", str(failure.value))

    def test_start_reports_init_pid(self):
        """
        start runs lxc-start -d in path.run.lxc and answers with the pid of
        the container's init.
        """
        self.container(6)
        driver, runner = self.driver({
            "lxc-info": ProcessResult(("lxc-info",), 0, "State: RUNNING\nPID: 77\n")})
        self.assertEqual(self.successResultOf(driver.start(spec(vm_id=6))), RunningVM(6, 77))
        self.assertEqual(runner.calls[0][:6],
                         ["lxc-start", "-n", self.settings.container_name(6),
                          "-P", self.settings.lxcpath, "-d"])

    def test_watch_after_start_asks_lxc_nothing(self):
        """
        The watch of a VM the driver just started follows the init pid start
        got (no second lxc-info); a later watch asks LXC again.
        """
        self.container(6)
        driver, runner = self.driver({
            "lxc-info": ProcessResult(("lxc-info",), 0, "State: RUNNING\nPID: 999999999\n")})
        self.successResultOf(driver.start(spec(vm_id=6)))
        calls = len(runner.calls)
        self.assertIsNone(self.successResultOf(driver.watch(6)))    # no such process: ended
        self.assertEqual(len(runner.calls), calls)
        self.successResultOf(driver.watch(6))
        self.assertEqual(runner.calls[-1][0], "lxc-info")

    def test_missing_bridge_created(self):
        """
        A missing bridge is created with the node's address and brought up;
        a failure names the bridge.
        """
        driver, runner = self.driver({})
        self.successResultOf(driver.ensure_bridge("qvdnone0"))
        self.assertEqual(runner.calls, [
            ["ip", "link", "add", "name", "qvdnone0", "type", "bridge"],
            ["ip", "address", "add", "10.0.0.1/16", "dev", "qvdnone0"],
            ["ip", "link", "set", "qvdnone0", "up"]])
        driver, runner = self.driver({"ip": ProcessResult(("ip",), 2, err="RTNETLINK")})
        failure = self.failureResultOf(driver.ensure_bridge("qvdnone0"), VirtError)
        self.assertIn("qvdnone0", str(failure.value))

    def test_cleanup_of_vm_with_non_tarball_di(self):
        """
        prepare refuses a DI that is not a tarball; cleanup of that VM still
        removes its container directory.
        """
        path = self.container(8)
        driver, _ = self.driver({"lxc-info": ProcessResult(("lxc-info",), 0, "State: STOPPED\n")})
        vm = spec(vm_id=8, di_path="/s/images/8-disk.qcow2")
        self.failureResultOf(driver.prepare(vm), VirtError)
        self.successResultOf(driver.cleanup(vm))
        self.assertFalse(os.path.exists(path))

    def test_kill_gives_up_after_timeout(self):
        """
        kill fails with a VirtError when the container still runs
        vm.lxc.stop.timeout seconds after lxc-stop -k.
        """
        self.container(7)
        driver, _ = self.driver({
            "lxc-info": ProcessResult(("lxc-info",), 0, "State: RUNNING\nPID: 77\n")})
        d = driver.kill(7)
        self.clock.pump([0.1] * 101)
        self.assertIn("still RUNNING", str(self.failureResultOf(d, VirtError).value))


class WatchTests(unittest.TestCase):

    def test_poll_fallback(self):
        """
        Without pidfds the watch polls /proc and fires once the process is
        gone; a living process keeps it waiting.
        """
        clock = task.Clock()
        import qvd.virt.lxc as lxc
        original = os.pidfd_open

        def no_pidfd(pid):
            raise OSError(38, "Function not implemented")
        os.pidfd_open = no_pidfd
        self.addCleanup(setattr, os, "pidfd_open", original)
        alive = {"start": "100"}
        self.patch(lxc, "_start_time", lambda pid: alive["start"])
        watch = _ProcessWatch(clock, os.getpid(), 1.0)
        clock.advance(5)
        self.assertNoResult(watch.ended)
        alive["start"] = None
        clock.advance(1)
        self.successResultOf(watch.ended)


class PidfdWatchTests(unittest.TestCase):

    def test_pidfd_reader_and_cancel(self):
        """
        The watch of a living process registers a pidfd reader; cancelling
        it removes the reader and closes the fd; a readable pidfd (the
        process ended) fires it.
        """
        from twisted.internet.testing import MemoryReactorClock
        reactor = MemoryReactorClock()
        watch = _ProcessWatch(reactor, os.getpid(), 1.0)
        self.assertIn(watch, reactor.getReaders())
        fd = watch.fileno()
        watch.ended.cancel()
        self.failureResultOf(watch.ended, defer.CancelledError)
        self.assertNotIn(watch, reactor.getReaders())
        self.assertRaises(OSError, os.fstat, fd)
        watch = _ProcessWatch(reactor, os.getpid(), 1.0)
        watch.doRead()
        self.successResultOf(watch.ended)
        self.assertNotIn(watch, reactor.getReaders())


class FileSystemTests(unittest.TestCase):

    def test_corrupt_tarball_leaves_nothing(self):
        """
        ensure_basefs of a file tar cannot read raises a VirtError naming the
        file and removes its temporary tree (no root needed).
        """
        root = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(root, True))
        bad = os.path.join(root, "9-bad.tar")
        with open(bad, "wb") as f:
            f.write(b"garbage" * 100)
        s = settings(basefs=os.path.join(root, "basefs"))
        layout = Layout.of(s, spec(di_path=bad))
        with self.assertRaises(VirtError) as caught:
            _lxcfs.ensure_basefs(layout, bad, s.basefs, s.idmap)
        self.assertIn(bad, str(caught.exception))
        self.assertEqual(os.listdir(s.basefs), [".locks"])


class ShiftIdsTests(unittest.TestCase):

    def setUp(self):
        if os.geteuid() != 0:
            raise unittest.SkipTest("chown needs root")
        self.root = tempfile.mkdtemp()
        self.addCleanup(lambda: __import__("shutil").rmtree(self.root, True))
        self.idmap = IdMap(1000000, 2000000, 65536)

    def make(self, name, uid, gid, mode=0o644):
        path = os.path.join(self.root, name)
        with open(path, "w") as f:
            f.write(name)
        os.chown(path, uid, gid)
        os.chmod(path, mode)
        return path

    def test_owners_shifted_bits_kept(self):
        """
        Every owner moves into the range (root, users, nobody; symlinks
        themselves; hard links once); setuid and setgid bits survive; ids
        outside the first 65536 stay; a second run changes nothing.
        """
        os.chown(self.root, 0, 0)
        su = self.make("su", 0, 0, 0o4755)
        sg = self.make("wall", 0, 5, 0o2755)
        user = self.make("bob", 1000, 1000)
        nobody = self.make("nobody", 65534, 65534)
        far = self.make("far", 70000, 70000)
        os.link(user, os.path.join(self.root, "bob-link"))
        os.symlink("su", os.path.join(self.root, "link"))
        os.lchown(os.path.join(self.root, "link"), 1, 1)
        os.mkdir(os.path.join(self.root, "dir"))
        _lxcfs.shift_ids(self.root, self.idmap)

        def owner(path):
            st = os.lstat(path)
            return st.st_uid, st.st_gid, st.st_mode & 0o7777
        self.assertEqual(owner(self.root)[:2], (1000000, 2000000))
        self.assertEqual(owner(su), (1000000, 2000000, 0o4755))
        self.assertEqual(owner(sg), (1000000, 2000005, 0o2755))
        self.assertEqual(owner(user), (1001000, 2001000, 0o644))
        self.assertEqual(owner(nobody)[:2], (1065534, 2065534))
        self.assertEqual(owner(far)[:2], (70000, 70000))
        self.assertEqual(owner(os.path.join(self.root, "link"))[:2], (1000001, 2000001))
        self.assertEqual(owner(os.path.join(self.root, "dir"))[:2], (1000000, 2000000))
        self.assertEqual(_lxcfs.shift_ids(self.root, self.idmap), 0)

    def test_file_capabilities_rooted_in_the_container(self):
        """
        A v2 file capability (which chown removes) comes back as a v3 one
        whose root is the containers' root.
        """
        import struct
        ping = self.make("ping", 0, 0, 0o755)
        v2 = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)   # cap_net_raw+ep
        os.setxattr(ping, "security.capability", v2)
        _lxcfs.shift_ids(self.root, self.idmap)
        value = os.getxattr(ping, "security.capability")
        self.assertEqual(struct.unpack("<IIIIII", value),
                         (0x03000001, 1 << 13, 0, 0, 0, 1000000))

    def test_acl_ids_shifted(self):
        """The named users and groups of a POSIX ACL move with the owners."""
        import struct
        path = self.make("shared", 0, 0)
        acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in (
            (0x01, 6, 0xFFFFFFFF), (0x02, 4, 1000), (0x04, 4, 0xFFFFFFFF),
            (0x08, 4, 100), (0x10, 6, 0xFFFFFFFF), (0x20, 0, 0xFFFFFFFF)))
        try:
            os.setxattr(path, "system.posix_acl_access", acl)
        except OSError as e:
            raise unittest.SkipTest(f"no POSIX ACLs on {self.root}: {e}")
        _lxcfs.shift_ids(self.root, self.idmap)
        value = os.getxattr(path, "system.posix_acl_access")
        ids = [struct.unpack_from("<HHI", value, at) for at in range(4, len(value), 8)]
        self.assertIn((0x02, 4, 1001000), ids)
        self.assertIn((0x08, 4, 2000100), ids)


class ProcessTests(unittest.TestCase):

    def test_result_and_timeout(self):
        """
        run() reports a command's exit status and output; a command running
        past its timeout is killed and reported with code -9.
        """
        from twisted.internet import reactor
        from qvd.virt._process import run

        @defer.inlineCallbacks
        def check():
            result = yield run(reactor, ["sh", "-c", "echo out; echo err >&2; exit 3"])
            self.assertEqual((result.code, result.out, result.err), (3, "out\n", "err\n"))
            result = yield run(reactor, ["sleep", "30"], timeout=0.2)
            self.assertEqual(result.code, -9)
            self.assertIn("killed after 0.2 s", result.err)
            with self.assertRaises(VirtError):
                yield run(reactor, ["qvd-no-such-program"])
        return check()
