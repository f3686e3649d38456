"""
Allocation of VM addresses (reference 4.7), pure: values in, values out.

    used = {"10.0.255.254"}                                   # vms.ip already taken
    ip = allocate_ip("10.0.0.100", "255.255.0.0", used)       # IPv4Address('10.0.255.253')
    mac_for_ip(ip, "54:52:00")                                # '54:52:00:00:ff:fd'

The VM network is C{vm.network.ip.start & vm.network.netmask}. Addresses are
handed out from the top of the network down (broadcast - 1 first) to
C{vm.network.ip.start}, as the original did, so the nodes and gateway can live
below the start address. The MAC is C{vm.network.mac.prefix} followed by the
last three octets of the IP, so it is unique when the IP is.

The caller reads the used addresses and inserts the new VM in one serializable
transaction, so two concurrent allocations cannot hand out the same address.
"""

import ipaddress


class AddressError(ValueError):
    """
    The VM network is misconfigured or has no free address left.
    """


def vm_network(start, netmask):
    """
    The VM network and its first usable VM address.

    @return: (IPv4Network, IPv4Address start)
    @raise AddressError: if C{start} or C{netmask} is not valid, or C{start}
        is the network or broadcast address.
    """
    try:
        first = ipaddress.IPv4Address(str(start).strip())
        network = ipaddress.IPv4Network(f"{first}/{str(netmask).strip()}", strict=False)
    except ValueError as e:
        raise AddressError(
            f"vm.network.ip.start={start!r} / vm.network.netmask={netmask!r} "
            f"do not form an IPv4 network ({e}); set them in node.conf")
    if network.num_addresses < 4 or first in (network.network_address,
                                              network.broadcast_address):
        raise AddressError(
            f"vm.network.ip.start={start} leaves no VM address in {network}; "
            "choose a start address inside the network")
    return network, first


def allocate_ip(start, netmask, used):
    """
    The highest free address of the VM network not below C{start}.

    @param used: addresses already taken (texts or IPv4Address); others ignored.
    @return: an IPv4Address.
    @raise AddressError: when every address from C{start} up is taken.
    """
    network, first = vm_network(start, netmask)
    taken = set()
    for address in used:
        try:
            taken.add(ipaddress.IPv4Address(str(address).split("/")[0]))
        except ValueError:
            continue
    candidate = int(network.broadcast_address) - 1
    while candidate >= int(first):
        address = ipaddress.IPv4Address(candidate)
        if address not in taken:
            return address
        candidate -= 1
    raise AddressError(
        f"no free VM address left in {network} from {first} up "
        f"({len(taken)} in use); lower vm.network.ip.start or widen vm.network.netmask")


def mac_for_ip(ip, prefix="54:52:00"):
    """
    The MAC address of the VM with address C{ip}: C{prefix} + octets 2-4.
    """
    octets = ipaddress.IPv4Address(str(ip)).packed
    parts = [p for p in str(prefix).strip().lower().split(":") if p]
    if len(parts) != 3 or not all(len(p) <= 2 and all(c in "0123456789abcdef" for c in p)
                                  for p in parts):
        raise AddressError(
            f"vm.network.mac.prefix={prefix!r} must be three hex octets like 54:52:00")
    return ":".join([p.zfill(2) for p in parts] + [f"{b:02x}" for b in octets[1:]])
