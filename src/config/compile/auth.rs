//! `auth` and `tiers`: API keys, JWT settings and the tiers identities
//! are given.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use serde_saphyr::{Location, Spanned};

use crate::config::raw::*;
use crate::proxy::jwt;
use crate::snapshot::*;
use crate::upstream::{self};

use super::Compiler;

/// The tier of identities without one when `auth.default_tier` is not
/// set, if the config defines it.
const DEFAULT_TIER: &str = "free";

impl Compiler<'_> {
    pub(super) fn tiers(
        &mut self,
        raw: &BTreeMap<String, Spanned<RawTier>>,
    ) -> HashMap<Arc<str>, Tier> {
        raw.iter()
            .map(|(name, spanned)| {
                self.check_name("tier name", name, &spanned.referenced);
                if name == crate::telemetry::metrics::UNNAMED {
                    self.error(
                        &spanned.referenced,
                        "tier name `none` is reserved: the metrics label identities without a tier `tier=\"none\"`",
                    );
                }
                let t = &spanned.value;
                let tier = Tier {
                    requests_per_minute: self.opt_limit(&t.requests_per_minute),
                    tokens_per_minute: self.opt_limit(&t.tokens_per_minute),
                    concurrent_requests: self.opt_limit(&t.concurrent_requests),
                    daily_budget_usd: self.budget_usd(&t.daily_budget_usd, "daily_budget_usd"),
                };
                (Arc::from(name.as_str()), tier)
            })
            .collect()
    }

    pub(super) fn auth(
        &mut self,
        raw: Option<&RawAuth>,
        tiers: &HashMap<Arc<str>, Tier>,
        route_names: &HashSet<&str>,
    ) -> Auth {
        let Some(raw) = raw else {
            return Auth {
                default_tier: tiers.get_key_value(DEFAULT_TIER).map(|(k, _)| k.clone()),
                anonymous_tier: Arc::from("anonymous"),
                ..Auth::default()
            };
        };
        let tier_ref = |me: &mut Self, t: &Text| -> Option<Arc<str>> {
            let name = me.text(t)?;
            match tiers.get_key_value(name.as_str()) {
                Some((k, _)) => Some(k.clone()),
                None => {
                    me.error(
                        &t.referenced,
                        format!("no tier named `{name}` under `tiers`"),
                    );
                    None
                }
            }
        };
        let default_tier = match &raw.default_tier {
            Some(t) => tier_ref(self, t),
            None => tiers.get_key_value(DEFAULT_TIER).map(|(k, _)| k.clone()),
        };
        let mut api_keys = HashMap::with_capacity(raw.api_keys.len());
        let mut ids = HashSet::new();
        for spanned in &raw.api_keys {
            let k = &spanned.value;
            let Some(written_id) = self.required(&k.id, &spanned.referenced, "id") else {
                continue;
            };
            let Some(id) = self.text(written_id) else {
                continue;
            };
            self.check_name("api key id", &id, &written_id.referenced);
            if !ids.insert(id.clone()) {
                self.error(
                    &written_id.referenced,
                    format!("api key id `{id}` is used twice"),
                );
            }
            let digest = match (&k.key, &k.hash) {
                // Trimmed as a presented key is: a key read from a file
                // (a Kubernetes Secret made from one) often ends in a
                // newline no client sends.
                (Some(key), None) => match self.text(key).map(|k| k.trim_ascii().to_owned()) {
                    Some(key) if key.is_empty() => {
                        self.error(&key_loc(&k.key), format!("api key `{id}` is empty"));
                        None
                    }
                    // A client sends its key in a header, which cannot
                    // carry these: such a key would match no request.
                    Some(key) if key.chars().any(char::is_control) => {
                        self.error(
                            &key_loc(&k.key),
                            format!("api key `{id}` holds a control character (a newline?), which no header can carry"),
                        );
                        None
                    }
                    Some(key) => {
                        let digest = crate::proxy::auth::digest(key.as_bytes());
                        self.secrets_written.push(key.clone());
                        Some(digest)
                    }
                    None => None,
                },
                (None, Some(hash)) => self.parsed(hash, |s| {
                    crate::proxy::auth::parse_hash(s).ok_or_else(|| {
                        format!("api key `{id}`: hash must be `sha256:` and 64 hex digits (see `sluice hash-key`)")
                    })
                }),
                (Some(_), Some(_)) => {
                    self.error(&spanned.referenced, format!("api key `{id}` has both `key` and `hash`"));
                    None
                }
                (None, None) => {
                    self.error(&spanned.referenced, format!("api key `{id}` needs a `key` or a `hash`"));
                    None
                }
            };
            let tier = k.tier.as_ref().and_then(|t| tier_ref(self, t));
            let routes = k.routes.as_ref().map(|list| {
                list.iter()
                    .filter_map(|t| {
                        let r = self.text(t)?;
                        if !route_names.contains(r.as_str()) {
                            self.error(
                                &t.referenced,
                                format!("api key `{id}`: no route named `{r}`"),
                            );
                        }
                        Some(Arc::from(r))
                    })
                    .collect()
            });
            if let Some(digest) = digest {
                let entry = Arc::new(ApiKey {
                    id: Arc::from(id.as_str()),
                    tier,
                    routes,
                });
                if api_keys.insert(digest, entry).is_some() {
                    self.error(
                        &spanned.referenced,
                        format!("api key `{id}` repeats another key"),
                    );
                }
            }
        }
        let jwt = raw.jwt.as_ref().and_then(|j| self.jwt(j));
        Auth {
            api_keys,
            jwt,
            default_tier,
            anonymous_tier: Arc::from("anonymous"),
        }
    }

    /// Warns of a tier nothing gives whose name is a near miss of one
    /// that callers get (`anonymus`, or `fre` for the implicit default
    /// `free`): misspelt, it would leave the callers it was meant for
    /// unlimited without a word (SPEC §2: typos must not silently disable
    /// a limit). A tier merely unused (kept ready for keys to come) is
    /// fine; and when JWTs name tiers (`tier_claim`), any may be given.
    pub(super) fn check_tiers_given(&mut self, raw: &RawConfig, auth: &Auth) {
        let from_tokens = raw
            .auth
            .as_ref()
            .and_then(|a| a.jwt.as_ref())
            .is_some_and(|j| j.value.tier_claim.is_some());
        if from_tokens {
            return;
        }
        let given: HashSet<&str> = auth
            .api_keys
            .values()
            .filter_map(|k| k.tier.as_deref())
            .chain(auth.default_tier.as_deref())
            .chain([&*auth.anonymous_tier])
            .collect();
        for (name, tier) in &raw.tiers {
            if given.contains(name.as_str()) {
                continue;
            }
            let Some(meant) = given.iter().copied().chain([DEFAULT_TIER]).find(|g| {
                crate::config::recover::is_near_miss(name, g) && !raw.tiers.contains_key(*g)
            }) else {
                continue;
            };
            self.warning(
                &tier.referenced,
                format!(
                    "tier `{name}` is given to no one (no api key names it, and it is not default_tier or `anonymous`): did you mean `{meant}`?"
                ),
            );
        }
    }

    pub(super) fn jwt(&mut self, spanned: &Spanned<RawJwt>) -> Option<Jwt> {
        const ALGORITHMS: [&str; 12] = [
            "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
            "ES256", "ES384", "EdDSA",
        ];
        let j = &spanned.value;
        let sources = [&j.jwks_url, &j.keys_file, &j.hs256_secret]
            .iter()
            .filter(|s| s.is_some())
            .count();
        if sources != 1 {
            self.error(
                &spanned.referenced,
                "jwt needs exactly one of jwks_url, keys_file, hs256_secret",
            );
            return None;
        }
        let mut jwks = None;
        let mut hmac = false;
        let keys = if let Some(u) = &j.jwks_url {
            let url = self.text(u)?;
            let parsed = url
                .parse::<http::Uri>()
                .ok()
                .filter(|uri| uri.host().is_some());
            let client = match parsed.as_ref().and_then(http::Uri::scheme_str) {
                Some("https") => upstream::client::build_tls(None, Duration::from_secs(5)).ok(),
                Some("http") => Some(upstream::client::build_plain(Duration::from_secs(5))),
                _ => None,
            };
            match (parsed, client) {
                (Some(url), Some(client)) => jwks = Some(JwksSource { url, client }),
                _ => self.error(&u.referenced, "jwks_url must be an http:// or https:// URL"),
            }
            Vec::new()
        } else if let Some(f) = &j.keys_file {
            let path = self.source(f)?;
            let loaded = crate::config::read_text(&path)
                .map_err(|e| format!("cannot read keys_file {}: {e}", path.display()))
                .and_then(|text| jwt::load_keys_file(&text));
            match loaded {
                Ok(keys) => keys,
                Err(e) => {
                    self.error(&f.referenced, e);
                    return None;
                }
            }
        } else {
            let secret = j.hs256_secret.as_ref()?;
            let text = self.text(secret)?;
            if text.is_empty() {
                // An empty key would let anyone sign tokens.
                self.error(&secret.referenced, "hs256_secret must not be empty");
            } else if text.len() < 32 {
                // RFC 7518 §3.2 wants 256 bits; Envoy and the JWT
                // libraries accept shorter, and so does sluice, loudly.
                // The value is a secret: the message never repeats it.
                self.warning(
                    &secret.referenced,
                    "hs256_secret is shorter than 32 bytes (RFC 7518 asks for 256 bits): tokens signed with it are easier to forge",
                );
            }
            hmac = true;
            let key =
                jwt::JwtKey::any_algorithm(jsonwebtoken::DecodingKey::from_secret(text.as_bytes()));
            self.secrets_written.push(text);
            vec![key]
        };
        if j.algorithms.as_ref().is_some_and(Vec::is_empty) {
            self.error(
                &spanned.referenced,
                "jwt: algorithms is empty, so no token could be accepted; list them, or leave algorithms out for the default",
            );
        }
        let mut algorithms = Vec::new();
        for a in j.algorithms.iter().flatten() {
            let Some(alg) = self.parsed(a, |s| {
                s.parse::<jsonwebtoken::Algorithm>()
                    .ok()
                    .filter(|alg| ALGORITHMS.contains(&s) && format!("{alg:?}") == s)
                    .ok_or_else(|| format!("`{s}` is not one of: {}", ALGORITHMS.join(", ")))
            }) else {
                continue;
            };
            let is_hmac = alg.family() == jsonwebtoken::AlgorithmFamily::Hmac;
            if is_hmac != hmac {
                self.error(
                    &a.referenced,
                    if hmac {
                        format!("{alg:?} needs a public key (keys_file or jwks_url), not hs256_secret")
                    } else {
                        format!("{alg:?} needs hs256_secret; a public key is never used as an HMAC secret")
                    },
                );
                continue;
            }
            algorithms.push(alg);
        }
        if j.algorithms.is_none() {
            algorithms.push(if hmac {
                jsonwebtoken::Algorithm::HS256
            } else {
                jsonwebtoken::Algorithm::RS256
            });
        }
        // Keys that no allowed algorithm uses (an EC key under the default
        // RS256) would refuse every token, with `check` saying it was ok.
        if let Some(f) = &j.keys_file
            && !keys.is_empty()
            && !algorithms.is_empty()
            && !keys.iter().any(|k| {
                algorithms.iter().any(|alg| {
                    alg.family() == k.key.family() && k.alg.is_none_or(|tied| tied == *alg)
                })
            })
        {
            let mut families: Vec<&str> = keys
                .iter()
                .map(|k| match k.key.family() {
                    jsonwebtoken::AlgorithmFamily::Rsa => "RSA",
                    jsonwebtoken::AlgorithmFamily::Ec => "EC",
                    jsonwebtoken::AlgorithmFamily::Ed => "Ed25519",
                    jsonwebtoken::AlgorithmFamily::Hmac => "HMAC",
                })
                .collect();
            families.sort_unstable();
            families.dedup();
            let allowed: Vec<String> = algorithms.iter().map(|a| format!("{a:?}")).collect();
            self.error(
                &f.referenced,
                format!(
                    "keys_file holds no key for the allowed algorithms ({}): its keys are {}; list their algorithms in jwt.algorithms (e.g. ES256 for EC P-256, EdDSA for Ed25519)",
                    allowed.join(", "),
                    families.join(", ")
                ),
            );
        }
        let issuer = j.issuer.as_ref().and_then(|t| self.text(t));
        let audiences: Vec<String> = j.audiences.iter().filter_map(|t| self.text(t)).collect();
        let mut claim = |written: &Option<Text>, key: &str| {
            let written = written.as_ref()?;
            let name = self.text(written)?;
            if name.trim().is_empty() {
                self.error(
                    &written.referenced,
                    format!("{key} is empty: name the token claim to read"),
                );
                return None;
            }
            Some(name)
        };
        let identity_claim =
            claim(&j.identity_claim, "identity_claim").unwrap_or_else(|| "sub".to_owned());
        let tier_claim = claim(&j.tier_claim, "tier_claim");
        Some(Jwt {
            verifier: jwt::JwtVerifier::new(
                keys,
                &algorithms,
                issuer.as_deref(),
                &audiences,
                identity_claim,
                tier_claim,
            ),
            jwks,
        })
    }
}

fn key_loc(t: &Option<Text>) -> Location {
    t.as_ref()
        .map(|t| t.referenced)
        .unwrap_or(Location::UNKNOWN)
}
