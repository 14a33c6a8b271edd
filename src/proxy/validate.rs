//! Phase 3, request checks before anything is forwarded: the body size
//! limit (413), and on routes with `validate` the body's shape (400). A
//! declared `content-length` over the limit is refused at once; a chunked
//! body is counted as it streams and cut off at the limit. A validated
//! body is read whole (bounded), its nesting depth counted before it is
//! parsed, so a hostile body costs one linear scan, never a deep tree.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderMap, header};
use http_body::{Body, Frame, SizeHint};

use http::request::Parts;
use hyper::body::Incoming;

use super::buffered::Budget;
use serde_json::Value;

use super::ctx::RequestCtx;
use super::error::ProxyError;
use super::forward::RequestBody;
use crate::body::{BodyError, BoxError};
use crate::llm::shape::{self, Endpoint};
use crate::snapshot::Validate;

/// JSON nesting accepted in a validated body: far beyond any real API
/// request, far below what could exhaust a stack.
pub const MAX_DEPTH: usize = 64;

/// 413 when the declared length exceeds `limit`.
pub fn check_declared_size(headers: &HeaderMap, limit: u64) -> Result<(), ProxyError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit => Err(ProxyError::TooLarge { limit }),
        _ => Ok(()),
    }
}

/// On a route with `validate`, reads the body (bounded) and checks it;
/// otherwise leaves it to stream. `path` is the one routes read. Once
/// the body is read whole, valid or not, the ctx says so (the connection
/// can then serve the next request) and counts the read as time spent
/// waiting on the client, not sluice's overhead. `read` sees the body
/// read, before it is checked (to log a refused body too).
#[allow(clippy::too_many_arguments)]
pub async fn check_body(
    validate: &Validate,
    parts: &Parts,
    path: &str,
    ctx: &mut RequestCtx,
    body: Incoming,
    max_body: u64,
    deadline: Instant,
    budget: Budget<'_>,
    read: impl FnOnce(&mut RequestCtx, &[u8]),
) -> Result<RequestBody, ProxyError> {
    // Routes without `validate` (most) decide without looking at the path.
    let (applies, endpoint) = match validate {
        Validate::None => (false, None),
        Validate::OpenAi => {
            let endpoint = Endpoint::of(path);
            (endpoint.is_some(), endpoint)
        }
        Validate::Schema(_) => (true, None),
    };
    let has_body = matches!(
        parts.method,
        http::Method::POST | http::Method::PUT | http::Method::PATCH
    );
    if !applies || !has_body {
        return Ok(RequestBody::Streaming(body));
    }
    if super::headers::is_compressed(&parts.headers) {
        // Not read as JSON (a gzip body is no broken JSON): the client
        // is told to send it plain, as on a token-limited route.
        return Err(ProxyError::UnsupportedEncoding);
    }
    let bytes = RequestBody::Streaming(body)
        .into_bytes(max_body, deadline, budget, &mut ctx.waiting)
        .await?;
    ctx.body_unread = false;
    read(ctx, &bytes);
    check_json(validate, endpoint, shape::model_in_path(path), &bytes)?;
    Ok(RequestBody::Read(bytes))
}

/// `bytes` with each `\uXXXX` escape of a surrogate that is not half of
/// a pair written as `\uFFFD`, if there is one.
fn lone_surrogates_replaced(bytes: &[u8]) -> Option<Vec<u8>> {
    let escape_at = |i: usize| -> Option<u16> {
        let hex = bytes.get(i..i + 6)?.strip_prefix(b"\\u")?;
        u16::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
    };
    let mut out = Vec::new();
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            i += 1;
            continue;
        }
        let Some(unit) = escape_at(i) else {
            i += 2; // another escape, `\\` among them
            continue;
        };
        let paired = (0xD800..0xDC00).contains(&unit)
            && escape_at(i + 6).is_some_and(|low| (0xDC00..0xE000).contains(&low));
        if paired {
            i += 12;
        } else if (0xD800..0xE000).contains(&unit) {
            out.extend_from_slice(&bytes[copied..i]);
            out.extend_from_slice(b"\\uFFFD");
            i += 6;
            copied = i;
        } else {
            i += 6;
        }
    }
    if copied == 0 {
        return None;
    }
    out.extend_from_slice(&bytes[copied..]);
    Some(out)
}

fn check_json(
    validate: &Validate,
    endpoint: Option<Endpoint>,
    model_in_path: bool,
    bytes: &[u8],
) -> Result<(), ProxyError> {
    if nesting_exceeds(bytes, MAX_DEPTH) {
        return Err(invalid(
            format!("the JSON body nests deeper than {MAX_DEPTH} levels"),
            None,
        ));
    }
    // A byte order mark (a body saved by Notepad) is no part of the JSON
    // to APIs, as to sluice's estimates: checked without it, sent as is.
    let bytes = crate::llm::prompt_size::without_bom(bytes);
    let value: Value = match serde_json::from_slice(bytes) {
        Ok(value) => value,
        // A lone surrogate escape is JSON's grammar (RFC 8259 §8.2), and
        // what JavaScript's `JSON.stringify` writes for text cut inside
        // an emoji; upstreams take it. Checked as U+FFFD, sent as it came.
        Err(e) => lone_surrogates_replaced(bytes)
            .and_then(|fixed| serde_json::from_slice(&fixed).ok())
            .ok_or_else(|| invalid(format!("the body is not valid JSON: {e}"), None))?,
    };
    match (validate, endpoint) {
        (Validate::OpenAi, Some(endpoint)) => shape::check(endpoint, model_in_path, &value)
            .map_err(|e| invalid(e.message, Some(e.path).filter(|p| !p.is_empty()))),
        (Validate::Schema(schema), _) => match schema.iter_errors(&value).next() {
            None => Ok(()),
            Some(error) => {
                use jsonschema::error::ValidationErrorKind as Kind;
                let mut path = json_path(error.instance_path().as_str());
                // A missing property, or one the schema does not allow, is
                // the field at fault, not its object (the first one, when
                // several are not allowed; the message lists them all).
                let field = match error.kind() {
                    Kind::Required {
                        property: Value::String(name),
                    } => Some(name.as_str()),
                    Kind::AdditionalProperties { unexpected }
                    | Kind::UnevaluatedProperties { unexpected } => {
                        unexpected.first().map(String::as_str)
                    }
                    _ => None,
                };
                if let Some(name) = field {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(name);
                }
                let shown = if path.is_empty() {
                    "the body".to_owned()
                } else {
                    format!("`{path}`")
                };
                Err(invalid(
                    format!("{shown} does not match the schema: {}", error.masked()),
                    Some(path).filter(|p| !p.is_empty()),
                ))
            }
        },
        _ => Ok(()),
    }
}

fn invalid(message: String, param: Option<String>) -> ProxyError {
    ProxyError::InvalidRequest { message, param }
}

/// Whether JSON text nests arrays and objects deeper than `max`, by one
/// pass over the bytes (strings skipped, escapes honoured).
pub fn nesting_exceeds(bytes: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// A JSON pointer (`/messages/0/role`) as the path a developer reads
/// (`messages[0].role`).
fn json_path(pointer: &str) -> String {
    let mut out = String::new();
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
            out.push('[');
            out.push_str(&segment);
            out.push(']');
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&segment);
        }
    }
    out
}

/// How far a [`CappedBody`] got, so the forward phase can tell the
/// client's fault from the upstream's: a body over its limit (413, not
/// 502), or one sluice was still waiting for when the upstream's answer
/// timed out (408, not 504: the client trickled it).
#[derive(Clone)]
pub struct BodyProgress(Arc<Progress>);

struct Progress {
    state: AtomicU8,
    /// The client's body was read to its end.
    ended: AtomicBool,
    /// When body bytes last came from the client, in µs since `start`
    /// plus one (0: none yet).
    last_read: AtomicU64,
    start: Instant,
}

impl Default for BodyProgress {
    fn default() -> Self {
        BodyProgress(Arc::new(Progress {
            state: AtomicU8::new(PASSING),
            ended: AtomicBool::new(false),
            last_read: AtomicU64::new(0),
            start: Instant::now(),
        }))
    }
}

/// Passing (or not asked for yet): a stall is not the client's.
const PASSING: u8 = 0;
/// The last read found no bytes from the client: sluice waits on it.
const WAITING: u8 = 1;
const OVER_LIMIT: u8 = 2;
/// Reading the client's body failed: it broke its framing.
const CLIENT_FAILED: u8 = 3;
/// The client went away mid-body.
const CLIENT_GONE: u8 = 4;

impl BodyProgress {
    pub fn over_limit(&self) -> bool {
        self.0.state.load(Ordering::Acquire) == OVER_LIMIT
    }

    pub fn client_failed(&self) -> bool {
        self.0.state.load(Ordering::Acquire) == CLIENT_FAILED
    }

    pub fn client_gone(&self) -> bool {
        self.0.state.load(Ordering::Acquire) == CLIENT_GONE
    }

    /// Whether the client's body was read to its end: if not, hyper
    /// closes the connection once it has answered.
    pub fn ended(&self) -> bool {
        self.0.ended.load(Ordering::Acquire)
    }

    pub fn waiting_on_client(&self) -> bool {
        self.0.state.load(Ordering::Acquire) == WAITING
    }

    /// When body bytes last came from the client.
    pub fn last_read(&self) -> Option<Instant> {
        match self.0.last_read.load(Ordering::Acquire) {
            0 => None,
            at => Some(self.0.start + std::time::Duration::from_micros(at - 1)),
        }
    }

    fn read_now(&self) {
        let since = u64::try_from(self.0.start.elapsed().as_micros()).unwrap_or(u64::MAX - 1);
        self.0.last_read.store(since + 1, Ordering::Release);
    }

    fn set(&self, state: u8) {
        self.0.state.store(state, Ordering::Release);
    }
}

/// Whether a body read failed because the client closed its connection
/// (hyper's body ended early, or the socket was reset), or over HTTP/2
/// reset its stream or the connection (a cancelled upload), rather than
/// because it broke the body's framing.
pub fn went_away(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            // Its socket's error is held inside, not given as a source.
            if let Some(io) = h2.get_io() {
                return is_gone(io);
            }
            return h2.is_remote() && (h2.is_reset() || h2.is_go_away());
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return is_gone(io);
        }
        cause = e.source();
    }
    false
}

/// Whether a socket error says its peer closed or reset it.
fn is_gone(io: &std::io::Error) -> bool {
    matches!(
        io.kind(),
        std::io::ErrorKind::UnexpectedEof
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::BrokenPipe
    )
}

#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// A streaming request body that fails once more than `limit` bytes passed.
pub struct CappedBody<B> {
    inner: B,
    remaining: u64,
    limit: u64,
    flag: BodyProgress,
}

impl<B> CappedBody<B> {
    pub fn new(inner: B, limit: u64) -> (Self, BodyProgress) {
        let flag = BodyProgress::default();
        (
            CappedBody {
                inner,
                remaining: limit,
                limit,
                flag: flag.clone(),
            },
            flag,
        )
    }
}

impl<B> Body for CappedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > this.remaining {
                        this.flag.set(OVER_LIMIT);
                        return Poll::Ready(Some(Err(BodyError::new(BodyTooLarge(this.limit)))));
                    }
                    this.remaining -= n;
                    this.flag.read_now();
                }
                // Only a read that found nothing waits on the client: a
                // body that ended, or that hyper stopped polling, does not.
                this.flag.set(PASSING);
                if this.inner.is_end_stream() {
                    this.flag.0.ended.store(true, Ordering::Release);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let e: BoxError = e.into();
                this.flag.set(if went_away(&*e) {
                    CLIENT_GONE
                } else {
                    CLIENT_FAILED
                });
                Poll::Ready(Some(Err(BodyError::new(e))))
            }
            Poll::Ready(None) => {
                this.flag.set(PASSING);
                this.flag.0.ended.store(true, Ordering::Release);
                Poll::Ready(None)
            }
            Poll::Pending => {
                this.flag.set(WAITING);
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lone_surrogates_are_read_as_replacement_characters() {
        let fixed = |b: &[u8]| lone_surrogates_replaced(b).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(
            fixed(br#"{"c":"abc \ud83d"}"#).as_deref(),
            Some(r#"{"c":"abc \uFFFD"}"#)
        );
        assert_eq!(
            fixed(br#"{"c":"\uDE00 and \ud83d\ude00"}"#).as_deref(),
            Some(r#"{"c":"\uFFFD and \ud83d\ude00"}"#)
        );
        // Pairs, other escapes and an escaped backslash stay as they are.
        assert_eq!(fixed(br#"{"c":"\ud83d\ude00 \n \u00e9"}"#), None);
        assert_eq!(fixed(br#"{"c":"\\ud83d"}"#), None);
        let body = br#"{"model":"m","messages":[{"role":"user","content":"cut \ud83d"}]}"#;
        assert!(
            check_json(
                &Validate::OpenAi,
                Some(Endpoint::ChatCompletions),
                false,
                body
            )
            .is_ok()
        );
        assert!(
            check_json(
                &Validate::OpenAi,
                Some(Endpoint::ChatCompletions),
                false,
                b"{"
            )
            .is_err()
        );
    }

    #[test]
    fn nesting_is_counted_outside_strings() {
        assert!(!nesting_exceeds(br#"{"a":[{"b":1}]}"#, 3));
        assert!(nesting_exceeds(br#"{"a":[{"b":[1]}]}"#, 3));
        assert!(!nesting_exceeds(br#"{"a":"[[[[[[[[\"[[["}"#, 1));
        let deep = "[".repeat(100_000);
        assert!(nesting_exceeds(deep.as_bytes(), MAX_DEPTH));
    }

    #[test]
    fn pointers_read_as_paths() {
        assert_eq!(json_path(""), "");
        assert_eq!(json_path("/messages/0/role"), "messages[0].role");
        assert_eq!(json_path("/a~1b/c"), "a/b.c");
    }
}
