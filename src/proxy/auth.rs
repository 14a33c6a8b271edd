//! Phase 2, identity: who is calling. API keys arrive as
//! `authorization: Bearer <key>` or `x-api-key: <key>`; sluice keeps only
//! their SHA-256 digests and finds a key by its digest in one hash lookup.
//! Credentials never reach logs or error messages.

use super::headers::X_API_KEY;
use http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::ctx::{Identity, IdentityId, RequestCtx};
use super::error::ProxyError;
use super::jwks::JwksKeys;
use super::jwt;
use std::sync::Arc;

use crate::snapshot::{ApiKey, Auth, AuthMode, Jwt, Route, Snapshot};

/// The SHA-256 digest of a key.
pub fn digest(key: &[u8]) -> [u8; 32] {
    Sha256::digest(key).into()
}

/// `sha256:<64 hex>` as printed by `sluice hash-key`.
pub fn format_hash(key: &[u8]) -> String {
    format!("sha256:{}", hex::encode(digest(key)))
}

/// Parses a configured `hash:`.
pub fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let hex_part = text.trim().strip_prefix("sha256:")?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).ok()?;
    Some(out)
}

/// The credential a request presents, if any: a bearer token, else an
/// `x-api-key`. An `authorization` of another scheme (or a bare `Bearer`)
/// with no `x-api-key` beside it presents a credential that matches
/// nothing, so it is refused rather than taken for no credential at all;
/// so is a request with two `authorization` or two `x-api-key` headers,
/// which name no single caller (a gateway taking the first would let
/// whatever sits before it decide by the order it adds them in).
pub fn credential(headers: &HeaderMap) -> Option<&[u8]> {
    let repeated = |name| headers.get_all(name).iter().nth(1).is_some();
    if repeated(header::AUTHORIZATION) || repeated(X_API_KEY) {
        return Some(b"");
    }
    let authorization = headers.get(header::AUTHORIZATION).map(|v| v.as_bytes());
    if let Some(v) = authorization
        && v.len() > 7
        && v[..7].eq_ignore_ascii_case(b"bearer ")
    {
        return Some(v[7..].trim_ascii());
    }
    match headers.get(X_API_KEY) {
        Some(key) => Some(key.as_bytes().trim_ascii()),
        None => authorization.map(|_| &b""[..]),
    }
}

/// The configured API key `presented` is, if any: one SHA-256 and one
/// hash-map lookup, whatever the number of keys.
pub fn find_api_key<'a>(auth: &'a Auth, presented: &[u8]) -> Option<&'a Arc<ApiKey>> {
    let d = digest(presented);
    auth.api_keys
        .get_key_value(&d)
        // The map already compared digests; the constant-time check keeps
        // that comparison free of early exits however the map is built.
        .filter(|(stored, _)| bool::from(stored.ct_eq(&d)))
        .map(|(_, key)| key)
}

/// Sets `ctx.identity` per the route's mode, or refuses with 401/403.
pub async fn identify(
    snap: &Snapshot,
    jwks: Option<&JwksKeys>,
    route: &Route,
    headers: &HeaderMap,
    ctx: &mut RequestCtx,
) -> Result<(), ProxyError> {
    let anonymous = || Identity {
        id: IdentityId::Ip(ctx.client_addr.ip()),
        tier: Some(snap.auth.anonymous_tier.clone()),
    };
    if route.auth == AuthMode::None {
        ctx.identity = Some(anonymous());
        return Ok(());
    }
    let Some(presented) = credential(headers) else {
        return match route.auth {
            AuthMode::Optional => {
                ctx.identity = Some(anonymous());
                Ok(())
            }
            _ => Err(ProxyError::Unauthorized { reason: "missing" }),
        };
    };
    let Some(key) = find_api_key(&snap.auth, presented) else {
        return match &snap.auth.jwt {
            Some(jwt) if jwt::looks_like_jwt(presented) => {
                identify_jwt(snap, jwt, jwks, presented, ctx).await
            }
            _ => Err(ProxyError::Unauthorized {
                reason: "invalid_key",
            }),
        };
    };
    // Known before the allow-list is read: a 403 is logged with the
    // identity it refused ("valid identity, not allowed here").
    ctx.identity = Some(Identity {
        id: IdentityId::Key(key.id.clone()),
        tier: key.tier.clone().or_else(|| snap.auth.default_tier.clone()),
    });
    if let Some(allowed) = &key.routes
        && !allowed.iter().any(|r| **r == *route.name)
    {
        return Err(ProxyError::Forbidden);
    }
    Ok(())
}

/// Sets the identity from a JWT, or refuses it with the reason.
async fn identify_jwt(
    snap: &Snapshot,
    jwt: &Jwt,
    jwks: Option<&JwksKeys>,
    token: &[u8],
    ctx: &mut RequestCtx,
) -> Result<(), ProxyError> {
    let token = std::str::from_utf8(token).map_err(|_| ProxyError::Unauthorized {
        reason: "malformed",
    })?;
    let verified = match jwks {
        None => jwt.verifier.verify(token),
        Some(jwks) => {
            let first = jwt.verifier.verify_with(token, &jwks.current());
            match first {
                // The issuer may have rotated its keys since we fetched them.
                Err("unknown_kid" | "no_keys") if jwks.refresh_for_unknown_kid().await => {
                    jwt.verifier.verify_with(token, &jwks.current())
                }
                other => other,
            }
        }
    }
    .map_err(|reason| ProxyError::Unauthorized { reason })?;
    // A tier claim counts only when it names a configured tier.
    let tier = verified
        .tier
        .as_deref()
        .and_then(|t| snap.tiers.get_key_value(t))
        .map(|(name, _)| name.clone())
        .or_else(|| snap.auth.default_tier.clone());
    ctx.identity = Some(Identity {
        id: IdentityId::Subject(verified.identity),
        tier,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hash_round_trip() {
        let h = format_hash(b"test");
        assert_eq!(
            h,
            "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
        );
        assert_eq!(parse_hash(&h), Some(digest(b"test")));
        assert_eq!(parse_hash("sha256:zz"), None);
        assert_eq!(parse_hash("md5:00"), None);
    }

    #[test]
    fn credential_sources() {
        let mut h = HeaderMap::new();
        assert_eq!(credential(&h), None);
        h.insert("x-api-key", HeaderValue::from_static(" k1 "));
        assert_eq!(credential(&h), Some(&b"k1"[..]));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("bearer k2"));
        assert_eq!(credential(&h), Some(&b"k2"[..]));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic eA=="),
        );
        // Another scheme: the x-api-key beside it, else a wrong credential.
        assert_eq!(credential(&h), Some(&b"k1"[..]));
        h.remove("x-api-key");
        assert_eq!(credential(&h), Some(&b""[..]));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer"));
        assert_eq!(credential(&h), Some(&b""[..]));
        // Two of either header: no one caller, whatever each holds.
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer k2"));
        h.append(header::AUTHORIZATION, HeaderValue::from_static("Bearer k2"));
        assert_eq!(credential(&h), Some(&b""[..]));
        h.remove(header::AUTHORIZATION);
        h.insert("x-api-key", HeaderValue::from_static("k1"));
        h.append("x-api-key", HeaderValue::from_static("k3"));
        assert_eq!(credential(&h), Some(&b""[..]));
    }
}
