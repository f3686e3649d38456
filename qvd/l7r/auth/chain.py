"""
The authentication chain of the L7R (reference 2.1): L{Authenticator}.

    authenticator = Authenticator(db, live_config, reactor)
    result = await authenticator.authenticate(headers, source_ip)   # AuthResult
    grant = await authenticator.create_auth_token(result)           # /qvd/create_auth_token
    params_id = await authenticator.store_auth_parameters(result)   # store_auth=1

The chain of a tenant is C{l7r.auth.plugins.head} + C{l7r.auth.plugins} +
C{l7r.auth.plugins.tail}, read for that tenant (before the tenant is known,
the global values). Plugin names map to L{PLUGINS}.

Basic credentials: the first plugin whose C{find_tenant} answers splits the
login into user and tenant; the login is trimmed and lower-cased (unless
C{model.user.login.case-sensitive}); the tenant must exist, have an id > 0 and
not be blocked; every plugin of the tenant's chain may rewrite the login
(C{normalize_login}); a plugin may split a second factor off the password; the
first plugin whose C{authenticate_basic} accepts wins; the second factor is
checked; C{qvd.vm.user.name} is set to the login; every C{after_authenticate_basic}
runs; the user must exist in C{users(login, tenant_id)} and not be blocked.

Bearer tokens: the first plugin of the global chain whose
C{authenticate_bearer} accepts wins; the user and its tenant must not be
blocked.

A password accepted by a plugin that allows it (L{IAuthPlugin.cache_verified})
is remembered for C{l7r.auth.cache.lifetime} seconds (L{qvd.l7r.auth.cache}):
the same tenant, login and password, while the user's and tenant's rows are
unchanged, skip C{authenticate_basic}; everything else above (tenant and
block checks, second factor, C{after_authenticate_basic}) and the limits
below run on a hit as on a miss. Any change of the configuration empties the
cache.

Attempts are limited per canonical (login, tenant) and source address, per
login and per address (L{qvd.l7r.auth.ratelimit}, docs/l7r.md); over a limit
a request is refused before any credential is checked. Every refusal (locked,
unknown user, wrong password) is the same answer, given no earlier than
C{l7r.auth.failure.delay} seconds after the request came in.
"""

from twisted.internet import defer, task, threads
from qvd.logs import Logger

from qvd.l7r.auth import credentials, tokens
from qvd.l7r.auth.auto import AutoPlugin
from qvd.l7r.auth.cache import UserState, VerifiedCache
from qvd.l7r.auth.default import DefaultPlugin
from qvd.l7r.auth.interfaces import AuthFailed, AuthResult, IAuthenticator
from qvd.l7r.auth.ldap import LdapPlugin
from qvd.l7r.auth.plugin import AuthConfigError, AuthContext
from qvd.l7r.auth.ratelimit import LimitSettings, LoginLimits
from qvd.l7r.auth.totp import TotpPlugin
from zope.interface import implementer

log = Logger()

#: Plugin name (as in l7r.auth.plugins) -> class.
PLUGINS = {cls.name: cls for cls in (DefaultPlugin, LdapPlugin, TotpPlugin, AutoPlugin)}

TOO_MANY = "too many failed attempts"

#: Longest login and tenant name (users.login is varchar(64)).
LOGIN_MAX = 64
#: Longest bearer token (user_tokens.token is varchar(256)).
TOKEN_MAX = 256


def _printable(text):
    return all(ord(c) >= 0x20 and c != "\x7f" for c in text)


class _Refused(AuthFailed):
    """
    The credentials were checked and refused: counts as a failed attempt.
    """


def _thread_runner(reactor):
    def run(function, *args):
        return threads.deferToThreadPool(reactor, reactor.getThreadPool(), function, *args)
    return run


@implementer(IAuthenticator)
class Authenticator:
    """
    L{IAuthenticator} through the plugin chain.

    @param db: a L{qvd.db.pool.Database}.
    @param config: a L{qvd.config.Config}, or an object whose C{current}
        attribute is one (L{qvd.config.live}); read anew on every request.
    @param reactor: the reactor; also the clock of the rate limits and tokens.
    @param blocking: C{blocking(f, *args) -> Deferred} runs CPU-heavy work
        (password hashing); by default in the reactor's thread pool.
    @param plugins: name -> plugin class, to add or replace plugins.
    @param clock: tells the time for rate limits, tokens, TOTP codes and the
        verified-credentials cache (C{seconds()}); the reactor by default.

    @ivar cache: the L{VerifiedCache} of this process's logins.
    """

    def __init__(self, db, config, reactor, blocking=None, plugins=None, clock=None):
        self.db = db
        self._config = config
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.blocking = blocking or _thread_runner(reactor)
        self._classes = dict(PLUGINS, **(plugins or {}))
        self._instances = {}
        self.limits = LoginLimits(self.clock, LimitSettings.from_config(self.config))
        self.cache = VerifiedCache(self.clock, 0, 0)
        self._cache_config = None

    @property
    def config(self):
        """
        The current configuration snapshot.
        """
        return getattr(self._config, "current", self._config)

    def chain(self, config, tenant_id=None):
        """
        The plugins of C{tenant_id}'s chain (global chain for None), in order,
        each name once.

        @raise AuthConfigError: naming an unknown plugin.
        """
        names = []
        for key in ("l7r.auth.plugins.head", "l7r.auth.plugins", "l7r.auth.plugins.tail"):
            for name in config.getlist(key, tenant=tenant_id):
                name = name.strip().lower()
                if name not in self._classes:
                    raise AuthConfigError(
                        f"unknown authentication plugin {name!r} in {key} "
                        f"(tenant {tenant_id}); known plugins: {', '.join(sorted(self._classes))}")
                if name not in names:
                    names.append(name)
        return [self._plugin(name) for name in names]

    def _plugin(self, name):
        plugin = self._instances.get(name)
        if plugin is None:
            plugin = self._instances[name] = self._classes[name](
                self.db, self.reactor, self.blocking, self.clock)
        return plugin

    def authenticate(self, request_headers, source_ip):
        """
        See L{IAuthenticator.authenticate}. Fails with L{AuthFailed}; errors
        of the infrastructure (e.g. L{qvd.db.pool.DatabaseUnavailable}) are
        passed on as they are, so that the caller can answer 503 instead of
        telling the user the password was wrong.
        """
        return defer.ensureDeferred(self._authenticate(request_headers, source_ip))

    async def _authenticate(self, headers, source_ip):
        began = self.clock.seconds()
        try:
            return await self._limited(headers, source_ip)
        except AuthFailed:
            # Locked, unknown and wrong are answered alike, no earlier than
            # l7r.auth.failure.delay after the request came in.
            delay = began + self.config.getfloat("l7r.auth.failure.delay") - self.clock.seconds()
            if delay > 0:
                await task.deferLater(self.clock, delay, lambda: None)
            raise

    async def _limited(self, headers, source_ip):
        headers = {k.lower(): v for k, v in headers.items()}
        config = self.config
        self.limits.configure(LimitSettings.from_config(config))
        self._configure_cache(config)
        creds = credentials.parse_authorization(headers.get("authorization"))
        ctx = AuthContext(config=config, source_ip=source_ip, headers=headers,
                          client_env=credentials.client_environment(headers))
        login_key = None
        if isinstance(creds, credentials.BasicCredentials):
            try:
                login_key = await self._identify(ctx, creds.login)
            except _Refused as e:
                # No login to count against: the address pays for it.
                ticket = self.limits.begin(None, source_ip)
                if ticket is None:
                    raise AuthFailed(TOO_MANY)
                self.limits.end(ticket, ok=False)
                raise AuthFailed(e.reason)
            except AuthConfigError as e:
                log.error("authentication refused because of the configuration: {e}", e=e)
                raise AuthFailed(f"configuration error: {e}")
        ticket = self.limits.begin(login_key, source_ip)
        if ticket is None:
            raise AuthFailed(TOO_MANY)
        try:
            if login_key is None:
                result = await self._bearer(ctx, creds.token)
            else:
                result = await self._verify(ctx, creds.password)
        except AuthConfigError as e:
            self.limits.abandon(ticket)
            log.error("authentication refused because of the configuration: {e}", e=e)
            raise AuthFailed(f"configuration error: {e}")
        except _Refused as e:
            self.limits.end(ticket, ok=False)
            raise AuthFailed(e.reason)
        except BaseException:
            self.limits.abandon(ticket)
            raise
        self.limits.end(ticket, ok=True)
        return result

    def _configure_cache(self, config):
        """
        Size and lifetime of the cache from C{config}; a configuration other
        than the last one (a reload of the live configuration) may have
        changed the chain or a plugin's settings: forget every entry.
        """
        if config is self._cache_config:
            return
        if self._cache_config is not None:
            self.cache.clear()
        self._cache_config = config
        self.cache.configure(config.getint("l7r.auth.cache.size"),
                             config.getfloat("l7r.auth.cache.lifetime"))

    async def _identify(self, ctx, raw_login):
        """
        The canonical identity of a Basic login: (login, tenant id) after the
        chain's tenant split and normalisation, as the limits count it.
        Sets C{ctx.tenant_id} and C{ctx.login}.
        """
        config = ctx.config
        if len(raw_login) > 2 * LOGIN_MAX + 1 or not _printable(raw_login):
            raise _Refused(f"login {raw_login[:80]!r} is too long or has control characters")
        case_sensitive = config.getbool("model.user.login.case-sensitive")
        found = None
        for plugin in self.chain(config):
            found = await defer.maybeDeferred(plugin.find_tenant, ctx, raw_login)
            if found is not None:
                break
        if found is None:
            found = raw_login, config.get("l7r.auth.plugin.default.tenant")
        login, tenant_name = found
        login = credentials.normalize_login(login, case_sensitive)
        tenant_name = (tenant_name or "").strip()
        if len(login) > LOGIN_MAX or len(tenant_name) > LOGIN_MAX:
            raise _Refused(f"login {login[:80]!r} or tenant {tenant_name[:80]!r} is longer "
                           f"than {LOGIN_MAX} characters")
        ctx.tenant_id = await self._tenant_id(tenant_name, case_sensitive)
        for plugin in self.chain(config, ctx.tenant_id):
            login = await defer.maybeDeferred(plugin.normalize_login, ctx, login)
        if not login or len(login) > LOGIN_MAX or not _printable(login):
            raise _Refused(f"empty, too long or unprintable login {login[:80]!r}")
        ctx.login = login
        return (login, ctx.tenant_id)

    async def _verify(self, ctx, password):
        """
        Check the password (and second factor) of the identified C{ctx.login}.
        """
        login = ctx.login
        chain = self.chain(ctx.config, ctx.tenant_id)
        second = code = None
        for plugin in chain:
            split = await defer.maybeDeferred(plugin.split_second_factor, ctx, password)
            if split is not None:
                (password, code), second = split, plugin
                break
        if not password:
            raise _Refused(f"empty password for {login!r}")

        cacheable = set()
        if self.cache.enabled:
            cacheable = {plugin.name for plugin in chain if plugin.cache_verified(ctx)}
        state = hit = None
        if cacheable:
            # Read before the check, so that a change made while it runs
            # leaves the entry stale (qvd.l7r.auth.cache).
            state = await self._user_state(ctx)
            hit = self.cache.lookup(ctx.tenant_id, login, password, state, cacheable)
        if hit is not None:
            ctx.authenticated_by = hit.plugin
            ctx.user_id = state.user_id
            ctx.params.update(hit.params)
            log.debug("password of {login} (tenant {tenant}) accepted by {plugin} "
                      "{age:.0f} s ago, unchanged: not checked again", login=login,
                      tenant=ctx.tenant_id, plugin=hit.plugin,
                      age=self.clock.seconds() - hit.verified_at)
        else:
            before = dict(ctx.params)
            for plugin in chain:
                if await defer.maybeDeferred(plugin.authenticate_basic, ctx, ctx.login,
                                             password):
                    ctx.authenticated_by = plugin.name
                    break
            else:
                raise _Refused(f"wrong login or password for {login!r} (tenant {ctx.tenant_id})")
            set_by_plugin = {k: v for k, v in ctx.params.items() if before.get(k) != v}

        if second is not None:
            ctx.user_id = await self._user_id(ctx)
            if not await defer.maybeDeferred(second.check_second_factor, ctx, code):
                raise _Refused(f"wrong second factor ({second.name}) for {ctx.login!r}")

        ctx.params["qvd.vm.user.name"] = ctx.login
        for plugin in chain:
            await defer.maybeDeferred(plugin.after_authenticate_basic, ctx)
        user_id = await self._user_id(ctx)
        if hit is None and ctx.authenticated_by in cacheable and ctx.login == login:
            # A plugin that renamed the login (auth.ldap.name.normalize) made
            # it another row than the one state was read for: not remembered.
            self.cache.remember(ctx.tenant_id, login, password, state, ctx.authenticated_by,
                                set_by_plugin)
        return AuthResult(user_id=user_id, tenant_id=ctx.tenant_id, login=ctx.login,
                          params=dict(ctx.params))

    async def _user_state(self, ctx):
        """
        The L{UserState} of C{ctx.login} in C{ctx.tenant_id}, or None when
        there is no such user.
        """
        rows = await self.db.runQuery(
            "SELECT u.id, u.password, u.blocked, t.blocked, u.xmin::text || ':' || t.xmin::text"
            " FROM users u JOIN tenants t ON t.id = u.tenant_id"
            " WHERE u.login = %s AND u.tenant_id = %s", (ctx.login, ctx.tenant_id))
        if not rows:
            return None
        user_id, password, blocked, tenant_blocked, version = rows[0]
        return UserState(user_id, password, blocked, tenant_blocked, version)

    async def _tenant_id(self, name, case_sensitive):
        where = "name = %s" if case_sensitive else "lower(name) = lower(%s)"
        rows = await self.db.runQuery(f"SELECT id, blocked FROM tenants WHERE {where}", (name,))
        if not rows:
            raise _Refused(f"no tenant {name!r}")
        tenant_id, blocked = rows[0]
        if tenant_id <= 0:
            raise _Refused(f"tenant {name!r} (id {tenant_id}) is not a login tenant")
        if blocked:
            raise _Refused(f"tenant {name!r} is blocked")
        return tenant_id

    async def _user_id(self, ctx):
        rows = await self.db.runQuery(
            "SELECT id, blocked FROM users WHERE login = %s AND tenant_id = %s",
            (ctx.login, ctx.tenant_id))
        if not rows:
            raise _Refused(f"no user {ctx.login!r} in tenant {ctx.tenant_id}")
        if rows[0][1]:
            raise _Refused(f"user {ctx.login!r} of tenant {ctx.tenant_id} is blocked")
        return rows[0][0]

    async def _bearer(self, ctx, token):
        if len(token) > TOKEN_MAX or not _printable(token):
            raise _Refused("bearer token too long or with control characters")
        for plugin in self.chain(ctx.config):
            if await defer.maybeDeferred(plugin.authenticate_bearer, ctx, token):
                ctx.authenticated_by = plugin.name
                break
        else:
            raise _Refused("unknown or expired bearer token")
        rows = await self.db.runQuery(
            "SELECT u.blocked, t.blocked FROM users u JOIN tenants t ON t.id = u.tenant_id"
            " WHERE u.id = %s", (ctx.user_id,))
        if not rows or rows[0][0] or rows[0][1]:
            raise _Refused(f"user {ctx.login!r} or its tenant is blocked or gone")
        return AuthResult(user_id=ctx.user_id, tenant_id=ctx.tenant_id, login=ctx.login,
                          params=dict(ctx.params))

    def create_auth_token(self, result, lifetime=tokens.DEFAULT_LIFETIME, vm_id=None,
                          multi_use=True):
        """
        A token for C{result}'s user, for C{/qvd/create_auth_token} (24 h,
        multi-use) or for C{connect_to_vm}'s C{auth_token} (with C{vm_id}).

        @param lifetime: seconds (the L7R passes C{l7r.auth_token.lifetime}).
        @return: a Deferred firing with a L{qvd.l7r.auth.tokens.TokenGrant}.
        """
        return tokens.create_auth_token(self.db, result, self.clock.seconds(), lifetime,
                                        multi_use=multi_use, vm_id=vm_id)

    def store_auth_parameters(self, result):
        """
        Store C{result.params}, for C{/qvd/authenticate_user?store_auth=1}.

        @return: a Deferred firing with the C{user_auth_parameters.id}.
        """
        return tokens.store_auth_parameters(self.db, result.params)
