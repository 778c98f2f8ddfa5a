#![allow(missing_docs)]
//! `examples/service` as the README runs it: two orchestrators and two workers, each its
//! own process, on one Redis; both orchestrators also serve the HTTP API. Orders are
//! started through one process's API and approved or cancelled through the other's.
//!
//! The test builds the example with cargo first (a no-op when it is up to date).
#![cfg(feature = "redis")]

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

#[path = "support/servers.rs"]
mod servers;

const ORDERS: usize = 40;
const SHARDS: u16 = 8;

/// The example's binary, built (or found up to date) by cargo: a test run alone
/// (`cargo test --test service`) does not build examples.
fn service_exe() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
            let out = Command::new(env!("CARGO"))
                .args([
                    "build",
                    "--locked",
                    "--features",
                    "redis",
                    "--example",
                    "service",
                ])
                .args(["--manifest-path", manifest, "--message-format", "json"])
                .stderr(Stdio::inherit())
                .output()
                .expect("cargo runs");
            assert!(out.status.success(), "the service example builds");
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter(|m| m["target"]["name"] == "service")
                .find_map(|m| m["executable"].as_str().map(PathBuf::from))
                .expect("cargo names the example's executable")
        })
        .clone()
}

/// A service process; its stdout lines are collected.
struct Node {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Node {
    fn start(args: &[&str]) -> Node {
        let mut child = Command::new(service_exe())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the service starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if line.starts_with("READY") {
                    let _ = ready_tx.send(());
                }
                sink.lock().unwrap().push(line);
            }
        });
        ready
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the service {args:?} did not become ready"));
        Node { child, lines }
    }

    /// Sends SIGTERM and waits for a clean exit.
    fn stop(mut self) -> Vec<String> {
        // (Drop then finds the process already reaped.)
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "SIGTERM sent");
        let status = self.child.wait().expect("the service exits");
        assert!(
            status.success(),
            "a stopped service exits cleanly: {status}"
        );
        std::thread::sleep(Duration::from_millis(50));
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A failed test leaves no process behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request on a fresh connection (10 s at most).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    tokio::time::timeout(
        Duration::from_secs(10),
        request(addr, method, path, key, body),
    )
    .await
    .unwrap_or_else(|_| panic!("{method} {path}: no answer within 10 s"))
}

async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("handshake");
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    if let Some(key) = key {
        req = req.header("idempotency-key", key);
    }
    let body = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let res = sender
        .send_request(req.body(Full::new(body)).expect("a request"))
        .await
        .expect("a response");
    let status = res.status().as_u16();
    let bytes = res.into_body().collect().await.expect("a body").to_bytes();
    (status, serde_json::from_slice(&bytes).expect("a JSON body"))
}

/// Polls an order's stage until `done` holds (or 20 s pass).
async fn until_stage(addr: SocketAddr, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    for _ in 0..400 {
        let (status, body) = http(addr, "GET", &format!("/orders/{id}"), None, None).await;
        assert_eq!(status, 200, "{id}: {body}");
        if done(&body["stage"]) {
            return body["stage"].clone();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{id} never reached the expected stage");
}

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], servers::free_port()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_orchestrators_and_two_workers_serve_orders_over_http() {
    let redis = servers::Redis::start();
    let url = redis.url();
    let shards = SHARDS.to_string();
    let (a, b) = (addr(), addr());
    let base = [
        "--redis",
        url.as_str(),
        "--prefix",
        "svc",
        "--shards",
        shards.as_str(),
    ];
    let node = |extra: &[&str]| Node::start(&[&base[..], extra].concat());
    let orch_a = node(&[
        "--orchestrator",
        "--name",
        "orch-a",
        "--http",
        &a.to_string(),
    ]);
    let orch_b = node(&[
        "--orchestrator",
        "--name",
        "orch-b",
        "--http",
        &b.to_string(),
    ]);
    let workers = [
        node(&["--worker", "--name", "work-1"]),
        node(&["--worker", "--name", "work-2"]),
    ];

    // Both orchestrators report healthy, and between them hold every shard once.
    let mut split = None;
    for _ in 0..200 {
        let (sa, ha) = http(a, "GET", "/health", None, None).await;
        let (sb, hb) = http(b, "GET", "/health", None, None).await;
        assert_eq!((sa, sb), (200, 200), "{ha} {hb}");
        let held = |h: &Value| -> Vec<u64> {
            h["shards"]["Order"]
                .as_array()
                .map(|s| s.iter().filter_map(Value::as_u64).collect())
                .unwrap_or_default()
        };
        let (xa, xb) = (held(&ha), held(&hb));
        let all: BTreeSet<u64> = xa.iter().chain(&xb).copied().collect();
        if xa.len() + xb.len() == usize::from(SHARDS)
            && all.len() == usize::from(SHARDS)
            && !xa.is_empty()
            && !xb.is_empty()
        {
            assert_eq!(ha["roles"], json!(["orchestrator", "client"]));
            split = Some((xa.len(), xb.len()));
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let split = split.expect("the two orchestrators share the shards");

    let (status, meta) = http(a, "GET", "/metadata", None, None).await;
    assert_eq!(status, 200);
    assert_eq!(meta["flows"][0]["name"], "Order");

    // Start every order through A; a second start of the same id is refused (409).
    for i in 0..ORDERS {
        let order = json!({ "sku": format!("SKU-{i}"), "qty": 1 + i % 3, "cents": 1_000 + i });
        let (status, body) = http(
            a,
            "POST",
            &format!("/orders/o-{i}"),
            None,
            Some(order.clone()),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        if i == 0 {
            let (status, body) = http(b, "POST", "/orders/o-0", None, Some(order)).await;
            assert_eq!(
                (status, body["error"].as_str()),
                (409, Some("already_exists"))
            );
        }
    }
    // Approve (or, every fifth, cancel) through B, each twice with one idempotency key.
    for i in 0..ORDERS {
        let id = format!("o-{i}");
        until_stage(b, &id, |s| s == "awaiting_approval").await;
        let impulse = if i % 5 == 0 {
            json!({ "Cancel": {} })
        } else {
            json!({ "Approve": { "by": "ann" } })
        };
        let key = format!("decision-{i}");
        let path = format!("/orders/{id}/impulses");
        let (status, body) = http(b, "POST", &path, Some(&key), Some(impulse.clone())).await;
        assert_eq!((status, &body["applied"]), (202, &json!(true)), "{body}");
        let (status, body) = http(a, "POST", &path, Some(&key), Some(impulse)).await;
        assert_eq!(
            (status, &body["applied"]),
            (200, &json!(false)),
            "a retry changes nothing: {body}"
        );
    }
    for i in 0..ORDERS {
        let id = format!("o-{i}");
        let stage = until_stage(a, &id, |s| s == "cancelled" || s.get("shipped").is_some()).await;
        if i % 5 == 0 {
            assert_eq!(stage, "cancelled");
        } else {
            assert!(
                stage["shipped"]
                    .as_str()
                    .is_some_and(|t| t.starts_with("TRACK-"))
            );
            let (_, order) = http(b, "GET", &format!("/orders/{id}/state"), None, None).await;
            assert_eq!(order["approved_by"], "ann");
        }
    }

    // What users get wrong gets a 4xx that says so.
    let (status, body) = http(a, "GET", "/orders/nobody", None, None).await;
    assert_eq!((status, body["error"].as_str()), (404, Some("not_found")));
    let (status, body) = http(
        a,
        "POST",
        "/orders/o-1/impulses",
        None,
        Some(json!({ "Refund": {} })),
    )
    .await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_impulse")));
    let (status, body) = http(a, "POST", "/orders/x-1", None, Some(json!({ "sku": 7 }))).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_body")));
    let (status, body) = http(a, "GET", "/orders/a%20b", None, None).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("bad_id")));

    // Stop everything with SIGTERM: each process exits cleanly.
    let mut drives: HashMap<String, usize> = HashMap::new();
    for w in workers {
        for line in w.stop() {
            if let Some(key) = line.split("key=").nth(1).and_then(|k| k.split(' ').next()) {
                *drives.entry(key.to_string()).or_default() += 1;
            }
        }
    }
    orch_a.stop();
    orch_b.stop();
    // 3 calls per approved order (reserve, charge, ship), 2 per cancelled one (reserve,
    // release), each run once: the workers shared them and nothing ran twice.
    let approved = ORDERS - ORDERS.div_ceil(5);
    let cancelled = ORDERS.div_ceil(5);
    assert_eq!(
        drives.len(),
        approved * 3 + cancelled * 2,
        "split {split:?}"
    );
    assert!(
        drives.values().all(|n| *n == 1),
        "every call ran once: {drives:?}"
    );
}
