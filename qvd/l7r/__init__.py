"""
The L7R: qvd's front door (TLS, QVD client protocol, authentication, broker, NX relay).
"""
