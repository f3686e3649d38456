#!/usr/bin/env bash
# Bring up a single qvd node on this machine, as root: the embedded database,
# a sample tenant with a user and a minimal LXC desktop, the HKD and the L7R;
# then connect a headless client to the desktop and save a screenshot.
#
#   deploy/up.sh            # idempotent: run it again to (re)start what is down
#
# Settings (environment): QVD_DEMO_NET (default 10.241.0), QVD_DEMO_DESKTOP
# (minimal|xfce|mate|gnome, default minimal), QVD_CONFIG (default /etc/qvd/node.conf).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=$("$here/deploy/setup.sh" | tail -1)
export PATH="$bin:$PATH"
"$here/deploy/services.sh"

conf=${QVD_CONFIG:-/etc/qvd/node.conf}
net=${QVD_DEMO_NET:-10.241.0}
desktop=${QVD_DEMO_DESKTOP:-minimal}
node=$(hostname)
say() { printf '\033[1mqvd-up:\033[0m %s\n' "$*"; }

# 1. The node's configuration.
if [ ! -e "$conf" ]; then
    mkdir -p "$(dirname "$conf")"
    cat >"$conf" <<CONF
# qvd node configuration, written by deploy/up.sh (docs/config.md lists every key)
nodename = $node
vm.hypervisor = lxc
vm.network.bridge = qvdnet
vm.network.ip.start = $net.100
vm.network.netmask = 255.255.255.0
vm.lxc.bridge.address = $net.1/24
CONF
    say "wrote $conf"
fi
admin() { qvd-admin --config "$conf" --exist-ok "$@"; }

# 2. The database (private cluster under /var/lib/qvd/db) and the sample.
qvd-admin --config "$conf" db init
admin host add "$node" "$net.1" >/dev/null
admin tenant add demo >/dev/null
admin --tenant demo user add alice --password alice >/dev/null
admin --tenant demo osf add desktop --memory 1024 >/dev/null
if ! qvd-admin --config "$conf" --tenant demo --json di list --osf desktop | grep -q '"id"'; then
    image=/var/lib/qvd/storage/staging/qvd-$desktop.tar
    mkdir -p "$(dirname "$image")"
    say "building the $desktop desktop image (the Debian base layer is cached under /var/cache/qvd-di)"
    qvd-di build --desktop "$desktop" -o "$image"
    qvd-admin --config "$conf" --tenant demo di add --osf desktop --version 1 "$image" >/dev/null
fi
admin --tenant demo vm add --user alice --osf desktop alice-desktop >/dev/null

# 3. The daemons (twistd; pid files and logs under /run/qvd and /var/log/qvd).
mkdir -p /run/qvd /var/log/qvd
start() {  # name, twistd plugin arguments...
    local name=$1; shift
    local pidfile=/run/qvd/$name.pid
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        say "$name already runs (pid $(cat "$pidfile"))"
        return
    fi
    rm -f "$pidfile"
    twistd --pidfile "$pidfile" --logfile "/var/log/qvd/$name.log" "$@"
    say "started $name (log /var/log/qvd/$name.log)"
}
start hkd qvd-hkd --config "$conf"
start l7r qvd-l7r --config "$conf" --self-signed
cert=/var/lib/qvd/l7r/ssl/cert.pem
for _ in $(seq 100); do
    [ -s "$cert" ] && python3 - "$node" <<'PY' 2>/dev/null && break
import socket, sys
socket.create_connection((sys.argv[1], 8443), timeout=1).close()
PY
    sleep 0.2
done

# 4. A client: print how to connect, and connect a headless one here.
cat <<MSG

qvd is up on $node: L7R on port 8443, user alice@demo (password alice).
From a desktop machine with nxproxy and qvd-client, copy $cert there and run:

    qvd-client --host $node --ca cert.pem --user alice@demo --password alice connect

MSG
shot=/var/lib/qvd/demo-desktop.png
if [ -z "${DISPLAY:-}" ]; then
    say "no display here: connecting a headless client (Xvfb + nxproxy)"
    qvd-client --host "$node" --ca "$cert" --user alice@demo --password alice \
        connect --headless --screenshot "$shot" --wait 120
    say "screenshot of alice's desktop: $shot"
else
    say "connecting a client to display $DISPLAY"
    qvd-client --host "$node" --ca "$cert" --user alice@demo --password alice connect
fi
