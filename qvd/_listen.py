"""
A daemon's listening port, checked before the reactor runs: L{check_port}.

    problem = check_port("tcp:8443:interface=127.0.0.1")
    if problem:
        raise SystemExit(f"qvd-l7r: {problem}")

twistd runs C{makeService} before it daemonizes and before it writes its pid
file, so a C{SystemExit} there is one line on the terminal and exit status 1,
with or without C{-n}. A port taken between the check and the real listen
(by a race) still fails there; L{exit_nonzero_at_exit} makes such a later
failure end the process with a non-zero status too (twistd itself always
exits 0 once its reactor ran).

Imports only the standard library: the VMA uses it inside desktop images.
"""

import atexit
import errno
import os
import socket
import sys

_REASONS = {
    errno.EADDRINUSE: "the port is already in use; stop what listens there or choose "
                      "another port",
    errno.EACCES: "permission denied; ports below 1024 need root, or choose another port",
    errno.EADDRNOTAVAIL: "not an address of this machine; choose one of its addresses",
}


def _split(text, separator):
    """Split on C{separator} not escaped by a backslash; unescape the parts."""
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def tcp_address(description):
    """
    (interface, port) of a Twisted C{tcp:}/C{ssl:} server endpoint
    description (C{tcp:8443:interface=127.0.0.1}, C{ssl:port=443}); None for
    other kinds (C{unix:...}) and for descriptions it cannot read (the real
    listen reports those).
    """
    kind, _, rest = description.partition(":")
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    positional, named = [], {}
    for part in _split(rest, ":"):
        key, sep, value = part.partition("=")
        if sep:
            named[key] = value
        else:
            positional.append(part)
    port = named.get("port", positional[0] if positional else None)
    try:
        port = int(port)
    except (TypeError, ValueError):
        return None
    return named.get("interface", "::" if kind == "tcp6" else ""), port


def check_port(description, setting=None):
    """
    None if the TCP port of endpoint C{description} can be listened on now,
    else one line that names the address and says why not (and, given
    C{setting}, where the port is configured). Port 0 and non-TCP endpoints
    are not checked (None).
    """
    address = tcp_address(description)
    if address is None or address[1] == 0:
        return None
    interface, port = address
    family = socket.AF_INET6 if ":" in interface else socket.AF_INET
    shown = f"[{interface}]:{port}" if family == socket.AF_INET6 else f"{interface or '*'}:{port}"
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as e:
        return f"cannot listen on {shown}: {e.strerror}"
    try:
        # As Twisted's listenTCP does: a restart is not refused for the old
        # connections in TIME_WAIT, only for a socket that listens.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((interface, port))
    except OSError as e:
        reason = _REASONS.get(e.errno, e.strerror)
        return f"cannot listen on {shown}: {reason}" + (f" ({setting})" if setting else "")
    except (OverflowError, socket.gaierror, UnicodeError) as e:
        return f"cannot listen on {shown}: {e}"
    finally:
        sock.close()
    return None


def exit_nonzero_at_exit(status=1):
    """
    End this process with C{status} once the program has finished (twistd:
    after the reactor stopped, the services stopped and the pid file was
    removed), whatever status it would have exited with.
    """
    def leave():
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        if "logging" in sys.modules:
            sys.modules["logging"].shutdown()
        os._exit(status)
    atexit.register(leave)
