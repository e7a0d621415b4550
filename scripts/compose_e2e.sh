#!/usr/bin/env bash
# docker-compose.yml end to end on one machine with a Docker engine, without Docker Hub:
#
#   scripts/compose_e2e.sh          # build the missing stand-in images, run the federation, tear down
#   scripts/compose_e2e.sh build    # only build the stand-in images (skips those already built)
#   scripts/compose_e2e.sh images   # list the stand-in images and their sizes
#
# Build: a Debian bookworm root made by debootstrap (python3 + python3-venv, from the Debian mirror
# apt uses) is imported as fedcoe-standin/debian-python:bookworm; the wheels of Flower and of the
# app's dependencies (pyproject.toml without ray/torchvision) are downloaded on the host with
# `pip wheel` into $COMPOSE_E2E_WORK/wheels and served on loopback while docker/standin/Dockerfile
# builds the SuperLink, SuperNode and SuperExec images (`docker build --network host`): the build
# containers need no registry access.
#
# Run: certificates and node keys (scripts/make_certs.sh), three sites' data (configs/deploy.yaml,
# python -m tools.deploy.sites), the SuperLink (TLS, node authentication, SQLite state on a
# volume), registration of the three node keys, three SuperNodes with their SuperExecs (profile
# `cpu`), `flwr run` of 2 rounds from the host, a SuperNode container killed (SIGKILL) in round 1
# and started again, then checks of results/<run>/summary.json and metrics.jsonl (bind-mounted to
# the host). Everything the run created (containers, network, volumes) is removed on exit, also on
# error or Ctrl-C; the compose project name is unique per run, so nothing else is touched.
#
# Settings (environment): PYTHON (Python 3.11 with this project installed; default: python3),
# FLWR_CLI (default: the flwr next to PYTHON, else on PATH), COMPOSE (e.g. "docker-compose";
# default: `docker compose` if present, else docker-compose), COMPOSE_E2E_WORK (cache and run
# folders, default .compose-e2e/), DEBIAN_MIRROR (default: the one in /etc/apt), TORCH_REQUIREMENT
# (default torch==2.13.0: the CPU build where pip finds it, see docs/DEPLOYMENT.md), KILL_NODE
# (default supernode-0; "none" skips the kill), RUN_TIMEOUT (seconds for `flwr run`, default 1500).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${COMPOSE_E2E_WORK:-$ROOT/.compose-e2e}"
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"
PYTHON="${PYTHON:-python3}"
FLWR_VERSION="${FLWR_VERSION:-1.39.0}"
TORCH_REQUIREMENT="${TORCH_REQUIREMENT:-torch==2.13.0}"
APP_SKIP="ray torchvision"  # simulation only / only for torchvision's data set downloads
DEBIAN_SUITE=bookworm       # its python3 is 3.11, the version the wheels are downloaded for
KILL_NODE="${KILL_NODE:-supernode-0}"
RUN_TIMEOUT="${RUN_TIMEOUT:-1500}"
ROUNDS=2

PREFIX="fedcoe-standin"
BASE_IMAGE="$PREFIX/debian-python:$DEBIAN_SUITE"
SUPERLINK_IMAGE="$PREFIX/superlink:$FLWR_VERSION"
SUPERNODE_IMAGE="$PREFIX/supernode:$FLWR_VERSION"
# the SuperExec image carries the app's dependencies: its tag names their hash
SUPEREXEC_IMAGE=""  # set by app_requirements

START=$SECONDS
log() { printf '[compose-e2e %s +%ds] %s\n' "$(date +%H:%M:%S)" "$((SECONDS - START))" "$*"; }
die() { log "ERROR: $*" >&2; exit 1; }

HTTP_PID=""
PROJECT=""
RUN_DIR=""
RUN_PID=""

# ------------------------------------------------------------------------------------ checks
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed${2:+ ($2)}"; }

check_engine() {
    need docker "apt-get install docker.io"
    local out
    out="$(docker info 2>&1 >/dev/null)" || die "no Docker engine answers (docker info: ${out//$'\n'/ }); start dockerd as root, see docs/DEPLOYMENT.md"
}

check_python() {
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null \
        || die "PYTHON=$PYTHON is not Python 3.11 (the images' Debian $DEBIAN_SUITE python3): the wheels must match it"
}

# ------------------------------------------------------------------------------------ build
debian_mirror() {
    if [[ -n "${DEBIAN_MIRROR:-}" ]]; then echo "$DEBIAN_MIRROR"; return; fi
    local uri
    uri="$(grep -hsE '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -n1 || true)"
    [[ -z "$uri" ]] && uri="$(grep -hsE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list \
        | awk '{print $2}' | grep -v security | head -n1 || true)"
    echo "${uri:-http://deb.debian.org/debian}"
}

build_base() {
    [[ $EUID -eq 0 ]] || die "building $BASE_IMAGE needs root (debootstrap); or build it once as root: sudo scripts/compose_e2e.sh build"
    need debootstrap "apt-get install debootstrap"
    local mirror rootfs="$WORK/rootfs"
    mirror="$(debian_mirror)"
    log "debootstrap $DEBIAN_SUITE (minbase + python3 python3-venv) from $mirror"
    rm -rf "$rootfs"
    nice -n 10 debootstrap --variant=minbase --include=python3,python3-venv "$DEBIAN_SUITE" "$rootfs" "$mirror" \
        >"$WORK/logs/debootstrap.log" 2>&1 || die "debootstrap failed, see $WORK/logs/debootstrap.log"
    # package caches, docs, manuals and translations are not needed in a container
    rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
    tar -C "$rootfs" --numeric-owner -c . \
        | docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' \
            --message "debootstrap --variant=minbase $DEBIAN_SUITE + python3 python3-venv" - "$BASE_IMAGE" >/dev/null
    rm -rf "$rootfs"
    log "imported $BASE_IMAGE"
}

# The app's requirements: pyproject.toml's dependencies, Flower pinned, without APP_SKIP.
app_requirements() {
    APP_REQUIREMENTS="$(FLWR_VERSION="$FLWR_VERSION" TORCH_REQUIREMENT="$TORCH_REQUIREMENT" APP_SKIP="$APP_SKIP" \
        "$PYTHON" - "$ROOT/pyproject.toml" <<'EOF'
import os, re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
out = []
for dep in deps:
    name = re.split(r"[\[<>=!~;\s]", dep, maxsplit=1)[0].lower()
    if name in os.environ["APP_SKIP"].split():
        continue
    out.append({"flwr": "flwr==" + os.environ["FLWR_VERSION"], "torch": os.environ["TORCH_REQUIREMENT"]}.get(name, dep))
print(" ".join(out))
EOF
)"
    local hash
    hash="$(printf '%s' "$APP_REQUIREMENTS" | sha256sum | cut -c1-10)"
    SUPEREXEC_IMAGE="$PREFIX/superexec-fedcoe:$FLWR_VERSION-$hash"
}

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

serve_wheels() {
    local port
    port="$(free_port)"
    "$PYTHON" -m http.server --bind 127.0.0.1 --directory "$WORK/wheels" "$port" >"$WORK/logs/wheelhouse.log" 2>&1 &
    HTTP_PID=$!
    for _ in $(seq 50); do
        "$PYTHON" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/', timeout=2)" 2>/dev/null \
            && { WHEELHOUSE="http://127.0.0.1:$port/"; return; }
        sleep 0.2
    done
    die "the wheelhouse server did not start, see $WORK/logs/wheelhouse.log"
}

stop_wheels() {
    if [[ -n "$HTTP_PID" ]]; then kill "$HTTP_PID" 2>/dev/null || true; wait "$HTTP_PID" 2>/dev/null || true; HTTP_PID=""; fi
}

build_stage() {  # build_stage TARGET TAG
    log "docker build --target $1 -> $2"
    docker build --network host --target "$1" -t "$2" --label fedcoe-standin=1 \
        --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg WHEELHOUSE="$WHEELHOUSE" \
        --build-arg FLWR_REQUIREMENT="flwr==$FLWR_VERSION" --build-arg APP_REQUIREMENTS="$APP_REQUIREMENTS" \
        -f "$ROOT/docker/standin/Dockerfile" "$ROOT/docker/standin" >"$WORK/logs/build-$1.log" 2>&1 \
        || die "docker build --target $1 failed, see $WORK/logs/build-$1.log"
}

have_image() { docker image inspect "$1" >/dev/null 2>&1; }

build_images() {
    mkdir -p "$WORK/logs" "$WORK/wheels"
    app_requirements
    local missing=()
    have_image "$SUPERLINK_IMAGE" || missing+=(superlink)
    have_image "$SUPERNODE_IMAGE" || missing+=(supernode)
    have_image "$SUPEREXEC_IMAGE" || missing+=(superexec)
    if ((${#missing[@]} == 0)); then
        log "stand-in images present: $SUPERLINK_IMAGE $SUPERNODE_IMAGE $SUPEREXEC_IMAGE"
        return
    fi
    local t0=$SECONDS
    have_image "$BASE_IMAGE" || build_base
    log "pip wheel $APP_REQUIREMENTS -> $WORK/wheels"
    # shellcheck disable=SC2086  # APP_REQUIREMENTS holds several specifiers
    "$PYTHON" -m pip wheel --quiet --wheel-dir "$WORK/wheels" --find-links "$WORK/wheels" \
        $APP_REQUIREMENTS >"$WORK/logs/pip-wheel.log" 2>&1 \
        || die "pip wheel failed, see $WORK/logs/pip-wheel.log"
    serve_wheels
    local target tag
    for target in "${missing[@]}"; do
        case "$target" in
            superlink) tag="$SUPERLINK_IMAGE" ;;
            supernode) tag="$SUPERNODE_IMAGE" ;;
            superexec) tag="$SUPEREXEC_IMAGE" ;;
        esac
        build_stage "$target" "$tag"
    done
    stop_wheels
    # the intermediate stages are only cache: drop what no image uses any more
    docker image prune --force --filter label=fedcoe-standin=1 >/dev/null 2>&1 || true
    log "built ${missing[*]} in $((SECONDS - t0)) s"
    list_images
}

list_images() {
    app_requirements
    local img
    for img in "$BASE_IMAGE" "$SUPERLINK_IMAGE" "$SUPERNODE_IMAGE" "$SUPEREXEC_IMAGE"; do
        if have_image "$img"; then
            printf '  %-55s %6d MB\n' "$img" "$(( $(docker image inspect -f '{{.Size}}' "$img") / 1000000 ))"
        else
            printf '  %-55s (not built)\n' "$img"
        fi
    done
}

# ------------------------------------------------------------------------------------ run
compose() { "${COMPOSE_CMD[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml" --profile cpu "$@"; }

pick_compose() {
    if [[ -n "${COMPOSE:-}" ]]; then read -r -a COMPOSE_CMD <<<"$COMPOSE"
    elif docker compose version >/dev/null 2>&1; then COMPOSE_CMD=(docker compose)
    elif command -v docker-compose >/dev/null 2>&1; then COMPOSE_CMD=(docker-compose)
    else die "neither 'docker compose' nor 'docker-compose' is installed (apt-get install docker-compose)"
    fi
    log "compose: ${COMPOSE_CMD[*]} ($("${COMPOSE_CMD[@]}" version --short 2>/dev/null || echo '?'))"
}

pick_flwr() {
    if [[ -n "${FLWR_CLI:-}" ]]; then FLWR="$FLWR_CLI"
    elif [[ -x "$(dirname "$(command -v "$PYTHON")")/flwr" ]]; then FLWR="$(dirname "$(command -v "$PYTHON")")/flwr"
    else FLWR="$(command -v flwr)" || die "no flwr CLI: install this project (pip install -e .) or set FLWR_CLI"
    fi
}

flwr_cli() { FLWR_HOME="$RUN_DIR/flwr-home" "$FLWR" "$@"; }

# as root inside a throw-away container, so that no sudo is needed on the host
as_root_in_container() {
    docker run --rm --user 0 --network none --entrypoint "$1" -v "$RUN_DIR:/run-dir" "$SUPERLINK_IMAGE" "${@:2}"
}

teardown() {
    local rc=$?
    set +e
    stop_wheels
    if [[ -n "$RUN_PID" ]] && kill -0 "$RUN_PID" 2>/dev/null; then kill "$RUN_PID"; wait "$RUN_PID" 2>/dev/null; fi
    if [[ -n "$PROJECT" ]]; then
        log "teardown: compose logs -> $RUN_DIR/logs/compose.log; down -v"
        compose logs --no-color >"$RUN_DIR/logs/compose.log" 2>&1
        compose down --volumes --remove-orphans --timeout 10 >>"$RUN_DIR/logs/compose-down.log" 2>&1
        # whatever compose missed (a container of another profile): by the project's label only
        local label="label=com.docker.compose.project=$PROJECT" left
        left="$(docker ps -aq --filter "$label")"; [[ -n "$left" ]] && docker rm -f $left >/dev/null
        left="$(docker network ls -q --filter "$label")"; [[ -n "$left" ]] && docker network rm $left >/dev/null
        left="$(docker volume ls -q --filter "$label")"; [[ -n "$left" ]] && docker volume rm $left >/dev/null
        left="$(docker ps -aq --filter "$label")$(docker network ls -q --filter "$label")$(docker volume ls -q --filter "$label")"
        if [[ -n "$left" ]]; then log "ERROR: left behind by $PROJECT: $left"; rc=1
        else log "teardown: no containers, networks or volumes of $PROJECT left"
        fi
        # hand the run folder back to the host user, drop the keys (results and logs stay)
        as_root_in_container chown -R "$(id -u):$(id -g)" /run-dir >/dev/null 2>&1
        rm -rf "$RUN_DIR/certs"
    fi
    log "wall time $((SECONDS - START)) s, exit code $rc"
    exit "$rc"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2 t0=$SECONDS
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS - t0 < limit)) || die "timed out after ${limit} s waiting for $what"
        sleep 3
    done
    log "$what ($((SECONDS - t0)) s)"
}

nodes_online() {  # nodes_online N: at least N SuperNodes online
    flwr_cli supernode list compose --format json 2>/dev/null | "$PYTHON" -c '
import json, sys
nodes = json.load(sys.stdin).get("nodes", [])
sys.exit(sum(n.get("status") == "online" for n in nodes) < int(sys.argv[1]))' "$1"
}

container_running() { [[ "$(docker inspect -f '{{.State.Running}}' "$(compose ps -q "$1")" 2>/dev/null)" == true ]]; }

node_state() {  # node_state NODE_ID: "<status> <online-at>" as the SuperLink reports them
    flwr_cli supernode list compose --format json 2>/dev/null | "$PYTHON" -c '
import json, sys
for n in json.load(sys.stdin).get("nodes", []):
    if n["node-id"] == sys.argv[1]:
        print(n["status"], n["online-at"].replace(" ", "T"))' "$1"
}

kill_and_restart() {  # kill_and_restart SERVICE NODE_ID: SIGKILL the container in round 1, start it again
    local service=$1 node_id=$2 t0 before state
    log "waiting for round 1 to start before killing $service"
    until grep -q "\[ROUND 1/" "$RUN_DIR/logs/flwr-run.log" 2>/dev/null; do
        kill -0 "$RUN_PID" 2>/dev/null || die "flwr run ended before round 1, see $RUN_DIR/logs/flwr-run.log"
        sleep 2
    done
    sleep 5  # its ClientApp is training now
    before="$(node_state "$node_id")"
    log "docker kill (SIGKILL) $service (node $node_id, $before)"
    docker kill "$(compose ps -q "$service")" >/dev/null
    t0=$SECONDS
    # The SuperLink keeps a silent node online until it misses 2 heartbeats (~60 s) and refuses
    # its key meanwhile. A node back before the server has seen it offline never gets the lost
    # message again: that round would wait for round_timeout. So start it again only once the
    # SuperLink has reported it offline and the server has polled a few times since.
    until [[ "$(node_state "$node_id")" == offline* ]]; do
        ((SECONDS - t0 < 180)) || die "the SuperLink did not mark $service offline within 180 s of the kill"
        sleep 3
    done
    log "SuperLink: $service offline $((SECONDS - t0)) s after the kill"
    sleep 15
    log "starting $service again"
    compose start "$service" >>"$RUN_DIR/logs/compose-start.log" 2>&1
    # back = online with a newer activation time (a refused start exits; its restart policy retries)
    while state="$(node_state "$node_id")"; [[ "$state" != online* || "${state#* }" == "${before#* }" ]]; do
        ((SECONDS - t0 < 400)) || die "$service not back online 400 s after the kill ($state)"
        kill -0 "$RUN_PID" 2>/dev/null || die "flwr run ended while $service was down, see $RUN_DIR/logs/flwr-run.log"
        container_running "$service" || compose start "$service" >>"$RUN_DIR/logs/compose-start.log" 2>&1
        sleep 3
    done
    log "$service back online $((SECONDS - t0)) s after the kill ($state)"
}

check_results() {
    "$PYTHON" - "$RUN_DIR/results/$PROJECT" "$ROUNDS" <<'EOF'
import json, sys
from pathlib import Path
run, rounds = Path(sys.argv[1]), int(sys.argv[2])
summary = json.loads((run / "summary.json").read_text())
assert summary["status"] == "finished", f"summary.json status {summary['status']!r}, expected 'finished'"
metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
assert [m["round"] for m in metrics][-1] == rounds, f"metrics.jsonl rounds {[m['round'] for m in metrics]}"
final = metrics[-1]
for key in ("global_accuracy", "personalized_accuracy", "coldstart_accuracy"):
    value = final.get(key)
    assert isinstance(value, float) and 0.0 <= value <= 1.0, f"metrics.jsonl round {rounds}: {key}={value!r}"
print(f"  metrics.jsonl: {len(metrics)} evaluations, final round {final['round']}: "
      + ", ".join(f"{k}={final[k]:.3f}" for k in ("global_accuracy", "personalized_accuracy", "coldstart_accuracy")))
rounds_path = run / "rounds.jsonl"
if rounds_path.is_file():
    for line in rounds_path.read_text().splitlines():
        r = json.loads(line)
        shown = {k: (round(r[k], 1) if isinstance(r[k], float) else r[k])
                 for k in ("round", "clients", "replies", "failed", "time_s") if k in r}
        print(f"  rounds.jsonl: {shown}")
EOF
}

run_federation() {
    pick_compose
    pick_flwr
    build_images
    PROJECT="fedcoe-e2e-$(date +%Y%m%d%H%M%S)-$$"
    RUN_DIR="$WORK/runs/$PROJECT"
    mkdir -p "$RUN_DIR/logs" "$RUN_DIR/results" "$RUN_DIR/flwr-home"
    exec > >(tee -a "$RUN_DIR/logs/compose_e2e.log") 2>&1  # this script's own output, kept with the run
    log "compose project $PROJECT, folder $RUN_DIR"

    CERT_RSA_BITS="${CERT_RSA_BITS:-2048}" bash "$ROOT/scripts/make_certs.sh" "$RUN_DIR/certs" 3 >"$RUN_DIR/logs/certs.log" 2>&1 \
        || die "make_certs.sh failed, see $RUN_DIR/logs/certs.log"
    local data="$WORK/deploy-data"
    if [[ ! -f "$data/sites.json" ]]; then
        log "site data: python -m tools.deploy.sites --config configs/deploy.yaml --out $data"
        (cd "$ROOT" && "$PYTHON" -m tools.deploy.sites --config configs/deploy.yaml --out "$data") \
            >"$WORK/logs/sites.log" 2>&1 || die "site data failed, see $WORK/logs/sites.log"
    fi
    # the images run as uid 49999: it must read the private keys and write the results
    as_root_in_container chown 49999:49999 /run-dir/certs/server.key /run-dir/certs/superexec.secret \
        /run-dir/certs/keys/site-0 /run-dir/certs/keys/site-1 /run-dir/certs/keys/site-2 /run-dir/results

    local control_port fleet_port
    control_port="$(free_port)"
    fleet_port="$(free_port)"
    export SUPERLINK_IMAGE SUPERNODE_IMAGE SUPEREXEC_IMAGE
    export SUPERLINK_PUBLISH_ADDRESS=127.0.0.1 SUPERLINK_CONTROL_PORT="$control_port" SUPERLINK_FLEET_PORT="$fleet_port"
    export FEDCOE_CERTS_DIR="$RUN_DIR/certs" FEDCOE_DATA_DIR="$data" FEDCOE_RESULTS_DIR="$RUN_DIR/results"
    export FEDCOE_CONFIGS_DIR="$ROOT/configs"
    cat >"$RUN_DIR/flwr-home/config.toml" <<EOF
[superlink]
default = "compose"

[superlink.compose]
address = "127.0.0.1:$control_port"
root-certificates = "$RUN_DIR/certs/ca.crt"
EOF
    export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1

    log "up: superlink (127.0.0.1:$control_port HTTPS, 127.0.0.1:$fleet_port gRPC)"
    compose up -d --no-build superlink >"$RUN_DIR/logs/compose-up.log" 2>&1 || die "compose up superlink failed, see $RUN_DIR/logs/compose-up.log"
    wait_for 120 "SuperLink answers the flwr CLI" flwr_cli supernode list compose
    local i name
    for i in 0 1 2; do
        name="site-$i"; ((i == 2)) && name="coldstart-0"
        flwr_cli supernode register "$RUN_DIR/certs/keys/site-$i.pub" compose --name "$name" >>"$RUN_DIR/logs/register.log" 2>&1 \
            || die "flwr supernode register site-$i failed, see $RUN_DIR/logs/register.log"
    done
    read -r -a NODE_IDS <<<"$(grep -o 'SuperNode [0-9]* registered' "$RUN_DIR/logs/register.log" | awk '{print $2}' | tr '\n' ' ')"
    ((${#NODE_IDS[@]} == 3)) || die "expected 3 node ids in $RUN_DIR/logs/register.log"
    log "registered 3 node keys: supernode-0..2 = ${NODE_IDS[*]}"
    compose up -d --no-build >>"$RUN_DIR/logs/compose-up.log" 2>&1 || die "compose up failed, see $RUN_DIR/logs/compose-up.log"
    wait_for 180 "3 SuperNodes online" nodes_online 3

    log "flwr run: $ROUNDS rounds (log: $RUN_DIR/logs/flwr-run.log)"
    # round_timeout: the backstop should a reply be lost anyway (see kill_and_restart)
    local run_config="config='configs/deploy.yaml' num_rounds=$ROUNDS run_name='$PROJECT' wait_for_nodes=120 round_timeout=300"
    (cd "$ROOT" && exec timeout "$RUN_TIMEOUT" env FLWR_HOME="$RUN_DIR/flwr-home" "$FLWR" run . compose \
        --run-config "$run_config" --stream) >"$RUN_DIR/logs/flwr-run.log" 2>&1 &
    RUN_PID=$!
    local t_run=$SECONDS
    if [[ "$KILL_NODE" != none ]]; then
        local index=${KILL_NODE#supernode-}
        [[ "$index" =~ ^[0-2]$ ]] || die "KILL_NODE=$KILL_NODE: expected supernode-0, -1, -2 or none"
        kill_and_restart "$KILL_NODE" "${NODE_IDS[$index]}"
    fi
    local rc=0
    wait "$RUN_PID" || rc=$?
    RUN_PID=""
    log "flwr run ended with exit code $rc after $((SECONDS - t_run)) s"
    sed 's/\x1b\[[0-9;]*m//g' "$RUN_DIR/logs/flwr-run.log" | grep -E '\[(round [0-9]|ROUND)' | sed 's/^[^[]*/  /' || true
    ((rc == 0)) || die "flwr run failed (exit code $rc), see $RUN_DIR/logs/flwr-run.log"
    [[ -f "$RUN_DIR/results/$PROJECT/summary.json" ]] || die "no results/$PROJECT/summary.json on the host"
    check_results || die "results check failed ($RUN_DIR/results/$PROJECT)"
    if [[ "$KILL_NODE" != none ]]; then  # the restarted site served the last round (training or evaluation)
        local site="site-${KILL_NODE#supernode-}"; [[ "$site" == site-2 ]] && site=coldstart-0
        compose exec -T "superexec-clientapp-${KILL_NODE#supernode-}" cat "/state/$PROJECT/$site.journal.json" \
            >"$RUN_DIR/logs/$site.journal.json" 2>/dev/null || die "no private-state journal of $site"
        "$PYTHON" - "$RUN_DIR/logs/$site.journal.json" "$site" "$ROUNDS" <<'EOF' || die "$site did not come back"
import json, sys
events = json.load(open(sys.argv[1]))
for e in events:
    print(f"  {sys.argv[2]} journal: round {e['round']} {e['phase']}, private state from {e['source']}")
assert any(e["round"] == int(sys.argv[3]) for e in events), f"{sys.argv[2]} took no part in round {sys.argv[3]}"
EOF
    fi
    log "PASS: $ROUNDS rounds over TLS + node auth in containers, $KILL_NODE killed and restarted, results on the host"
}

main() {
    case "${1:-run}" in
        run|build|images) ;;
        -h|--help) sed -n '2,30p' "$0"; return ;;
        *) die "unknown command '$1' (run | build | images)" ;;
    esac
    trap teardown EXIT
    trap 'exit 130' INT TERM
    check_engine
    check_python
    case "${1:-run}" in
        run) run_federation ;;
        build) build_images ;;
        images) list_images ;;
    esac
}

# main and exit on one line: bash reads no further, so editing this file during a run is harmless
main "$@"; exit
