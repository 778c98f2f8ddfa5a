//! Content-defined cut points: where a chunk ends is decided by the bytes around it, not by
//! its offset, so an edit moves only the boundaries next to it.
//!
//! The cut test is `FastCDC`'s (Xia et al., USENIX ATC 2016): a gear hash — shifted left one
//! bit per byte, plus a random 64-bit value for the byte — is tested against a mask of its
//! top bits, so a decision depends on the last 64 bytes and on the distance from the
//! chunk's start. Nothing is tested before `MIN`; up to `AVG` a stricter mask (fewer cuts),
//! past it a looser one (normalized chunking: sizes bunch around `AVG`); `MAX` forces a cut.
//!
//! A chunker that starts at a boundary has no memory of what came before it. So chunking a
//! changed buffer again from the last boundary before the change, and stopping at the first
//! cut that falls on an old boundary past it, gives exactly the chunks of chunking it all
//! (`super::split` relies on this; a property test checks it).

/// The smallest chunk (but the last of a payload).
pub const MIN: usize = 32 * 1024;
/// The size chunks bunch around.
pub const AVG: usize = 128 * 1024;
/// The largest chunk.
pub const MAX: usize = 512 * 1024;

/// log2(AVG).
const AVG_BITS: u32 = AVG.trailing_zeros();
/// Two more bits than AVG before it (a cut is 4× less likely), two fewer after.
const MASK_SMALL: u64 = !0u64 << (64 - (AVG_BITS + 2));
const MASK_LARGE: u64 = !0u64 << (64 - (AVG_BITS - 2));

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

/// The length of the chunk that starts at `data[0]`: between `MIN` and `MAX`, or all of
/// `data` when it is shorter than `MIN` or holds no cut.
pub fn cut(data: &[u8]) -> usize {
    let n = data.len();
    if n <= MIN {
        return n;
    }
    let end = n.min(MAX);
    let normal = end.min(AVG);
    let mut hash = 0u64;
    for (i, &b) in data[MIN..normal].iter().enumerate() {
        hash = (hash << 1).wrapping_add(GEAR[usize::from(b)]);
        if hash & MASK_SMALL == 0 {
            return MIN + i + 1;
        }
    }
    for (i, &b) in data[normal..end].iter().enumerate() {
        hash = (hash << 1).wrapping_add(GEAR[usize::from(b)]);
        if hash & MASK_LARGE == 0 {
            return normal + i + 1;
        }
    }
    end
}

/// The chunk lengths of `data`, chunked from its start.
pub fn lengths(data: &[u8]) -> Vec<usize> {
    let mut out = Vec::with_capacity(data.len() / AVG + 1);
    let mut at = 0;
    while at < data.len() {
        let len = cut(&data[at..]);
        out.push(len);
        at += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s as u8
            })
            .collect()
    }

    #[test]
    fn chunks_stay_within_their_bounds_and_cover_the_data() {
        let data = noise(4 << 20, 7);
        let lens = lengths(&data);
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
            lengths(d)
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

    #[test]
    fn constant_data_is_cut_at_the_largest_size() {
        assert_eq!(lengths(&vec![0u8; 3 * MAX + 5]), [MAX, MAX, MAX, 5]);
        assert_eq!(lengths(&[]), Vec::<usize>::new());
        assert_eq!(lengths(&[1; 10]), [10]);
    }
}
