//! Account and stream information, and the refusal of configuration
//! changes: natswal's streams come from its configuration file, so
//! creating, changing, deleting or purging one through the JetStream API
//! is refused with the error code JetStream uses for that operation. A
//! create or update that asks for exactly what a stream already is answers
//! with its info, as JetStream does for an identical configuration.

use super::errors::JsError;
use super::json::{
    AccountInfo, ApiStats, Limits, Paged, PagedRequest, StreamConfigJson, StreamInfoJson,
    StreamInfoRequest, StreamInfoResponse, StreamList, StreamNames, StreamStateJson, API_LEVEL,
    LIST_PAGE_MAX, NAMES_PAGE_MAX,
};
use super::{JetStreamService, Request};
use crate::config::StreamSection;
use natswal::{Stream, SubjectPattern};
use serde::Serialize;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Answers every request except direct gets.
pub(super) async fn dispatch(service: &JetStreamService, request: &Request) {
    let operation = request.operation.as_str();
    let (kind, stream) = split(operation);
    if request.needs_higher_level() {
        let error: Result<(), _> = Err(JsError::required_api_level());
        return service.respond(request, kind, error).await;
    }
    match (operation, stream) {
        ("INFO", _) => {
            let result = service.may_read_status(request).map(|()| account(service));
            service.respond(request, kind, result).await;
        }
        ("STREAM.NAMES", _) => {
            let result = names(service, request);
            service.respond(request, kind, result).await;
        }
        ("STREAM.LIST", _) => {
            let result = list(service, request);
            service.respond(request, kind, result).await;
        }
        (_, Some(name)) if operation.starts_with("STREAM.INFO.") => {
            let result = info(service, request, name);
            service.respond(request, kind, result).await;
        }
        (_, Some(name)) if operation.starts_with("STREAM.CREATE.") => {
            let result = declare(service, request, name, true);
            service.respond(request, kind, result).await;
        }
        (_, Some(name)) if operation.starts_with("STREAM.UPDATE.") => {
            let result = declare(service, request, name, false);
            service.respond(request, kind, result).await;
        }
        (_, Some(name)) if operation.starts_with("STREAM.MSG.GET.") => {
            super::messages::message_get(service, request, name).await;
        }
        _ => {
            let result: Result<(), _> = Err(refusal(operation, stream));
            service.respond(request, kind, result).await;
        }
    }
}

/// The response kind of an operation, and the stream it names (its last
/// token, for the operations that take one).
fn split(operation: &str) -> (&'static str, Option<&str>) {
    const KINDS: &[(&str, &str)] = &[
        ("STREAM.INFO.", "stream_info"),
        ("STREAM.CREATE.", "stream_create"),
        ("STREAM.UPDATE.", "stream_update"),
        ("STREAM.DELETE.", "stream_delete"),
        ("STREAM.PURGE.", "stream_purge"),
        ("STREAM.MSG.GET.", "stream_msg_get"),
        ("STREAM.MSG.DELETE.", "stream_msg_delete"),
        ("STREAM.SNAPSHOT.", "stream_snapshot"),
        ("STREAM.RESTORE.", "stream_restore"),
    ];
    match operation {
        "INFO" => return ("account_info", None),
        "STREAM.NAMES" => return ("stream_names", None),
        "STREAM.LIST" => return ("stream_list", None),
        _ => {}
    }
    for (prefix, kind) in KINDS {
        if let Some(rest) = operation.strip_prefix(prefix) {
            // A stream name is one token.
            let stream = Some(rest).filter(|name| !name.is_empty() && !name.contains('.'));
            return (kind, stream);
        }
    }
    ("system", None)
}

/// Why an operation natswal does not serve is refused, with the code
/// JetStream gives that operation's failures.
fn refusal(operation: &str, stream: Option<&str>) -> JsError {
    let configured = "natswal's streams and their retention are configured in natswal's configuration file ([[streams]]), not through the JetStream API";
    let first = |prefix: &str| operation.starts_with(prefix);
    if stream.is_none() && first("STREAM.") {
        return JsError::bad_request(&format!(
            "'{operation}' does not name a stream (a stream name is one token)"
        ));
    }
    if first("STREAM.DELETE.") {
        JsError::refused(
            500,
            10050,
            &format!("natswal does not delete streams: {configured}"),
        )
    } else if first("STREAM.PURGE.") {
        JsError::refused(
            500,
            10110,
            &format!("natswal does not purge streams: {configured}"),
        )
    } else if first("STREAM.MSG.DELETE.") {
        JsError::refused(
            500,
            10057,
            &format!("natswal does not delete single messages: {configured}"),
        )
    } else if first("STREAM.SNAPSHOT.") {
        JsError::refused(
            500,
            10064,
            "snapshot failed: natswal's streams are backed up from their sealed segment files (docs/OPERATIONS.md)",
        )
    } else if first("STREAM.RESTORE.") {
        JsError::refused(
            500,
            10062,
            "restore failed: natswal's streams are restored from their segment files (docs/OPERATIONS.md)",
        )
    } else {
        JsError::bad_request(&format!(
            "natswal does not serve the JetStream API request '{operation}' (docs/PROTOCOL.md lists what it serves)"
        ))
    }
}

fn account(service: &JetStreamService) -> AccountInfo {
    let storage = service
        .streams
        .values()
        .map(|stream| stream.status().bytes)
        .sum();
    AccountInfo {
        memory: 0,
        storage,
        reserved_memory: 0,
        reserved_storage: 0,
        streams: service.streams.len(),
        consumers: service.consumers.count(),
        limits: Limits::none(),
        domain: service.domain.clone(),
        api: ApiStats {
            level: API_LEVEL,
            total: service.counters.total.load(Ordering::Relaxed),
            errors: service.counters.errors.load(Ordering::Relaxed),
        },
    }
}

/// The info of one stream, as JetStream reports it.
pub(super) fn stream_info(stream: &Stream, section: &StreamSection) -> StreamInfoJson {
    let status = stream.status();
    StreamInfoJson {
        config: StreamConfigJson::of(section),
        created: crate::time::format_rfc3339(created_ns(stream)),
        state: StreamStateJson::of(&status),
        ts: crate::time::format_rfc3339(crate::dedup::now_ns()),
    }
}

/// When the stream's directory was made (its birth time, where the file
/// system keeps one, else its last change).
fn created_ns(stream: &Stream) -> i64 {
    let metadata = std::fs::metadata(stream.directory()).ok();
    let time = metadata.and_then(|metadata| metadata.created().or(metadata.modified()).ok());
    time.and_then(|time| time.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |since| {
            i64::try_from(since.as_nanos()).unwrap_or(i64::MAX)
        })
}

fn info(
    service: &JetStreamService,
    request: &Request,
    name: &str,
) -> Result<impl Serialize, JsError> {
    service.may_read_status(request)?;
    let parsed: StreamInfoRequest = request.parse()?;
    if parsed.subjects_filter.is_some() {
        return Err(JsError::bad_request(
            "subjects_filter needs a per-subject index, which natswal does not keep",
        ));
    }
    let _ = (parsed.deleted_details, parsed.offset);
    let (stream, section) = service.stream(name)?;
    Ok(StreamInfoResponse {
        paged: Paged {
            total: 0,
            offset: 0,
            limit: 0,
        },
        info: stream_info(stream, section),
    })
}

/// A stream and its configuration.
type Described<'a> = (&'a Arc<Stream>, &'a StreamSection);

/// The streams whose subjects overlap the request's `subject` filter (all
/// without one), in name order, from its `offset`.
fn matching<'a>(
    service: &'a JetStreamService,
    request: &Request,
) -> Result<(PagedRequest, Vec<Described<'a>>), JsError> {
    service.may_read_status(request)?;
    let parsed: PagedRequest = request.parse()?;
    let filter = match parsed
        .subject
        .as_deref()
        .filter(|subject| !subject.is_empty())
    {
        Some(subject) => Some(
            SubjectPattern::parse(subject)
                .map_err(|error| JsError::bad_request(&format!("subject filter: {error}")))?,
        ),
        None => None,
    };
    let overlaps = |name: &str| {
        filter.as_ref().is_none_or(|filter| {
            service
                .stream_subjects
                .get(name)
                .is_some_and(|patterns| patterns.iter().any(|pattern| pattern.overlaps(filter)))
        })
    };
    let streams = service
        .sections
        .iter()
        .filter(|(name, _)| overlaps(name))
        .filter_map(|(name, section)| Some((service.streams.get(name)?, section)))
        .collect();
    Ok((parsed, streams))
}

fn page<T>(items: Vec<T>, offset: usize, limit: usize) -> (Paged, Vec<T>) {
    let total = items.len();
    let offset = offset.min(total);
    let page = items.into_iter().skip(offset).take(limit).collect();
    (
        Paged {
            total,
            offset,
            limit,
        },
        page,
    )
}

fn names(service: &JetStreamService, request: &Request) -> Result<StreamNames, JsError> {
    let (parsed, streams) = matching(service, request)?;
    let names = streams
        .into_iter()
        .map(|(_, section)| section.name.clone())
        .collect();
    let (paged, streams) = page(names, parsed.offset, NAMES_PAGE_MAX);
    Ok(StreamNames { paged, streams })
}

fn list(service: &JetStreamService, request: &Request) -> Result<StreamList, JsError> {
    let (parsed, streams) = matching(service, request)?;
    let (paged, streams) = page(streams, parsed.offset, LIST_PAGE_MAX);
    let streams = streams
        .into_iter()
        .map(|(stream, section)| stream_info(stream, section))
        .collect();
    Ok(StreamList { paged, streams })
}

/// A create or update: the stream's info when the request asks for what
/// the stream is, else JetStream's refusal naming the differences.
fn declare(
    service: &JetStreamService,
    request: &Request,
    name: &str,
    create: bool,
) -> Result<StreamInfoJson, JsError> {
    let asked: serde_json::Value = request.parse()?;
    if let Some(body_name) = asked.get("name").and_then(|value| value.as_str()) {
        if body_name != name {
            return Err(JsError::refused(
                400,
                10056,
                "stream name in subject does not match request",
            ));
        }
    }
    let Ok((stream, section)) = service.stream(name) else {
        return Err(if create {
            JsError::create_refused(name)
        } else {
            JsError::stream_not_found()
        });
    };
    let differences = differences(&asked, &StreamConfigJson::of(section));
    if !differences.is_empty() {
        return Err(JsError::stream_name_exists(&differences.join("; ")));
    }
    Ok(stream_info(stream, section))
}

/// The fields a create or update asks for that differ from the stream's
/// configuration. A field the request leaves out, or sets to JetStream's
/// "unset" value, asks for nothing.
fn differences(asked: &serde_json::Value, actual: &StreamConfigJson) -> Vec<String> {
    let mut found = Vec::new();
    if let Some(subjects) = asked.get("subjects").and_then(|value| value.as_array()) {
        let mut asked_subjects: Vec<&str> =
            subjects.iter().filter_map(|value| value.as_str()).collect();
        let mut actual_subjects: Vec<&str> = actual.subjects.iter().map(String::as_str).collect();
        asked_subjects.sort_unstable();
        actual_subjects.sort_unstable();
        if !asked_subjects.is_empty() && asked_subjects != actual_subjects {
            found.push(format!(
                "subjects: asked {asked_subjects:?}, natswal has {actual_subjects:?}"
            ));
        }
    }
    for (field, value) in [
        ("retention", actual.retention),
        ("storage", actual.storage),
        ("discard", actual.discard),
    ] {
        if let Some(asked) = asked.get(field).and_then(|value| value.as_str()) {
            if asked != value {
                found.push(format!("{field}: asked {asked}, natswal has {value}"));
            }
        }
    }
    for (field, value, unset) in [
        ("max_age", actual.max_age, 0),
        ("max_msgs", actual.max_msgs, -1),
        ("max_bytes", actual.max_bytes, -1),
        ("num_replicas", i64::from(actual.num_replicas), 0),
    ] {
        if let Some(asked) = asked.get(field).and_then(|value| value.as_i64()) {
            let is_unset = asked == unset || (unset == -1 && asked == 0);
            let replicas_one = field == "num_replicas" && asked == 1;
            if !is_unset && !replicas_one && asked != value {
                found.push(format!("{field}: asked {asked}, natswal has {value}"));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_split_into_their_kind_and_stream() {
        assert_eq!(split("INFO"), ("account_info", None));
        assert_eq!(split("STREAM.INFO.orders"), ("stream_info", Some("orders")));
        assert_eq!(split("STREAM.INFO.a.b"), ("stream_info", None));
        assert_eq!(split("STREAM.INFO."), ("stream_info", None));
        assert_eq!(
            split("STREAM.MSG.GET.orders"),
            ("stream_msg_get", Some("orders"))
        );
        assert_eq!(split("ACCOUNT.PURGE.x"), ("system", None));
    }

    #[test]
    fn refusals_carry_the_operations_jetstream_codes() {
        let code = |operation: &str| {
            let (_, stream) = split(operation);
            let error = refusal(operation, stream);
            (error.code, error.err_code)
        };
        assert_eq!(code("STREAM.DELETE.orders"), (500, 10050));
        assert_eq!(code("STREAM.PURGE.orders"), (500, 10110));
        assert_eq!(code("STREAM.MSG.DELETE.orders"), (500, 10057));
        assert_eq!(code("STREAM.DELETE.a.b"), (400, 10003));
        assert_eq!(code("META.LEADER.STEPDOWN"), (400, 10003));
    }

    #[test]
    fn a_declaration_differs_only_in_what_it_asks_for() {
        let section: StreamSection =
            toml::from_str("name = \"orders\"\nsubjects = [\"orders.>\"]\nmax_age = \"1h\"\n")
                .expect("section");
        let actual = StreamConfigJson::of(&section);
        let same = serde_json::json!({"name": "orders", "subjects": ["orders.>"],
            "retention": "limits", "storage": "file", "num_replicas": 1,
            "max_msgs": -1, "max_bytes": -1, "max_age": 3_600_000_000_000i64});
        assert!(differences(&same, &actual).is_empty());
        assert!(differences(&serde_json::json!({"name": "orders"}), &actual).is_empty());
        let other = serde_json::json!({"subjects": ["orders.*"], "storage": "memory",
            "max_age": 60_000_000_000i64, "num_replicas": 3});
        let found = differences(&other, &actual);
        assert_eq!(found.len(), 4, "{found:?}");
        assert!(found[0].contains("subjects"), "{found:?}");
    }
}
