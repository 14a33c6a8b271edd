//! The mock's `POST /v1/completions` (the legacy text completions the
//! SDK's `completions.create` calls): a `text_completion`, or its stream.

use bytes::Bytes;
use http::{Response, StatusCode};
use serde_json::{Value, json};

use super::{
    Answer, MockSettings, bad_request, count_tokens, json_response, model_of, split_content, sse,
    sse_response, unix_now, usage,
};
use crate::body::BoxBody;

pub(super) fn completions(settings: &MockSettings, request: &Value) -> Response<BoxBody> {
    let prompt = match request.get("prompt") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" "),
        // Token IDs (one prompt, or several): each ID one word, so one
        // token, as it is.
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(is_token_ids) => items
            .iter()
            .flat_map(|item| {
                item.as_array()
                    .map_or_else(|| vec![item], |ids| ids.iter().collect())
            })
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join(" "),
        _ => {
            return bad_request(
                "`prompt` is required and must be a string, an array of strings, or token IDs",
            );
        }
    };
    let model = model_of(request);
    let answer = Answer::to(&prompt, request.get("max_tokens").and_then(Value::as_u64));
    let words = answer.words();
    let finish_reason = answer.finish_reason();
    let prompt_tokens = count_tokens(&prompt);
    let completion_tokens = words.len() as u64;
    let usage = usage(prompt_tokens, completion_tokens);
    let id = format!("cmpl-mock{:016x}", fastrand::u64(..));
    let created = unix_now();
    let choice = |text: &str, finish: Option<&str>| json!([{"text": text, "index": 0, "logprobs": null, "finish_reason": finish}]);
    if request.get("stream").and_then(Value::as_bool) != Some(true) {
        return json_response(
            StatusCode::OK,
            &json!({
                "id": id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": choice(&words.join(" "), Some(finish_reason)),
                "usage": usage,
                "system_fingerprint": "fp_sluice_mock",
            }),
        );
    }
    let chunk = |choices: Value, usage: Option<&Value>| -> Bytes {
        let mut event = json!({
            "id": id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": choices,
            "system_fingerprint": "fp_sluice_mock",
        });
        if let Some(usage) = usage {
            event["usage"] = usage.clone();
        }
        sse(&event)
    };
    let pieces = split_content(&words, settings.stream_chunks);
    let mut events = Vec::with_capacity(pieces.len() + 3);
    for piece in &pieces {
        events.push(chunk(choice(piece, None), None));
    }
    events.push(chunk(choice("", Some(finish_reason)), None));
    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    if include_usage {
        events.push(chunk(json!([]), Some(&usage)));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    sse_response(events, settings.chunk_interval)
}

/// A token ID, or an array of them.
fn is_token_ids(item: &Value) -> bool {
    item.is_u64()
        || item
            .as_array()
            .is_some_and(|ids| ids.iter().all(Value::is_u64))
}
