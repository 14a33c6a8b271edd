//! Integration tests: the real gateway on ephemeral loopback ports against
//! real (fake) upstreams, asserting what users observe.

mod support;

mod auth;
mod body_log;
mod budget;
mod cache;
mod cli;
mod config_errors;
mod cors;
mod failover;
mod jwt;
mod limits;
mod listener;
mod mock_llm;
mod proxy;
mod redis_state;
mod reload;
mod shutdown;
mod streaming;
mod telemetry;
mod tls_listener;
mod tls_upstream;
mod upstream_errors;
mod upstream_pool;
mod usage;
mod validate;
