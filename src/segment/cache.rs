//! SegmentCache: bounds how many sealed segments are mapped at once, across
//! all streams of a store. A sealed segment is mapped on first read and
//! unmapped (with its loaded index) when it is the least recently used one
//! beyond the capacity. File descriptors are closed right after mapping, so
//! open files do not grow with the number of segments either.

use super::storage::StorageSegment;
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
            .field("mapped", &self.mapped_count())
            .finish()
    }
}

impl SegmentCache {
    /// A cache that keeps at most `capacity` (at least 1) sealed segments mapped.
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

    /// Sealed segments mapped right now.
    pub fn mapped_count(&self) -> usize {
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .filter(|entry| entry.upgrade().is_some_and(|segment| segment.is_mapped()))
            .count()
    }

    pub(crate) fn touch(&self, segment: &StorageSegment) {
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        segment.last_used_tick.store(tick, Ordering::Relaxed);
    }

    /// Records a newly mapped segment and unmaps the least recently used
    /// ones beyond the capacity.
    pub(crate) fn insert(&self, segment: &Arc<StorageSegment>) {
        self.touch(segment);
        let mut entries = self
            .entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.retain(|entry| entry.upgrade().is_some_and(|live| live.is_mapped()));
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
            victim.release();
        }
    }
}
