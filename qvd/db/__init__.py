"""
Access to qvd's PostgreSQL database.

Daemons use L{qvd.db.pool.Database} (asynchronous, txpostgres) and
L{qvd.db.listen.Listener} (LISTEN/NOTIFY that survives PostgreSQL restarts);
command-line tools use L{qvd.db.sync} (psycopg2, blocking). Both run
coordinating transactions at serializable isolation and retry them on
serialization failures. L{qvd.db.cluster} starts the private cluster used when
no database server is configured; L{qvd.db.migrate} applies the schema.
"""

#: SQLSTATEs after which a transaction is retried from the start:
#: serialization_failure and deadlock_detected.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})


class DatabaseError(Exception):
    """
    A database operation failed in a way a person should be told about.
    """
