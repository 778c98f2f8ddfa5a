//! Harness processes for the kill tests: read their output, require their success.

#![allow(dead_code)]

use std::io::Read;
use std::process::Child;

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
