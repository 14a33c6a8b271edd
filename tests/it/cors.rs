//! CORS on routes with `cors`: preflights answered by sluice before auth
//! (never reaching the upstream), `access-control-*` headers on responses
//! for allowed origins, none for others, nothing on routes without `cors`.

use http::{Method, Request};
use http_body_util::Full;

use crate::support::{Client, MockUpstream, TestGateway, UpstreamReply};

async fn start() -> (TestGateway, MockUpstream) {
    let upstream = MockUpstream::always(UpstreamReply::text("{}")).await;
    let yaml = format!(
        r#"
upstreams:
  app: {{ url: "{}" }}
auth:
  api_keys:
    - {{ id: web, key: sk-web-0001 }}
routes:
  - name: chat
    match: {{ path_prefix: /v1/, methods: [POST] }}
    cors: {{ allow_origins: ["https://app.example.com:443"], max_age: 10m }}
    upstream: app
  - name: open
    match: {{ path_prefix: /open/ }}
    auth: none
    cors: {{ allow_origins: ["*"], allow_credentials: false }}
    upstream: app
  - name: plain
    match: {{ path_prefix: / }}
    upstream: app
"#,
        upstream.url()
    );
    (TestGateway::start(&yaml).await, upstream)
}

fn preflight(url: &str, origin: &str) -> Request<Full<bytes::Bytes>> {
    Request::builder()
        .method(Method::OPTIONS)
        .uri(url)
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type",
        )
        .body(Full::default())
        .unwrap()
}

#[tokio::test]
async fn a_preflight_is_answered_before_auth_and_never_forwarded() {
    let (gw, upstream) = start().await;
    let reply = Client::new()
        .request(preflight(
            &gw.url("/v1/chat/completions"),
            "https://app.example.com",
        ))
        .await;
    assert_eq!(reply.status, 204);
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    // The route's own methods (the default port written in the config
    // matched the browser's `origin`, which leaves it out).
    assert_eq!(
        reply.header("access-control-allow-methods"),
        Some("POST, OPTIONS")
    );
    let headers = reply.header("access-control-allow-headers").unwrap();
    assert!(headers.contains("authorization") && headers.contains("content-type"));
    assert_eq!(reply.header("access-control-max-age"), Some("600"));
    assert_eq!(times_origin_varies(&reply), 1, "{:?}", reply.headers);
    assert!(upstream.seen().is_empty(), "the upstream saw the preflight");
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["status"], 204);
    assert_eq!(log["route"], "chat");
}

#[tokio::test]
async fn a_disallowed_origin_gets_no_cors_headers() {
    let (gw, upstream) = start().await;
    let client = Client::new();
    let reply = client
        .request(preflight(
            &gw.url("/v1/chat/completions"),
            "https://evil.example",
        ))
        .await;
    assert_eq!(reply.status, 204);
    for (name, _) in &reply.headers {
        assert!(
            !name.as_str().starts_with("access-control-"),
            "{name} sent to a disallowed origin"
        );
    }
    let call = client
        .post_json(
            &gw.url("/v1/chat/completions"),
            &[
                ("authorization", "Bearer sk-web-0001"),
                ("origin", "https://evil.example"),
            ],
            "{}",
        )
        .await;
    assert_eq!(call.status, 200);
    assert_eq!(call.header("access-control-allow-origin"), None);
    assert_eq!(upstream.seen().len(), 1);
}

#[tokio::test]
async fn responses_to_an_allowed_origin_carry_the_headers_errors_included() {
    let (gw, _upstream) = start().await;
    let client = Client::new();
    let origin = ("origin", "https://app.example.com");
    let ok = client
        .post_json(
            &gw.url("/v1/chat/completions"),
            &[("authorization", "Bearer sk-web-0001"), origin],
            "{}",
        )
        .await;
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    let exposed = ok.header("access-control-expose-headers").unwrap();
    assert!(exposed.contains("x-request-id"), "{exposed}");
    // A 401 the page can read, rather than an opaque CORS failure.
    let denied = client
        .post_json(&gw.url("/v1/chat/completions"), &[origin], "{}")
        .await;
    assert_eq!(denied.status, 401);
    assert_eq!(
        denied.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
}

#[tokio::test]
async fn a_wildcard_allows_any_origin_and_routes_without_cors_say_nothing() {
    let (gw, upstream) = start().await;
    let client = Client::new();
    let any = client
        .request(preflight(&gw.url("/open/x"), "https://anything.example"))
        .await;
    assert_eq!(any.status, 204);
    assert_eq!(any.header("access-control-allow-origin"), Some("*"));

    let plain = client
        .request(preflight(&gw.url("/other"), "https://app.example.com"))
        .await;
    // Without `cors` the OPTIONS is an ordinary request: auth applies.
    assert_eq!(plain.status, 401);
    assert_eq!(plain.header("access-control-allow-origin"), None);
    assert!(upstream.seen().is_empty());
}

#[tokio::test]
async fn a_wildcard_with_credentials_is_a_config_error() {
    let yaml = r#"
upstreams: { app: { mock: {} } }
routes:
  - name: open
    match: { path_prefix: / }
    auth: none
    cors: { allow_origins: ["*"], allow_credentials: true }
    upstream: app
"#;
    let err = sluice::config::load_str(yaml, "t.yaml", std::path::Path::new("."), &|_| None)
        .expect_err("refused");
    assert!(
        err.to_string()
            .contains("cannot be combined with allow_credentials"),
        "{err}"
    );
}

#[tokio::test]
async fn a_plain_options_request_is_not_taken_for_a_preflight() {
    let (gw, upstream) = start().await;
    // No access-control-request-method: an API call. The chat route allows
    // only POST, so the catch-all `plain` route (auth required) takes it.
    let reply = Client::new()
        .request(
            Request::builder()
                .method(Method::OPTIONS)
                .uri(gw.url("/v1/chat/completions"))
                .header("origin", "https://app.example.com")
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.header("access-control-allow-origin"), None);
    assert!(upstream.seen().is_empty());
}

/// Without `allow_headers`, a preflight gets back the headers it asks for:
/// browser SDKs send their own (the OpenAI SDK's `x-stainless-*`,
/// `openai-beta`). A configured list is sent as it is.
#[tokio::test]
async fn a_preflight_gets_the_headers_it_asks_for_unless_listed() {
    let upstream = MockUpstream::always(UpstreamReply::text("{}")).await;
    let yaml = format!(
        r#"
upstreams:
  app: {{ url: "{}" }}
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
    cors: {{ allow_origins: ["https://app.example.com"] }}
    upstream: app
  - name: strict
    match: {{ path_prefix: /strict/ }}
    cors: {{ allow_origins: ["https://app.example.com"], allow_headers: [authorization, content-type] }}
    upstream: app
"#,
        upstream.url()
    );
    let gw = TestGateway::start(&yaml).await;
    let asked = "authorization, content-type, x-stainless-os, x-stainless-retry-count, openai-beta";
    let ask = |path: &str| {
        Request::builder()
            .method(Method::OPTIONS)
            .uri(gw.url(path))
            .header("origin", "https://app.example.com")
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", asked)
            .body(Full::default())
            .unwrap()
    };
    let client = Client::new();
    let reply = client.request(ask("/v1/chat/completions")).await;
    assert_eq!(reply.status, 204);
    assert_eq!(reply.header("access-control-allow-headers"), Some(asked));
    let reply = client.request(ask("/strict/x")).await;
    assert_eq!(
        reply.header("access-control-allow-headers"),
        Some("authorization, content-type")
    );
    assert!(upstream.seen().is_empty());
}

/// A 405 on a CORS route (no later route takes the method) carries its
/// CORS headers: a browser shows the error only with them.
#[tokio::test]
async fn a_wrong_method_on_a_cors_route_has_its_cors_headers() {
    let upstream = MockUpstream::always(UpstreamReply::text("{}")).await;
    let yaml = format!(
        r#"
upstreams:
  app: {{ url: "{}" }}
routes:
  - name: chat
    match: {{ path_prefix: /v1/, methods: [POST] }}
    auth: none
    cors: {{ allow_origins: ["https://app.example.com"] }}
    upstream: app
"#,
        upstream.url()
    );
    let gw = TestGateway::start(&yaml).await;
    let wrong = Client::new()
        .request(
            Request::builder()
                .method(Method::PUT)
                .uri(gw.url("/v1/chat/completions"))
                .header("origin", "https://app.example.com")
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(wrong.status, 405);
    assert_eq!(wrong.header("allow"), Some("POST, OPTIONS"));
    assert_eq!(
        wrong.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(wrong.header("vary"), Some("origin"));
    // A plain OPTIONS (no preflight) is answered with what `allow` says.
    let options = Client::new()
        .request(
            Request::builder()
                .method(Method::OPTIONS)
                .uri(gw.url("/v1/chat/completions"))
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(options.status, 204, "{}", options.text());
    assert_eq!(options.header("allow"), Some("POST, OPTIONS"));
    assert!(upstream.seen().is_empty());
}

/// An upstream that varies by `Origin` already (any case) is not told so
/// twice; a response to an allowed origin always varies by it.
#[tokio::test]
async fn vary_names_origin_once_whoever_wrote_it() {
    let upstream =
        MockUpstream::always(UpstreamReply::text("{}").header("vary", "Accept-Encoding, Origin"))
            .await;
    let yaml = format!(
        r#"
upstreams:
  app: {{ url: "{}" }}
routes:
  - name: open
    match: {{ path_prefix: / }}
    auth: none
    cors: {{ allow_origins: ["https://app.example.com"] }}
    upstream: app
"#,
        upstream.url()
    );
    let gw = TestGateway::start(&yaml).await;
    let reply = Client::new()
        .send(
            Method::GET,
            &gw.url("/x"),
            &[("origin", "https://app.example.com")],
            bytes::Bytes::new(),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(times_origin_varies(&reply), 1, "{:?}", reply.headers);
}

/// How many times a reply's `vary` lines name `origin`, in any case.
fn times_origin_varies(reply: &crate::support::ClientReply) -> usize {
    reply
        .headers
        .get_all("vary")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(|v| v.to_ascii_lowercase().matches("origin").count())
        .sum()
}

/// The route's `cors` is the one policy: an app's own permissive CORS
/// headers reach neither a disallowed origin nor, beyond what the route
/// says, an allowed one.
#[tokio::test]
async fn the_upstreams_own_cors_headers_are_replaced_by_the_routes() {
    let upstream = MockUpstream::always(
        UpstreamReply::text("{}")
            .header("access-control-allow-origin", "*")
            .header("access-control-allow-credentials", "true")
            .header("access-control-expose-headers", "x-internal"),
    )
    .await;
    let gw = TestGateway::start(&format!(
        r#"
upstreams:
  app: {{ url: "{}" }}
routes:
  - name: web
    match: {{ path_prefix: / }}
    auth: none
    cors: {{ allow_origins: ["https://app.example.com"] }}
    upstream: app
"#,
        upstream.url()
    ))
    .await;
    let call = |origin: &'static str| {
        let url = gw.url("/x");
        async move {
            Client::new()
                .send(
                    Method::GET,
                    &url,
                    &[("origin", origin)],
                    bytes::Bytes::new(),
                )
                .await
        }
    };
    let evil = call("https://evil.example").await;
    assert_eq!(evil.status, 200);
    for (name, _) in &evil.headers {
        assert!(
            !name.as_str().starts_with("access-control-"),
            "{name} sent to a disallowed origin"
        );
    }
    let app = call("https://app.example.com").await;
    assert_eq!(
        app.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert_eq!(app.header("access-control-allow-credentials"), None);
    assert!(
        !app.header("access-control-expose-headers")
            .unwrap_or_default()
            .contains("x-internal")
    );
}

/// A cached answer stored before its route had `cors` (with the app's
/// own permissive headers) is served under the route's policy once a
/// reload adds it.
#[tokio::test]
async fn a_cache_hit_follows_the_routes_cors_not_the_stored_headers() {
    let upstream =
        MockUpstream::always(UpstreamReply::text("{}").header("access-control-allow-origin", "*"))
            .await;
    let yaml = |cors: &str| {
        format!(
            r#"
upstreams:
  app: {{ url: "{}" }}
routes:
  - name: web
    match: {{ path_prefix: / }}
    auth: none
    cache: {{ ttl: 10m, scope: shared }}
{cors}    upstream: app
"#,
            upstream.url()
        )
    };
    let gw = TestGateway::start_watched(&yaml(""), &[], tempfile::tempdir().unwrap()).await;
    let call = || {
        let url = gw.url("/x");
        async move {
            Client::new()
                .send(
                    Method::GET,
                    &url,
                    &[("origin", "https://evil.example")],
                    bytes::Bytes::new(),
                )
                .await
        }
    };
    let first = call().await;
    assert_eq!(first.header("access-control-allow-origin"), Some("*"));
    gw.swap_config(&yaml(
        "    cors: { allow_origins: [\"https://app.example.com\"] }\n",
    ));
    let mut reloaded = false;
    for _ in 0..100 {
        let ok = gw
            .metric("sluice_config_reloads_total", &[("result", "ok")])
            .await;
        if ok == Some(1.0) {
            reloaded = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(reloaded, "the config was not reloaded");
    let hit = call().await;
    assert_eq!(hit.header("x-sluice-cache"), Some("HIT"));
    assert_eq!(hit.header("access-control-allow-origin"), None);
    assert_eq!(upstream.seen().len(), 1);
}

/// `https://*.example.com` allows the origins under the domain, with the
/// same scheme and port, and echoes the one that called; the domain
/// itself, look-alikes and other schemes or ports are refused.
#[tokio::test]
async fn an_origin_under_a_wildcard_domain_is_allowed() {
    let upstream = MockUpstream::always(UpstreamReply::text("{}")).await;
    let gw = TestGateway::start(&format!(
        r#"
upstreams:
  app: {{ url: "{}" }}
routes:
  - name: chat
    match: {{ path_prefix: / }}
    auth: none
    cors: {{ allow_origins: ["https://*.example.com", "http://*.dev.test:3000"] }}
    upstream: app
"#,
        upstream.url()
    ))
    .await;
    let allowed = |origin: &'static str| {
        let url = gw.url("/v1/chat/completions");
        async move {
            let reply = Client::new().request(preflight(&url, origin)).await;
            assert_eq!(reply.status, 204, "{origin}");
            reply
                .header("access-control-allow-origin")
                .map(str::to_owned)
        }
    };
    for origin in [
        "https://app.example.com",
        "https://pr-42.preview.example.com",
        "HTTPS://App.Example.COM",
        "http://web.dev.test:3000",
    ] {
        assert_eq!(allowed(origin).await.as_deref(), Some(origin));
    }
    for origin in [
        "https://example.com",
        "https://evilexample.com",
        "https://app.example.com.evil.net",
        "http://app.example.com",
        "https://app.example.com:8443",
        "http://web.dev.test",
        "http://web.dev.test:30000",
        "https://.example.com",
    ] {
        assert_eq!(allowed(origin).await, None, "{origin}");
    }
}
