//! JetStream's batch publishing protocols (ADR-50, as nats-server 2.15
//! implements them) and publish preconditions, as natswal speaks them:
//!
//! - **Atomic batches**: messages with `Nats-Batch-Id` / `Nats-Batch-Sequence`
//!   are staged in memory (within a byte budget) until the message with
//!   `Nats-Batch-Commit`, then written as **one frame**: after a crash the
//!   batch is there whole or not at all, and readers never see part of it.
//! - **Fast ingest**: control travels in the reply subject
//!   `<prefix>.<id>.<flow>.<ok|fail>.<seq>.<op>.$FI`; messages are stored as
//!   they come (grouped with other traffic) and flow acks are sent every F
//!   messages once those messages are durable.
//! - **Preconditions** (`Nats-Expected-*`) become engine preconditions that
//!   the writer checks in offset order; none is ever ignored.
//!
//! This module owns parsing, the staging area and the per-batch state; the
//! ingest task drives it in arrival order.

use crate::ack::ApiError;
use async_nats::HeaderMap;
use natswal::{Precondition, Record};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The JetStream API level natswal implements: atomic batches (2) and fast
/// ingest (4).
pub const API_LEVEL: u32 = 4;

pub const HEADER_BATCH_ID: &str = "Nats-Batch-Id";
pub const HEADER_BATCH_SEQUENCE: &str = "Nats-Batch-Sequence";
pub const HEADER_BATCH_COMMIT: &str = "Nats-Batch-Commit";
pub const HEADER_REQUIRED_API_LEVEL: &str = "Nats-Required-Api-Level";
pub const HEADER_EXPECTED_STREAM: &str = "Nats-Expected-Stream";
pub const HEADER_EXPECTED_LAST_SEQUENCE: &str = "Nats-Expected-Last-Sequence";
pub const HEADER_EXPECTED_LAST_MSG_ID: &str = "Nats-Expected-Last-Msg-Id";
pub const HEADER_MSG_ID: &str = "Nats-Msg-Id";

/// Longest batch id JetStream accepts.
const BATCH_ID_LENGTH_MAX: usize = 64;

/// Limits of batching, per stream and per server.
#[derive(Debug, Clone)]
pub struct BatchLimits {
    pub allow_atomic: bool,
    pub allow_batched: bool,
    /// Messages in one atomic batch (JetStream default 1000).
    pub atomic_messages_max: u64,
    /// Atomic batches staged at once in this stream.
    pub atomic_inflight_max: usize,
    /// Bytes staged by all open atomic batches of this stream.
    pub atomic_staging_bytes_max: u64,
    /// Fast-ingest batches open at once in this stream.
    pub fast_inflight_max: usize,
    /// A batch without traffic for this long is abandoned.
    pub timeout: Duration,
    /// Shared by every stream of the server.
    pub server: Arc<ServerBatchLimits>,
}

/// Server-wide limits and counters.
#[derive(Debug)]
pub struct ServerBatchLimits {
    pub atomic_inflight_max: usize,
    pub fast_inflight_max: usize,
    pub atomic_inflight: AtomicUsize,
    pub fast_inflight: AtomicUsize,
}

impl BatchLimits {
    /// The limits a stream's section sets, sharing the server's.
    pub fn of_section(
        section: &crate::config::StreamSection,
        server: &Arc<ServerBatchLimits>,
    ) -> BatchLimits {
        BatchLimits {
            allow_atomic: section.allow_atomic,
            allow_batched: section.allow_batched,
            atomic_messages_max: section.atomic_batch_max_messages,
            atomic_inflight_max: section.atomic_batches_max,
            atomic_staging_bytes_max: section.atomic_staging_bytes,
            fast_inflight_max: section.fast_batches_max,
            timeout: section.batch_timeout,
            server: Arc::clone(server),
        }
    }
}

impl ServerBatchLimits {
    pub fn new(atomic_inflight_max: usize, fast_inflight_max: usize) -> ServerBatchLimits {
        ServerBatchLimits {
            atomic_inflight_max,
            fast_inflight_max,
            atomic_inflight: AtomicUsize::new(0),
            fast_inflight: AtomicUsize::new(0),
        }
    }

    /// Takes one slot of `counter` unless `max` are taken.
    fn acquire(counter: &AtomicUsize, max: usize) -> bool {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| {
                (taken < max).then_some(taken + 1)
            })
            .is_ok()
    }
}

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers
        .and_then(|headers| headers.get(name))
        .map(|value| value.as_str())
}

/// JSRequiredApiLevelErr when the message needs a newer API than natswal's.
pub fn check_api_level(headers: Option<&HeaderMap>) -> Result<(), ApiError> {
    match header(headers, HEADER_REQUIRED_API_LEVEL) {
        None => Ok(()),
        Some(level) => match level.trim().parse::<u32>() {
            Ok(level) if level <= API_LEVEL => Ok(()),
            _ => Err(ApiError::new(
                412,
                10185,
                "JetStream minimum api level required",
            )),
        },
    }
}

/// The preconditions of a message, or the error that rejects it.
pub fn preconditions(
    headers: Option<&HeaderMap>,
    stream: &str,
) -> Result<Vec<Precondition>, ApiError> {
    let Some(headers) = headers else {
        return Ok(Vec::new());
    };
    let mut found = Vec::new();
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        if !name.to_ascii_lowercase().starts_with("nats-expected-") {
            continue;
        }
        let value = values
            .first()
            .map(|value| value.as_str())
            .unwrap_or_default();
        if name.eq_ignore_ascii_case(HEADER_EXPECTED_STREAM) {
            if value != stream {
                return Err(ApiError::new(400, 10060, "expected stream does not match"));
            }
        } else if name.eq_ignore_ascii_case(HEADER_EXPECTED_LAST_SEQUENCE) {
            let sequence = value.trim().parse::<u64>().map_err(|_| {
                ApiError::new(
                    400,
                    10003,
                    format!(
                        "bad request: {HEADER_EXPECTED_LAST_SEQUENCE} '{value}' is not a number"
                    ),
                )
            })?;
            found.push(Precondition::ExpectedLastOffset(sequence));
        } else if name.eq_ignore_ascii_case(HEADER_EXPECTED_LAST_MSG_ID) {
            found.push(Precondition::ExpectedLastMessageId(value.to_string()));
        } else {
            // Nats-Expected-Last-Subject-Sequence and any other condition:
            // refusing is the only safe answer; accepting would silently
            // break the publisher's optimistic concurrency.
            return Err(ApiError::new(
                400,
                10003,
                format!(
                    "bad request: natswal does not support the precondition header {name} (it needs a per-subject index); the message was not stored"
                ),
            ));
        }
    }
    Ok(found)
}

/// Maps a failed engine precondition to JetStream's error.
pub fn precondition_error(failure: &natswal::PreconditionFailure) -> ApiError {
    match failure {
        natswal::PreconditionFailure::WrongLastOffset { .. } => {
            ApiError::new(400, 10071, failure.to_string())
        }
        natswal::PreconditionFailure::WrongLastMessageId { .. } => {
            ApiError::new(400, 10070, failure.to_string())
        }
        _ => ApiError::new(400, 10003, failure.to_string()),
    }
}

// ----- atomic batches -------------------------------------------------------

/// Headers of a message that belongs to an atomic batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AtomicHeaders {
    pub id: String,
    pub sequence: Option<u64>,
    /// `Some(true)` for `eob`, `Some(false)` for `1`, `None` without commit.
    pub commit: Option<Result<bool, ()>>,
}

pub fn atomic_headers(headers: Option<&HeaderMap>) -> Option<AtomicHeaders> {
    let id = header(headers, HEADER_BATCH_ID)?.to_string();
    let sequence =
        header(headers, HEADER_BATCH_SEQUENCE).and_then(|value| value.trim().parse::<u64>().ok());
    let commit = header(headers, HEADER_BATCH_COMMIT).map(|value| match value {
        "1" => Ok(false),
        "eob" => Ok(true),
        _ => Err(()),
    });
    Some(AtomicHeaders {
        id,
        sequence,
        commit,
    })
}

/// Why an atomic batch was abandoned (for the advisory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbandonReason {
    Timeout,
    Large,
    Incomplete,
    Unsupported,
}

impl AbandonReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            AbandonReason::Timeout => "timeout",
            AbandonReason::Large => "large",
            AbandonReason::Incomplete => "incomplete",
            AbandonReason::Unsupported => "unsupported",
        }
    }
}

struct StagedBatch {
    records: Vec<Record>,
    message_ids: HashSet<String>,
    /// Message ids with the index of their record.
    ids_by_index: Vec<(u32, String)>,
    preconditions: Vec<(u32, Precondition)>,
    last_sequence: u64,
    bytes: u64,
    last_activity: Instant,
}

/// A committed batch, ready to be written as one frame.
pub struct CommittedBatch {
    pub id: String,
    pub records: Vec<Record>,
    pub preconditions: Vec<(u32, Precondition)>,
    pub message_ids: Vec<(u32, String)>,
}

/// What happened to a message of an atomic batch.
pub enum AtomicOutcome {
    /// Staged; answer with an empty reply.
    Staged,
    /// The batch committed.
    Commit(CommittedBatch),
    /// Refused; if `abandoned`, the batch was dropped for that reason.
    Refused {
        error: ApiError,
        abandoned: Option<(String, AbandonReason)>,
    },
}

/// The atomic batches staged by one stream.
pub struct AtomicBatches {
    batches: HashMap<String, StagedBatch>,
    staged_bytes: u64,
}

impl AtomicBatches {
    pub fn new() -> AtomicBatches {
        AtomicBatches {
            batches: HashMap::new(),
            staged_bytes: 0,
        }
    }

    fn drop_batch(&mut self, id: &str, limits: &BatchLimits) {
        self.abandon(id, limits);
    }

    /// Drops a staged batch; true if there was one.
    pub fn abandon(&mut self, id: &str, limits: &BatchLimits) -> bool {
        match self.batches.remove(id) {
            Some(batch) => {
                self.staged_bytes -= batch.bytes;
                limits.server.atomic_inflight.fetch_sub(1, Ordering::AcqRel);
                true
            }
            None => false,
        }
    }

    /// Ids of the batches staged now.
    pub fn staged_ids(&self) -> Vec<String> {
        self.batches.keys().cloned().collect()
    }

    /// Batches idle past the timeout, removed.
    pub fn expire(&mut self, now: Instant, limits: &BatchLimits) -> Vec<String> {
        let expired: Vec<String> = self
            .batches
            .iter()
            .filter(|(_, batch)| now.duration_since(batch.last_activity) >= limits.timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            self.drop_batch(id, limits);
        }
        expired
    }

    /// Takes one message of an atomic batch, following nats-server's order
    /// of checks.
    #[allow(clippy::too_many_arguments)]
    pub fn accept(
        &mut self,
        limits: &BatchLimits,
        control: AtomicHeaders,
        headers: Option<&HeaderMap>,
        record: Record,
        message_id: Option<String>,
        preconditions: Vec<Precondition>,
        now: Instant,
    ) -> AtomicOutcome {
        let refuse = |error: ApiError| AtomicOutcome::Refused {
            error,
            abandoned: None,
        };
        if !limits.allow_atomic {
            return refuse(ApiError::new(400, 10174, "atomic publish is disabled"));
        }
        if control.id.len() > BATCH_ID_LENGTH_MAX || control.id.is_empty() {
            return refuse(ApiError::new(
                400,
                10179,
                "atomic publish batch ID is invalid",
            ));
        }
        let Some(sequence) = control.sequence else {
            return refuse(ApiError::new(
                400,
                10175,
                "atomic publish sequence is missing",
            ));
        };
        let eob = matches!(control.commit, Some(Ok(true)));
        let too_large = |size: u64| size > limits.atomic_messages_max;
        let too_large_error = || {
            ApiError::new(
                400,
                10199,
                format!(
                    "atomic publish batch is too large: {}",
                    limits.atomic_messages_max
                ),
            )
        };
        let id = control.id.clone();
        let abandon = |batches: &mut AtomicBatches, error: ApiError, reason: AbandonReason| {
            batches.drop_batch(&id, limits);
            AtomicOutcome::Refused {
                error,
                abandoned: Some((id.clone(), reason)),
            }
        };
        if !self.batches.contains_key(&control.id) {
            if sequence != 1 {
                // Sequence 0 with `eob` is refused as incomplete too.
                let size = sequence.saturating_sub(u64::from(eob));
                return refuse(if too_large(size) {
                    too_large_error()
                } else {
                    ApiError::new(400, 10176, "atomic publish batch is incomplete")
                });
            }
            if self.batches.len() >= limits.atomic_inflight_max
                || !ServerBatchLimits::acquire(
                    &limits.server.atomic_inflight,
                    limits.server.atomic_inflight_max,
                )
            {
                return refuse(ApiError::new(
                    429,
                    10210,
                    "atomic publish too many inflight",
                ));
            }
            self.batches.insert(
                control.id.clone(),
                StagedBatch {
                    records: Vec::new(),
                    message_ids: HashSet::new(),
                    ids_by_index: Vec::new(),
                    preconditions: Vec::new(),
                    last_sequence: 0,
                    bytes: 0,
                    last_activity: now,
                },
            );
        }
        if matches!(control.commit, Some(Err(()))) {
            self.drop_batch(&id, limits);
            return refuse(ApiError::new(
                400,
                10200,
                "atomic publish batch commit is invalid",
            ));
        }
        if let Err(error) = check_api_level(headers) {
            return abandon(self, error, AbandonReason::Unsupported);
        }
        let batch = self.batches.get_mut(&control.id).expect("inserted above");
        batch.last_activity = now;
        if batch.last_sequence + 1 != sequence || (sequence == 1 && eob) {
            return abandon(
                self,
                ApiError::new(400, 10176, "atomic publish batch is incomplete"),
                AbandonReason::Incomplete,
            );
        }
        batch.last_sequence = sequence;
        if too_large(sequence - u64::from(eob)) {
            return abandon(self, too_large_error(), AbandonReason::Large);
        }
        if preconditions
            .iter()
            .any(|precondition| matches!(precondition, Precondition::ExpectedLastMessageId(_)))
        {
            return abandon(
                self,
                ApiError::new(
                    400,
                    10177,
                    format!(
                        "atomic publish unsupported header used: {HEADER_EXPECTED_LAST_MSG_ID}"
                    ),
                ),
                AbandonReason::Unsupported,
            );
        }
        if let Some(id) = &message_id {
            if !batch.message_ids.insert(id.clone()) {
                return abandon(
                    self,
                    ApiError::new(
                        400,
                        10201,
                        "atomic publish batch contains duplicate message id",
                    ),
                    AbandonReason::Incomplete,
                );
            }
        }
        let index = batch.records.len() as u32;
        if !eob {
            let size = record.encoded_length() as u64;
            if self.staged_bytes + size > limits.atomic_staging_bytes_max {
                return abandon(
                    self,
                    ApiError::new(
                        400,
                        10199,
                        format!(
                            "atomic publish batch is too large: staging it would exceed the stream's {}-byte budget for open atomic batches",
                            limits.atomic_staging_bytes_max
                        ),
                    ),
                    AbandonReason::Large,
                );
            }
            let batch = self.batches.get_mut(&control.id).expect("present");
            batch.bytes += size;
            batch.records.push(record);
            batch.preconditions.extend(
                preconditions
                    .into_iter()
                    .map(|precondition| (index, precondition)),
            );
            if let Some(id) = message_id {
                batch.ids_by_index.push((index, id));
            }
            self.staged_bytes += size;
        }
        if control.commit.is_none() {
            return AtomicOutcome::Staged;
        }
        let mut batch = self.batches.remove(&control.id).expect("present");
        self.staged_bytes -= batch.bytes;
        limits.server.atomic_inflight.fetch_sub(1, Ordering::AcqRel);
        if eob {
            // The stored batch ends with a normal commit marker.
            if let Some(last) = batch.records.last_mut() {
                last.headers = with_commit_header(&last.headers);
            }
        }
        AtomicOutcome::Commit(CommittedBatch {
            id: control.id,
            records: batch.records,
            preconditions: batch.preconditions,
            message_ids: batch.ids_by_index,
        })
    }
}

/// A stored header block with `Nats-Batch-Commit: 1` set.
fn with_commit_header(stored: &bytes::Bytes) -> bytes::Bytes {
    let mut headers = crate::headers::decode(stored);
    headers.insert(HEADER_BATCH_COMMIT, "1");
    crate::headers::encode(Some(&headers))
}

// ----- fast ingest ----------------------------------------------------------

/// Operation of a fast-ingest message (last token before `$FI`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastOperation {
    Start,
    Append,
    Commit,
    CommitEob,
    Ping,
}

/// Control fields of a fast-ingest reply subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FastControl {
    pub id: String,
    pub flow: u16,
    pub gap_ok: bool,
    pub sequence: u64,
    pub operation: FastOperation,
}

/// Parses `<prefix>.<id>.<flow>.<ok|fail>.<seq>.<op>.$FI` from the right.
/// `None`: not a fast-ingest reply; `Some(Err)`: a malformed one.
pub fn parse_fast_reply(reply: &str) -> Option<Result<FastControl, ()>> {
    let body = reply.strip_suffix(".$FI")?;
    Some(parse_fast_body(body).ok_or(()))
}

fn parse_fast_body(body: &str) -> Option<FastControl> {
    let mut tokens = body.rsplitn(6, '.');
    let operation = match tokens.next()?.parse::<u8>().ok()? {
        0 => FastOperation::Start,
        1 => FastOperation::Append,
        2 => FastOperation::Commit,
        3 => FastOperation::CommitEob,
        4 => FastOperation::Ping,
        _ => return None,
    };
    let sequence = tokens
        .next()?
        .parse::<u64>()
        .ok()
        .filter(|sequence| *sequence > 0 && *sequence < u64::MAX)?;
    if sequence == 1 && operation == FastOperation::CommitEob {
        return None;
    }
    if (operation == FastOperation::Start) != (sequence == 1)
        && operation != FastOperation::Commit
        && operation != FastOperation::Ping
    {
        return None;
    }
    let gap_ok = match tokens.next()? {
        "ok" => true,
        "fail" => false,
        _ => return None,
    };
    let flow = match tokens.next()?.parse::<i64>().unwrap_or(0) {
        flow if flow <= 0 => 10,
        flow => flow.min(i64::from(u16::MAX)) as u16,
    };
    let id = tokens.next()?.to_string();
    // At least one token (the inbox prefix) must remain before the id.
    tokens.next()?;
    Some(FastControl {
        id,
        flow,
        gap_ok,
        sequence,
        operation,
    })
}

/// State of one fast-ingest batch, shared by the receiving and ack tasks.
#[derive(Debug)]
pub struct FastBatch {
    pub gap_ok: bool,
    /// The flow the client allows at most.
    pub flow_max: u16,
    /// The flow in force: acks every `flow` messages.
    pub flow: u16,
    /// Highest batch sequence received.
    pub received: u64,
    /// Highest batch sequence durable (everything up to it handled).
    pub persisted: u64,
    /// Batch sequence of the last flow ack sent.
    pub acked: u64,
    /// Stream offset of the last durable message of the batch.
    pub last_offset: u64,
    /// The batch is ending: no more messages are taken.
    pub ending: bool,
    pub last_activity: Instant,
    pub reply: Option<async_nats::Subject>,
}

/// The fast-ingest batches of one stream.
#[derive(Debug)]
pub struct FastBatches {
    pub batches: HashMap<String, FastBatch>,
    /// Messages all fast publishers of the stream may have in flight
    /// together (each keeps at most two flows outstanding). It keeps NATS
    /// from buffering more for natswal than its subscription holds.
    in_flight_max: u64,
}

impl Default for FastBatches {
    fn default() -> FastBatches {
        FastBatches::new(65_536)
    }
}

/// Messages of the fast-ingest control channel.
pub fn flow_ack(sequence: u64, messages: u16) -> bytes::Bytes {
    bytes::Bytes::from(format!(
        "{{\"type\":\"ack\",\"seq\":{sequence},\"msgs\":{messages}}}"
    ))
}

pub fn flow_gap(last_sequence: u64, sequence: u64) -> bytes::Bytes {
    bytes::Bytes::from(format!(
        "{{\"type\":\"gap\",\"last_seq\":{last_sequence},\"seq\":{sequence}}}"
    ))
}

pub fn flow_error(sequence: u64, error: &ApiError) -> bytes::Bytes {
    let error_json = crate::ack::error_ack(error);
    // error_ack is {"error":{...}}: reuse its inner object.
    let inner = &error_json[9..error_json.len() - 1];
    let mut out = format!("{{\"type\":\"err\",\"seq\":{sequence},\"error\":").into_bytes();
    out.extend_from_slice(inner);
    out.push(b'}');
    bytes::Bytes::from(out)
}

impl FastBatches {
    pub fn new(in_flight_max: u64) -> FastBatches {
        FastBatches {
            batches: HashMap::new(),
            in_flight_max: in_flight_max.max(2),
        }
    }

    /// The flow a new batch starts with: what the client allows up to 500
    /// when it is alone, else 1 (it ramps up as acks go out).
    pub fn initial_flow(&self, flow_max: u16) -> u16 {
        if self.batches.len() > 1 {
            1
        } else {
            flow_max.min(500)
        }
    }

    /// After `persisted` moved: whether a flow ack is due, adapting the flow
    /// to the number of concurrent fast publishers. Acks wait for
    /// durability (a sync, milliseconds), so each publisher gets as large a
    /// window as its client allows while the total stays within
    /// `in_flight_max`: a smaller one would leave the disk idle between
    /// acks.
    pub fn flow_ack_due(&mut self, id: &str) -> Option<bytes::Bytes> {
        let publishers = self.batches.len().max(1);
        let batch = self.batches.get_mut(id)?;
        let flow = u64::from(batch.flow.max(1));
        if batch.persisted < batch.acked + flow {
            return None;
        }
        let steps = (batch.persisted - batch.acked) / flow;
        batch.acked += steps * flow;
        let share = self.in_flight_max / (2 * publishers as u64);
        let allowed = share.clamp(1, u64::from(batch.flow_max.max(1))) as u16;
        if batch.flow < allowed {
            batch.flow = (batch.flow.saturating_mul(2)).min(allowed);
        } else if batch.flow > allowed {
            batch.flow = (batch.flow / 2).max(allowed);
        }
        Some(flow_ack(batch.acked, batch.flow))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_reply_subjects_parse_from_the_right() {
        let parsed = parse_fast_reply("_INBOX.abc.500.ok.1.0.$FI")
            .unwrap()
            .unwrap();
        assert_eq!(
            parsed,
            FastControl {
                id: "abc".to_string(),
                flow: 500,
                gap_ok: true,
                sequence: 1,
                operation: FastOperation::Start
            }
        );
        let commit = parse_fast_reply("a.b.c.id7.10.fail.42.2.$FI")
            .unwrap()
            .unwrap();
        assert_eq!(
            (commit.id.as_str(), commit.sequence, commit.gap_ok),
            ("id7", 42, false)
        );
        assert_eq!(commit.operation, FastOperation::Commit);
        assert!(parse_fast_reply("_INBOX.abc").is_none(), "not fast ingest");
        for bad in [
            "_INBOX.abc.10.maybe.1.0.$FI",
            "_INBOX.abc.10.ok.0.1.$FI",
            "_INBOX.abc.10.ok.1.3.$FI",
            "_INBOX.abc.10.ok.2.0.$FI",
            "_INBOX.abc.10.ok.1.1.$FI",
            "_INBOX.abc.10.ok.1.9.$FI",
            "abc.10.ok.1.0.$FI",
        ] {
            assert_eq!(parse_fast_reply(bad), Some(Err(())), "{bad}");
        }
        assert_eq!(
            parse_fast_reply("_INBOX.abc.0.ok.1.0.$FI")
                .unwrap()
                .unwrap()
                .flow,
            10
        );
    }

    #[test]
    fn flow_messages_have_the_documented_shape() {
        assert_eq!(
            &flow_ack(10, 15)[..],
            br#"{"type":"ack","seq":10,"msgs":15}"#
        );
        assert_eq!(
            &flow_gap(10, 15)[..],
            br#"{"type":"gap","last_seq":10,"seq":15}"#
        );
        let error: serde_json::Value = serde_json::from_slice(&flow_error(
            10,
            &ApiError::new(400, 10071, "wrong last sequence: 1"),
        ))
        .unwrap();
        assert_eq!(
            error,
            serde_json::json!({"type":"err","seq":10,"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 1"}})
        );
    }

    #[test]
    fn unknown_preconditions_are_refused_never_ignored() {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Expected-Last-Subject-Sequence", "5");
        let error = preconditions(Some(&headers), "s").unwrap_err();
        assert_eq!(error.code, 400);
        assert!(error
            .description
            .contains("Nats-Expected-Last-Subject-Sequence"));
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Expected-Stream", "other");
        assert_eq!(
            preconditions(Some(&headers), "s").unwrap_err().err_code,
            10060
        );
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Expected-Last-Sequence", "7");
        headers.insert("Nats-Expected-Stream", "s");
        assert_eq!(
            preconditions(Some(&headers), "s").unwrap(),
            vec![Precondition::ExpectedLastOffset(7)]
        );
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Required-Api-Level", "5");
        assert_eq!(check_api_level(Some(&headers)).unwrap_err().err_code, 10185);
        headers.insert("Nats-Required-Api-Level", "4");
        assert!(check_api_level(Some(&headers)).is_ok());
    }
}
