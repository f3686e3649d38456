"""
qvd-admin commands: The configuration in the database (configs, ssl_configs).
"""

from qvd import config as qconfig
from qvd.admin._core import (
    AdminError, Result, UsageError, tenant_by_name)


#: Where the keys of a component that no daemon reads from the database are set.
_READERS = {"vma": "the disk image's /etc/qvd/vma.conf (the VMA reads no database)",
            "client": "the client's ~/.qvd/client.conf",
            "di": "the node file of the machine that builds images (qvd-di)"}


def _config_tenant(ctx, cur):
    if ctx.tenant is None:
        return qconfig.GLOBAL_TENANT, "global"
    t = tenant_by_name(cur, ctx.tenant)
    if t["id"] in (-1, 0):
        return qconfig.GLOBAL_TENANT, "global"
    return t["id"], f"tenant {t['name']!r}"


def _declared(ctx, key):
    declared = ctx.config._declaration(key)
    if declared is None:
        raise UsageError(f"unknown configuration key {key!r}: see docs/config.md "
                         "('python -m qvd.config.docs') for every key")
    return declared


def _takes_effect(declared):
    if declared.scope == "restart":
        return "; takes effect when the daemons restart"
    return "; the daemons apply it within a second"


def config_get(ctx, cur, args):
    tenant_id, _ = _config_tenant(ctx, cur)
    cfg = ctx.db_config(cur)
    tenant = None if tenant_id == qconfig.GLOBAL_TENANT else tenant_id
    if args.key:
        _declared(ctx, args.key)
        try:
            value = cfg.get(args.key, tenant)
        except qconfig.ConfigError as e:
            raise AdminError(str(e))
        source = _source(cfg, args.key, tenant)
        return Result(rows=[{"key": args.key, "value": value, "source": source}],
                      columns=["key", "value", "source"])
    cur.execute("SELECT t.name AS tenant, c.key, c.value FROM configs c "
                "JOIN tenants t ON t.id = c.tenant_id "
                "WHERE c.tenant_id = -1 OR c.tenant_id = %s ORDER BY c.tenant_id, c.key",
                (tenant_id,))
    return Result(rows=cur.fetchall(), columns=["tenant", "key", "value"])


def _source(cfg, key, tenant):
    if tenant is not None and key in cfg.tenants.get(tenant, {}):
        return "database (tenant)"
    if key in cfg.database:
        return "database (global)"
    if key in cfg.node:
        return "node file"
    return "default"


def config_set(ctx, cur, args):
    key, value = args.key, args.value
    declared = _declared(ctx, key)
    if key.startswith("l7r.ssl."):
        raise UsageError(f"configuration key {key!r} cannot be set in the database: set it "
                         "with 'qvd-admin config ssl'")
    if declared.scope == "node":
        where = _READERS.get(declared.component, "the node file (/etc/qvd/node.conf)")
        raise UsageError(f"configuration key {key!r} is never read from the database: set "
                         f"it in {where}")
    tenant_id, where = _config_tenant(ctx, cur)
    cfg = ctx.db_config(cur)
    globals_ = dict(cfg.database)
    tenants = {t: dict(v) for t, v in cfg.tenants.items()}
    if tenant_id == qconfig.GLOBAL_TENANT:
        globals_[key] = value
    else:
        tenants.setdefault(tenant_id, {})[key] = value
    try:
        new = ctx.config.with_database(globals_, tenants)
        new.typed(key, None if tenant_id == qconfig.GLOBAL_TENANT else tenant_id)
    except qconfig.ConfigError as e:
        raise UsageError(f"{e}; nothing was changed")
    cur.execute("INSERT INTO configs (tenant_id, key, value) VALUES (%s, %s, %s) "
                "ON CONFLICT (tenant_id, key) DO UPDATE SET value = EXCLUDED.value",
                (tenant_id, key, value))
    ctx.audit(cur, "config_set", "update", "config", None, key,
              None if tenant_id == qconfig.GLOBAL_TENANT else tenant_id, {"value": value})
    return Result(f"{key} = {value} ({where}){_takes_effect(declared)}",
                  data={"key": key, "value": value, "scope": declared.scope})


def config_del(ctx, cur, args):
    declared = _declared(ctx, args.key)
    tenant_id, where = _config_tenant(ctx, cur)
    cur.execute("DELETE FROM configs WHERE tenant_id = %s AND key = %s RETURNING value",
                (tenant_id, args.key))
    if cur.fetchone() is None:
        raise AdminError(f"configuration key {args.key!r} is not set in the database ({where})")
    ctx.audit(cur, "config_delete", "delete", "config", None, args.key,
              None if tenant_id == qconfig.GLOBAL_TENANT else tenant_id)
    return Result(f"{args.key} removed from the database ({where}){_takes_effect(declared)}",
                  data={"key": args.key, "scope": declared.scope})


def read_ssl_files(args):
    """Read and check the PEM files of 'config ssl' (before the transaction)."""
    texts = {}
    for key, path in (("l7r.ssl.cert", args.cert), ("l7r.ssl.key", args.key),
                      ("l7r.ssl.ca", args.ca), ("l7r.ssl.crl", args.crl)):
        if path is None:
            continue
        try:
            with open(path, encoding="ascii") as f:
                texts[key] = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(f"cannot read {path!r} for {key}: {getattr(e, 'strerror', e)}")
        if "-----BEGIN " not in texts[key]:
            raise UsageError(f"{path!r} is not a PEM file (no '-----BEGIN' line)")
    from OpenSSL import SSL, crypto
    try:
        cert = crypto.load_certificate(crypto.FILETYPE_PEM, texts["l7r.ssl.cert"].encode())
    except crypto.Error:
        raise UsageError(f"{args.cert!r} holds no PEM certificate")
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, texts["l7r.ssl.key"].encode())
    except crypto.Error:
        raise UsageError(
            f"{args.key!r} holds no PEM private key (encrypted keys are not supported)")
    context = SSL.Context(SSL.TLS_METHOD)
    try:
        context.use_certificate(cert)
        context.use_privatekey(key)
        context.check_privatekey()
    except SSL.Error:
        raise UsageError(f"the key {args.key!r} does not belong to the certificate {args.cert!r}")
    return texts


def config_ssl(ctx, cur, args):
    for key, value in args.ssl_texts.items():
        cur.execute("INSERT INTO ssl_configs (key, value) VALUES (%s, %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (key, value))
    ctx.audit(cur, "config_ssl", "update", "config", None, "l7r.ssl",
              None, {"keys": sorted(args.ssl_texts)})
    return Result("SSL certificate and key stored: " + ", ".join(sorted(args.ssl_texts)),
                  data={"keys": sorted(args.ssl_texts)})
