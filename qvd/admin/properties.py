"""
qvd-admin commands: Custom properties of users, VMs, hosts, OSFs and DIs.
"""

from qvd import config as qconfig
from qvd.admin._core import (
    AdminError, Result, find_di, find_host, find_osf, find_user, find_vm, one)


def _property_target(ctx, cur, obj, ref):
    """(object id, tenant id, name) of the object a property belongs to."""
    if obj == "user":
        u = find_user(ctx, cur, ref)
        return u["id"], u["tenant_id"], u["login"]
    if obj == "vm":
        v = find_vm(ctx, cur, ref)
        return v["id"], v["tenant_id"], v["name"]
    if obj == "host":
        h = find_host(cur, ref)
        return h["id"], qconfig.GLOBAL_TENANT, h["name"]
    if obj == "osf":
        o = find_osf(ctx, cur, ref)
        return o["id"], o["tenant_id"], o["name"]
    d = find_di(ctx, cur, ref)
    return d["id"], d["tenant_id"], d["path"]


def prop_set(ctx, cur, args):
    obj_id, tenant_id, name = _property_target(ctx, cur, args.object, args.ref)
    row = one(cur, "SELECT id FROM properties_list WHERE key = %s AND tenant_id = %s "
                   "AND qvd_object = %s", (args.key, tenant_id, args.object))
    if row is None:
        row = one(cur, "INSERT INTO properties_list (key, tenant_id, qvd_object) "
                       "VALUES (%s, %s, %s) RETURNING id", (args.key, tenant_id, args.object))
    table, column = f"{args.object}_properties", f"{args.object}_id"
    cur.execute(f"INSERT INTO {table} ({column}, property_id, value) VALUES (%s, %s, %s) "
                f"ON CONFLICT ({column}, property_id) DO UPDATE SET value = EXCLUDED.value",
                (obj_id, row["id"], args.value))
    ctx.audit(cur, f"{args.object}_update", "update", args.object, obj_id, name,
              None if tenant_id == qconfig.GLOBAL_TENANT else tenant_id,
              {"__properties_changes__": {"set": {args.key: args.value}}})
    return Result(f"{args.object} {name!r}: {args.key} = {args.value}",
                  data={"id": obj_id, "key": args.key, "value": args.value})


def prop_del(ctx, cur, args):
    obj_id, tenant_id, name = _property_target(ctx, cur, args.object, args.ref)
    table, column = f"{args.object}_properties", f"{args.object}_id"
    cur.execute(f"DELETE FROM {table} p USING properties_list l WHERE l.id = p.property_id "
                f"AND p.{column} = %s AND l.key = %s RETURNING p.value", (obj_id, args.key))
    if cur.fetchone() is None:
        raise AdminError(f"{args.object} {name!r} has no property {args.key!r}")
    ctx.audit(cur, f"{args.object}_update", "update", args.object, obj_id, name,
              None if tenant_id == qconfig.GLOBAL_TENANT else tenant_id,
              {"__properties_changes__": {"delete": [args.key]}})
    return Result(f"{args.object} {name!r}: property {args.key} removed", data={"id": obj_id})


def prop_list(ctx, cur, args):
    table, column = f"{args.object}_properties", f"{args.object}_id"
    where, params = "true", []
    if args.ref:
        obj_id, _, _ = _property_target(ctx, cur, args.object, args.ref)
        where, params = f"p.{column} = %s", [obj_id]
    elif args.object != "host":
        scope = ctx.scope(cur)
        if scope is not None:
            where, params = "l.tenant_id IN (%s, -1)", [scope]
    cur.execute(f"SELECT p.{column} AS id, l.key, p.value FROM {table} p "
                f"JOIN properties_list l ON l.id = p.property_id WHERE {where} "
                f"ORDER BY p.{column}, l.key", params)
    return Result(rows=cur.fetchall(), columns=["id", "key", "value"])
