//! Typed errors: [`SimError`] for starting the simulator and [`ApiError`] for HTTP answers
//! shaped like vLLM's OpenAI-compatible error bodies.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// Another I/O failure while starting.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The KV events publisher could not be set up.
    #[error(transparent)]
    KvEvents(#[from] crate::kv_events::KvEventsError),
    /// The model's tokenizer (`--tokenizer`) could not be loaded.
    #[error("tokenizer {}: {message}", dir.display())]
    Tokenizer {
        /// The directory given.
        dir: std::path::PathBuf,
        /// Why it could not be loaded.
        message: String,
    },
}

/// An error answer of the OpenAI-compatible API:
/// `{"error": {"message", "type", "param", "code"}}` with `code` = HTTP status, as vLLM sends it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{status}: {message}")]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Human-readable reason.
    pub message: String,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorInner<'a>,
}

#[derive(Serialize)]
struct ErrorInner<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: u16,
}

impl ApiError {
    /// An error with any status.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    /// 400: the request is malformed or asks for something impossible.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404: unknown model, as vLLM words it.
    pub fn model_not_found(model: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            format!("The model `{model}` does not exist."),
        )
    }

    /// The error `type` vLLM puts next to each status.
    pub fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 => "BadRequestError",
            401 => "AuthenticationError",
            403 => "PermissionDeniedError",
            404 => "NotFoundError",
            408 => "RequestTimeoutError",
            413 => "RequestEntityTooLargeError",
            422 => "UnprocessableEntityError",
            429 => "RateLimitError",
            503 => "ServiceUnavailableError",
            s if s >= 500 => "InternalServerError",
            _ => "BadRequestError",
        }
    }

    /// The JSON body.
    pub fn body(&self) -> String {
        let body = ErrorBody {
            error: ErrorInner {
                message: &self.message,
                kind: self.kind(),
                param: None,
                code: self.status.as_u16(),
            },
        };
        serde_json::to_string(&body).unwrap_or_else(|_| "{}".to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            self.body(),
        )
            .into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_has_openai_shape() {
        let e = ApiError::model_not_found("nope");
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["error"]["message"], "The model `nope` does not exist.");
        assert_eq!(v["error"]["type"], "NotFoundError");
        assert_eq!(v["error"]["code"], 404);
        assert!(v["error"]["param"].is_null());
    }
}
