//! Hot reload (SPEC §2): SIGHUP, or a change to the config file (a
//! Kubernetes ConfigMap's `..data` symlink swap included) or to the TLS
//! files, re-reads them. A new config is compiled whole and swapped in
//! only when valid; an invalid one is refused, logged and counted, and the
//! old one keeps serving. Requests keep the config they started with, and
//! state keyed by name (limits, budgets, cache, circuits) lives outside the
//! snapshot, so it carries over.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::config::{self, ConfigErrors};
use crate::gateway::Gateway;
use crate::server::tls::CertStore;
use crate::snapshot::{Snapshot, TlsFiles};

/// Where `${VAR}`s come from: the process environment in `sluice run`.
pub type Env = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// A burst of file events (a ConfigMap update is several, a file written
/// in place by a script one a write) is handled once the file has been
/// quiet this long: read sooner, a file rewritten in place
/// (`envsubst < t > proxy.yaml`) was read half-written, refused, or
/// applied without its later routes.
const SETTLE: Duration = Duration::from_millis(500);
/// A file that never goes quiet is read this long after its first event.
const SETTLE_MAX: Duration = Duration::from_secs(5);
/// How often a directory that could not be watched (removed, to be made
/// again) is tried again.
const WATCH_RETRY: Duration = Duration::from_secs(2);

type Digest32 = [u8; 32];

/// Reloads the config file and the certificate when asked or changed.
pub struct Reloader {
    gw: Arc<Gateway>,
    path: PathBuf,
    env: Env,
    certs: Option<Arc<CertStore>>,
    /// The addresses the listeners hold: a reload does not move them, so
    /// an upstream there loops back into sluice whatever `listen` says.
    bound: [std::net::SocketAddr; 2],
    /// The running config's text and the files it read: events that
    /// changed neither (a file touched, a sibling written) reload nothing.
    accepted: Option<Digest32>,
    /// What the last refused attempt read (the text, the files the
    /// running config reads, the TLS pair, which loading checks): it is
    /// tried again when one of them changes, not on every event, and
    /// its errors are logged once.
    refused: Option<Digest32>,
    tls_digest: Option<Digest32>,
    /// The certificate pair last tried, loaded or not: a pair refused
    /// (caught mid-rotation) is tried again when it changes, not on every
    /// event, and its failure is logged once.
    tls_tried: Option<Digest32>,
    /// What the process read at start and still runs with.
    started: Started,
}

/// The settings read once at start, which a reload does not change: a
/// reloaded config that differs says so, against what is running.
struct Started {
    listen: std::net::SocketAddr,
    admin_listen: std::net::SocketAddr,
    /// The listener's certificate pair; rotated from these files while a
    /// reloaded config names none.
    tls: Option<TlsFiles>,
    cache_max_bytes: u64,
    state: crate::snapshot::StateSettings,
    limits: crate::snapshot::Limits,
    logging: crate::snapshot::Logging,
}

impl Started {
    fn of(snapshot: &Snapshot) -> Self {
        Started {
            listen: snapshot.listen,
            admin_listen: snapshot.admin_listen,
            tls: snapshot.tls.clone(),
            cache_max_bytes: snapshot.cache.max_bytes,
            state: snapshot.state.clone(),
            limits: snapshot.limits.clone(),
            logging: snapshot.logging.clone(),
        }
    }
}

/// What one config check did.
#[derive(Debug)]
pub enum Outcome {
    Unchanged,
    Reloaded,
    Refused(ConfigErrors),
}

impl Reloader {
    /// Watches `path` for the gateway `running` serves.
    pub fn new(
        gw: Arc<Gateway>,
        path: PathBuf,
        env: Env,
        running: &crate::server::Running,
    ) -> Self {
        let tls_digest = gw.active().snapshot.tls.as_ref().and_then(tls_digest);
        let accepted = crate::config::read_text(&path)
            .ok()
            .map(|text| config_digest(&text, &gw.active().snapshot.sources));
        let started = Started::of(&gw.active().snapshot);
        Reloader {
            gw,
            path,
            env,
            certs: running.certs.clone(),
            bound: [running.proxy_addr, running.admin_addr],
            started,
            accepted,
            refused: None,
            tls_digest,
            tls_tried: tls_digest,
        }
    }

    /// Reloads the config if its file changed, or anyway when `forced`
    /// (SIGHUP: a `${VAR}` or a referenced file may differ).
    pub fn config(&mut self, forced: bool) -> Outcome {
        let file = self.path.display().to_string();
        let text = crate::config::read_config(&self.path, &file);
        let active = self.gw.active();
        let running = &active.snapshot;
        let now = text
            .as_ref()
            .ok()
            .map(|text| config_digest(text, &running.sources));
        if !forced && now.is_some() && now == self.accepted {
            // Back to what runs (a refused edit undone): nothing stands
            // refused any more, and the log says so beside the refusal.
            if self.refused.take().is_some() {
                let file = self.path.display().to_string();
                self.log(|| {
                    tracing::info!(
                        event = "config_restored",
                        file,
                        "the config file is back to the running config; the refused change is gone"
                    );
                });
            }
            self.gw.metrics.config_last_reload_ok.set(1);
            return Outcome::Unchanged;
        }
        let tls = self.tls_files().as_ref().and_then(tls_digest);
        // An unreadable file by why it is: one reason after another (a
        // file removed, then one too large) is refused, and said, each.
        let unreadable = text.as_ref().err().map(ToString::to_string);
        let attempt = content_digest(&[
            now.as_ref().map_or_else(
                || unreadable.as_deref().unwrap_or_default().as_bytes(),
                |d| &d[..],
            ),
            tls.as_ref().map_or(&b"no pair"[..], |d| &d[..]),
        ]);
        if !forced && self.refused == Some(attempt) {
            return Outcome::Unchanged;
        }
        drop(active);
        let loaded = match &text {
            Ok(text) => {
                let base_dir = base_dir(&self.path);
                config::load_str_beside(text, &file, base_dir, &*self.env, &self.bound)
            }
            Err(e) => Err(ConfigErrors(vec![e.clone()])),
        };
        let metrics = &self.gw.metrics.config_reloads;
        match loaded {
            Ok(snapshot) => {
                self.accepted = text
                    .as_ref()
                    .ok()
                    .map(|text| config_digest(text, &snapshot.sources));
                self.refused = None;
                let restart = needs_restart(&self.started, &snapshot);
                let warnings = snapshot.warnings.clone();
                self.gw.swap(snapshot);
                metrics.with_label_values(&["ok"]).inc();
                self.gw.metrics.config_last_reload_ok.set(1);
                self.log(|| {
                    tracing::info!(event = "config_reloaded", file, "config reloaded");
                    config::log_warnings(&warnings);
                    for what in &restart {
                        tracing::warn!(
                            event = "config_needs_restart",
                            setting = what,
                            "this setting changed; it takes effect after a restart"
                        );
                    }
                });
                self.certs(forced);
                Outcome::Reloaded
            }
            Err(errors) => {
                self.refused = Some(attempt);
                metrics.with_label_values(&["error"]).inc();
                self.gw.metrics.config_last_reload_ok.set(0);
                let text = errors.to_string();
                self.log(|| {
                    tracing::error!(
                        event = "config_reload_failed",
                        file,
                        errors = text.as_str(),
                        "the new config is invalid; the old one keeps serving"
                    );
                });
                Outcome::Refused(errors)
            }
        }
    }

    /// Re-reads the certificate and key if they changed (or `forced`); a
    /// pair that does not load (caught mid-rotation) keeps the old one.
    pub fn certs(&mut self, forced: bool) {
        let (Some(store), Some(files)) = (&self.certs, self.tls_files()) else {
            return;
        };
        let digest = tls_digest(&files);
        if !forced && digest == self.tls_digest {
            // The serving pair is back (a refused rotation undone).
            self.tls_tried = digest;
            self.gw.metrics.tls_last_reload_ok.set(1);
            return;
        }
        if !forced && digest == self.tls_tried {
            return;
        }
        self.tls_tried = digest;
        let result = store.reload(&files);
        let counted = if result.is_ok() { "ok" } else { "error" };
        let metrics = &self.gw.metrics;
        metrics.tls_reloads.with_label_values(&[counted]).inc();
        metrics.tls_last_reload_ok.set(i64::from(result.is_ok()));
        match result {
            Ok(()) => {
                self.tls_digest = digest;
                self.log(|| tracing::info!(event = "tls_reloaded", "certificate reloaded"));
                crate::server::tls::report_expiry(store, &self.gw);
            }
            Err(e) => self.log(|| {
                tracing::warn!(
                    event = "tls_reload_failed",
                    error = e.as_str(),
                    "the new certificate was not loaded; the old one keeps serving"
                );
            }),
        }
    }

    /// The listener's certificate pair: where the running config says,
    /// else (a config without `tls` reloaded onto a TLS listener, which
    /// keeps serving TLS until restarted) where it was at start.
    fn tls_files(&self) -> Option<TlsFiles> {
        self.certs.as_ref()?;
        self.gw
            .active()
            .snapshot
            .tls
            .clone()
            .or_else(|| self.started.tls.clone())
    }

    /// The files whose changes concern us: the config, its TLS pair and
    /// the files it reads.
    fn files(&self) -> Vec<PathBuf> {
        let active = self.gw.active();
        let mut files = vec![self.path.clone()];
        if let Some(tls) = self.tls_files() {
            files.extend([tls.cert_file, tls.key_file]);
        }
        files.extend(active.snapshot.sources.iter().cloned());
        files
    }

    /// Each file that concerns us and, for a symlink, its target
    /// (`proxy.yaml -> ../shared/proxy.yaml`, certbot's `live/` links,
    /// a ConfigMap's `..data/proxy.yaml`): an edit happens there.
    /// A directory on a file's path that is a symlink
    /// (`current -> releases/7`, swapped to deploy) counts too: the swap
    /// happens beside it.
    fn paths(&self) -> Vec<PathBuf> {
        let mut paths = Vec::new();
        for file in self.files() {
            let target = std::fs::canonicalize(&file).ok();
            let linked_dirs: Vec<PathBuf> = file
                .ancestors()
                .skip(1)
                .filter(|dir| {
                    !dir.as_os_str().is_empty()
                        && dir
                            .symlink_metadata()
                            .is_ok_and(|m| m.file_type().is_symlink())
                })
                .map(Path::to_path_buf)
                .collect();
            paths.push(file);
            paths.extend(target);
            paths.extend(linked_dirs);
        }
        paths
    }

    /// The directories whose changes may concern us: each path's (a
    /// ConfigMap or Secret mount swaps a symlink in the directory, not the
    /// file itself), each by its canonical name. A directory known by two
    /// names (a relative path and the absolute one its file resolves to)
    /// is one inotify watch: watched under both, dropping the name that
    /// stopped concerning us (the file deleted, so no longer resolved)
    /// would end the watch of the other, and no change would wake us.
    fn dirs(&self) -> HashSet<PathBuf> {
        self.paths()
            .iter()
            .map(|path| {
                let dir = base_dir(path);
                std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
            })
            .collect()
    }

    /// The names of files whose changes concern us, in those directories:
    /// each path's, and a mount's `..data` symlink and its `..<timestamp>`
    /// directories (see [`concerns`]). Other files there (a log written
    /// beside the config) wake nothing.
    fn names(&self) -> HashSet<OsString> {
        self.paths()
            .iter()
            .filter_map(|path| path.file_name().map(ToOwned::to_owned))
            .collect()
    }

    /// Watches the directories that concern us now, and no longer those
    /// that stopped (a symlink's old target). A directory replaced under
    /// its name (`mv conf.new conf`) is watched again: a watch follows
    /// the directory it was put on, wherever it goes. False when one
    /// could not be watched (a directory removed, to be made again): it
    /// is warned about once, and tried again after [`WATCH_RETRY`].
    fn watch(
        &self,
        watcher: Option<&mut notify::RecommendedWatcher>,
        watches: &mut Watches,
    ) -> bool {
        let Some(watcher) = watcher else { return true };
        let dirs = self.dirs();
        watches.on.retain(|dir, _| {
            let keep = dirs.contains(dir);
            if !keep {
                let _ = watcher.unwatch(dir);
            }
            keep
        });
        watches.failing.retain(|dir| dirs.contains(dir));
        let mut all = true;
        for dir in dirs {
            let now = dir_identity(&dir);
            if now.is_some() && watches.on.get(&dir) == Some(&now) {
                continue;
            }
            if watches.on.remove(&dir).is_some() {
                let _ = watcher.unwatch(&dir);
            }
            match watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watches.failing.remove(&dir);
                    watches.on.insert(dir, now);
                }
                Err(e) => {
                    all = false;
                    if watches.failing.insert(dir.clone()) {
                        let error = format!("cannot watch {}: {e}", dir.display());
                        self.log(|| {
                            tracing::warn!(
                                event = "watch_failed",
                                error = error.as_str(),
                                "changes there are not seen until it can be watched (tried every 2s); SIGHUP reloads"
                            );
                        });
                    }
                }
            }
        }
        all
    }

    fn log(&self, emit: impl FnOnce()) {
        tracing::dispatcher::with_default(&self.gw.log.dispatch, emit);
    }
}

/// Starts reloading on SIGHUP and on file changes, until the gateway's
/// process ends. SIGHUP is handled first and whatever happens to the file
/// watcher (inotify instances run out on busy nodes): without a watcher,
/// reload is on SIGHUP only, and a warning says so.
pub fn spawn(mut reloader: Reloader, hangup: Hangup) -> Result<JoinHandle<()>, String> {
    let mut hangup = hangup.0;
    let (changed, mut events) = mpsc::channel::<()>(1);
    let names = Arc::new(RwLock::new(reloader.concerns()));
    let watched_names = names.clone();
    let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Reads (ours included) are not changes; a full channel already
        // holds a wake-up.
        // An event with no path (an overflow of the kernel's queue) may
        // have hidden any change: it counts.
        if let Ok(event) = event
            && !matches!(event.kind, EventKind::Access(_))
            && (event.need_rescan()
                || event.paths.is_empty()
                || event
                    .paths
                    .iter()
                    .any(|path| concerns(path, &watched_names)))
        {
            let _ = changed.try_send(());
        }
    });
    let mut watcher = match watcher {
        Ok(watcher) => Some(watcher),
        Err(e) => {
            let error = e.to_string();
            reloader.log(|| {
                tracing::warn!(
                    event = "watch_failed",
                    error = error.as_str(),
                    "file changes are not watched; reload with SIGHUP"
                );
            });
            None
        }
    };
    let mut watches = Watches::default();
    let mut all_watched = reloader.watch(watcher.as_mut(), &mut watches);
    if let Ok(mut names) = names.write() {
        *names = reloader.concerns();
    }
    Ok(tokio::spawn(async move {
        loop {
            let forced = tokio::select! {
                Some(()) = hangup.recv() => true,
                Some(()) = events.recv() => false,
                () = tokio::time::sleep(WATCH_RETRY), if !all_watched => {
                    all_watched = reloader.watch(watcher.as_mut(), &mut watches);
                    if !all_watched {
                        continue;
                    }
                    // Watched again: what changed meanwhile was not seen.
                    false
                }
                else => break,
            };
            let first = tokio::time::Instant::now();
            while let Ok(Some(())) = tokio::time::timeout(SETTLE, events.recv()).await {
                if first.elapsed() >= SETTLE_MAX {
                    break;
                }
            }
            // Emptied to be written again in place, and caught between
            // the two: given one more while to be filled.
            if std::fs::metadata(&reloader.path).is_ok_and(|m| m.len() == 0) {
                tokio::time::sleep(SETTLE).await;
            }
            // A rotated certificate counts even when the config in the
            // same batch was refused.
            if !matches!(reloader.config(forced), Outcome::Reloaded) {
                reloader.certs(forced);
            }
            // A reload may have moved the certificate: watch where it is now.
            all_watched = reloader.watch(watcher.as_mut(), &mut watches);
            if let Ok(mut names) = names.write() {
                *names = reloader.concerns();
            }
        }
    }))
}

/// The directories watched, each with the identity of the directory its
/// watch is on, and those that could not be.
#[derive(Default)]
struct Watches {
    on: HashMap<PathBuf, Option<DirId>>,
    failing: HashSet<PathBuf>,
}

/// A directory's device and inode: another directory under the same
/// name (one moved or made in its place) has another.
type DirId = (u64, u64);

#[cfg(unix)]
fn dir_identity(dir: &Path) -> Option<DirId> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn dir_identity(dir: &Path) -> Option<DirId> {
    dir.is_dir().then_some((0, 0))
}

/// What events concern us: those about these file names, and about the
/// watched directories themselves (moved or removed).
#[derive(Default)]
struct Concerns {
    names: HashSet<OsString>,
    dirs: HashSet<PathBuf>,
}

impl Reloader {
    fn concerns(&self) -> Concerns {
        Concerns {
            names: self.names(),
            dirs: self.dirs(),
        }
    }
}

/// Whether a change to `path` may change the config or the certificate.
fn concerns(path: &Path, concerns: &RwLock<Concerns>) -> bool {
    let Some(name) = path.file_name() else {
        return true;
    };
    // Kubernetes swaps a mount's `..data` symlink to a new `..<time>` dir.
    name.as_encoded_bytes().starts_with(b"..")
        || concerns
            .read()
            .map_or(true, |c| c.names.contains(name) || c.dirs.contains(path))
}

/// SIGHUP as a stream of wake-ups (never on non-Unix systems).
/// SIGHUPs received, from the moment [`hangup`] was called.
pub struct Hangup(mpsc::Receiver<()>);

/// Takes over SIGHUP now. Called before the gateway reports ready, so
/// that a SIGHUP sent as soon as `/readyz` says 200 reloads rather than
/// kills the process (the signal's default action).
pub fn hangup() -> Result<Hangup, String> {
    hangup_events().map(Hangup)
}

fn hangup_events() -> Result<mpsc::Receiver<()>, String> {
    let (tx, rx) = mpsc::channel(1);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup =
            signal(SignalKind::hangup()).map_err(|e| format!("cannot handle SIGHUP: {e}"))?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                if tx.send(()).await.is_err() {
                    break;
                }
            }
        });
    }
    #[cfg(not(unix))]
    drop(tx);
    Ok(rx)
}

/// Settings read once at start: a reload that changes them says so.
fn needs_restart(old: &Started, new: &Snapshot) -> Vec<&'static str> {
    let mut changed = Vec::new();
    if old.listen != new.listen {
        changed.push("listen");
    }
    if old.admin_listen != new.admin_listen {
        changed.push("admin.listen");
    }
    if old.tls.is_some() != new.tls.is_some() {
        changed.push("tls");
    }
    if old.cache_max_bytes != new.cache.max_bytes {
        changed.push("cache.max_bytes");
    }
    if old.state.backend != new.state.backend
        || old.state.redis_url != new.state.redis_url
        || old.state.deny_on_error != new.state.deny_on_error
    {
        changed.push("state");
    }
    if old.limits.max_connections != new.limits.max_connections {
        changed.push("limits.max_connections");
    }
    if old.limits.header_read_timeout != new.limits.header_read_timeout {
        changed.push("limits.header_read_timeout");
    }
    if old.limits.shutdown_grace != new.limits.shutdown_grace {
        changed.push("limits.shutdown_grace");
    }
    if old.logging.level != new.logging.level || old.logging.format != new.logging.format {
        changed.push("logging.level and logging.format");
    }
    changed
}

fn base_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// The digest of a config's text and of the files it read, as they are
/// now (a file that cannot be read counts as such, not as an error).
fn config_digest(text: &str, sources: &[PathBuf]) -> Digest32 {
    let contents: Vec<Option<Vec<u8>>> = sources
        .iter()
        .map(|p| crate::config::read_file(p).ok())
        .collect();
    let mut parts: Vec<&[u8]> = vec![text.as_bytes()];
    for content in &contents {
        match content {
            Some(bytes) => parts.extend([&b"file"[..], bytes]),
            None => parts.push(b"unreadable"),
        }
    }
    content_digest(&parts)
}

fn tls_digest(files: &TlsFiles) -> Option<Digest32> {
    digest_of(&[&files.cert_file, &files.key_file])
}

/// The digest of the files' contents (symlinks followed); `None` when one
/// cannot be read.
fn digest_of(paths: &[&Path]) -> Option<Digest32> {
    let contents = paths
        .iter()
        .map(|p| crate::config::read_file(p))
        .collect::<Result<Vec<_>, _>>()
        .ok()?;
    let parts: Vec<&[u8]> = contents.iter().map(Vec::as_slice).collect();
    Some(content_digest(&parts))
}

/// One digest over several contents, each length-prefixed.
fn content_digest(parts: &[&[u8]]) -> Digest32 {
    let mut hash = Sha256::new();
    for part in parts {
        hash.update((part.len() as u64).to_le_bytes());
        hash.update(part);
    }
    hash.finalize().into()
}
