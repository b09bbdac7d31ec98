//! Deterministic simulation of the engine (after TigerBeetle's VOPR and
//! FoundationDB's simulator): one seed drives a stream on the in-memory file
//! system with no threads (its write, sync and maintenance steps are called
//! here, in an order the seed picks), a simulated clock, and the file
//! system's own seeded randomness. The same seed gives the same run.
//!
//! A run mixes appends from several producers (single records and atomic
//! batches), write and sync steps, maintenance (rotation, retention,
//! checkpoints), truncations (online and offline), key rotations, segment
//! installs into a follower, clean restarts, process restarts, and faults:
//! power loss at a random file-system operation (unsynced pages torn), failed
//! syncs (once or for good), a full disk, bit flips in durable files.
//!
//! After every restart and power loss it reopens the stream and checks:
//! - every append acknowledged at `fsync` is there with its offset and
//!   bytes (after a power loss; after a process restart every acknowledged
//!   append is), unless retention or a truncation removed it, or an explicit
//!   repair reported its offset lost after an injected bit flip;
//! - every stored record is one that was written, byte for byte, at most
//!   once, in offset order: the log is a prefix of what was written;
//! - offsets are dense: only offsets a repair reported lost are missing, or
//!   those a gap frame records (a repair that crashed after writing it);
//! - a flipped bit is refused or reported as corruption, never read as
//!   other data, and without one no damage is ever reported;
//! - a strict open never quarantines or loses anything: only an explicit
//!   repair does.
//!
//! What the model allows, because no format can tell it apart: a flipped
//! bit in the last durable frame, with nothing after it to prove it was
//! durable, reads as a torn write (the log may end there when a torn tail
//! was reported); a truncation that failed part way may or may not have
//! happened (its intent decides); a damaged `stream.meta` replaced by an
//! atomic rewrite can come back after a power loss until the rename's
//! directory sync (and then needs a repair).
//!
//! `natswal sim --seeds N` runs many seeds on every core; a failure prints
//! its seed and the command that replays it with every event.

use crate::codec::{Cipher, Compression, EncryptionConfig, Key, Keyring};
use crate::config::{Durability, RetentionPolicy, StreamConfig};
use crate::coordinator::{AppendOutcome, AppendRequest, Completion};
use crate::error::{Error, Result};
use crate::format::record::Record;
use crate::io::memory::{Fault, MemoryFileSystem, Operation};
use crate::io::FileSystem;
use crate::log::cache::SegmentCache;
use crate::log::recovery::{RecoveryManager, RecoveryMode, RecoveryReport};
use crate::log::{Log, LogOptions};
use crate::reader::StartPosition;
use crate::stream::{Driver, Stream, StreamOptions};
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const DIRECTORY: &str = "/sim/streams/s";
const KEYS: u32 = 4;
const EVENTS_KEPT: usize = 60;

/// How long each seed runs.
#[derive(Debug, Clone, Copy)]
pub struct SimOptions {
    pub steps: u32,
    /// Print every event (to replay a failing seed).
    pub verbose: bool,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            steps: 400,
            verbose: false,
        }
    }
}

/// What one or more runs did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimSummary {
    pub seeds: u64,
    pub appends: u64,
    pub acknowledged: u64,
    pub power_losses: u64,
    pub restarts: u64,
    pub failed_syncs: u64,
    pub full_disks: u64,
    pub bit_flips: u64,
    pub repairs: u64,
    pub truncations: u64,
    pub installs: u64,
    pub key_rotations: u64,
    pub checks: u64,
}

impl SimSummary {
    pub fn add(&mut self, other: &SimSummary) {
        self.seeds += other.seeds;
        self.appends += other.appends;
        self.acknowledged += other.acknowledged;
        self.power_losses += other.power_losses;
        self.restarts += other.restarts;
        self.failed_syncs += other.failed_syncs;
        self.full_disks += other.full_disks;
        self.bit_flips += other.bit_flips;
        self.repairs += other.repairs;
        self.truncations += other.truncations;
        self.installs += other.installs;
        self.key_rotations += other.key_rotations;
        self.checks += other.checks;
    }
}

impl std::fmt::Display for SimSummary {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            formatter,
            "{} seeds: {} appends ({} acknowledged), {} power losses, {} restarts, {} failed syncs, {} full disks, {} bit flips, {} repairs, {} truncations, {} installs, {} key rotations, {} invariant checks",
            self.seeds,
            self.appends,
            self.acknowledged,
            self.power_losses,
            self.restarts,
            self.failed_syncs,
            self.full_disks,
            self.bit_flips,
            self.repairs,
            self.truncations,
            self.installs,
            self.key_rotations,
            self.checks
        )
    }
}

/// A violated invariant, with how to replay it.
#[derive(Debug, Clone)]
pub struct SimFailure {
    pub seed: u64,
    pub step: u32,
    pub message: String,
    pub events: Vec<String>,
}

impl std::fmt::Display for SimFailure {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            formatter,
            "seed {} failed at step {}: {}",
            self.seed, self.step, self.message
        )?;
        writeln!(
            formatter,
            "replay it with: natswal sim --seed {} --verbose",
            self.seed
        )?;
        writeln!(formatter, "last events:")?;
        for event in &self.events {
            writeln!(formatter, "  {event}")?;
        }
        Ok(())
    }
}

/// The seed's choices (the in-memory file system's generator).
struct Random(crate::io::memory::SplitMix);

impl Random {
    fn next(&mut self) -> u64 {
        self.0.next()
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

type Completions = Arc<Mutex<Vec<(usize, Result<AppendOutcome>)>>>;

/// The model: what was written and what must be there.
#[derive(Default)]
struct Model {
    /// Every record submitted, by submission number (in its subject).
    submitted: Vec<Record>,
    /// Submission number of each record stored (what the last check read,
    /// plus acknowledged appends since).
    stored: BTreeMap<u64, usize>,
    /// Offsets acknowledged at `fsync`: survive a power loss.
    durable: BTreeSet<u64>,
    /// Offsets acknowledged at any level: survive a process restart.
    acknowledged: BTreeSet<u64>,
    /// Offsets a repair reported lost (after an injected bit flip).
    lost: BTreeSet<u64>,
    /// A bit was flipped since the last repair.
    damaged: bool,
    /// A bit of `stream.meta` was flipped since the last power loss: the
    /// damaged copy can come back (an atomic rewrite's rename is not
    /// durable until its directory is synced), whatever was read since.
    metadata_damaged: bool,
    /// Truncations from these offsets failed part way since the last
    /// check: each may have happened (its intent was durable) or not.
    uncertain_cuts: Vec<u64>,
}

struct Simulation {
    seed: u64,
    step: u32,
    random: Random,
    file_system: MemoryFileSystem,
    config: StreamConfig,
    keyring: Arc<Keyring>,
    key_id: u32,
    stream: Option<Stream>,
    clock: i64,
    model: Model,
    completions: Completions,
    events: VecDeque<String>,
    verbose: bool,
    summary: SimSummary,
    followers: u32,
    /// The last open reported a torn tail.
    torn_reported: bool,
}

fn fail<T>(message: impl Into<String>) -> std::result::Result<T, String> {
    Err(message.into())
}

impl Simulation {
    fn new(seed: u64, verbose: bool) -> Simulation {
        let mut random = Random(crate::io::memory::SplitMix(seed));
        let encrypted = random.chance(30);
        let config = StreamConfig {
            durability: if random.chance(80) {
                Durability::Fsync
            } else {
                Durability::None
            },
            segment_bytes_max: (64 + random.below(3) * 64) * 1024,
            record_bytes_max: 8 * 1024,
            frame_bytes_max: 4 * 1024 + random.below(8) * 1024,
            frame_records_max: 1 + random.below(64) as u32,
            queue_bytes_max: 512 * 1024,
            unsynced_bytes_max: 64 * 1024,
            index_interval_bytes: 512 + random.below(4096),
            checkpoint_interval_bytes: 4 * 1024 + random.below(32 * 1024),
            maintenance_interval_ms: 1000,
            compression: if random.chance(30) {
                Compression::Zstd { level: 1 }
            } else {
                Compression::None
            },
            encryption: encrypted.then_some(EncryptionConfig {
                cipher: if random.chance(50) {
                    Cipher::Aes256Gcm
                } else {
                    Cipher::ChaCha20Poly1305
                },
                key_id: 1,
            }),
            retention: RetentionPolicy {
                messages_max: random.chance(30).then(|| 500 + random.below(3000)),
                ..RetentionPolicy::default()
            },
            recycle_segments_max: random.below(3) as usize,
            ..StreamConfig::default()
        };
        let keyring = Arc::new(Keyring::new(
            (1..=KEYS).map(|id| Key::new(id, [id as u8; 32])),
        ));
        Simulation {
            seed,
            step: 0,
            file_system: MemoryFileSystem::with_seed(random.next()),
            random,
            config,
            keyring,
            key_id: 1,
            stream: None,
            clock: 1_700_000_000_000_000_000,
            model: Model::default(),
            completions: Arc::new(Mutex::new(Vec::new())),
            events: VecDeque::new(),
            verbose,
            summary: SimSummary {
                seeds: 1,
                ..SimSummary::default()
            },
            followers: 0,
            torn_reported: false,
        }
    }

    fn event(&mut self, text: String) {
        if self.verbose {
            eprintln!("[seed {} step {}] {text}", self.seed, self.step);
        }
        self.events.push_back(format!("step {}: {text}", self.step));
        if self.events.len() > EVENTS_KEPT {
            self.events.pop_front();
        }
    }

    fn stream_config(&self) -> StreamConfig {
        StreamConfig {
            encryption: self.config.encryption.map(|encryption| EncryptionConfig {
                key_id: self.key_id,
                ..encryption
            }),
            ..self.config.clone()
        }
    }

    fn options(&self, mode: RecoveryMode) -> StreamOptions {
        StreamOptions {
            config: self.stream_config(),
            recovery_mode: mode,
            keyring: Arc::clone(&self.keyring),
            driver: Driver::Manual,
            ..StreamOptions::default()
        }
    }

    fn open(&mut self, mode: RecoveryMode) -> Result<RecoveryReport> {
        let (stream, report) = Stream::open(
            Arc::new(self.file_system.clone()),
            Path::new(DIRECTORY),
            "s",
            Arc::new(SegmentCache::new(4)),
            self.options(mode),
        )?;
        self.stream = Some(stream);
        Ok(report)
    }

    fn stream(&self) -> &Stream {
        self.stream.as_ref().expect("open")
    }

    /// A record identifying its submission in its subject.
    fn new_record(&mut self, producer: u64) -> Record {
        let number = self.model.submitted.len();
        let payload_length = match self.random.below(10) {
            0 => 0,
            1..=6 => self.random.below(200),
            _ => self.random.below(3000),
        } as usize;
        let fill = (number % 251) as u8;
        let mut record = Record::new(
            format!("sim.p{producer}.n{number}"),
            Bytes::from(vec![fill; payload_length]),
        );
        if self.random.chance(30) {
            record.headers = Bytes::from(format!("NATS/1.0\r\nNats-Msg-Id: {number}\r\n\r\n"));
        }
        self.clock += 1 + self.random.below(1_000_000) as i64;
        record.timestamp_ns = self.clock;
        self.model.submitted.push(record.clone());
        record
    }

    fn submit(&mut self) {
        let producer = self.random.below(4);
        let atomic = self.random.chance(20);
        let count = if atomic { 1 + self.random.below(8) } else { 1 };
        let records: Vec<Record> = (0..count).map(|_| self.new_record(producer)).collect();
        let first = self.model.submitted.len() - records.len();
        let completions = Arc::clone(&self.completions);
        let request = AppendRequest {
            records,
            atomic,
            ..AppendRequest::default()
        };
        let completion = Completion::Callback(Box::new(move |result| {
            completions
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .push((first, result));
        }));
        self.summary.appends += 1;
        match self.stream().try_submit(request, completion) {
            Ok(Ok(())) => {}
            Ok(Err(_)) => self.event("queue full: append refused at the door".to_string()),
            Err(error) => self.event(format!("append refused: {error}")),
        }
    }

    /// Takes completed appends into the model.
    fn collect(&mut self) -> std::result::Result<(), String> {
        let done: Vec<_> = std::mem::take(
            &mut *self
                .completions
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for (first, result) in done {
            let Ok(outcome) = result else { continue };
            self.summary.acknowledged += 1;
            for index in 0..u64::from(outcome.count) {
                let offset = outcome.first_offset + index;
                let submission = first + index as usize;
                if let Some(previous) = self.model.stored.insert(offset, submission) {
                    if previous != submission {
                        return fail(format!(
                            "offset {offset} acknowledged for submission {submission}, but submission {previous} is stored there"
                        ));
                    }
                }
                self.model.acknowledged.insert(offset);
                if self.config.durability == Durability::Fsync {
                    self.model.durable.insert(offset);
                }
            }
        }
        Ok(())
    }

    fn run(&mut self, steps: u32) -> std::result::Result<(), String> {
        self.open(RecoveryMode::Strict)
            .map_err(|error| format!("first open: {error}"))?;
        while self.step < steps {
            self.step += 1;
            self.act()?;
            self.collect()?;
            if self.file_system.has_crashed() {
                self.power_loss()?;
            }
        }
        self.clean_restart()
    }

    fn act(&mut self) -> std::result::Result<(), String> {
        match self.random.below(1000) {
            0..=349 => {
                for _ in 0..1 + self.random.below(6) {
                    self.submit();
                }
            }
            350..=599 => {
                let now = self.clock;
                for _ in 0..1 + self.random.below(3) {
                    self.stream().step_write(now);
                }
            }
            600..=799 => {
                self.stream().step_sync();
            }
            800..=839 => {
                self.clock += self.random.below(2_000_000_000) as i64;
                let now = self.clock;
                self.stream().step_maintenance(now);
                self.forget_below_first_offset();
            }
            840..=859 => {
                let operations = 1 + self.random.below(40);
                self.event(format!("power loss armed in {operations} operations"));
                self.file_system.crash_after_operations(operations);
            }
            860..=869 => self.power_loss_now()?,
            870..=889 => self.inject_fault(),
            890..=899 => {
                self.event("faults cleared".to_string());
                self.file_system.clear_faults();
            }
            900..=914 => self.flip_a_bit(),
            915..=929 => self.truncate()?,
            930..=939 => self.process_restart()?,
            940..=949 => self.clean_restart()?,
            950..=959 if self.config.encryption.is_some() => self.rotate_key()?,
            960..=969 => self.install_into_follower()?,
            _ => self.check_reads()?,
        }
        if self.stream().status().poisoned.is_some() && self.random.chance(50) {
            self.event("stream poisoned: restarting the process".to_string());
            self.process_restart()?;
        }
        Ok(())
    }

    fn inject_fault(&mut self) {
        let path = match self.random.below(4) {
            0 => ".idx",
            1 => "stream.meta",
            _ => ".log",
        };
        match self.random.below(3) {
            0 => {
                self.summary.failed_syncs += 1;
                let after = self.random.below(4) as u32;
                self.event(format!("one failed sync of {path} after {after}"));
                self.file_system.inject(Fault {
                    operation: Operation::Sync,
                    path_contains: path.to_string(),
                    errno: libc::EIO,
                    after,
                    count: Some(1),
                });
            }
            1 => {
                self.summary.failed_syncs += 1;
                let left = self.random.below(6);
                self.event(format!("every sync fails after {left} more"));
                self.file_system.fail_syncs_after(left);
            }
            _ => {
                self.summary.full_disks += 1;
                let used = self.bytes_used();
                let limit = used + self.random.below(256 * 1024);
                self.event(format!("disk full at {limit} bytes ({used} used)"));
                self.file_system.set_space_limit(limit);
            }
        }
    }

    fn bytes_used(&self) -> u64 {
        let mut used = 0;
        let mut pending = vec![PathBuf::from("/sim")];
        while let Some(directory) = pending.pop() {
            for name in self.file_system.list(&directory).unwrap_or_default() {
                let path = directory.join(name);
                if self.file_system.is_directory(&path) {
                    pending.push(path);
                } else {
                    used += self.file_system.file_length(&path).unwrap_or(0);
                }
            }
        }
        used
    }

    /// Flips one bit in the durable part of a segment or the metadata.
    fn flip_a_bit(&mut self) {
        let directory = Path::new(DIRECTORY);
        let names: Vec<String> = self
            .file_system
            .list(directory)
            .unwrap_or_default()
            .into_iter()
            .filter(|name| name.ends_with(".log") || name == "stream.meta")
            .collect();
        if names.is_empty() {
            return;
        }
        let name = names[self.random.below(names.len() as u64) as usize].clone();
        let path = directory.join(&name);
        let Ok(durable) = self.file_system.durable_bytes(&path) else {
            return;
        };
        if durable.is_empty() {
            return;
        }
        let bit = self.random.below(durable.len() as u64 * 8);
        if self.file_system.flip_bit(&path, bit).is_ok() {
            self.summary.bit_flips += 1;
            self.model.damaged = true;
            self.model.metadata_damaged |= name == "stream.meta";
            self.event(format!("bit {bit} of {name} flipped"));
        }
    }

    /// Offsets retention removed are no longer owed.
    fn forget_below_first_offset(&mut self) {
        let first = self.stream().status().first_offset;
        self.model.stored = self.model.stored.split_off(&first);
        self.model.durable = self.model.durable.split_off(&first);
        self.model.acknowledged = self.model.acknowledged.split_off(&first);
    }

    /// Offsets from `offset` on are no longer owed (a truncation).
    fn forget_from(&mut self, offset: u64) {
        self.model.stored.split_off(&offset);
        self.model.durable.split_off(&offset);
        self.model.acknowledged.split_off(&offset);
        self.model.lost.split_off(&offset);
    }

    fn truncate(&mut self) -> std::result::Result<(), String> {
        let status = self.stream().status();
        if status.next_offset <= status.first_offset + 1 {
            return Ok(());
        }
        let span = status.next_offset - status.first_offset;
        let from_offset = status.next_offset - 1 - self.random.below(span.min(400));
        self.summary.truncations += 1;
        if self.random.chance(50) {
            self.event(format!("online truncation from offset {from_offset}"));
            match self.stream().log().truncate_from_offset(from_offset) {
                Ok(report) => self.forget_from(report.next_offset),
                Err(error) => {
                    self.event(format!("online truncation failed: {error}"));
                    self.model.uncertain_cuts.push(from_offset);
                }
            }
        } else {
            self.close_stream();
            self.event(format!("offline truncation from offset {from_offset}"));
            let file_system: Arc<dyn FileSystem> = Arc::new(self.file_system.clone());
            match RecoveryManager::truncate_suffix(&file_system, Path::new(DIRECTORY), from_offset)
            {
                Ok(report) => self.forget_from(report.next_offset),
                Err(error) => {
                    self.event(format!("offline truncation failed: {error}"));
                    self.model.uncertain_cuts.push(from_offset);
                }
            }
            if self.file_system.has_crashed() {
                return self.power_loss();
            }
            self.reopen_and_check(false)?;
        }
        Ok(())
    }

    fn close_stream(&mut self) {
        if let Some(stream) = self.stream.take() {
            if let Err(error) = stream.close() {
                self.event(format!("close failed: {error}"));
            }
        }
        let _ = self.collect();
    }

    fn clean_restart(&mut self) -> std::result::Result<(), String> {
        self.event("clean restart".to_string());
        self.close_stream();
        self.collect()?;
        if self.file_system.has_crashed() {
            return self.power_loss();
        }
        self.reopen_and_check(false)
    }

    fn process_restart(&mut self) -> std::result::Result<(), String> {
        self.summary.restarts += 1;
        self.event("process restart (page cache survives)".to_string());
        // The threads stop mattering: nothing more is written or synced.
        if let Some(stream) = self.stream.take() {
            stream
                .abandon()
                .expect("the simulator drives its streams manually");
        }
        self.collect()?;
        self.file_system.clear_faults();
        self.reopen_and_check(false)
    }

    fn power_loss_now(&mut self) -> std::result::Result<(), String> {
        self.event("power loss".to_string());
        self.power_loss()
    }

    /// Every slot of every segment (verbose runs): position, offsets,
    /// generation, durable position.
    fn dump_segments(&mut self) {
        if !self.verbose {
            return;
        }
        let directory = Path::new(DIRECTORY);
        let names = self.file_system.list(directory).unwrap_or_default();
        eprintln!("  files: {names:?}");
        for name in names {
            let path = directory.join(&name);
            if name == "stream.meta" || name.ends_with(".idx") || name.ends_with(".intent") {
                let described = self.file_system.read(&path).map(|bytes| {
                    if name.ends_with(".intent") {
                        format!(
                            "{:?}",
                            crate::format::intent::TruncationIntent::decode(&bytes).map(|intent| (
                                intent.from_offset,
                                intent.segment_base,
                                intent.position,
                                intent.replacement.len()
                            ))
                        )
                    } else if name.ends_with(".idx") {
                        format!(
                            "{:?}",
                            crate::format::index::decode_index_header(&bytes)
                                .map(|(header, _)| header)
                        )
                    } else {
                        format!(
                            "{:?}",
                            crate::format::metadata::StreamMetadata::decode(&bytes)
                        )
                    }
                });
                eprintln!("  {name}: {described:?}");
            }
            if !name.ends_with(".log") {
                continue;
            }
            let Ok(bytes) = self.file_system.read(&directory.join(&name)) else {
                continue;
            };
            if let Err(error) =
                crate::format::segment_header::SegmentHeader::decode(&bytes, Path::new(&name))
            {
                eprintln!("  {name} ({} bytes): {error}", bytes.len());
                continue;
            }
            let slots: Vec<String> = crate::format::frame::slot_chain(&bytes)
                .iter()
                .map(|chained| match &chained.frame {
                    crate::format::frame::FrameCheck::Valid(frame) => format!(
                        "{}:{}+{} g{} d{}",
                        chained.position,
                        frame.base_offset,
                        frame.record_count,
                        chained.slot.generation,
                        chained.slot.durable_position
                    ),
                    other => format!(
                        "{}: {other:?} g{} d{}",
                        chained.position, chained.slot.generation, chained.slot.durable_position
                    ),
                })
                .collect();
            eprintln!("  {name} ({} bytes): {}", bytes.len(), slots.join(", "));
        }
    }

    fn power_loss(&mut self) -> std::result::Result<(), String> {
        self.dump_segments();
        self.summary.power_losses += 1;
        if let Some(stream) = self.stream.take() {
            stream
                .abandon()
                .expect("the simulator drives its streams manually");
        }
        self.collect()?;
        let seed = self.random.next();
        self.file_system = self.file_system.crash(seed);
        self.event(format!("disk after the power loss (tear seed {seed})"));
        self.dump_segments();
        self.reopen_and_check(true)
    }

    fn rotate_key(&mut self) -> std::result::Result<(), String> {
        self.close_stream();
        self.key_id = self.key_id % KEYS + 1;
        self.summary.key_rotations += 1;
        self.event(format!("key rotation to key {}", self.key_id));
        self.reopen_and_check(false)
    }

    /// Opens again (repairing when an injected bit flip is found) and
    /// checks every invariant against the model.
    fn reopen_and_check(&mut self, power_lost: bool) -> std::result::Result<(), String> {
        let report = match self.open(RecoveryMode::Strict) {
            Ok(report) => report,
            Err(error)
                if error.is_corruption() && (self.model.damaged || self.model.metadata_damaged) =>
            {
                self.event(format!("open refused damage: {error}"));
                return self.repair();
            }
            Err(error) if self.file_system.has_crashed() => {
                self.event(format!("open crashed: {error}"));
                return self.power_loss();
            }
            Err(error @ (Error::Poisoned { .. } | Error::Io { .. } | Error::DiskFull { .. })) => {
                // The disk still fails: the operator fixes it, then starts
                // natswal again.
                self.event(format!("open failed on the failing disk: {error}"));
                self.file_system.clear_faults();
                return self.reopen_and_check(power_lost);
            }
            Err(error) => return fail(format!("open failed: {error}")),
        };
        if !report.quarantined.is_empty() || !report.lost.is_empty() {
            return fail(format!("a strict open changed data: {report:?}"));
        }
        // Sticky until a check: a repair (or a power loss in one) after this
        // open may hide the torn tail it reported behind a clean mark.
        self.torn_reported |= !report.truncated.is_empty();
        for tail in &report.truncated {
            self.event(format!(
                "open left a torn tail of {} at byte {} ({} frames after it): {}",
                tail.segment.display(),
                tail.position,
                tail.frames_dropped,
                tail.reason
            ));
        }
        self.check(power_lost)
    }

    fn repair(&mut self) -> std::result::Result<(), String> {
        self.summary.repairs += 1;
        self.stream = None;
        // An operator repairs once the disk works again.
        self.file_system.clear_faults();
        let report = match self.open(RecoveryMode::Repair) {
            Ok(report) => report,
            Err(error) if self.file_system.has_crashed() => {
                self.event(format!("repair crashed: {error}"));
                return self.power_loss();
            }
            Err(error) => return fail(format!("repair failed: {error}")),
        };
        for lost in &report.lost {
            self.model.lost.extend(lost.first_offset..lost.next_offset);
        }
        self.event(format!(
            "repaired: {} ranges quarantined, {} torn tails cut, lost {:?}",
            report.quarantined.len(),
            report.truncated.len(),
            report
                .lost
                .iter()
                .map(|lost| (lost.first_offset, lost.next_offset))
                .collect::<Vec<_>>()
        ));
        // The open before the repair may have reported the torn tail (and a
        // clean close since made the log end there).
        self.torn_reported |= !report.truncated.is_empty();
        // A repair recovers from damage; the page cache holds what it wrote
        // (but an older damaged metadata copy may still be the durable one).
        let metadata_damaged = self.model.metadata_damaged;
        self.check(true)?;
        self.model.metadata_damaged = metadata_damaged;
        Ok(())
    }

    /// Reads the whole stream and checks it against the model; then the
    /// model is what is stored.
    fn check(&mut self, power_lost: bool) -> std::result::Result<(), String> {
        self.summary.checks += 1;
        let status = self.stream().status();
        let mut uncertain_cuts = std::mem::take(&mut self.model.uncertain_cuts);
        uncertain_cuts.sort_unstable();
        // A truncation was finished by the open (its intent was durable) if
        // the log now ends at or before its cut: a cut at a frame boundary,
        // never more than one frame below `from_offset`.
        let frame_span = u64::from(self.config.frame_records_max) + 8;
        let finished = uncertain_cuts.into_iter().find(|from_offset| {
            status.next_offset <= *from_offset && status.next_offset + frame_span >= *from_offset
        });
        if let Some(from_offset) = finished {
            self.event(format!(
                "the failed truncation from {from_offset} was finished: the log ends at {}",
                status.next_offset
            ));
            self.forget_from(status.next_offset);
        }
        let mut reader = self
            .stream()
            .reader(StartPosition::Earliest, None)
            .map_err(|error| format!("reader: {error}"))?;
        let mut stored = BTreeMap::new();
        let mut seen = BTreeSet::new();
        let mut previous: Option<u64> = None;
        loop {
            let record = match reader.next() {
                Ok(Some(record)) => record,
                Ok(None) => break,
                Err(error) if error.is_corruption() && self.model.damaged => {
                    self.event(format!("read found the damage: {error}"));
                    self.close_stream();
                    return self.repair();
                }
                Err(error) => return fail(format!("read failed: {error}")),
            };
            let number = std::str::from_utf8(&record.subject)
                .ok()
                .and_then(|subject| subject.rsplit_once(".n"))
                .and_then(|(_, number)| number.parse::<usize>().ok())
                .filter(|number| *number < self.model.submitted.len());
            let Some(number) = number else {
                return fail(format!(
                    "offset {}: a record that was never written: {:?}",
                    record.offset, record.subject
                ));
            };
            let written = &self.model.submitted[number];
            if written.subject != record.subject
                || written.headers != record.headers
                || written.payload != record.payload
                || written.timestamp_ns != record.timestamp_ns
            {
                return fail(format!(
                    "offset {}: the record differs from submission {number} as written",
                    record.offset
                ));
            }
            if !seen.insert(number) {
                return fail(format!(
                    "submission {number} stored twice (again at {})",
                    record.offset
                ));
            }
            let gap_start = previous.map_or(status.first_offset, |previous| previous + 1);
            self.check_gap(gap_start, record.offset)?;
            previous = Some(record.offset);
            stored.insert(record.offset, number);
        }
        let gap_start = previous.map_or(status.first_offset, |previous| previous + 1);
        self.check_gap(gap_start, status.next_offset)?;
        let required = if power_lost {
            &self.model.durable
        } else {
            &self.model.acknowledged
        };
        // A flipped bit in the last group commit, with nothing after it to
        // prove it was durable, is indistinguishable from a torn write: the
        // open reports a torn tail and the log ends there (FORMAT.md 7.6).
        let end_allowed = (self.model.damaged && self.torn_reported).then_some(status.next_offset);
        for offset in required.range(status.first_offset..) {
            if self.model.lost.contains(offset) || end_allowed.is_some_and(|end| *offset >= end) {
                continue;
            }
            let owed = self.model.stored.get(offset);
            if stored.get(offset) != owed {
                return fail(format!(
                    "acknowledged offset {offset} (submission {owed:?}) lost: found {:?} (the stream holds offsets {}..{})",
                    stored.get(offset),
                    status.first_offset,
                    status.next_offset
                ));
            }
        }
        if !self.model.damaged && status.next_offset < required.last().map_or(0, |last| last + 1) {
            return fail("the stream ends before an acknowledged offset".to_string());
        }
        self.event(format!(
            "checked: {} records, offsets {}..{}",
            stored.len(),
            status.first_offset,
            status.next_offset
        ));
        // What is there now is what is owed from now on: durable after a
        // power loss, visible after a restart.
        let end = status.next_offset;
        self.model
            .durable
            .retain(|offset| *offset < end && stored.contains_key(offset));
        self.model
            .acknowledged
            .retain(|offset| *offset < end && stored.contains_key(offset));
        if power_lost {
            self.model.durable.extend(stored.keys().copied());
        }
        self.model.acknowledged.extend(stored.keys().copied());
        self.model.stored = stored;
        self.model.lost.retain(|offset| *offset < end);
        // Everything was read without an error: a flipped bit left nothing
        // that could be read as data.
        self.model.damaged = false;
        self.torn_reported = false;
        // After a power loss the durable files are the files: an older,
        // damaged copy of the metadata cannot come back any more.
        if power_lost {
            self.model.metadata_damaged = false;
        }
        Ok(())
    }

    /// Offsets `[start, end)` hold no record: each was reported lost by a
    /// repair, or a gap frame records it (a repair that crashed after
    /// writing its gap frame could not report it).
    fn check_gap(&mut self, start: u64, end: u64) -> std::result::Result<(), String> {
        let missing = (start..end).find(|offset| !self.model.lost.contains(offset));
        let Some(missing) = missing else {
            return Ok(());
        };
        if !self.gap_recorded(start, end) {
            return fail(format!(
                "offsets {start}..{end} hold no record: {missing} is missing and no repair recorded it"
            ));
        }
        self.event(format!("offsets {start}..{end} are a recorded gap"));
        self.model.lost.extend(start..end);
        Ok(())
    }

    /// True when gap frames (a repair's record of lost offsets) cover
    /// `[start, end)`.
    fn gap_recorded(&self, start: u64, end: u64) -> bool {
        let frames = self
            .stream()
            .log()
            .read_frames(crate::log::FrameRange::Offset { start, end });
        match frames {
            Ok(frames) => {
                !frames.is_empty()
                    && frames.iter().all(|frame| {
                        frame.header.kind == crate::format::frame::FrameKind::Gap
                            || frame.header.next_offset() <= start
                            || frame.header.base_offset >= end
                    })
            }
            Err(_) => false,
        }
    }

    fn check_reads(&mut self) -> std::result::Result<(), String> {
        let mut reader = self
            .stream()
            .reader(StartPosition::Earliest, None)
            .map_err(|error| format!("reader: {error}"))?;
        loop {
            match reader.next() {
                Ok(Some(record)) => {
                    if let Some(number) = self.model.stored.get(&record.offset) {
                        let written = &self.model.submitted[*number];
                        if written.payload != record.payload || written.subject != record.subject {
                            return fail(format!("offset {} reads other data", record.offset));
                        }
                    }
                }
                Ok(None) => return Ok(()),
                Err(error) if error.is_corruption() && self.model.damaged => return Ok(()),
                Err(Error::Injected(_)) => return Ok(()),
                Err(Error::SegmentRemoved { .. }) if self.stream().status().poisoned.is_some() => {
                    return Ok(())
                }
                Err(error) if self.file_system.has_crashed() || error.kind_name() == "io" => {
                    return Ok(())
                }
                Err(error) => return fail(format!("read failed: {error}")),
            }
        }
    }

    /// Installs the stream's sealed segments into a new follower log, with
    /// a power loss at a random step sometimes; the follower holds whole
    /// segments of the stream's records.
    fn install_into_follower(&mut self) -> std::result::Result<(), String> {
        if self.model.damaged {
            return Ok(());
        }
        let sealed = self.stream().sealed_segments();
        let Some(first) = sealed.first() else {
            return Ok(());
        };
        self.summary.installs += 1;
        self.followers += 1;
        let directory = PathBuf::from(format!("/sim/follower-{}", self.followers));
        let follower_system = self.file_system.crash(self.random.next());
        follower_system.clear_faults();
        let file_system: Arc<dyn FileSystem> = Arc::new(follower_system.clone());
        let config = self.stream_config();
        let keyring = Arc::clone(&self.keyring);
        let open_follower = |file_system: &Arc<dyn FileSystem>| {
            Log::open(
                Arc::clone(file_system),
                &directory,
                LogOptions {
                    name: "follower".to_string(),
                    config: config.clone(),
                    recovery_mode: RecoveryMode::Strict,
                    keyring: Arc::clone(&keyring),
                    node_id: 2,
                    cache: Arc::new(SegmentCache::new(2)),
                    store_locked: None,
                    group_sync: None,
                },
            )
            .map(|(log, _)| log)
        };
        let follower = open_follower(&file_system).map_err(|error| format!("follower: {error}"))?;
        if follower.written().next_offset != first.base_offset {
            // Retention removed the stream's first segments: a follower
            // would start from a snapshot, which is replication's business.
            return Ok(());
        }
        let crash_at = self.random.chance(50).then(|| 1 + self.random.below(12));
        let mut installed = 0;
        for segment in &sealed {
            let Ok(bytes) = follower_system.read(&segment.path) else {
                return Ok(());
            };
            let received = follower
                .incoming_path(segment.base_offset)
                .map_err(|error| format!("incoming: {error}"))?;
            file_system
                .write_atomic(&received, &bytes)
                .map_err(|error| format!("receive: {error}"))?;
            if let Some(operations) = crash_at {
                follower_system.crash_after_operations(operations);
            }
            match follower.install_segment(&received, segment) {
                Ok(()) => installed += 1,
                Err(_) if follower_system.has_crashed() => break,
                Err(error) => {
                    return fail(format!("install of {}: {error}", segment.path.display()))
                }
            }
            if follower_system.has_crashed() {
                break;
            }
        }
        drop(follower);
        let after = follower_system.crash(self.random.next());
        let after_system: Arc<dyn FileSystem> = Arc::new(after);
        let follower =
            open_follower(&after_system).map_err(|error| format!("follower reopen: {error}"))?;
        let next = follower.written().next_offset;
        let whole = sealed
            .iter()
            .take(installed + 1)
            .any(|segment| segment.next_offset == next)
            || next == first.base_offset;
        if !whole {
            return fail(format!(
                "the follower ends at offset {next}, inside a segment"
            ));
        }
        let mut reader = crate::reader::Reader::new(follower, StartPosition::Earliest, None)
            .map_err(|error| format!("follower reader: {error}"))?;
        while let Some(record) = reader
            .next()
            .map_err(|error| format!("follower read: {error}"))?
        {
            if let Some(number) = self.model.stored.get(&record.offset) {
                if self.model.submitted[*number].payload != record.payload {
                    return fail(format!(
                        "follower offset {} holds other data",
                        record.offset
                    ));
                }
            }
        }
        self.event(format!(
            "follower holds offsets up to {next} ({installed} installed)"
        ));
        Ok(())
    }
}

/// Runs one seed.
pub fn run_seed(seed: u64, options: &SimOptions) -> std::result::Result<SimSummary, SimFailure> {
    let mut simulation = Simulation::new(seed, options.verbose);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        simulation.run(options.steps)
    }));
    let message = match outcome {
        Ok(Ok(())) => return Ok(simulation.summary),
        Ok(Err(message)) => message,
        Err(panic) => format!(
            "panicked: {}",
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|text| text.to_string()))
                .unwrap_or_default()
        ),
    };
    Err(SimFailure {
        seed,
        step: simulation.step,
        message,
        events: simulation.events.into_iter().collect(),
    })
}

/// Runs `count` seeds from `first`; `progress` sees each finished seed.
pub fn run_seeds(
    first: u64,
    count: u64,
    options: &SimOptions,
    progress: &mut dyn FnMut(u64, &std::result::Result<SimSummary, SimFailure>),
) -> (SimSummary, Vec<SimFailure>) {
    let mut total = SimSummary::default();
    let mut failures = Vec::new();
    for seed in first..first + count {
        let result = run_seed(seed, options);
        progress(seed, &result);
        match result {
            Ok(summary) => total.add(&summary),
            Err(failure) => {
                total.seeds += 1;
                failures.push(failure);
            }
        }
    }
    (total, failures)
}
