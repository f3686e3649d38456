"""
What one qvd_vm_state NOTIFY costs the L7R as its sessions grow: the
broker's handler (sessions indexed by VM id) against the linear walk over
every session it replaced (the peer), in one run, at 100, 1,000 and 5,000
sessions. No database: the handler's own CPU.

    .venv/bin/python bench/bench_notify.py [N ...]
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.internet import task  # noqa: E402

from qvd.l7r.broker import Broker, BrokerSettings  # noqa: E402


class _Conn:
    def write(self, data):
        pass


def linear(broker, payload):
    """The peer: the handler before the index (every session, every NOTIFY)."""
    vm_id = payload.split(":", 1)[0]
    for session in list(broker.sessions.values()):
        if str(session.vm_id) == vm_id:
            session.wake()


def per_call(fn, payloads, rounds=5):
    best = None
    for _ in range(rounds):
        began = time.perf_counter()
        for p in payloads:
            fn(p)
        took = (time.perf_counter() - began) / len(payloads)
        best = took if best is None else min(best, took)
    return best


def main(sizes):
    print("per qvd_vm_state NOTIFY (best of 5 rounds of 2,000 notifications, one VM each)")
    for n in sizes:
        broker = Broker(task.Clock(), None, BrokerSettings(), None, store=object())
        for vm_id in range(1, n + 1):
            broker.new_session(vm_id, _Conn())
        payloads = [f"{(i * 7919) % n + 1}:running" for i in range(2000)]
        indexed = per_call(broker.vm_state_changed, payloads)
        walk = per_call(lambda p: linear(broker, p), payloads)
        print(f"{n:>6} sessions: indexed {indexed * 1e6:8.2f} us   linear walk {walk * 1e6:9.2f} us"
              f"   ratio {walk / indexed:7.1f}x")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [100, 1000, 5000])
