//! The pooled HTTP client of one upstream: keep-alive connections, TLS with
//! the public web roots plus the upstream's own `ca_file`, HTTP/2 by ALPN.

use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::body::BoxBody;

/// One upstream's pooled client. Plain `http://` upstreams (the app beside
/// the sidecar, usually) skip the TLS connector and its per-request cost.
#[derive(Clone)]
pub enum HttpClient {
    Plain(Client<HttpConnector, BoxBody>),
    Tls(Client<HttpsConnector<HttpConnector>, BoxBody>),
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
    pub fn request(&self, req: http::Request<BoxBody>) -> ResponseFuture {
        match self {
            HttpClient::Plain(c) => c.request(req),
            HttpClient::Tls(c) => c.request(req),
        }
    }
}

fn tcp_connector(connect_timeout: Duration) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    // Small request/response writes must not wait for Nagle's ACK.
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    http
}

fn pooled<C>(connector: C) -> Client<C, BoxBody>
where
    C: hyper_util::client::legacy::connect::Connect + Clone,
{
    Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector)
}

/// Builds a plain-HTTP client.
pub fn build_plain(connect_timeout: Duration) -> HttpClient {
    HttpClient::Plain(pooled(tcp_connector(connect_timeout)))
}

/// Builds an HTTPS client trusting the web roots and the certificates in
/// `ca_pem`; HTTP/2 is used when the upstream offers it by ALPN.
pub fn build_tls(ca_pem: Option<&[u8]>, connect_timeout: Duration) -> Result<HttpClient, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(pem) = ca_pem {
        let mut added = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| format!("ca_file is not valid PEM: {e}"))?;
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
        .enable_http2()
        .wrap_connector(tcp_connector(connect_timeout));
    Ok(HttpClient::Tls(pooled(connector)))
}
