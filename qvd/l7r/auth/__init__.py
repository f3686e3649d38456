"""
Authentication of L7R clients: the L{interfaces.IAuthenticator} seam and its
plugins (the default database password check, LDAP, TOTP, auto-provisioning).
"""
