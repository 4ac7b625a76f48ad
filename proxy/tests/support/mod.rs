//! Test support: the real `k2proxy` binary and real HTTP backends on
//! ephemeral loopback ports. No fixed ports, no sleeps as synchronisation:
//! a proxy is ready when its admin `/healthz` answers and its listener accepts.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub body_len: usize,
}

/// A real HTTP/1.1 backend. `POST` echoes the body; `/chunked` answers with a
/// chunked body of 64 chunks; `…/slow/<ms>` answers after `ms` milliseconds;
/// anything else answers `backend <name>`.
pub struct Backend {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// When `/stream-probe` requests' first body bytes arrived.
    first_bytes: Arc<Mutex<Vec<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

/// A body of several frames with no known length, so hyper sends it chunked.
struct Chunks(VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}

pub fn chunk(i: usize) -> Bytes {
    Bytes::from(format!("chunk-{i:03}:{}\n", "x".repeat(1000)))
}

type BoxBody = http_body_util::combinators::BoxBody<Bytes, Infallible>;

impl Backend {
    pub async fn start(name: &str) -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let first_bytes = Arc::new(Mutex::new(Vec::new()));
        let name = name.to_string();
        let seen2 = seen.clone();
        let first2 = first_bytes.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let seen = seen2.clone();
                let first = first2.clone();
                let name = name.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let seen = seen.clone();
                        let first = first.clone();
                        let name = name.clone();
                        async move {
                            if req.uri().path() == "/stream-probe" {
                                return Ok::<_, Infallible>(Backend::probe(req, &first).await);
                            }
                            Ok::<_, Infallible>(Backend::answer(req, &name, &seen).await)
                        }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend {
            addr,
            seen,
            first_bytes,
            task,
        }
    }

    /// Notes when the first body bytes arrive, then drains the body and
    /// answers with its length.
    async fn probe(req: Request<Incoming>, first: &Mutex<Vec<Instant>>) -> Response<BoxBody> {
        let mut body = req.into_body();
        let mut len = 0usize;
        let mut noted = false;
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { break };
            if let Some(data) = frame.data_ref() {
                if !noted && !data.is_empty() {
                    first.lock().unwrap().push(Instant::now());
                    noted = true;
                }
                len += data.len();
            }
        }
        Response::new(Full::new(Bytes::from(len.to_string())).boxed())
    }

    /// When `/stream-probe` requests' first body bytes arrived.
    pub fn first_bytes(&self) -> Vec<Instant> {
        self.first_bytes.lock().unwrap().clone()
    }

    async fn answer(
        req: Request<Incoming>,
        name: &str,
        seen: &Mutex<Vec<Seen>>,
    ) -> Response<BoxBody> {
        let (parts, body) = req.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        seen.lock().unwrap().push(Seen {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            headers: parts.headers.clone(),
            body_len: body.len(),
        });
        // /slow/<ms>: answer after a delay (a backend past its knee).
        if let Some(ms) = parts
            .uri
            .path()
            .rsplit_once("/slow/")
            .and_then(|(_, m)| m.parse().ok())
        {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            return Response::new(Full::new(Bytes::from("slow")).boxed());
        }
        if parts.uri.path() == "/chunked" {
            return Response::new(Chunks((0..64).map(chunk).collect()).boxed());
        }
        if parts.method == hyper::Method::POST {
            return Response::new(Full::new(body).boxed());
        }
        Response::new(Full::new(Bytes::from(format!("backend {name}"))).boxed())
    }

    /// Every client request this backend has seen so far (k2proxy's own
    /// health probes left out).
    pub fn seen(&self) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| {
                s.headers
                    .get("user-agent")
                    .is_none_or(|ua| ua != "k2proxy-health")
            })
            .cloned()
            .collect()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What [`health_checks_only`] does with anything but a health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Otherwise {
    /// Closes the connection unanswered (a crash mid-request).
    Drop,
    /// Never answers (a hung backend).
    Hang,
}

/// A backend that answers `GET /health` 200 and fails every other request
/// the way `otherwise` says.
pub async fn health_checks_only(otherwise: Otherwise) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                    if buf[..n].starts_with(b"GET /health ") {
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                    } else if otherwise == Otherwise::Drop {
                        return;
                    } // Hang: keep reading, never answer
                }
            });
        }
    });
    addr
}

/// An address on which nothing listens: connecting is refused.
pub fn refused_addr() -> SocketAddr {
    let l = StdListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A free loopback port, reserved by binding and released for the proxy.
fn free_addr() -> SocketAddr {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A free loopback port number.
pub fn free_port() -> u16 {
    free_addr().port()
}

/// A child process killed (and reaped) on drop.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The sum of every sample in Prometheus text whose line starts with `prefix`.
pub fn metric_sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A stream of the given chunks, for a request body of unknown length.
pub fn futures_stream(
    chunks: Vec<Bytes>,
) -> impl futures_core::Stream<Item = Result<Bytes, std::io::Error>> {
    struct S(VecDeque<Bytes>);
    impl futures_core::Stream for S {
        type Item = Result<Bytes, std::io::Error>;
        fn poll_next(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            Poll::Ready(self.0.pop_front().map(Ok))
        }
    }
    S(chunks.into())
}

/// Path of the built `k2proxy` binary.
pub fn k2proxy_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_k2proxy"))
}

/// Routes for one cluster `main` whose primary site holds `backends`, with
/// the routes of `routes` (TOML `[[routes]]` entries) appended.
pub fn routes_toml(backends: &[SocketAddr], routes: &str) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        r#"[server]
listen = ["{{LISTEN}}"]
admin = "{{ADMIN}}"
threads = 1
policy = "policy.toml"

[clusters.main]
connect_timeout = "300ms"

[[clusters.main.sites]]
name = "primary-site"
role = "primary"
backends = [{}]

{routes}
"#,
        list.join(", ")
    )
}

/// The repo's default policy (`policies/default.toml`), as users run it.
pub fn default_policy() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/default.toml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Routes for [`default_policy`]: cluster `kred` (its `[admission.kred]`)
/// with one site on `backend`, and a route per tier, `merchant-api` among
/// them (its rate limit names it).
pub fn kred_routes(backend: SocketAddr) -> String {
    format!(
        r#"[server]
listen = ["{{LISTEN}}"]
admin = "{{ADMIN}}"
threads = 2
policy = "policy.toml"

[clusters.kred]
[[clusters.kred.sites]]
name = "skondal"
role = "primary"
backends = ["{backend}"]

[[routes]]
name = "checkout"
match = {{ path_prefix = "/checkout/" }}
tier = "purchase"
cluster = "kred"

[[routes]]
name = "merchant-api"
match = {{ path_prefix = "/api/" }}
tier = "merchant"
cluster = "kred"

[[routes]]
name = "admin"
match = {{ path_prefix = "/admin/" }}
tier = "admin"
cluster = "kred"

[[routes]]
name = "customer-service"
match = {{ path_prefix = "/cs/" }}
tier = "customer_service"
cluster = "kred"
"#
    )
}

/// A policy with the standard tiers and the given `[trust]` CIDRs.
pub fn policy_toml(trusted: &[&str]) -> String {
    let list: Vec<String> = trusted.iter().map(|c| format!("\"{c}\"")).collect();
    format!(
        r#"tiers = ["purchase", "merchant", "admin", "customer_service", "background"]

[trust]
tier_header_from = [{}]
"#,
        list.join(", ")
    )
}

/// A running `k2proxy run`, killed on drop.
pub struct Proxy {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    /// The last reload `wait_reload` returned, as `/status` rendered it
    /// (its time alone is not enough: a refused and a good reload can land
    /// in the same millisecond).
    reload_mark: std::sync::Mutex<String>,
    child: Child,
    _dir: tempfile::TempDir,
    log: PathBuf,
}

impl Proxy {
    /// Writes the files (with `{LISTEN}` and `{ADMIN}` filled in) and starts
    /// the proxy; waits until it serves.
    pub async fn start(routes: &str, policy: &str) -> Proxy {
        Proxy::start_with_args(routes, policy, &[]).await
    }

    /// As [`Proxy::start`], with extra arguments to `k2proxy run`.
    pub async fn start_with_args(routes: &str, policy: &str, args: &[&str]) -> Proxy {
        Proxy::start_with(routes, policy, args, &[]).await
    }

    /// As [`Proxy::start`], with extra arguments and environment variables.
    pub async fn start_with(
        routes: &str,
        policy: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Proxy {
        // A port picked here may be taken before the proxy binds it: retry.
        let mut last = String::new();
        for _ in 0..3 {
            match Proxy::try_start(routes, policy, args, env).await {
                Ok(p) => return p,
                Err(e) => last = e,
            }
        }
        panic!("k2proxy did not start: {last}");
    }

    async fn try_start(
        routes: &str,
        policy: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Proxy, String> {
        let dir = tempfile::tempdir().unwrap();
        let (addr, admin) = (free_addr(), free_addr());
        let routes = routes
            .replace("{LISTEN}", &addr.to_string())
            .replace("{ADMIN}", &admin.to_string());
        std::fs::write(dir.path().join("routes.toml"), routes).unwrap();
        std::fs::write(dir.path().join("policy.toml"), policy).unwrap();
        let log = dir.path().join("k2proxy.log");
        let child = Command::new(k2proxy_bin())
            .arg("run")
            .arg("--routes")
            .arg(dir.path().join("routes.toml"))
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .map_err(|e| e.to_string())?;
        let mut proxy = Proxy {
            addr,
            admin,
            reload_mark: Default::default(),
            child,
            _dir: dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        let client = client();
        loop {
            if let Ok(Some(status)) = proxy.child.try_wait() {
                return Err(format!("exited with {status}: {}", proxy.log_text()));
            }
            let admin_ok = client
                .get(format!("http://{}/healthz", proxy.admin))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200);
            if admin_ok && tokio::net::TcpStream::connect(proxy.addr).await.is_ok() {
                // The ports were free when picked, not reserved: another
                // test's proxy may have taken one meanwhile (ours then fails
                // to bind it). Ready means the admin answering is our child.
                let pid = client
                    .get(format!("http://{}/status", proxy.admin))
                    .send()
                    .await
                    .ok()
                    .map(|r| r.json::<serde_json::Value>());
                let pid = match pid {
                    Some(body) => body.await.ok().and_then(|s| s["pid"].as_u64()),
                    None => None,
                };
                if pid == Some(u64::from(proxy.child.id())) {
                    return Ok(proxy);
                }
                if pid.is_some() {
                    // Dropping `proxy` ends our child.
                    return Err(format!(
                        "port {} or {} is another proxy's",
                        proxy.addr, proxy.admin
                    ));
                }
            }
            if Instant::now() > deadline {
                return Err(format!("not ready after 15 s: {}", proxy.log_text()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// The first log line containing `needle`, waiting up to 2 s for it:
    /// the access event is written when the request's logging phase runs,
    /// just after the client got its response.
    pub async fn log_line(&self, needle: &str) -> String {
        for _ in 0..200 {
            if let Some(l) = self.log_text().lines().find(|l| l.contains(needle)) {
                return l.to_string();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no log line with {needle:?} in:\n{}", self.log_text());
    }

    /// `GET` of an admin path: the body text.
    async fn admin_text(&self, path: &str) -> String {
        client()
            .get(self.admin_url(path))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// `GET /metrics`: the Prometheus text.
    pub async fn metrics(&self) -> String {
        self.admin_text("/metrics").await
    }

    /// The `/metrics` text once it contains `want` (waiting up to 2 s, for the
    /// same reason as [`Proxy::log_line`]); the last text seen otherwise.
    pub async fn metrics_when(&self, want: &str) -> String {
        let mut text = String::new();
        for _ in 0..200 {
            text = self.metrics().await;
            if text.contains(want) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        text
    }

    /// The proxy's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How long the process took to exit, if it did within `within`.
    pub async fn exited_within(&mut self, within: Duration) -> Option<Duration> {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Some(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// The directory holding `routes.toml` and `policy.toml`.
    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// Replaces a config file atomically (write aside, rename), as editors
    /// and deploy tools do.
    pub fn write_file(&self, name: &str, text: &str) {
        let tmp = self.dir().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir().join(name)).unwrap();
    }

    /// `GET /status` as JSON.
    pub async fn status(&self) -> serde_json::Value {
        let text = self.admin_text("/status").await;
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {text}"))
    }

    /// Waits for a reload attempt (ok or rejected) newer than the last one
    /// this test saw, and returns `/status` then. Panics after `within`.
    pub async fn wait_reload(&self, within: Duration) -> serde_json::Value {
        let deadline = Instant::now() + within;
        let mark = self.reload_mark.lock().unwrap().clone();
        loop {
            let s = self.status().await;
            let last = &s["last_reload"];
            let seen = last.to_string();
            if !last.is_null() && seen != mark {
                *self.reload_mark.lock().unwrap() = seen;
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "no reload within {within:?}: {s}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// What the proxy has logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP client that ignores any proxy settings of the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}
