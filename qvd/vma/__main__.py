"""
python3 -m qvd.vma --config /etc/qvd/vma.conf

Runs the VMA in the foreground (how desktop images start it at boot, on
Debian's own python3 + python3-twisted). Logs go to vma.log.filename
("-": standard output); --log - overrides it. SIGTERM/SIGINT end the
session and exit. As PID 1 (a container without init) it forks and the
parent acts as init (L{qvd.vma._init}). It serves the socket systemd
listens on for it (the images' qvd-vma.socket, L{socket_from_systemd}), or
else binds its port before it imports Twisted (L{listen_early}), and keeps
Twisted from loading TLS (L{without_tls}): a desktop answers its node sooner.
"""

import argparse
import os
import sys

#: What Twisted's reactor imports for TLS when it can (Debian's python3-twisted
#: depends on them): 0.2-0.3 s of a desktop's boot, for an agent that speaks
#: plain HTTP only.
TLS_MODULES = ("OpenSSL", "cryptography", "service_identity")


def socket_from_systemd(cfg, environ=os.environ):
    """
    The listening socket systemd passed (socket activation: C{LISTEN_PID} is
    this process, C{LISTEN_FDS} 1, the socket on fd 3) when it is a TCP
    socket listening on C{vma.port}, else None. The variables are removed
    either way (the agent's children must not take them for theirs).
    """
    import socket

    pid, count = environ.pop("LISTEN_PID", None), environ.pop("LISTEN_FDS", None)
    environ.pop("LISTEN_FDNAMES", None)
    if pid != str(os.getpid()) or count != "1":
        return None
    try:
        sock = socket.socket(fileno=3)
    except OSError:
        return None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        port = sock.getsockname()[1]
    except OSError:
        listening, port = 0, None
    if sock.type != socket.SOCK_STREAM or not listening or port != cfg.getint("vma.port"):
        sock.detach()               # not ours to serve or to close
        return None
    sock.setblocking(False)
    sock.set_inheritable(False)
    return sock


def listen_early(cfg):
    """
    A socket bound and listening on C{vma.address}:C{vma.port}, made before
    Twisted is imported (0.1 s and more of a desktop's boot): the kernel
    accepts the node's first ping meanwhile and the agent answers it as soon
    as its reactor runs, instead of refusing it and waiting for the next one.
    None when the address cannot be bound now (the service then listens as
    usual, and says why if it still cannot).
    """
    import socket

    address = cfg.get("vma.address").strip() or "0.0.0.0"
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, cfg.getint("vma.port")))
        sock.listen(50)             # Twisted's listenTCP backlog
        sock.setblocking(False)     # as the reactor wants an adopted port
    except OSError:
        sock.close()
        return None
    return sock


def without_tls():
    """
    Make the TLS modules unimportable in this process (C{sys.modules[name] =
    None}), before Twisted is imported: its reactor then leaves TLS out, as
    it does where pyOpenSSL is not installed. The agent never uses TLS.
    """
    for name in TLS_MODULES:
        sys.modules.setdefault(name, None)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python3 -m qvd.vma", description=__doc__.strip().split("\n")[0])
    parser.add_argument("--config", "-c", default="/etc/qvd/vma.conf",
                        help="the VMA configuration file (default %(default)s)")
    parser.add_argument("--log", help="log file, '-' for standard output (default: vma.log.filename)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configuration key (repeatable)")
    args = parser.parse_args(argv)

    from qvd.config import Config, ConfigError, declared_keys
    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--set {item!r}: expected KEY=VALUE")
        overrides[key.strip()] = value.strip()
    try:
        if os.path.exists(args.config) or args.config != parser.get_default("config"):
            cfg = Config.load(args.config, overrides=overrides)
        else:   # no /etc/qvd/vma.conf: the defaults (never node.conf)
            cfg = Config(keys=declared_keys(), node=overrides)
            cfg.validate(overrides, "the command line")
    except ConfigError as e:
        print(f"qvd-vma: {e}", file=sys.stderr)
        return 2

    from qvd.vma._init import become_init_if_pid1
    become_init_if_pid1()      # in a container without init, stay PID 1 and reap

    listening = socket_from_systemd(cfg) or listen_early(cfg)
    without_tls()
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    log_name = args.log or cfg.get("vma.log.filename")
    if log_name == "-":
        stream = sys.stdout
    else:
        try:
            os.makedirs(os.path.dirname(log_name) or ".", exist_ok=True)
            stream = open(log_name, "a", buffering=1)
        except OSError as e:
            print(f"qvd-vma: cannot open log file {log_name}: {e.strerror}; logging to stderr",
                  file=sys.stderr)
            stream = sys.stderr
    globalLogBeginner.beginLoggingTo([textFileLogObserver(stream)], redirectStandardIO=False)

    from qvd.vma.service import make_service
    try:
        svc = make_service(cfg, reactor, listening=listening)
    except ConfigError as e:
        print(f"qvd-vma: {e}", file=sys.stderr)
        return 2
    pid_file = cfg.get("vma.pid.file")
    try:
        os.makedirs(os.path.dirname(pid_file), exist_ok=True)
        with open(pid_file, "w") as f:
            f.write(f"{os.getpid()}\n")
    except OSError:
        pid_file = None

    failed = []

    def start():
        try:
            svc.startService()
        except Exception as e:
            print(f"qvd-vma: cannot start: {e}", file=sys.stderr)
            failed.append(e)
            reactor.stop()
    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: svc.running and svc.stopService())
    reactor.run()
    if pid_file:
        try:
            os.unlink(pid_file)
        except OSError:
            pass
    return 1 if failed else 0



if __name__ == "__main__":
    sys.exit(main())
