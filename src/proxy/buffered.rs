//! The bound on request bodies held whole in memory, all requests
//! together (`limits.max_buffered_bytes`). Past it a request gets 503,
//! which clients retry, rather than the sidecar growing until the kernel
//! kills it with every request it holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

/// The bytes of request bodies held right now.
#[derive(Debug, Default)]
pub struct Buffered {
    held: AtomicU64,
}

impl Buffered {
    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }
}

/// What one request may take of [`Buffered`]: up to `cap` for all.
#[derive(Clone, Copy)]
pub struct Budget<'a> {
    pub pool: &'a Arc<Buffered>,
    pub cap: u64,
}

impl Budget<'_> {
    /// An empty share, grown as a body arrives.
    pub fn share(self) -> Share {
        Share {
            pool: self.pool.clone(),
            cap: self.cap,
            bytes: 0,
        }
    }

    /// `bytes`, an edited copy of a body already admitted, counted in its
    /// turn whatever the cap: the original, whose share goes back once it
    /// is dropped, held as much, and refusing now would waste the work.
    pub fn adopt(self, bytes: Bytes) -> Bytes {
        let mut share = self.share();
        share.bytes = bytes.len() as u64;
        self.pool.held.fetch_add(share.bytes, Ordering::Relaxed);
        share.attach(bytes)
    }
}

/// One body's part of the budget, given back when it is dropped.
pub struct Share {
    pool: Arc<Buffered>,
    cap: u64,
    bytes: u64,
}

impl Share {
    /// Takes `n` more bytes, unless all bodies together would pass the cap.
    pub fn grow(&mut self, n: u64) -> bool {
        if n == 0 {
            // An empty frame takes nothing, even past a lowered cap.
            return true;
        }
        let held = &self.pool.held;
        let mut current = held.load(Ordering::Relaxed);
        loop {
            let Some(next) = current.checked_add(n).filter(|&next| next <= self.cap) else {
                return false;
            };
            match held.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => {
                    self.bytes += n;
                    return true;
                }
                Err(now) => current = now,
            }
        }
    }

    /// `bytes`, carrying this share: it is given back when the last
    /// copy of the returned `Bytes` is dropped (each attempt of a pool
    /// sends a copy), not when the request ends.
    pub fn attach(self, bytes: Bytes) -> Bytes {
        if self.bytes == 0 {
            return bytes;
        }
        Bytes::from_owner(Held {
            bytes,
            _share: self,
        })
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.pool.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// A body and the share it holds.
struct Held {
    bytes: Bytes,
    _share: Share,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        &self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_bounded_together_and_given_back_with_the_last_copy() {
        let pool = Arc::new(Buffered::default());
        let budget = Budget {
            pool: &pool,
            cap: 100,
        };
        let mut first = budget.share();
        assert!(first.grow(60));
        let mut second = budget.share();
        assert!(!second.grow(41), "60 + 41 passes the cap");
        assert!(second.grow(40));
        assert_eq!(pool.held(), 100);
        drop(second);
        assert_eq!(pool.held(), 60);

        let body = first.attach(Bytes::from(vec![7u8; 60]));
        let copy = body.clone();
        assert_eq!(&copy[..3], [7, 7, 7]);
        drop(body);
        assert_eq!(pool.held(), 60, "a copy still holds it");
        drop(copy);
        assert_eq!(pool.held(), 0);
    }
}
