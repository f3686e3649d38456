"""
Tests for qvd.db: migrations, the private cluster, the async pool and LISTEN.
"""

import psycopg2
from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from qvd.db import migrate, sync
from qvd.db.listen import Listener
from qvd.db.pool import Database, DatabaseUnavailable
from qvd.testing import pg


class MigrationTests(pg.DatabaseTestMixin, unittest.TestCase):

    def test_fresh_database_is_migrated(self):
        """
        A test database cloned from the template has every migration applied
        and the seed tenants of the original (-1, 0, 1).
        """
        with sync.connect(self.dsn) as conn:
            self.assertEqual(migrate.pending(conn), [])
        tenants = self.query("SELECT id, name FROM tenants ORDER BY id")
        self.assertEqual([(t["id"], t["name"]) for t in tenants],
                         [(-1, "-"), (0, "*"), (1, "default")])

    def test_upgrade_is_idempotent(self):
        """
        Running the upgrade on an up-to-date database applies nothing.
        """
        with sync.connect(self.dsn) as conn:
            self.assertEqual(migrate.upgrade(conn), [])

    def test_state_columns_are_checked(self):
        """
        A VM state outside the reference's set is refused by the database.
        """
        self.query("INSERT INTO hosts (name, address) VALUES ('n1', '10.0.0.2')")
        self.query("INSERT INTO users (tenant_id, login) VALUES (1, 'u')")
        self.query("INSERT INTO osfs (tenant_id, name) VALUES (1, 'o')")
        self.query("INSERT INTO vms (name, user_id, osf_id, ip, mac) "
                   "SELECT 'v', u.id, o.id, '10.0.255.254', '54:52:00:00:ff:fe' FROM users u, osfs o")
        self.query("INSERT INTO vm_runtimes (vm_id) SELECT id FROM vms")
        with self.assertRaises(psycopg2.errors.CheckViolation):
            self.query("UPDATE vm_runtimes SET vm_state = 'flying', host_id = 1")

    def test_tag_unique_per_osf(self):
        """
        One OSF cannot have the same tag on two DIs, but two OSFs can.
        """
        self.query("INSERT INTO osfs (tenant_id, name) VALUES (1, 'a'), (1, 'b')")
        self.query("INSERT INTO dis (osf_id, path, version) SELECT id, name || '.tar', '1' FROM osfs")
        self.query("INSERT INTO di_tags (di_id, osf_id, tag) SELECT id, osf_id, 'head' FROM dis")
        self.query("INSERT INTO dis (osf_id, path, version) SELECT id, 'x.tar', '2' FROM osfs WHERE name='a'")
        with self.assertRaises(psycopg2.errors.UniqueViolation):
            self.query("INSERT INTO di_tags (di_id, osf_id, tag) "
                       "SELECT id, osf_id, 'head' FROM dis WHERE version = '2'")


class PoolTests(pg.DatabaseTestMixin, unittest.TestCase):

    @defer.inlineCallbacks
    def test_query_and_transaction(self):
        """
        The pool runs queries and serializable transactions and returns rows.
        """
        db = Database(self.dsn, reactor, size=2)
        yield db.start()
        self.addCleanup(db.stop)
        rows = yield db.runQuery("SELECT name FROM tenants WHERE id = %s", (1,))
        self.assertEqual(rows, [("default",)])

        async def interaction(cursor):
            yield_ = await cursor.execute("SHOW transaction_isolation")
            return yield_.fetchone()[0]
        level = yield db.transaction(interaction)
        self.assertEqual(level, "serializable")
        dicts = yield db.runQueryDicts("SELECT id, name FROM tenants WHERE id = 0")
        self.assertEqual(dicts, [{"id": 0, "name": "*"}])

    @defer.inlineCallbacks
    def test_concurrent_transactions_retry(self):
        """
        Many concurrent read-modify-write transactions on one row all commit,
        each exactly once, thanks to the retry on serialization failure.
        """
        self.query("INSERT INTO configs (tenant_id, key, value) VALUES (-1, 'custom.n', '0')")
        db = Database(self.dsn, reactor, size=4, retries=50)
        yield db.start()
        self.addCleanup(db.stop)

        async def increment(cursor):
            c = await cursor.execute("SELECT value FROM configs WHERE key = 'custom.n'")
            n = int(c.fetchone()[0])
            await cursor.execute("UPDATE configs SET value = %s WHERE key = 'custom.n'",
                                 (str(n + 1),))
        yield defer.gatherResults([db.transaction(increment) for _ in range(12)])
        rows = self.query("SELECT value FROM configs WHERE key = 'custom.n'")
        self.assertEqual(rows[0]["value"], "12")

    @defer.inlineCallbacks
    def test_unreachable_database(self):
        """
        A pool whose server does not answer fails with DatabaseUnavailable.
        """
        db = Database("host=/nonexistent dbname=x", reactor)
        with self.assertRaises(DatabaseUnavailable):
            yield db.start()


class ListenerTests(pg.DatabaseTestMixin, unittest.TestCase):

    @defer.inlineCallbacks
    def test_notify_reaches_subscriber(self):
        """
        A NOTIFY on a subscribed channel reaches the callback with its payload.
        """
        got = defer.Deferred()
        listener = Listener(self.dsn, reactor, keepalive=0.5)
        listener.subscribe("qvd_test", lambda ch, payload: got.callback((ch, payload)))
        yield listener.start()
        self.addCleanup(listener.stop)
        self.query("SELECT pg_notify('qvd_test', 'hello')")
        result = yield got
        self.assertEqual(result, ("qvd_test", "hello"))

    @defer.inlineCallbacks
    def test_relisten_after_connection_killed(self):
        """
        When PostgreSQL kills the listening connection, the listener connects
        again, listens again, calls its reconnect callbacks, and delivers later
        notifications.
        """
        got = []
        reconnected = []
        listener = Listener(self.dsn, reactor, keepalive=0.2)
        listener.subscribe("qvd_test", lambda ch, payload: got.append(payload))
        listener.onReconnect(lambda: reconnected.append(True))
        yield listener.start()
        self.addCleanup(listener.stop)
        self.assertEqual(len(reconnected), 1)
        self.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                   "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        for _ in range(100):
            if len(reconnected) >= 2:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(reconnected), 2)
        self.query("SELECT pg_notify('qvd_test', 'again')")
        for _ in range(100):
            if got:
                break
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(got, ["again"])
