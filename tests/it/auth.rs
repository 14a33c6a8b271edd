//! API keys on `auth: required` routes: Bearer and x-api-key, raw and
//! hashed keys, 401 in the SPEC shape, anonymous routes, and no credential
//! ever written to a log line.

use bytes::Bytes;
use http::Method;

use crate::support::{Client, TestGateway};

const CONFIG: &str = r#"
upstreams:
  demo: { mock: {} }
auth:
  api_keys:
    - id: raw-key
      key: ${RAW_KEY}
      tier: pro
    - id: hashed-key
      hash: sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    - id: public-only
      key: sk-public-only
      routes: [public, maybe]
tiers:
  free: {}
  pro: {}
routes:
  - name: chat
    match: { path_prefix: /v1/ }
    upstream: demo
  - name: maybe
    match: { path_prefix: /maybe/ }
    auth: optional
    upstream: demo
  - name: public
    match: { path_prefix: /public/ }
    auth: none
    upstream: demo
"#;

const RAW: &str = "sk-live-0123456789abcdef";

async fn gateway() -> TestGateway {
    TestGateway::start_with_env(CONFIG, &[("RAW_KEY", RAW)]).await
}

async fn models(
    gw: &TestGateway,
    path: &str,
    headers: &[(&str, &str)],
) -> crate::support::ClientReply {
    Client::new()
        .send(Method::GET, &gw.url(path), headers, Bytes::new())
        .await
}

#[tokio::test]
async fn missing_key_is_401_with_www_authenticate() {
    let gw = gateway().await;
    let reply = models(&gw, "/v1/models", &[]).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    let err = reply.json();
    assert_eq!(err["error"]["code"], "invalid_api_key");
    assert_eq!(err["error"]["type"], "authentication_error");
}

#[tokio::test]
async fn wrong_key_is_401_and_not_echoed() {
    let gw = gateway().await;
    let reply = models(
        &gw,
        "/v1/models",
        &[("authorization", "Bearer sk-wrong-guess-123")],
    )
    .await;
    assert_eq!(reply.status, 401);
    assert!(!reply.text().contains("sk-wrong-guess-123"));
    let basic = models(
        &gw,
        "/v1/models",
        &[("authorization", "Basic dXNlcjpwYXNz")],
    )
    .await;
    assert_eq!(basic.status, 401);
}

#[tokio::test]
async fn bearer_and_x_api_key_both_work() {
    let gw = gateway().await;
    let bearer = format!("Bearer {RAW}");
    assert_eq!(
        models(&gw, "/v1/models", &[("authorization", &bearer)])
            .await
            .status,
        200
    );
    assert_eq!(
        models(&gw, "/v1/models", &[("x-api-key", RAW)])
            .await
            .status,
        200
    );
    let logs = gw.wait_access_logs(2).await;
    assert_eq!(logs[0]["identity"], "raw-key");
    assert_eq!(logs[0]["identity_kind"], "api_key");
    assert_eq!(logs[0]["tier"], "pro");
}

#[tokio::test]
async fn hashed_key_matches_its_plaintext() {
    let gw = gateway().await;
    assert_eq!(
        models(&gw, "/v1/models", &[("x-api-key", "test")])
            .await
            .status,
        200
    );
    let logs = gw.wait_access_logs(1).await;
    assert_eq!(logs[0]["identity"], "hashed-key");
    // No tier on the key: the default tier (`free` exists) applies.
    assert_eq!(logs[0]["tier"], "free");
}

#[tokio::test]
async fn optional_and_none_routes() {
    let gw = gateway().await;
    assert_eq!(
        models(&gw, "/maybe/v1/models", &[]).await.status,
        404,
        "the mock only knows /v1/"
    );
    assert_eq!(
        models(&gw, "/maybe/x", &[("x-api-key", "nope")])
            .await
            .status,
        401
    );
    assert_eq!(
        models(&gw, "/public/x", &[("x-api-key", "nope")])
            .await
            .status,
        404
    );
    let logs = gw.wait_access_logs(3).await;
    assert_eq!(logs[0]["identity"], "127.0.0.1");
    assert_eq!(logs[0]["identity_kind"], "anonymous");
    assert_eq!(logs[0]["tier"], "anonymous");
}

#[tokio::test]
async fn no_credential_or_upstream_secret_in_any_log_line() {
    let gw = TestGateway::start_with_env(
        &CONFIG.replace(
            "demo: { mock: {} }",
            "demo: { mock: {} }\n  real:\n    url: http://127.0.0.1:9\n    set_headers: { authorization: \"Bearer ${UP_KEY}\" }",
        ),
        &[("RAW_KEY", RAW), ("UP_KEY", "sk-upstream-topsecret"), ("SLUICE_LOG", "trace")],
    )
    .await;
    let bearer = format!("Bearer {RAW}");
    models(&gw, "/v1/models", &[("authorization", &bearer)]).await;
    models(&gw, "/v1/models", &[("x-api-key", "sk-wrong-guess-123")]).await;
    // A client that put its key in the URL's path as well.
    models(
        &gw,
        &format!("/v1/{RAW}/models"),
        &[("authorization", &bearer)],
    )
    .await;
    let logs = gw.wait_access_logs(3).await;
    assert_eq!(logs[2]["path"], "/v1/***/models", "{}", logs[2]);
    let text = gw.log_text();
    for secret in [RAW, "sk-wrong-guess-123", "sk-upstream-topsecret"] {
        assert!(!text.contains(secret), "log leaks {secret}:\n{text}");
    }
}

#[tokio::test]
async fn key_limited_to_other_routes_is_403() {
    let gw = gateway().await;
    let reply = models(&gw, "/v1/models", &[("x-api-key", "sk-public-only")]).await;
    assert_eq!(reply.status, 403);
    assert_eq!(reply.json()["error"]["code"], "forbidden");
    assert_eq!(reply.json()["error"]["type"], "permission_error");
    // The log says who was refused (by id, never by key).
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["status"], 403);
    assert_eq!(log["identity"], "public-only", "{log}");
    assert!(!gw.log_text().contains("sk-public-only"));
    // Where it is allowed, it is who it says.
    assert_eq!(
        models(&gw, "/maybe/x", &[("x-api-key", "sk-public-only")])
            .await
            .status,
        404,
        "allowed route: the mock answers 404 for an unknown path"
    );
    let logs = gw.wait_access_logs(2).await;
    assert_eq!(logs[1]["identity"], "public-only");
}

#[tokio::test]
async fn auth_failures_are_counted_by_route_and_reason() {
    let gw = gateway().await;
    models(&gw, "/v1/models", &[]).await;
    models(&gw, "/v1/models", &[]).await;
    models(&gw, "/v1/models", &[("x-api-key", "nope")]).await;
    models(&gw, "/v1/models", &[("x-api-key", "sk-public-only")]).await;
    let count = |reason: &'static str| {
        let gw = &gw;
        async move {
            gw.metric(
                "sluice_auth_failures_total",
                &[("route", "chat"), ("reason", reason)],
            )
            .await
        }
    };
    assert_eq!(count("missing").await, Some(2.0));
    assert_eq!(count("invalid_key").await, Some(1.0));
    assert_eq!(count("forbidden").await, Some(1.0));
}

/// A bearer token or an `x-api-key` is the credential. Another
/// `authorization` scheme, or a bare `Bearer`, is a wrong credential (401
/// on an optional route too, not anonymous), unless an `x-api-key` is
/// beside it.
#[tokio::test]
async fn other_authorization_schemes_are_wrong_credentials() {
    let gw = gateway().await;
    for value in ["Bearer", "Basic", "Bearer ", "Basic dXNlcjpwYXNz"] {
        let reply = models(&gw, "/maybe/x", &[("authorization", value)]).await;
        assert_eq!(reply.status, 401, "{value:?} on an optional route");
        let reply = models(&gw, "/v1/models", &[("authorization", value)]).await;
        assert_eq!(reply.status, 401, "{value:?}");
    }
    let reply = models(
        &gw,
        "/v1/models",
        &[("authorization", "Basic dXNlcjpwYXNz"), ("x-api-key", RAW)],
    )
    .await;
    assert_eq!(reply.status, 200);
    // A bearer token decides, whatever x-api-key says.
    let bearer = format!("Bearer {RAW}");
    let reply = models(
        &gw,
        "/v1/models",
        &[("authorization", &bearer), ("x-api-key", "sk-wrong")],
    )
    .await;
    assert_eq!(reply.status, 200);
}

/// An app behind a route `admin` (under `prefix`, keys required) and an
/// open route for everything else.
async fn guarded(prefix: &str) -> (crate::support::MockUpstream, TestGateway) {
    let up = crate::support::MockUpstream::always(crate::support::UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&format!(
        r#"
upstreams:
  app: {{ url: "{}" }}
auth:
  api_keys:
    - {{ id: ops, key: sk-ops-0123456789 }}
routes:
  - name: admin
    match: {{ path_prefix: {prefix} }}
    auth: required
    upstream: app
  - name: open
    match: {{ path_prefix: / }}
    auth: none
    upstream: app
"#,
        up.url()
    ))
    .await;
    (up, gw)
}

/// A path spelled to miss a guarded route (an escape, a `..` segment, a
/// doubled slash) is matched as an upstream resolves it: it meets the
/// guarded route's auth instead of falling through to an open route.
#[tokio::test]
async fn an_encoded_path_cannot_slip_past_a_guarded_route() {
    let (up, gw) = guarded("/admin").await;
    for path in ["/%61dmin/users", "/public/../admin/users", "//admin/users"] {
        let reply = Client::new().get(&gw.url(path)).await;
        assert_eq!(reply.status, 401, "{path}");
    }
    // Read with `%2F` as `/` and `..` resolved, this meets the open
    // route; as written, the guarded one: refused, whichever the app does.
    let reply = Client::new()
        .get(&gw.url("/admin/x%2F..%2F..%2Fpublic"))
        .await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(reply.json()["error"]["code"], "invalid_request");
    assert!(up.seen().is_empty());
    // The upstream gets the path the route saw, the query as it came.
    let reply = Client::new().get(&gw.url("/public/./%78//y?q=%2E")).await;
    assert_eq!(reply.status, 200);
    assert_eq!(
        up.seen()[0].uri.path_and_query().unwrap().as_str(),
        "/public/x/y?q=%2E"
    );
}

/// A key read from a file (a Kubernetes Secret made from one) often ends
/// in a newline, and YAML can hold blanks around it: no client can send
/// those (a presented key is trimmed), so the configured key is trimmed
/// too and matches.
#[tokio::test]
async fn a_configured_key_with_blanks_around_it_matches() {
    let gw = TestGateway::start_with_env(CONFIG, &[("RAW_KEY", &format!(" {RAW}\n"))]).await;
    let reply = Client::new()
        .post_json(
            &gw.url("/v1/chat/completions"),
            &[("x-api-key", RAW)],
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
}

/// An app that decodes `%2F` before routing (Starlette, Werkzeug) reads
/// `/v1/chat%2Fcompletions` as the guarded, validated path: sluice
/// refuses a path whose readings meet different routes, and passes one
/// whose readings agree with its escape as written.
#[tokio::test]
async fn an_escaped_slash_cannot_slip_past_a_guarded_route() {
    let up = crate::support::MockUpstream::always(crate::support::UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&format!(
        r#"
upstreams:
  app: {{ url: "{}" }}
auth:
  api_keys:
    - {{ id: ops, key: sk-ops-0123456789 }}
routes:
  - name: chat
    match: {{ path: /v1/chat/completions }}
    auth: required
    validate: openai
    upstream: app
  - name: validated
    match: {{ path_prefix: /api/ }}
    auth: none
    validate: openai
    upstream: app
  - name: open
    match: {{ path_prefix: / }}
    auth: none
    upstream: app
"#,
        up.url()
    ))
    .await;
    // Both readings meet `validated`: the body is checked as a chat
    // request's, as the app will read it.
    let reply = Client::new()
        .post_json(
            &gw.url("/api/v1/chat%2Fcompletions"),
            &[],
            r#"{"model":1,"messages":"x"}"#,
        )
        .await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    assert_eq!(reply.json()["error"]["param"], "model", "{}", reply.text());
    for path in [
        "/v1/chat%2Fcompletions",
        "/v1/chat%2fcompletions",
        "/v1%5Cchat/completions",
        // WHATWG URL parsers (Node, Deno, Bun, Next.js) read `\` as `/`.
        "/v1\\chat/completions",
        "/x/..\\v1/chat/completions",
        // Read with its backslashes alone (a WHATWG parser keeps `%2F`
        // in its segment), it climbs out of /x/.
        "/x/a%2Fb/..\\..\\v1/chat/completions",
        // `//x` is a host to a WHATWG parser: the path is what follows.
        "/\\x/v1/chat/completions",
    ] {
        let reply = Client::new()
            .post_json(&gw.url(path), &[], r#"{"model":1,"messages":"x"}"#)
            .await;
        assert_eq!(reply.status, 400, "{path}: {}", reply.text());
        assert_eq!(reply.json()["error"]["code"], "invalid_request");
    }
    assert!(up.seen().is_empty(), "the app was reached");
    let reply = Client::new()
        .get(&gw.url("/v1/models/meta-llama%2FLlama-3-8B"))
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        up.seen()[0].uri.path(),
        "/v1/models/meta-llama%2FLlama-3-8B"
    );
    // A stream the app reads as chat completions is metered as one: sluice
    // asks for its usage.
    let reply = Client::new()
        .post_json(
            &gw.url("/api/v1/chat%2Fcompletions"),
            &[],
            r#"{"model":"m","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let body = String::from_utf8_lossy(&up.seen()[1].body).into_owned();
    assert!(body.contains("include_usage"), "{body}");
}

/// A refused POST whose small body came with it leaves its connection
/// open for the next request (nginx discards such a body too), so a
/// client refused in a loop does not reconnect each time. A body still
/// on its way, or one the client waits to be asked for, costs the
/// connection, said with `connection: close`.
#[tokio::test]
async fn a_refused_small_body_keeps_the_connection() {
    use crate::support::exchange;
    use std::time::Duration;
    let gw = gateway().await;
    let refused = "POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-length: 17\r\n\r\n{\"model\":\"gpt-4\"}";
    let next = format!("GET /v1/models HTTP/1.1\r\nhost: t\r\nauthorization: Bearer {RAW}\r\n\r\n");
    let (text, closed) = exchange(
        gw.addr,
        format!("{refused}{next}").as_bytes(),
        Duration::from_millis(400),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 401 "), "{text}");
    assert!(!text.contains("connection: close"), "{text}");
    assert!(
        text.contains("HTTP/1.1 200 OK"),
        "the next request is answered: {text}"
    );
    assert!(!closed, "{text}");

    // Part of the body, the rest never sent: answered within the wait,
    // and closed.
    let started = std::time::Instant::now();
    let (text, closed) = exchange(
        gw.addr,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-length: 100\r\n\r\n{\"model\"",
        Duration::from_secs(3),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 401 "), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(closed);
    assert!(started.elapsed() < Duration::from_secs(2));

    // `expect: 100-continue`: refused at once, the body never asked for.
    let (text, closed) = exchange(
        gw.addr,
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: t\r\ncontent-length: 17\r\nexpect: 100-continue\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(text.starts_with("HTTP/1.1 401 "), "no 100 first: {text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(closed);
}

/// Two `authorization` (or two `x-api-key`) headers name no single
/// caller: refused, even when both hold a valid key, rather than the
/// first one deciding.
#[tokio::test]
async fn two_credential_headers_of_one_name_are_401() {
    let gw = gateway().await;
    let bearer = format!("Bearer {RAW}");
    for headers in [
        vec![
            ("authorization", bearer.as_str()),
            ("authorization", bearer.as_str()),
        ],
        vec![
            ("authorization", bearer.as_str()),
            ("authorization", "Bearer wrong"),
        ],
        vec![("x-api-key", RAW), ("x-api-key", "test")],
    ] {
        let reply = models(&gw, "/v1/models", &headers).await;
        assert_eq!(reply.status, 401, "{headers:?}");
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
        assert!(reply.text().contains("invalid_api_key"), "{}", reply.text());
    }
    // (One of each is no ambiguity: see
    // `other_authorization_schemes_are_wrong_credentials`.)
}

/// Java servers drop `;` parameters from each segment, so `..;` is a step
/// up to them: a path whose parameter-free reading meets another route
/// than as written is refused, as escaped slashes are; one that meets
/// the same route either way passes as written.
#[tokio::test]
async fn a_path_parameter_cannot_slip_past_a_guarded_route() {
    let (up, gw) = guarded("/admin/").await;
    let client = Client::new();
    for path in [
        "/public/..;/admin/x",
        "/admin;jsessionid=1/x",
        "/public/..;x=1/admin/x",
    ] {
        let reply = client.get(&gw.url(path)).await;
        assert_eq!(reply.status, 400, "{path}: {}", reply.text());
    }
    assert!(up.seen().is_empty(), "nothing reached the app");
    let same = client.get(&gw.url("/public/page;jsessionid=1")).await;
    assert_eq!(same.status, 200);
    assert_eq!(up.seen()[0].uri.path(), "/public/page;jsessionid=1");
}

/// A route written with escapes guards its path however the client
/// spells it: escapes in either case, or the raw bytes beyond ASCII.
#[tokio::test]
async fn a_non_ascii_path_cannot_slip_past_a_guarded_route() {
    let (up, gw) = guarded("/caf%C3%A9/").await;
    for path in [
        "/caf%c3%a9/x",
        "/caf%C3%a9/x",
        "/caf\u{e9}/x",
        "/public/../caf\u{e9}/x",
    ] {
        let (status, answer) = crate::support::raw_exchange(
            &gw,
            &format!("GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"),
        )
        .await;
        assert_eq!(status, 401, "{path}: {answer}");
    }
    assert!(up.seen().is_empty(), "nothing reached the app");
}

/// Secrets a client writes where the access log copies its text (the
/// path, its `x-request-id`, the model it asks for) are masked there too,
/// not only the credential it presented in the path.
#[tokio::test]
async fn secrets_in_a_clients_path_request_id_or_model_are_masked_in_the_log() {
    const TEAM: &str = "tk-team-0801abcdef";
    const UPSTREAM: &str = "up-secret-0123456789";
    const HASHED: &str = "hashed-plain-0123456789";
    const UNKNOWN: &str = "sk-unknown-0123456789abcdef";
    let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(HASHED.as_bytes()));
    let config = format!(
        r#"
upstreams:
  demo: {{ mock: {{}} }}
  real:
    url: http://127.0.0.1:9
    set_headers: {{ authorization: "Bearer ${{UP_KEY}}" }}
  azure:
    url: "http://127.0.0.1:9/openai/deployments/${{DEPLOYMENT}}"
auth:
  api_keys:
    - {{ id: team, key: "${{TEAM_KEY}}" }}
    - {{ id: hashed, hash: "sha256:{hash}" }}
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
    upstream: demo
    rate_limit: {{ tokens_per_minute: 1000000 }}
  - name: public
    match: {{ path_prefix: /public/ }}
    auth: none
    upstream: demo
"#
    );
    let gw = TestGateway::start_with_env(
        &config,
        &[
            ("TEAM_KEY", TEAM),
            ("UP_KEY", UPSTREAM),
            ("DEPLOYMENT", "gpt4o-prod-east"),
        ],
    )
    .await;
    let team = format!("Bearer {TEAM}");
    let hashed = format!("Bearer {HASHED}");
    // A configured key and an upstream's secret in a path, no credential.
    models(&gw, &format!("/public/{TEAM}"), &[]).await;
    models(&gw, &format!("/public/x/{UPSTREAM}"), &[]).await;
    // Refused, with a configured key in the path.
    assert_eq!(
        models(&gw, &format!("/v1/models/{TEAM}"), &[]).await.status,
        401
    );
    // A key-looking token no config names.
    models(&gw, &format!("/public/{UNKNOWN}"), &[]).await;
    // The presented credential (known only by its hash) as the request id,
    // and a configured key another caller presents.
    models(
        &gw,
        "/v1/models",
        &[("authorization", &hashed), ("x-request-id", HASHED)],
    )
    .await;
    models(
        &gw,
        "/v1/models",
        &[("authorization", &hashed), ("x-request-id", TEAM)],
    )
    .await;
    // A configured key as the model asked for.
    let reply = Client::new()
        .post_json(
            &gw.url("/v1/chat/completions"),
            &[("authorization", &team)],
            &format!(r#"{{"model":"{TEAM}","messages":[{{"role":"user","content":"hi"}}]}}"#),
        )
        .await;
    assert_eq!(reply.status, 200);
    // The presented credential where no auth runs (no route, an open
    // route), percent-encoded, and as the model.
    models(
        &gw,
        &format!("/nope/{HASHED}"),
        &[("authorization", &hashed)],
    )
    .await;
    models(
        &gw,
        "/public/hashed%2Dplain-0123456789",
        &[("authorization", &hashed)],
    )
    .await;
    let reply = Client::new()
        .post_json(
            &gw.url("/v1/chat/completions"),
            &[("authorization", &hashed)],
            &format!(r#"{{"model":"{HASHED}","messages":[{{"role":"user","content":"hi"}}]}}"#),
        )
        .await;
    assert_eq!(reply.status, 200);
    // An upstream URL's variable (a deployment) is no secret of the path.
    models(&gw, "/public/openai/deployments/gpt4o-prod-east", &[]).await;
    let logs = gw.wait_access_logs(11).await;
    assert_eq!(
        logs[10]["path"],
        "/public/openai/deployments/gpt4o-prod-east"
    );
    assert_eq!(logs[7]["path"], "/nope/***", "{}", logs[7]);
    assert_eq!(logs[8]["path"], "/public/***", "{}", logs[8]);
    assert_eq!(logs[9]["model"], "***", "{}", logs[9]);
    assert_eq!(logs[0]["path"], "/public/***", "{}", logs[0]);
    assert_eq!(logs[1]["path"], "/public/x/***", "{}", logs[1]);
    assert_eq!(logs[2]["path"], "/v1/models/***", "{}", logs[2]);
    assert_eq!(logs[2]["status"], 401);
    assert_eq!(logs[3]["path"], "/public/sk-***", "{}", logs[3]);
    assert_eq!(logs[4]["request_id"], "***", "{}", logs[4]);
    assert_eq!(logs[5]["request_id"], "***", "{}", logs[5]);
    assert_eq!(logs[6]["model"], "***", "{}", logs[6]);
    let text = gw.log_text();
    for secret in [TEAM, UPSTREAM, HASHED, UNKNOWN] {
        assert!(!text.contains(secret), "log leaks {secret}:\n{text}");
    }
    // The client still gets its own request id back.
    let reply = models(
        &gw,
        "/v1/models",
        &[("authorization", &team), ("x-request-id", TEAM)],
    )
    .await;
    assert_eq!(reply.headers["x-request-id"], TEAM);
}

/// Over h2, a refusal that came before the request's small body reads
/// it first, so the stream ends closed both ways rather than reset after
/// the answer (which some clients, curl 7.88 among them, drop).
#[tokio::test]
async fn an_h2_refusal_reads_a_small_body_before_ending_the_stream() {
    let gw = gateway().await;
    let tcp = tokio::net::TcpStream::connect(gw.addr)
        .await
        .expect("connect");
    let (mut client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(connection);
    let request = http::Request::post(format!("http://{}/v1/chat/completions", gw.addr))
        .header("content-length", "2")
        .body(())
        .expect("a request");
    let (answer, mut body) = client.send_request(request, false).expect("sent");
    // The body comes a moment after its head, as curl sends it.
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    body.send_data(Bytes::from_static(b"{}"), true)
        .expect("body sent");
    let answer = answer.await.expect("an answer");
    assert_eq!(answer.status(), 401);
    let mut content = answer.into_body();
    let mut text = Vec::new();
    while let Some(data) = content.data().await {
        text.extend_from_slice(&data.expect("data"));
    }
    let json: serde_json::Value = serde_json::from_slice(&text).expect("a JSON error");
    assert_eq!(json["error"]["code"], "invalid_api_key");
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let reset = std::future::poll_fn(|cx| std::task::Poll::Ready(body.poll_reset(cx))).await;
    assert!(reset.is_pending(), "the stream was reset: {reset:?}");
}
