"""
User provisioning before a session starts (reference 3.3, step 1).

    provisioner = Provisioner(runner, host, ProvisioningSettings(...), hooks)
    yield provisioner.provision(props, on_work=machine.provisioning)

What it does, in order, each step only when needed (C{on_work} is called
once, before the first step that changes the machine):
  1. the home (C{qvd.vm.user.home}) does not exist: the C{mount_home} hook;
     without one, if the home drive (C{/dev/vdb}) exists and the home path is
     still on the root file system, partition it (C{echo , | sfdisk}) and
     make a file system on it the first time (no C{<drive>1} yet), then mount
     it on the home path;
  2. the user does not exist: the C{add_user} hook (then C{after_add_user}),
     or C{groupadd [-g gid] group} (its failure only warned: the group may
     exist), C{groupadd} of each missing supplementary group, and C{useradd -m -d home -g group -s shell [-G groups] [-u uid]
     user}, then C{after_add_user}; if that fails the user and group are
     removed again and the error says which command failed.

Everything runs through an L{ICommandRunner} and looks at the machine through
an L{IHost}, so tests never touch the host's users.
"""

import attrs
from twisted.internet import defer
from qvd.logs import Logger

from qvd.vma.options import hook_arguments

log = Logger()


class ProvisioningError(Exception):
    """Provisioning failed; the message says which step and why."""


@attrs.frozen
class ProvisioningSettings:
    home_path: str = "/home"
    home_drive: str = "/dev/vdb"
    home_fs: str = "ext4"
    shell: str = "/bin/bash"
    groupadd: str = "groupadd"
    useradd: str = "useradd"
    userdel: str = "userdel"
    groupdel: str = "groupdel"
    sfdisk: str = "sfdisk"
    mount: str = "mount"
    hooks: dict = attrs.field(factory=dict)    # mount_home/add_user/after_add_user -> path
    hook_timeout: float = 120.0


class Provisioner:

    def __init__(self, runner, host, settings):
        self._runner = runner
        self._host = host
        self._settings = settings

    @defer.inlineCallbacks
    def _hook(self, action, props):
        """Run provisioning hook C{action} if configured; C{True} if it ran."""
        path = self._settings.hooks.get(action)
        if not path:
            return False
        args = hook_arguments(props, "qvd.hook.on_provisioning", action)
        result = yield self._runner.run([path] + args, timeout=self._settings.hook_timeout)
        if not result.ok:
            raise ProvisioningError(
                f"provisioning hook {action} ({path}) failed with exit code {result.rc}: "
                f"{result.output.strip()[-300:]}")
        return True

    @defer.inlineCallbacks
    def _must(self, argv, what, stdin=b""):
        result = yield self._runner.run(argv, stdin=stdin, timeout=self._settings.hook_timeout)
        if not result.ok:
            raise ProvisioningError(
                f"{what}: {' '.join(argv)} failed with exit code {result.rc}: "
                f"{result.output.strip()[-300:]}")
        return result

    @defer.inlineCallbacks
    def provision(self, props, on_work=lambda: None):
        """
        Make sure user C{props["qvd.vm.user.name"]} and its home exist.

        @return: a Deferred firing when done, failing with L{ProvisioningError}.
        """
        user = props["qvd.vm.user.name"]
        home = props["qvd.vm.user.home"]
        working = []

        def work():
            if not working:
                working.append(True)
                on_work()

        if not self._host.path_exists(home):
            work()
            if not (yield self._hook("mount_home", props)):
                yield self._mount_home_drive()
        if not self._host.user_exists(user):
            work()
            if (yield self._hook("add_user", props)):
                yield self._hook("after_add_user", props)
            else:
                yield self._add_user(props)

    @defer.inlineCallbacks
    def _mount_home_drive(self):
        s = self._settings
        drive = s.home_drive
        if not drive or not self._host.path_exists(drive):
            log.debug("no home drive: homes live on the root file system")
            return
        if not self._host.same_filesystem("/", s.home_path):
            log.debug("{path} is already a mount of its own", path=s.home_path)
            return
        partition = drive + "1"
        if not self._host.path_exists(partition):
            log.info("partitioning {drive} and making {fs} on {p}", drive=drive,
                     fs=s.home_fs, p=partition)
            yield self._must([s.sfdisk, drive], "creating the partition table of the home drive",
                             stdin=b",\n")
            yield self._must([f"mkfs.{s.home_fs}", partition],
                             "creating the file system of the home drive")
        yield self._must([s.mount, partition, s.home_path], "mounting the home drive")

    @defer.inlineCallbacks
    def _add_user(self, props):
        s = self._settings
        user = props["qvd.vm.user.name"]
        group = props.get("qvd.vm.user.group") or user
        gid = props.get("qvd.vm.user.gid")
        uid = props.get("qvd.vm.user.uid")
        groups = "".join((props.get("qvd.vm.user.groups") or "").split())
        group_args = [s.groupadd] + (["-g", str(gid)] if gid else []) + [group]
        result = yield self._runner.run(group_args, timeout=s.hook_timeout)
        if not result.ok:
            log.warn("provisioning of group {group!r} failed (it may exist): {out}",
                     group=group, out=result.output.strip())
        for extra in [g for g in groups.split(",") if g]:
            if not self._host.group_exists(extra):
                result = yield self._runner.run([s.groupadd, extra], timeout=s.hook_timeout)
                if not result.ok:
                    log.warn("creating group {group!r} failed: {out}",
                             group=extra, out=result.output.strip())
        user_args = [s.useradd, "-m", "-d", props["qvd.vm.user.home"], "-g", group,
                     "-s", s.shell]
        if groups:
            user_args += ["-G", groups]
        if uid:
            user_args += ["-u", str(uid)]
        user_args.append(user)
        try:
            yield self._must(user_args, f"provisioning of user {user!r}")
            yield self._hook("after_add_user", props)
        except Exception:
            log.warn("removing user and group {user!r} after failed provisioning", user=user)
            yield self._runner.run([s.userdel, "-rf", user], timeout=s.hook_timeout)
            yield self._runner.run([s.groupdel, user], timeout=s.hook_timeout)
            raise
