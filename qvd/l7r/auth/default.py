"""
The C{default} plugin: tenants from the login, passwords from the database,
bearer tokens (reference 2.1).

- find_tenant: C{user@tenant} / C{user#tenant} (any character of
  C{l7r.auth.plugin.default.separators}, the last one wins), else the tenant
  C{l7r.auth.plugin.default.tenant}.
- authenticate_basic: C{users.password} through L{qvd.passwords}: argon2id,
  or a hash imported from QVD (salt C{l7r.auth.plugin.default.salt}), which is
  replaced by an argon2id hash on the next successful login. Hashing runs in
  a thread so the reactor never waits for it; an unknown login costs the same
  hashing time as a known one.
- cache_verified: yes; a password it accepted is accepted again while the
  user's row (and so its stored hash) is unchanged, for
  C{l7r.auth.cache.lifetime} (L{qvd.l7r.auth.cache}).
- authenticate_bearer: C{user_tokens} through L{qvd.l7r.auth.tokens}.
"""

from qvd.logs import Logger

from qvd import passwords
from qvd.l7r.auth import tokens
from qvd.l7r.auth.credentials import split_login
from qvd.l7r.auth.plugin import Plugin

log = Logger()

_dummy_hash = None


def _verify_unknown(password, salt):
    """
    Spend the time of a real verification, for a login that does not exist,
    so that failures take as long whether the user exists or not.
    """
    global _dummy_hash
    if _dummy_hash is None:
        _dummy_hash = passwords.hash_password("qvd-no-such-user-password")
    passwords.verify_password(_dummy_hash, password, salt)
    return False, False


class DefaultPlugin(Plugin):
    name = "default"

    def find_tenant(self, ctx, login):
        user, tenant = split_login(login, ctx.cfg("l7r.auth.plugin.default.separators"))
        return user, tenant or ctx.cfg("l7r.auth.plugin.default.tenant")

    def cache_verified(self, ctx):
        # The acceptance depends on the password and users.password only,
        # which the cache's UserState holds.
        return True

    async def authenticate_basic(self, ctx, login, password):
        if not password:
            return False
        rows = await self.db.runQuery(
            "SELECT id, password FROM users WHERE login = %s AND tenant_id = %s",
            (login, ctx.tenant_id))
        salt = ctx.cfg("l7r.auth.plugin.default.salt")
        if not rows or not rows[0][1]:
            await self.blocking(_verify_unknown, password, salt)
            return False
        user_id, stored = rows[0]
        ok, upgrade = await self.blocking(passwords.verify_password, stored, password, salt)
        if not ok:
            return False
        ctx.user_id = user_id
        if upgrade:
            try:
                new = await self.blocking(passwords.hash_password, password)
                await self.db.runOperation(
                    "UPDATE users SET password = %s WHERE id = %s AND password = %s",
                    (new, user_id, stored))
                log.info("upgraded the password hash of user {login} (tenant {tenant}) to argon2id",
                         login=login, tenant=ctx.tenant_id)
            except Exception:
                log.failure("could not upgrade the password hash of user {login}", login=login)
        return True

    async def authenticate_bearer(self, ctx, token):
        found = await tokens.redeem_token(self.db, token, self.clock.seconds())
        if found is None:
            return False
        rows = await self.db.runQuery(
            "SELECT login, tenant_id FROM users WHERE id = %s", (found.user_id,))
        if not rows:
            return False
        ctx.user_id = found.user_id
        ctx.login, ctx.tenant_id = rows[0]
        ctx.params.update(found.params)
        ctx.params.setdefault("qvd.vm.user.name", ctx.login)
        return True
