"""
Authentication of L7R clients: the L{interfaces.IAuthenticator} seam and its
plugins (the default database password check, LDAP, TOTP, auto-provisioning).

    authenticator = make_authenticator(config, db, reactor)   # a chain.Authenticator
    result = await authenticator.authenticate(headers, source_ip)

See L{chain} for the order of the plugin hooks, L{plugin} for writing a
plugin, L{tokens} for bearer tokens, L{cache} for the verified credentials
remembered across a client's connections.
"""


def make_authenticator(config, db, reactor, blocking=None):
    """
    The L{IAuthenticator} of the configured plugin chain.

    @param config: a L{qvd.config.Config} or a live config with C{.current}.
    @param db: a L{qvd.db.pool.Database}.
    @param blocking: runs the password checks (L{hashpool.HashPool}); by
        default the reactor's thread pool.
    """
    from qvd.l7r.auth.chain import Authenticator
    return Authenticator(db, config, reactor, blocking=blocking)
