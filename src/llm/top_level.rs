//! Finding a member of a JSON document's top-level object in a piece of
//! it, by tracking only strings and brackets: from the start of a head
//! (read forwards from the document's first byte), or from the end of a
//! tail (read backwards from its last byte, where the state is known too:
//! outside every string).

use crate::llm::prompt_size::string_end;

/// The value of the top-level member `name` that comes first in
/// `head` (the document's start).
pub fn from_start<'a>(head: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let mut depth = 0usize;
    let mut i = 0;
    while i < head.len() {
        match head[i] {
            b'"' => {
                let start = i + 1;
                let end = string_end(head, start)?;
                if depth == 1 && &head[start..end] == name {
                    let rest = head[end + 1..].trim_ascii_start();
                    if let Some(value) = rest.strip_prefix(b":") {
                        return Some(value.trim_ascii_start());
                    }
                }
                i = end + 1;
                continue;
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.checked_sub(1)?,
            _ => {}
        }
        i += 1;
    }
    None
}

/// The value of the top-level member `name` that comes last in
/// `tail` (the document's end).
pub fn from_end<'a>(tail: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    from_end_at(tail, name, 1)
}

/// [`from_end`] for a member of the object `level` deep (1: the
/// document's own; 2: one of its members', as the responses API's
/// `usage` inside `response`), on the path that ends the document.
pub fn from_end_at<'a>(tail: &'a [u8], name: &[u8], level: usize) -> Option<&'a [u8]> {
    let mut depth = 0usize;
    let mut i = tail.len();
    // Whether a `:` follows (for a string met going backwards, the
    // first thing past it): then the string is a member's name.
    let mut colon_after = false;
    while i > 0 {
        i -= 1;
        match tail[i] {
            b'"' if !escaped(tail, i) => {
                let end = i;
                // Back to the opening quote: one not escaped.
                loop {
                    i = i.checked_sub(1)?;
                    if tail[i] == b'"' && !escaped(tail, i) {
                        break;
                    }
                }
                if depth == level && colon_after && &tail[i + 1..end] == name {
                    let rest = tail[end + 1..].trim_ascii_start();
                    return rest.strip_prefix(b":").map(<[u8]>::trim_ascii_start);
                }
                colon_after = false;
            }
            b':' => colon_after = true,
            b'}' | b']' => {
                depth += 1;
                colon_after = false;
            }
            b'{' | b'[' => {
                depth = depth.checked_sub(1)?;
                colon_after = false;
            }
            b if b.is_ascii_whitespace() => {}
            _ => colon_after = false,
        }
    }
    None
}

/// Whether the byte at `at` is escaped: an odd run of backslashes
/// before it.
fn escaped(json: &[u8], at: usize) -> bool {
    json[..at].iter().rev().take_while(|&&b| b == b'\\').count() % 2 == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_start_finds_only_the_documents_own_member() {
        let head = br#"{"extra":{"model":"deep"},"note":"\"model\": no","model":"top","#;
        assert_eq!(from_start(head, b"model"), Some(&br#""top","#[..]));
        assert_eq!(from_start(br#"{"a":{"model":"deep"}"#, b"model"), None);
    }

    #[test]
    fn from_end_reads_backwards_past_escaped_quotes() {
        let tail = br#"xt \"usage\": 1","usage":{"total_tokens":3},"s":"a\\"}"#;
        assert_eq!(
            from_end(tail, b"usage"),
            Some(&br#"{"total_tokens":3},"s":"a\\"}"#[..])
        );
        // A name inside a string is no member.
        assert_eq!(from_end(br#""x":"\"usage\":{}"}"#, b"usage"), None);
    }

    #[test]
    fn from_end_at_a_level_takes_the_member_on_the_closing_path() {
        let tail = br#"{"response":{"output":[{"usage":1}],"usage":{"n":2}}}"#;
        assert_eq!(from_end_at(tail, b"usage", 2), Some(&br#"{"n":2}}}"#[..]));
        assert_eq!(from_end(tail, b"usage"), None);
    }
}
