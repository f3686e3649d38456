"""
The verified-credentials cache, pure: a password accepted a moment ago for a
user whose row has not changed since is accepted again without checking it.

    cache = VerifiedCache(clock, size=10000, lifetime=300)
    state = UserState(user_id=7, password="$argon2id$...", blocked=False,
                      tenant_blocked=False, version="812:5")   # read on every login
    hit = cache.lookup(tenant_id, login, password, state, {"default"})  # Verified or None
    if hit is None:
        ... check the password (argon2id, LDAP) ...
        cache.remember(tenant_id, login, password, state, plugin="default", params={})

Why: a QVD client sends its Basic credentials with every request, and its
connect sequence is two requests (C{/qvd/list_of_vm}, then C{/qvd/connect_to_vm},
on a new TLS connection after a dropped network or a retry: the Perl client
retries a connect up to 5 times). Each would cost one argon2id check (24 ms of
a core, docs/l7r.md) when a few minutes earlier the same password was found
right. The L7R already remembers a login for the later requests of one
connection (L{qvd.l7r.server}); this cache spans connections.

What makes a hit sound:

  - Keyed by the credentials. An entry's key is a BLAKE2b, keyed with 32
    random bytes drawn when the cache is made (per process, never stored), of
    the tenant id, the canonical login and the password (length-prefixed, so
    no two triples share an encoding). The clear password is never kept; a
    hit needs the same tenant, login and password; any other password is a
    miss and is checked as always. The chain remembers only logins that
    succeeded as a whole (second factor and block checks included).
  - Valid only for the row it was verified against. While the cache is on,
    the chain reads the user's C{users} row joined to its tenant's on every
    login (one indexed query; the blocks are checked every time anyway) and
    gives the cache a L{UserState}: the row's
    id, stored password hash, block flags and C{version}, the PostgreSQL row
    versions (C{xmin}) of the C{users} and C{tenants} rows. Every C{UPDATE}
    of either row makes a new version, so a changed password, a block (and an
    unblock after it), a deleted and re-created user or any other edit makes
    the next login check the password again; a blocked user or tenant is never
    served from the cache. No NOTIFY is needed: the row is read at each
    login, so a change is seen at the very next one; a NOTIFY could only
    tell it sooner to a cache nobody asks in between, and a lost one would
    leave a stale entry.
  - Short-lived. An entry lives C{lifetime} seconds from its verification; a
    hit does not extend it, so a client that keeps reconnecting has its
    password checked again every C{lifetime}. The lifetime bounds what the
    database cannot tell: a password changed in an LDAP directory, and how
    long a digest of a password stays in the process's memory (whoever reads
    the memory also has the key, and BLAKE2b is fast to guess against).
  - Bounded. At most C{size} entries; the oldest verification goes first.
    Every lookup and remember first drops all the expired entries, not only
    the one it touches. A clock that goes back expires everything.

This module decides; L{qvd.l7r.auth.chain} reads the row, asks the plugins
whether their acceptance may be remembered (L{IAuthPlugin.cache_verified}) and
runs the second factor, the C{after_authenticate_basic} hooks, the block
checks and the login limits on a hit exactly as on a miss.
"""

import collections
import hashlib
import hmac
import secrets

import attrs

_PERSON = b"qvd-l7r-verified"


@attrs.frozen
class UserState:
    """
    What a verification is valid for: the user's row as read for this login.

    @ivar user_id: C{users.id}.
    @ivar password: C{users.password} (the stored hash; None when unset).
    @ivar blocked: C{users.blocked}.
    @ivar tenant_blocked: C{tenants.blocked} of the user's tenant.
    @ivar version: the row versions of the C{users} and C{tenants} rows
        (C{xmin}), as text: changes with every update of either row.
    """
    user_id: int
    password: str = attrs.field(repr=False)
    blocked: bool
    tenant_blocked: bool
    version: str


@attrs.frozen
class Verified:
    """
    A remembered acceptance.

    @ivar plugin: the name of the plugin that accepted the password.
    @ivar params: the VM parameters that plugin set (text -> text).
    @ivar verified_at: when the password was checked (the cache's clock).
    @ivar state_fingerprint: a keyed digest of the L{UserState} it is valid for.
    """
    plugin: str
    params: dict = attrs.field(converter=dict)
    verified_at: float
    state_fingerprint: bytes = attrs.field(repr=False)


def _encode(*fields):
    out = bytearray()
    for field in fields:
        raw = field if isinstance(field, bytes) else str(field).encode("utf-8", "surrogatepass")
        out += len(raw).to_bytes(8, "big") + raw
    return bytes(out)


class VerifiedCache:
    """
    Verified credentials, by keyed digest (see the module docstring).

    @param clock: what tells the time (C{seconds()}).
    @param size: the most entries kept; 0 disables the cache.
    @param lifetime: seconds an entry lives from its verification; 0 disables.
    @param key: the digest key (32 random bytes by default; for tests).

    @ivar hits: lookups answered from the cache since it was made.
    @ivar misses: lookups that were not (the password was checked).
    """

    def __init__(self, clock, size=10000, lifetime=300.0, key=None):
        self.clock = clock
        self.size = size
        self.lifetime = lifetime
        self._key = key if key is not None else secrets.token_bytes(32)
        self._entries = collections.OrderedDict()     # digest -> Verified, oldest first
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self):
        """Whether entries are kept at all (C{size} and C{lifetime} above 0)."""
        return self.size > 0 and self.lifetime > 0

    def configure(self, size, lifetime):
        """
        Apply new settings (live configuration): entries over the new size
        or older than the new lifetime go at once.
        """
        self.size, self.lifetime = size, lifetime
        self._expire()

    def _digest(self, *fields, size=32):
        return hashlib.blake2b(_encode(*fields), digest_size=size, key=self._key,
                               person=_PERSON).digest()

    def _credentials(self, tenant_id, login, password):
        return self._digest(b"credentials", tenant_id, login, password)

    def _fingerprint(self, state):
        return self._digest(b"state", state.user_id, state.password or b"", state.blocked,
                            state.tenant_blocked, state.version, size=16)

    def _expire(self):
        if not self.enabled:
            self._entries.clear()
            return
        now = self.clock.seconds()
        while self._entries:
            oldest = next(iter(self._entries.values()))
            age = now - oldest.verified_at
            if 0 <= age < self.lifetime and len(self._entries) <= self.size:
                break
            self._entries.popitem(last=False)

    def lookup(self, tenant_id, login, password, state, plugins):
        """
        The acceptance remembered for these credentials, if the user's row
        is still C{state}, the user and tenant are not blocked and the plugin
        that accepted them is one of C{plugins}; an entry that no longer
        holds is dropped.

        @param state: the L{UserState} read for this login, or None when the
            user has no row (never a hit).
        @param plugins: names of the plugins whose acceptances may be used
            now (in the chain and allowing it).
        @return: a L{Verified}, or None: check the password.
        """
        self._expire()
        digest = self._credentials(tenant_id, login, password)
        entry = self._entries.get(digest)
        if entry is not None and (
                state is None or state.blocked or state.tenant_blocked
                or entry.plugin not in plugins
                or not hmac.compare_digest(entry.state_fingerprint, self._fingerprint(state))):
            del self._entries[digest]
            entry = None
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def remember(self, tenant_id, login, password, state, plugin, params):
        """
        Remember that C{plugin} accepted these credentials now, for the user
        row C{state} read before the check began (so that a change made
        while it ran already makes the entry stale). Only call it once the
        whole login succeeded.

        @param params: the VM parameters the plugin set, given back on a hit.
        """
        if not self.enabled or state is None or state.blocked or state.tenant_blocked:
            return
        digest = self._credentials(tenant_id, login, password)
        self._entries.pop(digest, None)
        self._entries[digest] = Verified(plugin, params, self.clock.seconds(),
                                         self._fingerprint(state))
        self._expire()

    def clear(self):
        """Drop every entry."""
        self._entries.clear()

    def __len__(self):
        self._expire()
        return len(self._entries)
