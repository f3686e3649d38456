"""
The interface every virt driver provides, and the values that cross it.

A driver is created by the HKD with the node's configuration and the reactor;
every method returns a Deferred and never blocks the reactor thread.
"""

import attrs
from zope.interface import Attribute, Interface


@attrs.frozen
class VMSpec:
    """
    Everything a driver needs to run one VM, read from the database by the HKD.

    @ivar vm_id: C{vms.id}.
    @ivar name: C{vms.name} (the container's or domain's host name).
    @ivar login: the owner's login (for per-user homes).
    @ivar memory: MB, from the OSF.
    @ivar cpus: virtual CPUs (KVM) or CPU share (LXC).
    @ivar di_id: C{dis.id} of the image to boot.
    @ivar di_path: absolute path of the DI file (under path.storage.images).
    @ivar use_overlay: copy-on-write overlay over the DI (C{osfs.use_overlay}).
    @ivar persistent_overlay: keep the overlay across boots (C{vm.overlay.persistent}).
    @ivar user_storage_size: MB of the persistent home (0: none; LXC: a directory).
    @ivar ip, mac, netmask, gateway: the VM's network identity (C{vms.ip}, C{vms.mac}).
    @ivar bridge: the node bridge the VM joins.
    @ivar vma_secret: the agent's secret for this run (L{qvd.vma.secret}):
        the driver hands it to the desktop where only its root can read it.
    """
    vm_id: int
    name: str
    login: str
    memory: int
    di_id: int
    di_path: str
    ip: str
    mac: str
    netmask: str
    bridge: str
    gateway: str = ""
    cpus: int = 1
    use_overlay: bool = True
    persistent_overlay: bool = False
    user_storage_size: int = 0
    vma_secret: str = ""


@attrs.frozen
class RunningVM:
    """
    A VM that a driver found running (or has just started).

    @ivar vm_id: the C{vms.id} it runs for.
    @ivar pid: the process that holds it (container init or QEMU), if known.
    """
    vm_id: int
    pid: int | None = None


class VirtError(Exception):
    """
    A driver operation failed; the message is for the administrator
    (it is stored as the VM's state reason).
    """


class IHypervisor(Interface):
    """
    Runs desktops on this node.
    """

    name = Attribute("The driver's name: 'lxc' or 'kvm' (vm.hypervisor).")

    def setUp():
        """
        Prepare the node (bridge, directories, daemon connections).

        @return: a Deferred firing with None.
        """

    def prepare(spec):
        """
        Prepare storage and network of the VM described by C{spec} (a
        L{VMSpec}): unpack or link the DI, create the overlay and the home.

        @return: a Deferred firing with None, or failing with L{VirtError}
            after undoing whatever it did.
        """

    def start(spec):
        """
        Start the prepared VM.

        @return: a Deferred firing with a L{RunningVM}, or failing with
            L{VirtError} (the VM is then not running).
        """

    def shutdown(vm_id):
        """
        Ask the VM's operating system to power off (ACPI, init signal); does
        not wait for it.

        @return: a Deferred firing with None.
        """

    def kill(vm_id):
        """
        Stop the VM at once (destroy the domain, kill the container).

        @return: a Deferred firing with None once it no longer runs.
        """

    def cleanup(spec):
        """
        Remove everything of a stopped VM but its persistent data: mounts,
        network interfaces, cgroups, run files, a non-persistent overlay.
        Safe to call more than once and for a VM that never started.

        @return: a Deferred firing with None.
        """

    def isRunning(vm_id):
        """
        @return: a Deferred firing with True while the VM runs.
        """

    def listRunning():
        """
        The VMs of this driver that run on this node (for adoption after an
        HKD restart).

        @return: a Deferred firing with a list of L{RunningVM}.
        """

    def watch(vm_id):
        """
        @return: a Deferred that fires with None when the VM stops running
            (at once if it does not run).
        """
