//! Timers: the window of the store's timer index the runner holds, firing what is due,
//! and repairing index entries that no longer match their records.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::flow::Flow;

use super::{Input, LOOKAHEAD_MS, Runner, TIMER_PAGE};

impl<F: Flow> Runner<F> {
    /// When the timer service needs the runner next: the earliest timer held, or the end of
    /// the window read from the index (to read the next one).
    pub(super) fn next_timer(&self) -> u64 {
        let first = self.timers.first().map_or(u64::MAX, |(due, _)| *due);
        first.min(self.horizon.saturating_add(1))
    }

    /// Moves the timers due by now into the backlog, and reads the next window of the
    /// timer index when this one has run out. Bounded: one page per call.
    pub(super) async fn tick(&mut self, backlog: &mut VecDeque<Input<F>>) {
        let now = self.limits.clock.now_ms();
        while let Some((due, _)) = self.timers.first() {
            if *due > now {
                break;
            }
            let Some((due_ms, id)) = self.timers.pop_first() else {
                break;
            };
            backlog.push_back(Input::Fire { id, due_ms });
        }
        if now <= self.horizon {
            return;
        }
        let until = now.saturating_add(LOOKAHEAD_MS);
        let limit = self.limits.store_timeout;
        let due = match &self.owned {
            Some(o) => self.store.due_in(F::NAME, o.shard, until, TIMER_PAGE),
            None => self.store.due(F::NAME, until, TIMER_PAGE),
        };
        let listed = tokio::time::timeout(limit, due).await;
        match listed {
            Ok(Ok(page)) => {
                let full = page.len() >= TIMER_PAGE;
                let last = page.last().map(|(_, due)| *due);
                for (id, due) in page {
                    self.timers.insert((due, id));
                }
                // A full page may have left out timers due at its last time: the next window
                // starts there (the set drops duplicates).
                self.horizon = match (full, last) {
                    (true, Some(last)) => last.saturating_sub(1).max(now),
                    _ => until,
                };
            }
            Ok(Err(e)) => {
                tracing::warn!(flow = F::NAME, error = %e, "timer index not readable; trying again in 1 s");
                self.horizon = now.saturating_add(1_000);
            }
            Err(_) => {
                tracing::warn!(
                    flow = F::NAME,
                    "timer index read timed out; trying again in 1 s"
                );
                self.horizon = now.saturating_add(1_000);
            }
        }
    }

    /// Repairs a timer index entry that does not match its record, off the runner's path.
    pub(super) fn retime(&self, id: &Arc<str>, stale: u64, actual: Option<u64>) {
        let store = self.store.clone();
        let key = self.key(id);
        let limit = self.limits.store_timeout;
        tokio::spawn(async move {
            match tokio::time::timeout(limit, store.retime(&key, stale, actual)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(instance = %key, error = %e, "stale timer entry not repaired");
                }
                Err(_) => tracing::warn!(instance = %key, "stale timer entry not repaired in time"),
            }
        });
    }
}
