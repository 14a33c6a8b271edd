//! Debug body logging (`logging.log_bodies`, SPEC §3): the first 4 KiB of
//! a request or response body, with credentials masked, for the access
//! log. A response is copied as it passes (the bytes already in memory,
//! never more than the limit), so a stream is neither held nor slowed.

/// The most of a body that is logged.
pub const LIMIT: usize = 4096;

const MASK: &str = "***";

/// Names of secret fields, matched as lower-cased substrings of the name
/// (`client_secret`, `apiKey`…). `token` counts too, but not `tokens`:
/// `max_tokens` and `prompt_tokens` are counts, not credentials.
/// Parts of names whose values are secrets wherever they show.
const SECRET_NAMES: [&str; 23] = [
    "api_key",
    "apikey",
    "api-key",
    "password",
    "passwd",
    "pwd",
    "secret",
    "authorization",
    "credential",
    "private_key",
    "private-key",
    "privatekey",
    "access_key",
    "access-key",
    "accesskey",
    "subscription-key",
    "subscription_key",
    "cookie",
    "signature",
    "sessionid",
    "session_id",
    "session-id",
    "sessid",
];

/// Whole names whose values are secrets: as parts they are common words
/// (`keyboard`, `compass`).
const SECRET_WHOLE_NAMES: [&str; 4] = ["key", "pass", "sig", "session"];

/// Names with `token` that count tokens rather than hold one: OpenAI's
/// usage (`max_tokens`, `input_token_details`, `token_count`) and
/// logprobs (`top_logprobs`, `token_logprobs`).
const TOKEN_COUNTS: [&str; 5] = ["tokens", "details", "count", "logprob", "limit"];

fn is_secret_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    SECRET_NAMES.iter().any(|n| lower.contains(n))
        || SECRET_WHOLE_NAMES.contains(&lower.as_str())
        || (lower.contains("token")
            && lower != "tokenizer"
            && !TOKEN_COUNTS.iter().any(|n| lower.contains(n)))
}

/// The first [`LIMIT`] bytes of a body as it goes by.
#[derive(Debug, Default)]
pub struct BodyLog {
    head: Vec<u8>,
    total: usize,
}

impl BodyLog {
    /// The log of a body already read whole.
    pub fn of(body: &[u8]) -> Self {
        let mut log = BodyLog::default();
        log.push(body);
        log
    }

    pub fn push(&mut self, data: &[u8]) {
        self.total += data.len();
        let room = LIMIT.saturating_sub(self.head.len());
        self.head.extend_from_slice(&data[..data.len().min(room)]);
    }

    /// The logged text: masked (`known` values too, wherever they show),
    /// and marked when cut short; never more than [`LIMIT`] bytes in all,
    /// the mark included.
    pub fn render(&self, known: &[String]) -> String {
        // Known values first: masking a pattern may cut one short and
        // leave its tail unmatched (`Bearer acct:tail` → `Bearer ***:tail`).
        let mut text = String::from_utf8_lossy(&self.head).into_owned();
        if is_binary(&text) {
            // Audio, an image, a file: its size says more than 4 KiB of
            // replacement characters would, and no text in it shows.
            return format!("[{} bytes, not text]", self.total);
        }
        for secret in known {
            mask_secret(&mut text, secret);
            // Cut at the limit in the middle of one: its head shows.
            if self.total > self.head.len()
                && let Some(cut) = (4..secret.len())
                    .rev()
                    .find(|&k| secret.get(..k).is_some_and(|head| text.ends_with(head)))
            {
                text.truncate(text.len() - cut);
                text.push_str(MASK);
            }
        }
        let mut text = mask(&text);
        if self.total <= self.head.len() && text.len() <= LIMIT {
            return text;
        }
        let mark = format!("… [{} bytes in all]", self.total);
        let mut keep = LIMIT.saturating_sub(mark.len()).min(text.len());
        while !text.is_char_boundary(keep) {
            keep -= 1;
        }
        text.truncate(keep);
        text.push_str(&mark);
        text
    }
}

/// Whether a body's head, read as UTF-8, is mostly not text: more than
/// one character in eight a byte that is no UTF-8 or a control character
/// other than a tab or a line's end.
fn is_binary(text: &str) -> bool {
    let (mut odd, mut all) = (0usize, 0usize);
    for c in text.chars() {
        all += 1;
        if c == char::REPLACEMENT_CHARACTER || (c.is_control() && !matches!(c, '\t' | '\n' | '\r'))
        {
            odd += 1;
        }
    }
    odd * 8 > all
}

/// A body's text with credentials masked: the values of secret JSON
/// fields whatever their type (also in a body cut short mid-value),
/// the parts of a `multipart/form-data` body with a secret name,
/// `name=value` and `name: value` pairs with a secret name (form bodies,
/// JSON escaped inside a string), bearer tokens and `sk-` style keys.
pub fn mask(text: &str) -> String {
    mask_pairs(&mask_patterns(&mask_form_parts(&mask_fields(text))))
}

/// Masks every value of `known` in `text`: as it is, and a
/// percent-encoded form in whatever case of hex an encoder wrote (`%2f`
/// beside `%2B`).
pub fn mask_known(text: &mut String, known: &[String]) {
    for secret in known {
        mask_secret(text, secret);
    }
}

/// Masks `secret` in `text`: as it is, and, percent-encoded, in any case
/// of hex.
pub fn mask_secret(text: &mut String, secret: &str) {
    if text.contains(secret) {
        *text = text.replace(secret, MASK);
    }
    if secret.contains('%') && text.contains('%') {
        *text = replace_ignore_case(text, secret, MASK);
    }
}

/// Masks the content of each `multipart/form-data` part whose
/// `Content-Disposition` header names a secret field (`name="password"`),
/// as a browser sends a login form: from the blank line after the part's
/// headers to the line of the boundary that opened the part (or the end
/// of the text, for a body cut short or one whose boundary is not seen).
fn mask_form_parts(text: &str) -> String {
    const HEADER: &str = "content-disposition:";
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut from = 0;
    while let Some(found) = find_ignore_case(&text[from..], HEADER) {
        let at = from + found;
        from = at + HEADER.len();
        // Only a header line: not the words in a text or a page.
        if at > 0 && !text[..at].ends_with('\n') {
            continue;
        }
        let line_end = text[at..].find('\n').map_or(text.len(), |i| at + i);
        if !field_name(&text[at..line_end]).is_some_and(is_secret_name) {
            continue;
        }
        // The part's own blank line: the first after its headers.
        let blank = [("\r\n\r\n", 4), ("\n\n", 2)]
            .iter()
            .filter_map(|(blank, len)| text[at..].find(blank).map(|i| at + i + len))
            .min();
        let Some(content) = blank else {
            // Cut short in the part's headers: no content shows.
            break;
        };
        // The boundary line nearest before the part's headers.
        let delimiter = text[..at]
            .lines()
            .rev()
            .map(str::trim_end)
            .find(|line| line.starts_with("--"));
        let end = delimiter
            .and_then(|d| delimiter_line(&text[content..], d))
            .map_or(text.len(), |i| content + i);
        // The line break before the boundary belongs to it.
        let end = if end > content && text[..end].ends_with('\r') {
            end - 1
        } else {
            end
        };
        if end > content {
            out.push_str(&text[copied..content]);
            out.push_str(MASK);
            copied = end;
        }
        from = from.max(end);
    }
    out.push_str(&text[copied..]);
    out
}

/// Where in `text` the line break before the line `delimiter` (a part's
/// boundary, followed by a line's end, `--` or the text's end) is: a line
/// that only begins like it is the part's content.
fn delimiter_line(text: &str, delimiter: &str) -> Option<usize> {
    let line = format!("\n{delimiter}");
    let mut from = 0;
    while let Some(found) = text[from..].find(&line) {
        let at = from + found;
        let rest = &text[at + line.len()..];
        if rest.is_empty() || rest.starts_with(['\r', '\n']) || rest.starts_with("--") {
            return Some(at);
        }
        from = at + line.len();
    }
    None
}

/// The field a `Content-Disposition` line names (`name="…"`, or a bare
/// `name=…` token, which servers read too; not `filename="…"`).
pub(crate) fn field_name(line: &str) -> Option<&str> {
    const NAME: &str = "name=";
    let mut from = 0;
    while let Some(found) = find_ignore_case(&line[from..], NAME) {
        let at = from + found;
        let start = at + NAME.len();
        let rest = &line[start..];
        let (value, len) = match rest.strip_prefix('"') {
            Some(quoted) => {
                let len = quoted.find('"')?;
                (&quoted[..len], len + 2)
            }
            None => {
                let len = rest
                    .find(|c: char| c == ';' || c.is_ascii_whitespace())
                    .unwrap_or(rest.len());
                (&rest[..len], len)
            }
        };
        if !line[..at].ends_with(|c: char| c.is_ascii_alphanumeric()) {
            return Some(value);
        }
        from = start + len;
    }
    None
}

fn mask_fields(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    // Where a `"name": "Authorization"` member ended: the `value` of the
    // same object is the secret (HAR, Postman, `[{name, value}]` headers).
    let mut secret_pair_at: Option<usize> = None;
    while i < bytes.len() {
        if bytes[i] != b'"' {
            i += 1;
            continue;
        }
        let Some(key_end) = string_end(bytes, i) else {
            break;
        };
        let mut j = skip_space(bytes, key_end + 1);
        if bytes.get(j) != Some(&b':') {
            // `["x-api-key", "value"]`: a header as a pair in a list.
            if let Some((start, end)) = listed_pair_value(text, i, key_end) {
                out.push_str(&text[copied..start]);
                out.push('"');
                out.push_str(MASK);
                out.push('"');
                copied = end;
                i = end;
            } else {
                i = key_end + 1;
            }
            continue;
        }
        j = skip_space(bytes, j + 1);
        let name = &text[i + 1..key_end];
        // A name spelled with escapes (`api\u005fkey`) is read as the
        // JSON says it.
        let unescaped = name
            .contains('\\')
            .then(|| serde_json::from_str::<String>(&text[i..=key_end]).ok())
            .flatten();
        let secret_name = is_secret_name(name) || unescaped.as_deref().is_some_and(is_secret_name);
        let name = unescaped.as_deref().unwrap_or(name);
        if PAIR_NAMES.iter().any(|n| name.eq_ignore_ascii_case(n))
            && bytes.get(j) == Some(&b'"')
            && let Some(end) = string_end(bytes, j)
            && is_secret_name(&text[j + 1..end])
        {
            secret_pair_at = Some(end);
        }
        let pair_value = name.eq_ignore_ascii_case("value")
            && secret_pair_at
                .take()
                .is_some_and(|at| !bytes[at..i].iter().any(|&b| b == b'{' || b == b'}'));
        if !pair_value && (!secret_name || !holds_a_credential(name, bytes, j)) {
            i = j;
            continue;
        }
        out.push_str(&text[copied..j]);
        out.push('"');
        out.push_str(MASK);
        out.push('"');
        match value_end(bytes, j) {
            Some(end) => {
                copied = end;
                i = end;
            }
            // Cut short inside the secret: nothing more of it shows.
            None => return out,
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// Members that name the header or field whose secret a `value` member
/// beside them holds.
const PAIR_NAMES: [&str; 4] = ["name", "key", "header", "field"];

/// For a string between `start` and `end` (its quotes) that opens a list
/// as a secret name (`["authorization", "Bearer …"]`), where the string
/// after it starts and ends (exclusive).
/// Only a list of two, and only a name no ordinary word reads as (not
/// `key`, `session`, `token`: `"stop": ["token", "\n"]`, `["key", "Tell
/// me about keys"]` are no credentials). A value the text ends in (cut
/// at the limit) ends with it.
fn listed_pair_value(text: &str, start: usize, end: usize) -> Option<(usize, usize)> {
    let bytes = text.as_bytes();
    let before = text[..start].trim_ascii_end();
    let name = text[start + 1..end].to_ascii_lowercase();
    let word = name == "token" || SECRET_WHOLE_NAMES.contains(&name.as_str());
    if !before.ends_with('[') || word || !is_secret_name(&name) {
        return None;
    }
    let comma = skip_space(bytes, end + 1);
    if bytes.get(comma) != Some(&b',') {
        return None;
    }
    let value = skip_space(bytes, comma + 1);
    if bytes.get(value) != Some(&b'"') {
        return None;
    }
    let Some(value_end) = string_end(bytes, value) else {
        return Some((value, text.len()));
    };
    let close = skip_space(bytes, value_end + 1);
    if close < bytes.len() && bytes[close] != b']' {
        return None;
    }
    Some((value, value_end + 1))
}

/// Whether the value at `start` of a member whose name reads as a secret
/// is one. Names that are common words (`key`, `session`, `token`) are
/// also a tool's parameters (`"key": {"type": "string"}`) or a logprob
/// (`{"token": "Hello", "logprob": -0.1}`): an object or list under them
/// is no credential, and neither is a logprob's token.
fn holds_a_credential(name: &str, bytes: &[u8], start: usize) -> bool {
    let lower = name.to_ascii_lowercase();
    let word = lower == "token" || SECRET_WHOLE_NAMES.contains(&lower.as_str());
    if !word {
        return true;
    }
    match bytes.get(start) {
        Some(b'{' | b'[') => false,
        Some(b'"') if lower == "token" => {
            let Some(end) = string_end(bytes, start) else {
                return true;
            };
            let next = skip_space(bytes, end + 1);
            if bytes.get(next) != Some(&b',') {
                return true;
            }
            let after = skip_space(bytes, next + 1);
            !bytes[after..].starts_with(b"\"logprob\"")
        }
        _ => true,
    }
}

/// Where the JSON value starting at `start` ends (exclusive); `None` when
/// the text ends first.
fn value_end(bytes: &[u8], start: usize) -> Option<usize> {
    match bytes.get(start)? {
        b'"' => string_end(bytes, start).map(|end| end + 1),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = start;
            while i < bytes.len() {
                match bytes[i] {
                    b'"' => i = string_end(bytes, i)?,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(i + 1);
                        }
                    }
                    _ => {}
                }
                i += 1;
            }
            None
        }
        _ => {
            let len = bytes[start..]
                .iter()
                .take_while(|b| !matches!(b, b',' | b'}' | b']') && !b.is_ascii_whitespace())
                .count();
            Some(start + len)
        }
    }
}

/// Masks the value after `name=`, `name:` (also `\"name\":\"value\"`)
/// for secret names: a quoted value (escaped quotes too) to its closing
/// quote, a bracketed one (`[…]`, `{…}`) to its closing bracket, any
/// other to the end of the pair (`&`, `;`, `,`, a line's end), spaces
/// included, so that `Authorization: Basic …` hides its credentials.
fn mask_pairs(text: &str) -> String {
    let bytes = text.as_bytes();
    let is_name = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.');
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        if !is_name(bytes[i]) || (i > 0 && is_name(bytes[i - 1])) {
            i += 1;
            continue;
        }
        let name_end = i + bytes[i..].iter().take_while(|b| is_name(**b)).count();
        let mut j = name_end;
        while matches!(bytes.get(j), Some(b'"' | b'\\' | b'\'')) {
            j += 1;
        }
        j = skip_space(bytes, j);
        if !matches!(bytes.get(j), Some(b':' | b'=')) || !is_secret_name(&text[i..name_end]) {
            i = name_end;
            continue;
        }
        j = skip_space(bytes, j + 1);
        if !holds_a_credential(&text[i..name_end], bytes, j) {
            i = name_end;
            continue;
        }
        let (start, len) = pair_value(&bytes[j..]);
        let start = j + start;
        if len > 0 && &text[start..start + len] != MASK {
            out.push_str(&text[copied..start]);
            out.push_str(MASK);
            copied = start + len;
        }
        i = (start + len).max(j + 1);
    }
    out.push_str(&text[copied..]);
    out
}

/// Where a pair's value starts in `rest` (past an opening quote) and how
/// long it is; to the end of `rest` when it is cut short. A quote may be
/// escaped once or more (`\"`, `\\\"`: JSON inside a JSON string, maybe
/// twice): the value ends at the next quote escaped as many times. When
/// in doubt it runs on: masking too much is the safe mistake.
fn pair_value(rest: &[u8]) -> (usize, usize) {
    let run = rest.iter().take_while(|&&b| b == b'\\').count();
    match rest.get(run) {
        Some(b'"') => {
            let body = &rest[run + 1..];
            (run + 1, closing_quote(body, run).unwrap_or(body.len()))
        }
        Some(b'\'') if run == 0 => {
            let body = &rest[1..];
            (1, memchr::memchr(b'\'', body).unwrap_or(body.len()))
        }
        Some(b'[' | b'{') if run == 0 => (0, bracketed_len(rest)),
        _ => {
            // To the end of the pair: a delimiter, a line's end, or an
            // escaped one (`\n`, `\"`) in JSON-escaped text.
            let len = rest
                .iter()
                .enumerate()
                .position(|(at, &b)| {
                    matches!(b, b'"' | b'&' | b',' | b'}' | b']' | b';' | b'\n' | b'\r')
                        || (b == b'\\'
                            && matches!(rest.get(at + 1), Some(b'n' | b'r' | b't' | b'"')))
                })
                .unwrap_or(rest.len());
            (0, rest[..len].trim_ascii_end().len())
        }
    }
}

/// How many backslashes come right before `bytes[at]`.
fn backslashes_before(bytes: &[u8], at: usize) -> usize {
    bytes[..at]
        .iter()
        .rev()
        .take_while(|&&b| b == b'\\')
        .count()
}

/// Where in `body` the quote escaped by exactly `run` backslashes starts
/// (its backslashes included).
fn closing_quote(body: &[u8], run: usize) -> Option<usize> {
    memchr::memchr_iter(b'"', body)
        .find(|&at| backslashes_before(body, at) == run)
        .map(|at| at - run)
}

/// The length of the `[…]` or `{…}` that `rest` starts with, brackets
/// inside its strings skipped; all of `rest` when it is cut short.
fn bracketed_len(rest: &[u8]) -> usize {
    let mut depth = 0usize;
    // Inside a string: the backslashes its quotes are escaped with.
    let mut string: Option<usize> = None;
    for (at, &b) in rest.iter().enumerate() {
        match (b, string) {
            (b'"', None) => string = Some(backslashes_before(rest, at)),
            (b'"', Some(run)) if backslashes_before(rest, at) == run => string = None,
            (b'[' | b'{', None) => depth += 1,
            (b']' | b'}', None) => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return at + 1;
                }
            }
            _ => {}
        }
    }
    rest.len()
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

/// A prefix, whether it is matched ignoring case, whether the token after
/// it may be base64 (`+`, `/`, `=`: a scheme's may, an `sk-` key or a JWT,
/// base64url, never is, so a path's `/` after one stays), and whether
/// that token is a credential.
type Pattern = (&'static str, bool, bool, fn(&str) -> bool);

/// Credentials recognized by their look, wherever they are: the prefix
/// kept, the token after it masked when it passes its check. A JWT
/// (`eyJ…`, base64 of `{"`) is caught outside `Bearer` too.
const PATTERNS: [Pattern; 4] = [
    ("bearer ", true, true, |token| !token.is_empty()),
    // Basic credentials are base64; prose ("basic questions") is words.
    ("basic ", true, true, |token| {
        token.len() >= 8 && !token.bytes().all(|b| b.is_ascii_lowercase())
    }),
    ("sk-", false, false, |token| token.len() >= 8),
    ("eyJ", false, false, |token| token.len() >= 16),
];

/// Masks what follows `Bearer `, `Basic `, `sk-` and `eyJ`.
fn mask_patterns(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    // Where each pattern next shows at or after `from`: searched again
    // only once passed, so the text is read once per pattern however
    // many matches it holds (a request id of `ask-ask-…` stays linear).
    let mut next: [Option<usize>; PATTERNS.len()] = [None; PATTERNS.len()];
    let find = |i: usize, from: usize| {
        let (prefix, ignore_case, ..) = PATTERNS[i];
        let rest = &text[from..];
        let at = if ignore_case {
            find_ignore_case(rest, prefix)
        } else {
            memchr::memmem::find(rest.as_bytes(), prefix.as_bytes())
        };
        at.map(|at| from + at)
    };
    for (i, slot) in next.iter_mut().enumerate() {
        *slot = find(i, 0);
    }
    let mut copied = 0;
    while let Some((i, at)) = next
        .iter()
        .enumerate()
        .filter_map(|(i, at)| at.map(|at| (i, at)))
        .min_by_key(|&(_, at)| at)
    {
        let (prefix, _, base64, accept) = PATTERNS[i];
        let after = at + prefix.len();
        // The token is read only where a word begins: read at every
        // `sk-` of `ask-ask-…`, each would run to the text's end.
        let token_len = (at >= copied && starts_a_word(bytes, at)).then(|| {
            bytes[after..]
                .iter()
                .take_while(|&&b| {
                    b.is_ascii_alphanumeric()
                        || matches!(b, b'-' | b'_' | b'.' | b'~')
                        || (base64 && matches!(b, b'+' | b'/' | b'='))
                })
                .count()
        });
        let resume = match token_len {
            Some(len) if accept(&text[after..after + len]) => {
                out.push_str(&text[copied..after]);
                out.push_str(MASK);
                copied = after + len;
                copied
            }
            _ => after,
        };
        for (j, slot) in next.iter_mut().enumerate() {
            if slot.is_some_and(|s| s < resume) {
                *slot = find(j, resume);
            }
        }
        if next[i] == Some(at) {
            next[i] = find(i, after);
        }
    }
    out.push_str(&text[copied..]);
    out
}

/// Whether a credential's prefix at `at` begins a word: not inside one
/// (`risk-assessment`, `disk-0123456789`), but after a JSON escape of a
/// line end or tab (`\nsk-…`) or a percent-encoded separator (`%20sk-`)
/// as after any other separator.
fn starts_a_word(bytes: &[u8], at: usize) -> bool {
    let Some(&before) = at.checked_sub(1).and_then(|i| bytes.get(i)) else {
        return true;
    };
    // `my_sk-learn`, `job-sk-batch`: inside a name too.
    if !before.is_ascii_alphanumeric() && !matches!(before, b'_' | b'-') {
        return true;
    }
    let escaped = at >= 2 && bytes[at - 2] == b'\\' && matches!(before, b'n' | b't' | b'r');
    let percent = at >= 3 && bytes[at - 3] == b'%' && bytes[at - 2].is_ascii_hexdigit();
    escaped || percent
}

/// `text` with every match of the ASCII `needle`, in any case, replaced.
fn replace_ignore_case(text: &str, needle: &str, with: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = find_ignore_case(rest, needle) {
        out.push_str(&rest[..at]);
        out.push_str(with);
        rest = &rest[at + needle.len()..];
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
    fn secrets_of_any_type_and_shape_are_masked() {
        assert_eq!(
            mask(
                r#"{"api_keys":["k1","k2"],"secret":{"v":"x"},"pin_token":1234,"max_tokens":50,"input_token_details":{"audio":1},"token_logprobs":[-0.1]}"#
            ),
            r#"{"api_keys":"***","secret":"***","pin_token":"***","max_tokens":50,"input_token_details":{"audio":1},"token_logprobs":[-0.1]}"#
        );
        assert_eq!(
            mask("user=bob&password=hunter2&client_secret=s%3Dx&keep=1"),
            "user=bob&password=***&client_secret=***&keep=1"
        );
        assert_eq!(
            mask(r#"{"arguments":"{\"password\":\"hunter2\",\"n\":1}"}"#),
            r#"{"arguments":"{\"password\":\"***\",\"n\":1}"}"#
        );
        assert_eq!(
            mask("my password is safe, password: hunter2 ok"),
            "my password is safe, password: ***"
        );
        // Multi-byte text around secrets is never cut inside a character.
        assert_eq!(mask("é password=ü€ é&a=é"), "é password=***&a=é");
    }

    #[test]
    fn vendor_and_session_names_are_masked() {
        assert_eq!(
            mask(
                r#"{"key":"AIzaX","private_key":"-----BEGIN","AccessKey":"A","Ocp-Apim-Subscription-Key":"s","set-cookie":"c","sessionid":"i","signature":"g","pwd":"p","keyboard":"qwerty","compass":"n"}"#
            ),
            r#"{"key":"***","private_key":"***","AccessKey":"***","Ocp-Apim-Subscription-Key":"***","set-cookie":"***","sessionid":"***","signature":"***","pwd":"***","keyboard":"qwerty","compass":"n"}"#
        );
        assert_eq!(
            mask("session=abc&pass=hunter2&X-Amz-Signature=f00&passage=ok"),
            "session=***&pass=***&X-Amz-Signature=***&passage=ok"
        );
        assert_eq!(
            mask("Cookie: session=cookieSecret7788\nAccept: */*"),
            "Cookie: ***\nAccept: */*"
        );
    }

    #[test]
    fn a_prefix_inside_a_word_is_no_credential() {
        assert_eq!(
            mask("the risk-assessment of disk-0123456789 and sk-live-0123456789"),
            "the risk-assessment of disk-0123456789 and sk-***"
        );
        assert_eq!(mask("keyJWT: eyJhbGciOiJIUzI1NiJ9x.e30"), "keyJWT: eyJ***");
        assert_eq!(
            mask("my_sk-learn-notebook job-sk-batch-2024"),
            "my_sk-learn-notebook job-sk-batch-2024"
        );
        // After an escaped line end or tab, or an encoded space, a word
        // begins.
        assert_eq!(
            mask(r#"{"content":"use this:\nsk-proj-0123456789abcdef\tBearer xyz"}"#),
            r#"{"content":"use this:\nsk-***\tBearer ***"}"#
        );
        assert_eq!(
            mask("note=my%20key%20sk-proj-0123456789ab"),
            "note=my%20key%20sk-***"
        );
    }

    #[test]
    fn many_prefixes_are_read_in_one_pass() {
        // Read at each match, these took seconds (a debug build): each
        // `sk-` inside a word read its token to the end of the text.
        let text = "ask-".repeat(16 * 1024);
        assert_eq!(mask_patterns(&text), text);
        let text = "sk-a ".repeat(16 * 1024);
        assert_eq!(mask_patterns(&text), text);
        let text = format!("x sk-{}", "ask-".repeat(16 * 1024));
        assert_eq!(mask_patterns(&text), "x sk-***");
    }

    #[test]
    fn headers_written_as_name_and_value_are_masked() {
        assert_eq!(
            mask(
                r#"{"headers":[{"name":"Authorization","value":"Token mk724abcdefgh"},{"name":"X-Api-Key","value":"mk725abcdefgh"},{"name":"Accept","value":"*/*"}]}"#
            ),
            r#"{"headers":[{"name":"Authorization","value":"***"},{"name":"X-Api-Key","value":"***"},{"name":"Accept","value":"*/*"}]}"#
        );
        assert_eq!(
            mask(r#"{"headers":[["x-api-key","mk723abcdefgh"],["accept","x"]],"key":"k1"}"#),
            r#"{"headers":[["x-api-key","***"],["accept","x"]],"key":"***"}"#
        );
        // A `value` in another object than the name is not the secret's.
        assert_eq!(
            mask(r#"[{"name":"password_policy"},{"value":"open"}]"#),
            r#"[{"name":"password_policy"},{"value":"open"}]"#
        );
        // Lists of words, and a tokenizer's name, are no pairs.
        for text in [
            r#"{"tags":["session","keynote","workshop"],"stop":["token","\n"]}"#,
            r#"{"enum":["key","value","other"],"messages":[["key","Tell me about keys"]]}"#,
            r#"{"name":"tokenizer","value":"cl100k_base"}"#,
        ] {
            assert_eq!(mask(text), text);
        }
        // Token names are secret names in pairs as in members.
        assert_eq!(
            mask(r#"{"h":[["X-Auth-Token","v0123456789"]],"tokenizer_token":"hf_x"}"#),
            r#"{"h":[["X-Auth-Token","***"]],"tokenizer_token":"***"}"#
        );
        // A pair cut at the end of the text shows none of its value.
        assert_eq!(mask(r#"[["x-api-key","mk723abc"#), r#"[["x-api-key","***""#);
    }

    #[test]
    fn words_that_are_secret_names_mask_credentials_only() {
        assert_eq!(
            mask(
                r#"{"tools":[{"parameters":{"properties":{"key":{"type":"string"},"session":[1]}}}],"logprobs":{"content":[{"token":"Hello","logprob":-0.1}]},"token":"abc","key":"k1"}"#
            ),
            r#"{"tools":[{"parameters":{"properties":{"key":{"type":"string"},"session":[1]}}}],"logprobs":{"content":[{"token":"Hello","logprob":-0.1}]},"token":"***","key":"***"}"#
        );
        // Other secret names mask whatever they hold.
        assert_eq!(mask(r#"{"api_key":{"v":1}}"#), r#"{"api_key":"***"}"#);
    }

    #[test]
    fn known_secrets_are_masked_as_forms_and_echoes_encode_them() {
        let mut known = crate::snapshot::KnownSecrets::default();
        known.add("abc/def+ghi1234==");
        known.sort();
        for body in [
            "k=abc%2Fdef%2Bghi1234%3D%3D&n=1",
            "k=abc%2fdef%2bghi1234%3d%3d&n=1",
            "k=abc%2fdef%2Bghi1234%3D%3d&n=1",
            "/x?k=abc/def%2Bghi1234%3D%3D",
            r#"{"echo":"abc\\/def+ghi1234=="}"#,
            r#"{"echo":"abc\/def+ghi1234=="}"#,
        ] {
            let text = BodyLog::of(body.as_bytes()).render(&known.0);
            assert!(!text.contains("ghi1234"), "{body} → {text}");
        }
    }

    #[test]
    fn pair_values_are_masked_whole() {
        assert_eq!(
            mask("Authorization: Basic QkFTSUM6cHc=\nAccept: */*"),
            "Authorization: ***\nAccept: */*"
        );
        // The same, escaped inside a JSON string.
        assert_eq!(
            mask(r#"{"h":"Authorization: Basic QkFT\nAccept: */*"}"#),
            r#"{"h":"Authorization: ***\nAccept: */*"}"#
        );
        assert_eq!(
            mask(r#"password = "has space PW-3" user='x' secret = 'a b'"#),
            r#"password = "***" user='x' secret = '***'"#
        );
        assert_eq!(
            mask(
                r#"{"tool":"{\"password\": [\"ARRPW-4\"], \"api_key\": {\"v\": \"OBJAK-5\"}, \"n\": 1}"}"#
            ),
            r#"{"tool":"{\"password\": ***, \"api_key\": ***, \"n\": 1}"}"#
        );
        assert_eq!(
            mask(r#"{"echo":"x \"credentials\":{\"x\":\"CREDVAL-7\"} y"}"#),
            r#"{"echo":"x \"credentials\":*** y"}"#
        );
        assert_eq!(
            mask(r#"{"t":"{\"token\": \"a b\"}"}"#),
            r#"{"t":"{\"token\": \"***\"}"}"#
        );
        // JSON inside a string inside a string.
        assert_eq!(
            mask(r#"{"e":"{\"a\":\"{\\\"password\\\":\\\"hunter2\\\"}\"}"}"#),
            r#"{"e":"{\"a\":\"{\\\"password\\\":\\\"***\\\"}\"}"}"#
        );
        // Brackets inside the strings of a bracketed secret.
        assert_eq!(
            mask(r#"{"t":"{\"password\": [\"a]b\", \"SECRET\"], \"n\": 1}"}"#),
            r#"{"t":"{\"password\": ***, \"n\": 1}"}"#
        );
    }

    #[test]
    fn secret_form_parts_and_escaped_names_are_masked() {
        let form = "--XyZ\r\nContent-Disposition: form-data; name=\"username\"\r\n\r\nalice\r\n\
             --XyZ\r\nContent-Disposition: form-data; name=\"password\"\r\n\r\nCorrect Horse 9\r\n\
             --XyZ\r\ncontent-disposition: form-data; name=\"API_KEY\"\r\n\r\nlive-123\r\n\
             --XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"secret.txt\"\r\n\
             Content-Type: text/plain\r\n\r\nplain\r\n--XyZ--\r\n";
        let masked = mask(form);
        assert!(
            masked.contains("name=\"username\"\r\n\r\nalice\r\n"),
            "{masked}"
        );
        assert!(
            masked.contains("name=\"password\"\r\n\r\n***\r\n--XyZ"),
            "{masked}"
        );
        assert!(
            masked.contains("name=\"API_KEY\"\r\n\r\n***\r\n--XyZ"),
            "{masked}"
        );
        assert!(masked.contains("\r\n\r\nplain\r\n--XyZ--"), "{masked}");
        assert!(!masked.contains("Horse") && !masked.contains("live-123"));
        // Cut short inside the secret part: nothing of it shows.
        assert_eq!(
            mask("--b\nContent-Disposition: form-data; name=\"password\"\n\nhunter2 and more"),
            "--b\nContent-Disposition: form-data; name=\"password\"\n\n***"
        );
        // Bare line feeds, a blank CRLF line further on, and a value with
        // a line of its own starting with `--` (a PEM key): all of the
        // part's content is masked, to its own boundary.
        let lf = "--b\nContent-Disposition: form-data; name=\"client_secret\"\n\n\
                  -----BEGIN KEY-----\nKEYBODY\n--tail\n--b\n\
                  Content-Disposition: form-data; name=\"n\"\n\nl1\r\n\r\nl2\n--b--";
        assert_eq!(
            mask(lf),
            "--b\nContent-Disposition: form-data; name=\"client_secret\"\n\n***\n--b\n\
             Content-Disposition: form-data; name=\"n\"\n\nl1\r\n\r\nl2\n--b--"
        );
        // A line that only begins like the boundary is content.
        let near = "--b\r\nContent-Disposition: form-data; name=\"password\"\r\n\r\n\
                    first\r\n--bX TAIL1\r\n--b\r\nContent-Disposition: form-data; name=\"n\"\r\n\r\nv\r\n--b--";
        assert_eq!(
            mask(near),
            "--b\r\nContent-Disposition: form-data; name=\"password\"\r\n\r\n***\r\n--b\r\n\
             Content-Disposition: form-data; name=\"n\"\r\n\r\nv\r\n--b--"
        );
        // Outside a part's headers, `name="…"` is just text.
        let page = "<input name=\"csrf_token\">\n\n<p>Sign in</p>";
        assert_eq!(mask(page), page);
        // Either spelling of a name counts: `token\u0073` reads `tokens`.
        assert_eq!(
            mask(r#"{"token\u0073": "t-1"}"#),
            r#"{"token\u0073": "***"}"#
        );
        assert_eq!(
            mask(r#"{"api\u005fkey": "ZQX19aaaa", "n": 1}"#),
            r#"{"api\u005fkey": "***", "n": 1}"#
        );
    }

    #[test]
    fn a_body_that_is_no_text_is_logged_as_its_size() {
        let mut audio = b"RIFF\x24\x08\x00\x00WAVEfmt ".to_vec();
        audio.extend((0..6000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
        let mut log = BodyLog::default();
        log.push(&audio);
        assert_eq!(log.render(&[]), "[6016 bytes, not text]");
        // Text with a few odd bytes is still text.
        let text = format!("{{\"text\":\"caf\u{e9} \u{1}{}\"}}", "word ".repeat(20));
        assert_eq!(BodyLog::of(text.as_bytes()).render(&[]), text);
    }

    #[test]
    fn a_secret_cut_short_is_hidden() {
        assert_eq!(
            mask(r#"{"a":"b","token":"abcdef"#),
            r#"{"a":"b","token":"***""#
        );
    }

    #[test]
    fn bare_jwts_are_masked() {
        let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl";
        assert_eq!(
            mask(&format!(
                r#"{{"assertion":"{jwt}","note":"eyJust a word"}}"#
            )),
            r#"{"assertion":"eyJ***","note":"eyJust a word"}"#
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
            mask(r#"{"access":"Basic dXNlcjpwYXNzd29yZA==","q":"basic questions"}"#),
            r#"{"access":"Basic ***","q":"basic questions"}"#
        );
        assert_eq!(
            mask(r#"{"content":"bearer 123"}"#),
            r#"{"content":"bearer ***"}"#
        );
    }

    #[test]
    fn a_known_secret_cut_at_the_limit_shows_none_of_its_head() {
        let secret = format!("known-secret-{}", "7".repeat(47));
        let mut log = BodyLog::default();
        // 30 bytes of it fit: 7 would show before the cut's mark.
        log.push("a".repeat(LIMIT - 30).as_bytes());
        log.push(secret.as_bytes());
        let text = log.render(std::slice::from_ref(&secret));
        assert!(!text.contains("known"), "{}", &text[LIMIT - 60..]);
        assert!(text.contains("a***… ["), "{}", &text[LIMIT - 60..]);
        // Whole, anywhere, it is masked too.
        let text = BodyLog::of(format!("x {secret} y").as_bytes()).render(&[secret]);
        assert_eq!(text, "x *** y");
    }

    #[test]
    fn long_bodies_are_cut_at_the_limit() {
        let mut log = BodyLog::default();
        log.push(&[b'a'; 3000]);
        log.push(&[b'b'; 3000]);
        let text = log.render(&[]);
        assert!(text.starts_with(&"a".repeat(3000)));
        let mark = "… [6000 bytes in all]";
        assert!(text.ends_with(mark), "{}", &text[4000..]);
        assert_eq!(text.len(), LIMIT, "the mark fits in the limit");
        assert_eq!(text.matches('b').count(), LIMIT - 3000 - mark.len() + 1);
    }

    #[test]
    fn masking_and_multibyte_text_stay_within_the_limit() {
        // Short secrets grow when masked: the body fits, its log did not.
        let body = r#"{"secret":"a"}"#.repeat(LIMIT / 14);
        assert!(body.len() <= LIMIT);
        let text = BodyLog::of(body.as_bytes()).render(&[]);
        assert!(text.len() <= LIMIT, "{}", text.len());
        assert!(text.ends_with(" bytes in all]"), "{}", &text[4000..]);
        assert!(!text.contains(r#""a""#));
        // A cut never splits a character.
        let text = BodyLog::of("é".repeat(LIMIT).as_bytes()).render(&[]);
        assert!(text.len() <= LIMIT && text.starts_with("éé"));
    }
}
