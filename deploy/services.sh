#!/usr/bin/env bash
# Start the system services qvd needs on this node when they are not running
# (there is no systemd on our machines): virtlogd + libvirtd for KVM desktops.
set -euo pipefail
if command -v libvirtd >/dev/null; then
    if ! pgrep -x virtlogd >/dev/null; then virtlogd -d; fi
    if ! pgrep -x libvirtd >/dev/null; then
        libvirtd -d
        for _ in $(seq 50); do [ -S /run/libvirt/libvirt-sock ] && break; sleep 0.1; done
    fi
fi
