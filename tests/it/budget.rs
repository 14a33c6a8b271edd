//! Daily budgets: spend from usage × pricing, one alert per threshold
//! (log, metric, webhook), and enforcement on pool routes.

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::json;

use crate::support::{Client, ClientReply, MockUpstream, TestGateway, UpstreamReply, eventually};

/// Every answer reports 600,000 input tokens: $0.60 at $1 per million.
async fn llm() -> MockUpstream {
    MockUpstream::always(UpstreamReply::json(&json!({
        "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 600_000, "completion_tokens": 0},
    })))
    .await
}

fn config(llm: &str, budget: &str) -> String {
    format!(
        r#"
upstreams:
  app: {{ url: "{llm}" }}
pools:
  llm: {{ members: [app] }}
auth:
  api_keys:
    - {{ id: alice, key: key-alice, tier: free }}
    - {{ id: bob, key: key-bob, tier: free }}
tiers:
  free: {{ daily_budget_usd: 0.5, requests_per_minute: 100 }}
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
    upstream: llm
pricing:
  default: {{ input: 1.0, output: 0.0 }}
budget:
{budget}
"#
    )
}

async fn call(gw: &TestGateway, key: &str) -> ClientReply {
    Client::new()
        .send(
            Method::POST,
            &gw.url("/v1/chat/completions"),
            &[("x-api-key", key)],
            Bytes::from_static(b"{}"),
        )
        .await
}

#[tokio::test]
async fn global_budget_alerts_once_per_threshold_and_is_enforced() {
    let up = llm().await;
    let hook = MockUpstream::always(UpstreamReply::text("thanks")).await;
    let gw = TestGateway::start(&config(
        &up.url(),
        &format!("  daily_usd: 1.0\n  alert_at: [0.5, 1.0]\n  enforce: true\n  webhook_url: {}/hooks/budget", hook.url()),
    ))
    .await;
    // Tier budgets are per identity: alternate so only the global one binds.
    assert_eq!(call(&gw, "key-alice").await.status, 200); // $0.60: crosses 0.5
    assert_eq!(call(&gw, "key-bob").await.status, 200); // $1.20: crosses 1.0
    let refused = call(&gw, "key-bob").await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["error"]["code"], "budget_exceeded");
    assert_eq!(refused.header("x-should-retry"), Some("false"));
    // The refused request's unit went back: bob's bucket shows his one call.
    assert_eq!(refused.header("x-ratelimit-remaining-requests"), Some("99"));
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(
        (1..=86_400).contains(&retry),
        "retry-after {retry} is not until midnight"
    );
    assert_eq!(up.seen().len(), 2);

    let alerts: Vec<_> = gw
        .log_lines()
        .into_iter()
        .filter(|l| l["event"] == "budget_alert" && l["scope"] == "global")
        .collect();
    assert_eq!(alerts.len(), 2, "{alerts:?}");
    assert_eq!(alerts[0]["level"], "WARN");
    assert_eq!(alerts[0]["message"], "budget_alert");
    assert_eq!(alerts[0]["threshold"], 0.5);
    assert_eq!(alerts[1]["threshold"], 1.0);
    assert!((alerts[1]["spent_usd"].as_f64().unwrap() - 1.2).abs() < 1e-9);
    assert_eq!(alerts[1]["budget_usd"], 1.0);
    for threshold in ["0.5", "1.0"] {
        assert_eq!(
            gw.metric(
                "sluice_budget_alerts_total",
                &[("scope", "global"), ("threshold", threshold)]
            )
            .await,
            Some(1.0)
        );
    }
    let spent = gw
        .metric("sluice_budget_spent_usd", &[("scope", "global")])
        .await
        .unwrap();
    assert!((spent - 1.2).abs() < 1e-9);
    assert_eq!(
        gw.metric("sluice_budget_limit_usd", &[("scope", "global")])
            .await,
        Some(1.0)
    );
    assert_eq!(
        gw.metric(
            "sluice_rate_limited_total",
            &[("route", "chat"), ("limit", "budget")]
        )
        .await,
        Some(1.0)
    );
    // The webhook got both (and the tier alerts), off the request path.
    let global_posts = || -> Vec<serde_json::Value> {
        hook.seen()
            .iter()
            .map(|s| serde_json::from_slice::<serde_json::Value>(&s.body).unwrap())
            .filter(|p| p["scope"] == "global")
            .collect()
    };
    assert!(eventually(Duration::from_secs(5), || global_posts().len() == 2).await);
    let posted = &global_posts()[1];
    assert_eq!(posted["event"], "budget_alert");
    assert_eq!(posted["threshold"], 1.0);
    assert!((posted["spent_usd"].as_f64().unwrap() - 1.2).abs() < 1e-9);
    assert_eq!(hook.seen()[0].uri.path(), "/hooks/budget");
}

#[tokio::test]
async fn tier_budget_is_per_identity() {
    let up = llm().await;
    let gw = TestGateway::start(&config(
        &up.url(),
        "  daily_usd: 100.0\n  alert_at: [1.0]\n  enforce: true",
    ))
    .await;
    assert_eq!(call(&gw, "key-alice").await.status, 200); // alice: $0.60 of her $0.50
    assert_eq!(call(&gw, "key-alice").await.status, 429);
    assert_eq!(
        call(&gw, "key-bob").await.status,
        200,
        "bob has his own budget"
    );
    assert_eq!(
        gw.metric(
            "sluice_budget_alerts_total",
            &[("scope", "tier:free"), ("threshold", "1.0")]
        )
        .await,
        Some(2.0),
        "one alert for alice and one for bob"
    );
    // Each event says whose budget it is; the global one says no one's.
    let logs = gw.log_lines();
    let mut whose: Vec<&str> = logs
        .iter()
        .filter(|l| l["event"] == "budget_alert" && l["scope"] == "tier:free")
        .filter_map(|l| l["identity"].as_str())
        .collect();
    whose.sort_unstable();
    assert_eq!(whose, ["alice", "bob"]);
}

#[tokio::test]
async fn budgets_are_not_enforced_unless_asked() {
    let up = llm().await;
    let gw = TestGateway::start(&config(&up.url(), "  daily_usd: 0.1")).await;
    for _ in 0..3 {
        assert_eq!(call(&gw, "key-alice").await.status, 200);
    }
}

/// A stream of `events` content chunks `gap` apart (then its usage and
/// `[DONE]`), asked for with `body` by a client that leaves after
/// `leave_after`, on a budgeted pool route at $1 a token: the upstream
/// and the gateway, once the request is logged.
async fn left_mid_stream(
    body: &'static str,
    events: usize,
    gap: Duration,
    leave_after: Duration,
) -> (MockUpstream, TestGateway) {
    let chunk = r#"{"object":"chat.completion.chunk","model":"m","choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#;
    let usage = format!(
        r#"{{"object":"chat.completion.chunk","model":"m","choices":[],"usage":{{"prompt_tokens":5,"completion_tokens":{events}}}}}"#
    );
    let mut stream = vec![chunk; events];
    stream.push(&usage);
    stream.push("[DONE]");
    let up = MockUpstream::always(UpstreamReply::sse(&stream, gap)).await;
    let gw = TestGateway::start(&format!(
        r#"
upstreams:
  app: {{ url: "{}" }}
pools:
  llm: {{ members: [app] }}
auth:
  api_keys:
    - {{ id: alice, key: key-alice }}
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
    upstream: llm
pricing:
  default: {{ input: 1000000, output: 1000000 }}
budget:
  daily_usd: 100000
"#,
        up.url()
    ))
    .await;
    let (client, url) = (Client::new(), gw.url("/v1/chat/completions"));
    let leaving = client.send(
        Method::POST,
        &url,
        &[("x-api-key", "key-alice")],
        Bytes::from_static(body.as_bytes()),
    );
    assert!(
        tokio::time::timeout(leave_after, leaving).await.is_err(),
        "the stream ended before the client left"
    );
    let logs = gw.wait_access_logs(1).await;
    assert_eq!(logs[0]["error"], "client_closed", "{logs:?}");
    (up, gw)
}

/// A client that leaves mid-stream, before the usage chunk, is charged
/// the request's estimate (its prompt, plus its `max_tokens`): hanging
/// up early is no way around a budget.
#[tokio::test]
async fn a_client_that_leaves_mid_stream_is_charged_its_estimate() {
    const BODY: &str = r#"{"model":"m","stream":true,"max_tokens":100,"messages":[]}"#;
    let (_up, gw) = left_mid_stream(
        BODY,
        10,
        Duration::from_millis(150),
        Duration::from_millis(800),
    )
    .await;
    let logs = gw.wait_access_logs(1).await;
    let log = &logs[0];
    // $1 a token: the body's quarter (the upstream got it with
    // `stream_options` added), plus max_tokens.
    let cost = log["cost_usd"].as_f64().expect("a cost was charged");
    assert!((110.0..=140.0).contains(&cost), "{cost}");
    assert_eq!(log["input_tokens"], serde_json::Value::Null);
    let spent = gw
        .metric("sluice_budget_spent_usd", &[("scope", "global")])
        .await;
    assert_eq!(spent, Some(cost));
}

/// One with no `max_tokens` is charged the output it was sent, a token
/// an event at least, not its prompt alone: reading the content and
/// hanging up before the usage chunk is no way to get it for free.
#[tokio::test]
async fn a_client_that_leaves_mid_stream_pays_for_what_it_was_sent() {
    const BODY: &str = r#"{"model":"m","stream":true,"messages":[]}"#;
    let (up, gw) = left_mid_stream(
        BODY,
        40,
        Duration::from_millis(30),
        Duration::from_millis(750),
    )
    .await;
    let logs = gw.wait_access_logs(1).await;
    // $1 a token: the prompt (a quarter of the body the upstream got,
    // `stream_options` added) and some 25 events of the 40.
    let prompt = (up.seen()[0].body.len() as f64 / 4.0).ceil();
    let cost = logs[0]["cost_usd"].as_f64().expect("a cost was charged");
    assert!(
        (prompt + 10.0..=prompt + 41.0).contains(&cost),
        "{cost}, prompt {prompt}"
    );
}

/// A whole answer sluice cannot read (a byte order mark before its
/// JSON, a member written twice) is charged its estimate, as one that
/// reports no usage is: a misbehaving upstream is no free ride.
#[tokio::test]
async fn an_answer_that_cannot_be_read_is_charged_its_estimate() {
    for answer in [
        "\u{feff}{\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":600000,\"completion_tokens\":0}}",
        "{\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"prompt_tokens\":600000}}",
    ] {
        let up = MockUpstream::always(
            UpstreamReply::text(answer).header("content-type", "application/json"),
        )
        .await;
        let gw = TestGateway::start(&config(&up.url(), "  daily_usd: 100.0")).await;
        let reply = Client::new()
            .send(
                Method::POST,
                &gw.url("/v1/chat/completions"),
                &[("x-api-key", "key-alice")],
                Bytes::from(format!(
                    r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
                    "x".repeat(4000)
                )),
            )
            .await;
        assert_eq!(reply.status, 200);
        let logs = gw.wait_access_logs(1).await;
        // $1 a million input tokens: some thousand estimated.
        let cost = logs[0]["cost_usd"]
            .as_f64()
            .unwrap_or_else(|| panic!("{}", logs[0]));
        assert!((0.0005..0.01).contains(&cost), "{cost}");
        assert_eq!(logs[0]["input_tokens"], serde_json::Value::Null);
    }
}
