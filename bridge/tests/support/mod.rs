//! Test support: a real nats-server on a free port, the real `natswal`
//! binary as a child process (killable with SIGKILL), and a replay client
//! speaking docs/PROTOCOL.md.
#![allow(dead_code)]

mod link_proxy;
mod nats_server;
#[allow(unused_imports)]
pub use link_proxy::LinkProxy;
pub use nats_server::*;

use bytes::Bytes;
use futures_util::StreamExt;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The `natswal` binary under test. `NATSWAL_BIN` overrides it, so a test
/// can be run against another build (an earlier one, to see it fail).
pub fn natswal_binary() -> PathBuf {
    match std::env::var_os("NATSWAL_BIN") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_BIN_EXE_natswal")),
    }
}

/// Runs `natswal` with `args` to completion: its exit code (-signal when
/// killed) and its output, stdout then stderr.
pub fn natswal_run(args: &[&str]) -> (i32, String) {
    let output = Command::new(natswal_binary())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run natswal");
    let code = output.status.code().unwrap_or_else(|| {
        use std::os::unix::process::ExitStatusExt;
        -output.status.signal().unwrap_or(0)
    });
    let mut text = String::from_utf8_lossy(&output.stdout).to_string();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    (code, text)
}

/// Where a frame is in a segment file: its slot starts at `start`, the
/// frame at `start + 16`, the next slot at `end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSpan {
    pub start: u64,
    pub end: u64,
    pub base_offset: u64,
    pub record_count: u32,
}

/// The valid slots and frames of a segment file's bytes, from the first.
pub fn frame_spans(bytes: &[u8]) -> Vec<FrameSpan> {
    use natswal::format::frame::{slot_chain, FrameCheck};
    slot_chain(bytes)
        .into_iter()
        .map_while(|chained| match chained.frame {
            FrameCheck::Valid(frame) => Some(FrameSpan {
                start: chained.position as u64,
                end: chained.end() as u64,
                base_offset: frame.base_offset,
                record_count: frame.record_count,
            }),
            _ => None,
        })
        .collect()
}

/// Segment files of a stream directory, in offset order.
pub fn segment_files(directory: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<_> = std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "log"))
        .collect();
    paths.sort();
    paths
}

/// Publishes `count` messages to `events.<n>` with up to 256 requests in
/// flight and returns each acknowledged offset with its payload.
pub async fn publish_acked(
    client: &async_nats::Client,
    count: usize,
    first: usize,
) -> std::collections::BTreeMap<u64, Bytes> {
    let window = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = tokio::task::JoinSet::new();
    for index in first..first + count {
        let permit = std::sync::Arc::clone(&window)
            .acquire_owned()
            .await
            .unwrap();
        let client = client.clone();
        tasks.spawn(async move {
            let payload = Bytes::from(format!("event {index} {}", "x".repeat(index % 120)));
            let reply = client
                .request(format!("events.{}", index % 7), payload.clone())
                .await
                .expect("ack arrives");
            drop(permit);
            let ack: serde_json::Value = serde_json::from_slice(&reply.payload).expect("JSON ack");
            let offset = ack["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("not a PubAck: {ack}"));
            (offset, payload)
        });
    }
    let mut acked = std::collections::BTreeMap::new();
    while let Some(joined) = tasks.join_next().await {
        let (offset, payload) = joined.unwrap();
        assert!(
            acked.insert(offset, payload).is_none(),
            "offset {offset} acked twice"
        );
    }
    acked
}

/// A header map of `(name, value)` pairs.
pub fn header_map(pairs: &[(&str, &str)]) -> async_nats::HeaderMap {
    let mut map = async_nats::HeaderMap::new();
    for (name, value) in pairs {
        map.insert(*name, *value);
    }
    map
}

/// Publishes with headers and returns the JSON reply (an empty body is
/// `Null`), within 10 s.
pub async fn request_with_pairs(
    client: &async_nats::Client,
    subject: &str,
    pairs: &[(&str, &str)],
    payload: impl AsRef<[u8]>,
) -> serde_json::Value {
    let message = tokio::time::timeout(
        Duration::from_secs(10),
        client.request_with_headers(
            subject.to_string(),
            header_map(pairs),
            Bytes::copy_from_slice(payload.as_ref()),
        ),
    )
    .await
    .expect("a reply within 10 s")
    .expect("a reply");
    if message.payload.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&message.payload).expect("JSON reply")
    }
}

/// The `err_code` of an error reply; panics, naming the reply, if it is
/// not one.
pub fn err_code(reply: &serde_json::Value) -> u64 {
    reply["error"]["err_code"]
        .as_u64()
        .unwrap_or_else(|| panic!("expected an error, got {reply}"))
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The natswal server as a child process.
pub struct Natswal {
    child: Option<Child>,
    pub data_dir: PathBuf,
    pub config_path: PathBuf,
    pub http_port: u16,
    log_lines: mpsc::Receiver<String>,
    /// What natswal printed before it said it was ready.
    startup_lines: Vec<String>,
}

/// A `[[streams]]` table for the default test stream `events` on `events.>`.
pub const EVENTS_STREAM: &str = "[[streams]]\nname = \"events\"\nsubjects = [\"events.>\"]\n";

impl Natswal {
    /// Writes a config (nats URL, data dir, HTTP port, then `extra`) and
    /// starts `natswal serve`, waiting until it says it is ready.
    pub fn start(nats_url: &str, data_dir: &Path, extra: &str) -> Natswal {
        Natswal::try_start(nats_url, data_dir, extra)
            .unwrap_or_else(|error| panic!("natswal did not start: {error}"))
    }

    pub fn try_start(nats_url: &str, data_dir: &Path, extra: &str) -> Result<Natswal, String> {
        std::fs::create_dir_all(data_dir).expect("data dir");
        let http_port = free_port();
        let config_path = data_dir.join("natswal.toml");
        let mut config = format!(
            "data_dir = \"{}\"\n[http]\nlisten = \"127.0.0.1:{http_port}\"\n",
            data_dir.display()
        );
        if !extra.contains("[nats]") {
            config.push_str(&format!(
                "[nats]\nservers = [\"{nats_url}\"]\nconnect_timeout = \"5s\"\n"
            ));
        }
        config.push_str(extra);
        let mut file = std::fs::File::create(&config_path).expect("config file");
        file.write_all(config.as_bytes()).expect("write config");
        Natswal::spawn(data_dir, &config_path, http_port)
    }

    fn spawn(data_dir: &Path, config_path: &Path, http_port: u16) -> Result<Natswal, String> {
        let mut child = Command::new(natswal_binary())
            .args(["serve", "--config"])
            .arg(config_path)
            .env(
                "RUST_LOG",
                "warn,natswal::server=info,natswal_replication::shipping=info",
            )
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start natswal");
        let (sender, log_lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for reader in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let sender = sender.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines().map_while(Result::ok) {
                    if sender.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        // Only the reader threads hold senders now: the channel disconnects
        // when natswal closes its output (exits).
        drop(sender);
        let mut natswal = Natswal {
            child: Some(child),
            data_dir: data_dir.to_path_buf(),
            config_path: config_path.to_path_buf(),
            http_port,
            log_lines,
            startup_lines: Vec::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match natswal
                .log_lines
                .recv_timeout(left.max(Duration::from_millis(1)))
            {
                Ok(line) if line.starts_with("natswal ready") => {
                    natswal.startup_lines = seen;
                    return Ok(natswal);
                }
                Ok(line) => seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = natswal.child.as_mut().and_then(|child| child.wait().ok());
                    natswal.child = None;
                    return Err(format!("exit {status:?}, output:\n{}", seen.join("\n")));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    natswal.kill();
                    return Err(format!(
                        "not ready after 30 s, output:\n{}",
                        seen.join("\n")
                    ));
                }
            }
        }
    }

    /// Starts again with the same config and data.
    pub fn restart(&mut self) {
        self.try_restart().expect("natswal restarts");
    }

    /// Starts again with the same config and data; the output if it does
    /// not get ready (it is not running then).
    pub fn try_restart(&mut self) -> Result<(), String> {
        self.kill();
        *self = Natswal::spawn(&self.data_dir, &self.config_path, self.http_port)?;
        Ok(())
    }

    /// SIGKILL: no chance to sync or ack anything more.
    pub fn kill(&mut self) {
        kill_child(&mut self.child);
    }

    /// Sends `signal` (for example `libc::SIGHUP`) to the running process.
    pub fn signal(&self, signal: i32) {
        signal_child(self.child.as_ref(), signal);
    }

    /// The process id of the running server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Waits up to `timeout` for the process to exit; `None` if it still
    /// runs (it keeps running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        let mut child = self.child.take().expect("running");
        child.wait().expect("wait for natswal")
    }

    /// The output up to the first line containing `needle` (looked for
    /// in the start-up lines, then awaited for up to `timeout`): natswal's
    /// stdout and stderr are read by two threads, so a line printed on
    /// stderr before "natswal ready" (on stdout) may arrive after it.
    pub fn output_until(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        while !self.startup_lines.iter().any(|line| line.contains(needle)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log_lines.recv_timeout(left) {
                Ok(line) => self.startup_lines.push(line),
                Err(_) => break,
            }
        }
        self.startup_lines.join("\n")
    }

    /// Output lines printed so far (after "natswal ready").
    pub fn output(&self) -> Vec<String> {
        self.log_lines.try_iter().collect()
    }

    pub fn http_get(&self, path: &str) -> (u16, String) {
        let mut socket = TcpStream::connect(("127.0.0.1", self.http_port)).expect("connect HTTP");
        write!(socket, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n").expect("send request");
        let mut response = String::new();
        std::io::Read::read_to_string(&mut socket, &mut response).expect("read response");
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        let body = response
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string();
        (status, body)
    }
}

impl Drop for Natswal {
    fn drop(&mut self) {
        self.kill();
    }
}

pub async fn connect(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(url)
        .await
        .expect("connect to NATS")
}

/// A replayed record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replayed {
    pub offset: u64,
    pub timestamp_ns: i64,
    pub subject: String,
    /// Original headers (natswal's own `Nwal-*` removed), sorted.
    pub headers: Vec<(String, String)>,
    pub payload: Bytes,
}

/// One response of a replay request: the records, then the status.
#[derive(Debug, Clone)]
pub struct ReplayResponse {
    pub records: Vec<Replayed>,
    /// Bodies of frame-v1 messages (frames mode), as received.
    pub frames: Vec<Bytes>,
    pub status: u16,
    pub description: String,
    pub next_offset: Option<u64>,
}

/// A stored NATS header block (`NATS/1.0\r\nName: value\r\n...`) as
/// sorted pairs.
fn header_block(block: &[u8]) -> Vec<(String, String)> {
    let mut parsed: Vec<(String, String)> = String::from_utf8_lossy(block)
        .lines()
        .skip(1)
        .filter_map(|line| {
            line.split_once(": ")
                .map(|(name, value)| (name.to_string(), value.to_string()))
        })
        .collect();
    parsed.sort();
    parsed
}

fn header(headers: &async_nats::HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(|value| value.as_str().to_string())
}

/// Sends one replay request and collects its response.
pub async fn replay_once(
    client: &async_nats::Client,
    stream: &str,
    request: serde_json::Value,
) -> ReplayResponse {
    let inbox = client.new_inbox();
    let mut subscription = client
        .subscribe(inbox.clone())
        .await
        .expect("subscribe inbox");
    client
        .publish_with_reply(
            format!("$NWAL.REPLAY.{stream}"),
            inbox,
            Bytes::from(request.to_string()),
        )
        .await
        .expect("send replay request");
    let mut records = Vec::new();
    let mut frames = Vec::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(20), subscription.next())
            .await
            .expect("replay response within 20 s")
            .expect("subscription open");
        if let Some(status) = message.status {
            panic!(
                "NATS answered the replay request on {stream} with status {status} {:?} (is natswal subscribed?)",
                message.description
            );
        }
        let headers = message.headers.clone().unwrap_or_default();
        if let Some(status) = header(&headers, "Nwal-Status") {
            return ReplayResponse {
                records,
                frames,
                status: status.parse().expect("numeric status"),
                description: header(&headers, "Nwal-Description").unwrap_or_default(),
                next_offset: header(&headers, "Nwal-Next-Offset")
                    .and_then(|value| value.parse().ok()),
            };
        }
        if header(&headers, "Nwal-Format").as_deref() == Some("frame-v1") {
            // One stored frame: decoded with the engine's own frame
            // reader (the frame layout is the on-disk one, FORMAT.md).
            let decoded = natswal::decode_frame_bytes(&message.payload, 64 << 20)
                .unwrap_or_else(|reason| panic!("bad frame-v1 message: {reason}"));
            assert_eq!(
                header(&headers, "Nwal-Count"),
                Some(decoded.len().to_string()),
                "Nwal-Count matches the frame"
            );
            for record in decoded {
                records.push(Replayed {
                    offset: record.offset,
                    timestamp_ns: record.timestamp_ns,
                    subject: String::from_utf8_lossy(&record.subject).to_string(),
                    headers: header_block(&record.headers),
                    payload: record.payload,
                });
            }
            frames.push(message.payload.clone());
            continue;
        }
        if header(&headers, "Nwal-Format").as_deref() == Some("records-v1") {
            let mut position = 0usize;
            let body = &message.payload;
            while position < body.len() {
                let read_u32 =
                    |at: usize| u32::from_le_bytes(body[at..at + 4].try_into().unwrap()) as usize;
                let entry_length = read_u32(position);
                let offset =
                    u64::from_le_bytes(body[position + 4..position + 12].try_into().unwrap());
                let timestamp_ns =
                    i64::from_le_bytes(body[position + 12..position + 20].try_into().unwrap());
                let subject_length =
                    u16::from_le_bytes(body[position + 20..position + 22].try_into().unwrap())
                        as usize;
                let headers_length = read_u32(position + 22);
                let subject_start = position + 26;
                let headers_start = subject_start + subject_length;
                let payload_start = headers_start + headers_length;
                let end = position + 4 + entry_length;
                records.push(Replayed {
                    offset,
                    timestamp_ns,
                    subject: String::from_utf8_lossy(&body[subject_start..headers_start])
                        .to_string(),
                    headers: header_block(&body[headers_start..payload_start]),
                    payload: body.slice(payload_start..end),
                });
                position = end;
            }
            continue;
        }
        let mut original: Vec<(String, String)> = headers
            .iter()
            .flat_map(|(name, values)| {
                let name: &str = name.as_ref();
                values
                    .iter()
                    .map(move |value| (name.to_string(), value.as_str().to_string()))
            })
            .filter(|(name, _)| !name.starts_with("Nwal-"))
            .collect();
        original.sort();
        records.push(Replayed {
            offset: header(&headers, "Nwal-Offset")
                .expect("offset header")
                .parse()
                .unwrap(),
            timestamp_ns: header(&headers, "Nwal-Timestamp")
                .expect("timestamp header")
                .parse()
                .unwrap(),
            subject: header(&headers, "Nwal-Subject").expect("subject header"),
            headers: original,
            payload: message.payload.clone(),
        });
    }
}

/// Pulls every record from `start` to the end of the stream.
pub async fn replay_all(
    client: &async_nats::Client,
    stream: &str,
    mut request: serde_json::Value,
) -> Vec<Replayed> {
    let mut records = Vec::new();
    for _ in 0..100_000 {
        let response = replay_once(client, stream, request.clone()).await;
        records.extend(response.records);
        match response.status {
            100 => {
                request["start"] =
                    serde_json::json!({ "offset": response.next_offset.expect("next offset") })
            }
            204 | 404 => return records,
            other => panic!("replay failed with {other}: {}", response.description),
        }
    }
    panic!("replay did not finish in 100000 requests");
}

/// Runs a nats-py script (installed by the setup in `.tools/python`) with
/// `url` as its argument; returns the JSON it prints, failing the test
/// with its stderr if it fails.
pub async fn run_nats_py(script: &str, url: &str) -> serde_json::Value {
    let output = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(url)
        .env("PYTHONPATH", workspace_root().join(".tools/python"))
        .output()
        .await
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "nats-py script failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("the script prints JSON")
}
