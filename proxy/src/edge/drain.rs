//! Leaving a fleet without dropping a purchase.
//!
//! pingora stops accepting the moment SIGTERM arrives, so an L4 balancer
//! that health-checks `/healthz` cannot tell a draining node from a dead one
//! and connections it sends in between are refused. [`DrainSignal`] is
//! pingora's shutdown-signal watcher with a drain in front: on SIGTERM
//! `/healthz` turns 503 `{"status":"draining"}` at once (and
//! `k2_draining` 1, `/status` and the status page say so), kept-alive
//! connections are closed after their current response, and the listeners
//! keep accepting for `[server].drain_delay`; then pingora's graceful
//! shutdown stops the listeners and lets in-flight requests finish within
//! the grace period. A second SIGTERM, or SIGINT, cuts the delay short.
//!
//! SIGQUIT (graceful upgrade) hands the listeners to the new process after
//! [`UPGRADE_DELAY`], during which responses close their connections
//! instead of keeping them alive (`/healthz` stays 200: the node stays).
//! Without it, the old process closed its idle kept-alive connections at
//! the handover, and a request a client sent on one at that moment failed
//! (1 in 900 in the upgrade test, now and then). A connection idle through
//! the whole delay (256 load-test clients at 100 requests a second) is
//! still closed at the handover: no HTTP/1 server can close an idle
//! connection without that race, and clients resend such a request (the
//! load generator does since 2026-12-07, as browsers, curl and Go do).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::signal::unix::{signal, SignalKind};

use crate::Shared;

/// How long an upgrading process keeps its listeners, closing each
/// connection after its response, before it hands them over: long enough
/// for a client's pooled connections to each carry one more request.
const UPGRADE_DELAY: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether this process is draining (SIGTERM received), or upgrading.
#[derive(Debug, Default)]
pub(crate) struct Draining(AtomicBool);

impl Draining {
    pub(crate) fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// pingora's Unix signal watcher, with the drain on SIGTERM.
pub(crate) struct DrainSignal {
    shared: Arc<Shared>,
}

impl DrainSignal {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        DrainSignal { shared }
    }
}

#[async_trait]
impl ShutdownSignalWatch for DrainSignal {
    async fn recv(&self) -> ShutdownSignal {
        let mut quit = signal(SignalKind::quit()).expect("SIGQUIT handler");
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = quit.recv() => {
                self.shared.upgrading.set();
                tracing::info!(delay = ?UPGRADE_DELAY, "SIGQUIT: connections close after their response; listeners go to the new process after the delay");
                tokio::time::sleep(UPGRADE_DELAY).await;
                return ShutdownSignal::GracefulUpgrade;
            }
            _ = int.recv() => return ShutdownSignal::FastShutdown,
            _ = term.recv() => {}
        }
        let delay = self.shared.current.load().config.server.drain_delay;
        self.shared.draining.set();
        self.shared.metrics.draining.set(1);
        tracing::info!(
            drain_delay = ?delay,
            "SIGTERM: draining (/healthz answers 503); listeners stop after the drain delay"
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = term.recv() => tracing::info!("second SIGTERM: drain delay cut short"),
            _ = int.recv() => return ShutdownSignal::FastShutdown,
        }
        tracing::info!("drain delay over: listeners stop, in-flight requests finish");
        ShutdownSignal::GracefulTerminate
    }
}
