#!/usr/bin/env bash
# Tier 6: the whole of weft in a kind cluster with the demo shop (`make e2e`).
#
# Builds the weft image (e2e/Dockerfile), creates a two-node kind cluster,
# installs charts/weft with Helm, applies examples/shop and the shop's
# workloads (e2e/workloads.yaml), then checks what a platform team would:
#   1. injection: every shop and payments pod carries weft-proxy, the legacy
#      namespace's pod does not; each meshed namespace has its ConfigMap and
#      identity Secret;
#   2. retries: inventory fails 20 % of requests, callers see almost none;
#   3. canary split: ~10 % of checkout requests reach checkout-canary, and
#      `x-canary: true` always does;
#   4. access denial: only checkout may call payments (403 otherwise);
#   5. circuit breaking: with every inventory replica failing, callers get
#      `weft-proxy-error: circuit-open`, and it closes after recovery;
#   6. the staged PERMISSIVE -> STRICT rollout of payments reaches Strict,
#      after which a pod outside the mesh can no longer reach payments and
#      checkout still can.
#
# Needs docker (with a reachable engine), kind, kubectl, helm and python3;
# without them it exits 2 naming what is missing, never with a pass.
# WEFT_E2E_KEEP=1 keeps the cluster afterwards; WEFT_E2E_CLUSTER names it.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${WEFT_E2E_CLUSTER:-weft-e2e}
IMAGE=weft:e2e

missing=()
for tool in docker kind kubectl helm python3; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "e2e: NOT RUN: missing ${missing[*]} (tier 6 needs docker, kind, kubectl, helm and python3)" >&2
  exit 2
fi
if ! docker info >/dev/null 2>&1; then
  echo "e2e: NOT RUN: the Docker engine is not reachable (docker info failed)" >&2
  exit 2
fi

K=(kubectl --context "kind-$CLUSTER")

dump() {
  echo "---- state at failure ----" >&2
  "${K[@]}" get pods -A -o wide >&2 || true
  "${K[@]}" get mtlspolicies,trafficpolicies,serviceroutes,accesspolicies -A >&2 || true
  "${K[@]}" -n weft-system logs -l app.kubernetes.io/name=weft-control-plane --tail=80 >&2 || true
}
fail() {
  echo "e2e: FAIL: $*" >&2
  dump
  exit 1
}
pass() { echo "e2e: ok: $*"; }

cleanup() {
  if [ -z "${WEFT_E2E_KEEP:-}" ]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

# wait_for DESCRIPTION SECONDS COMMAND...: polls every 2 s, bounded.
wait_for() {
  local desc=$1 secs=$2
  shift 2
  local end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$end" ] || fail "$desc (not within ${secs} s)"
    sleep 2
  done
  pass "$desc"
}

# fetch NAMESPACE DEPLOYMENT URL [weft-demo --fetch options]: from inside
# that workload's app container (so through its sidecar).
fetch() {
  local ns=$1 deploy=$2
  shift 2
  "${K[@]}" -n "$ns" exec "deploy/$deploy" -c app -- /weft-demo --fetch "$@"
}

# field JSON PYTHON-EXPRESSION: evaluates the expression with `d` bound to
# the parsed JSON.
field() {
  python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2]))' "$1" "$2"
}

echo "e2e: building $IMAGE"
docker build -q -f e2e/Dockerfile -t "$IMAGE" . >/dev/null
echo "e2e: creating kind cluster $CLUSTER"
kind create cluster --name "$CLUSTER" --config e2e/kind.yaml --wait 180s
kind load docker-image "$IMAGE" --name "$CLUSTER"

echo "e2e: installing charts/weft"
helm --kube-context "kind-$CLUSTER" install weft charts/weft \
  --namespace weft-system --create-namespace \
  --set image.repository=weft --set image.tag=e2e --set image.pullPolicy=Never \
  --wait --timeout 5m
pass "control plane ready"

"${K[@]}" apply -f examples/shop/
# The example's 10 min observation window, shortened for the test.
"${K[@]}" -n payments patch mtlspolicy payments --type merge \
  -p '{"spec":{"rollout":{"observationWindow":"30s"}}}'
"${K[@]}" apply -f e2e/workloads.yaml
for ns in shop payments legacy; do
  "${K[@]}" -n "$ns" rollout status deploy --timeout 240s
done
pass "the shop is running"

# 1. Injection, ConfigMaps and identities.
containers() {
  "${K[@]}" -n "$1" get pods -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.spec.initContainers[*].name}{" "}{.spec.containers[*].name}{"\n"}{end}'
}
for ns in shop payments; do
  while read -r pod names; do
    [ -n "$pod" ] || continue
    [[ " $names " == *" weft-proxy "* ]] || fail "pod $ns/$pod has no weft-proxy ($names)"
  done < <(containers "$ns")
  "${K[@]}" -n "$ns" get configmap weft-proxy-config >/dev/null || fail "$ns has no weft-proxy-config"
  "${K[@]}" -n "$ns" get secret weft-identity >/dev/null || fail "$ns has no weft-identity"
done
if containers legacy | grep -q weft-proxy; then
  fail "a pod in the unlabelled namespace legacy was injected"
fi
pass "injection: every shop and payments pod has a sidecar, legacy's has none"

# 2. Retries hide inventory's 20 % failures.
summary=$(fetch shop shopper http://inventory.shop/items --count 200)
ok=$(field "$summary" 'd["statuses"].get("200", 0)')
[ "$ok" -ge 194 ] || fail "retries: $ok of 200 succeeded ($summary)"
pass "retries: $ok of 200 requests to a 20 %-failing inventory succeeded"

# 3. Canary split and opt-in.
summary=$(fetch shop shopper http://checkout.shop/ --count 400)
canary=$(field "$summary" 'd["services"].get("checkout-canary", 0)')
if [ "$canary" -lt 20 ] || [ "$canary" -gt 60 ]; then
  fail "canary split: $canary of 400 reached checkout-canary, expected ~40 ($summary)"
fi
summary=$(fetch shop shopper http://checkout.shop/ --count 20 --header 'x-canary: true')
[ "$(field "$summary" 'd["services"].get("checkout-canary", 0)')" -eq 20 ] ||
  fail "x-canary: true did not always reach the canary ($summary)"
pass "canary: $canary of 400 to checkout-canary, opt-in header always"

# 4. Only checkout may call payments.
status=$(fetch shop shopper http://payments.payments/charge | head -1)
[ "$status" = 403 ] || fail "shopper -> payments answered $status, expected 403"
body=$(fetch shop checkout http://checkout.shop/buy --header 'x-canary: false' | tail -n +2)
[ "$(field "$body" '[x["status"] for x in d["downstream"] if "payments" in x["url"]][0]')" = 200 ] ||
  fail "checkout -> payments did not succeed ($body)"
pass "access: shopper gets 403 from payments, checkout gets 200"

# 5. Circuit breaking: every inventory replica fails every request.
faults() {
  for pod in $("${K[@]}" -n shop get pods -l app=inventory -o name); do
    "${K[@]}" -n shop exec "$pod" -c app -- /weft-demo --method POST \
      --fetch "http://127.0.0.1:8080/__demo/faults?error_rate=$1" >/dev/null
  done
}
faults 1
summary=$(fetch shop shopper http://inventory.shop/items --count 40)
opened=$(field "$summary" 'd["proxy_errors"].get("circuit-open", 0)')
[ "$opened" -ge 1 ] || fail "circuit breaking: no circuit-open answer ($summary)"
faults 0
recovered() {
  local s
  s=$(fetch shop shopper http://inventory.shop/items --count 10)
  [ "$(field "$s" 'd["statuses"].get("200", 0)')" -eq 10 ]
}
wait_for "circuit breaking: $opened of 40 failed fast with circuit-open, then closed after recovery" 90 recovered

# 6. Staged rollout of payments to STRICT.
phase() { "${K[@]}" -n payments get mtlspolicy payments -o jsonpath='{.status.phase}'; }
is_strict() { [ "$(phase)" = Strict ]; }
wait_for "mTLS rollout: payments reached Strict" 360 is_strict
echo "e2e: payments phase $(phase), since $("${K[@]}" -n payments get mtlspolicy payments -o jsonpath='{.status.phaseSince}')"
if fetch legacy stranger http://payments.payments/charge >/dev/null 2>&1; then
  status=$(fetch legacy stranger http://payments.payments/charge | head -1)
  [ "$status" != 200 ] || fail "a pod outside the mesh reached payments under STRICT"
fi
body=$(fetch shop checkout http://checkout.shop/buy --header 'x-canary: false' | tail -n +2)
[ "$(field "$body" '[x["status"] for x in d["downstream"] if "payments" in x["url"]][0]')" = 200 ] ||
  fail "checkout -> payments failed under STRICT ($body)"
pass "STRICT: plaintext from outside the mesh is refused, checkout still reaches payments"

echo "e2e: PASS"
