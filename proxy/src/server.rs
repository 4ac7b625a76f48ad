//! Builds the pingora server: the proxy service on `[server].listen` and the
//! admin service on `[server].admin`.

use std::sync::Arc;

use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server};
use pingora::services::listening::Service;

use crate::admin::Admin;
use crate::edge::drain::DrainSignal;
use crate::edge::Edge;
use crate::gateway::Gateway;
use crate::reload::ReloadService;
use crate::Shared;

/// Options of `k2proxy run` that reach pingora.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Take over the listeners of a running k2proxy (graceful upgrade).
    pub upgrade: bool,
    /// Set by SIGHUP (registered before the server starts); asks for a reload.
    pub sighup: Arc<std::sync::atomic::AtomicBool>,
}

/// Runs k2proxy until it is stopped (SIGTERM drains first: `edge::drain`).
pub fn run(shared: Arc<Shared>, opts: &RunOptions) {
    let server = build(shared.clone(), opts);
    server.run(RunArgs {
        shutdown_signal: Box::new(DrainSignal::new(shared)),
    });
}

/// A server ready to run.
fn build(shared: Arc<Shared>, opts: &RunOptions) -> Server {
    let gen = shared.current.load_full();
    let snap = &gen.config;
    let mut conf = ServerConf::new().expect("pingora's default configuration");
    conf.threads = snap.server.threads;
    // A stopping k2proxy finishes in-flight checkouts, but not forever.
    conf.grace_period_seconds = Some(5);
    conf.upgrade_sock = snap.server.upgrade_sock.display().to_string();
    conf.pid_file = snap
        .server
        .upgrade_sock
        .with_extension("pid")
        .display()
        .to_string();
    conf.graceful_shutdown_timeout_seconds = Some(10);
    let opt = Opt {
        upgrade: opts.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let gateway = pingora::proxy::http_proxy(&server.configuration, Gateway::new(shared.clone()));
    let mut proxy = Service::new("k2proxy".to_string(), Edge::new(gateway, shared.clone()));
    for addr in &snap.server.listen {
        proxy.add_tcp(&addr.to_string());
    }
    let shared_for_reload = shared.clone();
    let health = pingora::services::background::background_service(
        "k2proxy health",
        crate::health::HealthService::new(shared.clone()),
    );
    let mut admin = Service::new("k2proxy admin".to_string(), Admin::new(shared));
    admin.add_tcp(&snap.server.admin.to_string());
    admin.threads = Some(1);

    let reload = pingora::services::background::background_service(
        "k2proxy reload",
        ReloadService::new(shared_for_reload, opts.sighup.clone()),
    );

    server.add_service(proxy);
    server.add_service(admin);
    server.add_service(reload);
    server.add_service(health);
    server
}
