//! LLM-aware handling of response bodies: the tap every response passes
//! through (and, as they land, SSE decoding, usage and pricing).

pub mod pricing;
pub mod spend;
pub mod sse;
pub mod tap;
pub mod usage;
