//! Reading the request body in `request_filter`, bounded in size (`max_body_bytes`) and in time
//! (`body_timeout_ms`), after checking the size of the request head (`max_header_bytes`).
//!
//! The declared `Content-Length` is checked before a byte is read (413 at once); chunked bodies are
//! counted while reading (413 as soon as they pass the limit). The whole body must arrive within
//! the body timeout (408 otherwise): Pingora's own read timeout applies to each read, so a client
//! trickling a byte now and then would otherwise hold its connection and buffer for as long as it
//! likes. `Expect: 100-continue` is answered here, since Pingora does not and the body must be read
//! before an upstream is chosen.
//!
//! Pingora has already rejected (400) conflicting framing: differing `Content-Length` values, a
//! `Transfer-Encoding` whose last coding is not `chunked`; with both `Transfer-Encoding` and
//! `Content-Length` it dropped the latter and will close the connection after the response
//! (RFC 9112 §6.1, §6.3). It accepts a repeated identical `Content-Length` (`5, 5` or two `5`
//! lines, RFC 9110 §8.6); such a header is collapsed here to one value before it is forwarded.

use bytes::{Bytes, BytesMut};
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::{Error, ErrorType, Result};

use crate::config::Config;

/// 414 when the request target alone, 431 when target and header fields together, are over
/// `max` bytes. (Pingora itself refuses heads over 1 MiB or with more than 256 fields with 400,
/// before any hook runs; HTTP/2 header lists over 64 KiB are refused by the h2 layer.)
///
/// Also 400 for an HTTP/1.1 request without `Host` (RFC 9112 §3.2: a server MUST), which Pingora
/// lets through.
fn check_head(req: &RequestHeader, max: usize) -> Result<()> {
    if req.version == http::Version::HTTP_11 && !req.headers.contains_key(http::header::HOST) {
        return Error::e_explain(
            ErrorType::HTTPStatus(400),
            "an HTTP/1.1 request needs a Host header",
        );
    }
    let target = req.uri.to_string().len();
    if target > max {
        return Error::e_explain(
            ErrorType::HTTPStatus(414),
            format!("the request target of {target} bytes is over the limit of {max} bytes"),
        );
    }
    // Field sizes as HTTP/2 counts them (name + value + 32 per field), a fair bound for both.
    let fields: usize = req
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 32)
        .sum();
    if target + fields > max {
        return Error::e_explain(
            ErrorType::HTTPStatus(431),
            format!(
                "request header fields of {} bytes are over the limit of {max} bytes",
                target + fields
            ),
        );
    }
    Ok(())
}

/// The most the body buffer reserves before any byte has arrived (Pingora's retry buffer size).
const INITIAL_RESERVE: usize = 64 * 1024;

/// Check the request head against `max_header_bytes`, then read the whole request body (empty
/// for bodyless requests) within `max_body_bytes` and `body_timeout`.
pub(crate) async fn read(session: &mut Session, config: &Config) -> Result<Bytes> {
    check_head(session.req_header(), config.max_header_bytes)?;
    let (max, timeout) = (config.max_body_bytes, config.body_timeout);
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
    // Reserve for what is declared only up to a bound: the buffer grows with the bytes that
    // arrive, so a client declaring a large body and sending nothing costs little.
    let capacity = declared.unwrap_or(0).min(max).min(INITIAL_RESERVE);
    match tokio::time::timeout(timeout, read_all(session, max, capacity)).await {
        Ok(body) => body,
        Err(_) => Error::e_explain(
            ErrorType::HTTPStatus(408),
            format!(
                "the request body did not arrive within {} ms",
                timeout.as_millis()
            ),
        ),
    }
}

async fn read_all(session: &mut Session, max: usize, capacity: usize) -> Result<Bytes> {
    let mut buf = BytesMut::with_capacity(capacity);
    while let Some(chunk) = session.read_request_body().await.map_err(refusal)? {
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

/// The client-facing status of a failure to read the body: it is the client's doing (a truncated
/// or malformed body, a stalled upload), never a 5xx. A client that is really gone just does not
/// get the answer.
// Foreign enum (pingora's ErrorType): every other read error means a malformed body.
#[allow(clippy::wildcard_enum_match_arm)]
fn refusal(e: Box<Error>) -> Box<Error> {
    let (status, why) = match e.etype() {
        ErrorType::ReadTimedout => (408, "the request body stalled"),
        ErrorType::ConnectionClosed => (400, "the request body ended early"),
        _ => (400, "the request body is malformed"),
    };
    Error::because(ErrorType::HTTPStatus(status), why, e)
}

/// The `Content-Length` the client declared, if any (400 if it is not a number, or repeated with
/// different values). A repeated identical value is collapsed into one header.
fn declared_length(session: &mut Session) -> Result<Option<usize>> {
    let headers = &session.req_header().headers;
    if headers.contains_key(http::header::TRANSFER_ENCODING) {
        // Chunked framing; Pingora has already dropped any Content-Length.
        return Ok(None);
    }
    let mut values = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    let repeated = values.next().is_some();
    let mut length = None;
    for value in headers.get_all(http::header::CONTENT_LENGTH) {
        let text = value.to_str().unwrap_or("");
        for token in text.split(',') {
            let n = parse_length(token.trim());
            match (n, length) {
                (Some(n), None) => length = Some(n),
                (Some(n), Some(m)) if n == m => {}
                _ => return Error::e_explain(ErrorType::HTTPStatus(400), "invalid Content-Length"),
            }
        }
    }
    let Some(n) = length else {
        return Error::e_explain(ErrorType::HTTPStatus(400), "invalid Content-Length");
    };
    if repeated || first.as_bytes().contains(&b',') {
        session
            .req_header_mut()
            .insert_header(http::header::CONTENT_LENGTH, n.to_string())?;
    }
    Ok(Some(n))
}

/// `1*DIGIT` (RFC 9110 §8.6): no sign, no spaces, no hex.
fn parse_length(token: &str) -> Option<usize> {
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    token.parse().ok()
}
