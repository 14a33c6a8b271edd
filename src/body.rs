//! The one body type that flows through sluice both ways, and small
//! constructors for bodies sluice writes itself.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};

/// Errors of any body in flight (client, upstream, mock, tap).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A type-erased streaming body. `Unsync` because hyper needs bodies to be
/// `Send` only, and upstream bodies are not `Sync`.
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BodyError>;

/// A body of known bytes, handed to hyper in frames of at most
/// [`FRAME`]. hyper copies each frame into its connection's write buffer
/// (one write per message: `writev(false)`), and that buffer keeps its
/// size for the connection's life: one 4 MiB frame would leave a pooled
/// upstream connection, or a client's, holding 4 MiB while idle.
pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    Slices { rest: bytes.into() }.boxed_unsync()
}

/// The largest frame [`full`] hands to hyper.
pub const FRAME: usize = 64 * 1024;

/// Known bytes, given out a frame at a time (each a slice, not a copy).
struct Slices {
    rest: Bytes,
}

impl http_body::Body for Slices {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BodyError>>> {
        let rest = &mut self.get_mut().rest;
        if rest.is_empty() {
            return std::task::Poll::Ready(None);
        }
        let frame = rest.split_to(rest.len().min(FRAME));
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(frame))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.rest.len() as u64)
    }
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
    /// The whole size when the sender said it (`content-length`): the
    /// buffer is made that size once instead of doubling its way there.
    expected: usize,
}

impl Joined {
    /// Gathers a body announced as `len` bytes long.
    pub fn expecting(len: Option<u64>) -> Self {
        Joined {
            expected: len.and_then(|n| usize::try_from(n).ok()).unwrap_or(0),
            ..Joined::default()
        }
    }

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
                let needed = first.len() + data.len();
                let mut buf = bytes::BytesMut::with_capacity(needed.max(self.expected));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn known_bytes_go_out_in_bounded_frames_that_add_up() {
        let bytes = Bytes::from((0..FRAME * 3 + 7).map(|i| i as u8).collect::<Vec<u8>>());
        let mut body = full(bytes.clone());
        assert_eq!(
            http_body::Body::size_hint(&body).exact(),
            Some(bytes.len() as u64)
        );
        let mut sizes = Vec::new();
        let mut joined = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.expect("a data frame").into_data().expect("data");
            sizes.push(data.len());
            joined.extend_from_slice(&data);
        }
        assert_eq!(sizes, [FRAME, FRAME, FRAME, 7]);
        assert_eq!(joined, bytes);
        assert!(http_body::Body::is_end_stream(&full(Bytes::new())));
    }
}
