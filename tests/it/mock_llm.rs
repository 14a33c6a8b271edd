//! The built-in `mock:` upstream: OpenAI-compatible JSON and SSE shapes,
//! deterministic usage, and its failure knobs.

use std::time::Duration;

use serde_json::Value;

use crate::support::{Client, TestGateway};

fn config(mock: &str) -> String {
    format!(
        r#"
upstreams:
  demo:
    mock: {mock}
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
    auth: none
    upstream: demo
"#
    )
}

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Say hello to the team"}]}"#;

#[tokio::test]
async fn chat_completion_json_shape_and_usage() {
    let gw = TestGateway::start(&config("{}")).await;
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], CHAT)
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json();
    assert_eq!(body["object"], "chat.completion");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["model"], "gpt-4o-mini");
    let choice = &body["choices"][0];
    assert_eq!(choice["index"], 0);
    assert_eq!(choice["message"]["role"], "assistant");
    assert_eq!(choice["finish_reason"], "stop");
    let content = choice["message"]["content"].as_str().unwrap();
    assert_eq!(
        content,
        "Hello from the sluice mock. You said: Say hello to the team"
    );
    // Usage: 3 per message + one per word; completion = words of the answer.
    assert_eq!(body["usage"]["prompt_tokens"], 3 + 2 + 3 + 5);
    assert_eq!(
        body["usage"]["completion_tokens"],
        content.split_whitespace().count()
    );
    assert_eq!(
        body["usage"]["total_tokens"],
        13 + content.split_whitespace().count()
    );
}

#[tokio::test]
async fn max_tokens_truncates_with_length() {
    let gw = TestGateway::start(&config("{}")).await;
    let reply = Client::new()
        .post_json(
            &gw.url("/v1/chat/completions"),
            &[],
            r#"{"model":"m","max_tokens":3,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
    let body = reply.json();
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["choices"][0]["message"]["content"], "Hello from the");
    assert_eq!(body["usage"]["completion_tokens"], 3);
}

fn sse_events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data event: {e:?}"))
                .to_owned()
        })
        .collect()
}

#[tokio::test]
async fn streamed_chat_matches_openai_chunks() {
    let gw = TestGateway::start(&config("{ stream_chunks: 3, chunk_interval: 30ms }")).await;
    let body = CHAT.replace(
        "{\"model\"",
        "{\"stream\":true,\"stream_options\":{\"include_usage\":true},\"model\"",
    );
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], &body)
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    let events = sse_events(&reply.text());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    // role chunk, 3 content chunks, finish chunk, usage chunk.
    assert_eq!(chunks.len(), 6, "{events:?}");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    assert!(chunks.iter().all(|c| c["id"] == chunks[0]["id"]));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks[1..4]
        .iter()
        .map(|c| c["choices"][0]["delta"]["content"].as_str().unwrap())
        .collect();
    assert_eq!(
        text,
        "Hello from the sluice mock. You said: Say hello to the team"
    );
    assert_eq!(chunks[4]["choices"][0]["finish_reason"], "stop");
    assert_eq!(chunks[5]["choices"], serde_json::json!([]));
    assert_eq!(chunks[5]["usage"]["prompt_tokens"], 13);
    // Paced by chunk_interval, not sent in one go.
    let first = reply.frames.first().unwrap().0;
    let last = reply.frames.last().unwrap().0;
    assert!(last - first >= Duration::from_millis(100));
}

#[tokio::test]
async fn stream_without_include_usage_has_no_usage_chunk() {
    let gw = TestGateway::start(&config("{}")).await;
    let reply = Client::new()
        .post_json(
            &gw.url("/v1/chat/completions"),
            &[],
            r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"x"}]}"#,
        )
        .await;
    let events = sse_events(&reply.text());
    assert!(events.iter().all(|e| !e.contains("\"usage\"")));
}

#[tokio::test]
async fn models_list() {
    let gw = TestGateway::start(&config("{}")).await;
    let body = Client::new().get(&gw.url("/v1/models")).await.json();
    assert_eq!(body["object"], "list");
    assert!(
        body["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "gpt-4o-mini")
    );
}

/// `models.retrieve`: a known model, or OpenAI's 404 `model_not_found`.
#[tokio::test]
async fn one_model_by_id() {
    let gw = TestGateway::start(&config("{}")).await;
    let client = Client::new();
    let known = client.get(&gw.url("/v1/models/gpt-4o")).await;
    assert_eq!(known.status, 200);
    let body = known.json();
    assert_eq!(body["id"], "gpt-4o");
    assert_eq!(body["object"], "model");
    let unknown = client.get(&gw.url("/v1/models/gpt-9")).await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"]["code"], "model_not_found");
}

#[tokio::test]
async fn failure_knobs_inject_the_configured_status() {
    let gw = TestGateway::start(&config("{ failure_rate: 1.0, status: 503, latency: 50ms }")).await;
    let started = std::time::Instant::now();
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], CHAT)
        .await;
    assert_eq!(reply.status, 503);
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(reply.json()["error"]["code"], "mock_failure");
}

#[tokio::test]
async fn bad_json_is_a_400_from_the_mock() {
    let gw = TestGateway::start(&config("{}")).await;
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], "{not json")
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["type"], "invalid_request_error");
}
