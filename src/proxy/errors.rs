//! OpenAI-style error responses (`{"error": {"message", "type", "param", "code"}}`).

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorType};

/// The OpenAI error `type` and `code` for a status we generate.
fn kind(status: u16) -> (&'static str, &'static str) {
    match status {
        404 => ("invalid_request_error", "model_not_found"),
        408 => ("invalid_request_error", "request_timeout"),
        413 => ("invalid_request_error", "request_too_large"),
        414 => ("invalid_request_error", "uri_too_long"),
        431 => ("invalid_request_error", "headers_too_large"),
        429 => ("rate_limit_error", "overloaded"),
        503 => ("server_error", "no_endpoint_available"),
        504 => ("server_error", "upstream_timeout"),
        400..=499 => ("invalid_request_error", "bad_request"),
        _ => ("server_error", "upstream_error"),
    }
}

/// The JSON body of an error.
pub fn body(status: u16, message: &str) -> Bytes {
    let (kind, code) = kind(status);
    let v = serde_json::json!({
        "error": {"message": message, "type": kind, "param": serde_json::Value::Null, "code": code}
    });
    Bytes::from(v.to_string())
}

/// Write an error response unless a response has already started, with `Retry-After` (seconds)
/// when given. Closes the connection after.
pub async fn respond(
    session: &mut Session,
    status: u16,
    message: &str,
    retry_after: Option<u64>,
) -> pingora::Result<()> {
    let body = body(status, message);
    let mut resp = ResponseHeader::build(status, Some(4))?;
    if let Some(secs) = retry_after {
        resp.insert_header("retry-after", secs.to_string())?;
    }
    resp.insert_header("content-type", "application/json")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    session
        .as_downstream_mut()
        .write_error_response(resp, body)
        .await
}

/// The client-facing status and message for a proxy error.
// Foreign enum (pingora's ErrorType): every type not listed gets its status from the source.
#[allow(clippy::wildcard_enum_match_arm)]
pub fn classify(e: &Error) -> (u16, String) {
    use pingora::ErrorSource;
    let status = match e.etype() {
        ErrorType::HTTPStatus(code) => *code,
        ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout => {
            match e.esource() {
                ErrorSource::Downstream => 408,
                ErrorSource::Upstream | ErrorSource::Internal | ErrorSource::Unset => 504,
            }
        }
        _ => match e.esource() {
            ErrorSource::Upstream => 502,
            ErrorSource::Downstream => 400,
            ErrorSource::Internal | ErrorSource::Unset => 500,
        },
    };
    let message = match e.context.as_ref() {
        Some(c) if matches!(e.etype(), ErrorType::HTTPStatus(_)) => c.as_str().to_string(),
        _ => format!("{} ({})", reason_phrase(status), e.etype().as_str()),
    };
    (status, message)
}

fn reason_phrase(status: u16) -> &'static str {
    http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("error")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_openai_shaped() {
        let v: serde_json::Value =
            serde_json::from_slice(&body(404, "no such model")).expect("json");
        assert_eq!(v["error"]["message"], "no such model");
        assert_eq!(v["error"]["code"], "model_not_found");
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn classification() {
        let e = Error::explain(ErrorType::HTTPStatus(413), "body over 10 bytes");
        assert_eq!(classify(&e), (413, "body over 10 bytes".to_string()));
        assert_eq!(classify(&Error::new_up(ErrorType::ConnectRefused)).0, 502);
        assert_eq!(classify(&Error::new_up(ErrorType::ReadTimedout)).0, 504);
    }
}
