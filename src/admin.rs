//! The admin listener: `GET /metrics` (Prometheus text), `GET /healthz`, and `POST /-/reload`
//! (reload the policy file, as SIGHUP does, and answer with the verdict). Reloads are accepted
//! only from loopback clients, whatever address the listener is bound to.

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::{HttpServer, ServeHttp};
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;
use pingora_prometheus::prometheus::{self, Encoder, TextEncoder};

use crate::routing::{ReloadError, ReloadHandle};

/// Serves the admin endpoints.
pub struct AdminApp {
    reload: ReloadHandle,
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
            ("/-/reload", Method::POST) => self.reload(session).await,
            ("/metrics" | "/healthz", _) | ("/-/reload", _) => reply(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                b"method not allowed: GET /metrics, GET /healthz, POST /-/reload\n".to_vec(),
            ),
            _ => reply(
                StatusCode::NOT_FOUND,
                "text/plain",
                b"not found: try GET /metrics, GET /healthz or POST /-/reload\n".to_vec(),
            ),
        }
    }
}

/// The admin service listening on `addr`; `POST /-/reload` goes to `reload`.
pub fn service(addr: &str, reload: ReloadHandle) -> Service<HttpServer<AdminApp>> {
    let mut svc = Service::new(
        "admin".to_string(),
        HttpServer::new_app(AdminApp { reload }),
    );
    svc.add_tcp(addr);
    svc
}
