//! Where an instance stands in the runner: [`Presence`] (being read, or resident) kept
//! in [`Instances`], and a resident one's [`Phase`] in the pipeline.

use std::collections::VecDeque;
use std::sync::Arc;

use foldhash::{HashMap, HashMapExt};

/// Where a resident instance stands in the runner's pipeline. Each carries the number of
/// the last batch that took a message for it (at most one message per instance a batch):
/// read against the runner's `round` (the batch being built) and `flight_round` (the one
/// being written), it says whether the instance is in the batch being built, in the one
/// being written, or committed — without a pass over the instances when a batch is sent.
/// An instance that is not resident is being read (`Presence::Loading`) or only stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Its last step is in batch `round` (being built, being written, or committed).
    Batched { round: u64 },
    /// Its last step's blobs are being written on a task of their own (it took its message
    /// for batch `round`); the step joins the batch being built when they land, and
    /// inputs that would write wait in the slot's `held` until then.
    Uploading { round: u64 },
}

impl Phase {
    /// The last batch that took a message for the instance.
    pub(super) fn round(self) -> u64 {
        match self {
            Phase::Batched { round } | Phase::Uploading { round } => round,
        }
    }

    pub(super) fn uploading(self) -> bool {
        matches!(self, Phase::Uploading { .. })
    }

    /// The same phase, having taken a message for batch `round` (a probe is taken while
    /// an upload runs: the instance stays uploading).
    pub(super) fn taken_for(self, round: u64) -> Phase {
        match self {
            Phase::Batched { .. } => Phase::Batched { round },
            Phase::Uploading { .. } => Phase::Uploading { round },
        }
    }
}

/// Where an instance the runner knows of stands: being read (its inputs wait, in order),
/// or resident (in memory, its slot with its [`Phase`]). An instance the runner does not
/// know of is only in the store.
pub(super) enum Presence<S, I> {
    /// Its record is being read off the runner's task (`Runner::fetch`); these inputs
    /// wait for it, in order.
    Loading(VecDeque<I>),
    /// In memory.
    Resident(S),
}

/// The instances the runner knows of, by id: `S` is a resident instance's slot, `I` an
/// input. The map methods (`get`, `insert`, `remove`, …) see the resident ones; the
/// `loading` ones see those being read.
pub(super) struct Instances<S, I> {
    map: HashMap<Arc<str>, Presence<S, I>>,
    /// How many are being read.
    loading: usize,
}

impl<S, I> Default for Instances<S, I> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
            loading: 0,
        }
    }
}

impl<S, I> Instances<S, I> {
    /// Whether the instance is resident.
    pub(super) fn contains_key(&self, id: &str) -> bool {
        matches!(self.map.get(id), Some(Presence::Resident(_)))
    }

    pub(super) fn get(&self, id: &str) -> Option<&S> {
        match self.map.get(id) {
            Some(Presence::Resident(s)) => Some(s),
            _ => None,
        }
    }

    pub(super) fn get_mut(&mut self, id: &str) -> Option<&mut S> {
        match self.map.get_mut(id) {
            Some(Presence::Resident(s)) => Some(s),
            _ => None,
        }
    }

    /// Makes the instance resident with `slot`. (An instance being read is never made
    /// resident but by the end of its read: every input for it waits behind the read.)
    pub(super) fn insert(&mut self, id: Arc<str>, slot: S) {
        if let Some(Presence::Loading(held)) = self.map.insert(id, Presence::Resident(slot)) {
            debug_assert!(
                held.is_empty(),
                "an instance was made resident over its read: the inputs waiting for it are lost"
            );
            self.loading -= 1;
        }
    }

    /// Takes a resident instance out of memory.
    pub(super) fn remove(&mut self, id: &str) -> Option<S> {
        match self.map.get(id) {
            Some(Presence::Resident(_)) => match self.map.remove(id) {
                Some(Presence::Resident(s)) => Some(s),
                _ => None,
            },
            _ => None,
        }
    }

    /// How many instances are resident.
    pub(super) fn len(&self) -> usize {
        self.map.len() - self.loading
    }

    /// The inputs waiting for the instance's read, if it is being read.
    pub(super) fn loading_mut(&mut self, id: &str) -> Option<&mut VecDeque<I>> {
        // Asked for every input taken: with no read under way (the steady state), the
        // answer needs no lookup.
        if self.loading == 0 {
            return None;
        }
        match self.map.get_mut(id) {
            Some(Presence::Loading(held)) => Some(held),
            _ => None,
        }
    }

    /// Marks the instance (not resident) as being read, `first` waiting for it.
    pub(super) fn start_loading(&mut self, id: Arc<str>, first: I) {
        let previous = self
            .map
            .insert(id, Presence::Loading(VecDeque::from([first])));
        debug_assert!(previous.is_none(), "only an instance unknown here is read");
        self.loading += 1;
    }

    /// Ends the instance's read: the inputs that waited for it, if it was being read.
    pub(super) fn end_loading(&mut self, id: &str) -> Option<VecDeque<I>> {
        match self.map.get(id) {
            Some(Presence::Loading(_)) => match self.map.remove(id) {
                Some(Presence::Loading(held)) => {
                    self.loading -= 1;
                    Some(held)
                }
                _ => None,
            },
            _ => None,
        }
    }

    /// How many instances are being read.
    pub(super) fn loading(&self) -> usize {
        self.loading
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::Instances;

    #[test]
    fn an_instance_being_read_is_not_resident_until_its_read_ends() {
        let mut all: Instances<&str, u32> = Instances::default();
        let id: Arc<str> = "a".into();
        all.start_loading(id.clone(), 1);
        all.loading_mut("a").unwrap().push_back(2);
        assert!(!all.contains_key("a") && all.get("a").is_none());
        assert_eq!((all.len(), all.loading()), (0, 1));
        assert_eq!(
            all.remove("a"),
            None,
            "removing a resident one leaves a read alone"
        );
        let held: Vec<u32> = all.end_loading("a").unwrap().into_iter().collect();
        assert_eq!(held, [1, 2], "its inputs come back in order");
        all.insert(id, "slot");
        assert_eq!((all.len(), all.loading()), (1, 0));
        assert_eq!(all.get("a"), Some(&"slot"));
        assert!(all.end_loading("a").is_none() && all.loading_mut("a").is_none());
        assert_eq!(all.remove("a"), Some("slot"));
        assert_eq!(all.len(), 0);
    }
}
