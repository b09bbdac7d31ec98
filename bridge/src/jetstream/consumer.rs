//! One consumer: a cursor over a stream with JetStream's delivery and ack
//! rules, pull or push.
//!
//! Pull: requests (`CONSUMER.MSG.NEXT`) wait in arrival order;
//! the consumer's task fills the first one with redeliveries first, then
//! new records matching its filters, and answers the rest of each request
//! with JetStream's statuses: `404 No Messages` (a `no_wait` request that
//! found nothing more), `408 Request Timeout` (its `expires` passed),
//! `409 Message Size Exceeds MaxBytes`, `100 Idle Heartbeat`.
//!
//! Push (a `deliver_subject`): records go to the deliver subject while it
//! has interest (the leafnode hub's `LS+`/`LS-`; without a leafnode
//! connection natswal cannot see interest and assumes it). With
//! `flow_control`, JetStream's window applies: at most
//! [`FLOW_WINDOW_BYTES_MAX`] delivered and unconfirmed, a `100 FlowControl
//! Request` (reply `$JS.FC.<stream>.<consumer>.<n>`) when half the window
//! is used, delivery stalled while the window is full, and the window
//! doubling with each answer from its first sixteenth. With
//! `idle_heartbeat`, a `100 Idle Heartbeat` carrying `Nats-Last-Consumer`,
//! `Nats-Last-Stream` (and `Nats-Consumer-Stalled` with the flow control
//! subject to answer while stalled) goes out after each quiet interval.
//! An ephemeral push consumer whose deliver subject has had no interest
//! for its `inactive_threshold` is deleted.
//!
//! Each delivery's reply subject is JetStream's v1 ack subject
//! `$JS.ACK.<stream>.<consumer>.<deliveries>.<stream seq>.<consumer seq>.<ns>.<pending>`;
//! acks arrive there ([`super::consumers::route_ack`]). With ack policy
//! `explicit` or `all`, a delivered record stays pending until acked;
//! after `ack_wait` (or a `-NAK`) it is delivered again, at most
//! `max_deliver` times; at most `max_ack_pending` records are pending.
//!
//! Invariants: consumer sequences are dense (one per delivery, redeliveries
//! included); the ack floor is the highest stream sequence below which
//! nothing is pending; state changes happen under one lock and every
//! change that may allow a delivery wakes the task.
//!
//! A durable consumer's state (its deliveries, pending records and ack
//! floor) is saved to its file ([`super::consumer_file`]) at most
//! [`SAVE_COALESCE`] after it changes; a double ack is answered only once
//! a save that includes it is on disk. After a restart the consumer goes
//! on after its last saved delivery and delivers its saved pending records
//! again first; deliveries and acks of the last moments before a crash may
//! come again (at least once, never lost). Ephemeral consumers live in
//! memory only.

use natswal::{StartPosition, StoredRecord, Stream, SubjectPattern};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Records read from the stream per blocking read step.
const READ_STEP_RECORDS_MAX: usize = 256;

/// A push consumer's flow control window at most (JetStream's); it
/// starts at a sixteenth of this.
pub const FLOW_WINDOW_BYTES_MAX: u64 = 32 * 1024 * 1024;

/// Records a consumer sends between two looks at its timers.
const SEND_BURST_RECORDS_MAX: usize = 256;

/// How long a durable consumer's changes gather before one save.
pub const SAVE_COALESCE: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckPolicy {
    None,
    All,
    Explicit,
}

/// What a consumer does, from its configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub filters: Vec<SubjectPattern>,
    pub start: StartPosition,
    pub ack_policy: AckPolicy,
    /// `None`: a pull consumer.
    pub push: Option<Push>,
    /// Where the consumer starts; the consumer keeps its current limits in
    /// its state (an update changes them).
    pub limits: Limits,
}

/// The settings an update may change (JetStream's updatable fields that
/// natswal implements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub ack_wait: Duration,
    /// `None`: unlimited.
    pub max_deliver: Option<u64>,
    pub max_ack_pending: usize,
    pub max_waiting: usize,
    /// An ephemeral consumer is deleted after this long without requests
    /// (pull) or without interest in its deliver subject (push).
    pub inactive_threshold: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            ack_wait: Duration::from_secs(30),
            max_deliver: None,
            max_ack_pending: 1000,
            max_waiting: 512,
            inactive_threshold: None,
        }
    }
}

/// Where and how a push consumer delivers.
#[derive(Debug, Clone)]
pub struct Push {
    pub deliver_subject: String,
    pub flow_control: bool,
    pub idle_heartbeat: Option<Duration>,
}

/// A push consumer's flow control: bytes delivered and not confirmed by
/// an answer, the window they may fill, and the request outstanding (its
/// subject, and the unconfirmed bytes its answer confirms).
#[derive(Default)]
struct Flow {
    unconfirmed_bytes: u64,
    window_bytes: u64,
    request: Option<(String, u64)>,
    requests_sent: u64,
}

struct Pending {
    consumer_sequence: u64,
    deliveries: u64,
    due: Instant,
}

/// One waiting pull request.
struct PullRequest {
    reply: String,
    batch_left: u64,
    /// Bytes the request still takes (`None`: no byte limit).
    bytes_left: Option<u64>,
    expires_at: Option<Instant>,
    no_wait: bool,
    heartbeat: Option<Duration>,
    next_heartbeat: Option<Instant>,
    arrived: Instant,
    /// Its requester's interest was seen (at least once; at the interest
    /// generation of `checked`).
    heard: bool,
    checked: Option<u64>,
}

/// How long a pull request whose requester's interest was never seen
/// still counts as heard: the requester's subscription reaches natswal
/// over the leafnode connection, the request over another one.
const REQUESTER_GRACE: Duration = Duration::from_secs(2);

/// A pull request as `CONSUMER.MSG.NEXT` asks (JetStream's fields).
#[derive(Debug, Default, serde::Deserialize)]
pub struct NextRequest {
    #[serde(default)]
    pub batch: u64,
    /// Nanoseconds.
    #[serde(default)]
    pub expires: u64,
    #[serde(default)]
    pub max_bytes: u64,
    #[serde(default)]
    pub no_wait: bool,
    /// Nanoseconds.
    #[serde(default)]
    pub idle_heartbeat: u64,
}

#[derive(Default)]
struct State {
    limits: Limits,
    /// The stream sequence the cursor reads next.
    next_sequence: u64,
    /// Last delivery: consumer and stream sequence.
    delivered: (u64, u64),
    pending: BTreeMap<u64, Pending>,
    /// Stream sequences to deliver again, in order.
    redeliver: VecDeque<u64>,
    ack_floor: (u64, u64),
    redelivered: u64,
    waiting: VecDeque<PullRequest>,
    last_request: Option<Instant>,
    /// The stream's last sequence when the cursor last read (what each
    /// delivery's pending count is reckoned from, without asking the
    /// stream per delivery).
    stream_last: u64,
    /// Push: whether the deliver subject has interest, since when it has
    /// none, and when the next idle heartbeat is due.
    interest: bool,
    no_interest_since: Option<Instant>,
    next_heartbeat: Option<Instant>,
    flow: Flow,
}

/// One message ready to go out.
struct Outgoing {
    subject: String,
    reply: String,
    headers: Vec<u8>,
    payload: bytes::Bytes,
}

/// Messages a consumer gathers before one send (one lock of the output
/// and one wake of its writer for many deliveries).
#[derive(Default)]
struct Batch {
    messages: Vec<Outgoing>,
    bytes: usize,
}

impl Batch {
    /// Bytes gathered before a send, whatever the records' sizes.
    const BYTES_MAX: usize = 1024 * 1024;

    fn add(&mut self, message: Outgoing) {
        self.bytes += message.subject.len()
            + message.reply.len()
            + message.headers.len()
            + message.payload.len();
        self.messages.push(message);
    }

    fn is_full(&self) -> bool {
        self.bytes >= Batch::BYTES_MAX
    }
}

/// A pull status (`404 No Messages`, `408 Request Timeout`, ...) to
/// `reply`, with the request's unfilled messages and bytes.
fn status_message(reply: &str, status: &str, pending: Option<(u64, Option<u64>)>) -> Outgoing {
    let mut headers = format!("NATS/1.0 {status}\r\n");
    if let Some((messages, bytes)) = pending {
        headers.push_str(&format!(
            "Nats-Pending-Messages: {messages}\r\nNats-Pending-Bytes: {}\r\n",
            bytes.unwrap_or(0)
        ));
    }
    headers.push_str("\r\n");
    Outgoing {
        subject: reply.to_string(),
        reply: String::new(),
        headers: headers.into_bytes(),
        payload: bytes::Bytes::new(),
    }
}

/// What the consumer info reports.
pub struct Snapshot {
    pub delivered: (u64, u64),
    pub ack_floor: (u64, u64),
    pub ack_pending: usize,
    pub redelivered: u64,
    pub waiting: usize,
    pub num_pending: u64,
    /// Push: the deliver subject has interest (JetStream's `push_bound`).
    pub push_bound: bool,
}

pub struct Consumer {
    pub stream_name: String,
    pub name: String,
    pub created_ns: i64,
    /// The effective configuration, echoed in every info.
    config: Mutex<serde_json::Value>,
    pub settings: Settings,
    stream: Arc<Stream>,
    client: crate::wire::Client,
    /// `client` is a leafnode connection: replies carry JetStream's ack
    /// subject and `@<stored subject>`.
    leaf: bool,
    state: Mutex<State>,
    wake: Notify,
    deleted: AtomicBool,
    /// A durable consumer's file, its pending changes and the double acks
    /// waiting for the next save.
    file: Option<super::consumer_file::ConsumerFile>,
    changed: Notify,
    save_waiters: Mutex<Vec<String>>,
}

impl Consumer {
    pub fn new(
        stream: Arc<Stream>,
        client: crate::wire::Client,
        leaf: bool,
        name: String,
        config: serde_json::Value,
        settings: Settings,
        file: Option<super::consumer_file::ConsumerFile>,
    ) -> Arc<Consumer> {
        let limits = settings.limits;
        Arc::new(Consumer {
            stream_name: stream.name().to_string(),
            name,
            created_ns: crate::dedup::now_ns(),
            config: Mutex::new(config),
            settings,
            stream,
            client,
            leaf,
            state: Mutex::new(State {
                limits,
                last_request: Some(Instant::now()),
                no_interest_since: Some(Instant::now()),
                flow: Flow {
                    window_bytes: FLOW_WINDOW_BYTES_MAX / 16,
                    ..Flow::default()
                },
                ..State::default()
            }),
            wake: Notify::new(),
            deleted: AtomicBool::new(false),
            file,
            changed: Notify::new(),
            save_waiters: Mutex::new(Vec::new()),
        })
    }

    /// The effective configuration.
    pub fn config(&self) -> serde_json::Value {
        self.config
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Takes up an updated configuration whose only changes are to its
    /// limits (checked by the caller); a durable consumer saves it before
    /// the update is answered.
    pub fn update(&self, config: serde_json::Value, limits: Limits) -> natswal::Result<()> {
        *self
            .config
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = config;
        self.lock().limits = limits;
        self.wake.notify_one();
        self.save_now()
    }

    /// What a save keeps.
    pub fn saved_state(&self) -> super::consumer_file::SavedState {
        let state = self.lock();
        super::consumer_file::SavedState {
            config: serde_json::to_vec(&self.config()).unwrap_or_default(),
            delivered: state.delivered,
            ack_floor: state.ack_floor,
            pending: state
                .pending
                .iter()
                .map(|(sequence, pending)| {
                    (*sequence, pending.consumer_sequence, pending.deliveries)
                })
                .collect(),
        }
    }

    /// Takes up a saved state (before the consumer runs): its pending
    /// records are delivered again first.
    pub fn restore(&self, saved: &super::consumer_file::SavedState) {
        let mut state = self.lock();
        let now = Instant::now();
        let limits = state.limits;
        state.delivered = saved.delivered;
        state.ack_floor = saved.ack_floor;
        state.next_sequence = saved.delivered.1 + 1;
        for (sequence, consumer_sequence, deliveries) in &saved.pending {
            state.pending.insert(
                *sequence,
                Pending {
                    consumer_sequence: *consumer_sequence,
                    deliveries: *deliveries,
                    due: now + limits.ack_wait,
                },
            );
            state.redeliver.push_back(*sequence);
        }
    }

    /// Where a new consumer's cursor starts, as far as it is known before
    /// its first read (what `num_pending` is reckoned from).
    pub fn set_cursor(&self, sequence: u64) {
        self.lock().next_sequence = sequence;
    }

    /// Saves the state now (a durable consumer's creation).
    pub fn save_now(&self) -> natswal::Result<()> {
        match &self.file {
            Some(file) => file.save(&self.saved_state()),
            None => Ok(()),
        }
    }

    pub fn is_durable(&self) -> bool {
        self.file.is_some()
    }

    /// Answers a double ack once the next save (which includes its ack) is
    /// on disk.
    pub fn reply_after_save(&self, reply: String) {
        self.save_waiters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(reply);
        self.changed.notify_one();
    }

    fn mark_changed(&self) {
        if self.file.is_some() {
            self.changed.notify_one();
        }
    }

    /// Saves a durable consumer's changes, coalesced, until it is deleted;
    /// then removes its file.
    pub async fn persist(self: Arc<Consumer>) {
        let Some(file) = self.file.clone() else {
            return;
        };
        loop {
            self.changed.notified().await;
            if self.is_deleted() {
                break;
            }
            tokio::time::sleep(SAVE_COALESCE).await;
            let waiters = std::mem::take(
                &mut *self
                    .save_waiters
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
            );
            let state = self.saved_state();
            let target = file.clone();
            let saved = tokio::task::spawn_blocking(move || target.save(&state)).await;
            match saved {
                Ok(Ok(())) => {
                    for reply in waiters {
                        let _ = self.client.publish(&reply, &[]);
                    }
                }
                // Not answered: the client's double ack times out rather
                // than hearing of an ack that is not on disk.
                Ok(Err(error)) => tracing::error!(
                    path = %file.path.display(), %error,
                    "cannot save a durable consumer's state; its acks since the last save are not durable"
                ),
                Err(error) => tracing::error!(%error, "a consumer save task failed"),
            }
        }
        if let Err(error) = file.remove() {
            tracing::error!(path = %file.path.display(), %error, "cannot remove a deleted consumer's file");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn snapshot(&self) -> Snapshot {
        let state = self.lock();
        let last = self.stream.status().next_offset.saturating_sub(1);
        Snapshot {
            delivered: state.delivered,
            ack_floor: state.ack_floor,
            ack_pending: state.pending.len(),
            redelivered: state.redelivered,
            waiting: state.waiting.len(),
            // An upper bound with filters (there is no per-subject index).
            num_pending: (last + 1).saturating_sub(state.next_sequence.max(1)),
            push_bound: self.settings.push.is_some() && state.interest,
        }
    }

    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// Stops the consumer; waiting requests get `409 Consumer Deleted`.
    pub fn delete(&self) {
        self.deleted.store(true, Ordering::Release);
        self.changed.notify_one();
        let waiting: Vec<PullRequest> = self.lock().waiting.drain(..).collect();
        for request in waiting {
            self.status(&request.reply, "409 Consumer Deleted", None);
        }
        self.wake.notify_one();
    }

    /// Queues a pull request, or refuses it at once.
    pub fn pull(&self, reply: String, asked: NextRequest) {
        let now = Instant::now();
        let mut state = self.lock();
        state.last_request = Some(now);
        if state.waiting.len() >= state.limits.max_waiting {
            drop(state);
            return self.status(&reply, "409 Exceeded MaxWaiting", None);
        }
        let heartbeat =
            (asked.idle_heartbeat > 0).then(|| Duration::from_nanos(asked.idle_heartbeat));
        state.waiting.push_back(PullRequest {
            reply,
            batch_left: asked.batch.max(1),
            bytes_left: (asked.max_bytes > 0).then_some(asked.max_bytes),
            expires_at: (asked.expires > 0).then(|| now + Duration::from_nanos(asked.expires)),
            no_wait: asked.no_wait,
            heartbeat,
            next_heartbeat: heartbeat.map(|every| now + every),
            arrived: now,
            heard: false,
            checked: None,
        });
        drop(state);
        self.wake.notify_one();
    }

    /// An ack (`+ACK`, empty), `-NAK` (with an optional delay), `+WPI`,
    /// `+TERM` or `+NXT` for the delivery of `stream_sequence`.
    pub fn acknowledge(&self, stream_sequence: u64, body: &[u8]) {
        let body = std::str::from_utf8(body).unwrap_or_default().trim();
        let mut state = self.lock();
        let now = Instant::now();
        if body.starts_with("-NAK") {
            let delay = nak_delay(body);
            if let Some(pending) = state.pending.get_mut(&stream_sequence) {
                pending.due = now + delay;
                if delay.is_zero() && !state.redeliver.contains(&stream_sequence) {
                    state.redeliver.push_back(stream_sequence);
                }
            }
        } else if body.starts_with("+WPI") {
            let ack_wait = state.limits.ack_wait;
            if let Some(pending) = state.pending.get_mut(&stream_sequence) {
                pending.due = now + ack_wait;
            }
        } else {
            // +ACK, an empty body, +NXT and +TERM all end the delivery.
            match self.settings.ack_policy {
                AckPolicy::All => state
                    .pending
                    .retain(|sequence, _| *sequence > stream_sequence),
                _ => {
                    state.pending.remove(&stream_sequence);
                }
            }
            let State {
                pending, redeliver, ..
            } = &mut *state;
            redeliver.retain(|sequence| pending.contains_key(sequence));
            update_ack_floor(&mut state);
        }
        drop(state);
        self.mark_changed();
        self.wake.notify_one();
    }

    fn status(&self, reply: &str, status: &str, pending: Option<(u64, Option<u64>)>) {
        let message = status_message(reply, status, pending);
        if let Err(error) =
            self.client
                .publish_with_headers(&message.subject, &message.headers, &[])
        {
            tracing::debug!(%error, "cannot send a pull status");
        }
    }

    /// Serves requests (pull) or the deliver subject (push) until the
    /// consumer is deleted (or, ephemeral, inactive past its threshold).
    pub async fn run(self: Arc<Consumer>, consumers: Arc<super::consumers::Consumers>) {
        let mut reader = match self.open_reader().await {
            Ok(reader) => reader,
            Err(error) => {
                tracing::warn!(stream = %self.stream_name, consumer = %self.name, %error, "consumer cannot read its stream");
                consumers.remove(&self.stream_name, &self.name);
                return self.delete();
            }
        };
        let mut interest = self.client.interest_changes();
        interest.mark_changed();
        let mut buffered: VecDeque<StoredRecord> = VecDeque::new();
        let mut batch = Batch::default();
        while !self.is_deleted() {
            let wake = self.wake.notified();
            tokio::pin!(wake);
            wake.as_mut().enable();
            if interest.has_changed().unwrap_or(false) {
                interest.borrow_and_update();
                self.refresh_interest();
            }
            let next_timer = self.housekeeping();
            if self.idle_too_long() {
                consumers.remove(&self.stream_name, &self.name);
                return self.delete();
            }
            let mut sent = 0;
            while sent < SEND_BURST_RECORDS_MAX && self.ready() {
                if batch.is_full() {
                    self.send(&mut batch).await;
                }
                if let Some(sequence) = self.next_redelivery() {
                    match self.read_exact(sequence).await {
                        Some(record) => self.deliver(record, true, &mut batch),
                        None => self.forget(sequence),
                    }
                    sent += 1;
                    continue;
                }
                if !self.may_deliver_new() {
                    break;
                }
                if buffered.is_empty() {
                    let Some((returned, records)) = read_step(reader).await else {
                        self.send(&mut batch).await;
                        consumers.remove(&self.stream_name, &self.name);
                        return self.delete();
                    };
                    reader = returned;
                    let last = self.stream.status().next_offset.saturating_sub(1);
                    self.lock().stream_last = last;
                    buffered.extend(records);
                }
                let Some(record) = buffered.pop_front() else {
                    break;
                };
                self.deliver(record, false, &mut batch);
                sent += 1;
            }
            // Sent before any status, timer or wait.
            self.send(&mut batch).await;
            if sent == SEND_BURST_RECORDS_MAX {
                continue;
            }
            self.end_no_wait();
            let sleep = tokio::time::sleep_until(
                next_timer
                    .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
                    .into(),
            );
            let reading = self.ready() && self.may_deliver_new() && buffered.is_empty();
            // Push: interest in the deliver subject; pull: in the waiting
            // requests' reply subjects.
            let watch_interest = self.settings.push.is_some() || !self.lock().waiting.is_empty();
            tokio::select! {
                _ = &mut wake => {}
                _ = sleep => {}
                _ = reader.wait(), if reading => {}
                // `changed` marks the change seen: take it up here.
                _ = interest.changed(), if watch_interest => self.refresh_interest(),
            }
        }
    }

    async fn open_reader(&self) -> natswal::Result<natswal::Reader> {
        let stream = Arc::clone(&self.stream);
        let start = self.settings.start;
        // One filter reads through the engine's filter; several are
        // checked per record.
        let filter = match self.settings.filters.as_slice() {
            [one] => Some(one.clone()),
            _ => None,
        };
        tokio::task::spawn_blocking(move || stream.reader(start, filter))
            .await
            .map_err(|error| {
                natswal::Error::io("the read task failed", std::io::Error::other(error))
            })?
    }

    async fn read_exact(&self, sequence: u64) -> Option<StoredRecord> {
        let stream = Arc::clone(&self.stream);
        let read = tokio::task::spawn_blocking(move || {
            stream.reader(StartPosition::Offset(sequence), None)?.next()
        })
        .await;
        match read {
            Ok(Ok(Some(record))) if record.offset == sequence => Some(record),
            _ => None,
        }
    }

    /// Whether a delivery can go out now: a pull request waits, or the
    /// deliver subject has interest and the flow control window room.
    fn ready(&self) -> bool {
        let mut state = self.lock();
        match &self.settings.push {
            None => {
                self.drop_unheard_requests(&mut state);
                !state.waiting.is_empty()
            }
            Some(push) => {
                state.interest
                    && !(push.flow_control
                        && state.flow.unconfirmed_bytes > state.flow.window_bytes)
            }
        }
    }

    /// Drops waiting pull requests at the front whose requester is gone (no
    /// interest in their reply subject any more, or never within
    /// [`REQUESTER_GRACE`]), as JetStream does: records delivered to them
    /// would wait out their ack_wait, or be lost to an ordered reader.
    fn drop_unheard_requests(&self, state: &mut State) {
        if !self.leaf {
            return;
        }
        let generation = self.client.interest_generation();
        let now = Instant::now();
        while let Some(front) = state.waiting.front_mut() {
            if front.checked == Some(generation) {
                return;
            }
            if self.client.has_interest(&front.reply) {
                front.heard = true;
                front.checked = Some(generation);
                return;
            }
            if !front.heard && now < front.arrived + REQUESTER_GRACE {
                return;
            }
            tracing::debug!(consumer = %self.name, reply = %front.reply, "dropped a pull request whose requester is gone");
            state.waiting.pop_front();
            state.last_request = Some(now);
        }
    }

    /// Takes up a change of interest in the deliver subject (push).
    fn refresh_interest(&self) {
        let Some(push) = &self.settings.push else {
            return;
        };
        let interested = self.client.has_interest(&push.deliver_subject);
        let mut state = self.lock();
        if interested == state.interest {
            return;
        }
        state.interest = interested;
        let now = Instant::now();
        if interested {
            state.no_interest_since = None;
            state.next_heartbeat = push.idle_heartbeat.map(|every| now + every);
        } else {
            state.no_interest_since = Some(now);
            state.next_heartbeat = None;
        }
    }

    /// A push consumer's answer to its flow control request: confirms
    /// what was delivered before the request and widens the window.
    pub fn flow_answer(&self, subject: &str) {
        let mut state = self.lock();
        let Some((expected, confirmed_bytes)) = &state.flow.request else {
            return;
        };
        // An answer to an older request than the outstanding one is stale.
        if expected != subject {
            return;
        }
        let confirmed_bytes = *confirmed_bytes;
        let flow = &mut state.flow;
        flow.unconfirmed_bytes = flow.unconfirmed_bytes.saturating_sub(confirmed_bytes);
        flow.window_bytes = (flow.window_bytes * 2).min(FLOW_WINDOW_BYTES_MAX);
        flow.request = None;
        drop(state);
        self.wake.notify_one();
    }

    fn may_deliver_new(&self) -> bool {
        let state = self.lock();
        self.settings.ack_policy == AckPolicy::None
            || state.pending.len() < state.limits.max_ack_pending
    }

    fn idle_too_long(&self) -> bool {
        let state = self.lock();
        let Some(threshold) = state.limits.inactive_threshold else {
            return false;
        };
        if self.settings.push.is_some() {
            return state
                .no_interest_since
                .is_some_and(|since| since.elapsed() > threshold);
        }
        state.waiting.is_empty()
            && state
                .last_request
                .is_some_and(|last| last.elapsed() > threshold)
    }

    fn next_redelivery(&self) -> Option<u64> {
        self.lock().redeliver.pop_front()
    }

    /// A pending record that can no longer be read (retention removed it).
    fn forget(&self, sequence: u64) {
        let mut state = self.lock();
        state.pending.remove(&sequence);
        update_ack_floor(&mut state);
    }

    /// Expires requests, sends heartbeats, moves overdue pending records
    /// to redelivery; returns the next time something falls due.
    fn housekeeping(&self) -> Option<Instant> {
        let now = Instant::now();
        let mut state = self.lock();
        let limits = state.limits;
        let mut statuses = Vec::new();
        let waiting_before = state.waiting.len();
        state.waiting.retain_mut(|request| {
            if request.expires_at.is_some_and(|at| at <= now) {
                statuses.push((
                    request.reply.clone(),
                    "408 Request Timeout",
                    Some((request.batch_left, request.bytes_left)),
                ));
                return false;
            }
            if let (Some(at), Some(every)) = (request.next_heartbeat, request.heartbeat) {
                if at <= now {
                    statuses.push((request.reply.clone(), "100 Idle Heartbeat", None));
                    request.next_heartbeat = Some(now + every);
                }
            }
            true
        });
        if state.waiting.len() < waiting_before {
            state.last_request = Some(now);
        }
        let mut heartbeat = None;
        if let Some(push) = &self.settings.push {
            if let (true, Some(at), Some(every)) =
                (state.interest, state.next_heartbeat, push.idle_heartbeat)
            {
                if at <= now {
                    heartbeat = Some(push_heartbeat(&state));
                    state.next_heartbeat = Some(now + every);
                }
            }
        }
        if self.settings.ack_policy != AckPolicy::None {
            let overdue: Vec<u64> = state
                .pending
                .iter()
                .filter(|(_, pending)| pending.due <= now)
                .map(|(sequence, _)| *sequence)
                .collect();
            for sequence in overdue {
                let deliveries = state.pending[&sequence].deliveries;
                if limits.max_deliver.is_some_and(|max| deliveries >= max) {
                    // Delivered as often as allowed: it stays pending (as in
                    // JetStream) but is not sent again.
                    if let Some(pending) = state.pending.get_mut(&sequence) {
                        pending.due = now + Duration::from_secs(86_400 * 365);
                    }
                } else {
                    if !state.redeliver.contains(&sequence) {
                        state.redeliver.push_back(sequence);
                    }
                    // Due again one ack_wait on, queued or not: a due time
                    // left in the past would wake this task at once, over
                    // and over, while no request takes the redelivery.
                    if let Some(pending) = state.pending.get_mut(&sequence) {
                        pending.due = now + limits.ack_wait;
                    }
                }
            }
        }
        let mut next: Option<Instant> = None;
        let mut consider = |at: Option<Instant>| {
            if let Some(at) = at {
                next = Some(next.map_or(at, |next| next.min(at)));
            }
        };
        for request in &state.waiting {
            consider(request.expires_at);
            consider(request.next_heartbeat);
        }
        // A request whose requester was never heard is judged after its
        // grace.
        if let Some(front) = state
            .waiting
            .front()
            .filter(|front| self.leaf && !front.heard)
        {
            consider(Some(front.arrived + REQUESTER_GRACE));
        }
        if self.settings.ack_policy != AckPolicy::None {
            consider(state.pending.values().map(|pending| pending.due).min());
        }
        consider(state.next_heartbeat);
        // Pull: inactivity counts only while no request waits (a long poll
        // is activity), from the end of the last one. Push: from when the
        // deliver subject lost its interest.
        let inactive_since = match &self.settings.push {
            Some(_) => state.no_interest_since,
            None => state.last_request.filter(|_| state.waiting.is_empty()),
        };
        if let (Some(threshold), Some(since)) = (limits.inactive_threshold, inactive_since) {
            consider(Some(since + threshold + Duration::from_millis(10)));
        }
        drop(state);
        for (reply, status, pending) in statuses {
            self.status(&reply, status, pending);
        }
        if let (Some(headers), Some(push)) = (heartbeat, &self.settings.push) {
            if let Err(error) =
                self.client
                    .publish_with_headers(&push.deliver_subject, headers.as_bytes(), &[])
            {
                tracing::debug!(%error, "cannot send a push heartbeat");
            }
        }
        next
    }

    /// `no_wait` requests at the front that found nothing more end with
    /// `404 No Messages`.
    fn end_no_wait(&self) {
        let mut ended = Vec::new();
        {
            let mut state = self.lock();
            while state.waiting.front().is_some_and(|request| request.no_wait) {
                ended.push(state.waiting.pop_front().expect("front").reply);
                state.last_request = Some(Instant::now());
            }
        }
        for reply in ended {
            self.status(&reply, "404 No Messages", None);
        }
    }

    fn matches(&self, record: &StoredRecord) -> bool {
        self.settings.filters.len() < 2
            || self
                .settings
                .filters
                .iter()
                .any(|filter| filter.matches(&record.subject))
    }

    /// Books the delivery of `record` to the first waiting request (pull)
    /// or the deliver subject (push) and adds its message to `batch`
    /// (with, push with flow control, a flow control request when one is
    /// due; pull, the `409` of a request the record is too large for).
    fn deliver(&self, record: StoredRecord, again: bool, batch: &mut Batch) {
        if !again && !self.matches(&record) {
            self.lock().next_sequence = record.offset + 1;
            return;
        }
        if let Some((outgoing, flow_request)) = self.prepare(record, again, batch) {
            batch.add(outgoing);
            if let Some(flow_request) = flow_request {
                batch.add(flow_request);
            }
        }
    }

    /// Sends what `batch` gathered, waiting for room in the output (never
    /// dropped).
    async fn send(&self, batch: &mut Batch) {
        if batch.messages.is_empty() {
            return;
        }
        self.client.room().await;
        let messages = batch.messages.iter().map(|message| {
            (
                message.subject.as_str(),
                message.reply.as_str(),
                message.headers.as_slice(),
                &message.payload[..],
            )
        });
        if let Err(error) = self.client.publish_each(messages) {
            tracing::debug!(%error, "cannot send consumer deliveries");
        }
        batch.messages.clear();
        batch.bytes = 0;
    }

    /// Books the delivery of `record` and builds its message (and, push
    /// with flow control, a flow control request when one is due).
    fn prepare(
        &self,
        record: StoredRecord,
        again: bool,
        batch: &mut Batch,
    ) -> Option<(Outgoing, Option<Outgoing>)> {
        let size = (record.subject.len() + record.headers.len() + record.payload.len()) as u64;
        let mut state = self.lock();
        let target = match &self.settings.push {
            Some(push) => push.deliver_subject.clone(),
            None => match self.take_request(&mut state, size) {
                Ok(reply) => reply,
                Err(refused) => {
                    if again {
                        state.redeliver.push_front(record.offset);
                    }
                    drop(state);
                    // In the batch: after the deliveries before it.
                    if let Some((reply, batch_left, bytes_left)) = refused {
                        batch.add(status_message(
                            &reply,
                            "409 Message Size Exceeds MaxBytes",
                            Some((batch_left, bytes_left)),
                        ));
                    }
                    return None;
                }
            },
        };
        let (consumer_sequence, deliveries, pending_count) =
            self.book(&mut state, record.offset, again);
        let flow_request = self.flow_request(&mut state, size);
        drop(state);
        self.mark_changed();
        let subject = String::from_utf8_lossy(&record.subject).into_owned();
        let prefix = if self.leaf {
            super::ACK_PREFIX
        } else {
            super::ACK_PREFIX_CLIENT
        };
        let mut reply = format!(
            "{prefix}{}.{}.{deliveries}.{}.{consumer_sequence}.{}.{pending_count}",
            self.stream_name, self.name, record.offset, record.timestamp_ns
        );
        if self.leaf {
            // The hub delivers it with the stored subject, the reply cut
            // at the '@'.
            reply.push('@');
            reply.push_str(&subject);
        }
        // Without a leafnode the receiver sees its inbox as the subject:
        // the stored one travels in a header.
        let extra = if self.leaf {
            Vec::new()
        } else {
            vec![("Nats-Subject", subject.as_str())]
        };
        let headers = if record.headers.is_empty() && extra.is_empty() {
            Vec::new()
        } else {
            crate::headers::replay_block(&record.headers, &extra)
        };
        let outgoing = Outgoing {
            subject: target,
            reply,
            headers,
            payload: record.payload,
        };
        Some((outgoing, flow_request))
    }

    /// The reply subject of the first waiting pull request, which takes
    /// `size` bytes of it; `Err(None)` when none waits, or
    /// `Err(Some((reply, batch left, bytes left)))` when the record is
    /// larger than what the request has left (the request ends).
    fn take_request(
        &self,
        state: &mut State,
        size: u64,
    ) -> Result<String, Option<(String, u64, Option<u64>)>> {
        let Some(request) = state.waiting.front_mut() else {
            return Err(None);
        };
        if request.bytes_left.is_some_and(|left| size > left) {
            let refused = state.waiting.pop_front().expect("the front");
            return Err(Some((
                refused.reply,
                refused.batch_left,
                refused.bytes_left,
            )));
        }
        request.batch_left -= 1;
        if let Some(left) = &mut request.bytes_left {
            *left -= size;
        }
        if let (Some(_), Some(every)) = (request.next_heartbeat, request.heartbeat) {
            request.next_heartbeat = Some(Instant::now() + every);
        }
        let reply = request.reply.clone();
        if request.batch_left == 0 || request.bytes_left == Some(0) {
            state.waiting.pop_front();
            state.last_request = Some(Instant::now());
        }
        Ok(reply)
    }

    /// Books one delivery of `sequence`: its consumer sequence, how often
    /// it was delivered, and the records left after it.
    fn book(&self, state: &mut State, sequence: u64, again: bool) -> (u64, u64, u64) {
        let now = Instant::now();
        let ack_wait = state.limits.ack_wait;
        let consumer_sequence = state.delivered.0 + 1;
        state.delivered = (consumer_sequence, state.delivered.1.max(sequence));
        let deliveries = match state.pending.get_mut(&sequence) {
            Some(pending) => {
                pending.deliveries += 1;
                pending.consumer_sequence = consumer_sequence;
                pending.due = now + ack_wait;
                let deliveries = pending.deliveries;
                state.redelivered += 1;
                deliveries
            }
            None => {
                if self.settings.ack_policy != AckPolicy::None {
                    state.pending.insert(
                        sequence,
                        Pending {
                            consumer_sequence,
                            deliveries: 1,
                            due: now + ack_wait,
                        },
                    );
                }
                1
            }
        };
        if !again {
            state.next_sequence = sequence + 1;
        }
        if self.settings.ack_policy == AckPolicy::None {
            state.ack_floor = state.delivered;
        }
        if let Some(every) = self
            .settings
            .push
            .as_ref()
            .and_then(|push| push.idle_heartbeat)
        {
            state.next_heartbeat = Some(now + every);
        }
        let last = state.stream_last.max(sequence);
        let pending_count = last.saturating_sub(state.next_sequence.saturating_sub(1));
        (consumer_sequence, deliveries, pending_count)
    }

    /// Counts `size` delivered bytes against a push consumer's flow
    /// control window; a request when half of it is used and none is
    /// outstanding.
    fn flow_request(&self, state: &mut State, size: u64) -> Option<Outgoing> {
        let push = self
            .settings
            .push
            .as_ref()
            .filter(|push| push.flow_control)?;
        let flow = &mut state.flow;
        flow.unconfirmed_bytes += size;
        if flow.request.is_some() || flow.unconfirmed_bytes <= flow.window_bytes / 2 {
            return None;
        }
        flow.requests_sent += 1;
        let prefix = if self.leaf {
            super::FLOW_PREFIX
        } else {
            super::FLOW_PREFIX_CLIENT
        };
        let reply = format!(
            "{prefix}{}.{}.{}",
            self.stream_name, self.name, flow.requests_sent
        );
        flow.request = Some((reply.clone(), flow.unconfirmed_bytes));
        Some(Outgoing {
            subject: push.deliver_subject.clone(),
            reply,
            headers: b"NATS/1.0 100 FlowControl Request\r\n\r\n".to_vec(),
            payload: bytes::Bytes::new(),
        })
    }
}

/// A push consumer's idle heartbeat: the last consumer and stream
/// sequence delivered, and the flow control subject to answer while
/// delivery is stalled on it.
fn push_heartbeat(state: &State) -> String {
    let mut headers = format!(
        "NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: {}\r\nNats-Last-Stream: {}\r\n",
        state.delivered.0,
        state.next_sequence.saturating_sub(1)
    );
    if let Some((subject, _)) = &state.flow.request {
        headers.push_str(&format!("Nats-Consumer-Stalled: {subject}\r\n"));
    }
    headers.push_str("\r\n");
    headers
}

/// The ack floor: below the first pending record (or at the last
/// delivery when nothing is pending).
fn update_ack_floor(state: &mut State) {
    state.ack_floor = match state.pending.iter().next() {
        Some((sequence, pending)) => (
            pending.consumer_sequence.saturating_sub(1),
            sequence.saturating_sub(1),
        ),
        None => state.delivered,
    };
}

/// `-NAK {"delay": <ns>}`: the delay before the redelivery (none: now).
fn nak_delay(body: &str) -> Duration {
    let json = body.trim_start_matches("-NAK").trim();
    serde_json::from_str::<serde_json::Value>(json)
        .ok()
        .and_then(|value| value.get("delay")?.as_u64())
        .map_or(Duration::ZERO, Duration::from_nanos)
}

/// Reads the next records (up to a step) on the blocking pool.
/// `None` if the read task itself failed (the reader is gone with it).
async fn read_step(mut reader: natswal::Reader) -> Option<(natswal::Reader, Vec<StoredRecord>)> {
    let read = tokio::task::spawn_blocking(move || {
        let mut records = Vec::new();
        while records.len() < READ_STEP_RECORDS_MAX {
            match reader.next() {
                Ok(Some(record)) => records.push(record),
                Ok(None) => break,
                Err(error) => {
                    tracing::warn!(%error, "a consumer's read failed");
                    break;
                }
            }
        }
        (reader, records)
    })
    .await;
    read.map_err(|error| tracing::warn!(%error, "a consumer's read task failed"))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nak_may_carry_a_delay() {
        assert_eq!(nak_delay("-NAK"), Duration::ZERO);
        assert_eq!(
            nak_delay("-NAK {\"delay\": 2000000000}"),
            Duration::from_secs(2)
        );
        assert_eq!(nak_delay("-NAK junk"), Duration::ZERO);
    }
}
