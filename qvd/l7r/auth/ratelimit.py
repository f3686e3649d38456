"""
Limits on failed logins, pure: a sliding window of failure times per key.

    limiter = FailureLimiter(clock, max_failures=5, window=300)
    if limiter.blocked(("login", "alice@acme")):
        refuse()                         # without checking the password
    ... on failure: limiter.failed(key)   on success: limiter.succeeded(key)

C{clock} is anything with C{seconds()} (the reactor, or L{task.Clock} in
tests). A key is blocked while it has C{max_failures} failures younger than
C{window} seconds; the oldest one ageing out unblocks it. C{max_failures} 0
disables the limit. The table forgets keys whose failures all aged out, and
never holds more than C{max_keys} keys (the stalest are dropped), so a flood
of random logins cannot exhaust memory.

Limits are per L7R process: with several L7Rs behind a load balancer an
attacker gets C{max_failures} tries on each.
"""

import collections


class FailureLimiter:
    """
    Counts recent failures per key.
    """

    def __init__(self, clock, max_failures, window, max_keys=100000):
        self.clock = clock
        self.max_failures = max_failures
        self.window = window
        self.max_keys = max_keys
        self._failures = collections.OrderedDict()

    def _recent(self, key):
        times = self._failures.get(key)
        if times is None:
            return None
        horizon = self.clock.seconds() - self.window
        while times and times[0] <= horizon:
            times.popleft()
        if not times:
            del self._failures[key]
            return None
        return times

    def blocked(self, key):
        """
        Whether C{key} has reached its limit of recent failures.
        """
        if self.max_failures <= 0:
            return False
        times = self._recent(key)
        return times is not None and len(times) >= self.max_failures

    def retry_after(self, key):
        """
        Seconds until C{key} is no longer blocked (0 if it is not).
        """
        if not self.blocked(key):
            return 0
        times = self._failures[key]
        return times[-self.max_failures] + self.window - self.clock.seconds()

    def failed(self, key):
        """
        Record one failure of C{key} now.
        """
        if self.max_failures <= 0:
            return
        times = self._recent(key)
        if times is None:
            times = self._failures[key] = collections.deque(maxlen=self.max_failures)
        else:
            self._failures.move_to_end(key)
        times.append(self.clock.seconds())
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)

    def succeeded(self, key):
        """
        Forget the failures of C{key}.
        """
        self._failures.pop(key, None)

    def __len__(self):
        return len(self._failures)
