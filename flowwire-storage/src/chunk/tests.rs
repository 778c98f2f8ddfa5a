use bytes::Bytes;

use super::*;

/// The sizes these tests were written for (the local default until 512 KiB).
const S: ChunkSize = ChunkSize::around(128 * 1024);

fn noise(len: usize, seed: u64) -> Vec<u8> {
    crate::fuzz::Rng::new(seed).bytes(len)
}

fn manifest(split: &Split, len: usize) -> Chunked {
    Chunked {
        tier: "t".into(),
        role: 's',
        len: len as u64,
        chunks: split.chunks.clone().into(),
        inline: std::sync::Arc::default(),
    }
}

fn shape(s: &Split) -> Vec<([u8; 32], u32)> {
    s.chunks.iter().map(|c| (c.hash, c.len)).collect()
}

#[test]
fn a_split_against_the_previous_bytes_equals_a_split_from_scratch() {
    let base = noise(3 << 19, 5);
    let first = split(&base, 1, None, &S);
    assert_eq!(first.new.len(), first.distinct_len());
    let prev = manifest(&first, base.len());
    let old = Bytes::from(base.clone());
    let mut rng = crate::fuzz::Rng::new(99);
    let mut next = || rng.bits();
    let mut written = 0;
    for case in 0..32 {
        let mut edited = base.clone();
        let at = (next() as usize) % base.len();
        let n = 1 + (next() as usize) % 3000;
        let (range, insert) = match case % 4 {
            0 => (at..at, noise(n, next())),
            1 => (at..(at + n).min(base.len()), Vec::new()),
            2 => (at..(at + n).min(base.len()), noise(n, next())),
            _ => {
                // An edit at either end.
                let end = if case % 8 == 3 { 0 } else { base.len() };
                (end..end, noise(n, next()))
            }
        };
        edited.splice(range, insert);
        let incremental = split(&edited, 2, Some((&prev, Some(&old))), &S);
        let scratch = split(&edited, 2, None, &S);
        assert_eq!(shape(&incremental), shape(&scratch), "case {case}");
        let total: usize = incremental.chunks.iter().map(|c| c.len as usize).sum();
        assert_eq!(total, edited.len());
        // Content-defined cuts resynchronize within a chunk or two after an edit, now and
        // then a few more (cuts are not looked for within the minimum size of a chunk).
        assert!(
            incremental.new.len() <= 8,
            "case {case}: an edit of {n} B wrote {} chunks",
            incremental.new.len()
        );
        written += incremental.new.len();
        for (range, c) in &incremental.new {
            assert_eq!(*blake3::hash(&edited[range.clone()]).as_bytes(), c.hash);
            assert_eq!(c.seq, 2, "a new chunk carries the step that wrote it");
        }
        let reused = incremental.chunks.iter().filter(|c| c.seq == 1).count();
        assert!(reused + 8 >= incremental.chunks.len(), "case {case}");
    }
    assert!(written <= 3 * 32, "32 edits wrote {written} chunks");
}

#[test]
fn without_the_previous_bytes_chunks_are_shared_by_hash() {
    let base = noise(2 << 20, 8);
    let first = split(&base, 1, None, &S);
    let prev = manifest(&first, base.len());
    let mut edited = base.clone();
    edited[1_000_000] ^= 0xff;
    let again = split(&edited, 4, Some((&prev, None)), &S);
    assert!((1..=2).contains(&again.new.len()), "{}", again.new.len());
    assert_eq!(shape(&again), shape(&split(&edited, 4, None, &S)));
}

#[test]
fn repeated_content_is_written_once() {
    let data = vec![7u8; 4 << 20];
    let s = split(&data, 3, None, &S);
    assert_eq!(s.chunks.len(), 8);
    assert_eq!(s.new.len(), 1, "eight equal chunks, one write");
}

#[test]
fn chunk_keys_name_step_role_and_content() {
    let k = InstanceKey::new("Order", "o-1");
    let key = chunk_key(&k, 12, 's', &[0xab; 32]);
    assert_eq!(key, format!("Order/o-1/12.sk-{}", "ab".repeat(16)));
    crate::tier::check_key(&key).unwrap();
    let long = InstanceKey::new("Order", "x".repeat(500));
    crate::tier::check_key(&chunk_key(&long, u64::MAX, 'c', &[0; 32])).unwrap();
}

#[test]
fn dropped_chunks_are_those_the_next_manifest_does_not_share() {
    let k = InstanceKey::new("F", "a");
    let base = noise(1 << 20, 3);
    let first = split(&base, 1, None, &S);
    let prev = manifest(&first, base.len());
    let mut edited = base.clone();
    edited[500_000] ^= 1;
    let next = manifest(
        &split(&edited, 2, Some((&prev, Some(&Bytes::from(base)))), &S),
        edited.len(),
    );
    let dropped: Vec<&ChunkRef> = prev.dropped_by(Some(&next)).collect();
    assert_eq!(dropped.len(), 1);
    assert!(prev.key_of(&k, dropped[0]).starts_with("F/a/1.sk-"));
    assert_eq!(prev.dropped_by(None).count(), prev.distinct().count());
}

impl Split {
    fn distinct_len(&self) -> usize {
        let set: std::collections::HashSet<_> = self.chunks.iter().map(|c| c.hash).collect();
        set.len()
    }
}
