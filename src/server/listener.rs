//! The proxy listener: accepts connections up to `max_connections`, serves
//! HTTP/1.1 and HTTP/2 (h2c, or h2 by ALPN over TLS) with a header read
//! timeout, and drains gracefully on shutdown.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use super::accept::{AcceptErrors, Full};
use super::deadline::Deadline;
use super::drain::{Drain, Guard, Member};
use super::idle::{Activity, Watch};
use super::preface;
use super::refusal::Refusals;
use crate::gateway::Gateway;
use crate::proxy::{self, ctx::ConnInfo};

/// The most an HTTP/1 request head may take (request line and headers).
const MAX_HEAD: usize = 64 * 1024;

pub async fn serve(
    gw: Arc<Gateway>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
    cut: Arc<tokio::sync::Notify>,
) {
    let limits = gw.active().snapshot.limits.clone();
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let drain = Drain::default();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .keep_alive(true)
        // Head and body copied into one buffer and sent with one write:
        // for the small messages an LLM API mostly exchanges this costs
        // less than a vectored write of separate pieces (~3% of CPU per
        // request in bench/run.sh).
        .writev(false)
        // hyper's default lets a request head reach ~400 KB, held per
        // connection while it is read; 64 KiB is Envoy's bound (nginx's
        // is 8 KB by default). Larger heads get 431.
        .max_buf_size(MAX_HEAD);
    // An h2 client that sent its preface and then nothing, or vanished,
    // must not hold a slot for ever either: a ping unanswered within
    // header_read_timeout closes the connection (live clients answer).
    builder
        .http2()
        .timer(TokioTimer::new())
        // The same bound on a request's head as over HTTP/1 (h2's own
        // default is 16 KiB, answered by hyper with an unlogged 431).
        .max_header_list_size(MAX_HEAD as u32)
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.header_read_timeout);
    let builder = Arc::new(builder);
    let mut accept_errors = AcceptErrors::new("proxy");
    let mut full = Full::default();
    let open = gw.metrics.connections_open.clone();

    loop {
        // Waiting for a permit before accepting leaves excess connections in
        // the kernel backlog instead of accepting and then dropping them.
        if permits.available_permits() == 0 {
            full.note(limits.max_connections);
        }
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = shutdown.changed() => break,
        };
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    accept_errors.back_off(&e).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = stream.set_nodelay(true);
        let open = OpenConnection::new(&open, permit);
        let mut conn = ConnInfo::new(remote, tls.is_some());
        let member = drain.join();
        conn.unanswered = Some(member.unanswered());
        let gw = gw.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        let handshake_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            let mut connection = Connection {
                gw,
                builder,
                member,
                handshake_timeout,
            };
            match tls {
                None => connection.serve(stream, conn).await,
                Some(acceptor) => {
                    // One deadline for the first byte and the handshake.
                    let deadline = tokio::time::Instant::now() + handshake_timeout;
                    let first = tokio::time::timeout_at(deadline, first_byte(&stream));
                    match connection.member.unless_draining(first).await {
                        // Draining, or nothing (in time): closed.
                        None | Some(Err(_) | Ok(None)) => {}
                        // A request line (`GET …`), where a ClientHello
                        // (0x16) belongs: answered, as nginx does, rather
                        // than closed without a word.
                        Some(Ok(Some(byte))) if byte.is_ascii_uppercase() => {
                            answer_plain_http(&connection.gw, stream, &conn).await;
                        }
                        Some(Ok(Some(_))) => {
                            let handshake = tls_handshake(acceptor, stream, deadline);
                            if let Some(Some(tls_stream)) =
                                connection.member.unless_draining(handshake).await
                            {
                                connection.serve(tls_stream, conn).await;
                            }
                        }
                    }
                }
            }
            drop(open);
        });
    }
    // Probes see 503 from now on; in-flight requests carry on.
    gw.set_draining();
    drop(listener);
    let grace = limits.shutdown_grace;
    tokio::select! {
        () = drain.drained() => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!(grace_s = grace.as_secs_f64(), "shutdown grace elapsed; closing remaining connections");
            gw.cut_remaining();
            cut_within(&drain).await;
        }
        () = cut.notified() => {
            tracing::warn!("asked again to stop; closing remaining connections");
            gw.cut_remaining();
            cut_within(&drain).await;
        }
    }
}

/// Cuts the connections still open and waits until they are gone, so
/// that their requests are logged before `stopped`; bounded, as a stop
/// must never hang.
async fn cut_within(drain: &Drain) {
    let _ = tokio::time::timeout(Duration::from_secs(1), drain.cut()).await;
}

/// What serving one accepted connection takes, whatever its transport.
struct Connection {
    gw: Arc<Gateway>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    member: Member,
    handshake_timeout: Duration,
}

impl Connection {
    /// Serves `stream` (plain, or after its TLS handshake) to its end.
    async fn serve<S>(self, mut stream: S, mut conn: ConnInfo)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            gw,
            builder,
            mut member,
            handshake_timeout,
        } = self;
        // hyper's `header_read_timeout` starts once the protocol is known:
        // the bytes that tell it are read here, within that timeout, and
        // replayed to hyper. An h2 connection is watched for quiet instead
        // (see `idle`).
        let first_bytes = preface::read(&mut stream, handshake_timeout);
        let Some(Some(head)) = member.unless_draining(first_bytes).await else {
            return;
        };
        let guard = if preface::is_h2(&head) {
            let activity = Arc::new(Activity::default());
            conn.activity = Some(activity.clone());
            let deadline = Arc::new(Deadline::multiplexed());
            conn.deadline = Some(deadline.clone());
            let quiet = Watch {
                activity,
                after: handshake_timeout,
            };
            Guard::Multiplexed(quiet, deadline)
        } else {
            let deadline = Arc::new(Deadline::default());
            conn.deadline = Some(deadline.clone());
            Guard::Deadline(deadline)
        };
        // Shared by the connection's requests: one count per request.
        let conn = Arc::new(conn);
        let service = {
            let (gw, conn) = (gw.clone(), conn.clone());
            service_fn(move |req| {
                let gw = gw.clone();
                let conn = conn.clone();
                async move { Ok::<_, Infallible>(proxy::handle(gw, req, conn).await) }
            })
        };
        let h1 = !preface::is_h2(&head);
        let io = TokioIo::new(Refusals::new(
            preface::Rewound::new(head, stream),
            conn.clone(),
            h1,
        ));
        let served = builder.serve_connection(io, service);
        let ended = member
            .serve(served, |c| c.graceful_shutdown(), Some(guard))
            .await;
        if let Some(Err(e)) = ended {
            proxy::account_refused_head(&gw, &conn, &*e);
        }
    }
}

/// One accepted connection: its `max_connections` slot and its place in
/// `sluice_connections_open`, both given back when it is dropped.
struct OpenConnection {
    gauge: prometheus::IntGauge,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl OpenConnection {
    fn new(gauge: &prometheus::IntGauge, permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        gauge.inc();
        OpenConnection {
            gauge: gauge.clone(),
            _permit: permit,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The first byte a client sends, once it comes, left unread; `None`
/// when the connection ends first.
async fn first_byte(stream: &TcpStream) -> Option<u8> {
    let mut byte = [0u8; 1];
    match stream.peek(&mut byte).await {
        Ok(1) => Some(byte[0]),
        _ => None,
    }
}

/// Answers a plain-HTTP request sent to the TLS listener with a 400 that
/// says so (logged and counted as a request whose head was not read),
/// then closes the connection.
async fn answer_plain_http(gw: &Gateway, mut stream: TcpStream, conn: &ConnInfo) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request_id = proxy::headers::request_id(&http::HeaderMap::new());
    let answer = super::refusal::raw_error_answer(
        "HTTP/1.1",
        400,
        "Bad Request",
        "a plain HTTP request was sent to this HTTPS port: use https://",
        PLAIN_HTTP_CODE,
        request_id.to_str().unwrap_or("-"),
        None,
    );
    proxy::account_unread_head(gw, conn, 400, PLAIN_HTTP_CODE, request_id);
    let answer = async {
        stream.write_all(&answer).await?;
        stream.shutdown().await?;
        // What the client sent is read (and dropped) for a moment: a
        // socket closed with unread bytes resets, and the reset could
        // reach the client before the answer.
        let mut sink = [0u8; 4096];
        let mut left: usize = 64 * 1024;
        while left > 0 {
            let n = stream.read(&mut sink).await?;
            if n == 0 {
                break;
            }
            left = left.saturating_sub(n);
        }
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

/// The error code of a plain-HTTP request on the TLS listener.
const PLAIN_HTTP_CODE: &str = "plain_http_to_https_port";

async fn tls_handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    deadline: tokio::time::Instant,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => None,
    }
}
