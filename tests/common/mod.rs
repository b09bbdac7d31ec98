//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use natswal::io::os::OsFileSystem;
use natswal::io::{FileSystem, WriteMode};
use natswal::segment::cache::SegmentCache;
use natswal::{Record, StartPosition, StoredRecord, Stream, StreamConfig, StreamOptions};
use std::path::Path;
use std::sync::Arc;

pub fn os_file_system() -> Arc<dyn FileSystem> {
    Arc::new(OsFileSystem::new(WriteMode::Mmap))
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

/// Every record of a stream from the start.
pub fn read_all(stream: &Stream) -> natswal::Result<Vec<StoredRecord>> {
    let mut reader = stream.reader(StartPosition::Earliest, None)?;
    let mut records = Vec::new();
    while let Some(record) = reader.next()? {
        records.push(record);
    }
    Ok(records)
}

/// Asserts `stored` is the first `stored.len()` of `expected`, with offsets 0..
pub fn assert_prefix(stored: &[StoredRecord], expected: &[Record]) {
    assert!(
        stored.len() <= expected.len(),
        "{} records stored, only {} written",
        stored.len(),
        expected.len()
    );
    for (index, (got, want)) in stored.iter().zip(expected).enumerate() {
        assert_eq!(got.offset, index as u64, "offset of record {index}");
        assert_eq!(got.subject, want.subject, "subject of record {index}");
        assert_eq!(got.headers, want.headers, "headers of record {index}");
        assert_eq!(got.payload, want.payload, "payload of record {index}");
    }
}
