//! Upstreams: where requests go. An upstream is either a real HTTP(S)
//! server reached through its own pooled client, or the built-in mock LLM
//! served in process. Pools (failover between upstreams) build on these.

pub mod breaker;
pub mod client;
pub mod h1_pool;
pub mod health;
pub mod mock;
pub mod pool;
pub mod timed;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Uri};

pub use client::HttpClient;
pub use mock::MockSettings;

use crate::snapshot::SetHeader;

/// One configured upstream.
#[derive(Debug)]
pub struct Upstream {
    pub name: Arc<str>,
    pub kind: UpstreamKind,
    /// Replace the client's values for these names (the upstream's own
    /// credentials); values are marked sensitive.
    pub set_headers: Vec<SetHeader>,
    pub timeouts: Timeouts,
    /// Rewrite of the request body's `model`, for this upstream alone.
    pub models: HashMap<String, String>,
}

impl Upstream {
    /// Where it sends requests: its URL, or `mock`.
    pub fn target(&self) -> String {
        match &self.kind {
            UpstreamKind::Http(http) => format!("{http:?}"),
            UpstreamKind::Mock(_) => "mock".to_owned(),
        }
    }
}

#[derive(Debug)]
pub enum UpstreamKind {
    Http(Box<HttpUpstream>),
    Mock(MockSettings),
}

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    /// From sending the request to the response head.
    pub first_byte: Duration,
    /// The longest pause between two response body chunks.
    pub idle: Duration,
}

/// A real upstream: its base URL split once, and its pooled client.
pub struct HttpUpstream {
    scheme: Scheme,
    authority: Authority,
    /// The URL's path without a trailing `/`, prefixed to every request path.
    base_path: String,
    /// For `http://` upstreams, the `Host` header of every request, built
    /// once. (hyper-util's client sets it for HTTPS upstreams, by protocol:
    /// HTTP/2 carries the host in `:authority` instead.)
    pub host: Option<http::HeaderValue>,
    pub client: HttpClient,
    /// What `client` was built from (scheme, host, connect timeout, the
    /// CA's digest): a reload whose upstream has the same key keeps the
    /// client, and with it the pooled connections and TLS sessions.
    pub client_key: String,
    /// The API versions for which it refused a request for naming
    /// `stream_options` (older Azure OpenAI API versions do): sluice no
    /// longer asks it for stream usage under those.
    pub stream_options_refusals: StreamOptionsRefusals,
}

/// The `api-version`s (Azure's query parameter, chosen by each client;
/// empty without one) under which an upstream refuses `stream_options`.
/// One client's old version must not stop the metering of the others'.
#[derive(Debug, Default)]
pub struct StreamOptionsRefusals {
    /// Whether `versions` holds any: streams read only this, unless one
    /// was ever refused.
    any: std::sync::atomic::AtomicBool,
    /// Each version, and when its refusal was last seen.
    versions: std::sync::Mutex<Vec<(Box<str>, Instant)>>,
}

/// How long a refusal is believed. An upstream may be a router whose
/// one backend refused, or be upgraded: past this, its streams are
/// asked for usage again, at the cost of one refused call a version.
const REFUSAL_MEMORY: Duration = Duration::from_secs(600);

/// Versions remembered at most: clients choose them, and past this a
/// refused one is asked (and refused) again, one call more, rather than
/// held without bound.
const MAX_REFUSING_VERSIONS: usize = 32;

impl StreamOptionsRefusals {
    /// Whether streams under `version` go without the question at `now`.
    pub fn refuses(&self, version: &str, now: Instant) -> bool {
        self.any.load(std::sync::atomic::Ordering::Relaxed)
            && self
                .versions
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .any(|(v, seen)| {
                    &**v == version && now.saturating_duration_since(*seen) < REFUSAL_MEMORY
                })
    }

    /// Remembers `version`'s refusal at `now`; whether it is new, or
    /// came back after being forgotten (so worth saying).
    pub fn record(&self, version: &str, now: Instant) -> bool {
        let mut versions = self
            .versions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((_, seen)) = versions.iter_mut().find(|(v, _)| &**v == version) {
            let forgotten = now.saturating_duration_since(*seen) >= REFUSAL_MEMORY;
            *seen = now;
            return forgotten;
        }
        if versions.len() >= MAX_REFUSING_VERSIONS {
            // Room is made by a forgotten one only.
            let Some(stale) = versions
                .iter()
                .position(|(_, seen)| now.saturating_duration_since(*seen) >= REFUSAL_MEMORY)
            else {
                return false;
            };
            versions.swap_remove(stale);
        }
        versions.push((version.into(), now));
        self.any.store(true, std::sync::atomic::Ordering::Relaxed);
        true
    }
}

/// The `api-version` query parameter of `uri`, as written (empty without
/// one); `None` when it is given twice, or in two spellings, which
/// upstreams may read either way: a refusal is then never remembered, so
/// no client can file it under another client's version.
pub fn api_version(uri: &http::Uri) -> Option<&str> {
    let mut found = None;
    for pair in uri.query().into_iter().flat_map(|q| q.split('&')) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        // Upstreams decode names: `api%2Dversion` is one more.
        let named = name.eq_ignore_ascii_case("api-version")
            || (name.contains('%')
                && percent_encoding::percent_decode_str(name)
                    .decode_utf8_lossy()
                    .eq_ignore_ascii_case("api-version"));
        if named && found.replace(value).is_some() {
            return None;
        }
    }
    Some(found.unwrap_or(""))
}

impl fmt::Debug for HttpUpstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}

/// Why an upstream could not be built from its config.
#[derive(Debug)]
pub enum BuildError {
    Url(String),
    Ca(String),
}

impl HttpUpstream {
    pub fn new(url: &str, ca_pem: Option<&[u8]>, connect: Duration) -> Result<Self, BuildError> {
        let bad = || {
            BuildError::Url(format!(
                "`{}` is not an http:// or https:// URL",
                without_secrets(url)
            ))
        };
        if url.contains('#') {
            return Err(BuildError::Url(format!(
                "upstream url `{}` must not have a fragment (#)",
                without_secrets(url)
            )));
        }
        let uri: Uri = url.parse().map_err(|_| bad())?;
        let scheme = uri.scheme().cloned().ok_or_else(bad)?;
        if scheme != Scheme::HTTP && scheme != Scheme::HTTPS {
            return Err(bad());
        }
        let authority = uri.authority().cloned().ok_or_else(bad)?;
        // A password holding `#` was refused above; one holding `/` or
        // `?` ends the authority early and fails to parse. An `@` in the
        // path (`…/claude-sonnet-4@20250514`) is no credential.
        if authority.as_str().contains('@') {
            // Never quoted: the URL holds a secret. It would also reach the
            // upstream verbatim (h2's `:authority`), not as Basic auth.
            return Err(BuildError::Url(
                "an upstream url must not carry credentials (user:password@host); send them with set_headers".to_owned(),
            ));
        }
        if uri.query().is_some() {
            return Err(BuildError::Url(format!(
                "upstream url `{}` must not have a query string",
                without_secrets(url)
            )));
        }
        // `http://${APP_HOST}:8000` with the variable set but empty.
        if authority.host().is_empty() {
            return Err(BuildError::Url(format!(
                "upstream url `{}` has no host (an empty variable?)",
                without_secrets(url)
            )));
        }
        if !port_is_valid(&authority) {
            return Err(BuildError::Url(format!(
                "upstream url `{}` has a port that is not 1-65535",
                without_secrets(url)
            )));
        }
        let base_path = uri.path().trim_end_matches('/').to_owned();
        if scheme == Scheme::HTTP && ca_pem.is_some() {
            return Err(BuildError::Ca(
                "ca_file only applies to https:// upstreams".to_owned(),
            ));
        }
        let client = if scheme == Scheme::HTTPS {
            client::build_tls(ca_pem, connect).map_err(BuildError::Ca)?
        } else {
            client::build_plain(connect)
        };
        let host = if scheme == Scheme::HTTP {
            h1_pool::host_header(&authority, 80)
        } else {
            None
        };
        let ca_digest = ca_pem.map(|pem| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(pem)));
        let client_key = format!(
            "{scheme}://{authority} connect={}ms ca={}",
            connect.as_millis(),
            ca_digest.as_deref().unwrap_or("-")
        );
        Ok(HttpUpstream {
            host,
            scheme,
            authority,
            base_path,
            client,
            client_key,
            stream_options_refusals: StreamOptionsRefusals::default(),
        })
    }

    /// A `location` that points at this upstream's own address (an app
    /// building redirects from the `host` sluice sent it), made relative,
    /// so the client follows it through sluice, as nginx's
    /// `proxy_redirect default` does. `None`: leave it as it is.
    pub fn local_location(&self, location: &HeaderValue) -> Option<HeaderValue> {
        let text = location.to_str().ok()?;
        let (scheme, rest) = text.split_once("://")?;
        if !scheme.eq_ignore_ascii_case(self.scheme.as_str()) {
            return None;
        }
        let authority = self.authority.as_str();
        let after = rest
            .get(..authority.len())
            .filter(|a| a.eq_ignore_ascii_case(authority))
            .map(|_| &rest[authority.len()..])?;
        let after = after.strip_prefix(self.base_path.as_str())?;
        match after.bytes().next() {
            None => Some(HeaderValue::from_static("/")),
            Some(b'/') => HeaderValue::from_str(after).ok(),
            Some(b'?' | b'#') => HeaderValue::from_str(&format!("/{after}")).ok(),
            // `host:8000` is a prefix of `host:80001`; `/base` of `/basement`.
            Some(_) => None,
        }
    }

    /// Whether requests to it would reach `listener`, an address sluice
    /// listens on: as far as the URL tells without a DNS lookup (an IP in
    /// any form the resolver reads, or `localhost`).
    pub fn is_at(&self, listener: std::net::SocketAddr) -> bool {
        let default_port = if self.scheme == Scheme::HTTPS {
            443
        } else {
            80
        };
        if self.authority.port_u16().unwrap_or(default_port) != listener.port() {
            return false;
        }
        let host = self.authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        // `localhost.` is the same name, rooted.
        let host = host.strip_suffix('.').unwrap_or(host);
        // An unspecified address takes its family's loopback too, and
        // `[::]` (dual-stack on Linux) IPv4's as well.
        let listens_here = |ip: std::net::IpAddr| {
            ip == listener.ip()
                || (listener.ip().is_unspecified()
                    && ip.is_loopback()
                    && (listener.is_ipv6() || ip.is_ipv4()))
        };
        match host.parse::<std::net::IpAddr>() {
            // `::ffff:127.0.0.1` reaches IPv4's loopback.
            Ok(ip) => listens_here(ip.to_canonical()),
            Err(_) if let Some(ip) = shorthand_ipv4(host) => listens_here(ip.into()),
            Err(_) if host.eq_ignore_ascii_case("localhost") => {
                listens_here(std::net::Ipv4Addr::LOCALHOST.into())
                    || listens_here(std::net::Ipv6Addr::LOCALHOST.into())
            }
            Err(_) => false,
        }
    }

    /// The upstream URI for a request's path and query.
    pub fn uri_for(&self, path_and_query: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        let pq = path_and_query.map(PathAndQuery::as_str).unwrap_or("/");
        let builder = Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone());
        if self.base_path.is_empty() {
            match path_and_query {
                Some(pq) => builder.path_and_query(pq.clone()).build(),
                None => builder.path_and_query("/").build(),
            }
        } else {
            let mut joined = String::with_capacity(self.base_path.len() + pq.len());
            joined.push_str(&self.base_path);
            joined.push_str(pq);
            builder.path_and_query(joined).build()
        }
    }
}

/// Whether an authority's port, if it has one, is a port number, 1 to
/// 65535 (the `http` crate parses `:99999` as no port at all).
pub(crate) fn port_is_valid(authority: &http::uri::Authority) -> bool {
    let text = authority.as_str();
    let host_and_port = text.rsplit_once('@').map_or(text, |(_, after)| after);
    let after_host = host_and_port
        .rfind(']')
        .map_or(host_and_port, |end| &host_and_port[end + 1..]);
    after_host
        .rsplit_once(':')
        .is_none_or(|(_, port)| port.parse::<u16>().is_ok_and(|p| p != 0))
}

/// `url` as an error may quote it: never its userinfo, query or fragment.
/// When it has both an `@` and a `?` or `#`, which ends which is not
/// known (a password may hold `?`, a query `@`): only its scheme shows.
pub(crate) fn without_secrets(url: &str) -> String {
    // No URL at all (`https%3A%2F%2F…` pasted encoded): a short text is
    // a typo worth showing, a long one may hold anything.
    if !url.contains("://") && (url.len() > 16 || url.contains(['%', '='])) {
        return format!("{}…", url.get(..6).unwrap_or(""));
    }
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let scheme = if scheme.is_empty() {
        String::new()
    } else {
        format!("{scheme}://")
    };
    let at = rest.rfind('@');
    let cut = rest.find(['?', '#']);
    match (at, cut) {
        (Some(_), Some(_)) => format!("{scheme}…"),
        // A user info holds no `/` or `\\`: an `@` after one is in the
        // path, maybe in a token, and what follows it may be too.
        (Some(at), None) if rest[..at].contains(['/', '\\']) => format!("{scheme}…"),
        (Some(at), None) => format!("{scheme}…@{}", long_segments_cut(&rest[at + 1..])),
        // Marked by the character that began the part left out.
        (None, Some(cut)) => format!(
            "{scheme}{}{}…",
            long_segments_cut(&rest[..cut]),
            &rest[cut..cut + 1]
        ),
        (None, None) => format!("{scheme}{}", long_segments_cut(rest)),
    }
}

/// `address/path` with each path segment long enough to be a token
/// (`/bot<token>/`, `/hooks/<token>`) shown as `…`: `v1`, `openai` and
/// `deployments` stay, and so the message still names the upstream.
fn long_segments_cut(rest: &str) -> String {
    const TOKEN_LEN: usize = 16;
    // A backslash splits too: a URL written with them is refused, and its
    // message quotes it.
    let Some(first) = rest.find(['/', '\\']) else {
        return rest.to_owned();
    };
    let (address, path) = rest.split_at(first);
    let mut out = address.to_owned();
    for piece in path.split_inclusive(['/', '\\']) {
        let segment = piece.trim_end_matches(['/', '\\']);
        out.push_str(if segment.len() >= TOKEN_LEN {
            "…"
        } else {
            segment
        });
        out.push_str(&piece[segment.len()..]);
    }
    out
}

/// An IPv4 address in the forms the system resolver (`inet_aton`) also
/// reads and Rust's parser does not: fewer than four parts (`127.1`,
/// the last part filling the bytes left), and octal (`0177.0.0.1`) or hex
/// (`0x7f.1`) parts. hyper's connector hands such a host to the resolver,
/// so it connects where this says.
fn shorthand_ipv4(host: &str) -> Option<std::net::Ipv4Addr> {
    let parts: Vec<&str> = host.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let mut values = Vec::with_capacity(parts.len());
    for part in &parts {
        let (digits, radix) = match part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            Some(hex) => (hex, 16),
            None if part.len() > 1 && part.starts_with('0') => (&part[1..], 8),
            None => (*part, 10),
        };
        // (`from_str_radix` would also take a sign.)
        if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        values.push(u32::from_str_radix(digits, radix).ok()?);
    }
    let (last, leading) = values.split_last()?;
    let mut address = 0u32;
    for (i, &byte) in leading.iter().enumerate() {
        address |= u32::from(u8::try_from(byte).ok()?) << (24 - 8 * i);
    }
    let room = 32 - 8 * leading.len() as u32;
    if room < 32 && *last >= 1 << room {
        return None;
    }
    Some((address | last).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_options_refusal_is_forgotten_after_a_while() {
        let refusals = StreamOptionsRefusals::default();
        let at = Instant::now();
        assert!(!refusals.refuses("2023-05-15", at));
        assert!(refusals.record("2023-05-15", at));
        assert!(!refusals.record("2023-05-15", at + Duration::from_secs(60)));
        let later = at + Duration::from_secs(60) + REFUSAL_MEMORY;
        assert!(refusals.refuses("2023-05-15", later - Duration::from_secs(1)));
        assert!(!refusals.refuses("2023-05-15", later));
        assert!(!refusals.refuses("2024-10-21", at));
        // Refused again once forgotten: said again.
        assert!(refusals.record("2023-05-15", later));
        assert!(refusals.refuses("2023-05-15", later));
        // Full: a new version takes a forgotten one's place only.
        for n in 1..MAX_REFUSING_VERSIONS {
            assert!(refusals.record(&format!("v{n}"), at));
        }
        assert!(!refusals.record("new", at));
        assert!(!refusals.refuses("new", at));
        assert!(refusals.record("new", later));
        assert!(refusals.refuses("new", later));
    }

    #[test]
    fn loopback_in_every_spelling_is_seen_as_a_listener() {
        let listener: std::net::SocketAddr = "0.0.0.0:8080".parse().unwrap();
        for url in [
            "http://127.0.0.1:8080",
            "http://127.1:8080",
            "http://0x7f.1:8080",
            "http://0177.0.0.1:8080",
            "http://2130706433:8080",
            "http://localhost:8080",
            "http://localhost.:8080",
            "http://[::ffff:127.0.0.1]:8080",
        ] {
            let up = HttpUpstream::new(url, None, Duration::from_secs(1)).unwrap();
            assert!(up.is_at(listener), "{url}");
        }
        for url in [
            "http://127.1:8081",
            "http://10.1:8080",
            "http://example.com:8080",
            "http://1.2.3.4.5:8080",
            "http://256.1:8080",
            "http://08.1:8080",
        ] {
            let up = HttpUpstream::new(url, None, Duration::from_secs(1)).unwrap();
            assert!(!up.is_at(listener), "{url}");
        }
        assert_eq!(shorthand_ipv4("127.65535"), Some([127, 0, 255, 255].into()));
        assert_eq!(shorthand_ipv4("127.16777216"), None);
        assert_eq!(shorthand_ipv4("1.2.3.256"), None);
        assert_eq!(shorthand_ipv4("4294967295"), Some([255; 4].into()));
        assert_eq!(shorthand_ipv4("4294967296"), None);
        assert_eq!(shorthand_ipv4("1..2"), None);
    }

    #[test]
    fn errors_quote_urls_without_secrets() {
        for (url, shown) in [
            ("https://u:pa#ss@llm.example.com/v1", "https://…"),
            ("https://u:p/a?s@llm.example.com", "https://…"),
            ("https://h/v1?u=a@b&key=SECRET#x", "https://…"),
            (
                "https://u:p@llm.example.com/v1",
                "https://…@llm.example.com/v1",
            ),
            (
                "https://llm.example.com/v1?key=k3y",
                "https://llm.example.com/v1?…",
            ),
            ("http://127.0.0.1:8000#frag", "http://127.0.0.1:8000#…"),
            (
                "https://api.telegram.org:99999/botZq9tg-1501abcdef/",
                "https://api.telegram.org:99999/…/",
            ),
            (
                "https://u:p@h.example.com/hooks/T0123456789abcdefXYZ?x",
                "https://…",
            ),
            (
                "https://h.example.com/openai/deployments/T0123456789abcdefXYZ",
                "https://h.example.com/openai/deployments/…",
            ),
            (
                "https://h.example.com\\hooks\\Zq9SECRETbackslash-1234567",
                "https://h.example.com\\hooks\\…",
            ),
            (
                "https://h.example.com:99999/hooks/Zq9SECRET@user-1234567",
                "https://…",
            ),
            ("not a url", "not a url"),
            ("sk-ant-api03-Zq9abcdef", "sk-ant…"),
            (
                "https%3A%2F%2Fhooks.example.com%2Fservices%2FT0001",
                "https%…",
            ),
        ] {
            assert_eq!(without_secrets(url), shown, "{url}");
        }
    }

    #[test]
    fn redirects_to_the_upstreams_own_address_become_relative() {
        let up = HttpUpstream::new("http://127.0.0.1:8000/app", None, Duration::from_secs(1))
            .expect("a valid upstream");
        let local = |l: &'static str| {
            up.local_location(&HeaderValue::from_static(l))
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(
            local("http://127.0.0.1:8000/app/v1/x?a=1").as_deref(),
            Some("/v1/x?a=1")
        );
        assert_eq!(local("HTTP://127.0.0.1:8000/app").as_deref(), Some("/"));
        assert_eq!(
            local("http://127.0.0.1:8000/app?next=1").as_deref(),
            Some("/?next=1")
        );
        for other in [
            "http://127.0.0.1:80001/app/x",
            "http://127.0.0.1:8000/application",
            "https://127.0.0.1:8000/app/x",
            "https://login.example.com/app/x",
            "/already/relative",
        ] {
            assert_eq!(local(other), None, "{other}");
        }
    }
}
