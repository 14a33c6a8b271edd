//! The built-in OpenAI-compatible mock LLM: the `mock:` upstream (served in
//! process, no socket) and `sluice mock` (the same engine on a port). It
//! answers deterministically so demos, drills and benchmarks are
//! repeatable: usage is counted from the input, and failures, latency and
//! stream pacing are knobs.

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited, StreamBody};
use serde_json::{Value, json};

use crate::body::{BoxBody, full};

mod chat;
mod completions;
mod responses;

/// The mock's knobs (config `mock:` or `sluice mock` flags).
#[derive(Debug, Clone, PartialEq)]
pub struct MockSettings {
    /// Delay before the response head.
    pub latency: Duration,
    /// Fraction of requests answered with `failure_status`.
    pub failure_rate: f64,
    pub failure_status: u16,
    /// Content chunks of a streamed answer; `None` = one per word.
    pub stream_chunks: Option<u32>,
    /// Pause between streamed chunks.
    pub chunk_interval: Duration,
}

impl Default for MockSettings {
    fn default() -> Self {
        MockSettings {
            latency: Duration::ZERO,
            failure_rate: 0.0,
            failure_status: 500,
            stream_chunks: None,
            chunk_interval: Duration::ZERO,
        }
    }
}

/// Requests larger than this are refused; the mock is not a file store.
const MAX_BODY: usize = 8 << 20;

const MODELS: [&str; 3] = ["gpt-4o-mini", "gpt-4o", "mock-large"];

/// Answers one request like an OpenAI-compatible server would.
pub async fn respond<B>(settings: &MockSettings, req: Request<B>) -> Response<BoxBody>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<crate::body::BoxError>,
{
    if !settings.latency.is_zero() {
        tokio::time::sleep(settings.latency).await;
    }
    if settings.failure_rate > 0.0 && fastrand::f64() < settings.failure_rate {
        let status = StatusCode::from_u16(settings.failure_status)
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return error(
            status,
            "mock failure injected",
            "server_error",
            "mock_failure",
        );
    }
    let (parts, body) = req.into_parts();
    let path = parts.uri.path();
    // HEAD is GET without the body (hyper leaves the body out).
    let method = if parts.method == Method::HEAD {
        &Method::GET
    } else {
        &parts.method
    };
    match (method, path) {
        (&Method::GET, "/health" | "/healthz") => {
            json_response(StatusCode::OK, &json!({"status": "ok"}))
        }
        (&Method::GET, "/v1/models") => models(),
        (&Method::GET, p) if p.starts_with("/v1/models/") => model(&p["/v1/models/".len()..]),
        (
            &Method::POST,
            "/v1/chat/completions" | "/v1/embeddings" | "/v1/completions" | "/v1/responses",
        ) => {
            let bytes = match Limited::new(body, MAX_BODY).collect().await {
                Ok(c) => c.to_bytes(),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    return error(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "the request body is larger than the mock's 8 MiB",
                        "invalid_request_error",
                        "request_too_large",
                    );
                }
                Err(_) => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "could not read the request body",
                        "invalid_request_error",
                        "invalid_body",
                    );
                }
            };
            let request: Value = match serde_json::from_slice(&bytes) {
                Ok(v @ Value::Object(_)) => v,
                _ => {
                    return error(
                        StatusCode::BAD_REQUEST,
                        "the body must be a JSON object",
                        "invalid_request_error",
                        "invalid_json",
                    );
                }
            };
            match path {
                "/v1/embeddings" => embeddings(&request),
                "/v1/completions" => completions::completions(settings, &request),
                "/v1/responses" => responses::responses(settings, &request),
                _ => chat::chat(settings, &request),
            }
        }
        (_, "/v1/chat/completions" | "/v1/embeddings" | "/v1/completions" | "/v1/responses") => {
            not_allowed("POST")
        }
        (_, p) if p == "/v1/models" || p.starts_with("/v1/models/") => not_allowed("GET, HEAD"),
        _ => error(
            StatusCode::NOT_FOUND,
            "the mock serves /v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings, /v1/models and /v1/models/{id}",
            "invalid_request_error",
            "unknown_url",
        ),
    }
}

/// One token per whitespace-separated word: crude, but deterministic and
/// easy to check by hand.
fn count_tokens(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

/// Text of a message `content`: a string, or an array of parts with `text`.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// What the mock answers: a greeting that echoes the start of the input,
/// one token per word, cut at the request's output limit.
pub(super) struct Answer {
    text: String,
    /// Cut short by the limit.
    cut: bool,
}

impl Answer {
    fn to(input: &str, limit: Option<u64>) -> Self {
        let echo: Vec<&str> = input.split_whitespace().take(12).collect();
        let reply = format!("Hello from the sluice mock. You said: {}", echo.join(" "));
        let mut words: Vec<&str> = reply.split_whitespace().collect();
        let mut cut = false;
        if let Some(limit) = limit
            && (words.len() as u64) > limit
        {
            words.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
            cut = true;
        }
        Answer {
            text: words.join(" "),
            cut,
        }
    }

    fn words(&self) -> Vec<&str> {
        self.text.split_whitespace().collect()
    }

    /// The chat and completions APIs' `finish_reason`.
    fn finish_reason(&self) -> &'static str {
        if self.cut { "length" } else { "stop" }
    }
}

/// The chat and completions APIs' `usage`.
fn usage(prompt_tokens: u64, completion_tokens: u64) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// Splits the answer into `chunks` content pieces (one per word when `None`);
/// concatenated they are exactly the non-streamed content.
fn split_content(words: &[&str], chunks: Option<u32>) -> Vec<String> {
    if words.is_empty() {
        return Vec::new();
    }
    let n = chunks.map_or(words.len(), |c| (c as usize).clamp(1, words.len()));
    let per = words.len().div_ceil(n);
    words
        .chunks(per)
        .enumerate()
        .map(|(i, group)| {
            let text = group.join(" ");
            if i == 0 { text } else { format!(" {text}") }
        })
        .collect()
}

fn sse(event: &Value) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    // Serializing a `Value` cannot fail.
    let _ = serde_json::to_writer(&mut out, event);
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// An SSE response that sends `events` one by one, `interval` apart.
fn sse_response(events: Vec<Bytes>, interval: Duration) -> Response<BoxBody> {
    let frames = stream::unfold(
        (events.into_iter(), true),
        move |(mut it, first)| async move {
            let event = it.next()?;
            if !first && !interval.is_zero() {
                tokio::time::sleep(interval).await;
            }
            Some((
                Ok::<_, Infallible>(http_body::Frame::data(event)),
                (it, false),
            ))
        },
    );
    let body = StreamBody::new(frames)
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// The most embedding values one mock answer holds.
const MAX_EMBEDDING_VALUES: usize = 1 << 18;

/// A 405 that says, as RFC 9110 asks, which methods the path takes.
fn not_allowed(allow: &'static str) -> Response<BoxBody> {
    let mut resp = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed",
        "invalid_request_error",
        "method_not_allowed",
    );
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    resp
}

fn embeddings(request: &Value) -> Response<BoxBody> {
    // Each input's text (what its vector is made from) and tokens. The
    // API takes a string, strings, one token array or token arrays.
    let of = |v: &Value| match v {
        Value::String(s) => (s.clone(), count_tokens(s)),
        Value::Array(tokens) => (v.to_string(), tokens.len() as u64),
        other => (other.to_string(), 1),
    };
    let inputs: Vec<(String, u64)> = match request.get("input") {
        Some(text @ Value::String(_)) => vec![of(text)],
        Some(tokens @ Value::Array(items))
            if !items.is_empty() && items.iter().all(Value::is_number) =>
        {
            vec![of(tokens)]
        }
        Some(Value::Array(items)) => items.iter().map(of).collect(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "`input` is required",
                "invalid_request_error",
                "invalid_request",
            );
        }
    };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("text-embedding-3-small");
    // 8 dimensions unless asked for others (up to text-embedding-3-large's).
    let dimensions = request
        .get("dimensions")
        .and_then(Value::as_u64)
        .map_or(8, |d| d.clamp(1, 3072) as usize);
    let base64 = request.get("encoding_format").and_then(Value::as_str) == Some("base64");
    // OpenAI takes at most 2048 inputs. The mock runs inside sluice: it
    // also bounds what it builds, so a request cannot eat its memory.
    if inputs.len() > 2048 || inputs.len() * dimensions > MAX_EMBEDDING_VALUES {
        return error(
            StatusCode::BAD_REQUEST,
            "too many inputs for the mock: at most 2048, and 262144 values in all",
            "invalid_request_error",
            "invalid_request",
        );
    }
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, (text, _))| {
            // A small deterministic vector derived from the bytes.
            let mut v = vec![0f64; dimensions];
            for (j, b) in text.bytes().enumerate() {
                v[j % dimensions] += f64::from(b) / 255.0;
            }
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-9);
            let unit = v.iter().map(|x| x / norm);
            // base64: the little-endian float32s, as OpenAI sends them.
            let embedding = if base64 {
                use base64::Engine as _;
                let bytes: Vec<u8> = unit.flat_map(|x| (x as f32).to_le_bytes()).collect();
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                json!(unit.collect::<Vec<f64>>())
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    let tokens: u64 = inputs.iter().map(|(_, tokens)| tokens).sum();
    json_response(
        StatusCode::OK,
        &json!({
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }),
    )
}

fn models() -> Response<BoxBody> {
    let created = unix_now();
    let data: Vec<Value> = MODELS.iter().map(|id| model_object(id, created)).collect();
    json_response(StatusCode::OK, &json!({"object": "list", "data": data}))
}

/// `GET /v1/models/{id}` (the SDK's `models.retrieve`): the model, or
/// OpenAI's 404 `model_not_found`.
fn model(id: &str) -> Response<BoxBody> {
    if MODELS.contains(&id) {
        return json_response(StatusCode::OK, &model_object(id, unix_now()));
    }
    error(
        StatusCode::NOT_FOUND,
        &format!("The model `{id}` does not exist"),
        "invalid_request_error",
        "model_not_found",
    )
}

fn model_object(id: &str, created: u64) -> Value {
    json!({"id": id, "object": "model", "created": created, "owned_by": "sluice-mock"})
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn json_response(status: StatusCode, value: &Value) -> Response<BoxBody> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// OpenAI's 400 for a request the mock cannot read.
fn bad_request(message: &str) -> Response<BoxBody> {
    error(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        "invalid_request",
    )
}

/// The request's `model`, or the mock's own name for it.
fn model_of(request: &Value) -> String {
    request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-large")
        .to_owned()
}

fn error(status: StatusCode, message: &str, kind: &str, code: &str) -> Response<BoxBody> {
    let mut resp = json_response(
        status,
        &json!({"error": {"message": message, "type": kind, "param": null, "code": code}}),
    );
    if status == StatusCode::TOO_MANY_REQUESTS {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_splits_into_requested_chunks() {
        let words = ["a", "b", "c", "d", "e"];
        assert_eq!(split_content(&words, None), ["a", " b", " c", " d", " e"]);
        assert_eq!(split_content(&words, Some(2)), ["a b c", " d e"]);
        assert_eq!(split_content(&words, Some(99)).concat(), "a b c d e");
        assert!(split_content(&[], Some(3)).is_empty());
    }

    #[test]
    fn tokens_are_words() {
        assert_eq!(count_tokens("  Say hello   to me "), 4);
        assert_eq!(
            content_text(&json!([{"type": "text", "text": "a b"}, {"text": "c"}])),
            "a b c"
        );
    }
}
