//! TLS termination on the proxy listener: rustls (aws-lc-rs), TLS 1.2 and
//! 1.3, ALPN `h2` then `http/1.1`, certificate and key from PEM files. The
//! pair sits behind a [`CertStore`] that reload swaps, so a certificate
//! rotated in place (cert-manager) serves the next handshake, no restart.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::snapshot::TlsFiles;

/// The certificate new handshakes get.
#[derive(Debug)]
pub struct CertStore {
    current: ArcSwap<CertifiedKey>,
}

impl CertStore {
    /// Reads the pair; the error names the file, never its content.
    pub fn load(files: &TlsFiles) -> Result<Arc<Self>, String> {
        Ok(Arc::new(CertStore {
            current: ArcSwap::from_pointee(read_pair(files)?),
        }))
    }

    /// Re-reads the pair; on error the current one keeps serving.
    pub fn reload(&self, files: &TlsFiles) -> Result<(), String> {
        self.current.store(Arc::new(read_pair(files)?));
        Ok(())
    }

    /// When the serving certificate expires, as a Unix time.
    pub fn not_after(&self) -> Option<i64> {
        not_after(self.current.load().cert.first()?)
    }
}

/// A certificate's `notAfter`, as a Unix time.
fn not_after(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.validity().not_after.timestamp())
}

/// How soon before its expiry a certificate is warned about: cert-manager
/// renews at two thirds of a 90-day life, so one this close was not.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(7 * 24 * 3600);

/// A Unix time as a `SystemTime`, within what X.509 can say (1970, long
/// past, for earlier; the end of year 9999 for later).
pub fn at_unix(secs: i64) -> SystemTime {
    const END_OF_9999: u64 = 253_402_300_799;
    UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).unwrap_or(0).min(END_OF_9999))
}

/// A warning for a certificate that has expired or expires within
/// [`EXPIRY_WARNING`] of `now`, else `None`.
pub fn expiry_warning(not_after: SystemTime, now: SystemTime) -> Option<String> {
    match not_after.duration_since(now) {
        Err(_) => Some(EXPIRED.to_owned()),
        Ok(left) if left.is_zero() => Some(EXPIRED.to_owned()),
        Ok(left) if left < EXPIRY_WARNING => {
            let hours = left.as_secs() / 3600;
            Some(format!(
                "the listener's certificate expires in {}d {}h",
                hours / 24,
                hours % 24
            ))
        }
        Ok(_) => None,
    }
}

const EXPIRED: &str = "the listener's certificate has expired: clients refuse it";

/// Exports the serving certificate's expiry, and warns when it is near
/// or past (at start and after each rotation).
pub fn report_expiry(store: &CertStore, gw: &crate::gateway::Gateway) {
    let Some(not_after) = store.not_after() else {
        return;
    };
    gw.metrics
        .tls_cert_expiry
        .with_label_values(&[] as &[&str])
        .set(not_after);
    let at = at_unix(not_after);
    if let Some(warning) = expiry_warning(at, SystemTime::now()) {
        tracing::dispatcher::with_default(&gw.log.dispatch, || {
            tracing::warn!(
                event = "tls_cert_expiring",
                not_after = %httpdate::fmt_http_date(at),
                "{warning}"
            );
        });
    }
}

/// The expiry of the leaf certificate in `files`, read as `check` reads
/// the pair (`None` when it cannot be read: that error is reported).
pub fn files_not_after(files: &TlsFiles) -> Option<i64> {
    not_after(read_certs(files).ok()?.first()?)
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Whether `files` hold a certificate and the key that belongs to it.
/// The error says how, and whether the key file is the one at fault.
pub fn check_pair(files: &TlsFiles) -> Result<(), (String, bool)> {
    let certs = read_certs(files).map_err(|e| (e, false))?;
    let key = read_key(files).map_err(|e| (e, true))?;
    pair(certs, key).map(drop).map_err(|e| (e, false))
}

fn read_pair(files: &TlsFiles) -> Result<CertifiedKey, String> {
    pair(read_certs(files)?, read_key(files)?)
}

fn read_certs(files: &TlsFiles) -> Result<Vec<CertificateDer<'static>>, String> {
    let cert_pem = crate::config::read_file(&files.cert_file)
        .map_err(|e| format!("cannot read cert_file {}: {e}", files.cert_file.display()))?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .map(|c| c.map(CertificateDer::into_owned))
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!(
                "cert_file {} is not valid PEM: {}",
                files.cert_file.display(),
                crate::config::pem_problem(&e)
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "cert_file {} holds no certificate",
            files.cert_file.display()
        ));
    }
    Ok(certs)
}

fn read_key(files: &TlsFiles) -> Result<PrivateKeyDer<'static>, String> {
    let key_pem = crate::config::read_file(&files.key_file)
        .map_err(|e| format!("cannot read key_file {}: {e}", files.key_file.display()))?;
    PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => format!(
            "key_file {} holds no PEM private key",
            files.key_file.display()
        ),
        e => format!(
            "key_file {} is not valid PEM: {}",
            files.key_file.display(),
            crate::config::pem_problem(&e)
        ),
    })
}

fn pair(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<CertifiedKey, String> {
    // Checks that the key belongs to the certificate: a rotation caught
    // between writing the two files is refused, not served.
    CertifiedKey::from_der(certs, key, &provider())
        .map_err(|e| format!("certificate and key do not form a usable pair: {e}"))
}

/// The acceptor for the listener, resolving certificates from `store`.
pub fn acceptor(store: Arc<CertStore>) -> Result<TlsAcceptor, String> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_warned_about_within_a_week_and_after() {
        let now = at_unix(1_800_000_000);
        let day = Duration::from_secs(24 * 3600);
        assert_eq!(expiry_warning(now + 8 * day, now), None);
        assert_eq!(
            expiry_warning(now + 6 * day + Duration::from_secs(5 * 3600 + 59), now).as_deref(),
            Some("the listener's certificate expires in 6d 5h")
        );
        assert_eq!(expiry_warning(now, now).as_deref(), Some(EXPIRED));
        assert_eq!(
            expiry_warning(at_unix(i64::MIN), now).as_deref(),
            Some(EXPIRED)
        );
        assert_eq!(expiry_warning(at_unix(i64::MAX), now), None);
    }
}
