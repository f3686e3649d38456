"""
The X-session state machine of the VMA (reference 3.2), pure: no processes.

    machine = SessionMachine(clock, Timeouts(listening=30), effects)
    machine.start()                 # stopped -> starting (x_start on a stopped session)
    machine.provisioning()          # starting -> provisioning (creating the user)
    machine.spawned()               # provisioning -> starting (xinit/nxagent runs)
    machine.line("Session: Starting session at '...'.")   # -> listening
    machine.line("Session: Session started at '...'.")    # -> connected
    machine.exited()                # the xinit process is gone -> stopped

C{effects} (an L{ISessionEffects}) is told every state change and asked to
signal the session (C{HUP} suspends or resumes nxagent, C{TERM} ends it,
C{KILL} ends everything left of it). Requests (L{suspend}, L{stop}) only send
signals; the state follows what nxagent prints, as in the original. Every
state has a timeout (L{Timeouts}; 0 disables it) with a recovery edge:

    state         timeout edge
    starting      TERM -> stopping            (nxagent never listened)
    provisioning  TERM -> stopping            (user creation hung)
    listening     HUP  -> suspending if the session was connected before
                  (a resume nobody picked up), else TERM -> stopping
    connected     HUP                         (session time limit; 0 = none)
    suspending    TERM -> stopping            (nxagent did not suspend)
    suspended     TERM -> stopping            (idle session limit; 0 = none)
    stopping      KILL                        (nxagent ignored TERM; after only
                                               stopping_unused seconds for a
                                               session never connected)

C{stopped} is reached only when the session's process is gone (L{exited}),
never from a line alone, so a new session never races the old one for the
display; nxagent's C{terminated}/C{aborted} lines mean C{stopping}.
"""

import re

import attrs
from zope.interface import Interface

STATES = ("stopped", "starting", "provisioning", "listening", "connected",
          "suspending", "suspended", "stopping")

# nxagent's words (after "Session: ... session at" / "Session: Session ... at")
# -> the VMA's states (reference 3.2; terminated/aborted/stopped wait for the
# process to exit, see the module docstring).
NX_TO_X = {
    "initiating": "starting",
    "provisioning": "provisioning",
    "starting": "listening",
    "resuming": "listening",
    "started": "connected",
    "resumed": "connected",
    "suspending": "suspending",
    "suspended": "suspended",
    "terminating": "stopping",
    "aborting": "stopping",
    "aborted": "stopping",
    "terminated": "stopping",
    "stopped": "stopping",
}

_PID = re.compile(r"Info: Agent running with pid '(\d+)'")
_NX_STATE = (re.compile(r"Session: (\w+) session at"), re.compile(r"Session: Session (\w+) at"))
_SLAVE = re.compile(r"Listening to slave connections on port '(?:[^']*:)?(\d+)'")
_MEDIA = re.compile(r"Listening to multimedia connections on port '(?:[^']*:)?(\d+)'")


@attrs.frozen
class NxLine:
    """
    What a line of nxagent output means.

    @ivar kind: C{"pid"} (value: int), C{"state"} (value: nxagent's word,
        lower case), C{"slave"} or C{"media"} (value: the port).
    """
    kind: str
    value: object


def parse_nxagent_line(line):
    """
    The meaning of one line nxagent printed, or C{None} for a line that does
    not matter (nx-libs 3.5.99 wording, e.g. C{Session: Session started at
    'Thu Nov 26 01:19:27 2026'.}).
    """
    match = _PID.search(line)
    if match:
        return NxLine("pid", int(match.group(1)))
    for pattern in _NX_STATE:
        match = pattern.search(line)
        if match:
            return NxLine("state", match.group(1).lower())
    match = _SLAVE.search(line)
    if match:
        return NxLine("slave", int(match.group(1)))
    match = _MEDIA.search(line)
    if match:
        return NxLine("media", int(match.group(1)))
    return None


@attrs.frozen
class Timeouts:
    """
    Seconds each state may last before its timeout edge (0: no limit).
    Defaults are the original's where it had one.
    """
    starting: float = 20.0
    provisioning: float = 600.0
    listening: float = 10.0
    connected: float = 0.0
    suspending: float = 20.0
    suspended: float = 0.0
    stopping: float = 20.0
    #: not a state: how long a session no client ever connected to may stay
    #: in stopping before KILL (nothing in it to save; nxagent takes 15 s to
    #: exit on its own after an aborted negotiation)
    stopping_unused: float = 0.5
    #: not a state: after a resume HUP, HUP again every this many seconds
    #: while nxagent has not said "Resuming" (it drops the first HUP after a
    #: suspend caused by a broken link; a second HUP 1 s later is taken:
    #: measured on nx-libs 3.5.99.26). nxagent says "Resuming" as soon as it
    #: acts on a HUP, and a HUP after that would abort the resume: the
    #: retries stop at that line
    resume_retry: float = 1.0


class ISessionEffects(Interface):
    """
    What the session machine does to the world.
    """

    def state_changed(old, new):
        """
        The state went from C{old} to C{new} (hooks, state file, logs).
        """

    def signal(name):
        """
        Send C{name} (C{"HUP"}, C{"TERM"} or C{"KILL"}) to the session: HUP and
        TERM go to nxagent (or, before its pid is known, to the session's
        process); KILL goes to every process of the session.

        @return: C{True} if a live process got it, C{False} if there is no
            session process (the machine then goes to C{stopped}).
        """


class SessionMachine:
    """
    See the module docstring.

    @ivar state: one of L{STATES}.
    @ivar pid: nxagent's pid once it printed it, else C{None}.
    @ivar resumable: the session was connected at least once (so it has
        state worth keeping when a resume is not picked up).
    @ivar ports: C{{"slave": port, "media": port}} as nxagent reported them.
    """

    def __init__(self, clock, timeouts, effects):
        self._clock = clock
        self._timeouts = timeouts
        self._effects = effects
        self._timer = None
        self.state = "stopped"
        self.pid = None
        self.resumable = False
        self.ports = {}
        self._changes = 0           # counts _go calls (a stale resume retry stops)

    # -- inputs ---------------------------------------------------------------

    def start(self):
        """A new session is being created (x_start while stopped)."""
        self._require("start", ("stopped",))
        self.pid = None
        self.resumable = False
        self.ports = {}
        self._go("starting")

    def provisioning(self):
        """The user, group or home is being created."""
        self._require("provisioning", ("starting",))
        self._go("provisioning")

    def spawned(self):
        """The session process (xinit + nxagent) was started."""
        if self.state == "provisioning":
            self._go("starting")

    def resume(self):
        """
        x_start on a suspended session: the caller rewrote the options and
        now nxagent gets HUP and will listen again.
        """
        self._require("resume", ("suspended",))
        self._go("starting")
        self._signal("HUP")
        self._retry_resume(self._changes)

    def _retry_resume(self, changes):
        """
        HUP again while the session is still in the C{starting} entered by
        this resume (nxagent answers a HUP it acts on with "Resuming", which
        moves the state on; a HUP it dropped leaves it suspended for good).
        """
        every = self._timeouts.resume_retry
        if not every or every <= 0:
            return

        def again():
            if self._changes == changes and self.state == "starting":
                self._signal("HUP")
                self._retry_resume(changes)
        self._clock.callLater(every, again)

    def suspend(self):
        """x_suspend, or x_start on a connected session: HUP nxagent."""
        if self.state in ("listening", "connected"):
            self._signal("HUP")

    def stop(self):
        """x_stop: TERM nxagent (or the session process); stopped when it exits."""
        if self.state == "stopped":
            return
        if self.state != "stopping":
            self._go("stopping")
        self._signal("TERM")

    def line(self, text):
        """One line of nxagent's output."""
        event = parse_nxagent_line(text)
        if event is None or self.state == "stopped":
            return event
        if event.kind == "pid":
            self.pid = event.value
        elif event.kind in ("slave", "media"):
            self.ports[event.kind] = event.value
        elif event.kind == "state":
            new = NX_TO_X.get(event.value)
            if new is not None and new != self.state:
                if self.state == "stopping" and new != "stopping":
                    return event          # on its way out: do not come back
                if new == "connected":
                    self.resumable = True
                self._go(new)
        return event

    def exited(self):
        """The session process is gone (or never started)."""
        if self.state != "stopped":
            self.pid = None
            self._go("stopped")

    # -- internals ------------------------------------------------------------

    def _require(self, event, states):
        if self.state not in states:
            raise InvalidTransition(event, self.state)

    def _signal(self, name):
        if not self._effects.signal(name):
            self.exited()

    def _go(self, new):
        old, self.state = self.state, new
        self._changes += 1
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        seconds = getattr(self._timeouts, new, 0) if new != "stopped" else 0
        if new == "stopping" and not self.resumable:
            seconds = self._timeouts.stopping_unused or seconds
        if seconds and seconds > 0:
            self._timer = self._clock.callLater(seconds, self._timed_out, new)
        if old != new:
            self._effects.state_changed(old, new)

    def _timed_out(self, state):
        self._timer = None
        if self.state != state:
            return
        edge = _TIMEOUT_EDGES[state]
        edge(self)

    def _edge_term(self):
        self._go("stopping")
        self._signal("TERM")

    def _edge_listening(self):
        if self.resumable:
            self._go("suspending")
            self._signal("HUP")
        else:
            self._edge_term()

    def _edge_connected(self):
        self._go("connected")             # restart the limit timer, then ask to suspend
        self._signal("HUP")

    def _edge_kill(self):
        self._go("stopping")              # re-arm: if KILL does not end it, try again
        self._signal("KILL")


class InvalidTransition(Exception):
    """An input that the current state does not accept."""

    def __init__(self, event, state):
        super().__init__(f"cannot {event} an X session in state {state}")
        self.event = event
        self.state = state


# The timeout edge of each state (table of the docstring).
_TIMEOUT_EDGES = {
    "starting": SessionMachine._edge_term,
    "provisioning": SessionMachine._edge_term,
    "listening": SessionMachine._edge_listening,
    "connected": SessionMachine._edge_connected,
    "suspending": SessionMachine._edge_term,
    "suspended": SessionMachine._edge_term,
    "stopping": SessionMachine._edge_kill,
}
