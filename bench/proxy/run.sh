#!/usr/bin/env bash
# Proxy benchmark: the latency the weft sidecar (`weft-proxy`) adds per hop, side by side with
# nginx and HAProxy as plain reverse proxies (and a pair of nginx with mTLS
# between them, the reference for the two-hop mTLS target), all against one
# upstream on loopback. Writes bench/results/proxy.md and the raw figures next to it
# (proxy.jsonl). See bench/proxy/README.md for the method.
#
# Usage: make bench-proxy   (or: bash bench/proxy/run.sh)
# Settings, from the environment:
#   BENCH_SECONDS=10          measured seconds per cell
#   BENCH_ROUNDS=3            rounds; the scenario order rotates each round
#   BENCH_WARMUP=1            unrecorded warm-up seconds before each cell
#   BENCH_RATES="1000 4000"   target request rates (req/s)
#   BENCH_PROTOCOLS="h1 h2"   h1 = HTTP/1.1, h2 = h2c with prior knowledge
#   BENCH_H1_CONNECTIONS=32   HTTP/1.1 keep-alive connections of the load generator
#   BENCH_H2_CONNECTIONS=4    HTTP/2 connections of the load generator
#   BENCH_PORT_BASE=18700     38 consecutive loopback ports from here
#   BENCH_HANDSHAKE_RATE=200  new connections per second in the handshake cells
#   BENCH_READY_TIMEOUT=20    seconds a server may take to become ready
#   BENCH_OUT=bench/results/proxy.md
#   BENCH_KEEP=1              keep the work directory (configs, logs)
#   BENCH_WEFT=PATH           benchmark this weft-proxy binary (or `weft`, run as `weft proxy`) instead of the one built here
#   BENCH_ALLOW_MISSING_WEFT=1  exit 0 even when the weft scenarios could not run
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
HERE=bench/proxy

CELL_SECONDS=${BENCH_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-3}
WARMUP=${BENCH_WARMUP:-1}
RATES=${BENCH_RATES:-1000 4000}
PROTOCOLS=${BENCH_PROTOCOLS:-h1 h2}
H1_CONN=${BENCH_H1_CONNECTIONS:-32}
H2_CONN=${BENCH_H2_CONNECTIONS:-4}
PORT_BASE=${BENCH_PORT_BASE:-18700}
READY_TIMEOUT=${BENCH_READY_TIMEOUT:-20}
OUT=${BENCH_OUT:-bench/results/proxy.md}
CARGO=${CARGO:-cargo}
# Host header / :authority of every request, whatever the first hop.
HOST_HEADER=upstream.bench.svc.cluster.local
HANDSHAKE_RATE=${BENCH_HANDSHAKE_RATE:-200}
SCENARIOS=(direct weft1 weft1log weft1k weft1d weft2 weft2tls weft1tls weft1cache nginxcache nginx nginx2tls haproxy)

say() { printf '[bench-proxy] %s\n' "$*" >&2; }
die() {
	say "ERROR: $*"
	exit 1
}

for v in CELL_SECONDS ROUNDS WARMUP H1_CONN H2_CONN PORT_BASE READY_TIMEOUT HANDSHAKE_RATE; do
	[[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number, got '${!v}'"
done
((CELL_SECONDS > 0 && ROUNDS > 0 && READY_TIMEOUT > 0)) || die "BENCH_SECONDS, BENCH_ROUNDS and BENCH_READY_TIMEOUT must be positive"
((PORT_BASE >= 1024 && PORT_BASE <= 65500)) || die "BENCH_PORT_BASE must be in 1024..65500"
for r in $RATES; do [[ $r =~ ^[1-9][0-9]*$ ]] || die "BENCH_RATES: '$r' is not a rate"; done
for p in $PROTOCOLS; do [[ $p == h1 || $p == h2 ]] || die "BENCH_PROTOCOLS: '$p' is neither h1 nor h2"; done
((ROUNDS >= 3)) || say "warning: BENCH_ROUNDS=$ROUNDS (< 3): a smoke run, not a measurement"

# ---------------------------------------------------------------- tools

find_tool() {
	command -v "$1" 2>/dev/null && return 0
	[[ -x /usr/sbin/$1 ]] && echo "/usr/sbin/$1" && return 0
	return 0
}

NGINX=$(find_tool nginx)
HAPROXY=$(find_tool haproxy)
if [[ -z $NGINX || -z $HAPROXY ]]; then
	say "nginx or haproxy missing: installing both with apt-get"
	if [[ $(id -u) -eq 0 ]]; then
		SUDO=()
	elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
		SUDO=(sudo -n)
	else
		die "nginx/haproxy are missing and this user cannot install them: apt-get install -y nginx haproxy"
	fi
	"${SUDO[@]}" apt-get update -qq || die "apt-get update failed"
	"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx haproxy >/dev/null ||
		die "apt-get install -y nginx haproxy failed"
	NGINX=$(find_tool nginx)
	HAPROXY=$(find_tool haproxy)
	[[ -n $NGINX && -n $HAPROXY ]] || die "nginx/haproxy still not found after apt-get install"
fi
for t in setsid timeout; do command -v "$t" >/dev/null || die "$t (util-linux/coreutils) is required"; done
# The proxies and the load generator hold a few hundred sockets at most, but
# haproxy sizes its descriptor table from maxconn at startup.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

say "building weft-proxy and weft-bench (release)"
"$CARGO" build --release --bin weft-proxy --bin weft-bench || die "cargo build --release --bin weft-proxy --bin weft-bench failed"
TARGET_DIR=$("$CARGO" metadata --format-version 1 --no-deps 2>/dev/null |
	sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p') || true
TARGET_DIR=${TARGET_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}}
WEFT=${BENCH_WEFT:-$TARGET_DIR/release/weft-proxy}
# The sidecar binary takes the proxy flags directly; `weft` needs its subcommand.
WEFT_CMD=("$WEFT")
[[ $(basename "$WEFT") == weft ]] && WEFT_CMD+=(proxy)
BENCH=$TARGET_DIR/release/weft-bench
[[ -x $BENCH ]] || die "$BENCH was not built"

# ---------------------------------------------------------------- processes

WORK=$(mktemp -d "${TMPDIR:-/tmp}/weft-bench-proxy.XXXXXX")
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
STARTED=()         # every pid this script started (each leads its own process group)
declare -A PID=()  # process name -> pid
declare -A NOTRUN=() # scenario or scenario/protocol -> reason
declare -A DEAD=()   # scenario -> why its later cells were skipped

# Stops the given processes (and their process groups): TERM, up to 5 s, KILL.
stop_pids() {
	local pid i alive
	for pid in "$@"; do kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true; done
	for ((i = 0; i < 50; i++)); do
		alive=0
		for pid in "$@"; do
			if kill -0 -- "-$pid" 2>/dev/null || kill -0 "$pid" 2>/dev/null; then alive=1; fi
		done
		((alive)) || break
		sleep 0.1
	done
	for pid in "$@"; do kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; done
	for pid in "$@"; do wait "$pid" 2>/dev/null || true; done
}

cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	if ((${#STARTED[@]})); then stop_pids "${STARTED[@]}"; fi
	if [[ ${BENCH_KEEP:-0} == 1 || $rc -ne 0 ]]; then
		say "work directory (configs, logs) kept: $WORK"
	else
		rm -rf "$WORK"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_bg NAME COMMAND...: runs COMMAND in its own session, output to WORK/NAME.log.
start_bg() {
	local name=$1
	shift
	setsid "$@" >"$WORK/$name.log" 2>&1 </dev/null &
	PID[$name]=$!
	STARTED+=("$!")
}

log_tail() { # NAME [LINES]
	local f
	for f in "$WORK/$1".log "$WORK/$1"?.log; do
		[[ -f $f ]] || continue
		say "last lines of $f:"
		tail -n "${2:-8}" "$f" | sed 's/^/    | /' >&2 || true
	done
}

# wait_ready NAME URL SECONDS: 0 once URL answers 200; 1 on timeout or exit of NAME.
wait_ready() {
	"$BENCH" wait-ready --url "$2" --timeout "${3}s" --pid "${PID[$1]}"
}

# A string made safe to embed in a JSON string literal.
json_safe() {
	local s=$1
	s=${s//\\//}
	s=${s//\"/\'}
	s=${s//[$'\n\r\t']/ }
	printf '%s' "$s"
}

emit() { printf '%s\n' "$1" >>"$RESULTS"; }

# not_run SCENARIO PROTOCOL|"" REASON
not_run() {
	local key=$1
	[[ -n $2 ]] && key=$1/$2
	NOTRUN[$key]=$3
	emit "{\"kind\":\"not_run\",\"scenario\":\"$1\",\"protocol\":\"$2\",\"reason\":\"$(json_safe "$3")\"}"
	say "$key not run: $3"
}

is_not_run() { [[ -n ${NOTRUN[$1]:-} || -n ${NOTRUN[$1/$2]:-} ]]; }

scenario_pids() {
	case $1 in
	weft1) echo "${PID[weft1]:-}" ;;
	weft1k) echo "${PID[weft1k]:-}" ;;
	weft1log) echo "${PID[weft1log]:-}" ;;
	weft1d) echo "${PID[weft1d]:-}" ;;
	weft2) echo "${PID[weft2a]:-} ${PID[weft2b]:-}" ;;
	weft2tls) echo "${PID[weft2ta]:-} ${PID[weft2tb]:-}" ;;
	weft2tb) echo "${PID[weft2tb]:-}" ;;
	nginx) echo "${PID[nginx]:-}" ;;
	nginx2tls) echo "${PID[nginx2a]:-} ${PID[nginx2b]:-}" ;;
	# nginx B is the vendor of the origination cells, as in nginx2tls.
	weft1tls) echo "${PID[weft1tls]:-} ${PID[nginx2b]:-}" ;;
	weft1cache) echo "${PID[weft1cache]:-}" ;;
	# The same nginx as the nginx cells, asked for a cacheable path.
	nginxcache) echo "${PID[nginx]:-}" ;;
	haproxy) echo "${PID[haproxy]:-}" ;;
	esac
}

# stop_scenario SCENARIO: ends its processes (e.g. when it cannot run).
stop_scenario() {
	local pids
	read -r -a pids <<<"$(scenario_pids "$1")"
	if ((${#pids[@]})); then stop_pids "${pids[@]}"; fi
}

alive() {
	local pid
	for pid in $(scenario_pids "$1"); do kill -0 "$pid" 2>/dev/null || return 1; done
}

# proc_json SCENARIO: RSS and CPU ticks of its processes (nginx: with its worker).
proc_json() {
	local args=() pid
	for pid in $(scenario_pids "$1"); do args+=(--pid "$pid"); done
	if ((${#args[@]} == 0)); then
		echo null
		return
	fi
	"$BENCH" proc --children "${args[@]}"
}

# ---------------------------------------------------------------- ports

UP_PORT=$PORT_BASE
W1_OUT=$((PORT_BASE + 1)) W1_ADMIN=$((PORT_BASE + 2)) W1_PROBE=$((PORT_BASE + 3))
WA_OUT=$((PORT_BASE + 4)) WA_ADMIN=$((PORT_BASE + 5)) WA_PROBE=$((PORT_BASE + 6))
WB_IN=$((PORT_BASE + 7)) WB_ADMIN=$((PORT_BASE + 8)) WB_PROBE=$((PORT_BASE + 9))
NG_H1=$((PORT_BASE + 10)) NG_H2=$((PORT_BASE + 11))
HA_H1=$((PORT_BASE + 12)) HA_H2=$((PORT_BASE + 13))
TA_OUT=$((PORT_BASE + 14)) TA_ADMIN=$((PORT_BASE + 15)) TA_PROBE=$((PORT_BASE + 16))
TB_IN=$((PORT_BASE + 17)) TB_ADMIN=$((PORT_BASE + 18)) TB_PROBE=$((PORT_BASE + 19))
D1_OUT=$((PORT_BASE + 20)) D1_ADMIN=$((PORT_BASE + 21)) D1_PROBE=$((PORT_BASE + 22))
NA_H1=$((PORT_BASE + 23)) NA_H2=$((PORT_BASE + 24)) NB_TLS=$((PORT_BASE + 25))
K1_OUT=$((PORT_BASE + 26)) K1_ADMIN=$((PORT_BASE + 27)) K1_PROBE=$((PORT_BASE + 28))
L1_OUT=$((PORT_BASE + 29)) L1_ADMIN=$((PORT_BASE + 30)) L1_PROBE=$((PORT_BASE + 31))
O1_OUT=$((PORT_BASE + 32)) O1_ADMIN=$((PORT_BASE + 33)) O1_PROBE=$((PORT_BASE + 34))
C1_OUT=$((PORT_BASE + 35)) C1_ADMIN=$((PORT_BASE + 36)) C1_PROBE=$((PORT_BASE + 37))

if command -v ss >/dev/null; then
	for ((port = PORT_BASE; port < PORT_BASE + 38; port++)); do
		if ss -Hltn "sport = :$port" 2>/dev/null | grep -q .; then
			die "port $port is in use (ports $PORT_BASE..$((PORT_BASE + 37)) are needed): set BENCH_PORT_BASE"
		fi
	done
fi

url_for() { # SCENARIO PROTOCOL
	local port path=/
	case $1 in
	direct) port=$UP_PORT ;;
	weft1) port=$W1_OUT ;;
	weft1k) port=$K1_OUT ;;
	weft1log) port=$L1_OUT ;;
	weft1d) port=$D1_OUT ;;
	weft2) port=$WA_OUT ;;
	weft2tls) port=$TA_OUT ;;
	weft1tls) port=$O1_OUT ;;
	# The cache cells ask for a path the upstream marks cacheable.
	weft1cache) port=$C1_OUT path=/cacheable/ ;;
	nginxcache) if [[ $2 == h2 ]]; then port=$NG_H2; else port=$NG_H1; fi && path=/cacheable/ ;;
	nginx) if [[ $2 == h2 ]]; then port=$NG_H2; else port=$NG_H1; fi ;;
	nginx2tls) if [[ $2 == h2 ]]; then port=$NA_H2; else port=$NA_H1; fi ;;
	haproxy) if [[ $2 == h2 ]]; then port=$HA_H2; else port=$HA_H1; fi ;;
	esac
	echo "http://127.0.0.1:$port$path"
}

# ---------------------------------------------------------------- servers

DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
if awk -v l="${LOAD_START%% *}" 'BEGIN { exit !(l > 0.5) }'; then
	say "warning: load average $LOAD_START before the run: other work on this machine skews the figures"
fi
cells=0
for _ in $RATES; do for _ in $PROTOCOLS; do cells=$((cells + 1)); done; done
cells=$((cells * ROUNDS * ${#SCENARIOS[@]}))
cells=$((cells + ROUNDS * 2)) # new-connection cells
say "$cells cells of ${WARMUP}+${CELL_SECONDS} s: about $(((cells * (CELL_SECONDS + WARMUP + 1) + 59) / 60)) min"

start_bg upstream "$BENCH" upstream --listen "127.0.0.1:$UP_PORT"
if ! wait_ready upstream "http://127.0.0.1:$UP_PORT/" "$READY_TIMEOUT"; then
	log_tail upstream
	die "the upstream (weft-bench upstream) did not start"
fi

# weft: five proxies. weft1 = one hop; weft2a -> weft2b = two plaintext
# hops; weft2ta -> weft2tb = two hops with mesh mTLS between them.
# The upstream.bench port is declared HTTP/1.1 (a Service's appProtocol:
# http), the hop nginx and HAProxy are configured for; weft1d leaves it to
# detection, so the client's HTTP version goes through unchanged.
weft_config() { # FILE ENDPOINT [MESH-JSON] [PORT-PROTOCOL]
	local mesh= protocol=${4:-http1}
	[[ -n ${3:-} ]] && mesh=',"mesh":'$3
	printf '%s\n' '{"schemaVersion":"1.0","generation":"bench","namespace":"bench","trustDomain":"cluster.local","inbound":{"mode":"permissive"},"outbound":{"defaults":{"retry":{"maxRetries":0,"retryOn":["connect-failure"],"methods":["GET"],"idempotencyHeader":"idempotency-key","budget":{"percent":20,"minPerSecond":10,"windowMs":10000},"backoffBaseMs":25,"backoffMaxMs":250},"loadBalancer":"PeakEwma"},"services":[{"name":"upstream","namespace":"bench","hostnames":["upstream.bench.svc.cluster.local","upstream.bench.svc","upstream.bench"],"ports":[{"port":80,"targetPort":8080,"protocol":"'"$protocol"'"}],"endpoints":["'"$2"'"]'"$mesh"'}]}}' >"$1"
}

# Identities minted by the mesh's own CA code, for both mTLS pairs: the
# server side is bench/upstream, the client side bench/client.
# nginx B serves a certificate for VENDOR_NAME from the same CA, which
# weft's TLS origination verifies by name (nginx A does not verify).
VENDOR_NAME=vendor.bench.example
if "$BENCH" certs --dir "$WORK/ids" --identity bench/upstream --identity bench/client \
	--server-name "$VENDOR_NAME" >"$WORK/certs.log" 2>&1; then
	certs_ok=1
else
	certs_ok=0
	sed 's/^/    | /' "$WORK/certs.log" >&2
	not_run weft2tls "" "weft-bench certs could not mint the identities"
	not_run weft1tls "" "weft-bench certs could not mint the identities"
	not_run nginx2tls "" "weft-bench certs could not mint the identities"
fi

weft_reason=
if [[ ! -x $WEFT ]]; then
	weft_reason="$WEFT was not built"
elif ! timeout 10 "${WEFT_CMD[@]}" --help >/dev/null 2>&1; then
	weft_reason="'${WEFT_CMD[*]} --help' fails: not a weft proxy"
fi
if [[ -n $weft_reason ]]; then
	say "ERROR: weft proxy is not available: $weft_reason"
	not_run weft1 "" "$weft_reason"
	not_run weft1k "" "$weft_reason"
	not_run weft1log "" "$weft_reason"
	not_run weft1d "" "$weft_reason"
	not_run weft2 "" "$weft_reason"
	[[ -n ${NOTRUN[weft2tls]:-} ]] || not_run weft2tls "" "$weft_reason"
	[[ -n ${NOTRUN[weft1tls]:-} ]] || not_run weft1tls "" "$weft_reason"
	not_run weft1cache "" "$weft_reason"
else
	weft_config "$WORK/weft-upstream.json" "127.0.0.1:$UP_PORT"
	weft_config "$WORK/weft-via-b.json" "127.0.0.1:$WB_IN"
	weft_config "$WORK/weft-detect.json" "127.0.0.1:$UP_PORT" "" detect
	common=(--no-transparent --workers 1)
	start_bg weft1 "${WEFT_CMD[@]}" "${common[@]}" --config "$WORK/weft-upstream.json" \
		--admin "127.0.0.1:$W1_ADMIN" --probe "127.0.0.1:$W1_PROBE" \
		--outbound-map "127.0.0.1:$W1_OUT=$HOST_HEADER:80"
	# weft1log: weft1 writing a JSON access-log line per request to its
	# stdout, which start_bg sends to a file, as a container runtime does.
	start_bg weft1log "${WEFT_CMD[@]}" "${common[@]}" --config "$WORK/weft-upstream.json" \
		--admin "127.0.0.1:$L1_ADMIN" --probe "127.0.0.1:$L1_PROBE" \
		--outbound-map "127.0.0.1:$L1_OUT=$HOST_HEADER:80" --access-log json
	# weft1k: weft x1 whose Service's pods come from discovery, 1000 of
	# them (a meshed Service, so it is balanced per pod; the proxy holds
	# no identity, so it speaks plaintext). One pod is the upstream; the
	# other 999 are terminating but still serving, so the balancer weighs
	# all 1000 on every request and sends none to them while the one
	# ready pod takes requests: the memory and the per-request cost of a
	# proxy that knows 1000 endpoints.
	printf '%s\n' '{"schemaVersion":"1.0","generation":"bench","namespace":"bench","trustDomain":"cluster.local","inbound":{"mode":"permissive"},"outbound":{"defaults":{"retry":{"maxRetries":0,"retryOn":["connect-failure"],"methods":["GET"],"idempotencyHeader":"idempotency-key","budget":{"percent":20,"minPerSecond":10,"windowMs":10000},"backoffBaseMs":25,"backoffMaxMs":250},"loadBalancer":"PeakEwma"},"services":[{"name":"upstream","namespace":"bench","hostnames":["upstream.bench.svc.cluster.local","upstream.bench.svc","upstream.bench"],"ports":[{"port":80,"targetPort":8080,"protocol":"http1"}],"mesh":{"namespace":"bench"}}]}}' >"$WORK/weft-1k.json"
	{
		printf '{"schemaVersion":"1.0","generation":"bench-1k","namespace":"bench","services":{"upstream.bench":{"groups":[{"ports":{"":%d},"endpoints":[' "$UP_PORT"
		printf '{"addresses":["127.0.0.1"],"ready":true,"zone":"zone-a","pod":"upstream-0","serviceAccount":"upstream"}'
		for ((i = 1; i < 1000; i++)); do
			printf ',{"addresses":["127.0.%d.%d"],"ready":false,"terminating":true,"serving":true,"zone":"zone-%d","pod":"upstream-%d","serviceAccount":"upstream"}' \
				$((i / 250 + 1)) $((i % 250 + 1)) $((i % 3)) "$i"
		done
		printf ']}]}}}\n'
	} >"$WORK/weft-1k-endpoints.json"
	start_bg weft1k "${WEFT_CMD[@]}" "${common[@]}" --config "$WORK/weft-1k.json" \
		--endpoints "$WORK/weft-1k-endpoints.json" \
		--admin "127.0.0.1:$K1_ADMIN" --probe "127.0.0.1:$K1_PROBE" \
		--outbound-map "127.0.0.1:$K1_OUT=$HOST_HEADER:80"
	# weft1cache: weft1 whose TrafficPolicy caches (1 MiB), asked for a
	# path the upstream answers with max-age=3600.
	sed 's|"endpoints":|"policy":{"source":"bench/cache","retry":{"maxRetries":0,"retryOn":["connect-failure"],"methods":["GET"],"idempotencyHeader":"idempotency-key","budget":{"percent":20,"minPerSecond":10,"windowMs":10000},"backoffBaseMs":25,"backoffMaxMs":250},"loadBalancer":"PeakEwma","cache":{"maxBytes":1048576,"maxObjectBytes":65536}},"endpoints":|' \
		"$WORK/weft-upstream.json" >"$WORK/weft-cache.json"
	start_bg weft1cache "${WEFT_CMD[@]}" "${common[@]}" --config "$WORK/weft-cache.json" \
		--admin "127.0.0.1:$C1_ADMIN" --probe "127.0.0.1:$C1_PROBE" \
		--outbound-map "127.0.0.1:$C1_OUT=$HOST_HEADER:80"
	start_bg weft1d "${WEFT_CMD[@]}" "${common[@]}" --config "$WORK/weft-detect.json" \
		--admin "127.0.0.1:$D1_ADMIN" --probe "127.0.0.1:$D1_PROBE" \
		--outbound-map "127.0.0.1:$D1_OUT=$HOST_HEADER:80"
	start_bg weft2b "${WEFT_CMD[@]}" "${common[@]}" --config "$WORK/weft-upstream.json" \
		--admin "127.0.0.1:$WB_ADMIN" --probe "127.0.0.1:$WB_PROBE" \
		--inbound-map "127.0.0.1:$WB_IN=$UP_PORT"
	start_bg weft2a "${WEFT_CMD[@]}" "${common[@]}" --config "$WORK/weft-via-b.json" \
		--admin "127.0.0.1:$WA_ADMIN" --probe "127.0.0.1:$WA_PROBE" \
		--outbound-map "127.0.0.1:$WA_OUT=$HOST_HEADER:80"
	if ((certs_ok)); then
		weft_config "$WORK/weft-via-tb.json" "127.0.0.1:$TB_IN" '{"namespace":"bench","serviceAccounts":["upstream"],"strict":true}'
		start_bg weft2tb "${WEFT_CMD[@]}" "${common[@]}" --config "$WORK/weft-upstream.json" \
			--admin "127.0.0.1:$TB_ADMIN" --probe "127.0.0.1:$TB_PROBE" \
			--inbound-map "127.0.0.1:$TB_IN=$UP_PORT" \
			--identity-dir "$WORK/ids/upstream" --service-account upstream
		start_bg weft2ta "${WEFT_CMD[@]}" "${common[@]}" --config "$WORK/weft-via-tb.json" \
			--admin "127.0.0.1:$TA_ADMIN" --probe "127.0.0.1:$TA_PROBE" \
			--outbound-map "127.0.0.1:$TA_OUT=$HOST_HEADER:80" \
			--identity-dir "$WORK/ids/client" --service-account client
		# weft1tls: the load generator's Host names an ExternalService
		# whose port originates TLS to nginx B (the vendor), verifying
		# B's certificate against the CA by VENDOR_NAME and presenting
		# the client certificate nginx B requires: the copy the operator
		# puts in the identity Secret (egress.<secret>.crt/.key). The
		# listener stands for a connection to an address nothing serves
		# (127.0.0.2): the request is routed by its Host, as in a pod.
		mkdir -p "$WORK/ids/origin"
		cp "$WORK/ids/client/"* "$WORK/ids/origin/"
		cp "$WORK/ids/client/tls.crt" "$WORK/ids/origin/egress.bench-client.crt"
		cp "$WORK/ids/client/tls.key" "$WORK/ids/origin/egress.bench-client.key"
		ca_json=$(awk '{printf "%s\\n", $0}' "$WORK/ids/client/ca.crt")
		printf '%s\n' '{"schemaVersion":"1.0","generation":"bench","namespace":"bench","trustDomain":"cluster.local","inbound":{"mode":"permissive"},"outbound":{"defaults":{"retry":{"maxRetries":0,"retryOn":["connect-failure"],"methods":["GET"],"idempotencyHeader":"idempotency-key","budget":{"percent":20,"minPerSecond":10,"windowMs":10000},"backoffBaseMs":25,"backoffMaxMs":250},"loadBalancer":"PeakEwma"},"services":[],"externalServices":[{"name":"vendor","namespace":"bench","hosts":["'"$HOST_HEADER"'"],"ports":[{"port":80,"targetPort":'"$NB_TLS"',"tls":{"caCertificates":"'"$ca_json"'","serverName":"'"$VENDOR_NAME"'","clientCertificate":"bench-client"}}],"endpoints":["127.0.0.1:'"$NB_TLS"'"]}]}}' >"$WORK/weft-origin.json"
		start_bg weft1tls "${WEFT_CMD[@]}" "${common[@]}" --config "$WORK/weft-origin.json" \
			--admin "127.0.0.1:$O1_ADMIN" --probe "127.0.0.1:$O1_PROBE" \
			--outbound-map "127.0.0.1:$O1_OUT=127.0.0.2:80" \
			--identity-dir "$WORK/ids/origin" --service-account client
	fi
fi

mkdir -p "$WORK/nginx-tmp"
# nginx's worker (nobody, under a root master) writes the cache files: it
# must pass through the work directory (traverse only, no listing) into a
# cache directory of its own.
mkdir -p "$WORK/nginx-cache"
chmod 711 "$WORK"
chmod 777 "$WORK/nginx-cache"
sed -e "s|@WORKDIR@|$WORK|g" -e "s|@UPSTREAM_PORT@|$UP_PORT|g" \
	-e "s|@H1_PORT@|$NG_H1|g" -e "s|@H2_PORT@|$NG_H2|g" \
	"$HERE/nginx.conf.tmpl" >"$WORK/nginx.conf"
sed -e "s|@UPSTREAM_PORT@|$UP_PORT|g" -e "s|@H1_PORT@|$HA_H1|g" -e "s|@H2_PORT@|$HA_H2|g" \
	"$HERE/haproxy.cfg.tmpl" >"$WORK/haproxy.cfg"
nginx_args=(-p "$WORK/" -e "$WORK/nginx-error.log" -c "$WORK/nginx.conf")
if "$NGINX" -t -q "${nginx_args[@]}" >"$WORK/nginx-check.log" 2>&1; then
	start_bg nginx "$NGINX" "${nginx_args[@]}"
else
	sed 's/^/    | /' "$WORK/nginx-check.log" >&2
	not_run nginx "" "nginx -t rejected the configuration"
fi
# nginx ×2 mTLS: the same nginx as a client and a server sidecar, TLS 1.3
# with certificates from the mesh CA between them.
if ((certs_ok)); then
	sed -e "s|@WORKDIR@|$WORK|g" -e "s|@H1_PORT@|$NA_H1|g" -e "s|@H2_PORT@|$NA_H2|g" \
		-e "s|@NEXT_PORT@|$NB_TLS|g" -e "s|@IDS@|$WORK/ids|g" \
		"$HERE/nginx-mtls-client.conf.tmpl" >"$WORK/nginx-mtls-client.conf"
	sed -e "s|@WORKDIR@|$WORK|g" -e "s|@TLS_PORT@|$NB_TLS|g" -e "s|@UPSTREAM_PORT@|$UP_PORT|g" \
		-e "s|@IDS@|$WORK/ids|g" \
		-e "s|@SERVER_CERT@|$WORK/ids/server|g" \
		"$HERE/nginx-mtls-server.conf.tmpl" >"$WORK/nginx-mtls-server.conf"
	nginx2_ok=1
	for role in client server; do
		args=(-p "$WORK/" -e "$WORK/nginx-mtls-$role-error.log" -c "$WORK/nginx-mtls-$role.conf")
		if ! "$NGINX" -t -q "${args[@]}" >"$WORK/nginx-mtls-$role-check.log" 2>&1; then
			sed 's/^/    | /' "$WORK/nginx-mtls-$role-check.log" >&2
			not_run nginx2tls "" "nginx -t rejected the mTLS $role configuration"
			[[ -n ${NOTRUN[weft1tls]:-} ]] || not_run weft1tls "" "nginx -t rejected the mTLS $role configuration (nginx B is its vendor)"
			nginx2_ok=0
			break
		fi
	done
	if ((nginx2_ok)); then
		start_bg nginx2b "$NGINX" -p "$WORK/" -e "$WORK/nginx-mtls-server-error.log" -c "$WORK/nginx-mtls-server.conf"
		start_bg nginx2a "$NGINX" -p "$WORK/" -e "$WORK/nginx-mtls-client-error.log" -c "$WORK/nginx-mtls-client.conf"
	fi
fi
if "$HAPROXY" -c -q -f "$WORK/haproxy.cfg" >"$WORK/haproxy-check.log" 2>&1; then
	start_bg haproxy "$HAPROXY" -db -f "$WORK/haproxy.cfg"
else
	sed 's/^/    | /' "$WORK/haproxy-check.log" >&2
	not_run haproxy "" "haproxy -c rejected the configuration"
fi

# Readiness, with one shared deadline: the servers started together.
# check_ready NAME URL WHAT: on failure sets READY_WHY and shows the log.
ready_deadline=$((SECONDS + READY_TIMEOUT))
READY_WHY=
check_ready() {
	local left=$((ready_deadline - SECONDS)) last
	((left >= 1)) || left=1
	wait_ready "$1" "$2" "$left" && return 0
	if kill -0 "${PID[$1]}" 2>/dev/null; then
		READY_WHY="$1 did not answer 200 on $3 within ${READY_TIMEOUT} s"
	else
		last=$(grep -v '^[[:space:]]*$' "$WORK/$1.log" 2>/dev/null | tail -n 1 | sed 's/\x1b\[[0-9;]*m//g')
		READY_WHY="$1 exited at startup${last:+ (last log line: ${last:0:200})}"
	fi
	say "ERROR: $READY_WHY"
	log_tail "$1"
	if [[ $1 == nginx ]]; then log_tail nginx-error; fi
	if [[ $1 == nginx2a ]]; then
		log_tail nginx-mtls-client-error
		log_tail nginx-mtls-server-error
	fi
	return 1
}
if [[ -z ${NOTRUN[weft1]:-} ]]; then
	if ! check_ready weft1 "http://127.0.0.1:$W1_ADMIN/ready" /ready; then
		stop_scenario weft1
		not_run weft1 "" "$READY_WHY"
	fi
	for name in weft1log weft1k weft1d weft2b weft2a weft2tb weft2ta weft1tls weft1cache; do
		case $name in
		weft1cache) admin=$C1_ADMIN scn=weft1cache ;;
		weft1tls) admin=$O1_ADMIN scn=weft1tls ;;
		weft1log) admin=$L1_ADMIN scn=weft1log ;;
		weft1k) admin=$K1_ADMIN scn=weft1k ;;
		weft1d) admin=$D1_ADMIN scn=weft1d ;;
		weft2b) admin=$WB_ADMIN scn=weft2 ;;
		weft2a) admin=$WA_ADMIN scn=weft2 ;;
		weft2tb) admin=$TB_ADMIN scn=weft2tls ;;
		weft2ta) admin=$TA_ADMIN scn=weft2tls ;;
		esac
		if [[ -z ${NOTRUN[$scn]:-} ]] && ! check_ready "$name" "http://127.0.0.1:$admin/ready" /ready; then
			stop_scenario "$scn"
			not_run "$scn" "" "$READY_WHY"
		fi
	done
fi
for scn in nginx nginx2tls haproxy; do
	name=$scn
	[[ $scn == nginx2tls ]] && name=nginx2a
	if [[ -z ${NOTRUN[$scn]:-} ]] && ! check_ready "$name" "$(url_for "$scn" h1)" "a request through it"; then
		stop_scenario "$scn"
		not_run "$scn" "" "$READY_WHY"
	fi
done
[[ -n ${NOTRUN[nginx]:-} ]] && not_run nginxcache "" "the nginx it uses did not run: ${NOTRUN[nginx]}"

# Idle memory, before any load went through the proxies.
sleep 1
for scn in "${SCENARIOS[@]:1}"; do
	is_not_run "$scn" "" && continue
	emit "{\"kind\":\"idle\",\"scenario\":\"$scn\",\"proc\":$(proc_json "$scn")}"
done

# Smoke test of each path and protocol: a failing one is reported, not measured.
for scn in "${SCENARIOS[@]}"; do
	for proto in $PROTOCOLS; do
		is_not_run "$scn" "$proto" && continue
		args=(--url "$(url_for "$scn" "$proto")" --host "$HOST_HEADER" --rate 50 --duration 1s
			--connections 2 --check --label "smoke $scn $proto")
		[[ $proto == h2 ]] && args+=(--http2)
		if ! "$BENCH" load "${args[@]}" 2>"$WORK/smoke-$scn-$proto.log"; then
			sed 's/^/    | /' "$WORK/smoke-$scn-$proto.log" >&2
			[[ $scn == direct ]] && die "the upstream fails its smoke test"
			not_run "$scn" "$proto" "smoke test failed: $(tail -n 1 "$WORK/smoke-$scn-$proto.log")"
		fi
	done
done

# ---------------------------------------------------------------- rounds

run_cell() { # ROUND SCENARIO RATE PROTOCOL
	local round=$1 scn=$2 rate=$3 proto=$4 before after load
	is_not_run "$scn" "$proto" && return 0
	if [[ -z ${DEAD[$scn]:-} ]] && ! alive "$scn"; then
		DEAD[$scn]="a $scn process exited during the run (round $round)"
		say "ERROR: ${DEAD[$scn]}"
		log_tail "$scn" 2>/dev/null || true
	fi
	if [[ -n ${DEAD[$scn]:-} ]]; then
		emit "{\"kind\":\"skipped\",\"round\":$round,\"scenario\":\"$scn\",\"rate\":$rate,\"protocol\":\"$proto\",\"reason\":\"$(json_safe "${DEAD[$scn]}")\"}"
		return 0
	fi
	local args=(--url "$(url_for "$scn" "$proto")" --host "$HOST_HEADER" --rate "$rate"
		--duration "${CELL_SECONDS}s" --warmup "${WARMUP}s"
		--upstream-stats "http://127.0.0.1:$UP_PORT/__bench/stats" --json
		--label "round $round/$ROUNDS $proto $rate/s $scn")
	if [[ $proto == h2 ]]; then args+=(--http2 --connections "$H2_CONN"); else args+=(--connections "$H1_CONN"); fi
	before=$(proc_json "$scn")
	load=$("$BENCH" load "${args[@]}") || die "weft-bench load failed (round $round, $scn, $proto, $rate/s)"
	after=$(proc_json "$scn")
	emit "{\"kind\":\"cell\",\"round\":$round,\"scenario\":\"$scn\",\"rate\":$rate,\"protocol\":\"$proto\",\"load\":$load,\"before\":$before,\"after\":$after}"
	sleep 0.5
}

n=${#SCENARIOS[@]}
for ((round = 1; round <= ROUNDS; round++)); do
	order=()
	for ((i = 0; i < n; i++)); do order+=("${SCENARIOS[$(((i + round - 1) % n))]}"); done
	say "round $round/$ROUNDS: ${order[*]}"
	for rate in $RATES; do
		for proto in $PROTOCOLS; do
			for scn in "${order[@]}"; do run_cell "$round" "$scn" "$rate" "$proto"; done
		done
	done
done

# ---------------------------------------------------------------- new connections

# Handshake cost: every request on a new connection straight to weft B's
# inbound listener (of the mTLS pair), in plaintext and in mesh mTLS (the
# load generator holds a mesh identity, as a client proxy would). CPU is
# weft B's alone.
run_handshake_cell() { # ROUND MODE
	local round=$1 mode=$2 before after load
	local args=(--url "http://127.0.0.1:$TB_IN/" --host "$HOST_HEADER" --rate "$HANDSHAKE_RATE"
		--duration "${CELL_SECONDS}s" --warmup "${WARMUP}s" --connections 16
		--new-connection-per-request --json
		--label "round $round/$ROUNDS new connections, $mode, $HANDSHAKE_RATE/s")
	[[ $mode == mtls ]] && args+=(--mesh-identity "$WORK/ids/client")
	before=$(proc_json weft2tb)
	load=$("$BENCH" load "${args[@]}") || die "weft-bench load failed (round $round, new connections, $mode)"
	after=$(proc_json weft2tb)
	emit "{\"kind\":\"handshake\",\"round\":$round,\"mode\":\"$mode\",\"rate\":$HANDSHAKE_RATE,\"load\":$load,\"before\":$before,\"after\":$after}"
	sleep 0.5
}
if [[ -z ${NOTRUN[weft2tls]:-} ]] && alive weft2tls; then
	for ((round = 1; round <= ROUNDS; round++)); do
		if ((round % 2)); then modes=(plain mtls); else modes=(mtls plain); fi
		say "round $round/$ROUNDS: new connections (${modes[*]})"
		for mode in "${modes[@]}"; do run_handshake_cell "$round" "$mode"; done
	done
fi

for scn in "${SCENARIOS[@]:1}"; do
	is_not_run "$scn" "" && continue
	emit "{\"kind\":\"after\",\"scenario\":\"$scn\",\"proc\":$(proc_json "$scn")}"
done

# ---------------------------------------------------------------- report

nginx_version=$("$NGINX" -v 2>&1 | sed -n 's|.*nginx/\([^ ]*\).*|\1|p' | head -n 1) || true
haproxy_version=$("$HAPROXY" -v 2>/dev/null | awk 'NR == 1 { print $3 }') || true
weft_version=$(timeout 5 "$WEFT" --version 2>/dev/null | head -n 1) || true
git_rev=$(git rev-parse --short HEAD 2>/dev/null) || true
if [[ -n $git_rev ]] && ! git diff --quiet HEAD 2>/dev/null; then git_rev="$git_rev, uncommitted changes"; fi
versions="Compared: ${weft_version:-weft (unknown version)}${git_rev:+ (git $git_rev)}, nginx ${nginx_version:-?}, HAProxy ${haproxy_version:-?}."

mkdir -p "$(dirname "$OUT")"
"$BENCH" report --input "$RESULTS" --out "$OUT" --date "$DATE" \
	--clk-tck "$(getconf CLK_TCK 2>/dev/null || echo 100)" \
	--seconds "$CELL_SECONDS" --warmup "$WARMUP" --rounds "$ROUNDS" \
	--h1-connections "$H1_CONN" --h2-connections "$H2_CONN" --versions "$versions" \
	--note "Load average (1, 5, 15 min) before the run: $LOAD_START; after: $(cut -d' ' -f1-3 /proc/loadavg). Anything else running on the machine during the run adds noise to every row."
cp "$RESULTS" "${OUT%.md}.jsonl"

if [[ -n ${NOTRUN[weft1]:-} || -n ${NOTRUN[weft2]:-} ]]; then
	say "ERROR: the weft scenarios did not run (${NOTRUN[weft1]:-${NOTRUN[weft2]}}); $OUT marks them 'not run'"
	[[ ${BENCH_ALLOW_MISSING_WEFT:-0} == 1 ]] || exit 3
fi
