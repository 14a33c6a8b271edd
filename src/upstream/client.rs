//! The pooled HTTP client of one upstream: keep-alive connections, TLS with
//! the public web roots plus the upstream's own `ca_file`, HTTP/2 by ALPN.

use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::body::BoxBody;

/// One upstream's client; cloning shares the connection pool.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, BoxBody>;

/// Builds a client trusting the web roots and the certificates in `ca_pem`.
pub fn build(ca_pem: Option<&[u8]>, connect_timeout: Duration) -> Result<HttpClient, String> {
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

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    // Small request/response writes must not wait for Nagle's ACK.
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));

    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);

    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(connector))
}
