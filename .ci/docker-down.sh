#!/usr/bin/env bash
# Stop what .ci/docker-up.sh started: the registry, dockerd (and its containers), their mounts,
# the NAT rule and the bridge; delete the engine's data. Safe to run twice, or after a failed
# docker-up. Keeps $DOCKER_CI_DIR/cache (the stand-in base image) unless given --purge.
set -uo pipefail

D=${DOCKER_CI_DIR:-/tmp/trainer-docker-ci}
[[ -d $D ]] || exit 0

stop() { # stop PIDFILE: SIGTERM, up to 30 s, then SIGKILL
    local pid
    [[ -s $1 ]] || return 0
    pid=$(cat "$1")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 150); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.2
        done
        kill -9 "$pid" 2>/dev/null
    fi
    rm -f "$1"
}

stop "$D/warm-registry.pid"
stop "$D/registry.pid"
stop "$D/dockerd.pid"

# What dockerd leaves mounted under its roots (netns, overlay layers), deepest first.
awk -v d="$D" 'index($2, d "/") == 1 {print $2}' /proc/self/mounts | sort -r | while read -r mnt; do
    umount "$mnt" 2>/dev/null || umount -l "$mnt"
done

if command -v iptables >/dev/null; then
    rule=(POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE)
    while iptables -t nat -C "${rule[@]}" 2>/dev/null; do
        iptables -t nat -D "${rule[@]}"
    done
fi
if [[ -s $D/ip_forward.saved ]]; then
    sysctl -qw "net.ipv4.ip_forward=$(cat "$D/ip_forward.saved")"
fi
if [[ -e $D/created-docker0 ]]; then
    ip link delete docker0 2>/dev/null
fi

keep=cache
[[ ${1:-} == --purge ]] && keep=
find "$D" -mindepth 1 -maxdepth 1 ! -name "${keep:-/}" -exec rm -rf {} +
[[ -n $keep ]] || rmdir "$D"
echo "docker-down: stopped" >&2
