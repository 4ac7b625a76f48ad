//! Every carry-over rule of a reload, one test each, on configs built from
//! TOML as ops write them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue};

use super::Generation;
use crate::admission::Sample;
use crate::classify::TierId;
use crate::config::{load_sources, Config, SourceFile};
use crate::metrics::Metrics;

const MERCHANT_LIMIT: &str = r#"
[[rate_limit]]
route = "api"
key = "header:x-merchant-id"
per_second = 1
burst = 1
"#;

/// A config with two sites (`skondal`, then `site_b`) and routes in `order`.
fn config_with(policy_extra: &str, site_b: &str, order: [&str; 2]) -> Config {
    config_full(
        policy_extra,
        site_b,
        order,
        r#"["127.0.0.1:2", "127.0.0.1:4"]"#,
    )
}

fn config_full(policy_extra: &str, site_b: &str, order: [&str; 2], primary: &str) -> Config {
    let route = |name: &str| {
        format!("[[routes]]\nname = \"{name}\"\nmatch = {{ path_prefix = \"/{name}/\" }}\ntier = \"purchase\"\ncluster = \"kred\"\n")
    };
    let routes = format!(
        r#"[server]
listen = ["127.0.0.1:1"]
[clusters.kred]
[[clusters.kred.sites]]
name = "skondal"
role = "primary"
backends = {primary}
[[clusters.kred.sites]]
name = "{site_b}"
role = "secondary"
backends = ["127.0.0.1:3"]
{}{}"#,
        route(order[0]),
        route(order[1])
    );
    let policy = format!("tiers = [\"purchase\", \"cs\"]\n{policy_extra}");
    let src = |path: &str, text: String| SourceFile {
        path: path.into(),
        text,
    };
    load_sources(&src("routes.toml", routes), &src("policy.toml", policy)).unwrap()
}

fn config(policy_extra: &str, site_b: &str) -> Config {
    config_with(policy_extra, site_b, ["checkout", "api"])
}

fn merchant(id: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-merchant-id", HeaderValue::from_str(id).unwrap());
    h
}

fn route_index(g: &Generation, name: &str) -> usize {
    g.config.routes.iter().position(|r| r.name == name).unwrap()
}

#[test]
fn generations_are_numbered_from_one() {
    let m = Metrics::new();
    let first = Generation::next(config("", "verizon"), None, &m);
    let second = Generation::next(config("", "verizon"), Some(&first), &m);
    assert_eq!((first.number, second.number), (1, 2));
}

#[tokio::test(start_paused = true)]
async fn controllers_are_kept_by_cluster_and_site_name() {
    let m = Metrics::new();
    let first = Generation::next(
        config("[admission.kred]\nmode = \"fixed\"\nlimit = 2\n", "verizon"),
        None,
        &m,
    );
    let skondal = first.controllers.get(0, 0).unwrap().clone();
    let held = skondal.acquire(0).await.unwrap();

    // New settings, same names: the same controller, its permit still counted,
    // the new limit in force; a renamed site starts fresh.
    let second = Generation::next(
        config("[admission.kred]\nmode = \"fixed\"\nlimit = 5\n", "oslo"),
        Some(&first),
        &m,
    );
    assert!(Arc::ptr_eq(&skondal, second.controllers.get(0, 0).unwrap()));
    assert_eq!(skondal.state().limit, 5);
    assert_eq!(skondal.state().inflight, 1, "in flight carried over");
    let (old_b, new_b) = (
        first.controllers.get(0, 1).unwrap(),
        second.controllers.get(0, 1).unwrap(),
    );
    assert!(!Arc::ptr_eq(old_b, new_b));
    assert_eq!(new_b.site(), "oslo");
    drop(held);
    assert_eq!(skondal.state().inflight, 0);
}

#[tokio::test(start_paused = true)]
async fn a_learned_adaptive_limit_is_kept() {
    let m = Metrics::new();
    let policy = "[admission.kred]\ninitial = 10\nmin = 2\nmax = 100\n";
    let first = Generation::next(config(policy, "verizon"), None, &m);
    let ctl = first.controllers.get(0, 0).unwrap().clone();
    // Fast, fully used backend: the limit learns upwards.
    for _ in 0..20 {
        let mut permits = Vec::new();
        for _ in 0..ctl.state().limit {
            permits.push(ctl.acquire(0).await.unwrap());
        }
        tokio::time::advance(Duration::from_millis(10)).await;
        for mut p in permits {
            p.record(Sample::Latency(Duration::from_millis(10)));
        }
    }
    let learned = ctl.state().limit;
    assert!(learned > 10, "limit learned {learned}");
    let second = Generation::next(config(policy, "verizon"), Some(&first), &m);
    let after = second.controllers.get(0, 0).unwrap().state().limit;
    assert_eq!(after, learned, "a reload does not reset the learned limit");
}

/// A rate-limit check outside a runtime (instance-scope rules never wait).
fn limit(g: &Generation, route: usize, headers: &http::HeaderMap) -> Option<Duration> {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(g.limiters.check(route, TierId(0), None, headers))
}

#[test]
fn rate_limit_buckets_follow_the_rule_name_when_routes_are_reordered() {
    let m = Metrics::new();
    let first = Generation::next(
        config_with(MERCHANT_LIMIT, "verizon", ["checkout", "api"]),
        None,
        &m,
    );
    let api = route_index(&first, "api");
    let check = |g: &Generation, route| limit(g, route, &merchant("m1"));
    assert_eq!(check(&first, api), None, "the burst of one");
    assert!(check(&first, api).is_some(), "then refused");

    // The same rule; its route moved from index 1 to 0.
    let second = Generation::next(
        config_with(MERCHANT_LIMIT, "verizon", ["api", "checkout"]),
        Some(&first),
        &m,
    );
    let api = route_index(&second, "api");
    assert_eq!(api, 0);
    assert!(check(&second, api).is_some(), "the spent bucket is kept");
    assert_eq!(
        check(&second, route_index(&second, "checkout")),
        None,
        "the rule did not move to the route now at its old index"
    );

    // A changed rate is a new rule: full buckets.
    let faster = MERCHANT_LIMIT.replace("per_second = 1", "per_second = 2");
    let third = Generation::next(config(&faster, "verizon"), Some(&second), &m);
    assert_eq!(check(&third, route_index(&third, "api")), None);
}

#[test]
fn a_renamed_rate_limit_starts_with_full_buckets() {
    let m = Metrics::new();
    let named = |name: &str| format!("{MERCHANT_LIMIT}name = \"{name}\"\n");
    let first = Generation::next(config(&named("merchants"), "verizon"), None, &m);
    let api = route_index(&first, "api");
    let check = |g: &Generation| limit(g, api, &merchant("m1"));
    assert_eq!(check(&first), None);
    let same = Generation::next(config(&named("merchants"), "verizon"), Some(&first), &m);
    assert!(check(&same).is_some(), "same name: bucket kept");
    let renamed = Generation::next(config(&named("quota"), "verizon"), Some(&same), &m);
    assert_eq!(check(&renamed), None, "another name: fresh bucket");
}

#[test]
fn the_rate_limit_store_is_kept_while_its_url_is_and_fleet_buckets_follow_it() {
    let m = Metrics::new();
    let store = |url: &str| {
        format!(
            "[rate_limit_store]\nredis = \"{url}\"\nfleet_size = 3\n{MERCHANT_LIMIT}scope = \"fleet\"\n"
        )
    };
    let a = store("redis://127.0.0.1:1/0");
    let first = Generation::next(config(&a, "verizon"), None, &m);
    let second = Generation::next(config(&a, "verizon"), Some(&first), &m);
    let (s1, s2) = (
        first.limiters.store().unwrap(),
        second.limiters.store().unwrap(),
    );
    assert!(
        Arc::ptr_eq(s1, s2),
        "same URL: the same store (connection, state)"
    );
    assert!(second.config.rate_limits[0].fleet);
    let other = Generation::next(
        config(&store("redis://127.0.0.1:2/0"), "verizon"),
        Some(&second),
        &m,
    );
    assert!(
        !Arc::ptr_eq(s2, other.limiters.store().unwrap()),
        "another URL: a new store"
    );
    let none = Generation::next(config(MERCHANT_LIMIT, "verizon"), Some(&other), &m);
    assert!(none.limiters.store().is_none());
}

#[test]
fn the_retry_budget_is_kept_by_cluster_name() {
    let m = Metrics::new();
    let policy = "[retries]\nbudget = 0.0\n";
    let first = Generation::next(config(policy, "verizon"), None, &m);
    let now = Instant::now();
    // A zero share leaves the floor of a few retries per window: spend it.
    let budget = &first.clusters[0].budget;
    let mut spent = 0;
    while budget.try_retry(now) {
        spent += 1;
        assert!(spent < 100, "the floor is small");
    }
    let second = Generation::next(config(policy, "verizon"), Some(&first), &m);
    assert!(
        !second.clusters[0].budget.try_retry(now),
        "a reload does not refill the budget"
    );
}

#[test]
fn backend_health_is_kept_by_site_name_and_address() {
    let m = Metrics::new();
    let first = Generation::next(config("", "verizon"), None, &m);
    let down: SocketAddr = "127.0.0.1:2".parse().unwrap();
    let sites = &first.clusters[0].sites;
    for _ in 0..5 {
        sites.probe(0, down, false);
    }
    let now = Instant::now();
    let usable = |g: &Generation, site: usize| -> Vec<(SocketAddr, bool)> {
        g.clusters[0].sites.view(now)[site]
            .iter()
            .map(|b| (b.addr, b.usable))
            .collect()
    };
    assert!(usable(&first, 0).contains(&(down, false)));

    // The same backends in another order, and a new one: health follows
    // the address, not the position; the new backend is not yet down.
    let reordered = r#"["127.0.0.1:5", "127.0.0.1:4", "127.0.0.1:2"]"#;
    let second = Generation::next(
        config_full("", "verizon", ["checkout", "api"], reordered),
        Some(&first),
        &m,
    );
    assert!(usable(&second, 0).contains(&(down, false)), "still down");
    let new: SocketAddr = "127.0.0.1:5".parse().unwrap();
    assert!(usable(&second, 0).contains(&(new, true)));
    let other: SocketAddr = "127.0.0.1:4".parse().unwrap();
    assert!(usable(&second, 0).contains(&(other, true)));
}
