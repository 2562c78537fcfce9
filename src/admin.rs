//! The admin listener: the status page (`GET /`, refreshing itself from `GET /status`, the same
//! snapshot as JSON; see [`crate::status`]), `GET /metrics` (Prometheus text), `GET /healthz`,
//! and `POST /-/reload` (reload the policy file, as SIGHUP does, and answer with the verdict).
//! Reloads are accepted only from loopback clients, whatever address the listener is bound to.
//! The page is one self-contained file (no external assets), so it works offline.

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::{HttpServer, ServeHttp};
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;
use pingora_prometheus::prometheus::{self, Encoder, TextEncoder};

use crate::routing::{Live, ReloadError, ReloadHandle};
use crate::status::Status;

/// The status page.
const STATUS_PAGE: &str = include_str!("admin/status.html");

const ROUTES: &str = "GET / (status page), GET /status, GET /metrics, GET /healthz, POST /-/reload";

/// Serves the admin endpoints.
pub struct AdminApp {
    reload: ReloadHandle,
    live: Live,
    started: std::time::Instant,
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = resp.body().len();
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    resp
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Vec<u8>> {
    let mut body = value.to_string().into_bytes();
    body.push(b'\n');
    reply(status, "application/json", body)
}

impl AdminApp {
    fn status(&self) -> Response<Vec<u8>> {
        let status = Status::of(
            self.live.current().as_deref(),
            self.reload.last(),
            self.started,
        );
        match serde_json::to_value(status) {
            Ok(v) => json(StatusCode::OK, v),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                e.to_string().into_bytes(),
            ),
        }
    }

    async fn reload(&self, session: &ServerSession) -> Response<Vec<u8>> {
        let loopback = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .is_some_and(|a| a.ip().is_loopback());
        if !loopback {
            return json(
                StatusCode::FORBIDDEN,
                serde_json::json!({"error": "reload is accepted from loopback clients only"}),
            );
        }
        match self.reload.reload().await {
            Ok(generation) => json(
                StatusCode::OK,
                serde_json::json!({"reloaded": true, "generation": generation}),
            ),
            Err(e) => {
                let status = match e {
                    ReloadError::Invalid(_) => StatusCode::BAD_REQUEST,
                    ReloadError::Failed(_) => StatusCode::INTERNAL_SERVER_ERROR,
                    ReloadError::NotRunning => StatusCode::SERVICE_UNAVAILABLE,
                };
                json(
                    status,
                    serde_json::json!({"reloaded": false, "error": e.to_string()}),
                )
            }
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        match (session.req_header().uri.path(), method) {
            ("/metrics", Method::GET) => {
                let encoder = TextEncoder::new();
                let mut buf = Vec::new();
                match encoder.encode(&prometheus::gather(), &mut buf) {
                    Ok(()) => reply(StatusCode::OK, encoder.format_type(), buf),
                    Err(e) => reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "text/plain",
                        e.to_string().into_bytes(),
                    ),
                }
            }
            ("/healthz", Method::GET) => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            ("/", Method::GET) => reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                STATUS_PAGE.as_bytes().to_vec(),
            ),
            ("/status", Method::GET) => self.status(),
            ("/-/reload", Method::POST) => self.reload(session).await,
            ("/" | "/status" | "/metrics" | "/healthz" | "/-/reload", _) => reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                format!("method not allowed: {ROUTES}\n").into_bytes(),
            ),
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                format!("not found: try {ROUTES}\n").into_bytes(),
            ),
        }
    }
}

/// The admin service listening on `addr`: the status of the routing table in `live`;
/// `POST /-/reload` goes to `reload`.
pub fn service(addr: &str, live: Live, reload: ReloadHandle) -> Service<HttpServer<AdminApp>> {
    let app = AdminApp {
        reload,
        live,
        started: std::time::Instant::now(),
    };
    let mut svc = Service::new("admin".to_string(), HttpServer::new_app(app));
    svc.add_tcp(addr);
    svc
}
