"""
qvd's loggers: twisted.logger's Logger with the configured level threshold.

    from qvd.logs import Logger
    log = Logger()
    log.debug("...")                    # dropped unless log.level = DEBUG

    set_level(config.get("log.level"))  # each daemon's makeService does this

Until L{set_level} is called nothing is dropped (tests see every event).
Imports only twisted.logger: the VMA uses it inside desktop images.
"""

from twisted.logger import Logger as _Logger
from twisted.logger import LogLevel

_NAMES = {"debug": LogLevel.debug, "info": LogLevel.info, "warn": LogLevel.warn,
          "warning": LogLevel.warn, "error": LogLevel.error, "critical": LogLevel.critical}

_threshold = None


def set_level(name):
    """
    Drop events below C{name} (DEBUG, INFO, WARNING, ERROR, CRITICAL; any case)
    from every qvd logger; raise ValueError naming a wrong value.
    """
    global _threshold
    level = _NAMES.get(str(name).strip().lower())
    if level is None:
        raise ValueError(f"log.level must be one of DEBUG, INFO, WARNING, ERROR, "
                         f"CRITICAL, not {name!r}")
    _threshold = level


class Logger(_Logger):
    def emit(self, level, format=None, **kwargs):
        if _threshold is not None and level < _threshold:
            return
        _Logger.emit(self, level, format, **kwargs)
