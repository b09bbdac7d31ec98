//! natswal's request/response API over NATS (docs/PROTOCOL.md):
//! `<prefix>.REPLAY.<stream>` (pull-style replay) and `<prefix>.STATUS`.
//!
//! Replay is stateless and pull-based: each request names where to start
//! and how many records it wants (`batch`); the server sends at most that
//! many to the request's reply subject, then one status message that says
//! where to continue. The server never sends more than asked, so a slow
//! reader can pause as long as it likes and is never dropped by NATS.

use crate::metrics::BridgeMetrics;
use crate::protocol::*;
use bytes::BytesMut;
use futures_util::StreamExt;
use natswal::{StartPosition, Stream, SubjectPattern};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Longest long-poll a request may ask for.
const WAIT_MAX: Duration = Duration::from_secs(60);

#[derive(Clone)]
pub struct ApiService {
    /// natswal's own client ([`crate::wire`]): requests and every reply of
    /// a replay go through this one connection, so a status always
    /// follows the records it ends.
    pub client: crate::wire::Client,
    pub streams: Arc<BTreeMap<String, Arc<Stream>>>,
    /// Replicated streams (Raft groups): any replica serves their replays,
    /// of committed records.
    pub replicated: Arc<BTreeMap<String, Arc<natswal_replication::ReplicatedStream>>>,
    /// The queue group the API subscribes in (a cluster's nodes share the
    /// requests; each is answered once).
    pub queue: Option<String>,
    /// The subjects each stream captures (what an unfiltered replay reads).
    pub stream_subjects: Arc<BTreeMap<String, Vec<SubjectPattern>>>,
    pub metrics: Arc<BridgeMetrics>,
    pub prefix: String,
    /// One permit per replay being served (`api.replays_max`).
    pub replays: Arc<tokio::sync::Semaphore>,
    pub replays_max: usize,
    pub access: Arc<std::sync::RwLock<AccessRules>>,
    pub audit: Arc<crate::audit::AuditLog>,
}

struct CompiledRule {
    name: String,
    reply_prefixes: Vec<String>,
    replay: Vec<SubjectPattern>,
    status: bool,
}

/// The `[[access]]` rules: who may replay which subjects and read status.
/// A requester is identified by the reply subject of its request: NATS
/// permissions decide who may subscribe to a reply prefix, so only its
/// owner can receive what natswal sends there. Without rules, access is
/// open.
pub struct AccessRules {
    rules: Vec<CompiledRule>,
}

impl AccessRules {
    pub fn new(rules: &[crate::config::AccessRule]) -> crate::error::Result<AccessRules> {
        let mut compiled = Vec::with_capacity(rules.len());
        for rule in rules {
            let replay = rule
                .replay
                .iter()
                .map(|pattern| SubjectPattern::parse(pattern))
                .collect::<natswal::Result<Vec<_>>>()?;
            compiled.push(CompiledRule {
                name: rule.name.clone(),
                reply_prefixes: rule.reply_prefixes.clone(),
                replay,
                status: rule.status,
            });
        }
        Ok(AccessRules { rules: compiled })
    }

    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// The rule with the longest reply prefix that the reply starts with.
    fn rule_for(&self, reply: &str) -> Option<(&CompiledRule, usize)> {
        self.rules
            .iter()
            .filter_map(|rule| {
                rule.reply_prefixes
                    .iter()
                    .filter(|prefix| reply.starts_with(prefix.as_str()))
                    .map(|prefix| prefix.len())
                    .max()
                    .map(|length| (rule, length))
            })
            .max_by_key(|(_, length)| *length)
    }

    /// Who asks (the rule's name), or why the request is refused.
    pub fn check_replay(
        &self,
        reply: &str,
        requested: &[SubjectPattern],
    ) -> Result<String, String> {
        if self.rules.is_empty() {
            return Ok("anyone".to_string());
        }
        let Some((rule, _)) = self.rule_for(reply) else {
            return Err(format!("no access rule covers reply subject '{reply}'"));
        };
        for pattern in requested {
            if !rule
                .replay
                .iter()
                .any(|allowed| pattern.is_subset_of(allowed))
            {
                return Err(format!("'{}' may not replay '{pattern}'", rule.name));
            }
        }
        Ok(rule.name.clone())
    }

    pub fn check_status(&self, reply: &str) -> Result<String, String> {
        if self.rules.is_empty() {
            return Ok("anyone".to_string());
        }
        match self.rule_for(reply) {
            Some((rule, _)) if rule.status => Ok(rule.name.clone()),
            Some((rule, _)) => Err(format!("'{}' may not read status", rule.name)),
            None => Err(format!("no access rule covers reply subject '{reply}'")),
        }
    }
}

/// The API's subscriptions (one queue), made before natswal calls itself
/// ready.
pub struct ApiSubscriptions {
    requests: crate::wire::Subscription,
}

/// Subscribes to the API subjects.
pub fn subscribe(service: &ApiService) -> ApiSubscriptions {
    // `>`, not `*`: a subject with more tokens gets an error, not silence.
    let replay_subject = format!("{}.REPLAY.>", service.prefix);
    let status_subject = format!("{}.STATUS", service.prefix);
    ApiSubscriptions {
        requests: service
            .client
            .subscribe_all_in(&[replay_subject, status_subject], service.queue.as_deref()),
    }
}

/// Serves the API's requests until `shutdown`.
pub async fn run(
    service: ApiService,
    subscriptions: ApiSubscriptions,
    mut shutdown: watch::Receiver<bool>,
) {
    let status_subject = format!("{}.STATUS", service.prefix);
    let mut requests = subscriptions.requests;
    loop {
        let message = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            message = requests.next() => match message {
                Some(message) => message,
                None => break,
            },
        };
        let service = service.clone();
        if message.subject_text() == status_subject {
            tokio::spawn(async move { service.answer_status(message).await });
        } else {
            match Arc::clone(&service.replays).try_acquire_owned() {
                Ok(permit) => {
                    tokio::spawn(async move {
                        service.answer_replay(message).await;
                        drop(permit);
                    });
                }
                Err(_) => service.refuse_replay(message).await,
            }
        }
    }
}

/// A status message's headers: `Nwal-Status`, description, next offset,
/// count.
fn status_headers(
    stream: &str,
    status: u16,
    description: &str,
    next_offset: Option<u64>,
    count: u64,
) -> Vec<u8> {
    let status = status.to_string();
    let next = next_offset.map(|next| next.to_string());
    let count = count.to_string();
    // A description is natswal's own text, but may quote a request.
    let description = description.replace(['\r', '\n'], " ");
    let mut pairs = vec![
        (HEADER_STATUS, status.as_str()),
        (HEADER_DESCRIPTION, description.as_str()),
        (HEADER_STREAM, stream),
    ];
    if let Some(next) = &next {
        pairs.push((HEADER_NEXT_OFFSET, next.as_str()));
    }
    pairs.push((HEADER_COUNT, count.as_str()));
    crate::headers::block(&pairs)
}

#[derive(Serialize)]
struct StatusReply {
    version: &'static str,
    streams: Vec<StreamStatusJson>,
}

#[derive(Serialize)]
pub struct StreamStatusJson {
    pub name: String,
    pub first_offset: u64,
    pub next_offset: u64,
    pub records: u64,
    pub bytes: u64,
    pub segments: usize,
    pub first_timestamp_ns: Option<i64>,
    pub last_timestamp_ns: Option<i64>,
    /// Records queued for writing or syncing that are not yet acknowledged.
    pub appends_in_flight: u64,
    pub poisoned: Option<String>,
    /// Why appends fail while the stream stays writable (a full disk).
    pub append_failure: Option<String>,
}

impl ApiService {
    /// Sends one reply; it waits for room (never dropped) and fails only
    /// when the client is closed or the reply is over `max_payload`.
    async fn reply(&self, reply: &str, headers: &[u8], body: &[u8]) {
        if let Err(error) = self.client.publish_when_room(reply, headers, body).await {
            tracing::warn!(%error, "cannot send an API reply");
        }
    }

    async fn answer_status(&self, message: crate::wire::Message) {
        let Some(reply) = message.reply else { return };
        let allowed = self
            .access
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .check_status(&reply);
        if let Err(reason) = allowed {
            self.audit.record_or_log(
                "status_denied",
                &reply,
                "server",
                "denied",
                serde_json::json!({"reason": reason}),
            );
            let headers = status_headers(
                "",
                STATUS_FORBIDDEN,
                &format!("Forbidden: {reason}"),
                None,
                0,
            );
            self.reply(&reply, &headers, &[]).await;
            return;
        }
        let streams = self
            .streams
            .values()
            .map(|stream| {
                let status = stream.status();
                let stored = stream.metrics().records.load(Ordering::Relaxed);
                let completed = stream.metrics().append_latency_us.snapshot().2;
                StreamStatusJson {
                    name: status.name,
                    first_offset: status.first_offset,
                    next_offset: status.next_offset,
                    records: status.records,
                    bytes: status.bytes,
                    segments: status.segments,
                    first_timestamp_ns: status.first_timestamp_ns,
                    last_timestamp_ns: status.last_timestamp_ns,
                    appends_in_flight: stored.saturating_sub(completed),
                    poisoned: status.poisoned,
                    append_failure: status.append_failure,
                }
            })
            .collect();
        let body = serde_json::to_vec(&StatusReply {
            version: env!("CARGO_PKG_VERSION"),
            streams,
        })
        .unwrap_or_default();
        self.reply(&reply, &[], &body).await;
    }

    /// Past `api.replays_max`: a 503 at once, the request is not queued.
    async fn refuse_replay(&self, message: crate::wire::Message) {
        self.metrics.replay_requests.fetch_add(1, Ordering::Relaxed);
        self.metrics.replay_errors.fetch_add(1, Ordering::Relaxed);
        let Some(reply) = &message.reply else { return };
        let description = format!(
            "Too Many Replays: {} replays are being served (api.replays_max); retry later",
            self.replays_max
        );
        let stream = message
            .subject_text()
            .rsplit('.')
            .next()
            .unwrap_or_default();
        let headers = status_headers(stream, STATUS_TOO_MANY_REPLAYS, &description, None, 0);
        self.reply(reply, &headers, &[]).await;
    }

    async fn answer_replay(&self, message: crate::wire::Message) {
        self.metrics.replay_requests.fetch_add(1, Ordering::Relaxed);
        let Some(reply) = message.reply.clone() else {
            tracing::debug!(subject = %message.subject_text(), "replay request without a reply subject ignored");
            return;
        };
        let replay_prefix = format!("{}.REPLAY.", self.prefix);
        let stream_name = message
            .subject_text()
            .strip_prefix(replay_prefix.as_str())
            .unwrap_or_default()
            .to_string();
        let result = if stream_name.contains('.') {
            Err(ReplayError::bad(format!(
                "replay subjects are {replay_prefix}<stream> and a stream name has no '.'; '{}' has more tokens",
                message.subject_text()
            )))
        } else {
            self.replay(&stream_name, &message, reply.clone()).await
        };
        if let Err(error) = result {
            self.metrics.replay_errors.fetch_add(1, Ordering::Relaxed);
            let headers = status_headers(
                &stream_name,
                error.status,
                &error.description,
                error.next_offset,
                error.count,
            );
            self.reply(&reply, &headers, &[]).await;
        }
    }

    /// Serves one replay request; `Err` is a status to send instead.
    async fn replay(
        &self,
        stream_name: &str,
        message: &crate::wire::Message,
        reply: async_nats::Subject,
    ) -> Result<(), ReplayError> {
        let bad = ReplayError::bad;
        let request: ReplayRequest = if message.payload.iter().all(u8::is_ascii_whitespace) {
            ReplayRequest::default()
        } else {
            serde_json::from_slice(&message.payload)
                .map_err(|error| bad(format!("invalid replay request JSON: {error}")))?
        };
        let source = match (
            self.streams.get(stream_name),
            self.replicated.get(stream_name),
        ) {
            (Some(stream), _) => ReadSource::Local(Arc::clone(stream)),
            (None, Some(group)) => ReadSource::Replicated(Arc::clone(group)),
            (None, None) => {
                return Err(ReplayError::new(
                    STATUS_STREAM_NOT_FOUND,
                    format!("Stream Not Found: no stream named '{stream_name}'"),
                ))
            }
        };
        let filter = request
            .filter
            .as_deref()
            .map(SubjectPattern::parse)
            .transpose()
            .map_err(|error| bad(error.to_string()))?;
        let requested = match &filter {
            Some(pattern) => vec![pattern.clone()],
            None => self
                .stream_subjects
                .get(stream_name)
                .cloned()
                .unwrap_or_default(),
        };
        let allowed = self
            .access
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .check_replay(reply.as_str(), &requested);
        if let Err(reason) = allowed {
            self.audit.record_or_log(
                "replay_denied",
                reply.as_str(),
                stream_name,
                "denied",
                serde_json::json!({"filter": request.filter, "reason": reason}),
            );
            return Err(ReplayError::new(
                STATUS_FORBIDDEN,
                format!("Forbidden: {reason}"),
            ));
        }
        let start = match &request.start {
            Start::Earliest => StartPosition::Earliest,
            Start::Latest => StartPosition::Latest,
            Start::Offset { offset } => StartPosition::Offset(*offset),
            Start::Time { time } => StartPosition::Time(time.nanoseconds().map_err(bad)?),
        };
        let end = match &request.end {
            None => None,
            Some(End::Offset { offset }) => Some((Some(*offset), None)),
            Some(End::Time { time }) => Some((None, Some(time.nanoseconds().map_err(bad)?))),
        };
        let batch = request.batch.unwrap_or(BATCH_DEFAULT);
        let batch_max = match request.mode {
            Mode::Messages | Mode::Light => BATCH_MAX,
            Mode::Batched | Mode::Frames => BATCH_MAX_BATCHED,
        };
        if request.mode == Mode::Frames && request.filter.is_some() {
            return Err(bad(
                "frames mode sends whole frames and cannot filter; use mode messages or batched"
                    .to_string(),
            ));
        }
        if batch == 0 || batch > batch_max {
            return Err(bad(format!(
                "batch must be between 1 and {batch_max} in this mode"
            )));
        }
        if request.limit == Some(0) {
            return Err(bad("limit must be at least 1".to_string()));
        }
        let wanted = batch.min(request.limit.unwrap_or(u64::MAX));
        let max_bytes = request.max_bytes.unwrap_or(u64::MAX).max(1);
        let wait = Duration::from_millis(request.wait_ms.unwrap_or(0)).min(WAIT_MAX);
        // Reads touch mapped pages and may wait for the disk: they run on
        // the blocking pool, never on the async workers.
        if request.linearizable {
            if let ReadSource::Replicated(group) = &source {
                group
                    .linearizable_barrier(LINEARIZABLE_TIMEOUT)
                    .await
                    .map_err(|error| {
                        ReplayError::new(
                            STATUS_UNAVAILABLE,
                            format!("Unavailable: no linearizable read: {error}"),
                        )
                    })?;
            }
        }
        let opened = tokio::task::spawn_blocking(move || source.reader(start, filter)).await;
        let mut reader = opened
            .map_err(|error| ReplayError::storage(format!("the read task failed: {error}")))?
            .map_err(|error| ReplayError::storage(error.to_string()))?;
        // Batches of up to 1 MiB keep the pipe busy without long stalls.
        let server_max_payload = self.client.max_payload();
        let payload_max = server_max_payload.clamp(4096, 1 << 20);
        let mut sender = Sender::new(
            &self.client,
            reply.clone(),
            stream_name,
            request.mode,
            payload_max,
        );
        // A whole first frame may begin before the start offset: its
        // records there do not count toward the limit, or a limit would end
        // the replay short of it. (A time start is not resolved to an offset
        // here; its first frame counts whole.)
        if let StartPosition::Offset(offset) = start {
            sender.counted_from = offset;
        }
        let deadline = Instant::now() + wait;
        let mut bytes_sent = 0u64;
        let mut reached_end = false;
        // Set when a unit past the end was read but not sent.
        let mut next_offset = None;
        while sender.count() < wanted && bytes_sent < max_bytes {
            let limits = StepLimits {
                mode: request.mode,
                end,
                records: wanted - sender.count(),
                bytes: max_bytes - bytes_sent,
                counted_from: sender.counted_from,
            };
            let (returned, step) = tokio::task::spawn_blocking(move || read_step(reader, &limits))
                .await
                .map_err(|error| ReplayError::storage(format!("the read task failed: {error}")))?;
            reader = returned;
            for unit in step.units {
                bytes_sent += unit.bytes();
                let sent = match unit {
                    Unit::Record(record) => sender.send(record).await,
                    Unit::Frame(frame) => sender.send_frame(frame).await,
                };
                sent.map_err(|error| error.with_count(sender.delivered))?;
            }
            if let Some(error) = step.error {
                sender
                    .flush()
                    .await
                    .map_err(|error| error.with_count(sender.delivered))?;
                return Err(ReplayError::storage(error.to_string()).with_count(sender.delivered));
            }
            if step.reached_end {
                reached_end = true;
                next_offset = step.past_end_offset;
                break;
            }
            if step.caught_up {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if sender.count() > 0 || remaining.is_zero() {
                    break;
                }
                let _ = tokio::time::timeout(remaining, reader.wait()).await;
            }
        }
        sender
            .flush()
            .await
            .map_err(|error| error.with_count(sender.delivered))?;
        let delivered = sender.delivered;
        self.metrics
            .replay_messages
            .fetch_add(delivered, Ordering::Relaxed);
        let limit_reached = request.limit.is_some_and(|limit| delivered >= limit);
        let (status, description) = if reached_end || limit_reached {
            (STATUS_END_OF_RANGE, "End Of Range")
        } else if delivered == 0 {
            (STATUS_NO_MESSAGES, "No Messages")
        } else {
            (STATUS_MORE, "More")
        };
        let headers = status_headers(
            stream_name,
            status,
            description,
            Some(next_offset.unwrap_or_else(|| reader.next_offset())),
            delivered,
        );
        self.reply(&reply, &headers, &[]).await;
        Ok(())
    }
}

/// How long a linearizable replay waits for the leader's read index and
/// for this replica to apply through it.
const LINEARIZABLE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a replay reads: a stream of this node, or a replica of a
/// replicated stream (committed records only).
enum ReadSource {
    Local(Arc<Stream>),
    Replicated(Arc<natswal_replication::ReplicatedStream>),
}

impl ReadSource {
    fn reader(
        &self,
        start: StartPosition,
        filter: Option<SubjectPattern>,
    ) -> natswal::Result<natswal::Reader> {
        match self {
            ReadSource::Local(stream) => stream.reader(start, filter),
            ReadSource::Replicated(group) => group.reader(start, filter),
        }
    }
}

/// Why a replay stopped short: the status sent instead of the usual one.
#[derive(Debug)]
struct ReplayError {
    status: u16,
    description: String,
    /// Where a reader resumes: the first record not sent, when known.
    next_offset: Option<u64>,
    /// Records this response delivered before it stopped.
    count: u64,
}

impl ReplayError {
    fn new(status: u16, description: String) -> ReplayError {
        ReplayError {
            status,
            description,
            next_offset: None,
            count: 0,
        }
    }

    fn bad(reason: String) -> ReplayError {
        ReplayError::new(STATUS_BAD_REQUEST, format!("Bad Request: {reason}"))
    }

    fn storage(reason: String) -> ReplayError {
        ReplayError::new(STATUS_STORAGE_ERROR, format!("Storage Error: {reason}"))
    }

    fn with_count(mut self, count: u64) -> ReplayError {
        self.count = count;
        self
    }

    /// A record (or frame) at `offset` could not be published.
    fn unsent(offset: u64, error: &crate::wire::PublishError) -> ReplayError {
        let (status, description) = if matches!(error, crate::wire::PublishError::TooLarge { .. }) {
            (
                    STATUS_TOO_LARGE,
                    format!("Record Too Large: the record at offset {offset} does not fit the server's max_payload with replay's headers ({error}); it is stored: a server with a larger max_payload can send it"),
                )
        } else {
            (
                STATUS_STORAGE_ERROR,
                format!("Publish Failed: cannot send the record at offset {offset}: {error}"),
            )
        };
        ReplayError {
            status,
            description,
            next_offset: Some(offset),
            count: 0,
        }
    }
}

/// How far one blocking read step may go.
struct StepLimits {
    mode: Mode,
    end: Option<(Option<u64>, Option<i64>)>,
    /// Records still wanted (counted from `counted_from`).
    records: u64,
    bytes: u64,
    counted_from: u64,
}

/// Units one step hands out at most, so a replay holds little memory.
const STEP_UNITS_MAX: usize = 4096;
const STEP_BYTES_MAX: u64 = 512 * 1024;

/// What one blocking read step found.
#[derive(Default)]
struct Step {
    units: Vec<Unit>,
    /// The end bound was reached (after these units).
    reached_end: bool,
    /// The offset of the unit read past the end and not sent: where the
    /// reader stands for the client.
    past_end_offset: Option<u64>,
    /// The reader caught up with the stream.
    caught_up: bool,
    /// A read failed after these units.
    error: Option<natswal::Error>,
}

/// Reads units until the limits, the end bound, the stream's end or an
/// error; runs on the blocking pool.
fn read_step(mut reader: natswal::Reader, limits: &StepLimits) -> (natswal::Reader, Step) {
    let mut step = Step::default();
    let mut records = 0u64;
    let mut bytes = 0u64;
    let budget_bytes = limits.bytes.min(STEP_BYTES_MAX);
    while records < limits.records && bytes < budget_bytes && step.units.len() < STEP_UNITS_MAX {
        let next = if limits.mode == Mode::Frames {
            reader
                .next_stored_frame()
                .and_then(|frame| frame.map(|frame| reader.decrypt(frame)).transpose())
                .map(|frame| frame.map(Unit::Frame))
        } else {
            reader.next().map(|record| record.map(Unit::Record))
        };
        let unit = match next {
            Ok(Some(unit)) => unit,
            Ok(None) => {
                step.caught_up = true;
                break;
            }
            Err(error) => {
                step.error = Some(error);
                break;
            }
        };
        // A frame straddling the end is sent whole; clients drop the
        // records past it (docs/PROTOCOL.md).
        let (first_offset, first_timestamp_ns) = unit.start();
        let past_end = match limits.end {
            Some((Some(last_offset), _)) => first_offset > last_offset,
            Some((_, Some(last_time))) => first_timestamp_ns > last_time,
            _ => false,
        };
        if past_end {
            step.reached_end = true;
            step.past_end_offset = Some(first_offset);
            break;
        }
        records += unit.counted_records(limits.counted_from);
        bytes += unit.bytes();
        step.units.push(unit);
        if let Some((Some(last_offset), _)) = limits.end {
            if reader.next_offset() > last_offset {
                step.reached_end = true;
                break;
            }
        }
    }
    (reader, step)
}

/// What one replay step hands out: a record, or a whole stored frame in
/// frames mode.
enum Unit {
    Record(natswal::StoredRecord),
    Frame(natswal::StoredFrame),
}

impl Unit {
    /// Offset and timestamp of its first record.
    fn start(&self) -> (u64, i64) {
        match self {
            Unit::Record(record) => (record.offset, record.timestamp_ns),
            Unit::Frame(frame) => (frame.header.base_offset, frame.header.first_timestamp_ns),
        }
    }

    /// Bytes it counts against `max_bytes`.
    fn bytes(&self) -> u64 {
        match self {
            Unit::Record(record) => {
                (record.subject.len() + record.headers.len() + record.payload.len()) as u64
            }
            Unit::Frame(frame) => frame.bytes.len() as u64,
        }
    }

    /// Records it counts toward `batch` and `limit`: a frame's records
    /// before `counted_from` precede the start and do not count.
    fn counted_records(&self, counted_from: u64) -> u64 {
        match self {
            Unit::Record(_) => 1,
            Unit::Frame(frame) => counted_in_frame(
                frame.header.record_count,
                frame.header.base_offset,
                counted_from,
            ),
        }
    }
}

/// Records of a frame at or after `counted_from`.
fn counted_in_frame(record_count: u32, base_offset: u64, counted_from: u64) -> u64 {
    let records = u64::from(record_count);
    records - counted_from.saturating_sub(base_offset).min(records)
}

/// The reply subject of a record in `light` mode, before its offset,
/// timestamp and stored subject.
pub const LIGHT_REPLY_PREFIX: &str = "$NWAL.R.";

/// Sends replayed records one per message or packed into records-v1
/// batches no larger than the server's max payload. A record is counted as
/// delivered only once its message is published; a record that cannot be
/// published stops the replay with a status naming its offset.
struct Sender<'a> {
    client: &'a crate::wire::Client,
    reply: async_nats::Subject,
    stream: String,
    mode: Mode,
    payload_max: usize,
    buffer: BytesMut,
    buffered: u64,
    /// Offset of the first record in `buffer`.
    buffer_first_offset: u64,
    /// Counted records in `buffer`, not yet published.
    buffer_counted: u64,
    /// Records published that the request asked for (they count toward
    /// `batch` and `limit`).
    delivered: u64,
    /// Records of a whole frame below this offset are sent but not
    /// counted: the client drops them (they precede its start offset).
    counted_from: u64,
}

type Sent = Result<(), ReplayError>;

impl<'a> Sender<'a> {
    fn new(
        client: &'a crate::wire::Client,
        reply: async_nats::Subject,
        stream: &str,
        mode: Mode,
        payload_max: usize,
    ) -> Sender<'a> {
        Sender {
            client,
            reply,
            stream: stream.to_string(),
            mode,
            payload_max,
            buffer: BytesMut::new(),
            buffered: 0,
            buffer_first_offset: 0,
            buffer_counted: 0,
            delivered: 0,
            counted_from: 0,
        }
    }

    /// Records counted so far, published or buffered.
    fn count(&self) -> u64 {
        self.delivered + self.buffer_counted
    }

    /// Publishes one message to the requester; `metadata` is its reply
    /// subject (a light record's metadata; empty: none).
    async fn publish(&self, offset: u64, metadata: &str, headers: &[u8], body: &[u8]) -> Sent {
        self.client
            .publish_with_reply_when_room(&self.reply, metadata, headers, body)
            .await
            .map_err(|error| ReplayError::unsent(offset, &error))
    }

    /// A record's metadata as its mode carries it: in four headers after
    /// its own (`messages`), or in the reply subject (`light`).
    fn record_metadata(&self, record: &natswal::StoredRecord) -> (String, Vec<u8>) {
        let subject = String::from_utf8_lossy(&record.subject);
        if self.mode == Mode::Light {
            let metadata = format!(
                "{LIGHT_REPLY_PREFIX}{}.{}.{subject}",
                record.offset, record.timestamp_ns
            );
            let headers = if record.headers.is_empty() {
                Vec::new()
            } else {
                crate::headers::replay_block(&record.headers, &[])
            };
            return (metadata, headers);
        }
        let offset = record.offset.to_string();
        let timestamp = record.timestamp_ns.to_string();
        let headers = crate::headers::replay_block(
            &record.headers,
            &[
                (HEADER_STREAM, self.stream.as_str()),
                (HEADER_SUBJECT, &subject),
                (HEADER_OFFSET, &offset),
                (HEADER_TIMESTAMP, &timestamp),
            ],
        );
        (String::new(), headers)
    }

    async fn send(&mut self, record: natswal::StoredRecord) -> Sent {
        match self.mode {
            Mode::Messages | Mode::Light => {
                let (metadata, headers) = self.record_metadata(&record);
                self.publish(record.offset, &metadata, &headers, &record.payload)
                    .await?;
                self.delivered += 1;
                Ok(())
            }
            Mode::Batched | Mode::Frames => self.push_batched(&record, true).await,
        }
    }

    async fn push_batched(&mut self, record: &natswal::StoredRecord, counted: bool) -> Sent {
        let entry = BATCH_ENTRY_OVERHEAD
            + record.subject.len()
            + record.headers.len()
            + record.payload.len();
        if self.buffered > 0 && self.buffer.len() + entry > self.payload_max - 512 {
            self.flush().await?;
        }
        if self.buffered == 0 {
            self.buffer_first_offset = record.offset;
        }
        encode_batched(
            &mut self.buffer,
            record.offset,
            record.timestamp_ns,
            &record.subject,
            &record.headers,
            &record.payload,
        );
        self.buffered += 1;
        self.buffer_counted += u64::from(counted);
        Ok(())
    }

    /// One stored frame per message, as it is (decrypted, not
    /// re-compressed). A frame larger than the server's max payload cannot
    /// travel whole: its records go as records-v1 messages instead.
    async fn send_frame(&mut self, frame: natswal::StoredFrame) -> Sent {
        let base_offset = frame.header.base_offset;
        if frame.bytes.len() > self.payload_max - 512 {
            let records =
                natswal::decode_frame_bytes(&frame.bytes, usize::MAX).map_err(|reason| {
                    ReplayError {
                        next_offset: Some(base_offset),
                        ..ReplayError::storage(format!(
                            "the checked frame at offset {base_offset} did not decode: {reason}"
                        ))
                    }
                })?;
            for record in records {
                let counted = record.offset >= self.counted_from;
                self.push_batched(&record, counted).await?;
            }
            return self.flush().await;
        }
        let counted = counted_in_frame(frame.header.record_count, base_offset, self.counted_from);
        let headers = crate::headers::block(&[
            (HEADER_FORMAT, FORMAT_FRAME_V1),
            (HEADER_STREAM, self.stream.as_str()),
            (HEADER_COUNT, &frame.header.record_count.to_string()),
            (HEADER_OFFSET, &base_offset.to_string()),
        ]);
        self.publish(base_offset, "", &headers, &frame.bytes)
            .await?;
        self.delivered += counted;
        Ok(())
    }

    async fn flush(&mut self) -> Sent {
        if self.buffered == 0 {
            return Ok(());
        }
        let headers = crate::headers::block(&[
            (HEADER_FORMAT, FORMAT_RECORDS_V1),
            (HEADER_STREAM, self.stream.as_str()),
            (HEADER_COUNT, &self.buffered.to_string()),
        ]);
        let body = self.buffer.split().freeze();
        self.buffered = 0;
        let counted = std::mem::take(&mut self.buffer_counted);
        self.publish(self.buffer_first_offset, "", &headers, &body)
            .await?;
        self.delivered += counted;
        Ok(())
    }
}
