"""
twistd qvd-vma: options and service.

    twistd -n qvd-vma --config /etc/qvd/vma.conf

(Inside desktop images the VMA runs as C{python3 -m qvd.vma}: see
L{qvd.vma.__main__}.) A port it cannot listen on ends it before the reactor
runs, with one line naming the address and exit status 1.
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

    from qvd._listen import check_port
    from qvd.vma.service import make_service
    cfg = options.cfg
    address = cfg.get("vma.address").strip() or "0.0.0.0"
    problem = check_port(f"tcp:{cfg.getint('vma.port')}:interface={address}",
                         "vma.port or vma.address")
    if problem:
        raise SystemExit(f"qvd-vma: {problem}")
    return make_service(cfg, reactor)
