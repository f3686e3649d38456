"""
The NX greeting rewriter (qvd/protocols/nx.py), pure: the session's cookie
goes into the client's clear-text greeting whatever the reads look like,
and anything that is not a greeting is refused within a bounded buffer.
"""

from hypothesis import given, strategies as st
from twisted.trial import unittest

from qvd.protocols import nx

COOKIE = "0123456789abcdef0123456789abcdef"
OTHER = "ffffffffffffffffffffffffffffffff"

# What nxproxy -S (nx-libs 3.5.99.26) sends, measured; then its next token.
PLAIN = b"NXPROXY-3.5.0-3.5.99 stream=default,data=default "
WITH = b"NXPROXY-3.5.0-3.5.99 cookie=" + OTHER.encode() + b",stream=default,data=default "
OURS = b"NXPROXY-3.5.0-3.5.99 cookie=" + COOKIE.encode() + b",stream=default,data=default "
AFTER = b"cachefile=none \x00\x01\xff binary"


def feed_all(chunks, cookie=COOKIE, limit=nx.MAX_GREETING):
    """Feed C{chunks}; the rewritten bytes, or None while incomplete."""
    rewriter = nx.GreetingRewriter(cookie, limit)
    out = None
    for chunk in chunks:
        if rewriter.done:
            out += chunk
            continue
        out = rewriter.feed(chunk)
    return out


class CookieTests(unittest.TestCase):

    def test_new_cookie(self):
        """A new cookie is 32 lower-case hex digits and another each time."""
        a, b = nx.new_cookie(), nx.new_cookie()
        self.assertTrue(nx.valid_cookie(a))
        self.assertRegex(a, r"^[0-9a-f]{32}$")
        self.assertNotEqual(a, b)

    def test_valid_cookie(self):
        """Only 32 hex digits are a cookie."""
        self.assertTrue(nx.valid_cookie(COOKIE.upper()))
        for bad in ("", COOKIE[:-1], COOKIE + "0", "g" * 32, COOKIE[:-1] + ",", None, 7):
            self.assertFalse(nx.valid_cookie(bad), bad)

    def test_rewriter_needs_a_cookie(self):
        """A rewriter cannot be made with something that is not a cookie."""
        self.assertRaises(ValueError, nx.GreetingRewriter, "secret,listen=1")


class RewriteTests(unittest.TestCase):

    def test_inserted(self):
        """A greeting without a cookie gets ours first, as nxproxy writes one."""
        self.assertEqual(feed_all([PLAIN]), OURS)

    def test_replaced(self):
        """A cookie the client sent is replaced by ours."""
        self.assertEqual(feed_all([WITH]), OURS)

    def test_every_client_cookie_dropped(self):
        """Several cookie items, anywhere among the options, are all dropped."""
        greeting = (b"NXPROXY-3.5.0 link=lan,cookie=" + OTHER.encode()
                    + b",cookie=,pack=16m-jpeg,cookie=zz ")
        self.assertEqual(feed_all([greeting]),
                         b"NXPROXY-3.5.0 cookie=" + COOKIE.encode() + b",link=lan,pack=16m-jpeg ")

    def test_empty_options(self):
        """A greeting with no options gets the cookie alone."""
        self.assertEqual(feed_all([b"NXPROXY-3.5.0  "]),
                         b"NXPROXY-3.5.0 cookie=" + COOKIE.encode() + b" ")

    def test_bytes_after_untouched(self):
        """What follows the greeting in the same read passes byte for byte."""
        self.assertEqual(feed_all([PLAIN + AFTER]), OURS + AFTER)

    def test_split_reads(self):
        """The greeting split at every position, and byte by byte, gives the same bytes."""
        data = WITH + AFTER
        for cut in range(1, len(data)):
            self.assertEqual(feed_all([data[:cut], data[cut:]]), OURS + AFTER, cut)
        self.assertEqual(feed_all([data[i:i + 1] for i in range(len(data))]), OURS + AFTER)

    def test_incomplete_waits(self):
        """Until the space that ends the options, nothing is passed on."""
        rewriter = nx.GreetingRewriter(COOKIE)
        for chunk in (b"NX", b"PROXY-3.5", b".0 ", b"stream=default"):
            self.assertIsNone(rewriter.feed(chunk))
            self.assertFalse(rewriter.done)
        self.assertEqual(rewriter.feed(b",data=default x"),
                         b"NXPROXY-3.5.0 cookie=" + COOKIE.encode()
                         + b",stream=default,data=default x")
        self.assertTrue(rewriter.done)
        self.assertRaises(RuntimeError, rewriter.feed, b"more")

    @given(st.lists(st.integers(min_value=1, max_value=len(WITH + AFTER)), max_size=8))
    def test_any_split(self, cuts):
        """Whatever the reads, the output is the rewritten greeting and the rest."""
        data = WITH + AFTER
        points = sorted(set(cuts))
        chunks = [data[a:b] for a, b in zip([0] + points, points + [len(data)]) if b > a]
        self.assertEqual(feed_all(chunks), OURS + AFTER)


class RefusalTests(unittest.TestCase):

    def refused(self, *chunks, limit=nx.MAX_GREETING):
        rewriter = nx.GreetingRewriter(COOKIE, limit)
        for chunk in chunks[:-1]:
            self.assertIsNone(rewriter.feed(chunk))
        return self.assertRaises(nx.GreetingError, rewriter.feed, chunks[-1])

    def test_not_nx(self):
        """A stream that does not start with NXPROXY- is refused at its first byte off."""
        self.refused(b"GET / HTTP/1.1\r\n")
        self.refused(b"NX", b"PROXX")
        self.refused(b"\x16\x03\x01")

    def test_garbage_in_version(self):
        """A version with other bytes than digits, dots and dashes is refused."""
        self.refused(b"NXPROXY-3.5.0;rm ")
        self.refused(b"NXPROXY-", b"3.5\x00")

    def test_garbage_in_options(self):
        """Control or non-ASCII bytes in the options are refused before the end."""
        self.refused(b"NXPROXY-3.5.0 stream=default\n")
        self.refused(b"NXPROXY-3.5.0 link=", b"\xffan")

    def test_empty_version(self):
        """NXPROXY- followed by a space is no greeting."""
        self.refused(b"NXPROXY- stream=default ")

    def test_oversize(self):
        """No end within the limit: refused once the limit is reached, not before."""
        head = b"NXPROXY-3.5.0 stream=default"
        rewriter = nx.GreetingRewriter(COOKIE, limit=64)
        self.assertIsNone(rewriter.feed(head + b"," * (63 - len(head))))
        self.assertRaises(nx.GreetingError, rewriter.feed, b",")
        e = self.refused(head + b"," * 2000)
        self.assertIn("1024", str(e))

    def test_greeting_at_the_limit(self):
        """A greeting that ends exactly at the limit is accepted."""
        greeting = b"NXPROXY-3.5.0 " + b"a" * (64 - 15) + b" "
        self.assertEqual(len(greeting), 64)
        self.assertIsNotNone(feed_all([greeting + b"rest"], limit=64))
        self.refused(greeting[:-1] + b"a ", limit=64)

    def test_error_hides_the_bytes(self):
        """The error text does not repeat what the client sent (it may be a cookie)."""
        e = self.refused(b"NXPROXY-3.5.0 cookie=" + OTHER.encode() + b"\n")
        self.assertNotIn(OTHER, str(e))


class FuzzTests(unittest.TestCase):

    @given(st.binary(max_size=200), st.integers(min_value=1, max_value=200))
    def test_anything(self, tail, cut):
        """
        Whatever follows NXPROXY-, in whatever reads: the rewriter waits,
        refuses with a GreetingError, or passes on a greeting whose only
        cookie is ours, followed by the rest of the bytes unchanged.
        """
        data = b"NXPROXY-" + tail
        rewriter = nx.GreetingRewriter(COOKIE)
        try:
            out = rewriter.feed(data[:cut])
            if out is None and cut < len(data):
                out = rewriter.feed(data[cut:])
        except nx.GreetingError:
            return
        if out is None:
            return
        head, _, rest = out.partition(b" ")
        options, _, after = rest.partition(b" ")
        cookies = [i for i in options.split(b",") if i.startswith(b"cookie=")]
        self.assertEqual(cookies, [b"cookie=" + COOKIE.encode()])
        self.assertTrue(data.endswith(after))
        self.assertEqual(out[:8], b"NXPROXY-")
