//! `${VAR}` and `${VAR:-default}` in config strings, resolved from the
//! environment when the config is compiled (so a reload sees new values).

/// Expands every `${…}` in `text`. `lookup` returns a variable's value;
/// an unset variable with no default is an error naming it; the default
/// also replaces a variable set to the empty string, as in the shell. A
/// default may hold references of its own (`${A:-${B}}`, as in docker
/// compose), expanded only when it is used. `$$` stays a literal `$` so
/// that values may contain `${` when they must.
///
/// ```
/// use sluice::config::expand::expand;
///
/// let env = |name: &str| (name == "KEY").then(|| "s3cret".to_owned());
/// assert_eq!(expand("Bearer ${KEY}", env).unwrap(), "Bearer s3cret");
/// assert_eq!(expand("${PORT:-8080}", env).unwrap(), "8080");
/// assert!(expand("${MISSING}", env).is_err());
/// ```
pub fn expand(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    // Every unset variable of the value is named, defaults' included,
    // not only the first.
    let mut missing = Vec::new();
    let out = expand_with(text, &lookup, 0, &mut missing)?;
    match missing.as_slice() {
        [] => Ok(out),
        [name] => Err(format!(
            "environment variable `{name}` is not set (use `${{{name}:-default}}` for a default)"
        )),
        names => Err(format!(
            "environment variables {} are not set (use `${{NAME:-default}}` for a default)",
            names
                .iter()
                .map(|name| format!("`{name}`"))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// The values `text`'s set variables hold, each on its own (a default
/// is not one: the file writes it). A variable that is only part of a
/// value (`sid=${SESSION}`) is a secret of its own.
pub fn variable_values(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Vec<String> {
    let values = std::cell::RefCell::new(Vec::new());
    let _ = expand(text, |name| {
        let value = lookup(name)?;
        if !value.is_empty() {
            values.borrow_mut().push(value.clone());
        }
        Some(value)
    });
    values.into_inner()
}

/// Defaults nested deeper than this are refused: no config needs them,
/// and each level is a recursion.
const MAX_NESTING: usize = 8;

/// `text` expanded; unset variables without a default are added to
/// `missing` (and expand to nothing); `Err` for a reference that does not
/// parse.
fn expand_with<'t>(
    text: &'t str,
    lookup: &dyn Fn(&str) -> Option<String>,
    depth: usize,
    missing: &mut Vec<&'t str>,
) -> Result<String, String> {
    if depth > MAX_NESTING {
        return Err(format!(
            "`${{…}}` defaults are nested more than {MAX_NESTING} deep"
        ));
    }
    if !text.contains('$') {
        return Ok(text.to_owned());
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = closing_brace(body).ok_or_else(|| "unterminated `${` in value".to_owned())?;
            let inner = &body[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (inner, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("`${{{inner}}}` is not a valid variable reference"));
            }
            match (lookup(name), default) {
                // As in the shell and docker compose, `:-` also covers a
                // variable set to the empty string.
                (Some(value), Some(default)) if value.is_empty() => {
                    out.push_str(&expand_with(default, lookup, depth + 1, missing)?);
                }
                (Some(value), _) => out.push_str(&value),
                (None, Some(default)) => {
                    out.push_str(&expand_with(default, lookup, depth + 1, missing)?);
                }
                (None, None) => missing.push(name),
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Where the `}` closing a `${` ends, in `body` (the text after `${`):
/// the first one outside any nested `${…}`.
fn closing_brace(body: &str) -> Option<usize> {
    let bytes = body.as_bytes();
    let mut depth = 0usize;
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], bytes.get(i + 1)) {
            (b'$', Some(b'$')) => i += 1,
            (b'$', Some(b'{')) => {
                depth += 1;
                i += 1;
            }
            (b'}', _) if depth == 0 => return Some(i),
            (b'}', _) => depth -= 1,
            _ => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "KEY" => Some("s3cret".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn variables_defaults_and_literals() {
        assert_eq!(expand("Bearer ${KEY}", env).unwrap(), "Bearer s3cret");
        assert_eq!(expand("${NOPE:-20ms}", env).unwrap(), "20ms");
        assert_eq!(expand("${NOPE:-}", env).unwrap(), "");
        assert_eq!(expand("${EMPTY:-x}", env).unwrap(), "x");
        assert_eq!(expand("${EMPTY}", env).unwrap(), "");
        assert_eq!(expand("a$$b $5", env).unwrap(), "a$b $5");
        assert_eq!(expand("plain", env).unwrap(), "plain");
    }

    #[test]
    fn defaults_may_hold_references() {
        assert_eq!(expand("${NOPE:-${KEY}}", env).unwrap(), "s3cret");
        assert_eq!(expand("${EMPTY:-${NOPE:-x}}!", env).unwrap(), "x!");
        // Used only when needed: a set variable skips its default.
        assert_eq!(expand("${KEY:-${NOPE}}", env).unwrap(), "s3cret");
        let err = expand("${NOPE:-${ALSO_NOPE}}", env).unwrap_err();
        assert!(err.contains("`ALSO_NOPE` is not set"), "{err}");
        assert_eq!(expand("${NOPE:-a$${b}}", env).unwrap(), "a${b}");
        assert!(
            expand("${NOPE:-${KEY}", env)
                .unwrap_err()
                .contains("unterminated")
        );
    }

    #[test]
    fn missing_variable_is_named() {
        let err = expand("${OPENAI_API_KEY}", env).unwrap_err();
        assert!(err.contains("`OPENAI_API_KEY` is not set"), "{err}");
        assert!(expand("${KEY", env).unwrap_err().contains("unterminated"));
        assert!(expand("${A B}", env).is_err());
    }
}
