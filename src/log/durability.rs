//! DurabilityGate: the one owner of every sync of a log's files, and its
//! durable watermark.
//!
//! Linux reports a writeback error once per open file: whichever caller's
//! sync sees an EIO, the next sync of that file may return success for data
//! that never reached the disk (fsyncgate). So every sync of a segment
//! (group commit, rotation, sealing, truncation, a new segment's header)
//! runs here, under one mutex, and a failure poisons the log *before* the
//! mutex is released: no later sync, by any path, can advance the durable
//! watermark, and nothing written after the last successful sync is ever
//! acknowledged. A failed sync is never retried.
//!
//! The watermark counts written frames (a sequence number per frame). A
//! sync captures the sequence and position written so far, syncs, and on
//! success publishes every frame up to it to readers and waiters. A group
//! sync ([`super::group_sync`]) captures here, holds the sync lock while
//! another thread syncs the whole file system, and publishes or poisons
//! here when that thread reports (the lock is then a flag, not a guard, as
//! it is released on another thread).

use super::index::SegmentProgress;
use super::segment::StorageSegment;
use crate::error::{Error, Result};
use crate::format::metadata::LogId;
use crate::io::{File, FileSystem};
use crate::lock;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use tokio::sync::watch;

/// What is durable (or, for [`written`](DurabilityGate::written), written).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DurablePoint {
    /// Frames written since the log was opened, up to this point.
    pub sequence: u64,
    /// Offset the next record gets after this point.
    pub next_offset: u64,
    /// Raft id of the last frame up to this point (zero standalone).
    pub last_log_id: LogId,
}

/// A frame written but maybe not yet durable.
struct Mark {
    segment: Arc<StorageSegment>,
    progress: SegmentProgress,
}

struct Active {
    segment: Arc<StorageSegment>,
    file: Arc<dyn File>,
}

struct GateState {
    poisoned: Option<String>,
    active: Option<Active>,
    written: DurablePoint,
    /// End of the frames written to the active segment.
    written_end: u64,
    durable: DurablePoint,
    marks: VecDeque<Mark>,
}

/// Held across every sync of the log's files. A group sync holds it from
/// its capture until the group's thread reports, across threads, so it is
/// a flag and a condition variable rather than a mutex guard.
#[derive(Default)]
struct SyncLock {
    held: Mutex<bool>,
    released: Condvar,
}

struct SyncGuard<'a>(&'a SyncLock);

impl SyncLock {
    fn acquire(&self) -> SyncGuard<'_> {
        let mut held = lock(&self.held);
        while *held {
            held = self
                .released
                .wait(held)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        *held = true;
        SyncGuard(self)
    }

    fn release(&self) {
        *lock(&self.held) = false;
        self.released.notify_all();
    }
}

impl SyncGuard<'_> {
    /// Keeps the lock held after the guard is gone: the caller releases it
    /// with [`SyncLock::release`].
    fn detach(self) {
        std::mem::forget(self);
    }
}

impl Drop for SyncGuard<'_> {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// What a sync covers: captured under the sync lock, published after it.
pub(crate) struct Capture {
    file: Arc<dyn File>,
    start: u64,
    end: u64,
    target: DurablePoint,
    marks: Vec<Mark>,
}

impl Capture {
    /// The file whose writes the sync is to cover.
    pub fn file(&self) -> &Arc<dyn File> {
        &self.file
    }

    /// The range of the file written since its last sync.
    pub fn range(&self) -> (u64, u64) {
        (self.start, self.end)
    }
}

pub(crate) struct DurabilityGate {
    name: String,
    sync_lock: SyncLock,
    state: Mutex<GateState>,
    durable_watch: watch::Sender<DurablePoint>,
}

impl DurabilityGate {
    pub fn new(name: &str, recovered: DurablePoint) -> DurabilityGate {
        let (durable_watch, _) = watch::channel(recovered);
        DurabilityGate {
            name: name.to_string(),
            sync_lock: SyncLock::default(),
            state: Mutex::new(GateState {
                poisoned: None,
                active: None,
                written: recovered,
                written_end: 0,
                durable: recovered,
                marks: VecDeque::new(),
            }),
            durable_watch,
        }
    }

    pub fn poison_cause(&self) -> Option<String> {
        lock(&self.state).poisoned.clone()
    }

    pub fn is_poisoned(&self) -> bool {
        lock(&self.state).poisoned.is_some()
    }

    pub fn poisoned_error(&self) -> Error {
        Error::Poisoned {
            stream: self.name.clone(),
            cause: self.poison_cause().unwrap_or_else(|| "unknown".to_string()),
        }
    }

    fn check(&self) -> Result<()> {
        if self.is_poisoned() {
            return Err(self.poisoned_error());
        }
        Ok(())
    }

    /// Makes the log read-only for good: a sync failed.
    pub fn poison(&self, cause: &Error) {
        let mut state = lock(&self.state);
        if state.poisoned.is_none() {
            tracing::error!(stream = %self.name, error = %cause, "a sync failed: the stream is now read-only; nothing written after the last successful sync is acknowledged");
            state.poisoned = Some(cause.to_string());
        }
        drop(state);
        // Wake the waiters so they see the poison.
        self.durable_watch.send_modify(|_| {});
    }

    /// Makes `segment` (with the writer's `file`) the one new frames go to.
    pub fn set_active(&self, segment: Arc<StorageSegment>, file: Arc<dyn File>, end: u64) {
        let mut state = lock(&self.state);
        state.active = Some(Active { segment, file });
        state.written_end = end;
    }

    /// No active segment (after a truncation removed it).
    pub fn clear_active(&self) {
        lock(&self.state).active = None;
    }

    /// Records a frame the writer wrote to the active segment. Marks of one
    /// segment that no sync has captured yet collapse into the newest (its
    /// progress covers theirs), so at most one per segment waits.
    pub fn record_write(
        &self,
        point: DurablePoint,
        segment: &Arc<StorageSegment>,
        progress: SegmentProgress,
    ) {
        let mut state = lock(&self.state);
        state.written = point;
        state.written_end = progress.length;
        let mark = Mark {
            segment: Arc::clone(segment),
            progress,
        };
        match state.marks.back_mut() {
            Some(last) if Arc::ptr_eq(&last.segment, segment) => *last = mark,
            _ => state.marks.push_back(mark),
        }
    }

    pub fn written(&self) -> DurablePoint {
        lock(&self.state).written
    }

    pub fn durable(&self) -> DurablePoint {
        lock(&self.state).durable
    }

    pub fn subscribe(&self) -> watch::Receiver<DurablePoint> {
        self.durable_watch.subscribe()
    }

    /// Syncs every frame written so far (group commit) and publishes it.
    /// Returns the durable point. After a failure, every call fails.
    pub fn sync(&self) -> Result<DurablePoint> {
        let _sync = self.sync_lock.acquire();
        let capture = match self.capture()? {
            Ok(capture) => capture,
            Err(durable) => return Ok(durable),
        };
        let result = capture.file.sync_range(capture.start, capture.end);
        self.settle(capture, result)
    }

    /// Begins a sync that another thread runs ([`GroupSync`]): captures
    /// what is written and holds the sync lock until
    /// [`finish_group_sync`](Self::finish_group_sync). `Ok(Err(point))`:
    /// nothing to sync, all of it durable at `point`.
    ///
    /// [`GroupSync`]: super::group_sync::GroupSync
    pub fn begin_group_sync(&self) -> Result<std::result::Result<Capture, DurablePoint>> {
        let sync = self.sync_lock.acquire();
        let capture = self.capture()?;
        if capture.is_ok() {
            sync.detach();
        }
        Ok(capture)
    }

    /// Ends a sync begun by [`begin_group_sync`](Self::begin_group_sync)
    /// with the outcome of the sync that covered it; releases the lock.
    pub fn finish_group_sync(&self, capture: Capture, result: Result<()>) -> Result<DurablePoint> {
        let outcome = self.settle(capture, result);
        self.sync_lock.release();
        outcome
    }

    /// Under the sync lock: what a sync now covers, or the durable point if
    /// everything written is durable already.
    fn capture(&self) -> Result<std::result::Result<Capture, DurablePoint>> {
        let mut state = lock(&self.state);
        if state.poisoned.is_some() {
            drop(state);
            return Err(self.poisoned_error());
        }
        if state.written.sequence <= state.durable.sequence {
            return Ok(Err(state.durable));
        }
        let Some(active) = &state.active else {
            return Ok(Err(state.durable));
        };
        let file = Arc::clone(&active.file);
        let start = active.segment.durable_length().min(state.written_end);
        let marks: Vec<Mark> = state.marks.drain(..).collect();
        Ok(Ok(Capture {
            file,
            start,
            end: state.written_end,
            target: state.written,
            marks,
        }))
    }

    /// Under the sync lock, after the sync of `capture`: publishes it, or
    /// poisons the log.
    fn settle(&self, capture: Capture, result: Result<()>) -> Result<DurablePoint> {
        if let Err(error) = result {
            self.poison(&error);
            return Err(self.poisoned_error());
        }
        lock(&self.state).durable = capture.target;
        for mark in &capture.marks {
            mark.segment.set_durable_progress(mark.progress);
            mark.segment.publish(mark.progress);
        }
        self.durable_watch.send_replace(capture.target);
        Ok(capture.target)
    }

    /// Syncs one of the log's files through the gate (a new segment's
    /// header, a sealed segment's cut, a truncation): a failure poisons.
    pub fn sync_file(&self, file: &dyn File, all: bool, start: u64, end: u64) -> Result<()> {
        let _sync = self.sync_lock.acquire();
        self.check()?;
        let result = if all {
            file.sync_all()
        } else {
            file.sync_range(start, end)
        };
        if let Err(error) = result {
            self.poison(&error);
            return Err(self.poisoned_error());
        }
        Ok(())
    }

    /// Syncs a directory of the log: a new, renamed or removed entry is not
    /// durable otherwise. A failure poisons (acknowledging frames in a file
    /// whose entry may vanish would lose them).
    pub fn sync_directory(&self, file_system: &dyn FileSystem, directory: &Path) -> Result<()> {
        let _sync = self.sync_lock.acquire();
        self.check()?;
        if let Err(error) = file_system.sync_directory(directory) {
            self.poison(&error);
            return Err(self.poisoned_error());
        }
        Ok(())
    }

    /// After a truncation: what is written and durable is the cut log.
    pub fn reset(&self, point: DurablePoint, end: u64) {
        let mut state = lock(&self.state);
        state.marks.clear();
        state.written = DurablePoint {
            sequence: state.written.sequence,
            ..point
        };
        state.durable = DurablePoint {
            sequence: state.written.sequence,
            ..point
        };
        state.written_end = end;
        let durable = state.durable;
        drop(state);
        self.durable_watch.send_replace(durable);
    }

    /// Publishes written frames to readers without making them durable
    /// (durability `none` and `interval`: readers see what is written).
    pub fn publish_written(&self) {
        let state = lock(&self.state);
        for mark in &state.marks {
            mark.segment.publish(mark.progress);
        }
    }
}
