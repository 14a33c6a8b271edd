//! Upstream failures sluice answers itself: 502 when it cannot connect,
//! 504 when the upstream does not answer in time.

use std::time::Duration;

use bytes::Bytes;

use crate::support::{
    AfterAnswer, Client, ClientReply, MockUpstream, RawUpstream, RefusedPort, TestGateway,
    UpstreamReply,
};

fn config(url: &str, timeouts: &str) -> String {
    format!(
        r#"
upstreams:
  app:
    url: {url}
    timeouts: {timeouts}
routes:
  - name: app
    match: {{ path_prefix: / }}
    auth: none
    upstream: app
"#
    )
}

/// `sluice_upstream_requests_total` of upstream `app` with `outcome`.
async fn attempts_of_app(gw: &TestGateway, outcome: &str) -> Option<f64> {
    gw.metric(
        "sluice_upstream_requests_total",
        &[("upstream", "app"), ("outcome", outcome)],
    )
    .await
}

#[tokio::test]
async fn connection_refused_is_502_naming_the_attempt() {
    let dead = RefusedPort::new();
    let gw = TestGateway::start(&config(&dead.url(), "{ connect: 1s }")).await;
    let reply = Client::new().get(&gw.url("/hello")).await;
    assert_eq!(reply.status, 502);
    let err = reply.json();
    assert_eq!(err["error"]["code"], "upstream_error");
    assert_eq!(
        err["error"]["message"],
        "every upstream attempt failed: app: connect refused"
    );
    let logs = gw.wait_access_logs(1).await;
    assert_eq!(logs[0]["status"], 502);
    assert_eq!(logs[0]["upstream"], "app");
    assert_eq!(logs[0]["attempts"], 1);
    assert_eq!(logs[0]["error"], "upstream_error");
    assert_eq!(attempts_of_app(&gw, "connect_error").await, Some(1.0));
}

/// A body streaming through when the upstream cannot be reached is left
/// unread: the 502 says the connection closes, so that a client sending
/// its body after its head opens a new one for its next request rather
/// than write it into a closed socket (RFC 9112 §9.6).
#[tokio::test]
async fn a_refusal_before_the_body_came_says_the_connection_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dead = RefusedPort::new();
    let gw = TestGateway::start(&config(&dead.url(), "{ connect: 1s }")).await;
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    conn.write_all(b"POST /upload HTTP/1.1\r\nhost: t\r\ncontent-length: 20\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("an answer before the body")
            .unwrap();
        assert!(n > 0, "closed without an answer");
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 502"), "{head}");
    assert!(head.contains("\r\nconnection: close\r\n"), "{head}");
}

#[tokio::test]
async fn slow_upstream_is_504() {
    let up = MockUpstream::always(UpstreamReply::text("late").delay(Duration::from_secs(5))).await;
    let gw = TestGateway::start(&config(&up.url(), "{ first_byte: 300ms }")).await;
    let started = std::time::Instant::now();
    let reply = Client::new().get(&gw.url("/slow")).await;
    assert_eq!(reply.status, 504);
    assert!(started.elapsed() < Duration::from_secs(4));
    assert_eq!(reply.json()["error"]["code"], "upstream_timeout");
    assert_eq!(attempts_of_app(&gw, "timeout").await, Some(1.0));
}

/// A connect that times out is an upstream that did not answer in time:
/// 504 `upstream_timeout` (SPEC §3), as nginx answers it; its outcome
/// stays `connect_error`. The upstream is a listener whose accept queue
/// is full, so the kernel drops further SYNs.
#[tokio::test]
async fn a_connect_that_times_out_is_504() {
    let listener = tokio::net::TcpSocket::new_v4().unwrap();
    listener.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = listener.local_addr().unwrap();
    let listener = listener.listen(0).unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        let connect = socket.connect(addr);
        if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_millis(200), connect).await {
            fillers.push(stream);
        }
    }
    let gw = TestGateway::start(&config(
        &format!("http://{addr}"),
        "{ connect: 300ms, first_byte: 5s }",
    ))
    .await;
    let reply = Client::new().get(&gw.url("/x")).await;
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "upstream_timeout");
    assert_eq!(attempts_of_app(&gw, "connect_error").await, Some(1.0));
    drop((listener, fillers));
}

#[tokio::test]
async fn upstream_error_statuses_pass_through_unchanged() {
    let mut bad_request =
        UpstreamReply::json(&serde_json::json!({"error": {"message": "bad model"}}))
            .header("x-up", "1");
    bad_request.status = 400;
    let up = MockUpstream::always(bad_request).await;
    let gw = TestGateway::start(&config(&up.url(), "{ connect: 1s }")).await;
    let reply = Client::new().get(&gw.url("/v1/x")).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.header("x-up"), Some("1"));
    assert_eq!(reply.json()["error"]["message"], "bad model");
}

/// An upstream slow to read a body that streams through to it is still
/// the one at fault when its answer times out: 504, not a 408 blaming
/// the client, whose body was all there.
#[tokio::test]
async fn an_upstream_that_reads_late_is_504_not_408() {
    let gw = TestGateway::start(
        r#"
upstreams:
  slow: { mock: { latency: 1s }, timeouts: { first_byte: 200ms } }
routes:
  - name: r
    match: { path_prefix: / }
    auth: none
    upstream: slow
"#,
    )
    .await;
    let reply = Client::new()
        .post_json(
            &gw.url("/v1/embeddings"),
            &[],
            r#"{"model":"e","input":"hello"}"#,
        )
        .await;
    assert_eq!(reply.status, 504, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "upstream_timeout");
}

/// An answer framed by chunks that also states a length (a buggy server,
/// or a smuggling attempt) reaches the client whole: the chunks frame it
/// (RFC 9112 §6.3), and the length is not passed on to cut it short.
#[tokio::test]
async fn a_chunked_answer_with_a_stale_length_reaches_the_client_whole() {
    let up = RawUpstream::start(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n",
        AfterAnswer::KeepAlive,
    )
    .await;
    let gw = TestGateway::start(&config(&up.url(), "{}")).await;
    for _ in 0..2 {
        let reply = Client::new().get(&gw.url("/x")).await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.text(), "0123456789");
        assert_ne!(reply.header("content-length"), Some("3"));
    }
    let logs = gw.wait_access_logs(2).await;
    assert!(logs.iter().all(|l| l["error"].is_null()), "{logs:?}");
}

/// An upstream that closes a kept-alive connection just as sluice reuses
/// it (its keep-alive timeout ran out), unanswered or with a 408 (as
/// HAProxy does), costs a GET nothing: the request is sent again on a
/// fresh connection. A POST is not: the upstream may have started on
/// it, so it fails as it did.
#[tokio::test]
async fn a_get_a_reused_connection_dropped_is_sent_again_on_a_fresh_one() {
    for (after, post_status) in [
        (AfterAnswer::DropTheNext, 502),
        (AfterAnswer::TimeOutTheNext, 408),
    ] {
        let up = RawUpstream::start(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", after).await;
        let gw = TestGateway::start(&config(&up.url(), "{}")).await;
        let client = Client::new();
        assert_eq!(client.get(&gw.url("/x")).await.status, 200);
        let again = client.get(&gw.url("/x")).await;
        assert_eq!(again.status, 200, "{after:?}: {}", again.text());
        assert_eq!(again.text(), "ok");
        assert_eq!(up.requests(), 3, "{after:?}: the request and its replay");
        let post = client.post_json(&gw.url("/x"), &[], "{}").await;
        assert_eq!(post.status, post_status, "{after:?}: {}", post.text());
        assert_eq!(up.requests(), 4, "{after:?}: a POST is not sent twice");
    }
    // A 408 that keeps its connection is the upstream's own answer.
    let up = RawUpstream::start(
        b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 4\r\n\r\nreal",
        AfterAnswer::KeepAlive,
    )
    .await;
    let gw = TestGateway::start(&config(&up.url(), "{}")).await;
    let client = Client::new();
    for sent in 1..=2 {
        assert_eq!(client.get(&gw.url("/x")).await.status, 408);
        assert_eq!(up.requests(), sent, "sent once each");
    }
}

/// The same race on an idempotent request with no body of another
/// method (`DELETE /v1/files/{id}`), and on an `https://` upstream,
/// whose connections hyper-util's pool keeps: sent again too.
#[tokio::test]
async fn an_idempotent_request_a_reused_connection_dropped_is_sent_again() {
    let pki = crate::support::TestPki::new();
    for tls in [false, true] {
        let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let up = if tls {
            RawUpstream::start_tls(answer, AfterAnswer::DropTheNext, &pki).await
        } else {
            RawUpstream::start(answer, AfterAnswer::DropTheNext).await
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).unwrap();
        let timeouts = if tls { "{}\n    ca_file: ca.pem" } else { "{}" };
        let gw = TestGateway::start_in(&config(&up.url(), timeouts), &[], dir).await;
        let client = Client::new();
        assert_eq!(client.get(&gw.url("/x")).await.status, 200, "tls: {tls}");
        let delete = client
            .send(
                http::Method::DELETE,
                &gw.url("/v1/files/f1"),
                &[],
                Bytes::new(),
            )
            .await;
        assert_eq!(delete.status, 200, "tls: {tls}: {}", delete.text());
        assert_eq!(
            up.requests(),
            3,
            "tls: {tls}: the dropped request and its replay"
        );
    }
}

/// A GET through sluice to an upstream that answers `answer`, as it is,
/// on a kept-alive connection.
async fn get_answered_by(answer: &'static [u8]) -> (RawUpstream, TestGateway, ClientReply) {
    let up = RawUpstream::start(answer, AfterAnswer::KeepAlive).await;
    let gw = TestGateway::start(&config(&up.url(), "{}")).await;
    let reply = Client::new().get(&gw.url("/x")).await;
    (up, gw, reply)
}

/// A plain-HTTP upstream's answer head is bounded near 64 KiB (hyper
/// checks once a read leaves the head unfinished; pooled connections keep
/// their buffers): a far larger one is a 502 that says so.
#[tokio::test]
async fn an_oversized_upstream_head_is_a_502_that_says_so() {
    let answer = format!(
        "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 2\r\n\r\nok",
        "a".repeat(512 * 1024)
    );
    let answer: &'static [u8] = Box::leak(answer.into_bytes().into_boxed_slice());
    let (_up, _gw, reply) = get_answered_by(answer).await;
    assert_eq!(reply.status, 502);
    let message = reply.error_message();
    assert!(message.contains("response head is too large"), "{message}");
}

/// Too many header lines, or a head that is not HTTP, are named as such,
/// not as a connection closed before answering.
#[tokio::test]
async fn a_malformed_upstream_head_is_a_502_that_says_so() {
    let many = format!(
        "HTTP/1.1 200 OK\r\n{}content-length: 2\r\n\r\nok",
        "x-h: 1\r\n".repeat(150)
    );
    let many: &'static [u8] = Box::leak(many.into_bytes().into_boxed_slice());
    for (answer, says) in [
        (many, "100 header lines"),
        (
            &b"HTTP/1.1 2OO OK\r\ncontent-length: 2\r\n\r\nok"[..],
            "not valid HTTP",
        ),
        (&b"SSH-2.0-OpenSSH_9.2\r\n\r\n"[..], "not valid HTTP"),
    ] {
        let (_up, _gw, reply) = get_answered_by(answer).await;
        assert_eq!(reply.status, 502);
        let message = reply.error_message();
        assert!(message.contains(says), "{says}: {message}");
    }
}

/// An answer whose status is beyond 599 is not HTTP (RFC 9110 §15): a 502
/// that says so, counted as a failed connection, not passed on as an `ok`.
#[tokio::test]
async fn a_status_beyond_599_is_a_502() {
    let (_up, gw, reply) =
        get_answered_by(b"HTTP/1.1 799 Odd\r\ncontent-length: 2\r\n\r\nok").await;
    assert_eq!(reply.status, 502);
    let message = reply.error_message();
    assert!(message.contains("beyond 599"), "{message}");
    gw.wait_access_logs(1).await;
    let ok = gw
        .metric(
            "sluice_upstream_requests_total",
            &[("upstream", "app"), ("outcome", "ok")],
        )
        .await;
    assert_eq!(ok, Some(0.0));
}

/// A body in a transfer coding besides chunked would reach the client
/// still coded (hyper undoes chunked only), with nothing saying so: a
/// 502 that says why, not a 200 of gzip bytes.
#[tokio::test]
async fn a_transfer_coding_besides_chunked_is_a_502() {
    let (_up, gw, reply) = get_answered_by(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 502);
    let message = reply.error_message();
    assert!(
        message.contains("transfer coding other than chunked"),
        "{message}"
    );
    assert_eq!(attempts_of_app(&gw, "connection_error").await, Some(1.0));
}

/// A 101 to a request that asked for no upgrade (sluice sends none)
/// switches to nothing: a 502, not a status passed on as an `ok`.
#[tokio::test]
async fn a_switch_of_protocol_no_one_asked_for_is_a_502() {
    let (_up, gw, reply) = get_answered_by(
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status, 502);
    assert_eq!(reply.json()["error"]["code"], "upstream_error");
    assert_eq!(attempts_of_app(&gw, "connection_error").await, Some(1.0));
    assert_eq!(attempts_of_app(&gw, "ok").await, Some(0.0));
}

/// An HTTP/1.0 upstream's answer reaches an HTTP/1.1 client in sluice's
/// own version, and the client's connection stays open for the next.
#[tokio::test]
async fn an_http_1_0_answer_keeps_the_clients_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = RawUpstream::start(
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
        AfterAnswer::KeepAlive,
    )
    .await;
    let gw = TestGateway::start(&config(&up.url(), "{}")).await;
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    conn.write_all(
        b"GET /x HTTP/1.1\r\nhost: t\r\n\r\nGET /y HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got);
    assert_eq!(text.matches("HTTP/1.1 200 OK\r\n").count(), 2, "{text}");
    assert!(!text.contains("HTTP/1.0"), "{text}");
}

/// An upstream that answers in HTTP/1.0 and keeps the connection gets
/// each later request on a new connection, as HTTP/1.1: on the kept one
/// hyper would send it as HTTP/1.0, where a chunked body has no framing,
/// and the body was silently left out.
#[tokio::test]
async fn a_chunked_body_reaches_an_upstream_that_answered_in_http_1_0() {
    let upstream = RawUpstream::start(
        b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok",
        AfterAnswer::KeepAlive,
    )
    .await;
    let gw = TestGateway::start(&config(&upstream.url(), "")).await;
    assert_eq!(Client::new().get(&gw.url("/a")).await.status, 200);
    let (status, answer) = crate::support::raw_exchange(
        &gw,
        "POST /b HTTP/1.1\r\nhost: t\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n\
         5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let heads = upstream.heads();
    let post = heads
        .iter()
        .find(|h| h.starts_with("POST"))
        .expect("the POST");
    assert!(post.starts_with("POST /b HTTP/1.1\r\n"), "{post}");
    assert!(
        post.to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "the body is framed: {post}"
    );
}

/// A length an upstream sent as a list of one value reaches the client
/// as that value, which every client reads.
#[tokio::test]
async fn a_listed_length_reaches_the_client_as_one_value() {
    let (_up, _gw, reply) =
        get_answered_by(b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello").await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "hello");
    assert_eq!(reply.header("content-length"), Some("5"));
}

/// A 204 carries no length, and a length comes as one value: sent on as
/// the upstream wrote them, an HTTP/2 client takes either for a protocol
/// error and loses the answer.
#[tokio::test]
async fn an_h2_client_gets_lengths_it_can_read() {
    use http_body_util::BodyExt;
    for (answer, status, length) in [
        (
            &b"HTTP/1.1 204 No Content\r\ncontent-length: 7\r\n\r\n"[..],
            204,
            None,
        ),
        (
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nok"[..],
            200,
            Some("2"),
        ),
    ] {
        let up = RawUpstream::start(answer, AfterAnswer::KeepAlive).await;
        let gw = TestGateway::start(&config(&up.url(), "{}")).await;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(true)
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let resp = client
            .get(gw.url("/x").parse().unwrap())
            .await
            .expect("an answer over h2");
        assert_eq!(resp.status(), status);
        assert_eq!(
            resp.headers()
                .get("content-length")
                .map(|v| v.to_str().unwrap()),
            length
        );
        let body = resp
            .into_body()
            .collect()
            .await
            .expect("the body")
            .to_bytes();
        assert_eq!(body.len(), length.map_or(0, |l| l.parse().unwrap()));
    }
}
