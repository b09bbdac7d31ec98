//! The consumer API: `CONSUMER.CREATE.<s>[.<name>[.<filter>]]`,
//! `CONSUMER.DURABLE.CREATE.<s>.<d>`, `CONSUMER.INFO`, `CONSUMER.DELETE`,
//! `CONSUMER.NAMES`, `CONSUMER.LIST` and `CONSUMER.MSG.NEXT`, and the
//! routing of acks (`$JS.ACK.<stream>.>`) to their consumer.
//!
//! Pull consumers, and push consumers (a `deliver_subject`; ordered
//! consumers are ephemeral push consumers with flow control and idle
//! heartbeats). The effective configuration, JetStream's defaults filled
//! in, is echoed in full: clients rebuild their consumers from it.

use super::consumer::{AckPolicy, Consumer, Limits, NextRequest, Push, Settings};
use super::consumer_file::ConsumerFile;
use super::errors::JsError;
use super::json::Paged;
use super::{JetStreamService, Request};
use natswal::{StartPosition, SubjectPattern};
use serde::Serialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// JetStream's defaults.
const ACK_WAIT_DEFAULT: Duration = Duration::from_secs(30);
const MAX_ACK_PENDING_DEFAULT: i64 = 1000;
const MAX_WAITING_DEFAULT: i64 = 512;
const INACTIVE_THRESHOLD_DEFAULT: Duration = Duration::from_secs(5);
/// Consumers at once across all streams: each is a task and a reader, so
/// a client creating them in a loop cannot exhaust memory or files.
const CONSUMERS_MAX: usize = 10_000;

/// Every consumer, by stream and name.
#[derive(Default)]
pub struct Consumers {
    by_stream: Mutex<BTreeMap<String, BTreeMap<String, Arc<Consumer>>>>,
}

impl Consumers {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, BTreeMap<String, Arc<Consumer>>>> {
        self.by_stream
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn get(&self, stream: &str, name: &str) -> Option<Arc<Consumer>> {
        self.lock().get(stream)?.get(name).cloned()
    }

    pub fn remove(&self, stream: &str, name: &str) -> Option<Arc<Consumer>> {
        self.lock().get_mut(stream)?.remove(name)
    }

    fn of_stream(&self, stream: &str) -> Vec<Arc<Consumer>> {
        self.lock()
            .get(stream)
            .map(|consumers| consumers.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn count(&self) -> usize {
        self.lock().values().map(BTreeMap::len).sum()
    }
}

#[derive(Serialize)]
struct SequenceJson {
    consumer_seq: u64,
    stream_seq: u64,
}

#[derive(Serialize)]
pub(super) struct ConsumerInfoJson {
    stream_name: String,
    name: String,
    created: String,
    config: Value,
    delivered: SequenceJson,
    ack_floor: SequenceJson,
    num_ack_pending: usize,
    num_redelivered: u64,
    num_waiting: usize,
    num_pending: u64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    push_bound: bool,
    ts: String,
}

fn info_of(consumer: &Consumer) -> ConsumerInfoJson {
    let snapshot = consumer.snapshot();
    ConsumerInfoJson {
        stream_name: consumer.stream_name.clone(),
        name: consumer.name.clone(),
        created: crate::time::format_rfc3339(consumer.created_ns),
        config: consumer.config(),
        delivered: SequenceJson {
            consumer_seq: snapshot.delivered.0,
            stream_seq: snapshot.delivered.1,
        },
        ack_floor: SequenceJson {
            consumer_seq: snapshot.ack_floor.0,
            stream_seq: snapshot.ack_floor.1,
        },
        num_ack_pending: snapshot.ack_pending,
        num_redelivered: snapshot.redelivered,
        num_waiting: snapshot.waiting,
        num_pending: snapshot.num_pending,
        push_bound: snapshot.push_bound,
        ts: crate::time::format_rfc3339(crate::dedup::now_ns()),
    }
}

/// Answers a `CONSUMER.*` request.
pub(super) async fn dispatch(service: &JetStreamService, request: &Request) {
    let operation = request.operation.as_str();
    let tokens: Vec<&str> = operation.split('.').collect();
    match tokens.as_slice() {
        ["CONSUMER", "MSG", "NEXT", stream, name] => next(service, request, stream, name),
        ["CONSUMER", "CREATE", stream, rest @ ..] => {
            let name = rest.first().copied();
            let result = create(service, request, stream, name, false);
            service.respond(request, "consumer_create", result).await;
        }
        ["CONSUMER", "DURABLE", "CREATE", stream, name] => {
            let result = create(service, request, stream, Some(name), true);
            service.respond(request, "consumer_create", result).await;
        }
        ["CONSUMER", "INFO", stream, name] => {
            let result = service.may_read_status(request).and_then(|()| {
                service.stream(stream)?;
                let consumer = service
                    .consumers
                    .get(stream, name)
                    .ok_or_else(consumer_not_found)?;
                Ok(info_of(&consumer))
            });
            service.respond(request, "consumer_info", result).await;
        }
        ["CONSUMER", "DELETE", stream, name] => {
            let result = service.stream(stream).and_then(|_| {
                let consumer = service
                    .consumers
                    .remove(stream, name)
                    .ok_or_else(consumer_not_found)?;
                consumer.delete();
                Ok(json!({"success": true}))
            });
            service.respond(request, "consumer_delete", result).await;
        }
        ["CONSUMER", "NAMES", stream] => {
            let result = listed(service, request, stream, |consumer| consumer.name.clone());
            service.respond(request, "consumer_names", result).await;
        }
        ["CONSUMER", "LIST", stream] => {
            let result = listed(service, request, stream, info_of);
            service.respond(request, "consumer_list", result).await;
        }
        _ => {
            let error: Result<(), _> = Err(JsError::bad_request(&format!(
                "natswal does not serve the JetStream API request '{operation}'"
            )));
            service.respond(request, "consumer_info", error).await;
        }
    }
}

/// `CONSUMER.NAMES` and `CONSUMER.LIST`: one item per consumer of the
/// stream, paged, for requesters that may read status.
fn listed<T: Serialize>(
    service: &JetStreamService,
    request: &Request,
    stream: &str,
    item: impl Fn(&Consumer) -> T,
) -> Result<Value, JsError> {
    service.may_read_status(request)?;
    service.stream(stream)?;
    let items: Vec<T> = service
        .consumers
        .of_stream(stream)
        .iter()
        .map(|consumer| item(consumer))
        .collect();
    Ok(page(items, "consumers"))
}

fn page<T: Serialize>(items: Vec<T>, field: &str) -> Value {
    let paged = Paged {
        total: items.len(),
        offset: 0,
        limit: super::json::NAMES_PAGE_MAX,
    };
    let mut value = serde_json::to_value(paged).unwrap_or_default();
    value[field] = serde_json::to_value(items).unwrap_or_default();
    value
}

fn consumer_not_found() -> JsError {
    JsError::refused(404, 10014, "consumer not found")
}

/// `CONSUMER.MSG.NEXT.<stream>.<consumer>`: a pull request. Its answers
/// are messages and statuses, never JSON.
fn next(service: &JetStreamService, request: &Request, stream: &str, name: &str) {
    let status = |line: &str| {
        let headers = format!("NATS/1.0 {line}\r\n\r\n");
        let _ = service
            .client
            .publish_with_headers(&request.reply, headers.as_bytes(), &[]);
    };
    if request.needs_higher_level() {
        return status("412 Required Api Level");
    }
    let Some(consumer) = service.consumers.get(stream, name) else {
        return status("409 Consumer Deleted");
    };
    if consumer.settings.push.is_some() {
        return status("409 Consumer is push based");
    }
    let asked: NextRequest = if request.payload.iter().all(u8::is_ascii_whitespace) {
        NextRequest::default()
    } else {
        match serde_json::from_slice::<NextRequest>(&request.payload) {
            Ok(asked) => asked,
            // A bare number is a batch size (the oldest clients' form).
            Err(_) => match std::str::from_utf8(&request.payload)
                .ok()
                .and_then(|text| text.trim().parse::<u64>().ok())
            {
                Some(batch) => NextRequest {
                    batch,
                    ..NextRequest::default()
                },
                None => return status("400 Bad Request"),
            },
        }
    };
    let readable = readable(service, stream, &consumer.settings);
    if let Err(error) = service.may_read(request, readable) {
        return status(&format!(
            "403 {}",
            error.description.replace(['\r', '\n'], " ")
        ));
    }
    consumer.pull(request.reply.clone(), asked);
}

/// The subjects a consumer may return: its filters, or all of its
/// stream's subjects (what the access rules check).
fn readable<'a>(
    service: &'a JetStreamService,
    stream: &str,
    settings: &'a Settings,
) -> &'a [SubjectPattern] {
    if !settings.filters.is_empty() {
        return &settings.filters;
    }
    service
        .stream_subjects
        .get(stream)
        .map_or(&[], Vec::as_slice)
}

/// Creates a consumer (or answers with the existing one of that name).
fn create(
    service: &JetStreamService,
    request: &Request,
    stream_name: &str,
    subject_name: Option<&str>,
    durable_subject: bool,
) -> Result<ConsumerInfoJson, JsError> {
    let (stream, _) = service.stream(stream_name)?;
    let body: Value = request.parse()?;
    if let Some(asked_stream) = body.get("stream_name").and_then(Value::as_str) {
        if asked_stream != stream_name {
            return Err(JsError::refused(
                400,
                10056,
                "stream name in subject does not match request",
            ));
        }
    }
    let mut config = body.get("config").cloned().unwrap_or_else(|| json!({}));
    if !config.is_object() {
        return Err(JsError::bad_request(
            "the request's config is not an object",
        ));
    }
    let durable_name = text(&config, "durable_name");
    let config_name = text(&config, "name");
    let name = match (subject_name, &durable_name, &config_name) {
        (Some(subject), Some(durable), _) if subject != durable => {
            return Err(JsError::refused(
                400,
                10017,
                "consumer name in subject does not match durable name in request",
            ))
        }
        (Some(subject), _, Some(named)) if subject != named => {
            return Err(JsError::refused(
                400,
                10017,
                "consumer name in subject does not match durable name in request",
            ))
        }
        (Some(subject), _, _) => subject.to_string(),
        (None, Some(durable), _) => durable.clone(),
        (None, None, Some(named)) => named.clone(),
        (None, None, None) => generated_name(),
    };
    let unfit = |character: char| ".*>/\\ ".contains(character) || character.is_control();
    if name.is_empty() || name.len() > 200 || name.contains(unfit) {
        return Err(JsError::bad_request(&format!(
            "'{name}' is not a consumer name"
        )));
    }
    let durable = durable_subject || durable_name.is_some();
    let action = body.get("action").and_then(Value::as_str).unwrap_or("");
    if let Some(existing) = service.consumers.get(stream_name, &name) {
        return update(&existing, config, &name, durable, action);
    }
    if action == "update" {
        return Err(JsError::refused(400, 10149, "consumer does not exist"));
    }
    if service.consumers.count() >= CONSUMERS_MAX {
        return Err(JsError::refused(
            400,
            10026,
            &format!("maximum consumers limit reached ({CONSUMERS_MAX} across natswal's streams)"),
        ));
    }
    let mut settings = settings(&mut config, &name, durable)?;
    if text(&config, "deliver_policy").as_deref() == Some("last") {
        // The stream's last record (none yet: whatever comes first).
        let status = stream.status();
        let last = status.next_offset.saturating_sub(1);
        settings.start = StartPosition::Offset(last.max(status.first_offset).max(1));
    }
    service.may_read(request, readable(service, stream_name, &settings))?;
    let cursor = match settings.start {
        StartPosition::Offset(sequence) => sequence,
        StartPosition::Latest => stream.status().next_offset,
        StartPosition::Earliest => stream.status().first_offset,
        StartPosition::Time(_) => 0,
    };
    let file = durable.then(|| {
        let directory = consumers_directory(service, stream_name);
        ConsumerFile::new(Arc::clone(&service.fs), &directory, &name)
    });
    let consumer = Consumer::new(
        Arc::clone(stream),
        service.deliveries.clone(),
        service.leaf,
        name.clone(),
        config,
        settings,
        file,
    );
    consumer.set_cursor(cursor);
    {
        let mut all = service.consumers.lock();
        let of_stream = all.entry(stream_name.to_string()).or_default();
        if let Some(existing) = of_stream.get(&name) {
            return Ok(info_of(existing));
        }
        of_stream.insert(name.clone(), Arc::clone(&consumer));
    }
    // A durable consumer exists on disk before its creation is answered.
    if let Err(error) = consumer.save_now() {
        service.consumers.remove(stream_name, &name);
        return Err(JsError::refused(
            500,
            10012,
            &format!("cannot save the durable consumer '{name}': {error}"),
        ));
    }
    start(service, &consumer);
    Ok(info_of(&consumer))
}

fn start(service: &JetStreamService, consumer: &Arc<Consumer>) {
    tokio::spawn(Arc::clone(consumer).run(Arc::clone(&service.consumers)));
    tokio::spawn(Arc::clone(consumer).persist());
}

/// Where a stream's durable consumers keep their files.
fn consumers_directory(service: &JetStreamService, stream: &str) -> std::path::PathBuf {
    service.data_dir.join("consumers").join(stream)
}

/// Brings back every durable consumer saved for natswal's streams (at
/// start, before requests are served). A damaged file is reported with its
/// path and left in place; its consumer is not restored.
pub(super) fn restore(service: &JetStreamService) -> usize {
    let mut restored = 0;
    for (stream_name, stream) in service.streams.iter() {
        let directory = consumers_directory(service, stream_name);
        if !service.fs.is_directory(&directory) {
            continue;
        }
        let entries = match service.fs.list(&directory) {
            Ok(entries) => entries,
            Err(error) => {
                tracing::error!(%error, "cannot list the durable consumers of stream {stream_name}");
                continue;
            }
        };
        for file_name in entries {
            let Some(name) = file_name.strip_suffix(".consumer") else {
                continue;
            };
            let file = ConsumerFile::new(Arc::clone(&service.fs), &directory, name);
            match restore_one(service, stream, name, file) {
                Ok(()) => restored += 1,
                Err(reason) => tracing::error!(
                    stream = %stream_name, consumer = %name, %reason,
                    "a durable consumer's file cannot be read: the consumer is not restored (its file is kept for inspection)"
                ),
            }
        }
    }
    restored
}

fn restore_one(
    service: &JetStreamService,
    stream: &Arc<natswal::Stream>,
    name: &str,
    file: ConsumerFile,
) -> Result<(), String> {
    let saved = file.load()?;
    let mut config: Value = serde_json::from_slice(&saved.config).map_err(|error| {
        format!(
            "{}: its config does not parse: {error}",
            file.path.display()
        )
    })?;
    let mut settings = settings(&mut config, name, true)
        .map_err(|error| format!("{}: {}", file.path.display(), error.description))?;
    if saved.delivered.1 > 0 {
        settings.start = StartPosition::Offset(saved.delivered.1 + 1);
    }
    let consumer = Consumer::new(
        Arc::clone(stream),
        service.deliveries.clone(),
        service.leaf,
        name.to_string(),
        config,
        settings,
        Some(file),
    );
    consumer.restore(&saved);
    service
        .consumers
        .lock()
        .entry(stream.name().to_string())
        .or_default()
        .insert(name.to_string(), Arc::clone(&consumer));
    start(service, &consumer);
    Ok(())
}

/// A create or update of an existing consumer: the same configuration
/// answers with its info; changes of its limits only are applied (JetStream's
/// updatable fields that natswal implements), saved first for a durable
/// consumer; anything else is refused naming the fields.
fn update(
    existing: &Consumer,
    mut config: Value,
    name: &str,
    durable: bool,
    action: &str,
) -> Result<ConsumerInfoJson, JsError> {
    let asked = settings(&mut config, name, durable)?;
    let differences = differences(&config, &existing.config());
    if differences.is_empty() {
        return Ok(info_of(existing));
    }
    let listed = differences.join(", ");
    if action == "create" {
        return Err(JsError::refused(
            400,
            10148,
            &format!("consumer already exists (with another {listed})"),
        ));
    }
    let fixed: Vec<&str> = differences
        .iter()
        .copied()
        .filter(|field| !UPDATABLE_FIELDS.contains(field))
        .collect();
    if !fixed.is_empty() {
        return Err(JsError::refused(
            500,
            10012,
            &format!(
                "natswal cannot change a consumer's {} (only {}): delete the consumer and create it again",
                fixed.join(", "),
                UPDATABLE_FIELDS.join(", ")
            ),
        ));
    }
    existing.update(config, asked.limits).map_err(|error| {
        JsError::refused(
            500,
            10012,
            &format!("cannot save the durable consumer '{name}': {error}"),
        )
    })?;
    Ok(info_of(existing))
}

/// The fields an update may change.
const UPDATABLE_FIELDS: &[&str] = &[
    "ack_wait",
    "max_deliver",
    "max_ack_pending",
    "max_waiting",
    "inactive_threshold",
];

/// The fields that decide what a consumer delivers, where two effective
/// configurations differ.
fn differences(asked: &Value, existing: &Value) -> Vec<&'static str> {
    const FIELDS: &[&str] = &[
        "deliver_policy",
        "opt_start_seq",
        "opt_start_time",
        "ack_policy",
        "ack_wait",
        "max_deliver",
        "filter_subject",
        "filter_subjects",
        "max_ack_pending",
        "max_waiting",
        "inactive_threshold",
        "deliver_subject",
        "flow_control",
        "idle_heartbeat",
    ];
    FIELDS
        .iter()
        .copied()
        .filter(|field| {
            let unset = |value: Option<&Value>| {
                value.is_none_or(|value| {
                    value.is_null()
                        || value.as_str() == Some("")
                        || value.as_array().is_some_and(Vec::is_empty)
                })
            };
            let (left, right) = (asked.get(*field), existing.get(*field));
            !(unset(left) && unset(right)) && left != right
        })
        .collect()
}

fn text(config: &Value, field: &str) -> Option<String> {
    config
        .get(field)
        .and_then(Value::as_str)
        .filter(|text| !text.is_empty())
        .map(str::to_string)
}

fn generated_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mixed = (crate::dedup::now_ns() as u64 ^ (count << 32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    format!("{mixed:016X}")
}

/// The consumer's settings from its configuration, and the configuration
/// with JetStream's defaults filled in (what info echoes).
fn settings(config: &mut Value, name: &str, durable: bool) -> Result<Settings, JsError> {
    let bad = |reason: String| JsError::bad_request(&reason);
    let mut filters = Vec::new();
    let mut filter_texts: Vec<String> = text(config, "filter_subject").into_iter().collect();
    if let Some(many) = config.get("filter_subjects").and_then(Value::as_array) {
        filter_texts.extend(many.iter().filter_map(Value::as_str).map(str::to_string));
    }
    for filter in &filter_texts {
        filters.push(
            SubjectPattern::parse(filter)
                .map_err(|error| bad(format!("filter subject '{filter}': {error}")))?,
        );
    }
    let deliver = text(config, "deliver_policy").unwrap_or_else(|| "all".to_string());
    let start = match deliver.as_str() {
        "all" => StartPosition::Earliest,
        "new" => StartPosition::Latest,
        "last" => StartPosition::Latest,
        "by_start_sequence" => StartPosition::Offset(
            config
                .get("opt_start_seq")
                .and_then(Value::as_u64)
                .ok_or_else(|| bad("deliver policy by_start_sequence needs opt_start_seq".into()))?,
        ),
        "by_start_time" => {
            let time = text(config, "opt_start_time")
                .ok_or_else(|| bad("deliver policy by_start_time needs opt_start_time".into()))?;
            StartPosition::Time(crate::time::parse_time(&time).map_err(bad)?)
        }
        "last_per_subject" => {
            return Err(bad(
                "deliver policy last_per_subject needs a per-subject index, which natswal does not keep".into(),
            ))
        }
        other => return Err(bad(format!("deliver policy '{other}' is not one of JetStream's"))),
    };
    let ack_policy = match text(config, "ack_policy").as_deref().unwrap_or("explicit") {
        "none" => AckPolicy::None,
        "all" => AckPolicy::All,
        "explicit" => AckPolicy::Explicit,
        other => {
            return Err(bad(format!(
                "ack policy '{other}' is not one of JetStream's"
            )))
        }
    };
    let nanoseconds = |field: &str| {
        config
            .get(field)
            .and_then(Value::as_u64)
            .filter(|value| *value > 0)
    };
    let ack_wait = nanoseconds("ack_wait").map_or(ACK_WAIT_DEFAULT, Duration::from_nanos);
    let max_deliver = config
        .get("max_deliver")
        .and_then(Value::as_i64)
        .unwrap_or(-1);
    let max_ack_pending = config
        .get("max_ack_pending")
        .and_then(Value::as_i64)
        .filter(|value| *value != 0)
        .unwrap_or(MAX_ACK_PENDING_DEFAULT);
    let max_waiting = config
        .get("max_waiting")
        .and_then(Value::as_i64)
        .filter(|value| *value > 0)
        .unwrap_or(MAX_WAITING_DEFAULT);
    let push = push_settings(config)?;
    let inactive = nanoseconds("inactive_threshold").map(Duration::from_nanos);
    let inactive_threshold = if durable {
        inactive
    } else {
        Some(inactive.unwrap_or(INACTIVE_THRESHOLD_DEFAULT))
    };
    let fields = [
        ("name", json!(name)),
        ("deliver_policy", json!(deliver)),
        (
            "ack_policy",
            json!(text(config, "ack_policy").unwrap_or_else(|| "explicit".into())),
        ),
        ("ack_wait", json!(ack_wait.as_nanos() as u64)),
        ("max_deliver", json!(max_deliver)),
        ("replay_policy", json!("instant")),
        ("max_ack_pending", json!(max_ack_pending)),
        ("num_replicas", json!(0)),
    ];
    let object = config.as_object_mut().expect("checked to be an object");
    for (field, value) in fields {
        object.insert(field.to_string(), value);
    }
    if durable {
        object.insert("durable_name".to_string(), json!(name));
    }
    // Pull consumers only: requests wait for a push consumer's nobody.
    if push.is_none() {
        object.insert("max_waiting".to_string(), json!(max_waiting));
    }
    if let Some(threshold) = inactive_threshold {
        object.insert(
            "inactive_threshold".to_string(),
            json!(threshold.as_nanos() as u64),
        );
    }
    Ok(Settings {
        filters,
        start,
        ack_policy,
        limits: Limits {
            ack_wait,
            max_deliver: u64::try_from(max_deliver).ok().filter(|max| *max > 0),
            max_ack_pending: usize::try_from(max_ack_pending).unwrap_or(usize::MAX),
            max_waiting: usize::try_from(max_waiting).unwrap_or(512),
            inactive_threshold,
        },
        push,
    })
}

/// A push consumer's delivery settings (`None`: a pull consumer). What
/// natswal does not implement of push delivery is refused, not ignored.
fn push_settings(config: &Value) -> Result<Option<Push>, JsError> {
    let Some(deliver_subject) = text(config, "deliver_subject") else {
        if config.get("flow_control").and_then(Value::as_bool) == Some(true) {
            return Err(JsError::refused(
                400,
                10089,
                "consumer flow control requires a push based consumer",
            ));
        }
        return Ok(None);
    };
    if deliver_subject.contains(['*', '>']) || deliver_subject.contains(char::is_whitespace) {
        return Err(JsError::refused(
            400,
            10112,
            &format!("invalid push consumer deliver subject '{deliver_subject}'"),
        ));
    }
    if config.get("headers_only").and_then(Value::as_bool) == Some(true) {
        return Err(JsError::refused(
            500,
            10012,
            "natswal does not deliver headers only (headers_only)",
        ));
    }
    if config
        .get("rate_limit_bps")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        > 0
    {
        return Err(JsError::refused(
            500,
            10012,
            "natswal does not limit a push consumer's rate (rate_limit_bps)",
        ));
    }
    let flow_control = config.get("flow_control").and_then(Value::as_bool) == Some(true);
    let idle_heartbeat = config
        .get("idle_heartbeat")
        .and_then(Value::as_u64)
        .filter(|nanoseconds| *nanoseconds > 0)
        .map(Duration::from_nanos);
    if flow_control && idle_heartbeat.is_none() {
        return Err(JsError::refused(
            400,
            10108,
            "consumer with flow control also needs heartbeats",
        ));
    }
    Ok(Some(Push {
        deliver_subject,
        flow_control,
        idle_heartbeat,
    }))
}

/// A push consumer's flow control answer on `$JS.FC.<stream>.<consumer>.<n>`.
pub(super) fn route_flow_answer(service: &JetStreamService, message: &crate::wire::Message) {
    let subject = message.subject_text();
    let tokens: Vec<&str> = subject.split('.').collect();
    let [_, _, stream, name, _] = tokens.as_slice() else {
        return;
    };
    if let Some(consumer) = service.consumers.get(stream, name) {
        consumer.flow_answer(subject);
    }
}

/// An ack on `$JS.ACK.<stream>.<consumer>.<deliveries>.<sseq>.<cseq>.<ts>.<pending>`.
pub(super) fn route_ack(service: &JetStreamService, message: &crate::wire::Message) {
    let subject = message.subject_text();
    let tokens: Vec<&str> = subject.split('.').collect();
    let [_, _, stream, name, _, sequence, ..] = tokens.as_slice() else {
        return;
    };
    let Some(sequence) = sequence.parse::<u64>().ok() else {
        return;
    };
    let consumer = service.consumers.get(stream, name);
    if let Some(consumer) = &consumer {
        consumer.acknowledge(sequence, &message.payload);
    }
    // A double ack (a request) is answered once the ack is applied, and
    // for a durable consumer once it is on disk.
    if let Some(reply) = &message.reply {
        match consumer.filter(|consumer| consumer.is_durable()) {
            Some(consumer) => consumer.reply_after_save(reply.to_string()),
            None => {
                let _ = service.client.publish(reply, &[]);
            }
        }
    }
}
