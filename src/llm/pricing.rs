//! Cost of a response: tokens × the `pricing` of the model (USD per
//! million tokens), the `default` entry for models not listed.

use std::collections::HashMap;

use crate::snapshot::Price;

/// An answer's tokens as they are billed: the prompt's, of which some
/// were read from the provider's prompt cache or written to it, and the
/// output's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
    /// Within `input`: read from the cache.
    pub cache_read: u64,
    /// Within `input`: written to the cache.
    pub cache_write: u64,
}

/// USD for the tokens, or `None` when neither the model nor `default` is
/// priced. Cached prompt tokens cost `cached_input` (OpenAI bills them at
/// half or less, Anthropic at a tenth) and those written to the cache
/// `cache_write` (Anthropic: 1.25 times), each `input` when not priced.
pub fn cost(pricing: &HashMap<String, Price>, model: Option<&str>, tokens: Tokens) -> Option<f64> {
    let price = model
        .and_then(|m| price_of(pricing, m))
        .or_else(|| pricing.get("default"))?;
    let read = tokens.cache_read.min(tokens.input);
    let written = tokens.cache_write.min(tokens.input - read);
    let plain = tokens.input - read - written;
    let usd = plain as f64 * price.input
        + read as f64 * price.cached_input.unwrap_or(price.input)
        + written as f64 * price.cache_write.unwrap_or(price.input)
        + tokens.output as f64 * price.output;
    Some(usd / 1_000_000.0)
}

/// The price listed for `model`, else for its undated name: an upstream
/// reports the snapshot that answered (OpenAI's `gpt-4o-mini` request
/// comes back as `gpt-4o-mini-2024-07-18`, Anthropic's as
/// `claude-3-5-sonnet-20241022`), while a price list names the model.
/// A snapshot listed under its own name keeps its own price.
fn price_of<'p>(pricing: &'p HashMap<String, Price>, model: &str) -> Option<&'p Price> {
    pricing.get(model).or_else(|| pricing.get(undated(model)?))
}

/// `model` without a snapshot date at its end: `-2024-07-18`,
/// `-20241022`, Vertex AI's `@20241022`, or the four digits of OpenAI's
/// older snapshots (`gpt-3.5-turbo-0125`, the answer to a `gpt-3.5-turbo`
/// request) and Mistral's (`mistral-large-2411`).
fn undated(model: &str) -> Option<&str> {
    let is_date = |d: &[u8]| match d.len() {
        10 => d.iter().enumerate().all(|(i, b)| match i {
            4 | 7 => *b == b'-',
            _ => b.is_ascii_digit(),
        }),
        _ => d.iter().all(u8::is_ascii_digit),
    };
    [10, 8, 4].into_iter().find_map(|len| {
        let at = model.len().checked_sub(len + 1)?;
        // `None` unless `at` starts a character, so a date's bytes are ASCII.
        let name = model.get(..at).filter(|n| !n.is_empty())?;
        let (separator, date) = model.as_bytes()[at..].split_first()?;
        let separated = *separator == b'-' || (*separator == b'@' && len == 8);
        (separated && is_date(date)).then_some(name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(input: f64, output: f64) -> Price {
        Price {
            input,
            output,
            cached_input: None,
            cache_write: None,
        }
    }

    fn plain(input: u64, output: u64) -> Tokens {
        Tokens {
            input,
            output,
            ..Tokens::default()
        }
    }

    #[test]
    fn model_price_else_default() {
        let p = HashMap::from([
            ("gpt-4o-mini".to_owned(), price(0.15, 0.60)),
            ("default".to_owned(), price(1.0, 3.0)),
        ]);
        let c = cost(&p, Some("gpt-4o-mini"), plain(1_000_000, 2_000_000)).unwrap();
        assert!((c - 1.35).abs() < 1e-9);
        let d = cost(&p, Some("unknown"), plain(1_000, 1_000)).unwrap();
        assert!((d - 0.004).abs() < 1e-12);
        assert_eq!(cost(&HashMap::new(), Some("x"), plain(1, 1)), None);
    }

    /// Cached prompt tokens cost their own price, each `input` unpriced;
    /// counts past the prompt cannot make a cost negative.
    #[test]
    fn cached_prompt_tokens_cost_their_own_price() {
        let mut cached = price(3.0, 15.0);
        cached.cached_input = Some(0.30);
        cached.cache_write = Some(3.75);
        let p = HashMap::from([
            ("claude".to_owned(), cached),
            ("default".to_owned(), price(3.0, 15.0)),
        ]);
        let tokens = Tokens {
            input: 4_020,
            output: 100,
            cache_read: 3_000,
            cache_write: 1_000,
        };
        // 20 × 3 + 3000 × 0.30 + 1000 × 3.75 + 100 × 15, per million.
        let c = cost(&p, Some("claude"), tokens).unwrap();
        assert!((c - 0.00621).abs() < 1e-12, "{c}");
        let unpriced = cost(&p, Some("other"), tokens).unwrap();
        assert!((unpriced - (4_020.0 * 3.0 + 1_500.0) / 1e6).abs() < 1e-12);
        let odd = Tokens {
            input: 10,
            output: 0,
            cache_read: 50,
            cache_write: 50,
        };
        assert!((cost(&p, Some("claude"), odd).unwrap() - 10.0 * 0.30 / 1e6).abs() < 1e-15);
    }

    #[test]
    fn a_dated_snapshot_is_priced_as_its_model() {
        let p = HashMap::from([
            ("gpt-4o-mini".to_owned(), price(1.0, 0.0)),
            ("gpt-4o".to_owned(), price(2.0, 0.0)),
            ("gpt-4o-2024-05-13".to_owned(), price(5.0, 0.0)),
            ("claude-3-5-sonnet".to_owned(), price(3.0, 0.0)),
            ("default".to_owned(), price(9.0, 0.0)),
        ]);
        let per_token = |m| cost(&p, Some(m), plain(1_000_000, 0)).unwrap();
        assert_eq!(per_token("gpt-4o-mini-2024-07-18"), 1.0);
        assert_eq!(per_token("gpt-4o-2024-08-06"), 2.0);
        assert_eq!(per_token("gpt-4o-2024-05-13"), 5.0, "listed itself");
        assert_eq!(per_token("claude-3-5-sonnet-20241022"), 3.0);
        assert_eq!(per_token("claude-3-5-sonnet@20241022"), 3.0);
        assert_eq!(per_token("gpt-4o-0613"), 2.0, "four digits");
        assert_eq!(per_token("gpt-4o-mini-0125"), 1.0);
        assert_eq!(per_token("gpt-4o-mini@0125"), 9.0, "Vertex names eight");
        assert_eq!(per_token("gpt-4o-mini-125"), 9.0);
        // Not a date, or nothing before it: the default.
        assert_eq!(per_token("gpt-4o-mini-2024-07"), 9.0);
        assert_eq!(per_token("gpt-4o-mini-12345678x"), 9.0);
        assert_eq!(per_token("gpt-4o-mini-2024_07_18"), 9.0);
        assert_eq!(per_token("-20241022"), 9.0);
        assert_eq!(per_token("2024-07-18"), 9.0);
        assert_eq!(per_token("gpt-4o-mini@2024-07-18"), 9.0);
        // Names from upstreams are any text: no byte index may split one.
        for odd in [
            "€abcdefghij",
            "€-2024-07-1",
            "ab€2024-07-18",
            "x€20241022",
            "é",
        ] {
            assert_eq!(per_token(odd), 9.0, "{odd}");
        }
        assert_eq!(undated("x-20241022"), Some("x"));
    }
}
