"""
What goes into an LXC disk image, as pure values: no I/O but reading the qvd
source tree to hash it.

    recipe = Recipe.from_config(config, desktop="minimal")
    recipe.base_key()          # names the cached base layer
    recipe.code_files()        # (path in image, mode, bytes) of the qvd layer

The base layer is what mmdebstrap makes from (suite, variant, packages); the
code layer is the qvd package (with its bytecode), the VMA's systemd unit and,
for the minimal desktop, its session script. C{recipe.code_key(source)}
names the code layer: an image is keyed by both.
"""

import ast
import hashlib
import importlib.util
import json
import marshal
import os
import re
import struct
import sys

import attrs

DESKTOPS = ("xfce", "mate", "gnome", "minimal")
#: Bumped when the base layer's hooks change, so cached layers are rebuilt.
BASE_FORMAT = 2
#: Process name of the minimal session's marker (a script: its C{comm}; at
#: most 15 characters, the kernel's limit).
MARKER_NAME = "qvd-test-marker"
VMA_UNIT = "qvd-vma.service"
VMA_SOCKET = "qvd-vma.socket"
DIST_PACKAGES = "usr/lib/python3/dist-packages"

_COLOUR = re.compile(r"^(#[0-9a-fA-F]{3}|#[0-9a-fA-F]{6}|[A-Za-z ]{1,40})$")
_PACKAGE = re.compile(r"^[a-z0-9][a-z0-9+.\-]+(:[a-z0-9]+)?$")


class RecipeError(ValueError):
    """
    A recipe value is wrong; the message names it and says what is accepted.
    """


@attrs.frozen
class Recipe:
    """
    The inputs of one image build.

    @ivar suite: Debian suite (bookworm).
    @ivar variant: mmdebstrap variant (minbase or apt).
    @ivar desktop: one of L{DESKTOPS}.
    @ivar packages: every package of the base layer, sorted, desktop included.
    @ivar colour: root window colour of the minimal desktop.
    """
    suite: str
    variant: str
    desktop: str
    packages: tuple
    colour: str = "#2a7fd4"

    def __attrs_post_init__(self):
        if self.desktop not in DESKTOPS:
            raise RecipeError(
                f"unknown desktop {self.desktop!r}: choose one of {', '.join(DESKTOPS)}")
        if self.variant not in ("minbase", "apt"):
            raise RecipeError(f"unknown variant {self.variant!r}: use minbase or apt")
        if not re.match(r"^[a-z][a-z0-9\-]*$", self.suite):
            raise RecipeError(f"bad suite name {self.suite!r} (e.g. bookworm)")
        for package in self.packages:
            if not _PACKAGE.match(package):
                raise RecipeError(f"bad Debian package name {package!r}")
        if not _COLOUR.match(self.colour):
            raise RecipeError(
                f"bad colour {self.colour!r}: use #rgb, #rrggbb or an X colour name")

    @classmethod
    def from_config(cls, config, desktop, colour=None, extra=()):
        """
        The recipe of C{desktop} from the C{di.build.*} keys of C{config}.
        """
        if desktop not in DESKTOPS:
            raise RecipeError(
                f"unknown desktop {desktop!r}: choose one of {', '.join(DESKTOPS)}")
        packages = (config.getlist("di.build.packages")
                    + config.getlist("di.build.packages.extra")
                    + config.getlist(f"di.build.desktop.{desktop}")
                    + list(extra))
        return cls(
            suite=config.get("di.build.suite"),
            variant=config.get("di.build.variant"),
            desktop=desktop,
            packages=tuple(sorted(set(packages))),
            colour=colour or config.get("di.build.minimal.colour"),
        )

    def base_key(self):
        """
        A short hash naming the base layer of this recipe (suite, variant,
        packages, desktop and the format of the base hooks).
        """
        text = json.dumps([BASE_FORMAT, self.suite, self.variant,
                           self.desktop, list(self.packages)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def base_name(self):
        return f"base-{self.suite}-{self.desktop}-{self.base_key()}.tar"

    def mmdebstrap_argv(self, target):
        """
        The mmdebstrap command building the base layer into C{target} (a
        .tar). No mirror is given: mmdebstrap then uses its default sources
        for the suite.
        """
        return [
            "mmdebstrap",
            f"--variant={self.variant}",
            "--include=" + ",".join(self.packages),
            "--aptopt=Acquire::Languages \"none\"",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--customize-hook=" + BASE_CUSTOMIZE_HOOK,
            self.suite,
            target,
        ]

    def session_script(self):
        """
        The minimal desktop's X session: the marker process (L{MARKER_SCRIPT},
        found by tests under the name L{MARKER_NAME}) connects to the X server
        and says so, then the root window is painted the recipe's colour with
        xsetroot. The marker must be connected first: an X server resets (and
        blackens its root) when its last client leaves. The session ends with
        the X server.
        """
        return (
            "#!/bin/sh\n"
            "# qvd minimal test desktop: a coloured root window and a marker.\n"
            f"/usr/local/bin/{MARKER_NAME} |\n"
            f"  {{ read -r connected; xsetroot -solid '{self.colour}'; cat >/dev/null; }}\n"
        )

    def code_files(self, qvd_source, vma_present=None, bytecode=True):
        """
        The files of the code layer: a list of L{ImageFile}.

        @param qvd_source: the directory of the C{qvd} package to copy.
        @param vma_present: whether C{qvd.vma} can be run (C{python3 -m
            qvd.vma}); looked up in C{qvd_source} when None.
        @param bytecode: with each module's bytecode (L{bytecode_file}).
        """
        if vma_present is None:
            vma_present = os.path.exists(os.path.join(qvd_source, "vma", "__main__.py"))
        files = []
        for path, data in _package_files(qvd_source):
            files.append(ImageFile(f"{DIST_PACKAGES}/qvd/{path}", 0o644, data))
            if bytecode and path.endswith(".py"):
                compiled = bytecode_file(f"{DIST_PACKAGES}/qvd/{path}", data)
                if compiled is not None:
                    files.append(compiled)
        files.append(ImageFile(f"etc/systemd/system/{VMA_UNIT}", 0o644,
                               vma_unit(vma_present).encode()))
        files.append(ImageFile(
            f"etc/systemd/system/multi-user.target.wants/{VMA_UNIT}", 0o777,
            link=f"/etc/systemd/system/{VMA_UNIT}"))
        if vma_present:
            files.append(ImageFile(f"etc/systemd/system/{VMA_SOCKET}", 0o644,
                                   VMA_SOCKET_UNIT.encode()))
            files.append(ImageFile(
                f"etc/systemd/system/sockets.target.wants/{VMA_SOCKET}", 0o777,
                link=f"/etc/systemd/system/{VMA_SOCKET}"))
        files.append(ImageFile("etc/qvd/vma.conf", 0o644, VMA_CONF.encode()))
        files.append(ImageFile("etc/qvd/di.json", 0o644, json.dumps({
            "suite": self.suite, "variant": self.variant, "desktop": self.desktop,
            "packages": list(self.packages), "base": self.base_key(),
            "qvd": source_hash(qvd_source),
        }, indent=1).encode()))
        if self.desktop == "minimal":
            files.append(ImageFile("usr/local/bin/qvd-minimal-session", 0o755,
                                   self.session_script().encode()))
            files.append(ImageFile(f"usr/local/bin/{MARKER_NAME}", 0o755,
                                   MARKER_SCRIPT.encode()))
            files.append(ImageFile("usr/bin/x-session-manager", 0o777,
                                   link="/usr/local/bin/qvd-minimal-session"))
        return files

    def code_key(self, qvd_source, vma_present=None):
        """
        A short hash naming the code layer of this recipe: every file of it
        (path, mode, link, content: the qvd package, the unit, the session
        scripts, the colour), and the bytecode's Python version.
        """
        digest = hashlib.sha256(importlib.util.MAGIC_NUMBER)
        for item in self.code_files(qvd_source, vma_present, bytecode=False):
            digest.update(json.dumps([item.path, item.mode, item.link]).encode() + b"\0"
                          + hashlib.sha256(item.data).digest())
        return digest.hexdigest()[:16]


def bytecode_file(path, source):
    """
    The L{ImageFile} of module C{path}'s bytecode for the Python running
    this (C{__pycache__/<name>.<cache tag>.pyc}), checked-hash (PEP 552): an
    image's python3 of the same version loads it instead of compiling the
    module at every boot (a desktop's upper layer starts empty), after
    checking it against the source; another version does not look for it.
    None when this Python has no bytecode cache.
    """
    tag = sys.implementation.cache_tag
    if tag is None:
        return None
    directory, name = os.path.split(path)
    code = compile(source, "/" + path, "exec", dont_inherit=True)
    data = (importlib.util.MAGIC_NUMBER + struct.pack("<I", 0b11)
            + importlib.util.source_hash(source) + marshal.dumps(code))
    return ImageFile(f"{directory}/__pycache__/{name[:-3]}.{tag}.pyc", 0o644, data)


@attrs.frozen
class ImageFile:
    """
    One file of the code layer: a regular file (C{data}) or a symlink (C{link}).
    """
    path: str
    mode: int
    data: bytes = b""
    link: str | None = None


#: Units a container does not need (the node's kernel, devices, file systems
#: and clock are not the desktop's) that slow its boot: masked in the base
#: layer; a KVM guest unmasks them (L{qvd.di.qcow2}).
CONTAINER_MASKED_UNITS = (
    "systemd-udevd.service", "systemd-udev-trigger.service",
    "systemd-hwdb-update.service", "systemd-modules-load.service",
    "sys-kernel-config.mount", "sys-kernel-debug.mount", "sys-kernel-tracing.mount",
    "getty@tty1.service",
    # the node's sysctls; static device nodes (LXC makes /dev); fstab remounts;
    # kernel crash dumps; ext4 scrubbing and TRIM of the node's disks
    "systemd-sysctl.service", "systemd-tmpfiles-setup-dev.service",
    "systemd-remount-fs.service", "systemd-pstore.service",
    "e2scrub_reap.service", "e2scrub_all.timer", "fstrim.timer",
    # boot records in utmp/wtmp; system users (made when the image is built)
    "systemd-update-utmp.service", "systemd-update-utmp-runlevel.service",
    "systemd-sysusers.service",
)
#: systemd generators a container does not need (encrypted, integrity and
#: verity disks, GPT auto-mounts, resume from hibernation, offline updates).
CONTAINER_MASKED_GENERATORS = (
    "systemd-cryptsetup-generator", "systemd-gpt-auto-generator",
    "systemd-hibernate-resume-generator", "systemd-integritysetup-generator",
    "systemd-veritysetup-generator", "systemd-system-update-generator",
)
#: Units no desktop needs, container or VM: a desktop of a shared DI does not
#: update itself (its changes are thrown away; a new DI version does that).
DESKTOP_MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer", "dpkg-db-backup.timer")

# Runs in mmdebstrap's customize phase ($1 is the new root).
BASE_CUSTOMIZE_HOOK = (
    'ln -sfn /var/lib/xkb "$1/usr/share/X11/xkb/compiled"; '
    'rm -f "$1/etc/hostname" "$1/etc/machine-id" "$1/var/lib/dbus/machine-id"; '
    'touch "$1/etc/machine-id"; '
    'mkdir -p "$1/etc/qvd" "$1/var/log/qvd" "$1/etc/systemd/system-generators"; '
    'for u in ' + " ".join(CONTAINER_MASKED_UNITS + DESKTOP_MASKED_UNITS) + '; do '
    'ln -sfn /dev/null "$1/etc/systemd/system/$u"; done; '
    'for g in ' + " ".join(CONTAINER_MASKED_GENERATORS) + '; do '
    'ln -sfn /dev/null "$1/etc/systemd/system-generators/$g"; done'
)

MARKER_SCRIPT = """\
#!/usr/bin/python3
# qvd minimal test desktop marker: holds a connection to the X server of
# $DISPLAY (so the server does not reset), prints "connected" once it has
# one, and exits when the server goes away.
import sys

from Xlib import X, display, error

try:
    connection = display.Display()
except error.DisplayError as e:
    sys.exit(f"qvd-test-marker: {e}")
connection.screen().root.change_attributes(event_mask=X.PropertyChangeMask)
connection.sync()
print("connected", flush=True)
try:
    while True:
        connection.next_event()
except (error.ConnectionClosedError, OSError):
    pass
"""

VMA_CONF = """\
# qvd VMA configuration (Java-properties). The image builder writes this
# default; the HKD does not change it.
"""


#: The agent's port, listened on by systemd from the first moment of the boot
#: and handed to the agent (L{qvd.vma.__main__.socket_from_systemd}): the
#: node's first ping waits there for the agent instead of being refused. It
#: is vma.address and vma.port of the default configuration (an image that
#: changes them changes this unit too).
VMA_SOCKET_UNIT = """\
[Unit]
Description=qvd VM agent (VMA) port
DefaultDependencies=no
Before=sockets.target shutdown.target
Conflicts=shutdown.target

[Socket]
ListenStream=0.0.0.0:3030
Backlog=50

[Install]
WantedBy=sockets.target
"""


def vma_unit(vma_present=True):
    """
    The systemd unit that runs the VMA at boot. Without a C{qvd.vma} module
    in the image it is a placeholder that says so and exits.
    """
    if vma_present:
        command = "/usr/bin/python3 -m qvd.vma --config /etc/qvd/vma.conf"
    else:
        command = "/bin/sh -c 'echo qvd-vma: qvd.vma is not in this image >&2'"
    return f"""\
[Unit]
Description=qvd VM agent (VMA)
# Started as soon as systemd runs, not after sysinit.target and basic.target:
# the desktop answers its node sooner. The agent waits for the boot to finish
# before it starts a session (vma.boot.wait.command).
DefaultDependencies=no
After=network.target
Conflicts=shutdown.target
Before=shutdown.target

[Service]
ExecStart={command}
Restart=on-failure
RestartSec=1

[Install]
WantedBy=multi-user.target
"""


#: Where the code of a desktop image starts: the agent's package. The image
#: gets it and the qvd modules it imports, nothing of the L7R, HKD or CLI.
AGENT_PACKAGE = "vma"


def _module_file(qvd_source, name):
    """The file of module C{name} (C{qvd.x.y}) under C{qvd_source}, or None."""
    base = os.path.join(qvd_source, *name.split(".")[1:])
    if os.path.isdir(base):
        init = os.path.join(base, "__init__.py")
        return init if os.path.exists(init) else None
    return base + ".py" if os.path.exists(base + ".py") else None


def agent_modules(qvd_source):
    """
    The qvd modules the agent needs: every module of C{qvd.vma} and,
    transitively, every qvd module one of them imports (at any level of the
    code, so lazy imports count), with their packages.
    """
    agent = os.path.join(qvd_source, AGENT_PACKAGE)
    todo = [f"qvd.{AGENT_PACKAGE}"] + [
        f"qvd.{AGENT_PACKAGE}.{name[:-3]}" for name in os.listdir(agent)
        if name.endswith(".py") and name != "__init__.py"]
    found = {}
    while todo:
        name = todo.pop()
        if name in found:
            continue
        path = _module_file(qvd_source, name)
        if path is None:
            continue        # "from qvd.x import name" where name is not a module
        found[name] = path
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.split(".")[0] == "qvd"]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                    and node.module.split(".")[0] == "qvd":
                todo.append(node.module)
                todo += [f"{node.module}.{a.name}" for a in node.names]
    return found


def _package_files(qvd_source):
    """
    (relative path, bytes) of every file of the qvd package that goes into
    a desktop image (L{agent_modules}, and the configuration's declarations
    when the agent reads its configuration), in a stable order.
    """
    modules = agent_modules(qvd_source)
    paths = set(modules.values())
    if "qvd.config" in modules:
        defaults = os.path.join(qvd_source, "config", "defaults")
        paths.update(os.path.join(defaults, name) for name in os.listdir(defaults)
                     if name.endswith(".conf"))
    result = []
    for full in sorted(paths, key=lambda p: os.path.relpath(p, qvd_source)):
        with open(full, "rb") as f:
            result.append((os.path.relpath(full, qvd_source), f.read()))
    return result


def source_hash(qvd_source):
    """
    A short hash of the qvd package files that go into an image.
    """
    digest = hashlib.sha256()
    for path, data in _package_files(qvd_source):
        digest.update(path.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()[:16]
