"""
qvd-admin commands: Hosts (nodes).
"""

from qvd.admin._core import (
    AdminError, AlreadyExists, Result, UsageError, find_host, one)
from qvd.runtime import store


def host_add(ctx, cur, args):
    import ipaddress
    try:
        ipaddress.ip_address(args.address)
    except ValueError:
        raise UsageError(f"host address {args.address!r} is not an IP address")
    if one(cur, "SELECT 1 FROM hosts WHERE name = %s", (args.name,)):
        raise AlreadyExists(f"host {args.name!r} already exists")
    other = one(cur, "SELECT name FROM hosts WHERE address = %s", (args.address,))
    if other:
        raise AdminError(f"address {args.address} is already used by host {other['name']!r}")
    row = one(cur, "INSERT INTO hosts (name, address, frontend, backend, description) "
                   "VALUES (%s, %s, %s, %s, %s) RETURNING id",
              (args.name, args.address, args.frontend, args.backend, args.description))
    store.run_blocking(store.add_node_in(store.BlockingCursor(cur), row["id"]))
    ctx.audit(cur, "host_create", "create", "host", row["id"], args.name, None,
              {"address": args.address, "frontend": args.frontend, "backend": args.backend})
    return Result(f"host {args.name!r} added (id {row['id']}, {args.address})",
                  data={"id": row["id"], "name": args.name, "address": args.address})


def host_list(ctx, cur, args):
    cur.execute("SELECT h.id, h.name, h.address, h.frontend, h.backend, r.state, r.blocked, "
                "r.hypervisor, r.ok_ts, "
                "(SELECT count(*) FROM vm_runtimes v WHERE v.host_id = h.id) AS vms "
                "FROM hosts h JOIN host_runtimes r ON r.host_id = h.id ORDER BY h.id")
    return Result(rows=cur.fetchall(), columns=["id", "name", "address", "frontend", "backend",
                                                "state", "blocked", "hypervisor", "ok_ts", "vms"])


def host_del(ctx, cur, args):
    h = find_host(cur, args.name)
    busy = one(cur, "SELECT count(*) AS n FROM vm_runtimes WHERE host_id = %s",
               (h["id"],))["n"]
    if busy:
        raise AdminError(f"host {args.name!r} has {busy} VM(s) bound to it: stop them first")
    cur.execute("DELETE FROM hosts WHERE id = %s", (h["id"],))
    ctx.audit(cur, "host_delete", "delete", "host", h["id"], args.name)
    return Result(f"host {args.name!r} deleted", data={"id": h["id"]})


def _host_block(ctx, cur, args, blocked):
    h = find_host(cur, args.name)
    store.run_blocking(store.block_node_in(store.BlockingCursor(cur), h["id"], blocked))
    ctx.audit(cur, "host_update", "update", "host", h["id"], args.name, None, {"blocked": blocked})
    return Result(f"host {args.name!r} {'blocked' if blocked else 'unblocked'}",
                  data={"id": h["id"], "blocked": blocked})


def host_block(ctx, cur, args):
    return _host_block(ctx, cur, args, True)


def host_unblock(ctx, cur, args):
    return _host_block(ctx, cur, args, False)
