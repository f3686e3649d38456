"""
The C{auto} plugin: auto-provisioning of users and their VM (reference 2.1).

After another plugin of the chain accepted the credentials (typically
C{l7r.auth.plugins = auto,ldap}), C{after_authenticate_basic} makes sure that,
in the user's tenant:

- the C{users} row exists (created without a password, so only the external
  directory can let that user in);
- the user has a VM of OSF C{auth.auto.osf_id}; if not, VM C{<login>-<n>} is
  created (first n in 1..C{auth.auto.max_vms} whose name is free) with
  C{di_tag = auth.auto.di_tag}, an address from the VM range and the MAC
  derived from it (L{qvd.addresses}, as qvd-admin does), plus its C{vm_runtimes} and C{vm_counters}.

Everything happens in one serializable transaction, retried on conflicts, so
two simultaneous first logins create one user and one VM.
"""

from qvd.logs import Logger

from qvd.addresses import AddressError, VMRange, mac_for_ip
from qvd.db.pool import fetch_dicts
from qvd.l7r.auth.plugin import AuthConfigError, Plugin

log = Logger()

NAME_MAX = 64


def vm_name(login, n):
    """
    The name of a user's n-th auto-provisioned VM, within C{vms.name}'s 64
    characters.
    """
    suffix = f"-{n}"
    return login[:NAME_MAX - len(suffix)] + suffix


class AutoPlugin(Plugin):
    name = "auto"

    async def after_authenticate_basic(self, ctx):
        osf_id = ctx.config.getint("auth.auto.osf_id", tenant=ctx.tenant_id)
        if osf_id <= 0:
            raise AuthConfigError(
                "the auto plugin needs auth.auto.osf_id: set it to the id of the OSF "
                f"of the VMs to create for tenant {ctx.tenant_id}")
        settings = dict(
            osf_id=osf_id,
            di_tag=ctx.cfg("auth.auto.di_tag"),
            max_vms=ctx.config.getint("auth.auto.max_vms", tenant=ctx.tenant_id),
            start=ctx.config.get("vm.network.ip.start"),
            netmask=ctx.config.get("vm.network.netmask"),
            mac_prefix=ctx.config.get("vm.network.mac.prefix"))
        created = await self.db.transaction(self._provision, ctx.login, ctx.tenant_id,
                                            **settings)
        user_id, vm = created
        ctx.user_id = user_id
        if vm is not None:
            log.info("auto-provisioned VM {name} ({ip}) for user {login} of tenant {tenant}",
                     name=vm[0], ip=vm[1], login=ctx.login, tenant=ctx.tenant_id)

    async def _provision(self, cursor, login, tenant_id, osf_id, di_tag, max_vms, start,
                         netmask, mac_prefix):
        await cursor.execute("SELECT id FROM users WHERE login = %s AND tenant_id = %s",
                             (login, tenant_id))
        rows = cursor.fetchall()
        if rows:
            user_id = rows[0][0]
        else:
            await cursor.execute(
                "INSERT INTO users (login, tenant_id) VALUES (%s, %s) RETURNING id",
                (login, tenant_id))
            user_id = cursor.fetchall()[0][0]
        await cursor.execute("SELECT name, osf_id FROM vms WHERE user_id = %s", (user_id,))
        vms = fetch_dicts(cursor)
        if any(v["osf_id"] == osf_id for v in vms):
            return user_id, None
        await cursor.execute("SELECT tenant_id FROM osfs WHERE id = %s", (osf_id,))
        osf = cursor.fetchall()
        if not osf or osf[0][0] != tenant_id:
            raise AuthConfigError(
                f"auth.auto.osf_id={osf_id} is not an OSF of tenant {tenant_id}; set it to "
                "one of that tenant's OSFs (per-tenant configuration)")
        names = {v["name"] for v in vms}
        name = next((vm_name(login, n) for n in range(1, max_vms + 1)
                     if vm_name(login, n) not in names), None)
        if name is None:
            raise AuthConfigError(
                f"cannot auto-provision a VM for {login}: names {login}-1..{max_vms} are "
                "taken (auth.auto.max_vms)")
        await cursor.execute("SELECT host(ip) FROM vms")
        try:
            ip = VMRange.from_config(start, netmask).allocate(
                used=[r[0] for r in cursor.fetchall()])
            mac = mac_for_ip(mac_prefix, ip)
        except AddressError as e:
            raise AuthConfigError(f"cannot auto-provision a VM for {login}: {e}")
        await cursor.execute(
            "INSERT INTO vms (name, user_id, osf_id, di_tag, ip, mac)"
            " VALUES (%s, %s, %s, %s, %s, %s) RETURNING id",
            (name, user_id, osf_id, di_tag, str(ip), mac))
        vm_id = cursor.fetchall()[0][0]
        await cursor.execute("INSERT INTO vm_runtimes (vm_id) VALUES (%s)", (vm_id,))
        await cursor.execute("INSERT INTO vm_counters (vm_id) VALUES (%s)", (vm_id,))
        return user_id, (name, str(ip))
