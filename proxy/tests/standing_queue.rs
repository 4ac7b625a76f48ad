//! End to end, `[shedding] refuse_standing_queue`: the real k2proxy in front
//! of a legacy-sim of fixed capacity, purchases alone at twice that capacity
//! for 8 s, once with the default policy and once with the setting on.
//! Without it, the purchases served wait most of their `max_queue_wait`
//! (2 s); with it, the excess is refused and the purchases served wait
//! only the target.

mod support;

use std::time::Duration;

use loadtest::openloop::{self, Plan, Report, Target};
use loadtest::sim::{self, SimConfig};
use support::*;

const WORKERS: usize = 4;
const SERVICE: Duration = Duration::from_millis(25);
/// Requests per second the simulator can serve.
const CAPACITY: f64 = WORKERS as f64 / 0.025;
const SECONDS: u64 = 8;

/// Purchases alone at 2x capacity through a k2proxy with `policy`.
async fn purchases_at_2x(refuse: bool) -> Report {
    let config = SimConfig::fixed("legacy", WORKERS, SERVICE);
    let sim = sim::start(config, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let mut policy = default_policy();
    if refuse {
        policy = policy.replace("[shedding]\n", "[shedding]\nrefuse_standing_queue = true\n");
        assert!(policy.contains("refuse_standing_queue"));
    }
    let proxy = Proxy::start(&kred_routes(sim.addr), &policy).await;
    let report = openloop::run(Plan {
        targets: vec![Target {
            name: "purchase".into(),
            url: proxy.url("/checkout/pay").parse().unwrap(),
            weight: 1.0,
            headers: vec![],
            body: None,
        }],
        rate: (2.0 * CAPACITY) as u32,
        duration: Duration::from_secs(SECONDS),
        timeout: Duration::from_secs(5),
        seed: 17,
    })
    .await;
    println!("refuse_standing_queue = {refuse}\n{}", report.summary());
    report
}

fn ms(us: u64) -> f64 {
    us as f64 / 1e3
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standing_queue_of_purchases_is_refused_fast_when_set() {
    let waiting = purchases_at_2x(false).await;
    let refusing = purchases_at_2x(true).await;
    let (w, r) = (
        waiting.target("purchase").unwrap(),
        refusing.target("purchase").unwrap(),
    );
    let (w_p50, r_p50) = (
        ms(w.ok_latency.value_at_quantile(0.5)),
        ms(r.ok_latency.value_at_quantile(0.5)),
    );
    let r_shed_p50 = ms(r.shed_latency.value_at_quantile(0.5));
    println!(
        "served p50: waiting {w_p50:.0} ms, refusing {r_p50:.0} ms; refused p50 {r_shed_p50:.0} ms"
    );
    // Without the setting the served purchases wait out a standing queue.
    assert!(w_p50 > 500.0, "served p50 without the setting {w_p50} ms");
    // With it they wait at most the target (20 ms) on top of 25 ms of
    // service; the debug build on 2 cores adds its own.
    assert!(r_p50 < 150.0, "served p50 with the setting {r_p50} ms");
    assert!(r_shed_p50 < 100.0, "refused p50 {r_shed_p50} ms");
    // The excess is refused, and the backend stays busy.
    assert!(
        (0.3..=0.75).contains(&r.success()),
        "success {:.3}",
        r.success()
    );
    let goodput = refusing.ok() as f64 / (CAPACITY * SECONDS as f64);
    assert!(goodput >= 0.8, "goodput {goodput:.3} of capacity");
    let timeouts = r.outcomes.timeout + r.outcomes.error;
    assert_eq!(timeouts, 0, "{}", refusing.summary());
}
