//! Admission through a pool's waiting room ([`crate::admission`]): the request's band (its
//! priority header, else `criticalModels`, else the default band) and tenant, then a slot or a
//! refusal — 429 with `Retry-After` (503 for a critical request) — before any endpoint is chosen.

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
    session: &Session,
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
    match room.admit(band, &tenant, endpoints).await {
        Ok(permit) => Ok(permit),
        Err(refused) => {
            let deadline = config.bands[band.index()].deadline;
            ctx.retry_after = Some(deadline.as_secs().max(1));
            ctx.shared.lock().reason = match refused {
                Refused::QueueFull(_) => "queue_full",
                Refused::Deadline(_) => "queue_deadline",
            };
            let status = if band == Band::Critical { 503 } else { 429 };
            Error::e_explain(
                ErrorType::HTTPStatus(status),
                format!(
                    "pool '{}' is overloaded: {refused}; retry later",
                    pool.name()
                ),
            )
        }
    }
}
