"""
After the 101: run the local C{nxproxy -S} and relay it to the L7R connection.

    session = NxSession(reactor, l7r_protocol, NxproxySettings(display=":0"),
                        user_dir="~/.qvd", slave_key=upgraded.slave_key)
    ended = await session.run()      # SessionEnded, or ClientError

C{nxproxy -S} (the "X server side" proxy) CONNECTS to its peer proxy
(MACHINE-NOTES, NX). So we listen on a free port P of 127.0.0.1, start

    nxproxy [extra args] -S nx/nx,connect=127.0.0.1,port=P[,slave=S]:40

with C{DISPLAY} set to the X display to draw into, accept its one
connection (within C{accept_timeout}) and relay it byte for byte to the
L7R connection, both directions with back-pressure (each transport is the
producer registered on the other). The NX stream's first bytes come from
nxproxy; anything the server sent after the 101 is delivered first.

States of L{NxSession}:

    listening  -- nxproxy connects --> relaying
    listening  -- accept_timeout / nxproxy exits / server closes --> ending (error)
    relaying   -- either side closes --> ending (close the other side)
    ending     -- nxproxy exited (or killed after `exit_timeout`) --> done

C{:40} and the files C{~/.qvd/slave-key} / C{~/.qvd/slave-port} are the
original client's (reference 1.4); nxproxy keeps its own files under
C{NX_ROOT} (default C{~/.qvd/nx}).
"""

import errno
import os
import random

import attrs
from twisted.internet import defer
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.python import log

from qvd.client.errors import EXIT_LOCAL, EXIT_OK, ClientError

NX_DISPLAY = 40


@attrs.frozen
class NxproxySettings:
    """
    How to run the local nxproxy.

    @ivar command: path of nxproxy.
    @ivar extra_args: extra arguments put before C{-S}.
    @ivar display: the X display nxproxy draws into (its C{DISPLAY}).
    @ivar options: extra NX options (name, value) for the C{nx/nx,...} string.
    @ivar slave: enable the slave channel (port in C{~/.qvd/slave-port}).
    """
    display: str
    command: str = "/usr/bin/nxproxy"
    extra_args: tuple = ()
    options: tuple = ()
    slave: bool = False
    accept_timeout: float = 10.0
    exit_timeout: float = 5.0


def nxproxy_argv(settings, port, slave_port=None):
    """
    The nxproxy command line connecting to C{127.0.0.1:port}.
    """
    options = [("connect", "127.0.0.1"), ("port", str(port))]
    if slave_port is not None:
        options.append(("slave", str(slave_port)))
    options += list(settings.options)
    spec = "nx/nx," + ",".join(f"{k}={v}" for k, v in options) + f":{NX_DISPLAY}"
    return [settings.command, *settings.extra_args, "-S", spec]


def nxproxy_env(settings, user_dir, environ):
    """
    The environment of nxproxy: the caller's, with C{DISPLAY} and C{NX_ROOT}.
    """
    env = dict(environ)
    env["DISPLAY"] = settings.display
    env.setdefault("NX_ROOT", os.path.join(user_dir, "nx"))
    env.setdefault("NX_CLIENT", "/bin/false")
    return env


@attrs.frozen
class SessionEnded:
    """
    How the NX session ended.

    @ivar closed_by: C{"nxproxy"} (the user closed the window or nxproxy
        exited: the session is suspended), C{"server"} (the L7R closed), or
        C{"client"} (we were asked to disconnect).
    @ivar nxproxy_status: nxproxy's exit code, or C{None} if killed by a signal
        (or still running when we stopped waiting).
    """
    closed_by: str
    nxproxy_status: object = None
    nxproxy_said: tuple = ()

    @property
    def failed(self):
        """nxproxy ended the session by itself and not with status 0 (an error, a crash)."""
        return self.closed_by == "nxproxy" and self.nxproxy_status != 0

    @property
    def exit_code(self):
        return EXIT_LOCAL if self.failed else EXIT_OK


class _NxproxyProcess(ProcessProtocol):
    def __init__(self, session):
        self.session = session
        self.tail = []

    def outReceived(self, data):
        self._keep(data)

    errReceived = outReceived

    def _keep(self, data):
        self.tail.extend(data.decode("utf-8", "replace").splitlines())
        del self.tail[:-20]

    def processEnded(self, reason):
        self.session._nxproxy_ended(getattr(reason.value, "exitCode", None), self.tail)


class _LocalEnd(Protocol):
    """
    nxproxy's connection to us.
    """

    def __init__(self, session):
        self.session = session

    def connectionMade(self):
        self.session._accepted(self)

    def dataReceived(self, data):
        self.session.l7r.write(data)

    def connectionLost(self, reason=None):
        self.session._side_closed("nxproxy")


class _Sink:
    """
    Receives the L7R connection's bytes once relaying (see L7RProtocol.attach).
    """

    def __init__(self, session):
        self.session = session

    def dataReceived(self, data):
        self.session.local.transport.write(data)

    def connectionLost(self, reason=None):
        self.session._side_closed("server")


class _OneShotFactory(Factory):
    def __init__(self, session):
        self.session = session
        self.used = False

    def buildProtocol(self, addr):
        if self.used:
            return None
        self.used = True
        return _LocalEnd(self.session)


class NxSession:
    """
    Runs nxproxy and relays it to an upgraded L7R connection; see the module
    docstring. C{spawn} is C{reactor.spawnProcess} (injected for tests).
    """

    def __init__(self, reactor, l7r, settings, user_dir, slave_key=None,
                 environ=None, spawn=None, on_status=None):
        self.reactor = reactor
        self.l7r = l7r
        self.settings = settings
        self.user_dir = user_dir
        self.slave_key = slave_key
        self.environ = os.environ if environ is None else environ
        self.spawn = spawn or reactor.spawnProcess
        self.on_status = on_status or (lambda text: None)
        self.state = "new"
        self.local = None
        self._listener = None
        self._process = None
        self._process_transport = None
        self._nxproxy_status = "running"
        self._closed_by = None
        self._error = None
        self._timer = None
        self._done = defer.Deferred()
        self._slave_port_file = None
        self.started = defer.Deferred()

    def run(self):
        """
        Start; the Deferred fires with L{SessionEnded} or fails with
        L{ClientError}. L{started} fires when nxproxy has connected.
        """
        from twisted.internet.endpoints import TCP4ServerEndpoint
        self.state = "listening"
        self._write_slave_files()
        endpoint = TCP4ServerEndpoint(self.reactor, 0, backlog=1, interface="127.0.0.1")
        d = endpoint.listen(_OneShotFactory(self))
        d.addCallbacks(self._listening, self._cannot_listen)
        self.l7r.closed.addCallback(self._l7r_closed_early)
        return self._done

    def disconnect(self):
        """
        End the session from our side (the server's nxagent suspends it).
        """
        if self.state in ("listening", "relaying"):
            self._closed_by = "client"
            self._end()

    # --- steps --------------------------------------------------------------

    def _write_slave_files(self):
        # As the original: failing to save these only costs the slave channel.
        self._slave_port = None
        try:
            os.makedirs(self.user_dir, mode=0o700, exist_ok=True)
            if self.slave_key:
                _write_private(os.path.join(self.user_dir, "slave-key"), self.slave_key)
            if self.settings.slave:
                port = 62000 + random.randrange(2000)
                self._slave_port_file = os.path.join(self.user_dir, "slave-port")
                _write_private(self._slave_port_file, str(port))
                self._slave_port = port
        except OSError as e:
            self._slave_port_file = None
            self.on_status(f"warning: cannot save the slave key/port in {self.user_dir}: "
                           f"{e.strerror}; the slave channel is disabled")

    def _cannot_listen(self, failure):
        self._error = ClientError(
            f"cannot listen on 127.0.0.1 for nxproxy: {failure.getErrorMessage()}", EXIT_LOCAL)
        self._nxproxy_status = None
        self._end()

    def _listening(self, port):
        self._listener = port
        if self.state != "listening":
            port.stopListening()
            return
        argv = nxproxy_argv(self.settings, port.getHost().port, self._slave_port)
        env = nxproxy_env(self.settings, self.user_dir, self.environ)
        try:
            os.makedirs(env["NX_ROOT"], mode=0o700, exist_ok=True)
        except OSError as e:
            self.on_status(f"warning: cannot create NX_ROOT {env['NX_ROOT']}: {e.strerror}")
        self.on_status("starting " + " ".join(argv) + f" (DISPLAY={self.settings.display})")
        self._process = _NxproxyProcess(self)
        try:
            self._process_transport = self.spawn(
                self._process, argv[0], argv, env=env)
        except OSError as e:
            reason = e.strerror or str(e)
            if e.errno == errno.ENOENT and os.path.exists(argv[0]):
                reason = "its interpreter (the #! line) does not exist"
            self._error = ClientError(f"cannot run nxproxy {argv[0]!r}: {reason}", EXIT_LOCAL)
            self._nxproxy_status = None
            self._end()
            return
        self._timer = self.reactor.callLater(
            self.settings.accept_timeout, self._accept_timed_out)

    def _accept_timed_out(self):
        self._timer = None
        if self.state == "listening":
            self._error = ClientError(
                f"nxproxy did not connect within {self.settings.accept_timeout:g} s"
                + _tail_text(self._process), EXIT_LOCAL)
            self._end()

    def _accepted(self, local):
        if self.state != "listening":
            local.transport.abortConnection()
            return
        self.state = "relaying"
        self._cancel_timer()
        self.local = local
        self._listener.stopListening()
        self.on_status("nxproxy connected; session running")
        self.started.callback(None)
        # Back-pressure: each side stops reading while the other can't keep up.
        local.transport.registerProducer(self.l7r.transport, True)
        self.l7r.transport.registerProducer(local.transport, True)
        self.l7r.attach(_Sink(self))

    def _l7r_closed_early(self, _):
        if self.state == "listening":
            self._closed_by = "server"
            self._error = ClientError(
                "the server closed the connection before nxproxy connected", EXIT_LOCAL)
            self._end()

    def _side_closed(self, side):
        if self.state == "relaying":
            self._closed_by = side
            self._end()

    def _nxproxy_ended(self, status, tail):
        self._nxproxy_status = status
        if self.state == "listening":
            self._error = ClientError(
                f"nxproxy exited (status {status}) before connecting"
                + _tail_text(self._process), EXIT_LOCAL)
            self._end()
        elif self.state == "relaying":
            self._closed_by = "nxproxy"
            self._end()
        elif self.state == "ending":
            self._finish()

    def _end(self):
        if self.state in ("ending", "done"):
            return
        self.state = "ending"
        self._cancel_timer()
        if self._listener is not None:
            self._listener.stopListening()
        if self.local is not None:
            # A TLS transport does not close while a producer is registered.
            self.local.transport.unregisterProducer()
            if self.l7r.transport is not None:
                self.l7r.transport.unregisterProducer()
            self.local.transport.loseConnection()
        self.l7r.close()
        if self._nxproxy_status == "running" and self._process_transport is not None:
            self._timer = self.reactor.callLater(self.settings.exit_timeout, self._kill)
            if self._closed_by == "client" or self._error is not None:
                _signal(self._process_transport, "TERM")
        else:
            self._finish()

    def _kill(self, signal_name="TERM"):
        self._timer = None
        log.msg(f"nxproxy did not exit; sending it SIG{signal_name}")
        _signal(self._process_transport, signal_name)
        if signal_name == "TERM":
            self._timer = self.reactor.callLater(self.settings.exit_timeout, self._kill, "KILL")

    def _finish(self):
        if self.state == "done":
            return
        self.state = "done"
        self._cancel_timer()
        if self._slave_port_file:
            try:
                os.unlink(self._slave_port_file)
            except OSError:
                pass
        if self._error is not None:
            self._done.errback(self._error)
        else:
            status = self._nxproxy_status
            said = tuple(self._process.tail[-3:]) if self._process is not None else ()
            self._done.callback(SessionEnded(self._closed_by or "server",
                                             None if status == "running" else status, said))

    def _cancel_timer(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


def _signal(transport, name):
    try:
        transport.signalProcess(name)
    except Exception:
        pass


def _tail_text(process):
    if process is None or not process.tail:
        return ""
    return "; nxproxy said: " + " | ".join(process.tail[-5:])


def _write_private(path, text):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
