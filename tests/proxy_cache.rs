//! Tier 3, issue 21 item 4: the response cache (RFC 9111 with RFC 5861's
//! stale extensions), opt-in by a TrafficPolicy's `cache`. A vendor's
//! product feed on loopback, reached as an ExternalService through the
//! real proxy; what reached the vendor (and with which validators) is the
//! vendor's own record, so "answered from the store" means the vendor
//! never saw the request.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use support::*;

/// What the vendor saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    method: http::Method,
    path: String,
    headers: http::HeaderMap,
}

/// How the vendor answers a request (it sees every earlier one too).
type Script = Arc<dyn Fn(&Seen) -> http::Response<axum::body::Body> + Send + Sync>;

struct Feed {
    served: Option<Served>,
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    script: Arc<Mutex<Script>>,
}

impl Feed {
    async fn start(script: Script) -> Self {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let script = Arc::new(Mutex::new(script));
        let (record, answer) = (seen.clone(), script.clone());
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let (record, answer) = (record.clone(), answer.clone());
            async move {
                let seen = Seen {
                    method: req.method().clone(),
                    path: req
                        .uri()
                        .path_and_query()
                        .map_or("/", |p| p.as_str())
                        .to_owned(),
                    headers: req.headers().clone(),
                };
                record.lock().expect("seen").push(seen.clone());
                let script = answer.lock().expect("script").clone();
                script(&seen)
            }
        });
        let served = serve(app).await;
        Self {
            addr: served.addr,
            served: Some(served),
            seen,
            script,
        }
    }

    fn set(&self, script: Script) {
        *self.script.lock().expect("script") = script;
    }

    /// The requests for `path` the vendor saw.
    fn asked(&self, path: &str) -> Vec<Seen> {
        self.seen
            .lock()
            .expect("seen")
            .iter()
            .filter(|s| s.path == path)
            .cloned()
            .collect()
    }

    /// The vendor goes away altogether (its port refuses connections).
    fn down(&mut self) {
        self.served = None;
    }
}

/// An answer with `headers` and `body`.
fn answer(status: u16, headers: &[(&str, &str)], body: &str) -> http::Response<axum::body::Body> {
    let mut rsp = http::Response::builder().status(status);
    for (k, v) in headers {
        rsp = rsp.header(*k, *v);
    }
    rsp.body(axum::body::Body::from(body.to_owned()))
        .expect("answer")
}

/// Always the same answer.
fn always(status: u16, headers: &[(&str, &str)], body: &str) -> Script {
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let body = body.to_owned();
    Arc::new(move |_| {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        answer(status, &h, &body)
    })
}

/// Namespace `shop`'s config: ExternalService `feed` (`feed.vendor.test`,
/// plain HTTP on port 80, the vendor at `feed`) whose TrafficPolicy
/// caches with `cache` (the compiled form).
fn with_cache(feed: &Feed, cache: Value) -> Value {
    let mut policy = default_policy();
    policy["source"] = json!("shop/feed");
    policy["cache"] = cache;
    let mut c = config(vec![]);
    c["outbound"]["externalServices"] = json!([{
        "name": "feed", "namespace": "shop",
        "hosts": ["feed.vendor.test"],
        "ports": [{ "port": 80, "targetPort": feed.addr.port() }],
        "endpoints": [feed.addr.to_string()],
        "policy": policy,
    }]);
    c
}

fn cache(extra: Value) -> Value {
    let mut c = json!({ "maxBytes": 1 << 20, "maxObjectBytes": 64 << 10 });
    if let (Some(c), Value::Object(extra)) = (c.as_object_mut(), extra) {
        c.extend(extra);
    }
    c
}

/// A proxy whose outbound listener stands for the app's connection to
/// the vendor's address (127.0.0.2:80, where nothing listens: only a
/// request routed by its name arrives anywhere).
async fn proxy(config: &Value) -> TestProxy {
    start_proxy(config, &["127.0.0.2:80"], &[]).await
}

struct Got {
    status: u16,
    headers: http::HeaderMap,
    body: String,
}

/// `method path` through the proxy to the feed, with `headers`.
async fn ask(p: &TestProxy, method: &str, path: &str, headers: &[(&str, &str)]) -> Got {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", p.outbound_url(0)))
        .header(http::header::HOST, "feed.vendor.test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let rsp = client()
        .request(req.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("response");
    let status = rsp.status().as_u16();
    let headers = rsp.headers().clone();
    let body = rsp.into_body().collect().await.expect("body").to_bytes();
    Got {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn get(p: &TestProxy, path: &str) -> Got {
    ask(p, "GET", path, &[]).await
}

async fn outcome(p: &TestProxy, result: &str) -> f64 {
    p.metric(&format!(
        "weft_proxy_cache_requests_total{{dst=\"feed.vendor.test:80\",result=\"{result}\"}}"
    ))
    .await
}

/// Freshness from `max-age` and from `Expires`; a fresh answer is given
/// with its `Age`, to GET and HEAD, without asking the vendor; once stale
/// it is revalidated with its `ETag` (or `Last-Modified`) and a 304 gives
/// the stored body, fresh again.
#[tokio::test]
async fn fresh_answers_come_from_the_store_and_stale_ones_are_revalidated() {
    let feed = Feed::start(Arc::new(|seen: &Seen| match seen.path.as_str() {
        "/etag"
            if seen
                .headers
                .get("if-none-match")
                .is_some_and(|v| v == "\"v1\"") =>
        {
            answer(
                304,
                &[("cache-control", "max-age=1"), ("etag", "\"v1\"")],
                "",
            )
        }
        "/etag" => answer(
            200,
            &[("cache-control", "max-age=1"), ("etag", "\"v1\"")],
            "products v1",
        ),
        "/modified" if seen.headers.contains_key("if-modified-since") => {
            answer(304, &[("cache-control", "max-age=1")], "")
        }
        "/modified" => answer(
            200,
            &[
                ("cache-control", "max-age=1"),
                ("last-modified", "Mon, 07 Dec 2026 08:00:00 GMT"),
            ],
            "prices",
        ),
        _ => answer(404, &[], ""),
    }))
    .await;
    let expires = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(60));
    let expired = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(60));
    let p = proxy(&with_cache(&feed, cache(json!({})))).await;

    let first = get(&p, "/etag").await;
    assert_eq!((first.status, first.body.as_str()), (200, "products v1"));
    let again = get(&p, "/etag").await;
    assert_eq!((again.status, again.body.as_str()), (200, "products v1"));
    assert!(again.headers.contains_key("age"), "{:?}", again.headers);
    let head = ask(&p, "HEAD", "/etag", &[]).await;
    assert_eq!((head.status, head.body.as_str()), (200, ""));
    assert_eq!(feed.asked("/etag").len(), 1, "answered from the store");
    assert_eq!(outcome(&p, "hit").await, 2.0);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let revalidated = get(&p, "/etag").await;
    assert_eq!(
        (revalidated.status, revalidated.body.as_str()),
        (200, "products v1")
    );
    let asked = feed.asked("/etag");
    assert_eq!(asked.len(), 2);
    assert_eq!(asked[1].headers["if-none-match"], "\"v1\"");
    assert_eq!(outcome(&p, "revalidated").await, 1.0);
    get(&p, "/etag").await;
    assert_eq!(feed.asked("/etag").len(), 2, "fresh again after the 304");

    get(&p, "/modified").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let by_date = get(&p, "/modified").await;
    assert_eq!((by_date.status, by_date.body.as_str()), (200, "prices"));
    let asked = feed.asked("/modified");
    assert_eq!(
        asked[1].headers["if-modified-since"],
        "Mon, 07 Dec 2026 08:00:00 GMT"
    );

    // `Expires` (an HTTP-date) when there is no max-age: ahead is fresh,
    // behind is not.
    feed.set(always(200, &[("expires", &expires)], "until later"));
    get(&p, "/expires").await;
    get(&p, "/expires").await;
    assert_eq!(feed.asked("/expires").len(), 1);
    feed.set(always(200, &[("expires", &expired)], "old"));
    get(&p, "/expired").await;
    get(&p, "/expired").await;
    assert_eq!(feed.asked("/expired").len(), 2);
}

/// Never stored: `no-store`, `private`, a request with `Authorization`
/// (unless the answer is `public`), an answer setting a cookie; nor asked
/// of the store: a request with its own validators.
#[tokio::test]
async fn what_must_not_be_shared_is_never_stored() {
    let feed = Feed::start(Arc::new(|seen: &Seen| {
        let cc = match seen.path.as_str() {
            "/no-store" => "max-age=60, no-store",
            "/private" => "max-age=60, private",
            // Directive names are case-insensitive (RFC 9111 §5.2).
            "/Private" => "Max-Age=60, Private",
            "/public" => "max-age=60, public",
            _ => "max-age=60",
        };
        let mut rsp = answer(
            200,
            &[("cache-control", cc), ("etag", "\"e\"")],
            seen.path.as_str(),
        );
        if seen.path == "/cookie" {
            rsp.headers_mut()
                .insert("set-cookie", http::HeaderValue::from_static("cart=42"));
        }
        rsp
    }))
    .await;
    // With stale answers allowed by the policy: none of these may ever
    // be given to another client, not even while the vendor fails.
    let p = proxy(&with_cache(
        &feed,
        cache(json!({ "staleIfErrorMs": 60_000, "staleWhileRevalidateMs": 60_000 })),
    ))
    .await;
    for path in ["/no-store", "/private", "/Private", "/cookie"] {
        get(&p, path).await;
        let second = get(&p, path).await;
        assert_eq!(second.body, path);
        let asked = feed.asked(path);
        assert_eq!(asked.len(), 2, "{path} was stored");
        assert!(
            !asked[1].headers.contains_key("if-none-match"),
            "{path} was stored (and revalidated)"
        );
    }
    let token = [("authorization", "Bearer shop-api-key")];
    ask(&p, "GET", "/personal", &token).await;
    ask(&p, "GET", "/personal", &token).await;
    assert_eq!(
        feed.asked("/personal").len(),
        2,
        "an authorized answer was shared"
    );
    ask(&p, "GET", "/public", &token).await;
    ask(&p, "GET", "/public", &token).await;
    assert_eq!(feed.asked("/public").len(), 1, "public is shared even so");

    // A cookie set for one client never reaches another, even with the
    // vendor down.
    feed.set(always(503, &[], "down"));
    let other = get(&p, "/cookie").await;
    assert_eq!(other.status, 503);
    assert!(!other.headers.contains_key("set-cookie"));
    feed.set(always(200, &[("cache-control", "max-age=60")], "/plain"));

    // The client's own conditional goes to the vendor as it is.
    get(&p, "/plain").await;
    let conditional = ask(&p, "GET", "/plain", &[("if-none-match", "\"mine\"")]).await;
    assert_eq!(conditional.status, 200);
    let asked = feed.asked("/plain");
    assert_eq!(asked.len(), 2);
    assert_eq!(asked[1].headers["if-none-match"], "\"mine\"");
}

/// `Vary`: a request whose nominated headers differ is not given the
/// stored variant; its own answer is stored in its place.
#[tokio::test]
async fn vary_never_gives_one_variant_for_another() {
    let feed = Feed::start(Arc::new(|seen: &Seen| {
        let lang = seen
            .headers
            .get("accept-language")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned();
        answer(
            200,
            &[("cache-control", "max-age=60"), ("vary", "Accept-Language")],
            &format!("catalog in {lang}"),
        )
    }))
    .await;
    let p = proxy(&with_cache(&feed, cache(json!({})))).await;
    let en = [("accept-language", "en")];
    let de = [("accept-language", "de")];
    assert_eq!(ask(&p, "GET", "/c", &en).await.body, "catalog in en");
    assert_eq!(ask(&p, "GET", "/c", &en).await.body, "catalog in en");
    assert_eq!(feed.asked("/c").len(), 1);
    assert_eq!(ask(&p, "GET", "/c", &de).await.body, "catalog in de");
    assert_eq!(
        feed.asked("/c").len(),
        2,
        "another variant asked the vendor"
    );
    assert_eq!(ask(&p, "GET", "/c", &de).await.body, "catalog in de");
    assert_eq!(ask(&p, "GET", "/c", &en).await.body, "catalog in en");
    assert_eq!(feed.asked("/c").len(), 3);
}

/// The vendor fails (503, then gone altogether): the last good answer
/// stands in for as long as its own `stale-if-error` says, or where it
/// says nothing, the policy's `staleIfError`; never for an answer marked
/// `must-revalidate`, and never past the window.
#[tokio::test]
async fn during_a_vendor_outage_the_last_good_answer_stands_in() {
    let mut feed = Feed::start(Arc::new(|seen: &Seen| {
        let cc = match seen.path.as_str() {
            "/own" => "max-age=1, stale-if-error=1",
            "/must" => "max-age=1, must-revalidate",
            _ => "max-age=1",
        };
        answer(
            200,
            &[("cache-control", cc)],
            &format!("good {}", seen.path),
        )
    }))
    .await;
    let p = proxy(&with_cache(
        &feed,
        cache(json!({ "staleIfErrorMs": 60_000 })),
    ))
    .await;
    for path in ["/own", "/policy", "/must"] {
        assert_eq!(get(&p, path).await.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(1100)).await;
    feed.set(always(503, &[], "down for maintenance"));

    let own = get(&p, "/own").await;
    assert_eq!((own.status, own.body.as_str()), (200, "good /own"));
    let policy = get(&p, "/policy").await;
    assert_eq!((policy.status, policy.body.as_str()), (200, "good /policy"));
    let must = get(&p, "/must").await;
    assert_eq!(must.status, 503, "must-revalidate is never given stale");
    assert_eq!(feed.asked("/policy").len(), 2, "the vendor was asked first");
    assert_eq!(outcome(&p, "stale-if-error").await, 2.0);

    // Gone altogether: connection refused is a failure too.
    feed.down();
    let gone = get(&p, "/policy").await;
    assert_eq!((gone.status, gone.body.as_str()), (200, "good /policy"));
    // `/own` said one second past freshness: by now that has run out.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let past = get(&p, "/own").await;
    assert_ne!(past.status, 200, "stale past its own stale-if-error");
}

/// `stale-while-revalidate`: past freshness, within the window, the
/// stored answer is given at once and the vendor asked in the background;
/// the next request gets the new answer from the store.
#[tokio::test]
async fn within_stale_while_revalidate_the_answer_is_at_once_and_refreshed_behind() {
    let feed = Feed::start(always(
        200,
        &[("cache-control", "max-age=1, stale-while-revalidate=30")],
        "v1",
    ))
    .await;
    let p = proxy(&with_cache(&feed, cache(json!({})))).await;
    assert_eq!(get(&p, "/s").await.body, "v1");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    feed.set(always(
        200,
        &[("cache-control", "max-age=60, stale-while-revalidate=30")],
        "v2",
    ));
    let stale = get(&p, "/s").await;
    assert_eq!((stale.status, stale.body.as_str()), (200, "v1"));
    assert_eq!(outcome(&p, "stale").await, 1.0);
    let mut refreshed = String::new();
    for _ in 0..50 {
        if feed.asked("/s").len() == 2 {
            refreshed = get(&p, "/s").await.body;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(refreshed, "v2", "the background revalidation stored v2");
    assert_eq!(feed.asked("/s").len(), 2, "v2 came from the store");
}

/// A POST (any unsafe method) answered 2xx drops the stored answer of its
/// URI; paths outside `paths` are neither stored nor answered; an answer
/// larger than `maxObjectBytes` passes through whole (with or without a
/// declared length) and is not stored.
#[tokio::test]
async fn unsafe_methods_invalidate_and_only_the_listed_paths_and_sizes_are_kept() {
    let big = "x".repeat(80 << 10);
    let big_body = big.clone();
    let feed = Feed::start(Arc::new(move |seen: &Seen| match seen.path.as_str() {
        "/products/big" => answer(200, &[("cache-control", "max-age=60")], &big_body),
        "/products/streamed" => {
            // No length: chunks as a vendor streaming a report.
            let chunks: Vec<Result<Bytes, std::io::Error>> = (0..20)
                .map(|_| Ok(Bytes::from(vec![b'y'; 8 << 10])))
                .collect();
            http::Response::builder()
                .header("cache-control", "max-age=60")
                .body(axum::body::Body::from_stream(futures_util::stream::iter(
                    chunks,
                )))
                .expect("streamed")
        }
        path => answer(
            200,
            &[("cache-control", "max-age=60")],
            &format!("{} {path}", seen.method),
        ),
    }))
    .await;
    let p = proxy(&with_cache(
        &feed,
        cache(json!({ "paths": ["/products/"] })),
    ))
    .await;

    get(&p, "/products/1").await;
    get(&p, "/products/1").await;
    assert_eq!(feed.asked("/products/1").len(), 1);
    let post = ask(&p, "POST", "/products/1", &[]).await;
    assert_eq!(post.body, "POST /products/1");
    assert_eq!(get(&p, "/products/1").await.body, "GET /products/1");
    assert_eq!(
        feed.asked("/products/1").len(),
        3,
        "the POST dropped the stored answer"
    );

    get(&p, "/cart/1").await;
    get(&p, "/cart/1").await;
    assert_eq!(feed.asked("/cart/1").len(), 2, "outside paths: not cached");

    for _ in 0..2 {
        assert_eq!(get(&p, "/products/big").await.body, big);
        let streamed = get(&p, "/products/streamed").await;
        assert_eq!(streamed.body.len(), 20 * (8 << 10), "the whole stream");
    }
    assert_eq!(feed.asked("/products/big").len(), 2);
    assert_eq!(feed.asked("/products/streamed").len(), 2);
}

/// A flood of distinct URLs (a crawler, an enumeration attack) keeps the
/// store within `maxBytes`, and the recent answers still hit.
#[tokio::test]
async fn a_flood_of_distinct_urls_stays_within_the_byte_budget() {
    const BUDGET: u64 = 256 << 10;
    let body = "z".repeat(4 << 10);
    let feed = Feed::start(always(200, &[("cache-control", "max-age=600")], &body)).await;
    let p = proxy(&with_cache(
        &feed,
        json!({ "maxBytes": BUDGET, "maxObjectBytes": 16 << 10 }),
    ))
    .await;
    let series = "weft_proxy_cache_bytes{policy=\"shop/feed\"}";
    let mut largest = 0.0f64;
    for i in 0..600 {
        assert_eq!(get(&p, &format!("/item/{i}")).await.status, 200);
        if i % 50 == 49 {
            largest = largest.max(p.metric(series).await);
        }
    }
    assert!(
        largest > (BUDGET / 2) as f64 && largest <= BUDGET as f64,
        "held {largest} bytes of a {BUDGET}-byte budget"
    );
    get(&p, "/item/599").await;
    assert_eq!(feed.asked("/item/599").len(), 1, "the newest still hits");
}

/// `Vary` on a field the client repeats (an HTTP/2 client sends each
/// cookie as a field of its own) compares every value, and a 304 keeps
/// every `Vary` line of the stored answer: after a revalidation a second
/// user still does not get the first one's answer.
#[tokio::test]
async fn vary_sees_every_value_and_every_line_even_after_a_304() {
    let feed = Feed::start(Arc::new(|seen: &Seen| {
        let cookies: Vec<&str> = seen
            .headers
            .get_all("cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        let whose = cookies.join("; ");
        let mut rsp = if seen
            .headers
            .get("if-none-match")
            .is_some_and(|v| v == "\"page\"")
        {
            answer(
                304,
                &[("cache-control", "max-age=1"), ("etag", "\"page\"")],
                "",
            )
        } else {
            answer(
                200,
                &[("cache-control", "max-age=1"), ("etag", "\"page\"")],
                &format!("page for {whose}"),
            )
        };
        // Two lines, as an app's `Vary: Cookie` and a compressing front
        // end's `Vary: Accept-Encoding` (a head that kept only the last
        // would vary on Accept-Encoding alone), on the full answers only:
        // the 304 says nothing of Vary, so the stored lines must survive.
        if rsp.status() == 200 {
            rsp.headers_mut()
                .append("vary", http::HeaderValue::from_static("Cookie"));
            rsp.headers_mut()
                .append("vary", http::HeaderValue::from_static("Accept-Encoding"));
        }
        rsp
    }))
    .await;
    let p = proxy(&with_cache(&feed, cache(json!({})))).await;
    let alice = [("cookie", "theme=dark"), ("cookie", "session=alice")];
    let bob = [("cookie", "theme=dark"), ("cookie", "session=bob")];
    assert_eq!(
        ask(&p, "GET", "/account", &alice).await.body,
        "page for theme=dark; session=alice"
    );
    assert_eq!(
        ask(&p, "GET", "/account", &bob).await.body,
        "page for theme=dark; session=bob",
        "the first cookie alike, the second not"
    );
    assert_eq!(feed.asked("/account").len(), 2);
    // Bob's is stored now; revalidated after it went stale (304).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = ask(&p, "GET", "/account", &bob).await;
    assert_eq!(again.body, "page for theme=dark; session=bob");
    assert_eq!(feed.asked("/account").len(), 3);
    assert_eq!(
        feed.asked("/account")[2].headers["if-none-match"],
        "\"page\""
    );
    let other = ask(&p, "GET", "/account", &alice).await;
    assert_eq!(
        other.body, "page for theme=dark; session=alice",
        "after the 304 the stored answer still varies on Cookie"
    );
}

/// The client asks for a validated answer (`Cache-Control: no-cache`):
/// the vendor is asked before it gets one, even where the answer allows
/// giving it stale while revalidating.
#[tokio::test]
async fn a_client_that_asks_for_validation_is_never_given_the_stored_answer_unasked() {
    let feed = Feed::start(always(
        200,
        &[
            ("cache-control", "max-age=60, stale-while-revalidate=60"),
            ("etag", "\"p1\""),
        ],
        "price 10",
    ))
    .await;
    let p = proxy(&with_cache(&feed, cache(json!({})))).await;
    get(&p, "/price").await;
    get(&p, "/price").await;
    assert_eq!(feed.asked("/price").len(), 1);
    feed.set(always(
        200,
        &[("cache-control", "max-age=60"), ("etag", "\"p2\"")],
        "price 12",
    ));
    for validate in [
        [("cache-control", "no-cache")],
        [("cache-control", "max-age=0")],
    ] {
        let got = ask(&p, "GET", "/price", &validate).await;
        assert_eq!(got.body, "price 12");
    }
    assert_eq!(feed.asked("/price").len(), 3);
    // Stale, inside the answer's stale-while-revalidate: a client asking
    // for validation still waits for the vendor.
    feed.set(always(
        200,
        &[("cache-control", "max-age=1, stale-while-revalidate=60")],
        "fresh from the vendor",
    ));
    get(&p, "/swr").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let validated = ask(&p, "GET", "/swr", &[("cache-control", "no-cache")]).await;
    assert_eq!(feed.asked("/swr").len(), 2, "given stale unasked");
    assert_eq!(validated.body, "fresh from the vendor");
    // A client's max-stale does not stretch what the vendor allowed.
    feed.set(always(200, &[("cache-control", "max-age=1")], "v3"));
    get(&p, "/strict").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    ask(&p, "GET", "/strict", &[("cache-control", "max-stale=600")]).await;
    assert_eq!(feed.asked("/strict").len(), 2, "max-stale was honoured");
}

/// The answer reaches the client as the vendor sends it (a long answer
/// or a slow stream is not held back until it ends), and is stored once
/// it has ended.
#[tokio::test]
async fn an_answer_streams_through_and_is_stored_when_it_ends() {
    let (tx, rx) = tokio::sync::mpsc::channel::<()>(1);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let feed = Feed::start(Arc::new(move |_: &Seen| {
        let rx = rx.clone();
        let chunks = futures_util::stream::unfold(0u8, move |n| {
            let rx = rx.clone();
            async move {
                match n {
                    0 => Some((Ok::<_, std::io::Error>(Bytes::from_static(b"first ")), 1)),
                    // The rest only once the client has the first part.
                    1 => {
                        rx.lock().await.recv().await;
                        Some((Ok(Bytes::from_static(b"second")), 2))
                    }
                    _ => None,
                }
            }
        });
        http::Response::builder()
            .header("cache-control", "max-age=60")
            .body(axum::body::Body::from_stream(chunks))
            .expect("stream")
    }))
    .await;
    let p = proxy(&with_cache(&feed, cache(json!({})))).await;
    let req = http::Request::get(format!("{}/report", p.outbound_url(0)))
        .header(http::header::HOST, "feed.vendor.test")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let rsp = client().request(req).await.expect("response");
    let mut body = rsp.into_body();
    let first = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("the first part arrives before the answer ends")
        .expect("a frame")
        .expect("data");
    assert_eq!(first.into_data().expect("data"), "first ");
    tx.send(()).await.expect("vendor waiting");
    // (A later request, were it to reach the vendor, does not wait.)
    drop(tx);
    let rest = body.collect().await.expect("rest").to_bytes();
    assert_eq!(rest, "second");
    assert_eq!(get(&p, "/report").await.body, "first second");
    assert_eq!(feed.asked("/report").len(), 1, "stored once it ended");
}

/// An answer without a body (a 204, `Content-Length: 0`) is stored too
/// (a server never reads such a body, so it is stored at once); a 304
/// that sets a cookie reaches the client with its own head, and the
/// answer is not kept after it.
#[tokio::test]
async fn empty_answers_are_stored_and_a_304_that_forbids_storing_is_obeyed() {
    let feed = Feed::start(Arc::new(|seen: &Seen| match seen.path.as_str() {
        "/empty" => answer(204, &[("cache-control", "max-age=60")], ""),
        _ if seen.headers.contains_key("if-none-match") => answer(
            304,
            &[
                ("cache-control", "max-age=60"),
                ("etag", "\"s\""),
                ("set-cookie", "sid=new"),
            ],
            "",
        ),
        _ => answer(
            200,
            &[("cache-control", "max-age=1"), ("etag", "\"s\"")],
            "session page",
        ),
    }))
    .await;
    let p = proxy(&with_cache(&feed, cache(json!({})))).await;
    assert_eq!(get(&p, "/empty").await.status, 204);
    assert_eq!(get(&p, "/empty").await.status, 204);
    assert_eq!(feed.asked("/empty").len(), 1, "the empty answer was stored");

    get(&p, "/session").await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let refreshed = get(&p, "/session").await;
    assert_eq!(
        (refreshed.status, refreshed.body.as_str()),
        (200, "session page")
    );
    assert_eq!(
        refreshed.headers["set-cookie"], "sid=new",
        "the 304's own head"
    );
    get(&p, "/session").await;
    assert_eq!(
        feed.asked("/session").len(),
        3,
        "not kept after a 304 that set a cookie"
    );
}
