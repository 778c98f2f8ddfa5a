//! Splitting a rope into content-defined chunks: each blob by the chunks it keeps, each
//! head piece cut anew.

use std::collections::HashMap;

use bytes::Bytes;

use crate::chunk::{ChunkRef, ChunkSize, Chunked, INLINE, cdc, stored_chunks};

use super::Piece;

/// A rope split: its chunks, the bytes of each that must be written (each once), and the
/// bytes of the inline ones.
#[derive(Debug, Default)]
pub struct RopeSplit {
    /// The manifest's chunks, in order.
    pub chunks: Vec<ChunkRef>,
    /// The chunks to write, with their bytes.
    pub new: Vec<(Bytes, ChunkRef)>,
    /// The bytes of the inline chunks, in order ([`Chunked::inline`]).
    pub inline: Vec<Bytes>,
}

/// Splits `pieces`, written at step `seq`, into chunks of `size`.
///
/// A chunk whose hash `prev` (the previous manifest of the same role, on the same tier, of
/// the same instance) holds keeps that chunk's place and is not written again; so does one
/// `written` holds (written by this step already, in a pack of its own: see
/// `Placement::cut_and_put`). A blob's
/// chunks come from the blob ([`Blob`](super::Blob) cuts and hashes itself once), so an
/// unchanged blob costs a lookup per chunk. Head pieces, small, are cut and hashed each
/// time; those shorter than `inline_below` go inline (the manifest holds their bytes: no
/// file to write, create and fsync for a few bytes around a blob), while their total stays
/// below `inline_below` too, so a manifest holds no more bytes inline than the record would.
pub fn split_rope<S: std::hash::BuildHasher>(
    pieces: &[Piece],
    seq: u64,
    prev: Option<&Chunked>,
    size: &ChunkSize,
    inline_below: usize,
    written: Option<&HashMap<[u8; 32], ChunkRef, S>>,
) -> RopeSplit {
    let known = stored_chunks(prev);
    let mut fresh: HashMap<[u8; 32], ChunkRef> = HashMap::new();
    let mut out = RopeSplit::default();
    let mut room = inline_below;
    let mut take = |bytes: &Bytes, at: usize, c: ChunkRef, out: &mut RopeSplit| {
        let placed = known
            .get(&c.hash)
            .or_else(|| written.and_then(|w| w.get(&c.hash)))
            .or_else(|| fresh.get(&c.hash));
        let chunk = match placed {
            Some(old) => *old,
            None => {
                let c = ChunkRef { seq, ..c };
                fresh.insert(c.hash, c);
                out.new.push((bytes.slice(at..at + c.len as usize), c));
                c
            }
        };
        out.chunks.push(chunk);
    };
    for piece in pieces {
        match piece {
            Piece::Head(bytes) if !bytes.is_empty() && bytes.len() < room => {
                room -= bytes.len();
                out.chunks.push(ChunkRef {
                    seq: INLINE,
                    ..ChunkRef::of(bytes)
                });
                out.inline.push(bytes.clone());
            }
            Piece::Head(bytes) => {
                let mut at = 0;
                while at < bytes.len() {
                    let len = cdc::cut(&bytes[at..], size);
                    let c = ChunkRef {
                        seq,
                        ..ChunkRef::of(&bytes[at..at + len])
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
