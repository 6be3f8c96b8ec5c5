# Cluster rows of benches/compare.sh (issue 12, contract §12): sourced by compare.sh after
# its own workloads, never run alone. Rows `cluster-…`, selected with ONLY like the others:
#
#   ONLY='^cluster-' benches/compare.sh        # only these rows (Mosquitto and rumqttd idle)
#
# Starts a nats-server with JetStream (NATS_PORT, store in the work folder) and two certmq
# nodes with `[cluster]` configs (NODE_A_PORT, NODE_B_PORT): the standalone certmq's
# config with another `bind` and `data_dir`, `node = "bench-a"` / `"bench-b"`,
# `replicas = 1`. Then, beside the standalone certmq that compare.sh already runs:
#
# - cluster-fan-in-qos0, cluster-fan-in-qos1: FAN_IN_P publishers, one subscriber, three
#   placements in turn: `standalone` (all on the standalone certmq), `one-node` (all on
#   node A) and `cross-node` (publishers on A, the subscriber on B: every message crosses
#   NATS). CLUSTER_ROUNDS rounds (default FAN_IN_ROUNDS). Besides the generator's figures,
#   `all_cpu_us_per_delivered` is the CPU of every broker process involved (standalone:
#   itself; cluster: both nodes and nats-server) per delivered message, also per process,
#   and `node_a_dropped` / `node_b_dropped` what each node's certmq_messages_dropped_total
#   counted meanwhile (the nodes have admin_bind NODE_A_ADMIN, NODE_B_ADMIN).
# - cluster-fan-in-qos0-paced, cluster-fan-in-qos1-paced: the same, once, at PACED_RATE
#   messages/s per publisher (latency below saturation).
# - cluster-connect-first, cluster-connect: the connect workload (CONNECT_N, CONNECT_C) on
#   the standalone certmq, then on node A and node B at once (two generators in parallel,
#   distinct devices), first with devices never seen, then again. `nats_cpu_ms_per_connect`
#   is nats-server's CPU over both nodes' connects.
#
# Prints two tables (flows with ratios cross-node / standalone and cross-node / one node;
# connects with each node / standalone), and the every-round fan-in table.
# Devices: bench-<CLUSTER_OFFSET + i> (default 200000), apart from compare.sh's own.

NATS_PORT="${NATS_PORT:-54222}"
NODE_A_PORT="${NODE_A_PORT:-58883}"
NODE_B_PORT="${NODE_B_PORT:-58884}"
NODE_A_ADMIN="${NODE_A_ADMIN:-58893}"
NODE_B_ADMIN="${NODE_B_ADMIN:-58894}"
CLUSTER_ROUNDS="${CLUSTER_ROUNDS:-$FAN_IN_ROUNDS}"
CLUSTER_OFFSET="${CLUSTER_OFFSET:-200000}"
NATS_SERVER="${NATS_SERVER:-$(command -v nats-server || echo /usr/sbin/nats-server)}"
CLUSTER_ROWS=(cluster-fan-in-qos0 cluster-fan-in-qos1 cluster-fan-in-qos0-paced
    cluster-fan-in-qos1-paced cluster-connect-first cluster-connect)
NATS_PID=""
NODE_A_PID=""
NODE_B_PID=""

cluster_wanted() {
    local row
    for row in "${CLUSTER_ROWS[@]}"; do
        if [[ "$row" =~ $ONLY ]]; then return 0; fi
    done
    return 1
}

cluster_stop() {
    for pid in $NODE_A_PID $NODE_B_PID $NATS_PID; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
}

# node_config NAME PORT ADMIN_PORT: the standalone config with its own bind, data_dir and
# admin_bind (/metrics: where messages were dropped), and [cluster].
node_config() {
    sed -e "s|^bind = .*|bind = \"127.0.0.1:$2\"\nadmin_bind = \"127.0.0.1:$3\"|" \
        -e "s|^data_dir = .*|data_dir = \"$WORK/$1-data\"|" "$WORK/certmq.toml" \
        >"$WORK/$1.toml"
    cat >>"$WORK/$1.toml" <<EOF

[cluster]
node = "$1"
nats = ["nats://127.0.0.1:$NATS_PORT"]
prefix = "certmq"
replicas = 1
EOF
}

cluster_start() {
    [ -x "$NATS_SERVER" ] || { say "nats-server not found (set NATS_SERVER)"; exit 1; }
    for var in NATS_PORT NODE_A_PORT NODE_B_PORT NODE_A_ADMIN NODE_B_ADMIN; do
        if (exec 3<>"/dev/tcp/127.0.0.1/${!var}") 2>/dev/null; then
            say "port ${!var} is already in use: set $var to a free port"
            exit 1
        fi
    done
    trap 'cluster_stop; cleanup' EXIT
    "$NATS_SERVER" -a 127.0.0.1 -p "$NATS_PORT" -js -sd "$WORK/nats-store" \
        2>"$WORK/nats.log" &
    NATS_PID=$!
    wait_port "$NATS_PORT" "$NATS_PID"
    node_config bench-a "$NODE_A_PORT" "$NODE_A_ADMIN"
    node_config bench-b "$NODE_B_PORT" "$NODE_B_ADMIN"
    # One after the other: the first creates the streams and buckets.
    RUST_LOG=warn "$CERTMQ" serve --config "$WORK/bench-a.toml" 2>"$WORK/bench-a.log" &
    NODE_A_PID=$!
    wait_port "$NODE_A_PORT" "$NODE_A_PID"
    RUST_LOG=warn "$CERTMQ" serve --config "$WORK/bench-b.toml" 2>"$WORK/bench-b.log" &
    NODE_B_PID=$!
    wait_port "$NODE_B_PORT" "$NODE_B_PID"
    say "cluster: $("$NATS_SERVER" --version) pid $NATS_PID on $NATS_PORT, node bench-a pid $NODE_A_PID on $NODE_A_PORT, node bench-b pid $NODE_B_PID on $NODE_B_PORT"
}

# record NAME LABEL EXTRA_JSON: the generator's JSON line on stdin, tagged and appended.
record() {
    jq -c --arg name "$1" --arg broker "$2" --argjson round "$ROUND" --arg load "$(load1)" \
        --argjson extra "$3" \
        '.workload = $name | .broker = $broker | .round = $round
         | .load = ($load | tonumber) | .figures += $extra' >>"$RESULTS"
}

# dropped ADMIN_PORT: a node's certmq_messages_dropped_total, every reason summed.
dropped() {
    curl -fsS "http://127.0.0.1:$1/metrics" \
        | awk '/^certmq_messages_dropped_total\{/ { n += $2 } END { print n + 0 }'
}

# cluster_flow QOS [RATE]: the three placements of fan-in at QOS (paced at RATE messages/s
# per publisher when given), one round. Extra figures: the CPU of every broker process
# involved, per process and in all, per delivered message, and the messages each node
# counted as dropped (certmq_messages_dropped_total) during the run.
cluster_flow() {
    local qos="$1" rate="${2:-0}" name="cluster-fan-in-qos$1"
    [ "$rate" = 0 ] || name="$name-paced"
    [[ "$name" =~ $ONLY ]] || return 0
    local placement pub_port sub_port out pid hz delivered extra
    local -a pids t0 t1
    hz="$(getconf CLK_TCK)"
    for placement in standalone one-node cross-node; do
        case "$placement" in
            standalone) pub_port=$CERTMQ_PORT sub_port=$CERTMQ_PORT pids=("$CERTMQ_PID") ;;
            one-node) pub_port=$NODE_A_PORT sub_port=$NODE_A_PORT ;;
            cross-node) pub_port=$NODE_A_PORT sub_port=$NODE_B_PORT ;;
        esac
        [ "$placement" = standalone ] || pids=("$NODE_A_PID" "$NODE_B_PID" "$NATS_PID")
        say "$name round $ROUND: $placement (load $(load1))"
        local da0 db0 da1 db1
        da0="$(dropped "$NODE_A_ADMIN")"
        db0="$(dropped "$NODE_B_ADMIN")"
        t0=()
        for pid in "${pids[@]}"; do t0+=("$(cpu_ticks "$pid")"); done
        out="$("$LOAD" fan-in --publishers "$FAN_IN_P" --qos "$qos" --duration "$FLOW_SECS" \
            --rate "$rate" "${COMMON[@]}" --port "$pub_port" --sub-port "$sub_port" \
            --pid "${pids[0]}" --label "$placement")"
        t1=()
        for pid in "${pids[@]}"; do t1+=("$(cpu_ticks "$pid")"); done
        da1="$(dropped "$NODE_A_ADMIN")"
        db1="$(dropped "$NODE_B_ADMIN")"
        delivered="$(echo "$out" | jq '.figures.delivered')"
        if [ "$placement" = standalone ]; then
            extra="$(jq -cn --argjson t "$((t1[0] - t0[0]))" --argjson hz "$hz" \
                --argjson d "$delivered" \
                '($t / $hz) as $c | {all_cpu_s: $c,
                  all_cpu_us_per_delivered: ($c * 1e6 / ([$d, 1] | max))}')"
        else
            extra="$(jq -cn --argjson a "$((t1[0] - t0[0]))" --argjson b "$((t1[1] - t0[1]))" \
                --argjson n "$((t1[2] - t0[2]))" --argjson hz "$hz" --argjson d "$delivered" \
                --argjson da "$((da1 - da0))" --argjson db "$((db1 - db0))" \
                '([$d, 1] | max) as $m | (($a + $b + $n) / $hz) as $c
                 | {all_cpu_s: $c, all_cpu_us_per_delivered: ($c * 1e6 / $m),
                    node_a_cpu_us_per_delivered: ($a / $hz * 1e6 / $m),
                    node_b_cpu_us_per_delivered: ($b / $hz * 1e6 / $m),
                    nats_cpu_us_per_delivered: ($n / $hz * 1e6 / $m),
                    node_a_dropped: $da, node_b_dropped: $db}')"
        fi
        echo "$out" | record "$name" "$placement" "$extra"
    done
}

# cluster_connect NAME: standalone, then node A and node B at once (distinct devices).
# The first call meets devices nobody has seen; the standalone certmq gets a second round
# on node B's devices, which also issues their certificates before the parallel run (so
# neither generator issues certificates while the other measures).
cluster_connect() {
    local name="$1"
    [[ "$name" =~ $ONLY ]] || return 0
    local a_off="$CLUSTER_OFFSET" b_off="$((CLUSTER_OFFSET + CONNECT_N))"
    local args=(connect -n "$CONNECT_N" -c "$CONNECT_C" "${COMMON[@]}")
    say "$name: standalone (load $(load1))"
    "$LOAD" "${args[@]}" --device-offset "$a_off" --port "$CERTMQ_PORT" --pid "$CERTMQ_PID" \
        --label standalone | record "$name" standalone '{}'
    if [ "$name" = cluster-connect-first ]; then
        ROUND=2
        say "$name round 2: standalone, node B's devices (load $(load1))"
        "$LOAD" "${args[@]}" --device-offset "$b_off" --port "$CERTMQ_PORT" \
            --pid "$CERTMQ_PID" --label standalone | record "$name" standalone '{}'
        ROUND=1
    fi
    say "$name: node A and node B at once (load $(load1))"
    local n0 n1 a b
    n0="$(cpu_ticks "$NATS_PID")"
    "$LOAD" "${args[@]}" --device-offset "$a_off" --port "$NODE_A_PORT" --pid "$NODE_A_PID" \
        --label node-a >"$WORK/$name-a.json" &
    a=$!
    "$LOAD" "${args[@]}" --device-offset "$b_off" --port "$NODE_B_PORT" --pid "$NODE_B_PID" \
        --label node-b >"$WORK/$name-b.json" &
    b=$!
    wait "$a"
    wait "$b"
    n1="$(cpu_ticks "$NATS_PID")"
    local extra
    extra="$(jq -cn --argjson t "$((n1 - n0))" --argjson hz "$(getconf CLK_TCK)" \
        --argjson n "$((2 * CONNECT_N))" \
        '{nats_cpu_s: ($t / $hz), nats_cpu_ms_per_connect: ($t / $hz * 1000 / $n)}')"
    record "$name" node-a "$extra" <"$WORK/$name-a.json"
    record "$name" node-b "$extra" <"$WORK/$name-b.json"
}

cluster_workloads() {
    cluster_wanted || return 0
    cluster_start
    ROUND=1
    cluster_connect cluster-connect-first
    cluster_connect cluster-connect
    for ROUND in $(seq 1 "$CLUSTER_ROUNDS"); do
        for qos in 0 1; do cluster_flow "$qos"; done
    done
    ROUND=1
    for qos in 0 1; do cluster_flow "$qos" "$PACED_RATE"; done
}

cluster_tables() {
    cluster_wanted || return 0
    echo
    echo "cluster (issue 12): nats-server $("$NATS_SERVER" --version | sed 's/^nats-server: v//'), JetStream file store, replicas 1, two nodes and the standalone certmq on this machine; round 1"
    echo "fan-in: $FAN_IN_P publishers, 1 subscriber, ${FLOW_SECS} s (paced: $PACED_RATE msg/s per publisher); standalone = the standalone certmq; one-node = publishers and subscriber on node A; cross-node = publishers on A, subscriber on B"
    echo "server_cpu: the publishers' certmq; all_cpu: standalone certmq, or both nodes + nats-server; *_dropped: certmq_messages_dropped_total during the run"
    jq -rs "$JQ_DEFS"'
      ["sent", "sent_per_s", "acked", "rejected", "delivered", "delivered_per_s", "duplicates",
       "lost", "acked_lost", "latency_p50_ms", "latency_p99_ms", "latency_max_ms",
       "server_cpu_us_per_delivered", "all_cpu_us_per_delivered", "node_a_cpu_us_per_delivered",
       "node_b_cpu_us_per_delivered", "nats_cpu_us_per_delivered", "node_a_dropped",
       "node_b_dropped"] as $keep
      | map(select((.workload | startswith("cluster-fan-in")) and .round == 1)) as $r
      | (["figure", "standalone", "one-node", "cross-node", "cross/standalone", "cross/one-node"] | @tsv),
        ($r | map(.workload) | unique | .[] as $w
         | ($r | map(select(.workload == $w)) | map({key: .broker, value: .figures}) | from_entries) as $b
         | $keep[] | select($b["cross-node"][.] != null or $b["one-node"][.] != null)
         | . as $k | $b.standalone[$k] as $s | $b["one-node"][$k] as $o | $b["cross-node"][$k] as $c
         | [($w + " " + $k), ($s | fmt), ($o | fmt), ($c | fmt), ratio($c; $s), ratio($c; $o)]
         | @tsv)
    ' "$RESULTS" | column -t -s $'\t'
    echo
    echo "connect: $CONNECT_N connections, $CONNECT_C at a time; node-a and node-b run at once (two generators); server_cpu = that certmq process; nats_cpu over both nodes' connects"
    jq -rs "$JQ_DEFS"'
      ["connected", "failed", "connects_per_s", "connect_p50_ms", "connect_p99_ms",
       "server_cpu_ms_per_connect", "nats_cpu_ms_per_connect"] as $keep
      | map(select((.workload | startswith("cluster-connect")) and .round == 1)) as $r
      | (["figure", "standalone", "node-a", "node-b", "a+b", "a/standalone", "b/standalone"] | @tsv),
        (["cluster-connect-first", "cluster-connect"][] as $w
         | ($r | map(select(.workload == $w)) | map({key: .broker, value: .figures}) | from_entries) as $b
         | select($b["node-a"] != null)
         | $keep[] | . as $k | $b.standalone[$k] as $s | $b["node-a"][$k] as $a | $b["node-b"][$k] as $n
         | (if $k == "connects_per_s" or $k == "connected" or $k == "failed" then $a + $n else null end) as $sum
         | [($w + " " + $k), ($s | fmt), ($a | fmt), ($n | fmt), ($sum | fmt),
            ratio($a; $s), ratio($n; $s)]
         | @tsv)
    ' "$RESULTS" | column -t -s $'\t'
    echo
    echo "cluster fan-in, every round (acked_lost: PUBACK received, never delivered)"
    jq -rs "$JQ_DEFS"'
      (["workload", "round", "placement", "sent", "acked", "delivered", "delivered/s", "lost",
        "acked_lost", "p99_ms", "all_cpu_us/msg", "load"] | @tsv),
      (map(select(.workload | test("^cluster-fan-in-qos[01]$"))) | sort_by(.workload, .round) | .[]
       | [.workload, (.round | tostring), .broker, (.figures.sent | fmt), (.figures.acked | fmt),
          (.figures.delivered | fmt), (.figures.delivered_per_s | fmt), (.figures.lost | fmt),
          (.figures.acked_lost | fmt), (.figures.latency_p99_ms | fmt),
          (.figures.all_cpu_us_per_delivered | fmt), (.load | fmt)]
       | @tsv)
    ' "$RESULTS" | column -t -s $'\t'
}
