//! Tier 3: how the proxy talks to upstream servers — which HTTP version it
//! speaks (the Service port's declared protocol, else the client's), the
//! authority the server sees, and connection reuse per endpoint. Real
//! sockets on loopback: a real upstream, the real proxy, a real client.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::Version;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

use support::*;

/// An upstream that answers every request with `<version> <authority>`
/// (the authority from `:authority` for HTTP/2, Host for HTTP/1.1), and
/// ` te=<value>` when a TE header reached it, and
/// counts the connections it accepted. With `close_after_response` it
/// closes each connection right after its first response, without saying
/// so (no `Connection: close`): a keep-alive connection that a server
/// dropped.
struct Echo {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Echo {
    async fn start(close_after_response: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (r, c) = (requests.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    if close_after_response {
                        return serve_one_and_close(stream, &r).await;
                    }
                    let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                        r.fetch_add(1, Ordering::SeqCst);
                        let authority = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .or_else(|| {
                                req.headers()
                                    .get(http::header::HOST)
                                    .and_then(|h| h.to_str().ok())
                                    .map(str::to_owned)
                            })
                            .unwrap_or_default();
                        let te = req
                            .headers()
                            .get(http::header::TE)
                            .map(|v| format!(" te={}", v.to_str().unwrap_or("?")))
                            .unwrap_or_default();
                        let body = format!("{:?} {authority}{te}", req.version());
                        async move {
                            let _ = req.into_body().collect().await;
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Self {
            addr,
            requests,
            connections,
            task,
        }
    }
}

/// Reads one HTTP/1.1 request (head and a Content-Length body), answers
/// 200 as if the connection stayed open, and closes it.
async fn serve_one_and_close(mut stream: TcpStream, requests: &AtomicUsize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    requests.fetch_add(1, Ordering::SeqCst);
    let _ = stream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await;
    // Dropping the stream closes the connection.
}

/// A Service `name.shop` on port 80 declaring `protocol` for that port.
fn declared(name: &str, endpoint: SocketAddr, protocol: &str) -> Value {
    let mut svc = service(name, &[endpoint], None, json!([]));
    svc["ports"][0]["protocol"] = json!(protocol);
    svc
}

/// One request over a fresh client connection to `proxy_addr`, in
/// `version`, for `http://<host>/`, with extra headers. Returns the
/// status and the body.
async fn request(
    proxy_addr: &str,
    version: Version,
    host: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let addr = proxy_addr.trim_start_matches("http://");
    let stream = TcpStream::connect(addr).await.expect("connect to proxy");
    let mut req = http::Request::builder()
        .method("GET")
        .uri(format!("http://{host}/"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let rsp = if version == Version::HTTP_2 {
        let (mut tx, conn) = hyper::client::conn::http2::handshake::<_, _, Full<Bytes>>(
            TokioExecutor::new(),
            TokioIo::new(stream),
        )
        .await
        .expect("h2 handshake");
        tokio::spawn(conn);
        let req = req.body(Full::new(Bytes::new())).expect("request");
        tx.send_request(req).await.expect("h2 response")
    } else {
        let (mut tx, conn) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                .await
                .expect("h1 handshake");
        tokio::spawn(conn);
        let req = req
            .uri("/")
            .header(http::header::HOST, host)
            .body(Full::new(Bytes::new()))
            .expect("request");
        tx.send_request(req).await.expect("h1 response")
    };
    let status = rsp.status().as_u16();
    let body = rsp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_declared_port_protocol_decides_what_the_upstream_hears() {
    let echo = Echo::start(false).await;
    let cfg = config(vec![
        declared("detected", echo.addr, "detect"),
        declared("legacy", echo.addr, "http1"),
        declared("grpcish", echo.addr, "http2"),
    ]);
    let hosts = [
        "detected.shop.svc.cluster.local:80",
        "legacy.shop.svc.cluster.local:80",
        "grpcish.shop.svc.cluster.local:80",
    ];
    let p = start_proxy(&cfg, &hosts, &[]).await;
    let (detected, legacy, h2port) = (p.outbound_url(0), p.outbound_url(1), p.outbound_url(2));

    // `detect` keeps the client's version, and the server sees the
    // authority the client used, not the endpoint's address.
    let host = "detected.shop.svc.cluster.local";
    assert_eq!(
        request(&detected, Version::HTTP_2, host, &[]).await,
        (200, format!("HTTP/2.0 {host}"))
    );
    assert_eq!(
        request(&detected, Version::HTTP_11, host, &[]).await,
        (200, format!("HTTP/1.1 {host}"))
    );

    // A port declared HTTP/1.1 gets HTTP/1.1 from an HTTP/2 client...
    let host = "legacy.shop.svc.cluster.local";
    assert_eq!(
        request(&legacy, Version::HTTP_2, host, &[]).await,
        (200, format!("HTTP/1.1 {host}"))
    );
    // ...except gRPC, which exists only over HTTP/2.
    assert_eq!(
        request(
            &legacy,
            Version::HTTP_2,
            host,
            &[("content-type", "application/grpc+proto")]
        )
        .await,
        (200, format!("HTTP/2.0 {host}"))
    );

    // A port declared HTTP/2 gets HTTP/2 from an HTTP/1.1 client.
    let host = "grpcish.shop.svc.cluster.local";
    assert_eq!(
        request(&h2port, Version::HTTP_11, host, &[]).await,
        (200, format!("HTTP/2.0 {host}"))
    );
}

#[tokio::test]
async fn te_trailers_reaches_an_http2_upstream_and_no_te_an_http1_one() {
    let echo = Echo::start(false).await;
    let cfg = config(vec![
        declared("grpc", echo.addr, "http2"),
        declared("legacy", echo.addr, "http1"),
    ]);
    let hosts = [
        "grpc.shop.svc.cluster.local:80",
        "legacy.shop.svc.cluster.local:80",
    ];
    let p = start_proxy(&cfg, &hosts, &[]).await;
    let grpc = [("content-type", "application/grpc"), ("te", "trailers")];

    // gRPC servers look for `te: trailers`; HTTP/2 allows that one value.
    let host = "grpc.shop.svc.cluster.local";
    assert_eq!(
        request(&p.outbound_url(0), Version::HTTP_2, host, &grpc).await,
        (200, format!("HTTP/2.0 {host} te=trailers"))
    );
    // HTTP/1.1 upstream: TE is a hop-by-hop header like any other.
    let host = "legacy.shop.svc.cluster.local";
    assert_eq!(
        request(
            &p.outbound_url(1),
            Version::HTTP_11,
            host,
            &[("te", "trailers"), ("connection", "te")]
        )
        .await,
        (200, format!("HTTP/1.1 {host}"))
    );
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let echo = Echo::start(false).await;
    let cfg = config(vec![
        declared("keepalive", echo.addr, "http1"),
        declared("multiplexed", echo.addr, "http2"),
    ]);
    let p = start_proxy(
        &cfg,
        &[
            "keepalive.shop.svc.cluster.local:80",
            "multiplexed.shop.svc.cluster.local:80",
        ],
        &[],
    )
    .await;

    // HTTP/1.1: requests one after another, each on a new client
    // connection, share one upstream connection.
    for _ in 0..20 {
        let (status, _) =
            request(&p.outbound_url(0), Version::HTTP_11, "keepalive.shop", &[]).await;
        assert_eq!(status, 200);
    }
    assert_eq!(echo.requests.load(Ordering::SeqCst), 20);
    assert_eq!(
        echo.connections.load(Ordering::SeqCst),
        1,
        "sequential HTTP/1.1 requests reuse the idle upstream connection"
    );

    // HTTP/2: concurrent requests multiplex on one more connection.
    let url = p.outbound_url(1);
    let sent: Vec<_> = (0..20)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                request(&url, Version::HTTP_11, "multiplexed.shop", &[])
                    .await
                    .0
            })
        })
        .collect();
    for s in sent {
        assert_eq!(s.await.expect("request task"), 200);
    }
    assert_eq!(echo.requests.load(Ordering::SeqCst), 40);
    assert_eq!(
        echo.connections.load(Ordering::SeqCst),
        2,
        "concurrent requests to an HTTP/2 port share one upstream connection"
    );
}

#[tokio::test]
async fn a_connection_the_server_dropped_fails_no_request() {
    // The server closes every connection after one response. POST is never
    // retried, so each request must find a live connection (or get its
    // unsent request moved to a new one): none may fail.
    let echo = Echo::start(true).await;
    let cfg = config(vec![declared("flaky", echo.addr, "http1")]);
    let p = start_proxy(&cfg, &["flaky.shop.svc.cluster.local:80"], &[]).await;
    let client = client();
    for i in 0..10 {
        let reply = send(&client, "POST", &p.outbound_url(0), &[]).await;
        assert_eq!(reply.status, 200, "request {i}: {reply:?}");
    }
    assert_eq!(echo.requests.load(Ordering::SeqCst), 10);
    assert_eq!(echo.connections.load(Ordering::SeqCst), 10);
}

/// An HTTP/2 server that shuts each connection down gracefully (GOAWAY)
/// as soon as it has answered one request, as a draining server proxy does.
async fn h2_one_request_per_connection() -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let requests = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let (r, c) = (requests.clone(), connections.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let r = r.clone();
            tokio::spawn(async move {
                let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
                let done_tx = Arc::new(std::sync::Mutex::new(Some(done_tx)));
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    r.fetch_add(1, Ordering::SeqCst);
                    let done = done_tx.lock().expect("lock").take();
                    async move {
                        let _ = req.into_body().collect().await;
                        if let Some(done) = done {
                            let _ = done.send(());
                        }
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from("ok"))))
                    }
                });
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => return,
                    _ = done_rx => {}
                }
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            });
        }
    });
    (addr, requests, connections)
}

#[tokio::test]
async fn an_http2_connection_closing_under_a_request_fails_no_request() {
    // POST is never retried: each request must find a live connection or
    // get its unsent request moved to a new one. None may fail.
    let (addr, requests, connections) = h2_one_request_per_connection().await;
    let cfg = config(vec![declared("draining", addr, "http2")]);
    let p = start_proxy(&cfg, &["draining.shop.svc.cluster.local:80"], &[]).await;
    let client = client();
    for i in 0..30 {
        let reply = send(&client, "POST", &p.outbound_url(0), &[]).await;
        assert_eq!(reply.status, 200, "request {i}: {reply:?}");
    }
    assert_eq!(requests.load(Ordering::SeqCst), 30);
    assert!(connections.load(Ordering::SeqCst) >= 2);
}

/// An HTTP/2 server that refuses its very first stream with RST_STREAM
/// REFUSED_STREAM (which promises it did not process it) and answers the
/// rest.
async fn h2_refusing_the_first_stream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let served = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = served.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (s, refused) = (s.clone(), refused.clone());
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(stream).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    if !refused.swap(true, Ordering::SeqCst) {
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    s.fetch_add(1, Ordering::SeqCst);
                    if let Ok(mut body) = respond.send_response(http::Response::new(()), false) {
                        let _ = body.send_data(Bytes::from_static(b"ok"), true);
                    }
                }
            });
        }
    });
    (addr, served)
}

#[tokio::test]
async fn a_stream_the_server_refused_unprocessed_goes_again_even_for_a_post() {
    let (addr, served) = h2_refusing_the_first_stream().await;
    let cfg = config(vec![declared("refusing", addr, "http2")]);
    let p = start_proxy(&cfg, &["refusing.shop.svc.cluster.local:80"], &[]).await;
    let reply = send(&client(), "POST", &p.outbound_url(0), &[]).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(served.load(Ordering::SeqCst), 1, "processed exactly once");
}

/// Past its in-flight limit the proxy sheds: a request is answered 503
/// `overloaded` at once (the upstream never sees it) and counted, and the
/// requests already in flight finish; once they have, requests go through
/// again.
#[tokio::test]
async fn past_the_in_flight_limit_requests_are_shed_at_once_and_counted() {
    let up = Upstream::start(Arc::new(|n, _| {
        // The first two wait long enough for the third to arrive meanwhile.
        let delay = if n < 2 { 3000 } else { 0 };
        (200, "stock".into(), std::time::Duration::from_millis(delay))
    }))
    .await;
    let cfg = config(vec![service("inventory", &[up.addr], None, json!([]))]);
    let p = start_proxy(
        &cfg,
        &["inventory.shop.svc.cluster.local:80"],
        &["--outbound-max-in-flight", "2"],
    )
    .await;
    let url = format!("{}/stock", p.outbound_url(0));
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    let mut arrived = false;
    for _ in 0..100 {
        if up.hits() == 2 {
            arrived = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(arrived, "the first two requests reached the upstream");

    let shed = get(&url).await;
    assert_eq!(
        (shed.status, shed.proxy_error.as_deref()),
        (503, Some("overloaded")),
        "{}",
        shed.body
    );
    assert!(
        shed.body.contains("--outbound-max-in-flight"),
        "{}",
        shed.body
    );
    assert_eq!(up.hits(), 2, "a shed request never reaches the upstream");
    assert_eq!(
        p.metric("weft_proxy_requests_shed_total{direction=\"outbound\"}")
            .await,
        1.0
    );

    for w in waiting {
        let r = w.await.expect("request task");
        assert_eq!((r.status, r.body.as_str()), (200, "stock"));
    }
    let after = get(&url).await;
    assert_eq!((after.status, after.body.as_str()), (200, "stock"));
    assert_eq!(
        p.metric("weft_proxy_requests_shed_total{direction=\"inbound\"}")
            .await,
        0.0
    );
}

/// A Service reached through its ClusterIP gets its HTTP/2 requests spread
/// over several connections, taken in turn: kube-proxy picks a backend pod
/// per connection, so with one connection all of this pod's calls would go
/// to one backend pod. The upstream here is the "ClusterIP" (127.0.0.1 on
/// the Service port) and answers with the number of the connection.
#[tokio::test]
async fn http2_to_a_cluster_ip_is_spread_over_several_connections_in_turn() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = connections.clone();
    let server = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc =
                    hyper::service::service_fn(move |_req: http::Request<Incoming>| async move {
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(
                            n.to_string(),
                        ))))
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    let mut svc = service("payments", &[], None, json!([]));
    svc["clusterIps"] = json!(["127.0.0.1"]);
    svc["ports"] = json!([{ "port": port, "targetPort": port, "protocol": "http2" }]);
    let host = format!("payments.shop.svc.cluster.local:{port}");
    let p = start_proxy(&config(vec![svc]), &[host.as_str()], &[]).await;
    let url = p.outbound_url(0);

    // Connections are added in the background as requests find room.
    let mut grown = false;
    for _ in 0..200 {
        let (status, body) = request(&url, Version::HTTP_11, "payments.shop", &[]).await;
        assert_eq!(status, 200, "{body}");
        if connections.load(Ordering::SeqCst) == 4 {
            grown = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(grown, "four connections to the ClusterIP");
    let mut served = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..40 {
        let (status, conn) = request(&url, Version::HTTP_11, "payments.shop", &[]).await;
        assert_eq!(status, 200);
        *served.entry(conn).or_default() += 1;
    }
    assert_eq!(connections.load(Ordering::SeqCst), 4, "and no more");
    assert_eq!(
        served.values().copied().collect::<Vec<_>>(),
        [10, 10, 10, 10],
        "requests take the connections in turn: {served:?}"
    );
    server.abort();
}
