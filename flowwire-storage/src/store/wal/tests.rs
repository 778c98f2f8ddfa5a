//! The write-ahead log's reading rules, tried on real files: torn, damaged, cut and
//! zeroed logs, other runs' bytes, and fuzzed bytes.

use std::os::unix::fs::FileExt;

use super::format::{HEADER, START, TRAILER};
use super::{OpenError, Run, Wal};
use crate::store::disk::Fs;

fn payloads(entries: &[(u64, Vec<u8>)]) -> Vec<(u64, &[u8])> {
    entries.iter().map(|(s, p)| (*s, &p[..])).collect()
}

fn damage(path: &std::path::Path, run: Run) -> super::LogDamage {
    match Wal::open(&Fs, path, run) {
        Err(OpenError::Damaged(d)) => d,
        Err(OpenError::Io(e)) => panic!("io: {e}"),
        Err(OpenError::RunAhead { first }) => panic!("run ahead: {first}"),
        Ok((_, entries)) => panic!("opened with {} entries", entries.len()),
    }
}

fn poke(path: &std::path::Path, at: u64, bytes: &[u8]) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, at).unwrap();
}

/// Flips the bits of `mask` in the byte at `at` (the byte always changes, whatever it was:
/// salts are random).
fn flip(path: &std::path::Path, at: u64, mask: u8) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    file.read_exact_at(&mut b, at).unwrap();
    file.write_all_at(&[b[0] ^ mask], at).unwrap();
}

/// A log of `n` entries of 100 bytes, numbered from 1.
fn log(n: u64) -> (tempfile::TempDir, std::path::PathBuf, Run) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let run = Run::fresh(1);
    let mut wal = Wal::create(&Fs, &path, run).unwrap();
    for seq in 1..=n {
        wal.append(seq, &[seq as u8; 100]).unwrap();
    }
    (dir, path, run)
}

/// Where entry `i` (from 0) of a [`log`] starts.
fn offset(i: u64) -> u64 {
    START + i * (HEADER + 100 + TRAILER) as u64
}

#[test]
fn entries_appended_are_read_back_in_order_after_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let run = Run::fresh(7);
    let mut wal = Wal::create(&Fs, &path, run).unwrap();
    wal.append(7, b"seven").unwrap();
    wal.append(8, b"").unwrap();
    wal.append(9, &[9u8; 5000]).unwrap();
    drop(wal);
    let (mut wal, entries) = Wal::open(&Fs, &path, run).unwrap();
    assert_eq!(
        payloads(&entries),
        [(7, &b"seven"[..]), (8, &b""[..]), (9, &[9u8; 5000][..])]
    );
    // Appending continues after them.
    wal.append(10, b"ten").unwrap();
    let (_, entries) = Wal::open(&Fs, &path, run).unwrap();
    assert_eq!(entries.len(), 4);
}

#[test]
fn a_torn_last_entry_ends_the_log() {
    let (_dir, path, run) = log(3);
    // Tear the third entry at every byte: a prefix of it, the rest zeros.
    let entry_len = (HEADER + 100 + TRAILER) as u64;
    for keep in 0..entry_len {
        let (_d, path2, run2) = log(3);
        let zeros = vec![0u8; (entry_len - keep) as usize];
        poke(&path2, offset(2) + keep, &zeros);
        // The floor slot of batch 3 says 2: the two acknowledged before it. A tear in
        // the trailer leaves an entry whose checksum holds: it is whole.
        let (_, entries) =
            Wal::open(&Fs, &path2, run2).unwrap_or_else(|_| panic!("torn at {keep}"));
        let whole = keep >= (HEADER + 100) as u64;
        assert_eq!(entries.len(), if whole { 3 } else { 2 }, "torn at {keep}");
    }
    let (_, entries) = Wal::open(&Fs, &path, run).unwrap();
    assert_eq!(entries.len(), 3);
}

#[test]
fn a_damaged_entry_followed_by_valid_ones_is_refused_with_batch_and_offset() {
    let (_dir, path, run) = log(5);
    poke(&path, offset(1) + HEADER as u64 + 3, b"X");
    let d = damage(&path, run);
    assert_eq!((d.batch, d.offset), (2, offset(1)), "{d}");
    assert!(d.detail.contains("fails its checksum"), "{d}");
}

#[test]
fn a_damaged_last_entry_is_refused_not_taken_for_a_torn_one() {
    let (_dir, path, run) = log(3);
    for at in [0, 5, 9, 17, 26, HEADER as u64 + 50] {
        let (_d, path, run) = log(3);
        flip(&path, offset(2) + at, 0xA5);
        let d = damage(&path, run);
        assert_eq!((d.batch, d.offset), (3, offset(2)), "byte {at}: {d}");
    }
    let (_, entries) = Wal::open(&Fs, &path, run).unwrap();
    assert_eq!(entries.len(), 3);
}

#[test]
fn a_zeroed_page_over_acknowledged_entries_is_refused() {
    let (_dir, path, run) = log(100);
    // Zero the page holding entries 40 to 70: later entries show the damage.
    poke(&path, offset(40), &[0u8; 4096]);
    assert_eq!(damage(&path, run).batch, 41);
    // Zero the whole tail: the floor slots show acknowledged batches are missing.
    let (_dir, path, run) = log(100);
    poke(&path, offset(90), &[0u8; 4096]);
    let d = damage(&path, run);
    assert!(d.detail.contains("were acknowledged"), "{d}");
}

#[test]
fn a_cut_file_is_refused() {
    let (_dir, path, run) = log(3);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    for cut in [
        offset(3) + 10,
        offset(3),
        offset(2) + 40,
        offset(1),
        START + 3,
    ] {
        file.set_len(cut).unwrap();
        let d = damage(&path, run);
        assert!(
            d.detail.contains("cut") || d.detail.contains("acknowledged"),
            "{cut}: {d}"
        );
    }
}

#[test]
fn another_runs_entries_are_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let old = Run::fresh(1);
    let mut wal = Wal::create(&Fs, &path, old).unwrap();
    for seq in 1..=5 {
        wal.append(seq, b"old run").unwrap();
    }
    let new = Run::fresh(6);
    wal.restart(new);
    wal.append(6, b"new").unwrap();
    wal.append(7, b"new").unwrap();
    drop(wal);
    let (_, entries) = Wal::open(&Fs, &path, new).unwrap();
    assert_eq!(payloads(&entries), [(6, &b"new"[..]), (7, &b"new"[..])]);
}

#[test]
fn a_wrong_number_where_the_next_batch_belongs_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let run = Run::fresh(1);
    let mut wal = Wal::create(&Fs, &path, run).unwrap();
    wal.append(1, b"one").unwrap();
    wal.append(3, b"three").unwrap();
    drop(wal);
    let d = damage(&path, run);
    assert_eq!(d.batch, 2, "{d}");
}

#[test]
fn a_length_past_the_end_of_the_file_is_not_trusted() {
    let (_dir, path, run) = log(1);
    poke(&path, offset(0) + 4, &u32::MAX.to_le_bytes());
    // A header of this run claiming 4 GiB: the file was cut (or damaged), never read.
    let d = damage(&path, run);
    assert_eq!(d.batch, 1, "{d}");
}

#[test]
fn the_file_is_filled_ahead_so_appends_do_not_grow_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let mut wal = Wal::create(&Fs, &path, Run::fresh(1)).unwrap();
    wal.append(1, b"x").unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(len, super::format::GROW);
    for seq in 2..100 {
        wal.append(seq, &[0u8; 1000]).unwrap();
    }
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
    assert_eq!(wal.len(), 98 * 1000 + 99 * (HEADER + TRAILER) as u64 + 1);
}

#[test]
fn fuzz_reading_a_log_never_panics_and_never_reads_past_its_bytes() {
    let (_dir, path, run) = log(6);
    let bytes = std::fs::read(&path).unwrap();
    // The used part: slots, entries and a little of the zeros after them.
    let used = bytes[..offset(6) as usize + 64].to_vec();
    let seeds = vec![used.clone(), used[..offset(3) as usize].to_vec()];
    let iters = crate::fuzz::iterations(3_000);
    crate::fuzz::run("write-ahead log", &seeds, iters, |input| {
        if let Ok(entries) = super::read_bytes(input, run) {
            for (seq, payload) in &entries {
                assert!(*seq >= run.first && payload.len() <= input.len());
            }
        }
    });
}
