//! `upstreams` and `pools`: addresses, TLS, timeouts, `set_headers`, the
//! mock's knobs, pool members and `retry_on`; and the secrets they hold.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde_saphyr::Spanned;

use crate::config::expand::variable_values;
use crate::config::raw::*;
use crate::snapshot::*;
use crate::upstream::{self, MockSettings, Timeouts, Upstream};

use super::Compiler;

const DEFAULT_RETRY_ON: [RetryOn; 7] = [
    RetryOn::Connect,
    RetryOn::Timeout,
    RetryOn::Status(429),
    RetryOn::Status(500),
    RetryOn::Status(502),
    RetryOn::Status(503),
    RetryOn::Status(504),
];

impl Compiler<'_> {
    pub(super) fn upstreams(
        &mut self,
        raw: &BTreeMap<String, Spanned<RawUpstream>>,
        limits: &Limits,
    ) -> Vec<Arc<Upstream>> {
        let mut out = Vec::with_capacity(raw.len());
        for (name, spanned) in raw {
            let u = &spanned.value;
            let at = &spanned.referenced;
            self.check_name("upstream name", name, at);
            let timeouts = match &u.timeouts {
                // Zero would time out every request.
                Some(t) => Timeouts {
                    connect: self.positive_duration(
                        &t.connect,
                        Duration::from_secs(5),
                        "timeouts.connect",
                    ),
                    first_byte: self.positive_duration(
                        &t.first_byte,
                        limits.request_timeout,
                        "timeouts.first_byte",
                    ),
                    idle: self.positive_duration(&t.idle, Duration::from_secs(60), "timeouts.idle"),
                },
                None => Timeouts {
                    connect: Duration::from_secs(5),
                    first_byte: limits.request_timeout,
                    idle: Duration::from_secs(60),
                },
            };
            let set_headers = self.set_headers(name, &u.set_headers);
            let models = u
                .models
                .iter()
                .filter_map(|(from, to)| Some((from.clone(), self.text(to)?)))
                .collect();
            let kind = match (&u.url, &u.mock) {
                (Some(url), None) => {
                    let ca_pem = match &u.ca_file {
                        Some(ca) => {
                            self.source(ca)
                                .and_then(|p| match crate::config::read_file(&p) {
                                    Ok(pem) => Some((pem, ca.referenced)),
                                    Err(e) => {
                                        self.error(
                                            &ca.referenced,
                                            format!("cannot read ca_file {}: {e}", p.display()),
                                        );
                                        None
                                    }
                                })
                        }
                        None => None,
                    };
                    let Some(url_text) = self.text(url) else {
                        continue;
                    };
                    self.url_secrets_written.extend(url_secrets(
                        &url_text,
                        variable_values(&url.value.0, self.env),
                    ));
                    match upstream::HttpUpstream::new(
                        &url_text,
                        ca_pem.as_ref().map(|(pem, _)| pem.as_slice()),
                        timeouts.connect,
                    ) {
                        Ok(mut http) => {
                            // `set_headers` may name the host (a virtual
                            // host at an address): then it is the one sent.
                            if set_headers.iter().any(|set| set.name == http::header::HOST) {
                                http.host = None;
                            }
                            upstream::UpstreamKind::Http(Box::new(http))
                        }
                        Err(upstream::BuildError::Url(e)) => {
                            // The message quotes the URL, and a `${VAR}` in it
                            // may carry a credential (`?key=…`, `user:pass@`):
                            // quote it as written, never as expanded.
                            let written = upstream::without_secrets(&url.value.0);
                            let shown = upstream::without_secrets(&url_text);
                            let e = e.replace(&format!("`{shown}`"), &format!("`{written}`"));
                            self.error(&url.referenced, e);
                            continue;
                        }
                        Err(upstream::BuildError::Ca(e)) => {
                            let loc = ca_pem.map(|(_, l)| l).unwrap_or(url.referenced);
                            self.error(&loc, e);
                            continue;
                        }
                    }
                }
                (None, Some(mock)) => {
                    if let Some(ca) = &u.ca_file {
                        self.error(&ca.referenced, "ca_file has no meaning on a mock upstream");
                    }
                    upstream::UpstreamKind::Mock(self.mock(mock))
                }
                (Some(_), Some(_)) => {
                    self.error(
                        at,
                        format!("upstream `{name}` has both `url` and `mock`; choose one"),
                    );
                    continue;
                }
                (None, None) => {
                    self.error(at, format!("upstream `{name}` needs a `url` or a `mock`"));
                    continue;
                }
            };
            out.push(Arc::new(Upstream {
                name: Arc::from(name.as_str()),
                kind,
                set_headers,
                timeouts,
                models,
            }));
        }
        out
    }

    pub(super) fn set_headers(
        &mut self,
        upstream: &str,
        raw: &BTreeMap<String, Text>,
    ) -> Vec<SetHeader> {
        let mut out: Vec<SetHeader> = Vec::with_capacity(raw.len());
        for (name, value) in raw {
            let Ok(header) = HeaderName::from_bytes(name.as_bytes()) else {
                // `Authorization: Bearer sk-…` written as the name: a
                // header line pasted whole, its secret with it.
                let plain = name.len() <= 40
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b' '));
                let message = if !plain || name.contains(' ') {
                    format!(
                        "upstream `{upstream}`: a set_headers name is not a valid header name (not repeated here: it could hold a secret); write `name: value`, the value apart"
                    )
                } else {
                    format!("upstream `{upstream}`: `{name}` is not a valid header name")
                };
                self.error(&value.referenced, message);
                continue;
            };
            if let Some(why) = not_settable(&header) {
                self.error(
                    &value.referenced,
                    format!("upstream `{upstream}`: set_headers cannot set `{header}`: {why}"),
                );
                continue;
            }
            if out.iter().any(|set| set.name == header) {
                self.error(
                    &value.referenced,
                    format!(
                        "upstream `{upstream}`: set_headers names `{header}` twice (names are case-insensitive)"
                    ),
                );
                continue;
            }
            let Some(text) = self.text(value) else {
                continue;
            };
            self.secrets_written
                .extend(variable_values(&value.value.0, self.env));
            // The value is usually a secret: the message never repeats it.
            match HeaderValue::from_str(&text) {
                Ok(mut v) => {
                    v.set_sensitive(true);
                    out.push(SetHeader {
                        name: header,
                        value: v,
                    });
                }
                Err(_) => self.error(
                    &value.referenced,
                    format!(
                        "upstream `{upstream}`: the value of set_headers.{name} is not a valid header value"
                    ),
                ),
            }
        }
        out
    }

    pub(super) fn mock(&mut self, raw: &RawMock) -> MockSettings {
        let failure_rate = match &raw.failure_rate {
            Some(t) => match self.number::<f64>(t, "a number between 0.0 and 1.0") {
                Some(r) if (0.0..=1.0).contains(&r) => r,
                Some(_) => {
                    self.out_of_range(t, |r| {
                        format!("failure_rate {r} is not between 0.0 and 1.0")
                    });
                    0.0
                }
                None => 0.0,
            },
            None => 0.0,
        };
        let status = match &raw.status {
            Some(t) => match self.number::<u16>(t, "an HTTP status") {
                Some(s) if (400..=599).contains(&s) => s,
                Some(_) => {
                    self.out_of_range(t, |s| {
                        format!("{s} is not an HTTP error status (400-599), as an injected failure answers")
                    });
                    500
                }
                None => 500,
            },
            None => 500,
        };
        MockSettings {
            latency: self.duration(&raw.latency, Duration::ZERO),
            failure_rate,
            failure_status: status,
            stream_chunks: raw.stream_chunks.as_ref().and_then(|t| {
                let n = self.number::<u32>(t, "a whole number")?;
                if n == 0 {
                    self.error(&t.referenced, "stream_chunks must be at least 1");
                }
                Some(n).filter(|n| *n > 0)
            }),
            chunk_interval: self.duration(&raw.chunk_interval, Duration::ZERO),
        }
    }

    pub(super) fn pools(
        &mut self,
        raw: &BTreeMap<String, Spanned<RawPool>>,
        upstream_index: &HashMap<&str, usize>,
    ) -> Vec<Pool> {
        let mut out = Vec::with_capacity(raw.len());
        for (name, spanned) in raw {
            self.check_name("pool name", name, &spanned.referenced);
            let p = &spanned.value;
            let mut members = Vec::with_capacity(p.members.len());
            for m in &p.members {
                let Some(member) = self.text(m) else { continue };
                match upstream_index.get(member.as_str()) {
                    Some(i) if members.contains(i) => self.error(
                        &m.referenced,
                        format!("pool `{name}` lists `{member}` twice"),
                    ),
                    Some(i) => members.push(*i),
                    None => self.error(
                        &m.referenced,
                        format!("pool `{name}`: no upstream named `{member}`"),
                    ),
                }
            }
            if p.members.is_empty() {
                self.error(&spanned.referenced, format!("pool `{name}` has no members"));
            }
            let retry_on = match &p.retry_on {
                None => DEFAULT_RETRY_ON.to_vec(),
                Some(list) => {
                    let mut retry_on = Vec::with_capacity(list.len());
                    for t in list {
                        let Some(condition) = self.parsed(t, |s| match s {
                            "connect" => Ok(RetryOn::Connect),
                            "timeout" => Ok(RetryOn::Timeout),
                            other => match other.parse::<u16>() {
                                Ok(code) if (400..=599).contains(&code) => Ok(RetryOn::Status(code)),
                                _ => Err(format!(
                                    "`{other}` is not connect, timeout or an HTTP error status (400-599)"
                                )),
                            },
                        }) else {
                            continue;
                        };
                        if retry_on.contains(&condition) {
                            self.out_of_range(t, |f| format!("retry_on lists {f} twice"));
                        }
                        retry_on.push(condition);
                    }
                    retry_on
                }
            };
            let max_attempts = match &p.max_attempts {
                Some(t) => match self.number::<u32>(t, "a whole number") {
                    Some(0) => {
                        self.error(&t.referenced, "max_attempts must be at least 1");
                        1
                    }
                    Some(n) => n,
                    None => 1,
                },
                None => u32::try_from(p.members.len().max(1)).unwrap_or(u32::MAX),
            };
            let (breaker_failures, breaker_cooldown) = match &p.circuit_breaker {
                Some(b) => (
                    match &b.failures {
                        Some(t) => match self.number::<u32>(t, "a whole number") {
                            Some(0) => {
                                self.error(
                                    &t.referenced,
                                    "circuit_breaker.failures must be at least 1",
                                );
                                1
                            }
                            Some(n) => n,
                            None => 5,
                        },
                        None => 5,
                    },
                    self.duration(&b.cooldown, Duration::from_secs(30)),
                ),
                None => (5, Duration::from_secs(30)),
            };
            let health_check = p.health_check.as_ref().and_then(|h| {
                // The interval first: its error is reported whatever the path's.
                let interval = self.duration(&h.value.interval, Duration::from_secs(10));
                if interval < Duration::from_millis(50)
                    && let Some(t) = &h.value.interval
                {
                    // Below it (`1ms` for `1s`?), probes hammer the members.
                    self.error(&t.referenced, "health_check.interval must be at least 50ms");
                }
                let written = self.required(&h.value.path, &h.referenced, "path")?;
                let path = self.text(written)?;
                if !path.starts_with('/') {
                    self.error(&written.referenced, "health_check.path must start with /");
                }
                Some(HealthCheck { path, interval })
            });
            out.push(Pool {
                name: Arc::from(name.as_str()),
                members,
                retry_on,
                max_attempts,
                breaker_failures,
                breaker_cooldown,
                health_check,
            });
        }
        out
    }

    /// The `set_headers` values of `upstreams`, whole and, for `<scheme>
    /// <credential>`, the credential alone, and the other secrets written
    /// in the file: what a logged body must not show (SPEC §5). Known
    /// settings written in the file (`anthropic-version: 2023-06-01`) are
    /// left out.
    pub(super) fn known_secrets(
        &self,
        upstreams: &[Arc<Upstream>],
        with_urls: bool,
    ) -> KnownSecrets {
        let mut secrets = KnownSecrets::default();
        for header in upstreams.iter().flat_map(|u| &u.set_headers) {
            let Ok(value) = header.value.to_str() else {
                continue;
            };
            let from_variable = self.expansions.iter().any(|(v, _)| v.trim() == value);
            if !from_variable && PLAIN_HEADERS.contains(&header.name.as_str()) {
                continue;
            }
            secrets.add(value);
            secrets.add(value.rsplit(' ').next().unwrap_or(value));
        }
        for secret in &self.secrets_written {
            secrets.add(secret);
        }
        if with_urls {
            for secret in &self.url_secrets_written {
                secrets.add(secret);
            }
        }
        secrets.sort();
        secrets
    }
}

/// Of `values`, the variables that made `url`, those in its user info,
/// path or query, where a token rides (`/hooks/${TOKEN}`); of a variable
/// that is a whole URL (`${BACKUP_URL}`), the long segments and values
/// there (a token is long; `v1`, `deployments` are not). A scheme or an
/// address is no secret, and masked it would hide the upstream's name
/// wherever a logged body shows it.
pub(super) fn url_secrets(url: &str, values: Vec<String>) -> Vec<String> {
    let (userinfo, path) = url_secret_parts(url);
    let mut secrets = Vec::new();
    for value in values {
        if value.contains("://") {
            let (userinfo, path) = url_secret_parts(&value);
            secrets.extend(
                path.split(['/', '?', '&', '=', '#'])
                    .chain([userinfo])
                    .filter(|part| part.len() >= 16)
                    .map(str::to_owned),
            );
        } else if path.contains(value.as_str()) || userinfo.contains(value.as_str()) {
            secrets.push(value);
        }
    }
    secrets
}

/// A URL's user info and its path with the query.
fn url_secret_parts(url: &str) -> (&str, &str) {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let (authority, path) = after_scheme
        .find('/')
        .map_or((after_scheme, ""), |at| after_scheme.split_at(at));
    let userinfo = authority.rsplit_once('@').map_or("", |(info, _)| info);
    (userinfo, path)
}

/// Why an upstream's `set_headers` may not name `header`: these frame the
/// message or belong to one connection (RFC 9110 §7.6.1), so sluice sets
/// them itself for each hop.
fn not_settable(header: &HeaderName) -> Option<&'static str> {
    if *header == http::header::CONTENT_LENGTH || *header == http::header::TRANSFER_ENCODING {
        return Some("it frames the body, which sluice does for each hop");
    }
    crate::proxy::headers::is_hop_by_hop(header)
        .then_some("it is a hop-by-hop header, about one connection only")
}

/// Headers whose values are API settings, not credentials.
const PLAIN_HEADERS: [&str; 9] = [
    "anthropic-version",
    "anthropic-beta",
    "openai-beta",
    "api-version",
    "x-ms-version",
    "content-type",
    "accept",
    "user-agent",
    "openai-organization",
];
