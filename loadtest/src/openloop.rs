//! The open-loop generator: arrival `i` is due at the time the rate profile
//! says ([`crate::schedule`]) whatever happened to the earlier ones, and its
//! latency is counted from that intended time, so a slow target cannot hide
//! behind the generator slowing down (coordinated omission, as in wrk2).
//! Latency from the actual send time is kept too: the difference is the
//! generator's own lag, which the report states.
//!
//! Arrivals are paced on a thread of their own (an OS timer, not tokio's
//! millisecond wheel) and each request runs as a task on the caller's
//! runtime. Each arrival draws its tier's request from a weighted mix.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderName;
use hyper::Method;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::schedule::{pace, Mix, Schedule};
use crate::template::Template;

/// One kind of request in the mix (typically one tier's), templated.
#[derive(Debug, Clone)]
pub struct Request {
    pub name: String,
    /// Relative share of arrivals.
    pub weight: f64,
    pub method: Method,
    /// Full URL, `http://host:port/path?query`.
    pub url: Template,
    pub headers: Vec<(HeaderName, Template)>,
    pub body: Option<Template>,
    /// A header carrying a key unique to the request (the request id), as a
    /// client that may retry a purchase sends it.
    pub idempotency_header: Option<HeaderName>,
}

/// A whole load: what to send and when.
#[derive(Debug, Clone)]
pub struct Load {
    pub requests: Vec<Request>,
    pub schedule: Schedule,
    /// Per-request client timeout (connect to last body byte).
    pub timeout: Duration,
    /// Seed of the mix and of `{rand:N}`; also part of every request id.
    pub seed: u64,
    /// Independent clients the requests take turns on, each with its own
    /// keep-alive connections ([`DEFAULT_CLIENTS`]).
    pub clients: usize,
}

/// How many clients a load comes from, unless a scenario says
/// (`[load] clients`); requests take turns on them. One client's keep-alive
/// pool reuses its most recently freed connection first, so behind an L4
/// balancer (which places connections, not requests) its traffic gathered
/// on whichever instance held the busy connections: two instances shared
/// 3x as 75/25, and in two runs of five one instance got nothing for six
/// seconds. Shoppers and merchants are many clients: 64 still shared 3x as
/// 30/70 at times, 256 within 45/55 (docs/loadtest.md, Fleets).
pub const DEFAULT_CLIENTS: usize = 256;
/// The most clients a load may come from (each holds its own connections).
pub const MAX_CLIENTS: usize = 10_000;

/// One kind of request, simple form: a constant URL.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub url: hyper::Uri,
    /// Relative share of arrivals.
    pub weight: f64,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// A body: sent as a POST (a GET without one).
    pub body: Option<Bytes>,
}

/// A constant-rate load of simple targets.
#[derive(Debug, Clone)]
pub struct Plan {
    pub targets: Vec<Target>,
    /// Requests per second, all targets together.
    pub rate: u32,
    pub duration: Duration,
    /// Per-request client timeout.
    pub timeout: Duration,
    /// Seed of the mix draw.
    pub seed: u64,
}

impl From<Plan> for Load {
    fn from(plan: Plan) -> Load {
        let requests = plan
            .targets
            .into_iter()
            .map(|t| Request {
                name: t.name,
                weight: t.weight,
                method: if t.body.is_some() {
                    Method::POST
                } else {
                    Method::GET
                },
                url: Template::literal(&t.url.to_string()),
                headers: t
                    .headers
                    .iter()
                    .filter_map(|(k, v)| Some((k.parse().ok()?, Template::literal(v))))
                    .collect(),
                body: t
                    .body
                    .map(|b| Template::literal(&String::from_utf8_lossy(&b))),
                idempotency_header: None,
            })
            .collect();
        Load {
            requests,
            schedule: Schedule::constant(plan.rate as f64, plan.duration),
            timeout: plan.timeout,
            seed: plan.seed,
            clients: DEFAULT_CLIENTS,
        }
    }
}

/// Runs a constant-rate plan to the end.
pub async fn run(plan: Plan) -> Report {
    run_unwatched(Load::from(plan)).await
}

/// Runs a load to the end, with no one watching its progress.
pub async fn run_unwatched(load: Load) -> Report {
    let live = Live::new(&load);
    run_load(load, live).await
}

/// How requests ended.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Outcomes {
    pub ok: u64,
    /// A response carrying `x-k2-shed` (503 or a tier's shed status).
    pub shed: u64,
    /// 429.
    pub rate_limited: u64,
    /// Any other status, or a connection error.
    pub error: u64,
    /// No complete response within the client timeout.
    pub timeout: u64,
    /// Of all of the above, requests sent a second time because the server
    /// closed a kept-alive connection before any answer ([`replay_of`]):
    /// what real clients do, counted here so it is seen. Not in `total`.
    pub retried: u64,
}

impl Outcomes {
    pub fn total(&self) -> u64 {
        self.ok + self.shed + self.rate_limited + self.error + self.timeout
    }

    fn add(&mut self, class: Class) {
        match class {
            Class::Ok => self.ok += 1,
            Class::Shed => self.shed += 1,
            Class::RateLimited => self.rate_limited += 1,
            Class::Error => self.error += 1,
            Class::Timeout => self.timeout += 1,
        }
    }
}

/// Counters read while the run goes on (progress display).
#[derive(Debug)]
pub struct Live {
    pub names: Vec<String>,
    /// Arrivals sent so far, per request kind.
    pub sent: Vec<AtomicU64>,
    /// Completed successfully so far, per request kind.
    pub ok: Vec<AtomicU64>,
    /// Completed (any outcome) so far, per request kind.
    pub done: Vec<AtomicU64>,
    /// Set when the run is over (observers stop).
    pub finished: std::sync::atomic::AtomicBool,
}

impl Live {
    pub fn new(load: &Load) -> Arc<Live> {
        let n = load.requests.len();
        let zeros = || (0..n).map(|_| AtomicU64::new(0)).collect();
        Arc::new(Live {
            names: load.requests.iter().map(|r| r.name.clone()).collect(),
            sent: zeros(),
            ok: zeros(),
            done: zeros(),
            finished: Default::default(),
        })
    }

    pub fn total(counters: &[AtomicU64]) -> u64 {
        counters.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// Results of one kind of request (one tier).
#[derive(Debug)]
pub struct TargetReport {
    pub name: String,
    pub sent: u64,
    pub outcomes: Outcomes,
    /// Microseconds from the intended send time to the end of a successful
    /// response: what the shopper waited.
    pub ok_latency: Histogram<u64>,
    /// The same from the actual send time (without the generator's lag).
    pub ok_latency_sent: Histogram<u64>,
    /// From intended send time to a shed response: how fast a refusal comes.
    pub shed_latency: Histogram<u64>,
}

impl TargetReport {
    pub(crate) fn new(name: &str) -> TargetReport {
        TargetReport {
            name: name.to_string(),
            sent: 0,
            outcomes: Outcomes::default(),
            ok_latency: histogram(),
            ok_latency_sent: histogram(),
            shed_latency: histogram(),
        }
    }

    pub fn success(&self) -> f64 {
        if self.sent == 0 {
            return 1.0;
        }
        self.outcomes.ok as f64 / self.sent as f64
    }

    /// Share of requests that ended so (0 when none were sent).
    pub fn share(&self, n: u64) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        n as f64 / self.sent as f64
    }
}

/// One second of the run (by intended send time), per request kind.
#[derive(Debug, Clone)]
pub struct Second {
    pub outcomes: Vec<Outcomes>,
    /// Latency of successful responses from the intended send time, µs.
    pub ok_latency: Vec<Histogram<u64>>,
    /// Latency of refusals (`x-k2-shed`) from the intended send time, µs:
    /// whether the slow ones come at a peak's onset or all along.
    pub shed_latency: Vec<Histogram<u64>>,
}

/// Something that happened during the run (a fault, a reload), for the
/// report's time axis.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Event {
    /// Seconds from the start of the load.
    pub at_s: f64,
    pub what: String,
    /// A fault began (not a recovery, not a reload): a drill's
    /// `time_to_failover` is measured from here.
    pub fault: bool,
}

/// The result of a run.
#[derive(Debug)]
pub struct Report {
    pub targets: Vec<TargetReport>,
    /// Microseconds the generator sent late (its own lag).
    pub send_lag: Histogram<u64>,
    pub elapsed: Duration,
    pub timeline: Vec<Second>,
    /// The offered rate per second of the profile, all kinds together.
    pub offered_rate: Vec<f64>,
    pub events: Vec<Event>,
    /// Requests that were not answered well (shed, error, timeout), by
    /// intended send time: what a drill's `time_to_failover` reads. At most
    /// [`MAX_FAILURES`] are kept.
    pub failures: Vec<Failure>,
}

/// At most this many [`Failure`]s are kept (a run that fails more has
/// failed anyway).
pub const MAX_FAILURES: usize = 200_000;

/// A request that was shed, failed or timed out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Failure {
    /// Intended send time, seconds from the start of the load.
    pub at_s: f64,
    /// Index of its request kind in [`Report::targets`].
    pub kind: usize,
    /// Shed (an explicit refusal), rather than an error or a timeout.
    pub shed: bool,
}

impl Report {
    pub fn target(&self, name: &str) -> Option<&TargetReport> {
        self.targets.iter().find(|t| t.name == name)
    }

    pub fn sent(&self) -> u64 {
        self.targets.iter().map(|t| t.sent).sum()
    }

    pub fn ok(&self) -> u64 {
        self.targets.iter().map(|t| t.outcomes.ok).sum()
    }

    /// All kinds together, as one more target named `all`.
    pub fn all(&self) -> TargetReport {
        let mut all = TargetReport::new("all");
        for t in &self.targets {
            all.sent += t.sent;
            let (a, o) = (&mut all.outcomes, &t.outcomes);
            a.ok += o.ok;
            a.shed += o.shed;
            a.rate_limited += o.rate_limited;
            a.error += o.error;
            a.timeout += o.timeout;
            a.retried += o.retried;
            let _ = all.ok_latency.add(&t.ok_latency);
            let _ = all.ok_latency_sent.add(&t.ok_latency_sent);
            let _ = all.shed_latency.add(&t.shed_latency);
        }
        all
    }
}

pub(crate) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static bounds are valid")
}

pub(crate) fn coarse_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("static bounds are valid")
}

#[derive(Clone, Copy)]
enum Class {
    Ok,
    Shed,
    RateLimited,
    Error,
    Timeout,
}

/// What the request tasks fill in.
struct Acc {
    targets: Vec<TargetReport>,
    timeline: Vec<Second>,
    failures: Vec<Failure>,
}

impl Acc {
    /// Empty counts for request kinds `names` over `seconds` seconds.
    fn new(names: &[&str], seconds: usize) -> Acc {
        let kinds = names.len();
        Acc {
            targets: names.iter().map(|n| TargetReport::new(n)).collect(),
            timeline: (0..seconds)
                .map(|_| Second {
                    outcomes: vec![Outcomes::default(); kinds],
                    ok_latency: (0..kinds).map(|_| coarse_histogram()).collect(),
                    shed_latency: (0..kinds).map(|_| coarse_histogram()).collect(),
                })
                .collect(),
            failures: Vec::new(),
        }
    }
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

/// Runs the load to the end; every request is bounded by `load.timeout`.
/// `live` is updated as requests are sent and answered.
pub async fn run_load(load: Load, live: Arc<Live>) -> Report {
    assert!(
        !load.requests.is_empty(),
        "a load needs at least one request"
    );
    let clients: Vec<HttpClient> = (0..load.clients.max(1))
        .map(|_| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build_http()
        })
        .collect();
    let seconds = load.schedule.duration().as_secs() as usize + 1;
    let names: Vec<&str> = load.requests.iter().map(|r| r.name.as_str()).collect();
    let acc = Arc::new(Mutex::new(Acc::new(&names, seconds)));
    let offered_rate = (0..seconds)
        .map(|s| load.schedule.rate_at(Duration::from_secs(s as u64)))
        .collect();
    let runtime = tokio::runtime::Handle::current();
    // Every request task holds a sender; `recv` ends when the last is gone.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    let start = Instant::now();
    let pacer = {
        let (acc, live, load) = (acc.clone(), live.clone(), Arc::new(load));
        std::thread::Builder::new()
            .name("loadtest-pacer".into())
            .spawn(move || {
                let local = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .expect("a current-thread runtime");
                let weights: Vec<f64> = load.requests.iter().map(|r| r.weight).collect();
                let mut mix = Mix::new(&weights, load.seed);
                let mut lag = histogram();
                local.block_on(pace(load.schedule.arrivals(), true, |i, offset, late| {
                    lag.saturating_record(late.as_micros() as u64);
                    let due = Instant::now() - late;
                    let kind = mix.draw();
                    live.sent[kind].fetch_add(1, Ordering::Relaxed);
                    let req = build(&load.requests[kind], load.seed, i, &mut mix);
                    // Requests take turns on the clients.
                    let client = clients[(i % clients.len() as u64) as usize].clone();
                    let ctx = (client, acc.clone(), live.clone(), done_tx.clone());
                    let at = Sent {
                        due,
                        offset,
                        second: (offset.as_secs() as usize).min(seconds - 1),
                    };
                    runtime.spawn(send(ctx, req, kind, at, load.timeout));
                }));
                lag
            })
            .expect("spawn the pacer thread")
    };
    let send_lag = tokio::task::spawn_blocking(move || pacer.join().expect("pacer panicked"))
        .await
        .expect("pacer join");
    let _ = done_rx.recv().await;
    let elapsed = start.elapsed();
    live.finished.store(true, Ordering::Relaxed);
    // Every task has sent its result (a task may still be dropping its
    // clone of `acc`, so take the contents rather than the Arc).
    let acc = std::mem::replace(
        &mut *acc.lock().expect("report lock"),
        Acc {
            targets: Vec::new(),
            timeline: Vec::new(),
            failures: Vec::new(),
        },
    );
    Report {
        targets: acc.targets,
        send_lag,
        elapsed,
        timeline: acc.timeline,
        offered_rate,
        events: Vec::new(),
        failures: acc.failures,
    }
}

/// When a request was due: the instant, its offset into the load, and the
/// timeline second it counts in.
struct Sent {
    due: Instant,
    offset: Duration,
    second: usize,
}

/// Renders arrival `i`'s request; an invalid rendering (checked at load
/// time, so not expected) becomes a request to a URL that fails.
fn build(r: &Request, seed: u64, i: u64, rng: &mut Mix) -> Option<hyper::Request<Full<Bytes>>> {
    let id = format!("lt-{seed}-{i}");
    let mut req = hyper::Request::builder()
        .method(r.method.clone())
        .uri(r.url.render(i, &id, rng))
        .header("x-request-id", id.as_str());
    for (k, v) in &r.headers {
        req = req.header(k, v.render(i, &id, rng));
    }
    if let Some(h) = &r.idempotency_header {
        req = req.header(h, id.as_str());
    }
    let body = r
        .body
        .as_ref()
        .map(|b| Bytes::from(b.render(i, &id, rng)))
        .unwrap_or_default();
    req.body(Full::new(body)).ok()
}

async fn send(
    (client, acc, live, _done): (
        HttpClient,
        Arc<Mutex<Acc>>,
        Arc<Live>,
        tokio::sync::mpsc::Sender<()>,
    ),
    req: Option<hyper::Request<Full<Bytes>>>,
    kind: usize,
    Sent {
        due,
        offset,
        second,
    }: Sent,
    timeout: Duration,
) {
    let sent_at = Instant::now();
    let mut retried = false;
    let result = match req {
        None => Ok(Err("request did not render".into())),
        Some(req) => {
            let replay = replay_of(&req);
            tokio::time::timeout(timeout, async {
                let resp = match (client.request(req).await, replay) {
                    (Err(e), Some(again)) if closed_before_answer(&e) => {
                        retried = true;
                        client.request(again).await?
                    }
                    (resp, _) => resp?,
                };
                let status = resp.status();
                let shed = resp.headers().contains_key("x-k2-shed");
                resp.into_body().collect().await?;
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>((status, shed))
            })
            .await
        }
    };
    let end = Instant::now();
    let latency = (end - due).as_micros() as u64;
    let class = match result {
        Err(_) => Class::Timeout,
        Ok(Err(_)) => Class::Error,
        Ok(Ok((s, _))) if s.is_success() => Class::Ok,
        Ok(Ok((s, _))) if s.as_u16() == 429 => Class::RateLimited,
        Ok(Ok((_, true))) => Class::Shed,
        Ok(Ok(_)) => Class::Error,
    };
    live.done[kind].fetch_add(1, Ordering::Relaxed);
    if matches!(class, Class::Ok) {
        live.ok[kind].fetch_add(1, Ordering::Relaxed);
    }
    let mut acc = acc.lock().expect("report lock");
    let r = &mut acc.targets[kind];
    r.sent += 1;
    r.outcomes.add(class);
    r.outcomes.retried += u64::from(retried);
    match class {
        Class::Ok => {
            r.ok_latency.saturating_record(latency);
            r.ok_latency_sent
                .saturating_record((end - sent_at).as_micros() as u64);
        }
        Class::Shed => r.shed_latency.saturating_record(latency),
        _ => {}
    }
    if matches!(class, Class::Shed | Class::Error | Class::Timeout)
        && acc.failures.len() < MAX_FAILURES
    {
        acc.failures.push(Failure {
            at_s: offset.as_secs_f64(),
            kind,
            shed: matches!(class, Class::Shed),
        });
    }
    let s = &mut acc.timeline[second];
    s.outcomes[kind].add(class);
    s.outcomes[kind].retried += u64::from(retried);
    match class {
        Class::Ok => s.ok_latency[kind].saturating_record(latency),
        Class::Shed => s.shed_latency[kind].saturating_record(latency),
        _ => {}
    }
}

/// A copy of `req` to send again if the server closes its kept-alive
/// connection before answering, when sending it twice is safe: as Go's
/// `net/http` decides (`isReplayable`), a GET, HEAD, OPTIONS or TRACE, or a
/// request with an `idempotency-key` (the backend knows a repeat by its
/// key; k2proxy's own retries treat it so, docs/policy.md
/// `idempotency_header`). An HTTP/1 server cannot close an idle connection
/// without this race (a request may be on its way), so browsers, curl and
/// Go's client retry such a request once; a generator that did not counted
/// a graceful upgrade's close of idle connections as a failed request (1
/// in 900 in the upgrade test, now and then).
fn replay_of(req: &hyper::Request<Full<Bytes>>) -> Option<hyper::Request<Full<Bytes>>> {
    let safe = matches!(
        *req.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    ) || req.headers().contains_key("idempotency-key")
        || req.headers().contains_key("x-idempotency-key");
    if !safe {
        return None;
    }
    let mut again = hyper::Request::new(req.body().clone());
    *again.method_mut() = req.method().clone();
    *again.uri_mut() = req.uri().clone();
    *again.version_mut() = req.version();
    *again.headers_mut() = req.headers().clone();
    Some(again)
}

/// Whether `e` is a connection the server closed before any byte of an
/// answer (hyper's incomplete message), not a refused connect or a reset
/// mid-answer.
fn closed_before_answer(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            return h.is_incomplete_message();
        }
        source = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: Method, key: Option<&str>) -> hyper::Request<Full<Bytes>> {
        let mut req = hyper::Request::builder()
            .method(method)
            .uri("http://127.0.0.1:1/checkout/pay/1")
            .header("x-request-id", "lt-1");
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        req.body(Full::new(Bytes::from_static(b"{\"amount\": 100}")))
            .unwrap()
    }

    #[test]
    fn only_a_request_safe_to_send_twice_is_replayed_and_the_copy_is_the_same() {
        assert!(replay_of(&request(Method::GET, None)).is_some());
        assert!(replay_of(&request(Method::HEAD, None)).is_some());
        // A purchase without a key could be paid twice.
        assert!(replay_of(&request(Method::POST, None)).is_none());
        assert!(replay_of(&request(Method::PUT, None)).is_none());
        let original = request(Method::POST, Some("k-7"));
        let again = replay_of(&original).expect("a keyed POST is replayable");
        assert_eq!(again.method(), Method::POST);
        assert_eq!(again.uri(), original.uri());
        assert_eq!(again.headers(), original.headers());
        let body = futures_body(again);
        assert_eq!(body, b"{\"amount\": 100}");
    }

    fn futures_body(req: hyper::Request<Full<Bytes>>) -> Vec<u8> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async { req.into_body().collect().await.unwrap().to_bytes().to_vec() })
    }

    #[tokio::test]
    async fn a_connection_closed_before_any_answer_is_retried_once_and_counted() {
        // A server that reads one request per connection and closes two
        // connections without answering, then answers the third's: the
        // race of a kept-alive connection closed as a request goes out.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut n = 0;
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                n += 1;
                if n % 3 == 0 {
                    let _ = sock
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                        .await;
                }
            }
        });
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        let url = format!("http://{addr}/x");
        let req = |m: Method| {
            hyper::Request::builder()
                .method(m)
                .uri(&url)
                .body(Full::new(Bytes::new()))
                .unwrap()
        };
        let first = client.request(req(Method::GET)).await.unwrap_err();
        assert!(closed_before_answer(&first), "{first:?}");
        // A GET through `send`: retried once, answered, counted.
        let load_acc = Arc::new(Mutex::new(Acc::new(&["get"], 1)));
        let live = Arc::new(Live {
            names: vec!["get".into()],
            sent: vec![AtomicU64::new(0)],
            ok: vec![AtomicU64::new(0)],
            done: vec![AtomicU64::new(0)],
            finished: Default::default(),
        });
        let (tx, _rx) = tokio::sync::mpsc::channel(1);
        let at = Sent {
            due: Instant::now(),
            offset: Duration::ZERO,
            second: 0,
        };
        send(
            (client.clone(), load_acc.clone(), live, tx),
            Some(req(Method::GET)),
            0,
            at,
            Duration::from_secs(5),
        )
        .await;
        let acc = load_acc.lock().unwrap();
        let o = &acc.targets[0].outcomes;
        assert_eq!((o.ok, o.error, o.retried), (1, 0, 1), "{o:?}");
        assert_eq!(acc.timeline[0].outcomes[0].retried, 1, "in its second too");
    }
}
