"""
qvd.l7r.auth.cache, pure: the verified-credentials cache on a task.Clock.
"""

import attrs
from twisted.internet import task
from twisted.trial import unittest

from qvd.l7r.auth.cache import UserState, VerifiedCache

STATE = UserState(7, "$argon2id$v=19$stored", False, False, "812:5")


class VerifiedCacheTests(unittest.TestCase):

    def setUp(self):
        self.clock = task.Clock()
        self.clock.advance(1_700_000_000)
        self.cache = VerifiedCache(self.clock, size=100, lifetime=300)

    def remember(self, login="alice", password="pw", tenant=1, state=STATE, cache=None,
                 params=None):
        (self.cache if cache is None else cache).remember(tenant, login, password, state, "default",
                                       params or {})

    def lookup(self, login="alice", password="pw", tenant=1, state=STATE, cache=None,
               plugins=("default",)):
        return (self.cache if cache is None else cache).lookup(tenant, login, password, state,
                                                               plugins)

    def test_hit(self):
        """
        The same tenant, login and password with the same user row are a hit,
        giving the plugin that accepted them and the parameters it set.
        """
        self.remember(params={"qvd.vm.user.uid": "1001"})
        hit = self.lookup()
        self.assertEqual((hit.plugin, hit.params, hit.verified_at),
                         ("default", {"qvd.vm.user.uid": "1001"}, self.clock.seconds()))
        self.assertEqual((self.cache.hits, self.cache.misses), (1, 0))

    def test_other_credentials_miss(self):
        """
        Another password, login or tenant is a miss, also when the fields'
        concatenation is the same; the entry of the right ones stays.
        """
        self.remember(login="ab", password="c")
        for login, password, tenant in (("ab", "C", 1), ("ab", "c ", 1), ("ab", "", 1),
                                        ("a", "bc", 1), ("abc", "", 1), ("ab", "c", 2),
                                        ("Ab", "c", 1)):
            self.assertIsNone(self.lookup(login, password, tenant))
        self.assertIsNotNone(self.lookup("ab", "c", 1))
        self.assertEqual((self.cache.hits, self.cache.misses), (1, 7))

    def test_lifetime(self):
        """
        An entry lives 300 s from its verification: a hit at 299 s, a miss at
        300 s; hits do not extend it.
        """
        self.remember()
        for _ in range(299):
            self.clock.advance(1)
            self.assertIsNotNone(self.lookup())
        self.clock.advance(1)
        self.assertIsNone(self.lookup())
        self.assertEqual(len(self.cache), 0)

    def test_expired_entries_dropped(self):
        """
        A lookup drops every expired entry, not only the one it looks up.
        """
        for i in range(10):
            self.remember(login=f"user{i}")
            self.clock.advance(10)
        self.clock.advance(300 - 100 + 35)      # user0..user3 are 305..335 s old
        self.assertIsNone(self.lookup("nobody"))
        self.assertEqual(len(self.cache._entries), 6)
        self.assertIsNotNone(self.lookup("user4"))

    def test_clock_going_back(self):
        """
        If the clock goes back, entries verified in its "future" are dropped.
        """
        self.remember()
        self.clock.rightNow -= 1
        self.assertIsNone(self.lookup())

    def test_bounded(self):
        """
        At most `size` entries: the oldest verification goes first.
        """
        cache = VerifiedCache(self.clock, size=3, lifetime=300)
        for i in range(4):
            self.remember(login=f"user{i}", cache=cache)
            self.clock.advance(1)
        self.assertEqual(len(cache), 3)
        self.assertIsNone(self.lookup("user0", cache=cache))
        for i in range(1, 4):
            self.assertIsNotNone(self.lookup(f"user{i}", cache=cache))

    def test_reverified_moves_to_the_end(self):
        """
        Remembering credentials again restarts their lifetime and their place
        in the bound.
        """
        cache = VerifiedCache(self.clock, size=2, lifetime=300)
        self.remember(login="a", cache=cache)
        self.remember(login="b", cache=cache)
        self.clock.advance(200)
        self.remember(login="a", cache=cache)
        self.remember(login="c", cache=cache)
        self.assertIsNone(self.lookup("b", cache=cache))
        self.clock.advance(299)
        self.assertIsNotNone(self.lookup("a", cache=cache))

    def test_row_changed(self):
        """
        A hit needs the user row it was verified against: another stored
        hash, row version or user id, a block of the user or the tenant, or
        no row at all is a miss, and the entry is dropped.
        """
        for changed in (attrs.evolve(STATE, password="$argon2id$v=19$new"),
                        attrs.evolve(STATE, version="813:5"),
                        attrs.evolve(STATE, version="812:6"),
                        attrs.evolve(STATE, user_id=8),
                        attrs.evolve(STATE, blocked=True),
                        attrs.evolve(STATE, tenant_blocked=True),
                        None):
            self.remember()
            self.assertIsNone(self.lookup(state=changed), changed)
            self.assertIsNone(self.lookup(), changed)
            self.assertEqual(len(self.cache), 0)

    def test_plugin_withdrawn(self):
        """
        An entry whose plugin may no longer be used (left the chain, stopped
        allowing the cache) is a miss, and is dropped.
        """
        self.remember()
        self.assertIsNone(self.lookup(plugins={"ldap"}))
        self.assertIsNone(self.lookup())
        self.assertEqual((self.cache.hits, self.cache.misses), (0, 2))

    def test_blocked_not_remembered(self):
        """
        Credentials of a blocked user or tenant, or of no row, are not remembered.
        """
        for state in (attrs.evolve(STATE, blocked=True),
                      attrs.evolve(STATE, tenant_blocked=True), None):
            self.remember(state=state)
        self.assertEqual(len(self.cache), 0)

    def test_no_clear_password(self):
        """
        The cache holds neither the password nor the stored hash, and its
        keys depend on a per-cache random key: another cache (process) shares
        none of them.
        """
        password = "correct horse battery staple"
        other = VerifiedCache(self.clock, size=100, lifetime=300)
        self.remember(password=password)
        self.remember(password=password, cache=other)
        held = repr(vars(self.cache)) + repr(list(self.cache._entries.items()))
        for secret in (password, password.encode().hex(), STATE.password):
            self.assertNotIn(secret, held)
        for digest, entry in self.cache._entries.items():
            self.assertNotIn(password.encode(), digest + entry.state_fingerprint)
        self.assertFalse(set(self.cache._entries) & set(other._entries))
        self.assertNotIn(password, repr(STATE))

    def test_disabled(self):
        """
        Size 0 or lifetime 0 keeps nothing; lowering either drops what no
        longer fits at once.
        """
        for size, lifetime in ((0, 300), (100, 0)):
            cache = VerifiedCache(self.clock, size=size, lifetime=lifetime)
            self.assertFalse(cache.enabled)
            self.remember(cache=cache)
            self.assertIsNone(self.lookup(cache=cache))
        for i in range(5):
            self.remember(login=f"user{i}")
            self.clock.advance(10)
        self.cache.configure(size=3, lifetime=300)
        self.assertEqual(len(self.cache), 3)
        self.cache.configure(size=3, lifetime=25)
        self.assertEqual(len(self.cache), 2)
        self.cache.configure(size=0, lifetime=25)
        self.assertEqual(len(self.cache._entries), 0)

    def test_clear(self):
        """
        clear drops every entry.
        """
        self.remember(login="a")
        self.remember(login="b")
        self.cache.clear()
        self.assertIsNone(self.lookup("a"))
        self.assertIsNone(self.lookup("b"))
