//! Payloads and blobs: how a value that lives outside the record is referenced and framed.
//!
//! A [`Payload`] is the bytes themselves (inline in the record), a [`BlobRef`] (the tier
//! that holds it, its key there, its length and its CRC-32), or, for a large one, a
//! manifest of content-defined chunks ([`Chunked`], see [`crate::chunk`]) stored in packs.
//! A blob is framed with a small header that repeats the length and checksum and names its
//! own key, so a blob read back is checked three ways — against its header, against the
//! reference in the record, and against its own key — before a single byte reaches user
//! code. A pack has no frame: it is read by ranges, and each chunk in it is checked against
//! the manifest's length, CRC-32 and BLAKE3 hash.
//!
//! ```text
//! "FWB" 1 | body length u64 LE | body crc32 u32 LE | key length u16 LE | key | body
//! ```

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkRef, ChunkRefV8, Chunked};
use crate::record::InstanceKey;

/// Where a payload lives.
///
/// Stored as an enum of four forms: a manifest without inline chunks keeps the form of
/// record format 8 (`Chunked`), one with them has a form of its own (`ChunkedInline`,
/// format 9), so every payload written before reads as it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// In the record itself.
    Inline(Bytes),
    /// In a blob on a tier.
    Blob(BlobRef),
    /// In content-addressed chunks on a tier (in packs, or one blob each before format 10).
    Chunked(Chunked),
}

impl Payload {
    /// The payload's length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Payload::Inline(b) => b.len() as u64,
            Payload::Blob(r) => r.len,
            Payload::Chunked(c) => c.len,
        }
    }

    /// Whether the payload is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The one blob it refers to, if it is neither inline nor chunked.
    pub fn blob(&self) -> Option<&BlobRef> {
        match self {
            Payload::Inline(_) | Payload::Chunked(_) => None,
            Payload::Blob(r) => Some(r),
        }
    }

    /// Its manifest, if it is chunked.
    pub fn chunked(&self) -> Option<&Chunked> {
        match self {
            Payload::Chunked(c) => Some(c),
            _ => None,
        }
    }

    /// The blobs of this payload (of `instance`) that `next` does not refer to, each once:
    /// what a record that replaces `self` by `next` stops referring to.
    pub fn dropped_by(&self, instance: &InstanceKey, next: Option<&Payload>) -> Vec<BlobRef> {
        match self {
            Payload::Inline(_) => Vec::new(),
            Payload::Blob(r) => match next.and_then(Payload::blob) {
                Some(n) if n == r => Vec::new(),
                _ => vec![r.clone()],
            },
            Payload::Chunked(c) => c
                .dropped_by(next.and_then(Payload::chunked))
                .map(|chunk| c.blob_of(instance, chunk))
                .collect(),
        }
    }

    /// Every blob the payload refers to, each once.
    pub fn blobs(&self, instance: &InstanceKey) -> Vec<BlobRef> {
        self.dropped_by(instance, None)
    }

    /// Where the payload lives, for humans: `inline` or the tier's name.
    pub fn place(&self) -> &str {
        match self {
            Payload::Inline(_) => "inline",
            Payload::Blob(r) => &r.tier,
            Payload::Chunked(c) => &c.tier,
        }
    }
}

/// How inline bytes are written, as a [`Payload`] or a [`PayloadRef`]: the enum's name,
/// then the variant's index and name.
pub(crate) const INLINE: (&str, u32, &str) = ("Payload", 0, "Inline");

impl Serialize for Payload {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // As `derive` writes the variants of `PayloadForm`: a manifest without packs in the
        // form of the format that introduced it (byte for byte as that format stored it).
        match self {
            Payload::Inline(b) => s.serialize_newtype_variant(INLINE.0, INLINE.1, INLINE.2, b),
            Payload::Blob(r) => s.serialize_newtype_variant("Payload", 1, "Blob", r),
            Payload::Chunked(c) if c.without_packs() && c.inline.is_empty() => s
                .serialize_newtype_variant(
                    "Payload",
                    2,
                    "Chunked",
                    &ChunkedV8Ref {
                        tier: &c.tier,
                        role: c.role,
                        len: c.len,
                        chunks: OwnChunks(&c.chunks),
                    },
                ),
            Payload::Chunked(c) if c.without_packs() => s.serialize_newtype_variant(
                "Payload",
                3,
                "ChunkedInline",
                &ChunkedV9Ref {
                    tier: &c.tier,
                    role: c.role,
                    len: c.len,
                    chunks: OwnChunks(&c.chunks),
                    inline: &c.inline,
                },
            ),
            Payload::Chunked(c) => s.serialize_newtype_variant("Payload", 4, "Packed", c),
        }
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Payload, D::Error> {
        let own = |chunks: Vec<ChunkRefV8>| -> Arc<[ChunkRef]> {
            chunks.into_iter().map(ChunkRef::from).collect()
        };
        Ok(match PayloadForm::deserialize(d)? {
            PayloadForm::Inline(b) => Payload::Inline(b),
            PayloadForm::Blob(r) => Payload::Blob(r),
            PayloadForm::Chunked(c) => Payload::Chunked(Chunked {
                tier: c.tier,
                role: c.role,
                len: c.len,
                chunks: own(c.chunks),
                inline: Arc::from([]),
            }),
            PayloadForm::ChunkedInline(c) => Payload::Chunked(Chunked {
                tier: c.tier,
                role: c.role,
                len: c.len,
                chunks: own(c.chunks),
                inline: c.inline,
            }),
            PayloadForm::Packed(c) => Payload::Chunked(c),
        })
    }
}

/// How a [`Payload`] is stored.
#[derive(Deserialize)]
enum PayloadForm {
    Inline(Bytes),
    Blob(BlobRef),
    Chunked(ChunkedV8),
    ChunkedInline(ChunkedV9),
    /// Record format 10: chunks may be in packs.
    Packed(Chunked),
}

/// A manifest as record format 8 stores it (no inline chunks, each chunk its own blob).
#[derive(Deserialize)]
struct ChunkedV8 {
    tier: Arc<str>,
    role: char,
    len: u64,
    chunks: Vec<ChunkRefV8>,
}

/// [`ChunkedV8`], to write.
#[derive(Serialize)]
struct ChunkedV8Ref<'a> {
    tier: &'a Arc<str>,
    role: char,
    len: u64,
    chunks: OwnChunks<'a>,
}

/// A manifest as record format 9 stores it (inline chunks, each other chunk its own blob).
#[derive(Deserialize)]
struct ChunkedV9 {
    tier: Arc<str>,
    role: char,
    len: u64,
    chunks: Vec<ChunkRefV8>,
    inline: Arc<[Bytes]>,
}

/// [`ChunkedV9`], to write.
#[derive(Serialize)]
struct ChunkedV9Ref<'a> {
    tier: &'a Arc<str>,
    role: char,
    len: u64,
    chunks: OwnChunks<'a>,
    inline: &'a Arc<[Bytes]>,
}

/// Chunks none of which is in a pack (`Chunked::without_packs`), written as formats 8
/// and 9 write them.
struct OwnChunks<'a>(&'a [ChunkRef]);

impl Serialize for OwnChunks<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.0.iter().map(ChunkRef::v8))
    }
}

/// A reference to a blob: which tier holds it, under which key, and what it must contain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct BlobRef {
    /// The tier's name (stable across restarts; tiers are looked up by name).
    pub tier: Arc<str>,
    /// The blob's key in that tier.
    pub key: Arc<str>,
    /// The body's length in bytes.
    pub len: u64,
    /// The body's CRC-32.
    pub crc: u32,
}

impl Chunked {
    /// The blob reference of `chunk` of this payload of `instance` (to fetch, retire or
    /// delete it).
    ///
    /// A pack's reference names the pack alone (length and CRC 0, the same for every chunk
    /// in it): it serves to retire and delete the pack; its chunks are read by range.
    pub fn blob_of(&self, instance: &InstanceKey, chunk: &ChunkRef) -> BlobRef {
        let (len, crc) = if chunk.in_pack() {
            (0, 0)
        } else {
            (u64::from(chunk.len), chunk.crc)
        };
        BlobRef {
            tier: self.tier.clone(),
            key: self.key_of(instance, chunk).into(),
            len,
            crc,
        }
    }
}

/// The blob header's magic.
pub const BLOB_MAGIC: [u8; 4] = *b"FWB\x01";

/// Bytes before the key in a blob header.
const FIXED: usize = 4 + 8 + 4 + 2;

/// Builds the header of a blob whose body is `body`, stored under `key`.
pub fn header(key: &str, len: u64, crc: u32) -> Bytes {
    let mut h = Vec::with_capacity(FIXED + key.len());
    h.extend_from_slice(&BLOB_MAGIC);
    h.extend_from_slice(&len.to_le_bytes());
    h.extend_from_slice(&crc.to_le_bytes());
    h.extend_from_slice(&(key.len() as u16).to_le_bytes());
    h.extend_from_slice(key.as_bytes());
    Bytes::from(h)
}

/// Why a framed blob was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameFault {
    /// Too short for its header, or for the body its header declares.
    Truncated {
        /// Bytes the header (or reference) declares.
        expected: u64,
        /// Bytes present.
        found: u64,
    },
    /// Not a blob, another blob, or a checksum that does not match.
    Corrupt(String),
}

/// Checks a framed blob against its reference and returns the body (no copy).
pub fn unframe(framed: Bytes, expect: &BlobRef) -> Result<Bytes, FrameFault> {
    let found = framed.len() as u64;
    if framed.len() < FIXED {
        return Err(FrameFault::Truncated {
            expected: FIXED as u64 + expect.key.len() as u64 + expect.len,
            found,
        });
    }
    if framed[..4] != BLOB_MAGIC {
        return Err(FrameFault::Corrupt(format!(
            "not a flowwire blob (magic {:02x?})",
            &framed[..4]
        )));
    }
    let le64 = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let len = le64(&framed[4..12]);
    let crc = u32::from_le_bytes(framed[12..16].try_into().expect("4 bytes"));
    let key_len = u16::from_le_bytes(framed[16..18].try_into().expect("2 bytes")) as usize;
    if len != expect.len || crc != expect.crc {
        return Err(FrameFault::Corrupt(format!(
            "the blob's header (length {len}, crc {crc:08x}) does not match the record's reference (length {}, crc {:08x})",
            expect.len, expect.crc
        )));
    }
    let body_at = FIXED + key_len;
    if framed.len() < body_at {
        return Err(FrameFault::Truncated {
            expected: body_at as u64 + len,
            found,
        });
    }
    if framed[FIXED..body_at] != *expect.key.as_bytes() {
        return Err(FrameFault::Corrupt(format!(
            "the blob holds the body of key {:?}",
            String::from_utf8_lossy(&framed[FIXED..body_at])
        )));
    }
    let total = body_at as u64 + len;
    if found != total {
        return Err(FrameFault::Truncated {
            expected: total,
            found,
        });
    }
    let body = framed.slice(body_at..);
    let computed = crc32fast::hash(&body);
    if computed != crc {
        return Err(FrameFault::Corrupt(format!(
            "checksum mismatch (stored {crc:08x}, computed {computed:08x})"
        )));
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(key: &str, body: &[u8]) -> (Bytes, BlobRef) {
        let crc = crc32fast::hash(body);
        let mut all = header(key, body.len() as u64, crc).to_vec();
        all.extend_from_slice(body);
        let r = BlobRef {
            tier: "t".into(),
            key: key.into(),
            len: body.len() as u64,
            crc,
        };
        (Bytes::from(all), r)
    }

    #[test]
    fn a_framed_blob_opens_to_its_body() {
        let (f, r) = framed("a/1.s", b"hello");
        assert_eq!(&unframe(f, &r).unwrap()[..], b"hello");
    }

    #[test]
    fn every_damage_is_refused() {
        let (f, r) = framed("a/1.s", b"hello");
        let mut flipped = f.to_vec();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(
            unframe(Bytes::from(flipped), &r),
            Err(FrameFault::Corrupt(_))
        ));
        assert!(matches!(
            unframe(f.slice(..f.len() - 1), &r),
            Err(FrameFault::Truncated { .. })
        ));
        assert!(matches!(
            unframe(f.slice(..3), &r),
            Err(FrameFault::Truncated { .. })
        ));
        let other = BlobRef {
            key: "a/2.s".into(),
            ..r.clone()
        };
        assert!(matches!(
            unframe(f.clone(), &other),
            Err(FrameFault::Corrupt(_))
        ));
        let mut longer = f.to_vec();
        longer.push(0);
        assert!(unframe(Bytes::from(longer), &r).is_err());
        assert!(matches!(
            unframe(Bytes::from_static(b"garbage-garbage-garbage"), &r),
            Err(FrameFault::Corrupt(_))
        ));
    }
}
