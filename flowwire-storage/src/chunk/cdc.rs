//! Content-defined cut points: where a chunk ends is decided by the bytes around it, not by
//! its offset, so an edit moves only the boundaries next to it.
//!
//! The cut test is `FastCDC`'s (Xia et al., USENIX ATC 2016): a gear hash — shifted left one
//! bit per byte, plus a random 64-bit value for the byte — is tested against a mask of its
//! top bits, so a decision depends on the last 64 bytes and on the distance from the
//! chunk's start. Nothing is tested before the minimum; up to the average a stricter mask
//! (fewer cuts), past it a looser one (normalized chunking: sizes bunch around the average);
//! the maximum forces a cut. Each tier has its [`ChunkSize`].
//!
//! A chunker that starts at a boundary has no memory of what came before it. So chunking a
//! changed buffer again from the last boundary before the change, and stopping at the first
//! cut that falls on an old boundary past it, gives exactly the chunks of chunking it all
//! (`super::split` relies on this; a property test checks it).

/// The sizes chunks are cut to: at least `min` (but the last of a payload), at most `max`,
/// bunched around `avg` (a power of two; `min` = `avg`/4, `max` = 4 × `avg`).
///
/// ```
/// use flowwire::storage::chunk::cdc::ChunkSize;
/// let s = ChunkSize::around(100_000);
/// assert_eq!((s.min(), s.avg(), s.max()), (32 * 1024, 128 * 1024, 512 * 1024));
/// assert_eq!(ChunkSize::around(1), ChunkSize::around(16 * 1024));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSize {
    min: usize,
    avg: usize,
    max: usize,
    small: u64,
    large: u64,
}

impl ChunkSize {
    /// Chunks of 128 KiB to 2 MiB around 512 KiB: local disks, Redis, memory (chosen when
    /// each chunk was a file to create and fsync: 512 KiB wrote 32 MiB at about the cost of
    /// one write and fdatasync of it, where 128 KiB took 3.6 times as long; a step's chunks
    /// are one pack since record format 10, and 1 MiB chunks measured no better).
    pub const LOCAL: ChunkSize = ChunkSize::around(512 * 1024);
    /// Chunks of 1 MiB to 16 MiB around 4 MiB: object stores, where each chunk is a request.
    pub const OBJECT_STORE: ChunkSize = ChunkSize::around(4 * 1024 * 1024);

    /// Sizes around `avg`, rounded to a power of two between 16 KiB and 16 MiB.
    pub const fn around(avg: usize) -> ChunkSize {
        let avg = if avg < 16 * 1024 {
            16 * 1024
        } else if avg > 16 * 1024 * 1024 {
            16 * 1024 * 1024
        } else {
            avg.next_power_of_two()
        };
        let bits = avg.trailing_zeros();
        ChunkSize {
            min: avg / 4,
            avg,
            max: avg * 4,
            // Two more bits than `avg` before it (a cut is 4× less likely), two fewer after.
            small: !0u64 << (64 - (bits + 2)),
            large: !0u64 << (64 - (bits - 2)),
        }
    }

    /// The smallest chunk but the last.
    pub const fn min(&self) -> usize {
        self.min
    }

    /// The size chunks bunch around.
    pub const fn avg(&self) -> usize {
        self.avg
    }

    /// The largest chunk.
    pub const fn max(&self) -> usize {
        self.max
    }
}

/// 256 fixed pseudo-random values (splitmix64 from a fixed seed). Changing them changes
/// every boundary, and with them which stored chunks a new step can share, never what a
/// stored payload reads as.
const GEAR: [u64; 256] = gear();

const fn gear() -> [u64; 256] {
    let mut table = [0u64; 256];
    let mut state: u64 = 0x666c_6f77_7769_7265; // "flowwire"
    let mut i = 0;
    while i < 256 {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        table[i] = z ^ (z >> 31);
        i += 1;
    }
    table
}

/// The length of the chunk that starts at `data[0]`: between `size.min()` and
/// `size.max()`, or all of `data` when it is shorter than the minimum or holds no cut.
pub fn cut(data: &[u8], size: &ChunkSize) -> usize {
    let n = data.len();
    if n <= size.min {
        return n;
    }
    let end = n.min(size.max);
    let normal = end.min(size.avg);
    if let Some(at) = first_cut(data, size.min, size.min, normal, size.small) {
        return at + 1;
    }
    if let Some(at) = first_cut(data, size.min, normal, end, size.large) {
        return at + 1;
    }
    end
}

/// Bytes a lane of [`first_cut`] scans per block.
const STRIDE: usize = 4 * 1024;
/// Lanes scanned side by side.
const LANES: usize = 4;

/// The first position `p` in `from..to` where the gear hash of `data[start..=p]` has no
/// bit of `mask` set.
///
/// The hash shifts one bit per byte, so a byte 64 or more places back has left it: the
/// hash at `p` is that of `data[max(start, p - 63)..=p]`. One hash is a chain of
/// dependent additions, about a byte a cycle; four lanes, each over its own stretch of a
/// block and starting 63 bytes early, keep four chains in flight. A block in which any
/// lane sees a cut is scanned again byte by byte for the first one (once a chunk).
fn first_cut(data: &[u8], start: usize, from: usize, to: usize, mask: u64) -> Option<usize> {
    let mut at = from;
    while to - at >= LANES * STRIDE {
        let mut hashes = [0u64; LANES];
        let mut lanes: [&[u8; STRIDE]; LANES] = [&[0; STRIDE]; LANES];
        for l in 0..LANES {
            let q = at + l * STRIDE;
            hashes[l] = hash_before(data, start, q);
            lanes[l] = data[q..q + STRIDE]
                .try_into()
                .expect("a lane is STRIDE bytes");
        }
        let mut hit = false;
        for i in 0..STRIDE {
            let mut any = false;
            for l in 0..LANES {
                hashes[l] = (hashes[l] << 1).wrapping_add(GEAR[usize::from(lanes[l][i])]);
                any |= hashes[l] & mask == 0;
            }
            if any {
                hit = true;
                break;
            }
        }
        if hit {
            return scan(data, start, at, at + LANES * STRIDE, mask);
        }
        at += LANES * STRIDE;
    }
    scan(data, start, at, to, mask)
}

/// [`first_cut`] over `from..to`, one byte after another.
fn scan(data: &[u8], start: usize, from: usize, to: usize, mask: u64) -> Option<usize> {
    let mut hash = hash_before(data, start, from);
    for (i, &b) in data[from..to].iter().enumerate() {
        hash = (hash << 1).wrapping_add(GEAR[usize::from(b)]);
        if hash & mask == 0 {
            return Some(from + i);
        }
    }
    None
}

/// The gear hash of the bytes from `start` up to `at` (not included), from the last 63
/// of them: those before have left it.
fn hash_before(data: &[u8], start: usize, at: usize) -> u64 {
    data[at.saturating_sub(63).max(start)..at]
        .iter()
        .fold(0u64, |h, &b| (h << 1).wrapping_add(GEAR[usize::from(b)]))
}

/// The chunk lengths of `data`, chunked from its start.
pub fn lengths(data: &[u8], size: &ChunkSize) -> Vec<usize> {
    let mut out = Vec::with_capacity(data.len() / size.avg + 1);
    let mut at = 0;
    while at < data.len() {
        let len = cut(&data[at..], size);
        out.push(len);
        at += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sizes these tests were written for (the local default until 512 KiB).
    const S: ChunkSize = ChunkSize::around(128 * 1024);
    const MIN: usize = S.min();
    const AVG: usize = S.avg();
    const MAX: usize = S.max();

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        crate::fuzz::Rng::new(seed).bytes(len)
    }

    #[test]
    fn chunks_stay_within_their_bounds_and_cover_the_data() {
        let data = noise(4 << 20, 7);
        let lens = lengths(&data, &S);
        assert_eq!(lens.iter().sum::<usize>(), data.len());
        let (last, rest) = lens.split_last().unwrap();
        assert!(rest.iter().all(|&l| (MIN..=MAX).contains(&l)), "{rest:?}");
        assert!(*last <= MAX);
        let mean = data.len() / lens.len();
        assert!(
            (AVG / 2..=AVG * 2).contains(&mean),
            "mean chunk {mean} B is not near {AVG} B"
        );
    }

    #[test]
    fn an_insertion_moves_only_the_boundaries_next_to_it() {
        let data = noise(4 << 20, 11);
        let mut edited = data.clone();
        edited.splice(2_000_000..2_000_000, *b"inserted!");
        let ends = |d: &[u8]| {
            let mut at = 0;
            lengths(d, &S)
                .into_iter()
                .map(|l| {
                    at += l;
                    at
                })
                .collect::<Vec<_>>()
        };
        let (a, b) = (ends(&data), ends(&edited));
        let before: Vec<_> = a.iter().filter(|&&e| e < 2_000_000).collect();
        assert!(
            before.iter().all(|e| b.contains(e)),
            "boundaries before the edit stay"
        );
        let after: std::collections::HashSet<usize> = a
            .iter()
            .filter(|&&e| e > 2_000_000 + MAX)
            .map(|e| e + 9)
            .collect();
        let moved: std::collections::HashSet<usize> = b.iter().copied().collect();
        assert!(
            after.is_subset(&moved),
            "boundaries after the edit shift by its length"
        );
    }

    /// The cut as first written: one hash from the minimum on, byte by byte.
    fn reference_cut(data: &[u8], size: &ChunkSize) -> usize {
        let n = data.len();
        if n <= size.min {
            return n;
        }
        let end = n.min(size.max);
        let normal = end.min(size.avg);
        let mut hash = 0u64;
        for (i, &b) in data[size.min..normal].iter().enumerate() {
            hash = (hash << 1).wrapping_add(GEAR[usize::from(b)]);
            if hash & size.small == 0 {
                return size.min + i + 1;
            }
        }
        for (i, &b) in data[normal..end].iter().enumerate() {
            hash = (hash << 1).wrapping_add(GEAR[usize::from(b)]);
            if hash & size.large == 0 {
                return normal + i + 1;
            }
        }
        end
    }

    #[test]
    fn the_lanes_cut_exactly_where_one_hash_does() {
        // Every chunk of noise, of noise with runs of one byte (no cut for a while, then
        // a cut just past the run), and of every length around the sizes' bounds and the
        // lanes' blocks, at three chunk sizes.
        for (k, size) in [S, ChunkSize::LOCAL, ChunkSize::around(64 * 1024)]
            .iter()
            .enumerate()
        {
            for seed in 0..6u64 {
                let mut data = noise(3 * size.max() + 12_345, seed * 10 + k as u64);
                if seed % 2 == 1 {
                    let from = size.min() + (seed as usize * 7_919) % size.avg();
                    data[from..from + 3 * STRIDE].fill(9);
                }
                let mut at = 0;
                while at < data.len() {
                    let want = reference_cut(&data[at..], size);
                    assert_eq!(
                        cut(&data[at..], size),
                        want,
                        "size {size:?} seed {seed} at {at}"
                    );
                    at += want;
                }
                for len in [
                    size.min() + 1,
                    size.min() + LANES * STRIDE - 1,
                    size.min() + LANES * STRIDE + 63,
                    size.avg(),
                    size.avg() + 1,
                    size.max() - 1,
                    size.max(),
                    size.max() + 1,
                ] {
                    let d = &data[..len.min(data.len())];
                    assert_eq!(cut(d, size), reference_cut(d, size), "len {len}");
                }
            }
        }
    }

    #[test]
    fn constant_data_is_cut_at_the_largest_size() {
        assert_eq!(lengths(&vec![0u8; 3 * MAX + 5], &S), [MAX, MAX, MAX, 5]);
        assert_eq!(lengths(&[], &S), Vec::<usize>::new());
        assert_eq!(lengths(&[1; 10], &S), [10]);
    }
}
