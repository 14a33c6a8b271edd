//! Integration tests: the real gateway on ephemeral loopback ports against
//! real (fake) upstreams, asserting what users observe.

mod support;

mod config_errors;
mod cli;
mod proxy;
mod streaming;
mod upstream_errors;
mod tls_upstream;
mod shutdown;
mod mock_llm;
mod auth;
mod telemetry;
