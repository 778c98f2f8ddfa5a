//! A loopback TCP proxy in front of a server, for partition tests: each process under test
//! reaches the server through its own proxy, whose link the test can freeze (bytes are
//! held in both directions, connections stay open) — at once, or at the first request that
//! carries given bytes — then heal, or cut (its open connections are closed; new ones are
//! let through), or close the one connection that sends given bytes.

#![allow(dead_code)] // each test uses its own part

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
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
    link: Arc<watch::Sender<Link>>,
    /// Bumped to close every open connection.
    cuts: watch::Sender<u64>,
    trigger: Trigger,
    task: tokio::task::JoinHandle<()>,
}

/// What an armed trigger does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Freezes the whole link.
    Freeze,
    /// Closes the connection that sent the chunk (the chunk is lost).
    Close,
}

/// Byte strings that, all found in one chunk a client sends, trigger an action before that
/// chunk is forwarded (armed once).
type Trigger = Arc<Mutex<Option<(Vec<Vec<u8>>, Action)>>>;

impl Proxy {
    /// Starts the proxy (on the current tokio runtime).
    pub async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a port");
        let port = listener.local_addr().expect("an address").port();
        let (link, state) = watch::channel(Link::Up);
        let link = Arc::new(link);
        let (cuts, cut) = watch::channel(0u64);
        let trigger = Trigger::default();
        let (armed, freezer) = (trigger.clone(), link.clone());
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
                let up = Some((armed.clone(), freezer.clone()));
                tokio::spawn(pipe(cr, sw, state.clone(), cut.clone(), up));
                tokio::spawn(pipe(sr, cw, state.clone(), cut.clone(), None));
            }
        });
        Proxy {
            port,
            link,
            cuts,
            trigger,
            task,
        }
    }

    /// The URL of a Redis behind the proxy.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Holds every byte until [`Proxy::heal`].
    pub fn freeze(&self) {
        let _ = self.link.send(Link::Frozen);
    }

    /// Freezes the link at the first chunk a client sends that holds every one of
    /// `patterns` (that chunk is held too), e.g. the commit of one instance's step.
    pub fn freeze_on(&self, patterns: &[&[u8]]) {
        self.arm(patterns, Action::Freeze);
    }

    /// Closes the connection that first sends a chunk holding every one of `patterns`,
    /// before that chunk is forwarded: one request is lost with its connection, and
    /// the client's other connections stay up.
    pub fn close_on(&self, patterns: &[&[u8]]) {
        self.arm(patterns, Action::Close);
    }

    /// Whether the trigger armed last has fired.
    pub fn fired(&self) -> bool {
        self.trigger.lock().unwrap().is_none()
    }

    fn arm(&self, patterns: &[&[u8]], action: Action) {
        *self.trigger.lock().unwrap() =
            Some((patterns.iter().map(|p| p.to_vec()).collect(), action));
    }

    /// Closes every open connection (bytes held in them are lost), as a reset link does;
    /// the clients' reconnections go through.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
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

fn holds(chunk: &[u8], pattern: &[u8]) -> bool {
    pattern.is_empty() || chunk.windows(pattern.len()).any(|w| w == pattern)
}

/// Copies one direction, holding bytes while the link is frozen. The client-to-server
/// direction also watches for the armed trigger.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut state: watch::Receiver<Link>,
    mut cut: watch::Receiver<u64>,
    up: Option<(Trigger, Arc<watch::Sender<Link>>)>,
) {
    cut.mark_unchanged();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = state.changed() => continue,
            _ = cut.changed() => return,
        };
        if let Some((trigger, link)) = &up {
            let mut armed = trigger.lock().unwrap();
            if let Some((_, action)) = armed
                .as_ref()
                .filter(|(ps, _)| ps.iter().all(|p| holds(&buf[..n], p)))
            {
                let action = *action;
                *armed = None;
                match action {
                    Action::Freeze => {
                        let _ = link.send(Link::Frozen);
                    }
                    Action::Close => return,
                }
            }
        }
        // Held while frozen (a link frozen for ten minutes is given up).
        while *state.borrow_and_update() == Link::Frozen {
            tokio::select! {
                changed = tokio::time::timeout(Duration::from_mins(10), state.changed()) => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = cut.changed() => return,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
