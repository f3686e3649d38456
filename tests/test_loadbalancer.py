"""
Tests for qvd.loadbalancer: the pure host choice of reference 2.2.
"""

from twisted.trial import unittest

from qvd import loadbalancer as lb
from qvd.config import Config, declared_keys


def host(host_id, name, state="running", blocked=False, hypervisor="lxc", ram=0.0, cpu=0.0,
         vms=0):
    return lb.HostLoad(host_id, name, state, blocked, hypervisor, ram, cpu, vms)


class DIHypervisorTests(unittest.TestCase):

    def test_kinds(self):
        """
        Tarballs are LXC DIs and disk files KVM DIs, whatever the case.
        """
        for name in ("a.tar", "a.tar.gz", "a.TGZ", "a.tar.xz", "a.tar.bz2", "a.tar.zst"):
            self.assertEqual(lb.di_hypervisor(name), "lxc", name)
        for name in ("a.qcow2", "a.img", "a.raw"):
            self.assertEqual(lb.di_hypervisor(name), "kvm", name)

    def test_unknown(self):
        """
        Another extension is refused with a message naming the file and the
        extensions that work.
        """
        e = self.assertRaises(lb.UnknownImageKind, lb.di_hypervisor, "disk.iso")
        self.assertIn("'disk.iso'", str(e))
        self.assertIn(".qcow2", str(e))


class ChooseHostTests(unittest.TestCase):

    def test_highest_score_wins(self):
        """
        The host with the most RAM and CPU per (VM + 1) wins.
        """
        hosts = [host(1, "small", ram=1000, cpu=1000), host(2, "big", ram=4000, cpu=4000),
                 host(3, "busy", ram=8000, cpu=8000, vms=3)]
        chosen = lb.choose_host("v", "lxc", hosts, lb.Weights(1, 1, 0), random=lambda: 0.5)
        self.assertEqual(chosen.name, "big")

    def test_random_part(self):
        """
        The random draw, scaled by its weight, decides between equal hosts.
        """
        hosts = [host(1, "a", ram=100), host(2, "b", ram=100)]
        draws = iter([0.1, 0.9])
        chosen = lb.choose_host("v", "lxc", hosts, lb.Weights(1, 1, 10), random=lambda: next(draws))
        self.assertEqual(chosen.name, "b")
        draws = iter([0.9, 0.1])
        chosen = lb.choose_host("v", "lxc", hosts, lb.Weights(1, 1, 10), random=lambda: next(draws))
        self.assertEqual(chosen.name, "a")

    def test_score(self):
        """
        score = (w_ram*ram + w_cpu*cpu) / (vms + 1) + w_random*draw.
        """
        self.assertEqual(lb.score(host(1, "a", ram=300, cpu=600, vms=2), lb.Weights(2, 1, 4), 0.5),
                         (600 + 600) / 3 + 2)

    def test_exclusions(self):
        """
        Blocked hosts, hosts not running and hosts of another hypervisor are
        never chosen, and the error says why each was left out.
        """
        hosts = [host(1, "n1", blocked=True, ram=9e9), host(2, "n2", state="lost", ram=9e9),
                 host(3, "n3", hypervisor="kvm", ram=9e9), host(4, "n4", hypervisor=None)]
        e = self.assertRaises(lb.NoHostAvailable, lb.choose_host, "desk", "lxc", hosts)
        self.assertEqual(str(e), "no running node can run VM 'desk' (lxc): n1 (blocked); "
                         "n2 (lost); n3 (runs kvm, not lxc); n4 (runs no hypervisor, not lxc)")
        hosts.append(host(5, "n5"))
        self.assertEqual(lb.choose_host("desk", "lxc", hosts).name, "n5")

    def test_no_hosts(self):
        """
        With no backend host at all the error says to add one.
        """
        e = self.assertRaises(lb.NoHostAvailable, lb.choose_host, "desk", "kvm", [])
        self.assertIn("qvd-admin host add", str(e))

    def test_interface(self):
        """
        DefaultLoadBalancer provides ILoadBalancer and chooses like choose_host.
        """
        from zope.interface.verify import verifyObject
        balancer = lb.DefaultLoadBalancer(lb.Weights(1, 1, 0), random=lambda: 0.0)
        self.assertTrue(verifyObject(lb.ILoadBalancer, balancer))
        hosts = [host(1, "a", ram=1), host(2, "b", ram=2)]
        self.assertEqual(balancer.choose("v", "lxc", hosts).name, "b")
        self.assertEqual(lb.HostLoad(*(2, "b", "running", False, "lxc", 2.0, 0.0, 0)), hosts[1])

    def test_weights_from_config(self):
        """
        The weights come from l7r.loadbalancer.plugin.default.weight.*, 1/1/1 by default.
        """
        config = Config(keys=declared_keys())
        self.assertEqual(lb.weights_from_config(config), lb.Weights(1.0, 1.0, 1.0))
        config = config.with_database({"l7r.loadbalancer.plugin.default.weight.random": "100"})
        self.assertEqual(lb.weights_from_config(config).random, 100.0)
