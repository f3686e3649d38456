#!/usr/bin/env bash
# Idempotent setup of a qvd node on Debian 12, as root: system packages, a
# virtualenv with qvd installed in it (editable), and the runtime directories.
#
#   deploy/setup.sh            # everything
#   QVD_VENV=/opt/qvd deploy/setup.sh
#
# Prints the path of the virtualenv's bin directory last.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${QVD_VENV:-$here/.venv}
stamp_dir=/var/cache/qvd-setup
mkdir -p "$stamp_dir"

log() { printf 'qvd-setup: %s\n' "$*" >&2; }

# 1. System packages: only when the list changed since the last successful run
#    or a package is missing.
pkgs=$(grep -v '^\s*#' "$here/deploy/apt-packages.txt" | awk 'NF {print $1}')
missing=$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' $pkgs 2>/dev/null \
          | awk '$2 != "installed" {print $1}'; \
          for p in $pkgs; do dpkg-query -W "$p" >/dev/null 2>&1 || echo "$p"; done)
missing=$(echo "$missing" | sort -u | tr '\n' ' ')
if [ -n "${missing// /}" ]; then
    log "installing system packages: $missing"
    export DEBIAN_FRONTEND=noninteractive
    # slapd must not configure a system directory of its own: tests run their own.
    echo 'slapd slapd/no_configuration boolean true' | debconf-set-selections
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $missing >"$stamp_dir/apt.log" 2>&1 \
        || { tail -30 "$stamp_dir/apt.log" >&2; exit 1; }
fi
# Debian starts daemons on install where it can; qvd starts what it needs itself.
for svc in slapd postgresql haproxy; do service "$svc" stop >/dev/null 2>&1 || true; done

# nxagent's keyboard compiler wants this directory (MACHINE-NOTES.md, NX).
if [ ! -e /usr/share/X11/xkb/compiled ]; then
    mkdir -p /var/lib/xkb && ln -s /var/lib/xkb /usr/share/X11/xkb/compiled
fi
# libvirt's kvm domains need /dev/kvm as root:kvm 0660 (MACHINE-NOTES.md).
if [ -e /dev/kvm ] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm || true
fi

# LXC desktops run in a user namespace (vm.lxc.idmap.*): root delegates the
# containers' id range to itself (lxc-usernsexec, lxc-checkconfig and the
# shadow tools read these files). Appended once, never duplicated.
for f in /etc/subuid /etc/subgid; do
    touch "$f"
    grep -qx 'root:1000000:65536' "$f" || echo 'root:1000000:65536' >>"$f"
done

# 2. The virtualenv, from the Python on PATH (3.11).
py=${QVD_PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
    log "creating virtualenv $venv"
    "$py" -m venv "$venv"
fi
req_hash=$(cat "$here/requirements.txt" "$here/setup.py" | sha256sum | cut -c1-16)
if [ "$(cat "$venv/.qvd-req" 2>/dev/null)" != "$req_hash" ]; then
    log "installing Python packages into $venv"
    "$venv/bin/pip" install -q -r "$here/requirements.txt"
    "$venv/bin/pip" install -q --no-deps --config-settings editable_mode=compat -e "$here"
    echo "$req_hash" >"$venv/.qvd-req"
fi
# twistd finds plugins in twisted/plugins of the source tree (editable install).
"$venv/bin/python" -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))' 2>/dev/null || true

echo "$venv/bin"
