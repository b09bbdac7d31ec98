//! The JSON of the JetStream API that natswal answers with: each response
//! is `{"type": "io.nats.jetstream.api.v1.<kind>", ...}` with either its
//! fields or `"error"`, never both (no `"error": null` on success).
//! Field names and units are JetStream's (durations in nanoseconds, times
//! in RFC 3339), so JetStream clients parse them unchanged. These are
//! network formats; nothing here is written to disk.

use super::errors::JsError;
use crate::config::StreamSection;
use crate::time::{format_rfc3339, ZERO_TIME};
use natswal::StreamStatus;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The JetStream API level natswal implements: the 2.10 core (level 0);
/// a request that needs a higher one (`Nats-Required-Api-Level`) gets
/// 412, as from an older server.
pub const API_LEVEL: u32 = 0;

/// Most names in one `STREAM.NAMES` page (JetStream's limit).
pub const NAMES_PAGE_MAX: usize = 1024;
/// Most stream infos in one `STREAM.LIST` page (JetStream's limit).
pub const LIST_PAGE_MAX: usize = 256;

/// A response: its type, then its body's fields.
#[derive(Serialize)]
pub struct Response<'a, T: Serialize> {
    #[serde(rename = "type")]
    pub kind: &'a str,
    #[serde(flatten)]
    pub body: T,
}

/// The body of an error response.
#[derive(Serialize)]
pub struct ErrorBody {
    pub error: JsError,
}

/// The response type of each request kind.
pub fn response_type(kind: &str) -> String {
    format!("io.nats.jetstream.api.v1.{kind}_response")
}

#[derive(Serialize)]
pub struct Limits {
    pub max_memory: i64,
    pub max_storage: i64,
    pub max_streams: i64,
    pub max_consumers: i64,
    pub max_ack_pending: i64,
    pub memory_max_stream_bytes: i64,
    pub storage_max_stream_bytes: i64,
    pub max_bytes_required: bool,
}

impl Limits {
    /// natswal sets no account limits of its own (its limits are per
    /// stream, in its configuration).
    pub fn none() -> Limits {
        Limits {
            max_memory: -1,
            max_storage: -1,
            max_streams: -1,
            max_consumers: -1,
            max_ack_pending: -1,
            memory_max_stream_bytes: -1,
            storage_max_stream_bytes: -1,
            max_bytes_required: false,
        }
    }
}

#[derive(Serialize)]
pub struct ApiStats {
    pub level: u32,
    pub total: u64,
    pub errors: u64,
}

/// `$JS.API.INFO`.
#[derive(Serialize)]
pub struct AccountInfo {
    pub memory: u64,
    pub storage: u64,
    pub reserved_memory: u64,
    pub reserved_storage: u64,
    pub streams: usize,
    pub consumers: usize,
    pub limits: Limits,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    pub api: ApiStats,
}

#[derive(Serialize)]
pub struct StreamConfigJson {
    pub name: String,
    pub subjects: Vec<String>,
    pub retention: &'static str,
    pub max_consumers: i64,
    pub max_msgs: i64,
    pub max_bytes: i64,
    /// Nanoseconds; 0 is unlimited.
    pub max_age: i64,
    pub max_msgs_per_subject: i64,
    pub max_msg_size: i64,
    pub discard: &'static str,
    pub storage: &'static str,
    pub num_replicas: u32,
    /// Nanoseconds.
    pub duplicate_window: i64,
    /// JetStream knows `none` and `s2` only; natswal's zstd shows in the
    /// metadata.
    pub compression: &'static str,
    pub allow_direct: bool,
    pub mirror_direct: bool,
    pub sealed: bool,
    pub deny_delete: bool,
    pub deny_purge: bool,
    pub allow_rollup_hdrs: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_atomic: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub allow_batched: bool,
    pub metadata: BTreeMap<String, String>,
}

fn saturating_nanoseconds(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

fn limit(value: Option<u64>) -> i64 {
    value.map_or(-1, |value| i64::try_from(value).unwrap_or(i64::MAX))
}

impl StreamConfigJson {
    /// A natswal stream's configuration in JetStream's terms: limits
    /// retention, old messages discarded, file storage, one replica,
    /// deletes and purges denied (retention is natswal's).
    pub fn of(section: &StreamSection) -> StreamConfigJson {
        let metadata = BTreeMap::from([
            (
                "natswal.durability".to_string(),
                section.durability_name().to_string(),
            ),
            (
                "natswal.compression".to_string(),
                section.compression.clone(),
            ),
        ]);
        StreamConfigJson {
            name: section.name.clone(),
            subjects: section.subjects.clone(),
            retention: "limits",
            max_consumers: -1,
            max_msgs: limit(section.max_messages),
            max_bytes: limit(section.max_bytes),
            max_age: section.max_age.map_or(0, saturating_nanoseconds),
            max_msgs_per_subject: -1,
            max_msg_size: i64::try_from(section.max_message_bytes)
                .unwrap_or(i64::MAX)
                .min(i64::from(i32::MAX)),
            discard: "old",
            storage: "file",
            num_replicas: 1,
            duplicate_window: saturating_nanoseconds(section.duplicate_window),
            compression: "none",
            allow_direct: true,
            mirror_direct: false,
            sealed: false,
            deny_delete: true,
            deny_purge: true,
            allow_rollup_hdrs: false,
            allow_atomic: section.allow_atomic,
            allow_batched: section.allow_batched,
            metadata,
        }
    }
}

#[derive(Serialize)]
pub struct StreamStateJson {
    pub messages: u64,
    pub bytes: u64,
    pub first_seq: u64,
    pub first_ts: String,
    pub last_seq: u64,
    pub last_ts: String,
    #[serde(skip_serializing_if = "is_zero")]
    pub num_deleted: u64,
    pub consumer_count: usize,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl StreamStateJson {
    /// natswal's offsets are JetStream's sequences (both start at 1). A
    /// stream never written has first and last sequence 0, as in
    /// JetStream; one emptied by retention has `first = last + 1`.
    pub fn of(status: &StreamStatus) -> StreamStateJson {
        let last_seq = status.next_offset.saturating_sub(1);
        let first_seq = if status.records == 0 && last_seq == 0 {
            0
        } else {
            status.first_offset
        };
        let span = (last_seq + 1).saturating_sub(first_seq);
        let time = |nanoseconds: Option<i64>| {
            nanoseconds.map_or_else(|| ZERO_TIME.to_string(), format_rfc3339)
        };
        StreamStateJson {
            messages: status.records,
            bytes: status.bytes,
            first_seq,
            first_ts: time(status.first_timestamp_ns),
            last_seq,
            last_ts: time(status.last_timestamp_ns),
            num_deleted: span.saturating_sub(status.records),
            consumer_count: 0,
        }
    }
}

#[derive(Serialize)]
pub struct StreamInfoJson {
    pub config: StreamConfigJson,
    pub created: String,
    pub state: StreamStateJson,
    pub ts: String,
}

/// Paging of names and lists.
#[derive(Serialize)]
pub struct Paged {
    pub total: usize,
    pub offset: usize,
    pub limit: usize,
}

/// `STREAM.INFO.<stream>`: an info with paging fields (of its subject
/// list, which natswal does not page: always 0).
#[derive(Serialize)]
pub struct StreamInfoResponse {
    #[serde(flatten)]
    pub paged: Paged,
    #[serde(flatten)]
    pub info: StreamInfoJson,
}

#[derive(Serialize)]
pub struct StreamNames {
    #[serde(flatten)]
    pub paged: Paged,
    pub streams: Vec<String>,
}

#[derive(Serialize)]
pub struct StreamList {
    #[serde(flatten)]
    pub paged: Paged,
    pub streams: Vec<StreamInfoJson>,
}

/// The request of `STREAM.NAMES` and `STREAM.LIST`.
#[derive(Deserialize, Default)]
pub struct PagedRequest {
    #[serde(default)]
    pub offset: usize,
    /// Only streams whose subjects overlap this one.
    #[serde(default)]
    pub subject: Option<String>,
}

/// The request of `STREAM.INFO.<stream>`.
#[derive(Deserialize, Default)]
pub struct StreamInfoRequest {
    #[serde(default)]
    pub deleted_details: bool,
    #[serde(default)]
    pub subjects_filter: Option<String>,
    #[serde(default)]
    pub offset: usize,
}

/// The request of `STREAM.MSG.GET.<stream>` and `DIRECT.GET.<stream>`.
#[derive(Deserialize, Default, Debug)]
pub struct MessageGetRequest {
    #[serde(default)]
    pub seq: u64,
    #[serde(default)]
    pub last_by_subj: Option<String>,
    #[serde(default)]
    pub next_by_subj: Option<String>,
    #[serde(default)]
    pub batch: Option<u64>,
    #[serde(default)]
    pub start_time: Option<String>,
    #[serde(default)]
    pub multi_last: Option<Vec<String>>,
    #[serde(default)]
    pub up_to_seq: Option<u64>,
    #[serde(default)]
    pub up_to_time: Option<String>,
}

/// A stored message in `STREAM.MSG.GET`'s response.
#[derive(Serialize)]
pub struct StoredMessageJson {
    pub subject: String,
    pub seq: u64,
    /// The stored header block, base64.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub hdrs: String,
    /// The payload, base64.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub data: String,
    pub time: String,
}

#[derive(Serialize)]
pub struct MessageGetResponse {
    pub message: StoredMessageJson,
}
