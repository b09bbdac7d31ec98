//! SegmentCache: bounds how many sealed segments hold an open file handle
//! (and a loaded index) at once, across all streams of a store. A sealed
//! segment opens its file on first read; the least recently used one beyond
//! the capacity closes it again. Active segments read through their
//! writer's handle and are not counted.

use super::segment::StorageSegment;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

pub struct SegmentCache {
    capacity: usize,
    tick: AtomicU64,
    entries: Mutex<Vec<Weak<StorageSegment>>>,
}

impl std::fmt::Debug for SegmentCache {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SegmentCache")
            .field("capacity", &self.capacity)
            .field("open", &self.open_count())
            .finish()
    }
}

impl SegmentCache {
    /// A cache that keeps at most `capacity` (at least 1) sealed segments open.
    pub fn new(capacity: usize) -> SegmentCache {
        SegmentCache {
            capacity: capacity.max(1),
            tick: AtomicU64::new(1),
            entries: Mutex::new(Vec::new()),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Sealed segments with an open file handle right now.
    pub fn open_count(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .filter(|entry| entry.upgrade().is_some_and(|segment| segment.is_open()))
            .count()
    }

    pub(crate) fn touch(&self, segment: &StorageSegment) {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        segment.last_used_tick.store(tick, Ordering::Relaxed);
    }

    /// Records a newly opened segment and closes the least recently used
    /// ones beyond the capacity.
    pub(crate) fn insert(&self, segment: &Arc<StorageSegment>) {
        self.touch(segment);
        let mut victims = Vec::new();
        {
            let mut entries = self
                .entries
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            entries.retain(|entry| entry.upgrade().is_some_and(|live| live.is_open()));
            if !entries
                .iter()
                .any(|entry| std::ptr::eq(entry.as_ptr(), Arc::as_ptr(segment)))
            {
                entries.push(Arc::downgrade(segment));
            }
            while entries.len() > self.capacity {
                let victim = entries
                    .iter()
                    .enumerate()
                    .filter_map(|(index, entry)| entry.upgrade().map(|live| (index, live)))
                    .filter(|(_, live)| !Arc::ptr_eq(live, segment))
                    .min_by_key(|(_, live)| live.last_used_tick.load(Ordering::Relaxed));
                let Some((index, victim)) = victim else { break };
                entries.swap_remove(index);
                victims.push(victim);
            }
        }
        // Closing takes the segment's own lock: never while holding ours.
        for victim in victims {
            victim.close_handle();
        }
    }
}
