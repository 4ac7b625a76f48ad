//! The edge: what happens to a client connection before and around pingora's
//! HTTP handling, so that abusive or broken clients cannot take the process
//! down and a node can leave a fleet cleanly.
//!
//! - [`Edge`] wraps the proxy's `ServerApp`: a new connection past
//!   `[server].max_connections` (or `max_connections_per_client` from one
//!   address) is closed at once, before a byte is read; the admin port is a
//!   service of its own and is not counted.
//! - [`stream::EdgeStream`] wraps every accepted connection and enforces
//!   `[server].header_timeout` over the whole of a request's headers
//!   (pingora's read timeout restarts on every byte, so a client trickling
//!   headers would live forever).
//! - [`proxy_protocol`]: a connection from `[server].proxy_protocol_from`
//!   (an L4 balancer) starts with a PROXY header whose client address
//!   becomes the connection's, before anything is counted.
//! - [`drain`] turns SIGTERM into a drain: `/healthz` answers 503 while the
//!   listeners keep accepting for `[server].drain_delay`, then pingora's
//!   graceful shutdown lets in-flight requests finish.

pub(crate) mod drain;
pub(crate) mod proxy_protocol;
pub(crate) mod stream;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::{SocketDigest, Stream};
use pingora::server::ShutdownWatch;

use crate::Shared;
use stream::EdgeStream;

/// Past `max_connections`, a connection whose head has been arriving for
/// this long (or half of `header_timeout`, if shorter) is closed to make
/// room for a new one.
const MIN_HEAD_AGE: Duration = Duration::from_secs(1);

/// File descriptors kept for everything but client connections: admin
/// connections, health checks, config files, logs.
const RESERVED_FDS: u64 = 256;

/// The `max_connections` used when `[server]` does not set one: half of what
/// the open-file limit leaves after [`RESERVED_FDS`], since every proxied
/// request holds an upstream connection too (at least 64).
pub(crate) fn default_max_connections(open_file_limit: Option<u64>) -> u32 {
    let limit = open_file_limit.unwrap_or(1024);
    let half = limit.saturating_sub(RESERVED_FDS) / 2;
    half.clamp(64, u64::from(u32::MAX)) as u32
}

/// Why a new connection was closed at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    MaxConnections,
    PerClient,
    /// A trusted balancer's connection without a valid PROXY header.
    ProxyProtocol,
    /// Not a refusal of the new connection: an open one still sending its
    /// head was closed to make room for it.
    SlowHeadEvicted,
}

impl Refusal {
    pub(crate) const ALL: [Refusal; 4] = [
        Refusal::MaxConnections,
        Refusal::PerClient,
        Refusal::ProxyProtocol,
        Refusal::SlowHeadEvicted,
    ];

    /// The `reason` label of `k2_connections_refused_total`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::PerClient => "max_connections_per_client",
            Refusal::ProxyProtocol => "proxy_protocol",
            Refusal::SlowHeadEvicted => "slow_head_evicted",
        }
    }
}

/// Client connections open now, in total and per address, and those still
/// receiving a request head (the first to go when the total is reached).
#[derive(Debug)]
pub(crate) struct Connections {
    open: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, u32>>,
    /// Heads in arrival order; an entry whose connection finished that head
    /// (or closed) is stale and dropped when met.
    heads: Mutex<VecDeque<HeadEntry>>,
    epoch: Instant,
}

impl Default for Connections {
    fn default() -> Self {
        Connections {
            open: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
            heads: Mutex::new(VecDeque::new()),
            epoch: Instant::now(),
        }
    }
}

/// How a connection can be closed from outside: past `max_connections` the
/// connection whose head has been arriving longest is closed to make room.
#[derive(Debug, Default)]
pub(crate) struct Eviction {
    /// When the current head began (nanoseconds after the epoch, plus one);
    /// 0 between heads.
    head_since: AtomicU64,
    evicted: AtomicBool,
    waker: AtomicWaker,
}

impl Eviction {
    /// The head is complete: no longer a candidate.
    pub(crate) fn head_done(&self) {
        self.head_since.store(0, Ordering::Release);
    }

    /// Whether the connection was chosen to make room; registers the
    /// reading task to be woken when it is.
    pub(crate) fn poll_evicted(&self, cx: &std::task::Context<'_>) -> bool {
        self.waker.register(cx.waker());
        self.evicted.load(Ordering::Acquire)
    }

    fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
        self.waker.wake();
    }
}

#[derive(Debug)]
struct HeadEntry {
    since: u64,
    who: Weak<Eviction>,
}

impl HeadEntry {
    /// The connection is alive and still in this head.
    fn current(&self) -> Option<Arc<Eviction>> {
        self.who
            .upgrade()
            .filter(|w| w.head_since.load(Ordering::Acquire) == self.since)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Connections {
    /// Counts a new connection from `client` if the limits allow it: past
    /// `max`, by closing the connection whose head has been arriving for
    /// longest, if for at least `min_head_age` (a slowloris' connection;
    /// a real client's head takes milliseconds). The slot gives the count
    /// back when dropped; `true` with it when a connection was evicted.
    pub(crate) fn open(
        self: &Arc<Self>,
        client: Option<IpAddr>,
        max: usize,
        per_client: u32,
        min_head_age: Duration,
    ) -> Result<(Slot, bool), Refusal> {
        if let Some(ip) = client {
            let mut map = lock(&self.per_client);
            let n = map.entry(ip).or_insert(0);
            if *n >= per_client {
                return Err(Refusal::PerClient);
            }
            *n += 1;
        }
        let slot = Slot {
            conns: self.clone(),
            client,
        };
        let n = self.open.fetch_add(1, Ordering::AcqRel);
        if n < max {
            return Ok((slot, false));
        }
        // Evicted connections take a moment to close: bound the overshoot.
        if n < max + max / 8 + 1 && self.evict_slowest_head(min_head_age) {
            return Ok((slot, true));
        }
        Err(Refusal::MaxConnections) // dropping the slot gives both counts back
    }

    /// Client connections open now.
    pub(crate) fn count(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// `who` started receiving a request head at `began`.
    pub(crate) fn head_started(&self, who: &Arc<Eviction>, began: Instant) {
        let since = began.saturating_duration_since(self.epoch).as_nanos() as u64 + 1;
        who.head_since.store(since, Ordering::Release);
        let mut heads = lock(&self.heads);
        while heads.front().is_some_and(|e| e.current().is_none()) {
            heads.pop_front();
        }
        // A slow head at the front keeps finished ones behind it: compact.
        if heads.len() > 64 && heads.len() > 2 * self.count() {
            heads.retain(|e| e.current().is_some());
        }
        heads.push_back(HeadEntry {
            since,
            who: Arc::downgrade(who),
        });
    }

    fn evict_slowest_head(&self, min_age: Duration) -> bool {
        let now = self.epoch.elapsed().as_nanos() as u64 + 1;
        let mut heads = lock(&self.heads);
        while let Some(front) = heads.front() {
            let Some(who) = front.current() else {
                heads.pop_front();
                continue;
            };
            if now.saturating_sub(front.since) < min_age.as_nanos() as u64 {
                return false;
            }
            heads.pop_front();
            who.evict();
            return true;
        }
        false
    }

    fn close(&self, client: Option<IpAddr>) {
        self.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = client {
            let mut map = lock(&self.per_client);
            if let Some(n) = map.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&ip);
                }
            }
        }
    }
}

/// One counted connection; uncounted when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    conns: Arc<Connections>,
    client: Option<IpAddr>,
}

impl Slot {
    pub(crate) fn connections(&self) -> &Arc<Connections> {
        &self.conns
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conns.close(self.client);
    }
}

/// The proxy's `ServerApp` with the connection limits and the header
/// deadline in front of it.
pub(crate) struct Edge<A> {
    inner: Arc<A>,
    shared: Arc<Shared>,
}

impl<A> Edge<A> {
    pub(crate) fn new(inner: A, shared: Arc<Shared>) -> Self {
        Edge {
            inner: Arc::new(inner),
            shared,
        }
    }
}

/// The client's address behind a trusted balancer: read from the PROXY
/// header and made the connection's peer address (x-forwarded-for, rate
/// limits, the access log and the per-client count all use it). `Err` when
/// the balancer sent no valid header in time.
async fn proxied_client(
    stream: &mut Stream,
    within: std::time::Duration,
) -> Result<Option<std::net::SocketAddr>, String> {
    let header = tokio::time::timeout(within, proxy_protocol::read(stream))
        .await
        .map_err(|_| "no PROXY header within header_timeout".to_string())??;
    let proxy_protocol::Header::Client(client) = header else {
        return Ok(None);
    };
    let local = stream
        .get_socket_digest()
        .and_then(|d| d.local_addr().cloned());
    let fd = {
        let io: &dyn pingora::protocols::IO = stream.as_ref();
        io.as_any()
            .downcast_ref::<pingora::protocols::l4::stream::Stream>()
            .map(std::os::fd::AsRawFd::as_raw_fd)
    };
    let digest = SocketDigest::from_raw_fd(fd.unwrap_or(-1));
    let _ = digest.peer_addr.set(Some(SocketAddr::Inet(client)));
    let _ = digest.local_addr.set(local);
    stream.set_socket_digest(digest);
    Ok(Some(client))
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for Edge<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let gen = self.shared.current.load_full();
        let server = &gen.config.server;
        let refuse = |refusal: Refusal, client: Option<IpAddr>| {
            self.shared
                .metrics
                .connections_refused
                .with_label_values(&[refusal.as_str()])
                .inc();
            tracing::debug!(client = ?client, reason = refusal.as_str(), "connection refused");
            None // dropping the stream closes it
        };
        let mut client = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        if client.is_some_and(|ip| server.proxy_protocol_from.iter().any(|n| n.contains(&ip))) {
            match proxied_client(&mut stream, server.header_timeout).await {
                Ok(Some(carried)) => client = Some(carried.ip()),
                Ok(None) => {}
                Err(why) => {
                    tracing::warn!(balancer = ?client, "{why}");
                    return refuse(Refusal::ProxyProtocol, client);
                }
            }
        }
        let min_head_age = (server.header_timeout / 2).min(MIN_HEAD_AGE);
        let slot = match self.shared.connections.open(
            client,
            gen.max_connections as usize,
            server.max_connections_per_client,
            min_head_age,
        ) {
            Ok((slot, evicted)) => {
                if evicted {
                    self.shared
                        .metrics
                        .connections_refused
                        .with_label_values(&[Refusal::SlowHeadEvicted.as_str()])
                        .inc();
                }
                slot
            }
            Err(refusal) => return refuse(refusal, client),
        };
        let (header_timeout, idle_timeout) = (server.header_timeout, server.idle_timeout);
        let https = stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied())
            .and_then(|local| gen.tls.for_local(local));
        drop(gen);
        let mut h2 = false;
        if let Some(listener) = https {
            // After the cheap refusals, within the time a request head gets.
            let tls = match tokio::time::timeout(header_timeout, listener.accept(stream)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(why)) => return self.handshake_failed("error", client, &why),
                Err(_) => return self.handshake_failed("timeout", client, "header_timeout"),
            };
            h2 = tls.is_h2();
            stream = Box::new(tls);
        }
        let mut stream: Stream = Box::new(EdgeStream::new(
            stream,
            header_timeout,
            idle_timeout,
            h2,
            slot,
            self.shared.clone(),
        ));
        // pingora serves a kept-alive connection's requests inside one call;
        // a stream handed back is the same connection, already counted.
        loop {
            stream = self.inner.process_new(stream, shutdown).await?;
        }
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await
    }
}

impl<A> Edge<A> {
    /// A TLS handshake failed or took too long: counted, logged at debug
    /// (scanners and port checks do this all day), connection closed.
    fn handshake_failed(&self, reason: &str, client: Option<IpAddr>, why: &str) -> Option<Stream> {
        self.shared
            .metrics
            .tls_handshake_failures
            .with_label_values(&[reason])
            .inc();
        tracing::debug!(client = ?client, reason, "TLS handshake failed: {why}");
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_max_connections_leaves_room_for_upstreams() {
        assert_eq!(default_max_connections(Some(20_000)), 9_872);
        assert_eq!(default_max_connections(Some(1024)), 384);
        assert_eq!(default_max_connections(None), 384);
        assert_eq!(default_max_connections(Some(100)), 64);
    }

    #[test]
    fn limits_count_open_connections_and_give_slots_back() {
        let conns = Arc::new(Connections::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let open = |ip| conns.open(Some(ip), 3, 2, Duration::from_secs(1));
        let (s1, _) = open(a).unwrap();
        let (s2, _) = open(a).unwrap();
        assert_eq!(open(a).unwrap_err(), Refusal::PerClient);
        let (s3, _) = open(b).unwrap();
        assert_eq!(open(b).unwrap_err(), Refusal::MaxConnections);
        assert_eq!(conns.count(), 3);
        assert_eq!(
            conns.per_client.lock().unwrap()[&b],
            1,
            "a refusal gives its count back"
        );
        drop(s1);
        let _s4 = open(a).unwrap();
        drop((s2, s3));
        assert_eq!(conns.count(), 1);
        assert_eq!(conns.per_client.lock().unwrap().get(&b), None);
    }

    #[test]
    fn past_the_limit_the_oldest_slow_head_makes_room() {
        let conns = Arc::new(Connections::default());
        let age = Duration::from_millis(30);
        let open = || conns.open(None, 2, 10, age);
        let (slow, _) = open().unwrap();
        let (quick, _) = open().unwrap();
        let slow_e = Arc::new(Eviction::default());
        let quick_e = Arc::new(Eviction::default());
        conns.head_started(&slow_e, Instant::now());
        conns.head_started(&quick_e, Instant::now());
        // Too young to be a slowloris: the newcomer is refused.
        assert_eq!(open().unwrap_err(), Refusal::MaxConnections);
        std::thread::sleep(Duration::from_millis(40));
        quick_e.head_done(); // a real client: its head came in
        let (third, evicted) = open().unwrap();
        assert!(evicted);
        assert!(slow_e.evicted.load(Ordering::Acquire), "the slow head goes");
        assert!(!quick_e.evicted.load(Ordering::Acquire));
        drop((slow, quick, third));
        // No head left to evict: past the limit, refused again.
        let (_a, _) = open().unwrap();
        let (_b, _) = open().unwrap();
        assert_eq!(open().unwrap_err(), Refusal::MaxConnections);
    }
}
