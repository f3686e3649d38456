"""
The L7R on the wire: a real L7R service in-process over a REAL TLS socket,
the real PostgreSQL (qvd.testing.pg), the database-password fake
authenticator, a fake SimpleRPC VMA, an echo server as nxagent and a fake
HKD that starts VMs when told. Responses are checked byte for byte
(reference 1.1-1.5).
"""

import base64
import json
import os
import shutil
import ssl as stdlib_ssl
import socket

from twisted.internet import defer, reactor, task, threads
from twisted.trial import unittest

from qvd.config import Config
from qvd.db.listen import Listener
from qvd.db.pool import Database
from qvd.l7r import tls
from qvd.l7r.service import L7RService
from qvd.passwords import legacy_hash
from qvd.protocols import http
from qvd.testing.fakeauth import FakeAuthenticator
from qvd.testing.fakevma import EchoFactory, FakeVMA
from qvd.testing.l7rclient import RawClient
from qvd.testing import pg
from qvd.testing.pg import DatabaseTestMixin

PASSWORD_HASH = legacy_hash("secret", "qvd1234")  # fast to verify; argon2 is the auth tests' business
BASIC = "Basic " + base64.b64encode(b"ana:secret").decode()
NX_GREETING = b"NXPROXY-3.5.0-3.5.99 stream=default,data=default "


def sleep(seconds):
    return task.deferLater(reactor, seconds, lambda: None)


class FakeHKD:
    """
    Does what an HKD does with vm_cmd: start -> running, stop -> stopped.
    """

    def __init__(self, dsn, host_id):
        self.db = Database(dsn, reactor, size=1)
        self.listener = Listener(dsn, reactor, keepalive=1)
        self.host_id = host_id
        self.enabled = True

    async def start(self):
        await self.db.start()
        self.listener.subscribe(f"qvd_cmd_for_vm_on_host{self.host_id}", self._cmd)
        await self.listener.start()

    def _cmd(self, channel, payload):
        if not self.enabled:
            return
        self.db.runOperation(
            "UPDATE vm_runtimes SET vm_state = CASE vm_cmd WHEN 'start' THEN 'running'"
            " ELSE 'stopped' END, host_id = CASE vm_cmd WHEN 'stop' THEN NULL ELSE host_id END,"
            " vm_cmd = NULL WHERE vm_cmd IS NOT NULL")

    async def stop(self):
        await self.listener.stop()
        await self.db.stop()


class L7RWireMixin(DatabaseTestMixin):
    overrides = {}

    def setUp(self):
        super().setUp()
        return defer.ensureDeferred(self._setUp())

    async def _setUp(self):
        self.tmp = os.path.abspath(self.mktemp())
        os.makedirs(self.tmp)
        self.ssl_dir = os.path.join(self.tmp, "ssl")
        tls.self_signed(self.ssl_dir, "localhost")
        self.vma = FakeVMA(states=["starting", "listening"])
        self.vma_port = reactor.listenTCP(0, self.vma.site(), interface="127.0.0.1")
        self.addCleanup(self.vma_port.stopListening)
        self.echo = EchoFactory()
        self.echo_port = reactor.listenTCP(0, self.echo, interface="127.0.0.1")
        self.addCleanup(self.echo_port.stopListening)
        self.nodename = f"l7rtest{os.getpid()}"
        self.host_id = self.query(
            "INSERT INTO hosts (name, address) VALUES (%s, '127.0.0.1') RETURNING id",
            (self.nodename,))[0]["id"]
        self.query("INSERT INTO host_runtimes (host_id, state, usable_ram, usable_cpu, hypervisor)"
                   " VALUES (%s, 'running', 1000, 1000, 'lxc')", (self.host_id,))
        self.user_id = self.query(
            "INSERT INTO users (tenant_id, login, password) VALUES (1, 'ana', %s) RETURNING id",
            (PASSWORD_HASH,))[0]["id"]
        self.osf_id = self.query(
            "INSERT INTO osfs (tenant_id, name) VALUES (1, 'desktop') RETURNING id")[0]["id"]
        di_id = self.query("INSERT INTO dis (osf_id, path, version) VALUES (%s, 'd.tar.gz', '1')"
                           " RETURNING id", (self.osf_id,))[0]["id"]
        self.query("INSERT INTO di_tags (di_id, osf_id, tag) VALUES (%s, %s, 'default')",
                   (di_id, self.osf_id))
        self.vm_id = self.add_vm("desk1", 10)
        self.hkd = FakeHKD(self.dsn, self.host_id)
        await self.hkd.start()
        self.addCleanup(lambda: defer.ensureDeferred(self.hkd.stop()))
        self.svc = await self.start_l7r()

    def add_vm(self, name, n, user_id=None):
        vm_id = self.query(
            "INSERT INTO vms (name, user_id, osf_id, ip, mac) VALUES (%s, %s, %s, %s, %s)"
            " RETURNING id", (name, user_id or self.user_id, self.osf_id, f"10.9.0.{n}",
                              f"54:52:00:09:00:{n:02x}"))[0]["id"]
        self.query("INSERT INTO vm_runtimes (vm_id, vm_address, vm_vma_port, vm_x_port)"
                   " VALUES (%s, '127.0.0.1', %s, %s)",
                   (vm_id, self.vma_port.getHost().port, self.echo_port.getHost().port))
        return vm_id

    def config(self, **extra):
        overrides = {
            "nodename": self.nodename, "path.state": self.tmp, "path.l7r.ssl": self.ssl_dir,
            "internal.l7r.poll_time.vm": "0.2", "internal.l7r.poll_time.x": "0.05",
            "internal.l7r.timeout.takeover": "5", "l7r.ssl.reload_interval": "0.2",
            "internal.l7r.timeout.vma": "2", "l7r.counters.flush_interval": "0.05",
        }
        overrides.update(self.overrides)
        overrides.update(extra)
        return Config.load(os.devnull, overrides=overrides)

    async def start_l7r(self, **extra):
        svc = L7RService(self.config(**extra), "ssl:0:interface=127.0.0.1", reactor=reactor,
                         dsn=pg.role_dsn(self.dbname, "l7r"), authenticator=FakeAuthenticator)
        await svc.start()
        self.addCleanup(lambda: defer.ensureDeferred(svc.stop()))
        return svc

    async def client(self, svc=None, **kw):
        svc = svc or self.svc
        c = await RawClient.connect(reactor, "127.0.0.1", svc.port.getHost().port, **kw)
        self.addCleanup(lambda: c.closed or c.transport.loseConnection())
        return c

    async def request(self, data, client=None):
        c = client or await self.client()
        c.send(data)
        return await c.raw_response()

    def connect_request(self, vm_id=None, extra=b"", headers=b""):
        return (b"GET /qvd/connect_to_vm?id=%d&qvd.client.os=linux&qvd.client.geometry=1024x768"
                b"%s HTTP/1.1\r\nAuthorization: %s\r\nConnection: Upgrade\r\nUpgrade: QVD/1.0\r\n"
                b"%s\r\n" % (vm_id or self.vm_id, extra, BASIC.encode(), headers))

    async def connected(self, client=None, vm_id=None):
        c = client or await self.client()
        c.send(self.connect_request(vm_id))
        status, head, body, infos = await c.final_response()
        self.assertEqual(status, 101, (head, body, infos))
        return c, head, infos

    async def eventually(self, sql, expected, timeout=5.0):
        for _ in range(int(timeout / 0.02)):
            if self.query(sql) == expected:
                return
            await sleep(0.02)
        self.assertEqual(self.query(sql), expected)

    async def greet(self, c):
        """
        Send the NX greeting a client's nxproxy sends first; the echo shows it
        reached nxagent with the cookie the VMA got in its last x_start.
        """
        cookie = self.vma.starts[-1]["qvd.nx.cookie"]
        c.send(NX_GREETING)
        expected = NX_GREETING.replace(b" stream=", b" cookie=%s,stream=" % cookie.encode())
        await c.wait(lambda: bytes(c.buffer).endswith(expected), what="the greeting's echo")
        del c.buffer[:]
        c.greeted = True

    async def echo_through(self, c, payload=b"hello nx"):
        if not getattr(c, "greeted", False):
            await self.greet(c)
        c.send(payload)
        await c.wait(lambda: bytes(c.buffer).endswith(payload), what="the echo")
        del c.buffer[:]


def d(f):
    """Run an async test method as a Deferred."""
    def wrapper(self):
        return defer.ensureDeferred(f(self))
    wrapper.__name__ = f.__name__
    wrapper.__doc__ = f.__doc__
    return wrapper


class RequestTests(L7RWireMixin, unittest.TestCase):
    @d
    async def test_ping(self):
        """/qvd/ping answers 200 'I am alive!' to bare-LF lines without Host."""
        self.assertEqual(await self.request(b"GET /qvd/ping HTTP/1.1\n\n"),
                         http.response_with_body(200, "text/plain", b"I am alive!\r\n"))

    @d
    async def test_ping_unavailable(self):
        """/qvd/ping answers 503 when the node is blocked, not running or unknown."""
        c = await self.client()
        self.query("UPDATE host_runtimes SET blocked = true")
        self.assertEqual(await self.request(b"GET /qvd/ping HTTP/1.1\r\n\r\n", c),
                         http.error_response(503, "Server is blocked"))
        self.query("UPDATE host_runtimes SET blocked = false, state = 'stopping'")
        self.assertEqual(await self.request(b"GET /qvd/ping HTTP/1.1\r\n\r\n", c),
                         http.error_response(503, "Server is stopping"))
        self.query("DELETE FROM hosts")
        self.assertEqual(await self.request(b"GET /qvd/ping HTTP/1.1\r\n\r\n", c),
                         http.error_response(503, "Host is not registered in the database"))

    @d
    async def test_protocol_errors(self):
        """Unknown paths are 404 (connection kept); HTTP/1.0 is 505 and bad lines 400 (closed)."""
        c = await self.client()
        self.assertEqual(await self.request(b"GET /nothing HTTP/1.1\n\n", c), http.error_response(404))
        self.assertEqual((await self.request(b"GET /qvd/ping HTTP/1.1\n\n", c))[:15],
                         b"HTTP/1.1 200 OK")
        self.assertEqual(await self.request(b"GET /qvd/ping HTTP/1.0\r\n\r\n", c),
                         http.error_response(505))
        await c.lost
        self.assertEqual(await self.request(b"GET /qvd/ping HTTP/1.1\nbroken\n\n"),
                         http.error_response(400))

    @d
    async def test_unauthorized(self):
        """Missing or wrong credentials are 401 with WWW-Authenticate Basic realm QVD."""
        self.assertEqual(await self.request(b"GET /qvd/list_of_vm? HTTP/1.1\r\n\r\n"),
                         http.unauthorized())
        bad = base64.b64encode(b"ana:wrong")
        self.assertEqual(await self.request(
            b"GET /qvd/list_of_vm? HTTP/1.1\r\nAuthorization: Basic " + bad + b"\r\n\r\n"),
            http.unauthorized())
        await self.eventually("SELECT auth_attempts, auth_ok, http_requests FROM host_counters",
                              [{"auth_attempts": 1, "auth_ok": 0, "http_requests": 2}])

    @d
    async def test_list_of_vm(self):
        """list_of_vm is the original's pretty ASCII JSON, ids as numbers."""
        other = self.add_vm("dësk2", 11)
        self.query("UPDATE vm_runtimes SET blocked = true WHERE vm_id = %s", (other,))
        body = (
            '[\n   {\n      "id" : %d,\n      "state" : "stopped",\n      "name" : "desk1",\n'
            '      "blocked" : 0,\n      "is_application" : 0\n   },\n'
            '   {\n      "id" : %d,\n      "state" : "stopped",\n      "name" : "d\\u00ebsk2",\n'
            '      "blocked" : 1,\n      "is_application" : 0\n   }\n]\n') % (self.vm_id, other)
        self.assertEqual(await self.request(
            b"GET /qvd/list_of_vm? HTTP/1.1\r\nAuthorization: %s\r\nAccept: application/json\r\n"
            b"\r\n" % BASIC.encode()),
            http.response_with_body(200, "application/json", body.encode()))
        self.assertEqual([v["id"] for v in json.loads(body)], [self.vm_id, other])

    @d
    async def test_list_of_applications(self):
        """list_of_applications lists only VMs of application OSFs."""
        data = await self.request(b"GET /qvd/list_of_applications HTTP/1.1\r\nAuthorization: %s"
                                  b"\r\n\r\n" % BASIC.encode())
        self.assertEqual(data, http.response_with_body(200, "application/json", b"[]\n"))

    @d
    async def test_list_of_vm_node_not_running(self):
        """list_of_vm is 503 'Server is <state>' when the node is not running."""
        self.query("UPDATE host_runtimes SET state = 'starting'")
        self.assertEqual(await self.request(
            b"GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: %s\r\n\r\n" % BASIC.encode()),
            http.error_response(503, "Server is starting"))

    @d
    async def test_connect_statuses(self):
        """connect_to_vm's checks answer in the original's order: 503 blocked node,
        426, 422, 403 foreign params, 404 missing VM, 403 blocked VM; all on one
        connection, authenticated once."""
        c = await self.client()
        auth = b"Authorization: " + BASIC.encode() + b"\r\n"
        up = b"Connection: Upgrade\r\nUpgrade: QVD/1.0\r\n"
        self.query("UPDATE host_runtimes SET blocked = true")
        self.assertEqual(await self.request(self.connect_request(), c),
                         http.error_response(503, "Server is blocked"))
        self.query("UPDATE host_runtimes SET blocked = false")
        self.assertEqual(await self.request(
            b"GET /qvd/connect_to_vm?id=1 HTTP/1.1\r\n" + auth + b"\r\n", c),
            http.error_response(426))
        self.assertEqual(await self.request(
            b"GET /qvd/connect_to_vm?qvd.client.os=linux HTTP/1.1\r\n" + auth + up + b"\r\n", c),
            http.error_response(422, "parameter id is missing"))
        self.assertEqual(await self.request(
            b"GET /qvd/connect_to_vm?id=1&evil=1&qvd.client.x=1&other HTTP/1.1\r\n" + auth + up
            + b"\r\n", c),
            http.error_response(403, "Invalid parameters evil other"))
        self.assertEqual(await self.request(self.connect_request(vm_id=999999), c),
                         http.error_response(404, "The requested virtual machine does not exist"))
        self.query("UPDATE vm_runtimes SET blocked = true")
        self.assertEqual(await self.request(self.connect_request(), c),
                         http.error_response(
                             403, "The requested virtual machine is offline for maintenance"))
        self.assertEqual(self.svc.l7r.authenticator.calls, 1)

    @d
    async def test_connect_foreign_vm(self):
        """A VM of another user is refused with the original's 503."""
        other_user = self.query("INSERT INTO users (tenant_id, login) VALUES (1, 'bob')"
                                " RETURNING id")[0]["id"]
        vm = self.add_vm("bobs", 12, user_id=other_user)
        self.assertEqual(await self.request(self.connect_request(vm)), http.error_response(
            503, "The requested virtual machine is not available: You are not allowed to access"
                 " requested virtual machine, retry later"))
        self.assertEqual(self.query("SELECT real_user_id, user_state FROM vm_runtimes"
                                    " WHERE vm_id = %s", (vm,)),
                         [{"real_user_id": None, "user_state": "disconnected"}])


class ConnectTests(L7RWireMixin, unittest.TestCase):
    @d
    async def test_connect_and_relay(self):
        """connect_to_vm starts the stopped VM, streams the original's 102 lines,
        answers 101 with a slave key and relays bytes (including those sent right
        after the request) to nxagent, the NX greeting with the cookie the VMA
        got in x_start; closing returns the VM to disconnected."""
        c = await self.client()
        c.send(self.connect_request() + b"NXPROXY-3.5.0 stream=default early")
        status, head, body, infos = await c.final_response()
        vm = self.vm_id
        self.assertEqual(infos[:4], [f"Session acquired for VM_ID: {vm}",
                                     f"Assigning VM {vm} to host", "Starting virtual machine",
                                     "Waiting for VM to reach state 'running'"])
        self.assertEqual(infos[-4:], [f"Starting X session at VM {vm}",
                                      f"Waiting for X session to come up on VM {vm}",
                                      f"Connecting X session for VM_ID: {vm}",
                                      "Connection established"])
        self.assertRegex(head, rb"^HTTP/1\.1 101 Switching Protocols\r\nX-QVD-Slave-Key: "
                               rb"[A-Za-z0-9]{64}\r\n\r\n$")
        cookie = self.vma.starts[0]["qvd.nx.cookie"]
        self.assertRegex(cookie, "^[0-9a-f]{32}$")
        self.assertNotIn(cookie.encode(), head + body)
        await c.wait(lambda: bytes(c.buffer) == b"NXPROXY-3.5.0 cookie=%s,stream=default early"
                     % cookie.encode(), what="early bytes")
        del c.buffer[:]
        c.greeted = True
        await self.echo_through(c, bytes(range(256)) * 100)
        row = self.query("SELECT vm_state, user_state, l7r_host_id, real_user_id FROM vm_runtimes")
        self.assertEqual(row, [{"vm_state": "running", "user_state": "connected",
                                "l7r_host_id": self.host_id, "real_user_id": self.user_id}])
        params = self.vma.starts[0]
        self.assertEqual(params["qvd.client.os"], "linux")
        self.assertEqual(params["qvd.vm.user.name"], "ana")
        self.assertEqual(params["host_address"], "127.0.0.1")
        self.assertRegex(params["qvd.slave.key"], "^[A-Za-z0-9]{64}$")
        self.assertIn(params["qvd.slave.key"].encode(), head)
        self.assertTrue(self.query("SELECT 1 FROM user_tokens WHERE token = %s",
                                   (params["auth_token"],)))
        await c.close()
        for _ in range(200):
            if self.query("SELECT user_state FROM vm_runtimes")[0]["user_state"] == "disconnected":
                break
            await sleep(0.02)
        self.assertEqual(self.query("SELECT user_state, l7r_host_id, l7r_session FROM vm_runtimes"),
                         [{"user_state": "disconnected", "l7r_host_id": None, "l7r_session": None}])
        await self.eventually("SELECT nx_attempts, nx_ok, short_sessions FROM host_counters",
                              [{"nx_attempts": 1, "nx_ok": 1, "short_sessions": 1}])
        await sleep(0.05)
        self.assertEqual(self.echo.connections, [])

    @d
    async def test_reconnect_round_trips(self):
        """
        A reconnect to a running VM (the everyday login) costs at most
        ROUND_TRIPS statements to PostgreSQL from the request to the 101
        (15 before the claim became one statement and the VM's row was read
        once; 8 before the node's and the VM's rows were read together, the
        token stored with the properties read and the row returned by the
        claim): node and VM, user, claim with the row, token and properties,
        connected.
        """
        from txpostgres import txpostgres
        c, _, _ = await self.connected()
        await c.close()
        await self.eventually("SELECT user_state FROM vm_runtimes",
                              [{"user_state": "disconnected"}])
        statements = []
        original = txpostgres.Cursor.execute

        def execute(cursor, query, params=None):
            # the host counters are flushed on a timer of their own, not by the connect
            if not str(query).startswith("INSERT INTO host_counters"):
                statements.append(query)
            return original(cursor, query, params)
        txpostgres.Cursor.execute = execute
        try:
            await self.connected()
        finally:
            txpostgres.Cursor.execute = original
        print(f"\nreconnect to a running VM: {len(statements)} statements")
        for q in statements:
            print("   ", " ".join(str(q).split())[:110])
        self.assertLessEqual(len(statements), self.ROUND_TRIPS, statements)

    ROUND_TRIPS = 5

    @d
    async def test_properties_override_params(self):
        """x_start gets the client's params overridden by properties (OSF < user < VM),
        then the auth params."""
        def prop(key, table, column, obj, value):
            pid = self.query("INSERT INTO properties_list (key, tenant_id, qvd_object)"
                             " VALUES (%s, 1, %s) RETURNING id", (key, table))[0]["id"]
            self.query(f"INSERT INTO {table}_properties ({column}, property_id, value)"
                       " VALUES (%s, %s, %s)", (obj, pid, value))
        prop("qvd.client.geometry", "osf", "osf_id", self.osf_id, "osf")
        prop("qvd.client.geometry", "user", "user_id", self.user_id, "user")
        prop("qvd.client.geometry", "vm", "vm_id", self.vm_id, "vm")
        prop("qvd.vm.user.name", "vm", "vm_id", self.vm_id, "not-ana")
        await self.connected()
        self.assertEqual(self.vma.starts[0]["qvd.client.geometry"], "vm")
        self.assertEqual(self.vma.starts[0]["qvd.vm.user.name"], "ana")

    @d
    async def test_nx_cookie_per_connection(self):
        """Every connection gets a new NX cookie in x_start (a resume too); the
        client's query cannot set one (403) and a property named like it is
        overridden; each relay puts its own connection's cookie in the greeting."""
        self.assertEqual(await self.request(self.connect_request(
            extra=b"&qvd.nx.cookie=" + b"0" * 32)),
            http.error_response(403, "Invalid parameters qvd.nx.cookie"))
        pid = self.query("INSERT INTO properties_list (key, tenant_id, qvd_object)"
                         " VALUES ('qvd.nx.cookie', 1, 'vm') RETURNING id")[0]["id"]
        self.query("INSERT INTO vm_properties (vm_id, property_id, value) VALUES (%s, %s, %s)",
                   (self.vm_id, pid, "1" * 32))
        first, _, _ = await self.connected()
        await self.echo_through(first)
        await first.close()
        await self.eventually("SELECT user_state FROM vm_runtimes",
                              [{"user_state": "disconnected"}])
        second, _, _ = await self.connected()
        await self.echo_through(second)
        cookies = [start["qvd.nx.cookie"] for start in self.vma.starts]
        self.assertEqual(len(cookies), 2)
        self.assertNotEqual(cookies[0], cookies[1])
        self.assertNotIn("1" * 32, cookies)

    @d
    async def test_not_nx_after_101_closed(self):
        """A client that sends something other than an NX greeting after the 101
        is disconnected; nxagent's side gets none of it and the VM is released."""
        c, _, _ = await self.connected()
        c.send(b"GET /qvd/list_of_vm HTTP/1.1\r\n\r\n")
        await c.lost
        await self.eventually("SELECT user_state FROM vm_runtimes",
                              [{"user_state": "disconnected"}])
        self.assertEqual(self.echo.received, b"")

    @d
    async def test_x_start_retry(self):
        """x_start is retried while the VMA says to retry later."""
        self.vma.x_start_failures = 3
        await self.connected()
        self.assertEqual(len(self.vma.starts), 4)

    @d
    async def test_x_session_fails(self):
        """An X session that goes to another state is the original's 503, and the
        claim is released."""
        self.vma.states = ["stopped"]
        self.assertEqual(await self.request(self.connect_request()), error_after_102s(
            f"Unable to start X session on VM {self.vm_id}, state went to stopped"))
        self.assertEqual(self.query("SELECT user_state FROM vm_runtimes"),
                         [{"user_state": "disconnected"}])

    @d
    async def test_vm_start_timeout(self):
        """A VM that does not reach 'running' in time is 503 'operation timed out!'."""
        self.hkd.enabled = False
        await self.svc.stop()
        svc = await self.start_l7r(**{"internal.l7r.timeout.vm_start": "0.5"})
        c = await self.client(svc)
        c.send(self.connect_request())
        status, head, body, infos = await c.final_response()
        self.assertEqual((status, body.decode()), (503, (
            "The requested virtual machine is not available: Unable to start VM %d,"
            " operation timed out!, retry later" % self.vm_id)))

    @d
    async def test_no_node(self):
        """A stopped VM with no running node to go to is 503."""
        self.query("UPDATE host_runtimes SET state = 'running', blocked = false")
        self.query("UPDATE hosts SET backend = false")
        c = await self.client()
        c.send(self.connect_request())
        status, _, body, _ = await c.final_response()
        self.assertEqual((status, body.decode()), (503, (
            "The requested virtual machine is not available: Unable to start VM %d, can't assign"
            " to any host, retry later" % self.vm_id)))

    @d
    async def test_stop_vm(self):
        """stop_vm stops a running VM and answers 'Machine stopped'."""
        await self.connected()
        c = await self.client()
        c.send(b"GET /qvd/stop_vm?id=%d HTTP/1.1\r\nAuthorization: %s\r\n\r\n"
               % (self.vm_id, BASIC.encode()))
        status, head, body, infos = await c.final_response()
        self.assertEqual((status, body), (200, b"Machine stopped\r\n"))
        self.assertEqual(infos[0], "Stopping virtual machine")
        self.assertEqual(self.query("SELECT vm_state FROM vm_runtimes"), [{"vm_state": "stopped"}])

    @d
    async def test_auth_token(self):
        """create_auth_token stores a 24 h multi-use token and answers it base64'd."""
        status, _, body = await (await self._req(b"/qvd/create_auth_token"))
        self.assertRegex(body, rb'^\{\n   "auth_params_id" : \d+,\n   "auth_token" : "[A-Za-z0-9+/=]+\\n"\n\}\n$')
        data = json.loads(body)
        token = base64.b64decode(data["auth_token"]).decode()
        self.assertTrue(data["auth_token"].endswith("\n"))
        row = self.query("SELECT user_id, multi_use, auth_params_id FROM user_tokens"
                         " WHERE token = %s", (token,))
        self.assertEqual(row, [{"user_id": self.user_id, "multi_use": True,
                                "auth_params_id": data["auth_params_id"]}])
        status, _, body = await (await self._req(b"/qvd/authenticate_user?store_auth=1"))
        self.assertEqual(list(json.loads(body)), ["auth_params_id"])
        status, _, body = await (await self._req(b"/qvd/authenticate_user"))
        self.assertEqual(body, b"{}\n")

    async def _req(self, path):
        c = await self.client()
        c.send(b"GET %s HTTP/1.1\r\nAuthorization: %s\r\n\r\n" % (path, BASIC.encode()))
        return c.response()


def error_after_102s(reason):
    return http.error_response(
        503, f"The requested virtual machine is not available: {reason}, retry later")




async def _request_final(self, data, client=None):
    c = client or await self.client()
    c.send(data)
    status, head, body, infos = await c.final_response()
    return head + body


# For requests that stream 102s, compare the final response only.
ConnectTests.request = _request_final


class RealAuthenticatorTests(L7RWireMixin, unittest.TestCase):
    async def start_l7r(self, **extra):
        svc = L7RService(self.config(**extra), "ssl:0:interface=127.0.0.1", reactor=reactor,
                         dsn=pg.role_dsn(self.dbname, "l7r"), authenticator=None)
        await svc.start()
        self.addCleanup(lambda: defer.ensureDeferred(svc.stop()))
        return svc

    @d
    async def test_basic_then_bearer(self):
        """With the configured plugin chain, Basic credentials list the VMs and a
        token from create_auth_token connects with Authorization: Bearer."""
        c = await self.client()
        c.send(b"GET /qvd/list_of_vm? HTTP/1.1\r\nAuthorization: %s\r\n\r\n" % BASIC.encode())
        status, _, body = await c.response()
        self.assertEqual((status, json.loads(body)[0]["id"]), (200, self.vm_id))
        c.send(b"GET /qvd/create_auth_token HTTP/1.1\r\nAuthorization: %s\r\n\r\n"
               % BASIC.encode())
        status, _, body = await c.response()
        bearer = json.loads(body)["auth_token"].strip()
        c2 = await self.client()
        c2.send(self.connect_request().replace(BASIC.encode(), b"Bearer " + bearer.encode()))
        status, head, body, infos = await c2.final_response()
        self.assertEqual(status, 101, (body, infos))
        await self.echo_through(c2)


class TakeoverTests(L7RWireMixin, unittest.TestCase):
    @d
    async def test_takeover(self):
        """A second client takes over a session held by a first one: the first is
        cut, the second gets 101 after 'Aborting contending session'."""
        first, _, _ = await self.connected()
        await self.echo_through(first)
        second = await self.client()
        second.send(self.connect_request())
        status, head, body, infos = await second.final_response()
        self.assertEqual(status, 101, (body, infos))
        self.assertIn(f"Aborting contending session for VM_ID: {self.vm_id}", infos)
        await first.lost
        await self.echo_through(second)
        self.assertEqual(self.query("SELECT user_state FROM vm_runtimes"),
                         [{"user_state": "connected"}])

    @d
    async def test_takeover_from_other_l7r(self):
        """Takeover works across two L7R processes of one node (NOTIFY
        qvd_cmd_for_user_on_host)."""
        other = await self.start_l7r(**{"l7r.poll_time.abort": "1000"})
        first, _, _ = await self.connected(await self.client(other))
        second, _, infos = await self.connected()
        await first.lost
        await self.echo_through(second)

    @d
    async def test_takeover_gives_up(self):
        """A session whose holder never lets go is 503 'Unable to acquire VM'."""
        await self.svc.stop()
        svc = await self.start_l7r(**{"internal.l7r.timeout.takeover": "0.5"})
        # A live claim of a process that ignores aborts: this test's own pid, another host.
        other_host = self.query("INSERT INTO hosts (name, address) VALUES ('x', '127.0.0.2')"
                                " RETURNING id")[0]["id"]
        self.query("INSERT INTO host_runtimes (host_id, state) VALUES (%s, 'running')", (other_host,))
        self.query("UPDATE vm_runtimes SET user_state = 'connected', l7r_host_id = %s,"
                   " l7r_pid = 1, l7r_session = 'x', host_id = %s, vm_state = 'running'",
                   (other_host, self.host_id))
        c = await self.client(svc)
        c.send(self.connect_request())
        status, _, body, infos = await c.final_response()
        self.assertEqual((status, body.decode()), (503, "The requested virtual machine is not"
                         " available: Unable to acquire VM, close other clients, retry later"))
        self.assertEqual(self.query("SELECT user_cmd FROM vm_runtimes"), [{"user_cmd": "abort"}])

    @d
    async def test_takeover_while_connecting(self):
        """A client still waiting for its VM is aborted (503) when another client
        takes the session over; the other one gets the VM."""
        self.hkd.enabled = False
        first = await self.client()
        first.send(self.connect_request())
        await first.wait(lambda: b"Waiting for VM" in first.buffer, what="the first waiting")
        self.hkd.enabled = True
        second, _, infos = await self.connected()
        self.assertIn(f"Aborting contending session for VM_ID: {self.vm_id}", infos)
        status, _, body, _ = await first.final_response()
        self.assertEqual((status, body.decode()), (503, (
            "The requested virtual machine is not available: Aborted by contending session VM"
            " VM_ID: %d, retry later" % self.vm_id)))
        await self.echo_through(second)

    @d
    async def test_dead_l7r_claim(self):
        """A claim left by a dead L7R process of this node expires at once."""
        self.query("UPDATE vm_runtimes SET user_state = 'connecting', l7r_host_id = %s,"
                   " l7r_pid = %s, l7r_session = 'gone'", (self.host_id, dead_pid()))
        c, _, infos = await self.connected()
        self.assertEqual(infos[0], f"Session acquired for VM_ID: {self.vm_id}")

    @d
    async def test_reset_at_start(self):
        """An L7R starting resets the sessions of this node left by dead L7R processes."""
        self.query("UPDATE vm_runtimes SET user_state = 'connected', l7r_host_id = %s,"
                   " l7r_pid = %s, l7r_session = 'gone', host_id = %s, vm_state = 'running'",
                   (self.host_id, dead_pid(), self.host_id))
        await self.start_l7r()
        self.assertEqual(self.query("SELECT user_state, l7r_pid FROM vm_runtimes"),
                         [{"user_state": "disconnected", "l7r_pid": None}])

    @d
    async def test_old_claim(self):
        """A 'connecting' claim older than l7r.takeover.claim_max_age expires."""
        other_host = self.query("INSERT INTO hosts (name, address) VALUES ('y', '127.0.0.3')"
                                " RETURNING id")[0]["id"]
        self.query("INSERT INTO host_runtimes (host_id, state) VALUES (%s, 'running')", (other_host,))
        self.query("UPDATE vm_runtimes SET user_state = 'connecting', l7r_host_id = %s,"
                   " l7r_pid = 1, l7r_session = 'old'", (other_host,))
        self.query("UPDATE vm_runtimes SET user_state_ts = now() - interval '1 hour'")
        c, _, infos = await self.connected()
        self.assertEqual(infos[0], f"Session acquired for VM_ID: {self.vm_id}")

    @d
    async def test_database_outage_keeps_relay(self):
        """Relays keep running while every database connection is cut."""
        c, _, _ = await self.connected()
        self.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                   " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        await sleep(0.3)
        await self.echo_through(c, b"still here")
        await c.close()
        for _ in range(300):
            if self.query("SELECT user_state FROM vm_runtimes")[0]["user_state"] == "disconnected":
                break
            await sleep(0.05)
        self.assertEqual(self.query("SELECT user_state FROM vm_runtimes"),
                         [{"user_state": "disconnected"}])


def dead_pid():
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def make_pki(directory):
    """
    A CA, a good and a revoked client certificate, a CRL revoking the latter,
    and a certificate of another CA; PEM files in C{directory}.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    os.makedirs(directory)
    now = datetime.datetime.now(datetime.timezone.utc)
    day = datetime.timedelta(days=1)
    files = {}

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def save(label, data):
        path = files[label] = os.path.join(directory, label + ".pem")
        with open(path, "wb") as f:
            f.write(data)

    def pem_key(key):
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    def ca(cn):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn))
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - day).not_valid_after(now + day)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))
        return key, cert

    def leaf(label, cn, ca_key, ca_cert):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - day).not_valid_after(now + day)
                .sign(ca_key, hashes.SHA256()))
        save(label, cert.public_bytes(serialization.Encoding.PEM))
        save(label + "_key", pem_key(key))
        return cert

    ca_key, ca_cert = ca("qvd test CA")
    save("ca", ca_cert.public_bytes(serialization.Encoding.PEM))
    leaf("good", "ana", ca_key, ca_cert)
    revoked = leaf("revoked", "bob", ca_key, ca_cert)
    other_key, other_cert = ca("another CA")
    leaf("stranger", "eve", other_key, other_cert)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
           .last_update(now - day).next_update(now + day)
           .add_revoked_certificate(x509.RevokedCertificateBuilder()
                                    .serial_number(revoked.serial_number)
                                    .revocation_date(now - day).build())
           .sign(ca_key, hashes.SHA256()))
    save("crl", crl.public_bytes(serialization.Encoding.PEM))
    return files


class TLSTests(L7RWireMixin, unittest.TestCase):
    def _handshake(self, version):
        ctx = stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = stdlib_ssl.CERT_NONE
        ctx.minimum_version = version
        ctx.maximum_version = version
        try:
            ctx.set_ciphers("ALL:@SECLEVEL=0")
        except stdlib_ssl.SSLError:
            pass
        with socket.create_connection(("127.0.0.1", self.svc.port.getHost().port), 5) as s:
            with ctx.wrap_socket(s) as t:
                return t.version(), t.cipher()

    @d
    async def test_old_tls_refused(self):
        """TLS 1.0 and 1.1 handshakes fail; TLS 1.2 and 1.3 work with ECDHE AEAD ciphers."""
        for version in (stdlib_ssl.TLSVersion.TLSv1, stdlib_ssl.TLSVersion.TLSv1_1):
            try:
                result = await threads.deferToThread(self._handshake, version)
            except (stdlib_ssl.SSLError, OSError):
                continue
            self.fail(f"{version} was accepted: {result}")
        v12, cipher = await threads.deferToThread(self._handshake, stdlib_ssl.TLSVersion.TLSv1_2)
        self.assertEqual(v12, "TLSv1.2")
        self.assertRegex(cipher[0], r"^ECDHE-.*(GCM|CHACHA20)")
        v13, _ = await threads.deferToThread(self._handshake, stdlib_ssl.TLSVersion.TLSv1_3)
        self.assertEqual(v13, "TLSv1.3")

    @d
    async def test_world_readable_key(self):
        """A world-readable key file stops the L7R with one clear error."""
        key = os.path.join(self.ssl_dir, "key.pem")
        os.chmod(key, 0o644)
        svc = L7RService(self.config(), "ssl:0:interface=127.0.0.1", reactor=reactor,
                         dsn=pg.role_dsn(self.dbname, "l7r"), authenticator=FakeAuthenticator)
        self.addCleanup(lambda: defer.ensureDeferred(svc.stop()))
        e = await self.assertFailure(defer.ensureDeferred(svc.start()), tls.TLSConfigError)
        self.assertEqual(str(e), f"the L7R's private key {key} is accessible by every user "
                                 f"(mode 0644); run: chmod 600 {key}")

    def _client_handshake(self, cert=None, key=None):
        ctx = stdlib_ssl.SSLContext(stdlib_ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = stdlib_ssl.CERT_NONE
        if cert:
            ctx.load_cert_chain(cert, key)
        with socket.create_connection(("127.0.0.1", self.svc.port.getHost().port), 5) as s:
            with ctx.wrap_socket(s) as t:
                t.sendall(b"GET /qvd/ping HTTP/1.1\n\n")
                return t.recv(100)

    @d
    async def test_client_certificates(self):
        """With l7r.client.cert.require, only clients with a certificate of the CA
        that the CRL does not revoke get through."""
        ca_dir = os.path.join(self.tmp, "pki")
        files = make_pki(ca_dir)
        shutil.copy(files["ca"], os.path.join(self.ssl_dir, "ca.pem"))
        shutil.copy(files["crl"], os.path.join(self.ssl_dir, "crl.pem"))
        await self.svc.stop()
        self.svc = await self.start_l7r(**{"l7r.client.cert.require": "1"})
        answer = await threads.deferToThread(self._client_handshake, files["good"], files["good_key"])
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 OK"), answer)
        for cert, key in ((None, None), (files["revoked"], files["revoked_key"]),
                          (files["stranger"], files["stranger_key"])):
            try:
                answer = await threads.deferToThread(self._client_handshake, cert, key)
            except (stdlib_ssl.SSLError, OSError):
                continue
            self.assertEqual(answer, b"", cert)

    def _peer_cert(self):
        port = self.svc.port.getHost().port
        return stdlib_ssl.get_server_certificate(("127.0.0.1", port))

    @d
    async def test_cert_swap(self):
        """A new certificate in the files is used for new connections; a live
        session keeps running."""
        c, _, _ = await self.connected()
        before = await threads.deferToThread(self._peer_cert)
        new_dir = os.path.join(self.tmp, "new")
        tls.self_signed(new_dir, "localhost")
        for name in ("key.pem", "cert.pem"):
            shutil.copy(os.path.join(new_dir, name), os.path.join(self.ssl_dir, name + ".new"))
            os.replace(os.path.join(self.ssl_dir, name + ".new"), os.path.join(self.ssl_dir, name))
        for _ in range(100):
            after = await threads.deferToThread(self._peer_cert)
            if after != before:
                break
            await sleep(0.1)
        with open(os.path.join(new_dir, "cert.pem")) as f:
            self.assertEqual(after.strip(), f.read().strip())
        await self.echo_through(c, b"after the swap")

    @d
    async def test_cert_from_database(self):
        """A certificate stored in ssl_configs replaces the files' (NOTIFY
        qvd_config_changed)."""
        new_dir = os.path.join(self.tmp, "db")
        key, cert = tls.self_signed(new_dir, "localhost")
        with open(key) as k, open(cert) as ce:
            self.query("INSERT INTO ssl_configs (key, value) VALUES ('l7r.ssl.key', %s),"
                       " ('l7r.ssl.cert', %s)", (k.read(), ce.read()))
        with open(cert) as f:
            expected = f.read().strip()
        for _ in range(100):
            if (await threads.deferToThread(self._peer_cert)).strip() == expected:
                break
            await sleep(0.1)
        else:
            self.fail("the database certificate was not picked up")
