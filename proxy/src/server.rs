//! Builds the pingora server: the proxy service on `[server].listen` and the
//! admin service on `[server].admin`.

use std::sync::Arc;

use pingora::apps::HttpServerOptions;
use pingora::protocols::http::v2::server::{default_h2_options, H2Options};
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

/// HTTP/2 limits for clients: pingora's bounded defaults (100 concurrent
/// streams), a header list no larger than an HTTP/1.1 head may be, and the
/// h2 crate's guards against reset floods (CVE-2023-44487): a client whose
/// streams are reset faster than they are accepted, or who makes k2proxy
/// reset streams for protocol errors, gets GOAWAY ENHANCE_YOUR_CALM.
fn h2_options(server: &crate::config::Server) -> H2Options {
    let mut o = default_h2_options();
    o.max_concurrent_streams(H2_MAX_STREAMS)
        .max_header_list_size(server.max_header_bytes as u32)
        .max_pending_accept_reset_streams(H2_MAX_PENDING_RESETS)
        .max_local_error_reset_streams(Some(H2_MAX_LOCAL_RESETS));
    o
}

/// Streams one HTTP/2 connection may have open at once.
const H2_MAX_STREAMS: u32 = 100;
/// Streams reset by the client before k2proxy took them.
const H2_MAX_PENDING_RESETS: usize = 50;
/// Streams k2proxy reset for a client's protocol errors.
const H2_MAX_LOCAL_RESETS: usize = 256;

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

    let mut gateway =
        pingora::proxy::http_proxy(&server.configuration, Gateway::new(shared.clone()));
    gateway.h2_options = Some(h2_options(&snap.server));
    let mut options = HttpServerOptions::default();
    // An HTTP/2 connection with no stream open is closed like an idle
    // HTTP/1.1 keep-alive one.
    options.h2_idle_timeout = Some(snap.server.idle_timeout);
    gateway.server_options = Some(options);
    let mut proxy = Service::new("k2proxy".to_string(), Edge::new(gateway, shared.clone()));
    // HTTPS listeners are TCP listeners too: the edge does the handshake
    // (crate::tls::accept says why).
    let https = snap.server.tls.iter().map(|t| t.listen);
    for addr in snap.server.listen.iter().copied().chain(https) {
        proxy.add_tcp(&addr.to_string());
    }
    let shared_for_reload = shared.clone();
    let shared_for_state = shared.clone();
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
    if let Some(path) = gen.config.server.admission_state.clone() {
        // Before any request: the first ones then meet the limits resumed.
        crate::remember::restore(&shared_for_state, &path);
        server.add_service(pingora::services::background::background_service(
            "k2proxy admission state",
            crate::remember::RememberService::new(shared_for_state, path),
        ));
    }
    server
}
