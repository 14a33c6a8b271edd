//! RequestCtx: the facts one request gathers on its way through the phases
//! (route, identity, upstream, attempts, usage, error), read at the end by
//! the metrics and the access log.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{HeaderValue, Method, Uri};

use super::cache::{CacheStatus, Fill};
use super::cors::Allowed;
use super::limit::{RequestUnits, Reservation, TokenEstimate};
use crate::server::deadline::{Armed, Deadline};
use crate::server::idle::{Activity, Busy};
use crate::snapshot::KnownSecrets;
use crate::state::{Decision, Slot};
use crate::upstream::breaker::StreamVerdict;

/// What the listener knows about the connection a request came on.
#[derive(Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub tls: bool,
    /// The remote address as text, rendered once per connection for the
    /// `x-forwarded-for` header and the access log of each request.
    pub remote_ip: HeaderValue,
    /// An h2 connection's requests, watched to close it when quiet.
    pub activity: Option<Arc<Activity>>,
    /// An HTTP/1 connection's stream deadline, watched to cut a stream
    /// whose client stopped reading.
    pub deadline: Option<Arc<Deadline>>,
    /// Told when `shutdown_grace` ran out: a request not answered yet
    /// answers 503 then, rather than be closed without a word.
    pub unanswered: Option<Arc<tokio::sync::Notify>>,
    /// The request id of the answer to a head hyper refused (see
    /// `server::refusal`), for its access-log line.
    pub refusal_id: std::sync::OnceLock<HeaderValue>,
    /// Requests of this connection whose answer is not done (see
    /// [`Answering`]): while one is, what is written is its answer.
    pub answering: std::sync::atomic::AtomicUsize,
}

/// One request's place in [`ConnInfo::answering`], from its start until
/// its context is dropped, once its answer's body has ended.
pub struct Answering(Arc<ConnInfo>);

impl Answering {
    pub fn new(conn: &Arc<ConnInfo>) -> Self {
        conn.answering
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Answering(conn.clone())
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        self.0
            .answering
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl std::fmt::Debug for Answering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Answering")
    }
}

impl ConnInfo {
    pub fn new(remote: SocketAddr, tls: bool) -> Self {
        let remote_ip =
            HeaderValue::try_from(remote.ip().to_string()).unwrap_or(HeaderValue::from_static("-"));
        ConnInfo {
            remote,
            tls,
            remote_ip,
            activity: None,
            deadline: None,
            unanswered: None,
            refusal_id: std::sync::OnceLock::new(),
            answering: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

/// Who is calling.
#[derive(Debug, Clone)]
pub struct Identity {
    pub id: IdentityId,
    pub tier: Option<Arc<str>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IdentityId {
    /// An API key's configured `id`.
    Key(Arc<str>),
    /// A JWT's identity claim. Apart from API keys: the identity provider
    /// names its subjects, the config names its keys, and a subject that
    /// happens to be spelled like a key's `id` must not share its cached
    /// answers, limits or budget.
    Subject(Arc<str>),
    /// An anonymous caller, known by address.
    Ip(IpAddr),
}

/// As logs name an identity: a key's `id`, an anonymous caller's address.
impl std::fmt::Display for IdentityId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IdentityId::Key(id) | IdentityId::Subject(id) => f.write_str(id),
            IdentityId::Ip(ip) => ip.fmt(f),
        }
    }
}

#[derive(Debug)]
pub struct RequestCtx {
    pub started: Instant,
    pub request_id: HeaderValue,
    pub method: Method,
    pub uri: Uri,
    /// hyper refused the request head (too large, malformed): `method`
    /// and `uri` are placeholders, logged as null.
    pub head_unread: bool,
    /// An HTTP/1 request whose body sluice has neither read nor passed
    /// on: answered now, its connection cannot serve another request.
    pub body_unread: bool,
    /// That body is small and sent (no `expect: 100-continue`): a
    /// refusal may read it to keep the connection (`proxy::drain`).
    pub body_drainable: bool,
    pub client_addr: SocketAddr,
    /// `client_addr`'s IP as text.
    pub client_ip: HeaderValue,
    pub tls: bool,
    /// The matched route's name.
    pub route: Option<Arc<str>>,
    /// Its index in the snapshot (for its precomputed metrics).
    pub route_index: Option<usize>,
    pub identity: Option<Identity>,
    /// The upstream that answered (or was tried last).
    pub upstream: Option<Arc<str>>,
    /// Its index in the snapshot.
    pub upstream_index: Option<usize>,
    pub attempts: u32,
    /// When the current upstream attempt was sent.
    pub upstream_started: Option<Instant>,
    /// Time spent waiting on others: upstreams for their response heads,
    /// the client for its body. Not sluice's overhead.
    pub waiting: Duration,
    /// The answering upstream's longest allowed gap between body chunks.
    pub upstream_idle: Option<Duration>,
    pub status: u16,
    /// On an h2 connection: the request counts as activity until its
    /// accounting is done.
    pub busy: Option<Busy>,
    /// The connection's word that `shutdown_grace` ran out: a stream
    /// still going then ends with an error event before it is closed.
    pub cut_told: Option<Arc<tokio::sync::Notify>>,
    /// A stream's deadline, armed on its HTTP/1 connection.
    pub armed: Option<Armed>,
    /// The `code` of the error sluice answered or met, if any.
    pub error: Option<&'static str>,
    /// Why the upstreams failed, where sluice answered for them (502,
    /// 503, 504): logged as `error_detail`.
    pub error_detail: Option<String>,
    pub cache: Option<CacheStatus>,
    /// A `Miss` is counted once the request has met its upstream or been
    /// refused (see `cache::count_miss`); this says it was.
    pub miss_counted: bool,
    /// Its client left, but the answer was read to its end for its
    /// usage: charged what it reported, not at least its estimate.
    pub read_after_client_left: bool,
    /// An origin the route's `cors` allows: its headers go on the response.
    pub cors: Option<Allowed>,
    /// A miss to store once its response ended cleanly.
    pub cache_fill: Option<Fill>,
    pub model: Option<String>,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub cost_usd: Option<f64>,
    /// `log_bodies`: the masked head of each body, for the access log.
    pub request_body: Option<String>,
    pub response_body: Option<String>,
    /// The credentials the request came with, whatever the route does
    /// with them: what its logged path, request id and model must not
    /// show (a client that put its key in the URL too).
    pub presented: Presented,
    /// `request_id` is the client's (else sluice made it, and it holds
    /// nothing to mask).
    pub request_id_given: bool,
    /// Held while this request is answered (see [`ConnInfo::answering`]).
    pub answering: Option<Answering>,
    /// `log_bodies`: what the logged bodies must not show, the
    /// credential this request presented among them.
    pub body_secrets: Option<KnownSecrets>,
    /// The tightest request bucket seen, for the `x-ratelimit-*` headers.
    pub rate_limit: Option<Decision>,
    /// The request units admission took (refunded on a token refusal).
    pub request_units: RequestUnits,
    /// A concurrency slot, released when the ctx is dropped at finalize.
    pub slot: Option<Slot>,
    /// A pool member's circuit verdict on the stream it answered with,
    /// given when the stream ends (by the tap).
    pub stream_verdict: Option<StreamVerdict>,
    /// The tightest token bucket seen, for the `x-ratelimit-*-tokens` headers.
    pub token_limit: Option<Decision>,
    /// Tokens reserved at admission, settled when the response ends.
    pub reservations: Vec<Reservation>,
    /// The request's token estimate, where a limit or a budget needs it.
    pub estimate: Option<TokenEstimate>,
    /// The choices (`n`) a chat or text completion asked for, where no
    /// estimate says so: its answer is generated once each has ended,
    /// and a client leaving after that is still metered.
    pub choices_asked: Option<u64>,
    /// The model the request names, kept with the estimate: the price of
    /// an answer that never came (its client left first).
    pub requested_model: Option<String>,
    /// sluice asked the upstream for stream usage the client did not ask
    /// for: the usage-only chunk is removed from the client's stream.
    pub usage_injected: bool,
}

impl RequestCtx {
    /// When `request_timeout` ends this request's whole exchange.
    pub fn deadline(&self, snap: &crate::snapshot::Snapshot) -> Instant {
        self.started + snap.limits.request_timeout
    }

    pub fn new(method: Method, uri: Uri, request_id: HeaderValue, conn: &ConnInfo) -> Self {
        RequestCtx {
            started: Instant::now(),
            request_id,
            method,
            uri,
            head_unread: false,
            body_unread: false,
            body_drainable: false,
            client_addr: conn.remote,
            client_ip: conn.remote_ip.clone(),
            tls: conn.tls,
            route: None,
            route_index: None,
            identity: None,
            upstream: None,
            upstream_index: None,
            attempts: 0,
            upstream_started: None,
            waiting: Duration::ZERO,
            upstream_idle: None,
            status: 0,
            busy: conn.activity.as_ref().map(Activity::enter),
            cut_told: conn.unanswered.clone(),
            armed: None,
            error: None,
            error_detail: None,
            cache: None,
            miss_counted: false,
            read_after_client_left: false,
            cors: None,
            cache_fill: None,
            model: None,
            input_tokens: None,
            output_tokens: None,
            cost_usd: None,
            request_body: None,
            presented: Presented::default(),
            request_id_given: false,
            answering: None,
            body_secrets: None,
            response_body: None,
            rate_limit: None,
            request_units: RequestUnits::default(),
            slot: None,
            stream_verdict: None,
            token_limit: None,
            reservations: Vec::new(),
            estimate: None,
            choices_asked: None,
            requested_model: None,
            usage_injected: false,
        }
    }
}

/// A request's `authorization` and `x-api-key` values (every one sent),
/// kept (a reference count, no copy) for the access log to mask.
#[derive(Default)]
pub struct Presented(smallvec::SmallVec<[(bool, HeaderValue); 2]>);

impl Presented {
    pub fn of(headers: &http::HeaderMap) -> Self {
        let authorization = headers.get_all(http::header::AUTHORIZATION).iter();
        let api_keys = headers.get_all(crate::proxy::headers::X_API_KEY).iter();
        Presented(
            authorization
                .map(|v| (true, v.clone()))
                .chain(api_keys.map(|v| (false, v.clone())))
                .collect(),
        )
    }

    /// Each credential long enough to be masked: the token after an
    /// `authorization` scheme, an `x-api-key`. Shorter ones are not
    /// looked for: they would mask ordinary words.
    pub fn credentials(&self) -> impl Iterator<Item = &str> {
        const SHORTEST: usize = 8;
        // A header may list several, comma-separated (`Bearer a, Bearer
        // b`, as headers joined by a client library).
        self.0
            .iter()
            .filter_map(|(scheme, value)| Some((*scheme, value.to_str().ok()?)))
            .flat_map(|(scheme, value)| value.split(',').map(move |part| (scheme, part.trim())))
            .map(|(scheme, part)| match scheme {
                true => part.split_once(' ').map_or(part, |(_, token)| token.trim()),
                false => part,
            })
            .filter(|credential| credential.len() >= SHORTEST)
    }
}

impl std::fmt::Debug for Presented {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}
