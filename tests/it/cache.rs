//! The response cache: hits with `age`, canonical JSON keys, identity and
//! shared scope, client and upstream cache-control, non-200 answers, TTL,
//! the byte bound, SSE replay, coalescing of concurrent identical requests
//! (and a failed lead not failing the rest), and the metrics of hits.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;

use serde_json::json;

use crate::support::{Client, MockUpstream, TestGateway, UpstreamReply};

fn config(url: &str, cache: &str) -> String {
    format!(
        r#"
upstreams:
  llm: {{ url: "{url}" }}
auth:
  api_keys:
    - {{ id: alice, key: sk-alice-0001 }}
    - {{ id: bob, key: sk-bob-0002 }}
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
    cache: {cache}
    upstream: llm
  - name: plain
    match: {{ path_prefix: /plain/ }}
    upstream: llm
pricing:
  gpt-4o-mini: {{ input: 0.15, output: 0.60 }}
  default: {{ input: 1.00, output: 3.00 }}
"#
    )
}

const ALICE: (&str, &str) = ("authorization", "Bearer sk-alice-0001");
const BOB: (&str, &str) = ("authorization", "Bearer sk-bob-0002");

fn answer() -> serde_json::Value {
    json!({
        "id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}
    })
}

async fn start(cache: &str, reply: UpstreamReply) -> (TestGateway, MockUpstream) {
    let upstream = MockUpstream::always(reply).await;
    let gw = TestGateway::start(&config(&upstream.url(), cache)).await;
    (gw, upstream)
}

/// `sluice_cache_requests_total` of the `chat` route for `result`.
async fn cache_results(gw: &TestGateway, result: &str) -> Option<f64> {
    gw.metric(
        "sluice_cache_requests_total",
        &[("route", "chat"), ("result", result)],
    )
    .await
}

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hello"}]}"#;

#[tokio::test]
async fn second_identical_request_is_a_hit_with_age() {
    let (gw, upstream) = start("{ ttl: 10m }", UpstreamReply::json(&answer())).await;
    let client = Client::new();
    let url = gw.url("/v1/chat/completions?x=1");
    let first = client.post_json(&url, &[ALICE], CHAT).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-sluice-cache"), Some("MISS"));
    assert_eq!(first.header("age"), None);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = client.post_json(&url, &[ALICE], CHAT).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.header("x-sluice-cache"), Some("HIT"));
    let age: u64 = second.header("age").unwrap().parse().unwrap();
    assert!(age >= 1, "age {age}");
    assert_eq!(second.body, first.body);
    assert_eq!(second.header("content-type"), Some("application/json"));
    assert!(second.header("x-request-id").is_some());
    assert_ne!(second.header("x-request-id"), first.header("x-request-id"));
    assert_eq!(upstream.seen().len(), 1, "the upstream was called once");

    let logs = gw.wait_access_logs(2).await;
    assert_eq!(logs[0]["cache"], "miss");
    assert_eq!(logs[1]["cache"], "hit");
    assert_eq!(logs[1]["status"], 200);
    assert_eq!(logs[1]["upstream"], serde_json::Value::Null);
    for (result, n) in [("hit", 1.0), ("miss", 1.0), ("bypass", 0.0)] {
        assert_eq!(cache_results(&gw, result).await, Some(n), "{result}");
    }
}

#[tokio::test]
async fn a_hit_saves_its_cost_and_spends_no_tokens() {
    let (gw, upstream) = start("{ ttl: 10m }", UpstreamReply::json(&answer())).await;
    let client = Client::new();
    let url = gw.url("/v1/chat/completions");
    for _ in 0..3 {
        assert_eq!(client.post_json(&url, &[ALICE], CHAT).await.status, 200);
    }
    assert_eq!(upstream.seen().len(), 1);
    // 1000 × 0.15 + 500 × 0.60 per million: what each of the two hits saved.
    let one_call = (1000.0 * 0.15 + 500.0 * 0.60) / 1e6;
    let saved = gw
        .metric("sluice_cache_saved_usd_total", &[("route", "chat")])
        .await
        .unwrap();
    assert!((saved - 2.0 * one_call).abs() < 1e-12, "saved {saved}");
    let input = [
        ("route", "chat"),
        ("model", "gpt-4o-mini"),
        ("kind", "input"),
    ];
    assert_eq!(gw.metric("sluice_tokens_total", &input).await, Some(1000.0));
    let spent = gw
        .metric(
            "sluice_cost_usd_total",
            &[("route", "chat"), ("model", "gpt-4o-mini")],
        )
        .await
        .unwrap();
    assert!((spent - one_call).abs() < 1e-12, "spent {spent}");
    let logs = gw.wait_access_logs(3).await;
    assert_eq!(logs[2]["cache"], "hit");
    assert_eq!(logs[2]["model"], "gpt-4o-mini");
    assert_eq!(logs[2]["input_tokens"], serde_json::Value::Null);
}

#[tokio::test]
async fn key_order_and_whitespace_do_not_matter() {
    let (gw, upstream) = start("{ ttl: 10m }", UpstreamReply::json(&answer())).await;
    let client = Client::new();
    let url = gw.url("/v1/chat/completions");
    client.post_json(&url, &[ALICE], CHAT).await;
    let reordered = r#"{ "messages": [ {"content": "hello", "role": "user"} ],
        "model": "gpt-4o-mini" }"#;
    let again = client.post_json(&url, &[ALICE], reordered).await;
    assert_eq!(again.header("x-sluice-cache"), Some("HIT"));
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn a_different_body_path_or_query_misses() {
    let (gw, upstream) = start("{ ttl: 10m }", UpstreamReply::json(&answer())).await;
    let client = Client::new();
    client
        .post_json(&gw.url("/v1/chat/completions"), &[ALICE], CHAT)
        .await;
    let other_body = CHAT.replace("hello", "hello!");
    let cases = [
        (gw.url("/v1/chat/completions"), other_body.as_str()),
        (gw.url("/v1/chat/completions?v=2"), CHAT),
        (gw.url("/v1/completions"), CHAT),
    ];
    for (url, body) in &cases {
        let reply = client.post_json(url, &[ALICE], body).await;
        assert_eq!(reply.header("x-sluice-cache"), Some("MISS"), "{url} {body}");
    }
    assert_eq!(upstream.seen().len(), 4);
}

#[tokio::test]
async fn identity_scope_keeps_callers_apart_and_shared_scope_does_not() {
    let (gw, upstream) = start("{ ttl: 10m }", UpstreamReply::json(&answer())).await;
    let client = Client::new();
    let url = gw.url("/v1/chat/completions");
    client.post_json(&url, &[ALICE], CHAT).await;
    let bob = client.post_json(&url, &[BOB], CHAT).await;
    assert_eq!(bob.header("x-sluice-cache"), Some("MISS"));
    assert_eq!(upstream.seen().len(), 2);

    let (gw, upstream) = start(
        "{ ttl: 10m, scope: shared }",
        UpstreamReply::json(&answer()),
    )
    .await;
    let url = gw.url("/v1/chat/completions");
    client.post_json(&url, &[ALICE], CHAT).await;
    let bob = client.post_json(&url, &[BOB], CHAT).await;
    assert_eq!(bob.header("x-sluice-cache"), Some("HIT"));
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn no_cache_skips_the_lookup_but_stores_and_no_store_bypasses() {
    let (gw, upstream) = start("{ ttl: 10m }", UpstreamReply::json(&answer())).await;
    let client = Client::new();
    let url = gw.url("/v1/chat/completions");

    let bypass = client
        .post_json(&url, &[ALICE, ("cache-control", "no-store")], CHAT)
        .await;
    assert_eq!(bypass.header("x-sluice-cache"), Some("BYPASS"));
    let after_bypass = client
        .post_json(&url, &[ALICE, ("cache-control", "no-cache")], CHAT)
        .await;
    // no-store stored nothing, and no-cache did not look: both went upstream.
    assert_eq!(after_bypass.header("x-sluice-cache"), Some("MISS"));
    assert_eq!(upstream.seen().len(), 2);

    // ... but no-cache stored its answer.
    let hit = client.post_json(&url, &[ALICE], CHAT).await;
    assert_eq!(hit.header("x-sluice-cache"), Some("HIT"));
    let fresh = client
        .post_json(
            &url,
            &[ALICE, ("cache-control", "max-age=0, no-cache")],
            CHAT,
        )
        .await;
    assert_eq!(fresh.header("x-sluice-cache"), Some("MISS"));
    assert_eq!(upstream.seen().len(), 3);
    // `max-age=0` alone, and HTTP/1.0's `pragma: no-cache`, ask for a
    // fresh answer too (RFC 9111 §5.2.1.1, §5.4).
    for asked in [("cache-control", "max-age=0"), ("pragma", "no-cache")] {
        let fresh = client.post_json(&url, &[ALICE, asked], CHAT).await;
        assert_eq!(fresh.header("x-sluice-cache"), Some("MISS"), "{asked:?}");
    }
    assert_eq!(upstream.seen().len(), 5);
    assert_eq!(cache_results(&gw, "bypass").await, Some(1.0));
    // A route without cache says nothing about it.
    let plain = client.post_json(&gw.url("/plain/x"), &[ALICE], CHAT).await;
    assert_eq!(plain.header("x-sluice-cache"), None);
}

#[tokio::test]
async fn only_cacheable_200_answers_are_stored() {
    let replies = [
        UpstreamReply::status(500).body("{}"),
        UpstreamReply::status(201).body("{}"),
        UpstreamReply::json(&answer()).header("cache-control", "no-store"),
        UpstreamReply::json(&answer()).header("cache-control", "private, max-age=60"),
        // An error said in a 200 (some OpenAI-compatible servers, a
        // failed responses-API answer): kept, it would answer every
        // identical request with that error for the whole ttl.
        UpstreamReply::json(&json!({"error": {"message": "overloaded", "type": "server_error"}})),
        UpstreamReply::json(&json!({"type": "error", "error": {"type": "overloaded_error"}})),
        UpstreamReply::json(&json!({"object": "response", "status": "failed",
            "error": {"code": "server_error", "message": "failed"}, "output": []})),
        // Written twice, a member leaves the answer's usage unread, not
        // its error.
        UpstreamReply::text(r#"{"model":"a","model":"b","error":{"message":"x"}}"#)
            .header("content-type", "application/json"),
        UpstreamReply::text(r#"{"error":null,"error":{"message":"x"}}"#)
            .header("content-type", "application/json"),
    ];
    for (i, reply) in replies.into_iter().enumerate() {
        let what = format!("reply {i}: {} {:?}", reply.status, reply.headers);
        let (gw, upstream) = start("{ ttl: 10m }", reply).await;
        let client = Client::new();
        let url = gw.url("/v1/chat/completions");
        for _ in 0..2 {
            let reply = client.post_json(&url, &[ALICE], CHAT).await;
            assert_eq!(reply.header("x-sluice-cache"), Some("MISS"), "{what}");
        }
        assert_eq!(upstream.seen().len(), 2, "{what}");
    }
}

#[tokio::test]
async fn entries_expire_after_the_route_ttl() {
    let (gw, upstream) = start("{ ttl: 1s }", UpstreamReply::json(&answer())).await;
    let client = Client::new();
    let url = gw.url("/v1/chat/completions");
    client.post_json(&url, &[ALICE], CHAT).await;
    let hit = client.post_json(&url, &[ALICE], CHAT).await;
    assert_eq!(hit.header("x-sluice-cache"), Some("HIT"));
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let expired = client.post_json(&url, &[ALICE], CHAT).await;
    assert_eq!(expired.header("x-sluice-cache"), Some("MISS"));
    assert_eq!(upstream.seen().len(), 2);
}

#[tokio::test]
async fn the_cache_holds_no_more_than_max_bytes() {
    let upstream = MockUpstream::start(|seen| {
        // A distinct 2 KiB answer per request.
        let mut body = String::from_utf8_lossy(&seen.body).into_owned();
        body.push_str(&"x".repeat(2048));
        UpstreamReply::text(body)
    })
    .await;
    let yaml = format!(
        "{}cache: {{ max_bytes: 64KiB }}\n",
        config(&upstream.url(), "{ ttl: 10m }")
    );
    let gw = TestGateway::start(&yaml).await;
    let client = Client::new();
    let url = gw.url("/v1/echo");
    for i in 0..200 {
        let reply = client
            .post_json(&url, &[ALICE], &format!("{{\"n\":{i}}}"))
            .await;
        assert_eq!(reply.status, 200);
    }
    let bytes = gw.metric("sluice_cache_size_bytes", &[]).await.unwrap();
    let entries = gw.metric("sluice_cache_entries", &[]).await.unwrap();
    assert!(bytes <= 65536.0, "{bytes} bytes held");
    assert!(bytes >= 16384.0, "the cache holds something: {bytes}");
    assert!((8.0..32.0).contains(&entries), "{entries} entries");
    // An entry larger than its cap (here the whole bound) is never stored.
    let big = "y".repeat(64 * 1024);
    for _ in 0..2 {
        let reply = client
            .post_json(&url, &[ALICE], &format!("{{\"big\":\"{big}\"}}"))
            .await;
        assert_eq!(reply.header("x-sluice-cache"), Some("MISS"));
    }
}

#[tokio::test]
async fn a_streamed_answer_is_replayed_byte_identical() {
    let events = [
        r#"{"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}"#,
        r#"{"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hel"}}]}"#,
        r#"{"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"lo"},"finish_reason":"stop"}]}"#,
        r#"{"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}"#,
        "[DONE]",
    ];
    let (gw, upstream) = start(
        "{ ttl: 10m }",
        UpstreamReply::sse(&events, Duration::from_millis(30)),
    )
    .await;
    let client = Client::new();
    let url = gw.url("/v1/chat/completions");
    let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
    let first = client.post_json(&url, &[ALICE], body).await;
    assert_eq!(first.header("x-sluice-cache"), Some("MISS"));
    assert!(first.frames.len() >= 4, "the miss streamed chunk by chunk");
    let second = client.post_json(&url, &[ALICE], body).await;
    assert_eq!(second.header("x-sluice-cache"), Some("HIT"));
    assert_eq!(second.header("content-type"), Some("text/event-stream"));
    assert_eq!(second.body, first.body, "the replay is byte-identical");
    assert!(second.text().ends_with("data: [DONE]\n\n"));
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn a_broken_stream_is_not_stored() {
    let reply = UpstreamReply::sse(
        &[
            r#"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#,
            r#"{"choices":[{"index":0,"delta":{"content":"lo"}}]}"#,
        ],
        Duration::from_millis(20),
    )
    .cut();
    let (gw, upstream) = start("{ ttl: 10m }", reply).await;
    let client = Client::new();
    let url = gw.url("/v1/chat/completions");
    let body = r#"{"model":"m","stream":true,"messages":[]}"#;
    for _ in 0..2 {
        let reply = client.post_json(&url, &[ALICE], body).await;
        assert_eq!(reply.header("x-sluice-cache"), Some("MISS"));
        assert!(
            reply.text().contains("upstream_stream_error"),
            "{}",
            reply.text()
        );
    }
    assert_eq!(upstream.seen().len(), 2);
}

#[tokio::test]
async fn concurrent_identical_requests_make_one_upstream_call() {
    let (gw, upstream) = start(
        "{ ttl: 10m }",
        UpstreamReply::json(&answer()).delay(Duration::from_millis(300)),
    )
    .await;
    let gw = Arc::new(gw);
    let client = Client::new();
    let url = gw.url("/v1/chat/completions");
    let calls = (0..20).map(|_| {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move { client.post_json(&url, &[ALICE], CHAT).await })
    });
    let replies = futures_util::future::join_all(calls).await;
    let mut hits = 0;
    for reply in replies {
        let reply = reply.unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(reply.json(), answer());
        hits += usize::from(reply.header("x-sluice-cache") == Some("HIT"));
    }
    assert_eq!(
        upstream.seen().len(),
        1,
        "one upstream call for 20 requests"
    );
    assert_eq!(hits, 19);
}

#[tokio::test]
async fn a_failed_lead_does_not_fail_the_requests_waiting_on_it() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let upstream = MockUpstream::start(move |_| {
        if counter.fetch_add(1, Ordering::SeqCst) == 0 {
            UpstreamReply::status(500)
                .body(r#"{"error":{"message":"boom"}}"#)
                .delay(Duration::from_millis(300))
        } else {
            UpstreamReply::json(&answer()).delay(Duration::from_millis(100))
        }
    })
    .await;
    let gw = TestGateway::start(&config(&upstream.url(), "{ ttl: 10m }")).await;
    let client = Client::new();
    let url = gw.url("/v1/chat/completions");
    let lead = {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move { client.post_json(&url, &[ALICE], CHAT).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiters = (0..5).map(|_| {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move { client.post_json(&url, &[ALICE], CHAT).await })
    });
    let waiters = futures_util::future::join_all(waiters).await;
    assert_eq!(lead.await.unwrap().status, 500);
    for reply in waiters {
        let reply = reply.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
        assert_eq!(reply.json(), answer());
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one waiter retried, the others waited on it"
    );
}

/// A waiter's bound (half of what was left of its time when it began to
/// wait) holds across leads that fail in turn: in an outage the last of
/// three identical requests calls the upstream itself in time for its
/// own answer, rather than waiting on each failure and timing out.
#[tokio::test]
async fn a_waiter_stops_waiting_in_time_however_many_leads_fail() {
    let upstream = MockUpstream::always(
        UpstreamReply::status(502)
            .body(r#"{"error":{"message":"down"}}"#)
            .delay(Duration::from_millis(3000)),
    )
    .await;
    let yaml = format!(
        "limits: {{ request_timeout: 8s }}\n{}",
        config(&upstream.url(), "{ ttl: 10m }")
    );
    let gw = TestGateway::start(&yaml).await;
    let client = Client::new();
    let url = gw.url("/v1/chat/completions");
    let send = || {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move { client.post_json(&url, &[ALICE], CHAT).await })
    };
    let lead = send();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiters = [send(), send()];
    // The lead fails at 3 s; one waiter takes its turn (failing at 6 s);
    // the other stops waiting at about 4 s, its bound, and has its own
    // answer by 7 s, within its 8 s. (Its bound counted afresh from 3 s
    // would be 5.5 s, and its answer come after its deadline.)
    assert_eq!(lead.await.unwrap().status, 502);
    for waiter in futures_util::future::join_all(waiters).await {
        let reply = waiter.unwrap();
        assert_eq!(reply.status, 502, "{}", reply.text());
    }
    assert_eq!(upstream.seen().len(), 3);
}

/// A lead whose answer is final but not stored (a 400, a `no-store`)
/// sends the requests waiting on it to the upstream at once, not one
/// after the other.
#[tokio::test]
async fn requests_waiting_on_an_unstorable_answer_go_at_once() {
    let upstream = MockUpstream::always(
        UpstreamReply::status(400)
            .body(r#"{"error":{"message":"bad"}}"#)
            .delay(Duration::from_millis(400)),
    )
    .await;
    let gw = TestGateway::start(&config(&upstream.url(), "{ ttl: 10m }")).await;
    let client = Client::new();
    let url = gw.url("/v1/chat/completions");
    let started = std::time::Instant::now();
    let lead = {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move { client.post_json(&url, &[ALICE], CHAT).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiters = (0..4).map(|_| {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move { client.post_json(&url, &[ALICE], CHAT).await })
    });
    let waiters = futures_util::future::join_all(waiters).await;
    assert_eq!(lead.await.unwrap().status, 400);
    for reply in waiters {
        assert_eq!(reply.unwrap().status, 400);
    }
    assert_eq!(upstream.seen().len(), 5);
    // In turn, they would take 5 × 400 ms.
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_hit_still_counts_against_request_limits() {
    let upstream = MockUpstream::always(UpstreamReply::json(&answer())).await;
    let yaml = config(&upstream.url(), "{ ttl: 10m }").replace(
        "    cache: { ttl: 10m }\n",
        "    cache: { ttl: 10m }\n    rate_limit: { requests_per_minute: 2 }\n",
    );
    let gw = TestGateway::start(&yaml).await;
    let client = Client::new();
    let url = gw.url("/v1/chat/completions");
    let statuses = [
        client.post_json(&url, &[ALICE], CHAT).await,
        client.post_json(&url, &[ALICE], CHAT).await,
        client.post_json(&url, &[ALICE], CHAT).await,
    ];
    assert_eq!(statuses[1].header("x-sluice-cache"), Some("HIT"));
    assert_eq!(
        statuses[1].header("x-ratelimit-remaining-requests"),
        Some("0")
    );
    assert_eq!(statuses[2].status, 429);
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn a_stream_that_carried_an_error_event_is_not_stored() {
    let reply = UpstreamReply::sse(
        &[
            r#"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#,
            r#"{"error":{"message":"the model is overloaded","type":"server_error"}}"#,
            "[DONE]",
        ],
        Duration::from_millis(10),
    );
    let (gw, upstream) = start("{ ttl: 10m }", reply).await;
    let client = Client::new();
    let body =
        r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    for _ in 0..2 {
        let reply = client
            .post_json(&gw.url("/v1/chat/completions"), &[ALICE], body)
            .await;
        assert_eq!(reply.header("x-sluice-cache"), Some("MISS"));
    }
    assert_eq!(upstream.seen().len(), 2);
}

/// Every response of a cached route says `x-sluice-cache`, also one refused
/// before the cache was consulted: BYPASS, counted and logged as such.
/// Other routes never carry the header.
#[tokio::test]
async fn refusals_on_a_cached_route_say_bypass() {
    let (gw, upstream) = start("{ ttl: 10m }", UpstreamReply::json(&answer())).await;
    let client = Client::new();
    let url = gw.url("/v1/chat/completions");
    let refused = client.post_json(&url, &[], CHAT).await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.header("x-sluice-cache"), Some("BYPASS"));
    let plain = client.post_json(&gw.url("/plain/x"), &[], CHAT).await;
    assert_eq!(plain.status, 401);
    assert_eq!(plain.header("x-sluice-cache"), None);
    let logs = gw.wait_access_logs(2).await;
    let chat_log = logs.iter().find(|l| l["route"] == "chat").unwrap();
    assert_eq!(chat_log["cache"], "bypass");
    let plain_log = logs.iter().find(|l| l["route"] == "plain").unwrap();
    assert_eq!(plain_log["cache"], serde_json::Value::Null);
    assert_eq!(cache_results(&gw, "bypass").await, Some(1.0));
    // A request the cache does see is unchanged: a miss, then a hit.
    let miss = client.post_json(&url, &[ALICE], CHAT).await;
    assert_eq!(miss.header("x-sluice-cache"), Some("MISS"));
    let hit = client.post_json(&url, &[ALICE], CHAT).await;
    assert_eq!(hit.header("x-sluice-cache"), Some("HIT"));
    assert_eq!(upstream.seen().len(), 1);
}

/// A small cache still stores an ordinary answer: the entry cap is not an
/// eighth of a 2 KiB bound.
#[tokio::test]
async fn a_small_cache_still_hits() {
    let mut long = answer();
    long["choices"][0]["message"]["content"] = json!("a longer answer ".repeat(40));
    let upstream = MockUpstream::always(UpstreamReply::json(&long)).await;
    let yaml = format!(
        "{}cache: {{ max_bytes: 2KiB }}\n",
        config(&upstream.url(), "{ ttl: 10m }")
    );
    let gw = TestGateway::start(&yaml).await;
    let client = Client::new();
    let url = gw.url("/v1/chat/completions");
    let first = client.post_json(&url, &[ALICE], CHAT).await;
    assert_eq!(first.header("x-sluice-cache"), Some("MISS"));
    let second = client.post_json(&url, &[ALICE], CHAT).await;
    assert_eq!(second.header("x-sluice-cache"), Some("HIT"));
    assert_eq!(upstream.seen().len(), 1);
}

/// A client that hangs up as soon as it has read `[DONE]` (the OpenAI SDK
/// does), before the upstream's own end of body, read a complete stream:
/// it is stored and logged without error.
#[tokio::test]
async fn a_stream_read_to_done_is_stored_though_its_client_leaves_then() {
    let events = [
        r#"{"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#,
        r#"{"model":"gpt-4o-mini","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
        "[DONE]",
    ];
    let mut reply = UpstreamReply::sse(&events, Duration::ZERO);
    // The upstream's end of body comes a while after `[DONE]`.
    reply
        .chunks
        .push((Duration::from_millis(500), Bytes::from_static(b": bye\n\n")));
    let (gw, upstream) = start("{ ttl: 10m }", reply).await;
    let stream_body =
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let hyper_client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<http_body_util::Full<Bytes>>();
    let resp = hyper_client
        .request(
            http::Request::post(gw.url("/v1/chat/completions"))
                .header("authorization", ALICE.1)
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(Bytes::from_static(
                    stream_body.as_bytes(),
                )))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-sluice-cache"], "MISS");
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    while !seen.ends_with(b"data: [DONE]\n\n") {
        use http_body_util::BodyExt;
        let frame = body.frame().await.unwrap().unwrap();
        if let Ok(data) = frame.into_data() {
            seen.extend_from_slice(&data);
        }
    }
    drop(body);
    drop(hyper_client);
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["error"], serde_json::Value::Null, "{log}");
    let hit = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[ALICE], stream_body)
        .await;
    assert_eq!(hit.header("x-sluice-cache"), Some("HIT"));
    assert!(hit.text().as_bytes().starts_with(&seen), "{}", hit.text());
    assert_eq!(upstream.seen().len(), 1);
}

/// A request that missed the cache but was refused by a token limit
/// before any upstream was asked is a bypass, in its header, its log line
/// and the metric, as every other refusal on a cached route is.
#[tokio::test]
async fn a_token_limit_refusal_after_a_miss_is_a_bypass() {
    let up = MockUpstream::always(UpstreamReply::json(&answer())).await;
    let yaml = config(&up.url(), "{ ttl: 10m }").replace(
        "    cache: { ttl: 10m }\n",
        "    cache: { ttl: 10m }\n    rate_limit: { tokens_per_minute: 100 }\n",
    );
    let gw = TestGateway::start(&yaml).await;
    let reply = Client::new()
        .post_json(
            &gw.url("/v1/chat/completions"),
            &[ALICE],
            r#"{"model":"gpt-4o-mini","max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
    assert_eq!(reply.status, 429);
    assert_eq!(reply.header("x-sluice-cache"), Some("BYPASS"));
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["cache"], "bypass", "{log}");
    assert_eq!(cache_results(&gw, "bypass").await, Some(1.0));
    assert_eq!(cache_results(&gw, "miss").await, Some(0.0));
    assert!(up.seen().is_empty());
}

/// A lead whose client stops reading fills the cache no further; a
/// request waiting on it goes on alone in time for its own upstream call,
/// instead of timing out (and counting a timeout the upstream never had).
#[tokio::test]
async fn a_lead_whose_client_stops_reading_does_not_hold_the_waiters() {
    use tokio::io::AsyncWriteExt;
    let big = "x".repeat(7 << 20);
    let upstream = MockUpstream::always(UpstreamReply::text(big.clone())).await;
    let gw = TestGateway::start(&format!(
        r#"
limits: {{ request_timeout: 6s }}
cache: {{ max_bytes: 64MiB }}
upstreams:
  llm: {{ url: "{}" }}
auth:
  api_keys:
    - {{ id: alice, key: sk-alice-0001 }}
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
    cache: {{ ttl: 10m, scope: shared }}
    upstream: llm
"#,
        upstream.url()
    ))
    .await;
    // The lead: asks, then reads nothing, through a tiny receive window.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut lead = socket.connect(gw.addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-alice-0001\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{CHAT}",
        CHAT.len()
    );
    lead.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(upstream.seen().len(), 1);
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[ALICE], CHAT)
        .await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        &reply.text()[..200.min(reply.text().len())]
    );
    assert_eq!(reply.text().len(), big.len());
    assert_eq!(
        gw.metric(
            "sluice_upstream_requests_total",
            &[("upstream", "llm"), ("outcome", "timeout")]
        )
        .await,
        Some(0.0)
    );
    drop(lead);
}

/// A response that varies on a request header (a cookie here) answers
/// only requests with the same value: the key holds no header, so one
/// user's answer must not reach another on the same key.
#[tokio::test]
async fn a_response_that_varies_on_a_header_answers_only_that_value() {
    let upstream = MockUpstream::start(|seen| {
        let cookie = seen.header("cookie").unwrap_or("none").to_owned();
        UpstreamReply::text(format!("for {cookie}")).header("vary", "Cookie")
    })
    .await;
    let (url, client) = (upstream.url(), Client::new());
    let gw = TestGateway::start(&config(&url, "{ ttl: 10m, scope: shared }")).await;
    let get = |cookie: &'static str| {
        let (client, url) = (client.clone(), gw.url("/v1/me"));
        async move {
            client
                .send(
                    http::Method::GET,
                    &url,
                    &[ALICE, ("cookie", cookie)],
                    Bytes::new(),
                )
                .await
        }
    };
    let a = get("session=a").await;
    assert_eq!(
        (a.text().as_str(), a.header("x-sluice-cache")),
        ("for session=a", Some("MISS"))
    );
    let b = get("session=b").await;
    assert_eq!(
        (b.text().as_str(), b.header("x-sluice-cache")),
        ("for session=b", Some("MISS"))
    );
    let b_again = get("session=b").await;
    assert_eq!(
        (b_again.text().as_str(), b_again.header("x-sluice-cache")),
        ("for session=b", Some("HIT"))
    );
    assert_eq!(upstream.seen().len(), 2);
}

/// `vary: *` says no two requests are the same: never stored.
#[tokio::test]
async fn a_response_that_varies_on_everything_is_not_stored() {
    never_stored(UpstreamReply::json(&answer()).header("vary", "*")).await;
}

/// Asks twice for what `reply` answers: both are misses, both reach the
/// upstream, which is returned.
async fn never_stored(reply: UpstreamReply) -> MockUpstream {
    let (gw, upstream) = start("{ ttl: 10m }", reply).await;
    for _ in 0..2 {
        let reply = Client::new()
            .post_json(&gw.url("/v1/chat/completions"), &[ALICE], CHAT)
            .await;
        assert_eq!(reply.header("x-sluice-cache"), Some("MISS"));
    }
    assert_eq!(upstream.seen().len(), 2);
    upstream
}

/// An upstream that compressed its answer though sluice asked for
/// `identity`: a hit would hand that coding to clients that never said
/// they take it. Not stored.
#[tokio::test]
async fn a_compressed_answer_is_not_stored() {
    let upstream =
        never_stored(UpstreamReply::json(&answer()).header("content-encoding", "gzip")).await;
    assert_eq!(
        upstream.seen()[0].header("accept-encoding"),
        Some("identity")
    );
}

/// A JSON answer cut short by an upstream that closed a body without a
/// length looks ended to HTTP, but is no JSON document: not stored.
#[tokio::test]
async fn a_json_answer_cut_short_is_not_stored() {
    use crate::support::raw::{AfterAnswer, RawUpstream};
    let upstream = RawUpstream::start(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n\
          {\"object\":\"chat.completion\",\"choices\":[{\"message\":{\"content\":\"hal",
        AfterAnswer::CloseWhenIdle(Duration::from_millis(50)),
    )
    .await;
    let gw = TestGateway::start(&config(&upstream.url(), "{ ttl: 10m }")).await;
    for _ in 0..2 {
        let reply = Client::new()
            .post_json(&gw.url("/v1/chat/completions"), &[ALICE], CHAT)
            .await;
        assert_eq!(reply.header("x-sluice-cache"), Some("MISS"));
    }
    assert_eq!(upstream.requests(), 2);
}

/// A chunked answer that ends with trailers is whole: logged without
/// error, metered, and stored (it read as one its client had left).
#[tokio::test]
async fn an_answer_with_trailers_is_whole() {
    use crate::support::raw::{AfterAnswer, RawUpstream};
    let upstream = RawUpstream::start(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n\
          54\r\n{\"object\":\"chat.completion\",\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":4},\"x\":1}\r\n\
          0\r\nx-t: done\r\n\r\n",
        AfterAnswer::KeepAlive,
    )
    .await;
    let gw = TestGateway::start(&config(&upstream.url(), "{ ttl: 10m }")).await;
    let client = Client::new();
    for expected in ["MISS", "HIT"] {
        let reply = client
            .post_json(&gw.url("/v1/chat/completions"), &[ALICE], CHAT)
            .await;
        assert_eq!(reply.status, 200);
        assert!(reply.body_error.is_none(), "{:?}", reply.body_error);
        assert!(reply.text().ends_with("\"x\":1}"), "{}", reply.text());
        assert_eq!(reply.header("x-sluice-cache"), Some(expected));
    }
    let log = &gw.wait_access_logs(2).await[0];
    assert_eq!(log["error"], serde_json::Value::Null, "{log}");
    assert_eq!(log["input_tokens"], 3, "{log}");
    assert_eq!(upstream.requests(), 1);
}

/// A request that leaves while it waits on another's fetch is logged
/// and counted as a miss, as every request on a cached route has a
/// cache result.
#[tokio::test]
async fn a_waiter_that_leaves_is_counted_as_a_miss() {
    let (gw, _upstream) = start(
        "{ ttl: 10m }",
        UpstreamReply::json(&answer()).delay(Duration::from_millis(800)),
    )
    .await;
    let (client, url) = (Client::new(), gw.url("/v1/chat/completions"));
    let lead = {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move { client.post_json(&url, &[ALICE], CHAT).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waiter = client.post_json(&url, &[ALICE], CHAT);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), waiter)
            .await
            .is_err()
    );
    let logs = gw.wait_access_logs(1).await;
    assert_eq!(logs[0]["cache"], "miss", "{logs:?}");
    assert_eq!(lead.await.unwrap().status, 200);
    gw.wait_access_logs(2).await;
    assert_eq!(cache_results(&gw, "miss").await, Some(2.0));
}

/// Requests whose header values differ from a stored answer's `vary`
/// go to the upstream side by side, not queued one behind the other on
/// each other's fetches.
#[tokio::test]
async fn requests_of_other_vary_values_do_not_queue() {
    let upstream = MockUpstream::start(|seen| {
        let cookie = seen.header("cookie").unwrap_or("none").to_owned();
        UpstreamReply::text(format!("for {cookie}"))
            .header("vary", "cookie")
            .delay(Duration::from_millis(400))
    })
    .await;
    let gw = TestGateway::start(&config(&upstream.url(), "{ ttl: 10m, scope: shared }")).await;
    let client = Client::new();
    let url = gw.url("/v1/me");
    let get = |cookie: String| {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move {
            client
                .send(
                    http::Method::GET,
                    &url,
                    &[ALICE, ("cookie", &cookie)],
                    Bytes::new(),
                )
                .await
        })
    };
    assert_eq!(get("u=a".into()).await.unwrap().text(), "for u=a");
    let started = std::time::Instant::now();
    let others = (0..4).map(|i| get(format!("u={i}")));
    for (i, reply) in futures_util::future::join_all(others)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(reply.unwrap().text(), format!("for u={i}"));
    }
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "queued: {:?}",
        started.elapsed()
    );
}

/// The OpenAI API's stateful resources under a cached `/v1/` are passed
/// by: a batch polled must show its progress, a second create must make a
/// second batch, a background response is a job of its own each time, a
/// conversation's turn adds to it, and the list of stored chat
/// completions grows. Answers (a chat completion) are still cached
/// beside them.
#[tokio::test]
async fn stateful_resources_and_background_jobs_are_never_cached() {
    let (gw, upstream) = start(
        "{ ttl: 10m }",
        UpstreamReply::json(&json!({"id": "batch_1", "object": "batch", "status": "validating"})),
    )
    .await;
    let client = Client::new();
    for _ in 0..2 {
        let polled = client
            .get_with(&gw.url("/v1/batches/batch_1"), &[ALICE])
            .await;
        assert_eq!(polled.header("x-sluice-cache"), Some("BYPASS"));
        let created = client
            .post_json(&gw.url("/v1/batches"), &[ALICE], r#"{"input_file_id":"file-1","endpoint":"/v1/chat/completions","completion_window":"24h"}"#)
            .await;
        assert_eq!(created.header("x-sluice-cache"), Some("BYPASS"));
        let job = client
            .post_json(
                &gw.url("/v1/responses"),
                &[ALICE],
                r#"{"model":"o3","input":"x","background":true}"#,
            )
            .await;
        assert_eq!(job.header("x-sluice-cache"), Some("BYPASS"));
        let turn = client
            .post_json(
                &gw.url("/v1/responses"),
                &[ALICE],
                r#"{"model":"o3","input":"and then?","conversation":"conv_1"}"#,
            )
            .await;
        assert_eq!(turn.header("x-sluice-cache"), Some("BYPASS"));
        let stored = client
            .get_with(&gw.url("/v1/chat/completions?limit=10"), &[ALICE])
            .await;
        assert_eq!(stored.header("x-sluice-cache"), Some("BYPASS"));
    }
    assert_eq!(upstream.seen().len(), 10, "every one reached the upstream");
    // Another API's `conversation` member is no responses turn.
    let other = r#"{"model":"gpt-4o-mini","messages":[],"conversation":"c1"}"#;
    for expected in ["MISS", "HIT"] {
        let reply = client
            .post_json(&gw.url("/v1/chat/completions"), &[ALICE], other)
            .await;
        assert_eq!(reply.header("x-sluice-cache"), Some(expected));
    }
    for expected in ["MISS", "HIT"] {
        let reply = client
            .post_json(&gw.url("/v1/chat/completions"), &[ALICE], CHAT)
            .await;
        assert_eq!(reply.header("x-sluice-cache"), Some(expected));
    }
}

/// One caller asking for two organizations or projects (the SDK's
/// `OpenAI-Organization`, `OpenAI-Project`) gets each its own answer,
/// billed and attributed to it: those headers are part of the key.
#[tokio::test]
async fn the_organization_and_project_asked_for_are_in_the_key() {
    let (gw, upstream) = start("{ ttl: 10m }", UpstreamReply::json(&answer())).await;
    let client = Client::new();
    let url = gw.url("/v1/chat/completions");
    let ask = |org: &'static str| {
        let client = &client;
        let url = &url;
        async move {
            client
                .post_json(url, &[ALICE, ("openai-organization", org)], CHAT)
                .await
                .header("x-sluice-cache")
                .map(str::to_owned)
        }
    };
    assert_eq!(ask("org-a").await.as_deref(), Some("MISS"));
    assert_eq!(ask("org-b").await.as_deref(), Some("MISS"));
    assert_eq!(ask("org-a").await.as_deref(), Some("HIT"));
    assert_eq!(upstream.seen().len(), 2);
}

/// A header the upstream sets itself (`set_headers`) reaches it the same
/// whatever the client sent: it keeps no two clients apart in the key.
#[tokio::test]
async fn a_header_the_upstream_sets_itself_is_not_in_the_key() {
    let upstream = MockUpstream::always(UpstreamReply::json(&answer())).await;
    let config = config(&upstream.url(), "{ ttl: 10m, scope: shared }").replace(
        &format!(r#"llm: {{ url: "{}" }}"#, upstream.url()),
        &format!(
            r#"llm: {{ url: "{}", set_headers: {{ anthropic-version: "2023-06-01" }} }}"#,
            upstream.url()
        ),
    );
    let gw = TestGateway::start(&config).await;
    let client = Client::new();
    let url = gw.url("/v1/chat/completions");
    let mut results = Vec::new();
    for version in [Some("2023-06-01"), Some("2026-10-21"), None] {
        let mut headers = vec![ALICE];
        if let Some(version) = version {
            headers.push(("anthropic-version", version));
        }
        let reply = client.post_json(&url, &headers, CHAT).await;
        results.push(reply.header("x-sluice-cache").map(str::to_owned));
    }
    assert_eq!(
        results,
        [
            Some("MISS".to_owned()),
            Some("HIT".to_owned()),
            Some("HIT".to_owned())
        ]
    );
    assert_eq!(upstream.seen().len(), 1);
    // The header the client sends still counts where it passes through.
    let reply = client
        .post_json(&url, &[ALICE, ("openai-beta", "assistants=v2")], CHAT)
        .await;
    assert_eq!(reply.header("x-sluice-cache"), Some("MISS"));
}

/// A route chosen by a wildcard host may serve one tenant per host (the
/// app reads `x-forwarded-host`): the host is in the key, so one tenant
/// never gets another's answer, whatever case or port it is written in.
#[tokio::test]
async fn tenants_of_a_host_matched_route_each_get_their_own_answer() {
    let upstream = MockUpstream::always(UpstreamReply::json(&answer())).await;
    let gw = TestGateway::start(&format!(
        r#"
upstreams:
  app: {{ url: "{}" }}
routes:
  - name: tenants
    match: {{ host: "*.example.com", path_prefix: / }}
    auth: none
    cache: {{ ttl: 10m, scope: shared }}
    upstream: app
"#,
        upstream.url()
    ))
    .await;
    let client = Client::new();
    let url = gw.url("/api/profile");
    let ask = |host: &'static str| {
        let (client, url) = (&client, &url);
        async move {
            let reply = client.get_with(url, &[("host", host)]).await;
            assert_eq!(reply.status, 200, "{}", reply.text());
            reply.header("x-sluice-cache").map(str::to_owned)
        }
    };
    assert_eq!(ask("tenant-a.example.com").await.as_deref(), Some("MISS"));
    assert_eq!(ask("tenant-b.example.com").await.as_deref(), Some("MISS"));
    assert_eq!(
        ask("Tenant-A.example.com:8080").await.as_deref(),
        Some("HIT")
    );
    assert_eq!(ask("tenant-b.example.com").await.as_deref(), Some("HIT"));
    let hosts: Vec<_> = upstream
        .seen()
        .iter()
        .map(|s| s.header("x-forwarded-host").unwrap_or_default().to_owned())
        .collect();
    assert_eq!(hosts, ["tenant-a.example.com", "tenant-b.example.com"]);
}
