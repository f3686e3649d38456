"""
The node's packet filter for its desktops: one nftables table of the bridge
family, rebuilt from values and replaced in one atomic C{nft -f -}
transaction at every change.

    settings = FirewallSettings.from_config(config, node_addresses=("10.0.0.1",))
    firewall = NodeFirewall(settings, reactor)
    yield firewall.allow(VMPort(vm_id=5, interface="qvd5", ip="10.0.0.105", mac="..."))
    yield firewall.forget(5)                 # the desktop stopped
    yield firewall.keep_only({5, 7})         # after adoption: only what runs

What the table enforces on every desktop port (a container's veth, a KVM
domain's tap), whatever the desktop does, even as its root:

  - a desktop sends only with its own MAC and IPv4 address (ARP included);
    IPv6 and every other protocol are dropped;
  - nothing a desktop sends is forwarded to another port of the bridge
    (another desktop, here or reached through a tunnel, or an uplink);
  - the node itself answers a desktop only for the replies of connections the
    node made (TCP from the agent and NX ports, never a new connection) and
    for the services of C{vm.network.firewall.node_allow} (e.g. C{udp/67});
  - a desktop accepts new connections only from the node addresses
    (C{node_addresses}: this node's bridge address, the hosts' addresses,
    C{vm.network.firewall.allow_from}) and only on its agent and NX ports.

The rules name interfaces, which may not exist yet: they are installed before
a desktop starts. L{ruleset} is pure; L{NodeFirewall} only runs C{nft}.
"""

import ipaddress
import re

import attrs
from twisted.internet import defer

from qvd.logs import Logger
from qvd.virt._process import run as run_process
from qvd.virt.interfaces import VirtError

log = Logger()

_NAME = re.compile(r"^[A-Za-z0-9_]{1,32}\Z")
_IFNAME = re.compile(r"^[A-Za-z0-9_.\-]{1,15}\Z")
_MAC = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}\Z")
_SERVICE = re.compile(r"^(tcp|udp)/(\d{1,5})\Z")


@attrs.frozen
class VMPort:
    """
    One desktop's port on the bridge and its network identity.
    """
    vm_id: int
    interface: str
    ip: str
    mac: str

    def __attrs_post_init__(self):
        if not _IFNAME.match(self.interface or ""):
            raise VirtError(f"VM {self.vm_id}: bad interface name {self.interface!r}")
        try:
            ipaddress.IPv4Address(self.ip)
        except ValueError:
            raise VirtError(f"VM {self.vm_id}: {self.ip!r} is not an IPv4 address")
        if not _MAC.match((self.mac or "").lower()):
            raise VirtError(f"VM {self.vm_id}: MAC address {self.mac!r} is not xx:xx:xx:xx:xx:xx")


def parse_services(text):
    """
    C{"udp/67, tcp/53"} -> C{(("udp", 67), ("tcp", 53))}; L{VirtError} naming
    a bad item.
    """
    services = []
    for item in (i.strip().lower() for i in (text or "").split(",")):
        if not item:
            continue
        match = _SERVICE.match(item)
        if not match or not 0 < int(match.group(2)) < 65536:
            raise VirtError(
                f"vm.network.firewall.node_allow item {item!r} is not protocol/port "
                f"(e.g. udp/67, tcp/53)")
        services.append((match.group(1), int(match.group(2))))
    return tuple(services)


@attrs.frozen
class FirewallSettings:
    """
    @ivar table: the name of the node's nftables table (bridge family).
    @ivar node_addresses: IPv4 addresses that may open connections to a
        desktop's agent and NX ports.
    @ivar desktop_ports: those ports.
    @ivar node_allow: (protocol, port) services of the node desktops may use.
    @ivar dhcp: desktops configure themselves with DHCP (source 0.0.0.0).
    """
    enabled: bool = True
    table: str = "qvd"
    node_addresses: tuple = ()
    desktop_ports: tuple = (3030, 4100)
    node_allow: tuple = ()
    dhcp: bool = False

    def __attrs_post_init__(self):
        if not _NAME.match(self.table or ""):
            raise VirtError(f"vm.network.firewall.table {self.table!r}: letters, digits "
                            "and '_' only, at most 32")
        for address in self.node_addresses:
            try:
                ipaddress.IPv4Address(address)
            except ValueError:
                raise VirtError(f"node address {address!r} is not an IPv4 address")

    @classmethod
    def from_config(cls, config, node_addresses=()):
        extra = [a.strip() for a in config.get("vm.network.firewall.allow_from").split(",")
                 if a.strip()]
        addresses = []
        for address in list(node_addresses) + extra:
            if address not in addresses:
                addresses.append(address)
        return cls(
            enabled=config.getbool("vm.network.firewall.enable"),
            table=config.get("vm.network.firewall.table"),
            node_addresses=tuple(addresses),
            desktop_ports=(config.getint("hkd.vm.vma.port"), 4000 + config.getint("vma.display")),
            node_allow=parse_services(config.get("vm.network.firewall.node_allow")),
            dhcp=config.getbool("vm.network.use_dhcp"))


def _set(items):
    return "{ " + ", ".join(items) + " }"


def ruleset(settings, ports):
    """
    The nft script that replaces the node's table by the one for C{ports}
    (L{VMPort}s), or only deletes it when there are none.
    """
    table = f"table bridge {settings.table}"
    lines = [f"{table} {{}}", f"delete {table}"]
    ports = sorted(ports, key=lambda p: p.vm_id)
    if not ports:
        return "\n".join(lines) + "\n"
    names = _set(f'"{p.interface}"' for p in ports)
    desktop_ports = _set(str(p) for p in settings.desktop_ports)
    lines.append(f"{table} {{")
    lines.append("  set nodes { type ipv4_addr; "
                 + (f"elements = {_set(settings.node_addresses)}; " if settings.node_addresses
                    else "") + "}")
    for p in ports:
        mac, ip = p.mac.lower(), p.ip
        lines += [
            f"  chain vm{p.vm_id} {{",
            f"    ether saddr != {mac} drop",
            f"    ether type arp arp saddr ether != {mac} drop",
            f"    ether type arp arp saddr ip != {ip} drop",
        ]
        if settings.dhcp:
            lines.append("    ether type ip ip saddr 0.0.0.0 udp dport 67 return")
        lines += [
            f"    ether type ip ip saddr != {ip} drop",
            "    ether type != { ip, arp } drop",
            "  }",
        ]
    source_checks = [f'    iifname "{p.interface}" jump vm{p.vm_id}' for p in ports]
    lines += ["  chain forward {", "    type filter hook forward priority -200; policy accept;",
              *source_checks,
              # Replies to the connections of other nodes' L7Rs and HKDs.
              f"    iifname {names} ip daddr @nodes tcp sport {desktop_ports}"
              " tcp flags & (syn | ack) != syn accept",
              f"    iifname {names} drop",
              f"    oifname {names} jump to_desktop",
              "  }",
              "  chain input {", "    type filter hook input priority -200; policy accept;",
              *source_checks,
              f"    iifname {names} jump to_node",
              "  }",
              "  chain output {", "    type filter hook output priority -200; policy accept;",
              f"    oifname {names} jump to_desktop",
              "  }",
              "  chain to_node {",
              "    ether type arp accept",
              # Replies of the node's connections to a desktop, never a new one.
              f"    tcp sport {desktop_ports} tcp flags & (syn | ack) != syn accept"]
    for proto, port in settings.node_allow:
        lines.append(f"    {proto} dport {port} accept")
    lines += ["    drop", "  }",
              "  chain to_desktop {",
              "    ether type arp accept",
              f"    ip saddr @nodes tcp dport {desktop_ports} accept"]
    for proto, port in settings.node_allow:
        lines.append(f"    {proto} sport {port} accept")
    lines += ["    drop", "  }", "}"]
    return "\n".join(lines) + "\n"


class NodeFirewall:
    """
    Keeps the node's table equal to L{ruleset} of the desktops it was told
    about. Changes are applied one at a time, in order, each rendering every
    change made before it (two desktops stopping at once both go), and a
    change that an earlier run already rendered runs no C{nft} (five desktops
    starting at once cost one or two runs, not five in a row); a desktop
    that C{nft} refuses fails with L{VirtError} and is not kept.

    @ivar ports: the desktops of the table in the kernel, by VM id.
    @param run: C{run(argv, stdin=bytes)} -> Deferred of a
        L{qvd.virt._process.ProcessResult}; the real C{nft} by default.
    """

    def __init__(self, settings, reactor, run=None):
        self.settings = settings
        self._run = run or (lambda argv, stdin: run_process(reactor, argv, stdin=stdin))
        self.ports = {}
        self._wanted = {}
        self._in_kernel = None      # the ruleset nft last took
        self._lock = defer.DeferredLock()

    def _apply(self, undo):
        """Make the table match C{_wanted}; on a refusal, C{undo()} and fail."""
        def apply():
            wanted = dict(self._wanted)
            text = ruleset(self.settings, wanted.values())
            if text == self._in_kernel:
                self.ports = wanted
                return None         # an earlier run rendered this change already
            d = self._run(["nft", "-f", "-"], stdin=text.encode())

            def done(result):
                if result.code != 0:
                    undo()
                    raise VirtError(f"nft refused the desktops' rules of table "
                                    f"{self.settings.table}: {result.describe()}")
                self.ports = wanted
                self._in_kernel = text
            return d.addCallback(done)
        if not self.settings.enabled:
            self.ports = dict(self._wanted)
            return defer.succeed(None)
        return self._lock.run(apply)

    def allow(self, port):
        """Filter C{port}'s desktop (before it starts)."""
        self._wanted[port.vm_id] = port

        def undo():
            if self._wanted.get(port.vm_id) is port:
                del self._wanted[port.vm_id]
        return self._apply(undo)

    def forget(self, vm_id):
        """The desktop is gone: drop its rules (the table with the last one)."""
        self._wanted.pop(vm_id, None)
        return self._apply(lambda: None)

    def set_node_addresses(self, addresses):
        """
        The node addresses changed (a node joined or left): re-apply with
        C{addresses}; a Deferred, at once when nothing changed. A change nft
        refuses keeps the previous addresses.
        """
        addresses = tuple(dict.fromkeys(addresses))
        if addresses == self.settings.node_addresses:
            return defer.succeed(None)
        previous = self.settings
        self.settings = attrs.evolve(previous, node_addresses=addresses)

        def undo():
            self.settings = previous
        return self._apply(undo)

    def keep_only(self, vm_ids):
        """Keep the rules of C{vm_ids} only, and make the table match."""
        for vm_id in set(self._wanted) - set(vm_ids):
            del self._wanted[vm_id]
        return self._apply(lambda: None)
