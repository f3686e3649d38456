"""
qvd-admin commands: the shared storage's identity, and the files a deleted
VM leaves on it.

    qvd-admin storage init [--force]   # a storage id in the database and in the marker file
    qvd-admin storage show             # the id, the mount, the marker, the HKD's verdict

C{storage init} runs on a node where the cluster's volume is mounted on
C{path.storage.root}. With no id in the database it makes one and writes it
into both; with one, it writes it into the root's marker when the marker is
missing (a new, empty volume) and refuses to overwrite another id (another
cluster's volume) unless C{--force}. With C{path.storage.shared = 1} it
refuses a root that is not on a shared mount (L{qvd.storage}).
"""

import os
import shutil

import attrs

from qvd import storage
from qvd.admin._core import AdminError, Result, one


def _settings(ctx, cur):
    return storage.StorageSettings.from_config(ctx.db_config(cur))


def storage_init(ctx, cur, args):
    settings = _settings(ctx, cur)
    row = one(cur, "SELECT storage_id FROM storage_identity")
    root_path, mounts, marker = storage.inspect(settings)
    if isinstance(marker, OSError):
        raise AdminError(f"cannot read {os.path.join(settings.root, storage.MARKER)}: "
                         f"{marker.strerror or marker}")
    if settings.shared:
        mount = storage.mount_of(root_path, mounts)
        if mount is None or mount.fstype not in settings.fstypes:
            raise AdminError(str(storage.judge(settings, "-", root_path, mounts, "-")))
    if not os.path.isdir(root_path):
        raise AdminError(f"path.storage.root {settings.root} is not a directory: "
                         "mount the shared volume there (or create it on a single node)")
    if row is None:
        storage_id = storage.new_storage_id()
        cur.execute("INSERT INTO storage_identity (storage_id) VALUES (%s)", (storage_id,))
        did = "created"
    else:
        storage_id = row["storage_id"]
        if marker == storage_id:
            return Result(f"storage {storage_id} already initialised at {settings.root}",
                          data={"storage_id": storage_id, "root": settings.root})
        if marker is not None and not args.force:
            raise AdminError(
                f"{settings.root} holds the marker of another storage ({marker}; the "
                f"database's is {storage_id}): is this the right volume? run 'qvd-admin "
                "storage init --force' to adopt it")
        did = "adopted"
    storage.write_marker(root_path, storage_id)
    ctx.audit(cur, "storage_init", "update", "storage", None, storage_id, None,
              {"root": settings.root, "previous_marker": marker})
    return Result(f"storage {storage_id} {did}: marker written to "
                  f"{os.path.join(settings.root, storage.MARKER)}",
                  data={"storage_id": storage_id, "root": settings.root})


def storage_show(ctx, cur, args):
    settings = _settings(ctx, cur)
    row = one(cur, "SELECT storage_id FROM storage_identity")
    storage_id = row["storage_id"] if row else None
    root_path, mounts, marker = storage.inspect(settings)
    mount = storage.mount_of(root_path, mounts)
    # the verdict the HKD would give with path.storage.shared = 1
    verdict = storage.judge(attrs.evolve(settings, shared=True), storage_id, root_path,
                            mounts, marker)
    data = {"root": settings.root, "shared": settings.shared, "storage_id": storage_id,
            "marker": marker if not isinstance(marker, OSError) else f"error: {marker}",
            "mount": f"{mount.source} on {mount.point} ({mount.fstype})" if mount else None,
            "verdict": "ok" if verdict is None else str(verdict)}
    rows = [{"key": k, "value": v} for k, v in data.items()]
    return Result(rows=rows, columns=["key", "value"], data=data)


def vm_files(config, vm_id):
    """The files of VM C{vm_id} on the shared storage: its home(s) and KVM disks."""
    vm_id = int(vm_id)
    paths = [os.path.join(config.get("path.storage.homefs"), f"{vm_id}-fs"),
             os.path.join(config.get("path.storage.homes"), f"{vm_id}-data.qcow2")]
    overlays = config.get("path.storage.overlays")
    try:
        paths += [os.path.join(overlays, n) for n in sorted(os.listdir(overlays))
                  if n.endswith(f"-{vm_id}-overlay.qcow2")]
    except OSError:
        pass
    return paths


def remove_vm_files_after_commit(ctx, cur, vm_id):
    """
    After the commit, remove what VM C{vm_id} had on the shared storage when
    this machine sees it (the storage check passes); the nodes' sweep removes
    it otherwise, and the node-local overlays anyway.
    """
    config = ctx.db_config(cur)
    settings = storage.StorageSettings.from_config(config)
    row = one(cur, "SELECT storage_id FROM storage_identity")
    if storage.problem(settings, row["storage_id"] if row else None) is not None:
        return

    def remove():
        for path in vm_files(config, vm_id):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.unlink(path)
    ctx.after_commit(remove)
