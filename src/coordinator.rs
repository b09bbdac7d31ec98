//! BatchCoordinator: many async producers, one writer, one syncer per
//! stream, and the log beneath.
//!
//! - Producers reserve queue bytes from a semaphore (backpressure: a full
//!   queue makes them wait; memory is bounded by `queue_bytes_max`), push a
//!   [`Pending`] and return; the append resolves through its [`Completion`].
//! - The write step takes everything queued, up to the frame caps (no
//!   linger when idle: a lone append is written at once; under load, frames
//!   grow while the previous sync runs), checks preconditions in offset
//!   order, and appends one frame to the log.
//! - The sync step makes all frames written since the last sync durable
//!   with one [`Log::sync`] (group commit) and completes their appends.
//!   Under a store's pool it hands the sync to the store's group sync
//!   instead (one `syncfs` for every stream waiting at once; see
//!   [`crate::log::group_sync`]) and returns; the group's end wakes the
//!   sync lane, whose next step completes the appends.
//!
//! The steps are plain functions, so the same coordinator runs under an
//! [`IoPool`](crate::pool::IoPool) (its write and sync lanes, woken through
//! the coordinator's [`Waker`] when there is work) or under the
//! deterministic simulator, which calls them itself in a seeded order.
//!
//! A failed sync poisons the log: the appends it covered and every later
//! one fail with [`Error::Poisoned`]; nothing is retried.

use crate::config::{Durability, StreamConfig};
use crate::error::{Error, PreconditionFailure, Result};
use crate::format::frame::FrameBuilder;
use crate::format::record::Record;
use crate::lock;
use crate::log::writer::AppendMeta;
use crate::log::{Log, SyncProgress};
use crate::metrics::StreamMetrics;
use crate::pool::{Lane, Waker};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
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
    /// A callback (the simulator's).
    Callback(Box<dyn FnOnce(Result<AppendOutcome>) + Send>),
}

impl std::fmt::Debug for Completion {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Completion::None => formatter.write_str("None"),
            Completion::Oneshot(_) => formatter.write_str("Oneshot"),
            Completion::Channel { token, .. } => write!(formatter, "Channel({token})"),
            Completion::Callback(_) => formatter.write_str("Callback"),
        }
    }
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
            Completion::Callback(callback) => callback(result),
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

impl Precondition {
    /// Checks the condition against the stream's last offset (0: empty)
    /// and the message id of its last record (`None`: none, or no id).
    pub fn check(
        &self,
        last_offset: u64,
        last_message_id: Option<&str>,
    ) -> std::result::Result<(), PreconditionFailure> {
        match self {
            Precondition::ExpectedLastOffset(expected) if *expected != last_offset => {
                Err(PreconditionFailure::WrongLastOffset {
                    expected: *expected,
                    last: last_offset,
                })
            }
            Precondition::ExpectedLastMessageId(expected)
                if last_message_id != Some(expected.as_str()) =>
            {
                Err(PreconditionFailure::WrongLastMessageId {
                    expected: expected.clone(),
                    last: last_message_id.map(str::to_string),
                })
            }
            _ => Ok(()),
        }
    }
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
    enqueued_at: Instant,
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
}

/// Appends written to the log, waiting for their frame to be durable.
struct Written {
    sequence: u64,
    bytes: u64,
    /// The log's truncations when written, and the frame's end: a
    /// truncation since may have removed it.
    truncations: u64,
    next_offset: u64,
    completions: Vec<(Completion, AppendOutcome, Instant)>,
}

struct InFlight {
    entries: VecDeque<Written>,
    unsynced_bytes: u64,
    closing: bool,
    last_sync: Instant,
    /// When the sync now running (or the last one) began.
    sync_started: Instant,
}

/// Scratch state of the write step (one writer at a time).
struct WriteScratch {
    builder: FrameBuilder,
    taken: Vec<Pending>,
}

/// What a write step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WriteStep {
    Wrote,
    /// Nothing queued.
    Idle,
    /// Too much written but not yet durable: wait for the syncer.
    Blocked,
}

/// What a sync step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SyncStep {
    Synced,
    Idle,
    /// A grouped sync runs; its end wakes the sync lane.
    Waiting,
}

/// The coordinator's shared state (owned by the stream).
pub(crate) struct BatchCoordinator {
    name: String,
    config: StreamConfig,
    metrics: Arc<StreamMetrics>,
    queue: Mutex<QueueState>,
    budget: Semaphore,
    budget_permits_max: u32,
    in_flight: Mutex<InFlight>,
    /// Wakes the write and sync lanes (unset: the caller drives the steps).
    waker: OnceLock<Waker>,
    /// Message id of the last record written (written by the write step;
    /// set once at start from the log).
    last_message_id: Mutex<Option<Arc<str>>>,
    scratch: Mutex<WriteScratch>,
    append_failures: Mutex<AppendFailures>,
    /// Set while appends fail, so a success takes no lock otherwise.
    append_failing: AtomicBool,
}

/// How often a run of failing appends (a full disk) is logged at most.
const APPEND_FAILURE_LOG_SPACING: Duration = Duration::from_secs(10);

/// Appends failing without poisoning (a full disk): the latest cause, for
/// the stream's status, and a rate limit on the ERROR lines, since every
/// rejected message would otherwise log one.
#[derive(Debug, Default)]
struct AppendFailures {
    latest: Option<String>,
    logged_at: Option<Instant>,
    /// Failures since the last line.
    unlogged: u64,
    /// Failures in the current run.
    run: u64,
}

impl BatchCoordinator {
    /// An append failed and the stream stays writable: logs it, at most
    /// once per [`APPEND_FAILURE_LOG_SPACING`].
    fn note_append_failure(&self, error: &Error) {
        let mut failures = lock(&self.append_failures);
        self.append_failing.store(true, Ordering::Release);
        failures.latest = Some(error.to_string());
        failures.run += 1;
        failures.unlogged += 1;
        let now = Instant::now();
        let due = failures
            .logged_at
            .is_none_or(|at| now.duration_since(at) >= APPEND_FAILURE_LOG_SPACING);
        if due {
            tracing::error!(stream = %self.name, %error, failures = failures.unlogged, "append failed; the stream stays writable (further failures are logged at most every 10 s)");
            failures.logged_at = Some(now);
            failures.unlogged = 0;
        }
    }

    /// An append succeeded: a run of failures, if any, is over.
    fn note_append_success(&self) {
        if !self.append_failing.load(Ordering::Acquire) {
            return;
        }
        let mut failures = lock(&self.append_failures);
        self.append_failing.store(false, Ordering::Release);
        if failures.latest.take().is_some() {
            tracing::info!(stream = %self.name, failed = failures.run, "appends succeed again");
            *failures = AppendFailures::default();
        }
    }

    /// Why appends currently fail while the stream stays writable.
    pub fn append_failure(&self) -> Option<String> {
        lock(&self.append_failures).latest.clone()
    }

    pub fn new(name: &str, config: StreamConfig, metrics: Arc<StreamMetrics>) -> BatchCoordinator {
        let permits = config.queue_bytes_max.min(u64::from(u32::MAX)) as u32;
        BatchCoordinator {
            name: name.to_string(),
            config,
            metrics,
            queue: Mutex::new(QueueState {
                items: VecDeque::new(),
                closing: false,
            }),
            budget: Semaphore::new(permits as usize),
            budget_permits_max: permits,
            in_flight: Mutex::new(InFlight {
                entries: VecDeque::new(),
                unsynced_bytes: 0,
                closing: false,
                last_sync: Instant::now(),
                sync_started: Instant::now(),
            }),
            waker: OnceLock::new(),
            last_message_id: Mutex::new(None),
            scratch: Mutex::new(WriteScratch {
                builder: FrameBuilder::new(),
                taken: Vec::new(),
            }),
            append_failures: Mutex::new(AppendFailures::default()),
            append_failing: AtomicBool::new(false),
        }
    }

    pub fn set_last_message_id(&self, id: Option<Arc<str>>) {
        *lock(&self.last_message_id) = id;
    }

    /// Has `waker` woken for work from now on (once).
    pub fn set_waker(&self, waker: Waker) {
        let _ = self.waker.set(waker);
    }

    fn wake(&self, lane: Lane) {
        if let Some(waker) = self.waker.get() {
            waker.wake(lane);
        }
    }

    /// Asks the writer to finish: it drains the queue, then the syncer.
    pub fn begin_close(&self) {
        lock(&self.queue).closing = true;
        self.budget.close();
        self.wake(Lane::Write);
    }

    /// Appends queued or in flight.
    pub fn pending_count(&self) -> usize {
        lock(&self.queue).items.len()
            + lock(&self.in_flight)
                .entries
                .iter()
                .map(|entry| entry.completions.len())
                .sum::<usize>()
    }

    /// Checks a request and counts its bytes; nothing is queued yet.
    fn check_request(&self, request: &AppendRequest, log: &Log) -> Result<u64> {
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
        if encoded_bytes > self.config.frame_body_bytes_max() {
            return Err(Error::InvalidInput(format!(
                "a batch of {encoded_bytes} bytes cannot fit one frame of a {}-byte segment",
                self.config.segment_bytes_max
            )));
        }
        if let Some((index, _)) = request
            .preconditions
            .iter()
            .find(|(index, _)| *index as usize >= request.records.len())
        {
            return Err(Error::InvalidInput(format!(
                "precondition on record {index} of a request with {} records",
                request.records.len()
            )));
        }
        if log.is_poisoned() {
            return Err(log.shared().gate.poisoned_error());
        }
        Ok(encoded_bytes)
    }

    fn permits_for(&self, encoded_bytes: u64) -> u32 {
        encoded_bytes.min(u64::from(self.budget_permits_max)) as u32
    }

    /// Queues an append, waiting only for queue space (backpressure).
    pub async fn enqueue(
        &self,
        log: &Log,
        request: AppendRequest,
        completion: Completion,
    ) -> Result<()> {
        let encoded_bytes = self.check_request(&request, log)?;
        let permits = self.permits_for(encoded_bytes);
        let permit = self
            .budget
            .acquire_many(permits)
            .await
            .map_err(|_| self.closed())?;
        permit.forget();
        self.push(request, completion, encoded_bytes, permits)
    }

    /// Queues an append if the queue has room now; `Ok(false)` (and the
    /// completion untouched, returned) when it has not.
    pub fn try_enqueue(
        &self,
        log: &Log,
        request: AppendRequest,
        completion: Completion,
    ) -> Result<std::result::Result<(), (AppendRequest, Completion)>> {
        let encoded_bytes = self.check_request(&request, log)?;
        let permits = self.permits_for(encoded_bytes);
        match self.budget.try_acquire_many(permits) {
            Ok(permit) => permit.forget(),
            Err(tokio::sync::TryAcquireError::NoPermits) => return Ok(Err((request, completion))),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(self.closed()),
        }
        self.push(request, completion, encoded_bytes, permits)
            .map(Ok)
    }

    fn closed(&self) -> Error {
        Error::Closed {
            stream: self.name.clone(),
        }
    }

    fn push(
        &self,
        request: AppendRequest,
        completion: Completion,
        encoded_bytes: u64,
        permits: u32,
    ) -> Result<()> {
        let AppendRequest {
            mut records,
            atomic,
            raft_term,
            raft_index,
            preconditions,
            last_message_id,
        } = request;
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
            enqueued_at: Instant::now(),
            preconditions,
            last_message_id,
        };
        let mut queue = lock(&self.queue);
        if queue.closing {
            drop(queue);
            self.budget.add_permits(permits as usize);
            return Err(self.closed());
        }
        queue.items.push_back(pending);
        drop(queue);
        self.wake(Lane::Write);
        Ok(())
    }

    /// One write step: takes a frame's worth of queued appends and appends
    /// it to the log.
    pub fn write_step(&self, log: &Log, now_ns: i64) -> WriteStep {
        let waits_for_sync = !matches!(self.config.durability, Durability::None);
        if waits_for_sync {
            let in_flight = lock(&self.in_flight);
            if in_flight.unsynced_bytes >= self.config.unsynced_bytes_max
                && !in_flight.entries.is_empty()
            {
                return WriteStep::Blocked;
            }
        }
        let mut scratch = lock(&self.scratch);
        let WriteScratch { builder, taken } = &mut *scratch;
        take_frame(&mut lock(&self.queue).items, taken, &self.config);
        if taken.is_empty() {
            return WriteStep::Idle;
        }
        self.write_taken(log, builder, taken, now_ns);
        WriteStep::Wrote
    }

    /// True when the writer has nothing more to do: closing and drained.
    pub fn drained(&self) -> bool {
        let queue = lock(&self.queue);
        queue.closing && queue.items.is_empty()
    }

    /// After the last write: the syncer makes the rest durable and stops.
    pub fn finish_writes(&self) {
        lock(&self.in_flight).closing = true;
        self.wake(Lane::Sync);
    }

    /// True when everything written is durable and no write will follow.
    pub fn sync_finished(&self) -> bool {
        let in_flight = lock(&self.in_flight);
        in_flight.closing && in_flight.entries.is_empty()
    }

    /// When an interval sync falls due for what is written (interval
    /// durability only).
    pub fn sync_deadline(&self) -> Option<Instant> {
        let Durability::Interval { interval_ms } = self.config.durability else {
            return None;
        };
        let in_flight = lock(&self.in_flight);
        (!in_flight.entries.is_empty())
            .then(|| in_flight.last_sync + Duration::from_millis(interval_ms))
    }

    fn write_taken(
        &self,
        log: &Log,
        builder: &mut FrameBuilder,
        taken: &mut Vec<Pending>,
        now_ns: i64,
    ) {
        if log.is_poisoned() {
            self.fail_all(taken, &log.shared().gate.poisoned_error());
            return;
        }
        let last_message_id = self.check_preconditions(taken, log.written().next_offset);
        if taken.is_empty() {
            return;
        }
        let first = &taken[0];
        let meta = AppendMeta {
            atomic: first.atomic,
            raft_term: first.raft_term,
            raft_index: first.raft_index,
        };
        builder.begin();
        for pending in taken.iter() {
            for record in pending.records.as_slice() {
                let timestamp = if record.timestamp_ns == 0 {
                    now_ns
                } else {
                    record.timestamp_ns
                };
                builder.push(record, timestamp);
            }
        }
        let appended = match log.append(builder, meta, now_ns) {
            Ok(appended) => appended,
            Err(error) => {
                let error = if log.is_poisoned() {
                    log.shared().gate.poisoned_error()
                } else {
                    self.note_append_failure(&error);
                    error
                };
                self.fail_all(taken, &error);
                return;
            }
        };
        self.note_append_success();
        // Only now that the frame is written does its last record count as
        // the stream's last one.
        *lock(&self.last_message_id) = last_message_id;
        let mut permits = 0usize;
        let mut next_offset = appended.base_offset;
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
        self.budget.add_permits(permits);
        let records = (appended.next_offset - appended.base_offset) as u32;
        self.metrics.record_frame(records, appended.stored_bytes);
        match self.config.durability {
            Durability::Fsync => self.push_written(&appended, completions),
            Durability::None | Durability::Interval { .. } => {
                log.publish_written();
                for (completion, outcome, enqueued_at) in completions {
                    self.metrics.record_append_latency(enqueued_at.elapsed());
                    completion.complete(Ok(outcome));
                }
                if matches!(self.config.durability, Durability::Interval { .. }) {
                    self.push_written(&appended, Vec::new());
                }
            }
        }
    }

    fn push_written(
        &self,
        appended: &crate::log::writer::Appended,
        completions: Vec<(Completion, AppendOutcome, Instant)>,
    ) {
        let mut in_flight = lock(&self.in_flight);
        in_flight.unsynced_bytes += appended.stored_bytes;
        match in_flight.entries.back_mut() {
            Some(last) if completions.is_empty() && last.completions.is_empty() => {
                last.sequence = appended.sequence;
                last.bytes += appended.stored_bytes;
            }
            _ => in_flight.entries.push_back(Written {
                sequence: appended.sequence,
                bytes: appended.stored_bytes,
                truncations: appended.truncations,
                next_offset: appended.next_offset,
                completions,
            }),
        }
        drop(in_flight);
        self.wake(Lane::Sync);
    }

    /// Drops (and fails) the taken requests whose preconditions do not
    /// hold, checking each against the stream as the requests before it
    /// leave it. Returns the message id of the last record to be written.
    fn check_preconditions(&self, taken: &mut Vec<Pending>, next_offset: u64) -> Option<Arc<str>> {
        if taken.iter().all(|pending| pending.preconditions.is_empty()) {
            return taken
                .last()
                .and_then(|pending| pending.last_message_id.clone());
        }
        let mut last_message_id = lock(&self.last_message_id).clone();
        let mut next = next_offset;
        let mut permits = 0usize;
        taken.retain_mut(|pending| {
            let failure = pending
                .preconditions
                .iter()
                .find_map(|(index, precondition)| {
                    let last = next + u64::from(*index) - 1;
                    let last_id = if *index == 0 {
                        last_message_id.as_deref()
                    } else {
                        None
                    };
                    precondition.check(last, last_id).err()
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
        self.budget.add_permits(permits);
        last_message_id
    }

    fn fail_all(&self, taken: &mut Vec<Pending>, error: &Error) {
        let mut permits = 0usize;
        for pending in taken.drain(..) {
            permits += pending.permits as usize;
            pending.completion.complete(Err(error.duplicate()));
        }
        self.budget.add_permits(permits);
    }

    /// True when the sync step has work now.
    fn sync_due(&self, in_flight: &InFlight) -> bool {
        if in_flight.entries.is_empty() {
            return false;
        }
        match self.config.durability {
            Durability::Interval { interval_ms } => {
                in_flight.closing
                    || in_flight.last_sync.elapsed() >= Duration::from_millis(interval_ms)
            }
            _ => true,
        }
    }

    /// One sync step: one group commit of everything written so far.
    pub fn sync_step(&self, log: &Log) -> SyncStep {
        let outstanding = log.grouped_sync_outstanding();
        {
            let mut in_flight = lock(&self.in_flight);
            if !outstanding {
                if !self.sync_due(&in_flight) {
                    return SyncStep::Idle;
                }
                in_flight.sync_started = Instant::now();
            }
        }
        let result = match self.waker.get() {
            // Pooled: the store's group sync covers this log with others,
            // and wakes the lane when it is done.
            Some(waker) if log.syncs_in_groups() => {
                let waker = waker.clone();
                match log.sync_grouped(Box::new(move || waker.wake(Lane::Sync))) {
                    SyncProgress::Pending => return SyncStep::Waiting,
                    SyncProgress::Done(result) => result,
                }
            }
            _ => log.sync(),
        };
        let started = lock(&self.in_flight).sync_started;
        self.metrics.record_sync(started.elapsed());
        let mut done = Vec::new();
        let mut freed = 0u64;
        {
            let mut in_flight = lock(&self.in_flight);
            in_flight.last_sync = Instant::now();
            loop {
                let covered = match (&result, in_flight.entries.front()) {
                    (_, None) => false,
                    (Ok(point), Some(front)) => front.sequence <= point.sequence,
                    (Err(_), Some(_)) => true,
                };
                if !covered {
                    break;
                }
                let entry = in_flight.entries.pop_front().expect("front exists");
                freed += entry.bytes;
                done.push(entry);
            }
            in_flight.unsynced_bytes = in_flight.unsynced_bytes.saturating_sub(freed);
        }
        // The space freed may unblock the writer.
        self.wake(Lane::Write);
        for entry in done {
            // Durable, but a truncation since may have removed it.
            let removed =
                result.is_ok() && !log.survives_truncations(entry.truncations, entry.next_offset);
            for (completion, outcome, enqueued_at) in entry.completions {
                match &result {
                    Ok(_) if removed => completion.complete(Err(Error::Truncated {
                        stream: self.name.clone(),
                        next_offset: log.written().next_offset,
                        reader_offset: outcome.first_offset,
                    })),
                    Ok(_) => {
                        self.metrics.record_append_latency(enqueued_at.elapsed());
                        completion.complete(Ok(outcome));
                    }
                    Err(error) => completion.complete(Err(error.duplicate())),
                }
            }
        }
        SyncStep::Synced
    }
}

/// Moves the next frame's worth of pending appends from the queue.
fn take_frame(items: &mut VecDeque<Pending>, taken: &mut Vec<Pending>, config: &StreamConfig) {
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
