//! Configuration of `natswal serve`: a TOML file (documented example in
//! deploy/natswal.toml), overridden by `NATSWAL_*` environment variables,
//! overridden by command-line flags. Validation names the offending key.

use crate::error::{BridgeError, Result};
use natswal::{Durability, RetentionPolicy, StreamConfig, SubjectPattern};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default API subject prefix (replay, status).
pub const API_PREFIX_DEFAULT: &str = "$NWAL";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where streams are stored: `<data_dir>/streams/<name>`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub nats: NatsConfig,
    #[serde(default)]
    pub http: HttpConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub jetstream: JetStreamConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Encryption keys, by id (`[[keys]]`): read from files or environment
    /// variables, never written in this file.
    #[serde(default)]
    pub keys: Vec<KeySource>,
    /// Who may replay what and ask for status (`[[access]]`); none: open.
    #[serde(default)]
    pub access: Vec<AccessRule>,
    #[serde(default)]
    pub audit: AuditConfig,
    /// This node's place in a natswal cluster (`[cluster]`): needed by
    /// streams with `replicas` above 1.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    #[serde(default = "default_streams")]
    pub streams: Vec<StreamSection>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URLs; the client fails over between them.
    #[serde(default = "default_servers")]
    pub servers: Vec<String>,
    #[serde(default = "default_client_name")]
    pub name: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// File holding an nkey seed (`SU...`).
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (JWT and nkey seed).
    pub creds_file: Option<PathBuf>,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Messages buffered per stream (all of its subjects) before new ones
    /// are dropped for a slow consumer (every drop is counted and logged).
    #[serde(default = "default_subscription_capacity")]
    pub subscription_capacity: usize,
    /// How long to keep trying the first connection.
    #[serde(default = "default_connect_timeout", with = "duration_text")]
    pub connect_timeout: Duration,
    /// How long a graceful shutdown waits for NATS (draining subscriptions,
    /// sending acks) before it gives up on the acks it could not send.
    /// Syncing what was accepted is never cut short.
    #[serde(default = "default_shutdown_timeout", with = "duration_text")]
    pub shutdown_timeout: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA that signed the server certificate.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for servers that verify clients.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Refuse to talk to a server without TLS.
    #[serde(default = "default_true")]
    pub required: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of `/metrics`, `/healthz`, `/readyz`; empty disables HTTP.
    #[serde(default = "default_http_listen")]
    pub listen: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// Prefix of natswal's own subjects: `<prefix>.REPLAY.<stream>`, `<prefix>.STATUS`.
    #[serde(default = "default_api_prefix")]
    pub prefix: String,
    /// Replay requests served at once (long polls included); more get
    /// `503 Too Many Replays` at once, so memory stays bounded.
    #[serde(default = "default_replays_max")]
    pub replays_max: usize,
}

/// natswal's JetStream API (`$JS.API.>`, docs/PROTOCOL.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JetStreamConfig {
    /// Serve the JetStream API. natswal still stays off when another
    /// JetStream answers in the same account and domain.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Serve `$JS.<domain>.API.>` instead of `$JS.API.>` (clients select
    /// it with their JetStream domain option).
    #[serde(default)]
    pub domain: Option<String>,
    /// The NATS server's leafnode port (`nats://host:7422`, with `[nats]`'s
    /// credentials and TLS), for consumer deliveries: JetStream clients
    /// then see each message's stored subject and its ack metadata.
    #[serde(default)]
    pub leafnode_url: Option<String>,
}

impl Default for JetStreamConfig {
    fn default() -> Self {
        JetStreamConfig {
            enabled: true,
            domain: None,
            leafnode_url: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `pwrite` (default) or `mmap`.
    #[serde(default = "default_write_mode")]
    pub write_mode: String,
    /// Sealed segment files kept open at once, across all streams.
    #[serde(default = "default_open_segments_max")]
    pub open_segments_max: usize,
    /// Data files (segments of every kind) open at once across all
    /// streams; idle ones are closed and reopened on demand.
    #[serde(default = "default_open_files_max")]
    pub open_files_max: usize,
    /// Threads that run the write and sync work of all streams; 0 means
    /// two per core (at most 64).
    #[serde(default)]
    pub io_threads: usize,
    /// Streams that wait for a sync at once share one sync of the file
    /// system (`syncfs`); false syncs each stream's files on its own.
    #[serde(default = "default_group_sync")]
    pub group_sync: bool,
}

/// Where a key comes from (`[[keys]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySource {
    pub id: u32,
    /// A file holding 64 hex digits.
    pub file: Option<PathBuf>,
    /// An environment variable holding 64 hex digits.
    pub env: Option<String>,
}

/// One `[[access]]` rule: requests whose reply subject starts with one of
/// `reply_prefixes` (NATS permissions decide who may subscribe there, so
/// the prefix identifies the user) may replay subjects matching `replay`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessRule {
    pub name: String,
    pub reply_prefixes: Vec<String>,
    /// Subject patterns this identity may replay.
    #[serde(default)]
    pub replay: Vec<String>,
    /// May ask for `<prefix>.STATUS`.
    #[serde(default)]
    pub status: bool,
}

/// A natswal cluster (`[cluster]`): this node and its peers. Node ids are
/// never reused: a node whose data was wiped joins under a new id.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's id, 1 to 65535, unique in the cluster.
    pub node_id: u64,
    /// Where this node serves replication (`host:port`); peers dial it.
    pub listen: String,
    /// The address peers dial to reach this node, if not `listen` (a
    /// wildcard `listen` like `0.0.0.0:7422` needs one).
    pub advertise: Option<String>,
    /// The other nodes (`[[cluster.peers]]`).
    #[serde(default)]
    pub peers: Vec<PeerConfig>,
    /// Mutual TLS between replicas (`[cluster.tls]`): every node presents
    /// its certificate and requires the peer's, signed by `ca_file`.
    pub tls: Option<ClusterTlsConfig>,
    /// How long a proposal may wait to be committed before the publisher
    /// gets an error (a deposed or cut-off leader's pending messages).
    #[serde(default = "default_commit_timeout", with = "duration_text")]
    pub commit_timeout: Duration,
    /// Raft entries applied between two snapshots of a replicated stream
    /// (a snapshot is a manifest of sealed segments).
    #[serde(default = "default_snapshot_entries")]
    pub snapshot_entries: u64,
    /// Raft entries kept behind a snapshot: a follower further behind
    /// catches up by receiving the leader's sealed segment files.
    #[serde(default = "default_snapshot_entries")]
    pub snapshot_kept_entries: u64,
    /// Bytes per second each replicated stream's background scrub re-reads
    /// its sealed segments at, checking their CRCs (0: no scrub).
    #[serde(default = "default_scrub_bytes_per_second", with = "size_text")]
    pub scrub_bytes_per_second: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub id: u64,
    /// `host:port` of the peer's `cluster.listen` (or `advertise`).
    pub address: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTlsConfig {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

fn default_scrub_bytes_per_second() -> u64 {
    4 << 20
}

fn default_snapshot_entries() -> u64 {
    natswal_replication::SnapshotSettings::default().entries_between
}

fn default_commit_timeout() -> Duration {
    Duration::from_secs(5)
}

impl ClusterConfig {
    /// The address peers reach this node at.
    pub fn advertised(&self) -> &str {
        self.advertise.as_deref().unwrap_or(&self.listen)
    }

    fn validate(&self) -> Result<()> {
        let node_ids = 1..=u64::from(u16::MAX);
        if !node_ids.contains(&self.node_id) {
            return Err(invalid(
                "cluster.node_id",
                format!("{} is not between 1 and 65535", self.node_id),
            ));
        }
        parse_host_port(&self.listen).map_err(|reason| invalid("cluster.listen", reason))?;
        let mut ids = std::collections::BTreeSet::from([self.node_id]);
        for (index, peer) in self.peers.iter().enumerate() {
            let key = format!("cluster.peers[{index}]");
            if !node_ids.contains(&peer.id) {
                return Err(invalid(
                    format!("{key}.id"),
                    format!("{} is not between 1 and 65535", peer.id),
                ));
            }
            if !ids.insert(peer.id) {
                return Err(invalid(
                    format!("{key}.id"),
                    format!(
                        "node id {} is used twice (this node's id or another peer's)",
                        peer.id
                    ),
                ));
            }
            parse_host_port(&peer.address)
                .map_err(|reason| invalid(format!("{key}.address"), reason))?;
        }
        if let Some(tls) = &self.tls {
            for (key, path) in [
                ("ca_file", &tls.ca_file),
                ("cert_file", &tls.cert_file),
                ("key_file", &tls.key_file),
            ] {
                if !path.is_file() {
                    return Err(invalid(
                        format!("cluster.tls.{key}"),
                        format!("{} is not a readable file", path.display()),
                    ));
                }
            }
        }
        if self.commit_timeout.is_zero() {
            return Err(invalid("cluster.commit_timeout", "must be longer than 0"));
        }
        if self.snapshot_entries == 0 {
            return Err(invalid(
                "cluster.snapshot_entries",
                "must be at least 1 (entries between two snapshots)",
            ));
        }
        Ok(())
    }

    /// Every node of the cluster: id and address, this node included.
    pub fn members(&self) -> std::collections::BTreeMap<u64, String> {
        let mut members: std::collections::BTreeMap<u64, String> = self
            .peers
            .iter()
            .map(|peer| (peer.id, peer.address.clone()))
            .collect();
        members.insert(self.node_id, self.advertised().to_string());
        members
    }
}

fn parse_host_port(address: &str) -> std::result::Result<(), String> {
    match address.rsplit_once(':') {
        Some((host, port))
            if !host.is_empty() && port.parse::<u16>().is_ok_and(|port| port > 0) =>
        {
            Ok(())
        }
        _ => Err(format!("'{address}' is not host:port")),
    }
}

/// The audit log (`[audit]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// JSON lines with a CRC each; relative paths are under data_dir.
    #[serde(default = "default_audit_file")]
    pub file: PathBuf,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            file: default_audit_file(),
        }
    }
}

fn default_audit_file() -> PathBuf {
    PathBuf::from("audit.log")
}

/// Server-wide limits (`[limits]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Atomic batches open at once across all streams (JetStream: 1000).
    #[serde(default = "default_atomic_batches_total")]
    pub atomic_batches_max: usize,
    /// Fast-ingest batches open at once across all streams (JetStream: 50000).
    #[serde(default = "default_fast_batches_total")]
    pub fast_batches_max: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            atomic_batches_max: default_atomic_batches_total(),
            fast_batches_max: default_fast_batches_total(),
        }
    }
}

fn default_atomic_batches_total() -> usize {
    1000
}
fn default_fast_batches_total() -> usize {
    50_000
}
fn default_atomic_batch_messages() -> u64 {
    1000
}
fn default_atomic_batches_per_stream() -> usize {
    50
}
fn default_atomic_staging_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_fast_batches_per_stream() -> usize {
    1000
}
fn default_batch_timeout() -> Duration {
    Duration::from_secs(10)
}

/// One `[[streams]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamSection {
    pub name: String,
    /// NATS subject patterns captured into the stream.
    pub subjects: Vec<String>,
    /// `none`, `interval` or `fsync`; `quorum` (the default, and the only
    /// level) for a replicated stream. Empty: the default.
    #[serde(default)]
    pub durability: String,
    /// Copies of the stream on as many nodes: 1 (this node only), 3 or 5
    /// (a Raft group over the `[cluster]`; as many nodes as replicas).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Sync period of `interval` durability.
    #[serde(default = "default_sync_interval", with = "duration_text")]
    pub sync_interval: Duration,
    #[serde(default, with = "option_duration_text")]
    pub max_age: Option<Duration>,
    #[serde(default, with = "option_size_text")]
    pub max_bytes: Option<u64>,
    pub max_messages: Option<u64>,
    #[serde(default = "default_segment_bytes", with = "size_text")]
    pub segment_bytes: u64,
    #[serde(default, with = "option_duration_text")]
    pub segment_max_age: Option<Duration>,
    /// Retention-deleted segment files kept for reuse by new segments.
    #[serde(default = "default_recycle_segments")]
    pub recycle_segments: usize,
    /// Largest message (subject + headers + payload).
    #[serde(default = "default_max_message_bytes", with = "size_text")]
    pub max_message_bytes: u64,
    /// How long a `Nats-Msg-Id` is remembered for deduplication.
    #[serde(default = "default_duplicate_window", with = "duration_text")]
    pub duplicate_window: Duration,
    /// Most `Nats-Msg-Id`s remembered (bounds the window's memory).
    #[serde(default = "default_duplicate_ids_max")]
    pub duplicate_ids_max: usize,
    /// Accept JetStream atomic batches (`Nats-Batch-Id` headers).
    #[serde(default)]
    pub allow_atomic: bool,
    /// Accept JetStream fast-ingest batches (`...$FI` reply subjects).
    #[serde(default)]
    pub allow_batched: bool,
    /// Messages in one atomic batch.
    #[serde(default = "default_atomic_batch_messages")]
    pub atomic_batch_max_messages: u64,
    /// Atomic batches open at once in this stream.
    #[serde(default = "default_atomic_batches_per_stream")]
    pub atomic_batches_max: usize,
    /// Memory all open atomic batches of this stream may stage.
    #[serde(default = "default_atomic_staging_bytes", with = "size_text")]
    pub atomic_staging_bytes: u64,
    /// Fast-ingest batches open at once in this stream.
    #[serde(default = "default_fast_batches_per_stream")]
    pub fast_batches_max: usize,
    /// A batch without messages for this long is abandoned.
    #[serde(default = "default_batch_timeout", with = "duration_text")]
    pub batch_timeout: Duration,
    /// `none` or `zstd`, per batch frame.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// zstd level, 1 (fast) to 19.
    #[serde(default = "default_compression_level")]
    pub compression_level: i32,
    /// `none`, `aes-256-gcm` or `chacha20-poly1305`.
    #[serde(default = "default_encryption")]
    pub encryption: String,
    /// The `[[keys]]` id new segments are written with.
    pub encryption_key_id: Option<u32>,
}

fn default_compression() -> String {
    "none".to_string()
}
fn default_compression_level() -> i32 {
    1
}
fn default_encryption() -> String {
    "none".to_string()
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data")
}
fn default_servers() -> Vec<String> {
    vec!["nats://127.0.0.1:4222".to_string()]
}
fn default_client_name() -> String {
    "natswal".to_string()
}
fn default_subscription_capacity() -> usize {
    256 * 1024
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_true() -> bool {
    true
}
fn default_http_listen() -> String {
    "127.0.0.1:7777".to_string()
}
fn default_api_prefix() -> String {
    API_PREFIX_DEFAULT.to_string()
}
fn default_replays_max() -> usize {
    256
}
fn default_write_mode() -> String {
    natswal::io::WriteMode::default().to_string()
}
fn default_recycle_segments() -> usize {
    StreamConfig::default().recycle_segments_max
}
/// More I/O threads than this only add contention (each is one
/// outstanding write or sync).
const IO_THREADS_MAX: usize = 1024;

fn default_group_sync() -> bool {
    true
}

fn default_open_files_max() -> usize {
    natswal::io::handles::OPEN_FILES_MAX_DEFAULT
}
fn default_open_segments_max() -> usize {
    natswal::store::OPEN_SEGMENTS_MAX_DEFAULT
}
fn default_replicas() -> usize {
    1
}
fn default_sync_interval() -> Duration {
    Duration::from_millis(100)
}
fn default_segment_bytes() -> u64 {
    StreamConfig::default().segment_bytes_max
}
fn default_max_message_bytes() -> u64 {
    1024 * 1024
}
fn default_duplicate_window() -> Duration {
    Duration::from_secs(120)
}
fn default_duplicate_ids_max() -> usize {
    100_000
}
fn default_streams() -> Vec<StreamSection> {
    vec![StreamSection {
        name: "events".to_string(),
        subjects: vec!["events.>".to_string()],
        durability: String::new(),
        replicas: default_replicas(),
        sync_interval: default_sync_interval(),
        max_age: None,
        max_bytes: None,
        max_messages: None,
        segment_bytes: default_segment_bytes(),
        segment_max_age: None,
        recycle_segments: default_recycle_segments(),
        max_message_bytes: default_max_message_bytes(),
        duplicate_window: default_duplicate_window(),
        duplicate_ids_max: default_duplicate_ids_max(),
        allow_atomic: false,
        allow_batched: false,
        atomic_batch_max_messages: default_atomic_batch_messages(),
        atomic_batches_max: default_atomic_batches_per_stream(),
        atomic_staging_bytes: default_atomic_staging_bytes(),
        fast_batches_max: default_fast_batches_per_stream(),
        batch_timeout: default_batch_timeout(),
        compression: default_compression(),
        compression_level: default_compression_level(),
        encryption: default_encryption(),
        encryption_key_id: None,
    }]
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            servers: default_servers(),
            name: default_client_name(),
            user: None,
            password: None,
            token: None,
            nkey_seed_file: None,
            creds_file: None,
            tls: None,
            subscription_capacity: default_subscription_capacity(),
            connect_timeout: default_connect_timeout(),
            shutdown_timeout: default_shutdown_timeout(),
        }
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: default_http_listen(),
        }
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            prefix: default_api_prefix(),
            replays_max: default_replays_max(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            write_mode: default_write_mode(),
            open_segments_max: default_open_segments_max(),
            open_files_max: default_open_files_max(),
            io_threads: 0,
            group_sync: default_group_sync(),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: default_data_dir(),
            nats: NatsConfig::default(),
            http: HttpConfig::default(),
            api: ApiConfig::default(),
            jetstream: JetStreamConfig::default(),
            storage: StorageConfig::default(),
            limits: LimitsConfig::default(),
            keys: Vec::new(),
            access: Vec::new(),
            audit: AuditConfig::default(),
            cluster: None,
            streams: default_streams(),
        }
    }
}

fn invalid(key: impl Into<String>, reason: impl Into<String>) -> BridgeError {
    BridgeError::Config {
        key: key.into(),
        reason: reason.into(),
    }
}

/// Parses `10`, `64KiB`, `128MiB`, `10GiB`, `1GB`, `500kB`.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|character: char| !character.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("'{text}' is not a size (examples: 1048576, 64KiB, 128MiB, 10GiB)"))?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "kB" | "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
            "unknown size unit '{other}' in '{text}' (use B, KiB, MiB, GiB, TiB, kB, MB, GB, TB)"
        ))
        }
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size '{text}' is too large"))
}

/// Parses `250ms`, `10s`, `2m`, `7d`, `1h 30m` (humantime).
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|error| {
        format!("'{text}' is not a duration ({error}; examples: 250ms, 10s, 2m, 7d)")
    })
}

mod size_text {
    use serde::{Deserialize, Deserializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum SizeValue {
        Number(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        match SizeValue::deserialize(deserializer)? {
            SizeValue::Number(number) => Ok(number),
            SizeValue::Text(text) => super::parse_size(&text).map_err(serde::de::Error::custom),
        }
    }
}

mod option_size_text {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapper(#[serde(with = "super::size_text")] u64);
        Ok(Option::<Wrapper>::deserialize(deserializer)?.map(|Wrapper(value)| value))
    }
}

mod duration_text {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

mod option_duration_text {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapper(#[serde(with = "super::duration_text")] Duration);
        Ok(Option::<Wrapper>::deserialize(deserializer)?.map(|Wrapper(value)| value))
    }
}

/// Command-line overrides of `natswal serve`.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub data_dir: Option<PathBuf>,
    pub nats_servers: Option<Vec<String>>,
    pub http_listen: Option<String>,
}

impl Config {
    /// Reads the file (if given), then environment variables, then flags,
    /// then validates.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|error| {
                    BridgeError::io(format!("cannot read config file {}", path.display()), error)
                })?;
                Config::parse(&text).map_err(|error| match error {
                    BridgeError::Config { key, reason } => BridgeError::Config {
                        key,
                        reason: format!("{reason} (in {})", path.display()),
                    },
                    other => other,
                })?
            }
            None => Config::default(),
        };
        config.apply_environment(|name| std::env::var(name).ok())?;
        if let Some(data_dir) = &overrides.data_dir {
            config.data_dir = data_dir.clone();
        }
        if let Some(servers) = &overrides.nats_servers {
            config.nats.servers = servers.clone();
        }
        if let Some(listen) = &overrides.http_listen {
            config.http.listen = listen.clone();
        }
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text; unknown keys and bad values are errors naming the key.
    pub fn parse(text: &str) -> Result<Config> {
        toml::from_str(text).map_err(|error| {
            let message = error.message().to_string();
            let key = message
                .strip_prefix("unknown field `")
                .and_then(|rest| rest.split('`').next())
                .map(str::to_string)
                .unwrap_or_else(|| describe_span(text, error.span()));
            invalid(key, message)
        })
    }

    /// `NATSWAL_DATA_DIR`, `NATSWAL_NATS_SERVERS` (comma separated),
    /// `NATSWAL_NATS_USER`, `NATSWAL_NATS_PASSWORD`, `NATSWAL_NATS_TOKEN`,
    /// `NATSWAL_NATS_CREDS_FILE`, `NATSWAL_NATS_NKEY_SEED_FILE`,
    /// `NATSWAL_HTTP_LISTEN`, `NATSWAL_API_PREFIX`, `NATSWAL_WRITE_MODE`.
    pub fn apply_environment(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<()> {
        if let Some(value) = get("NATSWAL_DATA_DIR") {
            self.data_dir = PathBuf::from(value);
        }
        if let Some(value) = get("NATSWAL_NATS_SERVERS") {
            self.nats.servers = value
                .split(',')
                .map(|server| server.trim().to_string())
                .filter(|server| !server.is_empty())
                .collect();
        }
        if let Some(value) = get("NATSWAL_NATS_USER") {
            self.nats.user = Some(value);
        }
        if let Some(value) = get("NATSWAL_NATS_PASSWORD") {
            self.nats.password = Some(value);
        }
        if let Some(value) = get("NATSWAL_NATS_TOKEN") {
            self.nats.token = Some(value);
        }
        if let Some(value) = get("NATSWAL_NATS_CREDS_FILE") {
            self.nats.creds_file = Some(PathBuf::from(value));
        }
        if let Some(value) = get("NATSWAL_NATS_NKEY_SEED_FILE") {
            self.nats.nkey_seed_file = Some(PathBuf::from(value));
        }
        if let Some(value) = get("NATSWAL_HTTP_LISTEN") {
            self.http.listen = value;
        }
        if let Some(value) = get("NATSWAL_API_PREFIX") {
            self.api.prefix = value;
        }
        if let Some(value) = get("NATSWAL_WRITE_MODE") {
            self.storage.write_mode = value;
        }
        Ok(())
    }

    pub fn write_mode(&self) -> Result<natswal::io::WriteMode> {
        self.storage
            .write_mode
            .parse()
            .map_err(|reason: String| invalid("storage.write_mode", reason))
    }

    /// Checks everything a running server relies on.
    pub fn validate(&self) -> Result<()> {
        if self.nats.servers.is_empty() {
            return Err(invalid("nats.servers", "at least one server URL is needed"));
        }
        if let Some(domain) = &self.jetstream.domain {
            let valid = !domain.is_empty()
                && domain
                    .bytes()
                    .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_');
            if !valid {
                return Err(invalid(
                    "jetstream.domain",
                    format!("'{domain}' is not a JetStream domain: use letters, digits, '-' and '_' (it becomes one subject token of $JS.<domain>.API)"),
                ));
            }
        }
        for (index, source) in self.keys.iter().enumerate() {
            if source.file.is_some() == source.env.is_some() {
                return Err(invalid(
                    format!("keys[{index}]"),
                    format!(
                        "key id {} needs exactly one of `file` or `env` as its source",
                        source.id
                    ),
                ));
            }
            if self.keys[..index].iter().any(|other| other.id == source.id) {
                return Err(invalid(
                    format!("keys[{index}].id"),
                    format!("key id {} is configured twice", source.id),
                ));
            }
        }
        for server in &self.nats.servers {
            server.parse::<async_nats::ServerAddr>().map_err(|error| {
                invalid(
                    "nats.servers",
                    format!("'{server}' is not a NATS URL: {error}"),
                )
            })?;
        }
        let methods = [
            self.nats.user.is_some() || self.nats.password.is_some(),
            self.nats.token.is_some(),
            self.nats.nkey_seed_file.is_some(),
            self.nats.creds_file.is_some(),
        ];
        if methods.iter().filter(|used| **used).count() > 1 {
            return Err(invalid(
                "nats",
                "use one authentication method: user/password, token, nkey_seed_file or creds_file",
            ));
        }
        if self.nats.user.is_some() != self.nats.password.is_some() {
            return Err(invalid("nats.user", "user and password go together"));
        }
        if let Some(tls) = &self.nats.tls {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                return Err(invalid(
                    "nats.tls.cert_file",
                    "cert_file and key_file go together",
                ));
            }
        }
        if self.nats.subscription_capacity == 0 {
            return Err(invalid("nats.subscription_capacity", "must be at least 1"));
        }
        self.write_mode()?;
        if self.storage.open_segments_max == 0 {
            return Err(invalid("storage.open_segments_max", "must be at least 1"));
        }
        if self.storage.open_files_max < 2 {
            return Err(invalid(
                "storage.open_files_max",
                "must be at least 2 (an active segment and a sealed one being read)",
            ));
        }
        if self.storage.io_threads > IO_THREADS_MAX {
            return Err(invalid(
                "storage.io_threads",
                format!("{} is more than {IO_THREADS_MAX}", self.storage.io_threads),
            ));
        }
        if self.api.replays_max == 0 {
            return Err(invalid(
                "api.replays_max",
                "must be at least 1 (replay requests served at once)",
            ));
        }
        let prefix = SubjectPattern::parse(&self.api.prefix)
            .map_err(|error| invalid("api.prefix", error.to_string()))?;
        if !prefix.is_literal() {
            return Err(invalid("api.prefix", "must not contain wildcards"));
        }
        let api_subjects =
            SubjectPattern::parse(&format!("{}.>", self.api.prefix)).expect("valid prefix");
        if let Some(cluster) = &self.cluster {
            cluster.validate()?;
        }
        if self.streams.is_empty() {
            return Err(invalid(
                "streams",
                "at least one [[streams]] table is needed",
            ));
        }
        let mut seen: natswal::subject::OverlapIndex<String> = Default::default();
        let mut names = std::collections::HashSet::new();
        for (index, stream) in self.streams.iter().enumerate() {
            let key = |field: &str| format!("streams[{index}].{field}");
            natswal::stream::validate_stream_name(&stream.name)
                .map_err(|error| invalid(key("name"), error.to_string()))?;
            if !names.insert(stream.name.as_str()) {
                return Err(invalid(
                    key("name"),
                    format!("stream name '{}' is used twice", stream.name),
                ));
            }
            if stream.subjects.is_empty() {
                return Err(invalid(
                    key("subjects"),
                    "at least one subject pattern is needed",
                ));
            }
            for subject in &stream.subjects {
                let pattern = SubjectPattern::parse(subject)
                    .map_err(|error| invalid(key("subjects"), error.to_string()))?;
                if pattern.overlaps(&api_subjects) {
                    return Err(invalid(
                        key("subjects"),
                        format!(
                            "'{subject}' would capture natswal's own API subjects ({}.>); choose another pattern or api.prefix",
                            self.api.prefix
                        ),
                    ));
                }
                if subject.starts_with("$JS.") || subject == ">" || subject.starts_with("_INBOX.") {
                    return Err(invalid(
                        key("subjects"),
                        format!("'{subject}' would capture NATS system, JetStream API or reply inbox subjects"),
                    ));
                }
                if let Some(other) = seen.first_overlap(&pattern) {
                    return Err(invalid(
                        key("subjects"),
                        format!("'{subject}' of stream '{}' overlaps subjects of stream '{other}': a message must belong to one stream", stream.name),
                    ));
                }
                seen.insert(pattern, stream.name.clone());
            }
            stream.engine_config().map_err(|error| match error {
                natswal::Error::InvalidConfig { key: field, reason } => {
                    invalid(key(&field), reason)
                }
                other => invalid(key("?"), other.to_string()),
            })?;
            self.validate_replicas(stream, &key)?;
            if stream.duplicate_ids_max == 0 {
                return Err(invalid(key("duplicate_ids_max"), "must be at least 1"));
            }
            if stream.atomic_batch_max_messages == 0 {
                return Err(invalid(
                    key("atomic_batch_max_messages"),
                    "must be at least 1",
                ));
            }
            if stream.atomic_batches_max == 0 || stream.fast_batches_max == 0 {
                return Err(invalid(
                    key("atomic_batches_max"),
                    "atomic_batches_max and fast_batches_max must be at least 1",
                ));
            }
            if stream.atomic_staging_bytes < stream.max_message_bytes {
                return Err(invalid(
                    key("atomic_staging_bytes"),
                    format!(
                        "{} cannot stage even one message of max_message_bytes {}",
                        stream.atomic_staging_bytes, stream.max_message_bytes
                    ),
                ));
            }
            if stream.batch_timeout.is_zero() {
                return Err(invalid(key("batch_timeout"), "must be longer than 0"));
            }
            if stream.encryption != "none" {
                let Some(id) = stream.encryption_key_id else {
                    return Err(invalid(
                        key("encryption_key_id"),
                        "an encrypted stream needs the id of a [[keys]] entry",
                    ));
                };
                if !self.keys.iter().any(|source| source.id == id) {
                    return Err(invalid(
                        key("encryption_key_id"),
                        format!("no [[keys]] entry has id {id}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl Config {
    fn validate_replicas(
        &self,
        stream: &StreamSection,
        key: &dyn Fn(&str) -> String,
    ) -> Result<()> {
        if ![1, 3, 5].contains(&stream.replicas) {
            return Err(invalid(
                key("replicas"),
                format!("{} replicas: use 1, 3 or 5 (a majority of an even count tolerates no more failures than one node fewer)", stream.replicas),
            ));
        }
        if !stream.is_replicated() {
            return Ok(());
        }
        let Some(cluster) = &self.cluster else {
            return Err(invalid(
                key("replicas"),
                format!("{} replicas need a [cluster] section (this node's id, listen address and peers)", stream.replicas),
            ));
        };
        let nodes = cluster.peers.len() + 1;
        if nodes != stream.replicas {
            return Err(invalid(
                key("replicas"),
                format!("{} replicas on a cluster of {nodes} nodes: a replicated stream has a copy on every node (placing it on some of them is not built)", stream.replicas),
            ));
        }
        if stream.allow_batched {
            return Err(invalid(
                key("allow_batched"),
                "fast-ingest batches are not built for replicated streams yet (atomic batches are: allow_atomic)",
            ));
        }
        // Removing a replicated stream's segments must follow the Raft purge
        // point on every replica (a follower behind a removed segment could
        // not catch up): until it does, a limit here would be ignored, so it
        // is refused instead.
        let limits = [
            ("max_age", stream.max_age.is_some()),
            ("max_bytes", stream.max_bytes.is_some()),
            ("max_messages", stream.max_messages.is_some()),
            ("segment_max_age", stream.segment_max_age.is_some()),
        ];
        if let Some((name, _)) = limits.iter().find(|(_, set)| *set) {
            return Err(invalid(
                key(name),
                "retention and age-based sealing are not built for replicated streams yet (segments stay until removed by hand)",
            ));
        }
        Ok(())
    }
}

fn describe_span(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return "(file)".to_string();
    };
    let line = text[..span.start.min(text.len())].lines().count().max(1);
    let snippet: String = text[span.start.min(text.len())..span.end.min(text.len())]
        .chars()
        .take(40)
        .collect();
    format!("line {line} `{snippet}`")
}

impl Config {
    /// Loads every configured key (files and environment variables).
    pub fn keyring(&self) -> Result<natswal::Keyring> {
        let mut keys = Vec::new();
        for source in &self.keys {
            let key = match (&source.file, &source.env) {
                (Some(path), _) => natswal::Key::from_file(source.id, path)?,
                (None, Some(variable)) => natswal::Key::from_env(source.id, variable)?,
                (None, None) => {
                    return Err(invalid(
                        "keys",
                        format!("key id {} has no source", source.id),
                    ))
                }
            };
            keys.push(key);
        }
        Ok(natswal::Keyring::new(keys))
    }

    /// Where the audit log is.
    pub fn audit_path(&self) -> PathBuf {
        if self.audit.file.is_absolute() {
            self.audit.file.clone()
        } else {
            self.data_dir.join(&self.audit.file)
        }
    }
}

impl StreamSection {
    /// The durability level's name, the default spelled out.
    pub fn durability_name(&self) -> &str {
        match self.durability.as_str() {
            "" if self.is_replicated() => "quorum",
            "" => "fsync",
            named => named,
        }
    }

    /// Whether this stream is a Raft group over the cluster.
    pub fn is_replicated(&self) -> bool {
        self.replicas > 1
    }

    pub fn durability(&self) -> std::result::Result<Durability, String> {
        if self.is_replicated() {
            // The log under Raft syncs every entry before it counts toward
            // a quorum; the ack waits for the quorum.
            return match self.durability.as_str() {
                "" | "quorum" => Ok(Durability::Fsync),
                other => Err(format!(
                    "a replicated stream (replicas = {}) is acknowledged at durability 'quorum', not '{other}'",
                    self.replicas
                )),
            };
        }
        match self.durability.as_str() {
            "none" => Ok(Durability::None),
            "" | "fsync" => Ok(Durability::Fsync),
            "quorum" => Err("'quorum' needs a replicated stream (replicas = 3 or 5)".to_string()),
            "interval" => Ok(Durability::Interval {
                interval_ms: self.sync_interval.as_millis() as u64,
            }),
            other => Err(format!(
                "unknown durability '{other}' (expected none, interval, fsync or quorum)"
            )),
        }
    }

    /// The engine configuration this section describes.
    pub fn engine_config(&self) -> natswal::Result<StreamConfig> {
        let durability = self
            .durability()
            .map_err(|reason| natswal::Error::InvalidConfig {
                key: "durability".to_string(),
                reason,
            })?;
        // A message is stored as one record: subject, headers and payload
        // plus 18 bytes of record header.
        let record_bytes_max =
            self.max_message_bytes + natswal::format::record::RECORD_OVERHEAD as u64;
        let compression = match self.compression.as_str() {
            "none" => natswal::Compression::None,
            "zstd" => natswal::Compression::Zstd {
                level: self.compression_level,
            },
            other => {
                return Err(natswal::Error::InvalidConfig {
                    key: "compression".to_string(),
                    reason: format!("unknown compression '{other}' (expected none or zstd)"),
                })
            }
        };
        let encryption = match self.encryption.as_str() {
            "none" => None,
            cipher => Some(natswal::EncryptionConfig {
                cipher: cipher
                    .parse()
                    .map_err(|reason| natswal::Error::InvalidConfig {
                        key: "encryption".to_string(),
                        reason,
                    })?,
                key_id: self.encryption_key_id.unwrap_or(0),
            }),
        };
        let defaults = StreamConfig::default();
        let config = StreamConfig {
            compression,
            encryption,
            durability,
            segment_bytes_max: self.segment_bytes,
            segment_age_max_ms: self.segment_max_age.map(|age| age.as_millis() as u64),
            recycle_segments_max: self.recycle_segments,
            retention: RetentionPolicy {
                age_max_ms: self.max_age.map(|age| age.as_millis() as u64),
                bytes_max: self.max_bytes,
                messages_max: self.max_messages,
            },
            record_bytes_max,
            frame_bytes_max: defaults.frame_bytes_max.min(
                StreamConfig {
                    segment_bytes_max: self.segment_bytes,
                    ..StreamConfig::default()
                }
                .frame_body_bytes_max(),
            ),
            queue_bytes_max: defaults.queue_bytes_max.max(record_bytes_max),
            unsynced_bytes_max: defaults.unsynced_bytes_max.max(defaults.frame_bytes_max),
            ..defaults
        };
        config.validate().map_err(|error| match error {
            natswal::Error::InvalidConfig { key, reason } => natswal::Error::InvalidConfig {
                key: match key.as_str() {
                    "record_bytes_max" => "max_message_bytes".to_string(),
                    "segment_bytes_max" => "segment_bytes".to_string(),
                    "segment_age_max_ms" => "segment_max_age".to_string(),
                    "recycle_segments_max" => "recycle_segments".to_string(),
                    "encryption" => "encryption_key_id".to_string(),
                    _ => key,
                },
                reason,
            },
            other => other,
        })?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_run_one_stream_against_local_nats() {
        let config = Config::default();
        config.validate().unwrap();
        assert_eq!(config.nats.servers, vec!["nats://127.0.0.1:4222"]);
        assert_eq!(config.streams[0].name, "events");
    }

    #[test]
    fn a_full_file_parses() {
        let text = r#"
data_dir = "/var/lib/natswal"
[nats]
servers = ["nats://a:4222", "tls://b:4222"]
user = "u"
password = "p"
[[streams]]
name = "orders"
subjects = ["orders.>"]
durability = "interval"
sync_interval = "50ms"
max_age = "7d"
max_bytes = "10GiB"
segment_bytes = "64MiB"
recycle_segments = 0
"#;
        let config = Config::parse(text).unwrap();
        config.validate().unwrap();
        let engine = config.streams[0].engine_config().unwrap();
        assert_eq!(engine.durability, Durability::Interval { interval_ms: 50 });
        assert_eq!(engine.retention.bytes_max, Some(10 << 30));
        assert_eq!(engine.retention.age_max_ms, Some(7 * 86_400_000));
        assert_eq!(engine.segment_bytes_max, 64 << 20);
        assert_eq!(engine.recycle_segments_max, 0);
        assert_eq!(
            Config::default().streams[0]
                .engine_config()
                .unwrap()
                .recycle_segments_max,
            StreamConfig::default().recycle_segments_max
        );
        assert_eq!(Config::default().storage.write_mode, "pwrite");
    }

    fn error_of(text: &str) -> String {
        match Config::parse(text).and_then(|config| config.validate()) {
            Ok(()) => panic!("expected an error for {text}"),
            Err(error) => error.to_string(),
        }
    }

    #[test]
    fn bad_configs_name_their_key() {
        let unknown = error_of("data_dir = \"x\"\nbogus = 1\n");
        assert!(unknown.contains("bogus"), "{unknown}");
        let overlap = error_of(
            "[[streams]]\nname = \"a\"\nsubjects = [\"orders.*\"]\n[[streams]]\nname = \"b\"\nsubjects = [\"orders.eu\"]\n",
        );
        assert!(
            overlap.contains("streams[1].subjects") && overlap.contains("overlaps"),
            "{overlap}"
        );
        let api = error_of("[[streams]]\nname = \"a\"\nsubjects = [\"$NWAL.>\"]\n");
        assert!(api.contains("API subjects"), "{api}");
        let wildcard_api = error_of("[[streams]]\nname = \"a\"\nsubjects = [\"*.REPLAY.x\"]\n");
        assert!(wildcard_api.contains("API subjects"), "{wildcard_api}");
        let size =
            error_of("[[streams]]\nname = \"a\"\nsubjects = [\"a\"]\nsegment_bytes = \"1KiB\"\n");
        assert!(size.contains("streams[0].segment_bytes"), "{size}");
        let too_big = error_of("[[streams]]\nname = \"a\"\nsubjects = [\"a\"]\nsegment_bytes = \"1MiB\"\nmax_message_bytes = \"2MiB\"\n");
        assert!(
            too_big.contains("streams[0].max_message_bytes"),
            "{too_big}"
        );
        let durability =
            error_of("[[streams]]\nname = \"a\"\nsubjects = [\"a\"]\ndurability = \"always\"\n");
        assert!(durability.contains("streams[0].durability"), "{durability}");
        let bad_size =
            error_of("[[streams]]\nname = \"a\"\nsubjects = [\"a\"]\nmax_bytes = \"10 parsecs\"\n");
        assert!(bad_size.contains("size"), "{bad_size}");
        let auth = error_of("[nats]\ntoken = \"t\"\nuser = \"u\"\npassword = \"p\"\n");
        assert!(auth.contains("one authentication method"), "{auth}");
        let name = error_of("[[streams]]\nname = \"a b\"\nsubjects = [\"a\"]\n");
        assert!(name.contains("streams[0].name"), "{name}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let mut config = Config::default();
        config
            .apply_environment(|name| match name {
                "NATSWAL_NATS_SERVERS" => Some("nats://x:1, nats://y:2".to_string()),
                "NATSWAL_DATA_DIR" => Some("/tmp/d".to_string()),
                _ => None,
            })
            .unwrap();
        assert_eq!(config.nats.servers, vec!["nats://x:1", "nats://y:2"]);
        assert_eq!(config.data_dir, PathBuf::from("/tmp/d"));
    }

    const CLUSTER: &str = "[cluster]\nnode_id = 1\nlisten = \"127.0.0.1:7422\"\n[[cluster.peers]]\nid = 2\naddress = \"127.0.0.1:7423\"\n[[cluster.peers]]\nid = 3\naddress = \"127.0.0.1:7424\"\n";

    #[test]
    fn replicated_streams_need_a_matching_cluster() {
        let stream = "[[streams]]\nname = \"a\"\nsubjects = [\"a\"]\nreplicas = 3\n";
        let config = Config::parse(&format!("{CLUSTER}{stream}")).unwrap();
        config.validate().unwrap();
        assert_eq!(config.streams[0].durability_name(), "quorum");
        assert_eq!(config.cluster.as_ref().unwrap().members().len(), 3);
        let without = error_of(stream);
        assert!(
            without.contains("streams[0].replicas") && without.contains("[cluster]"),
            "{without}"
        );
        let even = error_of(&format!(
            "{CLUSTER}{}",
            stream.replace("replicas = 3", "replicas = 2")
        ));
        assert!(even.contains("use 1, 3 or 5"), "{even}");
        let five = error_of(&format!(
            "{CLUSTER}{}",
            stream.replace("replicas = 3", "replicas = 5")
        ));
        assert!(five.contains("cluster of 3 nodes"), "{five}");
        let fsync = error_of(&format!("{CLUSTER}{stream}durability = \"fsync\"\n"));
        assert!(fsync.contains("quorum"), "{fsync}");
        let quorum_alone =
            error_of("[[streams]]\nname = \"a\"\nsubjects = [\"a\"]\ndurability = \"quorum\"\n");
        assert!(
            quorum_alone.contains("needs a replicated stream"),
            "{quorum_alone}"
        );
        let batches = error_of(&format!("{CLUSTER}{stream}allow_batched = true\n"));
        assert!(
            batches.contains("fast-ingest batches are not built for replicated streams"),
            "{batches}"
        );
        for limit in [
            "max_age = \"7d\"",
            "max_bytes = \"1GiB\"",
            "max_messages = 10",
            "segment_max_age = \"1h\"",
        ] {
            let error = error_of(&format!("{CLUSTER}{stream}{limit}\n"));
            let key = limit.split(' ').next().unwrap();
            assert!(
                error.contains(&format!("streams[0].{key}"))
                    && error.contains("not built for replicated streams"),
                "{error}"
            );
        }
    }

    #[test]
    fn cluster_sections_name_their_bad_key() {
        let stream = "[[streams]]\nname = \"a\"\nsubjects = [\"a\"]\n";
        let reused = error_of(&format!("{}{stream}", CLUSTER.replace("id = 3", "id = 2")));
        assert!(
            reused.contains("cluster.peers[1].id") && reused.contains("used twice"),
            "{reused}"
        );
        let own = error_of(&format!("{}{stream}", CLUSTER.replace("id = 2", "id = 1")));
        assert!(own.contains("cluster.peers[0].id"), "{own}");
        let zero = error_of(&format!(
            "{}{stream}",
            CLUSTER.replace("node_id = 1", "node_id = 0")
        ));
        assert!(zero.contains("cluster.node_id"), "{zero}");
        let address = error_of(&format!(
            "{}{stream}",
            CLUSTER.replace("127.0.0.1:7423", "nowhere")
        ));
        assert!(
            address.contains("cluster.peers[0].address") && address.contains("host:port"),
            "{address}"
        );
        let tls = error_of(&format!("{CLUSTER}[cluster.tls]\nca_file = \"/no/ca.pem\"\ncert_file = \"/no/c.pem\"\nkey_file = \"/no/k.pem\"\n{stream}"));
        assert!(
            tls.contains("cluster.tls.ca_file") && tls.contains("/no/ca.pem"),
            "{tls}"
        );
    }
}
