//! [`Blob`]: a large field of a flow's state, kept by reference.

use std::cell::{Cell, RefCell};
use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::chunk::{ChunkRef, ChunkSize, parallel};

/// Immutable, reference-counted bytes for a large field of a flow's state (a document, an
/// image, a batch of rows), which the engine stores by reference.
///
/// A `Blob` is encoded like `Vec<u8>` or [`Bytes`] (a length, then the bytes), so swapping
/// one for the other keeps every stored state readable. What changes is the cost of a step:
///
/// - encoding the state does not copy the blob's bytes: the encoded state refers to them;
/// - the content-defined chunks of a large state are cut and hashed once per blob, and a
///   step that leaves the blob as it is writes none of its chunks and compares none of
///   its bytes;
/// - decoding a state the engine read back slices the blob out of the read buffer instead
///   of copying it, so a resident instance holds its large fields once.
///
/// Clone it freely (a reference count). To change it, build a new one.
///
/// ```
/// use flowwire::Blob;
///
/// let scan = Blob::from(vec![7u8; 3 * 1024 * 1024]);
/// let copy = scan.clone(); // no copy of the bytes
/// assert_eq!(copy.len(), 3 * 1024 * 1024);
/// assert_eq!(&scan[..2], &[7, 7]);
///
/// // Encoded as bytes are: a state can move from `Vec<u8>` to `Blob` and back.
/// let as_blob = postcard::to_allocvec(&Blob::from_static(b"abc")).unwrap();
/// let as_vec = postcard::to_allocvec(&b"abc".to_vec()).unwrap();
/// assert_eq!(as_blob, as_vec);
/// ```
#[derive(Clone)]
pub struct Blob(Arc<Inner>);

struct Inner {
    bytes: Bytes,
    /// Where the blob is cut into chunks of one size, with each chunk's hash: computed at
    /// the first step that stores the blob as chunks, then kept while the blob lives.
    cuts: Mutex<Option<Arc<Cuts>>>,
}

/// A blob's chunks for one chunk size (the step each was written at is not known here:
/// it comes from the manifest that stores them).
#[derive(Debug)]
pub(crate) struct Cuts {
    pub(crate) size: ChunkSize,
    pub(crate) chunks: Vec<ChunkRef>,
}

impl Blob {
    /// A blob of `bytes` (no copy).
    pub fn new(bytes: impl Into<Bytes>) -> Blob {
        Blob(Arc::new(Inner {
            bytes: bytes.into(),
            cuts: Mutex::new(None),
        }))
    }

    /// A blob of static bytes.
    ///
    /// ```
    /// assert_eq!(flowwire::Blob::from_static(b"hi").len(), 2);
    /// ```
    pub fn from_static(bytes: &'static [u8]) -> Blob {
        Blob::new(Bytes::from_static(bytes))
    }

    /// Its bytes, shared.
    ///
    /// ```
    /// let b = flowwire::Blob::from(vec![1u8, 2, 3]);
    /// let bytes: bytes::Bytes = b.bytes().clone();
    /// assert_eq!(&bytes[..], &[1, 2, 3]);
    /// ```
    pub fn bytes(&self) -> &Bytes {
        &self.0.bytes
    }

    /// Its length in bytes.
    ///
    /// ```
    /// assert_eq!(flowwire::Blob::default().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.0.bytes.len()
    }

    /// Whether it holds no bytes.
    ///
    /// ```
    /// assert!(flowwire::Blob::default().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.0.bytes.is_empty()
    }

    /// Whether `self` and `other` are the same blob (clones of one another), without
    /// comparing bytes. Two blobs built apart from equal bytes are equal (`==`) but not
    /// the same.
    ///
    /// ```
    /// use flowwire::Blob;
    /// let a = Blob::from(vec![1u8; 10]);
    /// assert!(a.same(&a.clone()));
    /// assert!(!a.same(&Blob::from(vec![1u8; 10])));
    /// assert_eq!(a, Blob::from(vec![1u8; 10]));
    /// ```
    pub fn same(&self, other: &Blob) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// Whether its chunks for `size` are known (cut and hashed before).
    pub(crate) fn is_cut(&self, size: &ChunkSize) -> bool {
        self.cached(size).is_some()
    }

    /// Keeps `chunks`, found by cutting and hashing the blob with `size` elsewhere (see
    /// `ladder::precut`), as its cuts.
    pub(crate) fn keep_cuts(&self, size: ChunkSize, chunks: Vec<ChunkRef>) {
        debug_assert_eq!(
            chunks.iter().map(|c| c.len as usize).sum::<usize>(),
            self.len(),
            "a blob's cuts cover it"
        );
        *self.lock_cuts() = Some(Arc::new(Cuts { size, chunks }));
    }

    fn lock_cuts(&self) -> std::sync::MutexGuard<'_, Option<Arc<Cuts>>> {
        self.0
            .cuts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn cached(&self, size: &ChunkSize) -> Option<Arc<Cuts>> {
        self.lock_cuts()
            .as_ref()
            .filter(|c| c.size == *size)
            .cloned()
    }

    /// Its chunks for `size`: cut and hashed the first time, then kept.
    pub(crate) fn cuts(&self, size: &ChunkSize) -> Arc<Cuts> {
        let mut cached = self.lock_cuts();
        if let Some(c) = cached.as_ref()
            && c.size == *size
        {
            return c.clone();
        }
        // On several threads for a large blob: the same chunks, sooner.
        let chunks = parallel::cut_and_hash(&self.0.bytes, size);
        let cuts = Arc::new(Cuts {
            size: *size,
            chunks,
        });
        *cached = Some(cuts.clone());
        cuts
    }
}

impl Default for Blob {
    fn default() -> Blob {
        Blob::new(Bytes::new())
    }
}

impl Deref for Blob {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0.bytes
    }
}

impl AsRef<[u8]> for Blob {
    fn as_ref(&self) -> &[u8] {
        &self.0.bytes
    }
}

impl From<Bytes> for Blob {
    fn from(bytes: Bytes) -> Blob {
        Blob::new(bytes)
    }
}

impl From<Vec<u8>> for Blob {
    fn from(bytes: Vec<u8>) -> Blob {
        Blob::new(bytes)
    }
}

impl From<Blob> for Bytes {
    fn from(blob: Blob) -> Bytes {
        blob.0.bytes.clone()
    }
}

impl PartialEq for Blob {
    fn eq(&self, other: &Blob) -> bool {
        self.same(other) || self.0.bytes == other.0.bytes
    }
}

impl Eq for Blob {}

impl std::hash::Hash for Blob {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.bytes.hash(state);
    }
}

impl fmt::Debug for Blob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blob({} bytes)", self.len())
    }
}

impl Serialize for Blob {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Inside the engine's encoder this records a reference instead of a copy; anywhere
        // else it is plain bytes.
        offer(self);
        serializer.serialize_bytes(&self.0.bytes)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Blob, D::Error> {
        deserializer.deserialize_bytes(BlobVisitor)
    }
}

struct BlobVisitor;

impl<'de> Visitor<'de> for BlobVisitor {
    type Value = Blob;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("bytes")
    }

    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Blob, E> {
        // Decoding a rope: the rope's own blob. Decoding a buffer the engine shares: a
        // slice of it. Not a copy either way.
        if let Some(blob) = rope_blob(v) {
            return Ok(blob);
        }
        Ok(Blob::new(
            shared_slice(v).unwrap_or_else(|| Bytes::copy_from_slice(v)),
        ))
    }

    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Blob, E> {
        Ok(Blob::new(Bytes::copy_from_slice(v)))
    }

    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
        Ok(Blob::new(v))
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Blob, A::Error> {
        // Formats that write bytes as a list of numbers (JSON). Bounded by the input: each
        // element is one the deserializer read.
        let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64 * 1024));
        while let Some(b) = seq.next_element::<u8>()? {
            out.push(b);
        }
        Ok(Blob::new(out))
    }
}

// The thread-local hand-overs between a `Blob` and the engine's encoder and decoders
// (`super::codec`, `super::read`), kept here so that those depend on this file and not the
// other way round.

/// Blobs smaller than this are copied into the encoding: a reference to them would cost
/// more than their bytes.
pub const BY_REFERENCE_FROM: usize = 16 * 1024;

thread_local! {
    /// Whether an `encode_rope` runs on this thread.
    static CAPTURING: Cell<bool> = const { Cell::new(false) };
    /// The blob whose bytes the encoder's flavor is about to be handed.
    static OFFERED: RefCell<Option<Blob>> = const { RefCell::new(None) };
    /// Where the offered blob's bytes are (address, length; 0 for none): the flavor's test
    /// on every write it is handed, cheaper than looking at `OFFERED`.
    static OFFERED_AT: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
    /// The buffer a `decode_shared` decodes from, while it runs (null otherwise): see
    /// [`sharing`]. Borrowed, not cloned: a clone and its drop are two atomic count updates
    /// on every decode, and most decodes (a driver's arguments, a reply) hold no blob.
    static SOURCE: Cell<*const Bytes> = const { Cell::new(std::ptr::null()) };
    /// The blobs of the rope a `decode_rope` decodes from.
    static ROPE_BLOBS: RefCell<Vec<Blob>> = const { RefCell::new(Vec::new()) };
}

/// Called by `Blob::serialize` before it hands its bytes to the serializer.
fn offer(blob: &Blob) {
    if blob.len() >= BY_REFERENCE_FROM && CAPTURING.with(Cell::get) {
        OFFERED_AT.with(|at| at.set((blob.as_ptr() as usize, blob.len())));
        OFFERED.with(|o| *o.borrow_mut() = Some(blob.clone()));
    }
}

/// Starts (or stops) taking offers on this thread; returns whether it was on.
pub(super) fn capture(on: bool) -> bool {
    CAPTURING.with(|c| c.replace(on))
}

/// Ends an encode: capturing as it `was`, and an offer no write took dropped (a blob
/// serialized through something that copied it).
pub(super) fn end_capture(was: bool) {
    CAPTURING.with(|c| c.set(was));
    if OFFERED_AT.with(|at| at.replace((0, 0))) != (0, 0) {
        OFFERED.with(|o| o.borrow_mut().take());
    }
}

/// The offered blob, if `data` is its very bytes (same address, same length).
pub(super) fn take_offered(data: &[u8]) -> Option<Blob> {
    if OFFERED_AT.with(Cell::get) != (data.as_ptr() as usize, data.len()) {
        return None;
    }
    OFFERED_AT.with(|at| at.set((0, 0)));
    OFFERED.with(|o| o.borrow_mut().take())
}

/// Restores a thread-local on drop (a panicking `Serialize` or `Deserialize` leaves
/// nothing behind).
pub(super) struct Restore<F: FnMut()>(pub(super) F);

impl<F: FnMut()> Drop for Restore<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

/// Runs `decode` with `source` as the buffer its blobs are sliced from; the source set
/// before is put back after it, also when it unwinds.
pub(super) fn sharing<R>(source: &Bytes, decode: impl FnOnce() -> R) -> R {
    let was = SOURCE.with(|s| s.replace(source));
    let _restore = Restore(move || SOURCE.with(|s| s.set(was)));
    decode()
}

/// Sets the blobs of the rope being decoded; returns the ones set before.
pub(super) fn share_rope_blobs(blobs: Vec<Blob>) -> Vec<Blob> {
    ROPE_BLOBS.with(|b| b.replace(blobs))
}

/// A slice of the buffer a `decode_shared` decodes, if `v` lies within it.
#[allow(unsafe_code)] // a thread-local borrow (see `SOURCE`), checked as the SAFETY note says
fn shared_slice(v: &[u8]) -> Option<Bytes> {
    let src = SOURCE.with(Cell::get);
    // SAFETY: `SOURCE` is not null only while a `sharing` call runs on this thread: it was
    // set from a reference that outlives that call, and the call's guard puts back the
    // value before (null, or the reference of the `sharing` call it is nested in, which
    // outlives it in turn) when it returns or unwinds. So a non-null pointer read here
    // points at a live `Bytes`, only read through a shared reference.
    let src = unsafe { src.as_ref() }?;
    let (start, end) = (src.as_ptr() as usize, src.as_ptr() as usize + src.len());
    let at = v.as_ptr() as usize;
    (at >= start && at + v.len() <= end && !v.is_empty()).then(|| src.slice_ref(v))
}

/// The rope's own blob whose bytes are exactly `v`, while a `decode_rope` runs.
fn rope_blob(v: &[u8]) -> Option<Blob> {
    ROPE_BLOBS.with(|b| {
        b.borrow()
            .iter()
            .find(|b| b.as_ptr() == v.as_ptr() && b.len() == v.len())
            .cloned()
    })
}
