"""
Password hashing for users and administrators.

    stored = hash_password("secret")                 # "$argon2id$v=19$..."
    ok, upgrade = verify_password(stored, "secret", salt="qvd1234")
    if ok and upgrade:
        save(hash_password("secret"))                # replace an old hash

New hashes are argon2id. Hashes imported from the original QVD,
C{sha256_base64(salt . password)} (reference 2.1: 43 characters of unpadded
base64), are still accepted, and L{verify_password} says they should be
upgraded. Comparisons take constant time; an empty password never matches.
"""

import base64
import hashlib
import hmac

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

#: argon2id at OWASP's first recommended minimum (19 MiB, 2 passes, 1 lane):
#: 24 ms of CPU per check here, about 41 checks per second and core, so a
#: 2-core L7R checks the 500 logins of a Monday morning burst in about 6 s.
#: argon2-cffi's defaults (64 MiB, 3 passes, 4 lanes) cost 188 ms of CPU
#: (5 per second and core). Hashes made with other parameters still verify
#: and are replaced at the next login (needs_upgrade). docs/l7r.md.
_hasher = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)


def hash_password(password):
    """
    The argon2id hash of C{password} (text), with a random salt.
    """
    if not password:
        raise ValueError("the password is empty")
    return _hasher.hash(password)


def legacy_hash(password, salt):
    """
    The original QVD's hash: unpadded base64 of sha256(salt + password).
    """
    digest = hashlib.sha256((salt + password).encode("utf-8")).digest()
    return base64.b64encode(digest).decode("ascii").rstrip("=")


def verify_password(stored, password, salt="qvd1234"):
    """
    Check C{password} against C{stored}.

    @param salt: C{l7r.auth.plugin.default.salt}, for hashes imported from QVD.
    @return: (matches, needs_upgrade); needs_upgrade is True when the stored
        hash is of an old kind or weaker parameters and should be replaced.
    """
    if not stored or not password:
        return False, False
    if stored.startswith("$argon2"):
        try:
            _hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False, False
        return True, _hasher.check_needs_rehash(stored)
    candidate = legacy_hash(password, salt)
    matches = hmac.compare_digest(candidate.encode(), stored.rstrip("=").encode())
    return matches, matches
