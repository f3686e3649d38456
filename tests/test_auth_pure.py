"""
Unit tests of the pure parts of the authentication chain: credentials
parsing, login splitting and escaping, TOTP codes, rate limits, IP allocation.
"""

import base64

from twisted.internet import task
from twisted.trial import unittest

from qvd.l7r.auth import credentials, otp
from qvd.l7r.auth.interfaces import AuthFailed
from qvd.l7r.auth.ldap import parse_ldap_host
from qvd.l7r.auth.plugin import AuthConfigError
from qvd.l7r.auth.ratelimit import FailureLimiter


def b64(text):
    return base64.b64encode(text.encode()).decode()


class AuthorizationTests(unittest.TestCase):

    def test_basic(self):
        """
        A Basic header gives the login and the password, which may contain ':'.
        """
        creds = credentials.parse_authorization("Basic " + b64("alice@acme:pa:ss"))
        self.assertEqual(creds, credentials.BasicCredentials("alice@acme", "pa:ss"))

    def test_bearer(self):
        """
        A Bearer header gives the base64-decoded token, even with a trailing newline.
        """
        creds = credentials.parse_authorization("Bearer " + b64("tok-123") + "\n")
        self.assertEqual(creds, credentials.BearerCredentials("tok-123"))

    def test_refused(self):
        """
        A missing header, another scheme, bad base64 or no ':' fail with AuthFailed.
        """
        for value in (None, "", "Digest abc", "Basic !!!", "Basic " + b64("nocolon"),
                      "Bearer " + b64("  ")):
            self.assertRaises(AuthFailed, credentials.parse_authorization, value)

    def test_client_environment(self):
        """
        Auth-<hex(NAME)> headers carrying base64 values become variables; bad ones are skipped.
        """
        headers = {"auth-" + b"LANG".hex(): b64("es_ES"), "auth-zz": "x", "accept": "a"}
        self.assertEqual(credentials.client_environment(headers), {"LANG": "es_ES"})


class LoginTests(unittest.TestCase):

    def test_split(self):
        """
        The login is split at the last separator; an empty tenant part means none.
        """
        self.assertEqual(credentials.split_login("alice@acme", "@#"), ("alice", "acme"))
        self.assertEqual(credentials.split_login("alice#acme", "@#"), ("alice", "acme"))
        self.assertEqual(credentials.split_login("a@b.com@acme", "@#"), ("a@b.com", "acme"))
        self.assertEqual(credentials.split_login("alice", "@#"), ("alice", None))
        self.assertEqual(credentials.split_login("alice@", "@#"), ("alice", None))
        self.assertEqual(credentials.split_login("alice@acme", ""), ("alice@acme", None))

    def test_normalize(self):
        """
        Logins are trimmed, and lower-cased unless case-sensitive.
        """
        self.assertEqual(credentials.normalize_login("  Alice "), "alice")
        self.assertEqual(credentials.normalize_login(" Alice ", case_sensitive=True), "Alice")

    def test_escape_filter(self):
        """
        Filter specials are hex-escaped so a login cannot change the filter (RFC 4515).
        """
        self.assertEqual(credentials.escape_filter_value("a*)(uid=*"),
                         r"a\2a\29\28uid=\2a")
        self.assertEqual(credentials.escape_filter_value("b\\c\0"), r"b\5cc\00")

    def test_escape_dn(self):
        """
        DN specials, a leading '#' and surrounding spaces are escaped (RFC 4514).
        """
        self.assertEqual(credentials.escape_dn_value("a,b+c=d"), r"a\,b\+c\=d")
        self.assertEqual(credentials.escape_dn_value("#x "), r"\#x\ ")

    def test_ldap_host(self):
        """
        auth.ldap.host may be a host, host:port or an ldap(s) URI; others are refused.
        """
        self.assertEqual(parse_ldap_host("ds.example.org"), (False, "ds.example.org", 389))
        self.assertEqual(parse_ldap_host("ldaps://ds:1636"), (True, "ds", 1636))
        self.assertEqual(parse_ldap_host("127.0.0.1:3890"), (False, "127.0.0.1", 3890))
        for bad in ("", "http://x", "ldap://"):
            self.assertRaises(AuthConfigError, parse_ldap_host, bad)


class TotpTests(unittest.TestCase):
    SHA1 = b"12345678901234567890"
    SHA256 = b"12345678901234567890123456789012"
    SHA512 = b"1234567890123456789012345678901234567890123456789012345678901234"

    def test_rfc6238_vectors(self):
        """
        The codes of RFC 6238 appendix B come out for SHA-1, SHA-256 and SHA-512.
        """
        vectors = [
            (59, "94287082", "46119246", "90693936"),
            (1111111109, "07081804", "68084774", "25091201"),
            (1111111111, "14050471", "67062674", "99943326"),
            (1234567890, "89005924", "91819424", "93441116"),
            (2000000000, "69279037", "90698825", "38618901"),
            (20000000000, "65353130", "77737706", "47863826"),
        ]
        for t, sha1, sha256, sha512 in vectors:
            self.assertEqual(otp.totp(self.SHA1, t, digits=8), sha1)
            self.assertEqual(otp.totp(self.SHA256, t, digits=8, digest="sha256"), sha256)
            self.assertEqual(otp.totp(self.SHA512, t, digits=8, digest="sha512"), sha512)

    def test_rfc4226_vectors(self):
        """
        The HOTP codes of RFC 4226 appendix D come out.
        """
        expected = ["755224", "287082", "359152", "969429", "338314",
                    "254676", "287922", "162583", "399871", "520489"]
        self.assertEqual([otp.hotp(self.SHA1, i) for i in range(10)], expected)

    def test_leeway(self):
        """
        A code is accepted in its step and one step later, not two, and not before it.
        """
        code = otp.totp(self.SHA1, 1000)                # step 33
        self.assertEqual(otp.match_totp(self.SHA1, code, 1000), 33)
        self.assertEqual(otp.match_totp(self.SHA1, code, 1000 + 30), 33)
        self.assertIsNone(otp.match_totp(self.SHA1, code, 1000 + 60))
        self.assertIsNone(otp.match_totp(self.SHA1, code, 1000 - 30))
        self.assertEqual(otp.match_totp(self.SHA1, code, 1000 - 30, leeway_before=1), 33)

    def test_malformed_code(self):
        """
        Codes of the wrong length or with non-digits never match.
        """
        self.assertIsNone(otp.match_totp(self.SHA1, "12345", 1000))
        self.assertIsNone(otp.match_totp(self.SHA1, "abcdef", 1000))

    def test_base32(self):
        """
        Base32 secrets decode whatever their case, spacing or padding; garbage is refused.
        """
        self.assertEqual(otp.decode_base32("gezd gnbv gy3t qojq"), b"1234567890")
        self.assertEqual(otp.decode_base32("GEZDGNBVGY3TQOJQ===="), b"1234567890")
        self.assertRaises(ValueError, otp.decode_base32, "1!!")
        self.assertRaises(ValueError, otp.decode_base32, "")


class FailureLimiterTests(unittest.TestCase):

    def test_window(self):
        """
        After max failures a key is blocked until the oldest failure is window seconds old.
        """
        clock = task.Clock()
        limiter = FailureLimiter(clock, max_failures=3, window=60)
        for _ in range(3):
            self.assertFalse(limiter.blocked("k"))
            limiter.failed("k")
            clock.advance(10)
        self.assertTrue(limiter.blocked("k"))
        self.assertEqual(limiter.retry_after("k"), 30)
        clock.advance(29)
        self.assertTrue(limiter.blocked("k"))
        clock.advance(1)
        self.assertFalse(limiter.blocked("k"))

    def test_success_clears(self):
        """
        A success forgets the key's failures; other keys are untouched.
        """
        clock = task.Clock()
        limiter = FailureLimiter(clock, max_failures=2, window=60)
        for key in ("a", "a", "b", "b"):
            limiter.failed(key)
        limiter.succeeded("a")
        self.assertFalse(limiter.blocked("a"))
        self.assertTrue(limiter.blocked("b"))

    def test_disabled(self):
        """
        max_failures 0 never blocks.
        """
        limiter = FailureLimiter(task.Clock(), max_failures=0, window=60)
        for _ in range(100):
            limiter.failed("k")
        self.assertFalse(limiter.blocked("k"))

    def test_bounded(self):
        """
        The table never holds more than max_keys keys, and forgets aged-out ones.
        """
        clock = task.Clock()
        limiter = FailureLimiter(clock, max_failures=5, window=60, max_keys=100)
        for i in range(1000):
            limiter.failed(i)
        self.assertEqual(len(limiter), 100)
        clock.advance(61)
        for i in range(900, 1000):
            limiter.blocked(i)
        self.assertEqual(len(limiter), 0)
