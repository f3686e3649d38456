"""
A hypervisor in memory, for tests of the HKD: L{FakeHypervisor}.

    hv = FakeHypervisor(clock)                    # clock: task.Clock or the reactor
    hv.fail["prepare"] = VirtError("no space")    # the next prepare() fails
    hv.delay["start"] = 2.0                       # start() takes 2 s of clock time
    hv.hang.add("shutdown")                       # shutdown() never stops the VM
    hv.die(vm_id)                                 # the VM stops by itself
    hv.running                                    # vm_id -> RunningVM
    hv.calls                                      # [("prepare", vm_id), ...]

It keeps its state across HKD instances (pass the same object to a restarted
HKD to simulate VMs that outlived their HKD). L{FakeVMA} plays the agents of the
VMs it runs (see there). It passes L{qvd.testing.virt_interface.HypervisorInterfaceTests}.
"""

import itertools

from twisted.internet import defer, task
from zope.interface import implementer

from qvd.virt.interfaces import IHypervisor, RunningVM, VirtError

_pids = itertools.count(40000)


@implementer(IHypervisor)
class FakeHypervisor:
    """
    @ivar fail: method name -> exception raised by the next call (once), or
        a callable C{vm_id -> exception or None} consulted on every call.
    @ivar delay: method name -> seconds of clock time the call takes.
    @ivar hang: method names whose calls never fire.
    @ivar shutdown_stops: whether shutdown() stops the VM (after
        C{delay['shutdown_effect']} seconds).
    """

    def __init__(self, clock, name="nothing"):
        self.clock = clock
        self.name = name
        self.fail = {}
        self.delay = {}
        self.hang = set()
        self.shutdown_stops = True
        self.running = {}
        self.prepared = {}
        self.specs = {}
        self.calls = []
        self._watchers = {}
        self.set_up = False

    # -- test controls ---------------------------------------------------------

    def die(self, vm_id):
        """
        The VM stops by itself (crash, poweroff from inside).
        """
        if self.running.pop(vm_id, None) is not None:
            for d in self._watchers.pop(vm_id, []):
                d.callback(None)

    def seed(self, vm_id, ip=""):
        """
        Pretend VM C{vm_id} runs (started by an earlier HKD).
        """
        self.running[vm_id] = RunningVM(vm_id, next(_pids))
        if ip:
            self.specs[vm_id] = _Addr(ip)

    def ip_running(self, ip):
        for vm_id in self.running:
            spec = self.specs.get(vm_id)
            if spec is not None and spec.ip == ip:
                return vm_id
        return None

    # -- plumbing ----------------------------------------------------------------

    def _call(self, method, vm_id, effect):
        self.calls.append((method, vm_id))
        failure = self.fail.get(method)
        if callable(failure) and not isinstance(failure, Exception):
            failure = failure(vm_id)
        elif failure is not None:
            del self.fail[method]
        if method in self.hang:
            return defer.Deferred()

        def run():
            if failure is not None:
                raise failure
            return effect()
        seconds = self.delay.get(method, 0)
        if seconds:
            return task.deferLater(self.clock, seconds, run)
        return defer.maybeDeferred(run)

    # -- IHypervisor ----------------------------------------------------------------

    def setUp(self):
        self.set_up = True
        return defer.succeed(None)

    def prepare(self, spec):
        def effect():
            self.prepared[spec.vm_id] = spec
            self.specs[spec.vm_id] = spec
        return self._call("prepare", spec.vm_id, effect)

    def start(self, spec):
        def effect():
            if spec.vm_id not in self.prepared:
                raise VirtError(f"VM {spec.vm_id} was not prepared")
            if spec.vm_id in self.running:
                raise VirtError(f"VM {spec.vm_id} already runs")
            self.specs[spec.vm_id] = spec
            vm = self.running[spec.vm_id] = RunningVM(spec.vm_id, next(_pids))
            return vm
        return self._call("start", spec.vm_id, effect)

    def shutdown(self, vm_id):
        def effect():
            if self.shutdown_stops and vm_id in self.running:
                seconds = self.delay.get("shutdown_effect", 0)
                if seconds:
                    self.clock.callLater(seconds, self.die, vm_id)
                else:
                    self.die(vm_id)
        return self._call("shutdown", vm_id, effect)

    def kill(self, vm_id):
        return self._call("kill", vm_id, lambda: self.die(vm_id))

    def cleanup(self, spec):
        def effect():
            if spec.vm_id in self.running:
                raise VirtError(f"VM {spec.vm_id} still runs; kill it before cleaning up")
            self.prepared.pop(spec.vm_id, None)
        return self._call("cleanup", spec.vm_id, effect)

    def isRunning(self, vm_id):
        return defer.succeed(vm_id in self.running)

    def listRunning(self):
        self.calls.append(("listRunning", None))
        return defer.succeed(sorted(self.running.values(), key=lambda r: r.vm_id))

    def watch(self, vm_id):
        if vm_id not in self.running:
            return defer.succeed(None)
        d = defer.Deferred(lambda d: self._unwatch(vm_id, d))
        self._watchers.setdefault(vm_id, []).append(d)
        return d

    def _unwatch(self, vm_id, d):
        watchers = self._watchers.get(vm_id, [])
        if d in watchers:
            watchers.remove(d)


class _Addr:
    def __init__(self, ip):
        self.ip = ip


class FakeVMAError(Exception):
    """
    The fake agent did not answer.
    """


class FakeVMA:
    """
    The agents of the VMs a L{FakeHypervisor} runs: C{FakeVMA(hv)} is a
    factory C{(host, port, secret) -> client} for the HKD. An agent answers while its
    VM runs (by IP) unless its IP is in C{silent}; C{poweroff} stops the VM
    after C{poweroff_delay} seconds unless C{poweroff_works} is false.

    @ivar calls: [(method, host, args)] of every call made.
    """

    def __init__(self, hypervisor, clock=None):
        self.hypervisor = hypervisor
        self.clock = clock or hypervisor.clock
        self.silent = set()
        self.poweroff_works = True
        self.poweroff_delay = 0
        self.calls = []
        self.secrets = {}    # host -> the secret its last client was given

    def __call__(self, host, port=3030, secret=""):
        self.secrets[host] = secret
        return _FakeVMAClient(self, host)

    def _alive(self, host):
        if host in self.silent:
            return None
        return self.hypervisor.ip_running(host)

    def _answer(self, method, host, args, effect=None):
        self.calls.append((method, host, args))
        vm_id = self._alive(host)
        if vm_id is None:
            return defer.fail(FakeVMAError(f"agent at {host} does not answer"))
        if effect is not None:
            effect(vm_id)
        return defer.succeed(None)


class _FakeVMAClient:
    def __init__(self, vma, host):
        self.vma = vma
        self.host = host

    def ping(self):
        return self.vma._answer("ping", self.host, ())

    def x_state(self):
        d = self.vma._answer("x_state", self.host, ())
        return d.addCallback(lambda _: "stopped")

    def expire(self, kind):
        return self.vma._answer("expire", self.host, (kind,))

    def poweroff(self):
        vma = self.vma

        def effect(vm_id):
            if vma.poweroff_works:
                if vma.poweroff_delay:
                    vma.clock.callLater(vma.poweroff_delay, vma.hypervisor.die, vm_id)
                else:
                    vma.hypervisor.die(vm_id)
        return self.vma._answer("poweroff", self.host, (), effect)
