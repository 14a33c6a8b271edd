//! What survives reloads and is shared by every request: rate-limit
//! buckets and concurrency slots, budgets and the response cache, in
//! memory (one replica) or in Redis (every replica), behind one [`State`]
//! whose calls are each one atomic decision, with no lock held across an
//! await.

pub mod budget;
pub mod cache;
pub mod limiter;
pub mod redis;
pub mod store;

pub use limiter::{BucketKey, Decision, MemoryLimiter};
pub use store::{Slot, State, Unavailable};
