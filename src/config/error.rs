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
            self.file, self.line, self.col, self.message
        )
    }
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
