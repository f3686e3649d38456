"""
Start time of an LXC desktop with the image and the home on a GlusterFS
volume against the same on the local disk, in one run (root).

    .venv/bin/python bench/bench_storage.py [ROUNDS]     # ROUNDS defaults to 5

Two single-node stacks of qvd.testing.e2e (twistd qvd-hkd, LXC, the minimal
test DI, a private PostgreSQL), one after the other: "local" with
path.storage.root in a temp dir on the local disk (the DI a symbolic link to
the cached image), "gluster" with path.storage.root on a FUSE mount of a
one-brick volume of qvd.testing.gluster (path.storage.shared = 1, the DI
copied onto the volume). Per stack: the first start (the DI unpacked from
its file onto the node's local disk, a new home on the storage) and ROUNDS
later starts of the same VM (tree cached, home kept, one file written into
the home each time), from vm_cmd = 'start' to 'running' (the agent answers).
Everything is removed afterwards.
"""

import statistics
import sys

from qvd import storage
from qvd.testing import e2e, gluster


def run(stack, rounds):
    vm = stack.add_user("bench", "secret")
    first = stack.start_vms(vm)
    stack.stop_vms()
    later = []
    for i in range(rounds):
        later.append(stack.start_vms(vm))
        stack.attach(vm, "sh", "-c", f"head -c 1048576 /dev/urandom > /home/f{i} && sync")
        stack.stop_vms()
    return first, later


def main(rounds=5):
    why = gluster.missing() or e2e.missing("lxc")
    if why:
        sys.exit(f"bench_storage: {why}")
    results = {}
    local = e2e.Stack("lbench", subnet_base=237, fast=False)
    try:
        local.start()
        results["local"] = run(local, rounds)
    finally:
        local.stop()
    volume = gluster.Volume("qvdbench").start()
    try:
        mount = volume.mount()
        storage.write_marker(mount, "bench")
        shared = e2e.Stack("gbench", subnet_base=233, fast=False, storage_root=mount,
                           config={"path.storage.shared": "1"}, storage_id="bench")
        try:
            shared.start()
            results["gluster"] = run(shared, rounds)
        finally:
            shared.stop()
    finally:
        volume.stop()
    print(f"{'storage':8} {'first start':>12} {'later p50':>10} {'later max':>10}   (s, {rounds} rounds)")
    for name, (first, later) in results.items():
        print(f"{name:8} {first:12.2f} {statistics.median(later):10.2f} {max(later):10.2f}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
