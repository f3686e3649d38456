"""
qvd-admin, the administrator's command line (reference 7.2, the scope of the
original's qa/qa4), working directly on the database.

    qvd-admin [--config FILE] [--tenant NAME] [--json] OBJECT VERB [ARGS]
    qvd-admin user add alice --password secret
    qvd-admin vm add --user alice --osf desktop desk-1
    qvd-admin vm start desk-1

L{qvd.admin.cli} parses the command line and prints; L{qvd.admin.commands}
holds one function per command, each run inside one serializable transaction;
L{qvd.addresses} (shared with the L7R's auto-provisioning) allocates VM addresses.
"""
