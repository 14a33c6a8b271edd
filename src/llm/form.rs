//! Text fields of a `multipart/form-data` request body, read from its
//! bytes: the `model` that OpenAI's audio, image and file uploads name.

use crate::telemetry::body_log::field_name;

/// The value of the text field `name` of a form body (one that starts
/// with its delimiter line, `--` and the boundary); `None` where the body
/// is no form, or holds no such field. Only part headers and delimiter
/// lines are read: what an uploaded file holds is never taken for a
/// field, whatever it says.
pub fn field<'b>(body: &'b [u8], name: &str) -> Option<&'b str> {
    let first_end = memchr::memchr(b'\n', body)?;
    let delimiter = body[..first_end]
        .strip_suffix(b"\r")
        .unwrap_or(&body[..first_end]);
    if delimiter.len() < 3 || !delimiter.starts_with(b"--") {
        return None;
    }
    let mut part = &body[first_end + 1..];
    loop {
        let (headers, content) = split_at_blank_line(part)?;
        // The part ends at the next line that is the delimiter.
        let end = line_starting_with(content, delimiter)?;
        let value = &content[..end];
        let value = value.strip_suffix(b"\n").unwrap_or(value);
        let value = value.strip_suffix(b"\r").unwrap_or(value);
        let named = std::str::from_utf8(headers).ok().is_some_and(|headers| {
            headers.lines().any(|line| {
                line.get(..20)
                    .is_some_and(|head| head.eq_ignore_ascii_case("content-disposition:"))
                    && field_name(line) == Some(name)
            })
        });
        if named {
            return std::str::from_utf8(value).ok().map(str::trim);
        }
        part = &content[end + delimiter.len()..];
        // The last delimiter is followed by `--`.
        if part.starts_with(b"--") {
            return None;
        }
        part = &part[memchr::memchr(b'\n', part)? + 1..];
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

/// Where in `content` the first line that starts with `delimiter` does.
fn line_starting_with(content: &[u8], delimiter: &[u8]) -> Option<usize> {
    if content.starts_with(delimiter) {
        return Some(0);
    }
    memchr::memmem::find_iter(content, delimiter).find(|&at| content[at - 1] == b'\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_named_field_is_read_and_files_are_not() {
        let body = b"--b0und\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\nContent-Type: audio/wav\r\n\r\nRIFF{\"model\":\"cheap\"}\r\n--b0und is not the end\r\n--b0und\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-transcribe\r\n--b0und--\r\n";
        assert_eq!(field(body, "model"), Some("gpt-4o-transcribe"));
        assert_eq!(field(body, "language"), None);
        // A file's own `name="model"` text is content, not a header.
        let body = b"--x\nContent-Disposition: form-data; name=\"file\"\n\nname=\"model\"\n\nfake\n--x--\n";
        assert_eq!(field(body, "model"), None);
        assert_eq!(field(b"{\"model\":\"m\"}", "model"), None);
        assert_eq!(
            field(
                b"--x\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ncut",
                "model"
            ),
            None
        );
    }
}
