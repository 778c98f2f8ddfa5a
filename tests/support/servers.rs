//! Real servers for tests: `redis-server` and moto's S3 server, each on a free loopback
//! port, started by the test binary that needs them and stopped by PID.
//!
//! Both are installed by `./scripts/test` (redis-server from Debian's packages, moto from
//! `PyPI` into `.venv-s3`). A missing server is a test failure that says how to install it —
//! never a silent skip, never a mock.
//!
//! A watchdog process per server stops it (by its PID) when the test binary exits, so the
//! shared, lazily started servers of a test binary never outlive it.

#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound, then released for the server to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

#[allow(clippy::disallowed_methods)] // tests wait on wall-clock time for a server to start
fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < limit,
            "{what} did not become ready within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn port_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Kills `pid` when this process exits (a detached shell that polls for our PID).
fn reap_on_exit(pid: u32) {
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; kill -9 {pid} 2>/dev/null",
        me = std::process::id()
    );
    let _ = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

fn alive(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A `redis-server` on a loopback port.
pub struct Redis {
    /// Its port.
    pub port: u16,
    dir: PathBuf,
    pid: u32,
    aof: bool,
    _tmp: tempfile::TempDir,
}

impl Redis {
    /// Starts a server without persistence (a fast, throwaway server).
    pub fn start() -> Redis {
        Self::start_with(false)
    }

    /// Starts a server with the append-only file on (`appendfsync always`), so a restart
    /// keeps everything acknowledged.
    pub fn start_durable() -> Redis {
        Self::start_with(true)
    }

    fn start_with(aof: bool) -> Redis {
        let tmp = tempfile::tempdir().expect("temp dir");
        let dir = tmp.path().to_path_buf();
        let mut r = Redis {
            port: free_port(),
            dir,
            pid: 0,
            aof,
            _tmp: tmp,
        };
        r.launch();
        r
    }

    fn launch(&mut self) {
        let pidfile = self.dir.join("redis.pid");
        let _ = std::fs::remove_file(&pidfile);
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--dir", self.dir.to_str().expect("utf-8 temp dir")])
            .args(["--daemonize", "yes", "--pidfile"])
            .arg(&pidfile)
            .args(["--logfile", "redis.log"]);
        if self.aof {
            cmd.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            cmd.args(["--appendonly", "no"]);
        }
        let status = cmd.status().unwrap_or_else(|e| {
            panic!("cannot run redis-server ({e}); install it: apt-get install -y redis-server (./scripts/test does)")
        });
        assert!(status.success(), "redis-server failed to start: {status}");
        wait_until("redis-server", Duration::from_secs(10), || {
            port_open(self.port) && pidfile.exists()
        });
        let pid = std::fs::read_to_string(&pidfile).expect("redis pid file");
        self.pid = pid.trim().parse().expect("a pid in the pid file");
        reap_on_exit(self.pid);
    }

    /// The URL to connect to.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Stops the server (SIGKILL: nothing is flushed that was not already durable).
    pub fn kill(&mut self) {
        signal(self.pid, "-9");
        wait_until("redis-server to stop", Duration::from_secs(10), || {
            !alive(self.pid) && !port_open(self.port)
        });
    }

    /// Starts it again on the same port (and data directory).
    pub fn restart(&mut self) {
        self.launch();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        signal(self.pid, "-9");
    }
}

/// Where `./scripts/test` installs moto: `.venv-s3` at the workspace root.
fn moto_binary() -> PathBuf {
    let mut dir = Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf();
    loop {
        let candidate = dir.join(".venv-s3/bin/moto_server");
        if candidate.exists() {
            return candidate;
        }
        assert!(
            dir.pop(),
            "moto_server not found in .venv-s3; install it: python3 -m venv .venv-s3 && .venv-s3/bin/pip install 'moto[server]==5.2.5' (./scripts/test does)"
        );
    }
}

/// moto's S3-compatible server on a loopback port (data in memory).
pub struct S3 {
    /// Its port.
    pub port: u16,
    child: std::process::Child,
}

impl S3 {
    /// Starts the server.
    pub fn start() -> S3 {
        let port = free_port();
        let child = Command::new(moto_binary())
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        reap_on_exit(child.id());
        wait_until("moto_server", Duration::from_secs(30), || port_open(port));
        S3 { port, child }
    }

    /// The endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Freezes the server (SIGSTOP): connections hang and time out, as in a network
    /// partition. moto keeps its data only in memory, so a real restart would lose the
    /// bucket; a frozen server comes back with everything.
    pub fn freeze(&self) {
        signal(self.child.id(), "-STOP");
    }

    /// Thaws a frozen server (SIGCONT).
    pub fn thaw(&self) {
        signal(self.child.id(), "-CONT");
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
