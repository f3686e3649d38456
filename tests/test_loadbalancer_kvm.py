"""
A cluster that mixes LXC and KVM nodes: VMs are only placed on nodes whose
hypervisor (host_runtimes.hypervisor, written by each HKD from its driver's
name) runs their OSF's DI (a tarball: lxc; a qcow2/img/raw disk: kvm).
Real PostgreSQL, the load balancer's own SQL.
"""

import psycopg2.extras
from twisted.trial import unittest

from qvd import loadbalancer as lb
from qvd.db import sync
from qvd.runtime import store
from qvd.testing.pg import DatabaseTestMixin


class MixedClusterTests(DatabaseTestMixin, unittest.TestCase):

    def setUp(self):
        super().setUp()
        self.hosts = {}
        # the LXC node looks far better: only the hypervisor may keep KVM VMs off it
        for n, (name, hv, ram) in enumerate((("lxc-node", "lxc", 64000), ("kvm-node", "kvm", 1000)), 1):
            host = self.query("INSERT INTO hosts (name, address) VALUES (%s, %s) RETURNING id",
                              (name, f"10.77.0.{n}"))[0]["id"]
            self.query("INSERT INTO host_runtimes (host_id, state, hypervisor, usable_ram, usable_cpu)"
                       " VALUES (%s, 'running', %s, %s, %s)", (host, hv, ram, ram))
            self.hosts[name] = host
        user = self.query("INSERT INTO users (tenant_id, login) VALUES (1, 'ana') RETURNING id")[0]["id"]
        self.vms = {}
        for n, (osf_name, path) in enumerate((("kvm-desk", "3-desk.qcow2"), ("lxc-desk", "4-desk.tar"),
                                               ("raw-desk", "5-desk.img")), 1):
            osf = self.query("INSERT INTO osfs (tenant_id, name) VALUES (1, %s) RETURNING id",
                             (osf_name,))[0]["id"]
            di = self.query("INSERT INTO dis (osf_id, path, version) VALUES (%s, %s, '1') RETURNING id",
                            (osf, path))[0]["id"]
            self.query("INSERT INTO di_tags (di_id, osf_id, tag) VALUES (%s, %s, 'default')", (di, osf))
            vm = self.query("INSERT INTO vms (name, user_id, osf_id, ip, mac, di_tag) VALUES"
                            " (%s, %s, %s, %s, %s, 'default') RETURNING id",
                            (osf_name, user, osf, f"10.78.0.{n}", f"54:52:00:00:00:{n:02x}"))[0]["id"]
            self.query("INSERT INTO vm_runtimes (vm_id) VALUES (%s)", (vm,))
            self.vms[osf_name] = vm

    def select(self, name, draw=0.5):
        with sync.connect(self.dsn) as conn:
            with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
                return store.run_blocking(store.place_in(
                    store.BlockingCursor(cur), self.vms[name], name, lb.Weights(1, 1, 1000),
                    lambda: draw))

    def test_kvmVMsOnKVMNodes(self):
        """
        A VM whose DI is a qcow2 (or .img) disk goes to the KVM node, never to
        the LXC node, whatever the scores and random draws say.
        """
        for name in ("kvm-desk", "raw-desk"):
            for draw in (0.0, 0.3, 0.99):
                self.assertEqual(self.select(name, draw).name, "kvm-node", (name, draw))

    def test_lxcVMsOnLXCNodes(self):
        """
        A VM whose DI is a tarball goes to the LXC node.
        """
        for draw in (0.0, 0.99):
            self.assertEqual(self.select("lxc-desk", draw).name, "lxc-node")

    def test_noMatchingNode(self):
        """
        With the KVM node stopped, a KVM VM is not placed at all (not on the
        running LXC node), and the error says why each node was left out.
        """
        self.query("UPDATE host_runtimes SET state = 'stopped' WHERE host_id = %s",
                   (self.hosts["kvm-node"],))
        e = self.assertRaises(lb.NoHostAvailable, self.select, "kvm-desk")
        self.assertIn("lxc-node (runs lxc, not kvm)", str(e))
        self.assertIn("kvm-node (stopped)", str(e))
