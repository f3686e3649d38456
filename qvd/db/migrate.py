"""
Versioned schema migrations: the SQL files of C{qvd/db/migrations}, applied in
the order of their numeric prefix and recorded in C{schema_migrations}.

    from qvd.db import migrate, sync
    with sync.connect(dsn) as conn:
        applied = migrate.upgrade(conn)   # names of the files applied now

Each file runs in one transaction: a failing file leaves the database as the
previous one left it. C{qvd-admin db upgrade} calls L{upgrade}.
"""

import os
import re

from qvd.db import DatabaseError

MIGRATIONS = os.path.join(os.path.dirname(__file__), "migrations")
_NAME = re.compile(r"^(\d{4})_[\w-]+\.sql$")


def available(directory=MIGRATIONS):
    """
    The migration files as a sorted list of (version, name, path).
    """
    found = []
    for name in os.listdir(directory):
        match = _NAME.match(name)
        if match:
            found.append((int(match.group(1)), name, os.path.join(directory, name)))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise DatabaseError(f"two migrations in {directory} share a number: {versions}")
    return found


def applied(conn):
    """
    The versions already applied to the database behind C{conn}.
    """
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")
        if not cur.fetchone()[0]:
            return set()
        cur.execute("SELECT version FROM schema_migrations")
        return {row[0] for row in cur.fetchall()}


def upgrade(conn, directory=MIGRATIONS):
    """
    Apply every migration not yet applied, each in its own transaction.

    @param conn: a psycopg2 connection (autocommit off).
    @return: the list of file names applied.
    """
    with conn.cursor() as cur:
        # One upgrader at a time, whatever else runs.
        cur.execute("SELECT pg_advisory_lock(7171717)")
        cur.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                           version integer PRIMARY KEY,
                           name text NOT NULL,
                           applied_at timestamptz NOT NULL DEFAULT now())""")
    conn.commit()
    done = []
    try:
        already = applied(conn)
        for version, name, path in available(directory):
            if version in already:
                continue
            with open(path, encoding="utf-8") as f:
                sql = f.read()
            try:
                with conn.cursor() as cur:
                    cur.execute(sql)
                    cur.execute("INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                                (version, name))
                conn.commit()
            except Exception as e:
                conn.rollback()
                raise DatabaseError(f"migration {name} failed and was rolled back: {e}".strip())
            done.append(name)
    finally:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_unlock(7171717)")
        conn.commit()
    return done


def pending(conn, directory=MIGRATIONS):
    already = applied(conn)
    return [name for version, name, _ in available(directory) if version not in already]
