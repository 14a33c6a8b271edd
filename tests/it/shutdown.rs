//! Graceful shutdown: readiness turns 503, new connections are refused,
//! in-flight streams finish.

use std::time::Duration;

use crate::support::{Client, MockUpstream, TestGateway, UpstreamReply, client, eventually};

/// One open route to the upstream `llm` at `url` (its settings
/// followed by `upstream_extra`), with `grace` to drain in.
fn stream_config(grace: &str, url: &str, upstream_extra: &str) -> String {
    format!(
        r#"
limits: {{ shutdown_grace: {grace} }}
upstreams: {{ llm: {{ url: "{url}"{upstream_extra} }} }}
routes:
  - name: chat
    match: {{ path_prefix: / }}
    auth: none
    upstream: llm
"#
    )
}

#[tokio::test]
async fn drain_lets_an_in_flight_stream_finish() {
    let events = ["a", "b", "c", "d", "[DONE]"];
    let up = MockUpstream::always(UpstreamReply::sse(&events, Duration::from_millis(200))).await;
    let gw = TestGateway::start(&stream_config("10s", &up.url(), "")).await;
    let c = Client::new();
    assert_eq!(c.get(&gw.admin_url("/readyz")).await.status, 200);

    // Start a stream and wait for its head before shutting down.
    let url = gw.url("/v1/chat/completions");
    let hyper_client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<http_body_util::Full<bytes::Bytes>>();
    let resp = hyper_client
        .request(http::Request::post(&url).body(Default::default()).unwrap())
        .await
        .expect("stream starts");
    assert_eq!(resp.status(), 200);
    let stream = tokio::spawn(client::read(resp));

    gw.shutdown();
    let admin = gw.admin_url("/readyz");
    let mut saw_503 = false;
    for _ in 0..50 {
        if c.get(&admin).await.status == 503 {
            saw_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saw_503, "/readyz must answer 503 while draining");
    // The listener is closed: new connections are refused.
    let proxy = gw.addr;
    let refused = eventually(Duration::from_secs(2), || {
        std::net::TcpStream::connect(proxy).is_err()
    })
    .await;
    assert!(
        refused,
        "the proxy port still accepts connections while draining"
    );

    let reply = stream.await.expect("stream task");
    assert!(
        reply.body_error.is_none(),
        "the stream was cut: {:?}",
        reply.body_error
    );
    assert!(
        reply.text().ends_with("data: [DONE]\n\n"),
        "{}",
        reply.text()
    );
    tokio::time::timeout(Duration::from_secs(5), gw.stopped())
        .await
        .expect("the gateway stops once drained");
}

/// A connection that has sent nothing yet holds no request: the drain
/// closes it at once rather than waiting out its header_read_timeout
/// (or the whole grace), plain or before its TLS handshake alike.
#[tokio::test]
async fn a_connection_that_sent_nothing_does_not_hold_the_exit() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&format!(
        r#"
limits: {{ shutdown_grace: 30s, header_read_timeout: 30s }}
upstreams: {{ app: {{ url: "{}" }} }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, auth: none, upstream: app }}
"#,
        up.url()
    ))
    .await;
    let mut silent = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    // Accepted and waiting for its first bytes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.shutdown();
    tokio::time::timeout(Duration::from_secs(5), gw.stopped())
        .await
        .expect("the gateway stops without waiting on a silent connection");
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(1), silent.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "the silent connection was closed: {read:?}"
    );
}

/// A stream whose last event came before the drain's grace ran out ends
/// whole, even when its upstream keeps the body open past the grace: no
/// `server_shutdown` event after `[DONE]`, no error logged.
#[tokio::test]
async fn a_stream_that_said_all_ends_whole_when_the_grace_runs_out() {
    use crate::support::{AfterAnswer, RawUpstream};
    let events = "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
    let answer = crate::support::raw::unended_sse_answer(events);
    let up = RawUpstream::start(answer, AfterAnswer::KeepAlive).await;
    let gw = TestGateway::start(&stream_config(
        "300ms",
        &up.url(),
        ", timeouts: { idle: 10s }",
    ))
    .await;
    let hyper_client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<http_body_util::Full<bytes::Bytes>>();
    let resp = hyper_client
        .request(
            http::Request::post(gw.url("/v1/chat/completions"))
                .body(Default::default())
                .unwrap(),
        )
        .await
        .expect("stream starts");
    assert_eq!(resp.status(), 200);
    let stream = tokio::spawn(client::read(resp));
    tokio::time::sleep(Duration::from_millis(100)).await;
    gw.shutdown();
    let reply = stream.await.expect("stream task");
    assert!(reply.body_error.is_none(), "{:?}", reply.body_error);
    assert_eq!(reply.text(), events);
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["error"], serde_json::Value::Null, "{log}");
}
