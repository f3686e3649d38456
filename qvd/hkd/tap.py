"""
twistd qvd-hkd: options and service (a stub until the daemon is built).
"""

from twisted.application import service
from twisted.python import usage


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "The node configuration file (default /etc/qvd/node.conf)."],
    ]


def makeService(options):
    return service.MultiService()
