//! hyper's own answer to a request head it refuses (431 for one over the
//! bound, 414, 400 for one it cannot parse: its `Server::on_error`),
//! given the SPEC's shape on its way out: a JSON error body and an
//! `x-request-id`, as every other answer of sluice has. hyper offers no
//! hook for that answer, so it is recognised in the bytes written: an
//! exact head no answer of sluice's has (sluice's carry `x-request-id`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::ctx::ConnInfo;
use crate::proxy::{self, error::error_body};

/// A connection's stream, its refusals rewritten.
pub struct Refusals<S> {
    inner: S,
    conn: Arc<ConnInfo>,
    /// The answer written in place of hyper's, how much of it is
    /// written, and the length of hyper's, reported once it is all out.
    rewrite: Option<(Vec<u8>, usize, usize)>,
    /// Bytes came from the client since the last write: hyper answers a
    /// head it refuses right after reading it, while an answer's body
    /// is written as its upstream sends it (and may, byte for byte, be
    /// a refusal's text: that is passed on as it is).
    read_since_write: bool,
    /// No answer of the connection was in progress when bytes last came
    /// (see [`ConnInfo::answering`]): they begin a new request. Bytes that
    /// came while one was (a pipelined request, a stray CRLF) are no
    /// head hyper answers before that answer's last bytes are written,
    /// which may read like a refusal.
    read_while_idle: bool,
    /// HTTP/1 only: hyper's h2 layer answers in frames, and its writes
    /// pass untouched.
    enabled: bool,
}

impl<S> Refusals<S> {
    pub fn new(inner: S, conn: Arc<ConnInfo>, enabled: bool) -> Self {
        Refusals {
            inner,
            conn,
            rewrite: None,
            read_since_write: false,
            read_while_idle: false,
            enabled,
        }
    }

    /// Whether `written` is hyper's refusal of the head just read: bytes
    /// came since the last write (hyper answers a head right after
    /// reading it), while no answer of the connection's was being
    /// written (whose body's bytes could read the same).
    fn refusal(&self, written: &[u8]) -> Option<u16> {
        if self.enabled && self.read_since_write && self.read_while_idle {
            refused_status(written)
        } else {
            None
        }
    }
}

/// What follows the status line in hyper's refusal, but for the date.
const REFUSAL_HEADERS: &[u8] = b"connection: close\r\ncontent-length: 0\r\ndate: ";
/// The same after an HTTP/1.0 exchange kept alive (hyper answers in
/// HTTP/1.0 then, and leaves `connection` out).
const REFUSAL_HEADERS_1_0: &[u8] = b"content-length: 0\r\ndate: ";
/// An IMF-fixdate (`Mon, 30 Nov 2026 06:26:52 GMT`) and the head's end.
const DATE_AND_END: usize = 29 + 4;

/// The status of hyper's refusal, when `written` is one.
fn refused_status(written: &[u8]) -> Option<u16> {
    // The cheap test first: this runs on every write of a connection.
    let headers = match written.get(..10) {
        _ if written.len() > 160 || !written.ends_with(b"\r\n\r\n") => return None,
        Some(b"HTTP/1.1 4") => REFUSAL_HEADERS,
        Some(b"HTTP/1.0 4") => REFUSAL_HEADERS_1_0,
        _ => return None,
    };
    let line_end = memchr::memmem::find(written, b"\r\n")?;
    let rest = &written[line_end + 2..];
    if rest.len() != headers.len() + DATE_AND_END || !rest.starts_with(headers) {
        return None;
    }
    std::str::from_utf8(written.get(9..12)?).ok()?.parse().ok()
}

/// sluice's answer for a refused head: the same status, in the SPEC's
/// shape (the code as the access log names it).
fn answer(version: &str, status: u16, date: &[u8], request_id: &str) -> Vec<u8> {
    let (reason, message) = match status {
        431 => (
            "Request Header Fields Too Large",
            "the request's head is too large (its line and headers past 64 KiB, or over 100 headers)",
        ),
        414 => ("URI Too Long", "the request's URI is too long"),
        _ => ("Bad Request", "the request's head is not valid HTTP/1.1"),
    };
    let code = proxy::refused_head_code(status);
    raw_error_answer(
        version,
        status,
        reason,
        message,
        code,
        request_id,
        Some(date),
    )
}

/// An error answer in the SPEC's shape, written as raw bytes where
/// hyper's server is not the one answering (a refused head, a plain
/// HTTP request on the TLS port), closing its connection.
pub fn raw_error_answer(
    version: &str,
    status: u16,
    reason: &str,
    message: &str,
    code: &str,
    request_id: &str,
    date: Option<&[u8]>,
) -> Vec<u8> {
    let body = error_body(message, "invalid_request_error", None, code);
    let mut out = format!(
        "{version} {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {request_id}\r\nconnection: close\r\n",
        body.len()
    )
    .into_bytes();
    if let Some(date) = date {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body.as_bytes());
    out
}

impl<S: AsyncRead + Unpin> AsyncRead for Refusals<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.read_since_write = true;
            self.read_while_idle = self
                .conn
                .answering
                .load(std::sync::atomic::Ordering::Relaxed)
                == 0;
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Refusals<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.rewrite.is_none() {
            let refused = this.refusal(buf);
            this.read_since_write = false;
            let Some(status) = refused else {
                return Pin::new(&mut this.inner).poll_write(cx, buf);
            };
            let date_at = buf.len() - DATE_AND_END;
            let date = &buf[date_at..date_at + 29];
            let id = this
                .conn
                .refusal_id
                .get_or_init(|| proxy::headers::request_id(&http::HeaderMap::new()));
            // In the version hyper answered in (HTTP/1.0 to such a client).
            let version = if buf.starts_with(b"HTTP/1.0") {
                "HTTP/1.0"
            } else {
                "HTTP/1.1"
            };
            let answer = answer(version, status, date, id.to_str().unwrap_or("-"));
            this.rewrite = Some((answer, 0, buf.len()));
        }
        // hyper calls again with the same bytes until they are taken.
        loop {
            let Some((answer, written, taken)) = this.rewrite.as_mut() else {
                return Poll::Ready(Ok(buf.len()));
            };
            if *written == answer.len() {
                let taken = *taken;
                this.rewrite = None;
                return Poll::Ready(Ok(taken));
            }
            match Pin::new(&mut this.inner).poll_write(cx, &answer[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => *written += n,
                other => return other,
            }
        }
    }

    /// HTTP/2's frames go out vectored as they would unwrapped; HTTP/1's
    /// heads are written flat (hyper's `writev(false)`), so a refusal
    /// comes through `poll_write`.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        if self.rewrite.is_some() || self.refusal(first).is_some() {
            return self.poll_write(cx, first);
        }
        self.read_since_write = false;
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

    const HYPERS: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Mon, 30 Nov 2026 06:26:52 GMT\r\n\r\n";

    #[test]
    fn only_hypers_exact_refusal_is_recognised() {
        assert_eq!(refused_status(HYPERS), Some(431));
        let bad = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Mon, 30 Nov 2026 06:26:52 GMT\r\n\r\n";
        assert_eq!(refused_status(bad), Some(400));
        let after_1_0 = b"HTTP/1.0 400 Bad Request\r\ncontent-length: 0\r\ndate: Mon, 30 Nov 2026 06:26:52 GMT\r\n\r\n";
        assert_eq!(refused_status(after_1_0), Some(400));
        // sluice's own answers, an upstream's empty 4xx, a body's bytes.
        for other in [
            &b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nx-request-id: a\r\ndate: Mon, 30 Nov 2026 06:26:52 GMT\r\n\r\n"[..],
            b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\nx-request-id: 0123456789abcdef0123\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 0\r\ndate: Mon, 30 Nov 2026 06:26:52 GMT\r\n\r\n",
            b"data: HTTP/1.1 400\r\n\r\n",
        ] {
            assert_eq!(refused_status(other), None, "{}", String::from_utf8_lossy(other));
        }
    }

    /// Only a refusal written right after the client's bytes were read
    /// is rewritten: the same text as an answer's body goes as it is.
    #[tokio::test]
    async fn only_an_answer_to_bytes_just_read_is_rewritten() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let conn = Arc::new(ConnInfo::new("127.0.0.1:1".parse().unwrap(), false));
        let (ours, mut client) = tokio::io::duplex(4096);
        let mut stream = Refusals::new(ours, conn.clone(), true);
        // A body's bytes, no request read since the last write.
        stream.write_all(HYPERS).await.unwrap();
        let mut seen = vec![0; HYPERS.len()];
        client.read_exact(&mut seen).await.unwrap();
        assert_eq!(seen, HYPERS);
        // Bytes read while an answer is written (a pipelined request):
        // its body's last bytes still pass, written once hyper has
        // dropped the body (the answer no longer counted).
        conn.answering
            .store(1, std::sync::atomic::Ordering::Relaxed);
        client.write_all(b"GET /next HTTP/1.1\r\n").await.unwrap();
        let mut pipelined = [0; 64];
        let _ = stream.read(&mut pipelined).await.unwrap();
        conn.answering
            .store(0, std::sync::atomic::Ordering::Relaxed);
        stream.write_all(HYPERS).await.unwrap();
        client.read_exact(&mut seen).await.unwrap();
        assert_eq!(seen, HYPERS);
        // A head read, then refused.
        client
            .write_all(b"GET / HTTP/1.1\r\nbad\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0; 64];
        let _ = stream.read(&mut head).await.unwrap();
        stream.write_all(HYPERS).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).await.unwrap();
        let id = conn.refusal_id.get().expect("an id").to_str().unwrap();
        assert!(
            answer.contains(&format!("x-request-id: {id}\r\n")),
            "{answer}"
        );
        assert!(answer.contains(r#""code":"request_too_large""#), "{answer}");
    }

    #[test]
    fn the_answer_is_json_with_its_length_and_request_id() {
        let text = String::from_utf8(answer(
            "HTTP/1.1",
            431,
            b"Mon, 30 Nov 2026 06:26:52 GMT",
            "rid-1",
        ))
        .unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"));
        assert!(head.contains("\r\nx-request-id: rid-1\r\n"), "{head}");
        assert!(
            head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())),
            "{head}"
        );
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "request_too_large");
    }
}
