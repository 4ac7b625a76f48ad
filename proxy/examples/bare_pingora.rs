//! The floor k2proxy's design adds to: a bare pingora HTTP proxy that sends
//! every request to one upstream over pooled keep-alive connections, with no
//! routes, tiers, admission, health or metrics. `make bench` builds it
//! (`cargo build --release --example bare_pingora`) and compares k2proxy's
//! throughput against it.
//!
//! `bare_pingora --listen 127.0.0.1:8081 --upstream 127.0.0.1:9001 --threads 2`

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Bare {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
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
    let mut proxy = http_proxy_service(&server.configuration, Bare { upstream });
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}
