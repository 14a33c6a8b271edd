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

/// Plain HTTP sent to the TLS listener is answered with a 400 that says
/// so (as nginx does), logged and counted, not closed without a word; the
/// listener still serves TLS afterwards.
#[tokio::test]
async fn plain_http_to_the_tls_port_gets_a_400_that_says_so() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = TestPki::new();
    let up = MockUpstream::always(UpstreamReply::text("behind tls")).await;
    let gw = gateway(&pki, &up).await;
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    conn.write_all(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        conn.read_to_end(&mut answer),
    )
    .await
    .expect("answered and closed")
    .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(answer.contains("\r\nx-request-id: "), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap();
    let json: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(json["error"]["code"], "plain_http_to_https_port");
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["status"], 400);
    assert_eq!(log["error"], "plain_http_to_https_port");
    assert!(up.seen().is_empty());
    // TLS clients are served as before.
    let url = format!("https://localhost:{}/v1/models", gw.addr.port());
    let resp = https_client(&pki, false)
        .request(http::Request::get(&url).body(Full::default()).unwrap())
        .await
        .expect("TLS request");
    assert_eq!(resp.status(), 200);
}

/// `check` (and so `run` and a reload) reads the certificate and key, and
/// points at the file at fault, as it does for a `ca_file`.
#[test]
fn unusable_certificate_files_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let load = |tls: &str| {
        let yaml = format!(
            "listen: 127.0.0.1:0\nadmin: {{ listen: 127.0.0.1:0 }}\n{tls}\nupstreams: {{ m: {{ mock: {{}} }} }}\nroutes: [ {{ name: r, match: {{ path_prefix: / }}, upstream: m }} ]\n"
        );
        match sluice::config::load_str(&yaml, "test.yaml", dir.path(), &|_| None) {
            Ok(_) => panic!("{tls} was accepted"),
            Err(errors) => errors.0.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
        }
    };
    let errors = load("tls: { cert_file: nope.crt, key_file: nope.key }");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("test.yaml:3:19: cannot read cert_file "),
        "{errors:?}"
    );
    assert!(errors[0].contains("nope.crt"), "{errors:?}");

    // A key that is not the certificate's, from another test PKI.
    let pki = TestPki::new();
    let other = TestPki::new();
    std::fs::write(dir.path().join("tls.crt"), &pki.cert_pem).unwrap();
    std::fs::write(dir.path().join("other.key"), &other.key_pem).unwrap();
    std::fs::write(dir.path().join("empty.key"), "").unwrap();
    let errors = load("tls: { cert_file: tls.crt, key_file: other.key }");
    assert!(
        errors[0].starts_with("test.yaml:3:19: certificate and key do not form a usable pair"),
        "{errors:?}"
    );
    let errors = load("tls: { cert_file: tls.crt, key_file: missing.key }");
    assert!(
        errors[0].starts_with("test.yaml:3:38: cannot read key_file "),
        "{errors:?}"
    );
    let errors = load("tls: { cert_file: tls.crt, key_file: empty.key }");
    assert!(
        errors[0].starts_with("test.yaml:3:38: key_file ")
            && errors[0].ends_with("empty.key holds no PEM private key"),
        "{errors:?}"
    );

    // A key whose line breaks were lost (pasted from an env var), or a
    // bundle holding one: the message says what is wrong and quotes none
    // of it, in any form (rustls' own message lists its bytes).
    let one_line = pki.key_pem.trim().replace('\n', "\\n");
    std::fs::write(dir.path().join("one-line.key"), &one_line).unwrap();
    std::fs::write(
        dir.path().join("bundle.crt"),
        format!("{}{one_line}", pki.cert_pem),
    )
    .unwrap();
    let body_line = pki.key_pem.lines().nth(1).unwrap();
    let as_bytes = format!("{:?}", &body_line.as_bytes()[..8]);
    let as_bytes = as_bytes.trim_end_matches(']');
    for (tls, at) in [
        (
            "tls: { cert_file: tls.crt, key_file: one-line.key }",
            "key_file",
        ),
        (
            "tls: { cert_file: bundle.crt, key_file: one-line.key }",
            "cert_file",
        ),
    ] {
        let errors = load(tls);
        assert!(errors[0].contains(&format!("{at} ")), "{errors:?}");
        assert!(errors[0].contains("has no END line"), "{errors:?}");
        assert!(!errors[0].contains(&body_line[..16]), "{errors:?}");
        assert!(!errors[0].contains(as_bytes), "{errors:?}");
    }
}

/// A TLS client that finishes its handshake and then says nothing is cut
/// off after `header_read_timeout`, as a plain one is.
#[tokio::test]
async fn silent_tls_connection_is_cut_off() {
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    use tokio::io::AsyncReadExt;

    let pki = TestPki::new();
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let dir = tempfile::tempdir().unwrap();
    pki.write_files(dir.path());
    let yaml = format!(
        "limits: {{ header_read_timeout: 300ms }}\n{}",
        tls_listener_config(&up.url())
    );
    let gw = TestGateway::start_in(&yaml, &[], dir).await;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(TestPki::client_config(&[&pki])));
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.expect("handshake");
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf)).await;
    let elapsed = started.elapsed();
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the silent TLS connection was kept: {read:?}"
    );
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
}

/// The serving certificate's expiry is a gauge (from start, and after
/// each rotation), and one expired or about to be is warned about, at
/// start and by `check`: a renewal that never came shows before clients
/// refuse the listener.
#[tokio::test]
async fn a_certificate_near_its_end_is_warned_about_and_its_expiry_exported() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    // rcgen's default is valid to 4096: no warning, the gauge set.
    let fresh = TestPki::new();
    let gw = gateway(&fresh, &up).await;
    let expiry = gw
        .metric("sluice_tls_cert_expiry_timestamp_seconds", &[])
        .await
        .expect("the gauge is there with tls");
    assert!(expiry > 4.0e12 / 1000.0, "{expiry}");
    assert!(!gw.log_text().contains("tls_cert_expiring"));

    let expired = TestPki::issuing(|p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    let gw = gateway(&expired, &up).await;
    assert_eq!(
        gw.metric("sluice_tls_cert_expiry_timestamp_seconds", &[])
            .await,
        Some(1_609_459_200.0)
    );
    let warned: Vec<_> = gw
        .log_lines()
        .into_iter()
        .filter(|l| l["event"] == "tls_cert_expiring")
        .collect();
    assert_eq!(warned.len(), 1, "{}", gw.log_text());
    let warned = &warned[0];
    assert_eq!(warned["level"], "WARN", "{warned}");
    assert_eq!(
        warned["not_after"], "Fri, 01 Jan 2021 00:00:00 GMT",
        "{warned}"
    );

    let dir = tempfile::tempdir().unwrap();
    expired.write_files(dir.path());
    let snapshot = sluice::config::load_str(
        &tls_listener_config(&up.url()),
        "test.yaml",
        dir.path(),
        &|_| None,
    )
    .expect("an expired certificate still loads");
    let lines: Vec<String> = snapshot.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert!(
        lines[0].ends_with("warning: the listener's certificate has expired: clients refuse it"),
        "{lines:?}"
    );
}
