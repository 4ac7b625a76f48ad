//! The controller's async glue on tokio's paused clock: permits come back on
//! every path, waiters are served in priority order and time out on time.

use std::sync::Arc;
use std::time::Duration;

use super::gate::{Rules, TierRule};
use super::limit::Limit;
use super::*;
use crate::metrics::Metrics;

const MS: Duration = Duration::from_millis(1);

fn controller(limit: u32) -> Arc<Controller> {
    let tier = |wait_ms: u64, never: bool| TierRule {
        max_wait: Duration::from_millis(wait_ms),
        max_share: 1.0,
        never_shed: never,
        force_shed: false,
    };
    let rules = Rules {
        tiers: vec![tier(2000, true), tier(500, false), tier(100, false)],
        target_queue_delay: 20 * MS,
        max_queue: 100,
    };
    let names = ["purchase".to_string(), "merchant".into(), "cs".into()];
    Arc::new(Controller::new(
        "kred",
        "skondal",
        rules,
        Limit::fixed(limit),
        &names,
        &Metrics::new(),
    ))
}

#[tokio::test(start_paused = true)]
async fn dropping_a_permit_admits_the_highest_waiter() {
    let c = controller(1);
    let held = c.acquire(2).await.unwrap();
    let low = tokio::spawn({
        let c = c.clone();
        async move { c.acquire(2).await.map(|p| p.waited()) }
    });
    let high = tokio::spawn({
        let c = c.clone();
        async move { c.acquire(0).await.map(|p| p.waited()) }
    });
    tokio::time::sleep(10 * MS).await;
    assert_eq!(c.state().2, 2, "both wait");
    drop(held);
    let waited = high.await.unwrap().expect("purchase admitted");
    assert_eq!(waited, 10 * MS);
    // The purchase's permit was dropped when its task ended: cs gets it next.
    assert!(low.await.unwrap().is_ok());
    assert_eq!(c.state().1, 0);
}

#[tokio::test(start_paused = true)]
async fn a_waiter_is_shed_at_its_tiers_deadline_and_nothing_leaks() {
    let c = controller(1);
    let _held = c.acquire(0).await.unwrap();
    let start = tokio::time::Instant::now();
    let err = c.acquire(2).await.unwrap_err();
    assert_eq!(err, ShedReason::QueueTimeout);
    assert_eq!(
        start.elapsed(),
        100 * MS,
        "cs waits exactly its max_queue_wait"
    );
    assert_eq!(c.state().1, 1);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_waiter_does_not_keep_a_slot() {
    let c = controller(1);
    let held = c.acquire(0).await.unwrap();
    // A client that disconnects while queued: its acquire future is dropped.
    let waiter = tokio::spawn({
        let c = c.clone();
        async move { c.acquire(1).await }
    });
    tokio::time::sleep(5 * MS).await;
    waiter.abort();
    let _ = waiter.await;
    drop(held);
    assert_eq!(
        c.state().1,
        0,
        "the grant to the gone waiter was taken back"
    );
    assert!(c.acquire(1).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_panic_while_holding_a_permit_releases_it() {
    let c = controller(1);
    let task = tokio::spawn({
        let c = c.clone();
        async move {
            let _permit = c.acquire(0).await.unwrap();
            panic!("a filter panicked");
        }
    });
    assert!(task.await.unwrap_err().is_panic());
    assert_eq!(c.state().1, 0);
    assert!(c.acquire(0).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_sheds_the_lowest_waiter_for_a_purchase() {
    let tier = |never| TierRule {
        max_wait: Duration::from_secs(5),
        max_share: 1.0,
        never_shed: never,
        force_shed: false,
    };
    let rules = Rules {
        tiers: vec![tier(true), tier(false)],
        target_queue_delay: Duration::from_secs(10),
        max_queue: 1,
    };
    let names = ["purchase".to_string(), "cs".into()];
    let c = Arc::new(Controller::new(
        "k",
        "s",
        rules,
        Limit::fixed(1),
        &names,
        &Metrics::new(),
    ));
    let _held = c.acquire(0).await.unwrap();
    let low = tokio::spawn({
        let c = c.clone();
        async move { c.acquire(1).await }
    });
    tokio::time::sleep(MS).await;
    let high = tokio::spawn({
        let c = c.clone();
        async move { c.acquire(0).await }
    });
    assert_eq!(low.await.unwrap().unwrap_err(), ShedReason::QueueFull);
    drop(_held);
    assert!(high.await.unwrap().is_ok());
}

fn snapshot(policy_extra: &str, site_b: &str) -> crate::config::Snapshot {
    use crate::config::{load_sources, SourceFile};
    let routes = format!(
        r#"[server]
listen = ["127.0.0.1:1"]
[clusters.kred]
[[clusters.kred.sites]]
name = "skondal"
role = "primary"
backends = ["127.0.0.1:2"]
[[clusters.kred.sites]]
name = "{site_b}"
role = "secondary"
backends = ["127.0.0.1:3"]
[[routes]]
name = "r"
match = {{}}
tier = "purchase"
cluster = "kred"
"#
    );
    let policy = format!("tiers = [\"purchase\", \"cs\"]\n{policy_extra}");
    let src = |path: &str, text: String| SourceFile {
        path: path.into(),
        text,
    };
    load_sources(&src("routes.toml", routes), &src("policy.toml", policy)).unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_reload_keeps_each_sites_state_by_name() {
    let metrics = Metrics::new();
    let registry = Registry::default();
    let first = registry.sync(
        &snapshot("[admission.kred]\nmode = \"fixed\"\nlimit = 2\n", "verizon"),
        &metrics,
    );
    let skondal = first.get(0, 0).unwrap().clone();
    let held = skondal.acquire(0).await.unwrap();

    // New settings, same names: the same controller, its permit still counted,
    // the new limit in force; a renamed site starts fresh.
    let second = registry.sync(
        &snapshot("[admission.kred]\nmode = \"fixed\"\nlimit = 5\n", "oslo"),
        &metrics,
    );
    assert!(Arc::ptr_eq(&skondal, second.get(0, 0).unwrap()));
    assert_eq!(skondal.state().0, 5);
    assert_eq!(skondal.state().1, 1, "in flight carried over");
    assert!(!Arc::ptr_eq(
        first.get(0, 1).unwrap(),
        second.get(0, 1).unwrap()
    ));
    assert_eq!(second.get(0, 1).unwrap().site(), "oslo");
    drop(held);
    assert_eq!(skondal.state().1, 0);
}

#[tokio::test(start_paused = true)]
async fn a_reload_keeps_a_learned_adaptive_limit() {
    let metrics = Metrics::new();
    let registry = Registry::default();
    let policy = "[admission.kred]\ninitial = 10\nmin = 2\nmax = 100\n";
    let ctl = registry
        .sync(&snapshot(policy, "verizon"), &metrics)
        .get(0, 0)
        .unwrap()
        .clone();
    // Fast, fully used backend: the limit learns upwards.
    for _ in 0..20 {
        let mut permits = Vec::new();
        for _ in 0..ctl.state().0 {
            permits.push(ctl.acquire(0).await.unwrap());
        }
        tokio::time::advance(Duration::from_millis(10)).await;
        for mut p in permits {
            p.record(Sample::Latency(Duration::from_millis(10)));
        }
    }
    let learned = ctl.state().0;
    assert!(learned > 10, "limit learned {learned}");
    let after = registry
        .sync(&snapshot(policy, "verizon"), &metrics)
        .get(0, 0)
        .unwrap()
        .clone();
    assert_eq!(
        after.state().0,
        learned,
        "a reload does not reset the learned limit"
    );
}
