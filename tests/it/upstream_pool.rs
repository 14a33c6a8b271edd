//! The plain-HTTP upstream pool: connections are reused across requests
//! and clients, a connection the upstream closed is replaced without the
//! client noticing, and an answer abandoned halfway never leaks into the
//! next one.

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http_body_util::BodyExt;
use http_body_util::Full;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::support::{Client, MockUpstream, TestGateway, UpstreamReply};

fn config(upstream: &str) -> String {
    format!(
        r#"
upstreams:
  app: {{ url: "{upstream}" }}
routes:
  - name: open
    match: {{ path_prefix: / }}
    auth: none
    upstream: app
"#
    )
}

#[tokio::test]
async fn sequential_requests_share_one_upstream_connection() {
    let up = MockUpstream::always(UpstreamReply::text("pong")).await;
    let gw = TestGateway::start(&config(&up.url())).await;
    // A new client (so a new downstream connection) for every request: the
    // upstream side is pooled on its own.
    for _ in 0..5 {
        let reply = Client::new().get(&gw.url("/ping")).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), "pong");
    }
    assert_eq!(up.seen().len(), 5);
    assert_eq!(up.connections(), 1);
    // The upstream saw its own address as the host, in origin form.
    let seen = up.seen();
    assert_eq!(seen[4].header("host"), Some(up.addr.to_string().as_str()));
    assert_eq!(seen[4].uri.to_string(), "/ping");
}

#[tokio::test]
async fn concurrent_requests_open_connections_that_are_then_reused() {
    let up =
        MockUpstream::always(UpstreamReply::text("slow").delay(Duration::from_millis(100))).await;
    let gw = TestGateway::start(&config(&up.url())).await;
    let client = Client::new();
    four_at_once(&client, &gw).await;
    let opened = up.connections();
    assert_eq!(opened, 4, "four requests at once need four connections");
    four_at_once(&client, &gw).await;
    assert_eq!(up.connections(), opened, "the second batch reuses them");
}

async fn four_at_once(client: &Client, gw: &TestGateway) {
    let url = gw.url("/work");
    let replies = futures_util::future::join_all((0..4).map(|_| client.get(&url))).await;
    assert!(
        replies
            .iter()
            .all(|r| r.status == 200 && r.text() == "slow")
    );
}

/// An upstream that answers each connection's first request and then
/// closes it, without saying so in the response (as servers do when their
/// keep-alive timeout fires between requests).
async fn one_request_per_connection_upstream() -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut read = 0;
                while !buf[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf[read..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => read += n,
                    }
                }
                let _ = socket
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                let _ = socket.shutdown().await;
            });
        }
    });
    (format!("http://{addr}"), task)
}

#[tokio::test]
async fn a_connection_the_upstream_closed_is_replaced_unnoticed() {
    let (url, _upstream) = one_request_per_connection_upstream().await;
    let gw = TestGateway::start(&config(&url)).await;
    let client = Client::new();
    for i in 0..4 {
        let reply = client.get(&gw.url("/again")).await;
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text());
        assert_eq!(reply.text(), "ok");
    }
}

#[tokio::test]
async fn an_abandoned_stream_does_not_leak_into_the_next_answer() {
    let events: Vec<String> = (0..20)
        .map(|i| format!("data: {{\"n\":{i}}}\n\n"))
        .collect();
    let events: Vec<&str> = events.iter().map(String::as_str).collect();
    let stream = UpstreamReply::sse(&events, Duration::from_millis(30));
    let up = MockUpstream::start(move |seen| {
        if seen.uri.path() == "/stream" {
            stream.clone()
        } else {
            UpstreamReply::text("plain answer")
        }
    })
    .await;
    let gw = TestGateway::start(&config(&up.url())).await;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let req = http::Request::builder()
        .method(Method::GET)
        .uri(gw.url("/stream"))
        .body(Full::new(Bytes::new()))
        .expect("request");
    let resp = client.request(req).await.expect("stream starts");
    let mut body = resp.into_body();
    let first = body
        .frame()
        .await
        .expect("a first event")
        .expect("no error");
    assert!(first.data_ref().is_some());
    drop(body); // the client goes away mid-stream

    for _ in 0..3 {
        let reply = Client::new().get(&gw.url("/plain")).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), "plain answer");
    }
}

#[tokio::test]
async fn a_head_answer_without_a_body_frees_its_connection() {
    let up = MockUpstream::always(UpstreamReply::text("12345")).await;
    let gw = TestGateway::start(&config(&up.url())).await;
    let client = Client::new();
    let head = client
        .send(Method::HEAD, &gw.url("/doc"), &[], Bytes::new())
        .await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    let get = client.get(&gw.url("/doc")).await;
    assert_eq!(get.text(), "12345");
    assert_eq!(up.connections(), 1);
}
