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
//! success publishes every frame up to it to readers and waiters.

use super::index::SegmentProgress;
use super::segment::StorageSegment;
use crate::error::{Error, Result};
use crate::format::metadata::LogId;
use crate::io::{File, FileSystem};
use crate::lock;
use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};
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

pub(crate) struct DurabilityGate {
    name: String,
    /// Held across every sync system call of the log's files.
    sync_lock: Mutex<()>,
    state: Mutex<GateState>,
    durable_watch: watch::Sender<DurablePoint>,
}

impl DurabilityGate {
    pub fn new(name: &str, recovered: DurablePoint) -> DurabilityGate {
        let (durable_watch, _) = watch::channel(recovered);
        DurabilityGate {
            name: name.to_string(),
            sync_lock: Mutex::new(()),
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
        let _sync = lock(&self.sync_lock);
        let (file, start, end, target, captured) = {
            let mut state = lock(&self.state);
            if state.poisoned.is_some() {
                drop(state);
                return Err(self.poisoned_error());
            }
            if state.written.sequence <= state.durable.sequence {
                return Ok(state.durable);
            }
            let Some(active) = &state.active else {
                return Ok(state.durable);
            };
            let file = Arc::clone(&active.file);
            let start = active.segment.durable_length().min(state.written_end);
            let captured: Vec<Mark> = state.marks.drain(..).collect();
            (file, start, state.written_end, state.written, captured)
        };
        if let Err(error) = file.sync_range(start, end) {
            self.poison(&error);
            return Err(self.poisoned_error());
        }
        lock(&self.state).durable = target;
        for mark in &captured {
            mark.segment.set_durable_progress(mark.progress);
            mark.segment.publish(mark.progress);
        }
        self.durable_watch.send_replace(target);
        Ok(target)
    }

    /// Syncs one of the log's files through the gate (a new segment's
    /// header, a sealed segment's cut, a truncation): a failure poisons.
    pub fn sync_file(&self, file: &dyn File, all: bool, start: u64, end: u64) -> Result<()> {
        let _sync = lock(&self.sync_lock);
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
        let _sync = lock(&self.sync_lock);
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
