//! `TestGateway`: the real gateway, in process, on `127.0.0.1:0`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use sluice::gateway::Gateway;
use sluice::reload::{self, Reloader};
use sluice::server::{self, Running};
use sluice::telemetry::log::LogSink;

pub struct TestGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub gw: Arc<Gateway>,
    logs: Arc<Mutex<Vec<u8>>>,
    running: Option<Running>,
    /// Keeps files the config refers to alive.
    pub dir: tempfile::TempDir,
}

impl TestGateway {
    /// Starts a gateway on `yaml`; `listen`/`admin` default to ephemeral ports.
    pub async fn start(yaml: &str) -> Self {
        Self::start_with_env(yaml, &[]).await
    }

    pub async fn start_with_env(yaml: &str, env: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::start_in(yaml, env, dir).await
    }

    /// Starts with files already placed in `dir` (certificates, schemas).
    pub async fn start_in(yaml: &str, env: &[(&str, &str)], dir: tempfile::TempDir) -> Self {
        let text = with_test_listeners(yaml);
        let env = env_map(env);
        let snapshot = sluice::config::load_str(&text, "test.yaml", dir.path(), &|name| {
            env.get(name).cloned()
        })
        .unwrap_or_else(|e| panic!("test config is invalid:\n{e}\n---\n{text}"));
        Self::launch(snapshot, dir, None).await
    }

    /// Starts from a config file laid out as a Kubernetes ConfigMap mount
    /// (`proxy.yaml` → `..data/proxy.yaml`, `..data` → a versioned dir),
    /// with hot reload on: [`TestGateway::swap_config`] updates it the way
    /// the kubelet does.
    pub async fn start_watched(yaml: &str, env: &[(&str, &str)], dir: tempfile::TempDir) -> Self {
        let root = dir.path();
        let text = with_test_listeners(yaml);
        std::fs::create_dir(root.join("..v0")).expect("config version dir");
        std::fs::write(root.join("..v0/proxy.yaml"), &text).expect("write config");
        std::os::unix::fs::symlink("..v0", root.join("..data")).expect("..data link");
        std::os::unix::fs::symlink("..data/proxy.yaml", root.join("proxy.yaml"))
            .expect("proxy.yaml link");
        let env = env_map(env);
        let path = root.join("proxy.yaml");
        let lookup = env.clone();
        let snapshot = sluice::config::load_str(&text, &path.display().to_string(), root, &|n| {
            lookup.get(n).cloned()
        })
        .unwrap_or_else(|e| panic!("test config is invalid:\n{e}\n---\n{text}"));
        let env: sluice::reload::Env = Arc::new(move |name: &str| env.get(name).cloned());
        Self::launch(snapshot, dir, Some((path, env))).await
    }

    /// A gateway on the config file at `path` (any layout, symlinks
    /// included), reloading it as it changes; `dir` lives as long as it.
    pub async fn start_at(path: PathBuf, dir: tempfile::TempDir) -> Self {
        let text = std::fs::read_to_string(&path).expect("read config");
        let base = path.parent().expect("config dir").to_path_buf();
        let snapshot =
            sluice::config::load_str(&text, &path.display().to_string(), &base, &|_| None)
                .unwrap_or_else(|e| panic!("test config is invalid:\n{e}\n---\n{text}"));
        let env: sluice::reload::Env = Arc::new(|_: &str| None);
        Self::launch(snapshot, dir, Some((path, env))).await
    }

    async fn launch(
        snapshot: sluice::snapshot::Snapshot,
        dir: tempfile::TempDir,
        reload: Option<(PathBuf, sluice::reload::Env)>,
    ) -> Self {
        let (sink, logs) = LogSink::capture();
        let gw = Gateway::new(snapshot, sink);
        let running = server::start(gw.clone()).await.expect("gateway starts");
        if let Some((path, env)) = reload {
            let reloader = Reloader::new(gw.clone(), path, env, &running);
            reload::spawn(reloader, reload::hangup().expect("SIGHUP handled"))
                .expect("hot reload starts");
        }
        TestGateway {
            addr: running.proxy_addr,
            admin: running.admin_addr,
            gw,
            logs,
            running: Some(running),
            dir,
        }
    }

    /// Replaces the config as a ConfigMap update does: a new version
    /// directory, then `..data` swapped to it by an atomic rename.
    pub fn swap_config(&self, yaml: &str) {
        static VERSION: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
        let n = VERSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = self.dir.path();
        let version = format!("..v{n}");
        std::fs::create_dir(root.join(&version)).expect("config version dir");
        std::fs::write(
            root.join(&version).join("proxy.yaml"),
            with_test_listeners(yaml),
        )
        .expect("write config");
        std::os::unix::fs::symlink(&version, root.join("..data_tmp")).expect("..data_tmp link");
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap ..data");
    }

    /// A ConfigMap update of several files (`proxy.yaml` among them, or
    /// not): a new version directory holding them, each reached from the
    /// mount as `name -> ..data/name`, then `..data` swapped to it.
    pub fn swap_files(&self, files: &[(&str, &str)]) {
        static VERSION: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
        let n = VERSION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let root = self.dir.path();
        let version = format!("..files{n}");
        std::fs::create_dir(root.join(&version)).expect("version dir");
        for (name, text) in files {
            let text = match *name {
                "proxy.yaml" => with_test_listeners(text),
                _ => (*text).to_owned(),
            };
            std::fs::write(root.join(&version).join(name), text).expect("write file");
            let link = root.join(name);
            if std::fs::symlink_metadata(&link).is_err() {
                std::os::unix::fs::symlink(format!("..data/{name}"), &link).expect("file link");
            }
        }
        std::os::unix::fs::symlink(&version, root.join("..data_tmp")).expect("..data_tmp link");
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).expect("swap ..data");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Every log line written so far, parsed.
    pub fn log_lines(&self) -> Vec<Value> {
        let raw = self.logs.lock().expect("log buffer").clone();
        String::from_utf8_lossy(&raw)
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// The raw log text.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&self.logs.lock().expect("log buffer")).into_owned()
    }

    /// Access-log events so far.
    pub fn access_logs(&self) -> Vec<Value> {
        self.log_lines()
            .into_iter()
            .filter(|l| l["target"] == "sluice::access")
            .collect()
    }

    /// Waits until `n` access-log events exist (they are written when the
    /// response body ends, which can be just after the client saw it).
    pub async fn wait_access_logs(&self, n: usize) -> Vec<Value> {
        let ok = super::eventually(std::time::Duration::from_secs(5), || {
            self.access_logs().len() >= n
        })
        .await;
        assert!(
            ok,
            "expected {n} access-log lines, got:\n{}",
            self.log_text()
        );
        self.access_logs()
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let reply = super::Client::new().get(&self.admin_url("/metrics")).await;
        assert_eq!(reply.status, 200);
        reply.text()
    }

    /// The value of the sample of `name` whose labels include `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let text = self.metrics().await;
        sample(&text, name, labels)
    }

    /// Whether the sample of `name` with `labels` reaches `value` within
    /// `within` (polled every 20 ms).
    pub async fn metric_reaches(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        value: f64,
        within: Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.metric(name, labels).await == Some(value) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Begins a graceful shutdown, as SIGTERM does.
    pub fn shutdown(&self) {
        if let Some(r) = &self.running {
            r.shutdown();
        }
    }

    /// Waits for the drain to end.
    pub async fn stopped(mut self) {
        if let Some(r) = self.running.take() {
            r.wait().await;
        }
    }
}

/// The test's listeners on ephemeral ports, unless the config sets them.
pub fn with_test_listeners(yaml: &str) -> String {
    let mut text = String::new();
    if !yaml.contains("\nlisten:") && !yaml.starts_with("listen:") {
        text.push_str("listen: 127.0.0.1:0\n");
    }
    if !yaml.contains("admin:") {
        text.push_str("admin: { listen: 127.0.0.1:0 }\n");
    }
    text.push_str(yaml);
    text
}

fn env_map(env: &[(&str, &str)]) -> Arc<HashMap<String, String>> {
    Arc::new(
        env.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
    )
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some(r) = &self.running {
            r.shutdown();
        }
    }
}

/// Finds a sample in Prometheus text by name and a subset of its labels.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let (label_part, value) = match rest.strip_prefix('{') {
            Some(r) => {
                let end = r.find('}')?;
                (&r[..end], &r[end + 1..])
            }
            None if rest.starts_with(' ') => ("", rest),
            None => return None,
        };
        let all_match = labels.iter().all(|(k, v)| {
            label_part
                .split(',')
                .any(|pair| pair == format!("{k}=\"{v}\""))
        });
        if all_match {
            value.trim().parse().ok()
        } else {
            None
        }
    })
}
