//! The proxy's resilience state machines: retry budget, circuit breaker,
//! token-bucket rate limit, peak-EWMA endpoint load and the backoff between
//! tries.
//!
//! They are pure on purpose: no I/O, no tokio and no clock of their own.
//! Every method whose answer depends on time takes `now`, so the proxy passes
//! the instant it already read and the tests drive time explicitly. One
//! instance is shared (via `Arc`) by every request to a destination, so each
//! type is `Send + Sync` with a short `Mutex` critical section; a poisoned
//! lock is recovered rather than propagated, because a panic on one request
//! must not take down every later request to the same Service.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Buckets in a sliding window: old traffic expires a tenth of a window at a
/// time, without a timer.
const BUCKETS: usize = 10;

/// A poisoned lock only means another request panicked mid-update; the
/// state is still usable, and refusing all traffic would be worse.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// Two counters per bucket over a sliding window. Buckets are reused lazily:
/// a bucket whose epoch is stale is reset when written and skipped when read.
#[derive(Debug)]
struct Buckets {
    width: Duration,
    /// The first instant seen; `new` takes no `now`, so time starts there.
    origin: Option<Instant>,
    newest: u64,
    slots: [Slot; BUCKETS],
}

#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    epoch: u64,
    a: u64,
    b: u64,
}

impl Buckets {
    fn new(window: Duration) -> Self {
        Self {
            // A zero window would divide by zero; 1ns makes it expire at once.
            width: (window / BUCKETS as u32).max(Duration::from_nanos(1)),
            origin: None,
            newest: 0,
            slots: [Slot::default(); BUCKETS],
        }
    }

    /// Never moves backwards: a request that read the clock just before a
    /// racing one lands in the newest bucket instead of wiping it.
    fn epoch(&mut self, now: Instant) -> u64 {
        let origin = *self.origin.get_or_insert(now);
        let n = now.saturating_duration_since(origin).as_nanos() / self.width.as_nanos();
        self.newest = self.newest.max(u64::try_from(n).unwrap_or(u64::MAX));
        self.newest
    }

    fn add(&mut self, now: Instant, a: u64, b: u64) {
        let epoch = self.epoch(now);
        let slot = &mut self.slots[(epoch % BUCKETS as u64) as usize];
        if slot.epoch != epoch {
            *slot = Slot { epoch, a: 0, b: 0 };
        }
        slot.a = slot.a.saturating_add(a);
        slot.b = slot.b.saturating_add(b);
    }

    fn totals(&mut self, now: Instant) -> (u64, u64) {
        let epoch = self.epoch(now);
        self.slots
            .iter()
            .filter(|s| epoch - s.epoch < BUCKETS as u64)
            .fold((0, 0), |(a, b), s| {
                (a.saturating_add(s.a), b.saturating_add(s.b))
            })
    }

    fn clear(&mut self) {
        self.slots = [Slot::default(); BUCKETS];
    }
}

/// Retry budget (finagle/linkerd style): retries allowed in the sliding
/// `window` are at most max(min_per_second * window_secs, percent% of
/// requests seen in the window). It keeps retries from multiplying load on a
/// Service that is already failing, while a quiet Service can still retry.
#[derive(Debug)]
pub struct RetryBudget {
    percent: u64,
    floor: u64,
    /// Per bucket: (original requests, retries).
    window: Mutex<Buckets>,
}

impl RetryBudget {
    /// `percent` of requests may be retries, and `min_per_second` retries per
    /// second are always allowed, both counted over `window`.
    pub fn new(percent: u32, min_per_second: u32, window: Duration) -> Self {
        let floor = u128::from(min_per_second) * window.as_nanos() / 1_000_000_000;
        Self {
            percent: u64::from(percent),
            floor: u64::try_from(floor).unwrap_or(u64::MAX),
            window: Mutex::new(Buckets::new(window)),
        }
    }

    /// Every original request (not retries) deposits.
    pub fn record_request(&self, now: Instant) {
        lock(&self.window).add(now, 1, 0);
    }

    /// Withdraws one retry if the budget allows; false = budget exhausted.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let mut window = lock(&self.window);
        let (requests, retries) = window.totals(now);
        let allowed = self.floor.max(requests.saturating_mul(self.percent) / 100);
        if retries >= allowed {
            return false;
        }
        window.add(now, 0, 1);
        true
    }
}

/// When a circuit breaker opens and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerSettings {
    /// Consecutive failures that open the circuit; 0 disables this condition.
    pub consecutive_failures: u32,
    pub failure_rate: Option<FailureRateSettings>,
    /// How long the circuit stays open on the first trip.
    pub open: Duration,
    /// Cap on the open period as failed probes double it.
    pub max_open: Duration,
}

/// Failure-rate trip condition of a circuit breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailureRateSettings {
    /// Failure percentage over `window` that opens the circuit.
    pub percent: u32,
    /// Outcomes the window must hold before the rate counts, so that one
    /// early failure is not a 100% failure rate.
    pub min_requests: u32,
    pub window: Duration,
}

/// What a circuit breaker does with requests right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Admits every request.
    Closed,
    /// Rejects every request until the open period ends.
    Open,
    /// Admits one probe request at a time to decide whether to close.
    HalfOpen,
}

/// Circuit breaker: opens after `consecutive_failures` consecutive failures,
/// or when the failure rate over `window` reaches `percent` with at least
/// `min_requests` requests. While open it rejects; after the open period it
/// half-opens and admits exactly ONE probe at a time; the probe's success
/// closes it (and resets the trip count), its failure re-opens it for twice
/// the previous open period, capped at `max_open`.
///
/// Cheap to clone: clones share one state.
#[derive(Clone, Debug)]
pub struct CircuitBreaker {
    inner: Arc<BreakerInner>,
}

#[derive(Debug)]
struct BreakerInner {
    settings: BreakerSettings,
    core: Mutex<BreakerCore>,
}

#[derive(Debug)]
struct BreakerCore {
    phase: Phase,
    trips: u32,
    open_for: Duration,
    /// Bumped on every close, so outcomes of requests admitted before a trip
    /// do not count against the circuit once it has closed again.
    generation: u64,
    /// Per bucket: (successes, failures); only with a failure-rate condition.
    outcomes: Option<Buckets>,
}

#[derive(Clone, Copy, Debug)]
enum Phase {
    Closed {
        consecutive: u32,
    },
    // A start and a length rather than an end instant: `Instant + Duration`
    // can overflow for a huge configured period.
    Open {
        since: Instant,
        period: Duration,
    },
    /// `probing`: when the outstanding probe was let through. A probe
    /// holds the slot for one open period at most: a slow one (a long
    /// export, with no timeout) must not keep a healthy endpoint out.
    HalfOpen {
        probing: Option<Instant>,
    },
}

impl BreakerCore {
    /// The open period ends lazily, when someone next looks.
    fn advance(&mut self, now: Instant) -> Phase {
        if let Phase::Open { since, period } = self.phase
            && now.saturating_duration_since(since) >= period
        {
            self.phase = Phase::HalfOpen { probing: None };
        }
        self.phase
    }

    /// A half-open circuit's probe slot is free at `now`: no probe is out,
    /// or the one out has held it for a whole open period.
    fn probe_slot_free(&self, now: Instant) -> bool {
        match self.phase {
            Phase::HalfOpen { probing: None } => true,
            Phase::HalfOpen {
                probing: Some(since),
            } => now.saturating_duration_since(since) >= self.open_for,
            _ => false,
        }
    }

    fn open(&mut self, now: Instant, period: Duration) {
        self.open_for = period;
        self.trips = self.trips.saturating_add(1);
        self.phase = Phase::Open { since: now, period };
    }
}

impl BreakerInner {
    fn report(&self, probe: bool, generation: u64, ok: bool, now: Instant) {
        let s = &self.settings;
        let mut core = lock(&self.core);
        match core.phase {
            Phase::HalfOpen { probing: Some(_) } if probe => {
                if ok {
                    core.phase = Phase::Closed { consecutive: 0 };
                    core.trips = 0;
                    core.generation = core.generation.wrapping_add(1);
                    // The failures that tripped it must not re-trip it now.
                    if let Some(outcomes) = core.outcomes.as_mut() {
                        outcomes.clear();
                    }
                } else {
                    // Never shorter than the first period, even if misconfigured.
                    let period = core.open_for.saturating_mul(2).min(s.max_open.max(s.open));
                    core.open(now, period);
                }
            }
            Phase::Closed { consecutive } if !probe && generation == core.generation => {
                let consecutive = if ok { 0 } else { consecutive.saturating_add(1) };
                core.phase = Phase::Closed { consecutive };
                let by_count = s.consecutive_failures > 0 && consecutive >= s.consecutive_failures;
                let by_rate = match (s.failure_rate, core.outcomes.as_mut()) {
                    (Some(rate), Some(outcomes)) => {
                        outcomes.add(now, u64::from(ok), u64::from(!ok));
                        let (successes, failures) = outcomes.totals(now);
                        let total = successes.saturating_add(failures);
                        failures > 0
                            && total >= u64::from(rate.min_requests)
                            && failures.saturating_mul(100)
                                >= total.saturating_mul(u64::from(rate.percent))
                    }
                    _ => false,
                };
                if by_count || by_rate {
                    core.open(now, s.open);
                }
            }
            // Stale: admitted before a trip, or not the probe. Only the
            // probe decides a half-open circuit.
            _ => {}
        }
    }
}

impl CircuitBreaker {
    /// A closed circuit.
    pub fn new(settings: BreakerSettings) -> Self {
        let core = BreakerCore {
            phase: Phase::Closed { consecutive: 0 },
            trips: 0,
            open_for: settings.open,
            generation: 0,
            outcomes: settings.failure_rate.map(|rate| Buckets::new(rate.window)),
        };
        Self {
            inner: Arc::new(BreakerInner {
                settings,
                core: Mutex::new(core),
            }),
        }
    }

    /// May a request go now? Returns a permit when yes. In half-open, only
    /// one outstanding probe permit exists at a time; further calls get None
    /// until the probe reports.
    pub fn try_acquire(&self, now: Instant) -> Option<BreakerPermit> {
        let mut core = lock(&self.inner.core);
        let probe = match core.advance(now) {
            Phase::Closed { .. } => None,
            Phase::HalfOpen { .. } if core.probe_slot_free(now) => {
                core.phase = Phase::HalfOpen { probing: Some(now) };
                Some(now)
            }
            Phase::HalfOpen { .. } | Phase::Open { .. } => return None,
        };
        Some(BreakerPermit {
            inner: Arc::clone(&self.inner),
            probe: probe.is_some(),
            probe_since: probe,
            generation: core.generation,
            settled: false,
        })
    }

    /// Would `try_acquire` admit a request now? Lets the balancer pick among
    /// admitting endpoints without claiming a half-open probe slot.
    pub fn admits(&self, now: Instant) -> bool {
        let mut core = lock(&self.inner.core);
        match core.advance(now) {
            Phase::Closed { .. } => true,
            Phase::HalfOpen { .. } => core.probe_slot_free(now),
            Phase::Open { .. } => false,
        }
    }

    /// The state at `now` (an elapsed open period reads as half-open).
    pub fn state(&self, now: Instant) -> BreakerState {
        match lock(&self.inner.core).advance(now) {
            Phase::Closed { .. } => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// How many times it has tripped since last closing (0 when closed).
    pub fn trips(&self) -> u32 {
        lock(&self.inner.core).trips
    }
}

/// Reports the outcome of one admitted request. Dropping without reporting
/// (e.g. the request was cancelled or hit an excluded health path) counts as
/// neither success nor failure, but must release a half-open probe slot.
#[derive(Debug)]
pub struct BreakerPermit {
    inner: Arc<BreakerInner>,
    probe: bool,
    /// A probe's start: its slot, which a later probe may have taken over.
    probe_since: Option<Instant>,
    generation: u64,
    settled: bool,
}

impl BreakerPermit {
    /// The request succeeded.
    pub fn success(mut self, now: Instant) {
        self.settled = true;
        self.inner.report(self.probe, self.generation, true, now);
    }

    /// The request failed.
    pub fn failure(mut self, now: Instant) {
        self.settled = true;
        self.inner.report(self.probe, self.generation, false, now);
    }
}

impl Drop for BreakerPermit {
    fn drop(&mut self) {
        // Without this a cancelled probe would leave the circuit half-open
        // with no probe allowed, i.e. closed to traffic forever.
        if self.probe && !self.settled {
            let mut core = lock(&self.inner.core);
            // Only its own slot: not a later probe's that took over.
            if let Phase::HalfOpen { probing } = core.phase
                && probing == self.probe_since
            {
                core.phase = Phase::HalfOpen { probing: None };
            }
        }
    }
}

/// One token in integer units: nanosecond-exact refill, no float drift.
const TOKEN: u64 = 1_000_000_000;

/// Token bucket rate limiter: `rate` tokens/s, capacity `burst`; starts full.
/// A rate of 0 never refills; a burst of 0 admits nothing.
///
/// A bucket shared by `n` proxies ([`TokenBucket::share_among`]) refills
/// at `rate / n` and holds `burst / n`, but never less than one token (a
/// share smaller than one request would admit nothing); shared by none,
/// it admits nothing.
#[derive(Debug)]
pub struct TokenBucket {
    rate: u64,
    /// In units of `1 / TOKEN` tokens.
    capacity: u64,
    /// How many proxies share the rate and burst (1: this one alone).
    sharers: AtomicU32,
    state: Mutex<(u64, Option<Instant>)>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate_per_second: u32, burst: u32) -> Self {
        let capacity = u64::from(burst) * TOKEN;
        Self {
            rate: u64::from(rate_per_second),
            capacity,
            sharers: AtomicU32::new(1),
            state: Mutex::new((capacity, None)),
        }
    }

    /// From now on this proxy's share is `1 / sharers` of rate and burst
    /// (none for 0). A smaller share cuts what the bucket holds now.
    pub fn share_among(&self, sharers: u32) {
        if self.sharers.swap(sharers, Ordering::AcqRel) == sharers {
            return;
        }
        let cap = self.capacity_for(sharers);
        let mut state = lock(&self.state);
        state.0 = state.0.min(cap);
    }

    /// How many proxies share this bucket.
    pub fn sharers(&self) -> u32 {
        self.sharers.load(Ordering::Acquire)
    }

    fn capacity_for(&self, sharers: u32) -> u64 {
        match sharers {
            0 => 0,
            n => (self.capacity / u64::from(n)).max(TOKEN.min(self.capacity)),
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&self, now: Instant) -> bool {
        self.take(now).is_ok()
    }

    /// Takes one token, or says how long until there is one (a day at
    /// most: a bucket that never refills says a day).
    pub fn take(&self, now: Instant) -> Result<(), Duration> {
        const NEVER: Duration = Duration::from_secs(86_400);
        let sharers = self.sharers.load(Ordering::Acquire);
        if sharers == 0 {
            return Err(NEVER);
        }
        let capacity = self.capacity_for(sharers);
        let mut state = lock(&self.state);
        let (level, last) = &mut *state;
        *level = Self::filled(*level, *last, now, self.rate, sharers, capacity);
        *last = Some(last.map_or(now, |l| l.max(now)));
        if *level >= TOKEN {
            *level -= TOKEN;
            return Ok(());
        }
        if self.rate == 0 || capacity < TOKEN {
            return Err(NEVER);
        }
        // `rate / sharers` units per nanosecond: the missing units take
        // `missing * sharers / rate` nanoseconds.
        let missing = u128::from(TOKEN - *level);
        let nanos = (missing * u128::from(sharers)).div_ceil(u128::from(self.rate));
        Err(Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)).min(NEVER))
    }

    /// Puts back a token taken for a request that another limit then
    /// refused, so that the refusal costs this bucket nothing.
    pub fn give_back(&self) {
        let capacity = self.capacity_for(self.sharers.load(Ordering::Acquire));
        let mut state = lock(&self.state);
        state.0 = (state.0 + TOKEN).min(capacity);
    }

    /// Whether the bucket is full at `now`: it has not been drawn on for
    /// as long as a refill takes, and forgetting it loses nothing (a new
    /// bucket starts full).
    pub fn is_full(&self, now: Instant) -> bool {
        let sharers = self.sharers.load(Ordering::Acquire);
        let capacity = self.capacity_for(sharers);
        let state = lock(&self.state);
        Self::filled(state.0, state.1, now, self.rate, sharers.max(1), capacity) >= capacity
    }

    /// The level at `now`, refilled since `last`.
    fn filled(
        level: u64,
        last: Option<Instant>,
        now: Instant,
        rate: u64,
        sharers: u32,
        capacity: u64,
    ) -> u64 {
        let Some(last) = last else {
            return level;
        };
        // Each nanosecond adds `rate / sharers` units; a token is TOKEN
        // units.
        let refill =
            now.saturating_duration_since(last).as_nanos() * u128::from(rate) / u128::from(sharers);
        let filled = (u128::from(level) + refill).min(u128::from(capacity));
        u64::try_from(filled).unwrap_or(capacity)
    }
}

/// The target's own back-off (a `Retry-After` it sent): until when this
/// proxy sends it nothing, and how many calls wait for that. One per
/// destination, shared by every connection of the proxy.
#[derive(Debug)]
pub struct Hold {
    max_wait: Duration,
    max_queued: u32,
    max_back_off: Duration,
    until: Mutex<Option<Instant>>,
    waiting: AtomicU32,
}

/// What a call arriving during a back-off does.
#[derive(Debug)]
pub enum Admit {
    /// No back-off in force: go.
    Go,
    /// Wait until the instant, holding the place (let go when dropped).
    Wait(Instant, Place),
    /// Answer 429 now: the back-off has this long to run, longer than the
    /// call may wait, or the queue is full.
    Refuse(Duration),
}

/// A call's place among those waiting; given back when dropped, so a
/// call whose caller leaves while it waits frees its place.
#[derive(Debug)]
pub struct Place(Arc<Hold>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Hold {
    pub fn new(max_wait: Duration, max_queued: u32, max_back_off: Duration) -> Self {
        Self {
            max_wait,
            max_queued,
            max_back_off,
            until: Mutex::new(None),
            waiting: AtomicU32::new(0),
        }
    }

    /// When the back-off in force at `now` ends, if one is.
    pub fn until(&self, now: Instant) -> Option<Instant> {
        lock(&self.until).filter(|until| *until > now)
    }

    /// The latest a call arriving at `now` may leave, given its own
    /// deadline.
    pub fn latest(&self, now: Instant, deadline: Option<Instant>) -> Instant {
        let wait_bound = now + self.max_wait;
        deadline.map_or(wait_bound, |d| d.min(wait_bound))
    }

    /// Whether a call arriving at `now` with `deadline` would be refused
    /// for the back-off's length alone.
    pub fn would_refuse(&self, now: Instant, deadline: Option<Instant>) -> bool {
        self.until(now)
            .is_some_and(|until| until > self.latest(now, deadline))
    }

    /// Takes over the back-off of the hold this one replaces (the same
    /// destination under a changed policy): a config reload must not
    /// open the window the target asked for.
    pub fn inherit(&self, old: &Hold) {
        let old_until = *lock(&old.until);
        if let Some(until) = old_until {
            let until = until.min(Instant::now() + self.max_back_off);
            let mut current = lock(&self.until);
            if current.is_none_or(|c| c < until) {
                *current = Some(until);
            }
        }
    }

    /// A call arriving at `now` that must leave by `latest`.
    pub fn admit(self: &Arc<Self>, now: Instant, latest: Instant) -> Admit {
        let Some(until) = self.until(now) else {
            return Admit::Go;
        };
        let left = until - now;
        if until > latest {
            return Admit::Refuse(left);
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.max_queued {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Admit::Refuse(left);
        }
        Admit::Wait(until, Place(self.clone()))
    }

    /// The target asked for `delay` from `now` (cut to the longest
    /// honoured); a back-off already running longer is kept. Whether this
    /// began or extended one.
    pub fn back_off(&self, now: Instant, delay: Duration) -> bool {
        let delay = delay.min(self.max_back_off);
        if delay.is_zero() {
            return false;
        }
        let until = now + delay;
        let mut current = lock(&self.until);
        let longer = current.is_none_or(|c| c < until);
        if longer {
            *current = Some(until);
        }
        longer
    }

    /// Calls waiting now.
    pub fn waiting(&self) -> u32 {
        self.waiting.load(Ordering::Relaxed)
    }
}

/// The RTT a failed request (connect error, reset, timeout, 5xx) counts
/// as, at least: it must make its endpoint look expensive, never cheap. A
/// refused connection takes ~0.1 ms, faster than any real answer; recorded
/// as it is, it made a dead endpoint the cheapest and P2C sent it nearly
/// every first try. One second is over 30 times the default RTT and slower
/// than any healthy endpoint worth preferring, so a failing endpoint loses
/// every P2C comparison against a working one until its estimate has
/// decayed (time constant: the EWMA decay), or until the working ones are
/// loaded enough to cost more, and then it is tried again. A fixed floor
/// rather than a multiple of the current estimate: a multiple of a
/// fast-failing endpoint's 0.1 ms would still be cheap.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// Peak-EWMA load estimate of one endpoint (as in Finagle/linkerd2-proxy):
/// the cost is the decayed peak RTT times (pending + 1). A new endpoint
/// starts with a default RTT.
///
/// Responses update the estimate as tower's `PeakEwma` does: a slower RTT
/// replaces it at once, a faster one is blended in with weight
/// `1 - e^(-elapsed/decay)`. A failure counts as a peak of at least
/// [`FAILURE_PENALTY`] and never lowers the estimate. Between responses the
/// estimate drifts back toward the default RTT (tower drifts toward zero):
/// an endpoint that was slow or failing once is eventually tried again,
/// and an idle endpoint is never free, so its pending count still counts.
#[derive(Debug)]
pub struct PeakEwma {
    default_rtt: f64,
    decay: f64,
    pending: AtomicUsize,
    /// RTT estimate in seconds and when it was last updated (None: no
    /// response yet, the estimate is the default).
    estimate: Mutex<(f64, Option<Instant>)>,
}

impl PeakEwma {
    /// `decay` is the time constant of the moving average.
    pub fn new(default_rtt: Duration, decay: Duration) -> Self {
        let default_rtt = default_rtt.as_secs_f64();
        Self {
            default_rtt,
            // Zero would make the weight 0/0; the smallest positive is "no memory".
            decay: decay.as_secs_f64().max(f64::MIN_POSITIVE),
            pending: AtomicUsize::new(0),
            estimate: Mutex::new((default_rtt, None)),
        }
    }

    /// Weight of the old estimate after `elapsed` without a response.
    fn memory(&self, since: Option<Instant>, now: Instant) -> f64 {
        since.map_or(1.0, |at| {
            (-now.saturating_duration_since(at).as_secs_f64() / self.decay).exp()
        })
    }

    /// The RTT estimate in seconds at `now`, drifted toward the default.
    fn rtt(&self, estimate: (f64, Option<Instant>), now: Instant) -> f64 {
        let (rtt, at) = estimate;
        self.default_rtt + (rtt - self.default_rtt) * self.memory(at, now)
    }

    /// Estimated RTT in seconds times (pending + 1); lower is better.
    pub fn cost(&self, now: Instant) -> f64 {
        let rtt = self.rtt(*lock(&self.estimate), now);
        let pending = self.pending.load(Ordering::Relaxed);
        rtt * (pending as f64 + 1.0)
    }

    /// Call when a request starts; the guard records the RTT when
    /// `.complete(now)` is called (a failure penalty on `.fail(now)`), and
    /// decrements pending when dropped.
    pub fn start(self: &Arc<Self>, now: Instant) -> PendingRequest {
        self.pending.fetch_add(1, Ordering::Relaxed);
        PendingRequest {
            endpoint: Arc::clone(self),
            started: now,
        }
    }

    fn observe(&self, rtt: Duration, now: Instant) {
        let rtt = rtt.as_secs_f64();
        let mut estimate = lock(&self.estimate);
        let (old, at) = *estimate;
        let next = if at.is_none() || rtt > old {
            // The default was a guess: the first real RTT replaces it.
            rtt
        } else {
            let memory = self.memory(at, now);
            old * memory + rtt * (1.0 - memory)
        };
        *estimate = (next, Some(now));
    }

    /// A failure: a peak of at least [`FAILURE_PENALTY`], taken at once,
    /// and never below what the estimate is now (a fast failure of a slow
    /// endpoint must not make it look faster).
    fn observe_failure(&self, elapsed: Duration, now: Instant) {
        let mut estimate = lock(&self.estimate);
        let current = self.rtt(*estimate, now);
        let penalty = elapsed.max(FAILURE_PENALTY).as_secs_f64().max(current);
        *estimate = (penalty, Some(now));
    }
}

/// One request in flight to an endpoint; counts as pending until dropped.
#[derive(Debug)]
pub struct PendingRequest {
    endpoint: Arc<PeakEwma>,
    started: Instant,
}

impl PendingRequest {
    /// The request goes now, not when it was counted pending: its RTT
    /// runs from here.
    pub fn restart(&mut self, now: Instant) {
        self.started = now;
    }

    /// A good response arrived: record its RTT. A request dropped without
    /// `complete` or `fail` (the client cancelled) leaves the estimate
    /// alone.
    pub fn complete(self, now: Instant) {
        self.endpoint
            .observe(now.saturating_duration_since(self.started), now);
    }

    /// The request failed (no connection, a reset, a timeout, a 5xx):
    /// record a penalty, at least [`FAILURE_PENALTY`] and at least as long
    /// as it took, so the endpoint looks expensive rather than fast.
    pub fn fail(self, now: Instant) {
        self.endpoint
            .observe_failure(now.saturating_duration_since(self.started), now);
    }
}

impl Drop for PendingRequest {
    fn drop(&mut self) {
        self.endpoint.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Power-of-two-choices: among the candidate indices (the endpoints whose
/// breaker admits), pick two at random and return the one with the lower
/// cost; with one candidate return it; with none return None.
///
/// Two random choices avoid both the herd that "always the cheapest" sends
/// to one endpoint and the blindness of a single random choice. A NaN cost
/// counts as the most expensive.
pub fn p2c_pick(costs: &[(usize, f64)], rng: &mut fastrand::Rng) -> Option<usize> {
    match costs {
        [] => None,
        [(only, _)] => Some(*only),
        _ => {
            let (a, b) = draw_two(costs.len(), rng);
            Some(if p2c_cost(costs[b].1) < p2c_cost(costs[a].1) {
                costs[b].0
            } else {
                costs[a].0
            })
        }
    }
}

/// Two distinct indices below `n` (at least 2), at random: the second is
/// drawn from the others.
pub fn draw_two(n: usize, rng: &mut fastrand::Rng) -> (usize, usize) {
    let a = rng.usize(..n);
    let mut b = rng.usize(..n - 1);
    if b >= a {
        b += 1;
    }
    (a, b)
}

/// A latency estimate as P2C weighs it: NaN counts as the worst.
pub fn p2c_cost(cost: f64) -> f64 {
    if cost.is_nan() { f64::INFINITY } else { cost }
}

/// Full-jitter exponential backoff: a random duration in
/// [0, min(max, base * 2^attempt)]. Full jitter spreads the retries of
/// requests that failed together, so they do not return together.
pub fn backoff(attempt: u32, base: Duration, max: Duration, rng: &mut fastrand::Rng) -> Duration {
    let ceiling = match 1u32.checked_shl(attempt) {
        Some(factor) => base.saturating_mul(factor).min(max),
        None => max,
    };
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.u64(..=nanos))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A back-off holds calls that can wait for it, refuses those that
    /// cannot (too long, or past their deadline) and those beyond the
    /// queue, and gives a place back when a waiting call is dropped.
    #[test]
    fn a_back_off_holds_what_can_wait_and_refuses_the_rest() {
        let t0 = Instant::now();
        let hold = Arc::new(Hold::new(
            Duration::from_secs(3),
            2,
            Duration::from_secs(60),
        ));
        assert!(matches!(hold.admit(t0, hold.latest(t0, None)), Admit::Go));
        assert!(hold.back_off(t0, Duration::from_secs(2)));
        assert_eq!(hold.until(t0), Some(t0 + Duration::from_secs(2)));
        let latest = hold.latest(t0, None);
        let (Admit::Wait(until, first), Admit::Wait(_, second)) =
            (hold.admit(t0, latest), hold.admit(t0, latest))
        else {
            panic!("two places in the queue");
        };
        assert_eq!(until, t0 + Duration::from_secs(2));
        assert!(
            matches!(hold.admit(t0, latest), Admit::Refuse(left) if left == Duration::from_secs(2)),
            "the queue is full"
        );
        drop(first);
        assert_eq!(hold.waiting(), 1);
        // Its own deadline comes before the back-off ends: refused at once.
        let soon = hold.latest(t0, Some(t0 + Duration::from_secs(1)));
        assert!(matches!(hold.admit(t0, soon), Admit::Refuse(_)));
        drop(second);
        assert_eq!(hold.waiting(), 0);
        // A shorter back-off does not cut the one in force; a longer one
        // extends it, up to the longest honoured.
        assert!(!hold.back_off(t0, Duration::from_secs(1)));
        assert_eq!(hold.until(t0), Some(t0 + Duration::from_secs(2)));
        assert!(hold.back_off(t0, Duration::from_secs(3600)));
        assert_eq!(hold.until(t0), Some(t0 + Duration::from_secs(60)));
        // Longer than the call may wait: refused with what is left.
        assert!(
            matches!(hold.admit(t0, latest), Admit::Refuse(left) if left == Duration::from_secs(60))
        );
        // A hold made anew for the same destination keeps the window.
        let next = Hold::new(Duration::from_secs(3), 2, Duration::from_secs(60));
        next.inherit(&hold);
        assert!(next.until(t0).is_some());
        assert!(
            next.would_refuse(t0, None),
            "60 s left, 3 s of waiting allowed"
        );
        assert!(!next.back_off(t0, Duration::ZERO), "no back-off asked");
        // Over: calls go.
        let later = t0 + Duration::from_secs(61);
        assert_eq!(hold.until(later), None);
        assert!(matches!(
            hold.admit(later, hold.latest(later, None)),
            Admit::Go
        ));
    }

    const MS: Duration = Duration::from_millis(1);
    const SEC: Duration = Duration::from_secs(1);

    fn shared<T: Send + Sync>() {}
    const _: [fn(); 6] = [
        shared::<RetryBudget>,
        shared::<CircuitBreaker>,
        shared::<BreakerPermit>,
        shared::<TokenBucket>,
        shared::<PeakEwma>,
        shared::<PendingRequest>,
    ];

    fn withdrawals(budget: &RetryBudget, now: Instant) -> usize {
        (0..100_000)
            .take_while(|_| budget.try_withdraw(now))
            .count()
    }

    #[test]
    fn budget_allows_the_floor_with_no_traffic() {
        let budget = RetryBudget::new(20, 10, 10 * SEC);
        assert_eq!(withdrawals(&budget, Instant::now()), 100);
    }

    #[test]
    fn budget_allows_percent_of_traffic_then_recovers_after_the_window() {
        let t0 = Instant::now();
        let budget = RetryBudget::new(20, 1, 10 * SEC);
        for _ in 0..1000 {
            budget.record_request(t0);
        }
        assert_eq!(withdrawals(&budget, t0), 200);
        assert!(!budget.try_withdraw(t0 + 9 * SEC));
        // Both the deposits and the retries have expired: only the floor.
        assert_eq!(withdrawals(&budget, t0 + 10 * SEC), 10);
    }

    fn breaker(consecutive_failures: u32) -> CircuitBreaker {
        CircuitBreaker::new(BreakerSettings {
            consecutive_failures,
            failure_rate: None,
            open: 5 * SEC,
            max_open: 12 * SEC,
        })
    }

    /// Sends one admitted request per letter: `F` fails, anything else succeeds.
    fn run(b: &CircuitBreaker, now: Instant, outcomes: &str) {
        for outcome in outcomes.chars() {
            let permit = b.try_acquire(now).expect("admitted");
            if outcome == 'F' {
                permit.failure(now);
            } else {
                permit.success(now);
            }
        }
    }

    #[test]
    fn breaker_opens_after_consecutive_failures_and_not_before() {
        let (t0, b) = (Instant::now(), breaker(3));
        run(&b, t0, "FF");
        assert_eq!(b.state(t0), BreakerState::Closed);
        run(&b, t0, "F");
        assert_eq!(b.state(t0), BreakerState::Open);
        assert!(!b.admits(t0) && b.try_acquire(t0).is_none());
        assert_eq!(b.trips(), 1);
    }

    #[test]
    fn breaker_success_resets_the_consecutive_count() {
        let (t0, b) = (Instant::now(), breaker(3));
        run(&b, t0, "FFSFF");
        assert_eq!(b.state(t0), BreakerState::Closed);
        run(&b, t0, "F");
        assert_eq!(b.state(t0), BreakerState::Open);
    }

    #[test]
    fn breaker_trips_on_failure_rate_once_min_requests_are_seen() {
        let t0 = Instant::now();
        let (percent, min_requests, window) = (50, 10, 10 * SEC);
        let b = CircuitBreaker::new(BreakerSettings {
            consecutive_failures: 0,
            failure_rate: Some(FailureRateSettings {
                percent,
                min_requests,
                window,
            }),
            open: 5 * SEC,
            max_open: 60 * SEC,
        });
        run(&b, t0, "FFFFFFFFF");
        assert_eq!(b.state(t0), BreakerState::Closed, "below min_requests");
        // The first failures have expired: 1 failure in 10.
        run(&b, t0 + 10 * SEC, "SSSSSSSSSF");
        run(&b, t0 + 11 * SEC, "FFFFFFF");
        assert_eq!(b.state(t0 + 11 * SEC), BreakerState::Closed, "8 of 17");
        run(&b, t0 + 11 * SEC, "F");
        assert_eq!(b.state(t0 + 11 * SEC), BreakerState::Open, "9 of 18");
    }

    #[test]
    fn breaker_rejects_until_the_period_then_admits_exactly_one_probe() {
        let (t0, b) = (Instant::now(), breaker(1));
        run(&b, t0, "F");
        assert!(b.try_acquire(t0 + 4999 * MS).is_none());
        assert_eq!(b.state(t0 + 4999 * MS), BreakerState::Open);
        let t1 = t0 + 5 * SEC;
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        assert!(b.admits(t1));
        let _probe = b.try_acquire(t1).expect("probe");
        assert!(!b.admits(t1) && b.try_acquire(t1).is_none());
    }

    #[test]
    fn probe_success_closes_and_resets_trips() {
        let (t0, b) = (Instant::now(), breaker(1));
        run(&b, t0, "F");
        run(&b, t0 + 5 * SEC, "S");
        assert_eq!(b.state(t0 + 5 * SEC), BreakerState::Closed);
        assert_eq!(b.trips(), 0);
        // The next trip starts again from the first open period.
        run(&b, t0 + 6 * SEC, "F");
        assert!(b.try_acquire(t0 + 11 * SEC).is_some());
    }

    #[test]
    fn probe_failure_doubles_the_open_period_up_to_max_open() {
        let (t0, b) = (Instant::now(), breaker(1));
        run(&b, t0, "F");
        let t1 = t0 + 5 * SEC;
        run(&b, t1, "F");
        assert!(b.try_acquire(t1 + 9999 * MS).is_none(), "open for 10s");
        let t2 = t1 + 10 * SEC;
        run(&b, t2, "F");
        assert_eq!(b.trips(), 3);
        assert!(b.try_acquire(t2 + 11999 * MS).is_none(), "capped at 12s");
        assert!(b.try_acquire(t2 + 12 * SEC).is_some());
    }

    #[test]
    fn dropped_probe_releases_the_slot_without_deciding() {
        let (t0, b) = (Instant::now(), breaker(1));
        run(&b, t0, "F");
        let t1 = t0 + 5 * SEC;
        drop(b.try_acquire(t1).expect("probe"));
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        assert_eq!(b.trips(), 1);
        assert!(b.try_acquire(t1).is_some());
    }

    /// A probe that has not answered within one open period (a long
    /// export, no timeout) gives its slot up: another request may probe,
    /// and the slow one letting go later does not free the newer slot.
    #[test]
    fn a_slow_probe_holds_the_slot_for_one_open_period_at_most() {
        let (t0, b) = (Instant::now(), breaker(1));
        run(&b, t0, "F");
        let t1 = t0 + 5 * SEC;
        let slow = b.try_acquire(t1).expect("probe");
        assert!(!b.admits(t1 + 4999 * MS) && b.try_acquire(t1 + 4999 * MS).is_none());
        let t2 = t1 + 5 * SEC;
        assert!(b.admits(t2), "the slow probe's slot has lapsed");
        let next = b.try_acquire(t2).expect("a new probe");
        drop(slow);
        assert!(!b.admits(t2), "the new probe still holds its slot");
        next.success(t2);
        assert_eq!(b.state(t2), BreakerState::Closed);
    }

    #[test]
    fn only_the_probe_decides_a_half_open_circuit() {
        let (t0, b) = (Instant::now(), breaker(1));
        let stale = b.try_acquire(t0).expect("closed");
        run(&b, t0, "F");
        let t1 = t0 + 5 * SEC;
        let probe = b.try_acquire(t1).expect("probe");
        stale.success(t1);
        assert_eq!(b.state(t1), BreakerState::HalfOpen);
        probe.success(t1);
        assert_eq!(b.state(t1), BreakerState::Closed);
    }

    #[test]
    fn token_bucket_bursts_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let bucket = TokenBucket::new(10, 5);
        let taken = |now| (0..100).take_while(|_| bucket.try_take(now)).count();
        assert_eq!(taken(t0), 5);
        assert_eq!(taken(t0 + 99 * MS), 0);
        assert_eq!(taken(t0 + 100 * MS), 1);
        assert_eq!(taken(t0 + 350 * MS), 2);
        assert_eq!(taken(t0 + 60 * SEC), 5, "refill stops at the burst");
    }

    #[test]
    fn a_shared_bucket_takes_its_share_of_rate_and_burst_and_none_admits_nothing() {
        let t0 = Instant::now();
        let bucket = TokenBucket::new(30, 30);
        bucket.share_among(3);
        let taken = |now| (0..100).take_while(|_| bucket.try_take(now)).count();
        assert_eq!(taken(t0), 10, "a third of the burst");
        assert_eq!(taken(t0 + 99 * MS), 0);
        assert_eq!(taken(t0 + 100 * MS), 1, "a third of the rate: 10/s");
        // Six sharers: what the bucket holds is cut to the new burst, and
        // it refills at 5/s.
        assert_eq!(taken(t0 + 60 * SEC), 10);
        bucket.share_among(6);
        assert_eq!(taken(t0 + 120 * SEC), 5);
        assert_eq!(taken(t0 + 120 * SEC + 199 * MS), 0);
        assert_eq!(taken(t0 + 120 * SEC + 200 * MS), 1);
        // More sharers than the burst: one request each, never none.
        bucket.share_among(100);
        assert_eq!(taken(t0 + 300 * SEC), 1);
        assert_eq!(bucket.sharers(), 100);
        // Not among the sharers: nothing.
        bucket.share_among(0);
        assert_eq!(taken(t0 + 400 * SEC), 0);
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    #[test]
    fn peak_ewma_cost_follows_pending_and_slow_responses_then_decays_back() {
        let t0 = Instant::now();
        let endpoint = Arc::new(PeakEwma::new(10 * MS, SEC));
        assert!(close(endpoint.cost(t0), 0.010));
        let (a, b) = (endpoint.start(t0), endpoint.start(t0));
        assert!(close(endpoint.cost(t0), 0.030));
        drop(a);
        b.complete(t0 + SEC);
        let slow = endpoint.cost(t0 + SEC);
        assert!(close(slow, 1.0), "peak taken at once: {slow}");
        let later = endpoint.cost(t0 + 2 * SEC);
        assert!(later < slow && later > 0.010, "{later}");
        assert!(close(endpoint.cost(t0 + 60 * SEC), 0.010));
    }

    #[test]
    fn peak_ewma_blends_faster_responses_in_gradually() {
        let t0 = Instant::now();
        let endpoint = Arc::new(PeakEwma::new(10 * MS, SEC));
        endpoint.start(t0).complete(t0 + 100 * MS);
        let t1 = t0 + 1100 * MS;
        endpoint.start(t1 - 20 * MS).complete(t1);
        // One decay period after the 100ms response, a 20ms one weighs 1 - 1/e.
        let memory = (-1f64).exp();
        assert!(close(
            endpoint.cost(t1),
            0.1 * memory + 0.02 * (1.0 - memory)
        ));
    }

    #[test]
    fn a_fast_failure_makes_an_endpoint_expensive_then_decays_back() {
        let t0 = Instant::now();
        let endpoint = Arc::new(PeakEwma::new(30 * MS, 10 * SEC));
        // A refused connection: 0.1 ms. Recorded as an RTT it would have
        // replaced the 30 ms default and made this the cheapest endpoint.
        endpoint.start(t0).fail(t0 + MS / 10);
        let failed = endpoint.cost(t0 + MS / 10);
        assert!(close(failed, FAILURE_PENALTY.as_secs_f64()), "{failed}");
        let later = endpoint.cost(t0 + 10 * SEC);
        assert!(later < failed && later > 0.030, "decays: {later}");
        assert!(
            close(endpoint.cost(t0 + 600 * SEC), 0.030),
            "and is forgotten"
        );
    }

    #[test]
    fn a_failure_never_lowers_the_estimate_and_a_slow_one_counts_in_full() {
        let t0 = Instant::now();
        let endpoint = Arc::new(PeakEwma::new(30 * MS, 10 * SEC));
        endpoint.start(t0).complete(t0 + 3 * SEC);
        let t1 = t0 + 3 * SEC + MS;
        let before = endpoint.cost(t1);
        assert!(before > 2.9, "{before}");
        endpoint.start(t0 + 3 * SEC).fail(t1);
        let after = endpoint.cost(t1);
        assert!(
            after >= before,
            "a fast failure lowered it: {before} -> {after}"
        );
        // A timeout after 5 s: at least that slow.
        endpoint.start(t0 + 4 * SEC).fail(t0 + 9 * SEC);
        assert!(close(endpoint.cost(t0 + 9 * SEC), 5.0));
    }

    /// The balancer's choice between a healthy endpoint and one that
    /// refuses connections, after the refusing one failed once: P2C must
    /// keep away from it.
    #[test]
    fn p2c_keeps_away_from_an_endpoint_that_failed_fast() {
        let t0 = Instant::now();
        let (healthy, dead) = (
            Arc::new(PeakEwma::new(30 * MS, 10 * SEC)),
            Arc::new(PeakEwma::new(30 * MS, 10 * SEC)),
        );
        let mut rng = fastrand::Rng::with_seed(3);
        let mut to_dead = 0;
        for i in 0..1000u32 {
            let now = t0 + i * MS;
            let costs = [(0, healthy.cost(now)), (1, dead.cost(now))];
            let end = now + MS / 2;
            match p2c_pick(&costs, &mut rng) {
                Some(0) => healthy.start(now).complete(end),
                _ => {
                    to_dead += 1;
                    dead.start(now).fail(now + MS / 10);
                }
            }
        }
        assert!(to_dead <= 1, "{to_dead} of 1000 went to the dead endpoint");
    }

    #[test]
    fn p2c_never_picks_the_dearer_of_two_and_handles_few_candidates() {
        let mut rng = fastrand::Rng::with_seed(7);
        assert_eq!(p2c_pick(&[], &mut rng), None);
        assert_eq!(p2c_pick(&[(4, 9.0)], &mut rng), Some(4));
        for _ in 0..1000 {
            assert_eq!(p2c_pick(&[(3, 2.0), (8, 1.0)], &mut rng), Some(8));
            let three = [(0, 1.0), (1, -f64::NAN), (2, 3.0)];
            assert_ne!(p2c_pick(&three, &mut rng), Some(1));
        }
    }

    #[test]
    fn backoff_stays_within_bounds_and_saturates() {
        let mut rng = fastrand::Rng::with_seed(1);
        let (base, max) = (25 * MS, 250 * MS);
        for attempt in 0..70 {
            let ceiling = if attempt < 4 {
                base * (1 << attempt)
            } else {
                max
            };
            for _ in 0..50 {
                assert!(backoff(attempt, base, max, &mut rng) <= ceiling);
            }
        }
        assert!(backoff(1000, base, max, &mut rng) <= max);
        // Must not panic even with no cap at all.
        backoff(u32::MAX, SEC, Duration::MAX, &mut rng);
        assert!(
            (0..200).any(|_| backoff(10, base, max, &mut rng) > max / 2),
            "jittered"
        );
    }
}
