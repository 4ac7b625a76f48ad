//! A backend cluster across its sites: which site serves, which backend in
//! it, and what the health of each backend is. All decisions take `now`.
//!
//! Site choice, active-passive: sites are tried primary first, then
//! secondaries, each in file order; the first enabled site with a backend up
//! serves. While no backend anywhere has been checked yet (start-up), the
//! first enabled site with a usable backend serves. Failback is the same
//! rule: the primary serves again once a backend of it is up, which takes
//! `rise` good checks in a row (hysteresis; no flapping on one good probe).
//! Active-active: enabled sites with a backend up share requests by weight.
//!
//! Panic mode (as Envoy's panic threshold): when no enabled site has a usable
//! backend, health is ignored and the enabled sites' backends are tried
//! anyway — checks can be wrong, and a refused connect costs milliseconds.
//! Only drained sites and backends are never used.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::health::{Active, Health, Outlier, Thresholds};

/// Sites or backends picked on the request path: a few, kept on the stack.
type Picks = smallvec::SmallVec<[usize; 8]>;

/// A site's place in an active-passive cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Primary,
    Secondary,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Secondary => "secondary",
        }
    }
}

/// One site of a cluster: a data centre with its backends.
#[derive(Debug, Clone)]
pub struct Site {
    pub name: String,
    pub role: Role,
    /// Share of traffic in active-active clusters.
    pub weight: u32,
    /// A drained site (`enabled = false`) receives no new requests.
    pub enabled: bool,
    pub backends: Vec<SocketAddr>,
    /// Drained backends (`enabled = false`): no new requests, in-flight ones finish.
    pub drained: Vec<SocketAddr>,
}

/// How sites share traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    ActivePassive,
    ActiveActive,
}

/// How a backend is picked in a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    LeastInflight,
}

/// Everything that shapes a cluster's choices.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    pub balance: Balance,
    pub thresholds: Thresholds,
    pub outlier: Outlier,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mode: Mode::ActivePassive,
            balance: Balance::RoundRobin,
            thresholds: Thresholds { rise: 2, fall: 2 },
            outlier: Outlier::default(),
        }
    }
}

/// Where one request goes (tests).
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Choice {
    /// Index into [`Cluster::sites`].
    pub site: usize,
    pub backend: SocketAddr,
}

/// What a backend looks like now, for status and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendView {
    pub addr: SocketAddr,
    pub active: Active,
    pub ejected: bool,
    pub drained: bool,
    pub usable: bool,
    pub inflight: u32,
}

#[derive(Debug)]
struct State {
    health: Vec<Vec<Health>>,
    /// The site that served when last observed.
    serving: Option<usize>,
}

/// A backend cluster across its sites.
#[derive(Debug)]
pub struct Cluster {
    name: String,
    sites: Vec<Site>,
    /// Site indexes in preference order: primaries, then secondaries.
    order: Vec<usize>,
    settings: Settings,
    state: Mutex<State>,
    next: Vec<AtomicUsize>,
    inflight: Vec<Vec<AtomicU32>>,
    weighted: AtomicUsize,
}

impl Cluster {
    pub fn new(name: impl Into<String>, sites: Vec<Site>) -> Self {
        Cluster::with_settings(name, sites, Settings::default())
    }

    pub fn with_settings(name: impl Into<String>, sites: Vec<Site>, settings: Settings) -> Self {
        let mut order: Vec<usize> = (0..sites.len()).collect();
        order.sort_by_key(|&i| (sites[i].role != Role::Primary, i));
        Cluster {
            name: name.into(),
            order,
            settings,
            state: Mutex::new(State {
                health: sites
                    .iter()
                    .map(|s| vec![Health::default(); s.backends.len()])
                    .collect(),
                serving: None,
            }),
            next: sites.iter().map(|_| AtomicUsize::new(0)).collect(),
            inflight: sites
                .iter()
                .map(|s| s.backends.iter().map(|_| AtomicU32::new(0)).collect())
                .collect(),
            weighted: AtomicUsize::new(0),
            sites,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn sites(&self) -> &[Site] {
        &self.sites
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes over the health of backends that `old` also had (same site name
    /// and address): a reload never marks a healthy backend unknown.
    pub fn adopt(&self, old: &Cluster) {
        let old_state = old.state();
        let mut state = self.state();
        for (si, site) in self.sites.iter().enumerate() {
            let Some(oi) = old.sites.iter().position(|s| s.name == site.name) else {
                continue;
            };
            for (bi, addr) in site.backends.iter().enumerate() {
                if let Some(ob) = old.sites[oi].backends.iter().position(|a| a == addr) {
                    state.health[si][bi] = old_state.health[oi][ob].clone();
                }
            }
        }
        state.serving = old_state.serving.and_then(|i| {
            let name = &old.sites.get(i)?.name;
            self.sites.iter().position(|s| &s.name == name)
        });
    }

    /// A backend may take new requests: not drained, not down, not ejected.
    fn usable(&self, state: &State, site: usize, b: usize, now: Instant) -> bool {
        state.health[site][b].usable(now)
            && !self.sites[site]
                .drained
                .contains(&self.sites[site].backends[b])
    }

    fn site_up(&self, state: &State, site: usize, now: Instant) -> bool {
        (0..self.sites[site].backends.len())
            .any(|b| state.health[site][b].active == Active::Up && self.usable(state, site, b, now))
    }

    fn site_usable(&self, state: &State, site: usize, now: Instant) -> bool {
        (0..self.sites[site].backends.len()).any(|b| self.usable(state, site, b, now))
    }

    fn candidates(&self, state: &State, now: Instant, exclude: &[usize]) -> Picks {
        let open: Picks = self
            .order
            .iter()
            .copied()
            .filter(|&i| {
                self.sites[i].enabled && !self.sites[i].backends.is_empty() && !exclude.contains(&i)
            })
            .collect();
        let up: Picks = open
            .iter()
            .copied()
            .filter(|&i| self.site_up(state, i, now))
            .collect();
        if !up.is_empty() {
            return up;
        }
        let usable: Picks = open
            .iter()
            .copied()
            .filter(|&i| self.site_usable(state, i, now))
            .collect();
        if !usable.is_empty() {
            return usable;
        }
        // Panic mode: every site looks down; try them anyway.
        open.into_iter()
            .filter(|&i| self.sites[i].backends.len() > self.sites[i].drained.len())
            .collect()
    }

    /// The site for a new request, not one of `exclude`; `None` when no site
    /// can take it.
    pub fn choose_site(&self, now: Instant, exclude: &[usize]) -> Option<usize> {
        let state = self.state();
        let candidates = self.candidates(&state, now, exclude);
        match self.settings.mode {
            Mode::ActivePassive => candidates.first().copied(),
            Mode::ActiveActive => {
                let total: u64 = candidates
                    .iter()
                    .map(|&i| u64::from(self.sites[i].weight.max(1)))
                    .sum();
                if total == 0 {
                    return None;
                }
                let mut x = self.weighted.fetch_add(1, Ordering::Relaxed) as u64 % total;
                candidates.into_iter().find(|&i| {
                    let w = u64::from(self.sites[i].weight.max(1));
                    if x < w {
                        return true;
                    }
                    x -= w;
                    false
                })
            }
        }
    }

    /// The site serving now (for failover detection and status).
    pub fn serving(&self, now: Instant) -> Option<usize> {
        match self.settings.mode {
            Mode::ActivePassive => self.choose_site(now, &[]),
            Mode::ActiveActive => {
                let state = self.state();
                self.candidates(&state, now, &[]).first().copied()
            }
        }
    }

    /// Whether the serving site changed since the last call: `(from, to)`.
    pub fn observe(&self, now: Instant) -> Option<(Option<usize>, Option<usize>)> {
        let serving = self.serving(now);
        let mut state = self.state();
        let before = state.serving;
        state.serving = serving;
        (before != serving).then_some((before, serving))
    }

    /// A backend of `site` not in `tried`: checked-up ones before unknown
    /// ones, round-robin or least in flight among them.
    pub fn backend_in(
        &self,
        site: usize,
        now: Instant,
        tried: &[SocketAddr],
    ) -> Option<SocketAddr> {
        let state = self.state();
        let backends = &self.sites.get(site)?.backends;
        let health = &state.health[site];
        let eligible = |want_up: bool| -> Picks {
            (0..backends.len())
                .filter(|&b| self.usable(&state, site, b, now) && !tried.contains(&backends[b]))
                .filter(|&b| !want_up || health[b].active == Active::Up)
                .collect()
        };
        let mut pool = eligible(true);
        if pool.is_empty() {
            pool = eligible(false);
        }
        if pool.is_empty()
            && !(0..self.sites.len())
                .any(|i| self.sites[i].enabled && self.site_usable(&state, i, now))
        {
            // Panic mode: nothing anywhere is usable; try any not-drained backend.
            pool = (0..backends.len())
                .filter(|&b| {
                    !self.sites[site].drained.contains(&backends[b])
                        && !tried.contains(&backends[b])
                })
                .collect();
        }
        if pool.is_empty() {
            return None;
        }
        let pick = match self.settings.balance {
            Balance::RoundRobin => {
                pool[self.next[site].fetch_add(1, Ordering::Relaxed) % pool.len()]
            }
            Balance::LeastInflight => {
                let start = self.next[site].fetch_add(1, Ordering::Relaxed);
                // Ties go round-robin, so equal backends share the load.
                (0..pool.len())
                    .map(|k| pool[(start + k) % pool.len()])
                    .min_by_key(|&b| self.inflight[site][b].load(Ordering::Relaxed))
                    .expect("pool is not empty")
            }
        };
        Some(backends[pick])
    }

    /// The preferred site and a backend in it (no health-aware retries).
    #[cfg(test)]
    fn choose(&self, now: Instant) -> Option<Choice> {
        let site = self.choose_site(now, &[])?;
        Some(Choice {
            site,
            backend: self.backend_in(site, now, &[])?,
        })
    }

    fn index(&self, site: usize, addr: SocketAddr) -> Option<usize> {
        self.sites
            .get(site)?
            .backends
            .iter()
            .position(|a| *a == addr)
    }

    /// An active probe's result. Returns true when the backend's state changed.
    pub fn probe(&self, site: usize, addr: SocketAddr, ok: bool) -> bool {
        let Some(b) = self.index(site, addr) else {
            return false;
        };
        let t = self.settings.thresholds;
        self.state().health[site][b].probe(ok, t)
    }

    /// A request's outcome at a backend (passive health). Returns true when
    /// this failure ejected the backend.
    pub fn report(&self, site: usize, addr: SocketAddr, ok: bool, now: Instant) -> bool {
        let Some(b) = self.index(site, addr) else {
            return false;
        };
        let o = self.settings.outlier;
        let mut state = self.state();
        if ok {
            state.health[site][b].passive_ok();
            return false;
        }
        if !state.health[site][b].passive_failure(&o, now) {
            return false;
        }
        let n = state.health[site].len();
        let ejected = state.health[site].iter().filter(|h| h.ejected(now)).count();
        // Never eject more than max_share of a site while it is the last
        // resort; when another site is up, ejecting all of it is a failover
        // (a site answering 500s leaves in a few requests, not after the
        // active checks' `fall`).
        let elsewhere = (0..self.sites.len()).any(|other| {
            other != site && self.sites[other].enabled && self.site_up(&state, other, now)
        });
        if !elsewhere && (ejected + 1) as f64 > o.max_share * n as f64 {
            return false;
        }
        state.health[site][b].eject(&o, now);
        true
    }

    /// Counts a request in flight at a backend until the guard is dropped.
    pub fn begin(self: &Arc<Self>, site: usize, addr: SocketAddr) -> Option<InflightGuard> {
        let backend = self.index(site, addr)?;
        self.inflight[site][backend].fetch_add(1, Ordering::Relaxed);
        Some(InflightGuard {
            cluster: self.clone(),
            site,
            backend,
        })
    }

    /// Every backend's state, by site.
    pub fn view(&self, now: Instant) -> Vec<Vec<BackendView>> {
        let state = self.state();
        self.sites
            .iter()
            .enumerate()
            .map(|(si, s)| {
                s.backends
                    .iter()
                    .enumerate()
                    .map(|(bi, addr)| {
                        let h = &state.health[si][bi];
                        BackendView {
                            addr: *addr,
                            active: h.active,
                            ejected: h.ejected(now),
                            drained: s.drained.contains(addr),
                            usable: self.usable(&state, si, bi, now),
                            inflight: self.inflight[si][bi].load(Ordering::Relaxed),
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// Whether a site has a backend up (or, before any check, usable).
    pub fn site_is_up(&self, site: usize, now: Instant) -> bool {
        let state = self.state();
        self.sites[site].enabled && self.site_usable(&state, site, now)
    }
}

/// Holds one request's place in a backend's in-flight count.
#[derive(Debug)]
pub struct InflightGuard {
    cluster: Arc<Cluster>,
    site: usize,
    backend: usize,
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.cluster.inflight[self.site][self.backend].fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn addr(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    fn site(name: &str, role: Role, enabled: bool, ports: &[u16]) -> Site {
        Site {
            name: name.into(),
            role,
            weight: 1,
            enabled,
            backends: ports.iter().map(|p| addr(*p)).collect(),
            drained: Vec::new(),
        }
    }

    fn two_sites() -> Cluster {
        Cluster::new(
            "kred",
            vec![
                site("verizon", Role::Secondary, true, &[9101]),
                site("skondal", Role::Primary, true, &[9001, 9002]),
            ],
        )
    }

    #[test]
    fn round_robin_over_the_primary_site_only() {
        let c = two_sites();
        let now = Instant::now();
        let ports: Vec<u16> = (0..4)
            .map(|_| c.choose(now).unwrap().backend.port())
            .collect();
        assert_eq!(ports, [9001, 9002, 9001, 9002]);
        assert_eq!(c.choose(now).unwrap().site, 1);
    }

    #[test]
    fn drained_primary_falls_to_the_next_enabled_site() {
        let c = Cluster::new(
            "kred",
            vec![
                site("skondal", Role::Primary, false, &[9001]),
                site("verizon", Role::Secondary, true, &[9101]),
            ],
        );
        assert_eq!(c.choose(Instant::now()).unwrap().backend.port(), 9101);
    }

    #[test]
    fn no_usable_site_gives_none() {
        let c = Cluster::new("kred", vec![site("skondal", Role::Primary, false, &[9001])]);
        assert_eq!(c.choose(Instant::now()), None);
    }

    #[test]
    fn failover_when_the_primary_is_down_and_failback_after_rise_checks() {
        let c = two_sites();
        let now = Instant::now();
        for (s, p, ok) in [(1, 9001, true), (1, 9002, true), (0, 9101, true)] {
            c.probe(s, addr(p), ok);
        }
        assert_eq!(c.observe(now), Some((None, Some(1))));
        // Both primary backends fail 2 checks (fall = 2): the secondary serves.
        for _ in 0..2 {
            c.probe(1, addr(9001), false);
            c.probe(1, addr(9002), false);
        }
        assert_eq!(c.choose_site(now, &[]), Some(0));
        assert_eq!(c.observe(now), Some((Some(1), Some(0))));
        // One good check is not enough to fail back (rise = 2)…
        c.probe(1, addr(9001), true);
        assert_eq!(c.choose_site(now, &[]), Some(0));
        assert_eq!(c.observe(now), None, "no flapping");
        // …the second is.
        c.probe(1, addr(9001), true);
        assert_eq!(c.choose_site(now, &[]), Some(1));
        assert_eq!(
            c.choose(now).unwrap().backend,
            addr(9001),
            "only the up backend"
        );
        assert_eq!(c.observe(now), Some((Some(0), Some(1))));
    }

    #[test]
    fn unknown_backends_serve_only_when_no_peer_is_up() {
        let c = two_sites();
        let now = Instant::now();
        assert_eq!(
            c.backend_in(1, now, &[]),
            Some(addr(9001)),
            "all unknown: used"
        );
        c.probe(1, addr(9002), true);
        for _ in 0..4 {
            assert_eq!(
                c.backend_in(1, now, &[]),
                Some(addr(9002)),
                "an up peer: unknown not used"
            );
        }
    }

    #[test]
    fn passive_ejection_never_takes_more_than_the_max_share_of_a_site() {
        let c = two_sites(); // skondal: 2 backends, max share 0.5
        let now = Instant::now();
        for _ in 0..4 {
            assert!(!c.report(1, addr(9001), false, now));
        }
        assert!(
            c.report(1, addr(9001), false, now),
            "5th failure in a row ejects"
        );
        for _ in 0..5 {
            assert!(
                !c.report(1, addr(9002), false, now),
                "the second would exceed half the site"
            );
        }
        assert_eq!(c.backend_in(1, now, &[]), Some(addr(9002)));
        let later = now + Duration::from_secs(5);
        assert!(
            c.view(later)[1][0].usable,
            "ejection ends after the base time"
        );
    }

    #[test]
    fn a_whole_site_is_ejected_passively_when_another_site_is_up() {
        let c = two_sites();
        let now = Instant::now();
        for _ in 0..2 {
            c.probe(0, addr(9101), true); // verizon checked up
        }
        for port in [9001, 9002] {
            for _ in 0..4 {
                assert!(!c.report(1, addr(port), false, now));
            }
            assert!(c.report(1, addr(port), false, now), "{port} ejected");
        }
        assert_eq!(c.backend_in(1, now, &[]), None);
        assert_eq!(c.choose_site(now, &[]), Some(0), "failed over");
        // With the other site down too, the cap holds again.
        let c = two_sites();
        for _ in 0..2 {
            c.probe(0, addr(9101), false);
        }
        for _ in 0..5 {
            c.report(1, addr(9001), false, now);
        }
        for _ in 0..5 {
            assert!(!c.report(1, addr(9002), false, now), "last resort kept");
        }
    }

    #[test]
    fn retries_skip_tried_backends_then_move_to_another_site() {
        let c = two_sites();
        let now = Instant::now();
        assert_eq!(c.backend_in(1, now, &[addr(9001)]), Some(addr(9002)));
        assert_eq!(c.backend_in(1, now, &[addr(9001), addr(9002)]), None);
        assert_eq!(c.choose_site(now, &[1]), Some(0));
    }

    #[test]
    fn least_inflight_prefers_the_idle_backend() {
        let settings = Settings {
            balance: Balance::LeastInflight,
            ..Settings::default()
        };
        let c = Arc::new(Cluster::with_settings(
            "k",
            vec![site("s", Role::Primary, true, &[1, 2])],
            settings,
        ));
        let now = Instant::now();
        let _busy = c.begin(0, addr(1)).unwrap();
        for _ in 0..4 {
            assert_eq!(c.backend_in(0, now, &[]), Some(addr(2)));
        }
    }

    #[test]
    fn active_active_shares_by_weight() {
        let settings = Settings {
            mode: Mode::ActiveActive,
            ..Settings::default()
        };
        let mut a = site("a", Role::Primary, true, &[1]);
        a.weight = 3;
        let b = site("b", Role::Primary, true, &[2]);
        let c = Cluster::with_settings("k", vec![a, b], settings);
        let now = Instant::now();
        let picks: Vec<usize> = (0..8).map(|_| c.choose_site(now, &[]).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&s| s == 0).count(), 6);
    }

    #[test]
    fn when_every_site_is_down_backends_are_tried_anyway() {
        let c = two_sites();
        let now = Instant::now();
        for (s, p) in [(1, 9001), (1, 9002), (0, 9101)] {
            c.probe(s, addr(p), false);
        }
        assert_eq!(
            c.choose_site(now, &[]),
            Some(1),
            "panic mode: the primary, still"
        );
        assert_eq!(c.backend_in(1, now, &[]), Some(addr(9001)));
        // As soon as one backend is up, health counts again.
        c.probe(0, addr(9101), true);
        c.probe(0, addr(9101), true);
        assert_eq!(c.choose_site(now, &[]), Some(0));
        assert_eq!(
            c.backend_in(1, now, &[]),
            None,
            "no panic while a site is up"
        );
    }

    #[test]
    fn a_drained_backend_gets_no_new_requests() {
        let mut s = site("skondal", Role::Primary, true, &[9001, 9002]);
        s.drained = vec![addr(9001)];
        let c = Cluster::new("kred", vec![s]);
        let now = Instant::now();
        for _ in 0..4 {
            assert_eq!(c.backend_in(0, now, &[]), Some(addr(9002)));
        }
        assert!(c.view(now)[0][0].drained);
    }

    #[test]
    fn a_reload_keeps_health_by_site_and_address() {
        let old = two_sites();
        for _ in 0..2 {
            old.probe(1, addr(9001), false);
        }
        old.probe(1, addr(9002), true);
        let new = Cluster::new(
            "kred",
            vec![
                site("skondal", Role::Primary, true, &[9002, 9001, 9003]),
                site("verizon", Role::Secondary, true, &[9101]),
            ],
        );
        new.adopt(&old);
        let v = new.view(Instant::now());
        assert_eq!(v[0][0].active, Active::Up);
        assert_eq!(v[0][1].active, Active::Down);
        assert_eq!(
            v[0][2].active,
            Active::Unknown,
            "a new backend starts unknown"
        );
    }
}
