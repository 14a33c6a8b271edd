//! Usage metering of LLM responses as they pass: tokens, model and finish
//! reason, from OpenAI (`usage.prompt_tokens`/`completion_tokens`, or
//! `input_tokens`/`output_tokens` of the responses API) and Anthropic
//! (`message_start`/`message_delta`) shapes, in JSON bodies and SSE
//! streams. A JSON body's frames are kept by reference (up to a cap) for
//! parsing at its end, a stream is parsed event by event.

use std::borrow::Cow;

use bytes::Bytes;
use serde_json::Value;

use super::sse::{self, EventSplitter, event_json};
use crate::body::Joined;

/// JSON bodies larger than this are not metered (they are not LLM answers).
const JSON_CAP: usize = 4 << 20;

/// What a response reported.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Usage {
    pub model: Option<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub finish_reason: Option<String>,
    /// A stream carried an error event (it may still end normally): not
    /// an answer to keep in the cache.
    pub stream_error: bool,
}

/// Observes one response body.
pub enum Meter {
    Json(JsonFrames),
    Sse(EventSplitter, Usage),
}

impl Meter {
    /// A meter for a response of this content type, if it is one we read.
    pub fn for_content_type(content_type: &[u8]) -> Option<Meter> {
        if sse::is_event_stream(content_type) {
            Some(Meter::Sse(EventSplitter::default(), Usage::default()))
        } else if content_type.starts_with(b"application/json") {
            Some(Meter::Json(JsonFrames::default()))
        } else {
            None
        }
    }

    pub fn observe(&mut self, data: &Bytes) {
        match self {
            Meter::Json(frames) => frames.push(data),
            Meter::Sse(splitter, usage) => {
                splitter.push(data);
                while let Some(event) = splitter.next_event() {
                    if let Some(json) = event_json(&event) {
                        absorb(usage, &json);
                    }
                }
            }
        }
    }

    pub fn finish(self) -> Usage {
        match self {
            Meter::Json(frames) => frames.usage(),
            Meter::Sse(_, usage) => usage,
        }
    }
}

/// A JSON body as it passes, joined (shared when in one frame) up to
/// `JSON_CAP`.
#[derive(Default)]
pub struct JsonFrames {
    joined: Joined,
    /// Past `JSON_CAP`: not metered at all (a partial document is not one).
    over_cap: bool,
}

impl JsonFrames {
    fn push(&mut self, data: &Bytes) {
        if self.over_cap {
            return;
        }
        if self.joined.len() + data.len() > JSON_CAP {
            self.joined = Joined::default();
            self.over_cap = true;
            return;
        }
        self.joined.push(data);
    }

    fn usage(&self) -> Usage {
        if self.over_cap {
            return Usage::default();
        }
        from_json_body(self.joined.as_slice())
    }
}

/// The fields of a whole JSON answer that metering needs; the rest of the
/// document is skipped without being built. Strings are borrowed from the
/// body where they hold no escapes, and `choices` is walked rather than
/// collected: only its first `finish_reason` is kept.
#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct Answer<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    usage: Option<AnswerUsage>,
    choices: FirstFinishReason<'a>,
    #[serde(borrow)]
    stop_reason: Option<Cow<'a, str>>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct AnswerUsage {
    prompt_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
struct AnswerChoice<'a> {
    #[serde(borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

/// The first non-null `finish_reason` of a `choices` array.
#[derive(Default)]
struct FirstFinishReason<'a>(Option<Cow<'a, str>>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for FirstFinishReason<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Choices;
        impl<'de> serde::de::Visitor<'de> for Choices {
            type Value = FirstFinishReason<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of choices")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut first = None;
                while let Some(choice) = seq.next_element::<AnswerChoice<'de>>()? {
                    if first.is_none() {
                        first = choice.finish_reason;
                    }
                }
                Ok(FirstFinishReason(first))
            }
        }
        d.deserialize_seq(Choices)
    }
}

fn from_json_body(body: &[u8]) -> Usage {
    let Ok(answer) = serde_json::from_slice::<Answer>(body) else {
        return Usage::default();
    };
    let usage = answer.usage.unwrap_or_default();
    Usage {
        model: answer.model.map(Cow::into_owned),
        input_tokens: usage.prompt_tokens.or(usage.input_tokens),
        output_tokens: usage.completion_tokens.or(usage.output_tokens),
        finish_reason: answer.choices.0.or(answer.stop_reason).map(Cow::into_owned),
        stream_error: false,
    }
}

/// Folds one JSON object (a whole body or one stream event) into `usage`.
fn absorb(usage: &mut Usage, json: &Value) {
    // OpenAI's `{"error": {...}}`, Anthropic's `{"type": "error", ...}`.
    if json.get("error").is_some_and(|e| !e.is_null())
        || json.get("type").and_then(Value::as_str) == Some("error")
    {
        usage.stream_error = true;
    }
    // Anthropic streams wrap the message in `message_start`, the OpenAI
    // responses API its answer in `response.completed`.
    let body = json
        .get("message")
        .or_else(|| json.get("response"))
        .filter(|m| m.is_object())
        .unwrap_or(json);
    // Every chunk of a stream repeats the model: copied once, not per chunk.
    if let Some(model) = body.get("model").and_then(Value::as_str)
        && usage.model.as_deref() != Some(model)
    {
        usage.model = Some(model.to_owned());
    }
    if let Some(u) = body
        .get("usage")
        .or_else(|| json.get("usage"))
        .filter(|u| u.is_object())
    {
        let num = |k: &str| u.get(k).and_then(Value::as_u64);
        if let Some(n) = num("prompt_tokens").or_else(|| num("input_tokens")) {
            usage.input_tokens = Some(n);
        }
        if let Some(n) = num("completion_tokens").or_else(|| num("output_tokens")) {
            usage.output_tokens = Some(n);
        }
    }
    let reason = json
        .get("choices")
        .and_then(Value::as_array)
        .and_then(|c| {
            c.iter()
                .find_map(|c| c.get("finish_reason").and_then(Value::as_str))
        })
        .or_else(|| body.get("stop_reason").and_then(Value::as_str))
        .or_else(|| json.pointer("/delta/stop_reason").and_then(Value::as_str));
    if let Some(reason) = reason {
        usage.finish_reason = Some(reason.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(m: &mut Meter, data: &[u8]) {
        m.observe(&Bytes::copy_from_slice(data));
    }

    #[test]
    fn a_json_answer_in_tiny_frames_is_metered() {
        let body = br#"{"model":"gpt-4o","usage":{"prompt_tokens":3,"completion_tokens":5}}"#;
        let mut m = Meter::for_content_type(b"application/json").unwrap();
        for byte in body.chunks(1) {
            feed(&mut m, byte);
        }
        let usage = m.finish();
        assert_eq!(usage.input_tokens, Some(3));
        assert_eq!(usage.output_tokens, Some(5));
    }

    #[test]
    fn a_json_answer_over_the_cap_is_not_metered() {
        let mut m = Meter::for_content_type(b"application/json").unwrap();
        feed(&mut m, br#"{"usage":{"prompt_tokens":3},"pad":""#);
        let pad = vec![b'x'; 64 * 1024];
        for _ in 0..(JSON_CAP / pad.len() + 1) {
            feed(&mut m, &pad);
        }
        feed(&mut m, br#""}"#);
        assert_eq!(m.finish(), Usage::default());
    }

    #[test]
    fn openai_json() {
        let mut m = Meter::for_content_type(b"application/json").unwrap();
        let body = br#"{"model":"gpt-4o-mini","choices":[{"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":9}}"#;
        feed(&mut m, &body[..20]);
        feed(&mut m, &body[20..]);
        assert_eq!(
            m.finish(),
            Usage {
                model: Some("gpt-4o-mini".into()),
                input_tokens: Some(5),
                output_tokens: Some(9),
                finish_reason: Some("stop".into()),
                stream_error: false,
            }
        );
    }

    #[test]
    fn json_answer_with_escaped_strings_and_several_choices() {
        // The model name holds an escape (so it cannot be borrowed), the
        // first choice has no finish reason yet, the later ones do.
        let body = br#"{"model":"ft:gpt-4o\/acme","choices":[{"finish_reason":null,"message":{"content":"a \"quote\""}},{"finish_reason":"length"},{"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        let usage = from_json_body(body);
        assert_eq!(usage.model.as_deref(), Some("ft:gpt-4o/acme"));
        assert_eq!(usage.finish_reason.as_deref(), Some("length"));
        assert_eq!(
            (usage.input_tokens, usage.output_tokens),
            (Some(1), Some(2))
        );
        // A `choices` that is not an array is not an OpenAI answer.
        assert_eq!(
            from_json_body(br#"{"model":"m","choices":{}}"#),
            Usage::default()
        );
    }

    #[test]
    fn an_error_event_marks_the_stream() {
        let mut m = Meter::for_content_type(b"text/event-stream").unwrap();
        feed(
            &mut m,
            b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n",
        );
        feed(
            &mut m,
            b"data: {\"error\":{\"message\":\"overloaded\"}}\n\ndata: [DONE]\n\n",
        );
        assert!(m.finish().stream_error);
    }

    #[test]
    fn openai_stream_with_usage_chunk() {
        let mut m = Meter::for_content_type(b"text/event-stream").unwrap();
        feed(&mut m, b"data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n");
        feed(&mut m, b"data: {\"model\":\"m\",\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}\n\ndata: {\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,");
        feed(&mut m, b"\"completion_tokens\":4}}\n\ndata: [DONE]\n\n");
        let u = m.finish();
        assert_eq!((u.input_tokens, u.output_tokens), (Some(3), Some(4)));
        assert_eq!(u.finish_reason.as_deref(), Some("length"));
    }

    #[test]
    fn anthropic_stream() {
        let mut m = Meter::for_content_type(b"text/event-stream").unwrap();
        feed(&mut m, b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n");
        feed(&mut m, b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n");
        let u = m.finish();
        assert_eq!(u.model.as_deref(), Some("claude"));
        assert_eq!((u.input_tokens, u.output_tokens), (Some(25), Some(15)));
        assert_eq!(u.finish_reason.as_deref(), Some("end_turn"));
    }

    #[test]
    fn responses_api_stream() {
        let mut m = Meter::for_content_type(b"text/event-stream").unwrap();
        feed(&mut m, b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n");
        feed(&mut m, b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"model\":\"gpt-4.1\",\"usage\":{\"input_tokens\":9,\"output_tokens\":3}}}\n\n");
        let u = m.finish();
        assert_eq!(u.model.as_deref(), Some("gpt-4.1"));
        assert_eq!((u.input_tokens, u.output_tokens), (Some(9), Some(3)));
    }

    #[test]
    fn responses_api_json() {
        let mut m = Meter::for_content_type(b"application/json; charset=utf-8").unwrap();
        feed(
            &mut m,
            br#"{"model":"gpt-4.1","usage":{"input_tokens":7,"output_tokens":2}}"#,
        );
        let u = m.finish();
        assert_eq!((u.input_tokens, u.output_tokens), (Some(7), Some(2)));
    }
}
