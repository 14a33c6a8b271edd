//! Phase 5, the response cache (SPEC §3): on a route with `cache`, a
//! request is answered from a stored response when an identical one was
//! answered before; otherwise its response is copied as it streams to the
//! client and stored when it ended cleanly (see [`Fill`], driven by the
//! tap). Identical requests that arrive while the first is in flight wait
//! for it instead of calling the upstream too.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::ctx::{IdentityId, RequestCtx};
use super::error::ProxyError;
use super::forward::RequestBody;
use super::headers;
use crate::body::{self, BoxBody};
use crate::gateway::{Active, Gateway};
use crate::snapshot::{CacheScope, Route, RouteCache};
use crate::state::State;
use crate::state::cache::{CachedResponse, Ended, Flight, Join, Key};
use crate::telemetry::metrics::RouteMetrics;

/// What the cache did for a request: the `x-sluice-cache` header, the
/// metric's `result` label and the access log's `cache` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
    Bypass,
}

impl CacheStatus {
    pub fn label(self) -> &'static str {
        match self {
            CacheStatus::Hit => "hit",
            CacheStatus::Miss => "miss",
            CacheStatus::Bypass => "bypass",
        }
    }

    pub fn header(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Bypass => "BYPASS",
        })
    }
}

/// How many times a waiter takes its turn again after leads that failed
/// before it calls the upstream without waiting.
const MAX_WAITS: usize = 4;

/// The result of the cache phase.
pub enum Step {
    /// A stored response answers the request.
    Hit(Response<BoxBody>),
    /// The upstream answers; the body as it now is (read when the key
    /// needed it).
    Forward(RequestBody),
}

pub async fn lookup(
    gw: &Gateway,
    active: &Active,
    route: &Route,
    ctx: &mut RequestCtx,
    parts: &Parts,
    body: RequestBody,
) -> Result<Step, ProxyError> {
    let Some(settings) = route.cache.as_ref() else {
        return Ok(Step::Forward(body));
    };
    let metrics = active.route_metrics(ctx.route_index);
    let directives = RequestDirectives::of(&parts.headers);
    let cacheable_method = matches!(parts.method, Method::GET | Method::HEAD | Method::POST);
    if !cacheable_method || directives.no_store || is_stateful(&parts.method, parts.uri.path()) {
        bypass(ctx, metrics);
        return Ok(Step::Forward(body));
    }
    let deadline = ctx.deadline(&active.snapshot);
    let bytes = body
        .into_bytes(
            active.snapshot.limits.max_request_body,
            deadline,
            gw.body_budget(&active.snapshot),
            &mut ctx.waiting,
        )
        .await?;
    let responses = parts.method == Method::POST
        && crate::llm::shape::Endpoint::of(parts.uri.path())
            == Some(crate::llm::shape::Endpoint::Responses);
    if responses && changes_state(&bytes) {
        bypass(ctx, metrics);
        return Ok(Step::Forward(RequestBody::Read(bytes)));
    }
    let key = key(route, settings, parts, ctx, &bytes);
    let mut flight = None;
    // When a waiting request stops waiting: half of what was left of its
    // time when it first waited, however many leads it waits on in turn.
    let mut give_up = None;
    if !directives.no_cache {
        for _ in 0..MAX_WAITS {
            let stored = gw.state.cache_get(&key).await;
            if let Some(entry) = stored.as_ref()
                && serves(entry, settings, &parts.headers)
            {
                ctx.cache = Some(CacheStatus::Hit);
                ctx.model.clone_from(&entry.model);
                metrics.cache_result(CacheStatus::Hit);
                if let Some(saved) = entry.cost_usd {
                    metrics.cache_saved(saved);
                }
                let mut hit = hit_response(entry);
                if ctx.cors.is_some() {
                    // Stored before the route had `cors`, or by an older
                    // sluice: the route's policy is still the one.
                    super::cors::drop_upstreams(hit.headers_mut());
                }
                return Ok(Step::Hit(hit));
            }
            if stored.is_some() {
                // An answer for other values of the headers it varies on
                // (or older than the TTL now allows): waiting on another
                // fetch would queue requests of different values one
                // behind the other. This one goes alone.
                break;
            }
            match gw.state.cache_join(key) {
                Join::Lead(lead) => {
                    flight = Some(lead);
                    break;
                }
                Join::Wait(mut done) => {
                    // Woken when the lead stored its response or gave up.
                    // The lead's answer fills the cache as fast as the
                    // lead's client reads it, which may be never: past half
                    // of what is left of its own time, the request goes on
                    // alone, with time left for its own upstream call. The
                    // wait is the lead's upstream time, not sluice's overhead.
                    // A client that leaves while it waits missed all the same.
                    ctx.cache = Some(CacheStatus::Miss);
                    let since = Instant::now();
                    let give_up = *give_up.get_or_insert_with(|| {
                        since + deadline.saturating_duration_since(since) / 2
                    });
                    let woken = tokio::time::timeout_at(give_up.into(), done.changed()).await;
                    ctx.waiting += since.elapsed();
                    // A final answer that was not stored would be the
                    // same for each waiter: taking the lead in turn would
                    // serve them one after the other, each an LLM call's
                    // time later. They all go now.
                    if woken.is_err() || *done.borrow() == Ended::Unstorable {
                        break;
                    }
                }
            }
        }
    }
    // Counted when the request ends (`count_miss`): a limit may still
    // refuse it before any upstream is asked.
    ctx.cache = Some(CacheStatus::Miss);
    ctx.cache_fill = Some(Fill::new(
        key,
        settings,
        flight,
        gw.state.cache_entry_cap(),
        &parts.headers,
    ));
    Ok(Step::Forward(RequestBody::Read(bytes)))
}

/// Whether `path` names one of the OpenAI API's stateful resources rather
/// than an answer to compute: files, batches, uploads, fine-tuning jobs,
/// vector stores, assistants and threads, conversations, containers,
/// evals, the organization, and a stored response or chat completion
/// (`/responses/{id}`, `/chat/completions/{id}`, and the list of stored
/// chat completions, a `GET /chat/completions`). Each create makes a
/// new one and each read must see its state now, so a route's cache
/// (usually over all of `/v1/`) passes them by: a cached batch would
/// never finish, and a deleted file would still be there.
fn is_stateful(method: &Method, path: &str) -> bool {
    const RESOURCES: [&str; 12] = [
        "files",
        "batches",
        "uploads",
        "fine_tuning",
        "vector_stores",
        "assistants",
        "threads",
        "conversations",
        "containers",
        "evals",
        "organization",
        "realtime",
    ];
    let mut previous: [&str; 2] = ["", ""];
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        if RESOURCES.contains(&segment) {
            return true;
        }
        // An id under the endpoint that makes answers: a stored one.
        if previous[1] == "responses" || (previous == ["chat", "completions"]) {
            return true;
        }
        previous = [previous[1], segment];
    }
    previous == ["chat", "completions"] && method != Method::POST
}

/// Whether a responses request asks for more than an answer: a
/// background response (`"background": true`), which is a job each
/// create starts, or a turn of a `conversation`, which adds its items to
/// it (the same question asked again is asked of a longer conversation).
/// Read as the API reads JSON (escaped names, a byte order mark, the
/// last of a member written twice), so no spelling gets a replay.
fn changes_state(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Asks {
        background: Option<Value>,
        conversation: Option<Value>,
    }
    let body = crate::llm::prompt_size::without_bom(body);
    let asks = serde_json::from_slice::<Asks>(body).ok().or_else(|| {
        // A member written twice: the last one, as `Value` keeps it.
        let Value::Object(mut fields) = serde_json::from_slice(body).ok()? else {
            return None;
        };
        Some(Asks {
            background: fields.remove("background"),
            conversation: fields.remove("conversation"),
        })
    });
    asks.is_some_and(|asks| {
        asks.background.as_ref().and_then(Value::as_bool) == Some(true)
            || asks.conversation.is_some_and(|c| !c.is_null())
    })
}

/// Counts a request that missed the cache, once: as a miss if an upstream
/// was asked, as a bypass if sluice refused it first (a token limit, the
/// shared state failing), which is what its `x-sluice-cache` then says.
pub fn count_miss(ctx: &mut RequestCtx, metrics: &RouteMetrics) {
    if ctx.cache != Some(CacheStatus::Miss) || ctx.miss_counted {
        return;
    }
    ctx.miss_counted = true;
    if ctx.attempts == 0 && ctx.error.is_some() {
        ctx.cache = Some(CacheStatus::Bypass);
    }
    if let Some(status) = ctx.cache {
        metrics.cache_result(status);
    }
}

/// Marks a request on a cached route as neither served from the cache nor
/// stored, and counts it.
pub fn bypass(ctx: &mut RequestCtx, metrics: &RouteMetrics) {
    ctx.cache = Some(CacheStatus::Bypass);
    metrics.cache_result(CacheStatus::Bypass);
}

/// The request's `cache-control` directives that concern the cache.
#[derive(Default)]
struct RequestDirectives {
    no_cache: bool,
    no_store: bool,
}

impl RequestDirectives {
    /// `max-age=0` asks for nothing stored before now (RFC 9111
    /// §5.2.1.1): a lookup skipped, as `no-cache` does; so does HTTP/1.0's
    /// `pragma: no-cache` when no `cache-control` is sent (§5.4).
    fn of(headers: &HeaderMap) -> Self {
        let mut found = RequestDirectives::default();
        for item in super::headers::list_items(headers, header::CACHE_CONTROL) {
            let (name, value) = item.split_once('=').unwrap_or((item, ""));
            let name = name.trim();
            found.no_cache |= name.eq_ignore_ascii_case("no-cache")
                || (name.eq_ignore_ascii_case("max-age") && value.trim().trim_matches('"') == "0");
            found.no_store |= name.eq_ignore_ascii_case("no-store");
        }
        if !headers.contains_key(header::CACHE_CONTROL) {
            found.no_cache = super::headers::list_items(headers, header::PRAGMA)
                .any(|d| d.trim().eq_ignore_ascii_case("no-cache"));
        }
        found
    }
}

/// The directives of every `cache-control` header, names only.
fn directives(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    super::headers::list_items(headers, header::CACHE_CONTROL)
        .map(|d| d.split('=').next().unwrap_or("").trim())
}

/// The digest of what makes two requests the same: route, method, path
/// and query, the host on a route matched by host, the identity when the
/// route's scope is `identity`, and the
/// body (JSON in canonical form, anything else as bytes). Every part is
/// length-prefixed so that no two different requests write the same bytes.
pub fn key(
    route: &Route,
    settings: &RouteCache,
    parts: &Parts,
    ctx: &RequestCtx,
    body: &[u8],
) -> Key {
    let mut hash = Sha256::new();
    field(&mut hash, route.name.as_bytes());
    field(&mut hash, parts.method.as_str().as_bytes());
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    field(&mut hash, path.as_bytes());
    // A route chosen by host (`*.example.com`) may serve a tenant per
    // host, as the app reads `x-forwarded-host`: one host's answer is not
    // another's. (Envoy and Varnish key on the host whatever the route.)
    if route.host.is_some() {
        let host = super::route::request_host(parts.version, &parts.uri, &parts.headers)
            .ok()
            .flatten()
            .unwrap_or_default();
        field(&mut hash, host.to_ascii_lowercase().as_bytes());
    }
    match (settings.scope, ctx.identity.as_ref().map(|i| &i.id)) {
        (CacheScope::Shared, _) => field(&mut hash, b"*"),
        (CacheScope::Identity, Some(IdentityId::Key(id))) => {
            field(&mut hash, b"key");
            field(&mut hash, id.as_bytes());
        }
        (CacheScope::Identity, Some(IdentityId::Subject(sub))) => {
            field(&mut hash, b"sub");
            field(&mut hash, sub.as_bytes());
        }
        (CacheScope::Identity, Some(IdentityId::Ip(ip))) => {
            field(&mut hash, b"ip");
            field(&mut hash, ip.to_string().as_bytes());
        }
        (CacheScope::Identity, None) => field(&mut hash, b"-"),
    }
    // Headers that choose whom the upstream answers for, or in which
    // version of its API: one organization's answer is not another's.
    for (i, name) in ANSWER_HEADERS.iter().enumerate() {
        if settings.replaced_headers & (1 << i) != 0 {
            continue;
        }
        for value in parts.headers.get_all(name) {
            field(&mut hash, name.as_str().as_bytes());
            field(&mut hash, value.as_bytes());
        }
    }
    body_digest(&mut hash, body);
    hash.finalize().into()
}

/// Request headers that change the answer itself: part of the key
/// (unless the route's upstreams set them: `RouteCache::replaced_headers`).
pub const ANSWER_HEADERS: [HeaderName; 5] = [
    HeaderName::from_static("openai-organization"),
    HeaderName::from_static("openai-project"),
    HeaderName::from_static("openai-beta"),
    HeaderName::from_static("anthropic-version"),
    HeaderName::from_static("anthropic-beta"),
];

/// The body's part of the key: JSON in canonical form, else its bytes.
/// A number beyond what a double holds exactly would read the same as
/// its neighbours: such a body is keyed by its bytes too.
fn body_digest(hash: &mut Sha256, body: &[u8]) {
    let json = (!has_inexact_number(body))
        .then(|| serde_json::from_slice::<Value>(body).ok())
        .flatten();
    match json {
        Some(json) => {
            hash.update(b"json");
            canonical(hash, &json);
        }
        None => {
            hash.update(b"bytes");
            field(hash, body);
        }
    }
}

/// Whether `json` (as text) holds a number a double cannot hold exactly:
/// more than 15 significant digits, unless it is an integer that fits 64
/// bits (serde_json keeps those exact). Strings are skipped.
fn has_inexact_number(json: &[u8]) -> bool {
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'"' => {
                i += 1;
                while i < json.len() && json[i] != b'"' {
                    i += if json[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < json.len()
                    && matches!(json[i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9')
                {
                    i += 1;
                }
                let token = &json[start..i];
                let mantissa = token
                    .iter()
                    .position(|b| matches!(b, b'e' | b'E'))
                    .map_or(token, |e| &token[..e]);
                let significant = mantissa
                    .iter()
                    .filter(|b| b.is_ascii_digit())
                    .skip_while(|b| **b == b'0')
                    .count();
                let integer = mantissa.len() == token.len() && !token.contains(&b'.');
                let fits = std::str::from_utf8(token)
                    .is_ok_and(|t| t.parse::<i64>().is_ok() || t.parse::<u64>().is_ok());
                if significant > 15 && !(integer && fits) {
                    return true;
                }
            }
            _ => i += 1,
        }
    }
    false
}

fn field(hash: &mut Sha256, bytes: &[u8]) {
    hash.update((bytes.len() as u64).to_le_bytes());
    hash.update(bytes);
}

/// Hashes a JSON value so that object key order and whitespace do not
/// matter. Keys are sorted here rather than trusting the map's order, which
/// a dependency enabling serde_json's `preserve_order` would change.
fn canonical(hash: &mut Sha256, value: &Value) {
    match value {
        Value::Null => hash.update(b"n"),
        Value::Bool(b) => hash.update(if *b { b"t" } else { b"f" }),
        Value::Number(n) => {
            hash.update(b"#");
            // `1`, `1.0` and `1e0` are one number to an upstream.
            const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
            let mut int = itoa::Buffer::new();
            let text = match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), ..) => int.format(i),
                (None, Some(u), _) => int.format(u),
                (None, None, Some(f)) if f.fract() == 0.0 && f.abs() < EXACT => {
                    int.format(f as i64)
                }
                (None, None, Some(f)) => {
                    field(hash, ryu::Buffer::new().format(f).as_bytes());
                    return;
                }
                (None, None, None) => "?",
            };
            field(hash, text.as_bytes());
        }
        Value::String(s) => {
            hash.update(b"s");
            field(hash, s.as_bytes());
        }
        Value::Array(items) => {
            hash.update(b"[");
            hash.update((items.len() as u64).to_le_bytes());
            for item in items {
                canonical(hash, item);
            }
        }
        Value::Object(map) => {
            let mut members: Vec<(&String, &Value)> = map.iter().collect();
            members.sort_unstable_by(|a, b| a.0.cmp(b.0));
            hash.update(b"{");
            hash.update((members.len() as u64).to_le_bytes());
            for (name, member) in members {
                field(hash, name.as_bytes());
                canonical(hash, member);
            }
        }
    }
}

/// Whether a stored entry answers this request: it is younger than the
/// route's TTL as it now is (a reload may have shortened it), and the
/// request has the values of the headers its response varies on.
fn serves(entry: &CachedResponse, settings: &RouteCache, request: &HeaderMap) -> bool {
    if entry.stored_at.elapsed() >= settings.ttl {
        return false;
    }
    match entry.vary {
        None => true,
        Some(digest) => {
            vary_names(&entry.headers).is_some_and(|names| vary_digest(&names, request) == digest)
        }
    }
}

/// The request header names a response's `vary` lists, lower-cased;
/// `None` for `vary: *` (no two requests are the same).
fn vary_names(response: &HeaderMap) -> Option<Vec<String>> {
    let mut names = Vec::new();
    for value in response.get_all(header::VARY) {
        for name in value.to_str().unwrap_or("*").split(',') {
            let name = name.trim();
            if name == "*" {
                return None;
            }
            if !name.is_empty() {
                names.push(name.to_ascii_lowercase());
            }
        }
    }
    Some(names)
}

/// The digest of `request`'s values of `names` (a digest: one of them
/// may be a credential, and entries may sit in Redis).
fn vary_digest(names: &[String], request: &HeaderMap) -> [u8; 32] {
    let mut hash = Sha256::new();
    for name in names {
        field(&mut hash, name.as_bytes());
        for value in request.get_all(name.as_str()) {
            hash.update(b"=");
            field(&mut hash, value.as_bytes());
        }
        hash.update(b";");
    }
    hash.finalize().into()
}

fn hit_response(entry: &CachedResponse) -> Response<BoxBody> {
    let mut resp = Response::new(body::full(entry.body.clone()));
    resp.headers_mut().clone_from(&entry.headers);
    let age = entry.stored_at.elapsed().as_secs();
    resp.headers_mut()
        .insert(header::AGE, HeaderValue::from(age));
    resp
}

/// A miss on its way to be stored: the response is copied as the tap
/// passes it to the client and stored when it ended cleanly. Dropping it
/// unstored releases the requests waiting on it.
pub struct Fill {
    key: Key,
    ttl: Duration,
    /// The lead of the fetch, when other requests may wait on it.
    flight: Option<Flight>,
    headers: HeaderMap,
    chunks: Vec<Bytes>,
    len: usize,
    /// Past it (`len > cap`) the body is no longer copied or stored.
    cap: usize,
    /// The request's headers until the response says what it varies on.
    request: Option<HeaderMap>,
    vary: Option<[u8; 32]>,
}

impl std::fmt::Debug for Fill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fill")
            .field("len", &self.len)
            .field("overflowed", &self.overflowed())
            .finish_non_exhaustive()
    }
}

impl Fill {
    fn overflowed(&self) -> bool {
        self.len > self.cap
    }

    /// Drops the fill without storing. `answered`: the response is final
    /// (not a failure), so requests waiting on it should not wait again.
    pub fn abandon(mut self, answered: bool) {
        if let (true, Some(flight)) = (answered, self.flight.take()) {
            flight.unstorable();
        }
    }

    fn new(
        key: Key,
        settings: &RouteCache,
        flight: Option<Flight>,
        cap: usize,
        request: &HeaderMap,
    ) -> Self {
        Fill {
            key,
            ttl: settings.ttl,
            flight,
            headers: HeaderMap::new(),
            chunks: Vec::new(),
            len: 0,
            cap,
            request: Some(request.clone()),
            vary: None,
        }
    }

    /// Takes the response head to store; false when this response must
    /// not be stored (only a 200 is, and not when the upstream said
    /// `no-store` or `private`, or `vary: *`). `no-cache` and `max-age=0`
    /// do not count: LLM APIs send them on every stream by the SSE
    /// convention (OpenAI's `no-cache, must-revalidate`), to keep proxies
    /// from holding a live stream, not about the answer; read as RFC 9111
    /// reads them, no stream would ever be cached.
    pub fn accept_head(&mut self, status: StatusCode, headers: &HeaderMap) -> bool {
        let request = self.request.take();
        if status != StatusCode::OK
            || directives(headers)
                .any(|d| d.eq_ignore_ascii_case("no-store") || d.eq_ignore_ascii_case("private"))
        {
            return false;
        }
        // Compressed though sluice asked for `identity`: a hit would hand
        // that coding to clients that may not take it.
        if super::headers::is_compressed(headers) {
            return false;
        }
        // A response that varies on request headers (a cookie, the
        // origin, the language) answers only requests with the same
        // values: the key holds none of them.
        match vary_names(headers) {
            None => return false,
            Some(names) if names.is_empty() => {}
            Some(names) => {
                self.vary = Some(vary_digest(&names, &request.unwrap_or_default()));
            }
        }
        for (name, value) in headers {
            if !is_per_response(name) {
                // Copied: a parsed value is a slice of the connection's
                // whole read buffer, which a clone would keep alive for as
                // long as the entry lives (8 KiB per entry, unaccounted).
                let Ok(owned) = HeaderValue::from_bytes(value.as_bytes()) else {
                    continue;
                };
                self.headers.append(name.clone(), owned);
            }
        }
        true
    }

    /// Copies a body chunk the client was sent (a reference count, not
    /// the bytes).
    pub fn observe(&mut self, data: &Bytes) {
        if self.overflowed() {
            return;
        }
        self.len += data.len();
        if self.overflowed() {
            // Too large to store: the requests waiting on it go now.
            self.chunks = Vec::new();
            if let Some(flight) = self.flight.take() {
                flight.unstorable();
            }
            return;
        }
        self.chunks.push(data.clone());
    }

    /// Stores the response, which ended cleanly.
    pub fn store(mut self, state: &State, model: Option<String>, cost_usd: Option<f64>) {
        if self.overflowed() {
            return;
        }
        let body = match self.chunks.as_slice() {
            // A copy: a slice would keep the whole read buffer it points
            // into alive, beyond what the weigher counts.
            [one] => Bytes::copy_from_slice(one),
            chunks => {
                let mut whole = BytesMut::with_capacity(self.len);
                for chunk in chunks {
                    whole.extend_from_slice(chunk);
                }
                whole.freeze()
            }
        };
        state.cache_put(
            self.key,
            CachedResponse {
                headers: self.headers,
                body,
                stored_at: Instant::now(),
                model,
                cost_usd,
                ttl: self.ttl,
                vary: self.vary,
            },
            self.flight.take(),
        );
    }
}

/// Headers that belong to one response only and are not replayed: the
/// request's id and limits, the framing (a hit has its own length), the
/// date and cookies.
fn is_per_response(name: &HeaderName) -> bool {
    name == header::CONTENT_LENGTH
        || name == header::TRANSFER_ENCODING
        || name == header::DATE
        || name == header::SET_COOKIE
        || name == header::AGE
        || name == headers::X_REQUEST_ID
        || name.as_str().starts_with("x-ratelimit-")
        || headers::is_sluice(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stateful_resources_are_told_from_answers() {
        for path in [
            "/v1/batches",
            "/v1/batches/batch_1",
            "/v1/files/file-1/content",
            "/v1/responses/resp_1",
            "/v1/responses/resp_1/input_items",
            "/v1/chat/completions/chatcmpl-1/messages",
            "/v1/vector_stores/vs_1/search",
            "/openai/v1/fine_tuning/jobs",
        ] {
            assert!(is_stateful(&Method::POST, path), "{path}");
        }
        // The list of stored chat completions is read, not computed.
        assert!(is_stateful(&Method::GET, "/v1/chat/completions"));
        assert!(is_stateful(&Method::HEAD, "/v1/chat/completions"));
        assert!(!is_stateful(&Method::GET, "/v1/models"));
        for path in [
            "/v1/chat/completions",
            "/v1/responses",
            "/v1/completions",
            "/v1/embeddings",
            "/v1/models",
            "/v1/audio/transcriptions",
            "/chat",
        ] {
            assert!(!is_stateful(&Method::POST, path), "{path}");
        }
        assert!(changes_state(
            br#"{"model":"m","background":true,"input":"x"}"#
        ));
        assert!(!changes_state(br#"{"model":"m","background":false}"#));
        assert!(!changes_state(
            br#"{"model":"m","input":"\"background\": true"}"#
        ));
        // A conversation's turn, by id or as an object.
        assert!(changes_state(
            br#"{"model":"m","input":"and then?","conversation":"conv_1"}"#
        ));
        assert!(changes_state(
            br#"{"model":"m","input":"x","conversation":{"id":"conv_1"}}"#
        ));
        assert!(!changes_state(br#"{"model":"m","conversation":null}"#));
        assert!(!changes_state(
            br#"{"model":"m","input":"my \"conversation\": x"}"#
        ));
        // Spelled as a JSON parser reads it all the same.
        assert!(changes_state(
            br#"{"model":"m","input":"x","conv\u0065rsation":"conv_1"}"#
        ));
        assert!(changes_state(
            "\u{feff}{\"model\":\"m\",\"background\":true}".as_bytes()
        ));
        assert!(changes_state(
            br#"{"background":false,"model":"m","background":true}"#
        ));
    }

    /// A parsed header value is a slice of its connection's read buffer:
    /// a stored copy must own its bytes, or each entry would keep a whole
    /// buffer alive that the cache's size bound never counts.
    #[test]
    fn stored_headers_own_their_bytes() {
        let buffer = bytes::Bytes::from(vec![b'a'; 8192]);
        let value = HeaderValue::from_maybe_shared(buffer.slice(0..16)).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, value);
        let settings = RouteCache {
            ttl: Duration::from_secs(60),
            scope: crate::snapshot::CacheScope::Shared,
            replaced_headers: 0,
        };
        let mut fill = Fill::new([0; 32], &settings, None, 1024, &HeaderMap::new());
        assert!(fill.accept_head(StatusCode::OK, &headers));
        let stored = fill.headers.get(header::CONTENT_TYPE).unwrap();
        assert_eq!(stored.as_bytes(), &buffer[..16]);
        let range = buffer.as_ptr_range();
        assert!(!range.contains(&stored.as_bytes().as_ptr()));
    }

    /// A reload that shortens a route's TTL applies to entries stored
    /// before it: they answer no longer than the TTL now says.
    #[test]
    fn entries_answer_within_the_ttl_as_it_now_is() {
        let entry = CachedResponse {
            headers: HeaderMap::new(),
            body: Bytes::new(),
            stored_at: Instant::now() - Duration::from_secs(5),
            model: None,
            cost_usd: None,
            ttl: Duration::from_secs(600),
            vary: None,
        };
        let ttl = |secs| RouteCache {
            ttl: Duration::from_secs(secs),
            scope: crate::snapshot::CacheScope::Shared,
            replaced_headers: 0,
        };
        assert!(serves(&entry, &ttl(600), &HeaderMap::new()));
        assert!(!serves(&entry, &ttl(2), &HeaderMap::new()));
    }

    #[test]
    fn numbers_are_keyed_by_value_and_never_merged() {
        let key_of = |body: &str| {
            let mut hash = Sha256::new();
            body_digest(&mut hash, body.as_bytes());
            <[u8; 32]>::from(hash.finalize())
        };
        assert_eq!(key_of(r#"{"t":1}"#), key_of(r#"{"t":1.0}"#));
        assert_eq!(key_of(r#"{"t":1}"#), key_of(r#"{"t":1e0}"#));
        assert_ne!(key_of(r#"{"t":1}"#), key_of(r#"{"t":1.5}"#));
        assert_ne!(
            key_of(r#"{"seed":18446744073709551616}"#),
            key_of(r#"{"seed":18446744073709551617}"#)
        );
        assert_ne!(
            key_of(r#"{"x":0.10000000000000000001}"#),
            key_of(r#"{"x":0.10000000000000000002}"#)
        );
        assert!(!has_inexact_number(
            br#"{"a":"123456789012345678901","b":[1,2.5,-3e4]}"#
        ));
        assert!(!has_inexact_number(br#"{"seed":18446744073709551615}"#));
        assert!(has_inexact_number(br#"{"seed":18446744073709551616}"#));
        assert!(!has_inexact_number(br#"{"s":"\"12345678901234567890.5"}"#));
    }
}
