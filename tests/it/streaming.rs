//! Streaming: SSE passes through chunk by chunk as it arrives, and the
//! whole-request and idle limits cut streams that run too long.

use std::time::Duration;

use crate::support::{AfterAnswer, Client, MockUpstream, TestGateway, UpstreamReply};

/// What a client sees last when an upstream stream breaks (SPEC §3).
const STREAM_ERROR_EVENT: &str = "data: {\"error\":{\"message\":\"the upstream stream broke before it was complete\",\"type\":\"server_error\",\"param\":null,\"code\":\"upstream_stream_error\"}}\n\n";

fn config(upstream: &str, extra: &str) -> String {
    format!(
        r#"
{extra}
upstreams:
  llm:
    url: {upstream}
    timeouts: {{ idle: 400ms }}
routes:
  - name: chat
    match: {{ path_prefix: / }}
    auth: none
    upstream: llm
"#
    )
}

#[tokio::test]
async fn sse_arrives_chunk_by_chunk_not_buffered() {
    let gap = Duration::from_millis(150);
    let events = ["{\"n\":1}", "{\"n\":2}", "{\"n\":3}", "{\"n\":4}", "[DONE]"];
    let up = MockUpstream::always(UpstreamReply::sse(&events, gap)).await;
    let gw = TestGateway::start(&config(&up.url(), "")).await;
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], r#"{"stream":true}"#)
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), Some("text/event-stream"));
    let expected: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    assert_eq!(reply.text(), expected);
    // Each event was its own frame, and frames arrived spread over time as
    // the upstream produced them: a buffering proxy delivers them together.
    assert_eq!(
        reply.frames.len(),
        events.len(),
        "frames: {:?}",
        reply.frames
    );
    for pair in reply.frames.windows(2) {
        let spacing = pair[1].0 - pair[0].0;
        assert!(
            spacing >= Duration::from_millis(100),
            "chunks arrived {spacing:?} apart; the stream was held back"
        );
    }
}

#[tokio::test]
async fn stream_that_exceeds_request_timeout_is_cut() {
    let events = ["1", "2", "3", "4", "5", "6", "7", "8"];
    let up = MockUpstream::always(UpstreamReply::sse(&events, Duration::from_millis(200))).await;
    let gw = TestGateway::start(&config(&up.url(), "limits: { request_timeout: 500ms }")).await;
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], "{}")
        .await;
    assert_eq!(reply.status, 200);
    assert!(reply.frames.len() < events.len(), "the stream was not cut");
    // sluice's own limit, said as such: not a broken provider.
    assert!(
        reply.text().ends_with(
            "data: {\"error\":{\"message\":\"the request exceeded its time limit (request_timeout)\",\"type\":\"server_error\",\"param\":null,\"code\":\"request_timeout\"}}\n\n"
        ),
        "{}",
        reply.text()
    );
    let logs = gw.wait_access_logs(1).await;
    assert_eq!(logs[0]["error"], "request_timeout");
}

#[tokio::test]
async fn upstream_silent_longer_than_idle_is_cut() {
    let mut reply = UpstreamReply::sse(&["1"], Duration::ZERO);
    reply
        .chunks
        .push((Duration::from_secs(3), "data: 2\n\n".into()));
    let up = MockUpstream::always(reply).await;
    let gw = TestGateway::start(&config(&up.url(), "")).await;
    let started = std::time::Instant::now();
    let got = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], "{}")
        .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the idle stream was not cut"
    );
    assert_eq!(got.text(), format!("data: 1\n\n{STREAM_ERROR_EVENT}"));
    let logs = gw.wait_access_logs(1).await;
    assert_eq!(logs[0]["error"], "upstream_idle_timeout");
    assert_eq!(
        gw.metric("sluice_stream_errors_total", &[("upstream", "llm")])
            .await,
        Some(1.0)
    );
}

#[tokio::test]
async fn upstream_cut_mid_stream_is_not_passed_off_as_complete() {
    let up = MockUpstream::always(
        UpstreamReply::sse(
            &[
                "{\"n\":1,\"model\":\"gpt-x\"}",
                "{\"n\":2,\"model\":\"gpt-x\"}",
            ],
            Duration::from_millis(50),
        )
        .cut(),
    )
    .await;
    let gw = TestGateway::start(&config(&up.url(), "")).await;
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], "{}")
        .await;
    assert_eq!(reply.status, 200);
    // What arrived, then the error event: never a clean-looking end. (The
    // test upstream may lose its last unflushed event when it aborts.)
    let text = reply.text();
    assert!(
        text.starts_with("data: {\"n\":1,\"model\":\"gpt-x\"}\n\n"),
        "{text}"
    );
    assert!(text.ends_with(STREAM_ERROR_EVENT), "{text}");
    assert!(
        reply.body_error.is_none(),
        "the stream is closed after the event"
    );
    let last: serde_json::Value =
        serde_json::from_str(STREAM_ERROR_EVENT.trim().strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_stream_error");
    let logs = gw.wait_access_logs(1).await;
    assert_eq!(logs[0]["error"], "upstream_stream_error");
    assert_eq!(logs[0]["model"], "gpt-x", "the model the chunks named");
    assert_eq!(
        gw.metric("sluice_stream_errors_total", &[("upstream", "llm")])
            .await,
        Some(1.0)
    );
}

/// A stream that breaks in the middle of an event: the half event never
/// reaches the client, so the error event stands alone (a parser would
/// otherwise join the two into one broken event). Here the client asked
/// for usage itself, so nothing is stripped and content-length would be
/// kept.
#[tokio::test]
async fn a_stream_cut_mid_event_ends_with_a_clean_error_event() {
    const HELLO: &str =
        r#"{"choices":[{"index":0,"delta":{"content":"Hello"},"finish_reason":null}]}"#;
    let mut dying = UpstreamReply::sse(&[HELLO], Duration::ZERO).cut();
    dying.chunks.push((
        Duration::from_millis(100),
        bytes::Bytes::from_static(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" wor",
        ),
    ));
    // Flushed before the cut.
    dying
        .chunks
        .push((Duration::from_millis(100), bytes::Bytes::from_static(b"ld")));
    let up = MockUpstream::always(dying).await;
    let gw = TestGateway::start(&config(&up.url(), "")).await;
    let body = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], body)
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.text(),
        format!("data: {HELLO}\n\n{STREAM_ERROR_EVENT}"),
        "no half event before the error event"
    );
}

/// An upstream that streams far more than socket buffers hold, as fast
/// as it can (chunked, a chat chunk of 4 KB at a time), to one request.
async fn flooding_upstream(content_type: &'static str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", upstream.local_addr().unwrap());
    tokio::spawn(async move {
        let Ok((mut conn, _)) = upstream.accept().await else {
            return;
        };
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let event = format!(
            "data: {{\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{}\"}}}}]}}\n\n",
            "y".repeat(4000)
        );
        let chunk = format!("{:x}\r\n{event}\r\n", event.len());
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: {content_type}\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let _ = conn.write_all(head.as_bytes()).await;
        for _ in 0..20_000 {
            if conn.write_all(chunk.as_bytes()).await.is_err() {
                return;
            }
        }
        let _ = conn.write_all(b"0\r\n\r\n").await;
    });
    url
}

/// After a client stopped reading a stream due within 500 ms: it was
/// cut and accounted for at its deadline (plus the watch's margin).
async fn assert_cut_at_the_deadline(gw: &TestGateway) {
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let logs = gw.access_logs();
    assert_eq!(logs.len(), 1, "not cut while the client was not reading");
    assert_eq!(logs[0]["error"], "request_timeout");
    let latency = logs[0]["latency_ms"].as_f64().unwrap();
    assert!(latency < 1500.0, "cut at {latency} ms");
}

/// On h2 a client that stops reading one stream stalls it by flow
/// control. hyper cannot reset that one stream from outside: the
/// connection is dropped at the deadline, and the request accounted for.
#[tokio::test]
async fn an_h2_stream_whose_client_stops_reading_is_cut_at_the_deadline() {
    let url = flooding_upstream("text/event-stream").await;
    let gw = TestGateway::start(&config(&url, "limits: { request_timeout: 500ms }")).await;
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .initial_stream_window_size(16 * 1024)
            .initial_connection_window_size(1024 * 1024)
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    let driven = tokio::spawn(conn);
    let req = http::Request::post(format!("http://{}/v1/chat/completions", gw.addr))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    // Not reading: the stream's window fills and sluice stops sending.
    assert_cut_at_the_deadline(&gw).await;
    let closed = tokio::time::timeout(Duration::from_secs(5), driven).await;
    assert!(closed.is_ok(), "the connection was kept open");
    drop(resp);
}

/// A client that stops reading a stream is cut at `request_timeout` all
/// the same: hyper stops polling a body while the client's socket is
/// full, so the connection itself watches the deadline. The request is
/// accounted for then, not when (if ever) the client reads again.
#[tokio::test]
async fn a_stream_whose_client_stops_reading_is_cut_at_the_deadline() {
    stalled_reader_is_cut_at_the_deadline("text/event-stream").await;
}

/// The same holds for any answer too long for the sockets' buffers: a
/// download with no length, or an NDJSON stream.
#[tokio::test]
async fn a_long_answer_whose_client_stops_reading_is_cut_at_the_deadline() {
    stalled_reader_is_cut_at_the_deadline("application/x-ndjson").await;
}

async fn stalled_reader_is_cut_at_the_deadline(content_type: &'static str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = flooding_upstream(content_type).await;
    let gw = TestGateway::start(&config(&url, "limits: { request_timeout: 500ms }")).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut client = socket.connect(gw.addr).await.unwrap();
    client
        .write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
        .await
        .unwrap();
    // Not reading: the answer piles up until the sockets are full.
    assert_cut_at_the_deadline(&gw).await;
    // The client finds its connection closed, the stream cut short.
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the connection was kept open");
}

const ROLE_M: &str = r#"{"model":"gpt-x","choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}"#;
const TEXT_M: &str = r#"{"model":"gpt-x","choices":[{"index":0,"delta":{"content":"Partial"},"finish_reason":null}]}"#;
const STOP_M: &str =
    r#"{"model":"gpt-x","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#;

/// An upstream answering `head` and then `events`, ending its body by
/// closing the connection (no length, no chunks): EOF is the only end.
async fn close_delimited(events: &'static str) -> crate::support::RawUpstream {
    let answer: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n{events}"
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    crate::support::RawUpstream::start(
        answer,
        crate::support::AfterAnswer::CloseWhenIdle(Duration::ZERO),
    )
    .await
}

/// A stream whose last event (`[DONE]`) came has said all: an upstream
/// that then closes its connection without ending the chunked body, or
/// keeps the body open, ends the client's stream cleanly, with no error
/// event after `[DONE]`, no stream error counted and no error logged.
#[tokio::test]
async fn a_stream_left_unended_after_its_last_event_ends_cleanly() {
    let events = format!("data: {ROLE_M}\n\ndata: {TEXT_M}\n\ndata: {STOP_M}\n\ndata: [DONE]\n\n");
    let answer = crate::support::raw::unended_sse_answer(&events);
    // `[DONE]` without its blank line, then a break, is whole too.
    let short = crate::support::raw::unended_sse_answer(&events[..events.len() - 1]);
    let up = crate::support::RawUpstream::start(
        short,
        AfterAnswer::CloseWhenIdle(Duration::from_millis(50)),
    )
    .await;
    let gw = TestGateway::start(&config(&up.url(), "")).await;
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], "{}")
        .await;
    assert!(reply.body_error.is_none(), "{:?}", reply.body_error);
    assert_eq!(reply.text(), events[..events.len() - 1]);
    let logs = gw.wait_access_logs(1).await;
    assert_eq!(logs[0]["error"], serde_json::Value::Null, "{}", logs[0]);

    // The last: the request's time runs out while its end is awaited.
    for (after, extra) in [
        (AfterAnswer::CloseWhenIdle(Duration::from_millis(50)), ""),
        (AfterAnswer::KeepAlive, ""),
        (AfterAnswer::KeepAlive, "limits: { request_timeout: 300ms }"),
    ] {
        let what = format!("{after:?} {extra}");
        let up = crate::support::RawUpstream::start(answer, after).await;
        let gw = TestGateway::start(&config(&up.url(), extra)).await;
        let reply = Client::new()
            .post_json(&gw.url("/v1/chat/completions"), &[], "{}")
            .await;
        assert_eq!(reply.status, 200, "{what}");
        assert!(reply.body_error.is_none(), "{what}: {:?}", reply.body_error);
        assert_eq!(reply.text(), events, "{what}");
        let logs = gw.wait_access_logs(1).await;
        assert_eq!(
            logs[0]["error"],
            serde_json::Value::Null,
            "{what}: {}",
            logs[0]
        );
        assert_eq!(
            gw.metric("sluice_stream_errors_total", &[("upstream", "llm")])
                .await
                .unwrap_or(0.0),
            0.0,
            "{what}"
        );
    }
}

/// An LLM stream that ends (here by the upstream closing a close-delimited
/// answer, which is how a dying upstream ends one) without `[DONE]` or a
/// finish reason was cut, and is said to be: the error event follows what
/// came, half an event is not passed on, and it counts as a stream error.
#[tokio::test]
async fn a_stream_ending_without_its_end_is_not_passed_off_as_complete() {
    let events: &'static str = Box::leak(
        format!("data: {ROLE_M}\n\ndata: {TEXT_M}\n\ndata: {{\"id\":\"chatcmpl-x\",\"choi")
            .into_boxed_str(),
    );
    let up = close_delimited(events).await;
    let gw = TestGateway::start(&config(&up.url(), "")).await;
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], "{}")
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.text(),
        format!("data: {ROLE_M}\n\ndata: {TEXT_M}\n\n{STREAM_ERROR_EVENT}")
    );
    let logs = gw.wait_access_logs(1).await;
    assert_eq!(logs[0]["error"], "upstream_stream_error");
    assert_eq!(
        gw.metric("sluice_stream_errors_total", &[("upstream", "llm")])
            .await,
        Some(1.0)
    );
}

/// A complete stream ends as it came, even close-delimited and even when
/// its last event lacks the blank line; so does an SSE stream that is no
/// LLM's (its events name no model).
#[tokio::test]
async fn a_complete_stream_ends_as_it_came() {
    for events in [
        // A blank line more than needed at the end.
        "data: {\"model\":\"gpt-x\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n\n",
        // A local model server's own stream format (llama.cpp's native
        // one): it names a model, and ends without [DONE].
        "data: {\"content\":\"Hi\",\"stop\":false,\"model\":\"m\"}\n\ndata: {\"content\":\"\",\"stop\":true,\"model\":\"m\"}\n\n",
        "data: {\"model\":\"gpt-x\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\ndata: [DONE]\n",
        "event: tick\ndata: {\"n\":1}\n\nevent: tick\ndata: {\"n\":2}\n\n",
    ] {
        let up = close_delimited(events).await;
        let gw = TestGateway::start(&config(&up.url(), "")).await;
        let reply = Client::new()
            .post_json(&gw.url("/v1/chat/completions"), &[], "{}")
            .await;
        assert_eq!(reply.text(), events);
        let logs = gw.wait_access_logs(1).await;
        assert!(logs[0]["error"].is_null(), "{events}: {}", logs[0]);
    }
    // Chunked, ended with its finish chunk but no [DONE]: complete.
    let up = MockUpstream::always(UpstreamReply::sse(&[ROLE_M, STOP_M], Duration::ZERO)).await;
    let gw = TestGateway::start(&config(&up.url(), "")).await;
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], "{}")
        .await;
    assert!(
        !reply.text().contains("upstream_stream_error"),
        "{}",
        reply.text()
    );
}

/// An upstream that ends its stream with an error event of its own: the
/// client sees that event (and no second one from sluice), the log and
/// `sluice_stream_errors_total` see a stream error.
#[tokio::test]
async fn an_upstream_error_event_is_a_stream_error() {
    let error = r#"{"error":{"message":"overloaded","type":"server_error"}}"#;
    let up =
        MockUpstream::always(UpstreamReply::sse(&[ROLE_M, TEXT_M, error], Duration::ZERO)).await;
    let gw = TestGateway::start(&config(&up.url(), "")).await;
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], "{}")
        .await;
    assert!(
        reply.text().ends_with(&format!("data: {error}\n\n")),
        "{}",
        reply.text()
    );
    let logs = gw.wait_access_logs(1).await;
    assert_eq!(logs[0]["error"], "upstream_stream_error");
    assert_eq!(
        gw.metric("sluice_stream_errors_total", &[("upstream", "llm")])
            .await,
        Some(1.0)
    );
}

/// SSE whose lines end in a lone CR (as the SSE grammar allows) is read
/// event by event like any other: metered, complete, passed on as it came.
#[tokio::test]
async fn a_stream_with_cr_line_ends_is_read_event_by_event() {
    let usage =
        r#"{"model":"gpt-x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}"#;
    let mut reply = UpstreamReply::status(200).header("content-type", "text/event-stream");
    for event in [ROLE_M, TEXT_M, STOP_M, usage, "[DONE]"] {
        reply.chunks.push((
            Duration::from_millis(30),
            bytes::Bytes::from(format!("data: {event}\r\r")),
        ));
    }
    let up = MockUpstream::always(reply).await;
    let gw = TestGateway::start(&config(&up.url(), "")).await;
    let body =
        r#"{"model":"gpt-x","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[], body)
        .await;
    assert_eq!(
        reply.text(),
        format!(
            "data: {ROLE_M}\r\rdata: {TEXT_M}\r\rdata: {STOP_M}\r\rdata: {usage}\r\rdata: [DONE]\r\r"
        )
    );
    let log = &gw.wait_access_logs(1).await[0];
    assert!(log["error"].is_null(), "{log}");
    assert_eq!(log["model"], "gpt-x");
    assert_eq!(log["output_tokens"], 2);
}

/// A stream of named events (Anthropic's) that breaks after content ends
/// with a named error event, which Anthropic's SDK raises on (it ignores
/// unnamed events); OpenAI-style streams keep the unnamed one (above).
#[tokio::test]
async fn a_broken_stream_of_named_events_ends_with_a_named_error_event() {
    let mut reply = UpstreamReply::status(200).header("content-type", "text/event-stream");
    for event in [
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-x\",\"usage\":{\"input_tokens\":3}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
        // Flushes the content before the cut.
        "event: ping\ndata: {\"type\":\"ping\"}\n\n",
    ] {
        reply.chunks.push((
            Duration::from_millis(30),
            bytes::Bytes::from_static(event.as_bytes()),
        ));
    }
    let up = MockUpstream::always(reply.cut()).await;
    let gw = TestGateway::start(&config(&up.url(), "")).await;
    let reply = Client::new()
        .post_json(&gw.url("/v1/messages"), &[], "{}")
        .await;
    let text = reply.text();
    assert!(text.contains("text_delta"), "{text}");
    assert!(
        text.ends_with(&format!("event: error\n{STREAM_ERROR_EVENT}")),
        "{text}"
    );
}

/// A responses stream's final event repeats every output, a generated
/// image's base64 among them, and may be far over the size sluice reads
/// an event at: it still ends the stream, whole and metered.
#[tokio::test]
async fn a_final_event_over_a_mebibyte_ends_the_stream_and_is_metered() {
    let image = "A".repeat(3 << 19);
    let created = r#"{"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","status":"in_progress","model":"gpt-4.1","output":[],"usage":null}}"#;
    let completed = format!(
        r#"{{"type":"response.completed","sequence_number":5,"response":{{"id":"resp_1","object":"response","status":"completed","model":"gpt-4.1","output":[{{"type":"image_generation_call","result":"{image}","status":"completed"}}],"usage":{{"input_tokens":36,"output_tokens":87,"total_tokens":123}},"user":null,"metadata":{{}}}}}}"#
    );
    let up = MockUpstream::always(UpstreamReply::sse(
        &[created, completed.as_str()],
        Duration::ZERO,
    ))
    .await;
    let gw = TestGateway::start(&config(&up.url(), "")).await;
    let reply = Client::new()
        .post_json(
            &gw.url("/v1/responses"),
            &[],
            r#"{"model":"gpt-4.1","stream":true,"input":"draw a cat"}"#,
        )
        .await;
    assert_eq!(
        reply.text(),
        format!("data: {created}\n\ndata: {completed}\n\n"),
        "the stream passes as it came, with no error event after it"
    );
    let logs = gw.wait_access_logs(1).await;
    assert!(logs[0]["error"].is_null(), "{}", logs[0]);
    assert_eq!(logs[0]["input_tokens"], 36, "{}", logs[0]);
    assert_eq!(logs[0]["output_tokens"], 87, "{}", logs[0]);
}

/// What a client asking `path` for `request` through a caching route
/// reads of `stream` (sent with its length), checked to be a broken
/// stream: logged so, and not cached (a second ask is no hit).
async fn read_broken(stream: String, path: &str, request: &str) -> String {
    let up = MockUpstream::always(
        UpstreamReply::text(stream).header("content-type", "text/event-stream"),
    )
    .await;
    let gw = TestGateway::start(&config(&up.url(), "").replace(
        "    upstream: llm",
        "    cache: { ttl: 10m }\n    upstream: llm",
    ))
    .await;
    let ask = || async { Client::new().post_json(&gw.url(path), &[], request).await };
    let text = ask().await.text();
    let logs = gw.wait_access_logs(1).await;
    assert_eq!(logs[0]["error"], "upstream_stream_error", "{path}: {text}");
    assert_ne!(ask().await.header("x-sluice-cache"), Some("HIT"), "{path}");
    text
}

/// A final event cut short (small, or too long to hold back) does not
/// end a stream: the stream broke, the client is told so in an event of
/// its own, and the answer is not cached.
#[tokio::test]
async fn a_final_event_cut_short_is_a_broken_stream() {
    let created = r#"data: {"type":"response.created","sequence_number":0,"response":{"id":"r","object":"response","status":"in_progress","model":"gpt-4.1","output":[],"usage":null}}"#;
    for size in [10, 3 << 19] {
        let cut = format!(
            "{created}\n\ndata: {{\"type\":\"response.completed\",\"sequence_number\":5,\"response\":{{\"id\":\"r\",\"output\":[{{\"type\":\"image_generation_call\",\"result\":\"{}",
            "A".repeat(size)
        );
        let request = r#"{"model":"gpt-4.1","stream":true,"input":"draw"}"#;
        let text = read_broken(cut, "/v1/responses", request).await;
        assert!(
            text.ends_with(&format!("\n\n{STREAM_ERROR_EVENT}")),
            "size {size}: {}",
            &text[text.len().saturating_sub(120)..]
        );
    }
}

/// A stream sent with a length that ends before its end (no `[DONE]`,
/// finish reason or final event) broke off as surely as one cut: its
/// length ending on a whole event says nothing more.
#[tokio::test]
async fn a_stream_whose_length_ends_before_its_end_is_broken() {
    for (path, events) in [
        (
            "/v1/chat/completions",
            "data: {\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}]}\n\n",
        ),
        (
            "/v1/responses",
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"model\":\"m\",\"output\":[]}}\n\n",
        ),
        (
            "/v1/messages",
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"m\",\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n",
        ),
    ] {
        let request = r#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#;
        let text = read_broken(events.to_owned(), path, request).await;
        assert!(text.contains("upstream_stream_error"), "{path}: {text}");
    }
}

/// The unterminated last event of a stream that said how it ended goes
/// on only when whole, and never when it is the usage chunk sluice asked
/// for on the client's behalf.
#[tokio::test]
async fn an_unterminated_last_event_goes_on_only_when_whole_and_wanted() {
    let finish = "data: {\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n";
    for tail in [
        "data: {\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":1}}",
        "data: [",
    ] {
        let up = MockUpstream::always(
            UpstreamReply::text(format!("{finish}{tail}"))
                .header("content-type", "text/event-stream"),
        )
        .await;
        let gw = TestGateway::start(&config(&up.url(), "")).await;
        let reply = Client::new()
            .post_json(
                &gw.url("/v1/chat/completions"),
                &[],
                r#"{"model":"m","stream":true,"messages":[]}"#,
            )
            .await;
        assert_eq!(reply.text(), finish, "{tail}");
        let logs = gw.wait_access_logs(1).await;
        assert!(logs[0]["error"].is_null(), "{tail}: {}", logs[0]);
    }
}
