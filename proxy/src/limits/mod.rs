//! Rate limits, per `[[rate_limit]]` (GCRA): a rule applies to a route or a
//! tier and counts per key — the client's IP (behind trusted proxies, from
//! `x-forwarded-for`) or a header's value; a request without the key is
//! counted in one shared bucket, let through or refused, as the rule's
//! `missing` says. Over the limit: 429 with `retry-after` and
//! `x-k2-shed: rate_limited`, before admission, never sent upstream.
//!
//! `scope = "instance"` rules count on this instance (governor). `scope =
//! "fleet"` rules count in the fleet's shared store ([`store`]: Redis),
//! leasing tokens in small batches: a request takes a leased token when one
//! is held and goes to the store only to lease the next batch. While the
//! store is down, a fleet rule counts here at `per_second / fleet_size`.
//!
//! A store that flaps (slow, down for a moment, back) must not hand out a
//! fresh burst at each change. So the local bucket follows what this
//! instance admits in fleet mode too (a fallback starts from its recent
//! use, not full), and what the fallback admitted is owed to the store and
//! spent there with the next lease (the store's bucket, refilled while
//! nobody asked it, returns no fuller than the fleet left it).
//!
//! Memory is bounded: keys idle long enough to be back at a full bucket are
//! evicted once a second ([`Limiters::evict_idle`]). A rule that a reload
//! leaves unchanged keeps its buckets and leases (`runtime::carry`).

pub mod store;

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::HeaderMap;

use crate::classify::TierId;
use crate::config::{MissingKey, RateKey, RateLimit, RateLimitStore, RateScope};
use store::{Ask, StoreError};
pub use store::{Lease, Store};

/// The key of the one bucket shared by requests without the rule's key.
const MISSING: &str = "(missing)";

/// How long leased tokens stay usable: tokens a quiet instance holds longer
/// are dropped (spent in the store, unused: the fleet admits a little less,
/// never more).
const LEASE_TTL: Duration = Duration::from_secs(1);

/// What a refused request waits when its rule denies requests without the
/// key.
const DENIED_WAIT: Duration = Duration::from_secs(1);

/// One rule with its buckets (shared with the same rule of the generation
/// before, when a reload kept them).
pub struct Limiter {
    rule: RateLimit,
    /// The rule's quota (instance scope), or the fallback quota while the
    /// store is down (fleet scope: `per_second / fleet_size`).
    buckets: Arc<DefaultKeyedRateLimiter<String>>,
    /// Fleet scope: tokens leased from the store, per key.
    leases: Arc<Mutex<HashMap<String, Held>>>,
    /// Fleet scope: tokens per lease.
    batch: u32,
}

/// Tokens leased for one key, usable until `until`; and tokens the
/// fallback admitted for it, owed to the store until `owed_until`.
#[derive(Debug, Clone, Copy)]
struct Held {
    tokens: u32,
    until: Instant,
    owed: u32,
    owed_until: Instant,
}

impl Held {
    fn new(now: Instant) -> Held {
        Held {
            tokens: 0,
            until: now,
            owed: 0,
            owed_until: now,
        }
    }

    fn live(&self, now: Instant) -> bool {
        self.until > now || self.owed_until > now
    }
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Limiter({:?}, {} keys)", self.rule, self.buckets.len())
    }
}

/// The quota governor counts with: the rule's, or a fleet rule's share.
fn quota(rule: &RateLimit, store: Option<&RateLimitStore>) -> Quota {
    let divisor = match (rule.fleet, store) {
        (true, Some(s)) => s.fleet_size.max(1),
        _ => 1,
    };
    let per_second = NonZeroU32::new(rule.per_second / divisor).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(rule.burst / divisor).unwrap_or(per_second);
    Quota::per_second(per_second).allow_burst(burst)
}

impl Limiter {
    pub(crate) fn new(rule: RateLimit, store: Option<&RateLimitStore>) -> Limiter {
        Limiter {
            buckets: Arc::new(RateLimiter::keyed(quota(&rule, store))),
            leases: Arc::default(),
            batch: store.map_or(1, |s| s.batch_for(&rule)),
            rule,
        }
    }

    /// The same buckets under `rule` (the same rule, its route index moved).
    pub(crate) fn with_rule(&self, rule: RateLimit) -> Limiter {
        Limiter {
            rule,
            buckets: self.buckets.clone(),
            leases: self.leases.clone(),
            batch: self.batch,
        }
    }

    pub(crate) fn rule(&self) -> &RateLimit {
        &self.rule
    }

    fn applies(&self, route: usize, tier: TierId) -> bool {
        match self.rule.scope {
            RateScope::Route(r) => r == route,
            RateScope::Tier(t) => t == tier,
        }
    }

    /// The request's key; `Err(())` when the rule denies it for lacking one,
    /// `Ok(None)` when the rule lets it through uncounted.
    fn key(&self, client: Option<IpAddr>, headers: &HeaderMap) -> Result<Option<String>, ()> {
        let key = match &self.rule.key {
            RateKey::ClientIp => client.map(|ip| ip.to_string()),
            RateKey::Header(name) => headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        };
        match (key, self.rule.missing) {
            (Some(k), _) => Ok(Some(k)),
            (None, MissingKey::Bucket) => Ok(Some(MISSING.to_string())),
            (None, MissingKey::Allow) => Ok(None),
            (None, MissingKey::Deny) => Err(()),
        }
    }

    /// `Err(wait)` when `key` is over the local quota.
    fn check_local(&self, key: &String) -> Result<(), Duration> {
        self.buckets
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Takes a leased token for `key`, if one is held and fresh.
    fn take_leased(&self, key: &str, now: Instant) -> bool {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        match leases.get_mut(key) {
            Some(h) if h.tokens > 0 && h.until > now => {
                h.tokens -= 1;
                true
            }
            _ => false,
        }
    }

    fn hold(&self, key: String, tokens: u32, now: Instant) {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let h = leases.entry(key).or_insert(Held::new(now));
        if h.until <= now {
            h.tokens = 0;
        }
        h.tokens += tokens;
        h.until = now + LEASE_TTL;
    }

    /// Takes what `key` owes the store (0 once stale: the store's bucket
    /// has refilled past it).
    fn take_owed(&self, key: &str, now: Instant) -> u32 {
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        match leases.get_mut(key) {
            Some(h) if h.owed_until > now => std::mem::take(&mut h.owed),
            _ => 0,
        }
    }

    fn owe(&self, key: String, tokens: u32, now: Instant) {
        if tokens == 0 {
            return;
        }
        let mut leases = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let h = leases.entry(key).or_insert(Held::new(now));
        h.owed += tokens;
        h.owed_until = now + LEASE_TTL;
    }

    /// A fleet admission, counted in the local bucket as well (its verdict
    /// does not matter here): a fallback then starts from this instance's
    /// recent use.
    fn mirror(&self, key: &String) {
        let _ = self.buckets.check_key(key);
    }

    /// A fleet rule's check: a leased token, else a lease from the store,
    /// else (store down or slow) the local fallback quota.
    async fn check_fleet(
        &self,
        key: String,
        store: &Arc<Store>,
        timeout: Duration,
    ) -> Result<(), Duration> {
        let now = Instant::now();
        if self.take_leased(&key, now) {
            self.mirror(&key);
            return Ok(());
        }
        let ask = Ask {
            per_second: self.rule.per_second,
            burst: self.rule.burst,
            want: self.batch,
            owed: self.take_owed(&key, now),
        };
        match store.lease(&self.rule.name, &key, ask, timeout).await {
            Ok(Lease::Granted(n)) => {
                self.mirror(&key);
                if n > 1 {
                    self.hold(key, n - 1, now);
                }
                Ok(())
            }
            Ok(Lease::Empty(wait)) => Err(wait),
            Err(e) => {
                tracing::debug!(rule = %self.rule.name, error = %e, "rate limit decided locally");
                store.count_fallback();
                let verdict = self.check_local(&key);
                // A lease that timed out most likely ran (Redis was slow,
                // not gone): what it carried, and this request's token, are
                // spent there already.
                if !matches!(e, StoreError::Timeout(_)) {
                    self.owe(key, ask.owed + u32::from(verdict.is_ok()), now);
                }
                verdict
            }
        }
    }

    /// Keys currently held.
    #[cfg(test)]
    fn keys(&self) -> usize {
        self.buckets.len()
    }
}

/// The limiters of one generation, in policy order, and the fleet's store
/// (when the policy names one).
#[derive(Debug, Default, Clone)]
pub struct Limiters {
    rules: Vec<Arc<Limiter>>,
    store: Option<(Arc<Store>, Duration)>,
}

impl Limiters {
    pub(crate) fn new(
        limiters: Vec<Arc<Limiter>>,
        store: Option<(Arc<Store>, Duration)>,
    ) -> Limiters {
        Limiters {
            rules: limiters,
            store,
        }
    }

    /// `Some(wait)` when a rule that applies refuses the request.
    pub async fn check(
        &self,
        route: usize,
        tier: TierId,
        client: Option<IpAddr>,
        headers: &HeaderMap,
    ) -> Option<Duration> {
        let mut wait: Option<Duration> = None;
        for l in self.rules.iter().filter(|l| l.applies(route, tier)) {
            let verdict = match l.key(client, headers) {
                Err(()) => Err(DENIED_WAIT),
                Ok(None) => continue,
                Ok(Some(key)) => match (&self.store, l.rule.fleet) {
                    (Some((store, timeout)), true) => l.check_fleet(key, store, *timeout).await,
                    _ => l.check_local(&key),
                },
            };
            if let Err(w) = verdict {
                wait = Some(wait.map_or(w, |x| x.max(w)));
            }
        }
        wait
    }

    /// Drops keys whose bucket is full again (idle), and stale leases, and
    /// frees their memory.
    pub fn evict_idle(&self) {
        let now = Instant::now();
        for l in &self.rules {
            l.buckets.retain_recent();
            l.buckets.shrink_to_fit();
            let mut leases = l.leases.lock().unwrap_or_else(|e| e.into_inner());
            leases.retain(|_, h| h.live(now));
            leases.shrink_to_fit();
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Limiter>> {
        self.rules.iter()
    }

    /// The fleet's store, if the policy names one.
    pub fn store(&self) -> Option<&Arc<Store>> {
        self.store.as_ref().map(|(s, _)| s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn rule(per_second: u32, burst: u32) -> RateLimit {
        RateLimit {
            name: "merchants".into(),
            applies_to: "route:api".into(),
            scope: RateScope::Route(0),
            key: RateKey::Header(http::HeaderName::from_static("x-merchant-id")),
            per_second,
            burst,
            fleet: false,
            missing: MissingKey::Allow,
        }
    }

    fn limiters(rules: &[RateLimit]) -> Limiters {
        Limiters::new(
            rules
                .iter()
                .map(|r| Arc::new(Limiter::new(r.clone(), None)))
                .collect(),
            None,
        )
    }

    fn headers(merchant: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-merchant-id", HeaderValue::from_str(merchant).unwrap());
        h
    }

    #[tokio::test]
    async fn burst_then_refusal_with_a_wait_and_keys_are_separate() {
        let ls = limiters(&[rule(1, 3)]);
        let a = headers("a");
        for _ in 0..3 {
            assert_eq!(ls.check(0, TierId(0), None, &a).await, None);
        }
        let wait = ls
            .check(0, TierId(0), None, &a)
            .await
            .expect("over the burst");
        assert!(
            wait > Duration::from_millis(500) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert_eq!(
            ls.check(0, TierId(0), None, &headers("b")).await,
            None,
            "another key is unaffected"
        );
        assert_eq!(
            ls.check(1, TierId(0), None, &a).await,
            None,
            "another route is unaffected"
        );
        assert_eq!(
            ls.check(0, TierId(0), None, &HeaderMap::new()).await,
            None,
            "no key header: not counted"
        );
    }

    #[tokio::test]
    async fn a_request_without_the_key_is_bucketed_allowed_or_denied_as_the_rule_says() {
        let none = HeaderMap::new();
        for (missing, expect) in [
            (MissingKey::Bucket, [None, None, Some(())]),
            (MissingKey::Allow, [None, None, None]),
            (MissingKey::Deny, [Some(()), Some(()), Some(())]),
        ] {
            let ls = limiters(&[RateLimit {
                missing,
                ..rule(1, 2)
            }]);
            let mut got = Vec::new();
            for _ in 0..3 {
                got.push(ls.check(0, TierId(0), None, &none).await.map(|_| ()));
            }
            assert_eq!(got, expect, "{missing:?}");
        }
    }

    #[tokio::test]
    async fn idle_keys_are_evicted() {
        let ls = limiters(&[rule(1000, 1)]);
        for m in 0..100 {
            ls.check(0, TierId(0), None, &headers(&format!("m{m}")))
                .await;
        }
        assert_eq!(ls.iter().next().unwrap().keys(), 100);
        std::thread::sleep(Duration::from_millis(20));
        ls.evict_idle();
        assert_eq!(ls.iter().next().unwrap().keys(), 0);
    }
}
