//! Deadline propagation: a request's remaining time travels with it, so
//! that every hop caps its own timeout at what its caller will still wait,
//! and a request nobody waits for any more is answered 504 at once rather
//! than worked on.
//!
//! Three headers carry it, each where its clock is good:
//!
//! - [`GRPC_TIMEOUT`], gRPC's own (relative, `1*8DIGIT` and a unit): read
//!   from any caller, and where a caller set it, rewritten to the time
//!   left of the caller's deadline on every hop, as gRPC libraries do from
//!   their context's deadline. Never added: a gRPC server enforces it for
//!   the whole call, and a hop's own timeout covers only the answer's
//!   head (a server-streaming call outlives it).
//! - [`WEFT_TIMEOUT`], between two sidecars only: the milliseconds left
//!   when the client proxy sent the try (stamped by the pool as it
//!   writes the request on a connection, after any wait for one).
//!   Relative, so two nodes' clocks never need to agree; the one-way
//!   trip (which the next hop's clock does not see) is covered by rounding
//!   down to the millisecond. A server proxy believes it only from a
//!   verified mesh peer.
//! - [`WEFT_DEADLINE`], between a sidecar and its own application: the
//!   deadline as Unix time in milliseconds. Absolute, because the
//!   application passes it on like `traceparent` (copies it from the
//!   request it serves onto the calls it makes), and the time it spends in
//!   between must count: the application and its sidecar share a clock.
//!
//! At the mesh boundary both `weft-*` headers are removed: a request
//! leaving the mesh (an unmeshed Service, a vendor) carries neither, and
//! a server proxy drops them from callers without a mesh identity.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::time::Instant;

/// gRPC's timeout header (see the gRPC over HTTP/2 protocol document).
pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
/// The time left, in whole milliseconds, from one sidecar to the next.
pub static WEFT_TIMEOUT: HeaderName = HeaderName::from_static("weft-timeout");
/// The deadline as Unix milliseconds, between a sidecar and its app.
pub static WEFT_DEADLINE: HeaderName = HeaderName::from_static("weft-deadline");

/// Whether a request is gRPC (`application/grpc`, `application/grpc+proto`…).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Who sent a request, which decides whose deadline headers count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum From {
    /// This pod's own application (the outbound side): its
    /// [`WEFT_DEADLINE`] is on this pod's clock.
    App,
    /// A sidecar whose mesh identity this proxy verified.
    MeshPeer,
    /// Anything else: only gRPC's own header counts.
    Outside,
}

/// Where a request goes, which decides what it carries of its deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum To {
    /// Another sidecar, over mesh TLS.
    MeshPeer,
    /// This pod's own application.
    App,
    /// Out of the mesh: an unmeshed Service, a pod without a sidecar, a
    /// vendor.
    Outside,
}

/// The deadline a request's caller set, read from (and the `weft-*`
/// headers removed from) its headers: the earliest that `from` may set.
/// A header that does not parse is ignored, as if absent: a deadline can
/// only shorten a call, never fail it.
pub fn take(
    headers: &mut HeaderMap,
    from: From,
    now: Instant,
    wall: SystemTime,
) -> Option<Instant> {
    let timeout = headers.remove(&WEFT_TIMEOUT);
    let deadline = headers.remove(&WEFT_DEADLINE);
    let mut earliest = headers
        .get(&GRPC_TIMEOUT)
        .and_then(|v| parse_grpc_timeout(v.as_bytes()))
        .and_then(|d| now.checked_add(d));
    let mut keep = |at: Option<Instant>| {
        if let Some(at) = at {
            earliest = Some(earliest.map_or(at, |e| e.min(at)));
        }
    };
    match from {
        From::App => keep(
            deadline
                .as_ref()
                .and_then(|v| parse_millis(v.as_bytes()))
                .and_then(|unix_ms| on_this_clock(unix_ms, now, wall)),
        ),
        From::MeshPeer => keep(
            timeout
                .as_ref()
                .and_then(|v| parse_millis(v.as_bytes()))
                .and_then(|ms| now.checked_add(Duration::from_millis(ms))),
        ),
        From::Outside => {}
    }
    earliest
}

/// The part of a request's deadline that is its caller's (propagated to
/// this hop), as opposed to this hop's own timeout: a try cut off by it
/// says nothing about the endpoint (the caller stopped waiting), and only
/// it goes on in `grpc-timeout` (a gRPC server enforces that for the whole
/// call, where a hop's own timeout covers the answer's head only).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallersDeadline(pub Instant);

/// Writes what `to` should learn of a request's deadlines into its
/// headers, as of `now`: `until`, the earliest (the try's, this hop's own
/// timeouts included), in the `weft-*` header `to` reads; `callers`, the
/// caller's alone, in a `grpc-timeout` the caller set (rewritten to the
/// time left; never added, and left as the client proxy wrote it for an
/// application). Without `until`, nothing is written.
pub fn stamp(
    headers: &mut HeaderMap,
    until: Option<Instant>,
    callers: Option<Instant>,
    to: To,
    now: Instant,
    wall: SystemTime,
) {
    let Some(at) = until else { return };
    let left = at.saturating_duration_since(now);
    if to != To::App
        && let Some(callers) = callers
        && headers.contains_key(&GRPC_TIMEOUT)
    {
        let callers_left = callers.saturating_duration_since(now);
        headers.insert(GRPC_TIMEOUT.clone(), grpc_timeout(callers_left));
    }
    match to {
        To::MeshPeer => {
            // Whole milliseconds, rounded down: the next hop starts its
            // clock on arrival (late by the one-way trip, tens of
            // microseconds in a cluster), and the rounding takes up to a
            // millisecond off, so it gives up no later than this one.
            let ms = u64::try_from(left.as_millis()).unwrap_or(u64::MAX);
            headers.insert(WEFT_TIMEOUT.clone(), HeaderValue::from(ms));
        }
        To::App => {
            let unix = wall
                .checked_add(left)
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            if let Some(ms) = unix {
                headers.insert(WEFT_DEADLINE.clone(), HeaderValue::from(ms));
            }
        }
        To::Outside => {}
    }
}

/// Removes the `weft-*` deadline headers: what a listener that does not
/// read them (the probe port) does, so that none reaches an application
/// unless a proxy wrote it.
pub fn strip(headers: &mut HeaderMap) {
    headers.remove(&WEFT_TIMEOUT);
    headers.remove(&WEFT_DEADLINE);
}

/// Unix milliseconds as an instant on this process's monotonic clock
/// (`now` and `wall` read together); `None` if it does not fit.
fn on_this_clock(unix_ms: u64, now: Instant, wall: SystemTime) -> Option<Instant> {
    let at = UNIX_EPOCH.checked_add(Duration::from_millis(unix_ms))?;
    match at.duration_since(wall) {
        Ok(ahead) => now.checked_add(ahead),
        // Already past: as far back as the clock allows, which is enough
        // for "expired".
        Err(behind) => Some(now.checked_sub(behind.duration()).unwrap_or(now)),
    }
}

/// A non-negative decimal integer of at most 19 digits.
fn parse_millis(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// gRPC's `TimeoutValue TimeoutUnit`: at most 8 digits, then one of
/// `H M S m u n`.
pub fn parse_grpc_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A duration as gRPC writes it: the finest unit whose count, rounded up,
/// fits in 8 digits (as grpc-go's `encodeTimeout`).
pub fn grpc_timeout(left: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let nanos = left.as_nanos();
    let units: [(u128, &str); 6] = [
        (1, "n"),
        (1_000, "u"),
        (1_000_000, "m"),
        (1_000_000_000, "S"),
        (60_000_000_000, "M"),
        (3_600_000_000_000, "H"),
    ];
    for (per, unit) in units {
        let n = nanos.div_ceil(per);
        if n <= MAX {
            return HeaderValue::from_str(&format!("{n}{unit}")).expect("digits and a letter");
        }
    }
    HeaderValue::from_static("99999999H")
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn headers(pairs: &[(&HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.insert(
                (*name).clone(),
                HeaderValue::from_str(value).expect("value"),
            );
        }
        h
    }

    fn unix_ms(t: SystemTime) -> u64 {
        t.duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_millis() as u64
    }

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_refuse_the_malformed() {
        for (text, want) in [
            ("1H", Duration::from_secs(3600)),
            ("2M", Duration::from_secs(120)),
            ("3S", Duration::from_secs(3)),
            ("300m", 300 * MS),
            ("250u", Duration::from_micros(250)),
            ("99999999n", Duration::from_nanos(99_999_999)),
            ("0m", Duration::ZERO),
        ] {
            assert_eq!(parse_grpc_timeout(text.as_bytes()), Some(want), "{text}");
        }
        for bad in ["", "m", "300", "300x", "123456789m", "-1m", "1.5S", " 1S"] {
            assert_eq!(parse_grpc_timeout(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn grpc_timeouts_are_written_in_the_finest_unit_that_fits_rounded_up() {
        for (left, want) in [
            (Duration::ZERO, "0n"),
            (Duration::from_nanos(1500), "1500n"),
            (300 * MS, "300000u"),
            (Duration::from_secs(30), "30000000u"),
            (Duration::from_secs(300), "300000m"),
            (Duration::from_nanos(99_999_999_001), "100000m"),
            (Duration::from_secs(86_400 * 365), "31536000S"),
            (Duration::from_secs(100_000_000), "1666667M"),
        ] {
            let v = grpc_timeout(left);
            assert_eq!(v, want, "{left:?}");
            let back = parse_grpc_timeout(v.as_bytes()).expect("parses back");
            assert!(
                back >= left,
                "{left:?} came back as {back:?}: a hop lost time"
            );
        }
    }

    /// Each caller's headers count only where its clock and its word are
    /// good, and the `weft-*` ones never go further than this hop.
    #[test]
    fn each_caller_sets_a_deadline_only_with_the_headers_it_may_use() {
        let (now, wall) = (Instant::now(), SystemTime::now());
        let in_200ms = unix_ms(wall + 200 * MS).to_string();
        let all = |grpc: &str| {
            headers(&[
                (&WEFT_DEADLINE, in_200ms.as_str()),
                (&WEFT_TIMEOUT, "100"),
                (&GRPC_TIMEOUT, grpc),
            ])
        };
        let near = |got: Option<Instant>, want: Duration| {
            let got = got.expect("a deadline").duration_since(now);
            assert!(got.abs_diff(want) <= 2 * MS, "{got:?} for {want:?}");
        };
        // The app: its absolute deadline (its own clock), not the proxy
        // marker; the earlier of that and gRPC's.
        let mut h = all("5S");
        near(take(&mut h, From::App, now, wall), 200 * MS);
        assert!(!h.contains_key(&WEFT_DEADLINE) && !h.contains_key(&WEFT_TIMEOUT));
        let mut h = all("50m");
        near(take(&mut h, From::App, now, wall), 50 * MS);
        // A verified sidecar: the relative marker, never an absolute
        // time from another node's clock.
        let mut h = all("5S");
        near(take(&mut h, From::MeshPeer, now, wall), 100 * MS);
        // Outside the mesh: gRPC's own header only.
        let mut h = all("5S");
        near(
            take(&mut h, From::Outside, now, wall),
            Duration::from_secs(5),
        );
        assert!(!h.contains_key(&WEFT_DEADLINE) && !h.contains_key(&WEFT_TIMEOUT));
        assert_eq!(
            take(
                &mut headers(&[(&WEFT_TIMEOUT, "100")]),
                From::Outside,
                now,
                wall
            ),
            None
        );
        // Garbage is no deadline, not a failed call.
        for bad in ["soon", "-5", "1e3", ""] {
            let mut h = headers(&[(&WEFT_DEADLINE, bad), (&WEFT_TIMEOUT, bad)]);
            assert_eq!(take(&mut h, From::App, now, wall), None, "{bad:?}");
            assert_eq!(take(&mut h, From::MeshPeer, now, wall), None, "{bad:?}");
        }
        // A deadline already past reads as past.
        let past = unix_ms(wall - Duration::from_secs(1)).to_string();
        let mut h = headers(&[(&WEFT_DEADLINE, past.as_str())]);
        let at = take(&mut h, From::App, now, wall).expect("a deadline");
        assert!(at < now);
    }

    #[test]
    fn each_hop_learns_the_time_left_in_its_own_form() {
        let (now, wall) = (Instant::now(), SystemTime::now());
        // The hop's own timeout (250 ms) is earlier than the caller's
        // (1 s, which the caller's gRPC header said).
        let (at, callers) = (Some(now + 250 * MS), Some(now + 1000 * MS));
        let grpc = || {
            headers(&[
                (&http::header::CONTENT_TYPE, "application/grpc"),
                (&GRPC_TIMEOUT, "5S"),
            ])
        };
        let mut h = grpc();
        stamp(&mut h, at, callers, To::MeshPeer, now, wall);
        assert_eq!(h[&WEFT_TIMEOUT], "250");
        assert_eq!(
            h[&GRPC_TIMEOUT], "1000000u",
            "the caller's, not the hop's own"
        );
        assert!(!h.contains_key(&WEFT_DEADLINE));
        // The app: the deadline of the answer; gRPC's header as it came.
        let mut h = grpc();
        stamp(&mut h, at, callers, To::App, now, wall);
        let told = unix_ms(wall + 250 * MS).to_string();
        assert_eq!(h[&WEFT_DEADLINE], told.as_str());
        assert_eq!(h[&GRPC_TIMEOUT], "5S");
        assert!(!h.contains_key(&WEFT_TIMEOUT));
        // Out of the mesh: gRPC's header only.
        let mut h = grpc();
        stamp(&mut h, at, callers, To::Outside, now, wall);
        assert_eq!(h.len(), 2, "{h:?}");
        assert_eq!(h[&GRPC_TIMEOUT], "1000000u");
        let mut h = HeaderMap::new();
        stamp(&mut h, at, callers, To::Outside, now, wall);
        assert!(h.is_empty(), "{h:?}");
        // A gRPC call that set no deadline gets none added (a stream may
        // outlive the hop's own timeout).
        let mut h = headers(&[(&http::header::CONTENT_TYPE, "application/grpc")]);
        stamp(&mut h, at, None, To::MeshPeer, now, wall);
        assert!(!h.contains_key(&GRPC_TIMEOUT));
        assert_eq!(h[&WEFT_TIMEOUT], "250");
        // No deadline, nothing written.
        let mut h = grpc();
        stamp(&mut h, None, None, To::MeshPeer, now, wall);
        assert_eq!(h.len(), 2);
        assert_eq!(h[&GRPC_TIMEOUT], "5S");
        // Round trip: what the app is told, the app's proxy reads back.
        let mut h = HeaderMap::new();
        stamp(&mut h, at, None, To::App, now, wall);
        let back = take(&mut h, From::App, now, wall).expect("read back");
        assert!(back.duration_since(now).abs_diff(250 * MS) <= MS);
    }
}
