//! Keys published at a `jwks_url`: fetched over the upstreams' HTTP(S)
//! client, kept outside the config snapshot (so a reload keeps them),
//! refreshed in the background, and refetched when a token names a `kid`
//! we do not know, at most once per [`REFETCH_FLOOR`] so that a flood of
//! bad tokens cannot hammer the issuer.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::{Request, Uri};
use http_body_util::{BodyExt, Limited};
use jsonwebtoken::jwk::Jwk;

use super::jwt::JwtKey;
use crate::body;
use crate::upstream::HttpClient;

/// Background refresh period.
pub const REFRESH_EVERY: Duration = Duration::from_secs(300);
/// Shortest time between two refetches caused by unknown `kid`s.
pub const REFETCH_FLOOR: Duration = Duration::from_secs(30);
/// How long a fetch may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS document larger than this is refused.
const MAX_DOCUMENT: usize = 1 << 20;

/// The keys of one `jwks_url`.
pub struct JwksKeys {
    url: Uri,
    client: HttpClient,
    keys: ArcSwap<Vec<JwtKey>>,
    /// When the last refetch for an unknown kid started.
    last_on_demand: Mutex<Option<Instant>>,
    /// Serializes fetches so that concurrent misses share one.
    fetching: tokio::sync::Mutex<()>,
    /// Set, and its waiters told, when the first fetch has ended.
    first_done: AtomicBool,
    first_done_told: tokio::sync::Notify,
}

impl std::fmt::Debug for JwksKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "JwksKeys({})", shown(&self.url))
    }
}

/// The URL as logs show it: never its userinfo or query, which may carry
/// a token.
pub(crate) fn shown(url: &Uri) -> String {
    // Parsed already, the URL's parts are known apart: its host and path
    // show whatever its userinfo and query hold.
    let Some(authority) = url.authority() else {
        return crate::upstream::without_secrets(&url.to_string());
    };
    let userinfo = if authority.as_str().contains('@') {
        "…@"
    } else {
        ""
    };
    let port = authority
        .port()
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let query = if url.query().is_some() { "?…" } else { "" };
    format!(
        "{}://{userinfo}{}{port}{}{query}",
        url.scheme_str().unwrap_or("http"),
        authority.host(),
        url.path()
    )
}

impl JwksKeys {
    pub fn new(url: Uri, client: HttpClient) -> Arc<Self> {
        Arc::new(JwksKeys {
            url,
            client,
            keys: ArcSwap::from_pointee(Vec::new()),
            last_on_demand: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            first_done: AtomicBool::new(false),
            first_done_told: tokio::sync::Notify::new(),
        })
    }

    /// Returns once the first fetch has ended, with keys or without.
    pub async fn first_fetch_done(&self) {
        // Created before the flag is read: a notice sent in between is
        // not lost.
        let told = self.first_done_told.notified();
        if self.first_done.load(Ordering::Acquire) {
            return;
        }
        told.await;
    }

    pub fn url(&self) -> &Uri {
        &self.url
    }

    /// The keys known now.
    pub fn current(&self) -> Arc<Vec<JwtKey>> {
        self.keys.load_full()
    }

    /// Fetches now unless another fetch is running (then waits for it).
    pub async fn refresh(&self) {
        // The address of the key list identifies a fetch's result.
        let seen = Arc::as_ptr(&self.keys.load()) as usize;
        let _guard = self.fetching.lock().await;
        if Arc::as_ptr(&self.keys.load()) as usize != seen {
            return; // someone else just fetched
        }
        match tokio::time::timeout(FETCH_TIMEOUT, self.fetch()).await {
            Ok(Ok(keys)) => {
                tracing::info!(url = %shown(&self.url), keys = keys.len(), "JWKS fetched");
                self.keys.store(Arc::new(keys));
            }
            Ok(Err(e)) => tracing::warn!(url = %shown(&self.url), error = %e, "JWKS fetch failed"),
            Err(_) => tracing::warn!(url = %shown(&self.url), "JWKS fetch timed out"),
        }
    }

    /// A refetch for an unknown kid, unless one ran within the floor.
    /// Returns whether a refetch happened.
    pub async fn refresh_for_unknown_kid(&self) -> bool {
        {
            let Ok(mut last) = self.last_on_demand.lock() else {
                return false;
            };
            if last.is_some_and(|t| t.elapsed() < REFETCH_FLOOR) {
                return false;
            }
            *last = Some(Instant::now());
        }
        self.refresh().await;
        true
    }

    async fn fetch(&self) -> Result<Vec<JwtKey>, String> {
        let req = Request::get(self.url.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(body::empty())
            .map_err(|e| e.to_string())?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|_| "the issuer could not be reached".to_owned())?;
        if !resp.status().is_success() {
            return Err(format!("the issuer answered {}", resp.status()));
        }
        let bytes = Limited::new(resp.into_body(), MAX_DOCUMENT)
            .collect()
            .await
            .map_err(|_| "the JWKS document could not be read (or is over 1 MiB)".to_owned())?
            .to_bytes();
        keys_of(&bytes)
    }

    /// Fetches now and then every [`REFRESH_EVERY`] while the keys are in
    /// use; while no fetch has found keys yet (the issuer was down when
    /// sluice started), again after 1 s, 2 s, 4 s… up to
    /// [`REFETCH_FLOOR`], so that tokens verify soon after it is back.
    pub fn spawn_refresher(self: &Arc<Self>) {
        let weak: Weak<Self> = Arc::downgrade(self);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let mut retry = Duration::from_secs(1);
                loop {
                    let Some(keys) = weak.upgrade() else { return };
                    keys.refresh().await;
                    if !keys.first_done.swap(true, Ordering::AcqRel) {
                        keys.first_done_told.notify_waiters();
                    }
                    let wait = if keys.current().is_empty() {
                        let wait = retry;
                        retry = (retry * 2).min(REFETCH_FLOOR);
                        wait
                    } else {
                        REFRESH_EVERY
                    };
                    drop(keys);
                    tokio::time::sleep(wait).await;
                }
            });
        }
    }
}

/// A JWKS document's `keys`, each entry read on its own.
#[derive(serde::Deserialize)]
struct Entries<'a> {
    #[serde(borrow)]
    keys: Vec<&'a serde_json::value::RawValue>,
}

/// The keys of a JWKS document. A document that is not one is reported
/// without quoting it: an issuer, or a proxy before it, may answer with
/// an error that reflects the request URL, token and all.
fn keys_of(bytes: &[u8]) -> Result<Vec<JwtKey>, String> {
    let set: Entries = serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "not a JWKS document: it {}",
            crate::config::json_problem(&e)
        )
    })?;
    // Keys this crate cannot read or use (other key types, a member of
    // an unexpected type) are skipped, not fatal: issuers publish several
    // kinds, and RFC 7517 §5 has such JWKs ignored, so that one odd entry
    // does not hold back the rotation published beside it.
    let keys: Vec<JwtKey> = set
        .keys
        .iter()
        .filter_map(|entry| serde_json::from_str::<Jwk>(entry.get()).ok())
        .filter_map(|jwk| JwtKey::from_jwk(&jwk).ok().flatten())
        .collect();
    // An issuer (or a proxy before it) answering an empty set for a
    // moment must not take away the keys every valid token needs.
    if keys.is_empty() {
        return Err("the JWKS document holds no key that can verify signatures".to_owned());
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_that_is_not_a_jwks_is_reported_without_quoting_it() {
        for doc in [
            r#"{"keys": "no such page: /jwks.json?access_token=T0KEN"}"#,
            r#"{"keys": [], "error": "T0KEN""#,
            "<html>T0KEN</html>",
        ] {
            let error = keys_of(doc.as_bytes()).err().unwrap_or_default();
            assert!(error.starts_with("not a JWKS document: it "), "{error}");
            assert!(!error.contains("T0KEN"), "{error}");
        }
    }

    #[test]
    fn keys_for_encryption_verify_nothing() {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let signing =
            jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        let mut jwk =
            jsonwebtoken::jwk::Jwk::from_encoding_key(&signing, jsonwebtoken::Algorithm::ES256)
                .unwrap();
        let signs = serde_json::json!({ "keys": [jwk.clone()] }).to_string();
        assert_eq!(keys_of(signs.as_bytes()).map(|k| k.len()), Ok(1));
        jwk.common.public_key_use = Some(jsonwebtoken::jwk::PublicKeyUse::Encryption);
        let encrypts = serde_json::json!({ "keys": [jwk] }).to_string();
        let error = keys_of(encrypts.as_bytes()).err().unwrap_or_default();
        assert!(error.contains("no key that can verify"), "{error}");
    }

    /// One entry that is no JWK this crate reads (a member of another
    /// type, not an object at all) is skipped: the keys beside it still
    /// verify tokens.
    #[test]
    fn an_unreadable_entry_leaves_the_others_in_use() {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let signing =
            jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap();
        let jwk =
            jsonwebtoken::jwk::Jwk::from_encoding_key(&signing, jsonwebtoken::Algorithm::ES256)
                .unwrap();
        let mut odd = serde_json::to_value(&jwk).unwrap();
        odd["x5c"] = serde_json::json!("abc");
        odd["kid"] = serde_json::json!(7);
        let doc = serde_json::json!({ "keys": [odd, 123, null, jwk] }).to_string();
        assert_eq!(keys_of(doc.as_bytes()).map(|k| k.len()), Ok(1));
        let none = serde_json::json!({ "keys": [123] }).to_string();
        let error = keys_of(none.as_bytes()).err().unwrap_or_default();
        assert!(error.contains("no key that can verify"), "{error}");
    }

    #[test]
    fn logged_urls_lose_userinfo_and_query() {
        for (url, logged) in [
            (
                "https://user:pw@login.example.com:8443/keys.json",
                "https://…@login.example.com:8443/keys.json",
            ),
            (
                "https://login.example.com/keys.json?token=t0k",
                "https://login.example.com/keys.json?…",
            ),
            // Userinfo and a query both: the host still shows.
            (
                "http://u:p@idp.example.com/jwks?x=1",
                "http://…@idp.example.com/jwks?…",
            ),
        ] {
            assert_eq!(shown(&url.parse().unwrap()), logged);
        }
    }
}
