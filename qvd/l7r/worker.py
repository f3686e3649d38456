"""
One worker process of the L7R (L{qvd.l7r.workers} starts them): a whole L7R
accepting on a listening socket it inherited.

    python -m qvd.l7r.worker --parent PID --index 0 --count 2 \\
        --config /etc/qvd/node.conf --listen ssl:8443 --fd 3 --family 2 --ready-fd 4

Its log events go to its standard output as Twisted's JSON records (the
supervisor logs them with the worker's index); it writes one line to
C{--ready-fd} once it accepts connections, and dies with the supervisor
however that ends. Exit status 1 when it could not start.
"""

import argparse
import os
import sys

from qvd._hashworker import die_with


def parse(argv):
    parser = argparse.ArgumentParser(prog="qvd-l7r worker")
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--config")
    parser.add_argument("--listen", required=True)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--family", type=int, required=True)
    parser.add_argument("--ready-fd", type=int, required=True)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    die_with(args.parent)
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, jsonFileLogObserver

    from qvd import logs
    from qvd.config import Config
    from qvd.l7r.service import L7RService

    globalLogBeginner.beginLoggingTo([jsonFileLogObserver(sys.stdout)],
                                     redirectStandardIO=False)
    config = Config.load(args.config)
    logs.set_level(config.get("log.level"))
    failed = []

    def ready():
        os.write(args.ready_fd, b"ready\n")
        os.close(args.ready_fd)

    svc = L7RService(config, args.listen, adopt=(args.fd, args.family),
                     workers=args.count, on_ready=ready,
                     on_failed=lambda: failed.append(True))
    reactor.callWhenRunning(svc.startService)
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
    reactor.run()
    sys.stdout.flush()
    os._exit(1 if failed else 0)


if __name__ == "__main__":
    main()
