//! The admin listener (loopback by default; never checkout traffic):
//!
//! | endpoint | answer |
//! |---|---|
//! | `GET /` | the live status page (HTML, no external assets) |
//! | `GET /status` | JSON: generation, last reload, tiers, sites ([`status`]) |
//! | `GET /metrics` | Prometheus text |
//! | `GET /healthz` | `200 {"status":"ok",…}`; `503 {"status":"draining",…}` after SIGTERM |
//! | `POST /reload` | reload the config now; bearer token when one is set |

mod status;

use std::sync::Arc;

use async_trait::async_trait;
use http::{header, Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::reload::Trigger;
use crate::Shared;

pub use status::status;

/// The status page, served as is; it polls `/status`.
const STATUS_PAGE: &str = include_str!("status.html");

/// Serves the admin endpoints.
pub struct Admin {
    shared: Arc<Shared>,
}

impl Admin {
    pub fn new(shared: Arc<Shared>) -> Self {
        Admin { shared }
    }

    /// Whether the request carries the configured bearer token (or none is set).
    fn authorized(&self, session: &ServerSession) -> bool {
        let Some(token) = &self.shared.admin_token else {
            return true;
        };
        let given = session
            .req_header()
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        // Compare without an early exit, so timing does not leak a prefix.
        given.is_some_and(|g| {
            g.len() == token.len()
                && g.bytes()
                    .zip(token.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0
        })
    }
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .header(header::CONTENT_LENGTH, body.len())
        .header(header::CACHE_CONTROL, "no-store")
        .body(body)
        .expect("static response parts are valid")
}

fn json_reply(status: StatusCode, body: serde_json::Value) -> Response<Vec<u8>> {
    reply(status, "application/json", body.to_string().into_bytes())
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        match (method, path.as_str()) {
            (Method::GET, "/") => reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                STATUS_PAGE.as_bytes().to_vec(),
            ),
            (Method::GET, "/status") => json_reply(StatusCode::OK, status(&self.shared)),
            (Method::GET, "/metrics") => {
                self.shared.current.load().controllers.publish_gauges();
                crate::health::publish_gauges(&self.shared, std::time::Instant::now());
                crate::tls::publish_expiry(&self.shared);
                let open = self.shared.connections.count();
                self.shared.metrics.connections_open.set(open as i64);
                reply(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    self.shared.metrics.encode(),
                )
            }
            (Method::GET, "/healthz") if self.shared.draining.is_set() => json_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({
                    "status": "draining",
                    "generation": self.shared.generation(),
                }),
            ),
            (Method::GET, "/healthz") => json_reply(
                StatusCode::OK,
                json!({
                    "status": "ok",
                    "generation": self.shared.generation(),
                    "routes": self.shared.current.load().config.routes.len(),
                }),
            ),
            (Method::POST, "/reload") => {
                if !self.authorized(session) {
                    return json_reply(
                        StatusCode::UNAUTHORIZED,
                        json!({"error": "unauthorized", "expected": "Authorization: Bearer <token> (K2PROXY_ADMIN_TOKEN)"}),
                    );
                }
                match self.shared.reload(Trigger::Admin) {
                    Ok(generation) => {
                        let last = self
                            .shared
                            .last_reload
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .clone();
                        json_reply(
                            StatusCode::OK,
                            json!({
                                "result": "ok",
                                "generation": generation,
                                "restart_needed": last.map(|l| l.restart_needed).unwrap_or_default(),
                            }),
                        )
                    }
                    Err(errors) => json_reply(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        json!({
                            "result": "error",
                            "generation": self.shared.generation(),
                            "message": "the config was not changed; the running config keeps serving",
                            "errors": errors.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                        }),
                    ),
                }
            }
            (m, p @ ("/" | "/status" | "/metrics" | "/healthz" | "/reload")) => json_reply(
                StatusCode::METHOD_NOT_ALLOWED,
                json!({"error": "method_not_allowed", "method": m.as_str(), "path": p,
                       "expected": if p == "/reload" { "POST" } else { "GET" }}),
            ),
            (_, p) => json_reply(
                StatusCode::NOT_FOUND,
                json!({"error": "not_found", "path": p, "expected": ["/", "/status", "/metrics", "/healthz", "POST /reload"]}),
            ),
        }
    }
}
