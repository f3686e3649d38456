"""
Asynchronous database access for daemons, through txpostgres.

    db = Database(dsn, reactor, size=4)
    await db.start()
    rows = await db.runQuery("SELECT id, name FROM hosts WHERE name = %s", (name,))
    def claim(cursor):                      # runs inside one transaction
        return cursor.execute("UPDATE ...").addCallback(lambda c: c.fetchall())
    rows = await db.transaction(claim)      # serializable, retried on conflict
    await db.stop()

Connections are opened on demand (at most C{size}); one that PostgreSQL closed
(server restart, network cut) is thrown away and a new one opened for the next
call, so a daemon survives restarts of PostgreSQL: calls made while the server
is down fail with L{DatabaseUnavailable}, later calls work again.

Rows are tuples; L{Database.runQueryDicts} returns dicts keyed by column name.
"""

import random

import psycopg2
from twisted.internet import defer, error, task
from twisted.python import failure
from qvd.logs import Logger
from txpostgres import txpostgres

from qvd._redact import redact
from qvd.db import RETRYABLE_SQLSTATES, DatabaseError

log = Logger()


class DatabaseUnavailable(DatabaseError):
    """
    PostgreSQL could not be reached or closed the connection.
    """


class Connection(txpostgres.Connection):
    """
    A txpostgres connection that reports a server-side close as a lost
    connection (instead of an error logged by the reactor) and tells
    C{lostCallback}, if set.
    """
    lostCallback = None

    def doRead(self):
        try:
            return txpostgres.Connection.doRead(self)
        except psycopg2.Error as e:
            return error.ConnectionLost(str(e).strip())

    def connectionLost(self, reason):
        txpostgres.Connection.connectionLost(self, reason)
        if self.lostCallback is not None:
            self.lostCallback(reason)

    def _runInteraction(self, interaction, *args, **kwargs):
        # txpostgres's own version logs a failed ROLLBACK as an unhandled
        # error; on a connection PostgreSQL closed there is nothing to roll
        # back, and the caller gets the original failure either way.
        cursor = self.cursor()
        d = cursor.execute("begin")
        d.addCallback(interaction, *args, **kwargs)

        def commit(result):
            return cursor.execute("commit").addCallback(lambda _: result)

        def rollback(reason):
            if self.closed:
                return reason
            attempt = defer.maybeDeferred(cursor.execute, "rollback")

            def failed(rollback_failure):
                log.warn("ROLLBACK failed ({error}) after: {reason}",
                         error=str(rollback_failure.value).strip(),
                         reason=str(reason.value).strip())
                return failure.Failure(txpostgres.RollbackFailed(self, reason))
            attempt.addCallbacks(lambda _: reason, failed)
            return attempt
        d.addCallbacks(commit)
        d.addErrback(rollback)
        return d


def _is_connection_error(failure_or_exc):
    exc = getattr(failure_or_exc, "value", failure_or_exc)
    if isinstance(exc, (psycopg2.InterfaceError, txpostgres.RollbackFailed)):
        return True
    if isinstance(exc, psycopg2.OperationalError):
        # OperationalError also covers errors that leave the connection usable
        # (serialization failures, lock timeouts): only a missing SQLSTATE,
        # class 08 (connection exception) or 57P (operator intervention: the
        # server shutting down) mean the connection is gone.
        code = exc.pgcode
        return code is None or code.startswith("08") or code.startswith("57P")
    return False


class Database:
    """
    A small pool of txpostgres connections to one database.

    @ivar dsn: the libpq connection string.
    @ivar size: the most connections open at once.
    @ivar retries: how often a serializable transaction is retried.
    """

    def __init__(self, dsn, reactor, size=4, retries=10):
        self.dsn = dsn
        self.reactor = reactor
        self.size = size
        self.retries = retries
        self._idle = []
        self._open = 0
        self._waiting = []
        self._stopped = False

    def start(self):
        """
        Open one connection to check that the database answers.

        @return: a Deferred that fires with None, or fails with
            L{DatabaseUnavailable}.
        """
        self._stopped = False
        return self._acquire().addCallback(self._release)

    def stop(self):
        """
        Close every idle connection; busy ones close when they are released.
        """
        self._stopped = True
        idle, self._idle = self._idle, []
        for conn in idle:
            self._close(conn)
        for d in self._waiting:
            d.errback(DatabaseUnavailable("the database pool was stopped"))
        self._waiting = []
        return defer.succeed(None)

    def _close(self, conn):
        self._open -= 1
        try:
            conn.close()
        except Exception:
            pass

    @defer.inlineCallbacks
    def _connect(self):
        conn = Connection(reactor=self.reactor)
        self._open += 1
        try:
            yield conn.connect(self.dsn)
        except Exception as e:
            self._open -= 1
            raise DatabaseUnavailable(f"cannot connect to the database: {redact(str(e).strip())}")
        return conn

    def _acquire(self):
        if self._stopped:
            return defer.fail(DatabaseUnavailable("the database pool is stopped"))
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return defer.succeed(conn)
            self._open -= 1
        if self._open < self.size:
            return self._connect()
        d = defer.Deferred()
        self._waiting.append(d)
        return d

    def _release(self, conn, broken=False):
        if broken or conn.closed or self._stopped:
            self._close(conn)
            if self._waiting and not self._stopped:
                self._connect().chainDeferred(self._waiting.pop(0))
            return
        if self._waiting:
            self._waiting.pop(0).callback(conn)
        else:
            self._idle.append(conn)

    @defer.inlineCallbacks
    def _with_connection(self, method, *args, **kwargs):
        conn = yield self._acquire()
        try:
            result = yield getattr(conn, method)(*args, **kwargs)
        except Exception as e:
            broken = _is_connection_error(e)
            self._release(conn, broken=broken)
            if broken:
                raise DatabaseUnavailable(f"lost the database connection: {str(e).strip()}")
            raise
        self._release(conn)
        return result

    def runQuery(self, sql, args=None):
        """
        Run one statement in autocommit and fire with its rows (tuples).
        """
        return self._with_connection("runQuery", sql, args)

    def runOperation(self, sql, args=None):
        """
        Run one statement that returns no rows; fire with None.
        """
        return self._with_connection("runOperation", sql, args)

    @defer.inlineCallbacks
    def runQueryDicts(self, sql, args=None):
        """
        Like L{runQuery} but fire with a list of dicts keyed by column name.
        """
        def interaction(cursor):
            d = cursor.execute(sql, args)
            d.addCallback(lambda c: _dicts(c))
            return d
        result = yield self._with_connection("runInteraction", interaction)
        return result

    @defer.inlineCallbacks
    def transaction(self, interaction, *args, isolation="SERIALIZABLE", **kwargs):
        """
        Run C{interaction(cursor, *args, **kwargs)} in one transaction.

        C{interaction} returns a Deferred (or is a coroutine function); it is
        run again from the start after a serialization failure or a deadlock,
        so it must do nothing outside the database. Fires with its result.
        """
        attempt = 0
        while True:
            attempt += 1

            def wrapped(cursor):
                d = cursor.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
                d.addCallback(lambda _: defer.ensureDeferred(
                    _maybe_coroutine(interaction, cursor, *args, **kwargs)))
                return d
            try:
                result = yield self._with_connection("runInteraction", wrapped)
                return result
            except psycopg2.Error as e:
                if e.pgcode in RETRYABLE_SQLSTATES and attempt <= self.retries:
                    delay = random.uniform(0, 0.005 * 2 ** min(attempt, 6))
                    yield task.deferLater(self.reactor, delay, lambda: None)
                    continue
                raise


async def _maybe_coroutine(function, *args, **kwargs):
    result = function(*args, **kwargs)
    if isinstance(result, defer.Deferred) or hasattr(result, "__await__"):
        result = await result
    return result


def _dicts(cursor):
    if cursor.description is None:
        return []
    names = [column.name for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def fetch_dicts(cursor):
    """
    The remaining rows of an executed txpostgres cursor as dicts.
    """
    return _dicts(cursor)
