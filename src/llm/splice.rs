//! Rewriting one member of a client's JSON body in place: every other
//! byte reaches the upstream as the client wrote it (key order, number
//! spellings, escapes), which a re-serialized `Value` would not keep.

use std::ops::Range;

use bytes::Bytes;
use serde_json::value::RawValue;

/// A member as it is written, `null` included (`Option` would read a
/// `null` as absent); `None` when the member is absent.
#[derive(Default)]
pub struct Member<'a>(pub Option<&'a RawValue>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Member<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&RawValue>::deserialize(d).map(|raw| Member(Some(raw)))
    }
}

/// Where `part`, a slice of `whole` (as serde hands out borrowed raw
/// values), lies in it.
pub fn span_of(whole: &[u8], part: &str) -> Option<Range<usize>> {
    let start = (part.as_ptr() as usize).checked_sub(whole.as_ptr() as usize)?;
    let end = start.checked_add(part.len())?;
    (end <= whole.len()).then_some(start..end)
}

/// `whole` with the bytes in `range` replaced by `with`.
pub fn spliced(whole: &[u8], range: Range<usize>, with: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(whole.len() - range.len() + with.len());
    out.extend_from_slice(&whole[..range.start]);
    out.extend_from_slice(with);
    out.extend_from_slice(&whole[range.end..]);
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_is_replaced_and_nothing_else_moves() {
        #[derive(serde::Deserialize)]
        struct Doc<'a> {
            #[serde(borrow, default)]
            b: Member<'a>,
        }
        let body = br#"{"a":1e0, "b" : [1,2], "c":"\u00e9"}"#;
        let doc: Doc = serde_json::from_slice(body).unwrap();
        let raw = doc.b.0.unwrap();
        let range = span_of(body, raw.get()).unwrap();
        assert_eq!(&body[range.clone()], b"[1,2]");
        assert_eq!(
            &spliced(body, range, b"null")[..],
            br#"{"a":1e0, "b" : null, "c":"\u00e9"}"#
        );
        assert_eq!(span_of(b"other", raw.get()), None);
    }
}
