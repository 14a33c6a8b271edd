//! How many tokens a request's prompt is, estimated from its body's bytes
//! before the upstream counts them: text at about four bytes a token,
//! and media sent inline (base64 images, audio, files) at a fixed count
//! each, as providers bill them by their size in pixels or seconds, not
//! by the bytes of their encoding (a 1 MB photo is about a thousand
//! tokens, not 333,000).

/// Tokens counted for one inline media string: OpenAI's most for an
/// image in high detail (85 + 170 for each of 8 tiles), about what
/// Anthropic counts for its largest images. A reservation errs high; the
/// answer's usage settles it.
pub const MEDIA_TOKENS: u64 = 1_445;

/// Tokens counted for an image sent in low detail (`"detail": "low"`),
/// which OpenAI bills at a flat 85 whatever its size.
pub const LOW_DETAIL_TOKENS: u64 = 85;

/// The shortest string taken for media: text of this length has spaces
/// or punctuation outside base64's alphabet.
const MEDIA_MIN: usize = 1_024;

/// The prompt's estimated tokens. A body that is no JSON object or array
/// (a multipart upload, audio bytes) is no prompt to estimate: 0, and the
/// answer's usage counts it.
pub fn estimate(body: &[u8]) -> u64 {
    let body = without_bom(body);
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if !matches!(first, Some(b'{' | b'[')) {
        return 0;
    }
    let found = scan(body);
    let low = found.low_detail.min(found.media);
    let text = body
        .len()
        .saturating_sub(found.media_bytes + found.number_bytes) as u64;
    text.div_ceil(4)
        .saturating_add(found.numbers)
        .saturating_add((found.media - low).saturating_mul(MEDIA_TOKENS))
        .saturating_add(low.saturating_mul(LOW_DETAIL_TOKENS))
}

/// What [`scan`] finds in a body besides its text.
#[derive(Default)]
struct Found {
    /// Inline media strings, and their bytes.
    media: u64,
    media_bytes: usize,
    /// `"detail": "low"` members: that many images are low detail.
    low_detail: u64,
    /// Integers in arrays of them (token ids, as LangChain and tiktoken
    /// users send embeddings input: one token each), and their bytes
    /// with their separators.
    numbers: u64,
    number_bytes: usize,
}

/// `body` without a UTF-8 byte order mark, which some encoders write and
/// JSON parsers that take bytes (Python's) skip.
pub fn without_bom(body: &[u8]) -> &[u8] {
    body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body)
}

/// The JSON strings in `body` that are inline media, of at least
/// [`MEDIA_MIN`] bytes: a base64 `data:` URL (OpenAI's `image_url`), or
/// base64 as the value of a member named `data` or `file_data` (OpenAI's
/// `input_audio` and `file` parts, Anthropic's `source`). Base64 anywhere
/// else (pasted into a message) is text the model reads, and is billed
/// as such. Also the low-detail images, and the integers between strings
/// (see [`Found`]).
fn scan(body: &[u8]) -> Found {
    let mut found = Found::default();
    let mut at = 0;
    // The member name the string being read is the value of.
    let mut key: &[u8] = b"";
    // Outside strings a JSON text holds no quote but those that open one.
    loop {
        let open = memchr::memchr(b'"', &body[at..]);
        integers(&body[at..open.map_or(body.len(), |o| at + o)], &mut found);
        let Some(open) = open else {
            break;
        };
        let start = at + open + 1;
        let Some(end) = string_end(body, start) else {
            break;
        };
        let text = &body[start..end];
        let is_key = body[end + 1..].trim_ascii_start().first() == Some(&b':');
        if is_key {
            key = text;
        } else {
            let media = text.len() >= MEDIA_MIN
                && match text.strip_prefix(b"data:") {
                    Some(url) => data_url_payload(url).is_some_and(is_base64),
                    None => matches!(key, b"data" | b"file_data") && is_base64(text),
                };
            if media {
                found.media_bytes += text.len();
                found.media += 1;
            } else if key == b"detail" && text == b"low" {
                found.low_detail += 1;
            }
            key = b"";
        }
        at = end + 1;
    }
    found
}

/// Counts the integers of `gap` (JSON between two strings) that stand as
/// elements of an array of numbers (`[101, 2023, …]`), each one token,
/// with their bytes and separators; a number that is a member's value
/// (`"max_tokens": 100`) is left to the text.
fn integers(gap: &[u8], found: &mut Found) {
    for item in gap.split(|&b| b == b',') {
        let bare = item.trim_ascii();
        let bare = bare.strip_prefix(b"[").unwrap_or(bare).trim_ascii();
        let bare = bare.strip_suffix(b"]").unwrap_or(bare).trim_ascii();
        let digits = bare.strip_prefix(b"-").unwrap_or(bare);
        if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) {
            found.numbers += 1;
            found.number_bytes += item.len() + 1;
        }
    }
}

/// Where the string whose text starts at `start` ends: its closing quote.
pub(super) fn string_end(body: &[u8], start: usize) -> Option<usize> {
    let mut at = start;
    loop {
        let found = at + memchr::memchr2(b'"', b'\\', body.get(at..)?)?;
        if body[found] == b'"' {
            return Some(found);
        }
        // An escape: the byte after the backslash is part of it.
        at = found + 2;
    }
}

/// What follows `;base64,` in a `data:` URL (after `data:`).
fn data_url_payload(url: &[u8]) -> Option<&[u8]> {
    let head = &url[..url.len().min(128)];
    let at = memchr::memmem::find(head, b";base64,")?;
    Some(&url[at + b";base64,".len()..])
}

/// Whether a JSON string's raw text is base64 (standard or URL-safe),
/// with the escapes some encoders write for its symbols: `\/` (PHP),
/// `\u002b`, `\u002f`, `\u003d` (Gson).
fn is_base64(text: &[u8]) -> bool {
    let mut rest = text;
    while let Some((&b, tail)) = rest.split_first() {
        rest = match b {
            b'\\' => match tail {
                [b'/', after @ ..] => after,
                [b'u', b'0', b'0', hi, lo, after @ ..]
                    if matches!(
                        (*hi, lo.to_ascii_lowercase()),
                        (b'2', b'b' | b'f') | (b'3', b'd')
                    ) =>
                {
                    after
                }
                _ => return false,
            },
            b if b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_') => tail,
            _ => return false,
        };
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base64_of(len: usize) -> String {
        "QUJD".repeat(len / 4)
    }

    #[test]
    fn text_is_four_bytes_a_token() {
        let body = r#"{"messages":[{"role":"user","content":"hello there"}]}"#;
        assert_eq!(estimate(body.as_bytes()), (body.len() as u64).div_ceil(4));
    }

    #[test]
    fn inline_media_counts_as_a_fixed_number_of_tokens() {
        let image = base64_of(1_000_000);
        for part in [
            format!(
                r#"{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{image}"}}}}"#
            ),
            format!(
                r#"{{"type":"input_audio","input_audio":{{"data" : "{image}","format":"wav"}}}}"#
            ),
            format!(
                r#"{{"type":"file","file":{{"file_data":"data:application/pdf;base64,{image}"}}}}"#
            ),
            // PHP writes `/` as `\/`, Gson `=` as `\u003d`.
            format!(
                r#"{{"type":"image_url","image_url":{{"url":"data:image/png;base64,{image}\/\/AB\u003d\u003d"}}}}"#
            ),
            format!(
                r#"{{"type":"image","source":{{"type":"base64","media_type":"image/jpeg","data":"{image}"}}}}"#
            ),
        ] {
            let body = format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":[{{"type":"text","text":"what is it?"}},{part}]}}]}}"#
            );
            // The media, and under 400 bytes of text around it.
            let estimate = estimate(body.as_bytes());
            assert!(
                (MEDIA_TOKENS..MEDIA_TOKENS + 100).contains(&estimate),
                "{estimate} for {}",
                &part[..40]
            );
        }
    }

    /// Base64 pasted into a message is text the model reads, and is
    /// billed as such: only a data URL or a `data` member is media.
    #[test]
    fn base64_elsewhere_is_text() {
        let pasted = base64_of(100_000);
        let body = format!(r#"{{"messages":[{{"role":"user","content":"{pasted}"}}]}}"#);
        assert_eq!(estimate(body.as_bytes()), (body.len() as u64).div_ceil(4));
    }

    #[test]
    fn long_text_and_escaped_quotes_are_not_media() {
        let words = "lorem ipsum ".repeat(200);
        let body = format!(
            r#"{{"content":"{words}","x":"say \"{}\""}}"#,
            base64_of(2_000)
        );
        // The base64 run sits inside a string with a quote escaped in it:
        // one string, with spaces, so text.
        assert_eq!(estimate(body.as_bytes()), (body.len() as u64).div_ceil(4));
    }

    /// A low-detail image is billed 85 tokens whatever its size; token
    /// ids sent as arrays (embeddings input) are one token each.
    #[test]
    fn low_detail_images_and_token_ids_count_as_billed() {
        let image = base64_of(100_000);
        let part = format!(
            r#"{{"type":"image_url","image_url":{{"url":"data:image/jpeg;base64,{image}","detail":"low"}}}}"#
        );
        let parts = vec![part.as_str(); 14].join(",");
        let body = format!(r#"{{"model":"m","messages":[{{"role":"user","content":[{parts}]}}]}}"#);
        let estimate = estimate(body.as_bytes());
        assert!(
            (14 * LOW_DETAIL_TOKENS..14 * LOW_DETAIL_TOKENS + 300).contains(&estimate),
            "{estimate}"
        );
        let ids: Vec<String> = (0..12_000).map(|i| (100_000 + i).to_string()).collect();
        let body = format!(r#"{{"model":"e","input":[[{}]]}}"#, ids.join(", "));
        let estimate = super::estimate(body.as_bytes());
        assert!((12_000..12_010).contains(&estimate), "{estimate}");
        // A number that is a member's value is text, as before.
        let body = br#"{"model":"m","max_tokens":100,"n":2}"#;
        assert_eq!(super::estimate(body), (body.len() as u64).div_ceil(4));
    }

    #[test]
    fn a_body_that_is_no_json_is_no_prompt_but_a_bom_is_skipped() {
        assert_eq!(estimate(b"--boundary\r\nContent-Disposition: form-data"), 0);
        assert_eq!(estimate(b"\x1f\x8b\x08\x00binary"), 0);
        assert_eq!(estimate(b""), 0);
        assert_eq!(estimate(b"\xEF\xBB\xBF{\"a\":1}"), 2);
    }
}
