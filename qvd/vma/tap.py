"""
twistd qvd-vma: options and service.

    twistd -n qvd-vma --config /etc/qvd/vma.conf

(Inside desktop images the VMA runs as C{python3 -m qvd.vma}: see
L{qvd.vma.__main__}.)
"""

from twisted.python import usage

DEFAULT_CONFIG = "/etc/qvd/vma.conf"


class Options(usage.Options):
    optParameters = [
        ["config", "c", DEFAULT_CONFIG, "The VMA configuration file."],
    ]

    def postOptions(self):
        from qvd.config import Config, ConfigError
        from qvd.vma.agent import VMASettings
        try:
            self.cfg = Config.load(self["config"])
            VMASettings.from_config(self.cfg)
        except ConfigError as e:
            raise usage.UsageError(str(e))


def makeService(options):
    from twisted.internet import reactor

    from qvd.vma.service import make_service
    return make_service(options.cfg, reactor)
