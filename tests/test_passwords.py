"""
Tests for qvd.passwords.
"""

from twisted.trial import unittest

from qvd import passwords
from qvd.passwords import hash_password, legacy_hash, verify_password


class PasswordTests(unittest.TestCase):

    def test_argon2_round_trip(self):
        """
        A new hash is argon2id, verifies with the right password only, and
        does not ask for an upgrade.
        """
        stored = hash_password("s3cret")
        self.assertTrue(stored.startswith("$argon2id$"))
        self.assertEqual(verify_password(stored, "s3cret"), (True, False))
        self.assertEqual(verify_password(stored, "s3cret!"), (False, False))

    def test_legacy_hash_accepted_and_upgraded(self):
        """
        A hash imported from QVD (sha256_base64(salt . password)) verifies with
        the configured salt and asks to be upgraded; a wrong salt fails.
        """
        # sha256_base64("qvd1234" . "pw") as Perl's Digest::SHA computes it.
        stored = legacy_hash("pw", "qvd1234")
        self.assertEqual(len(stored), 43)
        self.assertEqual(verify_password(stored, "pw", salt="qvd1234"), (True, True))
        self.assertEqual(verify_password(stored, "pw", salt="other"), (False, False))

    def test_empty_never_matches(self):
        """
        An empty password or an empty stored hash never matches.
        """
        self.assertEqual(verify_password("", ""), (False, False))
        self.assertEqual(verify_password(hash_password("x"), ""), (False, False))
        with self.assertRaises(ValueError):
            hash_password("")


class ParameterTests(unittest.TestCase):

    def test_hashes_of_other_parameters_verify_and_are_upgraded(self):
        """
        A hash made with argon2-cffi's defaults (qvd before, 64 MiB, t=3, p=4)
        still verifies and asks to be rewritten; qvd's own do not.
        """
        from argon2 import PasswordHasher
        old = PasswordHasher().hash("pw")
        self.assertEqual(passwords.verify_password(old, "pw"), (True, True))
        self.assertEqual(passwords.verify_password(passwords.hash_password("pw"), "pw"),
                         (True, False))
        self.assertIn("m=19456,t=2,p=1", passwords.hash_password("pw"))
