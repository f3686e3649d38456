"""
The PROXY protocol header (HAProxy's, versions 1 and 2), parsed and built as
pure values: a load balancer sends it first on each connection it opens to
the L7R, naming the client's address.

    try:
        found = parse(buffer)             # None: not complete yet, feed more
    except ProxyHeaderError as e:
        ...                               # close the connection; e says why
    header, used = found                  # buffer[used:] is the client's data
    header.source                         # ("203.0.113.7", 51234), or None

    encode_v1(header) / encode_v2(header) # the bytes a balancer sends
    signature_match(buffer)               # True / False / None (cannot tell yet)

Version 1 is one text line (C{PROXY TCP4 SRC DST SPORT DPORT\\r\\n}, at most
L{V1_MAX} bytes with its C{\\r\\n}); version 2 a 16-byte binary block (the
L{V2_SIGNATURE}, version and command, family and transport, length) and
C{length} bytes of addresses and TLVs (C{length} at most
L{V2_MAX_LENGTH}, at least what the family's addresses need). TLVs are
skipped: each must fit in the block, none is interpreted. A C{LOCAL}
header (version 2; the balancer's own health checks), C{UNKNOWN} (version
1) and the families a TCP service has no use for (C{AF_UNSPEC}, C{AF_UNIX},
UDP) carry no client address: C{source} is None and the connection's own
peer is the client. Everything else that is not exactly the specification
(https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt) raises
L{ProxyHeaderError} with what was wrong, as early as it can be told.
"""

import ipaddress
import struct

import attrs

#: The first bytes of a version 1 header.
V1_SIGNATURE = b"PROXY "
#: The longest version 1 header, "\r\n" included (the specification's).
V1_MAX = 107
#: The first 12 bytes of a version 2 header.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The fixed part of a version 2 header: signature, version/command, family, length.
V2_FIXED = 16
#: The most bytes after the fixed part qvd accepts (addresses and TLVs; the
#: specification allows 65535, HAProxy sends far fewer).
V2_MAX_LENGTH = 2048
#: The bytes of addresses each (family, transport) of version 2 needs at least.
V2_ADDRESS_LENGTH = {"TCP4": 12, "TCP6": 36}

LOCAL = "LOCAL"
PROXY = "PROXY"

_V2_COMMANDS = {0x0: LOCAL, 0x1: PROXY}
# family nibble -> (name, bytes of addresses); transport nibble: 0 unspec, 1 stream, 2 dgram
_V2_FAMILIES = {0x0: ("UNSPEC", 0), 0x1: ("INET", 12), 0x2: ("INET6", 36), 0x3: ("UNIX", 216)}


class ProxyHeaderError(Exception):
    """
    The bytes are not a valid PROXY protocol header; the message says what
    is wrong, with the value.
    """


@attrs.frozen
class ProxyHeader:
    """
    One PROXY header.

    @ivar version: 1 or 2.
    @ivar command: L{PROXY} (relayed for a client) or L{LOCAL} (the
        balancer's own connection, version 2).
    @ivar family: C{"TCP4"}, C{"TCP6"} or C{"UNKNOWN"} (no client address:
        v1 UNKNOWN, v2 LOCAL, AF_UNSPEC, AF_UNIX or UDP).
    @ivar source: the client's (address, port), or None with C{UNKNOWN}.
    @ivar destination: the (address, port) the client connected to, or None.
    @ivar tlvs: version 2's (type, value) pairs, as sent, uninterpreted.
    """

    version: int
    command: str = PROXY
    family: str = "UNKNOWN"
    source: tuple = None
    destination: tuple = None
    tlvs: tuple = ()


def signature_match(data):
    """
    Whether C{data} starts with a PROXY header signature (either version):
    True, False, or None when C{data} is a shorter prefix of one.
    """
    for signature in (V1_SIGNATURE, V2_SIGNATURE):
        n = min(len(data), len(signature))
        if data[:n] == signature[:n]:
            if n == len(signature):
                return True
            return None
    return False


def parse(data, max_v2_length=V2_MAX_LENGTH):
    """
    The header at the start of C{data}: (L{ProxyHeader}, bytes it used),
    or None when more bytes are needed. Raises L{ProxyHeaderError}.
    """
    data = bytes(data)
    found = signature_match(data)
    if found is None:
        return None
    if not found:
        raise ProxyHeaderError(f"not a PROXY protocol header: starts with {data[:16]!r}")
    if data.startswith(V1_SIGNATURE):
        return _parse_v1(data)
    return _parse_v2(data, max_v2_length)


# -- version 1 --------------------------------------------------------------

def _parse_v1(data):
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        bare = data.find(b"\n", 0, V1_MAX)
        if bare >= 0:
            raise ProxyHeaderError(f"PROXY v1 header ends with a bare LF, not CRLF: "
                                   f"{data[:bare + 1]!r}")
        if len(data) >= V1_MAX:
            raise ProxyHeaderError(f"PROXY v1 header longer than {V1_MAX} bytes: "
                                   f"{data[:V1_MAX]!r}...")
        _check_v1_bytes(data[:-1] if data.endswith(b"\r") else data)
        return None
    line = data[:end]
    _check_v1_bytes(line)
    text = line.decode("ascii")
    parts = text.split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return ProxyHeader(1), end + 2     # the rest of the line is to be ignored
    if len(parts) != 6:
        raise ProxyHeaderError(f"PROXY v1 header needs 'PROXY TCP4|TCP6 SRC DST SPORT DPORT' "
                               f"with single spaces, not {text!r}")
    _, family, src, dst, sport, dport = parts
    if family not in ("TCP4", "TCP6"):
        raise ProxyHeaderError(f"PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN, "
                               f"not {family!r}")
    kind = ipaddress.IPv4Address if family == "TCP4" else ipaddress.IPv6Address
    source = (_v1_address(kind, src, family), _v1_port(sport))
    destination = (_v1_address(kind, dst, family), _v1_port(dport))
    return ProxyHeader(1, PROXY, family, source, destination), end + 2


def _check_v1_bytes(data):
    for byte in data:
        if byte < 0x20 or byte > 0x7e:
            raise ProxyHeaderError(f"PROXY v1 header has the byte {bytes([byte])!r}, "
                                   f"not printable ASCII: {data[:V1_MAX]!r}")


def _v1_address(kind, text, family):
    try:
        if "%" in text:             # a scope (fe80::1%eth0) names no client
            raise ValueError(text)
        return str(kind(text))
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1 {family} address {text!r} is not valid") from None


def _v1_port(text):
    if not (text.isdigit() and text.isascii() and len(text) <= 5
            and (text == "0" or not text.startswith("0")) and int(text) <= 65535):
        raise ProxyHeaderError(f"PROXY v1 port {text!r} is not a number 0-65535 "
                               "(no leading zero)")
    return int(text)


# -- version 2 --------------------------------------------------------------

def _parse_v2(data, max_length):
    if len(data) < V2_FIXED:
        return None
    ver_cmd, fam, length = data[12], data[13], struct.unpack("!H", data[14:16])[0]
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header has version {ver_cmd >> 4}, not 2")
    command = _V2_COMMANDS.get(ver_cmd & 0xF)
    if command is None:
        raise ProxyHeaderError(f"PROXY v2 header has command {ver_cmd & 0xF}, "
                               "not 0 (LOCAL) or 1 (PROXY)")
    family, transport = _V2_FAMILIES.get(fam >> 4), fam & 0xF
    if family is None or transport > 2:
        raise ProxyHeaderError(f"PROXY v2 header has family/transport byte 0x{fam:02x}, "
                               "not one the specification defines")
    if length > max_length:
        raise ProxyHeaderError(f"PROXY v2 header announces {length} bytes of addresses "
                               f"and TLVs, more than the {max_length} accepted")
    name, needed = family
    if command == PROXY and length < needed:
        raise ProxyHeaderError(f"PROXY v2 header announces {length} bytes, fewer than the "
                               f"{needed} of its {name} addresses")
    if len(data) < V2_FIXED + length:
        return None
    block = data[V2_FIXED:V2_FIXED + length]
    used = V2_FIXED + length
    if command == LOCAL:
        # addresses, if any, are to be ignored; TLVs cannot be told apart from them
        return ProxyHeader(2, LOCAL), used
    source = destination = None
    kind = "UNKNOWN"
    if transport == 1 and name in ("INET", "INET6"):
        if name == "INET":
            kind = "TCP4"
            src, dst = ipaddress.IPv4Address(block[0:4]), ipaddress.IPv4Address(block[4:8])
            ports = block[8:12]
        else:
            kind = "TCP6"
            src, dst = ipaddress.IPv6Address(block[0:16]), ipaddress.IPv6Address(block[16:32])
            ports = block[32:36]
        sport, dport = struct.unpack("!HH", ports)
        source, destination = (str(src), sport), (str(dst), dport)
    tlvs = _parse_tlvs(block[needed:])
    return ProxyHeader(2, PROXY, kind, source, destination, tlvs), used


def _parse_tlvs(data):
    tlvs, at = [], 0
    while at < len(data):
        if len(data) - at < 3:
            raise ProxyHeaderError(f"PROXY v2 header has {len(data) - at} byte(s) after its "
                                   "last TLV, too few for another")
        kind, size = data[at], struct.unpack("!H", data[at + 1:at + 3])[0]
        if at + 3 + size > len(data):
            raise ProxyHeaderError(f"PROXY v2 TLV 0x{kind:02x} announces {size} bytes, more "
                                   f"than the {len(data) - at - 3} left in the header")
        tlvs.append((kind, data[at + 3:at + 3 + size]))
        at += 3 + size
    return tuple(tlvs)


# -- building -----------------------------------------------------------------

def encode_v1(header):
    """The version 1 line of C{header} (its TLVs and LOCAL are not expressible)."""
    if header.family == "UNKNOWN" or header.source is None:
        return b"PROXY UNKNOWN\r\n"
    (src, sport), (dst, dport) = header.source, header.destination
    return f"PROXY {header.family} {src} {dst} {sport} {dport}\r\n".encode("ascii")


def encode_v2(header):
    """The version 2 block of C{header}."""
    tlvs = b"".join(bytes([kind]) + struct.pack("!H", len(value)) + value
                    for kind, value in header.tlvs)
    if header.command == LOCAL:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", len(tlvs)) + tlvs
    if header.family == "UNKNOWN" or header.source is None:
        fam, addresses = 0x00, b""
    else:
        (src, sport), (dst, dport) = header.source, header.destination
        kind = ipaddress.IPv4Address if header.family == "TCP4" else ipaddress.IPv6Address
        fam = 0x11 if header.family == "TCP4" else 0x21
        addresses = kind(src).packed + kind(dst).packed + struct.pack("!HH", sport, dport)
    body = addresses + tlvs
    return V2_SIGNATURE + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body
