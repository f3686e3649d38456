"""
Limits on logins, pure: sliding windows of failure times per key, attempts in
flight counted as failures until they end, and the rules that combine them.

    limits = LoginLimits(clock, LimitSettings(...))
    ticket = limits.begin(("alice", 2), "192.0.2.7")   # None: refuse unchecked
    ... check the password ...
    limits.end(ticket, ok=True)                        # or ok=False

C{clock} is anything with C{seconds()} (the reactor, or L{task.Clock} in
tests). The rules (docs/l7r.md, "Login limits"):

  - per (login, source address): C{login.max} failures in C{login.window}
    (5 in 300 s) and that login is refused from that address only, so an
    attacker elsewhere cannot lock a user out;
  - per login, from everywhere: a much higher backstop (C{login_global.max}
    in C{login_global.window}, 100 in 3600 s) bounds guesses spread over
    many addresses;
  - per source address: C{address.max} failures of any logins in
    C{address.window} (30 in 300 s) stop new logins from it, but not the
    logins that succeeded from that address within C{known.lifetime}: a
    sprayer behind an office NAT does not lock out the office.

An attempt takes its places before the password is checked and counts as a
failure while it runs: 40 parallel guesses check at most the limit. Logins
are keyed as the authenticator canonicalised them (login and tenant id after
parsing), so other spellings of one login share one count. The tables forget
keys whose failures aged out and hold at most C{max_keys} keys each (the
stalest dropped), so a flood of random logins cannot exhaust memory.

Limits are per L7R process: with several L7Rs behind a load balancer an
attacker gets the limits of each.
"""

import collections

import attrs


class FailureLimiter:
    """
    Counts recent failures (and attempts in flight) per key.
    """

    def __init__(self, clock, max_failures, window, max_keys=100000):
        self.clock = clock
        self.max_failures = max_failures
        self.window = window
        self.max_keys = max_keys
        self._failures = collections.OrderedDict()
        self._in_flight = collections.Counter()

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

    def _count(self, key):
        times = self._recent(key)
        return (len(times) if times else 0) + self._in_flight.get(key, 0)

    def blocked(self, key):
        """
        Whether C{key} has reached its limit of recent failures and
        attempts in flight.
        """
        return self.max_failures > 0 and self._count(key) >= self.max_failures

    def retry_after(self, key):
        """
        Seconds until the oldest failure of a blocked C{key} ages out (0 if
        it is not blocked or only attempts in flight block it).
        """
        if not self.blocked(key):
            return 0
        times = self._recent(key)
        if not times:
            return 0
        return times[0] + self.window - self.clock.seconds()

    def begin(self, key):
        """
        Take a place for one attempt of C{key}: False (nothing taken) when it
        is blocked; else the attempt counts until L{end}.
        """
        if self.blocked(key):
            return False
        if self.max_failures > 0:
            self._in_flight[key] += 1
        return True

    def end(self, key, failed):
        """
        The attempt begun for C{key} is over; record it when it C{failed}.
        """
        if self._in_flight.get(key, 0) > 0:
            self._in_flight[key] -= 1
            if not self._in_flight[key]:
                del self._in_flight[key]
        if failed:
            self.failed(key)

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


@attrs.frozen
class LimitSettings:
    """
    The C{l7r.auth.ratelimit.*} keys, as values.
    """
    login_max: int = 5
    login_window: float = 300.0
    global_max: int = 100
    global_window: float = 3600.0
    address_max: int = 30
    address_window: float = 300.0
    known_lifetime: float = 86400.0

    @classmethod
    def from_config(cls, config):
        prefix = "l7r.auth.ratelimit."
        return cls(
            login_max=config.getint(prefix + "login.max"),
            login_window=config.getfloat(prefix + "login.window"),
            global_max=config.getint(prefix + "login_global.max"),
            global_window=config.getfloat(prefix + "login_global.window"),
            address_max=config.getint(prefix + "address.max"),
            address_window=config.getfloat(prefix + "address.window"),
            known_lifetime=config.getfloat(prefix + "known.lifetime"))


@attrs.frozen
class Ticket:
    """
    The places one attempt holds: (limiter, key) pairs, and who it was.
    """
    login: object
    source: str
    places: tuple


class LoginLimits:
    """
    The login rules of the module docstring over three L{FailureLimiter}s and
    the table of (login, address) pairs that succeeded recently.
    """

    def __init__(self, clock, settings=LimitSettings(), max_keys=100000):
        self.clock = clock
        self.max_keys = max_keys
        self.per_source = FailureLimiter(clock, 0, 0, max_keys)
        self.per_login = FailureLimiter(clock, 0, 0, max_keys)
        self.per_address = FailureLimiter(clock, 0, 0, max_keys)
        self._known = collections.OrderedDict()
        self.configure(settings)

    def configure(self, settings):
        """Apply new settings (live configuration); counts are kept."""
        self.settings = settings
        for limiter, limit, window in (
                (self.per_source, settings.login_max, settings.login_window),
                (self.per_login, settings.global_max, settings.global_window),
                (self.per_address, settings.address_max, settings.address_window)):
            limiter.max_failures, limiter.window = limit, window

    def known(self, login, source):
        """Whether C{login} succeeded from C{source} within C{known_lifetime}."""
        when = self._known.get((login, source))
        if when is None:
            return False
        if self.clock.seconds() - when > self.settings.known_lifetime:
            del self._known[(login, source)]
            return False
        return True

    def begin(self, login, source):
        """
        Take the places of one attempt of C{login} (None for a bearer token:
        only the address counts) from C{source}.

        @return: a L{Ticket}, or None when a limit refuses the attempt
            (nothing is taken then).
        """
        wanted = []
        if login is not None:
            wanted += [(self.per_source, (login, source)), (self.per_login, login)]
        if login is None or not self.known(login, source):
            wanted.append((self.per_address, source))
        taken = []
        for limiter, key in wanted:
            if not limiter.begin(key):
                for done, done_key in taken:
                    done.end(done_key, failed=False)
                return None
            taken.append((limiter, key))
        return Ticket(login, source, tuple(taken))

    def end(self, ticket, ok):
        """
        The attempt of C{ticket} is over: a failure counts in every place it
        held; a success forgets the login's failures from that address and
        makes the pair known.
        """
        for limiter, key in ticket.places:
            limiter.end(key, failed=not ok)
        if ok and ticket.login is not None:
            self.per_source.succeeded((ticket.login, ticket.source))
            self._known[(ticket.login, ticket.source)] = self.clock.seconds()
            self._known.move_to_end((ticket.login, ticket.source))
            while len(self._known) > self.max_keys:
                self._known.popitem(last=False)

    def abandon(self, ticket):
        """The attempt ended without a verdict (e.g. the database was down)."""
        for limiter, key in ticket.places:
            limiter.end(key, failed=False)

    def __len__(self):
        return len(self.per_source) + len(self.per_login) + len(self.per_address)
