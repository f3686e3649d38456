"""
Virt drivers: start, stop and find desktops on one node.

L{qvd.virt.interfaces.IHypervisor} is the seam; C{qvd.virt.lxc} (liblxc) and
C{qvd.virt.kvm} (libvirt) implement it; the tests have a fake of it.
"""
