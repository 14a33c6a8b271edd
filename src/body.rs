//! The one body type that flows through sluice both ways, and small
//! constructors for bodies sluice writes itself.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};

/// Errors of any body in flight (client, upstream, mock, tap).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A type-erased streaming body. `Unsync` because hyper needs bodies to be
/// `Send` only, and upstream bodies are not `Sync`.
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BodyError>;

/// A body of known bytes.
pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> BoxBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// A body's data frames gathered into one piece. A body in one frame
/// (most small bodies) is kept as that frame, shared and not copied; from
/// the second frame on they are copied into one buffer, so memory follows
/// the bytes, not the number of frames.
#[derive(Default)]
pub struct Joined {
    first: Option<Bytes>,
    buf: Option<bytes::BytesMut>,
}

impl Joined {
    pub fn len(&self) -> usize {
        match (&self.buf, &self.first) {
            (Some(buf), _) => buf.len(),
            (None, first) => first.as_ref().map_or(0, Bytes::len),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn push(&mut self, data: &Bytes) {
        match (&mut self.buf, self.first.take()) {
            (Some(buf), _) => buf.extend_from_slice(data),
            (None, None) => self.first = Some(data.clone()),
            (None, Some(first)) => {
                let mut buf = bytes::BytesMut::with_capacity(first.len() + data.len());
                buf.extend_from_slice(&first);
                buf.extend_from_slice(data);
                self.buf = Some(buf);
            }
        }
    }

    pub fn as_slice(&self) -> &[u8] {
        match (&self.buf, &self.first) {
            (Some(buf), _) => buf,
            (None, first) => first.as_deref().unwrap_or_default(),
        }
    }

    pub fn into_bytes(self) -> Bytes {
        match self.buf {
            Some(buf) => buf.freeze(),
            None => self.first.unwrap_or_default(),
        }
    }
}

/// The error of a body in flight. A concrete type rather than a bare
/// `Box<dyn Error>`: hyper's client and server bounds on a boxed trait
/// object fail rustc's higher-ranked checks inside spawned futures.
#[derive(Debug)]
pub struct BodyError(pub BoxError);

impl BodyError {
    pub fn new(e: impl Into<BoxError>) -> Self {
        BodyError(e.into())
    }
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}

/// A body that first replays frames already read (a held-back stream
/// preamble), then continues with the rest of the original body.
pub struct Replay {
    held: std::collections::VecDeque<http_body::Frame<Bytes>>,
    held_len: u64,
    rest: BoxBody,
}

impl Replay {
    pub fn new(held: Vec<http_body::Frame<Bytes>>, rest: BoxBody) -> Self {
        let held_len = held
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        Replay {
            held: held.into(),
            held_len,
            rest,
        }
    }
}

impl http_body::Body for Replay {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        if let Some(frame) = self.held.pop_front() {
            return std::task::Poll::Ready(Some(Ok(frame)));
        }
        std::pin::Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let rest = self.rest.size_hint();
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(rest.lower() + self.held_len);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + self.held_len);
        }
        hint
    }
}
