"""
Secrets taken out of text meant for people: L{redact}.

    raise DatabaseError(f"cannot connect to the database ({redact(dsn)}): ...")

Replaces the value of every C{password=}, C{passwd=}, C{bindpass=},
C{secret=} and C{token=} item (libpq keyword/value strings, query strings;
quoted values too) and the password of every C{scheme://user:password@}
URI with C{***}. Imports only the standard library.
"""

import re

HIDDEN = "***"

_KEY_VALUE = re.compile(
    r"""(?ix)
    (\b[\w.-]*(?:password|passwd|bindpass|secret|token)\s*=\s*)   # the key and '='
    ('(?:[^'\\]|\\.)*'?|"(?:[^"\\]|\\.)*"?|[^\s&;,)]*)             # its value
    """)
_URI_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s/:@]*:)([^\s/@]*)(@)")


def redact(text):
    """C{text} with every password, secret or token value replaced by C{***}."""
    text = _URI_PASSWORD.sub(lambda m: m.group(1) + HIDDEN + m.group(3), str(text))
    return _KEY_VALUE.sub(lambda m: m.group(1) + HIDDEN, text)
