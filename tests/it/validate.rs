//! Request validation on routes with `validate`: OpenAI request shapes and
//! JSON Schema files, 400 `invalid_request` naming the JSON path, and a
//! deeply nested body refused before it is parsed. Refused requests never
//! reach the upstream.

use crate::support::{Client, MockUpstream, TestGateway, UpstreamReply};

const SCHEMA: &str = r#"{
  "type": "object",
  "required": ["name", "tags"],
  "additionalProperties": false,
  "properties": {
    "name": {"type": "string"},
    "tags": {"type": "array", "items": {"type": "string"}}
  }
}"#;

async fn start() -> (TestGateway, MockUpstream) {
    let upstream = MockUpstream::always(UpstreamReply::text("{}")).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("item.json"), SCHEMA).unwrap();
    let yaml = format!(
        r#"
upstreams:
  llm: {{ url: "{}" }}
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
    auth: none
    validate: openai
    upstream: llm
  - name: azure
    match: {{ path_prefix: /openai/ }}
    auth: none
    validate: openai
    upstream: llm
  - name: items
    match: {{ path_prefix: /items }}
    auth: none
    validate: {{ schema_file: item.json }}
    upstream: llm
"#,
        upstream.url()
    );
    (TestGateway::start_in(&yaml, &[], dir).await, upstream)
}

fn error(reply: &crate::support::ClientReply) -> serde_json::Value {
    assert_eq!(reply.status, 400, "{}", reply.text());
    let body = reply.json();
    assert_eq!(body["error"]["code"], "invalid_request");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    body["error"].clone()
}

#[tokio::test]
async fn a_malformed_chat_request_is_refused_naming_the_path() {
    let (gw, upstream) = start().await;
    let client = Client::new();
    let url = gw.url("/v1/chat/completions");
    let bad_role = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"},{"role":"robot","content":"x"}]}"#;
    let err = error(&client.post_json(&url, &[], bad_role).await);
    assert_eq!(err["param"], "messages[1].role");
    let message = err["message"].as_str().unwrap();
    assert!(message.contains("messages[1].role"), "{message}");
    assert!(message.contains("robot"), "{message}");

    let no_model = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(
        error(&client.post_json(&url, &[], no_model).await)["param"],
        "model"
    );
    // The same endpoint spelled with an escape, which an upstream decodes.
    let escaped = gw.url("/v1/chat/%63ompletions");
    assert_eq!(
        error(&client.post_json(&escaped, &[], no_model).await)["param"],
        "model"
    );
    let wrong_type = r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":"yes"}"#;
    assert_eq!(
        error(&client.post_json(&url, &[], wrong_type).await)["param"],
        "stream"
    );
    let not_json = error(&client.post_json(&url, &[], "{\"model\":").await);
    assert!(
        not_json["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    let embed = error(
        &client
            .post_json(&gw.url("/v1/embeddings"), &[], r#"{"model":"e"}"#)
            .await,
    );
    assert_eq!(embed["param"], "input");
    let no_prompt = error(
        &client
            .post_json(&gw.url("/v1/completions"), &[], r#"{"model":"m"}"#)
            .await,
    );
    assert_eq!(no_prompt["param"], "prompt");
    assert!(
        upstream.seen().is_empty(),
        "a refused request reached the upstream"
    );
    let log = &gw.wait_access_logs(5).await[0];
    assert_eq!(log["status"], 400);
    assert_eq!(log["error"], "invalid_request");
}

#[tokio::test]
async fn well_formed_requests_pass_unchanged() {
    let (gw, upstream) = start().await;
    let client = Client::new();
    let chat = r#"{"model":"gpt-4o-mini","messages":[{"role":"system","content":"be brief"},{"role":"user","content":"hi"}],"temperature":0.5}"#;
    let reply = client
        .post_json(&gw.url("/v1/chat/completions"), &[], chat)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    // Endpoints without a known shape and bodiless requests are not checked.
    assert_eq!(client.get(&gw.url("/v1/models")).await.status, 200);
    let other = client
        .post_json(&gw.url("/v1/files"), &[], "not json at all")
        .await;
    assert_eq!(other.status, 200);
    let seen = upstream.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].body, chat.as_bytes());
}

#[tokio::test]
async fn a_schema_file_is_enforced() {
    let (gw, upstream) = start().await;
    let client = Client::new();
    let url = gw.url("/items");
    let ok = client
        .post_json(&url, &[], r#"{"name":"x","tags":["a","b"]}"#)
        .await;
    assert_eq!(ok.status, 200);
    let err = error(
        &client
            .post_json(&url, &[], r#"{"name":"x","tags":["a",7]}"#)
            .await,
    );
    assert_eq!(err["param"], "tags[1]");
    assert!(
        err["message"].as_str().unwrap().contains("tags[1]"),
        "{err}"
    );
    // A missing property is named as the field at fault.
    let missing = error(&client.post_json(&url, &[], r#"{"tags":[]}"#).await);
    assert_eq!(missing["param"], "name");
    assert!(
        missing["message"]
            .as_str()
            .unwrap()
            .starts_with("`name` does not match the schema"),
        "{missing}"
    );
    // So is a property the schema does not allow.
    let extra = error(
        &client
            .post_json(&url, &[], r#"{"name":"x","tags":[],"colour":"red"}"#)
            .await,
    );
    assert_eq!(extra["param"], "colour");
    assert!(
        extra["message"].as_str().unwrap().contains("colour"),
        "{extra}"
    );
    // A body of the wrong type is "the body", said plainly.
    let whole = error(&client.post_json(&url, &[], "[1]").await);
    assert_eq!(whole["param"], serde_json::Value::Null);
    assert!(
        whole["message"]
            .as_str()
            .unwrap()
            .starts_with("the body does not match the schema"),
        "{whole}"
    );
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn a_deeply_nested_body_is_refused_before_parsing() {
    let (gw, upstream) = start().await;
    let client = Client::new();
    let deep = format!(
        r#"{{"model":"m","messages":{}{}}}"#,
        "[".repeat(200_000),
        "]".repeat(200_000)
    );
    for path in ["/v1/chat/completions", "/items"] {
        let err = error(&client.post_json(&gw.url(path), &[], &deep).await);
        assert!(
            err["message"]
                .as_str()
                .unwrap()
                .contains("nests deeper than 64"),
            "{err}"
        );
    }
    assert!(upstream.seen().is_empty());
}

/// Requests whose model comes from elsewhere pass: an Azure OpenAI
/// deployment's path names it, and a responses request may take it from
/// a stored prompt. A plain chat request without one is still refused.
#[tokio::test]
async fn a_model_named_by_the_path_or_a_stored_prompt_is_not_required() {
    let (gw, upstream) = start().await;
    let client = Client::new();
    let post = |path: &str, body: &'static str| {
        let url = gw.url(path);
        let client = client.clone();
        async move { client.post_json(&url, &[], body).await }
    };
    let chat = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
    let azure = post(
        "/openai/deployments/gpt4/chat/completions?api-version=2024-10-21",
        chat,
    )
    .await;
    assert_eq!(azure.status, 200, "{}", azure.text());
    let prompt = post(
        "/v1/responses",
        r#"{"prompt":{"id":"pmpt_1"},"input":"hi"}"#,
    )
    .await;
    assert_eq!(prompt.status, 200, "{}", prompt.text());
    assert_eq!(upstream.seen().len(), 2);
    let bare = post("/v1/chat/completions", chat).await;
    assert_eq!(error(&bare)["param"], "model");
}

/// A compressed body is not read as broken JSON: the client is told to
/// send it plain (415 and `accept-encoding: identity`), as on a
/// token-limited route, on both kinds of validation.
#[tokio::test]
async fn a_compressed_body_is_415_not_invalid_json() {
    let (gw, upstream) = start().await;
    for path in ["/v1/chat/completions", "/items"] {
        let reply = Client::new()
            .send(
                http::Method::POST,
                &gw.url(path),
                &[("content-encoding", "gzip")],
                bytes::Bytes::from_static(b"\x1f\x8b\x08\x00\x00\x00\x00\x00"),
            )
            .await;
        assert_eq!(reply.status, 415, "{path}: {}", reply.text());
        assert_eq!(
            reply.json()["error"]["code"],
            "unsupported_content_encoding"
        );
        assert_eq!(reply.header("accept-encoding"), Some("identity"));
    }
    assert!(upstream.seen().is_empty());
}

/// Text cut inside an emoji, as JavaScript's `JSON.stringify` writes it
/// (a lone surrogate escape), is JSON all the same: it passes, and the
/// upstream gets the body as it was sent.
#[tokio::test]
async fn a_lone_surrogate_escape_passes_as_it_was_sent() {
    let (gw, up) = start().await;
    let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"cut \ud83d"}]}"#;
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], body)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(up.seen()[0].body, body.as_bytes());
}

/// A body that starts with a byte order mark (saved by Notepad, sent with
/// `curl -d @file`) is JSON to APIs: it passes, and goes on as it came.
#[tokio::test]
async fn a_body_after_a_byte_order_mark_passes_as_it_was_sent() {
    let (gw, up) = start().await;
    let body =
        "\u{feff}{\"model\":\"gpt-4o\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}";
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], body)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(up.seen()[0].body, body.as_bytes());
}
