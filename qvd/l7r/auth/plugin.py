"""
The plugin seam of the authentication chain (reference 2.1).

A plugin is an object providing L{IAuthPlugin}; L{Plugin} gives every hook a
neutral default, so a plugin overrides only the hooks it needs:

    @implementer(IAuthPlugin)
    class Shout(Plugin):
        name = "shout"
        def normalize_login(self, ctx, login):
            return login.upper()

Every hook receives the L{AuthContext} of the request being authenticated and
may return its value directly or as a Deferred (or be a coroutine function).
Plugins are created once per L{qvd.l7r.auth.chain.Authenticator} and must keep
no per-request state outside the context. The chain runs the hooks in this
order (see L{qvd.l7r.auth.chain}):

  Basic: find_tenant -> normalize_login -> split_second_factor ->
         authenticate_basic (skipped on a cache hit, see cache_verified) ->
         check_second_factor -> after_authenticate_basic
  Bearer: authenticate_bearer
"""

import attrs
from zope.interface import Attribute, Interface, implementer


@attrs.define
class AuthContext:
    """
    What the chain knows about the request being authenticated.

    @ivar config: the L{qvd.config.Config} snapshot used for this request.
    @ivar source_ip: the client's address.
    @ivar headers: the request headers (lower-case names).
    @ivar client_env: variables the client shared with C{Auth-*} headers.
    @ivar login: the login being authenticated (normalized once known).
    @ivar tenant_id: the tenant, once known (None before).
    @ivar user_id: C{users.id}, when a plugin or the chain found it.
    @ivar params: parameters for the VM (C{qvd.vm.user.*}, ...), text values.
    @ivar authenticated_by: name of the plugin that accepted the credentials.
    """
    config: object
    source_ip: str = ""
    headers: dict = attrs.field(factory=dict)
    client_env: dict = attrs.field(factory=dict)
    login: str = ""
    tenant_id: int = None
    user_id: int = None
    params: dict = attrs.field(factory=dict)
    authenticated_by: str = None

    def cfg(self, name):
        """
        The text value of config key C{name} for this request's tenant.
        """
        return self.config.get(name, tenant=self.tenant_id)

    def cfg_typed(self, name):
        """
        The value of C{name}, converted to its declared type.
        """
        return self.config.typed(name, tenant=self.tenant_id)


class AuthConfigError(Exception):
    """
    A plugin cannot work because of its configuration; the message names the
    key and what to set. The chain logs it and refuses the request without
    counting it as the user's failed attempt.
    """


class IAuthPlugin(Interface):
    """
    One link of the authentication chain. Hooks may return Deferreds.
    """

    name = Attribute("The name used in l7r.auth.plugins (lower-case).")

    def find_tenant(ctx, login):
        """
        Say which tenant the raw C{login} belongs to.

        @return: (user_login, tenant_name) or None to let the next plugin
            answer. The first answer wins.
        """

    def normalize_login(ctx, login):
        """
        @return: the login, possibly rewritten. Every plugin is called in
            chain order, each receiving the previous result.
        """

    def split_second_factor(ctx, password):
        """
        Take a second factor out of the password field.

        @return: (password, code) or None. The first plugin answering owns
            the second factor and its L{check_second_factor} must accept.
        """

    def authenticate_basic(ctx, login, password):
        """
        Check the login and password.

        @return: True to accept (the chain stops there); False to let the
            next plugin try. May set C{ctx.user_id}, C{ctx.params} and
            C{ctx.login}.
        """

    def cache_verified(ctx):
        """
        Whether a password this plugin accepted may be accepted again without
        asking the plugin, for C{l7r.auth.cache.lifetime}, while the user's
        row is unchanged (L{qvd.l7r.auth.cache}). Say yes only when the
        acceptance depends on nothing but the credentials and that row (or
        when the admin chose so for a directory).

        @return: a bool (not a Deferred).
        """

    def check_second_factor(ctx, code):
        """
        Check the code split off by this plugin; C{ctx.user_id} is known.

        @return: True to accept.
        """

    def after_authenticate_basic(ctx):
        """
        Called on every plugin after the credentials were accepted, before
        the user row is checked (e.g. to provision it).
        """

    def authenticate_bearer(ctx, token):
        """
        Check a bearer token.

        @return: True to accept; then C{ctx.user_id}, C{ctx.tenant_id} and
            C{ctx.login} must be set. False lets the next plugin try.
        """


@implementer(IAuthPlugin)
class Plugin:
    """
    A plugin whose hooks all pass; subclass it and override some hooks.

    @ivar db: the L{qvd.db.pool.Database}.
    @ivar reactor: the reactor (for connections and timeouts).
    @ivar blocking: C{blocking(f, *args) -> Deferred} runs CPU-heavy work.
    @ivar clock: what tells the time (C{seconds()}); the reactor by default.
    """
    name = "base"

    def __init__(self, db, reactor, blocking=None, clock=None):
        self.db = db
        self.reactor = reactor
        self.blocking = blocking
        self.clock = clock if clock is not None else reactor

    def find_tenant(self, ctx, login):
        return None

    def normalize_login(self, ctx, login):
        return login

    def split_second_factor(self, ctx, password):
        return None

    def authenticate_basic(self, ctx, login, password):
        return False

    def cache_verified(self, ctx):
        return False

    def check_second_factor(self, ctx, code):
        return False

    def after_authenticate_basic(self, ctx):
        return None

    def authenticate_bearer(self, ctx, token):
        return False
