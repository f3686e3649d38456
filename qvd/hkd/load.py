"""
The node's live load, reported with every heartbeat for the placement of
VMs across nodes (L{qvd.loadbalancer}): the memory available now and the
fraction of the CPU that was idle since the previous sample.

    sampler = LoadSampler()          # reads /proc/meminfo and /proc/stat
    load = sampler.sample()          # NodeLoad(free_ram=MB, cpu_idle=0..1 or None)

The parsing is pure (L{mem_available}, L{cpu_times}); the first sample has
no idle fraction (there is no interval yet).
"""

import attrs


@attrs.frozen
class NodeLoad:
    """
    @ivar free_ram: MB the node has available (MemAvailable), or None.
    @ivar cpu_idle: fraction of its CPU time idle since the previous sample, or None.
    """
    free_ram: int | None
    cpu_idle: float | None


def mem_available(meminfo):
    """MB of C{MemAvailable} in the text of /proc/meminfo (None without it)."""
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return None


def cpu_times(stat):
    """(idle, total) CPU time of the whole machine from the text of /proc/stat."""
    for line in stat.splitlines():
        if line.startswith("cpu "):
            fields = [int(x) for x in line.split()[1:]]
            # user nice system idle iowait irq softirq steal (guest time is in user)
            idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
            return idle, sum(fields[:8])
    raise ValueError("/proc/stat has no 'cpu' line")


def _read(path):
    with open(path) as f:
        return f.read()


class LoadSampler:
    def __init__(self, read=_read):
        self._read = read
        self._last = None

    def sample(self):
        """The load now (L{NodeLoad}); None fields for what cannot be read."""
        try:
            free = mem_available(self._read("/proc/meminfo"))
        except (OSError, ValueError):
            free = None
        idle = None
        try:
            times = cpu_times(self._read("/proc/stat"))
        except (OSError, ValueError):
            times = None
        if times is not None and self._last is not None:
            d_idle, d_total = times[0] - self._last[0], times[1] - self._last[1]
            if d_total > 0:
                idle = min(1.0, max(0.0, d_idle / d_total))
        if times is not None:
            self._last = times
        return NodeLoad(free, idle)
