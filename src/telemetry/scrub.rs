//! Masking the text a client chose (the path, its `x-request-id`, the
//! model it asked for) before the access log writes it: the secrets the
//! config knows and credentials by their look (SPEC: secrets never appear
//! in logs), checked with one pass over the text.

use std::borrow::Cow;

use aho_corasick::AhoCorasick;

use super::body_log;
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

    /// `text`, with what looks like a secret masked.
    pub fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        // A searcher that could not be built (never for these needles)
        // leaves every text to the exact masking.
        if self.suspect.as_ref().is_some_and(|s| !s.is_match(text)) {
            return Cow::Borrowed(text);
        }
        let mut masked = text.to_owned();
        body_log::mask_known(&mut masked, &self.known);
        let masked = body_log::mask(&masked);
        if masked == text {
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
        for text in [
            "/v1/chat/completions",
            "gpt-4o-mini",
            "3f2a9c1e-0b7d-4e55-9a61-2c4d8e0f1a2b",
        ] {
            assert!(matches!(scrub.scrub(text), Cow::Borrowed(_)), "{text}");
        }
    }

    #[test]
    fn known_secrets_and_credential_looks_are_masked() {
        let scrub = scrub_with(&["tk-team-0801abcdef", "a/b+c=secret-value"]);
        assert_eq!(
            scrub.scrub("/v1/models/tk-team-0801abcdef"),
            "/v1/models/***"
        );
        // As a client percent-encodes it, in either case of hex.
        assert_eq!(scrub.scrub("/x/a%2fb%2Bc%3Dsecret-value/y"), "/x/***/y");
        assert_eq!(scrub.scrub("/open/sk-unknown-0123456789"), "/open/sk-***");
        assert_eq!(scrub.scrub("eyJhbGciOiJIUzI1NiJ9.e30.sig"), "eyJ***");
    }
}
