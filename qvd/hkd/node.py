"""
The HKD of one node: node life cycle, commands, VM supervisors, adoption,
expirations, the L7R session check and the cluster monitor.

    hkd = HKD(config, reactor, db, listener, driver, vma_factory, host_id=3,
              dsn=dsn, on_node_stopped=reactor.stop)
    hkd.startService()          # converges in the background; hkd.ready fires when running
    ...
    hkd.stopService()           # SIGTERM: desktops keep running, a new HKD adopts them

Start: host_runtimes 'starting' (pid, hypervisor, usable_cpu/ram, first
heartbeat) -> driver.setUp() -> reconcile (adopt the VMs of this node that run,
reap the ones that do not, kill containers nobody owns) -> 'running' -> loops.
While PostgreSQL is down the start is retried; once running, every loop
tolerates database errors and the listener re-reads commands after each
reconnect.

Commands: LISTEN qvd_cmd_for_vm_on_host<id> and qvd_cmd_for_host<id>, with a
poll every hkd.command.poll.interval seconds. Start commands are claimed at most
hkd.vm.starting.max at a time (the others wait in the database).
A node stop command (host_runtimes.cmd = 'stop') stops every VM, marks the node
'stopped' and calls C{on_node_stopped}.

The lease (hkd.lease.seconds, L{qvd.hkd.fencer}), held while another node
runs that could start this node's VMs (alone, a node holds none and its
desktops are never fenced): the start and every
heartbeat renew it by the database clock; after each renewal the HKD feeds
the node's fencer (spawning one if none runs) and re-arms its own
L{Watchdog}: when the lease minus hkd.lease.fence.margin passes without a
renewal, the HKD kills its VMs itself (and the fencer, which outlives the
HKD, does the same if the HKD is gone). A node found lost at a heartbeat kills
its copies of the released VMs and rejoins with a new lease.

Configuration: C{config} is the node's; the database's layers are put over it
at start and followed while running (L{qvd.config.live}): the supervisors'
timers and timeouts, the start limit and the loops' intervals follow a
C{qvd-admin config set} within a second (the C{restart} keys of docs/config.md
are read once, at start).
"""

import os
import time

from twisted.application import service
from twisted.internet import defer, task
from qvd.logs import Logger
from twisted.python.failure import Failure

from qvd.config.live import LiveConfig
from qvd.hkd.cluster import ClusterMonitor
from qvd.hkd.fencer import Watchdog
from qvd.hkd.store import Store, StoreSettings
from qvd.hkd.supervisor import Supervisor, SupervisorSettings
from qvd._pids import pid_alive
from qvd.virt._process import run as run_process
from qvd.virt.firewall import FirewallSettings, NodeFirewall

log = Logger()


def usable_resources(cpuinfo="/proc/cpuinfo", meminfo="/proc/meminfo"):
    """
    The node's capacity as the original HKD reports it: 80 % of the sum of
    the CPUs' bogomips (20 % kept for the hypervisor) and MemTotal in MB
    (kB / 1000). Returns (usable_cpu, usable_ram).
    """
    bogomips = 0.0
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.lower().startswith("bogomips"):
                    bogomips += float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    ram = 0.0
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    ram = int(line.split()[1]) / 1000
    except (OSError, ValueError):
        pass
    return bogomips * 0.80, ram


class HKD(service.Service):
    """
    @ivar supervisors: vm_id -> L{Supervisor} of every VM this HKD handles.
    @ivar state: the node's state as this HKD sees it.
    @ivar ready: a Deferred that fires once the node is running.
    """

    def __init__(self, config, reactor, db, listener, driver, vma_factory, host_id,
                 dsn=None, on_node_stopped=None, pid=None, pid_alive=pid_alive,
                 fencer=None, monotonic=time.monotonic):
        self.config = config
        self.reactor = reactor
        self.db = db
        self.listener = listener
        self.driver = driver
        self.vma_factory = vma_factory
        self.host_id = host_id
        self.dsn = dsn
        self.on_node_stopped = on_node_stopped
        self._pid = pid
        self.pid_alive = pid_alive
        self.store = Store(db, host_id, StoreSettings.from_config(config))
        self.settings = SupervisorSettings.from_config(config)
        self.starting_max = max(1, config.getint("hkd.vm.starting.max"))
        self.supervisors = {}
        self.state = "stopped"
        self.ready = defer.Deferred()
        self._loops = []
        self._cmd_busy = False
        self._cmd_again = False
        self._host_cmd_busy = False
        self._stopping_node = False
        self._running = False
        self._start_call = None
        self.fencer = fencer
        self.monotonic = monotonic
        self.lease = max(0.0, config.getfloat("hkd.lease.seconds"))
        self.guarded = False        # the node holds a lease (another node runs)
        self.watchdog = None
        self._fence_call = None
        self._tick_busy = False
        self.monitor = None
        self.firewall = None
        self._bridge_addresses = []
        self.live = None
        self._vm_channel = f"qvd_cmd_for_vm_on_host{host_id}"
        self._host_channel = f"qvd_cmd_for_host{host_id}"

    @property
    def pid(self):
        return self._pid if self._pid is not None else os.getpid()

    # -- life cycle -------------------------------------------------------------

    def startService(self):
        service.Service.startService(self)
        self._running = True
        self.listener.onReconnect(self.poll)
        self.listener.subscribe(self._vm_channel, lambda c, p: self.check_commands())
        self.listener.subscribe(self._host_channel, lambda c, p: self.check_node_command())
        self.listener.start()
        self._try_start()

    def _try_start(self):
        self._start_call = None
        if not self._running:
            return
        d = defer.ensureDeferred(self._start())

        def failed(failure):
            if not self._running:
                return
            delay = self.settings.retry_delay * 2
            log.warn("HKD start failed ({error}); retrying in {delay:g} s",
                     error=str(failure.value).strip() or repr(failure.value), delay=delay)
            self._start_call = self.reactor.callLater(delay, self._try_start)
        d.addErrback(failed)

    async def _start(self):
        self.state = "starting"
        if self.live is None:
            self.live = LiveConfig(self.config, self.db, self.listener)
            await self.live.start()
            self.live.subscribe(self._configure)
        else:
            await self.live.reload()
        self._configure(self.live.current)
        cpu, ram = usable_resources()
        lease = await self._lease_for_renewal()
        renewal = self._renewal_start()
        await self.store.node_starting(self.pid, self.driver.name, cpu, ram, lease)
        self._renewed(renewal, lease)
        log.info("node {host_id} starting (hypervisor {hv}, usable_cpu {cpu:.0f}, "
                 "usable_ram {ram:.0f} MB)", host_id=self.host_id, hv=self.driver.name,
                 cpu=cpu, ram=ram)
        await self.driver.setUp()
        if not self._running:
            return
        self.firewall = await self._make_firewall()
        await self.reconcile()
        if not self._running:
            return
        await self.store.node_state("running")
        if not self._running:
            return
        self.state = "running"
        self._start_loops()
        if self.config.getbool("hkd.cluster.monitor.enable") and self.dsn:
            self.monitor = ClusterMonitor(
                self.dsn, self.db, self.reactor, self.host_id,
                margin=self.config.getfloat("hkd.lease.release.margin"),
                interval=self.config.getfloat("hkd.cluster.check.interval"))
            self.monitor.start()
        log.info("node {host_id} running with {n} VMs", host_id=self.host_id,
                 n=len(self.supervisors))
        await self.poll()
        if not self.ready.called:
            self.ready.callback(None)

    def _loop_intervals(self, config):
        """The periodic work of a running node: function -> seconds."""
        loops = {self.tick: config.getfloat("hkd.ticker.interval"),
                 self.poll: config.getfloat("hkd.command.poll.interval"),
                 self.check_expirations: config.getfloat("hkd.vm.expiration.interval"),
                 self.check_l7r_sessions: config.getfloat("hkd.l7r.check.interval")}
        if self.firewall is not None:
            loops[self.refresh_node_addresses] = config.getfloat(
                "hkd.firewall.refresh.interval")
        return loops

    def _start_loops(self):
        for function, seconds in self._loop_intervals(self.config).items():
            self._every(seconds, function)

    def _configure(self, config):
        """
        Apply a configuration (the first one, or a change in the database):
        the live keys take effect now, for the VMs already running too.
        """
        old, self.config = self.config, config
        self.settings = SupervisorSettings.from_config(config)
        self.starting_max = max(1, config.getint("hkd.vm.starting.max"))
        for sup in self.supervisors.values():
            sup.settings = self.settings
            sup._liveness.max_failures = self.settings.dead_failures
            sup._liveness.max_seconds = self.settings.dead_seconds
        if self._loops and self._loop_intervals(old) != self._loop_intervals(config):
            for loop in self._loops:
                if loop.running:
                    loop.stop()
            self._loops = []
            self._start_loops()
        if old is not config:
            log.info("configuration reloaded from the database")

    def _every(self, seconds, function):
        def safe():
            d = defer.maybeDeferred(function)
            d.addErrback(lambda f: log.warn("{name} failed: {error}",
                                            name=function.__name__,
                                            error=str(f.value).strip()))
            return None
        loop = task.LoopingCall(safe)
        loop.clock = self.reactor
        loop.start(seconds, now=False)
        self._loops.append(loop)

    def stopService(self):
        """
        Stop the daemon, not the desktops: supervisors are detached and the
        node is marked 'stopped'; a restarted HKD adopts the VMs.
        """
        service.Service.stopService(self)
        self._running = False
        if self._start_call is not None and self._start_call.active():
            self._start_call.cancel()
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        guarding = bool(self.supervisors)
        for sup in self.supervisors.values():
            sup.detach()
        if self._fence_call is not None and self._fence_call.active():
            self._fence_call.cancel()
        if self.live is not None:
            self.live.unsubscribe(self._configure)
        d = self.listener.stop()
        if self.monitor is not None:
            d.addCallback(lambda _: self.monitor.stop())
        if self.fencer is not None and self.guarded:
            d.addCallback(lambda _: self._hand_over(guarding))
        if self.state in ("starting", "running"):
            d.addCallback(lambda _: self.store.node_state("stopped"))
            d.addErrback(lambda f: log.warn("cannot mark the node stopped: {error}",
                                            error=str(f.value).strip()))
        self.state = "stopped"
        d.addCallback(lambda _: self.db.stop())
        return d

    # -- the lease ------------------------------------------------------------------

    def _renewal_start(self):
        """The local times a renewal starts at (reactor, CLOCK_MONOTONIC)."""
        return self.reactor.seconds(), self.monotonic()

    async def _lease_for_renewal(self):
        """
        The lease a renewal takes: C{hkd.lease.seconds} while another node
        runs that could start this node's VMs, 0 (none) while this node is
        alone: fencing its desktops would only end them, as nobody else would
        start them, and a node without a lease is never declared lost. A
        node that joins is seen at the next heartbeat, before which it has
        no reason to declare this one lost (its lease, if any, still runs).
        """
        if self.lease <= 0:
            return 0.0
        try:
            peers = await self.store.peers(self.lease)
        except Exception as e:
            log.warn("cannot count the other nodes ({error}); keeping the lease",
                     error=str(e).strip())
            return self.lease
        return self.lease if peers else 0.0

    def _renewed(self, started, lease):
        """
        The database renewed the lease (C{lease} seconds; 0: none) in a
        statement sent at C{started}: it ends no earlier than C{started +
        lease} here. Feed the fencer and re-arm the HKD's own watchdog; with
        no lease, release both.
        """
        if lease <= 0:
            self._unguard()
            return
        if not self.guarded:
            self.guarded = True
            log.info("another node runs: this node's desktops are guarded by its lease "
                     "({lease:g} s) and fenced if it cannot renew it", lease=lease)
        at, mono = started
        if self.fencer is not None:
            try:
                self.fencer.feed(mono + self.lease)
                self.fencer.ensure()
            except OSError as e:
                log.error("cannot feed or start the fencer ({error}): this node's desktops "
                          "are not guarded if the HKD dies; check hkd.lease.path",
                          error=e)
        now = self.reactor.seconds()
        if self.watchdog is None:
            self.watchdog = Watchdog(self.lease, self.config.getfloat("hkd.lease.fence.margin"),
                                     started=now)
        self.watchdog.feed(now, at + self.lease)
        self._arm_watchdog()

    def _unguard(self):
        """No lease: no fencer, no watchdog (this node is alone, or has no lease)."""
        if self.guarded and self.lease > 0:
            log.info("no other node runs: this node holds no lease and its desktops are not "
                     "fenced (nobody else could start them)")
        self.guarded = False
        if self._fence_call is not None and self._fence_call.active():
            self._fence_call.cancel()
        self._fence_call = None
        self.watchdog = None
        if self.fencer is not None and self.lease > 0:
            try:
                self.fencer.release()
            except OSError as e:
                log.warn("cannot release the fencer: {error}", error=e)

    def _arm_watchdog(self):
        if self._fence_call is not None and self._fence_call.active():
            self._fence_call.cancel()
        self._fence_call = None
        due = self.watchdog.due()
        if due is not None and self._running:
            self._fence_call = self.reactor.callLater(
                max(0.0, due - self.reactor.seconds()), self._watchdog_timeout)

    def _watchdog_timeout(self):
        self._fence_call = None
        step = self.watchdog.poll(self.reactor.seconds())
        if step is not None and "fence" in step.actions and self.supervisors:
            log.error("the node's lease was not renewed for {s:g} s (hkd.lease.seconds {lease:g}"
                      " minus hkd.lease.fence.margin): killing this node's VMs, which another "
                      "node may start once the lease has run out",
                      s=self.watchdog.lease - self.watchdog.margin, lease=self.lease)
            for sup in list(self.supervisors.values()):
                sup.handle("disowned", "killed: this node could not renew its lease "
                                       "(hkd.lease.seconds); another node may start it")
        self._arm_watchdog()

    def _hand_over(self, guarding):
        """
        A clean stop: with desktops left running (a restarted HKD adopts
        them) the lease is renewed once more and the fencer keeps guarding
        them; without, the fencer is released and exits.
        """
        if not guarding:
            try:
                self.fencer.release()
            except OSError as e:
                log.warn("cannot release the fencer: {error}", error=e)
            return None
        renewal = self._renewal_start()
        d = self.store.tick(self.pid, self.lease)

        def renewed(state):
            if state is not None:
                self.fencer.feed(renewal[1] + self.lease)
        d.addCallbacks(renewed, lambda f: log.warn("cannot renew the lease at stop: {error}",
                                                  error=str(f.value).strip()))
        return d

    # -- reconcile / adoption ----------------------------------------------------

    async def reconcile(self):
        """
        Match the VMs the database gives this node with what the driver runs:
        adopt running ones, reap dead ones, kill containers nobody here owns.
        """
        rows = dict(await self.store.my_vms())
        running = {r.vm_id: r for r in await self.driver.listRunning()}
        for vm_id, vm_state in sorted(rows.items()):
            if vm_id in self.supervisors:
                continue
            spec = await self.store.load_for_cleanup(vm_id)
            sup = self._supervisor(vm_id, spec=spec, persisted=(vm_state, None))
            if vm_id in running:
                sup.pid = running[vm_id].pid
                if vm_state != "zombie":
                    # Adoption re-checks the VM's filter before anything else.
                    await sup.filter()
                if vm_state == "stopping":
                    event = "adopt_stopping"
                elif vm_state == "zombie":
                    event = "reap"
                else:
                    event = "adopt"
                log.info("VM {vm_id}: found running ({state}); adopted",
                         vm_id=vm_id, state=vm_state)
                sup.handle(event)
            else:
                sup.handle("reap_dead", f"the VM was not running when the HKD started "
                                        f"(its state was {vm_state})")
        if self.firewall is not None:
            await self.firewall.keep_only(set(running) & set(rows))
        for vm_id in sorted(set(running) - set(rows)):
            if vm_id in self.supervisors:
                continue
            log.warn("VM {vm_id}: runs on this node but the database does not assign it "
                     "here; killing it (zombie)", vm_id=vm_id)
            defer.ensureDeferred(self._kill_unowned(vm_id))

    async def _make_firewall(self):
        """
        The node's packet filter for its desktops (None when the driver has no
        bridge ports to filter): the node addresses are the bridge's own and
        every host's.
        """
        if not hasattr(self.driver, "port_name"):
            return None
        bridge = self.config.get("vm.network.bridge")
        result = await run_process(self.reactor, ["ip", "-4", "-o", "address", "show",
                                                  "dev", bridge])
        self._bridge_addresses = []
        for line in result.out.splitlines():
            fields = line.split()
            if "inet" in fields:
                self._bridge_addresses.append(fields[fields.index("inet") + 1].split("/")[0])
        settings = FirewallSettings.from_config(self.config, await self._node_addresses())
        if not settings.enabled:
            log.warn("vm.network.firewall.enable is off: desktops are not isolated")
        return NodeFirewall(settings, self.reactor)

    async def _node_addresses(self):
        return self._bridge_addresses + await self.store.host_addresses()

    async def refresh_node_addresses(self):
        """
        Follow nodes joining and leaving (C{hosts.address}): the packet
        filter admits the agent and NX connections of the current ones.
        """
        settings = FirewallSettings.from_config(self.config, await self._node_addresses())
        if settings.node_addresses != self.firewall.settings.node_addresses:
            log.info("node addresses now {addresses}: updating the desktops' filter",
                     addresses=", ".join(settings.node_addresses))
            await self.firewall.set_node_addresses(settings.node_addresses)

    async def _kill_unowned(self, vm_id):
        try:
            await self.driver.kill(vm_id)
            await self.driver.cleanup(self.store.minimal_spec(vm_id))
        except Exception as e:
            log.error("VM {vm_id}: cannot kill the unowned VM ({error}); will retry at "
                      "the next HKD start", vm_id=vm_id, error=str(e).strip())

    def _supervisor(self, vm_id, spec=None, persisted=None):
        sup = Supervisor(vm_id, self.reactor, self.store, self.driver, self.vma_factory,
                         self.settings, on_change=self._vm_changed, spec=spec,
                         persisted=persisted, firewall=self.firewall)
        self.supervisors[vm_id] = sup
        return sup

    def _vm_changed(self, sup, step):
        if step.new == "stopped":
            if self.supervisors.get(sup.vm_id) is sup:
                del self.supervisors[sup.vm_id]
            sup.whenStopped().addCallback(lambda _: self._running and self.check_commands())
        elif step.old in ("loading", "preparing", "booting", "waiting_vma") \
                and not sup.machine.starting:
            self.check_commands()

    def starting_count(self):
        return sum(1 for s in self.supervisors.values() if s.machine.starting)

    # -- commands ---------------------------------------------------------------

    def poll(self):
        d1 = self.check_node_command()
        d2 = self.check_commands()
        return defer.gatherResults([d1, d2], consumeErrors=True).addCallback(lambda _: None)

    def check_commands(self):
        """
        Claim pending stop and start commands of this node (serialized: a call
        while one runs makes it run once more).
        """
        if self._cmd_busy:
            self._cmd_again = True
            return defer.succeed(None)
        self._cmd_busy = True
        d = defer.ensureDeferred(self._check_commands())

        def done(result):
            self._cmd_busy = False
            if isinstance(result, Failure):
                log.warn("command check failed: {error}", error=str(result.value).strip())
            if self._cmd_again and self._running:
                self._cmd_again = False
                return self.check_commands()
            return None
        return d.addBoth(done)

    async def _check_commands(self):
        if not self._running or self.state != "running":
            return
        for vm_id, vm_state in await self.store.claim_stops():
            sup = self.supervisors.get(vm_id)
            if sup is not None:
                log.info("VM {vm_id}: stop command", vm_id=vm_id)
                sup.handle("stop")
            elif vm_state == "stopped":
                await self.store.release_stopped(vm_id)
            else:
                sup = self._supervisor(vm_id, persisted=(vm_state, None))
                sup.handle("reap")
        if self._stopping_node:
            return
        free = self.starting_max - self.starting_count()
        if free <= 0:
            return
        for vm_id in await self.store.claim_starts(free):
            old = self.supervisors.get(vm_id)
            if old is not None and old.state != "stopped":
                reason = (f"a start arrived while this node was still stopping the VM "
                          f"(state {old.state}); start it again")
                log.error("VM {vm_id}: {reason}", vm_id=vm_id, reason=reason)
                await self.store.save_state(vm_id, "stopped", reason)
                continue
            log.info("VM {vm_id}: start command", vm_id=vm_id)
            sup = self._supervisor(vm_id, persisted=("starting", None))
            sup.handle("start")

    def check_node_command(self):
        if (self._host_cmd_busy or self._stopping_node or not self._running
                or self.state != "running"):
            return defer.succeed(None)
        self._host_cmd_busy = True
        d = self.store.claim_node_stop()

        def claimed(stop):
            if stop:
                log.info("node {host_id}: stop command", host_id=self.host_id)
                return defer.ensureDeferred(self.stop_node())
        d.addCallback(claimed)

        def done(result):
            self._host_cmd_busy = False
            if isinstance(result, Failure):
                log.warn("node command check failed: {error}", error=str(result.value).strip())
        return d.addBoth(done)

    async def stop_node(self):
        """
        Stop every VM of this node (killing those still running after
        hkd.node.stop.timeout), mark the node stopped and call
        C{on_node_stopped}.
        """
        self._stopping_node = True
        self.state = "stopping"
        await self._retry(lambda: self.store.node_state("stopping"))
        sups = list(self.supervisors.values())
        for sup in sups:
            sup.handle("stop")
        waits = defer.DeferredList([s.whenStopped() for s in sups])
        timeout = self.config.getfloat("hkd.node.stop.timeout")
        timer = self.reactor.callLater(timeout, waits.cancel) if timeout > 0 else None
        try:
            await waits
        except defer.CancelledError:
            for sup in list(self.supervisors.values()):
                sup.handle("disowned", "killed: the node stop timed out")
        if timer is not None and timer.active():
            timer.cancel()
        await self._retry(lambda: self.store.node_state("stopped"))
        self.state = "stopped"
        log.info("node {host_id} stopped", host_id=self.host_id)
        if self.on_node_stopped is not None:
            self.on_node_stopped()

    async def _retry(self, function, attempts=30):
        for attempt in range(attempts):
            try:
                return await function()
            except Exception as e:
                log.warn("database write failed ({error}); retrying", error=str(e).strip())
                await task.deferLater(self.reactor, self.settings.retry_delay, lambda: None)
        return None

    # -- periodic checks ---------------------------------------------------------

    async def tick(self):
        """
        The heartbeat, which renews the node's lease. If the node was marked
        lost meanwhile, its VMs were released: kill the local copies and
        rejoin as running with a new lease.
        """
        if self._tick_busy:
            return
        self._tick_busy = True
        try:
            lease = await self._lease_for_renewal()
            renewal = self._renewal_start()
            state = await self.store.tick(self.pid, lease)
            if state is not None:
                self._renewed(renewal, lease)
                return
            if self.state != "running":
                return
            log.error("node {host_id} was marked lost by the cluster monitor; its VMs were "
                      "released: killing the local copies", host_id=self.host_id)
            for sup in list(self.supervisors.values()):
                sup.handle("disowned", "released: this node was marked lost")
            lease = await self._lease_for_renewal()
            renewal = self._renewal_start()
            if await self.store.rejoin(self.pid, lease):
                log.info("node {host_id} rejoined the cluster", host_id=self.host_id)
                self._renewed(renewal, lease)
        finally:
            self._tick_busy = False

    async def check_expirations(self):
        for vm_id, soft_due, hard_due, soft_ts in await self.store.expirations():
            sup = self.supervisors.get(vm_id)
            if sup is None:
                continue
            if hard_due:
                if sup.handle("expire_hard", "the VM's hard expiration has passed"):
                    log.info("VM {vm_id}: hard expiration", vm_id=vm_id)
            elif soft_due:
                sup.expire_soft(soft_ts)

    async def check_l7r_sessions(self):
        """
        Sessions recorded as routed through an L7R process of this node whose
        process is gone are reset to disconnected.
        """
        for vm_id, pid in await self.store.l7r_sessions():
            if not self.pid_alive(pid):
                rows = await self.store.reset_session(vm_id, pid)
                if rows:
                    log.info("VM {vm_id}: session of dead L7R pid {pid} reset to "
                             "disconnected", vm_id=vm_id, pid=pid)
