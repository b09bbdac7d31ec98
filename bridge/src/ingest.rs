//! Ingest: moves messages from a stream's NATS subscriptions into the
//! BatchCoordinator without waiting for each one's durability on the
//! receiving task, and publishes each message's ack only after its append
//! is durable at the stream's level.
//!
//! Per stream there is one receiving task (all of the stream's
//! subscriptions merged) and one ack task. The receiving task takes every
//! message that is already waiting (up to [`CHUNK_MESSAGES_MAX`]) and submits
//! them as one append request per frame's worth of bytes, so the engine
//! handles one queue entry and one completion per group instead of per
//! message. It then queues one [`AckItem`] per message, in arrival order; the
//! ack task answers them in that order as groups complete. Order matters for
//! deduplication (a copy of a `Nats-Msg-Id` that is still pending is answered
//! after its first copy, with the first copy's offset) and for the batch
//! protocols of [`crate::batch`] (a flow ack goes out only after every
//! message before it is durable).
//!
//! Messages with preconditions and committed atomic batches are requests of
//! their own, so the writer checks them in offset order.

use crate::ack::{self, AckWriter, ApiError};
use crate::batch::{
    self, AtomicBatches, AtomicOutcome, BatchLimits, FastBatch, FastBatches, FastOperation,
};
use crate::dedup::{now_ns, DuplicateWindow, Seen};
use crate::headers;
use crate::integer_map::IntegerMap;
use crate::metrics::StreamCounters;
use bytes::Bytes;
use natswal::{AppendOutcome, AppendRequest, Completed, Completion, Record, Stream};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{mpsc, watch};

/// Messages taken from the subscriptions at once (those already waiting).
const CHUNK_MESSAGES_MAX: usize = 1024;

/// Ack items (one per message, stored or not: duplicates, refusals of
/// batches, pings) queued for the ack task at most per stream. Stored
/// messages are bounded by the engine's queue budget as well; this bounds
/// the rest, so a flood of duplicates waiting behind a slow sync cannot
/// grow memory without limit. Past it the receiving task waits, and NATS
/// buffers (then drops, for a slow consumer) what follows.
const ACK_ITEMS_MAX: usize = 65_536;

/// How long a graceful shutdown waits for in-flight messages to arrive.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How a grouped (submitted) message is answered once its group completes.
enum GroupedKind {
    /// A plain publish: a PubAck.
    Plain {
        message_number: u64,
        message_id: Option<String>,
    },
    /// The commit of an atomic batch (a group of its own).
    AtomicCommit {
        batch_id: String,
        count: u64,
        message_ids: Vec<(u32, String, u64)>,
    },
    /// A fast-ingest message: a flow ack when due, or the final PubAck.
    FastStored {
        batch_id: String,
        sequence: u64,
        commit: bool,
        message_number: u64,
        message_id: Option<String>,
    },
}

/// What the ack task owes, in arrival order.
enum AckItem {
    /// Record `index` of append group `group`; `last` marks the group's last.
    Grouped {
        group: u64,
        index: u32,
        last: bool,
        reply: Option<async_nats::Subject>,
        kind: GroupedKind,
    },
    Duplicate {
        reply: Option<async_nats::Subject>,
        message_id: String,
    },
    /// A fast-ingest message that counts as handled without being stored
    /// (a duplicate, or a failed precondition in `ok` mode).
    FastSkipped {
        batch_id: String,
        sequence: u64,
        commit: bool,
        reply: Option<async_nats::Subject>,
        /// For a duplicate: the id whose first copy must turn out stored
        /// (it is answered after that copy, in arrival order) before this
        /// one counts as persisted.
        duplicate_of: Option<String>,
    },
    /// A fast-ingest batch ends (commit without storing, a gap or an error
    /// in `fail` mode): a PubAck counting `count` messages.
    FastEnd {
        batch_id: String,
        count: u64,
        reply: Option<async_nats::Subject>,
    },
    /// A ping: resend the latest flow ack.
    FastPing {
        batch_id: String,
        reply: async_nats::Subject,
    },
}

/// Everything ingest needs for one stream.
#[derive(Clone)]
pub struct IngestContext {
    pub stream: Arc<Stream>,
    /// natswal's own client ([`crate::wire`]): the ingest connection.
    pub client: crate::wire::Client,
    pub counters: Arc<StreamCounters>,
    pub duplicates: Arc<Mutex<DuplicateWindow>>,
    pub max_message_bytes: u64,
    pub limits: BatchLimits,
    pub fast: Arc<Mutex<FastBatches>>,
    /// Subject prefix of natswal's API (for batch advisories).
    pub api_prefix: String,
    /// Turns true when a shutdown gives up on NATS (its timeout passed or
    /// a second signal came): replies not yet sent are dropped and counted.
    pub abandon: watch::Receiver<bool>,
}

/// Resolves true once shutdown gives up on NATS (false if it never can).
pub async fn gave_up(abandon: &mut watch::Receiver<bool>) -> bool {
    abandon.wait_for(|gave_up| *gave_up).await.is_ok()
}

/// Whether shutdown gave up on NATS.
fn abandoned(context: &IngestContext) -> bool {
    *context.abandon.borrow()
}

/// Spaces out the warnings of replies that cannot be queued: when the
/// output buffer is full, every ack fails at once.
static REPLY_WARNINGS: crate::metrics::Spacing = crate::metrics::Spacing::every_ms(10_000);

/// Queues one reply for the ingest connection's writer (it never waits),
/// unless shutdown gave up on NATS; a reply not queued is counted as
/// undelivered.
fn publish_reply(context: &IngestContext, reply: async_nats::Subject, body: Bytes) {
    let published = if abandoned(context) {
        Ok(false)
    } else {
        context.client.publish(&reply, &body).map(|()| true)
    };
    match published {
        Ok(true) => return,
        Ok(false) => {}
        Err(error) => {
            if REPLY_WARNINGS.due() {
                tracing::warn!(stream = %context.stream.name(), %error, "cannot publish a reply (this warning repeats at most every 10 s; natswal_replies_undelivered_total counts them all)");
            }
        }
    }
    context
        .counters
        .replies_undelivered
        .fetch_add(1, Ordering::Relaxed);
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Receives until `shutdown` turns true or the subscriptions end, then
/// stops intake (drains the subscriptions: unsubscribe, but take what is
/// already on its way) and waits until every accepted message has been
/// acknowledged.
pub async fn run(
    context: IngestContext,
    mut subscription: crate::wire::Subscription,
    mut shutdown: watch::Receiver<bool>,
) {
    let (completions_sender, completions) = mpsc::unbounded_channel::<Completed>();
    let (items_sender, items) = mpsc::unbounded_channel::<Vec<AckItem>>();
    let items_room = Arc::new(tokio::sync::Semaphore::new(ACK_ITEMS_MAX));
    let ack_task = tokio::spawn(run_acks(
        context.clone(),
        items,
        completions,
        Arc::clone(&items_room),
    ));
    let stream_name = context.stream.name().to_string();
    let mut abandon = context.abandon.clone();
    let mut state = IngestState {
        atomic: AtomicBatches::new(),
        group: 0,
        message: 0,
    };
    let mut sweep = tokio::time::interval(std::time::Duration::from_millis(500));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    loop {
        let chunk = tokio::select! {
            biased;
            () = async { let _ = shutdown.wait_for(|stop| *stop).await; }, if drain_deadline.is_none() => {
                drain(&context, &subscription).await;
                drain_deadline = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                continue;
            }
            _ = tokio::time::sleep_until(drain_deadline.unwrap_or_else(tokio::time::Instant::now)), if drain_deadline.is_some() => {
                tracing::warn!(stream = %stream_name, "subscriptions did not finish draining in time; stopping intake");
                break;
            }
            true = gave_up(&mut abandon) => {
                tracing::warn!(stream = %stream_name, "shutdown gave up on NATS; stopping intake");
                break;
            }
            _ = sweep.tick() => {
                expire_batches(&context, &mut state).await;
                continue;
            }
            chunk = subscription.next_chunk(CHUNK_MESSAGES_MAX) => match chunk {
                Some(chunk) => chunk,
                None => break,
            },
        };
        let items = accept_chunk(&context, &mut state, chunk, &completions_sender).await;
        // At most two items per message: more room than exists would never come.
        assert!(items.len() <= 2 * CHUNK_MESSAGES_MAX && 2 * CHUNK_MESSAGES_MAX <= ACK_ITEMS_MAX);
        // Room for these items; the ack task gives it back as it answers.
        match items_room.acquire_many(items.len() as u32).await {
            Ok(room) => room.forget(),
            Err(_) => break,
        }
        if items_sender.send(items).is_err() {
            break;
        }
    }
    drop(subscription);
    drop(items_sender);
    drop(completions_sender);
    if ack_task.await.is_err() {
        tracing::error!(stream = %stream_name, "ack task failed");
    }
}

/// Stops intake: unsubscribes every subscription, keeping what is already
/// on its way (the subscriptions end once the server confirmed the
/// unsubscribe); gives up when shutdown gives up on NATS.
async fn drain(context: &IngestContext, subscription: &crate::wire::Subscription) {
    let mut abandon = context.abandon.clone();
    let drained = tokio::select! {
        biased;
        true = gave_up(&mut abandon) => return,
        drained = context.client.drain(subscription.sids()) => drained,
    };
    if !drained {
        tracing::warn!(stream = %context.stream.name(), "NATS did not confirm the end of the subscriptions (the connection broke)");
    }
}

/// State of the receiving task.
struct IngestState {
    atomic: AtomicBatches,
    group: u64,
    message: u64,
}

/// Abandons atomic batches and forgets fast-ingest batches that went quiet.
async fn expire_batches(context: &IngestContext, state: &mut IngestState) {
    let now = Instant::now();
    for batch_id in state.atomic.expire(now, &context.limits) {
        tracing::info!(stream = %context.stream.name(), batch = %batch_id, "atomic batch abandoned after inactivity");
        publish_abandoned(context, &batch_id, batch::AbandonReason::Timeout).await;
    }
    let mut fast = lock(&context.fast);
    let quiet: Vec<String> = fast
        .batches
        .iter()
        .filter(|(_, batch)| now.duration_since(batch.last_activity) >= context.limits.timeout)
        .map(|(id, _)| id.clone())
        .collect();
    for id in quiet {
        fast.batches.remove(&id);
        context
            .limits
            .server
            .fast_inflight
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// The advisory of an abandoned atomic batch, on
/// `<prefix>.ADVISORY.BATCH_ABANDONED.<stream>`.
async fn publish_abandoned(context: &IngestContext, batch_id: &str, reason: batch::AbandonReason) {
    let subject = format!(
        "{}.ADVISORY.BATCH_ABANDONED.{}",
        context.api_prefix,
        context.stream.name()
    );
    let body = serde_json::json!({
        "type": "io.nats.jetstream.advisory.v1.stream_batch_abandoned",
        "time": humantime::format_rfc3339_nanos(std::time::SystemTime::now()).to_string(),
        "stream": context.stream.name(),
        "batch": batch_id,
        "reason": reason.as_str(),
    });
    if let Err(error) = context
        .client
        .publish(&subject, body.to_string().as_bytes())
    {
        tracing::warn!(%error, "cannot publish a batch advisory");
    }
}

/// A group of records that becomes one append request.
struct Group {
    token: u64,
    records: Vec<Record>,
    bytes: u64,
    /// Position in the item list of the group's last grouped item.
    last_item: Option<usize>,
    last_message_id: Option<Arc<str>>,
}

impl Group {
    fn new(token: u64) -> Group {
        Group {
            token,
            records: Vec::new(),
            bytes: 0,
            last_item: None,
            last_message_id: None,
        }
    }
}

/// Accumulates a chunk's groups and items.
struct ChunkBuilder<'a> {
    context: &'a IngestContext,
    completions: &'a mpsc::UnboundedSender<Completed>,
    items: Vec<AckItem>,
    /// Replies that depend on nothing durable (refusals, empty replies to
    /// staged atomic messages, fast-ingest control messages): sent at once,
    /// not behind other publishers' acks.
    immediate: Replies,
    group: Group,
}

impl ChunkBuilder<'_> {
    fn reply_now(&mut self, reply: Option<async_nats::Subject>, body: Bytes) {
        if let Some(reply) = reply {
            self.immediate.push((reply, body));
        }
    }

    /// Adds a record to the current group (submitting the group first if
    /// the record would overflow a frame).
    async fn push(
        &mut self,
        state: &mut IngestState,
        record: Record,
        message_id: Option<&str>,
        reply: Option<async_nats::Subject>,
        kind: GroupedKind,
    ) {
        let size = record.encoded_length() as u64;
        if !self.group.records.is_empty()
            && self.group.bytes + size > self.context.stream.config().frame_bytes_max
        {
            self.flush(state).await;
        }
        self.group.bytes += size;
        self.group.records.push(record);
        self.group.last_message_id = message_id.map(Arc::from);
        self.group.last_item = Some(self.items.len());
        self.items.push(AckItem::Grouped {
            group: self.group.token,
            index: (self.group.records.len() - 1) as u32,
            last: false,
            reply,
            kind,
        });
    }

    /// Submits `records` as a request of its own (after the current group).
    async fn push_alone(
        &mut self,
        state: &mut IngestState,
        request: AppendRequest,
        reply: Option<async_nats::Subject>,
        kind: GroupedKind,
    ) {
        self.flush(state).await;
        let count = request.records.len() as u32;
        self.items.push(AckItem::Grouped {
            group: self.group.token,
            index: count - 1,
            last: true,
            reply,
            kind,
        });
        let token = self.group.token;
        state.group += 1;
        self.group = Group::new(state.group);
        submit(self.context, request, token, self.completions).await;
    }

    /// Submits the current group and starts the next.
    async fn flush(&mut self, state: &mut IngestState) {
        state.group += 1;
        let full = std::mem::replace(&mut self.group, Group::new(state.group));
        let Some(last_item) = full.last_item else {
            return;
        };
        if let AckItem::Grouped { last, .. } = &mut self.items[last_item] {
            *last = true;
        }
        let request = AppendRequest {
            records: full.records,
            last_message_id: full.last_message_id,
            ..AppendRequest::default()
        };
        submit(self.context, request, full.token, self.completions).await;
    }
}

/// Submits one request (waiting only for queue space).
async fn submit(
    context: &IngestContext,
    request: AppendRequest,
    token: u64,
    completions: &mpsc::UnboundedSender<Completed>,
) {
    let completion = Completion::Channel {
        sender: completions.clone(),
        token,
    };
    if let Err(error) = context.stream.submit(request, completion).await {
        // Not queued: report it through the same path as engine results.
        let _ = completions.send(Completed {
            token,
            result: Err(error),
        });
    }
}

/// Takes a chunk of messages: rejects, deduplicates, stages or groups them,
/// submits the groups, and returns the ack items in arrival order.
async fn accept_chunk(
    context: &IngestContext,
    state: &mut IngestState,
    messages: Vec<crate::wire::Message>,
    completions: &mpsc::UnboundedSender<Completed>,
) -> Vec<AckItem> {
    let counters = &context.counters;
    state.group += 1;
    let mut chunk = ChunkBuilder {
        context,
        completions,
        items: Vec::with_capacity(messages.len()),
        immediate: Vec::new(),
        group: Group::new(state.group),
    };
    for message in messages {
        state.message += 1;
        counters.ingest_messages.fetch_add(1, Ordering::Relaxed);
        counters
            .ingest_bytes
            .fetch_add(message.payload.len() as u64, Ordering::Relaxed);
        let size = (message.subject.len() + message.headers.len() + message.payload.len()) as u64;
        if size > context.max_message_bytes {
            counters.error("too_large");
            chunk.reply_now(message.reply, ack::error_ack(&ApiError::too_large()));
            continue;
        }
        let header_map = match headers::parse_received(&message.headers) {
            Ok(header_map) => header_map,
            Err(reason) => {
                counters.error("bad_headers");
                chunk.reply_now(
                    message.reply,
                    ack::error_ack(&ApiError::bad_headers(&reason)),
                );
                continue;
            }
        };
        if let Some(name) = headers::first_reserved(header_map.as_ref()) {
            // Replay marks its status messages with these names; a record
            // carrying one could pass for the end of a replay.
            counters.error("reserved_header");
            chunk.reply_now(
                message.reply,
                ack::error_ack(&ApiError::reserved_header(&name)),
            );
            continue;
        }
        let message_id = header_map
            .as_ref()
            .and_then(|headers| headers.get(batch::HEADER_MSG_ID))
            .map(|value| value.as_str().to_string())
            .filter(|id| !id.is_empty());
        let record = Record {
            timestamp_ns: 0,
            subject: message.subject,
            // As the publisher sent them.
            headers: message.headers,
            payload: message.payload,
        };
        let headers = header_map.as_ref();
        if let Some(fast) = message.reply.as_deref().and_then(batch::parse_fast_reply) {
            let reply = message.reply.clone().expect("fast ingest has a reply");
            accept_fast(&mut chunk, state, fast, reply, headers, record, message_id).await;
            continue;
        }
        if let Some(control) = batch::atomic_headers(headers) {
            accept_atomic(
                &mut chunk,
                state,
                control,
                message.reply,
                headers,
                record,
                message_id,
            )
            .await;
            continue;
        }
        let checked = batch::check_api_level(headers)
            .and_then(|()| batch::preconditions(headers, context.stream.name()));
        let preconditions = match checked {
            Ok(preconditions) => preconditions,
            Err(error) => {
                counters.error("refused");
                chunk.reply_now(message.reply, ack::error_ack(&error));
                continue;
            }
        };
        if let Some(id) = &message_id {
            let mut window = lock(&context.duplicates);
            let now = now_ns();
            if window.check(id, now).is_some() {
                counters.duplicates.fetch_add(1, Ordering::Relaxed);
                chunk.items.push(AckItem::Duplicate {
                    reply: message.reply,
                    message_id: id.clone(),
                });
                continue;
            }
            window.insert(id, Seen::Pending(state.message), now);
        }
        let kind = GroupedKind::Plain {
            message_number: state.message,
            message_id: message_id.clone(),
        };
        if preconditions.is_empty() {
            chunk
                .push(state, record, message_id.as_deref(), message.reply, kind)
                .await;
        } else {
            let request = AppendRequest {
                records: vec![record],
                preconditions: preconditions
                    .into_iter()
                    .map(|precondition| (0, precondition))
                    .collect(),
                last_message_id: message_id.as_deref().map(Arc::from),
                ..AppendRequest::default()
            };
            chunk.push_alone(state, request, message.reply, kind).await;
        }
    }
    chunk.flush(state).await;
    for (reply, body) in chunk.immediate {
        publish_reply(context, reply, body);
    }
    chunk.items
}

/// One message of an atomic batch.
async fn accept_atomic(
    chunk: &mut ChunkBuilder<'_>,
    state: &mut IngestState,
    control: batch::AtomicHeaders,
    reply: Option<async_nats::Subject>,
    headers: Option<&async_nats::HeaderMap>,
    record: Record,
    message_id: Option<String>,
) {
    let context = chunk.context;
    let preconditions = match batch::preconditions(headers, context.stream.name()) {
        Ok(preconditions) => preconditions,
        Err(error) => {
            // A message that can never pass fails its batch now rather
            // than at commit; the batch is abandoned either way.
            if state.atomic.abandon(&control.id, &context.limits) {
                publish_abandoned(context, &control.id, batch::AbandonReason::Unsupported).await;
            }
            chunk.reply_now(reply, ack::error_ack(&error));
            return;
        }
    };
    match state.atomic.accept(
        &context.limits,
        control,
        headers,
        record,
        message_id,
        preconditions,
        Instant::now(),
    ) {
        AtomicOutcome::Staged => chunk.reply_now(reply, Bytes::new()),
        AtomicOutcome::Refused { error, abandoned } => {
            context.counters.error("batch_refused");
            if let Some((batch_id, reason)) = abandoned {
                publish_abandoned(context, &batch_id, reason).await;
            }
            chunk.reply_now(reply, ack::error_ack(&error));
        }
        AtomicOutcome::Commit(committed) => {
            // Message ids must be new, in the window as well as in the batch.
            let message_ids = {
                let mut window = lock(&context.duplicates);
                let now = now_ns();
                if committed
                    .message_ids
                    .iter()
                    .any(|(_, id)| window.check(id, now).is_some())
                {
                    None
                } else {
                    let mut message_ids = Vec::with_capacity(committed.message_ids.len());
                    for (index, id) in &committed.message_ids {
                        state.message += 1;
                        window.insert(id, Seen::Pending(state.message), now);
                        message_ids.push((*index, id.clone(), state.message));
                    }
                    Some(message_ids)
                }
            };
            let Some(message_ids) = message_ids else {
                chunk.reply_now(
                    reply,
                    ack::error_ack(&ApiError::new(
                        400,
                        10201,
                        "atomic publish batch contains duplicate message id",
                    )),
                );
                return;
            };
            let count = committed.records.len() as u64;
            let last_message_id = message_ids
                .last()
                .filter(|(index, _, _)| u64::from(*index) + 1 == count)
                .map(|(_, id, _)| Arc::from(id.as_str()));
            let request = AppendRequest {
                records: committed.records,
                atomic: true,
                preconditions: committed.preconditions,
                last_message_id,
                ..AppendRequest::default()
            };
            let kind = GroupedKind::AtomicCommit {
                batch_id: committed.id,
                count,
                message_ids,
            };
            chunk.push_alone(state, request, reply, kind).await;
        }
    }
}

/// One message of a fast-ingest batch.
async fn accept_fast(
    chunk: &mut ChunkBuilder<'_>,
    state: &mut IngestState,
    fast: Result<batch::FastControl, ()>,
    reply: async_nats::Subject,
    headers: Option<&async_nats::HeaderMap>,
    record: Record,
    message_id: Option<String>,
) {
    let context = chunk.context;
    if !context.limits.allow_batched {
        return reject_fast(
            chunk,
            &reply,
            ApiError::new(400, 10205, "batch publish is disabled"),
        );
    }
    let Ok(control) = fast else {
        return reject_fast(
            chunk,
            &reply,
            ApiError::new(400, 10206, "batch publish pattern is invalid"),
        );
    };
    if control.id.len() > 64 {
        return reject_fast(
            chunk,
            &reply,
            ApiError::new(400, 10207, "batch publish ID is invalid"),
        );
    }
    // Decide under the lock, await only after it is released.
    let Some((id, commit, gap_ok)) = fast_step(chunk, &control, reply.clone(), headers) else {
        return;
    };
    let preconditions = match batch::preconditions(headers, context.stream.name()) {
        Ok(preconditions) => preconditions,
        Err(error) => {
            chunk.reply_now(
                Some(reply.clone()),
                batch::flow_error(control.sequence, &error),
            );
            fast_after_error(chunk, &id, control.sequence, commit, gap_ok, reply);
            return;
        }
    };
    if let Some(message_id) = &message_id {
        let duplicate = {
            let mut window = lock(&context.duplicates);
            let now = now_ns();
            let duplicate = window.check(message_id, now).is_some();
            if !duplicate {
                window.insert(message_id, Seen::Pending(state.message), now);
            }
            duplicate
        };
        if duplicate {
            context.counters.duplicates.fetch_add(1, Ordering::Relaxed);
            chunk.items.push(AckItem::FastSkipped {
                batch_id: id,
                sequence: control.sequence,
                commit,
                reply: Some(reply),
                duplicate_of: Some(message_id.clone()),
            });
            return;
        }
    }
    let kind = GroupedKind::FastStored {
        batch_id: id,
        sequence: control.sequence,
        commit,
        message_number: state.message,
        message_id: message_id.clone(),
    };
    if preconditions.is_empty() {
        chunk
            .push(state, record, message_id.as_deref(), Some(reply), kind)
            .await;
    } else {
        let request = AppendRequest {
            records: vec![record],
            preconditions: preconditions
                .into_iter()
                .map(|precondition| (0, precondition))
                .collect(),
            last_message_id: message_id.as_deref().map(Arc::from),
            ..AppendRequest::default()
        };
        chunk.push_alone(state, request, Some(reply), kind).await;
    }
}

/// The control-channel part of a fast-ingest message, under the batches
/// lock: gaps, pings, commits without storing. Returns the batch id, whether
/// the message commits, and the gap mode when the message is to be stored.
fn fast_step(
    chunk: &mut ChunkBuilder<'_>,
    control: &batch::FastControl,
    reply: async_nats::Subject,
    headers: Option<&async_nats::HeaderMap>,
) -> Option<(String, bool, bool)> {
    let context = chunk.context;
    let limits = &context.limits;
    let now = Instant::now();
    let mut fast_batches = lock(&context.fast);
    if !fast_batches.batches.contains_key(&control.id) {
        if control.sequence != 1 {
            drop(fast_batches);
            reject_fast(
                chunk,
                &reply,
                ApiError::new(400, 10208, "batch publish ID unknown"),
            );
            return None;
        }
        let server = &limits.server;
        let taken = fast_batches.batches.len() >= limits.fast_inflight_max
            || server
                .fast_inflight
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |count| {
                    (count < server.fast_inflight_max).then_some(count + 1)
                })
                .is_err();
        if taken {
            drop(fast_batches);
            reject_fast(
                chunk,
                &reply,
                ApiError::new(429, 10211, "batch publish too many inflight"),
            );
            return None;
        }
        let batch = FastBatch {
            gap_ok: control.gap_ok,
            flow_max: control.flow,
            flow: 1,
            received: 0,
            persisted: 0,
            acked: 0,
            last_offset: 0,
            ending: false,
            last_activity: now,
            reply: None,
        };
        fast_batches.batches.insert(control.id.clone(), batch);
        let initial = fast_batches.initial_flow(control.flow);
        fast_batches
            .batches
            .get_mut(&control.id)
            .expect("inserted")
            .flow = initial;
    }
    if let Err(error) = batch::check_api_level(headers) {
        fast_batches.batches.remove(&control.id);
        limits.server.fast_inflight.fetch_sub(1, Ordering::AcqRel);
        drop(fast_batches);
        reject_fast(chunk, &reply, error);
        return None;
    }
    let batch = fast_batches.batches.get_mut(&control.id).expect("present");
    batch.last_activity = now;
    let id = control.id.clone();
    if control.operation == FastOperation::Ping {
        if control.sequence > batch.received {
            chunk.reply_now(
                Some(reply.clone()),
                batch::flow_gap(batch.received + 1, control.sequence + 1),
            );
            if batch.gap_ok {
                batch.received = control.sequence;
                chunk.items.push(AckItem::FastSkipped {
                    batch_id: id.clone(),
                    sequence: control.sequence,
                    commit: false,
                    reply: Some(reply.clone()),
                    duplicate_of: None,
                });
            } else {
                batch.ending = true;
                let count = batch.received;
                chunk.items.push(AckItem::FastEnd {
                    batch_id: id,
                    count,
                    reply: Some(reply),
                });
                return None;
            }
        }
        chunk.items.push(AckItem::FastPing {
            batch_id: id,
            reply,
        });
        return None;
    }
    if batch.ending {
        // The batch ends after an error or gap; the client waits for the
        // final PubAck, later messages are not taken.
        return None;
    }
    let expected = batch.received + 1;
    if control.sequence != expected {
        if control.sequence > expected {
            chunk.reply_now(
                Some(reply.clone()),
                batch::flow_gap(expected, control.sequence),
            );
        }
        if batch.gap_ok && control.sequence > expected {
            // Messages expected..sequence were lost; go on from here.
            batch.received = control.sequence - 1;
            chunk.items.push(AckItem::FastSkipped {
                batch_id: id.clone(),
                sequence: control.sequence - 1,
                commit: false,
                reply: Some(reply.clone()),
                duplicate_of: None,
            });
        } else {
            batch.ending = true;
            let count = batch.received;
            chunk.items.push(AckItem::FastEnd {
                batch_id: id,
                count,
                reply: Some(reply),
            });
            return None;
        }
    }
    if control.operation == FastOperation::CommitEob {
        batch.ending = true;
        let count = batch.received;
        chunk.items.push(AckItem::FastEnd {
            batch_id: id,
            count,
            reply: Some(reply),
        });
        return None;
    }
    batch.received = control.sequence;
    let commit = control.operation == FastOperation::Commit;
    if commit {
        batch.ending = true;
    }
    if control.sequence == 1 && !commit {
        // The first message learns the flow the server allows.
        chunk.reply_now(Some(reply.clone()), batch::flow_ack(0, batch.flow));
    }
    Some((id, commit, batch.gap_ok))
}

fn reject_fast(chunk: &mut ChunkBuilder<'_>, reply: &async_nats::Subject, error: ApiError) {
    chunk.context.counters.error("batch_refused");
    chunk.reply_now(Some(reply.clone()), ack::error_ack(&error));
}

/// After a fast-ingest message failed: in `ok` mode it is skipped, in
/// `fail` mode the batch ends before it.
fn fast_after_error(
    chunk: &mut ChunkBuilder<'_>,
    id: &str,
    sequence: u64,
    commit: bool,
    gap_ok: bool,
    reply: async_nats::Subject,
) {
    if gap_ok && !commit {
        chunk.items.push(AckItem::FastSkipped {
            batch_id: id.to_string(),
            sequence,
            commit: false,
            reply: None,
            duplicate_of: None,
        });
    } else {
        if let Some(batch) = lock(&chunk.context.fast).batches.get_mut(id) {
            batch.ending = true;
        }
        chunk.items.push(AckItem::FastEnd {
            batch_id: id.to_string(),
            count: if commit && gap_ok {
                sequence
            } else {
                sequence - 1
            },
            reply: Some(reply),
        });
    }
}

/// Answers [`AckItem`]s in arrival order as their groups complete.
async fn run_acks(
    context: IngestContext,
    mut items: mpsc::UnboundedReceiver<Vec<AckItem>>,
    mut completions: mpsc::UnboundedReceiver<Completed>,
    items_room: Arc<tokio::sync::Semaphore>,
) {
    let mut queue: VecDeque<AckItem> = VecDeque::new();
    let mut results: IntegerMap<natswal::Result<AppendOutcome>> = IntegerMap::default();
    let mut items_open = true;
    let mut completions_open = true;
    let stream_name = context.stream.name().to_string();
    let mut writer = AckWriter::new(&stream_name);
    let mut abandon = context.abandon.clone();
    loop {
        tokio::select! {
            true = gave_up(&mut abandon), if items_open || completions_open => break,
            batch = items.recv(), if items_open => match batch {
                Some(batch) => queue.extend(batch),
                None => items_open = false,
            },
            completed = completions.recv(), if completions_open => match completed {
                Some(completed) => { results.insert(completed.token, completed.result); }
                None => completions_open = false,
            },
            else => break,
        }
        while let Some(front) = queue.front() {
            if let AckItem::Grouped { group, .. } = front {
                if !results.contains_key(group) {
                    break;
                }
            }
            let item = queue.pop_front().expect("front exists");
            items_room.add_permits(1);
            for (reply, body) in answer(&context, &mut writer, &mut results, item) {
                publish_reply(&context, reply, body);
            }
        }
        if !items_open && queue.is_empty() {
            break;
        }
    }
    if abandoned(&context) {
        // What is still queued is synced by the store's close, but its
        // replies cannot be sent: count them, the publishers retry.
        while let Ok(batch) = items.try_recv() {
            queue.extend(batch);
        }
        let unanswered = queue.iter().filter(|item| item.has_reply()).count() as u64;
        context
            .counters
            .replies_undelivered
            .fetch_add(unanswered, Ordering::Relaxed);
    }
}

impl AckItem {
    fn has_reply(&self) -> bool {
        match self {
            AckItem::Grouped { reply, .. }
            | AckItem::Duplicate { reply, .. }
            | AckItem::FastSkipped { reply, .. }
            | AckItem::FastEnd { reply, .. } => reply.is_some(),
            AckItem::FastPing { .. } => true,
        }
    }
}

type Replies = Vec<(async_nats::Subject, Bytes)>;

fn reply_to(reply: Option<async_nats::Subject>, body: Bytes) -> Replies {
    reply.map(|reply| vec![(reply, body)]).unwrap_or_default()
}

/// The messages that answer one item (its group, if any, has completed).
fn answer(
    context: &IngestContext,
    writer: &mut AckWriter,
    results: &mut IntegerMap<natswal::Result<AppendOutcome>>,
    item: AckItem,
) -> Replies {
    match item {
        AckItem::Grouped {
            group,
            index,
            last,
            reply,
            kind,
        } => {
            let result = match results
                .get(&group)
                .expect("the caller checked the result is in")
            {
                Ok(outcome) => Ok((outcome.first_offset + u64::from(index), *outcome)),
                Err(error) => Err(error.duplicate()),
            };
            if last {
                results.remove(&group);
            }
            answer_grouped(context, writer, result, reply, kind)
        }
        AckItem::Duplicate { reply, message_id } => {
            let seen = lock(&context.duplicates).check(&message_id, now_ns());
            let body = match seen {
                Some(Seen::Stored(offset)) => writer.pub_ack(offset, true),
                _ => ack::error_ack(&first_copy_not_stored(&message_id)),
            };
            reply_to(reply, body)
        }
        AckItem::FastSkipped {
            batch_id,
            sequence,
            commit,
            reply,
            duplicate_of,
        } => {
            if let Some(message_id) = duplicate_of {
                let seen = lock(&context.duplicates).check(&message_id, now_ns());
                if !matches!(seen, Some(Seen::Stored(_))) {
                    return end_fast_unstored(context, &batch_id, &message_id, reply);
                }
            }
            let mut fast = lock(&context.fast);
            let Some(batch) = fast.batches.get_mut(&batch_id) else {
                return Vec::new();
            };
            batch.persisted = batch.persisted.max(sequence);
            if commit {
                let body = ack::batch_ack(
                    context.stream.name(),
                    batch.last_offset,
                    &batch_id,
                    sequence,
                );
                remove_fast(context, &mut fast, &batch_id);
                return reply_to(reply, body);
            }
            match (fast.flow_ack_due(&batch_id), reply) {
                (Some(body), Some(reply)) => vec![(reply, body)],
                _ => Vec::new(),
            }
        }
        AckItem::FastEnd {
            batch_id,
            count,
            reply,
        } => {
            let mut fast = lock(&context.fast);
            let Some(batch) = fast.batches.get(&batch_id) else {
                return Vec::new();
            };
            let body = ack::batch_ack(context.stream.name(), batch.last_offset, &batch_id, count);
            remove_fast(context, &mut fast, &batch_id);
            reply_to(reply, body)
        }
        AckItem::FastPing { batch_id, reply } => {
            let fast = lock(&context.fast);
            match fast.batches.get(&batch_id) {
                Some(batch) => vec![(reply, batch::flow_ack(batch.acked, batch.flow))],
                None => Vec::new(),
            }
        }
    }
}

/// The 503 of a copy whose first copy was not stored: retry.
fn first_copy_not_stored(message_id: &str) -> ApiError {
    ApiError::new(
        503,
        10077,
        format!("the first message with Nats-Msg-Id '{message_id}' was not stored; retry"),
    )
}

/// A fast-ingest duplicate whose first copy failed: the batch ends with an
/// error, as after a storage failure, since counting it as persisted would
/// acknowledge data that is not on disk.
fn end_fast_unstored(
    context: &IngestContext,
    batch_id: &str,
    message_id: &str,
    reply: Option<async_nats::Subject>,
) -> Replies {
    remove_fast(context, &mut lock(&context.fast), batch_id);
    reply_to(reply, ack::error_ack(&first_copy_not_stored(message_id)))
}

fn remove_fast(context: &IngestContext, fast: &mut FastBatches, batch_id: &str) {
    if fast.batches.remove(batch_id).is_some() {
        context
            .limits
            .server
            .fast_inflight
            .fetch_sub(1, Ordering::AcqRel);
    }
}

fn engine_error(error: &natswal::Error) -> ApiError {
    match error {
        natswal::Error::PreconditionFailed(failure) => batch::precondition_error(failure),
        other => ApiError::from_engine(other),
    }
}

fn answer_grouped(
    context: &IngestContext,
    writer: &mut AckWriter,
    result: natswal::Result<(u64, AppendOutcome)>,
    reply: Option<async_nats::Subject>,
    kind: GroupedKind,
) -> Replies {
    let stream = context.stream.name();
    match kind {
        GroupedKind::Plain {
            message_number,
            message_id,
        } => match result {
            Ok((offset, _)) => {
                if let Some(id) = &message_id {
                    lock(&context.duplicates).resolve(id, message_number, offset);
                }
                context.counters.acks.fetch_add(1, Ordering::Relaxed);
                reply_to(reply, writer.pub_ack(offset, false))
            }
            Err(error) => {
                if let Some(id) = &message_id {
                    lock(&context.duplicates).forget(id, message_number);
                }
                context.counters.error(error.kind_name());
                tracing::debug!(stream, %error, "message not stored");
                reply_to(reply, ack::error_ack(&engine_error(&error)))
            }
        },
        GroupedKind::AtomicCommit {
            batch_id,
            count,
            message_ids,
        } => match result {
            Ok((_, outcome)) => {
                let mut window = lock(&context.duplicates);
                for (index, id, number) in &message_ids {
                    window.resolve(id, *number, outcome.first_offset + u64::from(*index));
                }
                drop(window);
                context.counters.acks.fetch_add(count, Ordering::Relaxed);
                reply_to(
                    reply,
                    ack::batch_ack(stream, outcome.last_offset(), &batch_id, count),
                )
            }
            Err(error) => {
                let mut window = lock(&context.duplicates);
                for (_, id, number) in &message_ids {
                    window.forget(id, *number);
                }
                drop(window);
                context.counters.error(error.kind_name());
                reply_to(reply, ack::error_ack(&engine_error(&error)))
            }
        },
        GroupedKind::FastStored {
            batch_id,
            sequence,
            commit,
            message_number,
            message_id,
        } => {
            if let Some(id) = &message_id {
                let mut window = lock(&context.duplicates);
                match &result {
                    Ok((offset, _)) => window.resolve(id, message_number, *offset),
                    Err(_) => window.forget(id, message_number),
                }
            }
            let mut fast = lock(&context.fast);
            let Some(batch) = fast.batches.get_mut(&batch_id) else {
                return Vec::new();
            };
            match result {
                Ok((offset, _)) => {
                    context.counters.acks.fetch_add(1, Ordering::Relaxed);
                    batch.persisted = batch.persisted.max(sequence);
                    batch.last_offset = offset;
                    batch.reply = reply.clone();
                    if commit {
                        let body = ack::batch_ack(stream, offset, &batch_id, sequence);
                        remove_fast(context, &mut fast, &batch_id);
                        return reply_to(reply, body);
                    }
                    match (fast.flow_ack_due(&batch_id), reply) {
                        (Some(body), Some(reply)) => vec![(reply, body)],
                        _ => Vec::new(),
                    }
                }
                Err(error) => {
                    context.counters.error(error.kind_name());
                    let api_error = engine_error(&error);
                    let mut replies = Vec::new();
                    if let Some(reply) = &reply {
                        replies.push((reply.clone(), batch::flow_error(sequence, &api_error)));
                    }
                    let precondition = matches!(error, natswal::Error::PreconditionFailed(_));
                    if precondition && batch.gap_ok && !commit {
                        // `ok` mode: this message is skipped, the batch goes on.
                        batch.persisted = batch.persisted.max(sequence);
                        if let (Some(body), Some(reply)) = (fast.flow_ack_due(&batch_id), reply) {
                            replies.push((reply, body));
                        }
                        return replies;
                    }
                    // `fail` mode, a commit, or a storage failure: the batch
                    // ends with what was stored before this message.
                    let body = if precondition {
                        ack::batch_ack(stream, batch.last_offset, &batch_id, sequence - 1)
                    } else {
                        ack::error_ack(&api_error)
                    };
                    remove_fast(context, &mut fast, &batch_id);
                    replies.extend(reply_to(reply, body));
                    replies
                }
            }
        }
    }
}
