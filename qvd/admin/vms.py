"""
qvd-admin commands for VMs: creation with an address and a MAC, start and
stop commands for the nodes, user disconnects, blocking, expiration, deletion
(with its home and disks on the shared storage, L{qvd.admin.storage}).
"""

import datetime
import random
import re

from qvd.admin._core import (
    DIGITS, VM_SELECT, VM_STATES, AdminError, AlreadyExists, Result, UsageError, find_host,
    find_osf, find_user, find_vm, one)
from qvd.addresses import AddressError, VMRange, mac_for_ip
from qvd.admin.storage import remove_vm_files_after_commit


def vm_add(ctx, cur, args):
    if DIGITS.match(args.name):
        raise UsageError(f"VM name {args.name!r} is only digits, which select VMs by id: "
                         "choose a name with a letter")
    user = find_user(ctx, cur, args.user)
    osf = find_osf(ctx, cur, args.osf, tenant_id=user["tenant_id"])
    if one(cur, "SELECT 1 FROM vms WHERE name = %s AND user_id = %s", (args.name, user["id"])):
        raise AlreadyExists(f"user {user['login']!r} already has a VM named {args.name!r}")
    tag = args.di_tag or "default"
    if not one(cur, "SELECT 1 FROM di_tags WHERE osf_id = %s AND tag = %s", (osf["id"], tag)):
        cur.execute("SELECT string_agg(tag, ', ' ORDER BY tag) AS tags FROM di_tags "
                    "WHERE osf_id = %s", (osf["id"],))
        tags = cur.fetchone()["tags"]
        raise AdminError(
            f"OSF {osf['name']!r} has no DI tagged {tag!r} "
            + (f"(its tags: {tags})" if tags else "(it has no DI yet: add one with "
               f"'qvd-admin di add --osf {osf['name']} FILE')"))
    cfg = ctx.db_config(cur)
    cur.execute("SELECT host(ip) AS ip FROM vms")
    used = [r["ip"] for r in cur.fetchall()]
    try:
        vm_range = VMRange.from_config(cfg.get("vm.network.ip.start"),
                                       cfg.get("vm.network.netmask"))
        ip = vm_range.check(args.ip, used) if args.ip else vm_range.allocate(used)
        mac = mac_for_ip(cfg.get("vm.network.mac.prefix"), ip)
    except AddressError as e:
        raise AdminError(str(e))
    row = one(cur, "INSERT INTO vms (name, user_id, osf_id, di_tag, ip, mac, description) "
                   "VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING id",
              (args.name, user["id"], osf["id"], tag, ip, mac, args.description))
    vm_id = row["id"]
    cur.execute("INSERT INTO vm_runtimes (vm_id, vm_state, user_state) "
                "VALUES (%s, 'stopped', 'disconnected')", (vm_id,))
    cur.execute("INSERT INTO vm_counters (vm_id) VALUES (%s)", (vm_id,))
    ctx.audit(cur, "vm_create", "create", "vm", vm_id, args.name, user["tenant_id"],
              {"user": user["login"], "osf": osf["name"], "di_tag": tag, "ip": ip})
    return Result(f"VM {args.name!r} added (id {vm_id}) for user {user['login']!r}: "
                  f"ip {ip}, mac {mac}, OSF {osf['name']!r}, DI tag {tag!r}",
                  data={"id": vm_id, "name": args.name, "ip": ip, "mac": mac,
                        "user": user["login"], "osf": osf["name"], "di_tag": tag})


def vm_list(ctx, cur, args):
    scope = ctx.scope(cur)
    where, params = ["true"], []
    if scope is not None:
        where.append("u.tenant_id = %s")
        params.append(scope)
    if args.user:
        where.append("v.user_id = %s")
        params.append(find_user(ctx, cur, args.user)["id"])
    if args.state:
        if args.state not in VM_STATES:
            raise UsageError(f"--state {args.state!r} is not a VM state: use one of "
                             + ", ".join(VM_STATES))
        where.append("r.vm_state = %s")
        params.append(args.state)
    if args.host:
        where.append("r.host_id = %s")
        params.append(find_host(cur, args.host)["id"])
    if args.osf:
        where.append("v.osf_id = %s")
        params.append(find_osf(ctx, cur, args.osf)["id"])
    cur.execute(VM_SELECT + " WHERE " + " AND ".join(where) + " ORDER BY v.id", params)
    return Result(rows=cur.fetchall(),
                  columns=["id", "name", "login", "tenant", "osf", "di_tag", "ip", "vm_state",
                           "vm_cmd", "host", "user_state", "blocked"])


def vm_start(ctx, cur, args):
    from qvd import loadbalancer
    from qvd.runtime import store
    vm = find_vm(ctx, cur, args.vm)
    if vm["vm_state"] != "stopped":
        raise AdminError(f"VM {vm['name']!r} is {vm['vm_state']}, not stopped: nothing to start")
    if vm["vm_cmd"] == "start":
        raise AdminError(f"VM {vm['name']!r} already has a pending start (on host "
                         f"{vm['host']!r}): wait for it")
    if vm["vm_cmd"] is not None:
        raise AdminError(f"VM {vm['name']!r} has a pending {vm['vm_cmd']!r} command: "
                         "wait for its node to handle it")
    if vm["blocked"]:
        raise AdminError(f"VM {vm['name']!r} is blocked: 'qvd-admin vm unblock' it first")
    host_id, host = vm["host_id"], vm["host"]
    if host_id is None:
        cfg = ctx.db_config(cur)
        try:
            chosen = store.run_blocking(store.place_in(
                store.BlockingCursor(cur), vm["id"], vm["name"],
                loadbalancer.weights_from_config(cfg, vm["tenant_id"]),
                ctx.random or random.random))
        except (loadbalancer.NoHostAvailable, loadbalancer.UnknownImageKind) as e:
            raise AdminError(str(e))
        host_id, host = chosen.host_id, chosen.name
    if store.run_blocking(store.start_vm_in(store.BlockingCursor(cur), vm["id"], host_id)) is None:
        raise AdminError(f"VM {vm['name']!r} changed state meanwhile: try again")
    ctx.audit(cur, "vm_start", "exec", "vm", vm["id"], vm["name"], vm["tenant_id"],
              {"host": host})
    return Result(f"VM {vm['name']!r} will start on host {host!r}",
                  data={"id": vm["id"], "host": host, "host_id": host_id})


def vm_stop(ctx, cur, args):
    from qvd.runtime import store
    vm = find_vm(ctx, cur, args.vm)
    ex = store.BlockingCursor(cur)
    if vm["vm_state"] == "stopped":
        if vm["vm_cmd"] != "start":
            raise AdminError(f"VM {vm['name']!r} is already stopped")
        if store.run_blocking(store.cancel_start_in(ex, vm["id"])) is None:
            raise AdminError(f"VM {vm['name']!r} changed state meanwhile: try again")
        message = f"pending start of VM {vm['name']!r} cancelled"
    elif vm["vm_state"] in ("starting", "running", "debugging"):
        if vm["vm_cmd"] == "stop":
            raise AdminError(f"VM {vm['name']!r} already has a pending stop")
        if store.run_blocking(store.send_vm_cmd_in(ex, vm["id"], "stop", store.STOPPABLE)) is None:
            raise AdminError(f"VM {vm['name']!r} changed state meanwhile: try again")
        message = f"VM {vm['name']!r} will stop (host {vm['host']!r})"
    else:
        raise AdminError(f"VM {vm['name']!r} is {vm['vm_state']}: it cannot be stopped now")
    ctx.audit(cur, "vm_stop", "exec", "vm", vm["id"], vm["name"], vm["tenant_id"])
    return Result(message, data={"id": vm["id"]})


def vm_disconnect(ctx, cur, args):
    vm = find_vm(ctx, cur, args.vm)
    if vm["user_state"] not in ("connecting", "connected"):
        raise AdminError(f"no user is connected to VM {vm['name']!r} "
                         f"(user state {vm['user_state']})")
    from qvd.runtime import store
    store.run_blocking(store.abort_session_in(store.BlockingCursor(cur), vm["id"]))
    ctx.audit(cur, "vm_user_disconnect", "exec", "vm", vm["id"], vm["name"], vm["tenant_id"])
    return Result(f"user of VM {vm['name']!r} will be disconnected", data={"id": vm["id"]})


def _vm_block(ctx, cur, args, blocked):
    vm = find_vm(ctx, cur, args.vm)
    cur.execute("UPDATE vm_runtimes SET blocked = %s WHERE vm_id = %s", (blocked, vm["id"]))
    ctx.audit(cur, "vm_update", "update", "vm", vm["id"], vm["name"], vm["tenant_id"],
              {"blocked": blocked})
    return Result(f"VM {vm['name']!r} {'blocked' if blocked else 'unblocked'}",
                  data={"id": vm["id"], "blocked": blocked})


def vm_block(ctx, cur, args):
    return _vm_block(ctx, cur, args, True)


def vm_unblock(ctx, cur, args):
    return _vm_block(ctx, cur, args, False)


_RELATIVE = re.compile(r"^\+(\d+)([smhd])$")


def parse_time(text, option, now=None):
    """
    An expiration time: ISO 8601 (local time when no zone), C{+N[smhd]}
    from now, or C{none} to clear.
    """
    if text.lower() == "none":
        return None
    now = now or datetime.datetime.now(datetime.timezone.utc)
    match = _RELATIVE.match(text)
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return now + datetime.timedelta(**{unit: int(match.group(1))})
    try:
        value = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a time: give ISO 8601 like "
                         "2026-12-31T18:00, a delay like +2h, or none")
    if value.tzinfo is None:
        value = value.astimezone()
    return value


def vm_expire(ctx, cur, args):
    if args.soft is None and args.hard is None:
        raise UsageError("give --soft and/or --hard (a time, +N[smhd] or none)")
    vm = find_vm(ctx, cur, args.vm)
    soft = parse_time(args.soft, "--soft") if args.soft is not None else vm["vm_expiration_soft"]
    hard = parse_time(args.hard, "--hard") if args.hard is not None else vm["vm_expiration_hard"]
    if soft is not None and hard is not None and soft > hard:
        raise UsageError(f"the soft expiration {soft.isoformat()} is after the hard one "
                         f"{hard.isoformat()}: the soft one must come first")
    cur.execute("UPDATE vm_runtimes SET vm_expiration_soft = %s, vm_expiration_hard = %s "
                "WHERE vm_id = %s", (soft, hard, vm["id"]))
    ctx.audit(cur, "vm_update", "update", "vm", vm["id"], vm["name"], vm["tenant_id"],
              {"expiration_soft": soft, "expiration_hard": hard})
    fmt = lambda t: t.isoformat(timespec="seconds") if t else "none"  # noqa: E731
    return Result(f"VM {vm['name']!r} expires softly at {fmt(soft)}, hard at {fmt(hard)}",
                  data={"id": vm["id"], "soft": soft, "hard": hard})


def vm_del(ctx, cur, args):
    vm = find_vm(ctx, cur, args.vm)
    if vm["vm_state"] != "stopped" or vm["vm_cmd"] is not None:
        what = (vm["vm_state"] if vm["vm_state"] != "stopped"
                else f"stopped with a pending {vm['vm_cmd']}")
        raise AdminError(f"VM {vm['name']!r} is {what}: stop it first with 'qvd-admin vm stop'")
    cur.execute("DELETE FROM vms WHERE id = %s", (vm["id"],))
    remove_vm_files_after_commit(ctx, cur, vm["id"])
    ctx.audit(cur, "vm_delete", "delete", "vm", vm["id"], vm["name"], vm["tenant_id"])
    return Result(f"VM {vm['name']!r} deleted", data={"id": vm["id"]})
