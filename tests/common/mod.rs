//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use natswal::io::os::OsFileSystem;
use natswal::io::{FileSystem, WriteMode};
use natswal::{
    Record, SegmentCache, StartPosition, StoredRecord, Stream, StreamConfig, StreamOptions,
    FIRST_OFFSET,
};
use std::path::Path;
use std::sync::Arc;

pub fn os_file_system() -> Arc<dyn FileSystem> {
    Arc::new(OsFileSystem::new(WriteMode::Pwrite))
}

/// The real file system writing through a shared map.
pub fn mmap_file_system() -> Arc<dyn FileSystem> {
    Arc::new(OsFileSystem::new(WriteMode::Mmap))
}

/// Options of a standalone Log (strict recovery, no keys, node 1).
pub fn log_options(name: &str, config: StreamConfig) -> natswal::LogOptions {
    natswal::LogOptions {
        name: name.to_string(),
        config,
        recovery_mode: natswal::RecoveryMode::Strict,
        keyring: Arc::new(natswal::Keyring::default()),
        node_id: 1,
        cache: Arc::new(SegmentCache::new(8)),
        store_locked: None,
        group_sync: None,
    }
}

/// A small-segment configuration so tests cross segment boundaries quickly.
pub fn small_config() -> StreamConfig {
    StreamConfig {
        segment_bytes_max: 64 * 1024,
        record_bytes_max: 16 * 1024,
        frame_bytes_max: 8 * 1024,
        queue_bytes_max: 1024 * 1024,
        unsynced_bytes_max: 64 * 1024,
        index_interval_bytes: 1024,
        checkpoint_interval_bytes: 16 * 1024,
        ..StreamConfig::default()
    }
}

pub fn open(
    file_system: &Arc<dyn FileSystem>,
    directory: &Path,
    config: StreamConfig,
) -> natswal::Result<Stream> {
    let options = StreamOptions {
        config,
        ..StreamOptions::default()
    };
    Stream::open(
        Arc::clone(file_system),
        directory,
        "test",
        Arc::new(SegmentCache::new(8)),
        options,
    )
    .map(|(stream, _)| stream)
}

/// A record whose contents identify its position in the test.
pub fn record(index: u64) -> Record {
    let mut record = Record::new(
        format!("orders.{}.{}", index % 3, index),
        format!("payload-{index}-{}", "x".repeat((index % 50) as usize)),
    );
    if index % 4 == 0 {
        record.headers = bytes::Bytes::from(format!("NATS/1.0\r\nNats-Msg-Id: {index}\r\n\r\n"));
    }
    record
}

/// The index (from 0, in append order) of the record stored at `offset` in a
/// stream whose first record has [`FIRST_OFFSET`]; panics for an offset
/// below it, which no record may have.
pub fn index_of(offset: u64) -> usize {
    let index = offset
        .checked_sub(FIRST_OFFSET)
        .unwrap_or_else(|| panic!("offset {offset} is below the first offset {FIRST_OFFSET}"));
    usize::try_from(index).unwrap()
}

/// Every record of a stream from the start.
pub fn read_all(stream: &Stream) -> natswal::Result<Vec<StoredRecord>> {
    let mut reader = stream.reader(StartPosition::Earliest, None)?;
    let mut records = Vec::new();
    while let Some(record) = reader.next()? {
        records.push(record);
    }
    Ok(records)
}

/// Asserts `stored` is the first `stored.len()` of `expected`, with dense
/// offsets from [`FIRST_OFFSET`]: record `index` has offset
/// `FIRST_OFFSET + index`.
pub fn assert_prefix(stored: &[StoredRecord], expected: &[Record]) {
    assert!(
        stored.len() <= expected.len(),
        "{} records stored, only {} written",
        stored.len(),
        expected.len()
    );
    for (index, (got, want)) in stored.iter().zip(expected).enumerate() {
        assert_eq!(
            got.offset,
            FIRST_OFFSET + index as u64,
            "offset of record {index}"
        );
        assert_eq!(got.subject, want.subject, "subject of record {index}");
        assert_eq!(got.headers, want.headers, "headers of record {index}");
        assert_eq!(got.payload, want.payload, "payload of record {index}");
    }
}

/// Options with `config` and the default (strict) recovery mode.
pub fn options(config: StreamConfig) -> StreamOptions {
    StreamOptions {
        config,
        ..StreamOptions::default()
    }
}

/// Opens a stream with its own cache and returns the recovery report too.
pub fn open_reported(
    file_system: &Arc<dyn FileSystem>,
    directory: &Path,
    options: StreamOptions,
) -> natswal::Result<(Stream, natswal::RecoveryReport)> {
    Stream::open(
        Arc::clone(file_system),
        directory,
        "test",
        Arc::new(SegmentCache::new(8)),
        options,
    )
}

/// Asserts a stored record is `want` at `offset`, byte for byte. `offset` is
/// the absolute offset (the first record of a stream has [`FIRST_OFFSET`]).
pub fn assert_record(got: &StoredRecord, want: &Record, offset: u64) {
    assert_eq!(got.offset, offset, "offset");
    assert_eq!(got.subject, want.subject, "subject of record {offset}");
    assert_eq!(got.headers, want.headers, "headers of record {offset}");
    assert_eq!(got.payload, want.payload, "payload of record {offset}");
}

/// Asserts `stored` is exactly `expected` with dense offsets from
/// [`FIRST_OFFSET`].
pub fn assert_exactly(stored: &[StoredRecord], expected: &[Record]) {
    assert_eq!(
        stored.len(),
        expected.len(),
        "number of records read back (first offsets read: {:?})",
        stored.iter().take(3).map(|r| r.offset).collect::<Vec<_>>()
    );
    assert_prefix(stored, expected);
}

/// Reads from the start until caught up or an error; returns what was read
/// and the error, if any.
pub fn read_until_error(stream: &Stream) -> (Vec<StoredRecord>, Option<natswal::Error>) {
    let mut records = Vec::new();
    let mut reader = match stream.reader(StartPosition::Earliest, None) {
        Ok(reader) => reader,
        Err(error) => return (records, Some(error)),
    };
    // Bounded: a log never holds more records than this in these tests.
    for _ in 0..10_000_000 {
        match reader.next() {
            Ok(Some(record)) => records.push(record),
            Ok(None) => return (records, None),
            Err(error) => return (records, Some(error)),
        }
    }
    panic!("reader did not catch up after 10 million records");
}

/// Appends `records` with many in flight (one producer, so offsets follow
/// the order of `records`) and returns their outcomes in order.
pub async fn append_all(stream: &Stream, records: &[Record]) -> Vec<natswal::AppendOutcome> {
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    for (index, record) in records.iter().enumerate() {
        let request = natswal::AppendRequest {
            records: vec![record.clone()],
            ..natswal::AppendRequest::default()
        };
        let completion = natswal::Completion::Channel {
            sender: sender.clone(),
            token: index as u64,
        };
        stream.submit(request, completion).await.unwrap();
    }
    drop(sender);
    let mut outcomes = vec![None; records.len()];
    let deadline = std::time::Duration::from_secs(60);
    for _ in 0..records.len() {
        let completed = tokio::time::timeout(deadline, receiver.recv())
            .await
            .expect("appends complete within a minute")
            .expect("every append completes");
        outcomes[completed.token as usize] = Some(completed.result.unwrap());
    }
    outcomes.into_iter().map(Option::unwrap).collect()
}

/// Waits, without polling, until `condition` holds: every change of the
/// stream (appends made visible, segments sealed) wakes a reader's `wait`.
pub async fn wait_until(
    stream: &Stream,
    what: &str,
    timeout: std::time::Duration,
    mut condition: impl FnMut() -> bool,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut reader = stream.reader(StartPosition::Latest, None).unwrap();
    for _ in 0..1_000_000 {
        if condition() {
            return;
        }
        let now = tokio::time::Instant::now();
        assert!(now < deadline, "timed out waiting until {what}");
        let _ = tokio::time::timeout(deadline - now, reader.wait()).await;
    }
    panic!("gave up waiting until {what} after a million wake-ups");
}

/// Waits until every segment but the active one is synced, cut and indexed.
pub async fn wait_sealed_segments_indexed(stream: &Stream) {
    wait_until(
        stream,
        "all sealed segments are indexed",
        std::time::Duration::from_secs(30),
        || stream.sealed_segments().len() + 1 == stream.status().segments,
    )
    .await;
}

/// A frame found in a segment file: its slot starts at `start`, the frame
/// itself at `start + 16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameSpan {
    pub start: u64,
    pub end: u64,
    pub base_offset: u64,
    pub record_count: u32,
    pub atomic: bool,
}

/// The chain of valid slots and frames of a segment image, from its header
/// on (the salt comes from the header).
pub fn frames_of(bytes: &[u8]) -> Vec<FrameSpan> {
    use natswal::format::frame::{slot_chain, FrameCheck};
    slot_chain(bytes)
        .into_iter()
        .map_while(|chained| match chained.frame {
            FrameCheck::Valid(frame) => Some(FrameSpan {
                start: chained.position as u64,
                end: chained.end() as u64,
                base_offset: frame.base_offset,
                record_count: frame.record_count,
                atomic: frame.is_atomic(),
            }),
            _ => None,
        })
        .collect()
}

/// Segment files (`.log`) of a stream directory, in offset order.
pub fn segment_files(directory: &Path) -> Vec<std::path::PathBuf> {
    let mut paths: Vec<_> = std::fs::read_dir(directory)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "log"))
        .collect();
    paths.sort();
    paths
}

/// Copies the files of a stream directory (and its subdirectories) to
/// `target`, skipping incomplete atomic writes (`*.tmp`). A file that
/// vanishes while being copied (a checkpoint being renamed) makes it retry.
pub fn copy_directory(source: &Path, target: &Path) {
    for attempt in 0..10 {
        match try_copy_directory(source, target) {
            Ok(()) => return,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound && attempt < 9 => {
                let _ = std::fs::remove_dir_all(target);
            }
            Err(error) => panic!(
                "cannot copy {} to {}: {error}",
                source.display(),
                target.display()
            ),
        }
    }
}

/// Copies a stream directory including its temporary files.
pub fn copy_directory_with_temporaries(source: &Path, target: &Path) {
    try_copy(source, target, true).unwrap();
}

fn try_copy_directory(source: &Path, target: &Path) -> std::io::Result<()> {
    try_copy(source, target, false)
}

fn try_copy(source: &Path, target: &Path, temporaries: bool) -> std::io::Result<()> {
    std::fs::create_dir_all(target)?;
    for entry in std::fs::read_dir(source)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        if !temporaries && name.to_string_lossy().ends_with(".tmp") {
            continue;
        }
        if entry.file_type()?.is_dir() {
            try_copy(&path, &target.join(&name), temporaries)?;
        } else {
            std::fs::copy(&path, target.join(&name))?;
        }
    }
    Ok(())
}

/// Every file under a directory with its bytes, for "unchanged" checks.
pub fn directory_contents(directory: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut contents = Vec::new();
    let mut pending = vec![directory.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                pending.push(path);
            } else {
                contents.push((path.clone(), std::fs::read(&path).unwrap()));
            }
        }
    }
    contents.sort();
    contents
}

/// A small deterministic generator (SplitMix64), so a failing seeded trial
/// can be replayed.
pub struct Random(pub u64);

impl Random {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut value = self.0;
        value = (value ^ (value >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        value = (value ^ (value >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        value ^ (value >> 31)
    }

    /// A value in `[0, bound)`; `bound` must be nonzero.
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }
}

/// Appends `record(n)` for the next indexes (after `expected`, whose
/// records were appended in order from [`FIRST_OFFSET`]) until an append
/// fails or `expected` holds `until` records; checks each offset and keeps
/// each stored record in `expected`. Returns the failure, if any.
pub async fn append_until_error(
    stream: &Stream,
    expected: &mut Vec<Record>,
    until: u64,
) -> Option<natswal::Error> {
    for index in expected.len() as u64..until {
        let record = record(index);
        match stream.append(record.clone()).await {
            Ok(outcome) => {
                assert_eq!(outcome.first_offset, FIRST_OFFSET + index);
                expected.push(record);
            }
            Err(error) => return Some(error),
        }
    }
    None
}
