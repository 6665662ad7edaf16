//! Load balancing: power of two choices by peak-EWMA latency among the
//! endpoints whose own circuit breaker admits a request. When every
//! endpoint's breaker is open the destination fails fast with 503.
//!
//! Each try's outcome goes to its endpoint's breaker and latency estimate.
//! A failure (no connection, a reset, a 5xx, a timeout) counts against the
//! endpoint and makes it look expensive, never fast. The try's deadline
//! (the [`Deadline`] the timeout and retry layers set) is enforced here,
//! where the endpoint is known, so a try that never got an answer counts
//! as failed rather than vanishing with the dropped future; a try dropped
//! before its deadline (the client went away) counts as nothing.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::future::BoxFuture;
use tower::Service;

use super::body::{BoxError, Request, Response};
use super::breaker::{PeerLimited, is_failure, refused_by_peer_limit, report};
use super::deadline::CallersDeadline;
use super::errors::ProxyError;
use super::pool::Pool;
use super::retry::is_deadline_answer;
use super::route::RouteCtx;
use super::timeout::{Deadline, caller_gave_up};
use crate::proxy::accesslog::RecordRef;
use crate::proxy::destination::{Destination, EndpointState, Endpoints};
use crate::proxy::resilience::{BreakerPermit, PendingRequest, draw_two, p2c_cost, p2c_pick};

#[derive(Clone)]
pub struct Balance {
    dst: Arc<Destination>,
    pool: Pool,
}

impl Balance {
    pub fn new(dst: Arc<Destination>, pool: Pool) -> Self {
        Self { dst, pool }
    }
}

impl Service<Request> for Balance {
    type Response = Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    /// The pick is made here, before any future: the future a request
    /// in flight holds is only the try's (its outcome to settle, its
    /// deadline), not the request or the picking. Only a DNS name whose
    /// answer is stale waits for its lookup first.
    fn call(&mut self, req: Request) -> Self::Future {
        let (dst, pool) = (self.dst.clone(), self.pool.clone());
        match dst.endpoints_now() {
            Some(endpoints) => send(dst, pool, &endpoints, req),
            None => Box::pin(async move {
                let endpoints = dst.endpoints().await;
                send(dst, pool, &endpoints, req).await
            }),
        }
    }
}

/// Sends `req` to the endpoint picked among `endpoints`; its outcome goes
/// to that endpoint's breaker and latency estimate.
fn send(
    dst: Arc<Destination>,
    pool: Pool,
    endpoints: &Endpoints,
    mut req: Request,
) -> BoxFuture<'static, Result<Response, BoxError>> {
    if endpoints.is_empty() {
        return Box::pin(std::future::ready(Err(ProxyError::NoEndpoints(
            dst.label.clone(),
        )
        .into())));
    }
    let now = Instant::now();
    let pinned = req.extensions().get::<Pinned>().map(|p| p.0);
    let tried = req.extensions().get::<TriedEndpoints>().cloned();
    let first_try = tried
        .as_ref()
        .is_none_or(|t| t.0.lock().unwrap_or_else(|e| e.into_inner()).is_empty());
    let quick = match pinned {
        None if first_try => quick_pick(&dst, endpoints, now),
        _ => None,
    };
    let (chosen, permit) = match quick {
        Some(picked) => picked,
        None => match scan_pick(&dst, endpoints, pinned, tried.as_ref(), now) {
            Ok(picked) => picked,
            Err(e) => return Box::pin(std::future::ready(Err(e))),
        },
    };
    let excluded = req
        .extensions()
        .get::<RouteCtx>()
        .is_some_and(|r| r.excluded);
    if let Some(tried) = &tried {
        tried
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(chosen.addr);
    }
    let meshed = chosen.endpoint.mesh.is_some();
    req.extensions_mut().insert(chosen.endpoint.clone());
    let deadline = req.extensions().get::<Deadline>().map(|d| d.0);
    // The try's deadline is its caller's (not this hop's own timeout): a
    // try cut off there, or a meshed peer's answer that it was, says
    // nothing about the endpoint. (Else anyone able to send a short
    // `grpc-timeout` could open the breakers of a healthy Service.)
    let callers = match (deadline, req.extensions().get::<CallersDeadline>()) {
        (Some(at), Some(c)) => c.0 <= at,
        _ => false,
    };
    let record = RecordRef::of(&req).cloned();
    if let Some(record) = &record {
        record.attempt(chosen.addr);
    }
    // Counted pending from the pick, so that the picks of one burst see
    // each other; timed from the first poll (below).
    let mut outcome = Outcome {
        pending: Some(chosen.load.start(Instant::now())),
        permit,
        excluded,
        deadline,
        callers,
    };
    let call = super::call(pool, req);
    Box::pin(async move {
        // An HTTP/2 connection's requests are all called before any of
        // their tasks runs: the try's clock starts when it does, so the
        // endpoint's latency is not charged with this proxy's own queue.
        let sent = Instant::now();
        if let Some(pending) = &mut outcome.pending {
            pending.restart(sent);
        }
        // Its time ran out in that queue: nothing was sent (the pool's
        // future has not run), so the try is given up without counting
        // against the endpoint.
        let timed_out = || -> BoxError {
            if callers {
                caller_gave_up(&dst.label).into()
            } else {
                ProxyError::Timeout(dst.label.clone()).into()
            }
        };
        if deadline.is_some_and(|at| tokio::time::Instant::now() >= at) {
            outcome.cancel();
            drop(call);
            return Err(timed_out());
        }
        let result = match deadline {
            None => call.await,
            Some(at) => match tokio::time::timeout_at(at, call).await {
                Ok(result) => result,
                // What the layer whose deadline it is would answer; the
                // caller's deadline is no verdict on the endpoint.
                Err(_) if callers => {
                    outcome.cancel();
                    return Err(timed_out());
                }
                Err(_) => Err(timed_out()),
            },
        };
        let mut result = result;
        if callers
            && meshed
            && let Ok(rsp) = &result
            && is_deadline_answer(rsp)
        {
            outcome.cancel();
            return result;
        }
        let saturated = result
            .as_ref()
            .is_ok_and(|rsp| refused_by_peer_limit(rsp, meshed));
        if saturated && let Ok(rsp) = &mut result {
            rsp.extensions_mut().insert(PeerLimited);
        }
        outcome.settle(is_failure(&result, &dst.label), saturated);
        if let (Some(record), Ok(_)) = (&record, &result) {
            record.answered(sent.elapsed());
        }
        result
    })
}

/// An endpoint chosen, with its breaker's permit when it has a breaker.
type Picked = (Arc<EndpointState>, Option<BreakerPermit>);

/// How many pairs [`quick_pick`] draws before leaving the choice to the
/// full scan.
const QUICK_DRAWS: usize = 3;

/// A first try's endpoint in constant time: power of two choices over
/// two endpoints drawn at random from those that serve (in the zone while
/// it keeps its calls, see [`Destination::serving_pool`]), each checked
/// for draining and for its breaker's admission. None when the draws find
/// nothing or the pool cannot be told without [`scan_pick`], which then
/// decides as before; so this changes the cost of a pick, never its
/// outcome's rules.
fn quick_pick(dst: &Destination, endpoints: &Endpoints, now: Instant) -> Option<Picked> {
    let index = endpoints.sample_index(dst.zone());
    let pool = dst.serving_pool(endpoints, &index, now)?;
    let admitted = |i: u32| {
        let e = &endpoints[i as usize];
        (!e.is_draining() && e.breaker.as_ref().is_none_or(|b| b.admits(now))).then_some(e)
    };
    let round_robin = dst.policy.load_balancer == crate::config::LoadBalancerAlgorithm::RoundRobin;
    let mut rng = fastrand::Rng::new();
    for _ in 0..QUICK_DRAWS {
        let chosen = if round_robin {
            admitted(pool[dst.take_turn() % pool.len()])
        } else {
            let (a, b) = match pool.len() {
                1 => (0, 0),
                n => draw_two(n, &mut rng),
            };
            let cost = |e: &EndpointState| p2c_cost(e.load.cost(now));
            match (admitted(pool[a]), admitted(pool[b])) {
                (Some(x), Some(y)) => Some(if cost(y) < cost(x) { y } else { x }),
                (x, y) => x.or(y),
            }
        };
        let Some(endpoint) = chosen else { continue };
        match &endpoint.breaker {
            None => return Some((endpoint.clone(), None)),
            Some(b) => {
                if let Some(p) = b.try_acquire(now) {
                    return Some((endpoint.clone(), Some(p)));
                }
            }
        }
    }
    None
}

/// The full scan: every endpoint's admission and cost, the draining ones
/// set aside, the zone decided (spilling in proportion), a retry kept off
/// the pods already tried, a pinned pod honoured; then P2C (or the turn
/// of `RoundRobin`) over what is left, trying the next when a half-open
/// breaker refuses a second probe.
fn scan_pick(
    dst: &Destination,
    endpoints: &Endpoints,
    pinned: Option<std::net::SocketAddr>,
    tried: Option<&TriedEndpoints>,
    now: Instant,
) -> Result<Picked, BoxError> {
    let admitted: Vec<(usize, f64)> = endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| e.breaker.as_ref().is_none_or(|b| b.admits(now)))
        .map(|(i, e)| (i, e.load.cost(now)))
        .collect();
    // Terminating (or unready) pods finish what they have and take
    // nothing new while another pod can.
    // (No second list unless some pod is draining: nothing more
    // per request otherwise.)
    let draining = |(i, _): &(usize, f64)| endpoints[*i].is_draining();
    // The pod left the Service between the lookup and now: it is
    // gone, not failing (its breaker hears nothing of it).
    if let Some(addr) = pinned
        && !endpoints.iter().any(|e| e.addr == addr)
    {
        return Err(ProxyError::NoEndpoints(dst.label.clone()).into());
    }
    let admitted = if let Some(addr) = pinned {
        // The caller chose the pod: that one or none (its breaker
        // still decides), draining or not, whatever the zone.
        admitted
            .into_iter()
            .filter(|(i, _)| endpoints[*i].addr == addr)
            .collect()
    } else if admitted.iter().any(draining) && !admitted.iter().all(draining) {
        admitted.into_iter().filter(|c| !draining(c)).collect()
    } else {
        admitted
    };
    let mut rng = fastrand::Rng::new();
    // The zone's candidates, and the wider list a retry may fall
    // back to.
    let zoned = match pinned {
        Some(_) => None,
        None => dst.in_zone(endpoints, &admitted, &mut rng),
    };
    let (mut candidates, mut wider) = match zoned {
        Some(zoned) => (zoned, Some(admitted)),
        None => (admitted, None),
    };
    // The zone's candidates as chosen (empty without a zone).
    let mut zoned: Vec<(usize, f64)> = if wider.is_some() {
        candidates.clone()
    } else {
        Vec::new()
    };
    if let Some(tried) = tried {
        let seen = tried.0.lock().unwrap_or_else(|e| e.into_inner());
        let untried = |list: &[(usize, f64)]| -> Vec<(usize, f64)> {
            list.iter()
                .copied()
                .filter(|(i, _)| !seen.contains(&endpoints[*i].addr))
                .collect()
        };
        // A retry goes to a pod this request has not met: in the
        // zone chosen, else in any zone, else (every pod tried) the
        // zone's again.
        let fresh = untried(&candidates);
        let fresh = match &wider {
            Some(all) if fresh.is_empty() => untried(all),
            _ => fresh,
        };
        if !fresh.is_empty() {
            candidates = fresh;
        }
    }
    // Try the two best candidates' breakers in P2C order; a
    // half-open breaker may refuse a second concurrent probe.
    let round_robin = dst.policy.load_balancer == crate::config::LoadBalancerAlgorithm::RoundRobin;
    let picked = loop {
        let picked = if round_robin {
            dst.next_in_turn(&candidates)
        } else {
            p2c_pick(&candidates, &mut rng)
        };
        let Some(i) = picked else {
            // Every pod of the zone refused (half-open, a probe
            // already out): the other zones' pods, before failing.
            if let Some(all) = wider.take() {
                candidates = all
                    .into_iter()
                    .filter(|(j, _)| !zoned.iter().any(|(z, _)| z == j))
                    .collect();
                zoned.clear();
                continue;
            }
            return Err(ProxyError::CircuitOpen(dst.label.clone()).into());
        };
        let endpoint = endpoints[i].clone();
        match &endpoint.breaker {
            None => break (endpoint, None),
            Some(b) => match b.try_acquire(now) {
                Some(p) => break (endpoint, Some(p)),
                None => candidates.retain(|(j, _)| *j != i),
            },
        }
    };
    Ok(picked)
}

/// What one try tells its endpoint's breaker and latency estimate, told
/// once: when the try ends, or when it is dropped past its deadline.
struct Outcome {
    pending: Option<PendingRequest>,
    permit: Option<BreakerPermit>,
    /// A health-check path: the breaker and the latency estimate ignore it.
    excluded: bool,
    deadline: Option<tokio::time::Instant>,
    /// The deadline is the caller's: reaching it is no verdict.
    callers: bool,
}

impl Outcome {
    /// Given up before it was sent: neither the latency estimate nor the
    /// breaker hears of it (a half-open probe slot is freed).
    fn cancel(&mut self) {
        self.pending = None;
        self.permit = None;
    }

    /// `failed` counts against the endpoint everywhere; `saturated` (its
    /// proxy refused the request for its inbound rate limit) only in the
    /// latency estimate, as a failure's penalty: the breaker hears nothing
    /// (the application was not asked; a half-open probe so answered
    /// proves nothing either way).
    fn settle(&mut self, failed: bool, saturated: bool) {
        if let Some(pending) = self.pending.take() {
            let now = Instant::now();
            // A health check says nothing about serving traffic (and a
            // failing one would otherwise look fast or be a penalty):
            // outlier accounting ignores it, as the breaker does.
            if self.excluded {
                drop(pending);
            } else if failed || saturated {
                pending.fail(now);
            } else {
                pending.complete(now);
            }
        }
        if let Some(permit) = self.permit.take() {
            report(permit, self.excluded || saturated, failed);
        }
    }
}

impl Drop for Outcome {
    /// Dropped unsettled: the client went away, or the timer of the layer
    /// that set the deadline fired before ours. Tokio's `Timeout` polls its
    /// inner future first, so ours normally answers, but on a multi-thread
    /// runtime the two timers (in different driver shards or wake batches)
    /// can fire apart. Past the deadline it is a timeout either way; before
    /// it, a cancel, which says nothing about the endpoint (dropping the
    /// permit frees a half-open probe slot).
    fn drop(&mut self) {
        if !self.callers
            && self
                .deadline
                .is_some_and(|at| tokio::time::Instant::now() >= at)
        {
            self.settle(true, false);
        }
    }
}

/// A request for one endpoint of the destination, by its address: a
/// caller that dialled a pod directly.
#[derive(Clone, Copy, Debug)]
pub struct Pinned(pub std::net::SocketAddr);

/// The endpoints earlier attempts of a request went to (the retry layer
/// puts one in every attempt's extensions): a retry goes elsewhere when
/// another endpoint is admitted, so a fast-failing endpoint, cheap in the
/// latency estimate, does not take every attempt.
#[derive(Clone, Debug, Default)]
pub struct TriedEndpoints(pub Arc<std::sync::Mutex<Vec<std::net::SocketAddr>>>);

#[cfg(test)]
pub(crate) mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use serde_json::json;
    use tokio::time::Instant as TokioInstant;

    use super::*;
    use crate::proxy::destination::{EndpointSource, EndpointState};
    use crate::proxy::http::body;
    use crate::proxy::http::errors::classify;
    use crate::proxy::resilience::{BreakerState, FAILURE_PENALTY};

    const MS: Duration = Duration::from_millis(1);
    const LABEL: &str = "inventory.shop:80";
    /// The latency a never-measured endpoint is assumed to have.
    const DEFAULT_RTT: f64 = 0.030;

    /// A destination with one endpoint at `addr`, a breaker that opens
    /// after `consecutive` failures and stays open, and the given extra
    /// policy fields (e.g. `timeoutMs`, or `retry` overrides).
    pub(crate) fn destination(
        addr: SocketAddr,
        consecutive: u32,
        extra: serde_json::Value,
    ) -> Arc<Destination> {
        let mut policy = json!({
            "retry": {
                "maxRetries": 0, "retryOn": ["connect-failure"], "methods": ["GET"],
                "idempotencyHeader": "idempotency-key",
                "budget": { "percent": 20, "minPerSecond": 10, "windowMs": 10000 },
                "backoffBaseMs": 1, "backoffMaxMs": 2
            },
            "circuitBreaker": {
                "consecutiveFailures": consecutive, "openMs": 60000, "maxOpenMs": 60000
            },
            "loadBalancer": "PeakEwma"
        });
        for (k, v) in extra.as_object().expect("object") {
            match (k.as_str(), v.as_object()) {
                ("retry", Some(retry)) => {
                    for (rk, rv) in retry {
                        policy["retry"][rk] = rv.clone();
                    }
                }
                _ => policy[k] = v.clone(),
            }
        }
        let policy = serde_json::from_value(policy).expect("policy");
        Arc::new(Destination::new(
            LABEL.into(),
            policy,
            EndpointSource::Static(vec![addr]),
            None,
        ))
    }

    /// A GET carrying `deadline`, if any.
    pub(crate) fn request(deadline: Option<TokioInstant>) -> Request {
        let mut req = http::Request::get("http://inventory.shop/stock")
            .body(body::empty())
            .expect("request");
        if let Some(at) = deadline {
            req.extensions_mut().insert(Deadline(at));
        }
        req
    }

    /// A listener on a free loopback port, and its address.
    async fn listen() -> (tokio::net::TcpListener, SocketAddr) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        (listener, addr)
    }

    /// A server that accepts connections and never answers.
    async fn black_hole() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let (listener, addr) = listen().await;
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        (addr, task)
    }

    /// A server that answers every HTTP/1.1 request at once with 200.
    async fn answering() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (listener, addr) = listen().await;
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 1024];
                    while let Ok(n @ 1..) = stream.read(&mut buf).await {
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
                            if stream.write_all(ok).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, task)
    }

    /// An address whose listener is already closed: connections are refused.
    fn refusing_addr() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
    }

    async fn only_endpoint(dst: &Destination) -> Arc<EndpointState> {
        dst.endpoints().await[0].clone()
    }

    fn state(ep: &EndpointState) -> BreakerState {
        ep.breaker.as_ref().expect("breaker").state(Instant::now())
    }

    /// Nothing was held against the endpoint: its breaker is closed and
    /// its latency estimate is still the default.
    fn assert_untouched(ep: &EndpointState) {
        assert_eq!(state(ep), BreakerState::Closed);
        let cost = ep.load.cost(Instant::now());
        assert!(
            (cost - DEFAULT_RTT).abs() < 1e-9,
            "estimate untouched: {cost}"
        );
    }

    fn is_timeout(err: &BoxError) -> bool {
        classify(err, LABEL) == ProxyError::Timeout(LABEL.into())
    }

    /// Polls `fut` for a while: long enough to choose the endpoint and
    /// start connecting, and it never completes (the server is silent).
    async fn start(fut: &mut BoxFuture<'static, Result<Response, BoxError>>) {
        tokio::select! {
            biased;
            _ = fut => panic!("a silent endpoint answered"),
            _ = tokio::time::sleep(50 * MS) => {}
        }
    }

    #[tokio::test]
    async fn a_try_past_its_deadline_is_a_timeout_that_counts_against_the_endpoint() {
        let (addr, _hole) = black_hole().await;
        let dst = destination(addr, 1, json!({}));
        let mut balance = Balance::new(dst.clone(), Pool::default());
        let at = TokioInstant::now() + 200 * MS;
        // Not forever if the balancer ignored the deadline.
        let err = tokio::time::timeout(Duration::from_secs(5), balance.call(request(Some(at))))
            .await
            .expect("the balancer timed out by itself")
            .expect_err("no answer");
        assert!(is_timeout(&err), "the outer layers' own error: {err}");
        let ep = only_endpoint(&dst).await;
        assert_eq!(state(&ep), BreakerState::Open);
        let cost = ep.load.cost(Instant::now());
        assert!(cost >= FAILURE_PENALTY.as_secs_f64() * 0.99, "{cost}");
    }

    /// A try cut off by its caller's deadline (propagated, not this hop's
    /// own timeout) is the caller's impatience, not the endpoint's fault:
    /// its breaker stays closed and its latency estimate untouched, timed
    /// out in flight or dropped past it. Else anyone able to send a short
    /// `grpc-timeout` could open the breakers of a healthy Service.
    #[tokio::test]
    async fn a_try_cut_off_by_its_callers_deadline_says_nothing_of_the_endpoint() {
        let (addr, _hole) = black_hole().await;
        let dst = destination(addr, 1, json!({}));
        let callers = |at| {
            let mut req = request(Some(at));
            req.extensions_mut()
                .insert(crate::proxy::http::deadline::CallersDeadline(at));
            req
        };
        let at = TokioInstant::now() + 100 * MS;
        let err = tokio::time::timeout(
            Duration::from_secs(5),
            Balance::new(dst.clone(), Pool::default()).call(callers(at)),
        )
        .await
        .expect("the balancer timed out by itself")
        .expect_err("no answer");
        assert_eq!(classify(&err, LABEL).reason(), "deadline-exceeded", "{err}");
        let ep = only_endpoint(&dst).await;
        assert_untouched(&ep);
        let at = TokioInstant::now() + 100 * MS;
        let mut fut = Balance::new(dst.clone(), Pool::default()).call(callers(at));
        start(&mut fut).await;
        tokio::time::sleep_until(at + 50 * MS).await;
        drop(fut);
        assert_untouched(&ep);
        // This hop's own (earlier) timeout still counts.
        let own = TokioInstant::now() + 100 * MS;
        let mut req = callers(own + Duration::from_secs(10));
        req.extensions_mut().insert(Deadline(own));
        let _ = Balance::new(dst.clone(), Pool::default()).call(req).await;
        assert_eq!(state(&ep), BreakerState::Open);
    }

    /// The requests of one HTTP/2 connection are all called before any of
    /// their tasks runs. A try whose deadline passed while it waited for
    /// its task (this proxy's own queue) was never sent: it is a timeout
    /// for the client, and nothing against the endpoint, whose latency
    /// estimate and breaker stay as they were; and one that goes in time
    /// is timed from when it went, not from when it was called.
    #[tokio::test]
    async fn a_try_whose_time_ran_out_before_it_ran_is_given_up_unsent() {
        let (addr, _hole) = black_hole().await;
        let dst = destination(addr, 1, json!({}));
        let ep = only_endpoint(&dst).await;
        let mut balance = Balance::new(dst.clone(), Pool::default());
        let called = balance.call(request(Some(TokioInstant::now() + 20 * MS)));
        // Its task first runs after the deadline.
        tokio::time::sleep(40 * MS).await;
        let err = called.await.expect_err("given up");
        assert!(is_timeout(&err), "{err}");
        // (Untouched includes no longer counted in flight.)
        assert_untouched(&ep);

        // A fast endpoint, called long before its task runs: the time
        // spent waiting for the task is not its latency.
        let (fast, _server) = answering().await;
        let dst = destination(fast, 1, json!({}));
        let ep = only_endpoint(&dst).await;
        let mut balance = Balance::new(dst.clone(), Pool::default());
        let called = balance.call(request(None));
        tokio::time::sleep(300 * MS).await;
        called.await.expect("answered");
        let cost = ep.load.cost(Instant::now());
        assert!(cost < 0.250, "the queue's 300 ms were not charged: {cost}");
    }

    /// `tries` tries to a silent endpoint, each under an outer timer for
    /// the same deadline as the balancer's, as the layer that set it has;
    /// each on a task of its own, as a server connection's request is.
    /// Every one must be a timeout and count; `balancer_first`: the
    /// balancer's timer must be the one that answered.
    async fn time_out_with_equal_deadlines(tries: u32, balancer_first: bool) {
        let (addr, _hole) = black_hole().await;
        let dst = destination(addr, tries, json!({}));
        let balance = Balance::new(dst.clone(), Pool::default());
        let ep = only_endpoint(&dst).await;
        for i in 0..tries {
            assert_eq!(state(&ep), BreakerState::Closed, "after {i} timeouts");
            let at = TokioInstant::now() + 100 * MS;
            let fut = balance.clone().call(request(Some(at)));
            let outer = tokio::spawn(tokio::time::timeout_at(at, fut))
                .await
                .expect("task");
            match outer {
                Ok(Err(e)) => assert!(is_timeout(&e), "try {i}: {e}"),
                Ok(Ok(_)) => panic!("try {i}: a silent endpoint answered"),
                Err(_) => assert!(!balancer_first, "try {i}: the outer timer fired first"),
            }
        }
        assert_eq!(state(&ep), BreakerState::Open, "each timeout counted");
    }

    /// On one thread both timers fire in one driver pass, and tokio's
    /// `Timeout` polls its inner future first: the balancer answers.
    #[tokio::test(flavor = "current_thread")]
    async fn with_equal_deadlines_on_one_thread_the_balancer_answers() {
        time_out_with_equal_deadlines(4, true).await;
    }

    /// With worker threads the two timers may fire apart and the outer one
    /// may win; the timeout counts all the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn whichever_timer_fires_first_the_timeout_counts() {
        time_out_with_equal_deadlines(6, false).await;
    }

    /// The outer timer won and dropped the balancer's future, which never
    /// saw its own timer fire: past the deadline, that is a timeout.
    #[tokio::test]
    async fn a_try_dropped_past_its_deadline_counts_as_a_timeout() {
        let (addr, _hole) = black_hole().await;
        let dst = destination(addr, 1, json!({}));
        let at = TokioInstant::now() + 200 * MS;
        let mut fut = Balance::new(dst.clone(), Pool::default()).call(request(Some(at)));
        start(&mut fut).await;
        tokio::time::sleep_until(at + 50 * MS).await;
        drop(fut);
        let ep = only_endpoint(&dst).await;
        assert_eq!(state(&ep), BreakerState::Open);
        assert!(ep.load.cost(Instant::now()) >= FAILURE_PENALTY.as_secs_f64() * 0.99);
    }

    /// The client went away before the deadline: that says nothing about
    /// the endpoint, to its breaker or its latency estimate.
    #[tokio::test]
    async fn a_try_cancelled_before_its_deadline_counts_as_nothing() {
        let (addr, _hole) = black_hole().await;
        let dst = destination(addr, 1, json!({}));
        let at = TokioInstant::now() + 10 * Duration::from_secs(1);
        for _ in 0..3 {
            let mut fut = Balance::new(dst.clone(), Pool::default()).call(request(Some(at)));
            start(&mut fut).await;
            drop(fut);
        }
        assert_untouched(&*only_endpoint(&dst).await);
    }

    /// A refused connection answers in ~0.1 ms; as an RTT it made the dead
    /// endpoint the cheapest. It must cost at least the failure penalty.
    #[tokio::test]
    async fn a_refused_connection_makes_the_endpoint_expensive() {
        let refusing = refusing_addr();
        let dst = destination(refusing, 100, json!({}));
        let err = Balance::new(dst.clone(), Pool::default())
            .call(request(None))
            .await
            .expect_err("refused");
        assert!(
            matches!(classify(&err, LABEL), ProxyError::Connect(..)),
            "{err}"
        );
        let cost = only_endpoint(&dst).await.load.cost(Instant::now());
        assert!(cost >= FAILURE_PENALTY.as_secs_f64() * 0.99, "{cost}");
    }

    /// Health paths are outside outlier accounting: a failing one neither
    /// opens the breaker nor moves the latency estimate.
    #[tokio::test]
    async fn a_failing_health_check_leaves_the_endpoint_alone() {
        let refusing = refusing_addr();
        let dst = destination(refusing, 1, json!({}));
        let mut req = request(None);
        req.extensions_mut().insert(RouteCtx {
            name: Arc::from("default"),
            timeout: None,
            retry: None,
            excluded: true,
        });
        let _ = Balance::new(dst.clone(), Pool::default())
            .call(req)
            .await
            .expect_err("refused");
        assert_untouched(&*only_endpoint(&dst).await);
    }

    /// A first try draws from the serving pods alone, however many
    /// draining ones the list holds (a rolling update of a large
    /// Service); with every pod draining or refused it leaves the choice
    /// to the full scan, which still sends to a draining pod rather than
    /// none.
    #[tokio::test]
    async fn a_first_try_samples_the_serving_pods_and_leaves_the_rest_to_the_scan() {
        use crate::proxy::destination::Discovered;
        let pod = |i: u32, draining: bool| Discovered {
            addr: SocketAddr::from(([10, 244, (i / 250) as u8, (i % 250) as u8 + 1], 8080)),
            service_account: Some("inventory".into()),
            draining,
            terminating: draining,
            zone: None,
            unmeshed: false,
        };
        let policy = destination(refusing_addr(), 5, json!({})).policy.clone();
        let pods: Vec<Discovered> = (0..1000).map(|i| pod(i, i != 617)).collect();
        let dst = Destination::new(
            LABEL.into(),
            policy.clone(),
            EndpointSource::Discovered(pods, Arc::default()),
            None,
        );
        let endpoints = dst.endpoints().await;
        let now = Instant::now();
        for _ in 0..100 {
            let (e, _) = quick_pick(&dst, &endpoints, now).expect("the serving pod");
            assert_eq!(e.addr, pod(617, false).addr);
        }
        // Its breaker open: no draw admits it, the scan answers (the open
        // pod refused, a draining one taken).
        let b = endpoints[617].breaker.as_ref().expect("breaker");
        for _ in 0..5 {
            b.try_acquire(now).expect("closed").failure(now);
        }
        assert!(quick_pick(&dst, &endpoints, now).is_none());
        let (e, _) = scan_pick(&dst, &endpoints, None, None, now).expect("a draining pod");
        assert!(e.is_draining());

        let all_draining: Vec<Discovered> = (0..3).map(|i| pod(i, true)).collect();
        let dst = Destination::new(
            LABEL.into(),
            policy,
            EndpointSource::Discovered(all_draining, Arc::default()),
            None,
        );
        let endpoints = dst.endpoints().await;
        assert!(quick_pick(&dst, &endpoints, now).is_none());
        assert!(scan_pick(&dst, &endpoints, None, None, now).is_ok());
    }
}
