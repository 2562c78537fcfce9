//! Reading the request body in `request_filter`, bounded by `max_body_bytes`.
//!
//! The declared `Content-Length` is checked before a byte is read (413 at once); chunked bodies are
//! counted while reading (413 as soon as they pass the limit). `Expect: 100-continue` is answered
//! here, since Pingora does not and the body must be read before an upstream is chosen.

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};

/// Read the whole request body (empty for bodyless requests).
pub async fn read(session: &mut Session, max: usize) -> Result<Bytes> {
    let declared = declared_length(session)?;
    if let Some(n) = declared {
        if n > max {
            return Error::e_explain(
                ErrorType::HTTPStatus(413),
                format!("request body of {n} bytes is over the limit of {max} bytes"),
            );
        }
    }
    let expects_continue = session
        .req_header()
        .headers
        .get(http::header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if expects_continue && declared != Some(0) {
        session.write_continue_response().await?;
    }
    let mut buf = BytesMut::with_capacity(declared.unwrap_or(0).min(max));
    while let Some(chunk) = session.read_request_body().await? {
        if buf.len() + chunk.len() > max {
            return Error::e_explain(
                ErrorType::HTTPStatus(413),
                format!("request body is over the limit of {max} bytes"),
            );
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

/// The `Content-Length` the client declared, if any (400 if it is not a number).
fn declared_length(session: &Session) -> Result<Option<usize>> {
    let Some(v) = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
    else {
        return Ok(None);
    };
    match v.to_str().ok().and_then(|s| s.trim().parse::<usize>().ok()) {
        Some(n) => Ok(Some(n)),
        None => Error::e_explain(ErrorType::HTTPStatus(400), "invalid Content-Length"),
    }
}
