//! Plain proxying: passthrough of methods, paths, queries and large bodies;
//! header hygiene both ways; request ids; routing errors.

use bytes::Bytes;
use http::Method;

use crate::support::{Client, MockUpstream, TestGateway, UpstreamReply, raw_exchange};

fn config(upstream: &str) -> String {
    format!(
        r#"
limits: {{ max_request_body: 1MiB }}
upstreams:
  app:
    url: {upstream}
    set_headers:
      authorization: "Bearer ${{UPSTREAM_KEY}}"
auth:
  api_keys:
    - id: team-a
      key: ${{TEAM_A_KEY}}
routes:
  - name: chat
    match: {{ path_prefix: /v1/, methods: [GET, POST] }}
    upstream: app
  - name: open
    match: {{ path: /public }}
    auth: none
    upstream: app
"#
    )
}

const ENV: [(&str, &str); 2] = [
    ("UPSTREAM_KEY", "sk-upstream-secret"),
    ("TEAM_A_KEY", "key-a"),
];

#[tokio::test]
async fn get_passes_path_and_query_through() {
    let up = MockUpstream::always(UpstreamReply::text("hello").header("x-from", "app")).await;
    let gw = TestGateway::start_with_env(&config(&up.url()), &ENV).await;
    let reply = Client::new()
        .get_with(
            &gw.url("/v1/models?limit=5&q=a%20b"),
            &[("x-api-key", "key-a")],
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "hello");
    assert_eq!(reply.header("x-from"), Some("app"));
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].method, Method::GET);
    assert_eq!(
        seen[0].uri.path_and_query().unwrap().as_str(),
        "/v1/models?limit=5&q=a%20b"
    );
}

#[tokio::test]
async fn large_post_bodies_arrive_intact_both_ways() {
    let big_response: Bytes = (0..3_000_000u32)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let up = MockUpstream::always(UpstreamReply::text(big_response.clone())).await;
    let gw = TestGateway::start_with_env(&config(&up.url()), &ENV).await;
    let body: Bytes = (0..900_000u32)
        .map(|i| (i % 241) as u8)
        .collect::<Vec<u8>>()
        .into();
    let reply = Client::new()
        .send(
            Method::POST,
            &gw.url("/v1/files?purpose=batch"),
            &[
                ("authorization", "Bearer key-a"),
                ("content-type", "application/octet-stream"),
            ],
            body.clone(),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.body.len(), big_response.len());
    assert!(
        reply.body == big_response,
        "response body changed in transit"
    );
    let seen = up.seen();
    assert_eq!(seen[0].body.len(), body.len());
    assert!(seen[0].body == body, "request body changed in transit");
    assert_eq!(seen[0].uri.query(), Some("purpose=batch"));
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let up = MockUpstream::always(UpstreamReply::text("over h2")).await;
    let gw = TestGateway::start_with_env(&config(&up.url()), &ENV).await;
    let reply = Client::h2c().get(&gw.url("/public")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), "over h2");
    // A head of 20 KiB passes, as over HTTP/1.1 (h2's own default
    // bound is 16 KiB).
    let big = http::Request::get(gw.url("/public"))
        .header("x-big", "x".repeat(20 * 1024))
        .body(Default::default())
        .unwrap();
    let reply = Client::h2c().request(big).await;
    assert_eq!(reply.status, 200);
    // Cookies, one line each over h2, reach the HTTP/1.1 upstream as one
    // line (RFC 9113 §8.2.3).
    let cookies = http::Request::get(gw.url("/public"))
        .header("cookie", "a=1")
        .header("cookie", "b=2")
        .body(Default::default())
        .unwrap();
    assert_eq!(Client::h2c().request(cookies).await.status, 200);
    let seen = up.seen();
    assert_eq!(seen.len(), 3);
    let lines: Vec<_> = seen[2].headers.get_all("cookie").iter().collect();
    assert_eq!(lines, ["a=1; b=2"]);
}

#[tokio::test]
async fn hop_by_hop_credentials_and_sluice_headers_never_cross() {
    let up = MockUpstream::always(
        UpstreamReply::text("ok")
            .header("connection", "x-upstream-hop")
            .header("x-upstream-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("x-sluice-cache", "HIT")
            .header("x-kept", "yes"),
    )
    .await;
    let gw = TestGateway::start_with_env(&config(&up.url()), &ENV).await;
    let reply = Client::new()
        .get_with(
            &gw.url("/v1/models"),
            &[
                ("authorization", "Bearer key-a"),
                ("x-api-key", "key-a"),
                ("connection", "x-client-hop"),
                ("x-client-hop", "1"),
                ("te", "trailers"),
                ("x-sluice-identity", "admin"),
                ("x-forwarded-for", "10.0.0.9"),
                ("x-real-ip", "10.0.0.9"),
                ("x-custom", "kept"),
                ("accept-encoding", "gzip, br"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200);
    // Response side.
    assert_eq!(reply.header("x-upstream-hop"), None);
    assert_eq!(reply.header("keep-alive"), None);
    assert_eq!(reply.header("x-sluice-cache"), None);
    assert_eq!(reply.header("x-kept"), Some("yes"));
    // Request side, as the upstream saw it.
    let seen = &up.seen()[0];
    assert_eq!(seen.header("x-client-hop"), None);
    assert_eq!(seen.header("te"), None);
    assert_eq!(seen.header("x-sluice-identity"), None);
    assert_eq!(
        seen.header("x-api-key"),
        None,
        "gateway credential forwarded"
    );
    assert_eq!(
        seen.header("authorization"),
        Some("Bearer sk-upstream-secret"),
        "set_headers must replace the client's credential"
    );
    assert_eq!(seen.header("x-custom"), Some("kept"));
    assert_eq!(
        seen.header("accept-encoding"),
        Some("identity"),
        "sluice reads answers: it asks for them uncompressed, in so many words"
    );
    assert_eq!(seen.header("x-forwarded-for"), Some("10.0.0.9, 127.0.0.1"));
    assert_eq!(seen.header("x-real-ip"), Some("127.0.0.1"), "the peer's");
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(
        seen.header("x-forwarded-host"),
        Some(gw.addr.to_string().as_str())
    );
    assert_eq!(seen.header("host"), Some(up.addr.to_string().as_str()));
}

/// Credentials are the gateway's (SPEC §3) on `auth: none` routes too:
/// an upstream with no `set_headers` gets none of the client's.
/// Several `x-forwarded-for` lines are one list (RFC 9110 §5.3): every
/// hop reaches the upstream, in order, then the client's address.
#[tokio::test]
async fn every_x_forwarded_for_line_is_kept() {
    let (up, gw) = open_app().await;
    let reply = Client::new()
        .get_with(
            &gw.url("/x"),
            &[
                ("x-forwarded-for", "1.1.1.1"),
                ("x-forwarded-for", "2.2.2.2, 3.3.3.3"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200);
    let seen = &up.seen()[0];
    let lines: Vec<_> = seen.headers.get_all("x-forwarded-for").iter().collect();
    assert_eq!(lines, ["1.1.1.1, 2.2.2.2, 3.3.3.3, 127.0.0.1"]);
}

#[tokio::test]
async fn credentials_never_reach_an_upstream_on_auth_none_routes() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&format!(
        r#"
upstreams: {{ app: {{ url: "{}" }} }}
routes:
  - name: open
    match: {{ path_prefix: / }}
    auth: none
    upstream: app
"#,
        up.url()
    ))
    .await;
    let reply = Client::new()
        .get_with(
            &gw.url("/anything"),
            &[
                ("authorization", "Bearer sk-client-secret"),
                ("x-api-key", "sk-client-secret"),
                ("x-custom", "kept"),
            ],
        )
        .await;
    assert_eq!(reply.status, 200);
    let seen = &up.seen()[0];
    assert_eq!(seen.header("authorization"), None);
    assert_eq!(seen.header("x-api-key"), None);
    assert_eq!(seen.header("x-custom"), Some("kept"));
}

#[tokio::test]
async fn request_id_is_kept_or_made_and_reaches_both_sides() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start_with_env(&config(&up.url()), &ENV).await;
    let client = Client::new();
    let given = client
        .get_with(&gw.url("/public"), &[("x-request-id", "req-42")])
        .await;
    assert_eq!(given.header("x-request-id"), Some("req-42"));
    let made = client.get(&gw.url("/public")).await;
    let id = made
        .header("x-request-id")
        .expect("a request id")
        .to_owned();
    assert_eq!(id.len(), 32);
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    let seen = up.seen();
    assert_eq!(seen[0].header("x-request-id"), Some("req-42"));
    assert_eq!(seen[1].header("x-request-id"), Some(id.as_str()));
    // Errors sluice answers itself carry one too.
    let not_found = client.get(&gw.url("/nowhere")).await;
    assert!(not_found.header("x-request-id").is_some());
    assert_eq!(made.header("x-sluice-upstream-request-id"), None);
    // Any text is the client's: long, or with spaces; a blank one, or
    // one past 1 KiB, is not.
    let long = "r".repeat(1024);
    for given in [long.as_str(), "trace 7 of 9"] {
        let reply = client
            .get_with(&gw.url("/public"), &[("x-request-id", given)])
            .await;
        assert_eq!(reply.header("x-request-id"), Some(given));
    }
    let blank = client
        .get_with(&gw.url("/public"), &[("x-request-id", " ")])
        .await;
    assert_eq!(blank.header("x-request-id").map(str::len), Some(32));
    let too_long = "r".repeat(1025);
    let replaced = client
        .get_with(&gw.url("/public"), &[("x-request-id", &too_long)])
        .await;
    assert_eq!(replaced.header("x-request-id").map(str::len), Some(32));
    let logs = gw.wait_access_logs(7).await;
    assert_eq!(logs[3]["request_id"], long.as_str(), "{}", logs[3]);
}

/// An upstream's own request id (OpenAI's `req_…`, which its support asks
/// for) is kept beside sluice's, not lost under it.
#[tokio::test]
async fn the_upstreams_request_id_is_kept_beside_sluices() {
    let up =
        MockUpstream::always(UpstreamReply::text("ok").header("x-request-id", "req_abc123")).await;
    let gw = TestGateway::start_with_env(&config(&up.url()), &ENV).await;
    let reply = Client::new()
        .get_with(&gw.url("/public"), &[("x-request-id", "req-42")])
        .await;
    assert_eq!(reply.header("x-request-id"), Some("req-42"));
    assert_eq!(
        reply.header("x-sluice-upstream-request-id"),
        Some("req_abc123")
    );
}

#[tokio::test]
async fn unknown_path_is_404_in_openai_shape() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start_with_env(&config(&up.url()), &ENV).await;
    let reply = Client::new().get(&gw.url("/admin")).await;
    assert_eq!(reply.status, 404);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body = reply.json();
    assert_eq!(body["error"]["code"], "route_not_found");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no route")
    );
    assert!(up.seen().is_empty());
}

/// TRACE reaches no upstream unless a route lists it: one that echoes
/// it would show the credentials sluice sets (nginx refuses it too).
#[tokio::test]
async fn trace_is_405_on_a_route_that_takes_every_method() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&format!(
        r#"
upstreams: {{ app: {{ url: "{}", set_headers: {{ authorization: "Bearer up-secret-0123456789" }} }} }}
routes:
  - {{ name: traced, match: {{ path_prefix: /t/, methods: [TRACE] }}, auth: none, upstream: app }}
  - {{ name: any, match: {{ path_prefix: / }}, auth: none, upstream: app }}
"#,
        up.url()
    ))
    .await;
    let reply = Client::new()
        .send(Method::TRACE, &gw.url("/v1/models"), &[], Bytes::new())
        .await;
    assert_eq!(reply.status, 405, "{}", reply.text());
    assert_eq!(
        reply.header("allow"),
        Some("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")
    );
    assert!(up.seen().is_empty());
    let reply = Client::new()
        .send(Method::TRACE, &gw.url("/t/x"), &[], Bytes::new())
        .await;
    assert_eq!(reply.status, 200, "listed, it is the operator's choice");
    assert_eq!(Client::new().get(&gw.url("/v1/models")).await.status, 200);
}

/// A host header that a URL parser would read as another host (the app
/// gets it as `x-forwarded-host`, and builds links from it) is refused,
/// not routed on the part before its `:`.
#[tokio::test]
async fn a_host_header_that_is_no_host_and_port_is_400() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&format!(
        r#"
upstreams: {{ app: {{ url: "{}" }} }}
routes:
  - {{ name: internal, match: {{ path_prefix: /, host: internal.example.com }}, auth: none, upstream: app }}
"#,
        up.url()
    ))
    .await;
    for host in [
        "internal.example.com:@evil.com",
        "internal.example.com:80/x",
    ] {
        let reply = Client::new()
            .send(Method::GET, &gw.url("/x"), &[("host", host)], Bytes::new())
            .await;
        assert_eq!(reply.status, 400, "{host}: {}", reply.text());
        assert_eq!(reply.json()["error"]["code"], "invalid_request");
    }
    assert!(up.seen().is_empty());
    let reply = Client::new()
        .send(
            Method::GET,
            &gw.url("/x"),
            &[("host", "internal.example.com:8080")],
            Bytes::new(),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        up.seen()[0].header("x-forwarded-host"),
        Some("internal.example.com:8080")
    );
}

#[tokio::test]
async fn wrong_method_is_405_with_allow() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start_with_env(&config(&up.url()), &ENV).await;
    let reply = Client::new()
        .send(
            Method::DELETE,
            &gw.url("/v1/models"),
            &[("x-api-key", "key-a")],
            Bytes::new(),
        )
        .await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("GET, HEAD, POST"));
    assert_eq!(reply.json()["error"]["code"], "method_not_allowed");
    assert!(up.seen().is_empty());
    // The route's own answer: logged and counted under it.
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["route"], "chat", "{log}");
    let labels = [("route", "chat"), ("method", "DELETE"), ("status", "405")];
    assert_eq!(gw.metric("sluice_requests_total", &labels).await, Some(1.0));
    let in_flight = [("route", "chat")];
    assert_eq!(
        gw.metric("sluice_in_flight_requests", &in_flight).await,
        Some(0.0)
    );
    // HEAD goes where GET goes.
    let head = Client::new()
        .send(
            Method::HEAD,
            &gw.url("/v1/models"),
            &[("x-api-key", "key-a")],
            Bytes::new(),
        )
        .await;
    assert_eq!(head.status, 200);
    assert_eq!(up.seen()[0].method, Method::HEAD);
}

#[tokio::test]
async fn declared_oversize_body_is_413_before_forwarding() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start_with_env(&config(&up.url()), &ENV).await;
    let body = Bytes::from(vec![b'x'; (1 << 20) + 1]);
    let reply = Client::new()
        .send(
            Method::POST,
            &gw.url("/v1/files"),
            &[("x-api-key", "key-a")],
            body,
        )
        .await;
    assert_eq!(reply.status, 413);
    let err = reply.json();
    assert_eq!(err["error"]["code"], "request_too_large");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1048576")
    );
    assert!(
        up.seen().is_empty(),
        "an oversize body must not reach the upstream"
    );
}

#[tokio::test]
async fn chunked_oversize_body_is_413() {
    use futures_util::stream;
    use http_body_util::StreamBody;
    use hyper::body::Frame;

    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start_with_env(&config(&up.url()), &ENV).await;
    // No content-length: the limit can only be found while streaming.
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = (0..20)
        .map(|_| Ok(Frame::data(Bytes::from(vec![b'y'; 64 * 1024]))))
        .collect();
    let body = StreamBody::new(stream::iter(chunks));
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<StreamBody<_>>();
    let req = http::Request::post(gw.url("/v1/files"))
        .header("x-api-key", "key-a")
        .body(body)
        .unwrap();
    let resp = client.request(req).await.expect("response");
    let reply = crate::support::client::read(resp).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.json()["error"]["code"], "request_too_large");
}

/// Limits under which 1 MiB of request bodies may be held whole at once.
const BUDGET_1MIB: &str = "limits: { max_request_body: 1MiB, max_buffered_bytes: 1MiB }";

/// A gateway (with `limits`) whose one route sends to a pool of one
/// member answering `reply`: a pool reads bodies whole, to replay them.
async fn pool_app(reply: UpstreamReply, limits: &str) -> (MockUpstream, TestGateway) {
    let up = MockUpstream::always(reply).await;
    let gw = TestGateway::start(&format!(
        r#"
{limits}
upstreams:
  app: {{ url: "{}" }}
pools:
  both: {{ members: [app] }}
routes:
  - {{ name: app, match: {{ path_prefix: / }}, auth: none, upstream: both }}
"#,
        up.url()
    ))
    .await;
    (up, gw)
}

/// Request bodies held whole (here for a pool's replay) are bounded all
/// together by `max_buffered_bytes`: past it a request gets a 503 the
/// SDKs retry, and each body's share comes back once it is dropped.
#[tokio::test]
async fn bodies_held_whole_are_bounded_together() {
    use tokio::io::AsyncWriteExt;
    let (_up, gw) = pool_app(UpstreamReply::text("ok"), BUDGET_1MIB).await;
    let post = |size: usize| {
        let url = gw.url("/v1/files");
        async move {
            Client::new()
                .send(Method::POST, &url, &[], Bytes::from(vec![b'b'; size]))
                .await
        }
    };
    // A slow upload holds 700 KB of its 1 MB while it trickles in.
    let mut slow = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(b"POST /v1/files HTTP/1.1\r\nhost: t\r\ncontent-length: 1000000\r\n\r\n")
        .await
        .unwrap();
    slow.write_all(&vec![b'a'; 700_000]).await.unwrap();
    let mut refused = None;
    for _ in 0..200 {
        let reply = post(500_000).await;
        if reply.status == 503 {
            refused = Some(reply);
            break;
        }
        assert_eq!(reply.status, 200, "{}", reply.text());
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let refused = refused.expect("700 KB + 500 KB never passed the 1 MiB bound");
    assert_eq!(refused.json()["error"]["code"], "server_overloaded");
    assert_eq!(refused.json()["error"]["type"], "server_error");
    assert_eq!(refused.header("retry-after"), Some("1"));

    // The slow client gives up: its share is back.
    drop(slow);
    let mut back = false;
    for _ in 0..200 {
        if post(500_000).await.status == 200 {
            back = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(back, "the abandoned upload's share was never given back");
    // Nothing held after answered requests: one body near the bound fits.
    assert_eq!(post(1_000_000).await.status, 200);
    assert_eq!(post(1_000_000).await.status, 200);
}

/// A body sluice edits before sending it (usage asked for on a streamed
/// chat request, the SDKs' default) stays counted while the edited copy
/// waits on the upstream, and is given back once the answer is in.
#[tokio::test]
async fn an_edited_body_stays_counted_while_it_is_held() {
    let reply = UpstreamReply::text("ok").delay(std::time::Duration::from_millis(600));
    let (up, gw) = pool_app(reply, "").await;
    let prompt = "x".repeat(300_000);
    let body = format!(
        r#"{{"model":"m","stream":true,"messages":[{{"role":"user","content":"{prompt}"}}]}}"#
    );
    let url = gw.url("/v1/chat/completions");
    let request = tokio::spawn(async move { Client::new().post_json(&url, &[], &body).await });
    let held = || async {
        gw.metric("sluice_buffered_request_bytes", &[])
            .await
            .unwrap_or(-1.0)
    };
    // Once the upstream has the request, only the edited copy is held.
    for _ in 0..40 {
        if !up.seen().is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(up.seen().len(), 1, "the upstream never got the request");
    let seen = held().await;
    assert!(seen >= 300_000.0, "held while waiting: {seen}");
    assert_eq!(request.await.unwrap().status, 200);
    assert!(
        up.seen()[0]
            .body
            .windows(14)
            .any(|w| w == b"include_usage\""),
        "usage was asked for"
    );
    assert_eq!(held().await, 0.0);
}

/// Posts a chat request without a length, in frames of `frame` bytes.
async fn post_chat_in_frames(
    gw: &TestGateway,
    body: &[u8],
    frame: usize,
) -> crate::support::ClientReply {
    use futures_util::stream;
    use http_body_util::StreamBody;
    use hyper::body::Frame;

    let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = body
        .chunks(frame)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<StreamBody<_>>();
    let req = http::Request::post(gw.url("/v1/chat/completions"))
        .header("x-api-key", "key-a")
        .header("content-type", "application/json")
        .body(StreamBody::new(stream::iter(frames)))
        .unwrap();
    let resp = client.request(req).await.expect("response");
    crate::support::client::read(resp).await
}

fn chat_body(content_len: usize) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "z".repeat(content_len)}],
    }))
    .unwrap()
}

#[tokio::test]
async fn a_chat_body_in_many_frames_reaches_the_upstream_whole() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start_with_env(&config(&up.url()), &ENV).await;
    let body = chat_body(300_000);
    let reply = post_chat_in_frames(&gw, &body, 16 * 1024).await;
    assert_eq!(reply.status, 200);
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body.as_ref(), body.as_slice());
}

#[tokio::test]
async fn a_chunked_chat_body_over_the_limit_is_413() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start_with_env(&config(&up.url()), &ENV).await;
    let reply = post_chat_in_frames(&gw, &chat_body(1 << 20), 64 * 1024).await;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.json()["error"]["code"], "request_too_large");
    assert!(up.seen().is_empty());
}

/// A route chosen by host is chosen by the same host the upstream is told
/// of in `x-forwarded-host`: a request naming two hosts (an absolute-form
/// target and a `host` header, two `host` lines, or, on h2, `:authority`
/// and `host`) is refused, as nginx refuses it, rather than routed by one
/// and forwarded as the other.
#[tokio::test]
async fn a_request_naming_two_hosts_is_refused() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&format!(
        r#"
upstreams:
  app: {{ url: "{}" }}
auth:
  api_keys: [ {{ id: a, key: key-a }} ]
routes:
  - name: admin
    match: {{ host: admin.internal }}
    upstream: app
  - name: open
    match: {{ path_prefix: / }}
    auth: none
    upstream: app
"#,
        up.url()
    ))
    .await;
    for (request, why) in [
        (
            "GET http://public.example/x HTTP/1.1\r\nhost: admin.internal\r\nconnection: close\r\n\r\n",
            "absolute-form target and host differ",
        ),
        (
            "GET /x HTTP/1.1\r\nhost: public.example\r\nhost: admin.internal\r\nconnection: close\r\n\r\n",
            "two host lines",
        ),
        (
            "GET /x HTTP/1.1\r\nconnection: close\r\n\r\n",
            "no host on HTTP/1.1",
        ),
        (
            "GET http://public.example@admin.internal/x HTTP/1.1\r\nhost: admin.internal\r\nconnection: close\r\n\r\n",
            "userinfo in the target, read as another host by a filter in front",
        ),
    ] {
        let (status, text) = raw_exchange(&gw, request).await;
        assert_eq!(status, 400, "{why}: {text}");
        assert!(
            text.contains("\"code\":\"invalid_request\""),
            "{why}: {text}"
        );
    }
    assert!(up.seen().is_empty(), "nothing was forwarded");

    // HTTP/1.0 needs no host; an absolute-form target agreeing with its
    // host is routed and forwarded by it; a fully qualified host (root
    // dot) is the same host.
    let (status, _) = raw_exchange(&gw, "GET /x HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, 200);
    let (status, _) = raw_exchange(
        &gw,
        "GET http://admin.internal/x HTTP/1.1\r\nhost: admin.internal\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 401, "the admin route, which needs a key");
    let (status, _) = raw_exchange(
        &gw,
        "GET http://public.example/x HTTP/1.1\r\nhost: public.example:80\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        up.seen().last().unwrap().header("x-forwarded-host"),
        Some("public.example")
    );
    let (status, _) = raw_exchange(
        &gw,
        "GET /x HTTP/1.1\r\nhost: admin.internal.\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 401, "admin.internal. is admin.internal");

    // h2: `:authority` and a `host` that differ.
    let (mut sender, _conn) = crate::support::client::h2c_connection(gw.addr).await;
    let req = http::Request::get("http://public.example/x")
        .header("host", "admin.internal")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 400);
}

/// A body streamed through to the upstream that breaks its chunked
/// framing is the client's error, as it is on a route that reads bodies
/// whole: a 400, counted against nobody's upstream (not a 502 that would
/// page whoever watches upstream errors).
#[tokio::test]
async fn a_malformed_body_streamed_through_is_a_client_error() {
    let (_up, gw) = open_app().await;
    let (status, text) = raw_exchange(
        &gw,
        "POST /x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("the request body could not be read"),
        "{text}"
    );
    let logs = gw.wait_access_logs(1).await;
    for (outcome, count) in [("client_error", 1.0), ("connection_error", 0.0)] {
        let counted = gw
            .metric(
                "sluice_upstream_requests_total",
                &[("upstream", "app"), ("outcome", outcome)],
            )
            .await;
        assert_eq!(counted.unwrap_or(0.0), count, "{outcome}");
    }
    assert_eq!(logs[0]["status"], 400);
}

/// A GET with a chunked body (some search APIs take one) reaches the
/// upstream with its body, as nginx forwards it.
#[tokio::test]
async fn a_chunked_body_on_a_get_is_forwarded() {
    let (up, gw) = open_app().await;
    let (status, text) = raw_exchange(
        &gw,
        "GET /search HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let seen = up.seen();
    assert_eq!(seen[0].method, Method::GET);
    assert_eq!(&seen[0].body[..], b"hello");
    // A GET without a body is still sent without one.
    let (status, _) = raw_exchange(
        &gw,
        "GET /plain HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    let seen = up.seen();
    assert!(seen[1].body.is_empty());
    assert_eq!(seen[1].header("transfer-encoding"), None);
}

/// A request head is bounded (64 KiB, Envoy's bound) rather than
/// hyper's ~400 KB: larger ones get 431 and never reach the upstream.
/// hyper answers those (and malformed heads) itself; they are still
/// logged and counted, with the method and path sluice never read as null.
#[tokio::test]
async fn an_oversized_request_head_is_refused() {
    let (up, gw) = open_app().await;
    let big = "a".repeat(100 * 1024);
    let (status, too_large) = raw_exchange(
        &gw,
        &format!("GET /x HTTP/1.1\r\nhost: t\r\nx-big: {big}\r\nconnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 431);
    let fits = "a".repeat(32 * 1024);
    let (status, _) = raw_exchange(
        &gw,
        &format!("GET /x HTTP/1.1\r\nhost: t\r\nx-big: {fits}\r\nconnection: close\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(up.seen().len(), 1);
    let (status, malformed) = raw_exchange(&gw, "GET /x HTTP/7.1\r\nhost: t\r\n\r\n").await;
    assert_eq!(status, 400);

    let logs = gw.wait_access_logs(3).await;
    let refused: Vec<_> = logs.iter().filter(|l| l["path"].is_null()).collect();
    assert_eq!(refused.len(), 2, "{logs:?}");
    for ((line, (status, error)), answer) in refused
        .iter()
        .zip([(431, "request_too_large"), (400, "invalid_request")])
        .zip([&too_large, &malformed])
    {
        // Answered in the SPEC's shape, with the id the line logs.
        let (head, body) = answer.split_once("\r\n\r\n").expect("a head");
        let head = head.to_ascii_lowercase();
        assert!(head.contains("content-type: application/json"), "{head}");
        let id = line["request_id"].as_str().expect("an id");
        assert!(
            head.contains(&format!("x-request-id: {id}")),
            "{head}\n{line}"
        );
        let json: serde_json::Value = serde_json::from_str(body).expect("a JSON error");
        assert_eq!(json["error"]["code"], error, "{body}");
        assert_eq!(json["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(line["status"], status, "{line}");
        assert_eq!(line["error"], error, "{line}");
        assert!(
            line["method"].is_null() && line["route"].is_null(),
            "{line}"
        );
        assert_eq!(line["client_ip"], "127.0.0.1", "{line}");
        assert_eq!(
            line["request_id"].as_str().map(str::len),
            Some(32),
            "{line}"
        );
    }
    assert_eq!(
        gw.metric(
            "sluice_request_duration_seconds_count",
            &[("route", "none")]
        )
        .await,
        Some(2.0)
    );
    for status in ["431", "400"] {
        let labels = [("route", "none"), ("method", "other"), ("status", status)];
        assert_eq!(
            gw.metric("sluice_requests_total", &labels).await,
            Some(1.0),
            "{status}"
        );
    }
}

/// sluice answers a client's `expect: 100-continue` itself (hyper sends
/// the 100 when the body is wanted); the upstream gets the body without
/// the header, as nginx forwards it.
#[tokio::test]
async fn expect_continue_is_answered_not_forwarded() {
    let (up, gw) = open_app().await;
    let (status, text) = raw_exchange(
        &gw,
        "POST /x HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\nexpect: 100-continue\r\nconnection: close\r\n\r\nhello",
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let seen = up.seen();
    assert_eq!(&seen[0].body[..], b"hello");
    assert_eq!(seen[0].header("expect"), None);
}

/// A tunnel request is refused, not forwarded as a malformed request to
/// whichever route takes any path.
#[tokio::test]
async fn connect_is_refused() {
    let (up, gw) = open_app().await;
    let (status, text) = raw_exchange(
        &gw,
        "CONNECT tunnel.example:443 HTTP/1.1\r\nhost: tunnel.example:443\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("CONNECT is not supported"), "{text}");
    assert!(up.seen().is_empty());
}

/// An upstream answering `ok`, behind one open route taking every path.
/// An answer whose body, in one of its writes, reads byte for byte as
/// hyper's refusal of a head (which sluice rewrites on its way out)
/// reaches the client as the upstream sent it.
#[tokio::test]
async fn a_body_that_reads_like_a_refused_head_passes_unchanged() {
    const REFUSAL: &str = "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\ndate: Mon, 30 Nov 2026 06:26:52 GMT\r\n\r\n";
    let mut reply = UpstreamReply::status(200);
    reply.chunks = vec![
        (
            std::time::Duration::ZERO,
            Bytes::from_static(b"first part\n"),
        ),
        (
            std::time::Duration::from_millis(200),
            Bytes::from_static(REFUSAL.as_bytes()),
        ),
    ];
    let up = MockUpstream::always(reply).await;
    let gw = TestGateway::start(&crate::support::app_config(&up.url(), "")).await;
    // HTTP/1.0: the body goes unframed, each piece as it comes.
    let (status, text) = raw_exchange(&gw, "GET /x HTTP/1.0\r\nhost: t\r\n\r\n").await;
    assert_eq!(status, 200);
    let (_, body) = text.split_once("\r\n\r\n").expect("a head");
    assert_eq!(body, format!("first part\n{REFUSAL}"));
}

async fn open_app() -> (MockUpstream, TestGateway) {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&crate::support::app_config(&up.url(), "")).await;
    (up, gw)
}

/// A 405's `allow` names what every route on that path would take, not
/// only the first: a client told `GET` alone would never try `POST`.
#[tokio::test]
async fn a_405_allows_the_methods_of_every_route_on_the_path() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&format!(
        r#"
upstreams:
  app: {{ url: "{}" }}
routes:
  - {{ name: read, match: {{ path: /x, methods: [GET] }}, auth: none, upstream: app }}
  - {{ name: write, match: {{ path: /x, methods: [POST, GET] }}, auth: none, upstream: app }}
"#,
        up.url()
    ))
    .await;
    let reply = Client::new()
        .send(Method::DELETE, &gw.url("/x"), &[], Bytes::new())
        .await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("GET, HEAD, POST"));
}

/// An absolute-form target with credentials (`http://user:pw@host/`) is
/// refused (RFC 9112 §3.2.2 has none in a target): they never reach the
/// upstream, in `x-forwarded-host` or anywhere.
#[tokio::test]
async fn x_forwarded_host_never_carries_userinfo() {
    let (up, gw) = open_app().await;
    let (status, text) = raw_exchange(
        &gw,
        "GET http://user:secret@t/x HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 400, "{text}");
    assert!(!text.contains("secret"), "{text}");
    assert!(up.seen().is_empty());
}

/// A body is charged the bytes it sent: clients that announce a large
/// body and send two bytes hold two bytes each of the budget, not what
/// they announced, and cannot refuse everyone else.
#[tokio::test]
async fn an_announced_body_is_charged_as_it_arrives() {
    use tokio::io::AsyncWriteExt;
    let (_up, gw) = pool_app(UpstreamReply::text("ok"), BUDGET_1MIB).await;
    let mut silent = Vec::new();
    for _ in 0..3 {
        let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        conn.write_all(b"POST /v1/files HTTP/1.1\r\nhost: t\r\ncontent-length: 1000000\r\n\r\n{")
            .await
            .unwrap();
        // A second frame: the join's buffer is made at the announced size.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        conn.write_all(b"\"").await.unwrap();
        silent.push(conn);
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert_eq!(
        gw.metric("sluice_buffered_request_bytes", &[]).await,
        Some(6.0)
    );
    let reply = Client::new()
        .send(
            Method::POST,
            &gw.url("/v1/files"),
            &[],
            Bytes::from(vec![b'b'; 900_000]),
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// A request refused before its body arrived (here: no API key) is
/// answered at once, with `connection: close`: hyper closes a connection
/// whose body was left unread, and a client told so opens a new one for
/// its next request instead of writing into a closed socket. A refusal
/// without a body keeps the connection.
#[tokio::test]
async fn a_refusal_before_the_body_says_the_connection_closes() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&format!(
        "upstreams:\n  app: {{ url: \"{}\" }}\nauth:\n  api_keys:\n    - {{ id: a, key: sk-a-0001 }}\nroutes:\n  - name: app\n    match: {{ path_prefix: / }}\n    upstream: app\n",
        upstream.url()
    ))
    .await;
    let head_of = |request: &'static str| {
        let addr = gw.addr;
        async move {
            let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
            conn.write_all(request.as_bytes()).await.unwrap();
            let mut got = vec![0; 4096];
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut got))
                .await
                .expect("answered before the body came")
                .unwrap();
            String::from_utf8_lossy(&got[..n]).to_ascii_lowercase()
        }
    };
    // The head only: the body never comes.
    let unread = head_of("POST /v1/chat HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\n").await;
    assert!(unread.starts_with("http/1.1 401"), "{unread}");
    assert!(unread.contains("\r\nconnection: close\r\n"), "{unread}");
    let chunked =
        head_of("POST /v1/chat HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n").await;
    assert!(chunked.contains("\r\nconnection: close\r\n"), "{chunked}");
    let bodiless = head_of("GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n").await;
    assert!(bodiless.starts_with("http/1.1 401"), "{bodiless}");
    assert!(!bodiless.contains("connection: close"), "{bodiless}");
}

/// A client that goes away mid-upload is logged as nginx logs it, 499
/// `client_closed`, whether its body streamed through or was read whole
/// (a validated route): not a 400 that dashboards read as a bad request.
#[tokio::test]
async fn a_client_gone_mid_upload_is_a_499() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&format!(
        r#"
upstreams:
  app: {{ url: "{}" }}
routes:
  - {{ name: checked, match: {{ path_prefix: /v1/ }}, auth: none, validate: openai, upstream: app }}
  - {{ name: open, match: {{ path_prefix: / }}, auth: none, upstream: app }}
"#,
        up.url()
    ))
    .await;
    for (i, path) in ["/x", "/v1/chat/completions"].into_iter().enumerate() {
        let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"model\""
        );
        conn.write_all(head.as_bytes()).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        conn.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            conn.read_to_end(&mut rest),
        )
        .await;
        // Half-closed, it still reads: an HTTP status, not the log's 499.
        let answer = String::from_utf8_lossy(&rest);
        assert!(answer.starts_with("HTTP/1.1 400 "), "{path}: {answer}");
        let logs = gw.wait_access_logs(i + 1).await;
        assert_eq!(logs[i]["status"], 499, "{path}: {:?}", logs[i]);
        assert_eq!(logs[i]["error"], "client_closed", "{path}: {:?}", logs[i]);
    }
    assert_eq!(
        gw.metric(
            "sluice_requests_total",
            &[("route", "open"), ("method", "POST"), ("status", "499")]
        )
        .await,
        Some(1.0)
    );
}

/// A body read whole and refused by validation leaves nothing unread:
/// the connection serves the next request (nginx and Envoy keep it too).
#[tokio::test]
async fn a_refused_body_read_whole_keeps_the_connection() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&format!(
        r#"
upstreams:
  app: {{ url: "{}" }}
routes:
  - {{ name: checked, match: {{ path_prefix: /v1/ }}, auth: none, validate: openai, upstream: app }}
"#,
        up.url()
    ))
    .await;
    let body = r#"{"model":"x"}"#;
    let (_, text) = raw_exchange(
        &gw,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n\
             content-length: {}\r\n\r\n{body}GET /v1/models HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
            body.len()
        ),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 2, "{text}");
    assert!(text.contains("HTTP/1.1 200"), "{text}");
}

/// A route `host` of `*.example.com` takes the names under it (any
/// case, any port), not the domain itself, as Envoy's domains do.
#[tokio::test]
async fn a_wildcard_host_takes_the_names_under_it() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&format!(
        r#"
upstreams:
  app: {{ url: "{}" }}
routes:
  - {{ name: tenants, match: {{ host: "*.example.com" }}, auth: none, upstream: app }}
  - {{ name: rest, match: {{ path_prefix: / }}, upstream: app }}
"#,
        up.url()
    ))
    .await;
    for (host, status) in [
        ("a.example.com", 200),
        ("B.Example.COM:8443", 200),
        ("a.b.example.com", 200),
        ("example.com", 401),
        ("badexample.com", 401),
    ] {
        let (got, text) = raw_exchange(
            &gw,
            &format!("GET /x HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(got, status, "{host}: {text}");
    }
}

/// An app builds its redirects from the `host` it was sent, which is its
/// own address: the client gets them relative, to follow through
/// sluice (nginx's `proxy_redirect default`). Others pass as they are.
#[tokio::test]
async fn redirects_to_the_upstreams_own_address_are_made_relative() {
    let up = MockUpstream::start(|seen| {
        let host = seen.header("host").unwrap_or_default().to_owned();
        let location = match seen.uri.path() {
            "/away" => "https://login.example.com/sso".to_owned(),
            _ => format!("http://{host}/v1/chat/completions?x=1"),
        };
        UpstreamReply::status(307).header("location", &location)
    })
    .await;
    let gw = TestGateway::start(&crate::support::app_config(&up.url(), "")).await;
    let reply = Client::new().get(&gw.url("/v1/chat/completions/")).await;
    assert_eq!(reply.status, 307);
    assert_eq!(reply.header("location"), Some("/v1/chat/completions?x=1"));
    let reply = Client::new().get(&gw.url("/away")).await;
    assert_eq!(
        reply.header("location"),
        Some("https://login.example.com/sso")
    );
}

/// An HTTP/2 client that cancels its stream mid-upload (a browser's
/// abort, an SDK's timeout: RST_STREAM CANCEL) is logged as 499 too,
/// whether its body streamed through or was read whole (validation): not
/// as a malformed request.
#[tokio::test]
async fn an_h2_client_cancelling_mid_upload_is_a_499() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&format!(
        "upstreams:\n  app: {{ url: \"{}\" }}\nroutes:\n  - {{ name: checked, match: {{ path_prefix: /v1/ }}, auth: none, validate: openai, upstream: app }}\n  - {{ name: open, match: {{ path_prefix: / }}, auth: none, upstream: app }}\n",
        up.url()
    ))
    .await;
    for (i, path) in ["/upload", "/v1/chat/completions"].into_iter().enumerate() {
        let (mut sender, conn) = crate::support::client::h2c_connection(gw.addr).await;
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let frames = Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
            let data = rx.recv().await?;
            Some((
                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(data)),
                rx,
            ))
        }));
        let req = http::Request::post(gw.url(path))
            .header("content-type", "application/json")
            .body(http_body_util::StreamBody::new(frames))
            .unwrap();
        tx.send(Bytes::from_static(b"{\"model\"")).await.unwrap();
        // Cancelled while the body is still coming: the response is
        // dropped with the sender alive, which resets the stream.
        let pending = sender.send_request(req);
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(300), pending)
                .await
                .is_err()
        );
        let logs = gw.wait_access_logs(i + 1).await;
        assert_eq!(logs[i]["status"], 499, "{path}: {:?}", logs[i]);
        assert_eq!(logs[i]["error"], "client_closed", "{path}: {:?}", logs[i]);
        drop(tx);
        conn.abort();
    }
}

/// A transfer coding other than chunked would be lost on the way (the
/// upstream would get gzip bytes as the body): 501, as nginx answers.
#[tokio::test]
async fn a_transfer_coding_other_than_chunked_is_a_501() {
    let (up, gw) = open_app().await;
    let (status, text) = raw_exchange(
        &gw,
        "POST /x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 501, "{text}");
    assert!(text.contains("\"code\":\"not_implemented\""), "{text}");
    assert!(up.seen().is_empty());
    let (status, _) = raw_exchange(
        &gw,
        "POST /x HTTP/1.1\r\nhost: t\r\ntransfer-encoding: Chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    // On a route with a cache and CORS, the refusal is the route's, with
    // the headers every one of its responses carries.
    let gw = TestGateway::start(&format!(
        r#"
upstreams:
  app: {{ url: "{}" }}
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
    auth: none
    cache: {{ ttl: 1m, scope: shared }}
    cors: {{ allow_origins: ["https://app.example.com"] }}
    upstream: app
"#,
        up.url()
    ))
    .await;
    let (status, text) = raw_exchange(
        &gw,
        "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\norigin: https://app.example.com\r\ntransfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status, 501, "{text}");
    let head = text.to_ascii_lowercase();
    assert!(head.contains("x-sluice-cache: bypass"), "{text}");
    assert!(
        head.contains("access-control-allow-origin: https://app.example.com"),
        "{text}"
    );
    assert_eq!(up.seen().len(), 1, "only the chunked request went through");
}

/// An upstream's `set_headers` may name its `host`: a virtual host served
/// at an address.
#[tokio::test]
async fn set_headers_may_name_the_upstreams_host() {
    let up = MockUpstream::always(UpstreamReply::text("ok")).await;
    let yaml = format!(
        "upstreams:\n  app:\n    url: {}\n    set_headers: {{ host: api.internal.example }}\nroutes:\n  - {{ name: r, match: {{ path_prefix: / }}, auth: none, upstream: app }}\n",
        up.url()
    );
    let gw = TestGateway::start(&yaml).await;
    let reply = Client::new()
        .send(Method::GET, &gw.url("/v1/models"), &[], Bytes::new())
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(up.seen()[0].header("host"), Some("api.internal.example"));
}
