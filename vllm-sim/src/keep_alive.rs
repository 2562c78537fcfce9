//! Serving one connection, with the idle keep-alive timeout of the engines' HTTP servers.
//!
//! uvicorn (the server under vLLM and SGLang, `--timeout-keep-alive`, 5 s by default) and
//! llama.cpp's `llama-server` (cpp-httplib, 5 s) close an HTTP/1.1 keep-alive connection that
//! has finished its last response and then receives no request bytes for the timeout. The
//! close is a plain TCP close (FIN), with no response. A proxy that reuses a pooled
//! connection at that moment races the close. vllm-sim does the same, so tests and benchmarks
//! see that race. The rules:
//!
//! * The timer starts when a response has been fully handed to hyper: hyper drops a response
//!   body after its last frame. A fresh connection is not timed before its first response, as
//!   in uvicorn, which arms the timer only when a response completes. cpp-httplib would also
//!   close a fresh idle connection.
//! * A request in progress holds the connection open. That lasts from a parsed request head
//!   to the end of its response, so a long SSE stream with long pauses between tokens is
//!   never cut.
//! * Request bytes that arrive while the connection is idle restart the timer.
//! * When the timer expires, `graceful_shutdown` on the hyper connection closes it. An idle
//!   HTTP/1 connection is closed at once.
//! * The timeout is wall-clock time. `--time-scale` does not scale it, because keep-alive is
//!   a property of the HTTP server, not of the model.
//! * HTTP/2 (h2c, which hyper-util's auto builder accepts) keeps hyper's behaviour: no idle
//!   timeout. The first HTTP/2 request turns the timer off for that connection.
//!
//! hyper 1.x's `http1::Builder::header_read_timeout` is not used. Its deadline does start
//! when the connection becomes idle, but it ends only when a *complete* request head has been
//! parsed, and request bytes arriving meanwhile do not push it back.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use bytes::Bytes;
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::service::Service;
use hyper::{Request, Response, Version};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::service::TowerToHyperService;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Serves `app` on one accepted connection until either side closes it. With
/// `idle_timeout`, the server closes the connection after it has been idle for that long
/// (see the module docs). `None` never closes an idle connection.
pub async fn serve_connection(stream: TcpStream, app: Router, idle_timeout: Option<Duration>) {
    let builder = Builder::new(TokioExecutor::new());
    let Some(timeout) = idle_timeout else {
        // A failed connection (reset, bad request) concerns only its client.
        let _ = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(app))
            .await;
        return;
    };
    let idle = Arc::new(Idle::new(timeout));
    let io = TokioIo::new(TrackedIo {
        inner: stream,
        idle: idle.clone(),
    });
    let svc = TrackedService {
        inner: TowerToHyperService::new(app),
        idle: idle.clone(),
    };
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = idle.expired() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// The idle state of one connection, shared by its IO, its service and its timer.
#[derive(Debug)]
struct Idle {
    timeout: Duration,
    state: Mutex<IdleState>,
    /// Woken when the connection becomes idle (its last response is complete).
    became_idle: Notify,
}

#[derive(Debug)]
struct IdleState {
    /// Requests whose response has not been fully handed to hyper yet.
    in_flight: usize,
    /// A response has completed, so the timer is armed.
    armed: bool,
    /// HTTP/2: never timed.
    h2: bool,
    /// The end of the last response, or the last request bytes read since.
    last_activity: Instant,
}

impl Idle {
    fn new(timeout: Duration) -> Self {
        Idle {
            timeout,
            state: Mutex::new(IdleState {
                in_flight: 0,
                armed: false,
                h2: false,
                last_activity: Instant::now(),
            }),
            became_idle: Notify::new(),
        }
    }

    /// When the connection will have been idle for the timeout, if it is idle now.
    fn deadline(&self) -> Option<Instant> {
        let st = self.state.lock();
        (st.armed && !st.h2 && st.in_flight == 0).then(|| st.last_activity + self.timeout)
    }

    /// Resolves once the connection has been idle for the timeout.
    async fn expired(&self) {
        loop {
            match self.deadline() {
                // `Notify` keeps a permit, so a wake-up between the check and the wait is not lost.
                None => self.became_idle.notified().await,
                Some(at) if at <= Instant::now() => return,
                // Re-checked on waking: a request may have started, or bytes arrived.
                Some(at) => tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = self.became_idle.notified() => {}
                },
            }
        }
    }

    fn request_started(self: &Arc<Self>, version: Version) -> InFlight {
        let mut st = self.state.lock();
        st.in_flight += 1;
        st.h2 |= version == Version::HTTP_2;
        InFlight(self.clone())
    }

    fn response_done(&self) {
        let mut st = self.state.lock();
        st.in_flight = st.in_flight.saturating_sub(1);
        if st.in_flight == 0 {
            st.armed = true;
            st.last_activity = Instant::now();
            drop(st);
            self.became_idle.notify_one();
        }
    }

    fn bytes_read(&self) {
        let mut st = self.state.lock();
        if st.in_flight == 0 {
            st.last_activity = Instant::now();
        }
    }
}

/// Held by a request from its parsed head until its response body is dropped.
#[derive(Debug)]
struct InFlight(Arc<Idle>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.response_done();
    }
}

/// The router as a hyper service whose requests hold an [`InFlight`] until their response
/// body is gone.
#[derive(Debug, Clone)]
struct TrackedService {
    inner: TowerToHyperService<Router>,
    idle: Arc<Idle>,
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<TrackedBody>, std::convert::Infallible>> + Send>>;

impl Service<Request<Incoming>> for TrackedService {
    type Response = Response<TrackedBody>;
    type Error = std::convert::Infallible;
    type Future = ResponseFuture;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let in_flight = self.idle.request_started(req.version());
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            Ok(resp.map(|body| TrackedBody {
                body,
                _in_flight: in_flight,
            }))
        })
    }
}

/// A response body that releases its request's [`InFlight`] when hyper drops it, which hyper
/// does after the last frame.
#[derive(Debug)]
struct TrackedBody {
    body: Body,
    _in_flight: InFlight,
}

impl HttpBody for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The accepted socket, noting when request bytes arrive.
#[derive(Debug)]
struct TrackedIo {
    inner: TcpStream,
    idle: Arc<Idle>,
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.idle.bytes_read();
        }
        res
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
