"""
The state machine of one user session (one client connection's claim of one
VM, from the claim to the release) as pure values: no I/O, no clock.

    machine = UserSession()
    step = machine.handle("connect")     # Transition("disconnected", "claiming", ...)
    machine.timeout(settings)            # seconds the state may last (BrokerSettings)
    machine.row                          # the user_state its vm_runtimes row has now

The broker (L{qvd.l7r.broker}) performs each step, feeds its outcome back as
an event and gives every state the deadline of L{TIMEOUTS}; a deadline that
passes is the event C{timeout}. Once the session is ending (L{ENDING}: it was
aborted, failed or left) a late answer of an abandoned step is ignored
(C{handle} returns None); any other event a state does not expect is a bug
and raises L{UnexpectedEvent}.

States, and the C{vm_runtimes.user_state} the session's row has in each (L{ROW})::

    disconnected --connect--> claiming --claimed--> assigning --assigned--> starting_vm
        ^                      |    ^                 (connecting from here on)  |
        |                      +held+  another client holds the VM:      vm_running
        |                              abort it, wait, claim again              v
        |   connected <--nx_connected-- connecting_x <--x_listening-- waiting_x <--x_started-- starting_x
        |     |   ^  timeout: the claim is checked again (abort_poll)
        |     +---+
        |     | client_gone, abort, failed
        |     v
        +--released-- releasing <--failed, timeout, abort, client_gone-- every state above
                       |    ^
                       +----+ failed, timeout: the release is retried (release_retry)

C{abort} is another client taking the session over (or an administrator
disconnecting the user); C{client_gone} the client's connection closing.
Whether a claim found on the row may be taken (free, expired, left by a dead
L7R) or belongs to a live session to abort is L{claim_verdict}.
"""

import attrs

#: state -> the user_state of the session's row while in it (None: the row
#: is not this session's: before its claim)
ROW = {
    "disconnected": "disconnected",
    "claiming": None,
    "assigning": "connecting",
    "starting_vm": "connecting",
    "starting_x": "connecting",
    "waiting_x": "connecting",
    "connecting_x": "connecting",
    "connected": "connected",
    "releasing": "disconnected",
}

#: states in which the session is ending: late events are ignored there
ENDING = frozenset({"releasing", "disconnected"})

#: the states of the connect sequence, in order
CONNECTING = ("claiming", "assigning", "starting_vm", "starting_x", "waiting_x", "connecting_x")

#: state -> the seconds it may last, from the session's BrokerSettings
TIMEOUTS = {
    "claiming": lambda s: s.takeover,
    "assigning": lambda s: s.vm_start,
    "starting_vm": lambda s: s.vm_start,
    # every x_start try may take the agent's timeout, then a pause
    "starting_x": lambda s: (s.x_start_retries + 1) * (s.vma_timeout + s.poll_x),
    "waiting_x": lambda s: s.x_start,
    "connecting_x": lambda s: s.nx_connect,
    "connected": lambda s: s.abort_poll,
    "releasing": lambda s: s.release_retry,
}

#: the happy path: state -> (event, next state)
_FORWARD = {
    "disconnected": ("connect", "claiming"),
    "claiming": ("claimed", "assigning"),
    "assigning": ("assigned", "starting_vm"),
    "starting_vm": ("vm_running", "starting_x"),
    "starting_x": ("x_started", "waiting_x"),
    "waiting_x": ("x_listening", "connecting_x"),
    "connecting_x": ("nx_connected", "connected"),
    "connected": ("client_gone", "releasing"),
    "releasing": ("released", "disconnected"),
}


def _table():
    table = {(state, event): new for state, (event, new) in _FORWARD.items()}
    for state in CONNECTING:
        for event in ("failed", "timeout", "abort", "client_gone"):
            table[(state, event)] = "releasing"
    table[("claiming", "held")] = "claiming"
    table[("connected", "timeout")] = "connected"
    table[("connected", "abort")] = "releasing"
    table[("connected", "failed")] = "releasing"
    table[("releasing", "failed")] = "releasing"
    table[("releasing", "timeout")] = "releasing"
    return table


#: (state, event) -> new state
TRANSITIONS = _table()

#: what the broker does on entering each state
ENTER = {
    "disconnected": (),
    "claiming": ("claim",),
    "assigning": ("assign",),
    "starting_vm": ("start_vm",),
    "starting_x": ("start_x",),
    "waiting_x": ("wait_x",),
    "connecting_x": ("connect_x",),
    "connected": ("relay",),
    "releasing": ("release",),
}

#: actions of particular transitions, before the new state's ENTER actions
#: (re-entering a state runs only these)
TRANSITION_ACTIONS = {
    ("claiming", "held"): ("abort_other", "wait", "claim"),
    ("connected", "timeout"): ("check_claim",),
    ("releasing", "failed"): ("wait", "release"),
    ("releasing", "timeout"): ("release",),
    ("connected", "abort"): ("cut_relay",),
    ("connected", "failed"): ("cut_relay",),
}


class UnexpectedEvent(Exception):
    """An event the session's current state has no edge for (a bug of the caller)."""


@attrs.frozen
class Transition:
    """
    One step: C{old} -> C{new} on C{event}; C{actions} for the broker, in
    order; C{reason} the failure it carried (for the client's 503).
    """
    old: str
    new: str
    event: str
    actions: tuple
    reason: str | None = None


@attrs.define
class UserSession:
    """
    The current state of one session and the first failure reason since it
    began to connect (L{reason}: what the client is told).
    """
    state: str = "disconnected"
    reason: str | None = None

    @property
    def row(self):
        return ROW[self.state]

    @property
    def connecting(self):
        return self.state in CONNECTING

    def timeout(self, settings):
        """The seconds the current state may last, or None (disconnected)."""
        how_long = TIMEOUTS.get(self.state)
        return None if how_long is None else how_long(settings)

    def target(self, event):
        return TRANSITIONS.get((self.state, event))

    def handle(self, event, reason=None):
        """
        Apply C{event}; the L{Transition}, or None when the session is ending
        and has no edge for it (a late answer: nothing changes).

        @raise UnexpectedEvent: a state of the connect sequence has no edge
            for C{event}.
        """
        new = self.target(event)
        if new is None:
            if self.state in ENDING:
                return None
            raise UnexpectedEvent(f"session in state {self.state!r} got {event!r}")
        old = self.state
        if event == "connect":
            self.reason = None
        if reason is not None and self.reason is None:
            self.reason = reason
        self.state = new
        actions = TRANSITION_ACTIONS.get((old, event), ())
        if new != old:
            actions += ENTER[new]
        return Transition(old, new, event, actions, reason)


@attrs.frozen
class Claim:
    """
    The claim a session finds on the VM's row (C{vm_runtimes}), as read
    under the row's lock.

    @ivar user_state: the row's C{user_state}.
    @ivar l7r_host_id: the node of the L7R that holds it (None: nobody).
    @ivar l7r_pid: that L7R's process.
    @ivar l7r_session: that L7R's session id.
    @ivar age: seconds since C{user_state} last changed.
    @ivar owner_state: C{host_runtimes.state} of C{l7r_host_id} (None: no row).
    """
    user_state: str
    l7r_host_id: int | None = None
    l7r_pid: int | None = None
    l7r_session: str | None = None
    age: float = 0.0
    owner_state: str | None = None


@attrs.frozen
class Claimant:
    """
    The L7R process that wants the claim: its node, the process id its
    claims carry (C{pid}) and every id that means "this process" in a row
    (C{pids}), the sessions alive in it, and how to tell whether another
    process of its node lives.
    """
    host_id: int | None
    pid: int
    pids: frozenset
    live_sessions: object
    pid_alive: object


def claim_verdict(claim, claimant, claim_max_age):
    """
    What the session may do with the claim C{claim} on its VM: C{'free'}
    (nobody holds it), C{'expired'} (a connect sequence older than
    C{claim_max_age}: its L7R hangs or is gone), C{'dead_l7r'} (the holder's
    process, or its node, is dead: claim it) or C{'held'} (a live session
    of another client: abort that one, then claim again).
    """
    if claim.user_state == "disconnected" or claim.l7r_host_id is None:
        return "free"
    if claim.user_state == "connecting" and claim.age > claim_max_age:
        return "expired"
    if claim.l7r_host_id == claimant.host_id:
        if claim.l7r_pid in claimant.pids:
            return "held" if claim.l7r_session in claimant.live_sessions else "dead_l7r"
        return "held" if claimant.pid_alive(claim.l7r_pid) else "dead_l7r"
    return "dead_l7r" if claim.owner_state in ("lost", None) else "held"
