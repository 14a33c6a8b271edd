//! Config loading: bytes → validated [`Snapshot`]. One [`load`] serves
//! `sluice run`, `sluice check` and reload, so they can never disagree.

pub mod compile;
pub mod error;
pub mod expand;
pub mod raw;
pub mod units;

use std::path::Path;

pub use error::{ConfigError, ConfigErrors};

use crate::snapshot::Snapshot;

/// Reads, parses and compiles the file at `path`, taking `${VAR}`s from the
/// process environment.
pub fn load(path: &Path) -> Result<Snapshot, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.display().to_string(),
            line: 0,
            col: 0,
            message: format!("cannot read config: {e}"),
        }])
    })?;
    let base_dir = path.parent().unwrap_or(Path::new("."));
    load_str(&text, &path.display().to_string(), base_dir, &|name| {
        std::env::var(name).ok()
    })
}

/// Parses and compiles config text; `file` names it in errors.
pub fn load_str(
    text: &str,
    file: &str,
    base_dir: &Path,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Snapshot, ConfigErrors> {
    let options = serde_saphyr::options! { with_snippet: false };
    let raw: raw::RawConfig = serde_saphyr::from_str_with_options(text, options)
        .map_err(|e| ConfigErrors(vec![parse_error(file, &e)]))?;
    compile::compile(raw, file, base_dir, env).map_err(ConfigErrors)
}

fn parse_error(file: &str, e: &serde_saphyr::Error) -> ConfigError {
    let (line, col) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((0, 0));
    let rendered = e.without_snippet().to_string();
    // The crate appends its own " at line X column Y"; we print the place
    // once, in front, as `file:line:col`.
    let message = match rendered.rfind(" at line ") {
        Some(i) => rendered[..i].to_owned(),
        None => rendered,
    };
    ConfigError {
        file: file.to_owned(),
        line,
        col,
        message,
    }
}
