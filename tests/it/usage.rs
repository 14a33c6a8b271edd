//! Usage metering: tokens, cost and finish reasons read from upstream
//! answers as they pass (JSON and SSE; OpenAI and Anthropic shapes), in
//! the metrics and the access log.

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

use crate::support::{Client, ClientReply, MockUpstream, TestGateway, UpstreamReply};

fn config(url: &str) -> String {
    format!(
        r#"
upstreams:
  llm: {{ url: "{url}" }}
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
    auth: none
    upstream: llm
pricing:
  gpt-4o-mini: {{ input: 0.15, output: 0.60 }}
  default: {{ input: 1.00, output: 3.00 }}
"#
    )
}

async fn check(gw: &TestGateway, model: &str, input: u64, output: u64, cost: f64, reason: &str) {
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["model"], model);
    assert_eq!(log["input_tokens"], input);
    assert_eq!(log["output_tokens"], output);
    assert!(
        (log["cost_usd"].as_f64().unwrap() - cost).abs() < 1e-12,
        "{log}"
    );
    for (kind, tokens) in [("input", input), ("output", output)] {
        let labels = [("route", "chat"), ("model", model), ("kind", kind)];
        assert_eq!(
            gw.metric("sluice_tokens_total", &labels).await,
            Some(tokens as f64)
        );
    }
    let spent = gw
        .metric(
            "sluice_cost_usd_total",
            &[("route", "chat"), ("model", model)],
        )
        .await
        .unwrap();
    assert!(
        (spent - cost).abs() < 1e-12,
        "cost metric {spent} vs {cost}"
    );
    assert_eq!(
        gw.metric(
            "sluice_completions_total",
            &[
                ("route", "chat"),
                ("model", model),
                ("finish_reason", reason)
            ]
        )
        .await,
        Some(1.0)
    );
}

/// A chat request answered in JSON by `model` with these counts, then
/// checked as `check` does.
async fn json_answer_metered(model: &str, input: u64, output: u64, cost: f64) {
    let up = MockUpstream::always(UpstreamReply::json(&json!({
        "object": "chat.completion", "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": input, "completion_tokens": output, "total_tokens": input + output},
    })))
    .await;
    let gw = TestGateway::start(&config(&up.url())).await;
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], "{}")
        .await;
    assert_eq!(reply.status, 200);
    check(&gw, model, input, output, cost, "stop").await;
}

#[tokio::test]
async fn openai_json_usage_becomes_tokens_and_cost() {
    json_answer_metered(
        "gpt-4o-mini",
        1000,
        2000,
        (1000.0 * 0.15 + 2000.0 * 0.60) / 1e6,
    )
    .await;
}

/// OpenAI answers a `gpt-4o-mini` request from a dated snapshot and says
/// so; a price list names the model. The metrics keep the name reported.
#[tokio::test]
async fn a_dated_snapshot_is_priced_as_its_model() {
    json_answer_metered(
        "gpt-4o-mini-2024-07-18",
        11,
        7,
        (11.0 * 0.15 + 7.0 * 0.60) / 1e6,
    )
    .await;
}

#[tokio::test]
async fn openai_stream_usage_is_read_as_it_passes() {
    let events = [
        r#"{"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#,
        r#"{"model":"gpt-4o-mini","choices":[{"index":0,"delta":{},"finish_reason":"length"}]}"#,
        r#"{"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":12,"completion_tokens":34}}"#,
        "[DONE]",
    ];
    let up = MockUpstream::always(UpstreamReply::sse(&events, Duration::from_millis(10))).await;
    let gw = TestGateway::start(&config(&up.url())).await;
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], "{}")
        .await;
    assert!(reply.text().ends_with("data: [DONE]\n\n"));
    check(
        &gw,
        "gpt-4o-mini",
        12,
        34,
        (12.0 * 0.15 + 34.0 * 0.60) / 1e6,
        "length",
    )
    .await;
}

#[tokio::test]
async fn anthropic_stream_usage_and_default_price() {
    let events = [
        r#"{"type":"message_start","message":{"model":"claude-sonnet","usage":{"input_tokens":25,"output_tokens":1}}}"#,
        r#"{"type":"content_block_delta","delta":{"type":"text_delta","text":"Hi"}}"#,
        r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}"#,
        r#"{"type":"message_stop"}"#,
    ];
    let up = MockUpstream::always(UpstreamReply::sse(&events, Duration::ZERO)).await;
    let gw = TestGateway::start(&config(&up.url())).await;
    Client::new()
        .post_json(&gw.url("/v1/messages"), &[], "{}")
        .await;
    // Not in pricing: the default price applies.
    check(
        &gw,
        "claude-sonnet",
        25,
        15,
        (25.0 * 1.0 + 15.0 * 3.0) / 1e6,
        // Anthropic's end_turn, counted in OpenAI's words.
        "stop",
    )
    .await;
}

const STREAM: [&str; 4] = [
    r#"{"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#,
    r#"{"model":"gpt-4o-mini","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
    r#"{"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":2}}"#,
    "[DONE]",
];

/// A streamed chat request that does not ask for usage (as the OpenAI SDK
/// sends it), through a gateway in front of `up`.
async fn stream_without_usage(up: &MockUpstream) -> (TestGateway, ClientReply) {
    let gw = TestGateway::start(&config(&up.url())).await;
    let reply = Client::new()
        .post_json(
            &gw.url("/v1/chat/completions"),
            &[],
            r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#,
        )
        .await;
    assert_eq!(reply.status, 200);
    assert!(reply.body_error.is_none(), "{:?}", reply.body_error);
    (gw, reply)
}

/// Events as an upstream sends them.
fn sse_text(events: &[&str]) -> String {
    events.iter().map(|e| format!("data: {e}\n\n")).collect()
}

/// What metering must find for `STREAM`.
async fn check_stream_usage(gw: &TestGateway) {
    check(
        gw,
        "gpt-4o-mini",
        7,
        2,
        (7.0 * 0.15 + 2.0 * 0.60) / 1e6,
        "stop",
    )
    .await;
}

#[tokio::test]
async fn usage_is_asked_for_and_hidden_from_a_client_that_did_not_ask() {
    let up = MockUpstream::always(UpstreamReply::sse(&STREAM, Duration::from_millis(5))).await;
    let (gw, reply) = stream_without_usage(&up).await;
    let sent: serde_json::Value = serde_json::from_slice(&up.seen()[0].body).unwrap();
    assert_eq!(
        sent["stream_options"]["include_usage"], true,
        "sluice must ask the upstream"
    );
    assert_eq!(sent["messages"], json!([]));
    assert_eq!(
        reply.text(),
        sse_text(&[STREAM[0], STREAM[1], STREAM[3]]),
        "the client's stream must be what it asked for"
    );
    check_stream_usage(&gw).await;
}

/// Azure OpenAI's text completions of a deployment are asked for usage
/// as its chat completions and OpenAI's own completions are.
#[tokio::test]
async fn an_azure_deployment_s_text_completions_are_asked_for_usage() {
    let up = MockUpstream::always(UpstreamReply::sse(&STREAM, Duration::ZERO)).await;
    let gw =
        TestGateway::start(&config(&up.url()).replace("path_prefix: /v1/", "path_prefix: /")).await;
    let reply = Client::new()
        .post_json(
            &gw.url("/openai/deployments/inst/completions?api-version=2024-10-21"),
            &[],
            r#"{"prompt":"hi","stream":true}"#,
        )
        .await;
    assert_eq!(reply.status, 200);
    let sent: serde_json::Value = serde_json::from_slice(&up.seen()[0].body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true, "{sent}");
    assert_eq!(reply.text(), sse_text(&[STREAM[0], STREAM[1], STREAM[3]]));
    check_stream_usage(&gw).await;
}

#[tokio::test]
async fn a_stream_sent_with_a_length_is_not_cut_short_by_the_stripped_chunk() {
    // Some upstreams (a caching proxy, a canned test server) send a whole
    // SSE body at once, with content-length. The client gets fewer bytes
    // than that length once the usage chunk is cut out.
    let up = MockUpstream::always(
        UpstreamReply::text(sse_text(&STREAM)).header("content-type", "text/event-stream"),
    )
    .await;
    let (gw, reply) = stream_without_usage(&up).await;
    let expected = sse_text(&[STREAM[0], STREAM[1], STREAM[3]]);
    assert_eq!(reply.text(), expected);
    if let Some(length) = reply.header("content-length") {
        assert_eq!(
            length,
            expected.len().to_string(),
            "a length must be the real one"
        );
    }
    check_stream_usage(&gw).await;
}

#[tokio::test]
async fn an_unterminated_last_event_after_the_stripped_chunk_still_arrives() {
    // A length-delimited body whose last event has no blank line after
    // it: held back while stripping, it must still reach the client
    // after the upstream's body has ended.
    let whole = sse_text(&[STREAM[0], STREAM[2]]) + "data: [DONE]";
    let up = MockUpstream::always(
        UpstreamReply::text(whole).header("content-type", "text/event-stream"),
    )
    .await;
    let (_gw, reply) = stream_without_usage(&up).await;
    assert_eq!(reply.text(), sse_text(&[STREAM[0]]) + "data: [DONE]");
}

#[tokio::test]
async fn usage_chunk_reaches_a_client_that_asked_for_it() {
    let up = MockUpstream::always(UpstreamReply::sse(&STREAM, Duration::ZERO)).await;
    let gw = TestGateway::start(&config(&up.url())).await;
    let body = r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], body)
        .await;
    assert_eq!(
        up.seen()[0].body,
        body.as_bytes(),
        "the request is forwarded untouched"
    );
    assert_eq!(reply.text(), sse_text(&STREAM));
}

/// An answer that reports no usage costs nothing known: the log says
/// null for its cost as for its tokens, and the completion still counts.
#[tokio::test]
async fn an_answer_without_usage_has_no_cost() {
    let up = MockUpstream::always(UpstreamReply::json(&json!({
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}]
    })))
    .await;
    let gw = TestGateway::start(&config(&up.url())).await;
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], "{}")
        .await;
    assert_eq!(reply.status, 200);
    let log = &gw.wait_access_logs(1).await[0];
    assert!(
        log["input_tokens"].is_null() && log["output_tokens"].is_null(),
        "{log}"
    );
    assert!(log["cost_usd"].is_null(), "{log}");
    let labels = [
        ("route", "chat"),
        ("model", "gpt-4o-mini"),
        ("finish_reason", "stop"),
    ];
    assert_eq!(
        gw.metric("sluice_completions_total", &labels).await,
        Some(1.0)
    );
}

/// A chat request asking for `n` choices gets `n` completions, each
/// counted with its own finish reason, in JSON and in a stream (where the
/// mock sends one finish chunk per choice).
#[tokio::test]
async fn each_of_n_choices_counts_as_a_completion() {
    let gw = TestGateway::start(
        r#"
upstreams:
  demo: { mock: {} }
routes:
  - name: chat
    match: { path_prefix: /v1/ }
    auth: none
    upstream: demo
"#,
    )
    .await;
    let url = gw.url("/v1/chat/completions");
    let client = Client::new();
    for body in [
        json!({"model": "gpt-4o-mini", "n": 3, "messages": [{"role": "user", "content": "hi"}]}),
        json!({"model": "gpt-4o-mini", "n": 2, "stream": true, "messages": [{"role": "user", "content": "hi"}]}),
        json!({"model": "gpt-4o-mini", "n": 2, "max_tokens": 1, "stream": true,
               "messages": [{"role": "user", "content": "tell me a long story"}]}),
    ] {
        let reply = client.post_json(&url, &[], &body.to_string()).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    gw.wait_access_logs(3).await;
    let completions = |reason: &'static str| {
        let gw = &gw;
        async move {
            let labels = [
                ("route", "chat"),
                ("model", "gpt-4o-mini"),
                ("finish_reason", reason),
            ];
            gw.metric("sluice_completions_total", &labels).await
        }
    };
    assert_eq!(completions("stop").await, Some(5.0));
    assert_eq!(completions("length").await, Some(2.0));
}

/// An event too long to read (a 1.5 MiB delta, an image's partial data)
/// passes unread, and the events after it still are: the usage is
/// counted, and the usage chunk sluice asked for still stripped.
#[tokio::test]
async fn events_after_one_too_long_to_read_are_still_read() {
    let huge = format!(
        r#"{{"model":"gpt-4o-mini","choices":[{{"index":0,"delta":{{"content":"{}"}},"finish_reason":null}}]}}"#,
        "x".repeat(1536 * 1024)
    );
    let events = [STREAM[0], huge.as_str(), STREAM[1], STREAM[2], STREAM[3]];
    let up = MockUpstream::always(UpstreamReply::sse(&events, Duration::from_millis(5))).await;
    let (gw, reply) = stream_without_usage(&up).await;
    assert!(
        reply.text() == sse_text(&[events[0], events[1], events[2], events[4]]),
        "the client's stream must be what it asked for ({} bytes)",
        reply.text().len()
    );
    check_stream_usage(&gw).await;
}

/// Anthropic counts prompt tokens read from or written to its cache apart
/// from `input_tokens`; they are input all the same (OpenAI's
/// `prompt_tokens` include its cached ones), and billed.
#[tokio::test]
async fn anthropic_cached_prompt_tokens_count_as_input() {
    let events = [
        r#"{"type":"message_start","message":{"model":"claude-sonnet","usage":{"input_tokens":5,"cache_read_input_tokens":20000,"cache_creation_input_tokens":100,"output_tokens":1}}}"#,
        r#"{"type":"content_block_delta","delta":{"type":"text_delta","text":"Hi"}}"#,
        r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}"#,
        r#"{"type":"message_stop"}"#,
    ];
    let up = MockUpstream::always(UpstreamReply::sse(&events, Duration::ZERO)).await;
    let gw = TestGateway::start(&config(&up.url())).await;
    Client::new()
        .post_json(&gw.url("/v1/messages"), &[], "{}")
        .await;
    check(
        &gw,
        "claude-sonnet",
        20105,
        15,
        (20105.0 * 1.0 + 15.0 * 3.0) / 1e6,
        "stop",
    )
    .await;
}

/// Older Azure OpenAI API versions' answer to a body naming
/// `stream_options`.
fn refuses_stream_options() -> UpstreamReply {
    UpstreamReply::status(400)
        .header("content-type", "application/json")
        .body(r#"{"error":{"message":"Unrecognized request argument supplied: stream_options","type":"invalid_request_error"}}"#)
}

/// An upstream that refuses `stream_options` (older Azure OpenAI API
/// versions) is asked again without it, and not asked again: sluice's
/// metering never breaks a request that works without sluice.
#[tokio::test]
async fn an_upstream_that_refuses_stream_options_is_asked_without_it() {
    let up = MockUpstream::start(|seen| {
        if String::from_utf8_lossy(&seen.body).contains("stream_options") {
            refuses_stream_options()
        } else {
            UpstreamReply::sse(&STREAM, Duration::ZERO)
        }
    })
    .await;
    let gw = TestGateway::start(&format!(
        r#"
upstreams:
  azure: {{ url: "{}" }}
pools:
  llm: {{ members: [azure] }}
routes:
  - {{ name: direct, match: {{ path_prefix: /d/ }}, auth: none, upstream: azure }}
  - {{ name: pooled, match: {{ path_prefix: /p/ }}, auth: none, upstream: llm }}
"#,
        up.url()
    ))
    .await;
    for (path, calls) in [
        ("/d/v1/chat/completions", 2),
        ("/d/v1/chat/completions", 3),
        ("/p/v1/chat/completions", 4),
    ] {
        let reply = Client::new()
            .post_json(
                &gw.url(path),
                &[],
                r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#,
            )
            .await;
        assert_eq!(reply.status, 200, "{path}: {}", reply.text());
        assert_eq!(reply.text(), sse_text(&STREAM), "{path}: passed as it came");
        assert_eq!(up.seen().len(), calls, "{path}");
    }
    // Said once, when found: its streams go unmetered from then on.
    let said: Vec<_> = gw
        .log_lines()
        .into_iter()
        .filter(|l| l["event"] == "stream_usage_refused")
        .map(|l| l["upstream"].clone())
        .collect();
    assert_eq!(said, [json!("azure")]);
}

/// On Azure each client picks its `api-version`: one that refuses
/// `stream_options` stops the question under that version only, and
/// the streams of clients on newer versions are still metered.
#[tokio::test]
async fn a_refusal_under_one_api_version_leaves_the_others_metered() {
    let up = MockUpstream::start(|seen| {
        // The last api-version is the one read, its name decoded.
        let old = seen
            .uri
            .query()
            .is_some_and(|q| q.ends_with("version=2023-05-15"));
        if old && String::from_utf8_lossy(&seen.body).contains("stream_options") {
            refuses_stream_options()
        } else {
            UpstreamReply::sse(&STREAM, Duration::ZERO)
        }
    })
    .await;
    let gw = TestGateway::start(&config(&up.url())).await;
    let stream = |version: &'static str| {
        let url = gw.url(&format!("/v1/chat/completions?api-version={version}"));
        async move {
            Client::new()
                .post_json(
                    &url,
                    &[],
                    r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#,
                )
                .await
        }
    };
    assert_eq!(stream("2023-05-15").await.status, 200);
    assert_eq!(up.seen().len(), 2, "asked, then asked without the question");
    assert_eq!(stream("2023-05-15").await.status, 200);
    assert_eq!(up.seen().len(), 3, "not asked again under that version");
    assert_eq!(stream("2024-10-21").await.status, 200);
    let sent: serde_json::Value =
        serde_json::from_slice(&up.seen()[3].body).expect("the upstream got JSON");
    assert_eq!(
        sent["stream_options"]["include_usage"], true,
        "a newer version is still asked for usage"
    );
    let said: Vec<_> = gw
        .log_lines()
        .into_iter()
        .filter(|l| l["event"] == "stream_usage_refused")
        .map(|l| l["api_version"].clone())
        .collect();
    assert_eq!(said, [json!("2023-05-15")]);
    // Two versions in one query: no refusal is filed under either, so
    // no client can switch the question off for another's version.
    for two in [
        "2024-10-21&api-version=2023-05-15",
        "2024-10-21&api%2Dversion=2023-05-15",
    ] {
        assert_eq!(stream(two).await.status, 200);
    }
    assert_eq!(stream("2024-10-21").await.status, 200);
    let last = up.seen().last().map(|s| s.body.clone()).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&last).contains("include_usage"),
        "still asked under 2024-10-21"
    );
}

/// A client whose own `stream_options` the upstream refuses (a key it
/// does not know) gets its 400, and every other client's streams are
/// still asked for usage: one bad request must not stop the metering.
#[tokio::test]
async fn a_clients_own_bad_stream_options_do_not_stop_metering() {
    let up = MockUpstream::start(|seen| {
        if String::from_utf8_lossy(&seen.body).contains("bogus") {
            UpstreamReply::status(400)
                .header("content-type", "application/json")
                .body(r#"{"error":{"message":"Unknown parameter: 'stream_options.bogus'.","type":"invalid_request_error","param":"stream_options.bogus"}}"#)
        } else {
            UpstreamReply::sse(&STREAM, Duration::ZERO)
        }
    })
    .await;
    let gw = TestGateway::start(&config(&up.url())).await;
    let url = gw.url("/v1/chat/completions");
    let bad = Client::new()
        .post_json(
            &url,
            &[],
            r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"bogus":1},"messages":[]}"#,
        )
        .await;
    assert_eq!(bad.status, 400, "the client's own error, as it is");
    assert_eq!(up.seen().len(), 2, "asked with the question, then without");
    let good = Client::new()
        .post_json(
            &url,
            &[],
            r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#,
        )
        .await;
    assert_eq!(good.status, 200);
    let sent: serde_json::Value =
        serde_json::from_slice(&up.seen()[2].body).expect("the upstream got JSON");
    assert_eq!(
        sent["stream_options"]["include_usage"], true,
        "still asked for usage"
    );
    assert!(!gw.log_text().contains("stream_usage_refused"));
}

/// The log's `cost_usd` is to the nano-dollar, as spend is kept, not a
/// binary fraction's noise; embeddings count no completion.
#[tokio::test]
async fn costs_are_logged_clean_and_embeddings_complete_nothing() {
    let up = MockUpstream::always(UpstreamReply::json(&json!({
        "object": "list", "model": "gpt-4o-mini",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
        "usage": {"prompt_tokens": 239, "total_tokens": 239},
    })))
    .await;
    let gw = TestGateway::start(&config(&up.url())).await;
    let reply = Client::new()
        .post_json(
            &gw.url("/v1/embeddings"),
            &[],
            r#"{"model":"gpt-4o-mini","input":"hi"}"#,
        )
        .await;
    assert_eq!(reply.status, 200);
    let logs = gw.wait_access_logs(1).await;
    // 239 × $0.15 per million is 3.5850000000000004e-05 in binary.
    assert_eq!(
        logs[0]["cost_usd"].as_f64(),
        Some(3.585e-5),
        "{:?}",
        logs[0]
    );
    let none = gw
        .metric(
            "sluice_completions_total",
            &[
                ("route", "chat"),
                ("model", "gpt-4o-mini"),
                ("finish_reason", "none"),
            ],
        )
        .await;
    assert!(
        none.unwrap_or(0.0) == 0.0,
        "an embedding counted as a completion"
    );
}

/// With `cached_input` and `cache_write` priced, prompt tokens read from
/// or written to the provider's cache cost those prices: Anthropic's
/// stream counts, and OpenAI's `cached_tokens` within `prompt_tokens`.
#[tokio::test]
async fn cached_prompt_tokens_cost_their_own_prices() {
    let priced = |url: &str| {
        config(url).replace(
            "  default: { input: 1.00, output: 3.00 }",
            "  default: { input: 1.00, output: 3.00, cached_input: 0.10, cache_write: 1.25 }",
        )
    };
    let events = [
        r#"{"type":"message_start","message":{"model":"claude-sonnet","usage":{"input_tokens":5,"cache_read_input_tokens":20000,"cache_creation_input_tokens":100,"output_tokens":1}}}"#,
        r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}"#,
        r#"{"type":"message_stop"}"#,
    ];
    let up = MockUpstream::always(UpstreamReply::sse(&events, Duration::ZERO)).await;
    let gw = TestGateway::start(&priced(&up.url())).await;
    Client::new()
        .post_json(&gw.url("/v1/messages"), &[], "{}")
        .await;
    let cost = (5.0 * 1.0 + 20000.0 * 0.10 + 100.0 * 1.25 + 15.0 * 3.0) / 1e6;
    check(&gw, "claude-sonnet", 20105, 15, cost, "stop").await;

    let up = MockUpstream::always(UpstreamReply::json(&json!({
        "object": "chat.completion", "model": "gpt-4.1",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1200, "completion_tokens": 10, "total_tokens": 1210,
                  "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0}},
    })))
    .await;
    let gw = TestGateway::start(&priced(&up.url())).await;
    Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], "{}")
        .await;
    let cost = (176.0 * 1.0 + 1024.0 * 0.10 + 10.0 * 3.0) / 1e6;
    check(&gw, "gpt-4.1", 1200, 10, cost, "stop").await;
}

/// Bulk embeddings in base64 (the OpenAI SDK's default encoding) pass
/// 4 MiB, more than sluice parses whole: their model and usage, written
/// after the data, are still metered and priced, from the answer's end.
#[tokio::test]
async fn an_answer_too_large_to_parse_whole_is_still_metered() {
    let vector = json!({"object": "embedding", "index": 0, "embedding": "QUJD".repeat(4096)});
    let answer = json!({
        "object": "list",
        "data": vec![vector; 330],
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 5000, "total_tokens": 5000},
    });
    let up = MockUpstream::always(UpstreamReply::json(&answer)).await;
    let gw = TestGateway::start(&config(&up.url())).await;
    let reply = Client::new()
        .post_json(&gw.url("/v1/embeddings"), &[], "{}")
        .await;
    assert_eq!(reply.status, 200);
    assert!(reply.body.len() > 5 << 20, "{}", reply.body.len());
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["model"], "text-embedding-3-small", "{log}");
    assert_eq!(log["input_tokens"], 5000);
    assert!(
        (log["cost_usd"].as_f64().unwrap() - 5000.0 / 1e6).abs() < 1e-12,
        "{log}"
    );
    let labels = [
        ("route", "chat"),
        ("model", "text-embedding-3-small"),
        ("kind", "input"),
    ];
    assert_eq!(
        gw.metric("sluice_tokens_total", &labels).await,
        Some(5000.0)
    );
}

/// An answer that names no model (an image, speech or a transcription
/// reports usage without one) is priced and labelled as the model its
/// request named, where sluice read the request to reserve its tokens:
/// not at the `default` price under `unknown`.
#[tokio::test]
async fn an_answer_without_a_model_is_priced_as_the_one_requested() {
    let up = MockUpstream::always(UpstreamReply::json(&json!({
        "created": 1, "data": [{"b64_json": "aGk="}],
        "usage": {"input_tokens": 1000, "output_tokens": 4000, "total_tokens": 5000},
    })))
    .await;
    let yaml = config(&up.url())
        .replace(
            "    auth: none\n",
            "    auth: none\n    rate_limit: { tokens_per_minute: 1000000 }\n",
        )
        .replace(
            "  default:",
            "  gpt-image-1: { input: 5.00, output: 40.00 }\n  default:",
        );
    let gw = TestGateway::start(&yaml).await;
    let reply = Client::new()
        .post_json(
            &gw.url("/v1/images/generations"),
            &[],
            r#"{"model":"gpt-image-1","prompt":"a cat"}"#,
        )
        .await;
    assert_eq!(reply.status, 200);
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["model"], "gpt-image-1");
    let cost = (1000.0 * 5.0 + 4000.0 * 40.0) / 1e6;
    assert!(
        (log["cost_usd"].as_f64().unwrap() - cost).abs() < 1e-12,
        "{log}"
    );
    let labels = [
        ("route", "chat"),
        ("model", "gpt-image-1"),
        ("kind", "output"),
    ];
    assert_eq!(
        gw.metric("sluice_tokens_total", &labels).await,
        Some(4000.0)
    );
}

/// A streamed chat completion through a gateway with a budget (so that
/// spend is counted), read until its finish reason, then left: the
/// client's body, and what it had read.
async fn read_until_finish_then_leave(gw: &TestGateway, body: &'static str) -> String {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<Bytes>>();
    let resp = client
        .request(
            http::Request::post(gw.url("/v1/chat/completions"))
                .header("content-type", "application/json")
                .body(http_body_util::Full::new(Bytes::from_static(
                    body.as_bytes(),
                )))
                .expect("request"),
        )
        .await
        .expect("the stream starts");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains(r#""finish_reason":"stop""#) {
        let frame = body.frame().await.expect("a frame").expect("no error");
        if let Ok(data) = frame.into_data() {
            seen.extend_from_slice(&data);
        }
    }
    // As a loop that breaks on `finish_reason` does.
    drop(body);
    drop(client);
    String::from_utf8_lossy(&seen).into_owned()
}

/// A client that leaves once every choice has ended, before the usage
/// chunk sluice asked for, is charged what the upstream reports: the
/// answer was generated whole, and reading its last chunk costs the
/// provider nothing more. Charged only its prompt's estimate, it got the
/// answer all but free, past any budget.
#[tokio::test]
async fn a_client_leaving_after_the_finish_reason_is_charged_the_reported_usage() {
    let up = MockUpstream::always(UpstreamReply::sse(&STREAM, Duration::from_millis(300))).await;
    // With a budget, and without one: metering does not depend on it.
    for budget in ["budget:\n  daily_usd: 100\n  alert_at: [0.9]\n", ""] {
        let gw = TestGateway::start(&format!("{}{budget}", config(&up.url()))).await;
        let seen = read_until_finish_then_leave(
            &gw,
            r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hi"}]}"#,
        )
        .await;
        assert!(!seen.contains("usage"), "{seen}");
        let log = &gw.wait_access_logs(1).await[0];
        assert_eq!(log["error"], "client_closed", "{log}");
        assert_eq!(log["input_tokens"], 7, "{log}");
        assert_eq!(log["output_tokens"], 2, "{log}");
        assert_eq!(
            log["cost_usd"], 2.25e-6,
            "7 × $0.15 + 2 × $0.60 a million: {log}"
        );
        let cost = gw.metric("sluice_cost_usd_total", &[]).await;
        assert_eq!(cost, Some(2.25e-6), "{budget}");
        if !budget.is_empty() {
            let spent = gw
                .metric("sluice_budget_spent_usd", &[("scope", "global")])
                .await;
            assert_eq!(spent, Some(2.25e-6));
        }
    }
}

/// The usage read after the client left holds no concurrency slot: the
/// client's next request is not refused while the upstream finishes.
#[tokio::test]
async fn a_client_that_left_holds_no_slot_while_its_usage_is_read() {
    let up = MockUpstream::always(UpstreamReply::sse(&STREAM, Duration::from_millis(300))).await;
    let gw = TestGateway::start(&format!(
        "{}tiers:\n  anonymous: {{ concurrent_requests: 1 }}\n",
        config(&up.url())
    ))
    .await;
    read_until_finish_then_leave(
        &gw,
        r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"Say hi"}]}"#,
    )
    .await;
    let next = Client::new()
        .post_json(
            &gw.url("/v1/chat/completions"),
            &[],
            r#"{"model":"gpt-4o-mini","messages":[]}"#,
        )
        .await;
    assert_eq!(next.status, 200, "{}", next.text());
    let logs = gw.wait_access_logs(2).await;
    assert!(
        logs.iter()
            .any(|l| l["error"] == "client_closed" && l["input_tokens"] == 7),
        "still metered: {logs:?}"
    );
}

/// Asked for two choices, a stream whose first choice ended is still
/// being generated: the client leaving then is left at once (the
/// upstream stops generating), and charged the estimate, not read on.
#[tokio::test]
async fn a_client_leaving_before_every_choice_ended_is_not_read_on() {
    let events = [
        r#"{"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#,
        r#"{"model":"gpt-4o-mini","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
        r#"{"model":"gpt-4o-mini","choices":[{"index":1,"delta":{"content":"Hello"},"finish_reason":null}]}"#,
        r#"{"model":"gpt-4o-mini","choices":[{"index":1,"delta":{},"finish_reason":"stop"}]}"#,
        STREAM[2],
        STREAM[3],
    ];
    let up = MockUpstream::always(UpstreamReply::sse(&events, Duration::from_millis(300))).await;
    for budget in ["budget:\n  daily_usd: 100\n  alert_at: [0.9]\n", ""] {
        let gw = TestGateway::start(&format!("{}{budget}", config(&up.url()))).await;
        read_until_finish_then_leave(
            &gw,
            r#"{"model":"gpt-4o-mini","stream":true,"n":2,"max_tokens":10,"messages":[{"role":"user","content":"Say hi"}]}"#,
        )
        .await;
        let log = &gw.wait_access_logs(1).await[0];
        assert_eq!(log["error"], "client_closed", "{log}");
        assert_eq!(
            log["input_tokens"],
            serde_json::Value::Null,
            "not read on: {log}"
        );
        if !budget.is_empty() {
            assert!(
                log["cost_usd"].as_f64().is_some_and(|c| c > 0.0),
                "the estimate: {log}"
            );
        }
    }
}

/// A whole answer that reports no usage (an upstream that ignores
/// `stream_options`) is charged its estimate, as one cut short is:
/// finishing it must not cost less than breaking it off.
#[tokio::test]
async fn a_whole_stream_without_usage_is_charged_its_estimate() {
    let events = [STREAM[0], STREAM[1], STREAM[3]];
    let up = MockUpstream::always(UpstreamReply::sse(&events, Duration::ZERO)).await;
    let gw = TestGateway::start(&format!(
        "{}budget:\n  daily_usd: 100\n  alert_at: [0.9]\n",
        config(&up.url())
    ))
    .await;
    let reply = Client::new()
        .post_json(
            &gw.url("/v1/chat/completions"),
            &[],
            r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":100,"messages":[{"role":"user","content":"Say hi"}]}"#,
        )
        .await;
    assert_eq!(reply.status, 200);
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["error"], serde_json::Value::Null, "{log}");
    assert_eq!(log["input_tokens"], serde_json::Value::Null, "{log}");
    let cost = log["cost_usd"].as_f64().expect("charged");
    // At least the 100 tokens it may generate, at $0.60 a million.
    assert!((6e-5..1e-4).contains(&cost), "{log}");
}

/// A path an app routes as chat completions in any case, or without its
/// `;` parameters (Express, ASP.NET Core, Java servers), is metered as
/// one: sluice asks for the stream's usage there too.
#[tokio::test]
async fn chat_spelled_another_way_is_still_metered() {
    let up = MockUpstream::always(UpstreamReply::sse(&STREAM, Duration::ZERO)).await;
    let gw = TestGateway::start(&config(&up.url())).await;
    let reply = Client::new()
        .post_json(
            &gw.url("/v1/Chat;v=1/Completions;x"),
            &[],
            r#"{"model":"gpt-4o-mini","stream":true,"messages":[]}"#,
        )
        .await;
    assert_eq!(reply.status, 200);
    let sent = String::from_utf8_lossy(&up.seen()[0].body).into_owned();
    assert!(sent.contains("include_usage"), "{sent}");
    check_stream_usage(&gw).await;
}

/// An upload (a transcription) names its model in a form field: that is
/// what its answer, which names none, is priced at, never a model name
/// its file's bytes or a preamble before the form happen to hold, whether
/// sluice holds the body whole or streams it through.
#[tokio::test]
async fn an_upload_is_priced_at_its_model_field() {
    let up = MockUpstream::always(UpstreamReply::json(&json!({
        "text": "hello",
        "usage": {"type": "tokens", "input_tokens": 1000, "output_tokens": 10},
    })))
    .await;
    // Held whole for a pool's replays; streamed through to one upstream,
    // with a budget or without (the cost metric prices it all the same).
    for (target, budget) in [
        (
            "transcribers",
            "budget: { daily_usd: 100, alert_at: [0.9] }",
        ),
        ("llm", "budget: { daily_usd: 100, alert_at: [0.9] }"),
        ("llm", ""),
    ] {
        let gw = TestGateway::start(&format!(
            r#"
upstreams:
  llm: {{ url: "{}" }}
pools:
  transcribers: {{ members: [llm] }}
routes:
  - {{ name: audio, match: {{ path_prefix: /v1/ }}, auth: none, upstream: {target} }}
pricing:
  gpt-4o-transcribe: {{ input: 2.50, output: 10.00 }}
  text-embedding-3-small: {{ input: 0.02, output: 0.02 }}
  default: {{ input: 1.00, output: 3.00 }}
{budget}
"#,
            up.url()
        ))
        .await;
        upload_is_priced_as_transcription(&gw).await;
    }
}

async fn upload_is_priced_as_transcription(gw: &TestGateway) {
    let body = b"--fake\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ntext-embedding-3-small\r\n--fake--\r\n\
--real\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF {\"model\":\"text-embedding-3-small\"} \r\n\
--real\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-transcribe\r\n--real--\r\n";
    let reply = Client::new()
        .send(
            http::Method::POST,
            &gw.url("/v1/audio/transcriptions"),
            &[("content-type", "multipart/form-data; boundary=real")],
            Bytes::from_static(body),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["model"], "gpt-4o-transcribe", "{log}");
    assert_eq!(
        log["cost_usd"], 0.0026,
        "1000 × $2.50 + 10 × $10 a million: {log}"
    );
}
