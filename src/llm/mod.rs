//! LLM-aware handling of bodies: the tap every response passes through,
//! SSE decoding, usage, pricing and spend, and OpenAI request shapes.

pub mod facts;
pub mod form;
pub mod pricing;
pub mod prompt_size;
pub mod shape;
pub mod spend;
pub mod splice;
pub mod sse;
pub mod tap;
pub mod top_level;
pub mod usage;
