//! `RawUpstream`: an upstream written at the byte level, for answers a
//! well-behaved HTTP server would never send (conflicting framing) and
//! connection behaviour hyper hides (closing a kept-alive connection).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How the upstream treats a connection after each answer.
#[derive(Clone, Copy, Debug)]
pub enum AfterAnswer {
    /// Keeps it open for the next request.
    KeepAlive,
    /// Closes it once it has been idle this long, as app servers'
    /// keep-alive timeouts do, without saying so in the answer.
    CloseWhenIdle(Duration),
    /// Closes it, unanswered, when its next request comes: an upstream
    /// closing an idle connection just as it is reused.
    DropTheNext,
    /// Answers its next request `408` with `connection: close` and
    /// closes it: how HAProxy and others close an idle connection.
    TimeOutTheNext,
}

pub struct RawUpstream {
    addr: std::net::SocketAddr,
    /// Served over TLS (reached as `localhost`).
    tls: bool,
    requests: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RawUpstream {
    /// Answers every request with `answer`, as it is.
    pub async fn start(answer: &'static [u8], after: AfterAnswer) -> Self {
        Self::spawn(answer, after, None).await
    }

    /// [`RawUpstream::start`] over TLS (HTTP/1.1), with `pki`'s
    /// certificate for `localhost`.
    pub async fn start_tls(
        answer: &'static [u8],
        after: AfterAnswer,
        pki: &super::TestPki,
    ) -> Self {
        let acceptor = super::upstream::tls_acceptor(&pki.cert_pem, &pki.key_pem, &[b"http/1.1"]);
        Self::spawn(answer, after, Some(acceptor)).await
    }

    async fn spawn(
        answer: &'static [u8],
        after: AfterAnswer,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let requests = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let (counted, kept) = (requests.clone(), heads.clone());
        let secure = tls.is_some();
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (counted, kept) = (counted.clone(), kept.clone());
                match tls.clone() {
                    None => {
                        tokio::spawn(serve(conn, answer, after, counted, kept));
                    }
                    Some(acceptor) => {
                        tokio::spawn(async move {
                            if let Ok(conn) = acceptor.accept(conn).await {
                                serve(conn, answer, after, counted, kept).await;
                            }
                        });
                    }
                }
            }
        });
        RawUpstream {
            addr,
            tls: secure,
            requests,
            heads,
            task,
        }
    }

    pub fn url(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    /// Requests received so far (answered or not).
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// The request heads received, as text.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().expect("heads").clone()
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: S,
    answer: &'static [u8],
    after: AfterAnswer,
    requests: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
) {
    let mut buf = Vec::new();
    let mut answered = false;
    loop {
        let idle = match after {
            AfterAnswer::CloseWhenIdle(idle) => idle,
            _ => Duration::from_secs(3600),
        };
        // A request head, then as many body bytes as its content-length
        // says (the tests send no chunked bodies here).
        let head_end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout(idle, conn.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let length = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match conn.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => return,
            }
        }
        buf.drain(..head_end + length);
        heads.lock().expect("heads").push(head);
        requests.fetch_add(1, Ordering::SeqCst);
        if answered && matches!(after, AfterAnswer::DropTheNext) {
            return;
        }
        if answered && matches!(after, AfterAnswer::TimeOutTheNext) {
            let _ = conn
                .write_all(b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
                .await;
            return;
        }
        answered = true;
        if conn.write_all(answer).await.is_err() {
            return;
        }
    }
}

/// Sends raw bytes and reads the answer's status and whole text.
pub async fn raw_exchange(gw: &super::TestGateway, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    conn.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        conn.read_to_end(&mut got),
    )
    .await;
    let text = String::from_utf8_lossy(&got).into_owned();
    // The final answer's status, after any interim (1xx) ones.
    let mut rest = text.as_str();
    loop {
        let status: u16 = rest
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        match rest.split_once("\r\n\r\n") {
            Some((_, after)) if (100..200).contains(&status) => rest = after,
            _ => return (status, text),
        }
    }
}

/// An HTTP/1.1 200 SSE answer carrying `events` as one chunk, its body
/// left unended (no last chunk), for an upstream that then closes, stalls
/// or keeps it open.
pub fn unended_sse_answer(events: &str) -> &'static [u8] {
    Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{events}\r\n",
            events.len()
        )
        .into_bytes()
        .into_boxed_slice(),
    )
}
