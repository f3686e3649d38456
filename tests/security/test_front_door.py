"""
The front door against hostile clients (issue 8, "a front door that cannot be
turned against its users"): a real L7R service over real TLS sockets with
the real PostgreSQL, as tests/test_l7r_wire.py runs it. Raw sockets are
driven from a thread (blocking calls never run in the reactor thread).
"""

import socket
import ssl as stdlib_ssl
import time

from twisted.internet import threads
from twisted.trial import unittest

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
