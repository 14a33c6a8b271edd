//! The first bytes of a client connection, read before hyper sees it and
//! then replayed. hyper-util tells HTTP/1 from h2 by reading until the
//! bytes decide, with no timer, and hyper's `header_read_timeout` only
//! starts after that: a client that sends nothing, or `P` and nothing
//! more, would hold a connection slot for ever. Here the same reading is
//! bounded by `header_read_timeout`. (Past the h2 preface, the listener's
//! h2 keep-alive pings take over.)

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What an h2 connection starts with (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads from `stream` until its first bytes decide the protocol: the
/// whole h2 preface, or a byte that leaves it. `None` when `timeout`
/// passes first or the client closes.
pub async fn read<S: AsyncRead + Unpin>(stream: &mut S, timeout: Duration) -> Option<Vec<u8>> {
    let reading = async {
        let mut head = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            let n = stream.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            head.extend_from_slice(&chunk[..n]);
            if head.len() >= H2_PREFACE.len() || !H2_PREFACE.starts_with(&head) {
                return Some(head);
            }
        }
    };
    tokio::time::timeout(timeout, reading).await.ok().flatten()
}

/// Whether a connection's first bytes (from [`read`]) are h2's preface.
pub fn is_h2(head: &[u8]) -> bool {
    head.starts_with(H2_PREFACE)
}

/// A stream whose first bytes, already read, are read again first.
pub struct Rewound<S> {
    head: Vec<u8>,
    /// How much of `head` was read again.
    pos: usize,
    inner: S,
}

impl<S> Rewound<S> {
    pub fn new(head: Vec<u8>, inner: S) -> Self {
        Rewound {
            head,
            pos: 0,
            inner,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewound<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.head.len() {
            let rest = &this.head[this.pos..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.pos += n;
            if this.pos == this.head.len() {
                this.head = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewound<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn reads_until_the_protocol_is_decided_then_replays() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let head = read(&mut server, Duration::from_secs(1)).await.unwrap();
        assert_eq!(head, b"GET / HTTP/1.1\r\n");
        let mut rewound = Rewound::new(head, server);
        client.write_all(b"host: x\r\n\r\n").await.unwrap();
        drop(client);
        let mut all = String::new();
        rewound.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "GET / HTTP/1.1\r\nhost: x\r\n\r\n");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_preface_times_out() {
        let (mut client, mut server) = tokio::io::duplex(64);
        // The start of the h2 preface, then nothing: not decided yet.
        client.write_all(b"PRI * HT").await.unwrap();
        assert_eq!(read(&mut server, Duration::from_secs(1)).await, None);
        // Nothing at all, or a close: no head either.
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        assert_eq!(read(&mut server, Duration::from_secs(1)).await, None);
    }

    #[tokio::test]
    async fn the_whole_h2_preface_decides() {
        let (mut client, mut server) = tokio::io::duplex(64);
        client.write_all(H2_PREFACE).await.unwrap();
        let head = read(&mut server, Duration::from_secs(1)).await.unwrap();
        assert_eq!(head, H2_PREFACE);
    }
}
