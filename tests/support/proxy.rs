//! A loopback TCP proxy in front of a server, for partition tests: each process under test
//! reaches the server through its own proxy, whose link the test can freeze (bytes are
//! held in both directions, connections stay open), then heal.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// The state of a proxied link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// Bytes flow.
    Up,
    /// Bytes are held until the link is up again (a stalled network).
    Frozen,
}

/// A proxy on a free loopback port, forwarding to `127.0.0.1:upstream`.
pub struct Proxy {
    /// The port clients connect to.
    pub port: u16,
    link: watch::Sender<Link>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts the proxy (on the current tokio runtime).
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a port");
        let port = listener.local_addr().expect("an address").port();
        let (link, state) = watch::channel(Link::Up);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                let addr = SocketAddr::from(([127, 0, 0, 1], upstream));
                let Ok(server) = TcpStream::connect(addr).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pipe(cr, sw, state.clone()));
                tokio::spawn(pipe(sr, cw, state.clone()));
            }
        });
        Proxy { port, link, task }
    }

    /// The URL of a Redis behind the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Holds every byte until [`Proxy::heal`].
    pub fn freeze(&self) {
        let _ = self.link.send(Link::Frozen);
    }

    /// Lets bytes flow again.
    pub fn heal(&self) {
        let _ = self.link.send(Link::Up);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies one direction, holding bytes while the link is frozen.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<Link>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = state.changed() => continue,
        };
        // Held while frozen (a link frozen for ten minutes is given up).
        while *state.borrow_and_update() == Link::Frozen {
            if tokio::time::timeout(Duration::from_mins(10), state.changed())
                .await
                .is_err()
            {
                return;
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
