"""
The session properties of an x_start and the nxagent options line built from
them (reference 3.3), as pure functions.

    props = fill_props(params, settings)       # user name, groups, home filled in
    line = nxagent_options(props, settings)    # "nx/nx,keyboard=pc105/es,...:100"

Every value that goes into the options line must match C{^[\\w/\\-\\+]+$}
(the original's rule; nxagent splits on C{,} C{=} and C{:}); anything else is
refused with an L{OptionsError} that names the property.

With the L7R's NX cookie (C{qvd.nx.cookie}, 32 hex digits) the line starts
C{nx/nx,cookie=<cookie>,}; the client's C{qvd.client.nxagent.extra_args} may
not set C{cookie}, nor where nxagent listens (L{CLIENT_DENIED_OPTIONS}).

The session user is never privileged, whatever the caller asks: L{fill_props}
refuses the name C{root}, a uid or gid below C{settings.uid_min} and any group
of C{settings.denied_groups} (C{root}, C{shadow}, C{disk}, C{sudo}, ...), and
the agent refuses an existing account whose uid is below C{uid_min}.
"""

import re

import attrs

from qvd.protocols.nx import COOKIE_PARAM, valid_cookie

_VALUE = re.compile(r"[\w/\-+]+\Z", re.ASCII)
_EXTRA = re.compile(r"\w+=[\w/\-+]+\Z", re.ASCII)
_USER = re.compile(r"[a-z_][a-z0-9_.\-]*\$?\Z", re.IGNORECASE)

# property -> nxagent option, in the order the options line lists them.
PROPS_TO_NX = (
    ("qvd.client.keyboard", "keyboard"),
    ("qvd.client.os", "client"),
    ("qvd.client.link", "link"),
    ("qvd.client.geometry", "geometry"),
    ("qvd.client.fullscreen", "fullscreen"),
)

_TRUE = {"1", "true", "yes", "on"}

#: nxagent options a client's qvd.client.nxagent.extra_args may not set: the
#: session's cookie and where and from whom nxagent accepts connections
#: (the relay path), its session files and the channels the VMA configures.
CLIENT_DENIED_OPTIONS = frozenset((
    "cookie", "listen", "port", "accept", "loopback", "connect", "session", "id",
    "options", "slave", "cups", "smb", "media", "http", "font", "file", "mask"))


#: Groups a session user never gets (vma.user.groups.denied): each gives
#: root, raw disks, password hashes, the kernel's memory or its log.
DENIED_GROUPS = frozenset((
    "root", "wheel", "sudo", "adm", "admin", "shadow", "disk", "kmem", "tty", "mem",
    "sys", "bin", "daemon", "staff", "systemd-journal", "lxd", "docker", "libvirt",
    "kvm", "lp", "dialout", "video", "input", "render", "netdev", "operator",
))


class OptionsError(ValueError):
    """A session property cannot be used; the message names it and its value."""


@attrs.frozen
class SessionSettings:
    """
    The VMA configuration that shapes a session (from C{vma.*} keys).
    """
    display: int = 100
    default_user: str = "qvd"
    default_groups: str = "qvduser"
    home_path: str = "/home"
    audio: bool = False
    slave: bool = False
    printing: bool = False
    defaults: dict = attrs.field(factory=dict)   # property -> default (vma.default.*)
    uid_min: int = 1000
    denied_groups: frozenset = DENIED_GROUPS

    @property
    def nx_port(self):
        """The TCP port nxagent listens on: 4000 + display."""
        return 4000 + self.display

    @property
    def printing_port(self):
        return 2000 + self.display


def _truthy(value):
    return str(value).strip().lower() in _TRUE


def fill_props(params, settings):
    """
    The session properties: the x_start params with the user name (default
    C{settings.default_user}), groups and home (always
    C{<home_path>/<user>}) filled in, as the original's C{_fill_props}.

    @raise OptionsError: the user name is not a valid login, or the user,
        its ids or groups would be privileged.
    """
    props = dict(params)
    user = props.get("qvd.vm.user.name") or settings.default_user
    if not _USER.match(user) or len(user) > 32:
        raise OptionsError(
            f"qvd.vm.user.name {user!r} is not a valid user name "
            "(letters, digits, '_', '.', '-'; starting with a letter or '_')")
    if user == "root":
        raise OptionsError("qvd.vm.user.name 'root': a session never runs as root")
    props["qvd.vm.user.name"] = user
    if not props.get("qvd.vm.user.groups"):
        props["qvd.vm.user.groups"] = settings.default_groups
    for key in ("qvd.vm.user.uid", "qvd.vm.user.gid"):
        value = props.get(key)
        if value in (None, ""):
            continue
        if not str(value).isdigit() or int(value) < settings.uid_min:
            raise OptionsError(
                f"{key} {value!r} is not an ordinary id (a number from "
                f"{settings.uid_min} up, vma.user.uid.min)")
    group = props.get("qvd.vm.user.group") or user
    groups = [g for g in "".join(str(props["qvd.vm.user.groups"]).split()).split(",") if g]
    for name in [group] + groups:
        if not _USER.match(name) or len(name) > 32:
            raise OptionsError(f"group {name!r} of the session user is not a valid group name")
        if name in settings.denied_groups:
            raise OptionsError(
                f"group {name!r} is privileged: a session user never gets it "
                "(vma.user.groups.denied)")
    props["qvd.vm.user.home"] = f"{settings.home_path.rstrip('/')}/{user}"
    return props


def nxagent_options(props, settings, cookie=None):
    """
    The one line of the nxagent options file, e.g.
    C{nx/nx,keyboard=pc105/es,client=linux,link=lan,geometry=1024x768,fullscreen=0,tolerancechecks=risky:100}.
    With C{cookie} (32 hex digits, from the L7R) the line starts
    C{nx/nx,cookie=<cookie>,}: nxagent then refuses an NX connection whose
    greeting does not carry it.

    @raise OptionsError: a value has characters outside C{[\\w/\\-\\+]},
        the cookie is not 32 hex digits, or the client's extra options try
        to set the cookie.
    """
    options = ["nx/nx"]
    if cookie is not None:
        if not valid_cookie(cookie):
            raise OptionsError(f"{COOKIE_PARAM} is not 32 hex digits (length {len(str(cookie))})")
        options.append(f"cookie={cookie}")
    for prop, option in PROPS_TO_NX:
        value = props.get(prop)
        if value is None or value == "":
            value = settings.defaults.get(prop, "")
        value = str(value)
        if value == "":
            continue
        if not _VALUE.match(value):
            raise OptionsError(
                f"invalid characters in parameter {prop}: {value!r} "
                "(allowed: letters, digits, '_', '/', '-', '+')")
        options.append(f"{option}={value}")
    if settings.audio:
        options.append("media=1")
    if settings.slave:
        options.append("slave=1")
    options.append("tolerancechecks=risky")
    extra = props.get("qvd.client.nxagent.extra_args") or ""
    for item in (i.strip() for i in str(extra).split(",")):
        if not item:
            continue
        if not _EXTRA.match(item):
            raise OptionsError(
                f"invalid option in qvd.client.nxagent.extra_args: {item!r} "
                "(expected name=value, value of letters, digits, '_', '/', '-', '+')")
        if item.split("=", 1)[0] in CLIENT_DENIED_OPTIONS:
            raise OptionsError(
                f"qvd.client.nxagent.extra_args may not set {item.split('=', 1)[0]!r}: "
                "the node sets the session's cookie, listener, files and channels")
        options.append(item)
    if settings.printing and _truthy(props.get("qvd.client.printing.enabled", "0")):
        channel = "smb" if props.get("qvd.client.os") == "windows" else "cups"
        options.append(f"{channel}={settings.printing_port}")
    return ",".join(options) + f":{settings.display}"


def hook_arguments(props, *extra):
    """
    The argument list of a hook: every property as C{key value}, sorted, then
    C{extra} (e.g. C{"qvd.hook.on_action", "connect"}), all text.
    """
    args = []
    for key in sorted(props):
        value = props[key]
        args += [str(key), "" if value is None else str(value)]
    return args + [str(e) for e in extra]
