//! The replay protocol (docs/PROTOCOL.md): request JSON, status codes and
//! header names, shared by the server and the `natswal replay` client.

use serde::{Deserialize, Serialize};

/// Original subject of a replayed record.
pub const HEADER_SUBJECT: &str = "Nwal-Subject";
/// Offset of a replayed record.
pub const HEADER_OFFSET: &str = "Nwal-Offset";
/// Timestamp (Unix nanoseconds) of a replayed record.
pub const HEADER_TIMESTAMP: &str = "Nwal-Timestamp";
/// Stream of a replayed record or a status.
pub const HEADER_STREAM: &str = "Nwal-Stream";
/// Present only on status messages: the status code.
pub const HEADER_STATUS: &str = "Nwal-Status";
/// Human-readable status description.
pub const HEADER_DESCRIPTION: &str = "Nwal-Description";
/// Where the next request should start (`{"start":{"offset":N}}`).
pub const HEADER_NEXT_OFFSET: &str = "Nwal-Next-Offset";
/// Records delivered by this response.
pub const HEADER_COUNT: &str = "Nwal-Count";
/// Body format of a batched message.
pub const HEADER_FORMAT: &str = "Nwal-Format";
/// Value of [`HEADER_FORMAT`] for batched messages.
pub const FORMAT_RECORDS_V1: &str = "records-v1";
/// Value of [`HEADER_FORMAT`] for one stored frame (docs/FORMAT.md 2.2).
pub const FORMAT_FRAME_V1: &str = "frame-v1";
/// Largest plain body a client decodes from one frame message (frames are
/// at most a segment; this bounds what untrusted bytes can make it allocate).
pub const FRAME_PLAIN_BYTES_MAX: usize = 256 << 20;

/// More records may follow: ask again from `Nwal-Next-Offset`.
pub const STATUS_MORE: u16 = 100;
/// The end bound or the limit was reached: the replay is complete.
pub const STATUS_END_OF_RANGE: u16 = 204;
/// Caught up with the stream (and `wait` passed): ask again later.
pub const STATUS_NO_MESSAGES: u16 = 404;
pub const STATUS_BAD_REQUEST: u16 = 400;
pub const STATUS_FORBIDDEN: u16 = 403;
pub const STATUS_STREAM_NOT_FOUND: u16 = 410;
/// A record does not fit the server's max_payload with replay's headers.
pub const STATUS_TOO_LARGE: u16 = 413;
pub const STATUS_STORAGE_ERROR: u16 = 500;
/// `api.replays_max` replays are running: retry later.
pub const STATUS_TOO_MANY_REPLAYS: u16 = 503;
/// A replicated stream cannot serve the request now: no leader answered a
/// linearizable read.
pub const STATUS_UNAVAILABLE: u16 = 503;

/// Largest `batch` a request may ask for, one message per record.
pub const BATCH_MAX: u64 = 65_536;
/// Largest `batch` in batched mode (records travel many per message).
pub const BATCH_MAX_BATCHED: u64 = 1 << 20;
/// `batch` when the request does not say.
pub const BATCH_DEFAULT: u64 = 256;

/// Where a replay starts: `"earliest"`, `"latest"`, `{"offset":N}` or
/// `{"time":T}`, exactly one of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Start {
    #[default]
    Earliest,
    Latest,
    #[serde(untagged)]
    Offset {
        offset: u64,
    },
    #[serde(untagged)]
    Time {
        time: TimeValue,
    },
}

/// Where a replay ends (inclusive): `{"offset":N}` (at least
/// [`natswal::FIRST_OFFSET`]) or `{"time":T}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum End {
    Offset { offset: u64 },
    Time { time: TimeValue },
}

/// RFC 3339 text or Unix nanoseconds; both saturate to `i64` nanoseconds
/// (crate::time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum TimeValue {
    Nanoseconds(i64),
    Text(String),
}

impl TimeValue {
    pub fn nanoseconds(&self) -> Result<i64, String> {
        match self {
            TimeValue::Nanoseconds(value) => Ok(*value),
            TimeValue::Text(text) => crate::time::parse_time(text),
        }
    }

    fn from_json(value: &serde_json::Value) -> Result<TimeValue, String> {
        match value {
            serde_json::Value::String(text) => {
                // Checked here, so a bad time is refused with the request.
                crate::time::parse_time(text)?;
                Ok(TimeValue::Text(text.clone()))
            }
            serde_json::Value::Number(number) => {
                if let Some(value) = number.as_i64() {
                    Ok(TimeValue::Nanoseconds(value))
                } else if number.as_u64().is_some() {
                    // Past i64::MAX: saturated like text past 2262.
                    Ok(TimeValue::Nanoseconds(i64::MAX))
                } else {
                    Err(format!(
                        "time {number} is not an integer of Unix nanoseconds"
                    ))
                }
            }
            other => Err(format!(
                "time must be RFC 3339 text or Unix nanoseconds, not {other}"
            )),
        }
    }
}

/// The one key of a `{"offset":N}` or `{"time":T}` object, or why not.
fn position_object<'a>(
    what: &str,
    value: &'a serde_json::Value,
) -> Result<(&'a str, &'a serde_json::Value), String> {
    let object = value
        .as_object()
        .ok_or_else(|| format!("{what} must be {{\"offset\":N}} or {{\"time\":T}}, not {value}"))?;
    let mut entries = object.iter();
    match (entries.next(), entries.next()) {
        (Some((key, inner)), None) if key == "offset" || key == "time" => Ok((key, inner)),
        (Some(_), Some(_)) => Err(format!(
            "{what} gives {}; give exactly one of offset or time",
            object.keys().cloned().collect::<Vec<_>>().join(" and ")
        )),
        _ => Err(format!(
            "{what} must be {{\"offset\":N}} or {{\"time\":T}}, not {value}"
        )),
    }
}

fn offset_of(what: &str, value: &serde_json::Value) -> Result<u64, String> {
    value
        .as_u64()
        .ok_or_else(|| format!("{what}.offset must be an integer from 0, not {value}"))
}

impl Start {
    fn from_json(value: &serde_json::Value) -> Result<Start, String> {
        match value.as_str() {
            Some("earliest") => return Ok(Start::Earliest),
            Some("latest") => return Ok(Start::Latest),
            Some(other) => {
                return Err(format!(
                    "start '{other}' is not \"earliest\", \"latest\", {{\"offset\":N}} or {{\"time\":T}}"
                ))
            }
            None => {}
        }
        match position_object("start", value)? {
            ("offset", offset) => Ok(Start::Offset {
                offset: offset_of("start", offset)?,
            }),
            (_, time) => Ok(Start::Time {
                time: TimeValue::from_json(time).map_err(|reason| format!("start: {reason}"))?,
            }),
        }
    }
}

impl End {
    fn from_json(value: &serde_json::Value) -> Result<End, String> {
        match position_object("end", value)? {
            ("offset", offset) => {
                let offset = offset_of("end", offset)?;
                if offset < natswal::FIRST_OFFSET {
                    return Err(format!(
                        "end offset {offset} is before the first offset {} (the end is inclusive)",
                        natswal::FIRST_OFFSET
                    ));
                }
                Ok(End::Offset { offset })
            }
            (_, time) => Ok(End::Time {
                time: TimeValue::from_json(time).map_err(|reason| format!("end: {reason}"))?,
            }),
        }
    }
}

/// Deserializes through a JSON value, so each position gets a message that
/// names what is wrong (serde's untagged enums only say "did not match").
macro_rules! deserialize_from_json {
    ($type:ty) => {
        impl<'de> Deserialize<'de> for $type {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let value = serde_json::Value::deserialize(deserializer)?;
                <$type>::from_json(&value).map_err(serde::de::Error::custom)
            }
        }
    };
}

deserialize_from_json!(Start);
deserialize_from_json!(End);
deserialize_from_json!(TimeValue);

/// How records travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One NATS message per record, original subject and headers in headers.
    #[default]
    Messages,
    /// One NATS message per record, its metadata in the reply subject
    /// (`$NWAL.R.<offset>.<timestamp ns>.<subject>`) and only its own
    /// headers: what a JetStream delivery costs a client to read.
    Light,
    /// Many records per NATS message, in the records-v1 binary layout.
    Batched,
    /// Stored frames as they are on disk (decrypted, still compressed):
    /// nothing is re-encoded on the server.
    Frames,
}

/// A replay request (the body of `<prefix>.REPLAY.<stream>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// NATS subject pattern; only matching records are sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    #[serde(default)]
    pub start: Start,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<End>,
    /// Records still wanted in total; the response ends with 204 when reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Records this response may carry (pull size, flow control).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<u64>,
    /// Bytes this response may carry (approximate; at least one record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    /// If nothing is available, wait this long for new records (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_ms: Option<u64>,
    #[serde(default)]
    pub mode: Mode,
    /// On a replicated stream: first wait until the serving replica has
    /// applied everything its leader had committed when the request
    /// arrived, so the replay sees every acknowledged record (a read
    /// linearizable with the leader). Reads are of committed records
    /// either way.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub linearizable: bool,
}

/// One record decoded from a records-v1 batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchedRecord {
    pub offset: u64,
    pub timestamp_ns: i64,
    pub subject: bytes::Bytes,
    pub headers: bytes::Bytes,
    pub payload: bytes::Bytes,
}

/// Fixed bytes per records-v1 entry before the subject.
pub const BATCH_ENTRY_OVERHEAD: usize = 26;

/// Appends one records-v1 entry: `u32 entry_length` (bytes after it),
/// `u64 offset`, `i64 timestamp_ns`, `u16 subject_length`,
/// `u32 headers_length`, subject, headers, payload; little-endian.
pub fn encode_batched(
    out: &mut bytes::BytesMut,
    offset: u64,
    timestamp_ns: i64,
    subject: &[u8],
    headers: &[u8],
    payload: &[u8],
) {
    use bytes::BufMut;
    let entry_length =
        (BATCH_ENTRY_OVERHEAD - 4 + subject.len() + headers.len() + payload.len()) as u32;
    out.put_u32_le(entry_length);
    out.put_u64_le(offset);
    out.put_i64_le(timestamp_ns);
    out.put_u16_le(subject.len() as u16);
    out.put_u32_le(headers.len() as u32);
    out.put_slice(subject);
    out.put_slice(headers);
    out.put_slice(payload);
}

/// Decodes a frame-v1 body (one stored frame); errors on any
/// inconsistency, including a checksum mismatch.
pub fn decode_frame_message(body: &[u8]) -> Result<Vec<BatchedRecord>, String> {
    let records = natswal::decode_frame_bytes(body, FRAME_PLAIN_BYTES_MAX)?;
    Ok(records
        .into_iter()
        .map(|record| BatchedRecord {
            offset: record.offset,
            timestamp_ns: record.timestamp_ns,
            subject: record.subject,
            headers: record.headers,
            payload: record.payload,
        })
        .collect())
}

/// Decodes a records-v1 body; errors on any inconsistency.
pub fn decode_batched(body: &bytes::Bytes) -> Result<Vec<BatchedRecord>, String> {
    let mut records = Vec::new();
    let mut position = 0usize;
    while position < body.len() {
        let rest = &body[position..];
        if rest.len() < BATCH_ENTRY_OVERHEAD {
            return Err(format!("truncated entry at byte {position}"));
        }
        let entry_length = u32::from_le_bytes(rest[0..4].try_into().expect("4 bytes")) as usize;
        let offset = u64::from_le_bytes(rest[4..12].try_into().expect("8 bytes"));
        let timestamp_ns = i64::from_le_bytes(rest[12..20].try_into().expect("8 bytes"));
        let subject_length = u16::from_le_bytes(rest[20..22].try_into().expect("2 bytes")) as usize;
        let headers_length = u32::from_le_bytes(rest[22..26].try_into().expect("4 bytes")) as usize;
        let end = position + 4 + entry_length;
        let payload_start = position + BATCH_ENTRY_OVERHEAD + subject_length + headers_length;
        if end > body.len() || payload_start > end {
            return Err(format!("entry at byte {position} has inconsistent lengths"));
        }
        let subject_start = position + BATCH_ENTRY_OVERHEAD;
        records.push(BatchedRecord {
            offset,
            timestamp_ns,
            subject: body.slice(subject_start..subject_start + subject_length),
            headers: body.slice(subject_start + subject_length..payload_start),
            payload: body.slice(payload_start..end),
        });
        position = end;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_in_every_documented_form() {
        let parse = |text: &str| serde_json::from_str::<ReplayRequest>(text).unwrap();
        assert_eq!(parse("{}").start, Start::Earliest);
        assert_eq!(parse(r#"{"start":"latest"}"#).start, Start::Latest);
        assert_eq!(
            parse(r#"{"start":{"offset":5}}"#).start,
            Start::Offset { offset: 5 }
        );
        assert_eq!(
            parse(r#"{"start":{"time":"2026-11-24T10:00:00Z"}}"#).start,
            Start::Time {
                time: TimeValue::Text("2026-11-24T10:00:00Z".to_string())
            }
        );
        let full = parse(
            r#"{"filter":"a.*","end":{"offset":9},"limit":3,"batch":2,"mode":"batched","wait_ms":10}"#,
        );
        assert_eq!(full.end, Some(End::Offset { offset: 9 }));
        assert_eq!(full.mode, Mode::Batched);
        assert!(serde_json::from_str::<ReplayRequest>(r#"{"strat":"earliest"}"#).is_err());
    }

    #[test]
    fn ambiguous_or_out_of_range_positions_are_refused_by_name() {
        let refused = |text: &str| {
            serde_json::from_str::<ReplayRequest>(text)
                .unwrap_err()
                .to_string()
        };
        assert!(
            refused(r#"{"start":{"offset":5,"time":1}}"#).contains("exactly one of offset or time")
        );
        assert!(refused(r#"{"end":{"offset":0}}"#).contains("before the first offset"));
        assert!(refused(r#"{"start":{"time":1.5}}"#).contains("not an integer"));
        assert!(refused(r#"{"start":"first"}"#).contains("'first'"));
        assert!(refused(r#"{"end":{"time":"2026-02-30T00:00:00Z"}}"#).contains("day 30"));
        let parse = |text: &str| serde_json::from_str::<ReplayRequest>(text).unwrap();
        let time = |start: Start| match start {
            Start::Time { time } => time.nanoseconds().unwrap(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            time(parse(r#"{"start":{"time":18446744073709551615}}"#).start),
            i64::MAX
        );
        assert_eq!(
            time(parse(r#"{"start":{"time":"1900-01-01T00:00:00Z"}}"#).start),
            -2_208_988_800_000_000_000
        );
        let request = parse(r#"{"start":{"time":5},"end":{"offset":3}}"#);
        let json = serde_json::to_string(&request).unwrap();
        assert_eq!(parse(&json), request, "what the client sends parses back");
    }

    #[test]
    fn batched_round_trip() {
        let mut out = bytes::BytesMut::new();
        encode_batched(
            &mut out,
            7,
            99,
            b"a.b",
            b"NATS/1.0\r\nX: y\r\n\r\n",
            b"payload",
        );
        encode_batched(&mut out, 9, 100, b"c", b"", b"");
        let records = decode_batched(&out.freeze()).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].offset, 7);
        assert_eq!(&records[0].payload[..], b"payload");
        assert_eq!(&records[1].subject[..], b"c");
    }
}
