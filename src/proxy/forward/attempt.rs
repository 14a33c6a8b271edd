//! One attempt at one upstream: sending, waiting for the answer's head, and
//! naming why it failed.

use super::*;

/// The largest error answer read to see whether it names
/// `stream_options`.
const REFUSAL_SNIFF: u64 = 64 * 1024;

/// An attempt with `body`, which asks for stream usage when `plain` (the
/// body as the client sent it) is there. An upstream that refuses the
/// question (a 400 naming `stream_options`, as older Azure OpenAI API
/// versions answer) is asked again with `plain`, and not asked for usage
/// again: metering must never break a request that works without sluice.
pub(super) async fn attempt_asking_usage(
    active: &Active,
    index: usize,
    ctx: &mut RequestCtx,
    mut parts: Parts,
    body: Bytes,
    plain: Option<Bytes>,
) -> Result<Response<BoxBody>, AttemptFailure> {
    let http = active
        .snapshot
        .upstreams
        .get(index)
        .and_then(|u| match &u.kind {
            UpstreamKind::Http(http) => Some(http),
            UpstreamKind::Mock(_) => None,
        });
    let Some(plain) = plain else {
        return attempt(active, index, ctx, parts, body::full(body), None).await;
    };
    if let Some(http) = http
        && let Some(version) = crate::upstream::api_version(&parts.uri)
        && http
            .stream_options_refusals
            .refuses(version, Instant::now())
    {
        ctx.usage_injected = false;
        parts
            .headers
            .insert(http::header::CONTENT_LENGTH, plain.len().into());
        return attempt(active, index, ctx, parts, body::full(plain), None).await;
    }
    ctx.usage_injected = true;
    let again = copy_parts(&parts);
    let resp = attempt(active, index, ctx, parts, body::full(body), None).await?;
    let small = http_body::Body::size_hint(resp.body())
        .exact()
        .is_some_and(|n| n <= REFUSAL_SNIFF);
    if resp.status() != http::StatusCode::BAD_REQUEST || !small {
        return Ok(resp);
    }
    let (head, answer) = resp.into_parts();
    let idle = ctx.upstream_idle.unwrap_or(Duration::from_secs(30));
    let read = tokio::time::timeout(idle, answer.collect()).await;
    let Ok(Ok(collected)) = read else {
        // The error answer broke or stalled: a failed attempt, as it is.
        return Err(AttemptFailure {
            outcome: Outcome::ConnectionError,
            text: "its error answer broke off",
        });
    };
    let text = collected.to_bytes();
    if memchr::memmem::find(&text, b"stream_options").is_none() {
        return Ok(Response::from_parts(head, body::full(text)));
    }
    // The refusal counts as the attempt it was; this one is the request's.
    count(active, index, Outcome::Http4xx);
    ctx.usage_injected = false;
    let mut again = again;
    let asked = again.uri.clone();
    again
        .headers
        .insert(http::header::CONTENT_LENGTH, plain.len().into());
    let resp = attempt(active, index, ctx, again, body::full(plain), None).await?;
    // Only when the body as the client sent it is taken was the question
    // at fault. A client's own bad `stream_options` (a key the API does
    // not know) is refused both ways: it must not stop the metering of
    // every other client's streams.
    if resp.status().is_success()
        && let Some(http) = http
        && let Some(version) = crate::upstream::api_version(&asked)
        && http.stream_options_refusals.record(version, Instant::now())
        && let Some(upstream) = active.snapshot.upstreams.get(index)
    {
        tracing::dispatcher::with_default(&active.log, || {
            tracing::warn!(
                event = "stream_usage_refused",
                upstream = &*upstream.name,
                api_version = version,
                "the upstream refuses stream_options.include_usage: its streams under this api-version go unmetered unless it reports usage itself, for the next 10 minutes"
            );
        });
    }
    Ok(resp)
}

/// A copy of a request head for one attempt (`Parts` itself is not `Clone`).
pub(super) fn copy_parts(parts: &Parts) -> Parts {
    let (mut copy, ()) = Request::new(()).into_parts();
    copy.method = parts.method.clone();
    copy.uri = parts.uri.clone();
    copy.version = parts.version;
    copy.headers = parts.headers.clone();
    copy
}

/// One attempt at upstream `index`: records it in the ctx and its timing
/// metrics and returns the response head, whatever its status. The caller
/// counts its outcome: on a pool route a stream's outcome is known only
/// once its first content came (or did not). `upload` is the progress of
/// a body the client is still sending as it streams through.
pub(super) async fn attempt(
    active: &Active,
    index: usize,
    ctx: &mut RequestCtx,
    mut parts: Parts,
    body: BoxBody,
    upload: Option<&BodyProgress>,
) -> Result<Response<BoxBody>, AttemptFailure> {
    let snap = &active.snapshot;
    let (Some(upstream), Some(metrics)) = (snap.upstreams.get(index), active.upstreams.get(index))
    else {
        return Err(AttemptFailure {
            outcome: Outcome::ConnectError,
            text: "no such upstream",
        });
    };
    let started = Instant::now();
    ctx.upstream = Some(upstream.name.clone());
    ctx.upstream_index = Some(index);
    ctx.attempts += 1;
    ctx.upstream_started = Some(started);
    let wait = AnswerWait {
        started,
        first_byte: upstream.timeouts.first_byte,
        request_deadline: ctx.deadline(snap),
        upload,
    };

    // Dropped before the answer (its client left), the attempt still
    // counts under an outcome: the outcomes add up to the attempts.
    let mut abandoned = Abandoned(Some((active, index)));
    let result: Result<Response<BoxBody>, AttemptFailure> = match &upstream.kind {
        UpstreamKind::Http(http) => match http.uri_for(parts.uri.path_and_query()) {
            Err(_) => Err(AttemptFailure {
                outcome: Outcome::ClientError,
                text: "the request path cannot be forwarded",
            }),
            Ok(uri) => {
                parts.uri = uri;
                if let Some(host) = &http.host {
                    parts.headers.insert(http::header::HOST, host.clone());
                }
                // The pooled client picks HTTP/1.1 or HTTP/2 per connection
                // (ALPN), whatever the client spoke to us.
                parts.version = Version::HTTP_11;
                match wait
                    .answer(http.client.request(Request::from_parts(parts, body)))
                    .await
                {
                    None => Err(TIMED_OUT),
                    Some(Err(e)) => Err(classify(&e)),
                    // hyper reads any three digits; HTTP's statuses end at
                    // 599 (RFC 9110 §15), and a client (the OpenAI SDKs
                    // among them) cannot tell what a 7xx would mean.
                    Some(Ok(resp)) if resp.status().as_u16() > 599 => Err(AttemptFailure {
                        outcome: Outcome::ConnectionError,
                        text: "answered with a status beyond 599, which is not HTTP",
                    }),
                    // hyper hands over a 101 (other 1xx it reads past);
                    // sluice sends no `upgrade`, so it switches to nothing.
                    Some(Ok(resp)) if resp.status().is_informational() => Err(AttemptFailure {
                        outcome: Outcome::ConnectionError,
                        text: "answered 101 Switching Protocols, but no upgrade was asked for",
                    }),
                    // hyper undoes `chunked` only: a `gzip, chunked` body
                    // would reach the client still compressed, with
                    // nothing saying so (as a client's is refused, 501).
                    Some(Ok(resp)) if headers::has_other_transfer_coding(resp.headers()) => {
                        Err(AttemptFailure {
                            outcome: Outcome::ConnectionError,
                            text: "answered with a transfer coding other than chunked, which would be lost on the way",
                        })
                    }
                    Some(Ok(mut resp)) => {
                        // A proxy answers in its own version (RFC 9110
                        // §6.2): an HTTP/1.0 upstream's would close the
                        // client's keep-alive connection.
                        *resp.version_mut() = http::Version::HTTP_11;
                        if let Some(location) = resp
                            .headers()
                            .get(http::header::LOCATION)
                            .and_then(|l| http.local_location(l))
                        {
                            resp.headers_mut().insert(http::header::LOCATION, location);
                        }
                        Ok(resp.map(|b| b.map_err(BodyError::new).boxed_unsync()))
                    }
                }
            }
        },
        UpstreamKind::Mock(settings) => {
            match wait
                .answer(mock::respond(settings, Request::from_parts(parts, body)))
                .await
            {
                None => Err(TIMED_OUT),
                Some(resp) => Ok(resp),
            }
        }
    };
    abandoned.0 = None;
    let elapsed = started.elapsed();
    ctx.waiting += elapsed;
    match result {
        Ok(mut resp) => {
            metrics.first_byte.observe(elapsed.as_secs_f64());
            let status = resp.status();
            headers::to_client(resp.headers_mut(), status);
            if ctx.cors.is_some() {
                crate::proxy::cors::drop_upstreams(resp.headers_mut());
            }
            ctx.upstream_idle = Some(upstream.timeouts.idle);
            Ok(resp)
        }
        Err(failure) => {
            metrics.duration.observe(elapsed.as_secs_f64());
            ctx.upstream_started = None;
            Err(failure)
        }
    }
}

/// How long an attempt waits for the upstream's answer head: `first_byte`
/// from the attempt's start, within what is left of `request_timeout`.
struct AnswerWait<'a> {
    started: Instant,
    first_byte: Duration,
    request_deadline: Instant,
    upload: Option<&'a BodyProgress>,
}

impl AnswerWait<'_> {
    /// `answer`, or `None` when the wait ran out. An upstream cannot answer
    /// before it has the request: while a streaming body is still coming
    /// from its client, `first_byte` counts from the last bytes that came
    /// (as nginx's `proxy_read_timeout` starts once the request is sent),
    /// and only `request_timeout` bounds the upload (then a 408). An
    /// upstream that stopped reading takes no more bytes, and times out.
    async fn answer<F: Future>(&self, answer: F) -> Option<F::Output> {
        let mut answer = std::pin::pin!(answer);
        let mut deadline = (self.started + self.first_byte).min(self.request_deadline);
        loop {
            if let Ok(out) = tokio::time::timeout_at(deadline.into(), answer.as_mut()).await {
                return Some(out);
            }
            let now = Instant::now();
            let from = match self.upload {
                Some(upload) if upload.waiting_on_client() => Some(now),
                Some(upload) => upload.last_read(),
                None => None,
            };
            let next = from.map(|from| (from + self.first_byte).min(self.request_deadline));
            match next {
                Some(next) if next > now => deadline = next,
                _ => return None,
            }
        }
    }
}

/// Names a client error without its text (which may carry an address).
fn classify(e: &ClientError) -> AttemptFailure {
    let mut source: Option<&(dyn StdError + 'static)> = e.source();
    let mut tls = None;
    let mut io_kind = None;
    let mut local = false;
    while let Some(err) = source {
        if let Some(rustls) = err.downcast_ref::<rustls::Error>() {
            tls.get_or_insert(rustls);
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            io_kind.get_or_insert(io.kind());
            if let Some(rustls) = wrapped_rustls_error(io) {
                tls.get_or_insert(rustls);
            }
            local |= is_local_shortage(io);
        }
        source = err.source();
    }
    if local {
        return AttemptFailure {
            outcome: Outcome::LocalError,
            text: "sluice could not open a connection (out of file descriptors or memory)",
        };
    }
    if let Some(error) = tls {
        return AttemptFailure {
            outcome: Outcome::TlsError,
            text: tls_failure(error),
        };
    }
    if e.is_connect() {
        let text = match io_kind {
            Some(std::io::ErrorKind::ConnectionRefused) => "connect refused",
            Some(std::io::ErrorKind::TimedOut) => CONNECT_TIMED_OUT,
            _ => "connect failed",
        };
        return AttemptFailure {
            outcome: Outcome::ConnectError,
            text,
        };
    }
    if let ClientError::Http(h) = e {
        // A plain-HTTP upstream connection reads about 64 KiB of head, in
        // at most 100 lines (as Envoy's default).
        if h.is_parse_too_large() {
            return AttemptFailure {
                outcome: Outcome::ConnectionError,
                text: "the response head is too large (about 64 KiB or 100 header lines at most)",
            };
        }
        if h.is_parse() || h.is_parse_status() {
            return AttemptFailure {
                outcome: Outcome::ConnectionError,
                text: "answered with a response head that is not valid HTTP",
            };
        }
    }
    if let ClientError::ReusedClosed(_) = e {
        return AttemptFailure {
            outcome: Outcome::ConnectionError,
            text: KEEP_ALIVE_RACE,
        };
    }
    AttemptFailure {
        outcome: Outcome::ConnectionError,
        text: "connection closed before the response",
    }
}

/// A reused connection the upstream closed as sluice sent on it (its
/// keep-alive timeout shorter than sluice's).
pub(super) const KEEP_ALIVE_RACE: &str = "a reused connection closed before the response (the upstream's keep-alive ended as it was reused)";

/// Whether a socket could not be opened for want of something local:
/// descriptors (the process's or the system's) or buffer memory.
fn is_local_shortage(io: &std::io::Error) -> bool {
    // Not EADDRNOTAVAIL: an IPv6 upstream in a pod without IPv6 fails
    // with it too, and that member must still trip its breaker.
    #[cfg(unix)]
    {
        use rustix::io::Errno;
        matches!(
            Errno::from_io_error(io),
            Some(Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM)
        )
    }
    #[cfg(not(unix))]
    {
        let _ = io;
        false
    }
}

/// Whether an I/O error carries a rustls error, however deeply wrapped.
/// `io::Error::source` skips the error it wraps, so the chain is walked
/// through `get_ref` instead.
fn wrapped_rustls_error(io: &std::io::Error) -> Option<&rustls::Error> {
    let mut inner = io.get_ref();
    while let Some(err) = inner {
        if let Some(rustls) = err.downcast_ref::<rustls::Error>() {
            return Some(rustls);
        }
        inner = err
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref);
    }
    None
}

/// Why a handshake with an upstream failed, in the words an operator
/// acts on: a missing `ca_file`, a certificate for another name or out
/// of date, or no TLS on that port.
fn tls_failure(error: &rustls::Error) -> &'static str {
    use rustls::CertificateError as Cert;
    match error {
        rustls::Error::InvalidCertificate(cert) => match cert {
            Cert::UnknownIssuer => {
                "TLS handshake failed: the certificate is not signed by a trusted CA (a private CA goes in ca_file)"
            }
            Cert::NotValidForName | Cert::NotValidForNameContext { .. } => {
                "TLS handshake failed: the certificate is not valid for the upstream's host name"
            }
            Cert::Expired | Cert::ExpiredContext { .. } => {
                "TLS handshake failed: the certificate has expired"
            }
            Cert::NotValidYet | Cert::NotValidYetContext { .. } => {
                "TLS handshake failed: the certificate is not valid yet"
            }
            Cert::Revoked => "TLS handshake failed: the certificate is revoked",
            _ => "TLS handshake failed: the certificate is invalid",
        },
        rustls::Error::InvalidMessage(_) | rustls::Error::InappropriateMessage { .. } => {
            "TLS handshake failed: the upstream does not speak TLS on that port"
        }
        rustls::Error::AlertReceived(_) => "TLS handshake failed: the upstream refused it (alert)",
        _ => "TLS handshake failed",
    }
}
