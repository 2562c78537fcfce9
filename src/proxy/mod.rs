//! The Pingora `ProxyHttp` implementation: read the body, route to a pool, let its policy pick an
//! endpoint, stream the answer back, retry elsewhere when that is safe, release exactly once.
//!
//! ```text
//! request_filter   read body (≤ max_body_bytes, 413) → LlmRequest → pool by model (404)
//!                  body > 64 KiB: hand over to a subrequest with the body preset (see below)
//! upstream_peer    finish the previous attempt (retry) → candidates (healthy, untried)
//!                  → policy.pick (or the round-robin fallback) → Attempt {lease, in-flight}
//! fail_to_connect  retry on another endpoint while attempts and candidates remain
//! error_while_proxy  stale pooled connection, nothing answered → same endpoint, fresh connection;
//!                  engine died before answering → retry elsewhere
//! response_*       stream through chunk by chunk (SSE), count bytes and time to first byte
//! fail_to_proxy    OpenAI-style JSON error unless the response already started
//! logging          finish the attempt (exactly once; CTX drop covers every other path), access log
//! ```
//!
//! **Bodies.** Pingora calls `request_body_filter` only after `upstream_peer`, so the body is read in
//! `request_filter`. Pingora 0.9 replays an already-read body only from its retry buffer, which
//! holds 64 KiB. Bodies up to that size are replayed by Pingora itself (also on retries). Larger ones
//! are proxied by a Pingora subrequest whose body is preset from memory, so they arrive byte-exact
//! with their original Content-Length. A subrequest cannot replay its body for a second attempt,
//! so for those the parent runs a new subrequest when a retry is due.
//!
//! **Stale keep-alive connections.** Engines close idle keep-alive connections (uvicorn under vLLM
//! and SGLang, and llama.cpp, after 5 s). A request that reuses a pooled connection the engine has
//! just closed fails before any answer; that says nothing about the endpoint, so the request goes
//! to the *same* endpoint again over a fresh connection (the attempt, its lease and its in-flight
//! count are kept; it is not a retry, is not excluded and does not count toward outlier
//! ejection). Only a fresh connection's failure moves a request elsewhere. Pooled connections are
//! kept idle for less than engines keep them (`upstream.idle_timeout_ms`), so the race is rare.

mod admit;
mod body;
pub mod choose;
mod ctx;
pub mod errors;
pub mod h2c;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::subrequest::pipe::{pipe_subrequest, InputBody, InputBodyType};
use pingora::proxy::subrequest::{BodyMode, Ctx as SubrequestCtx};
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::{Error, ErrorSource, ErrorType, Result};

use choose::ChooseError;
use ctx::SubrequestInput;
pub use ctx::{Attempt, RequestCtx, Role, Route};

use crate::config::UpstreamConfig;
use crate::drain::Draining;
use crate::endpoint::Outcome;
use crate::policy::PolicyError;
use crate::request::LlmRequest;
use crate::routing::Live;
use crate::telemetry;
use crate::telemetry::trace::{RequestSpan, SpanEnd};

/// How long a refused upload (413) is read and discarded before the connection closes.
const LINGER: Duration = Duration::from_secs(5);

/// llm-lb's proxy application.
pub struct LbProxy {
    live: Live,
    draining: Draining,
}

impl LbProxy {
    /// A proxy over the routing table in force in `live`; once `draining` is set, responses
    /// close their client connection.
    pub fn new(live: Live, draining: Draining) -> Self {
        LbProxy { live, draining }
    }

    /// Whether another attempt may be made for this request.
    fn may_retry(&self, ctx: &RequestCtx) -> bool {
        let Some(route) = ctx.route.as_ref() else {
            return false;
        };
        let tried = ctx.shared.lock().tried.clone();
        tried.len() < route.routes.config.max_attempts
            && !route.pool.candidates(&tried).ids.is_empty()
    }

    /// Proxy a body too large for Pingora's retry buffer through subrequests with a preset body.
    async fn forward_via_subrequest(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        body: Bytes,
    ) -> Result<bool> {
        let route = ctx
            .route
            .clone()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "request has no route"))?;
        // The subrequest re-parses the header as HTTP/1.1: make an HTTP/2 request look like one.
        if session.req_header().version == http::Version::HTTP_2 {
            let host = session.req_header().uri.authority().map(|a| a.to_string());
            let req = session.req_header_mut();
            req.set_version(http::Version::HTTP_11);
            if let Some(h) = host {
                req.insert_header(http::header::HOST, h)?;
            }
        }
        ctx.role = Role::Parent;
        loop {
            let input = SubrequestInput {
                route: route.clone(),
                shared: ctx.shared.clone(),
                started: ctx.started,
            };
            let sub_ctx = SubrequestCtx::builder()
                .body_mode(BodyMode::ExpectBody)
                .user_ctx(Box::new(input))
                .build();
            let spawner = session.subrequest_spawner.as_ref().ok_or_else(|| {
                Error::explain(ErrorType::InternalError, "subrequests are not enabled")
            })?;
            let (prepared, handle) = spawner.create_subrequest(session.as_downstream(), sub_ctx);
            let preset = InputBodyType::Preset(InputBody::Bytes(vec![body.clone()]));
            match pipe_subrequest(session, prepared, handle, |t| Ok(Some(t)), preset).await {
                Ok(mut state) => {
                    if let Some(join) = state.join_handle.take() {
                        let _ = join.await;
                    }
                    return Ok(true);
                }
                Err(failed) => {
                    let mut shared = ctx.shared.lock();
                    let again = std::mem::take(&mut shared.retry_due);
                    if again && !failed.state.header_received {
                        if shared.reconnect.is_none() {
                            telemetry::count_retry(route.pool.name());
                        }
                        continue;
                    }
                    return Err(failed.error);
                }
            }
        }
    }

    /// Send the request again to the endpoint of `attempt`, whose pooled connection was closed by
    /// the server, over a connection of its own.
    fn reconnect(
        &self,
        ctx: &mut RequestCtx,
        route: &Route,
        attempt: Attempt,
    ) -> Result<Box<HttpPeer>> {
        let pool = &route.pool;
        let Some(endpoint) = pool.endpoint(attempt.endpoint) else {
            attempt.finish(Outcome::Failed);
            return Error::e_explain(ErrorType::InternalError, "reconnect to an unknown endpoint");
        };
        ctx.shared.lock().reconnects += 1;
        telemetry::count_reconnect(pool.name());
        let mut peer = Self::peer(endpoint.addr, &route.routes.config.upstream);
        peer.group_key = fresh_connection_group();
        ctx.attempt = Some(attempt);
        Ok(Box::new(peer))
    }

    fn peer(addr: std::net::SocketAddr, up: &UpstreamConfig) -> HttpPeer {
        let mut peer = HttpPeer::new(addr, false, String::new());
        peer.options.connection_timeout = Some(up.connect_timeout);
        peer.options.total_connection_timeout = Some(up.connect_timeout);
        peer.options.read_timeout = Some(up.read_timeout);
        peer.options.write_timeout = Some(up.write_timeout);
        peer.options.idle_timeout = Some(up.idle_timeout);
        peer
    }
}

/// A connection-pool group no other attempt uses: a peer with it always gets a fresh connection.
fn fresh_connection_group() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn outcome_of(e: Option<&Error>) -> Outcome {
    match e {
        None => Outcome::Completed,
        Some(e) if *e.esource() == ErrorSource::Downstream => Outcome::Aborted,
        Some(_) => Outcome::Failed,
    }
}

fn choose_error(pool: &str, e: ChooseError) -> Box<Error> {
    match e {
        ChooseError::Policy(PolicyError::Saturated) => Error::explain(
            ErrorType::HTTPStatus(429),
            format!("every endpoint of pool '{pool}' is at capacity; retry later"),
        ),
        ChooseError::Policy(PolicyError::Unavailable(why)) => Error::explain(
            ErrorType::HTTPStatus(503),
            format!("no endpoint of pool '{pool}' is available: {why}"),
        ),
        ChooseError::GaveUp(_) => Error::explain(ErrorType::HTTPStatus(502), e.to_string()),
        ChooseError::NoCandidate(_) => Error::explain(ErrorType::HTTPStatus(503), e.to_string()),
        ChooseError::NotACandidate => Error::explain(ErrorType::InternalError, e.to_string()),
    }
}

#[async_trait]
impl ProxyHttp for LbProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx::new()
    }

    fn allow_spawning_subrequest(&self, _session: &Session, _ctx: &RequestCtx) -> bool {
        true
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // A subrequest: the parent already read and routed the request.
        if let Some(input) = session
            .subrequest_ctx
            .as_ref()
            .and_then(|s| s.user_ctx())
            .and_then(|u| u.downcast_ref::<SubrequestInput>())
            .cloned()
        {
            ctx.role = Role::Sub;
            ctx.route = Some(input.route);
            ctx.shared = input.shared;
            ctx.started = input.started;
            return Ok(false);
        }

        let arrived = SystemTime::now()
            .checked_sub(ctx.started.elapsed())
            .unwrap_or_else(SystemTime::now);
        let req = session.req_header();
        ctx.trace = RequestSpan::start(req.method.as_str(), req.uri.path(), &req.headers, arrived);
        if let Some(span) = &ctx.trace {
            ctx.shared.lock().propagate = span.propagation_headers();
        }
        // Record the body in Pingora's retry buffer (≤ 64 KiB) so it is replayed upstream.
        session.as_downstream_mut().enable_retry_buffering();
        let Some(routes) = self.live.current() else {
            return Error::e_explain(
                ErrorType::HTTPStatus(503),
                "llm-lb is starting: no routing table yet",
            );
        };
        let reading = Instant::now();
        let body = body::read(session, &routes.config).await?;
        ctx.read_body = Some(reading.elapsed());
        ctx.request_bytes = body.len();
        let mut request = LlmRequest::parse_path(session.req_header().uri.path(), &body);
        let Some(pool) = routes.pool_for(request.model.as_deref()).cloned() else {
            let model = request.model.as_deref().unwrap_or_default();
            return Error::e_explain(
                ErrorType::HTTPStatus(404),
                format!("The model `{model}` does not exist."),
            );
        };
        if let Some(sessions) = &pool.config.session {
            request.session = sessions
                .session_of(&session.req_header().headers, request.json.as_deref())
                .map(|id| crate::prefix::session_key(&id));
        }
        if let Some(room) = &pool.room {
            ctx.permit = Some(admit::admit(session, ctx, room, &pool, &request).await?);
        }
        ctx.route = Some(Route {
            routes,
            pool,
            request: Arc::new(request),
        });
        if !body.is_empty() && session.as_downstream().retry_buffer_truncated() {
            return self.forward_via_subrequest(session, ctx, body).await;
        }
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let route = ctx
            .route
            .clone()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "request has no route"))?;
        let pool = &route.pool;
        let config = &route.routes.config;
        let stale = ctx.shared.lock().reconnect.take();
        if let Some(attempt) = stale {
            return self.reconnect(ctx, &route, attempt);
        }
        if let Some(previous) = ctx.attempt.take() {
            previous.finish(Outcome::Failed);
            telemetry::count_retry(pool.name());
        }
        let tried = ctx.shared.lock().tried.clone();
        let choosing = Instant::now();
        let chosen = choose::choose(pool, &route.request, &tried, config.max_attempts).await;
        ctx.shared.lock().choosing += choosing.elapsed();
        let chosen = match chosen {
            Ok(chosen) => chosen,
            Err(e) => {
                if let ChooseError::Policy(p) = &e {
                    let mut shared = ctx.shared.lock();
                    shared.policy = pool.policy.name();
                    shared.reason = p.label();
                }
                return Err(choose_error(pool.name(), e));
            }
        };
        let addr = chosen.addr;
        {
            let mut shared = ctx.shared.lock();
            shared.picked_at = Some(ctx.started.elapsed());
            shared.tried.push(chosen.attempt.endpoint);
            shared.endpoint = Some(addr);
            shared.policy = chosen.policy;
            shared.reason = chosen.reason;
        }
        ctx.attempt = Some(chosen.attempt);
        Ok(Box::new(Self::peer(addr, &config.upstream)))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        log::debug!("connect to {peer} failed: {e}");
        if let Some(attempt) = ctx.attempt.as_mut() {
            attempt.observed.error(&e);
        }
        if self.may_retry(ctx) {
            e.set_retry(true);
        }
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        // Pingora leaves "retry only if the connection was reused" to us: a reused connection
        // that failed before any answer is a stale keep-alive connection the server closed.
        e.retry.decide_reuse(client_reused);
        let stale = client_reused && e.retry() && session.response_written().is_none();
        let retry = if stale {
            // Nobody's fault: same endpoint, same attempt, fresh connection.
            log::debug!("pooled connection to {peer} was closed by the server; reconnecting");
            let attempt = ctx.attempt.take();
            let mut shared = ctx.shared.lock();
            shared.reconnect = attempt;
            shared.reconnect.is_some()
        } else {
            // An engine that died (crash, kill, reset) before answering produced nothing the
            // client saw: the request is as new, and goes elsewhere.
            let died_unanswered = *e.esource() == ErrorSource::Upstream
                && matches!(
                    e.etype(),
                    ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
                )
                && ctx.attempt.as_ref().is_some_and(|a| !a.observed.answered());
            if let Some(attempt) = ctx.attempt.as_mut() {
                attempt.observed.error(&e);
            }
            (e.retry() || died_unanswered)
                && session.response_written().is_none()
                && self.may_retry(ctx)
        };
        match ctx.role {
            Role::Sub => {
                // A subrequest cannot send its body twice; the parent runs a fresh one.
                if retry {
                    ctx.shared.lock().retry_due = true;
                }
                e.set_retry(false);
            }
            Role::Direct | Role::Parent => {
                e.set_retry(retry && !session.as_downstream().retry_buffer_truncated());
            }
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // The body was read (and any 100-continue answered) before the upstream was chosen.
        upstream_request.remove_header(&http::header::EXPECT);
        // Tracing on: the engine's span becomes a child of this request's.
        let propagate = ctx.shared.lock().propagate.clone();
        for (name, value) in propagate {
            upstream_request.insert_header(name, value)?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(attempt) = ctx.attempt.as_mut() {
            attempt.observed.status(upstream_response.status.as_u16());
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if self.draining.is_set() {
            // Pingora then answers with `Connection: close`.
            session.set_keepalive(None);
        }
        let elapsed = ctx.started.elapsed();
        let mut shared = ctx.shared.lock();
        shared.first_byte.get_or_insert(elapsed);
        let expose = ctx
            .route
            .as_ref()
            .is_some_and(|r| r.routes.config.expose_endpoint_header);
        if expose {
            if let Some(addr) = shared.endpoint {
                upstream_response.insert_header("x-llm-lb-endpoint", addr.to_string())?;
            }
            if !shared.policy.is_empty() {
                upstream_response.insert_header("x-llm-lb-policy", shared.policy)?;
            }
            if !shared.reason.is_empty() {
                upstream_response.insert_header("x-llm-lb-reason", shared.reason)?;
            }
        }
        Ok(())
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(b) = body.as_ref().filter(|b| !b.is_empty()) {
            if let Some(attempt) = ctx.attempt.as_mut() {
                attempt.body(b);
            }
            let mut shared = ctx.shared.lock();
            if shared.response_bytes == 0 {
                shared.first_byte = Some(ctx.started.elapsed());
            }
            shared.response_bytes += b.len();
            shared.tail.push(b);
        }
        Ok(None)
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let (status, message) = errors::classify(e);
        let client_gone = *e.esource() == ErrorSource::Downstream
            && matches!(
                e.etype(),
                ErrorType::WriteError
                    | ErrorType::ReadError
                    | ErrorType::ConnectionClosed
                    | ErrorType::H2Error
            );
        // A subrequest leaves the answer to its parent (which may still retry elsewhere).
        if ctx.role != Role::Sub && !client_gone && session.response_written().is_none() {
            let retry_after = ctx.retry_after.filter(|_| status == 429 || status == 503);
            if let Err(write_err) = errors::respond(session, status, &message, retry_after).await {
                log::debug!("could not send the error response: {write_err}");
            } else if status == 413 {
                // Lingering close (as nginx): the client may still be sending the body we refused.
                // Closing on unread data resets the connection, and a client whose upload then
                // fails never reads the 413. Read and discard the rest, for a bounded time.
                let _ = tokio::time::timeout(LINGER, session.drain_request_body()).await;
            }
        }
        FailToProxy {
            error_code: if client_gone { 0 } else { status },
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, e: &Error) -> bool {
        // Subrequest failures are reported by the parent; HTTP statuses we chose are not errors.
        ctx.role == Role::Sub || matches!(e.etype(), ErrorType::HTTPStatus(_))
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let attempt = match ctx.role {
            // A subrequest's reconnect is the parent's to run (or to finish here).
            Role::Sub => ctx.attempt.take(),
            Role::Direct | Role::Parent => ctx
                .attempt
                .take()
                .or_else(|| ctx.shared.lock().reconnect.take()),
        };
        if let Some(mut attempt) = attempt {
            if let Some(e) = e {
                attempt.observed.error(e);
            }
            attempt.finish(outcome_of(e));
        }
        if ctx.role == Role::Sub {
            return;
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let req = session.req_header();
        let shared = ctx.shared.lock();
        let pool = ctx.route.as_ref().map(|r| r.pool.name().to_string());
        let endpoint = shared.endpoint.map(|a| a.to_string());
        let pool_label = pool.as_deref().unwrap_or("-");
        telemetry::count_request(pool_label, endpoint.as_deref().unwrap_or("-"), status);
        telemetry::observe_timing(pool_label, ctx.started.elapsed(), shared.first_byte);
        if let Some(usage) = shared.tail.usage() {
            telemetry::count_tokens(pool_label, usage.prompt, usage.completion, usage.cached);
        }
        let error = e.map(|e| e.etype().as_str());
        if let Some(span) = ctx.trace.take() {
            span.end(SpanEnd {
                pool: pool.as_deref(),
                model: ctx.route.as_ref().and_then(|r| r.request.model.as_deref()),
                policy: shared.policy,
                reason: shared.reason,
                endpoint: endpoint.clone(),
                attempts: shared.tried.len(),
                reconnects: shared.reconnects,
                status,
                error,
                read_body: ctx.read_body,
                choose: shared.choosing,
                wait_first_byte: shared
                    .first_byte
                    .zip(shared.picked_at)
                    .map(|(first, picked)| first.saturating_sub(picked)),
            });
        }
        telemetry::AccessLog {
            method: req.method.as_str(),
            path: req.uri.path(),
            model: ctx.route.as_ref().and_then(|r| r.request.model.as_deref()),
            pool: pool.as_deref(),
            endpoint: shared.endpoint,
            policy: shared.policy,
            reason: shared.reason,
            status,
            attempts: shared.tried.len(),
            reconnects: shared.reconnects,
            duration: ctx.started.elapsed(),
            ttfb: shared.first_byte,
            request_bytes: ctx.request_bytes,
            response_bytes: shared.response_bytes,
            error,
        }
        .emit();
    }
}
