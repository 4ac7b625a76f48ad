//! The admin listener: `GET /metrics` (Prometheus text) and `GET /healthz`.
//! Loopback by default; it never carries checkout traffic.

use std::sync::Arc;

use async_trait::async_trait;
use http::{header, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;

use crate::metrics::Metrics;
use crate::Shared;

/// Serves the admin endpoints from the shared config and metrics.
pub struct Admin {
    shared: Arc<Shared>,
}

impl Admin {
    pub fn new(shared: Arc<Shared>) -> Self {
        Admin { shared }
    }

    fn metrics(&self) -> &Metrics {
        &self.shared.metrics
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

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let path = req.uri.path();
        if req.method != http::Method::GET {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "application/json",
                br#"{"error":"method_not_allowed","expected":"GET"}"#.to_vec(),
            );
        }
        match path {
            "/metrics" => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                self.metrics().encode(),
            ),
            "/healthz" => {
                let snap = self.shared.config.load();
                let body = serde_json::json!({
                    "status": "ok",
                    "generation": self.metrics().config_generation.get(),
                    "routes": snap.routes.len(),
                });
                reply(StatusCode::OK, "application/json", body.to_string().into_bytes())
            }
            _ => reply(
                StatusCode::NOT_FOUND,
                "application/json",
                serde_json::json!({"error": "not_found", "path": path, "expected": ["/metrics", "/healthz"]})
                    .to_string()
                    .into_bytes(),
            ),
        }
    }
}
