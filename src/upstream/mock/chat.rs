//! The mock's `POST /v1/chat/completions`: a chat completion, or its
//! stream of chunks (with the usage chunk when `stream_options` asks).

use bytes::Bytes;
use http::{Response, StatusCode};
use serde_json::{Value, json};

use super::{
    Answer, MockSettings, bad_request, content_text, count_tokens, json_response, model_of,
    split_content, sse, sse_response, unix_now, usage,
};
use crate::body::BoxBody;

pub(super) fn chat(settings: &MockSettings, request: &Value) -> Response<BoxBody> {
    let Some(messages) = request.get("messages").and_then(Value::as_array) else {
        return bad_request("`messages` is required and must be an array");
    };
    let model = model_of(request);
    // Three tokens of framing per message, as OpenAI's own counting does.
    let prompt_tokens: u64 = messages
        .iter()
        .map(|m| {
            3 + m
                .get("content")
                .map_or(0, |c| count_tokens(&content_text(c)))
        })
        .sum();
    let last_user = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .and_then(|m| m.get("content"))
        .map(content_text)
        .unwrap_or_default();
    let limit = request
        .get("max_completion_tokens")
        .or_else(|| request.get("max_tokens"))
        .and_then(Value::as_u64);
    let answer = Answer::to(&last_user, limit);
    let words = answer.words();
    let finish_reason = answer.finish_reason();
    // `n` choices, each the same answer (OpenAI allows up to 128).
    let n = request
        .get("n")
        .and_then(Value::as_u64)
        .unwrap_or(1)
        .clamp(1, 128);
    let completion_tokens = words.len() as u64 * n;
    let usage = usage(prompt_tokens, completion_tokens);
    let id = format!("chatcmpl-mock{:016x}", fastrand::u64(..));
    let created = unix_now();
    let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
    if !stream {
        return json_response(
            StatusCode::OK,
            &json!({
                "id": id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": (0..n).map(|index| json!({
                    "index": index,
                    "message": {"role": "assistant", "content": words.join(" "), "refusal": null},
                    "logprobs": null,
                    "finish_reason": finish_reason,
                })).collect::<Vec<_>>(),
                "usage": usage,
                "system_fingerprint": "fp_sluice_mock",
            }),
        );
    }
    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let chunk = |index: u64, delta: &Value, finish: Option<&str>| -> Bytes {
        let event = json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_sluice_mock",
            "choices": [{"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        sse(&event)
    };
    // With several choices, each step is sent for every choice in turn.
    let pieces = split_content(&words, settings.stream_chunks);
    let mut events = Vec::with_capacity((pieces.len() + 2) * n as usize + 2);
    let role = json!({"role": "assistant", "content": ""});
    events.extend((0..n).map(|i| chunk(i, &role, None)));
    for piece in pieces {
        let delta = json!({ "content": piece });
        events.extend((0..n).map(|i| chunk(i, &delta, None)));
    }
    events.extend((0..n).map(|i| chunk(i, &json!({}), Some(finish_reason))));
    if include_usage {
        events.push(sse(&json!({
            "id": id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_sluice_mock",
            "choices": [],
            "usage": usage,
        })));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    sse_response(events, settings.chunk_interval)
}
