"""
The commands of qvd-admin, one function each, gathered for the command line.

    result = commands.vm_start(ctx, cursor, args)   # inside one serializable transaction

Every command takes the L{Context} (configuration, tenant scope, audit), a
psycopg2 dict cursor inside a serializable transaction and the parsed
arguments; it returns a L{Result} or raises L{AdminError} (refused, exit 1) or
L{UsageError} (bad input, exit 2) with a message for people. A command that
changes something writes one row to the audit table C{log} through
L{Context.audit}. Effects outside the database (image files) are registered
with L{Context.on_rollback} and L{Context.after_commit} so that a failed
command leaves nothing behind. The commands live in one module per object:
L{qvd.admin.tenants} (tenants, administrators), L{qvd.admin.users},
L{qvd.admin.images} (OSFs, DIs), L{qvd.admin.vms}, L{qvd.admin.hosts},
L{qvd.admin.settings} (configuration), L{qvd.admin.properties},
L{qvd.admin.storage} (the shared storage's identity).
"""

from qvd.admin._core import (  # noqa: F401
    OBJECTS_WITH_PROPERTIES, VM_STATES, AdminError, AlreadyExists, Context, Result, UsageError)
from qvd.admin.hosts import host_add, host_block, host_del, host_list, host_unblock  # noqa: F401
from qvd.admin.images import (  # noqa: F401
    di_add, di_block, di_del, di_list, di_tag, di_unblock, di_untag, osf_add, osf_del, osf_list,
    osf_set, stage_image)
from qvd.admin.properties import prop_del, prop_list, prop_set  # noqa: F401
from qvd.admin.settings import (  # noqa: F401
    config_del, config_get, config_set, config_ssl, read_ssl_files)
from qvd.admin.storage import storage_init, storage_show  # noqa: F401
from qvd.admin.tenants import (  # noqa: F401
    admin_add, admin_del, admin_list, admin_passwd, tenant_add, tenant_block, tenant_del,
    tenant_list, tenant_unblock)
from qvd.admin.users import (  # noqa: F401
    user_add, user_block, user_del, user_list, user_passwd, user_unblock)
from qvd.admin.vms import (  # noqa: F401
    parse_time, vm_add, vm_block, vm_del, vm_disconnect, vm_expire, vm_list, vm_start, vm_stop,
    vm_unblock)
