"""
Lost nodes fenced in seconds (issue 11, item 5), on real components: twistd
qvd-hkd with LXC desktops and the private PostgreSQL (qvd.testing.e2e.Stack),
the node's fencer process, and a second node (the fake-hypervisor HKD of
tests/integration/fake_hkd.tac) whose cluster monitor declares the first lost.

The tests run in order on one stack: alone first (no lease, no fencing), then
with another node alive in the database, with the shipped lease (hkd.lease.*
defaults: 10 s lease, fence 3 s before its end, lost 2 s after it, monitor
every 2 s), and print what they measure.
"""

import os
import signal
import subprocess
import sys
import time

from twisted.trial import unittest

from qvd.hkd.fencer import FencerLock
from qvd.testing import e2e

LEASE, FENCE_MARGIN, RELEASE_MARGIN, CHECK = 10.0, 3.0, 2.0, 2.0
TARGET = 15.0
FAKE_TAC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_hkd.tac")


def _build():
    stack = e2e.Stack("fence", subnet_base=231)
    stack.start()
    return stack


node = e2e.SharedStack(_build)
measured = {}


def say(text):
    print(f"\n    [fence] {text}", file=sys.stderr, flush=True)


class FenceTests(unittest.TestCase):

    def setUp(self):
        self.stack = node.get()
        self.fence_path = f"{self.stack.root}/run/hkd-fence"
        if not self._testMethodName.startswith("test_0"):
            self.add_peer()

    def add_peer(self):
        """
        Another node, alive as far as the database shows (its heartbeat is a
        day ahead; it holds no lease, so it is never declared lost and runs
        nothing): from now on this node holds a lease and is fenced.
        """
        if not self.stack.query("SELECT 1 FROM hosts WHERE name = 'peer'"):
            host = self.stack.query("INSERT INTO hosts (name, address) VALUES ('peer', %s)"
                                    " RETURNING id", (f"{self.stack.subnet}.3",))[0]["id"]
            self.stack.query("INSERT INTO host_runtimes (host_id, state, ok_ts) VALUES"
                             " (%s, 'running', now() + interval '1 day')", (host,))
        e2e.wait_until(lambda: self.lease_left() is not None and self.fencer_pid(), 10,
                       "the node holding a lease, guarded by its fencer")

    # -- helpers --

    def lxc_state(self, vm_id):
        done = subprocess.run(["lxc-info", "-s", "-p", "-n", self.stack.container(vm_id),
                               "-P", self.stack.lxcpath], capture_output=True, text=True)
        fields = dict(line.split(":", 1) for line in done.stdout.splitlines() if ":" in line)
        return fields.get("State", "").strip(), fields.get("PID", "").strip()

    def running(self, vm_id):
        return self.lxc_state(vm_id)[0] == "RUNNING"

    def lease_left(self, host=None):
        return self.stack.query(
            "SELECT extract(epoch FROM lease_expires - now())::float AS s FROM host_runtimes"
            " WHERE host_id = %s", (host or self.stack.host,))[0]["s"]

    def fencer_log(self):
        with open(self.fence_path + ".log") as f:
            return f.read()

    def fencer_pid(self):
        lock = FencerLock(self.fence_path)
        return lock.holder() if lock.held() else None

    def kill_hkd(self):
        self.stack.hkd.send_signal(signal.SIGKILL)
        self.stack.hkd.wait(10)

    def restart_hkd(self):
        self.stack.hkd = self.stack._twistd(self.stack.hkd_log, "qvd-hkd", "--config",
                                            self.stack.conf)
        pid = self.stack.hkd.pid
        e2e.wait_until(lambda: self.stack.node_state() == "running" and self.stack.query(
            "SELECT pid FROM host_runtimes WHERE host_id = %s", (self.stack.host,)
        )[0]["pid"] == pid, 30, "the restarted HKD running")

    def new_vm(self):
        return self.stack.add_user(f"fence{self.stack.next_name()}", "pw")

    def wait_stopped_container(self, vm_id, began, timeout):
        e2e.wait_until(lambda: not self.running(vm_id), timeout, f"VM {vm_id}'s container "
                       "stopped", poll=0.05)
        return time.monotonic() - began

    # -- the tests, in order --

    def test_0_alone_not_fenced(self):
        """
        A node alone (no other node could start its VMs) holds no lease and
        runs no fencer: its HKD killed for longer than a lease leaves the
        desktop running, the restarted HKD adopts it, and nobody declares
        the node lost.
        """
        vm = self.new_vm()
        self.stack.start_vms(vm)
        state, pid = self.lxc_state(vm)
        e2e.wait_until(lambda: self.lease_left() is None, 10, "no lease")
        self.assertIsNone(self.fencer_pid())
        self.kill_hkd()
        time.sleep(LEASE + RELEASE_MARGIN + CHECK)
        self.assertEqual(self.lxc_state(vm), ("RUNNING", pid), "the desktop kept running")
        self.assertEqual(self.stack.query("SELECT state FROM host_runtimes WHERE host_id = %s",
                                          (self.stack.host,))[0]["state"], "running",
                         "not declared lost")
        self.restart_hkd()
        self.assertEqual(self.lxc_state(vm), ("RUNNING", pid), "adopted, not restarted")
        self.assertEqual(self.stack.vm_row(vm)["vm_state"], "running")
        self.stack.command(vm, "stop")
        e2e.wait_until(lambda: self.stack.vm_row(vm)["vm_state"] == "stopped", 60,
                       "the VM stopped")

    def test_1_restart_within_lease_adopts(self):
        """
        An HKD killed (SIGKILL) and restarted within the lease adopts its
        running desktop: the same container process, no new start, and the
        fencer (the same process) did not stop anything.
        """
        vm = self.new_vm()
        self.stack.start_vms(vm)
        state, pid = self.lxc_state(vm)
        fencer = self.fencer_pid()
        self.assertIsNotNone(fencer, "a fencer guards the node")
        attempts = self.stack.query("SELECT run_attempts FROM vm_counters WHERE vm_id = %s",
                                    (vm,))[0]["run_attempts"]
        began = time.monotonic()
        self.kill_hkd()
        self.restart_hkd()
        took = time.monotonic() - began
        say(f"HKD killed and restarted in {took:.1f} s; desktop adopted")
        self.assertEqual(self.lxc_state(vm), ("RUNNING", pid), "the container was not touched")
        self.assertEqual(self.stack.vm_row(vm)["vm_state"], "running")
        self.assertEqual(self.stack.query("SELECT run_attempts FROM vm_counters WHERE vm_id = %s",
                                          (vm,))[0]["run_attempts"], attempts)
        time.sleep(LEASE)  # past the old lease: the restarted HKD feeds the same fencer
        self.assertEqual(self.lxc_state(vm), ("RUNNING", pid))
        self.assertEqual(self.fencer_pid(), fencer, "the restarted HKD took the fencer over")
        self.assertNotIn("stopping this node's desktops", self.fencer_log())
        self.__class__.vm = vm

    def test_2_killed_hkd_fenced_before_lease_ends(self):
        """
        With its HKD killed for good, the fencer stops the node's desktop
        before the lease runs out (lease - margin after the last renewal);
        an HKD started later reaps the VM to stopped.
        """
        vm = self.__class__.vm
        self.assertTrue(self.running(vm))
        left = self.lease_left()
        began = time.monotonic()
        self.kill_hkd()
        took = self.wait_stopped_container(vm, began, LEASE + 5)
        measured["hkd_killed_to_desktop_stopped"] = took
        say(f"HKD killed -> desktop stopped by the fencer in {took:.2f} s (lease left at the "
            f"kill {left:.2f} s)")
        self.assertLess(took, left, "stopped before the lease ran out")
        self.assertGreater(took, left - FENCE_MARGIN - 1.0, "not long before its time either")
        self.assertIn("stopping this node's desktops", self.fencer_log())
        e2e.wait_until(lambda: self.fencer_pid() is None, 10, "the fencer exited")
        self.restart_hkd()
        e2e.wait_until(lambda: self.stack.vm_row(vm)["vm_state"] == "stopped", 60,
                       "the fenced VM reaped")
        self.assertIsNone(self.stack.vm_row(vm)["host_id"])
        self.assertIsNotNone(self.fencer_pid(), "the restarted HKD runs a new fencer")

    def test_3_database_lost_fenced_then_rejoins(self):
        """
        A node that loses the database (its HKD's role can no longer connect)
        stops its desktop before its lease ends; once the database is back
        it renews its lease, marks the VM stopped and starts it again on
        command.
        """
        vm = self.__class__.vm
        self.stack.start_vms(vm)
        db = self.stack.dbname
        left = self.lease_left()
        began = time.monotonic()
        self.stack.query(f'REVOKE CONNECT ON DATABASE "{db}" FROM PUBLIC, qvd_hkd')
        self.stack.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                         " WHERE datname = %s AND usename = 'qvd_hkd'", (db,))
        try:
            took = self.wait_stopped_container(vm, began, LEASE + 5)
            measured["database_lost_to_desktop_stopped"] = took
            say(f"database lost -> desktop stopped in {took:.2f} s (lease left {left:.2f} s)")
            self.assertLess(took, left)
        finally:
            self.stack.query(f'GRANT CONNECT ON DATABASE "{db}" TO PUBLIC')
        self.assertEqual(self.stack.hkd.poll(), None, "the HKD kept running")
        e2e.wait_until(lambda: (self.lease_left() or 0) > LEASE - 3, 30, "the lease renewed")
        e2e.wait_until(lambda: self.stack.vm_row(vm)["vm_state"] == "stopped", 60,
                       "the fenced VM stopped in the database")
        self.assertEqual(self.stack.node_state(), "running")
        self.stack.start_vms(vm)
        self.assertTrue(self.running(vm))

    def test_4_other_node_declares_lost(self):
        """
        A second node's cluster monitor declares a vanished node lost after
        its lease and margin, and its VM becomes startable: a start command
        runs it on the second node. The order: the node stops its desktop,
        then it is declared lost, then the VM starts elsewhere.
        """
        stack = self.stack
        vm = self.__class__.vm
        self.assertTrue(self.running(vm))
        other = stack.query("INSERT INTO hosts (name, address) VALUES ('node2', %s)"
                            " RETURNING id", (f"{stack.subnet}.2",))[0]["id"]
        run2 = f"{stack.root}/run2"
        conf2 = f"{stack.root}/node2.conf"
        with open(stack.conf) as f, open(conf2, "w") as out:
            out.write(f.read())
            out.write(f"nodename = node2\npath.run = {run2}\nhkd.lock.path = {run2}/hkd.lock\n")
        env = dict(e2e.env(), QVD_HKD_ARGS=f"--config {conf2}")
        log2 = f"{stack.root}/hkd2.log"
        hkd2 = subprocess.Popen([e2e.TWISTD, "-n", "--pidfile=", "-l", log2, "-y", FAKE_TAC],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        stack.processes.append(hkd2)
        try:
            e2e.wait_until(lambda: [r["state"] for r in stack.query(
                "SELECT state FROM host_runtimes WHERE host_id = %s", (other,))] == ["running"],
                30, "node2 running")
            time.sleep(1)
            began = time.monotonic()
            self.kill_hkd()
            fenced = lost = startable = None
            while time.monotonic() - began < 40 and startable is None:
                now = time.monotonic() - began
                if fenced is None and not self.running(vm):
                    fenced = now
                state = stack.query("SELECT state FROM host_runtimes WHERE host_id = %s",
                                    (stack.host,))[0]["state"]
                if lost is None and state == "lost":
                    lost = now
                row = stack.vm_row(vm)
                if row["vm_state"] == "stopped" and row["host_id"] is None:
                    startable = now
                time.sleep(0.05)
            self.assertIsNotNone(startable, "the VM became startable:\n"
                                 + stack.log_tail(log2))
            measured["node_vanished_to_vm_startable"] = startable
            say(f"node vanished -> desktop stopped {fenced:.2f} s, node lost {lost:.2f} s, "
                f"VM startable elsewhere {startable:.2f} s (target {TARGET:g} s)")
            self.assertIsNotNone(fenced)
            self.assertLess(fenced, lost, "the node stopped its desktop before it was lost")
            self.assertLessEqual(startable, TARGET)
            self.assertIn("released: node", stack.vm_row(vm)["vm_state_reason"])
            stack.query("UPDATE vm_runtimes SET host_id = %s, vm_cmd = 'start' WHERE vm_id = %s",
                        (other, vm))
            stack.query(f"NOTIFY qvd_cmd_for_vm_on_host{int(other)}")
            e2e.wait_until(lambda: stack.vm_row(vm)["vm_state"] == "running", 30,
                           "the VM running on node2")
            started = time.monotonic() - began
            say(f"VM running on node2 {started:.2f} s after node1 vanished")
            self.assertFalse(self.running(vm), "never on two nodes")

            # node1 comes back after it was declared lost: it does not adopt or
            # touch the VM node2 runs, and rejoins.
            self.restart_hkd()
            self.assertEqual((stack.vm_row(vm)["vm_state"], stack.vm_row(vm)["host_id"]),
                             ("running", other))
            self.assertFalse(self.running(vm))
            stack.query("UPDATE vm_runtimes SET vm_cmd = 'stop' WHERE vm_id = %s", (vm,))
            stack.query(f"NOTIFY qvd_cmd_for_vm_on_host{int(other)}")
            e2e.wait_until(lambda: stack.vm_row(vm)["vm_state"] == "stopped", 30,
                           "the VM stopped on node2")
        finally:
            if hkd2.poll() is None:
                hkd2.terminate()
                hkd2.wait(30)
        fencer2 = FencerLock(f"{run2}/hkd-fence")
        e2e.wait_until(lambda: not fencer2.held(), 10, "node2's fencer released")

    def test_9_nothing_left_behind(self):
        """Stopping the stack leaves no container, mount, interface or process (fencer too)."""
        fencer = self.fencer_pid()
        self.stack.stop()
        self.assertEqual(self.stack.leftovers(), [])
        if fencer is not None:
            e2e.wait_until(lambda: not os.path.exists(f"/proc/{fencer}"), 10,
                           "the fencer exited")
        if measured:
            say("measured: " + ", ".join(f"{k} {v:.2f} s" for k, v in measured.items()))
