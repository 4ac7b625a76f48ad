//! `[server] admission_state`: the running process writes what its adaptive
//! limits learnt every second and on its way out, so the next process
//! (a restart, a graceful upgrade) starts from it instead of `initial`
//! (`admission::memory` has the file and why).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::admission::memory::{self, Restored};
use crate::Shared;

/// How often the file is written.
const EVERY: Duration = Duration::from_secs(1);

/// The state file as `/status` shows it.
#[derive(Debug, Clone)]
pub struct Report {
    pub file: PathBuf,
    /// What the start made of it: `resumed`, `absent`, `stale` or an error.
    pub at_start: String,
    /// `cluster/site` of the limits resumed at start.
    pub resumed: Vec<String>,
    /// Why the last write failed; `None` once one succeeds.
    pub write_error: Option<String>,
}

/// Starts this process's limits from `path`, if a process before it left
/// them there recently; says in the log (and `/status`) what it found.
pub fn restore(shared: &Shared, path: &Path) {
    let gen = shared.current.load();
    let mut report = Report {
        file: path.to_path_buf(),
        at_start: String::new(),
        resumed: Vec::new(),
        write_error: None,
    };
    match memory::restore(path, &gen.controllers, SystemTime::now()) {
        Ok(Restored::Absent) => {
            report.at_start = "absent".into();
            tracing::info!(file = %path.display(), "no admission state kept yet: limits start at `initial`")
        }
        Ok(Restored::Stale { age }) => {
            report.at_start = format!("stale ({} s old)", age.as_secs());
            tracing::info!(
                file = %path.display(),
                age_s = age.as_secs(),
                "admission state too old to use: limits start at `initial`"
            )
        }
        Ok(Restored::Resumed(sites)) => {
            report.at_start = "resumed".into();
            for s in &sites {
                report.resumed.push(format!("{}/{}", s.cluster, s.site));
                tracing::info!(cluster = %s.cluster, site = %s.site, limit = s.limit, baseline_ms = ?s.baseline_ms, "adaptive limit resumed from the admission state");
            }
        }
        Err(e) => {
            report.at_start = format!("not used: {e}");
            tracing::warn!(error = %e, "admission state not used: limits start at `initial`")
        }
    }
    *shared
        .admission_state
        .lock()
        .unwrap_or_else(|e| e.into_inner()) = Some(report);
}

/// Writes the admission state file every [`EVERY`] and at shutdown.
pub struct RememberService {
    shared: Arc<Shared>,
    path: PathBuf,
}

impl RememberService {
    pub fn new(shared: Arc<Shared>, path: PathBuf) -> RememberService {
        RememberService { shared, path }
    }

    /// Writes the file; a failure is logged once until a write succeeds,
    /// and shown on `/status` until then.
    fn save(&self, failing: &mut bool) {
        let gen = self.shared.current.load();
        let result = memory::save(&self.path, &gen.controllers, SystemTime::now());
        if let Err(e) = &result {
            if !*failing {
                tracing::warn!(file = %self.path.display(), error = %e, "cannot write the admission state");
            }
        }
        *failing = result.is_err();
        self.shared
            .metrics
            .admission_state_write_failing
            .set(i64::from(*failing));
        let mut report = self
            .shared
            .admission_state
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(r) = report.as_mut() {
            r.write_error = result.err().map(|e| e.to_string());
        }
    }
}

#[async_trait]
impl BackgroundService for RememberService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut failing = false;
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                _ = shutdown.changed() => break,
                _ = tick.tick() => self.save(&mut failing),
            }
        }
        self.save(&mut failing);
    }
}
