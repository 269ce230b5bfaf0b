#!/usr/bin/env bash
# Start what the Docker tests need on a CI machine that has none of it (run as root):
#   - a Docker engine (Debian's docker.io) on a private socket and data root, its containers
#     reaching the package index through a NAT rule;
#   - a stand-in for the Dockerfile's base image, built here because there is no registry to
#     pull from: Debian (debootstrap) + Python + the pinned CPU torch + the host's CA bundle,
#     so that, like the real PyTorch image, it has `python`, `pip` and torch at the pin;
#   - a local registry (Debian's docker-registry) on 127.0.0.1 for the push test.
#
# Idempotent: whatever already runs is reused. Writes the variables the tests need to
# $DOCKER_CI_DIR/env (DOCKER_HOST, BASE_IMAGE, DOCKER_REGISTRY, REQUIRE_DOCKER=1):
#
#   .ci/docker-up.sh && . "${DOCKER_CI_DIR:-/tmp/trainer-docker-ci}/env"
#   ...
#   .ci/docker-down.sh
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
D=${DOCKER_CI_DIR:-/tmp/trainer-docker-ci}
SUITE=bookworm # its python3 (3.11) matches the host's, whose pip fetches the torch wheel
TORCH_PIN=$(sed -n 's/^torch==\([^ ;#]*\).*/\1/p' "$ROOT/constraints.txt")
BASE_IMAGE=trainer-stand-in-base:torch$TORCH_PIN
DOCKER=/usr/bin/docker # Debian's client, the daemon's own version
export DOCKER_HOST=unix://$D/docker.sock

log() { echo "docker-up: $*" >&2; }
alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
engine_answers() { "$DOCKER" info >/dev/null 2>&1; }
wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@"; do
        if ((SECONDS > deadline)); then
            log "$what did not come up"
            return 1
        fi
        sleep 0.2
    done
}

install_packages() {
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v docker-registry >/dev/null || missing+=(docker-registry)
    command -v iptables >/dev/null || missing+=(iptables)
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
    # Nothing may start services from package scripts: dockerd runs below, on its own socket.
    local policy=/usr/sbin/policy-rc.d added=
    if [[ ! -e $policy ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >"$D/apt.log" 2>&1 || { tail -n 30 "$D/apt.log" >&2; return 1; }
    [[ -z $added ]] || rm -f "$policy"
}

start_engine() {
    if alive "$D/dockerd.pid" && engine_answers; then
        return 0
    fi
    log "starting dockerd on $DOCKER_HOST"
    ip link show docker0 >/dev/null 2>&1 || touch "$D/created-docker0"
    # dockerd turns IP forwarding on: remember how it was, for docker-down.sh.
    [[ -e $D/ip_forward.saved ]] || cat /proc/sys/net/ipv4/ip_forward >"$D/ip_forward.saved"
    # setsid and all three streams redirected: otherwise the CI runner waits for it forever.
    setsid dockerd --data-root "$D/data" --exec-root "$D/exec" --pidfile "$D/dockerd.pid" \
        -H "$DOCKER_HOST" --storage-driver overlay2 --iptables=false --ip6tables=false \
        </dev/null >"$D/dockerd.log" 2>&1 &
    wait_for 60 dockerd engine_answers || { tail -n 30 "$D/dockerd.log" >&2; return 1; }
    # Containers (and builds) reach the package index through NAT; dockerd was told not to
    # touch iptables, so the one rule it needs is added here and removed by docker-down.sh.
    sysctl -qw net.ipv4.ip_forward=1
    local rule=(POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE)
    iptables -t nat -C "${rule[@]}" 2>/dev/null || iptables -t nat -A "${rule[@]}"
}

build_stand_in() {
    if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
        return 0
    fi
    local tarball=$D/cache/stand-in-$SUITE-torch$TORCH_PIN.tar
    if [[ ! -s $tarball ]]; then
        log "building the stand-in base image (debootstrap $SUITE + python3 + torch $TORCH_PIN)"
        local rootfs=$D/rootfs mirror
        rm -rf "$rootfs" && mkdir -p "$D/cache"
        mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
        debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
            "$SUITE" "$rootfs" "${mirror:-http://deb.debian.org/debian}" >"$D/debootstrap.log" 2>&1 \
            || { tail -n 30 "$D/debootstrap.log" >&2; return 1; }
        # Trust what the host trusts (a TLS-inspecting proxy on the way to the package index).
        cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
        cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
        # The pinned torch, the CPU build here where the real base has its CUDA build.
        mkdir -p "$rootfs/tmp/wheels"
        python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.11 \
            --dest "$rootfs/tmp/wheels" "torch==$TORCH_PIN"
        local wheel
        wheel=$(cd "$rootfs/tmp/wheels" && echo torch-*.whl)
        chroot "$rootfs" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            HOME=/root PIP_BREAK_SYSTEM_PACKAGES=1 python -m pip install --quiet --no-cache-dir \
            --disable-pip-version-check --root-user-action=ignore "/tmp/wheels/$wheel"
        chroot "$rootfs" python -W ignore -c "import torch; print('stand-in torch', torch.__version__)" >&2
        rm -rf "$rootfs/tmp/wheels" "$rootfs/var/lib/apt/lists/"* "$rootfs/var/cache/apt/"*.bin \
            "$rootfs/var/cache/apt/archives/"*.deb "$rootfs/root/.cache"
        tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
    fi
    "$DOCKER" import --change 'ENV LANG=C.UTF-8' --change 'CMD ["python"]' "$tarball" "$BASE_IMAGE" >/dev/null
    log "stand-in base image: $BASE_IMAGE"
}

start_registry() {
    if alive "$D/registry.pid" && [[ -s $D/registry.port ]] && port_open "$(cat "$D/registry.port")"; then
        return 0
    fi
    local port=${REGISTRY_PORT:-}
    [[ -n $port ]] || port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    mkdir -p "$D/registry"
    cat >"$D/registry.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $D/registry
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
EOF
    setsid docker-registry serve "$D/registry.yml" </dev/null >"$D/registry.log" 2>&1 &
    echo $! >"$D/registry.pid"
    echo "$port" >"$D/registry.port"
    # 127.0.0.0/8 registries are insecure (plain HTTP) by default: no TLS to set up.
    wait_for 30 docker-registry port_open "$port" || { cat "$D/registry.log" >&2; return 1; }
    log "local registry: 127.0.0.1:$port"
}

warm_registry() {
    # Push the stand-in base in the background, as a first push would have: the test's push of the
    # image then sends only its own layers (the registry mounts the base's from this repository).
    local ref
    ref=127.0.0.1:$(cat "$D/registry.port")/$BASE_IMAGE
    alive "$D/warm-registry.pid" && return 0
    "$DOCKER" tag "$BASE_IMAGE" "$ref"
    setsid "$DOCKER" push "$ref" </dev/null >"$D/warm-registry.log" 2>&1 &
    echo $! >"$D/warm-registry.pid"
}

main() {
    if ((EUID != 0)); then
        log "run as root (it installs packages and starts dockerd)"
        exit 1
    fi
    mkdir -p "$D"
    install_packages
    start_engine
    build_stand_in
    start_registry
    warm_registry
    cat >"$D/env" <<EOF
export DOCKER_HOST=$DOCKER_HOST
export DOCKER=$DOCKER
export DOCKER_BUILDKIT=1
export BASE_IMAGE=$BASE_IMAGE
export DOCKER_REGISTRY=127.0.0.1:$(cat "$D/registry.port")
export REQUIRE_DOCKER=1
EOF
    log "ready: . $D/env"
}

main "$@"
