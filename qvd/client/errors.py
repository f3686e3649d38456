"""
What qvd-client tells the user, and the exit code, for each way a session can fail.

    raise error_for_response("connect", response, "qvd.example.com")

The messages follow the original client (reference 1.3, C{Proxy.pm}); the
exit codes are ours and are listed in L{EXIT_CODES} (C{qvd-client --help}
prints them).
"""

import attrs

EXIT_OK = 0
EXIT_ERROR = 1          # anything not listed below
EXIT_USAGE = 2          # bad command line or configuration
EXIT_NETWORK = 3        # cannot reach the server, TLS failure, protocol error
EXIT_LOGIN = 4          # 401
EXIT_VM_GONE = 5        # 404
EXIT_UPGRADE = 6        # 426
EXIT_MAINTENANCE = 7    # 403
EXIT_UNAVAILABLE = 8    # 503 / 502
EXIT_LOCAL = 9          # local problem: no DISPLAY, nxproxy missing or failed

EXIT_CODES = {
    EXIT_OK: "the command succeeded; after connect: the session ended normally "
             "(suspended or closed)",
    EXIT_ERROR: "any other error",
    EXIT_USAGE: "bad command line or configuration",
    EXIT_NETWORK: "cannot reach the server, TLS verification failed, or the "
                  "server spoke something else",
    EXIT_LOGIN: "the server rejected the login (401)",
    EXIT_VM_GONE: "the virtual machine does not exist (404)",
    EXIT_UPGRADE: "the server wants a newer client (426)",
    EXIT_MAINTENANCE: "the virtual machine is under maintenance (403)",
    EXIT_UNAVAILABLE: "the server or the virtual machine is not available now (503)",
    EXIT_LOCAL: "local problem: no X display, nxproxy missing or failing",
}


@attrs.frozen
class ClientError(Exception):
    """
    A failure to report to the user: one line (or a few), and an exit code.
    """
    message: str
    exit_code: int = EXIT_ERROR

    def __str__(self):
        return self.message


def error_for_response(phase, response, host, token=False):
    """
    The L{ClientError} for a non-success C{response} of C{phase}
    (C{"list"} for list_of_vm, C{"connect"} for connect_to_vm); C{token}:
    the request carried a token (--token), not a user and password.
    """
    code, body = response.code, response.text
    said = f" The server said: {body}" if body else ""
    if code == 401:
        if token:
            return ClientError(
                "The server has rejected your token (--token): it is wrong or has "
                "expired. Ask for a new token.", EXIT_LOGIN)
        if phase == "list":
            return ClientError(
                "The server has rejected your login. Please verify that your "
                "username (user@tenant) and password are correct.", EXIT_LOGIN)
        return ClientError(
            "Login error. Please verify your user and password.", EXIT_LOGIN)
    if code == 404 and phase == "connect":
        return ClientError(
            "Your virtual machine does not exist any more." + said, EXIT_VM_GONE)
    if code == 426:
        return ClientError(
            "The server requires a more up-to-date client version.", EXIT_UPGRADE)
    if code == 403:
        return ClientError(
            "Your virtual machine is under maintenance." + said, EXIT_MAINTENANCE)
    if code == 503:
        if phase == "list":
            return ClientError(
                "The server is under maintenance. Retry later." + said,
                EXIT_UNAVAILABLE)
        return ClientError(
            (body or "The virtual machine is not available, retry later."),
            EXIT_UNAVAILABLE)
    if code == 502:
        return ClientError(f"Server error: {body}", EXIT_UNAVAILABLE)
    what = "list your virtual machines" if phase == "list" else "connect to the virtual machine"
    return ClientError(
        f"Unable to {what}: {host} replied {code} {response.reason}.{said}",
        EXIT_ERROR)
