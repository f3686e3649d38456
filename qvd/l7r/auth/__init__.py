"""
Authentication of L7R requests: a chain of plugins (reference 2.1).

    from qvd.l7r.auth import Authenticator, AuthFailed
    authenticator = Authenticator(db, config, reactor)
    result = await authenticator.authenticate(headers, source_ip)

Modules: L{interfaces} (the seam: AuthResult, AuthFailed, IAuthenticator),
L{chain} (the Authenticator), L{plugin} (IAuthPlugin and its base class), the
plugins L{default}, L{ldap}, L{totp}, L{auto}; pure helpers L{credentials},
L{otp}, L{ratelimit}, L{tokens} (bearer tokens).
"""

from qvd.l7r.auth.interfaces import AuthFailed, AuthResult, IAuthenticator  # noqa: F401


def __getattr__(name):
    # Imported lazily so that `interfaces` stays importable on its own.
    if name == "Authenticator":
        from qvd.l7r.auth.chain import Authenticator
        return Authenticator
    raise AttributeError(name)
