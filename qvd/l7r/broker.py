"""
The session broker: from an authorised C{connect_to_vm} to a running relay
(reference 1.3, 1.5, 2.2-2.4), and the watcher that aborts this process's
sessions when another client takes them over.

    broker = Broker(reactor, db, settings, host_id, vma_factory)
    await broker.connect(session, params, auth)     # 102s ..., 101, relay started

Steps, each reported to the client with a C{102 Processing} line (texts of
the original): claim the session (C{user_state} disconnected -> connecting, or
abort the contending one and retry until C{takeover} seconds passed; a claim
left by a dead L7R expires), assign a node to a stopped VM (load balancer),
C{vm_cmd='start'} + NOTIFY the node, wait for C{running} (LISTEN
C{qvd_vm_state}, slow poll), C{x_start} on the VMA (retried when it says retry
later; its params carry a new NX cookie, C{qvd.nx.cookie}), poll C{x_state}
until C{listening}, connect to nxagent, set C{connected}, C{101}, relay
(which puts the cookie into the client's NX greeting). Every failure raises
L{BrokerError} with the reason the client gets inside its 503.

A L{Session} is one claim of one VM by one client connection; its state is
a L{qvd.runtime.session.UserSession} machine, which gives every step its
deadline and says whether a claim found on the VM's row may be taken. Its
waits end early when the VM's state changes (L{Session.wake}) and fail with
L{SessionAborted} when the session is aborted (takeover, client gone).
"""

import os
import secrets
import string
import time

import attrs
from psycopg2.extras import Json
from twisted.internet import defer, error as net_error
from qvd.logs import Logger

from qvd import loadbalancer
from qvd.l7r.auth import tokens
from qvd.vmaclient import VMAError, VMAUnreachable
from qvd.l7r.relay import Relay, connect_peer
from qvd.protocols import http, nx
from qvd.runtime.session import (
    ENDING, TIMEOUTS, Claim, Claimant, UserSession, claim_verdict)
from qvd.runtime.store import VM_COLUMNS, RuntimeStore
from qvd._pids import pid_alive

log = Logger()

_ALNUM = string.ascii_letters + string.digits

# Every live session of this process, by session id: what "the owning L7R
# session is alive" means for claims made by this process (several L7R
# objects may share one process in tests).
PROCESS_SESSIONS = {}


class BrokerError(Exception):
    """
    The VM cannot be given to the client; the text goes into the 503.
    """


class SessionAborted(BrokerError):
    """
    The session was aborted (taken over by another client, or the client left).
    """


def slave_key():
    """
    A random 64-character [A-Za-z0-9] key for the 101's X-QVD-Slave-Key.
    """
    return "".join(secrets.choice(_ALNUM) for _ in range(64))


#: first x_state poll after x_start (seconds); doubles up to poll_x
X_POLL_FIRST = 0.05


@attrs.frozen
class BrokerSettings:
    poll_vm: float = 2.0
    poll_x: float = 1.0
    takeover: float = 30.0
    vm_start: float = 270.0
    vm_stop: float = 270.0
    x_start_retries: int = 20
    x_start: float = 10.0
    vma_timeout: float = 4.0
    nx_connect: float = 10.0
    short_session: float = 120.0
    claim_max_age: float = 330.0
    abort_poll: float = 61.0
    release_retry: float = 5.0
    counters_flush: float = 1.0
    token_lifetime: int = 86400
    weights: loadbalancer.Weights = loadbalancer.Weights()

    @classmethod
    def from_config(cls, config, tenant=None):
        """The settings of C{tenant}'s sessions (None: the global ones)."""
        def f(key):
            return config.getfloat(key, tenant)
        return cls(
            poll_vm=f("internal.l7r.poll_time.vm"), poll_x=f("internal.l7r.poll_time.x"),
            takeover=f("internal.l7r.timeout.takeover"), vm_start=f("internal.l7r.timeout.vm_start"),
            vm_stop=f("internal.l7r.timeout.vm_stop"),
            x_start_retries=config.getint("internal.l7r.retry.x_start", tenant),
            x_start=f("internal.l7r.timeout.x_start"), vma_timeout=f("internal.l7r.timeout.vma"),
            nx_connect=f("internal.l7r.timeout.nx_connect"),
            short_session=f("internal.l7r.short_session"),
            claim_max_age=f("l7r.takeover.claim_max_age"), abort_poll=f("l7r.poll_time.abort"),
            release_retry=f("l7r.release.retry"),
            counters_flush=f("l7r.counters.flush_interval"),
            token_lifetime=config.getint("l7r.auth_token.lifetime", tenant),
            weights=loadbalancer.weights_from_config(config, tenant))


class Session:
    """
    One client's claim of one VM.

    @ivar id: the C{vm_runtimes.l7r_session} value of the claim.
    @ivar conn: the client connection (C{write(bytes)}, C{start_relay}).
    @ivar relay: the L{Relay} once running.
    """

    def __init__(self, reactor, vm_id, conn):
        self.reactor = reactor
        self.vm_id = vm_id
        self.conn = conn
        self.id = secrets.token_hex(12)
        self.relay = None
        self.aborted = None
        self.released = False
        self._sleeper = None
        self.settings = BrokerSettings()
        self.machine = UserSession()

    def step(self, event, reason=None):
        """Feed C{event} to the session's machine; its L{Transition} or None."""
        step = self.machine.handle(event, reason)
        if step is not None and step.new != step.old:
            log.debug("VM {vm}: session {id} {old} -> {new} ({event})", vm=self.vm_id,
                      id=self.id, old=step.old, new=step.new, event=event)
        return step

    def deadline(self, state):
        """
        When step C{state} of the machine times out (L{TIMEOUTS}), from now
        on the reactor's clock.
        """
        return self.reactor.seconds() + TIMEOUTS[state](self.settings)

    def tell(self, text):
        self.conn.write(http.processing(text))

    def check(self):
        if self.aborted is not None:
            raise SessionAborted(self.aborted)

    def sleep(self, seconds):
        """
        Wait C{seconds}, or less when L{wake} is called; fail with
        L{SessionAborted} when the session is aborted meanwhile.
        """
        self.check()
        d = defer.Deferred()
        call = self.reactor.callLater(seconds, lambda: d.called or d.callback(None))

        def done(result):
            if call.active():
                call.cancel()
            self._sleeper = None
            return result
        d.addBoth(done)
        self._sleeper = d
        return d

    def wake(self):
        if self._sleeper is not None and not self._sleeper.called:
            self._sleeper.callback(None)

    def abort(self, reason):
        """
        Abort the session: a running relay is cut, a wait fails.
        """
        if self.aborted is None:
            self.aborted = reason
        self.step("abort", reason)
        if self.relay is not None:
            self.relay.stop(reason)
        elif self._sleeper is not None and not self._sleeper.called:
            self._sleeper.errback(SessionAborted(reason))


class Broker:
    """
    @ivar settings: the global L{BrokerSettings}; a session runs with its
        user's tenant's (L{tenant_settings}) once authenticated.
    """

    def __init__(self, reactor, db, settings, vma_factory, random=None, pid=None, store=None):
        self.reactor = reactor
        self.db = db
        self.store = store if store is not None else RuntimeStore(db)
        self.settings = settings
        self._config = None
        self._by_tenant = {}
        self.vma_factory = vma_factory
        self.pid = os.getpid() if pid is None else pid
        self.host_id = None
        self.sessions = {}
        self._by_vm = {}
        self._pending_releases = {}
        self._release_call = None
        self._counts = {}
        self._flushing = False
        self.stopped = False
        import random as _random
        self.random = random or _random.random

    # -- counters ---------------------------------------------------------

    COUNTERS = ("http_requests", "auth_attempts", "auth_ok", "nx_attempts", "nx_ok",
                "short_sessions")

    def count(self, column):
        """
        Add one to C{host_counters.<column>} of this node. Counts are kept in
        memory and written by L{flush_counters} (every
        C{settings.counters_flush} seconds): one statement for many events.
        """
        if column not in self.COUNTERS:
            raise ValueError(f"no host counter {column!r}")
        self._counts[column] = self._counts.get(column, 0) + 1

    def flush_counters(self):
        """
        Write the counts gathered since the last flush; on failure they are
        kept for the next one.
        """
        if self.host_id is None or not self._counts or self._flushing:
            return defer.succeed(None)
        counts, self._counts = self._counts, {}
        columns = sorted(counts)
        sql = (f"INSERT INTO host_counters (host_id, {', '.join(columns)})"
               f" VALUES (%s{', %s' * len(columns)}) ON CONFLICT (host_id) DO UPDATE SET "
               + ", ".join(f"{c} = host_counters.{c} + EXCLUDED.{c}" for c in columns))
        self._flushing = True
        d = self.db.runOperation(sql, [self.host_id] + [counts[c] for c in columns])

        def failed(f):
            for c, n in counts.items():
                self._counts[c] = self._counts.get(c, 0) + n
            log.warn("cannot write host counters ({error}); keeping them",
                     error=f.getErrorMessage())

        def done(result):
            self._flushing = False
            return result
        d.addErrback(failed)
        d.addBoth(done)
        return d

    # -- connect_to_vm ----------------------------------------------------

    def configure(self, config):
        """A new configuration (live): global and per-tenant settings from C{config}."""
        self.settings = BrokerSettings.from_config(config)
        self._config = config
        self._by_tenant = {}

    def tenant_settings(self, tenant_id):
        """The settings of C{tenant_id}'s sessions (its database layer over the global)."""
        if self._config is None or tenant_id is None:
            return self.settings
        found = self._by_tenant.get(tenant_id)
        if found is None:
            found = self._by_tenant[tenant_id] = BrokerSettings.from_config(
                self._config, tenant_id)
        return found

    def new_session(self, vm_id, conn, tenant_id=None):
        session = Session(self.reactor, vm_id, conn)
        session.settings = self.tenant_settings(tenant_id)
        self.sessions[session.id] = session
        self._by_vm.setdefault(vm_id, set()).add(session)
        PROCESS_SESSIONS[session.id] = session
        return session

    async def connect(self, session, vm, client_params, auth, host_address, on_end):
        """
        Run the whole connect sequence for C{session}; return once the relay
        runs. C{vm} is the row of L{vm_row}. Raises L{BrokerError}.
        """
        vm_id = session.vm_id
        session.step("connect")
        # The VM's row, as the claim left it: assign and start_and_wait decide
        # on it, and a running VM's address and ports are the agent's and nxagent's.
        row = await self.takeover(session, auth.user_id)
        session.step("claimed")
        await self.assign(session, row)
        session.step("assigned")
        row = await self.start_and_wait(session, row)
        session.step("vm_running")
        token, properties = await self.token_and_properties(auth, vm_id)
        params = dict(client_params)
        params["auth_token"] = token
        params["host_address"] = host_address
        params.update(properties)
        params.update(auth.params)
        params["qvd.slave.key"] = key = slave_key()
        # A new NX cookie for every connection (a resume too: nxagent reads
        # its options, cookie included, again when it resumes), set last so
        # no property can choose it; the relay puts it into the greeting.
        params[nx.COOKIE_PARAM] = cookie = nx.new_cookie()
        vma = self.vma_factory(self.reactor, row["vm_address"], row["vm_vma_port"],
                               session.settings.vma_timeout, secret=row["vma_secret"] or "")
        await self.start_x(session, vma, params)
        session.step("x_started")
        await self.wait_x(session, vma)
        session.step("x_listening")
        await self.run_forwarder(session, row, key, on_end, cookie)

    async def vm_row(self, vm_id):
        """
        The VM's runtime row and name (L{qvd.runtime.store.VM_COLUMNS}), as a dict.
        """
        rows = await self.db.runQuery(
            "SELECT " + ", ".join("r." + c for c in VM_COLUMNS[:-1]) + ", v.name"
            " FROM vm_runtimes r JOIN vms v ON v.id = r.vm_id WHERE r.vm_id = %s", (vm_id,))
        if not rows:
            raise BrokerError(f"VM {vm_id} does not exist any more")
        return dict(zip(VM_COLUMNS, rows[0]))

    def claimant(self):
        """This process as a claimant of VMs (L{claim_verdict})."""
        return Claimant(host_id=self.host_id, pid=self.pid,
                        pids=frozenset({self.pid, os.getpid()}),
                        live_sessions=PROCESS_SESSIONS, pid_alive=pid_alive)

    async def takeover(self, session, user_id=None):
        """
        Claim the VM's session for user C{user_id} (C{real_user_id}),
        aborting a contending one (reference 1.5); return the VM's row as the
        claim left it (L{qvd.runtime.store.VM_COLUMNS}).
        """
        vm_id = session.vm_id
        deadline = session.deadline("claiming")

        while True:
            session.check()
            # A compare-and-set on one row under its row lock (FOR UPDATE):
            # contenders for the same VM are serialised by the lock and see
            # each other's committed claim; claims of different VMs never
            # conflict (SERIALIZABLE failed them on shared index pages).
            try:
                verdict, found, row = await self.store.claim(
                    vm_id, session.id, self.claimant(), self.settings.claim_max_age, user_id,
                    getattr(session.conn, "peer_ip", None))
            except LookupError as e:
                raise BrokerError(str(e))
            if verdict != "held":
                if verdict != "free":
                    log.info("VM {vm}: taking over a claim ({verdict}: {claim})",
                             vm=vm_id, verdict=verdict, claim=found)
                session.tell(f"Session acquired for VM_ID: {vm_id}")
                return row
            log.info("VM {vm}: session held ({state}) by L7R {host}/{pid}; aborting it",
                     vm=vm_id, state=found.user_state, host=found.l7r_host_id,
                     pid=found.l7r_pid)
            session.tell(f"Aborting contending session for VM_ID: {vm_id}")
            session.step("held")
            if self.reactor.seconds() > deadline:
                raise BrokerError("Unable to acquire VM, close other clients")
            await session.sleep(session.settings.poll_vm)

    async def check_abort(self, session):
        session.check()
        if not await self.store.claim_is_ours(session.vm_id, session.id):
            raise SessionAborted(f"Aborted by contending session VM VM_ID: {session.vm_id}")

    async def assign(self, session, row):
        """
        Give a stopped VM without node a node (reference 2.2); C{row} is
        the VM's (L{vm_row}).
        """
        vm_id = session.vm_id
        if row["host_id"] is not None:
            return
        session.tell(f"Assigning VM {vm_id} to host")
        host_id = await self.choose_host(vm_id, row["name"], session.settings.weights)

        # One conditional UPDATE: atomic, re-checks the state it was decided on.
        if not await self.store.assign_host(vm_id, host_id):
            raise BrokerError(f"Unable to start VM {vm_id}, state changed unexpectedly")
        await self.check_abort(session)

    async def choose_host(self, vm_id, vm_name, weights=None):
        """
        The node the load balancer picks for the VM (L{qvd.loadbalancer}),
        with C{weights} (default: the global ones).
        """
        try:
            chosen = await self.store.choose_host(vm_id, vm_name, weights or self.settings.weights,
                                                  self.random)
            return chosen.host_id
        except (loadbalancer.NoHostAvailable, loadbalancer.UnknownImageKind) as e:
            log.warn("VM {vm}: no node to start it on: {reason}", vm=vm_id, reason=e)
            raise BrokerError(f"Unable to start VM {vm_id}, can't assign to any host")

    def send_vm_cmd(self, vm_id, cmd, from_states):
        """
        Set C{vm_cmd} when the VM is in one of C{from_states} and NOTIFY its
        node, in one statement (the NOTIFY goes out when it commits).

        @return: a Deferred firing with the node's id, or None when the VM
            was not in those states (or has no node).
        """
        return self.store.send_vm_cmd(vm_id, cmd, from_states)

    async def start_and_wait(self, session, row):
        """
        Start a stopped VM and wait until it runs (reference 2.3); C{row} is
        the VM's (L{vm_row}). Returns the row of the running VM.
        """
        vm_id = session.vm_id
        deadline = session.deadline("starting_vm")
        if row["vm_state"] == "running":
            return row
        if row["vm_state"] == "stopped":
            session.tell("Starting virtual machine")

            if not await self.send_vm_cmd(vm_id, "start", ("stopped",)):
                raise BrokerError(f"Unable to start VM {vm_id}, state changed unexpectedly")
        while True:
            session.tell("Waiting for VM to reach state 'running'")
            await session.sleep(session.settings.poll_vm)
            await self.check_abort(session)
            row = await self.vm_row(vm_id)
            state = row["vm_state"]
            if state == "running":
                return row
            if (state == "stopped" and row["vm_cmd"] is not None) or state == "starting":
                if self.reactor.seconds() > deadline:
                    raise BrokerError(f"Unable to start VM {vm_id}, operation timed out!")
            else:
                raise BrokerError(f"Unable to start VM {vm_id} in state {state}")

    async def stop_and_wait(self, session):
        """
        Stop a VM and wait until it is stopped (stop_vm).
        """
        vm_id = session.vm_id
        deadline = self.reactor.seconds() + session.settings.vm_stop
        row = await self.vm_row(vm_id)
        if row["vm_state"] == "stopped":
            return
        if row["vm_state"] in ("starting", "running", "debugging"):
            session.tell("Stopping virtual machine")

            await self.send_vm_cmd(vm_id, "stop", ("starting", "running", "debugging"))
        while True:
            session.tell("Waiting for VM to reach state 'stopped'")
            await session.sleep(session.settings.poll_vm)
            row = await self.vm_row(vm_id)
            state = row["vm_state"]
            if state == "stopped":
                return
            if state in ("running", "stopping", "starting"):
                if self.reactor.seconds() > deadline:
                    raise BrokerError(f"Unable to stop VM {vm_id}, operation timed out!")
            else:
                raise BrokerError(f"Unable to stop VM {vm_id} in state {state}")

    async def create_token(self, auth, vm_id=None, multi_use=True):
        """
        Store the auth parameters and a token for the user (L{tokens}).

        @return: a L{tokens.TokenGrant}.
        """
        return await tokens.create_auth_token(
            self.db, auth, now=time.time(), lifetime=self.settings.token_lifetime,
            multi_use=multi_use, vm_id=vm_id)

    async def token_and_properties(self, auth, vm_id):
        """
        The token passed to the VMA as C{auth_token} (the auth parameters and
        a token for this VM, stored) and the VM's properties (L{PROPERTIES}),
        in one statement: (token, {key: value}).
        """
        token = secrets.token_urlsafe(32)
        rows = await self.db.runQuery(
            "WITH p AS (INSERT INTO user_auth_parameters (parameters) VALUES (%(params)s)"
            " RETURNING id),"
            " t AS (INSERT INTO user_tokens (token, user_id, vm_id, expiration, auth_params_id,"
            " multi_use) SELECT %(token)s, %(user)s, %(vm)s, %(expiration)s, p.id, true FROM p)"
            " " + self.PROPERTIES,
            {"params": Json(dict(auth.params)), "token": token, "user": auth.user_id,
             "vm": vm_id, "expiration": int(time.time()) + self.settings.token_lifetime})
        return token, {key: value for key, value, _ in rows}

    def store_auth_params(self, auth):
        return tokens.store_auth_parameters(self.db, auth.params)

    #: The VM's properties, OSF < DI < user < VM, later wins (reference 2.4):
    #: (key, value, rank) rows of VM C{%(vm)s}.
    PROPERTIES = (
        "SELECT pl.key, p.value, 1 AS rank FROM vms v JOIN osf_properties p ON p.osf_id = v.osf_id"
        " JOIN properties_list pl ON pl.id = p.property_id WHERE v.id = %(vm)s"
        " UNION ALL SELECT pl.key, p.value, 2 FROM vm_runtimes r"
        " JOIN di_properties p ON p.di_id = r.current_di_id"
        " JOIN properties_list pl ON pl.id = p.property_id WHERE r.vm_id = %(vm)s"
        " UNION ALL SELECT pl.key, p.value, 3 FROM vms v JOIN user_properties p ON p.user_id = v.user_id"
        " JOIN properties_list pl ON pl.id = p.property_id WHERE v.id = %(vm)s"
        " UNION ALL SELECT pl.key, p.value, 4 FROM vm_properties p"
        " JOIN properties_list pl ON pl.id = p.property_id WHERE p.vm_id = %(vm)s"
        " ORDER BY 3")

    async def start_x(self, session, vma, params):
        vm_id = session.vm_id
        session.tell(f"Starting X session at VM {vm_id}")
        error = None
        deadline = session.deadline("starting_x")
        for _ in range(session.settings.x_start_retries + 1):
            session.check()
            if self.reactor.seconds() > deadline:
                break
            try:
                await vma.x_start(params)
                return
            except (VMAError, VMAUnreachable) as e:
                error = e
                log.info("VM {vm}: x_start failed ({error}), retrying", vm=vm_id, error=e)
            await session.sleep(session.settings.poll_x)
            await self.check_abort(session)
        raise BrokerError(f"Unable to start X session on VM {vm_id}: {error}")

    async def wait_x(self, session, vma):
        """
        Poll x_state until C{listening}: first after 50 ms, then twice as
        long each time up to C{poll_x} (nxagent usually listens a few
        hundred ms after x_start; a fixed 1 s poll added most of a second
        to every login).
        """
        vm_id = session.vm_id
        deadline = session.deadline("waiting_x")
        session.tell(f"Waiting for X session to come up on VM {vm_id}")
        delay = min(X_POLL_FIRST, session.settings.poll_x)
        while True:
            session.check()
            try:
                state = await vma.x_state()
            except (VMAError, VMAUnreachable):
                state = None
            if state == "listening":
                return
            if state in (None, "starting"):
                if self.reactor.seconds() > deadline:
                    raise BrokerError(f"Unable to start X session on VM {vm_id}, operation timed out!")
            elif state != "provisioning":
                raise BrokerError(f"Unable to start X session on VM {vm_id}, state went to {state}")
            await session.sleep(delay)
            delay = min(delay * 2, session.settings.poll_x)

    async def connect_x(self, session, address, port):
        """
        Connect to nxagent's port. A refused connection is tried again
        (after 50 ms, doubling up to 0.5 s) until C{nx_connect} seconds
        passed: after a resume the agent says C{listening} as soon as
        nxagent prints "Resuming", a moment before nxagent listens again.
        """
        deadline = session.deadline("connecting_x")
        delay = X_POLL_FIRST
        while True:
            try:
                return await connect_peer(self.reactor, address, port, session.settings.nx_connect)
            except net_error.ConnectionRefusedError:
                if self.reactor.seconds() + delay > deadline:
                    raise
            await session.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def run_forwarder(self, session, row, key, on_end, nx_cookie=None):
        vm_id = session.vm_id
        session.tell(f"Connecting X session for VM_ID: {vm_id}")
        self.count("nx_attempts")
        try:
            peer = await self.connect_x(session, row["vm_address"], row["vm_x_port"])
        except SessionAborted:
            raise
        except Exception as e:
            raise BrokerError(f"Unable to connect to X server on VM VM_ID: {vm_id}: {e}")
        self.count("nx_ok")
        try:
            session.check()
            # Still our claim and not aborted: one conditional UPDATE.
            if not await self.store.mark_connected(vm_id, session.id):
                raise SessionAborted(f"Aborted by contending session VM VM_ID: {vm_id}")
            session.check()
        except BaseException:
            peer.transport.loseConnection()
            raise
        session.step("nx_connected")
        session.tell("Connection established")
        session.conn.write(http.switching_protocols(key))
        session.relay = Relay(session.conn, peer, on_end, clock=self.reactor.seconds,
                              nx_cookie=nx_cookie)
        session.conn.start_relay(session.relay)

    # -- release ----------------------------------------------------------

    def release(self, session, relay=None):
        """
        Give the VM back: C{user_state} disconnected when the claim is still
        ours. Retried until the database answers; never raises.
        """
        if session.released:
            return defer.succeed(None)
        session.released = True
        if session.machine.state not in ENDING:
            session.step("failed" if session.machine.connecting else "client_gone")
        self.forget(session)
        if relay is not None and relay.duration < session.settings.short_session:
            self.count("short_sessions")
        self._pending_releases[session.id] = session.vm_id
        d = self._release_one(session.id, session.vm_id)
        d.addCallback(lambda released: released and session.step("released"))
        return d

    def forget(self, session):
        """Drop C{session} from this process's sessions (and from the index by VM)."""
        self.sessions.pop(session.id, None)
        PROCESS_SESSIONS.pop(session.id, None)
        waiting = self._by_vm.get(session.vm_id)
        if waiting is not None:
            waiting.discard(session)
            if not waiting:
                del self._by_vm[session.vm_id]

    def _release_one(self, session_id, vm_id):
        d = self.store.release(vm_id, session_id)

        def ok(_):
            self._pending_releases.pop(session_id, None)
            return True

        def failed(f):
            log.warn("cannot release VM {vm} ({error}); retrying in {delay}s", vm=vm_id,
                     error=f.getErrorMessage(), delay=self.settings.release_retry)
            if not self.stopped and (self._release_call is None
                                     or not self._release_call.active()):
                self._release_call = self.reactor.callLater(
                    self.settings.release_retry, self._retry_releases)
        d.addCallbacks(ok, failed)
        return d

    def stop(self):
        """
        Stop retrying releases (the rows are reset by the next takeover or
        by the abort watcher once this process is gone).
        """
        self.stopped = True
        if self._release_call is not None and self._release_call.active():
            self._release_call.cancel()

    def _retry_releases(self):
        for session_id, vm_id in list(self._pending_releases.items()):
            self._release_one(session_id, vm_id)

    # -- aborts from other L7Rs ---------------------------------------------

    async def check_aborts(self):
        """
        Abort this broker's sessions whose row got C{user_cmd='abort'}, and
        reset rows of this node left by dead L7R processes.
        """
        if self.host_id is None:
            return
        rows = await self.store.claims_on_node(self.host_id)
        claimant = self.claimant()
        for vm_id, pid, session_id, cmd in rows:
            session = self.sessions.get(session_id)
            if session is not None:
                if cmd == "abort":
                    log.info("VM {vm}: session aborted by a contending client", vm=vm_id)
                    session.abort(f"Aborted by contending session VM VM_ID: {vm_id}")
            # not a live session of this process: is its L7R process dead?
            elif claim_verdict(Claim(user_state="connected", l7r_host_id=self.host_id,
                                     l7r_pid=pid, l7r_session=session_id),
                               claimant, self.settings.claim_max_age) == "dead_l7r":
                log.info("VM {vm}: resetting the session left by dead L7R process {pid}",
                         vm=vm_id, pid=pid)
                await self.store.reset_claim(vm_id, session_id)

    def vm_state_changed(self, payload):
        """
        A NOTIFY qvd_vm_state: wake the sessions waiting on that VM (found
        by its id, whatever the number of sessions: every node's state
        changes reach every L7R).
        """
        try:
            vm_id = int(payload.split(":", 1)[0])
        except ValueError:
            log.warn("qvd_vm_state payload {payload!r} names no VM", payload=payload)
            return
        for session in list(self._by_vm.get(vm_id, ())):
            session.wake()
