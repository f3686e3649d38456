"""
The broker's wait for the X session (L{qvd.l7r.broker.Broker.wait_x}) and
its connection to nxagent (L{qvd.l7r.broker.Broker.connect_x}), on a fake
clock and a fake agent.
"""

from twisted.internet import defer, error, task
from twisted.trial import unittest

from qvd.l7r import broker as broker_module
from qvd.l7r.broker import Broker, BrokerError, BrokerSettings, Session


class _Conn:
    def __init__(self):
        self.written = []

    def write(self, data):
        self.written.append(data)


class _VMA:
    def __init__(self, clock, states):
        self.clock = clock
        self.states = list(states)
        self.polled_at = []

    def x_state(self):
        self.polled_at.append(self.clock.seconds())
        return defer.succeed(self.states.pop(0) if len(self.states) > 1 else self.states[0])


def _session(broker):
    """A session of VM 7 running with the broker's settings."""
    session = Session(broker.reactor, 7, _Conn())
    session.settings = broker.settings
    return session


class WaitXTests(unittest.TestCase):

    def wait(self, states, **settings):
        clock = task.Clock()
        broker = Broker(clock, None, BrokerSettings(**settings), None)
        vma = _VMA(clock, states)
        d = defer.ensureDeferred(broker.wait_x(_session(broker), vma))
        for _ in range(200):
            if d.called or not clock.getDelayedCalls():
                break
            clock.advance(min(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds())
        return d, vma

    def test_polls_fast_then_backs_off(self):
        """
        x_state is polled at once, then after 50 ms, and twice as long each
        time up to poll_x.
        """
        d, vma = self.wait(["starting"] * 7 + ["listening"], poll_x=1.0)
        self.successResultOf(d)
        gaps = [round(b - a, 2) for a, b in zip(vma.polled_at, vma.polled_at[1:])]
        self.assertEqual(gaps, [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0])

    def test_listening_soon_is_seen_soon(self):
        """
        An X session listening 0.3 s after x_start is seen within 0.35 s
        (not at the next 1 s poll).
        """
        d, vma = self.wait(["starting"] * 3 + ["listening"], poll_x=1.0)
        self.successResultOf(d)
        self.assertAlmostEqual(vma.polled_at[-1], 0.35)

    def test_timeout(self):
        """
        A session still starting after x_start seconds is a BrokerError.
        """
        d, vma = self.wait(["starting"], poll_x=1.0, x_start=3.0)
        self.assertIn("timed out", str(self.failureResultOf(d, BrokerError).value))


class ConnectXTests(unittest.TestCase):

    def connect(self, refusals, nx_connect=10.0):
        clock = task.Clock()
        attempts = []

        def connect_peer(reactor, host, port, timeout):
            attempts.append(clock.seconds())
            if len(attempts) <= refusals:
                return defer.fail(error.ConnectionRefusedError("111: Connection refused"))
            return defer.succeed("peer")
        self.patch(broker_module, "connect_peer", connect_peer)
        broker = Broker(clock, None, BrokerSettings(nx_connect=nx_connect), None)
        d = defer.ensureDeferred(broker.connect_x(_session(broker), "10.0.0.2", 4100))
        for _ in range(200):
            if d.called or not clock.getDelayedCalls():
                break
            clock.advance(min(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds())
        return d, attempts

    def test_refused_is_retried(self):
        """
        A refused connection (nxagent not listening again yet after a
        resume) is tried again after 50 ms, doubling, until it connects.
        """
        d, attempts = self.connect(refusals=3)
        self.assertEqual(self.successResultOf(d), "peer")
        gaps = [round(b - a, 2) for a, b in zip(attempts, attempts[1:])]
        self.assertEqual(gaps, [0.05, 0.1, 0.2])

    def test_refused_until_the_limit(self):
        """
        Refused for longer than nx_connect seconds: the refusal is the error.
        """
        d, attempts = self.connect(refusals=1000, nx_connect=2.0)
        self.failureResultOf(d, error.ConnectionRefusedError)
        self.assertLessEqual(attempts[-1], 2.0)


class TenantSettingsTests(unittest.TestCase):

    def test_tenant_layer(self):
        """
        A session runs with its tenant's settings (the tenant's database
        layer over the global one); other tenants keep the global ones, and a
        new configuration replaces both.
        """
        from qvd.config import Config, declared_keys
        config = Config(keys=declared_keys()).with_database(
            {"internal.l7r.timeout.x_start": "20"},
            {2: {"internal.l7r.timeout.x_start": "45",
                 "l7r.loadbalancer.plugin.default.weight.random": "0"}})
        broker = Broker(task.Clock(), None, BrokerSettings(), None)
        broker.configure(config)
        self.assertEqual(broker.tenant_settings(2).x_start, 45.0)
        self.assertEqual(broker.tenant_settings(2).weights.random, 0.0)
        self.assertEqual(broker.tenant_settings(3).x_start, 20.0)
        self.assertEqual(broker.settings.x_start, 20.0)
        session = broker.new_session(7, _Conn(), tenant_id=2)
        self.addCleanup(broker_module.PROCESS_SESSIONS.pop, session.id, None)
        self.assertEqual(session.settings.x_start, 45.0)
        broker.configure(config.with_database({}, {}))
        self.assertEqual(broker.tenant_settings(2).x_start, 10.0)
