"""
twistd qvd-vma: options and service.

    twistd -n qvd-vma --config /etc/qvd/vma.conf
"""

from twisted.python import usage

DEFAULT_CONFIG = "/etc/qvd/vma.conf"


class Options(usage.Options):
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "The VMA configuration file."],
    ]


def makeService(options):
    from twisted.internet import reactor

    from qvd.config import Config, ConfigError
    from qvd.vma.service import make_service
    try:
        cfg = Config.load(options["config"])
    except ConfigError as e:
        raise usage.UsageError(str(e))
    return make_service(cfg, reactor)
