//! Real servers for tests: `redis-server` (alone, or three of them as a Redis Cluster) and
//! moto's S3 server, each on a free loopback port, started by the test binary that needs
//! them and stopped by PID.
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

fn wait_until(what: &str, limit: Duration, ready: impl FnMut() -> bool) {
    assert!(
        poll(limit, ready),
        "{what} did not become ready within {limit:?}"
    );
}

/// Whether `ready` held within `limit`, asked every 50 ms.
#[allow(clippy::disallowed_methods)] // tests wait on wall-clock time for a server to start
fn poll(limit: Duration, mut ready: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !ready() {
        if start.elapsed() >= limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

fn port_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// Kills the process whose pid is in `pidfile` when this process exits, if the file is
/// still there then. Started before the daemon has written its pid: a test killed while
/// its server starts leaves none behind.
fn reap_pidfile_on_exit(pidfile: &Path) {
    on_exit(&format!(
        "pid=$(cat '{}' 2>/dev/null) && kill -9 \"$pid\" 2>/dev/null",
        pidfile.display()
    ));
}

/// Kills `pid` when this process exits.
fn reap_on_exit(pid: u32) {
    on_exit(&format!("kill -9 {pid} 2>/dev/null"));
}

/// Runs the shell command `then` once this process has exited (a detached shell that polls
/// for our PID).
fn on_exit(then: &str) {
    let script = format!(
        "while kill -0 {me} 2>/dev/null; do sleep 0.5; done; {then}",
        me = std::process::id()
    );
    let _ = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

/// Sends a signal (`"-STOP"`, `"-CONT"`, `"-9"`…) to a process.
pub fn signal(pid: u32, sig: &str) {
    // A server that never started has no pid: `kill 0` would signal our own process group.
    if pid == 0 {
        return;
    }
    let _ = Command::new("kill")
        .args([sig, &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

fn alive(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A `MONITOR` of a server ([`Redis::monitor`]).
pub struct Monitor {
    child: std::process::Child,
    path: PathBuf,
    port: u16,
}

impl Monitor {
    /// Stops watching; the commands seen, one a line (`… [0 lua] "HSET" …` for a
    /// script's, `… [0 127.0.0.1:port] "GET" …` for a client's): every command the server
    /// ran before this call (a marker sent last must reach the file first).
    pub fn stop(mut self) -> String {
        let marker = format!("monitor-end-{}", free_port());
        let _ = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "ECHO", &marker])
            .stdout(Stdio::null())
            .status();
        wait_until("the MONITOR's last line", Duration::from_secs(10), || {
            std::fs::read_to_string(&self.path).is_ok_and(|t| t.contains(&marker))
        });
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.path).unwrap_or_default()
    }
}

/// Why a `redis-server` did not start.
struct LaunchError {
    /// Its port (or its cluster bus port) was taken: it may start on others.
    port_taken: bool,
    /// What went wrong, with the end of its log.
    message: String,
}

/// A `redis-server` on a loopback port.
pub struct Redis {
    /// Its port.
    pub port: u16,
    dir: PathBuf,
    pid: u32,
    /// `appendfsync` of the append-only file, when it is on.
    aof: Option<&'static str>,
    /// The cluster bus port, for a node of a [`RedisCluster`]. Chosen freely and passed
    /// as `--cluster-port`: the default (the port + 10,000) can be taken, and Redis
    /// refuses to start as a node on a port above 55,535 without it, which a quarter of
    /// the ephemeral ports are.
    cluster: Option<u16>,
    /// Run under valgrind's callgrind, which counts the instructions it executes (see
    /// [`Redis::start_counted`]).
    counted: bool,
    _tmp: tempfile::TempDir,
}

impl Redis {
    /// Starts a server without persistence (a fast, throwaway server).
    pub fn start() -> Redis {
        Self::start_as(None, false)
    }

    /// Starts a server with the append-only file on (`appendfsync always`), so a restart
    /// keeps everything acknowledged.
    pub fn start_durable() -> Redis {
        Self::start_as(Some("always"), false)
    }

    /// Starts a server with the append-only file on and `appendfsync` set to `policy`
    /// (`always`: each write is fsynced before its reply; `everysec`: once a second).
    #[allow(dead_code)] // the scale bench's
    pub fn start_with_fsync(policy: &'static str) -> Redis {
        Self::start_as(Some(policy), false)
    }

    /// Starts a durable server (`appendfsync always`) under valgrind's callgrind, which
    /// counts the instructions the server executes: read them with
    /// [`Redis::instructions`] after [`Redis::shutdown`]. Needs valgrind.
    pub fn start_counted() -> Redis {
        Self::start_with(Some("always"), false, true)
    }

    /// Starts a server with cluster mode on (a node of a [`RedisCluster`]).
    fn start_node() -> Redis {
        Self::start_as(None, true)
    }

    fn start_as(aof: Option<&'static str>, cluster: bool) -> Redis {
        Self::start_with(aof, cluster, false)
    }

    fn start_with(aof: Option<&'static str>, cluster: bool, counted: bool) -> Redis {
        // A free port can be taken by another server between `free_port` and the server's
        // bind (the tests start servers in parallel): a server that finds its port taken
        // starts again on other ports, in a fresh directory.
        let mut attempt = 0;
        loop {
            attempt += 1;
            let tmp = tempfile::tempdir().expect("temp dir");
            let dir = tmp.path().to_path_buf();
            let mut r = Redis {
                port: free_port(),
                dir,
                pid: 0,
                aof,
                cluster: cluster.then(free_port),
                counted,
                _tmp: tmp,
            };
            match r.try_launch() {
                Ok(()) => return r,
                Err(e) if e.port_taken && attempt < 5 => {}
                Err(e) => panic!("{}", e.message),
            }
        }
    }

    /// Starts the server on its port; panics if it does not start.
    fn launch(&mut self) {
        if let Err(e) = self.try_launch() {
            panic!("{}", e.message);
        }
    }

    fn try_launch(&mut self) -> Result<(), LaunchError> {
        let pidfile = self.dir.join("redis.pid");
        let _ = std::fs::remove_file(&pidfile);
        let mut cmd = if self.counted {
            // The daemon is the process forked after start-up: its counts go to
            // `cg.<its pid>`.
            let mut c = Command::new("valgrind");
            c.args(["-q", "--tool=callgrind"])
                .arg(format!(
                    "--callgrind-out-file={}",
                    self.dir.join("cg.%p").display()
                ))
                .arg("redis-server");
            c
        } else {
            Command::new("redis-server")
        };
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--dir", self.dir.to_str().expect("utf-8 temp dir")])
            .args(["--daemonize", "yes", "--pidfile"])
            .arg(&pidfile)
            .args(["--logfile", "redis.log"]);
        if let Some(bus) = self.cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"])
                .args(["--cluster-port", &bus.to_string()])
                .args(["--cluster-config-file", "nodes.conf"]);
        }
        match self.aof {
            Some(policy) => {
                cmd.args(["--appendonly", "yes", "--appendfsync", policy]);
            }
            None => {
                cmd.args(["--appendonly", "no"]);
            }
        }
        let status = cmd.status().unwrap_or_else(|e| {
            panic!("cannot run redis-server ({e}); install it: apt-get install -y redis-server (./scripts/test does)")
        });
        assert!(status.success(), "redis-server failed to start: {status}");
        reap_pidfile_on_exit(&pidfile);
        // The pid file can exist before the server has written its pid into it.
        let read_pid = || {
            std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok())
        };
        let limit = Duration::from_secs(if self.counted { 60 } else { 10 });
        let log = || std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        // Taken by another process: the server logs it and exits (the port may well be
        // open: the other process listens on it).
        let taken = |log: &str| {
            log.contains("Address already in use") || log.contains("port number too high")
        };
        let mut port_taken = false;
        let ready = poll(limit, || {
            port_taken = taken(&log());
            port_taken || (port_open(self.port) && read_pid().is_some())
        });
        if !ready || port_taken {
            let log = log();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            return Err(LaunchError {
                port_taken,
                message: format!(
                    "redis-server on port {} did not become ready within {limit:?}; the end of its log, last line first: {tail:#?}",
                    self.port
                ),
            });
        }
        self.pid = read_pid().expect("a pid in the pid file");
        Ok(())
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

    /// Stops the server the way an operator does (`SHUTDOWN NOSAVE`), and waits for it.
    pub fn shutdown(&mut self) {
        let _ = Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "SHUTDOWN", "NOSAVE"])
            .output();
        wait_until("redis-server to shut down", Duration::from_mins(1), || {
            !alive(self.pid)
        });
    }

    /// The instructions a server started by [`Redis::start_counted`] executed, once it
    /// was [`shut down`](Redis::shutdown); `None` before, or if callgrind wrote no count.
    /// With `FLOWWIRE_KEEP_CALLGRIND=<path>` set, the profile is also copied to
    /// `<path>.<pid>` (for `callgrind_annotate`).
    pub fn instructions(&self) -> Option<u64> {
        let file = self.dir.join(format!("cg.{}", self.pid));
        let counts = std::fs::read_to_string(&file).ok()?;
        // Kept for `callgrind_annotate` when asked: the directory goes with the server.
        if let Some(keep) = std::env::var_os("FLOWWIRE_KEEP_CALLGRIND") {
            let mut to = std::path::PathBuf::from(keep);
            to.as_mut_os_string().push(format!(".{}", self.pid));
            let _ = std::fs::copy(&file, to);
        }
        counts
            .lines()
            .find_map(|l| l.strip_prefix("summary: "))
            .and_then(|n| n.trim().parse().ok())
    }

    /// Starts it again on the same port (and data directory).
    pub fn restart(&mut self) {
        self.launch();
    }

    /// Freezes the server (SIGSTOP): every client's requests hang until [`Redis::resume`].
    pub fn pause(&self) {
        signal(self.pid, "-STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        signal(self.pid, "-CONT");
    }

    /// Watches every command the server runs from now on (`MONITOR`, into a file) until
    /// [`Monitor::stop`].
    pub fn monitor(&self) -> Monitor {
        let path = self.dir.join(format!("monitor-{}", free_port()));
        let out = std::fs::File::create(&path).expect("the monitor's file");
        // Line-buffered, so that each command is in the file as soon as it is printed.
        let child = Command::new("stdbuf")
            .args(["-oL", "redis-cli", "-p", &self.port.to_string(), "monitor"])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-cli runs (it comes with redis-server)");
        // It answers `OK` once it watches.
        wait_until("MONITOR", Duration::from_secs(10), || {
            std::fs::read_to_string(&path).is_ok_and(|t| t.starts_with("OK"))
        });
        Monitor {
            child,
            path,
            port: self.port,
        }
    }

    /// Runs a command with `redis-cli` against this server; panics if it fails.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        assert!(out.status.success(), "redis-cli {args:?} on {}", self.port);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        signal(self.pid, "-9");
    }
}

/// A Redis Cluster of three masters (no replicas) on loopback ports, each node a
/// `redis-server` without persistence, the slots spread by `redis-cli --cluster create`.
pub struct RedisCluster {
    nodes: Vec<Redis>,
}

impl RedisCluster {
    /// Starts the three nodes and forms the cluster; returns once every node reports
    /// `cluster_state:ok`.
    pub fn start() -> RedisCluster {
        let nodes: Vec<Redis> = (0..3).map(|_| Redis::start_node()).collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-cli ({e}); install it: apt-get install -y redis-server (./scripts/test does)")
            });
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for n in &nodes {
            let port = n.port.to_string();
            wait_until("the Redis Cluster", Duration::from_secs(30), || {
                Command::new("redis-cli")
                    .args(["-p", &port, "cluster", "info"])
                    .output()
                    .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
            });
        }
        RedisCluster { nodes }
    }

    /// The URLs of its nodes.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Redis::url).collect()
    }

    /// Empties every node's script cache, as a restart without persistence does.
    pub fn flush_scripts(&self) {
        for n in &self.nodes {
            n.cli(&["script", "flush"]);
        }
    }
}

/// Whether an S3 server answers on `port`: its bucket list, to an anonymous `GET /`.
fn speaks_s3(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let mut reply = String::new();
    conn.write_all(b"GET / HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_ok()
        && conn.read_to_string(&mut reply).is_ok()
        && reply.contains("ListAllMyBucketsResult")
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
    /// Starts the server. A port taken between `free_port` and moto's bind makes moto
    /// exit (while the port answers, for whoever took it): it then starts on another.
    pub fn start() -> S3 {
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(moto_binary())
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start moto_server");
            reap_on_exit(child.id());
            let mut exited = false;
            // Ready once it answers as S3 does: another process may hold the port.
            let ready = poll(Duration::from_secs(30), || {
                exited = child.try_wait().is_ok_and(|s| s.is_some());
                exited || speaks_s3(port)
            });
            if ready && !exited {
                return S3 { port, child };
            }
            assert!(exited, "moto_server did not become ready within 30s");
            let _ = child.wait();
        }
        panic!("moto_server exited on start five times (its ports taken?)");
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
