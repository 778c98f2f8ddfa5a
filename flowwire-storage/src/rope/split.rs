//! Splitting a rope into content-defined chunks: each blob by the chunks it keeps, each
//! head piece cut anew.

use std::collections::HashMap;

use bytes::Bytes;

use crate::chunk::{ChunkRef, ChunkSize, Chunked, cdc};

use super::Piece;

/// A rope split: its chunks, and the bytes of each that must be written (each once).
#[derive(Debug, Default)]
pub struct RopeSplit {
    /// The manifest's chunks, in order.
    pub chunks: Vec<ChunkRef>,
    /// The chunks to write, with their bytes.
    pub new: Vec<(Bytes, ChunkRef)>,
}

/// Splits `pieces`, written at step `seq`, into chunks of `size`.
///
/// A chunk whose hash `prev` (the previous manifest of the same role, on the same tier, of
/// the same instance) holds keeps that chunk's key and is not written again. A blob's
/// chunks come from the blob ([`Blob`](super::Blob) cuts and hashes itself once), so an
/// unchanged blob costs a lookup per chunk; head pieces, small, are cut and hashed each time.
pub fn split_rope(
    pieces: &[Piece],
    seq: u64,
    prev: Option<&Chunked>,
    size: &ChunkSize,
) -> RopeSplit {
    let known: HashMap<[u8; 32], ChunkRef> = prev
        .map(|m| m.chunks.iter().map(|c| (c.hash, *c)).collect())
        .unwrap_or_default();
    let mut written: HashMap<[u8; 32], ChunkRef> = HashMap::new();
    let mut out = RopeSplit::default();
    let mut take = |bytes: &Bytes, at: usize, c: ChunkRef, out: &mut RopeSplit| {
        let chunk = match known.get(&c.hash).or_else(|| written.get(&c.hash)) {
            Some(old) => *old,
            None => {
                let c = ChunkRef { seq, ..c };
                written.insert(c.hash, c);
                out.new.push((bytes.slice(at..at + c.len as usize), c));
                c
            }
        };
        out.chunks.push(chunk);
    };
    for piece in pieces {
        match piece {
            Piece::Head(bytes) => {
                let mut at = 0;
                while at < bytes.len() {
                    let len = cdc::cut(&bytes[at..], size);
                    let body = &bytes[at..at + len];
                    let c = ChunkRef {
                        hash: *blake3::hash(body).as_bytes(),
                        seq,
                        len: u32::try_from(len).expect("a chunk is at most 64 MiB"),
                        crc: crc32fast::hash(body),
                    };
                    take(bytes, at, c, &mut out);
                    at += len;
                }
            }
            Piece::Blob(blob) => {
                let cuts = blob.cuts(size);
                let mut at = 0;
                for c in &cuts.chunks {
                    take(blob.bytes(), at, *c, &mut out);
                    at += c.len as usize;
                }
            }
        }
    }
    out
}
