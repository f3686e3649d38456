"""
The node's packet filter (qvd/virt/firewall.py): the ruleset as text, the
adapter with a fake nft, and the ruleset accepted by the real nft.
"""

import os
import subprocess

from twisted.internet import defer
from twisted.trial import unittest

from qvd.config import Config, declared_keys
from qvd.virt._process import ProcessResult
from qvd.virt.firewall import (
    FirewallSettings, NodeFirewall, VMPort, parse_services, ruleset)
from qvd.virt.interfaces import VirtError

BOB = VMPort(5, "qvd5", "10.9.0.105", "54:52:00:09:00:05")
CAROL = VMPort(6, "qvd6", "10.9.0.106", "54:52:00:09:00:06")
SETTINGS = FirewallSettings(table="qvdt", node_addresses=("10.9.0.1",),
                            node_allow=(("udp", 67),))


class RulesetTests(unittest.TestCase):

    def test_no_desktops_deletes_the_table(self):
        """Without desktops the script only removes the table (and works when it is missing)."""
        self.assertEqual(ruleset(SETTINGS, []),
                         "table bridge qvdt {}\ndelete table bridge qvdt\n")

    def test_desktop_rules(self):
        """
        Each desktop's port is bound to its MAC and IP, IPv6 dropped; ports
        never reach each other; only node addresses open the agent and NX
        ports; the node answers only replies and the allow-list.
        """
        text = ruleset(SETTINGS, [CAROL, BOB])
        self.assertTrue(text.startswith("table bridge qvdt {}\ndelete table bridge qvdt\n"))
        for line in ("ether saddr != 54:52:00:09:00:05 drop",
                     "ether type arp arp saddr ip != 10.9.0.105 drop",
                     "ether type ip ip saddr != 10.9.0.105 drop",
                     "ether type != { ip, arp } drop",
                     'iifname "qvd5" jump vm5',
                     'iifname { "qvd5", "qvd6" } drop',
                     'oifname { "qvd5", "qvd6" } jump to_desktop',
                     'iifname { "qvd5", "qvd6" } jump to_node',
                     "ip saddr @nodes tcp dport { 3030, 4100 } accept",
                     "tcp sport { 3030, 4100 } tcp flags & (syn | ack) != syn accept",
                     "udp dport 67 accept",
                     "elements = { 10.9.0.1 }"):
            self.assertIn(line, text)
        self.assertLess(text.index("chain vm5"), text.index("chain vm6"))

    def test_bad_values_refused(self):
        """Bad names, addresses, MACs and services are refused naming the value."""
        for args in ((5, "bad name", "10.0.0.1", BOB.mac), (5, "qvd5", "10.0.0", BOB.mac),
                     (5, "qvd5", "10.0.0.1", "54:52")):
            self.assertRaises(VirtError, VMPort, *args)
        self.assertRaises(VirtError, FirewallSettings, table="qvd; flush ruleset")
        e = self.assertRaises(VirtError, parse_services, "udp/67, icmp/1")
        self.assertIn("icmp/1", str(e))
        self.assertEqual(parse_services(" udp/67,tcp/53 "), (("udp", 67), ("tcp", 53)))

    def test_from_config(self):
        """The keys give the table, the allow-list and extra node addresses."""
        config = Config(keys=declared_keys(), node={
            "vm.network.firewall.table": "t1", "vm.network.firewall.node_allow": "udp/53",
            "vm.network.firewall.allow_from": "192.0.2.9, 10.9.0.1"})
        s = FirewallSettings.from_config(config, ["10.9.0.1"])
        self.assertEqual((s.table, s.node_allow, s.node_addresses, s.desktop_ports),
                         ("t1", (("udp", 53),), ("10.9.0.1", "192.0.2.9"), (3030, 4100)))


class FakeNft:
    def __init__(self):
        self.scripts = []
        self.code = 0

    def __call__(self, argv, stdin):
        self.scripts.append(stdin.decode())
        return defer.succeed(ProcessResult(tuple(argv), self.code, "", "syntax error"))


class SlowNft(FakeNft):
    """An nft whose runs end when the test says so."""

    def __init__(self):
        super().__init__()
        self.waiting = []

    def __call__(self, argv, stdin):
        self.scripts.append(stdin.decode())
        d = defer.Deferred()
        self.waiting.append((d, argv))
        return d

    def finish_all(self):
        while self.waiting:
            d, argv = self.waiting.pop(0)
            d.callback(ProcessResult(tuple(argv), 0, "", ""))


class NodeFirewallTests(unittest.TestCase):

    def test_changes(self):
        """allow, forget and keep_only each replace the whole table in one nft run."""
        nft = FakeNft()
        fw = NodeFirewall(SETTINGS, None, run=nft)
        fw.allow(BOB)
        fw.allow(CAROL)
        fw.keep_only({6})
        fw.forget(6)
        self.assertEqual(nft.scripts, [ruleset(SETTINGS, [BOB]), ruleset(SETTINGS, [BOB, CAROL]),
                                       ruleset(SETTINGS, [CAROL]), ruleset(SETTINGS, [])])
        self.assertEqual(fw.ports, {})

    def test_refused_change_not_kept(self):
        """A script nft refuses fails with VirtError and the desktop is not counted in."""
        nft = FakeNft()
        nft.code = 1
        fw = NodeFirewall(SETTINGS, None, run=nft)
        f = self.failureResultOf(fw.allow(BOB), VirtError)
        self.assertIn("syntax error", str(f.value))
        self.assertEqual(fw.ports, {})

    def test_node_addresses_follow_the_cluster(self):
        """
        New node addresses replace the table's set at once; the same ones run
        nothing; a change nft refuses keeps the old ones.
        """
        nft = FakeNft()
        fw = NodeFirewall(SETTINGS, None, run=nft)
        fw.allow(BOB)
        self.successResultOf(fw.set_node_addresses(["10.9.0.1", "10.8.0.2", "10.9.0.1"]))
        wider = FirewallSettings(table="qvdt", node_addresses=("10.9.0.1", "10.8.0.2"),
                                 node_allow=(("udp", 67),))
        self.assertEqual(nft.scripts, [ruleset(SETTINGS, [BOB]), ruleset(wider, [BOB])])
        self.successResultOf(fw.set_node_addresses(("10.9.0.1", "10.8.0.2")))
        self.assertEqual(len(nft.scripts), 2)
        nft.code = 1
        self.failureResultOf(fw.set_node_addresses(["10.9.0.1"]), VirtError)
        self.assertEqual(fw.settings, wider)

    def test_changes_in_flight(self):
        """
        Changes made while nft still runs are all kept: two desktops
        stopping at once leave neither (each run renders every change before it).
        """
        nft = SlowNft()
        fw = NodeFirewall(SETTINGS, None, run=nft)
        fw.allow(BOB)
        fw.allow(CAROL)
        nft.finish_all()
        fw.forget(5)
        fw.forget(6)
        nft.finish_all()
        self.assertEqual(nft.scripts[-1], ruleset(SETTINGS, []))
        self.assertEqual(fw.ports, {})

    def test_changes_coalesced(self):
        """
        Desktops starting while nft runs cost one more run in all, not one each:
        the run after the first renders them all, and the changes it rendered
        run nothing more (their Deferreds fire once it is done).
        """
        nft = SlowNft()
        fw = NodeFirewall(SETTINGS, None, run=nft)
        first = fw.allow(BOB)
        dave = VMPort(7, "qvd7", "10.9.0.107", "54:52:00:09:00:07")
        later = [fw.allow(CAROL), fw.allow(dave)]
        self.assertEqual(len(nft.scripts), 1)
        for d in [first] + later:
            self.assertNoResult(d)
        nft.finish_all()            # the first run, then the one for the others
        for d in [first] + later:
            self.successResultOf(d)
        self.assertEqual(len(nft.scripts), 2)
        self.assertEqual(sorted(fw.ports), [5, 6, 7])
        self.assertEqual(nft.scripts[-1], ruleset(SETTINGS, fw.ports.values()))

    def test_disabled(self):
        """With the firewall off nothing is run."""
        nft = FakeNft()
        fw = NodeFirewall(FirewallSettings(enabled=False), None, run=nft)
        self.successResultOf(fw.allow(BOB))
        self.assertEqual(nft.scripts, [])


class RealNftTests(unittest.TestCase):
    def test_kernel_takes_the_ruleset(self):
        """The real nft loads the ruleset into the kernel and removes it again."""
        table = f"qvdt_unit{os.getpid()}"
        settings = FirewallSettings(table=table, node_addresses=("10.9.0.1",),
                                    node_allow=(("udp", 67),), dhcp=True)
        for ports in ([BOB, CAROL], []):
            done = subprocess.run(["nft", "-f", "-"], input=ruleset(settings, ports),
                                  capture_output=True, text=True)
            self.assertEqual(done.returncode, 0, done.stderr)
        listed = subprocess.run(["nft", "list", "table", "bridge", table], capture_output=True)
        self.assertNotEqual(listed.returncode, 0)
