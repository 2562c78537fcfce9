//! Telling HTTP/1.1 from h2c (HTTP/2 with prior knowledge) on a new connection, with a deadline.
//!
//! Pingora 0.9 decides by reading the first 24 bytes of every new connection (the length of the
//! HTTP/2 preface) with `read_exact` and **no timeout**. So with `h2c` on, a connection that sends
//! nothing is held forever, and so is an HTTP/1 request shorter than 24 bytes
//! (`GET / HTTP/1.0\r\n\r\n` is 18): it waits for bytes that never come.
//!
//! [`ProtocolSniffer`] does the detection itself: it reads only as far as the bytes still match
//! the preface (one read for any HTTP/1 request: no method starts with `P` followed by `RI `, and
//! `PRI` is not a method), within [`FIRST_BYTES_TIMEOUT`], puts them back, and hands the
//! connection to an HTTP/1-only or an h2c-enabled instance of the same proxy. A connection that
//! sends nothing, or a partial preface, is closed after the timeout.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::{HttpServerOptions, ServerApp};
use pingora::protocols::l4::stream::Stream as TcpStream;
use pingora::protocols::Stream;
use pingora::proxy::{HttpProxy, ProxyHttp, ProxyServiceBuilder};
use pingora::server::configuration::ServerConf;
use pingora::server::ShutdownWatch;
use pingora::services::listening::Service;
use tokio::io::AsyncReadExt;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long a new connection may take to send its first bytes (Pingora's own read timeout for
/// an HTTP/1 request head).
pub const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(60);

/// A [`ServerApp`] that sniffs the protocol with a deadline, then runs the matching proxy.
pub struct ProtocolSniffer<SV: ProxyHttp> {
    h1: Arc<HttpProxy<SV>>,
    /// `None` when h2c is off: every connection is HTTP/1, nothing is sniffed.
    h2c: Option<Arc<HttpProxy<SV>>>,
    timeout: Duration,
}

/// The proxy service over instances of the proxy made by `make`: an HTTP/1-only one and, with
/// `options.h2c`, an h2c-enabled one that connections starting with the HTTP/2 preface go to.
pub fn service<SV>(
    conf: &Arc<ServerConf>,
    name: &str,
    options: HttpServerOptions,
    make: impl Fn() -> SV,
) -> Service<ProtocolSniffer<SV>>
where
    SV: ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
    // HttpProxy::new leaves server options unset: HTTP/1 only, nothing peeked.
    let mut h1 = HttpProxy::new(make(), conf.clone());
    h1.handle_init_modules();
    if !options.h2c {
        let sniffer = ProtocolSniffer {
            h1: Arc::new(h1),
            h2c: None,
            timeout: FIRST_BYTES_TIMEOUT,
        };
        return Service::new(name.to_string(), sniffer);
    }
    let mut h2c_options = options.clone();
    h2c_options.h2c = true;
    // Pingora builds an instance with options only inside a Service; take it out of one.
    let mut built = ProxyServiceBuilder::new(conf, make())
        .server_options(h2c_options)
        .build();
    let mut spare = HttpProxy::new(make(), conf.clone());
    spare.handle_init_modules();
    let h2c = match built.app_logic_mut() {
        Some(app) => std::mem::replace(app, spare),
        None => spare,
    };
    let sniffer = ProtocolSniffer {
        h1: Arc::new(h1),
        h2c: Some(Arc::new(h2c)),
        timeout: FIRST_BYTES_TIMEOUT,
    };
    Service::new(name.to_string(), sniffer)
}

/// Read the first bytes of a connection while they may still be the HTTP/2 preface: at most 24,
/// and only one read when the first byte already differs. `None`: nothing usable within
/// `timeout` (or a partial preface), the client closed, or the server is shutting down.
async fn read_preface(
    stream: &mut Stream,
    timeout: Duration,
    shutdown: &ShutdownWatch,
) -> Option<([u8; 24], usize)> {
    let mut first = [0u8; 24];
    let mut n = 0;
    let deadline = tokio::time::Instant::now() + timeout;
    let mut shutdown = shutdown.clone();
    while n < first.len() && H2_PREFACE.starts_with(&first[..n]) {
        let read = tokio::select! {
            r = tokio::time::timeout_at(deadline, stream.read(&mut first[n..])) => r,
            _ = shutdown.changed() => return None,
        };
        match read {
            Ok(Ok(0)) => return None,
            Ok(Ok(k)) => n += k,
            Ok(Err(e)) => {
                log::debug!("reading the first bytes of a connection: {e}");
                return None;
            }
            Err(_) => {
                log::debug!("connection sent {n} bytes in {timeout:?}, closing it");
                return None;
            }
        }
    }
    Some((first, n))
}

#[async_trait]
impl<SV> ServerApp for ProtocolSniffer<SV>
where
    SV: ProxyHttp + Send + Sync + 'static,
    SV::CTX: Send + Sync,
{
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let Some(h2c) = self.h2c.as_ref() else {
            return self.h1.process_new(stream, shutdown).await;
        };
        if !stream.as_any().is::<TcpStream>() {
            // Not a plain socket (cannot put bytes back): Pingora's own detection.
            return h2c.process_new(stream, shutdown).await;
        }
        let (first, n) = read_preface(&mut stream, self.timeout, shutdown).await?;
        let mut tcp: Box<TcpStream> = stream.into_any().downcast().ok()?;
        tcp.rewind(&first[..n]);
        let stream: Stream = tcp;
        if first[..n] == *H2_PREFACE {
            h2c.process_new(stream, shutdown).await
        } else {
            self.h1.process_new(stream, shutdown).await
        }
    }

    async fn cleanup(&self) {
        self.h1.cleanup().await;
        if let Some(h2c) = &self.h2c {
            h2c.cleanup().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A server-side stream and the client socket talking to it.
    async fn pair() -> (Stream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        (Box::new(TcpStream::from(server)), client)
    }

    const T: Duration = Duration::from_millis(300);

    #[tokio::test]
    async fn http1_is_recognised_from_its_first_byte_and_replayed() {
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let (mut server, mut client) = pair().await;
        client
            .write_all(b"GET / HTTP/1.0\r\n\r\n")
            .await
            .expect("write");
        let (first, n) = read_preface(&mut server, Duration::from_secs(30), &shutdown)
            .await
            .expect("decided without waiting for 24 bytes");
        assert!(n >= 1 && first[0] == b'G');
        let mut tcp: Box<TcpStream> = server.into_any().downcast().expect("tcp");
        tcp.rewind(&first[..n]);
        let mut all = vec![0u8; 18];
        tcp.read_exact(&mut all).await.expect("read");
        assert_eq!(&all, b"GET / HTTP/1.0\r\n\r\n");
    }

    #[tokio::test]
    async fn the_preface_is_read_whole() {
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let (mut server, mut client) = pair().await;
        for piece in H2_PREFACE.chunks(5) {
            client.write_all(piece).await.expect("write");
            client.flush().await.expect("flush");
        }
        let (first, n) = read_preface(&mut server, Duration::from_secs(30), &shutdown)
            .await
            .expect("preface");
        assert_eq!(&first[..n], H2_PREFACE);
    }

    #[tokio::test]
    async fn silence_or_a_partial_preface_is_dropped_after_the_timeout() {
        let (_tx, shutdown) = tokio::sync::watch::channel(false);
        let (mut server, _client) = pair().await;
        assert!(read_preface(&mut server, T, &shutdown).await.is_none());
        let (mut server, mut client) = pair().await;
        client.write_all(b"PRI * HT").await.expect("write");
        assert!(read_preface(&mut server, T, &shutdown).await.is_none());
        // A client that closes, and a server shutting down, end the wait too.
        let (mut server, client) = pair().await;
        drop(client);
        assert!(
            read_preface(&mut server, Duration::from_secs(30), &shutdown)
                .await
                .is_none()
        );
        let (tx, shutdown) = tokio::sync::watch::channel(false);
        let (mut server, _client) = pair().await;
        let wait = read_preface(&mut server, Duration::from_secs(30), &shutdown);
        let stop = async {
            tokio::task::yield_now().await;
            let _ = tx.send(true);
        };
        let (got, ()) = tokio::join!(wait, stop);
        assert!(got.is_none());
    }
}
