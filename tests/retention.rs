//! Retention deletes whole sealed segments, oldest first, by age, bytes or
//! message count, never the active segment; readers inside a deleted
//! segment keep reading.

mod common;

use common::*;
use natswal::retention::RetentionDeletion;
use natswal::SealedSegment;
use natswal::SegmentCache;
use natswal::{
    Record, RetentionPolicy, StartPosition, Stream, StreamConfig, StreamOptions, FIRST_OFFSET,
};
use std::path::Path;
use std::sync::Arc;

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// Small segments, and maintenance so rare that only `enforce_retention`
/// applies the policy during a test.
fn retention_config(retention: RetentionPolicy) -> StreamConfig {
    StreamConfig {
        retention,
        maintenance_interval_ms: 3_600_000,
        ..small_config()
    }
}

fn open_with_cache(directory: &Path, config: StreamConfig, cache_capacity: usize) -> Stream {
    Stream::open(
        os_file_system(),
        directory,
        "test",
        Arc::new(SegmentCache::new(cache_capacity)),
        StreamOptions {
            config,
            ..StreamOptions::default()
        },
    )
    .unwrap()
    .0
}

/// Writes `records`, waits until every sealed segment is indexed and
/// returns the sealed segments.
async fn fill(stream: &Stream, records: &[Record]) -> Vec<SealedSegment> {
    append_all(stream, records).await;
    wait_sealed_segments_indexed(stream).await;
    let sealed = stream.sealed_segments();
    assert!(sealed.len() >= 4, "{} sealed segments", sealed.len());
    sealed
}

fn assert_deleted(
    directory: &Path,
    deletions: &[RetentionDeletion],
    sealed: &[SealedSegment],
    expected_count: usize,
    reason: &str,
) {
    assert_eq!(
        deletions.len(),
        expected_count,
        "deleted {:?}",
        deletions.iter().map(|d| d.base_offset).collect::<Vec<_>>()
    );
    for (deletion, segment) in deletions.iter().zip(sealed) {
        // Oldest first, whole segments.
        assert_eq!(deletion.base_offset, segment.base_offset);
        assert_eq!(deletion.next_offset, segment.next_offset);
        assert_eq!(deletion.records, segment.next_offset - segment.base_offset);
        assert_eq!(deletion.bytes, segment.length);
        assert_eq!(deletion.reason, reason);
        assert!(
            !segment.path.exists(),
            "{} still exists",
            segment.path.display()
        );
        assert!(!segment.path.with_extension("idx").exists());
    }
    for segment in &sealed[expected_count..] {
        assert!(segment.path.exists(), "{} was kept", segment.path.display());
    }
    assert!(directory.exists());
}

/// The stream now holds exactly the records of `expected` from offset
/// `first` on (`expected[index_of(first)..]`), readable from Earliest.
fn assert_holds_from(stream: &Stream, expected: &[Record], first: u64) {
    let status = stream.status();
    let held = (expected.len() - index_of(first)) as u64;
    assert_eq!(status.first_offset, first, "{status:?}");
    assert_eq!(status.records, held, "{status:?}");
    let records = read_all(stream).unwrap();
    assert_eq!(records.len() as u64, held);
    for (stored, offset) in records.iter().zip(first..) {
        assert_record(stored, &expected[index_of(offset)], offset);
    }
}

#[tokio::test]
async fn retention_by_age_deletes_segments_whose_newest_record_is_too_old() {
    let directory = tempfile::tempdir().unwrap();
    let stream = open_with_cache(
        directory.path(),
        retention_config(RetentionPolicy {
            age_max_ms: Some(60_000),
            ..RetentionPolicy::default()
        }),
        8,
    );
    let now = now_ns();
    let hour_ns = 3_600_000_000_000i64;
    // Records 0..2500 (offsets FIRST_OFFSET..FIRST_OFFSET + 2500) are two
    // hours old, the rest are from now.
    let expected: Vec<Record> = (0..4000u64)
        .map(|index| {
            let mut record = record(index);
            record.timestamp_ns = if index < 2500 {
                now - 2 * hour_ns + index as i64
            } else {
                now + index as i64
            };
            record
        })
        .collect();
    let sealed = fill(&stream, &expected).await;
    // Exactly the sealed segments holding only old records, oldest first.
    let old = sealed
        .iter()
        .take_while(|segment| segment.next_offset <= FIRST_OFFSET + 2500)
        .count();
    assert!(old >= 2 && old < sealed.len(), "{old} of {}", sealed.len());
    let deletions = stream.enforce_retention().unwrap();
    assert_deleted(directory.path(), &deletions, &sealed, old, "age");
    assert_holds_from(&stream, &expected, sealed[old].base_offset);
    assert!(
        stream.enforce_retention().unwrap().is_empty(),
        "nothing more is due"
    );
}

#[tokio::test]
async fn retention_never_deletes_the_active_segment() {
    let directory = tempfile::tempdir().unwrap();
    let stream = open_with_cache(
        directory.path(),
        retention_config(RetentionPolicy {
            age_max_ms: Some(1),
            bytes_max: Some(1),
            messages_max: Some(1),
        }),
        8,
    );
    let expected: Vec<Record> = (0..5000u64)
        .map(|index| {
            let mut record = record(index);
            record.timestamp_ns = 1_000 + index as i64;
            record
        })
        .collect();
    let sealed = fill(&stream, &expected).await;
    let deletions = stream.enforce_retention().unwrap();
    assert_deleted(directory.path(), &deletions, &sealed, sealed.len(), "age");
    assert_eq!(stream.status().segments, 1);
    let active_base = sealed.last().unwrap().next_offset;
    assert_holds_from(&stream, &expected, active_base);
    assert!(stream.enforce_retention().unwrap().is_empty());
    // The active segment still takes appends.
    let next = expected.len() as u64;
    assert_eq!(
        stream.append(record(next)).await.unwrap().first_offset,
        FIRST_OFFSET + next
    );
}

#[tokio::test]
async fn retention_by_bytes_keeps_the_newest_segments_that_fit() {
    let directory = tempfile::tempdir().unwrap();
    let bytes_max = 200 * 1024;
    let stream = open_with_cache(
        directory.path(),
        retention_config(RetentionPolicy {
            bytes_max: Some(bytes_max),
            ..RetentionPolicy::default()
        }),
        8,
    );
    let expected: Vec<Record> = (0..6000).map(record).collect();
    let sealed = fill(&stream, &expected).await;
    let mut total = stream.status().bytes;
    assert!(total > bytes_max + 2 * 64 * 1024, "{total}");
    let mut due = 0;
    while total > bytes_max {
        total -= sealed[due].length;
        due += 1;
    }
    let deletions = stream.enforce_retention().unwrap();
    assert_deleted(directory.path(), &deletions, &sealed, due, "bytes");
    let bytes = stream.status().bytes;
    assert!(bytes <= bytes_max, "{bytes} bytes left");
    assert!(
        bytes + sealed[due - 1].length > bytes_max,
        "no more than needed was deleted"
    );
    assert_holds_from(&stream, &expected, sealed[due].base_offset);
}

#[tokio::test]
async fn retention_by_messages_keeps_the_newest_segments_that_fit() {
    let directory = tempfile::tempdir().unwrap();
    let messages_max = 2000;
    let stream = open_with_cache(
        directory.path(),
        retention_config(RetentionPolicy {
            messages_max: Some(messages_max),
            ..RetentionPolicy::default()
        }),
        8,
    );
    let expected: Vec<Record> = (0..6000).map(record).collect();
    let sealed = fill(&stream, &expected).await;
    let mut total = expected.len() as u64;
    let mut due = 0;
    while total > messages_max {
        total -= sealed[due].next_offset - sealed[due].base_offset;
        due += 1;
    }
    assert!(due >= 2);
    let deletions = stream.enforce_retention().unwrap();
    assert_deleted(directory.path(), &deletions, &sealed, due, "messages");
    assert!(stream.status().records <= messages_max);
    assert_holds_from(&stream, &expected, sealed[due].base_offset);
}

#[tokio::test]
async fn readers_inside_deleted_segments_keep_reading() {
    let directory = tempfile::tempdir().unwrap();
    // A cache of one: the deleted segments are not mapped by the cache, so
    // only what each reader holds itself keeps them readable.
    let stream = open_with_cache(
        directory.path(),
        retention_config(RetentionPolicy {
            messages_max: Some(1500),
            ..RetentionPolicy::default()
        }),
        1,
    );
    let expected: Vec<Record> = (0..6000).map(record).collect();
    let sealed = fill(&stream, &expected).await;
    // A reader in the middle of the first segment, its map in hand.
    let mut reading = stream.reader(StartPosition::Earliest, None).unwrap();
    for (index, want) in expected.iter().enumerate().take(10) {
        assert_record(
            &reading.next().unwrap().unwrap(),
            want,
            FIRST_OFFSET + index as u64,
        );
    }
    // Readers positioned inside doomed segments that have not read yet.
    let inside = sealed[1].base_offset + 7;
    let mut positioned = stream.reader(StartPosition::Offset(inside), None).unwrap();
    let mut earliest = stream.reader(StartPosition::Earliest, None).unwrap();
    let deletions = stream.enforce_retention().unwrap();
    assert!(deletions.len() >= 3, "{deletions:?}");
    let first_kept = sealed[deletions.len()].base_offset;
    for (name, reader, start) in [
        ("reading", &mut reading, FIRST_OFFSET + 10),
        ("positioned", &mut positioned, inside),
        ("earliest", &mut earliest, FIRST_OFFSET),
    ] {
        let mut previous = start.checked_sub(1);
        let mut count = 0u64;
        let mut offsets = Vec::new();
        loop {
            let stored = match reader.next() {
                Ok(Some(stored)) => stored,
                Ok(None) => break,
                Err(error) => panic!("{name} reader failed after {count} records: {error}"),
            };
            assert!(
                previous.is_none_or(|previous| stored.offset > previous),
                "{name}: offsets go forward"
            );
            if count == 0 {
                // Either it still reads its own segment, or it moved on to
                // the first record that is still stored.
                assert!(
                    stored.offset == start || stored.offset == first_kept,
                    "{name} reader resumed at {}",
                    stored.offset
                );
            }
            assert_record(&stored, &expected[index_of(stored.offset)], stored.offset);
            previous = Some(stored.offset);
            offsets.push(stored.offset);
            count += 1;
            assert!(count <= expected.len() as u64);
        }
        assert_eq!(
            previous,
            Some(FIRST_OFFSET + expected.len() as u64 - 1),
            "{name} read to the end"
        );
        // Everything still stored, without a gap.
        let tail: Vec<u64> = offsets
            .iter()
            .copied()
            .filter(|offset| *offset >= first_kept)
            .collect();
        assert!(
            tail.iter()
                .copied()
                .eq(first_kept..FIRST_OFFSET + expected.len() as u64),
            "{name}"
        );
        if name == "reading" {
            // The reader that held its segment's map read all the rest of it.
            let own: Vec<u64> = offsets
                .iter()
                .copied()
                .take_while(|offset| *offset < sealed[0].next_offset)
                .collect();
            assert!(
                own.iter()
                    .copied()
                    .eq(FIRST_OFFSET + 10..sealed[0].next_offset),
                "{name}: {own:?}"
            );
        }
    }
    let status = stream.status();
    assert_eq!(status.first_offset, first_kept, "{status:?}");
}
