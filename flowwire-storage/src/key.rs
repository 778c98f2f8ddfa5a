//! The name of an instance: its flow and its id. Low in the crate: the codec binds it into
//! checksums, the records and stores are keyed by it.

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
}

impl std::fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.flow, self.id)
    }
}
