//! JWT bearer tokens: valid tokens become identities (with their tier
//! claim), and every way a token can be wrong is a 401 counted by reason.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::Method;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::support::{Client, ClientReply, TestGateway};

const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn config(jwt: &str) -> String {
    format!(
        r#"
upstreams:
  demo: {{ mock: {{}} }}
auth:
  jwt:
{jwt}
tiers:
  free: {{}}
  pro: {{}}
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
    upstream: demo
"#
    )
}

fn hs_config(algorithms: &str) -> String {
    config(&format!(
        "    issuer: https://login.example.com/\n    audiences: [sluice]\n    hs256_secret: {SECRET}\n    algorithms: {algorithms}\n    tier_claim: tier"
    ))
}

fn claims(overrides: Value) -> Value {
    let mut c = json!({
        "sub": "alice",
        "iss": "https://login.example.com/",
        "aud": "sluice",
        "exp": now() + 600,
        "tier": "pro",
    });
    for (k, v) in overrides.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn hs_token(alg: Algorithm, secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, &EncodingKey::from_secret(secret)).unwrap()
}

async fn call(gw: &TestGateway, token: &str) -> ClientReply {
    let auth = format!("Bearer {token}");
    Client::new()
        .send(
            Method::GET,
            &gw.url("/v1/models"),
            &[("authorization", &auth)],
            Bytes::new(),
        )
        .await
}

async fn refused_for(gw: &TestGateway, token: &str, reason: &str) {
    let reply = call(gw, token).await;
    assert_eq!(reply.status, 401, "{}", reply.text());
    assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
    assert_eq!(reply.json()["error"]["code"], "invalid_api_key");
    assert!(!reply.text().contains(token), "the token was echoed");
    assert_eq!(
        gw.metric(
            "sluice_auth_failures_total",
            &[("route", "chat"), ("reason", reason)]
        )
        .await,
        Some(1.0),
        "reason {reason}:\n{}",
        gw.metrics().await
    );
}

#[tokio::test]
async fn valid_hs256_token_is_an_identity_with_its_tier() {
    let gw = TestGateway::start(&hs_config("[HS256]")).await;
    let reply = call(
        &gw,
        &hs_token(Algorithm::HS256, SECRET.as_bytes(), &claims(json!({}))),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let logs = gw.wait_access_logs(1).await;
    assert_eq!(logs[0]["identity"], "alice");
    assert_eq!(logs[0]["identity_kind"], "jwt");
    assert_eq!(logs[0]["tier"], "pro");
    // An unknown tier in the claim falls back to the default tier.
    let reply = call(
        &gw,
        &hs_token(
            Algorithm::HS256,
            SECRET.as_bytes(),
            &claims(json!({"tier": "gold"})),
        ),
    )
    .await;
    assert_eq!(reply.status, 200);
    assert_eq!(gw.wait_access_logs(2).await[1]["tier"], "free");
}

#[tokio::test]
async fn expired_token_is_refused() {
    let gw = TestGateway::start(&hs_config("[HS256]")).await;
    let token = hs_token(
        Algorithm::HS256,
        SECRET.as_bytes(),
        &claims(json!({"exp": now() - 120})),
    );
    refused_for(&gw, &token, "expired").await;
}

/// A configured issuer or audience is required, not only checked when
/// present; `exp` is checked when present, and a token without one (the
/// issuer's choice) is accepted.
#[tokio::test]
async fn configured_claims_are_required_and_exp_is_optional() {
    let gw = TestGateway::start(&hs_config("[HS256]")).await;
    for missing in ["iss", "aud"] {
        let mut c = claims(json!({}));
        c.as_object_mut().unwrap().remove(missing);
        let token = hs_token(Algorithm::HS256, SECRET.as_bytes(), &c);
        assert_eq!(call(&gw, &token).await.status, 401, "without {missing}");
    }
    assert_eq!(
        gw.metric(
            "sluice_auth_failures_total",
            &[("route", "chat"), ("reason", "missing_claim")]
        )
        .await,
        Some(2.0)
    );
    let mut c = claims(json!({}));
    c.as_object_mut().unwrap().remove("exp");
    let token = hs_token(Algorithm::HS256, SECRET.as_bytes(), &c);
    assert_eq!(call(&gw, &token).await.status, 200);
}

#[tokio::test]
async fn token_not_yet_valid_is_refused() {
    let gw = TestGateway::start(&hs_config("[HS256]")).await;
    let token = hs_token(
        Algorithm::HS256,
        SECRET.as_bytes(),
        &claims(json!({"nbf": now() + 300})),
    );
    refused_for(&gw, &token, "not_yet_valid").await;
}

#[tokio::test]
async fn wrong_issuer_is_refused() {
    let gw = TestGateway::start(&hs_config("[HS256]")).await;
    let token = hs_token(
        Algorithm::HS256,
        SECRET.as_bytes(),
        &claims(json!({"iss": "https://evil.example/"})),
    );
    refused_for(&gw, &token, "wrong_issuer").await;
}

#[tokio::test]
async fn wrong_audience_is_refused() {
    let gw = TestGateway::start(&hs_config("[HS256]")).await;
    let token = hs_token(
        Algorithm::HS256,
        SECRET.as_bytes(),
        &claims(json!({"aud": "someone-else"})),
    );
    refused_for(&gw, &token, "wrong_audience").await;
}

#[tokio::test]
async fn bad_signature_is_refused() {
    let gw = TestGateway::start(&hs_config("[HS256]")).await;
    let token = hs_token(
        Algorithm::HS256,
        b"another-secret-that-is-32-bytes-long!!",
        &claims(json!({})),
    );
    refused_for(&gw, &token, "bad_signature").await;
}

#[tokio::test]
async fn alg_none_is_refused() {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let gw = TestGateway::start(&hs_config("[HS256]")).await;
    let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64.encode(claims(json!({})).to_string());
    refused_for(
        &gw,
        &format!("{header}.{payload}."),
        "algorithm_not_allowed",
    )
    .await;
}

#[tokio::test]
async fn algorithm_outside_the_list_is_refused() {
    let gw = TestGateway::start(&hs_config("[HS256]")).await;
    let token = hs_token(Algorithm::HS512, SECRET.as_bytes(), &claims(json!({})));
    refused_for(&gw, &token, "algorithm_not_allowed").await;
}

/// An EC P-256 key pair: (private PKCS#8 PEM, public SPKI PEM).
fn ec_keys() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    (key.serialize_pem(), key.public_key_pem())
}

async fn gateway_with_keys_file(contents: &str, algorithms: &str) -> TestGateway {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.pem"), contents).unwrap();
    let yaml = config(&format!(
        "    keys_file: keys.pem\n    algorithms: {algorithms}\n    audiences: [sluice]"
    ));
    TestGateway::start_in(&yaml, &[], dir).await
}

#[tokio::test]
async fn es256_token_verified_with_a_pem_public_key() {
    let (private, public) = ec_keys();
    let gw = gateway_with_keys_file(&public, "[ES256]").await;
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::ES256),
        &claims(json!({"sub": "svc-batch"})),
        &EncodingKey::from_ec_pem(private.as_bytes()).unwrap(),
    )
    .unwrap();
    let reply = call(&gw, &token).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(gw.wait_access_logs(1).await[0]["identity"], "svc-batch");
}

/// A keys_file whose keys no allowed algorithm uses (an EC key under the
/// default RS256) would refuse every token: the config is refused, at
/// the keys_file, saying what to list.
#[test]
fn keys_no_allowed_algorithm_uses_are_refused() {
    let (_, public) = ec_keys();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.pem"), &public).unwrap();
    let load = |algorithms: &str| {
        sluice::config::load_str(
            &config(&format!("    keys_file: keys.pem{algorithms}")),
            "test.yaml",
            dir.path(),
            &|_| None,
        )
    };
    for algorithms in ["", "\n    algorithms: [RS256, EdDSA]"] {
        let err = load(algorithms).expect_err("no allowed algorithm uses an EC key");
        assert_eq!(err.0.len(), 1, "{err}");
        assert!(
            err.0[0]
                .message
                .starts_with("keys_file holds no key for the allowed algorithms"),
            "{err}"
        );
        assert!(err.0[0].message.contains("its keys are EC;"), "{err}");
        assert_eq!(err.0[0].line, 6, "{err}");
    }
    assert!(load("\n    algorithms: [ES256]").is_ok());
    assert!(load("\n    algorithms: [RS256, ES256]").is_ok());
}

#[tokio::test]
async fn public_key_used_as_hmac_secret_is_refused() {
    let (_, public) = ec_keys();
    let gw = gateway_with_keys_file(&public, "[ES256]").await;
    // The classic confusion attack: HMAC-sign with the (public) key text.
    let token = hs_token(Algorithm::HS256, public.as_bytes(), &claims(json!({})));
    refused_for(&gw, &token, "algorithm_not_allowed").await;
    // And a config cannot allow it either.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("keys.pem"), &public).unwrap();
    let err = sluice::config::load_str(
        &config("    keys_file: keys.pem\n    algorithms: [ES256, HS256]"),
        "test.yaml",
        dir.path(),
        &|_| None,
    )
    .expect_err("HS256 with a public key must be refused");
    assert_eq!(
        err.0[0].message,
        "HS256 needs hs256_secret; a public key is never used as an HMAC secret"
    );
}

#[tokio::test]
async fn jwks_keys_are_chosen_by_kid() {
    let (private, _) = ec_keys();
    let encoding = EncodingKey::from_ec_pem(private.as_bytes()).unwrap();
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some("key-2026".into());
    let set = json!({ "keys": [jwk] });
    let gw = gateway_with_keys_file(&set.to_string(), "[ES256]").await;
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("key-2026".into());
    let token = jsonwebtoken::encode(&header, &claims(json!({})), &encoding).unwrap();
    assert_eq!(call(&gw, &token).await.status, 200);
    header.kid = Some("key-1999".into());
    let token = jsonwebtoken::encode(&header, &claims(json!({})), &encoding).unwrap();
    refused_for(&gw, &token, "unknown_kid").await;
}

/// A short HMAC secret works (as in Envoy and the JWT libraries) but is
/// warned about, without repeating it.
#[test]
fn short_hmac_secret_is_a_warning() {
    let snapshot = sluice::config::load_str(
        &config("    hs256_secret: ${JWT_SECRET}"),
        "test.yaml",
        std::path::Path::new("/nonexistent"),
        &|name| (name == "JWT_SECRET").then(|| "short-secret".to_owned()),
    )
    .expect("a short secret is accepted");
    let lines: Vec<String> = snapshot.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "test.yaml:6:19: warning: hs256_secret is shorter than 32 bytes (RFC 7518 asks for 256 bits): tokens signed with it are easier to forge"
        ]
    );
    assert!(!lines[0].contains("short-secret"));
    let empty = sluice::config::load_str(
        &config("    hs256_secret: ${JWT_SECRET:-}"),
        "test.yaml",
        std::path::Path::new("/nonexistent"),
        &|_| None,
    )
    .expect_err("an empty secret would let anyone sign tokens");
    assert_eq!(
        empty.0[0].to_string(),
        "test.yaml:6:19: hs256_secret must not be empty"
    );
    let long = sluice::config::load_str(
        &config("    hs256_secret: ${JWT_SECRET}"),
        "test.yaml",
        std::path::Path::new("/nonexistent"),
        &|name| (name == "JWT_SECRET").then(|| "x".repeat(32)),
    )
    .expect("a long secret is accepted");
    assert!(long.warnings.is_empty());
}

/// Tokens signed with a short secret are verified like any other.
#[tokio::test]
async fn a_short_hmac_secret_verifies_tokens() {
    let gw = TestGateway::start_with_env(
        &config("    hs256_secret: ${JWT_SECRET}"),
        &[("JWT_SECRET", "short-secret")],
    )
    .await;
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(json!({})),
        &EncodingKey::from_secret(b"short-secret"),
    )
    .unwrap();
    assert_eq!(call(&gw, &token).await.status, 200);
}

/// A JWKS document with one EC key, and the key that signs for it.
fn jwks_with(kid: &str) -> (String, EncodingKey) {
    let (private, _) = ec_keys();
    let encoding = EncodingKey::from_ec_pem(private.as_bytes()).unwrap();
    let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&encoding, Algorithm::ES256).unwrap();
    jwk.common.key_id = Some(kid.into());
    (json!({ "keys": [jwk] }).to_string(), encoding)
}

fn es_token(kid: &str, key: &EncodingKey) -> String {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &claims(json!({})), key).unwrap()
}

/// An issuer serving a JWKS document that a test can change, or take
/// down (`None`: it answers 500).
struct Issuer {
    upstream: crate::support::MockUpstream,
    document: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

impl Issuer {
    async fn start(document: Option<String>) -> Self {
        use crate::support::{MockUpstream, UpstreamReply};
        let document = std::sync::Arc::new(std::sync::Mutex::new(document));
        let served = document.clone();
        let upstream = MockUpstream::start(move |_| match served.lock().unwrap().clone() {
            Some(doc) => UpstreamReply::text(doc).header("content-type", "application/json"),
            None => UpstreamReply::status(500),
        })
        .await;
        Issuer { upstream, document }
    }

    fn serve(&self, document: Option<String>) {
        *self.document.lock().unwrap() = document;
    }

    /// Fetches of the document so far.
    fn fetches(&self) -> usize {
        self.upstream.seen().len()
    }

    /// A gateway verifying ES256 tokens with this issuer's keys.
    async fn gateway(&self) -> TestGateway {
        TestGateway::start(&config(&format!(
            "    jwks_url: {}/.well-known/jwks.json\n    algorithms: [ES256]\n    audiences: [sluice]",
            self.upstream.url()
        )))
        .await
    }
}

#[tokio::test]
async fn jwks_url_keys_follow_rotation_and_bad_kids_cannot_hammer_the_issuer() {
    use std::time::Duration;

    use crate::support::eventually;

    let (doc_a, key_a) = jwks_with("a");
    let issuer = Issuer::start(Some(doc_a)).await;
    let gw = issuer.gateway().await;
    // Fetched at start, in the background.
    assert!(eventually(Duration::from_secs(5), || issuer.fetches() == 1).await);
    assert_eq!(
        issuer.upstream.seen()[0].uri.path(),
        "/.well-known/jwks.json"
    );
    assert_eq!(call(&gw, &es_token("a", &key_a)).await.status, 200);

    // The issuer rotates to key b: the first token signed with it makes
    // sluice refetch, once.
    let (doc_b, key_b) = jwks_with("b");
    issuer.serve(Some(doc_b));
    assert_eq!(call(&gw, &es_token("b", &key_b)).await.status, 200);
    assert_eq!(issuer.fetches(), 2);

    // A flood of tokens with kids nobody published costs the issuer nothing
    // more within the refetch floor.
    for i in 0..20 {
        let reply = call(&gw, &es_token(&format!("bogus-{i}"), &key_b)).await;
        assert_eq!(reply.status, 401);
    }
    assert_eq!(issuer.fetches(), 2, "unknown kids refetched the JWKS");
    assert_eq!(
        gw.metric(
            "sluice_auth_failures_total",
            &[("route", "chat"), ("reason", "unknown_kid")]
        )
        .await,
        Some(20.0)
    );
}

/// A JWKS URL that a reload replaced is fetched no more: its keys and
/// their refresher are let go, not kept polling the old issuer (one
/// more for each reload that changed it) for the life of the process.
#[tokio::test]
async fn a_jwks_url_a_reload_replaced_is_fetched_no_more() {
    use std::time::Duration;

    use crate::support::eventually;

    // Down: its refresher retries at 1 s, 2 s, 4 s...
    let old = Issuer::start(None).await;
    let (doc, _) = jwks_with("a");
    let new = Issuer::start(Some(doc)).await;
    let yaml = |issuer: &Issuer| {
        config(&format!(
            "    jwks_url: {}/.well-known/jwks.json\n    algorithms: [ES256]\n    audiences: [sluice]",
            issuer.upstream.url()
        ))
    };
    let gw = TestGateway::start_watched(&yaml(&old), &[], tempfile::tempdir().unwrap()).await;
    assert!(eventually(Duration::from_secs(5), || old.fetches() >= 2).await);
    gw.swap_config(&yaml(&new));
    assert!(eventually(Duration::from_secs(5), || new.fetches() >= 1).await);
    let fetched = old.fetches();
    // Past the old refresher's next retry, due within 4 s.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(old.fetches(), fetched, "the replaced URL is still fetched");
}

/// `/readyz` says 503 until the first fetch of the JWKS keys has ended:
/// a probe that said ready before would send traffic whose every token
/// gets a 401.
#[tokio::test]
async fn not_ready_until_the_jwks_keys_are_fetched() {
    use std::time::Duration;

    use crate::support::{MockUpstream, UpstreamReply};

    let (doc, key) = jwks_with("a");
    let issuer = MockUpstream::always(
        UpstreamReply::text(doc)
            .header("content-type", "application/json")
            .delay(Duration::from_millis(700)),
    )
    .await;
    let gw = TestGateway::start(&config(&format!(
        "    jwks_url: {}/.well-known/jwks.json\n    algorithms: [ES256]\n    audiences: [sluice]",
        issuer.url()
    )))
    .await;
    let readyz = || async { Client::new().get(&gw.admin_url("/readyz")).await.status };
    assert_eq!(readyz().await, 503, "ready before the keys came");
    assert!(crate::support::eventually(Duration::from_secs(5), || issuer.seen().len() == 1).await);
    let mut ready = false;
    for _ in 0..50 {
        if readyz().await == 200 {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "never ready");
    assert_eq!(call(&gw, &es_token("a", &key)).await.status, 200);
}

#[tokio::test]
async fn rs256_token_verifies_and_hs256_with_the_rsa_public_key_does_not() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let public = key.public_key_pem();
    let gw = gateway_with_keys_file(&public, "[RS256]").await;
    let signing = EncodingKey::from_rsa_pem(key.serialize_pem().as_bytes()).unwrap();
    let good =
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims(json!({})), &signing).unwrap();
    assert_eq!(call(&gw, &good).await.status, 200);
    // RS/HS confusion: an HS256 token whose HMAC key is the public key PEM.
    let forged = hs_token(Algorithm::HS256, public.as_bytes(), &claims(json!({})));
    refused_for(&gw, &forged, "algorithm_not_allowed").await;
}

#[tokio::test]
async fn tokens_and_secrets_never_reach_the_logs() {
    let gw = TestGateway::start_with_env(
        &config("    hs256_secret: ${JWT_SECRET}\n    audiences: [sluice]\n    issuer: https://login.example.com/"),
        &[("JWT_SECRET", SECRET), ("SLUICE_LOG", "trace")],
    )
    .await;
    let good = hs_token(Algorithm::HS256, SECRET.as_bytes(), &claims(json!({})));
    let bad = hs_token(
        Algorithm::HS256,
        b"forged-forged-forged-forged-forged!!",
        &claims(json!({})),
    );
    assert_eq!(call(&gw, &good).await.status, 200);
    assert_eq!(call(&gw, &bad).await.status, 401);
    gw.wait_access_logs(2).await;
    let text = gw.log_text();
    for secret in [good.as_str(), bad.as_str(), SECRET] {
        assert!(
            !text.contains(secret),
            "the log leaks a credential:\n{text}"
        );
    }
}

#[tokio::test]
async fn eddsa_token_verifies_with_an_ed25519_public_key() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    let gw = gateway_with_keys_file(&key.public_key_pem(), "[EdDSA]").await;
    let signing = EncodingKey::from_ed_pem(key.serialize_pem().as_bytes()).unwrap();
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::EdDSA),
        &claims(json!({"sub": 42})),
        &signing,
    )
    .unwrap();
    assert_eq!(call(&gw, &token).await.status, 200);
    // A numeric identity claim is used as its decimal text.
    assert_eq!(gw.wait_access_logs(1).await[0]["identity"], "42");
}

/// A token's subject spelled like an API key's `id` is another identity:
/// it does not get the key's answers from a per-identity cache.
#[tokio::test]
async fn a_subject_named_like_a_key_id_is_another_identity() {
    let gw = TestGateway::start(&format!(
        r#"
upstreams:
  demo: {{ mock: {{}} }}
auth:
  api_keys:
    - {{ id: alice, key: sk-alice-key }}
  jwt:
    issuer: https://login.example.com/
    audiences: [sluice]
    hs256_secret: {SECRET}
routes:
  - name: chat
    match: {{ path_prefix: /v1/ }}
    cache: {{ ttl: 5m, scope: identity }}
    upstream: demo
"#
    ))
    .await;
    let post = |auth: String| {
        let gw = &gw;
        async move {
            Client::new()
                .send(
                    Method::POST,
                    &gw.url("/v1/chat/completions"),
                    &[
                        ("authorization", &auth),
                        ("content-type", "application/json"),
                    ],
                    Bytes::from_static(
                        br#"{"model":"m","messages":[{"role":"user","content":"private"}]}"#,
                    ),
                )
                .await
        }
    };
    let by_key = post("Bearer sk-alice-key".to_owned()).await;
    assert_eq!(by_key.header("x-sluice-cache"), Some("MISS"));
    let token = hs_token(Algorithm::HS256, SECRET.as_bytes(), &claims(json!({})));
    assert_eq!(claims(json!({}))["sub"], "alice");
    let by_token = post(format!("Bearer {token}")).await;
    assert_eq!(by_token.status, 200, "{}", by_token.text());
    assert_eq!(by_token.header("x-sluice-cache"), Some("MISS"));
    // Each still hits its own entry.
    assert_eq!(
        post("Bearer sk-alice-key".to_owned())
            .await
            .header("x-sluice-cache"),
        Some("HIT")
    );
}

/// A private key given as `keys_file` is refused by `check`: read as a
/// decoding key it would verify no token, and it has no place there.
#[test]
fn a_private_key_as_keys_file_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let rsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    for (name, pem) in [("rsa.key", rsa.serialize_pem()), ("ec.key", ec_keys().0)] {
        std::fs::write(dir.path().join(name), pem).unwrap();
        let yaml = config(&format!(
            "    keys_file: {name}\n    algorithms: [RS256, ES256]\n    audiences: [sluice]"
        ));
        let errs = sluice::config::load_str(&yaml, "test.yaml", dir.path(), &|_| None)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            errs.contains("keys_file holds a private key"),
            "{name}: {errs}"
        );
    }
}

/// An issuer answering, for a moment, a JWKS with no usable key (an empty
/// set, or keys for encryption only) does not take away the keys valid
/// tokens need: the fetch counts as failed and the old keys stay.
#[tokio::test]
async fn a_jwks_without_usable_keys_keeps_the_old_keys() {
    use std::time::Duration;

    use crate::support::eventually;

    let (doc_a, key_a) = jwks_with("a");
    let issuer = Issuer::start(Some(doc_a)).await;
    let gw = issuer.gateway().await;
    assert!(eventually(Duration::from_secs(5), || issuer.fetches() == 1).await);
    assert_eq!(call(&gw, &es_token("a", &key_a)).await.status, 200);

    issuer.serve(Some(r#"{"keys":[]}"#.to_owned()));
    // A kid nobody published makes sluice refetch, and find nothing usable.
    assert_eq!(call(&gw, &es_token("new", &key_a)).await.status, 401);
    assert_eq!(issuer.fetches(), 2);
    assert_eq!(call(&gw, &es_token("a", &key_a)).await.status, 200);
}

/// An issuer down when sluice starts: the keys are fetched again soon
/// (1 s, 2 s, 4 s… apart, not at the next 5-minute refresh nor only on
/// demand, which a failed attempt holds off for 30 s), so valid tokens
/// verify within seconds of the issuer's return.
#[tokio::test]
async fn keys_missing_at_start_are_fetched_soon_after_the_issuer_returns() {
    use std::time::Duration;

    use crate::support::eventually;

    let (doc, key) = jwks_with("a");
    let issuer = Issuer::start(None).await;
    let gw = issuer.gateway().await;
    assert!(eventually(Duration::from_secs(5), || issuer.fetches() > 0).await);
    // Refused while there are no keys; this also spends the on-demand refetch.
    assert_eq!(call(&gw, &es_token("a", &key)).await.status, 401);
    issuer.serve(Some(doc));
    let mut verified = false;
    for _ in 0..40 {
        if call(&gw, &es_token("a", &key)).await.status == 200 {
            verified = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(verified, "tokens verify within 8 s of the issuer's return");
}

/// A JWK that names its `alg` verifies tokens of that algorithm only
/// (RFC 7517 §4.4), even when the config allows another of its family.
#[tokio::test]
async fn a_jwk_verifies_only_the_algorithm_it_names() {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let signing = EncodingKey::from_rsa_pem(key.serialize_pem().as_bytes()).unwrap();
    let jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&signing, Algorithm::RS256).unwrap();
    // Another key, published for encryption only (by its `alg`).
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let other = EncodingKey::from_rsa_pem(other.serialize_pem().as_bytes()).unwrap();
    let mut encryption =
        jsonwebtoken::jwk::Jwk::from_encoding_key(&other, Algorithm::RS256).unwrap();
    encryption.common.key_algorithm = Some(jsonwebtoken::jwk::KeyAlgorithm::RSA_OAEP);
    let set = json!({ "keys": [encryption, jwk] });
    let gw = gateway_with_keys_file(&set.to_string(), "[RS256, PS256]").await;
    let rs256 =
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims(json!({})), &signing).unwrap();
    assert_eq!(call(&gw, &rs256).await.status, 200);
    let ps256 =
        jsonwebtoken::encode(&Header::new(Algorithm::PS256), &claims(json!({})), &signing).unwrap();
    refused_for(&gw, &ps256, "bad_signature").await;
    // Signed with the encryption key's private half: no signature key.
    let by_encryption_key =
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims(json!({})), &other).unwrap();
    let reply = call(&gw, &by_encryption_key).await;
    assert_eq!(reply.status, 401, "{}", reply.text());
}

/// A token whose header lists critical extensions is refused: sluice
/// understands none (RFC 7515 §4.1.11).
#[tokio::test]
async fn a_token_with_critical_extensions_is_refused() {
    let gw = TestGateway::start(&hs_config("[HS256]")).await;
    let mut header = Header::new(Algorithm::HS256);
    header.crit = Some(vec!["exp-policy".into()]);
    let token = jsonwebtoken::encode(
        &header,
        &claims(json!({})),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    refused_for(&gw, &token, "unsupported_crit").await;
}
