//! Tier 3: the proxy under abuse — slow clients, too many connections,
//! idle connections — on real loopback sockets: each listener holds a
//! client to a header-read timeout, an idle timeout and a connection cap,
//! and keeps serving everyone else.

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const INVENTORY: &str = "inventory.shop.svc.cluster.local:80";

/// Polls `check` every 50 ms for at most 10 s; whether it held.
async fn eventually(mut check: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    check()
}

/// Whether the peer closes `s` within 10 s (reads nothing but EOF or an
/// error; anything it sends first is skipped).
async fn closed_by_peer(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    for _ in 0..1000 {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
    false
}

/// Many clients each send a request head one byte at a time, never
/// finishing it. While they are open a normal client is served; each of
/// them is closed once the header-read timeout passes.
#[tokio::test]
async fn a_slowloris_client_is_cut_off_and_others_are_served() {
    let up = Upstream::fixed(200, "ok").await;
    let p = start_proxy(
        &config(vec![service("inventory", &[up.addr], None, json!([]))]),
        &[INVENTORY],
        &["--header-read-timeout", "2s"],
    )
    .await;
    let addr = p.running.outbound[0];

    const SLOW: usize = 20;
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .expect("write");
        slow.push(s);
    }
    // A byte at a time from each, until the proxy closes it (at most 10 s).
    let drips: Vec<_> = slow
        .into_iter()
        .map(|mut s| {
            tokio::spawn(async move {
                for _ in 0..200 {
                    if s.write_all(b"a").await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                closed_by_peer(&mut s).await
            })
        })
        .collect();
    let limit = p.proxy.outbound_connections.clone();
    assert!(
        eventually(|| limit.open() >= SLOW).await,
        "the slow connections are open"
    );

    let reply = get(&p.outbound_url(0)).await;
    assert_eq!(reply.status, 200, "a normal client is served: {reply:?}");
    assert!(
        limit.open() >= SLOW,
        "the slow connections were still open while the normal client was served"
    );

    for d in drips {
        assert!(
            d.await.expect("drip task"),
            "a slow client is cut off after the header-read timeout"
        );
    }
    assert!(
        eventually(|| limit.open() == 0).await,
        "no connection is left"
    );
    assert_eq!(get(&p.outbound_url(0)).await.status, 200);
}

/// Past the cap a new connection is closed at once and counted; once the
/// others go, clients are served again.
#[tokio::test]
async fn past_the_connection_cap_new_connections_are_closed_and_counted() {
    let up = Upstream::fixed(200, "ok").await;
    let p = start_proxy(
        &config(vec![service("inventory", &[up.addr], None, json!([]))]),
        &[INVENTORY],
        &["--outbound-max-connections", "3"],
    )
    .await;
    let addr = p.running.outbound[0];
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\n").await.expect("write");
        held.push(s);
    }
    let limit = p.proxy.outbound_connections.clone();
    assert!(eventually(|| limit.open() == 3).await, "three are open");

    let mut over = TcpStream::connect(addr).await.expect("connect");
    assert!(
        closed_by_peer(&mut over).await,
        "the fourth is closed at once"
    );
    assert_eq!(
        p.metric("weft_proxy_connections_over_limit_total{listener=\"outbound\"}")
            .await,
        1.0
    );

    drop(held);
    assert!(eventually(|| limit.open() == 0).await, "the three went");
    assert_eq!(get(&p.outbound_url(0)).await.status, 200);
}

/// Sends one request on a fresh HTTP/1.1 or HTTP/2 connection to the
/// proxy's outbound listener, then waits (at most 10 s) for the proxy to
/// close the connection; whether it did.
async fn closed_after_one_request(http2: bool, extra: &[&str]) -> bool {
    let up = Upstream::fixed(200, "ok").await;
    let p = start_proxy(
        &config(vec![service("inventory", &[up.addr], None, json!([]))]),
        &[INVENTORY],
        extra,
    )
    .await;
    let tcp = TcpStream::connect(p.running.outbound[0])
        .await
        .expect("connect");
    let req = http::Request::get("http://inventory/")
        .header("host", "inventory")
        .body(Empty::<Bytes>::new())
        .expect("request");
    // The request senders are kept: a client connection whose senders are
    // all gone closes itself.
    let (rsp, conn, _sender): (_, _, Box<dyn std::any::Any + Send>) = if http2 {
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("handshake");
        let conn = tokio::spawn(conn);
        (send.send_request(req).await, conn, Box::new(send))
    } else {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .expect("handshake");
        let conn = tokio::spawn(conn);
        (send.send_request(req).await, conn, Box::new(send))
    };
    let rsp = rsp.expect("response");
    assert_eq!(rsp.status(), 200);
    rsp.into_body().collect().await.expect("body");
    let closed = tokio::time::timeout(Duration::from_secs(10), conn).await;
    matches!(closed, Ok(Ok(Ok(()))))
}

/// An HTTP/1.1 keep-alive connection that carries no request for the idle
/// timeout is closed by the proxy (the header-read timeout is long here,
/// so it is the idle timeout that closes it).
#[tokio::test]
async fn an_idle_http1_keep_alive_connection_is_closed() {
    let limits = ["--idle-timeout", "300ms", "--header-read-timeout", "60s"];
    assert!(closed_after_one_request(false, &limits).await);
}

/// The same for HTTP/2: the proxy sends GOAWAY and closes.
#[tokio::test]
async fn an_idle_http2_connection_is_closed() {
    let limits = ["--idle-timeout", "300ms", "--header-read-timeout", "60s"];
    assert!(closed_after_one_request(true, &limits).await);
}

/// The admin listener is held to the same limits: a slow client is cut
/// off, and past the cap new connections are closed, while /live answers.
#[tokio::test]
async fn a_slowloris_on_the_admin_port_is_cut_off_and_metrics_still_answer() {
    let p = start_proxy(
        &config(vec![]),
        &[],
        &[
            "--header-read-timeout",
            "1s",
            "--admin-max-connections",
            "4",
        ],
    )
    .await;
    let addr = p.running.admin;
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\n")
            .await
            .expect("write");
        slow.push(s);
    }
    let limit = p.proxy.admin_connections.clone();
    assert!(eventually(|| limit.open() == 4).await, "four are open");
    let mut over = TcpStream::connect(addr).await.expect("connect");
    assert!(
        closed_by_peer(&mut over).await,
        "past the cap a connection is closed"
    );
    for mut s in slow {
        assert!(
            closed_by_peer(&mut s).await,
            "a slow admin client is cut off"
        );
    }
    assert!(
        p.metric("weft_proxy_connections_over_limit_total{listener=\"admin\"}")
            .await
            >= 1.0
    );
}

/// One source address opens idle connections to the inbound listener, as
/// many as its whole connection cap: only its share of the cap stays open,
/// the rest are closed at once and counted, and a client from another
/// address is still served while the first holds its share. Without a
/// per-source share one slowloris pod takes every inbound slot and denies
/// every other caller until the header-read timeouts fire.
#[tokio::test]
async fn one_source_cannot_hold_the_whole_inbound_connection_cap() {
    const CAP: usize = 8;
    // A quarter of the cap (`--inbound-max-connections`), as documented.
    const SHARE: usize = CAP / 4;
    let app = Upstream::fixed(200, "ok").await;
    let cap = CAP.to_string();
    let inbound = format!("127.0.0.1:0={}", app.addr.port());
    let p = start_proxy(
        &config(vec![]),
        &[],
        &["--inbound-max-connections", &cap, "--inbound-map", &inbound],
    )
    .await;
    let addr = p.running.inbound[0];

    // From 127.0.0.1: request heads that never finish, as many as the cap.
    let mut held = Vec::new();
    for _ in 0..CAP {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let _ = s.write_all(b"GET / HTTP/1.1\r\n").await;
        held.push(s);
    }
    let limit = p.proxy.inbound_connections.clone();
    assert!(
        eventually(|| limit.open() == SHARE).await,
        "one source holds its share of the inbound cap, no more (open: {})",
        limit.open()
    );
    for s in &mut held[SHARE..] {
        assert!(
            closed_by_peer(s).await,
            "a connection past the source's share is closed at once"
        );
    }

    // From 127.0.0.2 (Linux routes all of 127/8 to lo), while 127.0.0.1
    // holds its share.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind("127.0.0.2:0".parse().expect("addr"))
        .expect("bind 127.0.0.2");
    let mut other = socket.connect(addr).await.expect("connect from 127.0.0.2");
    other
        .write_all(b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), other.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        matches!(read, Ok(Ok(_))) && answer.starts_with("HTTP/1.1 200"),
        "another source is served: {read:?} {answer:?}"
    );
    assert!(
        limit.open() >= SHARE,
        "the first source's share was held while the other was served"
    );

    assert_eq!(
        p.metric("weft_proxy_connections_over_source_share_total{listener=\"inbound\"}")
            .await,
        (CAP - SHARE) as f64,
        "each refusal is counted"
    );
    assert_eq!(
        p.metric("weft_proxy_connections_over_limit_total{listener=\"inbound\"}")
            .await,
        0.0,
        "no connection met the whole cap"
    );

    drop(held);
    assert!(
        eventually(|| limit.open() == 0 && limit.sources() == 0).await,
        "the per-source table forgets a source once its connections close"
    );
}

/// A connection on which neither the client nor the app says anything
/// (an HTTP app never speaks first) holds no inbound slot for long: past
/// the detection timeout it waits for a first word at most the idle
/// timeout, then the header-read timeout closes it. Before, it waited a
/// day, so four silent pods could hold the whole inbound cap.
#[tokio::test]
async fn a_connection_nobody_speaks_on_is_closed() {
    let app = Upstream::fixed(200, "ok").await;
    let inbound = format!("127.0.0.1:0={}", app.addr.port());
    let p = start_proxy(
        &config(vec![]),
        &[],
        &[
            "--inbound-map",
            &inbound,
            "--idle-timeout",
            "500ms",
            "--header-read-timeout",
            "500ms",
        ],
    )
    .await;
    let mut silent = TcpStream::connect(p.running.inbound[0])
        .await
        .expect("connect");
    assert!(
        closed_by_peer(&mut silent).await,
        "a connection nobody speaks on is closed"
    );
    let limit = p.proxy.inbound_connections.clone();
    assert!(eventually(|| limit.open() == 0).await, "its slot is free");
}
