"""
The behaviour every L{IHypervisor} driver must show, as a trial mixin.

    class LXCInterfaceTests(HypervisorInterfaceTests, unittest.TestCase):
        def makeHypervisor(self):      # a driver that has been set up (or a Deferred of one)
            ...
        def makeSpec(self, vm_id):     # a VMSpec this driver can run
            ...

The tests start, watch, stop and clean up VMs with the ids C{self.vmIds()}
(default 9101 and 9102); a subclass whose ids must not collide with other users
of the machine overrides L{HypervisorInterfaceTests.vmIds}. Every VM a test
starts is killed and cleaned up afterwards. C{stopTimeout} bounds how long a
real driver may take for a shutdown.
"""

from twisted.internet import defer, reactor, task
from zope.interface.verify import verifyObject

from qvd.virt.interfaces import IHypervisor, RunningVM, VirtError


class HypervisorInterfaceTests:
    stopTimeout = 30.0

    def makeHypervisor(self):
        raise NotImplementedError

    def makeSpec(self, vm_id):
        raise NotImplementedError

    def vmIds(self):
        return (9101, 9102)

    def clock(self):
        """
        The clock the driver's delays run on (override for a fake clock).
        """
        return reactor

    @defer.inlineCallbacks
    def _driver(self):
        hv = yield defer.maybeDeferred(self.makeHypervisor)
        self._hv = hv
        return hv

    @defer.inlineCallbacks
    def _startVM(self, hv, vm_id):
        spec = self.makeSpec(vm_id)

        @defer.inlineCallbacks
        def cleanup():
            try:
                yield hv.kill(vm_id)
            finally:
                yield hv.cleanup(spec)
        self.addCleanup(cleanup)
        yield hv.prepare(spec)
        running = yield hv.start(spec)
        return spec, running

    @defer.inlineCallbacks
    def _eventually(self, predicate, timeout=None):
        timeout = self.stopTimeout if timeout is None else timeout
        clock = self.clock()
        waited = 0.0
        while True:
            value = yield defer.maybeDeferred(predicate)
            if value:
                return value
            if waited >= timeout:
                self.fail(f"condition not reached within {timeout} s")
            yield task.deferLater(clock, 0.05, lambda: None)
            waited += 0.05

    @defer.inlineCallbacks
    def test_provides_interface(self):
        """
        The driver provides IHypervisor and names itself.
        """
        hv = yield self._driver()
        self.assertTrue(verifyObject(IHypervisor, hv))
        self.assertIn(hv.name, ("lxc", "kvm", "nothing"))

    @defer.inlineCallbacks
    def test_start_runs_and_lists(self):
        """
        A prepared and started VM is running, is listed by listRunning and
        start fires with a RunningVM for its id.
        """
        hv = yield self._driver()
        vm_id = self.vmIds()[0]
        spec, running = yield self._startVM(hv, vm_id)
        self.assertIsInstance(running, RunningVM)
        self.assertEqual(running.vm_id, vm_id)
        self.assertTrue((yield hv.isRunning(vm_id)))
        listed = yield hv.listRunning()
        self.assertIn(vm_id, [r.vm_id for r in listed])

    @defer.inlineCallbacks
    def test_kill_stops_and_fires_watch(self):
        """
        kill() stops a running VM; a watch() made before fires; the VM is no
        longer listed; cleanup() afterwards succeeds.
        """
        hv = yield self._driver()
        vm_id = self.vmIds()[0]
        spec, _ = yield self._startVM(hv, vm_id)
        watched = hv.watch(vm_id)
        self.assertFalse(watched.called)
        yield hv.kill(vm_id)
        yield self._eventually(lambda: watched.called)
        self.assertFalse((yield hv.isRunning(vm_id)))
        listed = yield hv.listRunning()
        self.assertNotIn(vm_id, [r.vm_id for r in listed])
        yield hv.cleanup(spec)

    @defer.inlineCallbacks
    def test_watch_of_stopped_vm_fires_at_once(self):
        """
        watch() of a VM that does not run fires at once.
        """
        hv = yield self._driver()
        d = hv.watch(self.vmIds()[1])
        yield self._eventually(lambda: d.called, timeout=5)

    @defer.inlineCallbacks
    def test_cleanup_is_idempotent(self):
        """
        cleanup() of a VM that never started, and twice in a row, succeeds.
        """
        hv = yield self._driver()
        spec = self.makeSpec(self.vmIds()[1])
        yield hv.cleanup(spec)
        yield hv.cleanup(spec)
        self.assertFalse((yield hv.isRunning(spec.vm_id)))

    @defer.inlineCallbacks
    def test_kill_of_stopped_vm(self):
        """
        kill() of a VM that does not run fires with None.
        """
        hv = yield self._driver()
        result = yield hv.kill(self.vmIds()[1])
        self.assertIsNone(result)

    @defer.inlineCallbacks
    def test_start_unprepared_fails(self):
        """
        start() of a VM that was not prepared fails with VirtError (or the
        driver prepares on its own and the VM runs).
        """
        hv = yield self._driver()
        vm_id = self.vmIds()[1]
        spec = self.makeSpec(vm_id)
        self.addCleanup(lambda: hv.kill(vm_id).addCallback(lambda _: hv.cleanup(spec)))
        try:
            yield hv.start(spec)
        except VirtError:
            return
        self.assertTrue((yield hv.isRunning(vm_id)))
