//! The `sluice` command line: `run`, `check`, `hash-key`, `mock`. Errors
//! become exit codes here and nowhere else: `run` exits 2 on a bad config
//! or a busy port, `check` exits 1 on an invalid file.
#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

use sluice::config;
use sluice::gateway::Gateway;
use sluice::proxy::auth::format_hash;
use sluice::server::open_files::OpenFiles;
use sluice::telemetry::log::LogSink;
use sluice::upstream::mock::{self, MockSettings};

#[derive(Parser)]
#[command(name = "sluice", version, about = "An AI gateway sidecar")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the config file is: `--config FILE`, or FILE alone (as
/// `promtool check config FILE` takes it).
#[derive(clap::Args)]
struct ConfigArg {
    /// The config file [default: $SLUICE_CONFIG, else proxy.yaml]
    #[arg(long)]
    config: Option<PathBuf>,
    /// The config file, as --config names it
    #[arg(value_name = "FILE", conflicts_with = "config")]
    file: Option<PathBuf>,
}

impl ConfigArg {
    fn path(self) -> PathBuf {
        config_path(self.config.or(self.file))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve until SIGTERM/SIGINT, then drain.
    Run {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Validate a config file and print every error.
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print the `sha256:` hash of an API key (read from stdin without KEY).
    HashKey {
        /// The key to hash; without it, one key is read from stdin (so it
        /// stays out of the shell's history). A key starting with `-` is
        /// a key, not a flag: a parse error would repeat part of it.
        #[arg(allow_hyphen_values = true)]
        key: Option<String>,
    },
    /// Run the built-in OpenAI-compatible mock LLM server.
    Mock {
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: SocketAddr,
        /// Delay before each response head, e.g. 20ms.
        #[arg(long, default_value = "0ms", value_parser = parse_duration)]
        latency: Duration,
        /// Fraction of requests that fail (0.0 to 1.0).
        #[arg(long, default_value_t = 0.0, value_parser = parse_rate, allow_negative_numbers = true)]
        failure_rate: f64,
        /// HTTP status of injected failures.
        #[arg(long, default_value_t = 500)]
        status: u16,
        /// Content chunks per streamed answer (default: one per word).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        stream_chunks: Option<u32>,
        /// Pause between streamed chunks, e.g. 50ms.
        #[arg(long, default_value = "0ms", value_parser = parse_duration)]
        chunk_interval: Duration,
    },
}

/// `--config`, else `$SLUICE_CONFIG` when set and not empty (an empty
/// variable, as a manifest's `value: ""` leaves it, means unset), else
/// `./proxy.yaml`.
fn config_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| {
        std::env::var_os("SLUICE_CONFIG")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
    .unwrap_or_else(|| PathBuf::from("proxy.yaml"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    config::units::parse_duration(s)
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("`{s}` is not a number between 0.0 and 1.0")),
    }
}

/// A line on stderr; a stderr that cannot be written is no reason to
/// panic.
macro_rules! stderr_line {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// A line on stdout, then success. A reader that left early (`| head`)
/// is no failure; any other write error (`> /dev/full`) is reported,
/// exit 2, never a panic.
macro_rules! stdout_line {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        match writeln!(out, $($arg)*).and_then(|()| out.flush()) {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                stderr_line!("sluice: cannot write to standard output: {e}");
                ExitCode::from(2)
            }
            _ => ExitCode::SUCCESS,
        }
    }};
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => check(&config.path()),
        Command::HashKey { key } => hash_key(key),
        Command::Run { config } => with_runtime(run(config.path())),
        Command::Mock {
            listen,
            latency,
            failure_rate,
            status,
            stream_chunks,
            chunk_interval,
        } => {
            if !(400..=599).contains(&status) {
                stderr_line!(
                    "sluice mock: --status {status} is not an HTTP error status (400-599), as an injected failure answers"
                );
                return ExitCode::from(2);
            }
            let settings = MockSettings {
                latency,
                failure_rate,
                failure_status: status,
                stream_chunks,
                chunk_interval,
            };
            with_runtime(serve_mock(listen, settings))
        }
    }
}

/// How many threads run requests: `TOKIO_WORKER_THREADS` when set, else
/// the CPUs this process may use (its affinity mask and cgroup CPU quota
/// included, so a sidecar limited to one CPU counts one).
fn worker_threads() -> usize {
    let cpus = || std::thread::available_parallelism().map_or(1, |n| n.get());
    match std::env::var("TOKIO_WORKER_THREADS") {
        Err(_) => cpus(),
        Ok(v) => match v.trim().parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => {
                let n = cpus();
                stderr_line!(
                    "sluice: TOKIO_WORKER_THREADS={v:?} is not a positive number; using {n}"
                );
                n
            }
        },
    }
}

fn with_runtime(fut: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    let workers = worker_threads();
    // On one core a work-stealing pool only adds cost: queues shared
    // between threads, cross-thread wake-ups, and a main thread besides the
    // worker. A current-thread runtime polls the I/O driver and every
    // connection from one thread (linkerd2-proxy makes the same choice).
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    match builder.enable_all().build() {
        Ok(rt) => rt.block_on(fut),
        Err(e) => {
            stderr_line!("sluice: cannot start the runtime: {e}");
            ExitCode::from(2)
        }
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match config::load(path) {
        Ok(snapshot) => {
            for w in &snapshot.warnings {
                stderr_line!("{w}");
            }
            stdout_line!("{}: ok", path.display())
        }
        Err(errors) => {
            for e in &errors.0 {
                stderr_line!("{e}");
            }
            ExitCode::from(1)
        }
    }
}

fn hash_key(key: Option<String>) -> ExitCode {
    let key = match key {
        // Trimmed as the gateway trims configured and presented keys.
        Some(k) => k.trim_ascii().to_owned(),
        None => {
            let mut s = String::new();
            if let Err(e) = std::io::stdin().read_to_string(&mut s) {
                stderr_line!("sluice hash-key: cannot read stdin: {e}");
                return ExitCode::from(2);
            }
            s.trim_ascii().to_owned()
        }
    };
    if key.is_empty() {
        stderr_line!("sluice hash-key: the key is empty");
        return ExitCode::from(2);
    }
    if key.contains(['\n', '\r']) {
        // No client can send a key with a line break in a header.
        stderr_line!("sluice hash-key: the key holds a line break; give one key");
        return ExitCode::from(2);
    }
    stdout_line!("{}", format_hash(key.as_bytes()))
}

async fn run(path: PathBuf) -> ExitCode {
    let snapshot = match config::load(&path) {
        Ok(s) => s,
        Err(errors) => {
            let first = errors
                .0
                .first()
                .map(ToString::to_string)
                .unwrap_or_default();
            let more = errors
                .0
                .iter()
                .skip(1)
                .filter(|e| !e.message.starts_with(config::STOPPED_READING))
                .count();
            if more > 0 {
                stderr_line!(
                    "sluice: invalid config: {first} (and {more} more; see `sluice check --config {}`)",
                    path.display()
                );
            } else {
                stderr_line!("sluice: invalid config: {first}");
            }
            return ExitCode::from(2);
        }
    };
    if let Ok(filter) = std::env::var("SLUICE_LOG")
        && !filter.trim().is_empty()
        && sluice::telemetry::log::usable_filter(&filter).is_none()
    {
        stderr_line!(
            "sluice: SLUICE_LOG={filter:?} is not a log filter (a level: trace, debug, info, warn, error or off; or directives like `sluice=debug`); using logging.level"
        );
    }
    let warnings = snapshot.warnings.clone();
    let gw = Gateway::new(snapshot, LogSink::Stdout);
    let _ = tracing::dispatcher::set_global_default(gw.log.dispatch.clone());
    config::log_warnings(&warnings);
    log_open_files(
        sluice::server::open_files::raise(),
        gw.active().snapshot.limits.max_connections,
    );
    // Signals are taken over before `start` makes /readyz say 200: a
    // SIGTERM or SIGHUP sent right then must drain or reload, not kill.
    let mut stop = StopSignals::install();
    let hangup = sluice::reload::hangup();
    let running = match sluice::server::start(gw.clone()).await {
        Ok(r) => r,
        Err(e) => {
            stderr_line!("sluice: {e}");
            return ExitCode::from(2);
        }
    };
    let env: sluice::reload::Env = Arc::new(config::process_env);
    let reloader = sluice::reload::Reloader::new(gw.clone(), path, env, &running);
    if let Err(e) = hangup.and_then(|hangup| sluice::reload::spawn(reloader, hangup)) {
        tracing::warn!(error = e.as_str(), "hot reload is off");
    }
    let signal = stop.recv().await;
    // The access lines of requests answered before it come first.
    gw.log.lines.flush();
    tracing::info!(signal, "shutting down: draining in-flight requests");
    running.shutdown();
    // A second signal (Ctrl-C twice, an impatient supervisor) ends the
    // drain at once, as the grace running out would.
    let cut = running.cutter();
    let drained = running.wait();
    tokio::pin!(drained);
    tokio::select! {
        () = &mut drained => {}
        signal = stop.recv() => {
            tracing::info!(signal, "asked again: not waiting for in-flight requests");
            cut();
            drained.await;
        }
    }
    // Spend kept in memory through a Redis outage, which this replica's
    // next charge would have sent.
    gw.state.settle_owed().await;
    gw.log.lines.flush();
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Says when the open-files limit was raised, and warns when it is
/// still too low for `max_connections`: past it, connections fail with
/// "too many open files" long before the configured limit.
fn log_open_files(limit: OpenFiles, max_connections: usize) {
    if limit.now != limit.was {
        tracing::info!(
            from = limit.was,
            to = limit.now,
            "raised the open-files limit"
        );
    }
    if let Some(needed) = limit.short_for(max_connections) {
        tracing::warn!(
            limit = limit.now,
            needed,
            max_connections,
            "the open-files limit is too low for max_connections; raise the hard limit (ulimit -Hn) or lower max_connections"
        );
    }
}

/// SIGTERM and SIGINT, handled from the moment `install` runs.
struct StopSignals {
    #[cfg(unix)]
    handlers: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl StopSignals {
    fn install() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let handlers = signal(SignalKind::terminate())
                .and_then(|term| Ok((term, signal(SignalKind::interrupt())?)))
                .ok();
            StopSignals { handlers }
        }
        #[cfg(not(unix))]
        StopSignals {}
    }

    /// Resolves on the next of them, naming which.
    async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        if let Some((term, int)) = self.handlers.as_mut() {
            return tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
        }
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

/// How long `sluice mock` waits for a request head.
const MOCK_HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn serve_mock(listen: SocketAddr, settings: MockSettings) -> ExitCode {
    // The gateway's own listen queue: a drill's bursts are queued too.
    let listener = match sluice::server::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            stderr_line!("sluice mock: {e}");
            return ExitCode::from(2);
        }
    };
    let mut stop = StopSignals::install();
    // The bound address: a port of 0 is the one the system picked.
    let bound = listener.local_addr().unwrap_or(listen);
    stderr_line!("sluice mock: OpenAI-compatible mock LLM on http://{bound}/v1");
    let settings = Arc::new(settings);
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // A client that stalls mid-head does not hold its connection for
    // good (the gateway's own default).
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(MOCK_HEADER_READ_TIMEOUT);
    let builder = Arc::new(builder);
    let accept = async {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let settings = settings.clone();
            let builder = builder.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let settings = settings.clone();
                    async move { Ok::<_, Infallible>(mock::respond(&settings, req).await) }
                });
                let _ = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    };
    tokio::select! {
        () = accept => {}
        _ = stop.recv() => {}
    }
    ExitCode::SUCCESS
}
