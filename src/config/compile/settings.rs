//! The process-wide sections: `limits`, `state` and `logging`.

use std::time::Duration;

use crate::config::raw::*;
use crate::snapshot::*;

use super::Compiler;

/// The most connections a listener may hold: far above what one process
/// serves, and within what tokio's semaphore can count.
const MAX_CONNECTIONS_CAP: u64 = 10_000_000;

impl Compiler<'_> {
    pub(super) fn limits(&mut self, raw: Option<&RawLimits>) -> Limits {
        let none = RawLimits {
            max_request_body: None,
            max_buffered_bytes: None,
            header_read_timeout: None,
            request_timeout: None,
            max_connections: None,
            shutdown_grace: None,
        };
        let raw = raw.unwrap_or(&none);
        let max_connections = self.opt_u64(&raw.max_connections).unwrap_or(10_000);
        if let Some(t) = &raw.max_connections
            && !(1..=MAX_CONNECTIONS_CAP).contains(&max_connections)
        {
            self.error(
                &t.referenced,
                format!("max_connections must be from 1 to {MAX_CONNECTIONS_CAP}"),
            );
        }
        // Zero would refuse every client (or, for header_read_timeout,
        // leave the keep-alive and quiet-h2 timers spinning).
        let above_zero = |me: &mut Self, t: &Option<Text>, default: Duration, name: &str| {
            me.positive_duration(t, default, name)
        };
        let max_request_body = self.size(&raw.max_request_body, 4 << 20);
        if max_request_body == 0
            && let Some(t) = &raw.max_request_body
        {
            // Every request with a body would be a 413.
            self.error(&t.referenced, "max_request_body must be above 0");
        }
        // Never below one body at the limit, whatever the default.
        let max_buffered_bytes =
            self.size(&raw.max_buffered_bytes, max_request_body.max(256 << 20));
        if let Some(t) = &raw.max_buffered_bytes
            && max_buffered_bytes < max_request_body
        {
            self.error(
                &t.referenced,
                format!(
                    "max_buffered_bytes ({max_buffered_bytes} bytes) is below max_request_body ({max_request_body} bytes): one body at the limit would be refused"
                ),
            );
        }
        Limits {
            max_request_body,
            max_buffered_bytes,
            header_read_timeout: above_zero(
                self,
                &raw.header_read_timeout,
                Duration::from_secs(10),
                "header_read_timeout",
            ),
            request_timeout: above_zero(
                self,
                &raw.request_timeout,
                Duration::from_secs(300),
                "request_timeout",
            ),
            max_connections: usize::try_from(max_connections.clamp(1, MAX_CONNECTIONS_CAP))
                .unwrap_or(10_000),
            shutdown_grace: self.duration(&raw.shutdown_grace, Duration::from_secs(30)),
        }
    }

    pub(super) fn state(&mut self, raw: Option<&RawState>) -> StateSettings {
        let Some(raw) = raw else {
            return StateSettings {
                backend: StateBackend::Memory,
                redis_url: None,
                deny_on_error: false,
            };
        };
        let backend = self.choice(
            &raw.backend,
            &[
                ("memory", StateBackend::Memory),
                ("redis", StateBackend::Redis),
            ],
            StateBackend::Memory,
        );
        let redis_url = raw.redis_url.as_ref().and_then(|t| {
            let url = self.text(t)?;
            let scheme = url.split_once("://").map(|(scheme, _)| scheme.to_ascii_lowercase());
            if scheme.as_deref() != Some("redis") {
                self.error(
                    &t.referenced,
                    "redis_url must be redis://host[:port][/db], with user:password@ before the host if Redis needs them (rediss:// TLS and unix sockets are not supported)",
                );
            } else {
                match redis::Client::open(url.as_str()) {
                    Ok(client) => {
                        let settings = client.get_connection_info().redis_settings();
                        if let Some(password) = settings.password() {
                            self.secrets_written.push(password.to_owned());
                        }
                    }
                    // Not the URL itself: it may carry a password.
                    Err(_) => self.error(&t.referenced, "redis_url is not a valid Redis URL"),
                }
            }
            Some(url)
        });
        // A redis_url that is there but did not expand (a missing
        // variable) was reported as such.
        if backend == StateBackend::Redis
            && raw.redis_url.is_none()
            && let Some(b) = &raw.backend
        {
            self.error(&b.referenced, "backend: redis needs a redis_url");
        }
        StateSettings {
            backend,
            redis_url,
            deny_on_error: self.choice(&raw.on_error, &[("allow", false), ("deny", true)], false),
        }
    }

    pub(super) fn logging(&mut self, raw: Option<&RawLogging>) -> Logging {
        let Some(raw) = raw else {
            return Logging {
                level: "info".to_owned(),
                format: LogFormat::Json,
                log_bodies: false,
                known_secrets: KnownSecrets::default(),
                scrub: Default::default(),
            };
        };
        let level = self.choice(
            &raw.level,
            &[
                ("error", "error"),
                ("warn", "warn"),
                ("info", "info"),
                ("debug", "debug"),
                ("trace", "trace"),
            ],
            "info",
        );
        Logging {
            level: level.to_owned(),
            format: self.choice(
                &raw.format,
                &[("json", LogFormat::Json), ("text", LogFormat::Text)],
                LogFormat::Json,
            ),
            log_bodies: self.bool(&raw.log_bodies, false),
            known_secrets: KnownSecrets::default(),
            scrub: Default::default(),
        }
    }
}
