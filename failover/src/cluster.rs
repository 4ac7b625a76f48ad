//! A cluster's sites and the round-robin choice of a backend.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

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
}

/// Where one request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Choice {
    /// Index into [`Cluster::sites`].
    pub site: usize,
    pub backend: SocketAddr,
}

/// A backend cluster across its sites.
#[derive(Debug)]
pub struct Cluster {
    name: String,
    sites: Vec<Site>,
    /// Site preferred while it is usable: the first enabled primary, else the
    /// first enabled site.
    preferred: Option<usize>,
    next: AtomicUsize,
}

impl Cluster {
    pub fn new(name: impl Into<String>, sites: Vec<Site>) -> Self {
        let usable = |s: &&Site| s.enabled && !s.backends.is_empty();
        let preferred = sites
            .iter()
            .position(|s| usable(&s) && s.role == Role::Primary)
            .or_else(|| sites.iter().position(|s| usable(&s)));
        Cluster {
            name: name.into(),
            sites,
            preferred,
            next: AtomicUsize::new(0),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn sites(&self) -> &[Site] {
        &self.sites
    }

    /// The next backend of the preferred site, round-robin; `None` when no
    /// site can take traffic.
    pub fn choose(&self) -> Option<Choice> {
        let site = self.preferred()?;
        Some(Choice {
            site,
            backend: self.backend_in(site)?,
        })
    }

    /// The site that takes traffic now, if any.
    pub fn preferred(&self) -> Option<usize> {
        self.preferred
    }

    /// The next backend of `site`, round-robin.
    pub fn backend_in(&self, site: usize) -> Option<SocketAddr> {
        let backends = &self.sites.get(site)?.backends;
        if backends.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        Some(backends[n % backends.len()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(name: &str, role: Role, enabled: bool, ports: &[u16]) -> Site {
        Site {
            name: name.into(),
            role,
            weight: 1,
            enabled,
            backends: ports
                .iter()
                .map(|p| SocketAddr::from(([127, 0, 0, 1], *p)))
                .collect(),
        }
    }

    #[test]
    fn round_robin_over_the_primary_site_only() {
        let c = Cluster::new(
            "kred",
            vec![
                site("verizon", Role::Secondary, true, &[9101]),
                site("skondal", Role::Primary, true, &[9001, 9002]),
            ],
        );
        let ports: Vec<u16> = (0..4).map(|_| c.choose().unwrap().backend.port()).collect();
        assert_eq!(ports, [9001, 9002, 9001, 9002]);
        assert_eq!(c.choose().unwrap().site, 1);
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
        assert_eq!(c.choose().unwrap().backend.port(), 9101);
    }

    #[test]
    fn no_usable_site_gives_none() {
        let c = Cluster::new("kred", vec![site("skondal", Role::Primary, false, &[9001])]);
        assert_eq!(c.choose(), None);
    }
}
