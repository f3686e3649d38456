"""
One-time codes, pure: RFC 4226 (HOTP) and RFC 6238 (TOTP).

    secret = decode_base32("JBSWY3DPEHPK3PXP")
    code = totp(secret, now)                           # '123456'
    step = match_totp(secret, code, now, leeway=1)     # the accepted time step, or None

A caller that must reject a code used twice remembers the last accepted step
per user and refuses steps not above it (RFC 6238 section 5.2).
"""

import base64
import binascii
import hashlib
import hmac
import struct

DIGESTS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512}


def decode_base32(text):
    """
    Decode a base32 secret, ignoring case, spaces and missing padding.

    @raise ValueError: if C{text} is not base32 or is empty.
    """
    cleaned = "".join(str(text).split()).upper().rstrip("=")
    if not cleaned:
        raise ValueError("the base32 secret is empty")
    try:
        return base64.b32decode(cleaned + "=" * (-len(cleaned) % 8))
    except (binascii.Error, ValueError):
        raise ValueError(f"the secret is not base32 ({len(cleaned)} characters)")


def hotp(secret, counter, digits=6, digest="sha1"):
    """
    The RFC 4226 code of C{counter}, as C{digits} decimal characters.
    """
    mac = hmac.new(secret, struct.pack(">Q", counter), DIGESTS[digest]).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset:offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10 ** digits).zfill(digits)


def time_step(now, interval=30, t0=0):
    """
    The RFC 6238 time step that contains the instant C{now} (seconds).
    """
    return int((now - t0) // interval)


def totp(secret, now, interval=30, t0=0, digits=6, digest="sha1"):
    """
    The RFC 6238 code at instant C{now}.
    """
    return hotp(secret, time_step(now, interval, t0), digits, digest)


def match_totp(secret, code, now, interval=30, t0=0, digits=6, leeway=1,
               leeway_before=0, digest="sha1"):
    """
    The time step whose code is C{code}, looking C{leeway} steps back and
    C{leeway_before} steps ahead of now; None if none matches. The comparison
    takes the same time whatever the code.
    """
    if len(code) != digits or not code.isdigit():
        return None
    current = time_step(now, interval, t0)
    found = None
    for step in range(current - leeway, current + leeway_before + 1):
        if hmac.compare_digest(hotp(secret, step, digits, digest), code) and found is None:
            found = step
    return found
