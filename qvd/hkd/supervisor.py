"""
One supervisor per VM on this node: runs the L{qvd.hkd.machine.VMMachine}.

    sup = Supervisor(vm_id, clock, store, driver, vma_factory, settings,
                     on_change=node.vm_changed)
    sup.handle("start")        # or "adopt", "reap", "reap_dead", "stop", ...
    sup.detach()               # HKD shutdown: forget the VM, leave it running

The supervisor performs the actions the machine asks for (database writes,
driver calls, agent calls), turns their outcomes into events, and arms the
timeout of every state it enters. Driver calls run one at a time (a
C{DeferredLock}); a call still running when its state times out is cancelled.
Outcomes that arrive after the machine has moved on are ignored. Database
writes of the state are retried until PostgreSQL answers, newest state wins.
"""

import attrs
from twisted.internet import defer
from qvd.logs import Logger
from twisted.python.failure import Failure

from qvd.hkd.machine import PERSISTED, PINGING, Liveness, VMMachine
from qvd.hkd.store import StartError
from qvd.virt.firewall import VMPort
from qvd.virt.interfaces import VirtError

log = Logger()

_TIMEOUT_REASONS = {
    "loading": "reading the VM's configuration took longer than {t:g} s",
    "preparing": "preparing the VM's storage took longer than {t:g} s",
    "booting": "the hypervisor did not start the VM within {t:g} s",
    "waiting_vma": "the VM's agent did not answer within {t:g} s of the VM's start "
                   "(hkd.vm.timeout.waiting_vma)",
    "running": "the VM ran longer than hkd.vm.timeout.running ({t:g} s)",
    "debugging": "the VM stayed in 'debugging' longer than {t:g} s",
    "powering_off": "the VM did not power off within {t:g} s of the agent's poweroff",
    "shutting_down": "the VM did not shut down within {t:g} s",
    "killing": "the VM could not be killed within {t:g} s",
    "cleaning": "cleaning up the VM took longer than {t:g} s",
    "zombie": "reaping the zombie VM is taking longer than {t:g} s; retrying",
}


@attrs.frozen
class SupervisorSettings:
    """
    @ivar timeouts: internal state -> seconds (0 or missing: none).
    """
    timeouts: dict = attrs.field(factory=dict)
    debug: bool = False
    ping_starting: float = 0.1
    ping_interval: float = 5.0
    dead_failures: int = 3
    dead_seconds: float = 20.0
    retry_delay: float = 1.0
    vma_port: int = 3030

    @classmethod
    def from_config(cls, config):
        states = [s for s in PERSISTED if s != "stopped"]
        return cls(
            timeouts={s: config.getfloat(f"hkd.vm.timeout.{s}") for s in states},
            debug=config.getbool("hkd.vm.debug.enable"),
            ping_starting=config.getfloat("hkd.vm.vma.ping.starting"),
            ping_interval=config.getfloat("hkd.vm.vma.ping.interval"),
            dead_failures=config.getint("hkd.vm.vma.dead.failures"),
            dead_seconds=config.getfloat("hkd.vm.vma.dead.seconds"),
            retry_delay=config.getfloat("hkd.database.retry.delay"),
            vma_port=config.getint("hkd.vm.vma.port"),
        )


class _Refused:
    """The failure of a step started early, held as a value until it is needed."""

    def __init__(self, failure):
        self.failure = failure

    @staticmethod
    def raise_(result):
        return result.failure if isinstance(result, _Refused) else result


def _describe(failure):
    value = failure.value
    text = str(value).strip() or type(value).__name__
    return text


class Supervisor:
    """
    @ivar vm_id: the VM.
    @ivar machine: its L{VMMachine}.
    @ivar spec: the L{VMSpec} in use (None before loading).
    @ivar history: the transitions so far (for tests and debugging).
    """

    def __init__(self, vm_id, clock, store, driver, vma_factory, settings,
                 on_change=None, spec=None, persisted=None, firewall=None):
        self.vm_id = vm_id
        self.clock = clock
        self.store = store
        self.driver = driver
        self.vma_factory = vma_factory
        self.settings = settings
        self.on_change = on_change
        self.firewall = firewall
        self.spec = spec
        self.machine = VMMachine(debug=settings.debug)
        self.history = []
        self.pid = None
        self.detached = False
        self._epoch = 0
        self._timer = None
        self._op = None
        self._lock = defer.DeferredLock()
        self._ping_call = None
        self._ping_d = None
        self._watch_d = None
        self._filtering = None      # the packet filter installed during 'preparing'
        self._liveness = Liveness(settings.dead_failures, settings.dead_seconds)
        self._want = None
        self._written = persisted
        self._writing = False
        self._write_wait = None
        self._stopped_waiters = []
        self._soft_expired = None
        self._handling = False
        self._queue = []
        self._touched = float("-inf")

    @property
    def state(self):
        return self.machine.state

    def __repr__(self):
        return f"<Supervisor vm={self.vm_id} state={self.state}>"

    # -- events ------------------------------------------------------------------

    def handle(self, event, reason=None):
        """
        Feed C{event} to the machine and perform the resulting actions.

        @return: the L{Transition}, or None when the event was ignored.
        """
        if self.detached:
            return None
        if self._handling:
            # an action produced an event synchronously: finish this step first
            self._queue.append((event, reason))
            return None
        self._handling = True
        try:
            step = self._step(event, reason)
            while self._queue and not self.detached:
                self._step(*self._queue.pop(0))
        finally:
            self._handling = False
        return step

    def _step(self, event, reason):
        step = self.machine.handle(event, reason)
        if step is None:
            log.debug("VM {vm_id}: event {event} ignored in state {state}",
                      vm_id=self.vm_id, event=event, state=self.state)
            return None
        self.history.append(step)
        if reason is not None and self.machine.reason == reason:
            log.error("VM {vm_id}: {reason}", vm_id=self.vm_id, reason=reason)
        log.info("VM {vm_id}: {old} -> {new} ({event})", vm_id=self.vm_id,
                 old=step.old, new=step.new, event=event)
        self._epoch += 1
        self._arm_timer(step.new)
        if step.new not in PINGING:
            self._stop_pinging()
        for action in step.actions:
            getattr(self, "_do_" + action)()
        if self.on_change is not None:
            self.on_change(self, step)
        return step

    def _arm_timer(self, state):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        seconds = self.settings.timeouts.get(state, 0)
        if seconds and seconds > 0:
            epoch = self._epoch
            self._timer = self.clock.callLater(seconds, self._timed_out, epoch, state, seconds)

    def _timed_out(self, epoch, state, seconds):
        self._timer = None
        if epoch != self._epoch:
            return
        if self._op is not None:
            op, self._op = self._op, None
            op.cancel()
        reason = _TIMEOUT_REASONS.get(state, "timed out after {t:g} s in state " + state)
        self.handle("timeout", reason.format(t=seconds))

    def whenStopped(self):
        """
        @return: a Deferred that fires once the VM is stopped and that is
            persisted (at once if it is already).
        """
        if self.state == "stopped" and not self._writing:
            return defer.succeed(None)
        d = defer.Deferred()
        self._stopped_waiters.append(d)
        return d

    def detach(self):
        """
        Stop supervising without touching the VM (HKD shutdown): timers,
        pings and watches are cancelled, nothing more is written.
        """
        self.detached = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._stop_pinging()
        if self._watch_d is not None:
            d, self._watch_d = self._watch_d, None
            d.cancel()
        if self._write_wait is not None and self._write_wait.active():
            self._write_wait.cancel()

    # -- driver operations -----------------------------------------------------

    def _run_op(self, ok_event, function):
        """
        Run C{function} (returning a Deferred) under the driver lock; fire
        C{ok_event} with its result, or C{failed} with its error, unless the
        machine has moved on in the meantime.
        """
        epoch = self._epoch

        def run():
            if epoch != self._epoch or self.detached:
                return None
            d = defer.maybeDeferred(function)
            self._op = d
            return d

        def done(result):
            if self._op is not None and epoch == self._epoch:
                self._op = None
            if epoch == self._epoch:
                self.handle(ok_event)
            return result

        def failed(failure):
            if failure.check(defer.CancelledError):
                return None
            if epoch == self._epoch:
                self._op = None
                self.handle("failed", _describe(failure))
            else:
                log.warn("VM {vm_id}: a late step failed: {error}", vm_id=self.vm_id,
                         error=_describe(failure))
            return None

        d = self._lock.run(run)
        d.addCallbacks(done, failed)
        return d

    def _do_load(self):
        epoch = self._epoch

        def loaded(spec):
            self.spec = spec
            return spec

        def failed(failure):
            if epoch != self._epoch:
                return
            if failure.check(StartError):
                reason = str(failure.value)
            else:
                reason = f"cannot read the VM's configuration: {_describe(failure)}"
            self.handle("failed", reason)

        d = defer.maybeDeferred(self.store.load_for_start, self.vm_id)
        d.addCallback(loaded)
        d.addCallbacks(lambda _: epoch == self._epoch and self.handle("loaded"), failed)

    def _do_prepare(self):
        # The packet filter goes in while the storage is prepared; the start
        # waits for both (a refusal is kept for it, not logged as unhandled).
        self._filtering = self.filter().addErrback(_Refused)
        self._run_op("prepared", lambda: self.driver.prepare(self.spec))

    def _do_boot(self):
        filtering, self._filtering = self._filtering, None

        def start():
            # Filtered before it starts: a desktop never runs unfiltered.
            d = filtering if filtering is not None else self.filter()
            d.addCallback(_Refused.raise_)
            d.addCallback(lambda _: self.driver.start(self.spec))
            return d.addCallback(self._started)
        self._run_op("booted", start)

    def filter(self):
        """
        Install the packet filter of this VM (L{qvd.virt.firewall}); a
        Deferred (at once without a firewall).
        """
        if self.firewall is None or self.spec is None:
            return defer.succeed(None)
        try:
            port = VMPort(self.vm_id, self.driver.port_name(self.vm_id), self.spec.ip,
                          self.spec.mac)
        except VirtError as e:
            return defer.fail(e)
        return self.firewall.allow(port)

    def _unfilter(self, result=None):
        if self.firewall is None:
            return result
        return self.firewall.forget(self.vm_id).addCallback(lambda _: result)

    def _started(self, running):
        self.pid = getattr(running, "pid", None)
        if self.pid is not None:
            self.store.set_pid(self.vm_id, self.pid).addErrback(lambda f: None)

    def _do_shutdown(self):
        self._run_op("shutdown_sent", lambda: self.driver.shutdown(self.vm_id))

    def _do_kill(self):
        self._run_op("killed", lambda: self.driver.kill(self.vm_id))

    @defer.inlineCallbacks
    def _spec_for_cleanup(self):
        if self.spec is None:
            self.spec = yield self.store.load_for_cleanup(self.vm_id)
        return self.spec

    def _do_cleanup(self):
        def cleanup():
            d = self._spec_for_cleanup().addCallback(self.driver.cleanup)
            return d.addCallback(self._unfilter)
        self._run_op("cleaned", cleanup)

    def _do_reap(self):
        def reap():
            d = defer.maybeDeferred(self.driver.kill, self.vm_id)
            d.addCallback(lambda _: self._spec_for_cleanup())
            d.addCallback(self.driver.cleanup)
            return d.addCallback(self._unfilter)
        self._run_op("reaped", reap)

    def _do_watch(self):
        if self._watch_d is not None:
            return
        d = defer.maybeDeferred(self.driver.watch, self.vm_id)
        self._watch_d = d

        def exited(result):
            if self._watch_d is d:
                self._watch_d = None
            if isinstance(result, Failure) and result.check(defer.CancelledError):
                return None
            expected = self.state in ("powering_off", "shutting_down", "killing")
            reason = None if expected else "the VM stopped by itself"
            self.handle("exited", reason)
            return None
        d.addBoth(exited)

    # -- the agent ------------------------------------------------------------------

    def _vma(self):
        if self.spec is None:
            return self.vma_factory("", self.settings.vma_port)
        return self.vma_factory(self.spec.ip, self.settings.vma_port,
                                secret=self.spec.vma_secret)

    def _do_ping(self):
        if self.state in ("running", "debugging"):
            self._liveness.reset(self.clock.seconds())
        if self._ping_call is None and self._ping_d is None:
            self._ping_call = self.clock.callLater(0, self._ping)

    def _stop_pinging(self):
        if self._ping_call is not None and self._ping_call.active():
            self._ping_call.cancel()
        self._ping_call = None
        if self._ping_d is not None:
            d, self._ping_d = self._ping_d, None
            d.cancel()

    def _ping(self):
        self._ping_call = None
        if self.detached or self.state not in PINGING or self.spec is None:
            return
        d = defer.maybeDeferred(self._vma().ping)
        self._ping_d = d

        def answered(_):
            if self._ping_d is not d:
                return
            self._ping_d = None
            self._liveness.ok(self.clock.seconds())
            now = self.clock.seconds()
            if self.state in ("running", "debugging") and now - self._touched >= 30:
                # vm_runtimes.vma_ok_ts, at most every 30 s (one write per VM)
                self._touched = now
                self.store.touch_vma(self.vm_id).addErrback(lambda f: None)
            if self.state in ("waiting_vma", "debugging"):
                self.handle("vma_ok")
            self._next_ping()

        def silent(failure):
            if self._ping_d is not d:
                return
            self._ping_d = None
            if failure.check(defer.CancelledError):
                return
            if self.state == "running" and self._liveness.failed(self.clock.seconds()):
                self.handle("vma_dead",
                            f"the VM's agent did not answer {self._liveness.failures} pings "
                            f"in {self.clock.seconds() - self._liveness.last_ok:.0f} s "
                            f"(last error: {_describe(failure)})")
            self._next_ping()
        d.addCallbacks(answered, silent)

    def _next_ping(self):
        if self.detached or self.state not in PINGING or self._ping_call is not None:
            return
        delay = (self.settings.ping_starting if self.state == "waiting_vma"
                 else self.settings.ping_interval)
        self._ping_call = self.clock.callLater(delay, self._ping)

    def _do_poweroff(self):
        epoch = self._epoch
        if self.spec is None or not self.spec.ip:
            self.handle("poweroff_failed")
            return
        d = defer.maybeDeferred(self._vma().poweroff)

        def failed(failure):
            if epoch == self._epoch:
                self.handle("poweroff_failed")
        d.addCallbacks(lambda _: None, failed)

    def expire_soft(self, stamp):
        """
        Tell the agent that the VM's soft expiration (at C{stamp}) has passed,
        once per C{stamp}.
        """
        if self.state != "running" or self._soft_expired == stamp or self.spec is None:
            return
        self._soft_expired = stamp
        d = defer.maybeDeferred(self._vma().expire, "soft")
        d.addErrback(lambda f: log.warn("VM {vm_id}: soft expiration not delivered: {error}",
                                        vm_id=self.vm_id, error=_describe(f)))

    def _do_count_ok(self):
        self.store.count_ok(self.vm_id).addErrback(
            lambda f: log.warn("VM {vm_id}: run_ok not counted: {error}",
                               vm_id=self.vm_id, error=_describe(f)))

    # -- persistence ---------------------------------------------------------------

    def _do_persist(self):
        self._want = (self.machine.persisted, self.machine.reason)
        self._kick_writer()

    def _do_persist_stopped(self):
        self._watch_d = None
        self.pid = None
        self._do_persist()

    def _kick_writer(self):
        if self._writing or self.detached:
            return
        self._writing = True
        defer.ensureDeferred(self._writer()).addErrback(
            lambda f: log.failure("VM {vm_id}: state writer failed", f, vm_id=self.vm_id))

    async def _writer(self):
        try:
            while self._want != self._written and not self.detached:
                want = self._want
                try:
                    changed = await self.store.save_state(self.vm_id, *want)
                except Exception as e:
                    log.warn("VM {vm_id}: cannot save state {state} ({error}); retrying",
                             vm_id=self.vm_id, state=want[0], error=str(e).strip())
                    d = defer.Deferred()
                    self._write_wait = self.clock.callLater(
                        self.settings.retry_delay, d.callback, None)
                    await d
                    continue
                self._written = want
                if not changed and want[0] != "stopped":
                    self.handle("disowned",
                                "the VM was released from this node (node marked lost?)")
        finally:
            self._writing = False
        if self.state == "stopped" and self._written and self._written[0] == "stopped":
            waiters, self._stopped_waiters = self._stopped_waiters, []
            for d in waiters:
                d.callback(None)
