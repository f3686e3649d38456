"""
Tests for qvd.addresses: the VM range, top-down allocation, MACs.
"""

from twisted.trial import unittest

from qvd.addresses import AddressError, VMRange, mac_for_ip


class AddressTests(unittest.TestCase):

    def test_range_of_defaults(self):
        """
        10.0.0.100/255.255.0.0 gives 10.0.0.100 up to 10.0.255.254.
        """
        r = VMRange.from_config("10.0.0.100", "255.255.0.0")
        self.assertEqual(r.describe(), "10.0.0.100 - 10.0.255.254")
        self.assertEqual(r.size, 65535 - 100)

    def test_allocate_top_down(self):
        """
        The first free address from broadcast-1 downwards is allocated.
        """
        r = VMRange.from_config("10.0.0.100", "255.255.255.0")
        self.assertEqual(r.allocate([]), "10.0.0.254")
        self.assertEqual(r.allocate(["10.0.0.254", "10.0.0.252"]), "10.0.0.253")
        self.assertEqual(r.allocate(["10.0.0.254", "10.0.0.253"]), "10.0.0.252")

    def test_exhausted(self):
        """
        A full range is an error naming the range and what to do.
        """
        r = VMRange.from_config("10.0.0.253", "255.255.255.0")
        e = self.assertRaises(AddressError, r.allocate, ["10.0.0.253", "10.0.0.254"])
        self.assertIn("10.0.0.253 - 10.0.0.254 is taken", str(e))

    def test_check(self):
        """
        A chosen address must be inside the range and free.
        """
        r = VMRange.from_config("10.0.0.100", "255.255.255.0")
        self.assertEqual(r.check("10.0.0.150", []), "10.0.0.150")
        for bad in ("10.0.0.99", "10.0.0.255", "10.0.1.1", "nope"):
            self.assertRaises(AddressError, r.check, bad, [])
        self.assertRaises(AddressError, r.check, "10.0.0.150", ["10.0.0.150"])

    def test_bad_configuration(self):
        """
        A start address that is not one, or leaves nothing below the broadcast, is refused.
        """
        self.assertRaises(AddressError, VMRange.from_config, "10.0.0", "255.255.0.0")
        self.assertRaises(AddressError, VMRange.from_config, "10.0.0.1", "255.0.255.0")
        self.assertRaises(AddressError, VMRange.from_config, "10.0.0.255", "255.255.255.0")

    def test_mac(self):
        """
        The MAC is the prefix plus the hex of octets 2-4 of the IP.
        """
        self.assertEqual(mac_for_ip("54:52:00", "10.1.2.254"), "54:52:00:01:02:fe")
        self.assertRaises(AddressError, mac_for_ip, "54:52", "10.1.2.3")
