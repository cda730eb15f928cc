#!/usr/bin/env bash
# What the KubeRay readiness probes need, on a three-node Ray cluster on this machine: deploy/rayservice.yaml's
# serveConfigV2, in config/serve.env's Serve mode, with one Linux network namespace per node so that each
# node has its own port 8000, as each pod has. Prints, for every node, what answers on its :8000 and the
# exit status of the probe command the operator injects.
#
#   sudo scripts/netns-cluster-check.sh        # root: network namespaces; after `make install models`
#
# Nodes: a head with 0 CPUs (as the manifest's head group) and two 1-CPU workers (the worker pods). They
# talk over a bridge inside a namespace of this script's own, on the private addresses below; nothing is
# added to the machine's own network namespace. Everything started is stopped, and the namespaces deleted,
# on exit. Not part of `make test` (it needs root). A run takes about 2 minutes; every wait is bounded
# (about 12 minutes in all at worst).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
NS=${MMS_NETNS_PREFIX:-mmsk}            # namespace names: $NS-sw (the bridge), $NS-head, $NS-w1, $NS-w2
NET=${MMS_NETNS_SUBNET:-10.213.7}       # /24 that exists only inside those namespaces
NODES=(head w1 w2)
declare -A IP=([head]=$NET.1 [w1]=$NET.2 [w2]=$NET.3)
DEPLOY_TIMEOUT_S=300

[ "$(id -u)" = 0 ] || { echo "needs root: it creates network namespaces" >&2; exit 2; }
[ -x "$VENV/bin/ray" ] || { echo "no $VENV/bin/ray: run make install first" >&2; exit 2; }
for n in "$NS-sw" "${NODES[@]/#/$NS-}"; do
    if ip netns list | grep -qw "$n"; then echo "namespace $n exists already: another run?" >&2; exit 2; fi
done

WORK=$(mktemp -d /tmp/mmsk.XXXX)       # short: Ray's unix sockets live under it
declare -A BLOCK_PID=()

cleanup() {
    set +e
    for node in "${NODES[@]}"; do      # `ray start --block` stops its node's processes on SIGTERM
        [ -n "${BLOCK_PID[$node]:-}" ] && kill -TERM "${BLOCK_PID[$node]}" 2>/dev/null
    done
    for _ in $(seq 45); do           # Ray drains a node for up to 30 s first
        left=$(for node in "${NODES[@]}"; do ip netns pids "$NS-$node" 2>/dev/null; done)
        [ -z "$left" ] && break
        sleep 1
    done
    for node in "${NODES[@]}"; do      # whatever is left in our namespaces was started by this script
        for pid in $(ip netns pids "$NS-$node" 2>/dev/null); do kill -KILL "$pid" 2>/dev/null; done
    done
    sleep 1
    for n in "${NODES[@]/#/$NS-}" "$NS-sw"; do ip netns del "$n" 2>/dev/null; done
    echo "logs: $WORK (remove it when done)"
}
trap cleanup EXIT

# Network: a bridge in $NS-sw; each node's namespace has eth0 on it and its own loopback.
ip netns add "$NS-sw"
ip -n "$NS-sw" link add br0 type bridge
ip -n "$NS-sw" link set br0 up
for node in "${NODES[@]}"; do
    ip netns add "$NS-$node"
    ip -n "$NS-$node" link set lo up
    ip -n "$NS-$node" link add eth0 type veth peer name "$node" netns "$NS-sw"
    ip -n "$NS-sw" link set "$node" master br0 up
    ip -n "$NS-$node" addr add "${IP[$node]}/24" dev eth0
    ip -n "$NS-$node" link set eth0 up
done

# The environment of every node: config/serve.env (as the image and every pod group), Ray's token
# authentication with a token of this run's own, the API keys (as the Secret gives them to the pods), and
# HAProxy's files in this run's folder (its default, /tmp/haproxy-serve, is shared with other Ray sessions).
# As for `make run`, a variable already set in the caller's environment wins: for example
# `sudo RAY_SERVE_ENABLE_HA_PROXY=0 scripts/netns-cluster-check.sh` shows the workers failing the probe.
while IFS='=' read -r key value; do
    [[ $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || continue
    if [ -z "${!key+set}" ]; then export "$key=$value"; else export "${key?}"; fi
done <"$ROOT/config/serve.env"
export RAY_AUTH_MODE=token
RAY_AUTH_TOKEN=$("$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(32))')
MMS_API_KEY=$("$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(16))')
MMS_ADMIN_KEY=$("$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(16))')
export RAY_AUTH_TOKEN MMS_API_KEY MMS_ADMIN_KEY
H=$WORK/haproxy  # Serve keeps each node's HAProxy files in a folder named by the node's id under these
export RAY_SERVE_HAPROXY_CONFIG_FILE_LOC=$H/haproxy.cfg RAY_SERVE_HAPROXY_SOCKET_PATH=$H/admin.sock \
    RAY_SERVE_HAPROXY_SERVER_STATE_BASE=$H RAY_SERVE_HAPROXY_SERVER_STATE_FILE=$H/server-state \
    RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH=$H/metrics.sock
echo "mode: RAY_SERVE_THROUGHPUT_OPTIMIZED=$RAY_SERVE_THROUGHPUT_OPTIMIZED RAY_SERVE_ENABLE_HA_PROXY=$RAY_SERVE_ENABLE_HA_PROXY"

in_node() {  # in_node NODE CMD...: run CMD in NODE's namespace
    local node=$1
    shift
    ip netns exec "$NS-$node" "$@"
}

start_node() {  # start_node NODE ARGS...: `ray start --block` in the background, its log in $WORK
    local node=$1
    shift
    mkdir -p "$WORK/$node"
    # $! is the PID of `ray start --block` itself: `ip netns exec` execs into it.
    ip netns exec "$NS-$node" "$VENV/bin/ray" start --block --node-ip-address="${IP[$node]}" --temp-dir="$WORK/$node/ray" \
        --object-store-memory=200000000 "$@" >"$WORK/$node/ray-start.log" 2>&1 &
    BLOCK_PID[$node]=$!
}

wait_until() {  # wait_until SECONDS DESCRIPTION CMD...
    local limit=$1 what=$2
    shift 2
    for _ in $(seq "$limit"); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 1
    done
    echo "gave up after ${limit}s waiting for $what" >&2
    return 1
}

start_node head --head --port=6379 --num-cpus=0 --dashboard-host=0.0.0.0
wait_until 90 "the head's dashboard" in_node head curl -sf "http://${IP[head]}:8265/api/gcs_healthz"
for node in w1 w2; do
    start_node "$node" --address="${IP[head]}:6379" --num-cpus=1
done
for node in w1 w2; do
    wait_until 90 "$node's raylet" in_node "$node" curl -sf "http://localhost:52365/api/local_raylet_healthz"
done

# The operator's readiness probe on a RayService worker pod, as KubeRay builds it (pod.go,
# initLivenessAndReadinessProbe; BaseWgetHealthCommand in utils/constant.go): the raylet through the
# dashboard agent on 52365, then Serve's /-/healthz on the container's `serve` port.
PROBE='wget --tries 1 -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success && wget --tries 1 -T 10 -q -O- http://localhost:8000/-/healthz | grep success'
# The head's (before Ray 2.53, and still the exec form): the raylet, then the GCS through the dashboard.
HEAD_PROBE='wget --tries 1 -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success && wget --tries 1 -T 10 -q -O- http://localhost:8265/api/gcs_healthz | grep success'
code() {  # code NODE URL [CURL ARGS...]: the HTTP status from NODE's namespace (000: nothing answered)
    local node=$1 url=$2
    shift 2
    in_node "$node" curl -s -o /dev/null -m 10 -w '%{http_code}' "$@" "$url" || true
}

echo "--- before serve deploy: each node's own :8000/-/healthz"
for node in "${NODES[@]}"; do echo "$node ${IP[$node]}:8000 -> $(code "$node" "http://${IP[$node]}:8000/-/healthz")"; done

"$VENV/bin/python" -c "import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))['spec']['serveConfigV2'])" \
    "$ROOT/deploy/rayservice.yaml" >"$WORK/serve_config_v2.yaml"
(cd "$ROOT" && in_node head "$VENV/bin/serve" deploy "$WORK/serve_config_v2.yaml" --address "http://${IP[head]}:8265")
running() { in_node head "$VENV/bin/serve" status --address "http://${IP[head]}:8265" | grep -q "status: RUNNING"; }
wait_until "$DEPLOY_TIMEOUT_S" "the application to run" running
# HAProxy on each node picks up the ingress replica within a few health-check periods.
ready() { for node in w1 w2; do [ "$(code "$node" "http://localhost:8000/-/healthz")" = 200 ] || return 1; done; }
wait_until 60 "every worker's :8000/-/healthz" ready || true

echo "--- after serve deploy"
in_node head "$VENV/bin/python" - "${IP[head]}" <<'EOF'
import sys
from collections import Counter

from ray.util.state import list_actors, list_nodes

address = f"http://{sys.argv[1]}:8265"
ips = {n.node_id: n.node_ip for n in list_nodes(address=address)}
for node_id, ip in sorted(ips.items(), key=lambda kv: kv[1]):
    print(f"node {node_id[:8]} = {ip}")
alive = list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
where = Counter((ips.get(a.node_id, "?"), a.class_name) for a in alive if "Serve" in a.class_name or "Proxy" in a.class_name)
for (ip, cls), n in sorted(where.items()):
    print(f"actor on {ip}: {cls} x{n}")
EOF
failed=0
for node in "${NODES[@]}"; do
    echo "$node ${IP[$node]}:8000/-/healthz -> $(code "$node" "http://${IP[$node]}:8000/-/healthz") (own namespace)," \
        "from head -> $(code head "http://${IP[$node]}:8000/-/healthz")," \
        "body: $(in_node "$node" curl -s -m 10 "http://localhost:8000/-/healthz" || true)"
    echo "$node :52365/api/healthz (the probes' HTTP check, Ray >= 2.53) -> $(code "$node" "http://localhost:52365/api/healthz")"
    rc=0
    if [ "$node" = head ]; then
        in_node "$node" bash -c "$HEAD_PROBE" >/dev/null 2>&1 || rc=$?
        echo "head probe (bash -c \"wget ...:52365/api/local_raylet_healthz ... && wget ...:8265/api/gcs_healthz ...\") -> exit $rc"
    else
        in_node "$node" bash -c "$PROBE" >/dev/null 2>&1 || rc=$?
        echo "$node worker readiness probe (bash -c \"wget ...:52365/api/local_raylet_healthz ... && wget ...:8000/-/healthz ...\") -> exit $rc"
    fi
    [ "$rc" = 0 ] || failed=1
    predict=(-X POST -H "Content-Type: application/json" -d '{"model_id": "sentiment", "input_data": "This movie was great!"}')
    echo "$node POST ${IP[$node]}:8000/predict -> with key $(code "$node" "http://${IP[$node]}:8000/predict" \
        -m 120 -H "Authorization: Bearer $MMS_API_KEY" "${predict[@]}"), without $(code "$node" "http://${IP[$node]}:8000/predict" "${predict[@]}")"
done
for cfg in "$H"/*/haproxy.cfg; do  # where each node's HAProxy sends :8000 (its folder: the node's id)
    [ -e "$cfg" ] || continue
    id=$(basename "$(dirname "$cfg")")
    grep -hE '^\s*(bind \*:|server )' "$cfg" | sed "s/^ */node ${id:0:8} haproxy.cfg: /"
done
echo "head :8265/api/jobs/ -> without the Ray token $(code head "http://${IP[head]}:8265/api/jobs/")," \
    "with it $(code head "http://${IP[head]}:8265/api/jobs/" -H "Authorization: Bearer $RAY_AUTH_TOKEN")"
[ "$failed" = 0 ] && echo "PASS: every node passes its probe" || echo "FAIL: a node fails its probe"
exit "$failed"
