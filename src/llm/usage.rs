//! Usage metering of LLM responses as they pass: tokens, model and finish
//! reason, from OpenAI (`usage.prompt_tokens`/`completion_tokens`, or
//! `input_tokens`/`output_tokens` of the responses API) and Anthropic
//! (`message_start`/`message_delta`) shapes, in JSON bodies and SSE
//! streams. A JSON body's frames are kept by reference (up to a cap) for
//! parsing at its end, a stream is parsed event by event.

use std::borrow::Cow;

use bytes::{Bytes, BytesMut};

use super::facts::{self, Answer, Facts, MAX_CHOICES};
use super::sse::{self, EventSplitter};
use super::top_level;
use crate::body::Joined;

/// JSON bodies larger than this are not metered (they are not LLM answers).
const JSON_CAP: usize = 4 << 20;

/// What a response reported.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Usage {
    pub model: Option<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    /// Within `input_tokens`: read from the provider's prompt cache.
    pub cache_read_tokens: Option<u64>,
    /// Within `input_tokens`: written to it.
    pub cache_write_tokens: Option<u64>,
    pub finishes: Finishes,
    /// The events of a stream that carried data: each was generated, a
    /// token or more, whether or not the stream lived to report usage.
    pub events: u64,
    /// A stream carried an error event (it may still end normally): not
    /// an answer to keep in the cache.
    pub stream_error: bool,
    /// A JSON answer that is no JSON document (one an upstream cut short
    /// by closing a body without a length): not to keep in the cache.
    pub malformed: bool,
    /// A JSON answer that is an error (an `error` member, not null),
    /// whatever its status said: not an answer to keep in the cache.
    pub failed: bool,
    /// A JSON answer whose members could not be read (not JSON, a byte
    /// order mark before it, a member written twice): what it reported
    /// is unknown, not absent.
    pub unread: bool,
}

/// How an answer's choices ended, by choice index: the reason each gave
/// (`None`: a choice that ended without one). One entry for the APIs that
/// answer once, `n` for a chat request asking for `n` choices.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Finishes(smallvec::SmallVec<[(u64, Option<Cow<'static, str>>); 1]>);

/// The finish reasons the APIs give (OpenAI's chat and completions,
/// Anthropic's, the responses API's statuses and incomplete reasons),
/// kept without an allocation: every answer has one.
const KNOWN_REASONS: [&str; 13] = [
    "stop",
    "length",
    "tool_calls",
    "content_filter",
    "function_call",
    "end_turn",
    "max_tokens",
    "stop_sequence",
    "tool_use",
    "pause_turn",
    "refusal",
    "error",
    "cancelled",
];

fn owned_reason(reason: &str) -> Cow<'static, str> {
    match KNOWN_REASONS.iter().find(|known| **known == reason) {
        Some(known) => Cow::Borrowed(known),
        None => Cow::Owned(reason.to_owned()),
    }
}

impl Finishes {
    /// Records choice `index`'s reason: a stream saying it again keeps
    /// the last, and past [`MAX_CHOICES`] choices more are not recorded.
    fn set(&mut self, index: u64, reason: Option<&str>) {
        let full = self.0.len() >= MAX_CHOICES;
        match self.0.iter_mut().find(|(i, _)| *i == index) {
            Some((_, known)) => *known = reason.map(owned_reason),
            None if !full => self.0.push((index, reason.map(owned_reason))),
            None => {}
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each choice's reason, `None` for a choice that gave none.
    pub fn reasons(&self) -> impl Iterator<Item = Option<&str>> {
        self.0.iter().map(|(_, reason)| reason.as_deref())
    }

    /// The first reason given, for tests of one-choice answers.
    #[cfg(test)]
    fn first(&self) -> Option<&str> {
        self.reasons().flatten().next()
    }
}

/// Observes one response body.
pub enum Meter {
    Json(JsonFrames),
    Sse(SseMeter),
}

impl Meter {
    /// A meter for a response of this content type, if it is one we read.
    pub fn for_content_type(content_type: &[u8]) -> Option<Meter> {
        if sse::is_event_stream(content_type) {
            Some(Meter::Sse(SseMeter::default()))
        } else if sse::has_media_type(content_type, b"application/json") {
            Some(Meter::Json(JsonFrames::default()))
        } else {
            None
        }
    }

    /// Sends a stream on in whole events only, holding the start of one
    /// until it ends (it is usually in the same frame). A stream that
    /// breaks mid-event then never leaves half an event for the client's
    /// parser to join to the error event sluice ends it with.
    pub fn whole_events(&mut self) {
        if let Meter::Sse(stream) = self {
            stream.whole_events = true;
        }
    }

    /// Keeps the usage-only chunk of a stream from the client: sluice
    /// asked for it on the client's behalf (`stream_options`). Implies
    /// [`Meter::whole_events`].
    pub fn strip_usage_chunk(&mut self) {
        if let Meter::Sse(stream) = self {
            stream.whole_events = true;
            stream.strip_usage = true;
        }
    }

    /// Whether frames may come out changed (the usage chunk stripped).
    pub fn strips(&self) -> bool {
        matches!(self, Meter::Sse(stream) if stream.strip_usage)
    }

    /// Reads one frame of the body. `Some` is what the client is to be
    /// sent instead of the frame (possibly nothing), when it differs.
    pub fn observe(&mut self, data: &Bytes) -> Option<Bytes> {
        match self {
            Meter::Json(frames) => {
                frames.push(data);
                None
            }
            Meter::Sse(stream) => stream.observe(data),
        }
    }

    /// Whether the unterminated last event read at the stream's end (by
    /// [`Meter::broke_off`] or [`Meter::finished_with`]) is to be given
    /// up rather than passed on: half an event, or the usage chunk
    /// sluice strips.
    pub fn drops_rest(&self) -> bool {
        matches!(self, Meter::Sse(s) if s.drop_rest)
    }

    /// Whether the stream ended inside an event too long to hold back,
    /// part of which was passed on: what is appended to the stream must
    /// begin with a blank line to be an event of its own.
    pub fn cut_mid_event(&self) -> bool {
        matches!(self, Meter::Sse(s) if s.oversized.is_some())
    }

    /// Whether a stream's last event passed: OpenAI's `[DONE]`,
    /// Anthropic's `message_stop`, the responses API's final event. A
    /// client may hang up then, before the upstream's own end of body
    /// (the OpenAI SDK does): the stream was complete all the same.
    pub fn finished(&self) -> bool {
        matches!(self, Meter::Sse(stream) if stream.finished)
    }

    /// At the upstream's end of body, with `rest` the unterminated last
    /// event held back: whether an LLM API's stream (OpenAI's chat,
    /// completions or responses, Anthropic's messages) broke off there,
    /// having said neither that it was done (`[DONE]`, a final event) nor
    /// how it ended (a finish reason), or ended mid-event. Other SSE (a
    /// local model server's own format) ends as it ends, and so does a
    /// stream that carried the upstream's own error event.
    pub fn broke_off(&mut self, rest: Option<&Bytes>) -> bool {
        let Meter::Sse(stream) = self else {
            return false;
        };
        if stream.usage.stream_error {
            return false;
        }
        let rest = stream.absorb_rest(rest);
        let said_so = stream.finished || !stream.usage.finishes.is_empty();
        !said_so && (stream.api || (rest.is_some() && stream.usage.model.is_some()))
    }

    /// At a break or a stall of the upstream's body, with `rest` the
    /// unterminated last event held back: whether the stream's last
    /// event had passed, `rest` read as one (`data: [DONE]` may come
    /// without its blank line).
    pub fn finished_with(&mut self, rest: Option<&Bytes>) -> bool {
        let Meter::Sse(stream) = self else {
            return false;
        };
        stream.absorb_rest(rest);
        stream.finished
    }

    /// Whether the upstream has generated the whole answer, so that its
    /// rest (the usage a stream sends after its last choice ended) costs
    /// nothing more to read: a JSON answer comes once generated; a
    /// stream, once each of the `choices` the request asked for gave its
    /// finish reason.
    pub fn answer_generated(&self, choices: u64) -> bool {
        match self {
            Meter::Json(_) => true,
            Meter::Sse(stream) => {
                let ended = stream
                    .usage
                    .finishes
                    .reasons()
                    .filter(Option::is_some)
                    .count();
                stream.finished || u64::try_from(ended).is_ok_and(|ended| ended >= choices)
            }
        }
    }

    /// Whether the body reported token counts so far.
    pub fn counted(&self) -> bool {
        let usage = match self {
            Meter::Json(_) => return true,
            Meter::Sse(stream) => &stream.usage,
        };
        usage.input_tokens.is_some() || usage.output_tokens.is_some()
    }

    /// Whether the stream names its events (`event:` lines), as
    /// Anthropic's and the responses API's do.
    pub fn names_events(&self) -> bool {
        matches!(self, Meter::Sse(stream) if stream.named_events)
    }

    /// Whether bytes of an unterminated event are held back.
    pub fn holds(&self) -> bool {
        matches!(self, Meter::Sse(stream) if stream.whole_events && stream.splitter.pending() > 0)
    }

    /// At the end of the body: the start of an unterminated last event
    /// held back, to be sent as it came.
    pub fn take_held(&mut self) -> Option<Bytes> {
        match self {
            Meter::Sse(stream) if stream.whole_events => {
                Some(stream.splitter.take_pending()).filter(|rest| !rest.is_empty())
            }
            _ => None,
        }
    }

    pub fn finish(self) -> Usage {
        match self {
            Meter::Json(frames) => frames.usage(),
            Meter::Sse(stream) => stream.usage,
        }
    }
}

/// A JSON body as it passes, joined (shared when in one frame) up to
/// `JSON_CAP`; past it, only its ends are kept.
#[derive(Default)]
pub struct JsonFrames {
    joined: Joined,
    /// Past `JSON_CAP` (bulk embeddings in base64 get there): the first
    /// and last bytes, where answers put their model and usage.
    over_cap: Option<Ends>,
}

/// How much of each end of an answer over `JSON_CAP` is kept.
const END_BYTES: usize = 64 << 10;

struct Ends {
    head: Bytes,
    /// The last `END_BYTES` at least (at most twice that, trimmed as it
    /// grows).
    tail: BytesMut,
}

impl Ends {
    fn push_tail(&mut self, data: &[u8]) {
        if data.len() >= END_BYTES {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - END_BYTES..]);
            return;
        }
        self.tail.extend_from_slice(data);
        let over = self.tail.len().saturating_sub(END_BYTES);
        if self.tail.len() > 2 * END_BYTES {
            bytes::Buf::advance(&mut self.tail, over);
        }
    }
}

impl JsonFrames {
    fn push(&mut self, data: &Bytes) {
        if let Some(ends) = self.over_cap.as_mut() {
            ends.push_tail(data);
            return;
        }
        if self.joined.len() + data.len() > JSON_CAP {
            let joined = std::mem::take(&mut self.joined).into_bytes();
            // Copied (a slice would keep the whole joined buffer), and
            // filled from this frame too when it carries most of the body.
            let mut head = Vec::with_capacity(END_BYTES);
            head.extend_from_slice(&joined[..joined.len().min(END_BYTES)]);
            head.extend_from_slice(&data[..data.len().min(END_BYTES - head.len())]);
            let mut ends = Ends {
                head: head.into(),
                tail: BytesMut::new(),
            };
            ends.push_tail(&joined[joined.len().saturating_sub(END_BYTES)..]);
            ends.push_tail(data);
            self.over_cap = Some(ends);
            return;
        }
        self.joined.push(data);
    }

    fn usage(&self) -> Usage {
        match &self.over_cap {
            Some(ends) => from_json_ends(&ends.head, &ends.tail),
            None => from_json_body(self.joined.as_slice()),
        }
    }
}

/// The model and token counts of an answer too large to parse whole,
/// read from its ends: the answer's own (top-level) `model`, first from
/// its head (chat, Anthropic and the responses API write it before the
/// content) else from its tail (embeddings write it after), and its own
/// `usage` from its tail (all of them write it last). Members of nested
/// objects (a listed completion's usage, a tool's model) are not the
/// answer's. Finish reasons are not read; nor is a malformed end told
/// apart.
fn from_json_ends(head: &[u8], tail: &[u8]) -> Usage {
    let counts = top_level::from_end(tail, b"usage")
        .filter(|v| v.starts_with(b"{"))
        .and_then(read_one::<facts::Counts>)
        .unwrap_or_default();
    Usage {
        model: top_level::from_start(head, b"model")
            .and_then(json_str)
            .or_else(|| top_level::from_end(tail, b"model").and_then(json_str))
            .map(Cow::into_owned),
        input_tokens: counts.input(),
        output_tokens: counts.output(),
        cache_read_tokens: counts.cache_read(),
        cache_write_tokens: counts.cache_write(),
        ..Usage::default()
    }
}

/// An SSE body, metered event by event as events complete; each event is
/// parsed once, for its usage and for whether it is the chunk to strip.
#[derive(Default)]
pub struct SseMeter {
    splitter: EventSplitter,
    usage: Usage,
    /// Only whole events go on; the start of one is held until it ends.
    whole_events: bool,
    strip_usage: bool,
    /// The stream's last event passed (see [`Meter::finished`]).
    finished: bool,
    /// An event came with an `event:` line (see [`Meter::names_events`]).
    named_events: bool,
    /// An event had the shape of an LLM API's (`choices`, Anthropic's
    /// `message`, the responses API's `response`): its end is known.
    api: bool,
    /// The event being read outgrew `EVENT_CAP`: what came of it was
    /// passed on, so that an event that never ends cannot grow sluice's
    /// memory, but for its ends, read once it ends (see
    /// [`SseMeter::absorb_oversized`]); the events after it are read again.
    oversized: Option<Ends>,
    /// The unterminated last event read at the end is not to be passed
    /// on: half an event, or the usage chunk sluice strips.
    drop_rest: bool,
}

/// How much of the start of an event too long to read is kept: its name
/// and its payload's first members (its `type`).
const OVERSIZED_HEAD: usize = 4 << 10;

/// The longest SSE event read; LLM stream events are a few hundred bytes.
const EVENT_CAP: usize = 1 << 20;

impl SseMeter {
    /// Reads `rest`, the unterminated last event held back, as an event,
    /// as lenient parsers do; the rest when it held more than line ends
    /// (a blank line more than needed, or the LF of a CRLF split from
    /// its CR, cut nothing).
    fn absorb_rest<'r>(&mut self, rest: Option<&'r Bytes>) -> Option<&'r Bytes> {
        let rest = rest.filter(|r| r.iter().any(|b| !matches!(b, b'\r' | b'\n')));
        if self.oversized.is_some() {
            // The end of an event too long to hold, cut before its
            // blank line: whether it was whole cannot be told, so it
            // says nothing (a final event cut short is no final event).
            return rest;
        }
        // Read as an event only when whole: `[DONE]`, or a payload that
        // parses (half a final event does not end a stream). Half an
        // LLM API's event is not passed on, nor the usage chunk sluice
        // strips; other streams (text data, a compressed body) end as
        // they came.
        if let Some(rest) = rest {
            let payload = sse::event_payload(rest);
            let whole = &*payload == b"[DONE]"
                || serde_json::from_slice::<serde::de::IgnoredAny>(&payload).is_ok();
            self.drop_rest = if whole {
                self.absorb_event(rest)
            } else {
                self.api
            };
        }
        rest
    }

    fn observe(&mut self, data: &Bytes) -> Option<Bytes> {
        let out = self.read(data);
        // Past the cap, the rest of the event goes on as it comes (but
        // for the bytes where its end may begin), not held up to the cap
        // again.
        let pending = self.splitter.pending();
        if pending <= EVENT_CAP && (self.oversized.is_none() || pending <= sse::SEPARATOR_TAIL) {
            return out;
        }
        // An image's partial data, a huge delta, a responses stream's
        // final event repeating them: passed on, its ends kept, and the
        // stream's later events still read.
        let held = self.splitter.take_pending_but_tail();
        match self.oversized.as_mut() {
            Some(ends) => ends.push_tail(&held),
            None => {
                let mut ends = Ends {
                    // Copied: a slice would keep the whole held buffer
                    // alive until the event ends.
                    head: Bytes::copy_from_slice(&held[..held.len().min(OVERSIZED_HEAD)]),
                    tail: BytesMut::new(),
                };
                ends.push_tail(&held);
                self.oversized = Some(ends);
            }
        }
        // In whole events, what is held has not been sent: it goes now.
        out.map(|out| {
            if out.is_empty() {
                held
            } else {
                [&out[..], &held[..]].concat().into()
            }
        })
    }

    fn read(&mut self, data: &Bytes) -> Option<Bytes> {
        let carried = self.splitter.pending();
        self.splitter.push(data);
        if !self.whole_events {
            while let Some(event) = self.splitter.next_event() {
                match self.oversized.take() {
                    Some(ends) => self.absorb_oversized(ends, &event),
                    None => {
                        self.absorb_event(&event);
                    }
                }
            }
            return None;
        }
        // Only complete events go on. A frame of whole events none of
        // which is stripped goes on as it came (the usual case).
        // Otherwise the events kept are sent as they came, each with its
        // own blank line, so that the bytes add up to what the upstream
        // sent (less any stripped event).
        let mut rebuilt = (carried > 0).then(BytesMut::new);
        let mut consumed = 0;
        while let Some((end, raw)) = self.splitter.next_event_raw() {
            // The end of an event too long to read: passed on as it is.
            let strip = match self.oversized.take() {
                Some(ends) => {
                    self.absorb_oversized(ends, &raw[..end]);
                    false
                }
                None => self.absorb_event(&raw[..end]),
            };
            let len = raw.len();
            match rebuilt.as_mut() {
                // The first stripped event of a frame that began on an
                // event boundary: what came before it goes as it came.
                None if strip => rebuilt = Some(BytesMut::from(&data[..consumed])),
                // Adjacent kept events join without a copy.
                Some(out) if !strip => out.unsplit(raw),
                _ => {}
            }
            consumed += len;
        }
        match rebuilt {
            Some(out) => Some(out.freeze()),
            None if self.splitter.pending() == 0 => None,
            // Whole events, then the start of one held back.
            None => Some(data.slice(..consumed)),
        }
    }

    /// Folds into the usage what the ends of an event too long to read
    /// say, `last` its bytes not yet passed: whether it was the stream's
    /// last event or an error (its `type`, written first), and the token
    /// counts written last in it. A responses stream's final event
    /// repeats every output, an image's base64 among them: it is the
    /// one that carries the usage, and says the stream is complete.
    fn absorb_oversized(&mut self, mut ends: Ends, last: &[u8]) {
        ends.push_tail(last);
        self.usage.events += 1;
        if !self.named_events {
            self.named_events = sse::has_event_name(&ends.head);
        }
        let head = sse::event_payload(&ends.head);
        if sse::is_last_event(&head) {
            self.finished = true;
        }
        let kind = top_level::from_start(&head, b"type").and_then(json_str);
        let reason = match kind.as_deref() {
            Some("error") => {
                self.usage.stream_error = true;
                None
            }
            Some("response.failed") => {
                self.usage.stream_error = true;
                Some("error")
            }
            Some("response.completed") => Some("stop"),
            _ => None,
        };
        if kind.as_deref().is_some_and(|k| k.starts_with("response.")) {
            self.api = true;
        }
        if let Some(reason) = reason
            && self.usage.finishes.is_empty()
        {
            self.usage.finishes.set(0, Some(reason));
        }
        // The answer's own usage: the event's, or its answer's where the
        // event wraps one (`response`, Anthropic's `message`), written
        // last in it; not a `usage` nested deeper (in metadata, say).
        let level = match kind.as_deref() {
            Some(k) if k.starts_with("response.") || k == "message_start" => 2,
            _ => 1,
        };
        let counts = top_level::from_end_at(&ends.tail, b"usage", level)
            .filter(|v| v.starts_with(b"{"))
            .and_then(read_one::<facts::Counts>);
        if let Some(counts) = counts {
            add_counts(&mut self.usage, &counts);
        }
    }

    /// Folds one event into the usage; true when it is the usage-only
    /// chunk and sluice strips it.
    fn absorb_event(&mut self, event: &[u8]) -> bool {
        if !self.named_events {
            self.named_events = sse::has_event_name(event);
        }
        let payload = sse::event_payload(event);
        if sse::is_last_event(&payload) {
            self.finished = true;
        } else if !payload.is_empty() {
            self.usage.events += 1;
        }
        if facts::holds_nothing_new(&payload, self.usage.model.as_deref()) {
            return false;
        }
        let Some(facts) = Facts::parse(&payload) else {
            return false;
        };
        self.api |=
            facts.choices.0.is_some() || facts.message.0.is_some() || facts.response.0.is_some();
        absorb(&mut self.usage, &facts);
        self.strip_usage && facts.is_usage_only()
    }
}

fn from_json_body(body: &[u8]) -> Usage {
    let Some(mut answer) = facts::parse::<Answer>(body) else {
        // Refused by the typed view: a shape it does not take, or no
        // JSON at all.
        let malformed = serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err();
        return Usage {
            malformed,
            failed: !malformed && facts::names_an_error(body),
            // Not JSON, or an object: an answer's shape (a list is none).
            unread: malformed || body.trim_ascii_start().starts_with(b"{"),
            ..Usage::default()
        };
    };
    let counts = answer.usage.0.take().unwrap_or_default();
    let model = answer.model.0.take().map(Cow::into_owned);
    let failed = answer.error.is_some();
    let mut finishes = Finishes::default();
    for (index, reason) in answer.finish_reasons() {
        finishes.set(index, reason.as_deref());
    }
    Usage {
        model,
        input_tokens: counts.input(),
        output_tokens: counts.output(),
        cache_read_tokens: counts.cache_read(),
        cache_write_tokens: counts.cache_write(),
        finishes,
        failed,
        ..Usage::default()
    }
}

/// Folds one stream event into `usage`.
/// The counts an event reports, each over what earlier events said
/// (streams report them as running totals).
fn add_counts(usage: &mut Usage, counts: &facts::Counts) {
    if let Some(n) = counts.input() {
        usage.input_tokens = Some(n);
    }
    if let Some(n) = counts.output() {
        usage.output_tokens = Some(n);
    }
    if let Some(n) = counts.cache_read() {
        usage.cache_read_tokens = Some(n);
    }
    if let Some(n) = counts.cache_write() {
        usage.cache_write_tokens = Some(n);
    }
}

/// One JSON value read from the start of `value`, whatever follows it.
fn read_one<'a, T: serde::Deserialize<'a>>(value: &'a [u8]) -> Option<T> {
    T::deserialize(&mut serde_json::Deserializer::from_slice(value)).ok()
}

/// A JSON string value read from the start of `value`.
fn json_str(value: &[u8]) -> Option<Cow<'_, str>> {
    read_one::<facts::Loose<Cow<'_, str>>>(value).and_then(|s| s.0)
}

fn absorb(usage: &mut Usage, event: &Facts<'_>) {
    // OpenAI's `{"error": {...}}`, Anthropic's and the responses API's
    // `{"type": "error", ...}`, and the latter's `response.failed`.
    if event.error.is_some() || matches!(event.kind.0.as_deref(), Some("error" | "response.failed"))
    {
        usage.stream_error = true;
    }
    // Anthropic streams wrap the message in `message_start`, the OpenAI
    // responses API its answer in `response.completed`.
    let inner = event.message.0.as_ref().or(event.response.0.as_ref());
    let (model, counts, stop_reason) = match inner {
        Some(inner) => (&inner.model, inner.usage.0.as_ref(), &inner.stop_reason),
        None => (&event.model, None, &event.stop_reason),
    };
    // Every chunk of a stream repeats the model: copied once, not per chunk.
    if let Some(model) = model.0.as_deref()
        && usage.model.as_deref() != Some(model)
    {
        usage.model = Some(model.to_owned());
    }
    if let Some(counts) = counts.or(event.usage.0.as_ref()) {
        add_counts(usage, counts);
    }
    // A stream's chunks end each choice with its own `finish_reason`
    // (one chunk per choice when `n > 1`); the other reasons stand for
    // the one answer an event's API gives.
    let mut ended = false;
    for (index, reason) in event.choices.0.iter().flat_map(|c| &c.ends) {
        if let Some(reason) = reason {
            usage.finishes.set(*index, Some(reason));
            ended = true;
        }
    }
    if ended {
        return;
    }
    let reason = stop_reason
        .0
        .as_deref()
        .or(event
            .delta
            .0
            .as_ref()
            .and_then(|d| d.stop_reason.0.as_deref()))
        .or(inner.and_then(Answer::status_reason));
    if let Some(reason) = reason {
        usage.finishes.set(0, Some(reason));
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

    /// Bulk embeddings in base64 pass 4 MiB: the model and usage after
    /// the data are still read, from the answer's tail, in frames of
    /// every size.
    #[test]
    fn a_json_answer_over_the_cap_is_metered_from_its_ends() {
        let vector = format!(
            r#"{{"object":"embedding","index":0,"embedding":"{}"}}"#,
            "QUJD".repeat(2048)
        );
        let data = vec![vector.as_str(); JSON_CAP / vector.len() + 2].join(",");
        let body = format!(
            r#"{{"object":"list","data":[{data}],"model":"text-embedding-3-small","usage":{{"prompt_tokens":5000,"total_tokens":5000}}}}"#
        );
        assert!(body.len() > JSON_CAP);
        for frame in [1000, 16 * 1024, END_BYTES + 1, 1 << 20, body.len()] {
            let mut m = Meter::for_content_type(b"application/json").unwrap();
            for chunk in body.as_bytes().chunks(frame) {
                feed(&mut m, chunk);
            }
            let usage = m.finish();
            assert_eq!(usage.input_tokens, Some(5000), "frames of {frame}");
            assert_eq!(usage.model.as_deref(), Some("text-embedding-3-small"));
            assert!(!usage.malformed);
        }
        // Members of nested objects are not the answer's: a listing of
        // stored completions has no usage of its own, and a tool's model
        // after the content is not the answer's model.
        let listed = format!(
            r#"{{"object":"list","data":[{{"model":"gpt-4o","pad":"{}","usage":{{"prompt_tokens":7}}}}],"has_more":false}}"#,
            "x".repeat(JSON_CAP)
        );
        let answer = format!(
            r#"{{"model":"gpt-4o","output":"{}","tools":[{{"type":"image_generation","model":"gpt-image-1"}}],"usage":{{"input_tokens":4,"output_tokens":2}}}}"#,
            "x\\\"y".repeat(JSON_CAP / 4)
        );
        for (body, model, input) in [(&listed, None, None), (&answer, Some("gpt-4o"), Some(4))] {
            let mut m = Meter::for_content_type(b"application/json").unwrap();
            for chunk in body.as_bytes().chunks(100_000) {
                feed(&mut m, chunk);
            }
            let usage = m.finish();
            assert_eq!(usage.model.as_deref(), model);
            assert_eq!(usage.input_tokens, input);
        }
        // The model written first (chat's order) is read from the head;
        // an answer without usage is counted as none.
        let mut m = Meter::for_content_type(b"application/json").unwrap();
        feed(
            &mut m,
            br#"{"model":"gpt-4o","usage":{"prompt_tokens":3},"pad":""#,
        );
        let pad = vec![b'x'; 64 * 1024];
        for _ in 0..(JSON_CAP / pad.len() + 1) {
            feed(&mut m, &pad);
        }
        feed(&mut m, br#""}"#);
        let usage = m.finish();
        assert_eq!(usage.model.as_deref(), Some("gpt-4o"));
        assert_eq!(
            usage.input_tokens, None,
            "the usage at the head is not the tail's"
        );
    }

    /// What the client is sent of `stream` passed through `m` in frames
    /// of `frame` bytes.
    fn passed(m: &mut Meter, stream: &[u8], frame: usize) -> Vec<u8> {
        let mut sent = Vec::new();
        for part in stream.chunks(frame) {
            let part = Bytes::copy_from_slice(part);
            match m.observe(&part) {
                Some(out) => sent.extend_from_slice(&out),
                None => sent.extend_from_slice(&part),
            }
        }
        sent.extend_from_slice(&m.take_held().unwrap_or_default());
        sent
    }

    fn stripping_meter() -> Meter {
        let mut m = Meter::for_content_type(b"text/event-stream").unwrap();
        m.strip_usage_chunk();
        m
    }

    const CHUNK: &[u8] = b"data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\r\n\r\n";
    const USAGE: &[u8] =
        b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5}}\n\n";

    #[test]
    fn stripping_passes_whole_event_frames_as_they_came() {
        let mut m = stripping_meter();
        // Whole events, none stripped: the frame goes on unchanged
        // (its CRLF separators too).
        assert_eq!(m.observe(&Bytes::from_static(CHUNK)), None);
        // The usage chunk between two events is cut out; the rest of the
        // frame goes on byte for byte.
        let frame = [CHUNK, USAGE, b"data: [DONE]\n\n"].concat();
        let out = m.observe(&Bytes::from(frame)).unwrap();
        assert_eq!(&out[..], &[CHUNK, b"data: [DONE]\n\n"].concat()[..]);
        assert_eq!(m.take_held(), None);
        let usage = m.finish();
        assert_eq!(
            (usage.input_tokens, usage.output_tokens),
            (Some(3), Some(5))
        );
    }

    #[test]
    fn stripping_holds_an_event_until_it_is_complete() {
        let mut m = stripping_meter();
        // A whole event then half of the usage chunk: the whole one goes
        // on, zero-copy, the half is held.
        let frame = Bytes::from([CHUNK, &USAGE[..20]].concat());
        let out = m.observe(&frame).unwrap();
        assert_eq!(&out[..], CHUNK);
        // The rest of the usage chunk completes it: stripped, nothing sent.
        assert_eq!(
            m.observe(&Bytes::from_static(&USAGE[20..])).as_deref(),
            Some(&b""[..])
        );
        // An event begun in an earlier frame is sent rebuilt, whole.
        assert_eq!(
            m.observe(&Bytes::from_static(b"data: [DO")).as_deref(),
            Some(&b""[..])
        );
        let out = m.observe(&Bytes::from_static(b"NE]\n\n: tail")).unwrap();
        assert_eq!(&out[..], b"data: [DONE]\n\n");
        // An unterminated last event goes as it came, at the end.
        assert_eq!(m.take_held().as_deref(), Some(&b": tail"[..]));
        assert_eq!(m.finish().output_tokens, Some(5));
    }

    /// Whole events only, nothing stripped: however the frames cut the
    /// stream, the client gets every byte the upstream sent, CRLF
    /// separators included, so a content-length stays true.
    #[test]
    fn whole_events_keep_every_byte() {
        let stream = [CHUNK, USAGE, CHUNK, b"data: [DONE]\r\n\r\n", b": tail"].concat();
        for cut in 1..stream.len() {
            let mut m = Meter::for_content_type(b"text/event-stream").unwrap();
            m.whole_events();
            assert_eq!(
                passed(&mut m, &stream, cut),
                stream,
                "frames of {cut} bytes"
            );
        }
    }

    #[test]
    fn an_event_that_never_ends_is_passed_on_not_held_forever() {
        let big = Bytes::from(vec![b'x'; EVENT_CAP / 2 + 1]);
        let mut m = stripping_meter();
        assert_eq!(m.observe(&Bytes::from_static(CHUNK)), None);
        // Held while it may still be the usage chunk...
        assert_eq!(m.observe(&big).as_deref(), Some(&b""[..]));
        assert!(m.holds());
        // ...until it outgrows the cap: then all of it goes but the
        // last bytes, where its end may begin...
        let out = m.observe(&big).unwrap();
        assert_eq!(out.len(), 2 * big.len() - 3);
        // ...and once it ends, the events after it are read again: the
        // usage chunk is counted and stripped.
        assert_eq!(
            m.observe(&Bytes::from_static(b"\n\n")).as_deref(),
            Some(&b"xxx\n\n"[..])
        );
        assert_eq!(
            m.observe(&Bytes::from_static(USAGE)).as_deref(),
            Some(&b""[..])
        );
        assert_eq!(m.take_held(), None);
        let usage = m.finish();
        assert_eq!(usage.model.as_deref(), Some("m"));
        assert!(usage.input_tokens.is_some(), "{usage:?}");

        let mut m = Meter::for_content_type(b"text/event-stream").unwrap();
        for _ in 0..3 {
            assert_eq!(m.observe(&big), None);
        }
        assert!(!m.holds());
    }

    #[test]
    fn a_count_no_answer_could_have_is_read_as_absent() {
        let u = from_json_body(
            br#"{"model":"m","choices":[],"usage":{"prompt_tokens":18446744073709551615,"completion_tokens":10,"prompt_tokens_details":{"cached_tokens":9007199254740993}}}"#,
        );
        assert_eq!((u.input_tokens, u.output_tokens), (None, Some(10)));
        assert_eq!(u.cache_read_tokens, None);
        let u = from_json_body(
            br#"{"type":"message","usage":{"input_tokens":100000000,"output_tokens":4294967295}}"#,
        );
        assert_eq!((u.input_tokens, u.output_tokens), (Some(100_000_000), None));
    }

    /// A responses stream whose final event repeats a generated image
    /// (its base64 over `EVENT_CAP`), as the API sends it, with a
    /// `usage` nested in its metadata after its own.
    fn responses_stream_with_an_image(image_bytes: usize) -> Vec<u8> {
        let image = "A".repeat(image_bytes);
        let created = r#"event: response.created
data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","status":"in_progress","model":"gpt-4.1","output":[],"usage":null}}

"#;
        let completed = format!(
            "event: response.completed\ndata: {{\"type\":\"response.completed\",\"sequence_number\":9,\"response\":{{\"id\":\"resp_1\",\"object\":\"response\",\"status\":\"completed\",\"model\":\"gpt-4.1\",\"output\":[{{\"type\":\"image_generation_call\",\"result\":\"{image}\",\"status\":\"completed\"}}],\"text\":{{\"format\":{{\"type\":\"text\"}}}},\"usage\":{{\"input_tokens\":36,\"input_tokens_details\":{{\"cached_tokens\":0}},\"output_tokens\":87,\"total_tokens\":123}},\"user\":null,\"metadata\":{{\"note\":{{\"usage\":{{\"input_tokens\":1,\"output_tokens\":1}}}}}}}}}}\n\n"
        );
        [created.as_bytes(), completed.as_bytes()].concat()
    }

    #[test]
    fn a_final_event_too_long_to_read_still_ends_the_stream_and_counts() {
        let stream = responses_stream_with_an_image(EVENT_CAP + EVENT_CAP / 2);
        for strip in [false, true] {
            let mut m = Meter::for_content_type(b"text/event-stream").unwrap();
            if strip {
                m.strip_usage_chunk();
            }
            assert_eq!(
                passed(&mut m, &stream, 64 << 10),
                stream,
                "every byte passes (strip: {strip})"
            );
            assert!(m.finished(), "its final event passed (strip: {strip})");
            assert!(!m.broke_off(None));
            let usage = m.finish();
            assert_eq!(usage.model.as_deref(), Some("gpt-4.1"));
            assert_eq!(
                (usage.input_tokens, usage.output_tokens),
                (Some(36), Some(87))
            );
            assert_eq!(usage.finishes.first(), Some("stop"));
            assert!(!usage.stream_error);
        }
    }

    #[test]
    fn past_the_cap_an_event_flows_on_as_it_comes() {
        let stream = responses_stream_with_an_image(EVENT_CAP * 3);
        let mut m = stripping_meter();
        let (mut received, mut sent, mut over) = (0, 0, false);
        for part in stream.chunks(64 << 10) {
            received += part.len();
            sent += match m.observe(&Bytes::copy_from_slice(part)) {
                Some(out) => out.len(),
                None => part.len(),
            };
            let held = received - sent;
            assert!(held <= EVENT_CAP + (64 << 10), "held {held}");
            // Once an event outgrew the cap, no more than the bytes its
            // end may begin in wait, until it ends.
            if over && m.cut_mid_event() {
                assert!(held <= sse::SEPARATOR_TAIL, "held {held} past the cap");
            }
            over |= m.cut_mid_event();
        }
        assert!(over, "the image event outgrew the cap");
        sent += m.take_held().map_or(0, |rest| rest.len());
        assert_eq!(sent, stream.len());
        assert!(m.finished());
    }

    #[test]
    fn a_failed_final_event_too_long_to_read_is_a_stream_error() {
        let stream = String::from_utf8(responses_stream_with_an_image(EVENT_CAP * 2))
            .unwrap()
            .replace("response.completed", "response.failed")
            .into_bytes();
        let mut m = Meter::for_content_type(b"text/event-stream").unwrap();
        for part in stream.chunks(64 << 10) {
            m.observe(&Bytes::copy_from_slice(part));
        }
        assert!(m.finished());
        assert!(m.finish().stream_error);
    }

    #[test]
    fn a_meter_that_does_not_strip_never_changes_a_frame() {
        let mut m = Meter::for_content_type(b"text/event-stream").unwrap();
        for frame in [&USAGE[..10], &USAGE[10..], CHUNK] {
            assert_eq!(m.observe(&Bytes::copy_from_slice(frame)), None);
        }
        assert_eq!(m.take_held(), None);
        assert_eq!(m.finish().input_tokens, Some(3));
    }

    /// The byte scan that skips parsing may only skip events whose parse
    /// would change nothing.
    #[test]
    fn events_skipped_unparsed_are_those_that_change_nothing() {
        let events: &[&[u8]] = &[
            // Text deltas: skipped.
            br#"{"id":"c","object":"chat.completion.chunk","model":"gpt-4o","choices":[{"index":0,"delta":{"content":"Hi"},"logprobs":null,"finish_reason":null}],"usage":null}"#,
            br#"{"model" : "gpt-4o", "choices":[{"delta":{"content":"the \"usage\": 5 and \"model\":\"x\" and \"error\""},"finish_reason" :  null}]}"#,
            br#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            b"[DONE]",
            br#"{"model":"gpt-4o","choices":[{"delta":{"content":"caf\u00e9 \u4f60\u597d \u0022q\u0022"},"finish_reason":null}]}"#,
            // What must be parsed.
            br#"{"model":"gpt-4o","choices":[{"delta":{},"finish_reason":"stop"}],"usage":null}"#,
            br#"{"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":5}}"#,
            br#"{"model":"gpt-4o-2024","choices":[{"delta":{"content":"x"},"finish_reason":null}]}"#,
            br#"{"model":"gpt-4o","error":{"message":"overloaded"}}"#,
            br#"{"type":"error","error":{"type":"overloaded_error"}}"#,
            br#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}"#,
            br#"{"type":"message_start","message":{"model":"claude-x","usage":{"input_tokens":9}}}"#,
            br#"{"type":"response.completed","response":{"model":"gpt-4o","usage":{"input_tokens":1,"output_tokens":2}}}"#,
            br#"{"model":"gpt-4o","usage" : {"prompt_tokens":1}}"#,
            br#"{"model":"gpt-4o","choices":[{"finish_reason":"length"}]}"#,
            br#"{"model":"gpt-4o","stop_reason":"max_tokens"}"#,
            br#"{"model":"gpt-4o","choices":[{"delta":{"content":"model"}}]}"#,
            br#"{"model":"gpt-4o","usage"}"#,
            // Names spelled with escaped letters are still those names.
            br#"{"model":"gpt-4o","choices":[{"finish_re\u0061son":"stop"}]}"#,
            br#"{"type":"\u0065rror"}"#,
            br#"{"model":"gpt-4o","choices":[],"us\u0061ge":{"prompt_tokens":3}}"#,
            br#"{"m\u006Fdel":"other","choices":[{"delta":{"content":"x"}}]}"#,
        ];
        let mut skipped = 0;
        for known in ["gpt-4o", "claude-x"] {
            let before = Usage {
                model: Some(known.to_owned()),
                input_tokens: Some(1),
                output_tokens: Some(1),
                cache_read_tokens: None,
                cache_write_tokens: None,
                finishes: Finishes::default(),
                events: 0,
                stream_error: false,
                malformed: false,
                failed: false,
                unread: false,
            };
            for event in events {
                if !facts::holds_nothing_new(event, Some(known)) {
                    continue;
                }
                skipped += 1;
                let mut after = before.clone();
                if let Some(facts) = Facts::parse(event) {
                    absorb(&mut after, &facts);
                    assert!(!facts.is_usage_only());
                }
                assert_eq!(after, before, "skipped {}", String::from_utf8_lossy(event));
            }
        }
        // The first five under gpt-4o; the Anthropic delta and [DONE]
        // (which name no model) under claude-x: the scan is not vacuous.
        assert_eq!(skipped, 7);
        assert!(
            !facts::holds_nothing_new(events[0], None),
            "an unknown model is news"
        );
    }

    #[test]
    fn media_types_are_read_in_any_case_parameters_aside() {
        for (content_type, sse) in [
            (&b"Text/Event-Stream"[..], Some(true)),
            (b"text/event-stream; charset=utf-8", Some(true)),
            (b"APPLICATION/JSON;charset=UTF-8", Some(false)),
            (b"application/jsonl", None),
            (b"text/event-streams", None),
        ] {
            let meter = Meter::for_content_type(content_type);
            assert_eq!(
                meter.map(|m| matches!(m, Meter::Sse(_))),
                sse,
                "{}",
                String::from_utf8_lossy(content_type)
            );
        }
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
                cache_read_tokens: None,
                cache_write_tokens: None,
                finishes: Finishes(smallvec::smallvec![(0, Some("stop".into()))]),
                events: 0,
                stream_error: false,
                malformed: false,
                failed: false,
                unread: false,
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
        // Each choice counts; one that ended without a reason as such.
        assert_eq!(
            usage.finishes.reasons().collect::<Vec<_>>(),
            [None, Some("length"), Some("stop")]
        );
        assert_eq!(
            (usage.input_tokens, usage.output_tokens),
            (Some(1), Some(2))
        );
        // A member of an unexpected type is read as absent, the rest is
        // still metered.
        let odd = from_json_body(
            br#"{"model":"m","choices":{},"usage":{"prompt_tokens":1.5,"completion_tokens":3}}"#,
        );
        assert_eq!(odd.model.as_deref(), Some("m"));
        assert_eq!(
            (odd.input_tokens, odd.output_tokens, odd.finishes),
            (None, Some(3), Finishes::default())
        );
        // Not an object at all: nothing.
        assert_eq!(from_json_body(br#"["m"]"#), Usage::default());
        // An object it cannot read (a member written twice), or no JSON:
        // what it reported is unknown.
        let twice = br#"{"model":"m","usage":{"prompt_tokens":1,"prompt_tokens":9}}"#;
        assert!(from_json_body(twice).unread);
        assert!(from_json_body("\u{feff}{}".as_bytes()).unread);
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
        // The responses API's failed answer.
        let mut m = Meter::for_content_type(b"text/event-stream").unwrap();
        feed(
            &mut m,
            b"event: response.failed\ndata: {\"type\":\"response.failed\",\"response\":{\"status\":\"failed\",\"error\":{\"code\":\"server_error\"}}}\n\n",
        );
        let usage = m.finish();
        assert!(usage.stream_error);
        assert_eq!(
            usage.finishes.reasons().collect::<Vec<_>>(),
            [Some("error")]
        );
    }

    #[test]
    fn openai_stream_with_usage_chunk() {
        let mut m = Meter::for_content_type(b"text/event-stream").unwrap();
        feed(&mut m, b"data: {\"model\":\"m\",\"choices\":[{\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n");
        feed(&mut m, b"data: {\"model\":\"m\",\"choices\":[{\"delta\":{},\"finish_reason\":\"length\"}]}\n\ndata: {\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,");
        feed(&mut m, b"\"completion_tokens\":4}}\n\ndata: [DONE]\n\n");
        let u = m.finish();
        assert_eq!((u.input_tokens, u.output_tokens), (Some(3), Some(4)));
        assert_eq!(u.finishes.first(), Some("length"));
    }

    /// With `n > 1` each choice ends in its own chunk; a provider saying
    /// a choice's reason again does not make it two completions.
    #[test]
    fn a_stream_of_several_choices_ends_each_once() {
        let mut m = Meter::for_content_type(b"text/event-stream").unwrap();
        for (index, reason) in [(0, "stop"), (1, "length"), (0, "stop")] {
            let chunk = format!(
                "data: {{\"model\":\"m\",\"choices\":[{{\"index\":{index},\"delta\":{{}},\"finish_reason\":\"{reason}\"}}]}}\n\n"
            );
            feed(&mut m, chunk.as_bytes());
        }
        let u = m.finish();
        assert_eq!(
            u.finishes.reasons().collect::<Vec<_>>(),
            [Some("stop"), Some("length")]
        );
    }

    #[test]
    fn choices_past_the_cap_are_not_counted() {
        let choices = vec![r#"{"finish_reason":"stop"}"#; MAX_CHOICES + 50].join(",");
        let usage = from_json_body(format!(r#"{{"model":"m","choices":[{choices}]}}"#).as_bytes());
        assert_eq!(usage.finishes.reasons().count(), MAX_CHOICES);
    }

    #[test]
    fn anthropic_stream() {
        let mut m = Meter::for_content_type(b"text/event-stream").unwrap();
        feed(&mut m, b"event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude\",\"usage\":{\"input_tokens\":25,\"output_tokens\":1}}}\n\n");
        feed(&mut m, b"event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\"},\"usage\":{\"output_tokens\":15}}\n\n");
        let u = m.finish();
        assert_eq!(u.model.as_deref(), Some("claude"));
        assert_eq!((u.input_tokens, u.output_tokens), (Some(25), Some(15)));
        assert_eq!(u.finishes.first(), Some("end_turn"));
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
            br#"{"model":"gpt-4.1","status":"completed","output":[{"type":"message","content":[]}],"usage":{"input_tokens":7,"output_tokens":2}}"#,
        );
        let u = m.finish();
        assert_eq!((u.input_tokens, u.output_tokens), (Some(7), Some(2)));
        assert_eq!(u.finishes.first(), Some("stop"));
    }

    /// The responses API's status says how an answer ended, in the words
    /// chat answers use, so that one `length` series shows both.
    #[test]
    fn responses_api_status_reads_as_a_finish_reason() {
        for (answer, reason) in [
            (
                r#"{"status":"completed","output":[{"type":"reasoning"},{"type":"function_call","name":"f"}]}"#,
                Some("tool_calls"),
            ),
            (
                r#"{"status":"incomplete","incomplete_details":{"reason":"max_output_tokens"}}"#,
                Some("length"),
            ),
            (
                r#"{"status":"incomplete","incomplete_details":{"reason":"content_filter"}}"#,
                Some("content_filter"),
            ),
            (r#"{"status":"in_progress"}"#, None),
        ] {
            let mut m = Meter::for_content_type(b"application/json").unwrap();
            feed(&mut m, answer.as_bytes());
            assert_eq!(m.finish().finishes.first(), reason, "{answer}");
        }
        let mut m = Meter::for_content_type(b"text/event-stream").unwrap();
        feed(&mut m, b"data: {\"type\":\"response.completed\",\"response\":{\"status\":\"completed\",\"output\":[]}}\n\n");
        assert_eq!(m.finish().finishes.first(), Some("stop"));
    }
}
