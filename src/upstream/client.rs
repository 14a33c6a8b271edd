//! The pooled HTTP client of one upstream: keep-alive connections, TLS with
//! the public web roots plus the upstream's own `ca_file`, HTTP/2 by ALPN.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::h1_pool::{H1Pool, Leased};
use super::timed::Timed;
use crate::body::BoxBody;

/// One upstream's pooled client. Plain `http://` upstreams (the app beside
/// the sidecar, usually) use sluice's lean HTTP/1.1 pool; HTTPS upstreams
/// use hyper-util's, which also speaks HTTP/2 when the upstream offers it.
#[derive(Clone)]
pub enum HttpClient {
    Plain(Arc<H1Pool>),
    Tls(Box<Client<Timed<HttpsConnector<HttpConnector>>, BoxBody>>),
}

impl std::fmt::Debug for HttpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HttpClient::Plain(_) => "HttpClient::Plain",
            HttpClient::Tls(_) => "HttpClient::Tls",
        })
    }
}

impl HttpClient {
    /// Sends `req` (absolute URI) and returns the response head; the body
    /// streams on.
    pub async fn request(
        &self,
        req: http::Request<BoxBody>,
    ) -> Result<http::Response<UpstreamBody>, ClientError> {
        match self {
            HttpClient::Plain(pool) => Ok(pool.request(req).await?.map(UpstreamBody::Plain)),
            HttpClient::Tls(c) => {
                // hyper-util's pool replays a request only when its
                // connection closed before it was written; one the
                // upstream closed as it was reused (its keep-alive
                // timeout shorter than ours) fails after. An idempotent
                // request with no body goes again, as on the plain pool.
                let replay = super::h1_pool::replay_of(&req);
                let first = c.request(req).await;
                let result = match (first, replay) {
                    (Err(e), Some(again)) if !e.is_connect() => {
                        tracing::debug!(error = %e, "replaying a request an upstream connection dropped");
                        c.request(again).await
                    }
                    (first, _) => first,
                };
                match result {
                    Ok(resp) => Ok(resp.map(UpstreamBody::Tls)),
                    Err(e) if e.is_connect() => Err(ClientError::Connect(e.into())),
                    Err(e) => Err(ClientError::Pooled(e)),
                }
            }
        }
    }
}

/// Why a request got no response head. Its text may name an address: it
/// goes to debug logs at most, never to a client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("could not connect")]
    Connect(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("the request URI has no usable host")]
    InvalidUri,
    #[error("the connection closed before the request was sent")]
    Closed,
    #[error("the HTTP exchange failed")]
    Http(#[source] hyper::Error),
    /// A reused connection closed (or was reset) before any answer to a
    /// request that is not sent twice: the upstream's keep-alive ended
    /// as sluice reused it, a race, not a sign of a failing upstream.
    #[error("a reused connection closed before the response")]
    ReusedClosed(#[source] hyper::Error),
    #[error("the HTTPS exchange failed")]
    Pooled(#[source] hyper_util::client::legacy::Error),
}

impl ClientError {
    /// Nothing reached the upstream: no connection, or a new one that
    /// closed before the request could be sent.
    pub fn is_connect(&self) -> bool {
        matches!(self, ClientError::Connect(_) | ClientError::Closed)
    }
}

/// A response body from either kind of client.
pub enum UpstreamBody {
    Plain(Leased),
    Tls(Incoming),
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Plain(b) => Pin::new(b).poll_frame(cx),
            UpstreamBody::Tls(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Plain(b) => b.is_end_stream(),
            UpstreamBody::Tls(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Plain(b) => b.size_hint(),
            UpstreamBody::Tls(b) => b.size_hint(),
        }
    }
}

/// How long an idle upstream connection is kept for reuse.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// The same for `http://` upstreams: under the keep-alive timeouts of the
/// app servers found beside a sidecar (uvicorn's and Node's 5 s), so
/// sluice retires an idle connection before the app closes it under a
/// request it is sending. A new connection on loopback costs little.
const PLAIN_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

fn tcp_connector(connect_timeout: Duration) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    // Small request/response writes must not wait for Nagle's ACK.
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    http
}

fn pooled(
    connector: Timed<HttpsConnector<HttpConnector>>,
) -> Client<Timed<HttpsConnector<HttpConnector>>, BoxBody> {
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .build(connector)
}

/// Builds a plain-HTTP client.
pub fn build_plain(connect_timeout: Duration) -> HttpClient {
    HttpClient::Plain(H1Pool::new(
        tcp_connector(connect_timeout),
        PLAIN_IDLE_TIMEOUT,
    ))
}

/// Builds an HTTPS client trusting the web roots and the certificates in
/// `ca_pem`. It speaks HTTP/1.1, a connection per request in flight, as
/// nginx does to upstreams: over one shared HTTP/2 connection, requests
/// past the provider's stream limit (100 or so) queued behind the
/// long-lived streams LLM answers are, whoever sent them, and clients
/// that stopped reading held its flow-control window.
pub fn build_tls(ca_pem: Option<&[u8]>, connect_timeout: Duration) -> Result<HttpClient, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = ca_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| {
                format!(
                    "ca_file is not valid PEM: {}",
                    crate::config::pem_problem(&e)
                )
            })?;
            roots
                .add(cert)
                .map_err(|e| format!("ca_file holds an unusable certificate: {e}"))?;
            added += 1;
        }
        if added == 0 {
            return Err("ca_file holds no PEM certificate".to_owned());
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup failed: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only()
        .enable_http1()
        .wrap_connector(tcp_connector(connect_timeout));
    Ok(HttpClient::Tls(Box::new(pooled(Timed::new(
        connector,
        connect_timeout,
    )))))
}
