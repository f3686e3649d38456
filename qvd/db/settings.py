"""
Where the database is, from the configuration.

    dsn = database_dsn(config, "hkd")    # starts the private cluster if needed

With C{database.host} empty, qvd uses (and starts when needed) the private
cluster under C{path.db}; otherwise it connects to the configured server.
Each kind of program connects as its own role (L{qvd.db.roles}): C{admin}
(qvd-admin, the schema's owner) as C{database.user}, the L7R as
C{database.user.l7r}, the HKD as C{database.user.hkd}; C{superuser} (only
C{qvd-admin db init}, which creates the roles and the database) as
C{database.superuser}.
"""

from qvd.db import roles
from qvd.db.cluster import PrivateCluster


def private_cluster(config):
    """
    The private cluster of this configuration, or None when a server is set.
    """
    if config.get("database.host"):
        return None
    return PrivateCluster(config.get("path.db"), superuser=config.get("database.superuser"),
                          roles=tuple(roles.names(config).values()))


def database_dsn(config, kind="admin", ensure=True, dbname=None):
    """
    A libpq connection string for the configured database, as the role of
    C{kind} (C{admin}, C{l7r}, C{hkd} or C{superuser}).

    @param ensure: start the private cluster when it is the one configured
        and does not run. The database itself is created by
        L{qvd.db.sync.ensure_database}.
    @param dbname: another database of the same server (default
        C{database.name}).
    """
    if kind == "superuser":
        user = config.get("database.superuser")
    else:
        user = config.get(roles.KINDS[kind])
    dbname = dbname or config.get("database.name")
    cluster = private_cluster(config)
    if cluster is not None:
        if ensure:
            cluster.ensure()
        return cluster.dsn(dbname, user=user)
    parts = {
        "host": config.get("database.host"),
        "port": config.get("database.port"),
        "dbname": dbname,
        "user": user,
    }
    password = config.get(f"database.password.{kind}" if kind != "admin" else "database.password")
    if password:
        parts["password"] = password
    passfile = config.get("database.passfile")
    if passfile:
        parts["passfile"] = passfile
    return " ".join(f"{k}={_quote(v)}" for k, v in parts.items())


def _quote(value):
    value = str(value)
    if value and all(c not in value for c in " '\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
