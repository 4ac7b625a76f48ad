//! Standard process metrics (the names Prometheus client libraries use),
//! read from `/proc/self` on each scrape: `process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
//! `process_open_fds`, `process_max_fds`, `process_threads`,
//! `process_start_time_seconds`. On a system without `/proc` they stay 0.

use prometheus::{Gauge, IntGauge, Registry};

/// Clock ticks per second and page size of Linux on the platforms we build
/// for (`getconf CLK_TCK`, `getconf PAGESIZE`).
const CLK_TCK: f64 = 100.0;
const PAGE_SIZE: i64 = 4096;

pub struct ProcessMetrics {
    cpu: Gauge,
    rss: IntGauge,
    vsize: IntGauge,
    open_fds: IntGauge,
    max_fds: IntGauge,
    threads: IntGauge,
    start_time: Gauge,
}

impl ProcessMetrics {
    pub fn register(registry: &Registry) -> ProcessMetrics {
        let g = |name: &str, help: &str| {
            let m = Gauge::new(name, help).expect("static metric definition");
            registry
                .register(Box::new(m.clone()))
                .expect("registered once");
            m
        };
        let i = |name: &str, help: &str| {
            let m = IntGauge::new(name, help).expect("static metric definition");
            registry
                .register(Box::new(m.clone()))
                .expect("registered once");
            m
        };
        let p = ProcessMetrics {
            cpu: g(
                "process_cpu_seconds_total",
                "Total user and system CPU time spent in seconds.",
            ),
            rss: i(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
            ),
            vsize: i(
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes.",
            ),
            open_fds: i("process_open_fds", "Number of open file descriptors."),
            max_fds: i(
                "process_max_fds",
                "Maximum number of open file descriptors.",
            ),
            threads: i("process_threads", "Number of OS threads in the process."),
            start_time: g(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
            ),
        };
        p.refresh();
        p
    }

    /// Reads `/proc/self` and updates every metric.
    pub fn refresh(&self) {
        if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
            // Fields after the parenthesised command name, which may hold spaces.
            let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
            let f: Vec<&str> = rest.split_whitespace().collect();
            let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            // After ')': state=0, utime=11, stime=12, num_threads=17, starttime=19, vsize=20, rss=21.
            self.cpu.set((num(11) + num(12)) / CLK_TCK);
            self.threads.set(num(17) as i64);
            self.vsize.set(num(20) as i64);
            self.rss.set(num(21) as i64 * PAGE_SIZE);
            if let Some(btime) = boot_time() {
                self.start_time.set(btime + num(19) / CLK_TCK);
            }
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.open_fds.set(dir.count() as i64);
        }
        self.max_fds
            .set(open_file_limit().map_or(0, |n| n.min(i64::MAX as u64) as i64));
    }
}

/// The process's soft limit on open files (`ulimit -n`); `None` when
/// unlimited or unknown.
pub(crate) fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())
}
