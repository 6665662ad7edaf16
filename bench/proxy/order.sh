#!/usr/bin/env bash
# Regenerates src/bin/weft-proxy.order: the functions the sidecar runs, for
# the linker to place together at the front of .text (build.rs passes it to
# lld as --symbol-ordering-file). Resident code is counted in 64 KiB
# fault-around windows, so hot code spread among cold code keeps most of
# the binary resident; packed together it keeps about what it runs.
#
# How: the release weft-proxy runs under callgrind (which records every
# function executed) from start-up through HTTP/1.1 and h2c traffic, both to
# a port declared HTTP/1.1 and to one left to detection, and the admin
# endpoints; the executed functions, hottest first, become the order file.
# A function missing from it (new code) is only placed later: the file
# needs regenerating when the data path changes a lot, not on every change.
#
# Usage: make proxy-order   (needs valgrind; loopback only)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
CARGO=${CARGO:-cargo}
PORT=${ORDER_PORT_BASE:-18900}
command -v valgrind >/dev/null || { echo "order.sh: valgrind is required (apt-get install -y valgrind)" >&2; exit 2; }
"$CARGO" build --release --bin weft-proxy --bin weft-bench
WEFT=$ROOT/target/release/weft-proxy
BENCH=$ROOT/target/release/weft-bench
WORK=$(mktemp -d "${TMPDIR:-/tmp}/weft-order.XXXXXX")
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do kill -TERM -- "-$p" 2>/dev/null || kill -TERM "$p" 2>/dev/null || true; done
	sleep 0.5
	rm -rf "$WORK"
}
trap cleanup EXIT

svc() { # NAME PROTOCOL
	printf '{"name":"%s","namespace":"bench","hostnames":["%s.bench.svc.cluster.local"],"ports":[{"port":80,"targetPort":8080,"protocol":"%s"}],"endpoints":["127.0.0.1:%s"]}' "$1" "$1" "$2" "$PORT"
}
printf '{"schemaVersion":"1.0","generation":"order","namespace":"bench","trustDomain":"cluster.local","inbound":{"mode":"permissive"},"outbound":{"defaults":{"retry":{"maxRetries":1,"retryOn":["connect-failure"],"methods":["GET"],"idempotencyHeader":"idempotency-key","budget":{"percent":20,"minPerSecond":10,"windowMs":10000},"backoffBaseMs":25,"backoffMaxMs":250},"loadBalancer":"PeakEwma"},"services":[%s,%s]}}\n' \
	"$(svc detected detect)" "$(svc declared http1)" >"$WORK/config.json"

setsid "$BENCH" upstream --listen "127.0.0.1:$PORT" >"$WORK/upstream.log" 2>&1 </dev/null &
PIDS+=("$!")
setsid valgrind --tool=callgrind --demangle=no --callgrind-out-file="$WORK/cg.out" \
	"$WEFT" --no-transparent --workers 1 --config "$WORK/config.json" \
	--admin "127.0.0.1:$((PORT + 1))" --probe "127.0.0.1:$((PORT + 2))" \
	--outbound-map "127.0.0.1:$((PORT + 3))=detected.bench.svc.cluster.local:80" \
	--outbound-map "127.0.0.1:$((PORT + 4))=declared.bench.svc.cluster.local:80" \
	--inbound-map "127.0.0.1:$((PORT + 5))=$PORT" >"$WORK/weft.log" 2>&1 </dev/null &
VG=$!
PIDS+=("$VG")
"$BENCH" wait-ready --url "http://127.0.0.1:$((PORT + 1))/ready" --timeout 120s --pid "$VG"
for port in $((PORT + 3)) $((PORT + 4)) $((PORT + 5)); do
	for proto in "" --http2; do
		"$BENCH" load --url "http://127.0.0.1:$port/" --host detected.bench.svc.cluster.local \
			--rate 300 --duration 3s --connections 8 $proto --label "order $port ${proto:-h1}"
	done
done
"$BENCH" wait-ready --url "http://127.0.0.1:$((PORT + 1))/metrics" --timeout 10s --pid "$VG"
"$BENCH" wait-ready --url "http://127.0.0.1:$((PORT + 1))/config" --timeout 10s --pid "$VG"
kill -TERM "$VG"
for _ in $(seq 100); do kill -0 "$VG" 2>/dev/null || break; sleep 0.2; done

python3 - "$WORK/cg.out" "$WEFT" src/bin/weft-proxy.order <<'PY'
import collections, re, subprocess, sys
out, binary, dest = sys.argv[1:]
names, cost, cur = {}, collections.Counter(), None
for line in open(out, errors="replace"):
    m = re.match(r"^(c?fn)=\((\d+)\)(?: (.*))?$", line.rstrip("\n"))
    if m:
        if m.group(3):
            names[m.group(2)] = re.sub(r"'\d+$", "", m.group(3))
        if m.group(1) == "fn":
            cur = names.get(m.group(2))
        continue
    if cur and line[:1].isdigit():
        parts = line.split()
        if len(parts) >= 2:
            cost[cur] += int(parts[1])
symtab = subprocess.run(["nm", "--defined-only", binary], capture_output=True, text=True, check=True).stdout
defined = {p[2] for p in (l.split() for l in symtab.splitlines()) if len(p) >= 3 and p[1] in "tTwW"}
ran = sorted({n for n in names.values() if n in defined}, key=lambda n: (-cost[n], n))
with open(dest, "w") as f:
    f.write("\n".join(ran) + "\n")
print(f"{dest}: {len(ran)} functions", file=sys.stderr)
PY
