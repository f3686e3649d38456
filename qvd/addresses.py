"""
VM addresses: the IP range, allocation from its top and the MAC of an IP
(reference 4.7).

    r = VMRange.from_config("10.0.0.100", "255.255.0.0")
    ip = r.allocate(used={"10.0.255.254"})        # "10.0.255.253"
    mac_for_ip("54:52:00", ip)                    # "54:52:00:00:ff:fd"

The range runs from C{vm.network.ip.start} to the broadcast address minus one
of the network C{start & netmask}; a new VM gets the first free address from
the top down, as the original does.
"""

import ipaddress

import attrs


class AddressError(ValueError):
    """
    An address or range is wrong, or the range is exhausted.
    """


@attrs.frozen
class VMRange:
    start: ipaddress.IPv4Address
    last: ipaddress.IPv4Address
    network: ipaddress.IPv4Network

    @classmethod
    def from_config(cls, start, netmask):
        try:
            first = ipaddress.IPv4Address(start)
        except ValueError:
            raise AddressError(
                f"vm.network.ip.start {start!r} is not an IPv4 address: set it with "
                "'qvd-admin config set vm.network.ip.start 10.0.0.100'")
        try:
            network = ipaddress.IPv4Network(f"{start}/{netmask}", strict=False)
        except ValueError:
            raise AddressError(
                f"vm.network.netmask {netmask!r} is not a netmask: set it like 255.255.0.0")
        last = network.broadcast_address - 1
        if first > last:
            raise AddressError(
                f"vm.network.ip.start {start} leaves no address below the broadcast "
                f"address of {network}: lower it or widen vm.network.netmask")
        return cls(first, last, network)

    @property
    def size(self):
        return int(self.last) - int(self.start) + 1

    def __contains__(self, ip):
        return self.start <= ipaddress.IPv4Address(ip) <= self.last

    def describe(self):
        return f"{self.start} - {self.last}"

    def allocate(self, used):
        """
        The highest address of the range not in C{used} (strings or addresses).
        """
        taken = {int(ipaddress.IPv4Address(str(ip))) for ip in used}
        for value in range(int(self.last), int(self.start) - 1, -1):
            if value not in taken:
                return str(ipaddress.IPv4Address(value))
        raise AddressError(
            f"every VM address of the range {self.describe()} is taken ({self.size} VMs): "
            "delete VMs, or lower vm.network.ip.start or widen vm.network.netmask")

    def check(self, ip, used):
        """
        Validate an address chosen by the administrator; return it normalized.
        """
        try:
            addr = ipaddress.IPv4Address(ip)
        except ValueError:
            raise AddressError(f"{ip!r} is not an IPv4 address")
        if addr not in self:
            raise AddressError(
                f"IP {ip} is outside the VM range {self.describe()} "
                "(vm.network.ip.start to the broadcast address - 1): choose one inside it")
        if str(addr) in {str(u) for u in used}:
            raise AddressError(
                f"IP {ip} is already used by another VM: choose another or omit --ip")
        return str(addr)


def mac_for_ip(prefix, ip):
    """
    The VM's MAC: C{prefix} (three octets) plus the hex of the IP's octets 2-4.
    """
    parts = prefix.split(":")
    if len(parts) != 3 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p)
                                  for p in parts):
        raise AddressError(
            f"vm.network.mac.prefix {prefix!r} must be three hex octets like 54:52:00")
    octets = ipaddress.IPv4Address(ip).packed[1:]
    return prefix.lower() + "".join(f":{b:02x}" for b in octets)
