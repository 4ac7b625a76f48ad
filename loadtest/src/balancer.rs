//! The L4 balancer in front of a fleet of k2proxy instances, as IPVS with
//! keepalived's health checks (or a cloud NLB) runs it: each new
//! connection goes to the next instance in turn whose `GET /healthz`
//! answers 200, and its bytes are copied both ways until either side
//! closes. A draining instance (SIGTERM: `/healthz` answers 503) gets no
//! new connection from the next check on, [`CHECK_EVERY`]; a connect that
//! fails goes to the next instance (nothing was sent on it yet), as
//! HAProxy's `redispatch` does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How often each instance's `/healthz` is checked.
pub const CHECK_EVERY: Duration = Duration::from_millis(100);

/// A running balancer; dropping it stops it (open connections included).
pub struct Balancer {
    /// Where clients connect.
    pub addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
}

/// The instances and what the checks last said of each.
struct Pool {
    /// Each instance's listener.
    to: Vec<SocketAddr>,
    /// Whether its last check answered 200.
    up: Vec<AtomicBool>,
    /// The next instance in turn.
    next: AtomicUsize,
}

impl Pool {
    /// The instances to try for a new connection, in order: those up from
    /// the next in turn on, then those down (a check can lag a restart by
    /// [`CHECK_EVERY`]; a refused connect costs nothing).
    fn candidates(&self) -> Vec<SocketAddr> {
        let n = self.to.len();
        let first = self.next.fetch_add(1, Ordering::Relaxed);
        let order = (0..n).map(|k| (first + k) % n);
        let (up, down): (Vec<usize>, Vec<usize>) =
            order.partition(|&i| self.up[i].load(Ordering::Relaxed));
        up.into_iter().chain(down).map(|i| self.to[i]).collect()
    }
}

impl Balancer {
    /// Listens on a free loopback port in front of the instances listening
    /// on `to`, checking each one's `/healthz` on its admin address (the
    /// same order as `to`). Every instance counts as up until its first
    /// check says otherwise.
    pub fn start(to: Vec<SocketAddr>, admins: Vec<SocketAddr>) -> Result<Balancer, String> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.set_nonblocking(true).map(|_| l))
            .and_then(TcpListener::from_std)
            .map_err(|e| format!("the balancer's listener: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let pool = Arc::new(Pool {
            up: to.iter().map(|_| AtomicBool::new(true)).collect(),
            to,
            next: AtomicUsize::new(0),
        });
        let mut tasks = vec![tokio::spawn(serve(listener, pool.clone()))];
        for (i, admin) in admins.into_iter().enumerate() {
            tasks.push(tokio::spawn(check(pool.clone(), i, admin)));
        }
        Ok(Balancer { addr, tasks })
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Checks instance `i`'s `/healthz` every [`CHECK_EVERY`], for ever.
async fn check(pool: Arc<Pool>, i: usize, admin: SocketAddr) {
    loop {
        let answer = crate::topology::http_request(admin, "GET", "/healthz").await;
        let up = answer.is_some_and(|(status, _)| status == 200);
        pool.up[i].store(up, Ordering::Relaxed);
        tokio::time::sleep(CHECK_EVERY).await;
    }
}

/// Accepts connections and hands each to an instance.
async fn serve(listener: TcpListener, pool: Arc<Pool>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let candidates = pool.candidates();
        tokio::spawn(forward(client, candidates));
    }
}

/// Connects to the first of `candidates` that accepts and copies both ways
/// until either side closes; closes the client's connection when none
/// accepts.
async fn forward(mut client: TcpStream, candidates: Vec<SocketAddr>) {
    for target in candidates {
        if let Ok(mut upstream) = TcpStream::connect(target).await {
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(up: &[bool]) -> Pool {
        Pool {
            to: (0..up.len())
                .map(|i| SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)))
                .collect(),
            up: up.iter().map(|&u| AtomicBool::new(u)).collect(),
            next: AtomicUsize::new(0),
        }
    }

    fn ports(addrs: &[SocketAddr]) -> Vec<u16> {
        addrs.iter().map(SocketAddr::port).collect()
    }

    #[test]
    fn connections_go_round_robin_over_the_instances_up() {
        let p = pool(&[true, true, true]);
        let firsts: Vec<u16> = (0..4).map(|_| p.candidates()[0].port()).collect();
        assert_eq!(firsts, [1000, 1001, 1002, 1000]);
    }

    #[test]
    fn an_instance_down_is_tried_last() {
        let p = pool(&[true, false, true]);
        assert_eq!(ports(&p.candidates()), [1000, 1002, 1001]);
        assert_eq!(ports(&p.candidates()), [1002, 1000, 1001]);
        // All down: every one is still tried, in turn.
        let p = pool(&[false, false]);
        assert_eq!(ports(&p.candidates()), [1000, 1001]);
    }

    #[tokio::test]
    async fn a_refused_connect_goes_to_the_next_instance() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // A port nobody listens on, then an echo server.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
        });
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        tokio::spawn(async move {
            let (c, _) = front.accept().await.unwrap();
            forward(c, vec![dead_addr, echo_addr]).await;
        });
        let mut c = TcpStream::connect(front_addr).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"hello");
    }
}
