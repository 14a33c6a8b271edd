//! `logging.log_bodies`: request and response bodies in the access log,
//! truncated to 4 KiB and with credentials masked, streams included (and
//! still streamed); off by default.

use std::time::Duration;

use crate::support::{Client, MockUpstream, TestGateway, UpstreamReply};

fn config(url: &str, log_bodies: bool) -> String {
    format!(
        r#"
upstreams:
  llm: {{ url: "{url}" }}
auth:
  api_keys:
    - {{ id: alice, key: sk-alice-0123456789 }}
    - {{ id: bob, key: gwkey-bob-5566778899 }}
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
    upstream: llm
logging: {{ level: info, log_bodies: {log_bodies} }}
"#
    )
}

const ALICE: (&str, &str) = ("authorization", "Bearer sk-alice-0123456789");

#[tokio::test]
async fn bodies_are_logged_masked_and_truncated() {
    let answer = format!(
        r#"{{"id":"x","access_token":"tok-123456","text":"{}"}}"#,
        "z".repeat(6000)
    );
    let upstream = MockUpstream::always(
        UpstreamReply::text(answer.clone()).header("content-type", "application/json"),
    )
    .await;
    let gw = TestGateway::start(&config(&upstream.url(), true)).await;
    let body = r#"{"model":"m","api_key":"sk-live-abcdefgh1234","password":"hunter2","messages":[{"role":"user","content":"my key is Bearer abc.def.ghi"}]}"#;
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[ALICE], body)
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.text(), answer, "the client got the whole body");
    assert_eq!(upstream.seen()[0].body, body.as_bytes(), "the upstream too");

    let log = &gw.wait_access_logs(1).await[0];
    let request = log["request_body"].as_str().unwrap();
    assert_eq!(
        request,
        r#"{"model":"m","api_key":"***","password":"***","messages":[{"role":"user","content":"my key is Bearer ***"}]}"#
    );
    let response = log["response_body"].as_str().unwrap();
    assert!(
        response.starts_with(r#"{"id":"x","access_token":"***","text":"zzz"#),
        "{response}"
    );
    assert!(response.ends_with("bytes in all]"), "{response}");
    assert!(response.len() <= 4096, "{} bytes logged", response.len());
    let text = gw.log_text();
    for secret in [
        "sk-live-abcdefgh1234",
        "hunter2",
        "abc.def.ghi",
        "tok-123456",
        "sk-alice-0123456789",
    ] {
        assert!(!text.contains(secret), "{secret} leaked into the log");
    }
}

#[tokio::test]
async fn a_streamed_response_is_logged_as_it_passed() {
    let events = [
        r#"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#,
        r#"{"choices":[{"index":0,"delta":{"content":"lo"}}]}"#,
        "[DONE]",
    ];
    let upstream =
        MockUpstream::always(UpstreamReply::sse(&events, Duration::from_millis(50))).await;
    let gw = TestGateway::start(&config(&upstream.url(), true)).await;
    let reply = Client::new()
        .post_json(
            &gw.url("/v1/chat/completions"),
            &[ALICE],
            r#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
        )
        .await;
    assert!(
        reply.frames.len() >= 3,
        "still streamed: {:?}",
        reply.frames
    );
    let gap = reply.frames[2].0 - reply.frames[0].0;
    assert!(
        gap >= Duration::from_millis(80),
        "frames arrived {gap:?} apart"
    );
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["response_body"].as_str().unwrap(), reply.text());
}

#[tokio::test]
async fn bodies_are_not_logged_by_default() {
    let upstream = MockUpstream::always(UpstreamReply::text("{\"secret\":1}")).await;
    let gw = TestGateway::start(
        &config(&upstream.url(), false)
            .replace("logging: { level: info, log_bodies: false }\n", ""),
    )
    .await;
    Client::new()
        .post_json(&gw.url("/v1/x"), &[ALICE], r#"{"hello":"there"}"#)
        .await;
    let log = &gw.wait_access_logs(1).await[0];
    assert!(log.get("request_body").is_none(), "{log}");
    assert!(log.get("response_body").is_none(), "{log}");
    assert!(!gw.log_text().contains("there"));
}

/// An upstream that echoes the request it got (headers included) would
/// put a `set_headers` value in the logged response body: it is masked
/// there, whatever its name or shape.
#[tokio::test]
async fn set_headers_values_echoed_back_are_masked() {
    let upstream = MockUpstream::start(|seen| {
        // Under names nothing else masks.
        // `x-slashed` as encoders that escape `/` write it.
        let echo = format!(
            r#"{{"seen":["{}","{}","{}","{}","{}","{}","{}","{}","{}"]}}"#,
            seen.header("x-upstream-token").unwrap_or(""),
            seen.header("authorization").unwrap_or(""),
            seen.header("x-org").unwrap_or(""),
            seen.header("anthropic-version").unwrap_or(""),
            seen.header("ocp-apim-subscription-key").unwrap_or(""),
            seen.header("x-acct").unwrap_or(""),
            seen.header("x-slashed").unwrap_or("").replace('/', "\\/"),
            // An upstream that names the session it refuses.
            seen.header("cookie")
                .and_then(|c| c.strip_prefix("sid="))
                .and_then(|c| c.split(';').next())
                .unwrap_or(""),
            seen.uri.path(),
        );
        UpstreamReply::text(echo)
    })
    .await;
    let yaml = config(&upstream.url(), true).replace(
        &format!("  llm: {{ url: \"{}\" }}", upstream.url()),
        &format!(
            "  llm:\n    url: \"{}/hooks/${{HOOK}}\"\n    set_headers: {{ cookie: \"sid=${{SESS}}; lang=en\", x-upstream-token: uptok-4f9a8b7c6d, authorization: \"Token up-cred-99887766\", x-org: \"${{ORG}}\", anthropic-version: 2023-06-01, ocp-apim-subscription-key: apim-literal-5566, x-acct: \"Bearer acct_7Hq2:ACCT-TAIL-41\", x-slashed: wJalrXUtn/K7MDENG/SLASHED-TAIL-42 }}",
            upstream.url()
        ),
    );
    let gw = TestGateway::start_with_env(
        &yaml,
        &[
            ("ORG", "org-from-env-31337"),
            ("SESS", "sess-from-env-24680"),
            ("HOOK", "hook-from-env-13579"),
        ],
    )
    .await;
    // A client that pastes another client's gateway key into its prompt.
    let reply = Client::new()
        .post_json(
            &gw.url("/v1/chat/completions"),
            &[ALICE],
            r#"{"messages":[{"role":"user","content":"bob's key is gwkey-bob-5566778899"}]}"#,
        )
        .await;
    assert_eq!(reply.status, 200);
    assert!(
        reply.text().contains("uptok-4f9a8b7c6d"),
        "the client gets the echo"
    );
    gw.wait_access_logs(1).await;
    let text = gw.log_text();
    assert!(!text.contains("uptok-4f9a8b7c6d"), "{text}");
    assert!(!text.contains("up-cred-99887766"), "{text}");
    assert!(
        !text.contains("org-from-env-31337"),
        "a value from a variable: {text}"
    );
    assert!(!text.contains("apim-literal-5566"), "a literal key: {text}");
    assert!(
        !text.contains("ACCT-TAIL-41"),
        "a value partly masked: {text}"
    );
    assert!(!text.contains("SLASHED-TAIL-42"), "escaped slashes: {text}");
    assert!(!text.contains("gwkey-bob"), "a gateway key: {text}");
    assert!(
        reply.text().contains("sess-from-env-24680")
            && reply.text().contains("/hooks/hook-from-env-13579/"),
        "the upstream got both: {}",
        reply.text()
    );
    assert!(
        !text.contains("sess-from-env-24680"),
        "a variable that is part of a value: {text}"
    );
    assert!(
        !text.contains("hook-from-env-13579"),
        "a variable in the upstream's path: {text}"
    );
    assert!(
        text.contains("2023-06-01"),
        "a plain setting is no secret: {text}"
    );
}

/// An upstream URL made whole by a variable (`url: "${BACKUP_URL}"`, as
/// the shipped ConfigMap writes it) may carry a token in its path: an
/// upstream echoing its path logs it masked, and its host shows.
#[tokio::test]
async fn a_token_in_an_upstream_url_from_a_variable_is_masked() {
    let upstream = MockUpstream::start(|seen| {
        UpstreamReply::text(format!(r#"{{"path":"{}"}}"#, seen.uri.path()))
    })
    .await;
    let whole = format!("{}/relay/tok-0123456789abcdefghij", upstream.url());
    let gw = TestGateway::start_with_env(
        &config("${BACKUP_URL}", true),
        &[("BACKUP_URL", whole.as_str())],
    )
    .await;
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[ALICE], "{}")
        .await;
    assert_eq!(reply.status, 200);
    assert!(reply.text().contains("tok-0123456789abcdefghij"));
    gw.wait_access_logs(1).await;
    let text = gw.log_text();
    assert!(!text.contains("tok-0123456789abcdefghij"), "{text}");
    assert!(text.contains("/relay/***/v1/chat/completions"), "{text}");
}

/// The other secrets a config holds: a body that quotes them (a prompt
/// pasted from an ops runbook, an answer echoing it) logs them masked.
#[tokio::test]
async fn other_secrets_of_the_config_are_masked_in_bodies() {
    const HS256: &str = "hs-secret-7f3e9a1b2c4d5e6f7a8b9c0d1e2f3a4b";
    const REDIS_PASSWORD: &str = "redis-pw-0a1b2c3d4e";
    const WEBHOOK: &str = "https://hooks.slack.com/services/T000/B000/XOXB-HOOK-TOKEN-77";
    let upstream = MockUpstream::start(|seen| UpstreamReply::text(seen.body.clone())).await;
    let yaml = config(&upstream.url(), true).replace(
        "routes:",
        &format!(
            "  jwt: {{ issuer: https://login.example.com/, hs256_secret: {HS256}, algorithms: [HS256] }}\n\
             state: {{ backend: memory, redis_url: \"redis://:{REDIS_PASSWORD}@127.0.0.1:6379\" }}\n\
             budget: {{ daily_usd: 100, webhook_url: \"{WEBHOOK}\" }}\n\
             routes:"
        ),
    );
    let gw = TestGateway::start(&yaml).await;
    let body = format!(
        r#"{{"messages":[{{"role":"user","content":"jwt {HS256} redis {REDIS_PASSWORD} hook {}"}}]}}"#,
        WEBHOOK.replace('/', "\\/")
    );
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[ALICE], &body)
        .await;
    assert_eq!(reply.status, 200);
    assert!(reply.text().contains(HS256), "the client gets the echo");
    let logs = gw.wait_access_logs(1).await;
    assert!(logs[0]["request_body"].is_string(), "{}", logs[0]);
    let text = gw.log_text();
    for secret in [HS256, REDIS_PASSWORD, "XOXB-HOOK-TOKEN-77"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
}

/// A key configured by its `hash` is not known in clear, but the request
/// presents it: pasted into the client's own body, and echoed back in the
/// answer, it is masked in both, as a JWT presented as the credential is.
#[tokio::test]
async fn the_credential_a_request_presents_is_masked_in_its_bodies() {
    const KEY: &str = "plainsecret-7070-abcdef";
    let upstream = MockUpstream::start(|seen| UpstreamReply::text(seen.body.clone())).await;
    let hash = sluice::proxy::auth::format_hash(KEY.as_bytes());
    let yaml = config(&upstream.url(), true).replace(
        "    - { id: bob, key: gwkey-bob-5566778899 }",
        &format!("    - {{ id: carol, hash: \"{hash}\" }}"),
    );
    let gw = TestGateway::start(&yaml).await;
    let body = format!(r#"{{"messages":[{{"role":"user","content":"is {KEY} my key?"}}]}}"#);
    let reply = Client::new()
        .post_json(
            &gw.url("/v1/chat/completions"),
            &[("x-api-key", KEY)],
            &body,
        )
        .await;
    assert_eq!(reply.status, 200);
    assert!(reply.text().contains(KEY), "the client gets its echo");
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(log["identity"], "carol");
    let masked = r#"{"messages":[{"role":"user","content":"is *** my key?"}]}"#;
    assert_eq!(log["request_body"], masked);
    assert_eq!(log["response_body"], masked);
    assert!(!gw.log_text().contains(KEY));
}

/// A login form a browser posts as `multipart/form-data` (`new
/// FormData(form)`), through the catch-all route in front of an app:
/// its password is masked like the same field in JSON or urlencoded.
#[tokio::test]
async fn a_multipart_form_logs_no_password() {
    let upstream = MockUpstream::always(UpstreamReply::text("ok")).await;
    let gw = TestGateway::start(&config(&upstream.url(), true)).await;
    let form = "--b0undary\r\nContent-Disposition: form-data; name=\"username\"\r\n\r\nalice\r\n\
                --b0undary\r\nContent-Disposition: form-data; name=\"password\"\r\n\r\nCorrectHorseBattery9\r\n\
                --b0undary--\r\n";
    let reply = Client::new()
        .send(
            http::Method::POST,
            &gw.url("/v1/login"),
            &[
                ALICE,
                ("content-type", "multipart/form-data; boundary=b0undary"),
            ],
            bytes::Bytes::from_static(form.as_bytes()),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(upstream.seen()[0].body, form.as_bytes(), "sent as it came");
    let log = &gw.wait_access_logs(1).await[0];
    let logged = log["request_body"].as_str().unwrap();
    assert!(logged.contains("alice"), "{logged}");
    assert!(
        logged.contains("name=\"password\"\r\n\r\n***\r\n--b0undary--"),
        "{logged}"
    );
    assert!(!gw.log_text().contains("CorrectHorseBattery9"));
}

/// A body that validation refuses is the one an operator most needs to
/// see: it is logged (masked) with its 400.
#[tokio::test]
async fn a_body_validation_refuses_is_logged() {
    let upstream = MockUpstream::always(UpstreamReply::text("ok")).await;
    let yaml = config(&upstream.url(), true).replace(
        "match: { path_prefix: /v1/ }\n",
        "match: { path_prefix: /v1/ }\n    validate: openai\n",
    );
    let gw = TestGateway::start(&yaml).await;
    let body =
        r#"{"model":"m","messages":[{"role":"robot","content":"hi"}],"api_key":"zz-9876543210"}"#;
    let reply = Client::new()
        .post_json(&gw.url("/v1/chat/completions"), &[ALICE], body)
        .await;
    assert_eq!(reply.status, 400, "{}", reply.text());
    let log = &gw.wait_access_logs(1).await[0];
    assert_eq!(
        log["request_body"],
        r#"{"model":"m","messages":[{"role":"robot","content":"hi"}],"api_key":"***"}"#
    );
    assert!(upstream.seen().is_empty());
}
