//! The fleet's shared store for `scope = "fleet"` rate limits: Redis, with
//! GCRA executed atomically in a Lua script, and tokens **leased in small
//! batches** so that a busy key costs one round trip per batch, not per
//! request.
//!
//! The script keeps one value per key, the theoretical arrival time (TAT)
//! of GCRA in microseconds of Redis's own clock (`TIME`, so instances' clocks
//! do not matter). A lease asks for up to `want` tokens and gets as many as
//! the bucket holds (0 when empty, with the wait until the next one). N
//! instances asking at once are serialised by Redis: no token is spent twice.
//!
//! When Redis errors or does not answer within the rule's check timeout, the
//! store is marked down: every instance then limits on its own at
//! `per_second / fleet_size` (the local fallback) and answers no 5xx for it.
//! A probe (PING) every [`PROBE_EVERY`] brings it back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;

/// GCRA, batched. KEYS[1]: the bucket. ARGV: emission interval (µs per
/// token), burst (tokens), want (tokens), owed (tokens this instance
/// admitted on its own while the store was down or slow). Returns
/// {granted, wait_us}.
const LEASE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local owed = tonumber(ARGV[4])
local stored = tonumber(redis.call('GET', KEYS[1]) or now)
local tat = stored
-- What was admitted without the store is spent here too, on the TAT the
-- fleet left (not on now: the refill while nobody asked the store pays for
-- the quota the fallbacks honoured), down to an empty bucket at most:
-- nobody is refused later for what the fallbacks admitted.
if owed > 0 then tat = math.min(tat + owed * interval, now + burst * interval) end
if tat < now then tat = now end
local start = math.max(stored, now)
-- Tokens that fit: each moves TAT by one interval; TAT may run ahead of
-- now by at most burst intervals.
local room = math.floor((now + burst * interval - tat) / interval)
local granted = math.min(want, math.max(room, 0))
tat = tat + granted * interval
if tat > start then
  redis.call('SET', KEYS[1], tat, 'PX', math.ceil((tat - now) / 1000) + 1000)
end
if granted > 0 then return {granted, 0} end
return {0, tat + interval - (now + burst * interval)}
"#;

/// How often a store that is down is probed.
pub const PROBE_EVERY: Duration = Duration::from_millis(200);

/// What a lease returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// This many tokens (at least one).
    Granted(u32),
    /// None left; the next comes after this wait.
    Empty(Duration),
}

/// One lease request: the rule's quota, the tokens wanted, and the tokens
/// owed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    pub per_second: u32,
    pub burst: u32,
    /// Tokens to lease (the rule's batch).
    pub want: u32,
    /// Tokens this instance admitted for the key on its own (store down or
    /// slow) since its last lease: the store spends them first, so a store
    /// that flaps does not hand the fleet a fresh burst on each return.
    pub owed: u32,
}

/// Why the store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the rate-limit store did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the rate-limit store failed: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("the rate-limit store is down (probing every {PROBE_EVERY:?})")]
    Down,
}

/// One Redis, shared by every fleet-scoped rule, kept across reloads while
/// its URL stays the same.
pub struct Store {
    url: String,
    client: redis::Client,
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
    script: redis::Script,
    up: AtomicBool,
    /// Microseconds since `epoch` of the last probe started.
    last_probe_us: AtomicU64,
    epoch: Instant,
    /// Keys are `<prefix><rule>:<key>`.
    prefix: String,
    /// `k2_rate_limit_store_up`, `k2_rate_limit_fallbacks_total`.
    up_gauge: prometheus::IntGauge,
    fallbacks: prometheus::IntCounter,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Store({}, up: {})", self.url, self.is_up())
    }
}

impl Store {
    /// A store for `url` (checked by the config); it connects on first use.
    /// `up_gauge` follows its state; `fallbacks` counts checks decided
    /// locally because of it.
    pub fn new(
        url: &str,
        up_gauge: prometheus::IntGauge,
        fallbacks: prometheus::IntCounter,
    ) -> Result<Arc<Store>, StoreError> {
        up_gauge.set(1);
        Ok(Arc::new(Store {
            url: url.to_string(),
            client: redis::Client::open(url)?,
            connection: tokio::sync::Mutex::new(None),
            script: redis::Script::new(LEASE),
            up: AtomicBool::new(true),
            last_probe_us: AtomicU64::new(0),
            epoch: Instant::now(),
            prefix: "k2rl:".into(),
            up_gauge,
            fallbacks,
        }))
    }

    /// One check decided locally because the store was down or slow.
    pub fn count_fallback(&self) {
        self.fallbacks.inc();
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    fn set_up(&self, up: bool) {
        if self.up.swap(up, Ordering::AcqRel) != up {
            if up {
                tracing::info!(store = %self.url, "rate-limit store is back: fleet limits resume");
            } else {
                tracing::warn!(store = %self.url, "rate-limit store is down: fleet limits fall back to per_second / fleet_size on each instance");
            }
            self.up_gauge.set(i64::from(up));
        }
    }

    async fn connection(&self, timeout: Duration) -> Result<ConnectionManager, StoreError> {
        let mut slot = self.connection.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(timeout)
            .set_response_timeout(timeout)
            .set_number_of_retries(1);
        let c = tokio::time::timeout(
            timeout,
            self.client.get_connection_manager_with_config(config),
        )
        .await
        .map_err(|_| StoreError::Timeout(timeout))??;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Up to `want` tokens of `rule`'s bucket `key`, within `timeout`,
    /// after spending `owed` (admitted by the fallback; see [`Ask`]). A
    /// failure marks the store down (and the caller falls back).
    pub async fn lease(
        self: &Arc<Self>,
        rule: &str,
        key: &str,
        ask: Ask,
        timeout: Duration,
    ) -> Result<Lease, StoreError> {
        if !self.is_up() {
            self.maybe_probe(timeout);
            return Err(StoreError::Down);
        }
        let result = tokio::time::timeout(timeout, async {
            let mut c = self.connection(timeout).await?;
            let interval_us = (1_000_000 / u64::from(ask.per_second.max(1))).max(1);
            let (granted, wait_us): (u32, u64) = self
                .script
                .key(format!("{}{rule}:{key}", self.prefix))
                .arg(interval_us)
                .arg(ask.burst)
                .arg(ask.want)
                .arg(ask.owed)
                .invoke_async(&mut c)
                .await?;
            Ok::<_, StoreError>(if granted > 0 {
                Lease::Granted(granted)
            } else {
                Lease::Empty(Duration::from_micros(wait_us.max(1)))
            })
        })
        .await
        .unwrap_or(Err(StoreError::Timeout(timeout)));
        if result.is_err() {
            self.set_up(false);
            self.last_probe_us
                .store(self.epoch.elapsed().as_micros() as u64, Ordering::Release);
        }
        result
    }

    /// At most one probe per [`PROBE_EVERY`] while down, in the background:
    /// a PING that answers brings the store back.
    fn maybe_probe(self: &Arc<Self>, timeout: Duration) {
        let now = self.epoch.elapsed().as_micros() as u64;
        let last = self.last_probe_us.load(Ordering::Acquire);
        if now.saturating_sub(last) < PROBE_EVERY.as_micros() as u64
            || self
                .last_probe_us
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        let store = self.clone();
        tokio::spawn(async move {
            let ping = tokio::time::timeout(timeout, async {
                let mut c = store.connection(timeout).await?;
                redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .map_err(StoreError::from)
            })
            .await;
            if matches!(ping, Ok(Ok(_))) {
                store.set_up(true);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    //! The lease script on a real redis-server (`make test-deps` installs
    //! it).
    use super::*;

    /// A redis-server on a free loopback port, killed on drop.
    struct Redis(std::process::Child, String);

    impl Redis {
        fn start() -> Redis {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server is not installed: run `make test-deps`");
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "redis-server did not listen");
                std::thread::sleep(Duration::from_millis(20));
            }
            Redis(child, format!("redis://127.0.0.1:{port}/0"))
        }
    }

    impl Drop for Redis {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn store(redis: &Redis) -> Arc<Store> {
        let up = prometheus::IntGauge::new("up", "up").unwrap();
        let fallbacks = prometheus::IntCounter::new("fallbacks", "fallbacks").unwrap();
        Store::new(&redis.1, up, fallbacks).unwrap()
    }

    /// 50/s (20 ms a token), a burst of 10.
    fn ask(want: u32, owed: u32) -> Ask {
        Ask {
            per_second: 50,
            burst: 10,
            want,
            owed,
        }
    }

    const TIMEOUT: Duration = Duration::from_secs(2);

    #[tokio::test]
    async fn what_the_fallback_owes_is_spent_before_anything_is_granted() {
        let redis = Redis::start();
        let s = store(&redis);
        let lease = |key: &'static str, a: Ask| {
            let s = s.clone();
            async move { s.lease("r", key, a, TIMEOUT).await.unwrap() }
        };
        assert_eq!(lease("a", ask(10, 0)).await, Lease::Granted(10));
        assert_eq!(lease("b", ask(10, 4)).await, Lease::Granted(6));
        // Owing far more than the bucket holds: an empty bucket, no more
        // (the next token in one interval, not after the whole debt).
        let Lease::Empty(wait) = lease("c", ask(10, 1000)).await else {
            panic!("a debt of 1000 tokens granted some");
        };
        assert!(wait <= Duration::from_millis(20), "{wait:?}");
    }

    #[tokio::test]
    async fn the_refill_while_the_store_was_away_pays_for_what_the_fallback_admitted() {
        let redis = Redis::start();
        let s = store(&redis);
        // The fleet empties the bucket, then the store is away for 800 ms
        // (40 tokens of refill) while the fallbacks admit 10: the bucket is
        // full again. A debt charged from now instead would empty it.
        assert_eq!(
            s.lease("r", "k", ask(10, 0), TIMEOUT).await.unwrap(),
            Lease::Granted(10)
        );
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert_eq!(
            s.lease("r", "k", ask(10, 10), TIMEOUT).await.unwrap(),
            Lease::Granted(10)
        );
    }
}
