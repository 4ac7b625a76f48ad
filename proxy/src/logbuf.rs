//! Where log lines go: off the request path.
//!
//! A request thread formats its access-log line (tracing's fmt layer) and
//! appends it to a shared buffer under a lock held for a copy; a writer
//! thread writes the buffer to stderr every [`FLUSH_EVERY`], or sooner once
//! it holds [`FLUSH_AT`] bytes. A request never waits for I/O: with
//! [`MAX_PENDING`] bytes not yet written (stderr blocked, a slow pipe), a
//! line is dropped and counted in [`DROPPED`] (`k2_log_lines_dropped_total`)
//! instead. The log goes to stderr or to a file (`k2proxy run --log-file`),
//! reopened on SIGUSR1 as logrotate expects. Writing every line with its own `write(2)` under stderr's lock
//! took 40% of k2proxy's throughput (docs/benchmarks.md, "Access log").

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How long a line may wait in the buffer.
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// A buffer this full is written at once.
const FLUSH_AT: usize = 256 * 1024;
/// Unwritten bytes past which lines are dropped.
const MAX_PENDING: usize = 8 * 1024 * 1024;

/// Lines dropped because the writer could not keep up, since start.
pub static DROPPED: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Default)]
struct Shared {
    pending: Mutex<Vec<u8>>,
    wake: Condvar,
    closing: AtomicBool,
}

/// The `MakeWriter` given to tracing: every event is one `write`.
#[derive(Debug, Clone)]
pub struct LogWriter(Arc<Shared>);

impl Write for LogWriter {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        let mut pending = self.0.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() + line.len() > MAX_PENDING {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            return Ok(line.len());
        }
        pending.extend_from_slice(line);
        if pending.len() >= FLUSH_AT {
            self.0.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        self.clone()
    }
}

/// Writes what is left and stops the writer thread when dropped (before
/// the process exits).
#[derive(Debug)]
pub struct Guard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Where the log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stderr,
    /// Appended to; reopened on SIGUSR1 (after logrotate moved it).
    File(PathBuf),
}

fn open(path: &Path) -> std::io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// A writer to `output` and the guard of its thread; a file that cannot be
/// opened is an error that names it.
pub fn writer(output: Output) -> Result<(LogWriter, Guard), String> {
    match output {
        Output::Stderr => Ok(writer_to(std::io::stderr(), None)),
        Output::File(path) => {
            let file = open(&path)
                .map_err(|e| format!("cannot open the log file {}: {e}", path.display()))?;
            let reopen = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(signal_hook::consts::SIGUSR1, reopen.clone())
                .map_err(|e| format!("cannot handle SIGUSR1 (log reopening): {e}"))?;
            Ok(writer_to(file, Some((path, reopen))))
        }
    }
}

/// The writer thread for `out`; with a path, the file is reopened when the
/// flag is set (checked at every flush, so within [`FLUSH_EVERY`]).
fn writer_to(
    out: impl Write + Send + 'static,
    reopen: Option<(PathBuf, Arc<AtomicBool>)>,
) -> (LogWriter, Guard) {
    let shared = Arc::new(Shared::default());
    let s = shared.clone();
    let mut out: Box<dyn Write + Send> = Box::new(out);
    let thread = std::thread::Builder::new()
        .name("k2proxy-log".into())
        .spawn(move || {
            let mut batch = Vec::with_capacity(FLUSH_AT);
            loop {
                {
                    let pending = s.pending.lock().unwrap_or_else(|p| p.into_inner());
                    let (mut pending, _) = s
                        .wake
                        .wait_timeout_while(pending, FLUSH_EVERY, |p| {
                            p.len() < FLUSH_AT && !s.closing.load(Ordering::Acquire)
                        })
                        .unwrap_or_else(|p| p.into_inner());
                    std::mem::swap(&mut *pending, &mut batch);
                }
                if let Some((path, flag)) = &reopen {
                    if flag.swap(false, Ordering::AcqRel) {
                        match open(path) {
                            Ok(f) => out = Box::new(f),
                            Err(e) => eprintln!(
                                "k2proxy: cannot reopen the log file {}: {e}; still writing to the old one",
                                path.display()
                            ),
                        }
                    }
                }
                if !batch.is_empty() {
                    let _ = out.write_all(&batch).and_then(|()| out.flush());
                    batch.clear();
                }
                if s.closing.load(Ordering::Acquire)
                    && s.pending.lock().map(|p| p.is_empty()).unwrap_or(true)
                {
                    return;
                }
            }
        })
        .expect("spawning the log writer thread");
    (
        LogWriter(shared.clone()),
        Guard {
            shared,
            thread: Some(thread),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `Write` that collects into a shared Vec.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_in_order_soon_and_all_by_the_guard() {
        let sink = Sink::default();
        let (mut w, guard) = writer_to(sink.clone(), None);
        w.write_all(b"one\n").unwrap();
        std::thread::sleep(FLUSH_EVERY * 4);
        assert_eq!(
            &*sink.0.lock().unwrap(),
            b"one\n",
            "written within the flush period"
        );
        for i in 0..1000 {
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1001);
        assert!(text.ends_with("line 999\n"));
    }

    /// A writer that never returns: lines past the bound are dropped and
    /// counted, and the request side never blocks.
    #[test]
    fn a_stuck_output_drops_and_counts_lines_without_blocking() {
        struct Stuck;
        impl Write for Stuck {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                std::thread::sleep(Duration::from_secs(3600));
                Ok(0)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let (mut w, guard) = writer_to(Stuck, None);
        let before = DROPPED.load(Ordering::Relaxed);
        let line = vec![b'x'; 1024];
        let start = std::time::Instant::now();
        for _ in 0..(3 * MAX_PENDING / 1024) {
            w.write_all(&line).unwrap();
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "a request waited for the log"
        );
        assert!(DROPPED.load(Ordering::Relaxed) - before >= (MAX_PENDING / 1024) as u64);
        std::mem::forget(guard); // its thread is stuck on purpose
    }
}
