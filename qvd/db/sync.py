"""
Blocking database access for command-line tools (psycopg2).

    from qvd.db import sync
    with sync.connect(dsn) as conn:
        vm_id = sync.transaction(conn, lambda cur: ...)

L{transaction} runs its function at serializable isolation and runs it again
(up to C{retries} times) when PostgreSQL reports a serialization failure or a
deadlock, so the function must have no effect outside the database.
"""

import contextlib
import random
import time

import psycopg2
import psycopg2.extensions
import psycopg2.extras

from qvd._redact import redact
from qvd.db import RETRYABLE_SQLSTATES, DatabaseError


@contextlib.contextmanager
def connect(dsn):
    """
    A psycopg2 connection to C{dsn}, closed after the block; L{DatabaseError}
    (which names the DSN without its password) when it cannot connect.
    """
    try:
        conn = psycopg2.connect(dsn)
    except psycopg2.OperationalError as e:
        raise DatabaseError(f"cannot connect to the database ({redact(dsn)}): "
                            f"{redact(str(e).strip())}") from None
    try:
        yield conn
    finally:
        conn.close()


def ensure_database(dsn_admin, name, template=None, owner=None):
    """
    Create database C{name} (owned by C{owner}, default the connected role)
    through the maintenance database C{dsn_admin} unless it exists. Returns
    True when it was created.
    """
    with connect(dsn_admin) as conn:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone():
                return False
            sql = f'CREATE DATABASE "{name}"'
            if template:
                sql += f' TEMPLATE "{template}" STRATEGY FILE_COPY'
            if owner:
                sql += f' OWNER "{owner}"'
            cur.execute(sql)
            return True


def transaction(conn, function, *args, retries=10, isolation="SERIALIZABLE", **kwargs):
    """
    Run C{function(cursor, *args, **kwargs)} in one transaction and commit.

    Retried from the start on serialization failures and deadlocks; any other
    exception rolls back and propagates. Returns what C{function} returns.
    """
    attempt = 0
    while True:
        attempt += 1
        try:
            with conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor) as cur:
                cur.execute(f"SET TRANSACTION ISOLATION LEVEL {isolation}")
                result = function(cur, *args, **kwargs)
            conn.commit()
            return result
        except psycopg2.Error as e:
            conn.rollback()
            if e.pgcode in RETRYABLE_SQLSTATES and attempt <= retries:
                time.sleep(random.uniform(0, 0.005 * 2 ** min(attempt, 6)))
                continue
            raise
        except BaseException:
            conn.rollback()
            raise


def notify(cursor, channel, payload=""):
    """
    Queue a NOTIFY on C{channel}; PostgreSQL sends it when the transaction commits.
    """
    cursor.execute("SELECT pg_notify(%s, %s)", (channel, payload))
