#!/usr/bin/env bash
# Side-by-side comparison of certmq and Mosquitto (SPEC 11) on this machine.
#
#   benches/compare.sh            # default sizes, about 3-5 minutes after the build
#
# What it does: builds certmq and the load generator in release, writes a demo PKI
# (`certmq demo-pki`), configures both brokers with the same mutual-TLS setup on
# 127.0.0.1, starts them, runs every workload against each in turn with the same
# generator, and prints one table: figure, certmq, mosquitto, ratio (certmq/mosquitto).
# Raw results (one JSON object per line) are kept in $RESULTS
# (default $CARGO_TARGET_DIR/compare-results.jsonl).
#
# Sizes (environment): CONNECT_N=2000 CONNECT_C=16 FAN_IN_P=8 FAN_OUT_S=8 FLOW_SECS=5
# IDLE_N=10000; paced flows: PACED_RATE=1000 messages/s per publisher. Ports: CERTMQ_PORT=18883 MOSQ_PORT=18884. KEEP=1 keeps the work folder.
#
# File descriptors: every idle connection costs one descriptor in the generator and one in
# the broker. The script raises the soft RLIMIT_NOFILE of this shell, which both brokers
# and the generator inherit, to the hard limit (`ulimit -n`), and lowers IDLE_N (saying
# so) when even that is too small.
#
# Parity: Mosquitto trusts root + intermediate (it cannot trust an intermediate alone),
# certmq the intermediate; neither checks a CRL; both log warnings and errors only;
# Mosquitto has `set_tcp_nodelay true` (NOTES.md: ~40 ms per connection without it) and
# keeps its default queue limits (max_inflight_messages 20, max_queued_messages 1000;
# certmq: max_inflight 64, max_queued_messages 1000).
set -euo pipefail

cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
CONNECT_N="${CONNECT_N:-2000}"
CONNECT_C="${CONNECT_C:-16}"
FAN_IN_P="${FAN_IN_P:-8}"
FAN_OUT_S="${FAN_OUT_S:-8}"
FLOW_SECS="${FLOW_SECS:-5}"
IDLE_N="${IDLE_N:-10000}"
PACED_RATE="${PACED_RATE:-1000}"
CERTMQ_PORT="${CERTMQ_PORT:-18883}"
MOSQ_PORT="${MOSQ_PORT:-18884}"

say() { echo "[compare] $*" >&2; }

# --- file descriptors -------------------------------------------------------------------
hard="$(ulimit -Hn)"
if [ "$hard" = unlimited ]; then hard=1048576; fi
ulimit -n "$hard"
if [ "$((IDLE_N + 256))" -gt "$hard" ]; then
    IDLE_N="$((hard - 256))"
    say "RLIMIT_NOFILE is $hard: idle uses $IDLE_N connections instead"
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

if ! command -v mosquitto >/dev/null; then
    say "installing mosquitto"
    apt-get install -y mosquitto || { apt-get update && apt-get install -y mosquitto; }
fi
MOSQUITTO="$(command -v mosquitto || echo /usr/sbin/mosquitto)"

# --- PKI and configs --------------------------------------------------------------------
WORK="$(mktemp -d)"
RESULTS="${RESULTS:-$CARGO_TARGET_DIR/compare-results.jsonl}"
CERTMQ_PID=""
MOSQ_PID=""
cleanup() {
    for pid in $CERTMQ_PID $MOSQ_PID; do
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

# --- brokers ----------------------------------------------------------------------------
wait_port() {
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    say "nothing listens on port $1"; return 1
}
RUST_LOG=warn "$CERTMQ" serve --config "$WORK/certmq.toml" 2>"$WORK/certmq.log" &
CERTMQ_PID=$!
"$MOSQUITTO" -c "$WORK/mosquitto.conf" 2>"$WORK/mosquitto.log" &
MOSQ_PID=$!
wait_port "$CERTMQ_PORT"
wait_port "$MOSQ_PORT"
say "certmq pid $CERTMQ_PID on $CERTMQ_PORT, mosquitto pid $MOSQ_PID on $MOSQ_PORT ($("$MOSQUITTO" -h | head -n 1))"

# --- workloads --------------------------------------------------------------------------
: >"$RESULTS"
COMMON=(--host 127.0.0.1 --ca "$PKI/root.pem"
    --issuer-cert "$PKI/intermediate.pem" --issuer-key "$PKI/intermediate.key"
    --devices-dir "$WORK/devices"
    --sub-cert "$PKI/backend.pem" --sub-key "$PKI/backend.key" --json)

# run NAME WORKLOAD [OPTIONS...]: runs it against certmq, then against mosquitto.
run() {
    local name="$1"
    shift
    for broker in certmq mosquitto; do
        local port="$CERTMQ_PORT" pid="$CERTMQ_PID"
        if [ "$broker" = mosquitto ]; then port="$MOSQ_PORT" pid="$MOSQ_PID"; fi
        "$LOAD" "$@" "${COMMON[@]}" --port "$port" --pid "$pid" --label "$broker" \
            | jq -c --arg name "$name" '.workload = $name' >>"$RESULTS"
    done
}

START=$SECONDS
# Idle first, on fresh brokers: memory freed by earlier workloads would hide the cost.
run idle idle -n "$IDLE_N" -c 32 --settle 2
# Devices never seen by either broker (certmq provisions each one), then the same again.
run connect-first connect -n "$CONNECT_N" -c "$CONNECT_C" --device-offset 100000
run connect connect -n "$CONNECT_N" -c "$CONNECT_C" --device-offset 100000
# Flows unpaced (throughput at saturation: the generator shares the 2 cores, and what a
# broker cannot forward shows as `lost` or as queueing latency), then paced at the same
# offered load for both brokers (latency below saturation).
for qos in 0 1; do
    run "fan-in-qos$qos" fan-in --publishers "$FAN_IN_P" --qos "$qos" --duration "$FLOW_SECS"
    run "fan-out-qos$qos" fan-out --subscribers "$FAN_OUT_S" --qos "$qos" --duration "$FLOW_SECS"
done
for qos in 0 1; do
    run "fan-in-qos$qos-paced" fan-in --publishers "$FAN_IN_P" --qos "$qos" \
        --duration "$FLOW_SECS" --rate "$PACED_RATE"
    run "fan-out-qos$qos-paced" fan-out --subscribers "$FAN_OUT_S" --qos "$qos" \
        --duration "$FLOW_SECS" --rate "$PACED_RATE"
done
# Durability (issue 4): QoS 1 fan-in to a persistent subscriber (clean session 0), so every
# message must be kept for it. certmq commits each one (group commit, fsync) before its
# PUBACK; Mosquitto restarts with `persistence true`, which keeps messages in memory and
# writes them to disk on its autosave interval (and at exit), losing what came since on a
# crash: the stronger guarantee is certmq's.
kill "$MOSQ_PID" 2>/dev/null || true
wait "$MOSQ_PID" 2>/dev/null || true
sed -i 's/^persistence false$/persistence true/' "$WORK/mosquitto.conf"
echo "persistence_location $WORK/" >>"$WORK/mosquitto.conf"
"$MOSQUITTO" -c "$WORK/mosquitto.conf" 2>>"$WORK/mosquitto.log" &
MOSQ_PID=$!
wait_port "$MOSQ_PORT"
run "fan-in-qos1-durable" fan-in --publishers "$FAN_IN_P" --qos 1 --duration "$FLOW_SECS" \
    --persistent-subscribers
say "workloads took $((SECONDS - START)) s"

# --- table ------------------------------------------------------------------------------
echo
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "sizes: connect N=$CONNECT_N C=$CONNECT_C; fan-in P=$FAN_IN_P, fan-out S=$FAN_OUT_S, ${FLOW_SECS} s each (paced: $PACED_RATE msg/s per publisher); idle N=$IDLE_N"
jq -rs '
  def fmt: if . == null then "-" elif (. | fabs) >= 100 then (. * 10 | round / 10 | tostring)
           else (. * 1000 | round / 1000 | tostring) end;
  ["connections", "concurrency", "publishers", "subscribers", "payload_bytes", "server_cpu_s"] as $skip
  | (map(select(.broker == "mosquitto")) | map({key: .workload, value: .figures}) | from_entries) as $m
  | (["figure", "certmq", "mosquitto", "ratio"] | @tsv),
    (.[] | select(.broker == "certmq") | .workload as $w | .figures | to_entries[]
     | select(.key as $k | $skip | index($k) | not)
     | ($m[$w][.key]) as $mv
     | [($w + " " + .key), (.value | fmt), ($mv | fmt),
        (if $mv == null or $mv == 0 or .value == null then "-"
         else (.value / $mv * 100 | round / 100 | tostring) + "x" end)]
     | @tsv)
' "$RESULTS" | column -t -s $'\t'
say "raw results: $RESULTS"
