//! `MockUpstream`: a real hyper server on an ephemeral port that records
//! every request it received and answers with a scripted reply: status,
//! headers, a delay before the head, body chunks with pauses, or an abrupt
//! close mid-body. Optionally over TLS with a test CA (rcgen).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// What the upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What the upstream answers.
#[derive(Debug, Clone)]
pub struct UpstreamReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub head_delay: Duration,
    /// Body pieces, each sent after its pause.
    pub chunks: Vec<(Duration, Bytes)>,
    /// End the body with an error (the connection is cut) after the chunks.
    pub cut: bool,
}

impl UpstreamReply {
    pub fn status(status: u16) -> Self {
        UpstreamReply {
            status,
            headers: Vec::new(),
            head_delay: Duration::ZERO,
            chunks: Vec::new(),
            cut: false,
        }
    }

    pub fn text(body: impl Into<Bytes>) -> Self {
        Self::status(200).body(body)
    }

    pub fn json(value: &serde_json::Value) -> Self {
        Self::text(value.to_string()).header("content-type", "application/json")
    }

    /// An SSE response of `events` (each sent as `data: …\n\n`), `gap` apart.
    pub fn sse(events: &[&str], gap: Duration) -> Self {
        let mut r = Self::status(200)
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-cache");
        for (i, e) in events.iter().enumerate() {
            let pause = if i == 0 { Duration::ZERO } else { gap };
            r.chunks
                .push((pause, Bytes::from(format!("data: {e}\n\n"))));
        }
        r
    }

    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.chunks = vec![(Duration::ZERO, body.into())];
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn delay(mut self, d: Duration) -> Self {
        self.head_delay = d;
        self
    }

    pub fn cut(mut self) -> Self {
        self.cut = true;
        self
    }
}

type Handler = dyn Fn(&Seen) -> UpstreamReply + Send + Sync;

pub struct MockUpstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<AtomicUsize>,
    tls: bool,
    task: tokio::task::JoinHandle<()>,
}

impl MockUpstream {
    /// Answers every request with `reply`.
    pub async fn always(reply: UpstreamReply) -> Self {
        Self::start(move |_| reply.clone()).await
    }

    pub async fn start(handler: impl Fn(&Seen) -> UpstreamReply + Send + Sync + 'static) -> Self {
        Self::spawn(Arc::new(handler), None).await
    }

    /// Serves HTTPS with the given PEM certificate chain and key.
    pub async fn start_tls(
        handler: impl Fn(&Seen) -> UpstreamReply + Send + Sync + 'static,
        cert_pem: &str,
        key_pem: &str,
    ) -> Self {
        let acceptor = tls_acceptor(cert_pem, key_pem, &[b"h2", b"http/1.1"]);
        Self::spawn(Arc::new(handler), Some(acceptor)).await
    }

    async fn spawn(handler: Arc<Handler>, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("local addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let is_tls = tls.is_some();
        let seen2 = seen.clone();
        let connections = Arc::new(AtomicUsize::new(0));
        let accepted = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let handler = handler.clone();
                let seen = seen2.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let handler = handler.clone();
                        let seen = seen.clone();
                        async move { Ok::<_, Infallible>(answer(req, &*handler, &seen).await) }
                    });
                    let builder = auto::Builder::new(TokioExecutor::new());
                    match tls {
                        None => {
                            let _ = builder
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        }
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(s), service).await;
                            }
                        }
                    }
                });
            }
        });
        MockUpstream {
            addr,
            seen,
            connections,
            tls: is_tls,
            task,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Every request received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type ReplyBody = http_body_util::combinators::UnsyncBoxBody<Bytes, std::io::Error>;

async fn answer(
    req: Request<Incoming>,
    handler: &Handler,
    seen: &Mutex<Vec<Seen>>,
) -> Response<ReplyBody> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let request = Seen {
        method: parts.method,
        uri: parts.uri,
        version: parts.version,
        headers: parts.headers,
        body,
    };
    let reply = handler(&request);
    seen.lock().expect("seen").push(request);
    if !reply.head_delay.is_zero() {
        tokio::time::sleep(reply.head_delay).await;
    }
    let one_piece = !reply.cut && reply.chunks.iter().all(|(pause, _)| pause.is_zero());
    let body = if one_piece {
        // Known length: sent with content-length, as most real upstreams do.
        let all: Vec<u8> = reply.chunks.iter().flat_map(|(_, b)| b.to_vec()).collect();
        http_body_util::Full::new(Bytes::from(all))
            .map_err(|never| match never {})
            .boxed_unsync()
    } else {
        streamed(reply.chunks, reply.cut)
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(reply.status).expect("valid status");
    for (k, v) in &reply.headers {
        resp.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).expect("header name"),
            http::HeaderValue::from_str(v).expect("header value"),
        );
    }
    resp
}

/// A body sent chunk by chunk with pauses, optionally cut at the end.
fn streamed(chunks: Vec<(Duration, Bytes)>, cut: bool) -> ReplyBody {
    let frames = stream::unfold((chunks.into_iter(), cut), |(mut it, cut)| async move {
        match it.next() {
            Some((pause, data)) => {
                if !pause.is_zero() {
                    tokio::time::sleep(pause).await;
                }
                Some((Ok(Frame::data(data)), (it, cut)))
            }
            None if cut => Some((
                Err(std::io::Error::other("cut by the test upstream")),
                (it, false),
            )),
            None => None,
        }
    });
    StreamBody::new(frames).boxed_unsync()
}

/// A CA and a server certificate for `localhost` and 127.0.0.1 it signed.
pub struct TestPki {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

/// A config with one open route to the upstream at `url`, after `head`
/// (top-level settings such as `limits:` or `tls:`).
/// A TLS acceptor serving the PEM certificate chain and key, offering
/// `alpn` protocols.
pub fn tls_acceptor(cert_pem: &str, key_pem: &str, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("test cert");
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("test key");
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocols")
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .expect("cert and key");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

pub fn app_config(url: &str, head: &str) -> String {
    format!(
        r#"
{head}
upstreams: {{ app: {{ url: "{url}" }} }}
routes:
  - name: app
    match: {{ path_prefix: / }}
    auth: none
    upstream: app
"#
    )
}

/// [`app_config`] served over HTTPS with `tls.crt`/`tls.key` (as written
/// by [`TestPki::write_files`]).
pub fn tls_listener_config(url: &str) -> String {
    app_config(url, "tls: { cert_file: tls.crt, key_file: tls.key }")
}

impl TestPki {
    /// Writes the server certificate and key as `tls.crt` and `tls.key`
    /// in `dir` (key first: a watcher sees a matching pair once the
    /// certificate lands).
    pub fn write_files(&self, dir: &std::path::Path) {
        std::fs::write(dir.join("tls.key"), &self.key_pem).expect("write tls.key");
        std::fs::write(dir.join("tls.crt"), &self.cert_pem).expect("write tls.crt");
    }

    pub fn new() -> Self {
        Self::issuing(|_| {})
    }

    /// A PKI whose server certificate (for `localhost` and 127.0.0.1) is
    /// first changed by `edit`: another name, other dates.
    pub fn issuing(edit: impl FnOnce(&mut rcgen::CertificateParams)) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sluice test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca cert");
        let key = KeyPair::generate().expect("server key");
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
        params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        edit(&mut params);
        let cert = params.signed_by(&key, &ca).expect("server cert");
        TestPki {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A TLS client config that trusts the CAs of `pkis` (and nothing else).
    pub fn client_config(pkis: &[&TestPki]) -> rustls::ClientConfig {
        use rustls_pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for pki in pkis {
            for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
                roots
                    .add(cert.expect("test CA"))
                    .expect("test CA is usable");
            }
        }
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
    }
}
