//! A fake Kubernetes API server on loopback for the operator's tier-2
//! tests and its benchmark: it records every request and keeps the objects
//! written to it, answering GET, POST (409 when present), PATCH (apply, or
//! `/status` onto a stored object), PUT and DELETE as the API server would.
//! No watches: the callers fill the operator's caches themselves.

#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// One request the operator made.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
    /// When it arrived (the operator benchmark times slice changes to
    /// the write that publishes them).
    pub at: std::time::Instant,
}

#[derive(Default)]
pub struct FakeState {
    pub seen: Vec<Seen>,
    /// Stored objects by path (`/api/v1/namespaces/shop/configmaps/x`).
    pub objects: HashMap<String, Value>,
    /// Writes to these paths are refused with this code, as an admission
    /// policy or a quota would refuse them (the request is still recorded).
    pub refuse: HashMap<String, u16>,
    /// Reads of these paths fail with this code (an API server in trouble).
    pub refuse_reads: HashMap<String, u16>,
    next_rv: u64,
}

pub type Shared = Arc<Mutex<FakeState>>;

fn status(code: u16, reason: &str, message: &str) -> (StatusCode, axum::Json<Value>) {
    (
        StatusCode::from_u16(code).expect("code"),
        axum::Json(json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": reason, "code": code, "message": message,
        })),
    )
}

/// Answers like the API server for the verbs the operator uses: GET, POST
/// (create; 409 when present), PATCH (server-side apply, or status), PUT,
/// DELETE.
async fn api(
    State(fake): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, axum::Json<Value>) {
    let path = uri.path().to_owned();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut f = fake.lock().expect("fake");
    f.seen.push(Seen {
        method: method.clone(),
        path: path.clone(),
        query: uri.query().unwrap_or("").to_owned(),
        content_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned(),
        body: body.clone(),
        at: std::time::Instant::now(),
    });
    if method == Method::GET
        && let Some(code) = f.refuse_reads.get(&path).copied()
    {
        return status(code, "InternalError", &format!("GET {path} failed"));
    }
    if method != Method::GET
        && let Some(code) = f.refuse.get(&path).copied()
    {
        return status(
            code,
            "Forbidden",
            &format!("{method} {path} refused by a policy"),
        );
    }
    f.next_rv += 1;
    let rv = f.next_rv.to_string();
    match method {
        Method::GET => match f.objects.get(&path) {
            Some(o) => (StatusCode::OK, axum::Json(o.clone())),
            None => status(404, "NotFound", &format!("{path} not found")),
        },
        Method::POST => {
            let name = body["metadata"]["name"].as_str().unwrap_or("generated");
            let at = format!("{path}/{name}");
            if f.objects.contains_key(&at) {
                return status(409, "AlreadyExists", &format!("{at} already exists"));
            }
            let mut obj = body.clone();
            obj["metadata"]["resourceVersion"] = json!(rv);
            f.objects.insert(at, obj.clone());
            (StatusCode::CREATED, axum::Json(obj))
        }
        Method::PATCH if path.ends_with("/status") => {
            let base = path.trim_end_matches("/status").to_owned();
            let Some(mut obj) = f.objects.get(&base).cloned() else {
                return status(404, "NotFound", &format!("{base} not found"));
            };
            obj["status"] = body["status"].clone();
            obj["metadata"]["resourceVersion"] = json!(rv);
            f.objects.insert(base, obj.clone());
            (StatusCode::OK, axum::Json(obj))
        }
        Method::PATCH | Method::PUT => {
            let mut obj = body.clone();
            obj["metadata"]["resourceVersion"] = json!(rv);
            f.objects.insert(path, obj.clone());
            (StatusCode::OK, axum::Json(obj))
        }
        Method::DELETE => match f.objects.remove(&path) {
            Some(_) => (
                StatusCode::OK,
                axum::Json(json!({"kind": "Status", "apiVersion": "v1", "status": "Success"})),
            ),
            None => status(404, "NotFound", &format!("{path} not found")),
        },
        _ => status(405, "MethodNotAllowed", "no"),
    }
}

/// Starts the fake; returns its state and a client for it.
pub async fn start() -> (Shared, kube::Client) {
    let fake: Shared = Arc::default();
    let app = axum::Router::new().fallback(api).with_state(fake.clone());
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, app).await });
    let config = kube::Config::new(format!("http://{addr}").parse().expect("url"));
    (fake, kube::Client::try_from(config).expect("client"))
}

/// Collection paths whose list requests the fake holds unanswered while
/// they are in the set: a list that takes as long as the test wants, as
/// listing every Pod of a large cluster does.
pub type Held = tokio::sync::watch::Sender<std::collections::HashSet<String>>;

/// Whether `path` names a collection (`/api/v1/pods`,
/// `/api/v1/namespaces/shop/secrets`, `/apis/weft.dev/v1alpha1/meshes`)
/// rather than one object: an odd number of segments after the group
/// version.
fn collection(path: &str) -> bool {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let base = if segments.first() == Some(&"api") {
        2
    } else {
        3
    };
    segments.len() > base && (segments.len() - base) % 2 == 1
}

/// Whether the object stored at `key` is an item of the list at `list`:
/// directly under it, or, for a namespaced resource listed across all
/// namespaces, under any namespace.
fn listed(list: &str, key: &str) -> bool {
    let l: Vec<&str> = list.trim_start_matches('/').split('/').collect();
    let k: Vec<&str> = key.trim_start_matches('/').split('/').collect();
    if k.len() == l.len() + 1 && k.starts_with(&l) {
        return true;
    }
    let base = if l.first() == Some(&"api") { 2 } else { 3 };
    l.len() == base + 1
        && k.len() == base + 4
        && k[..base] == l[..base]
        && k[base] == "namespaces"
        && k[base + 2] == l[base]
}

/// [`api`], plus what a watcher (kube's reflector) needs: a GET of a
/// collection is a list of the stored objects under it (held while its
/// path is in `held`), and a watch (`watch=true`) is answered 200 with a
/// stream that stays open and sends nothing, as the API server's does
/// while nothing changes.
async fn api_with_lists(
    State((fake, held)): State<(
        Shared,
        tokio::sync::watch::Receiver<std::collections::HashSet<String>>,
    )>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let path = uri.path().to_owned();
    let query = uri.query().unwrap_or("").to_owned();
    if method != Method::GET || !collection(&path) {
        return api(State(fake), method, uri, headers, body)
            .await
            .into_response();
    }
    fake.lock().expect("fake").seen.push(Seen {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        content_type: String::new(),
        body: Value::Null,
        at: std::time::Instant::now(),
    });
    if query
        .split('&')
        .any(|q| q == "watch=true" || q == "watch=1")
    {
        let quiet = futures_util::stream::pending::<Result<Bytes, std::convert::Infallible>>();
        return (
            [("content-type", "application/json")],
            axum::body::Body::from_stream(quiet),
        )
            .into_response();
    }
    let mut held = held;
    let _ = held.wait_for(|h| !h.contains(&path)).await;
    let f = fake.lock().expect("fake");
    let mut items: Vec<(&String, &Value)> =
        f.objects.iter().filter(|(k, _)| listed(&path, k)).collect();
    items.sort_by_key(|(k, _)| *k);
    let items: Vec<Value> = items.into_iter().map(|(_, v)| v.clone()).collect();
    let rv = f.next_rv.max(1).to_string();
    axum::Json(json!({
        "apiVersion": "v1", "kind": "List",
        "metadata": { "resourceVersion": rv },
        "items": items,
    }))
    .into_response()
}

/// [`start`], with lists and watches ([`api_with_lists`]); the returned
/// [`Held`] holds list requests of the paths put in it until they are
/// taken out.
pub async fn start_with_lists() -> (Shared, kube::Client, Held) {
    let fake: Shared = Arc::default();
    let (held, holds) = tokio::sync::watch::channel(Default::default());
    let app = axum::Router::new()
        .fallback(api_with_lists)
        .with_state((fake.clone(), holds));
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, app).await });
    let config = kube::Config::new(format!("http://{addr}").parse().expect("url"));
    (fake, kube::Client::try_from(config).expect("client"), held)
}
