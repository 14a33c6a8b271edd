//! What survives reloads and is shared by every request: rate-limit
//! buckets and concurrency slots, budgets and the response cache. One
//! small store interface, each decision one atomic call and no lock held
//! across an await, so a Redis backend can implement it with one round
//! trip per decision.

pub mod budget;
pub mod cache;
pub mod limiter;

pub use limiter::{BucketKey, Decision, MemoryLimiter, Slot};
