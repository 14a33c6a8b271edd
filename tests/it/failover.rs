//! Pools: failover on the SPEC's rules, replaying the same body, circuit
//! breaking with one probe, 429 cool-downs, and the errors when every
//! member fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::{Value, json};

use crate::support::{
    Client, ClientReply, MockUpstream, RefusedPort, TestGateway, UpstreamReply, eventually,
};

fn config(primary: &str, backup: &str, pool_extra: &str, backup_extra: &str) -> String {
    format!(
        r#"
upstreams:
  primary:
    url: {primary}
    timeouts: {{ first_byte: 300ms }}
  backup:
    url: {backup}
    timeouts: {{ first_byte: 300ms }}
{backup_extra}
pools:
  llm:
    members: [primary, backup]
{pool_extra}
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
    auth: none
    upstream: llm
"#
    )
}

/// A pool of `primary` and a backup answering "backup", the pool
/// configured with `pool_extra`.
async fn with_backup(primary: &MockUpstream, pool_extra: &str) -> (TestGateway, MockUpstream) {
    let backup = MockUpstream::always(UpstreamReply::text("backup")).await;
    let gw = TestGateway::start(&config(&primary.url(), &backup.url(), pool_extra, "")).await;
    (gw, backup)
}

/// A pool of `primary` and `backup` whose circuits open after
/// `failures` in a row, for 30 s.
async fn with_breaker(primary: &MockUpstream, backup: &MockUpstream, failures: u32) -> TestGateway {
    let breaker = format!("    circuit_breaker: {{ failures: {failures}, cooldown: 30s }}");
    TestGateway::start(&config(&primary.url(), &backup.url(), &breaker, "")).await
}

/// `sluice_upstream_up` of the primary (1 closed, 0 open).
async fn primary_up(gw: &TestGateway) -> Option<f64> {
    gw.metric("sluice_upstream_up", &[("upstream", "primary")])
        .await
}

const CHAT: &str = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}"#;

async fn chat(gw: &TestGateway) -> ClientReply {
    Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], CHAT)
        .await
}

fn failing(status: u16) -> UpstreamReply {
    let mut r = UpstreamReply::json(&serde_json::json!({"error": {"message": "down"}}));
    r.status = status;
    r
}

/// `upstreams` (YAML lines) in pool `llm` (`pool`: its flow mapping's
/// members and settings), behind route `chat` on `/v1/`.
fn pool_of(upstreams: &str, pool: &str) -> String {
    format!(
        "upstreams:\n{upstreams}\npools:\n  llm: {{ {pool} }}\nroutes:\n  - name: chat\n    match: {{ path_prefix: /v1/ }}\n    auth: none\n    upstream: llm\n"
    )
}

#[tokio::test]
async fn status_503_fails_over_to_the_backup_with_the_same_body() {
    let primary = MockUpstream::always(failing(503)).await;
    let backup = MockUpstream::always(UpstreamReply::text("from backup")).await;
    let gw = TestGateway::start(&config(&primary.url(), &backup.url(), "", "")).await;
    let body: Bytes = (0..100_000u32)
        .map(|i| (i % 253) as u8)
        .collect::<Vec<u8>>()
        .into();
    let reply = Client::new()
        .send(
            Method::POST,
            &gw.url("/v1/files"),
            &[("content-type", "application/octet-stream")],
            body.clone(),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "from backup");
    assert!(primary.seen()[0].body == body);
    assert!(
        backup.seen()[0].body == body,
        "the fallback must get the body byte for byte"
    );
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["upstream"], "backup");
    assert_eq!(log["attempts"], 2);
    assert_eq!(
        gw.metric("sluice_failovers_total", &[("pool", "llm")])
            .await,
        Some(1.0)
    );
    assert_eq!(
        gw.metric(
            "sluice_upstream_requests_total",
            &[("upstream", "primary"), ("outcome", "http_5xx")]
        )
        .await,
        Some(1.0)
    );
    // The failed attempt's time is an upstream duration too.
    for upstream in ["primary", "backup"] {
        assert_eq!(
            gw.metric(
                "sluice_upstream_duration_seconds_count",
                &[("upstream", upstream)]
            )
            .await,
            Some(1.0),
            "{upstream}"
        );
    }
}

#[tokio::test]
async fn connection_refused_fails_over() {
    let backup = MockUpstream::always(UpstreamReply::text("ok")).await;
    let dead = RefusedPort::new();
    let gw = TestGateway::start(&config(&dead.url(), &backup.url(), "", "")).await;
    assert_eq!(chat(&gw).await.status, 200);
    assert_eq!(backup.seen().len(), 1);
    assert_eq!(
        gw.metric(
            "sluice_upstream_duration_seconds_count",
            &[("upstream", "primary")]
        )
        .await,
        Some(1.0),
        "a failed attempt's time counts too"
    );
}

#[tokio::test]
async fn first_byte_timeout_fails_over_and_504_when_all_time_out() {
    let slow =
        MockUpstream::always(UpstreamReply::text("late").delay(Duration::from_secs(3))).await;
    let fast = MockUpstream::always(UpstreamReply::text("fast")).await;
    let gw = TestGateway::start(&config(&slow.url(), &fast.url(), "", "")).await;
    assert_eq!(chat(&gw).await.text(), "fast");

    let slow2 =
        MockUpstream::always(UpstreamReply::text("late").delay(Duration::from_secs(3))).await;
    let gw = TestGateway::start(&config(&slow.url(), &slow2.url(), "", "")).await;
    let reply = chat(&gw).await;
    assert_eq!(reply.status, 504);
    assert_eq!(reply.json()["error"]["code"], "upstream_timeout");
    // The message names every attempt, as a 502's does, not only the last.
    let failed_first = MockUpstream::always(failing(500)).await;
    let gw = TestGateway::start(&config(&failed_first.url(), &slow2.url(), "", "")).await;
    let reply = chat(&gw).await;
    assert_eq!(reply.status, 504);
    assert_eq!(
        reply.json()["error"]["message"],
        "upstream `backup` did not answer in time (attempts: primary: 500; backup: timed out)"
    );
}

#[tokio::test]
async fn client_errors_come_back_as_they_are() {
    let primary = MockUpstream::always(failing(400)).await;
    let backup = MockUpstream::always(UpstreamReply::text("unused")).await;
    let gw = TestGateway::start(&config(&primary.url(), &backup.url(), "", "")).await;
    let reply = chat(&gw).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["message"], "down");
    assert!(backup.seen().is_empty());
}

#[tokio::test]
async fn every_member_failing_is_502_listing_the_attempts() {
    let primary = MockUpstream::always(failing(503)).await;
    let dead = RefusedPort::new();
    let gw = TestGateway::start(&config(&primary.url(), &dead.url(), "", "")).await;
    let reply = chat(&gw).await;
    assert_eq!(reply.status, 502);
    assert_eq!(
        reply.json()["error"]["message"],
        "every upstream attempt failed: primary: 503; backup: connect refused"
    );
}

#[tokio::test]
async fn max_attempts_bounds_the_tries() {
    let primary = MockUpstream::always(failing(503)).await;
    let backup = MockUpstream::always(UpstreamReply::text("unused")).await;
    let gw = TestGateway::start(&config(
        &primary.url(),
        &backup.url(),
        "    max_attempts: 1",
        "",
    ))
    .await;
    assert_eq!(chat(&gw).await.status, 502);
    assert!(backup.seen().is_empty());
}

#[tokio::test]
async fn retry_after_429_skips_the_member_for_that_long() {
    let primary = MockUpstream::always(failing(429).header("retry-after", "2")).await;
    let backup = MockUpstream::always(UpstreamReply::text("backup")).await;
    let gw = TestGateway::start(&config(&primary.url(), &backup.url(), "", "")).await;
    for _ in 0..3 {
        assert_eq!(chat(&gw).await.text(), "backup");
    }
    assert_eq!(
        primary.seen().len(),
        1,
        "the cooling member was asked again"
    );
    assert_eq!(backup.seen().len(), 3);
}

/// A 429 with `retry-after` cools the member down even when 429 is not a
/// failover trigger and the client gets the 429 (SPEC §3).
#[tokio::test]
async fn retry_after_429_cools_down_also_without_failover_on_429() {
    let primary = MockUpstream::always(failing(429).header("retry-after", "30")).await;
    let (gw, backup) = with_backup(&primary, "    retry_on: [connect, timeout, 503]").await;
    let first = chat(&gw).await;
    assert_eq!(first.status, 429, "{}", first.text());
    assert!(backup.seen().is_empty(), "429 is no failover trigger here");
    assert_eq!(chat(&gw).await.text(), "backup");
    assert_eq!(
        primary.seen().len(),
        1,
        "the cooling member was asked again"
    );
}

#[tokio::test]
async fn circuit_opens_after_failures_then_one_probe_closes_it() {
    let healthy = Arc::new(AtomicBool::new(false));
    let flag = healthy.clone();
    let primary = MockUpstream::start(move |_| {
        if flag.load(Ordering::SeqCst) {
            UpstreamReply::text("primary")
        } else {
            failing(500)
        }
    })
    .await;
    let (gw, _backup) = with_backup(
        &primary,
        "    circuit_breaker: { failures: 2, cooldown: 500ms }",
    )
    .await;
    for _ in 0..2 {
        assert_eq!(chat(&gw).await.text(), "backup");
    }
    assert_eq!(primary_up(&gw).await, Some(0.0));
    // Open: the primary receives nothing.
    for _ in 0..3 {
        assert_eq!(chat(&gw).await.text(), "backup");
    }
    assert_eq!(primary.seen().len(), 2);
    // After the cooldown one probe goes through; it succeeds and closes it.
    healthy.store(true, Ordering::SeqCst);
    let mut answered_by_primary = false;
    for _ in 0..40 {
        if chat(&gw).await.text() == "primary" {
            answered_by_primary = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(answered_by_primary, "no probe after the cooldown");
    assert_eq!(primary.seen().len(), 3, "exactly one probe");
    assert_eq!(primary_up(&gw).await, Some(1.0));
    assert_eq!(chat(&gw).await.text(), "primary");
    // Each change of the circuit is one log event an operator can find.
    let events: Vec<_> = gw
        .log_lines()
        .into_iter()
        .filter(|l| l["upstream"] == "primary" && l["event"].is_string())
        .map(|l| {
            (
                l["event"].clone(),
                l["level"].clone(),
                l["failures"].clone(),
            )
        })
        .collect();
    assert_eq!(
        events,
        [
            (json!("circuit_opened"), json!("WARN"), json!(2)),
            (json!("circuit_closed"), json!("INFO"), Value::Null),
        ]
    );
}

#[tokio::test]
async fn every_circuit_open_is_503_with_retry_after() {
    let a = MockUpstream::always(failing(500)).await;
    let b = MockUpstream::always(failing(500)).await;
    let gw = with_breaker(&a, &b, 1).await;
    assert_eq!(chat(&gw).await.status, 502);
    let reply = chat(&gw).await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.json()["error"]["code"], "upstream_unavailable");
    assert_eq!(
        reply.json()["error"]["message"],
        "every upstream is unavailable (primary: skipped (circuit open); backup: skipped (circuit open)); retry later"
    );
    let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((29..=30).contains(&retry), "retry-after {retry}");
    assert!(
        eventually(Duration::from_millis(10), || a.seen().len() == 1
            && b.seen().len() == 1)
        .await
    );
}

#[tokio::test]
async fn model_is_rewritten_for_the_member_that_renames_it() {
    let primary = MockUpstream::always(failing(502)).await;
    let backup = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&config(
        &primary.url(),
        &backup.url(),
        "",
        "    models: { gpt-4o: gpt-4o-2024-08-06 }",
    ))
    .await;
    // A structured output's schema lists `reasoning` before `answer`, and
    // the model writes them in that order: the rename must not sort keys
    // (nor respell numbers) on the way.
    let body = r#"{"model":"gpt-4o","seed":123456789012345678901,"messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_schema","json_schema":{"name":"a","schema":{"type":"object","properties":{"reasoning":{"type":"string"},"answer":{"type":"string"}}}}}}"#;
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], body)
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        String::from_utf8_lossy(&backup.seen()[0].body),
        body.replace(r#""gpt-4o""#, r#""gpt-4o-2024-08-06""#)
    );
    assert_eq!(String::from_utf8_lossy(&primary.seen()[0].body), body);
}

/// A stream whose role chunk comes at once, then `rest` after `after`
/// (a model thinking, or an upstream that stalled before content).
fn role_then(after: Duration, rest: Bytes) -> UpstreamReply {
    let mut reply = UpstreamReply::sse(&[ROLE], Duration::ZERO);
    reply.chunks.push((after, rest));
    reply
}

const ROLE: &str =
    r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
const HELLO: &str = r#"{"choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}]}"#;
const STOP: &str = r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;

#[tokio::test]
async fn stream_dying_before_content_fails_over_invisibly() {
    let primary = MockUpstream::always(UpstreamReply::sse(&[ROLE], Duration::ZERO).cut()).await;
    let events = [ROLE, HELLO, STOP, "[DONE]"];
    let backup = MockUpstream::always(UpstreamReply::sse(&events, Duration::from_millis(20))).await;
    let gw = TestGateway::start(&config(&primary.url(), &backup.url(), "", "")).await;
    let reply = chat(&gw).await;
    assert_eq!(reply.status, 200);
    let expected: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    assert_eq!(
        reply.text(),
        expected,
        "the client must see one clean stream"
    );
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["upstream"], "backup");
    assert_eq!(log["attempts"], 2);
    assert_eq!(
        gw.metric("sluice_failovers_total", &[("pool", "llm")])
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn stream_dying_after_content_ends_with_the_error_event() {
    let mut dying = UpstreamReply::sse(&[ROLE, HELLO], Duration::ZERO).cut();
    // Let the content be flushed before the cut.
    dying.chunks.push((
        Duration::from_millis(100),
        Bytes::from_static(b": ping\n\n"),
    ));
    let primary = MockUpstream::always(dying).await;
    let backup = MockUpstream::always(UpstreamReply::text("unused")).await;
    let gw = TestGateway::start(&config(&primary.url(), &backup.url(), "", "")).await;
    let reply = chat(&gw).await;
    let text = reply.text();
    assert!(
        text.starts_with(&format!("data: {ROLE}\n\ndata: {HELLO}\n\n")),
        "{text}"
    );
    assert!(
        text.ends_with("\"code\":\"upstream_stream_error\"}}\n\n"),
        "{text}"
    );
    assert!(
        backup.seen().is_empty(),
        "content had reached the client: no failover"
    );
    assert_eq!(
        gw.metric("sluice_stream_errors_total", &[("upstream", "primary")])
            .await,
        Some(1.0)
    );
}

/// The events of the backup's whole stream.
const WHOLE_STREAM: [&str; 4] = [ROLE, HELLO, STOP, "[DONE]"];

/// A primary whose every stream breaks after its first content, and a
/// backup answering [`WHOLE_STREAM`].
async fn breaking_primary_and_backup() -> (MockUpstream, MockUpstream) {
    let mut dying = UpstreamReply::sse(&[ROLE, HELLO], Duration::ZERO).cut();
    dying
        .chunks
        .push((Duration::from_millis(50), Bytes::from_static(b": ping\n\n")));
    let backup = UpstreamReply::sse(&WHOLE_STREAM, Duration::ZERO);
    (
        MockUpstream::always(dying).await,
        MockUpstream::always(backup).await,
    )
}

/// The backup's whole stream as the client reads it.
fn whole_stream_text() -> String {
    WHOLE_STREAM
        .iter()
        .map(|e| format!("data: {e}\n\n"))
        .collect()
}

#[tokio::test]
async fn streams_breaking_after_content_open_the_circuit() {
    let (primary, backup) = breaking_primary_and_backup().await;
    let gw = with_breaker(&primary, &backup, 2).await;
    // Each stream got its first content through: no failover, but each
    // broke midway, which the primary's circuit counts.
    for _ in 0..2 {
        let text = chat(&gw).await.text();
        assert!(text.contains("upstream_stream_error"), "{text}");
    }
    assert_eq!(primary_up(&gw).await, Some(0.0));
    assert_eq!(
        chat(&gw).await.text(),
        whole_stream_text(),
        "the open circuit sends it to the backup"
    );
    assert_eq!(primary.seen().len(), 2);
    assert_eq!(backup.seen().len(), 1);
}

/// A half-open circuit's probe whose stream breaks after its first
/// content failed: the circuit opens again at once, as after a probe
/// answered 500, rather than closing and waiting for more failures.
#[tokio::test]
async fn a_probe_whose_stream_breaks_opens_the_circuit_again() {
    let (primary, backup) = breaking_primary_and_backup().await;
    let breaker = "    circuit_breaker: { failures: 2, cooldown: 300ms }";
    let gw = TestGateway::start(&config(&primary.url(), &backup.url(), breaker, "")).await;
    for _ in 0..2 {
        assert!(chat(&gw).await.text().contains("upstream_stream_error"));
    }
    assert_eq!(primary_up(&gw).await, Some(0.0));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let probed = chat(&gw).await.text();
    assert!(probed.contains("upstream_stream_error"), "{probed}");
    assert_eq!(primary.seen().len(), 3, "the probe went to the primary");
    assert_eq!(
        primary_up(&gw).await,
        Some(0.0),
        "the failed probe reopened it"
    );
    assert_eq!(
        chat(&gw).await.text(),
        whole_stream_text(),
        "the backup answers"
    );
    assert_eq!(primary.seen().len(), 3);
}

#[tokio::test]
async fn an_error_event_counts_against_the_circuit_when_the_client_leaves_on_it() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let error = r#"{"error":{"message":"overloaded","type":"server_error"}}"#;
    let mut reply = UpstreamReply::sse(&[ROLE, HELLO, error], Duration::ZERO);
    // The upstream keeps the stream open after its error event.
    reply.chunks.push((
        Duration::from_millis(300),
        Bytes::from_static(b": ping\n\n"),
    ));
    let primary = MockUpstream::always(reply).await;
    let backup = MockUpstream::always(UpstreamReply::text("unused")).await;
    let gw = with_breaker(&primary, &backup, 1).await;
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let body = CHAT.as_bytes();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(body).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("overloaded") {
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "the stream ended before its error event");
        seen.extend_from_slice(&buf[..n]);
    }
    // As an SDK does on an error event: it raises and hangs up.
    drop(tcp);
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["upstream"], "primary");
    // Accounted (the log line) with its verdict.
    assert_eq!(
        primary_up(&gw).await,
        Some(0.0),
        "the error event failed the member"
    );
    assert_eq!(
        gw.metric("sluice_stream_errors_total", &[("upstream", "primary")])
            .await,
        Some(1.0),
        "the stream error is counted though the client left on it"
    );
}

#[tokio::test]
async fn a_head_request_to_a_streaming_member_is_answered_by_it() {
    let events = [ROLE, HELLO, STOP, "[DONE]"];
    let primary = MockUpstream::always(UpstreamReply::sse(&events, Duration::ZERO)).await;
    let backup = MockUpstream::always(UpstreamReply::text("unused")).await;
    let gw = with_breaker(&primary, &backup, 1).await;
    for _ in 0..2 {
        let reply = Client::new()
            .send(
                http::Method::HEAD,
                &gw.url("/v1/chat/completions"),
                &[],
                Bytes::new(),
            )
            .await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    }
    assert_eq!(
        primary.seen().len(),
        2,
        "no failover: the head is the answer"
    );
    assert!(backup.seen().is_empty());
    assert_eq!(primary_up(&gw).await, Some(1.0));
}

#[tokio::test]
async fn a_stream_that_ends_well_keeps_the_circuit_closed() {
    let events = [ROLE, HELLO, STOP, "[DONE]"];
    let primary = MockUpstream::always(UpstreamReply::sse(&events, Duration::ZERO)).await;
    let backup = MockUpstream::always(UpstreamReply::text("unused")).await;
    let gw = with_breaker(&primary, &backup, 1).await;
    for _ in 0..3 {
        assert_eq!(chat(&gw).await.status, 200);
    }
    assert_eq!(primary.seen().len(), 3);
    assert!(backup.seen().is_empty());
    assert_eq!(primary_up(&gw).await, Some(1.0));
}

#[tokio::test]
async fn health_checks_open_and_close_circuits_before_users_notice() {
    let healthy = Arc::new(AtomicBool::new(false));
    let flag = healthy.clone();
    let primary = MockUpstream::start(move |seen| {
        if seen.uri.path() == "/health" && !flag.load(Ordering::SeqCst) {
            failing(503)
        } else {
            UpstreamReply::text("primary")
        }
    })
    .await;
    let (gw, _backup) = with_backup(&primary, "    circuit_breaker: { failures: 1, cooldown: 60s }\n    health_check: { path: /health, interval: 100ms }").await;
    let opened = async {
        for _ in 0..50 {
            if gw
                .metric("sluice_upstream_up", &[("upstream", "primary")])
                .await
                == Some(0.0)
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    };
    assert!(opened.await, "a failing health check must open the circuit");
    // Users go straight to the backup: the primary sees only probes.
    assert_eq!(chat(&gw).await.text(), "backup");
    assert!(
        primary
            .seen()
            .iter()
            .all(|s| s.uri.path() == "/health" && s.method == Method::GET)
    );
    // The checks go on failing: the member's fall is logged once, not at
    // every check.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let events = |name: &str| {
        gw.log_lines()
            .into_iter()
            .filter(|l| l["event"] == name && l["upstream"] == "primary")
            .collect::<Vec<_>>()
    };
    let down = events("upstream_marked_down");
    assert_eq!(down.len(), 1, "{down:?} {}", gw.log_text());
    assert_eq!(down[0]["level"], "WARN");
    assert_eq!(down[0]["path"], "/health");
    // Recovery is found by the probes too, long before the 60 s cooldown.
    healthy.store(true, Ordering::SeqCst);
    let mut back = false;
    for _ in 0..50 {
        if chat(&gw).await.text() == "primary" {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(back, "a passing health check must close the circuit");
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        events("upstream_marked_up").len(),
        1,
        "the return is logged once"
    );
    assert_eq!(events("upstream_marked_down").len(), 1);
}

/// A reload that removes the health check takes its verdict away too: a
/// member it had marked down is reported up and takes requests at once,
/// not only once traffic happens to reach for it.
#[tokio::test]
async fn a_reload_removing_the_health_check_lets_a_marked_down_member_back() {
    let primary_fails = Arc::new(AtomicBool::new(false));
    let flag = primary_fails.clone();
    let primary = MockUpstream::start(move |_| {
        if flag.load(Ordering::SeqCst) {
            failing(503)
        } else {
            UpstreamReply::text("primary")
        }
    })
    .await;
    let backup = MockUpstream::start(|seen| {
        if seen.uri.path() == "/health" {
            failing(503)
        } else {
            UpstreamReply::text("backup")
        }
    })
    .await;
    let checked = config(
        &primary.url(),
        &backup.url(),
        "    health_check: { path: /health, interval: 50ms }",
        "",
    );
    let gw = TestGateway::start_watched(&checked, &[], tempfile::tempdir().unwrap()).await;
    let backup_up = [("upstream", "backup")];
    let down = gw
        .metric_reaches(
            "sluice_upstream_up",
            &backup_up,
            0.0,
            Duration::from_secs(2),
        )
        .await;
    assert!(down, "the backup's failing checks must mark it down");
    gw.swap_config(&config(&primary.url(), &backup.url(), "", ""));
    let up = gw
        .metric_reaches(
            "sluice_upstream_up",
            &backup_up,
            1.0,
            Duration::from_secs(5),
        )
        .await;
    assert!(
        up,
        "still reported down with no check left: {}",
        gw.log_text()
    );
    let back = gw
        .log_lines()
        .into_iter()
        .filter(|l| l["event"] == "upstream_marked_up" && l["upstream"] == "backup")
        .count();
    assert_eq!(back, 1, "{}", gw.log_text());
    // Not skipped either: with the primary failing, the backup answers.
    primary_fails.store(true, Ordering::SeqCst);
    let reply = chat(&gw).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "backup");
}

/// A member that fails users but passes its health check stays out for
/// the cooldown traffic opened: passing checks neither close that circuit
/// nor forgive the failures that add up to it.
#[tokio::test]
async fn passing_health_checks_do_not_close_a_circuit_traffic_opened() {
    let primary = MockUpstream::start(|seen| {
        if seen.uri.path() == "/health" {
            UpstreamReply::text("ok")
        } else {
            failing(503)
        }
    })
    .await;
    let (gw, _backup) = with_backup(&primary, "    circuit_breaker: { failures: 2, cooldown: 60s }\n    health_check: { path: /health, interval: 50ms }").await;
    let chats = || {
        primary
            .seen()
            .iter()
            .filter(|s| s.uri.path() != "/health")
            .count()
    };
    assert_eq!(chat(&gw).await.text(), "backup");
    // Checks pass between the two failures: they still add up.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(chat(&gw).await.text(), "backup");
    assert_eq!(chats(), 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(primary_up(&gw).await, Some(0.0));
    for _ in 0..3 {
        assert_eq!(chat(&gw).await.text(), "backup");
    }
    assert_eq!(chats(), 2, "skipped for its cooldown");
}

/// When request_timeout is spent on one member, the next is not tried:
/// it could not answer in no time, and would be blamed (its circuit
/// opened) for the first one's slowness.
#[tokio::test]
async fn a_spent_request_timeout_tries_no_further_member() {
    let slow =
        MockUpstream::always(UpstreamReply::text("late").delay(Duration::from_secs(3))).await;
    let fast = MockUpstream::always(UpstreamReply::text("fast")).await;
    let yaml = config(
        &slow.url(),
        &fast.url(),
        "    circuit_breaker: { failures: 1, cooldown: 60s }",
        "",
    )
    .replace("first_byte: 300ms", "first_byte: 10s")
    .replace("pools:", "limits: { request_timeout: 400ms }\npools:");
    let gw = TestGateway::start(&yaml).await;
    let reply = chat(&gw).await;
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert!(
        reply.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("primary"),
        "{}",
        reply.text()
    );
    assert!(fast.seen().is_empty());
    let metrics = gw.metrics().await;
    let sample = |labels: &[(&str, &str)]| {
        crate::support::gateway::sample(&metrics, "sluice_upstream_requests_total", labels)
    };
    assert_eq!(
        sample(&[("upstream", "primary"), ("outcome", "timeout")]),
        Some(1.0)
    );
    assert_eq!(
        sample(&[("upstream", "backup"), ("outcome", "timeout")]),
        Some(0.0)
    );
    assert_eq!(
        crate::support::gateway::sample(&metrics, "sluice_upstream_up", &[("upstream", "backup")]),
        Some(1.0)
    );
}

/// A half-open member reached after request_timeout is spent is not
/// probed: its probe slot stays free for the next request, which finds it
/// recovered, rather than the member being skipped for good.
#[tokio::test]
async fn a_spent_request_does_not_take_a_half_open_probe() {
    let primary_calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = primary_calls.clone();
    let primary = MockUpstream::start(move |_| match counter.fetch_add(1, Ordering::SeqCst) {
        1 => UpstreamReply::text("late").delay(Duration::from_secs(2)),
        _ => failing(503),
    })
    .await;
    let backup_calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = backup_calls.clone();
    let backup = MockUpstream::start(move |_| match counter.fetch_add(1, Ordering::SeqCst) {
        0 => failing(503),
        _ => UpstreamReply::text("backup"),
    })
    .await;
    let yaml = config(
        &primary.url(),
        &backup.url(),
        "    circuit_breaker: { failures: 1, cooldown: 300ms }",
        "",
    )
    .replace("first_byte: 300ms", "first_byte: 10s")
    .replace("pools:", "limits: { request_timeout: 500ms }\npools:");
    let gw = TestGateway::start(&yaml).await;
    // Both fail: both circuits open.
    assert_eq!(chat(&gw).await.status, 502);
    tokio::time::sleep(Duration::from_millis(400)).await;
    // The primary's probe spends the whole request: the backup is not
    // reached.
    assert_eq!(chat(&gw).await.status, 504);
    assert_eq!(backup.seen().len(), 1);
    // The next request probes the backup, which has recovered.
    let reply = chat(&gw).await;
    assert_eq!(reply.text(), "backup");
}

/// With the default first_byte (= request_timeout), a member that hangs
/// is still judged by its timeout: its circuit opens and the next request
/// goes straight to the backup.
#[tokio::test]
async fn a_hung_member_trips_its_circuit_with_default_timeouts() {
    let hung =
        MockUpstream::always(UpstreamReply::text("late").delay(Duration::from_secs(3))).await;
    let backup = MockUpstream::always(UpstreamReply::text("backup")).await;
    let yaml = config(
        &hung.url(),
        &backup.url(),
        "    circuit_breaker: { failures: 1, cooldown: 60s }",
        "",
    )
    .replace("    timeouts: { first_byte: 300ms }\n", "")
    .replace("pools:", "limits: { request_timeout: 300ms }\npools:");
    let gw = TestGateway::start(&yaml).await;
    assert_eq!(chat(&gw).await.status, 504);
    assert_eq!(primary_up(&gw).await, Some(0.0));
    let reply = chat(&gw).await;
    assert_eq!(reply.text(), "backup");
}

/// A stream that opens and then stalls before its first content times out
/// like an upstream that never answered (counted as a timeout, not `ok`)
/// while another member can take over. The last member's stream is not
/// cut off: once first_byte is spent it goes on to the client, as a
/// model that thinks long before it writes would on a route to it alone.
#[tokio::test]
async fn a_stream_stalled_before_content_is_a_timeout_while_a_member_is_left() {
    let stalled = || {
        role_then(
            Duration::from_millis(900),
            Bytes::from(format!("data: {HELLO}\n\ndata: [DONE]\n\n")),
        )
    };
    let primary = MockUpstream::always(stalled()).await;
    let backup = MockUpstream::always(stalled()).await;
    let gw = TestGateway::start(&config(&primary.url(), &backup.url(), "", "")).await;
    let reply = chat(&gw).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let text = reply.text();
    assert!(
        text.contains("Hello") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    assert_eq!(
        text.matches("\"role\"").count(),
        1,
        "one role chunk: {text}"
    );
    // The role chunk reached the client at first_byte (300ms), not with
    // the content.
    let (first, _) = &reply.frames[0];
    let (last, _) = reply.frames.last().unwrap();
    assert!(
        *last - *first >= Duration::from_millis(400),
        "{:?}",
        reply.frames
    );
    for (upstream, outcome) in [("primary", "timeout"), ("backup", "ok")] {
        assert_eq!(
            gw.metric(
                "sluice_upstream_requests_total",
                &[("upstream", upstream), ("outcome", outcome)]
            )
            .await,
            Some(1.0),
            "{upstream} {outcome}"
        );
    }
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["upstream"], "backup");
    assert_eq!(log["attempts"], 2);
}

/// A JSON answer whose head came but whose body has not by first_byte
/// has sent the client nothing: the next member answers, as for a stream
/// stalled before its content. With no member left to take over, the
/// slow body goes on to the client whole.
#[tokio::test]
async fn an_answer_whose_body_is_late_fails_over_while_a_member_is_left() {
    let late = || {
        let mut reply = UpstreamReply::status(200).header("content-type", "application/json");
        reply.chunks.push((
            Duration::from_millis(900),
            Bytes::from_static(b"{\"late\":true}"),
        ));
        reply
    };
    let primary = MockUpstream::always(late()).await;
    let backup = MockUpstream::always(UpstreamReply::text("backup")).await;
    let gw = TestGateway::start(&config(&primary.url(), &backup.url(), "", "")).await;
    let started = std::time::Instant::now();
    let reply = chat(&gw).await;
    assert_eq!(
        (reply.status.as_u16(), reply.text().as_str()),
        (200, "backup")
    );
    assert!(
        started.elapsed() < Duration::from_millis(850),
        "{:?}",
        started.elapsed()
    );
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(
        (log["upstream"].as_str(), log["attempts"].as_u64()),
        (Some("backup"), Some(2)),
        "{log}"
    );
    assert_eq!(
        gw.metric(
            "sluice_upstream_requests_total",
            &[("upstream", "primary"), ("outcome", "timeout")]
        )
        .await,
        Some(1.0)
    );

    let primary = MockUpstream::always(late()).await;
    let backup = MockUpstream::always(late()).await;
    let gw = TestGateway::start(&config(&primary.url(), &backup.url(), "", "")).await;
    late_body_from(&gw, "backup").await;

    // Nor does a member quiet past its idle fail when nobody would take
    // over (here `retry_on` leaves out timeout).
    let primary = MockUpstream::always(late()).await;
    let backup = MockUpstream::always(UpstreamReply::text("backup")).await;
    let gw = TestGateway::start(
        &config(&primary.url(), &backup.url(), "    retry_on: [503]", "")
            .replace("first_byte: 300ms", "first_byte: 10s, idle: 500ms"),
    )
    .await;
    late_body_from(&gw, "primary").await;
}

/// A chat through `gw` gets the late JSON body whole, from `member`.
async fn late_body_from(gw: &TestGateway, member: &str) {
    let reply = chat(gw).await;
    assert_eq!(
        (reply.status.as_u16(), reply.text().as_str()),
        (200, "{\"late\":true}")
    );
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(
        (log["upstream"].as_str(), log["error"].as_str()),
        (Some(member), None),
        "{log}"
    );
}

/// A pool whose `retry_on` leaves out `timeout` never fails over from a
/// slow stream: its first member's stream goes on to the client once
/// first_byte is spent, the backup untouched.
#[tokio::test]
async fn a_slow_stream_is_not_cut_when_no_member_would_take_over() {
    let thinking = role_then(
        Duration::from_millis(700),
        Bytes::from(format!("data: {HELLO}\n\ndata: [DONE]\n\n")),
    );
    let primary = MockUpstream::always(thinking).await;
    let backup = MockUpstream::always(UpstreamReply::text("backup")).await;
    let gw = TestGateway::start(&config(
        &primary.url(),
        &backup.url(),
        "    retry_on: [503]",
        "",
    ))
    .await;
    primary_streams_alone(&gw, &backup).await;
}

/// A chat through `gw` gets the primary's slow stream whole, and the
/// backup no request (health checks aside).
async fn primary_streams_alone(gw: &TestGateway, backup: &MockUpstream) {
    let reply = chat(gw).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert!(reply.text().contains("Hello"), "{}", reply.text());
    assert!(
        backup.seen().iter().all(|s| s.uri.path() == "/health"),
        "no failover"
    );
    assert_eq!(
        gw.metric(
            "sluice_upstream_requests_total",
            &[("upstream", "primary"), ("outcome", "ok")]
        )
        .await,
        Some(1.0)
    );
}

/// The backup is there but marked down by its health checks: it would be
/// skipped, so it cannot take over from a slow stream, which goes on to
/// the client at first_byte rather than ending in a 504.
#[tokio::test]
async fn a_slow_stream_is_not_cut_for_a_member_that_is_down() {
    let primary = MockUpstream::start(|seen| {
        if seen.uri.path() == "/health" {
            UpstreamReply::text("ok")
        } else {
            role_then(
                Duration::from_millis(700),
                Bytes::from(format!("data: {HELLO}\n\ndata: [DONE]\n\n")),
            )
        }
    })
    .await;
    let backup = MockUpstream::always(failing(503)).await;
    let gw = TestGateway::start(&config(
        &primary.url(),
        &backup.url(),
        "    health_check: { path: /health, interval: 50ms }",
        "",
    ))
    .await;
    let down = gw
        .metric_reaches(
            "sluice_upstream_up",
            &[("upstream", "backup")],
            0.0,
            Duration::from_secs(2),
        )
        .await;
    assert!(down, "the backup's failing checks must mark it down");
    primary_streams_alone(&gw, &backup).await;
}

#[tokio::test]
async fn a_member_whose_failed_answers_go_unread_keeps_its_connection() {
    // sluice drops a `retry_on` answer's body unread and moves on; the
    // connection still goes back to the pool once hyper has drained it.
    let primary = MockUpstream::always(failing(503)).await;
    let backup = MockUpstream::always(UpstreamReply::text("from backup")).await;
    let gw = TestGateway::start(&config(&primary.url(), &backup.url(), "", "")).await;
    for _ in 0..3 {
        let reply = chat(&gw).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), "from backup");
    }
    assert_eq!(primary.seen().len(), 3);
    assert_eq!(primary.connections(), 1);
    assert_eq!(backup.connections(), 1);
}

/// A half-open circuit's probe answered with a 429 and `retry-after` gives
/// no verdict: once the pause ends the member is probed again, rather than
/// skipped for good with its probe slot still taken.
#[tokio::test]
async fn a_probe_paused_by_429_is_followed_by_another_probe() {
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = calls.clone();
    let primary = MockUpstream::start(move |_| match counter.fetch_add(1, Ordering::SeqCst) {
        0 => failing(500),
        1 => failing(429).header("retry-after", "1"),
        _ => UpstreamReply::text("primary"),
    })
    .await;
    let (gw, _backup) = with_backup(
        &primary,
        "    circuit_breaker: { failures: 1, cooldown: 200ms }",
    )
    .await;
    assert_eq!(chat(&gw).await.text(), "backup");
    // The cooldown ends; the probe gets the 429 and the backup answers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(chat(&gw).await.text(), "backup");
    assert_eq!(primary.seen().len(), 2);
    // After the pause, a new probe reaches the primary and closes the circuit.
    let mut answered_by_primary = false;
    for _ in 0..40 {
        if chat(&gw).await.text() == "primary" {
            answered_by_primary = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(answered_by_primary, "the primary was never probed again");
    assert_eq!(chat(&gw).await.text(), "primary");
}

/// `models` belongs to the upstream: a route that names the upstream
/// directly renames too, on every path, with a matching content-length.
#[tokio::test]
async fn model_is_rewritten_on_a_route_to_a_single_upstream() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&format!(
        r#"
upstreams:
  openai:
    url: {}
    models: {{ gpt-4o: gpt-4o-2024-08-06 }}
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
    auth: none
    upstream: openai
"#,
        up.url()
    ))
    .await;
    let client = Client::new();
    assert_eq!(chat(&gw).await.status, 200);
    let embed = r#"{"model":"gpt-4o","input":"hi"}"#;
    let reply = client
        .post_json(&gw.url("/v1/embeddings"), &[], embed)
        .await;
    assert_eq!(reply.status, 200);
    let other = r#"{"model":"gpt-4o-mini","input":"hi"}"#;
    client
        .post_json(&gw.url("/v1/embeddings"), &[], other)
        .await;
    let seen = up.seen();
    for s in &seen[..2] {
        let sent: serde_json::Value = serde_json::from_slice(&s.body).unwrap();
        assert_eq!(sent["model"], "gpt-4o-2024-08-06", "{}", s.uri);
        assert_eq!(
            s.header("content-length"),
            Some(s.body.len().to_string().as_str())
        );
    }
    assert_eq!(
        seen[2].body,
        other.as_bytes(),
        "unlisted models pass as sent"
    );
}

/// A client that leaves while a stream's preamble is held still has the
/// attempt counted, as the answer's head said.
#[tokio::test]
async fn an_attempt_held_when_the_client_leaves_is_counted() {
    let stalled = role_then(
        Duration::from_secs(3),
        Bytes::from_static(b"data: [DONE]\n\n"),
    );
    let primary = MockUpstream::always(stalled).await;
    let backup = MockUpstream::always(UpstreamReply::text("backup")).await;
    let gw = TestGateway::start(&config(&primary.url(), &backup.url(), "", "")).await;
    let leaving = tokio::time::timeout(Duration::from_millis(100), chat(&gw)).await;
    assert!(leaving.is_err(), "answered before the client left");
    assert!(
        eventually(Duration::from_secs(2), || primary.seen().len() == 1).await,
        "the primary was asked"
    );
    let counted = async {
        for _ in 0..50 {
            if gw
                .metric(
                    "sluice_upstream_requests_total",
                    &[("upstream", "primary"), ("outcome", "ok")],
                )
                .await
                == Some(1.0)
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    };
    assert!(counted.await, "{}", gw.metrics().await);
}

/// A stream that reports an error before any content (OpenAI's
/// `{"error": …}` after the role chunk, Anthropic's `error` event after
/// `message_start`) failed before producing anything: it fails over.
#[tokio::test]
async fn an_error_event_before_content_fails_over() {
    for events in [
        vec![
            ROLE,
            r#"{"error":{"message":"overloaded","type":"server_error"}}"#,
        ],
        vec![
            r#"{"type":"message_start","message":{"model":"claude","usage":{"input_tokens":25}}}"#,
            r#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#,
        ],
    ] {
        let primary = MockUpstream::always(UpstreamReply::sse(&events, Duration::ZERO)).await;
        let (gw, backup) = with_backup(&primary, "").await;
        let reply = chat(&gw).await;
        assert_eq!(reply.text(), "backup", "{events:?}");
        assert_eq!(backup.seen().len(), 1);
        let log = &gw.wait_access_logs(1).await[0];
        assert_eq!(log["attempts"], 2);
        assert_eq!(
            gw.metric(
                "sluice_upstream_requests_total",
                &[("upstream", "primary"), ("outcome", "stream_error")]
            )
            .await,
            Some(1.0)
        );
    }
}

/// A reload that repoints an upstream whose circuit is open gives it a
/// closed circuit: the old address's failures say nothing of the new one,
/// and an operator fixing a URL expects it used at once. A reload that
/// leaves the URL alone keeps the circuit open.
#[tokio::test]
async fn a_reload_that_fixes_an_upstream_url_closes_its_circuit() {
    let broken = MockUpstream::always(failing(500)).await;
    let fixed = MockUpstream::always(UpstreamReply::text("fixed")).await;
    let backup = MockUpstream::always(UpstreamReply::text("backup")).await;
    let pool = "    circuit_breaker: { failures: 1, cooldown: 60s }";
    let gw = TestGateway::start_watched(
        &config(&broken.url(), &backup.url(), pool, ""),
        &[],
        tempfile::tempdir().unwrap(),
    )
    .await;
    assert_eq!(chat(&gw).await.text(), "backup");
    let up = || gw.metric("sluice_upstream_up", &[("upstream", "primary")]);
    assert_eq!(up().await, Some(0.0));

    // Another change, same URL: still open.
    gw.swap_config(&config(&broken.url(), &backup.url(), pool, "").replace("300ms", "400ms"));
    assert!(
        eventually(Duration::from_secs(5), || gw
            .log_text()
            .contains("config_reloaded"))
        .await
    );
    assert_eq!(up().await, Some(0.0));
    assert_eq!(chat(&gw).await.text(), "backup");

    gw.swap_config(&config(&fixed.url(), &backup.url(), pool, ""));
    assert!(
        eventually(Duration::from_secs(5), || {
            gw.log_text().matches("config_reloaded").count() == 2
        })
        .await
    );
    assert_eq!(up().await, Some(1.0));
    assert_eq!(chat(&gw).await.text(), "fixed");
    assert_eq!(broken.seen().len(), 1);
}

/// A stream that breaks before content fails over only if `retry_on`
/// says so for a failed connection (`connect`): a pool that retries on
/// 503 alone answers 502 and leaves the next member alone.
#[tokio::test]
async fn a_stream_broken_before_content_fails_over_only_as_retry_on_says() {
    // The role chunk is flushed before the cut.
    let dying = role_then(
        Duration::from_millis(100),
        Bytes::from_static(b": ping\n\n"),
    )
    .cut();
    let primary = MockUpstream::always(dying).await;
    let backup = MockUpstream::always(UpstreamReply::text("backup")).await;
    let gw = TestGateway::start(&config(
        &primary.url(),
        &backup.url(),
        "    retry_on: [503]",
        "",
    ))
    .await;
    let reply = chat(&gw).await;
    assert_eq!(reply.status, 502, "{}", reply.text());
    assert!(backup.seen().is_empty(), "no failover");
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["attempts"], 1);
}

/// A stream that goes quiet before content is cut at the upstream's
/// `idle`, as it would be once flowing, not left to wait out `first_byte`
/// (by default the whole request_timeout): it fails over at once.
#[tokio::test]
async fn a_stream_quiet_before_content_fails_over_after_idle() {
    let stalled = role_then(
        Duration::from_secs(10),
        Bytes::from(format!("data: {HELLO}\n\n")),
    );
    let primary = MockUpstream::always(stalled).await;
    let events = [ROLE, HELLO, STOP, "[DONE]"];
    let backup = MockUpstream::always(UpstreamReply::sse(&events, Duration::ZERO)).await;
    let gw = TestGateway::start(&pool_of(
        &format!(
            "  primary: {{ url: \"{}\", timeouts: {{ first_byte: 20s, idle: 300ms }} }}\n  backup: {{ url: \"{}\" }}",
            primary.url(),
            backup.url()
        ),
        "members: [primary, backup]",
    ))
    .await;
    let started = std::time::Instant::now();
    let reply = chat(&gw).await;
    assert_eq!(reply.status, 200);
    assert!(reply.text().contains("Hello"), "{}", reply.text());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["upstream"], "backup");
}

/// Health checks probe every member at once, each with the interval to
/// answer: a member whose check hangs does not hold back the others'
/// checks. Probes carry the member's `set_headers` (a provider's
/// authenticated path can be the check).
#[tokio::test]
async fn health_checks_run_every_interval_whatever_one_member_does() {
    let hanging =
        MockUpstream::always(UpstreamReply::text("late").delay(Duration::from_secs(30))).await;
    let steady = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&pool_of(
        &format!(
            "  hanging: {{ url: \"{}\" }}\n  steady: {{ url: \"{}\", set_headers: {{ authorization: \"Bearer sk-upstream-own\" }} }}",
            hanging.url(),
            steady.url()
        ),
        "members: [hanging, steady], health_check: { path: /health, interval: 200ms }",
    ))
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let probes = steady.seen();
    assert!(probes.len() >= 4, "{} probes in 1.5 s", probes.len());
    assert!(probes.iter().all(|p| p.uri.path() == "/health"));
    assert_eq!(
        probes[0]
            .headers
            .get("authorization")
            .map(|v| v.to_str().unwrap()),
        Some("Bearer sk-upstream-own")
    );
    drop(gw);
}

/// A member skipped for its open circuit is named in the 502's list of
/// attempts, beside the members that were tried.
#[tokio::test]
async fn a_skipped_member_is_named_when_every_attempt_fails() {
    let broken = MockUpstream::always(failing(500)).await;
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = calls.clone();
    let backup = MockUpstream::start(move |_| match counted.fetch_add(1, Ordering::SeqCst) {
        0 => UpstreamReply::text("backup"),
        _ => failing(503),
    })
    .await;
    let gw = TestGateway::start(&config(
        &broken.url(),
        &backup.url(),
        "    circuit_breaker: { failures: 1, cooldown: 60s }",
        "",
    ))
    .await;
    assert_eq!(chat(&gw).await.text(), "backup");
    let reply = chat(&gw).await;
    assert_eq!(reply.status, 502);
    assert_eq!(
        reply.json()["error"]["message"],
        "every upstream attempt failed: primary: skipped (circuit open); backup: 503"
    );
}

/// Every member answering 429 with a `retry-after`: the 502 says how long
/// to wait (the shortest), so that SDKs back off that long. One that fails
/// otherwise leaves it out (a retry might succeed at once).
#[tokio::test]
async fn every_member_rate_limited_gives_the_shortest_wait() {
    let limited = |secs: &str| {
        let mut r = failing(429);
        r.headers.push(("retry-after".into(), secs.into()));
        r
    };
    let a = MockUpstream::always(limited("7")).await;
    let b = MockUpstream::always(limited("3")).await;
    let gw = TestGateway::start(&config(&a.url(), &b.url(), "", "")).await;
    let reply = chat(&gw).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.header("retry-after"), Some("3"));

    let a = MockUpstream::always(limited("7")).await;
    let b = MockUpstream::always(failing(500)).await;
    let gw = TestGateway::start(&config(&a.url(), &b.url(), "", "")).await;
    let reply = chat(&gw).await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.header("retry-after"), None);
}

/// With the default timeouts (first_byte = request_timeout), a member
/// that goes quiet before content after an earlier member failed is its
/// own fault, not the request's time running out: the next member is
/// still tried.
#[tokio::test]
async fn a_quiet_second_member_still_fails_over_to_the_third() {
    let stalled = role_then(
        Duration::from_secs(10),
        Bytes::from(format!("data: {HELLO}\n\n")),
    );
    let quiet = MockUpstream::always(stalled).await;
    let events = [ROLE, HELLO, STOP, "[DONE]"];
    let good = MockUpstream::always(UpstreamReply::sse(&events, Duration::ZERO)).await;
    let dead = RefusedPort::new();
    let gw = TestGateway::start(&pool_of(
        &format!(
            "  dead: {{ url: \"{}\" }}\n  quiet: {{ url: \"{}\", timeouts: {{ idle: 300ms }} }}\n  good: {{ url: \"{}\" }}",
            dead.url(),
            quiet.url(),
            good.url()
        ),
        "members: [dead, quiet, good]",
    ))
    .await;
    let reply = chat(&gw).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["upstream"], "good");
    assert_eq!(log["attempts"], 3);
}

/// The circuit of an upstream a reload repointed is the only one that
/// moves its gauge: the old config's health checks, which go on while a
/// request still runs on it, no longer report the old address there.
#[tokio::test]
async fn a_repointed_upstream_gauge_is_not_moved_by_the_old_config() {
    let broken = MockUpstream::always(failing(500)).await;
    let fixed = MockUpstream::always(UpstreamReply::text("fixed")).await;
    let mut long_answer = UpstreamReply::text("s");
    long_answer
        .chunks
        .push((Duration::from_secs(2), Bytes::from_static(b"low")));
    let slow = MockUpstream::always(long_answer).await;
    let pool = "    health_check: { path: /health, interval: 100ms }\n    circuit_breaker: { failures: 1, cooldown: 60s }";
    let gw = Arc::new(
        TestGateway::start_watched(
            &config(&broken.url(), &slow.url(), pool, ""),
            &[],
            tempfile::tempdir().unwrap(),
        )
        .await,
    );
    async fn up(gw: &TestGateway) -> Option<f64> {
        primary_up(gw).await
    }
    for _ in 0..50 {
        if up(&gw).await == Some(0.0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(up(&gw).await, Some(0.0));
    // A request that keeps the old config alive through the reload.
    let in_flight = {
        let gw = gw.clone();
        tokio::spawn(async move { chat(&gw).await.text() })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Without a health check of its own: only the old config's probes
    // could move the gauge now.
    gw.swap_config(&config(
        &fixed.url(),
        &slow.url(),
        "    circuit_breaker: { failures: 1, cooldown: 60s }",
        "",
    ));
    assert!(
        eventually(Duration::from_secs(5), || gw
            .log_text()
            .contains("config_reloaded"))
        .await
    );
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(up(&gw).await, Some(1.0));
    }
    assert_eq!(in_flight.await.unwrap(), "slow");
}

/// A stream compressed though sluice asked for `identity` has no events
/// to read: on a pool it passes as it came, as on a single upstream,
/// rather than being taken for one that never began (and generated again
/// by the next member).
#[tokio::test]
async fn a_compressed_stream_passes_as_it_came() {
    let squeezed = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03not-really-gzip".to_vec();
    let primary = MockUpstream::always(
        UpstreamReply::text(squeezed.clone())
            .header("content-type", "text/event-stream")
            .header("content-encoding", "gzip"),
    )
    .await;
    let backup = MockUpstream::always(UpstreamReply::text("backup")).await;
    let gw = TestGateway::start(&config(&primary.url(), &backup.url(), "", "")).await;
    let reply = chat(&gw).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("content-encoding"), Some("gzip"));
    assert_eq!(reply.body.to_vec(), squeezed);
    assert!(backup.seen().is_empty(), "generated again by the backup");
}

/// A member whose answer breaks right after its head (a garbled first
/// chunk, a close) has sent the client nothing: the next member answers,
/// rather than the client getting an empty reply.
#[tokio::test]
async fn an_answer_broken_before_its_body_fails_over() {
    use crate::support::raw::{AfterAnswer, RawUpstream};
    for broken in [
        &b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n"[..],
        &b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 50\r\n\r\n"[..],
    ] {
        let primary = RawUpstream::start(broken, AfterAnswer::CloseWhenIdle(Duration::from_millis(20))).await;
        let backup = MockUpstream::always(UpstreamReply::text("backup")).await;
        let gw = TestGateway::start(&config(&primary.url(), &backup.url(), "", "")).await;
        let reply = chat(&gw).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), "backup");
        let log = &gw.wait_access_logs(1).await[0];
        assert_eq!(log["attempts"], 2, "{log}");
        assert_eq!(log["error"], Value::Null, "{log}");
    }
}

/// A member that closed a kept-alive connection as it was reused (its
/// keep-alive timeout shorter than sluice's) fails the POST sent on it
/// over to the next member, but its circuit does not count the race: it
/// answers on a new connection.
#[tokio::test]
async fn a_keep_alive_race_fails_over_without_counting_against_the_member() {
    use crate::support::{AfterAnswer, RawUpstream};
    let primary = RawUpstream::start(
        b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\nprimary",
        AfterAnswer::DropTheNext,
    )
    .await;
    let backup = MockUpstream::always(UpstreamReply::text("backup")).await;
    let breaker = "    circuit_breaker: { failures: 1, cooldown: 30s }";
    let gw = TestGateway::start(&config(&primary.url(), &backup.url(), breaker, "")).await;
    let client = Client::new();
    let first = client.post_json(&gw.url("/v1/x"), &[], "{}").await;
    assert_eq!(first.text(), "primary");
    let raced = client.post_json(&gw.url("/v1/x"), &[], "{}").await;
    assert_eq!(raced.text(), "backup", "failed over");
    assert_eq!(primary.requests(), 2, "a POST is not sent twice");
    assert_eq!(primary_up(&gw).await, Some(1.0), "{}", gw.log_text());
    let third = client.post_json(&gw.url("/v1/x"), &[], "{}").await;
    assert_eq!(third.text(), "primary", "the member still takes requests");
    let logs = gw.wait_access_logs(3).await;
    assert_eq!(logs[1]["attempts"], 2, "{}", logs[1]);
    assert_eq!(logs[1]["upstream"], "backup", "{}", logs[1]);
}
