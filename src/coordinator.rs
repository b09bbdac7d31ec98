//! BatchCoordinator: many async producers, one writer thread, one syncer
//! thread per stream.
//!
//! - Producers reserve queue bytes from a semaphore (backpressure: a full
//!   queue makes them wait; memory is bounded by `queue_bytes_max`), push a
//!   [`Pending`] and return; the append resolves through its [`Completion`].
//! - The writer thread takes everything queued, up to the frame caps (no
//!   linger when idle: a lone append is written at once; under load, frames
//!   grow while the previous sync runs), encodes one frame, copies it into
//!   the active segment, and hands it to the syncer.
//! - The syncer makes all frames written since its last sync durable with one
//!   sync (group commit), publishes them to readers, and completes them.
//!
//! A failed sync poisons the stream: the appends it covered and every later
//! one fail with [`Error::Poisoned`]; the sync is never retried.

use crate::config::Durability;
use crate::error::{Error, PreconditionFailure, Result};
use crate::format::frame::{flags, FrameBuilder};
use crate::format::record::Record;
use crate::segment::storage::{SegmentProgress, StorageSegment};
use crate::segment::writer::{now_ns, SegmentWriter};
use crate::stream::StreamShared;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Offsets given to an append once it is durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendOutcome {
    pub first_offset: u64,
    pub count: u32,
}

impl AppendOutcome {
    /// Offset of the append's last record.
    pub fn last_offset(&self) -> u64 {
        self.first_offset + u64::from(self.count) - 1
    }
}

/// A finished append delivered on a completion channel.
#[derive(Debug)]
pub struct Completed {
    pub token: u64,
    pub result: Result<AppendOutcome>,
}

/// How an append reports that it is done.
#[derive(Debug)]
pub enum Completion {
    /// Nobody waits (fire and forget).
    None,
    Oneshot(oneshot::Sender<Result<AppendOutcome>>),
    /// In-order delivery to a producer's channel: completions of one
    /// producer arrive in the order it submitted them.
    Channel {
        sender: mpsc::UnboundedSender<Completed>,
        token: u64,
    },
}

impl Completion {
    pub(crate) fn complete(self, result: Result<AppendOutcome>) {
        match self {
            Completion::None => {}
            Completion::Oneshot(sender) => {
                let _ = sender.send(result);
            }
            Completion::Channel { sender, token } => {
                let _ = sender.send(Completed { token, result });
            }
        }
    }
}

/// A condition the writer checks, in offset order, before it writes a
/// request; a request whose condition fails is not written and completes
/// with [`Error::PreconditionFailed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Precondition {
    /// The offset before the record must be this (0: nothing before it).
    /// JetStream's `Nats-Expected-Last-Sequence`.
    ExpectedLastOffset(u64),
    /// The record before must carry this message id (only for the first
    /// record of a request). JetStream's `Nats-Expected-Last-Msg-Id`.
    ExpectedLastMessageId(String),
}

/// What a producer asks to append.
#[derive(Debug, Clone, Default)]
pub struct AppendRequest {
    pub records: Vec<Record>,
    /// All records go into one frame, never split (an atomic batch).
    pub atomic: bool,
    /// Raft term and index of the entry (0 standalone); requests with a
    /// nonzero index are never merged with others.
    pub raft_term: u64,
    pub raft_index: u64,
    /// Conditions on the stream before record `index` of this request.
    pub preconditions: Vec<(u32, Precondition)>,
    /// The message id of the request's last record, if it has one; the
    /// writer remembers the id of the last record written for
    /// [`Precondition::ExpectedLastMessageId`].
    pub last_message_id: Option<Arc<str>>,
}

enum PendingRecords {
    One(Record),
    Many(Vec<Record>),
}

impl PendingRecords {
    fn as_slice(&self) -> &[Record] {
        match self {
            PendingRecords::One(record) => std::slice::from_ref(record),
            PendingRecords::Many(records) => records,
        }
    }
}

pub(crate) struct Pending {
    records: PendingRecords,
    atomic: bool,
    raft_term: u64,
    raft_index: u64,
    encoded_bytes: u64,
    permits: u32,
    completion: Completion,
    enqueued_at: std::time::Instant,
    preconditions: Vec<(u32, Precondition)>,
    last_message_id: Option<Arc<str>>,
}

impl Pending {
    fn merges(&self) -> bool {
        !self.atomic && self.raft_index == 0
    }
}

struct QueueState {
    items: VecDeque<Pending>,
    closing: bool,
    writer_waiting: bool,
}

struct SyncJob {
    segment: Arc<StorageSegment>,
    file: Arc<dyn crate::io::WritableFile>,
    progress: SegmentProgress,
    bytes: u64,
    completions: Vec<(Completion, AppendOutcome, std::time::Instant)>,
}

struct JobState {
    jobs: VecDeque<SyncJob>,
    unsynced_bytes: u64,
    closing: bool,
}

/// The coordinator's shared state (owned by the stream).
pub(crate) struct Coordinator {
    queue: Mutex<QueueState>,
    queue_signal: Condvar,
    budget: Semaphore,
    budget_permits_max: u32,
    jobs: Mutex<JobState>,
    jobs_signal: Condvar,
    jobs_space: Condvar,
    poisoned: AtomicBool,
    poison_cause: Mutex<Option<String>>,
    /// Message id of the last record written (written by the writer thread;
    /// set once at start from the log).
    last_message_id: Mutex<Option<Arc<str>>>,
    prepared: Mutex<(Option<Arc<StorageSegment>>, u64)>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Coordinator {
    pub fn new(queue_bytes_max: u64) -> Coordinator {
        let permits = queue_bytes_max.min(u64::from(u32::MAX)) as u32;
        Coordinator {
            queue: Mutex::new(QueueState {
                items: VecDeque::new(),
                closing: false,
                writer_waiting: false,
            }),
            queue_signal: Condvar::new(),
            budget: Semaphore::new(permits as usize),
            budget_permits_max: permits,
            jobs: Mutex::new(JobState {
                jobs: VecDeque::new(),
                unsynced_bytes: 0,
                closing: false,
            }),
            jobs_signal: Condvar::new(),
            jobs_space: Condvar::new(),
            poisoned: AtomicBool::new(false),
            poison_cause: Mutex::new(None),
            last_message_id: Mutex::new(None),
            prepared: Mutex::new((None, 0)),
        }
    }

    pub fn set_last_message_id(&self, id: Option<Arc<str>>) {
        *lock(&self.last_message_id) = id;
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned.load(Ordering::Acquire)
    }

    pub fn poison_cause(&self) -> Option<String> {
        lock(&self.poison_cause).clone()
    }

    pub fn poison(&self, stream: &str, cause: &Error) {
        let mut guard = lock(&self.poison_cause);
        if guard.is_none() {
            tracing::error!(stream, error = %cause, "sync failed: stream is now read-only; nothing after the last successful sync is acknowledged");
            *guard = Some(cause.to_string());
        }
        self.poisoned.store(true, Ordering::Release);
    }

    fn poisoned_error(&self, stream: &str) -> Error {
        Error::Poisoned {
            stream: stream.to_string(),
            cause: self.poison_cause().unwrap_or_else(|| "unknown".to_string()),
        }
    }

    /// Asks the writer to finish: it drains the queue, syncs and exits.
    pub fn begin_close(&self) {
        lock(&self.queue).closing = true;
        self.queue_signal.notify_all();
        self.budget.close();
    }
}

impl StreamShared {
    /// Queues an append, waiting only for queue space (backpressure).
    pub(crate) async fn enqueue(
        &self,
        request: AppendRequest,
        completion: Completion,
    ) -> Result<()> {
        let coordinator = &self.coordinator;
        if request.records.is_empty() {
            return Err(Error::InvalidInput(
                "an append needs at least one record".to_string(),
            ));
        }
        let mut encoded_bytes = 0u64;
        for record in &request.records {
            record.check_lengths().map_err(Error::InvalidInput)?;
            let length = record.encoded_length() as u64;
            if length > self.config.record_bytes_max {
                return Err(Error::RecordTooLarge {
                    size_bytes: length,
                    limit_bytes: self.config.record_bytes_max,
                });
            }
            encoded_bytes += length;
        }
        let frame_length = encoded_bytes + crate::format::frame::FRAME_HEADER_LENGTH as u64;
        if frame_length > self.config.frame_capacity_bytes() {
            return Err(Error::InvalidInput(format!(
                "a batch of {encoded_bytes} bytes cannot fit one frame of a {}-byte segment",
                self.config.segment_bytes_max
            )));
        }
        if coordinator.is_poisoned() {
            return Err(coordinator.poisoned_error(&self.name));
        }
        let permits = encoded_bytes.min(u64::from(coordinator.budget_permits_max)) as u32;
        let permit = coordinator
            .budget
            .acquire_many(permits)
            .await
            .map_err(|_| Error::Closed {
                stream: self.name.clone(),
            })?;
        permit.forget();
        let AppendRequest {
            mut records,
            atomic,
            raft_term,
            raft_index,
            preconditions,
            last_message_id,
        } = request;
        if let Some((index, _)) = preconditions
            .iter()
            .find(|(index, _)| *index as usize >= records.len())
        {
            coordinator.budget.add_permits(permits as usize);
            return Err(Error::InvalidInput(format!(
                "precondition on record {index} of a request with {} records",
                records.len()
            )));
        }
        let records = if records.len() == 1 && !atomic {
            PendingRecords::One(records.pop().expect("one record"))
        } else {
            PendingRecords::Many(records)
        };
        let pending = Pending {
            records,
            atomic,
            raft_term,
            raft_index,
            encoded_bytes,
            permits,
            completion,
            enqueued_at: std::time::Instant::now(),
            preconditions,
            last_message_id,
        };
        let mut queue = lock(&coordinator.queue);
        if queue.closing {
            drop(queue);
            coordinator.budget.add_permits(permits as usize);
            return Err(Error::Closed {
                stream: self.name.clone(),
            });
        }
        queue.items.push_back(pending);
        let wake = queue.writer_waiting;
        drop(queue);
        if wake {
            coordinator.queue_signal.notify_one();
        }
        Ok(())
    }
}

/// Body of the writer thread.
pub(crate) fn run_writer(shared: Arc<StreamShared>, mut writer: SegmentWriter) {
    let syncer_shared = Arc::clone(&shared);
    let syncer = std::thread::Builder::new()
        .name(format!("natswal-sync-{}", shared.name))
        .spawn(move || run_syncer(&syncer_shared))
        .expect("spawning a thread only fails when the process is out of resources");
    let coordinator = &shared.coordinator;
    let maintenance_interval = Duration::from_millis(shared.config.maintenance_interval_ms);
    let mut builder = FrameBuilder::new();
    let mut taken: Vec<Pending> = Vec::new();
    let mut sealers: Vec<std::thread::JoinHandle<()>> = Vec::new();
    let mut last_maintenance = std::time::Instant::now();
    loop {
        let closing = {
            let mut queue = lock(&coordinator.queue);
            while queue.items.is_empty() && !queue.closing {
                queue.writer_waiting = true;
                let (guard, wait) = coordinator
                    .queue_signal
                    .wait_timeout(queue, maintenance_interval)
                    .unwrap_or_else(|poisoned| poisoned.into_inner());
                queue = guard;
                queue.writer_waiting = false;
                if wait.timed_out() && queue.items.is_empty() {
                    drop(queue);
                    maintenance(&shared, &mut writer, &mut sealers);
                    last_maintenance = std::time::Instant::now();
                    queue = lock(&coordinator.queue);
                }
            }
            take_frame(&mut queue.items, &mut taken, &shared.config);
            queue.closing && queue.items.is_empty()
        };
        if !taken.is_empty() {
            write_taken(&shared, &mut writer, &mut builder, &mut taken, &mut sealers);
        }
        // Under steady load the queue never goes idle: rotate by age and
        // apply retention here too.
        if last_maintenance.elapsed() >= maintenance_interval {
            maintenance(&shared, &mut writer, &mut sealers);
            last_maintenance = std::time::Instant::now();
        }
        if closing && taken.is_empty() {
            break;
        }
    }
    // Drain: let the syncer finish every job, then sync and checkpoint.
    {
        let mut jobs = lock(&coordinator.jobs);
        jobs.closing = true;
    }
    coordinator.jobs_signal.notify_all();
    let _ = syncer.join();
    for sealer in sealers {
        let _ = sealer.join();
    }
    if !coordinator.is_poisoned() {
        if let Err(error) = writer.checkpoint(true) {
            coordinator.poison(&shared.name, &error);
        }
    }
    shared.notify_readers();
}

/// Moves the next frame's worth of pending appends from the queue.
fn take_frame(
    items: &mut VecDeque<Pending>,
    taken: &mut Vec<Pending>,
    config: &crate::config::StreamConfig,
) {
    let Some(first) = items.pop_front() else {
        return;
    };
    let merges = first.merges();
    let mut bytes = first.encoded_bytes;
    let mut records = first.records.as_slice().len() as u64;
    taken.push(first);
    if !merges {
        return;
    }
    while let Some(next) = items.front() {
        let next_records = next.records.as_slice().len() as u64;
        if !next.merges()
            || bytes + next.encoded_bytes > config.frame_bytes_max
            || records + next_records > u64::from(config.frame_records_max)
        {
            break;
        }
        bytes += next.encoded_bytes;
        records += next_records;
        taken.push(items.pop_front().expect("front exists"));
    }
}

/// Drops (and fails) the taken requests whose preconditions do not hold,
/// checking each against the stream as the requests before it leave it.
/// Returns the message id of the last record that will be written.
fn check_preconditions(
    taken: &mut Vec<Pending>,
    next_offset: u64,
    coordinator: &Coordinator,
) -> Option<Arc<str>> {
    if taken.iter().all(|pending| pending.preconditions.is_empty()) {
        // The common case: nothing to check.
        return taken
            .last()
            .and_then(|pending| pending.last_message_id.clone());
    }
    let mut last_message_id = lock(&coordinator.last_message_id).clone();
    let mut next = next_offset;
    let mut permits = 0usize;
    taken.retain_mut(|pending| {
        let failure = pending
            .preconditions
            .iter()
            .find_map(|(index, precondition)| {
                let last = next + u64::from(*index) - 1;
                match precondition {
                    Precondition::ExpectedLastOffset(expected) if *expected != last => {
                        Some(PreconditionFailure::WrongLastOffset {
                            expected: *expected,
                            last,
                        })
                    }
                    Precondition::ExpectedLastMessageId(expected) => {
                        let actual = if *index == 0 {
                            last_message_id.as_deref()
                        } else {
                            None
                        };
                        (actual != Some(expected.as_str())).then(|| {
                            PreconditionFailure::WrongLastMessageId {
                                expected: expected.clone(),
                                last: actual.map(str::to_string),
                            }
                        })
                    }
                    _ => None,
                }
            });
        match failure {
            Some(failure) => {
                permits += pending.permits as usize;
                let completion = std::mem::replace(&mut pending.completion, Completion::None);
                completion.complete(Err(Error::PreconditionFailed(failure)));
                false
            }
            None => {
                next += pending.records.as_slice().len() as u64;
                last_message_id = pending.last_message_id.clone();
                true
            }
        }
    });
    coordinator.budget.add_permits(permits);
    last_message_id
}

fn fail_all(taken: &mut Vec<Pending>, coordinator: &Coordinator, error: &Error) {
    let mut permits = 0usize;
    for pending in taken.drain(..) {
        permits += pending.permits as usize;
        pending.completion.complete(Err(error.duplicate()));
    }
    coordinator.budget.add_permits(permits);
}

/// Encodes the taken appends as one frame, writes it and routes the
/// completions by durability level.
fn write_taken(
    shared: &Arc<StreamShared>,
    writer: &mut SegmentWriter,
    builder: &mut FrameBuilder,
    taken: &mut Vec<Pending>,
    sealers: &mut Vec<std::thread::JoinHandle<()>>,
) {
    let coordinator = &shared.coordinator;
    if coordinator.is_poisoned() {
        fail_all(
            taken,
            coordinator,
            &coordinator.poisoned_error(&shared.name),
        );
        return;
    }
    let last_message_id = check_preconditions(taken, writer.next_offset(), coordinator);
    if taken.is_empty() {
        return;
    }
    let now = now_ns();
    let first = &taken[0];
    builder.begin(writer.next_offset(), first.raft_term, first.raft_index);
    let frame_flags = if first.atomic { flags::ATOMIC } else { 0 };
    for pending in taken.iter() {
        for record in pending.records.as_slice() {
            let timestamp = if record.timestamp_ns == 0 {
                now
            } else {
                record.timestamp_ns
            };
            builder.push(record, timestamp);
        }
    }
    // Compression changes the frame's length, so it comes before the
    // segment decides whether the frame still fits.
    let frame_length = writer.encoder.encode_body(builder);
    match writer.prepare(frame_length, now) {
        Ok(sealed) => {
            if let Some(sealed) = sealed {
                spawn_finish_sealed(shared, sealed, sealers);
            }
        }
        Err(error) => {
            if matches!(error, Error::DiskFull { .. }) {
                // Nothing was written: the stream stays writable.
                tracing::error!(stream = %shared.name, %error, "cannot create the next segment");
                fail_all(taken, coordinator, &error);
            } else {
                // A failed sync (of the new segment's header, or of the
                // sealed one): these appends fail like every later one, with
                // `Poisoned`, so callers see one error for a read-only stream.
                coordinator.poison(&shared.name, &error);
                fail_all(
                    taken,
                    coordinator,
                    &coordinator.poisoned_error(&shared.name),
                );
            }
            return;
        }
    }
    let durable_position = writer.durable_position();
    let (frame, header) = match writer
        .encoder
        .finish(builder, frame_flags, durable_position)
    {
        Ok(finished) => finished,
        Err(error) => {
            fail_all(taken, coordinator, &error);
            return;
        }
    };
    let written = match writer.write_frame(frame, &header, now) {
        Ok(written) => written,
        Err(error) => {
            coordinator.poison(&shared.name, &error);
            fail_all(
                taken,
                coordinator,
                &coordinator.poisoned_error(&shared.name),
            );
            return;
        }
    };
    // Only now that the frame is written does its last record count as
    // the stream's last one.
    *lock(&coordinator.last_message_id) = last_message_id;
    let frame_bytes = u64::from(header.frame_length);
    let mut permits = 0usize;
    let mut next_offset = header.base_offset;
    let mut completions = Vec::with_capacity(taken.len());
    for pending in taken.drain(..) {
        permits += pending.permits as usize;
        let count = pending.records.as_slice().len() as u32;
        let outcome = AppendOutcome {
            first_offset: next_offset,
            count,
        };
        next_offset += u64::from(count);
        completions.push((pending.completion, outcome, pending.enqueued_at));
    }
    coordinator.budget.add_permits(permits);
    shared
        .metrics
        .record_frame(header.record_count, frame_bytes);
    match shared.config.durability {
        Durability::Fsync => push_job(shared, written, frame_bytes, completions),
        Durability::None | Durability::Interval { .. } => {
            written.segment.publish(written.progress);
            shared.notify_readers();
            for (completion, outcome, enqueued_at) in completions {
                shared.metrics.record_append_latency(enqueued_at.elapsed());
                completion.complete(Ok(outcome));
            }
            if matches!(shared.config.durability, Durability::Interval { .. }) {
                push_job(shared, written, frame_bytes, Vec::new());
            }
        }
    }
    if writer.bytes_since_checkpoint() >= shared.config.checkpoint_interval_bytes {
        if let Err(error) = writer.checkpoint(false) {
            coordinator.poison(&shared.name, &error);
        }
    }
}

fn push_job(
    shared: &StreamShared,
    written: crate::segment::writer::WrittenFrame,
    bytes: u64,
    completions: Vec<(Completion, AppendOutcome, std::time::Instant)>,
) {
    let coordinator = &shared.coordinator;
    let mut jobs = lock(&coordinator.jobs);
    // Bound what is written but not yet durable: wait for the syncer.
    while jobs.unsynced_bytes >= shared.config.unsynced_bytes_max && !jobs.jobs.is_empty() {
        jobs = coordinator
            .jobs_space
            .wait(jobs)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }
    jobs.unsynced_bytes += bytes;
    let merge = completions.is_empty()
        && jobs.jobs.back().is_some_and(|last| {
            last.completions.is_empty() && Arc::ptr_eq(&last.segment, &written.segment)
        });
    if merge {
        let last = jobs.jobs.back_mut().expect("checked above");
        last.progress = written.progress;
        last.bytes += bytes;
    } else {
        jobs.jobs.push_back(SyncJob {
            segment: written.segment,
            file: written.file,
            progress: written.progress,
            bytes,
            completions,
        });
    }
    drop(jobs);
    coordinator.jobs_signal.notify_one();
}

/// Body of the syncer thread: group commit.
fn run_syncer(shared: &StreamShared) {
    let coordinator = &shared.coordinator;
    let interval = match shared.config.durability {
        Durability::Interval { interval_ms } => Some(Duration::from_millis(interval_ms)),
        _ => None,
    };
    loop {
        let (batch, closing) = {
            let mut jobs = lock(&coordinator.jobs);
            match interval {
                None => {
                    while jobs.jobs.is_empty() && !jobs.closing {
                        jobs = coordinator
                            .jobs_signal
                            .wait(jobs)
                            .unwrap_or_else(|poisoned| poisoned.into_inner());
                    }
                }
                Some(period) => {
                    if !jobs.closing {
                        jobs = coordinator
                            .jobs_signal
                            .wait_timeout_while(jobs, period, |state| !state.closing)
                            .unwrap_or_else(|poisoned| poisoned.into_inner())
                            .0;
                    }
                }
            }
            (std::mem::take(&mut jobs.jobs), jobs.closing)
        };
        if !batch.is_empty() {
            sync_batch(shared, batch);
        }
        if closing && lock(&coordinator.jobs).jobs.is_empty() {
            return;
        }
    }
}

fn sync_batch(shared: &StreamShared, batch: VecDeque<SyncJob>) {
    let coordinator = &shared.coordinator;
    let total_bytes: u64 = batch.iter().map(|job| job.bytes).sum();
    let mut failure: Option<Error> = coordinator
        .is_poisoned()
        .then(|| coordinator.poisoned_error(&shared.name));
    let started = std::time::Instant::now();
    let jobs: Vec<SyncJob> = batch.into_iter().collect();
    // Jobs before `synced_jobs` are durable; one sync covers each run of
    // jobs on the same segment (one run per batch, two across a rotation).
    let mut synced_jobs = 0;
    while synced_jobs < jobs.len() && failure.is_none() {
        let segment = &jobs[synced_jobs].segment;
        let mut last = synced_jobs;
        while last + 1 < jobs.len() && Arc::ptr_eq(&jobs[last + 1].segment, segment) {
            last += 1;
        }
        let end = jobs[last].progress.length;
        let start = segment.durable_length().min(end);
        match jobs[synced_jobs].file.sync_range(start, end) {
            Ok(()) => {
                segment.mark_durable(end);
                segment.publish(jobs[last].progress);
                synced_jobs = last + 1;
            }
            Err(error) => {
                coordinator.poison(&shared.name, &error);
                failure = Some(coordinator.poisoned_error(&shared.name));
            }
        }
    }
    shared.metrics.record_sync(started.elapsed());
    shared.notify_readers();
    if let Some(last) = jobs.last() {
        let end = last.progress.length;
        const AHEAD: u64 = 8 << 20;
        let mut prepared = lock(&coordinator.prepared);
        if prepared
            .0
            .as_ref()
            .is_none_or(|segment| !Arc::ptr_eq(segment, &last.segment))
        {
            *prepared = (Some(Arc::clone(&last.segment)), end);
        }
        if prepared.1 < end + AHEAD / 2 {
            last.file.prepare_range(prepared.1.max(end), end + AHEAD);
            prepared.1 = end + AHEAD;
        }
    }
    for (position, job) in jobs.into_iter().enumerate() {
        for (completion, outcome, enqueued_at) in job.completions {
            let result = match &failure {
                Some(error) if position >= synced_jobs => Err(error.duplicate()),
                _ => {
                    shared.metrics.record_append_latency(enqueued_at.elapsed());
                    Ok(outcome)
                }
            };
            completion.complete(result);
        }
    }
    let mut state = lock(&coordinator.jobs);
    state.unsynced_bytes = state.unsynced_bytes.saturating_sub(total_bytes);
    drop(state);
    coordinator.jobs_space.notify_all();
}

/// Finishes a sealed segment on its own short-lived thread, so syncing,
/// cutting and indexing it never stalls appends (rotation is rare: once per
/// segment).
fn spawn_finish_sealed(
    shared: &Arc<StreamShared>,
    sealed: crate::segment::writer::ActiveSegment,
    sealers: &mut Vec<std::thread::JoinHandle<()>>,
) {
    sealers.retain(|sealer| !sealer.is_finished());
    let thread_shared = Arc::clone(shared);
    let spawned = std::thread::Builder::new()
        .name(format!("natswal-seal-{}", shared.name))
        .spawn(move || {
            let shared = thread_shared;
            let finished = crate::segment::writer::finish_sealed(
                shared.file_system.as_ref(),
                &shared.cache,
                sealed,
            );
            if let Err(error) = finished {
                shared.coordinator.poison(&shared.name, &error);
            }
            shared.notify_readers();
        });
    match spawned {
        Ok(handle) => sealers.push(handle),
        Err(error) => shared.coordinator.poison(
            &shared.name,
            &Error::io("cannot start a thread to seal a segment", error),
        ),
    }
}

/// Idle-time work: age rotation and retention.
fn maintenance(
    shared: &Arc<StreamShared>,
    writer: &mut SegmentWriter,
    sealers: &mut Vec<std::thread::JoinHandle<()>>,
) {
    if shared.coordinator.is_poisoned() {
        return;
    }
    if let Some(sealed) = writer.rotate_if_old(now_ns()) {
        spawn_finish_sealed(shared, sealed, sealers);
        shared.notify_readers();
    }
    if let Err(error) = crate::retention::enforce(shared, now_ns()) {
        tracing::warn!(stream = %shared.name, %error, "retention failed; will retry");
    }
}
