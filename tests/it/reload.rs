//! Hot reload: a ConfigMap-style symlink swap reloads the config; an
//! invalid one is refused while traffic keeps flowing; limits and cache
//! entries survive; a request in flight finishes on the config it started
//! with; a certificate rotated in place serves the next connection.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::support::{
    Client, MockUpstream, TestGateway, TestPki, UpstreamReply, eventually, tls_listener_config,
};

fn config(url: &str, extra_route: &str) -> String {
    format!(
        r#"
upstreams:
  llm: {{ url: "{url}" }}
auth:
  api_keys:
    - {{ id: alice, key: sk-alice-0001 }}
routes:
{extra_route}
  - name: chat
    match: {{ path_prefix: /v1/ }}
    rate_limit: {{ requests_per_minute: 5 }}
    cache: {{ ttl: 10m }}
    upstream: llm
"#
    )
}

const ALICE: (&str, &str) = ("authorization", "Bearer sk-alice-0001");

async fn reloads(gw: &TestGateway, result: &str) -> f64 {
    gw.metric("sluice_config_reloads_total", &[("result", result)])
        .await
        .unwrap_or(-1.0)
}

async fn wait_reloads(gw: &TestGateway, result: &str, n: f64) {
    for _ in 0..100 {
        if reloads(gw, result).await >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "expected {n} {result} reloads, have {}\n{}",
        reloads(gw, result).await,
        gw.log_text()
    );
}

/// The `errors` of each `config_reload_failed` line logged so far.
fn reload_failures(gw: &TestGateway) -> Vec<String> {
    gw.log_lines()
        .into_iter()
        .filter(|l| l["event"] == "config_reload_failed")
        .map(|l| l["errors"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn a_configmap_symlink_swap_reloads_the_config() {
    let old = MockUpstream::always(UpstreamReply::text("old")).await;
    let new = MockUpstream::always(UpstreamReply::text("new")).await;
    let gw = TestGateway::start_watched(&config(&old.url(), ""), &[], tempfile::tempdir().unwrap())
        .await;
    let client = Client::new();
    assert_eq!(
        reloads(&gw, "ok").await,
        0.0,
        "the series exists from start"
    );
    let before = client.get(&gw.url("/v1/models")).await;
    assert_eq!(before.status, 401);

    gw.swap_config(&config(&new.url(), "").replace(
        "  - name: chat\n",
        "  - name: open\n    match: { path_prefix: /open/ }\n    auth: none\n    upstream: llm\n  - name: chat\n",
    ));
    wait_reloads(&gw, "ok", 1.0).await;
    let open = client.get(&gw.url("/open/x")).await;
    assert_eq!(open.status, 200);
    assert_eq!(open.text(), "new");
    assert_eq!(reloads(&gw, "error").await, 0.0);
    assert!(
        gw.log_lines()
            .iter()
            .any(|l| l["event"] == "config_reloaded"),
        "{}",
        gw.log_text()
    );
}

/// A reload keeps an upstream's pooled connections (and, on https, its
/// TLS sessions) when the upstream itself did not change; one whose URL
/// changed gets a client of its own.
#[tokio::test]
async fn a_reload_keeps_the_connections_of_unchanged_upstreams() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let other = MockUpstream::always(UpstreamReply::text("other")).await;
    let yaml = |limit: u32, url: &str| {
        config(url, "").replace(
            "requests_per_minute: 5",
            &format!("requests_per_minute: {limit}"),
        )
    };
    let gw =
        TestGateway::start_watched(&yaml(100, &up.url()), &[], tempfile::tempdir().unwrap()).await;
    let client = Client::new();
    // Past the route's cache: every request reaches the upstream.
    let url = gw.url("/v1/x");
    let send = || client.post_json(&url, &[ALICE, ("cache-control", "no-store")], "{}");
    assert_eq!(send().await.status, 200);
    gw.swap_config(&yaml(200, &up.url()));
    wait_reloads(&gw, "ok", 1.0).await;
    assert_eq!(send().await.status, 200);
    assert_eq!(up.seen().len(), 2);
    assert_eq!(
        up.connections(),
        1,
        "the reload dropped the pooled connection"
    );

    gw.swap_config(&yaml(200, &other.url()));
    wait_reloads(&gw, "ok", 2.0).await;
    assert_eq!(send().await.text(), "other");
}

#[tokio::test]
async fn an_invalid_config_is_refused_while_traffic_keeps_flowing() {
    let upstream = MockUpstream::always(UpstreamReply::text("ok")).await;
    let url = upstream.url();
    let yaml = config(&url, "").replace("requests_per_minute: 5", "requests_per_minute: 100000");
    let gw = Arc::new(TestGateway::start_watched(&yaml, &[], tempfile::tempdir().unwrap()).await);
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (gw, stop) = (gw.clone(), stop.clone());
        tokio::spawn(async move {
            let client = Client::new();
            let mut statuses = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let reply = client
                    .post_json(
                        &gw.url("/v1/x"),
                        &[ALICE, ("cache-control", "no-store")],
                        "{}",
                    )
                    .await;
                statuses.push(reply.status.as_u16());
            }
            statuses
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // A typo'd key, then an unknown upstream: each refused whole.
    gw.swap_config(&yaml.replace("rate_limit:", "rate_limt:"));
    wait_reloads(&gw, "error", 1.0).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.swap_config(&yaml.replace("upstream: llm", "upstream: nowhere"));
    wait_reloads(&gw, "error", 2.0).await;
    let last_ok = || gw.metric("sluice_config_last_reload_successful", &[]);
    assert_eq!(last_ok().await, Some(0.0), "the last reload was refused");
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.swap_config(&yaml.replace(
        "  - name: chat\n",
        "  - name: extra\n    match: { path: /extra }\n    auth: none\n    upstream: llm\n  - name: chat\n",
    ));
    wait_reloads(&gw, "ok", 1.0).await;
    assert_eq!(last_ok().await, Some(1.0), "the last reload succeeded");
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, Ordering::Relaxed);
    let statuses = load.await.unwrap();
    assert!(statuses.len() > 20, "the load ran: {}", statuses.len());
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every request succeeded: {statuses:?}"
    );
    let failures: Vec<String> = gw
        .log_lines()
        .into_iter()
        .filter(|l| l["event"] == "config_reload_failed" && l["level"] == "ERROR")
        .map(|l| l["errors"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(failures.len(), 2, "{}", gw.log_text());
    assert!(
        failures[0].contains("proxy.yaml:13:5: unknown field `rate_limt`"),
        "{failures:?}"
    );
    assert!(failures[1].contains("nowhere"), "{failures:?}");
    assert_eq!(Client::new().get(&gw.url("/extra")).await.status, 200);
    // A refused edit undone: the running text is back, nothing stands refused.
    gw.swap_config(&yaml.replace("rate_limit:", "rate_limt:"));
    wait_reloads(&gw, "error", 3.0).await;
    assert_eq!(last_ok().await, Some(0.0));
    gw.swap_config(&yaml.replace(
        "  - name: chat\n",
        "  - name: extra\n    match: { path: /extra }\n    auth: none\n    upstream: llm\n  - name: chat\n",
    ));
    assert!(
        crate::support::eventually(Duration::from_secs(5), || gw
            .log_text()
            .matches("config_reload")
            .count()
            > 0)
        .await
    );
    for _ in 0..100 {
        if last_ok().await == Some(1.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(last_ok().await, Some(1.0), "undone");
    let restored = gw
        .log_lines()
        .into_iter()
        .filter(|l| l["event"] == "config_restored")
        .count();
    assert_eq!(restored, 1, "the undoing is logged once");
}

#[tokio::test]
async fn limits_and_cache_entries_survive_a_reload() {
    let upstream = MockUpstream::always(UpstreamReply::text("answer")).await;
    let yaml = config(&upstream.url(), "");
    let gw = TestGateway::start_watched(&yaml, &[], tempfile::tempdir().unwrap()).await;
    let client = Client::new();
    let url = gw.url("/v1/chat/completions");
    for i in 0..4 {
        let body = format!("{{\"n\":{i}}}");
        assert_eq!(client.post_json(&url, &[ALICE], &body).await.status, 200);
    }
    gw.swap_config(&yaml.replace(
        "  - name: chat\n",
        "  - name: extra\n    match: { path: /extra }\n    auth: none\n    upstream: llm\n  - name: chat\n",
    ));
    wait_reloads(&gw, "ok", 1.0).await;
    // The fifth request of the minute is a hit of an entry stored before
    // the reload; the sixth is over the limit, counted across the reload.
    let hit = client.post_json(&url, &[ALICE], "{\"n\":0}").await;
    assert_eq!(hit.header("x-sluice-cache"), Some("HIT"));
    assert_eq!(hit.header("x-ratelimit-remaining-requests"), Some("0"));
    let refused = client.post_json(&url, &[ALICE], "{\"n\":9}").await;
    assert_eq!(refused.status, 429);
    assert_eq!(upstream.seen().len(), 4);
}

#[tokio::test]
async fn a_request_in_flight_finishes_on_the_config_it_started_with() {
    let slow =
        MockUpstream::always(UpstreamReply::text("slow answer").delay(Duration::from_millis(600)))
            .await;
    let yaml = format!(
        r#"
upstreams:
  app: {{ url: "{}" }}
routes:
  - name: app
    match: {{ path_prefix: /app/ }}
    auth: none
    upstream: app
"#,
        slow.url()
    );
    let gw = Arc::new(TestGateway::start_watched(&yaml, &[], tempfile::tempdir().unwrap()).await);
    let in_flight = {
        let gw = gw.clone();
        tokio::spawn(async move { Client::new().get(&gw.url("/app/x")).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.swap_config(&yaml.replace("path_prefix: /app/", "path_prefix: /moved/"));
    wait_reloads(&gw, "ok", 1.0).await;
    assert_eq!(Client::new().get(&gw.url("/app/x")).await.status, 404);
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "slow answer");
}

#[tokio::test]
async fn a_certificate_rotated_in_place_serves_the_next_connection() {
    let first = TestPki::new();
    let second = TestPki::new();
    let upstream = MockUpstream::always(UpstreamReply::text("ok")).await;
    let dir = tempfile::tempdir().unwrap();
    first.write_files(dir.path());
    let yaml = tls_listener_config(&upstream.url());
    let gw = TestGateway::start_watched(&yaml, &[], dir).await;
    let served = |pki: &TestPki| der(&pki.cert_pem);
    assert_eq!(
        peer_certificate(&gw, &[&first, &second]).await,
        served(&first)
    );

    // Written one file after the other, as a careless rotation would: the
    // moment where they do not match is refused, the final pair is served.
    std::fs::write(gw.path("tls.key"), &second.key_pem).unwrap();
    std::fs::write(gw.path("tls.crt"), &second.cert_pem).unwrap();
    assert!(
        serves_within_5s(&gw, &second, &first).await,
        "the new certificate was not served\n{}",
        gw.log_text()
    );
    assert!(gw.log_text().contains("tls_reloaded"), "{}", gw.log_text());
    assert_eq!(
        gw.metric("sluice_tls_reloads_total", &[("result", "ok")])
            .await,
        Some(1.0)
    );
}

fn der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// Whether new TLS connections get `new`'s certificate within 5 s (the
/// client trusting `old`'s CA too).
async fn serves_within_5s(gw: &TestGateway, new: &TestPki, old: &TestPki) -> bool {
    for _ in 0..100 {
        if peer_certificate(gw, &[old, new]).await == der(&new.cert_pem) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The certificate a new TLS connection to the gateway is served, with a
/// client that trusts both test CAs.
async fn peer_certificate(gw: &TestGateway, trusted: &[&TestPki]) -> Vec<u8> {
    let config = TestPki::client_config(trusted);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A certificate that does not match its key is refused once: files that
/// change beside it (a log written next to the config) neither retry it
/// nor log its failure again.
#[tokio::test]
async fn a_refused_certificate_is_reported_once() {
    let first = TestPki::new();
    let second = TestPki::new();
    let upstream = MockUpstream::always(UpstreamReply::text("ok")).await;
    let dir = tempfile::tempdir().unwrap();
    first.write_files(dir.path());
    let yaml = tls_listener_config(&upstream.url());
    let gw = TestGateway::start_watched(&yaml, &[], dir).await;
    // Half a rotation: the new certificate, the old key.
    std::fs::write(gw.path("tls.crt"), &second.cert_pem).unwrap();
    let failures = || gw.log_text().matches("tls_reload_failed").count();
    assert!(eventually(Duration::from_secs(5), || failures() == 1).await);
    for i in 0..5 {
        std::fs::write(gw.path("app.log"), format!("line {i}\n")).unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(failures(), 1, "{}", gw.log_text());
    assert_eq!(
        gw.metric("sluice_tls_last_reload_successful", &[]).await,
        Some(0.0)
    );
    for (result, count) in [("error", 1.0), ("ok", 0.0)] {
        assert_eq!(
            gw.metric("sluice_tls_reloads_total", &[("result", result)])
                .await,
            Some(count),
            "{result}"
        );
    }
    assert_eq!(
        peer_certificate(&gw, &[&first, &second]).await,
        der(&first.cert_pem),
        "the old pair keeps serving"
    );
}

/// The 64-model cap of a route holds across reloads (the series do not
/// go away with the old config), and an overlong model name is no label.
#[tokio::test]
async fn the_model_label_cap_outlives_a_reload() {
    let yaml = |methods: &str| {
        format!(
            r#"
upstreams:
  demo: {{ mock: {{}} }}
routes:
  - name: chat
    match: {{ path_prefix: /, methods: [{methods}] }}
    auth: none
    upstream: demo
"#
        )
    };
    let gw = TestGateway::start_watched(&yaml("POST"), &[], tempfile::tempdir().unwrap()).await;
    let c = Client::new();
    let ask = |model: String| {
        let c = &c;
        let url = gw.url("/v1/chat/completions");
        async move {
            let body =
                format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
            assert_eq!(c.post_json(&url, &[], &body).await.status, 200);
        }
    };
    ask("x".repeat(200)).await;
    for i in 0..40 {
        ask(format!("model-{i}")).await;
    }
    gw.swap_config(&yaml("GET, POST"));
    wait_reloads(&gw, "ok", 1.0).await;
    for i in 40..80 {
        ask(format!("model-{i}")).await;
    }
    gw.wait_access_logs(81).await;
    let m = gw.metrics().await;
    let models: std::collections::HashSet<&str> = m
        .lines()
        .filter(|l| l.starts_with("sluice_tokens_total{"))
        .filter_map(|l| l.split("model=\"").nth(1)?.split('"').next())
        .collect();
    assert!(models.iter().all(|m| m.len() <= 128), "{models:?}");
    // `other` took the overlong name first, then 63 names kept it company.
    assert_eq!(models.len(), 64, "{models:?}");
    assert!(models.contains("other"));
}

/// A config reached through a symlink into another directory (`etc/proxy.yaml
/// -> ../shared/proxy.yaml`) is edited where it lives: that edit reloads it.
#[tokio::test]
async fn an_edit_to_a_symlinked_config_in_another_directory_reloads_it() {
    let upstream = MockUpstream::always(UpstreamReply::text("ok")).await;
    let dir = tempfile::tempdir().unwrap();
    let (etc, shared) = (dir.path().join("etc"), dir.path().join("shared"));
    std::fs::create_dir_all(&etc).unwrap();
    std::fs::create_dir_all(&shared).unwrap();
    let yaml = crate::support::gateway::with_test_listeners(&config(&upstream.url(), ""));
    std::fs::write(shared.join("proxy.yaml"), &yaml).unwrap();
    std::os::unix::fs::symlink("../shared/proxy.yaml", etc.join("proxy.yaml")).unwrap();
    let gw = TestGateway::start_at(etc.join("proxy.yaml"), dir).await;
    assert_eq!(Client::new().get(&gw.url("/open/x")).await.status, 404);

    let open =
        "  - name: open\n    match: { path_prefix: /open/ }\n    auth: none\n    upstream: llm\n";
    std::fs::write(
        shared.join("proxy.yaml"),
        crate::support::gateway::with_test_listeners(&config(&upstream.url(), open)),
    )
    .unwrap();
    wait_reloads(&gw, "ok", 1.0).await;
    assert_eq!(Client::new().get(&gw.url("/open/x")).await.status, 200);
}

/// A ConfigMap update that changes only a file the config reads (here a
/// `schema_file`) is a change to the config: the new schema applies.
#[tokio::test]
async fn a_configmap_update_of_a_referenced_file_reloads_the_config() {
    let upstream = MockUpstream::always(UpstreamReply::text("ok")).await;
    let yaml = |validate: &str| {
        format!(
            "upstreams:\n  llm: {{ url: \"{}\" }}\nroutes:\n  - name: chat\n    match: {{ path_prefix: /v1/ }}\n    auth: none\n    validate: {validate}\n    upstream: llm\n",
            upstream.url()
        )
    };
    let gw = TestGateway::start_watched(&yaml("none"), &[], tempfile::tempdir().unwrap()).await;
    let with_schema = yaml("{ schema_file: chat.schema.json }");
    let anything = r#"{"type":"object"}"#;
    let strict = r#"{"type":"object","required":["must_have_this"]}"#;
    gw.swap_files(&[("proxy.yaml", &with_schema), ("chat.schema.json", anything)]);
    wait_reloads(&gw, "ok", 1.0).await;
    let client = Client::new();
    let url = gw.url("/v1/chat/completions");
    let post = || client.post_json(&url, &[], "{}");
    assert_eq!(post().await.status, 200);

    gw.swap_files(&[("proxy.yaml", &with_schema), ("chat.schema.json", strict)]);
    wait_reloads(&gw, "ok", 2.0).await;
    let refused = post().await;
    assert_eq!(refused.status, 400, "{}", refused.text());
}

/// A config change that lands while a certificate rotation is half
/// written is refused (loading checks the pair), and tried again once the
/// pair is whole: it is not lost until the next edit or SIGHUP.
#[tokio::test]
async fn a_config_refused_mid_rotation_is_applied_when_the_pair_is_whole() {
    let first = TestPki::new();
    let second = TestPki::new();
    let upstream = MockUpstream::always(UpstreamReply::text("ok")).await;
    let dir = tempfile::tempdir().unwrap();
    first.write_files(dir.path());
    let yaml = tls_listener_config(&upstream.url());
    let gw = TestGateway::start_watched(&yaml, &[], dir).await;
    std::fs::write(gw.path("tls.crt"), &second.cert_pem).unwrap();
    let failures = || gw.log_text().matches("tls_reload_failed").count();
    assert!(eventually(Duration::from_secs(5), || failures() == 1).await);

    let renamed = yaml.replace("name: app", "name: renamed");
    assert_ne!(renamed, yaml, "the config changes");
    gw.swap_config(&renamed);
    wait_reloads(&gw, "error", 1.0).await;
    std::fs::write(gw.path("tls.key"), &second.key_pem).unwrap();
    // The renamed config, refused once, is what this reload applies.
    wait_reloads(&gw, "ok", 1.0).await;
}

/// `config_needs_restart` compares a reloaded config with what the
/// process runs: a change of `listen` warns, and changing it back to the
/// address still bound does not warn again.
#[tokio::test]
async fn a_setting_changed_back_to_what_runs_needs_no_restart() {
    let upstream = MockUpstream::always(UpstreamReply::text("ok")).await;
    let base = config(&upstream.url(), "");
    let gw = TestGateway::start_watched(&base, &[], tempfile::tempdir().unwrap()).await;
    let warnings = || {
        gw.log_lines()
            .into_iter()
            .filter(|l| l["event"] == "config_needs_restart" && l["setting"] == "listen")
            .count()
    };
    gw.swap_config(&format!("listen: 127.0.0.1:1\n{base}"));
    wait_reloads(&gw, "ok", 1.0).await;
    assert_eq!(warnings(), 1, "{}", gw.log_text());
    gw.swap_config(&format!("listen: 127.0.0.1:0\n{base}"));
    wait_reloads(&gw, "ok", 2.0).await;
    assert_eq!(warnings(), 1, "{}", gw.log_text());
}

/// A reload does not move the listeners: an upstream at the address
/// still bound is sluice itself, though the new `listen` is elsewhere,
/// and is refused as `check` refuses one at `listen` (each request
/// would come back to sluice until connections ran out).
#[tokio::test]
async fn an_upstream_at_the_listener_still_bound_is_refused() {
    let upstream = MockUpstream::always(UpstreamReply::text("ok")).await;
    let base = config(&upstream.url(), "");
    let gw = TestGateway::start_watched(&base, &[], tempfile::tempdir().unwrap()).await;
    for at in [gw.addr, gw.admin] {
        let looping = base
            .replace(
                "upstreams:\n",
                &format!("upstreams:\n  me: {{ url: \"http://{at}\" }}\n"),
            )
            .replace(
                "routes:\n",
                "routes:\n  - name: loop\n    match: { path_prefix: /loop/ }\n    upstream: me\n",
            );
        gw.swap_config(&format!("listen: 127.0.0.1:1\n{looping}"));
        let refused = if at == gw.addr { 1.0 } else { 2.0 };
        wait_reloads(&gw, "error", refused).await;
        let reply = Client::new().get_with(&gw.url("/loop/x"), &[ALICE]).await;
        assert_eq!(reply.status, 404, "the old config serves");
    }
    let failures = reload_failures(&gw);
    assert_eq!(failures.len(), 2, "{}", gw.log_text());
    for failure in &failures {
        assert!(
            failure.contains("upstream `me` is sluice itself"),
            "{failure}"
        );
    }
    assert_eq!(reloads(&gw, "ok").await, 0.0);
}

/// A config without `tls` reloaded onto a TLS listener (which serves TLS
/// until restarted) leaves certificate rotation on: the files the
/// listener started with are still watched and re-read.
#[tokio::test]
async fn a_reload_dropping_tls_keeps_rotating_the_served_certificate() {
    let first = TestPki::new();
    let second = TestPki::new();
    let upstream = MockUpstream::always(UpstreamReply::text("ok")).await;
    let dir = tempfile::tempdir().unwrap();
    first.write_files(dir.path());
    let gw = TestGateway::start_watched(&tls_listener_config(&upstream.url()), &[], dir).await;
    gw.swap_config(&crate::support::app_config(&upstream.url(), ""));
    wait_reloads(&gw, "ok", 1.0).await;
    second.write_files(gw.path("").as_path());
    assert!(
        serves_within_5s(&gw, &second, &first).await,
        "still rotated\n{}",
        gw.log_text()
    );
}

/// A reload that removes an upstream (down, its circuit open) or the
/// budget drops their gauges: a removed upstream's 0 must not page as
/// down forever, nor a removed budget's figures keep its alerts firing.
#[tokio::test]
async fn a_reload_drops_the_gauges_of_what_it_removed() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let yaml = |extra: &str| {
        format!(
            r#"
upstreams:
  app: {{ url: "{}" }}
{extra}
routes:
  - name: chat
    match: {{ path_prefix: / }}
    auth: none
    upstream: app
"#,
            up.url()
        )
    };
    let with_old = yaml(
        "  old: { url: \"http://127.0.0.1:1\" }\npools:\n  llm: { members: [old], circuit_breaker: { failures: 1, cooldown: 60s } }\nbudget: { daily_usd: 1.0 }",
    )
    .replace("upstream: app", "upstream: llm");
    let gw = TestGateway::start_watched(&with_old, &[], tempfile::tempdir().unwrap()).await;
    assert_eq!(Client::new().get(&gw.url("/x")).await.status, 502);
    assert_eq!(
        gw.metric("sluice_upstream_up", &[("upstream", "old")])
            .await,
        Some(0.0)
    );
    assert_eq!(
        gw.metric("sluice_budget_limit_usd", &[("scope", "global")])
            .await,
        Some(1.0)
    );
    gw.swap_config(&yaml(""));
    wait_reloads(&gw, "ok", 1.0).await;
    assert_eq!(
        gw.metric("sluice_upstream_up", &[("upstream", "old")])
            .await,
        None,
        "{}",
        gw.metrics().await
    );
    assert_eq!(
        gw.metric("sluice_upstream_up", &[("upstream", "app")])
            .await,
        Some(1.0)
    );
    for gauge in ["sluice_budget_limit_usd", "sluice_budget_spent_usd"] {
        assert_eq!(
            gw.metric(gauge, &[("scope", "global")]).await,
            None,
            "{gauge}"
        );
    }
}

/// A config file deleted and written again later (an editor, a deploy
/// script) is still watched: its return reloads. Named by a path that
/// is not its canonical one (through a symlinked directory here; a
/// relative path is another such name), so that its directory is known
/// by two names.
#[tokio::test]
async fn a_config_file_deleted_then_written_again_reloads() {
    let upstream = MockUpstream::always(UpstreamReply::text("ok")).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("real")).unwrap();
    std::os::unix::fs::symlink("real", dir.path().join("conf")).unwrap();
    let path = dir.path().join("conf").join("proxy.yaml");
    let yaml =
        |extra: &str| crate::support::gateway::with_test_listeners(&config(&upstream.url(), extra));
    std::fs::write(&path, yaml("")).unwrap();
    let gw = TestGateway::start_at(path.clone(), dir).await;
    assert_eq!(Client::new().get(&gw.url("/open/x")).await.status, 404);

    std::fs::remove_file(&path).unwrap();
    wait_reloads(&gw, "error", 1.0).await;
    let open =
        "  - name: open\n    match: { path_prefix: /open/ }\n    auth: none\n    upstream: llm\n";
    std::fs::write(&path, yaml(open)).unwrap();
    wait_reloads(&gw, "ok", 1.0).await;
    assert_eq!(Client::new().get(&gw.url("/open/x")).await.status, 200);
}

/// A config rewritten in place by a script (`envsubst < t > proxy.yaml`),
/// a line at a time, is read once it is whole: not half-written (refused,
/// or applied without its later routes).
#[tokio::test]
async fn a_config_written_in_place_is_read_once_whole() {
    use std::io::Write;
    let (_up, gw, path) = watched().await;
    let old = std::fs::read_to_string(&path).unwrap();
    let new = old.replace(
        "  - name: chat\n",
        "  - name: open\n    match: { path_prefix: /open/ }\n    auth: none\n    upstream: llm\n  - name: chat\n",
    );
    assert_ne!(old, new);
    let mut file = std::fs::File::create(&path).unwrap();
    for line in new.lines() {
        writeln!(file, "{line}").unwrap();
        file.flush().unwrap();
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    drop(file);
    wait_reloads(&gw, "ok", 1.0).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(reloads(&gw, "error").await, 0.0, "{}", gw.log_text());
    assert_eq!(reloads(&gw, "ok").await, 1.0, "{}", gw.log_text());
    assert_eq!(Client::new().get(&gw.url("/open/x")).await.status, 200);
}

/// A config file removed, then put back unreadable for another reason
/// (here a byte that is not UTF-8), is refused and said twice: each
/// reason is its own refusal, and the second names the byte's place.
/// Put back whole, it is read again.
#[tokio::test]
async fn each_reason_a_config_file_cannot_be_read_is_said() {
    let (_up, gw, path) = watched().await;
    let good = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    wait_reloads(&gw, "error", 1.0).await;
    let mut bad = b"# caf\xe9\n".to_vec();
    bad.extend_from_slice(&good);
    std::fs::write(&path, &bad).unwrap();
    wait_reloads(&gw, "error", 2.0).await;
    let failures = reload_failures(&gw);
    assert_eq!(failures.len(), 2, "{}", gw.log_text());
    assert!(
        failures[0].contains("proxy.yaml:1:1: cannot read config"),
        "{failures:?}"
    );
    assert!(
        failures[1].contains("proxy.yaml:1:6: cannot read config: this byte is not UTF-8"),
        "{failures:?}"
    );
    // Put back as it was: the running config stands again.
    std::fs::write(&path, &good).unwrap();
    for _ in 0..100 {
        if gw.log_text().contains("config_restored") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let last_ok = gw.metric("sluice_config_last_reload_successful", &[]).await;
    assert_eq!(last_ok, Some(1.0), "{}", gw.log_text());
}

/// A gateway watching its config file in a directory of its own, in
/// front of an upstream answering "ok", and that file's path.
async fn watched() -> (MockUpstream, TestGateway, std::path::PathBuf) {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw =
        TestGateway::start_watched(&config(&up.url(), ""), &[], tempfile::tempdir().unwrap()).await;
    let path = gw.path("proxy.yaml");
    (up, gw, path)
}

const OPEN_ROUTE: &str =
    "  - name: open\n    match: { path_prefix: /open/ }\n    auth: none\n    upstream: llm\n";

/// The config's directory replaced under its name (`mv conf.new conf`,
/// or removed and made again): the new one is read and watched; the
/// watch had followed the old directory away.
#[tokio::test]
async fn a_config_directory_replaced_under_its_name_is_watched_again() {
    let upstream = MockUpstream::always(UpstreamReply::text("ok")).await;
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("conf");
    std::fs::create_dir(&conf).unwrap();
    let yaml =
        |route: &str| crate::support::gateway::with_test_listeners(&config(&upstream.url(), route));
    let closed = yaml("");
    std::fs::write(conf.join("proxy.yaml"), &closed).unwrap();
    let root = dir.path().to_path_buf();
    let gw = TestGateway::start_at(conf.join("proxy.yaml"), dir).await;
    let client = Client::new();
    let status = |path: &'static str| {
        let (client, gw) = (&client, &gw);
        async move { client.get(&gw.url(path)).await.status }
    };
    assert_eq!(status("/open/x").await, 404);

    // Replaced by a directory moved in its place.
    std::fs::create_dir(root.join("conf.new")).unwrap();
    std::fs::write(root.join("conf.new/proxy.yaml"), yaml(OPEN_ROUTE)).unwrap();
    std::fs::rename(&conf, root.join("conf.old")).unwrap();
    std::fs::rename(root.join("conf.new"), &conf).unwrap();
    wait_reloads(&gw, "ok", 1.0).await;
    assert_eq!(status("/open/x").await, 200);
    // The old one gone, an edit to the new one still reloads.
    std::fs::remove_dir_all(root.join("conf.old")).unwrap();
    std::fs::write(conf.join("proxy.yaml"), &closed).unwrap();
    wait_reloads(&gw, "ok", 2.0).await;
    assert_eq!(status("/open/x").await, 404);

    // Removed, then made again: seen within the retry.
    std::fs::remove_dir_all(&conf).unwrap();
    wait_reloads(&gw, "error", 1.0).await;
    std::fs::create_dir(&conf).unwrap();
    std::fs::write(conf.join("proxy.yaml"), yaml(OPEN_ROUTE)).unwrap();
    let reloaded = || {
        gw.log_lines()
            .iter()
            .filter(|l| l["event"] == "config_reloaded")
            .count()
    };
    assert!(
        eventually(Duration::from_secs(8), || reloaded() >= 3).await,
        "{}",
        gw.log_text()
    );
    assert_eq!(status("/open/x").await, 200);
    let failed: Vec<_> = gw
        .log_lines()
        .into_iter()
        .filter(|l| l["event"] == "watch_failed")
        .collect();
    assert_eq!(failed.len(), 1, "said once: {}", gw.log_text());
    assert!(failed[0]["message"].is_string(), "{}", failed[0]);
}

/// A directory on the config's path that is a symlink, swapped to deploy
/// (`current -> releases/2`): the swap reloads the config.
#[tokio::test]
async fn a_symlinked_directory_swapped_to_another_reloads_the_config() {
    let upstream = MockUpstream::always(UpstreamReply::text("ok")).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    for (release, route) in [("1", ""), ("2", OPEN_ROUTE)] {
        let release = root.join("releases").join(release);
        std::fs::create_dir_all(&release).unwrap();
        std::fs::write(
            release.join("proxy.yaml"),
            crate::support::gateway::with_test_listeners(&config(&upstream.url(), route)),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink("releases/1", root.join("current")).unwrap();
    let gw = TestGateway::start_at(root.join("current/proxy.yaml"), dir).await;
    assert_eq!(Client::new().get(&gw.url("/open/x")).await.status, 404);

    // Swapped atomically, as deploy tools do.
    std::os::unix::fs::symlink("releases/2", root.join("current.new")).unwrap();
    std::fs::rename(root.join("current.new"), root.join("current")).unwrap();
    wait_reloads(&gw, "ok", 1.0).await;
    assert_eq!(Client::new().get(&gw.url("/open/x")).await.status, 200);
}

/// Routes a reload removed leave no empty series behind (a generator
/// that versions route names would grow them without bound); what a
/// removed route counted stays, as a stopped counter does.
#[tokio::test]
async fn a_reload_drops_the_empty_series_of_removed_routes() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let yaml = |first: &str, second: &str| {
        format!(
            r#"
upstreams:
  app: {{ url: "{}" }}
routes:
  - name: {first}
    match: {{ path_prefix: /a/ }}
    auth: none
    cache: {{ ttl: 1m }}
    upstream: app
  - name: {second}
    match: {{ path_prefix: / }}
    auth: none
    upstream: app
"#,
            up.url()
        )
    };
    let gw = TestGateway::start_watched(
        &yaml("idle_v1", "busy_v1"),
        &[],
        tempfile::tempdir().unwrap(),
    )
    .await;
    assert_eq!(Client::new().get(&gw.url("/x")).await.status, 200);
    let route = |name: &'static str| [("route", name)];
    assert_eq!(
        gw.metric("sluice_in_flight_requests", &route("idle_v1"))
            .await,
        Some(0.0)
    );
    gw.swap_config(&yaml("idle_v2", "busy_v2"));
    wait_reloads(&gw, "ok", 1.0).await;
    let text = gw.metrics().await;
    assert!(!text.contains("route=\"idle_v1\""), "{text}");
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("sluice_in_flight_requests{route=\"busy_v1\"")),
        "{text}"
    );
    assert_eq!(
        gw.metric("sluice_request_duration_seconds_count", &route("busy_v1"))
            .await,
        Some(1.0),
        "what it counted stays"
    );
    assert_eq!(
        gw.metric("sluice_in_flight_requests", &route("idle_v2"))
            .await,
        Some(0.0)
    );
}
