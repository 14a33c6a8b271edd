//! `state.backend: redis`: two sluice instances sharing one real Redis
//! share their request and token buckets, budget alerts, cache entries
//! (JSON and SSE) and concurrency leases; with Redis killed, `allow`
//! serves from memory and `deny` answers 503, and both recover when Redis
//! is back.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::support::{
    Client, MockUpstream, RedisServer, Relay, TestGateway, UpstreamReply, eventually,
};

const ALICE: (&str, &str) = ("authorization", "Bearer sk-alice-0001");

fn config(upstream: &str, redis: &str, tier: &str, extra: &str) -> String {
    format!(
        r#"
upstreams:
  llm: {{ url: "{upstream}" }}
auth:
  api_keys:
    - {{ id: alice, key: sk-alice-0001, tier: free }}
tiers:
  free: {tier}
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
    cache: {{ ttl: 10m, scope: shared }}
    upstream: llm
pricing:
  gpt-4o-mini: {{ input: 0.15, output: 0.60 }}
state: {{ backend: redis, redis_url: "{redis}", on_error: allow }}
{extra}"#
    )
}

/// [`config`] with a request limit too high to refuse anything, so that
/// every request asks Redis, and `on_error` as given.
fn limited(upstream: &str, redis: &str, on_error: &str) -> String {
    config(upstream, redis, "{ requests_per_minute: 1000 }", "")
        .replace("on_error: allow", &format!("on_error: {on_error}"))
}

fn answer(prompt: u64, completion: u64) -> serde_json::Value {
    json!({
        "id": "c", "object": "chat.completion", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion}
    })
}

/// Two replicas of the same config on one Redis.
async fn pair(yaml: &str) -> (TestGateway, TestGateway) {
    (
        TestGateway::start(yaml).await,
        TestGateway::start(yaml).await,
    )
}

fn no_store() -> (&'static str, &'static str) {
    ("cache-control", "no-store")
}

#[tokio::test]
async fn the_request_limit_is_one_across_replicas() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::always(UpstreamReply::json(&answer(1, 1))).await;
    let (a, b) = pair(&config(
        &upstream.url(),
        &redis.url(),
        "{ requests_per_minute: 5 }",
        "",
    ))
    .await;
    let client = Client::new();
    let mut remaining = Vec::new();
    for i in 0..5 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let reply = client
            .post_json(&gw.url("/v1/x"), &[ALICE, no_store()], "{}")
            .await;
        assert_eq!(reply.status, 200, "request {i}");
        remaining.push(
            reply
                .header("x-ratelimit-remaining-requests")
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(remaining, ["4", "3", "2", "1", "0"]);
    for gw in [&a, &b] {
        let refused = client
            .post_json(&gw.url("/v1/x"), &[ALICE, no_store()], "{}")
            .await;
        assert_eq!(refused.status, 429);
        assert!(refused.header("retry-after").is_some());
    }
    assert_eq!(upstream.seen().len(), 5);
    let calls = a
        .metric(
            "sluice_state_duration_seconds_count",
            &[("operation", "take")],
        )
        .await
        .unwrap();
    assert!(calls >= 3.0, "{calls} timed take calls");
}

#[tokio::test]
async fn the_token_bucket_is_shared() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::always(UpstreamReply::json(&answer(10, 150))).await;
    let (a, b) = pair(&config(
        &upstream.url(),
        &redis.url(),
        "{ tokens_per_minute: 200 }",
        "",
    ))
    .await;
    let client = Client::new();
    let body = r#"{"model":"gpt-4o-mini","max_tokens":150,"messages":[]}"#;
    let first = client
        .post_json(&a.url("/v1/chat/completions"), &[ALICE, no_store()], body)
        .await;
    assert_eq!(first.status, 200);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let second = client
        .post_json(&b.url("/v1/chat/completions"), &[ALICE, no_store()], body)
        .await;
    assert_eq!(second.status, 429, "{}", second.text());
    assert_eq!(second.header("x-ratelimit-limit-tokens"), Some("200"));
    assert_eq!(
        b.metric(
            "sluice_rate_limited_total",
            &[("route", "chat"), ("limit", "tokens")]
        )
        .await,
        Some(1.0)
    );
}

/// 0.9 × $0.001 is 0.0009000000000000001 in binary: two answers at
/// $0.00045 reach it all the same, in Redis's script too.
#[tokio::test]
async fn a_shared_budget_fraction_is_reached_to_the_nano_dollar() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::always(UpstreamReply::json(&answer(1000, 500))).await;
    let (a, b) = pair(&config(
        &upstream.url(),
        &redis.url(),
        "{}",
        "budget: { daily_usd: 0.001, alert_at: [0.9] }\n",
    ))
    .await;
    let client = Client::new();
    for gw in [&a, &b] {
        let reply = client
            .post_json(&gw.url("/v1/x"), &[ALICE, no_store()], "{}")
            .await;
        assert_eq!(reply.status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let alerts = |gw: &TestGateway| {
        gw.log_lines()
            .into_iter()
            .filter(|l| l["message"] == "budget_alert")
            .count()
    };
    assert!(
        eventually(Duration::from_secs(3), || alerts(&a) + alerts(&b) == 1).await,
        "{}\n{}",
        a.log_text(),
        b.log_text()
    );
}

/// Charges answered out of order (many requests at once, each charged
/// in a task of its own after its response) still raise every threshold
/// the shared spend crosses, once: a later charge seen first must not
/// hide the claim of the one that crossed it. (Several worker threads,
/// as `run` has: the charges' tasks then run in any order.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_charges_raise_each_threshold_once() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::always(UpstreamReply::json(&answer(1000, 500))).await;
    // Each answer costs 0.00045 USD: 20 of them cross 10% to 80% of 0.01.
    let yaml = config(
        &upstream.url(),
        &redis.url(),
        "{}",
        "budget: { daily_usd: 0.01, alert_at: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8] }\n",
    );
    let gw = Arc::new(TestGateway::start(&yaml).await);
    let calls = (0..20).map(|_| {
        let gw = gw.clone();
        tokio::spawn(async move {
            Client::new()
                .post_json(&gw.url("/v1/x"), &[ALICE, no_store()], "{}")
                .await
                .status
        })
    });
    for status in futures_util::future::join_all(calls).await {
        assert_eq!(status.unwrap(), 200);
    }
    let thresholds = || {
        let mut seen: Vec<String> = gw
            .log_lines()
            .into_iter()
            .filter(|l| l["message"] == "budget_alert")
            .map(|l| l["threshold"].to_string())
            .collect();
        seen.sort();
        seen
    };
    let all: Vec<String> = ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8"]
        .map(String::from)
        .to_vec();
    assert!(
        eventually(Duration::from_secs(3), || thresholds() == all).await,
        "{:?}\n{}",
        thresholds(),
        gw.log_text()
    );
}

#[tokio::test]
async fn a_shared_budget_alert_fires_once() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::always(UpstreamReply::json(&answer(1000, 500))).await;
    // Each answer costs 0.00045 USD; the alert is at 0.0005.
    let (a, b) = pair(&config(
        &upstream.url(),
        &redis.url(),
        "{}",
        "budget: { daily_usd: 0.001, alert_at: [0.5] }\n",
    ))
    .await;
    let client = Client::new();
    for gw in [&a, &b, &a, &b] {
        let reply = client
            .post_json(&gw.url("/v1/x"), &[ALICE, no_store()], "{}")
            .await;
        assert_eq!(reply.status, 200);
        // Spend is charged after the response: let it land in order.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let alerts = |gw: &TestGateway| {
        gw.log_lines()
            .into_iter()
            .filter(|l| l["message"] == "budget_alert")
            .count()
    };
    assert_eq!(
        alerts(&a) + alerts(&b),
        1,
        "{}\n{}",
        a.log_text(),
        b.log_text()
    );
    // Each replica reports the spend both share, the last one to charge
    // or not.
    for gw in [&a, &b] {
        let spent = gw
            .metric("sluice_budget_spent_usd", &[("scope", "global")])
            .await
            .unwrap();
        assert!((spent - 0.0018).abs() < 1e-9, "spent {spent}");
    }
    // A replica that has served nothing reports it too, with the limit.
    let c = TestGateway::start(&config(
        &upstream.url(),
        &redis.url(),
        "{}",
        "budget: { daily_usd: 0.001, alert_at: [0.5] }\n",
    ))
    .await;
    let spent = c
        .metric("sluice_budget_spent_usd", &[("scope", "global")])
        .await
        .unwrap();
    assert!((spent - 0.0018).abs() < 1e-9, "spent {spent}");
    assert_eq!(
        c.metric("sluice_budget_limit_usd", &[("scope", "global")])
            .await,
        Some(0.001)
    );
}

#[tokio::test]
async fn a_cached_answer_is_a_hit_on_the_other_replica() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::start(|seen| {
        if seen.body.windows(6).any(|w| w == b"stream") {
            UpstreamReply::sse(
                &[
                    r#"{"choices":[{"index":0,"delta":{"content":"Hel"}}]}"#,
                    r#"{"choices":[{"index":0,"delta":{"content":"lo"}}]}"#,
                    "[DONE]",
                ],
                Duration::from_millis(20),
            )
        } else {
            UpstreamReply::json(&answer(3, 4))
        }
    })
    .await;
    let (a, b) = pair(&config(&upstream.url(), &redis.url(), "{}", "")).await;
    let client = Client::new();
    for body in [
        r#"{"model":"gpt-4o-mini","messages":[]}"#,
        r#"{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#,
    ] {
        let first = client
            .post_json(&a.url("/v1/chat/completions"), &[ALICE], body)
            .await;
        assert_eq!(first.header("x-sluice-cache"), Some("MISS"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        let other = client
            .post_json(&b.url("/v1/chat/completions"), &[ALICE], body)
            .await;
        assert_eq!(other.header("x-sluice-cache"), Some("HIT"), "{body}");
        assert_eq!(other.body, first.body, "byte-identical: {body}");
        assert_eq!(other.header("content-type"), first.header("content-type"));
        assert!(other.header("age").is_some());
    }
    assert_eq!(upstream.seen().len(), 2);
}

#[tokio::test]
async fn a_concurrency_lease_is_released_after_a_stream() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::always(UpstreamReply::sse(
        &["{\"a\":1}", "{\"a\":2}", "[DONE]"],
        Duration::from_millis(250),
    ))
    .await;
    let (a, b) = pair(&config(
        &upstream.url(),
        &redis.url(),
        "{ concurrent_requests: 1 }",
        "",
    ))
    .await;
    let a = Arc::new(a);
    let stream = {
        let a = a.clone();
        tokio::spawn(async move {
            Client::new()
                .post_json(&a.url("/v1/s"), &[ALICE, no_store()], "{}")
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let client = Client::new();
    let busy = client
        .post_json(&b.url("/v1/s"), &[ALICE, no_store()], "{}")
        .await;
    assert_eq!(busy.status, 429, "the other replica's slot is held");
    assert_eq!(stream.await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let free = client
        .post_json(&b.url("/v1/s"), &[ALICE, no_store()], "{}")
        .await;
    assert_eq!(free.status, 200, "the lease was released");
}

/// A gateway on its own Redis whose tier `free` (alice's) is `tier`, in
/// front of an upstream answering 1 token in and 1 out.
async fn on_redis(tier: &str) -> Option<(RedisServer, MockUpstream, TestGateway)> {
    let redis = RedisServer::start()?;
    let upstream = MockUpstream::always(UpstreamReply::json(&answer(1, 1))).await;
    let gw = TestGateway::start(&config(&upstream.url(), &redis.url(), tier, "")).await;
    Some((redis, upstream, gw))
}

/// A gateway on Redis with `tier`, where alice sends `body` to `/v1/x`
/// and hangs up 5 ms later, while Redis, paused for 40 ms, still holds
/// sluice's call: the call then ends well within its 100 ms timeout, for
/// a request that is gone. Then alice's `next` request's status. A first
/// request, answered, has Redis load sluice's scripts (a first call that
/// found none would not run, whoever waited for it).
async fn after_a_hang_up_during_a_paused_redis(
    tier: &str,
    body: &str,
    next: &str,
) -> Option<http::StatusCode> {
    use tokio::io::AsyncWriteExt;
    let (redis, _upstream, gw) = on_redis(tier).await?;
    let url = gw.url("/v1/x");
    let small = r#"{"model":"m","max_tokens":10,"messages":[]}"#;
    let first = Client::new()
        .post_json(&url, &[ALICE, no_store()], small)
        .await;
    assert_eq!(first.status, 200, "{}", first.text());
    // Its settlement reaches Redis before the pause.
    tokio::time::sleep(Duration::from_millis(100)).await;
    redis.cli(None, &["CLIENT", "PAUSE", "40", "ALL"]);
    let mut conn = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let request = format!(
        "POST /v1/x HTTP/1.1\r\nhost: a\r\nauthorization: Bearer sk-alice-0001\r\n\
         cache-control: no-store\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(5)).await;
    drop(conn);
    // Past the pause: Redis has run what was sent, and what followed.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = gw.log_text();
    assert!(
        !log.contains("state_error"),
        "no call may time out here: {log}"
    );
    let next = Client::new()
        .post_json(&url, &[ALICE, no_store()], next)
        .await;
    Some(next.status)
}

/// A client that hangs up while Redis is taking its concurrency slot
/// does not leave the lease behind to lock the identity out until it
/// expires (`request_timeout` + 10 s).
#[tokio::test]
async fn a_client_gone_while_redis_takes_its_slot_leaves_no_lease() {
    let next = after_a_hang_up_during_a_paused_redis("{ concurrent_requests: 1 }", "{}", "{}");
    if let Some(status) = next.await {
        assert_eq!(status, 200, "a lease held for no one");
    }
}

/// The same for a token reservation: what a request that is gone took
/// from the bucket is given back.
#[tokio::test]
async fn a_client_gone_while_redis_reserves_its_tokens_gets_them_back() {
    let next = after_a_hang_up_during_a_paused_redis(
        "{ tokens_per_minute: 1000 }",
        r#"{"model":"m","max_tokens":900,"messages":[]}"#,
        r#"{"model":"m","max_tokens":300,"messages":[]}"#,
    );
    if let Some(status) = next.await {
        assert_eq!(status, 200, "tokens held for no one");
    }
}

/// A token take that Redis makes only after sluice stopped waiting (its
/// 100 ms) is given back: the request went on without it, and the tokens
/// would otherwise be held for no one for a minute.
#[tokio::test]
async fn tokens_a_late_take_held_are_given_back() {
    let Some((redis, _upstream, gw)) = on_redis("{ tokens_per_minute: 1000 }").await else {
        return;
    };
    let url = gw.url("/v1/x");
    let ask = |max_tokens: u32| {
        let (url, body) = (
            url.clone(),
            format!(r#"{{"model":"m","max_tokens":{max_tokens},"messages":[]}}"#),
        );
        async move {
            Client::new()
                .post_json(&url, &[ALICE, no_store()], &body)
                .await
                .status
        }
    };
    assert_eq!(ask(10).await, 200, "loads the scripts");
    tokio::time::sleep(Duration::from_millis(100)).await;
    redis.cli(None, &["CLIENT", "PAUSE", "300", "ALL"]);
    assert_eq!(ask(900).await, 200, "decided from memory (on_error: allow)");
    // Past the pause, and the second after a timeout when calls skip Redis.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(ask(300).await, 200, "the late take's 900 tokens still held");
}

/// A lease whose release failed because Redis was down, and that a Redis
/// restarted from its append-only file has back, is released once Redis
/// answers again, not left to hold the slot until it expires.
#[tokio::test]
async fn a_lease_released_during_an_outage_is_released_when_redis_is_back() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let upstream =
        MockUpstream::always(UpstreamReply::json(&answer(1, 1)).delay(Duration::from_millis(400)))
            .await;
    let gw = Arc::new(
        TestGateway::start(&config(
            &upstream.url(),
            &redis.url(),
            "{ concurrent_requests: 1 }",
            "",
        ))
        .await,
    );
    let held = {
        let gw = gw.clone();
        tokio::spawn(async move {
            Client::new()
                .post_json(&gw.url("/v1/x"), &[ALICE, no_store()], "{}")
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(150)).await;
    let key = redis.cli(None, &["KEYS", "*slots*"]);
    let lease = redis.cli(None, &["ZRANGE", &key, "0", "-1", "WITHSCORES"]);
    let (holder, ends) = lease
        .split_once('\n')
        .expect("one lease, its holder and score");
    // Redis goes down while the request holds the slot, so its release
    // fails; it comes back with the lease, as from its append-only file.
    redis.kill();
    assert_eq!(held.await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    redis.restart();
    redis.cli(None, &["ZADD", &key, ends, holder]);
    redis.cli(None, &["PEXPIRE", &key, "300000"]);
    let released = eventually(Duration::from_secs(6), || {
        redis.cli(None, &["ZCARD", &key]) == "0"
    })
    .await;
    assert!(released, "the lease is still held: {}", gw.log_text());
    let next = Client::new()
        .post_json(&gw.url("/v1/x"), &[ALICE, no_store()], "{}")
        .await;
    assert_eq!(next.status, 200, "{}", next.text());
}

/// A bucket in Redis holds what its limit says also where one unit
/// refills in less than a µs or in a fraction of µs: 40 million tokens a
/// minute is 1.5 µs a token, not the 1 µs (60 million) of whole µs.
#[tokio::test]
async fn a_limit_of_tens_of_millions_a_minute_is_kept_exactly_in_redis() {
    let Some((_redis, _upstream, gw)) = on_redis("{ tokens_per_minute: 40000000 }").await else {
        return;
    };
    let reply = Client::new()
        .post_json(
            &gw.url("/v1/x"),
            &[ALICE, no_store()],
            r#"{"model":"m","max_tokens":1000000,"messages":[]}"#,
        )
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(reply.header("x-ratelimit-limit-tokens"), Some("40000000"));
    let remaining: u64 = reply
        .header("x-ratelimit-remaining-tokens")
        .and_then(|r| r.parse().ok())
        .unwrap_or(0);
    assert!(
        (38_990_000..=39_000_000).contains(&remaining),
        "40M less the 1M reserved: {remaining}"
    );
}

#[tokio::test]
async fn a_killed_redis_is_survived_by_allow_and_refused_by_deny() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::always(UpstreamReply::json(&answer(1, 1))).await;
    let allow = TestGateway::start(&limited(&upstream.url(), &redis.url(), "allow")).await;
    let deny = TestGateway::start(&limited(&upstream.url(), &redis.url(), "deny")).await;
    assert_eq!(
        allow
            .metric("sluice_state_errors_total", &[("operation", "take")])
            .await,
        Some(0.0),
        "the series exists before the first error"
    );
    let client = Client::new();
    let call = |gw: &TestGateway| {
        let url = gw.url("/v1/x");
        let client = client.clone();
        async move { client.post_json(&url, &[ALICE, no_store()], "{}").await }
    };
    assert_eq!(call(&allow).await.status, 200);
    assert_eq!(call(&deny).await.status, 200);

    redis.kill();
    for _ in 0..3 {
        assert_eq!(call(&allow).await.status, 200, "allow serves from memory");
        let refused = call(&deny).await;
        assert_eq!(refused.status, 503);
        assert_eq!(refused.json()["error"]["code"], "state_unavailable");
    }
    for gw in [&allow, &deny] {
        let errors = gw
            .metric("sluice_state_errors_total", &[("operation", "take")])
            .await
            .unwrap();
        assert!(errors >= 3.0, "{errors} errors counted");
        let warnings = state_warnings(gw, "take").len();
        assert_eq!(warnings, 1, "warned once, not per request");
        assert!(
            eventually(Duration::from_secs(5), || connect_warnings(gw)
                .iter()
                .any(|reason| reason.contains("refused the connection")))
            .await,
            "and why: {}",
            gw.log_text()
        );
        assert!(
            !gw.log_text().contains(&redis.url()),
            "the URL is not logged"
        );
    }

    redis.restart();
    let mut recovered = false;
    for _ in 0..50 {
        if call(&deny).await.status == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "deny serves again once Redis is back, no restart"
    );
    assert_eq!(call(&allow).await.status, 200);
    for gw in [&allow, &deny] {
        let recoveries = gw
            .log_lines()
            .into_iter()
            .filter(|l| l["event"] == "state_recovered")
            .count();
        assert_eq!(recoveries, 1, "the outage's end is logged once");
    }
}

#[tokio::test]
async fn spend_during_an_outage_reaches_redis_once_it_is_back() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    // $0.00045 a request at gpt-4o-mini's prices.
    let upstream = MockUpstream::always(UpstreamReply::json(&answer(1000, 500))).await;
    let gw = TestGateway::start(&config(
        &upstream.url(),
        &redis.url(),
        "{}",
        "budget: { daily_usd: 100.0 }\n",
    ))
    .await;
    let client = Client::new();
    let url = gw.url("/v1/x");
    let headers = [ALICE, no_store()];
    let call = || client.post_json(&url, &headers, "{}");
    redis.kill();
    for _ in 0..2 {
        assert_eq!(call().await.status, 200, "allow serves from memory");
    }
    // The outage's spend was recorded (in memory) before Redis returns.
    let local_spend = || {
        gw.log_lines()
            .into_iter()
            .filter(|l| l["message"] == "request" && l["cost_usd"].is_number())
            .count()
            == 2
    };
    assert!(eventually(Duration::from_secs(3), local_spend).await);
    redis.restart();
    let key = format!(
        "sluice:budget:{{{}:global}}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            / 86_400
    );
    let in_redis = || {
        redis
            .cli(None, &["GET", &key])
            .parse::<f64>()
            .unwrap_or(0.0)
    };
    let mut sent = 2;
    for _ in 0..50 {
        assert_eq!(call().await.status, 200);
        sent += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if in_redis() > 0.0 {
            break;
        }
    }
    let expected = f64::from(sent) * 0.00045;
    assert!(
        eventually(Duration::from_secs(3), || (in_redis() - expected).abs()
            < 1e-9)
        .await,
        "Redis holds {} after {sent} requests, {expected} spent",
        in_redis()
    );
}

#[tokio::test]
async fn an_outage_s_spend_reaches_redis_also_for_an_identity_gone_quiet() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::always(UpstreamReply::json(&answer(1000, 500))).await;
    let gw = TestGateway::start(&format!(
        r#"
upstreams:
  llm: {{ url: "{}" }}
auth:
  api_keys:
    - {{ id: alice, key: sk-alice-0001, tier: free }}
tiers:
  free: {{ daily_budget_usd: 100.0 }}
routes:
  - {{ name: open, match: {{ path_prefix: /open/ }}, auth: none, upstream: llm }}
  - {{ name: chat, match: {{ path_prefix: /v1/ }}, upstream: llm }}
pricing:
  gpt-4o-mini: {{ input: 0.15, output: 0.60 }}
state: {{ backend: redis, redis_url: "{}", on_error: allow }}
budget: {{ daily_usd: 100.0 }}
"#,
        upstream.url(),
        redis.url()
    ))
    .await;
    let client = Client::new();
    redis.kill();
    // Alice spends $0.0009 while Redis is down, then calls no more.
    for _ in 0..2 {
        let reply = client.post_json(&gw.url("/v1/x"), &[ALICE], "{}").await;
        assert_eq!(reply.status, 200, "allow serves from memory");
    }
    let charged = || {
        gw.log_lines()
            .into_iter()
            .filter(|l| l["message"] == "request" && l["cost_usd"].is_number())
            .count()
            == 2
    };
    assert!(eventually(Duration::from_secs(3), charged).await);
    redis.restart();
    let day = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 86_400;
    let in_redis = |who: &str| {
        redis
            .cli(None, &["GET", &format!("sluice:budget:{{{day}:{who}}}")])
            .parse::<f64>()
            .unwrap_or(0.0)
    };
    // Someone else's request reaches Redis once it is back.
    for _ in 0..50 {
        let reply = client.post_json(&gw.url("/open/x"), &[], "{}").await;
        assert_eq!(reply.status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
        if in_redis("global") > 0.0 {
            break;
        }
    }
    assert!(
        eventually(Duration::from_secs(3), || (in_redis("key:alice") - 0.0009)
            .abs()
            < 1e-9)
        .await,
        "Redis holds {} of alice's $0.0009",
        in_redis("key:alice")
    );
}

#[tokio::test]
async fn identical_requests_on_one_replica_make_one_upstream_call() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream =
        MockUpstream::always(UpstreamReply::json(&answer(3, 4)).delay(Duration::from_millis(200)))
            .await;
    let gw = Arc::new(TestGateway::start(&config(&upstream.url(), &redis.url(), "{}", "")).await);
    let calls = (0..10).map(|_| {
        let gw = gw.clone();
        tokio::spawn(async move {
            Client::new()
                .post_json(&gw.url("/v1/chat/completions"), &[ALICE], "{\"q\":1}")
                .await
        })
    });
    for reply in futures_util::future::join_all(calls).await {
        assert_eq!(reply.unwrap().status, 200);
    }
    // The waiters were released only once the entry was in Redis.
    assert_eq!(upstream.seen().len(), 1);
}

/// With Redis gone, the answer of a fetch that identical requests waited
/// on cannot be stored, but it was final: the waiters call the upstream
/// at once, together, not one after another as after a failure (which
/// made the last of them wait out every call before it).
#[tokio::test]
async fn waiters_on_an_answer_redis_could_not_store_call_at_once() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    const DELAY: Duration = Duration::from_millis(400);
    let arrivals = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = arrivals.clone();
    let upstream = MockUpstream::start(move |_| {
        seen.lock().unwrap().push(std::time::Instant::now());
        UpstreamReply::json(&answer(3, 4)).delay(DELAY)
    })
    .await;
    let gw = Arc::new(TestGateway::start(&config(&upstream.url(), &redis.url(), "{}", "")).await);
    redis.kill();
    const CALLS: usize = 5;
    let calls = (0..CALLS).map(|_| {
        let gw = gw.clone();
        tokio::spawn(async move {
            Client::new()
                .post_json(&gw.url("/v1/chat/completions"), &[ALICE], "{\"q\":2}")
                .await
        })
    });
    for reply in futures_util::future::join_all(calls).await {
        assert_eq!(reply.unwrap().status, 200, "the cache only ever saves work");
    }
    let arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), CALLS, "nothing could be stored to share");
    let followers = &arrivals[1..];
    let spread = followers[followers.len() - 1] - followers[0];
    assert!(
        spread < DELAY,
        "the waiters called one after another: {spread:?} from the first to the last"
    );
}

#[tokio::test]
async fn usage_beyond_the_estimate_is_charged_after_a_long_stream() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    // 6000 tokens a minute: a 10-token estimate keeps the bucket key alive
    // for about 1.1 s; the stream lasts longer and reports 7000 tokens.
    let upstream = MockUpstream::always(UpstreamReply::sse(
        &[
            r#"{"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"a"}}]}"#,
            r#"{"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"b"},"finish_reason":"stop"}]}"#,
            r#"{"model":"gpt-4o-mini","choices":[],"usage":{"prompt_tokens":10,"completion_tokens":6990}}"#,
        ],
        Duration::from_millis(700),
    ))
    .await;
    let gw = TestGateway::start(&config(
        &upstream.url(),
        &redis.url(),
        "{ tokens_per_minute: 6000 }",
        "",
    ))
    .await;
    let client = Client::new();
    let body = r#"{"stream":true,"stream_options":{"include_usage":true}}"#;
    let url = gw.url("/v1/chat/completions");
    let first = client.post_json(&url, &[ALICE, no_store()], body).await;
    assert_eq!(first.status, 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = client.post_json(&url, &[ALICE, no_store()], body).await;
    assert_eq!(second.status, 429, "the 7000 tokens used were charged");
}

/// A connection Redis closed while it sat idle (its `timeout` setting, an
/// idle limit on the way, CLIENT KILL) costs no request a refusal: the
/// call goes out again on a new connection.
#[tokio::test]
async fn a_connection_closed_while_idle_fails_no_request() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::always(UpstreamReply::json(&answer(1, 1))).await;
    let gw = TestGateway::start(&limited(&upstream.url(), &redis.url(), "deny")).await;
    let client = Client::new();
    let url = gw.url("/v1/x");
    for round in 0..3 {
        let reply = client.post_json(&url, &[ALICE, no_store()], "{}").await;
        assert_eq!(reply.status, 200, "round {round}: {}", reply.text());
        let killed = redis.cli(None, &["CLIENT", "KILL", "TYPE", "normal"]);
        assert_ne!(killed, "0", "sluice's connection was open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        gw.metric("sluice_state_errors_total", &[("operation", "take")])
            .await,
        Some(0.0)
    );
}

/// A login Redis refused (a password rotated on the server before the
/// replica's) is tried again: once Redis takes the password again the
/// replica is back on the shared state, no restart.
#[tokio::test]
async fn a_refused_login_is_tried_again() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    redis.cli(None, &["CONFIG", "SET", "requirepass", "pw-one"]);
    let upstream = MockUpstream::always(UpstreamReply::json(&answer(1, 1))).await;
    let url_with_password = redis.url().replace("redis://", "redis://:pw-one@");
    let gw = TestGateway::start(&limited(&upstream.url(), &url_with_password, "deny")).await;
    let client = Client::new();
    let url = gw.url("/v1/x");
    let status = || async {
        client
            .post_json(&url, &[ALICE, no_store()], "{}")
            .await
            .status
    };
    assert_eq!(status().await, 200);

    redis.cli(Some("pw-one"), &["CONFIG", "SET", "requirepass", "pw-two"]);
    redis.cli(Some("pw-two"), &["CLIENT", "KILL", "TYPE", "normal"]);
    let mut refused = false;
    for _ in 0..50 {
        if status().await == 503 {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(refused, "deny refuses while the login is refused");
    // Past the client's own retries of that login.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(status().await, 503);

    redis.cli(Some("pw-two"), &["CONFIG", "SET", "requirepass", "pw-one"]);
    let mut recovered = false;
    for _ in 0..60 {
        if status().await == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the replica logs in again, no restart");
    assert!(
        !gw.log_text().contains("pw-one"),
        "the password is not logged"
    );
}

/// With Redis gone, a route whose only use of it is the cache does not
/// make each request wait out a cache call: as for limits, the calls are
/// skipped for a while after they fail, and the requests go straight to
/// the upstream.
#[tokio::test]
async fn a_cache_only_route_stops_waiting_on_a_redis_that_is_gone() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::always(UpstreamReply::json(&answer(1, 1))).await;
    let gw = TestGateway::start(&config(&upstream.url(), &redis.url(), "{}", "")).await;
    let client = Client::new();
    let url = gw.url("/v1/chat/completions");
    let body = r#"{"model":"gpt-4o-mini","messages":[]}"#;
    assert_eq!(client.post_json(&url, &[ALICE], body).await.status, 200);
    redis.kill();
    const REQUESTS: usize = 8;
    for _ in 0..REQUESTS {
        let reply = client.post_json(&url, &[ALICE], body).await;
        assert_eq!(reply.status, 200, "the cache only ever saves work");
    }
    let logs = gw.wait_access_logs(1 + REQUESTS).await;
    let waited = logs[1..]
        .iter()
        .filter(|l| l["latency_ms"].as_f64().unwrap_or(0.0) >= 100.0)
        .count();
    assert!(
        waited <= 2,
        "{waited} of {REQUESTS} requests waited out a cache call on a Redis that is gone"
    );
    assert_eq!(upstream.seen().len(), 1 + REQUESTS);
}

/// The `state_error` warnings of `operation` in the log, by their `error`.
fn state_warnings(gw: &TestGateway, operation: &str) -> Vec<String> {
    gw.log_lines()
        .into_iter()
        .filter(|l| l["event"] == "state_error" && l["operation"] == operation)
        .map(|l| l["error"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The `connect` warnings: why Redis could not be reached.
fn connect_warnings(gw: &TestGateway) -> Vec<String> {
    state_warnings(gw, "connect")
}

/// A wrong password in `redis_url` is named as such, at start and again
/// when calls fail, not only as calls timing out (redis-rs retries the
/// refused login behind the shared connection's calls), and neither
/// password is logged.
#[tokio::test]
async fn a_refused_login_is_named_at_start_and_when_calls_fail() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    redis.cli(None, &["CONFIG", "SET", "requirepass", "pw-right"]);
    let upstream = MockUpstream::always(UpstreamReply::json(&answer(1, 1))).await;
    let wrong = redis.url().replace("redis://", "redis://:pw-wrong@");
    let gw = TestGateway::start(&limited(&upstream.url(), &wrong, "deny")).await;
    assert!(
        eventually(Duration::from_secs(5), || connect_warnings(&gw).len() == 1).await,
        "named at start: {}",
        gw.log_text()
    );
    let reason = &connect_warnings(&gw)[0];
    assert!(
        reason.contains("refused the login") && reason.contains("state.redis_url"),
        "{reason}"
    );

    let reply = Client::new()
        .post_json(&gw.url("/v1/x"), &[ALICE, no_store()], "{}")
        .await;
    assert_eq!(reply.status, 503, "deny");
    assert!(
        eventually(Duration::from_secs(5), || connect_warnings(&gw).len() == 2).await,
        "named again beside the failed call's warning: {}",
        gw.log_text()
    );
    let log = gw.log_text();
    assert!(log.contains("did not answer within"), "{log}");
    assert!(
        !log.contains("pw-wrong") && !log.contains("pw-right"),
        "{log}"
    );
}

/// A Redis that is not running is named as a refused connection.
#[tokio::test]
async fn a_redis_not_running_is_named_at_start() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    let url = redis.url();
    redis.kill();
    let upstream = MockUpstream::always(UpstreamReply::json(&answer(1, 1))).await;
    let gw = TestGateway::start(&config(&upstream.url(), &url, "{}", "")).await;
    assert!(
        eventually(Duration::from_secs(5), || !connect_warnings(&gw).is_empty()).await,
        "{}",
        gw.log_text()
    );
    let reason = &connect_warnings(&gw)[0];
    assert!(reason.contains("refused the connection"), "{reason}");
}

/// A Redis that refuses writes says why in the warning (its own answer,
/// `OOM command not allowed…`), not as a bare error kind.
#[tokio::test]
async fn what_redis_answered_is_in_the_warning() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let upstream = MockUpstream::always(UpstreamReply::json(&answer(1, 1))).await;
    let gw = TestGateway::start(&limited(&upstream.url(), &redis.url(), "allow")).await;
    let client = Client::new();
    let url = gw.url("/v1/x");
    assert_eq!(
        client
            .post_json(&url, &[ALICE, no_store()], "{}")
            .await
            .status,
        200
    );
    redis.cli(None, &["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    redis.cli(None, &["CONFIG", "SET", "maxmemory", "1"]);
    let reply = client.post_json(&url, &[ALICE, no_store()], "{}").await;
    assert_eq!(reply.status, 200, "allow serves from memory");
    assert!(
        eventually(Duration::from_secs(5), || !state_warnings(&gw, "take")
            .is_empty())
        .await,
        "{}",
        gw.log_text()
    );
    let error = &state_warnings(&gw, "take")[0];
    assert!(
        error.contains("answered OOM") && error.contains("maxmemory"),
        "{error}"
    );
    redis.cli(None, &["CONFIG", "SET", "maxmemory", "0"]);
}

/// With Redis gone, `on_error: allow` decides budgets from this
/// replica's memory, which starts from the spend Redis last told it: a
/// budget spent before the outage stays spent through it.
#[tokio::test]
async fn a_spent_budget_stays_spent_through_an_outage() {
    let Some(mut redis) = RedisServer::start() else {
        return;
    };
    // $0.00045 a request at gpt-4o-mini's prices; two spend the budget.
    let upstream = MockUpstream::always(UpstreamReply::json(&answer(1000, 500))).await;
    let yaml = format!(
        r#"
upstreams:
  llm: {{ url: "{}" }}
pools:
  main: {{ members: [llm] }}
auth:
  api_keys:
    - {{ id: alice, key: sk-alice-0001 }}
routes:
  - {{ name: chat, match: {{ path_prefix: /v1/ }}, upstream: main }}
pricing:
  gpt-4o-mini: {{ input: 0.15, output: 0.60 }}
budget: {{ daily_usd: 0.0008, enforce: true }}
state: {{ backend: redis, redis_url: "{}", on_error: allow }}
"#,
        upstream.url(),
        redis.url()
    );
    let gw = TestGateway::start(&yaml).await;
    let client = Client::new();
    let url = gw.url("/v1/x");
    let call = || client.post_json(&url, &[ALICE], "{}");
    for _ in 0..2 {
        assert_eq!(call().await.status, 200);
        // Spend is charged after the response: let it land.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = call().await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["error"]["code"], "budget_exceeded");

    redis.kill();
    let refused = call().await;
    assert_eq!(
        (
            refused.status.as_u16(),
            refused.json()["error"]["code"].clone()
        ),
        (429, json!("budget_exceeded")),
        "the budget spent before the outage is still spent"
    );
}

/// Statuses of `deny` requests, one every 100 ms, until one is a 200 or
/// `within` has passed: whether the replica got back to Redis.
async fn back_within(gw: &TestGateway, within: Duration) -> bool {
    let client = Client::new();
    let url = gw.url("/v1/x");
    let deadline = tokio::time::Instant::now() + within;
    while tokio::time::Instant::now() < deadline {
        if client
            .post_json(&url, &[ALICE, no_store()], "{}")
            .await
            .status
            == 200
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A connection that stays open but carries nothing more (a NAT entry or
/// a proxy's that expired without a reset) is never found closed, so
/// redis-rs keeps it; sluice replaces it once calls have gone unanswered
/// for a second, rather than refusing every request until restarted.
#[tokio::test]
async fn a_connection_that_answers_nothing_is_replaced() {
    let Some(redis) = RedisServer::start() else {
        return;
    };
    let relay = Relay::start(redis.port).await;
    let upstream = MockUpstream::always(UpstreamReply::json(&answer(1, 1))).await;
    let gw = TestGateway::start(&limited(&upstream.url(), &relay.url(), "deny")).await;
    assert!(back_within(&gw, Duration::from_secs(2)).await);
    relay.strand();
    let reply = Client::new()
        .post_json(&gw.url("/v1/x"), &[ALICE, no_store()], "{}")
        .await;
    assert_eq!(reply.status, 503, "the stranded connection answers nothing");
    assert!(
        back_within(&gw, Duration::from_secs(6)).await,
        "a new connection takes over"
    );
}

/// A failover behind one address (a Kubernetes Service, a managed Redis's
/// primary endpoint): the old primary, now a replica, answers READONLY on
/// the connection sluice holds. sluice connects again, and reaches the
/// new primary.
#[tokio::test]
async fn a_primary_turned_replica_is_left_for_the_new_one() {
    let (Some(old), Some(new)) = (RedisServer::start(), RedisServer::start()) else {
        return;
    };
    let relay = Relay::start(old.port).await;
    let upstream = MockUpstream::always(UpstreamReply::json(&answer(1, 1))).await;
    let gw = TestGateway::start(&limited(&upstream.url(), &relay.url(), "deny")).await;
    assert!(back_within(&gw, Duration::from_secs(2)).await);
    relay.point_at(new.port);
    old.cli(None, &["REPLICAOF", "127.0.0.1", &new.port.to_string()]);
    assert!(
        back_within(&gw, Duration::from_secs(6)).await,
        "the new primary takes the calls"
    );
    assert_ne!(
        new.cli(None, &["DBSIZE"]),
        "0",
        "the limit is kept on the new primary"
    );
}
