"""
Tests for qvd.passwords.
"""

from twisted.trial import unittest

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
