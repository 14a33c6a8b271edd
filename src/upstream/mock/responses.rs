//! The mock's `POST /v1/responses` (the SDK's `responses.create`): a
//! `response` object, or its stream of typed events ending with
//! `response.completed`, which carries the usage.

use bytes::Bytes;
use http::{Response, StatusCode};
use serde_json::{Value, json};

use super::{
    Answer, MockSettings, bad_request, content_text, count_tokens, json_response, model_of,
    split_content, sse_response, unix_now,
};
use crate::body::BoxBody;

/// The text of a responses-API `input`: a string, or items (messages with
/// string or part contents); with the token count OpenAI-style framing
/// gives it (three per message).
fn input_text(input: &Value) -> Option<(String, u64)> {
    match input {
        Value::String(s) => Some((s.clone(), count_tokens(s))),
        Value::Array(items) => {
            let mut last_user = String::new();
            let mut tokens = 0;
            for item in items {
                let text = item.get("content").map(content_text).unwrap_or_default();
                tokens += 3 + count_tokens(&text);
                if item.get("role").and_then(Value::as_str) == Some("user") {
                    last_user = text;
                }
            }
            Some((last_user, tokens))
        }
        _ => None,
    }
}

pub(super) fn responses(settings: &MockSettings, request: &Value) -> Response<BoxBody> {
    let Some((input, mut input_tokens)) = request.get("input").and_then(input_text) else {
        return bad_request("`input` is required and must be a string or an array of items");
    };
    if let Some(instructions) = request.get("instructions").and_then(Value::as_str) {
        input_tokens += count_tokens(instructions);
    }
    let model = model_of(request);
    let answer = Answer::to(
        &input,
        request.get("max_output_tokens").and_then(Value::as_u64),
    );
    let words = answer.words();
    let text = words.join(" ");
    let output_tokens = words.len() as u64;
    let id = format!("resp_mock{:016x}", fastrand::u64(..));
    let message_id = format!("msg_mock{:016x}", fastrand::u64(..));
    let created = unix_now();
    let part = |text: &str| json!({"type": "output_text", "text": text, "annotations": []});
    let message = |status: &str, content: Value| {
        json!({
            "id": message_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        })
    };
    let status = if answer.cut {
        "incomplete"
    } else {
        "completed"
    };
    let response = |status: &str, output: Value, usage: Value| {
        json!({
            "id": id,
            "object": "response",
            "created_at": created,
            "status": status,
            "error": null,
            "incomplete_details": if status == "incomplete" {
                json!({"reason": "max_output_tokens"})
            } else {
                Value::Null
            },
            "instructions": request.get("instructions").cloned().unwrap_or(Value::Null),
            "max_output_tokens": request.get("max_output_tokens").cloned().unwrap_or(Value::Null),
            "model": model,
            "output": output,
            "parallel_tool_calls": true,
            "temperature": 1.0,
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "usage": usage,
        })
    };
    let usage = json!({
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    });
    // A message cut by max_output_tokens is itself incomplete.
    let done = response(
        status,
        json!([message(status, json!([part(&text)]))]),
        usage,
    );
    if request.get("stream").and_then(Value::as_bool) != Some(true) {
        return json_response(StatusCode::OK, &done);
    }
    let mut events = Events::default();
    let started = response("in_progress", json!([]), Value::Null);
    events.push("response.created", json!({"response": started.clone()}));
    events.push("response.in_progress", json!({"response": started}));
    events.push(
        "response.output_item.added",
        json!({"output_index": 0, "item": message("in_progress", json!([]))}),
    );
    let at = json!({"item_id": message_id, "output_index": 0, "content_index": 0});
    events.push(
        "response.content_part.added",
        with(&at, json!({"part": part("")})),
    );
    for piece in split_content(&words, settings.stream_chunks) {
        events.push(
            "response.output_text.delta",
            with(&at, json!({"delta": piece, "logprobs": []})),
        );
    }
    events.push(
        "response.output_text.done",
        with(&at, json!({"text": text, "logprobs": []})),
    );
    events.push(
        "response.content_part.done",
        with(&at, json!({"part": part(&text)})),
    );
    events.push(
        "response.output_item.done",
        json!({"output_index": 0, "item": message(status, json!([part(&text)]))}),
    );
    let last = if answer.cut {
        "response.incomplete"
    } else {
        "response.completed"
    };
    events.push(last, json!({"response": done}));
    sse_response(events.0, settings.chunk_interval)
}

/// `base`'s members and `more`'s, in one object.
fn with(base: &Value, more: Value) -> Value {
    let mut out = base.clone();
    if let (Some(out), Value::Object(more)) = (out.as_object_mut(), more) {
        out.extend(more);
    }
    out
}

/// Typed SSE events (`event:` and `data:` lines), numbered in order as
/// the responses API numbers them.
#[derive(Default)]
struct Events(Vec<Bytes>);

impl Events {
    fn push(&mut self, kind: &str, mut data: Value) {
        if let Some(fields) = data.as_object_mut() {
            fields.insert("type".into(), kind.into());
            fields.insert("sequence_number".into(), self.0.len().into());
        }
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(kind.as_bytes());
        out.extend_from_slice(b"\ndata: ");
        // Serializing a `Value` cannot fail.
        let _ = serde_json::to_writer(&mut out, &data);
        out.extend_from_slice(b"\n\n");
        self.0.push(Bytes::from(out));
    }
}
