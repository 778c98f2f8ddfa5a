//! Rebuilding an instance from its stored record under the flow version this engine runs:
//! a record of an older version the flow's migrations reach back to is migrated (through
//! each of them, one version at a time), one of any other version is parked with a reason
//! naming both, never run on code it was not written for.

use flowwire_storage::record::Draft;
use flowwire_storage::{CodecError, Expect, InstanceKey, Record, Status, StepInput, StepOutput};
use flowwire_storage::{codec, rope};

use crate::ended::Ended;
use crate::flow::Flow;
use crate::guard::guard;

use super::{Awaiting, Dispatches, Instance, Scratch, Step};

impl<F: Flow> Instance<F> {
    /// Rebuilds an instance from its stored record (after a restart).
    ///
    /// Returns a parking step when the record was written by another flow version: the
    /// instance must not run on code it was not written for.
    pub fn recover(
        key: InstanceKey,
        mut record: Record,
        version: u64,
        limit: usize,
        now_ms: u64,
        scratch: &mut Scratch,
    ) -> Result<(Self, Option<Step>), CodecError> {
        scratch.now_ms = now_ms;
        let written = record.flow_version;
        let upgrade =
            written < F::VERSION && written >= F::MIGRATES_FROM && !record.status.is_terminal();
        let mut failed_migration = None;
        let state: F::State = if upgrade {
            match guard(|| F::migrate(&record.state, written, limit)) {
                Ok(Some(migrated)) => {
                    let state = migrated?;
                    // The migrated state is the committed one from now on (the next step
                    // persists it with this version).
                    scratch.state.clear();
                    codec::encode_raw(&state, &mut scratch.state)?;
                    record.state = scratch.arena.take(&mut scratch.state);
                    record.flow_version = F::VERSION;
                    state
                }
                Ok(None) => rope::codec::decode_shared(&record.state, limit)?,
                Err(message) => {
                    // A state the new type reads as it is can still be parked (and patched).
                    let Ok(state) = codec::decode_raw(&record.state, limit) else {
                        return Err(CodecError::Malformed(format!(
                            "the migration from version {written} panicked: {message}"
                        )));
                    };
                    failed_migration = Some(message);
                    state
                }
            }
        } else {
            // Large blobs in the state share the buffer it was read into.
            rope::codec::decode_shared(&record.state, limit)?
        };
        let mut inst = Self {
            key,
            flow: F::from_state(state),
            version,
            record: record.live(),
            awaiting: Awaiting::Nothing,
            registered: None,
            delivered: None,
            limit,
        };
        if inst.record.flow_version != F::VERSION && inst.record.status.is_active() {
            let reason = match failed_migration {
                Some(message) => format!(
                    "the instance was written by {} version {written}; this engine runs version {}, and its migration from version {written} panicked: {message}",
                    F::NAME,
                    F::VERSION
                ),
                None if F::MIGRATES_FROM < F::VERSION => format!(
                    "the instance was written by {} version {written}; this engine runs version {}, which migrates only from {}",
                    F::NAME,
                    F::VERSION,
                    reach::<F>()
                ),
                None => format!(
                    "the instance was written by {} version {written}, this engine runs version {} (it declares no migration)",
                    F::NAME,
                    F::VERSION
                ),
            };
            let step = inst.park(StepInput::Park, reason, scratch);
            return Ok((inst, Some(step)));
        }
        Ok((inst, None))
    }

    /// The step that parks an instance written by another flow version whose state does
    /// not decode as this version's (so no instance can be built around it): the record
    /// as it was, quarantined with a reason naming both versions.
    pub fn park_unreadable(
        key: InstanceKey,
        record: &Record,
        version: u64,
        detail: &CodecError,
        now_ms: u64,
    ) -> Step {
        let written = record.flow_version;
        let migrates = F::MIGRATES_FROM < F::VERSION;
        let path = if migrates && written < F::VERSION && written >= F::MIGRATES_FROM {
            "its migration failed".to_string()
        } else if migrates {
            format!("it migrates only from {}", reach::<F>())
        } else {
            "it declares no migration".to_string()
        };
        let reason = format!(
            "the instance was written by {} version {written}; this engine runs version {} ({path}), and the state does not decode as this version's: {detail}",
            F::NAME,
            F::VERSION
        );
        let mut parked = record.clone().live();
        parked.seq += 1;
        parked.timer = None;
        parked.status = Status::Quarantined {
            reason: reason.clone(),
        };
        Step {
            draft: Draft {
                key,
                expect: Expect::Version(version),
                version: version + 1,
                record: parked,
                impulse: None,
                input: StepInput::Park,
                output: StepOutput::Quarantine { reason },
                payload: None,
                at_ms: now_ms,
            },
            dispatch: Dispatches::new(),
        }
    }
}

/// The versions a flow's migrations reach back to, for messages: `version 2` or
/// `versions 1 to 3`.
fn reach<F: Flow>() -> String {
    let last = F::VERSION.saturating_sub(1);
    if F::MIGRATES_FROM >= last {
        format!("version {last}")
    } else {
        format!("versions {} to {last}", F::MIGRATES_FROM)
    }
}

/// Why a stored state cannot be read as this flow version's.
#[derive(Debug)]
pub enum StateRead {
    /// A newer version of the flow wrote it.
    Newer {
        /// That version.
        written: u32,
    },
    /// An older version wrote it, and no migration of this version reaches back to it.
    Unreachable {
        /// That version.
        written: u32,
    },
    /// It does not decode, or its migration failed (the message says which).
    Codec(CodecError),
}

/// The state of a stored record as this flow version reads it, for reads that do not load
/// the instance (an ended or parked one's, or a client's in another process): the bytes as
/// they are when this version wrote them, upgraded through the flow's migrations when an
/// older version it reaches back to did; refused otherwise, so that no state is ever decoded
/// as another version's type.
pub fn state_for_read<F: Flow>(record: &Record, limit: usize) -> Result<bytes::Bytes, StateRead> {
    let written = record.flow_version;
    if written == F::VERSION {
        return Ok(record.state.clone());
    }
    if written > F::VERSION {
        return Err(StateRead::Newer { written });
    }
    if written < F::MIGRATES_FROM {
        return Err(StateRead::Unreachable { written });
    }
    let migrated = guard(|| F::migrate(&record.state, written, limit))
        .map_err(|panic| {
            StateRead::Codec(CodecError::Malformed(format!(
                "the migration from version {written} panicked: {panic}"
            )))
        })?
        .ok_or(StateRead::Unreachable { written })?
        .map_err(StateRead::Codec)?;
    let mut out = Vec::new();
    codec::encode_raw(&migrated, &mut out).map_err(StateRead::Codec)?;
    Ok(bytes::Bytes::from(out))
}

/// The final state of instance `id`, which ended as `ended`, from the record its end was
/// read in, as this version of `F` reads it: handed back with the end, so that whoever
/// waited reads the result without another trip. `None` when the end is not final (see
/// [`Ended::state_is_final`]) or the state cannot be read here (the reader then goes to the
/// store, which says why).
pub(crate) fn final_state<F: Flow>(
    id: &str,
    ended: &Ended,
    record: &Record,
    limit: usize,
) -> Option<rope::Rope> {
    if !ended.state_is_final() {
        return None;
    }
    match state_for_read::<F>(record, limit) {
        Ok(state) => Some(rope::Rope::from(state)),
        Err(e) => {
            tracing::debug!(flow = F::NAME, %id, error = ?e, "final state not handed back with the end");
            None
        }
    }
}

/// A state written by version `written` of flow `F` (a child's initial state, as its
/// parent encoded it), decoded as this version's: upgraded through the flow's migrations
/// when an older version wrote it, refused when a newer one did or no migration reaches it.
pub(crate) fn decode_written<F: Flow>(
    state: &[u8],
    written: u32,
    limit: usize,
) -> Result<F::State, StateRead> {
    if written == F::VERSION {
        return codec::decode_raw(state, limit).map_err(StateRead::Codec);
    }
    if written > F::VERSION {
        return Err(StateRead::Newer { written });
    }
    if written < F::MIGRATES_FROM {
        return Err(StateRead::Unreachable { written });
    }
    guard(|| F::migrate(state, written, limit))
        .map_err(|panic| {
            StateRead::Codec(CodecError::Malformed(format!(
                "the migration from version {written} panicked: {panic}"
            )))
        })?
        .ok_or(StateRead::Unreachable { written })?
        .map_err(StateRead::Codec)
}
