//! A child process that runs one test of the current test binary and prints `ack N` for
//! each write it had acknowledged, to be killed (SIGKILL) at a chosen point: the kill
//! tests' driver.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Lines};
use std::process::{Child, ChildStdout, Command, Stdio};

/// A running child and its output, read as far as the parent has asked.
pub struct Acking {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    /// How many writes the child has acknowledged, as far as its output was read.
    pub acked: u64,
}

impl Acking {
    /// Runs the test `test` of this binary alone, with `env` set.
    pub fn spawn(test: &str, env: &[(&str, &OsStr)]) -> Self {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = command.spawn().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Acking {
            child,
            lines,
            acked: 0,
        }
    }

    /// Reads the child's output until it has acknowledged `n` writes, or its output ends;
    /// returns how many it acknowledged.
    pub fn until_acked(&mut self, n: u64) -> u64 {
        while self.acked < n {
            let Some(Ok(line)) = self.lines.next() else {
                break;
            };
            self.count(&line);
        }
        self.acked
    }

    /// Kills the child, counts the acknowledgements it printed before the kill landed, and
    /// waits for it to end; returns how many writes it acknowledged in all.
    pub fn kill(mut self) -> u64 {
        self.child.kill().unwrap();
        while let Some(Ok(line)) = self.lines.next() {
            self.count(&line);
        }
        self.child.wait().unwrap();
        self.acked
    }

    fn count(&mut self, line: &str) {
        if let Some(n) = line.strip_prefix("ack ") {
            self.acked = self.acked.max(n.parse::<u64>().unwrap() + 1);
        }
    }
}
