//! One owner for every sync of a file. Linux reports a writeback error to
//! one caller and may report success to the next sync of the same file, for
//! pages it dropped (fsyncgate). The in-memory file system does the same: a
//! one-shot failed sync drops the dirty pages and the next sync succeeds.
//! Whichever path meets the failure (a group commit, a rotation, a seal),
//! the stream is poisoned and nothing written after the last successful
//! sync is ever acknowledged; after a power loss every acknowledged append
//! is there. Failures writing derived files (checkpoints, indexes) do not
//! poison.

mod common;

use common::*;
use natswal::format::frame::FrameBuilder;
use natswal::io::memory::{Fault, MemoryFileSystem, Operation};
use natswal::log::writer::AppendMeta;
use natswal::{
    Error, Log, LogOptions, Record, RecoveryMode, SegmentCache, StartPosition, FIRST_OFFSET,
};
use std::path::Path;
use std::sync::Arc;

const DIRECTORY: &str = "/data/s";
const NOW: i64 = 1_700_000_000_000_000_000;

fn open_log(file_system: &MemoryFileSystem) -> Log {
    Log::open(
        Arc::new(file_system.clone()),
        Path::new(DIRECTORY),
        LogOptions {
            name: "s".to_string(),
            config: small_config(),
            recovery_mode: RecoveryMode::Strict,
            keyring: Arc::default(),
            node_id: 0,
            cache: Arc::new(SegmentCache::new(8)),
            store_locked: None,
            group_sync: None,
        },
    )
    .unwrap()
    .0
}

fn append(log: &Log, records: &[Record]) -> natswal::Result<natswal::log::writer::Appended> {
    let mut builder = FrameBuilder::new();
    builder.begin();
    for record in records {
        builder.push(record, NOW);
    }
    log.append(&mut builder, AppendMeta::default(), NOW)
}

fn contents(log: &Log) -> Vec<natswal::StoredRecord> {
    let mut reader = natswal::Reader::new(log.clone(), StartPosition::Earliest, None).unwrap();
    let mut records = Vec::new();
    while let Some(record) = reader.next().unwrap() {
        records.push(record);
    }
    records
}

/// Appends frames of 4 records, syncing after each, until `stop` says so or
/// an operation fails; returns the records whose sync succeeded (the
/// acknowledged ones) and the error.
fn append_until_failure(log: &Log, first: u64, frames: u64) -> (Vec<Record>, Option<Error>) {
    let mut acknowledged = Vec::new();
    for frame in 0..frames {
        let records: Vec<Record> = (0..4)
            .map(|index| record(first + frame * 4 + index))
            .collect();
        if let Err(error) = append(log, &records) {
            return (acknowledged, Some(error));
        }
        match log.sync() {
            Ok(_) => acknowledged.extend(records),
            Err(error) => return (acknowledged, Some(error)),
        }
    }
    (acknowledged, None)
}

/// Power loss now: every acknowledged record is there, in order.
fn assert_acknowledged_survive(file_system: &MemoryFileSystem, acknowledged: &[Record], seed: u64) {
    let log = open_log(&file_system.crash(seed));
    let records = contents(&log);
    assert!(
        records.len() >= acknowledged.len(),
        "{} of {} acknowledged records",
        records.len(),
        acknowledged.len()
    );
    assert_prefix(&records[..acknowledged.len()], acknowledged);
}

fn fault(operation: Operation, path: &str, errno: i32, after: u32, count: Option<u32>) -> Fault {
    Fault {
        operation,
        path_contains: path.to_string(),
        errno,
        after,
        count,
    }
}

#[test]
fn a_failed_group_commit_poisons_although_the_next_sync_would_succeed() {
    for after in [0u32, 1, 3, 7] {
        let file_system = MemoryFileSystem::new();
        let log = open_log(&file_system);
        file_system.inject(fault(Operation::Sync, ".log", libc::EIO, after, Some(1)));
        let (acknowledged, error) = append_until_failure(&log, 0, 40);
        assert!(
            matches!(error, Some(Error::Poisoned { .. })),
            "after {after}: {error:?}"
        );
        // The fault is gone: an OS would now report success. The stream
        // does not ask: it stays read-only.
        assert!(matches!(
            append(&log, &[record(999)]),
            Err(Error::Poisoned { .. })
        ));
        assert!(matches!(log.sync(), Err(Error::Poisoned { .. })));
        assert_eq!(
            contents(&log).len(),
            acknowledged.len(),
            "readers see only what was durable"
        );
        for seed in 0..8 {
            assert_acknowledged_survive(&file_system, &acknowledged, seed);
        }
    }
}

#[test]
fn a_failed_sync_of_a_sealed_segment_poisons() {
    let file_system = MemoryFileSystem::new();
    let log = open_log(&file_system);
    // Fill the first segment, everything synced.
    let mut acknowledged = Vec::new();
    let mut next = 0u64;
    while log.segments().len() < 2 {
        let records: Vec<Record> = (next..next + 4).map(record).collect();
        next += 4;
        // The seal's sync is the next sync of the first segment after the
        // rotation made its frames durable.
        if log.segments().len() == 1 && log.segments()[0].durable_length() > 60_000 {
            file_system.inject(fault(
                Operation::Sync,
                "00000000000000000001.log",
                libc::EIO,
                0,
                Some(1),
            ));
        }
        append(&log, &records).unwrap();
        match log.sync() {
            Ok(_) => acknowledged.extend(records),
            Err(error) => {
                assert!(matches!(error, Error::Poisoned { .. }), "{error}");
                break;
            }
        }
    }
    assert!(
        log.is_poisoned(),
        "the seal's failed sync poisoned the stream"
    );
    assert!(matches!(
        append(&log, &[record(9_999)]),
        Err(Error::Poisoned { .. })
    ));
    for seed in 0..8 {
        assert_acknowledged_survive(&file_system, &acknowledged, seed);
    }
}

#[test]
fn failed_checkpoint_and_index_writes_do_not_poison() {
    for (operation, errno) in [
        (Operation::Sync, libc::EIO),
        (Operation::Write, libc::ENOSPC),
        (Operation::Create, libc::ENOSPC),
    ] {
        let file_system = MemoryFileSystem::new();
        let log = open_log(&file_system);
        // Every checkpoint and index write fails, for good.
        file_system.inject(fault(operation, ".idx", errno, 0, None));
        let (acknowledged, error) = append_until_failure(&log, 0, 2_000);
        assert!(
            error.is_none(),
            "{operation:?}: derived data failing poisoned: {error:?}"
        );
        assert!(log.segments().len() >= 3, "rotations and seals went on");
        assert!(!log.is_poisoned());
        log.close().unwrap();
        for seed in 0..4 {
            assert_acknowledged_survive(&file_system, &acknowledged, seed);
        }
    }
}

#[test]
fn a_failed_metadata_write_fails_the_append_and_the_next_one_succeeds() {
    let file_system = MemoryFileSystem::new();
    let log = open_log(&file_system);
    file_system.inject(fault(Operation::Sync, "stream.meta", libc::EIO, 0, Some(1)));
    let error = append(&log, &[record(0)]).unwrap_err();
    assert!(error.to_string().contains("stream.meta"), "{error}");
    assert!(!log.is_poisoned(), "nothing of the log was written");
    let appended = append(&log, &[record(0)]).unwrap();
    assert_eq!(appended.base_offset, FIRST_OFFSET);
    log.sync().unwrap();
    assert_acknowledged_survive(&file_system, &[record(0)], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_the_stream_threads_no_append_is_acknowledged_after_a_one_shot_failure() {
    for after in [0u32, 2, 5, 11] {
        let file_system = MemoryFileSystem::new();
        let (stream, _) = natswal::Stream::open(
            Arc::new(file_system.clone()),
            Path::new(DIRECTORY),
            "s",
            Arc::new(SegmentCache::new(8)),
            natswal::StreamOptions {
                config: small_config(),
                ..natswal::StreamOptions::default()
            },
        )
        .unwrap();
        file_system.inject(fault(Operation::Sync, ".log", libc::EIO, after, Some(1)));
        let records: Vec<Record> = (0..3000).map(record).collect();
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
            if stream.submit(request, completion).await.is_err() {
                break;
            }
        }
        drop(sender);
        let mut acknowledged = Vec::new();
        while let Some(completed) = receiver.recv().await {
            if let Ok(outcome) = completed.result {
                acknowledged.push((outcome.first_offset, completed.token));
            }
        }
        acknowledged.sort_unstable();
        for (position, (offset, token)) in acknowledged.iter().enumerate() {
            assert_eq!(
                *offset,
                FIRST_OFFSET + position as u64,
                "after {after}: a hole in the acknowledged offsets"
            );
            assert_eq!(*token, position as u64);
        }
        assert!(stream.status().poisoned.is_some(), "after {after}");
        let acknowledged_records: Vec<Record> = records[..acknowledged.len()].to_vec();
        std::mem::forget(stream);
        for seed in 0..4 {
            assert_acknowledged_survive(&file_system, &acknowledged_records, seed);
        }
    }
}
