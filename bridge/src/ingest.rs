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
//! deduplication: a copy of a `Nats-Msg-Id` that is still pending is
//! answered after its first copy, with the first copy's offset.

use crate::ack::{self, AckWriter, ApiError};
use crate::dedup::{now_ns, DuplicateWindow, Seen};
use crate::headers;
use crate::metrics::StreamCounters;
use bytes::Bytes;
use futures_util::StreamExt;
use natswal::{AppendOutcome, AppendRequest, Completed, Completion, Record, Stream};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, watch};

/// Messages taken from the subscriptions at once (those already waiting).
const CHUNK_MESSAGES_MAX: usize = 1024;

/// How long a graceful shutdown waits for in-flight messages to arrive.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the ack task owes a publisher, in arrival order.
enum AckItem {
    /// Record `index` of append group `group`; `last` marks the group's last.
    Appended {
        group: u64,
        index: u32,
        last: bool,
        message_number: u64,
        reply: Option<async_nats::Subject>,
        message_id: Option<String>,
    },
    Duplicate {
        reply: Option<async_nats::Subject>,
        message_id: String,
    },
    Rejected {
        reply: Option<async_nats::Subject>,
        error: ApiError,
    },
}

/// Everything ingest needs for one stream.
#[derive(Clone)]
pub struct IngestContext {
    pub stream: Arc<Stream>,
    pub client: async_nats::Client,
    pub counters: Arc<StreamCounters>,
    pub duplicates: Arc<Mutex<DuplicateWindow>>,
    pub max_message_bytes: u64,
}

/// Receives until `shutdown` turns true or the subscriptions end, then
/// stops intake (drains the subscriptions: unsubscribe, but take what is
/// already on its way) and waits until every accepted message has been
/// acknowledged.
pub async fn run(
    context: IngestContext,
    subscriptions: Vec<async_nats::Subscriber>,
    mut shutdown: watch::Receiver<bool>,
) {
    let (completions_sender, completions) = mpsc::unbounded_channel::<Completed>();
    let (items_sender, items) = mpsc::unbounded_channel::<Vec<AckItem>>();
    let ack_task = tokio::spawn(run_acks(context.clone(), items, completions));
    let mut merged =
        futures_util::stream::select_all(subscriptions).ready_chunks(CHUNK_MESSAGES_MAX);
    let stream_name = context.stream.name().to_string();
    let mut numbers = Numbers::default();
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    loop {
        let chunk = tokio::select! {
            biased;
            () = async { let _ = shutdown.wait_for(|stop| *stop).await; }, if drain_deadline.is_none() => {
                for subscription in merged.get_mut().iter_mut() {
                    if let Err(error) = subscription.drain().await {
                        tracing::warn!(stream = %stream_name, %error, "cannot drain a subscription");
                    }
                }
                drain_deadline = Some(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                continue;
            }
            _ = tokio::time::sleep_until(drain_deadline.unwrap_or_else(tokio::time::Instant::now)), if drain_deadline.is_some() => {
                tracing::warn!(stream = %stream_name, "subscriptions did not finish draining in time; stopping intake");
                break;
            }
            chunk = merged.next() => match chunk {
                Some(chunk) => chunk,
                None => break,
            },
        };
        let items = accept_chunk(&context, chunk, &mut numbers, &completions_sender).await;
        if items_sender.send(items).is_err() {
            break;
        }
    }
    drop(merged);
    drop(items_sender);
    drop(completions_sender);
    if ack_task.await.is_err() {
        tracing::error!(stream = %stream_name, "ack task failed");
    }
}

/// Counters that name groups and messages.
#[derive(Default)]
struct Numbers {
    group: u64,
    message: u64,
}

/// A group of records that becomes one append request.
struct Group {
    token: u64,
    records: Vec<Record>,
    bytes: u64,
    /// Position in the item list of the group's last Appended item.
    last_item: Option<usize>,
}

/// Takes a chunk of messages: rejects, deduplicates or groups them, submits
/// the groups, and returns the ack items in arrival order.
async fn accept_chunk(
    context: &IngestContext,
    messages: Vec<async_nats::Message>,
    numbers: &mut Numbers,
    completions: &mpsc::UnboundedSender<Completed>,
) -> Vec<AckItem> {
    let counters = &context.counters;
    let frame_budget = context.stream.config().frame_bytes_max;
    let mut items = Vec::with_capacity(messages.len());
    numbers.group += 1;
    let mut group = Group {
        token: numbers.group,
        records: Vec::with_capacity(messages.len()),
        bytes: 0,
        last_item: None,
    };
    for message in messages {
        numbers.message += 1;
        counters.ingest_messages.fetch_add(1, Ordering::Relaxed);
        counters
            .ingest_bytes
            .fetch_add(message.payload.len() as u64, Ordering::Relaxed);
        let stored_headers = headers::encode(message.headers.as_ref());
        let size = (message.subject.len() + stored_headers.len() + message.payload.len()) as u64;
        if size > context.max_message_bytes {
            counters.error("too_large");
            items.push(AckItem::Rejected {
                reply: message.reply,
                error: ApiError::too_large(),
            });
            continue;
        }
        let message_id = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get("Nats-Msg-Id"))
            .map(|value| value.as_str().to_string())
            .filter(|id| !id.is_empty());
        if let Some(id) = &message_id {
            let mut window = context
                .duplicates
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let now = now_ns();
            if window.check(id, now).is_some() {
                counters.duplicates.fetch_add(1, Ordering::Relaxed);
                items.push(AckItem::Duplicate {
                    reply: message.reply,
                    message_id: id.clone(),
                });
                continue;
            }
            window.insert(id, Seen::Pending(numbers.message), now);
        }
        if !group.records.is_empty() && group.bytes + size > frame_budget {
            numbers.group += 1;
            let full = std::mem::replace(
                &mut group,
                Group {
                    token: numbers.group,
                    records: Vec::new(),
                    bytes: 0,
                    last_item: None,
                },
            );
            submit(context, full, &mut items, completions).await;
        }
        group.bytes += size;
        group.records.push(Record {
            timestamp_ns: 0,
            subject: Bytes::copy_from_slice(message.subject.as_bytes()),
            headers: stored_headers,
            payload: message.payload,
        });
        group.last_item = Some(items.len());
        items.push(AckItem::Appended {
            group: group.token,
            index: (group.records.len() - 1) as u32,
            last: false,
            message_number: numbers.message,
            reply: message.reply,
            message_id,
        });
    }
    submit(context, group, &mut items, completions).await;
    items
}

/// Submits a group (waiting only for queue space) and marks its last item.
async fn submit(
    context: &IngestContext,
    group: Group,
    items: &mut [AckItem],
    completions: &mpsc::UnboundedSender<Completed>,
) {
    let Some(last_item) = group.last_item else {
        return;
    };
    if let AckItem::Appended { last, .. } = &mut items[last_item] {
        *last = true;
    }
    let request = AppendRequest {
        records: group.records,
        ..AppendRequest::default()
    };
    let completion = Completion::Channel {
        sender: completions.clone(),
        token: group.token,
    };
    if let Err(error) = context.stream.submit(request, completion).await {
        // Not queued: report it through the same path as engine results.
        let _ = completions.send(Completed {
            token: group.token,
            result: Err(error),
        });
    }
}

/// Answers [`AckItem`]s in arrival order as their groups complete.
async fn run_acks(
    context: IngestContext,
    mut items: mpsc::UnboundedReceiver<Vec<AckItem>>,
    mut completions: mpsc::UnboundedReceiver<Completed>,
) {
    let mut queue: VecDeque<AckItem> = VecDeque::new();
    let mut results: HashMap<u64, natswal::Result<AppendOutcome>> = HashMap::new();
    let mut items_open = true;
    let mut completions_open = true;
    let stream_name = context.stream.name().to_string();
    let mut writer = AckWriter::new(&stream_name);
    loop {
        tokio::select! {
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
            if let AckItem::Appended { group, .. } = front {
                if !results.contains_key(group) {
                    break;
                }
            }
            let (reply, body) = match queue.pop_front().expect("front exists") {
                AckItem::Appended {
                    group,
                    index,
                    last,
                    message_number,
                    reply,
                    message_id,
                } => {
                    let result = match results.get(&group).expect("checked above") {
                        Ok(outcome) => Ok(outcome.first_offset + u64::from(index)),
                        Err(error) => Err(error.duplicate()),
                    };
                    if last {
                        results.remove(&group);
                    }
                    (
                        reply,
                        answer_appended(&context, &mut writer, message_number, message_id, result),
                    )
                }
                AckItem::Duplicate { reply, message_id } => {
                    let seen = context
                        .duplicates
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .check(&message_id, now_ns());
                    let body = match seen {
                        Some(Seen::Stored(offset)) => writer.pub_ack(offset, true),
                        _ => ack::error_ack(&ApiError::new(
                            503,
                            10077,
                            format!("the first message with Nats-Msg-Id '{message_id}' was not stored; retry"),
                        )),
                    };
                    (reply, body)
                }
                AckItem::Rejected { reply, error } => (reply, ack::error_ack(&error)),
            };
            if let Some(reply) = reply {
                if let Err(error) = context.client.publish(reply, body).await {
                    tracing::warn!(stream = %stream_name, %error, "cannot publish an ack");
                }
            }
        }
        if !items_open && queue.is_empty() {
            break;
        }
    }
}

fn answer_appended(
    context: &IngestContext,
    writer: &mut AckWriter,
    message_number: u64,
    message_id: Option<String>,
    result: natswal::Result<u64>,
) -> Bytes {
    match result {
        Ok(offset) => {
            if let Some(id) = &message_id {
                context
                    .duplicates
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .resolve(id, message_number, offset);
            }
            context.counters.acks.fetch_add(1, Ordering::Relaxed);
            writer.pub_ack(offset, false)
        }
        Err(error) => {
            if let Some(id) = &message_id {
                context
                    .duplicates
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .forget(id, message_number);
            }
            context.counters.error(error.kind_name());
            tracing::warn!(stream = %context.stream.name(), %error, "message not stored");
            ack::error_ack(&ApiError::from_engine(&error))
        }
    }
}
