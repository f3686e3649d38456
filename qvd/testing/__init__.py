"""
Fakes and fixtures that qvd's tests (and anyone testing against qvd) share.
"""
