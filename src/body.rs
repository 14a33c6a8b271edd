//! The one body type that flows through sluice both ways, and small
//! constructors for bodies sluice writes itself.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};

/// Errors of any body in flight (client, upstream, mock, tap).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A type-erased streaming body. `Unsync` because hyper needs bodies to be
/// `Send` only, and upstream bodies are not `Sync`.
pub type BoxBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BodyError>;

/// A body of known bytes.
pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// An empty body.
pub fn empty() -> BoxBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// The error of a body in flight. A concrete type rather than a bare
/// `Box<dyn Error>`: hyper's client and server bounds on a boxed trait
/// object fail rustc's higher-ranked checks inside spawned futures.
#[derive(Debug)]
pub struct BodyError(pub BoxError);

impl BodyError {
    pub fn new(e: impl Into<BoxError>) -> Self {
        BodyError(e.into())
    }
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.0)
    }
}
