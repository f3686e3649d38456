"""
Pure parts of the LXC driver: where a VM's files live and what its container
config says. No I/O except reading the template file.

    settings = LXCSettings.from_config(config)
    layout = Layout.of(settings, spec)
    text = render_config(settings, spec, layout, template_text)
"""

import ipaddress
import os
import re
import signal
import string

import attrs

from qvd.virt.interfaces import VirtError

DEFAULT_TEMPLATE = os.path.join(os.path.dirname(__file__), "lxc.conf.template")
#: The seccomp policy shipped with qvd (vm.lxc.seccomp.profile empty).
DEFAULT_SECCOMP = os.path.join(os.path.dirname(__file__), "lxc.seccomp")
#: Capabilities a desktop's root does without (besides LXC's common.conf
#: drops). In a user namespace most of these grant nothing outside the
#: container anyway; dropping them keeps what root can try small.
#: Kept: sys_admin, net_admin, sys_ptrace, sys_resource, setuid/setgid,
#: chown, dac_*, kill, net_raw, ... (systemd, the VMA and useradd use them,
#: and they act only on the container's own namespaces).
CAP_DROP = ("mac_admin", "mac_override", "sys_time", "sys_module", "sys_rawio",
            "sys_boot", "sys_pacct", "mknod", "syslog", "wake_alarm", "block_suspend",
            "audit_control", "linux_immutable", "bpf", "perfmon", "checkpoint_restore")
#: DI file name endings the driver can unpack, and tar's option for each.
DI_SUFFIXES = (
    (".tar.gz", "-z"), (".tgz", "-z"), (".tar.bz2", "-j"), (".tbz2", "-j"),
    (".tar.xz", "-J"), (".txz", "-J"), (".tar.zst", "--zstd"), (".tar", None),
)
IFNAMSIZ = 15
#: Where the agent's secret appears in the container (vma.secret.file).
SECRET_TARGET = "etc/qvd/vma.secret"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.@+\-]+$")
_SAFE_PATH = re.compile(r"^/[^,:\s\\]*$")
_MAC = re.compile(r"^([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}$")


#: What keeps a desktop's processes from making user namespaces of their own
#: (vm.lxc.userns.nested off): the container's user namespace gets
#: user.max_user_namespaces = 0, written from the host just before init runs
#: (lxc.sysctl cannot: /proc/sys is read-only by then). The value belongs to
#: that namespace; only the container's root could raise it again.
NO_NESTED_USERNS = (
    "lxc.hook.start-host = /bin/sh -c 'echo 0 | nsenter -U -t \"$LXC_PID\" "
    "tee /proc/sys/user/max_user_namespaces >/dev/null'")


@attrs.frozen
class IdMap:
    """
    Host uid/gid of the containers' root and the number of ids mapped:
    container id C{n} (C{0 <= n < count}) is host id C{uid + n} / C{gid + n}.
    """
    uid: int
    gid: int
    count: int

    def host_uid(self, uid):
        return self.uid + uid if uid < self.count else uid

    def host_gid(self, gid):
        return self.gid + gid if gid < self.count else gid


@attrs.frozen
class LXCSettings:
    """
    The configuration the LXC driver reads, as values.
    """
    lxcpath: str
    basefs: str
    overlayfs: str
    rootfs: str
    homefs: str
    name_prefix: str = "qvd-"
    veth_prefix: str = "qvd"
    template: str = DEFAULT_TEMPLATE
    conf_extra: str = ""
    bridge_address: str = ""
    home_per_user: bool = False
    halt_signal: str = "SIGRTMIN+4"
    cpu_shares: int = 1024
    stop_timeout: float = 10.0
    watch_interval: float = 1.0
    log_level: str = "WARN"
    ip_start: str = "10.0.0.100"
    netmask: str = "255.255.0.0"
    use_dhcp: bool = False
    root_uid: int = 1000000
    root_gid: int = 1000000
    id_count: int = 65536
    pids_max: int = 2048
    seccomp_profile: str = DEFAULT_SECCOMP
    nested_userns: bool = False

    def __attrs_post_init__(self):
        if self.id_count < 1 or self.id_count > 2 ** 31:
            raise VirtError(f"vm.lxc.idmap.size {self.id_count!r} must be between 1 and 2**31")
        for key, value in (("uid", self.root_uid), ("gid", self.root_gid)):
            if value < self.id_count or value + self.id_count > 2 ** 32 - 1:
                raise VirtError(
                    f"vm.lxc.idmap.{key} {value!r} must be at least vm.lxc.idmap.size "
                    f"({self.id_count}) and leave the range below 2**32-1: container "
                    f"ids must never be host ids of the node's own users (e.g. 1000000)")
        if self.pids_max < 16:
            raise VirtError(f"vm.lxc.pids.max {self.pids_max!r} is too small for a desktop "
                            f"(at least 16; e.g. 2048)")

    @property
    def idmap(self):
        """The containers' id mapping as an L{IdMap}."""
        return IdMap(self.root_uid, self.root_gid, self.id_count)

    @property
    def id_suffix(self):
        """What names a DI's tree unpacked for this mapping (C{.u<uid>-g<gid>})."""
        return f".u{self.root_uid}-g{self.root_gid}"

    @classmethod
    def from_config(cls, config):
        return cls(
            lxcpath=config.get("path.run.lxc"),
            basefs=config.get("path.storage.basefs"),
            overlayfs=config.get("path.storage.overlayfs"),
            rootfs=config.get("path.storage.rootfs"),
            homefs=config.get("path.storage.homefs"),
            name_prefix=config.get("vm.lxc.name.prefix"),
            veth_prefix=config.get("vm.lxc.veth.prefix"),
            template=config.get("vm.lxc.template") or DEFAULT_TEMPLATE,
            conf_extra=config.get("vm.lxc.conf.extra"),
            bridge_address=config.get("vm.lxc.bridge.address"),
            home_per_user=config.getbool("vm.lxc.home.per.user"),
            halt_signal=config.get("vm.lxc.signal.halt"),
            cpu_shares=config.getint("vm.lxc.cpu.shares"),
            stop_timeout=config.getfloat("vm.lxc.stop.timeout"),
            watch_interval=config.getfloat("vm.lxc.watch.interval"),
            log_level=config.get("vm.lxc.log.level"),
            ip_start=config.get("vm.network.ip.start"),
            netmask=config.get("vm.network.netmask"),
            use_dhcp=config.getbool("vm.network.use_dhcp"),
            root_uid=config.getint("vm.lxc.idmap.uid"),
            root_gid=config.getint("vm.lxc.idmap.gid"),
            id_count=config.getint("vm.lxc.idmap.size"),
            pids_max=config.getint("vm.lxc.pids.max"),
            seccomp_profile=config.get("vm.lxc.seccomp.profile") or DEFAULT_SECCOMP,
            nested_userns=config.getbool("vm.lxc.userns.nested"),
        )

    def container_name(self, vm_id):
        return f"{self.name_prefix}{vm_id}"

    def veth_name(self, vm_id):
        """The host side of the VM's veth (its port on the bridge)."""
        return f"{self.veth_prefix}{vm_id}"

    def vm_id_of(self, container_name):
        """
        The VM id of one of our containers' names, or None for another name.
        """
        if not container_name.startswith(self.name_prefix):
            return None
        rest = container_name[len(self.name_prefix):]
        return int(rest) if rest.isdigit() else None

    def halt_signum(self):
        return parse_signal(self.halt_signal)

    def node_bridge_address(self):
        """
        The CIDR address the node puts on a bridge it creates.
        """
        if self.bridge_address:
            try:
                return str(ipaddress.ip_interface(self.bridge_address))
            except ValueError:
                raise VirtError(
                    f"vm.lxc.bridge.address {self.bridge_address!r} is not an "
                    f"address/prefix such as 10.0.0.1/16")
        try:
            network = ipaddress.ip_network(f"{self.ip_start}/{self.netmask}", strict=False)
        except ValueError:
            raise VirtError(
                f"vm.network.ip.start {self.ip_start!r} / vm.network.netmask "
                f"{self.netmask!r} do not make a network; fix them or set "
                f"vm.lxc.bridge.address")
        return f"{network.network_address + 1}/{network.prefixlen}"


def parse_signal(name):
    """
    C{SIGTERM}, C{TERM}, C{SIGRTMIN+4} or a number -> the signal number.
    """
    text = name.strip().upper()
    if text.isdigit():
        return int(text)
    if not text.startswith("SIG"):
        text = "SIG" + text
    match = re.match(r"^SIGRT(MIN|MAX)([+-]\d+)?$", text)
    if match:
        base = signal.SIGRTMIN if match.group(1) == "MIN" else signal.SIGRTMAX
        return int(base) + int(match.group(2) or 0)
    try:
        return int(getattr(signal.Signals, text))
    except AttributeError:
        raise VirtError(f"vm.lxc.signal.halt {name!r} is not a signal name (e.g. SIGRTMIN+4)")


def di_base_name(di_path):
    """
    The DI's file name without its archive suffix, and tar's decompression
    option; L{VirtError} for a file that is not a tarball.
    """
    filename = os.path.basename(di_path)
    for suffix, option in DI_SUFFIXES:
        if filename.endswith(suffix) and len(filename) > len(suffix):
            return filename[:-len(suffix)], option
    raise VirtError(
        f"disk image {di_path!r} is not a tarball: LXC images must end in "
        f"{', '.join(s for s, _ in DI_SUFFIXES)}")


@attrs.frozen
class Layout:
    """
    Where the files of one VM live on the node.

    @ivar name: the container's name.
    @ivar container_dir: C{<lxcpath>/<name>} (config, lxc.log).
    @ivar basefs: the DI's unpacked tree with its ids shifted into the
        containers' range (C{<basefs>/<DI name>.u<uid>-g<gid>}), shared by
        its VMs.
    @ivar upper, work: the overlay's upper and work dirs.
    @ivar rootfs: the mount point of the VM's root filesystem.
    @ivar home_dir: the persistent home on the node.
    @ivar home_target: where the home appears in the container (relative).
    @ivar veth: the host side of the container's network interface.
    """
    name: str
    container_dir: str
    basefs: str
    tar_option: str | None
    upper: str
    work: str
    rootfs: str
    home_dir: str
    home_target: str
    veth: str

    @property
    def config_path(self):
        return os.path.join(self.container_dir, "config")

    @property
    def secret_path(self):
        """The host file of the agent's secret, bind-mounted into the container."""
        return os.path.join(self.container_dir, "vma.secret")

    @property
    def log_path(self):
        return os.path.join(self.container_dir, "lxc.log")

    @classmethod
    def of(cls, settings, spec, for_cleanup=False):
        """
        The layout of C{spec}'s VM; L{VirtError} when a name would be unsafe.

        @param for_cleanup: accept a DI that is not a tarball (its VM never
            got further than a failed prepare, but has files to remove).
        """
        if not isinstance(spec.vm_id, int) or spec.vm_id < 0:
            raise VirtError(f"bad VM id {spec.vm_id!r}")
        try:
            base, option = di_base_name(spec.di_path)
        except VirtError:
            if not for_cleanup:
                raise
            base, option = "unknown", None
        if not _SAFE_NAME.match(base):
            raise VirtError(f"disk image name {base!r} has characters LXC paths cannot hold")
        veth = settings.veth_name(spec.vm_id)
        if len(veth) > IFNAMSIZ:
            raise VirtError(
                f"interface name {veth!r} is longer than {IFNAMSIZ} characters: "
                f"shorten vm.lxc.veth.prefix")
        if settings.home_per_user:
            if not spec.login or not _SAFE_NAME.match(spec.login) or spec.login.startswith("."):
                raise VirtError(
                    f"login {spec.login!r} cannot name a home directory "
                    f"(vm.lxc.home.per.user is on)")
            home_dir = os.path.join(settings.homefs, spec.login)
            home_target = f"home/{spec.login}"
        else:
            home_dir = os.path.join(settings.homefs, f"{spec.vm_id}-fs")
            home_target = "home"
        layout = cls(
            name=settings.container_name(spec.vm_id),
            container_dir=os.path.join(settings.lxcpath, settings.container_name(spec.vm_id)),
            basefs=os.path.join(settings.basefs, base + settings.id_suffix),
            tar_option=option,
            upper=os.path.join(settings.overlayfs, f"{spec.di_id}-{spec.vm_id}-overlayfs"),
            work=os.path.join(settings.overlayfs, f"{spec.vm_id}-overlayfs-work"),
            rootfs=os.path.join(settings.rootfs, f"{spec.vm_id}-fs"),
            home_dir=home_dir,
            home_target=home_target,
            veth=veth,
        )
        for path in (layout.basefs, layout.upper, layout.work, layout.rootfs, layout.home_dir):
            if not _SAFE_PATH.match(path):
                raise VirtError(
                    f"path {path!r} must be absolute and free of spaces, commas and "
                    f"colons (overlayfs and lxc.mount.entry cannot quote them)")
        return layout


def overlay_options(lower, layout):
    return f"lowerdir={lower},upperdir={layout.upper},workdir={layout.work}"


def ipv4_lines(settings, spec):
    """
    The static address lines of the container's config (none with DHCP).
    """
    if settings.use_dhcp:
        return ""
    try:
        interface = ipaddress.ip_interface(f"{spec.ip}/{spec.netmask}")
    except ValueError:
        raise VirtError(
            f"VM {spec.vm_id}: ip {spec.ip!r} / netmask {spec.netmask!r} is not a "
            f"valid IPv4 address and mask")
    lines = [f"lxc.net.0.ipv4.address = {interface.with_prefixlen}"]
    if spec.gateway:
        try:
            ipaddress.ip_address(spec.gateway)
        except ValueError:
            raise VirtError(f"VM {spec.vm_id}: gateway {spec.gateway!r} is not an IPv4 address")
        lines.append(f"lxc.net.0.ipv4.gateway = {spec.gateway}")
    return "\n".join(lines)


def render_config(settings, spec, layout, template_text, template_name=DEFAULT_TEMPLATE,
                  extra=""):
    """
    The text of C{spec}'s container config: the template filled in, then
    C{extra} (the DI's own lxc/config-extra) and C{vm.lxc.conf.extra}.
    """
    if not _MAC.match(spec.mac or ""):
        raise VirtError(f"VM {spec.vm_id}: MAC address {spec.mac!r} is not xx:xx:xx:xx:xx:xx")
    if not spec.bridge or len(spec.bridge) > IFNAMSIZ or not _SAFE_NAME.match(spec.bridge):
        raise VirtError(f"VM {spec.vm_id}: bad bridge name {spec.bridge!r}")
    if spec.memory <= 0:
        raise VirtError(f"VM {spec.vm_id}: memory {spec.memory!r} MB must be positive")
    shares = max(2, settings.cpu_shares * max(1, spec.cpus))
    values = {
        "vm_id": spec.vm_id,
        "name": layout.name,
        "hostname": _hostname(spec),
        "rootfs": layout.rootfs,
        "bridge": spec.bridge,
        "veth": layout.veth,
        "mac": spec.mac.lower(),
        "ipv4": ipv4_lines(settings, spec),
        "memory_mb": spec.memory,
        "memory_bytes": spec.memory * 1024 * 1024,
        "cpu_shares": shares,
        "cpu_weight": min(10000, max(1, shares * 100 // 1024)),
        "halt_signal": settings.halt_signal,
        "home_dir": layout.home_dir,
        "home_target": layout.home_target,
        "log_file": layout.log_path,
        "template": template_name,
        "root_uid": settings.root_uid,
        "root_gid": settings.root_gid,
        "id_count": settings.id_count,
        "cap_drop": " ".join(CAP_DROP),
        "seccomp_profile": settings.seccomp_profile,
        "pids_max": settings.pids_max,
        "max_user_namespaces": "" if settings.nested_userns else NO_NESTED_USERNS,
    }
    try:
        text = string.Template(template_text).substitute(values)
    except (KeyError, ValueError) as e:
        raise VirtError(
            f"LXC config template {template_name} is wrong: {e!r} "
            f"(known placeholders: {', '.join('$' + k for k in sorted(values))})")
    parts = [text.rstrip("\n")]
    if spec.vma_secret:
        # Read-only, root-only inside: the desktop's users cannot read it.
        parts.append(f"lxc.mount.entry = {layout.secret_path} {SECRET_TARGET} none "
                     "bind,ro,create=file 0 0")
    for more in (extra, settings.conf_extra.replace("\\n", "\n")):
        if more.strip():
            parts.append(more.strip("\n"))
    return "\n".join(parts) + "\n"


def _hostname(spec):
    name = re.sub(r"[^A-Za-z0-9\-]", "-", spec.name or "")[:63].strip("-")
    return name or f"qvd-{spec.vm_id}"


def parse_lxc_info(text):
    """
    C{lxc-info -s -p} output -> (state or None, pid or None).
    """
    state = pid = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "state":
            state = value
        elif key == "pid" and value.isdigit():
            pid = int(value)
    return state, pid


def unescape_mount_path(field):
    """
    A path field of /proc/mounts with its octal escapes (C{\\040}) decoded.
    """
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_below(mounts_text, path):
    """
    The mount points at or below C{path} in C{/proc/mounts} text, deepest
    (last mounted) first.
    """
    path = path.rstrip("/")
    found = []
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) < 2:
            continue
        point = unescape_mount_path(fields[1])
        if point == path or point.startswith(path + "/"):
            found.append(point)
    return list(reversed(found))
