//! HTTPS on the proxy listener (`tls:`): HTTP/1.1 and h2 by ALPN, with the
//! certificate and key read from PEM files.

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::support::{
    MockUpstream, TestGateway, TestPki, UpstreamReply, client, tls_listener_config,
};

async fn gateway(pki: &TestPki, up: &MockUpstream) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    pki.write_files(dir.path());
    TestGateway::start_in(&tls_listener_config(&up.url()), &[], dir).await
}

fn https_client(
    pki: &TestPki,
    h2_only: bool,
) -> Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
> {
    let tls = TestPki::client_config(&[pki]);
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_only();
    let connector = if h2_only {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    Client::builder(TokioExecutor::new())
        .http2_only(h2_only)
        .build(connector)
}

#[tokio::test]
async fn https_clients_are_served_over_http1_and_h2() {
    let pki = TestPki::new();
    let up = MockUpstream::always(UpstreamReply::text("behind tls")).await;
    let gw = gateway(&pki, &up).await;
    let url = format!("https://localhost:{}/v1/models", gw.addr.port());
    for h2 in [false, true] {
        let resp = https_client(&pki, h2)
            .request(http::Request::get(&url).body(Full::default()).unwrap())
            .await
            .expect("TLS request");
        let expected = if h2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        assert_eq!(resp.version(), expected);
        let reply = client::read(resp).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), "behind tls");
    }
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].header("x-forwarded-proto"), Some("https"));
}

#[tokio::test]
async fn missing_certificate_file_fails_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let snapshot = sluice::config::load_str(
        "listen: 127.0.0.1:0\nadmin: { listen: 127.0.0.1:0 }\ntls: { cert_file: nope.crt, key_file: nope.key }\nupstreams: { m: { mock: {} } }\nroutes: [ { name: r, match: { path_prefix: / }, upstream: m } ]\n",
        "test.yaml",
        dir.path(),
        &|_| None,
    )
    .unwrap();
    let (sink, _logs) = sluice::telemetry::log::LogSink::capture();
    let gw = sluice::gateway::Gateway::new(snapshot, sink);
    let err = match sluice::server::start(gw).await {
        Ok(_) => panic!("started without a certificate"),
        Err(e) => e.to_string(),
    };
    assert!(err.starts_with("tls: cannot read cert_file "), "{err}");
    assert!(err.contains("nope.crt"), "{err}");
}
