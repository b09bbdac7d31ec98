//! Intake of a replicated stream: only its leader subscribes to the
//! stream's subjects, and a publisher's PubAck is sent once its message's
//! entry is committed (synced on a majority) and applied: the `quorum`
//! durability.
//!
//! Invariants:
//! - intake runs only while this node leads the group in one term and has
//!   heard from a quorum within `quorum_contact_max` (below the election
//!   timeout): a leader cut off from its peers stops taking messages
//!   before a new leader can be elected, so two leaders never take
//!   messages at once (no split brain through NATS);
//! - every accepted message gets exactly one reply: the PubAck with the
//!   offset it took, or an error when its entry was not committed within
//!   `commit_timeout` or the leader was deposed (never silence, never a
//!   late ack for something not committed);
//! - the duplicate window follows the committed log on every replica (a
//!   reader with the applied ceiling feeds it while the node follows), and
//!   a node that comes to lead reads everything committed before its term
//!   into it before it checks a message: a new leader answers a retried
//!   `Nats-Msg-Id` with the original offset;
//! - an atomic batch is staged on the leader and proposed whole as one
//!   entry (one frame) at its commit message, which gets the batch ack
//!   once that entry is committed; a leader change drops staged batches;
//! - a message with preconditions (`Nats-Expected-Last-Sequence`,
//!   `-Last-Msg-Id`, `-Stream`) is checked against the stream as every
//!   entry before it leaves it: intake waits for its proposals in flight
//!   and for the leader's whole log to be applied, checks, and proposes it
//!   first in a new entry (the messages after it wait, in order). Since
//!   the intake is the only proposer of records, nothing lands between the
//!   check and the entry; a condition is never ignored.

use crate::ack::{self, ApiError};
use crate::batch::{AtomicBatches, AtomicOutcome, BatchLimits, CommittedBatch};
use crate::config::StreamSection;
use crate::dedup::{now_ns, DuplicateWindow, Seen};
use crate::headers;
use natswal_replication::{Applied, ProposedRecord, RecordBatch, ReplicatedStream};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// Records in one proposal (one entry, one frame).
const PROPOSAL_RECORDS_MAX: usize = 1024;
/// Bytes of records in one proposal.
const PROPOSAL_BYTES_MAX: usize = 1 << 20;
/// Proposals waiting for their commit at once.
const PROPOSALS_IN_FLIGHT_MAX: usize = 64;
/// How often leadership and quorum contact are checked.
const LEADERSHIP_CHECK: Duration = Duration::from_millis(25);

pub struct IntakeContext {
    pub group: Arc<ReplicatedStream>,
    pub section: StreamSection,
    pub client: crate::wire::Client,
    pub commit_timeout: Duration,
    /// Longest silence from a quorum a leader takes messages through.
    pub quorum_contact_max: Duration,
    /// Atomic batch limits (the stream's and the server's).
    pub limits: BatchLimits,
}

/// What woke the intake loop.
enum Event {
    Stop,
    Check,
    Completed(Completed),
    Messages(Option<Vec<crate::wire::Message>>),
}

/// A proposal's outcome, back on the intake loop.
struct Completed {
    token: u64,
    result: Result<Applied, String>,
    /// Reply subject of each record, in order.
    replies: Vec<Option<async_nats::Subject>>,
    /// `Nats-Msg-Id` of each record.
    ids: Vec<Option<String>>,
    /// An atomic batch's id and commit reply.
    atomic: Option<(String, Option<async_nats::Subject>)>,
}

/// Runs intake whenever this node leads, until shutdown; follows the
/// committed log into the duplicate window while it does not.
pub async fn run(context: IntakeContext, mut shutdown: watch::Receiver<bool>) {
    let name = context.group.name().to_string();
    let mut tail = DuplicateTail::new(&context.section);
    loop {
        let Some(term) = follow(&context, &mut tail, &mut shutdown).await else {
            return;
        };
        // Everything committed before this term is applied: the window
        // catches up with it before the first new message is checked.
        if let Err(error) = tail.catch_up(&context.group, usize::MAX).await {
            tracing::error!(stream = %name, %error, "cannot read the log into the duplicate window: not taking messages");
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        tracing::info!(stream = %name, term, "leading: intake starts");
        lead(&context, term, &mut tail.window, &mut shutdown).await;
        tracing::info!(stream = %name, term, "intake stopped");
        if *shutdown.borrow() {
            return;
        }
    }
}

/// Records read into the window per step while following (keeps each
/// blocking step short).
const FOLLOW_RECORDS_MAX: usize = 65_536;

/// Follows the committed log into the duplicate window until this node
/// leads with fresh quorum contact (its term) or shutdown (`None`).
async fn follow(
    context: &IntakeContext,
    tail: &mut DuplicateTail,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<u64> {
    let mut check = tokio::time::interval(LEADERSHIP_CHECK);
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return None,
            _ = check.tick() => {}
        }
        if let Some(term) = leading_term(context) {
            return Some(term);
        }
        if let Err(error) = tail.catch_up(&context.group, FOLLOW_RECORDS_MAX).await {
            tracing::warn!(stream = %context.group.name(), %error, "reading the log into the duplicate window failed; it is read again from the window's start");
        }
    }
}

/// The duplicate window kept current on every replica: a reader of
/// committed records (never an entry Raft may still replace) feeds it, so
/// a node that comes to lead reads only what was committed since it last
/// looked, not the whole window.
struct DuplicateTail {
    window: DuplicateWindow,
    reader: Option<natswal::Reader>,
}

impl DuplicateTail {
    fn new(section: &StreamSection) -> DuplicateTail {
        DuplicateTail {
            window: DuplicateWindow::new(section.duplicate_window, section.duplicate_ids_max),
            reader: None,
        }
    }

    /// Reads up to `records_max` committed records into the window, from
    /// where the last call stopped (the window's start on the first).
    async fn catch_up(
        &mut self,
        group: &Arc<ReplicatedStream>,
        records_max: usize,
    ) -> natswal::Result<()> {
        let window = std::mem::replace(&mut self.window, DuplicateWindow::new(Duration::ZERO, 1));
        let reader = self.reader.take();
        let group = Arc::clone(group);
        let (window, reader, result) = tokio::task::spawn_blocking(move || {
            let mut window = window;
            let mut reader = reader;
            let result = read_into(&group, &mut window, &mut reader, records_max);
            (window, reader, result)
        })
        .await
        .map_err(|error| natswal::Error::InvalidConfig {
            key: "duplicate window".to_string(),
            reason: format!("the read task failed: {error}"),
        })?;
        self.window = window;
        self.reader = reader;
        result
    }
}

/// One blocking step of [`DuplicateTail::catch_up`]. On an error the
/// reader is dropped: the next step starts again from the window's start.
fn read_into(
    group: &ReplicatedStream,
    window: &mut DuplicateWindow,
    reader: &mut Option<natswal::Reader>,
    records_max: usize,
) -> natswal::Result<()> {
    let now = now_ns();
    let mut current = match reader.take() {
        Some(current) => current,
        None => group.reader(
            natswal::StartPosition::Time(window.covers_since_ns(now)),
            None,
        )?,
    };
    for _ in 0..records_max {
        match current.next() {
            Ok(Some(record)) => {
                window.remember_record(&record, now);
            }
            Ok(None) => break,
            // Records under a key no longer configured keep their ids out
            // of the window; newer segments are still read.
            Err(natswal::Error::KeyUnavailable { resume_offset, .. }) => {
                current = group.reader(natswal::StartPosition::Offset(resume_offset), None)?;
            }
            Err(error) => return Err(error),
        }
    }
    *reader = Some(current);
    Ok(())
}

/// The term this node leads in, if it leads (an entry of its term applied)
/// and a quorum answered it recently.
fn leading_term(context: &IntakeContext) -> Option<u64> {
    let status = context.group.status();
    let fresh = context
        .group
        .quorum_contact_age()
        .is_some_and(|age| age <= context.quorum_contact_max);
    (status.leads && fresh).then_some(status.term)
}

/// Takes messages while leading in `term`.
async fn lead(
    context: &IntakeContext,
    term: u64,
    window: &mut DuplicateWindow,
    shutdown: &mut watch::Receiver<bool>,
) {
    let mut subscription = context.client.subscribe_all(&context.section.subjects);
    let mut leading = Leading::new(context, window);
    let mut check = tokio::time::interval(LEADERSHIP_CHECK);
    loop {
        let event = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => Event::Stop,
            _ = check.tick() => Event::Check,
            Some(completed) = leading.completions.recv() => Event::Completed(completed),
            chunk = subscription.next_chunk(PROPOSAL_RECORDS_MAX), if leading.slots.available_permits() > 0 => Event::Messages(chunk),
        };
        match event {
            Event::Stop => break,
            Event::Check if leading_term(context) != Some(term) => break,
            Event::Check => leading.expire_batches(),
            Event::Completed(completed) => leading.complete(completed),
            Event::Messages(None) => break,
            Event::Messages(Some(messages)) => leading.take(messages).await,
        }
    }
    // No new messages from here on; every accepted one still gets its
    // reply (its proposal resolves within the commit timeout). Staged
    // atomic batches are dropped: their commit reaches the next leader,
    // which refuses it as incomplete.
    drop(subscription);
    leading.drain().await;
    leading.abandon_batches();
}

/// Copies of a `Nats-Msg-Id` that arrived while the first copy's proposal
/// (by token) was in flight: each reply subject with the id.
type Waiting = HashMap<u64, Vec<(Option<async_nats::Subject>, String)>>;

/// Records proposed as one entry, and who hears of the outcome.
struct Proposal {
    token: u64,
    batch: RecordBatch,
    /// Reply subject of each record, in order.
    replies: Vec<Option<async_nats::Subject>>,
    /// `Nats-Msg-Id` of each record.
    ids: Vec<Option<String>>,
    /// An atomic batch: its id and the commit message's reply (one batch
    /// ack for all its records).
    atomic: Option<(String, Option<async_nats::Subject>)>,
}

/// What waits for a check once the log settles: a committed atomic batch
/// with preconditions, or else a message with them (the first of
/// `messages`); then the messages after it, in order.
#[derive(Default)]
struct Held {
    batch: Option<(CommittedBatch, Option<async_nats::Subject>)>,
    messages: Vec<crate::wire::Message>,
}

/// What intake keeps while it leads in one term.
struct Leading<'a> {
    context: &'a IntakeContext,
    window: &'a mut DuplicateWindow,
    waiting_duplicates: Waiting,
    atomic: AtomicBatches,
    token: u64,
    in_flight: usize,
    slots: Arc<tokio::sync::Semaphore>,
    completions_sender: mpsc::UnboundedSender<Completed>,
    completions: mpsc::UnboundedReceiver<Completed>,
}

impl<'a> Leading<'a> {
    fn new(context: &'a IntakeContext, window: &'a mut DuplicateWindow) -> Leading<'a> {
        let (completions_sender, completions) = mpsc::unbounded_channel::<Completed>();
        Leading {
            context,
            window,
            waiting_duplicates: HashMap::new(),
            atomic: AtomicBatches::new(),
            token: 0,
            in_flight: 0,
            slots: Arc::new(tokio::sync::Semaphore::new(PROPOSALS_IN_FLIGHT_MAX)),
            completions_sender,
            completions,
        }
    }

    /// Checks, groups and proposes a chunk of messages in order. A message
    /// or batch with preconditions is checked against the stream as every
    /// entry before it leaves it: the proposals in flight finish and the
    /// log is applied first (the messages after it wait).
    async fn take(&mut self, messages: Vec<crate::wire::Message>) {
        let mut pending = messages;
        let mut first_checked = false;
        loop {
            let (proposals, held) = self.accept(pending, first_checked);
            for proposal in proposals {
                self.propose(proposal).await;
            }
            pending = held.messages;
            first_checked = false;
            if let Some((committed, reply_subject)) = held.batch {
                self.drain().await;
                match check_preconditions(self.context, &committed.preconditions).await {
                    Ok(()) => {
                        let proposal = self.batch_proposal(committed, reply_subject);
                        self.propose(proposal).await;
                    }
                    Err(refusal) => reply(self.context, reply_subject, refusal),
                }
                continue;
            }
            let Some(first) = pending.first() else {
                return;
            };
            self.drain().await;
            let conditions = headers::parse_received(&first.headers)
                .map_err(|reason| ack::error_ack(&ApiError::bad_headers(&reason)))
                .and_then(|header_map| message_preconditions(self.context, header_map.as_ref()));
            let checked = match conditions {
                Ok(conditions) => check_preconditions(self.context, &conditions).await,
                Err(refusal) => Err(refusal),
            };
            match checked {
                Ok(()) => first_checked = true,
                Err(refusal) => {
                    let first = pending.remove(0);
                    reply(self.context, first.reply, refusal);
                }
            }
        }
    }

    async fn propose(&mut self, proposal: Proposal) {
        let Ok(slot) = Arc::clone(&self.slots).acquire_owned().await else {
            return;
        };
        self.in_flight += 1;
        spawn_proposal(
            self.context,
            proposal,
            slot,
            self.completions_sender.clone(),
        );
    }

    fn complete(&mut self, completed: Completed) {
        self.in_flight -= 1;
        finish(
            self.context,
            self.window,
            &mut self.waiting_duplicates,
            completed,
        );
    }

    /// Waits for every proposal in flight and answers its publishers.
    async fn drain(&mut self) {
        while self.in_flight > 0 {
            let Some(completed) = self.completions.recv().await else {
                return;
            };
            self.complete(completed);
        }
    }

    fn expire_batches(&mut self) {
        for id in self
            .atomic
            .expire(std::time::Instant::now(), &self.context.limits)
        {
            tracing::info!(stream = %self.context.group.name(), batch = %id, "an atomic batch timed out and was abandoned");
        }
    }

    fn abandon_batches(&mut self) {
        for id in self.atomic.staged_ids() {
            self.atomic.abandon(&id, &self.context.limits);
        }
    }
}

impl Leading<'_> {
    /// Checks a chunk of messages, answers the refused, the staged atomic
    /// messages and the duplicates of stored ones at once, and groups the
    /// rest into proposals, up to the first message or committed batch
    /// with preconditions (unless `first_checked`: the caller checked
    /// those of the chunk's first message), which is returned held with
    /// the messages after it.
    fn accept(
        &mut self,
        messages: Vec<crate::wire::Message>,
        mut first_checked: bool,
    ) -> (Vec<Proposal>, Held) {
        let context = self.context;
        let now = now_ns();
        let mut proposals = Vec::new();
        let mut current: Option<Proposal> = None;
        let mut current_bytes = 0usize;
        // One proposal is one frame: its records must fit the stream's frame.
        let proposal_bytes_max =
            PROPOSAL_BYTES_MAX.min(context.group.log().config().frame_bytes_max as usize);
        let mut messages = messages.into_iter();
        while let Some(message) = messages.next() {
            let checked = std::mem::take(&mut first_checked);
            let size = message.subject.len() + message.headers.len() + message.payload.len();
            let header_map = match refusal_of(context, &message, size) {
                Ok(header_map) => header_map,
                Err(refusal) => {
                    reply(context, message.reply, refusal);
                    continue;
                }
            };
            let message_id = header_map
                .as_ref()
                .and_then(|headers| headers.get(crate::batch::HEADER_MSG_ID))
                .map(|value| value.as_str().to_string())
                .filter(|id| !id.is_empty());
            if let Some(control) = crate::batch::atomic_headers(header_map.as_ref()) {
                let Some((committed, reply_subject)) =
                    self.accept_atomic(control, header_map.as_ref(), message, message_id)
                else {
                    continue;
                };
                proposals.extend(current.take());
                current_bytes = 0;
                if !committed.preconditions.is_empty() {
                    let held = Held {
                        batch: Some((committed, reply_subject)),
                        messages: messages.collect(),
                    };
                    return (proposals, held);
                }
                proposals.push(self.batch_proposal(committed, reply_subject));
                continue;
            }
            let has_conditions = match message_preconditions(context, header_map.as_ref()) {
                Ok(conditions) => !conditions.is_empty(),
                Err(refusal) => {
                    reply(context, message.reply, refusal);
                    continue;
                }
            };
            if let Some(id) = &message_id {
                match self.window.check(id, now) {
                    Some(Seen::Stored(offset)) => {
                        let body = ack::pub_ack(context.group.name(), offset, true);
                        reply(context, message.reply, body);
                        continue;
                    }
                    Some(Seen::Pending(first)) => {
                        self.waiting_duplicates
                            .entry(first)
                            .or_default()
                            .push((message.reply, id.clone()));
                        continue;
                    }
                    None => {}
                }
            }
            if has_conditions && !checked {
                proposals.extend(current);
                let mut held = vec![message];
                held.extend(messages);
                let held = Held {
                    batch: None,
                    messages: held,
                };
                return (proposals, held);
            }
            let encoded = size + natswal::format::record::RECORD_OVERHEAD;
            if current_bytes + encoded > proposal_bytes_max {
                proposals.extend(current.take());
                current_bytes = 0;
            }
            let proposal = current.get_or_insert_with(|| {
                self.token += 1;
                Proposal {
                    token: self.token,
                    batch: RecordBatch::default(),
                    replies: Vec::new(),
                    ids: Vec::new(),
                    atomic: None,
                }
            });
            if let Some(id) = &message_id {
                self.window.insert(id, Seen::Pending(proposal.token), now);
            }
            proposal.batch.records.push(ProposedRecord {
                timestamp_ns: 0,
                subject: message.subject,
                headers: message.headers,
                payload: message.payload,
            });
            proposal.replies.push(message.reply);
            proposal.ids.push(message_id);
            current_bytes += encoded;
        }
        proposals.extend(current);
        (proposals, Held::default())
    }

    /// One message of an atomic batch (the checks and staging of a
    /// standalone stream, `batch::AtomicBatches`): answered at once unless
    /// it commits the batch, whose records and ids are new.
    fn accept_atomic(
        &mut self,
        control: crate::batch::AtomicHeaders,
        header_map: Option<&async_nats::HeaderMap>,
        message: crate::wire::Message,
        message_id: Option<String>,
    ) -> Option<(CommittedBatch, Option<async_nats::Subject>)> {
        let context = self.context;
        let limits = &context.limits;
        let preconditions = match crate::batch::preconditions(header_map, context.group.name()) {
            Ok(preconditions) => preconditions,
            Err(error) => {
                // A message that can never pass fails its batch now.
                self.atomic.abandon(&control.id, limits);
                reply(context, message.reply, ack::error_ack(&error));
                return None;
            }
        };
        let record = natswal::Record {
            timestamp_ns: 0,
            subject: message.subject,
            headers: message.headers,
            payload: message.payload,
        };
        let outcome = self.atomic.accept(
            limits,
            control,
            header_map,
            record,
            message_id,
            preconditions,
            std::time::Instant::now(),
        );
        let committed = match outcome {
            AtomicOutcome::Staged => {
                reply(context, message.reply, bytes::Bytes::new());
                return None;
            }
            AtomicOutcome::Refused { error, .. } => {
                reply(context, message.reply, ack::error_ack(&error));
                return None;
            }
            AtomicOutcome::Commit(committed) => committed,
        };
        // Message ids must be new, in the window as well as in the batch.
        let now = now_ns();
        let duplicate = committed
            .message_ids
            .iter()
            .any(|(_, id)| self.window.check(id, now).is_some());
        if duplicate {
            let error = ApiError::new(
                400,
                10201,
                "atomic publish batch contains duplicate message id",
            );
            reply(context, message.reply, ack::error_ack(&error));
            return None;
        }
        Some((committed, message.reply))
    }

    /// A committed atomic batch as one proposal (one entry, one frame),
    /// its ids pending in the window.
    fn batch_proposal(
        &mut self,
        committed: CommittedBatch,
        reply_subject: Option<async_nats::Subject>,
    ) -> Proposal {
        self.token += 1;
        let now = now_ns();
        let count = committed.records.len();
        let mut ids = vec![None; count];
        for (index, id) in committed.message_ids {
            self.window.insert(&id, Seen::Pending(self.token), now);
            ids[index as usize] = Some(id);
        }
        let records = committed
            .records
            .into_iter()
            .map(|record| ProposedRecord {
                timestamp_ns: 0,
                subject: record.subject,
                headers: record.headers,
                payload: record.payload,
            })
            .collect();
        Proposal {
            token: self.token,
            batch: RecordBatch {
                atomic: true,
                records,
            },
            replies: vec![None; count],
            ids,
            atomic: Some((committed.id, reply_subject)),
        }
    }
}

/// The header map of a message, or the reply that refuses it (too large,
/// malformed or reserved headers, fast ingest).
fn refusal_of(
    context: &IntakeContext,
    message: &crate::wire::Message,
    size: usize,
) -> Result<Option<async_nats::HeaderMap>, bytes::Bytes> {
    if size as u64 > context.section.max_message_bytes {
        return Err(ack::error_ack(&ApiError::too_large()));
    }
    let header_map = headers::parse_received(&message.headers)
        .map_err(|reason| ack::error_ack(&ApiError::bad_headers(&reason)))?;
    if let Some(name) = headers::first_reserved(header_map.as_ref()) {
        return Err(ack::error_ack(&ApiError::reserved_header(&name)));
    }
    let fast = message
        .reply
        .as_deref()
        .is_some_and(|subject| crate::batch::parse_fast_reply(subject).is_some());
    if fast {
        return Err(ack::error_ack(&fast_ingest_refused()));
    }
    Ok(header_map)
}

/// A plain message's preconditions (and API level), or the reply that
/// refuses it.
fn message_preconditions(
    context: &IntakeContext,
    header_map: Option<&async_nats::HeaderMap>,
) -> Result<Vec<(u32, natswal::Precondition)>, bytes::Bytes> {
    crate::batch::check_api_level(header_map)
        .and_then(|()| crate::batch::preconditions(header_map, context.group.name()))
        .map(|conditions| {
            conditions
                .into_iter()
                .map(|condition| (0, condition))
                .collect()
        })
        .map_err(|error| ack::error_ack(&error))
}

/// Checks preconditions (each before record `index` of its entry) against
/// the stream once every entry of the leader's log is applied (nothing
/// proposes meanwhile), or returns the reply that refuses them.
async fn check_preconditions(
    context: &IntakeContext,
    conditions: &[(u32, natswal::Precondition)],
) -> Result<(), bytes::Bytes> {
    let unsettled = |reason: String| ack::error_ack(&not_committed(&reason));
    let next_offset = context
        .group
        .settle(context.commit_timeout)
        .await
        .map_err(|error| unsettled(error.to_string()))?;
    let last_offset = next_offset.saturating_sub(natswal::FIRST_OFFSET);
    let last_id = last_message_id(&context.group, last_offset)
        .await
        .map_err(unsettled)?;
    for (index, condition) in conditions {
        let last = last_offset + u64::from(*index);
        let id = if *index == 0 {
            last_id.as_deref()
        } else {
            None
        };
        condition
            .check(last, id)
            .map_err(|failure| ack::error_ack(&crate::batch::precondition_error(&failure)))?;
    }
    Ok(())
}

/// The `Nats-Msg-Id` of the record at `offset` (0: none; `None` without
/// an id), read from the applied log.
async fn last_message_id(
    group: &Arc<ReplicatedStream>,
    offset: u64,
) -> Result<Option<String>, String> {
    if offset == 0 {
        return Ok(None);
    }
    let group = Arc::clone(group);
    let read = tokio::task::spawn_blocking(move || -> natswal::Result<Option<String>> {
        let mut reader = group.reader(natswal::StartPosition::Offset(offset), None)?;
        let record = reader.next()?.filter(|record| record.offset == offset);
        Ok(record.and_then(|record| {
            headers::find(&record.headers, crate::batch::HEADER_MSG_ID)
                .filter(|id| !id.is_empty())
                .map(str::to_string)
        }))
    });
    match read.await {
        Ok(Ok(id)) => Ok(id),
        Ok(Err(error)) => Err(format!("reading the last record: {error}")),
        Err(error) => Err(format!("reading the last record: {error}")),
    }
}

fn spawn_proposal(
    context: &IntakeContext,
    proposal: Proposal,
    slot: tokio::sync::OwnedSemaphorePermit,
    completions: mpsc::UnboundedSender<Completed>,
) {
    let group = Arc::clone(&context.group);
    let timeout = context.commit_timeout;
    tokio::spawn(async move {
        let Proposal {
            token,
            batch,
            replies,
            ids,
            atomic,
        } = proposal;
        let result = match tokio::time::timeout(timeout, group.propose(batch)).await {
            Ok(Ok(applied)) => Ok(applied),
            Ok(Err(error)) => Err(error.to_string()),
            Err(_) => Err(format!(
                "not committed within {} (no quorum reached this leader); the message may or may not be stored: retry with the same Nats-Msg-Id",
                humantime::format_duration(timeout)
            )),
        };
        drop(slot);
        let _ = completions.send(Completed {
            token,
            result,
            replies,
            ids,
            atomic,
        });
    });
}

/// Answers a proposal's publishers and the duplicates that waited on it.
fn finish(
    context: &IntakeContext,
    window: &mut DuplicateWindow,
    waiting_duplicates: &mut Waiting,
    completed: Completed,
) {
    let stream = context.group.name();
    let duplicates = waiting_duplicates
        .remove(&completed.token)
        .unwrap_or_default();
    match completed.result {
        Ok(applied) => {
            let count = applied.next_offset - applied.base_offset;
            debug_assert_eq!(count as usize, completed.replies.len());
            let mut writer = ack::AckWriter::new(stream);
            for (index, (reply_subject, id)) in completed
                .replies
                .into_iter()
                .zip(&completed.ids)
                .enumerate()
            {
                let offset = applied.base_offset + index as u64;
                if let Some(id) = id {
                    window.resolve(id, completed.token, offset);
                }
                // An atomic batch's records have none: its commit gets one ack.
                if reply_subject.is_some() {
                    reply(context, reply_subject, writer.pub_ack(offset, false));
                }
            }
            if let Some((batch_id, reply_subject)) = &completed.atomic {
                let last = applied.next_offset - 1;
                let body = ack::batch_ack(stream, last, batch_id, count);
                reply(context, reply_subject.clone(), body);
            }
            for (reply_subject, id) in duplicates {
                let position = completed
                    .ids
                    .iter()
                    .position(|other| other.as_deref() == Some(id.as_str()))
                    .expect("a duplicate waits on the proposal holding its id");
                let body = writer.pub_ack(applied.base_offset + position as u64, true);
                reply(context, reply_subject, body);
            }
        }
        Err(reason) => {
            tracing::warn!(stream, records = completed.replies.len(), %reason, "a proposal was not committed: its publishers get an error");
            for id in completed.ids.iter().flatten() {
                window.forget(id, completed.token);
            }
            let error = ack::error_ack(&not_committed(&reason));
            let batch_reply = completed.atomic.and_then(|(_, reply)| reply);
            for reply_subject in completed
                .replies
                .into_iter()
                .chain(std::iter::once(batch_reply))
                .chain(duplicates.into_iter().map(|(reply, _)| reply))
            {
                reply(context, reply_subject, error.clone());
            }
        }
    }
}

/// JSClusterNotAvailErr: the publisher should retry (with its
/// `Nats-Msg-Id`, the new leader answers a stored copy's offset).
fn not_committed(reason: &str) -> ApiError {
    ApiError::new(503, 10008, format!("not stored at quorum: {reason}"))
}

fn fast_ingest_refused() -> ApiError {
    ApiError::new(
        400,
        10003,
        "fast-ingest batches are not built for replicated streams yet (atomic batches are)",
    )
}

fn reply(context: &IntakeContext, subject: Option<async_nats::Subject>, body: bytes::Bytes) {
    let Some(subject) = subject else {
        return;
    };
    if let Err(error) = context.client.publish(&subject, &body) {
        tracing::warn!(stream = %context.group.name(), %error, "cannot publish a reply");
    }
}
