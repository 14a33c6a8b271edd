//! Masking the text a client chose (the path, its `x-request-id`, the
//! model it asked for) before the access log writes it: the secrets the
//! config knows and credentials by their look (SPEC: secrets never appear
//! in logs), checked with one pass over the text.

use std::borrow::Cow;

use aho_corasick::AhoCorasick;

use super::body_log;
use crate::proxy::ctx::Presented;
use crate::snapshot::KnownSecrets;

/// What every text is checked for besides the known secrets: the
/// prefixes [`body_log::mask`] masks a credential after.
const LOOKS: [&str; 4] = ["bearer ", "basic ", "sk-", "eyJ"];

/// The config's secrets, and a searcher that tells at once whether a text
/// may hold one of them or a credential-looking token.
#[derive(Clone)]
pub struct Scrub {
    known: Vec<String>,
    /// Any of `known` or [`LOOKS`], in any case: a hit only means the
    /// text is masked the slow, exact way.
    suspect: Option<AhoCorasick>,
}

impl Scrub {
    pub fn new(known: &KnownSecrets) -> Self {
        let needles = known.0.iter().map(String::as_str).chain(LOOKS);
        let suspect = AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(needles)
            .ok();
        Scrub {
            known: known.0.clone(),
            suspect,
        }
    }

    /// `text`, with what looks like a secret masked: the config's, the
    /// request's own credentials (`presented`), and credential looks,
    /// also when percent-encoded (then the text is logged decoded).
    pub fn scrub<'a>(&self, text: &'a str, presented: &Presented) -> Cow<'a, str> {
        // A searcher that could not be built (never for these needles)
        // leaves every text to the exact masking.
        let plain = !text.contains('%')
            && self.suspect.as_ref().is_some_and(|s| !s.is_match(text))
            && presented
                .credentials()
                .all(|c| memchr::memmem::find(text.as_bytes(), c.as_bytes()).is_none());
        if plain {
            return Cow::Borrowed(text);
        }
        let decoded = percent_encoding::percent_decode_str(text).decode_utf8_lossy();
        let mut masked = decoded.to_string();
        for credential in presented.credentials() {
            if masked.contains(credential) {
                masked = masked.replace(credential, body_log::MASK);
            }
        }
        body_log::mask_known(&mut masked, &self.known);
        let masked = body_log::mask(&masked);
        if masked == decoded {
            Cow::Borrowed(text)
        } else {
            Cow::Owned(masked)
        }
    }
}

impl Default for Scrub {
    fn default() -> Self {
        Scrub::new(&KnownSecrets::default())
    }
}

impl std::fmt::Debug for Scrub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} redacted>", self.known.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrub_with(secrets: &[&str]) -> Scrub {
        let mut known = KnownSecrets::default();
        for s in secrets {
            known.add(s);
        }
        known.sort();
        Scrub::new(&known)
    }

    #[test]
    fn ordinary_text_is_left_as_it_is() {
        let scrub = scrub_with(&["tk-team-0801abcdef"]);
        let none = Presented::default();
        for text in [
            "/v1/chat/completions",
            "gpt-4o-mini",
            "3f2a9c1e-0b7d-4e55-9a61-2c4d8e0f1a2b",
            "/open/tasks/task-management-0123456789",
        ] {
            assert!(
                matches!(scrub.scrub(text, &none), Cow::Borrowed(_)),
                "{text}"
            );
        }
        // An escape with nothing behind it keeps the path as it came.
        assert!(matches!(
            scrub.scrub("/files/a%20b", &none),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn known_secrets_and_credential_looks_are_masked() {
        let scrub = scrub_with(&["tk-team-0801abcdef", "a/b+c=secret-value"]);
        let none = Presented::default();
        let masked = |text| scrub.scrub(text, &none).into_owned();
        assert_eq!(masked("/v1/models/tk-team-0801abcdef"), "/v1/models/***");
        // Percent-encoded, in either case of hex, whole or in part.
        assert_eq!(masked("/x/a%2fb%2Bc%3Dsecret-value/y"), "/x/***/y");
        assert_eq!(masked("/x/a/b+c%3Dsecret-value/y"), "/x/***/y");
        assert_eq!(masked("/x/tk-%74eam-0801abcdef"), "/x/***");
        assert_eq!(masked("/open/sk-unknown-0123456789"), "/open/sk-***");
        assert_eq!(masked("/open/sk%2Dunknown-0123456789/y"), "/open/sk-***/y");
        assert_eq!(masked("/open/Bearer%20abcdefgh1234"), "/open/Bearer ***");
        assert_eq!(masked("eyJhbGciOiJIUzI1NiJ9.e30.sig"), "eyJ***");
    }

    #[test]
    fn the_requests_own_credentials_are_masked() {
        let mut headers = http::HeaderMap::new();
        headers.insert("authorization", "Bearer hashed-plain-0123".parse().unwrap());
        headers.insert("x-api-key", "other-key-98765".parse().unwrap());
        let presented = Presented::of(&headers);
        let scrub = scrub_with(&[]);
        assert_eq!(
            scrub.scrub("/a/hashed-plain-0123/b", &presented),
            "/a/***/b"
        );
        assert_eq!(scrub.scrub("other-key-98765", &presented), "***");
        assert_eq!(scrub.scrub("/a/hashed%2Dplain-0123", &presented), "/a/***");
    }
}
