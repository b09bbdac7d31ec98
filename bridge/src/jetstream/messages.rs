//! Messages by sequence: `STREAM.MSG.GET.<stream>` (a JSON response with
//! the message in base64) and `DIRECT.GET.<stream>` (the message itself,
//! its metadata in `Nats-Stream`, `Nats-Subject`, `Nats-Sequence` and
//! `Nats-Time-Stamp` headers, or a status-only reply such as
//! `404 Message Not Found`).
//!
//! A get names a sequence (`seq`: that record exactly), the first record
//! at or after a sequence whose subject matches `next_by_subj`, or the
//! first record at or after `start_time`. `last_by_subj` needs a
//! per-subject index, which natswal does not keep: it is refused, saying
//! so, as are the batch forms (API level 1).

use super::errors::JsError;
use super::json::{MessageGetRequest, MessageGetResponse, StoredMessageJson};
use super::{JetStreamService, Request};
use natswal::{StartPosition, StoredRecord, SubjectPattern};
use std::sync::Arc;

/// Why a get cannot be served, in the two shapes the two APIs reply in.
struct Refusal {
    error: JsError,
    /// The status line of a direct get's reply (`404 Message Not Found`).
    status: String,
}

impl Refusal {
    fn new(error: JsError, status: &str) -> Refusal {
        Refusal {
            error,
            status: status.to_string(),
        }
    }

    fn no_message() -> Refusal {
        Refusal::new(JsError::no_message(), "404 Message Not Found")
    }

    fn unsupported(what: &str) -> Refusal {
        Refusal::new(
            JsError::bad_request(&format!(
                "{what} needs a per-subject index, which natswal does not keep; get by seq, next_by_subj or start_time"
            )),
            "400 Last By Subject Not Supported",
        )
    }
}

/// What to read: where to start and which subjects count.
struct Lookup {
    start: StartPosition,
    filter: Option<SubjectPattern>,
    /// The record must have exactly this sequence.
    exact: Option<u64>,
}

fn lookup(request: &MessageGetRequest) -> Result<Lookup, Refusal> {
    let bad = |reason: &str| Refusal::new(JsError::bad_request(reason), "408 Bad Request");
    if request
        .last_by_subj
        .as_deref()
        .is_some_and(|subject| !subject.is_empty())
    {
        return Err(Refusal::unsupported("last_by_subj"));
    }
    if request
        .multi_last
        .as_ref()
        .is_some_and(|subjects| !subjects.is_empty())
    {
        return Err(Refusal::unsupported("multi_last"));
    }
    if request.batch.is_some_and(|batch| batch > 1)
        || request.up_to_seq.is_some()
        || request.up_to_time.is_some()
    {
        return Err(bad(
            "batch gets (batch, up_to_seq, up_to_time) are JetStream API level 1, which natswal does not serve",
        ));
    }
    let filter = match request
        .next_by_subj
        .as_deref()
        .filter(|subject| !subject.is_empty())
    {
        Some(subject) => Some(
            SubjectPattern::parse(subject)
                .map_err(|error| bad(&format!("next_by_subj: {error}")))?,
        ),
        None => None,
    };
    let start_time = match request.start_time.as_deref() {
        Some(text) => Some(crate::time::parse_time(text).map_err(|reason| bad(&reason))?),
        None => None,
    };
    match (request.seq, start_time) {
        (0, None) if filter.is_none() => Err(Refusal::new(
            JsError::bad_request("a get names seq, next_by_subj or start_time"),
            "408 Empty Request",
        )),
        (sequence, Some(_)) if sequence > 0 => Err(bad("seq and start_time exclude each other")),
        (_, Some(time)) => Ok(Lookup {
            start: StartPosition::Time(time),
            filter,
            exact: None,
        }),
        (sequence, None) => Ok(Lookup {
            start: StartPosition::Offset(sequence.max(natswal::stream::FIRST_OFFSET)),
            exact: filter.is_none().then_some(sequence),
            filter,
        }),
    }
}

/// Reads the record a get asks for, checking the requester may see it.
async fn find(
    service: &JetStreamService,
    request: &Request,
    stream_name: &str,
    asked: &MessageGetRequest,
) -> Result<StoredRecord, Refusal> {
    let forbidden = |error: JsError| {
        let status = format!("403 {}", error.description.replace(['\r', '\n'], " "));
        Refusal { error, status }
    };
    let (stream, _) = service
        .stream(stream_name)
        .map_err(|error| Refusal::new(error, "404 Stream Not Found"))?;
    let lookup = lookup(asked)?;
    if let Some(filter) = &lookup.filter {
        service
            .may_read(request, std::slice::from_ref(filter))
            .map_err(forbidden)?;
    }
    let stream = Arc::clone(stream);
    let (start, filter) = (lookup.start, lookup.filter.clone());
    let read = tokio::task::spawn_blocking(move || stream.reader(start, filter)?.next()).await;
    let invalid = |reason: String| {
        let status = format!(
            "500 Stream Not Valid: {}",
            reason.replace(['\r', '\n'], " ")
        );
        Refusal::new(JsError::stream_invalid(&reason), &status)
    };
    let record = match read {
        Ok(Ok(Some(record))) => record,
        Ok(Ok(None)) => return Err(Refusal::no_message()),
        Ok(Err(error)) => return Err(invalid(error.to_string())),
        Err(error) => return Err(invalid(format!("the read stopped: {error}"))),
    };
    if lookup
        .exact
        .is_some_and(|sequence| sequence != record.offset)
    {
        return Err(Refusal::no_message());
    }
    // A literal subject is a pattern matching just itself: the rules see
    // the record as a replay of exactly its subject.
    let subject = String::from_utf8_lossy(&record.subject).into_owned();
    if let Ok(literal) = SubjectPattern::parse(&subject) {
        service
            .may_read(request, std::slice::from_ref(&literal))
            .map_err(forbidden)?;
    }
    Ok(record)
}

/// `STREAM.MSG.GET.<stream>`.
pub(super) async fn message_get(service: &JetStreamService, request: &Request, stream: &str) {
    let result = match request.parse::<MessageGetRequest>() {
        Ok(asked) => find(service, request, stream, &asked)
            .await
            .map_err(|refusal| refusal.error),
        Err(error) => Err(error),
    };
    let result = result.map(|record| {
        let encode = |bytes: &[u8]| data_encoding::BASE64.encode(bytes);
        MessageGetResponse {
            message: StoredMessageJson {
                subject: String::from_utf8_lossy(&record.subject).into_owned(),
                seq: record.offset,
                hdrs: encode(&record.headers),
                data: encode(&record.payload),
                time: crate::time::format_rfc3339(record.timestamp_ns),
            },
        }
    });
    service.respond(request, "stream_msg_get", result).await;
}

/// `DIRECT.GET.<stream>` (and `DIRECT.GET.<stream>.<subject>`, a last by
/// subject, refused).
pub(super) async fn direct_get(service: &JetStreamService, request: &Request) {
    let rest = &request.operation["DIRECT.GET.".len()..];
    let (stream, subject) = match rest.split_once('.') {
        Some((stream, subject)) => (stream, Some(subject)),
        None => (rest, None),
    };
    let status = |line: &str| format!("NATS/1.0 {line}\r\n\r\n").into_bytes();
    let outcome = if request.needs_higher_level() {
        Err(status("412 Required Api Level"))
    } else if subject.is_some() {
        Err(status(&Refusal::unsupported("last_by_subj").status))
    } else if request.payload.iter().all(u8::is_ascii_whitespace) {
        Err(status("408 Empty Request"))
    } else {
        match serde_json::from_slice::<MessageGetRequest>(&request.payload) {
            Err(_) => Err(status("408 Malformed Request")),
            Ok(asked) => find(service, request, stream, &asked)
                .await
                .map_err(|refusal| status(&refusal.status)),
        }
    };
    match outcome {
        Ok(record) => {
            let sequence = record.offset.to_string();
            let time = crate::time::format_rfc3339(record.timestamp_ns);
            let subject = String::from_utf8_lossy(&record.subject).into_owned();
            let headers = crate::headers::replay_block(
                &record.headers,
                &[
                    ("Nats-Stream", stream),
                    ("Nats-Subject", &subject),
                    ("Nats-Sequence", &sequence),
                    ("Nats-Time-Stamp", &time),
                ],
            );
            service
                .send(&request.reply, &headers, &record.payload)
                .await;
        }
        Err(headers) => {
            service
                .counters
                .errors
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            service.send(&request.reply, &headers, &[]).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(json: &str) -> MessageGetRequest {
        serde_json::from_str(json).expect("request")
    }

    #[test]
    fn gets_name_one_way_to_find_a_record() {
        let by_sequence = lookup(&asked(r#"{"seq": 5}"#)).ok().expect("seq");
        assert!(matches!(by_sequence.start, StartPosition::Offset(5)));
        assert_eq!(by_sequence.exact, Some(5));
        let next = lookup(&asked(r#"{"seq": 0, "next_by_subj": "orders.*"}"#))
            .ok()
            .expect("next");
        assert!(matches!(next.start, StartPosition::Offset(1)));
        assert_eq!(next.exact, None);
        let by_time = lookup(&asked(r#"{"start_time": "2026-11-24T10:00:00Z"}"#))
            .ok()
            .expect("time");
        assert!(matches!(by_time.start, StartPosition::Time(_)));
        for (json, status) in [
            (r#"{}"#, "408 Empty Request"),
            (r#"{"last_by_subj": "orders.x"}"#, "400 Last By Subject"),
            (r#"{"seq": 1, "batch": 10}"#, "408 Bad Request"),
            (
                r#"{"seq": 1, "start_time": "2026-11-24T10:00:00Z"}"#,
                "408 Bad Request",
            ),
            (r#"{"next_by_subj": "a..b"}"#, "408 Bad Request"),
        ] {
            let refusal = lookup(&asked(json)).err().expect(json);
            assert!(
                refusal.status.starts_with(status),
                "{json}: {}",
                refusal.status
            );
        }
    }
}
