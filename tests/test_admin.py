"""
Tests for qvd-admin against the real PostgreSQL (qvd.testing.pg): every
command is run in-process through C{main(argv)} and the database is checked
afterwards.
"""

import io
import json
import os
import select
import shutil
import tempfile
import threading
import time

import psycopg2
from twisted.trial import unittest

from qvd.admin.cli import main
from qvd.db import sync
from qvd.testing import pg

#: Tables whose content a refused command must leave alone.
TABLES = ("tenants", "administrators", "users", "osfs", "dis", "di_tags", "vms",
          "vm_runtimes", "vm_counters", "hosts", "host_runtimes", "configs", "ssl_configs",
          "properties_list", "vm_properties", "log")


class AdminTestCase(pg.DatabaseTestMixin, unittest.TestCase):
    """
    Gives each test a node file pointing at its database and C{self.admin}.
    """

    def setUp(self):
        super().setUp()
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.storage = os.path.join(self.dir, "storage")
        self.images = os.path.join(self.storage, "images")
        self.config = os.path.join(self.dir, "node.conf")
        with open(self.config, "w") as f:
            f.write(f"database.host = {pg.cluster().socketdir}\n"
                    f"database.name = {self.dbname}\n"
                    f"path.storage.root = {self.storage}\n"
                    f"path.storage.local = {self.storage}/local\n")

    def admin(self, *argv, random=None):
        """
        Run qvd-admin; return (exit status, stdout, stderr).
        """
        out, err = io.StringIO(), io.StringIO()
        status = main(["--config", self.config] + list(argv), stdout=out, stderr=err,
                      random=random)
        return status, out.getvalue(), err.getvalue()

    def ok(self, *argv, **kw):
        status, out, err = self.admin(*argv, **kw)
        self.assertEqual((status, err), (0, ""), f"qvd-admin {' '.join(argv)} failed")
        return out

    def dump(self, tables=TABLES):
        """Every row of C{tables}, in one transaction, comparable before/after."""
        with sync.connect(self.dsn) as conn:
            def read(cur):
                result = {}
                for table in tables:
                    cur.execute(f"SELECT * FROM {table}")
                    result[table] = sorted(repr(tuple(r.values())) for r in cur.fetchall())
                return result
            return sync.transaction(conn, read)

    def refused(self, argv, status=1, contains=None):
        """
        Assert C{argv} fails with one error line and changes no table.
        """
        before = self.dump()
        got, out, err = self.admin(*argv)
        self.assertEqual(got, status, f"exit status of {argv}: {err}")
        self.assertEqual(out, "")
        self.assertEqual(len(err.splitlines()), 1, err)
        self.assertTrue(err.startswith("qvd-admin: error: "), err)
        if contains:
            self.assertIn(contains, err)
        self.assertEqual(self.dump(), before)
        return err

    def image(self, name="desk.tar.gz", content=b"rootfs"):
        path = os.path.join(self.dir, name)
        with open(path, "wb") as f:
            f.write(content)
        return path

    def sample(self, vm=True):
        """A user alice, an OSF desk with one LXC DI, a running node n1, a VM v1."""
        self.ok("user", "add", "alice")
        self.ok("osf", "add", "desk")
        self.ok("di", "add", "--osf", "desk", "--version", "1", self.image())
        self.ok("host", "add", "n1", "10.1.0.1")
        self.query("UPDATE host_runtimes SET state = 'running', hypervisor = 'lxc', "
                   "usable_ram = 1000, usable_cpu = 1000")
        if vm:
            self.ok("vm", "add", "--user", "alice", "--osf", "desk", "v1")

    def log(self):
        return self.query("SELECT action, type_of_action, qvd_object, object_name, source, "
                          "administrator_name, arguments FROM log ORDER BY id")

    def listen(self, channel):
        conn = psycopg2.connect(self.dsn)
        conn.autocommit = True
        conn.cursor().execute(f"LISTEN {channel}")
        self.addCleanup(conn.close)
        return conn

    def notifications(self, conn, wait=0.3):
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            select.select([conn], [], [], max(0, deadline - time.monotonic()))
            conn.poll()
        got = list(conn.notifies)
        conn.notifies.clear()
        return got


class TenantAdminUserTests(AdminTestCase):

    def test_tenants(self):
        """
        Tenants are added, listed, blocked, unblocked and deleted, each change
        audited with source CLI and the administrator from $USER.
        """
        self.patch(os, "environ", dict(os.environ, USER="root-admin"))
        self.ok("tenant", "add", "acme", "--description", "ACME")
        self.ok("tenant", "block", "acme")
        self.assertTrue(self.query("SELECT blocked FROM tenants WHERE name='acme'")[0]["blocked"])
        self.ok("tenant", "unblock", "acme")
        self.assertIn("nothing changed", self.ok("--exist-ok", "tenant", "add", "acme"))
        self.refused(["tenant", "add", "acme"], contains="already exists")
        listing = json.loads(self.ok("--json", "tenant", "list"))
        self.assertIn({"id": 2, "name": "acme", "blocked": False, "users": 0,
                       "description": "ACME"}, listing)
        self.ok("--tenant", "acme", "osf", "add", "desk")
        self.ok("--tenant", "acme", "di", "add", "--osf", "desk", self.image())
        self.ok("tenant", "del", "acme")
        self.assertEqual(self.query("SELECT * FROM tenants WHERE name='acme'"), [])
        self.assertEqual(self.query("SELECT * FROM osfs"), [])
        self.assertEqual(os.listdir(self.images), [])
        log = self.log()
        self.assertEqual([r["action"] for r in log],
                         ["tenant_create", "tenant_update", "tenant_update", "osf_create",
                          "di_create", "tenant_delete"])
        self.assertEqual({(r["source"], r["administrator_name"]) for r in log},
                         {("CLI", "root-admin")})
        self.refused(["tenant", "add", "*"], status=2, contains="reserved")
        self.refused(["--tenant", "*", "osf", "add", "x"], status=2, contains="supertenant")
        self.refused(["tenant", "del", "default2"], contains="unknown tenant 'default2'")

    def test_administrators(self):
        """
        Administrators are added with an argon2 password, listed, re-passworded
        and deleted; NAME@TENANT chooses the tenant.
        """
        self.ok("tenant", "add", "acme")
        self.ok("admin", "add", "boss@acme", "--password", "s3cret")
        row = self.query("SELECT a.name, a.password, t.name AS tenant FROM administrators a "
                         "JOIN tenants t ON t.id = a.tenant_id")[0]
        self.assertEqual((row["name"], row["tenant"]), ("boss", "acme"))
        self.assertTrue(row["password"].startswith("$argon2id$"))
        self.assertIn("boss", self.ok("--tenant", "acme", "admin", "list"))
        self.ok("admin", "passwd", "boss@acme", "--password", "other")
        self.assertNotEqual(self.query("SELECT password FROM administrators")[0]["password"],
                            row["password"])
        self.refused(["admin", "add", "boss@acme", "--password", "x"], contains="already exists")
        self.ok("admin", "del", "boss@acme")
        self.assertEqual(self.query("SELECT * FROM administrators"), [])

    def test_users(self):
        """
        Users are added (logins lower-cased), listed with tenant and blocked
        filters, re-passworded, blocked, unblocked and deleted.
        """
        self.ok("tenant", "add", "t2")
        self.ok("user", "add", "Alice", "--password", "pw")
        self.ok("user", "add", "bob@t2", "--password", "pw")
        self.ok("--tenant", "t2", "user", "add", "carol")
        self.ok("user", "block", "carol@t2")
        self.assertEqual([r["login"] for r in json.loads(self.ok("--json", "user", "list"))],
                         ["alice"])
        blocked = json.loads(self.ok("--json", "user", "list", "--tenant", "t2", "--blocked"))
        self.assertEqual([r["login"] for r in blocked], ["carol"])
        everyone = json.loads(self.ok("--json", "--tenant", "*", "user", "list"))
        self.assertEqual(len(everyone), 3)
        self.ok("user", "unblock", "carol@t2")
        before = self.query("SELECT password FROM users WHERE login = 'alice'")[0]["password"]
        self.ok("user", "passwd", "alice", "--password", "new")
        from qvd.passwords import verify_password
        stored = self.query("SELECT password FROM users WHERE login = 'alice'")[0]["password"]
        self.assertNotEqual(stored, before)
        self.assertTrue(verify_password(stored, "new")[0])
        self.ok("user", "del", "bob@t2")
        self.assertEqual(self.query("SELECT count(*) AS n FROM users")[0]["n"], 2)
        self.assertEqual(len(self.log()), 8)


class OSFAndDITests(AdminTestCase):

    def test_osfs(self):
        """
        OSFs take their defaults from osf.default.*, can be changed with
        'osf set' and deleted together with their DIs and image files.
        """
        self.ok("osf", "add", "desk")
        self.ok("osf", "add", "app", "--memory", "1024", "--no-overlay", "--user-storage", "200",
                "--application")
        rows = {r["name"]: r for r in self.query("SELECT * FROM osfs")}
        self.assertEqual((rows["desk"]["memory"], rows["desk"]["use_overlay"],
                          rows["desk"]["is_application"]), (256, True, False))
        self.assertEqual((rows["app"]["memory"], rows["app"]["use_overlay"],
                          rows["app"]["user_storage_size"], rows["app"]["is_application"]),
                         (1024, False, 200, True))
        self.ok("osf", "set", "desk", "--memory", "768", "--name", "desktop")
        self.assertEqual(self.query("SELECT memory FROM osfs WHERE name='desktop'")[0]["memory"],
                         768)
        self.refused(["osf", "set", "desktop"], status=2, contains="nothing to change")
        self.refused(["osf", "add", "app"], contains="already exists")
        self.ok("di", "add", "--osf", "app", "--version", "1", self.image("a.qcow2"))
        self.assertEqual(os.listdir(self.images), ["1-a.qcow2"])
        self.assertIn("app", self.ok("osf", "list"))
        self.ok("osf", "del", "app")
        self.assertEqual(self.query("SELECT * FROM dis"), [])
        self.assertEqual(os.listdir(self.images), [])

    def test_di_add_copies_and_tags(self):
        """
        'di add' copies the image to images/<id>-<name>, records that name,
        gives it its fixed version tag, moves head to it and sets default only
        when the OSF has none.
        """
        self.ok("osf", "add", "desk")
        first = self.image("desk.tar.gz", b"one")
        self.ok("di", "add", "--osf", "desk", "--version", "1.0", first)
        self.ok("di", "add", "--osf", "desk", "--version", "2.0", self.image("desk2.tar", b"two"))
        self.assertEqual(sorted(os.listdir(self.images)), ["1-desk.tar.gz", "2-desk2.tar"])
        with open(os.path.join(self.images, "1-desk.tar.gz"), "rb") as f:
            self.assertEqual(f.read(), b"one")
        self.assertEqual([r["path"] for r in self.query("SELECT path FROM dis ORDER BY id")],
                         ["1-desk.tar.gz", "2-desk2.tar"])
        tags = self.query("SELECT di_id, tag, fixed FROM di_tags ORDER BY di_id, tag")
        self.assertEqual([(r["di_id"], r["tag"], r["fixed"]) for r in tags],
                         [(1, "1.0", True), (1, "default", False),
                          (2, "2.0", True), (2, "head", False)])
        listing = json.loads(self.ok("--json", "di", "list", "--osf", "desk"))
        self.assertEqual(listing[0]["tags"], "1.0,default")

    def test_di_tags(self):
        """
        'di tag' adds or moves a tag within the OSF; fixed version tags can be
        neither moved nor removed; 'di untag' removes a tag.
        """
        self.ok("osf", "add", "desk")
        self.ok("di", "add", "--osf", "desk", "--version", "1", self.image())
        self.ok("di", "add", "--osf", "desk", "--version", "2", self.image("b.tar"))
        self.ok("di", "tag", "desk:1", "stable")
        self.ok("di", "tag", "2", "default")
        self.assertEqual(self.query("SELECT di_id FROM di_tags WHERE tag='default'"),
                         [{"di_id": 2}])
        self.refused(["di", "tag", "1", "2"], contains="fixed version tag of DI 2")
        self.refused(["di", "untag", "1", "1"], contains="cannot be removed")
        self.refused(["di", "untag", "1", "nope"], contains="has no tag 'nope'")
        self.ok("di", "untag", "desk:1", "stable")
        self.assertEqual(self.query("SELECT * FROM di_tags WHERE tag='stable'"), [])

    def test_di_block_and_del(self):
        """
        DIs are blocked and unblocked; deleting the head DI moves head to the
        newest remaining DI and removes the image file.
        """
        self.ok("osf", "add", "desk")
        self.ok("di", "add", "--osf", "desk", "--version", "1", self.image())
        self.ok("di", "add", "--osf", "desk", "--version", "2", self.image("b.tar"))
        self.ok("di", "block", "2")
        self.assertTrue(self.query("SELECT blocked FROM dis WHERE id = 2")[0]["blocked"])
        self.ok("di", "unblock", "2")
        self.ok("di", "del", "2")
        self.assertEqual(os.listdir(self.images), ["1-desk.tar.gz"])
        self.assertEqual(self.query("SELECT di_id FROM di_tags WHERE tag = 'head'"),
                         [{"di_id": 1}])

    def test_failed_di_add_leaves_no_file(self):
        """
        A refused 'di add' (a version the OSF already has) leaves neither a
        row nor a copied file behind.
        """
        self.ok("osf", "add", "desk")
        self.ok("di", "add", "--osf", "desk", "--version", "1", self.image())
        self.refused(["di", "add", "--osf", "desk", "--version", "1", self.image("x.tar")],
                     contains="already has a DI of version '1'")
        self.refused(["di", "add", "--osf", "nope", "--version", "1", self.image("x.tar")],
                     contains="unknown OSF 'nope'")
        self.refused(["di", "add", "--osf", "desk", self.image("x.iso")], status=2,
                     contains="cannot tell the hypervisor")
        self.assertEqual(os.listdir(self.images), ["1-desk.tar.gz"])


class VMTests(AdminTestCase):

    def test_vm_add_allocates_top_down(self):
        """
        New VMs get the highest free address of the range, the MAC derived
        from it, a stopped/disconnected runtime row and counters.
        """
        self.sample(vm=False)
        self.ok("vm", "add", "--user", "alice", "--osf", "desk", "v1")
        self.ok("vm", "add", "--user", "alice", "--osf", "desk", "--ip", "10.0.3.4", "v2")
        self.ok("vm", "add", "--user", "alice", "--osf", "desk", "--di-tag", "1", "v3")
        vms = self.query("SELECT name, host(ip) AS ip, mac::text AS mac, di_tag FROM vms "
                         "ORDER BY id")
        self.assertEqual([(v["ip"], v["mac"], v["di_tag"]) for v in vms],
                         [("10.0.255.254", "54:52:00:00:ff:fe", "default"),
                          ("10.0.3.4", "54:52:00:00:03:04", "default"),
                          ("10.0.255.253", "54:52:00:00:ff:fd", "1")])
        rt = self.query("SELECT vm_state, user_state, host_id, vm_cmd FROM vm_runtimes")
        self.assertEqual({tuple(r.values()) for r in rt},
                         {("stopped", "disconnected", None, None)})
        self.assertEqual(self.query("SELECT count(*) AS n FROM vm_counters")[0]["n"], 3)

    def test_range_exhausted(self):
        """
        When every address of the range is taken, 'vm add' says so and adds nothing.
        """
        self.sample(vm=False)
        self.ok("config", "set", "vm.network.ip.start", "10.0.255.252")
        for name in ("a", "b", "c"):
            self.ok("vm", "add", "--user", "alice", "--osf", "desk", name)
        self.refused(["vm", "add", "--user", "alice", "--osf", "desk", "d"],
                     contains="every VM address of the range 10.0.255.252 - 10.0.255.254 is taken")

    def test_invalid_input(self):
        """
        Bad input is refused with one line naming the value, a non-zero exit
        and no change: unknown user, duplicate login, IP outside the range,
        a tag that is on another OSF's DI, a missing OSF, a bad config key or
        value, a VM name used twice.
        """
        self.sample()
        self.ok("osf", "add", "other")
        self.ok("di", "add", "--osf", "other", "--version", "9", self.image("o.tar"))
        self.ok("di", "tag", "other:9", "special")
        cases = [
            (["vm", "add", "--user", "nobody", "--osf", "desk", "x"], 1, "unknown user 'nobody'"),
            (["user", "add", "alice", "--password", "x"], 1, "already exists"),
            (["vm", "add", "--user", "alice", "--osf", "desk", "--ip", "192.168.1.1", "x"], 1,
             "IP 192.168.1.1 is outside the VM range"),
            (["vm", "add", "--user", "alice", "--osf", "desk", "--ip", "10.0.255.254", "x"], 1,
             "already used"),
            (["vm", "add", "--user", "alice", "--osf", "desk", "--di-tag", "special", "x"], 1,
             "OSF 'desk' has no DI tagged 'special'"),
            (["vm", "add", "--user", "alice", "--osf", "missing", "x"], 1, "unknown OSF 'missing'"),
            (["vm", "add", "--user", "alice", "--osf", "desk", "v1"], 1, "already has a VM"),
            (["config", "set", "no.such.key", "1"], 2, "unknown configuration key 'no.such.key'"),
            (["config", "set", "osf.default.memory", "lots"], 2, "must be of type int, got 'lots'"),
            (["config", "set", "database.host", "x"], 2, "never read from the database"),
            (["config", "set", "vma.display", "5"], 2, "/etc/qvd/vma.conf"),
            (["config", "set", "client.host.name", "x"], 2, "~/.qvd/client.conf"),
            (["config", "set", "l7r.port", "9443"], 2, "node file"),
            (["vm", "start", "ghost"], 1, "unknown VM 'ghost'"),
            (["vm", "frobnicate", "v1"], 2, "invalid choice"),
            (["host", "add", "n2", "not-an-ip"], 2, "not an IP address"),
        ]
        for argv, status, contains in cases:
            self.refused(argv, status=status, contains=contains)

    def test_start_assigns_node_and_notifies(self):
        """
        'vm start' of a stopped VM picks a running node through the load
        balancer, sets vm_cmd=start and NOTIFYs that node; a second start is
        refused as pending.
        """
        self.sample()
        listener = self.listen("qvd_cmd_for_vm_on_host1")
        self.ok("vm", "start", "v1")
        row = self.query("SELECT host_id, vm_cmd FROM vm_runtimes")[0]
        self.assertEqual((row["host_id"], row["vm_cmd"]), (1, "start"))
        self.assertEqual(len(self.notifications(listener)), 1)
        self.refused(["vm", "start", "v1"], contains="already has a pending start")

    def test_start_without_node(self):
        """
        With no running node of the VM's hypervisor, 'vm start' explains why
        each node was left out; a blocked or missing DI is reported as such.
        """
        self.sample()
        self.ok("host", "add", "n2", "10.1.0.2")
        self.query("UPDATE host_runtimes SET hypervisor = 'kvm' WHERE host_id = 1")
        err = self.refused(["vm", "start", "v1"])
        self.assertIn("no running node can run VM 'v1' (lxc): n1 (runs kvm, not lxc); "
                      "n2 (stopped)", err)
        self.ok("host", "block", "n2")
        self.query("UPDATE host_runtimes SET state = 'running', hypervisor = 'lxc' "
                   "WHERE host_id = 2")
        self.assertIn("n2 (blocked)", self.refused(["vm", "start", "v1"]))
        self.ok("host", "unblock", "n2")
        self.ok("di", "block", "1")
        self.refused(["vm", "start", "v1"], contains="its DI 1 is blocked")
        self.ok("di", "untag", "1", "default")
        self.refused(["vm", "start", "v1"], contains="no DI with the VM's tag")

    def test_stop(self):
        """
        'vm stop' of a stopped VM cancels its pending start; of a running VM
        sets vm_cmd=stop and NOTIFYs its node; of a stopped VM without a
        pending start it is refused.
        """
        self.sample()
        self.ok("vm", "start", "v1")
        listener = self.listen("qvd_cmd_for_vm_on_host1")
        self.ok("vm", "stop", "v1")
        row = self.query("SELECT host_id, vm_cmd FROM vm_runtimes")[0]
        self.assertEqual((row["host_id"], row["vm_cmd"]), (None, None))
        self.refused(["vm", "stop", "v1"], contains="already stopped")
        self.query("UPDATE vm_runtimes SET vm_state = 'running', host_id = 1")
        self.notifications(listener)
        self.ok("vm", "stop", "v1")
        self.assertEqual(self.query("SELECT vm_cmd FROM vm_runtimes")[0]["vm_cmd"], "stop")
        self.assertEqual(len(self.notifications(listener)), 1)
        self.refused(["vm", "stop", "v1"], contains="already has a pending stop")
        self.refused(["vm", "start", "v1"], contains="is running, not stopped")
        self.refused(["vm", "del", "v1"], contains="stop it first")

    def test_disconnect(self):
        """
        'vm disconnect' sets user_cmd=abort and NOTIFYs the L7R's node when a
        user is connected, and is refused when nobody is.
        """
        self.sample()
        self.refused(["vm", "disconnect", "v1"], contains="no user is connected")
        self.query("UPDATE vm_runtimes SET vm_state = 'running', host_id = 1, "
                   "user_state = 'connected', l7r_host_id = 1")
        listener = self.listen("qvd_cmd_for_user_on_host1")
        self.ok("vm", "disconnect", "v1")
        self.assertEqual(self.query("SELECT user_cmd FROM vm_runtimes")[0]["user_cmd"], "abort")
        self.assertEqual(len(self.notifications(listener)), 1)

    def test_block_expire_list_del(self):
        """
        VMs are blocked (and then refused a start), unblocked, given
        expiration times, listed with filters and deleted when stopped.
        """
        self.sample()
        self.ok("vm", "add", "--user", "alice", "--osf", "desk", "v2")
        self.ok("vm", "block", "v1")
        self.refused(["vm", "start", "v1"], contains="is blocked")
        self.ok("vm", "unblock", "v1")
        self.ok("vm", "expire", "v1", "--soft", "2030-01-01T10:00:00+00:00", "--hard", "+3650d")
        row = self.query("SELECT vm_expiration_soft AS s, vm_expiration_hard AS h "
                         "FROM vm_runtimes WHERE vm_id = 1")[0]
        self.assertEqual(row["s"].year, 2030)
        self.assertGreater(row["h"], row["s"])
        self.refused(["vm", "expire", "v1", "--soft", "tomorrow"], status=2,
                     contains="'tomorrow' is not a time")
        self.ok("vm", "expire", "v1", "--soft", "none", "--hard", "none")
        self.ok("vm", "start", "v1")
        self.query("UPDATE vm_runtimes SET vm_state = 'running', vm_cmd = NULL WHERE vm_id = 1")

        def names(*argv):
            return [r["name"] for r in json.loads(self.ok("--json", "vm", "list", *argv))]
        self.assertEqual(names(), ["v1", "v2"])
        self.assertEqual(names("--state", "running"), ["v1"])
        self.assertEqual(names("--host", "n1"), ["v1"])
        self.assertEqual(names("--user", "alice", "--osf", "desk", "--state", "stopped"), ["v2"])
        self.refused(["vm", "list", "--state", "flying"], status=2, contains="not a VM state")
        self.ok("vm", "del", "v2")
        self.assertEqual([r["name"] for r in self.query("SELECT name FROM vms")], ["v1"])


class HostConfigPropertyTests(AdminTestCase):

    def test_hosts(self):
        """
        'host add' creates the host, its stopped runtime and its counters;
        hosts are listed with state and ok_ts, blocked, unblocked, deleted.
        """
        self.ok("host", "add", "n1", "10.1.0.1", "--no-frontend")
        self.assertEqual(self.query("SELECT state FROM host_runtimes"), [{"state": "stopped"}])
        self.assertEqual(len(self.query("SELECT * FROM host_counters")), 1)
        self.ok("host", "block", "n1")
        listing = json.loads(self.ok("--json", "host", "list"))
        self.assertEqual((listing[0]["state"], listing[0]["blocked"], listing[0]["frontend"],
                          listing[0]["ok_ts"]), ("stopped", True, False, None))
        self.ok("host", "unblock", "n1")
        self.refused(["host", "add", "n2", "10.1.0.1"], contains="already used by host 'n1'")
        self.ok("host", "del", "n1")
        self.assertEqual(self.query("SELECT * FROM host_runtimes"), [])

    def test_config(self):
        """
        'config set/get/del' work on the global layer, or on a tenant's with
        --tenant, and 'get' reports the effective value and where it comes from.
        """
        self.ok("tenant", "add", "t2")
        self.assertIn("within a second", self.ok("config", "set", "osf.default.memory", "512"))
        self.ok("--tenant", "t2", "config", "set", "osf.default.memory", "1024")
        self.assertIn("when the daemons restart",
                      self.ok("config", "set", "vm.lxc.cpu.shares", "512"))
        self.ok("config", "del", "vm.lxc.cpu.shares")
        rows = self.query("SELECT tenant_id, value FROM configs ORDER BY tenant_id")
        self.assertEqual([(r["tenant_id"], r["value"]) for r in rows], [(-1, "512"), (2, "1024")])
        got = json.loads(self.ok("--json", "--tenant", "t2", "config", "get",
                                 "osf.default.memory"))
        self.assertEqual(got, [{"key": "osf.default.memory", "value": "1024",
                                "source": "database (tenant)"}])
        self.ok("--tenant", "t2", "osf", "add", "big")
        self.assertEqual(self.query("SELECT memory FROM osfs")[0]["memory"], 1024)
        self.ok("config", "del", "osf.default.memory")
        got = json.loads(self.ok("--json", "config", "get", "osf.default.memory"))
        self.assertEqual(got[0]["source"], "default")
        self.refused(["config", "del", "osf.default.memory"], contains="is not set")
        self.refused(["config", "set", "custom.a", "${custom.a}"], status=2, contains="loop")

    def test_config_ssl(self):
        """
        'config ssl' stores a matching certificate and key; a key of another
        certificate is refused.
        """
        from OpenSSL import crypto

        def pair(name):
            key = crypto.PKey()
            key.generate_key(crypto.TYPE_RSA, 2048)
            cert = crypto.X509()
            cert.get_subject().CN = name
            cert.set_serial_number(1)
            cert.gmtime_adj_notBefore(0)
            cert.gmtime_adj_notAfter(3600)
            cert.set_issuer(cert.get_subject())
            cert.set_pubkey(key)
            cert.sign(key, "sha256")
            paths = []
            for suffix, data in (("crt", crypto.dump_certificate(crypto.FILETYPE_PEM, cert)),
                                 ("key", crypto.dump_privatekey(crypto.FILETYPE_PEM, key))):
                path = os.path.join(self.dir, f"{name}.{suffix}")
                with open(path, "wb") as f:
                    f.write(data)
                paths.append(path)
            return paths
        cert, key = pair("a")
        _, other_key = pair("b")
        self.ok("config", "ssl", "--cert", cert, "--key", key, "--ca", cert)
        self.assertEqual(sorted(r["key"] for r in self.query("SELECT key FROM ssl_configs")),
                         ["l7r.ssl.ca", "l7r.ssl.cert", "l7r.ssl.key"])
        self.query("DELETE FROM ssl_configs")
        self.refused(["config", "ssl", "--cert", cert, "--key", other_key], status=2,
                     contains="does not belong to the certificate")

    def test_properties(self):
        """
        Properties are set, listed and removed on users, VMs, hosts, OSFs and DIs.
        """
        self.sample()
        for obj, ref in (("user", "alice"), ("vm", "v1"), ("host", "n1"), ("osf", "desk"),
                         ("di", "1")):
            self.ok("prop", "set", obj, ref, "colour", "red")
            self.ok("prop", "set", obj, ref, "colour", "blue")
            self.assertEqual(json.loads(self.ok("--json", "prop", "list", obj, ref)),
                             [{"id": 1, "key": "colour", "value": "blue"}])
            self.ok("prop", "del", obj, ref, "colour")
            self.refused(["prop", "del", obj, ref, "colour"], contains="has no property")


class DatabaseCommandTests(AdminTestCase):

    def test_db_init_and_upgrade(self):
        """
        'db init' creates a missing database and migrates it; 'db upgrade'
        then has nothing to do.
        """
        name = self.dbname + "_new"
        self.addCleanup(pg.drop_database, name)
        with open(self.config, "a") as f:
            f.write(f"database.name = {name}\n")
        self.refused(["user", "list"], contains="cannot connect")
        out = self.ok("db", "init")
        self.assertIn("created", out)
        self.assertIn("schema up to date", self.ok("db", "upgrade"))
        self.assertIn("alice", self.ok("user", "add", "alice"))

    def test_db_init_private_cluster(self):
        """
        With no database.host, 'db init' starts the private cluster under
        path.db and creates the database in it.
        """
        from qvd.db.cluster import PrivateCluster
        base = tempfile.mkdtemp(prefix="qvdt-admin-db-")
        self.addCleanup(shutil.rmtree, base, True)
        os.chmod(base, 0o755)
        root = os.path.join(base, "db")
        cluster = PrivateCluster(root)
        self.addCleanup(cluster.destroy)
        with open(self.config, "w") as f:
            f.write(f"path.db = {root}\n")
        began = time.monotonic()
        self.ok("db", "init")
        elapsed = time.monotonic() - began
        self.assertTrue(cluster.running)
        self.ok("host", "add", "n1", "10.1.0.1")
        self.assertIn("n1", self.ok("host", "list"))
        print(f"\nprivate cluster init+start+migrate via 'qvd-admin db init': {elapsed:.2f}s")


class ConcurrencyTests(AdminTestCase):

    def run_parallel(self, argvs):
        """Run each argv in its own thread (own connection) at the same moment."""
        barrier = threading.Barrier(len(argvs))
        results = [None] * len(argvs)

        def one(i, argv):
            barrier.wait()
            results[i] = self.admin(*argv)
        threads = [threading.Thread(target=one, args=(i, a)) for i, a in enumerate(argvs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return results

    def test_concurrent_starts(self):
        """
        Two concurrent 'vm start' of one stopped VM produce exactly one start
        command and one NOTIFY; the other reports the pending start.
        """
        self.sample()
        self.ok("host", "add", "n2", "10.1.0.2")
        self.query("UPDATE host_runtimes SET state = 'running', hypervisor = 'lxc'")
        listeners = [self.listen("qvd_cmd_for_vm_on_host1"), self.listen("qvd_cmd_for_vm_on_host2")]
        for attempt in range(3):
            results = self.run_parallel([["vm", "start", "v1"]] * 2)
            statuses = sorted(r[0] for r in results)
            self.assertEqual(statuses, [0, 1], results)
            failed = [r for r in results if r[0] == 1][0]
            self.assertIn("already has a pending start", failed[2])
            notes = sum(len(self.notifications(c, wait=0.2)) for c in listeners)
            self.assertEqual(notes, 1)
            self.assertEqual(self.query("SELECT vm_cmd FROM vm_runtimes")[0]["vm_cmd"], "start")
            self.assertEqual(self.query("SELECT count(*) AS n FROM log WHERE action='vm_start'")
                             [0]["n"], attempt + 1)
            self.ok("vm", "stop", "v1")
            for c in listeners:
                self.notifications(c, wait=0.1)

    def test_concurrent_starts_that_overlap(self):
        """
        When both 'vm start' transactions read the stopped VM before either
        writes, the serializable retry still lets only one of them start it.
        """
        from qvd.admin import vms
        self.sample()
        listener = self.listen("qvd_cmd_for_vm_on_host1")
        barrier = threading.Barrier(2, timeout=10)
        first_read = threading.local()
        real = vms.find_vm
        reads = []

        def find_vm(ctx, cur, ref):
            vm = real(ctx, cur, ref)
            reads.append(vm["vm_cmd"])
            if not getattr(first_read, "done", False):
                first_read.done = True
                barrier.wait()
            return vm
        self.patch(vms, "find_vm", find_vm)
        results = self.run_parallel([["vm", "start", "v1"]] * 2)
        self.assertEqual(sorted(r[0] for r in results), [0, 1], results)
        self.assertEqual(reads[:2], [None, None])
        self.assertEqual(reads[2:], ["start"])
        self.assertEqual(len(self.notifications(listener)), 1)

    def test_concurrent_vm_add(self):
        """
        Twenty concurrent 'vm add' all succeed and never hand out one IP twice.
        """
        self.sample(vm=False)
        results = self.run_parallel(
            [["vm", "add", "--user", "alice", "--osf", "desk", f"v{i}"] for i in range(20)])
        self.assertEqual([r[0] for r in results], [0] * 20, [r[2] for r in results if r[0]])
        ips = [r["ip"] for r in self.query("SELECT host(ip) AS ip FROM vms")]
        self.assertEqual(len(set(ips)), 20)
        self.assertEqual(sorted(ips), [f"10.0.255.{n}" for n in range(235, 255)])


class CostTests(AdminTestCase):

    def test_command_cost(self):
        """
        One CLI command in-process costs a few tens of milliseconds (printed
        for the report); as a new process it stays under a second.
        """
        import subprocess
        import sys
        self.ok("host", "add", "n1", "10.1.0.1")
        began = time.monotonic()
        for _ in range(10):
            self.ok("host", "list")
        in_process = (time.monotonic() - began) / 10 * 1000
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))))
        began = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "qvd.admin.cli", "--config", self.config,
                               "host", "list"], capture_output=True, text=True, env=env)
        subprocess_ms = (time.monotonic() - began) * 1000
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn("n1", proc.stdout)
        print(f"\nqvd-admin host list: {in_process:.1f} ms in-process, "
              f"{subprocess_ms:.0f} ms as a process; "
              f"test cluster start {pg.timings.get('cluster_start', 0):.2f}s")
        self.assertLess(subprocess_ms, 1000)
