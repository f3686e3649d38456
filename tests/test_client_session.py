"""
Tests for qvd.client.session (L7RProtocol) and qvd.client.nx (NxSession),
socket-free: StringTransport, task.Clock, MemoryReactorClock.
"""

import os
import stat
import tempfile
import shutil

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from qvd.client import errors
from qvd.client.errors import ClientError
from qvd.client.nx import NxproxySettings, NxSession, nxproxy_argv, nxproxy_env
from qvd.client.protocol import ProtocolError, Response, Upgraded
from qvd.client.session import ConnectionClosed, L7RProtocol, ResponseTimeout

UPGRADE = b"HTTP/1.1 101 Switching Protocols\r\nX-QVD-Slave-Key: " + b"k" * 64 + b"\r\n\r\n"


def connected_protocol(clock=None, timeout=60.0):
    protocol = L7RProtocol(clock or Clock(), response_timeout=timeout)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


class L7RProtocolTests(unittest.TestCase):

    def test_request_and_response(self):
        """
        request() writes the request; a final response fires its Deferred
        and the connection is ready for the next request.
        """
        protocol, transport = connected_protocol()
        self.assertEqual(self.successResultOf(protocol.ready), protocol)
        d = protocol.request(b"GET /qvd/list_of_vm? HTTP/1.1\r\n\r\n")
        self.assertEqual(transport.value(), b"GET /qvd/list_of_vm? HTTP/1.1\r\n\r\n")
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n[]")
        response = self.successResultOf(d)
        self.assertIsInstance(response, Response)
        self.assertEqual(response.body, b"[]")
        self.assertEqual(protocol.state, "idle")

    def test_interim_restarts_timeout(self):
        """
        Each 102 is passed to on_interim and restarts the response timeout;
        with no byte for the whole timeout the request fails with
        ResponseTimeout and the connection is aborted.
        """
        clock = Clock()
        protocol, transport = connected_protocol(clock, timeout=60)
        seen = []
        d = protocol.request(b"x", on_interim=lambda i: seen.append(i.info))
        clock.advance(59)
        protocol.dataReceived(b"HTTP/1.1 102 Processing\r\nX-QVD-VM-Info: Starting virtual machine\r\n\r\n")
        clock.advance(59)
        self.assertNoResult(d)
        self.assertEqual(seen, ["Starting virtual machine"])
        clock.advance(1)
        self.failureResultOf(d, ResponseTimeout)
        self.assertTrue(transport.disconnecting)

    def test_upgrade_keeps_bytes_until_attach(self):
        """
        After a 101 reading is paused; bytes that came with the 101 and after
        it are delivered, in order, to the sink given to attach(), which
        resumes reading.
        """
        protocol, transport = connected_protocol()
        d = protocol.request(b"x")
        protocol.dataReceived(UPGRADE + b"NX\x00one")
        upgraded = self.successResultOf(d)
        self.assertIsInstance(upgraded, Upgraded)
        self.assertEqual(upgraded.rest, b"NX\x00one")
        self.assertEqual(transport.producerState, "paused")
        protocol.dataReceived(b"-two")

        class Sink:
            data = b""
            lost = None

            def dataReceived(self, data):
                Sink.data += data

            def connectionLost(self, reason=None):
                Sink.lost = reason
        protocol.attach(Sink())
        self.assertEqual(Sink.data, b"NX\x00one-two")
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(b"-three")
        self.assertEqual(Sink.data, b"NX\x00one-two-three")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertIsNotNone(Sink.lost)

    def test_connection_lost_while_waiting(self):
        """
        If the server closes while a response is expected, the request fails
        with ConnectionClosed.
        """
        protocol, transport = connected_protocol()
        d = protocol.request(b"x")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(d, ConnectionClosed)
        self.assertEqual(protocol.state, "closed")

    def test_garbage_aborts(self):
        """
        A reply that is not HTTP fails the request with ProtocolError and
        aborts the connection.
        """
        protocol, transport = connected_protocol()
        d = protocol.request(b"x")
        protocol.dataReceived(b"SSH-2.0-OpenSSH\r\n\r\n")
        self.failureResultOf(d, ProtocolError)
        self.assertTrue(transport.disconnecting)


class FakeProcessTransport:
    def __init__(self):
        self.signals = []

    def signalProcess(self, name):
        self.signals.append(name)


class NxSessionTests(unittest.TestCase):

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.dir = tempfile.mkdtemp(prefix="qvdt-client-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.spawned = []
        self.l7r, self.l7r_transport = connected_protocol(self.reactor)
        d = self.l7r.request(b"connect")
        self.l7r.dataReceived(UPGRADE + b"early")
        self.upgraded = self.successResultOf(d)

    def spawn(self, process, path, argv, env):
        transport = FakeProcessTransport()
        self.spawned.append((process, path, argv, env, transport))
        return transport

    def start(self, **settings):
        settings.setdefault("display", ":7")
        session = NxSession(self.reactor, self.l7r, NxproxySettings(**settings), self.dir,
                            slave_key=self.upgraded.slave_key, environ={"PATH": "/bin"},
                            spawn=self.spawn)
        d = session.run()
        return session, d

    def nxproxy_connects(self):
        factory = self.reactor.tcpServers[0][1]
        protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_runs_nxproxy_on_localhost(self):
        """
        The session listens on 127.0.0.1 and runs nxproxy -S connecting to
        that port, drawing into the chosen display, and saves the slave key
        in a private file.
        """
        session, d = self.start(extra_args=("-d", "1"))
        port, factory, backlog, interface = self.reactor.tcpServers[0]
        self.assertEqual(interface, "127.0.0.1")
        process, path, argv, env, _ = self.spawned[0]
        self.assertEqual(argv, ["/usr/bin/nxproxy", "-d", "1", "-S",
                                f"nx/nx,connect=127.0.0.1,port={port}:40"])
        self.assertEqual(env["DISPLAY"], ":7")
        self.assertEqual(env["NX_ROOT"], os.path.join(self.dir, "nx"))
        key = os.path.join(self.dir, "slave-key")
        with open(key) as f:
            self.assertEqual(f.read(), "k" * 64)
        self.assertEqual(stat.S_IMODE(os.stat(key).st_mode), 0o600)

    def test_relay_with_back_pressure(self):
        """
        Once nxproxy connects, bytes the server sent after the 101 reach it
        first, then bytes flow both ways unchanged, and each transport is
        registered as the streaming producer of the other.
        """
        session, d = self.start()
        local, local_transport = self.nxproxy_connects()
        self.assertEqual(session.state, "relaying")
        self.successResultOf(session.started)
        # "early" came in the same read as the 101.
        self.assertEqual(local_transport.value(), b"early")
        local_transport.clear()
        local.dataReceived(b"NXPROXY-3.5.0-3.5.99 stream=default,data=default ")
        self.assertTrue(self.l7r_transport.value().endswith(
            b"NXPROXY-3.5.0-3.5.99 stream=default,data=default "))
        self.l7r.dataReceived(b"\x00\x01binary")
        self.assertEqual(local_transport.value(), b"\x00\x01binary")
        self.assertIs(local_transport.producer, self.l7r_transport)
        self.assertIs(self.l7r_transport.producer, local_transport)
        self.assertTrue(local_transport.streaming)

    def test_server_closes(self):
        """
        When the server closes, nxproxy's connection is closed (producers
        unregistered first) and the session ends, closed by the server, when
        nxproxy exits: exit code 0.
        """
        session, d = self.start()
        local, local_transport = self.nxproxy_connects()
        self.l7r.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(local_transport.disconnecting)
        self.assertIsNone(local_transport.producer)
        self.assertNoResult(d)
        process = self.spawned[0][0]
        process.processEnded(Failure(_Exit(0)))
        ended = self.successResultOf(d)
        self.assertEqual((ended.closed_by, ended.nxproxy_status, ended.exit_code),
                         ("server", 0, 0))

    def test_nxproxy_closes(self):
        """
        When nxproxy closes its connection (the user closed the window), the
        L7R connection is closed so that the session is suspended.
        """
        session, d = self.start()
        local, local_transport = self.nxproxy_connects()
        local.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(self.l7r_transport.disconnecting)
        self.spawned[0][0].processEnded(Failure(_Exit(0)))
        self.assertEqual(self.successResultOf(d).closed_by, "nxproxy")

    def test_failing_nxproxy(self):
        """
        nxproxy that ends the session by itself with a non-zero status, or
        killed by a signal, is a failed session (exit code 9); status 0 is not.
        """
        for status, failed in ((0, False), (3, True), (None, True)):
            self.setUp()
            session, d = self.start()
            local, local_transport = self.nxproxy_connects()
            local.connectionLost(Failure(ConnectionDone()))
            self.spawned[0][0].processEnded(Failure(_Exit(status)))
            ended = self.successResultOf(d)
            self.assertEqual((ended.closed_by, ended.failed), ("nxproxy", failed))
            self.assertEqual(ended.exit_code, errors.EXIT_LOCAL if failed else errors.EXIT_OK)

    def test_nxproxy_that_does_not_exit_is_killed(self):
        """
        If nxproxy does not exit after the relay ends it gets SIGTERM after
        exit_timeout and SIGKILL after another exit_timeout.
        """
        session, d = self.start(exit_timeout=5)
        self.nxproxy_connects()
        self.l7r.connectionLost(Failure(ConnectionDone()))
        transport = self.spawned[0][4]
        self.reactor.advance(4.9)
        self.assertEqual(transport.signals, [])
        self.reactor.advance(0.1)
        self.assertEqual(transport.signals, ["TERM"])
        self.reactor.advance(5)
        self.assertEqual(transport.signals, ["TERM", "KILL"])
        self.spawned[0][0].processEnded(Failure(_Exit(None)))
        self.successResultOf(d)

    def test_accept_timeout(self):
        """
        If nxproxy does not connect within accept_timeout, it is terminated
        and the session fails with a local error that quotes nxproxy.
        """
        session, d = self.start(accept_timeout=10)
        process, _, _, _, transport = self.spawned[0]
        process.errReceived(b"Info: Connecting to remote host '127.0.0.1:1'.\n")
        self.reactor.advance(9.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        self.assertEqual(transport.signals, ["TERM"])
        process.processEnded(Failure(_Exit(None)))
        error = self.failureResultOf(d, ClientError).value
        self.assertEqual(error.exit_code, errors.EXIT_LOCAL)
        self.assertIn("did not connect within 10 s", error.message)
        self.assertIn("Connecting to remote host", error.message)
        self.assertTrue(self.l7r_transport.disconnecting)

    def test_nxproxy_dies_before_connecting(self):
        """
        nxproxy exiting before it connects is a local error with its output.
        """
        session, d = self.start()
        process = self.spawned[0][0]
        process.errReceived(b"Error: Can't open display ':7'.\n")
        process.processEnded(Failure(_Exit(1)))
        error = self.failureResultOf(d, ClientError).value
        self.assertIn("status 1", error.message)
        self.assertIn("Can't open display", error.message)

    def test_disconnect(self):
        """
        disconnect() ends a running session from our side: nxproxy is asked
        to terminate and the L7R connection is closed.
        """
        session, d = self.start()
        self.nxproxy_connects()
        session.disconnect()
        self.assertEqual(self.spawned[0][4].signals, ["TERM"])
        self.assertTrue(self.l7r_transport.disconnecting)
        self.spawned[0][0].processEnded(Failure(_Exit(None)))
        self.assertEqual(self.successResultOf(d).closed_by, "client")


class _Exit(Exception):
    def __init__(self, code):
        Exception.__init__(self, code)
        self.exitCode = code


class CommandLineTests(unittest.TestCase):

    def test_argv(self):
        """
        nxproxy gets extra args, then -S and the nx/nx options string with
        connect/port (and slave, options) and display :40.
        """
        settings = NxproxySettings(display=":3", command="/opt/nxproxy",
                                   extra_args=("-d", "4"), options=(("cups", "631"),))
        self.assertEqual(nxproxy_argv(settings, 41234, slave_port=62001), [
            "/opt/nxproxy", "-d", "4", "-S",
            "nx/nx,connect=127.0.0.1,port=41234,slave=62001,cups=631:40"])

    def test_env(self):
        """
        nxproxy's environment sets DISPLAY and keeps a given NX_ROOT.
        """
        env = nxproxy_env(NxproxySettings(display=":3"), "/home/a/.qvd",
                          {"NX_ROOT": "/x", "DISPLAY": ":0"})
        self.assertEqual((env["DISPLAY"], env["NX_ROOT"]), (":3", "/x"))


class WaitForPictureTests(unittest.TestCase):
    """
    qvd.client.headless.wait_for_picture with a scripted screen and a Clock.
    """

    def run_with(self, frames, wait=20, **kw):
        from twisted.internet import defer
        from qvd.client._x11 import RGBImage
        from qvd.client.headless import wait_for_picture
        clock = Clock()
        frames = list(frames)
        grabs = []

        def grab_async(display):
            grabs.append(clock.seconds())
            colour = frames.pop(0) if len(frames) > 1 else frames[0]
            return defer.succeed(RGBImage(1, 1, bytes([colour, 0, 0])))
        d = wait_for_picture(clock, grab_async, ":9", wait, poll=0.5, settle=1.0, **kw)
        for _ in range(100):
            clock.advance(0.5)
        return self.successResultOf(d), grabs

    def test_waits_for_non_black_then_stable(self):
        """
        Black frames are skipped; after the first non-black one, grabs
        continue every settle seconds until two are equal.
        """
        image, grabs = self.run_with([0, 0, 10, 20, 30, 30])
        self.assertEqual(image.rgb[0], 30)
        self.assertEqual(grabs, [0, 0.5, 1.0, 2.0, 3.0, 4.0])

    def test_gives_up_after_wait(self):
        """
        A screen that stays black is returned when the wait ends.
        """
        image, grabs = self.run_with([0], wait=3)
        self.assertTrue(image.is_black())
        self.assertEqual(grabs[-1], 3.0)

    def test_never_stable(self):
        """
        A screen that keeps changing is returned after max_settle seconds.
        """
        image, grabs = self.run_with(list(range(1, 100)), wait=60, max_settle=4)
        self.assertEqual(grabs, [0, 1.0, 2.0, 3.0, 4.0])
