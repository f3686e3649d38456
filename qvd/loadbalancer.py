"""
Choosing the node a stopped VM starts on (reference 2.2).

    from qvd.loadbalancer import choose_host, weights_from_config, NoHostAvailable
    rows = <run HOSTS_SQL and VM_DI_SQL>       # any driver, sync or async
    hosts = [HostLoad(**row) for row in host_rows]
    host = choose_host("desk-1", di_hypervisor(di_path), hosts,
                       weights_from_config(config), random=rng.random)

The decision is pure: L{choose_host} takes the VM's DI kind, every backend
host with its state and load, the weights and a random source, and returns the
winning L{HostLoad} or raises L{NoHostAvailable} saying why each host was
left out. Candidates are hosts with C{backend=true}, not blocked, in state
C{running}, whose hypervisor runs the VM's DI (an LXC tarball or a KVM disk).
Each scores

    (w_ram * ram + w_cpu * cpu) / (vms on the host + vms starting there + 1) + w_random * random()

where C{ram} is the memory the node has available now (C{free_ram}, from its
last heartbeat; its usable memory until it reported one) and C{cpu} its usable
CPU times the fraction that was idle since its previous heartbeat: a node
busy with other work, or with VMs that are still starting (their memory and
CPU are not yet used, so they count twice), scores less. A node whose
available memory is below the VM's is left out. The highest score wins. The one caller that runs the queries is
L{qvd.runtime.store.place_in}, for the L7R and qvd-admin alike (rows of
L{HOSTS_SQL} are in the field order of L{HostLoad}, so C{HostLoad(*row)}
works).
"""

import random as _random

import attrs
from zope.interface import Interface, implementer

#: Extensions of DIs by hypervisor, longest first where they overlap.
_KINDS = (
    (".tar.gz", "lxc"), (".tar.xz", "lxc"), (".tar.bz2", "lxc"), (".tar.zst", "lxc"),
    (".tgz", "lxc"), (".tar", "lxc"),
    (".qcow2", "kvm"), (".img", "kvm"), (".raw", "kvm"),
)

#: Every backend host with what the balancer needs; one row per host.
HOSTS_SQL = """
    SELECT h.id AS host_id, h.name AS name, r.state AS state, r.blocked AS blocked,
           r.hypervisor AS hypervisor,
           coalesce(r.usable_ram, 0) AS usable_ram, coalesce(r.usable_cpu, 0) AS usable_cpu,
           (SELECT count(*) FROM vm_runtimes v WHERE v.host_id = h.id) AS vm_count,
           r.free_ram AS free_ram, r.cpu_idle AS cpu_idle,
           (SELECT count(*) FROM vm_runtimes v WHERE v.host_id = h.id
                AND v.vm_state = 'starting') AS starting
      FROM hosts h JOIN host_runtimes r ON r.host_id = h.id
     WHERE h.backend
     ORDER BY h.id
"""

#: The DI a VM would boot (its OSF's DI carrying the VM's tag) and the VM's
#: memory in MB (its OSF's). Argument: vm id.
VM_DI_SQL = """
    SELECT d.id AS di_id, d.path AS path, d.blocked AS blocked, o.memory AS memory
      FROM vms v JOIN osfs o ON o.id = v.osf_id
                 JOIN di_tags t ON t.osf_id = v.osf_id AND t.tag = v.di_tag
                 JOIN dis d ON d.id = t.di_id
     WHERE v.id = %s
"""


class NoHostAvailable(Exception):
    """
    No node can run the VM; the message says why each node was left out.
    """


class UnknownImageKind(ValueError):
    """
    A DI file name whose extension names no hypervisor.
    """


def di_hypervisor(path):
    """
    The hypervisor that runs the DI file C{path}: C{'lxc'} for tarballs
    (.tar, .tar.gz, .tgz, .tar.xz, .tar.bz2, .tar.zst), C{'kvm'} for disks
    (.qcow2, .img, .raw). Raises L{UnknownImageKind} otherwise.
    """
    lower = path.lower()
    for ext, kind in _KINDS:
        if lower.endswith(ext):
            return kind
    raise UnknownImageKind(
        f"cannot tell the hypervisor of disk image {path!r}: name it .tar, .tar.gz, "
        ".tgz, .tar.xz, .tar.bz2 or .tar.zst (LXC) or .qcow2, .img or .raw (KVM)")


@attrs.frozen
class Weights:
    """
    Weights of the default balancer (l7r.loadbalancer.plugin.default.weight.*).
    """
    ram: float = 1.0
    cpu: float = 1.0
    random: float = 1.0


def weights_from_config(config, tenant=None):
    prefix = "l7r.loadbalancer.plugin.default.weight."
    return Weights(ram=config.getfloat(prefix + "ram", tenant),
                   cpu=config.getfloat(prefix + "cpu", tenant),
                   random=config.getfloat(prefix + "random", tenant))


@attrs.frozen
class HostLoad:
    """
    One backend host as the balancer sees it.

    @ivar vm_count: VMs bound to the host (any state but unbound).
    @ivar free_ram: MB available now (its last heartbeat), None until reported.
    @ivar cpu_idle: fraction of its CPU idle since its previous heartbeat, or None.
    @ivar starting: VMs starting on the host now.
    """
    host_id: int
    name: str
    state: str
    blocked: bool
    hypervisor: str | None
    usable_ram: float = 0.0
    usable_cpu: float = 0.0
    vm_count: int = 0
    free_ram: float | None = None
    cpu_idle: float | None = None
    starting: int = 0


def _exclusion(host, hypervisor, memory):
    if host.blocked:
        return "blocked"
    if host.state != "running":
        return host.state
    if host.hypervisor != hypervisor:
        return f"runs {host.hypervisor or 'no hypervisor'}, not {hypervisor}"
    if memory and host.free_ram is not None and host.free_ram < memory:
        return f"{host.free_ram:.0f} MB available, the VM needs {memory:.0f}"
    return None


def score(host, weights, draw):
    """
    The score of C{host} (the module's docstring); C{draw} is a number in [0, 1).
    """
    ram = host.usable_ram if host.free_ram is None else host.free_ram
    cpu = host.usable_cpu if host.cpu_idle is None else host.usable_cpu * host.cpu_idle
    load = (weights.ram * ram + weights.cpu * cpu) / (host.vm_count + host.starting + 1)
    return load + weights.random * draw


def choose_host(vm_name, hypervisor, hosts, weights=Weights(), random=_random.random,
                memory=None):
    """
    Pick the host a VM starts on.

    @param vm_name: the VM, for the error message.
    @param hypervisor: C{'lxc'} or C{'kvm'}, from L{di_hypervisor}.
    @param hosts: every backend host, as L{HostLoad}s.
    @param random: a callable returning a float in [0, 1).
    @param memory: the VM's memory in MB (None: not checked).
    @return: the winning L{HostLoad}.
    @raise NoHostAvailable: when no host is a candidate.
    """
    best, best_score, excluded = None, None, []
    for host in hosts:
        why = _exclusion(host, hypervisor, memory)
        if why is not None:
            excluded.append(f"{host.name} ({why})")
            continue
        value = score(host, weights, random())
        if best is None or value > best_score:
            best, best_score = host, value
    if best is None:
        if excluded:
            reason = "; ".join(excluded)
        else:
            reason = "no backend node is registered (add one with 'qvd-admin host add')"
        raise NoHostAvailable(
            f"no running node can run VM {vm_name!r} ({hypervisor}): {reason}")
    return best


class ILoadBalancer(Interface):
    """
    A policy that picks the node a stopped VM starts on.
    """

    def choose(vm_name, hypervisor, hosts):
        """
        @param hosts: every backend host as L{HostLoad}s.
        @return: the chosen L{HostLoad}.
        @raise NoHostAvailable: when none of C{hosts} can run the VM.
        """


@implementer(ILoadBalancer)
@attrs.frozen
class DefaultLoadBalancer:
    """
    The reference's default plugin: L{choose_host} with C{weights}.
    """
    weights: Weights = Weights()
    random: object = _random.random

    def choose(self, vm_name, hypervisor, hosts):
        return choose_host(vm_name, hypervisor, hosts, self.weights, self.random)
