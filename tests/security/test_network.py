"""
Desktops isolated from each other and from the node by the node's packet
filter (qvd/virt/firewall.py), tried from inside real LXC desktops: bob and
carol log in through the real L7R with real clients, then bob attacks, as
his desktop user and as his container's root. One node is shared by the
tests of the class, in order (as tests/integration/test_e2e.py).
"""

import os
import socket
import subprocess
import threading
import time

from twisted.trial import unittest

from qvd.testing import e2e


PING6 = """
import socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
s.settimeout(0.5)
s.sendto(bytes([128, 0, 0, 0, 0x51, 0x76, 0, 1]) + b"qvd", (sys.argv[1], 0, 0, socket.if_nametoindex("eth0")))
deadline = time.monotonic() + 3
while time.monotonic() < deadline:
    try:
        data, peer = s.recvfrom(1500)
    except socket.timeout:
        continue
    if data[0] == 129 and data[4:6] == bytes([0x51, 0x76]):
        print("answered")
        break
else:
    print("silent")
"""

CONNECT = """
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket()
s.settimeout(2)
if len(sys.argv) > 3:
    s.bind((sys.argv[3], 0))
try:
    s.connect((host, port))
except OSError as e:
    print("refused", type(e).__name__)
else:
    print("connected")
"""


def _node():
    stack = e2e.Stack("net", subnet_base=219)
    stack.start()
    stack.bob = stack.add_user("bob", "bob-secret")
    stack.carol = stack.add_user("carol", "carol-secret")
    for login in ("bob", "carol"):
        stack.client(login, f"{login}-secret").wait_for_colour()
    return stack


NODE = e2e.SharedStack(_node)


class NodeListener:
    """A TCP service of the node bound to 0.0.0.0 (what a desktop must not reach)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self):
        self.sock.close()


class NetworkIsolationTests(unittest.TestCase):
    timeout = 400

    def setUp(self):
        self.stack = NODE.get()

    def ip(self, vm_id):
        return self.stack.vm_row(vm_id)["vm_address"]

    def connect(self, user, vm_id, host, port, source=None):
        code = self.stack.python_as(vm_id, user, "import sys; sys.argv[1:] = %r\n%s" % (
            [host, str(port)] + ([source] if source else []), CONNECT))
        self.assertEqual(code.returncode, 0, code.stderr)
        return code.stdout.strip()

    def test_1_rules_installed(self):
        """Both running desktops have their port in the node's table."""
        rules = self.stack.nft_rules()
        for vm in (self.stack.bob, self.stack.carol):
            self.assertIn(f'iifname "{self.stack.veth}{vm}" jump vm{vm}', rules)

    def test_2_no_desktop_reaches_another(self):
        """
        From bob's desktop, as bob and as its root, no port of carol's desktop
        answers: not her agent (3030), nxagent (4100), X (6100) nor ssh.
        """
        carol = self.ip(self.stack.carol)
        for user in ("bob", "root"):
            for port in (3030, 4100, 6100, 22):
                self.assertTrue(
                    self.connect(user, self.stack.bob, carol, port).startswith("refused"),
                    f"{user} reached carol's port {port}")

    def test_3_no_node_service(self):
        """
        A service of the node bound to 0.0.0.0 is not reachable from a desktop
        at the node's bridge address, as the user or as root; the node itself
        reaches it (the listener works).
        """
        listener = NodeListener()
        self.addCleanup(listener.close)
        node = f"{self.stack.subnet}.1"
        for user in ("bob", "root"):
            self.assertTrue(self.connect(user, self.stack.bob, node, listener.port)
                            .startswith("refused"))
        self.assertEqual(listener.accepted, 0)
        socket.create_connection((node, listener.port), timeout=2).close()

    def test_4_spoofing_gains_nothing(self):
        """
        bob's container root taking carol's address (ip addr add) and sending
        from it reaches neither carol nor the node: frames from his port must
        carry his own MAC and IP.
        """
        carol = self.ip(self.stack.carol)
        added = self.stack.attach(self.stack.bob, "ip", "address", "add",
                                  f"{carol}/32", "dev", "eth0")
        self.assertEqual(added.returncode, 0, added.stderr)
        self.addCleanup(self.stack.attach, self.stack.bob, "ip", "address", "del",
                        f"{carol}/32", "dev", "eth0")
        node = f"{self.stack.subnet}.1"
        self.assertTrue(self.connect("root", self.stack.bob, node, 3030, source=carol)
                        .startswith("refused"))
        self.assertTrue(self.connect("root", self.stack.bob, node, 8443, source=carol)
                        .startswith("refused"))

    def test_5_ipv6_between_desktops_dropped(self):
        """Link-local IPv6 from bob's desktop does not reach carol's."""
        found = self.stack.attach(self.stack.carol, "ip", "-6", "-o", "address", "show",
                                  "dev", "eth0", "scope", "link")
        if "inet6" not in found.stdout:
            self.assertEqual(found.returncode, 0, found.stderr)
            return  # no IPv6 in the desktops at all: nothing to reach
        carol6 = found.stdout.split("inet6", 1)[1].split()[0].split("/")[0]
        done = self.stack.python_as(self.stack.bob, "root",
                                    "import sys; sys.argv[1:] = [%r]\n%s" % (carol6, PING6))
        self.assertEqual((done.returncode, done.stdout.strip()), (0, "silent"), done.stderr)

    def test_6_legitimate_paths_work(self):
        """
        The node's own paths still work: both VMs stay running (the HKD's
        pings answer) and a new login of bob's shows his desktop through the
        L7R's relay.
        """
        for vm in (self.stack.bob, self.stack.carol):
            self.assertEqual(self.stack.vm_row(vm)["vm_state"], "running")
        client = self.stack.client("bob", "bob-secret")
        self.addCleanup(client.stop)
        client.wait_for_colour()

    def test_7_joining_node_admitted(self):
        """
        A node added to the cluster (a hosts row) is admitted to the desktops'
        agent and NX ports within seconds, without an HKD restart, and no
        longer once it is removed.
        """
        address = f"10.254.{os.getpid() % 250}.7"

        def admitted():
            rules = self.stack.nft_rules()
            return address in rules.split("set nodes", 1)[1].split("}", 1)[0]

        def wait_for(expected):
            deadline = time.monotonic() + 10
            while admitted() != expected:
                self.assertLess(time.monotonic(), deadline,
                                f"{address} admitted is not {expected} after 10 s")
                time.sleep(0.2)
        self.assertFalse(admitted())
        self.stack.query("INSERT INTO hosts (name, address) VALUES (%s, %s)",
                         (f"joiner{os.getpid()}", address))
        removed = []

        def remove():
            if not removed:
                self.stack.query("DELETE FROM hosts WHERE address = %s", (address,))
                removed.append(True)
        self.addCleanup(remove)
        wait_for(True)
        remove()
        wait_for(False)

    def test_9_nothing_left_behind(self):
        """After the desktops stop, the node's table is gone; the stack leaves nothing."""
        self.stack.stop_vms()
        self.assertEqual(self.stack.nft_rules(), "")
        self.stack.stop()
        self.assertEqual(self.stack.leftovers(), [])
