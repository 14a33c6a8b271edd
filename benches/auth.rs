//! Micro-benchmarks of the per-request credential checks: API-key lookup
//! (one SHA-256 and one map lookup, whatever the number of keys) and JWT
//! verification per algorithm family. `cargo bench --bench auth`.

use std::hint::black_box;
use std::path::Path;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use sluice::proxy::auth::find_api_key;
use sluice::snapshot::Snapshot;

fn main() {
    divan::main();
}

const ROUTES: &str = "upstreams: { m: { mock: {} } }\nroutes: [ { name: r, match: { path_prefix: / }, upstream: m } ]\n";

fn load(yaml: &str, dir: &Path) -> Snapshot {
    sluice::config::load_str(yaml, "bench.yaml", dir, &|_| None).expect("bench config")
}

fn with_keys(n: usize) -> Snapshot {
    let mut yaml = String::from("auth:\n  api_keys:\n");
    for i in 0..n {
        yaml.push_str(&format!("    - {{ id: k{i}, key: sk-bench-key-{i:06} }}\n"));
    }
    yaml.push_str(ROUTES);
    load(&yaml, Path::new("."))
}

#[divan::bench(args = [1, 10_000])]
fn api_key_hit(bencher: divan::Bencher, keys: usize) {
    let snap = with_keys(keys);
    let presented = format!("sk-bench-key-{:06}", keys / 2);
    bencher.bench(|| find_api_key(&snap.auth, black_box(presented.as_bytes())).is_some());
}

#[divan::bench(args = [1, 10_000])]
fn api_key_miss(bencher: divan::Bencher, keys: usize) {
    let snap = with_keys(keys);
    bencher.bench(|| find_api_key(&snap.auth, black_box(b"sk-not-a-configured-key")).is_none());
}

fn claims() -> serde_json::Value {
    json!({"sub": "alice", "aud": "sluice", "exp": 4_102_444_800u64, "tier": "pro"})
}

/// A verifier for `jwt_yaml` and a token it accepts.
fn jwt_case(jwt_yaml: &str, files: &[(&str, String)], token: String) -> (Snapshot, String) {
    let dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("key file");
    }
    let snap = load(&format!("auth:\n  jwt:\n{jwt_yaml}\n{ROUTES}"), &dir);
    (snap, token)
}

fn verify(bencher: divan::Bencher, (snap, token): (Snapshot, String)) {
    let verifier = &snap.auth.jwt.as_ref().expect("jwt configured").verifier;
    assert!(
        verifier.verify(&token).is_ok(),
        "the bench token must verify"
    );
    bencher.bench(|| verifier.verify(black_box(&token)).is_ok());
}

#[divan::bench]
fn jwt_hs256(bencher: divan::Bencher) {
    let secret = "0123456789abcdef0123456789abcdef";
    let token = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims(),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("token");
    verify(
        bencher,
        jwt_case(
            &format!(
                "    hs256_secret: {secret}\n    audiences: [sluice]\n    algorithms: [HS256]"
            ),
            &[],
            token,
        ),
    );
}

#[divan::bench]
fn jwt_es256(bencher: divan::Bencher) {
    let key = rcgen::KeyPair::generate().expect("key");
    let signing = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("signing key");
    let token =
        jsonwebtoken::encode(&Header::new(Algorithm::ES256), &claims(), &signing).expect("token");
    verify(
        bencher,
        jwt_case(
            "    keys_file: es.pem\n    audiences: [sluice]\n    algorithms: [ES256]",
            &[("es.pem", key.public_key_pem())],
            token,
        ),
    );
}

#[divan::bench]
fn jwt_rs256(bencher: divan::Bencher) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).expect("key");
    let signing = EncodingKey::from_rsa_pem(key.serialize_pem().as_bytes()).expect("signing key");
    let token =
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims(), &signing).expect("token");
    verify(
        bencher,
        jwt_case(
            "    keys_file: rs.pem\n    audiences: [sluice]\n    algorithms: [RS256]",
            &[("rs.pem", key.public_key_pem())],
            token,
        ),
    );
}
