//! natswal's JetStream API (docs/PROTOCOL.md, "The JetStream API"):
//! JetStream clients read natswal's streams without learning natswal's own
//! replay protocol. natswal answers `$JS.API.>` (or `$JS.<domain>.API.>`)
//! on its API connection:
//! - account and stream information (`INFO`, `STREAM.INFO`, `STREAM.NAMES`,
//!   `STREAM.LIST`), in [`streams`];
//! - messages by sequence (`STREAM.MSG.GET`, `DIRECT.GET`), in
//!   [`messages`];
//! - configuration changes refused with JetStream's error codes: natswal's
//!   streams are configured in natswal's configuration file. A create or
//!   update that asks for what a stream already is succeeds, so
//!   applications that declare their streams at start keep working.
//!
//! Invariants: every request with a reply subject gets exactly one
//! response (or, for direct gets, one message); a response carries either
//! its fields or `"error"`, never both; reads go through the same
//! `[[access]]` rules as replay. natswal never serves this API beside a
//! real JetStream in the same account and domain: at start it asks
//! `<prefix>.INFO`, and if anyone answers it stays off and says why.

mod consumer;
mod consumer_file;
mod consumers;
mod errors;
mod json;
mod messages;
mod streams;

use crate::api::AccessRules;
use crate::config::StreamSection;
use bytes::Bytes;
use errors::JsError;
use json::{ErrorBody, Response};
use natswal::Stream;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;

/// How long the start-up check waits for another JetStream to answer.
const PRESENCE_TIMEOUT: Duration = Duration::from_secs(2);

/// Requests read from the subscription at once.
const CHUNK_REQUESTS_MAX: usize = 256;

#[derive(Clone)]
pub struct JetStreamService {
    pub client: crate::wire::Client,
    pub streams: Arc<BTreeMap<String, Arc<Stream>>>,
    /// Each stream's configuration (what its info reports).
    pub sections: Arc<BTreeMap<String, StreamSection>>,
    /// Each stream's subjects, parsed once (the replay API's map).
    pub stream_subjects: Arc<BTreeMap<String, Vec<natswal::SubjectPattern>>>,
    /// `$JS.API`, or `$JS.<domain>.API`.
    pub prefix: String,
    pub domain: Option<String>,
    pub access: Arc<RwLock<AccessRules>>,
    pub counters: Arc<ApiCounters>,
    pub consumers: Arc<consumers::Consumers>,
    /// Where consumer deliveries go out: the leafnode connection when one
    /// is configured (`leaf`), else the API connection.
    pub deliveries: crate::wire::Client,
    pub leaf: bool,
    /// natswal's data directory (durable consumers keep their files in
    /// `consumers/<stream>/` there).
    pub data_dir: std::path::PathBuf,
    /// The file system those files are written through.
    pub fs: Arc<dyn natswal::io::FileSystem>,
}

/// What `$JS.API.INFO` reports under `api`.
#[derive(Default)]
pub struct ApiCounters {
    pub total: AtomicU64,
    pub errors: AtomicU64,
}

/// The API prefix for `domain`.
pub fn prefix(domain: Option<&str>) -> String {
    match domain {
        Some(domain) => format!("$JS.{domain}.API"),
        None => "$JS.API".to_string(),
    }
}

/// Whether someone already answers `<prefix>.INFO` in this account:
/// `Some(description)` of the answer if so. The server's no-responders
/// status (503) means nobody does.
pub async fn other_jetstream(client: &crate::wire::Client, prefix: &str) -> Option<String> {
    let inbox = format!("_INBOX.natswal.presence.{}", std::process::id());
    let mut answers = client.subscribe(&inbox);
    if !client.round_trip(Some(PRESENCE_TIMEOUT)).await {
        return None;
    }
    let request = format!("{prefix}.INFO");
    let published = client.publish_with_reply(&request, &inbox, &[], &[]);
    if published.is_err() {
        return None;
    }
    let answer = tokio::time::timeout(PRESENCE_TIMEOUT, answers.next_chunk(1)).await;
    let message = answer.ok()??.pop()?;
    if message.headers.starts_with(b"NATS/1.0 503") {
        return None;
    }
    let text = String::from_utf8_lossy(&message.payload);
    Some(text.chars().take(200).collect())
}

/// Brings back the durable consumers saved on disk; returns how many.
pub fn restore_consumers(service: &JetStreamService) -> usize {
    consumers::restore(service)
}

/// Subscribes to the API and to the acks of every stream's consumers
/// (before natswal calls itself ready).
pub fn subscribe(service: &JetStreamService) -> crate::wire::Subscription {
    let mut subjects = vec![format!("{}.>", service.prefix)];
    for stream in service.streams.keys() {
        subjects.push(format!("{ACK_PREFIX}{stream}.>"));
        subjects.push(format!("{ACK_PREFIX_CLIENT}{stream}.>"));
        subjects.push(format!("{FLOW_PREFIX}{stream}.>"));
        subjects.push(format!("{FLOW_PREFIX_CLIENT}{stream}.>"));
    }
    service.client.subscribe_all(&subjects)
}

/// Where consumers' deliveries are acknowledged: JetStream's v1 form,
/// which nats-server accepts as a reply subject only from a leafnode
/// connection.
pub(crate) const ACK_PREFIX: &str = "$JS.ACK.";
/// The same tokens after natswal's own prefix, for deliveries without a
/// leafnode connection (clients ack them, but cannot read the metadata).
pub(crate) const ACK_PREFIX_CLIENT: &str = "$NWAL.ACK.";

/// Where push consumers' flow control requests are answered (JetStream's
/// form over the leafnode, natswal's own without one).
pub(crate) const FLOW_PREFIX: &str = "$JS.FC.";
pub(crate) const FLOW_PREFIX_CLIENT: &str = "$NWAL.FC.";

/// Serves requests until `shutdown`. Reads run on the blocking pool, one
/// task per request, so a slow read never holds up an info request.
pub async fn run(
    service: JetStreamService,
    mut requests: crate::wire::Subscription,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let chunk = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => break,
            chunk = requests.next_chunk(CHUNK_REQUESTS_MAX) => match chunk {
                Some(chunk) => chunk,
                None => break,
            },
        };
        for message in chunk {
            if message.subject.starts_with(ACK_PREFIX.as_bytes())
                || message.subject.starts_with(ACK_PREFIX_CLIENT.as_bytes())
            {
                consumers::route_ack(&service, &message);
                continue;
            }
            if message.subject.starts_with(FLOW_PREFIX.as_bytes())
                || message.subject.starts_with(FLOW_PREFIX_CLIENT.as_bytes())
            {
                consumers::route_flow_answer(&service, &message);
                continue;
            }
            let service = service.clone();
            tokio::spawn(async move { service.answer(message).await });
        }
    }
}

/// One request, as the handlers see it.
pub(crate) struct Request {
    /// The subject after the prefix and its dot (`STREAM.INFO.orders`).
    pub operation: String,
    pub reply: String,
    pub headers: Bytes,
    pub payload: Bytes,
}

impl Request {
    /// The payload as `T`; an empty payload or `null` (what async-nats
    /// sends for a request without options) is `T::default()`.
    pub fn parse<T: serde::de::DeserializeOwned + Default>(&self) -> Result<T, JsError> {
        if self.payload.iter().all(u8::is_ascii_whitespace) {
            return Ok(T::default());
        }
        serde_json::from_slice::<Option<T>>(&self.payload)
            .map(Option::unwrap_or_default)
            .map_err(|error| JsError::invalid_json(&error))
    }

    /// `Nats-Required-Api-Level` asks for more than natswal implements
    /// (or is not a number, which JetStream refuses the same way).
    pub fn needs_higher_level(&self) -> bool {
        match crate::headers::find(&self.headers, "Nats-Required-Api-Level") {
            Some(level) => level
                .trim()
                .parse::<u32>()
                .map_or(true, |level| level > json::API_LEVEL),
            None => false,
        }
    }
}

impl JetStreamService {
    async fn answer(&self, message: crate::wire::Message) {
        let Some(reply) = message.reply.as_ref().map(|reply| reply.to_string()) else {
            return;
        };
        let subject = message.subject_text();
        let Some(operation) = subject
            .strip_prefix(self.prefix.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
        else {
            return;
        };
        let request = Request {
            operation: operation.to_string(),
            reply,
            headers: message.headers.clone(),
            payload: message.payload.clone(),
        };
        self.counters.total.fetch_add(1, Ordering::Relaxed);
        if request.operation.starts_with("DIRECT.GET.") {
            messages::direct_get(self, &request).await;
        } else if request.operation.starts_with("CONSUMER.") {
            if request.needs_higher_level() && !request.operation.starts_with("CONSUMER.MSG.NEXT.")
            {
                let error: Result<(), _> = Err(JsError::required_api_level());
                return self.respond(&request, "consumer_create", error).await;
            }
            consumers::dispatch(self, &request).await;
        } else {
            streams::dispatch(self, &request).await;
        }
    }

    /// Sends a response of `kind` (`stream_info`, ...): the body, or the
    /// error alone.
    pub(crate) async fn respond<T: Serialize>(
        &self,
        request: &Request,
        kind: &str,
        result: Result<T, JsError>,
    ) {
        let kind = json::response_type(kind);
        let body = match result {
            Ok(body) => serde_json::to_vec(&Response { kind: &kind, body }),
            Err(error) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(operation = %request.operation, ?error, "JetStream API request refused");
                serde_json::to_vec(&Response {
                    kind: &kind,
                    body: ErrorBody { error },
                })
            }
        };
        let body = body.unwrap_or_default();
        self.send(&request.reply, &[], &body).await;
    }

    /// Sends one message to `reply`, waiting for room (never dropped).
    pub(crate) async fn send(&self, reply: &str, headers: &[u8], body: &[u8]) {
        if let Err(error) = self.client.publish_when_room(reply, headers, body).await {
            tracing::warn!(%error, "cannot send a JetStream API response");
        }
    }

    /// The stream a request names, or JetStream's "stream not found".
    pub(crate) fn stream(&self, name: &str) -> Result<(&Arc<Stream>, &StreamSection), JsError> {
        match (self.streams.get(name), self.sections.get(name)) {
            (Some(stream), Some(section)) => Ok((stream, section)),
            _ => Err(JsError::stream_not_found()),
        }
    }

    fn access(&self) -> std::sync::RwLockReadGuard<'_, AccessRules> {
        self.access
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether the requester may read stream information (the rule of
    /// natswal's `STATUS`).
    pub(crate) fn may_read_status(&self, request: &Request) -> Result<(), JsError> {
        self.access()
            .check_status(&request.reply)
            .map(|_| ())
            .map_err(|reason| JsError::forbidden(&reason))
    }

    /// Whether the requester may read records matching `patterns` (the
    /// rule of replay).
    pub(crate) fn may_read(
        &self,
        request: &Request,
        patterns: &[natswal::SubjectPattern],
    ) -> Result<(), JsError> {
        self.access()
            .check_replay(&request.reply, patterns)
            .map(|_| ())
            .map_err(|reason| JsError::forbidden(&reason))
    }
}
