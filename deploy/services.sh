#!/usr/bin/env bash
# Start the system services qvd needs on this node when they are not running
# (there is no systemd on our machines): virtlogd + libvirtd for KVM desktops,
# glusterd for the shared storage of a cluster (docs/storage.md).
set -euo pipefail
if command -v libvirtd >/dev/null; then
    if ! pgrep -x virtlogd >/dev/null; then virtlogd -d; fi
    if ! pgrep -x libvirtd >/dev/null; then
        libvirtd -d
        for _ in $(seq 50); do [ -S /run/libvirt/libvirt-sock ] && break; sleep 0.1; done
    fi
fi
if command -v glusterd >/dev/null && ! pgrep -x glusterd >/dev/null; then
    glusterd
    for _ in $(seq 50); do gluster --mode=script volume list >/dev/null 2>&1 && break; sleep 0.1; done
fi
