#![allow(dead_code)] // shared by the harness and the test; each uses a part
//! The flows the kill tests run, shared by the harness binary and the test.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use flowwire::prelude::*;

/// Sleeps `naps_wanted` times, `nap_ms` each, then finishes.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct NapState {
    pub nap_ms: u64,
    pub naps_wanted: u32,
    pub naps: u32,
}

#[flow(name = "KillNap")]
pub struct KillNap {
    #[link]
    state: NapState,
}

#[flow]
impl KillNap {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.naps < self.state.naps_wanted {
            Command::sleep(Duration::from_millis(self.state.nap_ms)).then(|f| {
                f.state.naps += 1;
                Ok(())
            })
        } else {
            Command::finish()
        }
    }
}

/// Why a ledger driver failed (never, in practice).
#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("ledger unavailable")]
pub struct LedgerError;

/// Moves money: a call that may have run before a crash must not be sent again blindly.
#[driver]
pub trait Vault {
    #[driver(ambiguous = "park")]
    async fn transfer(&self, cents: u64) -> Result<(), LedgerError>;
}

/// Sends mail: safe to send again (the idempotency key deduplicates).
#[driver]
pub trait Mail {
    async fn send(&self, to: u32) -> Result<(), LedgerError>;
}

/// The drivers: each execution appends `run method key redelivered` to a ledger; in the
/// run tagged `hang`, every call then hangs until the process is killed; in runs tagged
/// `undo-hang…`, every compensation (`release`) does.
#[derive(Clone)]
pub struct Ledger {
    pub path: PathBuf,
    pub run: String,
}

impl Ledger {
    async fn note(&self, method: &str) {
        let ctx = CallContext::current().expect("a call has a context");
        let line = format!(
            "{} {method} {} {}\n",
            self.run,
            ctx.idempotency_key(),
            ctx.redelivered()
        );
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .expect("the ledger opens");
        f.write_all(line.as_bytes())
            .expect("the ledger takes a line");
        f.sync_data().expect("the ledger syncs");
        let undo = method == "release";
        if self.run == "hang" || (undo && self.run.starts_with("undo-hang")) {
            std::future::pending::<()>().await;
        }
    }
}

#[driver]
impl Vault for Ledger {
    async fn transfer(&self, _cents: u64) -> Result<(), LedgerError> {
        self.note("transfer").await;
        Ok(())
    }
}

#[driver]
impl Mail for Ledger {
    async fn send(&self, _to: u32) -> Result<(), LedgerError> {
        self.note("send").await;
        Ok(())
    }
}

/// One call to one of the two drivers, then finish.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct PayState {
    pub money: bool,
    pub done: bool,
}

#[flow(name = "KillPay")]
pub struct KillPay {
    #[link]
    state: PayState,
    #[link]
    vault: impl Vault,
    #[link]
    mail: impl Mail,
}

#[flow]
impl KillPay {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.done {
            return Command::finish();
        }
        let then = |f: &mut Self, r: Result<(), DriveError<LedgerError>>| {
            r.map_err(|e| Failure::msg(e.to_string()))?;
            f.state.done = true;
            Ok(())
        };
        if self.state.money {
            Command::drive(self.vault.transfer(100)).then(then)
        } else {
            Command::drive(self.mail.send(7)).then(then)
        }
    }
}

/// The id of the i-th flow of a kind.
pub fn pay_id(money: bool, i: u32) -> String {
    format!("{}-{i}", if money { "transfer" } else { "mail" })
}

/// Reserves seats; a reservation is undone by releasing it.
#[driver(timeout = "2s")]
pub trait Seats {
    async fn reserve(&self, seat: u32) -> Result<(), LedgerError>;
    async fn release(&self, seat: u32) -> Result<(), LedgerError>;
}

#[driver]
impl Seats for Ledger {
    async fn reserve(&self, _seat: u32) -> Result<(), LedgerError> {
        self.note("reserve").await;
        Ok(())
    }
    async fn release(&self, _seat: u32) -> Result<(), LedgerError> {
        self.note("release").await;
        Ok(())
    }
}

/// Reserves `SEATS` seats, each with its release as compensation, then gives up: the
/// releases run last-first.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct TripState {
    pub reserved: u32,
}

/// Seats a trip reserves before it fails.
pub const SEATS: u32 = 3;

#[flow(name = "KillTrip")]
pub struct KillTrip {
    #[link]
    state: TripState,
    #[link]
    seats: impl Seats,
}

#[flow]
impl KillTrip {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        let seat = self.state.reserved;
        if seat < SEATS {
            Command::drive(self.seats.reserve(seat))
                .compensate(self.seats.release(seat))
                .then(|f, r| {
                    r.map_err(|e| Failure::msg(e.to_string()))?;
                    f.state.reserved += 1;
                    Ok(())
                })
        } else {
            Command::fail("the trip was called off")
        }
    }
}

/// Prints pages; in runs tagged `fan-hang…` or `brood-hang…` the odd pages hang after
/// noting their call.
#[driver(timeout = "2s")]
pub trait Press {
    async fn print(&self, page: u32) -> Result<(), LedgerError>;
}

#[driver]
impl Press for Ledger {
    async fn print(&self, page: u32) -> Result<(), LedgerError> {
        self.note("print").await;
        let hangs = self.run.starts_with("fan-hang") || self.run.starts_with("brood-hang");
        if hangs && page % 2 == 1 {
            std::future::pending::<()>().await;
        }
        Ok(())
    }
}

/// Pages a fan-out prints.
pub const PAGES: u32 = 4;

/// Prints `PAGES` pages in a fan-out, two at a time, then finishes.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct FanState {
    pub printed: Vec<u32>,
    pub done: bool,
}

#[flow(name = "KillFan")]
pub struct KillFan {
    #[link]
    state: FanState,
    #[link]
    press: impl Press,
}

#[flow]
impl KillFan {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.done {
            return Command::finish();
        }
        Command::fan_out((0..PAGES).map(|p| self.press.print(p)))
            .parallel(2)
            .all(
                |f, i, r| {
                    r.map_err(|e| Failure::msg(e.to_string()))?;
                    f.state.printed.push(u32::try_from(i).unwrap_or(u32::MAX));
                    Ok(())
                },
                |f| {
                    f.state.done = true;
                    Ok(())
                },
            )
    }
}

/// Busy for the first two attempts of each call, then charges. Its waits are long enough
/// for a kill and a restart to fall inside one.
#[driver(
    retries = 5,
    backoff = "1500ms",
    max_backoff = "1500ms",
    timeout = "2s"
)]
pub trait Gateway {
    async fn charge(&self, cents: u64) -> Result<u32, LedgerError>;
}

#[driver]
impl Gateway for Ledger {
    async fn charge(&self, _cents: u64) -> Result<u32, LedgerError> {
        let attempt = CallContext::current().expect("a context").attempt();
        self.note(&format!("charge#{attempt}")).await;
        if attempt <= 2 {
            return Err(LedgerError);
        }
        Ok(attempt)
    }
}

/// Charges once (through the gateway's retries), then finishes.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct RetryState {
    pub charged_on: Option<u32>,
}

#[flow(name = "KillRetry")]
pub struct KillRetry {
    #[link]
    state: RetryState,
    #[link]
    gateway: impl Gateway,
}

#[flow]
impl KillRetry {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.charged_on.is_some() {
            return Command::finish();
        }
        Command::drive(self.gateway.charge(100)).then(|f, r| {
            f.state.charged_on = Some(r.map_err(|e| Failure::msg(e.to_string()))?);
            Ok(())
        })
    }
}

/// Reserves `SEATS` seats, each with its release as compensation, then waits to be
/// cancelled.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct HoldState {
    pub reserved: u32,
}

#[flow(name = "KillHold")]
pub struct KillHold {
    #[link]
    state: HoldState,
    #[link]
    seats: impl Seats,
}

#[flow]
impl KillHold {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        let seat = self.state.reserved;
        if seat < SEATS {
            return Command::drive(self.seats.reserve(seat))
                .compensate(self.seats.release(seat))
                .then(|f, r| {
                    r.map_err(|e| Failure::msg(e.to_string()))?;
                    f.state.reserved += 1;
                    Ok(())
                });
        }
        Command::wait()
    }
}

/// Collects numbers sent by start-or-impulse; finishes once it has `NOTES_EACH`.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct NotesState {
    pub got: Vec<u32>,
}

/// The numbers each `KillNotes` instance collects.
pub const NOTES_EACH: usize = 40;

#[flow(name = "KillNotes")]
pub struct KillNotes {
    #[link]
    state: NotesState,
}

#[flow]
impl KillNotes {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.got.len() >= NOTES_EACH {
            Command::finish()
        } else {
            Command::wait()
        }
    }

    #[impulse]
    fn add(&mut self, n: u32) {
        self.state.got.push(n);
    }
}

/// Children a `KillBrood` parent runs.
pub const CHICKS: u32 = 4;

/// A child: prints its page, then finishes.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ChickState {
    pub page: u32,
    pub printed: bool,
}

#[flow(name = "KillChick")]
pub struct KillChick {
    #[link]
    state: ChickState,
    #[link]
    press: impl Press,
}

#[flow]
impl KillChick {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.printed {
            return Command::finish();
        }
        Command::drive(self.press.print(self.state.page)).then(|f, r| {
            r?;
            f.state.printed = true;
            Ok(())
        })
    }
}

/// A parent: runs `CHICKS` children (`{id}-c{page}`), two at a time, then finishes.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct BroodState {
    pub id: String,
    pub hatched: Vec<u32>,
    pub done: bool,
}

#[flow(name = "KillBrood")]
pub struct KillBrood {
    #[link]
    state: BroodState,
}

#[flow]
impl KillBrood {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.done {
            return Command::finish();
        }
        let id = &self.state.id;
        let chicks = (0..CHICKS).map(|page| {
            flowwire::ChildStart::<KillChick>::new(
                format!("{id}-c{page}"),
                ChickState {
                    page,
                    printed: false,
                },
            )
        });
        Command::fan_out(chicks).parallel(2).all(
            |f, i, child| {
                let child = child?;
                if child.ended != Ended::Finished || !child.state.printed {
                    return Err(Failure::msg(format!("child {i} ended {:?}", child.ended)));
                }
                f.state.hatched.push(child.state.page);
                Ok(())
            },
            |f| {
                f.state.done = true;
                Ok(())
            },
        )
    }
}

/// The state of a `KillChunks` instance: a large buffer, rewritten in part each round.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ChunkState {
    pub data: bytes::Bytes,
    pub round: u32,
}

/// Rounds each `KillChunks` instance runs.
pub const CHUNK_ROUNDS: u32 = 40;

/// The size of a `KillChunks` state.
pub const CHUNK_STATE: usize = 2 << 20;

/// Rewrites 600 bytes of a 2 MiB state each round (one timer step each), so every step
/// writes a chunk or two and, with history kept for one step, sweeps the ones it dropped.
#[flow(name = "KillChunks")]
pub struct KillChunks {
    #[link]
    state: ChunkState,
}

#[flow]
impl KillChunks {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.round < CHUNK_ROUNDS {
            Command::sleep(Duration::from_millis(2)).then(|f| {
                let mut data = f.state.data.to_vec();
                chunk_edit(&mut data, f.state.round);
                f.state.data = data.into();
                f.state.round += 1;
                Ok(())
            })
        } else {
            Command::finish()
        }
    }
}

/// Round `round`'s edit: 600 bytes somewhere in the state, set to a byte of the round.
pub fn chunk_edit(data: &mut [u8], round: u32) {
    let at = (round as usize * 700_001) % (data.len() - 600);
    data[at..at + 600].fill((round as u8) ^ 0x5a);
}

/// Pseudo-random bytes, so no two chunks are alike.
pub fn chunk_noise(len: usize, seed: u64) -> Vec<u8> {
    flowwire::storage::fuzz::Rng::new(seed).bytes(len)
}

/// Instance `i`'s state after `rounds` rounds.
pub fn chunk_data(i: u32, rounds: u32) -> Vec<u8> {
    let mut data = chunk_noise(CHUNK_STATE, u64::from(i) + 1);
    for r in 0..rounds {
        chunk_edit(&mut data, r);
    }
    data
}

/// FNV-1a of `data`, a digest for probes.
pub fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The ladder of the chunk kill test: every payload of 4 KiB and more on files under
/// `dir/chunks`, chunked from 1 MiB (the default).
pub fn chunk_ladder(dir: &std::path::Path) -> flowwire::storage::Ladder {
    use flowwire::storage::{Ladder, Tier};
    Ladder::new().default_to(Tier::fs(dir.join("chunks")).named("chunks"))
}

/// The state of a `KillBlobs` instance: a large blob, replaced every fifth round and kept
/// as it is between.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct BlobState {
    pub id: u32,
    pub scan: flowwire::Blob,
    pub sum: u64,
    pub round: u32,
}

/// Each round (one timer step) adds to a small field; every fifth also replaces the 2 MiB
/// blob, whose old chunks the sweep then removes (history is kept for one step).
#[flow(name = "KillBlobs")]
pub struct KillBlobs {
    #[link]
    state: BlobState,
}

#[flow]
impl KillBlobs {
    #[wire]
    fn run(&mut self) -> Command<Self> {
        if self.state.round < CHUNK_ROUNDS {
            Command::sleep(Duration::from_millis(2)).then(|f| {
                f.state.round += 1;
                f.state.sum += u64::from(f.state.round);
                if f.state.round % 5 == 0 {
                    f.state.scan = blob_scan(f.state.id, f.state.round);
                }
                Ok(())
            })
        } else {
            Command::finish()
        }
    }
}

/// Instance `id`'s blob as of round `round` (replaced every fifth round).
pub fn blob_scan(id: u32, round: u32) -> flowwire::Blob {
    let seed = 10_000 + u64::from(id) * 100 + u64::from(round / 5);
    flowwire::Blob::from(chunk_noise(CHUNK_STATE, seed))
}
