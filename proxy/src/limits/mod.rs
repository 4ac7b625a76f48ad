//! Rate limits, per `[[rate_limit]]` (governor, GCRA): a rule applies to a
//! route or a tier and counts per key — the client's IP or a header's value
//! (a request without that header is not counted by that rule). Over the
//! limit: 429 with `retry-after` and `x-k2-shed: rate_limited`, before
//! admission, never sent upstream.
//!
//! Memory is bounded: keys idle long enough to be back at a full bucket are
//! evicted once a second ([`Limiters::evict_idle`]). A rule that a reload
//! leaves unchanged keeps its buckets (`runtime::carry`).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::HeaderMap;

use crate::classify::TierId;
use crate::config::{RateKey, RateLimit, RateScope};

/// One rule with its buckets (shared with the same rule of the generation
/// before, when a reload kept them).
pub struct Limiter {
    rule: RateLimit,
    buckets: Arc<DefaultKeyedRateLimiter<String>>,
}

impl std::fmt::Debug for Limiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Limiter({:?}, {} keys)", self.rule, self.buckets.len())
    }
}

impl Limiter {
    pub(crate) fn new(rule: RateLimit) -> Limiter {
        let per_second = NonZeroU32::new(rule.per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(rule.burst).unwrap_or(per_second);
        Limiter {
            buckets: Arc::new(RateLimiter::keyed(
                Quota::per_second(per_second).allow_burst(burst),
            )),
            rule,
        }
    }

    /// The same buckets under `rule` (the same rule, its route index moved).
    pub(crate) fn with_rule(&self, rule: RateLimit) -> Limiter {
        Limiter {
            rule,
            buckets: self.buckets.clone(),
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

    fn key(&self, client: Option<IpAddr>, headers: &HeaderMap) -> Option<String> {
        match &self.rule.key {
            RateKey::ClientIp => client.map(|ip| ip.to_string()),
            RateKey::Header(name) => headers
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        }
    }

    /// `Err(wait)` when `key` is over the limit.
    fn check(&self, key: &String) -> Result<(), Duration> {
        self.buckets
            .check_key(key)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }

    /// Keys currently held.
    #[cfg(test)]
    fn keys(&self) -> usize {
        self.buckets.len()
    }
}

/// The limiters of one generation, in policy order.
#[derive(Debug, Default, Clone)]
pub struct Limiters(Vec<Arc<Limiter>>);

impl Limiters {
    pub(crate) fn new(limiters: Vec<Arc<Limiter>>) -> Limiters {
        Limiters(limiters)
    }

    /// `Some(wait)` when a rule that applies refuses the request.
    pub fn check(
        &self,
        route: usize,
        tier: TierId,
        client: Option<IpAddr>,
        headers: &HeaderMap,
    ) -> Option<Duration> {
        let mut wait: Option<Duration> = None;
        for l in self.0.iter().filter(|l| l.applies(route, tier)) {
            let Some(key) = l.key(client, headers) else {
                continue;
            };
            if let Err(w) = l.check(&key) {
                wait = Some(wait.map_or(w, |x| x.max(w)));
            }
        }
        wait
    }

    /// Drops keys whose bucket is full again (idle), and frees their memory.
    pub fn evict_idle(&self) {
        for l in &self.0 {
            l.buckets.retain_recent();
            l.buckets.shrink_to_fit();
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Limiter>> {
        self.0.iter()
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
        }
    }

    fn limiters(rules: &[RateLimit]) -> Limiters {
        Limiters::new(
            rules
                .iter()
                .map(|r| Arc::new(Limiter::new(r.clone())))
                .collect(),
        )
    }

    fn headers(merchant: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("x-merchant-id", HeaderValue::from_str(merchant).unwrap());
        h
    }

    #[test]
    fn burst_then_refusal_with_a_wait_and_keys_are_separate() {
        let ls = limiters(&[rule(1, 3)]);
        let a = headers("a");
        for _ in 0..3 {
            assert_eq!(ls.check(0, TierId(0), None, &a), None);
        }
        let wait = ls.check(0, TierId(0), None, &a).expect("over the burst");
        assert!(
            wait > Duration::from_millis(500) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert_eq!(
            ls.check(0, TierId(0), None, &headers("b")),
            None,
            "another key is unaffected"
        );
        assert_eq!(
            ls.check(1, TierId(0), None, &a),
            None,
            "another route is unaffected"
        );
        assert_eq!(
            ls.check(0, TierId(0), None, &HeaderMap::new()),
            None,
            "no key header: not counted"
        );
    }

    #[test]
    fn idle_keys_are_evicted() {
        let ls = limiters(&[rule(1000, 1)]);
        for m in 0..100 {
            ls.check(0, TierId(0), None, &headers(&format!("m{m}")));
        }
        assert_eq!(ls.iter().next().unwrap().keys(), 100);
        std::thread::sleep(Duration::from_millis(20));
        ls.evict_idle();
        assert_eq!(ls.iter().next().unwrap().keys(), 0);
    }
}
