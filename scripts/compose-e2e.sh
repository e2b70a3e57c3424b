#!/usr/bin/env bash
# The docker-compose end-to-end run, as CI runs it (tests/docker/test_compose.py):
#
#   1. build the local base image (skipped if it exists) and the switchboard image,
#      with no registry and no network inside the build (scripts/build-*.sh);
#   2. bring docker-compose.yml's 3-node cluster up under a unique project name,
#      with free host ports, and wait until every node is healthy (/readyz);
#   3. run tests/docker/compose_scenario.py from the host venv: real clients on
#      the published client ports (login, presence, messages across nodes), then
#      docker kill, docker pause and docker network disconnect of one node each,
#      checking that its clients resume with the same session and nothing lost;
#   4. start the 4th node (profile "join") and add it with `switchboard admin add`
#      run inside a container, check `admin status` and a login through it;
#   5. `down -v`, also on failure or Ctrl-C, and print a summary.
#
# Works with the Compose v2 plugin (`docker compose`) and Compose v1
# (`docker-compose`); set COMPOSE="docker-compose" to choose.
# Environment: IMAGE (default switchboard:latest), BASE_IMAGE (default
# switchboard-base:bookworm), PYTHON (default .venv/bin/python), E2E_SUMMARY (a
# file to write the summary JSON to), E2E_SKIP_BUILD=1 (use the images as they are).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
T_START=$(date +%s.%N)

say() { printf '[e2e %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { say "FAILED: $*"; exit 1; }
since() { python3 -c "import sys,time; print(f'{time.time() - float(sys.argv[1]):.1f}')" "$1"; }

command -v docker >/dev/null 2>&1 || die "docker is not installed"
docker info >/dev/null 2>&1 || die "no Docker engine reachable (docker info failed)"
if [ -n "${COMPOSE:-}" ]; then
    read -r -a COMPOSE_CMD <<<"$COMPOSE"
elif docker compose version >/dev/null 2>&1; then
    COMPOSE_CMD=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    COMPOSE_CMD=(docker-compose)
else
    die "neither the docker compose plugin nor docker-compose is installed"
fi
say "compose: ${COMPOSE_CMD[*]} ($("${COMPOSE_CMD[@]}" version --short 2>/dev/null || echo '?'))"

export SWITCHBOARD_IMAGE=${IMAGE:-switchboard:latest}
BASE_IMAGE=${BASE_IMAGE:-switchboard-base:bookworm}
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
PROJECT="sbe2e$(date +%m%d%H%M%S)$$"
WORK=$(mktemp -d /tmp/switchboard-e2e.XXXXXX)
chmod 0700 "$WORK"
SERVICES=(n1 n2 n3)
compose() { "${COMPOSE_CMD[@]}" -p "$PROJECT" -f "$ROOT/docker-compose.yml" "$@"; }
ADMIN=(switchboard admin --secret-file /run/secrets/switchboard_secret)

STATUS=failed
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    if [ "$STATUS" != ok ] && [ -n "$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT")" ]; then
        say "last log lines of each node:"
        compose --profile join logs --no-color --tail 15 >&2 2>/dev/null
    fi
    say "tearing down project $PROJECT"
    # a paused container cannot be stopped: unpause first
    docker ps -q --filter "label=com.docker.compose.project=$PROJECT" --filter status=paused |
        xargs -r docker unpause >/dev/null 2>&1
    compose --profile join down -v --remove-orphans -t 3 >/dev/null 2>&1
    # whatever down left behind (it should be nothing)
    docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" | xargs -r docker rm -f >/dev/null 2>&1
    docker volume ls -q --filter "label=com.docker.compose.project=$PROJECT" | xargs -r docker volume rm >/dev/null 2>&1
    docker network ls -q --filter "label=com.docker.compose.project=$PROJECT" | xargs -r docker network rm >/dev/null 2>&1
    rm -rf "$WORK"
    say "total runtime $(since "$T_START") s"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. images ---------------------------------------------------------------------------
if [ "${E2E_SKIP_BUILD:-0}" = 1 ]; then
    say "E2E_SKIP_BUILD=1: using $SWITCHBOARD_IMAGE as it is"
else
    t=$(date +%s.%N)
    BASE_IMAGE=$BASE_IMAGE scripts/build-base-image.sh
    IMAGE=$SWITCHBOARD_IMAGE BASE_IMAGE=$BASE_IMAGE PYTHON=$PY scripts/build-image.sh
    BUILD_S=$(since "$t")
fi
docker image inspect "$SWITCHBOARD_IMAGE" >/dev/null 2>&1 || die "image $SWITCHBOARD_IMAGE is missing"

# --- 2. the cluster ------------------------------------------------------------------------
# The secret, readable by the node's user in the image (uid 10001) and by us.
export SWITCHBOARD_SECRET_FILE="$WORK/secret"
(umask 077; "$PY" -c 'import secrets; print(secrets.token_hex(32))' >"$SWITCHBOARD_SECRET_FILE")
if [ "$(id -u)" = 0 ]; then
    chown 10001:10001 "$SWITCHBOARD_SECRET_FILE"
else
    chmod 0644 "$SWITCHBOARD_SECRET_FILE"  # the folder is 0700
fi
export SWITCHBOARD_PUBLISH_ADDR=127.0.0.1
read -r -a PORTS <<<"$("$PY" - <<'EOF'
import socket
socks = []
for _ in range(8):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
)"
k=0
for n in 1 2 3 4; do
    export "SWITCHBOARD_N${n}_CLIENT_PORT=${PORTS[$k]}" "SWITCHBOARD_N${n}_METRICS_PORT=${PORTS[$((k + 1))]}"
    k=$((k + 2))
done
port() { local v="SWITCHBOARD_N${1#n}_$2_PORT"; echo "${!v}"; }

say "project $PROJECT: starting ${SERVICES[*]} (clients on 127.0.0.1:$(port n1 CLIENT),$(port n2 CLIENT),$(port n3 CLIENT))"
t_up=$(date +%s.%N)
compose up -d --no-build >"$WORK/up.log" 2>&1 || { cat "$WORK/up.log" >&2; die "compose up failed"; }

declare -A CID
wait_healthy() {  # wait_healthy LIMIT SERVICE...
    local limit=$1; shift
    local deadline=$(( $(date +%s) + limit )) s state states
    while :; do
        states=""
        local all=1
        for s in "$@"; do
            [ -n "${CID[$s]:-}" ] || CID[$s]=$(compose ps -q "$s" 2>/dev/null || true)
            state=$(docker inspect -f '{{.State.Status}}/{{if .State.Health}}{{.State.Health.Status}}{{end}}' \
                    "${CID[$s]:-none}" 2>/dev/null || echo missing)
            states="$states $s=$state"
            [ "$state" = running/healthy ] || all=0
            case "$state" in exited/*|dead/*) die "$s exited: $(docker logs --tail 5 "${CID[$s]}" 2>&1)";; esac
        done
        [ $all = 1 ] && return 0
        [ "$(date +%s)" -lt "$deadline" ] || die "not healthy within $limit s:$states"
        sleep 0.5
    done
}
wait_healthy 180 "${SERVICES[@]}"
HEALTHY_S=$(since "$t_up")
say "all ${#SERVICES[@]} nodes healthy $HEALTHY_S s after 'up'"
NETWORK=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}' "${CID[n1]}" | awk '{print $1}')
compose exec -T n1 "${ADMIN[@]}" --cluster n1:7300,n2:7300,n3:7300 status >&2

# --- 3. clients and faults -------------------------------------------------------------------
say "scenario: clients through the published ports, then kill, pause, network disconnect"
set +e
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$ROOT/tests/docker/compose_scenario.py" \
    --nodes "n1=127.0.0.1:$(port n1 CLIENT),n2=127.0.0.1:$(port n2 CLIENT),n3=127.0.0.1:$(port n3 CLIENT)" \
    --metrics "n1=127.0.0.1:$(port n1 METRICS),n2=127.0.0.1:$(port n2 METRICS),n3=127.0.0.1:$(port n3 METRICS)" \
    --containers "n1=${CID[n1]},n2=${CID[n2]},n3=${CID[n3]}" \
    --network "$NETWORK" --secret-file "$SWITCHBOARD_SECRET_FILE" | tee "$WORK/scenario.log"
SCENARIO_RC=${PIPESTATUS[0]}
set -e
RESULT=$(sed -n 's/^E2E-RESULT //p' "$WORK/scenario.log" | tail -n 1)
[ -n "$RESULT" ] || die "the scenario printed no result (exit $SCENARIO_RC)"
[ "$SCENARIO_RC" = 0 ] || die "scenario checks failed: $(printf '%s' "$RESULT" | "$PY" -c 'import json,sys; print("; ".join(json.load(sys.stdin)["failures"]))')"

# --- 4. the 4th node ----------------------------------------------------------------------------
say "adding n4: compose --profile join up -d n4, then admin add inside n1"
t_join=$(date +%s.%N)
compose --profile join up -d --no-build n4 >"$WORK/up-n4.log" 2>&1 || { cat "$WORK/up-n4.log" >&2; die "starting n4 failed"; }
CID[n4]=$(compose --profile join ps -q n4)
for _ in $(seq 1 60); do  # its admin port answers once it is up
    compose exec -T n1 "${ADMIN[@]}" --cluster n4:7300 status --json >/dev/null 2>&1 && break
    sleep 0.5
done
compose exec -T n1 "${ADMIN[@]}" --cluster n1:7300,n2:7300,n3:7300 add n4:7300 --wait 60 >&2 ||
    die "admin add n4:7300 failed"
wait_healthy 60 n1 n2 n3 n4
JOIN_S=$(since "$t_join")
compose exec -T n1 "${ADMIN[@]}" --cluster n1:7300,n2:7300,n3:7300,n4:7300 status --json >"$WORK/status.json" ||
    die "admin status failed"
"$PY" - "$WORK/status.json" <<'EOF' || die "n4 is not a ready member"
import json, sys
rows = json.load(open(sys.argv[1]))["nodes"]
ids = sorted(r["id"] for r in rows if r.get("reachable") and r.get("ready"))
assert ids == ["n1", "n2", "n3", "n4"], ids
members = {tuple(sorted(r.get("members", []))) for r in rows}
assert members == {("n1:7200", "n2:7200", "n3:7200", "n4:7200")}, members
EOF
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" - "127.0.0.1:$(port n4 CLIENT)" "$SWITCHBOARD_SECRET_FILE" <<'EOF' ||
import sys
from pathlib import Path
import trio
from client import connect
from node.auth import Keys, issue_token, read_secret

async def main() -> None:
    keys = Keys.from_secret(read_secret(Path(sys.argv[2])))
    async with connect([sys.argv[1]], user="e2e-n4", token=issue_token(keys.token, "e2e-n4")) as s:
        assert s.node_id == "n4", s.node_id
        await s.send("e2e-n4", "hello n4")
        ev = await s.next_event(timeout=10)
        assert getattr(ev, "body", None) == "hello n4", ev

trio.run(main)
EOF
    die "a client could not log in and message through n4's published port"
say "n4 added, healthy and serving clients $JOIN_S s after its start"
compose exec -T n1 "${ADMIN[@]}" --cluster n1:7300,n2:7300,n3:7300,n4:7300 status >&2

# --- 5. summary -------------------------------------------------------------------------------
STATUS=ok
SUMMARY=$("$PY" - "$RESULT" "$HEALTHY_S" "$JOIN_S" "${BUILD_S:-}" "${COMPOSE_CMD[*]}" "$T_START" <<'EOF'
import json, sys, time
r = json.loads(sys.argv[1])
kill = next(f for f in r["faults"] if f["kind"] == "kill")
s = {
    "date": time.strftime("%Y-%m-%d"),
    "compose": sys.argv[5],
    "build_s": float(sys.argv[4]) if sys.argv[4] else None,
    "time_to_healthy_s": float(sys.argv[2]),
    "failover_after_kill_s": kill["failover_max_s"],
    "failover_after_kill_median_s": kill["failover_median_s"],
    "messages_sent": r["messages_sent"],
    "messages_lost": r["messages_lost"],
    "messages_duplicated": r["messages_duplicated"],
    "faults": r["faults"],
    "join_n4_s": float(sys.argv[3]),
    "e2e_runtime_s": round(time.time() - float(sys.argv[6]), 1),
}
print(json.dumps(s))
EOF
)
[ -z "${E2E_SUMMARY:-}" ] || printf '%s\n' "$SUMMARY" >"$E2E_SUMMARY"
"$PY" - "$SUMMARY" <<'EOF'
import json, sys
s = json.loads(sys.argv[1])
print("=" * 72)
print(f"compose e2e summary ({s['date']}, {s['compose']})")
if s["build_s"] is not None:
    print(f"  image build (base cached or built, wheels, docker build)  {s['build_s']:.1f} s")
print(f"  time to healthy (up -d -> 3 nodes healthy)                {s['time_to_healthy_s']:.1f} s")
print(f"  failover time after the container kill (max / median)     "
      f"{s['failover_after_kill_s']:.2f} / {s['failover_after_kill_median_s']:.2f} s")
for f in s["faults"]:
    print(f"    docker {f['kind']:<10} {f['node']} ({f['docker_command_s']:.2f} s): "
          f"{f['clients']} clients resumed in max {f['failover_max_s']} s, first new send "
          f"back after {f['first_send_s']} s; healthy {f['heal_to_healthy_s']} s after healing")
print(f"  messages sent {s['messages_sent']}, lost = {s['messages_lost']}, "
      f"duplicated = {s['messages_duplicated']}")
print(f"  4th node: up, added and healthy in {s['join_n4_s']:.1f} s")
print(f"  e2e runtime so far {s['e2e_runtime_s']:.0f} s (teardown follows)")
print("=" * 72)
EOF
