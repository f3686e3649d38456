"""
The L7R's self-signed demo certificate (L{qvd.l7r.tls.self_signed}).
"""

import ipaddress
import os

from cryptography import x509
from twisted.trial import unittest

from qvd.l7r import tls


class SelfSignedTests(unittest.TestCase):

    def names(self, hostname):
        directory = os.path.join(os.path.abspath(self.mktemp()), "ssl")
        _, cert_path = tls.self_signed(directory, hostname)
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return (san.get_values_for_type(x509.DNSName),
                san.get_values_for_type(x509.IPAddress), cert_path)

    def test_names_localhost_and_loopback(self):
        """
        The certificate names the host, localhost, 127.0.0.1 and ::1.
        """
        dns, ips, _ = self.names("node1.example")
        self.assertEqual(dns, ["node1.example", "localhost"])
        self.assertEqual(ips, [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")])

    def test_ip_hostname_is_an_ip_entry(self):
        """
        A node name that is an IP address becomes an IP entry, not a DNS one.
        """
        dns, ips, _ = self.names("10.1.2.3")
        self.assertEqual(dns, ["localhost"])
        self.assertIn(ipaddress.ip_address("10.1.2.3"), ips)

    def test_localhost_verifies(self):
        """
        Python's own hostname check accepts the certificate for localhost
        and for 127.0.0.1.
        """
        _, _, cert_path = self.names("node1.example")
        from service_identity.cryptography import (
            verify_certificate_hostname, verify_certificate_ip_address)
        with open(cert_path, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        verify_certificate_hostname(cert, "localhost")
        verify_certificate_ip_address(cert, "127.0.0.1")
        verify_certificate_ip_address(cert, "::1")
