//! Bounded resources: with many streams of many sealed segments sharing one
//! small SegmentCache, reading everything keeps at most the cache's
//! capacity of sealed segments open, open file descriptors do not grow with
//! the number of segments, and nothing is memory-mapped (reads are pread).
//!
//! This binary holds a single test, so the process-wide counts it takes
//! from /proc/self are its own.

mod common;

use natswal::{Durability, Record, Store, StreamConfig, StreamOptions, FIRST_OFFSET};
use std::path::Path;

const STREAMS: usize = 6;
const CACHE_CAPACITY: usize = 4;
const RECORDS_PER_STREAM: u64 = 6000;

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// Lines of /proc/self/maps that map a file under `directory`.
fn maps_under(directory: &Path) -> Vec<String> {
    let prefix = directory.display().to_string();
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .lines()
        .filter(|line| line.contains(&prefix))
        .map(str::to_string)
        .collect()
}

fn stream_record(stream: usize, index: u64) -> Record {
    let mut record = common::record(index);
    record.subject = format!("s{stream}.{index}").into();
    record
}

#[tokio::test]
async fn many_segments_of_many_streams_stay_within_the_cache() {
    let root = tempfile::tempdir().unwrap();
    let descriptors_before = open_descriptors();
    let store = Store::open(root.path(), natswal::io::WriteMode::Pwrite, CACHE_CAPACITY).unwrap();
    let config = StreamConfig {
        durability: Durability::None,
        ..common::small_config()
    };
    let mut streams = Vec::new();
    for index in 0..STREAMS {
        let (stream, _) = store
            .open_stream(
                &format!("stream-{index}"),
                StreamOptions {
                    config: config.clone(),
                    ..StreamOptions::default()
                },
            )
            .unwrap();
        let records: Vec<Record> = (0..RECORDS_PER_STREAM)
            .map(|record_index| stream_record(index, record_index))
            .collect();
        common::append_all(&stream, &records).await;
        common::wait_sealed_segments_indexed(&stream).await;
        streams.push(stream);
    }
    let segments: usize = streams.iter().map(|stream| stream.status().segments).sum();
    assert!(
        segments >= STREAMS * 8,
        "{segments} segments in {STREAMS} streams"
    );
    // Read every stream, interleaved, so the shared cache keeps evicting.
    let mut readers: Vec<_> = streams
        .iter()
        .map(|stream| {
            stream
                .reader(natswal::StartPosition::Earliest, None)
                .unwrap()
        })
        .collect();
    // The index of the record each reader reads next (at FIRST_OFFSET + it).
    let mut next = [0u64; STREAMS];
    for _ in 0..RECORDS_PER_STREAM {
        for (index, reader) in readers.iter_mut().enumerate() {
            let stored = reader.next().unwrap().expect("a record");
            common::assert_record(
                &stored,
                &stream_record(index, next[index]),
                FIRST_OFFSET + next[index],
            );
            next[index] += 1;
            assert!(store.cache().open_count() <= CACHE_CAPACITY);
        }
    }
    for reader in &mut readers {
        assert!(reader.next().unwrap().is_none());
    }
    drop(readers);

    let open = store.cache().open_count();
    assert!(open <= CACHE_CAPACITY, "{open} sealed segments open");
    assert!(open > 0, "reading opened sealed segments through the cache");
    let descriptors = open_descriptors();
    // Per stream one descriptor for the active segment and one for the
    // directory lock, the cache's open sealed segments, plus a little slack
    // for the runtime; never one per segment.
    assert!(
        descriptors <= descriptors_before + 2 * STREAMS + CACHE_CAPACITY + 4,
        "{descriptors} descriptors open, {descriptors_before} before; {segments} segments"
    );
    let maps = maps_under(root.path());
    assert!(
        maps.is_empty(),
        "reads are pread, never maps of {}:\n{}",
        root.path().display(),
        maps.join("\n")
    );
    store.close().unwrap();
    drop(streams);
    drop(store);
    let descriptors = open_descriptors();
    assert!(
        descriptors <= descriptors_before + 2,
        "closing closes every file: {descriptors} open, {descriptors_before} before"
    );
}
