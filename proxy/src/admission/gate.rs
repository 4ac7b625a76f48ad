//! The synchronous heart of admission for one (cluster, site): every decision
//! is a method call with `now` passed in, so the same code runs in the proxy
//! (under a mutex) and in the scenario simulator (on a virtual clock).
//!
//! A request of tier `t` is, in order:
//! 1. shed `forced` when ops pinned `t` off (`force_shed`);
//! 2. shed `shed_level` when the shed level covers `t` (see [`super::shed_level`]);
//! 3. admitted at once when in-flight < limit (less a small headroom kept
//!    for `never_shed` tiers under an adaptive limit, plus the slots they may
//!    take past it, see [`super::overdraft`]), nobody of its tier waits, and
//!    `t` is within its share (or no other tier wants the room);
//! 4. otherwise queued until a permit is handed to it, its deadline passes
//!    (`queue_timeout`; while the shed level is above zero, a sheddable
//!    tier's deadline is [`OVERLOADED_WAIT`] targets at most, and older
//!    waiters are refused then), or a full queue gives its place to a higher tier
//!    (`queue_full`). While the `never_shed` tiers' own queue stands (see
//!    [`super::standing`]), they wait only a short target.

use std::time::{Duration, Instant};

use super::cost::TierCosts;
use super::demand::Demand;
use super::limit::{Limit, Sample, Urgency};
use super::overdraft;
use super::queue::{TierQueue, Waiter};
use super::shed_level::{Coverage, ShedLevel, STEPS, URGENT};
use super::standing::Standing;
use super::starving::{Seen, Served, Starving};

/// While the shed level is above zero, a waiter of a sheddable tier waits at
/// most this many target queue delays (80 ms at the default 20 ms), whatever
/// its tier's `max_queue_wait`: the backend is short of capacity, and a
/// request that has not got in by then is the excess, refused now rather
/// than at its deadline. The slot it would have taken goes to one that
/// arrived later, so the backend serves as much. Before, merchants (500 ms)
/// and admin (200 ms) timed out at their own deadlines: in real fleets in
/// front of a slow backend (32 workers of log-normal 100 ms) the slowest
/// refusal after the first second took 203-461 ms at 3x, 82-87 ms with
/// this (docs/admission.md, "Fiftieth round"). More than [`URGENT`]
/// targets, so the standing queue that raises the level at once is still
/// seen.
pub const OVERLOADED_WAIT: u32 = 4;

/// Why a request was refused without reaching the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ShedReason {
    Forced,
    ShedLevel,
    QueueTimeout,
    QueueFull,
    NoHealthySite,
}

impl ShedReason {
    pub const ALL: [ShedReason; 5] = [
        ShedReason::Forced,
        ShedReason::ShedLevel,
        ShedReason::QueueTimeout,
        ShedReason::QueueFull,
        ShedReason::NoHealthySite,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ShedReason::Forced => "forced",
            ShedReason::ShedLevel => "shed_level",
            ShedReason::QueueTimeout => "queue_timeout",
            ShedReason::QueueFull => "queue_full",
            ShedReason::NoHealthySite => "no_healthy_site",
        }
    }
}

/// What the policy says about one tier, for admission.
#[derive(Debug, Clone, PartialEq)]
pub struct TierRule {
    pub max_wait: Duration,
    /// In (0, 1]; 1 means no cap.
    pub max_share: f64,
    pub never_shed: bool,
    pub force_shed: bool,
}

/// Admission settings of one site, highest tier first.
#[derive(Debug, Clone)]
pub struct Rules {
    pub tiers: Vec<TierRule>,
    pub target_queue_delay: Duration,
    pub max_queue: usize,
    /// `never_shed` tiers wait only a short target while their queue
    /// stands (see [`super::standing`]).
    pub refuse_standing_queue: bool,
    /// How long every grant of those tiers must have waited over the
    /// target before their queue stands (`[shedding] standing_after`).
    pub standing_after: Duration,
}

impl Rules {
    /// The tier whose latency every other tier's cost is measured against
    /// ([`TierCosts`]): the highest `never_shed` one, admitted whenever
    /// anything is; else the highest.
    pub fn reference_tier(&self) -> usize {
        self.tiers.iter().position(|t| t.never_shed).unwrap_or(0)
    }

    /// Tiers the shed level may refuse, lowest first: not `never_shed`, and
    /// not already pinned off by `force_shed` (the level starts at the lowest
    /// tier still admitted).
    fn sheddable(&self) -> Vec<usize> {
        (0..self.tiers.len())
            .rev()
            .filter(|&t| !self.tiers[t].never_shed && !self.tiers[t].force_shed)
            .collect()
    }
}

/// The first answer to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Admit,
    Queue,
    Shed(ShedReason),
}

/// The admission state of one site; `W` is how a waiter is told it got a permit.
#[derive(Debug)]
pub struct Gate<W> {
    rules: Rules,
    /// `shed_rank[t]`: t is shed by level when `shed_rank[t] < level`.
    shed_rank: Vec<u32>,
    /// The sheddable tiers, lowest rank first.
    shed_order: Vec<usize>,
    limit: Limit,
    inflight: u32,
    tier_inflight: Vec<u32>,
    queue: TierQueue<W>,
    shed: ShedLevel,
    /// Whether the `never_shed` tiers' queue stands (their demand stays
    /// above what the backend serves).
    standing: Standing,
    starving: Starving,
    /// The `never_shed` tiers' arrivals the backend served, for the claim.
    served: Served,
    /// Which tiers cost what the reference tier costs: only their latency
    /// tells the limit about the backend's queue ([`super::cost`]).
    costs: TierCosts,
    /// Waiters refused since the last [`Gate::take_shed`]: their tier came
    /// under the shed level while they waited.
    shed_waiters: Vec<(W, ShedReason)>,
    /// When the shed level last rose, until every waiter queued before
    /// then is a target old: see [`Gate::shed_pre_rise_waiters`].
    rose_at: Option<Instant>,
    /// Arrivals per tier against completions ([`super::demand`]).
    demand: Demand,
    /// Draws which requests of a partly shed tier are refused.
    rng: fastrand::Rng,
}

impl<W> Gate<W> {
    pub fn new(rules: Rules, limit: Limit, now: Instant) -> Gate<W> {
        let n = rules.tiers.len();
        let sheddable = rules.sheddable();
        let mut g = Gate {
            shed_rank: Vec::new(),
            shed_order: Vec::new(),
            limit,
            inflight: 0,
            tier_inflight: vec![0; n],
            queue: TierQueue::new(n),
            shed: ShedLevel::new(rules.target_queue_delay, sheddable.len() as u32, now),
            standing: Standing::default(),
            starving: Starving::default(),
            served: Served::default(),
            costs: TierCosts::new(n, rules.reference_tier()),
            shed_waiters: Vec::new(),
            rose_at: None,
            demand: Demand::new(n, now),
            rng: fastrand::Rng::with_seed(0x6b32),
            rules,
        };
        g.rank(sheddable);
        g
    }

    fn rank(&mut self, sheddable: Vec<usize>) {
        self.shed_rank = vec![u32::MAX; self.rules.tiers.len()];
        for (rank, &t) in sheddable.iter().enumerate() {
            self.shed_rank[t] = rank as u32;
        }
        self.shed_order = sheddable;
    }

    /// New settings from a reload; the learned limit, in-flight counts and
    /// waiters are kept.
    pub fn reconfigure(&mut self, rules: Rules, limit: &Limit) {
        let n = rules.tiers.len();
        self.tier_inflight.resize(n, 0);
        self.queue.resize(n);
        self.demand.resize(n);
        self.costs.reconfigure(n, rules.reference_tier());
        self.limit.reconfigure(limit);
        let sheddable = rules.sheddable();
        self.shed
            .reconfigure(rules.target_queue_delay, sheddable.len() as u32);
        self.rules = rules;
        self.rank(sheddable);
        self.shed_covered_waiters();
    }

    /// The uncongested latency the limit learned, if adaptive.
    pub fn baseline(&self) -> Option<Duration> {
        self.limit.baseline()
    }

    /// What each tier costs the backend against the reference tier, where
    /// known ([`super::cost`]).
    pub fn tier_costs(&self) -> Vec<super::cost::KnownCost> {
        self.costs.known()
    }

    /// What the limit learned of the backend, if adaptive.
    pub fn learnt(&self) -> Option<super::limit::Learnt> {
        self.limit.learnt()
    }

    pub fn limit(&self) -> u32 {
        self.limit.current()
    }

    /// Starts the limit at `limit` (see [`Limit::resume`]).
    pub fn resume(&mut self, limit: u32) {
        self.limit.resume(limit);
    }

    /// What the limit knows of the backend that a restart may keep (see
    /// [`Limit::kept`]).
    pub fn kept(&self) -> Option<super::limit::Kept> {
        self.limit.kept()
    }

    /// Takes over what a process before this one learnt (see
    /// [`Limit::resume_learnt`]).
    pub fn resume_learnt(&mut self, kept: super::limit::Kept) {
        self.limit.resume_learnt(kept);
    }

    /// Whether the limit is adaptive (what [`Gate::resume`] acts on).
    pub fn is_adaptive(&self) -> bool {
        self.limit.is_adaptive()
    }

    pub fn inflight(&self) -> u32 {
        self.inflight
    }

    pub fn tier_inflight(&self, tier: usize) -> u32 {
        self.tier_inflight.get(tier).copied().unwrap_or(0)
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The shed level in tiers (fractional: see [`super::shed_level`]).
    pub fn shed_level(&self) -> f64 {
        self.shed.level()
    }

    fn coverage(&self, tier: usize) -> Coverage {
        match self.shed_rank[tier] {
            u32::MAX => Coverage::None,
            rank => self.shed.coverage(rank),
        }
    }

    /// Max in flight for `tier` while others want the room.
    fn cap(&self, tier: usize) -> u32 {
        let share = self.rules.tiers[tier].max_share;
        if share >= 1.0 {
            return u32::MAX;
        }
        ((f64::from(self.limit.current()) * share).ceil() as u32).max(1)
    }

    /// Whether one more request of `tier` fits in flight. A `never_shed`
    /// tier may use the whole limit, and [`Gate::overdraft`] past it; the
    /// others leave [`Gate::headroom`] slots free, so a purchase arriving at
    /// a saturated backend finds a slot at once instead of waiting in our
    /// queue for the next completion.
    fn fits(&self, tier: usize, now: Instant) -> bool {
        let limit = self.limit.current();
        if !self.rules.tiers[tier].never_shed {
            return self.inflight < limit.saturating_sub(self.headroom()).max(1);
        }
        // The overdraft is weighed only once the limit is full: most
        // purchases find room under it, and this runs for each of them.
        self.inflight < limit || self.inflight < limit + self.overdraft(now)
    }

    /// Slots kept for the `never_shed` tiers: half the square root of the
    /// limit, rounded (2 of 17). Only under an adaptive limit, which settles
    /// at the backend's knee either way (lower tiers held back show lower
    /// latency, so it grows by the headroom): no goodput is lost while other
    /// traffic fills the backend. A fixed limit is the operator's exact
    /// capacity; slots kept free there would stay idle. Measured in
    /// docs/benchmarks.md, "Tuning the controllers".
    fn headroom(&self) -> u32 {
        if self.limit.is_adaptive() && self.rules.tiers.iter().any(|t| t.never_shed) {
            (f64::from(self.limit.current()).sqrt() / 2.0).round() as u32
        } else {
            0
        }
    }

    /// Slots a `never_shed` tier may take past an adaptive limit (a fixed
    /// one is the operator's exact capacity): see [`super::overdraft`].
    fn overdraft(&self, now: Instant) -> u32 {
        if !self.limit.is_adaptive() {
            return 0;
        }
        overdraft::slots(overdraft::Seen {
            limit: self.limit.current(),
            min: self.limit.min(),
            over_ceiling: self.limit.over_ceiling(),
            waited_over_target: self.standing.over_target_for(now),
        })
    }

    fn eligible(&self, tier: usize) -> bool {
        self.tier_inflight[tier] < self.cap(tier) || !self.queue.others_waiting(tier)
    }

    /// Advances the shed level to `now`. When it rises, the waiters it now
    /// covers are refused (collected for [`Gate::take_shed`]): all of a
    /// wholly covered tier, as a new arrival of it would be, and the standing
    /// backlog (older than the target delay) of a partly covered one; the
    /// rest of that tier's waiters once they are that old.
    fn tick(&mut self, now: Instant) {
        self.note_use();
        // While the limit slow-starts, a wait is the limit catching up (a
        // peak begins, or a cold start), not the backend's capacity: shedding
        // for it refused lower tiers at half capacity.
        // So is a wait while a probe holds the limit under its use.
        let standing = if self.queue.is_empty() {
            Duration::ZERO
        } else {
            self.shed.note_busy();
            self.queue.purge_expired(now);
            let counts = self.limit.waits_count();
            self.queue
                .oldest()
                .map_or(Duration::ZERO, |at| counts.of(now, now.duration_since(at)))
        };
        // At an overload's onset, the backlog of the tiers the demand
        // calls excess is refused once it is three targets old
        // ([`super::demand`]), not as the level's climb reaches each tier.
        if standing > self.rules.target_queue_delay * URGENT && self.shed.in_onset(now) {
            if let Some(steps) = self.demand_floor(now) {
                self.refuse_excess_backlog(now, steps);
            }
        }
        if self.shed.tick(now, standing) {
            self.shed_covered_waiters();
            self.rose_at = Some(now);
        }
        if let Some(at) = self.rose_at {
            self.shed_pre_rise_waiters(at, now);
        }
        self.refuse_overloaded_waiters(now);
    }

    /// The longest a sheddable tier's waiter may wait now: [`OVERLOADED_WAIT`]
    /// targets while the shed level is above zero, else its own
    /// `max_queue_wait` (`None`).
    fn overloaded_wait(&self) -> Option<Duration> {
        (self.shed.level() > 0.0).then(|| self.rules.target_queue_delay * OVERLOADED_WAIT)
    }

    /// Refuses (`queue_timeout`) the waiters of sheddable tiers older than
    /// [`Gate::overloaded_wait`]: queued before the level rose, they had
    /// their tier's whole `max_queue_wait`. The level counts their waits as
    /// it counts a timeout's.
    fn refuse_overloaded_waiters(&mut self, now: Instant) {
        if self.queue.is_empty() {
            return;
        }
        if let Some(most) = self.overloaded_wait() {
            let every = self.shed_order.len();
            self.refuse_older_than(now, most, every, ShedReason::QueueTimeout);
        }
    }

    /// Refuses the waiters three targets old of every tier the level
    /// `steps` would cover, whole or in part; the level counts their waits
    /// as it counts a timeout's.
    fn refuse_excess_backlog(&mut self, now: Instant, steps: u32) {
        let old = self.rules.target_queue_delay * URGENT;
        let ranks = steps.div_ceil(STEPS) as usize;
        self.refuse_older_than(now, old, ranks, ShedReason::ShedLevel);
    }

    /// Refuses (`reason`) the waiters older than `old` of the `ranks`
    /// lowest sheddable tiers; the level counts each wait as `old`, as it
    /// counts a timeout's.
    fn refuse_older_than(&mut self, now: Instant, old: Duration, ranks: usize, reason: ShedReason) {
        let Some(cutoff) = now.checked_sub(old) else {
            return;
        };
        let before = self.shed_waiters.len();
        for rank in 0..ranks.min(self.shed_order.len()) {
            self.evict_older_than(self.shed_order[rank], cutoff, reason);
        }
        let counted = self.limit.waits_count().of(now, old);
        for _ in before..self.shed_waiters.len() {
            self.shed.record(now, counted);
        }
    }

    /// The level, in steps, that would refuse the excess of the last
    /// window's arrivals from the lowest tiers up ([`super::demand`]);
    /// only while the backend queues (a fixed limit is its capacity):
    /// under its knee, completions are the limit's pace, not the backend's.
    fn demand_floor(&mut self, now: Instant) -> Option<u32> {
        if self.limit.is_adaptive() && self.limit.over_ceiling().is_none_or(|r| r <= 1.0) {
            return None;
        }
        if self.shed_order.is_empty() {
            return None;
        }
        self.demand.floor(now, &self.shed_order, STEPS)
    }

    /// Refuses the waiters of a partly covered tier that were queued before
    /// the level's last rise (`at`) once they have waited the target, as
    /// one queued after it would be ([`Gate::deadline`]): at the rise
    /// itself, its standing backlog. Those younger than the target then
    /// kept their tier's whole `max_queue_wait` until the thirty-ninth
    /// round: a fresh-clone CI run of the overload test refused admin and
    /// merchant requests after 195-211 ms that way.
    fn shed_pre_rise_waiters(&mut self, at: Instant, now: Instant) {
        let target = self.rules.target_queue_delay;
        let Some(aged) = now.checked_sub(target) else {
            return;
        };
        let cutoff = aged.min(at);
        for t in 0..self.rules.tiers.len() {
            if let Coverage::Part(_) = self.coverage(t) {
                if !self.rules.tiers[t].force_shed {
                    self.evict_older_than(t, cutoff, ShedReason::ShedLevel);
                }
            }
        }
        if aged >= at {
            self.rose_at = None;
        }
    }

    /// Refuses every waiter of a tier pinned off or wholly covered (a
    /// partly covered one's: [`Gate::shed_pre_rise_waiters`]).
    fn shed_covered_waiters(&mut self) {
        for t in 0..self.rules.tiers.len() {
            if !self.rules.tiers[t].force_shed && self.coverage(t) != Coverage::Whole {
                continue;
            }
            while let Some(w) = self.queue.evict_newest(t) {
                self.shed_waiters.push((w.handle, ShedReason::ShedLevel));
            }
        }
    }

    fn evict_older_than(&mut self, tier: usize, cutoff: Instant, reason: ShedReason) {
        let mut out = Vec::new();
        self.queue.evict_older_than(tier, cutoff, &mut out);
        self.shed_waiters
            .extend(out.into_iter().map(|w| (w, reason)));
    }

    /// Waiters refused while they waited since the last call, and why: the
    /// shed level came to cover their tier (`shed_level`), or their
    /// `never_shed` tier's queue came to stand (`queue_timeout`).
    pub fn take_shed(&mut self) -> Vec<(W, ShedReason)> {
        std::mem::take(&mut self.shed_waiters)
    }

    /// Whether [`Gate::take_shed`] has anything to hand over.
    pub fn has_shed(&self) -> bool {
        !self.shed_waiters.is_empty()
    }

    /// Whether `tier` is refused before it may even wait.
    pub fn refused(&mut self, tier: usize, now: Instant) -> Option<ShedReason> {
        self.tick(now);
        let rule = self.rules.tiers.get(tier)?;
        if rule.force_shed {
            return Some(ShedReason::Forced);
        }
        // The never_shed tiers alone exceed capacity: everything else is
        // excess too (the shed level, seeing their short waits, would
        // otherwise re-admit lower tiers into capacity they need).
        if !rule.never_shed && self.rules.refuse_standing_queue && self.standing.active(now) {
            return Some(ShedReason::ShedLevel);
        }
        let shed = match self.coverage(tier) {
            Coverage::None => false,
            Coverage::Whole => true,
            Coverage::Part(share) => self.rng.f64() < share,
        };
        shed.then_some(ShedReason::ShedLevel)
    }

    /// The first answer for a request of `tier` arriving at `now`; `Admit`
    /// counts it in flight.
    pub fn try_admit(&mut self, tier: usize, now: Instant) -> Decision {
        if tier >= self.rules.tiers.len() {
            return Decision::Shed(ShedReason::Forced);
        }
        if self.rules.tiers[tier].never_shed {
            self.limit.note_reserved(now);
            self.served.arrived(now);
        }
        self.demand.arrived(tier, now);
        if let Some(reason) = self.refused(tier, now) {
            return Decision::Shed(reason);
        }
        if self.fits(tier, now) && self.queue.tier_len(tier) == 0 && self.eligible(tier) {
            self.count_in(tier);
            self.note_grant(tier, now, Duration::ZERO);
            // `refused` just ticked to `now`: a second tick would find
            // nothing to do.
            self.shed.record(now, Duration::ZERO);
            return Decision::Admit;
        }
        self.shed.note_busy();
        Decision::Queue
    }

    /// The deadline of a request of `tier` queued at `now`: its tier's
    /// `max_queue_wait`, but at most the target delay while the shed level
    /// covers part of its tier. A partly shed tier's requests that cannot get
    /// in within the target are its excess: a 503 after 20 ms serves the
    /// client better than one after its full wait.
    ///
    /// A `never_shed` tier waits at most [`Gate::standing_target`] while its
    /// queue stands: its demand exceeds the backend's capacity, and what
    /// cannot get in that fast is the excess.
    pub fn deadline(&self, tier: usize, now: Instant) -> Instant {
        let rule = &self.rules.tiers[tier];
        let mut wait = rule.max_wait;
        if let Coverage::Part(_) = self.coverage(tier) {
            wait = wait.min(self.rules.target_queue_delay);
        }
        if let Some(most) = self.overloaded_wait().filter(|_| !rule.never_shed) {
            wait = wait.min(most);
        }
        if rule.never_shed && self.rules.refuse_standing_queue && self.standing.active(now) {
            wait = wait.min(self.standing_target());
        }
        now + wait
    }

    /// The wait a `never_shed` request may have while its tiers' queue
    /// stands: the target queue delay, but at most two of the backend's
    /// uncongested latencies (a purchase served then takes at most three),
    /// and at least a millisecond.
    fn standing_target(&self) -> Duration {
        let target = self.rules.target_queue_delay;
        match self.limit.baseline() {
            Some(b) => target.min(2 * b).max(Duration::from_millis(1)),
            None => target,
        }
    }

    /// A request of `tier` got a permit after waiting `waited`.
    fn note_grant(&mut self, tier: usize, now: Instant, waited: Duration) {
        // Off (the default), only whether they wait: a starved instance
        // claims a share (`Gate::urgency`).
        if !self.rules.tiers[tier].never_shed {
            return;
        }
        if waited.is_zero() {
            // Admitted at once, as most are: a wait of nothing, whatever
            // counts of it, only ends a run of waits over the target.
            self.standing.on_prompt_grant();
            return;
        }
        // Only while every other tier is refused: until then the backend's
        // capacity is not all theirs, and their wait is the lower tiers'
        // share still draining.
        let all_shed = (0..self.rules.tiers.len()).all(|t| {
            self.rules.tiers[t].never_shed
                || self.rules.tiers[t].force_shed
                || self.coverage(t) == Coverage::Whole
        });
        // Nor while the limit catches up: as for the shed level
        // (`Gate::tick`), not while it slow-starts or a probe holds it under
        // its use. That wait is the limit's, not the backend's capacity: a
        // cold start on 64 workers × 50 ms, its slow start ended under the
        // knee by its first window, stood its purchases at 0.6x capacity
        // and refused a third of them (scenario 28). The queue's length
        // tells a backlog that drains from a standing one
        // (`Standing::on_grant`). (Nor, until the twenty-second round,
        // before a cold start's early probe had measured: 48 seeds of every
        // scenario with the setting on gave the same without that rule,
        // docs/admission.md.)
        let waited = if all_shed {
            self.limit.waits_count().of(now, waited)
        } else {
            Duration::ZERO
        };
        let target = self.standing_target();
        let was = self.standing.active(now);
        let queued = (0..self.rules.tiers.len())
            .filter(|t| self.rules.tiers[*t].never_shed)
            .map(|t| self.queue.tier_len(t))
            .sum();
        let onset = self.rules.standing_after;
        self.standing.on_grant(now, waited, target, queued, onset);
        if was || !self.standing.active(now) || !self.rules.refuse_standing_queue {
            return;
        }
        // The backlog it stood on: refused now, as a newcomer would be
        // after the target.
        let Some(cutoff) = now.checked_sub(target) else {
            return;
        };
        for t in 0..self.rules.tiers.len() {
            if self.rules.tiers[t].never_shed {
                self.evict_older_than(t, cutoff, ShedReason::QueueTimeout);
            }
        }
    }

    /// Whether the `never_shed` tiers' queue stands (see [`super::standing`]).
    pub fn standing(&self, now: Instant) -> bool {
        self.rules.refuse_standing_queue && self.standing.active(now)
    }

    /// Queues a request after `try_admit` said `Queue`. A full queue gives up
    /// its lowest, newest waiter for a higher-tier newcomer (returned, to be
    /// told `queue_full`), or refuses the newcomer.
    pub fn enqueue(
        &mut self,
        tier: usize,
        now: Instant,
        handle: W,
    ) -> Result<(Instant, Option<W>), ShedReason> {
        self.queue.purge_expired(now);
        let mut evicted = None;
        if self.queue.len() >= self.rules.max_queue {
            match self.queue.lowest_waiting() {
                Some(lowest) if lowest > tier => {
                    evicted = self.queue.evict_newest(lowest).map(|w| w.handle);
                }
                _ => return Err(ShedReason::QueueFull),
            }
        }
        let deadline = self.deadline(tier, now);
        self.queue.push(
            tier,
            Waiter {
                handle,
                enqueued: now,
                deadline,
            },
        );
        Ok((deadline, evicted))
    }

    /// How pressed the `never_shed` tiers are, for the limit's claim: with
    /// `refuse_standing_queue`, whether they wait or their queue stands;
    /// without it, how long they have starved at `min` (see
    /// [`super::starving`]).
    fn urgency(&mut self, now: Instant) -> Urgency {
        if self.rules.refuse_standing_queue {
            return if self.standing.active(now) {
                Urgency::Standing
            } else if self.standing.pressing(now) {
                Urgency::Pressing
            } else {
                Urgency::Calm
            };
        }
        let seen = Seen {
            waiting: self.standing.waiting(now),
            limit: self.limit.current(),
            min: self.limit.min(),
            over_ceiling: self.limit.over_ceiling(),
            collapse: self.limit.collapse_ratio(),
            waited_over_target: self.standing.over_target_for(now),
            served: self.served.share(now),
        };
        self.starving.claim(now, seen)
    }

    /// A permit of `tier` came back; `sample` is what the backend showed.
    pub fn release(&mut self, tier: usize, now: Instant, sample: Sample) {
        self.inflight = self.inflight.saturating_sub(1);
        if let Some(n) = self.tier_inflight.get_mut(tier) {
            *n = n.saturating_sub(1);
        }
        self.demand.done(now);
        if self.rules.tiers.get(tier).is_some_and(|t| t.never_shed) {
            self.served.done(now);
        }
        let urgency = self.urgency(now);
        self.limit.set_urgency(urgency);
        let sample = self.costs.read(tier, sample);
        self.limit.on_sample(now, sample, self.inflight + 1);
        self.tick(now);
    }

    /// Hands the next permit to the highest eligible live waiter, counting it
    /// in flight; `None` when the limit is reached or nobody eligible waits.
    /// If the waiter cannot be told, give the permit back with [`Gate::ungrant`].
    pub fn grant_next(&mut self, now: Instant) -> Option<(usize, W)> {
        // Checked on every release: nobody waiting is the common case.
        if self.queue.is_empty() {
            return None;
        }
        let limit = self.limit.current();
        if self.inflight >= limit && self.inflight >= limit + self.overdraft(now) {
            return None;
        }
        self.queue.purge_expired(now);
        let caps: Vec<bool> = (0..self.rules.tiers.len())
            .map(|t| self.fits(t, now) && self.eligible(t))
            .collect();
        let (tier, w) = self.queue.pop_highest(now, |t| caps[t])?;
        self.count_in(tier);
        let waited = now.duration_since(w.enqueued);
        self.note_grant(tier, now, waited);
        self.record_wait(now, waited);
        Some((tier, w.handle))
    }

    /// Undoes a grant whose waiter was gone.
    pub fn ungrant(&mut self, tier: usize) {
        self.inflight = self.inflight.saturating_sub(1);
        if let Some(n) = self.tier_inflight.get_mut(tier) {
            *n = n.saturating_sub(1);
        }
    }

    /// A waiter of `tier` gave up at its deadline after waiting `waited`.
    pub fn note_timeout(&mut self, tier: usize, now: Instant, waited: Duration) {
        if self.rules.tiers.get(tier).is_some_and(|t| t.never_shed) {
            self.standing.on_timeout(now);
        }
        self.record_wait(now, waited);
    }

    fn record_wait(&mut self, now: Instant, waited: Duration) {
        self.tick(now);
        let waited = self.limit.waits_count().of(now, waited);
        self.shed.record(now, waited);
    }

    fn count_in(&mut self, tier: usize) {
        self.inflight += 1;
        self.tier_inflight[tier] += 1;
        self.note_use();
    }

    /// Tells the shed level when the limit is close to full (more than
    /// three quarters in use): a window without that, and without anyone
    /// queued, is spare (see [`super::shed_level`]).
    fn note_use(&mut self) {
        if self.inflight * 4 > self.limit.current() * 3 {
            self.shed.note_busy();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// An adaptive limit whose probe grid runs through `now` (not the wall
    /// clock's), so its first probe is due 5 s after `now`.
    fn adaptive(bounds: super::super::limit::Bounds, now: Instant) -> Limit {
        Limit::adaptive(bounds, now).on_grid(now)
    }

    const MS: Duration = Duration::from_millis(1);

    fn rules(max_queue: usize) -> Rules {
        let tier = |wait: u32, share: f64, never: bool| TierRule {
            max_wait: wait * MS,
            max_share: share,
            never_shed: never,
            force_shed: false,
        };
        Rules {
            // purchase, merchant, customer_service
            tiers: vec![
                tier(2000, 1.0, true),
                tier(500, 1.0, false),
                tier(100, 0.5, false),
            ],
            target_queue_delay: 20 * MS,
            max_queue,
            refuse_standing_queue: false,
            standing_after: crate::admission::standing::INTERVAL,
        }
    }

    fn gate(limit: u32, max_queue: usize) -> (Gate<u32>, Instant) {
        let now = Instant::now();
        (Gate::new(rules(max_queue), Limit::fixed(limit), now), now)
    }

    #[test]
    fn admits_up_to_the_limit_then_queues() {
        let (mut g, now) = gate(2, 10);
        assert_eq!(g.try_admit(0, now), Decision::Admit);
        assert_eq!(g.try_admit(1, now), Decision::Admit);
        assert_eq!(g.try_admit(0, now), Decision::Queue);
        assert_eq!(g.inflight(), 2);
    }

    #[test]
    fn the_claim_counts_what_the_backend_served_of_the_never_shed_tiers_alone() {
        let (mut g, now) = gate(100, 10);
        // Twenty purchases in, ten back; merchants come and go uncounted.
        for _ in 0..20 {
            assert_eq!(g.try_admit(0, now), Decision::Admit);
            assert_eq!(g.try_admit(1, now), Decision::Admit);
        }
        for _ in 0..10 {
            g.release(0, now, Sample::Ignored);
        }
        for _ in 0..20 {
            g.release(1, now, Sample::Ignored);
        }
        assert_eq!(g.served.share(now), Some(0.5));
    }

    /// An adaptive limit starting at 16, at least 4.
    fn bounds_16() -> super::super::limit::Bounds {
        super::super::limit::Bounds {
            initial: 16,
            min: 4,
            max: 100,
        }
    }

    /// An adaptive limit of 16 with the 14 merchants it admits in flight.
    fn adaptive_16_full_of_merchants() -> (Gate<u32>, Instant) {
        let now = Instant::now();
        let mut g: Gate<u32> = Gate::new(rules(10), adaptive(bounds_16(), now), now);
        for _ in 0..14 {
            assert_eq!(g.try_admit(1, now), Decision::Admit);
        }
        (g, now)
    }

    #[test]
    fn an_adaptive_limit_keeps_headroom_for_the_never_shed_tier() {
        let (mut g, now) = adaptive_16_full_of_merchants();
        // Merchants stop 2 short of 16 (√16 / 2)…
        assert_eq!(g.try_admit(1, now), Decision::Queue);
        g.enqueue(1, now, 10).unwrap();
        // …and a purchase still gets in at once, up to the limit and past
        // it by its square root (the overdraft).
        for _ in 0..6 {
            assert_eq!(g.try_admit(0, now), Decision::Admit);
        }
        assert_eq!(g.try_admit(0, now), Decision::Queue);
        // A freed slot goes to the waiting merchant only below the headroom.
        for _ in 0..6 {
            g.release(0, now, Sample::Ignored);
            assert_eq!(g.grant_next(now), None, "14 in flight or more");
        }
        g.release(1, now, Sample::Ignored);
        assert_eq!(g.grant_next(now), Some((1, 10)));
        assert_eq!(g.inflight(), 14);
    }

    #[test]
    fn a_waiting_purchase_goes_past_an_adaptive_limit_but_not_a_fixed_one() {
        let (mut g, now) = adaptive_16_full_of_merchants();
        for _ in 0..6 {
            assert_eq!(g.try_admit(0, now), Decision::Admit);
        }
        assert_eq!(g.inflight(), 20, "16 and √16 past it");
        assert_eq!(g.try_admit(0, now), Decision::Queue);
        g.enqueue(0, now, 7).unwrap();
        // A merchant's slot comes back: the waiting purchase takes it,
        // still past the limit.
        g.release(1, now, Sample::Ignored);
        assert_eq!(g.grant_next(now), Some((0, 7)));
        assert_eq!(g.inflight(), 20);
        // A fixed limit is the operator's exact capacity: nothing past it.
        let (mut fixed, now) = gate(16, 10);
        for _ in 0..16 {
            assert_eq!(fixed.try_admit(0, now), Decision::Admit);
        }
        assert_eq!(fixed.try_admit(0, now), Decision::Queue);
    }

    /// Purchases alone through an adaptive limit of 16 (no slow start,
    /// every other tier forced off) for `secs`: each 10 ms one completes,
    /// the oldest of three waiting purchases (30 ms in our queue, over the
    /// 20 ms target) takes its slot if it may, and a new one queues. With
    /// `break_at`, the queue runs short at that step, so that a few grants
    /// wait 20 ms or less, before it fills again. Returns how many are in
    /// flight after a last completion and grant.
    fn purchases_waiting_through_an_overdraft(secs: u32, break_at: Option<u32>) -> u32 {
        let now = Instant::now();
        let mut r = rules(100);
        r.tiers[1].force_shed = true;
        r.tiers[2].force_shed = true;
        let mut limit = adaptive(bounds_16(), now);
        limit.resume(16);
        let mut g: Gate<u32> = Gate::new(r, limit, now);
        while g.try_admit(0, now) == Decision::Admit {}
        assert_eq!(g.inflight(), 20, "16 and √16 past it");
        for i in 0..3 {
            g.enqueue(0, now, i).unwrap();
        }
        let arrivals = |i: u32| match break_at.map(|k| i.checked_sub(k)) {
            Some(Some(0 | 1)) => 0,
            Some(Some(3 | 4)) => 2,
            _ => 1,
        };
        for i in 1..=secs * 100 {
            let t = now + i * 10 * MS;
            g.release(0, t, Sample::Ignored);
            g.grant_next(t);
            for _ in 0..arrivals(i) {
                g.enqueue(0, t, 100 + i).unwrap();
            }
        }
        let end = now + (secs * 100 + 1) * 10 * MS;
        g.release(0, end, Sample::Ignored);
        g.grant_next(end);
        g.inflight()
    }

    #[test]
    fn purchases_waiting_over_the_target_for_3_s_with_all_else_shed_lose_the_overdraft() {
        // Two seconds in, the waiting purchase still takes the slot past
        // the limit…
        assert_eq!(purchases_waiting_through_an_overdraft(2, None), 20);
        // …four seconds in, their demand is over capacity: nothing past
        // it, and the purchases in flight fall back to the limit.
        assert_eq!(purchases_waiting_through_an_overdraft(4, None), 16);
        // A break in the waits at 2.5 s starts the run again: at 4 s it
        // is 1.5 s long, and the overdraft stays.
        assert_eq!(purchases_waiting_through_an_overdraft(4, Some(250)), 20);
    }

    #[test]
    fn waits_while_the_limit_slow_starts_do_not_raise_the_shed_level() {
        // A cold start: the limit (4) has seen no queueing yet, merchants
        // wait 100 ms (5x the target) for it to grow. That is the limit
        // catching up, not the backend's capacity: nothing is shed…
        let cold = |limit: Limit| {
            let now = Instant::now();
            let mut g: Gate<u32> = Gate::new(rules(100), limit, now);
            // Merchants fill what they may (the adaptive limit keeps a slot
            // for purchases), then wait.
            while g.try_admit(1, now) == Decision::Admit {}
            for i in 0..4 {
                g.enqueue(1, now, i).unwrap();
            }
            g.refused(2, now + 100 * MS);
            g.shed_level()
        };
        let bounds = super::super::limit::Bounds {
            initial: 4,
            min: 4,
            max: 100,
        };
        assert_eq!(cold(adaptive(bounds, Instant::now())), 0.0);
        // …while the same wait under a limit that does not grow is.
        assert!(cold(Limit::fixed(4)) > 0.0);
    }

    #[test]
    fn a_fixed_limit_keeps_no_headroom() {
        let (mut g, now) = gate(16, 10);
        for _ in 0..16 {
            assert_eq!(g.try_admit(1, now), Decision::Admit);
        }
    }

    #[test]
    fn a_released_permit_goes_to_the_highest_waiter() {
        let (mut g, now) = gate(1, 10);
        assert_eq!(g.try_admit(2, now), Decision::Admit);
        g.enqueue(2, now, 20).unwrap();
        g.enqueue(1, now, 10).unwrap();
        g.enqueue(0, now + MS, 1).unwrap();
        g.release(2, now + 2 * MS, Sample::Ignored);
        assert_eq!(g.grant_next(now + 2 * MS), Some((0, 1)));
        assert_eq!(g.grant_next(now + 2 * MS), None, "limit reached again");
        g.release(0, now + 3 * MS, Sample::Ignored);
        assert_eq!(g.grant_next(now + 3 * MS), Some((1, 10)));
    }

    #[test]
    fn shares_bind_only_when_another_tier_wants_the_room() {
        let (mut g, now) = gate(4, 10);
        // customer_service (share 0.5 → 2 of 4) borrows idle capacity…
        for _ in 0..4 {
            assert_eq!(g.try_admit(2, now), Decision::Admit);
        }
        // …but once a purchase waits, released slots go to it, and
        // customer_service cannot climb back above its share.
        assert_eq!(g.try_admit(0, now), Decision::Queue);
        g.enqueue(0, now, 100).unwrap();
        g.enqueue(2, now, 200).unwrap();
        g.release(2, now, Sample::Ignored);
        assert_eq!(g.grant_next(now), Some((0, 100)));
        g.release(2, now, Sample::Ignored);
        g.release(2, now, Sample::Ignored);
        // in flight: 1 customer_service + 1 purchase; cs may have 2.
        assert_eq!(g.grant_next(now), Some((2, 200)));
        assert_eq!(g.tier_inflight(2), 2);
        g.enqueue(0, now, 101).unwrap();
        g.enqueue(2, now, 201).unwrap();
        assert_eq!(g.grant_next(now), Some((0, 101)));
        assert_eq!(g.grant_next(now), None, "limit 4 reached");
        g.release(0, now, Sample::Ignored);
        assert_eq!(
            g.grant_next(now),
            Some((2, 201)),
            "no one else waits: cs borrows"
        );
    }

    /// Purchases alone at twice what a limit of 1 serves (one every 5 ms,
    /// each held 10 ms) for `secs`; returns the gate, the time, and the
    /// waiters refused while they waited.
    fn purchases_at_2x(refuse: bool, secs: u64) -> (Gate<u32>, Instant, Vec<(u32, ShedReason)>) {
        let now = Instant::now();
        let mut r = rules(10_000);
        r.refuse_standing_queue = refuse;
        let mut g: Gate<u32> = Gate::new(r, Limit::fixed(1), now);
        let mut refused = Vec::new();
        for i in 0..(secs * 200) as u32 {
            let t = now + i * 5 * MS;
            if g.try_admit(0, t) == Decision::Queue {
                g.enqueue(0, t, i).unwrap();
            }
            if i % 2 == 1 && g.inflight() > 0 {
                g.release(0, t, Sample::Ignored);
                g.grant_next(t);
            }
            refused.extend(g.take_shed());
        }
        (g, now + Duration::from_secs(secs), refused)
    }

    #[test]
    fn a_standing_queue_of_purchases_waits_only_the_target_when_refused() {
        let (mut g, end, refused) = purchases_at_2x(true, 3);
        assert!(g.standing(end));
        assert_eq!(
            g.deadline(0, end),
            end + 20 * MS,
            "a newcomer waits the target"
        );
        // The backlog it stood on was refused as a timeout, not left to wait 2 s.
        assert!(!refused.is_empty());
        assert!(refused.iter().all(|(_, r)| *r == ShedReason::QueueTimeout));
        // Everything but purchases is excess now.
        assert_eq!(g.try_admit(1, end), Decision::Shed(ShedReason::ShedLevel));
        // Without the setting, purchases wait their full max_queue_wait.
        let (g, end, refused) = purchases_at_2x(false, 3);
        assert_eq!(g.deadline(0, end), end + 2000 * MS);
        assert!(refused.is_empty());
    }

    #[test]
    fn full_queue_evicts_the_lowest_newest_for_a_higher_newcomer() {
        let (mut g, now) = gate(1, 2);
        g.try_admit(0, now);
        g.enqueue(2, now, 1).unwrap();
        g.enqueue(2, now, 2).unwrap();
        assert_eq!(
            g.enqueue(0, now, 3).map(|(_, e)| e),
            Ok(Some(2)),
            "newest customer_service gives way"
        );
        assert_eq!(
            g.enqueue(2, now, 4).map(|(_, e)| e),
            Err(ShedReason::QueueFull),
            "equal or lower newcomer is refused"
        );
        assert_eq!(g.queued(), 2);
    }

    #[test]
    fn expired_waiters_are_not_granted() {
        let (mut g, now) = gate(1, 10);
        g.try_admit(0, now);
        g.enqueue(2, now, 1).unwrap(); // deadline +100 ms
        g.release(0, now + 150 * MS, Sample::Ignored);
        assert_eq!(g.grant_next(now + 150 * MS), None);
        assert_eq!(g.queued(), 0);
    }

    #[test]
    fn forced_and_level_sheds_never_touch_never_shed_tiers() {
        let now = Instant::now();
        let mut r = rules(100);
        r.tiers[1].force_shed = true;
        let mut g: Gate<u32> = Gate::new(r, Limit::fixed(1), now);
        assert_eq!(g.try_admit(1, now), Decision::Shed(ShedReason::Forced));
        assert_eq!(g.try_admit(0, now), Decision::Admit);
        // Long queueing delays (fresh ones: they began after the last level
        // change) push the level to its maximum: 1 tier, customer_service
        // (merchant is forced off already, purchase never shed).
        let mut t = now + Duration::from_secs(10);
        for _ in 0..2000 {
            t += MS;
            g.note_timeout(2, t, 40 * MS);
        }
        assert_eq!(g.shed_level(), 1.0);
        assert_eq!(g.try_admit(2, t), Decision::Shed(ShedReason::ShedLevel));
        assert_eq!(
            g.try_admit(0, t),
            Decision::Queue,
            "purchases only ever wait"
        );
    }

    #[test]
    fn waiters_of_a_tier_the_level_comes_to_cover_are_shed_at_once() {
        let (mut g, start) = gate(1, 100);
        // Let the controller age so that waits of up to 10 s are fresh.
        let now = start + Duration::from_secs(10);
        g.try_admit(0, now);
        g.enqueue(2, now, 20).unwrap();
        g.enqueue(2, now, 21).unwrap();
        g.enqueue(0, now, 1).unwrap();
        // Windows of long (fresh) waits: the level rises to cover customer_service.
        let mut t = now;
        while g.shed_level() < 1.0 {
            t += MS;
            g.note_timeout(2, t, 500 * MS);
            assert!(t < now + Duration::from_secs(1), "the level never rose");
        }
        let mut shed: Vec<u32> = g.take_shed().into_iter().map(|(w, _)| w).collect();
        shed.sort();
        assert_eq!(shed, [20, 21]);
        assert_eq!(g.queued(), 1, "the purchase still waits");
        assert!(g.take_shed().is_empty());
    }

    /// A gate at a fixed limit of 8 whose level came to cover customer
    /// service, then `held` purchases kept in flight while one purchase a
    /// millisecond comes and goes for 150 ms (three calm windows). Returns
    /// the level before and after.
    fn level_after_calm_with(held: u32) -> (f64, f64) {
        let (mut g, start) = gate(8, 100);
        let now = start + Duration::from_secs(10);
        for _ in 0..8 {
            assert_eq!(g.try_admit(0, now), Decision::Admit);
        }
        g.enqueue(2, now, 20).unwrap();
        let mut t = now;
        while g.shed_level() < 1.0 {
            t += MS;
            g.note_timeout(2, t, 500 * MS);
        }
        g.take_shed();
        for _ in held..8 {
            g.release(0, t, Sample::Ignored);
        }
        let before = g.shed_level();
        let end = t + 150 * MS;
        while t < end {
            t += MS;
            assert_eq!(g.try_admit(0, t), Decision::Admit);
            g.release(0, t, Sample::Ignored);
        }
        (before, g.shed_level())
    }

    #[test]
    fn the_level_falls_at_once_when_the_limit_has_room_to_spare() {
        let (before, busy) = level_after_calm_with(6);
        assert_eq!(busy, before, "7 of 8 in flight: the calm period holds");
        let (before, idle) = level_after_calm_with(1);
        assert!(
            idle < before,
            "2 of 8 in flight: spare windows re-admit ({before} -> {idle})"
        );
    }

    /// Runs a gate at a fixed limit of 2 in front of a backend of 10 ms,
    /// one arrival a millisecond (5x; per 5 ms a purchase, two merchants,
    /// two customer service), for 90 ms. Returns, for each merchant that
    /// queued in the first 20 ms and was not served, how old it was when
    /// refused (`None`: it still waits).
    fn merchants_refused_at_an_onset() -> Vec<Option<Duration>> {
        let (mut g, start) = gate(2, 1000);
        let start = start + Duration::from_secs(10);
        let mut busy: Vec<Instant> = Vec::new();
        // Per arrival: queued merchant of the first 20 ms, and its fate.
        let mut fate: HashMap<u32, Option<Duration>> = HashMap::new();
        for i in 0..90u32 {
            let now = start + i * MS;
            while let Some(k) = busy.iter().position(|&end| end <= now) {
                busy.swap_remove(k);
                g.release(0, now, Sample::Latency(10 * MS));
                if let Some((_, served)) = g.grant_next(now) {
                    fate.remove(&served);
                    busy.push(now + 10 * MS);
                }
            }
            let tier = [0, 1, 2, 1, 2][(i % 5) as usize];
            match g.try_admit(tier, now) {
                Decision::Admit => busy.push(now + 10 * MS),
                Decision::Queue => {
                    g.enqueue(tier, now, i).unwrap();
                    if tier == 1 && i < 20 {
                        fate.insert(i, None);
                    }
                }
                Decision::Shed(_) => {}
            }
            for (arrived, _) in g.take_shed() {
                if let Some(f) = fate.get_mut(&arrived) {
                    *f = Some(now - (start + arrived * MS));
                }
            }
        }
        fate.into_values().collect()
    }

    #[test]
    fn at_an_onset_the_backlog_the_demand_calls_excess_is_refused_at_three_targets() {
        // Four fifths of the arrivals are excess: both lower tiers. The
        // merchants queued first are refused as soon as they are three
        // targets (60 ms) old. Left to the level's climb (five steps by
        // 90 ms, part of customer service), they kept their 500 ms.
        let refused = merchants_refused_at_an_onset();
        assert!(refused.len() >= 5, "{refused:?}");
        for age in refused {
            let age = age.expect("a merchant of the first 20 ms still waits at 90 ms");
            assert!(age <= 62 * MS, "{age:?}");
        }
    }

    #[test]
    fn a_waiter_queued_before_its_tier_is_partly_covered_waits_the_target_at_most() {
        let tier = |wait: u32, never: bool| TierRule {
            max_wait: wait * MS,
            max_share: 1.0,
            never_shed: never,
            force_shed: false,
        };
        let rules = Rules {
            // purchase, admin: admin is the first tier the level covers.
            tiers: vec![tier(2000, true), tier(200, false)],
            ..rules(100)
        };
        let start = Instant::now();
        let mut g = Gate::new(rules, Limit::fixed(1), start);
        let t0 = start + Duration::from_secs(10);
        assert_eq!(g.try_admit(0, t0), Decision::Admit);
        // A purchase waits; an admin request joins it 50 ms later.
        g.enqueue(0, t0, 1).unwrap();
        g.enqueue(1, t0 + 50 * MS, 2).unwrap();
        // The purchase's wait stands over 3 targets: the level rises at
        // once to cover part of admin. The admin request is 11 ms old,
        // under the target, and is not refused then.
        g.refused(0, t0 + 61 * MS);
        assert!(
            g.shed_level() > 0.0 && g.shed_level() < 1.0,
            "{}",
            g.shed_level()
        );
        assert!(g.take_shed().is_empty());
        // Once it has waited the target, it is the tier's excess.
        g.refused(0, t0 + 69 * MS);
        assert!(g.take_shed().is_empty(), "19 ms");
        g.refused(0, t0 + 71 * MS);
        let shed: Vec<u32> = g.take_shed().into_iter().map(|(w, _)| w).collect();
        assert_eq!(shed, [2], "21 ms: refused, not kept for its 200 ms");
        assert_eq!(g.queued(), 1, "the purchase still waits");
    }

    #[test]
    fn while_the_level_is_up_a_sheddable_waiter_waits_four_targets_at_most() {
        let start = Instant::now();
        // purchase, merchant (500 ms), customer service; room for one.
        let mut g = Gate::new(rules(100), Limit::fixed(1), start);
        let t0 = start + Duration::from_secs(10);
        assert_eq!(g.try_admit(0, t0), Decision::Admit);
        let (deadline, _) = g.enqueue(1, t0, 1).unwrap();
        assert_eq!(deadline, t0 + 500 * MS, "level at zero: its own wait");
        // Its wait stands over 3 targets: the level rises at once, over
        // part of customer service; merchants are not covered.
        g.refused(0, t0 + 61 * MS);
        assert!(g.shed_level() > 0.0 && g.shed_level() < 2.0);
        assert!(g.take_shed().is_empty());
        // A merchant queued now may wait 4 targets, not 500 ms.
        let (deadline, _) = g.enqueue(1, t0 + 61 * MS, 2).unwrap();
        assert_eq!(deadline, t0 + 141 * MS);
        // And the one queued before the rise is refused at 4 targets old.
        g.refused(0, t0 + 79 * MS);
        assert!(g.take_shed().is_empty(), "79 ms");
        g.refused(0, t0 + 81 * MS);
        assert_eq!(g.take_shed(), [(1, ShedReason::QueueTimeout)], "81 ms");
        // A purchase is never refused that way: 219 ms old, it still waits.
        g.enqueue(0, t0 + 81 * MS, 3).unwrap();
        g.refused(0, t0 + 300 * MS);
        assert!(g.take_shed().is_empty());
        assert!(g.shed_level() > 0.0);
        assert_eq!(g.queued(), 1, "the purchase; the second merchant expired");
    }

    #[test]
    fn reconfigure_keeps_inflight_and_waiters() {
        let (mut g, now) = gate(1, 10);
        g.try_admit(0, now);
        g.enqueue(1, now, 7).unwrap();
        let mut r = rules(10);
        r.tiers[1].max_wait = 900 * MS;
        g.reconfigure(r, &Limit::fixed(2));
        assert_eq!((g.inflight(), g.queued(), g.limit()), (1, 1, 2));
        assert_eq!(g.grant_next(now), Some((1, 7)));
    }

    #[test]
    fn the_limit_reads_the_purchases_not_a_costly_tiers_latency() {
        // Purchases (the reference tier) at 10 ms, customer service at
        // 80 ms, no queueing: a window that holds both must read as the
        // purchases' 10 ms once customer service is known to cost 8×.
        // Read raw, the windows' mean (about 45 ms here) is a queue.
        let now = Instant::now();
        let bounds = super::super::limit::Bounds {
            initial: 8,
            min: 1,
            max: 100,
        };
        let mut g: Gate<u32> = Gate::new(rules(0), adaptive(bounds, now), now);
        assert_eq!(g.rules.reference_tier(), 0);
        let mut t = now;
        for _ in 0..400 {
            t += MS;
            for tier in [0, 2] {
                assert_eq!(g.try_admit(tier, t), Decision::Admit);
                let ms = if tier == 0 { 10 } else { 80 };
                g.release(tier, t, Sample::Latency(ms * MS));
            }
        }
        assert!(g.costs.costs_differently(2));
        let learnt = g.learnt().unwrap();
        assert_eq!(learnt.latency, Some(10 * MS), "{learnt:?}");
        assert_eq!(learnt.baseline, Some(10 * MS), "{learnt:?}");
    }
}
