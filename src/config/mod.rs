//! Config loading: bytes → validated [`Snapshot`]. One [`load`] serves
//! `sluice run`, `sluice check` and reload, so they can never disagree.

pub mod compile;
pub mod error;
pub mod expand;
pub mod raw;
mod recover;
mod redact;
mod tags;
pub mod units;

use std::path::Path;

pub use error::{ConfigError, ConfigErrors, log_warnings};

use crate::snapshot::Snapshot;

/// The largest file a config names (or is) that sluice reads: configs,
/// PEM files, JWKS documents and schemas are kilobytes.
pub const FILE_CAP: u64 = 16 << 20;

/// The bytes of a file the config names, refusing what is not a regular
/// file or is over [`FILE_CAP`]: `/dev/zero` or a runaway log must be an
/// error, not a process out of memory.
pub fn read_file(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    // Before opening: opening a FIFO blocks until a writer comes.
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    if meta.len() > FILE_CAP {
        return Err(std::io::Error::other("larger than 16 MiB"));
    }
    // The file may have grown since: the read is bounded anyway.
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    std::fs::File::open(path)?
        .take(FILE_CAP + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > FILE_CAP {
        return Err(std::io::Error::other("larger than 16 MiB"));
    }
    Ok(bytes)
}

/// What is wrong with a PEM file, in words that never quote it:
/// rustls' own messages print the offending line, and a key whose line
/// breaks were lost (pasted from an env var) is one line.
pub fn pem_problem(e: &rustls_pki_types::pem::Error) -> &'static str {
    use rustls_pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { .. } => {
            "a PEM section has no END line (were its line breaks lost?)"
        }
        Error::IllegalSectionStart { .. } => "a PEM BEGIN line is malformed",
        Error::Base64Decode(_) => "a PEM section is not valid base64",
        Error::NoItemsFound => "no PEM section of the expected kind",
        Error::SectionTooLarge => "a PEM section is over 256 MB",
        _ => "not valid PEM",
    }
}

/// Why a JSON document did not parse, and where, without quoting it:
/// serde's messages quote the values they met, and a document fetched
/// from a server may reflect a token from its URL.
pub fn json_problem(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Io => "could not be read",
        Category::Syntax => "is not valid JSON",
        Category::Data => "does not have the expected members",
        Category::Eof => "ends too early",
    };
    format!("{what} (line {}, column {})", e.line(), e.column())
}

/// [`read_file`] as UTF-8 text.
pub fn read_text(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_file(path)?)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// The text of the config file at `path` (shown as `file`), or why it
/// cannot be had: at the first byte that is not UTF-8, else about the
/// file as a whole, at its first position (which exists, as 0:0 does
/// not, and keeps SPEC §1's `file:line:col: message`).
pub fn read_config(path: &Path, file: &str) -> Result<String, ConfigError> {
    let error = |line, col, message| ConfigError {
        file: file.to_owned(),
        line,
        col,
        message,
    };
    let bytes = read_file(path).map_err(|e| error(1, 1, format!("cannot read config: {e}")))?;
    // Said as it is, not as "no routes": a file emptied to be written
    // again (`>` in a shell) may be read in between.
    if bytes.trim_ascii().is_empty() {
        return Err(error(1, 1, "the config file is empty".to_owned()));
    }
    String::from_utf8(bytes).map_err(|e| {
        let before = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        // In characters, as every other error's column.
        let col = std::str::from_utf8(&before[line_start..]).map_or(0, |s| s.chars().count()) + 1;
        error(
            line as u64,
            col as u64,
            "cannot read config: this byte is not UTF-8 (a config file is UTF-8 text)".to_owned(),
        )
    })
}

/// Reads, parses and compiles the file at `path`, taking `${VAR}`s from the
/// process environment.
pub fn load(path: &Path) -> Result<Snapshot, ConfigErrors> {
    let text = read_config(path, &path.display().to_string()).map_err(|e| ConfigErrors(vec![e]))?;
    let base_dir = path.parent().unwrap_or(Path::new("."));
    load_str(&text, &path.display().to_string(), base_dir, &process_env)
}

/// The process's variable `name`. One set to bytes that are not UTF-8
/// is read with U+FFFD in their place, which the config refuses: taken
/// as unset, it would have let a `${KEY:-default}` fall back to its
/// default, a development key, without a word.
pub fn process_env(name: &str) -> Option<String> {
    std::env::var_os(name).map(|value| {
        value
            .into_string()
            .unwrap_or_else(|raw| raw.to_string_lossy().into_owned())
    })
}

/// Parses and compiles config text; `file` names it in errors.
pub fn load_str(
    text: &str,
    file: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Snapshot, ConfigErrors> {
    load_str_beside(text, file, base_dir, env, &[])
}

/// [`load_str`] for a config that would replace a running one: `bound`
/// are the addresses its listeners hold, which a reload does not move,
/// so an upstream there is sluice itself too.
pub fn load_str_beside(
    text: &str,
    file: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    bound: &[std::net::SocketAddr],
) -> Result<Snapshot, ConfigErrors> {
    let mut errors = Vec::new();
    // Unknown keys blanked so far, to tell a misspelt required key, and
    // where values were blanked, to tell the errors that blanking made.
    let mut blanked: Vec<recover::Blanked> = Vec::new();
    let mut blanked_values: Vec<(u64, u64)> = Vec::new();
    // The keys whose values were replaced by a stand-in.
    let mut stand_ins: Vec<recover::Blanked> = Vec::new();
    // Tags are refused where written; the reading below goes on past
    // those it cannot take, as it would past any value of a wrong type.
    let (tagged, untagged) = tags::refused(text);
    errors.extend(tagged.into_iter().map(|t| ConfigError {
        file: file.to_owned(),
        line: t.line,
        col: t.col,
        message: t.message,
    }));
    let mut text = match untagged {
        Some(untagged) => std::borrow::Cow::Owned(untagged),
        None => std::borrow::Cow::Borrowed(text),
    };
    loop {
        let options = serde_saphyr::options! { with_snippet: false };
        match serde_saphyr::from_str_with_options::<raw::RawConfig>(&text, options) {
            Ok(raw) => match compile::compile(raw, file, base_dir, env, bound) {
                Ok(mut snapshot) if errors.is_empty() => {
                    for warning in &mut snapshot.warnings {
                        warning.message = redact::message(std::mem::take(&mut warning.message));
                    }
                    return Ok(snapshot);
                }
                Ok(_) => break,
                Err(more) => {
                    // A required key reported missing where a key was
                    // blanked (misspelt, or its value of the wrong type)
                    // was reported already.
                    // So was a value replaced by a stand-in, which the
                    // checks may then refuse in turn.
                    errors.extend(more.into_iter().filter(|e| {
                        missing_field(&e.message)
                            .is_none_or(|key| !recover::misspelt(key, e.line, e.col, &blanked))
                            && !drawn_by_stand_in(e, &text, &blanked_values, &stand_ins)
                    }));
                    break;
                }
            },
            Err(e) => {
                let error = parse_error(file, &e, &text);
                if let Some(missing) = missing_field(&error.message) {
                    // A required key that was misspelt is now missing,
                    // and was reported as unknown; another one is an
                    // error of its own. Either way nothing can fill it.
                    if !recover::misspelt(missing, error.line, error.col, &blanked) {
                        errors.push(error);
                    }
                    break;
                }
                if blanked_values
                    .iter()
                    .any(|&(line, col)| error.line == line && error.col <= col)
                {
                    // The null left where a value was blanked, reported
                    // (at its key's `:` or at the value) as that value.
                    break;
                }
                // Past an unknown key, or a value of the wrong type, the
                // rest of the file can still be read: the key or the
                // value is blanked and the file parsed again.
                let next = if errors.len() >= MAX_PARSE_ERRORS {
                    None
                } else if let Some(key) = unknown_field(&error.message) {
                    blanked.push(recover::Blanked {
                        name: key.to_owned(),
                        line: error.line,
                        col: error.col,
                    });
                    recover::without_key(&text, error.line, error.col)
                } else if error.message.starts_with(DUPLICATE_KEY) {
                    // The first one stands; the copy is reported and the
                    // rest of the file read as if it were not there.
                    recover::without_key(&text, error.line, error.col)
                } else {
                    blanked_values.push((error.line, error.col));
                    let key = recover::key_of_value(&text, error.line, error.col);
                    stand_ins.extend(key.clone());
                    blanked.extend(key);
                    recover::without_value(
                        &text,
                        error.line,
                        error.col,
                        recover::Wanted::of(&error.message),
                    )
                };
                errors.push(error);
                match next {
                    Some(rest) => text = rest.into(),
                    None => break,
                }
            }
        }
    }
    errors.sort_by_key(|e| (e.line, e.col));
    if errors.len() >= MAX_PARSE_ERRORS
        && let Some(last) = errors.last()
    {
        // Not silently: a file with more errors than this must not look
        // as if these were all of them.
        let (line, col, count) = (last.line, last.col, errors.len());
        errors.push(ConfigError {
            file: file.to_owned(),
            line,
            col,
            message: format!("{STOPPED_READING} {count} errors; fix these and check again"),
        });
    }
    for error in &mut errors {
        error.message = redact::message(std::mem::take(&mut error.message));
    }
    Err(ConfigErrors(errors))
}

/// Whether a check's error is the consequence of a stand-in (see
/// [`recover::without_value`]) rather than an error of its own: at the
/// stand-in itself, or about its key (`pool `p` has no members` for
/// `members: a`) from the mapping that holds it: on its line, or above
/// it with every line after it, the stand-in's included, indented at
/// least as deep as that mapping (where the error points).
fn drawn_by_stand_in(
    e: &ConfigError,
    text: &str,
    values: &[(u64, u64)],
    stand_ins: &[recover::Blanked],
) -> bool {
    let names = |name: &str| {
        e.message.match_indices(name).any(|(at, _)| {
            let word = |c: char| c.is_alphanumeric() || c == '_';
            !e.message[..at].ends_with(word) && !e.message[at + name.len()..].starts_with(word)
        })
    };
    let holds = |s: &recover::Blanked| {
        if e.line > s.line {
            return false;
        }
        // Lines are 1-based: those after the error's, to the stand-in's.
        let first = usize::try_from(e.line).unwrap_or(usize::MAX);
        let count = usize::try_from(s.line - e.line).unwrap_or(0);
        text.lines().skip(first).take(count).all(|l| {
            let body = l.trim_start_matches(' ');
            let indent = u64::try_from(l.len() - body.len()).unwrap_or(u64::MAX);
            body.trim().is_empty() || body.starts_with('#') || indent + 1 >= e.col
        })
    };
    values.contains(&(e.line, e.col)) || stand_ins.iter().any(|s| names(&s.name) && holds(s))
}

/// The key of serde's "unknown field `x`, expected …".
fn unknown_field(message: &str) -> Option<&str> {
    message.strip_prefix("unknown field `")?.split('`').next()
}

/// The key of serde's "missing field `x`".
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.split('`').next()
}

/// How a key written twice in one mapping is reported.
const DUPLICATE_KEY: &str = "duplicate key ";

/// Parse errors reported before `check` gives up on a file (each one costs
/// a parse of it).
const MAX_PARSE_ERRORS: usize = 32;

/// How the note that ends a list of errors cut short begins (it is no
/// error of its own).
pub const STOPPED_READING: &str = "stopped reading after";

/// A parser message said as the rest of sluice's errors are, where the
/// library's own words would puzzle a user (its option names, its types).
fn in_our_words(message: String) -> String {
    if let Some(rest) = message.strip_prefix("duplicate mapping key: ") {
        let key = rest
            .split(", set DuplicateKeyPolicy")
            .next()
            .unwrap_or(rest);
        return format!("{DUPLICATE_KEY}`{key}`");
    }
    if message == "data did not match any variant of untagged enum RawValidate" {
        return "validate must be none, openai or { schema_file: PATH }".to_owned();
    }
    if message.starts_with("multiple YAML documents detected") {
        return "the file holds more than one YAML document (a `---` line between them); a config is one".to_owned();
    }
    if message.starts_with("budget breached") {
        return "the file has more YAML nodes than a config can (aliases expanding without end, or a file that is no config)".to_owned();
    }
    if message.starts_with("cannot deserialize null into string") {
        return "a value is needed here, not null (`~` or `null`; quote it to mean the text)"
            .to_owned();
    }
    if message == "expected sequence start" {
        return "expected a list here (`[a, b]`, or `- a` lines)".to_owned();
    }
    if message == "expected string scalar" {
        return "expected a single value here, not a list or mapping (quote a value that starts with `[` or `{`, as in \"[::]:8080\")".to_owned();
    }
    if message == "expected mapping start" {
        return "expected a mapping here (`key: value` lines)".to_owned();
    }
    message
}

/// Whether `text` is exactly `N column M` or `N, column M` (the end of
/// the crate's place, which a message may also hold within it).
fn is_place(text: &str) -> bool {
    let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    text.split_once(" column ")
        .is_some_and(|(line, col)| number(line.strip_suffix(',').unwrap_or(line)) && number(col))
}

fn parse_error(file: &str, e: &serde_saphyr::Error, text: &str) -> ConfigError {
    let (mut line, mut col) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    let rendered = e.without_snippet().to_string();
    // The crate appends its own " at line X column Y"; we print the place
    // once, in front, as `file:line:col`.
    let message = match rendered.rfind(" at line ") {
        Some(i) if is_place(&rendered[i + " at line ".len()..]) => rendered[..i].to_owned(),
        _ => rendered,
    };
    let mut message = in_our_words(message);
    // The scanner says where it was when it met the tab (the end of the
    // line before, often): the tab itself is what to point at.
    if (message.contains("found a tab") || message.contains("tabs disallowed"))
        && let Some((tab_line, tab_col)) = indenting_tab(text, line)
    {
        (line, col) = (tab_line, tab_col);
        message = "a tab in this line's indentation: YAML indents with spaces only".to_owned();
    }
    ConfigError {
        file: file.to_owned(),
        line,
        col,
        message,
    }
}

/// The first tab in a line's leading whitespace, from line `from` on
/// (1-based line and column).
fn indenting_tab(text: &str, from: u64) -> Option<(u64, u64)> {
    text.lines()
        .zip(1u64..)
        .skip(usize::try_from(from.saturating_sub(1)).unwrap_or(0))
        .find_map(|(l, number)| {
            let indent = &l[..l.len() - l.trim_start_matches([' ', '\t']).len()];
            let at = indent.find('\t')?;
            Some((number, at as u64 + 1))
        })
}
