//! Log lines batched per thread and written out by one background thread.
//! A request appends its access-log line to its own thread's batch: no
//! allocation, no hand-off and no wake-up of another thread per line, and
//! nothing on the way to its response's last bytes. A batch goes to the
//! writer when it fills, when any other event is logged on its thread
//! (that event comes right after the lines before it), and at least every
//! [`FLUSH_EVERY`] from the writer's own sweep, as nginx's `access_log
//! … buffer= flush=` and Envoy's access-log flush interval do.

use std::cell::RefCell;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError, Weak};
use std::time::{Duration, Instant};

use tracing_subscriber::fmt::MakeWriter;

/// A thread's batch is handed over before it would hold more than this.
/// Each hand-over wakes the writer, which takes the core from requests
/// where the two share one (a pinned sidecar): at 50,000 req/s, 32 KiB
/// batches woke it 1,400 times a second and cost 3% of throughput.
const BATCH_BYTES: usize = 256 * 1024;
/// Log waiting for the writer, in bytes and in messages (most events go
/// alone). Beyond either, what comes is dropped and its lines counted: a
/// stuck stdout must never stall requests.
const QUEUED_BYTES: usize = 8 * 1024 * 1024;
const QUEUED: usize = 4096;
/// The longest a line waits in a batch.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// How long the guard waits for the writer at exit.
const EXIT_WAIT: Duration = Duration::from_secs(1);

struct Batch {
    bytes: Vec<u8>,
    lines: u64,
}

/// A lock taken whatever a panic elsewhere left: a log buffer stays
/// usable.
fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Batch {
    fn new() -> Self {
        Batch {
            bytes: Vec::with_capacity(BATCH_BYTES),
            lines: 0,
        }
    }

    /// What the batch holds. A full batch hands over its buffer itself
    /// (and starts a new one): copying every byte logged once more would
    /// cost more than the allocation. Less than half a batch (an event
    /// alone, a sweep of a quiet thread) goes as a copy of its own size,
    /// so that the queue does not hold a batch's worth for each.
    fn take(&mut self) -> Option<(Vec<u8>, u64)> {
        if self.lines == 0 {
            return None;
        }
        let bytes = if self.bytes.len() >= BATCH_BYTES / 2 {
            std::mem::replace(&mut self.bytes, Vec::with_capacity(BATCH_BYTES))
        } else {
            let copy = self.bytes.clone();
            self.bytes.clear();
            copy
        };
        if self.bytes.capacity() > 2 * BATCH_BYTES {
            // Grown by a rare long line (logged bodies): given back.
            self.bytes.shrink_to(BATCH_BYTES);
        }
        Some((bytes, std::mem::take(&mut self.lines)))
    }
}

enum Message {
    Lines { bytes: Vec<u8>, lines: u64 },
    Exit,
}

impl Message {
    /// Its bytes and lines, as the queue counts them.
    fn size(&self) -> (usize, u64) {
        match self {
            Message::Lines { bytes, lines } => (bytes.len(), *lines),
            Message::Exit => (0, 0),
        }
    }
}

struct Shared {
    queue: SyncSender<Message>,
    /// Bytes sent and not written yet.
    queued_bytes: AtomicUsize,
    /// Lines dropped because the queue was full, or stdout failed.
    dropped: AtomicU64,
    /// Every thread's batch, for the sweeps. A thread holds the only
    /// strong reference to its own.
    batches: Mutex<Vec<Weak<Mutex<Batch>>>>,
}

impl Shared {
    fn send(&self, bytes: Vec<u8>, lines: u64) {
        self.send_by(Message::Lines { bytes, lines }, None);
    }

    /// Sends, or drops and counts when the queue is full; with `until`,
    /// waits for room until then (at exit, when nothing else waits).
    fn send_by(&self, mut message: Message, until: Option<Instant>) {
        let (len, lines) = message.size();
        loop {
            // Counted in before it is sent: the writer may count it out
            // as soon as it is.
            let before = self.queued_bytes.fetch_add(len, Ordering::Relaxed);
            let sent = if before + len <= QUEUED_BYTES {
                self.queue.try_send(message)
            } else {
                Err(TrySendError::Full(message))
            };
            if sent.is_err() {
                self.queued_bytes.fetch_sub(len, Ordering::Relaxed);
            }
            match sent {
                Ok(()) => return,
                Err(TrySendError::Full(back)) if until.is_some_and(|u| Instant::now() < u) => {
                    message = back;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    self.dropped.fetch_add(lines, Ordering::Relaxed);
                    return;
                }
            }
        }
    }

    /// Writes what the writer received, counting it out of the queue.
    fn write(&self, out: &mut impl Write, bytes: &[u8], lines: u64) {
        self.queued_bytes.fetch_sub(bytes.len(), Ordering::Relaxed);
        if out.write_all(bytes).is_err() {
            // A closed or failing stdout: lost, and counted as lost.
            self.dropped.fetch_add(lines, Ordering::Relaxed);
        }
    }

    /// Hands every thread's batch, in turn, to `to` (which sends it).
    /// With `skip_busy`, a batch whose lock is held (its thread appending,
    /// or the exit waiting for room) is left for the next sweep.
    fn sweep(&self, skip_busy: bool, mut to: impl FnMut(Vec<u8>, u64)) {
        let live: Vec<Arc<Mutex<Batch>>> = {
            let mut batches = locked(&self.batches);
            batches.retain(|batch| batch.strong_count() > 0);
            batches.iter().filter_map(Weak::upgrade).collect()
        };
        for batch in live {
            // Handed over under the batch's lock, as its thread hands over
            // a full batch: a thread's batches enter the queue in order.
            let mut batch = match batch.try_lock() {
                Ok(batch) => batch,
                Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
                Err(TryLockError::WouldBlock) if skip_busy => continue,
                Err(TryLockError::WouldBlock) => locked(&batch),
            };
            if let Some((bytes, lines)) = batch.take() {
                to(bytes, lines);
            }
        }
    }
}

/// Where log lines are written: cloned into every logging place.
#[derive(Clone)]
pub struct BatchWriter {
    shared: Arc<Shared>,
}

/// This thread's batch for each writer it has written to (one, in
/// practice); what is left in them goes out when the thread ends.
struct ThreadBatches(Vec<(Weak<Shared>, Arc<Mutex<Batch>>)>);

impl Drop for ThreadBatches {
    fn drop(&mut self) {
        for (shared, batch) in &self.0 {
            let taken = locked(batch).take();
            if let (Some(shared), Some((bytes, lines))) = (shared.upgrade(), taken) {
                shared.send(bytes, lines);
            }
        }
    }
}

thread_local! {
    static THREAD_BATCHES: RefCell<ThreadBatches> = const { RefCell::new(ThreadBatches(Vec::new())) };
}

impl BatchWriter {
    /// Appends one whole line (with its `\n`) to this thread's batch;
    /// `now` hands the batch over at once (an event other than an
    /// access-log line).
    pub fn write_line(&self, line: &[u8], now: bool) {
        let appended = THREAD_BATCHES.try_with(|mine| {
            let Ok(mut mine) = mine.try_borrow_mut() else {
                return false;
            };
            let mut batch = locked(self.batch_in(&mut mine));
            // Handed over under the lock: see `Shared::sweep`.
            if batch.bytes.len() + line.len() > BATCH_BYTES
                && let Some((bytes, lines)) = batch.take()
            {
                self.shared.send(bytes, lines);
            }
            batch.bytes.extend_from_slice(line);
            batch.lines += 1;
            if now && let Some((bytes, lines)) = batch.take() {
                self.shared.send(bytes, lines);
            }
            true
        });
        // A thread ending (its batches gone) writes its last lines alone.
        if !matches!(appended, Ok(true)) {
            self.shared.send(line.to_vec(), 1);
        }
    }

    /// This writer's batch among a thread's, made on its first line.
    fn batch_in<'t>(&self, mine: &'t mut ThreadBatches) -> &'t Mutex<Batch> {
        let ours = |shared: &Weak<Shared>| std::ptr::eq(shared.as_ptr(), Arc::as_ptr(&self.shared));
        let at = match mine.0.iter().position(|(shared, _)| ours(shared)) {
            Some(at) => at,
            None => {
                mine.0.retain(|(shared, _)| shared.strong_count() > 0);
                let batch = Arc::new(Mutex::new(Batch::new()));
                locked(&self.shared.batches).push(Arc::downgrade(&batch));
                mine.0.push((Arc::downgrade(&self.shared), batch));
                mine.0.len() - 1
            }
        };
        &mine.0[at].1
    }

    /// Hands every thread's batch to the writer now (before an event
    /// that should come after them, such as the last ones at shutdown).
    pub fn flush(&self) {
        self.shared
            .sweep(false, |bytes, lines| self.shared.send(bytes, lines));
    }

    /// Lines dropped so far because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

/// Flushes every batch and lets the writer finish when dropped (waiting
/// a bounded time: a stuck stdout does not hold up the exit).
pub struct BatchGuard {
    shared: Arc<Shared>,
    /// In a mutex only to be `Sync` (the gateway holding it is shared).
    finished: Mutex<Receiver<()>>,
}

impl Drop for BatchGuard {
    fn drop(&mut self) {
        let until = Some(Instant::now() + EXIT_WAIT);
        let shared = &self.shared;
        shared.sweep(false, |bytes, lines| {
            shared.send_by(Message::Lines { bytes, lines }, until)
        });
        shared.send_by(Message::Exit, until);
        let wait = until.map_or(Duration::ZERO, |u| {
            u.saturating_duration_since(Instant::now())
        });
        let _ = locked(&self.finished).recv_timeout(wait);
    }
}

/// Starts the writer thread over `out`.
pub fn spawn(out: impl Write + Send + 'static) -> io::Result<(BatchWriter, BatchGuard)> {
    let (queue, received) = sync_channel(QUEUED);
    let shared = Arc::new(Shared {
        queue,
        queued_bytes: AtomicUsize::new(0),
        dropped: AtomicU64::new(0),
        batches: Mutex::new(Vec::new()),
    });
    let (finish, finished) = sync_channel(1);
    let writer = shared.clone();
    std::thread::Builder::new()
        .name("sluice-log".to_owned())
        .spawn(move || {
            write_out(out, &received, &writer);
            let _ = finish.send(());
        })?;
    Ok((
        BatchWriter {
            shared: shared.clone(),
        },
        BatchGuard {
            shared,
            finished: Mutex::new(finished),
        },
    ))
}

/// The writer thread: writes what it receives, sweeps the threads'
/// batches every [`FLUSH_EVERY`], and flushes whenever it has nothing
/// more to write.
fn write_out(out: impl Write, received: &Receiver<Message>, counts: &Shared) {
    // Small messages (events, sweeps of quiet threads) are gathered; a
    // message at least this large (a full batch) is written straight
    // from its own buffer, after what was gathered, not copied first.
    let mut out = io::BufWriter::with_capacity(BATCH_BYTES / 2, out);
    let mut next_sweep = Instant::now() + FLUSH_EVERY;
    let mut message = None;
    loop {
        let next = match message.take() {
            Some(next) => Ok(next),
            None => received.recv_timeout(next_sweep.saturating_duration_since(Instant::now())),
        };
        match next {
            Ok(Message::Lines { bytes, lines }) => counts.write(&mut out, &bytes, lines),
            Ok(Message::Exit) | Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        if Instant::now() >= next_sweep {
            // Into this same queue, behind what each thread sent before
            // (written on the next turns). Never waiting, neither for a
            // batch's lock nor for room: this thread is the one that
            // makes room.
            counts.sweep(true, |bytes, lines| counts.send(bytes, lines));
            next_sweep = Instant::now() + FLUSH_EVERY;
        }
        match received.try_recv() {
            Ok(next) => message = Some(next),
            Err(_) => {
                let _ = out.flush();
            }
        }
    }
    // What arrived before the exit message.
    while let Ok(Message::Lines { bytes, lines }) = received.try_recv() {
        counts.write(&mut out, &bytes, lines);
    }
    let _ = out.flush();
}

/// The writer `tracing`'s formatter gets: each event it formats is a
/// line, handed over at once with the batch before it, except access-log
/// events (the text format's), which wait in the batch as the JSON
/// lines do.
pub struct EventWriter {
    writer: BatchWriter,
    now: bool,
}

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writer.write_line(buf, self.now);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchWriter {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter {
            writer: self.clone(),
            now: true,
        }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> EventWriter {
        EventWriter {
            writer: self.clone(),
            now: meta.target() != super::access_log::ACCESS_TARGET,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output a test reads; `stuck` holds every write until released.
    #[derive(Clone, Default)]
    struct Output {
        bytes: Arc<Mutex<Vec<u8>>>,
        stuck: Arc<Mutex<()>>,
    }

    impl Write for Output {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let _held = self.stuck.lock().unwrap();
            self.bytes.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Output {
        fn text(&self) -> String {
            String::from_utf8(self.bytes.lock().unwrap().clone()).unwrap()
        }
    }

    fn eventually(what: impl Fn() -> bool) -> bool {
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if what() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    #[test]
    fn every_threads_lines_arrive_in_their_order() {
        let out = Output::default();
        let (writer, guard) = spawn(out.clone()).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let writer = writer.clone();
                std::thread::spawn(move || {
                    // Long enough for the writer's sweeps to take partial
                    // batches between full ones.
                    for i in 0..2000 {
                        let pad = "x".repeat(400);
                        writer.write_line(format!("{t} {i} {pad}\n").as_bytes(), false);
                        if i % 100 == 0 {
                            std::thread::sleep(Duration::from_millis(30));
                        }
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        drop(guard);
        let text = out.text();
        for t in 0..4 {
            let seen: Vec<u32> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("{t} ")))
                .map(|rest| rest.split(' ').next().unwrap().parse().unwrap())
                .collect();
            assert_eq!(seen, (0..2000).collect::<Vec<_>>(), "thread {t}");
        }
        assert_eq!(writer.dropped(), 0);
    }

    #[test]
    fn a_quiet_threads_lines_go_out_within_the_flush_interval() {
        let out = Output::default();
        let (writer, _guard) = spawn(out.clone()).unwrap();
        writer.write_line(b"only line\n", false);
        let written = Instant::now();
        assert!(
            eventually(|| out.text() == "only line\n"),
            "{:?}",
            out.text()
        );
        assert!(written.elapsed() < FLUSH_EVERY * 5);
    }

    #[test]
    fn an_event_takes_the_lines_before_it_along_at_once() {
        let out = Output::default();
        let (writer, _guard) = spawn(out.clone()).unwrap();
        writer.write_line(b"request 1\n", false);
        writer.write_line(b"request 2\n", false);
        let mut event = writer.make_writer();
        event.write_all(b"a warning\n").unwrap();
        assert!(eventually(|| !out.text().is_empty()));
        assert_eq!(out.text(), "request 1\nrequest 2\na warning\n");
    }

    #[test]
    fn a_flush_takes_other_threads_lines_before_the_next_event() {
        let out = Output::default();
        let (writer, _guard) = spawn(out.clone()).unwrap();
        let w = writer.clone();
        let (done, wait) = std::sync::mpsc::channel();
        let (end, ended) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            w.write_line(b"answered\n", false);
            done.send(()).unwrap();
            // Alive, its batch unswept, until the test ends.
            let _ = ended.recv();
        });
        wait.recv().unwrap();
        writer.flush();
        writer.make_writer().write_all(b"stopped\n").unwrap();
        assert!(eventually(|| out.text().contains("stopped")));
        assert_eq!(out.text(), "answered\nstopped\n");
        drop(end);
        other.join().unwrap();
    }

    #[test]
    fn the_exit_waits_for_the_writer_not_for_its_timeout() {
        let out = Output::default();
        let (writer, guard) = spawn(out.clone()).unwrap();
        // Batches in the queue ahead of the exit message.
        for i in 0..3 {
            writer.write_line(format!("event {i}\n").as_bytes(), true);
        }
        let dropping = Instant::now();
        drop(guard);
        assert!(
            dropping.elapsed() < EXIT_WAIT / 2,
            "{:?}",
            dropping.elapsed()
        );
        assert_eq!(out.text(), "event 0\nevent 1\nevent 2\n");
    }

    #[test]
    fn an_ending_thread_leaves_no_line_behind() {
        let out = Output::default();
        let (writer, _guard) = spawn(out.clone()).unwrap();
        let w = writer.clone();
        std::thread::spawn(move || w.write_line(b"last words\n", false))
            .join()
            .unwrap();
        assert!(eventually(|| out.text() == "last words\n"));
    }

    #[test]
    fn lines_of_dropped_batches_are_counted_one_by_one() {
        let out = Output::default();
        let stuck = out.stuck.lock().unwrap();
        let (writer, guard) = spawn(out.clone()).unwrap();
        let line = vec![b'x'; 99];
        let line = [line.as_slice(), b"\n"].concat();
        let total: u64 = 400 * 1000;
        for _ in 0..total {
            writer.write_line(&line, false);
        }
        assert!(writer.dropped() > 0, "the queue must have filled");
        drop(stuck);
        drop(guard);
        let dropped = writer.dropped();
        let written = out.text().lines().count() as u64;
        assert_eq!(written + dropped, total, "each line written or counted");
    }

    #[test]
    fn a_full_batch_hands_over_its_buffer_and_a_small_one_a_copy() {
        let mut batch = Batch::new();
        let line = [b'x'; 100];
        while batch.bytes.len() < BATCH_BYTES / 2 {
            batch.bytes.extend_from_slice(&line);
            batch.lines += 1;
        }
        let buffer = batch.bytes.as_ptr();
        let (bytes, lines) = batch.take().unwrap();
        assert_eq!(bytes.as_ptr(), buffer, "not copied");
        let half = (BATCH_BYTES / 2).div_ceil(100);
        assert_eq!((bytes.len(), lines), (half * 100, half as u64));
        assert!(batch.bytes.is_empty() && batch.bytes.capacity() >= BATCH_BYTES);
        batch.bytes.extend_from_slice(b"event\n");
        batch.lines = 1;
        let (small, _) = batch.take().unwrap();
        assert_eq!(small.capacity(), 6, "an event holds no batch's worth");
        assert!(batch.take().is_none());
    }
}
