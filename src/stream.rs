//! Stream: one log with its BatchCoordinator, driven by an
//! [`IoPool`](crate::pool::IoPool) (shared by many streams, or two threads
//! of its own) or, for the simulator, by its caller. The handle appends
//! through the coordinator and creates readers; closing drains the queue,
//! syncs, seals and checkpoints.
//!
//! Under a pool a stream is a [`Job`] with two lanes: the write lane takes
//! one write step per turn (and the maintenance when due: age rotation,
//! seals, checkpoints, retention), the sync lane one group commit per turn.
//! An idle stream is in no queue and holds no thread; its write lane has a
//! timer for the next maintenance.

use crate::config::StreamConfig;
use crate::coordinator::{
    AppendOutcome, AppendRequest, BatchCoordinator, Completion, SyncStep, WriteStep,
};
use crate::error::{Error, Result};
use crate::format::record::Record;
use crate::io::FileSystem;
use crate::lock;
use crate::log::cache::SegmentCache;
use crate::log::recovery::{RecoveryMode, RecoveryReport};
use crate::log::{Log, LogOptions, SealedSegment};
use crate::metrics::StreamMetrics;
use crate::pool::{IoPool, Job, Lane, LaneStates, Outcome};
use crate::reader::{Reader, StartPosition};
use crate::retention::RetentionDeletion;
use crate::subject::SubjectPattern;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// Called for every segment retention removes.
pub type RetentionHook = Arc<dyn Fn(&RetentionDeletion) + Send + Sync>;

/// Offset of a new stream's first record. Offsets start at 1, like
/// JetStream sequences, so that 0 can mean "none" (an empty stream's last
/// offset, `Nats-Expected-Last-Sequence: 0`).
pub const FIRST_OFFSET: u64 = 1;

/// Callbacks for events other layers record (audit log, metrics).
#[derive(Clone, Default)]
pub struct StreamHooks {
    pub on_retention: Option<RetentionHook>,
    /// Called when an open switches new segments to another key:
    /// `(stream, old key id, new key id)`; 0 means no encryption.
    pub on_key_rotation: Option<KeyRotationHook>,
}

/// See [`StreamHooks::on_key_rotation`].
pub type KeyRotationHook = Arc<dyn Fn(&str, u32, u32) + Send + Sync>;

impl std::fmt::Debug for StreamHooks {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("StreamHooks")
            .field("on_retention", &self.on_retention.is_some())
            .finish()
    }
}

/// Who runs a stream's write and sync steps.
#[derive(Debug, Clone, Default)]
pub enum Driver {
    /// A pool of two threads of its own (one writing while the other
    /// syncs).
    #[default]
    Threads,
    /// A pool shared with other streams: the stream costs no thread.
    Pool(Arc<IoPool>),
    /// The caller, through [`Stream::step_write`], [`Stream::step_sync`]
    /// and [`Stream::step_maintenance`] (the deterministic simulator).
    Manual,
}

/// A snapshot of a stream's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStatus {
    pub name: String,
    /// Offset of the oldest stored record (equal to `next_offset` if empty).
    pub first_offset: u64,
    /// Offset the next appended record gets (of what is visible).
    pub next_offset: u64,
    pub records: u64,
    pub bytes: u64,
    pub segments: usize,
    pub first_timestamp_ns: Option<i64>,
    pub last_timestamp_ns: Option<i64>,
    /// Set when a failed sync made the stream read-only.
    pub poisoned: Option<String>,
    /// Set while appends fail and the stream stays writable (a full disk):
    /// the latest cause. Cleared by the next append that succeeds.
    pub append_failure: Option<String>,
}

/// How to open a stream.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    pub config: StreamConfig,
    pub recovery_mode: RecoveryMode,
    pub hooks: StreamHooks,
    /// Keys for encrypted segments, old and current.
    pub keyring: Arc<crate::codec::Keyring>,
    /// The node whose nonces new frames carry (0 standalone).
    pub node_id: u16,
    pub driver: Driver,
    /// Set by [`Store`](crate::store::Store), which holds the lock of the
    /// directory its streams live in; `None` locks the stream directory.
    pub store_locked: Option<crate::io::StoreLocked>,
    /// Set by a store whose file system holds the stream: its syncs join
    /// the store's group sync (see [`crate::log::group_sync`]).
    pub group_sync: Option<Arc<crate::log::group_sync::GroupSync>>,
}

impl Default for StreamOptions {
    fn default() -> Self {
        StreamOptions {
            config: StreamConfig::default(),
            recovery_mode: RecoveryMode::Strict,
            hooks: StreamHooks::default(),
            keyring: Arc::new(crate::codec::Keyring::default()),
            node_id: 0,
            driver: Driver::Threads,
            store_locked: None,
            group_sync: None,
        }
    }
}

struct StreamInner {
    name: String,
    log: Log,
    coordinator: BatchCoordinator,
    metrics: Arc<StreamMetrics>,
    hooks: StreamHooks,
    /// Scheduling state in the pool.
    lanes: LaneStates,
    /// When the write lane last ran the maintenance.
    last_maintenance: Mutex<Instant>,
    /// Held by a turn of each lane; closing takes both, so no turn runs
    /// while the log closes.
    write_turn: Mutex<()>,
    sync_turn: Mutex<()>,
    /// Set once closing has drained everything: later turns do nothing.
    stopped: AtomicBool,
    /// Set by the sync lane when everything written is durable and the
    /// writer has finished.
    finished: Mutex<bool>,
    finished_signal: Condvar,
}

impl Job for StreamInner {
    fn run(&self, lane: Lane) -> Outcome {
        match lane {
            Lane::Write => self.write_turn(),
            Lane::Sync => self.sync_turn(),
        }
    }

    fn lanes(&self) -> &LaneStates {
        &self.lanes
    }
}

impl StreamInner {
    /// One turn of the write lane: the maintenance when due, then one
    /// write step.
    fn write_turn(&self) -> Outcome {
        let _turn = lock(&self.write_turn);
        if self.stopped.load(Ordering::Acquire) {
            return Outcome::default();
        }
        let interval = Duration::from_millis(self.log.config().maintenance_interval_ms);
        let next_maintenance = {
            let mut last = lock(&self.last_maintenance);
            if last.elapsed() >= interval {
                self.maintenance(crate::log::writer::now_ns());
                *last = Instant::now();
            }
            *last + interval
        };
        match self
            .coordinator
            .write_step(&self.log, crate::log::writer::now_ns())
        {
            WriteStep::Wrote => Outcome {
                again: true,
                timer: None,
            },
            // The sync that frees space wakes the lane.
            WriteStep::Blocked => Outcome {
                again: false,
                timer: Some(next_maintenance),
            },
            WriteStep::Idle if self.coordinator.drained() => {
                self.coordinator.finish_writes();
                Outcome::default()
            }
            WriteStep::Idle => Outcome {
                again: false,
                timer: Some(next_maintenance),
            },
        }
    }

    /// One turn of the sync lane: one group commit.
    fn sync_turn(&self) -> Outcome {
        let _turn = lock(&self.sync_turn);
        if self.stopped.load(Ordering::Acquire) {
            return Outcome::default();
        }
        match self.coordinator.sync_step(&self.log) {
            SyncStep::Synced => Outcome {
                again: true,
                timer: None,
            },
            // The group sync's end wakes the lane.
            SyncStep::Waiting => Outcome::default(),
            SyncStep::Idle => {
                if self.coordinator.sync_finished() {
                    *lock(&self.finished) = true;
                    self.finished_signal.notify_all();
                }
                Outcome {
                    again: false,
                    timer: self.coordinator.sync_deadline(),
                }
            }
        }
    }

    fn maintenance(&self, now_ns: i64) {
        if let Err(error) = self.log.maintenance(now_ns) {
            tracing::warn!(stream = %self.name, %error, "maintenance failed; will retry");
        }
        if let Err(error) = crate::retention::enforce(
            &self.log,
            &self.metrics,
            self.hooks.on_retention.as_ref(),
            now_ns,
        ) {
            tracing::warn!(stream = %self.name, %error, "retention failed; will retry");
        }
    }
}

/// An open stream.
pub struct Stream {
    inner: Arc<StreamInner>,
    /// The pool that runs it (`None`: the manual driver).
    pool: Option<Arc<IoPool>>,
    /// Dropped as a killed process would be: no close.
    abandoned: bool,
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Stream")
            .field("name", &self.inner.name)
            .finish()
    }
}

/// Checks a stream name: `[A-Za-z0-9_-]{1,64}`.
pub fn validate_stream_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-');
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidInput(format!(
            "stream name '{name}' must be 1 to 64 characters of A-Z, a-z, 0-9, '_' or '-'"
        )))
    }
}

impl Stream {
    /// Opens (recovering if needed) or creates the stream stored in
    /// `directory`.
    pub fn open(
        file_system: Arc<dyn FileSystem>,
        directory: &Path,
        name: &str,
        cache: Arc<SegmentCache>,
        options: StreamOptions,
    ) -> Result<(Stream, RecoveryReport)> {
        validate_stream_name(name)?;
        let (log, report) = Log::open(
            file_system,
            directory,
            LogOptions {
                name: name.to_string(),
                config: options.config.clone(),
                recovery_mode: options.recovery_mode,
                keyring: Arc::clone(&options.keyring),
                node_id: options.node_id,
                cache,
                store_locked: options.store_locked.clone(),
                group_sync: match options.driver {
                    // A stream the caller steps syncs in its own steps.
                    Driver::Manual => None,
                    _ => options.group_sync.clone(),
                },
            },
        )?;
        // A new key (or a change to or from encryption) starts a new
        // segment at the next write, so that every segment has one key.
        if let (Some(active), wanted) = log.keys() {
            if active != wanted {
                tracing::info!(
                    stream = name,
                    from = active.0,
                    to = wanted.0,
                    "key rotation: new segments use the new key"
                );
                if let Some(hook) = &options.hooks.on_key_rotation {
                    hook(name, active.0, wanted.0);
                }
            }
        }
        let metrics = Arc::new(StreamMetrics::default());
        let inner = Arc::new(StreamInner {
            name: name.to_string(),
            coordinator: BatchCoordinator::new(name, options.config.clone(), Arc::clone(&metrics)),
            log,
            metrics,
            hooks: options.hooks.clone(),
            lanes: LaneStates::default(),
            last_maintenance: Mutex::new(Instant::now()),
            write_turn: Mutex::new(()),
            sync_turn: Mutex::new(()),
            stopped: AtomicBool::new(false),
            finished: Mutex::new(false),
            finished_signal: Condvar::new(),
        });
        let pool = match options.driver {
            Driver::Manual => None,
            Driver::Threads => Some(IoPool::new(&format!("natswal-{name}"), 2)?),
            Driver::Pool(pool) => Some(pool),
        };
        if let Some(pool) = &pool {
            let job: Arc<dyn Job> = inner.clone();
            inner.coordinator.set_waker(pool.waker(&job));
            // The first turn arms the maintenance timer.
            pool.waker(&job).wake(Lane::Write);
        }
        Ok((
            Stream {
                inner,
                pool,
                abandoned: false,
            },
            report,
        ))
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn config(&self) -> &StreamConfig {
        self.inner.log.config()
    }

    pub fn directory(&self) -> &Path {
        self.inner.log.directory()
    }

    pub fn metrics(&self) -> &StreamMetrics {
        &self.inner.metrics
    }

    /// The log beneath (replication and offline tools use it directly).
    pub fn log(&self) -> &Log {
        &self.inner.log
    }

    /// Appends one record; resolves once it meets the stream's durability.
    pub async fn append(&self, record: Record) -> Result<AppendOutcome> {
        self.append_request(AppendRequest {
            records: vec![record],
            ..AppendRequest::default()
        })
        .await
    }

    /// Appends records as one atomic frame: after a crash they are all there
    /// or none is, and no reader ever sees part of them.
    pub async fn append_batch(&self, records: Vec<Record>) -> Result<AppendOutcome> {
        self.append_request(AppendRequest {
            records,
            atomic: true,
            ..AppendRequest::default()
        })
        .await
    }

    /// Appends a request and waits for its durability.
    pub async fn append_request(&self, request: AppendRequest) -> Result<AppendOutcome> {
        let (sender, receiver) = oneshot::channel();
        self.submit(request, Completion::Oneshot(sender)).await?;
        receiver.await.map_err(|_| Error::Closed {
            stream: self.inner.name.clone(),
        })?
    }

    /// Queues an append and returns as soon as it is queued (waiting only
    /// while the queue is full); `completion` reports its durability. This
    /// is how a producer keeps many appends in flight.
    pub async fn submit(&self, request: AppendRequest, completion: Completion) -> Result<()> {
        self.inner
            .coordinator
            .enqueue(&self.inner.log, request, completion)
            .await
    }

    /// Queues an append only if the queue has room now: `Ok(Err(..))`
    /// hands the request and completion back when it has not.
    pub fn try_submit(
        &self,
        request: AppendRequest,
        completion: Completion,
    ) -> Result<std::result::Result<(), (AppendRequest, Completion)>> {
        self.inner
            .coordinator
            .try_enqueue(&self.inner.log, request, completion)
    }

    /// A reader from `start`, optionally filtered by a subject pattern.
    pub fn reader(&self, start: StartPosition, filter: Option<SubjectPattern>) -> Result<Reader> {
        Reader::new(self.inner.log.clone(), start, filter)
    }

    pub fn status(&self) -> StreamStatus {
        let segments = self.inner.log.segments();
        let records = segments.iter().map(|segment| segment.record_count()).sum();
        let next_offset = segments
            .last()
            .map_or(FIRST_OFFSET, |segment| segment.next_offset());
        let first_offset = segments
            .iter()
            .find(|segment| segment.record_count() > 0)
            .map_or(next_offset, |segment| segment.base_offset());
        let with_records: Vec<_> = segments
            .iter()
            .filter(|segment| segment.record_count() > 0)
            .collect();
        StreamStatus {
            name: self.inner.name.clone(),
            first_offset,
            next_offset,
            records,
            bytes: segments
                .iter()
                .map(|segment| segment.visible_length())
                .sum(),
            segments: segments.len(),
            first_timestamp_ns: with_records
                .first()
                .map(|segment| segment.progress().first_timestamp_ns),
            last_timestamp_ns: with_records
                .last()
                .map(|segment| segment.timestamp_max_through()),
            poisoned: self.inner.log.poison_cause(),
            append_failure: self.inner.coordinator.append_failure(),
        }
    }

    /// Appends queued or waiting for durability.
    pub fn pending_appends(&self) -> usize {
        self.inner.coordinator.pending_count()
    }

    /// Tells the writer the message id of the last stored record (read from
    /// the log at start), for `ExpectedLastMessageId` preconditions.
    pub fn set_last_message_id(&self, id: Option<Arc<str>>) {
        self.inner.coordinator.set_last_message_id(id);
    }

    /// The last stored record, if any.
    pub fn last_record(&self) -> Result<Option<crate::StoredRecord>> {
        let next = self.status().next_offset;
        if next <= FIRST_OFFSET {
            return Ok(None);
        }
        let mut reader = self.reader(StartPosition::Offset(next - 1), None)?;
        reader.next()
    }

    /// Sealed segments, oldest first, as files with their CRC.
    pub fn sealed_segments(&self) -> Vec<SealedSegment> {
        self.inner.log.sealed_segments()
    }

    /// Applies retention now (it also runs in the background).
    pub fn enforce_retention(&self) -> Result<Vec<RetentionDeletion>> {
        crate::retention::enforce(
            &self.inner.log,
            &self.inner.metrics,
            self.inner.hooks.on_retention.as_ref(),
            crate::log::writer::now_ns(),
        )
    }

    /// One write step (manual driver): writes a frame of queued appends.
    /// True if it did anything.
    pub fn step_write(&self, now_ns: i64) -> bool {
        self.inner.coordinator.write_step(&self.inner.log, now_ns)
            == crate::coordinator::WriteStep::Wrote
    }

    /// One sync step (manual driver): one group commit. True if it synced.
    pub fn step_sync(&self) -> bool {
        self.inner.coordinator.sync_step(&self.inner.log) == crate::coordinator::SyncStep::Synced
    }

    /// Maintenance (manual driver): age rotation, seals, checkpoints,
    /// retention at `now_ns`.
    pub fn step_maintenance(&self, now_ns: i64) {
        self.inner.maintenance(now_ns);
    }

    /// Drops a manually driven stream as a killed process would be: nothing
    /// more is written, synced or marked clean, and its memory is freed
    /// (the simulator's process restarts and power losses). A stream run
    /// by a pool cannot be stopped at an arbitrary point: it is closed
    /// normally and an error says so.
    pub fn abandon(mut self) -> Result<()> {
        if self.pool.is_some() {
            return Err(Error::InvalidInput(format!(
                "stream '{}' runs on an I/O pool: only a manually driven stream can be abandoned; it was closed",
                self.inner.name
            )));
        }
        self.abandoned = true;
        Ok(())
    }

    /// Stops intake, writes and syncs everything queued, completes its
    /// appends, seals and checkpoints. Blocks; idempotent.
    pub fn close(&self) -> Result<()> {
        let inner = &self.inner;
        inner.coordinator.begin_close();
        if self.pool.is_some() {
            let mut finished = lock(&inner.finished);
            while !*finished {
                finished = inner
                    .finished_signal
                    .wait(finished)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
            }
        } else {
            let now = crate::log::writer::now_ns();
            while self.step_write(now) || self.step_sync() {}
        }
        // No turn runs from here on: the log closes alone.
        inner.stopped.store(true, Ordering::Release);
        let _write_turn = lock(&inner.write_turn);
        let _sync_turn = lock(&inner.sync_turn);
        inner.log.close()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if !self.abandoned {
            let _ = self.close();
        }
    }
}
