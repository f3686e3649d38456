"""
Sans-IO wire protocols: pure code that builds and parses bytes, no sockets.

L{qvd.protocols.simplerpc}: QVD's SimpleRPC (HTTP GET + JSON), spoken by the VMA.

Modules here import only the standard library (the VMA runs them inside desktop
images on Debian's own python3).
"""
