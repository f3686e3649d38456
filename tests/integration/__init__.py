"""Integration tests: real PostgreSQL, LXC, libvirt/QEMU, nxagent/nxproxy."""
