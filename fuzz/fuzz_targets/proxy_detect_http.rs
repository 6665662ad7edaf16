//! Fuzzes what the proxy reads off the wire before any policy applies:
//! the TLS ClientHello reader, protocol detection on every prefix of the
//! input, then the whole input
//! served as a client's bytes by the proxy's HTTP server (HTTP/1 head
//! parsing, HTTP/2 framing) with its real limits. Neither may panic, hang
//! or answer a malformed request with a 2xx.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weft::proxy::detect::{Protocol, classify, detect};
use weft::proxy::http::body;
use weft::proxy::server::{Drain, InFlight, serve_http};

fuzz_target!(|data: &[u8]| {
    // The ClientHello reader never asks for less than it was given.
    if let weft::proxy::hello::Hello::NeedMore(n) = weft::proxy::hello::parse(data) {
        assert!(n > data.len(), "asked for {n} bytes with {} in hand", data.len());
    }

    // Detection is monotonic: once decided, longer prefixes agree.
    let mut decided = None;
    for end in 0..=data.len().min(64) {
        match (decided, classify(&data[..end])) {
            (None, d) => decided = d,
            (Some(a), Some(b)) => assert_eq!(a, b, "detection changed its mind at {end} bytes"),
            (Some(_), None) => panic!("detection forgot its decision at {end} bytes"),
        }
    }

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let drain = Drain::new();
        let in_flight = InFlight::new("inbound", "inbound-max-in-flight", 10_000, Default::default());
        let serve = async move {
            let Ok(d) = detect(server, Duration::from_millis(10)).await else { return };
            if matches!(d.protocol, Protocol::Http1 | Protocol::Http2) {
                serve_http(d.io, &drain, &in_flight, |_req| async { http::Response::new(body::full("ok")) }).await;
            }
        };
        let talk = async move {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), async { tokio::join!(serve, talk) }).await;
    });
});
