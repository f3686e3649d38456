"""
The state machine of one VM on this node, as pure values (no I/O, no clock).

    machine = VMMachine(debug=False)
    step = machine.handle("start")          # a Transition, or None if ignored
    step.new, step.actions                  # "loading", ("persist", "load")

The supervisor (L{qvd.hkd.supervisor}) performs the actions, feeds the
outcomes back as events and arms the timeout of every state it enters; a
timeout is just the event C{timeout}. Events that a state does not expect are
ignored (C{handle} returns None), so a late answer from an abandoned step never
moves the VM.

Internal states and the C{vm_runtimes.vm_state} each one persists::

    stopped ----start----> loading -> preparing -> booting -> waiting_vma --vma_ok--> running
       |  \\__adopt____________________________________________________________________/ |
       |   \\_reap_dead -> cleaning                                         vma_dead (debug)
       |                                                                        |      v
       |   running --stop/expire_hard--> powering_off --timeout/poweroff_failed-->  debugging
       |                                      | exited              shutting_down  (vma_ok: running)
       |                                      v                         | timeout
       +<--cleaned-- cleaning <--exited/killed------------------------- killing
                        | failed/timeout                                    | failed/timeout
                        +----------------------> zombie <-------------------+
                                               (reap again every timeout)

    loading, preparing, booting, waiting_vma  -> 'starting'
    running -> 'running', debugging -> 'debugging', zombie -> 'zombie'
    powering_off, shutting_down, killing, cleaning -> 'stopping'
    stopped -> 'stopped'

Any failure (C{failed}, C{timeout}, C{vma_dead}, an unexpected C{exited})
carries a reason for the administrator; the first one is kept (L{VMMachine.reason})
and ends up in C{vm_runtimes.vm_state_reason}.
"""

import attrs

#: internal state -> the vm_state stored in the database
PERSISTED = {
    "stopped": "stopped",
    "loading": "starting",
    "preparing": "starting",
    "booting": "starting",
    "waiting_vma": "starting",
    "running": "running",
    "debugging": "debugging",
    "powering_off": "stopping",
    "shutting_down": "stopping",
    "killing": "stopping",
    "cleaning": "stopping",
    "zombie": "zombie",
}

STARTING = frozenset({"loading", "preparing", "booting", "waiting_vma"})

#: states in which the agent is pinged
PINGING = frozenset({"waiting_vma", "running", "debugging"})

#: what the supervisor does on entering each state
ENTER = {
    "stopped": ("persist_stopped",),
    "loading": ("persist", "load"),
    "preparing": ("prepare",),
    "booting": ("boot",),
    "waiting_vma": ("watch", "ping"),
    "running": ("persist", "watch", "ping"),
    "debugging": ("persist", "watch", "ping"),
    "powering_off": ("persist", "poweroff"),
    "shutting_down": ("persist", "shutdown"),
    "killing": ("persist", "kill"),
    "cleaning": ("persist", "cleanup"),
    "zombie": ("persist", "reap"),
}

#: (state, event) -> new state
TRANSITIONS = {
    ("stopped", "start"): "loading",
    ("stopped", "adopt"): "running",
    ("stopped", "adopt_stopping"): "powering_off",
    ("stopped", "reap"): "killing",
    ("stopped", "reap_dead"): "cleaning",

    ("loading", "loaded"): "preparing",
    ("loading", "failed"): "cleaning",
    ("loading", "timeout"): "cleaning",
    ("loading", "stop"): "cleaning",
    ("loading", "disowned"): "cleaning",

    ("preparing", "prepared"): "booting",
    ("preparing", "failed"): "cleaning",
    ("preparing", "timeout"): "cleaning",
    ("preparing", "stop"): "cleaning",
    ("preparing", "disowned"): "cleaning",

    ("booting", "booted"): "waiting_vma",
    ("booting", "failed"): "killing",
    ("booting", "timeout"): "killing",
    ("booting", "stop"): "killing",
    ("booting", "disowned"): "killing",

    ("waiting_vma", "vma_ok"): "running",
    ("waiting_vma", "timeout"): "shutting_down",
    ("waiting_vma", "stop"): "shutting_down",
    ("waiting_vma", "exited"): "cleaning",
    ("waiting_vma", "disowned"): "killing",

    ("running", "vma_dead"): "shutting_down",
    ("running", "stop"): "powering_off",
    ("running", "expire_hard"): "powering_off",
    ("running", "timeout"): "powering_off",
    ("running", "exited"): "cleaning",
    ("running", "disowned"): "killing",

    ("debugging", "vma_ok"): "running",
    ("debugging", "stop"): "shutting_down",
    ("debugging", "expire_hard"): "shutting_down",
    ("debugging", "timeout"): "shutting_down",
    ("debugging", "exited"): "cleaning",
    ("debugging", "disowned"): "killing",

    ("powering_off", "exited"): "cleaning",
    ("powering_off", "poweroff_failed"): "shutting_down",
    ("powering_off", "timeout"): "shutting_down",
    ("powering_off", "disowned"): "killing",

    ("shutting_down", "exited"): "cleaning",
    ("shutting_down", "timeout"): "killing",
    ("shutting_down", "failed"): "killing",
    ("shutting_down", "disowned"): "killing",

    ("killing", "killed"): "cleaning",
    ("killing", "exited"): "cleaning",
    ("killing", "failed"): "zombie",
    ("killing", "timeout"): "zombie",

    ("cleaning", "cleaned"): "stopped",
    ("cleaning", "failed"): "zombie",
    ("cleaning", "timeout"): "zombie",

    ("zombie", "reaped"): "stopped",
    ("zombie", "timeout"): "zombie",
}

#: replaces entries of TRANSITIONS when hkd.vm.debug.enable is set
DEBUG_TRANSITIONS = {
    ("running", "vma_dead"): "debugging",
}

#: actions of particular transitions, run before the new state's ENTER actions
TRANSITION_ACTIONS = {
    ("waiting_vma", "vma_ok"): ("count_ok",),
}

#: events that are a failure when they happen in these states (their reason is kept)
_EXPECTED_EXITS = frozenset({"powering_off", "shutting_down", "killing"})


@attrs.frozen
class Transition:
    """
    One step of the machine.

    @ivar old: the state before.
    @ivar new: the state after (may equal C{old}: the state is re-entered).
    @ivar event: what caused it.
    @ivar actions: what the supervisor must do, in order.
    @ivar reason: the failure reason this event carried, if any.
    """
    old: str
    new: str
    event: str
    actions: tuple
    reason: str | None = None


@attrs.define
class VMMachine:
    """
    The current state of one VM and its transition table.

    @ivar debug: dead agents send a running VM to 'debugging', not to a stop.
    @ivar state: the internal state (a key of L{PERSISTED}).
    @ivar reason: the first failure reason since the last start, or None.
    """
    debug: bool = False
    state: str = "stopped"
    reason: str | None = None

    @property
    def persisted(self):
        return PERSISTED[self.state]

    @property
    def starting(self):
        return self.state in STARTING

    def target(self, event):
        """
        The state C{event} would lead to, or None if it is ignored now.
        """
        key = (self.state, event)
        if self.debug and key in DEBUG_TRANSITIONS:
            return DEBUG_TRANSITIONS[key]
        return TRANSITIONS.get(key)

    def handle(self, event, reason=None):
        """
        Apply C{event}; return the L{Transition}, or None when the event does
        not apply to the current state (nothing changes then).
        """
        new = self.target(event)
        if new is None:
            return None
        old = self.state
        if event == "start":
            self.reason = None
        if reason is not None and self.reason is None:
            self.reason = reason
        self.state = new
        actions = TRANSITION_ACTIONS.get((old, event), ()) + ENTER[new]
        return Transition(old, new, event, actions, reason)


@attrs.define
class Liveness:
    """
    Whether a running VM's agent is dead: more than C{max_failures} failed
    pings in a row AND more than C{max_seconds} since the last answer (or
    since monitoring began).
    """
    max_failures: int
    max_seconds: float
    failures: int = 0
    last_ok: float = 0.0

    def reset(self, now):
        self.failures = 0
        self.last_ok = now

    def ok(self, now):
        self.reset(now)

    def failed(self, now):
        """
        Record a failed ping at time C{now}; return True once the agent is dead.
        """
        self.failures += 1
        return (self.failures >= self.max_failures
                and now - self.last_ok >= self.max_seconds)
