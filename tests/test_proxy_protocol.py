"""
The PROXY protocol header parser and encoder (qvd.protocols.proxy): valid
headers of both versions, each violation, and hypothesis fuzzing of
round trips, byte-by-byte feeding and mangled headers.
"""

import struct

from hypothesis import HealthCheck, given, settings, strategies as st
from twisted.trial import unittest

from qvd.protocols import proxy
from qvd.protocols.proxy import LOCAL, ProxyHeader, ProxyHeaderError, encode_v1, encode_v2, parse

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TCP4 = ProxyHeader(1, "PROXY", "TCP4", ("203.0.113.7", 51234), ("192.0.2.1", 8443))
TCP6 = ProxyHeader(1, "PROXY", "TCP6", ("2001:db8::7", 65535), ("2001:db8::1", 443))


def v2(ver_cmd, fam, body):
    return proxy.V2_SIGNATURE + bytes([ver_cmd, fam]) + struct.pack("!H", len(body)) + body


class V1Tests(unittest.TestCase):
    def test_tcp4(self):
        """A v1 TCP4 line gives the client's address and port and its length."""
        data = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 8443\r\n"
        self.assertEqual(parse(data + b"\x16\x03"), (TCP4, len(data)))

    def test_tcp6(self):
        """A v1 TCP6 line gives the IPv6 client address."""
        data = b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 443\r\n"
        self.assertEqual(parse(data), (TCP6, len(data)))

    def test_unknown(self):
        """UNKNOWN carries no address, and the rest of its line is ignored."""
        for data in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
            header, used = parse(data)
            self.assertEqual((header.family, header.source, used), ("UNKNOWN", None, len(data)))

    def test_incomplete(self):
        """Each prefix of a valid line is 'not yet' (None), never an error."""
        data = b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 8443\r\n"
        for n in range(len(data)):
            self.assertIsNone(parse(data[:n]), data[:n])

    def test_longest(self):
        """A line of exactly 107 bytes is accepted; of 108 it is refused."""
        longest = (b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
                   b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")
        self.assertEqual(len(longest), proxy.V1_MAX)
        self.assertEqual(parse(longest)[1], proxy.V1_MAX)
        with self.assertRaises(ProxyHeaderError) as e:
            parse(b"PROXY UNKNOWN " + b"x" * 100)
        self.assertIn("longer than 107 bytes", str(e.exception))

    def test_errors(self):
        """Each malformed line is refused, naming what is wrong."""
        cases = {
            b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 8443\n": "bare LF",
            b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n": "TCP4, TCP6 or UNKNOWN",
            b"PROXY TCP4 1.2.3.4  1.2.3.4 1 2\r\n": "single spaces",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n": "single spaces",
            b"PROXY TCP4 1.2.3.256 1.2.3.4 1 2\r\n": "'1.2.3.256' is not valid",
            b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n": "TCP4 address '::1'",
            b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n": "TCP6 address '1.2.3.4'",
            b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n": "TCP6 address 'fe80::1%eth0'",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n": "'65536' is not a number",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n": "'01'",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n": "'-1'",
            b"PROXY TCP4 1.2.3.4\x00": "not printable",
            b"GET / HTTP/1.1\r\n": "not a PROXY protocol header",
            b"\x16\x03\x01\x02\x00": "not a PROXY protocol header",
        }
        for data, text in cases.items():
            with self.assertRaises(ProxyHeaderError, msg=data) as e:
                parse(data)
            self.assertIn(text, str(e.exception), data)

    def test_encode(self):
        """encode_v1 writes the line a balancer sends."""
        self.assertEqual(encode_v1(TCP4), b"PROXY TCP4 203.0.113.7 192.0.2.1 51234 8443\r\n")
        self.assertEqual(encode_v1(ProxyHeader(1)), b"PROXY UNKNOWN\r\n")


class V2Tests(unittest.TestCase):
    def test_tcp4(self):
        """A v2 PROXY TCP over IPv4 block gives the client's address; bytes after it are left."""
        body = bytes([203, 0, 113, 7, 192, 0, 2, 1]) + struct.pack("!HH", 51234, 8443)
        data = v2(0x21, 0x11, body)
        header, used = parse(data + b"\x16\x03\x01")
        self.assertEqual((header.version, header.command, header.family, header.source,
                          header.destination, used),
                         (2, "PROXY", "TCP4", ("203.0.113.7", 51234), ("192.0.2.1", 8443), 28))

    def test_tcp6(self):
        """A v2 PROXY TCP over IPv6 block gives the IPv6 client address."""
        header = ProxyHeader(2, "PROXY", "TCP6", ("2001:db8::7", 1), ("::1", 2))
        data = encode_v2(header)
        self.assertEqual(len(data), 16 + 36)
        self.assertEqual(parse(data), (header, len(data)))

    def test_local(self):
        """LOCAL (a health check) carries no client address, whatever follows its length."""
        for body in (b"", bytes(12), b"\x04\x00\x01x"):
            header, used = parse(v2(0x20, 0x00, body) + b"GET")
            self.assertEqual((header.command, header.source, used),
                             (LOCAL, None, 16 + len(body)))

    def test_unspec_unix_udp(self):
        """AF_UNSPEC, AF_UNIX and UDP carry no TCP client: UNKNOWN, no address."""
        for fam, size in ((0x00, 0), (0x31, 216), (0x12, 12), (0x22, 36)):
            header, used = parse(v2(0x21, fam, bytes(size)))
            self.assertEqual((header.family, header.source, used), ("UNKNOWN", None, 16 + size))

    def test_tlvs(self):
        """TLVs after the addresses are skipped, kept as (type, value) and not interpreted."""
        tlvs = ((0x05, b"unique-id"), (0x20, b"\x01" + bytes(4)), (0xEE, b""))
        header = ProxyHeader(2, "PROXY", "TCP4", ("10.0.0.1", 1), ("10.0.0.2", 2), tlvs)
        self.assertEqual(parse(encode_v2(header))[0], header)

    def test_incomplete(self):
        """Each prefix of a valid v2 header is 'not yet' (None)."""
        data = encode_v2(ProxyHeader(2, "PROXY", "TCP6", ("::2", 1), ("::1", 2),
                                     ((1, b"h2"),)))
        for n in range(len(data)):
            self.assertIsNone(parse(data[:n]), n)

    def test_errors(self):
        """Each malformed v2 header is refused as soon as it can be told, naming why."""
        addr4 = bytes(12)
        cases = [
            (v2(0x11, 0x11, addr4), "version 1, not 2"),
            (v2(0x22, 0x11, addr4), "command 2"),
            (v2(0x21, 0x41, addr4), "0x41"),
            (v2(0x21, 0x13, addr4), "0x13"),
            (v2(0x21, 0x11, bytes(8)), "8 bytes, fewer than the 12 of its INET"),
            (v2(0x21, 0x21, addr4), "12 bytes, fewer than the 36 of its INET6"),
            (v2(0x21, 0x11, addr4 + b"\x01\x00"), "2 byte(s) after its last TLV"),
            (v2(0x21, 0x11, addr4 + b"\x01\x00\x05abc"), "announces 5 bytes, more than the 3"),
            # the length alone says it is too long: refused before the body comes
            (proxy.V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 2049), "more than the 2048"),
            (proxy.V2_SIGNATURE[:11] + b"X", "not a PROXY protocol header"),
        ]
        for data, text in cases:
            with self.assertRaises(ProxyHeaderError, msg=data) as e:
                parse(data)
            self.assertIn(text, str(e.exception), data)

    def test_max_length(self):
        """The length bound is a parameter: up to it is accepted."""
        body = bytes(12) + b"\x01" + struct.pack("!H", 100) + bytes(100)
        self.assertIsNotNone(parse(v2(0x21, 0x11, body), max_v2_length=len(body)))
        self.assertRaises(ProxyHeaderError, parse, v2(0x21, 0x11, body),
                          max_v2_length=len(body) - 1)


class SignatureTests(unittest.TestCase):
    def test_signature_match(self):
        """A signature's prefix cannot be told yet; a whole one is True; anything else False."""
        for data in (b"", b"P", b"PROXY", b"\r\n\r\n\x00\r\nQUI"):
            self.assertIsNone(proxy.signature_match(data), data)
        for data in (b"PROXY ", b"PROXY TCP4", proxy.V2_SIGNATURE + b"\x21"):
            self.assertTrue(proxy.signature_match(data), data)
        for data in (b"\x16\x03\x01", b"GET /", b"PROXX", b"\r\n\r\n\x01"):
            self.assertIs(proxy.signature_match(data), False, data)


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@st.composite
def headers(draw, version=None):
    version = version or draw(st.sampled_from([1, 2]))
    kind = draw(st.sampled_from(["TCP4", "TCP6", "UNKNOWN"] + (["LOCAL"] if version == 2 else [])))
    if kind == "UNKNOWN":
        return ProxyHeader(version)
    if kind == "LOCAL":
        return ProxyHeader(2, LOCAL)
    addresses = ipv4 if kind == "TCP4" else ipv6
    tlvs = ()
    if version == 2:
        tlvs = tuple(draw(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)),
                                   max_size=4)))
    return ProxyHeader(version, "PROXY", kind, (draw(addresses), draw(ports)),
                       (draw(addresses), draw(ports)), tlvs)


def encode(header):
    return encode_v1(header) if header.version == 1 else encode_v2(header)


class FuzzTests(unittest.TestCase):
    @FUZZ
    @given(headers(), st.binary(max_size=20))
    def test_round_trip(self, header, rest):
        """Every header parses back to itself, and what follows it is left alone."""
        data = encode(header)
        if header.version == 1:
            self.assertLessEqual(len(data), proxy.V1_MAX)
        found, used = parse(data + rest)
        self.assertEqual(found, header)
        self.assertEqual(used, len(data))

    @FUZZ
    @given(headers())
    def test_prefixes(self, header):
        """Fed one more byte at a time, a header is incomplete until its last byte."""
        data = encode(header)
        for n in range(len(data)):
            self.assertIsNone(parse(data[:n]))
        self.assertEqual(parse(data)[0], header)

    @FUZZ
    @given(headers(), st.lists(st.tuples(st.sampled_from(["replace", "insert", "delete"]),
                                         st.integers(0, 200), st.integers(0, 255)),
                               min_size=1, max_size=4))
    def test_mangled(self, header, edits):
        """
        A header with bytes replaced, inserted or cut is parsed, incomplete
        or refused with ProxyHeaderError: nothing else is ever raised, and a
        parse never uses more bytes than it got.
        """
        data = bytearray(encode(header))
        for op, pos, byte in edits:
            pos %= len(data) + 1
            if op == "replace" and pos < len(data):
                data[pos] = byte
            elif op == "insert":
                data.insert(pos, byte)
            elif pos < len(data):
                del data[pos]
        try:
            found = parse(bytes(data))
        except ProxyHeaderError as e:
            self.assertTrue(str(e))
            return
        if found is not None:
            self.assertLessEqual(found[1], len(data))
            if found[0].version == 1:
                self.assertLessEqual(found[1], proxy.V1_MAX)

    @FUZZ
    @given(st.binary(max_size=300))
    def test_random_bytes(self, data):
        """Random bytes never raise anything but ProxyHeaderError."""
        try:
            parse(data)
        except ProxyHeaderError:
            pass
