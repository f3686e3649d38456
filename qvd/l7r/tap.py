"""
twistd qvd-l7r: the L7R daemon.

    twistd -n qvd-l7r --config /etc/qvd/node.conf --listen ssl:8443
    twistd -n qvd-l7r --self-signed          # single-node demo certificate

C{--listen} is a Twisted server endpoint string; C{ssl:PORT[:interface=A]}
means TLS with qvd's context and the certificate of C{path.l7r.ssl.*} or of
the database's C{ssl_configs}; C{tcp:...} means no TLS. Without C{--listen}
the endpoint comes from C{l7r.port}, C{l7r.address} and C{l7r.use_ssl}.

With C{l7r.workers} above 1 (0, the default: one per core) it runs that
many L7R processes sharing the port (L{qvd.l7r.workers}); with 1 the L7R runs
in the twistd process itself.

A port it cannot listen on (in use, below 1024 without root) ends it before
the reactor runs with one line naming the address and exit status 1; so does
anything that stops it from starting later (the port taken meanwhile, a bad
certificate in the database): logged once, then exit status 1.
"""

import os
import sys

from twisted.python import usage

from qvd import logs
from qvd._listen import check_port, exit_nonzero_at_exit, tcp_address
from qvd.config import Config, ConfigError


class Options(usage.Options):
    optParameters = [
        ["config", "c", None, "The node configuration file (default /etc/qvd/node.conf)."],
        ["listen", "l", None,
         "Twisted endpoint to listen on (default from l7r.port/l7r.address/l7r.use_ssl: ssl:8443)."],
    ]
    optFlags = [
        ["self-signed", None,
         "Create a self-signed certificate under path.state when none exists (demo)."],
    ]


def makeService(options):
    from qvd.l7r import tls
    from qvd.l7r.service import L7RService, default_endpoint, split_endpoint
    try:
        config = Config.load(options["config"])
        logs.set_level(config.get("log.level"))
    except (ConfigError, ValueError) as e:
        raise SystemExit(f"qvd-l7r: {e}")
    listen = options["listen"] or default_endpoint(config)
    try:
        from twisted.internet import endpoints, reactor
        endpoints.serverFromString(reactor, split_endpoint(listen)[1])
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise SystemExit(f"qvd-l7r: the endpoint {listen!r} is not a Twisted server endpoint "
                         f"({e}): use e.g. ssl:8443 or tcp:8443:interface=127.0.0.1")
    if options["self-signed"]:
        key, cert = config.get("path.l7r.ssl.key"), config.get("path.l7r.ssl.cert")
        if not (os.path.exists(key) and os.path.exists(cert)):
            directory = os.path.dirname(key)
            if os.path.dirname(cert) != directory:
                raise SystemExit("qvd-l7r: --self-signed needs path.l7r.ssl.key and .cert "
                                 "in one directory")
            tls.self_signed(directory, config.get("nodename"))
            print(f"qvd-l7r: wrote a self-signed certificate to {cert}", file=sys.stderr)
    if listen.startswith("ssl:"):
        try:
            tls.check_key_file(config.get("path.l7r.ssl.key"))
        except tls.TLSConfigError as e:
            raise SystemExit(f"qvd-l7r: {e}")
    problem = check_port(listen, "--listen, or l7r.port and l7r.address")
    if problem:
        raise SystemExit(f"qvd-l7r: {problem}")
    on_failed = lambda: exit_nonzero_at_exit(1)  # noqa: E731
    count = worker_count(config)
    address = tcp_address(split_endpoint(listen)[1])
    if count > 1 and address is not None:
        from qvd.l7r._sockets import SocketError, reuseport_sockets
        from qvd.l7r.workers import L7RWorkers
        try:
            sockets = reuseport_sockets(*address, count, worker_spread(config))
        except SocketError as e:
            raise SystemExit(f"qvd-l7r: {e}")
        except OSError as e:
            raise SystemExit(f"qvd-l7r: cannot listen on {listen}: {e.strerror}")
        return L7RWorkers(options["config"], listen, sockets, on_failed=on_failed)
    return L7RService(config, listen, on_failed=on_failed)


def worker_count(config):
    """The L7R processes to run: C{l7r.workers}, 0 meaning one per core."""
    count = config.getint("l7r.workers")
    if count < 0:
        raise SystemExit(f"qvd-l7r: l7r.workers must be 0 (one per core) or more, not {count}")
    return count or len(os.sched_getaffinity(0))


def worker_spread(config):
    """
    C{l7r.workers.spread}, with C{auto} decided: C{connection} behind a
    balancer sending the PROXY protocol (all its connections come from its
    own address), else C{address}.
    """
    spread = config.get("l7r.workers.spread")
    if spread != "auto":
        return spread
    balancers = [v for v in config.getlist("l7r.proxy_protocol.from") if v.strip()]
    return "connection" if balancers else "address"
