"""
qvd-admin commands for OSFs and their disk images (DIs), whose files live in
path.storage.images.
"""

import datetime
import os
import shutil

from qvd.admin._core import (
    AdminError, AlreadyExists, Result, UsageError, find_di, find_osf, one, tenant_by_name)


def _check_size(value, what):
    if value is not None and value < 0:
        raise UsageError(f"{what} must not be negative, got {value}")


def osf_add(ctx, cur, args):
    t = tenant_by_name(cur, ctx.tenant_name())
    if t["id"] == 0:
        raise UsageError("OSFs cannot belong to the supertenant '*': choose a tenant with "
                         "--tenant, or '-' for an OSF common to every tenant")
    if one(cur, "SELECT 1 FROM osfs WHERE name = %s AND tenant_id = %s", (args.name, t["id"])):
        raise AlreadyExists(f"OSF {args.name!r} already exists in tenant {t['name']!r}")
    cfg = ctx.db_config(cur)
    memory = args.memory if args.memory is not None else cfg.getint("osf.default.memory", t["id"])
    if memory <= 0:
        raise UsageError(f"--memory must be a positive number of MB, got {memory}")
    _check_size(args.user_storage, "--user-storage")
    overlay = args.overlay if args.overlay is not None else cfg.getbool("osf.default.overlay",
                                                                        t["id"])
    application = (args.application if args.application is not None
                   else cfg.getbool("osf.default.is_application", t["id"]))
    row = one(cur, "INSERT INTO osfs (tenant_id, name, memory, use_overlay, is_application, "
                   "user_storage_size, description) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                   "RETURNING *", (t["id"], args.name, memory, overlay, application,
                                    args.user_storage, args.description))
    ctx.audit(cur, "osf_create", "create", "osf", row["id"], args.name, t["id"],
              {"memory": memory, "use_overlay": overlay, "is_application": application,
               "user_storage_size": args.user_storage})
    return Result(f"OSF {args.name!r} added (id {row['id']}, {memory} MB)", data=dict(row))


def osf_list(ctx, cur, args):
    scope = ctx.scope(cur)
    cur.execute("SELECT o.id, o.name, t.name AS tenant, o.memory, o.use_overlay AS overlay, "
                "o.user_storage_size AS user_storage, o.is_application AS application, "
                "(SELECT count(*) FROM dis d WHERE d.osf_id = o.id) AS dis, "
                "(SELECT count(*) FROM vms v WHERE v.osf_id = o.id) AS vms "
                "FROM osfs o JOIN tenants t ON t.id = o.tenant_id "
                "WHERE %s IS NULL OR o.tenant_id IN (%s, -1) ORDER BY o.id", (scope, scope))
    return Result(rows=cur.fetchall(), columns=["id", "name", "tenant", "memory", "overlay",
                                                "user_storage", "application", "dis", "vms"])


def osf_del(ctx, cur, args):
    o = find_osf(ctx, cur, args.name)
    used = one(cur, "SELECT count(*) AS n FROM vms WHERE osf_id = %s", (o["id"],))["n"]
    if used:
        raise AdminError(f"OSF {o['name']!r} is used by {used} VM(s): delete them or move them "
                         "to another OSF first")
    cur.execute("SELECT path FROM dis WHERE osf_id = %s", (o["id"],))
    images = [r["path"] for r in cur.fetchall()]
    cur.execute("DELETE FROM osfs WHERE id = %s", (o["id"],))
    remove_images_after_commit(ctx, images)
    ctx.audit(cur, "osf_delete", "delete", "osf", o["id"], o["name"], o["tenant_id"])
    return Result(f"OSF {o['name']!r} deleted" + (f" with {len(images)} DI(s)" if images else ""),
                  data={"id": o["id"]})


def osf_set(ctx, cur, args):
    o = find_osf(ctx, cur, args.name)
    changes = {}
    if args.new_name is not None:
        if one(cur, "SELECT 1 FROM osfs WHERE name = %s AND tenant_id = %s AND id <> %s",
               (args.new_name, o["tenant_id"], o["id"])):
            raise AdminError(f"OSF {args.new_name!r} already exists in this tenant")
        changes["name"] = args.new_name
    if args.memory is not None:
        if args.memory <= 0:
            raise UsageError(f"--memory must be a positive number of MB, got {args.memory}")
        changes["memory"] = args.memory
    if args.user_storage is not None:
        _check_size(args.user_storage, "--user-storage")
        changes["user_storage_size"] = args.user_storage or None
    if args.overlay is not None:
        changes["use_overlay"] = args.overlay
    if args.application is not None:
        changes["is_application"] = args.application
    if args.description is not None:
        changes["description"] = args.description
    if not changes:
        raise UsageError("nothing to change: give --memory, --overlay/--no-overlay, "
                         "--user-storage, --application/--desktop, --name or --description")
    sets = ", ".join(f"{column} = %s" for column in changes)
    cur.execute(f"UPDATE osfs SET {sets} WHERE id = %s", list(changes.values()) + [o["id"]])
    ctx.audit(cur, "osf_update", "update", "osf", o["id"], o["name"], o["tenant_id"], changes)
    summary = ", ".join(f"{k}={v}" for k, v in changes.items())
    return Result(f"OSF {o['name']!r} changed: {summary}",
                  data={"id": o["id"], **changes})


def _images_dir(ctx):
    return ctx.config.get("path.storage.images")


def remove_images_after_commit(ctx, names):
    images = _images_dir(ctx)
    for name in names:
        ctx.after_commit(lambda path=os.path.join(images, name): os.unlink(path))


def _default_version(cur, osf_id):
    today = datetime.date.today().isoformat()
    n = 0
    while True:
        version = f"{today}-{n:03d}"
        if not one(cur, "SELECT 1 FROM dis WHERE osf_id = %s AND version = %s", (osf_id, version)):
            return version
        n += 1


def stage_image(ctx, path):
    """
    Copy the image C{path} next to its final place before the transaction, so
    the transaction only links it. Returns the staged path.
    """
    from qvd.loadbalancer import UnknownImageKind, di_hypervisor
    try:
        di_hypervisor(os.path.basename(path))
    except UnknownImageKind as e:
        raise UsageError(str(e))
    if not os.path.isfile(path):
        raise UsageError(f"disk image {path!r} does not exist or is not a file")
    images = _images_dir(ctx)
    try:
        os.makedirs(images, exist_ok=True)
    except OSError as e:
        raise AdminError(f"cannot create the image directory {images} ({e.strerror}): "
                         "check path.storage.images")
    staged = os.path.join(images, f".incoming-{os.getpid()}-{os.path.basename(path)}")
    try:
        shutil.copyfile(path, staged)
    except OSError as e:
        try:
            os.unlink(staged)
        except OSError:
            pass
        raise AdminError(f"cannot copy disk image {path!r} to {images}: {e.strerror}")
    return staged


def di_add(ctx, cur, args):
    o = find_osf(ctx, cur, args.osf)
    version = args.version or _default_version(cur, o["id"])
    if one(cur, "SELECT 1 FROM dis WHERE osf_id = %s AND version = %s", (o["id"], version)):
        raise AlreadyExists(f"OSF {o['name']!r} already has a DI of version {version!r}: "
                         "give another --version")
    if one(cur, "SELECT 1 FROM di_tags WHERE osf_id = %s AND tag = %s", (o["id"], version)):
        raise AdminError(f"version {version!r} is already a tag in OSF {o['name']!r}: "
                         "give another --version")
    row = one(cur, "SELECT nextval(pg_get_serial_sequence('dis', 'id')) AS id")
    di_id = row["id"]
    name = f"{di_id}-{os.path.basename(args.file)}"
    final = os.path.join(_images_dir(ctx), name)
    if os.path.exists(final):
        raise AdminError(f"image file {final} already exists and belongs to no DI of this "
                         "database: move it away")
    os.link(args.staged, final)
    ctx.on_rollback(lambda: os.unlink(final))
    cur.execute("INSERT INTO dis (id, osf_id, path, version, description) "
                "VALUES (%s, %s, %s, %s, %s)", (di_id, o["id"], name, version, args.description))
    cur.execute("INSERT INTO di_runtimes (di_id, state) VALUES (%s, 'published')", (di_id,))
    cur.execute("INSERT INTO di_tags (di_id, osf_id, tag, fixed) VALUES (%s, %s, %s, true)",
                (di_id, o["id"], version))
    cur.execute("DELETE FROM di_tags WHERE osf_id = %s AND tag = 'head'", (o["id"],))
    cur.execute("INSERT INTO di_tags (di_id, osf_id, tag) VALUES (%s, %s, 'head')",
                (di_id, o["id"]))
    tags = [version, "head"]
    if not one(cur, "SELECT 1 FROM di_tags WHERE osf_id = %s AND tag = 'default'", (o["id"],)):
        cur.execute("INSERT INTO di_tags (di_id, osf_id, tag) VALUES (%s, %s, 'default')",
                    (di_id, o["id"]))
        tags.append("default")
    ctx.audit(cur, "di_create", "create", "di", di_id, name, o["tenant_id"],
              {"osf": o["name"], "version": version, "file": args.file})
    return Result(f"DI {di_id} added to OSF {o['name']!r}: {name}, tags {', '.join(tags)}",
                  data={"id": di_id, "osf": o["name"], "path": name, "version": version,
                        "tags": tags})


def di_list(ctx, cur, args):
    scope = ctx.scope(cur)
    where, params = ["(%s IS NULL OR o.tenant_id IN (%s, -1))"], [scope, scope]
    if args.osf:
        where.append("d.osf_id = %s")
        params.append(find_osf(ctx, cur, args.osf)["id"])
    cur.execute("SELECT d.id, o.name AS osf, d.version, d.path, d.blocked, "
                "(SELECT string_agg(tag, ',' ORDER BY fixed DESC, tag) FROM di_tags g "
                " WHERE g.di_id = d.id) AS tags "
                "FROM dis d JOIN osfs o ON o.id = d.osf_id WHERE " + " AND ".join(where)
                + " ORDER BY d.id", params)
    return Result(rows=cur.fetchall(), columns=["id", "osf", "version", "path", "blocked", "tags"])


def _check_tag(tag):
    if not tag or not tag.strip() or "," in tag:
        raise UsageError(f"tag {tag!r} is not valid: use a non-empty word without commas")


def di_tag(ctx, cur, args):
    d = find_di(ctx, cur, args.di)
    _check_tag(args.tag)
    existing = one(cur, "SELECT * FROM di_tags WHERE osf_id = %s AND tag = %s",
                   (d["osf_id"], args.tag))
    if existing is not None:
        if existing["di_id"] == d["id"]:
            return Result(f"DI {d['id']} already has tag {args.tag!r}", data={"id": d["id"]})
        if existing["fixed"]:
            raise AdminError(f"tag {args.tag!r} is the fixed version tag of DI "
                             f"{existing['di_id']} and cannot be moved")
        cur.execute("DELETE FROM di_tags WHERE id = %s", (existing["id"],))
    cur.execute("INSERT INTO di_tags (di_id, osf_id, tag) VALUES (%s, %s, %s)",
                (d["id"], d["osf_id"], args.tag))
    ctx.audit(cur, "di_update", "update", "di", d["id"], d["path"], d["tenant_id"],
              {"__tags_changes__": {"create": [args.tag]}})
    moved = f" (moved from DI {existing['di_id']})" if existing else ""
    return Result(f"DI {d['id']} tagged {args.tag!r}{moved}", data={"id": d["id"], "tag": args.tag})


def di_untag(ctx, cur, args):
    d = find_di(ctx, cur, args.di)
    existing = one(cur, "SELECT * FROM di_tags WHERE di_id = %s AND tag = %s",
                   (d["id"], args.tag))
    if existing is None:
        raise AdminError(f"DI {d['id']} has no tag {args.tag!r}: see 'qvd-admin di list'")
    if existing["fixed"]:
        raise AdminError(f"tag {args.tag!r} is the fixed version tag of DI {d['id']} "
                         "and cannot be removed")
    cur.execute("DELETE FROM di_tags WHERE id = %s", (existing["id"],))
    ctx.audit(cur, "di_update", "update", "di", d["id"], d["path"], d["tenant_id"],
              {"__tags_changes__": {"delete": [args.tag]}})
    return Result(f"tag {args.tag!r} removed from DI {d['id']}", data={"id": d["id"]})


def di_del(ctx, cur, args):
    d = find_di(ctx, cur, args.di)
    busy = one(cur, "SELECT count(*) AS n FROM vm_runtimes WHERE current_di_id = %s "
                    "AND vm_state <> 'stopped'", (d["id"],))["n"]
    if busy:
        raise AdminError(f"DI {d['id']} is in use by {busy} VM(s) that are not stopped: "
                         "stop them first")
    cur.execute("SELECT tag FROM di_tags WHERE di_id = %s AND tag IN ('head', 'default')",
                (d["id"],))
    movable = [r["tag"] for r in cur.fetchall()]
    cur.execute("DELETE FROM dis WHERE id = %s", (d["id"],))
    newest = one(cur, "SELECT id FROM dis WHERE osf_id = %s ORDER BY id DESC LIMIT 1",
                 (d["osf_id"],))
    if newest is not None:
        for tag in movable:
            cur.execute("INSERT INTO di_tags (di_id, osf_id, tag) VALUES (%s, %s, %s)",
                        (newest["id"], d["osf_id"], tag))
    remove_images_after_commit(ctx, [d["path"]])
    ctx.audit(cur, "di_delete", "delete", "di", d["id"], d["path"], d["tenant_id"])
    return Result(f"DI {d['id']} ({d['path']}) deleted", data={"id": d["id"]})


def _di_block(ctx, cur, args, blocked):
    d = find_di(ctx, cur, args.di)
    cur.execute("UPDATE dis SET blocked = %s WHERE id = %s", (blocked, d["id"]))
    ctx.audit(cur, "di_update", "update", "di", d["id"], d["path"], d["tenant_id"],
              {"blocked": blocked})
    return Result(f"DI {d['id']} {'blocked' if blocked else 'unblocked'}",
                  data={"id": d["id"], "blocked": blocked})


def di_block(ctx, cur, args):
    return _di_block(ctx, cur, args, True)


def di_unblock(ctx, cur, args):
    return _di_block(ctx, cur, args, False)
