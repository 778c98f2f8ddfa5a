//! HTTP/1.1 on hyper: bounded connections, header and request timeouts, a body limit, and
//! a graceful stop. The routes are in `api.rs`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::api::{Api, Method, Request, Response};

/// The limits of the server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once; more are closed on accept.
    pub connections: usize,
    /// Time for a client to send a request's headers.
    pub headers: Duration,
    /// Largest request body, in bytes (413 above).
    pub body: usize,
    /// Time for the engine to answer a request (504 after).
    pub request: Duration,
    /// Time given to open connections at a stop.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: 1024,
            headers: Duration::from_secs(10),
            body: 64 * 1024,
            request: Duration::from_secs(30),
            drain: Duration::from_secs(5),
        }
    }
}

/// Serves `api` on `listener` until `stop` turns `true`, then lets open connections finish
/// their request (up to `limits.drain`).
pub async fn serve(
    listener: TcpListener,
    api: Api,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let api = Arc::new(api);
    let slots = Arc::new(Semaphore::new(limits.connections));
    let mut open = JoinSet::new();
    loop {
        while open.try_join_next().is_some() {}
        let accepted = tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, or a connection reset before it was accepted.
                eprintln!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue; // over the limit: the connection is closed
        };
        let api = api.clone();
        let mut stopping = stop.clone();
        open.spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(answer(&api, req, limits).await) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.headers)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stopping.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    let drained = tokio::time::timeout(limits.drain, async {
        while open.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        open.abort_all();
    }
}

/// Reads one request (bounded), asks the API (bounded), writes the JSON answer.
async fn answer(
    api: &Api,
    req: hyper::Request<Incoming>,
    limits: Limits,
) -> hyper::Response<Full<Bytes>> {
    let method = match *req.method() {
        hyper::Method::GET => Method::Get,
        hyper::Method::POST => Method::Post,
        _ => Method::Other,
    };
    let path = req.uri().path().to_string();
    let idempotency_key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let response = match Limited::new(req.into_body(), limits.body).collect().await {
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Response::error(
            413,
            "body_too_large",
            &format!("a body is at most {} bytes", limits.body),
        ),
        Err(e) => Response::error(400, "body", &format!("the body could not be read: {e}")),
        Ok(body) => {
            let request = Request {
                method,
                path,
                idempotency_key,
                body: body.to_bytes(),
            };
            match tokio::time::timeout(limits.request, api.call(request)).await {
                Ok(r) => r,
                Err(_) => Response::error(504, "timeout", "the engine did not answer in time"),
            }
        }
    };
    let mut out = hyper::Response::new(Full::new(Bytes::from(response.body)));
    *out.status_mut() = hyper::StatusCode::from_u16(response.status)
        .unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    out.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    out
}
