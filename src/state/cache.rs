//! The response cache store: finished 200 responses by request digest,
//! bounded in bytes (moka, with a weigher and a per-entry TTL), and the
//! table of requests in flight that identical requests wait on instead of
//! calling the upstream again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use tokio::sync::watch;

/// A request's cache key: a SHA-256 digest (see `proxy::cache::key`).
pub type Key = [u8; 32];

/// A stored response, shared by every hit.
#[derive(Debug)]
pub struct CachedResponse {
    /// The headers the first client got, minus per-request ones.
    pub headers: HeaderMap,
    /// The body exactly as the first client got it (an SSE stream too).
    pub body: Bytes,
    pub stored_at: Instant,
    /// The model that answered, for the access log of hits.
    pub model: Option<String>,
    /// What the upstream call cost: what each hit saves.
    pub cost_usd: Option<f64>,
    pub ttl: Duration,
    /// The digest of the first request's values of the headers the
    /// response's `vary` names: a hit needs the same values.
    pub vary: Option<[u8; 32]>,
}

impl CachedResponse {
    /// Bytes this entry holds, as the store's weigher counts them: the
    /// body, the headers and a fixed overhead for the key and bookkeeping.
    pub fn weight(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + HEADER_OVERHEAD)
            .sum();
        (self.body.len() + headers + ENTRY_OVERHEAD) as u64
    }
}

/// What a stored header costs besides its text: its slot in the map, the
/// allocations of its value and of a name no constant names, and the
/// allocator's own bytes for each. With [`ENTRY_OVERHEAD`] (the store's
/// node, timers and key, this struct, the model's name), measured from
/// the outside at ~2 KB of memory for a small answer that 32 and 256
/// counted as 706 bytes (a bound of 256 MiB then took ~700 MB), and
/// 160 and 640 as 1.2 KB.
const HEADER_OVERHEAD: usize = 192;
const ENTRY_OVERHEAD: usize = 1024;

/// Largest entry body stored: an eighth of the whole bound, so that one
/// huge answer cannot evict everything else, and never more than 8 MiB.
/// A small cache (a test's, or a tight sidecar's) still takes answers of
/// up to 64 KiB, or its whole bound when that is less: an eighth of 2 KiB
/// would refuse every chat answer and the cache would never hit.
pub fn entry_cap(max_bytes: u64) -> usize {
    let cap = (max_bytes / 8).max(max_bytes.min(64 << 10)).min(8 << 20);
    usize::try_from(cap).unwrap_or(8 << 20)
}

/// Shards of the in-flight table: a miss locks one of them briefly, never
/// one lock for the whole process.
const FLIGHT_SHARDS: usize = 16;

type Flights = HashMap<Key, watch::Receiver<Ended>>;

/// How a fetch that others waited on ended without storing its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// It failed (or its client left): one waiter takes the lead next.
    Failed,
    /// Its answer was final but not stored (not cacheable, too large):
    /// each waiter calls the upstream now, rather than in turn.
    Unstorable,
}

pub struct ResponseCache {
    entries: moka::sync::Cache<Key, Arc<CachedResponse>>,
    flights: [Mutex<Flights>; FLIGHT_SHARDS],
    entry_cap: usize,
}

/// What [`ResponseCache::join`] found for a key that is not stored.
pub enum Join {
    /// No one is fetching it: the caller does, and holds the flight until
    /// its response is stored or has failed.
    Lead(Flight),
    /// Another request is fetching it: wait on this, then look again.
    Wait(watch::Receiver<Ended>),
}

/// The lead of a fetch. Dropping it (stored or failed) wakes every waiter.
pub struct Flight {
    cache: Arc<ResponseCache>,
    key: Key,
    done: watch::Sender<Ended>,
}

impl Flight {
    /// Ends the fetch with an answer that will not be stored.
    pub fn unstorable(self) {
        self.done.send_replace(Ended::Unstorable);
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        // Removed before the sender drops, so a woken waiter that finds no
        // entry can take the lead itself.
        self.cache.shard(&self.key).remove(&self.key);
    }
}

struct TtlExpiry;

impl moka::Expiry<Key, Arc<CachedResponse>> for TtlExpiry {
    fn expire_after_create(
        &self,
        _key: &Key,
        value: &Arc<CachedResponse>,
        _created_at: Instant,
    ) -> Option<Duration> {
        Some(value.ttl)
    }

    /// A replaced entry (a `no-cache` refresh) lives its own full TTL.
    fn expire_after_update(
        &self,
        _key: &Key,
        value: &Arc<CachedResponse>,
        _updated_at: Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.ttl)
    }
}

impl ResponseCache {
    pub fn new(max_bytes: u64) -> Arc<Self> {
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &Key, value: &Arc<CachedResponse>| {
                u32::try_from(value.weight()).unwrap_or(u32::MAX)
            })
            .expire_after(TtlExpiry)
            .build();
        Arc::new(ResponseCache {
            entries,
            flights: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            entry_cap: entry_cap(max_bytes),
        })
    }

    /// The stored response for `key`, if still fresh.
    pub fn get(&self, key: &Key) -> Option<Arc<CachedResponse>> {
        self.entries.get(key)
    }

    /// Stores a finished response; too large an entry is not stored.
    pub fn insert(&self, key: Key, response: CachedResponse) {
        if response.body.len() <= self.entry_cap && !response.ttl.is_zero() {
            self.entries.insert(key, Arc::new(response));
        }
    }

    /// The largest body stored; a response growing past it stops being
    /// copied for the cache.
    pub fn entry_cap(&self) -> usize {
        self.entry_cap
    }

    /// Takes the lead of fetching `key`, or joins the request that has it.
    pub fn join(self: &Arc<Self>, key: Key) -> Join {
        let mut flights = self.shard(&key);
        if let Some(waiting) = flights.get(&key) {
            return Join::Wait(waiting.clone());
        }
        let (done, waiting) = watch::channel(Ended::Failed);
        flights.insert(key, waiting);
        Join::Lead(Flight {
            cache: self.clone(),
            key,
            done,
        })
    }

    /// Bytes held and entries, after pending evictions ran.
    pub fn usage(&self) -> (u64, u64) {
        self.entries.run_pending_tasks();
        (self.entries.weighted_size(), self.entries.entry_count())
    }

    fn shard(&self, key: &Key) -> std::sync::MutexGuard<'_, Flights> {
        // The key is a digest: its first byte is already uniform.
        let index = usize::from(key[0]) % FLIGHT_SHARDS;
        self.flights[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_cap_is_an_eighth_within_bounds() {
        assert_eq!(entry_cap(2 << 10), 2 << 10);
        assert_eq!(entry_cap(64 << 10), 64 << 10);
        assert_eq!(entry_cap(1 << 20), 128 << 10);
        assert_eq!(entry_cap(256 << 20), 8 << 20);
    }
}
