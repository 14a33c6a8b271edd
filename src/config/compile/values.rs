//! Reading one setting: `${VAR}` expansion, units, numbers and choices,
//! each problem recorded at its position in the file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde_saphyr::Location;

use crate::config::error::ConfigError;
use crate::config::expand::expand;
use crate::config::raw::*;
use crate::config::units::{parse_duration, parse_size};

use super::Compiler;

impl Compiler<'_> {
    pub(super) fn error(&mut self, at: &Location, message: impl Into<String>) {
        let message = self.as_written(message.into());
        self.record(at, message);
    }

    /// Refuses a name that would label nothing: empty, blank, or holding
    /// a control character (a newline in a metric label or a log field).
    pub(super) fn check_name(&mut self, what: &str, name: &str, at: &Location) {
        if name.trim().is_empty() {
            self.error(at, format!("{what} is empty"));
        } else if name.chars().any(char::is_control) {
            self.error(at, format!("{what} `{name}` holds a control character"));
        }
    }

    /// Records `message` as it is: [`Compiler::error`] without hiding
    /// what variables made.
    pub(super) fn record(&mut self, at: &Location, message: String) {
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            line: at.line(),
            col: at.column(),
            message,
        });
    }

    /// `message` quoting values as written where a `${VAR}` made them: a
    /// variable may hold a secret, and config errors reach `check`'s
    /// output and the reload log. A quoted value (`` `…` ``) is put back
    /// whole; a long one (a key, a token) wherever it appears.
    pub(super) fn as_written(&self, message: String) -> String {
        if self.expansions.is_empty() {
            return message;
        }
        // Values are read trimmed too: a file's value often ends in `\n`.
        let mut swaps: Vec<(String, String)> = Vec::new();
        for (value, written) in &self.expansions {
            for value in [value.as_str(), value.trim()] {
                swaps.push((format!("`{value}`"), format!("`{written}`")));
                if value.is_empty() {
                    continue;
                }
                if value.len() >= 8 {
                    swaps.push((value.to_owned(), written.clone()));
                }
            }
        }
        // Longest first, so a value inside another does not leave the rest
        // of the longer one showing; one pass, so what was put back (which
        // may hold its own default) is never replaced again.
        swaps.sort_by_key(|(value, _)| std::cmp::Reverse(value.len()));
        let mut out = String::with_capacity(message.len());
        let mut rest = message.as_str();
        'scan: while let Some(ch) = rest.chars().next() {
            for (value, written) in &swaps {
                if let Some(after) = rest.strip_prefix(value.as_str()) {
                    out.push_str(written);
                    rest = after;
                    continue 'scan;
                }
            }
            out.push(ch);
            rest = &rest[ch.len_utf8()..];
        }
        out
    }

    /// Something that works but that the operator should fix; `check`
    /// prints it and `run` logs it.
    pub(super) fn warning(&mut self, at: &Location, message: impl Into<String>) {
        self.warnings.push(ConfigError {
            file: self.file.to_owned(),
            line: at.line(),
            col: at.column(),
            message: format!("warning: {}", self.as_written(message.into())),
        });
    }

    /// A key the schema requires, or `None` after reporting it missing
    /// at `mapping` (where serde would have stopped at it).
    pub(super) fn required<'t, T>(
        &mut self,
        value: &'t Option<T>,
        mapping: &Location,
        key: &str,
    ) -> Option<&'t T> {
        if value.is_none() {
            self.error(mapping, format!("missing field `{key}`"));
        }
        value.as_ref()
    }

    /// The expanded string, or `None` after recording why not.
    pub(super) fn text(&mut self, t: &Text) -> Option<String> {
        self.expanded(&t.value.0, &t.referenced)
    }

    /// `raw` with its `${VAR}`s expanded; an error points at `at`.
    pub(super) fn expanded(&mut self, raw: &str, at: &Location) -> Option<String> {
        match expand(raw, self.env) {
            Ok(s)
                if s.contains(char::REPLACEMENT_CHARACTER)
                    && !raw.contains(char::REPLACEMENT_CHARACTER) =>
            {
                // Named, as an unset one is (its value never shows).
                let named = std::cell::RefCell::new(None);
                let _ = expand(raw, |name| {
                    let value = (self.env)(name)?;
                    if value.contains(char::REPLACEMENT_CHARACTER) {
                        named.borrow_mut().get_or_insert_with(|| name.to_owned());
                    }
                    Some(value)
                });
                let message = match named.into_inner() {
                    Some(name) => {
                        format!("environment variable `{name}` holds bytes that are not UTF-8")
                    }
                    None => "an environment variable of this value holds bytes that are not UTF-8"
                        .to_owned(),
                };
                self.error(at, message);
                None
            }
            Ok(s) => {
                if s != raw {
                    self.expansions.push((s.clone(), raw.to_owned()));
                }
                Some(s)
            }
            Err(e) => {
                self.error(at, e);
                None
            }
        }
    }

    /// Expands then parses with `parse`; the error message names `what`.
    /// A value that variables made is quoted as written (`${PORT:-8080}`),
    /// never as made: a variable may hold a secret. The message says so,
    /// or a valid-looking default would read as the fault.
    pub(super) fn parsed<T>(
        &mut self,
        t: &Text,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let s = self.text(t)?;
        match parse(&s) {
            Ok(v) => Some(v),
            Err(e) => {
                let message = self.as_written(e);
                self.record_quoting(t, &s, message);
                None
            }
        }
    }

    /// Refuses a value that parsed but is out of range: `message` gets
    /// it as written in the file (`${RATE}`, never what the variable
    /// holds), with the same note as [`Compiler::parsed`]'s.
    pub(super) fn out_of_range(&mut self, t: &Text, message: impl FnOnce(&str) -> String) {
        let message = message(&format!("`{}`", t.value.0.trim()));
        let made = expand(&t.value.0, self.env).unwrap_or_default();
        self.record_quoting(t, &made, message);
    }

    /// Records `message` about `t`, whose value `made` is, saying when
    /// variables made it: defaults are written in the file, so a value
    /// they alone made is shown whole; a variable's own value never is.
    pub(super) fn record_quoting(&mut self, t: &Text, made: &str, mut message: String) {
        if expand(&t.value.0, |_| None).ok().as_deref() != Some(made) {
            message.push_str(" (as its variables made it; their values are not shown)");
        }
        self.record(&t.referenced, message);
    }

    pub(super) fn duration(&mut self, t: &Option<Text>, default: Duration) -> Duration {
        t.as_ref()
            .and_then(|t| self.parsed(t, parse_duration))
            .unwrap_or(default)
    }

    pub(super) fn opt_duration(&mut self, t: &Option<Text>) -> Option<Duration> {
        t.as_ref().and_then(|t| self.parsed(t, parse_duration))
    }

    pub(super) fn size(&mut self, t: &Option<Text>, default: u64) -> u64 {
        t.as_ref()
            .and_then(|t| self.parsed(t, parse_size))
            .unwrap_or(default)
    }

    pub(super) fn number<T: FromStr>(&mut self, t: &Text, what: &str) -> Option<T> {
        self.parsed(t, |s| {
            // `500_000` reads as YAML wrote it.
            let digits = s.trim().replace('_', "");
            digits.parse::<T>().map_err(|_| {
                if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                    format!("`{s}` is too large here")
                } else {
                    format!("`{s}` is not {what}")
                }
            })
        })
    }

    pub(super) fn opt_u64(&mut self, t: &Option<Text>) -> Option<u64> {
        t.as_ref()
            .and_then(|t| self.number(t, "a non-negative whole number"))
    }

    /// A limit: a whole number of at least 1. Zero is refused rather than
    /// guessed at: some read it as "no limit", others as "refuse all".
    pub(super) fn opt_limit(&mut self, t: &Option<Text>) -> Option<u64> {
        let n = self.opt_u64(t)?;
        if n == 0 {
            if let Some(t) = t {
                self.error(
                    &t.referenced,
                    "a limit must be at least 1 (leave it out for no limit)",
                );
            }
            return None;
        }
        if n > MAX_PER_MINUTE {
            if let Some(t) = t {
                self.error(
                    &t.referenced,
                    format!("a limit must be at most {MAX_PER_MINUTE} (leave it out for no limit)"),
                );
            }
            return None;
        }
        Some(n)
    }

    /// A duration that must be above zero: zero would fail (or spin)
    /// every time it is used.
    pub(super) fn positive_duration(
        &mut self,
        t: &Option<Text>,
        default: Duration,
        name: &str,
    ) -> Duration {
        let d = self.duration(t, default);
        if let (true, Some(t)) = (d.is_zero(), t) {
            self.error(&t.referenced, format!("{name} must be above 0"));
        }
        d
    }

    /// A daily budget: above zero (left out, there is none; zero reads
    /// both ways, as a limit of 0 does).
    pub(super) fn budget_usd(&mut self, t: &Option<Text>, name: &str) -> Option<f64> {
        let v = self.opt_usd(t)?;
        if v == 0.0
            && let Some(t) = t
        {
            self.error(
                &t.referenced,
                format!("{name} must be above 0 (leave it out for no budget)"),
            );
        }
        Some(v)
    }

    pub(super) fn opt_usd(&mut self, t: &Option<Text>) -> Option<f64> {
        let t = t.as_ref()?;
        let v: f64 = self.number(t, "a number")?;
        if v.is_finite() && (0.0..=MAX_USD).contains(&v) {
            Some(v)
        } else {
            self.out_of_range(t, |written| {
                format!("{written} must be a non-negative amount of at most {MAX_USD} USD")
            });
            None
        }
    }

    pub(super) fn bool(&mut self, t: &Option<Text>, default: bool) -> bool {
        t.as_ref()
            .and_then(|t| {
                self.parsed(t, |s| match s.trim().to_ascii_lowercase().as_str() {
                    "true" | "yes" | "on" => Ok(true),
                    "false" | "no" | "off" => Ok(false),
                    _ => Err(format!("`{s}` is not true or false (or yes/no, on/off)")),
                })
            })
            .unwrap_or(default)
    }

    /// One of a fixed set of words.
    pub(super) fn choice<T: Copy>(
        &mut self,
        t: &Option<Text>,
        options: &[(&str, T)],
        default: T,
    ) -> T {
        let Some(t) = t else { return default };
        self.parsed(t, |s| match options.iter().find(|(name, _)| *name == s) {
            Some((_, v)) => Ok(*v),
            None => {
                let names: Vec<_> = options.iter().map(|(n, _)| *n).collect();
                Err(format!("`{s}` is not one of: {}", names.join(", ")))
            }
        })
        .unwrap_or(default)
    }

    pub(super) fn addr(&mut self, t: &Option<Text>, default: &str) -> SocketAddr {
        let fallback = SocketAddr::from(([0, 0, 0, 0], 0));
        match t {
            None => default.parse().unwrap_or(fallback),
            Some(t) => self
                .parsed(t, |s| {
                    s.parse::<SocketAddr>().map_err(|_| {
                        format!("`{s}` is not a listen address like 0.0.0.0:8080 or [::]:8080")
                    })
                })
                .unwrap_or(fallback),
        }
    }

    pub(super) fn path(&mut self, t: &Text) -> Option<PathBuf> {
        let s = self.text(t)?;
        if s.trim().is_empty() {
            // Joined to the config's directory, it would name that
            // directory, and the error would say so instead.
            self.error(&t.referenced, "the file path is empty");
            return None;
        }
        Some(self.base_dir.join(s))
    }

    /// The path of a file the config reads its contents from.
    pub(super) fn source(&mut self, t: &Text) -> Option<PathBuf> {
        let path = self.path(t)?;
        Some(self.add_source(path))
    }

    pub(super) fn add_source(&mut self, path: PathBuf) -> PathBuf {
        self.sources.push(path.clone());
        path
    }
}

/// The largest per-minute limit: far past any real traffic, and small
/// enough that the buckets' arithmetic in `f64` stays exact (and the
/// `x-ratelimit-*` headers agree with each other).
/// A bucket counts its units in nanoseconds of a minute: past this, a
/// unit would take less than one and the limit would not be the one set.
const MAX_PER_MINUTE: u64 = 60_000_000_000;

/// The largest amount of money a price or a budget may name: a price of
/// 1e308 made every cost `inf`.
const MAX_USD: f64 = 1e9;
