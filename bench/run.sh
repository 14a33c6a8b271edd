#!/usr/bin/env bash
# Load bench for sluice: the same POST /v1/chat/completions load sent
#   (a) directly to a fast local upstream (an nginx answering a canned JSON),
#   (b) through nginx as a plain reverse proxy,
#   (c) through sluice,
# once closed-loop (wrk: saturation throughput) and once open-loop (a fixed
# request rate: latency without coordinated omission). Prints a markdown
# table at the end. See bench/README.md. Not part of CI.
#
#   bash bench/run.sh                      # everything, defaults
#   DURATION=5 SKIP_SLUICE=1 bash bench/run.sh
#
# Only loopback addresses are used. Every process it starts is stopped on
# exit (trap), nginx included; nothing is written outside a mktemp dir
# (except package installs when tools are missing).
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")
cd "$REPO_DIR"   # so the default SLUICE_BIN and `cargo build` refer to this repo

# ---------------------------------------------------------------- settings --
DURATION=${DURATION:-10}                 # seconds per measured run
CONNECTIONS=${CONNECTIONS:-32}           # closed-loop (wrk) connections
THREADS=${THREADS:-2}                    # wrk threads
RATE=${RATE:-2000}                       # open-loop requests per second
OPEN_CONNECTIONS=${OPEN_CONNECTIONS:-8}  # open-loop connections
WARMUP=${WARMUP:-2}                      # seconds of warm-up per target
PROXY_CPU=${PROXY_CPU:-0}                # core for the proxy under test
LOAD_CPU=${LOAD_CPU:-1}                  # core for the upstream + load generators
SKIP_SLUICE=${SKIP_SLUICE:-0}            # 1: only direct + nginx (no build needed)
FLOOR=${FLOOR:-0}                        # 1: also the bare hyper proxy (examples/hyper_floor.rs)
NGINX_LOG=${NGINX_LOG:-1}                # 1: also nginx writing a JSON access-log line per request, as sluice does
ROUNDS=${ROUNDS:-1}                      # measure every target this many times, alternating; the table shows medians
AUTH=${AUTH:-0}                          # 1: sluice's route requires an API key; every target gets the header
CACHE=${CACHE:-0}                        # 1: also sluice serving every request from its response cache (hits)
STREAM=${STREAM:-0}                      # 1: every request asks for a stream; the upstream answers STREAM_CHUNKS SSE chunks
REDIS=${REDIS:-0}                        # 1: a request limit on sluice's route, kept in memory and then in Redis
PROFILE=${PROFILE:-dist}                 # cargo profile of the default binaries: dist (what the image ships) | release
FLOOR_BIN=${FLOOR_BIN:-target/$PROFILE/examples/hyper_floor}
SLUICE_BIN=${SLUICE_BIN:-target/$PROFILE/sluice}
OPENLOOP_TOOL=${OPENLOOP_TOOL:-python}   # python (bench/openloop.py) | oha (if installed)
STREAM_CHUNKS=${STREAM_CHUNKS:-50}       # STREAM=1: content chunks per streamed answer
KEEP_TMP=${KEEP_TMP:-0}                  # 1: keep the temp dir (configs, raw outputs)

UP_PORT=18000       # the fast upstream
NGINX_PORT=18081    # nginx as reverse proxy
NGINX_LOG_PORT=18083  # the same, with an access log (NGINX_LOG=1)
SLUICE_PORT=18080   # sluice proxy listener
FLOOR_PORT=18082    # the bare hyper proxy (FLOOR=1)
REDIS_PORT=18379    # redis-server (REDIS=1)
ADMIN_PORT=19090    # sluice admin (/readyz)
REQ_PATH=/v1/chat/completions
BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}'
if (( STREAM )); then
  # The upstream streams under /stream/ (see its config); the body asks for
  # a stream as the OpenAI SDK does, without stream_options, so sluice asks
  # the upstream for usage and strips the usage chunk it did not ask for.
  REQ_PATH=/stream/v1/chat/completions
  BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}],"stream":true}'
fi
export BENCH_BODY=$BODY   # chat.lua sends it

log() { printf '%s\n' "$*" >&2; }
die() { log "run.sh: $*"; exit 1; }

for v in DURATION CONNECTIONS THREADS RATE OPEN_CONNECTIONS WARMUP PROXY_CPU LOAD_CPU ROUNDS; do
  [[ ${!v} =~ ^[0-9]+$ && ${!v} -ge 0 ]] || die "$v must be a whole number (got '${!v}')"
done
(( DURATION > 0 && CONNECTIONS > 0 && RATE > 0 && OPEN_CONNECTIONS > 0 && THREADS > 0 && ROUNDS > 0 )) \
  || die "DURATION, CONNECTIONS, THREADS, RATE, OPEN_CONNECTIONS and ROUNDS must be > 0"
(( CONNECTIONS >= THREADS )) || die "wrk needs CONNECTIONS >= THREADS"
[[ $OPENLOOP_TOOL == python || $OPENLOOP_TOOL == oha ]] || die "OPENLOOP_TOOL must be python or oha"

# ----------------------------------------------------------------- cleanup --
# Everything we start is recorded here, and stopped by the EXIT trap however
# the script ends (error, Ctrl-C, normal end).
PIDS=()
WORK=""
POLICY_RC_CREATED=0

stop_pid() {
  local pid=$1 kids i
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
  # nginx's master forks a worker: note the children by parent id first so a
  # worker cannot outlive its master if the master has to be SIGKILLed.
  kids=$(pgrep -P "$pid" 2>/dev/null || true)
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do         # up to 5 s for a graceful stop
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  # shellcheck disable=SC2086  # $kids is a list of pids
  kill -KILL "$pid" $kids 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

cleanup() {
  local rc=$? pid
  trap - EXIT INT TERM
  for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
  if (( POLICY_RC_CREATED )); then rm -f /usr/sbin/policy-rc.d; fi
  if [[ -n $WORK && -d $WORK ]]; then
    if (( KEEP_TMP )); then log "run.sh: kept $WORK"; else rm -rf "$WORK"; fi
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Forget a pid once it has been stopped on purpose.
forget_pid() {
  local keep=() p
  for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
  PIDS=("${keep[@]+"${keep[@]}"}")
}

# ------------------------------------------------------------------- tools --
install_tools() {
  local pkgs=() want_nginx=0
  command -v wrk >/dev/null || pkgs+=(wrk)
  command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || want_nginx=1
  command -v curl >/dev/null || pkgs+=(curl)
  command -v taskset >/dev/null || pkgs+=(util-linux)
  command -v pgrep >/dev/null || pkgs+=(procps)
  command -v python3 >/dev/null || pkgs+=(python3)
  if (( REDIS )); then command -v redis-server >/dev/null || pkgs+=(redis-server); fi
  (( ${#pkgs[@]} || want_nginx )) || return 0
  [[ $(id -u) -eq 0 ]] || die "missing tools (${pkgs[*]} $( ((want_nginx)) && echo nginx)); run as root or install them"
  command -v apt-get >/dev/null || die "missing tools and no apt-get: install wrk, nginx, curl, python3 by hand"
  # Debian's nginx package starts a system nginx on :80 when installed. A
  # policy-rc.d that exits 101 forbids that (the standard container trick);
  # we add one only for the install when the machine has none.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    POLICY_RC_CREATED=1
  fi
  log "run.sh: installing ${pkgs[*]} $( ((want_nginx)) && echo nginx) from Debian"
  apt-get update -qq
  if (( ${#pkgs[@]} )); then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  fi
  if (( want_nginx )); then
    # nginx-light is the small build; newer Debian folded it into `nginx`.
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx-light >/dev/null 2>&1 \
      || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nginx >/dev/null
  fi
  if (( POLICY_RC_CREATED )); then rm -f /usr/sbin/policy-rc.d; POLICY_RC_CREATED=0; fi
}
install_tools
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if [[ $OPENLOOP_TOOL == oha ]]; then
  command -v oha >/dev/null || die "OPENLOOP_TOOL=oha but oha is not installed (e.g. cargo install oha --locked)"
fi

# Pinning needs both cores to exist.
taskset -c "$PROXY_CPU" true 2>/dev/null || die "cannot pin to CPU $PROXY_CPU (set PROXY_CPU)"
taskset -c "$LOAD_CPU" true 2>/dev/null || die "cannot pin to CPU $LOAD_CPU (set LOAD_CPU)"
[[ $PROXY_CPU != "$LOAD_CPU" ]] || die "PROXY_CPU and LOAD_CPU must differ"

# ------------------------------------------------------------------ sluice --
# The default binaries are built (a no-op when up to date) so that a stale
# one is never measured; a SLUICE_BIN/FLOOR_BIN given is used as it is.
if (( ! SKIP_SLUICE )); then
  if [[ $SLUICE_BIN == "target/$PROFILE/sluice" ]] && command -v cargo >/dev/null; then
    log "run.sh: building sluice (cargo build --profile $PROFILE --bin sluice)"
    cargo build --profile "$PROFILE" --bin sluice
  fi
  [[ -x $SLUICE_BIN ]] || die "$SLUICE_BIN is not an executable (no cargo to build it? or set SKIP_SLUICE=1)"
  SLUICE_BIN=$(cd "$(dirname "$SLUICE_BIN")" && pwd)/$(basename "$SLUICE_BIN")
fi
if (( FLOOR )); then
  # The same hyper server and pooled client as sluice, none of its phases:
  # what the framework alone costs on this machine.
  if [[ $FLOOR_BIN == "target/$PROFILE/examples/hyper_floor" ]] && command -v cargo >/dev/null; then
    log "run.sh: building the hyper floor (cargo build --profile $PROFILE --example hyper_floor)"
    cargo build --profile "$PROFILE" --example hyper_floor
  fi
  [[ -x $FLOOR_BIN ]] || die "$FLOOR_BIN is not an executable (no cargo to build it?)"
  FLOOR_BIN=$(cd "$(dirname "$FLOOR_BIN")" && pwd)/$(basename "$FLOOR_BIN")
fi

# ------------------------------------------------------------------- facts --
cpu_model=$(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo 2>/dev/null || true)
echo "# sluice load bench"
echo
echo "- host: nproc=$(nproc), cpu: ${cpu_model:-unknown}, kernel: $(uname -srm)"
tools="$(wrk -v 2>&1 | head -n1 | cut -d' ' -f1-2 || true), $("$NGINX" -v 2>&1 | sed 's/^nginx version: //'), $(python3 --version 2>&1)"
if [[ $OPENLOOP_TOOL == oha ]]; then tools+=", $(oha --version 2>&1 | head -n1)"; fi
if (( ! SKIP_SLUICE )); then tools+=", $("$SLUICE_BIN" --version 2>&1 | head -n1) ($SLUICE_BIN)"; fi
echo "- tools: $tools"
echo "- closed loop: wrk -t$THREADS -c$CONNECTIONS -d${DURATION}s; open loop: $OPENLOOP_TOOL at $RATE req/s on $OPEN_CONNECTIONS connections for ${DURATION}s; warm-up ${WARMUP}s per target"
echo "- pinning: proxy under test on CPU $PROXY_CPU; upstream nginx + load generator on CPU $LOAD_CPU"

# Per-core busy time from /proc/stat, used twice: (1) anything else running
# on the two cores skews every number, so check they are idle before
# starting; (2) during each closed-loop run, to show which core was the
# bottleneck (the proxy's core should be ~100%, else the load side limited).
cpu_snap() {  # "cpuN idle total" for the proxy core, then the load core
  local c
  for c in "$PROXY_CPU" "$LOAD_CPU"; do
    awk -v c="cpu$c" '$1 == c { t = 0; for (i = 2; i <= NF; i++) t += $i; print $1, $5 + $6, t }' /proc/stat
  done
}
busy_between() {  # $1, $2 = two cpu_snap outputs -> "P L" (whole % busy, proxy core then load core)
  awk 'NR == FNR { idle[FNR] = $2; tot[FNR] = $3; next }
    { d = $3 - tot[FNR]; b = (d > 0) ? 100 * (1 - ($2 - idle[FNR]) / d) : 0
      printf "%s%.0f", (FNR > 1 ? " " : ""), b }
    END { print "" }' <(echo "$1") <(echo "$2")
}
snap1=$(cpu_snap); sleep 1; snap2=$(cpu_snap)
read -r idle_p idle_l <<<"$(busy_between "$snap1" "$snap2")"
echo "- busy before the run (1 s): cpu$PROXY_CPU ${idle_p}%, cpu$LOAD_CPU ${idle_l}%"
if (( idle_p > 10 || idle_l > 10 )); then
  echo "- WARNING: the cores are already busy (another build or benchmark?); expect noisy numbers"
fi
echo

# ------------------------------------------------------------------- ports --
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for p in "$UP_PORT" "$NGINX_PORT" "$NGINX_LOG_PORT" "$SLUICE_PORT" "$ADMIN_PORT" "$FLOOR_PORT" "$REDIS_PORT"; do
  ! port_busy "$p" || die "127.0.0.1:$p is already in use (a leftover bench process?)"
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/sluice-bench.XXXXXX")

# ----------------------------------------------------------------- configs --
# Both nginx instances run as root in the foreground (`daemon off`, so we
# hold the master's pid) with a master + 1 worker like production, and keep
# every path (pid, logs, temp dirs) inside $WORK: nothing in /etc/nginx or
# /var/log is read or written. keepalive_requests is raised everywhere so no
# side closes keep-alive connections mid-run (nginx's default is 1000).
nginx_common() {  # $1 = instance dir
  cat <<EOF
user root;
worker_processes 1;
daemon off;
master_process on;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 4096; }
EOF
}
nginx_http_common() {  # $1 = instance dir
  cat <<EOF
    access_log off;
    client_body_temp_path $1/client_body;
    proxy_temp_path $1/proxy;
    fastcgi_temp_path $1/fastcgi;
    uwsgi_temp_path $1/uwsgi;
    scgi_temp_path $1/scgi;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
EOF
}

# A canned OpenAI chat stream: a role chunk, STREAM_CHUNKS content chunks,
# the finish chunk, the usage chunk (as asked for by include_usage) and
# [DONE], each event ended by a blank line. nginx caps one config token at
# 4 KiB, so the body is `set` in pieces (literal newlines inside quotes)
# and returned joined.
sse_directives() {
  python3 - "$STREAM_CHUNKS" <<'PY'
import sys
n = int(sys.argv[1])
head = 'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,"model":"gpt-4o-mini","system_fingerprint":"fp_bench"'
def chunk(delta, finish="null"):
    return f'{head},"choices":[{{"index":0,"delta":{delta},"logprobs":null,"finish_reason":{finish}}}],"usage":null}}\n\n'
events = [chunk('{"role":"assistant","content":""}')]
events += [chunk(f'{{"content":" word{i}"}}') for i in range(n)]
events.append(chunk("{}", '"stop"'))
events.append(f'{head},"choices":[],"usage":{{"prompt_tokens":9,"completion_tokens":{n},"total_tokens":{n + 9}}}}}\n\n')
events.append("data: [DONE]\n\n")
pieces, piece = [], ""
for e in events:
    if piece and len(piece) + len(e) > 3500:
        pieces.append(piece)
        piece = ""
    piece += e
pieces.append(piece)
for i, p in enumerate(pieces):
    print(f"            set $sse{i} '{p}';")
print("            return 200 \"" + "".join(f"$sse{i}" for i in range(len(pieces))) + "\";")
PY
}

# (a) The fast upstream: a canned OpenAI chat.completion with usage, for
# any path and method, served from memory; under /stream/, a canned stream.
mkdir -p "$WORK/upstream" "$WORK/nginx"
{
  nginx_common "$WORK/upstream"
  echo "http {"
  nginx_http_common "$WORK/upstream"
  cat <<EOF
    server {
        listen 127.0.0.1:$UP_PORT;
        default_type application/json;
        location /stream/ {
            default_type text/event-stream;
$(sse_directives)
        }
        location / {
            return 200 '{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18}}';
        }
    }
}
EOF
} >"$WORK/upstream/nginx.conf"

# (b) nginx as a plain reverse proxy with a keep-alive pool to the upstream;
# (b') the same writing one JSON access-log line per request, as sluice
# does: the fields nginx knows of sluice's line, escaped as JSON, to
# /dev/null (sluice's stdout goes there too), batched as sluice batches
# its lines (64 KiB buffer, flushed at least every second).
nginx_proxy_conf() {  # $1 = instance dir, $2 = port, $3 = 1 for the access log
  nginx_common "$1"
  echo "http {"
  if (( $3 )); then
    # (`access_log off` would cancel every access_log of its level.)
    nginx_http_common "$1" | grep -v 'access_log off'
    cat <<'EOF'
    log_format sluice_like escape=json '{"timestamp":"$time_iso8601","level":"INFO","target":"nginx::access",'
        '"message":"request","request_id":"$request_id","method":"$request_method","path":"$uri",'
        '"status":$status,"latency_s":$request_time,"upstream":"$upstream_addr",'
        '"upstream_s":"$upstream_response_time","client_ip":"$remote_addr"}';
    access_log /dev/null sluice_like buffer=64k flush=1s;
EOF
  else
    nginx_http_common "$1"
  fi
  cat <<EOF
    upstream fast {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$2;
        location / {
            proxy_pass http://fast;
            proxy_http_version 1.1;
            proxy_set_header Connection "";$( ((STREAM)) && printf '\n            proxy_buffering off;   # as nginx is set up in front of SSE' || true)
        }
    }
}
EOF
}
nginx_proxy_conf "$WORK/nginx" "$NGINX_PORT" 0 >"$WORK/nginx/nginx.conf"
if (( NGINX_LOG )); then
  mkdir -p "$WORK/nginx-log"
  nginx_proxy_conf "$WORK/nginx-log" "$NGINX_LOG_PORT" 1 >"$WORK/nginx-log/nginx.conf"
fi

# (c) sluice: one route straight to the same upstream; with AUTH=1 it
# requires an API key (and every target is sent one, so loads are equal).
BENCH_KEY=sk-bench-0123456789abcdef
AUTH_HEADER="authorization: Bearer $BENCH_KEY"
if (( AUTH )); then ROUTE_AUTH=required; else ROUTE_AUTH=none; fi
cat >"$WORK/sluice.yaml" <<EOF
listen: 127.0.0.1:$SLUICE_PORT
admin: { listen: 127.0.0.1:$ADMIN_PORT }
upstreams:
  fast: { url: "http://127.0.0.1:$UP_PORT" }
auth:
  api_keys:
    - { id: bench, key: $BENCH_KEY }
routes:
  - name: cached        # CACHE=1: the same upstream behind the response cache
    match: { path_prefix: /cached/ }
    auth: $ROUTE_AUTH
    cache: { ttl: 1h, scope: shared }
    upstream: fast
  - name: bench
    match: { path_prefix: / }
    auth: $ROUTE_AUTH
    upstream: fast
EOF
if (( REDIS )); then
  # A limit too high to refuse anything: every request pays for one
  # bucket decision, in memory for `sluice` and in Redis for `sluice-redis`.
  sed -i '$a\    rate_limit: { requests_per_minute: 1000000000 }' "$WORK/sluice.yaml"
  { cat "$WORK/sluice.yaml"
    echo "state: { backend: redis, redis_url: \"redis://127.0.0.1:$REDIS_PORT\", on_error: deny }"
  } >"$WORK/sluice-redis.yaml"
fi

# nginx >= 1.19.5 takes -e for the startup error log; without it an nginx
# built with a file default would open /var/log/nginx/error.log first.
NGINX_HAS_E=0
if "$NGINX" -h 2>&1 | grep -q -- '-e filename'; then NGINX_HAS_E=1; fi

# ------------------------------------------------------------- processes --
LAST_PID=""
start_nginx() {  # $1 = instance dir, $2 = cpu
  local dir=$1 cpu=$2 args
  args=(-p "$dir" -c "$dir/nginx.conf")
  if (( NGINX_HAS_E )); then args+=(-e "$dir/error.log"); fi
  "$NGINX" -t -q "${args[@]}" || die "nginx config $dir/nginx.conf is invalid"
  # taskset execs nginx, so $! is nginx's master; its worker inherits the pin.
  taskset -c "$cpu" "$NGINX" "${args[@]}" </dev/null >>"$dir/error.log" 2>&1 &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

start_sluice() {  # $1 = config (default: sluice.yaml)
  # Access log lines go to stdout -> /dev/null (formatted, not stored), like
  # a sidecar whose log shipper is fast; stderr is kept for startup errors.
  # TOKIO_WORKER_THREADS=1: one worker thread for the one core it is pinned to.
  TOKIO_WORKER_THREADS=1 taskset -c "$PROXY_CPU" "$SLUICE_BIN" run --config "${1:-$WORK/sluice.yaml}" \
    </dev/null >/dev/null 2>"$WORK/sluice.stderr" &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

start_floor() {
  TOKIO_WORKER_THREADS=1 taskset -c "$PROXY_CPU" "$FLOOR_BIN" "127.0.0.1:$FLOOR_PORT" "http://127.0.0.1:$UP_PORT" \
    </dev/null >/dev/null 2>"$WORK/floor.stderr" &
  LAST_PID=$!
  PIDS+=("$LAST_PID")
}

stop_started() { stop_pid "$1"; forget_pid "$1"; }

# Poll until a URL answers with the wanted status (bounded, ~10 s).
wait_status() {  # $1 = url, $2 = status, $3 = pid that must stay alive
  local i code
  for ((i = 0; i < 100; i++)); do
    kill -0 "$3" 2>/dev/null || return 1
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$1" || true)
    [[ $code == "$2" ]] && return 0
    sleep 0.1
  done
  return 1
}

# One real request through the target: catches a misrouted or failing proxy
# before it is benchmarked (a fast stream of 404s would look great).
check_target() {  # $1 = name, $2 = url
  local out code auth=()
  if (( AUTH )); then auth=(-H "$AUTH_HEADER"); fi
  out=$(curl -sS --max-time 5 -w '\n%{http_code}' -H 'content-type: application/json' "${auth[@]}" -d "$BODY" "$2") \
    || die "$1: request to $2 failed"
  code=${out##*$'\n'}
  [[ $code == 200 && $out == *chat.completion* ]] || die "$1: expected 200 + chat.completion from $2, got $code: ${out%$'\n'*}"
}

# ------------------------------------------------------------- load tools --
# Each prints the RESULT line of its run (raw output kept in $WORK/raw.log).
run_wrk() {  # $1 = url, $2 = seconds
  local auth=()
  if (( AUTH )); then auth=(-H "$AUTH_HEADER"); fi
  taskset -c "$LOAD_CPU" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$2"s --timeout 5s \
    "${auth[@]}" -s "$BENCH_DIR/chat.lua" "$1" >"$WORK/wrk.out" 2>&1 || { cat "$WORK/wrk.out" >&2; die "wrk failed"; }
  cat "$WORK/wrk.out" >>"$WORK/raw.log"
  grep -m1 '^RESULT ' "$WORK/wrk.out" || { cat "$WORK/wrk.out" >&2; die "no RESULT line from wrk"; }
}

run_open() {  # $1 = url
  if [[ $OPENLOOP_TOOL == oha ]]; then
    run_oha "$1"
    return
  fi
  local auth=()
  if (( AUTH )); then auth=(--header "$AUTH_HEADER"); fi
  taskset -c "$LOAD_CPU" python3 "$BENCH_DIR/openloop.py" --url "$1" --rate "$RATE" \
    --duration "$DURATION" --connections "$OPEN_CONNECTIONS" --body "$BODY" "${auth[@]}" \
    >"$WORK/open.out" 2>&1 || { cat "$WORK/open.out" >&2; die "openloop.py failed"; }
  cat "$WORK/open.out" >>"$WORK/raw.log"
  grep '^openloop: WARNING' "$WORK/open.out" >&2 || true
  grep -m1 '^RESULT ' "$WORK/open.out" || { cat "$WORK/open.out" >&2; die "no RESULT line from openloop.py"; }
}

# oha (opt-in, OPENLOOP_TOOL=oha): -q fixes the rate; --latency-correction
# measures from the scheduled send time, like openloop.py.
run_oha() {  # $1 = url
  local fmt=(-j)
  if oha --help 2>&1 | grep -q -- '--output-format'; then fmt=(--output-format json); fi
  taskset -c "$LOAD_CPU" oha --no-tui "${fmt[@]}" -z "${DURATION}s" -c "$OPEN_CONNECTIONS" -q "$RATE" \
    --latency-correction -m POST -T application/json -d "$BODY" "$1" >"$WORK/oha.json" 2>"$WORK/oha.err" \
    || { cat "$WORK/oha.err" >&2; die "oha failed"; }
  cat "$WORK/oha.json" >>"$WORK/raw.log"
  python3 - "$WORK/oha.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
codes = {int(k): v for k, v in (d.get("statusCodeDistribution") or {}).items()}
ok = sum(v for k, v in codes.items() if 200 <= k < 300)
# Requests cut off by the end of the run (-z) are not failures of the target.
errs = sum(v for k, v in (d.get("errorDistribution") or {}).items() if "deadline" not in k)
errs += sum(v for k, v in codes.items() if not 200 <= k < 300)
p = d["latencyPercentiles"]
secs = d["summary"]["total"]
print(f"RESULT rps={ok / secs:.1f} p50_us={round(p['p50'] * 1e6)} p99_us={round(p['p99'] * 1e6)} errors={errs}")
PY
}

# key=value out of a RESULT line
field() { sed -n "s/.* $2=\([^ ]*\).*/\1/p" <<<" ${1#RESULT }"; }

RESULTS="$WORK/results.tsv"
: >"$RESULTS"
record() {  # $1 = target, $2 = mode, $3 = RESULT line, $4 = "proxy%/load%" core busy, $5 = proxy CPU per request
  local rps p50 p99 err
  rps=$(field "$3" rps); p50=$(field "$3" p50_us); p99=$(field "$3" p99_us); err=$(field "$3" errors)
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$rps" "$p50" "$p99" "$err" "$4" "$5" >>"$RESULTS"
  log "  $1 / $2: ${rps} req/s, p50 ${p50} us, p99 ${p99} us, errors ${err}, busy cpu$PROXY_CPU/cpu$LOAD_CPU: $4, proxy CPU/req: $5   [${3#RESULT }]"
}

# CPU time ("user system", in clock ticks) used so far by the given
# processes and their threads, from /proc/PID/stat (fields 14 and 15).
CLK_TCK=$(getconf CLK_TCK)
proc_ticks() {  # $@ = pids
  local user=0 sys=0 p f
  for p in "$@"; do
    [[ -r /proc/$p/stat ]] || continue
    # Split after the command name, which may itself hold spaces.
    read -r -a f <<<"$(sed 's/.*) //' "/proc/$p/stat")"
    user=$(( user + f[11] )); sys=$(( sys + f[12] ))
  done
  echo "$user $sys"
}
# A proxy and its children (nginx's worker is a child of its master).
proxy_pids() { echo "$1" $(pgrep -P "$1" || true); }
# µs of proxy CPU per request served, "total (user)": steadier than req/s
# on a noisy VM, and it compares proxies even when the load side is the
# bottleneck.
cpu_per_request() {  # $1, $2 = proc_ticks before/after, $3 = requests
  python3 -c "
import sys
u0, s0 = map(float, sys.argv[1].split()); u1, s1 = map(float, sys.argv[2].split())
n, hz = float(sys.argv[3]), float(sys.argv[4])
us = lambda t: t * 1e6 / hz / n
print(f'{us(u1 - u0 + s1 - s0):.2f} {us(u1 - u0):.2f}' if n > 0 else '-')" \
    "$1" "$2" "$3" "$CLK_TCK"
}

OPEN_MODE="open@${RATE}/s"

# Warm-up, then closed-loop, then open-loop against one URL.
# (The load runs are plain assignments, not arguments, so that a failing
# tool stops the script under `set -e`.)
bench_target() {  # $1 = target name, $2 = url, $3 = the proxy's pid (none for direct)
  local res s1 s2 pids=() t1 t2 per_req="-"
  check_target "$1" "$2"
  log "run.sh: $1: warm-up ${WARMUP}s"
  if (( WARMUP > 0 )); then res=$(run_wrk "$2" "$WARMUP"); fi
  log "run.sh: $1: closed loop ${DURATION}s"
  if [[ -n ${3:-} ]]; then read -r -a pids <<<"$(proxy_pids "$3")"; fi
  t1=$(proc_ticks "${pids[@]}")
  s1=$(cpu_snap)
  res=$(run_wrk "$2" "$DURATION")
  s2=$(cpu_snap)
  t2=$(proc_ticks "${pids[@]}")
  if (( ${#pids[@]} )); then per_req=$(cpu_per_request "$t1" "$t2" "$(field "$res" requests)"); fi
  record "$1" closed "$res" "$(busy_between "$s1" "$s2" | tr ' ' /)" "$per_req"
  log "run.sh: $1: open loop ${RATE} req/s ${DURATION}s"
  res=$(run_open "$2")
  record "$1" "$OPEN_MODE" "$res" "-" "-"   # (busy and CPU/request only matter at saturation)
}

# ------------------------------------------------------------------- runs --
# The upstream stays up for the whole run; each proxy runs only during its
# own turn so an idle proxy never shares the core with the one measured.
start_nginx "$WORK/upstream" "$LOAD_CPU"
UP_PID=$LAST_PID
wait_status "http://127.0.0.1:$UP_PORT$REQ_PATH" 200 "$UP_PID" \
  || { cat "$WORK/upstream/error.log" >&2; die "upstream nginx did not start"; }

# Every round measures every target in turn, so that a slow spell of the
# VM is shared out rather than landing on one target.
for ((round = 1; round <= ROUNDS; round++)); do
if (( ROUNDS > 1 )); then log "run.sh: round $round of $ROUNDS"; fi

# (a) direct
bench_target direct "http://127.0.0.1:$UP_PORT$REQ_PATH"

# (b) nginx reverse proxy, (b') with its access log
for variant in nginx nginx-log; do
  if [[ $variant == nginx-log ]]; then
    (( NGINX_LOG )) || continue
    port=$NGINX_LOG_PORT
  else
    port=$NGINX_PORT
  fi
  start_nginx "$WORK/$variant" "$PROXY_CPU"
  NGINX_PID=$LAST_PID
  wait_status "http://127.0.0.1:$port$REQ_PATH" 200 "$NGINX_PID" \
    || { cat "$WORK/$variant/error.log" >&2; die "$variant proxy did not start"; }
  bench_target "$variant" "http://127.0.0.1:$port$REQ_PATH" "$NGINX_PID"
  stop_started "$NGINX_PID"
done

# (c) sluice
if (( ! SKIP_SLUICE )); then
  start_sluice
  SLUICE_PID=$LAST_PID
  wait_status "http://127.0.0.1:$ADMIN_PORT/readyz" 200 "$SLUICE_PID" \
    || { cat "$WORK/sluice.stderr" >&2; die "sluice did not become ready on :$ADMIN_PORT/readyz within ~10 s"; }
  bench_target sluice "http://127.0.0.1:$SLUICE_PORT$REQ_PATH" "$SLUICE_PID"
  # Every request after check_target's first is a hit: the same body each time.
  if (( CACHE )); then bench_target sluice-cache-hit "http://127.0.0.1:$SLUICE_PORT/cached$REQ_PATH" "$SLUICE_PID"; fi
  stop_started "$SLUICE_PID"
fi

# (c') sluice with its limit in Redis. redis-server is pinned with the load:
# it stands for a Redis on another machine, not for the proxy's own work.
if (( REDIS && ! SKIP_SLUICE )); then
  taskset -c "$LOAD_CPU" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
    </dev/null >"$WORK/redis.log" 2>&1 &
  REDIS_PID=$!
  PIDS+=("$REDIS_PID")
  for ((i = 0; i < 100; i++)); do port_busy "$REDIS_PORT" && break; sleep 0.1; done
  start_sluice "$WORK/sluice-redis.yaml"
  SLUICE_PID=$LAST_PID
  wait_status "http://127.0.0.1:$ADMIN_PORT/readyz" 200 "$SLUICE_PID" \
    || { cat "$WORK/sluice.stderr" >&2; die "sluice (redis) did not become ready"; }
  bench_target sluice-redis "http://127.0.0.1:$SLUICE_PORT$REQ_PATH" "$SLUICE_PID"
  stop_started "$SLUICE_PID"
  stop_started "$REDIS_PID"
fi

# (d) the bare hyper proxy, for reference
if (( FLOOR )); then
  start_floor
  FLOOR_PID=$LAST_PID
  wait_status "http://127.0.0.1:$FLOOR_PORT$REQ_PATH" 200 "$FLOOR_PID" \
    || { cat "$WORK/floor.stderr" >&2; die "the hyper floor did not start"; }
  bench_target hyper-floor "http://127.0.0.1:$FLOOR_PORT$REQ_PATH" "$FLOOR_PID"
  stop_started "$FLOOR_PID"
fi

done

stop_started "$UP_PID"

# ------------------------------------------------------------------ table --
# ratio = req/s of the row / req/s of nginx in the same mode;
# added p50 = p50 of the row - p50 of direct in the same mode.
echo
python3 - "$RESULTS" "$PROXY_CPU" "$LOAD_CPU" <<'PY'
import statistics, sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
runs = {}  # (target, mode) -> every round's (rps, p50, p99, errors, busy, cpu)
for t, m, r, p50, p99, e, b, c in rows:
    runs.setdefault((t, m), []).append((float(r), int(p50), int(p99), int(e), b, c))
med = lambda xs: statistics.median(xs)
def summary(k):
    rs = runs[k]
    cpus = [tuple(map(float, c.split())) for *_, c in rs if c != "-"]
    return {
        "rps": med([r[0] for r in rs]), "rps_all": [r[0] for r in rs],
        "p50": round(med([r[1] for r in rs])), "p99": round(med([r[2] for r in rs])),
        # busy: of the round with the median req/s (the lower of two).
        "err": sum(r[3] for r in rs), "busy": sorted(rs)[(len(rs) - 1) // 2][4],
        "cpu": (med([c[0] for c in cpus]), med([c[1] for c in cpus])) if cpus else None,
    }
by = {k: summary(k) for k in runs}
pc, lc = sys.argv[2], sys.argv[3]
many = any(len(v) > 1 for v in runs.values())
def us(v, sign=""):
    return f"{v / 1000:{sign}.2f} ms" if abs(v) >= 10000 else f"{v:{sign}d} µs"
head = f"| target | mode | req/s | p50 | p99 | req/s vs nginx | req/s vs nginx-log | added p50 vs direct | errors | busy % cpu{pc}/cpu{lc} | proxy CPU/req |"
if many:
    head += " req/s of each round |"
print(head)
print("|---" * (head.count("|") - 1) + "|")
for k in runs:
    t, m = k
    row = by[k]
    def ratio(base):
        b = by.get((base, m))
        if not b or b["rps"] <= 0:
            return "n/a"
        r = row["rps"] / b["rps"]
        return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"
    d = by.get(("direct", m))
    added = "—" if t == "direct" or not d else us(row["p50"] - d["p50"], "+")
    cpu = "—" if not row["cpu"] else f"{row['cpu'][0]:.1f} µs ({row['cpu'][1]:.1f} user)"
    line = (f"| {t} | {m} | {row['rps']:,.0f} | {us(row['p50'])} | {us(row['p99'])} | {ratio('nginx')} "
            f"| {ratio('nginx-log')} | {added} | {row['err']} | {row['busy']} | {cpu} |")
    if many:
        line += " " + " / ".join(f"{r:,.0f}" for r in row["rps_all"]) + " |"
    print(line)
PY
echo
echo "closed = wrk, $CONNECTIONS connections, max throughput; $OPEN_MODE = fixed rate on $OPEN_CONNECTIONS connections, latency from the scheduled send time."
echo "busy = share of each pinned core in use during a closed-loop run (cpu$PROXY_CPU: proxy under test, idle for direct; cpu$LOAD_CPU: upstream + wrk)."
echo "A proxy's closed-loop req/s measures the proxy only when its own core is the one at ~100%."
echo "proxy CPU/req = user + system CPU time of the proxy's processes during the closed-loop run, per request served (user part in brackets)."
echo "nginx-log = the nginx proxy writing one JSON access-log line per request (batched), the job sluice's access log does."
if (( ROUNDS > 1 )); then echo "Every figure is the median of $ROUNDS rounds; the last column has each round's req/s."; fi
if awk -F'\t' '$6 > 0 {bad=1} END {exit !bad}' "$RESULTS"; then
  echo
  echo "WARNING: some runs had errors (see the errors column); their numbers are not comparable."
fi
