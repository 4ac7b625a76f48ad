//! The cost of a shed decision with 1, 100 and 10,000 requests waiting:
//! refusing a forced tier, refusing a newcomer to a full queue, and deciding
//! that a request must wait. `cargo bench -p proxy --bench admission`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use proxy::admission::gate::{Decision, Gate, Rules, TierRule};
use proxy::admission::limit::Limit;

const TIERS: usize = 5;

fn rules(max_queue: usize) -> Rules {
    Rules {
        tiers: (0..TIERS)
            .map(|t| TierRule {
                max_wait: Duration::from_secs(60),
                max_share: 1.0,
                never_shed: t == 0,
                force_shed: t == TIERS - 1,
            })
            .collect(),
        target_queue_delay: Duration::from_millis(20),
        max_queue,
        refuse_standing_queue: false,
        standing_after: proxy::admission::standing::INTERVAL,
    }
}

/// A gate whose only permit is taken and with `waiters` queued over tiers 0..4.
fn gate_with(waiters: usize, now: Instant) -> Gate<u64> {
    let mut g = Gate::new(rules(waiters), Limit::fixed(1), now);
    assert_eq!(g.try_admit(0, now), Decision::Admit);
    for i in 0..waiters {
        let tier = i % (TIERS - 1);
        assert_eq!(g.try_admit(tier, now), Decision::Queue);
        g.enqueue(tier, now, i as u64).expect("room in the queue");
    }
    g
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("shed_decision");
    for waiters in [1usize, 100, 10_000] {
        let now = Instant::now();
        let mut g = gate_with(waiters, now);
        group.bench_with_input(
            BenchmarkId::new("forced_tier", waiters),
            &waiters,
            |b, _| b.iter(|| black_box(g.try_admit(black_box(TIERS - 1), now))),
        );
        group.bench_with_input(
            BenchmarkId::new("full_queue_refuses_newcomer", waiters),
            &waiters,
            |b, _| {
                b.iter(|| {
                    // Lowest queued tier (3) arriving at a full queue: refused.
                    let d = g.try_admit(3, now);
                    black_box(d);
                    black_box(g.enqueue(3, now, u64::MAX).err())
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("queue_decision", waiters),
            &waiters,
            |b, _| b.iter(|| black_box(g.try_admit(black_box(2), now))),
        );
        assert_eq!(
            g.queued(),
            waiters,
            "benchmarks leave the queue as they found it"
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
