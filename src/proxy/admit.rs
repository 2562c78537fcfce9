//! Admission through a pool's waiting room ([`crate::admission`]): the request's band (its
//! priority header, else `criticalModels`, else the default band) and tenant, then a slot or a
//! refusal — 429 with `Retry-After` (503 for a critical request) — before any endpoint is chosen.
//! While it waits, the client connection is watched (its whole body has been read): a client
//! that closes it (HTTP/1 FIN, HTTP/2 reset) leaves the queue at once.

use std::sync::Arc;

use pingora::proxy::Session;
use pingora::{Error, ErrorType};

use super::ctx::RequestCtx;
use crate::admission::{tenant_of, Permit, Refused, WaitingRoom};
use crate::config::Band;
use crate::request::LlmRequest;
use crate::routing::Pool;

/// Wait in `room` for a slot for `request`, or the error answering its refusal.
pub(super) async fn admit(
    session: &mut Session,
    ctx: &mut RequestCtx,
    room: &Arc<WaitingRoom>,
    pool: &Pool,
    request: &LlmRequest,
) -> pingora::Result<Permit> {
    let headers = &session.req_header().headers;
    let config = room.config();
    let named = headers
        .get(config.priority_header.as_str())
        .and_then(|v| v.to_str().ok());
    let band = config.band_of(named, request.model.as_deref());
    let tenant = tenant_of(headers, &config.tenant_header);
    let endpoints = pool.candidates(&[]).ids.len();
    let downstream = session.as_downstream_mut();
    let gone = async {
        // The body is read: only a close (or bytes no request may send) can come now.
        if let Err(e) = downstream.read_body_or_idle(true).await {
            if matches!(e.etype(), ErrorType::ConnectionClosed | ErrorType::H2Error) {
                return;
            }
        }
        std::future::pending().await
    };
    let refused = match room.admit(band, &tenant, endpoints, gone).await {
        Ok(permit) => return Ok(permit),
        Err(refused) => refused,
    };
    let reason = match refused {
        Refused::QueueFull(_) => "queue_full",
        Refused::Deadline(_) => "queue_deadline",
        Refused::ClientGone(_) => {
            ctx.shared.lock().reason = "client_gone";
            return Error::e_explain(
                ErrorType::ConnectionClosed,
                "the client closed its connection while waiting for a slot",
            );
        }
    };
    ctx.shared.lock().reason = reason;
    ctx.retry_after = Some(config.bands[band.index()].deadline.as_secs().max(1));
    let status = if band == Band::Critical { 503 } else { 429 };
    Error::e_explain(
        ErrorType::HTTPStatus(status),
        format!(
            "pool '{}' is overloaded: {refused}; retry later",
            pool.name()
        ),
    )
}
