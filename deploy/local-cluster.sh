#!/usr/bin/env bash
# A Ray cluster on separate addresses on this machine: a head and two worker nodes, each in its own network
# namespace, joined by a bridge, serving the default model across the workers with `hire serve`.
#
#   deploy/local-cluster.sh up [sharded|replicas|tandem] [hire serve flags]
#                                                   start the nodes and serve (flags replace/extend the defaults):
#       sharded (the default): `hire serve --hosts 2 --replica-resource hire_driver`, the model sharded over two
#         host actors, one per worker, driven by the engine replica on the head;
#       replicas: `hire serve --replicas 2 --replica-resource hire_host`, a whole-model replica per worker;
#       tandem: `hire serve --draft stdlib-9m-tandem --replica-resource hire_driver`, the default pair: the coordinator
#         replica on the head drives the large model's and stdlib-9m-tandem's worker actors (a CPU each, placed by Ray).
#   deploy/local-cluster.sh down                    stop everything `up` started and remove it (idempotent)
#   deploy/local-cluster.sh status                  namespaces, links, Ray nodes and the Serve application
#   deploy/local-cluster.sh cut w1|w2|head          cut a node off the network (its link goes down)
#   deploy/local-cluster.sh heal w1|w2|head         link up again; a node Ray declared dead meanwhile rejoins anew
#   deploy/local-cluster.sh kill-replica w1|w2      SIGKILL the engine replica on that node (Serve starts another)
#   deploy/local-cluster.sh kill-host w1|w2         SIGKILL the shard host actor on that node (sharded mode)
#   deploy/local-cluster.sh kill-drafter|kill-verifier   SIGKILL the tandem worker actor, wherever it runs (tandem)
#
# Addresses: bridge hlc-br0 10.77.0.1/24 in this namespace; namespaces hlc-head 10.77.0.10, hlc-w1 10.77.0.11,
# hlc-w2 10.77.0.12. The head serves HTTP on 10.77.0.10:8000 and gRPC on 10.77.0.10:50051 (reachable from here):
#   export HIRE_API_KEY=$(cat /tmp/hire-lc/api_key)   # `up` makes the server's API key there
#   hire client --target 10.77.0.10:50051 "import os"; hire loadtest --target grpc://10.77.0.10:50051 ...
# Each worker has 1 CPU and one unit of the Ray resource `hire_host`, which a host actor or a replica takes (so
# one per worker); the head has 1 CPU and one `hire_driver`; the ingress stays on the head. The GCS declares a
# silent node dead after about 8 s (a health check every 1 s with a 1 s timeout, 4 misses: RAY_health_check_*).
# $HIRE_LOCAL_CLUSTER_WORKERS worker nodes instead of 2 (w3 at 10.77.0.13, ...): a spare node, on which a sharded
# group can be rebuilt after a worker is cut off. Needs root (ip netns). State, logs and each node's own Ray temp dir (ray-NODE, as on separate hosts):
# $HIRE_LOCAL_CLUSTER_DIR (default /tmp/hire-lc).
# Only these namespaces' processes are ever stopped: never `ray stop`, which would stop every Ray on the machine.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${HIRE_BIN:-$ROOT/.venv/bin}
STATE=${HIRE_LOCAL_CLUSTER_DIR:-/tmp/hire-lc}
BRIDGE=hlc-br0
NET=10.77.0
HEAD_IP=$NET.10
GCS_PORT=6379
NETNS_MARK=/etc/netns/.made-by-hire-local-cluster
UP_TIMEOUT=${HIRE_LOCAL_CLUSTER_TIMEOUT:-600}
WORKERS=()
declare -A IP=([head]=$NET.10)
for ((i = 1; i <= ${HIRE_LOCAL_CLUSTER_WORKERS:-2}; i++)); do WORKERS+=("w$i"); IP[w$i]=$NET.$((10 + i)); done
NODES=(head "${WORKERS[@]}")
export RAY_USAGE_STATS_ENABLED=0 RAY_health_check_period_ms=1000 RAY_health_check_timeout_ms=1000 \
  RAY_health_check_failure_threshold=4
# Ray's token authentication, with this cluster's own token (`up` writes it): every node and driver sends it.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$STATE/auth_token

say() { echo "local-cluster: $*" >&2; }
die() { say "$*"; exit 1; }
ns() { echo "hlc-$1"; }
in_ns() { local node=$1; shift; ip netns exec "$(ns "$node")" "$@"; }
node_arg() { [[ -n ${IP[${1:-}]:-} ]] || die "unknown node '${1:-}' (${NODES[*]})"; }
ns_pids() { ip netns pids "$(ns "$1")" 2>/dev/null || true; }
raylet_running() { local p; for p in $(ns_pids "$1"); do [[ $(cat "/proc/$p/comm" 2>/dev/null) == raylet ]] && return 0; done; return 1; }

# Stop every process in a node's namespace: TERM, then KILL what is left after 5 s.
stop_ns() {
  local pids; pids=$(ns_pids "$1")
  [[ -z $pids ]] && return 0
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 50); do [[ -z $(ns_pids "$1") ]] && return 0; sleep 0.1; done
  pids=$(ns_pids "$1"); [[ -n $pids ]] && kill -KILL $pids 2>/dev/null || true
}

make_net() {
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  ip addr replace "$NET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  local node n
  for node in "${NODES[@]}"; do
    n=$(ns "$node")
    ip netns list | grep -qx "$n\( .*\)\?" || ip netns add "$n"
    if ! ip link show "$n" >/dev/null 2>&1; then
      ip link add "$n" type veth peer name "$n-in"
      ip link set "$n-in" netns "$n"
      ip -n "$n" link set "$n-in" name eth0
    fi
    ip -n "$n" link set lo up
    ip -n "$n" addr replace "${IP[$node]}/24" dev eth0
    # As on a real host, this machine's hostname resolves to the node's own address inside its namespace
    # (`ip netns exec` mounts /etc/netns/NS/hosts over /etc/hosts): gloo, under jax.distributed, listens there.
    # An /etc/netns made here is marked, so that `down` removes it too.
    [[ -d /etc/netns ]] || { mkdir -p /etc/netns && touch "$NETNS_MARK"; }
    mkdir -p "/etc/netns/$n"
    printf '127.0.0.1 localhost\n%s %s\n' "${IP[$node]}" "$(hostname)" >"/etc/netns/$n/hosts"
    ip -n "$n" link set eth0 up
    ip link set "$n" master "$BRIDGE" up
  done
}

start_node() {
  local node=$1 args try
  mkdir -p "$STATE/logs"
  if [[ $node == head ]]; then
    args=(--head --port "$GCS_PORT" --num-cpus 1 --resources '{"hire_driver": 1}' --include-dashboard false)
  else
    args=(--address "$HEAD_IP:$GCS_PORT" --num-cpus 1 --resources '{"hire_host": 1}')
  fi
  # Ray gives a node 30 s to register: on a busy machine that can pass, so a second try follows a clean-up.
  for try in 1 2; do
    in_ns "$node" "$BIN/ray" start "${args[@]}" --node-ip-address "${IP[$node]}" --temp-dir "$STATE/ray-$node" \
      --object-store-memory 100000000 --disable-usage-stats >>"$STATE/logs/ray-$node.log" 2>&1 && return 0
    say "ray start failed on $node (try $try of 2)"
    stop_ns "$node"
  done
  tail -n 20 "$STATE/logs/ray-$node.log" >&2
  die "ray start failed on $node"
}

# Ray's view of the nodes: "IP ALIVE|DEAD" per line (a node that rejoined shows twice).
gcs_nodes() { "$BIN/python" -m cluster.faults nodes --address "$HEAD_IP:$GCS_PORT"; }

up() {
  local mode=sharded flags
  if [[ ${1:-} == sharded || ${1:-} == replicas || ${1:-} == tandem ]]; then mode=$1; shift; fi
  flags=(--replicas 2 --replica-resource hire_host)
  [[ $mode == sharded ]] && flags=(--hosts 2 --replica-resource hire_driver)
  [[ $mode == tandem ]] && flags=(--draft stdlib-9m-tandem --replica-resource hire_driver)
  [[ -f $STATE/serve.pid ]] && kill -0 "$(cat "$STATE/serve.pid")" 2>/dev/null && die "already up (down first)"
  make_net
  mkdir -p "$STATE"
  for secret in "$RAY_AUTH_TOKEN_PATH" "$STATE/api_key"; do  # Ray's token; hire serve's API key
    [[ -f $secret ]] || (umask 077 && "$BIN/python" -c "import secrets; print(secrets.token_hex(32))" >"$secret")
  done
  HIRE_API_KEY=$(cat "$STATE/api_key")
  export HIRE_API_KEY
  start_node head
  local workers=() pid
  for node in "${WORKERS[@]}"; do start_node "$node" & workers+=($!); done
  for pid in "${workers[@]}"; do wait "$pid" || die "a worker node did not start"; done
  say "Ray nodes up; serving $mode (log: $STATE/logs/serve.log)"
  in_ns head setsid "$BIN/hire" serve --address "$HEAD_IP:$GCS_PORT" --host 0.0.0.0 "${flags[@]}" "$@" \
    >"$STATE/logs/serve.log" 2>&1 </dev/null &
  echo $! >"$STATE/serve.pid"
  local deadline=$((SECONDS + UP_TIMEOUT))
  until grep -q "serving: HTTP" "$STATE/logs/serve.log"; do
    if ! kill -0 "$(cat "$STATE/serve.pid")" 2>/dev/null; then
      tail -n 30 "$STATE/logs/serve.log" >&2; die "hire serve exited"
    fi
    ((SECONDS < deadline)) || { tail -n 30 "$STATE/logs/serve.log" >&2; die "not serving after ${UP_TIMEOUT}s"; }
    sleep 1
  done
  say "test request: hire client --target $HEAD_IP:50051 --max-tokens 4 --temperature 0 import"
  "$BIN/hire" client --target "$HEAD_IP:50051" --wait 60 --timeout 60 --max-tokens 4 --temperature 0 "import" |
    sed 's/^/local-cluster: test request answered: /' >&2
  say "serving: HTTP http://$HEAD_IP:8000/v1, gRPC $HEAD_IP:50051 (hire client --target $HEAD_IP:50051 \"import os\")"
}

down() {
  local node all
  # every node this script made, however many workers it was started with
  mapfile -t all < <({ printf '%s\n' "${NODES[@]}"; ip netns list | sed -n 's/^hlc-\([a-z0-9]*\).*/\1/p'; } | sort -u)
  for node in "${all[@]}"; do stop_ns "$node" & done
  wait
  for node in "${all[@]}"; do
    ip netns del "$(ns "$node")" 2>/dev/null || true
    rm -rf "/etc/netns/$(ns "$node")"
    ip link del "$(ns "$node")" 2>/dev/null || true
  done
  ip link del "$BRIDGE" 2>/dev/null || true
  if [[ -f $NETNS_MARK ]]; then rm -f "$NETNS_MARK"; rmdir /etc/netns 2>/dev/null || true; fi
  rm -rf "$STATE"
  say "down"
}

status() {
  local node n state
  for node in "${NODES[@]}"; do
    n=$(ns "$node")
    if ! ip netns list | grep -qx "$n\( .*\)\?"; then echo "$node ${IP[$node]} absent"; continue; fi
    state=$(ip -o link show "$n" 2>/dev/null | grep -q "state UP\|,UP" && echo linked || echo cut)
    raylet_running "$node" && echo "$node ${IP[$node]} $state raylet" || echo "$node ${IP[$node]} $state no-raylet"
  done
  raylet_running head || return 0
  echo "ray:"; gcs_nodes | sed 's/^/  /'
  echo "engine replicas running: $(in_ns head "$BIN/python" -m cluster.faults running --address "$HEAD_IP:$GCS_PORT")"
  echo "engine replicas: $(in_ns head "$BIN/python" -m cluster.faults replicas --address "$HEAD_IP:$GCS_PORT")"
  local class
  for class in ShardWorker VerifyWorker DraftWorker; do
    echo "$class: $(in_ns head "$BIN/python" -m cluster.faults replicas --address "$HEAD_IP:$GCS_PORT" --class "$class")"
  done
}

cut() { node_arg "${1:-}"; ip link set "$(ns "$1")" down; say "$1 cut off"; }

heal() {
  node_arg "${1:-}"
  local node=$1 deadline=$((SECONDS + 60))
  ip link set "$(ns "$node")" up
  # Either the node is still a member (it comes back as it was), or the GCS declared it dead and its
  # raylet exits when it hears so: then its leftovers go and it joins again as a new node.
  while ((SECONDS < deadline)); do
    if ! raylet_running "$node"; then
      stop_ns "$node"
      [[ $node == head ]] && die "the head's raylet has exited: down and up again"
      start_node "$node"; say "$node rejoined as a new node"; return 0
    fi
    if gcs_nodes | grep -qx "${IP[$node]} ALIVE"; then say "$node linked again, still a member"; return 0; fi
    sleep 1
  done
  die "$node: neither alive nor gone after 60 s"
}

kill_actor() {  # NODE [--class CLASS]
  node_arg "${1:-}"
  local node=$1; shift
  in_ns head "$BIN/python" -m cluster.faults kill-replica --address "$HEAD_IP:$GCS_PORT" --ip "${IP[$node]}" "$@"
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  status) status ;;
  cut) cut "${2:-}" ;;
  heal) heal "${2:-}" ;;
  kill-replica) kill_actor "${2:-}" ;;
  kill-host) kill_actor "${2:-}" --class ShardWorker ;;
  kill-drafter|kill-verifier)
    class=DraftWorker; [[ $1 == kill-verifier ]] && class=VerifyWorker
    in_ns head "$BIN/python" -m cluster.faults kill-replica --address "$HEAD_IP:$GCS_PORT" --class "$class" ;;
  *) die "usage: $0 up [sharded|replicas|tandem] [hire serve flags] | down | status | cut|heal|kill-replica|kill-host NODE | kill-drafter | kill-verifier" ;;
esac
