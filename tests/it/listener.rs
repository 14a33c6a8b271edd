//! Listener limits: slow clients are cut off by `header_read_timeout`, and
//! connections past `max_connections` wait until one frees up.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::{MockUpstream, TestGateway, UpstreamReply, app_config};

fn config(url: &str, limits: &str) -> String {
    app_config(url, &format!("limits: {limits}"))
}

/// Sends one keep-alive GET on `stream` and reads the reply head + "ok".
fn get_on(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n")
        .expect("write");
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    while !got.ends_with(b"ok") {
        let n = stream.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn slow_header_sender_is_cut_off() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&config(&up.url(), "{ header_read_timeout: 300ms }")).await;
    let addr = gw.addr;
    let (elapsed, n) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /x HTTP/1.1\r\nhost: slow\r\n").unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        // The server must give up on us: EOF (or a reset), not our timeout.
        let n = loop {
            match s.read(&mut buf) {
                Ok(0) => break 0,
                Ok(n) if buf[..n].starts_with(b"HTTP/1.1 408") => break n,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break 0,
                Err(e) => panic!("the gateway kept the slow connection open: {e}"),
            }
        };
        (started.elapsed(), n)
    })
    .await
    .unwrap();
    assert!(
        elapsed >= Duration::from_millis(250),
        "cut too early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_secs(4),
        "cut too late: {elapsed:?} ({n} bytes)"
    );
    assert!(up.seen().is_empty());
}

#[tokio::test]
async fn connections_past_the_limit_wait_for_a_free_slot() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&config(&up.url(), "{ max_connections: 2 }")).await;
    let addr = gw.addr;
    tokio::task::spawn_blocking(move || {
        let mut first = TcpStream::connect(addr).unwrap();
        let mut second = TcpStream::connect(addr).unwrap();
        assert!(get_on(&mut first).starts_with("HTTP/1.1 200"));
        assert!(get_on(&mut second).starts_with("HTTP/1.1 200"));

        let mut third = TcpStream::connect(addr).unwrap();
        third
            .write_all(b"GET /x HTTP/1.1\r\nhost: t\r\n\r\n")
            .unwrap();
        third
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut buf = [0u8; 64];
        let early = third.read(&mut buf);
        assert!(
            matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
            "a third connection was served past max_connections: {early:?} {:?}", String::from_utf8_lossy(&buf)
        );
        // Free a slot: the waiting connection is accepted and answered.
        drop(first);
        third.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = Vec::new();
        while !got.ends_with(b"ok") {
            let n = third.read(&mut buf).expect("served once a slot is free");
            assert!(n > 0, "closed instead of served");
            got.extend_from_slice(&buf[..n]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"));
    })
    .await
    .unwrap();
}

/// A body sluice must read whole (here a chat completion, read to ask for
/// usage) is bounded by `request_timeout` too: a client trickling it gets
/// a 408 in the SPEC's error shape and its connection closed, and the
/// upstream sees nothing.
#[tokio::test]
async fn slow_body_sender_gets_408() {
    // A body read whole (chat completions), and one streamed through to
    // the upstream as it comes, which then waits for the rest.
    for (i, path) in ["/v1/chat/completions", "/v1/embeddings"]
        .into_iter()
        .enumerate()
    {
        slow_body_on(path, i == 0).await;
    }
}

async fn slow_body_on(path: &'static str, read_whole: bool) {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&config(&up.url(), "{ request_timeout: 400ms }")).await;
    let addr = gw.addr;
    let (elapsed, reply) = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(
            format!("POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"model\"").as_bytes(),
        )
        .unwrap();
        let started = Instant::now();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("the gateway kept the slow body open: {e}"),
            }
        }
        (started.elapsed(), String::from_utf8_lossy(&got).into_owned())
    })
    .await
    .unwrap();
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("\"code\":\"request_timeout\""), "{reply}");
    assert!(
        elapsed >= Duration::from_millis(350) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
    if read_whole {
        // (A body streaming through reached the upstream as it came.)
        assert!(up.seen().is_empty(), "{path}");
    }
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["status"], 408, "{path}");
    assert_eq!(log["error"], "request_timeout");
    if !read_whole {
        // The client's fault, not the upstream's.
        assert_eq!(
            gw.metric(
                "sluice_upstream_requests_total",
                &[("upstream", "app"), ("outcome", "client_error")]
            )
            .await,
            Some(1.0)
        );
    }
}

/// A client that connects and sends nothing, or only the start of the h2
/// preface, is cut off after `header_read_timeout` too: telling HTTP/1
/// from h2 waits for its first bytes, and that wait must not hold a
/// connection slot for ever.
#[tokio::test]
async fn silent_connection_is_cut_off() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&config(
        &up.url(),
        "{ header_read_timeout: 300ms, max_connections: 1 }",
    ))
    .await;
    let addr = gw.addr;
    let elapsed = tokio::task::spawn_blocking(move || {
        // Nothing at all; then the start of the h2 preface, which leaves
        // the protocol undecided, and nothing more.
        let mut elapsed = Duration::ZERO;
        for first in [&b""[..], b"P", b"PRI * HTTP/2.0\r\n"] {
            let mut s = TcpStream::connect(addr).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(first).unwrap();
            let started = Instant::now();
            let mut buf = [0u8; 64];
            match s.read(&mut buf) {
                Ok(0) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                other => panic!("the connection that sent {first:?} was kept: {other:?}"),
            }
            elapsed = elapsed.max(started.elapsed());
        }
        // Its slot is free again: with max_connections 1, a request is served.
        let mut next = TcpStream::connect(addr).expect("connect");
        next.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(get_on(&mut next).starts_with("HTTP/1.1 200"));
        elapsed
    })
    .await
    .unwrap();
    assert!(
        elapsed >= Duration::from_millis(250) && elapsed < Duration::from_secs(4),
        "{elapsed:?}"
    );
}

/// An h2 client that sends its preface and then nothing (no settings, no
/// ping answers) is closed too: the listener's h2 keep-alive pings go
/// unanswered within `header_read_timeout`.
#[tokio::test]
async fn silent_h2_client_is_closed() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&config(&up.url(), "{ header_read_timeout: 300ms }")).await;
    let addr = gw.addr;
    let elapsed = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        // The server's settings and pings arrive; then it closes.
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("the silent h2 client was kept: {e}"),
            }
        }
        started.elapsed()
    })
    .await
    .unwrap();
    assert!(elapsed < Duration::from_secs(4), "{elapsed:?}");
}

/// A live h2 client that answers pings but asks nothing is closed once a
/// whole `header_read_timeout` passes quiet (as HTTP/1 closes a quiet
/// keep-alive connection): its slot frees for the next client. A
/// connection in use is not closed.
#[tokio::test]
async fn a_quiet_h2_connection_frees_its_slot() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&config(
        &up.url(),
        "{ header_read_timeout: 300ms, max_connections: 1 }",
    ))
    .await;
    let (mut sender, driven) = crate::support::client::h2c_connection(gw.addr).await;
    // In use: requests a little apart keep it open past the timeout.
    for _ in 0..4 {
        let req = http::Request::get(format!("http://{}/x", gw.addr))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Quiet (hyper's client answers the pings): closed by the server.
    let closed = tokio::time::timeout(Duration::from_secs(3), driven).await;
    assert!(closed.is_ok(), "the quiet h2 connection was kept");
    // Its one slot serves a new client.
    let reply = crate::support::Client::new().get(&gw.url("/x")).await;
    assert_eq!(reply.status, 200);
}

/// The admin port is reachable from outside the pod: a connection that
/// sends nothing is closed after a while instead of holding a descriptor
/// for ever, and the port keeps answering.
#[tokio::test]
async fn a_silent_admin_connection_is_closed() {
    use tokio::io::AsyncReadExt;
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&crate::support::app_config(&up.url(), "")).await;
    let mut silent = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(15), silent.read(&mut buf)).await;
    assert!(closed.is_ok(), "a silent admin connection was kept");
    let reply = crate::support::Client::new()
        .get(&format!("http://{}/healthz", gw.admin))
        .await;
    assert_eq!(reply.status, 200);
}

/// A flood of connections on the admin port is bounded (it cannot spend
/// the descriptors the proxy needs), and cannot keep a probe out either:
/// past the bound, a new connection closes the oldest, also one that
/// sent requests and never reads the answers.
#[tokio::test]
async fn admin_connections_past_the_cap_close_the_oldest() {
    use sluice::server::admin::MAX_ADMIN_CONNECTIONS;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&crate::support::app_config(&up.url(), "")).await;
    let mut held = Vec::new();
    for _ in 0..MAX_ADMIN_CONNECTIONS {
        let mut conn = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
        // Asks, and never reads: its answers fill the socket.
        let asks = b"GET /metrics HTTP/1.1\r\nhost: a\r\n\r\n".repeat(200);
        let _ = tokio::time::timeout(Duration::from_millis(50), conn.write_all(&asks)).await;
        held.push(conn);
    }
    // The proxy itself is untouched by the admin flood.
    let reply = crate::support::Client::new().get(&gw.url("/x")).await;
    assert_eq!(reply.status, 200);
    let mut probe = tokio::net::TcpStream::connect(gw.admin).await.unwrap();
    probe
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let answered = tokio::time::timeout(Duration::from_secs(5), probe.read_to_end(&mut got)).await;
    assert!(answered.is_ok(), "the probe was kept out");
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // The oldest was closed to make room.
    let mut first = held.swap_remove(0);
    let mut sink = vec![0u8; 1 << 20];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match first.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the oldest connection was kept");
}

/// The listen queue is the kernel's (up to `somaxconn`), not std's 128:
/// a burst of connections past `max_connections` is queued at once, not
/// dropped and retried a second later by every client past the 128th.
#[tokio::test]
async fn a_burst_of_connections_waits_in_a_deep_listen_queue() {
    // The kernel caps the queue at somaxconn: on one that keeps it at
    // 128 (Linux before 5.4) there is nothing deeper to show.
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if somaxconn < 512 {
        eprintln!("net.core.somaxconn is {somaxconn}: the listen queue cannot be deeper");
        return;
    }
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&config(&up.url(), "{ max_connections: 1 }")).await;
    // The one slot, taken: every later connection waits in the queue.
    let _held = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let burst: Vec<_> = (0..200)
        .map(|_| {
            let addr = gw.addr;
            tokio::spawn(async move {
                tokio::time::timeout(
                    Duration::from_millis(700),
                    tokio::net::TcpStream::connect(addr),
                )
                .await
            })
        })
        .collect();
    let mut queued = Vec::new();
    let mut late = 0;
    for task in burst {
        match task.await.expect("task") {
            Ok(Ok(stream)) => queued.push(stream),
            _ => late += 1,
        }
    }
    assert_eq!(late, 0, "{late} of 200 connections were not queued at once");
}

/// A client uploading steadily, slower than the upstream's `first_byte`,
/// is not cut off by it: the upstream cannot answer before it has the
/// body, so `first_byte` counts from the body's end (as nginx's
/// `proxy_read_timeout` counts from the request sent), and only
/// `request_timeout` bounds the upload.
#[tokio::test]
async fn a_steady_upload_longer_than_first_byte_is_answered() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&format!(
        r#"
upstreams:
  app: {{ url: "{}", timeouts: {{ first_byte: 300ms }} }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, auth: none, upstream: app }}
limits: {{ request_timeout: 10s }}
"#,
        up.url()
    ))
    .await;
    let addr = gw.addr;
    let reply = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"POST /upload HTTP/1.1\r\nhost: t\r\ncontent-length: 10000\r\nconnection: close\r\n\r\n")
            .unwrap();
        // 1 s of upload, a tenth of it every 100 ms.
        for _ in 0..10 {
            s.write_all(&[b'x'; 1000]).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        String::from_utf8_lossy(&got).into_owned()
    })
    .await
    .unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert_eq!(up.seen()[0].body.len(), 10_000);
}
