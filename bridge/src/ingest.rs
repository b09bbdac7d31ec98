//! Ingest: moves messages from a stream's NATS subscriptions into the
//! BatchCoordinator without waiting for each one's durability on the
//! receiving task, and publishes each message's ack only after its append
//! is durable at the stream's level.
//!
//! Per stream there is one receiving task (all of the stream's
//! subscriptions merged) and one ack task. The receiving task numbers every
//! message with a token and queues an [`AckItem`] in arrival order; the ack
//! task answers the items in that order as the engine's completions come
//! back. Order matters for deduplication: a copy of a `Nats-Msg-Id` that is
//! still pending is answered after its first copy, with the first copy's
//! offset.

use crate::ack::{self, ApiError};
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

/// How long a graceful shutdown waits for in-flight messages to arrive.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What the ack task owes a publisher, in arrival order.
enum AckItem {
    Appended {
        token: u64,
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
    let (items_sender, items) = mpsc::unbounded_channel::<AckItem>();
    let ack_task = tokio::spawn(run_acks(context.clone(), items, completions));
    let mut merged = futures_util::stream::select_all(subscriptions);
    let mut token = 0u64;
    let stream_name = context.stream.name().to_string();
    // Once draining, messages already on their way to us are still taken
    // and acknowledged; the subscriptions end when they are delivered.
    let mut drain_deadline: Option<tokio::time::Instant> = None;
    loop {
        let message = tokio::select! {
            biased;
            () = async { let _ = shutdown.wait_for(|stop| *stop).await; }, if drain_deadline.is_none() => {
                for subscription in merged.iter_mut() {
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
            message = merged.next() => match message {
                Some(message) => message,
                None => break,
            },
        };
        token += 1;
        let item = accept(&context, message, token, &completions_sender).await;
        if items_sender.send(item).is_err() {
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

/// Takes one message: rejects, deduplicates or submits it.
async fn accept(
    context: &IngestContext,
    message: async_nats::Message,
    token: u64,
    completions: &mpsc::UnboundedSender<Completed>,
) -> AckItem {
    let counters = &context.counters;
    counters.ingest_messages.fetch_add(1, Ordering::Relaxed);
    counters
        .ingest_bytes
        .fetch_add(message.payload.len() as u64, Ordering::Relaxed);
    let stored_headers = headers::encode(message.headers.as_ref());
    let size = (message.subject.len() + stored_headers.len() + message.payload.len()) as u64;
    if size > context.max_message_bytes {
        counters.error("too_large");
        return AckItem::Rejected {
            reply: message.reply,
            error: ApiError::too_large(),
        };
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
            return AckItem::Duplicate {
                reply: message.reply,
                message_id: id.clone(),
            };
        }
        window.insert(id, Seen::Pending(token), now);
    }
    let record = Record {
        timestamp_ns: 0,
        subject: Bytes::copy_from_slice(message.subject.as_bytes()),
        headers: stored_headers,
        payload: message.payload,
    };
    let request = AppendRequest {
        records: vec![record],
        ..AppendRequest::default()
    };
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
    AckItem::Appended {
        token,
        reply: message.reply,
        message_id,
    }
}

/// Answers [`AckItem`]s in arrival order as their results come in.
async fn run_acks(
    context: IngestContext,
    mut items: mpsc::UnboundedReceiver<AckItem>,
    mut completions: mpsc::UnboundedReceiver<Completed>,
) {
    let mut queue: VecDeque<AckItem> = VecDeque::new();
    let mut results: HashMap<u64, natswal::Result<AppendOutcome>> = HashMap::new();
    let mut items_open = true;
    let mut completions_open = true;
    let stream_name = context.stream.name().to_string();
    loop {
        tokio::select! {
            item = items.recv(), if items_open => match item {
                Some(item) => queue.push_back(item),
                None => items_open = false,
            },
            completed = completions.recv(), if completions_open => match completed {
                Some(completed) => { results.insert(completed.token, completed.result); }
                None => completions_open = false,
            },
            else => break,
        }
        while let Some(front) = queue.front() {
            let (reply, body) = match front {
                AckItem::Appended { token, .. } => {
                    let Some(result) = results.remove(token) else {
                        break;
                    };
                    let Some(AckItem::Appended {
                        token,
                        reply,
                        message_id,
                    }) = queue.pop_front()
                    else {
                        unreachable!("front was Appended")
                    };
                    (
                        reply,
                        answer_appended(&context, &stream_name, token, message_id, result),
                    )
                }
                AckItem::Duplicate { .. } => {
                    let Some(AckItem::Duplicate { reply, message_id }) = queue.pop_front() else {
                        unreachable!("front was Duplicate")
                    };
                    let seen = context
                        .duplicates
                        .lock()
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .check(&message_id, now_ns());
                    let body = match seen {
                        Some(Seen::Stored(offset)) => ack::pub_ack(&stream_name, offset, true),
                        _ => ack::error_ack(&ApiError::new(
                            503,
                            10077,
                            format!("the first message with Nats-Msg-Id '{message_id}' was not stored; retry"),
                        )),
                    };
                    (reply, body)
                }
                AckItem::Rejected { .. } => {
                    let Some(AckItem::Rejected { reply, error }) = queue.pop_front() else {
                        unreachable!("front was Rejected")
                    };
                    (reply, ack::error_ack(&error))
                }
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
    stream_name: &str,
    token: u64,
    message_id: Option<String>,
    result: natswal::Result<AppendOutcome>,
) -> Bytes {
    match result {
        Ok(outcome) => {
            if let Some(id) = &message_id {
                context
                    .duplicates
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .resolve(id, token, outcome.first_offset);
            }
            context.counters.acks.fetch_add(1, Ordering::Relaxed);
            ack::pub_ack(stream_name, outcome.first_offset, false)
        }
        Err(error) => {
            if let Some(id) = &message_id {
                context
                    .duplicates
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .forget(id, token);
            }
            context.counters.error(error.kind_name());
            tracing::warn!(stream = %stream_name, %error, "message not stored");
            ack::error_ack(&ApiError::from_engine(&error))
        }
    }
}
