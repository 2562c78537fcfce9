//! The admin listener: `GET /metrics` (Prometheus text) and `GET /healthz`.

use async_trait::async_trait;
use http::Response;
use pingora::apps::http_app::{HttpServer, ServeHttp};
use pingora::protocols::http::ServerSession;
use pingora::services::listening::Service;
use pingora_prometheus::prometheus::{self, Encoder, TextEncoder};

/// Serves the admin endpoints.
pub struct AdminApp;

fn reply(status: u16, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    let mut resp = Response::new(body);
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    let len = resp.body().len();
    resp.headers_mut()
        .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
    resp
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        match session.req_header().uri.path() {
            "/metrics" => {
                let encoder = TextEncoder::new();
                let mut buf = Vec::new();
                match encoder.encode(&prometheus::gather(), &mut buf) {
                    Ok(()) => reply(200, encoder.format_type(), buf),
                    Err(e) => reply(500, "text/plain", e.to_string().into_bytes()),
                }
            }
            "/healthz" => reply(200, "text/plain", b"ok\n".to_vec()),
            _ => reply(
                404,
                "text/plain",
                b"not found: try /metrics or /healthz\n".to_vec(),
            ),
        }
    }
}

/// The admin service listening on `addr`.
pub fn service(addr: &str) -> Service<HttpServer<AdminApp>> {
    let mut svc = Service::new("admin".to_string(), HttpServer::new_app(AdminApp));
    svc.add_tcp(addr);
    svc
}
