#!/usr/bin/env bash
# Tier 6: the whole of weft on a real cluster with the demo shop (`make e2e`).
#
# Where it runs (every setting is checked before any tool or cluster is
# used; a bad one exits 2 naming the fix):
#
#   by default    a new kind cluster (e2e/kind.yaml) named $WEFT_E2E_CLUSTER
#                 (weft-e2e), the image built by `make image-docker` and
#                 loaded with `kind load docker-image`; the cluster is
#                 deleted afterwards. Needs docker (a reachable engine),
#                 kind, kubectl, helm, python3 and make.
#   WEFT_E2E_KUBECONFIG=PATH and/or WEFT_E2E_CONTEXT=NAME
#                 an existing cluster; no kind, no docker. Needs kubectl,
#                 helm and python3, and the image, given by one of:
#     WEFT_E2E_IMAGE=REPOSITORY:TAG   already on every node: used as it is,
#                 in the chart's values (so the control plane and the
#                 sidecars the Mesh describes) and in the shop's workloads;
#     WEFT_E2E_LOAD='COMMAND {archive}'   run.sh runs `make image`, then
#                 COMMAND with {archive} replaced by the path of the archive
#                 it wrote (target/image/weft-<version>.oci.tar, holding
#                 ghcr.io/weft-mesh/weft:<version>), e.g. on a containerd
#                 node: WEFT_E2E_LOAD='sudo ctr -n k8s.io images import {archive}'.
#   WEFT_E2E_KEEP=1   keep everything afterwards (to look around).
#
# On an existing cluster the suite needs namespaces weft-system, shop,
# payments and legacy, the release `weft`, and weft's CRDs for itself. It
# labels what it creates weft.dev/e2e=true, refuses to start (exit 2) when
# any of them exists without that label, or when weft is installed there
# already, or when another namespace is labelled weft.dev/inject=enabled
# (its injector would mesh that namespace's pods); it removes, first, what
# an earlier run left with the label, and afterwards exactly what it made.
#
# Then it installs charts/weft with e2e/values.yaml (every pod it starts
# requests at most 10m CPU: one node with 2 CPUs holds the suite), applies
# examples/shop and e2e/workloads.yaml, and checks, one line each
# (`e2e: ok: ...` or `e2e: FAIL: ...`), going on after a failure where later
# checks do not depend on it:
#   - every pod it started requests at most 10m CPU;
#   - injection: every shop and payments pod carries weft-proxy, the legacy
#     namespace's pod does not; each meshed namespace has its ConfigMap and
#     identity Secret;
#   - retries: inventory fails 20 % of requests, callers see almost none;
#   - canary split: ~10 % of checkout requests reach checkout-canary, and
#     `x-canary: true` always does;
#   - access denial: only checkout may call payments (403 otherwise);
#   - access logs: shopper's sidecar (its pod asks with an annotation)
#     writes a JSON line per call on its stdout, over mTLS, named;
#   - circuit breaking: with every inventory replica failing, callers get
#     `weft-proxy-error: circuit-open`, and it closes after recovery;
#   - a TrafficPolicy edit reaches a proxy (its admin /config) in under 2 s,
#     measured, so through the API watch, not the kubelet's volume refresh;
#   - a deleted weft-proxy-config comes back, the same, and traffic flows;
#   - the staged PERMISSIVE -> STRICT rollout of payments reaches Strict;
#     then the payments pods stay Ready, with no restart, for several probe
#     periods (their probes pass the proxy's probe port); a pod outside the
#     mesh can no longer reach payments and checkout still can;
#   - a Job's pod, with weft-proxy as a native sidecar, completes;
#   - with the control plane scaled to 0 the proxies keep serving on their
#     last config; then it is scaled back.
# The last line is `N passed, M failed`. Exit 0 when all passed, 1 when any
# failed, 2 when it did not run (what is missing is named; never a pass).
set -euo pipefail
shopt -s inherit_errexit
here=${BASH_SOURCE[0]%/*}
[ "$here" != "${BASH_SOURCE[0]}" ] || here=.
cd "$here/.."

not_run() {
  echo "e2e: NOT RUN: $*" >&2
  exit 2
}

# ---- settings: bash alone, before any tool or cluster is touched --------

KEEP=${WEFT_E2E_KEEP:-}
KUBECONFIG_FILE=${WEFT_E2E_KUBECONFIG:-}
CONTEXT=${WEFT_E2E_CONTEXT:-}
IMAGE=${WEFT_E2E_IMAGE:-}
LOAD=${WEFT_E2E_LOAD:-}
CLUSTER=${WEFT_E2E_CLUSTER:-}

case "$KEEP" in
  '' | 0 | 1) ;;
  *) not_run "WEFT_E2E_KEEP=$KEEP: set it to 1 to keep what the run made, or leave it unset" ;;
esac

version=
while IFS= read -r line; do
  case "$line" in
    'version = "'*'"')
      version=${line#'version = "'}
      version=${version%'"'}
      break
      ;;
  esac
done <Cargo.toml
[ -n "$version" ] || not_run "no version = \"...\" line in Cargo.toml"
# What `make image` and `make image-docker` build: the chart's default image.
BUILT_IMAGE=ghcr.io/weft-mesh/weft:$version
ARCHIVE=$PWD/target/image/weft-$version.oci.tar
LOAD_EXAMPLE="WEFT_E2E_LOAD='sudo ctr -n k8s.io images import {archive}'"

if [ -n "$KUBECONFIG_FILE" ] || [ -n "$CONTEXT" ]; then
  MODE=existing
  [ -z "$CLUSTER" ] ||
    not_run "WEFT_E2E_CLUSTER names the kind cluster the suite creates; with WEFT_E2E_KUBECONFIG or WEFT_E2E_CONTEXT it runs on that cluster: unset WEFT_E2E_CLUSTER"
  if [ -n "$KUBECONFIG_FILE" ] && { [ ! -f "$KUBECONFIG_FILE" ] || [ ! -r "$KUBECONFIG_FILE" ]; }; then
    not_run "WEFT_E2E_KUBECONFIG=$KUBECONFIG_FILE: no such readable file (give the path of the cluster's kubeconfig)"
  fi
  if [ -n "$IMAGE" ] && [ -n "$LOAD" ]; then
    not_run "set one of WEFT_E2E_IMAGE (an image already on the nodes) and WEFT_E2E_LOAD (a command that loads the archive \`make image\` writes), not both"
  elif [ -n "$LOAD" ]; then
    case "$LOAD" in
      *'{archive}'*) ;;
      *) not_run "WEFT_E2E_LOAD has no {archive}: write {archive} where the image archive's path goes, e.g. $LOAD_EXAMPLE" ;;
    esac
    IMAGE=$BUILT_IMAGE
  elif [ -n "$IMAGE" ]; then
    # REPOSITORY:TAG, as the chart takes it (image.repository, image.tag).
    # No digest, and a tag other than latest: the injected containers
    # carry no imagePullPolicy, and for :latest the kubelet would pull.
    ref_re='^([A-Za-z0-9.-]+(:[0-9]+)?/)?[a-z0-9]+([._/-]+[a-z0-9]+)*:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$'
    if ! [[ "$IMAGE" =~ $ref_re ]] || [ "${IMAGE##*:}" = latest ]; then
      not_run "WEFT_E2E_IMAGE=$IMAGE: give REPOSITORY:TAG with a tag other than latest and no digest, e.g. WEFT_E2E_IMAGE=$BUILT_IMAGE"
    fi
  else
    not_run "an existing cluster needs the image: WEFT_E2E_IMAGE=REPOSITORY:TAG already on every node, or WEFT_E2E_LOAD to load the archive \`make image\` writes, e.g. $LOAD_EXAMPLE"
  fi
else
  MODE=kind
  if [ -n "$IMAGE" ] || [ -n "$LOAD" ]; then
    not_run "WEFT_E2E_IMAGE and WEFT_E2E_LOAD are for an existing cluster (with WEFT_E2E_KUBECONFIG or WEFT_E2E_CONTEXT); the kind run builds and loads its own image"
  fi
  CLUSTER=${CLUSTER:-weft-e2e}
  [[ "$CLUSTER" =~ ^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$ ]] ||
    not_run "WEFT_E2E_CLUSTER=$CLUSTER: a kind cluster name is lower-case letters, digits, '.' and '-'"
  IMAGE=$BUILT_IMAGE
fi
IMAGE_REPOSITORY=${IMAGE%:*}
IMAGE_TAG=${IMAGE##*:}

# ---- tools --------------------------------------------------------------

need=(kubectl helm python3 timeout)
targets=()
case "$MODE" in
  kind)
    need+=(docker kind make)
    targets=(image-docker)
    ;;
  existing)
    if [ -n "$LOAD" ]; then
      need+=(make cargo)
      targets=(image)
      # The load command's own program (after any VAR=value words).
      read -r -a words <<<"$LOAD"
      for w in "${words[@]}"; do
        case "$w" in
          *=*) ;;
          *)
            need+=("$w")
            break
            ;;
        esac
      done
    fi
    ;;
esac
missing=()
for tool in "${need[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  not_run "missing ${missing[*]} (this run needs ${need[*]})"
fi
for target in "${targets[@]}"; do
  make -n "$target" >/dev/null 2>&1 || not_run "the Makefile has no target $target (needed to build the image)"
done

if [ "$MODE" = kind ]; then
  docker info >/dev/null 2>&1 || not_run "the Docker engine is not reachable (docker info failed); kind needs it"
  clusters=$(kind get clusters 2>/dev/null || true)
  if grep -Fxq -- "$CLUSTER" <<<"$clusters"; then
    not_run "a kind cluster named $CLUSTER exists already; the suite deletes its cluster afterwards, so it makes its own: delete that one (kind delete cluster --name $CLUSTER) or name another with WEFT_E2E_CLUSTER"
  fi
  K=(kubectl --context "kind-$CLUSTER")
  H=(helm --kube-context "kind-$CLUSTER")
else
  K=(kubectl)
  H=(helm)
  if [ -n "$KUBECONFIG_FILE" ]; then
    K+=(--kubeconfig "$KUBECONFIG_FILE")
    H+=(--kubeconfig "$KUBECONFIG_FILE")
  fi
  if [ -n "$CONTEXT" ]; then
    contexts=$("${K[@]}" config get-contexts -o name 2>/dev/null || true)
    grep -Fxq -- "$CONTEXT" <<<"$contexts" ||
      not_run "WEFT_E2E_CONTEXT=$CONTEXT: no such context in ${KUBECONFIG_FILE:-the default kubeconfig} (kubectl config get-contexts lists them)"
    K+=(--context "$CONTEXT")
    H+=(--kube-context "$CONTEXT")
  fi
  if ! err=$("${K[@]}" get --raw /version --request-timeout=20s 2>&1 >/dev/null); then
    not_run "cannot reach the cluster (${CONTEXT:-current context}${KUBECONFIG_FILE:+ of $KUBECONFIG_FILE}): $err"
  fi
fi

# ---- what the suite owns -------------------------------------------------

OWNER_LABEL=weft.dev/e2e
NAMESPACES=(weft-system shop payments legacy)
SHOP_NAMESPACES=(shop payments legacy)

# ns_states: one line per namespace, NAME=E2E_LABEL=INJECT_LABEL.
ns_states() {
  "${K[@]}" get namespaces -o jsonpath='{range .items[*]}{.metadata.name}{"="}{.metadata.labels.weft\.dev/e2e}{"="}{.metadata.labels.weft\.dev/inject}{"\n"}{end}'
}
# crd_states: one line per CRD, NAME=E2E_LABEL (weft's end in .weft.dev).
crd_states() {
  "${K[@]}" get customresourcedefinitions -o jsonpath='{range .items[*]}{.metadata.name}{"="}{.metadata.labels.weft\.dev/e2e}{"\n"}{end}'
}
ours() {
  local n
  for n in "${NAMESPACES[@]}"; do [ "$n" = "$1" ] && return 0; done
  return 1
}

# remove_ours: what a run of this suite made (labelled), release first.
remove_ours() {
  local states line name label rest ns=() crds=()
  states=$(ns_states) || return 1
  while IFS= read -r line; do
    name=${line%%=*}
    rest=${line#*=}
    label=${rest%%=*}
    if ours "$name" && [ "$label" = true ]; then ns+=("$name"); fi
  done <<<"$states"
  states=$(crd_states) || return 1
  while IFS= read -r line; do
    case "$line" in
      *.weft.dev=true) crds+=("${line%%=*}") ;;
    esac
  done <<<"$states"
  if [ "${#ns[@]}" -gt 0 ] && [[ " ${ns[*]} " == *" weft-system "* ]] &&
    "${H[@]}" status weft --namespace weft-system >/dev/null 2>&1; then
    "${H[@]}" uninstall weft --namespace weft-system --wait --timeout 3m >&2 || return 1
  fi
  if [ "${#ns[@]}" -gt 0 ]; then
    "${K[@]}" delete namespace "${ns[@]}" --wait=true --timeout=5m >&2 || return 1
  fi
  if [ "${#crds[@]}" -gt 0 ]; then
    "${K[@]}" delete customresourcedefinition "${crds[@]}" --wait=true --timeout=3m >&2 || return 1
  fi
}

preflight_existing() {
  local states line name rest label inject foreign=() injected=() leftovers=() foreign_crds=() obj present=()
  states=$(ns_states) || not_run "cannot list namespaces"
  while IFS= read -r line; do
    [ -n "$line" ] || continue
    name=${line%%=*}
    rest=${line#*=}
    label=${rest%%=*}
    inject=${rest#*=}
    if ours "$name"; then
      if [ "$label" = true ]; then leftovers+=("namespace/$name"); else foreign+=("$name"); fi
    elif [ "$inject" = enabled ]; then
      injected+=("$name")
    fi
  done <<<"$states"
  [ "${#foreign[@]}" -eq 0 ] ||
    not_run "namespace(s) ${foreign[*]} exist and were not made by this suite (no label $OWNER_LABEL=true); it needs them for itself and will not touch them: run it on another cluster, or delete them yourself"
  [ "${#injected[@]}" -eq 0 ] ||
    not_run "namespace(s) ${injected[*]} are labelled weft.dev/inject=enabled: the suite's injector would mesh their new pods; run it on another cluster, or remove that label"
  states=$(crd_states) || not_run "cannot list CustomResourceDefinitions"
  while IFS= read -r line; do
    case "$line" in
      *.weft.dev=true) leftovers+=("crd/${line%%=*}") ;;
      *.weft.dev=*) foreign_crds+=("${line%%=*}") ;;
    esac
  done <<<"$states"
  [ "${#foreign_crds[@]}" -eq 0 ] ||
    not_run "weft's CRDs are installed, not by this suite (${foreign_crds[*]}); it installs this tree's own and deletes them afterwards: run it on another cluster, or remove them (kubectl delete -f charts/weft/crds/ deletes every weft policy in the cluster)"
  if [ "${#leftovers[@]}" -gt 0 ]; then
    echo "e2e: removing what an earlier run left: ${leftovers[*]}" >&2
    remove_ours || not_run "could not remove what an earlier run left (${leftovers[*]})"
  fi
  for obj in mutatingwebhookconfiguration/weft-injector clusterrole/weft-control-plane clusterrolebinding/weft-control-plane; do
    if [ -n "$("${K[@]}" get "$obj" --ignore-not-found -o name)" ]; then present+=("$obj"); fi
  done
  [ "${#present[@]}" -eq 0 ] ||
    not_run "weft is installed on this cluster already (${present[*]}); the suite installs its own: run it on another cluster"
}

if [ "$MODE" = existing ]; then
  preflight_existing
fi

# ---- reporting -----------------------------------------------------------

WORK=$(mktemp -d "${TMPDIR:-/tmp}/weft-e2e.XXXXXX")
PASSED=0
FAILED=0
STARTED=
FINISHED=
DUMPED=
CLUSTER_CREATED=
declare -A OUTCOME=()

dump() {
  [ -z "$DUMPED" ] || return 0
  DUMPED=1
  {
    echo "---- state at the first failure ----"
    local ns
    for ns in "${NAMESPACES[@]}"; do
      "${K[@]}" -n "$ns" get pods -o wide
    done
    "${K[@]}" get mtlspolicies,trafficpolicies,serviceroutes,accesspolicies,externalservices -A
    "${K[@]}" -n weft-system logs -l app.kubernetes.io/name=weft-control-plane --tail=80 --prefix
    "${K[@]}" -n payments get events --sort-by=.lastTimestamp | tail -n 20
  } >&2 || true
}

# Each check runs as `CHECK=name; (set -e; check_function) & report`: a
# subshell under errexit (run in the background, so that errexit holds in
# it: it would not in a condition), reporting success with `ok TEXT` and
# failure with `bad TEXT` (which ends it). `report` waits for it and prints
# exactly one `e2e: ok:` or `e2e: FAIL:` line; `report required` stops the
# run after a failure (later checks cannot do without it).
CHECK=
CHECK_PID=
ok() { printf '%s' "$*" >"$WORK/$CHECK.ok"; }
bad() {
  printf '%s' "$*" >"$WORK/$CHECK.bad"
  exit 1
}
report() {
  local rc=0 msg
  CHECK_PID=$!
  wait "$CHECK_PID" || rc=$?
  CHECK_PID=
  if [ "$rc" -eq 0 ]; then
    msg=$(cat "$WORK/$CHECK.ok" 2>/dev/null || true)
    PASSED=$((PASSED + 1))
    OUTCOME[$CHECK]=ok
    echo "e2e: ok: ${msg:-$CHECK}"
  else
    msg=$(cat "$WORK/$CHECK.bad" 2>/dev/null || true)
    FAILED=$((FAILED + 1))
    OUTCOME[$CHECK]=fail
    echo "e2e: FAIL: ${msg:-$CHECK: a command failed (exit $rc)}"
    dump
    [ "${1:-}" != required ] || finish
  fi
}
# needs NAME...: inside a check, fails it unless those checks passed.
needs() {
  local n
  for n in "$@"; do
    [ "${OUTCOME[$n]:-}" = ok ] || bad "$CHECK: not checked, it needs '$n', which did not pass"
  done
}
# until PREDICATE; do before DEADLINE || bad ...; done: waits 2 s between
# tries while SECONDS is before DEADLINE.
before() {
  [ "$SECONDS" -lt "$1" ] || return 1
  sleep 2
}

finish() {
  FINISHED=1
  echo "$PASSED passed, $FAILED failed"
  if [ "$FAILED" -eq 0 ]; then cleanup 0; fi
  cleanup 1
}

# cleanup EXIT-STATUS: removes what the run made (unless WEFT_E2E_KEEP=1)
# and exits with that status; also the EXIT trap.
cleanup() {
  local rc=$1
  trap - EXIT
  set +e
  # A check still running (interrupted): a background job ignores SIGINT.
  if [ -n "$CHECK_PID" ]; then
    kill "$CHECK_PID" 2>/dev/null
    wait "$CHECK_PID" 2>/dev/null
  fi
  if [ -n "$STARTED" ] && [ -z "$FINISHED" ]; then
    FAILED=$((FAILED + 1))
    echo "e2e: FAIL: the run stopped early (exit $rc)"
    echo "$PASSED passed, $FAILED failed"
    [ "$rc" -ne 0 ] || rc=1
  fi
  if [ "$KEEP" = 1 ]; then
    if [ "$MODE" = kind ]; then
      echo "e2e: kept kind cluster $CLUSTER (WEFT_E2E_KEEP=1): kind delete cluster --name $CLUSTER removes it" >&2
    else
      echo "e2e: kept namespaces ${NAMESPACES[*]}, release weft and weft's CRDs (WEFT_E2E_KEEP=1): the next run removes them first" >&2
    fi
  elif [ "$MODE" = kind ]; then
    [ -z "$CLUSTER_CREATED" ] || kind delete cluster --name "$CLUSTER" >/dev/null 2>&1
  else
    echo "e2e: removing what the run made (namespaces ${NAMESPACES[*]}, release weft, CRDs)" >&2
    remove_ours || echo "e2e: could not remove everything; what is left is labelled $OWNER_LABEL=true and the next run removes it" >&2
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap 'cleanup "$?"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- helpers -------------------------------------------------------------

# fetch NAMESPACE DEPLOYMENT URL [weft-demo --fetch options]: from inside
# that workload's app container (so through its sidecar).
fetch() {
  local ns=$1 deploy=$2
  shift 2
  timeout 600 "${K[@]}" -n "$ns" exec "deploy/$deploy" -c app -- /weft-demo --fetch "$@"
}

# field JSON PYTHON-EXPRESSION: the expression with `d` bound to the JSON.
field() {
  python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2]))' "$1" "$2"
}

# payments_status_from_checkout: what checkout's call to payments answered.
payments_status_from_checkout() {
  local out
  out=$(fetch shop checkout http://checkout.shop/buy --header 'x-canary: false')
  field "${out#*$'\n'}" '[x["status"] for x in d["downstream"] if "payments" in x["url"]][0]'
}

cm_generation() {
  "${K[@]}" -n "$1" get configmap weft-proxy-config -o jsonpath='{.data.config\.json}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["generation"])'
}

# Pod CPU requests (JSON pod list on stdin): one line per container over
# the limit, and per pod whose request is over it, counted the way the
# scheduler does with native sidecars (an init container runs next to the
# sidecars started before it; the app containers next to all of them).
PY_CPU_REQUESTS='
import json, sys
limit = float(sys.argv[1])
def milli(q):
    q = str(q)
    return float(q[:-1]) if q.endswith("m") else float(q) * 1000
def req(c):
    cpu = ((c.get("resources") or {}).get("requests") or {}).get("cpu")
    return milli(cpu) if cpu is not None else 0.0
for pod in json.load(sys.stdin)["items"]:
    name = pod["metadata"]["namespace"] + "/" + pod["metadata"]["name"]
    spec = pod["spec"]
    inits = spec.get("initContainers") or []
    for c in inits + spec["containers"]:
        if req(c) > limit:
            print("%s: container %s requests %gm" % (name, c["name"], req(c)))
    sidecars = 0.0
    peak = 0.0
    for c in inits:
        peak = max(peak, sidecars + req(c))
        if c.get("restartPolicy") == "Always":
            sidecars += req(c)
    total = max(peak, sum(req(c) for c in spec["containers"]) + sidecars)
    if total > limit:
        print("%s: the pod requests %gm" % (name, total))
'

# Payments pods (JSON pod list on stdin): what is wrong with them, if
# anything (not Ready, restarted).
PY_READY_NO_RESTARTS='
import json, sys
pods = json.load(sys.stdin)["items"]
problems = [] if pods else ["no payments pods"]
for p in pods:
    n = p["metadata"]["name"]
    st = p.get("status") or {}
    ready = [c for c in st.get("conditions") or [] if c["type"] == "Ready"]
    if not ready or ready[0]["status"] != "True":
        problems.append(n + " is not Ready")
    for c in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
        if c.get("restartCount"):
            problems.append("%s/%s restarted %d times" % (n, c["name"], c["restartCount"]))
print("; ".join(problems))
'

# Policy propagation: port-forwards to a pod's admin port, reads the config
# generation its proxy runs, applies a merge patch, and times until the
# proxy runs another generation (polled every 20 ms; the clock starts before
# kubectl sends the patch, so the figure is an upper bound), which must be
# the namespace's ConfigMap's. Prints `OK SECONDS` or `FAIL WHY`.
# Args: NAMESPACE POD RESOURCE PATCH LIMIT-SECONDS KUBECTL...
PY_PROPAGATION='
import json, re, select, subprocess, sys, time, urllib.request
ns, pod, resource, patch, limit = sys.argv[1:6]
kubectl = sys.argv[6:]
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
def done(word, text):
    print(word + " " + text)
    sys.exit(0)
pf = subprocess.Popen(kubectl + ["-n", ns, "port-forward", "--address", "127.0.0.1", "pod/" + pod, ":15120"],
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
try:
    port, deadline = None, time.monotonic() + 30
    while port is None:
        left = deadline - time.monotonic()
        if left <= 0 or pf.poll() is not None:
            done("FAIL", "kubectl port-forward to " + pod + ":15120 did not start")
        if select.select([pf.stdout], [], [], left)[0]:
            m = re.search(r"Forwarding from 127\.0\.0\.1:(\d+) ->", pf.stdout.readline())
            if m:
                port = m.group(1)
    def generation():
        with opener.open("http://127.0.0.1:" + port + "/config", timeout=2) as r:
            return json.load(r)["generation"]
    before = None
    while before is None:
        try:
            before = generation()
        except Exception as e:
            if time.monotonic() > deadline:
                done("FAIL", "no config from " + pod + "'"'"'s admin port: " + str(e))
            time.sleep(0.2)
    start = time.monotonic()
    edit = subprocess.run(kubectl + ["-n", ns, "patch", resource, "--type", "merge", "-p", patch],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if edit.returncode != 0:
        done("FAIL", "kubectl patch " + resource + " failed: " + edit.stderr.strip())
    while True:
        try:
            now = generation()
        except Exception:
            now = before
        took = time.monotonic() - start
        if now != before:
            break
        if took > 20:
            done("FAIL", pod + "'"'"'s proxy still ran generation " + before + " 20 s after the edit")
        time.sleep(0.02)
    cm = subprocess.run(kubectl + ["-n", ns, "get", "configmap", "weft-proxy-config", "-o", "jsonpath={.data.config\\.json}"],
                        capture_output=True, text=True)
    try:
        held = json.loads(cm.stdout)["generation"]
    except Exception:
        held = "(unreadable: " + cm.stderr.strip() + ")"
    if held != now:
        done("FAIL", pod + "'"'"'s proxy runs generation " + now + ", the ConfigMap holds " + held)
    if took >= float(limit):
        done("FAIL", "it reached " + pod + "'"'"'s proxy after %.2f s (more than %s s)" % (took, limit))
    done("OK", "%.2f" % took)
finally:
    pf.terminate()
    try:
        pf.wait(5)
    except subprocess.TimeoutExpired:
        pf.kill()
'

# ---- setup ---------------------------------------------------------------

STARTED=1

build_image() {
  case "$MODE" in
    kind)
      make image-docker >"$WORK/build.log" 2>&1 || {
        tail -n 40 "$WORK/build.log" >&2
        bad "image: make image-docker failed (its log's end is above)"
      }
      docker image inspect "$IMAGE" >/dev/null 2>&1 || bad "image: make image-docker built no $IMAGE"
      ok "image: $IMAGE built with make image-docker"
      ;;
    existing)
      if [ -z "$LOAD" ]; then
        ok "image: $IMAGE, as the nodes hold it (WEFT_E2E_IMAGE)"
        return 0
      fi
      make image >"$WORK/build.log" 2>&1 || {
        tail -n 40 "$WORK/build.log" >&2
        bad "image: make image failed (its log's end is above)"
      }
      [ -f "$ARCHIVE" ] || bad "image: make image wrote no $ARCHIVE"
      local quoted command
      quoted=$(printf '%q' "$ARCHIVE")
      command=${LOAD//'{archive}'/$quoted}
      echo "e2e: loading the image: $command" >&2
      bash -c "$command" >&2 || bad "image: the load command failed: $command"
      ok "image: $IMAGE built with make image and loaded ($command)"
      ;;
  esac
}

create_kind_cluster() {
  kind create cluster --name "$CLUSTER" --config e2e/kind.yaml --wait 180s >&2 ||
    bad "kind: creating cluster $CLUSTER failed"
  kind load docker-image "$IMAGE" --name "$CLUSTER" >&2 || bad "kind: loading $IMAGE into $CLUSTER failed"
  ok "kind: cluster $CLUSTER created, $IMAGE loaded into its nodes"
}

create_namespace() {
  "${K[@]}" create -f - >/dev/null <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $1
  labels:
    $OWNER_LABEL: "true"
EOF
}

install_weft() {
  local ns args
  for ns in "${NAMESPACES[@]}"; do
    create_namespace "$ns" || bad "install: could not create namespace $ns"
  done
  args=(install weft charts/weft --namespace weft-system -f e2e/values.yaml
    --set-string "image.repository=$IMAGE_REPOSITORY" --set-string "image.tag=$IMAGE_TAG"
    --wait --timeout 5m)
  if [ "$MODE" = existing ]; then
    # The CRDs are created here, labelled, so that only those are removed
    # afterwards; Helm never deletes the CRDs it installs.
    "${K[@]}" create -f charts/weft/crds/ >/dev/null || bad "install: could not create weft's CRDs"
    "${K[@]}" label -f charts/weft/crds/ "$OWNER_LABEL=true" >/dev/null || bad "install: could not label weft's CRDs"
    "${K[@]}" wait --for=condition=Established -f charts/weft/crds/ --timeout=60s >/dev/null ||
      bad "install: weft's CRDs were not Established within 60 s"
    args+=(--skip-crds)
  fi
  "${H[@]}" "${args[@]}" >&2 || bad "install: helm install of charts/weft failed"
  local ready
  ready=$("${K[@]}" -n weft-system get deployment weft-control-plane -o jsonpath='{.status.readyReplicas}')
  ok "control plane ready: ${ready:-0} replicas of weft-control-plane, image $IMAGE"
}

run_shop() {
  local ns d
  "${K[@]}" apply -f examples/shop/ >/dev/null || bad "shop: kubectl apply -f examples/shop/ failed"
  # The example's 10 min observation window, shortened for the test.
  "${K[@]}" -n payments patch mtlspolicy payments --type merge \
    -p '{"spec":{"rollout":{"observationWindow":"30s"}}}' >/dev/null
  sed "s|@WEFT_IMAGE@|$IMAGE|g" e2e/workloads.yaml | "${K[@]}" apply -f - >/dev/null ||
    bad "shop: kubectl apply of e2e/workloads.yaml failed"
  for ns in "${SHOP_NAMESPACES[@]}"; do
    for d in $("${K[@]}" -n "$ns" get deployments -o name); do
      "${K[@]}" -n "$ns" rollout status "$d" --timeout 240s >/dev/null ||
        bad "shop: $ns/${d#*/} did not become ready within 240 s"
    done
  done
  ok "the shop is running (namespaces ${SHOP_NAMESPACES[*]})"
}

echo "e2e: $MODE cluster${CONTEXT:+ $CONTEXT}${CLUSTER:+ $CLUSTER}, image $IMAGE"
CHECK=image
(set -e; build_image) &
report required
if [ "$MODE" = kind ]; then
  CLUSTER_CREATED=1
  CHECK=kind
  (set -e; create_kind_cluster) &
  report required
fi
CHECK=install
(set -e; install_weft) &
report required
CHECK=shop
(set -e; run_shop) &
report required

# ---- checks --------------------------------------------------------------

check_cpu_requests() {
  local ns found over='' count=0
  for ns in "${NAMESPACES[@]}"; do
    found=$("${K[@]}" -n "$ns" get pods -o json | python3 -c "$PY_CPU_REQUESTS" 10)
    [ -z "$found" ] || over+="${found//$'\n'/; }; "
    count=$((count + $("${K[@]}" -n "$ns" get pods -o name | wc -l)))
  done
  [ -z "$over" ] || bad "cpu requests over 10m: $over"
  ok "requests: none of the $count pods in ${NAMESPACES[*]} (nor any of their containers) requests more than 10m CPU"
}

containers() {
  "${K[@]}" -n "$1" get pods -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.spec.initContainers[*].name}{" "}{.spec.containers[*].name}{"\n"}{end}'
}
check_injection() {
  local ns pod names list
  for ns in shop payments; do
    list=$(containers "$ns")
    while read -r pod names; do
      [ -n "$pod" ] || continue
      [[ " $names " == *" weft-proxy "* ]] || bad "injection: pod $ns/$pod has no weft-proxy ($names)"
    done <<<"$list"
    "${K[@]}" -n "$ns" get configmap weft-proxy-config >/dev/null || bad "injection: $ns has no weft-proxy-config"
    "${K[@]}" -n "$ns" get configmap weft-endpoints >/dev/null || bad "discovery: $ns has no weft-endpoints"
    "${K[@]}" -n "$ns" get secret weft-identity-default >/dev/null || bad "injection: $ns has no weft-identity-default (the default ServiceAccount's identity)"
    if "${K[@]}" -n "$ns" get secret weft-identity >/dev/null 2>&1; then
      bad "injection: $ns has a weft-identity Secret holding every account's keys"
    fi
  done
  list=$(containers legacy)
  [[ "$list" != *weft-proxy* ]] || bad "injection: a pod in the unlabelled namespace legacy was injected"
  ok "injection: every shop and payments pod has a sidecar, legacy's has none"
}

check_retries() {
  local summary n
  summary=$(fetch shop shopper http://inventory.shop/items --count 200)
  n=$(field "$summary" 'd["statuses"].get("200", 0)')
  [ "$n" -ge 194 ] || bad "retries: $n of 200 succeeded ($summary)"
  ok "retries: $n of 200 requests to a 20 %-failing inventory succeeded"
}

# check_access_log: shopper's pod asks for access logs (its annotation,
# read at injection): its sidecar's stdout holds a JSON line per request.
# Calls to a path of their own, so lines of earlier checks do not count;
# the lines are written asynchronously, so polled for a while.
check_access_log() {
  local path logs n=0 deadline
  path="/access-log-$RANDOM$RANDOM"
  fetch shop shopper "http://inventory.shop$path" --count 5 >/dev/null
  deadline=$((SECONDS + 30))
  while :; do
    logs=$("${K[@]}" -n shop logs deploy/shopper -c weft-proxy --tail 5000)
    n=$(printf '%s\n' "$logs" | python3 -c '
import json, sys
want, n = sys.argv[1], 0
for line in sys.stdin:
    if not line.startswith("{"):
        continue
    try:
        l = json.loads(line)
    except ValueError:
        continue
    if (l.get("direction") == "outbound" and (l.get("dst") or "").startswith("inventory.shop")
            and (l.get("src") or "").endswith("/ns/shop/sa/shopper") and l.get("mtls") is True
            and l.get("path") == want and l.get("status") is not None):
        n += 1
print(n)' "$path") || bad "access log: could not read shopper's weft-proxy log"
    [ "$n" -ge 5 ] && break
    before "$deadline" || bad "access log: $n of 5 JSON lines for shopper -> inventory $path over mTLS in shopper's weft-proxy log within 30 s (last lines: $(printf '%s' "$logs" | tail -n 3))"
  done
  ok "access log: shopper's sidecar wrote a JSON line for each of its 5 calls to inventory $path, over mTLS, from its identity"
}

check_canary() {
  local summary canary
  summary=$(fetch shop shopper http://checkout.shop/ --count 400)
  canary=$(field "$summary" 'd["services"].get("checkout-canary", 0)')
  if [ "$canary" -lt 20 ] || [ "$canary" -gt 60 ]; then
    bad "canary split: $canary of 400 reached checkout-canary, expected ~40 ($summary)"
  fi
  summary=$(fetch shop shopper http://checkout.shop/ --count 20 --header 'x-canary: true')
  [ "$(field "$summary" 'd["services"].get("checkout-canary", 0)')" -eq 20 ] ||
    bad "canary: x-canary: true did not always reach the canary ($summary)"
  ok "canary: $canary of 400 to checkout-canary, opt-in header always"
}

check_access() {
  local out status
  out=$(fetch shop shopper http://payments.payments/charge)
  status=${out%%$'\n'*}
  [ "$status" = 403 ] || bad "access: shopper -> payments answered $status, expected 403"
  status=$(payments_status_from_checkout)
  [ "$status" = 200 ] || bad "access: checkout -> payments answered $status, expected 200"
  ok "access: shopper gets 403 from payments, checkout gets 200"
}

inventory_faults() {
  local pod
  for pod in $("${K[@]}" -n shop get pods -l app=inventory -o name); do
    "${K[@]}" -n shop exec "$pod" -c app -- /weft-demo --method POST \
      --fetch "http://127.0.0.1:8080/__demo/faults?error_rate=$1" >/dev/null
  done
}
inventory_recovered() {
  local s
  s=$(fetch shop shopper http://inventory.shop/items --count 10)
  [ "$(field "$s" 'd["statuses"].get("200", 0)')" -eq 10 ]
}
check_circuit() {
  local summary opened deadline
  inventory_faults 1
  summary=$(fetch shop shopper http://inventory.shop/items --count 40)
  inventory_faults 0
  opened=$(field "$summary" 'd["proxy_errors"].get("circuit-open", 0)')
  [ "$opened" -ge 1 ] || bad "circuit breaking: no circuit-open answer ($summary)"
  deadline=$((SECONDS + 90))
  until inventory_recovered 2>/dev/null; do
    before "$deadline" || bad "circuit breaking: $opened of 40 failed fast, but it did not close within 90 s of recovery"
  done
  ok "circuit breaking: $opened of 40 failed fast with circuit-open, then closed after recovery"
}

# propagate POD TIMEOUT: sets TrafficPolicy shop/inventory's timeout and
# prints how long POD's proxy took to run the result (under 2 s), or what
# went wrong (and returns 1).
propagate() {
  local out
  out=$(python3 -c "$PY_PROPAGATION" shop "$1" trafficpolicy/inventory \
    "{\"spec\":{\"timeout\":\"$2\"}}" 2 "${K[@]}") || true
  case "$out" in
    'OK '*) echo "${out#OK }" ;;
    'FAIL '*)
      echo "timeout -> $2: ${out#FAIL }"
      return 1
      ;;
    *)
      echo "timeout -> $2: the measurement failed (${out:-no output})"
      return 1
      ;;
  esac
}
# The control plane's stats API through the API server's service proxy,
# the path `weft edges` takes (#20): after the retries and canary checks'
# traffic, the shopper -> inventory edge is there with its requests, and the
# canary route shows each backend's share.
STATS_PATH="/api/v1/namespaces/weft-system/services/weft-control-plane-metrics:admin/proxy/api/v1/stats?window=10m"
check_stats() {
  local json="" n=0 shares deadline
  deadline=$((SECONDS + 90))
  while :; do
    json=$("${K[@]}" get --raw "$STATS_PATH" 2>/dev/null || true)
    if [ -n "$json" ]; then
      n=$(field "$json" 'int(sum(e["requests"] for e in d["edges"] if e["src"] == "shopper" and e["dst"].startswith("inventory.shop")))' || echo 0)
      [ "$n" -gt 0 ] && break
    fi
    before "$deadline" || bad "stats API: no shopper -> inventory requests through the service proxy within 90 s (last answer: ${json:0:300})"
  done
  shares=$(field "$json" 'sorted(round(e["splitShare"] or 0, 2) for e in d["edges"] if e["src"] == "shopper" and e["dst"].startswith("checkout"))')
  [ "$(field "$json" 'd["version"]')" = v1 ] || bad "stats API: not version v1 (${json:0:300})"
  ok "stats API: shopper -> inventory $n requests in the window, checkout split shares $shares, read through the service proxy"
}

# The web dashboard (#20 item 3) through the API server's service proxy, as
# `weft dashboard` reads it: the page (relative URLs resolve under the
# proxy path), the stats with the graph's arrows, and the payments rollout.
DASH_PATH="/api/v1/namespaces/weft-system/services/weft-control-plane-metrics:admin/proxy"
check_dashboard() {
  local page rollouts arrows phase
  page=$("${K[@]}" get --raw "$DASH_PATH/")
  case "$page" in
    *'src="dashboard.js"'*) ;;
    *) bad "dashboard: the page through the service proxy is not the dashboard (${page:0:200})" ;;
  esac
  "${K[@]}" get --raw "$DASH_PATH/dashboard.js" | grep -q 'api/v1/stats?window=' \
    || bad "dashboard: dashboard.js is not served through the service proxy"
  arrows=$(field "$("${K[@]}" get --raw "$DASH_PATH/api/v1/stats?window=10m")" \
    'len([a for a in d.get("destinations", []) if a["src"] == "shopper"])')
  [ "$arrows" -gt 0 ] || bad "dashboard: no arrow from shopper in the stats' destinations"
  rollouts=$("${K[@]}" get --raw "$DASH_PATH/api/v1/rollouts")
  phase=$(field "$rollouts" '[r["phase"] for r in d["rollouts"] if r["namespace"] == "payments"][0]') \
    || bad "dashboard: no payments rollout in the rollouts API (${rollouts:0:300})"
  case "$phase" in
    "" | None) bad "dashboard: the payments rollout has no phase (${rollouts:0:300})" ;;
  esac
  ok "dashboard: page, script, $arrows arrows from shopper and the payments rollout ($phase) through the service proxy"
}

check_propagation() {
  local pod original there back
  pod=$("${K[@]}" -n shop get pods -l app=shopper -o jsonpath='{.items[0].metadata.name}')
  original=$("${K[@]}" -n shop get trafficpolicy inventory -o jsonpath='{.spec.timeout}')
  [ -n "$original" ] || bad "policy edit: TrafficPolicy shop/inventory has no timeout to edit"
  if ! there=$(propagate "$pod" 4s); then
    # Put it back for the checks that follow.
    "${K[@]}" -n shop patch trafficpolicy inventory --type merge \
      -p "{\"spec\":{\"timeout\":\"$original\"}}" >/dev/null || true
    bad "policy edit: $there"
  fi
  back=$(propagate "$pod" "$original") || bad "policy edit: $back"
  ok "policy edit: TrafficPolicy inventory's timeout 4s reached $pod's proxy in $there s, back to $original in $back s (under 2 s: through the API watch)"
}

cm_back() {
  local uid
  uid=$("${K[@]}" -n shop get configmap weft-proxy-config -o jsonpath='{.metadata.uid}')
  [ -n "$uid" ] && [ "$uid" != "$1" ]
}
check_config_recreated() {
  local before uid start after s deadline
  before=$(cm_generation shop)
  uid=$("${K[@]}" -n shop get configmap weft-proxy-config -o jsonpath='{.metadata.uid}')
  "${K[@]}" -n shop delete configmap weft-proxy-config --wait=true >/dev/null
  start=$SECONDS
  deadline=$((SECONDS + 60))
  until cm_back "$uid" 2>/dev/null; do
    before "$deadline" || bad "config: shop's weft-proxy-config, deleted, was not recreated within 60 s"
  done
  after=$(cm_generation shop)
  [ "$after" = "$before" ] || bad "config: the recreated weft-proxy-config holds generation $after, not $before"
  s=$(fetch shop shopper http://catalog.shop/ --count 10)
  [ "$(field "$s" 'd["statuses"].get("200", 0)')" -eq 10 ] || bad "config: traffic suffered after the ConfigMap was deleted ($s)"
  ok "config: shop's weft-proxy-config, deleted, was back within $((SECONDS - start + 2)) s with the same generation; 10 of 10 requests to catalog succeeded"
}

phase() { "${K[@]}" -n payments get mtlspolicy payments -o jsonpath='{.status.phase}'; }
is_strict() { [ "$(phase)" = Strict ]; }
check_strict_rollout() {
  local deadline=$((SECONDS + 360))
  until is_strict 2>/dev/null; do
    before "$deadline" || bad "mTLS rollout: payments did not reach Strict within 360 s (phase $(phase))"
  done
  ok "mTLS rollout: payments reached Strict (since $("${K[@]}" -n payments get mtlspolicy payments -o jsonpath='{.status.phaseSince}'))"
}

check_probes_under_strict() {
  needs strict
  local pod out mode problems end
  for pod in $("${K[@]}" -n payments get pods -l app=payments -o name); do
    out=$("${K[@]}" -n payments exec "$pod" -c app -- /weft-demo --fetch http://127.0.0.1:15120/config)
    mode=$(field "${out#*$'\n'}" 'd["inbound"]["mode"]')
    [ "$mode" = strict ] || bad "probes: ${pod#*/}'s proxy runs inbound mode $mode, not strict"
  done
  # The app's readiness probe (every 10 s, 3 failures) and the proxy's
  # liveness probe (every 10 s) would show within 40 s.
  end=$((SECONDS + 40))
  while :; do
    problems=$("${K[@]}" -n payments get pods -l app=payments -o json | python3 -c "$PY_READY_NO_RESTARTS")
    [ -z "$problems" ] || bad "probes under STRICT: $problems"
    [ "$SECONDS" -lt "$end" ] || break
    sleep 5
  done
  ok "probes: under STRICT the payments pods stayed Ready, with no restart, for 40 s (4 probe periods)"
}

check_strict_refuses() {
  needs strict
  local out err status
  err=$(mktemp)
  # A refusal is weft-demo's own "error: GET <url>: ..." (the connection was
  # closed or reset), not any failure of kubectl exec: an exec that did not
  # run would otherwise pass for a refusal.
  if out=$(fetch legacy stranger http://payments.payments/charge 2>"$err"); then
    status=${out%%$'\n'*}
    rm -f "$err"
    [ "$status" != 200 ] || bad "STRICT: a pod outside the mesh reached payments"
  elif ! grep -q '^error: GET http://payments.payments/charge: ' "$err"; then
    local why
    why=$(head -c 300 "$err")
    rm -f "$err"
    bad "STRICT: the call from legacy/stranger did not run (kubectl exec failed?): $why"
  fi
  rm -f "$err"
  status=$(payments_status_from_checkout)
  [ "$status" = 200 ] || bad "STRICT: checkout -> payments answered $status"
  ok "STRICT: plaintext from outside the mesh is refused, checkout still reaches payments"
}

job_done() {
  local conditions
  conditions=$("${K[@]}" -n shop get job fetch-once -o jsonpath='{.status.conditions[?(@.status=="True")].type}')
  [[ " $conditions " == *" Complete "* ]] || [[ " $conditions " == *" Failed "* ]]
}
check_job_completes() {
  local restart conditions over deadline
  "${K[@]}" -n shop patch job fetch-once --type merge -p '{"spec":{"suspend":false}}' >/dev/null
  deadline=$((SECONDS + 180))
  until job_done 2>/dev/null; do
    before "$deadline" || bad "job: fetch-once neither completed nor failed within 180 s (its weft-proxy sidecar kept it running?)"
  done
  conditions=$("${K[@]}" -n shop get job fetch-once -o jsonpath='{.status.conditions[?(@.status=="True")].type}')
  [[ " $conditions " == *" Complete "* ]] || bad "job: fetch-once failed ($conditions)"
  restart=$("${K[@]}" -n shop get pods -l job-name=fetch-once \
    -o jsonpath='{.items[0].spec.initContainers[?(@.name=="weft-proxy")].restartPolicy}')
  [ "$restart" = Always ] || bad "job: fetch-once's pod has no native weft-proxy sidecar (restartPolicy '$restart')"
  over=$("${K[@]}" -n shop get pods -l job-name=fetch-once -o json | python3 -c "$PY_CPU_REQUESTS" 10)
  [ -z "$over" ] || bad "job: cpu requests over 10m: $over"
  ok "job: fetch-once's pod, weft-proxy a native sidecar, completed"
}

no_control_plane() {
  [ -z "$("${K[@]}" -n weft-system get pods -l app.kubernetes.io/name=weft-control-plane -o name)" ]
}
check_control_plane_down() {
  local s canary status deadline
  "${K[@]}" -n weft-system scale deployment weft-control-plane --replicas=0 >/dev/null
  deadline=$((SECONDS + 120))
  until no_control_plane 2>/dev/null; do
    before "$deadline" || bad "control plane down: its pods were still there after 120 s"
  done
  s=$(fetch shop shopper http://catalog.shop/ --count 20)
  [ "$(field "$s" 'd["statuses"].get("200", 0)')" -eq 20 ] ||
    bad "control plane down: shopper -> catalog failed ($s)"
  s=$(fetch shop shopper http://checkout.shop/ --count 10 --header 'x-canary: true')
  canary=$(field "$s" 'd["services"].get("checkout-canary", 0)')
  [ "$canary" -eq 10 ] || bad "control plane down: x-canary: true reached the canary $canary times of 10 ($s)"
  status=$(payments_status_from_checkout)
  [ "$status" = 200 ] || bad "control plane down: checkout -> payments answered $status"
  ok "control plane at 0 replicas: the proxies kept serving on their last config (20 of 20 to catalog, the canary route, checkout -> payments 200)"
}
check_control_plane_back() {
  "${K[@]}" -n weft-system scale deployment weft-control-plane --replicas="$CP_REPLICAS" >/dev/null
  "${K[@]}" -n weft-system rollout status deployment weft-control-plane --timeout 180s >/dev/null ||
    bad "control plane: not back to $CP_REPLICAS ready replicas within 180 s"
  ok "control plane: back to $CP_REPLICAS ready replicas"
}

CHECK=requests
(set -e; check_cpu_requests) &
report
CHECK=injection
(set -e; check_injection) &
report
CHECK=retries
(set -e; check_retries) &
report
CHECK=canary
(set -e; check_canary) &
report
CHECK=access-log
(set -e; check_access_log) &
report
CHECK=access
(set -e; check_access) &
report
CHECK=circuit
(set -e; check_circuit) &
report
CHECK=stats
(set -e; check_stats) &
report
CHECK=dashboard
(set -e; check_dashboard) &
report
CHECK=propagation
(set -e; check_propagation) &
report
CHECK=config
(set -e; check_config_recreated) &
report
CHECK=strict
(set -e; check_strict_rollout) &
report
CHECK=probes
(set -e; check_probes_under_strict) &
report
CHECK=strict-refuses
(set -e; check_strict_refuses) &
report
CHECK=job
(set -e; check_job_completes) &
report
CP_REPLICAS=$("${K[@]}" -n weft-system get deployment weft-control-plane -o jsonpath='{.spec.replicas}' || true)
CP_REPLICAS=${CP_REPLICAS:-2}
CHECK=control-plane-down
(set -e; check_control_plane_down) &
report
CHECK=control-plane-back
(set -e; check_control_plane_back) &
report

finish
