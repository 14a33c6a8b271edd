//! Server-sent events, incrementally: a splitter that finds event
//! boundaries in a byte stream as it passes (bounded buffer, no whole-body
//! collection), and the test for a stream's *preamble*: events that carry
//! no content yet (comments, role-only or empty chat deltas, Anthropic's
//! `message_start`/`ping`), which the failover loop may hold back.

use bytes::{Buf, Bytes, BytesMut};
use serde_json::Value;

/// Finds complete events (ended by a blank line) in pushed chunks.
#[derive(Default)]
pub struct EventSplitter {
    buf: BytesMut,
}

impl EventSplitter {
    pub fn push(&mut self, chunk: &[u8]) {
        self.buf.extend_from_slice(chunk);
    }

    /// The next complete event, without its terminating blank line.
    pub fn next_event(&mut self) -> Option<Bytes> {
        let (end, sep) = find_blank_line(&self.buf)?;
        let event = self.buf.split_to(end).freeze();
        self.buf.advance(sep);
        Some(event)
    }

    /// Bytes waiting for the end of their event.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// The position and length of the first blank-line separator.
fn find_blank_line(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i + 1 < buf.len() {
        match (buf[i], buf[i + 1]) {
            (b'\n', b'\n') => return Some((i, 2)),
            (b'\r', b'\n') if buf[i + 2..].starts_with(b"\r\n") => return Some((i, 4)),
            (b'\n', b'\r') if buf[i + 2..].starts_with(b"\n") => return Some((i, 3)),
            _ => i += 1,
        }
    }
    None
}

/// Whether an event carries no content yet, so that the stream could still
/// be replaced by another upstream's without the client noticing.
pub fn is_preamble(event: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(event) else {
        return false;
    };
    let mut data = String::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
        }
    }
    if data.is_empty() {
        return true; // comments, `event:`, `id:`, `retry:` only
    }
    let Ok(json) = serde_json::from_str::<Value>(&data) else {
        return false; // `[DONE]` or anything unknown: treat as content
    };
    if let Some(kind) = json.get("type").and_then(Value::as_str) {
        // Anthropic messages stream.
        return matches!(kind, "message_start" | "content_block_start" | "ping");
    }
    match json.get("choices").and_then(Value::as_array) {
        Some(choices) => choices.iter().all(|c| {
            let delta = c.get("delta");
            let empty = |key: &str| {
                delta.and_then(|d| d.get(key)).is_none_or(|v| {
                    v.is_null() || v.as_str() == Some("") || v.as_array().is_some_and(Vec::is_empty)
                })
            };
            c.get("finish_reason").is_none_or(Value::is_null)
                && empty("content")
                && empty("tool_calls")
                && empty("function_call")
                && empty("refusal")
        }),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(!is_preamble(b"data: [DONE]"));
        assert!(!is_preamble(br#"data: {"type":"content_block_delta"}"#));
    }
}
