//! Header hygiene both ways (SPEC §3): hop-by-hop headers dropped (also
//! those a `connection` header names), client `x-sluice-*` never trusted,
//! gateway credentials never forwarded, `x-forwarded-*` and `x-request-id`
//! set, and the upstream's own `set_headers` applied.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::ctx::RequestCtx;
use crate::upstream::Upstream;

/// Headers that describe one connection, not the message (RFC 9110
/// §7.6.1), and `transfer-encoding`: hyper frames each side's body itself.
/// A `static`, not a `const`: a const array would be built and dropped
/// wherever it is used.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::TRANSFER_ENCODING,
];

/// A name's index in [`HOP_BY_HOP`], a bit in [`strip_hop_by_hop`]'s mask.
fn hop_by_hop_bit(name: &HeaderName) -> Option<u32> {
    // Standard names are enums whose `as_str` is a static string, so this
    // is a few length and byte compares, with no hashing.
    Some(match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "proxy-authenticate" => 3,
        "proxy-authorization" => 4,
        "te" => 5,
        "trailer" => 6,
        "upgrade" => 7,
        "transfer-encoding" => 8,
        _ => return None,
    })
}

/// Whether a `transfer-encoding` line names a coding besides `chunked`,
/// the only one hyper undoes: any other would be lost on the way, on a
/// request (501) as on an answer (502).
pub fn has_other_transfer_coding(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .any(|coding| {
            !coding
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"chunked")
        })
}

/// Whether a body comes compressed (`content-encoding` other than
/// `identity`). Every coding of every line, as bytes: a second line, or
/// a value that is no text, must not slip one past.
pub fn is_compressed(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .flat_map(|line| line.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .any(|coding| !coding.is_empty() && !coding.eq_ignore_ascii_case(b"identity"))
}

/// Whether `name` describes one connection, not the message (see
/// [`HOP_BY_HOP`]): dropped on each hop, so no config may set it.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_by_hop_bit(name).is_some()
}

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_SLUICE_CACHE: HeaderName = HeaderName::from_static("x-sluice-cache");
/// The upstream's own `x-request-id`, which sluice's replaces: the id a
/// provider's support asks for.
pub const X_SLUICE_UPSTREAM_REQUEST_ID: HeaderName =
    HeaderName::from_static("x-sluice-upstream-request-id");
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// Removes hop-by-hop headers, including those listed in `connection`;
/// says whether `transfer-encoding` was among them.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> bool {
    // One pass over the names finds the few present; only those are
    // removed, as each removal hashes. Most messages carry none, or only
    // `connection` (upstreams answer `connection: keep-alive`).
    let mut present = 0u32;
    for name in headers.keys() {
        if let Some(bit) = hop_by_hop_bit(name) {
            present |= 1 << bit;
        }
    }
    if present == 0 {
        return false;
    }
    if present & 1 != 0 && !names_only_hop_by_hop(headers) {
        // `close` and names of the table (usually `keep-alive`) need no
        // lookup: the table's are removed below when present.
        let named: Vec<HeaderName> = list_items(headers, header::CONNECTION)
            .filter(|token| {
                !token.eq_ignore_ascii_case("close")
                    && !HOP_BY_HOP
                        .iter()
                        .any(|h| token.eq_ignore_ascii_case(h.as_str()))
            })
            .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for (bit, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << bit) != 0 {
            headers.remove(name);
        }
    }
    present & (1 << 8) != 0
}

/// Whether `connection` is only `keep-alive` or `close` (what nearly
/// every message sends): it then names no header beyond the table's, and
/// the list need not be split and compared item by item.
fn names_only_hop_by_hop(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().all(|value| {
        let value = value.as_bytes().trim_ascii();
        value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close")
    })
}

/// The items of a comma-separated list header, over all its values,
/// trimmed (`cache-control`, `connection`, ...).
pub fn list_items(headers: &HeaderMap, name: HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// Whether a header is one of sluice's own (`x-sluice-*`).
pub fn is_sluice(name: &HeaderName) -> bool {
    name.as_str().starts_with("x-sluice-")
}

/// Removes every `x-sluice-*` header: only sluice may set those.
fn strip_sluice(headers: &mut HeaderMap) {
    if headers.keys().any(is_sluice) {
        let names: Vec<HeaderName> = headers.keys().filter(|k| is_sluice(k)).cloned().collect();
        for name in names {
            headers.remove(name);
        }
    }
}

/// The longest client request id kept: far past any tracing system's
/// (a W3C `traceparent` is 55 bytes), and short enough that forwarding
/// it cannot push an upstream's header line over its limit (nginx's is
/// 8 KB) nor swell every log line.
pub const REQUEST_ID_MAX: usize = 1024;

/// The request id: the client's (SPEC §3) when it is text of at most
/// [`REQUEST_ID_MAX`] bytes, else a new one. Bytes past ASCII (obs-text,
/// which no log line could show as sent) and a blank id are replaced.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    clients_request_id(headers).unwrap_or_else(new_request_id)
}

/// The client's request id, when it is one [`request_id`] keeps.
pub fn clients_request_id(headers: &HeaderMap) -> Option<HeaderValue> {
    let v = headers.get(&X_REQUEST_ID)?;
    let b = v.as_bytes();
    let kept = b.len() <= REQUEST_ID_MAX
        && b.iter().any(|c| c.is_ascii_graphic())
        && b.iter()
            .all(|&c| c.is_ascii_graphic() || c == b' ' || c == b'\t');
    kept.then(|| v.clone())
}

/// A request id of sluice's own.
pub fn new_request_id() -> HeaderValue {
    // 128 random bits as 32 hex digits, without going through `fmt`.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 32];
    let bits = fastrand::u128(..);
    for (i, digit) in id.iter_mut().enumerate() {
        *digit = HEX[((bits >> (124 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&id).unwrap_or(HeaderValue::from_static("-"))
}

/// Prepares a client's request headers for any upstream (once per
/// request). Credentials are the gateway's (SPEC §3) on every route,
/// `auth: none` ones included: they never reach an upstream, which gets
/// its own from `set_headers`.
pub fn from_client(headers: &mut HeaderMap, ctx: &RequestCtx) {
    let original_host = headers.remove(header::HOST);
    strip_hop_by_hop(headers);
    one_content_length(headers);
    strip_sluice(headers);
    // One pass over the names, as for hop-by-hop headers: a removal
    // hashes, and most requests carry at most one of the two.
    let (authorization, api_key, expect, cookie) =
        headers
            .keys()
            .fold((false, false, false, false), |(a, k, e, c), name| {
                (
                    a || name == header::AUTHORIZATION,
                    k || name == X_API_KEY,
                    e || name == header::EXPECT,
                    c || name == header::COOKIE,
                )
            });
    if cookie {
        join_cookies(headers);
    }
    if authorization {
        headers.remove(header::AUTHORIZATION);
    }
    if api_key {
        headers.remove(X_API_KEY);
    }
    if expect {
        // hyper answered the client's `100-continue` already; the
        // upstream gets the body without being asked (as nginx does).
        headers.remove(header::EXPECT);
    }
    // sluice reads answers as they pass (usage, the cache, the body log),
    // so it asks upstreams for them uncompressed; a compressed answer
    // would be metered as nothing and replayed from the cache to clients
    // that never asked for that encoding. Said, not just left unsaid: a
    // request without `accept-encoding` takes any coding (RFC 9110
    // §12.5.3).
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    // The hops so far, from every line (RFC 9110 §5.3: several lines are
    // one comma-separated list), then ours. A prior value that is not
    // plain text is replaced, not extended.
    let mut hops: Option<Vec<u8>> = Some(Vec::new());
    for line in headers.get_all(&X_FORWARDED_FOR) {
        match (line.to_str().map(str::trim), hops.as_mut()) {
            (Ok(""), _) | (_, None) => {}
            (Ok(line), Some(buf)) => {
                if !buf.is_empty() {
                    buf.extend_from_slice(b", ");
                }
                buf.extend_from_slice(line.as_bytes());
            }
            (Err(_), Some(_)) => hops = None,
        }
    }
    let extended = hops.filter(|buf| !buf.is_empty()).and_then(|mut buf| {
        buf.extend_from_slice(b", ");
        buf.extend_from_slice(ctx.client_ip.as_bytes());
        // One buffer, handed to the header without a copy.
        HeaderValue::from_maybe_shared(bytes::Bytes::from(buf)).ok()
    });
    headers.insert(
        X_FORWARDED_FOR,
        extended.unwrap_or_else(|| ctx.client_ip.clone()),
    );
    // Apps behind nginx read the client's address here (`proxy_set_header
    // X-Real-IP $remote_addr`): the peer's, never one a client wrote.
    headers.insert(X_REAL_IP, ctx.client_ip.clone());
    headers.insert(
        X_FORWARDED_PROTO,
        HeaderValue::from_static(if ctx.tls { "https" } else { "http" }),
    );
    // The target's authority first, as routes read it (`route::request_host`).
    // Never an absolute-form target's `user:password@`.
    let host = ctx
        .uri
        .authority()
        .map(|a| a.as_str().rsplit('@').next().unwrap_or(a.as_str()))
        .and_then(|a| HeaderValue::from_str(a).ok())
        .or(original_host);
    match host {
        Some(h) => {
            headers.insert(X_FORWARDED_HOST, h);
        }
        None => {
            headers.remove(X_FORWARDED_HOST);
        }
    }
    headers.insert(X_REQUEST_ID, ctx.request_id.clone());
}

/// One `cookie` line from several. HTTP/2 clients send each cookie as a
/// line of its own (RFC 9113 §8.2.3), which must be joined with `; `
/// before an HTTP/1.1 hop: apps read one line (or join them with `, `,
/// which splits no cookie).
fn join_cookies(headers: &mut HeaderMap) {
    let lines = headers.get_all(header::COOKIE);
    // Most requests carry one line, left as it is.
    if lines.iter().nth(1).is_none() {
        return;
    }
    let lines: Vec<&[u8]> = lines.iter().map(HeaderValue::as_bytes).collect();
    let joined = bytes::Bytes::from(lines.join(&b"; "[..]));
    if let Ok(value) = HeaderValue::from_maybe_shared(joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Applies one upstream's own headers (per attempt: members differ).
pub fn for_upstream(headers: &mut HeaderMap, upstream: &Upstream) {
    for set in &upstream.set_headers {
        headers.insert(set.name.clone(), set.value.clone());
    }
}

/// Prepares an upstream's response headers for the client.
pub fn to_client(headers: &mut HeaderMap, status: http::StatusCode) {
    // Chunks framed the body, not a length sent beside them (RFC 9112
    // §6.3): passed on, a wrong one would end the client's copy short. A
    // 1xx or 204 has no body, and no length (RFC 9110 §8.6): an HTTP/2
    // client takes one for a protocol error.
    let bodiless = status.is_informational() || status == http::StatusCode::NO_CONTENT;
    if strip_hop_by_hop(headers) || bodiless {
        headers.remove(header::CONTENT_LENGTH);
    } else {
        one_content_length(headers);
    }
    strip_sluice(headers);
}

/// A length sent as a list of one value (`content-length: 5, 5`, or two
/// lines of it, which RFC 9110 §8.6 lets a recipient read as 5, as hyper
/// did) goes on as that one value: clients that cannot read the list
/// read the body to the connection's close, and HTTP/2 clients take it
/// for a protocol error.
fn one_content_length(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(value) = values.next() else {
        return;
    };
    let bytes = value.as_bytes();
    if values.next().is_none() && !bytes.contains(&b',') {
        return;
    }
    let first = bytes
        .split(|b| *b == b',')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if let Ok(single) = HeaderValue::from_bytes(first) {
        headers.insert(header::CONTENT_LENGTH, single);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listed_length_goes_on_as_one_value() {
        let mut h = HeaderMap::new();
        let ok = http::StatusCode::OK;
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5, 5"));
        to_client(&mut h, ok);
        assert_eq!(h.get(header::CONTENT_LENGTH).unwrap(), "5");
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        to_client(&mut h, ok);
        assert_eq!(h.get_all(header::CONTENT_LENGTH).iter().count(), 1);
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("7"));
        to_client(&mut h, ok);
        assert_eq!(h.get(header::CONTENT_LENGTH).unwrap(), "7");
        // No body, no length.
        to_client(&mut h, http::StatusCode::NO_CONTENT);
        assert_eq!(h.get(header::CONTENT_LENGTH), None);
    }

    #[test]
    fn connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn close_and_table_names_in_connection_are_handled() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Close, Upgrade, x-other"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-other", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_TYPE));
    }

    #[test]
    fn a_name_in_any_connection_value_goes() {
        // The plain `keep-alive` of one value does not hide the other's name.
        for plain in ["keep-alive", " Keep-Alive ", "close"] {
            let mut h = HeaderMap::new();
            h.append(header::CONNECTION, HeaderValue::from_static(plain));
            h.append(header::CONNECTION, HeaderValue::from_static("x-hop"));
            h.insert("x-hop", HeaderValue::from_static("1"));
            h.insert("x-keep", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{plain}");
            assert!(h.contains_key("x-keep"));
        }
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
    }

    #[test]
    fn hop_by_hop_bits_index_the_table() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_bit(name), Some(i as u32), "{name}");
        }
        assert_eq!(hop_by_hop_bit(&header::CONTENT_TYPE), None);
    }

    #[test]
    fn request_ids() {
        let mut h = HeaderMap::new();
        let fresh = request_id(&h);
        assert_eq!(fresh.len(), 32);
        assert_ne!(fresh, request_id(&h));
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc-123"));
        assert_eq!(request_id(&h), "abc-123");
        h.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert_eq!(request_id(&h), "has space");
        h.insert(X_REQUEST_ID, HeaderValue::from_static(" \t "));
        assert_eq!(request_id(&h).len(), 32);
        h.insert(
            X_REQUEST_ID,
            HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        );
        assert_eq!(request_id(&h).len(), 32);
    }
}
