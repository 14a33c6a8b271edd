#!/usr/bin/env bash
# Failover drill: the primary LLM fails 30% of requests (503), a backup is
# healthy. Clients must see 0 errors; the table shows what a failover adds
# to latency (p50/p99) against the same load with a healthy primary.
# Both upstreams are `sluice mock` processes on real sockets, so a failover
# costs what it would against a remote provider on a fast network.
#
#   bash bench/drill.sh            # RATE=500 DURATION=10 FAILURE_RATE=0.3
# Not part of CI. Needs python3 and a release build (built if missing).
set -euo pipefail
BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$(dirname "$BENCH_DIR")"
RATE=${RATE:-500}
DURATION=${DURATION:-10}
FAILURE_RATE=${FAILURE_RATE:-0.3}
SLUICE_BIN=${SLUICE_BIN:-target/release/sluice}
[[ -x $SLUICE_BIN ]] || cargo build --release
WORK=$(mktemp -d "${TMPDIR:-/tmp}/sluice-drill.XXXXXX")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

wait_up() {  # $1 = url
  for _ in $(seq 100); do curl -fs -o /dev/null "$1" && return 0; sleep 0.1; done
  echo "drill: $1 did not come up" >&2; exit 1
}

run_case() {  # $1 = label, $2 = primary failure rate
  local label=$1 rate=$2
  "$SLUICE_BIN" mock --listen 127.0.0.1:18100 --failure-rate "$rate" --status 503 >/dev/null 2>&1 & PIDS+=($!)
  "$SLUICE_BIN" mock --listen 127.0.0.1:18101 >/dev/null 2>&1 & PIDS+=($!)
  cat >"$WORK/drill.yaml" <<YAML
listen: 127.0.0.1:18180
admin: { listen: 127.0.0.1:18190 }
upstreams:
  primary: { url: "http://127.0.0.1:18100" }
  backup: { url: "http://127.0.0.1:18101" }
pools:
  llm:
    members: [primary, backup]
    # A drill wants every failure to fail over, not to open the circuit.
    circuit_breaker: { failures: 1000000, cooldown: 1s }
routes:
  - name: chat
    match: { path_prefix: /v1/ }
    auth: none
    upstream: llm
YAML
  "$SLUICE_BIN" run --config "$WORK/drill.yaml" >/dev/null 2>&1 & PIDS+=($!)
  wait_up http://127.0.0.1:18100/health
  wait_up http://127.0.0.1:18101/health
  wait_up http://127.0.0.1:18190/readyz
  local result
  result=$(python3 "$BENCH_DIR/openloop.py" --url http://127.0.0.1:18180/v1/chat/completions \
    --rate "$RATE" --duration "$DURATION" --connections 8 | grep -m1 '^RESULT ')
  local failovers
  failovers=$(curl -s http://127.0.0.1:18190/metrics | awk '/^sluice_failovers_total\{pool="llm"\}/ {print $2}')
  echo "$label $result failovers=${failovers:-0}"
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
}

echo "# failover drill: ${RATE} req/s for ${DURATION}s, primary failing ${FAILURE_RATE} of requests with 503"
base=$(run_case healthy 0)
drill=$(run_case drill "$FAILURE_RATE")
echo "$base"
echo "$drill"
python3 - "$base" "$drill" <<'PY'
import re, sys
def parse(line):
    return dict(re.findall(r'(\w+)=([\d.]+)', line))
b, d = parse(sys.argv[1]), parse(sys.argv[2])
print()
print("| case | req/s | errors | failovers | p50 | p99 |")
print("|---|---:|---:|---:|---:|---:|")
for name, r in (("healthy primary", b), ("primary failing", d)):
    print(f"| {name} | {float(r['rps']):,.0f} | {r['errors']} | {r['failovers']} | {r['p50_us']} µs | {r['p99_us']} µs |")
print(f"| added by failovers | | | | +{int(d['p50_us']) - int(b['p50_us'])} µs | +{int(d['p99_us']) - int(b['p99_us'])} µs |")
PY
