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

/// Starts this process's limits from `path`, if a process before it left
/// them there recently; says in the log what it found.
pub fn restore(shared: &Shared, path: &Path) {
    let gen = shared.current.load();
    match memory::restore(path, &gen.controllers, SystemTime::now()) {
        Ok(Restored::Absent) => {
            tracing::info!(file = %path.display(), "no admission state kept yet: limits start at `initial`")
        }
        Ok(Restored::Stale { age }) => tracing::info!(
            file = %path.display(),
            age_s = age.as_secs(),
            "admission state too old to use: limits start at `initial`"
        ),
        Ok(Restored::Resumed(sites)) => {
            for s in &sites {
                tracing::info!(cluster = %s.cluster, site = %s.site, limit = s.limit, "adaptive limit resumed from the admission state");
            }
        }
        Err(e) => tracing::warn!(error = %e, "admission state not used: limits start at `initial`"),
    }
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

    /// Writes the file; a failure is logged once until a write succeeds.
    fn save(&self, failing: &mut bool) {
        let gen = self.shared.current.load();
        match memory::save(&self.path, &gen.controllers, SystemTime::now()) {
            Ok(()) => *failing = false,
            Err(e) if !*failing => {
                *failing = true;
                tracing::warn!(file = %self.path.display(), error = %e, "cannot write the admission state");
            }
            Err(_) => {}
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
