#![allow(missing_docs)] // test-local flows and drivers
//! Allocation proof, with a counting global allocator (per thread, so parallel tests do
//! not disturb each other).
//!
//! * Building a driver call and a `Command` with non-allocating arguments allocates nothing.
//! * One in-memory step (apply an outcome, run the wire, encode the record and history
//!   entry) is counted and reported; the bound asserted here is the figure measured, so a
//!   regression fails the test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use flowwire::core::{Instance, Scratch};
use flowwire::prelude::*;
use flowwire::storage::{InstanceKey, codec};

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; the counter is a const thread-local Cell,
// whose access never allocates.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.with(|c| c.set(c.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations<T>(f: impl FnOnce() -> T) -> (T, u64) {
    let before = ALLOCS.with(Cell::get);
    let out = f();
    (out, ALLOCS.with(Cell::get) - before)
}

#[derive(Debug, Serialize, Deserialize, thiserror::Error)]
#[error("declined")]
pub struct Declined;

#[driver]
pub trait Payment {
    async fn charge(&self, cents: u64, card: [u8; 16]) -> Result<u64, Declined>;
}

#[derive(Default, Serialize, Deserialize)]
pub struct PayState {
    charges: u32,
    last: Option<u64>,
}

#[flow]
pub struct Pay {
    #[link]
    state: PayState,
    #[link]
    payment: impl Payment,
}

#[flow]
impl Pay {
    #[wire]
    fn step(&mut self) -> Command<Self> {
        if self.state.charges >= 1_000_000 {
            return Command::finish();
        }
        Command::drive(self.payment.charge(9_995, [7; 16])).then(|f, r| {
            f.state.last = Some(r?);
            f.state.charges += 1;
            Ok(())
        })
    }
}

#[test]
fn building_a_call_and_a_command_allocates_nothing() {
    let proxy = PaymentProxy;
    let (cmd, n) = allocations(|| {
        let call = proxy.charge(9_995, [7; 16]);
        Command::<Pay>::drive(call).then(|f, r| {
            f.state.last = Some(r?);
            Ok(())
        })
    });
    assert_eq!(cmd.name(), "drive");
    assert_eq!(n, 0, "building a call and a command allocated {n} times");
    let (_, n) = allocations(|| (Command::<Pay>::finish(), Command::<Pay>::wait()));
    assert_eq!(n, 0);
}

#[test]
fn one_in_memory_step_allocates_a_small_fixed_number_of_times() {
    let mut scratch = Scratch::default();
    let key = InstanceKey::new("Pay", "p-1");
    let (mut inst, first) = Instance::<Pay>::start(key, PayState::default(), 1 << 20, &mut scratch);
    inst.commit(&first);
    let mut reply = Vec::new();
    codec::encode_raw(&Ok::<u64, Declined>(42), &mut reply).unwrap();
    let reply = bytes::Bytes::from(reply);
    // Warm the scratch buffers with one step, then measure the next.
    let seq = inst.pending().unwrap().seq;
    let step = inst.outcome(seq, None, Ok(&reply), &mut scratch).unwrap();
    inst.commit(&step);
    let seq = inst.pending().unwrap().seq;
    let (step, n) = allocations(|| inst.outcome(seq, None, Ok(&reply), &mut scratch).unwrap());
    inst.commit(&step);
    eprintln!(
        "allocations in one in-memory step (outcome → continuation → wire → encoded record + history): {n}"
    );
    assert!(
        n <= 5,
        "one step allocated {n} times (5 when this test was written: call, state, record, history bytes and the history entry input)"
    );
}
