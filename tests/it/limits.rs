//! Request limits: token buckets per identity (tier) and per route, and
//! concurrency slots, with the OpenAI-style headers.

use std::time::Duration;

use bytes::Bytes;
use http::Method;

use crate::support::{Client, ClientReply, MockUpstream, TestGateway, UpstreamReply, client};

fn config(upstream: &str, tier: &str, route_limit: &str) -> String {
    format!(
        r#"
upstreams:
  app: {{ url: "{upstream}" }}
auth:
  api_keys:
    - {{ id: alice, key: key-alice, tier: t }}
    - {{ id: bob, key: key-bob, tier: t }}
tiers:
  t: {tier}
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
{route_limit}
    upstream: app
  - name: other
    match: {{ path_prefix: /other/ }}
    upstream: app
"#
    )
}

async fn get(gw: &TestGateway, path: &str, key: &str) -> ClientReply {
    Client::new()
        .send(
            Method::GET,
            &gw.url(path),
            &[("x-api-key", key)],
            Bytes::new(),
        )
        .await
}

#[tokio::test]
async fn sixth_request_of_five_per_minute_is_429_with_every_header() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&config(&up.url(), "{ requests_per_minute: 5 }", "")).await;
    for i in 0..5u64 {
        let r = get(&gw, "/v1/x", "key-alice").await;
        assert_eq!(r.status, 200, "request {i}");
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("5"));
        assert_eq!(
            r.header("x-ratelimit-remaining-requests"),
            Some((4 - i).to_string().as_str())
        );
        assert!(r.header("x-ratelimit-reset-requests").is_some());
    }
    let refused = get(&gw, "/v1/x", "key-alice").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(refused.header("retry-after"), Some("12"));
    assert_eq!(refused.header("x-should-retry"), None, "a wait helps");
    let ms: u64 = refused.header("retry-after-ms").unwrap().parse().unwrap();
    assert!((11_000..=12_000).contains(&ms), "retry-after-ms {ms}");
    assert_eq!(refused.header("x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(
        up.seen().len(),
        5,
        "a refused request must not reach the upstream"
    );
    assert_eq!(
        gw.metric(
            "sluice_rate_limited_total",
            &[("route", "chat"), ("tier", "t"), ("limit", "requests")]
        )
        .await,
        Some(1.0)
    );
    // Identities are isolated.
    assert_eq!(get(&gw, "/v1/x", "key-bob").await.status, 200);
}

#[tokio::test]
async fn refused_request_succeeds_again_after_retry_after() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&config(&up.url(), "{ requests_per_minute: 60 }", "")).await;
    for _ in 0..60 {
        assert_eq!(get(&gw, "/v1/x", "key-alice").await.status, 200);
    }
    let refused = get(&gw, "/v1/x", "key-alice").await;
    assert_eq!(refused.status, 429);
    let ms: u64 = refused.header("retry-after-ms").unwrap().parse().unwrap();
    assert!(ms <= 1000, "one unit refills every second: {ms}");
    tokio::time::sleep(Duration::from_millis(ms + 20)).await;
    assert_eq!(get(&gw, "/v1/x", "key-alice").await.status, 200);
}

#[tokio::test]
async fn route_limit_applies_on_top_of_the_tier() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&config(
        &up.url(),
        "{ requests_per_minute: 10 }",
        "    rate_limit: { requests_per_minute: 3 }",
    ))
    .await;
    for _ in 0..3 {
        assert_eq!(get(&gw, "/v1/x", "key-alice").await.status, 200);
    }
    for _ in 0..5 {
        let refused = get(&gw, "/v1/x", "key-alice").await;
        assert_eq!(refused.status, 429);
        assert_eq!(refused.header("x-ratelimit-limit-requests"), Some("3"));
    }
    // The tier still has room on another route: the refused requests
    // gave back what they took of it, so 3 are used of 10.
    for _ in 0..7 {
        assert_eq!(get(&gw, "/other/x", "key-alice").await.status, 200);
    }
    assert_eq!(
        get(&gw, "/other/x", "key-alice").await.status,
        429,
        "the tier's 10 are spent"
    );
}

#[tokio::test]
async fn concurrency_slot_is_freed_when_a_stream_ends_or_the_client_leaves() {
    let up = MockUpstream::always(UpstreamReply::sse(
        &["1", "2", "3"],
        Duration::from_millis(150),
    ))
    .await;
    let gw = TestGateway::start(&config(
        &up.url(),
        "{ concurrent_requests: 1, requests_per_minute: 100 }",
        "",
    ))
    .await;
    let hyper_client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<http_body_util::Full<Bytes>>();
    let open = |gw: &TestGateway| {
        hyper_client.request(
            http::Request::get(gw.url("/v1/stream"))
                .header("x-api-key", "key-alice")
                .body(Default::default())
                .unwrap(),
        )
    };
    // A stream holds the slot while it runs.
    let first = open(&gw).await.unwrap();
    assert_eq!(first.status(), 200);
    let second = get(&gw, "/v1/x", "key-alice").await;
    assert_eq!(second.status, 429);
    assert!(
        second
            .error_message()
            .contains("too many requests in flight"),
        "the message names the limit: {}",
        second.error_message()
    );
    // Its request unit went back: the headers count only the stream's.
    assert_eq!(second.header("x-ratelimit-remaining-requests"), Some("99"));
    assert_eq!(
        gw.metric(
            "sluice_rate_limited_total",
            &[("route", "chat"), ("tier", "t"), ("limit", "concurrency")]
        )
        .await,
        Some(1.0)
    );
    // Read to the end: the slot is free again.
    let done = client::read(first).await;
    assert!(done.text().ends_with("data: 3\n\n"));
    gw.wait_access_logs(2).await;
    let third = get(&gw, "/v1/x", "key-alice").await;
    assert_eq!(third.status, 200);
    assert_eq!(third.header("x-ratelimit-remaining-requests"), Some("98"));
    gw.wait_access_logs(3).await;
    // A client that leaves mid-stream frees it too.
    let leaving = open(&gw).await.unwrap();
    drop(leaving);
    gw.wait_access_logs(4).await;
    assert_eq!(get(&gw, "/v1/x", "key-alice").await.status, 200);
}

/// A streamed chat request's estimate is its client's body: the
/// `stream_options` sluice adds to ask for usage is no prompt, and must
/// not cost the client tokens (nor, cut short, dollars).
#[tokio::test]
async fn the_usage_question_sluice_adds_is_not_reserved() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&config(&up.url(), "{ tokens_per_minute: 100000 }", "")).await;
    let body = r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hello there, friend"}]}"#;
    let remaining = |path: &'static str, key: &'static str| {
        let gw = &gw;
        async move {
            let reply = Client::new()
                .send(
                    Method::POST,
                    &gw.url(path),
                    &[("x-api-key", key)],
                    Bytes::from_static(body.as_bytes()),
                )
                .await;
            assert_eq!(reply.status, 200);
            reply
                .header("x-ratelimit-remaining-tokens")
                .and_then(|v| v.parse::<u64>().ok())
                .expect("token headers")
        }
    };
    // The same bytes, asked for usage by sluice (chat completions) and
    // passed as they are (another path), each from a bucket of its own.
    let asked = remaining("/v1/chat/completions", "key-alice").await;
    let passed = remaining("/v1/other", "key-bob").await;
    assert!(passed < 100_000, "a reservation was made: {passed}");
    assert_eq!(asked, passed);
    let asked_body = String::from_utf8_lossy(&up.seen()[0].body).into_owned();
    assert!(
        asked_body.contains("include_usage"),
        "usage was asked for: {asked_body}"
    );
}

/// An upstream whose every answer reports `tokens` prompt tokens.
async fn llm_reporting(tokens: u64, delay: Duration) -> MockUpstream {
    MockUpstream::always(
        UpstreamReply::json(&serde_json::json!({
            "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": tokens, "completion_tokens": 0},
        }))
        .delay(delay),
    )
    .await
}

async fn post(gw: &TestGateway, body: &'static str) -> ClientReply {
    Client::new()
        .send(
            Method::POST,
            &gw.url("/v1/chat/completions"),
            &[("x-api-key", "key-alice")],
            Bytes::from_static(body.as_bytes()),
        )
        .await
}

#[tokio::test]
async fn token_limit_refuses_after_large_usage_with_token_headers() {
    let up = llm_reporting(900, Duration::ZERO).await;
    let gw = TestGateway::start(&config(&up.url(), "{ tokens_per_minute: 1000 }", "")).await;
    let first = post(&gw, "{}").await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("x-ratelimit-limit-tokens"), Some("1000"));
    assert!(first.header("x-ratelimit-remaining-tokens").is_some());
    assert!(first.header("x-ratelimit-reset-tokens").is_some());
    gw.wait_access_logs(1).await;
    assert_eq!(
        post(&gw, "{}").await.status,
        200,
        "900 used of 1000: a small request still fits"
    );
    gw.wait_access_logs(2).await;
    let refused = post(&gw, "{}").await;
    assert_eq!(
        refused.status, 429,
        "1800 tokens used: the bucket is overdrawn"
    );
    assert_eq!(refused.json()["error"]["code"], "rate_limit_exceeded");
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((40..=60).contains(&retry), "retry-after {retry}");
    assert_eq!(
        gw.metric(
            "sluice_rate_limited_total",
            &[("route", "chat"), ("tier", "t"), ("limit", "tokens")]
        )
        .await,
        Some(1.0)
    );
}

/// Where a token limit applies, every response with an identity has the
/// `-tokens` trio: also a refusal by the request limit, which comes before
/// any token reservation (and takes no tokens).
#[tokio::test]
async fn token_headers_also_on_responses_that_reserved_nothing() {
    let up = llm_reporting(10, Duration::ZERO).await;
    let gw = TestGateway::start(&config(
        &up.url(),
        "{ requests_per_minute: 1, tokens_per_minute: 1000 }",
        "",
    ))
    .await;
    assert_eq!(post(&gw, "{}").await.status, 200);
    gw.wait_access_logs(1).await;
    let refused = post(&gw, "{}").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("x-ratelimit-limit-requests"), Some("1"));
    assert_eq!(refused.header("x-ratelimit-limit-tokens"), Some("1000"));
    let remaining: u64 = refused
        .header("x-ratelimit-remaining-tokens")
        .expect("remaining tokens")
        .parse()
        .unwrap();
    assert!(
        (985..=990).contains(&remaining),
        "10 used: {remaining} left"
    );
    assert!(refused.header("x-ratelimit-reset-tokens").is_some());
}

/// A 429 from one bucket shows the buckets as the refusal leaves them:
/// the tier's reservation taken on the way was given back, and the
/// refusing route bucket is the tightest.
#[tokio::test]
async fn a_token_refusal_shows_the_buckets_as_it_leaves_them() {
    const BODY: &str = r#"{"model":"m","max_tokens":290,"messages":[]}"#;
    let up = llm_reporting(10, Duration::ZERO).await;
    let gw = TestGateway::start(&config(
        &up.url(),
        "{ tokens_per_minute: 1000 }",
        "    rate_limit: { tokens_per_minute: 100 }",
    ))
    .await;
    let refused = post(&gw, BODY).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.header("x-ratelimit-limit-tokens"), Some("100"));
    assert_eq!(refused.header("x-ratelimit-remaining-tokens"), Some("100"));
    let other = Client::new()
        .send(
            Method::GET,
            &gw.url("/other/x"),
            &[("x-api-key", "key-alice")],
            Bytes::new(),
        )
        .await;
    assert_eq!(other.status, 200);
    assert_eq!(other.header("x-ratelimit-limit-tokens"), Some("1000"));
    assert_eq!(
        other.header("x-ratelimit-remaining-tokens"),
        Some("1000"),
        "the tier's reservation was given back"
    );
}

#[tokio::test]
async fn concurrent_reservations_cannot_overshoot_and_settle_to_real_usage() {
    // Each request reserves 11 (its 44-byte body) + 185 (max_tokens) = 196
    // tokens: 5 fit in 1000, 6 do not. Each really uses 10.
    const BODY: &str = r#"{"model":"m","max_tokens":185,"messages":[]}"#;
    assert_eq!(BODY.len(), 44);
    let up = llm_reporting(10, Duration::from_millis(300)).await;
    let gw = TestGateway::start(&config(&up.url(), "{ tokens_per_minute: 1000 }", "")).await;
    let gw = std::sync::Arc::new(gw);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let gw = gw.clone();
        tasks.push(tokio::spawn(async move {
            post(&gw, BODY).await.status.as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 15);
    gw.wait_access_logs(20).await;
    // Settled to 5 × 10 real tokens: there is room again at once.
    assert_eq!(post(&gw, BODY).await.status, 200);
}

/// A client that leaves before the response head (the upstream is slow)
/// gives back its slot and the in-flight count, and is logged as 499
/// `client_closed`; but its tokens were spent all the same (the upstream
/// goes on generating, and bills it), so its reservation stays and its
/// estimate is charged at the price of the model it asked for: hanging up
/// early is no way around a limit or a budget.
#[tokio::test]
async fn a_client_that_leaves_before_the_answer_is_charged_its_estimate() {
    let up = llm_reporting(10, Duration::from_millis(800)).await;
    let yaml = config(
        &up.url(),
        "{ tokens_per_minute: 600, concurrent_requests: 1 }",
        "",
    ) + "pricing:\n  m: { input: 1000, output: 1000 }\n";
    let gw = TestGateway::start(&yaml).await;
    let (client, url) = (Client::new(), gw.url("/v1/chat/completions"));
    let leaving = client.send(
        Method::POST,
        &url,
        &[("x-api-key", "key-alice")],
        Bytes::from_static(br#"{"model":"m","max_tokens":500,"messages":[]}"#),
    );
    // Gone while the upstream is still thinking.
    let gone = tokio::time::timeout(Duration::from_millis(300), leaving).await;
    assert!(
        gone.is_err(),
        "the upstream answered before the client left"
    );
    let logs = gw.wait_access_logs(1).await;
    assert_eq!(logs[0]["status"], 499, "{logs:?}");
    assert_eq!(logs[0]["error"], "client_closed", "{logs:?}");
    assert_eq!(logs[0]["identity"], "alice", "{logs:?}");
    // 44 bytes of prompt (11 tokens) and 500 of output, at $1000 a million.
    assert_eq!(logs[0]["cost_usd"], 0.511, "{logs:?}");
    let cost = [("route", "chat"), ("model", "m")];
    assert_eq!(gw.metric("sluice_cost_usd_total", &cost).await, Some(0.511));
    assert_eq!(
        gw.metric("sluice_in_flight_requests", &[("route", "chat")])
            .await,
        Some(0.0)
    );
    assert_eq!(
        gw.metric(
            "sluice_requests_total",
            &[("route", "chat"), ("method", "POST"), ("status", "499")]
        )
        .await,
        Some(1.0)
    );
    // The abandoned attempt has an outcome, as every attempt does.
    let labels = [("upstream", "app"), ("outcome", "client_error")];
    assert_eq!(
        gw.metric("sluice_upstream_requests_total", &labels).await,
        Some(1.0)
    );
    // 511 of 600 stay taken: 200 more do not fit...
    let more = post(&gw, r#"{"model":"m","max_tokens":200,"messages":[]}"#).await;
    assert_eq!(more.status, 429, "{}", more.text());
    // ...but the one slot is free.
    let r = post(&gw, r#"{"model":"m","max_tokens":10,"messages":[]}"#).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A request that needs more tokens than the limit allows in a minute
/// can never fit: it is refused with a message that says so, and the
/// same wait (a full minute) whatever the backend.
#[tokio::test]
async fn a_request_over_the_whole_token_limit_says_it_never_fits() {
    let up = llm_reporting(10, Duration::ZERO).await;
    let gw = TestGateway::start(&config(&up.url(), "{ tokens_per_minute: 600 }", "")).await;
    let r = Client::new()
        .send(
            Method::POST,
            &gw.url("/v1/chat/completions"),
            &[("x-api-key", "key-alice")],
            Bytes::from_static(br#"{"model":"m","max_tokens":5000,"messages":[]}"#),
        )
        .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    let message = r.error_message();
    assert!(
        message.contains("more than the limit of 600 tokens per minute"),
        "{message}"
    );
    assert_eq!(r.header("retry-after"), Some("60"));
    assert_eq!(r.header("retry-after-ms"), Some("60000"));
    // No wait helps: the SDKs' retries are told so.
    assert_eq!(r.header("x-should-retry"), Some("false"));
    assert!(up.seen().is_empty());
    // Logged with the model it refused, which no answer named.
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["model"], "m", "{log}");
    assert_eq!(log["error"], "rate_limit_exceeded");
    // Nothing was taken: a request that fits still does.
    let ok = Client::new()
        .send(
            Method::POST,
            &gw.url("/v1/chat/completions"),
            &[("x-api-key", "key-alice")],
            Bytes::from_static(br#"{"model":"m","max_tokens":500,"messages":[]}"#),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
}

/// A request refused by a token limit gives back the request units its
/// admission took, as a request refused at once does: a client retrying
/// on token 429s does not drain its request buckets.
#[tokio::test]
async fn token_refusals_give_back_their_request_units() {
    let up = llm_reporting(10, Duration::ZERO).await;
    let gw = TestGateway::start(&config(
        &up.url(),
        "{ tokens_per_minute: 1000 }",
        "    rate_limit: { requests_per_minute: 2 }",
    ))
    .await;
    for _ in 0..3 {
        let refused = post(&gw, r#"{"model":"m","max_tokens":5000,"messages":[]}"#).await;
        assert_eq!(refused.status, 429, "{}", refused.text());
        assert_eq!(refused.header("x-ratelimit-remaining-requests"), Some("2"));
        // Full again: nothing to wait for.
        assert_eq!(refused.header("x-ratelimit-reset-requests"), Some("0s"));
    }
    let ok = post(&gw, "{}").await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.header("x-ratelimit-remaining-requests"), Some("1"));
}

/// An answer that reports no usage (an app that counts nothing) keeps
/// the request's estimate in the token buckets: the limit still binds.
#[tokio::test]
async fn an_answer_without_usage_is_charged_its_estimate() {
    const BODY: &str = r#"{"model":"m","max_tokens":900,"messages":[]}"#;
    let up = MockUpstream::always(UpstreamReply::json(&serde_json::json!({
        "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
    })))
    .await;
    let gw = TestGateway::start(&config(&up.url(), "{ tokens_per_minute: 1000 }", "")).await;
    assert_eq!(post(&gw, BODY).await.status, 200);
    gw.wait_access_logs(1).await;
    let second = post(&gw, BODY).await;
    assert_eq!(
        second.status,
        429,
        "911 of 1000 stay spent: {}",
        second.text()
    );
    assert_eq!(up.seen().len(), 1);
}

/// A client that leaves in the middle of a stream, before the usage
/// chunk, is charged its estimate: hanging up early is no way around
/// a token limit.
#[tokio::test]
async fn a_client_that_leaves_mid_stream_is_charged_its_estimate() {
    let chunk = r#"{"object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#;
    let mut events = vec![chunk; 10];
    events.push(r#"{"object":"chat.completion.chunk","model":"m","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":10}}"#);
    events.push("[DONE]");
    let up = MockUpstream::always(UpstreamReply::sse(&events, Duration::from_millis(150))).await;
    let gw = TestGateway::start(&config(&up.url(), "{ tokens_per_minute: 1000 }", "")).await;
    let leaving = post(
        &gw,
        r#"{"model":"m","stream":true,"max_tokens":800,"messages":[]}"#,
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(600), leaving)
            .await
            .is_err(),
        "the stream ended before the client left"
    );
    let logs = gw.wait_access_logs(1).await;
    assert_eq!(logs[0]["status"], 200, "{logs:?}");
    assert_eq!(logs[0]["error"], "client_closed", "{logs:?}");
    let next = post(&gw, r#"{"model":"m","max_tokens":500,"messages":[]}"#).await;
    assert_eq!(next.status, 429, "~815 of 1000 stay spent: {}", next.text());
}

/// An Anthropic stream counts its input, and one output token, in its
/// first event: a client that leaves mid-stream has "reported" usage far
/// below what was generated, and is charged its estimate all the same.
#[tokio::test]
async fn a_stream_cut_short_after_a_partial_count_keeps_its_estimate() {
    let start = r#"{"type":"message_start","message":{"id":"m1","type":"message","role":"assistant","model":"claude-x","content":[],"usage":{"input_tokens":5,"output_tokens":1}}}"#;
    let delta =
        r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}"#;
    let mut events = vec![start];
    events.extend([delta; 10]);
    events.push(r#"{"type":"message_stop"}"#);
    let up = MockUpstream::always(UpstreamReply::sse(&events, Duration::from_millis(150))).await;
    let gw = TestGateway::start(&config(&up.url(), "{ tokens_per_minute: 1000 }", "")).await;
    let (client, url) = (Client::new(), gw.url("/v1/messages"));
    let leaving = client.send(
        Method::POST,
        &url,
        &[("x-api-key", "key-alice")],
        Bytes::from_static(br#"{"model":"claude-x","stream":true,"max_tokens":800,"messages":[]}"#),
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(600), leaving)
            .await
            .is_err(),
        "the stream ended before the client left"
    );
    let logs = gw.wait_access_logs(1).await;
    assert_eq!(logs[0]["error"], "client_closed", "{logs:?}");
    assert_eq!(logs[0]["input_tokens"], 5, "{logs:?}");
    let next = post(&gw, r#"{"model":"m","max_tokens":500,"messages":[]}"#).await;
    assert_eq!(next.status, 429, "~816 of 1000 stay spent: {}", next.text());
}

/// SPEC §3: responses on rate-limited routes carry both trios, also the
/// refusals that come before admission (403, 413, 400): they show the
/// buckets as they stand, having taken nothing from them.
#[tokio::test]
async fn refusals_before_admission_carry_both_trios_and_take_nothing() {
    let up = llm_reporting(10, Duration::ZERO).await;
    let gw = TestGateway::start(&format!(
        r#"
limits: {{ max_request_body: 1KiB }}
upstreams:
  app: {{ url: "{}" }}
auth:
  api_keys:
    - {{ id: alice, key: key-alice, tier: t, routes: [chat] }}
tiers:
  t: {{ requests_per_minute: 5, tokens_per_minute: 1000 }}
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
    validate: openai
    upstream: app
  - name: other
    match: {{ path_prefix: /other/ }}
    upstream: app
"#,
        up.url()
    ))
    .await;
    let send = |path: &'static str, body: Bytes| {
        let url = gw.url(path);
        async move {
            Client::new()
                .send(Method::POST, &url, &[("x-api-key", "key-alice")], body)
                .await
        }
    };
    let forbidden = send("/other/x", Bytes::new()).await;
    let too_large = send("/v1/chat/completions", Bytes::from(vec![b' '; 2048])).await;
    let invalid = send("/v1/chat/completions", Bytes::from_static(b"{}")).await;
    for (reply, status) in [(&forbidden, 403), (&too_large, 413), (&invalid, 400)] {
        assert_eq!(reply.status, status, "{:?}", reply.json());
        for (name, value) in [
            ("x-ratelimit-limit-requests", "5"),
            ("x-ratelimit-remaining-requests", "5"),
            ("x-ratelimit-limit-tokens", "1000"),
            ("x-ratelimit-remaining-tokens", "1000"),
        ] {
            assert_eq!(reply.header(name), Some(value), "{status}: {name}");
        }
        assert!(reply.header("x-ratelimit-reset-requests").is_some());
        assert!(reply.header("x-ratelimit-reset-tokens").is_some());
    }
    assert!(up.seen().is_empty());
}

/// A `retry-after` covers every bucket that is short, not only the first
/// to refuse: here the tier's refuses first (a slot back in 30 s) while
/// the route's needs 60 s; a client told 30 would only be refused again.
#[tokio::test]
async fn retry_after_waits_for_every_bucket_that_is_short() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&config(
        &up.url(),
        "{ requests_per_minute: 2 }",
        "    rate_limit: { requests_per_minute: 1 }",
    ))
    .await;
    assert_eq!(get(&gw, "/v1/x", "key-alice").await.status, 200);
    assert_eq!(get(&gw, "/other/x", "key-alice").await.status, 200);
    let refused = get(&gw, "/v1/x", "key-alice").await;
    assert_eq!(refused.status, 429);
    let ms: u64 = refused.header("retry-after-ms").unwrap().parse().unwrap();
    assert!((59_000..=60_000).contains(&ms), "retry-after-ms {ms}");
    assert_eq!(refused.header("retry-after"), Some("60"));
    assert_eq!(refused.header("x-ratelimit-limit-requests"), Some("2"));
    assert_eq!(refused.header("x-ratelimit-remaining-requests"), Some("0"));
}

/// A request refused by its request bucket also waits for its token
/// buckets: one told only the request bucket's 30 s would be refused
/// again, by the token bucket, which needs ~51 s for its estimate.
#[tokio::test]
async fn retry_after_of_a_request_refusal_covers_the_token_buckets() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let answered = std::sync::Arc::new(AtomicUsize::new(0));
    let up = MockUpstream::start(move |_| {
        // The first answer used 950 of the 1000 tokens; later ones none.
        let tokens = if answered.fetch_add(1, Ordering::SeqCst) == 0 { 950 } else { 0 };
        UpstreamReply::json(&serde_json::json!({
            "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": tokens, "completion_tokens": 0},
        }))
    })
    .await;
    let gw = TestGateway::start(&config(
        &up.url(),
        "{ requests_per_minute: 2, tokens_per_minute: 1000 }",
        "",
    ))
    .await;
    assert_eq!(post(&gw, r#"{"max_tokens":10}"#).await.status, 200);
    assert_eq!(get(&gw, "/other/x", "key-alice").await.status, 200);
    let refused = post(&gw, r#"{"max_tokens":900}"#).await;
    assert_eq!(refused.status, 429);
    assert!(
        refused
            .error_message()
            .contains("too many requests per minute"),
        "{}",
        refused.error_message()
    );
    let ms: u64 = refused.header("retry-after-ms").unwrap().parse().unwrap();
    assert!((48_000..=54_000).contains(&ms), "retry-after-ms {ms}");
    assert_eq!(refused.header("x-ratelimit-remaining-requests"), Some("0"));
    let tokens: u64 = refused
        .header("x-ratelimit-remaining-tokens")
        .unwrap()
        .parse()
        .unwrap();
    assert!((45..=60).contains(&tokens), "remaining tokens {tokens}");
}

/// A request the token limit can never take, refused first by an empty
/// request bucket, is told it never fits (`x-should-retry: false`), not
/// to come back when the request bucket refills, only to hear it then.
#[tokio::test]
async fn a_request_refusal_of_one_that_never_fits_says_so() {
    let up = llm_reporting(10, Duration::ZERO).await;
    let gw = TestGateway::start(&config(
        &up.url(),
        "{ requests_per_minute: 1, tokens_per_minute: 2000 }",
        "",
    ))
    .await;
    assert_eq!(post(&gw, r#"{"max_tokens":10}"#).await.status, 200);
    let refused = post(&gw, r#"{"max_tokens":5000}"#).await;
    assert_eq!(refused.status, 429);
    let message = refused.error_message();
    assert!(
        message.contains("more than the limit of 2000 tokens per minute"),
        "{message}"
    );
    assert_eq!(refused.header("x-should-retry"), Some("false"));
    assert_eq!(refused.header("retry-after"), Some("60"));
    assert_eq!(up.seen().len(), 1);
}

/// A request refused by a limit, its small body sent with it, leaves the
/// connection open: a client retrying its 429s does not reconnect each
/// time.
#[tokio::test]
async fn a_refused_post_keeps_its_connection() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&config(&up.url(), "{ requests_per_minute: 1 }", "")).await;
    let post = "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\nx-api-key: key-alice\r\ncontent-length: 2\r\n\r\n{}";
    let next = "GET /other/x HTTP/1.1\r\nhost: t\r\nx-api-key: key-bob\r\n\r\n";
    let (text, closed) = crate::support::exchange(
        gw.addr,
        format!("{post}{post}{next}").as_bytes(),
        Duration::from_millis(400),
    )
    .await;
    let statuses: Vec<_> = text
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| &text[at + 9..at + 12])
        .collect();
    assert_eq!(statuses, ["200", "429", "200"], "{text}");
    assert!(!text.contains("connection: close"), "{text}");
    assert!(!closed);
}

/// An image sent inline is reserved as the tokens a provider bills for
/// it (about a thousand), not as a quarter of its base64 bytes: a 1 MB
/// photo fits a 20,000-token limit.
#[tokio::test]
async fn an_inline_image_is_reserved_as_an_image_not_as_its_bytes() {
    let up = llm_reporting(900, Duration::ZERO).await;
    let gw = TestGateway::start(&config(&up.url(), "{ tokens_per_minute: 20000 }", "")).await;
    let image = "iVBORw0KGgo".repeat(100_000);
    let body = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"text","text":"what is this?"}},{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{image}"}}}}]}}]}}"#
    );
    let reply = Client::new()
        .send(
            Method::POST,
            &gw.url("/v1/chat/completions"),
            &[("x-api-key", "key-alice")],
            Bytes::from(body.clone()),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(up.seen()[0].body, body.as_bytes(), "forwarded whole");
}

/// A compressed body on a token-limited route is refused with 415: it
/// would be estimated at its compressed size, a way around the limit.
#[tokio::test]
async fn a_compressed_body_on_a_token_limited_route_is_415() {
    let up = llm_reporting(10, Duration::ZERO).await;
    let gw = TestGateway::start(&config(&up.url(), "{ tokens_per_minute: 1000 }", "")).await;
    let reply = Client::new()
        .send(
            Method::POST,
            &gw.url("/v1/chat/completions"),
            &[("x-api-key", "key-alice"), ("content-encoding", "gzip")],
            Bytes::from_static(b"\x1f\x8b\x08\x00\x00\x00\x00\x00"),
        )
        .await;
    assert_eq!(reply.status, 415);
    assert_eq!(
        reply.json()["error"]["code"],
        "unsupported_content_encoding"
    );
    assert_eq!(reply.header("accept-encoding"), Some("identity"));
    assert!(up.seen().is_empty());
    // A second line is read too, not only the first.
    let two_lines = Client::new()
        .send(
            Method::POST,
            &gw.url("/v1/chat/completions"),
            &[
                ("x-api-key", "key-alice"),
                ("content-encoding", "identity"),
                ("content-encoding", "gzip"),
            ],
            Bytes::from_static(b"\x1f\x8b\x08\x00\x00\x00\x00\x00"),
        )
        .await;
    assert_eq!(two_lines.status, 415);
    let plain = post(&gw, "{}").await;
    assert_eq!(plain.status, 200);
}
