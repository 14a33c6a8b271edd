//! What sluice tells operators: Prometheus metrics and JSON log lines.

pub mod access_log;
pub mod alerts;
pub mod batch;
pub mod body_log;
pub mod log;
pub mod metrics;
pub mod scrub;
