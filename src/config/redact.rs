//! Config errors repeat what the file says, except what may be a secret:
//! a word that is not a near miss of what was expected (an API key pasted
//! where a key name or a setting belongs) and the password of a URL.
//! `check` prints these errors and `run` logs them.

use super::recover::is_near_miss;

/// `message` without the parts of the file that could be secrets.
pub fn message(message: String) -> String {
    let message = without_url_passwords(message);
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some((word, expected)) = rest.split_once('`')
        && !shown_as_written(word, expected_names(expected))
    {
        return format!("unknown key (not repeated here: it could be a secret){expected}");
    }
    if let Some(rest) = message.strip_prefix('`')
        && let Some((word, options)) = rest.split_once("` is not one of: ")
        && !shown_as_written(word, options.split(", "))
    {
        return format!(
            "not one of: {options} (the value is not repeated here: it could be a secret)"
        );
    }
    message
}

/// Whether `word` is shown: a near miss of an expected name, a short
/// word of lower-case letters (`teir`), or words of them joined by `_`
/// (`concurrent_requests`, a key of another section) or in camel case
/// (`apiVersion`, `maxTokens`: a Kubernetes or JavaScript habit), which
/// no key or password is, or a value quoted as written (`${TOKEN}`: the
/// variable's name).
fn shown_as_written<'a>(word: &str, mut expected: impl Iterator<Item = &'a str>) -> bool {
    if word.starts_with("${") {
        return true;
    }
    let lower = |b: u8| b.is_ascii_lowercase() || b == b'_' || b == b'-';
    if word.len() <= 16 && word.bytes().all(lower) {
        return true;
    }
    let snake_words = word.len() <= 40
        && word.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
        && word.split('_').all(|w| (2..=16).contains(&w.len()));
    if snake_words {
        return true;
    }
    // Each capital starts a word of two or more lower-case letters.
    let camel_words = word.len() <= 32
        && word.bytes().all(|b| b.is_ascii_alphabetic())
        && word
            .split(|c: char| c.is_ascii_uppercase())
            .all(|w| (2..=16).contains(&w.len()));
    if camel_words {
        return true;
    }
    let word = word.to_ascii_lowercase();
    expected.any(|name| is_near_miss(&word, &name.to_ascii_lowercase()))
}

/// The names in ", expected one of a, b" (serde quotes them in
/// backticks, the YAML parser does not).
fn expected_names(text: &str) -> impl Iterator<Item = &str> {
    let names = text
        .split_once("expected one of ")
        .or_else(|| text.split_once("expected "))
        .map_or("", |(_, names)| names);
    names
        .split(", ")
        .map(|name| name.trim_matches('`'))
        .filter(|name| !name.is_empty())
}

/// Each `scheme://user:password@host` with its user information replaced.
fn without_url_passwords(message: String) -> String {
    if !message.contains("://") {
        return message;
    }
    let mut out = String::with_capacity(message.len());
    let mut rest = message.as_str();
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        let end = after
            .find(|c: char| matches!(c, '/' | '?' | '#' | '`' | '"' | '\'') || c.is_whitespace())
            .unwrap_or(after.len());
        let authority = &after[..end];
        match authority.rfind('@') {
            Some(userinfo_end) => {
                out.push_str("***");
                out.push_str(&authority[userinfo_end..]);
            }
            None => out.push_str(authority),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_that_is_no_misspelling_is_not_repeated() {
        let leaked = message(
            "unknown field `sk-team-a-key-PLAINSECRET-777`, expected one of `id`, `key`, `hash`, `tier`, `routes`".to_owned(),
        );
        assert!(!leaked.contains("PLAINSECRET"), "{leaked}");
        assert!(leaked.contains("expected one of `id`, `key`"), "{leaked}");
        // A typo is repeated: it is what the user needs to see.
        let typo = message(
            "unknown field `reqests_per_minute`, expected one of `requests_per_minute`, `tokens_per_minute`".to_owned(),
        );
        assert!(
            typo.starts_with("unknown field `reqests_per_minute`"),
            "{typo}"
        );
        let none = message("unknown field `abc123secret`, there are no fields".to_owned());
        assert!(!none.contains("abc123secret"), "{none}");
        let unquoted = message("unknown field `teir`, expected one of id, key, tier".to_owned());
        assert!(unquoted.starts_with("unknown field `teir`"), "{unquoted}");
        // A key of another section, put in the wrong one.
        let misplaced = message(
            "unknown field `concurrent_requests`, expected one of `requests_per_minute`, `tokens_per_minute`".to_owned(),
        );
        assert!(
            misplaced.starts_with("unknown field `concurrent_requests`"),
            "{misplaced}"
        );
        for camel in ["apiVersion", "maxTokens", "allowOrigins"] {
            let shown = message(format!("unknown field `{camel}`, there are no fields"));
            assert!(
                shown.starts_with(&format!("unknown field `{camel}`")),
                "{shown}"
            );
        }
        // Not words: a capital on its own, or a leading one.
        for mixed in ["aBcDeFgHiJkLmNoP", "XkqTmvWzrbNpq", "sk9AbcdefGhij"] {
            let hidden = message(format!("unknown field `{mixed}`, there are no fields"));
            assert!(!hidden.contains(mixed), "{hidden}");
        }
        let long_lower =
            message("unknown field `abcdefghijklmnopqrstu`, there are no fields".to_owned());
        assert!(
            !long_lower.contains("abcdefghijklmnopqrstu"),
            "{long_lower}"
        );
    }

    #[test]
    fn a_value_that_is_no_misspelling_of_an_option_is_not_repeated() {
        let leaked =
            message("`redis://:s3cretpass@127.0.0.1:6379` is not one of: memory, redis".to_owned());
        assert!(
            !leaked.contains("s3cretpass") && !leaked.contains("127.0.0.1"),
            "{leaked}"
        );
        assert!(leaked.contains("not one of: memory, redis"), "{leaked}");
        let typo = message("`Reddis` is not one of: memory, redis".to_owned());
        assert_eq!(typo, "`Reddis` is not one of: memory, redis");
    }

    #[test]
    fn url_passwords_are_left_out() {
        assert_eq!(
            message("cannot use `redis://user:s3cret@cache:6379/0`: bad db".to_owned()),
            "cannot use `redis://***@cache:6379/0`: bad db"
        );
        assert_eq!(
            message("https://example.com/a@b and http://:p@h".to_owned()),
            "https://example.com/a@b and http://***@h"
        );
    }
}
