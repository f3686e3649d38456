"""
Tests for qvd.config.live: the configuration follows the database's configs
table through NOTIFY qvd_config_changed and listener reconnects (real
PostgreSQL through qvd.testing.pg).
"""

from twisted.internet import defer, reactor, task
from twisted.logger import Logger
from twisted.trial import unittest

from qvd.config import Config, declared_keys
from qvd.config.live import LiveConfig
from qvd.db.listen import Listener
from qvd.db.pool import Database
from qvd.testing import pg


class LiveConfigTests(pg.DatabaseTestMixin, unittest.TestCase):

    @defer.inlineCallbacks
    def make(self, node=None):
        self.events = []
        db = Database(pg.role_dsn(self.dbname, "l7r"), reactor, size=2)
        yield db.start()
        self.addCleanup(db.stop)
        listener = Listener(self.dsn, reactor, keepalive=0.2)
        yield listener.start()
        self.addCleanup(listener.stop)
        base = Config(keys=declared_keys(), node=node or {})
        live = LiveConfig(base, db, listener, log=Logger(observer=self.events.append))
        self.seen = []
        live.subscribe(self.seen.append)
        yield live.start()
        self.addCleanup(live.stop)
        return live

    @defer.inlineCallbacks
    def until(self, condition, timeout=5.0):
        for _ in range(int(timeout / 0.02)):
            if condition():
                return
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.fail("condition not met in time")

    def errors(self):
        return [e for e in self.events if e["log_level"].name in ("error", "warn")]

    @defer.inlineCallbacks
    def test_initial_load(self):
        """
        The first load puts the global rows over the node file and a
        tenant's rows over the global ones.
        """
        self.query("INSERT INTO tenants (name) VALUES ('t2')")
        self.query("INSERT INTO configs VALUES (-1, 'osf.default.memory', '512'), "
                   "(2, 'osf.default.memory', '1024'), (-1, 'custom.x', 'g')")
        live = yield self.make(node={"osf.default.memory": "300", "custom.x": "node"})
        self.assertEqual(live.current.getint("osf.default.memory"), 512)
        self.assertEqual(live.current.getint("osf.default.memory", tenant=2), 1024)
        self.assertEqual(live.current.get("custom.x", tenant=2), "g")
        self.assertEqual(len(self.seen), 1)

    @defer.inlineCallbacks
    def test_notify_reloads(self):
        """
        A change of configs (its trigger NOTIFYs qvd_config_changed) reaches
        the subscribers with the new configuration; so does a change of
        ssl_configs.
        """
        live = yield self.make()
        self.assertEqual(live.current.getint("osf.default.memory"), 256)
        self.query("INSERT INTO configs VALUES (-1, 'osf.default.memory', '2048')")
        yield self.until(lambda: live.current.getint("osf.default.memory") == 2048)
        self.assertEqual(self.seen[-1].getint("osf.default.memory"), 2048)
        self.query("INSERT INTO ssl_configs VALUES ('l7r.ssl.cert', 'PEM')")
        yield self.until(lambda: live.ssl == {"l7r.ssl.cert": "PEM"})
        self.query("DELETE FROM configs")
        yield self.until(lambda: live.current.getint("osf.default.memory") == 256)
        self.assertEqual(self.errors(), [])

    @defer.inlineCallbacks
    def test_invalid_row_keeps_previous(self):
        """
        An invalid row (a value of the wrong type) keeps the previous
        configuration and logs one error naming the key; fixing the row
        makes the next reload work.
        """
        live = yield self.make()
        self.query("INSERT INTO configs VALUES (-1, 'osf.default.memory', '512')")
        yield self.until(lambda: live.current.getint("osf.default.memory") == 512)
        loads = live.loads
        self.query("UPDATE configs SET value = 'lots'")
        yield self.until(lambda: self.errors())
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertEqual(live.loads, loads)
        self.assertEqual(live.current.getint("osf.default.memory"), 512)
        [error] = self.errors()
        self.assertIn("osf.default.memory", error["error"])
        self.assertIn("'lots'", error["error"])
        self.query("UPDATE configs SET value = '640'")
        yield self.until(lambda: live.current.getint("osf.default.memory") == 640)

    @defer.inlineCallbacks
    def test_loop_and_unknown_key_rejected(self):
        """
        A reference loop or an undeclared key in the database is rejected like
        a malformed value, and the same error is logged only once.
        """
        live = yield self.make()
        self.query("INSERT INTO configs VALUES (-1, 'custom.a', '${custom.b}'), "
                   "(-1, 'custom.b', '${custom.a}')")
        yield self.until(lambda: self.errors())
        self.assertIn("loop", self.errors()[0]["error"])
        self.query("DELETE FROM configs")
        self.query("INSERT INTO configs VALUES (-1, 'no.such.key', '1')")
        yield self.until(lambda: len(self.errors()) >= 2)
        yield live.reload()
        self.assertEqual(len(self.errors()), 2)
        self.assertIn("no.such.key", self.errors()[1]["error"])
        self.assertEqual(live.current.prefixed("custom."), {})

    @defer.inlineCallbacks
    def test_reload_after_reconnect(self):
        """
        A change made while no NOTIFY reached us (here: the trigger disabled)
        is picked up when the listener reconnects.
        """
        live = yield self.make()
        self.query("ALTER TABLE configs DISABLE TRIGGER configs_changed; "
                   "INSERT INTO configs VALUES (-1, 'osf.default.memory', '4096'); "
                   "ALTER TABLE configs ENABLE TRIGGER configs_changed")
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertEqual(live.current.getint("osf.default.memory"), 256)
        self.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        yield self.until(lambda: live.current.getint("osf.default.memory") == 4096)

    @defer.inlineCallbacks
    def test_concurrent_reloads_fold(self):
        """
        Reload requests made while one runs cause one more reload, not one each.
        """
        live = yield self.make()
        loads = live.loads
        yield defer.gatherResults([live.reload() for _ in range(5)])
        self.assertEqual(live.loads - loads, 2)
