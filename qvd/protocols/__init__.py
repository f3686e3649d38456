"""
Sans-IO wire protocols: pure code that builds and parses bytes, no sockets.

L{qvd.protocols.http}: QVD's HTTP/1.1 "lite" (client <-> L7R).
L{qvd.protocols.simplerpc}: QVD's SimpleRPC (HTTP GET + JSON), spoken by the VMA.

Modules here import only the standard library (the VMA runs them inside desktop
images on Debian's own python3).
"""
