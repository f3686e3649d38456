"""
The L7R's client side: the connection protocol and the routes of reference
1.2/1.3.

    l7r = L7R(reactor, db, listener, authenticator, settings, nodename)
    await l7r.start()                        # LISTENs for aborts and VM states
    factory = L7RFactory(l7r)                # wrap in TLS, listen
    ...
    await l7r.stop()

L{L7RProtocol} only adapts bytes: it feeds a L{RequestParser}, hands each
complete request to L{L7R.handle} (one at a time; the next is parsed when the
previous one was answered), and, after a C{101}, passes bytes to the relay.
A connection is cut (with a C{408}) when a started request is not complete
within C{request_timeout} seconds or it stays idle for C{idle_timeout}; a TLS
connection whose handshake is not done within C{handshake_timeout} is
aborted. A connection being closed that is still open C{close_timeout}
seconds later (a peer that never reads, or never finishes the TLS shutdown)
is aborted: every timeout frees its descriptor.
"""

import json
import string

import attrs
from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from zope.interface import implementer

from qvd.logs import Logger

from qvd.db.pool import DatabaseUnavailable
from qvd.l7r.auth.interfaces import AuthBusy, AuthFailed
from qvd.l7r.broker import Broker, BrokerError, BrokerSettings
from qvd.protocols import http

log = Logger()

_ALNUM = string.ascii_letters + string.digits


@attrs.frozen
class ServerSettings:
    request_timeout: float = 30.0
    idle_timeout: float = 600.0
    handshake_timeout: float = 10.0
    close_timeout: float = 5.0
    limits: http.Limits = http.Limits()

    @classmethod
    def from_config(cls, config):
        return cls(
            request_timeout=config.getfloat("l7r.timeout.request"),
            idle_timeout=config.getfloat("l7r.timeout.idle"),
            handshake_timeout=config.getfloat("l7r.timeout.handshake"),
            close_timeout=config.getfloat("l7r.timeout.close"),
            limits=http.Limits(max_line=config.getint("l7r.http.max_line"),
                               max_headers=config.getint("l7r.http.max_headers"),
                               max_request=config.getint("l7r.http.max_request")))


class HTTPError(Exception):
    """
    Answer the request with C{status} (body C{message}, or the description).
    """

    def __init__(self, status, message=None, headers=()):
        super().__init__(f"{status} {message}")
        self.status = status
        self.message = message
        self.headers = headers

    def response(self):
        return http.error_response(self.status, self.message, self.headers)


def pretty_json(value):
    """
    JSON as the original's C{JSON->new->ascii->pretty} writes it.
    """
    return json.dumps(value, indent=3, separators=(",", " : "), ensure_ascii=True) + "\n"


class L7R:
    """
    One L7R process's routes and shared state.

    @ivar host: the last row of C{hosts} + C{host_runtimes} seen for this node.
    """

    def __init__(self, reactor, db, listener, authenticator, nodename,
                 settings=None, broker_settings=None, vma_factory=None, pid=None):
        from qvd.vmaclient import VMAClient
        self.reactor = reactor
        self.db = db
        self.listener = listener
        self.authenticator = authenticator
        self.nodename = nodename
        self.settings = settings or ServerSettings()
        self.broker = Broker(reactor, db, broker_settings or BrokerSettings(),
                             vma_factory or VMAClient, pid=pid)
        self.connections = set()
        self._busy = [None, 0]          # when the last "busy" was logged, how many since
        self._abort_channel = None
        self._poll = None
        self._flush = None
        self.routes = {
            "/qvd/ping": self.ping,
            "/qvd/list_of_vm": self.list_of_vm,
            "/qvd/list_of_applications": self.list_of_applications,
            "/qvd/connect_to_vm": self.connect_to_vm,
            "/qvd/stop_vm": self.stop_vm,
            "/qvd/authenticate_user": self.authenticate_user,
            "/qvd/create_auth_token": self.create_auth_token,
        }

    # -- life cycle -------------------------------------------------------

    async def start(self):
        from twisted.internet import task
        if self.listener is not None:
            # One LISTEN at a time: the listener's connection runs one query at once.
            await self.listener.subscribe("qvd_vm_state", self._on_vm_state)
            self.listener.onReconnect(self._poll_aborts)
        await self._find_host()
        await self._poll_aborts()      # claims left by a previous L7R process of this node
        self._poll = task.LoopingCall(self._poll_aborts)
        self._poll.clock = self.reactor
        self._poll.start(self.broker.settings.abort_poll, now=False)
        self._flush = task.LoopingCall(self.broker.flush_counters)
        self._flush.clock = self.reactor
        self._flush.start(self.broker.settings.counters_flush, now=False)

    async def stop(self):
        for loop in (self._poll, self._flush):
            if loop is not None and loop.running:
                loop.stop()
        releases = []
        for conn in list(self.connections):
            if conn.session is not None:
                conn.session.abort("the L7R is stopping")
                releases.append(self.broker.release(conn.session, conn.relay))
            conn.transport.loseConnection()
        await defer.DeferredList(releases)
        await self.broker.flush_counters()
        self.broker.stop()

    async def _find_host(self, vm_id=None):
        """
        Read this node's row; LISTEN for aborts once its id is known. With
        C{vm_id}, read that VM's id, blocked flag and user in the same
        statement: (host, vm), vm None when there is no such VM.
        """
        try:
            if vm_id is None:
                rows = await self.db.runQuery(
                    "SELECT h.id, h.address, hr.state, hr.blocked FROM hosts h"
                    " LEFT JOIN host_runtimes hr ON hr.host_id = h.id WHERE h.name = %s",
                    (self.nodename,))
            else:
                rows = await self.db.runQuery(
                    "SELECT h.id, h.address, hr.state, hr.blocked, vm.vm_id, vm.blocked,"
                    " vm.user_id FROM (SELECT 1) one"
                    " LEFT JOIN (hosts h LEFT JOIN host_runtimes hr ON hr.host_id = h.id)"
                    " ON h.name = %s"
                    " LEFT JOIN (SELECT r.vm_id, r.blocked, v.user_id FROM vm_runtimes r"
                    " JOIN vms v ON v.id = r.vm_id WHERE r.vm_id = %s) vm ON true",
                    (self.nodename, vm_id))
        except DatabaseUnavailable:
            raise HTTPError(503, "Database unavailable")
        row = rows[0] if rows and rows[0][0] is not None else None
        host = dict(zip(("id", "address", "state", "blocked"), row[:4])) if row else None
        if host is not None and self.broker.host_id != host["id"]:
            self.broker.host_id = host["id"]
            if self.listener is not None:
                channel = f"qvd_cmd_for_user_on_host{host['id']}"
                if self._abort_channel is not None:
                    await self.listener.unsubscribe(self._abort_channel, self._on_abort)
                self._abort_channel = channel
                await self.listener.subscribe(channel, self._on_abort)
        if vm_id is None:
            return host
        vm = rows[0][4:] if rows and rows[0][4] is not None else None
        return host, (dict(zip(("vm_id", "blocked", "user_id"), vm)) if vm else None)

    def _on_vm_state(self, channel, payload):
        self.broker.vm_state_changed(payload)

    def _on_abort(self, channel, payload):
        self._poll_aborts()

    def _poll_aborts(self):
        d = defer.ensureDeferred(self.broker.check_aborts())
        d.addErrback(lambda f: log.warn("cannot check for aborted sessions: {error}",
                                        error=f.getErrorMessage()))
        return d

    # -- dispatch ---------------------------------------------------------

    def handle(self, request, conn):
        """
        Answer C{request} on C{conn}; fires when done (a relay may then run).
        """
        return defer.ensureDeferred(self._handle(request, conn))

    async def _handle(self, request, conn):
        route = self.routes.get(request.path) if request.method == "GET" else None
        if route is None:
            conn.write(http.error_response(404))
            return
        try:
            await route(request, conn)
        except HTTPError as e:
            conn.write(e.response())
        except DatabaseUnavailable as e:
            log.warn("database unavailable while answering {path}: {error}",
                     path=request.path, error=e)
            conn.write(http.error_response(503))
        except Exception:
            log.failure("unexpected error answering {path}", path=request.path)
            conn.write(http.error_response(500))

    async def _host_for_request(self, count=True, vm_id=None):
        """This node's row (503 when it has none); with C{vm_id}: (host, vm), see L{_find_host}."""
        found = await self._find_host(vm_id)
        host = found if vm_id is None else found[0]
        if host is None:
            raise HTTPError(503, "Host is not registered in the database")
        if count:
            self.broker.count("http_requests")
        return found

    def _log_busy(self, error):
        """Logins refused as busy: logged at most every 10 s, with their count."""
        self._busy[1] += 1
        now = self.reactor.seconds()
        if self._busy[0] is None or now - self._busy[0] >= 10:
            log.warn("login refused, busy: {error} ({count} since the last such line)",
                     error=str(error), count=self._busy[1])
            self._busy[:] = [now, 0]

    async def _authenticate(self, request, conn):
        headers = request.headers_dict()
        credentials = headers.get("authorization")
        cached = conn.auth
        if cached is not None and credentials is not None and cached[0] == credentials:
            return cached[1]
        if credentials is None:
            raise HTTPError(401, headers=['WWW-Authenticate: Basic realm="QVD"'])
        self.broker.count("auth_attempts")
        try:
            result = await self.authenticator.authenticate(headers, conn.peer_ip)
        except AuthFailed as e:
            log.info("authentication refused from {ip}: {reason}", ip=conn.peer_ip, reason=e.reason)
            raise HTTPError(401, headers=['WWW-Authenticate: Basic realm="QVD"'])
        except AuthBusy as e:
            self._log_busy(e)
            raise HTTPError(503, "Busy: too many logins at once, retry", headers=["Retry-After: 1"])
        self.broker.count("auth_ok")
        conn.auth = (credentials, result)
        return result

    @staticmethod
    def _blocked(host):
        if host["blocked"]:
            raise HTTPError(503, "Server is blocked")

    # -- routes -----------------------------------------------------------

    async def ping(self, request, conn):
        host = await self._host_for_request(count=False)
        state = host["state"] or "stopped"
        if state != "running":
            raise HTTPError(503, f"Server is {state}")
        self._blocked(host)
        conn.write(http.response_with_body(200, "text/plain", b"I am alive!\r\n"))

    async def list_of_vm(self, request, conn, applications=False):
        host = await self._host_for_request()
        auth = await self._authenticate(request, conn)
        self._blocked(host)
        state = host["state"] or "stopped"
        if state != "running":
            raise HTTPError(503, f"Server is {state}")
        rows = await self.db.runQuery(
            "SELECT v.id, r.vm_state, v.name, r.blocked, o.is_application"
            " FROM vms v JOIN vm_runtimes r ON r.vm_id = v.id JOIN osfs o ON o.id = v.osf_id"
            " WHERE v.user_id = %s" + (" AND o.is_application" if applications else "")
            + " ORDER BY v.id", (auth.user_id,))
        vms = [{"id": vm_id, "state": state, "name": name, "blocked": int(blocked),
                "is_application": int(is_app)} for vm_id, state, name, blocked, is_app in rows]
        conn.write(http.response_with_body(200, "application/json", pretty_json(vms)))

    def list_of_applications(self, request, conn):
        return self.list_of_vm(request, conn, applications=True)

    async def _vm_request(self, request, conn, upgrade):
        """
        The checks shared by connect_to_vm and stop_vm, in the original's
        order; returns (host, auth, vm row, client params). The node's row
        and the VM's are read in one statement.
        """
        params = dict(request.query)
        vm_id = params.pop("id", None)
        try:
            wanted = int(vm_id) if vm_id is not None else None
        except ValueError:
            wanted = None
        if wanted is not None and not -2**31 <= wanted < 2**31:
            wanted = None
        host, vm = await self._host_for_request(vm_id=wanted if wanted is not None else 0)
        auth = await self._authenticate(request, conn)
        self._blocked(host)
        if upgrade:
            connection = (request.header("connection") or "").lower()
            if ("upgrade" not in [t.strip() for t in connection.split(",")]
                    or (request.header("upgrade") or "").strip().lower() != "qvd/1.0"):
                raise HTTPError(426)
        params.pop("file_name", None)
        if vm_id is None:
            raise HTTPError(422, "parameter id is missing")
        forbidden = [k for k in params if not (k.startswith("qvd.client.") or k.startswith("custom."))]
        if forbidden:
            raise HTTPError(403, "Invalid parameters " + " ".join(forbidden))
        if wanted is None or vm is None:
            raise HTTPError(404, "The requested virtual machine does not exist")
        if vm["blocked"]:
            raise HTTPError(403, "The requested virtual machine is offline for maintenance")
        return host, auth, vm, {k: ("" if v is None else v) for k, v in params.items()}

    @staticmethod
    def _unavailable(error):
        text = str(error).rstrip("\n")
        return HTTPError(503, f"The requested virtual machine is not available: {text}, retry later")

    async def connect_to_vm(self, request, conn):
        host, auth, vm, params = await self._vm_request(request, conn, upgrade=True)
        broker = self.broker
        session = broker.new_session(vm["vm_id"], conn, auth.tenant_id)
        conn.session = session
        relayed = False
        try:
            if vm["user_id"] != auth.user_id:
                raise BrokerError("You are not allowed to access requested virtual machine")
            began = self.reactor.seconds()

            def ended(relay):
                conn.session = None
                log.info("VM {vm}: session of {login} from {ip} ended after {seconds:.0f} s"
                         "{why}", vm=vm["vm_id"], login=auth.login, ip=conn.peer_ip,
                         seconds=self.reactor.seconds() - began,
                         why=f" ({relay.reason})" if relay.reason else "")
                broker.release(session, relay)
            await broker.connect(session, vm, params, auth, host["address"], ended)
            relayed = True
            log.info("VM {vm}: {login} connected from {ip}", vm=vm["vm_id"],
                     login=auth.login, ip=conn.peer_ip)
        except Exception as e:
            if session.aborted is not None and conn.lost:
                log.info("VM {vm}: client left during connect", vm=vm["vm_id"])
                raise HTTPError(503, "client left")
            if not isinstance(e, (BrokerError, DatabaseUnavailable)):
                log.failure("VM {vm}: connect failed", vm=vm["vm_id"])
            raise self._unavailable(e)
        finally:
            if not relayed:
                conn.session = None
                broker.release(session)

    async def stop_vm(self, request, conn):
        host, auth, vm, params = await self._vm_request(request, conn, upgrade=False)
        session = self.broker.new_session(vm["vm_id"], conn, auth.tenant_id)
        try:
            if vm["user_id"] != auth.user_id:
                raise BrokerError("You are not allowed to access requested virtual machine")
            await self.broker.stop_and_wait(session)
        except Exception as e:
            raise self._unavailable(e)
        finally:
            self.broker.forget(session)
        conn.write(http.response_with_body(200, "text/plain", b"Machine stopped\r\n"))

    async def authenticate_user(self, request, conn):
        await self._host_for_request(count=False)
        auth = await self._authenticate(request, conn)
        result = {}
        if dict(request.query).get("store_auth") == "1":
            result["auth_params_id"] = await self.broker.store_auth_params(auth)
        conn.write(http.response_with_body(200, "application/json", pretty_json(result)))

    async def create_auth_token(self, request, conn):
        await self._host_for_request(count=False)
        auth = await self._authenticate(request, conn)
        grant = await self.broker.create_token(auth)
        conn.write(http.response_with_body(200, "application/json", pretty_json(
            {"auth_params_id": grant.auth_params_id, "auth_token": grant.auth_token})))


@implementer(IHandshakeListener)
class L7RProtocol(protocol.Protocol):
    """
    One client connection.

    States: C{reading} (waiting for or reading a request; timers run),
    C{busy} (a request is being answered; bytes are buffered, the socket is
    paused past C{limits.max_request}), C{relaying} (after the 101),
    C{closed}.
    """

    def __init__(self, l7r):
        self.l7r = l7r
        self.settings = l7r.settings
        self.state = "reading"
        self.auth = None
        self.session = None
        self.relay = None
        self.lost = False
        self.peer_ip = ""
        self._timer = None
        self._handshake = None
        self._closing = None
        self._paused = False

    def connectionMade(self):
        self.parser = http.RequestParser(self.settings.limits)
        peer = self.transport.getPeer()
        self.peer_ip = getattr(peer, "host", "")
        self.l7r.connections.add(self)
        self._arm(self.settings.idle_timeout)
        if ISSLTransport.providedBy(self.transport) and self.settings.handshake_timeout > 0:
            self._handshake = self.l7r.reactor.callLater(
                self.settings.handshake_timeout, self._handshake_timed_out)

    def handshakeCompleted(self):
        if self._handshake is not None and self._handshake.active():
            self._handshake.cancel()
        self._handshake = None

    def _handshake_timed_out(self):
        self._handshake = None
        log.debug("client {ip}: no TLS handshake within {t:g} s: aborted",
                  ip=self.peer_ip, t=self.settings.handshake_timeout)
        self.state = "closed"
        self.transport.abortConnection()

    def close(self):
        """
        Close the connection once what was written is sent; abort it if it
        is still open C{close_timeout} seconds later.
        """
        self.state = "closed"
        self._disarm()
        self.transport.loseConnection()
        if self._closing is None and not self.lost:
            self._closing = self.l7r.reactor.callLater(
                self.settings.close_timeout, self.transport.abortConnection)

    # timers: idle while no byte of the next request came; request once it started
    def _arm(self, seconds):
        self._disarm()
        self._timer = self.l7r.reactor.callLater(seconds, self._timed_out)

    def _disarm(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self):
        self._timer = None
        if self.state == "reading":
            log.info("client {ip} too slow: cut", ip=self.peer_ip)
            self.transport.write(http.error_response(408))
            self.close()

    def write(self, data):
        if not self.lost:
            self.transport.write(data)

    def dataReceived(self, data):
        if self.state == "relaying":
            self.relay.from_client(data)
            return
        if self.state == "closed":
            return
        starting = self.parser.buffered == 0
        self.parser.feed(data)
        if self.state == "reading":
            if starting and self.parser.buffered:
                self._arm(self.settings.request_timeout)
            self._next()
        elif self.parser.buffered > self.settings.limits.max_request and not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def _next(self):
        while self.state == "reading":
            try:
                request = self.parser.next_request()
            except http.HTTPParseError as e:
                log.info("bad request from {ip}: {error}", ip=self.peer_ip, error=e)
                self.transport.write(http.error_response(e.status, e.message))
                self.close()
                return
            if request is None:
                return
            self.state = "busy"
            self._disarm()
            d = self.l7r.handle(request, self)
            d.addBoth(self._answered)

    def _answered(self, result):
        if isinstance(result, Exception) or hasattr(result, "getErrorMessage"):
            log.failure("request failed", result)
        if self.state != "busy":
            return
        self.state = "reading"
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        self._arm(self.settings.request_timeout if self.parser.buffered
                  else self.settings.idle_timeout)
        self._next()

    def start_relay(self, relay):
        """
        Switch to relaying: from now on bytes go to C{relay}.
        """
        self.state = "relaying"
        self.relay = relay
        self._disarm()
        relay.start(self.parser.take_buffer())
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()

    def connectionLost(self, reason):
        self.lost = True
        self._disarm()
        for call in (self._handshake, self._closing):
            if call is not None and call.active():
                call.cancel()
        self._handshake = self._closing = None
        self.l7r.connections.discard(self)
        previous, self.state = self.state, "closed"
        if previous == "relaying" and self.relay is not None:
            self.relay.client_lost(reason)
        elif self.session is not None:
            self.session.abort("the client closed the connection")


class L7RFactory(protocol.Factory):
    def __init__(self, l7r):
        self.l7r = l7r

    def buildProtocol(self, addr):
        p = L7RProtocol(self.l7r)
        p.factory = self
        return p
