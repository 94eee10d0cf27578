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
            // Idle, it sleeps until a first line (or the exit) wakes it: no wake-ups when
            // nothing is logged.
            while p.buf.is_empty() && !p.closed {
                p = shared.wake.wait(p).unwrap_or_else(|e| e.into_inner());
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

type SetFilter = dyn Fn(&str) -> Result<(), String> + Send + Sync;

/// Reads and changes the log filter of the running process (the admin API's `/logging`).
#[derive(Clone)]
pub struct LogControl {
    current: Arc<dyn Fn() -> String + Send + Sync>,
    set: Arc<SetFilter>,
}

impl LogControl {
    /// The filter in force, in `RUST_LOG` syntax.
    pub fn current(&self) -> String {
        (self.current)()
    }

    /// Replaces the filter (`RUST_LOG` syntax: `debug`, `info,mesh_agent::hbone=trace`, ...).
    pub fn set(&self, filter: &str) -> Result<(), String> {
        (self.set)(filter)
    }

    /// A control for a process without a reloadable filter (tests).
    pub fn fixed(filter: &str) -> Self {
        let filter = filter.to_owned();
        Self {
            current: Arc::new(move || filter.clone()),
            set: Arc::new(|_| Err("this process cannot change its log filter".into())),
        }
    }
}

/// How log lines look.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable text.
    Text,
    /// One JSON object per line.
    Json,
    /// One `key=value` line per event (logfmt).
    Logfmt,
}

/// Installs the global subscriber: `filter` (RUST_LOG syntax), `format`, batched stderr.
pub fn init(filter: &str, format: LogFormat) -> (LogControl, FlushGuard) {
    use tracing_subscriber::{EnvFilter, layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let (writer, guard) = BatchedStderr::start();
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    // Colours only for a terminal: log files and collectors get plain `key=value` text (and
    // the formatting is cheaper: the access log is written per request by waypoints).
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry.with(fmt).init(),
        LogFormat::Json => registry.with(fmt.json()).init(),
        LogFormat::Logfmt => registry.with(fmt.event_format(Logfmt)).init(),
    }
    let read = handle.clone();
    let control = LogControl {
        current: Arc::new(move || {
            read.with_current(|f| f.to_string())
                .unwrap_or_else(|e| format!("unavailable: {e}"))
        }),
        set: Arc::new(move |text| {
            let new = EnvFilter::try_new(text).map_err(|e| format!("{text:?}: {e}"))?;
            handle.reload(new).map_err(|e| e.to_string())
        }),
    };
    (control, guard)
}

/// logfmt: `ts=… level=… target=… msg="…" key=value …`, values quoted when they need it.
pub struct Logfmt;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for Logfmt
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let meta = event.metadata();
        let now = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        write!(
            writer,
            "ts={now} level={} target={}",
            meta.level().as_str().to_ascii_lowercase(),
            meta.target()
        )?;
        let mut visitor = LogfmtFields::default();
        event.record(&mut visitor);
        if let Some(msg) = &visitor.message {
            write!(writer, " msg={}", logfmt_value(msg))?;
        }
        for (k, v) in &visitor.fields {
            write!(writer, " {k}={}", logfmt_value(v))?;
        }
        writeln!(writer)
    }
}

#[derive(Default)]
struct LogfmtFields {
    message: Option<String>,
    fields: Vec<(&'static str, String)>,
}

impl tracing::field::Visit for LogfmtFields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.push(field, value.to_owned());
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.push(field, format!("{value:?}"));
    }
}

impl LogfmtFields {
    fn push(&mut self, field: &tracing::field::Field, value: String) {
        if field.name() == "message" {
            self.message = Some(value);
        } else {
            self.fields.push((field.name(), value));
        }
    }
}

/// A logfmt value: bare if it has no space, quote, `=` or control character, else quoted.
fn logfmt_value(v: &str) -> String {
    let bare = !v.is_empty()
        && !v
            .chars()
            .any(|c| c == ' ' || c == '"' || c == '=' || c == '\\' || c.is_control());
    if bare { v.to_owned() } else { format!("{v:?}") }
}

#[cfg(test)]
mod logfmt_tests {
    #[test]
    fn values_are_bare_or_quoted_as_logfmt_wants() {
        assert_eq!(super::logfmt_value("10.0.0.1:80"), "10.0.0.1:80");
        assert_eq!(super::logfmt_value("two words"), "\"two words\"");
        assert_eq!(super::logfmt_value("a=b"), "\"a=b\"");
        assert_eq!(super::logfmt_value(""), "\"\"");
        assert_eq!(super::logfmt_value("say \"hi\""), "\"say \\\"hi\\\"\"");
    }
}
