//! Text fields of a `multipart/form-data` request body, read from its
//! bytes: the `model` that OpenAI's audio, image and file uploads name.

use crate::telemetry::body_log::field_name;

/// The boundary a `multipart/form-data` content type names.
pub fn boundary(content_type: &[u8]) -> Option<&[u8]> {
    let text = std::str::from_utf8(content_type).ok()?;
    let (media, params) = text.split_once(';')?;
    if !media.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').find_map(|param| {
        let (name, value) = param.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("boundary") {
            return None;
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        (!value.is_empty()).then_some(value.as_bytes())
    })
}

/// The value of the text field `name` of a form body whose parts the
/// `boundary` of its content type delimits, as RFC 2046 reads it: what
/// comes before the first delimiter line (the preamble) is no part, and
/// what an uploaded file holds is never taken for a field, whatever it
/// says. A field given twice is read as its last, as Starlette (vLLM,
/// LiteLLM) reads it. `None` where the body holds no such field.
pub fn field<'b>(body: &'b [u8], boundary: &[u8], name: &str) -> Option<&'b str> {
    let delimiter = [b"--", boundary].concat();
    let mut found = None;
    let mut at = line_starting_with(body, &delimiter)?;
    loop {
        let after = &body[at + delimiter.len()..];
        // The close delimiter is followed by `--`.
        if after.starts_with(b"--") {
            return found;
        }
        let part = &after[memchr::memchr(b'\n', after)? + 1..];
        let Some((headers, content)) = split_at_blank_line(part) else {
            return found;
        };
        let Some(end) = line_starting_with(content, &delimiter) else {
            return found;
        };
        let named = std::str::from_utf8(headers).ok().is_some_and(|headers| {
            headers.lines().any(|line| {
                line.get(..20)
                    .is_some_and(|head| head.eq_ignore_ascii_case("content-disposition:"))
                    && field_name(line) == Some(name)
            })
        });
        if named {
            let value = &content[..end];
            let value = value.strip_suffix(b"\n").unwrap_or(value);
            let value = value.strip_suffix(b"\r").unwrap_or(value);
            found = std::str::from_utf8(value).ok().map(str::trim);
        }
        // `content` runs to the body's end.
        at = body.len() - content.len() + end;
    }
}

/// A part's headers and its content, apart at the first blank line.
fn split_at_blank_line(part: &[u8]) -> Option<(&[u8], &[u8])> {
    let crlf = memchr::memmem::find(part, b"\r\n\r\n").map(|at| (at, 4));
    let lf = memchr::memmem::find(part, b"\n\n").map(|at| (at, 2));
    let (at, len) = match (crlf, lf) {
        (Some(c), Some(l)) => c.min(l),
        (found, None) | (None, found) => found?,
    };
    Some((&part[..at], &part[at + len..]))
}

/// Where in `text` the first line that starts with `delimiter` does.
fn line_starting_with(text: &[u8], delimiter: &[u8]) -> Option<usize> {
    if text.starts_with(delimiter) {
        return Some(0);
    }
    memchr::memmem::find_iter(text, delimiter).find(|&at| text[at - 1] == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_named_field_is_read_and_files_are_not() {
        let body = b"--b0und\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF{\"model\":\"cheap\"}\r\n--b0und is not the end\r\n--b0und\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-transcribe\r\n--b0und--\r\n";
        assert_eq!(field(body, b"b0und", "model"), Some("gpt-4o-transcribe"));
        assert_eq!(field(body, b"b0und", "language"), None);
        // A file's own `name="model"` text is content, not a header.
        let body = b"--x\nContent-Disposition: form-data; name=\"file\"\n\nname=\"model\"\n\nfake\n--x--\n";
        assert_eq!(field(body, b"x", "model"), None);
        assert_eq!(
            field(
                b"--x\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ncut",
                b"x",
                "model"
            ),
            None
        );
    }

    #[test]
    fn the_boundary_decides_not_the_first_line() {
        // A preamble that looks like a form of its own is no part.
        let body = b"--fake\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ncheap\r\n--fake--\r\n\r\n--real\r\nContent-Disposition: form-data; name=model\r\n\r\nfirst\r\n--real\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-transcribe\r\n--real--\r\n";
        assert_eq!(field(body, b"real", "model"), Some("gpt-4o-transcribe"));
        assert_eq!(
            field(
                b"\r\n--real\r\nContent-Disposition: form-data; name=model\r\n\r\nm\r\n--real--",
                b"real",
                "model"
            ),
            Some("m")
        );
        assert_eq!(
            boundary(b"multipart/form-data; boundary=\"real\""),
            Some(&b"real"[..])
        );
        assert_eq!(
            boundary(b"Multipart/Form-Data;charset=x; Boundary=r"),
            Some(&b"r"[..])
        );
        assert_eq!(boundary(b"application/json"), None);
    }
}
