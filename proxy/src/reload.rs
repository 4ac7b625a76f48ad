//! Hot reload: a file change (debounced, editor-safe), SIGHUP or
//! `POST /reload` re-reads `routes.toml` and the policy it names, checks
//! everything, and swaps one generation: the config with its live state,
//! built by [`crate::runtime`], whose carry-over rules keep what was learned
//! (by name). A bad file changes nothing: the running config keeps serving,
//! the error (file, line, column) is logged, counted and shown in `/status`.
//! Listeners, the admin address and threads are read at start only: a change
//! to them is reported as needing a restart, and the rest still applies.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher as _};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::Serialize;

use crate::config::{self, ConfigErrors, Server};
use crate::Shared;

/// Quiet time after the last file event before reloading: editors write in
/// several steps (truncate, write, rename).
pub const DEBOUNCE: Duration = Duration::from_millis(50);
/// How often the service looks at the SIGHUP flag and samples rates.
const TICK: Duration = Duration::from_millis(50);

/// What asked for a reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    FileChange,
    Sighup,
    Admin,
}

/// The outcome of the last reload, for `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct LastReload {
    pub at_unix_ms: u64,
    pub trigger: Trigger,
    pub ok: bool,
    /// Every problem, as `file:line:col: error: …`.
    pub errors: Vec<String>,
    /// Settings that changed but take effect only after a restart.
    pub restart_needed: Vec<String>,
    pub duration_ms: f64,
    /// Generation in force after the attempt.
    pub generation: u64,
}

/// What changed in `[server]` that a running process cannot apply.
fn restart_needed(running: &Server, new: &Server) -> Vec<String> {
    let mut out = Vec::new();
    if running.listen != new.listen {
        out.push(format!(
            "[server].listen: {:?} -> {:?}",
            running.listen, new.listen
        ));
    }
    if running.admin != new.admin {
        out.push(format!(
            "[server].admin: {} -> {}",
            running.admin, new.admin
        ));
    }
    if running.upgrade_sock != new.upgrade_sock {
        out.push(format!(
            "[server].upgrade_sock: {} -> {}",
            running.upgrade_sock.display(),
            new.upgrade_sock.display()
        ));
    }
    if running.admission_state != new.admission_state {
        let shown = |p: &Option<PathBuf>| {
            p.as_ref()
                .map_or("none".to_string(), |p| p.display().to_string())
        };
        out.push(format!(
            "[server].admission_state: {} -> {}",
            shown(&running.admission_state),
            shown(&new.admission_state)
        ));
    }
    let https = |s: &Server| s.tls.iter().map(|t| t.listen).collect::<Vec<_>>();
    if https(running) != https(new) {
        out.push(format!(
            "[[server.tls]] listen: {:?} -> {:?} (certificates, names and h2 of running listeners apply now)",
            https(running),
            https(new)
        ));
    }
    if running.threads != new.threads {
        out.push(format!(
            "[server].threads: {} -> {}",
            running.threads, new.threads
        ));
    }
    out
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Shared {
    /// Re-reads and checks both files; on success swaps the generation and
    /// returns the new generation. Reloads run one at a time.
    pub fn reload(&self, trigger: Trigger) -> Result<u64, ConfigErrors> {
        let _one_at_a_time = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let start = Instant::now();
        let result = config::load(&self.paths);
        let mut last = LastReload {
            at_unix_ms: unix_ms(),
            trigger,
            ok: result.is_ok(),
            errors: Vec::new(),
            restart_needed: Vec::new(),
            duration_ms: 0.0,
            generation: 0,
        };
        let outcome = match result {
            Ok(config) => {
                last.restart_needed = restart_needed(&self.started, &config.server);
                for r in &last.restart_needed {
                    tracing::warn!(setting = %r, "config reload: needs a restart to take effect");
                }
                let policy = config.policy_path.display().to_string();
                let generation = self.install(config);
                self.metrics.config_reloads.with_label_values(&["ok"]).inc();
                tracing::info!(?trigger, generation, %policy, "config reloaded");
                Ok(generation)
            }
            Err(errors) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["error"])
                    .inc();
                for e in &errors.0 {
                    tracing::error!(
                        ?trigger,
                        "config reload rejected, the running config keeps serving: {e}"
                    );
                }
                last.errors = errors.0.iter().map(|e| e.to_string()).collect();
                Err(errors)
            }
        };
        last.duration_ms = start.elapsed().as_secs_f64() * 1e3;
        last.generation = self.generation();
        *self.last_reload.lock().unwrap_or_else(|e| e.into_inner()) = Some(last);
        outcome
    }
}

/// The background service behind hot reload: file watching, SIGHUP, and the
/// once-a-second upkeep (`/status` rates, rate-limit key eviction).
pub struct ReloadService {
    shared: Arc<Shared>,
    sighup: Arc<AtomicBool>,
}

impl ReloadService {
    /// `sighup` is set by a signal handler registered before the server
    /// starts (so an early SIGHUP cannot kill the process).
    pub fn new(shared: Arc<Shared>, sighup: Arc<AtomicBool>) -> Self {
        ReloadService { shared, sighup }
    }

    /// The files a reload reads now: routes, the policy in force, and the
    /// certificates, keys and CA bundles they name (rotation is a reload).
    fn files(&self) -> Vec<PathBuf> {
        let gen = self.shared.current.load();
        let snap = &gen.config;
        let mut files = vec![snap.routes_path.clone(), snap.policy_path.clone()];
        files.extend(snap.tls_files());
        files
    }
}

/// Directories to watch: a file's directory sees atomic renames and
/// re-creations that a watch on the file itself would lose.
fn dirs(files: &[PathBuf]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = files
        .iter()
        .map(|f| match f.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Whether an event changed one of `files`. Opening and reading a file (as a
/// reload does) and metadata changes (access times) are not changes: counting
/// them would make every reload trigger the next.
fn touches(event: &notify::Event, files: &[PathBuf]) -> bool {
    use notify::event::{EventKind, ModifyKind};
    let changed = match event.kind {
        EventKind::Create(_) | EventKind::Remove(_) | EventKind::Any => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(_) | EventKind::Other => false,
    };
    if !changed {
        return false;
    }
    let names: Vec<_> = files.iter().filter_map(|f| f.file_name()).collect();
    event
        .paths
        .iter()
        .any(|p| p.file_name().is_some_and(|n| names.contains(&n)))
}

#[async_trait]
impl BackgroundService for ReloadService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher = match notify::recommended_watcher(move |ev| {
            let _ = tx.send(ev);
        }) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(error = %e, "cannot watch config files; reload with SIGHUP or POST /reload");
                None
            }
        };
        let mut watched: Vec<PathBuf> = Vec::new();
        let mut rewatch = |watcher: &mut Option<notify::RecommendedWatcher>, files: &[PathBuf]| {
            let Some(w) = watcher else { return };
            let want = dirs(files);
            for d in watched.iter().filter(|d| !want.contains(d)) {
                let _ = w.unwatch(d);
            }
            for d in want.iter().filter(|d| !watched.contains(d)) {
                if let Err(e) = w.watch(d, RecursiveMode::NonRecursive) {
                    tracing::warn!(dir = %d.display(), error = %e, "cannot watch directory");
                }
            }
            watched = want;
        };
        let mut files = self.files();
        rewatch(&mut watcher, &files);
        self.shared
            .watching
            .store(watcher.is_some(), Ordering::Release);

        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut pending: Option<Instant> = None;
        let mut last_upkeep = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                Some(event) = rx.recv() => {
                    if let Ok(event) = event {
                        if touches(&event, &files) {
                            pending = Some(Instant::now() + DEBOUNCE);
                        }
                    }
                }
                _ = async {
                    match pending {
                        Some(at) => tokio::time::sleep_until(at.into()).await,
                        None => std::future::pending().await,
                    }
                } => {
                    pending = None;
                    let _ = self.shared.reload(Trigger::FileChange);
                    files = self.files();
                    rewatch(&mut watcher, &files);
                }
                _ = tick.tick() => {
                    let mut reloaded = false;
                    if self.sighup.swap(false, Ordering::AcqRel) {
                        let _ = self.shared.reload(Trigger::Sighup);
                        reloaded = true;
                    }
                    if reloaded {
                        // The policy file may have been switched.
                        files = self.files();
                        rewatch(&mut watcher, &files);
                    }
                    if last_upkeep.elapsed() >= Duration::from_secs(1) {
                        last_upkeep = Instant::now();
                        self.shared.upkeep();
                    }
                }
            }
        }
    }
}

/// Registers SIGHUP to set the returned flag (before the server starts).
pub fn sighup_flag() -> std::io::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, flag.clone())?;
    Ok(flag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_needed_lists_exactly_what_changed() {
        let a = Server {
            listen: vec!["127.0.0.1:1".parse().unwrap()],
            admin: "127.0.0.1:2".parse().unwrap(),
            threads: 2,
            upgrade_sock: PathBuf::from("/tmp/x.sock"),
            admission_state: None,
            max_header_bytes: 32 * 1024,
            idle_timeout: std::time::Duration::from_secs(60),
            header_timeout: std::time::Duration::from_secs(10),
            keepalive_requests: 1000,
            keepalive_time: std::time::Duration::from_secs(60),
            max_connections: None,
            max_connections_per_client: 1000,
            drain_delay: std::time::Duration::from_secs(5),
            proxy_protocol_from: Vec::new(),
            tls: Vec::new(),
        };
        let mut b = a.clone();
        assert!(restart_needed(&a, &b).is_empty());
        b.threads = 4;
        b.listen.push("127.0.0.1:3".parse().unwrap());
        let r = restart_needed(&a, &b);
        assert_eq!(r.len(), 2);
        assert!(r[0].starts_with("[server].listen"));
        assert_eq!(r[1], "[server].threads: 2 -> 4");
        // An HTTPS listener added needs a restart; its certificates do not.
        let mut c = a.clone();
        c.tls.push(crate::config::TlsListener {
            listen: "127.0.0.1:4".parse().unwrap(),
            h2: true,
            certs: Vec::new(),
        });
        let r = restart_needed(&a, &c);
        assert_eq!(r.len(), 1);
        assert!(r[0].starts_with("[[server.tls]] listen"), "{r:?}");
        let mut d = c.clone();
        d.tls[0].h2 = false;
        assert!(restart_needed(&c, &d).is_empty());
    }

    #[test]
    fn events_are_matched_by_file_name_in_watched_dirs() {
        let files = vec![
            PathBuf::from("/etc/k2/routes.toml"),
            PathBuf::from("/etc/k2/policies/peak.toml"),
        ];
        assert_eq!(
            dirs(&files),
            [PathBuf::from("/etc/k2"), PathBuf::from("/etc/k2/policies")]
        );
        let ev = |p: &str| notify::Event::new(notify::EventKind::Any).add_path(PathBuf::from(p));
        assert!(touches(&ev("/etc/k2/routes.toml"), &files));
        let read = notify::Event::new(notify::EventKind::Access(notify::event::AccessKind::Close(
            notify::event::AccessMode::Read,
        )))
        .add_path(PathBuf::from("/etc/k2/routes.toml"));
        assert!(
            !touches(&read, &files),
            "a reload reading the file is not a change"
        );
        assert!(touches(&ev("/etc/k2/policies/peak.toml"), &files));
        assert!(!touches(&ev("/etc/k2/.routes.toml.swp"), &files));
        assert_eq!(dirs(&[PathBuf::from("routes.toml")]), [PathBuf::from(".")]);
    }
}
