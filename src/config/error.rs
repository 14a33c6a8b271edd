//! Config errors: every problem found in a config file, with the place it
//! points at, printed as `file:line:col: message` by `sluice check` and `run`.

use std::fmt;

/// One problem in a config file. `line`/`col` are 1-based; 0 means the
/// position is unknown (an error about the file as a whole).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: u64,
    pub col: u64,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            one_line(&self.file),
            self.line,
            self.col,
            one_line(&self.message)
        )
    }
}

/// `text` with its control characters escaped (`\n`, `\u{1b}`): an error
/// quoting a value that holds a newline stays one line, as `check`'s
/// readers and `run`'s one-line exit expect.
fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Logs config warnings (a reload's, or the first load's once logging is
/// up) at warn level.
pub fn log_warnings(warnings: &[ConfigError]) {
    for w in warnings {
        tracing::warn!(target: "sluice::config", "{w}");
    }
}

/// All the errors of one load, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_one_line_whatever_it_quotes() {
        let e = ConfigError {
            file: "a.yaml".into(),
            line: 3,
            col: 9,
            message: "`127.0.0.1:1\nINJECTED: x\u{1b}` is not a listen address".into(),
        };
        assert_eq!(
            e.to_string(),
            "a.yaml:3:9: `127.0.0.1:1\\nINJECTED: x\\u{1b}` is not a listen address"
        );
    }
}
