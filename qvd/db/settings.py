"""
Where the database is, from the configuration.

    dsn = database_dsn(config)           # starts the private cluster if needed

With C{database.host} empty, qvd uses (and starts when needed) the private
cluster under C{path.db}; otherwise it connects to the configured server.
"""

from qvd.db.cluster import PrivateCluster


def private_cluster(config):
    """
    The private cluster of this configuration, or None when a server is set.
    """
    if config.get("database.host"):
        return None
    return PrivateCluster(config.get("path.db"))


def database_dsn(config, ensure=True):
    """
    A libpq connection string for the configured database.

    @param ensure: start the private cluster when it is the one configured
        and does not run. The database itself is created by
        L{qvd.db.sync.ensure_database}.
    """
    cluster = private_cluster(config)
    if cluster is not None:
        if ensure:
            cluster.ensure()
        return cluster.dsn(config.get("database.name"))
    parts = {
        "host": config.get("database.host"),
        "port": config.get("database.port"),
        "dbname": config.get("database.name"),
        "user": config.get("database.user"),
    }
    password = config.get("database.password")
    if password:
        parts["password"] = password
    return " ".join(f"{k}={_quote(v)}" for k, v in parts.items())


def _quote(value):
    value = str(value)
    if value and all(c not in value for c in " '\\"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
