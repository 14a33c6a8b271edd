//! Server-sent events, incrementally: a splitter that finds event
//! boundaries in a byte stream as it passes (bounded buffer, no whole-body
//! collection), and the test for a stream's *preamble*: events that carry
//! no content yet (comments, role-only or empty chat deltas, Anthropic's
//! `message_start`/`ping`), which the failover loop may hold back.

use std::borrow::Cow;
use std::sync::LazyLock;

use bytes::{Bytes, BytesMut};
use memchr::memmem::Finder;
use serde_json::Value;

use super::facts;
use super::splice::{self, Member, span_of};

/// Finds complete events (ended by a blank line) in pushed chunks.
#[derive(Default)]
pub struct EventSplitter {
    buf: BytesMut,
    /// Bytes at the start of `buf` already looked through for a blank
    /// line: an event arriving in many frames is not scanned again from
    /// its start on every one.
    scanned: usize,
}

impl EventSplitter {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete event, without its terminating blank line.
    pub fn next_event(&mut self) -> Option<Bytes> {
        self.next_event_raw().map(|(end, mut raw)| {
            raw.truncate(end);
            raw.freeze()
        })
    }

    /// The next complete event's bytes as they came, blank line included,
    /// and where the event ends in them. Left unfrozen, so that events
    /// taken one after another from the same buffer join again without a
    /// copy (`BytesMut::unsplit`).
    pub fn next_event_raw(&mut self) -> Option<(usize, BytesMut)> {
        // A separator is at most 4 bytes: one not found yet starts in the
        // last 3 bytes scanned or after them.
        let from = self.scanned.saturating_sub(3);
        let Some((end, sep)) = find_blank_line(&self.buf[from..]) else {
            self.scanned = self.buf.len();
            return None;
        };
        let end = from + end;
        self.scanned = 0;
        Some((end, self.buf.split_to(end + sep)))
    }

    /// Bytes waiting for the end of their event.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Takes the bytes of an unterminated last event.
    pub fn take_pending(&mut self) -> Bytes {
        self.scanned = 0;
        self.buf.split().freeze()
    }

    /// Takes the bytes of an event too long to hold, but its last three,
    /// where its separator may have begun: the end of the event is still
    /// found, and the events after it read.
    pub fn take_pending_but_tail(&mut self) -> Bytes {
        self.scanned = 0;
        let cut = self.buf.len().saturating_sub(SEPARATOR_TAIL);
        let taken = self.buf.split_to(cut).freeze();
        // The tail moves to a buffer of its own: the grown one goes with
        // what was taken, and is freed once that is sent.
        self.buf = BytesMut::from(&self.buf[..]);
        taken
    }
}

/// The bytes an event's separator may have begun in: one not found yet
/// is at most 4 bytes long.
pub const SEPARATOR_TAIL: usize = 3;

/// The position and length of the first blank-line separator: a line
/// end right after a line end, where a line ends in CRLF, LF or a lone
/// CR (WHATWG's SSE grammar). A CR ending a line at the end of `buf`
/// waits for the next byte (a LF may follow and belong to it); a CR
/// ending the blank line there does not: the event is complete either
/// way, and a LF that follows starts the next event's bytes as an empty
/// line, which readers skip.
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(found) = memchr::memchr2(b'\n', b'\r', &buf[from..]) {
        let i = from + found;
        let first = match (buf[i], buf.get(i + 1)) {
            (b'\r', None) => return None,
            (b'\r', Some(b'\n')) => 2,
            _ => 1,
        };
        let j = i + first;
        match buf.get(j) {
            Some(b'\n') => return Some((i, first + 1)),
            Some(b'\r') => {
                let second = if buf.get(j + 1) == Some(&b'\n') { 2 } else { 1 };
                return Some((i, first + second));
            }
            Some(_) => from = j,
            None => return None,
        }
    }
    None
}

/// Whether a content type is an SSE stream.
pub fn is_event_stream(content_type: &[u8]) -> bool {
    has_media_type(content_type, b"text/event-stream")
}

/// Whether `content_type` is of `media_type` (lower case), parameters
/// aside: media types are case-insensitive (RFC 9110 §8.3.1), and an
/// upstream may well send `Text/Event-Stream`.
pub fn has_media_type(content_type: &[u8], media_type: &[u8]) -> bool {
    content_type
        .get(..media_type.len())
        .is_some_and(|head| head.eq_ignore_ascii_case(media_type))
        && matches!(
            content_type.get(media_type.len()),
            None | Some(b';' | b' ' | b'\t')
        )
}

/// Whether an event has an `event:` line (a name).
pub fn has_event_name(event: &[u8]) -> bool {
    lines(event).any(|line| line.starts_with(b"event:"))
}

/// The payload of an event: its `data:` lines, joined by newlines as the
/// SSE spec says, borrowed from the event when it has just one (the usual
/// case). Empty for an event with none (comments, `event:`, `id:` only).
pub fn event_payload(event: &[u8]) -> Cow<'_, [u8]> {
    let mut data_lines = lines(event)
        .filter_map(|line| line.strip_prefix(b"data:"))
        .map(|rest| {
            let rest = rest.strip_suffix(b"\r").unwrap_or(rest);
            rest.strip_prefix(b" ").unwrap_or(rest)
        });
    let Some(first) = data_lines.next() else {
        return Cow::Borrowed(&[]);
    };
    let Some(second) = data_lines.next() else {
        return Cow::Borrowed(first);
    };
    let mut joined = [first, second].join(&b'\n');
    for line in data_lines {
        joined.push(b'\n');
        joined.extend_from_slice(line);
    }
    Cow::Owned(joined)
}

/// The lines of an event, split at CR and at LF (a CRLF gives an empty
/// line between them, which no reader takes for anything), found by
/// memchr (a chunk's one line is a few hundred bytes).
fn lines(event: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(event);
    std::iter::from_fn(move || {
        let text = rest?;
        match memchr::memchr2(b'\n', b'\r', text) {
            Some(end) => {
                rest = Some(&text[end + 1..]);
                Some(&text[..end])
            }
            None => {
                rest = None;
                Some(text)
            }
        }
    })
}

/// Whether an event's payload (its data) is the last of a stream: OpenAI's
/// `[DONE]`, Anthropic's `message_stop`, the responses API's final
/// `response.completed` / `incomplete` / `failed`. Read by prefix, as these
/// APIs write them: every event of a stream passes here.
pub fn is_last_event(payload: &[u8]) -> bool {
    if payload == b"[DONE]" {
        return true;
    }
    // `{"type":"…` as compact writers send it, or with blanks around the
    // colon (Python's `json.dumps`).
    let kind = payload
        .strip_prefix(b"{")
        .map(<[u8]>::trim_ascii_start)
        .and_then(|p| p.strip_prefix(b"\"type\""))
        .map(<[u8]>::trim_ascii_start)
        .and_then(|p| p.strip_prefix(b":"))
        .map(<[u8]>::trim_ascii_start)
        .and_then(|p| p.strip_prefix(b"\""));
    let Some(kind) = kind else {
        return false;
    };
    [
        &b"message_stop\""[..],
        b"response.completed\"",
        b"response.incomplete\"",
        b"response.failed\"",
    ]
    .iter()
    .any(|last| kind.starts_with(last))
}

/// Whether an event reports an error instead of content: OpenAI's
/// `{"error": {...}}`, Anthropic's and the responses API's `"type":
/// "error"` (or `response.failed`). Read only while a pool route holds a
/// stream's preamble, so the parse is rare.
pub fn is_error_event(event: &[u8]) -> bool {
    let data = event_payload(event);
    if memchr::memmem::find(&data, b"error").is_none()
        && memchr::memmem::find(&data, b"failed").is_none()
    {
        return false;
    }
    let Ok(json) = serde_json::from_slice::<Value>(&data) else {
        return false;
    };
    json.get("error").is_some_and(|e| !e.is_null())
        || matches!(
            json.get("type").and_then(Value::as_str),
            Some("error" | "response.failed")
        )
}

/// Whether an event carries no content yet, so that the stream could still
/// be replaced by another upstream's without the client noticing.
pub fn is_preamble(event: &[u8]) -> bool {
    let data = event_payload(event);
    if data.is_empty() {
        return true; // comments, `event:`, `id:`, `retry:` only
    }
    let Ok(json) = serde_json::from_slice::<Value>(&data) else {
        return false; // `[DONE]` or anything unknown: treat as content
    };
    if let Some(kind) = json.get("type").and_then(Value::as_str) {
        let empty_text = |v: Option<&Value>| {
            v.and_then(|p| p.get("text"))
                .is_none_or(|t| t.is_null() || t.as_str() == Some(""))
        };
        return match kind {
            // Anthropic's messages stream.
            "message_start" | "content_block_start" | "ping" => true,
            // OpenAI's responses API: the answer and its message opened,
            // with no text yet. A function call or reasoning item opening
            // is the answer itself.
            "response.created" | "response.queued" | "response.in_progress" => true,
            "response.output_item.added" => {
                json.get("item")
                    .and_then(|i| i.get("type"))
                    .and_then(Value::as_str)
                    == Some("message")
            }
            "response.content_part.added" => empty_text(json.get("part")),
            _ => false,
        };
    }
    match json.get("choices").and_then(Value::as_array) {
        Some(choices) => choices.iter().all(|c| {
            let delta = c.get("delta");
            let empty = |key: &str| {
                delta.and_then(|d| d.get(key)).is_none_or(|v| {
                    v.is_null() || v.as_str() == Some("") || v.as_array().is_some_and(Vec::is_empty)
                })
            };
            // Legacy completions stream their text in `choices[].text`.
            let no_text = c
                .get("text")
                .is_none_or(|v| v.is_null() || v.as_str() == Some(""));
            // Anything a delta holds besides its role is the answer: its
            // text, tool calls, a refusal, and also the reasoning
            // (`reasoning_content`, `reasoning`) or audio some servers
            // stream before any text.
            let delta_empty = delta
                .and_then(Value::as_object)
                .is_none_or(|d| d.iter().all(|(key, _)| key == "role" || empty(key)));
            c.get("finish_reason").is_none_or(Value::is_null) && no_text && delta_empty
        }),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_events_and_error_events_are_told() {
        for last in [
            &b"[DONE]"[..],
            br#"{"type":"message_stop"}"#,
            br#"{ "type" : "message_stop"}"#,
            br#"{"type": "response.completed", "response": {}}"#,
            br#"{"type":"response.completed","response":{}}"#,
            br#"{"type":"response.failed","response":{}}"#,
        ] {
            assert!(is_last_event(last), "{}", String::from_utf8_lossy(last));
        }
        for other in [
            &br#"{"type":"message_delta"}"#[..],
            br#"{"choices":[]}"#,
            br#"{"type":"response.output_text.delta"}"#,
        ] {
            assert!(!is_last_event(other));
        }
        assert!(is_error_event(br#"data: {"error":{"message":"x"}}"#));
        assert!(is_error_event(br#"data: {"type":"error","error":{}}"#));
        assert!(!is_error_event(br#"data: {"error":null,"choices":[]}"#));
        assert!(!is_error_event(
            br#"data: {"choices":[{"delta":{"content":"an error"}}]}"#
        ));
    }

    #[test]
    fn responses_api_stream_opens_with_a_preamble() {
        for event in [
            r#"event: response.created
data: {"type":"response.created","response":{"id":"r","status":"in_progress","output":[]}}"#,
            r#"data: {"type":"response.in_progress","response":{"id":"r"}}"#,
            r#"data: {"type":"response.output_item.added","item":{"type":"message","role":"assistant","content":[]}}"#,
            r#"data: {"type":"response.content_part.added","part":{"type":"output_text","text":""}}"#,
        ] {
            assert!(is_preamble(event.as_bytes()), "{event}");
        }
        for event in [
            r#"data: {"type":"response.output_text.delta","delta":"Hi"}"#,
            r#"data: {"type":"response.output_item.added","item":{"type":"function_call","name":"f"}}"#,
            r#"data: {"type":"response.completed","response":{"id":"r"}}"#,
        ] {
            assert!(!is_preamble(event.as_bytes()), "{event}");
        }
    }

    #[test]
    fn splits_events_across_chunks() {
        let mut s = EventSplitter::default();
        s.push(b"data: a\n\ndata: b");
        assert_eq!(s.next_event().as_deref(), Some(&b"data: a"[..]));
        assert_eq!(s.next_event(), None);
        assert_eq!(s.pending(), 7);
        s.push(b"\r\n\r\n: comment\n\n");
        assert_eq!(s.next_event().as_deref(), Some(&b"data: b"[..]));
        assert_eq!(s.next_event().as_deref(), Some(&b": comment"[..]));
        assert_eq!(s.next_event(), None);
    }

    #[test]
    fn events_fed_a_byte_at_a_time_read_as_when_whole() {
        let stream =
            b"data: a\r\n\r\n: c\n\ndata: b\n\r\nid: 1\ndata: x\r\n\r\ndata: y\rdata: z\r\rtail";
        // What a reader takes from each event, and every byte passed on.
        let read = |events: &[(usize, BytesMut)]| {
            let payloads: Vec<Vec<u8>> = events
                .iter()
                .map(|(end, raw)| event_payload(&raw[..*end]).into_owned())
                .filter(|payload| !payload.is_empty())
                .collect();
            let bytes: Vec<u8> = events.iter().flat_map(|(_, raw)| raw.to_vec()).collect();
            (payloads, bytes)
        };
        let mut whole = EventSplitter::default();
        whole.push(stream);
        let expected: Vec<_> = std::iter::from_fn(|| whole.next_event_raw()).collect();
        assert_eq!(expected.len(), 5);
        let mut bytewise = EventSplitter::default();
        let mut got = Vec::new();
        for &b in stream {
            bytewise.push(&[b]);
            got.extend(std::iter::from_fn(|| bytewise.next_event_raw()));
        }
        assert_eq!(read(&got), read(&expected));
        let (payloads, _) = read(&expected);
        assert_eq!(payloads, [&b"a"[..], b"b", b"x", b"y\nz"]);
        assert_eq!(&bytewise.take_pending()[..], b"tail");
    }

    #[test]
    fn blank_lines_are_found_as_a_byte_by_byte_scan_finds_them() {
        // Line ends read one at a time from the start.
        fn reference(buf: &[u8]) -> Option<(usize, usize)> {
            let line_end = |at: usize| match &buf[at..] {
                [b'\r'] => Err(()),
                [b'\r', b'\n', ..] => Ok(2),
                [b'\r' | b'\n', ..] => Ok(1),
                _ => Ok(0),
            };
            let mut i = 0;
            while i < buf.len() {
                match line_end(i) {
                    Err(()) => return None,
                    Ok(0) => i += 1,
                    Ok(first) => match &buf[i + first..] {
                        [] => return None,
                        [b'\r', b'\n', ..] => return Some((i, first + 2)),
                        [b'\r' | b'\n', ..] => return Some((i, first + 1)),
                        _ => i += first,
                    },
                }
            }
            None
        }
        // Every string of up to 7 bytes over `a`, CR and LF.
        for len in 0..=7u32 {
            for n in 0..3usize.pow(len) {
                let buf: Vec<u8> = (0..len)
                    .map(|k| [b'a', b'\r', b'\n'][n / 3usize.pow(k) % 3])
                    .collect();
                assert_eq!(find_blank_line(&buf), reference(&buf), "{buf:?}");
            }
        }
    }

    #[test]
    fn preamble_versus_content() {
        let role = br#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
        let text =
            br#"data: {"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}"#;
        let tool = br#"data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0}]}}]}"#;
        let stop = br#"data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;
        assert!(is_preamble(role));
        assert!(is_preamble(b": keep-alive"));
        assert!(is_preamble(
            br#"data: {"type":"message_start","message":{}}"#
        ));
        assert!(!is_preamble(text));
        assert!(!is_preamble(tool));
        assert!(!is_preamble(stop));
        // Reasoning streamed before any text (DeepSeek, vLLM) is the answer.
        assert!(!is_preamble(
            br#"data: {"choices":[{"index":0,"delta":{"content":null,"reasoning_content":"Let me"},"finish_reason":null}]}"#
        ));
        assert!(is_preamble(
            br#"data: {"choices":[{"index":0,"delta":{"role":"assistant","content":null,"reasoning_content":""},"finish_reason":null}]}"#
        ));
        assert!(!is_preamble(b"data: [DONE]"));
        // Legacy completions: text in `choices[].text`.
        assert!(!is_preamble(
            br#"data: {"object":"text_completion","choices":[{"text":"Hi","index":0,"finish_reason":null}]}"#
        ));
        assert!(is_preamble(
            br#"data: {"object":"text_completion","choices":[{"text":"","index":0,"finish_reason":null}]}"#
        ));
        assert!(!is_preamble(br#"data: {"type":"content_block_delta"}"#));
    }
}

/// For a streamed chat or text completion that did not ask for usage, the body
/// with `stream_options.include_usage` set, so the upstream reports it;
/// `None` when the request is not such a stream or already asks.
///
/// The client's bytes are kept as they are: the option is spliced in (or
/// `stream_options` alone rewritten), never the whole request
/// re-serialized, so a long conversation costs one scan, and its key
/// order and number spellings reach the upstream unchanged.
pub fn ask_for_usage(body: &[u8]) -> Option<Bytes> {
    // Most requests do not stream: skip parsing them.
    static STREAM: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"stream\""));
    STREAM.find(body)?;
    let Some(request) = facts::parse::<StreamRequest>(body) else {
        return ask_for_usage_rewriting(body);
    };
    if request.stream != Some(true) {
        return None;
    }
    let (range, options): (_, Cow<'_, [u8]>) = match request.stream_options.0 {
        // Absent: added as the last member.
        None => {
            let close = body.iter().rposition(|b| !b.is_ascii_whitespace())?;
            (
                close..close,
                Cow::Borrowed(br#","stream_options":{"include_usage":true}"#),
            )
        }
        Some(null) if null.get() == "null" => (
            span_of(body, null.get())?,
            Cow::Borrowed(br#"{"include_usage":true}"#),
        ),
        Some(raw) => {
            let mut options = serde_json::from_str(raw.get()).ok()?;
            if !set_include_usage(&mut options) {
                return None;
            }
            (
                span_of(body, raw.get())?,
                Cow::Owned(serde_json::to_vec(&options).ok()?),
            )
        }
    };
    Some(splice::spliced(body, range, &options))
}

/// [`ask_for_usage`] for a body the typed view refuses: a member written
/// twice, which upstreams read as its last value, as `Value` does. A
/// client must not dodge metering that way. The whole body is rewritten.
fn ask_for_usage_rewriting(body: &[u8]) -> Option<Bytes> {
    let mut json: Value = serde_json::from_slice(body).ok()?;
    if json.get("stream").and_then(Value::as_bool) != Some(true) {
        return None;
    }
    let options = json
        .as_object_mut()?
        .entry("stream_options")
        .or_insert(Value::Null);
    if options.is_null() {
        *options = Value::Object(serde_json::Map::new());
    }
    if !set_include_usage(options.as_object_mut()?) {
        return None;
    }
    serde_json::to_vec(&json).ok().map(Bytes::from)
}

/// Sets `include_usage` in a `stream_options` object; false when it was
/// already asked for.
fn set_include_usage(options: &mut serde_json::Map<String, Value>) -> bool {
    if options.get("include_usage").and_then(Value::as_bool) == Some(true) {
        return false;
    }
    options.insert("include_usage".to_owned(), Value::Bool(true));
    true
}

/// The members of a chat request that say whether it streams and asks
/// for usage; the rest (the conversation) is skipped, not built.
#[derive(serde::Deserialize)]
struct StreamRequest<'a> {
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow, default)]
    stream_options: Member<'a>,
}

#[cfg(test)]
mod payload_tests {
    use super::*;

    #[test]
    fn event_payloads() {
        assert!(matches!(event_payload(b"data: {}"), Cow::Borrowed(b"{}")));
        assert!(matches!(
            event_payload(b"event: ping\r\ndata:{\"a\":1}\r\nid: 7"),
            Cow::Borrowed(br#"{"a":1}"#)
        ));
        assert_eq!(&*event_payload(b"data: a\ndata:  b\ndata: c"), b"a\n b\nc");
        assert!(event_payload(b": comment").is_empty());
    }

    #[test]
    fn usage_is_asked_for_only_when_missing() {
        let asked = |body: &str| {
            ask_for_usage(body.as_bytes()).map(|b| String::from_utf8(b.to_vec()).unwrap())
        };
        // Spliced in; every other byte (key order, spacing, number
        // spellings) is the client's.
        assert_eq!(
            asked("{\"stream\": true, \"seed\": 1e3, \"messages\": [{\"content\":\"}\"}]} \n")
                .as_deref(),
            Some(
                "{\"stream\": true, \"seed\": 1e3, \"messages\": [{\"content\":\"}\"}],\"stream_options\":{\"include_usage\":true}} \n"
            )
        );
        // Other options are kept; only stream_options is rewritten.
        assert_eq!(
            asked(r#"{"stream_options":{"include_usage":false,"x":[1]},"stream":true,"n":2}"#)
                .as_deref(),
            Some(r#"{"stream_options":{"include_usage":true,"x":[1]},"stream":true,"n":2}"#)
        );
        // A null stream_options is replaced, not left beside a second one.
        assert_eq!(
            asked(r#"{"stream":true,"stream_options":null,"n":2}"#).as_deref(),
            Some(r#"{"stream":true,"stream_options":{"include_usage":true},"n":2}"#)
        );
        for not_asked in [
            r#"{"stream":true,"stream_options":{"include_usage":true}}"#,
            r#"{"stream":false,"messages":[]}"#,
            r#"{"stream":"true"}"#,
            r#"{"stream":true,"stream_options":"x"}"#,
            r#"[true]"#,
            r#"{"messages":[]}"#,
            "not json",
            r#"{"stream":true"#,
        ] {
            assert_eq!(asked(not_asked), None, "{not_asked}");
        }
        // A member written twice counts by its last value, as upstreams
        // read it: no dodging usage with a duplicate.
        for twice in [
            r#"{"stream":false,"stream":true,"messages":[]}"#,
            r#"{"stream":true,"stream_options":{"include_usage":true},"stream_options":{}}"#,
        ] {
            let v: Value = serde_json::from_str(&asked(twice).expect(twice)).unwrap();
            assert_eq!(v["stream_options"]["include_usage"], true, "{twice}");
        }
        assert_eq!(asked(r#"{"stream":true,"stream":false}"#), None);
        // What is sent is JSON with the option set.
        let v: Value =
            serde_json::from_str(&asked(r#"{"stream":true,"messages":[]}"#).unwrap()).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
    }
}
