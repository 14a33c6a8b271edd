//! The built-in `mock:` upstream: OpenAI-compatible JSON and SSE shapes,
//! deterministic usage, and its failure knobs.

use std::time::Duration;

use serde_json::Value;

use crate::support::{Client, ClientReply, TestGateway};

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

/// `body` POSTed to `path` through the gateway.
async fn post(gw: &TestGateway, path: &str, body: &str) -> ClientReply {
    Client::new().post_json(&gw.url(path), &[], body).await
}

const CHAT: &str = r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Say hello to the team"}]}"#;

#[tokio::test]
async fn chat_completion_json_shape_and_usage() {
    let gw = TestGateway::start(&config("{}")).await;
    let reply = post(&gw, "/v1/chat/completions", CHAT).await;
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
    let reply = post(
        &gw,
        "/v1/chat/completions",
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
    let reply = post(&gw, "/v1/chat/completions", &body).await;
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
    let reply = post(
        &gw,
        "/v1/chat/completions",
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
    // HEAD is answered as GET is, without the body.
    let head = Client::new()
        .send(
            http::Method::HEAD,
            &gw.url("/v1/models"),
            &[],
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(head.status, 200);
    assert!(head.text().is_empty());
    // The body hyper leaves out of a HEAD answer is no client gone.
    let logs = gw.wait_access_logs(2).await;
    assert_eq!(logs[1]["method"], "HEAD");
    assert_eq!(logs[1]["error"], Value::Null);
}

/// A HEAD answer is not stored in the response cache: its body was never
/// read, and a hit would replay an empty one without its length.
#[tokio::test]
async fn head_answers_are_not_cached() {
    let gw = TestGateway::start(&config("{}").replace(
        "    auth: none\n",
        "    auth: none\n    cache: { ttl: 1m, scope: shared }\n",
    ))
    .await;
    let head = || async {
        Client::new()
            .send(
                http::Method::HEAD,
                &gw.url("/v1/models"),
                &[],
                bytes::Bytes::new(),
            )
            .await
    };
    for _ in 0..2 {
        let reply = head().await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("x-sluice-cache"), Some("MISS"));
        gw.wait_access_logs(1).await;
    }
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
    let reply = post(&gw, "/v1/chat/completions", CHAT).await;
    assert_eq!(reply.status, 503);
    assert!(started.elapsed() >= Duration::from_millis(50));
    assert_eq!(reply.json()["error"]["code"], "mock_failure");
}

#[tokio::test]
async fn bad_json_is_a_400_from_the_mock() {
    let gw = TestGateway::start(&config("{}")).await;
    let reply = post(&gw, "/v1/chat/completions", "{not json").await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.json()["error"]["type"], "invalid_request_error");
}

/// `POST /v1/responses` (the SDK's `responses.create`): a `response`
/// object whose usage sluice meters like any answer's.
#[tokio::test]
async fn responses_api_json_shape_and_usage() {
    let gw = TestGateway::start(&config("{}")).await;
    let reply = post(
        &gw,
        "/v1/responses",
        r#"{"model":"gpt-4o-mini","instructions":"Be brief.","input":"Say hello to the team"}"#,
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["object"], "response");
    assert_eq!(body["status"], "completed");
    assert!(body["id"].as_str().unwrap().starts_with("resp_"));
    let message = &body["output"][0];
    assert_eq!(
        (&message["type"], &message["role"]),
        (&"message".into(), &"assistant".into())
    );
    let text = message["content"][0]["text"].as_str().unwrap();
    assert_eq!(message["content"][0]["type"], "output_text");
    assert_eq!(
        text,
        "Hello from the sluice mock. You said: Say hello to the team"
    );
    let words = text.split_whitespace().count() as u64;
    // Input: the words of the input and of the instructions.
    assert_eq!(body["usage"]["input_tokens"], 5 + 2);
    assert_eq!(body["usage"]["output_tokens"], words);
    assert_eq!(body["usage"]["total_tokens"], 7 + words);
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["input_tokens"], 7);
    assert_eq!(log["output_tokens"], words);
    // An output limit ends it incomplete.
    let cut = post(
        &gw,
        "/v1/responses",
        r#"{"model":"gpt-4o-mini","input":[{"role":"user","content":"hi"}],"max_output_tokens":2}"#,
    )
    .await
    .json();
    assert_eq!(cut["status"], "incomplete");
    assert_eq!(cut["incomplete_details"]["reason"], "max_output_tokens");
    assert_eq!(cut["usage"]["input_tokens"], 3 + 1);
    assert_eq!(cut["usage"]["output_tokens"], 2);
}

/// The responses API's stream: typed, numbered events, the text in
/// deltas, and `response.completed` with the usage last.
#[tokio::test]
async fn responses_api_stream_events() {
    let gw = TestGateway::start(&config("{ stream_chunks: 3 }")).await;
    let reply = post(
        &gw,
        "/v1/responses",
        r#"{"model":"gpt-4o-mini","input":"Say hello to the team","stream":true}"#,
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    let events: Vec<(String, Value)> = reply
        .text()
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|e| {
            let (kind, data) = e.split_once('\n').expect("event and data lines");
            let kind = kind
                .strip_prefix("event: ")
                .expect("an event line")
                .to_owned();
            let data: Value =
                serde_json::from_str(data.strip_prefix("data: ").expect("a data line")).unwrap();
            assert_eq!(data["type"], kind.as_str());
            (kind, data)
        })
        .collect();
    let kinds: Vec<&str> = events.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    for (i, (_, data)) in events.iter().enumerate() {
        assert_eq!(data["sequence_number"], i);
    }
    let text: String = events[4..7]
        .iter()
        .map(|(_, d)| d["delta"].as_str().unwrap())
        .collect();
    assert_eq!(
        text,
        "Hello from the sluice mock. You said: Say hello to the team"
    );
    let done = &events[10].1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"][0]["content"][0]["text"], text.as_str());
    assert_eq!(done["usage"]["input_tokens"], 5);
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["input_tokens"], 5);
    assert_eq!(log["output_tokens"], text.split_whitespace().count());
}

/// `POST /v1/completions` (legacy text completions), JSON and stream.
#[tokio::test]
async fn text_completions_json_and_stream() {
    let gw = TestGateway::start(&config("{ stream_chunks: 2 }")).await;
    let body = post(
        &gw,
        "/v1/completions",
        r#"{"model":"gpt-4o-mini","prompt":"Say hello","max_tokens":50}"#,
    )
    .await
    .json();
    assert_eq!(body["object"], "text_completion");
    assert!(body["id"].as_str().unwrap().starts_with("cmpl-"));
    let text = body["choices"][0]["text"].as_str().unwrap().to_owned();
    assert_eq!(text, "Hello from the sluice mock. You said: Say hello");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["prompt_tokens"], 2);
    assert_eq!(body["usage"]["completion_tokens"], 9);
    let reply = post(
        &gw,
        "/v1/completions",
        r#"{"model":"gpt-4o-mini","prompt":"Say hello","stream":true}"#,
    )
    .await;
    let events = sse_events(&reply.text());
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let streamed: String = chunks
        .iter()
        .map(|c| c["choices"][0]["text"].as_str().unwrap())
        .collect();
    assert_eq!(streamed, text);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );
    // The client did not ask for usage: sluice asked the upstream for it,
    // removed the usage chunk, and metered the stream.
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    let logs = gw.wait_access_logs(2).await;
    assert_eq!(logs[1]["input_tokens"], 2);
    assert_eq!(logs[1]["output_tokens"], 9);
    // A prompt of token IDs is as many tokens.
    for prompt in ["[1,2,3]", "[[1,2],[3]]"] {
        let ids = post(
            &gw,
            "/v1/completions",
            &format!(r#"{{"model":"m","prompt":{prompt}}}"#),
        )
        .await;
        assert_eq!(ids.status, 200, "{prompt}: {}", ids.text());
        assert_eq!(ids.json()["usage"]["prompt_tokens"], 3, "{prompt}");
    }
}

/// `n` choices, each numbered, in the answer and in the stream; usage
/// counts every one.
#[tokio::test]
async fn n_choices_json_and_stream() {
    let gw = TestGateway::start(&config("{}")).await;
    let body = r#"{"model":"m","n":3,"messages":[{"role":"user","content":"hi there"}]}"#;
    let reply = post(&gw, "/v1/chat/completions", body).await.json();
    let choices = reply["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (i, choice) in choices.iter().enumerate() {
        assert_eq!(choice["index"], i);
        assert_eq!(choice["finish_reason"], "stop");
    }
    let words = choices[0]["message"]["content"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .count();
    assert_eq!(reply["usage"]["completion_tokens"], 3 * words);
    let streamed = body.replace("\"n\":3", "\"n\":3,\"stream\":true");
    let text = post(&gw, "/v1/chat/completions", &streamed).await.text();
    let finished: Vec<u64> = sse_events(&text)
        .iter()
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter(|e| e["choices"][0]["finish_reason"] == "stop")
        .map(|e| e["choices"][0]["index"].as_u64().unwrap())
        .collect();
    assert_eq!(finished, [0, 1, 2]);
}

/// Embeddings of the asked `dimensions`, as floats or, when asked, as
/// base64 of little-endian float32s (as OpenAI sends them).
#[tokio::test]
async fn embeddings_dimensions_and_base64() {
    use base64::Engine as _;
    let gw = TestGateway::start(&config("{}")).await;
    let floats = post(
        &gw,
        "/v1/embeddings",
        r#"{"model":"e","input":"hello","dimensions":16}"#,
    )
    .await
    .json();
    let vector: Vec<f64> = floats["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(vector.len(), 16);
    let packed = post(
        &gw,
        "/v1/embeddings",
        r#"{"model":"e","input":"hello","dimensions":16,"encoding_format":"base64"}"#,
    )
    .await
    .json();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(packed["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    assert_eq!(decoded.len(), 16);
    for (a, b) in decoded.iter().zip(&vector) {
        assert!((f64::from(*a) - b).abs() < 1e-6);
    }
    // What the mock builds is bounded: it runs inside sluice.
    let many = format!(
        r#"{{"model":"e","input":[{}],"dimensions":3072}}"#,
        vec!["\"x\""; 200].join(",")
    );
    assert_eq!(post(&gw, "/v1/embeddings", &many).await.status, 400);
}

/// Embeddings take tokens as well as text, as the API does: one token
/// array is one input, an array of them several, each token counted.
#[tokio::test]
async fn embeddings_of_token_arrays() {
    let gw = TestGateway::start(&config("{}")).await;
    for (input, inputs, tokens) in [
        ("[1,2,3]", 1, 3),
        ("[[1,2],[3,4,5]]", 2, 5),
        (r#"["a b","c"]"#, 2, 3),
    ] {
        let answer = post(
            &gw,
            "/v1/embeddings",
            &format!(r#"{{"model":"e","input":{input}}}"#),
        )
        .await
        .json();
        assert_eq!(answer["data"].as_array().unwrap().len(), inputs, "{input}");
        assert_eq!(answer["usage"]["prompt_tokens"], tokens, "{input}");
    }
}

/// The mock's 405 says which methods its path takes.
#[tokio::test]
async fn wrong_methods_get_405_with_allow() {
    let gw = TestGateway::start(&config("{}")).await;
    for (method, path, allow) in [
        (http::Method::GET, "/v1/chat/completions", "POST"),
        (http::Method::DELETE, "/v1/models/gpt-4o-mini", "GET, HEAD"),
    ] {
        let reply = Client::new()
            .send(method, &gw.url(path), &[], bytes::Bytes::new())
            .await;
        assert_eq!(reply.status, 405, "{path}");
        assert_eq!(reply.header("allow"), Some(allow), "{path}");
    }
}

/// A body past the mock's 8 MiB is a 413, as the API answers, not a
/// malformed-body 400.
#[tokio::test]
async fn a_body_over_the_mocks_bound_is_a_413() {
    let gw = TestGateway::start(
        r#"
limits: { max_request_body: 16MiB }
upstreams:
  m: { mock: {} }
routes:
  - { name: r, match: { path_prefix: / }, auth: none, upstream: m }
"#,
    )
    .await;
    let big = format!(
        r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(9 << 20)
    );
    let reply = post(&gw, "/v1/chat/completions", &big).await;
    assert_eq!(reply.status, 413, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "request_too_large");
}
