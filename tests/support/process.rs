//! Harness processes for the kill tests: read their output, require their success.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, Command, Stdio};

/// Reads a harness's output to its end, then requires a successful exit.
pub fn run_to_end(mut child: Child) -> String {
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("the harness's stdout is piped")
        .read_to_string(&mut out)
        .expect("the harness's output reads");
    let status = child.wait().expect("the harness is waited for");
    assert!(status.success(), "the harness failed: {status}\n{out}");
    out
}

/// Starts `kill_harness` with `args`, its output piped.
pub fn kill_harness(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_kill_harness"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the harness starts")
}

/// Waits for the harness to print `line` (it prints it once its engine runs).
pub fn await_line(child: &mut Child, line: &str) -> BufReader<ChildStdout> {
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut got = String::new();
    loop {
        got.clear();
        let n = out.read_line(&mut got).unwrap();
        assert!(n > 0, "the harness ended before printing {line}");
        if got.trim() == line {
            return out;
        }
    }
}

/// SIGKILLs the harness and reaps it.
pub fn kill(mut child: Child) {
    child.kill().expect("SIGKILL");
    child.wait().unwrap();
}

/// Starts `kill_harness` with `args` once for each pause, SIGKILLs it that long after it
/// prints READY, then runs it once more to its end and returns that run's output.
pub fn kill_at_each(
    args: &[&str],
    pauses: impl IntoIterator<Item = std::time::Duration>,
) -> String {
    for pause in pauses {
        let mut child = kill_harness(args);
        let _out = await_line(&mut child, "READY");
        std::thread::sleep(pause);
        kill(child);
    }
    run_to_end(kill_harness(args))
}
