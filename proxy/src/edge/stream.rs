//! A client connection with a deadline on its request headers and on its
//! idle time between requests.
//!
//! pingora reads a request head with a timeout per read, which a client
//! sending one header line every few seconds restarts forever (slowloris).
//! [`EdgeStream`] gives the whole head one deadline: from the connection's
//! start for the first request, from the first byte of each later one. The
//! gateway marks the head complete ([`EdgeStream::request_started`]) and
//! the request finished ([`EdgeStream::request_finished`], which re-arms
//! the deadline on the next byte). On expiry a started request is answered 408 and the
//! connection is closed; a connection that sent nothing is just closed.
//!
//! The same timer closes a kept-alive connection idle for `idle_timeout`
//! (quietly, as an end of stream). pingora's own keep-alive timeout would
//! register a timer on every read of every head; this one is re-armed only
//! when the idle time outlasts the head's deadline, and a later head goes
//! on it (and in the eviction queue) only when it needs a second read.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::{Eviction, Slot};
use crate::Shared;

/// Waiting for the head of a request (deadline armed).
const HEAD: u8 = 0;
/// The head is in; the request is being handled (no deadline).
const REQUEST: u8 = 1;
/// Between requests of a kept-alive connection (pingora's keep-alive
/// timeout applies; the first byte arms the deadline).
const IDLE: u8 = 2;

/// The 408 answered when the deadline passes in the middle of a head: the
/// wire contract's JSON error body (docs/concepts.md).
const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\n\
content-type: application/json\r\n\
content-length: 82\r\n\
connection: close\r\n\r\n\
{\"error\":\"request_timeout\",\"message\":\"the request headers did not arrive in time\"}";

/// A client connection: the accepted stream, its header deadline and its
/// place in the connection count.
pub(crate) struct EdgeStream {
    inner: Stream,
    phase: AtomicU8,
    header_timeout: Duration,
    /// The head's deadline, or in IDLE the idle one once it comes first.
    deadline: Pin<Box<Sleep>>,
    /// `[server].idle_timeout` in milliseconds, as of the request that
    /// finished last (a reload applies to the requests that follow).
    idle_ms: AtomicU64,
    /// When this idle connection closes: set on its first read in IDLE.
    idle_until: Option<Instant>,
    /// When the current head's first byte came, while its deadline is not
    /// on the timer yet: a head that arrives in one read (most do) never
    /// touches the timer or the eviction queue.
    head_pending: Option<Instant>,
    /// Bytes of the current head arrived (so a timeout answers 408).
    head_started: bool,
    /// Past `max_connections`, the slowest head is closed to make room.
    eviction: Arc<Eviction>,
    /// Request heads completed on it, and when it was accepted
    /// (`[server].keepalive_requests` and `keepalive_time`).
    requests: AtomicU64,
    opened: std::time::Instant,
    shared: Arc<Shared>,
    slot: Slot,
}

impl std::fmt::Debug for EdgeStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeStream")
            .field("inner", &self.inner)
            .field("phase", &self.phase.load(Ordering::Relaxed))
            .finish()
    }
}

impl EdgeStream {
    /// `h2`: an HTTP/2 connection multiplexes its requests, so it has no
    /// head of its own to time: pingora's h2 idle timeout and the h2 limits
    /// bound it instead.
    pub(crate) fn new(
        inner: Stream,
        header_timeout: Duration,
        idle_timeout: Duration,
        h2: bool,
        slot: Slot,
        shared: Arc<Shared>,
    ) -> Self {
        let eviction = Arc::new(Eviction::default());
        if !h2 {
            slot.connections()
                .head_started(&eviction, std::time::Instant::now());
        }
        EdgeStream {
            inner,
            phase: AtomicU8::new(if h2 { REQUEST } else { HEAD }),
            header_timeout,
            deadline: Box::pin(tokio::time::sleep(header_timeout)),
            idle_ms: AtomicU64::new(idle_timeout.as_millis() as u64),
            idle_until: None,
            head_pending: None,
            head_started: false,
            eviction,
            requests: AtomicU64::new(0),
            opened: std::time::Instant::now(),
            shared,
            slot,
        }
    }

    /// The connection under `stream`, when it is one of ours (HTTP/1).
    pub(crate) fn of(stream: &Stream) -> Option<&EdgeStream> {
        let io: &dyn pingora::protocols::IO = stream.as_ref();
        io.as_any().downcast_ref::<EdgeStream>()
    }

    /// The request head is complete: no deadline while it is handled.
    /// Returns whether the connection has served its keep-alive: this is
    /// its request number `keepalive_requests` (or later), or it is
    /// `keepalive_time` old.
    pub(crate) fn request_started(
        &self,
        keepalive_requests: u64,
        keepalive_time: Duration,
    ) -> bool {
        self.phase.store(REQUEST, Ordering::Release);
        self.eviction.head_done();
        let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        n >= keepalive_requests || self.opened.elapsed() >= keepalive_time
    }

    /// The request is answered; the connection may idle for `idle` and
    /// the next byte starts a new head.
    pub(crate) fn request_finished(&self, idle: Duration) {
        self.idle_ms
            .store(idle.as_millis() as u64, Ordering::Relaxed);
        self.phase.store(IDLE, Ordering::Release);
    }

    /// Ready once the connection has idled for `idle_timeout` since its
    /// first read in IDLE. The head's deadline, armed for the request
    /// before, usually comes first: the timer moves only when it fires
    /// (or when the idle timeout is the shorter).
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let until = *self.idle_until.get_or_insert_with(|| {
            Instant::now() + Duration::from_millis(self.idle_ms.load(Ordering::Relaxed))
        });
        if self.deadline.deadline() > until {
            self.deadline.as_mut().reset(until);
        }
        while self.deadline.as_mut().poll(cx).is_ready() {
            if Instant::now() >= until {
                return Poll::Ready(());
            }
            self.deadline.as_mut().reset(until);
        }
        Poll::Pending
    }

    /// The deadline passed: answers 408 if a request had begun (best
    /// effort, one write), and fails the read so pingora closes.
    fn expire(&mut self, cx: &mut Context<'_>) -> std::io::Error {
        self.shared.metrics.header_timeouts.inc();
        if self.head_started {
            let _ = Pin::new(&mut self.inner).poll_write(cx, REQUEST_TIMEOUT);
            let _ = Pin::new(&mut self.inner).poll_flush(cx);
        }
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "request headers not received within header_timeout ({:?})",
                self.header_timeout
            ),
        )
    }
}

impl AsyncRead for EdgeStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        match this.phase.load(Ordering::Acquire) {
            REQUEST => return Pin::new(&mut this.inner).poll_read(cx, buf),
            IDLE => return this.poll_read_idle(cx, buf),
            _ => {}
        }
        // A head that needs another read goes on the timer and in the
        // eviction queue, dated from its first byte.
        if let Some(began) = this.head_pending.take() {
            this.deadline.as_mut().reset(began + this.header_timeout);
            let connections = this.slot.connections();
            connections.head_started(&this.eviction, began.into_std());
        }
        if this.eviction.poll_evicted(cx) {
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "closed to make room past max_connections: the request head was arriving too slowly",
            )));
        }
        if this.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(this.expire(cx)));
        }
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.head_started = true;
        }
        read
    }
}

impl EdgeStream {
    /// Between requests: what arrives starts the next head (its deadline
    /// noted, not yet on the timer); with nothing to read, the idle timer
    /// is polled, and once it is due the read ends the stream.
    fn poll_read_idle(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                self.head_started = true;
                self.idle_until = None;
                self.head_pending = Some(Instant::now());
                self.phase.store(HEAD, Ordering::Release);
                Poll::Ready(Ok(()))
            }
            Poll::Pending if self.poll_idle(cx).is_ready() => {
                Poll::Ready(Ok(())) // nothing read: pingora closes quietly
            }
            read => read,
        }
    }
}

impl AsyncWrite for EdgeStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for EdgeStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for EdgeStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for EdgeStream {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for EdgeStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for EdgeStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for EdgeStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for EdgeStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::REQUEST_TIMEOUT;

    #[test]
    fn the_408_declares_its_body_length_and_carries_json() {
        let text = std::str::from_utf8(REQUEST_TIMEOUT).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())));
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"], "request_timeout");
    }
}
