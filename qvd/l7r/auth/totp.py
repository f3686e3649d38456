"""
The C{totp} plugin: a second factor of RFC 6238 codes appended to the password
(reference 2.1; the QT client appends it too).

The last C{l7r.auth.plugin.totp.token_size} characters of the password field
are the code; the rest is checked by the other plugins of the chain. The
user's base32 secret is the user property C{l7r.auth.plugin.totp.secret32}.
Codes are HMAC-SHA1, C{interval} seconds long from C{t0}, accepted up to
C{leeway} steps back and C{leeway_before} steps ahead. A code is accepted once:
the last accepted step per user is kept in C{user_totp_steps} and a code of
that step or an earlier one is refused.

Typical chain: C{l7r.auth.plugins.head = totp}.
"""

from qvd.logs import Logger

from qvd.l7r.auth import otp
from qvd.l7r.auth.plugin import Plugin

log = Logger()

SECRET_PROPERTY = "l7r.auth.plugin.totp.secret32"


class TotpPlugin(Plugin):
    name = "totp"

    def split_second_factor(self, ctx, password):
        size = int(ctx.cfg("l7r.auth.plugin.totp.token_size"))
        if len(password) <= size:
            return "", password
        return password[:-size], password[-size:]

    async def check_second_factor(self, ctx, code):
        rows = await self.db.runQuery(
            "SELECT up.value FROM user_properties up"
            " JOIN properties_list pl ON pl.id = up.property_id"
            " WHERE up.user_id = %s AND pl.key = %s AND pl.qvd_object = 'user'",
            (ctx.user_id, SECRET_PROPERTY))
        if not rows:
            log.warn("user {login} (tenant {tenant}) has no property {prop}: "
                     "second factor refused; set it to the user's base32 TOTP secret",
                     login=ctx.login, tenant=ctx.tenant_id, prop=SECRET_PROPERTY)
            return False
        try:
            secret = otp.decode_base32(rows[0][0])
        except ValueError as e:
            log.error("user {login}: property {prop} is not valid: {e}",
                      login=ctx.login, prop=SECRET_PROPERTY, e=e)
            return False
        step = otp.match_totp(
            secret, code, self.clock.seconds(),
            interval=int(ctx.cfg("l7r.auth.plugin.totp.interval")),
            t0=int(ctx.cfg("l7r.auth.plugin.totp.t0")),
            digits=int(ctx.cfg("l7r.auth.plugin.totp.token_size")),
            leeway=int(ctx.cfg("l7r.auth.plugin.totp.leeway")),
            leeway_before=int(ctx.cfg("l7r.auth.plugin.totp.leeway_before")))
        if step is None:
            return False
        accepted = await self.db.runQuery(
            "INSERT INTO user_totp_steps (user_id, last_step) VALUES (%s, %s)"
            " ON CONFLICT (user_id) DO UPDATE SET last_step = EXCLUDED.last_step"
            " WHERE user_totp_steps.last_step < EXCLUDED.last_step"
            " RETURNING user_id",
            (ctx.user_id, step))
        if not accepted:
            log.warn("user {login}: TOTP code of step {step} was already used", login=ctx.login,
                     step=step)
            return False
        return True
