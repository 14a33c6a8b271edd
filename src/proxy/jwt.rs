//! JWT bearer tokens (part of phase 2, identity): keys loaded once per
//! config (PEM or JWKS file, or an HMAC secret), then per request the
//! signature, `exp`/`nbf` when present (30 s leeway), and the configured
//! `iss` and `aud` (then required) are checked with
//! jsonwebtoken. Only the configured algorithms are accepted, `alg: none`
//! never parses, and a key is only ever used with its own family, so a
//! public key can never serve as an HMAC secret; a JWK that names its
//! `alg` is used with that one only. Tokens with `crit` are refused.

use std::sync::Arc;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{Jwk, JwkSet, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

/// Leeway for `exp` and `nbf`, for clocks that disagree a little.
const LEEWAY_SECS: u64 = 30;

/// One verification key.
#[derive(Debug, Clone)]
pub struct JwtKey {
    pub kid: Option<String>,
    pub key: DecodingKey,
    /// The one algorithm a JWK's `alg` ties the key to (RFC 7517 §4.4);
    /// `None`: any allowed algorithm of the key's family.
    pub alg: Option<Algorithm>,
}

impl JwtKey {
    /// A key of the config itself (PEM or HMAC secret), for any allowed
    /// algorithm of its family.
    pub fn any_algorithm(key: DecodingKey) -> Self {
        JwtKey {
            kid: None,
            key,
            alg: None,
        }
    }

    /// The verification key of a JWK; `Ok(None)` for a key published for
    /// encryption (by `use` or by `alg`), which verifies no signature.
    pub fn from_jwk(jwk: &Jwk) -> Result<Option<Self>, String> {
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            return Ok(None);
        }
        let alg = match jwk.common.key_algorithm {
            None => None,
            // RSA1_5, RSA-OAEP and algorithms this crate does not know:
            // nothing a signature can be checked with.
            Some(KeyAlgorithm::UNKNOWN_ALGORITHM) => return Ok(None),
            Some(named) => match Algorithm::try_from(named) {
                Ok(alg) => Some(alg),
                Err(_) => return Ok(None),
            },
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
        Ok(Some(JwtKey {
            kid: jwk.common.key_id.clone(),
            key,
            alg,
        }))
    }
}

/// A token's verified claims.
pub struct Verified {
    pub identity: Arc<str>,
    /// The tier claim's value, if the token has one.
    pub tier: Option<String>,
}

/// A JWT check, compiled from `auth.jwt`.
#[derive(Debug)]
pub struct JwtVerifier {
    keys: Vec<JwtKey>,
    /// One validation per allowed algorithm.
    validations: Vec<(Algorithm, Validation)>,
    identity_claim: String,
    tier_claim: Option<String>,
}

impl JwtVerifier {
    pub fn new(
        keys: Vec<JwtKey>,
        algorithms: &[Algorithm],
        issuer: Option<&str>,
        audiences: &[String],
        identity_claim: String,
        tier_claim: Option<String>,
    ) -> Self {
        let validations = algorithms
            .iter()
            .map(|alg| {
                let mut v = Validation::new(*alg);
                v.leeway = LEEWAY_SECS;
                v.validate_nbf = true;
                // jsonwebtoken checks `iss` and `aud` only when a token has
                // them: a configured issuer or audience must be required
                // too, or a token without the claim would pass. `exp` is
                // checked when present but not required, as Envoy does: a
                // token's lifetime is its issuer's choice.
                let mut required = Vec::new();
                if let Some(iss) = issuer {
                    v.set_issuer(&[iss]);
                    required.push("iss");
                }
                if audiences.is_empty() {
                    v.validate_aud = false;
                } else {
                    v.set_audience(audiences);
                    required.push("aud");
                }
                v.set_required_spec_claims(&required);
                (*alg, v)
            })
            .collect();
        JwtVerifier {
            keys,
            validations,
            identity_claim,
            tier_claim,
        }
    }

    /// Verifies `token` with the keys loaded from the config; the error is
    /// a `sluice_auth_failures_total` reason.
    pub fn verify(&self, token: &str) -> Result<Verified, &'static str> {
        self.verify_with(token, &self.keys)
    }

    /// Verifies `token` with `keys` (those of a `jwks_url`).
    pub fn verify_with(&self, token: &str, keys: &[JwtKey]) -> Result<Verified, &'static str> {
        if keys.is_empty() {
            // A jwks_url config before its keys are fetched.
            return Err("no_keys");
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| unreadable_header(token))?;
        if header.crit.is_some() {
            // RFC 7515 §4.1.11: a token whose header names extensions the
            // verifier must understand is refused by one that knows none.
            return Err("unsupported_crit");
        }
        let validation = self
            .validations
            .iter()
            .find(|(alg, _)| *alg == header.alg)
            .map(|(_, v)| v)
            .ok_or("algorithm_not_allowed")?;
        let family = header.alg.family();
        let mut candidates = keys
            .iter()
            .filter(|k| k.key.family() == family)
            .filter(|k| k.alg.is_none_or(|alg| alg == header.alg))
            .filter(|k| match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .peekable();
        if candidates.peek().is_none() {
            return Err(if header.kid.is_some() {
                "unknown_kid"
            } else {
                "bad_signature"
            });
        }
        for key in candidates {
            match jsonwebtoken::decode::<Map<String, Value>>(token, &key.key, validation) {
                Ok(data) => return self.claims(&data.claims),
                // Another key of the set may have signed it.
                Err(e) if *e.kind() == ErrorKind::InvalidSignature => continue,
                Err(e) => return Err(reason(e.kind())),
            }
        }
        Err("bad_signature")
    }

    fn claims(&self, claims: &Map<String, Value>) -> Result<Verified, &'static str> {
        let identity = match claims.get(&self.identity_claim) {
            Some(Value::String(s)) if !s.is_empty() => Arc::from(s.as_str()),
            Some(Value::Number(n)) => Arc::from(n.to_string()),
            _ => return Err("missing_claim"),
        };
        let tier = self
            .tier_claim
            .as_ref()
            .and_then(|c| claims.get(c))
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(Verified { identity, tier })
    }
}

fn reason(kind: &ErrorKind) -> &'static str {
    match kind {
        ErrorKind::ExpiredSignature => "expired",
        ErrorKind::ImmatureSignature => "not_yet_valid",
        ErrorKind::InvalidIssuer => "wrong_issuer",
        ErrorKind::InvalidAudience => "wrong_audience",
        ErrorKind::InvalidSignature => "bad_signature",
        ErrorKind::InvalidAlgorithm => "algorithm_not_allowed",
        ErrorKind::MissingRequiredClaim(_) => "missing_claim",
        _ => "malformed",
    }
}

/// Why a token's header did not read: an `alg` no list can hold
/// (`none`, the classic forgery, or a name jsonwebtoken does not know)
/// is `algorithm_not_allowed`, as a known one outside the list is; else
/// the header is `malformed`.
fn unreadable_header(token: &str) -> &'static str {
    use base64::Engine as _;
    let names_alg = token
        .split('.')
        .next()
        .and_then(|head| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(head)
                .ok()
        })
        .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
        .is_some_and(|header| header.get("alg").is_some_and(serde_json::Value::is_string));
    if names_alg {
        "algorithm_not_allowed"
    } else {
        "malformed"
    }
}

/// Whether a credential looks like a JWT (three dot-separated parts).
pub fn looks_like_jwt(credential: &[u8]) -> bool {
    credential.iter().filter(|b| **b == b'.').count() == 2
}

/// Keys from a `keys_file`: a JWKS document, or PEM public keys or
/// certificates (RSA, EC or Ed25519), one or more.
pub fn load_keys_file(text: &str) -> Result<Vec<JwtKey>, String> {
    if text.trim_start().starts_with('{') {
        let set: JwkSet = serde_json::from_str(text).map_err(|e| {
            format!(
                "keys_file is not a JWKS document: it {}",
                crate::config::json_problem(&e)
            )
        })?;
        let mut keys = Vec::new();
        for jwk in &set.keys {
            if let Some(key) = JwtKey::from_jwk(jwk)
                .map_err(|e| format!("keys_file holds an unusable JWK: {e}"))?
            {
                keys.push(key);
            }
        }
        if keys.is_empty() {
            return Err("keys_file holds no JWK that can verify signatures".to_owned());
        }
        return Ok(keys);
    }
    let mut keys = Vec::new();
    for block in pem_blocks(text) {
        // jsonwebtoken reads an RSA private key as a decoding key, and no
        // token then verifies against it; and a signing key has no place
        // in a gateway's config.
        if block
            .lines()
            .next()
            .is_some_and(|l| l.contains("PRIVATE KEY"))
        {
            return Err(
                "keys_file holds a private key; give the public key (or a certificate) only"
                    .to_owned(),
            );
        }
        let bytes = block.as_bytes();
        let key = DecodingKey::from_rsa_pem(bytes)
            .or_else(|_| DecodingKey::from_ec_pem(bytes))
            .or_else(|_| DecodingKey::from_ed_pem(bytes))
            .map_err(|_| {
                "keys_file holds a PEM block that is not an RSA, EC or Ed25519 public key"
                    .to_owned()
            })?;
        keys.push(JwtKey::any_algorithm(key));
    }
    if keys.is_empty() {
        return Err("keys_file holds no PEM key and is not a JWKS document".to_owned());
    }
    Ok(keys)
}

/// Each `-----BEGIN …-----` … `-----END …-----` block of a PEM text.
fn pem_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with("-----BEGIN ") {
            current = Some(String::new());
        }
        if let Some(block) = current.as_mut() {
            block.push_str(line);
            block.push('\n');
        }
        if line.starts_with("-----END ")
            && let Some(block) = current.take()
        {
            blocks.push(block);
        }
    }
    blocks
}
