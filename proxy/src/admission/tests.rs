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
        refuse_standing_queue: false,
        standing_after: super::standing::INTERVAL,
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
    assert_eq!(c.state().queued, 2, "both wait");
    drop(held);
    let waited = high.await.unwrap().expect("purchase admitted");
    assert_eq!(waited, 10 * MS);
    // The purchase's permit was dropped when its task ended: cs gets it next.
    assert!(low.await.unwrap().is_ok());
    assert_eq!(c.state().inflight, 0);
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
    assert_eq!(c.state().inflight, 1);
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
        c.state().inflight,
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
    assert_eq!(c.state().inflight, 0);
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
        refuse_standing_queue: false,
        standing_after: super::standing::INTERVAL,
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
