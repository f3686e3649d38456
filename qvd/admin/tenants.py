"""
qvd-admin commands: Tenants and administrators.
"""

from qvd.admin._core import (
    AdminError, AlreadyExists, Result, UsageError, find_admin, hash_password, one, split_login,
    tenant_by_name)
from qvd.admin.images import remove_images_after_commit


def tenant_add(ctx, cur, args):
    if args.name in ("-", "*"):
        raise UsageError(f"tenant name {args.name!r} is reserved: choose another")
    if one(cur, "SELECT 1 FROM tenants WHERE name = %s", (args.name,)):
        raise AlreadyExists(f"tenant {args.name!r} already exists: choose another name")
    row = one(cur, "INSERT INTO tenants (name, description) VALUES (%s, %s) RETURNING id",
              (args.name, args.description))
    ctx.audit(cur, "tenant_create", "create", "tenant", row["id"], args.name, row["id"],
              {"description": args.description})
    return Result(f"tenant {args.name!r} added (id {row['id']})",
                  data={"id": row["id"], "name": args.name})


def tenant_list(ctx, cur, args):
    cur.execute("SELECT t.id, t.name, t.blocked, "
                "(SELECT count(*) FROM users u WHERE u.tenant_id = t.id) AS users, "
                "t.description FROM tenants t ORDER BY t.id")
    return Result(rows=cur.fetchall(), columns=["id", "name", "blocked", "users", "description"])


def _tenant_for_change(cur, name):
    t = tenant_by_name(cur, name)
    if t["id"] in (-1, 0):
        raise AdminError(f"tenant {name!r} is built in and cannot be changed")
    return t


def tenant_del(ctx, cur, args):
    t = _tenant_for_change(cur, args.name)
    busy = one(cur, "SELECT count(*) AS n FROM vm_runtimes r JOIN vms v ON v.id = r.vm_id "
                    "JOIN users u ON u.id = v.user_id WHERE u.tenant_id = %s "
                    "AND (r.vm_state <> 'stopped' OR r.vm_cmd IS NOT NULL)", (t["id"],))["n"]
    if busy:
        raise AdminError(f"tenant {args.name!r} has {busy} VM(s) not stopped: stop them first "
                         "('qvd-admin vm list --tenant {0}')".format(args.name))
    cur.execute("DELETE FROM vms WHERE user_id IN (SELECT id FROM users WHERE tenant_id = %s)",
                (t["id"],))
    cur.execute("SELECT d.path FROM dis d JOIN osfs o ON o.id = d.osf_id WHERE o.tenant_id = %s",
                (t["id"],))
    remove_images_after_commit(ctx, [r["path"] for r in cur.fetchall()])
    cur.execute("DELETE FROM tenants WHERE id = %s", (t["id"],))
    ctx.audit(cur, "tenant_delete", "delete", "tenant", t["id"], args.name)
    return Result(f"tenant {args.name!r} deleted", data={"id": t["id"], "name": args.name})


def _tenant_block(ctx, cur, args, blocked):
    t = _tenant_for_change(cur, args.name)
    cur.execute("UPDATE tenants SET blocked = %s WHERE id = %s", (blocked, t["id"]))
    verb = "blocked" if blocked else "unblocked"
    ctx.audit(cur, "tenant_update", "update", "tenant", t["id"], args.name, t["id"],
              {"blocked": blocked})
    return Result(f"tenant {args.name!r} {verb}", data={"id": t["id"], "blocked": blocked})


def tenant_block(ctx, cur, args):
    return _tenant_block(ctx, cur, args, True)


def tenant_unblock(ctx, cur, args):
    return _tenant_block(ctx, cur, args, False)


def admin_add(ctx, cur, args):
    name, tenant = split_login(ctx, args.name)
    t = tenant_by_name(cur, tenant)
    if one(cur, "SELECT 1 FROM administrators WHERE name = %s AND tenant_id = %s",
           (name, t["id"])):
        raise AlreadyExists(f"administrator {name!r} already exists in tenant {tenant!r}")
    row = one(cur, "INSERT INTO administrators (tenant_id, name, password, description) "
                   "VALUES (%s, %s, %s, %s) RETURNING id",
              (t["id"], name, hash_password(args.password), args.description))
    ctx.audit(cur, "administrator_create", "create", "administrator", row["id"], name, t["id"])
    return Result(f"administrator {name!r} added to tenant {tenant!r} (id {row['id']})",
                  data={"id": row["id"], "name": name, "tenant": tenant})


def admin_list(ctx, cur, args):
    scope = ctx.scope(cur)
    cur.execute("SELECT a.id, a.name, t.name AS tenant, a.blocked, a.description "
                "FROM administrators a JOIN tenants t ON t.id = a.tenant_id "
                "WHERE %s IS NULL OR a.tenant_id = %s ORDER BY a.id", (scope, scope))
    return Result(rows=cur.fetchall(), columns=["id", "name", "tenant", "blocked", "description"])


def admin_del(ctx, cur, args):
    a = find_admin(ctx, cur, args.name)
    cur.execute("DELETE FROM administrators WHERE id = %s", (a["id"],))
    ctx.audit(cur, "administrator_delete", "delete", "administrator", a["id"], a["name"],
              a["tenant_id"])
    return Result(f"administrator {a['name']!r} deleted", data={"id": a["id"]})


def admin_passwd(ctx, cur, args):
    a = find_admin(ctx, cur, args.name)
    cur.execute("UPDATE administrators SET password = %s WHERE id = %s",
                (hash_password(args.password), a["id"]))
    ctx.audit(cur, "administrator_update", "update", "administrator", a["id"], a["name"],
              a["tenant_id"], {"password": "***"})
    return Result(f"password of administrator {a['name']!r} changed", data={"id": a["id"]})
