//! The Redis state backend (`state.backend: redis`): the replicas of an
//! app share one view of rate limits, token buckets, concurrency, budgets
//! and cached responses. Each decision is one atomic round trip: a Lua
//! script, loaded once and called by SHA. Redis's own clock (`TIME`) is the
//! one every replica reads, so their clocks need not agree. Every call is
//! bounded by a tight timeout; what happens on failure is the caller's
//! policy (`state.on_error`), not this module's.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::limiter::{BucketKey, Decision, Scope, WINDOW};
use crate::proxy::ctx::IdentityId;
use crate::state::budget::BudgetScope;
use crate::state::cache::CachedResponse;

/// The longest a request waits on Redis for one decision.
pub const CALL_TIMEOUT: Duration = Duration::from_millis(100);

/// Why a state call failed (never the URL: it may carry a password).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis: {0}")]
    Unreachable(String),
    #[error("redis: {0}")]
    Redis(String),
}

impl StateError {
    /// Whether the failure says Redis cannot be reached now (rather than
    /// that one command went wrong).
    pub fn unreachable(&self) -> bool {
        matches!(self, StateError::Timeout(_) | StateError::Unreachable(_))
    }
}

impl From<redis::RedisError> for StateError {
    fn from(e: redis::RedisError) -> Self {
        // The kind and category only: a client-side detail may quote
        // the URL. What Redis itself answered (`OOM command not allowed
        // when used memory > 'maxmemory'`) is what an operator needs.
        let text = match (e.code(), e.detail()) {
            (Some(code), Some(detail)) => {
                let detail: String = detail.chars().take(160).collect();
                format!("answered {code} {detail}")
            }
            _ => format!("{:?} ({})", e.kind(), e.category()),
        };
        // The client's own response timeout is a timeout like ours, not
        // a connection lost (a slow cache entry must not pause Redis).
        if e.is_timeout() {
            return StateError::Timeout(CALL_TIMEOUT);
        }
        if e.is_io_error()
            || e.is_connection_refusal()
            || e.is_connection_dropped()
            || e.is_timeout()
        {
            StateError::Unreachable(text)
        } else {
            StateError::Redis(text)
        }
    }
}

/// GCRA in one step: the bucket is one key holding its theoretical
/// arrival time in µs of Redis time, with its fraction (a unit of a limit
/// of millions a minute is a fraction of a µs; Lua's doubles keep a
/// quarter of one at today's times). Returns {allowed, ahead_us,
/// retry_us}, the wait rounded up.
const TAKE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local cost = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + interval * cost
local ahead = new_tat - now
if ahead > window then
  return {0, tat - now, math.ceil(ahead - window)}
end
redis.call('SET', KEYS[1], string.format('%.3f', new_tat), 'PX', math.ceil(ahead / 1000) + 1000)
return {1, ahead, 0}
";

/// Settles a reservation: moves a bucket's arrival time by `delta` units,
/// never below now.
const ADJUST: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local delta = tonumber(ARGV[2])
local current = redis.call('GET', KEYS[1])
-- An expired bucket still owes usage beyond its estimate; nothing to
-- give back to it, though.
if not current and delta <= 0 then return 0 end
local tat = tonumber(current or now)
if tat < now then tat = now end
tat = tat + tonumber(ARGV[1]) * delta
if tat < now then tat = now end
redis.call('SET', KEYS[1], string.format('%.3f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
return 1
";

/// A concurrency slot as a lease: a sorted set of holders scored by when
/// their lease ends, so a crashed replica's slots expire by themselves.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
local lease = tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], now + lease, ARGV[2])
redis.call('PEXPIRE', KEYS[1], lease)
return 1
";

/// Adds to a day's spend and claims the alert thresholds it crossed, each
/// claimed once (per budget amount) by whichever replica crosses it
/// first. Returns the spend, to the nano-dollar, and the thresholds
/// (× 1000) this call claimed.
const SPEND: &str = r"
local spent = tonumber(redis.call('INCRBYFLOAT', KEYS[1], ARGV[1]))
redis.call('EXPIRE', KEYS[1], 172800)
spent = math.floor(spent * 1e9 + 0.5) / 1e9
local budget = tonumber(ARGV[2])
local out = {string.format('%.17g', spent)}
for i = 3, #ARGV do
  local at = math.floor(tonumber(ARGV[i]) / 1000 * budget * 1e9 + 0.5) / 1e9
  if budget > 0 and spent >= at then
    if redis.call('SET', KEYS[1] .. ':alert:' .. ARGV[i] .. ':' .. ARGV[2], '1', 'NX', 'EX', 172800) then
      table.insert(out, ARGV[i])
    end
  end
end
return out
";

pub struct RedisState {
    conn: Connection,
    take: Script,
    adjust: Script,
    acquire: Script,
    spend: Script,
}

impl RedisState {
    /// Connects lazily: start-up never waits on Redis, and the manager
    /// reconnects by itself after Redis comes back.
    pub fn new(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url)
            .map_err(|e| format!("state.redis_url is not a usable Redis URL ({:?})", e.kind()))?;
        let conn = Connection::new(client)
            .map_err(|e| format!("cannot set up the Redis connection ({:?})", e.kind()))?;
        Ok(RedisState {
            conn,
            take: Script::new(TAKE),
            adjust: Script::new(ADJUST),
            acquire: Script::new(ACQUIRE),
            spend: Script::new(SPEND),
        })
    }

    /// Opens a connection of its own and asks Redis for a `PING`, to say
    /// why calls fail: the shared connection's calls only time out while
    /// redis-rs retries a refused login or an unreachable host behind them.
    pub async fn probe(&self) -> Result<(), String> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(PROBE_TIMEOUT))
            .set_response_timeout(Some(PROBE_TIMEOUT));
        let attempt = async {
            let mut conn = self
                .conn
                .client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            redis::cmd("PING").query_async::<()>(&mut conn).await
        };
        match tokio::time::timeout(PROBE_TIMEOUT, attempt).await {
            Err(_) => Err(format!(
                "a new connection to redis got no answer within {PROBE_TIMEOUT:?}"
            )),
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(probe_failure(&e)),
        }
    }

    /// Runs one of the scripts, loaded once and called by SHA.
    async fn script<T: redis::FromRedisValue>(
        &self,
        replay: Replay,
        call: &redis::ScriptInvocation<'_>,
    ) -> Result<T, StateError> {
        self.conn
            .call(replay, |mut conn| async move {
                call.invoke_async(&mut conn).await
            })
            .await
    }

    /// Runs one plain command.
    async fn command<T: redis::FromRedisValue>(
        &self,
        replay: Replay,
        command: &redis::Cmd,
    ) -> Result<T, StateError> {
        self.conn
            .call(replay, |mut conn| async move {
                command.query_async(&mut conn).await
            })
            .await
    }

    /// Takes `cost` units from a bucket of `per_minute` capacity (GCRA).
    pub async fn take(
        &self,
        key: &BucketKey,
        per_minute: u64,
        cost: u64,
    ) -> Result<Decision, StateError> {
        let per_minute = per_minute.max(1);
        let window = micros(WINDOW);
        let interval = unit_micros(per_minute);
        // More than the whole window is refused anyway; clamping keeps the
        // script's arithmetic far from the edges of Redis integers.
        let cost = cost.min(per_minute.saturating_add(1));
        let mut call = self.take.key(bucket_key(key));
        call.arg(interval).arg(cost).arg(window);
        let (allowed, ahead, retry): (u8, u64, u64) = self.script(Replay::IfDropped, &call).await?;
        // `ahead` is the bucket's use after this call (before it, for a
        // refusal); `retry` is 0 when allowed.
        Ok(Decision {
            allowed: allowed == 1,
            limit: per_minute,
            // (A whole number of units: the float's floor.)
            remaining: (window.saturating_sub(ahead) as f64 / interval) as u64,
            reset: Duration::from_micros(ahead),
            retry_after: Duration::from_micros(retry),
        })
    }

    /// Moves a bucket by `delta` units (a settled reservation).
    pub async fn adjust(
        &self,
        key: &BucketKey,
        per_minute: u64,
        delta: i64,
    ) -> Result<(), StateError> {
        let interval = unit_micros(per_minute);
        let mut call = self.adjust.key(bucket_key(key));
        call.arg(interval).arg(delta);
        let _: i64 = self.script(Replay::Never, &call).await?;
        Ok(())
    }

    /// Takes one of `max` slots as a lease `holder` keeps until released
    /// or until `lease` passes.
    pub async fn acquire(
        &self,
        key: &BucketKey,
        max: u64,
        holder: &str,
        lease: Duration,
    ) -> Result<bool, StateError> {
        let mut call = self.acquire.key(slot_key(key));
        call.arg(max).arg(holder).arg(millis(lease));
        let got: i64 = self.script(Replay::Never, &call).await?;
        Ok(got == 1)
    }

    pub async fn release(&self, key: &BucketKey, holder: &str) -> Result<(), StateError> {
        let _: i64 = self
            .command(Replay::IfDropped, &redis::Cmd::zrem(slot_key(key), holder))
            .await?;
        Ok(())
    }

    /// Today's spend of a scope.
    pub async fn spent(&self, scope: &BudgetScope, day: u64) -> Result<f64, StateError> {
        let value: Option<String> = self
            .command(Replay::IfDropped, &redis::Cmd::get(budget_key(scope, day)))
            .await?;
        Ok(value
            .and_then(|v| v.parse().ok())
            .map_or(0.0, crate::state::budget::rounded))
    }

    /// Adds `usd` to today's spend; returns the new spend and the alert
    /// thresholds this call was the first to cross.
    pub async fn add_spend(
        &self,
        scope: &BudgetScope,
        day: u64,
        usd: f64,
        budget: f64,
        alert_at: &[f64],
    ) -> Result<(f64, Vec<f64>), StateError> {
        let mut call = self.spend.key(budget_key(scope, day));
        call.arg(format!("{usd:.12}")).arg(budget);
        for threshold in alert_at {
            call.arg((threshold * 1000.0).round() as u64);
        }
        let out: Vec<String> = self.script(Replay::Never, &call).await?;
        let spent = out
            .first()
            .and_then(|s| s.parse().ok())
            .map_or(0.0, crate::state::budget::rounded);
        let crossed = out
            .iter()
            .skip(1)
            .filter_map(|t| t.parse::<f64>().ok())
            .map(|t| t / 1000.0)
            .collect();
        Ok((spent, crossed))
    }

    /// A stored response, if some replica stored it and it is still fresh.
    pub async fn cache_get(&self, key: &[u8; 32]) -> Result<Option<CachedResponse>, StateError> {
        let raw: Option<Vec<u8>> = self
            .command(Replay::IfDropped, &redis::Cmd::get(cache_key(key)))
            .await?;
        Ok(raw.and_then(|raw| decode_entry(Bytes::from(raw))))
    }

    /// Stores a response once for every replica, for its TTL.
    pub async fn cache_put(
        &self,
        key: &[u8; 32],
        entry: &CachedResponse,
    ) -> Result<(), StateError> {
        let ttl = millis(entry.ttl).max(1);
        let set = redis::Cmd::pset_ex(cache_key(key), encode_entry(entry), ttl);
        let () = self.command(Replay::IfDropped, &set).await?;
        Ok(())
    }
}

/// The connection to Redis: one multiplexed connection that
/// redis-rs's manager reconnects after I/O errors, and that sluice
/// replaces when the manager would not: a refused login, a server that
/// turned read-only (a failover moved the primary behind the same
/// address), and a connection that stays open but answers nothing (a
/// NAT or proxy that dropped it without a reset).
struct Connection {
    client: redis::Client,
    manager: ArcSwap<ConnectionManager>,
    started: Instant,
    /// When the manager was last replaced, in ms since `started`.
    replaced_ms: AtomicU64,
    /// Since when calls have timed out with no answer between them, in
    /// ms since `started` (0: the last call was answered).
    unanswered_since_ms: AtomicU64,
}

/// Whether a call whose connection turned out closed goes out again.
/// redis-rs reports a call lost in flight as it reports one never sent,
/// so only calls that may run twice are sent again: reads, writes of a
/// value, removals, and a rate-limit take (run twice, it errs on the
/// strict side). Spend, settlements and leases are not.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Replay {
    IfDropped,
    Never,
}

/// A connection is replaced at most this often, not on every call.
const REPLACE_INTERVAL: Duration = Duration::from_secs(1);

/// Calls that time out with no answer for this long mean the connection,
/// not a slow command, is at fault: it is replaced.
const SILENT_FOR: Duration = Duration::from_secs(1);

impl Connection {
    fn new(client: redis::Client) -> redis::RedisResult<Self> {
        let manager = Self::manager(&client)?;
        Ok(Connection {
            client,
            manager: ArcSwap::from_pointee(manager),
            started: Instant::now(),
            replaced_ms: AtomicU64::new(0),
            unanswered_since_ms: AtomicU64::new(0),
        })
    }

    /// Connects lazily: start-up never waits on Redis.
    fn manager(client: &redis::Client) -> redis::RedisResult<ConnectionManager> {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(CALL_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(500));
        ConnectionManager::new_lazy_with_config(client.clone(), config)
    }

    /// Runs `call` within [`CALL_TIMEOUT`].
    async fn call<T, F, Fut>(&self, replay: Replay, call: F) -> Result<T, StateError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let attempts = async {
            match call(ConnectionManager::clone(&self.manager.load())).await {
                // A connection closed while idle (Redis's `timeout`, a
                // proxy's idle limit, CLIENT KILL) is found closed by the
                // call that would have used it; the manager is
                // reconnecting, and the call goes out once more on the
                // new connection rather than failing.
                Err(e) if replay == Replay::IfDropped && e.is_connection_dropped() => {
                    call(ConnectionManager::clone(&self.manager.load())).await
                }
                other => other,
            }
        };
        let result = tokio::time::timeout(CALL_TIMEOUT, attempts).await;
        let timed_out = match &result {
            Err(_) => true,
            Ok(Err(e)) => e.is_timeout(),
            Ok(Ok(_)) => false,
        };
        if timed_out {
            if self.silent_for_long() {
                self.replace();
            }
        } else if self.unanswered_since_ms.load(Ordering::Relaxed) != 0 {
            // An answer (an error reply is one too) ends the silence. Read
            // first: most calls find nothing to clear, and a store on
            // every call would bounce the line between cores.
            self.unanswered_since_ms.store(0, Ordering::Relaxed);
        }
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => {
                if e.kind() == redis::ErrorKind::AuthenticationFailed
                    || e.code() == Some("READONLY")
                {
                    self.replace();
                }
                Err(e.into())
            }
            Err(_) => Err(StateError::Timeout(CALL_TIMEOUT)),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Notes a call that timed out; whether calls have timed out, none
    /// answered between them, for [`SILENT_FOR`] now. A lone timeout on
    /// a replica that was idle (a latency spike) is not that.
    fn silent_for_long(&self) -> bool {
        let now = self.now_ms().max(1);
        match self.unanswered_since_ms.compare_exchange(
            0,
            now,
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => false,
            Err(since) => now.saturating_sub(since) >= millis(SILENT_FOR),
        }
    }

    /// Replaces the manager, which redis-rs would keep as it is: after a
    /// refused login it answers with that error and never connects
    /// again (a rotated password would cut the replica off Redis until
    /// restarted), a read-only server stays read-only on the same
    /// connection, and a connection that answers nothing is never found
    /// closed. Calls already sent on the old one end on their own.
    fn replace(&self) {
        let now = self.now_ms();
        let last = self.replaced_ms.load(Ordering::Relaxed);
        let due = last == 0 || now.saturating_sub(last) >= millis(REPLACE_INTERVAL);
        if due
            && self
                .replaced_ms
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            && let Ok(manager) = Self::manager(&self.client)
        {
            self.manager.store(Arc::new(manager));
            // The new connection gets its own second before it is judged
            // silent: it may still be connecting.
            self.unanswered_since_ms.store(0, Ordering::Relaxed);
        }
    }
}

/// How long [`RedisState::probe`] waits: off the request path, so long
/// enough for a Redis across a zone.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What an operator does about a failed probe, from the error's kind and
/// code only (its detail may quote the URL, password included).
fn probe_failure(e: &redis::RedisError) -> String {
    let refused_login = e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"));
    if refused_login {
        return format!(
            "redis refused the login ({}): check the user and password in state.redis_url",
            e.code().unwrap_or("AuthenticationFailed")
        );
    }
    if e.is_connection_refusal() {
        return "redis refused the connection: is it running, on the host and port of state.redis_url?"
            .to_string();
    }
    if e.is_timeout() {
        return format!("a new connection to redis got no answer within {PROBE_TIMEOUT:?}");
    }
    format!(
        "a new connection to redis failed: {:?} ({})",
        e.kind(),
        e.category()
    )
}

/// The µs one unit of a `per_minute` limit takes to refill, with its
/// fraction: in whole µs, 40 million a minute would refill at 60 million
/// (1 µs each), and 7 million at 7.5 million.
fn unit_micros(per_minute: u64) -> f64 {
    micros(WINDOW) as f64 / per_minute.max(1) as f64
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Appends a name as it appears in keys: `%` and `:` escaped so that no
/// two different (scope, identity) pairs share a key.
fn push_escaped(out: &mut String, name: &str) {
    for c in name.chars() {
        match c {
            '%' => out.push_str("%25"),
            ':' => out.push_str("%3A"),
            c => out.push(c),
        }
    }
}

fn push_identity(out: &mut String, id: &IdentityId) {
    match id {
        IdentityId::Key(k) => {
            out.push_str("key:");
            push_escaped(out, k);
        }
        IdentityId::Subject(s) => {
            out.push_str("sub:");
            push_escaped(out, s);
        }
        IdentityId::Ip(ip) => {
            out.push_str("ip:");
            push_escaped(out, &ip.to_string());
        }
    }
}

fn identity_part(id: &IdentityId) -> String {
    let mut out = String::new();
    push_identity(&mut out, id);
    out
}

/// `prefix` + `scope:name:identity`, e.g. `sluice:rl:tier:free:key:alice`.
fn limit_key(prefix: &str, key: &BucketKey) -> String {
    let (kind, name) = match &key.scope {
        Scope::Tier(n) => ("tier:", n),
        Scope::Route(n) => ("route:", n),
        Scope::TierTokens(n) => ("tier-tokens:", n),
        Scope::RouteTokens(n) => ("route-tokens:", n),
    };
    let mut out = String::with_capacity(64);
    out.push_str(prefix);
    out.push_str(kind);
    push_escaped(&mut out, name);
    out.push(':');
    push_identity(&mut out, &key.identity);
    out
}

fn bucket_key(key: &BucketKey) -> String {
    limit_key("sluice:rl:", key)
}

fn slot_key(key: &BucketKey) -> String {
    limit_key("sluice:slots:", key)
}

/// A day's spend; its alert claims share the hash tag, so one script
/// touches one cluster slot.
fn budget_key(scope: &BudgetScope, day: u64) -> String {
    let who = match scope {
        BudgetScope::Global => "global".to_owned(),
        BudgetScope::Identity(id) => identity_part(id),
    };
    format!("sluice:budget:{{{day}:{who}}}")
}

fn cache_key(key: &[u8; 32]) -> String {
    format!("sluice:cache:{}", hex::encode(key))
}

/// An entry as stored: a JSON head line, then the body bytes as they are.
#[derive(serde::Serialize, serde::Deserialize)]
struct EntryHead {
    headers: Vec<(String, String)>,
    model: Option<String>,
    cost_usd: Option<f64>,
    stored_unix_ms: u64,
    ttl_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vary: Option<String>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}

fn encode_entry(entry: &CachedResponse) -> Vec<u8> {
    let age = entry.stored_at.elapsed();
    let head = EntryHead {
        headers: entry
            .headers
            .iter()
            .filter_map(|(n, v)| Some((n.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
        model: entry.model.clone(),
        cost_usd: entry.cost_usd,
        stored_unix_ms: unix_ms().saturating_sub(millis(age)),
        ttl_ms: millis(entry.ttl),
        vary: entry.vary.map(hex::encode),
    };
    let mut out = serde_json::to_vec(&head).unwrap_or_default();
    out.push(b'\n');
    out.extend_from_slice(&entry.body);
    out
}

/// The body is a slice of `raw`, not a copy of it.
fn decode_entry(raw: Bytes) -> Option<CachedResponse> {
    let split = raw.iter().position(|&b| b == b'\n')?;
    let head: EntryHead = serde_json::from_slice(&raw[..split]).ok()?;
    let mut headers = HeaderMap::new();
    for (name, value) in head.headers {
        headers.append(
            HeaderName::from_bytes(name.as_bytes()).ok()?,
            HeaderValue::from_str(&value).ok()?,
        );
    }
    let age = Duration::from_millis(unix_ms().saturating_sub(head.stored_unix_ms));
    let now = std::time::Instant::now();
    Some(CachedResponse {
        headers,
        body: raw.slice(split + 1..),
        stored_at: now.checked_sub(age).unwrap_or(now),
        model: head.model,
        cost_usd: head.cost_usd,
        ttl: Duration::from_millis(head.ttl_ms),
        vary: match head.vary {
            Some(digest) => Some(hex::decode(digest).ok()?.try_into().ok()?),
            None => None,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_collide_through_separators() {
        let a = BucketKey {
            scope: Scope::Tier("a:key".into()),
            identity: IdentityId::Key("b".into()),
        };
        let b = BucketKey {
            scope: Scope::Tier("a".into()),
            identity: IdentityId::Key("key:b".into()),
        };
        assert_ne!(bucket_key(&a), bucket_key(&b));
        assert_eq!(bucket_key(&b), "sluice:rl:tier:a:key:key%3Ab");
    }

    #[test]
    fn entries_round_trip() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            HeaderValue::from_static("text/event-stream"),
        );
        let entry = CachedResponse {
            headers,
            body: Bytes::from_static(b"data: {\"x\":1}\n\ndata: [DONE]\n\n"),
            stored_at: std::time::Instant::now(),
            model: Some("m".into()),
            cost_usd: Some(0.25),
            ttl: Duration::from_secs(60),
            vary: Some([7; 32]),
        };
        let back = decode_entry(Bytes::from(encode_entry(&entry))).unwrap();
        assert_eq!(back.vary, entry.vary);
        assert_eq!(back.body, entry.body);
        assert_eq!(back.headers, entry.headers);
        assert_eq!(back.model, entry.model);
        assert_eq!(back.cost_usd, entry.cost_usd);
        assert_eq!(back.ttl, entry.ttl);
    }

    #[test]
    fn limit_keys_escape_names_and_keep_their_shape() {
        let key = BucketKey {
            scope: Scope::Tier("fr:ee".into()),
            identity: IdentityId::Key("a%b".into()),
        };
        assert_eq!(bucket_key(&key), "sluice:rl:tier:fr%3Aee:key:a%25b");
        let key = BucketKey {
            scope: Scope::RouteTokens("chat".into()),
            identity: IdentityId::Ip("10.0.0.1".parse().unwrap()),
        };
        assert_eq!(slot_key(&key), "sluice:slots:route-tokens:chat:ip:10.0.0.1");
    }
}
