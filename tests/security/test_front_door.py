"""
The front door against hostile clients (issue 8, "a front door that cannot be
turned against its users"): a real L7R service over real TLS sockets with
the real PostgreSQL, as tests/test_l7r_wire.py runs it. Raw sockets are
driven from a thread (blocking calls never run in the reactor thread).
"""

import base64
import socket
import ssl as stdlib_ssl
import statistics
import time

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from qvd.l7r.service import L7RService
from qvd.testing import pg
from tests.test_auth import argon2_hash
from tests.test_l7r_wire import BASIC, L7RWireMixin, d, sleep


def _closed_by_peer(sock, within):
    """
    Seconds until the peer closed C{sock} (EOF or reset), or None if it
    stayed open C{within} seconds.
    """
    began = time.monotonic()
    sock.settimeout(within)
    try:
        while True:
            if not sock.recv(4096):
                break
    except (ConnectionResetError, BrokenPipeError):
        pass
    except (socket.timeout, TimeoutError):
        return None
    return time.monotonic() - began


def _silent_sockets(port, count):
    return [socket.create_connection(("127.0.0.1", port)) for _ in range(count)]


def _login(port, login, password, source="127.0.0.1"):
    """
    (HTTP status, seconds) of one list_of_vm with Basic credentials, over a
    new TLS connection from C{source} (any 127/8 address is this machine).
    """
    ctx = stdlib_ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, stdlib_ssl.CERT_NONE
    raw = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    with ctx.wrap_socket(raw) as s:
        basic = base64.b64encode(f"{login}:{password}".encode()).decode()
        began = time.monotonic()
        s.sendall(f"GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: Basic {basic}\r\n"
                  f"\r\n".encode())
        head = b""
        while b"\r\n" not in head:
            chunk = s.recv(4096)
            if not chunk:
                break
            head += chunk
        return int(head.split(b" ", 2)[1]), time.monotonic() - began


class RealAuthenticatorMixin(L7RWireMixin):
    """The L7R with its real authenticator (argon2id in its pool of processes)."""

    async def start_l7r(self, **extra):
        svc = L7RService(self.config(**extra), "ssl:0:interface=127.0.0.1", reactor=reactor,
                         dsn=pg.role_dsn(self.dbname, "l7r"))
        await svc.start()
        self.addCleanup(lambda: defer.ensureDeferred(svc.stop()))
        return svc


class LoginLimitTests(RealAuthenticatorMixin, unittest.TestCase):
    """
    The real authenticator (argon2id hashes) behind the real TLS listener.
    """
    overrides = {"l7r.auth.failure.delay": "0.6", "l7r.auth.ratelimit.login.max": "5"}

    def setUp(self):
        d = super().setUp()

        def bob(_):
            self.query("INSERT INTO tenants (name) VALUES ('sec')")
            self.query("INSERT INTO users (tenant_id, login, password) SELECT id, 'bob', %s"
                       " FROM tenants WHERE name = 'sec'", (argon2_hash("right"),))
        return d.addCallback(bob)

    def attempts(self, *calls):
        port = self.svc.port.getHost().port
        return threads.deferToThread(lambda: [_login(port, *c) for c in calls])

    @d
    async def test_attacker_elsewhere_cannot_lock_user_out(self):
        """
        Six wrong passwords for bob@sec from one address lock bob@sec out of
        that address only: bob logs in from his own address at once.
        """
        wrong = await self.attempts(*[("bob@sec", f"guess{i}", "127.0.0.2") for i in range(6)])
        self.assertEqual([s for s, _ in wrong], [401] * 6)
        self.assertEqual((await self.attempts(("bob@sec", "right", "127.0.0.2")))[0][0], 401)
        self.assertEqual((await self.attempts(("bob@sec", "right", "127.0.0.1")))[0][0], 200)

    @d
    async def test_spellings_share_one_count(self):
        """
        Five wrong guesses under five spellings of bob@sec use up bob@sec's
        five: the right password is then refused from that address.
        """
        spellings = ["BOB@sec", "bob@ sec", " bob@SEC", "Bob@Sec ", "bob@sec"]
        self.assertEqual([s for s, _ in await self.attempts(
            *[(login, "x", "127.0.0.3") for login in spellings])], [401] * 5)
        self.assertEqual((await self.attempts(("bob@sec", "right", "127.0.0.3")))[0][0], 401)
        self.assertEqual((await self.attempts(("bob@sec", "right", "127.0.0.5")))[0][0], 200)

    @d
    async def test_parallel_guesses_bounded(self):
        """
        Of 40 parallel guesses from one address at most 5 passwords are
        checked (attempts in flight count); all 40 are refused alike.
        """
        checked = []
        original = self.svc.authenticator._verify

        def verify(ctx, password):
            checked.append(password)
            return original(ctx, password)
        self.svc.authenticator._verify = verify
        port = self.svc.port.getHost().port
        guesses = await defer.gatherResults([
            threads.deferToThread(_login, port, "bob@sec", f"g{i}", "127.0.0.4")
            for i in range(40)])
        self.assertEqual({s for s, _ in guesses}, {401})
        self.assertLessEqual(len(checked), 5)
        self.assertGreater(len(checked), 0)

    @d
    async def test_locked_and_wrong_take_the_same_time(self):
        """
        A locked answer takes as long as a wrong password's (both no earlier
        than l7r.auth.failure.delay, 0.6 s here): medians within 50 ms.
        """
        wrong = await self.attempts(*[("bob@sec", f"w{i}", "127.0.0.6") for i in range(5)])
        locked = await self.attempts(*[("bob@sec", "right", "127.0.0.6") for _ in range(5)])
        self.assertEqual({s for s, _ in wrong + locked}, {401})
        w = statistics.median(t for _, t in wrong)
        k = statistics.median(t for _, t in locked)
        # 10 ms of slack: the reactor schedules on the wall clock, the client
        # measures on the monotonic one (they drift apart by up to 0.5 %).
        self.assertGreaterEqual(min(t for _, t in wrong + locked), 0.59)
        self.assertLess(abs(w - k), 0.05, f"wrong {w:.3f} s, locked {k:.3f} s")


class LoginStormTests(RealAuthenticatorMixin, unittest.TestCase):
    """
    Monday 9:00 in small: more password logins at once than the password
    checks take (1 process, 2 waiting). The surplus is answered 503 "busy,
    retry" at once, not after a timeout, and not counted as a failure: each
    user then logs in.
    """
    overrides = {"l7r.auth.hash.workers": "1", "l7r.auth.hash.queue": "2",
                 "l7r.auth.failure.delay": "0"}
    USERS = 12

    def setUp(self):
        d = super().setUp()

        def users(_):
            self.query("INSERT INTO tenants (name) VALUES ('storm')")
            hashed = argon2_hash("pw")
            for i in range(self.USERS):
                self.query("INSERT INTO users (tenant_id, login, password) SELECT id, %s, %s"
                           " FROM tenants WHERE name = 'storm'", (f"u{i}", hashed))
        return d.addCallback(users)

    @d
    async def test_surplus_is_busy_then_succeeds(self):
        port = self.svc.port.getHost().port
        first = await defer.gatherResults([
            threads.deferToThread(_login, port, f"u{i}@storm", "pw", f"127.0.1.{i + 1}")
            for i in range(self.USERS)])
        statuses = [status for status, _ in first]
        self.assertEqual(set(statuses) - {200, 503}, set(), statuses)
        self.assertIn(503, statuses, "every login was taken: the bound did not act")
        self.assertGreaterEqual(statuses.count(200), 1)
        busy = [i for i, status in enumerate(statuses) if status == 503]
        self.assertLess(max(t for status, t in first if status == 503), 1.0,
                        "a busy answer must not wait")
        self.assertGreater(self.svc.hash_pool.refused, 0)
        again = await threads.deferToThread(
            lambda: [_login(port, f"u{i}@storm", "pw", f"127.0.1.{i + 1}") for i in busy])
        self.assertEqual([status for status, _ in again], [200] * len(busy))


class PipeliningTests(L7RWireMixin, unittest.TestCase):

    @d
    async def test_pipelined_requests_answered_in_order(self):
        """Requests sent in one write are all answered, in the order they came."""
        c = await self.client()
        listing = b"GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: %s\r\n\r\n" % BASIC.encode()
        c.send(listing + b"GET /nothing HTTP/1.1\r\n\r\n" + listing
               + b"GET /qvd/ping HTTP/1.1\r\n\r\n")
        statuses = [(await c.response())[0] for _ in range(4)]
        self.assertEqual(statuses, [200, 404, 200, 200])

    @d
    async def test_request_arriving_while_busy(self):
        """A request that arrives while the previous one is answered is answered after it."""
        c = await self.client()
        listing = b"GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: %s\r\n\r\n" % BASIC.encode()
        c.send(listing)
        c.send(b"GET /qvd/ping HTTP/1.1\r\n\r\n")
        c.send(listing)
        self.assertEqual([(await c.response())[0] for _ in range(3)], [200, 200, 200])


class DeadlineTests(L7RWireMixin, unittest.TestCase):
    overrides = {"l7r.timeout.handshake": "0.5", "l7r.timeout.idle": "0.7",
                 "l7r.timeout.close": "0.5"}

    @d
    async def test_silent_connections_closed(self):
        """
        50 connections that never send a ClientHello are closed by the L7R
        within its handshake deadline (0.5 s here), and it holds none of them.
        """
        port = self.svc.port.getHost().port
        socks = await threads.deferToThread(_silent_sockets, port, 50)
        try:
            waits = await threads.deferToThread(
                lambda: [_closed_by_peer(s, 5) for s in socks])
        finally:
            for s in socks:
                s.close()
        self.assertNotIn(None, waits)
        self.assertLess(max(waits), 3.0)
        self.assertEqual((self.svc.l7r.connections, self.svc.caps.open), (set(), 0))

    @d
    async def test_idle_tls_connection_closed(self):
        """
        A client that finishes the handshake, then never sends a request and
        never reads, loses its connection at the idle deadline all the same.
        """
        port = self.svc.port.getHost().port

        def idle():
            ctx = stdlib_ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, stdlib_ssl.CERT_NONE
            with ctx.wrap_socket(socket.create_connection(("127.0.0.1", port))) as s:
                return _closed_by_peer(s, 5)
        waited = await threads.deferToThread(idle)
        self.assertIsNotNone(waited)
        self.assertLess(waited, 3.0)
        await sleep(0.1)
        self.assertEqual(self.svc.l7r.connections, set())


class CapTests(L7RWireMixin, unittest.TestCase):
    overrides = {"l7r.connections.per_address": "5", "l7r.timeout.handshake": "5"}

    @d
    async def test_per_address_cap(self):
        """
        One address holds at most l7r.connections.per_address connections;
        the next is closed at once, and a place given back is usable again.
        """
        port = self.svc.port.getHost().port
        socks = await threads.deferToThread(_silent_sockets, port, 6)
        try:
            refused = await threads.deferToThread(_closed_by_peer, socks[5], 2)
            self.assertIsNotNone(refused, "the sixth connection was kept open")
            self.assertLess(refused, 1.0)
            self.assertEqual(self.svc.caps.held("127.0.0.1"), 5)
            socks[0].close()
            await sleep(0.2)
            c = await self.client()
            c.send(b"GET /qvd/ping HTTP/1.1\r\n\r\n")
            self.assertEqual((await c.response())[0], 200)
        finally:
            for s in socks:
                s.close()
