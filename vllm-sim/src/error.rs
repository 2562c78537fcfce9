//! Typed errors: [`SimError`] for starting the simulator and [`ApiError`] for HTTP answers
//! shaped like vLLM's OpenAI-compatible error bodies, or (on `/v1/messages`,
//! [`ApiError::anthropic_response`]) like its Anthropic ones.

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
    /// The error `type` when it is not the one vLLM puts next to the status
    /// ([`ApiError::kind`]), e.g. the Responses API's `invalid_request_error`.
    pub error_type: Option<&'static str>,
    /// The request field at fault (`param`), when vLLM names one.
    pub param: Option<&'static str>,
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
            error_type: None,
            param: None,
        }
    }

    /// The same error with this `type` and `param`, as vLLM's handlers that name them send it.
    pub fn with_type(mut self, error_type: &'static str, param: Option<&'static str>) -> Self {
        self.error_type = Some(error_type);
        self.param = param;
        self
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

    /// The error `type`: the one given ([`ApiError::with_type`]), else the one vLLM puts next
    /// to each status.
    pub fn kind(&self) -> &'static str {
        if let Some(t) = self.error_type {
            return t;
        }
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
                param: self.param,
                code: self.status.as_u16(),
            },
        };
        serde_json::to_string(&body).unwrap_or_else(|_| "{}".to_string())
    }
}

/// Anthropic's error body: `{"type": "error", "error": {"type", "message"}}`.
#[derive(Serialize)]
struct AnthropicErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: AnthropicErrorInner<'a>,
}

#[derive(Serialize)]
struct AnthropicErrorInner<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: &'a str,
}

impl ApiError {
    /// The Anthropic `error.type` of the status, as vLLM's `translate_error_type` maps it.
    pub fn anthropic_kind(&self) -> &'static str {
        match self.status.as_u16() {
            400 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            503 => "overloaded_error",
            s if s >= 500 => "api_error",
            _ => "invalid_request_error",
        }
    }

    /// The Anthropic-shaped JSON body.
    pub fn anthropic_body(&self) -> String {
        let body = AnthropicErrorBody {
            kind: "error",
            error: AnthropicErrorInner {
                kind: self.anthropic_kind(),
                message: &self.message,
            },
        };
        serde_json::to_string(&body).unwrap_or_else(|_| "{}".to_string())
    }

    /// The error as vLLM's `/v1/messages` answers it: same status, Anthropic's body.
    pub fn anthropic_response(&self) -> Response {
        (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            self.anthropic_body(),
        )
            .into_response()
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
        let e = ApiError::new(StatusCode::NOT_FOUND, "gone")
            .with_type("invalid_request_error", Some("response_id"));
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "response_id");
    }

    #[test]
    fn anthropic_body_uses_anthropic_types() {
        for (status, kind) in [
            (400, "invalid_request_error"),
            (404, "not_found_error"),
            (429, "rate_limit_error"),
            (500, "api_error"),
            (503, "overloaded_error"),
            (418, "invalid_request_error"),
        ] {
            let e = ApiError::new(StatusCode::from_u16(status).unwrap(), "m");
            let v: serde_json::Value = serde_json::from_str(&e.anthropic_body()).unwrap();
            assert_eq!(
                v,
                serde_json::json!({"type": "error", "error": {"type": kind, "message": "m"}})
            );
        }
    }
}
