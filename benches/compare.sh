#!/usr/bin/env bash
# Side-by-side comparison of certmq, Mosquitto and rumqttd (contract §11) on this machine.
#
#   benches/compare.sh                          # default sizes, about 8-10 minutes of workloads
#   ONLY='^fan-in-qos' benches/compare.sh       # only the workloads whose name matches
#
# What it does: builds certmq and the load generator in release, builds rumqttd 0.20 once
# into a cache folder outside the repository (about 10 minutes on 2 cores, skipped when
# already built), writes a demo PKI (`certmq demo-pki`), configures the three brokers with
# the same mutual-TLS setup on 127.0.0.1, starts them, runs every workload against each in
# turn with the same generator, and prints one table: figure, certmq, mosquitto, rumqttd,
# and certmq's ratio to each peer. The unpaced fan-in rows run FAN_IN_ROUNDS times (every
# round is listed in a second table: delivered/s, acknowledged-then-lost, p99 latency),
# and so does `fan-in-qos1-cli`, driven by Mosquitto's own command-line clients: FAN_IN_P
# `mosquitto_pub -l` streams of CLI_MSGS QoS 1 messages each into one `mosquitto_sub`.
# Raw results (one JSON object per line) are kept in $RESULTS
# (default $CARGO_TARGET_DIR/compare-results.jsonl).
#
# Sizes (environment): CONNECT_N=2000 CONNECT_C=16 STORM_N=5000 STORM_C=32 FAN_IN_P=8 FAN_OUT_S=8 FLOW_SECS=5
# IDLE_N=10000 FAN_IN_ROUNDS=2 CLI_MSGS=20000; paced flows: PACED_RATE=1000 messages/s per
# publisher, REPEAT=1 rounds of them (REPEAT=5: every paced row five times, and a table of
# the median and min-max of each broker's p99 over the rounds). IDLE_BIG_N=50000: the
# `idle-big` row, on freshly restarted brokers, from IDLE_SOURCES=4 loopback source
# addresses (one address has about 28,000 ports towards one server port); 0 skips it.
# Capacity (certmq only, restarted with queue and retained limits raised): QUEUED_SIZES=
# "10000 100000" messages for one offline session, RETAINED_SIZES="10000 100000" retained
# topics; empty skips them. Ports: CERTMQ_PORT=18883 MOSQ_PORT=18884 RUMQTTD_PORT=18885. rumqttd:
# RUMQTTD_CACHE (default ~/.cache/certmq-bench/rumqttd-0.20.0), or RUMQTTD=/path/to/rumqttd.
# KEEP=1 keeps the work folder.
#
# File descriptors: every idle connection costs one descriptor in the generator and one in
# the broker. The script raises the soft RLIMIT_NOFILE of this shell, which both brokers
# and the generator inherit, to the hard limit (`ulimit -n`); as root it first tries to
# raise the hard limit to what IDLE_BIG_N needs (at most /proc/sys/fs/nr_open; this needs
# CAP_SYS_RESOURCE, which a container may lack); it lowers IDLE_N and IDLE_BIG_N (saying
# so) when the limit is still too small.
#
# Parity: Mosquitto trusts root + intermediate (it cannot trust an intermediate alone),
# certmq the intermediate; neither checks a CRL; both log warnings and errors only;
# Mosquitto has `set_tcp_nodelay true` (NOTES.md: ~40 ms per connection without it) and
# keeps its default queue limits (max_inflight_messages 20, max_queued_messages 1000;
# certmq: max_inflight 64, max_queued_messages 1000). rumqttd trusts the root (it reads
# only the first certificate of its `capath`; clients send their intermediate), has
# `next_connection_delay_ms = 0` (its default 1 ms caps connects at 1,000/s), keeps its
# example config's limits (max_inflight_count 100, a commit log of 10 segments of 100 MB,
# max_outgoing_packet_count 200) and logs warnings only; it has no persistence.
set -euo pipefail

cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
CONNECT_N="${CONNECT_N:-2000}"
CONNECT_C="${CONNECT_C:-16}"
STORM_N="${STORM_N:-5000}"
STORM_C="${STORM_C:-32}"
FAN_IN_P="${FAN_IN_P:-8}"
FAN_OUT_S="${FAN_OUT_S:-8}"
FLOW_SECS="${FLOW_SECS:-5}"
IDLE_N="${IDLE_N:-10000}"
PACED_RATE="${PACED_RATE:-1000}"
CERTMQ_PORT="${CERTMQ_PORT:-18883}"
MOSQ_PORT="${MOSQ_PORT:-18884}"
RUMQTTD_PORT="${RUMQTTD_PORT:-18885}"
FAN_IN_ROUNDS="${FAN_IN_ROUNDS:-2}"
CLI_MSGS="${CLI_MSGS:-20000}"
REPEAT="${REPEAT:-1}"
IDLE_BIG_N="${IDLE_BIG_N:-50000}"
IDLE_SOURCES="${IDLE_SOURCES:-4}"
QUEUED_SIZES="${QUEUED_SIZES-10000 100000}"
RETAINED_SIZES="${RETAINED_SIZES-10000 100000}"
ONLY="${ONLY:-.}"
RUMQTTD_VERSION=0.20.0
RUMQTTD_CACHE="${RUMQTTD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/certmq-bench/rumqttd-$RUMQTTD_VERSION}"

say() { echo "[compare] $*" >&2; }

# --- file descriptors -------------------------------------------------------------------
want="$((IDLE_BIG_N + 1024))"
if [ "$(id -u)" = 0 ] && [ "$(ulimit -Hn)" != unlimited ] && [ "$(ulimit -Hn)" -lt "$want" ]; then
    nr_open="$(cat /proc/sys/fs/nr_open 2>/dev/null || echo 1048576)"
    ulimit -Hn "$((want < nr_open ? want : nr_open))" 2>/dev/null \
        || say "cannot raise the hard RLIMIT_NOFILE above $(ulimit -Hn) (no CAP_SYS_RESOURCE here)"
fi
hard="$(ulimit -Hn)"
if [ "$hard" = unlimited ]; then hard=1048576; fi
ulimit -n "$hard"
if [ "$((IDLE_N + 256))" -gt "$hard" ]; then
    IDLE_N="$((hard - 256))"
    say "RLIMIT_NOFILE is $hard: idle uses $IDLE_N connections instead"
fi
if [ "$((IDLE_BIG_N + 256))" -gt "$hard" ]; then
    IDLE_BIG_N="$((hard - 256))"
    say "RLIMIT_NOFILE is $hard: idle-big uses $IDLE_BIG_N connections instead"
fi
say "RLIMIT_NOFILE $(ulimit -n) for the brokers and the generator"

# --- build ------------------------------------------------------------------------------
say "building certmq and the load generator (release)"
cargo build --release --bin certmq
LOAD="$(cargo bench --bench load --no-run --message-format=json \
    | jq -r 'select(.reason == "compiler-artifact" and .target.name == "load"
                    and .executable != null) | .executable' | tail -n 1)"
CERTMQ="$CARGO_TARGET_DIR/release/certmq"
[ -x "$LOAD" ] || { say "could not find the load generator binary"; exit 1; }

if ! command -v mosquitto >/dev/null || ! command -v mosquitto_pub >/dev/null; then
    say "installing mosquitto and mosquitto-clients"
    apt-get install -y mosquitto mosquitto-clients \
        || { apt-get update && apt-get install -y mosquitto mosquitto-clients; }
fi
MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"

# rumqttd: built once, outside the repository, in its own target folder (an interrupted
# build resumes). Not --locked: its lock file pins metrics 0.22.1, which current rustc
# refuses (E0521); 0.22.4 builds.
RUMQTTD="${RUMQTTD:-$RUMQTTD_CACHE/bin/rumqttd}"
if [ ! -x "$RUMQTTD" ]; then
    say "building rumqttd $RUMQTTD_VERSION into $RUMQTTD_CACHE (once; about 10 minutes)"
    CARGO_TARGET_DIR="$RUMQTTD_CACHE/target" cargo install rumqttd \
        --version "$RUMQTTD_VERSION" --features verify-client-cert --root "$RUMQTTD_CACHE"
    rm -rf "$RUMQTTD_CACHE/target"
fi

# --- PKI and configs --------------------------------------------------------------------
WORK="$(mktemp -d)"
RESULTS="${RESULTS:-$CARGO_TARGET_DIR/compare-results.jsonl}"
CERTMQ_PID=""
MOSQ_PID=""
RUMQTTD_PID=""
cleanup() {
    for pid in $CERTMQ_PID $MOSQ_PID $RUMQTTD_PID; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ "${KEEP:-0}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

PKI="$WORK/pki"
"$CERTMQ" demo-pki --out "$PKI" >/dev/null
cat "$PKI/root.pem" "$PKI/intermediate.pem" >"$PKI/ca-bundle.pem"

cat >"$WORK/certmq.toml" <<EOF
[server]
bind = "127.0.0.1:$CERTMQ_PORT"
cert_chain = "$PKI/server.pem"
private_key = "$PKI/server.key"
data_dir = "$WORK/certmq-data"

[limits]
max_connections = 100000

# Every bench device: bench-<i>.devices.example.com, issued by the generator.
[[anchor]]
name = "fleet"
certificate = "$PKI/intermediate.pem"
cn_regex = '^(.+)\.devices\.example\.com\$'
create_devices = true
acl = "device"

# The bench subscriber reads every device's topic.
[[device]]
name = "backend"
certificate = "$PKI/backend.pem"
acl = "backend"

[acl.backend]
publish = ["devices/#"]
subscribe = ["devices/#"]
EOF

cat >"$WORK/mosquitto.conf" <<EOF
# Stay root: the key files are readable by root only.
user root
per_listener_settings false
persistence false
max_connections -1
log_dest stderr
log_type error
log_type warning
listener $MOSQ_PORT 127.0.0.1
cafile $PKI/ca-bundle.pem
certfile $PKI/server.pem
keyfile $PKI/server.key
require_certificate true
use_identity_as_username true
set_tcp_nodelay true
EOF

cat >"$WORK/rumqttd.toml" <<EOF
id = 0

[router]
max_connections = $((IDLE_BIG_N + 1000))
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "v4-1"
listen = "127.0.0.1:$RUMQTTD_PORT"
next_connection_delay_ms = 0
    [v4.1.tls]
    capath = "$PKI/root.pem"
    certpath = "$PKI/server.pem"
    keypath = "$PKI/server.key"
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 20480
    max_inflight_count = 100
    dynamic_filters = true
EOF

# --- brokers ----------------------------------------------------------------------------
# wait_port PORT PID: until PORT accepts, as long as PID (the broker started for it) lives.
wait_port() {
    for _ in $(seq 100); do
        kill -0 "$2" 2>/dev/null || { say "the broker for port $1 exited (see $WORK)"; return 1; }
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    say "nothing listens on port $1"; return 1
}
# A port something else already listens on would measure that process instead (the
# machine is shared): refuse, naming the variable to change.
for var in CERTMQ_PORT MOSQ_PORT RUMQTTD_PORT; do
    if (exec 3<>"/dev/tcp/127.0.0.1/${!var}") 2>/dev/null; then
        say "port ${!var} is already in use: set $var to a free port"
        exit 1
    fi
done
RUST_LOG=warn "$CERTMQ" serve --config "$WORK/certmq.toml" 2>"$WORK/certmq.log" &
CERTMQ_PID=$!
"$MOSQUITTO" -c "$WORK/mosquitto.conf" 2>"$WORK/mosquitto.log" &
MOSQ_PID=$!
"$RUMQTTD" -q -c "$WORK/rumqttd.toml" >"$WORK/rumqttd.log" 2>&1 &
RUMQTTD_PID=$!
wait_port "$CERTMQ_PORT" "$CERTMQ_PID"
wait_port "$MOSQ_PORT" "$MOSQ_PID"
wait_port "$RUMQTTD_PORT" "$RUMQTTD_PID"
say "certmq pid $CERTMQ_PID on $CERTMQ_PORT, mosquitto pid $MOSQ_PID on $MOSQ_PORT ($("$MOSQUITTO" -h | head -n 1)), rumqttd $RUMQTTD_VERSION pid $RUMQTTD_PID on $RUMQTTD_PORT"
say "load average before the workloads: $(cut -d' ' -f1-3 /proc/loadavg)"

# restart_brokers [certmq-config]: every broker stopped and started again on the same
# config (certmq on the one given), so that a row measures memory on a fresh process:
# memory freed by earlier rows would otherwise be reused and hide the cost.
restart_brokers() {
    local certmq_config="${1:-$WORK/certmq.toml}"
    for pid in $CERTMQ_PID $MOSQ_PID $RUMQTTD_PID; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    RUST_LOG=warn "$CERTMQ" serve --config "$certmq_config" 2>>"$WORK/certmq.log" &
    CERTMQ_PID=$!
    "$MOSQUITTO" -c "$WORK/mosquitto.conf" 2>>"$WORK/mosquitto.log" &
    MOSQ_PID=$!
    "$RUMQTTD" -q -c "$WORK/rumqttd.toml" >>"$WORK/rumqttd.log" 2>&1 &
    RUMQTTD_PID=$!
    wait_port "$CERTMQ_PORT" "$CERTMQ_PID"
    wait_port "$MOSQ_PORT" "$MOSQ_PID"
    wait_port "$RUMQTTD_PORT" "$RUMQTTD_PID"
    say "brokers restarted: certmq $CERTMQ_PID, mosquitto $MOSQ_PID, rumqttd $RUMQTTD_PID"
}

# --- workloads --------------------------------------------------------------------------
: >"$RESULTS"
COMMON=(--host 127.0.0.1 --ca "$PKI/root.pem"
    --issuer-cert "$PKI/intermediate.pem" --issuer-key "$PKI/intermediate.key"
    --devices-dir "$WORK/devices"
    --sub-cert "$PKI/backend.pem" --sub-key "$PKI/backend.key" --json)

BROKERS=(certmq mosquitto rumqttd)
port_of() {
    case "$1" in
        certmq) echo "$CERTMQ_PORT" ;;
        mosquitto) echo "$MOSQ_PORT" ;;
        rumqttd) echo "$RUMQTTD_PORT" ;;
    esac
}
pid_of() {
    case "$1" in
        certmq) echo "$CERTMQ_PID" ;;
        mosquitto) echo "$MOSQ_PID" ;;
        rumqttd) echo "$RUMQTTD_PID" ;;
    esac
}
load1() { cut -d' ' -f1 /proc/loadavg; }
# cpu_ticks PID: utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
ROUND=1

# run NAME WORKLOAD [OPTIONS...]: runs it against each broker in turn, when NAME matches
# $ONLY. The round and the 1-minute load average are recorded with each result.
run() {
    local name="$1"
    shift
    [[ "$name" =~ $ONLY ]] || return 0
    for broker in "${BROKERS[@]}"; do
        say "$name round $ROUND: $broker (load $(load1))"
        "$LOAD" "$@" "${COMMON[@]}" --port "$(port_of "$broker")" --pid "$(pid_of "$broker")" \
            --label "$broker" \
            | jq -c --arg name "$name" --argjson round "$ROUND" --arg load "$(load1)" \
                '.workload = $name | .round = $round | .load = ($load | tonumber)' >>"$RESULTS"
    done
}

# cli_fan_in: FAN_IN_P `mosquitto_pub -l` streams of CLI_MSGS QoS 1 messages each (devices
# bench-0.. from the generator's devices folder, each on its own topic) into one
# `mosquitto_sub` (the backend identity) on devices/+/bench, against each broker in turn.
# Payload "p<publisher>-<n>": mosquitto_pub numbers message ids from 1 in line order, so
# "received PUBACK (Mid: n, RC:0)" in its debug output (-d) acknowledges line n as a
# success (3.1.1 has no reason code; mosquitto_pub prints RC:0). acked_lost: lines acknowledged and never printed by the subscriber;
# delivered_per_s: messages received over first publish to the last arrival (%U stamps).
cli_fan_in() {
    local name=fan-in-qos1-cli
    [[ "$name" =~ $ONLY ]] || return 0
    # The devices' certificates, issued by the generator on its first fan-in run.
    if [ ! -e "$WORK/devices/bench-$((FAN_IN_P - 1)).pem" ]; then
        "$LOAD" fan-in --publishers "$FAN_IN_P" --duration 0.1 --rate 10 "${COMMON[@]}" \
            --port "$CERTMQ_PORT" --label certmq >/dev/null
    fi
    local total=$((FAN_IN_P * CLI_MSGS))
    for broker in "${BROKERS[@]}"; do
        say "$name round $ROUND: $broker (load $(load1))"
        local dir="$WORK/cli-$broker-$ROUND" port pid
        port="$(port_of "$broker")"
        pid="$(pid_of "$broker")"
        mkdir -p "$dir"
        local tls=(-h localhost -p "$port" --cafile "$PKI/root.pem")
        mosquitto_sub "${tls[@]}" --cert "$PKI/backend.pem" --key "$PKI/backend.key" \
            -i "cli-sub-$broker-$ROUND" -q 1 -t 'devices/+/bench' -F '%U %p' \
            >"$dir/sub.out" 2>"$dir/sub.err" &
        local sub=$!
        sleep 1 # for its SUBACK: mosquitto_sub prints nothing before the first message
        local cpu0 start pubs=()
        cpu0="$(cpu_ticks "$pid")"
        start="$(date +%s.%N)"
        for i in $(seq 0 $((FAN_IN_P - 1))); do
            seq -f "p$i-%.0f" 1 "$CLI_MSGS" \
                | mosquitto_pub "${tls[@]}" --cert "$WORK/devices/bench-$i.pem" \
                    --key "$WORK/devices/bench-$i.key" -i "cli-pub-$i-$broker-$ROUND" -q 1 \
                    -t "devices/bench-$i/bench" -l -d >"$dir/pub-$i.out" 2>&1 &
            pubs+=($!)
        done
        local failed=0
        for p in "${pubs[@]}"; do wait "$p" || failed=$((failed + 1)); done
        # Drain: until every message arrived or arrivals stopped for 2 s (60 s at most).
        local last=-1 same=0 now
        for _ in $(seq 600); do
            now="$(wc -l <"$dir/sub.out")"
            if [ "$now" -ge "$total" ]; then break; fi
            if [ "$now" = "$last" ]; then same=$((same + 1)); else same=0 last="$now"; fi
            if [ "$same" -ge 20 ]; then break; fi
            sleep 0.1
        done
        local cpu1
        cpu1="$(cpu_ticks "$pid")"
        kill "$sub" 2>/dev/null || true
        wait "$sub" 2>/dev/null || true
        for i in $(seq 0 $((FAN_IN_P - 1))); do
            sed -n "s/.* received PUBACK (Mid: \([0-9]*\), RC:0).*/p$i-\1/p" "$dir/pub-$i.out"
        done | sort -u >"$dir/acked"
        cut -d' ' -f2 "$dir/sub.out" | sort -u >"$dir/received"
        local delivered unique acked acked_lost last_s
        delivered="$(wc -l <"$dir/sub.out")"
        unique="$(wc -l <"$dir/received")"
        acked="$(wc -l <"$dir/acked")"
        acked_lost="$(comm -23 "$dir/acked" "$dir/received" | wc -l)"
        last_s="$(cut -d' ' -f1 "$dir/sub.out" | sort -n | tail -n 1)"
        jq -nc --arg broker "$broker" --arg name "$name" --argjson round "$ROUND" \
            --arg load "$(load1)" --argjson sent "$total" --argjson failed "$failed" \
            --argjson acked "$acked" --argjson delivered "$delivered" \
            --argjson unique "$unique" --argjson acked_lost "$acked_lost" \
            --arg start "$start" --arg last "${last_s:-0}" \
            --argjson cpu "$((cpu1 - cpu0))" --argjson hz "$(getconf CLK_TCK)" '
            { workload: $name, broker: $broker, round: $round, load: ($load | tonumber),
              figures: { publishers_failed: $failed, sent: $sent, acked: $acked,
                delivered: $delivered, duplicates: ($delivered - $unique),
                lost: ($sent - $unique), acked_lost: $acked_lost,
                delivered_per_s: (if $delivered == 0 then 0
                    else $delivered / (($last | tonumber) - ($start | tonumber)) end),
                server_cpu_s: ($cpu / $hz),
                server_cpu_us_per_delivered: ($cpu / $hz * 1e6 / ([$delivered, 1] | max)) } }' \
            >>"$RESULTS"
    done
}

# idle_big: IDLE_BIG_N idle connections on freshly restarted brokers, from IDLE_SOURCES
# loopback source addresses (127.0.0.1..): one source address has only
# ip_local_port_range's ports (about 28,000 here) towards one server port. The sysctl is
# left alone (it is machine-wide); 127.0.0.0/8 is local on Linux without configuration.
idle_big() {
    [[ idle-big =~ $ONLY ]] && [ "$IDLE_BIG_N" -gt 0 ] || return 0
    local sources=127.0.0.1 i
    for i in $(seq 2 "$IDLE_SOURCES"); do sources="$sources,127.0.0.$i"; done
    restart_brokers
    run idle-big idle -n "$IDLE_BIG_N" -c 32 --settle 5 --timeout 60 --source-addrs "$sources"
    restart_brokers
}

# capacity: certmq alone (the capacity sheet), restarted with its queue and retained
# limits raised so that one session (one device) holds every message, each size on a fresh
# process and data folder: QoS 1 messages queued for one offline persistent session (QUEUED_SIZES), and
# retained messages, one topic each (RETAINED_SIZES). 64-byte payloads. It runs last: the
# brokers are left as they are (certmq on the raised limits) until the script ends.
capacity() {
    [[ capacity =~ $ONLY ]] && [ -n "$QUEUED_SIZES$RETAINED_SIZES" ] || return 0
    local kind n
    for kind in queued retained; do
        local sizes=$QUEUED_SIZES
        [ "$kind" = retained ] && sizes=$RETAINED_SIZES
        for n in $sizes; do
            # A data folder of its own: retained messages are durable, and the previous
            # row's would be restored at start.
            sed -e 's/^max_connections = 100000$/max_connections = 100000\nmax_queued_messages = 10000000\nmax_retained_per_device = 10000000/' \
                -e "s|^data_dir = .*|data_dir = \"$WORK/certmq-data-$kind-$n\"|" \
                "$WORK/certmq.toml" >"$WORK/certmq-capacity.toml"
            restart_brokers "$WORK/certmq-capacity.toml"
            say "capacity-$kind-$n: certmq (load $(load1))"
            "$LOAD" "$kind" -n "$n" --settle 2 --timeout 60 "${COMMON[@]}" --port "$CERTMQ_PORT" \
                --pid "$CERTMQ_PID" --label certmq \
                | jq -c --arg name "capacity-$kind-$n" --arg load "$(load1)" \
                    '.workload = $name | .round = 1 | .load = ($load | tonumber)' >>"$RESULTS"
        done
    done
}

# paced: the paced rows, REPEAT rounds (the p99 of each broker, its median and range, is
# tabled at the end: one round's p99 on a shared machine is noise as much as a figure).
paced() {
    for ROUND in $(seq 1 "$REPEAT"); do
        for qos in 0 1; do
            run "fan-in-qos$qos-paced" fan-in --publishers "$FAN_IN_P" --qos "$qos" \
                --duration "$FLOW_SECS" --rate "$PACED_RATE"
            run "fan-out-qos$qos-paced" fan-out --subscribers "$FAN_OUT_S" --qos "$qos" \
                --duration "$FLOW_SECS" --rate "$PACED_RATE"
        done
    done
    ROUND=1
}

START=$SECONDS
# Idle first, on fresh brokers: memory freed by earlier workloads would hide the cost.
run idle idle -n "$IDLE_N" -c 32 --settle 2
idle_big
# Devices never seen by either broker (certmq provisions each one), then the same again.
run connect-first connect -n "$CONNECT_N" -c "$CONNECT_C" --device-offset 100000
run connect connect -n "$CONNECT_N" -c "$CONNECT_C" --device-offset 100000
# Reconnect storm: STORM_N devices connect once (STORM_C at a time; certmq provisions
# them), then all reconnect at the same moment resuming their TLS sessions (one client
# config per device, so each resumes its own).
run storm storm -n "$STORM_N" -c "$STORM_C" --resume --device-offset 200000
# Flows unpaced (throughput at saturation: the generator shares the 2 cores, and what a
# broker cannot forward shows as `lost` or as queueing latency), then paced at the same
# offered load for both brokers (latency below saturation).
for qos in 0 1; do
    run "fan-in-qos$qos" fan-in --publishers "$FAN_IN_P" --qos "$qos" --duration "$FLOW_SECS"
    run "fan-out-qos$qos" fan-out --subscribers "$FAN_OUT_S" --qos "$qos" --duration "$FLOW_SECS"
done
cli_fan_in
paced
# The unpaced fan-in rows again (rounds 2..FAN_IN_ROUNDS): the machine is shared.
for ROUND in $(seq 2 "$FAN_IN_ROUNDS"); do
    for qos in 0 1; do
        run "fan-in-qos$qos" fan-in --publishers "$FAN_IN_P" --qos "$qos" --duration "$FLOW_SECS"
    done
    cli_fan_in
done
ROUND=1
# Durability (issue 4): QoS 1 fan-in to a persistent subscriber (clean session 0), so every
# message must be kept for it. certmq commits each one (group commit, fsync) before its
# PUBACK; Mosquitto restarts with `persistence true`, which keeps messages in memory and
# writes them to disk on its autosave interval (and at exit), losing what came since on a
# crash: the stronger guarantee is certmq's. rumqttd keeps them in memory only.
if [[ fan-in-qos1-durable =~ $ONLY ]]; then
    kill "$MOSQ_PID" 2>/dev/null || true
    wait "$MOSQ_PID" 2>/dev/null || true
    sed -i 's/^persistence false$/persistence true/' "$WORK/mosquitto.conf"
    echo "persistence_location $WORK/" >>"$WORK/mosquitto.conf"
    "$MOSQUITTO" -c "$WORK/mosquitto.conf" 2>>"$WORK/mosquitto.log" &
    MOSQ_PID=$!
    wait_port "$MOSQ_PORT" "$MOSQ_PID"
    run "fan-in-qos1-durable" fan-in --publishers "$FAN_IN_P" --qos 1 --duration "$FLOW_SECS" \
        --persistent-subscribers
fi
# --- cluster rows (issue 12): two nodes on NATS JetStream ---------------------------------
# Everything about them is in benches/compare-cluster.sh (rows `cluster-…`, its own ports
# NATS_PORT NODE_A_PORT NODE_B_PORT); it reuses this script's PKI, config and generator.
# shellcheck source=benches/compare-cluster.sh
source benches/compare-cluster.sh
cluster_workloads
# --- end of the cluster rows ------------------------------------------------------------
capacity
say "workloads took $((SECONDS - START)) s"
say "load average after the workloads: $(cut -d' ' -f1-3 /proc/loadavg)"

# --- table ------------------------------------------------------------------------------
echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "sizes: connect N=$CONNECT_N C=$CONNECT_C; storm N=$STORM_N (warm-up C=$STORM_C); fan-in P=$FAN_IN_P, fan-out S=$FAN_OUT_S, ${FLOW_SECS} s each (paced: $PACED_RATE msg/s per publisher); idle N=$IDLE_N; cli fan-in $FAN_IN_P x $CLI_MSGS"
echo "brokers: certmq $(git describe --always --dirty 2>/dev/null || echo '?'), $("$MOSQUITTO" -h | head -n 1 | sed 's/^mosquitto version/mosquitto/'), rumqttd $RUMQTTD_VERSION"
JQ_DEFS='
  def fmt: if . == null then "-" elif (. | fabs) >= 100 then (. * 10 | round / 10 | tostring)
           else (. * 1000 | round / 1000 | tostring) end;
  def ratio($a; $b): if $b == null or $b == 0 or $a == null then "-"
                     else ($a / $b * 100 | round / 100 | tostring) + "x" end;'
# Round 1 of every workload: each of certmq's figures beside both peers'.
jq -rs "$JQ_DEFS"'
  ["connections", "concurrency", "publishers", "subscribers", "payload_bytes", "server_cpu_s"] as $skip
  | map(select((.round // 1) == 1)) as $r1
  | ($r1 | map(select(.broker == "mosquitto")) | map({key: .workload, value: .figures}) | from_entries) as $m
  | ($r1 | map(select(.broker == "rumqttd")) | map({key: .workload, value: .figures}) | from_entries) as $q
  | (["figure", "certmq", "mosquitto", "rumqttd", "vs mosquitto", "vs rumqttd"] | @tsv),
    ($r1[] | select(.broker == "certmq") | .workload as $w | .figures | to_entries[]
     | select(.key as $k | $skip | index($k) | not)
     | ($m[$w][.key]) as $mv | ($q[$w][.key]) as $qv
     | [($w + " " + .key), (.value | fmt), ($mv | fmt), ($qv | fmt),
        ratio(.value; $mv), ratio(.value; $qv)]
     | @tsv)
' "$RESULTS" | column -t -s $'\t'
# Every round of the unpaced fan-in rows: the figures the flow-control targets are about.
echo
echo "fan-in, every round (acked_lost: PUBACK 0x00 received, never delivered; load: 1-min load average)"
jq -rs "$JQ_DEFS"'
  (["workload", "round", "broker", "sent", "acked", "delivered", "delivered/s", "acked_lost",
    "p99_ms", "load"] | @tsv),
  (map(select(.workload | test("^fan-in-qos[01](-cli)?$"))) | sort_by(.workload, .round) | .[]
   | [.workload, (.round // 1 | tostring), .broker, (.figures.sent | fmt), (.figures.acked | fmt),
      (.figures.delivered | fmt), (.figures.delivered_per_s | fmt), (.figures.acked_lost | fmt),
      (.figures.latency_p99_ms | fmt), (.load | fmt)]
   | @tsv)
' "$RESULTS" | column -t -s $'\t'
cluster_tables # the cluster rows' tables (benches/compare-cluster.sh)
# The paced rows over their REPEAT rounds: each broker's p99 (and p50), median and range.
if [ "$REPEAT" -gt 1 ]; then
    echo
    echo "paced rows over $REPEAT rounds: median (min-max) per broker; ratio of certmq's median to the peer's"
    jq -rs "$JQ_DEFS"'
      def med: sort | if length % 2 == 1 then .[length / 2 | floor]
                      else (.[length / 2 - 1] + .[length / 2]) / 2 end;
      def span($k): map(.figures[$k]) | "\(med | fmt) (\(min | fmt)-\(max | fmt))";
      (["workload", "figure", "certmq", "mosquitto", "rumqttd", "vs mosquitto", "vs rumqttd"] | @tsv),
      (map(select((.workload | test("-paced$")) and (.workload | startswith("cluster-") | not))) | group_by(.workload)[] as $w
       | ["latency_p50_ms", "latency_p99_ms"][] as $k
       | ($w | map(select(.broker == "certmq"))) as $c
       | ($w | map(select(.broker == "mosquitto"))) as $m
       | ($w | map(select(.broker == "rumqttd"))) as $q
       | [$w[0].workload, ($k | sub("latency_"; "")), ($c | span($k)), ($m | span($k)), ($q | span($k)),
          ratio($c | map(.figures[$k]) | med; $m | map(.figures[$k]) | med),
          ratio($c | map(.figures[$k]) | med; $q | map(.figures[$k]) | med)]
       | @tsv)
    ' "$RESULTS" | column -t -s $'\t'
fi
# Capacity rows (certmq only): resident memory per message kept.
if jq -e -s 'any(.workload | startswith("capacity-"))' "$RESULTS" >/dev/null; then
    echo
    echo "capacity (certmq, fresh process per row, 64-byte payloads)"
    jq -rs "$JQ_DEFS"'
      (["row", "messages", "kept", "rss_before_mib", "rss_after_mib", "bytes_per_message", "load"] | @tsv),
      (map(select(.workload | startswith("capacity-")))[]
       | [.workload, (.figures.messages | fmt), ((.figures.queued // .figures.retained) | fmt),
          (.figures.rss_before_mib | fmt), (.figures.rss_after_mib | fmt),
          (.figures.rss_bytes_per_message | fmt), (.load | fmt)]
       | @tsv)
    ' "$RESULTS" | column -t -s $'\t'
fi
say "raw results: $RESULTS"
