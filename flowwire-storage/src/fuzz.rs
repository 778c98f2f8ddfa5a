//! A mutation fuzzer for decoders, on stable Rust: the test suites run every decoder that
//! reads bytes from disk or the network over mutations of valid inputs.
//!
//! Each input is a valid encoding (a seed) changed by one to four mutations: bit flips,
//! random bytes, a run of `0x00` or `0xff`, a length-like field set to a huge value, a cut,
//! an insertion or deletion, or a splice of two seeds. The generator is seeded, so a failing
//! input is found again by its iteration number.
//!
//! `FLOWWIRE_FUZZ_ITERS` sets the inputs per target (the suites default to a short run);
//! the long run in docs/architecture.md uses 10 million:
//!
//! ```text
//! FLOWWIRE_FUZZ_ITERS=10000000 cargo test --release -p flowwire-storage -p flowwire-runtime fuzz
//! ```
//!
//! ```
//! use flowwire::storage::fuzz;
//! let seeds = [vec![1u8, 2, 3]];
//! let mut seen = 0;
//! fuzz::run("example", &seeds, 100, |input| {
//!     seen += 1;
//!     let _ = postcard::from_bytes::<(u8, String)>(input);
//! });
//! assert_eq!(seen, 100);
//! ```

/// The inputs per target: `FLOWWIRE_FUZZ_ITERS`, or `default`.
pub fn iterations(default: u64) -> u64 {
    std::env::var("FLOWWIRE_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A seeded xorshift generator (no dependency, same sequence on every platform).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next 64 random bits.
    pub fn bits(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.bits() % n.max(1) as u64) as usize
    }

    /// `len` random bytes (test data no two chunks of which are alike).
    ///
    /// ```
    /// use flowwire::storage::fuzz::Rng;
    /// let a = Rng::new(7).bytes(100);
    /// assert_eq!(a, Rng::new(7).bytes(100));
    /// assert_ne!(a, Rng::new(8).bytes(100));
    /// ```
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.bits().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// Writes a mutation of one of `seeds` into `out`.
pub fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], out: &mut Vec<u8>) {
    out.clear();
    if let Some(seed) = seeds.get(rng.below(seeds.len())) {
        out.extend_from_slice(seed);
    }
    for _ in 0..=rng.below(4) {
        let len = out.len();
        match rng.below(9) {
            0 if len > 0 => {
                let at = rng.below(len);
                out[at] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let at = rng.below(len);
                out[at] = rng.bits() as u8;
            }
            2 if len > 0 => {
                let at = rng.below(len);
                let n = (1 + rng.below(16)).min(len - at);
                let b = if rng.below(2) == 0 { 0 } else { 0xff };
                out[at..at + n].fill(b);
            }
            3 if len >= 4 => {
                // A length-like field: four or eight bytes set to a huge value.
                let at = rng.below(len - 3);
                let n = if len - at >= 8 && rng.below(2) == 0 {
                    8
                } else {
                    4
                };
                let huge = [0xff, 0xff, 0xff, 0x7f, 0xff, 0xff, 0xff, 0x7f];
                out[at..at + n].copy_from_slice(&huge[..n]);
            }
            4 if len > 0 => out.truncate(rng.below(len)),
            5 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(32);
                let bytes: Vec<u8> = (0..n).map(|_| rng.bits() as u8).collect();
                out.splice(at..at, bytes);
            }
            6 if len > 0 => {
                let at = rng.below(len);
                let n = (1 + rng.below(32)).min(len - at);
                out.drain(at..at + n);
            }
            7 if !seeds.is_empty() => {
                // Splice: this input's head, another seed's tail.
                let other = &seeds[rng.below(seeds.len())];
                let at = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                out.truncate(at);
                out.extend_from_slice(&other[from..]);
            }
            _ => {
                let at = rng.below(len + 1);
                out.insert(at, rng.bits() as u8);
            }
        }
    }
}

/// Feeds `target` `iterations` mutations of `seeds` (and the seeds themselves first). A
/// panic in `target` fails the caller's test, naming the target and the iteration.
pub fn run(name: &str, seeds: &[Vec<u8>], iterations: u64, mut target: impl FnMut(&[u8])) {
    let mut rng = Rng::new(
        name.bytes()
            .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))),
    );
    let mut input = Vec::new();
    for i in 0..iterations {
        if let Some(seed) = seeds.get(i as usize) {
            input.clear();
            input.extend_from_slice(seed);
        } else {
            mutate(&mut rng, seeds, &mut input);
        }
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| target(&input)));
        assert!(
            caught.is_ok(),
            "fuzz target `{name}` panicked at iteration {i} on {} bytes: {:02x?}",
            input.len(),
            &input[..input.len().min(256)]
        );
    }
}
