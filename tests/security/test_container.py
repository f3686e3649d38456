"""
LXC desktops are unprivileged containers (qvd/virt/lxc.conf.template,
qvd/virt/lxc.seccomp): tried from inside a real desktop, as its user and as
its root, after a real login through the L7R. Container root is an
unprivileged host user; it cannot make or open host device nodes, change its
device policy or any cgroup limit, load modules, use the kernel keyring, bpf
or perf, or nest user namespaces; the desktop still works. One node is
shared by the tests of the class, in order (as tests/security/test_network.py).
"""

import os
import stat
import subprocess

from twisted.trial import unittest

from qvd.testing import e2e
from qvd.virt._lxcconfig import CAP_DROP

BASE = 1000000      # vm.lxc.idmap.uid / .gid (the shipped defaults)
SIZE = 65536        # vm.lxc.idmap.size
CAPS = {"chown": 0, "dac_override": 1, "kill": 5, "setgid": 6, "setuid": 7,
        "linux_immutable": 9, "net_admin": 12, "net_raw": 13, "sys_module": 16,
        "sys_rawio": 17, "sys_chroot": 18, "sys_ptrace": 19, "sys_pacct": 20,
        "sys_admin": 21, "sys_boot": 22, "sys_time": 25, "mknod": 27,
        "audit_control": 30, "mac_override": 32, "mac_admin": 33, "syslog": 34,
        "wake_alarm": 35, "block_suspend": 36, "perfmon": 38, "bpf": 39,
        "checkpoint_restore": 40}

#: mknod of a device, then open it: prints what happened at each step.
MKNOD = """
import os, stat, sys
kind, major, minor = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
path = "/tmp/qvd-node-%d" % os.getpid()
mode = (stat.S_IFCHR if kind == "c" else stat.S_IFBLK) | 0o600
try:
    os.mknod(path, mode, os.makedev(major, minor))
except OSError as e:
    print("mknod refused", e.errno)
    sys.exit()
try:
    os.close(os.open(path, os.O_RDONLY))
except OSError as e:
    print("open refused", e.errno)
else:
    print("opened")
finally:
    os.unlink(path)
"""

#: write sys.argv[2] to the file sys.argv[1]
WRITE = """
import sys
try:
    with open(sys.argv[1], "w") as f:
        f.write(sys.argv[2])
except OSError as e:
    print("refused", e.errno)
else:
    print("written")
"""

#: open sys.argv[1] for reading
OPEN = """
import os, sys
try:
    os.close(os.open(sys.argv[1], os.O_RDONLY))
except OSError as e:
    print("refused", e.errno)
else:
    print("opened")
"""

#: each syscall (x86_64 numbers) with harmless arguments -> its errno (0: done)
SYSCALLS = """
import ctypes, json
libc = ctypes.CDLL(None, use_errno=True)
calls = {
    "keyctl": (250, 0, -3, 0),           # KEYCTL_GET_KEYRING_ID of the session keyring
    "add_key": (248, b"user", b"qvd", b"x", 1, -3),
    "request_key": (249, b"user", b"qvd", None, 0),
    "bpf": (321, 0, None, 0),            # BPF_MAP_CREATE without attributes
    "perf_event_open": (298, None, 0, -1, -1, 0),
    "init_module": (175, None, 0, b""),
    "finit_module": (313, -1, b"", 0),
    "delete_module": (176, b"loop", 0),
    "kexec_load": (246, 0, 0, None, 0),
    "kexec_file_load": (320, -1, -1, 0, b"", 0),
    "open_by_handle_at": (304, -1, None, 0),
    "userfaultfd": (323, 0),
    "getpid": (39,),                     # a control: allowed
}
out = {}
for name, (number, *args) in calls.items():
    ctypes.set_errno(0)
    rc = libc.syscall(number, *args)
    out[name] = ctypes.get_errno() if rc == -1 else 0
print(json.dumps(out))
"""

#: unshare(CLONE_NEWUSER): what a user needs to mount file systems of his own
UNSHARE = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000) == 0:
    print("unshared")
else:
    print("refused", ctypes.get_errno())
"""


def _node():
    stack = e2e.Stack("ctr", subnet_base=223)
    stack.start()
    stack.bob = stack.add_user("bob", "bob-secret")
    stack.client("bob", "bob-secret").wait_for_colour()
    return stack


NODE = e2e.SharedStack(_node)


def _host_root_disk():
    """(major, minor) of the block device holding the host's /, or (254, 0)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == "/":
                major, minor = (int(n) for n in fields[2].split(":"))
                if major:
                    return major, minor
    return 254, 0


class UnprivilegedContainerTests(unittest.TestCase):
    timeout = 400

    def setUp(self):
        self.stack = NODE.get()
        self.vm = self.stack.bob

    def run_as(self, user, code, *argv):
        done = self.stack.python_as(self.vm, user, f"import sys; sys.argv[1:] = {list(argv)!r}\n"
                                    + code)
        self.assertEqual(done.returncode, 0, done.stderr)
        return done.stdout.strip()

    def init_pid(self):
        done = subprocess.run(["lxc-info", "-P", self.stack.lxcpath, "-n",
                               self.stack.container(self.vm), "-p", "-H"],
                              capture_output=True, text=True)
        self.assertEqual(done.returncode, 0, done.stderr)
        return int(done.stdout.split()[0])

    def status_of(self, user):
        text = self.stack.attach_as(self.vm, user, "cat", "/proc/self/status").stdout
        return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)

    def test_1_root_maps_to_unprivileged_host_uid(self):
        """
        Inside, uid_map and gid_map are 0 <base> 65536; the container's init,
        seen from the host, runs as host uid and gid <base> (not 0).
        """
        for name in ("uid_map", "gid_map"):
            done = self.stack.attach(self.vm, "cat", f"/proc/self/{name}")
            self.assertEqual(done.stdout.split(), ["0", str(BASE), str(SIZE)], done.stderr)
        with open(f"/proc/{self.init_pid()}/status") as f:
            status = dict(line.split(":\t", 1) for line in f.read().splitlines()
                          if ":\t" in line)
        self.assertEqual(status["Uid"].split(), [str(BASE)] * 4)
        self.assertEqual(status["Gid"].split(), [str(BASE)] * 4)
        self.assertEqual(status["Name"].strip(), "systemd")

    def test_2_no_host_device_node(self):
        """
        Neither root nor bob can mknod /dev/kmsg (c 1:11) or the host's root
        disk; a c 1:11 node the host puts in bob's home cannot be opened
        from inside either (the device policy refuses it).
        """
        major, minor = _host_root_disk()
        for user in ("root", "bob"):
            for node in (("c", 1, 11), ("b", major, minor), ("b", 254, 0)):
                found = self.run_as(user, MKNOD, *map(str, node))
                self.assertTrue(found.startswith("mknod refused"), f"{user} {node}: {found}")
        home = os.path.join(self.stack.root, "storage", "homefs", f"{self.vm}-fs")
        planted = os.path.join(home, "kmsg")
        os.mknod(planted, stat.S_IFCHR | 0o666, os.makedev(1, 11))
        self.addCleanup(os.unlink, planted)
        for user in ("root", "bob"):
            self.assertTrue(self.run_as(user, OPEN, "/home/kmsg").startswith("refused"), user)

    def test_3_device_policy_and_limits_not_writable(self):
        """
        Writing devices.allow (the container's cgroup and a child cgroup its
        root made), pids.max or memory.limit_in_bytes fails for root and bob;
        the values stay.
        """
        major, minor = _host_root_disk()
        cg = "/sys/fs/cgroup"
        made = self.stack.attach(self.vm, "mkdir", f"{cg}/devices/qvd-probe")
        self.addCleanup(self.stack.attach, self.vm, "rmdir", f"{cg}/devices/qvd-probe")
        targets = [(f"{cg}/devices/devices.allow", "c 1:11 r"),
                   (f"{cg}/devices/devices.allow", f"b {major}:{minor} rw"),
                   (f"{cg}/devices/devices.allow", "a"),
                   (f"{cg}/pids/pids.max", "max"),
                   (f"{cg}/memory/memory.limit_in_bytes", "-1")]
        if made.returncode == 0:
            targets.append((f"{cg}/devices/qvd-probe/devices.allow", "c 1:11 r"))
        for user in ("root", "bob"):
            for path, value in targets:
                found = self.run_as(user, WRITE, path, value)
                self.assertTrue(found.startswith("refused"), f"{user}: {path} <- {value}")
        listed = self.stack.attach(self.vm, "cat", f"{cg}/devices/devices.list").stdout
        self.assertNotIn("c 1:11 r", listed)
        self.assertNotIn("a *:* rwm", listed)
        self.assertEqual(self.stack.attach(self.vm, "cat", f"{cg}/pids/pids.max").stdout.strip(),
                         "2048")

    def test_4_pids_max(self):
        """
        The desktop's pids cgroup on the host has pids.max 2048
        (vm.lxc.pids.max); its tasks are in it.
        """
        name = self.stack.container(self.vm)
        directory = f"/sys/fs/cgroup/pids/lxc.payload.{name}"
        with open(f"{directory}/pids.max") as f:
            self.assertEqual(f.read().strip(), "2048")
        with open(f"/proc/{self.init_pid()}/cgroup") as f:
            self.assertIn(f"pids:/lxc.payload.{name}", f.read())

    def test_5_kernel_syscalls_refused(self):
        """
        Under the seccomp policy (Seccomp: 2 for root and bob) the keyring
        calls answer ENOSYS and bpf, perf, module, kexec, open_by_handle_at
        and userfaultfd EPERM, for root as for bob; getpid still works.
        """
        import json
        for user in ("root", "bob"):
            self.assertEqual(self.status_of(user)["Seccomp"].strip(), "2", user)
            errnos = json.loads(self.run_as(user, SYSCALLS))
            self.assertEqual(errnos.pop("getpid"), 0)
            for name in ("keyctl", "add_key", "request_key"):
                self.assertEqual(errnos.pop(name), 38, f"{user}: {name}")
            self.assertEqual(errnos, dict.fromkeys(errnos, 1), user)

    def test_6_capabilities_dropped(self):
        """
        The bounding set of the container's root lacks every capability of
        CAP_DROP (sys_module, sys_rawio, mknod, bpf, syslog, ...) and keeps
        sys_admin and net_admin (systemd and the network, inside its own
        namespaces only).
        """
        bounding = int(self.status_of("root")["CapBnd"], 16)
        for name in CAP_DROP:
            self.assertFalse(bounding & (1 << CAPS[name]), name)
        for name in ("sys_admin", "net_admin", "setuid", "chown"):
            self.assertTrue(bounding & (1 << CAPS[name]), name)
        self.assertEqual(int(self.status_of("bob")["CapEff"], 16), 0)

    def test_7_no_nested_user_namespace(self):
        """
        Neither bob nor root can make a user namespace of their own (so bob
        cannot mount file systems in one): unshare(CLONE_NEWUSER) fails.
        """
        for user in ("bob", "root"):
            self.assertTrue(self.run_as(user, UNSHARE).startswith("refused"), user)
        done = self.stack.attach_as(self.vm, "bob", "unshare", "-Urm", "mount", "-t", "tmpfs",
                                    "none", "/tmp")
        self.assertNotEqual(done.returncode, 0)

    def test_8_files_owned_by_mapped_ids(self):
        """
        The DI shows as root's inside (setuid bits kept: passwd works for
        bob), the home and the agent's secret belong to the mapped root on
        the host; the secret is readable by root inside, not by bob.
        """
        done = self.stack.attach(self.vm, "stat", "-c", "%u:%g %a", "/etc", "/usr/bin/passwd",
                                 "/etc/qvd/vma.secret")
        self.assertEqual(done.stdout.split("\n")[:3], ["0:0 755", "0:0 4755", "0:0 600"])
        status = self.stack.attach_as(self.vm, "bob", "passwd", "-S", "bob")
        self.assertEqual(status.returncode, 0, status.stderr)
        self.assertTrue(status.stdout.startswith("bob "), status.stdout)
        home = os.stat(os.path.join(self.stack.root, "storage", "homefs", f"{self.vm}-fs"))
        self.assertEqual((home.st_uid, home.st_gid), (BASE, BASE))
        secret = os.stat(os.path.join(self.stack.lxcpath, self.stack.container(self.vm),
                                      "vma.secret"))
        self.assertEqual((secret.st_uid, secret.st_gid, secret.st_mode & 0o777),
                         (BASE, BASE, 0o600))
        self.assertEqual(self.run_as("root", OPEN, "/etc/qvd/vma.secret"), "opened")
        self.assertEqual(self.run_as("bob", OPEN, "/etc/qvd/vma.secret"), "refused 13")
        bob = os.stat(os.path.join(self.stack.root, "storage", "homefs", f"{self.vm}-fs", "bob"))
        self.assertTrue(BASE + 1000 <= bob.st_uid < BASE + SIZE, bob.st_uid)

    def test_9_own_session_works(self):
        """
        The desktop is running (systemd up, the HKD's pings answered) and a
        new login of bob's shows his desktop through the L7R.
        """
        self.assertEqual(self.stack.vm_row(self.vm)["vm_state"], "running")
        running = self.stack.attach(self.vm, "systemctl", "is-system-running")
        self.assertEqual(running.stdout.strip(), "running", running.stderr)
        client = self.stack.client("bob", "bob-secret")
        self.addCleanup(client.stop)
        client.wait_for_colour()

    def test_z_nothing_left_behind(self):
        """The desktop stops cleanly; the stack leaves nothing behind."""
        self.stack.stop_vms()
        self.stack.stop()
        self.assertEqual(self.stack.leftovers(), [])
