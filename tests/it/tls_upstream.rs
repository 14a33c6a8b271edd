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

#[tokio::test]
async fn https_upstream_with_private_ca() {
    let pki = TestPki::new();
    let up = MockUpstream::start_tls(
        |_| UpstreamReply::text("secret garden"),
        &pki.cert_pem,
        &pki.key_pem,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
    let url = format!("https://localhost:{}", up.addr.port());
    let gw = TestGateway::start_in(&config(&url, Some("ca.pem")), &[], dir).await;
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
        "every upstream attempt failed: secure: TLS handshake failed"
    );
    assert!(up.seen().is_empty());
}
