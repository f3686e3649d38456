"""qvd: a Linux VDI server stack, wire-compatible with QVD clients and agents."""

__version__ = "0.1.0"
