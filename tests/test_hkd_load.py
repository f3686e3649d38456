"""
The node's live load for its heartbeat (qvd.hkd.load), pure: /proc texts in,
values out.
"""

from twisted.trial import unittest

from qvd.hkd.load import LoadSampler, NodeLoad, cpu_times, mem_available

MEMINFO = "MemTotal:       24684000 kB\nMemFree:         1000000 kB\nMemAvailable:   20480000 kB\n"


def stat(idle, busy):
    # user nice system idle iowait irq softirq steal guest guest_nice
    return f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"


class LoadTests(unittest.TestCase):

    def test_mem_available(self):
        """MemAvailable in MB; None when the kernel does not give it."""
        self.assertEqual(mem_available(MEMINFO), 20000)
        self.assertIsNone(mem_available("MemTotal: 1 kB\n"))

    def test_cpu_times(self):
        """Idle (with iowait) and total of the machine's 'cpu' line, not a core's."""
        self.assertEqual(cpu_times("cpu  10 1 2 100 5 0 0 0 0 0\n"), (105, 118))
        self.assertRaises(ValueError, cpu_times, "intr 1 2 3\n")

    def test_sampler(self):
        """
        The first sample has no idle fraction; the next ones the idle share
        of the CPU time between the two samples.
        """
        texts = {"/proc/meminfo": MEMINFO, "/proc/stat": stat(100, 100)}
        sampler = LoadSampler(read=texts.__getitem__)
        self.assertEqual(sampler.sample(), NodeLoad(20000, None))
        texts["/proc/stat"] = stat(130, 170)          # 30 idle of 100
        self.assertEqual(sampler.sample(), NodeLoad(20000, 0.3))
        texts["/proc/stat"] = stat(230, 170)          # all idle
        self.assertEqual(sampler.sample().cpu_idle, 1.0)

    def test_unreadable(self):
        """What cannot be read is None; the heartbeat keeps the last value then."""
        def read(path):
            raise OSError("no /proc here")
        self.assertEqual(LoadSampler(read=read).sample(), NodeLoad(None, None))
