//! The Log API that Raft replication stands on (src/log/mod.rs): appends as
//! leader and verbatim as follower (byte-identical frames, encrypted ones
//! included, with continuity checks), reads by Raft index and offset range,
//! the durable watermark and its future, online truncation with readers
//! open, the metadata file, installing a sealed segment, Raft entries
//! without records.

mod common;

use common::*;
use natswal::format::frame::{FrameBuilder, FrameKind};
use natswal::format::metadata::{LogId, Vote};
use natswal::io::memory::MemoryFileSystem;
use natswal::io::FileSystem;
use natswal::log::writer::AppendMeta;
use natswal::log::FrameRange;
use natswal::{
    Cipher, Compression, EncryptionConfig, Error, Key, Keyring, Log, LogOptions, RecoveryMode,
    SegmentCache, StartPosition, StreamConfig, FIRST_OFFSET,
};
use std::path::Path;
use std::sync::Arc;

const NOW: i64 = 1_700_000_000_000_000_000;

fn log_options(config: StreamConfig, keyring: Keyring, node_id: u16) -> LogOptions {
    LogOptions {
        name: "log".to_string(),
        config,
        recovery_mode: RecoveryMode::Strict,
        keyring: Arc::new(keyring),
        node_id,
        cache: Arc::new(SegmentCache::new(8)),
        store_locked: None,
        group_sync: None,
    }
}

fn open_log(file_system: &Arc<dyn FileSystem>, directory: &Path, config: StreamConfig) -> Log {
    Log::open(
        Arc::clone(file_system),
        directory,
        log_options(config, Keyring::default(), 0),
    )
    .unwrap()
    .0
}

/// Appends one frame of `count` records as leader with Raft id `(term, index)`.
fn append_entry(
    log: &Log,
    first: u64,
    count: u64,
    term: u64,
    index: u64,
) -> natswal::log::writer::Appended {
    let mut builder = FrameBuilder::new();
    builder.begin();
    for record_index in first..first + count {
        builder.push(&record(record_index), NOW + record_index as i64);
    }
    log.append(
        &mut builder,
        AppendMeta {
            atomic: false,
            raft_term: term,
            raft_index: index,
        },
        NOW,
    )
    .unwrap()
}

fn memory() -> (MemoryFileSystem, Arc<dyn FileSystem>) {
    let memory = MemoryFileSystem::new();
    let file_system: Arc<dyn FileSystem> = Arc::new(memory.clone());
    (memory, file_system)
}

fn records_of(log: &Log) -> Vec<natswal::StoredRecord> {
    let mut reader = natswal::Reader::new(log.clone(), StartPosition::Earliest, None).unwrap();
    let mut records = Vec::new();
    while let Some(record) = reader.next().unwrap() {
        records.push(record);
    }
    records
}

#[test]
fn leader_appends_get_dense_offsets_and_raft_ids_must_continue() {
    let (_, file_system) = memory();
    let log = open_log(&file_system, Path::new("/l"), small_config());
    let first = append_entry(&log, 0, 3, 1, 1);
    assert_eq!(
        (first.base_offset, first.next_offset),
        (FIRST_OFFSET, FIRST_OFFSET + 3)
    );
    assert_eq!(first.log_id, LogId { term: 1, index: 1 });
    let second = append_entry(&log, 3, 2, 1, 2);
    assert_eq!(second.base_offset, FIRST_OFFSET + 3);
    // Raft indexes continue by one; terms never go back.
    let mut builder = FrameBuilder::new();
    builder.begin();
    builder.push(&record(9), NOW);
    for (term, index) in [(1, 4), (1, 2), (0, 3)] {
        let error = log
            .append(
                &mut builder,
                AppendMeta {
                    atomic: false,
                    raft_term: term,
                    raft_index: index,
                },
                NOW,
            )
            .unwrap_err();
        assert!(
            matches!(error, Error::InvalidInput(_)),
            "({term}, {index}): {error}"
        );
    }
    log.sync().unwrap();
    assert_eq!(log.durable().last_log_id, LogId { term: 1, index: 2 });
    assert_eq!(records_of(&log).len(), 5);
}

#[test]
fn followers_store_the_leaders_frames_byte_for_byte_even_encrypted_and_without_the_key() {
    for (compression, cipher) in [
        (Compression::None, None),
        (Compression::Zstd { level: 3 }, None),
        (Compression::Zstd { level: 3 }, Some(Cipher::Aes256Gcm)),
        (Compression::None, Some(Cipher::ChaCha20Poly1305)),
    ] {
        let (_, file_system) = memory();
        let leader_config = StreamConfig {
            compression,
            encryption: cipher.map(|cipher| EncryptionConfig { cipher, key_id: 7 }),
            ..small_config()
        };
        let keyring = Keyring::new([Key::new(7, [3; 32])]);
        let (leader, _) = Log::open(
            Arc::clone(&file_system),
            Path::new("/leader"),
            log_options(leader_config, keyring, 1),
        )
        .unwrap();
        for entry in 0..40u64 {
            append_entry(&leader, entry * 5, 5, 2, entry + 1);
        }
        leader.sync().unwrap();
        // A follower without the key stores the frames as they are.
        let follower = open_log(&file_system, Path::new("/follower"), small_config());
        let frames = leader
            .read_frames(FrameRange::RaftIndex { start: 1, end: 41 })
            .unwrap();
        assert_eq!(frames.len(), 40);
        for frame in &frames {
            follower.append_stored(&frame.bytes, NOW).unwrap();
        }
        follower.sync().unwrap();
        let copied = follower
            .read_frames(FrameRange::RaftIndex { start: 1, end: 41 })
            .unwrap();
        for (original, copy) in frames.iter().zip(&copied) {
            assert_eq!(
                original.bytes, copy.bytes,
                "byte-identical ({compression:?}, {cipher:?})"
            );
        }
        assert_eq!(follower.durable().last_log_id, LogId { term: 2, index: 40 });
        if cipher.is_some() {
            assert_eq!(
                copied[0].header.nonce[..2],
                1u16.to_le_bytes(),
                "the leader's node id"
            );
        }
    }
}

#[test]
fn verbatim_appends_must_continue_the_log_and_be_intact() {
    let (_, file_system) = memory();
    let leader = open_log(&file_system, Path::new("/leader"), small_config());
    for entry in 0..4u64 {
        append_entry(&leader, entry * 2, 2, 1, entry + 1);
    }
    let frames = leader
        .read_frames(FrameRange::RaftIndex { start: 1, end: 5 })
        .unwrap();
    let follower = open_log(&file_system, Path::new("/follower"), small_config());
    // Out of order: offsets and the Raft index must continue.
    assert!(follower.append_stored(&frames[1].bytes, NOW).is_err());
    follower.append_stored(&frames[0].bytes, NOW).unwrap();
    assert!(
        follower.append_stored(&frames[0].bytes, NOW).is_err(),
        "no repeat"
    );
    assert!(
        follower.append_stored(&frames[2].bytes, NOW).is_err(),
        "no hole"
    );
    // Damaged bytes and gap frames are refused.
    let mut damaged = frames[1].bytes.to_vec();
    let last = damaged.len() - 1;
    damaged[last] ^= 1;
    let error = follower.append_stored(&damaged, NOW).unwrap_err();
    assert!(error.to_string().contains("checksum"), "{error}");
    let gap = natswal::format::frame::encode_empty_frame(FrameKind::Gap, FIRST_OFFSET + 2, 2, 0, 0);
    assert!(follower.append_stored(&gap, NOW).is_err());
    follower.append_stored(&frames[1].bytes, NOW).unwrap();
    assert_eq!(follower.written().next_offset, FIRST_OFFSET + 4);
}

#[test]
fn frames_are_read_by_raft_index_or_offset_range_never_short() {
    let (_, file_system) = memory();
    let log = open_log(&file_system, Path::new("/l"), small_config());
    // Enough entries to cross several 64 KiB segments.
    for entry in 0..600u64 {
        append_entry(&log, entry * 3, 3, 1 + entry / 100, entry + 1);
    }
    log.sync().unwrap();
    assert!(
        log.segments().len() >= 3,
        "{} segments",
        log.segments().len()
    );
    let middle = log
        .read_frames(FrameRange::RaftIndex {
            start: 250,
            end: 260,
        })
        .unwrap();
    assert_eq!(middle.len(), 10);
    for (position, frame) in middle.iter().enumerate() {
        assert_eq!(frame.header.raft_index, 250 + position as u64);
        assert_eq!(
            frame.header.base_offset,
            FIRST_OFFSET + (249 + position as u64) * 3
        );
    }
    let by_offset = log
        .read_frames(FrameRange::Offset {
            start: FIRST_OFFSET + 10,
            end: FIRST_OFFSET + 20,
        })
        .unwrap();
    assert_eq!(
        by_offset.first().unwrap().header.base_offset,
        FIRST_OFFSET + 9,
        "the frame holding 10"
    );
    assert!(by_offset.last().unwrap().header.next_offset() >= FIRST_OFFSET + 20);
    let whole = log
        .read_frames(FrameRange::RaftIndex { start: 1, end: 601 })
        .unwrap();
    assert_eq!(whole.len(), 600);
    let short = log.read_frames(FrameRange::RaftIndex {
        start: 590,
        end: 700,
    });
    assert!(
        short.is_err(),
        "a range past the end is an error, never short"
    );
}

#[tokio::test]
async fn the_durable_watermark_resolves_after_the_sync_and_fails_after_a_failed_one() {
    let (memory, file_system) = memory();
    let log = open_log(&file_system, Path::new("/l"), small_config());
    append_entry(&log, 0, 1, 1, 1);
    assert_eq!(log.written().last_log_id.index, 1);
    assert_eq!(
        log.durable().last_log_id.index,
        0,
        "not durable before the sync"
    );
    let waiter = {
        let log = log.clone();
        tokio::spawn(async move { log.wait_durable(1).await })
    };
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished());
    log.sync().unwrap();
    let point = waiter.await.unwrap().unwrap();
    assert_eq!(point.last_log_id, LogId { term: 1, index: 1 });
    append_entry(&log, 1, 1, 1, 2);
    let waiter = {
        let log = log.clone();
        tokio::spawn(async move { log.wait_durable(2).await })
    };
    memory.fail_syncs_after(0);
    assert!(matches!(log.sync(), Err(Error::Poisoned { .. })));
    assert!(matches!(waiter.await.unwrap(), Err(Error::Poisoned { .. })));
}

#[test]
fn online_truncation_repositions_readers_before_the_cut_and_fails_those_past_it() {
    let (_, file_system) = memory();
    let log = open_log(&file_system, Path::new("/l"), small_config());
    for entry in 0..400u64 {
        append_entry(&log, entry * 2, 2, 1, entry + 1);
    }
    log.sync().unwrap();
    let mut behind = natswal::Reader::new(log.clone(), StartPosition::Earliest, None).unwrap();
    for _ in 0..10 {
        behind.next().unwrap().unwrap();
    }
    let mut ahead =
        natswal::Reader::new(log.clone(), StartPosition::Offset(FIRST_OFFSET + 600), None).unwrap();
    ahead.next().unwrap().unwrap();
    log.truncate_after(250).unwrap();
    assert_eq!(log.written().next_offset, FIRST_OFFSET + 500);
    assert_eq!(log.durable().last_log_id.index, 250);
    match ahead.next() {
        Err(Error::Truncated { next_offset, .. }) => assert_eq!(next_offset, FIRST_OFFSET + 500),
        other => panic!("a reader past the cut must fail, got {other:?}"),
    }
    // New entries after the cut, with another term: readers see them, never
    // the removed suffix.
    for entry in 250..260u64 {
        append_entry(&log, 10_000 + entry * 2, 2, 2, entry + 1);
    }
    log.sync().unwrap();
    let mut seen = 10;
    while let Some(stored) = behind.next().unwrap() {
        let index = if stored.offset < FIRST_OFFSET + 500 {
            stored.offset - FIRST_OFFSET
        } else {
            10_000 + (stored.offset - FIRST_OFFSET)
        };
        assert_record(&stored, &record(index), stored.offset);
        seen += 1;
    }
    assert_eq!(seen, 520);
    // The truncation is durable: a reopen finds the same log.
    log.close().unwrap();
    drop((log, behind, ahead));
    let log = open_log(&file_system, Path::new("/l"), small_config());
    assert_eq!(log.written().next_offset, FIRST_OFFSET + 520);
    assert_eq!(
        log.written().last_log_id,
        LogId {
            term: 2,
            index: 260
        }
    );
}

/// A truncation replaces the segment it cuts; reads of the entries it keeps
/// in that segment, running meanwhile, always return them whole (Raft's
/// apply reads committed entries while a conflict truncates the tail).
#[test]
fn reads_of_kept_entries_go_on_while_truncations_replace_their_segment() {
    let (_, file_system) = memory();
    let log = open_log(&file_system, Path::new("/t"), small_config());
    for entry in 0..20u64 {
        append_entry(&log, entry * 2, 2, 1, entry + 1);
    }
    log.sync().unwrap();
    let kept = FrameRange::RaftIndex { start: 1, end: 21 };
    let expected: Vec<_> = log
        .read_frames(kept)
        .unwrap()
        .into_iter()
        .map(|frame| frame.bytes)
        .collect();
    assert_eq!(
        log.segments().len(),
        1,
        "one segment holds kept and cut entries"
    );
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let mut reads = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let frames = log
                    .read_frames(kept)
                    .unwrap_or_else(|error| panic!("read {reads}: {error}"));
                let bytes: Vec<_> = frames.into_iter().map(|frame| frame.bytes).collect();
                assert!(bytes == expected, "read {reads} differs");
                reads += 1;
            }
            reads
        });
        for round in 0..300u64 {
            for entry in 20..25u64 {
                append_entry(&log, 1_000 + round * 10 + entry, 2, round + 2, entry + 1);
            }
            log.truncate_after(20).unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(reader.join().unwrap() > 0);
    });
}

#[test]
fn metadata_survives_reopen_and_damage_is_refused() {
    let (memory, file_system) = memory();
    let log = open_log(&file_system, Path::new("/l"), small_config());
    append_entry(&log, 0, 1, 3, 1);
    log.save_vote(Vote {
        term: 3,
        node_id: 2,
        committed: true,
    })
    .unwrap();
    log.save_committed(Some(LogId { term: 3, index: 1 }))
        .unwrap();
    log.save_purged(LogId { term: 1, index: 0 }).unwrap();
    log.close().unwrap();
    drop(log);
    let crashed = memory.crash(1);
    let file_system: Arc<dyn FileSystem> = Arc::new(crashed.clone());
    let log = open_log(&file_system, Path::new("/l"), small_config());
    let metadata = log.metadata();
    assert_eq!(
        metadata.vote,
        Some(Vote {
            term: 3,
            node_id: 2,
            committed: true
        })
    );
    assert_eq!(metadata.committed, Some(LogId { term: 3, index: 1 }));
    assert_eq!(metadata.last_purged, Some(LogId { term: 1, index: 0 }));
    log.close().unwrap();
    drop(log);
    crashed.flip_bit(Path::new("/l/stream.meta"), 130).unwrap();
    let error = Log::open(
        Arc::clone(&file_system),
        Path::new("/l"),
        log_options(small_config(), Keyring::default(), 0),
    )
    .unwrap_err();
    assert!(
        error.is_corruption() && error.to_string().contains("stream.meta"),
        "{error}"
    );
}

#[test]
fn raft_entries_without_records_take_no_offsets_and_readers_skip_them() {
    let (_, file_system) = memory();
    let log = open_log(&file_system, Path::new("/l"), small_config());
    log.append_raft_entry(FrameKind::Blank, 1, 1, &[], NOW)
        .unwrap();
    append_entry(&log, 0, 2, 1, 2);
    log.append_raft_entry(FrameKind::Opaque, 1, 3, b"membership: 1,2,3", NOW)
        .unwrap();
    append_entry(&log, 2, 2, 1, 4);
    log.sync().unwrap();
    let records = records_of(&log);
    assert_eq!(
        records
            .iter()
            .map(|record| record.offset)
            .collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    let entries = log
        .read_frames(FrameRange::RaftIndex { start: 1, end: 5 })
        .unwrap();
    assert_eq!(entries[2].header.kind, FrameKind::Opaque);
    assert_eq!(&entries[2].bytes[96..], b"membership: 1,2,3");
}

#[test]
fn committed_entries_fill_a_log_that_ends_below_its_purge_point() {
    let (_, file_system) = memory();
    let source = open_log(&file_system, Path::new("/source"), small_config());
    for index in 1..=4 {
        append_entry(&source, (index - 1) * 2, 2, 1, index);
    }
    source.sync().unwrap();
    let frames = source
        .read_frames(FrameRange::RaftIndex { start: 1, end: 5 })
        .unwrap();
    // A log cut back to entry 2 whose purge point is 3 (a repair or a
    // shipped snapshot fills it): appends follow the purge point, fills
    // follow the log.
    let log = open_log(&file_system, Path::new("/l"), small_config());
    log.append_stored(&frames[0].bytes, NOW).unwrap();
    log.append_stored(&frames[1].bytes, NOW).unwrap();
    log.save_purged(LogId { term: 1, index: 3 }).unwrap();
    let error = log.append_stored(&frames[2].bytes, NOW).unwrap_err();
    assert!(error.to_string().contains("does not follow"), "{error}");
    log.fill_stored(&frames[2].bytes, NOW).unwrap();
    log.append_stored(&frames[3].bytes, NOW).unwrap();
    log.sync().unwrap();
    assert_eq!(records_of(&log).len(), 8);
}

#[test]
fn purging_past_the_last_entry_makes_the_next_entry_follow_the_purge_point() {
    let (_, file_system) = memory();
    let log = open_log(&file_system, Path::new("/l"), small_config());
    append_entry(&log, 0, 2, 1, 1);
    append_entry(&log, 2, 1, 1, 2);
    log.sync().unwrap();
    // A snapshot through index 9 was installed: entries 3..=9 never come.
    log.save_purged(LogId { term: 2, index: 9 }).unwrap();
    let error = log
        .append_raft_entry(FrameKind::Blank, 2, 3, &[], NOW)
        .unwrap_err();
    assert!(error.to_string().contains("does not follow"), "{error}");
    log.append_raft_entry(FrameKind::Blank, 2, 10, &[], NOW)
        .unwrap();
    log.sync().unwrap();
    drop(log);
    // The floor is the metadata's purge point: it holds after a reopen.
    let log = open_log(&file_system, Path::new("/l"), small_config());
    let error = log
        .append_raft_entry(FrameKind::Blank, 2, 12, &[], NOW)
        .unwrap_err();
    assert!(error.to_string().contains("does not follow"), "{error}");
    log.append_raft_entry(FrameKind::Blank, 2, 11, &[], NOW)
        .unwrap();
    // Offsets stay dense: blank entries take none.
    assert_eq!(
        append_entry(&log, 3, 1, 2, 12).base_offset,
        FIRST_OFFSET + 3
    );
}

fn sealed_copy_source(file_system: &Arc<dyn FileSystem>) -> (Log, Vec<natswal::SealedSegment>) {
    let leader = open_log(file_system, Path::new("/leader"), small_config());
    for entry in 0..700u64 {
        append_entry(&leader, entry * 3, 3, 1, entry + 1);
    }
    leader.sync().unwrap();
    let sealed = leader.sealed_segments();
    assert!(sealed.len() >= 2, "{sealed:?}");
    (leader, sealed)
}

#[test]
fn installing_a_sealed_segment_checks_it_and_links_it_in_whole() {
    let (memory, file_system) = memory();
    let (_leader, sealed) = sealed_copy_source(&file_system);
    let follower = open_log(&file_system, Path::new("/follower"), small_config());
    let first = &sealed[0];
    let received = follower.incoming_path(first.base_offset).unwrap();
    let bytes = file_system.read(&first.path).unwrap();
    // A wrong CRC, a damaged copy and a segment that does not continue the
    // log are refused and change nothing.
    file_system.write_atomic(&received, &bytes).unwrap();
    let wrong = natswal::SealedSegment {
        crc32c: first.crc32c ^ 1,
        ..first.clone()
    };
    assert!(follower.install_segment(&received, &wrong).is_err());
    let mut damaged = bytes.clone();
    damaged[500] ^= 1;
    file_system.write_atomic(&received, &damaged).unwrap();
    let damaged_descriptor = natswal::SealedSegment {
        crc32c: crc32c::crc32c(&damaged),
        ..first.clone()
    };
    assert!(follower
        .install_segment(&received, &damaged_descriptor)
        .is_err());
    file_system
        .write_atomic(&received, &file_system.read(&sealed[1].path).unwrap())
        .unwrap();
    assert!(
        follower.install_segment(&received, &sealed[1]).is_err(),
        "must continue the log"
    );
    assert!(follower.segments().is_empty());
    for segment in &sealed {
        let received = follower.incoming_path(segment.base_offset).unwrap();
        file_system
            .write_atomic(&received, &file_system.read(&segment.path).unwrap())
            .unwrap();
        follower.install_segment(&received, segment).unwrap();
    }
    assert_eq!(
        follower.written().next_offset,
        sealed.last().unwrap().next_offset
    );
    assert_eq!(
        follower.written().last_log_id,
        sealed.last().unwrap().last_log_id
    );
    // The follower goes on appending after the installed segments.
    let next_index = follower.written().last_log_id.index + 1;
    let first_record = follower.written().next_offset - FIRST_OFFSET;
    append_entry(&follower, first_record, 3, 1, next_index);
    follower.sync().unwrap();
    let records = records_of(&follower);
    assert_eq!(records.len() as u64, first_record + 3);
    for stored in &records {
        assert_record(stored, &record(stored.offset - FIRST_OFFSET), stored.offset);
    }
    drop(memory);
}

#[test]
fn a_segment_shipped_in_chunks_installs_after_frames_of_the_active_segment() {
    let (memory, file_system) = memory();
    let (leader, sealed) = sealed_copy_source(&file_system);
    let follower = open_log(&file_system, Path::new("/follower"), small_config());
    // The follower holds the first segment's entries as frames of its own
    // active segment (it received them one by one), not as that file.
    let first = &sealed[0];
    for frame in leader
        .read_frames(FrameRange::RaftIndex {
            start: first.first_raft_index,
            end: first.last_log_id.index + 1,
        })
        .unwrap()
    {
        follower.append_stored(&frame.bytes, 1).unwrap();
    }
    assert!(follower.sealed_segments().is_empty());
    // The second segment travels in chunks of 1000 bytes; a chunk of a
    // segment the leader does not hold (another CRC) is refused.
    let second = &sealed[1];
    assert!(leader
        .read_sealed_segment(second.base_offset, second.crc32c ^ 1, 0, 1000)
        .is_err());
    let mut position = 0;
    loop {
        let chunk = leader
            .read_sealed_segment(second.base_offset, second.crc32c, position, 1000)
            .unwrap();
        if chunk.is_empty() {
            break;
        }
        position = follower
            .receive_segment_bytes(second.base_offset, position, &chunk)
            .unwrap();
    }
    assert_eq!(position, second.length);
    assert_eq!(
        follower
            .received_segment_length(second.base_offset)
            .unwrap(),
        second.length
    );
    let received = follower.incoming_path(second.base_offset).unwrap();
    follower.install_segment(&received, second).unwrap();
    assert_eq!(follower.written().next_offset, second.next_offset);
    assert_eq!(follower.written().last_log_id, second.last_log_id);
    let records = records_of(&follower);
    assert_eq!(records.len() as u64, second.next_offset - FIRST_OFFSET);
    for stored in &records {
        assert_record(stored, &record(stored.offset - FIRST_OFFSET), stored.offset);
    }
    // Frames after the installed file, then a cut back into the first
    // segment's entries: the log ends there, and takes that entry again.
    let third = &sealed[2];
    let frames_after = leader
        .read_frames(FrameRange::RaftIndex {
            start: third.first_raft_index,
            end: third.first_raft_index + 3,
        })
        .unwrap();
    for frame in &frames_after {
        follower.append_stored(&frame.bytes, 1).unwrap();
    }
    follower.sync().unwrap();
    // A cut right after the installed file removes only the active
    // segment's frames.
    follower.truncate_after(second.last_log_id.index).unwrap();
    assert_eq!(follower.written().last_log_id, second.last_log_id);
    for frame in &frames_after {
        follower.append_stored(&frame.bytes, 1).unwrap();
    }
    follower.sync().unwrap();
    let keep = first.last_log_id.index - 2;
    follower.truncate_after(keep).unwrap();
    assert_eq!(follower.written().last_log_id.index, keep);
    let again = leader
        .read_frames(FrameRange::RaftIndex {
            start: keep + 1,
            end: second.last_log_id.index + 1,
        })
        .unwrap();
    for frame in &again {
        follower.append_stored(&frame.bytes, 1).unwrap();
    }
    for frame in &frames_after {
        follower.append_stored(&frame.bytes, 1).unwrap();
    }
    follower.sync().unwrap();
    let records = records_of(&follower);
    // Reopened, the follower has both: its own sealed frames, then the file.
    follower.close().unwrap();
    drop(follower);
    let reopened = open_log(&file_system, Path::new("/follower"), small_config());
    assert_eq!(records_of(&reopened).len(), records.len());
    // A leader's segment damaged after it was sealed is refused when a
    // transfer of it begins, naming the damage.
    let damaged = file_system.open(&third.path, true).unwrap();
    let mut byte = [0u8; 1];
    damaged.read_at(700, &mut byte).unwrap();
    damaged.write_at(700, &[byte[0] ^ 0x10]).unwrap();
    let error = leader
        .read_sealed_segment(third.base_offset, third.crc32c, 0, 1000)
        .unwrap_err();
    assert!(
        error.to_string().contains("damaged after it was sealed"),
        "{error}"
    );
    assert_eq!(
        reopened.written().last_log_id.index,
        third.first_raft_index + 2
    );
    drop(memory);
}

#[test]
fn a_crash_at_any_step_of_an_install_leaves_no_segment_or_the_whole_one() {
    let (memory, file_system) = memory();
    let (_leader, sealed) = sealed_copy_source(&file_system);
    let first = sealed[0].clone();
    let bytes = file_system.read(&first.path).unwrap();
    let mut outcomes = [0usize; 2];
    for step in 1..40u64 {
        let trial = memory.crash(0);
        let trial_system: Arc<dyn FileSystem> = Arc::new(trial.clone());
        let follower = open_log(&trial_system, Path::new("/follower"), small_config());
        let received = follower.incoming_path(first.base_offset).unwrap();
        trial_system.write_atomic(&received, &bytes).unwrap();
        trial.crash_after_operations(step);
        let installed = follower.install_segment(&received, &first);
        let crashed = trial.has_crashed();
        drop(follower);
        let after = trial.crash(step);
        let after_system: Arc<dyn FileSystem> = Arc::new(after);
        let reopened = open_log(&after_system, Path::new("/follower"), small_config());
        let next = reopened.written().next_offset;
        if next == FIRST_OFFSET {
            outcomes[0] += 1;
            assert!(crashed, "step {step}: an install that finished was lost");
        } else {
            assert_eq!(
                next, first.next_offset,
                "step {step}: a part of the segment"
            );
            assert_eq!(
                records_of(&reopened).len() as u64,
                first.next_offset - FIRST_OFFSET
            );
            outcomes[1] += 1;
        }
        if !crashed {
            installed.unwrap();
            assert!(step > 3, "the install took more than a few steps");
            break;
        }
    }
    assert!(outcomes[0] > 0 && outcomes[1] > 0, "{outcomes:?}");
}

#[test]
fn nonces_of_two_nodes_sharing_a_key_never_repeat() {
    let (_, file_system) = memory();
    let config = StreamConfig {
        encryption: Some(EncryptionConfig {
            cipher: Cipher::Aes256Gcm,
            key_id: 1,
        }),
        ..small_config()
    };
    let mut nonces = std::collections::BTreeSet::new();
    for node in [1u16, 2] {
        let keyring = Keyring::new([Key::new(1, [5; 32])]);
        for _restart in 0..3 {
            let (log, _) = Log::open(
                Arc::clone(&file_system),
                Path::new(&format!("/node-{node}")),
                log_options(config.clone(), keyring.clone(), node),
            )
            .unwrap();
            let first_index = log.written().last_log_id.index + 1;
            let first_record = log.written().next_offset - FIRST_OFFSET;
            for entry in 0..10 {
                append_entry(&log, first_record + entry, 1, 1, first_index + entry);
            }
            log.sync().unwrap();
            let frames = log
                .read_frames(FrameRange::RaftIndex {
                    start: first_index,
                    end: first_index + 10,
                })
                .unwrap();
            for frame in frames {
                assert!(
                    nonces.insert(frame.header.nonce),
                    "nonce repeated: node {node}"
                );
            }
            log.close().unwrap();
        }
    }
    assert_eq!(nonces.len(), 60);
}
