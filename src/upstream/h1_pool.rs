//! The connection pool of plain `http://` upstreams: idle HTTP/1.1
//! connections kept per host and reused newest first, each driven by its
//! own task. It is leaner than hyper-util's general pool on purpose: a
//! connection goes back to the pool the moment its response body ends,
//! without a task spawned per request to wait for that, and a checkout is a
//! short uncontended lock over a small queue. Upstreams beside the sidecar
//! (the app, a local model server) are where this cost shows, because the
//! network adds almost nothing to it.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tower_service::Service;

use super::client::ClientError;
use crate::body::BoxBody;

type Sender = http1::SendRequest<BoxBody>;

/// Idle connections kept per pool; past this, a connection whose answer
/// ended is closed instead of kept.
const MAX_IDLE: usize = 1024;
/// The largest read or write buffer of an upstream connection.
const MAX_BUFFER: usize = 64 * 1024;

/// Idle connections to plain-HTTP hosts, and how to make new ones.
pub struct H1Pool {
    connector: HttpConnector,
    idle_timeout: Duration,
    /// Oldest at the front: returns push at the back, checkouts pop from
    /// the back (the connection most likely still open), and the reaper
    /// trims the front.
    idle: Mutex<VecDeque<Idle>>,
    reaper_started: std::sync::atomic::AtomicBool,
}

struct Idle {
    authority: Authority,
    sender: Sender,
    since: Instant,
}

impl H1Pool {
    pub fn new(connector: HttpConnector, idle_timeout: Duration) -> Arc<Self> {
        Arc::new(H1Pool {
            connector,
            idle_timeout,
            idle: Mutex::new(VecDeque::new()),
            reaper_started: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Sends `req` (an absolute `http://` URI) on an idle connection to its
    /// host, or on a new one. A request that a reused connection closed
    /// before it was written goes out again on a fresh connection, as
    /// hyper-util's pool does: the upstream never saw it. So does a
    /// replayable one (see [`replay_of`]) that a reused connection failed
    /// before any answer: the upstream closed an idle connection as it was
    /// being reused, a race every keep-alive timeout shorter than ours
    /// loses now and then (Go's and nginx's clients replay these too).
    pub async fn request(
        self: &Arc<Self>,
        mut req: Request<BoxBody>,
    ) -> Result<Response<Leased>, ClientError> {
        let authority = req
            .uri()
            .authority()
            .cloned()
            .ok_or(ClientError::InvalidUri)?;
        if !req.headers().contains_key(http::header::HOST) {
            let host = host_header(&authority, 80).ok_or(ClientError::InvalidUri)?;
            req.headers_mut().insert(http::header::HOST, host);
        }
        // HTTP/1.1 to an origin server names the target by path alone.
        let origin_form = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(origin_form);
        let mut replayed = false;
        loop {
            let checked_out = if replayed {
                None
            } else {
                self.checkout(&authority)
            };
            let (mut sender, reused) = match checked_out {
                Some(sender) => (sender, true),
                None => (self.connect(&authority).await?, false),
            };
            if sender.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(ClientError::Closed);
            }
            let replay = if reused { replay_of(&req) } else { None };
            match (sender.try_send_request(req).await, replay) {
                // A 408 closing a reused connection is the upstream
                // closing it as idle (HAProxy and others say so), not an
                // answer to this request: a replayable one goes again on
                // a fresh connection, as Go's client does. (A 408 that
                // keeps its connection is the upstream's answer.)
                (Ok(resp), Some(again)) if closes_as_timed_out(&resp) => {
                    tracing::debug!("replaying a request a reused upstream connection timed out");
                    drop(resp);
                    req = again;
                    replayed = true;
                }
                (Ok(resp), _) => {
                    let lease = Lease {
                        pool: Arc::downgrade(self),
                        authority,
                        sender,
                        // hyper sends the next request on a connection that
                        // answered in HTTP/1.0 as HTTP/1.0, where a chunked
                        // body has no framing and is left out: such a
                        // connection serves no second request.
                        reusable: resp.version() != http::Version::HTTP_10,
                    };
                    return Ok(resp.map(|inner| Leased {
                        inner,
                        lease: Some(lease),
                    }));
                }
                (Err(mut e), replay) => match (e.take_message(), replay) {
                    (Some(unsent), _) if reused => req = unsent,
                    // A new connection closed before the request was sent.
                    (Some(_), _) => return Err(ClientError::Closed),
                    (None, Some(again)) => {
                        tracing::debug!(error = %e.error(), "replaying a request a reused upstream connection dropped");
                        req = again;
                        replayed = true;
                    }
                    (None, None) => {
                        let e = e.into_error();
                        let garbled = e.is_parse() || e.is_parse_status() || e.is_parse_too_large();
                        return Err(if reused && !garbled {
                            ClientError::ReusedClosed(e)
                        } else {
                            ClientError::Http(e)
                        });
                    }
                },
            }
        }
    }

    fn checkout(&self, authority: &Authority) -> Option<Sender> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        // Newest first; closed or expired connections found on the way are
        // dropped (the scan stops at the first usable one).
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let entry = &idle[i];
            if entry.sender.is_closed() || now.duration_since(entry.since) > self.idle_timeout {
                idle.remove(i);
                continue;
            }
            if entry.authority == *authority {
                return idle.remove(i).map(|e| e.sender);
            }
        }
        None
    }

    async fn connect(self: &Arc<Self>, authority: &Authority) -> Result<Sender, ClientError> {
        self.start_reaper();
        let uri = Uri::builder()
            .scheme("http")
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|_| ClientError::InvalidUri)?;
        let mut connector = self.connector.clone();
        let io: TokioIo<tokio::net::TcpStream> = connector
            .call(uri)
            .await
            .map_err(|e| ClientError::Connect(e.into()))?;
        // One buffer, one write per message (as the listener does).
        let (sender, conn) = http1::Builder::new()
            .writev(false)
            // The write buffer grows to what is queued in it and keeps
            // that size while the connection idles in the pool: bounded
            // here (with `body::full`'s 64 KiB frames) instead of
            // hyper's ~400 KB. It also bounds a response head, roughly
            // (hyper checks it between reads).
            .max_buf_size(MAX_BUFFER)
            .handshake(io)
            .await
            .map_err(ClientError::Http)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    fn keep(&self, authority: Authority, sender: Sender) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() >= MAX_IDLE {
            return;
        }
        idle.push_back(Idle {
            authority,
            sender,
            since: Instant::now(),
        });
    }

    /// Closes connections idle past the timeout even when no request comes
    /// to find them. One task per pool, started by its first connection
    /// (building a pool needs no runtime: `sluice check` builds them too);
    /// it ends with the pool.
    fn start_reaper(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.reaper_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool = Arc::downgrade(self);
        let period = (self.idle_timeout / 2).max(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                let now = Instant::now();
                let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
                idle.retain(|e| {
                    !e.sender.is_closed() && now.duration_since(e.since) <= pool.idle_timeout
                });
            }
        });
    }
}

/// A copy of `req` to send again if a reused connection fails it before
/// any answer, when sending it twice is safe: an idempotent method with
/// no body (RFC 9110 §9.2.2; a `DELETE /v1/files/{id}` among them).
/// Others (a chat completion is a POST) are never replayed: the upstream
/// may have started on it.
pub(super) fn replay_of(req: &Request<BoxBody>) -> Option<Request<BoxBody>> {
    use http::Method;
    let method = req.method();
    let idempotent = matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    if !idempotent || !req.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(crate::body::empty());
    *copy.method_mut() = method.clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// A 408 with `connection: close`: how an upstream closes a connection
/// that sat idle too long.
fn closes_as_timed_out<B>(resp: &Response<B>) -> bool {
    resp.status() == http::StatusCode::REQUEST_TIMEOUT
        && resp
            .headers()
            .get_all(http::header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"close"))
}

/// `Host` for an authority, without the scheme's default port (as
/// browsers and hyper-util send it).
/// Built from the host and port alone: credentials in the URL's userinfo
/// never reach the header.
pub fn host_header(authority: &Authority, default_port: u16) -> Option<HeaderValue> {
    match authority.port_u16() {
        Some(port) if port != default_port => {
            HeaderValue::try_from(format!("{}:{port}", authority.host())).ok()
        }
        _ => HeaderValue::from_str(authority.host()).ok(),
    }
}

/// A connection lent to one response.
struct Lease {
    pool: Weak<H1Pool>,
    authority: Authority,
    sender: Sender,
    reusable: bool,
}

impl Lease {
    fn give_back(self) {
        let Lease {
            pool,
            authority,
            mut sender,
            reusable,
        } = self;
        if sender.is_closed() || !reusable {
            return;
        }
        if sender.is_ready() {
            if let Some(pool) = pool.upgrade() {
                pool.keep(authority, sender);
            }
            return;
        }
        // The answer ended before the request did (an upstream may answer
        // early) or the connection is still finishing the exchange: it
        // joins the pool once free, so a checkout never waits on another
        // request's body.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if sender.ready().await.is_ok()
                    && let Some(pool) = pool.upgrade()
                {
                    pool.keep(authority, sender);
                }
            });
        }
    }
}

/// A response body that returns its connection to the pool once it has
/// ended. A body dropped before its end takes the connection down with it
/// (hyper closes a connection whose answer was not read to the end).
pub struct Leased {
    inner: Incoming,
    lease: Option<Lease>,
}

impl Leased {
    fn release_if_ended(&mut self) {
        if self.inner.is_end_stream()
            && let Some(lease) = self.lease.take()
        {
            lease.give_back();
        }
    }
}

impl Body for Leased {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => {
                if let Some(lease) = self.lease.take() {
                    lease.give_back();
                }
            }
            Poll::Ready(Some(Ok(_))) => self.release_if_ended(),
            Poll::Ready(Some(Err(_))) => self.lease = None,
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Leased {
    fn drop(&mut self) {
        // Servers stop reading at the last byte they expect, and sluice
        // drops bodies unread (health probes, failover past a `retry_on`
        // status). The connection goes back once hyper has found it idle:
        // at once if the body was read to its end, else once hyper has
        // drained it; hyper closes it instead if it cannot.
        if let Some(lease) = self.lease.take() {
            lease.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A keep-alive upstream that answers `ok` to every request and counts
    /// its connections.
    async fn upstream() -> (Authority, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let authority = listener
            .local_addr()
            .expect("addr")
            .to_string()
            .parse()
            .expect("authority");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if socket.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (authority, accepted)
    }

    async fn get(pool: &Arc<H1Pool>, authority: &Authority) -> Bytes {
        let req = Request::get(format!("http://{authority}/"))
            .body(crate::body::empty())
            .expect("request");
        let resp = pool.request(req).await.expect("response");
        resp.into_body().collect().await.expect("body").to_bytes()
    }

    #[tokio::test]
    async fn a_connection_idle_past_the_timeout_is_not_reused() {
        let (authority, accepted) = upstream().await;
        let pool = H1Pool::new(HttpConnector::new(), Duration::from_millis(50));
        assert_eq!(get(&pool, &authority).await, "ok");
        assert_eq!(get(&pool, &authority).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "reused while fresh");
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert_eq!(get(&pool, &authority).await, "ok");
        assert_eq!(accepted.load(Ordering::SeqCst), 2, "replaced once stale");
    }

    #[test]
    fn host_headers_leave_out_credentials_and_default_ports() {
        let host = |a: &str, port| host_header(&a.parse().unwrap(), port).unwrap();
        assert_eq!(host("user:secret@app:8080", 80), "app:8080");
        assert_eq!(host("user:secret@app:80", 80), "app");
        assert_eq!(host("app", 80), "app");
        assert_eq!(host("[::1]:9000", 80), "[::1]:9000");
        assert_eq!(host("api.example.com:443", 443), "api.example.com");
    }

    #[tokio::test]
    async fn connections_are_kept_per_host() {
        let (a, accepted_a) = upstream().await;
        let (b, accepted_b) = upstream().await;
        let pool = H1Pool::new(HttpConnector::new(), Duration::from_secs(60));
        for _ in 0..3 {
            assert_eq!(get(&pool, &a).await, "ok");
            assert_eq!(get(&pool, &b).await, "ok");
        }
        assert_eq!(accepted_a.load(Ordering::SeqCst), 1);
        assert_eq!(accepted_b.load(Ordering::SeqCst), 1);
    }
}
