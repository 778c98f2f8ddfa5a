//! The HTTP API's routes, as plain functions of a request: what each one asks the engine
//! and how its errors map to status codes. No sockets here (see `http.rs`).
//!
//! | route | does |
//! | --- | --- |
//! | `GET /health` | the engine's [`Health`](flowwire::Health): 200, or 503 if the store does not answer |
//! | `GET /metadata` | the flows and drivers, as the macros describe them |
//! | `POST /orders/{id}` | starts an order; body [`NewOrder`]; 201, or 409 if the id exists |
//! | `GET /orders/{id}` | the `stage` probe; 404 if there is no such order |
//! | `GET /orders/{id}/state` | the order's last persisted state |
//! | `POST /orders/{id}/impulses` | an impulse as JSON (`{"Approve":{"by":"ann"}}`, `{"Cancel":{}}`); an `Idempotency-Key` header makes retries safe |

use bytes::Bytes;
use flowwire::{Engine, Error};
use serde::Serialize;

use crate::shop::{NewOrder, Order, OrderState};

/// The longest instance id or idempotency key accepted.
const MAX_ID: usize = 128;

/// The methods the API serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    /// Any other method (always 405).
    Other,
}

/// A request, as the routes see it.
#[derive(Debug)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub idempotency_key: Option<String>,
    pub body: Bytes,
}

/// A response: a status and a JSON body.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    fn json(status: u16, value: &impl Serialize) -> Response {
        match serde_json::to_string(value) {
            Ok(body) => Response { status, body },
            Err(e) => Response::error(500, "encode", &e.to_string()),
        }
    }

    /// An error: `{"error": kind, "message": message}`.
    pub fn error(status: u16, kind: &str, message: &str) -> Response {
        let body = serde_json::json!({ "error": kind, "message": message }).to_string();
        Response { status, body }
    }
}

/// The API over one engine.
#[derive(Clone)]
pub struct Api {
    engine: Engine,
}

impl Api {
    pub fn new(engine: Engine) -> Api {
        Api { engine }
    }

    /// Answers one request.
    pub async fn call(&self, req: Request) -> Response {
        let segments: Vec<&str> = req.path.trim_matches('/').split('/').collect();
        match (req.method, segments.as_slice()) {
            (Method::Get, ["health"]) => {
                let health = self.engine.health().await;
                Response::json(if health.ok() { 200 } else { 503 }, &health)
            }
            (Method::Get, ["metadata"]) => Response {
                status: 200,
                body: self.engine.metadata().to_json(),
            },
            (Method::Post, ["orders", id]) => self.start(id, &req.body).await,
            (Method::Get, ["orders", id]) => self.stage(id).await,
            (Method::Get, ["orders", id, "state"]) => self.state(id).await,
            (Method::Post, ["orders", id, "impulses"]) => {
                self.impulse(id, req.idempotency_key.as_deref(), &req.body)
                    .await
            }
            (Method::Get | Method::Post, _) => {
                Response::error(404, "no_route", &format!("no route for {}", req.path))
            }
            (Method::Other, _) => Response::error(405, "method", "only GET and POST are served"),
        }
    }

    async fn start(&self, id: &str, body: &[u8]) -> Response {
        if let Err(r) = check_id(id) {
            return r;
        }
        let order: NewOrder = match serde_json::from_slice(body) {
            Ok(o) => o,
            Err(e) => return Response::error(400, "bad_body", &format!("a new order: {e}")),
        };
        match self
            .engine
            .start::<Order>(id, OrderState::new(id, order))
            .await
        {
            Ok(_) => Response::json(201, &serde_json::json!({ "id": id })),
            Err(e) => from_error(&e),
        }
    }

    async fn stage(&self, id: &str) -> Response {
        if let Err(r) = check_id(id) {
            return r;
        }
        let stage = async { self.engine.handle::<Order>(id).await?.stage().await };
        match stage.await {
            Ok(stage) => Response::json(200, &serde_json::json!({ "id": id, "stage": stage })),
            Err(e) => from_error(&e),
        }
    }

    async fn state(&self, id: &str) -> Response {
        if let Err(r) = check_id(id) {
            return r;
        }
        let state = async { self.engine.handle::<Order>(id).await?.state().await };
        match state.await {
            Ok(state) => Response::json(200, &state),
            Err(e) => from_error(&e),
        }
    }

    async fn impulse(&self, id: &str, key: Option<&str>, body: &[u8]) -> Response {
        if let Err(r) = check_id(id) {
            return r;
        }
        if let Some(key) = key
            && let Err(r) = check_id(key)
        {
            return r;
        }
        let Ok(json) = std::str::from_utf8(body) else {
            return Response::error(400, "bad_body", "the body is not UTF-8");
        };
        let sent = async {
            let order = self.engine.handle::<Order>(id).await?;
            let request = order.impulse_json(json)?;
            match key {
                Some(key) => request.id(key).await,
                None => request.await,
            }
        };
        match sent.await {
            Ok(()) => Response::json(202, &serde_json::json!({ "id": id, "applied": true })),
            // A retry of an impulse that was applied: success, and nothing changed.
            Err(Error::ImpulseAlreadyApplied { .. }) => Response::json(
                200,
                &serde_json::json!({ "id": id, "applied": false, "reason": "already applied" }),
            ),
            Err(e) => from_error(&e),
        }
    }
}

/// Ids and keys: 1 to 128 of `A-Z a-z 0-9 . _ -` (so paths need no decoding).
fn check_id(id: &str) -> Result<(), Response> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Response::error(
            400,
            "bad_id",
            "an id or idempotency key is 1 to 128 of A-Z a-z 0-9 . _ -",
        ))
    }
}

/// The status code of each engine error.
fn from_error(e: &Error) -> Response {
    let (status, kind) = match e {
        Error::NotFound { .. } => (404, "not_found"),
        Error::AlreadyExists { .. } => (409, "already_exists"),
        Error::Ended { .. } => (409, "ended"),
        Error::Quarantined { .. } => (409, "parked"),
        Error::BadImpulse { .. } => (400, "bad_impulse"),
        Error::Timeout { .. } => (504, "timeout"),
        Error::Shutdown => (503, "shutting_down"),
        Error::Remote { .. } => (502, "remote"),
        _ => (500, "internal"),
    };
    Response::error(status, kind, &e.to_string())
}
