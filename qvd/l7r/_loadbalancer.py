"""
Host selection for a stopped VM (reference 2.2), a local stand-in until the
shared L{qvd.loadbalancer} lands; same shape: a pure scoring function.

    host_id = choose_host(candidates, weights, random.random)

C{candidates} are L{Candidate}s of the nodes that may run VMs (backend, not
blocked, running); the score is C{(w_ram*usable_ram + w_cpu*usable_cpu) /
(vms+1) + rand*w_random}, highest wins; None when there is no candidate.
"""

import attrs


@attrs.frozen
class Candidate:
    host_id: int
    usable_ram: float
    usable_cpu: float
    vms: int


@attrs.frozen
class Weights:
    ram: float = 1.0
    cpu: float = 1.0
    random: float = 1.0


def score(candidate, weights, rand):
    return ((weights.ram * (candidate.usable_ram or 0) + weights.cpu * (candidate.usable_cpu or 0))
            / (candidate.vms + 1) + rand * weights.random)


def choose_host(candidates, weights, random):
    best, best_score = None, None
    for candidate in candidates:
        s = score(candidate, weights, random())
        if best is None or s > best_score:
            best, best_score = candidate.host_id, s
    return best
