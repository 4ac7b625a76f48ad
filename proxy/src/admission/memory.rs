//! What the adaptive limits learnt, kept across a restart.
//!
//! A fresh process starts every adaptive limit at `initial` (8) and climbs
//! from there; in front of a large backend under load that climb takes
//! longer than a lower tier's `max_queue_wait`. One instance restarted
//! (or upgraded) at 0.8x in front of 64 workers of 50 ms refused 1.3-3.4%
//! of lower-tier requests in its first second (docs/admission.md,
//! "Thirtieth round"). With `[server] admission_state` set, the running
//! process writes each site's limit to that file every second and on
//! its way out, and a process that starts reads it: a site of the same
//! cluster and site name starts at the limit saved, without a slow start,
//! if the file is at most [`FRESH_FOR`] old. Anything older says little
//! of the backend now, and is left unused. The baseline the limit had
//! learnt (the backend's uncongested latency, and its spread) is kept too:
//! restarted in the middle of a peak, a process otherwise learns its first
//! baseline from a backend the other instances hold at its knee, their
//! queue included ([`super::limit::Limit::resume_learnt`]).
//!
//! The file is JSON, written to a temporary file beside it (one per
//! process) and renamed, so a reader never sees half of it. A file that cannot be read or
//! parsed is reported and left unused: it never stops a start.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::Controllers;

/// How old a saved file may be and still be used at start.
pub const FRESH_FOR: Duration = Duration::from_secs(600);

/// The file's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Saved {
    /// When it was written, milliseconds since the Unix epoch.
    pub saved_at_ms: u64,
    pub sites: Vec<SavedSite>,
}

/// One site's adaptive limit, and what it had learnt of the backend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedSite {
    pub cluster: String,
    pub site: String,
    pub limit: u32,
    /// The uncongested latency, milliseconds (absent before the first
    /// baseline, and in files of earlier versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_ms: Option<f64>,
    /// Its coefficient of variation, once learnt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread: Option<f64>,
}

/// What a start made of the file.
#[derive(Debug, PartialEq)]
pub enum Restored {
    /// No file: nothing was kept (a first start).
    Absent,
    /// Written longer ago than [`FRESH_FOR`]; unused.
    Stale { age: Duration },
    /// These sites start at the saved limits.
    Resumed(Vec<SavedSite>),
}

/// The adaptive limits of `controllers` at `now`.
pub fn snapshot(controllers: &Controllers, now: SystemTime) -> Saved {
    Saved {
        saved_at_ms: millis(now),
        sites: controllers
            .iter()
            .filter_map(|c| {
                c.adaptive_limit().map(|limit| {
                    let kept = c.kept();
                    SavedSite {
                        cluster: c.cluster().to_string(),
                        site: c.site().to_string(),
                        limit,
                        baseline_ms: kept.map(|k| k.baseline.as_secs_f64() * 1e3),
                        spread: kept.and_then(|k| k.spread),
                    }
                })
            })
            .collect(),
    }
}

/// Writes `controllers`' limits to `path` (through a temporary file
/// beside it, renamed over it). The temporary file is this process's own:
/// during a graceful upgrade the old and the new process both write.
pub fn save(path: &Path, controllers: &Controllers, now: SystemTime) -> std::io::Result<()> {
    let text = serde_json::to_vec(&snapshot(controllers, now)).map_err(std::io::Error::other)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Reads `path` and starts each site of `controllers` found in it at its
/// saved limit, if the file is fresh. Errors say what and where.
pub fn restore(
    path: &Path,
    controllers: &Controllers,
    now: SystemTime,
) -> Result<Restored, String> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Restored::Absent),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let saved: Saved = serde_json::from_slice(&text)
        .map_err(|e| format!("{}: not a saved admission state: {e}", path.display()))?;
    let age = Duration::from_millis(millis(now).saturating_sub(saved.saved_at_ms));
    if age > FRESH_FOR {
        return Ok(Restored::Stale { age });
    }
    let mut resumed = Vec::new();
    for s in saved.sites {
        let found = controllers
            .iter()
            .find(|c| c.cluster() == s.cluster && c.site() == s.site)
            .filter(|c| c.adaptive_limit().is_some());
        if let Some(c) = found {
            c.resume(s.limit);
            let baseline = s.baseline_ms.filter(|b| b.is_finite() && *b > 0.0);
            if let Some(ms) = baseline {
                c.resume_learnt(super::limit::Kept {
                    baseline: Duration::from_secs_f64(ms / 1e3),
                    spread: s.spread,
                });
            }
            resumed.push(s);
        }
    }
    Ok(Restored::Resumed(resumed))
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::{Controller, Controllers};
    use crate::config::AdmissionMode;
    use std::sync::Arc;

    fn controllers(sites: &[(&str, &str, AdmissionMode)]) -> Controllers {
        let metrics = crate::metrics::Metrics::new();
        let tiers = vec!["purchase".to_string()];
        let by_site = sites
            .iter()
            .map(|(cluster, site, mode)| {
                let limit = match mode {
                    AdmissionMode::Fixed { limit } => super::super::limit::Limit::fixed(*limit),
                    AdmissionMode::Adaptive { initial, min, max } => {
                        super::super::limit::Limit::adaptive(
                            super::super::limit::Bounds {
                                initial: *initial,
                                min: *min,
                                max: *max,
                            },
                            super::super::now(),
                        )
                    }
                    AdmissionMode::Off => super::super::limit::Limit::fixed(u32::MAX),
                };
                vec![Arc::new(Controller::new(
                    cluster,
                    site,
                    rules(),
                    limit,
                    &tiers,
                    &metrics,
                ))]
            })
            .collect();
        Controllers::new(by_site)
    }

    fn rules() -> super::super::gate::Rules {
        super::super::gate::Rules {
            tiers: vec![super::super::gate::TierRule {
                max_wait: Duration::from_secs(2),
                max_share: 1.0,
                never_shed: true,
                force_shed: false,
            }],
            target_queue_delay: Duration::from_millis(20),
            max_queue: 100,
            refuse_standing_queue: false,
            standing_after: Duration::from_secs(1),
        }
    }

    const ADAPTIVE: AdmissionMode = AdmissionMode::Adaptive {
        initial: 8,
        min: 4,
        max: 500,
    };

    fn limits(c: &Controllers) -> Vec<u32> {
        c.iter().map(|c| c.state().limit).collect()
    }

    #[test]
    fn a_start_resumes_the_limits_a_process_before_it_saved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admission.json");
        let t0 = SystemTime::now();
        let before = controllers(&[("kred", "skondal", ADAPTIVE), ("kred", "verizon", ADAPTIVE)]);
        before.iter().next().unwrap().resume(61);
        save(&path, &before, t0).unwrap();

        let after = controllers(&[
            ("kred", "skondal", ADAPTIVE),
            ("kred", "verizon", ADAPTIVE),
            ("kred", "new-site", ADAPTIVE),
        ]);
        assert_eq!(limits(&after), [8, 8, 8]);
        let restored = restore(&path, &after, t0 + Duration::from_secs(30)).unwrap();
        let Restored::Resumed(sites) = restored else {
            panic!("{restored:?}")
        };
        assert_eq!(sites.len(), 2, "{sites:?}");
        // A site the file does not name starts at `initial`.
        assert_eq!(limits(&after), [61, 8, 8]);
    }

    #[test]
    fn a_start_keeps_the_baseline_a_process_before_it_learnt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admission.json");
        let t0 = SystemTime::now();
        let learnt = super::super::limit::Kept {
            baseline: Duration::from_millis(25),
            spread: Some(0.3),
        };
        let before = controllers(&[("kred", "skondal", ADAPTIVE), ("kred", "verizon", ADAPTIVE)]);
        before.iter().next().unwrap().resume_learnt(learnt);
        save(&path, &before, t0).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"baseline_ms\":25"), "{text}");
        // A site that had learnt nothing saves no baseline.
        assert_eq!(text.matches("baseline_ms").count(), 1, "{text}");

        let after = controllers(&[("kred", "skondal", ADAPTIVE), ("kred", "verizon", ADAPTIVE)]);
        restore(&path, &after, t0 + Duration::from_secs(5)).unwrap();
        let kept: Vec<_> = after.iter().map(|c| c.kept()).collect();
        assert_eq!(kept, [Some(learnt), None]);
        let state = after.iter().next().unwrap().state();
        assert_eq!(state.limit, 8, "{state:?}");
    }

    #[test]
    fn a_file_of_an_earlier_version_without_baselines_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admission.json");
        let t0 = SystemTime::now();
        let text = format!(
            r#"{{"saved_at_ms":{},"sites":[{{"cluster":"kred","site":"skondal","limit":33}}]}}"#,
            millis(t0)
        );
        std::fs::write(&path, text).unwrap();
        let after = controllers(&[("kred", "skondal", ADAPTIVE)]);
        restore(&path, &after, t0).unwrap();
        assert_eq!(limits(&after), [33]);
        assert_eq!(after.iter().next().unwrap().kept(), None);
    }

    #[test]
    fn a_stale_or_absent_file_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admission.json");
        let c = controllers(&[("kred", "skondal", ADAPTIVE)]);
        let t0 = SystemTime::now();
        assert_eq!(restore(&path, &c, t0), Ok(Restored::Absent));
        c.iter().next().unwrap().resume(40);
        save(&path, &c, t0).unwrap();
        let fresh = controllers(&[("kred", "skondal", ADAPTIVE)]);
        let later = t0 + FRESH_FOR + Duration::from_secs(1);
        assert!(matches!(
            restore(&path, &fresh, later),
            Ok(Restored::Stale { .. })
        ));
        assert_eq!(limits(&fresh), [8]);
    }

    #[test]
    fn a_saved_limit_stays_within_the_new_bounds_and_a_fixed_limit_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admission.json");
        let t0 = SystemTime::now();
        let wide = AdmissionMode::Adaptive {
            initial: 8,
            min: 4,
            max: 1000,
        };
        let before = controllers(&[("kred", "skondal", wide.clone()), ("kred", "verizon", wide)]);
        for c in before.iter() {
            c.resume(900);
        }
        save(&path, &before, t0).unwrap();
        let after = controllers(&[
            ("kred", "skondal", ADAPTIVE),
            ("kred", "verizon", AdmissionMode::Fixed { limit: 16 }),
        ]);
        restore(&path, &after, t0).unwrap();
        assert_eq!(limits(&after), [500, 16]);
        // A fixed limit is not saved either.
        assert_eq!(snapshot(&after, t0).sites.len(), 1);
    }

    #[test]
    fn a_file_that_is_not_a_saved_state_is_an_error_that_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admission.json");
        std::fs::write(&path, "{\"sites\": 3}").unwrap();
        let c = controllers(&[("kred", "skondal", ADAPTIVE)]);
        let err = restore(&path, &c, SystemTime::now()).unwrap_err();
        assert!(
            err.contains("admission.json") && err.contains("not a saved admission state"),
            "{err}"
        );
        assert_eq!(limits(&c), [8]);
    }
}
