//! Inbound rate limits (TrafficPolicy `inboundRateLimit`): what this pod
//! admits per second, enforced here, after mTLS and AccessPolicy, before
//! the application sees the request. Modelled on Linkerd's
//! `HTTPLocalRateLimitPolicy` (a total, a limit per caller identity,
//! overrides for named callers), with limits per route besides.
//!
//! A limit applies where the Service's AccessPolicy would: on the
//! container ports the Service forwards to, in the pods its selector
//! matches (see [`super::authz`]). A request draws one token from each
//! bucket that applies to it, narrowest first: its route's, its caller's
//! (an override naming the caller, else the caller's own `perIdentity`
//! bucket), the total. The first with nothing left refuses it, and the
//! tokens already taken for it are put back: a refused request costs no
//! limit anything, so a caller over its own limit does not drain the
//! total the others share.
//!
//! Routes are matched on the path as application frameworks route it
//! ([`routed_form`]: any case, `;parameters` and repeated or trailing
//! slashes dropped, `%2F` read as `/`), and a route naming GET covers
//! HEAD: a route limit must not be skipped by a spelling the application
//! serves as the same path. (AccessPolicy matches strictly, and fails
//! closed; a limit that matched strictly would fail open.) Health checks
//! are never limited: the limit's `excludedPaths`, and gRPC health checks
//! ([`is_grpc_health_check`]), which kubelet gRPC probes send to the
//! application's own port.
//!
//! Callers are told apart by their verified SPIFFE id only; callers
//! without one (plaintext, admitted in PERMISSIVE) share one bucket, as a
//! plaintext caller could claim any name. At most [`MAX_CALLERS`] callers
//! have buckets of their own at once; past that, buckets that are full
//! again (idle long enough to refill: forgetting them loses nothing) are
//! dropped (looked for at most every [`SWEEP_EVERY`]), and if none is,
//! newcomers share one overflow bucket until some are.
//!
//! The buckets of a policy live across config reloads while its limits
//! stay the same (a reload is no fresh burst), and go when it changes or
//! goes.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::authz::{HttpRequest, PodLabels, PortNames, selector_matches};
use super::resilience::{TokenBucket, lock};
use crate::config::{InboundRateLimitConfig, ProxyConfig, RequestRateConfig};
use crate::identity::SpiffeId;
use crate::proxy::http::route::{normalize_path, path_matches};

/// Callers with a bucket of their own, per policy.
pub const MAX_CALLERS: usize = 1024;
/// How often, at most, a full set of callers is searched for idle
/// buckets: each search looks at every one, under the lock every
/// verified request takes.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// The gRPC health service's methods (`grpc.health.v1`), which kubelet
/// gRPC probes call on the application's port: a probe refused under load
/// would restart a pod that is only busy.
pub const GRPC_HEALTH: [&str; 2] = [
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
];

/// Whether a request is a gRPC health check: a POST of `application/grpc`
/// to [`GRPC_HEALTH`] (an HTTP application's route of that name, reached
/// any other way, is limited as any path).
pub fn is_grpc_health_check<B>(req: &http::Request<B>) -> bool {
    req.method() == http::Method::POST
        && GRPC_HEALTH.contains(&req.uri().path())
        && super::http::deadline::is_grpc(req.headers())
}

/// A path as application frameworks route it, for route limits: lower
/// case (Express, ASP.NET Core), `;parameters` dropped from each segment
/// (Servlet containers), `%2F` and `%5C` read as `/` (servers that decode
/// `PATH_INFO`), empty segments dropped (repeated and trailing slashes),
/// and `.`/`..` resolved after all that.
fn routed_form(path: &str) -> Cow<'_, str> {
    // Most paths already are: lower case, no escapes, parameters, empty
    // or dot segments.
    let plain = path.starts_with('/')
        && (path == "/" || !path.ends_with('/'))
        && !path.contains("//")
        && !path.contains("/.")
        && !path
            .bytes()
            .any(|b| b.is_ascii_uppercase() || matches!(b, b'%' | b';' | b'\\'));
    if plain {
        return Cow::Borrowed(path);
    }
    let lower = path
        .to_ascii_lowercase()
        .replace("%2f", "/")
        .replace("%5c", "/")
        .replace('\\', "/");
    let mut segments: Vec<&str> = Vec::new();
    for seg in lower.split('/') {
        match seg.split(';').next().unwrap_or_default() {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            seg => segments.push(seg),
        }
    }
    if segments.is_empty() {
        return Cow::Borrowed("/");
    }
    Cow::Owned(
        segments
            .iter()
            .fold(String::with_capacity(lower.len()), |mut out, seg| {
                out.push('/');
                out.push_str(seg);
                out
            }),
    )
}

fn bucket(rate: RequestRateConfig) -> Arc<TokenBucket> {
    Arc::new(TokenBucket::new(
        rate.requests_per_second,
        rate.burst.max(1),
    ))
}

/// One policy's buckets.
pub struct Limiter {
    config: InboundRateLimitConfig,
    /// The routes' paths in [`routed_form`], in config order.
    route_paths: Vec<String>,
    /// The excluded paths, normalised as requests are.
    excluded: Vec<String>,
    total: Option<Arc<TokenBucket>>,
    per_identity: Option<Arc<Callers>>,
    overrides: Vec<Arc<TokenBucket>>,
    routes: Vec<Arc<TokenBucket>>,
}

/// Buckets by the caller's SPIFFE id.
type ByCaller = HashMap<Arc<str>, Arc<TokenBucket>>;

/// The per-identity buckets of one policy.
struct Callers {
    rate: RequestRateConfig,
    /// By SPIFFE id; and when idle ones were last looked for.
    known: Mutex<(ByCaller, Option<Instant>)>,
    /// Callers without a mesh identity, together.
    unverified: Arc<TokenBucket>,
    /// Newcomers while [`MAX_CALLERS`] callers are all drawing.
    overflow: Arc<TokenBucket>,
}

impl Callers {
    fn new(rate: RequestRateConfig) -> Self {
        Self {
            rate,
            known: Mutex::new((HashMap::new(), None)),
            unverified: bucket(rate),
            overflow: bucket(rate),
        }
    }

    fn of(&self, caller: Option<&Arc<str>>, now: Instant) -> Arc<TokenBucket> {
        let Some(caller) = caller else {
            return self.unverified.clone();
        };
        let mut guard = lock(&self.known);
        let (known, swept) = &mut *guard;
        if let Some(b) = known.get(&**caller) {
            return b.clone();
        }
        if known.len() >= MAX_CALLERS {
            if swept.is_none_or(|at| now.saturating_duration_since(at) >= SWEEP_EVERY) {
                *swept = Some(now);
                known.retain(|_, b| !b.is_full(now));
            }
            if known.len() >= MAX_CALLERS {
                return self.overflow.clone();
            }
        }
        let b = bucket(self.rate);
        known.insert(caller.clone(), b.clone());
        b
    }
}

/// Why a request was refused: the metric's `limit` label, what to tell
/// the caller, and when the limit admits again.
#[derive(Debug)]
pub struct Refusal {
    pub policy: String,
    pub limit: String,
    pub message: String,
    pub retry_after: Duration,
}

/// The tokens taken for one request, put back if a later limit refuses it.
#[derive(Default)]
pub struct Taken(Vec<Arc<TokenBucket>>);

impl Taken {
    /// Puts every token back.
    fn give_back(self) {
        for b in self.0 {
            b.give_back();
        }
    }
}

/// The caller as a limit sees it.
#[derive(Clone, Copy)]
pub struct Caller<'a> {
    /// The verified id, parsed, for overrides.
    pub id: Option<&'a SpiffeId>,
    /// The same id as text, the per-identity key.
    pub key: Option<&'a Arc<str>>,
}

impl Limiter {
    fn new(config: InboundRateLimitConfig) -> Self {
        Self {
            total: config.total.map(bucket),
            per_identity: config.per_identity.map(|r| Arc::new(Callers::new(r))),
            overrides: config.overrides.iter().map(|o| bucket(o.limit)).collect(),
            routes: config.routes.iter().map(|r| bucket(r.limit)).collect(),
            ..Self::placed(config)
        }
    }

    /// `config`'s limits with `self`'s buckets: where it applies or what
    /// it leaves out changed, not the limits.
    fn moved(&self, config: InboundRateLimitConfig) -> Self {
        Self {
            total: self.total.clone(),
            per_identity: self.per_identity.clone(),
            overrides: self.overrides.clone(),
            routes: self.routes.clone(),
            ..Self::placed(config)
        }
    }

    /// `config` and what is derived from it, with no bucket.
    fn placed(config: InboundRateLimitConfig) -> Self {
        Self {
            route_paths: config
                .routes
                .iter()
                .map(|r| routed_form(&normalize_path(&r.path.value)).into_owned())
                .collect(),
            excluded: config
                .excluded_paths
                .iter()
                .map(|p| normalize_path(p).into_owned())
                .collect(),
            total: None,
            per_identity: None,
            overrides: Vec::new(),
            routes: Vec::new(),
            config,
        }
    }

    /// Whether this limit guards `port` of this pod.
    pub fn applies(&self, names: &PortNames, labels: Option<&PodLabels>, port: u16) -> bool {
        names.covers(&self.config.ports, port)
            && selector_matches(self.config.selector.as_ref(), labels)
    }

    /// Takes a token from each bucket that applies, or refuses with none
    /// taken.
    pub fn admit(
        &self,
        now: Instant,
        caller: Caller<'_>,
        req: HttpRequest<'_>,
        taken: &mut Taken,
    ) -> Result<(), Refusal> {
        let c = &self.config;
        if self.excluded.iter().any(|p| p == req.path) {
            return Ok(());
        }
        // A GET route covers HEAD, which frameworks serve with the GET
        // handler.
        let method = match *req.method {
            http::Method::HEAD => "GET",
            ref m => m.as_str(),
        };
        let routed = (!c.routes.is_empty()).then(|| routed_form(req.path));
        let route = routed.as_deref().and_then(|path| {
            c.routes
                .iter()
                .zip(&self.route_paths)
                .position(|(r, pattern)| {
                    path_matches(r.path.type_, pattern, path)
                        && (r.methods.is_empty()
                            || r.methods
                                .iter()
                                .any(|m| m.as_str() == method || m.as_str() == req.method.as_str()))
                })
        });
        if let Some(i) = route {
            let r = &c.routes[i];
            self.draw(&self.routes[i], now, taken, || {
                (
                    format!("route/{}", r.name),
                    format!(
                        "route {} of Service {} admits {} requests/s from all callers together",
                        r.name, c.service, r.limit.requests_per_second
                    ),
                )
            })?;
        }
        let over = caller.id.and_then(|id| {
            c.overrides.iter().position(|o| {
                o.identities.iter().any(|m| {
                    m.namespace == id.namespace
                        && m.service_account
                            .as_deref()
                            .is_none_or(|sa| sa == id.service_account)
                })
            })
        });
        let who = || {
            caller.key.map_or_else(
                || "callers without a mesh identity".to_owned(),
                |k| k.to_string(),
            )
        };
        if let Some(i) = over {
            let o = &c.overrides[i];
            self.draw(&self.overrides[i], now, taken, || {
                (
                    "override".to_owned(),
                    format!(
                        "Service {} admits {} requests/s from {} (an override, shared by the callers it names)",
                        c.service,
                        o.limit.requests_per_second,
                        who(),
                    ),
                )
            })?;
        } else if let Some(callers) = &self.per_identity {
            let b = callers.of(caller.key, now);
            self.draw(&b, now, taken, || {
                (
                    "identity".to_owned(),
                    format!(
                        "Service {} admits {} requests/s from each caller, and {} is over it",
                        c.service,
                        callers.rate.requests_per_second,
                        who()
                    ),
                )
            })?;
        }
        if let Some(total) = &self.total {
            self.draw(total, now, taken, || {
                (
                    "total".to_owned(),
                    format!(
                        "each pod of Service {} admits {} requests/s from all callers together",
                        c.service,
                        c.total.map_or(0, |t| t.requests_per_second)
                    ),
                )
            })?;
        }
        Ok(())
    }

    /// One token from `b` into `taken`, or the refusal `what` describes
    /// with every token of `taken` put back.
    fn draw(
        &self,
        b: &Arc<TokenBucket>,
        now: Instant,
        taken: &mut Taken,
        what: impl FnOnce() -> (String, String),
    ) -> Result<(), Refusal> {
        match b.take(now) {
            Ok(()) => {
                taken.0.push(b.clone());
                Ok(())
            }
            Err(wait) => {
                std::mem::take(taken).give_back();
                let (limit, message) = what();
                Err(Refusal {
                    policy: self.config.policy.clone(),
                    limit,
                    message: format!("{message} (TrafficPolicy {})", self.config.policy),
                    retry_after: wait,
                })
            }
        }
    }
}

/// Every limit this pod enforces, in config order.
pub type Limits = Vec<Arc<Limiter>>;

/// Decides one request against every limit guarding `port` of this pod.
pub fn admit(
    limits: &[Arc<Limiter>],
    names: &PortNames,
    labels: Option<&PodLabels>,
    port: u16,
    caller: Caller<'_>,
    req: HttpRequest<'_>,
) -> Result<(), Refusal> {
    let now = Instant::now();
    let mut taken = Taken::default();
    for limiter in limits.iter().filter(|l| l.applies(names, labels, port)) {
        limiter.admit(now, caller, req, &mut taken)?;
    }
    Ok(())
}

/// The limiters built so far, by policy and limits, so that a config
/// reload keeps the buckets of a policy whose limits did not change.
#[derive(Default)]
pub struct Limiters {
    built: Mutex<HashMap<String, Arc<Limiter>>>,
}

impl Limiters {
    /// What identifies a limiter's buckets: the policy and its limits
    /// (not where it applies or what it leaves out: a Service that gains
    /// a port keeps them).
    fn key(c: &InboundRateLimitConfig) -> String {
        serde_json::json!([
            c.policy,
            c.service,
            c.total,
            c.per_identity,
            c.overrides,
            c.routes
        ])
        .to_string()
    }

    /// The limiters of `config`, reused where built before.
    pub fn of(&self, config: &ProxyConfig) -> Limits {
        let mut built = lock(&self.built);
        config
            .inbound
            .rate_limits
            .iter()
            .map(|c| {
                let key = Self::key(c);
                match built.get(&key) {
                    // Same buckets; where they apply may have changed.
                    Some(l) if l.config == *c => l.clone(),
                    Some(l) => {
                        let l = Arc::new(l.moved(c.clone()));
                        built.insert(key, l.clone());
                        l
                    }
                    None => {
                        let l = Arc::new(Limiter::new(c.clone()));
                        built.insert(key, l.clone());
                        l
                    }
                }
            })
            .collect()
    }

    /// Forgets the limiters `config` no longer has.
    pub fn keep_only(&self, config: &ProxyConfig) {
        let keys: std::collections::HashSet<String> =
            config.inbound.rate_limits.iter().map(Self::key).collect();
        lock(&self.built).retain(|k, _| keys.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{HttpMethod, PathMatchType};
    use crate::config::{
        IdentityMatch, PathMatchConfig, PortRef, RateOverrideConfig, RouteRateConfig,
    };
    use crate::proxy::resilience::TokenBucket;

    fn rate(rps: u32, burst: u32) -> RequestRateConfig {
        RequestRateConfig {
            requests_per_second: rps,
            burst,
        }
    }

    fn payments() -> InboundRateLimitConfig {
        InboundRateLimitConfig {
            policy: "shop/payments".into(),
            service: "payments".into(),
            selector: Some([("app".to_owned(), "payments".to_owned())].into()),
            ports: vec![PortRef::Number(8080)],
            total: Some(rate(10, 10)),
            per_identity: Some(rate(3, 3)),
            overrides: vec![RateOverrideConfig {
                identities: vec![IdentityMatch {
                    namespace: "shop".into(),
                    service_account: Some("checkout".into()),
                }],
                limit: rate(6, 6),
            }],
            routes: vec![RouteRateConfig {
                name: "refunds".into(),
                path: PathMatchConfig {
                    type_: PathMatchType::PathPrefix,
                    value: "/refunds".into(),
                },
                methods: vec![HttpMethod::Post],
                limit: rate(1, 1),
            }],
            excluded_paths: Vec::new(),
        }
    }

    struct Who {
        id: SpiffeId,
        key: Arc<str>,
    }

    fn who(ns: &str, sa: &str) -> Who {
        let id = SpiffeId::new("cluster.local", ns, sa);
        Who {
            key: Arc::from(id.to_string()),
            id,
        }
    }

    impl Who {
        fn caller(&self) -> Caller<'_> {
            Caller {
                id: Some(&self.id),
                key: Some(&self.key),
            }
        }
    }

    const PLAINTEXT: Caller<'static> = Caller {
        id: None,
        key: None,
    };

    fn get(path: &str) -> (http::Method, String) {
        (http::Method::GET, path.to_owned())
    }

    /// Admits `n` requests in a row at `now`, returns how many went and
    /// the last refusal.
    fn burst(
        l: &Limiter,
        now: Instant,
        caller: Caller<'_>,
        m: &(http::Method, String),
        n: usize,
    ) -> (usize, Option<Refusal>) {
        let mut admitted = 0;
        let mut last = None;
        for _ in 0..n {
            let req = HttpRequest {
                method: &m.0,
                path: &m.1,
            };
            match l.admit(now, caller, req, &mut Taken::default()) {
                Ok(()) => admitted += 1,
                Err(r) => last = Some(r),
            }
        }
        (admitted, last)
    }

    /// Each caller gets its own share, the override its own, plaintext
    /// callers one share together, and the total caps them all.
    #[test]
    fn identities_share_the_total_each_within_their_own_limit() {
        let l = Limiter::new(payments());
        let now = Instant::now();
        let (cart, orders, checkout) = (
            who("shop", "cart"),
            who("shop", "orders"),
            who("shop", "checkout"),
        );
        let (n, refused) = burst(&l, now, cart.caller(), &get("/charges"), 5);
        assert_eq!(n, 3, "perIdentity burst of 3");
        let refused = refused.expect("refused");
        assert_eq!(refused.limit, "identity");
        assert!(
            refused
                .message
                .contains("spiffe://cluster.local/ns/shop/sa/cart"),
            "{}",
            refused.message
        );
        assert!(
            refused.message.contains("TrafficPolicy shop/payments"),
            "{}",
            refused.message
        );
        // About a third of a second until cart's next token (3/s).
        assert!(
            refused.retry_after > Duration::from_millis(300)
                && refused.retry_after <= Duration::from_millis(334),
            "{:?}",
            refused.retry_after
        );
        // checkout is overridden to 6: cart's refusals took nothing from
        // the total (10), so 3 + 6 = 9 of it are spent.
        assert_eq!(burst(&l, now, checkout.caller(), &get("/charges"), 8).0, 6);
        // Plaintext callers together: 1 left in the total.
        let (n, refused) = burst(&l, now, PLAINTEXT, &get("/charges"), 3);
        assert_eq!(n, 1);
        assert_eq!(refused.expect("refused").limit, "total");
        // orders has its own identity tokens but the total is spent: each
        // refusal gives orders' identity token back.
        let (n, refused) = burst(&l, now, orders.caller(), &get("/charges"), 3);
        assert_eq!((n, refused.expect("refused").limit.as_str()), (0, "total"));
        // 300 ms on the total has refilled 3, and orders still has all 3
        // of its own (had they been spent, it would have under one).
        let later = now + Duration::from_millis(300);
        assert_eq!(burst(&l, later, orders.caller(), &get("/charges"), 5).0, 3);
    }

    /// A route's limit counts all callers together and only the methods
    /// it names, and a request refused by a later limit gives the
    /// route's token back.
    #[test]
    fn a_route_limit_covers_its_path_and_methods_for_every_caller() {
        let l = Limiter::new(payments());
        let now = Instant::now();
        let (cart, orders) = (who("shop", "cart"), who("shop", "orders"));
        let refund = (http::Method::POST, "/refunds/7".to_owned());
        // cart spends its own 3; its refund is then refused by its
        // identity limit, after the route's token was taken.
        assert_eq!(burst(&l, now, cart.caller(), &get("/charges"), 3).0, 3);
        let (n, refused) = burst(&l, now, cart.caller(), &refund, 1);
        assert_eq!(
            (n, refused.expect("refused").limit.as_str()),
            (0, "identity")
        );
        // The route's one token is still there for orders, then spent.
        assert_eq!(burst(&l, now, orders.caller(), &refund, 1).0, 1);
        let (n, refused) = burst(&l, now, orders.caller(), &refund, 1);
        assert_eq!(
            (n, refused.expect("refused").limit.as_str()),
            (0, "route/refunds")
        );
        // GET /refunds is not the route's: orders has 2 of its own left.
        assert_eq!(burst(&l, now, orders.caller(), &get("/refunds/7"), 5).0, 2);
    }

    /// A route limit is not skipped by a spelling the application serves
    /// as the same path, and a GET route covers HEAD.
    #[test]
    fn route_limits_match_the_path_as_frameworks_route_it() {
        for (path, routed) in [
            ("/Refunds/7", "/refunds/7"),
            ("/refunds;jsessionid=1/7", "/refunds/7"),
            ("/refunds%2F7", "/refunds/7"),
            ("/refunds%5c7", "/refunds/7"),
            ("//refunds//7/", "/refunds/7"),
            ("/x%2F..%2Frefunds", "/refunds"),
            ("/", "/"),
            ("/..", "/"),
        ] {
            assert_eq!(routed_form(path), routed, "{path}");
        }
        let mut c = payments();
        c.total = None;
        c.per_identity = None;
        c.overrides.clear();
        c.routes[0].methods = vec![HttpMethod::Get];
        c.routes[0].path.type_ = PathMatchType::Exact;
        c.routes[0].limit = rate(1, 3);
        let l = Limiter::new(c);
        let now = Instant::now();
        let cart = who("shop", "cart");
        for spelt in ["/refunds", "/REFUNDS/", "/refunds;v=2"] {
            assert_eq!(
                burst(&l, now, cart.caller(), &get(spelt), 1).0,
                1,
                "{spelt}"
            );
        }
        let head = (http::Method::HEAD, "/refunds".to_owned());
        let (n, refused) = burst(&l, now, cart.caller(), &head, 1);
        assert_eq!(
            (n, refused.expect("refused").limit.as_str()),
            (0, "route/refunds")
        );
    }

    /// Health checks are never limited: the policy's excluded paths and
    /// the gRPC health service a kubelet probe calls.
    #[test]
    fn health_paths_are_never_limited() {
        let mut c = payments();
        c.total = Some(rate(1, 1));
        c.excluded_paths = vec!["/healthz".into()];
        let l = Limiter::new(c);
        let now = Instant::now();
        assert_eq!(burst(&l, now, PLAINTEXT, &get("/charges"), 1).0, 1);
        assert_eq!(burst(&l, now, PLAINTEXT, &get("/charges"), 1).0, 0);
        assert_eq!(burst(&l, now, PLAINTEXT, &get("/healthz"), 5).0, 5);
        let grpc = |method: http::Method, content_type: &str| {
            http::Request::builder()
                .method(method)
                .uri("/grpc.health.v1.Health/Check")
                .header("content-type", content_type)
                .body(())
                .expect("request")
        };
        assert!(is_grpc_health_check(&grpc(
            http::Method::POST,
            "application/grpc+proto"
        )));
        assert!(!is_grpc_health_check(&grpc(
            http::Method::POST,
            "application/json"
        )));
        assert!(!is_grpc_health_check(&grpc(
            http::Method::GET,
            "application/grpc"
        )));
    }

    /// The wait a refusal gives is the time to the next token: about a
    /// millisecond at 1000/s, and a second at 1/s.
    #[test]
    fn a_refusal_says_when_the_next_token_comes() {
        let now = Instant::now();
        let fast = TokenBucket::new(1000, 1);
        assert!(fast.take(now).is_ok());
        let wait = fast.take(now).expect_err("empty");
        assert_eq!(wait, Duration::from_millis(1));
        assert_eq!(
            fast.take(now + Duration::from_micros(400))
                .expect_err("still empty"),
            Duration::from_micros(600)
        );
        let slow = TokenBucket::new(1, 1);
        assert!(slow.take(now).is_ok());
        assert_eq!(slow.take(now).expect_err("empty"), Duration::from_secs(1));
        // Given back: there again, never past the burst.
        slow.give_back();
        slow.give_back();
        assert!(slow.take(now).is_ok());
        assert!(slow.take(now).is_err());
    }

    /// Past MAX_CALLERS, idle (full) buckets are forgotten; while all are
    /// drawing, newcomers share the overflow bucket.
    #[test]
    fn callers_past_the_bound_reuse_idle_buckets_or_share_the_overflow() {
        let mut c = payments();
        c.total = None;
        c.overrides.clear();
        let l = Limiter::new(c);
        let now = Instant::now();
        let ids: Vec<Who> = (0..MAX_CALLERS)
            .map(|i| who("shop", &format!("sa-{i}")))
            .collect();
        for w in &ids {
            assert_eq!(burst(&l, now, w.caller(), &get("/"), 1).0, 1);
        }
        let callers = l.per_identity.as_ref().expect("per identity");
        assert_eq!(lock(&callers.known).0.len(), MAX_CALLERS);
        // All drawing: two newcomers share the overflow's 3.
        let (a, b) = (who("shop", "new-a"), who("shop", "new-b"));
        assert_eq!(burst(&l, now, a.caller(), &get("/"), 2).0, 2);
        assert_eq!(burst(&l, now, b.caller(), &get("/"), 2).0, 1);
        assert_eq!(lock(&callers.known).0.len(), MAX_CALLERS);
        // A second on, every bucket is full again: the next newcomer
        // clears them out and gets its own.
        let later = now + Duration::from_secs(1);
        assert_eq!(burst(&l, later, b.caller(), &get("/"), 5).0, 3);
        assert_eq!(lock(&callers.known).0.len(), 1);
    }

    /// A reload keeps the buckets of unchanged limits (no fresh burst),
    /// also when only where they apply changed; new limits start full.
    #[test]
    fn reloads_keep_the_buckets_of_unchanged_limits() {
        let json = r#"{"schemaVersion":"1.0","generation":"g1","namespace":"shop","trustDomain":"cluster.local","inbound":{"mode":"permissive"},"outbound":{"defaults":{"retry":{"maxRetries":0,"retryOn":["connect-failure"],"methods":["GET"],"idempotencyHeader":"idempotency-key","budget":{"percent":20,"minPerSecond":10,"windowMs":10000},"backoffBaseMs":25,"backoffMaxMs":250},"loadBalancer":"PeakEwma"},"services":[]}}"#;
        let mut config = ProxyConfig::from_json(json.as_bytes()).expect("config");
        config.inbound.rate_limits = vec![payments()];
        let built = Limiters::default();
        let first = built.of(&config);
        let now = Instant::now();
        let cart = who("shop", "cart");
        assert_eq!(burst(&first[0], now, cart.caller(), &get("/"), 5).0, 3);
        // The Service gained a port: same buckets.
        config.inbound.rate_limits[0]
            .ports
            .push(PortRef::Number(9090));
        built.keep_only(&config);
        let second = built.of(&config);
        assert_eq!(burst(&second[0], now, cart.caller(), &get("/"), 1).0, 0);
        assert!(second[0].applies(&PortNames::default(), None, 9090));
        // The limit changed: fresh buckets.
        config.inbound.rate_limits[0].per_identity = Some(rate(4, 4));
        built.keep_only(&config);
        let third = built.of(&config);
        assert_eq!(burst(&third[0], now, cart.caller(), &get("/"), 5).0, 4);
        assert_eq!(lock(&built.built).len(), 1, "the old limiter is forgotten");
    }

    /// Where a limit applies: the Service's ports, in its pods.
    #[test]
    fn a_limit_applies_on_its_services_ports_in_its_pods() {
        let l = Limiter::new(payments());
        let names = PortNames::default();
        let mine: PodLabels = [("app".to_owned(), "payments".to_owned())].into();
        let other: PodLabels = [("app".to_owned(), "cart".to_owned())].into();
        assert!(l.applies(&names, Some(&mine), 8080));
        assert!(!l.applies(&names, Some(&mine), 9090));
        assert!(!l.applies(&names, Some(&other), 8080));
        // Unknown labels: applied (as AccessPolicy does).
        assert!(l.applies(&names, None, 8080));
    }
}
