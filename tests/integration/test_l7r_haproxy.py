"""
The L7R behind the real HAProxy (Debian's), with the PROXY protocol v2: a
real L7R service in-process on the real PostgreSQL (as tests/test_l7r_wire.py
runs it), HAProxy in TCP mode in front of it with C{send-proxy-v2} and the
C{/qvd/ping} health check over TLS. Clients connect to HAProxy from
127.0.0.5 and 127.0.0.6; HAProxy connects to the L7R from 127.0.0.2, the
configured balancer. Everything on 127.0.0.x; HAProxy and its directory are
removed after each test.
"""

import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile

from twisted.internet import defer, endpoints, reactor, ssl, threads
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from qvd.protocols import http
from qvd.protocols.proxy import ProxyHeader, encode_v2
from qvd.testing.l7rclient import RawClient
from tests.test_l7r_wire import BASIC, L7RWireMixin, sleep

BALANCER = "127.0.0.2"
PING = b"GET /qvd/ping HTTP/1.1\r\n\r\n"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def show_stat(path):
    """HAProxy's `show stat` on its stats socket, as dicts."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    text = data.decode().lstrip("# ")
    return list(csv.DictReader(io.StringIO(text)))


class HAProxyTests(L7RWireMixin, unittest.TestCase):
    overrides = {"l7r.proxy_protocol.from": BALANCER}

    def setUp(self):
        if shutil.which("haproxy") is None:
            raise AssertionError("haproxy is not installed (deploy/setup.sh installs it)")
        d = super().setUp()
        d.addCallback(lambda _: defer.ensureDeferred(self.start_haproxy()))
        return d

    async def start_haproxy(self):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        # short: a UNIX socket's path has at most 97 bytes for HAProxy
        self.hadir = tempfile.mkdtemp(prefix="qvd-haproxy-")
        self.addCleanup(shutil.rmtree, self.hadir, True)
        self.stats = os.path.join(self.hadir, "stats.sock")
        self.port = free_port()
        l7r = self.svc.port.getHost().port
        config = os.path.join(self.hadir, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(f"""\
global
    stats socket {self.stats} mode 600 level admin
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout check 2s
frontend qvd
    bind 127.0.0.1:{self.port}
    default_backend qvd_l7r
backend qvd_l7r
    balance leastconn
    option httpchk GET /qvd/ping HTTP/1.1
    http-check expect status 200
    default-server send-proxy-v2 check check-ssl verify none check-send-proxy inter 200ms fall 1 rise 1
    server l7r 127.0.0.1:{l7r} source {BALANCER}
""")
        self.log = open(os.path.join(self.hadir, "haproxy.log"), "w")
        self.addCleanup(self.log.close)
        self.haproxy = subprocess.Popen(["haproxy", "-db", "-f", config], stdout=self.log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.addCleanup(self.stop_haproxy)
        await self.server_state("UP", "L7OK")

    def stop_haproxy(self):
        if self.haproxy.poll() is None:
            os.killpg(self.haproxy.pid, signal.SIGTERM)
            try:
                self.haproxy.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.haproxy.pid, signal.SIGKILL)
                self.haproxy.wait()

    async def server_state(self, status, check, timeout=10.0):
        """Wait until HAProxy's stats say the L7R has C{status} after a C{check}; its row."""
        row = None
        for _ in range(int(timeout / 0.1)):
            if self.haproxy.poll() is not None:
                break
            if os.path.exists(self.stats):
                rows = await threads.deferToThread(show_stat, self.stats)
                row = next((r for r in rows if r["svname"] == "l7r"), None)
                if row and row["status"] == status and row["check_status"] == check:
                    return row
            await sleep(0.1)
        with open(self.log.name) as f:
            raise AssertionError(f"HAProxy's L7R did not become {status}/{check}: {row};"
                                 f" HAProxy's log: {f.read()}")

    async def via_haproxy(self, source):
        """A TLS client of the L7R through HAProxy, from address C{source}."""
        endpoint = endpoints.SSL4ClientEndpoint(reactor, "127.0.0.1", self.port,
                                                ssl.CertificateOptions(), bindAddress=(source, 0))
        c = await endpoints.connectProtocol(endpoint, RawClient(reactor))
        self.addCleanup(lambda: c.closed or c.transport.loseConnection())
        return c

    async def direct(self, source, tls=False):
        """A TCP client straight to the L7R, from address C{source}."""
        port = self.svc.port.getHost().port
        if tls:
            endpoint = endpoints.SSL4ClientEndpoint(reactor, "127.0.0.1", port,
                                                    ssl.CertificateOptions(),
                                                    bindAddress=(source, 0))
        else:
            endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port,
                                                    bindAddress=(source, 0))
        c = await endpoints.connectProtocol(endpoint, RawClient(reactor))
        self.addCleanup(lambda: c.closed or c.transport.loseConnection())
        return c

    async def closed_unanswered(self, c):
        await c.wait(lambda: c.closed, what="the close")
        self.assertEqual(bytes(c.buffer), b"")

    def logged(self, fragment):
        return [e for e in self.events if fragment in e.get("log_format", "")]

    async def test_health_check(self):
        """
        HAProxy's check (GET /qvd/ping over TLS with a PROXY v2 header) marks
        the L7R up with a 200; a blocked node answers 503 and is taken out,
        and is put back once unblocked.
        """
        row = await self.server_state("UP", "L7OK")
        self.assertEqual(row["check_code"], "200")
        self.query("UPDATE host_runtimes SET blocked = true")
        row = await self.server_state("DOWN", "L7STS")
        self.assertEqual(row["check_code"], "503")
        self.query("UPDATE host_runtimes SET blocked = false")
        await self.server_state("UP", "L7OK")
        self.assertEqual(self.logged("PROXY protocol"), [])     # no check was refused

    async def test_client_address(self):
        """
        Through HAProxy the L7R sees the client's own address: the
        per-address cap applies to 127.0.0.5 and not to 127.0.0.6, a refused
        login is logged from 127.0.0.5 and the session's user_ip is 127.0.0.5.
        """
        self.svc.caps.per_address = 2
        first = await self.via_haproxy("127.0.0.5")
        second = await self.via_haproxy("127.0.0.5")
        for c in (first, second):
            c.send(PING)
            status, head, body = await c.response()
            self.assertEqual((status, body), (200, b"I am alive!\r\n"))
        third = await self.via_haproxy("127.0.0.5")
        await self.closed_unanswered(third)
        [refusal] = self.logged("over the caps")
        self.assertEqual(refusal["ip"], "127.0.0.5")
        other = await self.via_haproxy("127.0.0.6")
        other.send(PING)
        self.assertEqual((await other.response())[0], 200)

        wrong = await self.via_haproxy("127.0.0.6")
        wrong.send(b"GET /qvd/list_of_vm HTTP/1.1\r\nAuthorization: Basic YW5hOndyb25n\r\n\r\n")
        self.assertEqual((await wrong.response())[0], 401)
        self.assertEqual([e["ip"] for e in self.logged("authentication refused")],
                         ["127.0.0.6"])

        first.transport.loseConnection()
        await first.lost
        await self.eventually_cap_free("127.0.0.5", 1)
        c, head, infos = await self.connected(await self.via_haproxy("127.0.0.5"))
        self.assertEqual(self.query("SELECT user_ip FROM vm_runtimes WHERE vm_id = %s",
                                    (self.vm_id,)), [{"user_ip": "127.0.0.5"}])
        self.assertEqual([e["ip"] for e in self.logged("connected from")], ["127.0.0.5"])

    async def eventually_cap_free(self, host, held):
        for _ in range(100):
            if self.svc.caps.held(host) <= held:
                return
            await sleep(0.02)
        self.assertLessEqual(self.svc.caps.held(host), held)

    async def test_header_from_elsewhere_refused(self):
        """
        A PROXY header sent straight to the L7R from an address that is not
        the balancer is refused: the connection is closed, unanswered, and
        the refusal logged with the real address; without a header, that
        address is served as itself.
        """
        forged = ProxyHeader(2, "PROXY", "TCP4", ("198.51.100.1", 1), ("127.0.0.1", 8443))
        c = await self.direct("127.0.0.7")
        c.send(encode_v2(forged) + PING)
        await self.closed_unanswered(c)
        [refusal] = self.logged("PROXY protocol")
        self.assertEqual(refusal["ip"], "127.0.0.7")
        self.assertIn("not a balancer", refusal["reason"])
        plain = await self.direct("127.0.0.7", tls=True)
        plain.send(PING)
        self.assertEqual(await plain.raw_response(),
                         http.response_with_body(200, "text/plain", b"I am alive!\r\n"))
        self.assertEqual(self.svc.caps.held("198.51.100.1"), 0)

    async def test_balancer_without_header_closed(self):
        """A connection from the balancer's address without a PROXY header is closed."""
        c = await self.direct(BALANCER, tls=True)
        c.send(PING)
        await self.closed_unanswered(c)
        self.assertTrue(any("no valid PROXY header" in e["reason"]
                            for e in self.logged("PROXY protocol")))


class ShippedConfigTests(unittest.TestCase):
    def test_shipped_config(self):
        """deploy/haproxy.cfg is valid for this HAProxy."""
        done = subprocess.run(["haproxy", "-c", "-f", os.path.join(ROOT, "deploy", "haproxy.cfg")],
                              capture_output=True, text=True)
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
