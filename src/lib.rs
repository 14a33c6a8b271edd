//! sluice: an AI gateway sidecar. One binary, one YAML file: every request
//! is routed, authenticated, checked, limited, optionally served from
//! cache, forwarded to an upstream (the app beside it, or a pool of LLM
//! APIs with failover), and metered.
//!
//! ```text
//! client ─▶ route ─▶ auth ─▶ validate ─▶ limit ─▶ cache ─▶ forward ─▶ upstream
//!                                                                 (tap: metrics, log)
//! ```
//!
//! Module map:
//! - [`config`]: YAML → validated [`snapshot::Snapshot`] (shared by `run`, `check`, reload)
//! - [`gateway`]: the snapshot behind an atomic pointer, plus metrics and logs
//! - [`server`]: proxy and admin listeners, TLS, graceful drain
//! - [`reload`]: SIGHUP and file changes → a validated config swap, a new certificate
//! - [`proxy`]: the request path, one file per phase
//! - [`upstream`]: pooled clients and the built-in mock LLM
//! - [`llm`]: the response tap (and usage, pricing as they land)
//! - [`telemetry`]: Prometheus metrics and the JSON access log
#![forbid(unsafe_code)]

pub mod body;
pub mod config;
pub mod gateway;
pub mod llm;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod snapshot;
pub mod state;
pub mod telemetry;
pub mod upstream;
