//! HTTPS upstreams: trusted through the upstream's `ca_file`, refused
//! without it.

use crate::support::{Client, MockUpstream, TestGateway, TestPki, UpstreamReply};

fn config(url: &str, ca: Option<&str>) -> String {
    let ca_line = ca
        .map(|c| format!("    ca_file: {c}\n"))
        .unwrap_or_default();
    format!(
        r#"
upstreams:
  secure:
    url: {url}
{ca_line}routes:
  - name: r
    match: {{ path_prefix: / }}
    auth: none
    upstream: secure
"#
    )
}

/// An HTTPS upstream serving `pki`'s certificate, answering `text`, and
/// a gateway that reaches it as `localhost` with `pki`'s CA as `ca_file`.
async fn trusting(pki: &TestPki, text: &'static str) -> (MockUpstream, TestGateway) {
    trusting_with(pki, move |_| UpstreamReply::text(text)).await
}

/// [`trusting`], its upstream answering as `handler` does.
async fn trusting_with(
    pki: &TestPki,
    handler: impl Fn(&crate::support::Seen) -> UpstreamReply + Send + Sync + 'static,
) -> (MockUpstream, TestGateway) {
    let up = MockUpstream::start_tls(handler, &pki.cert_pem, &pki.key_pem).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
    let url = format!("https://localhost:{}", up.addr.port());
    let gw = TestGateway::start_in(&config(&url, Some("ca.pem")), &[], dir).await;
    (up, gw)
}

#[tokio::test]
async fn https_upstream_with_private_ca() {
    let (up, gw) = trusting(&TestPki::new(), "secret garden").await;
    let reply = Client::new().get(&gw.url("/v1/models?x=1")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.text(), "secret garden");
    let seen = up.seen();
    assert_eq!(
        seen[0].uri.path_and_query().unwrap().as_str(),
        "/v1/models?x=1"
    );
}

#[tokio::test]
async fn https_upstream_with_unknown_ca_is_502() {
    let pki = TestPki::new();
    let up =
        MockUpstream::start_tls(|_| UpstreamReply::text("no"), &pki.cert_pem, &pki.key_pem).await;
    let url = format!("https://localhost:{}", up.addr.port());
    let gw = TestGateway::start(&config(&url, None)).await;
    let reply = Client::new().get(&gw.url("/")).await;
    assert_eq!(reply.status, 502);
    assert_eq!(
        reply.json()["error"]["message"],
        "every upstream attempt failed: secure: TLS handshake failed: the certificate is not signed by a trusted CA (a private CA goes in ca_file)"
    );
    assert!(up.seen().is_empty());
    // The operator reads why in the log too, not only the client.
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["error"], "upstream_error");
    assert_eq!(
        log["error_detail"],
        reply.json()["error"]["message"],
        "{log}"
    );
}

/// Each reason a handshake fails is named, so that an operator can tell
/// a certificate for another name from one out of date, or a port that
/// does not speak TLS; each counts as a `tls_error`.
#[tokio::test]
async fn a_failed_handshake_says_why() {
    let other_name = TestPki::issuing(|p| {
        p.subject_alt_names = vec![rcgen::SanType::DnsName("other.example".try_into().unwrap())];
    });
    let expired = TestPki::issuing(|p| {
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    });
    for (pki, says) in [
        (
            &other_name,
            "the certificate is not valid for the upstream's host name",
        ),
        (&expired, "the certificate has expired"),
    ] {
        let (_up, gw) = trusting(pki, "no").await;
        let reply = Client::new().get(&gw.url("/")).await;
        assert_eq!(reply.status, 502);
        let message = reply.error_message();
        assert!(message.ends_with(says), "{says}: {message}");
        let labels = [("upstream", "secure"), ("outcome", "tls_error")];
        assert_eq!(
            gw.metric("sluice_upstream_requests_total", &labels).await,
            Some(1.0)
        );
    }
    // An https:// URL for a port that answers plain HTTP.
    let plain = MockUpstream::always(UpstreamReply::text("plain")).await;
    let url = format!("https://localhost:{}", plain.addr.port());
    let gw = TestGateway::start(&config(&url, None)).await;
    let reply = Client::new().get(&gw.url("/")).await;
    assert_eq!(reply.status, 502);
    let message = reply.error_message();
    assert!(
        message.ends_with("the upstream does not speak TLS on that port"),
        "{message}"
    );
}

/// A port that accepts connections and never answers the ClientHello (a
/// black-holed balancer, a wrong port) fails the attempt at the
/// upstream's `timeouts.connect`, which covers the TLS handshake too,
/// not at `first_byte`: a 504 as for a TCP connect that timed out.
#[tokio::test]
async fn a_handshake_that_never_ends_is_bounded_by_the_connect_timeout() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            open.push(stream);
        }
    });
    let gw = TestGateway::start(&format!(
        "upstreams:\n  secure:\n    url: https://localhost:{port}\n    timeouts: {{ connect: 300ms, first_byte: 20s }}\nroutes:\n  - {{ name: r, match: {{ path_prefix: / }}, auth: none, upstream: secure }}\n"
    ))
    .await;
    let started = std::time::Instant::now();
    let reply = Client::new().get(&gw.url("/")).await;
    let took = started.elapsed();
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "upstream_timeout");
    assert!(
        took < std::time::Duration::from_secs(3),
        "waited {took:?}, not the connect timeout"
    );
    assert_eq!(
        gw.metric(
            "sluice_upstream_requests_total",
            &[("upstream", "secure"), ("outcome", "connect_error")]
        )
        .await,
        Some(1.0)
    );
    held.abort();
}

/// Clients that stop reading large answers from an HTTPS upstream hold
/// their own connections only: every other answer still comes, as it
/// would not behind a shared HTTP/2 connection's stream limit or window.
#[tokio::test]
async fn stalled_readers_do_not_freeze_an_https_upstream() {
    use http_body_util::BodyExt;
    let pki = TestPki::new();
    // Past what the sockets between sluice and a client hold.
    let big = "x".repeat(32 << 20);
    let (up, gw) = trusting_with(&pki, move |seen| match seen.uri.path() {
        "/big" => UpstreamReply::text(big.clone()),
        _ => UpstreamReply::text("small"),
    })
    .await;
    // Each on its own connection, its answer's head read, its body not.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<http_body_util::Full<bytes::Bytes>>();
        let resp = client
            .get(gw.url("/big").parse().unwrap())
            .await
            .expect("a head");
        assert_eq!(resp.status(), 200);
        stalled.push((client, resp));
    }
    let small = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        Client::new().get(&gw.url("/small")).await
    })
    .await
    .expect("another answer comes while four readers stall");
    assert_eq!(small.text(), "small");
    assert!(
        up.seen()
            .iter()
            .all(|s| s.version == http::Version::HTTP_11),
        "HTTP/1.1, a connection per request in flight"
    );
    assert_eq!(up.connections(), 5);
    // The stalled answers are whole once read.
    let (_, resp) = stalled.pop().expect("one");
    let body = resp.into_body().collect().await.expect("read").to_bytes();
    assert_eq!(body.len(), 32 << 20);
}
