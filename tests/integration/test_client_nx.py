"""
qvd-client against a fake L7R: real TLS, real nxproxy, real nxagent, real Xvfb.

The fake L7R (L{FakeL7R}) is a TLS server on 127.0.0.1, port 0, with a
certificate made for the test. It answers list_of_vm, streams 102 lines for
connect_to_vm, connects to an nxagent the test started and answers 101, then
relays bytes both ways like the real L7R. The client draws into an Xvfb the
test started; the test paints nxagent's root window and looks for the colour
on the Xvfb screen.
"""

import datetime
import io
import ipaddress
import json
import os
import random
import shutil
import socket
import sys
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor, ssl, threads, utils
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.trial import unittest

from qvd.client import cli, errors
from qvd.client._x11 import X11Connection, X11Error
from qvd.client.headless import Xvfb, grab
from qvd.client.protocol import BasicAuth, ConnectParameters

COLOUR = 0x21C45A  # what the "desktop" paints its root with
HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_certificate(directory, ips=("127.0.0.1",), dns=("localhost",), ca=True):
    """
    A self-signed certificate (with C{ca}, marked as a CA) for the given
    names; returns (cert path, key path).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (dns or ips)[0])])
    now = datetime.datetime.now(datetime.timezone.utc)
    names = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(names), critical=False))
    if ca:
        cert = cert.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    cert = cert.sign(key, hashes.SHA256())
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.TraditionalOpenSSL,
                                  serialization.NoEncryption()))
    return cert_path, key_path


class _Upstream(Protocol):
    def __init__(self, client):
        self.client = client

    def connectionMade(self):
        self.client.upstream_ready(self)

    def dataReceived(self, data):
        self.client.transport.write(data)

    def connectionLost(self, reason=None):
        self.client.close()


class FakeL7RProtocol(Protocol):
    """
    Serves requests one after another on a connection; after a 101, relays.
    """

    def connectionMade(self):
        self.buffer = b""
        self.lost = False
        self.upgraded = False
        self.upstream = None
        self.pending = []
        self.factory.connections.append(self)

    def dataReceived(self, data):
        if self.upgraded:
            if self.upstream is None:
                self.pending.append(data)
            else:
                self.upstream.transport.write(data)
            return
        self.buffer += data
        while b"\r\n\r\n" in self.buffer and not self.upgraded:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.factory.requests.append((len(self.factory.connections), head + b"\r\n\r\n"))
            self.handle(head.decode())

    def respond(self, code, reason, body=b"", ctype="text/plain"):
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s"
            % (code, reason.encode(), ctype.encode(), len(body), body))

    def handle(self, head):
        lines = head.split("\r\n")
        path = lines[0].split(" ")[1]
        headers = dict(line.split(": ", 1) for line in lines[1:])
        f = self.factory
        if headers.get("Authorization") != f.expected_auth:
            self.transport.write(b"HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic "
                                 b"realm=\"QVD\"\r\nContent-Type: text/plain\r\n"
                                 b"Content-Length: 0\r\n\r\n")
        elif path.startswith("/qvd/list_of_vm?"):
            self.respond(200, "OK", json.dumps(f.vms, indent=3).encode(), "application/json")
            if f.close_after_list:
                self.transport.loseConnection()
        elif path.startswith("/qvd/connect_to_vm?"):
            if f.connect_status is not None:
                code, body = f.connect_status
                self.respond(code, "Error", body)
                return
            if f.payload is not None:
                # No nxagent: 101 and the payload in one write, then close.
                self.upgraded = True
                self.pending = []
                self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\n"
                                     b"X-QVD-Slave-Key: " + b"K" * 64 + b"\r\n\r\n" + f.payload)
                self.transport.loseConnection()
                return
            for text in ("Session acquired for VM_ID: 1", "Starting virtual machine",
                         "Connecting X session for VM_ID: 1", "Connection established"):
                self.transport.write(b"HTTP/1.1 102 Processing\r\nX-QVD-VM-Info: %s\r\n\r\n"
                                     % text.encode())
            self.upgraded = True
            self.transport.pauseProducing()
            factory = Factory.forProtocol(lambda: _Upstream(self))
            from twisted.internet.endpoints import TCP4ClientEndpoint
            TCP4ClientEndpoint(reactor, "127.0.0.1", f.nx_port).connect(factory).addErrback(
                lambda failure: self.respond(503, "Service Unavailable", b"no nxagent"))
        else:
            self.respond(404, "Not Found")

    def upstream_ready(self, upstream):
        self.upstream = upstream
        self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nX-QVD-Slave-Key: "
                             + b"K" * 64 + b"\r\n\r\n")
        upstream.transport.registerProducer(self.transport, True)
        self.transport.registerProducer(upstream.transport, True)
        for data in self.pending + ([self.buffer] if self.buffer else []):
            upstream.transport.write(data)
        self.pending = []
        self.transport.resumeProducing()

    def close(self):
        """
        End the session from the server side.
        """
        if self.upstream is not None:
            self.upstream.transport.unregisterProducer()
            self.transport.unregisterProducer()
            self.upstream.transport.loseConnection()
        self.transport.loseConnection()

    def connectionLost(self, reason=None):
        self.lost = True
        if self.upstream is not None:
            self.upstream.transport.unregisterProducer()
            self.upstream.transport.loseConnection()


class FakeL7R(Factory):
    protocol = FakeL7RProtocol

    def __init__(self, login="alice@acme", password="pw", nx_port=None):
        self.requests = []
        self.connections = []
        self.vms = [{"id": 1, "state": "stopped", "name": "desk1", "blocked": 0,
                     "is_application": 0}]
        self.nx_port = nx_port
        self.connect_status = None
        self.close_after_list = False
        self.payload = None
        self.expected_auth = BasicAuth(login, password).header()


def free_tcp_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def free_display():
    for _ in range(100):
        n = random.randrange(600, 1000)
        if not (os.path.exists(f"/tmp/.X{n}-lock") or os.path.exists(f"/tmp/.X11-unix/X{n}")):
            return n
    raise RuntimeError("no free X display number between 600 and 1000")


class _AgentProcess(ProcessProtocol):
    def __init__(self):
        self.output = b""
        self.ready = defer.Deferred()
        self.ended = defer.Deferred()

    def childDataReceived(self, fd, data):
        self.output += data
        if b"Waiting for connection" in self.output and not self.ready.called:
            self.ready.callback(None)

    def processEnded(self, reason):
        if not self.ready.called:
            self.ready.errback(RuntimeError("nxagent exited: " + self.output[-500:].decode()))
        self.ended.callback(None)


def paint(display, colour, timeout):
    """
    Connect to C{display} (retrying until it answers), paint its root
    C{colour}; return the open connection (closing it could reset the server).
    """
    import time
    deadline = time.monotonic() + timeout
    while True:
        try:
            x = X11Connection.open(display, timeout=1.0)
            x.set_root_background(colour)
            return x
        except X11Error:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def wait_for_colour(display, colour, timeout):
    import time
    deadline = time.monotonic() + timeout
    while True:
        image = grab(display)
        if image.count(colour) > 1000:
            return image
        if time.monotonic() > deadline:
            return image
        time.sleep(0.2)


def read_png_rgb(path):
    """
    Decode the PNGs qvd.client._x11 writes (8-bit RGB, filter 0).
    """
    import struct
    import zlib
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    i, idat, width, height = 8, b"", 0, 0
    while i < len(data):
        length, kind = struct.unpack(">I4s", data[i:i + 8])
        body = data[i + 8:i + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        i += 12 + length
    raw = zlib.decompress(idat)
    stride = width * 3 + 1
    rows = [raw[y * stride + 1:(y + 1) * stride] for y in range(height)]
    from qvd.client._x11 import RGBImage
    return RGBImage(width, height, b"".join(rows))


class _Base(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="qvdt-client-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.cert, self.key = make_certificate(self.tmp)
        self.server = FakeL7R()

    def listen(self, cert=None, key=None):
        with open(cert or self.cert) as f:
            pem = f.read()
        with open(key or self.key) as f:
            pem += f.read()
        options = ssl.PrivateCertificate.loadPEM(pem).options()
        port = reactor.listenSSL(0, self.server, options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(self._close_connections)
        return port.getHost().port

    def _close_connections(self):
        for c in self.server.connections:
            if not c.lost:
                c.transport.abortConnection()

    def settings(self, port, **kw):
        base = dict(command="connect", host="127.0.0.1", port=port,
                    auth=BasicAuth("alice@acme", "pw"),
                    user_dir=os.path.join(self.tmp, "home", ".qvd"),
                    ca_file=self.cert, display=":0", connect_timeout=5,
                    response_timeout=10)
        base.update(kw)
        return cli.Settings(**base)

    def run_cli(self, argv, env=None):
        """
        Run qvd-client in a child process; fires with (out, err, code).
        """
        environ = {"PATH": os.environ.get("PATH", ""), "HOME": self.tmp,
                   "PYTHONPATH": HERE}
        environ.update(env or {})
        return utils.getProcessOutputAndValue(
            sys.executable, ["-c", "from qvd.client.cli import main; main()"] + argv,
            env=environ, path=self.tmp)


class TLSTests(_Base):

    @defer.inlineCallbacks
    def test_list_verified_with_ca(self):
        """
        With --ca, qvd-client verifies the server, sends list_of_vm exactly as
        the Perl client does and prints the VMs (id, name, state, blocked).
        """
        port = self.listen()
        out, err, code = yield self.run_cli(
            ["--host", "127.0.0.1", "--port", str(port), "--user", "alice@acme",
             "--ca", self.cert, "list"], env={"QVD_PASSWORD": "pw"})
        self.assertEqual(code, 0, err)
        self.assertEqual(out.decode().split("\n")[1].split(), ["1", "desk1", "stopped", "no"])
        self.assertEqual(self.server.requests, [(1, cli.list_of_vm_request(
            BasicAuth("alice@acme", "pw")))])

    @defer.inlineCallbacks
    def test_unknown_ca(self):
        """
        A certificate not signed by a trusted CA stops the client with one
        line naming the host, the reason, and suggesting --ca; exit code 3.
        """
        port = self.listen()
        out, err, code = yield self.run_cli(
            ["--host", "127.0.0.1", "--port", str(port), "--user", "a", "--password", "b", "list"])
        self.assertEqual(code, errors.EXIT_NETWORK)
        text = err.decode().strip()
        self.assertEqual(len(text.splitlines()), 1, text)
        self.assertIn(f"127.0.0.1:{port}", text)
        self.assertIn("self-signed certificate", text)
        self.assertIn("--ca", text)
        self.assertEqual(self.server.requests, [])

    @defer.inlineCallbacks
    def test_l7r_self_signed_by_name(self):
        """
        A self-signed certificate like the L7R's demo one (a DNS name only,
        no CA flag) given with --ca is accepted when --host is that name.
        """
        other = os.path.join(self.tmp, "byname")
        os.mkdir(other)
        cert, key = make_certificate(other, ips=(), dns=("localhost",), ca=False)
        port = self.listen(cert, key)
        out, err, code = yield self.run_cli(
            ["--host", "localhost", "--port", str(port), "--user", "alice@acme",
             "--password", "pw", "--ca", cert, "list"])
        self.assertEqual(code, 0, err)
        self.assertIn(b"desk1", out)

    @defer.inlineCallbacks
    def test_wrong_host_name(self):
        """
        A trusted certificate for another host name is refused, saying so.
        """
        other = os.path.join(self.tmp, "other")
        os.mkdir(other)
        cert, key = make_certificate(other, ips=(), dns=("other.example",))
        port = self.listen(cert, key)
        out, err, code = yield self.run_cli(
            ["--host", "127.0.0.1", "--port", str(port), "--user", "a", "--password", "b",
             "--ca", cert, "list"])
        self.assertEqual(code, errors.EXIT_NETWORK)
        self.assertIn("not valid for '127.0.0.1'", err.decode())
        self.assertIn("other.example", err.decode())

    @defer.inlineCallbacks
    def test_insecure(self):
        """
        --insecure skips verification after printing a warning.
        """
        port = self.listen()
        out, err, code = yield self.run_cli(
            ["--host", "127.0.0.1", "--port", str(port), "--user", "alice@acme",
             "--password", "pw", "--insecure", "list"])
        self.assertEqual(code, 0, err)
        self.assertIn("warning: not verifying the certificate of 127.0.0.1", err.decode())
        self.assertIn(b"desk1", out)

    @defer.inlineCallbacks
    def test_plain_tcp(self):
        """
        With client.use_ssl off the same protocol runs over plain TCP.
        """
        port = reactor.listenTCP(0, self.server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(self._close_connections)
        output = cli.Output(io.StringIO(), io.StringIO())
        code = yield cli.run(reactor, self.settings(port.getHost().port, command="list",
                                                    use_ssl=False), output)
        self.assertEqual(code, 0, output.err.getvalue())
        self.assertIn("desk1", output.out.getvalue())

    @defer.inlineCallbacks
    def test_server_closes_after_list(self):
        """
        If the server closes the connection after list_of_vm, connect_to_vm
        goes over a new connection.
        """
        port = self.listen()
        self.server.close_after_list = True
        self.server.connect_status = (426, b"")
        output = cli.Output(io.StringIO(), io.StringIO())
        code = yield cli.run(reactor, self.settings(port), output)
        self.assertEqual(code, errors.EXIT_UPGRADE, output.err.getvalue())
        self.assertIn("more up-to-date client", output.err.getvalue())
        self.assertEqual([n for n, _ in self.server.requests], [1, 2])

    @defer.inlineCallbacks
    def test_bad_login(self):
        """
        A 401 on list_of_vm is reported as a login error, exit code 4.
        """
        port = self.listen()
        out, err, code = yield self.run_cli(
            ["--host", "127.0.0.1", "--port", str(port), "--user", "alice@acme",
             "--password", "wrong", "--ca", self.cert, "list"])
        self.assertEqual(code, errors.EXIT_LOGIN)
        self.assertIn("rejected your login", err.decode())

    @defer.inlineCallbacks
    def test_bad_token(self):
        """
        A 401 to --token says the token was rejected, never a word about a
        user or a password; exit code 4.
        """
        port = self.listen()
        out, err, code = yield self.run_cli(
            ["--host", "127.0.0.1", "--port", str(port), "--token", "bad",
             "--ca", self.cert, "list"])
        self.assertEqual(code, errors.EXIT_LOGIN)
        self.assertEqual(len(err.decode().splitlines()), 1, err)
        self.assertIn("rejected your token", err.decode())
        self.assertNotIn("password", err.decode())

    @defer.inlineCallbacks
    def test_connect_error_status(self):
        """
        A 503 answer to connect_to_vm (on the same connection as the list)
        shows the server's text and exits with code 8.
        """
        port = self.listen()
        body = b"The requested virtual machine is not available: no node, retry later.\r\n"
        self.server.connect_status = (503, body)
        output = cli.Output(io.StringIO(), io.StringIO())
        code = yield cli.run(reactor, self.settings(port), output)
        self.assertEqual(code, errors.EXIT_UNAVAILABLE)
        self.assertIn("not available: no node, retry later.", output.err.getvalue())
        self.assertEqual([n for n, _ in self.server.requests], [1, 1])


class NXTests(_Base):
    """
    Real nxagent + nxproxy + Xvfb.
    """

    def setUp(self):
        for binary in ("nxagent", "nxproxy", "Xvfb"):
            if shutil.which(binary) is None:
                raise unittest.SkipTest(f"{binary} is not installed")
        _Base.setUp(self)

    @defer.inlineCallbacks
    def start_nxagent(self):
        """
        Start nxagent on a free display and port (a few tries: other tests
        on this machine pick displays too); fires with its display name.
        """
        for attempt in range(3):
            try:
                display = yield self._start_nxagent(attempt)
            except RuntimeError:
                if attempt == 2:
                    raise
            else:
                return display

    @defer.inlineCallbacks
    def _start_nxagent(self, attempt):
        n = free_display()
        nx_port = free_tcp_port()
        agent_home = os.path.join(self.tmp, f"agent{attempt}")
        os.makedirs(agent_home)
        process = _AgentProcess()
        argv = ["nxagent", "-nolisten", "tcp", "-ac", "-D", "-name", "QVDTEST",
                "-display", f"nx/nx,link=lan,listen={nx_port},loopback=1:{n}", f":{n}"]
        transport = reactor.spawnProcess(
            process, shutil.which("nxagent"), argv,
            env={"HOME": agent_home, "PATH": os.environ.get("PATH", "")})
        pid = transport.pid

        @defer.inlineCallbacks
        def stop():
            if not process.ended.called:
                transport.signalProcess("TERM")
                timer = reactor.callLater(5, transport.signalProcess, "KILL")
                yield process.ended
                if timer.active():
                    timer.cancel()
            # A killed X server leaves its lock and socket behind; remove
            # them only if they are this nxagent's.
            try:
                with open(f"/tmp/.X{n}-lock") as f:
                    owner = int(f.read().strip() or 0)
            except (OSError, ValueError):
                return
            if owner == pid:
                for path in (f"/tmp/.X{n}-lock", f"/tmp/.X11-unix/X{n}"):
                    if os.path.exists(path):
                        os.unlink(path)
        self.addCleanup(stop)
        timer = reactor.callLater(10, lambda: process.ready.called or process.ready.errback(
            RuntimeError("nxagent did not start listening in 10 s")))
        try:
            yield process.ready
        finally:
            if timer.active():
                timer.cancel()
        self.server.nx_port = nx_port
        self.agent = process
        return f":{n}"

    @defer.inlineCallbacks
    def start_xvfb(self):
        xvfb = Xvfb(reactor, geometry="800x600")
        display = yield xvfb.start()
        self.addCleanup(xvfb.stop)
        return display

    def keep(self, connection):
        self.addCleanup(connection.close)
        return connection

    @defer.inlineCallbacks
    def test_session_draws_and_ends(self):
        """
        connect: list and connect_to_vm go over one TLS connection, the 102
        lines are shown, nxproxy draws nxagent's desktop into the chosen
        display, the slave key is saved, and when the server closes the
        session the client exits with 0.
        """
        agent_display = yield self.start_nxagent()
        display = yield self.start_xvfb()
        port = self.listen()
        output = cli.Output(io.StringIO(), io.StringIO())
        settings = self.settings(port, display=display,
                                 parameters=ConnectParameters(link="lan"))
        done = cli.run(reactor, settings, output, environ=dict(os.environ))
        painter = yield threads.deferToThread(paint, agent_display, COLOUR, 20)
        self.keep(painter)
        image = yield threads.deferToThread(wait_for_colour, display, COLOUR, 20)
        self.assertGreater(image.count(COLOUR), 1000, output.err.getvalue())
        # The server ends the session.
        self.server.connections[0].close()
        code = yield done
        self.assertEqual(code, 0, output.err.getvalue())
        err = output.err.getvalue()
        self.assertIn("Starting virtual machine\nConnecting X session for VM_ID: 1\n", err)
        self.assertIn("session ended (closed by server)", err)
        self.assertEqual([n for n, _ in self.server.requests], [1, 1])
        connect = self.server.requests[1][1]
        self.assertTrue(connect.startswith(b"GET /qvd/connect_to_vm?id=1&qvd.client.keyboard="
                                           b"pc105%2Fus&qvd.client.os=linux&qvd.client.link=lan"))
        with open(os.path.join(settings.user_dir, "slave-key")) as f:
            self.assertEqual(f.read(), "K" * 64)

    @defer.inlineCallbacks
    def test_headless_screenshot(self):
        """
        connect --headless starts its own Xvfb, waits for the desktop,
        writes a PNG screenshot showing it, prints its path, and disconnects
        so that nxagent suspends the session.
        """
        agent_display = yield self.start_nxagent()
        port = self.listen()
        shot = os.path.join(self.tmp, "desk.png")
        output = cli.Output(io.StringIO(), io.StringIO())
        settings = self.settings(port, headless=True, screenshot=shot, wait=30,
                                 display=None)
        done = cli.run(reactor, settings, output, environ=dict(os.environ))
        painter = yield threads.deferToThread(paint, agent_display, COLOUR, 20)
        self.keep(painter)
        code = yield done
        self.assertEqual(code, 0, output.err.getvalue())
        self.assertEqual(output.out.getvalue().strip(), shot)
        image = read_png_rgb(shot)
        self.assertGreater(image.count(COLOUR), 1000)
        for _ in range(50):
            if b"Session suspended" in self.agent.output:
                break
            yield threads.deferToThread(__import__("time").sleep, 0.1)
        self.assertIn(b"Session suspended", self.agent.output)


    @defer.inlineCallbacks
    def test_headless_console_script(self):
        """
        The qvd-client program itself: connect --headless --screenshot prints
        the PNG's path on stdout and exits 0, leaving no process behind.
        """
        agent_display = yield self.start_nxagent()
        port = self.listen()
        shot = os.path.join(self.tmp, "shot.png")
        done = self.run_cli(
            ["--host", "127.0.0.1", "--port", str(port), "--user", "alice@acme",
             "--ca", self.cert, "connect", "--headless", "--screenshot", shot,
             "--wait", "30"], env={"QVD_PASSWORD": "pw"})
        painter = yield threads.deferToThread(paint, agent_display, COLOUR, 20)
        self.keep(painter)
        out, err, code = yield done
        self.assertEqual(code, 0, err)
        self.assertEqual(out.decode().strip(), shot)
        self.assertGreater(read_png_rgb(shot).count(COLOUR), 1000)
        self.assertIn(b"Connection established", err)


FAKE_NXPROXY = """
import hashlib, os, socket, sys, time
port = int(sys.argv[-1].split("port=")[1].split(",")[0].split(":")[0])
s = socket.create_connection(("127.0.0.1", port))
s.sendall(b"NXPROXY-3.5.0-3.5.99 stream=default,data=default ")
n, h = 0, hashlib.sha256()
while True:
    data = s.recv(65536)
    if not data:
        break
    n += len(data)
    h.update(data)
    time.sleep(0.0005)  # a slow reader: the relay must hold back, not buffer
with open(os.environ["FAKE_NXPROXY_OUT"], "w") as f:
    f.write("%d %s %s" % (n, h.hexdigest(), os.environ["DISPLAY"]))
"""


class RelayTests(_Base):

    @defer.inlineCallbacks
    def test_large_stream_after_101(self):
        """
        Bytes the server sends right behind the 101 (in the same write),
        20 MB of them, reach nxproxy intact and in order once it connects,
        through a slow reader; then the server's close ends the session with
        exit code 0.
        """
        import hashlib
        payload = os.urandom(20 * 1024 * 1024)
        self.server.payload = payload
        port = self.listen()
        script = os.path.join(self.tmp, "fake-nxproxy")
        with open(script, "w") as f:
            f.write("#!" + sys.executable + "\n" + FAKE_NXPROXY)
        os.chmod(script, 0o755)
        out_file = os.path.join(self.tmp, "nxproxy.out")
        output = cli.Output(io.StringIO(), io.StringIO())
        code = yield cli.run(reactor, self.settings(port, nxproxy=script, display=":77"),
                             output, environ={"FAKE_NXPROXY_OUT": out_file, "PATH": "/usr/bin:/bin"})
        self.assertEqual(code, 0, output.err.getvalue())
        with open(out_file) as f:
            count, digest, display = f.read().split()
        self.assertEqual((int(count), digest, display),
                         (len(payload), hashlib.sha256(payload).hexdigest(), ":77"))
        self.assertIn("closed by server", output.err.getvalue())


class _Sink(Protocol):
    def dataReceived(self, data):
        pass


class FailureTests(_Base):
    """
    What qvd-client (the console script) says when nxproxy or the screenshot
    fails: one line, a non-zero exit code, never a traceback.
    """

    def fake_nxproxy(self, text):
        path = os.path.join(self.tmp, "nxproxy")
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o755)
        return path

    def listen_with_agent(self):
        upstream = reactor.listenTCP(0, Factory.forProtocol(_Sink), interface="127.0.0.1")
        self.addCleanup(upstream.stopListening)
        self.server.nx_port = upstream.getHost().port
        return self.listen()

    def connect_argv(self, port, *extra):
        return ["--host", "127.0.0.1", "--port", str(port), "--user", "alice@acme",
                "--ca", self.cert, "connect", *extra]

    def assertOneErrorLine(self, err, text):
        err = err.decode()
        self.assertNotIn("Traceback", err)
        errors_said = [line for line in err.splitlines() if line.startswith("qvd-client:")]
        self.assertEqual(len(errors_said), 1, err)
        self.assertIn(text, errors_said[0])
        self.assertEqual(err.splitlines()[-1], errors_said[0])

    @defer.inlineCallbacks
    def test_nxproxy_crashes(self):
        """
        nxproxy that connects, then dies with status 3: one line with its
        status and last words, exit code 9.
        """
        nxproxy = self.fake_nxproxy(
            f"#!{sys.executable}\nimport socket, sys\n"
            "port = int(sys.argv[-1].split('port=')[1].split(',')[0].split(':')[0])\n"
            "s = socket.create_connection(('127.0.0.1', port))\n"
            "sys.stderr.write('Error: Aborting session with Segmentation fault\\n')\n"
            "sys.exit(3)\n")
        port = self.listen_with_agent()
        out, err, code = yield self.run_cli(
            self.connect_argv(port, "--nxproxy", nxproxy, "--display", ":77"),
            env={"QVD_PASSWORD": "pw"})
        self.assertEqual(code, errors.EXIT_LOCAL, err)
        self.assertOneErrorLine(err, "nxproxy exited with status 3; the session is suspended; "
                                     "nxproxy said: Error: Aborting session")

    @defer.inlineCallbacks
    def test_nxproxy_cannot_start(self):
        """nxproxy that exits before connecting, or cannot be run at all: one line, exit 9."""
        port = self.listen_with_agent()
        for script, text in (
                ("#!/bin/sh\necho 'Error: cannot open display' >&2\nexit 1\n",
                 "nxproxy exited (status 1) before connecting; nxproxy said: Error: cannot "
                 "open display"),
                ("#!/nonexistent/interpreter\n", "its interpreter (the #! line) does not exist")):
            out, err, code = yield self.run_cli(
                self.connect_argv(port, "--nxproxy", self.fake_nxproxy(script),
                                  "--display", ":77"), env={"QVD_PASSWORD": "pw"})
            self.assertEqual(code, errors.EXIT_LOCAL, err)
            self.assertOneErrorLine(err, text)

    @defer.inlineCallbacks
    def test_screenshot_in_missing_directory(self):
        """
        --screenshot /missing/x.png is refused before connecting: one line,
        exit code 2, and the server never hears from the client.
        """
        port = self.listen()
        out, err, code = yield self.run_cli(
            self.connect_argv(port, "--headless", "--screenshot", "/missing/x.png"),
            env={"QVD_PASSWORD": "pw"})
        self.assertEqual(code, errors.EXIT_USAGE, err)
        self.assertEqual(err.decode(), "qvd-client: --screenshot /missing/x.png: directory "
                                       "/missing does not exist\n")
        self.assertEqual(self.server.requests, [])


class ChooseVMTests(_Base):

    def two_vms(self):
        self.server.vms.append({"id": 2, "state": "running", "name": "lab", "blocked": 1,
                                "is_application": 0})
        self.server.connect_status = (404, b"The requested virtual machine does not exist")

    @defer.inlineCallbacks
    def test_several_vms_not_interactive(self):
        """
        connect without --vm and several VMs, not in a terminal: the error
        lists them and asks for --vm; nothing is connected.
        """
        self.two_vms()
        port = self.listen()
        output = cli.Output(io.StringIO(), io.StringIO())
        code = yield cli.run(reactor, self.settings(port), output)
        self.assertEqual(code, errors.EXIT_USAGE)
        self.assertIn("choose one with --vm ID", output.err.getvalue())
        self.assertIn("lab", output.err.getvalue())
        self.assertEqual(len(self.server.requests), 1)

    @defer.inlineCallbacks
    def test_several_vms_interactive(self):
        """
        In a terminal the user is asked until the answer is one of the ids;
        that VM is connected (here it is gone: 404, exit code 5).
        """
        self.two_vms()
        port = self.listen()
        answers = iter(["7", "2"])
        output = cli.Output(io.StringIO(), io.StringIO())
        code = yield cli.run(reactor, self.settings(port, interactive=True), output,
                             ask=lambda: defer.succeed(next(answers)))
        self.assertEqual(code, errors.EXIT_VM_GONE)
        self.assertIn("'7' is not one of: 1, 2", output.err.getvalue())
        self.assertIn("does not exist any more", output.err.getvalue())
        self.assertTrue(self.server.requests[1][1].startswith(b"GET /qvd/connect_to_vm?id=2&"))
