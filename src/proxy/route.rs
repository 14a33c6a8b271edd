//! Phase 1, route selection: the first route whose path and host match and
//! whose methods allow the request's. When some route matches path and
//! host but none allows the method, the answer is 405 with that route's
//! `allow`; when none matches at all, 404.

use http::{HeaderMap, HeaderValue, Method, Uri, Version, header};

use super::error::ProxyError;
use crate::snapshot::{PathMatch, Route, Snapshot};

/// `host` is the request's, as [`request_host`] reads it.
pub fn select<'s>(
    snap: &'s Snapshot,
    method: &Method,
    path: &str,
    host: Option<&str>,
    headers: &HeaderMap,
) -> Result<(usize, &'s Route), Refused<'s>> {
    let mut wrong_method: Option<(usize, &Route)> = None;
    // Later routes on the same path and host that refuse the method too:
    // the `allow` of a 405 lists what any of them would take. (Empty, and
    // not allocated, but on that rare path.)
    let mut also_refusing: Vec<&Route> = Vec::new();
    for (index, route) in snap.routes.iter().enumerate() {
        if !path_matches(&route.path, path) || !host_matches(route.host.as_deref(), host) {
            continue;
        }
        // A CORS route takes its preflights whatever its methods.
        let preflight = route.cors.is_some() && super::cors::is_preflight(method, headers);
        // TRACE is taken only where listed: an upstream that echoes it
        // would show the credentials sluice adds (nginx refuses it too).
        let any_method = route.methods.is_empty() && *method != Method::TRACE;
        if any_method || allows(&route.methods, method) || preflight {
            return Ok((index, route));
        }
        match wrong_method {
            None => wrong_method = Some((index, route)),
            Some(_) => also_refusing.push(route),
        }
    }
    Err(match wrong_method {
        Some((index, route)) => Refused {
            error: ProxyError::MethodNotAllowed {
                allow: allowed_by(route, &also_refusing),
            },
            route: Some((index, route)),
        },
        None => Refused {
            error: ProxyError::RouteNotFound,
            route: None,
        },
    })
}

/// Why no route takes a request; for a 405, the route whose methods
/// refused it (a browser reads the error only with its CORS headers).
pub struct Refused<'s> {
    pub error: ProxyError,
    /// The first route whose path and host matched, with its index, when
    /// only its methods refused the request (a 405 is that route's).
    pub route: Option<(usize, &'s Route)>,
}

/// The methods `first` and `others` take, each named once, in order.
fn allowed_by(first: &Route, others: &[&Route]) -> HeaderValue {
    if others.is_empty() {
        return first.allow.clone();
    }
    let mut names: Vec<&str> = Vec::new();
    for route in std::iter::once(first).chain(others.iter().copied()) {
        for name in route.allow.to_str().unwrap_or("").split(", ") {
            if !name.is_empty() && !names.contains(&name) {
                names.push(name);
            }
        }
    }
    HeaderValue::from_str(&names.join(", ")).unwrap_or_else(|_| first.allow.clone())
}

/// Whether `methods` allow `method`. HEAD is GET without the body (RFC
/// 9110 §9.3.2): a route that serves GET serves HEAD, and its `allow`
/// says so.
fn allows(methods: &[Method], method: &Method) -> bool {
    methods.contains(method) || (*method == Method::HEAD && methods.contains(&Method::GET))
}

/// A request path in normal form (RFC 3986 §6.2.2), as Envoy's
/// `normalize_path` and `merge_slashes` make it: escapes of unreserved
/// characters decoded (`%61` is `a`; `%2F` stays, being no `/`), other
/// escapes in upper case (`%c3` is `%C3`), `.` and
/// `..` segments resolved, repeated slashes merged. Routes match it and
/// upstreams get it, so that both read one path: `/%61dmin` or
/// `/public/../admin` meets the `/admin` route and its auth. `None` when
/// the path is already normal (no allocation).
pub fn normalized(path: &str) -> Option<String> {
    let plain =
        path.is_ascii() && !path.contains('%') && !path.contains("/.") && !path.contains("//");
    if plain {
        return None;
    }
    let decoded = decode_unreserved(path);
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    // A trailing slash (or `.`/`..` segment) names a directory.
    if out.is_empty()
        || decoded.ends_with('/')
        || decoded.ends_with("/.")
        || decoded.ends_with("/..")
    {
        out.push('/');
    }
    (out != path).then_some(out)
}

/// The path as an app that reads `%2F`, `%5C` and a bare `\` as slashes
/// before its own routing does (Starlette and Werkzeug decode the
/// escapes; WHATWG URL parsers, as in Node, Deno, Bun and Next.js, take
/// `\` for `/`), dot segments kept as such an app may keep them; `None`
/// when `path` has none of them. The upstream still gets the path as
/// written; routes must agree on every reading of it (see
/// [`slash_readings`]).
pub fn slashes_decoded(path: &str) -> Option<String> {
    let (escapes, backslashes) = slash_spellings(path);
    (escapes || backslashes).then(|| with_slashes(path, escapes, backslashes))
}

/// `path` with each segment's `;` parameters dropped, as Java servers
/// read it (`/public/..;/admin` is `/public/../admin` to Tomcat, Jetty
/// and Spring); `None` when it has none.
pub fn without_params(path: &str) -> Option<String> {
    memchr::memchr(b';', path.as_bytes())?;
    let mut plain = String::with_capacity(path.len());
    for (i, segment) in path.split('/').enumerate() {
        if i > 0 {
            plain.push('/');
        }
        plain.push_str(segment.split(';').next().unwrap_or(segment));
    }
    Some(plain)
}

/// Every way an app may read `path`'s other spellings of `/`: the
/// escapes alone, the backslashes alone (a WHATWG parser keeps `%2F` in
/// its segment), and both. Empty when it has none.
pub fn slash_readings(path: &str) -> Vec<String> {
    let (escapes, backslashes) = slash_spellings(path);
    let mut readings = Vec::new();
    if escapes {
        readings.push(with_slashes(path, true, false));
    }
    if backslashes {
        readings.push(with_slashes(path, false, true));
    }
    if escapes && backslashes {
        readings.push(with_slashes(path, true, true));
    }
    readings
}

/// Whether `path` holds `%2F`/`%5C` escapes, and bare backslashes.
fn slash_spellings(path: &str) -> (bool, bool) {
    let bytes = path.as_bytes();
    let escapes = memchr::memchr_iter(b'%', bytes)
        .any(|i| matches!(bytes.get(i + 1..i + 3), Some(b"2F" | b"2f" | b"5C" | b"5c")));
    (escapes, memchr::memchr(b'\\', bytes).is_some())
}

/// `path` with its slash escapes, its backslashes, or both, as `/`.
fn with_slashes(path: &str, escapes: bool, backslashes: bool) -> String {
    let mut plain = String::with_capacity(path.len());
    let mut rest = path;
    while let Some(at) = rest.find(['%', '\\']) {
        plain.push_str(&rest[..at]);
        if rest[at..].starts_with('\\') {
            plain.push(if backslashes { '/' } else { '\\' });
            rest = &rest[at + 1..];
            continue;
        }
        match rest.get(at + 1..at + 3) {
            Some("2F" | "2f" | "5C" | "5c") if escapes => {
                plain.push('/');
                rest = &rest[at + 3..];
            }
            _ => {
                plain.push('%');
                rest = &rest[at + 1..];
            }
        }
    }
    plain.push_str(rest);
    plain
}

/// `path` with the escapes of unreserved characters (letters, digits,
/// `-._~`) decoded; other escapes are kept as written.
fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        // Two hex digits (`from_str_radix` alone would also take `+f`).
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .filter(|hex| hex.iter().all(u8::is_ascii_hexdigit))
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(b) if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => {
                out.push(char::from(b));
                i += 3;
            }
            Some(b) => {
                // Other escapes kept, in upper case (RFC 3986 §6.2.2.1:
                // `%c3` and `%C3` are one byte, and must meet one route).
                push_escape(&mut out, b);
                i += 3;
            }
            // A byte beyond ASCII, sent raw: escaped, as `%C3%A9` it
            // meets the route written so (and an app reads it alike).
            None if bytes[i] >= 0x80 => {
                push_escape(&mut out, bytes[i]);
                i += 1;
            }
            None => {
                out.push(char::from(bytes[i]));
                i += 1;
            }
        }
    }
    out
}

/// `%XX`, the escape of byte `b`, in upper case.
fn push_escape(out: &mut String, b: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(b >> 4)]));
    out.push(char::from(HEX[usize::from(b & 15)]));
}

fn path_matches(m: &PathMatch, path: &str) -> bool {
    match m {
        PathMatch::Any => true,
        PathMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
        PathMatch::Exact(exact) => path == exact,
    }
}

/// Whether `host` is one `want` names (`*.example.com`: a name under it;
/// `None`: any host).
pub fn host_matches(want: Option<&str>, host: Option<&str>) -> bool {
    match (want, host) {
        (None, _) => true,
        (Some(want), Some(host)) => match want.strip_prefix('*') {
            // `*.example.com`: a name under it, not the domain itself.
            Some(suffix) => {
                let (host, suffix) = (host.as_bytes(), suffix.as_bytes());
                host.len() > suffix.len()
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            }
            None => want.eq_ignore_ascii_case(host),
        },
        (Some(_), None) => false,
    }
}

/// The host routes match: the target's authority (h2's `:authority`, an
/// absolute-form URL) or else the `host` header, without port or root
/// dot. `x-forwarded-host` is taken from the same place, so an upstream
/// sees the host the route was chosen by. A request whose host is
/// ambiguous (RFC 9112 §3.2, RFC 9113 §8.3.1) is refused, as nginx
/// refuses it: more than one `host`, none on HTTP/1.1, or one naming
/// another host than the target's.
pub fn request_host<'a>(
    version: Version,
    uri: &'a Uri,
    headers: &'a HeaderMap,
) -> Result<Option<&'a str>, ProxyError> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(ambiguous("the request has more than one host header"));
    }
    // Routes match the host before any `:`; the app reads the header
    // whole (as `x-forwarded-host`), and `api.example.com:@evil.com` is
    // evil.com to a URL parser: only a host and a port are taken.
    let header = match header.map(|h| h.to_str()) {
        Some(Ok(h)) if is_host_and_port(h) => Some(h),
        Some(_) => {
            return Err(ambiguous(
                "the host header is not a host name or address with an optional port",
            ));
        }
        None => None,
    };
    // An absolute-form target (or h2's `:authority`) is the client's
    // text too, and goes on as `x-forwarded-host`.
    // Userinfo has no place in a request's target (RFC 9112 §3.2.2, RFC
    // 9113 §8.3.1): `public.example@internal.example` is one host to a
    // filter in front that reads the text, another to the route.
    if let Some(authority) = uri.authority()
        && !is_host_and_port(authority.as_str())
    {
        return Err(ambiguous(
            "the request target's host is not a host name or address with an optional port",
        ));
    }
    let target = uri.host().map(without_port);
    match (target, header) {
        (Some(target), Some(header)) if !without_port(header).eq_ignore_ascii_case(target) => Err(
            ambiguous("the host header names another host than the request target"),
        ),
        (Some(target), _) => Ok(Some(target)),
        (None, Some(header)) => Ok(Some(without_port(header))),
        (None, None) if version == Version::HTTP_11 => {
            Err(ambiguous("an HTTP/1.1 request needs a host header"))
        }
        (None, None) => Ok(None),
    }
}

/// RFC 9110's `Host`: `uri-host [ ":" port ]`, the host a name or IPv4
/// address (RFC 3986's reg-name) or a bracketed IPv6 one.
fn is_host_and_port(value: &str) -> bool {
    let (host_ok, port) = match value.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, after)) => (
                !v6.is_empty()
                    && v6
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.'),
                after,
            ),
            None => return false,
        },
        None => {
            let end = value.find(':').unwrap_or(value.len());
            let name = &value[..end];
            (
                !name.is_empty() && name.bytes().all(|b| REG_NAME[usize::from(b)]),
                &value[end..],
            )
        }
    };
    host_ok && (port.is_empty() || port.strip_prefix(':').is_some_and(is_port))
}

/// The bytes of a reg-name: unreserved, sub-delims and the `%` of an
/// escape (RFC 3986 §3.2.2). A table: every request's host is checked.
static REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric();
        b += 1;
    }
    let extra = b"-._~%!$&'()*+,;=";
    let mut i = 0;
    while i < extra.len() {
        table[extra[i] as usize] = true;
        i += 1;
    }
    table
};

/// A port as RFC 3986 writes it (digits only, `+80` is none), in range;
/// or nothing, which the grammar allows.
fn is_port(digits: &str) -> bool {
    digits.is_empty()
        || (digits.len() <= 5
            && digits.bytes().all(|b| b.is_ascii_digit())
            && digits.parse::<u16>().is_ok())
}

fn ambiguous(problem: &str) -> ProxyError {
    ProxyError::InvalidRequest {
        message: problem.to_owned(),
        param: None,
    }
}

/// `[::1]:8080` keeps its brackets, `example.com:8080` loses the port,
/// and a fully qualified `example.com.` its root dot.
fn without_port(raw: &str) -> &str {
    if raw.starts_with('[') {
        return raw.find(']').map_or(raw, |end| &raw[..=end]);
    }
    let host = raw.split_once(':').map_or(raw, |(host, _port)| host);
    host.strip_suffix('.').unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn escapes_differing_in_case_are_one_path() {
        assert_eq!(normalized("/caf%c3%a9").as_deref(), Some("/caf%C3%A9"));
        assert_eq!(normalized("/caf%C3%A9"), None);
        assert_eq!(normalized("/a%2fb/%7e%zz").as_deref(), Some("/a%2Fb/~%zz"));
        // Not escapes: kept as written.
        assert_eq!(normalized("/a%+fb/%-1/%"), None);
        // Raw bytes beyond ASCII: escaped, as the route is written.
        assert_eq!(normalized("/caf\u{e9}/x").as_deref(), Some("/caf%C3%A9/x"));
    }

    #[test]
    fn paths_are_matched_as_upstreams_resolve_them() {
        for (raw, seen) in [
            ("/%61dmin/x", "/admin/x"),
            ("/public/../admin", "/admin"),
            ("/public/./../admin/", "/admin/"),
            ("//admin//x", "/admin/x"),
            ("/..", "/"),
            ("/a/b/..", "/a/"),
            ("/%2e%2e/admin", "/admin"),
            // An escaped slash is no slash, and `..` beside it no segment.
            ("/admin/x%2F..%2F..%2Fpublic", "/admin/x%2F..%2F..%2Fpublic"),
            (
                "/v1/models/ft%3Amodel%2Fé",
                "/v1/models/ft%3Amodel%2F%C3%A9",
            ),
        ] {
            assert_eq!(normalized(raw).as_deref().unwrap_or(raw), seen, "{raw}");
        }
        assert_eq!(normalized("/v1/chat/completions"), None);
    }

    #[test]
    fn host_drops_port() {
        let host = |uri: &str, header: Option<&'static str>| {
            let uri: Uri = uri.parse().unwrap();
            let mut h = HeaderMap::new();
            if let Some(header) = header {
                h.insert(header::HOST, HeaderValue::from_static(header));
            }
            request_host(Version::HTTP_11, &uri, &h)
                .ok()
                .flatten()
                .map(str::to_owned)
        };
        assert_eq!(
            host("/x", Some("Example.com:8080")).as_deref(),
            Some("Example.com")
        );
        assert_eq!(host("/x", Some("[::1]:8080")).as_deref(), Some("[::1]"));
        assert_eq!(host("/x", Some("api.local.")).as_deref(), Some("api.local"));
        assert_eq!(
            host("http://api.local:9/x", None).as_deref(),
            Some("api.local")
        );
        assert_eq!(
            host("http://api.local:9/x", Some("API.local:80")).as_deref(),
            Some("api.local")
        );
        assert_eq!(
            host("/x", Some("127.0.0.1:9")).as_deref(),
            Some("127.0.0.1")
        );
        // What a URL parser reads as another host is no host at all.
        assert_eq!(host("http://x:99999/a", Some("x")), None);
        assert_eq!(host("http://x:+80/a", None), None);
        for refused in [
            "internal.example.com:@evil.com",
            "internal.example.com:80/x",
            "internal.example.com:80 evil.com",
            "internal.example.com:99999",
            "internal.example.com:+80",
            "a.example@evil.com",
            "[::1]x",
            "",
            ":80",
        ] {
            assert_eq!(host("/x", Some(refused)), None, "{refused}");
        }
    }

    #[test]
    fn paths() {
        assert!(path_matches(&PathMatch::Prefix("/v1/".into()), "/v1/chat"));
        assert!(!path_matches(&PathMatch::Prefix("/v1/".into()), "/v2/chat"));
        assert!(path_matches(&PathMatch::Exact("/a".into()), "/a"));
        assert!(!path_matches(&PathMatch::Exact("/a".into()), "/a/b"));
    }

    #[test]
    fn escaped_slashes_are_read_as_slashes_for_routing() {
        for (path, view) in [
            ("/v1/chat%2Fcompletions", Some("/v1/chat/completions")),
            ("/v1/chat%2fcompletions", Some("/v1/chat/completions")),
            ("/public%2F..%2Fadmin", Some("/public/../admin")),
            ("/a%5C..%5Cb", Some("/a/../b")),
            ("/public/..\\v1/models", Some("/public/../v1/models")),
            (
                "/v1/models/org%2Fmodel%3A1",
                Some("/v1/models/org/model%3A1"),
            ),
            ("/v1/models%2", None),
            ("/v1/chat/completions", None),
            ("/100%25", None),
        ] {
            assert_eq!(slashes_decoded(path).as_deref(), view, "{path}");
        }
    }
}
