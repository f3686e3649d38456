"""
Sans-IO wire protocols: QVD HTTP-lite (L{qvd.protocols.http}), SimpleRPC, NX.
"""
