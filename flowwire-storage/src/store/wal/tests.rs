//! The write-ahead log's reading rules, tried on real files: torn, damaged, cut and
//! zeroed logs, entries read from their copies, other runs' bytes, logs of the second
//! format, and fuzzed bytes.

use std::os::unix::fs::FileExt;

use super::format::{HEADER, PAGE, SLOT, SLOTS, START, TRAILER};
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

/// The bytes of the file at `path`.
fn read(path: &std::path::Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// The payloads of a [`log`] of `n` entries.
fn expected(n: u64) -> Vec<(u64, Vec<u8>)> {
    (1..=n).map(|seq| (seq, vec![seq as u8; 100])).collect()
}

#[test]
fn a_torn_last_entry_ends_the_log() {
    let entry_len = (HEADER + 100 + TRAILER) as u64;
    // The slot of batch 3 (odd: slot B) as it was before batch 3 was appended.
    let (_d, path2) = {
        let (d, path, _) = log(2);
        (d, path)
    };
    let slot_before = read(&path2)[SLOTS[1] as usize..(SLOTS[1] + PAGE) as usize].to_vec();
    for keep in 0..entry_len {
        // A power cut during the append of batch 3: a prefix of its entry reached the
        // disk, the rest of the entry and its slot did not.
        let (_d, path, run) = log(3);
        poke(
            &path,
            offset(2) + keep,
            &vec![0u8; (entry_len - keep) as usize],
        );
        poke(&path, SLOTS[1], &slot_before);
        // The floor slot of batch 2 says 1: the log may end after batch 2. A tear in the
        // trailer leaves an entry whose checksum holds: it is whole.
        let (_, entries) =
            Wal::open(&Fs, &path, run).unwrap_or_else(|e| panic!("torn at {keep}: {e:?}"));
        let whole = keep >= (HEADER + 100) as u64;
        assert_eq!(entries.len(), if whole { 3 } else { 2 }, "torn at {keep}");
        // The same tear, with the slot's write on the disk (the disk kept the later of the
        // two writes): the batch is read from the copy its slot keeps.
        let (_d, path, run) = log(3);
        poke(
            &path,
            offset(2) + keep,
            &vec![0u8; (entry_len - keep) as usize],
        );
        let (_, entries) = Wal::open(&Fs, &path, run).unwrap();
        assert_eq!(entries, expected(3), "torn at {keep}, slot written");
    }
}

#[test]
fn a_damaged_entry_followed_by_valid_ones_is_refused_with_batch_and_offset() {
    let (_dir, path, run) = log(5);
    poke(&path, offset(1) + HEADER as u64 + 3, b"X");
    let d = damage(&path, run);
    assert_eq!((d.batch, d.offset), (2, offset(1)), "{d}");
    assert!(d.detail.contains("fails its checksum"), "{d}");
}

/// Flips 64 bytes from `at` the way the corruption matrix does.
fn flip64(path: &std::path::Path, at: u64) {
    for n in 0..64 {
        flip(path, at + n, 0xa5 ^ n as u8);
    }
}

#[test]
fn a_damaged_last_entry_is_read_from_its_copy() {
    let entry_len = (HEADER + 100 + TRAILER) as u64;
    for at in [0, 5, 9, 17, 26, HEADER as u64 + 50] {
        let (_d, path, run) = log(3);
        flip(&path, offset(2) + at, 0xA5);
        let (_, entries) = Wal::open(&Fs, &path, run).unwrap();
        assert_eq!(entries, expected(3), "byte {at}");
    }
    // The pattern a torn write also leaves: the end of the payload and the whole trailer
    // damaged. Only the copy tells the two apart, and it holds the batch.
    let (_d, path, run) = log(3);
    flip64(&path, offset(2) + entry_len - 64);
    let (_, entries) = Wal::open(&Fs, &path, run).unwrap();
    assert_eq!(entries, expected(3));
    // The page that holds the end of the last entry zeroed.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let run = Run::fresh(1);
    let mut wal = Wal::create(&Fs, &path, run).unwrap();
    wal.append(1, &[1; 3000]).unwrap();
    wal.append(2, &[2; 3000]).unwrap();
    drop(wal);
    let end = START + 2 * (HEADER + 3000 + TRAILER) as u64;
    poke(&path, (end - 1) / PAGE * PAGE, &[0u8; PAGE as usize]);
    let (_, entries) = Wal::open(&Fs, &path, run).unwrap();
    assert_eq!(
        payloads(&entries),
        [(1, &[1; 3000][..]), (2, &[2; 3000][..])]
    );
    // A page that holds older entries too is refused: only the last two batches have
    // copies, and the floor says batch 2 was acknowledged.
    let (_d, path, run) = log(3);
    poke(&path, START, &[0u8; PAGE as usize]);
    let d = damage(&path, run);
    assert_eq!(d.batch, 1, "{d}");
}

#[test]
fn a_damaged_last_entry_whose_copy_is_damaged_too_is_refused() {
    for at in [0, 5, 9, 17, 26, HEADER as u64 + 50] {
        let (_d, path, run) = log(3);
        flip(&path, offset(2) + at, 0xA5);
        // The copy of batch 3 lies in slot B's page, after the slot.
        flip(&path, SLOTS[1] + SLOT as u64 + HEADER as u64 + 10, 0x01);
        let d = damage(&path, run);
        assert_eq!((d.batch, d.offset), (3, offset(2)), "byte {at}: {d}");
    }
}

/// A log of batches 1 (small), 2 (10,000 bytes) and, if `third`, 3 (small); and where
/// entry 2 starts and its copy.
fn large(third: bool) -> (tempfile::TempDir, std::path::PathBuf, Run, u64, u64) {
    large_in(third, Run::fresh(1))
}

/// A [`large`] log of `run`.
fn large_in(third: bool, run: Run) -> (tempfile::TempDir, std::path::PathBuf, Run, u64, u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let mut wal = Wal::create(&Fs, &path, run).unwrap();
    wal.append(1, b"one").unwrap();
    wal.append(2, &[2; 10_000]).unwrap();
    if third {
        wal.append(3, b"three").unwrap();
    }
    let at = START + (HEADER + 3 + TRAILER) as u64;
    let copy = (at + (HEADER + 10_000 + TRAILER) as u64).next_multiple_of(PAGE);
    (dir, path, run, at, copy)
}

fn large_entries(third: bool) -> Vec<(u64, Vec<u8>)> {
    let mut entries = vec![(1, b"one".to_vec()), (2, vec![2; 10_000])];
    if third {
        entries.push((3, b"three".to_vec()));
    }
    entries
}

#[test]
fn a_large_entry_keeps_its_copy_a_page_after_it() {
    let size = (HEADER + 10_000 + TRAILER) as u64;
    for third in [false, true] {
        // Whole: read once, and the entry after it follows its copy.
        let (_d, path, run, at, copy) = large(third);
        let (mut wal, entries) = Wal::open(&Fs, &path, run).unwrap();
        assert_eq!(entries, large_entries(third));
        assert_eq!(
            read(&path)[copy as usize..(copy + size) as usize],
            read(&path)[at as usize..(at + size) as usize]
        );
        wal.append(if third { 4 } else { 3 }, b"more").unwrap();
        assert_eq!(
            Wal::open(&Fs, &path, run).unwrap().1.len(),
            if third { 4 } else { 3 }
        );
        // The end of its payload and its trailer flipped, or the page of its end zeroed:
        // read from the copy.
        let (_d, path, run, at, _) = large(third);
        flip64(&path, at + size - 64);
        assert_eq!(Wal::open(&Fs, &path, run).unwrap().1, large_entries(third));
        let (_d, path, run, at, _) = large(third);
        poke(&path, (at + size - 1) / PAGE * PAGE, &[0u8; PAGE as usize]);
        assert_eq!(Wal::open(&Fs, &path, run).unwrap().1, large_entries(third));
        // The copy damaged: the entry is whole.
        let (_d, path, run, _, copy) = large(third);
        flip64(&path, copy + size - 64);
        assert_eq!(Wal::open(&Fs, &path, run).unwrap().1, large_entries(third));
        // Both damaged: the copy's trailer shows it was written whole, so this is damage.
        let (_d, path, run, at, copy) = large(third);
        flip64(&path, at + size - 64);
        flip(&path, copy + 100, 0x10);
        let d = damage(&path, run);
        assert_eq!((d.batch, d.offset), (2, at), "{d}");
    }
}

#[test]
fn a_torn_large_entry_ends_the_log() {
    let size = HEADER + 10_000 + TRAILER;
    // The log as it was before batch 2 was appended.
    let dir = tempfile::tempdir().unwrap();
    let before = dir.path().join("log");
    let mut wal = Wal::create(&Fs, &before, Run::fresh(1)).unwrap();
    wal.append(1, b"one").unwrap();
    drop(wal);
    let slot_before = read(&before)[SLOTS[0] as usize..PAGE as usize].to_vec();
    // The append of batch 2 is one write of the entry, the padding and the copy: a power
    // cut keeps a prefix of it (and, here, not the slot).
    for keep in (0..2 * size + PAGE as usize).step_by(97) {
        let (_d, path, run, at, copy) = large(false);
        let written = (copy - at) as usize + size;
        if keep >= written {
            continue;
        }
        poke(&path, at + keep as u64, &vec![0u8; written - keep]);
        poke(&path, SLOTS[0], &slot_before);
        let (_, entries) =
            Wal::open(&Fs, &path, run).unwrap_or_else(|e| panic!("torn at {keep}: {e:?}"));
        let whole = keep >= size - TRAILER;
        assert_eq!(entries.len(), if whole { 2 } else { 1 }, "torn at {keep}");
    }
}

fn v2_entry(seq: u64, salt: u64, payload: &[u8]) -> Vec<u8> {
    let mut e = Vec::new();
    e.extend_from_slice(&super::format::MAGIC_V2.to_le_bytes());
    e.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    e.extend_from_slice(&seq.to_le_bytes());
    e.extend_from_slice(&salt.to_le_bytes());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&e);
    crc.update(payload);
    e.extend_from_slice(&crc.finalize().to_le_bytes());
    e.extend_from_slice(payload);
    e.extend_from_slice(&seq.to_le_bytes());
    e.extend_from_slice(&(!salt).to_le_bytes());
    e
}

fn v2_slot(run: Run, floor: u64) -> Vec<u8> {
    let mut s = Vec::new();
    s.extend_from_slice(&super::format::SLOT_MAGIC_V2.to_le_bytes());
    s.extend_from_slice(&run.salt.to_le_bytes());
    s.extend_from_slice(&run.first.to_le_bytes());
    s.extend_from_slice(&floor.to_le_bytes());
    s.extend_from_slice(&crc32fast::hash(&s).to_le_bytes());
    s
}

/// A log as flowwire wrote it before entries kept copies (format `FWL2`), with batches
/// 1 to 3 of `payloads`, and where each entry starts.
fn v2_log(payloads: &[&[u8]]) -> (tempfile::TempDir, std::path::PathBuf, Run, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let run = Run::fresh(1);
    let mut bytes = vec![0u8; super::format::GROW as usize];
    let mut at = START as usize;
    let mut starts = Vec::new();
    for (i, payload) in payloads.iter().enumerate() {
        let seq = i as u64 + 1;
        let e = v2_entry(seq, run.salt, payload);
        bytes[at..at + e.len()].copy_from_slice(&e);
        let slot = v2_slot(run, seq - 1);
        let s = SLOTS[(seq % 2) as usize] as usize;
        bytes[s..s + slot.len()].copy_from_slice(&slot);
        starts.push(at as u64);
        at += e.len();
    }
    std::fs::write(&path, bytes).unwrap();
    (dir, path, run, starts)
}

#[test]
fn a_log_of_the_second_format_is_still_read_by_its_rules() {
    let written: [&[u8]; 3] = [b"one", &[2; 10_000], b"three"];
    let (_d, path, run, _) = v2_log(&written);
    let (_, entries) = Wal::open(&Fs, &path, run).unwrap();
    assert_eq!(
        payloads(&entries),
        [(1, written[0]), (2, written[1]), (3, written[2])]
    );
    // Its entries have no copies: a damaged last one with its trailer is refused, and
    // damage followed by a later entry too.
    let (_d, path, run, starts) = v2_log(&written);
    flip(&path, starts[2] + HEADER as u64 + 1, 0x20);
    assert_eq!(damage(&path, run).batch, 3);
    let (_d, path, run, starts) = v2_log(&written);
    flip(&path, starts[1] + HEADER as u64 + 1, 0x20);
    assert_eq!(damage(&path, run).batch, 2);
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

/// A log with batches 1 to 5 of one run, then a checkpoint and `new` as the entries of
/// the next run, from batch 6 (written over the first run's).
fn after_checkpoint(new: &[&[u8]]) -> (tempfile::TempDir, std::path::PathBuf, Run) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let mut wal = Wal::create(&Fs, &path, Run::fresh(1)).unwrap();
    for seq in 1..=5 {
        wal.append(seq, b"old run").unwrap();
    }
    let run = Run::fresh(6);
    wal.restart(run);
    for (seq, payload) in (6..).zip(new) {
        wal.append(seq, payload).unwrap();
    }
    (dir, path, run)
}

#[test]
fn another_runs_entries_are_not_read() {
    let (_dir, path, new) = after_checkpoint(&[b"new", b"new"]);
    let (_, entries) = Wal::open(&Fs, &path, new).unwrap();
    assert_eq!(payloads(&entries), [(6, &b"new"[..]), (7, &b"new"[..])]);
}

#[test]
fn a_new_runs_entries_are_read_from_their_own_copies_never_from_an_old_runs() {
    // Slot B still holds the old run's batch 5 and its copy.
    let (_dir, path, new) = after_checkpoint(&[b"new six"]);
    // The end of batch 6's payload and its trailer damaged.
    poke(&path, START + HEADER as u64 + 3, &[0xee; 4 + TRAILER]);
    let (_, entries) = Wal::open(&Fs, &path, new).unwrap();
    assert_eq!(payloads(&entries), [(6, &b"new six"[..])]);
    // With the new run's slot gone too (two damages), the old run's slot offers no copy:
    // nothing of the old run is ever read as the new one's.
    poke(&path, SLOTS[0], &[0u8; PAGE as usize]);
    match Wal::open(&Fs, &path, new) {
        Ok((_, entries)) => assert!(entries.is_empty(), "{entries:?}"),
        Err(OpenError::Damaged(_)) => {}
        Err(e) => panic!("{e:?}"),
    }
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
    // A header of this run claiming 4 GiB is never read: the entry comes from its copy…
    let (_, entries) = Wal::open(&Fs, &path, run).unwrap();
    assert_eq!(entries, expected(1));
    // …and without the copy the file was cut (or damaged).
    poke(&path, SLOTS[1], &[0u8; PAGE as usize]);
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
    // A log of the same run whose entry 2 keeps its copy in the entry area.
    let (_d, large_path, _, _, copy) = large_in(true, run);
    let large_bytes = read(&large_path)[..copy as usize + 12_000].to_vec();
    let seeds = vec![
        used.clone(),
        used[..offset(3) as usize].to_vec(),
        large_bytes,
        // Cut inside the second slot: a power cut while the file was being created.
        used[..SLOTS[1] as usize + 20].to_vec(),
    ];
    let iters = crate::fuzz::iterations(3_000);
    crate::fuzz::run("write-ahead log", &seeds, iters, |input| {
        match super::read_bytes(input, run) {
            Ok(entries) => {
                for (seq, payload) in &entries {
                    assert!(*seq >= run.first && payload.len() <= input.len());
                }
            }
            // Every read is bounded by the bytes there are: an I/O error here is a read
            // past them.
            Err(OpenError::Io(e)) => panic!("read past the end of {} bytes: {e}", input.len()),
            Err(OpenError::Damaged(_) | OpenError::RunAhead { .. }) => {}
        }
    });
}
