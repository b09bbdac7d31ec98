//! The client: one connection at a time, reconnected for as long as the
//! client lives, with its subscriptions renewed on every new connection.
//!
//! Publishing appends the encoded operation to one output buffer under a
//! mutex and wakes the connection's writer, which sends everything gathered
//! since its last write in one `write`; nothing waits per message. The
//! reader parses whole operations off its read buffer and hands each
//! message to its subscription's bounded queue. A full queue drops the
//! message and counts a slow consumer, as the NATS clients do: a publisher
//! that gets no ack retries.
//!
//! Invariants:
//! - the output buffer holds only whole operations: the writer takes all of
//!   it at once, and bytes taken by a connection that breaks are gone with
//!   it (never half an operation on the next connection);
//! - every `PING` in the output buffer has its waiter queued beside it, and
//!   moves with its bytes into the connection's list of expected `PONG`s,
//!   so a `PONG` always answers the oldest `PING` of its own connection.

use super::connect::{self, ConnectFailure, Credentials, Opened, ServerAddress, TlsOptions};
use super::protocol::{self, Delivery, ServerOp};
use crate::integer_map::IntegerMap;
use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch, Notify};

/// After this long without a byte from the server, a `PING` goes out; a
/// second such interval without one ends the connection.
const READ_IDLE: Duration = Duration::from_secs(30);

/// Pause between rounds of reconnect attempts over the server list.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);

/// Read buffer growth step.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// What a client reports about its connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Connected {
        server: String,
    },
    Disconnected {
        reason: String,
    },
    /// A message for a subscription whose queue was full was dropped.
    SlowConsumer {
        sid: u64,
    },
    /// The server reported an error (`-ERR`) on an open connection.
    ServerError(String),
}

/// Everything a client needs to connect.
#[derive(Clone)]
pub struct Options {
    pub servers: Vec<ServerAddress>,
    pub name: String,
    pub credentials: Credentials,
    pub tls: Option<TlsOptions>,
    /// Messages queued per subscription before new ones are dropped.
    pub subscription_capacity: usize,
    /// Bound of each connection attempt.
    pub connect_timeout: Duration,
    /// Bytes of unsent output kept (while disconnected, or while the socket
    /// is slower than publishers); past it a publish fails.
    pub output_bytes_max: usize,
    pub events: Arc<dyn Fn(Event) + Send + Sync>,
    /// A client connection, or a leafnode connection (natswal's consumer
    /// deliveries: the hub accepts JetStream ack replies only from a
    /// leafnode, and delivers `<ack>@<subject>` replies with the stored
    /// subject).
    pub dialect: protocol::Dialect,
}

/// A message received on a subscription.
#[derive(Debug, Clone)]
pub struct Message {
    /// A valid UTF-8 subject (checked on receipt).
    pub subject: Bytes,
    pub reply: Option<async_nats::Subject>,
    /// The header block exactly as the publisher sent it (empty: none).
    pub headers: Bytes,
    pub payload: Bytes,
}

impl Message {
    /// The subject as text (checked to be UTF-8 on receipt).
    pub fn subject_text(&self) -> &str {
        std::str::from_utf8(&self.subject).unwrap_or_default()
    }
}

/// Why a publish was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    #[error("{size} bytes exceed the server's max_payload of {max_payload}")]
    TooLarge { size: usize, max_payload: usize },
    #[error("the output buffer is full ({bytes} bytes unsent: NATS is unreachable or slower than natswal)")]
    OutputFull { bytes: usize },
    #[error("the client is closed")]
    Closed,
}

struct Route {
    subject: String,
    /// The queue group: the server hands each message to one member.
    queue: Option<String>,
    sender: mpsc::Sender<Message>,
}

#[derive(Default)]
struct Output {
    bytes: BytesMut,
    /// Waiters of the `PING`s in `bytes`, oldest first (`None`: a keepalive).
    pings: Vec<Option<oneshot::Sender<()>>>,
}

/// A leafnode hub's interest (its `LS+` / `LS-`): the subjects someone in
/// the account subscribes to, each with its queue groups (`""` for plain
/// subscriptions). The hub announces a subject once when its first
/// subscription appears and withdraws it when the last goes, and announces
/// everything again on each new connection.
#[derive(Default)]
struct Interest {
    /// The hub's account for this connection (`remote_account`).
    account: Option<String>,
    exact: std::collections::HashMap<String, Vec<String>>,
    /// Subjects with wildcards, parsed once.
    wildcards: Vec<(natswal::SubjectPattern, String)>,
}

impl Interest {
    /// Applies one `LS+`/`LS-` line: `[<account>] <subject> [<queue>
    /// [<weight>]]`. nats-server 2.15 does not name the account its
    /// leafnode is bound to; older hubs did, first, as `remote_account`.
    fn apply(&mut self, added: bool, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let mut words: &[&str] = &text.split_ascii_whitespace().collect::<Vec<_>>();
        if words.len() > 1 && self.account.as_deref() == words.first().copied() {
            words = &words[1..];
        }
        let Some(subject) = words.first().copied() else {
            return;
        };
        let queue = words.get(1).copied().unwrap_or("").to_string();
        if subject.contains(['*', '>']) {
            self.wildcards
                .retain(|(pattern, group)| !(pattern.as_str() == subject && *group == queue));
            if added {
                if let Ok(pattern) = natswal::SubjectPattern::parse(subject) {
                    self.wildcards.push((pattern, queue));
                }
            }
            return;
        }
        let groups = self.exact.entry(subject.to_string()).or_default();
        groups.retain(|group| *group != queue);
        if added {
            groups.push(queue);
        } else if groups.is_empty() {
            self.exact.remove(subject);
        }
    }

    fn covers(&self, subject: &str) -> bool {
        self.exact.contains_key(subject)
            || self
                .wildcards
                .iter()
                .any(|(pattern, _)| pattern.matches(subject.as_bytes()))
    }
}

struct Shared {
    options: Options,
    interest: Mutex<Interest>,
    /// Counts changes of `interest` (watchers re-check what they need).
    interest_changes: watch::Sender<u64>,
    output: Mutex<Output>,
    output_ready: Notify,
    /// Woken after every write to the socket (room in the output buffer).
    output_drained: Notify,
    routes: Mutex<IntegerMap<Route>>,
    sid_last: AtomicU64,
    max_payload: AtomicUsize,
    closed: AtomicBool,
    closing: Notify,
}

/// A NATS client; clones share the connection.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

impl Client {
    /// Connects to the first server that accepts, trying each once. A
    /// refusal of the credentials ends the attempt at once.
    pub async fn connect(options: Options) -> Result<Client, ConnectFailure> {
        assert!(
            !options.servers.is_empty(),
            "validated: at least one server"
        );
        let mut failures = Vec::new();
        let mut opened = None;
        for address in &options.servers {
            match open(&options, address).await {
                Ok(connection) => {
                    opened = Some((connection, describe(address)));
                    break;
                }
                Err(ConnectFailure::Refused(text)) => return Err(ConnectFailure::Refused(text)),
                Err(ConnectFailure::Failed(text)) => failures.push(text),
            }
        }
        let Some((opened, server)) = opened else {
            return Err(ConnectFailure::Failed(failures.join("; ")));
        };
        let shared = Arc::new(Shared {
            options,
            interest: Mutex::new(Interest::default()),
            interest_changes: watch::Sender::new(0),
            output: Mutex::new(Output::default()),
            output_ready: Notify::new(),
            output_drained: Notify::new(),
            routes: Mutex::new(IntegerMap::default()),
            sid_last: AtomicU64::new(0),
            max_payload: AtomicUsize::new(opened.info.max_payload),
            closed: AtomicBool::new(false),
            closing: Notify::new(),
        });
        (shared.options.events)(Event::Connected { server });
        tokio::spawn(drive(Arc::clone(&shared), opened));
        Ok(Client { shared })
    }

    /// Subscribes to one subject; its messages arrive in order.
    pub fn subscribe(&self, subject: &str) -> Subscription {
        self.subscribe_all(std::slice::from_ref(&subject))
    }

    /// Subscribes to several subjects at once, with one queue for all of
    /// them (in the order the server sent them): a stream's subjects.
    pub fn subscribe_all(&self, subjects: &[impl AsRef<str>]) -> Subscription {
        self.subscribe_all_in(subjects, None)
    }

    /// As [`subscribe_all`](Client::subscribe_all), in a queue group when
    /// `queue` is given: each message goes to one of the group's members
    /// (the nodes of a cluster serving the same API).
    pub fn subscribe_all_in(
        &self,
        subjects: &[impl AsRef<str>],
        queue: Option<&str>,
    ) -> Subscription {
        let (sender, receiver) = mpsc::channel(self.shared.options.subscription_capacity.max(1));
        let mut sids = Vec::with_capacity(subjects.len());
        let mut routes = lock(&self.shared.routes);
        let mut output = lock(&self.shared.output);
        for subject in subjects {
            let sid = self.shared.sid_last.fetch_add(1, Ordering::Relaxed) + 1;
            let route = Route {
                subject: subject.as_ref().to_string(),
                queue: queue.map(str::to_string),
                sender: sender.clone(),
            };
            protocol::encode_subscribe(
                &mut output.bytes,
                &route.subject,
                route.queue.as_deref(),
                sid,
            );
            routes.insert(sid, route);
            sids.push(sid);
        }
        drop(output);
        drop(routes);
        self.shared.output_ready.notify_one();
        Subscription {
            sids,
            receiver,
            client: self.clone(),
        }
    }

    /// Queues a publish (no headers) for the writer.
    pub fn publish(&self, subject: &str, payload: &[u8]) -> Result<(), PublishError> {
        self.publish_with_headers(subject, &[], payload)
    }

    /// Queues a publish with a header block (`NATS/1.0\r\n...\r\n\r\n`).
    pub fn publish_with_headers(
        &self,
        subject: &str,
        headers: &[u8],
        payload: &[u8],
    ) -> Result<(), PublishError> {
        self.publish_with_reply(subject, "", headers, payload)
    }

    /// Queues a publish with a reply subject (none if `reply` is empty).
    pub fn publish_with_reply(
        &self,
        subject: &str,
        reply: &str,
        headers: &[u8],
        payload: &[u8],
    ) -> Result<(), PublishError> {
        let size = headers.len() + payload.len();
        let max_payload = self.shared.max_payload.load(Ordering::Relaxed);
        if max_payload > 0 && size > max_payload {
            return Err(PublishError::TooLarge { size, max_payload });
        }
        self.publish_each([(subject, reply, headers, payload)])
    }

    /// Queues several publishes (subject, reply, headers, payload) under
    /// one lock with one wake of the writer: a sender of many small
    /// messages (consumer deliveries). The output bound is checked once,
    /// before them: callers bound what they pass. A message larger than
    /// the server's `max_payload` is refused alone.
    pub fn publish_each<'a>(
        &self,
        messages: impl IntoIterator<Item = (&'a str, &'a str, &'a [u8], &'a [u8])>,
    ) -> Result<(), PublishError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(PublishError::Closed);
        }
        let max_payload = self.shared.max_payload.load(Ordering::Relaxed);
        let mut output = lock(&self.shared.output);
        if output.bytes.len() >= self.shared.options.output_bytes_max {
            return Err(PublishError::OutputFull {
                bytes: output.bytes.len(),
            });
        }
        for (subject, reply, headers, payload) in messages {
            let size = headers.len() + payload.len();
            if max_payload > 0 && size > max_payload {
                tracing::warn!(
                    subject,
                    size,
                    max_payload,
                    "a message exceeds the server's max_payload and is not sent"
                );
                continue;
            }
            protocol::encode_message(
                &mut output.bytes,
                self.shared.options.dialect,
                subject.as_bytes(),
                reply.as_bytes(),
                headers,
                payload,
            );
        }
        drop(output);
        self.shared.output_ready.notify_one();
        Ok(())
    }

    /// Like [`publish_with_reply`](Client::publish_with_reply), but waits
    /// for room while the output buffer is full instead of failing.
    pub async fn publish_with_reply_when_room(
        &self,
        subject: &str,
        reply: &str,
        headers: &[u8],
        payload: &[u8],
    ) -> Result<(), PublishError> {
        loop {
            let drained = self.shared.output_drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            match self.publish_with_reply(subject, reply, headers, payload) {
                Err(PublishError::OutputFull { .. }) => drained.await,
                other => return other,
            }
        }
    }

    /// Like [`publish_with_headers`](Client::publish_with_headers), but
    /// waits for room while the output buffer is full instead of failing:
    /// for senders that must not drop (replay), paced by the socket.
    pub async fn publish_when_room(
        &self,
        subject: &str,
        headers: &[u8],
        payload: &[u8],
    ) -> Result<(), PublishError> {
        self.publish_with_reply_when_room(subject, "", headers, payload)
            .await
    }

    /// Whether anyone subscribes to `subject`, as a leafnode hub reported
    /// it. A client connection learns nothing of others' interest: there
    /// it is always true.
    pub fn has_interest(&self, subject: &str) -> bool {
        self.shared.options.dialect == protocol::Dialect::Client
            || lock(&self.shared.interest).covers(subject)
    }

    /// How many changes of interest the hub reported so far.
    pub fn interest_generation(&self) -> u64 {
        *self.shared.interest_changes.borrow()
    }

    /// Changes each time the hub reports a change of interest.
    pub fn interest_changes(&self) -> watch::Receiver<u64> {
        self.shared.interest_changes.subscribe()
    }

    /// Waits until the output buffer has room (a sender that must not
    /// drop, paced by the socket).
    pub async fn room(&self) {
        loop {
            if lock(&self.shared.output).bytes.len() < self.shared.options.output_bytes_max {
                return;
            }
            let drained = self.shared.output_drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if lock(&self.shared.output).bytes.len() < self.shared.options.output_bytes_max {
                return;
            }
            drained.await;
        }
    }

    /// The largest message the server accepts (headers included), from
    /// its `INFO`.
    pub fn max_payload(&self) -> usize {
        self.shared.max_payload.load(Ordering::Relaxed)
    }

    /// Waits until the server has processed everything sent before (a
    /// `PING` answered by its `PONG`). False when the connection broke
    /// first or `timeout` passed; `None` waits as long as it takes.
    pub async fn round_trip(&self, timeout: Option<Duration>) -> bool {
        let (sender, receiver) = oneshot::channel();
        self.write(|output| {
            output.bytes.extend_from_slice(protocol::PING);
            output.pings.push(Some(sender));
        });
        match timeout {
            Some(timeout) => matches!(tokio::time::timeout(timeout, receiver).await, Ok(Ok(()))),
            None => receiver.await.is_ok(),
        }
    }

    /// Stops the subscriptions: `UNSUB`s them, waits until the server has
    /// processed that (every message sent before is then received), and
    /// ends their streams after what they already hold.
    pub async fn drain(&self, sids: &[u64]) -> bool {
        self.write(|output| {
            for sid in sids {
                protocol::encode_unsubscribe(&mut output.bytes, *sid);
            }
        });
        let confirmed = self.round_trip(None).await;
        let mut routes = lock(&self.shared.routes);
        for sid in sids {
            routes.remove(sid);
        }
        confirmed
    }

    /// Ends the connection and stops reconnecting.
    pub fn close(&self) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.closing.notify_waiters();
        lock(&self.shared.routes).clear();
    }

    fn write(&self, append: impl FnOnce(&mut Output)) {
        append(&mut lock(&self.shared.output));
        self.shared.output_ready.notify_one();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// One attempt at `address` with the client's name, credentials and TLS.
async fn open(options: &Options, address: &ServerAddress) -> Result<Opened, ConnectFailure> {
    connect::open(
        address,
        &options.name,
        &options.credentials,
        options.tls.as_ref(),
        options.connect_timeout,
        options.dialect,
    )
    .await
}

fn describe(address: &ServerAddress) -> String {
    format!("{}:{}", address.host, address.port)
}

/// The messages of one or more subscriptions, as a stream or in chunks;
/// dropping it unsubscribes.
pub struct Subscription {
    sids: Vec<u64>,
    receiver: mpsc::Receiver<Message>,
    client: Client,
}

impl Subscription {
    pub fn sids(&self) -> &[u64] {
        &self.sids
    }

    /// Waits for a message, then takes it and every message already
    /// queued behind it, up to `limit`. `None` once the subscription ended
    /// (drained or its client closed) and nothing is left. Cancel-safe.
    pub async fn next_chunk(&mut self, limit: usize) -> Option<Vec<Message>> {
        let mut chunk = Vec::with_capacity(limit.min(self.receiver.len().max(1)));
        match self.receiver.recv_many(&mut chunk, limit).await {
            0 => None,
            _ => Some(chunk),
        }
    }
}

impl futures_util::Stream for Subscription {
    type Item = Message;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Message>> {
        self.get_mut().receiver.poll_recv(context)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut routes = lock(&self.client.shared.routes);
        let removed: Vec<u64> = self
            .sids
            .iter()
            .copied()
            .filter(|sid| routes.remove(sid).is_some())
            .collect();
        drop(routes);
        if !removed.is_empty() && !self.client.shared.closed.load(Ordering::Acquire) {
            self.client.write(|output| {
                for sid in removed {
                    protocol::encode_unsubscribe(&mut output.bytes, sid);
                }
            });
        }
    }
}

/// Runs connections until the client is closed: each until it breaks,
/// then the next one, with the subscriptions renewed.
async fn drive(shared: Arc<Shared>, mut opened: Opened) {
    loop {
        let reason = tokio::select! {
            reason = serve(&shared, opened) => reason,
            () = shared.closing.notified() => return,
        };
        if shared.closed.load(Ordering::Acquire) {
            return;
        }
        (shared.options.events)(Event::Disconnected { reason });
        let Some((next, server)) = reconnect(&shared).await else {
            return;
        };
        opened = next;
        (shared.options.events)(Event::Connected { server });
    }
}

/// Tries the servers in turn until one accepts or the client is closed.
async fn reconnect(shared: &Shared) -> Option<(Opened, String)> {
    let options = &shared.options;
    loop {
        for address in &options.servers {
            if shared.closed.load(Ordering::Acquire) {
                return None;
            }
            match open(options, address).await {
                Ok(opened) => return Some((opened, describe(address))),
                Err(failure) => {
                    tracing::debug!(%failure, "reconnect attempt failed");
                }
            }
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

/// One connection: renews the subscriptions, then reads and writes until
/// it breaks. Returns why it broke.
async fn serve(shared: &Arc<Shared>, opened: Opened) -> String {
    shared
        .max_payload
        .store(opened.info.max_payload, Ordering::Relaxed);
    // The hub announces all of its interest again on this connection.
    *lock(&shared.interest) = Interest {
        account: opened.info.remote_account.clone(),
        ..Interest::default()
    };
    shared.interest_changes.send_modify(|changes| *changes += 1);
    let (mut reader, mut writer) = tokio::io::split(opened.transport);
    let mut subscriptions = BytesMut::new();
    for (sid, route) in lock(&shared.routes).iter() {
        protocol::encode_subscribe(
            &mut subscriptions,
            &route.subject,
            route.queue.as_deref(),
            *sid,
        );
    }
    if let Err(error) = writer.write_all(&subscriptions).await {
        return format!("cannot renew subscriptions: {error}");
    }
    let expected: Mutex<VecDeque<Option<oneshot::Sender<()>>>> = Mutex::new(VecDeque::new());
    let write = async {
        let mut spare = BytesMut::new();
        loop {
            let taken = {
                let mut output = lock(&shared.output);
                let taken = !output.bytes.is_empty();
                if taken {
                    std::mem::swap(&mut output.bytes, &mut spare);
                    lock(&expected).extend(output.pings.drain(..));
                }
                taken
            };
            if !taken {
                shared.output_ready.notified().await;
                continue;
            }
            if let Err(error) = writer.write_all(&spare).await {
                return format!("cannot write: {error}");
            }
            if let Err(error) = writer.flush().await {
                return format!("cannot write: {error}");
            }
            spare.clear();
            shared.output_drained.notify_waiters();
        }
    };
    let read = read_loop(shared, &mut reader, opened.leftover, &expected);
    tokio::select! {
        reason = write => reason,
        reason = read => reason,
    }
    // Waiters of PINGs this connection took are dropped with `expected`:
    // their round trips report failure.
}

async fn read_loop(
    shared: &Arc<Shared>,
    reader: &mut tokio::io::ReadHalf<Box<dyn connect::Transport>>,
    mut buffer: BytesMut,
    expected: &Mutex<VecDeque<Option<oneshot::Sender<()>>>>,
) -> String {
    let mut keepalive_sent = false;
    loop {
        loop {
            match protocol::parse(&mut buffer) {
                Ok(Some(op)) => {
                    if let Err(reason) = handle(shared, op, expected) {
                        return reason;
                    }
                }
                Ok(None) => break,
                Err(error) => return error.to_string(),
            }
        }
        if buffer.capacity() - buffer.len() < READ_CHUNK_BYTES / 4 {
            buffer.reserve(READ_CHUNK_BYTES);
        }
        match tokio::time::timeout(READ_IDLE, reader.read_buf(&mut buffer)).await {
            Ok(Ok(0)) => return "the server closed the connection".to_string(),
            Ok(Ok(_)) => keepalive_sent = false,
            Ok(Err(error)) => return format!("cannot read: {error}"),
            Err(_) if keepalive_sent => {
                return format!(
                    "no answer from the server in {}",
                    humantime::format_duration(2 * READ_IDLE)
                )
            }
            Err(_) => {
                keepalive_sent = true;
                let mut output = lock(&shared.output);
                output.bytes.extend_from_slice(protocol::PING);
                output.pings.push(None);
                drop(output);
                shared.output_ready.notify_one();
            }
        }
    }
}

fn handle(
    shared: &Shared,
    op: ServerOp,
    expected: &Mutex<VecDeque<Option<oneshot::Sender<()>>>>,
) -> Result<(), String> {
    match op {
        ServerOp::Message(delivery) => deliver(shared, delivery),
        ServerOp::Ping => {
            lock(&shared.output).bytes.extend_from_slice(protocol::PONG);
            shared.output_ready.notify_one();
        }
        ServerOp::Pong => {
            if let Some(Some(waiter)) = lock(expected).pop_front() {
                let _ = waiter.send(());
            }
        }
        ServerOp::Interest { added, subject } => {
            lock(&shared.interest).apply(added, &subject);
            shared.interest_changes.send_modify(|changes| *changes += 1);
        }
        ServerOp::Ok => {}
        ServerOp::Info(bytes) => {
            if let Ok(info) = serde_json::from_slice::<connect::ServerInfo>(&bytes) {
                if info.max_payload > 0 {
                    shared
                        .max_payload
                        .store(info.max_payload, Ordering::Relaxed);
                }
            }
        }
        ServerOp::Err(text) => (shared.options.events)(Event::ServerError(text)),
    }
    Ok(())
}

fn deliver(shared: &Shared, delivery: Delivery) {
    let subject_valid = std::str::from_utf8(&delivery.subject).is_ok();
    let reply = delivery
        .reply
        .map(async_nats::Subject::from_utf8)
        .transpose();
    let (true, Ok(reply)) = (subject_valid, reply) else {
        tracing::warn!(
            sid = delivery.sid,
            "dropped a message whose subject is not UTF-8"
        );
        return;
    };
    let message = Message {
        subject: delivery.subject,
        reply,
        headers: delivery.headers,
        payload: delivery.payload,
    };
    let routes = lock(&shared.routes);
    let Some(route) = routes.get(&delivery.sid) else {
        // Unsubscribed: what was in flight is not wanted.
        return;
    };
    if let Err(mpsc::error::TrySendError::Full(_)) = route.sender.try_send(message) {
        drop(routes);
        (shared.options.events)(Event::SlowConsumer { sid: delivery.sid });
    }
}

#[cfg(test)]
mod tests {
    //! Against a real nats-server: what ingest relies on.

    use super::*;
    use crate::wire::test_support::NatsServer;

    type Events = tokio::sync::mpsc::UnboundedReceiver<Event>;

    fn options(server: &NatsServer, subscription_capacity: usize) -> (Options, Events) {
        let (sender, events) = tokio::sync::mpsc::unbounded_channel();
        let options = Options {
            servers: vec![ServerAddress::parse(&server.url()).unwrap()],
            name: "wire-test".to_string(),
            credentials: Credentials::default(),
            tls: None,
            subscription_capacity,
            connect_timeout: Duration::from_secs(5),
            output_bytes_max: 1024 * 1024,
            dialect: protocol::Dialect::Client,
            events: Arc::new(move |event| {
                let _ = sender.send(event);
            }),
        };
        (options, events)
    }

    async fn client(server: &NatsServer, subscription_capacity: usize) -> (Client, Events) {
        let (options, events) = options(server, subscription_capacity);
        (Client::connect(options).await.expect("connects"), events)
    }

    async fn next_event(events: &mut Events, wanted: fn(&Event) -> bool) -> Event {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let event = tokio::time::timeout_at(deadline, events.recv())
                .await
                .expect("the event in time")
                .expect("events continue");
            if wanted(&event) {
                return event;
            }
        }
    }

    async fn receive(subscription: &mut Subscription, count: usize) -> Vec<Message> {
        let mut received = Vec::new();
        while received.len() < count {
            let chunk = tokio::time::timeout(Duration::from_secs(10), subscription.next_chunk(64))
                .await
                .expect("messages in time")
                .expect("subscription open");
            received.extend(chunk);
        }
        received
    }

    #[tokio::test]
    async fn messages_arrive_with_their_wire_bytes_on_one_queue_for_all_subjects() {
        let server = NatsServer::start();
        let (receiver, _) = client(&server, 1024).await;
        let (sender, _) = client(&server, 1024).await;
        let mut subscription = receiver.subscribe_all(&["orders.>", "audit"]);
        assert!(receiver.round_trip(Some(Duration::from_secs(5))).await);
        let headers = b"NATS/1.0\r\nZ: 1\r\nA: 2\r\nZ: 3\r\n\r\n";
        sender
            .publish_with_headers("orders.eu", headers, b"first")
            .unwrap();
        sender.publish("audit", b"second").unwrap();
        sender.publish("elsewhere", b"not subscribed").unwrap();
        assert!(sender.round_trip(Some(Duration::from_secs(5))).await);
        let received = receive(&mut subscription, 2).await;
        assert_eq!(&received[0].subject[..], b"orders.eu");
        assert_eq!(&received[0].headers[..], headers, "byte for byte");
        assert_eq!(&received[0].payload[..], b"first");
        assert_eq!(&received[1].subject[..], b"audit");
        assert!(received[1].headers.is_empty());
        assert_eq!(&received[1].payload[..], b"second");
    }

    #[tokio::test]
    async fn drain_ends_a_subscription_after_everything_sent_before() {
        let server = NatsServer::start();
        let (receiver, _) = client(&server, 4096).await;
        let (sender, _) = client(&server, 16).await;
        let mut subscription = receiver.subscribe("drained");
        assert!(receiver.round_trip(Some(Duration::from_secs(5))).await);
        for index in 0..1000u32 {
            sender.publish("drained", &index.to_be_bytes()).unwrap();
        }
        assert!(sender.round_trip(Some(Duration::from_secs(5))).await);
        assert!(receiver.drain(subscription.sids()).await);
        let mut received = Vec::new();
        while let Some(chunk) = subscription.next_chunk(100).await {
            received.extend(chunk);
        }
        let indexes: Vec<u32> = received
            .iter()
            .map(|message| u32::from_be_bytes(message.payload[..].try_into().unwrap()))
            .collect();
        assert_eq!(indexes, (0..1000).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_full_queue_drops_new_messages_and_reports_each() {
        let server = NatsServer::start();
        let (receiver, mut events) = client(&server, 10).await;
        let (sender, _) = client(&server, 16).await;
        let mut subscription = receiver.subscribe("slow");
        assert!(receiver.round_trip(Some(Duration::from_secs(5))).await);
        for index in 0..100u32 {
            sender.publish("slow", &index.to_be_bytes()).unwrap();
        }
        assert!(sender.round_trip(Some(Duration::from_secs(5))).await);
        // The reader got all 100 once its own round trip returns.
        assert!(receiver.round_trip(Some(Duration::from_secs(5))).await);
        let mut dropped = 0;
        while let Ok(event) = events.try_recv() {
            dropped += usize::from(matches!(event, Event::SlowConsumer { .. }));
        }
        assert_eq!(dropped, 90);
        let kept = receive(&mut subscription, 10).await;
        assert_eq!(
            u32::from_be_bytes(kept[9].payload[..].try_into().unwrap()),
            9,
            "the first ten are kept"
        );
    }

    #[tokio::test]
    async fn after_a_server_restart_subscriptions_are_renewed_and_output_is_bounded() {
        let mut server = NatsServer::start();
        let (receiver, mut events) = client(&server, 1024).await;
        let mut subscription = receiver.subscribe("renewed");
        assert!(receiver.round_trip(Some(Duration::from_secs(5))).await);
        server.stop();
        next_event(&mut events, |event| {
            matches!(event, Event::Disconnected { .. })
        })
        .await;
        // While the server is away, output waits in the bounded buffer.
        let full = loop {
            match receiver.publish("away", &[0u8; 4096]) {
                Ok(()) => continue,
                Err(error) => break error,
            }
        };
        assert!(matches!(full, PublishError::OutputFull { .. }), "{full}");
        assert!(
            !receiver.round_trip(Some(Duration::from_millis(200))).await,
            "no server, no PONG"
        );
        server.start_again();
        next_event(&mut events, |event| {
            matches!(event, Event::Connected { .. })
        })
        .await;
        assert!(receiver.round_trip(Some(Duration::from_secs(5))).await);
        let (sender, _) = client(&server, 16).await;
        sender.publish("renewed", b"after").unwrap();
        assert!(sender.round_trip(Some(Duration::from_secs(5))).await);
        let received = receive(&mut subscription, 1).await;
        assert_eq!(&received[0].payload[..], b"after");
    }

    #[tokio::test]
    async fn wrong_credentials_are_refused_by_name() {
        let server = NatsServer::start_with_config(Some(
            "authorization {\n user: natswal\n password: right\n}\n".to_string(),
        ));
        let (mut options, _) = options(&server, 16);
        options.credentials.user = Some("natswal".to_string());
        options.credentials.password = Some("wrong".to_string());
        let refused = Client::connect(options.clone())
            .await
            .err()
            .expect("refused");
        assert!(matches!(refused, ConnectFailure::Refused(_)), "{refused}");
        assert!(
            refused.to_string().contains("authorization violation"),
            "{refused}"
        );
        options.credentials.password = Some("right".to_string());
        let client = Client::connect(options).await.expect("accepted");
        assert!(client.round_trip(Some(Duration::from_secs(5))).await);
    }
}

#[cfg(test)]
mod interest_tests {
    //! The hub's interest as natswal's push consumers see it.

    use super::*;
    use crate::wire::test_support::{free_port, NatsServer};

    #[test]
    fn interest_lines_with_or_without_an_account_and_queues() {
        let mut interest = Interest {
            account: Some("$G".to_string()),
            ..Interest::default()
        };
        interest.apply(true, b"late.inbox");
        interest.apply(true, b"$G other.inbox");
        interest.apply(true, b"work.* workers 1");
        interest.apply(true, b"$G work.* pool 2");
        assert!(interest.covers("late.inbox") && interest.covers("other.inbox"));
        assert!(interest.covers("work.x") && !interest.covers("work.x.y"));
        interest.apply(false, b"work.* workers");
        assert!(interest.covers("work.x"), "the other group still listens");
        interest.apply(false, b"$G work.* pool");
        assert!(!interest.covers("work.x"));
        interest.apply(false, b"late.inbox");
        assert!(!interest.covers("late.inbox") && interest.covers("other.inbox"));
        interest.apply(true, b"");
        interest.apply(true, b"not a valid *> pattern line here");
    }

    #[tokio::test]
    async fn a_leafnode_connection_learns_who_subscribes() {
        let port = free_port();
        let server = NatsServer::start_with_config(Some(format!(
            "leafnodes {{ listen: \"127.0.0.1:{port}\" }}\n"
        )));
        let leaf = Client::connect(Options {
            servers: vec![ServerAddress::parse(&format!("nats://127.0.0.1:{port}")).unwrap()],
            name: "interest-test".to_string(),
            credentials: Credentials::default(),
            tls: None,
            subscription_capacity: 16,
            connect_timeout: Duration::from_secs(5),
            output_bytes_max: 1024 * 1024,
            dialect: protocol::Dialect::Leaf,
            events: Arc::new(|_| {}),
        })
        .await
        .expect("leafnode connects");
        let changes = leaf.interest_changes();
        let wait_for = |wanted: bool| {
            let leaf = leaf.clone();
            let mut changes = changes.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(10), async {
                    while leaf.has_interest("deliver.here") != wanted {
                        changes.changed().await.expect("client alive");
                    }
                })
                .await
                .expect("interest reported in time");
            }
        };
        assert!(!leaf.has_interest("deliver.here"));
        let subscriber = async_nats::connect(server.url()).await.unwrap();
        let subscription = subscriber.subscribe("deliver.here").await.unwrap();
        subscriber.flush().await.unwrap();
        wait_for(true).await;
        drop(subscription);
        subscriber.flush().await.unwrap();
        wait_for(false).await;
        let wildcard = subscriber.subscribe("deliver.*").await.unwrap();
        subscriber.flush().await.unwrap();
        wait_for(true).await;
        drop(wildcard);
        wait_for(false).await;
    }
}
