//! Debug body logging (`logging.log_bodies`, SPEC §3): the first 4 KiB of
//! a request or response body, with credentials masked, for the access
//! log. A response is copied as it passes (the bytes already in memory,
//! never more than the limit), so a stream is neither held nor slowed.

/// The most of a body that is logged.
pub const LIMIT: usize = 4096;

const MASK: &str = "***";

/// JSON field names whose string values are never logged, matched as
/// lower-cased substrings of the name (`client_secret`, `apiKey`…).
const SECRET_FIELDS: [&str; 7] = [
    "api_key",
    "apikey",
    "api-key",
    "password",
    "secret",
    "authorization",
    "token",
];

/// The first [`LIMIT`] bytes of a body as it goes by.
#[derive(Debug, Default)]
pub struct BodyLog {
    head: Vec<u8>,
    total: usize,
}

impl BodyLog {
    pub fn push(&mut self, data: &[u8]) {
        self.total += data.len();
        let room = LIMIT.saturating_sub(self.head.len());
        self.head.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// The logged text: masked, and marked when cut short.
    pub fn render(&self) -> String {
        let mut text = mask(&String::from_utf8_lossy(&self.head));
        if self.total > self.head.len() {
            text.push_str(&format!("… [{} bytes in all]", self.total));
        }
        text
    }
}

/// A body's text with credentials masked: the string values of secret
/// JSON fields (also in a body cut short mid-value), bearer tokens and
/// `sk-` style keys anywhere.
pub fn mask(text: &str) -> String {
    mask_patterns(&mask_fields(text))
}

fn mask_fields(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'"' {
            i += 1;
            continue;
        }
        let key_end = string_end(bytes, i);
        let Some(key_end) = key_end else { break };
        let key = &text[i + 1..key_end];
        let mut j = skip_space(bytes, key_end + 1);
        let is_key = bytes.get(j) == Some(&b':');
        if !is_key {
            i = key_end + 1;
            continue;
        }
        j = skip_space(bytes, j + 1);
        let lower = key.to_ascii_lowercase();
        if bytes.get(j) == Some(&b'"') && SECRET_FIELDS.iter().any(|f| lower.contains(f)) {
            out.push_str(&text[copied..=j]);
            out.push_str(MASK);
            match string_end(bytes, j) {
                Some(value_end) => {
                    copied = value_end;
                    i = value_end + 1;
                }
                None => {
                    // Cut short inside the secret: nothing more of it shows.
                    return out;
                }
            }
        } else {
            i = j;
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// The index of the quote closing the string that opens at `start`.
fn string_end(bytes: &[u8], start: usize) -> Option<usize> {
    let mut escaped = false;
    for (offset, &b) in bytes.get(start + 1..)?.iter().enumerate() {
        match (escaped, b) {
            (true, _) => escaped = false,
            (false, b'\\') => escaped = true,
            (false, b'"') => return Some(start + 1 + offset),
            _ => {}
        }
    }
    None
}

fn skip_space(bytes: &[u8], mut i: usize) -> usize {
    while bytes.get(i).is_some_and(u8::is_ascii_whitespace) {
        i += 1;
    }
    i
}

/// Masks what follows `Bearer ` and `sk-` (eight or more key characters).
fn mask_patterns(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let bearer = find_ignore_case(rest, "bearer ");
        let key = rest.find("sk-");
        let (at, prefix_len, min) = match (bearer, key) {
            (Some(b), Some(k)) if k < b => (k, 3, 8),
            (Some(b), _) => (b, 7, 1),
            (None, Some(k)) => (k, 3, 8),
            (None, None) => break,
        };
        let after = &rest[at + prefix_len..];
        let token_len = after
            .bytes()
            .take_while(|b| {
                b.is_ascii_alphanumeric()
                    || matches!(b, b'-' | b'_' | b'.' | b'~' | b'+' | b'/' | b'=')
            })
            .count();
        out.push_str(&rest[..at + prefix_len]);
        if token_len >= min {
            out.push_str(MASK);
        } else {
            out.push_str(&after[..token_len]);
        }
        rest = &after[token_len..];
    }
    out.push_str(rest);
    out
}

fn find_ignore_case(haystack: &str, needle: &str) -> Option<usize> {
    haystack
        .as_bytes()
        .windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_fields_are_masked() {
        let body = r#"{"model":"m","api_key":"abc123","nested":{"client_secret" : "s3cr\"et","password":"pw"},"n":1}"#;
        assert_eq!(
            mask(body),
            r#"{"model":"m","api_key":"***","nested":{"client_secret" : "***","password":"***"},"n":1}"#
        );
    }

    #[test]
    fn a_secret_cut_short_is_hidden() {
        assert_eq!(
            mask(r#"{"a":"b","token":"abcdef"#),
            r#"{"a":"b","token":"***"#
        );
    }

    #[test]
    fn bearer_tokens_and_keys_are_masked_anywhere() {
        assert_eq!(
            mask("auth was Bearer eyJhbGciOi.x-y_z and key sk-proj-ABCDEFGH12 end"),
            "auth was Bearer *** and key sk-*** end"
        );
        assert_eq!(mask("ask-me and sk-short"), "ask-me and sk-short");
        assert_eq!(
            mask(r#"{"content":"bearer 123"}"#),
            r#"{"content":"bearer ***"}"#
        );
    }

    #[test]
    fn long_bodies_are_cut_at_the_limit() {
        let mut log = BodyLog::default();
        log.push(&[b'a'; 3000]);
        log.push(&[b'b'; 3000]);
        let text = log.render();
        assert!(text.starts_with(&"a".repeat(3000)));
        assert!(text.ends_with("… [6000 bytes in all]"), "{}", &text[4000..]);
        assert_eq!(text.matches('b').count(), LIMIT - 3000 + 1);
    }
}
