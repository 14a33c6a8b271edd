//! Text fields of a `multipart/form-data` request body, read from its
//! bytes: the `model` that OpenAI's audio, image and file uploads name.

use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::telemetry::body_log::field_name;

/// The boundary a `multipart/form-data` content type names: the last,
/// where it names two, as Starlette (vLLM, LiteLLM) reads it.
pub fn boundary(content_type: &[u8]) -> Option<&[u8]> {
    let text = std::str::from_utf8(content_type).ok()?;
    let (media, params) = text.split_once(';')?;
    if !media.trim().eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    params.split(';').rev().find_map(|param| {
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
        if std::str::from_utf8(headers).is_ok_and(|headers| names_field(headers, name)) {
            let value = &content[..end];
            let value = value.strip_suffix(b"\n").unwrap_or(value);
            let value = value.strip_suffix(b"\r").unwrap_or(value);
            found = std::str::from_utf8(value).ok().map(str::trim);
        }
        // `content` runs to the body's end.
        at = body.len() - content.len() + end;
    }
}

/// Whether a part's `headers` name it the field `name`.
fn names_field(headers: &str, name: &str) -> bool {
    headers.lines().any(|line| {
        line.get(..20)
            .is_some_and(|head| head.eq_ignore_ascii_case("content-disposition:"))
            && field_name(line) == Some(name)
    })
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

/// A request body sent on as it comes while a [`FieldWatch`] reads it;
/// what it found is in the slot once the body has ended.
pub struct Watched<B> {
    inner: B,
    watch: FieldWatch,
    slot: Arc<OnceLock<String>>,
}

impl<B> Watched<B> {
    pub fn new(inner: B, watch: FieldWatch) -> (Self, Arc<OnceLock<String>>) {
        let slot = Arc::new(OnceLock::new());
        (
            Watched {
                inner,
                watch,
                slot: slot.clone(),
            },
            slot,
        )
    }

    fn ended(&self) {
        if let Some(found) = self.watch.found() {
            let _ = self.slot.set(found.to_owned());
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Watched<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.watch.push(data);
                }
                if this.inner.is_end_stream() {
                    this.ended();
                }
            }
            Poll::Ready(None) => this.ended(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
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
        assert_eq!(
            boundary(b"multipart/form-data; boundary=C; boundary=E"),
            Some(&b"E"[..])
        );
    }

    /// What a watch finds in `body` sent in chunks of `size` bytes.
    fn watched(body: &[u8], size: usize) -> Option<String> {
        let mut watch = FieldWatch::new(b"real", "model");
        for chunk in body.chunks(size) {
            watch.push(chunk);
        }
        watch.found().map(str::to_owned)
    }

    #[test]
    fn a_watch_finds_the_field_however_the_body_is_cut() {
        let file = "RIFF\r\n--rea {\"model\":\"cheap\"} name=\"model\"\r\n\r\n".repeat(200);
        let body = format!(
            "--real\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nfirst\r\n\
             --real\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n{file}\r\n\
             --real\r\nContent-Disposition: form-data; name=model\r\n\r\ngpt-4o-transcribe\r\n\
             --real\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nen\r\n--real--\r\n"
        );
        for size in [1, 2, 3, 5, 7, 11, 64, 1000, body.len()] {
            assert_eq!(
                watched(body.as_bytes(), size).as_deref(),
                Some("gpt-4o-transcribe"),
                "chunks of {size}"
            );
        }
        assert_eq!(watched(b"{\"model\":\"m\"}", 3), None);
        // A part whose headers never end is let go, and the rest read.
        let long = format!(
            "--real\r\nX: {}\r\n--real\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nm\r\n--real--",
            "y".repeat(10_000)
        );
        assert_eq!(watched(long.as_bytes(), 100).as_deref(), Some("m"));
        // Sent whole, only a bounded head of that part is held, and the
        // rest of the chunk is still searched.
        let mut watch = FieldWatch::new(b"real", "model");
        watch.push(long.as_bytes());
        assert_eq!(watch.found(), Some("m"));
        assert!(
            watch.held.capacity() <= 2 * HELD_MAX,
            "{}",
            watch.held.capacity()
        );
    }
}

/// Finds the text field `name` of a form as its body streams through,
/// chunk by chunk, holding no more than a part's headers or the field's
/// value (each bounded): an upload sent on to the upstream as it comes
/// is never held whole to be read. The field given last wins, as
/// [`field`] reads it. Delimiters are CRLF ones (RFC 2046).
pub struct FieldWatch {
    /// `CRLF--boundary`: the body is read as if a CRLF came first, so
    /// that the first delimiter line is found like the others.
    delimiter: Vec<u8>,
    name: &'static str,
    state: Watching,
    /// The end of what was searched (shorter than a delimiter), or the
    /// part's headers, or the field's value, so far.
    held: Vec<u8>,
    found: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Watching {
    Delimiter,
    Headers,
    Value,
    Done,
}

/// A part's headers, or a field's value, longer than this is not read.
const HELD_MAX: usize = 4096;

impl FieldWatch {
    pub fn new(boundary: &[u8], name: &'static str) -> Self {
        FieldWatch {
            delimiter: [&b"\r\n--"[..], boundary].concat(),
            name,
            state: Watching::Delimiter,
            held: b"\r\n".to_vec(),
            found: None,
        }
    }

    pub fn push(&mut self, mut input: &[u8]) {
        while !input.is_empty() {
            match self.state {
                Watching::Done => return,
                Watching::Delimiter => match self.find_delimiter(input) {
                    Some(end) => {
                        input = &input[end..];
                        self.held.clear();
                        self.state = Watching::Headers;
                    }
                    None => return,
                },
                Watching::Headers | Watching::Value => {
                    let end = if self.state == Watching::Headers {
                        b"\r\n\r\n".as_slice()
                    } else {
                        self.delimiter.as_slice()
                    };
                    // Held: at most HELD_MAX bytes and the end itself.
                    let before = self.held.len();
                    let taken = input
                        .len()
                        .min((HELD_MAX + end.len()).saturating_sub(before));
                    self.held.extend_from_slice(&input[..taken]);
                    let from = before.saturating_sub(end.len());
                    let Some(at) = memchr::memmem::find(&self.held[from..], end).map(|i| from + i)
                    else {
                        if self.held.len() <= HELD_MAX {
                            // All of `input` is held: the end may come next.
                            return;
                        }
                        // Not a field to read: the next part is looked
                        // for from the end of what was held on.
                        let keep = self.held.len().saturating_sub(self.delimiter.len() - 1);
                        self.held.drain(..keep);
                        self.state = Watching::Delimiter;
                        input = &input[taken..];
                        continue;
                    };
                    // What came after the end goes on to the next state.
                    let consumed = at + end.len() - before;
                    input = &input[consumed.min(input.len())..];
                    self.held.truncate(at);
                    if self.state == Watching::Headers {
                        self.after_headers();
                    } else {
                        self.found = std::str::from_utf8(&self.held)
                            .ok()
                            .map(|v| v.trim().to_owned());
                        // The delimiter just read opens the next part.
                        self.held.clear();
                        self.state = Watching::Headers;
                    }
                }
            }
        }
    }

    /// The field's value, the last given, once seen.
    pub fn found(&self) -> Option<&str> {
        self.found.as_deref()
    }

    /// Where in `input` the first delimiter, joined to what was held,
    /// ends; else keeps `input`'s end, for one split across chunks.
    fn find_delimiter(&mut self, input: &[u8]) -> Option<usize> {
        let needle = &self.delimiter;
        let head = &input[..input.len().min(needle.len() - 1)];
        let mut joined = std::mem::take(&mut self.held);
        let held = joined.len();
        joined.extend_from_slice(head);
        let found = memchr::memmem::find(&joined, needle)
            .map(|at| at + needle.len() - held)
            .or_else(|| memchr::memmem::find(input, needle).map(|at| at + needle.len()));
        if found.is_none() {
            let keep = needle.len() - 1;
            joined.extend_from_slice(&input[head.len()..]);
            let start = joined.len().saturating_sub(keep);
            joined.drain(..start);
            self.held = joined;
        }
        found
    }

    /// `held` is a delimiter line's rest and the part's headers.
    fn after_headers(&mut self) {
        let text = String::from_utf8_lossy(&self.held);
        let (delimiter_rest, headers) = text.split_once("\r\n").unwrap_or((&text, ""));
        // The close delimiter (`--boundary--`) ends the form.
        if delimiter_rest.starts_with("--") {
            self.state = Watching::Done;
            return;
        }
        let named = names_field(headers, self.name);
        self.held.clear();
        // Past the headers: the field's value, or content to skip, in
        // which the search for the next delimiter starts at its first byte.
        self.state = if named {
            Watching::Value
        } else {
            Watching::Delimiter
        };
    }
}
