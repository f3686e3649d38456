"""
What desktop isolation costs at start: N LXC desktops started together through
the HKD with the node's packet filter on (vm.network.firewall.enable = 1, the
default) against the same with it off, in one run (root).

    .venv/bin/python bench/bench_isolation.py [N ...]     # default: 1 5

Each measurement is bench_lxc_start.py's qvd side (a real HKD, the LXC driver,
the minimal test DI, vm_cmd='start' for all N in one UPDATE + NOTIFY):
start -> 'running' (the agent's first answer) per VM. The two settings
alternate, filter on first, each after its own warm-up start. Prints p50/p95
of each and the ratio on/off.
"""

import os
import sys
import tempfile

from twisted.internet import defer, task

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_lxc_start import pct, run_qvd, scrub, summary  # noqa: E402


async def bench(reactor, sizes):
    from qvd.testing.images import minimal_lxc_image
    image = minimal_lxc_image(stream=sys.stderr)
    for n in sizes:
        results = {}
        for enabled in ("1", "0"):
            root = tempfile.mkdtemp(prefix=f"qvdbi{os.getpid()}-", dir="/var/tmp")
            os.chmod(root, 0o755)  # containers' root (unprivileged) walks through it
            try:
                running, _, errors, _ = await run_qvd(
                    reactor, root, image, n, {"vm.network.firewall.enable": enabled})
            finally:
                scrub(root)
            results[enabled] = running
            for vm_id, reason in sorted(errors.items()):
                print(f"VM {vm_id} (filter {enabled}): {reason}")
        on, off = results["1"], results["0"]
        print(f"\n{n} desktop(s) started together (minimal DI, LXC, {os.cpu_count()} CPUs)")
        print(summary("isolation on: start -> running", on))
        print(summary("isolation off: start -> running", off))
        if on and off:
            print(f"ratio on/off: p50 {pct(on, 50) / pct(off, 50):.2f}x, "
                  f"p95 {pct(on, 95) / pct(off, 95):.2f}x")


def main():
    if os.geteuid() != 0:
        sys.exit("bench_isolation: needs root (LXC containers, nftables)")
    sizes = [int(a) for a in sys.argv[1:]] or [1, 5]
    task.react(lambda reactor: defer.ensureDeferred(bench(reactor, sizes)))


if __name__ == "__main__":
    main()
