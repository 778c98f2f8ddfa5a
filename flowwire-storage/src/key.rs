//! The name of an instance: its flow and its id. Low in the crate: the codec binds it into
//! checksums, the records and stores are keyed by it.

use std::fmt::Write as _;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Identifies an instance: its flow's name and its id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstanceKey {
    /// The flow's name (its type name unless renamed).
    pub flow: Arc<str>,
    /// The instance id given at start.
    pub id: Arc<str>,
}

impl InstanceKey {
    /// Builds a key.
    pub fn new(flow: impl Into<Arc<str>>, id: impl Into<Arc<str>>) -> Self {
        Self {
            flow: flow.into(),
            id: id.into(),
        }
    }

    /// Writes `flow/id` (escaped, or the id hashed) to `key`: the part every key of the
    /// instance's payloads starts with.
    pub(crate) fn write_prefix(&self, key: &mut String) {
        escape_into(key, &self.flow);
        key.push('/');
        let mark = key.len();
        escape_into(key, &self.id);
        if key.len() - mark > SPELLED_ID || key.len() == mark {
            key.truncate(mark);
            let hash = blake3::hash(self.id.as_bytes());
            key.push('~');
            for b in &hash.as_bytes()[..16] {
                let _ = write!(key, "{b:02x}");
            }
            let _ = write!(key, "-{}", self.id.len());
        }
    }
}

impl std::fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.flow, self.id)
    }
}

/// Percent-escapes `s` into `out`, so that the result names one path segment: every byte
/// but `[A-Za-z0-9._-]` is escaped, and so is a leading `.` (no segment is `.` or `..`).
fn escape_into(out: &mut String, s: &str) {
    for (i, b) in s.bytes().enumerate() {
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-') || (b == b'.' && i > 0) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

/// The longest escaped id spelled out in a key; longer (and empty) ids are hashed.
const SPELLED_ID: usize = 120;
