//! Client commands that talk to a running server over NATS: `natswal
//! replay` and `natswal status`. They speak the documented protocol
//! (docs/PROTOCOL.md) like any other NATS client would.

use crate::config::{Config, NatsConfig, Overrides, TlsConfig};
use crate::error::{BridgeError, Result};
use crate::protocol::*;
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

/// How a client command reaches NATS.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectionArgs {
    /// Take [nats] and [api] from this natswal config file.
    #[arg(long, env = "NATSWAL_CONFIG")]
    pub config: Option<PathBuf>,
    /// NATS server URL(s), comma separated (default: from the config, else nats://127.0.0.1:4222).
    #[arg(long, value_delimiter = ',')]
    pub nats_url: Option<Vec<String>>,
    /// NATS user (with --password).
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long, env = "NATSWAL_NATS_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    #[arg(long, env = "NATSWAL_NATS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// A NATS .creds file.
    #[arg(long)]
    pub creds: Option<PathBuf>,
    /// CA certificate (PEM) for a TLS server.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// natswal's API subject prefix.
    #[arg(long)]
    pub api_prefix: Option<String>,
    /// Seconds to wait for each response.
    #[arg(long, default_value_t = 10)]
    pub timeout: u64,
}

impl ConnectionArgs {
    fn settings(&self) -> Result<(NatsConfig, String)> {
        let mut config = match &self.config {
            Some(path) => Config::load(Some(path), &Overrides::default())?,
            None => Config::default(),
        };
        if let Some(servers) = &self.nats_url {
            config.nats.servers = servers.clone();
        }
        if self.user.is_some() || self.password.is_some() {
            config.nats.user = self.user.clone();
            config.nats.password = self.password.clone();
        }
        if self.token.is_some() {
            config.nats.token = self.token.clone();
        }
        if self.creds.is_some() {
            config.nats.creds_file = self.creds.clone();
        }
        if self.tls_ca.is_some() || self.tls_cert.is_some() {
            config.nats.tls = Some(TlsConfig {
                ca_file: self.tls_ca.clone(),
                cert_file: self.tls_cert.clone(),
                key_file: self.tls_key.clone(),
                required: true,
            });
        }
        config.nats.connect_timeout = Duration::from_secs(self.timeout);
        let prefix = self.api_prefix.clone().unwrap_or(config.api.prefix);
        Ok((config.nats, prefix))
    }

    pub(crate) async fn connect(&self) -> Result<(async_nats::Client, String)> {
        let (nats, prefix) = self.settings()?;
        let client = crate::nats::connect(&nats, "cli").await?;
        Ok((client, prefix))
    }
}

/// Options of `natswal replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// The stream to replay.
    pub stream: String,
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// Only records whose subject matches this NATS pattern (`*`, `>`).
    #[arg(long)]
    pub filter: Option<String>,
    /// Start at this offset (default: the earliest record).
    #[arg(long, conflicts_with_all = ["from_time", "latest"])]
    pub from_offset: Option<u64>,
    /// Start at the first record at or after this time (RFC 3339 or Unix ns).
    #[arg(long, conflicts_with = "latest")]
    pub from_time: Option<String>,
    /// Start with records appended from now on.
    #[arg(long)]
    pub latest: bool,
    /// Stop after this offset (inclusive).
    #[arg(long, conflicts_with = "to_time")]
    pub to_offset: Option<u64>,
    /// Stop after this time (inclusive; RFC 3339 or Unix ns).
    #[arg(long)]
    pub to_time: Option<String>,
    /// Stop after this many records.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Records per pull request.
    #[arg(long, default_value_t = 1000)]
    pub batch: u64,
    /// Ship many records per NATS message (records-v1), for high rates.
    #[arg(long, conflicts_with_all = ["frames", "light"])]
    pub batched: bool,
    /// One message per record with its metadata in the reply subject
    /// instead of headers (cheaper for readers).
    #[arg(long, conflicts_with = "frames")]
    pub light: bool,
    /// Ship stored frames as they are (frame-v1, compressed frames stay
    /// compressed on the wire); cannot filter.
    #[arg(long, conflicts_with = "filter")]
    pub frames: bool,
    /// Keep waiting for new records after catching up (until Ctrl-C).
    #[arg(long)]
    pub follow: bool,
    /// On a replicated stream: read everything acknowledged so far, even
    /// from a replica that lags (it first catches up with its leader).
    #[arg(long)]
    pub linearizable: bool,
    /// Output: `json` (one object per line) or `raw` (payloads, one per line).
    #[arg(long, default_value = "json", value_parser = ["json", "raw"])]
    pub output: String,
    /// Re-publish records to NATS instead of printing: to their original subjects...
    #[arg(long, conflicts_with = "republish_prefix")]
    pub republish: bool,
    /// ...or to `<prefix>.<original subject>`.
    #[arg(long)]
    pub republish_prefix: Option<String>,
}

/// A replayed record, whatever mode carried it.
struct Replayed {
    offset: u64,
    timestamp_ns: i64,
    subject: String,
    headers: async_nats::HeaderMap,
    payload: Bytes,
}

fn header<'a>(headers: &'a async_nats::HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).map(|value| value.as_str())
}

fn to_json(record: &Replayed) -> serde_json::Value {
    let mut headers = serde_json::Map::new();
    for (name, values) in record.headers.iter() {
        let name: &str = name.as_ref();
        let values: Vec<serde_json::Value> = values
            .iter()
            .map(|value| serde_json::Value::from(value.as_str()))
            .collect();
        headers.insert(name.to_string(), serde_json::Value::from(values));
    }
    let mut object = serde_json::json!({
        "offset": record.offset,
        "timestamp_ns": record.timestamp_ns,
        "subject": record.subject,
        "headers": headers,
    });
    match std::str::from_utf8(&record.payload) {
        Ok(text) => object["payload"] = serde_json::Value::from(text),
        Err(_) => object["payload_hex"] = serde_json::Value::from(hex(&record.payload)),
    }
    object
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// `natswal replay`.
pub async fn replay(args: ReplayArgs) -> Result<()> {
    let (client, prefix) = args.connection.connect().await?;
    let subject = format!("{prefix}.REPLAY.{}", args.stream);
    let mut start = if args.latest {
        Start::Latest
    } else if let Some(time) = &args.from_time {
        Start::Time {
            time: TimeValue::Nanoseconds(crate::offline::parse_time(time)?),
        }
    } else {
        Start::Offset {
            offset: args.from_offset.unwrap_or(0),
        }
    };
    let end = match (&args.to_offset, &args.to_time) {
        (Some(offset), _) => Some(End::Offset { offset: *offset }),
        (_, Some(time)) => Some(End::Time {
            time: TimeValue::Nanoseconds(crate::offline::parse_time(time)?),
        }),
        _ => None,
    };
    let mut remaining = args.limit;
    // Once a record was delivered, a time start no longer drops any.
    let mut started = false;
    let timeout = Duration::from_secs(args.connection.timeout);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    // SIGINT or SIGTERM ends the replay cleanly: what was received is
    // printed, then natswal exits 0.
    let mut stop = std::pin::pin!(stop_signal());
    let mut busy_since: Option<std::time::Instant> = None;
    'requests: loop {
        let request = ReplayRequest {
            filter: args.filter.clone(),
            start: start.clone(),
            end: end.clone(),
            limit: remaining,
            batch: Some(args.batch.clamp(1, BATCH_MAX)),
            max_bytes: None,
            wait_ms: args.follow.then_some(5_000),
            mode: if args.frames {
                Mode::Frames
            } else if args.batched {
                Mode::Batched
            } else if args.light {
                Mode::Light
            } else {
                Mode::Messages
            },
            // The first request only: the rest follow on from it.
            linearizable: args.linearizable && !started,
        };
        let inbox = client.new_inbox();
        let mut responses = client
            .subscribe(inbox.clone())
            .await
            .map_err(|error| BridgeError::nats("cannot subscribe to the reply inbox", error))?;
        let body = serde_json::to_vec(&request).expect("request serializes");
        client
            .publish_with_reply(subject.clone(), inbox, Bytes::from(body))
            .await
            .map_err(|error| {
                BridgeError::nats(
                    format!("cannot send the replay request to {subject}"),
                    error,
                )
            })?;
        // After SIGINT or SIGTERM, only what has already arrived is taken.
        let mut stopping = false;
        let (status, next_offset, description) = loop {
            let message = if stopping {
                match responses.next().now_or_never() {
                    Some(Some(message)) => message,
                    _ => break 'requests,
                }
            } else {
                let received = tokio::select! {
                    biased;
                    () = &mut stop => None,
                    received = tokio::time::timeout(timeout, responses.next()) => Some(received),
                };
                let Some(received) = received else {
                    stopping = true;
                    continue;
                };
                received
                    .map_err(|_| BridgeError::Nats(format!("no answer on {subject} within {timeout:?}: is natswal serving stream '{}'?", args.stream)))?
                    .ok_or_else(|| BridgeError::Nats("the reply subscription closed".to_string()))?
            };
            let headers = message.headers.clone().unwrap_or_default();
            if let Some(status) = header(&headers, HEADER_STATUS) {
                if stopping {
                    break 'requests;
                }
                let status: u16 = status.parse().unwrap_or(0);
                let next = header(&headers, HEADER_NEXT_OFFSET)
                    .and_then(|value| value.parse::<u64>().ok());
                let description = header(&headers, HEADER_DESCRIPTION)
                    .unwrap_or_default()
                    .to_string();
                break (status, next, description);
            }
            for record in decode_records(&message)? {
                if keep(&record, &start, &end, remaining, started) {
                    started = true;
                    remaining = remaining.map(|left| left.saturating_sub(1));
                    deliver(&client, &args, &mut out, record).await?;
                }
            }
        };
        // What a response carried is printed before the next request, so a
        // reader at the end of a pipe sees it while `--follow` waits.
        out.flush()
            .map_err(|error| BridgeError::io("cannot write to stdout", error))?;
        let _ = responses.unsubscribe().await;
        if status == STATUS_TOO_MANY_REPLAYS {
            // The server is at api.replays_max: back off and ask again,
            // for as long as --timeout allows.
            let since = *busy_since.get_or_insert_with(std::time::Instant::now);
            if since.elapsed() < timeout {
                tokio::select! {
                    () = &mut stop => break 'requests,
                    () = tokio::time::sleep(Duration::from_millis(200)) => continue 'requests,
                }
            }
        } else {
            busy_since = None;
        }
        match status {
            STATUS_MORE => {}
            STATUS_END_OF_RANGE => break,
            STATUS_NO_MESSAGES if args.follow => {}
            STATUS_NO_MESSAGES => break,
            other => {
                return Err(BridgeError::InvalidArgument(format!(
                    "replay refused ({other}): {description}"
                )));
            }
        }
        if remaining == Some(0) {
            break;
        }
        if let Some(next) = next_offset {
            start = Start::Offset { offset: next };
        }
    }
    out.flush()
        .map_err(|error| BridgeError::io("cannot write to stdout", error))?;
    if args.republish || args.republish_prefix.is_some() {
        client
            .flush()
            .await
            .map_err(|error| BridgeError::nats("cannot flush re-published messages", error))?;
    }
    Ok(())
}

/// Resolves at SIGINT or SIGTERM (never, if neither can be handled).
async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut interrupt), Ok(mut terminate)) => {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// The records one replay message carries, in any mode.
fn decode_records(message: &async_nats::Message) -> Result<Vec<Replayed>> {
    let empty = async_nats::HeaderMap::new();
    let headers = message.headers.as_ref().unwrap_or(&empty);
    let format = header(headers, HEADER_FORMAT);
    if format == Some(FORMAT_RECORDS_V1) || format == Some(FORMAT_FRAME_V1) {
        let decoded = if format == Some(FORMAT_FRAME_V1) {
            decode_frame_message(&message.payload)
        } else {
            decode_batched(&message.payload)
        };
        return Ok(decoded
            .map_err(|reason| {
                BridgeError::InvalidArgument(format!(
                    "bad {} replay message: {reason}",
                    format.unwrap_or_default()
                ))
            })?
            .into_iter()
            .map(|record| Replayed {
                offset: record.offset,
                timestamp_ns: record.timestamp_ns,
                subject: String::from_utf8_lossy(&record.subject).to_string(),
                headers: crate::headers::decode(&record.headers),
                payload: record.payload,
            })
            .collect());
    }
    if let Some(metadata) = message
        .reply
        .as_ref()
        .and_then(|reply| reply.as_str().strip_prefix(crate::api::LIGHT_REPLY_PREFIX))
    {
        let mut tokens = metadata.splitn(3, '.');
        let mut number = || tokens.next().and_then(|token| token.parse::<i64>().ok());
        let (Some(offset), Some(timestamp_ns)) = (number(), number()) else {
            return Err(BridgeError::InvalidArgument(format!(
                "bad light replay metadata '{metadata}'"
            )));
        };
        return Ok(vec![Replayed {
            offset: offset as u64,
            timestamp_ns,
            subject: tokens.next().unwrap_or_default().to_string(),
            headers: headers.clone(),
            payload: message.payload.clone(),
        }]);
    }
    let mut original = async_nats::HeaderMap::new();
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        if crate::headers::is_reserved(name) {
            continue;
        }
        for value in values {
            original.append(name, value.as_str());
        }
    }
    Ok(vec![Replayed {
        offset: header(headers, HEADER_OFFSET)
            .and_then(|value| value.parse().ok())
            .unwrap_or(0),
        timestamp_ns: header(headers, HEADER_TIMESTAMP)
            .and_then(|value| value.parse().ok())
            .unwrap_or(0),
        subject: header(headers, HEADER_SUBJECT)
            .unwrap_or_default()
            .to_string(),
        headers: original,
        payload: message.payload.clone(),
    }])
}

/// Whether a received record was asked for: a whole frame may begin
/// before the start and end after the end or the limit.
fn keep(
    record: &Replayed,
    start: &Start,
    end: &Option<End>,
    remaining: Option<u64>,
    started: bool,
) -> bool {
    let before_start = match start {
        Start::Offset { offset } => record.offset < *offset,
        // Once a record was delivered, a time start no longer drops any.
        Start::Time { time } => time
            .nanoseconds()
            .is_ok_and(|start_ns| record.timestamp_ns < start_ns && !started),
        Start::Earliest | Start::Latest => false,
    };
    let after_end = match end {
        Some(End::Offset { offset }) => record.offset > *offset,
        Some(End::Time { time }) => time
            .nanoseconds()
            .is_ok_and(|end_ns| record.timestamp_ns > end_ns),
        None => false,
    };
    !(before_start || after_end || remaining == Some(0))
}

async fn deliver(
    client: &async_nats::Client,
    args: &ReplayArgs,
    out: &mut impl Write,
    record: Replayed,
) -> Result<()> {
    if args.republish || args.republish_prefix.is_some() {
        let subject = match &args.republish_prefix {
            Some(prefix) => format!("{prefix}.{}", record.subject),
            None => record.subject.clone(),
        };
        let published = if record.headers.is_empty() {
            client.publish(subject.clone(), record.payload).await
        } else {
            client
                .publish_with_headers(subject.clone(), record.headers, record.payload)
                .await
        };
        return published
            .map_err(|error| BridgeError::nats(format!("cannot re-publish to {subject}"), error));
    }
    let written = if args.output == "raw" {
        out.write_all(&record.payload)
            .and_then(|()| out.write_all(b"\n"))
    } else {
        writeln!(out, "{}", to_json(&record))
    };
    written.map_err(|error| BridgeError::io("cannot write to stdout", error))
}

/// Options of `natswal status`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub connection: ConnectionArgs,
    /// Print the raw JSON answer.
    #[arg(long)]
    pub json: bool,
}

/// `natswal status`.
pub async fn status(args: StatusArgs) -> Result<()> {
    let (client, prefix) = args.connection.connect().await?;
    let subject = format!("{prefix}.STATUS");
    let answer = tokio::time::timeout(
        Duration::from_secs(args.connection.timeout),
        client.request(subject.clone(), Bytes::new()),
    )
    .await
    .map_err(|_| BridgeError::Nats(format!("no answer on {subject}: is natswal running?")))?
    .map_err(|error| {
        BridgeError::nats(
            format!("status request on {subject} failed (is natswal running?)"),
            error,
        )
    })?;
    if args.json {
        println!("{}", String::from_utf8_lossy(&answer.payload));
        return Ok(());
    }
    let value: serde_json::Value = serde_json::from_slice(&answer.payload).map_err(|error| {
        BridgeError::InvalidArgument(format!("unexpected status answer: {error}"))
    })?;
    println!(
        "{:<20} {:>14} {:>14} {:>12} {:>14} {:>9} {:>10}  STATE",
        "STREAM", "FIRST OFFSET", "NEXT OFFSET", "RECORDS", "BYTES", "SEGMENTS", "IN FLIGHT",
    );
    for stream in value["streams"].as_array().cloned().unwrap_or_default() {
        let state = match stream["poisoned"].as_str() {
            Some(cause) => format!("READ-ONLY: {cause}"),
            None => "ok".to_string(),
        };
        let number = |key: &str| {
            stream[key]
                .as_u64()
                .map(|value| value.to_string())
                .unwrap_or_default()
        };
        println!(
            "{:<20} {:>14} {:>14} {:>12} {:>14} {:>9} {:>10}  {}",
            stream["name"].as_str().unwrap_or_default(),
            number("first_offset"),
            number("next_offset"),
            number("records"),
            number("bytes"),
            number("segments"),
            number("appends_in_flight"),
            state
        );
    }
    Ok(())
}
