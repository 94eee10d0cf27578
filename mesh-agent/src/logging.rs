//! Where log lines (access logs included) go: stderr, written in batches by a background thread.
//!
//! A connection task only appends its line to a shared buffer (a lock and a copy), so it never
//! waits for stderr, and a stalled log reader never stalls the data path: beyond
//! [`MAX_PENDING`] bytes lines are dropped and counted, and the count is reported in the log.
//! A channel-per-line writer (tracing-appender's) wakes its writer thread for every line; at
//! thousands of connections per second that wake-up (a futex and a context switch per line) cost
//! more CPU than the line itself, so lines are collected for [`FLUSH_INTERVAL`] instead.
use std::{
    io::Write,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

/// How long lines wait before they are written (unless the buffer fills up first).
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(20);
/// Buffered bytes beyond which new lines are dropped.
pub const MAX_PENDING: usize = 4 << 20;
/// Buffered bytes at which the writer is woken early.
const EAGER_FLUSH: usize = 256 << 10;

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    wake: Condvar,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    closed: bool,
}

/// The `MakeWriter` for tracing-subscriber: cheap to clone, one per process.
#[derive(Clone)]
pub struct BatchedStderr {
    shared: Arc<Shared>,
}

/// Flushes what is pending and stops the writer thread when dropped (keep it alive in `main`).
pub struct FlushGuard {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BatchedStderr {
    /// Starts the writer thread.
    pub fn start() -> (Self, FlushGuard) {
        Self::start_with(Box::new(std::io::stderr()))
    }

    fn start_with(mut out: Box<dyn Write + Send>) -> (Self, FlushGuard) {
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("mesh-log".into())
                .spawn(move || writer_loop(&shared, &mut *out))
                .expect("spawning the log writer thread")
        };
        (
            Self {
                shared: Arc::clone(&shared),
            },
            FlushGuard {
                shared,
                thread: Some(thread),
            },
        )
    }
}

fn writer_loop(shared: &Shared, out: &mut dyn Write) {
    let mut batch = Vec::new();
    loop {
        let closed = {
            let mut p = shared.pending.lock().unwrap_or_else(|e| e.into_inner());
            if p.buf.is_empty() && !p.closed {
                p = shared
                    .wake
                    .wait_timeout(p, FLUSH_INTERVAL)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            std::mem::swap(&mut batch, &mut p.buf);
            p.closed
        };
        let dropped = shared.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(
                out,
                "mesh-agent: {dropped} log lines dropped (log reader too slow)"
            );
        }
        if !batch.is_empty() {
            let _ = out.write_all(&batch);
            let _ = out.flush();
            batch.clear();
        }
        if closed {
            return;
        }
        // Lines arriving now wait for the next batch: one write per interval, not per line.
        std::thread::sleep(FLUSH_INTERVAL);
    }
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .closed = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One log line being formatted (tracing-subscriber writes a line in several calls).
pub struct LineWriter {
    shared: Arc<Shared>,
    line: Vec<u8>,
}

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.line.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if self.line.is_empty() {
            return;
        }
        let mut p = self
            .shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if p.buf.len() + self.line.len() > MAX_PENDING {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let was_empty = p.buf.is_empty();
        p.buf.extend_from_slice(&self.line);
        let eager = p.buf.len() >= EAGER_FLUSH;
        drop(p);
        // The writer sleeps on the condvar only when nothing is pending; a first line wakes it
        // (it then waits out the interval), a full buffer wakes it early.
        if was_empty || eager {
            self.shared.wake.notify_one();
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchedStderr {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter {
            shared: Arc::clone(&self.shared),
            line: Vec::with_capacity(256),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_whole_in_order_and_the_guard_flushes_the_rest() {
        let sink = Sink::default();
        let (w, guard) = BatchedStderr::start_with(Box::new(sink.clone()));
        for i in 0..1000 {
            let mut line = tracing_subscriber::fmt::MakeWriter::make_writer(&w);
            write!(line, "line {i} ").unwrap();
            writeln!(line, "end").unwrap();
        }
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 1000);
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(*l, format!("line {i} end"));
        }
    }

    #[test]
    fn a_full_buffer_drops_lines_and_says_so() {
        // A writer that blocks until released: the reader is stuck.
        struct Stuck(Arc<(Mutex<bool>, Condvar)>, Sink);
        impl Write for Stuck {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                let (m, c) = &*self.0;
                let mut go = m.lock().unwrap();
                while !*go {
                    go = c.wait(go).unwrap();
                }
                self.1.write(buf)
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let sink = Sink::default();
        let (w, guard) =
            BatchedStderr::start_with(Box::new(Stuck(Arc::clone(&gate), sink.clone())));
        let line = vec![b'x'; 1023];
        let total = 2 * MAX_PENDING / 1024;
        for _ in 0..total {
            let mut l = tracing_subscriber::fmt::MakeWriter::make_writer(&w);
            l.write_all(&line).unwrap();
            l.write_all(b"\n").unwrap();
        }
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        drop(guard);
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        let kept = text.lines().filter(|l| l.starts_with('x')).count();
        assert!(
            kept < total && kept >= MAX_PENDING / 1024 - 1,
            "{kept} of {total}"
        );
        assert!(text.contains("log lines dropped"), "the drop is reported");
    }
}
