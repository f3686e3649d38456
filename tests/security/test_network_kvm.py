"""
The attacks of tests/security/test_network.py from inside real KVM desktops
(libvirtd + QEMU, TCG here; the minimal KVM image with the real agent): bob
and carol's desktops boot through the HKD, both log in through the real L7R
with real clients, then bob attacks from his guest, as his desktop user and
as the guest's root (commands run through the QEMU guest agent). The node's
packet filter sees a KVM desktop as its tap on the bridge. One node and its
two guests are shared by the tests of the class, in order; the KVM agent
additionally takes only calls with its fw_cfg secret.
"""

import time

from qvd.testing import e2e
from tests.security import test_network


def _node():
    stack = e2e.Stack("vnet", subnet_base=229, hypervisor="kvm")
    began = time.monotonic()
    stack.start()
    stack.bob = stack.add_user("bob", "bob-secret")
    stack.carol = stack.add_user("carol", "carol-secret")
    booted = stack.start_vms(stack.bob, stack.carol)
    for login in ("bob", "carol"):
        stack.client(login, f"{login}-secret").wait_for_colour()
    print(f"\nKVM node: two TCG desktops running in {booted:.1f} s, both users "
          f"logged in {time.monotonic() - began:.1f} s after the start")
    return stack


NODE = e2e.SharedStack(_node, hypervisor="kvm")


class KVMNetworkIsolationTests(test_network.NetworkIsolationTests):
    """
    test_network's attacks, from a KVM desktop (bob's guest) to carol's guest
    and to the node; the node's own calls still work.
    """
    timeout = 900

    def setUp(self):
        self.stack = NODE.get()

    def test_5_ipv6_between_desktops_dropped(self):
        """
        Link-local IPv6 from bob's guest does not reach carol's, which has a
        link-local address (systemd-networkd makes one: the attack is real).
        """
        found = self.stack.attach(self.stack.carol, "ip", "-6", "-o", "address", "show",
                                  "dev", "eth0", "scope", "link")
        self.assertIn("inet6 fe80:", found.stdout, found.stderr)
        super().test_5_ipv6_between_desktops_dropped()

    def test_8_agent_needs_the_secret(self):
        """
        From bob's guest, as bob and as its root, his own agent refuses a
        call without the secret (403): the guest's root reads the secret
        from fw_cfg (the agent's file) and with it the call is answered;
        bob cannot read it.
        """
        from qvd.protocols.simplerpc import FW_CFG_SECRET_RAW
        call = ("import sys, urllib.request, urllib.error\n"
                "r = urllib.request.Request('http://127.0.0.1:3030/vma/ping',"
                " headers={'X-QVD-VMA-Secret': sys.argv[1]} if sys.argv[1] else {})\n"
                "try:\n"
                "    print(urllib.request.urlopen(r, timeout=5).status)\n"
                "except urllib.error.HTTPError as e:\n"
                "    print(e.code)\n")
        for user in ("bob", "root"):
            done = self.stack.python_as(self.stack.bob, user, "import sys; sys.argv[1:] = ['']\n" + call)
            self.assertEqual((done.returncode, done.stdout.strip()), (0, "403"), done.stderr)
        read = self.stack.attach_as(self.stack.bob, "bob", "cat", FW_CFG_SECRET_RAW)
        self.assertNotEqual(read.returncode, 0)
        self.assertIn("Permission denied", read.stderr)
        secret = self.stack.attach(self.stack.bob, "cat", FW_CFG_SECRET_RAW).stdout.strip()
        self.assertEqual(secret, self.stack.vm_row(self.stack.bob)["vma_secret"])
        done = self.stack.python_as(self.stack.bob, "root",
                                    "import sys; sys.argv[1:] = [%r]\n%s" % (secret, call))
        self.assertEqual(done.stdout.strip(), "200", done.stderr)

    def test_9_nothing_left_behind(self):
        """
        After the desktops stop, the node's table is gone and no secret file
        is left; the stack leaves nothing (no domain, tap or bridge).
        """
        import os
        self.stack.stop_vms()
        self.assertEqual(self.stack.nft_rules(), "")
        self.assertEqual(os.listdir(os.path.join(self.stack.root, "run", "kvm")), [])
        self.assertEqual(self.stack.domains(), [])
        self.stack.stop()
        self.assertEqual(self.stack.leftovers(), [])
