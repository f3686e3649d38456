"""
qvd-admin commands: Users.
"""

from qvd.admin._core import (
    AdminError, AlreadyExists, Result, UsageError, find_user, hash_password, normalize_login,
    one, split_login, tenant_by_name)


def user_add(ctx, cur, args):
    login, tenant = split_login(ctx, args.login)
    login = normalize_login(ctx.config, login)
    if not login:
        raise UsageError("the login is empty")
    t = tenant_by_name(cur, tenant)
    if t["id"] in (-1, 0):
        raise AdminError(f"users cannot belong to the built-in tenant {tenant!r}")
    if one(cur, "SELECT 1 FROM users WHERE login = %s AND tenant_id = %s", (login, t["id"])):
        raise AlreadyExists(f"user {login!r} already exists in tenant {tenant!r}: "
                         "choose another login")
    password = hash_password(args.password) if args.password is not None else None
    row = one(cur, "INSERT INTO users (tenant_id, login, password, description) "
                   "VALUES (%s, %s, %s, %s) RETURNING id",
              (t["id"], login, password, args.description))
    ctx.audit(cur, "user_create", "create", "user", row["id"], login, t["id"],
              {"description": args.description})
    return Result(f"user {login!r} added to tenant {tenant!r} (id {row['id']})",
                  data={"id": row["id"], "login": login, "tenant": tenant})


def user_list(ctx, cur, args):
    scope = ctx.scope(cur)
    where, params = ["true"], []
    if scope is not None:
        where.append("u.tenant_id = %s")
        params.append(scope)
    if args.blocked:
        where.append("u.blocked")
    cur.execute("SELECT u.id, u.login, t.name AS tenant, u.blocked, "
                "(SELECT count(*) FROM vms v WHERE v.user_id = u.id) AS vms, u.description "
                "FROM users u JOIN tenants t ON t.id = u.tenant_id WHERE "
                + " AND ".join(where) + " ORDER BY u.id", params)
    return Result(rows=cur.fetchall(),
                  columns=["id", "login", "tenant", "blocked", "vms", "description"])


def user_del(ctx, cur, args):
    u = find_user(ctx, cur, args.login)
    busy = one(cur, "SELECT string_agg(v.name, ', ') AS names FROM vms v "
                    "JOIN vm_runtimes r ON r.vm_id = v.id WHERE v.user_id = %s "
                    "AND (r.vm_state <> 'stopped' OR r.vm_cmd IS NOT NULL)", (u["id"],))["names"]
    if busy:
        raise AdminError(f"user {u['login']!r} has VMs that are not stopped ({busy}): "
                         "stop them first with 'qvd-admin vm stop'")
    cur.execute("DELETE FROM users WHERE id = %s", (u["id"],))
    ctx.audit(cur, "user_delete", "delete", "user", u["id"], u["login"], u["tenant_id"])
    return Result(f"user {u['login']!r} deleted", data={"id": u["id"]})


def user_passwd(ctx, cur, args):
    u = find_user(ctx, cur, args.login)
    cur.execute("UPDATE users SET password = %s WHERE id = %s",
                (hash_password(args.password), u["id"]))
    ctx.audit(cur, "user_update", "update", "user", u["id"], u["login"], u["tenant_id"],
              {"password": "***"})
    return Result(f"password of user {u['login']!r} changed", data={"id": u["id"]})


def _user_block(ctx, cur, args, blocked):
    u = find_user(ctx, cur, args.login)
    cur.execute("UPDATE users SET blocked = %s WHERE id = %s", (blocked, u["id"]))
    ctx.audit(cur, "user_update", "update", "user", u["id"], u["login"], u["tenant_id"],
              {"blocked": blocked})
    return Result(f"user {u['login']!r} {'blocked' if blocked else 'unblocked'}",
                  data={"id": u["id"], "blocked": blocked})


def user_block(ctx, cur, args):
    return _user_block(ctx, cur, args, True)


def user_unblock(ctx, cur, args):
    return _user_block(ctx, cur, args, False)
