//! `natswal bench nats`: natswal behind a real nats-server, beside its
//! peers, in one run, with the same load generator for every target:
//!
//! - publishers that keep many messages in flight, each with a reply
//!   subject, counting acknowledgements: natswal (`fsync`, `none`),
//!   JetStream R1 file storage with default settings, JetStream with
//!   `sync_interval: always` (a second nats-server), and the ceiling: a no-op
//!   responder that acks at once without storing;
//! - NATS core fan-out to one subscriber (no acks), the broker's own limit;
//! - replay of 1 M records: natswal per-message and batched vs a JetStream
//!   ordered consumer.
//!
//! natswal and the no-op responder run as child processes of this binary,
//! JetStream inside nats-server: every target is its own process.

use crate::error::{BridgeError, Result};
use crate::protocol::*;
use bytes::Bytes;
use futures_util::StreamExt;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Options of `natswal bench nats`.
#[derive(Debug, Clone, clap::Args)]
pub struct NatsBenchArgs {
    /// Directory for natswal's and JetStream's data (the same disk); emptied after.
    #[arg(long, default_value = "bench-data")]
    pub dir: PathBuf,
    /// The nats-server binary (default: NATS_SERVER_BIN, else .tools/bin/nats-server).
    #[arg(long)]
    pub nats_server: Option<PathBuf>,
    /// Seconds per ingest case.
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// Rounds of the ingest table: every target once per round, in turn, so
    /// drift of a shared machine spreads over all targets; the table shows
    /// medians.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Publisher tasks (spread over two connections).
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Messages each publisher keeps waiting for an ack.
    #[arg(long, default_value_t = 1024)]
    pub in_flight: usize,
    /// Payload sizes in bytes.
    #[arg(long, value_delimiter = ',', default_value = "128,1024")]
    pub sizes: Vec<usize>,
    /// Atomic batch sizes (messages per batch).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000")]
    pub atomic_sizes: Vec<u64>,
    /// Flow of the fast-ingest case (acks every N messages at most).
    #[arg(long, default_value_t = 500)]
    pub fast_flow: u16,
    /// natswal's write mode (`mmap` or `pwrite`).
    #[arg(long, default_value = "pwrite")]
    pub write_mode: String,
    /// Skip the batch cases.
    #[arg(long)]
    pub no_batches: bool,
    /// Records replayed by the replay cases (0 skips them).
    #[arg(long, default_value_t = 1_000_000)]
    pub replay_records: u64,
    /// Record sizes of the replay cases (a table each; only one size
    /// besides 128 B, which reuses the ingest cases' streams).
    #[arg(long, value_delimiter = ',', default_value = "128,1024")]
    pub replay_sizes: Vec<usize>,
}

pub(super) fn nats_server_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    let path = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("NATS_SERVER_BIN").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(".tools/bin/nats-server"));
    if path.is_file() {
        Ok(path)
    } else {
        Err(BridgeError::InvalidArgument(format!(
            "nats-server not found at {} (run scripts/setup, or pass --nats-server)",
            path.display()
        )))
    }
}

pub(super) fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|error| BridgeError::io("cannot find a free port", error))?;
    listener
        .local_addr()
        .map(|address| address.port())
        .map_err(|error| BridgeError::io("cannot find a free port", error))
}

pub(super) fn wait_for_port(port: u16, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return Err(BridgeError::InvalidArgument(format!(
                "{what} did not listen on port {port}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A child process killed when dropped.
pub(super) struct ChildProcess(pub(super) Child);

impl ChildProcess {
    /// CPU time (user and system) the process used so far, in seconds.
    pub(super) fn cpu_seconds(&self) -> f64 {
        process_cpu_seconds(self.0.id())
    }
}

/// CPU time (user and system) process `pid` used so far, in seconds.
pub(super) fn process_cpu_seconds(pid: u32) -> f64 {
    {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces): utime and
        // stime are the 12th and 13th.
        let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let ticks = |index: usize| {
            fields
                .get(index)
                .and_then(|field| field.parse::<f64>().ok())
        };
        // SAFETY: sysconf has no preconditions.
        let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        match (ticks(11), ticks(12)) {
            (Some(user), Some(system)) => (user + system) / ticks_per_second.max(1.0),
            _ => f64::NAN,
        }
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(super) fn start_nats_server(
    binary: &Path,
    directory: &Path,
    name: &str,
    extra: &str,
) -> Result<(ChildProcess, String)> {
    start_nats_server_on(binary, directory, name, extra, "", free_port()?)
}

/// Where [`start_nats_server_on`] keeps JetStream's data for `name`.
pub(super) fn jetstream_store(directory: &Path, name: &str) -> PathBuf {
    directory.join(format!("jetstream-{name}"))
}

/// Starts nats-server with JetStream on `port` (a restart with the same
/// `name` finds the same data).
pub(super) fn start_nats_server_on(
    binary: &Path,
    directory: &Path,
    name: &str,
    extra: &str,
    outer: &str,
    port: u16,
) -> Result<(ChildProcess, String)> {
    let store = jetstream_store(directory, name);
    std::fs::create_dir_all(&store)
        .map_err(|error| BridgeError::io(format!("cannot create {}", store.display()), error))?;
    let config = format!(
        "listen: 127.0.0.1:{port}\nmax_payload: 8MB\njetstream {{\n store_dir: \"{}\"\n{extra}}}\n{outer}",
        store.display()
    );
    let config_path = directory.join(format!("nats-{name}.conf"));
    std::fs::write(&config_path, config)
        .map_err(|error| BridgeError::io("cannot write the nats-server config", error))?;
    let child = Command::new(binary)
        .arg("-c")
        .arg(&config_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|error| BridgeError::io(format!("cannot start {}", binary.display()), error))?;
    let process = ChildProcess(child);
    wait_for_port(port, "nats-server")?;
    Ok((process, format!("nats://127.0.0.1:{port}")))
}

/// natswal's JetStream domain in the benchmark: the broker runs a real
/// JetStream too (the peer), which answers `$JS.API`.
const NATSWAL_DOMAIN: &str = "nwal";

fn start_natswal(
    directory: &Path,
    url: &str,
    leafnode_url: &str,
    write_mode: &str,
) -> Result<ChildProcess> {
    let data = directory.join("natswal");
    let config = format!(
        "data_dir = \"{}\"\n[nats]\nservers = [\"{url}\"]\n[http]\nlisten = \"\"\n[storage]\nwrite_mode = \"{write_mode}\"\n\
         [jetstream]\ndomain = \"{NATSWAL_DOMAIN}\"\nleafnode_url = \"{leafnode_url}\"\n\
         [[streams]]\nname = \"fsync\"\nsubjects = [\"nw.fsync.>\"]\ndurability = \"fsync\"\nmax_message_bytes = \"4MiB\"\nallow_atomic = true\nallow_batched = true\natomic_batches_max = 1000\natomic_staging_bytes = \"512MiB\"\n\
         [[streams]]\nname = \"none\"\nsubjects = [\"nw.none.>\"]\ndurability = \"none\"\nmax_message_bytes = \"4MiB\"\n\
         [[streams]]\nname = \"replay\"\nsubjects = [\"nw.replay.>\"]\ndurability = \"none\"\n",
        data.display()
    );
    let config_path = directory.join("natswal.toml");
    std::fs::write(&config_path, config)
        .map_err(|error| BridgeError::io("cannot write the natswal config", error))?;
    spawn_self(
        &["serve", "--config", &config_path.display().to_string()],
        "natswal ready",
    )
}

/// Runs this binary with `arguments` and waits for a line starting with `ready`.
pub(super) fn spawn_self(arguments: &[&str], ready: &str) -> Result<ChildProcess> {
    let executable = std::env::current_exe()
        .map_err(|error| BridgeError::io("cannot find natswal's own executable", error))?;
    let mut child = Command::new(executable)
        .args(arguments)
        .env("RUST_LOG", "warn,openraft=error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|error| BridgeError::io("cannot start a natswal child process", error))?;
    let stdout = child.stdout.take().expect("piped stdout");
    let process = ChildProcess(child);
    let mut line = String::new();
    let mut reader = std::io::BufReader::new(stdout);
    loop {
        line.clear();
        let count = std::io::BufRead::read_line(&mut reader, &mut line)
            .map_err(|error| BridgeError::io("cannot read child output", error))?;
        if count == 0 {
            return Err(BridgeError::InvalidArgument(format!(
                "child `natswal {}` exited before it was ready",
                arguments.join(" ")
            )));
        }
        if line.starts_with(ready) {
            // Keep draining its stdout so it never blocks on a full pipe.
            std::thread::spawn(move || {
                let mut sink = String::new();
                while std::io::BufRead::read_line(&mut reader, &mut sink)
                    .map(|count| count > 0)
                    .unwrap_or(false)
                {
                    sink.clear();
                }
            });
            return Ok(process);
        }
    }
}

pub(super) async fn connect(url: &str) -> Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 20)
        .client_capacity(1 << 16)
        .connect(url)
        .await
        .map_err(|error| BridgeError::nats(format!("cannot connect to {url}"), error))
}

/// Result of one load case.
#[derive(Debug, Clone, Copy)]
pub(super) struct Rate {
    pub(super) messages: u64,
    pub(super) seconds: f64,
    pub(super) errors: u64,
}

impl Rate {
    pub(super) fn per_second(&self) -> f64 {
        self.messages as f64 / self.seconds
    }
}

/// Publishers with reply subjects, `in_flight` each, for `duration`;
/// counts successful acks (a JSON body without "error").
pub(super) async fn acked_load(
    clients: &[async_nats::Client],
    subject_prefix: &str,
    payload_size: usize,
    (publishers, in_flight): (usize, usize),
    duration: Duration,
) -> Result<Rate> {
    let payload = Bytes::from(vec![b'x'; payload_size]);
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let started = Instant::now();
    for publisher in 0..publishers {
        let client = clients[publisher % clients.len()].clone();
        let reply = format!("{}.{publisher}", client.new_inbox());
        let mut acks = client
            .subscribe(reply.clone())
            .await
            .map_err(|error| BridgeError::nats("cannot subscribe to acks", error))?;
        let window = Arc::new(tokio::sync::Semaphore::new(in_flight));
        let counter = {
            let window = Arc::clone(&window);
            let acked = Arc::clone(&acked);
            let errors = Arc::clone(&errors);
            tokio::spawn(async move {
                while let Some(message) = acks.next().await {
                    window.add_permits(1);
                    if message.status.is_some() || memchr_error(&message.payload) {
                        errors.fetch_add(1, Ordering::Relaxed);
                    } else {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        let stop = Arc::clone(&stop);
        let payload = payload.clone();
        let subject = format!("{subject_prefix}.{publisher}");
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_secs(5), window.acquire()).await {
                    Ok(Ok(permit)) => permit.forget(),
                    _ => break,
                }
                if client
                    .publish_with_reply(subject.clone(), reply.clone(), payload.clone())
                    .await
                    .is_err()
                {
                    break;
                }
            }
            drain_in_flight(&client, &window, in_flight, Duration::from_secs(5)).await;
            counter.abort();
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let measured = acked.load(Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    Ok(Rate {
        messages: measured,
        seconds,
        errors: errors.load(Ordering::Relaxed),
    })
}

/// Lets the messages in flight be answered (so they do not load the next
/// case): flushes, then waits until every permit of `window` is back or
/// `timeout` passed.
pub(super) async fn drain_in_flight(
    client: &async_nats::Client,
    window: &tokio::sync::Semaphore,
    in_flight: usize,
    timeout: Duration,
) {
    let _ = client.flush().await;
    let drained = Instant::now();
    while window.available_permits() < in_flight && drained.elapsed() < timeout {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub(super) fn memchr_error(payload: &[u8]) -> bool {
    payload.windows(8).any(|window| window == b"\"error\":")
}

/// NATS core: publishers without replies, one subscriber counting.
async fn core_fanout(
    url: &str,
    payload_size: usize,
    args: &NatsBenchArgs,
    duration: Duration,
) -> Result<Rate> {
    let subscriber_client = connect(url).await?;
    let publisher_client = connect(url).await?;
    let mut subscription = subscriber_client
        .subscribe("core.bench.>")
        .await
        .map_err(|error| BridgeError::nats("cannot subscribe", error))?;
    subscriber_client
        .flush()
        .await
        .map_err(|error| BridgeError::nats("flush", error))?;
    let received = Arc::new(AtomicU64::new(0));
    let counter = {
        let received = Arc::clone(&received);
        tokio::spawn(async move {
            while subscription.next().await.is_some() {
                received.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let payload = Bytes::from(vec![b'x'; payload_size]);
    let mut tasks = Vec::new();
    for publisher in 0..args.publishers {
        let client = publisher_client.clone();
        let stop = Arc::clone(&stop);
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            let subject = format!("core.bench.{publisher}");
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if client
                    .publish(subject.clone(), payload.clone())
                    .await
                    .is_err()
                {
                    break;
                }
                sent += 1;
                // Stay near what one subscriber can take, so NATS does not
                // drop for a slow consumer and the count stays meaningful.
                if sent % 1024 == 0 {
                    let _ = client.flush().await;
                }
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let messages = received.load(Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    counter.abort();
    Ok(Rate {
        messages,
        seconds,
        errors: 0,
    })
}

/// The no-op responder child: acks every message at once, stores nothing.
pub async fn noop_responder(url: &str, subject: &str) -> Result<()> {
    let client = connect(url).await?;
    let mut subscription = client
        .subscribe(subject.to_string())
        .await
        .map_err(|error| BridgeError::nats(format!("cannot subscribe to {subject}"), error))?;
    client
        .flush()
        .await
        .map_err(|error| BridgeError::nats("flush", error))?;
    println!("ready");
    let mut sequence = 0u64;
    while let Some(message) = subscription.next().await {
        if let Some(reply) = message.reply {
            let _ = client
                .publish(reply, crate::ack::pub_ack("noop", sequence, false))
                .await;
        }
        sequence += 1;
    }
    Ok(())
}

/// The no-op responder on natswal's own client (the one ingest uses): the
/// same work as [`noop_responder`], so the two show what the client
/// library costs.
pub async fn noop_responder_wire(url: &str, subject: &str) -> Result<()> {
    let server = crate::wire::ServerAddress::parse(url).map_err(BridgeError::InvalidArgument)?;
    let client = crate::wire::Client::connect(crate::wire::Options {
        servers: vec![server],
        name: "noop-responder-wire".to_string(),
        credentials: crate::wire::Credentials::default(),
        tls: None,
        subscription_capacity: 65_536,
        connect_timeout: Duration::from_secs(5),
        output_bytes_max: 64 * 1024 * 1024,
        events: Arc::new(|_| {}),
        dialect: Default::default(),
    })
    .await
    .map_err(|failure| BridgeError::nats("cannot connect", failure))?;
    let mut subscription = client.subscribe(subject);
    if !client.round_trip(Some(Duration::from_secs(5))).await {
        return Err(BridgeError::Nats(format!("cannot subscribe to {subject}")));
    }
    println!("ready");
    let mut sequence = 0u64;
    while let Some(message) = subscription.next().await {
        if let Some(reply) = message.reply {
            let _ = client.publish(&reply, &crate::ack::pub_ack("noop", sequence, false));
        }
        sequence += 1;
    }
    Ok(())
}

/// The median (the mean of the middle two for an even count); NaN stays NaN.
fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() || values.iter().any(|value| value.is_nan()) {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// Fills a target with `count` records as fast as acks allow.
async fn fill(
    clients: &[async_nats::Client],
    subject_prefix: &str,
    count: u64,
    payload_size: usize,
) -> Result<()> {
    let payload = Bytes::from(vec![b'r'; payload_size]);
    let client = &clients[0];
    let reply = client.new_inbox();
    let mut acks = client
        .subscribe(reply.clone())
        .await
        .map_err(|error| BridgeError::nats("subscribe", error))?;
    let window = Arc::new(tokio::sync::Semaphore::new(4096));
    let done = Arc::new(AtomicU64::new(0));
    let counter = {
        let window = Arc::clone(&window);
        let done = Arc::clone(&done);
        tokio::spawn(async move {
            while let Some(message) = acks.next().await {
                window.add_permits(1);
                if message.status.is_none() && !memchr_error(&message.payload) {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    for index in 0..count {
        window.acquire().await.expect("window open").forget();
        client
            .publish_with_reply(
                format!("{subject_prefix}.{}", index % 16),
                reply.clone(),
                payload.clone(),
            )
            .await
            .map_err(|error| BridgeError::nats("publish", error))?;
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while done.load(Ordering::Relaxed) < count {
        if Instant::now() > deadline {
            return Err(BridgeError::InvalidArgument(format!(
                "only {} of {count} records were acknowledged while filling {subject_prefix}",
                done.load(Ordering::Relaxed)
            )));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    counter.abort();
    Ok(())
}

/// Pulls `count` records from natswal's stream in the given mode.
async fn natswal_replay(
    client: &async_nats::Client,
    stream: &str,
    count: u64,
    mode: Mode,
) -> Result<Rate> {
    let started = Instant::now();
    let mut received = 0u64;
    let mut start = Start::Earliest;
    let inbox = client.new_inbox();
    let mut responses = client
        .subscribe(inbox.clone())
        .await
        .map_err(|error| BridgeError::nats("subscribe", error))?;
    while received < count {
        let request = ReplayRequest {
            start: start.clone(),
            batch: Some(
                match mode {
                    Mode::Messages | Mode::Light => BATCH_MAX,
                    Mode::Batched | Mode::Frames => BATCH_MAX_BATCHED,
                }
                .min(count - received),
            ),
            mode,
            ..ReplayRequest::default()
        };
        client
            .publish_with_reply(
                format!("$NWAL.REPLAY.{stream}"),
                inbox.clone(),
                Bytes::from(serde_json::to_vec(&request).expect("serializes")),
            )
            .await
            .map_err(|error| BridgeError::nats("replay request", error))?;
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), responses.next())
                .await
                .map_err(|_| BridgeError::Nats("replay stalled".to_string()))?
                .ok_or_else(|| BridgeError::Nats("replay inbox closed".to_string()))?;
            let headers = message.headers.as_ref();
            if let Some(status) = headers.and_then(|headers| headers.get(HEADER_STATUS)) {
                let next = headers
                    .and_then(|headers| headers.get(HEADER_NEXT_OFFSET))
                    .and_then(|value| value.as_str().parse::<u64>().ok());
                if status.as_str() != "100" && received < count {
                    return Err(BridgeError::Nats(format!(
                        "replay ended early with status {} after {received}",
                        status.as_str()
                    )));
                }
                if let Some(next) = next {
                    start = Start::Offset { offset: next };
                }
                break;
            }
            // Records are decoded as a client would, not just counted.
            let format = headers
                .and_then(|headers| headers.get(HEADER_FORMAT))
                .map(|value| value.as_str().to_string());
            received += match format.as_deref() {
                Some(FORMAT_FRAME_V1) => decode_frame_message(&message.payload)
                    .map_err(|reason| BridgeError::Nats(format!("bad frame: {reason}")))?
                    .len() as u64,
                Some(FORMAT_RECORDS_V1) => decode_batched(&message.payload)
                    .map_err(|reason| BridgeError::Nats(format!("bad batch: {reason}")))?
                    .len() as u64,
                // The metadata as a client reads it (as the JetStream
                // clients read a delivery's ack subject).
                _ if mode == Mode::Light => {
                    let reply = message.reply.as_ref().map(|reply| reply.as_str());
                    let offset = reply
                        .and_then(|reply| reply.strip_prefix(crate::api::LIGHT_REPLY_PREFIX))
                        .and_then(|rest| rest.split('.').next()?.parse::<u64>().ok());
                    if offset.is_none() {
                        return Err(BridgeError::Nats(format!("no metadata in {reply:?}")));
                    }
                    1
                }
                _ => 1,
            };
        }
    }
    Ok(Rate {
        messages: received,
        seconds: started.elapsed().as_secs_f64(),
        errors: 0,
    })
}

/// The JetStream consumers the replay cases read with, on JetStream and on
/// natswal's JetStream API alike.
#[derive(Debug, Clone, Copy)]
enum ConsumerKind {
    /// async-nats's ordered push consumer (JetStream's default reader; the
    /// peer every replay case is compared with).
    OrderedPush,
    /// async-nats's ordered pull consumer (ephemeral, no acks).
    OrderedPull,
    /// A pull consumer without acks, 500 messages per pull request.
    Pull500,
}

/// Reads `count` records of `stream` with a JetStream consumer of `kind`.
async fn consumer_replay(
    context: &async_nats::jetstream::Context,
    stream: &str,
    count: u64,
    kind: ConsumerKind,
) -> Result<Rate> {
    use async_nats::jetstream::consumer::{pull, push, AckPolicy};
    let stream = context
        .get_stream(stream)
        .await
        .map_err(|error| BridgeError::nats("get the stream", error))?;
    let started = Instant::now();
    let mut messages = match kind {
        ConsumerKind::OrderedPush => stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: context.client().new_inbox(),
                ..Default::default()
            })
            .await
            .map_err(|error| BridgeError::nats("create an ordered push consumer", error))?
            .messages()
            .await
            .map_err(|error| BridgeError::nats("consume", error))?
            .map(|message| message.map_err(|error| error.to_string()))
            .boxed(),
        ConsumerKind::OrderedPull => stream
            .create_consumer(pull::OrderedConfig::default())
            .await
            .map_err(|error| BridgeError::nats("create an ordered pull consumer", error))?
            .messages()
            .await
            .map_err(|error| BridgeError::nats("consume", error))?
            .map(|message| message.map_err(|error| error.to_string()))
            .boxed(),
        ConsumerKind::Pull500 => stream
            .create_consumer(pull::Config {
                ack_policy: AckPolicy::None,
                ..Default::default()
            })
            .await
            .map_err(|error| BridgeError::nats("create a pull consumer", error))?
            .stream()
            .max_messages_per_batch(500)
            .messages()
            .await
            .map_err(|error| BridgeError::nats("consume", error))?
            .map(|message| message.map_err(|error| error.to_string()))
            .boxed(),
    };
    let mut received = 0u64;
    while received < count {
        match tokio::time::timeout(Duration::from_secs(30), messages.next()).await {
            Ok(Some(Ok(_))) => received += 1,
            Ok(Some(Err(error))) => {
                return Err(BridgeError::Nats(format!("{kind:?} consumer: {error}")))
            }
            _ => {
                return Err(BridgeError::Nats(format!(
                    "{kind:?} consumer stalled after {received}"
                )))
            }
        }
    }
    Ok(Rate {
        messages: received,
        seconds: started.elapsed().as_secs_f64(),
        errors: 0,
    })
}

async fn create_jetstream_stream(
    client: &async_nats::Client,
    name: &str,
    subjects: &str,
) -> Result<()> {
    let jetstream = async_nats::jetstream::new(client.clone());
    jetstream
        .create_stream(async_nats::jetstream::stream::Config {
            name: name.to_string(),
            subjects: vec![subjects.to_string()],
            storage: async_nats::jetstream::stream::StorageType::File,
            allow_atomic_publish: true,
            allow_batch_publish: true,
            ..Default::default()
        })
        .await
        .map_err(|error| {
            BridgeError::nats(format!("cannot create JetStream stream {name}"), error)
        })?;
    Ok(())
}

/// Runs the whole benchmark and prints a report.
pub async fn run(args: NatsBenchArgs) -> Result<()> {
    let binary = nats_server_binary(args.nats_server.as_deref())?;
    let version = Command::new(&binary)
        .arg("--version")
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_string())
        .unwrap_or_default();
    let directory = args.dir.join("nats-bench");
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).map_err(|error| {
        BridgeError::io(format!("cannot create {}", directory.display()), error)
    })?;
    let leaf_port = free_port()?;
    let leafnodes = format!("leafnodes {{ listen: \"127.0.0.1:{leaf_port}\" }}\n");
    let (server, url) =
        start_nats_server_on(&binary, &directory, "default", "", &leafnodes, free_port()?)?;
    let leafnode_url = format!("nats://127.0.0.1:{leaf_port}");
    let (_server_always, url_always) =
        start_nats_server(&binary, &directory, "always", " sync_interval: always\n")?;
    let natswal = start_natswal(&directory, &url, &leafnode_url, &args.write_mode)?;
    let noop = spawn_self(
        &[
            "bench",
            "noop-responder",
            "--nats-url",
            &url,
            "--subject",
            "noop.>",
        ],
        "ready",
    )?;
    let noop_wire = spawn_self(
        &[
            "bench",
            "noop-responder",
            "--nats-url",
            &url,
            "--subject",
            "noopwire.>",
            "--wire",
        ],
        "ready",
    )?;
    let clients = vec![connect(&url).await?, connect(&url).await?];
    let clients_always = vec![connect(&url_always).await?, connect(&url_always).await?];
    create_jetstream_stream(&clients[0], "JSDEFAULT", "js.default.>").await?;
    create_jetstream_stream(&clients[0], "JSREPLAY", "js.replay.>").await?;
    create_jetstream_stream(&clients_always[0], "JSALWAYS", "js.always.>").await?;
    let duration = Duration::from_secs_f64(args.seconds);
    let load = (args.publishers, args.in_flight);
    println!("# natswal bench nats");
    println!();
    println!(
        "{version}; natswal write mode {}; {} publishers x {} messages in flight, each with a reply subject; {:.1} s per case; data in {}",
        args.write_mode,
        args.publishers,
        args.in_flight,
        args.seconds,
        directory.display()
    );
    println!();
    println!(
        "{} rounds, every target once per round in turn; medians over the rounds (a ratio is the median of the rounds' ratios). CPU µs/msg: the responding process's user and system CPU time per acked message, natswal or the no-op responder (JetStream's is inside nats-server's).",
        args.rounds
    );
    println!();
    println!("| payload | target | acked msgs/s | MB/s | x no-op ceiling | natswal fsync x this | CPU µs/msg |");
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    let mut ceilings = std::collections::BTreeMap::new();
    const TARGETS: [(&str, &str); 7] = [
        ("NATS core fan-out, 1 subscriber (no acks)", ""),
        ("no-op responder (acks, stores nothing)", "noop.bench"),
        (
            "no-op responder on natswal's ingest client",
            "noopwire.bench",
        ),
        ("natswal, durability fsync", "nw.fsync.bench"),
        ("natswal, durability none", "nw.none.bench"),
        (
            "JetStream R1 file, default (no fsync before ack)",
            "js.default.bench",
        ),
        (
            "JetStream R1 file, sync_interval: always",
            "js.always.bench",
        ),
    ];
    const NOOP: usize = 1;
    const FSYNC: usize = 3;
    for &size in &args.sizes {
        // Per target: each round's rate and responder CPU per message.
        let mut rounds: Vec<Vec<(Rate, f64)>> = (0..TARGETS.len()).map(|_| Vec::new()).collect();
        for _ in 0..args.rounds.max(1) {
            for (index, (_, subject)) in TARGETS.iter().enumerate() {
                let responder = match index {
                    1 => Some(&noop),
                    2 => Some(&noop_wire),
                    3 | 4 => Some(&natswal),
                    _ => None,
                };
                let cpu_before = responder.map_or(f64::NAN, |child| child.cpu_seconds());
                let rate = match index {
                    0 => core_fanout(&url, size, &args, duration).await?,
                    6 => acked_load(&clients_always, subject, size, load, duration).await?,
                    _ => acked_load(&clients, subject, size, load, duration).await?,
                };
                let cpu = responder.map_or(f64::NAN, |child| child.cpu_seconds()) - cpu_before;
                let per_message_us = cpu * 1e6 / (rate.messages.max(1) as f64);
                rounds[index].push((rate, per_message_us));
            }
        }
        let ratio_to = |index: usize, other: usize| {
            median(
                rounds[index]
                    .iter()
                    .zip(&rounds[other])
                    .map(|((rate, _), (base, _))| rate.per_second() / base.per_second().max(1e-9))
                    .collect(),
            )
        };
        let ceiling = median(
            rounds[NOOP]
                .iter()
                .map(|(rate, _)| rate.per_second())
                .collect(),
        );
        ceilings.insert(size, ceiling);
        for (index, (name, _)) in TARGETS.iter().enumerate() {
            let per_second = median(
                rounds[index]
                    .iter()
                    .map(|(rate, _)| rate.per_second())
                    .collect(),
            );
            let errors: u64 = rounds[index].iter().map(|(rate, _)| rate.errors).sum();
            let versus = if name.starts_with("JetStream") {
                format!("{:.2}", ratio_to(FSYNC, index))
            } else {
                "-".to_string()
            };
            let cpu = median(rounds[index].iter().map(|(_, cpu)| *cpu).collect());
            let cpu = if cpu.is_finite() {
                format!("{cpu:.2}")
            } else {
                "-".to_string()
            };
            let errors = if errors > 0 {
                format!(" ({errors} errors)")
            } else {
                String::new()
            };
            println!(
                "| {size} B | {name}{errors} | {per_second:.0} | {:.1} | {:.2} | {versus} | {cpu} |",
                per_second * size as f64 / 1e6,
                ratio_to(index, NOOP),
            );
        }
    }
    if !args.no_batches {
        batch_cases(&args, &clients, &ceilings).await?;
    }
    if args.replay_records > 0 {
        for &size in &args.replay_sizes {
            // 128 B reads the first records of the ingest cases' streams
            // (all of them 128 B or more); other sizes have streams of
            // their own.
            let target = if size == 128 {
                ReplayTarget {
                    ours: "none",
                    ours_subjects: "nw.none",
                    theirs: "JSDEFAULT",
                    theirs_subjects: "js.default",
                }
            } else {
                ReplayTarget {
                    ours: "replay",
                    ours_subjects: "nw.replay",
                    theirs: "JSREPLAY",
                    theirs_subjects: "js.replay",
                }
            };
            replay_table(
                &clients,
                &natswal,
                &server,
                args.replay_records,
                size,
                &target,
            )
            .await?;
        }
    }
    drop(clients);
    drop(clients_always);
    let _ = std::fs::remove_dir_all(&directory);
    Ok(())
}

/// Where one replay table reads: natswal's stream and JetStream's, and
/// the subject prefixes that fill them.
struct ReplayTarget {
    ours: &'static str,
    ours_subjects: &'static str,
    theirs: &'static str,
    theirs_subjects: &'static str,
}

/// One replay table: `count` records of `size` bytes stored in natswal
/// and in JetStream, read by every reader, with CPU per record.
async fn replay_table(
    clients: &[async_nats::Client],
    natswal: &ChildProcess,
    server: &ChildProcess,
    count: u64,
    size: usize,
    target: &ReplayTarget,
) -> Result<()> {
    fill(
        clients,
        &format!("{}.replay", target.ours_subjects),
        count,
        size,
    )
    .await?;
    fill(
        clients,
        &format!("{}.replay", target.theirs_subjects),
        count,
        size,
    )
    .await?;
    // CPU per record of natswal, nats-server and the reader (this
    // process) while a consumer reads.
    let sample = || {
        [
            natswal.cpu_seconds(),
            server.cpu_seconds(),
            process_cpu_seconds(std::process::id()),
        ]
    };
    let per_record = |before: [f64; 3], rate: Rate| {
        let after = sample();
        let messages = rate.messages.max(1) as f64;
        [0, 1, 2].map(|index| (after[index] - before[index]) * 1e6 / messages)
    };
    let mut own = Vec::new();
    for mode in [Mode::Messages, Mode::Light, Mode::Batched, Mode::Frames] {
        let before = sample();
        let rate = natswal_replay(&clients[0], target.ours, count, mode).await?;
        own.push((rate, per_record(before, rate)));
    }
    let theirs = async_nats::jetstream::new(clients[0].clone());
    let before = sample();
    let ordered = consumer_replay(&theirs, target.theirs, count, ConsumerKind::OrderedPush).await?;
    let ordered_cpu = per_record(before, ordered);
    let ours = async_nats::jetstream::with_domain(clients[0].clone(), NATSWAL_DOMAIN);
    let mut consumers = Vec::new();
    for kind in [
        ConsumerKind::OrderedPush,
        ConsumerKind::OrderedPull,
        ConsumerKind::Pull500,
    ] {
        let jetstream = match kind {
            ConsumerKind::OrderedPush => (ordered, ordered_cpu),
            _ => {
                let before = sample();
                let rate = consumer_replay(&theirs, target.theirs, count, kind).await?;
                (rate, per_record(before, rate))
            }
        };
        let before = sample();
        let rate = consumer_replay(&ours, target.ours, count, kind).await?;
        consumers.push((kind, jetstream, (rate, per_record(before, rate))));
    }
    println!();
    println!("## Replay of {count} records of {size} B");
    println!();
    println!("CPU µs/record: user and system CPU time per record read of natswal, of nats-server (JetStream's reads are inside it; natswal's deliveries pass through it) and of the reader.");
    println!();
    println!("| reader | msgs/s | x JetStream ordered push consumer | x the same client on JetStream | CPU µs/record natswal / nats-server / reader |");
    println!("| --- | --- | --- | --- | --- |");
    let row = |name: &str, (rate, cpu): (Rate, [f64; 3]), same: Option<Rate>| {
        let versus_same = same.map_or("-".to_string(), |same| {
            format!("{:.2}", rate.per_second() / same.per_second().max(1e-9))
        });
        println!(
            "| {name} | {:.0} | {:.2} | {versus_same} | {:.2} / {:.2} / {:.2} |",
            rate.per_second(),
            rate.per_second() / ordered.per_second().max(1e-9),
            cpu[0],
            cpu[1],
            cpu[2],
        );
    };
    row(
        "JetStream ordered push consumer",
        (ordered, ordered_cpu),
        None,
    );
    for (kind, jetstream, natswal) in consumers {
        let label = match kind {
            ConsumerKind::OrderedPush => "ordered push consumer (async-nats)",
            ConsumerKind::OrderedPull => "ordered pull consumer (async-nats)",
            ConsumerKind::Pull500 => "pull consumer, batch 500, no acks (async-nats)",
        };
        if !matches!(kind, ConsumerKind::OrderedPush) {
            row(&format!("JetStream {label}"), jetstream, None);
        }
        row(
            &format!("natswal's JetStream API, {label}"),
            natswal,
            Some(jetstream.0),
        );
    }
    for (name, measured) in [
        "natswal replay, one message per record",
        "natswal replay, one message per record, metadata in the reply (light)",
        "natswal replay, batched (records-v1)",
        "natswal replay, stored frames (frame-v1)",
    ]
    .into_iter()
    .zip(own)
    {
        row(name, measured, None);
    }
    Ok(())
}

/// Atomic batch publishers: the first message and the commit are requests,
/// the messages between are published without a reply (as JetStream
/// clients do by default). Counts messages of committed batches.
pub(super) async fn atomic_load(
    clients: &[async_nats::Client],
    subject_prefix: &str,
    batch_size: u64,
    payload_size: usize,
    publishers: usize,
    duration: Duration,
) -> Result<Rate> {
    let payload = Bytes::from(vec![b'a'; payload_size]);
    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for publisher in 0..publishers {
        let client = clients[publisher % clients.len()].clone();
        let stop = Arc::clone(&stop);
        let committed = Arc::clone(&committed);
        let errors = Arc::clone(&errors);
        let payload = payload.clone();
        let subject = format!("{subject_prefix}.{publisher}");
        tasks.push(tokio::spawn(async move {
            let mut number = 0u64;
            while !stop.load(Ordering::Relaxed) {
                number += 1;
                let id = format!("b{publisher}x{number}");
                let mut ok = true;
                for sequence in 1..=batch_size {
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Batch-Id", id.as_str());
                    headers.insert("Nats-Batch-Sequence", sequence.to_string().as_str());
                    let last = sequence == batch_size;
                    if last {
                        headers.insert("Nats-Batch-Commit", "1");
                    }
                    if sequence == 1 || last {
                        let answer = tokio::time::timeout(
                            Duration::from_secs(10),
                            client.request_with_headers(subject.clone(), headers, payload.clone()),
                        )
                        .await;
                        match answer {
                            Ok(Ok(message)) if !memchr_error(&message.payload) => {}
                            _ => {
                                ok = false;
                                break;
                            }
                        }
                    } else if client
                        .publish_with_headers(subject.clone(), headers, payload.clone())
                        .await
                        .is_err()
                    {
                        ok = false;
                        break;
                    }
                }
                if ok {
                    committed.fetch_add(batch_size, Ordering::Relaxed);
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    let messages = committed.load(Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    Ok(Rate {
        messages,
        seconds,
        errors: errors.load(Ordering::Relaxed),
    })
}

/// Numbers fast-ingest runs, for unique batch ids.
static FAST_RUNS: AtomicU64 = AtomicU64::new(0);

/// Fast-ingest publishers (ADR-50): reply subjects carry the control,
/// at most 2 flow acks outstanding; counts messages covered by flow acks.
async fn fast_load(
    clients: &[async_nats::Client],
    subject_prefix: &str,
    flow: u16,
    payload_size: usize,
    publishers: usize,
    duration: Duration,
) -> Result<Rate> {
    let payload = Bytes::from(vec![b'f'; payload_size]);
    let stop = Arc::new(AtomicBool::new(false));
    let acked_total = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for publisher in 0..publishers {
        let client = clients[publisher % clients.len()].clone();
        let stop = Arc::clone(&stop);
        let acked_total = Arc::clone(&acked_total);
        let payload = payload.clone();
        let subject = format!("{subject_prefix}.{publisher}");
        let run = FAST_RUNS.fetch_add(1, Ordering::Relaxed);
        tasks.push(tokio::spawn(async move {
            // A fresh batch id per run: a batch left open by an earlier run
            // must not be continued.
            let inbox = format!("_INBOX.fast{publisher}r{run}x{}", std::process::id());
            let Ok(mut control) = client.subscribe(format!("{inbox}.>")).await else {
                return;
            };
            let _ = client.flush().await;
            let mut sequence = 0u64;
            let mut acked = 0u64;
            let mut effective = flow;
            while !stop.load(Ordering::Relaxed) {
                // Wait while two flow windows are outstanding.
                while sequence >= acked + u64::from(effective) * 2 {
                    match tokio::time::timeout(Duration::from_secs(5), control.next()).await {
                        Ok(Some(message)) => {
                            if let Ok(value) =
                                serde_json::from_slice::<serde_json::Value>(&message.payload)
                            {
                                if value["type"] == "ack" {
                                    acked = acked.max(value["seq"].as_u64().unwrap_or(0));
                                    effective = value["msgs"].as_u64().unwrap_or(1).max(1) as u16;
                                } else if value.get("error").is_some() {
                                    return;
                                }
                            }
                        }
                        _ => return,
                    }
                }
                sequence += 1;
                let operation = if sequence == 1 { 0 } else { 1 };
                let reply = format!("{inbox}.{flow}.ok.{sequence}.{operation}.$FI");
                if client
                    .publish_with_reply(subject.clone(), reply, payload.clone())
                    .await
                    .is_err()
                {
                    return;
                }
            }
            acked_total.fetch_add(acked, Ordering::Relaxed);
            // Close the batch without storing more (EOB), so it does not
            // linger in the target.
            if sequence > 0 {
                let reply = format!("{inbox}.{flow}.ok.{}.3.$FI", sequence + 1);
                let _ = client
                    .publish_with_reply(subject.clone(), reply, Bytes::new())
                    .await;
            }
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let seconds = started.elapsed().as_secs_f64();
    for task in tasks {
        let _ = task.await;
    }
    Ok(Rate {
        messages: acked_total.load(Ordering::Relaxed),
        seconds,
        errors: 0,
    })
}

async fn batch_cases(
    args: &NatsBenchArgs,
    clients: &[async_nats::Client],
    ceilings: &std::collections::BTreeMap<usize, f64>,
) -> Result<()> {
    let duration = Duration::from_secs_f64(args.seconds);
    println!();
    println!(
        "## Atomic batches ({} concurrent batch publishers)",
        args.publishers
    );
    println!();
    println!("| payload | messages per batch | natswal fsync msgs/s | JetStream msgs/s | natswal x JetStream |");
    println!("| --- | --- | --- | --- | --- |");
    for &size in &args.sizes {
        for &batch_size in &args.atomic_sizes {
            let natswal = atomic_load(
                clients,
                "nw.fsync.atomic",
                batch_size,
                size,
                args.publishers,
                duration,
            )
            .await?;
            let jetstream = atomic_load(
                clients,
                "js.default.atomic",
                batch_size,
                size,
                args.publishers,
                duration,
            )
            .await?;
            println!(
                "| {size} B | {batch_size} | {:.0} | {:.0} | {:.1} |",
                natswal.per_second(),
                jetstream.per_second(),
                natswal.per_second() / jetstream.per_second().max(1e-9)
            );
        }
    }
    println!();
    println!(
        "## Fast ingest (flow {}, {} publishers, each its own batch)",
        args.fast_flow, args.publishers
    );
    println!();
    println!("| payload | natswal fsync msgs/s | JetStream msgs/s | natswal x JetStream | natswal x no-op ceiling |");
    println!("| --- | --- | --- | --- | --- |");
    for &size in &args.sizes {
        let natswal = fast_load(
            clients,
            "nw.fsync.fast",
            args.fast_flow,
            size,
            args.publishers,
            duration,
        )
        .await?;
        let jetstream = fast_load(
            clients,
            "js.default.fast",
            args.fast_flow,
            size,
            args.publishers,
            duration,
        )
        .await?;
        let ceiling = ceilings.get(&size).copied().unwrap_or(f64::NAN);
        println!(
            "| {size} B | {:.0} | {:.0} | {:.1} | {:.2} |",
            natswal.per_second(),
            jetstream.per_second(),
            natswal.per_second() / jetstream.per_second().max(1e-9),
            natswal.per_second() / ceiling
        );
    }
    Ok(())
}
