//! Brings up a scenario's topology and tears it down: legacy-sims per site
//! (in this process, on loopback ports the OS picks) and a real k2proxy
//! process running the scenario's routes.toml, whose sites' backends are
//! rewritten to the simulators and whose listeners move to free ports.
//! Events are applied here: faults on a site's simulators, and reloads that
//! rewrite the routes file's `policy` (k2proxy's watcher picks it up).
//!
//! With `proxies = N` it starts N k2proxy instances on the same simulators,
//! each with its own routes file, ports and log, and an L4 balancer in this
//! process that hands each new connection to the next instance in turn whose
//! `/healthz` answers 200, as IPVS with health checks or a cloud NLB does
//! ([`crate::balancer`]); every reload goes to every instance, and a restart
//! event stops one as a deploy does and starts it again, cold.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::balancer::Balancer;
use crate::scenario::{Action, TopologySpec, Via};
use crate::sim::{self, SimConfig, SimHandle};

/// A running topology; dropping it stops k2proxy and the simulators.
pub struct Topology {
    pub sites: Vec<(String, Vec<SimHandle>)>,
    instances: Vec<Instance>,
    /// The L4 balancer in front of several instances.
    balancer: Option<Balancer>,
    /// The k2proxy binary, for restarts.
    k2proxy: PathBuf,
    /// `http://127.0.0.1:port` of k2proxy's listener (of the balancer in
    /// front of several).
    pub base_url: String,
    /// The first instance's admin address.
    pub admin: SocketAddr,
    routes: toml::Table,
    admission: bool,
    out: PathBuf,
    reloads: usize,
    /// What became of the reload events' edits.
    pub edits: Edits,
}

/// One k2proxy process of the topology.
struct Instance {
    /// None until started (the files are written first).
    child: Option<Child>,
    listen: SocketAddr,
    admin: SocketAddr,
    routes_path: PathBuf,
    log: PathBuf,
}

/// What became of a drill's reload edits.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Edits {
    /// Valid edits made, and how many k2proxy applied.
    pub valid: u64,
    pub applied: u64,
    /// Broken edits made, and how many k2proxy refused (keeping the
    /// running config).
    pub broken: u64,
    pub refused: u64,
    /// Edits that did not end as expected.
    pub failed: u64,
    /// The first few of them, said.
    pub failures: Vec<String>,
}

/// How long an edit may take to show in `/status` (the watcher's debounce
/// and SIGHUP's tick are 50 ms each; a reload takes milliseconds).
const EDIT_DEADLINE: Duration = Duration::from_secs(3);

fn free_addr() -> std::io::Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// Where the k2proxy binary is: `K2PROXY`, else next to this executable
/// (cargo puts workspace binaries together), else `k2proxy` on the PATH.
pub fn k2proxy_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("K2PROXY") {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1).take(2) {
            let candidate = dir.join("k2proxy");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    PathBuf::from("k2proxy")
}

fn read_toml(path: &Path) -> Result<toml::Table, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    text.parse::<toml::Table>()
        .map_err(|e| format!("{}: {}", path.display(), e.message()))
}

type Sites = Vec<(String, Vec<SimHandle>)>;

/// `backends` legacy-sims per scenario site, on ports the OS picks.
async fn start_sims(spec: &TopologySpec) -> Result<Sites, String> {
    let mut sites = Vec::new();
    for s in &spec.sites {
        let mut handles = Vec::new();
        for i in 0..s.backends {
            let config = SimConfig {
                name: format!("{}-{}", s.name, i + 1),
                ..s.sim.clone()
            };
            let h = sim::start(config, "127.0.0.1:0".parse().expect("static addr"))
                .await
                .map_err(|e| format!("cannot start a simulator for site {}: {e}", s.name))?;
            handles.push(h);
        }
        sites.push((s.name.clone(), handles));
    }
    Ok(sites)
}

/// Points every site of routes.toml at its simulators; every site on both
/// sides must have its match. Returns the site names in routes order.
fn point_sites(
    routes: &mut toml::Table,
    sites: &Sites,
    routes_file: &Path,
) -> Result<Vec<String>, String> {
    let mut seen = Vec::new();
    let clusters = routes
        .get_mut("clusters")
        .and_then(|c| c.as_table_mut())
        .ok_or_else(|| format!("{}: no [clusters]", routes_file.display()))?;
    let site_tables = clusters
        .iter_mut()
        .filter_map(|(_, c)| c.get_mut("sites").and_then(|s| s.as_array_mut()))
        .flatten()
        .filter_map(|s| s.as_table_mut());
    for t in site_tables {
        let name = t
            .get("name")
            .and_then(|n| n.as_str())
            .unwrap_or("")
            .to_string();
        let Some((_, handles)) = sites.iter().find(|(n, _)| *n == name) else {
            return Err(format!(
                "{}: site {name:?} has no simulators: add [topology.sites.{name}] to the scenario",
                routes_file.display()
            ));
        };
        let backends = handles
            .iter()
            .map(|h| toml::Value::String(h.addr.to_string()));
        t.insert("backends".into(), toml::Value::Array(backends.collect()));
        seen.push(name);
    }
    if let Some((name, _)) = sites.iter().find(|(name, _)| !seen.contains(name)) {
        return Err(format!(
            "scenario site {name:?} is not a site in {}",
            routes_file.display()
        ));
    }
    Ok(seen)
}

/// `[server].max_connections_per_client` of a drill's k2proxy, unless its
/// routes.toml sets one.
const LOAD_GENERATOR_CONNECTIONS: i64 = 1_000_000;

/// Writes the scenario's `[topology.server]` settings (`overrides`) over
/// `[server]` and lifts its per-address connection cap for the one load
/// generator; returns the policy file routes.toml names, relative to
/// `routes_dir`. (Each instance's listen and admin addresses are set when
/// its routes file is written.)
fn prepare_server(
    routes: &mut toml::Table,
    routes_dir: &Path,
    overrides: &toml::Table,
) -> Result<PathBuf, String> {
    let server = routes
        .entry("server")
        .or_insert_with(|| toml::Value::Table(Default::default()))
        .as_table_mut()
        .ok_or("routes.toml: [server] is not a table")?;
    server.extend(overrides.clone());
    // The load generator is one address standing for thousands of
    // shoppers: k2proxy's per-address connection cap (1 000 by default)
    // would refuse its connections, which no real peak does.
    server
        .entry("max_connections_per_client")
        .or_insert(toml::Value::Integer(LOAD_GENERATOR_CONNECTIONS));
    let policy = server
        .get("policy")
        .and_then(|p| p.as_str())
        .unwrap_or("policies/default.toml");
    Ok(routes_dir.join(policy))
}

/// What instance `i`'s file names carry after their stem: nothing for the
/// first (the single-instance names), `-i` for the others.
fn suffix(i: usize) -> String {
    if i == 0 {
        String::new()
    } else {
        format!("-{i}")
    }
}

/// Sends `signal` ("HUP", "TERM") to the process `pid`, one this
/// topology started.
fn send_signal(pid: u32, signal: &str) -> Result<(), String> {
    let sent = Command::new("kill")
        .args([format!("-{signal}"), pid.to_string()])
        .status()
        .map_err(|e| format!("kill -{signal}: {e}"))?;
    if !sent.success() {
        return Err(format!("kill -{signal} {pid}: {sent}"));
    }
    Ok(())
}

/// How long a restart waits for the stopped instance to exit (its
/// `drain_delay`, 5 s by default, and its grace period) before it kills it.
const STOP_WITHIN: Duration = Duration::from_secs(30);

/// Starts `k2proxy run --routes <routes>`, its output to `log` (appended
/// to when `append`, as a restarted instance's).
fn spawn_k2proxy(k2proxy: &Path, routes: &Path, log: &Path, append: bool) -> Result<Child, String> {
    let log = std::fs::File::options()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    Command::new(k2proxy)
        .arg("run")
        .arg("--routes")
        .arg(routes)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| {
            format!(
                "cannot start k2proxy ({}): {e}; build it (cargo build --release) or set K2PROXY",
                k2proxy.display()
            )
        })
}

impl Topology {
    /// Starts the simulators and k2proxy (N instances and a balancer with
    /// `proxies = N`), and waits until every instance reports every backend
    /// healthy. Files and k2proxy's logs go to `out`.
    pub async fn up(spec: &TopologySpec, out: &Path, k2proxy: &Path) -> Result<Topology, String> {
        std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
        let mut routes = read_toml(&spec.routes)?;
        let routes_dir = spec.routes.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut sites = start_sims(spec).await?;
        let order = point_sites(&mut routes, &sites, &spec.routes)?;
        // Routes order: the first site is the preferred one.
        sites.sort_by_key(|(name, _)| order.iter().position(|s| s == name));
        let named_policy = prepare_server(&mut routes, &routes_dir, &spec.server)?;
        let policy = spec.policy.clone().unwrap_or(named_policy);
        let mut instances = Vec::new();
        for i in 0..spec.proxies.max(1) {
            let suffix = suffix(i);
            instances.push(Instance {
                child: None,
                listen: free_addr().map_err(|e| e.to_string())?,
                admin: free_addr().map_err(|e| e.to_string())?,
                routes_path: out.join(format!("routes{suffix}.toml")),
                log: out.join(format!("k2proxy{suffix}.log")),
            });
        }
        let mut topo = Topology {
            sites,
            base_url: format!("http://{}", instances[0].listen),
            admin: instances[0].admin,
            instances,
            balancer: None,
            k2proxy: k2proxy.to_path_buf(),
            routes,
            admission: spec.admission,
            out: out.to_path_buf(),
            reloads: 0,
            edits: Edits::default(),
        };
        topo.write_files(&policy, true)?;
        for inst in &mut topo.instances {
            inst.child = Some(spawn_k2proxy(k2proxy, &inst.routes_path, &inst.log, false)?);
        }
        for i in 0..topo.instances.len() {
            topo.wait_ready(i).await?;
        }
        if topo.instances.len() > 1 {
            let to = topo.instances.iter().map(|i| i.listen).collect();
            let balancer = Balancer::start(to, topo.admins())?;
            topo.base_url = format!("http://{}", balancer.addr);
            topo.balancer = Some(balancer);
        }
        Ok(topo)
    }

    /// The number of k2proxy instances.
    pub fn proxies(&self) -> usize {
        self.instances.len()
    }

    /// Every instance's admin address.
    pub fn admins(&self) -> Vec<SocketAddr> {
        self.instances.iter().map(|i| i.admin).collect()
    }

    /// Writes every instance's routes.toml (its own listen and admin
    /// addresses, `policy` pointing at a copy in `out`) and the policy copy,
    /// with admission turned off when the scenario says so. A broken policy
    /// (`valid` false) is copied as it is. Returns the copy's file name.
    fn write_files(&mut self, policy: &Path, valid: bool) -> Result<String, String> {
        let name = format!("policy-{}.toml", self.reloads);
        let copy = self.out.join(&name);
        let text = if valid {
            toml::to_string(&self.policy_copy(policy)?).map_err(|e| e.to_string())?
        } else {
            std::fs::read_to_string(policy)
                .map_err(|e| format!("{}: cannot read: {e}", policy.display()))?
        };
        std::fs::write(&copy, text).map_err(|e| format!("{}: {e}", copy.display()))?;
        for (i, inst) in self.instances.iter().enumerate() {
            let mut routes = self.routes.clone();
            if let Some(server) = routes.get_mut("server").and_then(|s| s.as_table_mut()) {
                server.insert("policy".into(), name.clone().into());
                // Each instance keeps its own admission state, in `out`
                // (a file shared by several would mix their limits).
                if server.contains_key("admission_state") {
                    let file = format!("admission-state{}.json", suffix(i));
                    server.insert("admission_state".into(), file.into());
                }
                server.insert(
                    "listen".into(),
                    toml::Value::Array(vec![inst.listen.to_string().into()]),
                );
                server.insert("admin".into(), inst.admin.to_string().into());
            }
            let text = toml::to_string(&routes).map_err(|e| e.to_string())?;
            // Write then rename: k2proxy never reads half a file.
            let tmp = self.out.join(".routes.toml.tmp");
            std::fs::write(&tmp, text).map_err(|e| format!("{}: {e}", tmp.display()))?;
            std::fs::rename(&tmp, &inst.routes_path).map_err(|e| e.to_string())?;
        }
        Ok(name)
    }

    /// The policy as the drill runs it: admission off when the scenario says.
    fn policy_copy(&self, policy: &Path) -> Result<toml::Table, String> {
        let mut p = read_toml(policy)?;
        if !self.admission {
            let clusters: Vec<String> = self
                .routes
                .get("clusters")
                .and_then(|c| c.as_table())
                .map(|c| c.keys().cloned().collect())
                .unwrap_or_default();
            let mut off = toml::Table::new();
            for c in clusters {
                let mut t = toml::Table::new();
                t.insert("mode".into(), "off".into());
                off.insert(c, toml::Value::Table(t));
            }
            p.insert("admission".into(), toml::Value::Table(off));
        }
        Ok(p)
    }

    /// One reload edit: write it, ask every instance `via` the given way,
    /// and wait until each one's `/status` shows the result. A valid edit
    /// must become the policy in force; a broken one must be refused (a
    /// failed reload after the edit) and never become it.
    async fn edit(&mut self, policy: &Path, valid: bool, via: Via) -> Result<String, String> {
        let since = unix_ms();
        let name = self.write_files(policy, valid)?;
        for i in 0..self.instances.len() {
            self.ask(i, valid, via).await?;
        }
        for i in 0..self.instances.len() {
            self.wait_edit(i, &name, valid, since).await?;
        }
        Ok(name)
    }

    /// Asks instance `i` to reload `via` the given way.
    async fn ask(&self, i: usize, valid: bool, via: Via) -> Result<(), String> {
        let inst = &self.instances[i];
        match via {
            Via::File => {}
            Via::Sighup => {
                let pid = inst
                    .child
                    .as_ref()
                    .map(Child::id)
                    .ok_or("k2proxy is not running")?;
                send_signal(pid, "HUP")?;
            }
            Via::Post => {
                let answer = http_request(inst.admin, "POST", "/reload").await;
                let Some((status, body)) = answer else {
                    return Err("POST /reload: no answer".into());
                };
                if (status == 200) != valid {
                    return Err(format!("POST /reload answered {status}: {body}"));
                }
            }
        }
        Ok(())
    }

    /// Waits until instance `i` shows the edit to `name` applied (valid)
    /// or refused since `since` (broken).
    async fn wait_edit(&self, i: usize, name: &str, valid: bool, since: u64) -> Result<(), String> {
        let deadline = Instant::now() + EDIT_DEADLINE;
        while Instant::now() < deadline {
            if let Some(s) = self.status(i).await {
                let in_force = s["policy_file"].as_str().unwrap_or("");
                let last = &s["last_reload"];
                let refused_since = last["ok"] == false
                    && last["at_unix_ms"].as_u64().is_some_and(|at| at >= since);
                match (valid, in_force.ends_with(name)) {
                    (true, true) => return Ok(()),
                    (false, true) => return Err("the broken policy was applied".into()),
                    (false, false) if refused_since => return Ok(()),
                    _ => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let which = if self.instances.len() > 1 {
            format!(" by instance {i}")
        } else {
            String::new()
        };
        Err(format!(
            "no {}{which} within {EDIT_DEADLINE:?}",
            if valid { "reload" } else { "refusal" }
        ))
    }

    /// The first k2proxy's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.instances[0].child.as_ref().map(Child::id)
    }

    async fn status(&self, i: usize) -> Option<serde_json::Value> {
        let body = http_get(self.instances[i].admin, "/status").await?;
        serde_json::from_str(&body).ok()
    }

    async fn wait_ready(&mut self, i: usize) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(Ok(Some(status))) = self.instances[i].child.as_mut().map(Child::try_wait) {
                return Err(format!(
                    "k2proxy exited ({status}) before it was ready:\n{}",
                    self.log_tail(i)
                ));
            }
            if let Some(s) = self.status(i).await {
                let all_up = s["clusters"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .flat_map(|c| c["sites"].as_array().cloned().unwrap_or_default())
                        .flat_map(|site| site["backends"].as_array().cloned().unwrap_or_default())
                        .all(|b| b["health"] == "up")
                });
                if all_up {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "k2proxy's backends were not all up within 20 s:\n{}",
                    self.log_tail(i)
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self, i: usize) -> String {
        let log = std::fs::read_to_string(&self.instances[i].log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The preferred site's simulators: the first site in routes order.
    pub fn preferred(&self) -> &[SimHandle] {
        self.sites.first().map_or(&[], |(_, hs)| hs.as_slice())
    }

    /// Applies one event; returns what happened, for the report.
    pub async fn apply(&mut self, action: &Action) -> String {
        match action {
            Action::Fault { site, fault } => {
                if let Some((_, handles)) = self.sites.iter().find(|(n, _)| n == site) {
                    for h in handles {
                        h.sim.set_fault(*fault);
                    }
                }
                format!("{site}: {}", fault.name())
            }
            Action::Restart { proxy } => match self.restart(*proxy).await {
                Ok((stopped, started)) => format!(
                    "restart instance {proxy}: stopped in {:.1} s, serving again {:.1} s later",
                    stopped.as_secs_f64(),
                    started.as_secs_f64()
                ),
                Err(why) => format!("restart instance {proxy}: FAILED: {why}"),
            },
            Action::Reload { policy, valid, via } => {
                self.reloads += 1;
                let name = policy
                    .file_name()
                    .map_or(String::new(), |n| n.to_string_lossy().into_owned());
                let e = &mut self.edits;
                if *valid {
                    e.valid += 1;
                } else {
                    e.broken += 1;
                }
                let what = format!(
                    "{} {name} via {}",
                    if *valid { "reload" } else { "broken edit" },
                    via.name()
                );
                match self.edit(policy, *valid, *via).await {
                    Ok(_) => {
                        let e = &mut self.edits;
                        if *valid {
                            e.applied += 1;
                        } else {
                            e.refused += 1;
                        }
                        what
                    }
                    Err(why) => {
                        let e = &mut self.edits;
                        e.failed += 1;
                        let said = format!("{what}: FAILED: {why}");
                        if e.failures.len() < 20 {
                            e.failures.push(said.clone());
                        }
                        said
                    }
                }
            }
        }
    }

    /// Stops instance `i` as a deploy does (SIGTERM: it drains, then
    /// stops; killed if it has not exited within [`STOP_WITHIN`]) and
    /// starts it again on the same ports and files, its log appended to,
    /// with nothing learnt (unless routes.toml keeps `admission_state`).
    /// Returns how long it took to stop, and then to be ready again (every
    /// backend up).
    pub async fn restart(&mut self, i: usize) -> Result<(Duration, Duration), String> {
        let began = Instant::now();
        let inst = &mut self.instances[i];
        let child = inst.child.as_mut().ok_or("k2proxy is not running")?;
        send_signal(child.id(), "TERM")?;
        let deadline = began + STOP_WITHIN;
        while child.try_wait().map_err(|e| e.to_string())?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "it had not exited {} s after SIGTERM (killed)",
                    STOP_WITHIN.as_secs()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let stopped = began.elapsed();
        inst.child = Some(spawn_k2proxy(
            &self.k2proxy,
            &inst.routes_path,
            &inst.log,
            true,
        )?);
        self.wait_ready(i).await?;
        Ok((stopped, began.elapsed() - stopped))
    }

    /// The first k2proxy's config generation and last reload result, from
    /// /status.
    pub async fn reload_state(&self) -> Option<serde_json::Value> {
        let s = self.status(0).await?;
        Some(serde_json::json!({"generation": s["generation"], "last_reload": s["last_reload"]}))
    }

    /// Request ids seen more than once across all simulators: (all
    /// requests, non-idempotent ones only). A GET may be retried safely; a
    /// POST seen twice is a purchase processed twice.
    pub fn duplicates(&self) -> (u64, u64) {
        let count = |ids: &dyn Fn(&SimHandle) -> std::collections::HashMap<String, u64>| {
            let mut all: std::collections::HashMap<String, u64> = Default::default();
            for (_, hs) in &self.sites {
                for h in hs {
                    for (id, n) in ids(h) {
                        *all.entry(id).or_default() += n;
                    }
                }
            }
            all.values().filter(|n| **n > 1).map(|n| n - 1).sum()
        };
        (
            count(&|h| h.sim.request_ids()),
            count(&|h| h.sim.unsafe_request_ids()),
        )
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        // Only the children this topology started.
        self.balancer.take();
        for p in self.instances.iter_mut().filter_map(|i| i.child.as_mut()) {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One site's admission state as an instance's `/status` shows it: the
/// limit, requests in flight at the backend, requests waiting in
/// k2proxy's queue, and the shed level (tiers shed from the bottom).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct SiteState {
    pub limit: u64,
    pub inflight: u64,
    pub queued: u64,
    pub shed_level: f64,
    /// The backend's uncongested latency the adaptive limit learned
    /// (`/status` `learnt`), in ms; `None` for a fixed limit or before the
    /// first window.
    pub baseline_ms: Option<f64>,
    /// The last window's mean latency, in ms; `None` likewise.
    pub latency_ms: Option<f64>,
    /// The latency over which the limit shrinks: its ceiling plus what it
    /// claims because its purchases wait (`learnt.ceiling_ms` +
    /// `learnt.claim.ms`), in ms; `None` likewise. In a fleet, the instance
    /// with the lowest is the one whose share shrinks.
    pub shrinks_over_ms: Option<f64>,
    /// What of it is claimed, in ms (0 when nothing is); `None` likewise.
    pub claim_ms: Option<f64>,
}

/// Each instance's [`SiteState`] at the first cluster's first site, one row
/// per second (`None` where `/status` did not answer).
pub type States = Vec<Vec<Option<SiteState>>>;

/// The first cluster's first site's state at the k2proxy instance whose
/// admin listens at `admin`, from `/status`.
pub async fn site_state(admin: SocketAddr) -> Option<SiteState> {
    let body = http_get(admin, "/status").await?;
    let s: serde_json::Value = serde_json::from_str(&body).ok()?;
    let site = &s["clusters"][0]["sites"][0];
    let learnt = &site["learnt"];
    let claim_ms = learnt["claim"]["ms"].as_f64().unwrap_or(0.0);
    Some(SiteState {
        limit: site["limit"].as_u64()?,
        inflight: site["inflight"].as_u64()?,
        queued: site["queued"].as_u64()?,
        shed_level: site["shed_level"].as_f64()?,
        baseline_ms: learnt["baseline_ms"].as_f64(),
        latency_ms: learnt["latency_ms"].as_f64(),
        shrinks_over_ms: learnt["ceiling_ms"].as_f64().map(|c| c + claim_ms),
        claim_ms: learnt["ceiling_ms"].as_f64().map(|_| claim_ms),
    })
}

/// A minimal GET on loopback; None on any failure.
async fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    http_request(addr, "GET", path).await.map(|(_, body)| body)
}

/// A minimal request without a body on loopback: (status, body); None on
/// any failure.
pub(crate) async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
) -> Option<(u16, String)> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Empty::<bytes::Bytes>::new())
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(2), sender.send_request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}
