#!/usr/bin/env bash
# Retained publishing rate per connection (issue: ~400 messages/s, one fsync each).
#
#   benches/retained.sh           # about 1 minute after the build
#
# Builds certmq and the load generator in release, writes a demo PKI, starts certmq on
# 127.0.0.1 with its message store in a temporary folder, and runs `fan-in` with ONE
# publisher whose every PUBLISH has RETAIN set (each replaces its topic's retained
# message, which the broker stores), at QoS 0 and QoS 1, then the same without RETAIN
# for reference. Prints one line per run: delivered messages/s (what the subscriber
# received over the run) and the publisher's send rate.
#
# Sizes (environment): FLOW_SECS=5 WINDOW=32 (QoS 1 PUBLISHes in flight). Port:
# CERTMQ_PORT=18885. KEEP=1 keeps the work folder.
set -euo pipefail

cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
FLOW_SECS="${FLOW_SECS:-5}"
WINDOW="${WINDOW:-32}"
CERTMQ_PORT="${CERTMQ_PORT:-18885}"

say() { echo "[retained] $*" >&2; }

say "building certmq and the load generator (release)"
cargo build --release --bin certmq
LOAD="$(cargo bench --bench load --no-run --message-format=json \
    | jq -r 'select(.reason == "compiler-artifact" and .target.name == "load"
                    and .executable != null) | .executable' | tail -n 1)"
CERTMQ="$CARGO_TARGET_DIR/release/certmq"

WORK="$(mktemp -d)"
CERTMQ_PID=""
cleanup() {
    if [ -n "$CERTMQ_PID" ]; then
        kill "$CERTMQ_PID" 2>/dev/null || true
        wait "$CERTMQ_PID" 2>/dev/null || true
    fi
    if [ "${KEEP:-0}" = 1 ]; then say "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

PKI="$WORK/pki"
"$CERTMQ" demo-pki --out "$PKI" >/dev/null
cat >"$WORK/certmq.toml" <<CONF
[server]
bind = "127.0.0.1:$CERTMQ_PORT"
cert_chain = "$PKI/server.pem"
private_key = "$PKI/server.key"
data_dir = "$WORK/certmq-data"

[[anchor]]
name = "fleet"
certificate = "$PKI/intermediate.pem"
cn_regex = '^(.+)\.devices\.example\.com\$'
create_devices = true
acl = "device"

[[device]]
name = "backend"
certificate = "$PKI/backend.pem"
acl = "backend"

[acl.backend]
publish = ["devices/#"]
subscribe = ["devices/#"]
CONF

RUST_LOG=warn "$CERTMQ" serve --config "$WORK/certmq.toml" 2>"$WORK/certmq.log" &
CERTMQ_PID=$!
for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$CERTMQ_PORT") 2>/dev/null; then break; fi
    sleep 0.1
done

COMMON=(fan-in --publishers 1 --duration "$FLOW_SECS" --window "$WINDOW"
    --host 127.0.0.1 --port "$CERTMQ_PORT" --ca "$PKI/root.pem"
    --issuer-cert "$PKI/intermediate.pem" --issuer-key "$PKI/intermediate.key"
    --devices-dir "$WORK/devices" --pid "$CERTMQ_PID"
    --sub-cert "$PKI/backend.pem" --sub-key "$PKI/backend.key" --json)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
printf '%-22s %16s %12s %10s\n' run delivered_per_s sent_per_s lost
for qos in 0 1; do
    for retain in --retain ""; do
        name="qos$qos${retain:+ retained}"
        # shellcheck disable=SC2086
        "$LOAD" "${COMMON[@]}" --qos "$qos" $retain --label "$name" \
            | jq -r --arg n "$name" '[$n, (.figures.delivered_per_s | round),
                (.figures.sent_per_s | round), .figures.lost] | @tsv' \
            | awk -F'\t' '{ printf "%-22s %16s %12s %10s\n", $1, $2, $3, $4 }'
    done
done
