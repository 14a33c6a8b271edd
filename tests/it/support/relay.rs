//! `Relay`: a TCP relay in front of a server, as a proxy, a NAT or a
//! cloud load balancer in front of Redis is. It can strand the
//! connections it carries (they stay open and carry nothing more, as
//! after a NAT entry expired without a reset) and send new connections
//! to another server (a failover behind one address).

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Relay {
    pub port: u16,
    target: Arc<AtomicU16>,
    /// Connections made before the current generation carry nothing.
    generation: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target_port: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let target = Arc::new(AtomicU16::new(target_port));
        let generation = Arc::new(AtomicU64::new(0));
        let (to, now) = (target.clone(), generation.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let born = now.load(Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(("127.0.0.1", to.load(Ordering::SeqCst))).await
                else {
                    continue;
                };
                let (client_read, client_write) = client.into_split();
                let (server_read, server_write) = server.into_split();
                tokio::spawn(pipe(client_read, server_write, now.clone(), born));
                tokio::spawn(pipe(server_read, client_write, now.clone(), born));
            }
        });
        Relay {
            port,
            target,
            generation,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The connections open now carry nothing more, and stay open.
    pub fn strand(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// New connections go to `port`; the open ones stay where they are.
    pub fn point_at(&self, port: u16) {
        self.target.store(port, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    generation: Arc<AtomicU64>,
    born: u64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if generation.load(Ordering::SeqCst) != born {
            // Stranded: read and dropped, the socket kept open.
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
