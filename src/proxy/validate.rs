//! Phase 3, request checks before anything is forwarded: the body size
//! limit (413). A declared `content-length` over the limit is refused at
//! once; a chunked body is counted as it streams and cut off at the limit.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, header};
use http_body::{Body, Frame, SizeHint};

use super::error::ProxyError;
use crate::body::{BodyError, BoxError};

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

/// Set when a [`CappedBody`] hit its limit, so the forward phase can tell
/// "the client sent too much" (413) from "the upstream failed" (502).
#[derive(Clone, Default)]
pub struct OverLimit(Arc<AtomicBool>);

impl OverLimit {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("request body exceeds {0} bytes")]
pub struct BodyTooLarge(pub u64);

/// A streaming request body that fails once more than `limit` bytes passed.
pub struct CappedBody<B> {
    inner: B,
    remaining: u64,
    limit: u64,
    flag: OverLimit,
}

impl<B> CappedBody<B> {
    pub fn new(inner: B, limit: u64) -> (Self, OverLimit) {
        let flag = OverLimit::default();
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
                        this.flag.0.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(BodyError::new(BodyTooLarge(this.limit)))));
                    }
                    this.remaining -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyError::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
