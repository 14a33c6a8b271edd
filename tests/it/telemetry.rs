//! Metrics and the access log as operators read them.

use std::time::Duration;

use crate::support::{Client, MockUpstream, TestGateway, UpstreamReply};

fn config(url: &str) -> String {
    format!(
        r#"
upstreams:
  app: {{ url: "{url}" }}
routes:
  - name: app
    match: {{ path_prefix: / }}
    auth: none
    upstream: app
"#
    )
}

#[tokio::test]
async fn request_metrics_count_what_happened() {
    let up = MockUpstream::always(UpstreamReply::text("ok").delay(Duration::from_millis(20))).await;
    let gw = TestGateway::start(&config(&up.url())).await;
    let c = Client::new();
    for _ in 0..3 {
        assert_eq!(c.get(&gw.url("/x")).await.status, 200);
    }
    gw.wait_access_logs(3).await;
    let m = gw.metrics().await;
    let get =
        |name: &str, labels: &[(&str, &str)]| crate::support::gateway::sample(&m, name, labels);
    assert_eq!(
        get(
            "sluice_requests_total",
            &[("route", "app"), ("method", "GET"), ("status", "200")]
        ),
        Some(3.0)
    );
    assert_eq!(
        get("sluice_request_duration_seconds_count", &[("route", "app")]),
        Some(3.0)
    );
    assert_eq!(
        get("sluice_overhead_seconds_count", &[("route", "app")]),
        Some(3.0)
    );
    // Overhead excludes the upstream's 20 ms: it stays far below it.
    let overhead = get("sluice_overhead_seconds_sum", &[("route", "app")]).unwrap();
    let total = get("sluice_request_duration_seconds_sum", &[("route", "app")]).unwrap();
    assert!(total >= 0.06, "total {total}");
    assert!(
        overhead < total / 2.0,
        "overhead {overhead} vs total {total}"
    );
    assert_eq!(
        get(
            "sluice_upstream_requests_total",
            &[("upstream", "app"), ("outcome", "ok")]
        ),
        Some(3.0)
    );
    assert_eq!(
        get(
            "sluice_upstream_duration_seconds_count",
            &[("upstream", "app")]
        ),
        Some(3.0)
    );
    assert_eq!(
        get(
            "sluice_upstream_first_byte_seconds_count",
            &[("upstream", "app")]
        ),
        Some(3.0)
    );
    assert_eq!(
        get("sluice_in_flight_requests", &[("route", "app")]),
        Some(0.0)
    );
    assert_eq!(
        get(
            "sluice_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert!(m.contains("sluice_request_duration_seconds_bucket{route=\"app\",le=\"0.001\"}"));
    assert!(m.contains("sluice_request_duration_seconds_bucket{route=\"app\",le=\"120\"}"));
}

#[tokio::test]
async fn in_flight_counts_open_streams() {
    let up =
        MockUpstream::always(UpstreamReply::sse(&["1", "2"], Duration::from_millis(600))).await;
    let gw = TestGateway::start(&config(&up.url())).await;
    let url = gw.url("/stream");
    let task = tokio::spawn(async move { Client::new().get(&url).await });
    let seen_one = gw
        .metric_reaches(
            "sluice_in_flight_requests",
            &[("route", "app")],
            1.0,
            Duration::from_secs(1),
        )
        .await;
    assert!(seen_one, "an open stream must count as in flight");
    task.await.unwrap();
    gw.wait_access_logs(1).await;
    assert_eq!(
        gw.metric("sluice_in_flight_requests", &[("route", "app")])
            .await,
        Some(0.0)
    );
}

#[tokio::test]
async fn access_log_has_every_spec_field() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&config(&up.url())).await;
    Client::new()
        .send(
            http::Method::GET,
            &gw.url("/v1/x?q=1"),
            &[("x-request-id", "rid-7")],
            bytes::Bytes::new(),
        )
        .await;
    let logs = gw.wait_access_logs(1).await;
    let line = &logs[0];
    for field in [
        "timestamp",
        "request_id",
        "route",
        "method",
        "path",
        "status",
        "latency_ms",
        "identity",
        "tier",
        "upstream",
        "attempts",
        "cache",
        "model",
        "input_tokens",
        "output_tokens",
        "cost_usd",
        "error",
    ] {
        assert!(
            line.get(field).is_some(),
            "access log lacks `{field}`: {line}"
        );
    }
    assert_eq!(line["request_id"], "rid-7");
    assert_eq!(line["route"], "app");
    assert_eq!(line["method"], "GET");
    assert_eq!(line["path"], "/v1/x");
    assert_eq!(line["status"], 200);
    assert_eq!(line["upstream"], "app");
    assert_eq!(line["attempts"], 1);
    assert!(line["latency_ms"].as_f64().unwrap() >= 0.0);
    assert!(line["cache"].is_null() && line["model"].is_null() && line["error"].is_null());
    // RFC 3339 timestamp.
    let ts = line["timestamp"].as_str().unwrap();
    assert!(
        ts.len() >= 20 && ts.as_bytes()[10] == b'T' && ts.ends_with('Z'),
        "{ts}"
    );
}

#[tokio::test]
async fn admin_health_and_readiness() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&config(&up.url())).await;
    let c = Client::new();
    assert_eq!(c.get(&gw.admin_url("/healthz")).await.status, 200);
    assert_eq!(c.get(&gw.admin_url("/readyz")).await.status, 200);
    let metrics = c.get(&gw.admin_url("/metrics")).await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics
            .header("content-type")
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    // Its errors have the OpenAI shape, as every error sluice makes.
    let other = c.get(&gw.admin_url("/other")).await;
    assert_eq!(other.status, 404);
    assert_eq!(other.json()["error"]["code"], "route_not_found");
    let post = c.post_json(&gw.admin_url("/metrics"), &[], "{}").await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    assert_eq!(post.json()["error"]["code"], "method_not_allowed");
    assert_eq!(post.header("content-type"), Some("application/json"));
    // Every answer has an id, the caller's when it sent one.
    for reply in [&metrics, &post] {
        let id = reply.header("x-request-id").expect("x-request-id");
        assert_eq!(id.len(), 32, "{id}");
    }
    let probe = Client::new()
        .send(
            http::Method::GET,
            &gw.admin_url("/healthz"),
            &[("x-request-id", "kubelet-probe-1")],
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(probe.header("x-request-id"), Some("kubelet-probe-1"));
}

/// Every family of SPEC §4, by name and type, before any request: a
/// family with no series yet is still named, once.
#[tokio::test]
async fn a_fresh_gateway_names_every_spec_family() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&config(&up.url())).await;
    let m = gw.metrics().await;
    let families = [
        ("sluice_requests_total", "counter"),
        ("sluice_request_duration_seconds", "histogram"),
        ("sluice_overhead_seconds", "histogram"),
        ("sluice_upstream_requests_total", "counter"),
        ("sluice_upstream_duration_seconds", "histogram"),
        ("sluice_upstream_first_byte_seconds", "histogram"),
        ("sluice_failovers_total", "counter"),
        ("sluice_stream_errors_total", "counter"),
        ("sluice_upstream_up", "gauge"),
        ("sluice_tokens_total", "counter"),
        ("sluice_completions_total", "counter"),
        ("sluice_cost_usd_total", "counter"),
        ("sluice_cache_requests_total", "counter"),
        ("sluice_cache_saved_usd_total", "counter"),
        ("sluice_rate_limited_total", "counter"),
        ("sluice_auth_failures_total", "counter"),
        ("sluice_budget_spent_usd", "gauge"),
        ("sluice_budget_limit_usd", "gauge"),
        ("sluice_budget_alerts_total", "counter"),
        ("sluice_in_flight_requests", "gauge"),
        ("sluice_config_reloads_total", "counter"),
        ("sluice_build_info", "gauge"),
    ];
    for (name, kind) in families {
        let type_line = format!("# TYPE {name} {kind}");
        let help_line = format!("# HELP {name} ");
        assert_eq!(
            m.lines().filter(|l| *l == type_line).count(),
            1,
            "{type_line} once in:\n{m}"
        );
        assert_eq!(
            m.lines().filter(|l| l.starts_with(&help_line)).count(),
            1,
            "{help_line} once"
        );
    }
    // No family is named twice, with or without series.
    let mut types: Vec<&str> = m.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    let all = types.len();
    types.sort_unstable();
    types.dedup();
    assert_eq!(types.len(), all);
}

/// `logging.level` quiets sluice's own events, not the access log: every
/// request still writes its line.
#[tokio::test]
async fn access_log_is_written_at_every_level() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let cfg = format!("logging: {{ level: error }}\n{}", config(&up.url()));
    let gw = TestGateway::start(&cfg).await;
    let c = Client::new();
    for _ in 0..2 {
        assert_eq!(c.get(&gw.url("/x")).await.status, 200);
    }
    let logs = gw.wait_access_logs(2).await;
    assert_eq!(logs.len(), 2);
    assert_eq!(logs[0]["status"], 200);
}

/// No client or upstream can grow a metric family at will: made-up
/// methods count as `other`, and past 64 models on a route (an upstream
/// may echo whatever model a client names) the rest count as `other`.
#[tokio::test]
async fn label_values_stay_bounded() {
    let gw = TestGateway::start(
        r#"
upstreams:
  demo: { mock: {} }
routes:
  - name: chat
    match: { path_prefix: / }
    auth: none
    upstream: demo
"#,
    )
    .await;
    let c = Client::new();
    for i in 0..3 {
        let method = http::Method::from_bytes(format!("MADEUP{i}").as_bytes()).unwrap();
        c.send(method, &gw.url("/v1/models"), &[], bytes::Bytes::new())
            .await;
    }
    for i in 0..70 {
        let body =
            format!(r#"{{"model":"model-{i}","messages":[{{"role":"user","content":"hi"}}]}}"#);
        let reply = c
            .post_json(&gw.url("/v1/chat/completions"), &[], &body)
            .await;
        assert_eq!(reply.status, 200);
    }
    gw.wait_access_logs(73).await;
    let m = gw.metrics().await;
    assert!(!m.contains("MADEUP"), "a made-up method became a label");
    let other_method: f64 = m
        .lines()
        .filter(|l| l.starts_with("sluice_requests_total{") && l.contains("method=\"other\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(other_method, 3.0);
    let models: std::collections::HashSet<&str> = m
        .lines()
        .filter(|l| l.starts_with("sluice_tokens_total{"))
        .filter_map(|l| l.split("model=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(models.len(), 65, "64 models and other: {models:?}");
    assert!(models.contains("other"));
    let other_input = crate::support::gateway::sample(
        &m,
        "sluice_tokens_total",
        &[("route", "chat"), ("model", "other"), ("kind", "input")],
    )
    .unwrap();
    assert!(other_input > 0.0, "the 6 models past the cap are counted");
}

/// A model name holding a control character (a NUL, a line break), as
/// an upstream echoing the request's would answer, is counted as `other`:
/// no raw control byte reaches /metrics.
#[tokio::test]
async fn a_model_name_with_a_control_character_is_labelled_other() {
    let gw = TestGateway::start(
        "upstreams:\n  demo: { mock: {} }\nroutes:\n  - { name: chat, match: { path_prefix: / }, auth: none, upstream: demo }\n",
    )
    .await;
    let c = Client::new();
    for model in [r"\u0000z", r"a\nb", r"c\u2028\u0085d"] {
        let body =
            format!(r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#);
        let reply = c
            .post_json(&gw.url("/v1/chat/completions"), &[], &body)
            .await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    gw.wait_access_logs(3).await;
    let m = gw.metrics().await;
    assert!(!m.bytes().any(|b| b == 0), "a NUL in /metrics");
    let other = crate::support::gateway::sample(
        &m,
        "sluice_tokens_total",
        &[("route", "chat"), ("model", "other"), ("kind", "input")],
    );
    assert!(other.is_some_and(|n| n > 0.0), "{m}");
    assert!(!m.contains("model=\"a\\nb\""), "{m}");
}

/// A client that uploads slowly to a route that reads bodies whole
/// (validation, pools, the cache) keeps sluice waiting, not working:
/// `sluice_overhead_seconds` does not count its upload, or a slow mobile
/// client would page whoever watches sluice's overhead.
#[tokio::test]
async fn a_slow_upload_is_not_counted_as_overhead() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = TestGateway::start(
        r#"
upstreams:
  demo: { mock: {} }
routes:
  - { name: chat, match: { path_prefix: /v1/ }, auth: none, validate: openai, upstream: demo }
"#,
    )
    .await;
    let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
    let (first, rest) = body.split_at(10);
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{first}",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    conn.write_all(rest.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    conn.read_to_end(&mut answer).await.unwrap();
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    gw.wait_access_logs(1).await;
    let overhead = gw
        .metric("sluice_overhead_seconds_sum", &[("route", "chat")])
        .await
        .unwrap();
    let total = gw
        .metric("sluice_request_duration_seconds_sum", &[("route", "chat")])
        .await
        .unwrap();
    assert!(total >= 0.6, "total {total}");
    assert!(overhead < 0.3, "overhead {overhead} of {total}");
}
