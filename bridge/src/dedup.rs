//! The duplicate window of a stream: which `Nats-Msg-Id`s were stored in the
//! last `duplicate_window`, and at which offset.
//!
//! Memory is bounded by `duplicate_ids_max`, not by how many distinct ids
//! arrive: ids are kept as 128-bit hashes and the oldest are forgotten first
//! when the window is full. The window survives restarts without a file of
//! its own: on start it is rebuilt from the log (the records of the last
//! `duplicate_window`, read through the time index), since the log is the
//! truth.

use crate::headers;
use natswal::{Reader, StartPosition};
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// What the window knows about an id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// Stored at this offset.
    Stored(u64),
    /// Accepted, waiting for durability; the ingest token of the first copy.
    Pending(u64),
}

#[derive(Debug)]
struct Entry {
    seen: Seen,
    at_ns: i64,
}

pub struct DuplicateWindow {
    window_ns: i64,
    capacity: usize,
    hash_keys: (std::hash::RandomState, std::hash::RandomState),
    entries: HashMap<u128, Entry>,
    order: VecDeque<(i64, u128)>,
}

impl std::fmt::Debug for DuplicateWindow {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("DuplicateWindow")
            .field("ids", &self.entries.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos() as i64)
        .unwrap_or(0)
}

impl DuplicateWindow {
    pub fn new(window: Duration, capacity: usize) -> DuplicateWindow {
        DuplicateWindow {
            window_ns: window.as_nanos().min(i64::MAX as u128) as i64,
            capacity: capacity.max(1),
            hash_keys: (std::hash::RandomState::new(), std::hash::RandomState::new()),
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn key(&self, id: &str) -> u128 {
        let mut first = self.hash_keys.0.build_hasher();
        first.write(id.as_bytes());
        let mut second = self.hash_keys.1.build_hasher();
        second.write(id.as_bytes());
        (u128::from(first.finish()) << 64) | u128::from(second.finish())
    }

    fn expire(&mut self, now_ns: i64) {
        while let Some(&(at_ns, key)) = self.order.front() {
            let expired = now_ns.saturating_sub(at_ns) > self.window_ns;
            if !expired && self.order.len() <= self.capacity {
                break;
            }
            self.order.pop_front();
            if self
                .entries
                .get(&key)
                .is_some_and(|entry| entry.at_ns == at_ns)
            {
                self.entries.remove(&key);
            }
        }
    }

    /// The earlier copy of `id` within the window, if any.
    pub fn check(&mut self, id: &str, now_ns: i64) -> Option<Seen> {
        self.expire(now_ns);
        let key = self.key(id);
        self.entries.get(&key).map(|entry| entry.seen)
    }

    /// Remembers `id` as seen now.
    pub fn insert(&mut self, id: &str, seen: Seen, now_ns: i64) {
        let key = self.key(id);
        self.entries.insert(
            key,
            Entry {
                seen,
                at_ns: now_ns,
            },
        );
        self.order.push_back((now_ns, key));
        self.expire(now_ns);
    }

    /// Remembers a stored record's `Nats-Msg-Id` (if it has one) at the
    /// record's time; a record already remembered at this offset is not
    /// counted twice. Returns whether the record had an id.
    pub fn remember_record(&mut self, record: &natswal::StoredRecord, now_ns: i64) -> bool {
        let Some(id) = headers::find(&record.headers, "Nats-Msg-Id") else {
            return false;
        };
        let key = self.key(id);
        let known = self
            .entries
            .get(&key)
            .is_some_and(|entry| entry.seen == Seen::Stored(record.offset));
        if !known {
            let id = id.to_string();
            self.insert(
                &id,
                Seen::Stored(record.offset),
                record.timestamp_ns.min(now_ns),
            );
        }
        true
    }

    /// The earliest record time the window still covers at `now_ns`.
    pub fn covers_since_ns(&self, now_ns: i64) -> i64 {
        now_ns.saturating_sub(self.window_ns)
    }

    /// The pending copy with ingest `token` was stored at `offset`.
    pub fn resolve(&mut self, id: &str, token: u64, offset: u64) {
        let key = self.key(id);
        if let Some(entry) = self.entries.get_mut(&key) {
            if entry.seen == Seen::Pending(token) {
                entry.seen = Seen::Stored(offset);
            }
        }
    }

    /// The pending copy with ingest `token` was not stored: forget it so a
    /// retry is not mistaken for a duplicate.
    pub fn forget(&mut self, id: &str, token: u64) {
        let key = self.key(id);
        if self
            .entries
            .get(&key)
            .is_some_and(|entry| entry.seen == Seen::Pending(token))
        {
            self.entries.remove(&key);
        }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Rebuilds the window from the records of the last `window`, read
    /// through `open` (a stream's reader, or a replica's of committed
    /// records).
    pub fn rebuild(
        &mut self,
        stream: &str,
        open: impl Fn(StartPosition) -> natswal::Result<Reader>,
        now_ns: i64,
    ) -> natswal::Result<u64> {
        let mut reader = open(StartPosition::Time(self.covers_since_ns(now_ns)))?;
        let mut loaded = 0u64;
        loop {
            let record = match reader.next() {
                Ok(Some(record)) => record,
                Ok(None) => return Ok(loaded),
                // Segments under a key that is no longer configured cannot
                // be read; their ids stay out of the window (a duplicate of
                // one of them would be stored again). Newer segments are
                // still read.
                Err(natswal::Error::KeyUnavailable {
                    path,
                    key_id,
                    resume_offset,
                }) => {
                    tracing::warn!(stream, segment = %path.display(), key_id, "duplicate window skips a segment whose key is not configured");
                    reader = open(StartPosition::Offset(resume_offset))?;
                    continue;
                }
                Err(error) => return Err(error),
            };
            if self.remember_record(&record, now_ns) {
                loaded += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_expires_by_time_and_capacity() {
        let mut window = DuplicateWindow::new(Duration::from_secs(10), 3);
        let second = 1_000_000_000i64;
        window.insert("a", Seen::Stored(1), 0);
        assert_eq!(window.check("a", 5 * second), Some(Seen::Stored(1)));
        assert_eq!(window.check("a", 11 * second), None, "expired by time");
        for (index, id) in ["b", "c", "d", "e"].iter().enumerate() {
            window.insert(id, Seen::Stored(index as u64), 20 * second);
        }
        assert_eq!(window.len(), 3, "memory bounded by capacity");
        assert_eq!(
            window.check("b", 20 * second),
            None,
            "oldest forgotten first"
        );
        assert_eq!(window.check("e", 20 * second), Some(Seen::Stored(3)));
    }

    #[test]
    fn pending_resolves_or_is_forgotten() {
        let mut window = DuplicateWindow::new(Duration::from_secs(10), 10);
        window.insert("x", Seen::Pending(7), 0);
        window.resolve("x", 7, 42);
        assert_eq!(window.check("x", 1), Some(Seen::Stored(42)));
        window.insert("y", Seen::Pending(8), 0);
        window.forget("y", 8);
        assert_eq!(window.check("y", 1), None);
    }
}
