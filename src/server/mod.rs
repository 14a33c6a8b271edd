//! The two listeners (proxy and admin) and their lifecycle: bind, serve,
//! and on shutdown turn `/readyz` to 503, stop accepting, drain in-flight
//! requests (streams too) for up to `shutdown_grace`, then stop.

mod accept;
pub mod admin;
pub mod deadline;
mod drain;
pub mod idle;
pub mod listener;
pub mod open_files;
mod preface;
mod refusal;
pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::gateway::Gateway;

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("tls: {0}")]
    Tls(String),
}

/// A started gateway.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The proxy listener's certificate, for reload to swap.
    pub certs: Option<Arc<tls::CertStore>>,
    shutdown: watch::Sender<bool>,
    /// Ends the drain at once, as if `shutdown_grace` had run out.
    cut: Arc<tokio::sync::Notify>,
    task: JoinHandle<()>,
}

impl Running {
    /// Begins the graceful shutdown (what SIGTERM does).
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// What ends a drain now, also once [`Running::wait`] holds `self`:
    /// the requests still open are cut, as when `shutdown_grace` runs
    /// out (a second SIGTERM or Ctrl-C).
    pub fn cutter(&self) -> impl Fn() + Send + 'static {
        let cut = self.cut.clone();
        move || cut.notify_one()
    }

    /// Waits until draining is over and both listeners are closed.
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// The listen queue asked for; the kernel caps it at `net.core.somaxconn`
/// (4096 on current Linux). std's and tokio's `bind` ask for 128, and a
/// reconnect storm past that has its SYNs dropped and retried a second or
/// more later; connections past `max_connections` wait in this queue too.
const LISTEN_BACKLOG: u32 = 4096;

pub async fn bind(addr: SocketAddr) -> Result<TcpListener, StartError> {
    let bound = || -> io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As std's bind does: a restart may bind while old connections
        // linger in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bound().map_err(|source| StartError::Bind { addr, source })
}

/// Binds both listeners and serves until [`Running::shutdown`].
pub async fn start(gw: Arc<Gateway>) -> Result<Running, StartError> {
    let active = gw.active();
    let snap = &active.snapshot;
    let certs = match &snap.tls {
        Some(files) => Some(tls::CertStore::load(files).map_err(StartError::Tls)?),
        None => None,
    };
    let tls = match &certs {
        Some(store) => {
            tls::report_expiry(store, &gw);
            Some(tls::acceptor(store.clone()).map_err(StartError::Tls)?)
        }
        None => None,
    };
    let proxy = bind(snap.listen).await?;
    let admin = bind(snap.admin_listen).await?;
    let local = |l: &TcpListener, fallback: SocketAddr| l.local_addr().unwrap_or(fallback);
    let proxy_addr = local(&proxy, snap.listen);
    let admin_addr = local(&admin, snap.admin_listen);

    let (shutdown, proxy_stop) = watch::channel(false);
    let (admin_stop_tx, admin_stop) = watch::channel(false);
    let admin_task = tokio::spawn(admin::serve(gw.clone(), admin, admin_stop));
    let proxy_gw = gw.clone();
    let cut = Arc::new(tokio::sync::Notify::new());
    let cut_drain = cut.clone();
    let task = tokio::spawn(async move {
        listener::serve(proxy_gw, proxy, tls, proxy_stop, cut_drain).await;
        // The admin listener outlives the drain so probes see 503, not a refusal.
        let _ = admin_stop_tx.send(true);
        let _ = admin_task.await;
    });
    match gw.jwks() {
        // Ready once the first fetch of the JWKS keys is done (or failed,
        // within its timeout): until then every token would get a 401,
        // and a probe that says ready would send traffic to it.
        Some(jwks) => {
            let gw = gw.clone();
            tokio::spawn(async move {
                // (Bounded again here: a start is never held for good.)
                let wait = crate::proxy::jwks::FETCH_TIMEOUT * 2;
                let _ = tokio::time::timeout(wait, jwks.first_fetch_done()).await;
                gw.set_started();
            });
        }
        None => gw.set_started(),
    }
    // Threads serving requests (1 on a current-thread runtime).
    let threads = tokio::runtime::Handle::current().metrics().num_workers();
    let state = match snap.state.backend {
        crate::snapshot::StateBackend::Memory => "memory",
        crate::snapshot::StateBackend::Redis => "redis",
    };
    tracing::info!(%proxy_addr, %admin_addr, threads, state, "sluice is serving");
    Ok(Running {
        proxy_addr,
        admin_addr,
        certs,
        shutdown,
        cut,
        task,
    })
}
