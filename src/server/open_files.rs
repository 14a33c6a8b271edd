//! The open-files limit: raised at start to what the system allows, so a
//! default soft limit of 1024 does not cut `max_connections` short.

#[cfg(unix)]
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors one proxied connection can hold: the client's, and the
/// upstream connection serving it.
const PER_CONNECTION: u64 = 2;
/// Listeners, the log, the config watcher, Redis and the like.
const RESERVED: u64 = 64;

/// The limit on open files as it stands after [`raise`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit before sluice raised it.
    pub was: Option<u64>,
    /// The soft limit in force (`None`: unlimited).
    pub now: Option<u64>,
}

impl OpenFiles {
    /// The descriptors `max_connections` can need when the limit is
    /// lower than that, for a warning.
    pub fn short_for(&self, max_connections: usize) -> Option<u64> {
        let needed = u64::try_from(max_connections)
            .unwrap_or(u64::MAX)
            .saturating_mul(PER_CONNECTION)
            .saturating_add(RESERVED);
        self.now.filter(|&now| now < needed).map(|_| needed)
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit, as Go's runtime
/// and nginx's `worker_rlimit_nofile` do: container runtimes commonly
/// start processes at 1024 soft with a far higher hard limit. Failure
/// leaves the limit as it was.
#[cfg(unix)]
pub fn raise() -> OpenFiles {
    let limit = getrlimit(Resource::Nofile);
    let was = limit.current;
    if limit.current == limit.maximum {
        return OpenFiles { was, now: was };
    }
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => OpenFiles {
            was,
            now: limit.maximum,
        },
        Err(_) => OpenFiles { was, now: was },
    }
}

/// Elsewhere there is no such limit to raise.
#[cfg(not(unix))]
pub fn raise() -> OpenFiles {
    OpenFiles {
        was: None,
        now: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_limit_below_two_per_connection_is_short() {
        let limit = |now| OpenFiles { was: now, now };
        assert_eq!(limit(Some(1024)).short_for(10_000), Some(20_064));
        assert_eq!(limit(Some(1024)).short_for(400), None);
        assert_eq!(limit(Some(20_064)).short_for(10_000), None);
        assert_eq!(limit(None).short_for(usize::MAX), None);
    }
}
