//! The log pipeline: a `tracing` dispatcher built from `logging:` that
//! writes one JSON object per line (or human text), to stdout or, in
//! tests, to a buffer. The JSON writer is ours so that access-log fields
//! not known for a request are written as `null` rather than left out:
//! log pipelines then see one stable schema.

use std::fmt::{self, Write as _};
use std::io::{self, Write as _};
use std::sync::{Arc, Mutex};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use super::access_log::ACCESS_TARGET;
use super::batch::{BatchGuard, BatchWriter};
use crate::snapshot::{LogFormat, Logging};

/// Where log lines go.
#[derive(Clone)]
pub enum LogSink {
    /// Standard output, written by a background thread from per-thread
    /// batches ([`super::batch`]), so a request never waits on the log
    /// pipe (lines are dropped, not waited for, if that thread falls
    /// about 8 MiB behind).
    Stdout,
    /// Every line, kept for a test to read.
    Capture(Arc<Mutex<Vec<u8>>>),
}

/// Keeps the background log writer alive; dropping it flushes what is left.
pub type LogGuard = Option<BatchGuard>;

impl LogSink {
    pub fn capture() -> (Self, Arc<Mutex<Vec<u8>>>) {
        let buf = Arc::new(Mutex::new(Vec::new()));
        (LogSink::Capture(buf.clone()), buf)
    }
}

/// A test's log buffer as a writer.
#[derive(Clone)]
pub struct CaptureWriter(Arc<Mutex<Vec<u8>>>);

impl io::Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| io::Error::other("log buffer poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for CaptureWriter {
    type Writer = CaptureWriter;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// The protocol libraries log at warn at most, whatever `SLUICE_LOG` asks
/// for: their debug and trace output describes frames and connections in
/// detail, and no directive may open a way for a credential into a log.
const LIBRARIES: [&str; 5] = ["h2", "hyper", "hyper_util", "rustls", "tokio_rustls"];

/// `directives`, then the caps on [`LIBRARIES`] (the last word on them).
fn with_library_caps(directives: &str) -> String {
    LIBRARIES
        .iter()
        .fold(directives.to_owned(), |mut all, krate| {
            all.push_str(&format!(",{krate}=warn"));
            all
        })
}

/// `directives` without those naming a capped library or one of its
/// modules: a more specific directive (`hyper::proto=trace`) would win
/// over the cap on the crate.
fn without_library_directives(directives: &str) -> String {
    directives
        .split(',')
        .filter(|d| {
            let d = d.trim();
            let target = d.split(['=', '[']).next().unwrap_or_default();
            let krate = target.split("::").next().unwrap_or_default();
            // A span filter enables what happens inside the spans it
            // names, whatever the static caps say; its target matches
            // every target it begins (`h[Connection]` reaches h2's): one
            // that could reach a library's spans goes too.
            let span_in_library =
                d.contains('[') && LIBRARIES.iter().any(|library| library.starts_with(target));
            !LIBRARIES.contains(&krate) && !span_in_library
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The log pipeline of a gateway.
pub struct Log {
    /// Every event goes through it.
    pub dispatch: tracing::Dispatch,
    /// The writer behind `dispatch`, for lines formatted already (the
    /// access log's fast path): they join the same stream in order.
    pub lines: LineWriter,
    /// Whether the access log is on, as `dispatch` filters it. The filter
    /// is fixed at start (`SLUICE_LOG` is read once), so asking once is
    /// exact and spares every request the filter's lookup.
    pub access: bool,
    /// Flushes buffered lines when dropped.
    pub guard: LogGuard,
    /// Lines dropped because the writer thread fell behind (stdout only).
    pub dropped: Option<Dropped>,
}

/// The count of log lines dropped, as `sluice_log_lines_dropped_total`
/// learns it: the writer counts, each scrape adds what is new.
pub struct Dropped {
    counter: BatchWriter,
    /// What the metric has been told so far.
    told: std::sync::atomic::AtomicU64,
}

impl Dropped {
    pub fn new(counter: BatchWriter) -> Self {
        Dropped {
            counter,
            told: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Adds to `metric` the lines dropped since the last call (two
    /// scrapes at once add each line once).
    pub fn tell(&self, metric: &prometheus::IntCounter) {
        let now = self.counter.dropped();
        let before = self
            .told
            .fetch_max(now, std::sync::atomic::Ordering::AcqRel);
        if now > before {
            metric.inc_by(now - before);
        }
    }
}

/// Writes whole lines to where the dispatcher writes.
#[derive(Clone)]
pub enum LineWriter {
    Stdout(BatchWriter),
    /// Standard output, written by the caller (no writer thread).
    Direct,
    Capture(CaptureWriter),
}

impl LineWriter {
    /// Hands the lines every thread has batched to the writer now, so that
    /// an event logged next comes after them (shutdown's).
    pub fn flush(&self) {
        if let LineWriter::Stdout(w) = self {
            w.flush();
        }
    }

    /// Writes one line (with its `\n`); a line the background writer
    /// cannot take is dropped, as the dispatcher's own are.
    pub fn write_line(&self, line: &[u8]) {
        match self {
            LineWriter::Stdout(w) => w.write_line(line, false),
            LineWriter::Direct => {
                let _ = io::stdout().lock().write_all(line);
            }
            LineWriter::Capture(w) => {
                let _ = w.clone().write_all(line);
            }
        }
    }
}

/// Builds the log pipeline for `logging`. `SLUICE_LOG` (an `EnvFilter`
/// directive) overrides the configured level when set.
///
/// The configured level does not silence the access log: every request
/// writes its event whatever the level, as nginx's and Envoy's access
/// logs do not follow their error-log level. Only a `SLUICE_LOG`
/// directive can turn it off.
pub fn build(logging: &Logging, sink: LogSink) -> Log {
    let directives = directives(std::env::var("SLUICE_LOG").ok().as_deref(), &logging.level);
    let filter = EnvFilter::new(with_library_caps(&directives));
    let format = logging.format;
    let mut dropped = None;
    let (dispatch, lines, guard) = match sink {
        LogSink::Stdout => match super::batch::spawn(io::stdout()) {
            Ok((writer, guard)) => {
                dropped = Some(Dropped::new(writer.clone()));
                let lines = LineWriter::Stdout(writer.clone());
                (dispatch_to(writer, filter, format), lines, Some(guard))
            }
            // No thread for the writer (the process is out of them):
            // lines are written as they come rather than lost.
            Err(_) => (
                dispatch_to(io::stdout, filter, format),
                LineWriter::Direct,
                None,
            ),
        },
        LogSink::Capture(buf) => {
            let writer = CaptureWriter(buf);
            let lines = LineWriter::Capture(writer.clone());
            (dispatch_to(writer, filter, format), lines, None)
        }
    };
    let access = tracing::dispatcher::with_default(
        &dispatch,
        || tracing::enabled!(target: ACCESS_TARGET, tracing::Level::INFO),
    );
    Log {
        dispatch,
        lines,
        access,
        guard,
        dropped,
    }
}

/// The filter of `SLUICE_LOG` (`sluice_log`) and the configured `level`.
/// An unset, empty or unusable `SLUICE_LOG` leaves the level (and the
/// access log on); one that names targets only (`sluice::access=off`)
/// keeps the level for every other target rather than silencing them.
fn directives(sluice_log: Option<&str>, level: &str) -> String {
    let access = format!("{ACCESS_TARGET}=info");
    // The libraries' directives go (their caps hold whatever is asked).
    let filter = sluice_log
        .and_then(usable_filter)
        .map(|f| without_library_directives(&f))
        .unwrap_or_default();
    let own: Vec<&str> = filter.split(',').filter(|d| !d.is_empty()).collect();
    let sets_a_level = own
        .iter()
        .any(|d| !d.contains(['=', '[', '{']) && !d.starts_with("sluice"));
    let mut parts: Vec<&str> = Vec::with_capacity(own.len() + 2);
    if !sets_a_level {
        parts.push(level);
        if !filter.contains(ACCESS_TARGET) {
            parts.push(&access);
        }
    }
    parts.extend(own);
    parts.join(",")
}

/// `SLUICE_LOG`'s value as the filter it means, its directives trimmed;
/// `None` when it is empty or no filter sluice would take. A bare word
/// is a target to `EnvFilter`, and every other target goes silent: a
/// level misspelt (`warning`, `verbose`) would turn the whole log off,
/// the errors included. So a bare word must be a level or one of
/// sluice's own targets (`sluice`, `sluice::access`).
pub fn usable_filter(value: &str) -> Option<String> {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let directives: Vec<&str> = value
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    let plain = |d: &str| {
        d.contains(['=', '[', '{'])
            || LEVELS.iter().any(|level| d.eq_ignore_ascii_case(level))
            || d == "sluice"
            || d.starts_with("sluice::")
    };
    if directives.is_empty() || !directives.iter().all(|d| plain(d)) {
        return None;
    }
    let joined = directives.join(",");
    EnvFilter::try_new(&joined).is_ok().then_some(joined)
}

/// A dispatcher writing events that `filter` lets through to `writer`,
/// as `format` says.
fn dispatch_to<W>(writer: W, filter: EnvFilter, format: LogFormat) -> tracing::Dispatch
where
    W: for<'a> MakeWriter<'a> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder.event_format(JsonLines).into(),
        LogFormat::Text => builder.into(),
    }
}

/// The members every JSON line starts with: `{"timestamp":"…","level":"…","target":"…"`.
pub(crate) fn write_line_head(
    out: &mut impl fmt::Write,
    level: &tracing::Level,
    target: &str,
) -> fmt::Result {
    out.write_str("{\"timestamp\":\"")?;
    write_timestamp(out, std::time::SystemTime::now())?;
    out.write_str("\",\"level\":\"")?;
    out.write_str(level.as_str())?;
    out.write_str("\",\"target\":\"")?;
    JsonEscape(out).write_str(target)?;
    out.write_char('"')
}

/// One JSON object per event: `timestamp`, `level`, `target`, the message
/// and every field at the top level.
pub struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        write_line_head(&mut writer, meta.level(), meta.target())?;
        let mut visitor = JsonFields {
            out: &mut writer,
            result: Ok(()),
        };
        event.record(&mut visitor);
        visitor.result?;
        writer.write_str("}\n")
    }
}

struct JsonFields<'a, 'w> {
    out: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl JsonFields<'_, '_> {
    fn key(&mut self, field: &Field) -> fmt::Result {
        self.out.write_char(',')?;
        write_json_str(self.out, field.name())?;
        self.out.write_char(':')
    }

    fn record(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|()| value(self.out));
        }
    }
}

impl Visit for JsonFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record(field, |w| write_json_str(w, value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.record(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.record(field, |w| w.write_str(if value { "true" } else { "false" }));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        if value.is_finite() {
            self.record(field, |w| {
                w.write_str(ryu::Buffer::new().format_finite(value))
            });
        } else {
            self.record(field, |w| w.write_str("null"));
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record(field, |w| {
            w.write_char('"')?;
            write!(JsonEscape(w), "{value:?}")?;
            w.write_char('"')
        });
    }
}

/// Writes `s` as a JSON string literal.
fn write_json_str(w: &mut Writer<'_>, s: &str) -> fmt::Result {
    w.write_char('"')?;
    JsonEscape(w).write_str(s)?;
    w.write_char('"')
}

/// `now` in RFC 3339 UTC with microseconds (`2026-01-02T03:04:05.678901Z`).
/// The part up to the second is formatted once per second per thread:
/// a busy gateway writes thousands of lines within each second.
fn write_timestamp(out: &mut impl fmt::Write, now: std::time::SystemTime) -> fmt::Result {
    thread_local! {
        static SECOND: std::cell::Cell<(u64, [u8; 19])> = const { std::cell::Cell::new((u64::MAX, [0; 19])) };
    }
    // humantime refuses times before 1970 (a clock that broken is
    // logged as the epoch).
    let since_epoch = now
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since_epoch.as_secs();
    let (cached, mut head) = SECOND.get();
    if cached != secs {
        let whole = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
        // humantime fails past year 9999 (as the line then does).
        let mut text = String::with_capacity(20);
        write!(text, "{}", humantime::format_rfc3339_seconds(whole))?;
        head = text
            .as_bytes()
            .get(..19)
            .and_then(|h| <[u8; 19]>::try_from(h).ok())
            .ok_or(fmt::Error)?;
        SECOND.set((secs, head));
    }
    // The head is ASCII digits and separators from humantime.
    out.write_str(std::str::from_utf8(&head).map_err(|_| fmt::Error)?)?;
    out.write_char('.')?;
    let micros = since_epoch.subsec_micros();
    let mut digits = [b'0'; 6];
    let mut rest = micros;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    out.write_str(std::str::from_utf8(&digits).map_err(|_| fmt::Error)?)?;
    out.write_char('Z')
}

/// Whether `s` holds a byte JSON needs escaped: a control character, `"`
/// or `\`. Eight bytes at a time: most log values need nothing.
fn needs_escape(s: &[u8]) -> bool {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    // Exact as a yes/no: some byte of `x` is below `n` (n <= 128).
    let any_below = |x: u64, n: u8| x.wrapping_sub(ONES * u64::from(n)) & !x & HIGHS != 0;
    let any_equal = |x: u64, b: u8| any_below(x ^ (ONES * u64::from(b)), 1);
    let mut chunks = s.chunks_exact(8);
    for chunk in &mut chunks {
        let Ok(word) = <[u8; 8]>::try_from(chunk) else {
            return true;
        };
        let x = u64::from_le_bytes(word);
        if any_below(x, 0x20) || any_equal(x, b'"') || any_equal(x, b'\\') {
            return true;
        }
    }
    chunks
        .remainder()
        .iter()
        .any(|&b| b < 0x20 || b == b'"' || b == b'\\')
}

/// Escapes what is written through it as the inside of a JSON string, so
/// `Display`/`Debug` values are written without an intermediate `String`.
pub(crate) struct JsonEscape<'a, W: fmt::Write>(pub(crate) &'a mut W);

impl<W: fmt::Write> fmt::Write for JsonEscape<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Most values need no escaping: one scan, one write.
        if !needs_escape(s.as_bytes()) {
            return self.0.write_str(s);
        }
        let mut start = 0;
        for (i, b) in s.bytes().enumerate() {
            let escape = match b {
                b'"' => "\\\"",
                b'\\' => "\\\\",
                b'\n' => "\\n",
                b'\r' => "\\r",
                b'\t' => "\\t",
                b if b < 0x20 => {
                    self.0.write_str(&s[start..i])?;
                    write!(self.0, "\\u{:04x}", b)?;
                    start = i + 1;
                    continue;
                }
                _ => continue,
            };
            self.0.write_str(&s[start..i])?;
            self.0.write_str(escape)?;
            start = i + 1;
        }
        self.0.write_str(&s[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_directives_keep_the_level_for_the_rest() {
        assert_eq!(directives(None, "info"), "info,sluice::access=info");
        assert_eq!(
            directives(Some("warning"), "warn"),
            "warn,sluice::access=info"
        );
        assert_eq!(directives(Some("debug"), "info"), "debug");
        assert_eq!(
            directives(Some("sluice::access=off"), "info"),
            "info,sluice::access=off"
        );
        assert_eq!(
            directives(Some("sluice::proxy=debug"), "warn"),
            "warn,sluice::access=info,sluice::proxy=debug"
        );
        // Only library directives, which go: the level alone stays.
        assert_eq!(
            directives(Some("h2=debug"), "info"),
            "info,sluice::access=info"
        );
    }

    #[test]
    fn a_misspelt_level_is_no_filter() {
        for unusable in [
            "",
            " , ",
            "warning",
            "verbose",
            "1",
            "all",
            "hyper",
            "x=[",
            "info,warnings",
        ] {
            assert_eq!(usable_filter(unusable), None, "{unusable:?}");
        }
        for (value, filter) in [
            (" info", "info"),
            ("WARN", "WARN"),
            ("sluice=debug, warn", "sluice=debug,warn"),
            ("sluice::access=off", "sluice::access=off"),
            ("sluice", "sluice"),
            ("hyper=debug", "hyper=debug"),
        ] {
            assert_eq!(usable_filter(value).as_deref(), Some(filter), "{value:?}");
        }
    }

    /// A stdout that takes nothing until it is let go.
    struct Stuck(std::sync::mpsc::Receiver<()>);

    impl io::Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _ = self.0.recv();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_the_writer_drops_are_counted_once_each() {
        let (release, stuck) = std::sync::mpsc::channel();
        let (writer, guard) = super::super::batch::spawn(Stuck(stuck)).unwrap();
        let dropped = Dropped::new(writer.clone());
        let lines = LineWriter::Stdout(writer);
        let line = [vec![b'x'; 1023], b"\n".to_vec()].concat();
        for _ in 0..20_000 {
            lines.write_line(&line);
        }
        let metric = prometheus::IntCounter::new("t", "t").unwrap();
        dropped.tell(&metric);
        let counted = metric.get();
        assert!(counted > 0, "a stuck writer drops lines");
        assert_eq!(counted % 32, 0, "whole batches of 32 lines: {counted}");
        // A second scrape adds nothing new.
        dropped.tell(&metric);
        assert_eq!(metric.get(), counted);
        drop(release);
        drop(guard);
    }

    #[test]
    fn needs_escape_finds_every_byte_json_escapes() {
        for len in 0..20 {
            assert!(!needs_escape(&vec![b'a'; len]));
            for at in 0..len {
                for b in (0u8..0x20).chain([b'"', b'\\']) {
                    let mut s = vec![b'a'; len];
                    s[at] = b;
                    assert!(needs_escape(&s), "byte {b:#x} at {at} of {len}");
                }
            }
        }
        // Bytes just around the ones escaped, and non-ASCII text, are not.
        let plain: Vec<u8> = (0x20u8..=0xff)
            .filter(|b| *b != b'"' && *b != b'\\')
            .collect();
        assert!(!needs_escape(&plain));
        assert!(!needs_escape("é€😀 ~\x7f".as_bytes()));
    }

    #[test]
    fn timestamps_are_rfc3339_with_microseconds() {
        let at = |secs: u64, micros: u32| {
            let t = std::time::UNIX_EPOCH
                + std::time::Duration::from_secs(secs)
                + std::time::Duration::from_micros(u64::from(micros));
            let mut s = String::new();
            write_timestamp(&mut s, t).unwrap();
            s
        };
        assert_eq!(at(1_767_323_045, 678_901), "2026-01-02T03:04:05.678901Z");
        // Same second (cached head), other micros; then the next second.
        assert_eq!(at(1_767_323_045, 7), "2026-01-02T03:04:05.000007Z");
        assert_eq!(at(1_767_323_046, 0), "2026-01-02T03:04:06.000000Z");
        // Past year 9999 humantime fails, and so does the line (no panic).
        let mut s = String::new();
        let far = std::time::UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_800);
        assert!(write_timestamp(&mut s, far).is_err());
        // Before 1970: the epoch.
        let before = std::time::UNIX_EPOCH - std::time::Duration::from_secs(5);
        let mut s = String::new();
        write_timestamp(&mut s, before).unwrap();
        assert_eq!(s, "1970-01-01T00:00:00.000000Z");
        // The same text as humantime writes.
        let now = std::time::SystemTime::now();
        let mut ours = String::new();
        write_timestamp(&mut ours, now).unwrap();
        assert_eq!(ours, humantime::format_rfc3339_micros(now).to_string());
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut s = String::new();
        write_json_str(&mut Writer::new(&mut s), "a\"b\\c\nd\u{1}é").unwrap();
        assert_eq!(s, r#""a\"b\\c\nd\u0001é""#);
        let parsed: String = serde_json::from_str(&s).unwrap();
        assert_eq!(parsed, "a\"b\\c\nd\u{1}é");
    }

    /// `SLUICE_LOG` cannot lift the caps on the protocol libraries.
    #[test]
    fn library_caps_hold_over_any_directive() {
        let asked = "trace,hyper=trace,hyper::proto=trace,h2::codec=debug,rustls::conn[x]=trace,[Connection]=trace,h[Connection]=trace,hy[Conn]=debug";
        let filter = EnvFilter::new(with_library_caps(&without_library_directives(asked)));
        let buf = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(CaptureWriter(buf.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(target: "hyper::proto::h1", "hyper detail");
            tracing::trace!(target: "h2::codec", "h2 detail");
            tracing::trace!(target: "rustls::conn", "rustls detail");
            let span = tracing::error_span!(target: "h2::proto", "Connection");
            span.in_scope(|| tracing::trace!(target: "h2::proto", "h2 span detail"));
            tracing::warn!(target: "hyper::client", "hyper warning");
            tracing::trace!(target: "sluice::proxy", "sluice detail");
        });
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        assert!(
            !text.contains("hyper detail")
                && !text.contains("h2 detail")
                && !text.contains("h2 span detail"),
            "{text}"
        );
        assert!(
            text.contains("hyper warning") && text.contains("sluice detail"),
            "{text}"
        );
    }

    /// The configured level filters sluice's own events but never the
    /// access log.
    #[test]
    fn the_level_spares_the_access_log() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let logging = Logging {
            level: "error".into(),
            format: LogFormat::Json,
            log_bodies: false,
            known_secrets: Default::default(),
            scrub: Default::default(),
        };
        let log = build(&logging, LogSink::Capture(buf.clone()));
        tracing::dispatcher::with_default(&log.dispatch, || {
            tracing::info!(target: ACCESS_TARGET, "request");
            tracing::info!(target: "sluice::reload", "config reloaded");
            tracing::warn!(target: "sluice::budget", "budget_alert");
            tracing::error!(target: "sluice::server", "cannot bind");
        });
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        let messages: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| v["message"].as_str().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(messages, ["request", "cannot bind"], "{text}");
    }
}
