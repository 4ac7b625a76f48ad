//! The floor k2proxy's design adds to: a bare pingora HTTP proxy that sends
//! every request to one upstream over pooled keep-alive connections, with no
//! routes, tiers, admission, health or metrics. `make bench` builds it
//! (`cargo build --release --example bare_pingora`) and compares k2proxy's
//! throughput against it.
//!
//! `bare_pingora --listen 127.0.0.1:8081 --upstream 127.0.0.1:9001 --threads 2`
//!
//! With `--tls-cert C --tls-key K` it listens for HTTPS instead, with
//! pingora's own TLS listener on the same stack as k2proxy (rustls, h2 by
//! ALPN): the floor of `make bench-peers PHASES=tls`.

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Bare {
    upstream: String,
    /// `--timeouts`: per-peer connect/read/write timeouts, as k2proxy sets
    /// them (to measure what they cost).
    timeouts: bool,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let mut peer = HttpPeer::new(self.upstream.as_str(), false, String::new());
        if self.timeouts {
            let t = std::time::Duration::from_secs(10);
            peer.options.connection_timeout = Some(std::time::Duration::from_millis(500));
            peer.options.read_timeout = Some(t);
            peer.options.write_timeout = Some(t);
        }
        Ok(Box::new(peer))
    }
}

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let listen = arg(&args, "--listen", "127.0.0.1:8081");
    let upstream = arg(&args, "--upstream", "127.0.0.1:9001");
    let threads: usize = arg(&args, "--threads", "2").parse().unwrap_or_else(|_| {
        eprintln!("bare_pingora: --threads expects a number");
        std::process::exit(2)
    });
    let mut conf = ServerConf::new().expect("pingora's default configuration");
    conf.threads = threads;
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let timeouts = args.iter().any(|a| a == "--timeouts");
    let mut proxy = http_proxy_service(&server.configuration, Bare { upstream, timeouts });
    match (
        args.iter().any(|a| a == "--tls-cert"),
        args.iter().any(|a| a == "--tls-key"),
    ) {
        (true, true) => {
            let (cert, key) = (arg(&args, "--tls-cert", ""), arg(&args, "--tls-key", ""));
            let mut tls = pingora::listeners::tls::TlsSettings::intermediate(&cert, &key)
                .unwrap_or_else(|e| {
                    eprintln!("bare_pingora: {cert} / {key}: {e}");
                    std::process::exit(2)
                });
            tls.enable_h2();
            proxy.add_tls_with_settings(&listen, None, tls);
        }
        (false, false) => proxy.add_tcp(&listen),
        _ => {
            eprintln!("bare_pingora: --tls-cert and --tls-key go together");
            std::process::exit(2)
        }
    }
    server.add_service(proxy);
    server.run_forever();
}
