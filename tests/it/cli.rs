//! The `sluice` binary as users run it: exit codes, what it prints, the
//! `SLUICE_CONFIG` default, `hash-key`, `mock`, and a SIGTERM drain.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;

use crate::support::upstream::{MockUpstream, UpstreamReply};
use crate::support::{Client, client};

const HASH_OF_TEST: &str =
    "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

const GOOD: &str = "\
listen: 127.0.0.1:0
admin: { listen: 127.0.0.1:0 }
upstreams:
  demo:
    mock: {}
routes:
  - name: chat
    match: { path_prefix: /v1/ }
    auth: none
    upstream: demo
";

/// Two errors: a bad duration (line 2) and an unknown upstream (line 7).
const TWO_ERRORS: &str = "\
limits:
  request_timeout: 30x
upstreams:
  demo:
    mock: {}
routes:
  - { name: chat, match: { path_prefix: / }, upstream: ghost }
";

/// `sluice` with a clean environment: no `SLUICE_CONFIG` from the caller.
fn sluice() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.env_remove("SLUICE_CONFIG");
    cmd
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write config");
    path
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("ephemeral port")
        .port()
}

/// A child process that is killed if the test ends before it does.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Running {
    /// The exit status, polling for at most `within`.
    fn exit_within(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(Some(status)) = self.0.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Runs a command that must exit by itself within 10s; its stdout is
/// discarded (a `run` logs there), its stderr returned.
fn exits(mut cmd: Command) -> (ExitStatus, String) {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    let mut running = Running(child);
    let Some(status) = running.exit_within(Duration::from_secs(10)) else {
        panic!("sluice did not exit within 10s");
    };
    let mut err = String::new();
    if let Some(mut pipe) = running.0.stderr.take() {
        std::io::Read::read_to_string(&mut pipe, &mut err).expect("read stderr");
    }
    (status, err)
}

/// Polls until something accepts TCP connections on `addr`.
fn wait_listening(addr: SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if TcpStream::connect(addr).is_ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts `cmd` with `RLIMIT_NOFILE` set to `soft` / `hard`.
fn limit_open_files(cmd: &mut Command, soft: u64, hard: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing
    // else between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: soft,
                rlim_max: hard,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// Polls the admin listener until `/readyz` answers 200.
async fn wait_ready(admin: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_of(&format!("http://{admin}/readyz")).await != Some(StatusCode::OK) {
        assert!(Instant::now() < deadline, "/readyz never answered 200");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `sluice run` on `config`, its JSON log piped for
/// [`stop_and_read_events`].
fn run_logging(config: &Path) -> Command {
    let mut cmd = sluice();
    cmd.args(["run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    cmd
}

/// Kills a `run` started with its stdout piped and returns the JSON log
/// events it wrote.
fn stop_and_read_events(mut gw: Running) -> Vec<serde_json::Value> {
    let _ = gw.0.kill();
    let _ = gw.0.wait();
    let mut out = String::new();
    if let Some(mut pipe) = gw.0.stdout.take() {
        std::io::Read::read_to_string(&mut pipe, &mut out).expect("read stdout");
    }
    out.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// How many descriptors process `pid` has open.
fn open_descriptors(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// GET `url`; `None` when there is no answer (nothing listening).
async fn status_of(url: &str) -> Option<StatusCode> {
    let c = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let req = http::Request::get(url).body(Full::default()).ok()?;
    match tokio::time::timeout(Duration::from_secs(2), c.request(req)).await {
        Ok(Ok(resp)) => Some(resp.status()),
        _ => None,
    }
}

#[test]
fn check_accepts_a_valid_file_with_exit_0() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write(dir.path(), "good.yaml", GOOD);
    let out = sluice()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run sluice check");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), format!("{}: ok\n", path.display()));
    assert_eq!(stderr(&out), "");
}

/// An empty file is said to be empty (a ConfigMap gone wrong, a file
/// caught between being emptied and written), not to lack routes.
#[test]
fn an_empty_config_file_is_said_to_be_empty() {
    let dir = tempfile::tempdir().expect("temp dir");
    for text in ["", " \n\n"] {
        let empty = write(dir.path(), "empty.yaml", text);
        let out = sluice().arg("check").arg(&empty).output().expect("check");
        assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
        assert_eq!(
            stderr(&out),
            format!("{}:1:1: the config file is empty\n", empty.display())
        );
    }
}

/// The file may also be named alone (`sluice check proxy.yaml`), as
/// `promtool check config` takes it; naming it both ways is refused.
#[test]
fn check_and_run_take_the_file_without_the_flag() {
    let dir = tempfile::tempdir().expect("temp dir");
    let good = write(dir.path(), "good.yaml", GOOD);
    let bad = write(dir.path(), "bad.yaml", TWO_ERRORS);
    let out = sluice().arg("check").arg(&good).output().expect("check");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), format!("{}: ok\n", good.display()));
    let out = sluice().arg("check").arg(&bad).output().expect("check");
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    assert_eq!(stderr(&out).lines().count(), 2, "{}", stderr(&out));
    let out = sluice().arg("run").arg(&bad).output().expect("run");
    assert_eq!(out.status.code(), Some(2), "stderr: {}", stderr(&out));
    assert!(stderr(&out).starts_with(&format!("sluice: invalid config: {}:2:20:", bad.display())));
    let both = sluice()
        .args(["check", "--config"])
        .arg(&good)
        .arg(&bad)
        .output()
        .expect("check");
    assert_eq!(both.status.code(), Some(2), "stderr: {}", stderr(&both));
    assert!(
        stderr(&both).contains("cannot be used with"),
        "{}",
        stderr(&both)
    );
}

/// A value the file or the environment makes in a way sluice cannot
/// read as written is refused, never taken some other way: a YAML tag
/// (`!ENV`, which the YAML reader would drop, leaving its text as the
/// key), or a variable whose bytes are not UTF-8 (which read as unset
/// would let its development default in).
#[test]
fn tags_and_variables_not_utf8_are_refused_not_guessed() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write(
        dir.path(),
        "tagged.yaml",
        "\
auth:
  api_keys:
    - { id: a, key: !ENV TEAM_A_KEY }
    - { id: b, key: \"${TEAM_B_KEY:-devkey-insecure}\" }
upstreams:
  llm: { mock: { failure_rate: !!float 0.5 } }
routes:
  - { name: chat, match: { path_prefix: / }, upstream: llm }
limits: { request_timeout: 30x }
",
    );
    let out = sluice()
        .args(["check", "--config"])
        .arg(&path)
        .env(
            "TEAM_B_KEY",
            std::ffi::OsStr::from_bytes(b"team-b-\xff-key"),
        )
        .output()
        .expect("run sluice check");
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let p = path.display();
    assert_eq!(
        stderr(&out),
        format!(
            "{p}:3:26: the `!ENV` tag is not supported: sluice takes each value as written (for an environment variable, write \"${{NAME}}\")\n\
             {p}:4:21: environment variable `TEAM_B_KEY` holds bytes that are not UTF-8\n\
             {p}:6:40: the `!!float` tag is not read: sluice takes each value as written, so leave the tag out\n\
             {p}:9:28: `30x` is not a duration like 250ms, 30s, 5m or 1h\n"
        )
    );
}

#[test]
fn check_prints_every_error_with_its_position_and_exits_1() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write(dir.path(), "bad.yaml", TWO_ERRORS);
    let out = sluice()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run sluice check");
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let p = path.display();
    assert_eq!(
        stderr(&out),
        format!(
            "{p}:2:20: `30x` is not a duration like 250ms, 30s, 5m or 1h\n\
             {p}:7:56: route `chat`: no upstream or pool named `ghost`\n"
        )
    );
    assert_eq!(stdout(&out), "");
}

#[test]
fn check_reads_sluice_config_when_config_flag_is_absent() {
    let dir = tempfile::tempdir().expect("temp dir");
    let bad = write(dir.path(), "bad.yaml", TWO_ERRORS);
    let good = write(dir.path(), "good.yaml", GOOD);
    // An empty working directory: no ./proxy.yaml to fall back on.
    let cwd = tempfile::tempdir().expect("temp dir");
    let out = sluice()
        .arg("check")
        .env("SLUICE_CONFIG", &bad)
        .current_dir(cwd.path())
        .output()
        .expect("run sluice check");
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 2, "{err}");
    assert!(
        err.starts_with(&format!("{}:2:20: ", bad.display())),
        "the errors must name $SLUICE_CONFIG's file: {err}"
    );

    // `--config` wins over the variable.
    let out = sluice()
        .args(["check", "--config"])
        .arg(&good)
        .env("SLUICE_CONFIG", &bad)
        .current_dir(cwd.path())
        .output()
        .expect("run sluice check");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), format!("{}: ok\n", good.display()));
}

#[test]
fn check_defaults_to_proxy_yaml_in_the_working_directory() {
    let cwd = tempfile::tempdir().expect("temp dir");
    write(cwd.path(), "proxy.yaml", GOOD);
    let out = sluice()
        .arg("check")
        .current_dir(cwd.path())
        .output()
        .expect("run sluice check");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "proxy.yaml: ok\n");
    // An empty SLUICE_CONFIG (a manifest's `value: ""`) counts as unset.
    let out = sluice()
        .arg("check")
        .env("SLUICE_CONFIG", "")
        .current_dir(cwd.path())
        .output()
        .expect("run sluice check");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "proxy.yaml: ok\n");
}

#[test]
fn run_with_an_invalid_config_exits_2_with_one_line_and_no_panic() {
    let dir = tempfile::tempdir().expect("temp dir");
    let one = write(
        dir.path(),
        "one.yaml",
        &GOOD.replace("auth: none", "auth: never"),
    );
    let two = write(dir.path(), "two.yaml", TWO_ERRORS);
    let missing = dir.path().join("missing.yaml");
    // More errors than are read: the note that says so is no error.
    let typos: String = (0..40).map(|i| format!("typo{i}: 1\n")).collect();
    let many = write(dir.path(), "many.yaml", &format!("{GOOD}{typos}"));
    let cases = [
        (
            &many,
            format!(
                "sluice: invalid config: {p}:11:1: unknown key (not repeated here: it could be a \
                 secret), expected one of listen, tls, admin, limits, upstreams, pools, auth, tiers, \
                 routes, pricing, budget, cache, state, logging \
                 (and 32 more; see `sluice check --config {p}`)\n",
                p = many.display()
            ),
        ),
        (
            &one,
            format!(
                "sluice: invalid config: {}:9:11: `never` is not one of: required, optional, none\n",
                one.display()
            ),
        ),
        (
            &two,
            format!(
                "sluice: invalid config: {p}:2:20: `30x` is not a duration like 250ms, 30s, 5m or 1h \
                 (and 1 more; see `sluice check --config {p}`)\n",
                p = two.display()
            ),
        ),
        (
            &missing,
            format!(
                "sluice: invalid config: {}:1:1: cannot read config: No such file or directory (os error 2)\n",
                missing.display()
            ),
        ),
    ];
    for (path, expected) in cases {
        let mut cmd = sluice();
        cmd.args(["run", "--config"])
            .arg(path)
            .env("RUST_BACKTRACE", "1");
        let (status, err) = exits(cmd);
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(status.code(), Some(2), "{}: {err}", path.display());
        assert_eq!(err, expected);
    }
}

#[test]
fn run_exits_2_naming_the_address_when_a_port_is_in_use() {
    let dir = tempfile::tempdir().expect("temp dir");
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let busy = taken.local_addr().expect("addr");
    // The proxy port taken, then the admin port.
    let configs = [
        GOOD.replace("listen: 127.0.0.1:0\n", &format!("listen: {busy}\n")),
        GOOD.replace("{ listen: 127.0.0.1:0 }", &format!("{{ listen: {busy} }}")),
    ];
    for (i, yaml) in configs.iter().enumerate() {
        assert_ne!(yaml, GOOD, "the config must name the busy port");
        let path = write(dir.path(), &format!("busy{i}.yaml"), yaml);
        let mut cmd = sluice();
        cmd.args(["run", "--config"])
            .arg(&path)
            .env("RUST_BACKTRACE", "1");
        let (status, err) = exits(cmd);
        assert_eq!(status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with(&format!("sluice: cannot listen on {busy}: ")),
            "{err}"
        );
        assert!(err.contains("in use"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    drop(taken);
}

#[tokio::test]
async fn run_raises_the_open_files_limit_and_warns_when_it_stays_short() {
    let dir = tempfile::tempdir().expect("temp dir");
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // 3000 connections need ~6000 descriptors; the hard limit is 4096.
    let yaml = GOOD.replace("{ listen: 127.0.0.1:0 }", &format!("{{ listen: {admin} }}"))
        + "limits: { max_connections: 3000 }\n";
    let path = write(dir.path(), "proxy.yaml", &yaml);
    let mut cmd = run_logging(&path);
    // As a container runtime starts it: a low soft limit, a higher hard one.
    limit_open_files(&mut cmd, 256, 4096);
    let gw = Running(cmd.spawn().expect("spawn sluice run"));
    wait_ready(admin).await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", gw.0.id())).expect("limits");
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("an open-files line");
    assert_eq!(
        open_files.split_whitespace().collect::<Vec<_>>(),
        ["Max", "open", "files", "4096", "4096", "files"]
    );
    let events = stop_and_read_events(gw);
    let event = |message: &str| {
        events
            .iter()
            .find(|e| {
                e["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with(message))
            })
            .unwrap_or_else(|| panic!("no {message:?} event in {events:?}"))
    };
    let raised = event("raised the open-files limit");
    assert_eq!(
        (raised["from"].as_u64(), raised["to"].as_u64()),
        (Some(256), Some(4096))
    );
    let short = event("the open-files limit is too low");
    assert_eq!(short["level"], "WARN", "{short}");
    assert_eq!(short["limit"].as_u64(), Some(4096));
    assert_eq!(short["needed"].as_u64(), Some(6064));
}

#[tokio::test]
async fn running_out_of_descriptors_is_not_counted_against_the_upstream() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = MockUpstream::always(UpstreamReply::text("fine")).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    // One failure opens the member's circuit.
    let yaml = format!(
        "\
listen: {proxy}
admin: {{ listen: {admin} }}
upstreams:
  app: {{ url: \"{}\" }}
pools:
  llm: {{ members: [app], circuit_breaker: {{ failures: 1, cooldown: 60s }} }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, auth: none, upstream: llm }}
",
        upstream.url()
    );
    let path = write(dir.path(), "proxy.yaml", &yaml);
    let mut cmd = run_logging(&path);
    limit_open_files(&mut cmd, 64, 64);
    let gw = Running(cmd.spawn().expect("spawn sluice run"));
    wait_ready(admin).await;

    // Idle client connections fill sluice's descriptor table.
    let mut idle = Vec::new();
    for _ in 0..80 {
        idle.push(
            tokio::net::TcpStream::connect(proxy)
                .await
                .expect("connect"),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_descriptors(gw.0.id()) < 64 {
        assert!(
            Instant::now() < deadline,
            "sluice never used its 64 descriptors"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Long enough for a failing accept every 50 ms to flood the log.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = &mut idle[0];
    first
        .write_all(b"GET /v1/models HTTP/1.1\r\nhost: sluice\r\nconnection: close\r\n\r\n")
        .await
        .expect("send");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), first.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
    assert!(answer.contains("out of file descriptors"), "{answer}");
    assert!(answer.contains("\"code\":\"upstream_error\""), "{answer}");

    // With descriptors back, the member was never judged: no open circuit.
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_descriptors(gw.0.id()) > 40 {
        assert!(
            Instant::now() < deadline,
            "the idle connections were not closed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resp = Client::new()
        .get(&format!("http://{proxy}/v1/models"))
        .await;
    assert_eq!(resp.status, StatusCode::OK, "{}", resp.text());
    let metrics = Client::new()
        .get(&format!("http://{admin}/metrics"))
        .await
        .text();
    let sample = |name: &str, labels: &[(&str, &str)]| {
        crate::support::gateway::sample(&metrics, name, labels)
    };
    let outcome = |outcome: &str| {
        sample(
            "sluice_upstream_requests_total",
            &[("upstream", "app"), ("outcome", outcome)],
        )
    };
    assert_eq!(outcome("local_error"), Some(1.0));
    assert_eq!(outcome("connect_error"), Some(0.0));
    assert_eq!(outcome("ok"), Some(1.0));
    assert_eq!(
        sample("sluice_upstream_up", &[("upstream", "app")]),
        Some(1.0)
    );

    // Accepts failed every 50 ms while the table was full: one line said so.
    let events = stop_and_read_events(gw);
    let accept_failures: Vec<_> = events
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("accept failed"))
        })
        .collect();
    assert_eq!(accept_failures.len(), 1, "{accept_failures:?}");
    assert_eq!(accept_failures[0]["listener"], "proxy");
}

/// At `max_connections` the listener stops accepting: the gauge shows
/// the connections open, and one warning says why new ones wait.
#[tokio::test]
async fn reaching_max_connections_is_visible() {
    let dir = tempfile::tempdir().expect("temp dir");
    let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let yaml = GOOD
        .replace("listen: 127.0.0.1:0\n", &format!("listen: {proxy}\n"))
        .replace("{ listen: 127.0.0.1:0 }", &format!("{{ listen: {admin} }}"))
        + "limits: { max_connections: 2 }\n";
    let path = write(dir.path(), "proxy.yaml", &yaml);
    let mut cmd = run_logging(&path);
    let gw = Running(cmd.spawn().expect("spawn sluice run"));
    wait_ready(admin).await;
    let open = || async {
        let text = Client::new()
            .get(&format!("http://{admin}/metrics"))
            .await
            .text();
        crate::support::gateway::sample(&text, "sluice_connections_open", &[])
    };
    assert_eq!(open().await, Some(0.0));
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(
            tokio::net::TcpStream::connect(proxy)
                .await
                .expect("connect"),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while open().await != Some(2.0) {
        assert!(Instant::now() < deadline, "the gauge never showed 2 open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The third waits in the backlog until one of the two closes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(open().await, Some(2.0));
    drop(idle.remove(0));
    drop(idle.remove(0));
    let deadline = Instant::now() + Duration::from_secs(5);
    while open().await != Some(1.0) {
        assert!(
            Instant::now() < deadline,
            "the third was not accepted once room was made"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let events = stop_and_read_events(gw);
    let full: Vec<_> = events
        .iter()
        .filter(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("max_connections reached"))
        })
        .collect();
    assert_eq!(full.len(), 1, "{events:?}");
    assert_eq!(full[0]["level"], "WARN");
    assert_eq!(full[0]["max_connections"], 2);
}

/// `sluice run` with `shutdown_grace`, a stream open through it (a mock
/// answering a chunk every 2 s) and the stream's reader.
async fn streaming_through(
    grace: &str,
) -> (
    tempfile::TempDir,
    Running,
    tokio::task::JoinHandle<client::Reply>,
) {
    let (dir, gw, proxy) =
        running_before_slow_mock(grace, "{ stream_chunks: 5, chunk_interval: 2s }").await;
    let resp = open_stream(proxy, "m").await;
    let rest = tokio::spawn(client::read(resp));
    (dir, gw, rest)
}

/// A streamed chat completion of `model` through the proxy at `proxy`,
/// once its head has come (a 200).
async fn open_stream(
    proxy: impl std::fmt::Display,
    model: &str,
) -> http::Response<hyper::body::Incoming> {
    let hyper_client = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let body = format!(
        r#"{{"model":"{model}","stream":true,"messages":[{{"role":"user","content":"Say hello to the whole team"}}]}}"#
    );
    let req = http::Request::post(format!("http://{proxy}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("request");
    let resp = tokio::time::timeout(Duration::from_secs(5), hyper_client.request(req))
        .await
        .expect("the stream's head within 5s")
        .expect("the stream starts");
    assert_eq!(resp.status(), 200);
    resp
}

/// `sluice run`, ready, with `shutdown_grace` and a route `/v1/` to a
/// mock upstream of `mock`'s settings; its proxy address.
async fn running_before_slow_mock(
    grace: &str,
    mock: &str,
) -> (tempfile::TempDir, Running, SocketAddr) {
    let dir = tempfile::tempdir().expect("temp dir");
    let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let yaml = format!(
        "\
listen: {proxy}
admin: {{ listen: {admin} }}
limits: {{ shutdown_grace: {grace} }}
upstreams:
  slow: {{ mock: {mock} }}
routes:
  - {{ name: chat, match: {{ path_prefix: /v1/ }}, auth: none, upstream: slow }}
"
    );
    let path = write(dir.path(), "proxy.yaml", &yaml);
    let gw = Running(run_logging(&path).spawn().expect("spawn sluice run"));
    wait_ready(admin).await;
    (dir, gw, proxy)
}

/// The one access line of `events`, of a request sluice cut with
/// `status`, and `stopped` the last line, after it.
fn the_cut_line(events: &[serde_json::Value], status: u16) {
    let access: Vec<_> = events
        .iter()
        .filter(|e| e["target"] == "sluice::access")
        .collect();
    assert_eq!(access.len(), 1, "{events:?}");
    assert_eq!(access[0]["error"], "server_shutdown", "{}", access[0]);
    assert_eq!(access[0]["status"], status);
    assert_eq!(
        events.last().and_then(|e| e["message"].as_str()),
        Some("stopped"),
        "{events:?}"
    );
}

/// Sends `signal` to our own child sluice.
fn signal(child: &Running, signal: libc::c_int) {
    let pid = libc::pid_t::try_from(child.0.id()).expect("pid fits");
    // SAFETY: signals our own child, whose pid it still holds (not reaped).
    assert_eq!(unsafe { libc::kill(pid, signal) }, 0, "kill failed");
}

/// The stream `rest` reads was cut: it ends with sluice's
/// `server_shutdown` error event, never complete-looking (no `[DONE]`),
/// and the one access line says sluice cut it; the events logged.
async fn cut_by_sluice(
    gw: Running,
    rest: tokio::task::JoinHandle<client::Reply>,
) -> Vec<serde_json::Value> {
    let reply = tokio::time::timeout(Duration::from_secs(5), rest)
        .await
        .expect("the stream ends")
        .expect("stream task");
    let text = reply.text();
    let last = text
        .trim_end()
        .rsplit("\n\n")
        .next()
        .and_then(|event| event.strip_prefix("data: "))
        .and_then(|data| serde_json::from_str::<serde_json::Value>(data).ok());
    assert_eq!(
        last.as_ref().map(|e| &e["error"]["code"]),
        Some(&serde_json::json!("server_shutdown")),
        "{text}"
    );
    assert!(text.starts_with("data: "), "a chunk came before: {text}");
    assert!(!text.contains("[DONE]"), "{text}");
    let events = stop_and_read_events(gw);
    the_cut_line(&events, 200);
    events
}

/// A stream still open when `shutdown_grace` runs out is cut, and its
/// access-log line says sluice cut it rather than blaming the client.
#[tokio::test]
async fn a_stream_cut_at_the_end_of_the_grace_is_logged_as_cut_by_sluice() {
    let (_dir, mut gw, rest) = streaming_through("500ms").await;
    signal(&gw, libc::SIGTERM);
    let status = gw
        .exit_within(Duration::from_secs(5))
        .expect("exits after the grace");
    assert_eq!(status.code(), Some(0));
    cut_by_sluice(gw, rest).await;
}

/// A request still waiting for its upstream's answer when
/// `shutdown_grace` runs out is answered 503 `server_shutdown` (with
/// `connection: close`), as its access line says, not closed unanswered.
#[tokio::test]
async fn a_request_unanswered_at_the_end_of_the_grace_gets_a_503() {
    let (_dir, mut gw, proxy) = running_before_slow_mock("300ms", "{ latency: 10s }").await;
    let waiting = tokio::spawn(async move {
        Client::new()
            .post_json(
                &format!("http://{proxy}/v1/chat/completions"),
                &[],
                r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&gw, libc::SIGTERM);
    let reply = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("answered within the grace and a little")
        .expect("request task");
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "server_shutdown");
    assert_eq!(reply.header("connection"), Some("close"));
    assert!(reply.header("x-request-id").is_some());
    let status = gw
        .exit_within(Duration::from_secs(5))
        .expect("exits after the grace");
    assert_eq!(status.code(), Some(0));
    the_cut_line(&stop_and_read_events(gw), 503);
}

/// A second signal during the drain (Ctrl-C twice, an impatient
/// supervisor) ends it at once, as the grace running out would: the
/// stream still open is cut and logged so, and sluice exits 0.
#[tokio::test]
async fn a_second_signal_ends_the_drain_at_once() {
    let (_dir, mut gw, rest) = streaming_through("60s").await;
    signal(&gw, libc::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(gw.0.try_wait().expect("wait").is_none(), "still draining");
    signal(&gw, libc::SIGINT);
    let status = gw
        .exit_within(Duration::from_secs(5))
        .expect("exits at once, not after the 60 s grace");
    assert_eq!(status.code(), Some(0));
    let events = cut_by_sluice(gw, rest).await;
    let again = events.iter().filter(|e| e["signal"] == "SIGINT").count();
    assert_eq!(again, 1, "{events:?}");
}

#[test]
fn hash_key_prints_the_sha256_of_its_argument() {
    // Blanks around a key are no part of it (a client's are trimmed too).
    for key in ["test", " test\n"] {
        let out = sluice()
            .args(["hash-key", key])
            .output()
            .expect("run sluice hash-key");
        assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
        assert_eq!(stdout(&out), format!("{HASH_OF_TEST}\n"), "{key:?}");
    }
    // A key may start with `-`: hashed, not parsed as a flag (whose
    // error would quote it).
    let out = sluice()
        .args(["hash-key", "-sk-dash-key"])
        .output()
        .expect("run sluice hash-key");
    assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
    assert!(stdout(&out).starts_with("sha256:"), "{}", stdout(&out));
}

/// `sluice hash-key` with `input` on its stdin.
fn hash_key_from_stdin(input: &str) -> Output {
    let mut child = sluice()
        .arg("hash-key")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice hash-key");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    child.wait_with_output().expect("wait")
}

#[test]
fn hash_key_reads_stdin_without_the_trailing_newline() {
    for input in ["test\n", "test\r\n", "test", "  test \n"] {
        let out = hash_key_from_stdin(input);
        assert_eq!(out.status.code(), Some(0), "stderr: {}", stderr(&out));
        assert_eq!(stdout(&out), format!("{HASH_OF_TEST}\n"), "input {input:?}");
    }
    // An empty key is refused rather than hashed.
    let out = hash_key_from_stdin("\n");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stdout(&out), "");
    assert_eq!(stderr(&out), "sluice hash-key: the key is empty\n");
}

/// Two lines are two keys: no client can send a key with a line break.
#[test]
fn hash_key_refuses_a_key_with_a_line_break() {
    let out = hash_key_from_stdin("one\ntwo\n");
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(stdout(&out), "");
    assert_eq!(
        stderr(&out),
        "sluice hash-key: the key holds a line break; give one key\n"
    );
}

/// An output that cannot be written is reported, never a panic: a full
/// disk is an error (exit 2), a reader gone early (`| head`) is not.
#[test]
fn an_unwritable_stdout_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write(dir.path(), "good.yaml", GOOD);
    let full = || std::fs::File::create("/dev/full").expect("/dev/full");
    for args in [
        vec!["hash-key", "abc"],
        vec!["check", "--config", path.to_str().unwrap()],
    ] {
        let out = sluice()
            .args(&args)
            .stdout(full())
            .output()
            .expect("run sluice");
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).starts_with("sluice: cannot write to standard output:"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    // A closed pipe: the reader is gone before sluice writes.
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = sluice()
        .args(["hash-key", "abc"])
        .stdout(writer)
        .output()
        .expect("run sluice");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
}

#[tokio::test]
async fn mock_command_serves_openai_chat_completions() {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let child = sluice()
        .args(["mock", "--listen", &addr.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sluice mock");
    let mut mock = Running(child);
    assert!(
        wait_listening(addr, Duration::from_secs(5)),
        "sluice mock is not listening on {addr}: {:?}",
        mock.0.try_wait()
    );
    let reply = Client::new()
        .post_json(
            &format!("http://{addr}/v1/chat/completions"),
            &[],
            r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello"}]}"#,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["object"], "chat.completion", "{body}");
    assert_eq!(body["model"], "gpt-4o-mini", "{body}");
    let usage = &body["usage"];
    let prompt = usage["prompt_tokens"].as_u64().expect("prompt_tokens");
    let completion = usage["completion_tokens"]
        .as_u64()
        .expect("completion_tokens");
    assert!(prompt > 0 && completion > 0, "{usage}");
    assert_eq!(usage["total_tokens"].as_u64(), Some(prompt + completion));
    let _ = mock.0.kill();
    let _ = mock.0.wait();
}

#[tokio::test]
async fn sigterm_drains_an_in_flight_stream_then_exits_0() {
    let dir = tempfile::tempdir().expect("temp dir");
    let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let yaml = format!(
        "\
listen: {proxy}
admin: {{ listen: {admin} }}
limits: {{ shutdown_grace: 10s }}
upstreams:
  slow:
    mock: {{ stream_chunks: 5, chunk_interval: 300ms }}
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
    auth: none
    upstream: slow
"
    );
    let path = write(dir.path(), "proxy.yaml", &yaml);
    let log_path = dir.path().join("stdout.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let err_path = dir.path().join("stderr.log");
    let err = std::fs::File::create(&err_path).expect("stderr file");
    let child = sluice()
        .args(["run", "--config"])
        .arg(&path)
        // One thread: the single-threaded runtime a one-CPU pod gets
        // (the other `run` tests use the machine's CPUs).
        .env("TOKIO_WORKER_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .expect("spawn sluice run");
    let mut gw = Running(child);
    let output = || {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            std::fs::read_to_string(&log_path).unwrap_or_default(),
            std::fs::read_to_string(&err_path).unwrap_or_default()
        )
    };

    let readyz = format!("http://{admin}/readyz");
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_of(&readyz).await != Some(StatusCode::OK) {
        assert!(
            Instant::now() < deadline,
            "/readyz never answered 200\n{}",
            output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A streamed completion; wait for its first event.
    let resp = open_stream(&proxy, "gpt-4o-mini").await;
    let (parts, mut body) = resp.into_parts();
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("the first event within 5s")
        .expect("a first frame")
        .expect("a good first frame")
        .into_data()
        .expect("a data frame");
    assert!(first.starts_with(b"data: "), "{first:?}");
    let rest = tokio::spawn(client::read(http::Response::from_parts(parts, body)));

    signal(&gw, libc::SIGTERM);

    // Draining: /readyz turns 503 while the stream is still going.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match status_of(&readyz).await {
            Some(StatusCode::SERVICE_UNAVAILABLE) => break,
            other => assert!(
                Instant::now() < deadline,
                "/readyz answered {other:?} after SIGTERM, not 503\n{}",
                output()
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !rest.is_finished(),
        "the stream ended before /readyz turned 503"
    );
    assert!(
        matches!(gw.0.try_wait(), Ok(None)),
        "sluice exited while a stream was in flight\n{}",
        output()
    );

    let reply = tokio::time::timeout(Duration::from_secs(10), rest)
        .await
        .expect("the stream ends within 10s")
        .expect("stream task");
    assert!(
        reply.body_error.is_none(),
        "the stream was cut: {:?}",
        reply.body_error
    );
    let mut text = String::from_utf8_lossy(&first).into_owned();
    text.push_str(&reply.text());
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    // The role event, 5 content events, the finish event and [DONE].
    assert_eq!(text.matches("data: ").count(), 8, "{text}");

    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Ok(Some(status)) = gw.0.try_wait() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "sluice did not exit within 5s of the drain\n{}",
            output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status.code(), Some(0), "{}", output());
    let serving = std::fs::read_to_string(&log_path)
        .unwrap_or_default()
        .lines()
        .find(|l| l.contains("sluice is serving"))
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok());
    assert_eq!(
        serving.as_ref().map(|l| &l["threads"]),
        Some(&serde_json::json!(1)),
        "{}",
        output()
    );
    // Where limits and budgets live, said once at start.
    assert_eq!(
        serving.as_ref().map(|l| &l["state"]),
        Some(&serde_json::json!("memory")),
        "{}",
        output()
    );
}

#[tokio::test]
async fn sighup_and_an_edited_file_reload_the_running_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let yaml = format!(
        "\
listen: {proxy}
admin: {{ listen: {admin} }}
upstreams:
  demo: {{ mock: {{}} }}
routes:
  - name: first
    match: {{ path_prefix: /v1/, methods: [POST] }}
    auth: none
    upstream: demo
"
    );
    let path = write(dir.path(), "proxy.yaml", &yaml);
    let child = sluice()
        .args(["run", "--config"])
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn sluice run");
    let mut gw = Running(child);
    let metrics = format!("http://{admin}/metrics");
    let reloads = |result: &'static str| {
        let metrics = metrics.clone();
        async move {
            let text = Client::new().get(&metrics).await.text();
            crate::support::gateway::sample(
                &text,
                "sluice_config_reloads_total",
                &[("result", result)],
            )
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_of(&format!("http://{admin}/readyz")).await != Some(StatusCode::OK) {
        assert!(Instant::now() < deadline, "/readyz never answered 200");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(reloads("ok").await, Some(0.0));

    signal(&gw, libc::SIGHUP);
    // An unchanged file still reloads on SIGHUP: the environment or a
    // referenced file may have changed.
    let deadline = Instant::now() + Duration::from_secs(5);
    while reloads("ok").await != Some(1.0) {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Edited in place: the watcher reloads it.
    let models = format!("http://{proxy}/v1/models");
    assert_eq!(
        status_of(&models).await,
        Some(StatusCode::METHOD_NOT_ALLOWED)
    );
    std::fs::write(&path, yaml.replace("[POST]", "[GET, POST]")).expect("edit config");
    let deadline = Instant::now() + Duration::from_secs(5);
    while status_of(&models).await != Some(StatusCode::OK) {
        assert!(
            Instant::now() < deadline,
            "the edited config was not loaded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(reloads("ok").await, Some(2.0));
    assert_eq!(reloads("error").await, Some(0.0));
    assert!(matches!(gw.0.try_wait(), Ok(None)), "still running");
}

/// A secret pasted where a key name or a setting belongs is not repeated
/// by `check` (nor by `run`, which prints the same errors): the position
/// says where it is. A misspelt key is still shown.
#[test]
fn check_does_not_repeat_what_could_be_a_secret() {
    let dir = tempfile::tempdir().expect("temp dir");
    let routes = "routes:\n  - name: chat\n    match: { path_prefix: / }\n    upstream: demo\n";
    for (file, body, at, shown) in [
        (
            "key.yaml",
            "upstreams:\n  demo: { mock: {} }\nauth:\n  api_keys:\n    - id: team-a\n      sk-team-a-PLAINSECRET-777: 1\n",
            "6:7",
            "unknown key (not repeated here: it could be a secret), expected one of id, key",
        ),
        (
            "url.yaml",
            "upstreams:\n  demo: { mock: {} }\nstate:\n  backend: \"redis://:s3cretpass@127.0.0.1:6379\"\n",
            "4:12",
            "not one of: memory, redis (the value is not repeated here",
        ),
        (
            "typo.yaml",
            "upstreams:\n  demo: { mock: {} }\nstate:\n  bakend: memory\n",
            "4:3",
            "unknown field `bakend`",
        ),
    ] {
        let path = write(dir.path(), file, &format!("{body}{routes}"));
        let out = sluice()
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("run sluice check");
        assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
        let errors = stderr(&out);
        assert!(
            !errors.contains("PLAINSECRET") && !errors.contains("s3cretpass"),
            "{errors}"
        );
        let p = path.display();
        assert!(
            errors
                .lines()
                .any(|l| l.starts_with(&format!("{p}:{at}: {shown}"))),
            "{errors}"
        );
    }
}

/// A `SLUICE_LOG` that is no log filter is said on stderr at start, not
/// silently replaced by the configured level.
#[tokio::test]
async fn an_unreadable_sluice_log_is_reported() {
    let dir = tempfile::tempdir().expect("temp dir");
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let yaml = GOOD.replace("{ listen: 127.0.0.1:0 }", &format!("{{ listen: {admin} }}"));
    let path = write(dir.path(), "proxy.yaml", &yaml);
    // A level misspelt would read as a target, and silence the rest.
    for filter in ["garbage[[[", "warning"] {
        let mut cmd = run_logging(&path);
        cmd.env("SLUICE_LOG", filter).stderr(Stdio::piped());
        let mut gw = Running(cmd.spawn().expect("spawn sluice run"));
        wait_ready(admin).await;
        let _ = gw.0.kill();
        let _ = gw.0.wait();
        let mut err = String::new();
        if let Some(mut pipe) = gw.0.stderr.take() {
            std::io::Read::read_to_string(&mut pipe, &mut err).expect("read stderr");
        }
        assert!(
            err.contains(&format!("SLUICE_LOG={filter:?} is not a log filter")),
            "{err}"
        );
    }
}

#[test]
fn mock_refuses_zero_stream_chunks() {
    let out = sluice()
        .args(["mock", "--stream-chunks", "0"])
        .output()
        .expect("run sluice mock");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--stream-chunks"), "{}", stderr(&out));
}

/// Spend a replica kept in memory through a Redis outage is sent by its
/// next charge; stopping before one comes sends it on the way out, or
/// it would leave with the process.
#[tokio::test]
async fn spend_owed_to_redis_is_sent_when_stopping() {
    let Some(mut redis) = crate::support::RedisServer::start() else {
        return;
    };
    let answer = serde_json::json!({
        "id": "c", "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 500}
    });
    let upstream = MockUpstream::always(UpstreamReply::json(&answer)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (port, admin_port) = (free_port(), free_port());
    let config = write(
        dir.path(),
        "proxy.yaml",
        &format!(
            "listen: 127.0.0.1:{port}\nadmin: {{ listen: 127.0.0.1:{admin_port} }}\n\
             upstreams:\n  llm: {{ url: \"{}\" }}\n\
             routes:\n  - {{ name: chat, match: {{ path_prefix: / }}, auth: none, upstream: llm }}\n\
             pricing:\n  gpt-4o-mini: {{ input: 0.15, output: 0.60 }}\n\
             budget: {{ daily_usd: 100.0 }}\n\
             state: {{ backend: redis, redis_url: \"{}\", on_error: allow }}\n",
            upstream.url(),
            redis.url()
        ),
    );
    let mut gw = Running(run_logging(&config).spawn().expect("start sluice"));
    wait_ready(SocketAddr::from(([127, 0, 0, 1], admin_port))).await;
    redis.kill();
    let url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    for _ in 0..2 {
        let reply = Client::new().post_json(&url, &[], "{}").await;
        assert_eq!(reply.status, 200, "allow serves from memory");
    }
    // The charges land (in memory, owed) after each answer.
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.restart();
    signal(&gw, libc::SIGTERM);
    let status = gw.exit_within(Duration::from_secs(10)).expect("exits");
    assert_eq!(status.code(), Some(0));
    let day = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400);
    let spent: f64 = redis
        .cli(None, &["GET", &format!("sluice:budget:{{{day}:global}}")])
        .parse()
        .unwrap_or(0.0);
    assert!((spent - 0.0009).abs() < 1e-9, "Redis holds {spent}");
}
