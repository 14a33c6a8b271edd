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
        // As written first: a secret may hold an escape of its own
        // (`sig=Ab%2BC`), which decoding would take apart.
        let mut raw = text.to_owned();
        mask_presented(&mut raw, presented);
        body_log::mask_known(&mut raw, &self.known);
        let mut decoded = percent_encoding::percent_decode_str(&raw)
            .decode_utf8_lossy()
            .into_owned();
        mask_presented(&mut decoded, presented);
        // Bounded as a logged body is (a path or an id of 60 KB is read
        // no further than 4 KiB), and masked as one.
        let masked = body_log::BodyLog::of(decoded.as_bytes()).render(&self.known);
        if masked == percent_encoding::percent_decode_str(text).decode_utf8_lossy() {
            Cow::Borrowed(text)
        } else {
            Cow::Owned(masked)
        }
    }
}

fn mask_presented(text: &mut String, presented: &Presented) {
    for credential in presented.credentials() {
        body_log::mask_secret(text, credential);
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
        // A secret with an escape of its own, as written.
        let scrub = scrub_with(&["sig=AbCd%2BEf%3D123456"]);
        assert_eq!(scrub.scrub("/x/sig=AbCd%2BEf%3D123456", &none), "/x/***");
        // A long text is read, and logged, no further than a body is.
        let long = format!("/a/{}", "ask-".repeat(16 * 1024));
        let logged = scrub_with(&[]).scrub(&long, &none).into_owned();
        assert!(
            logged == long || logged.len() <= body_log::LIMIT,
            "{}",
            logged.len()
        );
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
        // Two in one header, comma-separated.
        let mut joined = http::HeaderMap::new();
        joined.insert(
            "authorization",
            "Bearer first-cred-000000, Bearer second-cred-1111"
                .parse()
                .unwrap(),
        );
        let presented = Presented::of(&joined);
        assert_eq!(
            scrub.scrub("/a/second-cred-1111/first-cred-000000", &presented),
            "/a/***/***"
        );
    }
}
