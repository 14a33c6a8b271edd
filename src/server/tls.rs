//! TLS termination on the proxy listener: rustls (aws-lc-rs), TLS 1.2 and
//! 1.3, ALPN `h2` then `http/1.1`, certificate and key from PEM files.

use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::snapshot::TlsFiles;

/// Builds the acceptor from the configured files. Errors name the file,
/// never its content.
pub fn acceptor(files: &TlsFiles) -> Result<TlsAcceptor, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert_file)
        .map_err(|e| format!("cannot read cert_file {}: {e}", files.cert_file.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!(
                "cert_file {} is not valid PEM: {e}",
                files.cert_file.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "cert_file {} holds no certificate",
            files.cert_file.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key_file)
        .map_err(|e| format!("key_file {}: {e}", files.key_file.display()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("certificate and key do not form a usable pair: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}
