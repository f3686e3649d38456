"""
qvd-client, the user's command-line client (reference 1.2-1.4).

C{qvd.client.cli} is the program; C{protocol} builds requests and parses
responses without I/O; C{session} is the L7R connection; C{nx} runs nxproxy and
relays it; C{tls} verifies the server; C{headless} adds a private Xvfb and
screenshots; C{errors} maps failures to messages and exit codes.
"""
