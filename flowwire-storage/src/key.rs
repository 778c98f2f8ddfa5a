//! The name of an instance: its flow and its id. Low in the crate: the codec binds it into
//! checksums, the records and stores are keyed by it.

use std::fmt::Write as _;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Identifies an instance: its flow's name and its id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstanceKey {
    /// The flow's name (its type name unless renamed).
    pub flow: FlowName,
    /// The instance id given at start.
    pub id: Arc<str>,
}

/// A flow's name, as an [`InstanceKey`] holds it: a name fixed at compile time (a flow
/// type's `NAME`), which is copied for free, or one made at run time (read from a store,
/// given as a string), which is shared behind a reference count.
///
/// Why: every step clones its instance's key twice (into the step and into the store's
/// write) and drops both, and each clone of a shared name is an atomic count update on
/// one counter all of a flow's instances share. It reads, compares, hashes, orders and
/// serializes as the `str` it is, whichever way it is held.
///
/// ```
/// use flowwire::storage::record::{FlowName, InstanceKey};
/// const ORDER: FlowName = FlowName::from_static("Order");
/// let key = InstanceKey::new(ORDER, "order-1");
/// assert_eq!(key, InstanceKey::new("Order", "order-1")); // held apart, equal as names
/// assert_eq!(&*key.flow, "Order");
/// ```
#[derive(Clone)]
pub struct FlowName(Name);

#[derive(Clone)]
enum Name {
    Static(&'static str),
    Shared(Arc<str>),
}

impl FlowName {
    /// A name fixed at compile time.
    #[must_use]
    pub const fn from_static(name: &'static str) -> Self {
        Self(Name::Static(name))
    }

    /// The name.
    #[must_use]
    pub fn as_str(&self) -> &str {
        match &self.0 {
            Name::Static(s) => s,
            Name::Shared(s) => s,
        }
    }
}

impl std::ops::Deref for FlowName {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl AsRef<str> for FlowName {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for FlowName {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for FlowName {
    fn eq(&self, other: &Self) -> bool {
        // The keys of one flow's steps hold the same name: a pointer's comparison.
        let (a, b) = (self.as_str(), other.as_str());
        std::ptr::eq(a, b) || a == b
    }
}

impl Eq for FlowName {}

impl PartialEq<str> for FlowName {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for FlowName {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialOrd for FlowName {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for FlowName {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl std::hash::Hash for FlowName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As the `str` it borrows as.
        self.as_str().hash(state);
    }
}

impl std::fmt::Debug for FlowName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for FlowName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for FlowName {
    fn from(name: &str) -> Self {
        Self(Name::Shared(name.into()))
    }
}

impl From<String> for FlowName {
    fn from(name: String) -> Self {
        Self(Name::Shared(name.into()))
    }
}

impl From<&String> for FlowName {
    fn from(name: &String) -> Self {
        Self(Name::Shared(name.as_str().into()))
    }
}

impl From<Arc<str>> for FlowName {
    fn from(name: Arc<str>) -> Self {
        Self(Name::Shared(name))
    }
}

impl From<&Arc<str>> for FlowName {
    fn from(name: &Arc<str>) -> Self {
        Self(Name::Shared(name.clone()))
    }
}

impl From<FlowName> for Arc<str> {
    fn from(name: FlowName) -> Self {
        match name.0 {
            Name::Static(s) => s.into(),
            Name::Shared(s) => s,
        }
    }
}

impl Serialize for FlowName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for FlowName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Arc::<str>::deserialize(d).map(|s| Self(Name::Shared(s)))
    }
}

impl InstanceKey {
    /// Builds a key.
    pub fn new(flow: impl Into<FlowName>, id: impl Into<Arc<str>>) -> Self {
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

#[cfg(test)]
mod tests {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    use std::sync::Arc;

    use super::{FlowName, InstanceKey};

    #[test]
    fn a_flow_name_fixed_at_compile_time_is_the_same_name_as_one_made_at_run_time() {
        let fixed = InstanceKey::new(FlowName::from_static("Order"), "order-1");
        let made = InstanceKey::new(String::from("Order"), "order-1");
        assert_eq!(fixed, made);
        assert_eq!(fixed.cmp(&made), std::cmp::Ordering::Equal);
        assert!(
            fixed < InstanceKey::new("Ordes", "a"),
            "ordered as the strings are"
        );
        let hasher = BuildHasherDefault::<DefaultHasher>::default();
        assert_eq!(hasher.hash_one(&fixed), hasher.hash_one(&made));
        assert_eq!(hasher.hash_one(&fixed.flow), hasher.hash_one("Order"));
        assert_eq!(
            (fixed.to_string(), format!("{:?}", fixed.flow)),
            ("Order/order-1".to_owned(), "\"Order\"".to_owned())
        );
    }

    #[test]
    fn a_key_is_written_as_two_strings_whichever_way_its_flow_name_is_held() {
        let fixed = InstanceKey::new(FlowName::from_static("Order"), "order-1");
        let bytes = postcard::to_allocvec(&fixed).unwrap();
        let strings: (Arc<str>, Arc<str>) = ("Order".into(), "order-1".into());
        assert_eq!(bytes, postcard::to_allocvec(&strings).unwrap());
        let back: InstanceKey = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(back, fixed);
        assert_eq!(Arc::<str>::from(back.flow), Arc::<str>::from("Order"));
    }
}
