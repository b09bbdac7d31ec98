//! The smaller defects of the engine review, each with the behaviour that
//! replaced it: a clean mark never outlives the next write; rotating to a
//! new key with an empty active segment works; retention removes segments
//! by identity (two passes at once remove each once) and recycles their
//! files; offline commands allocate nothing; an index rebuilt by a reader
//! is written by maintenance, not by the reader.

mod common;

use common::*;
use natswal::io::memory::MemoryFileSystem;
use natswal::io::FileSystem;
use natswal::{
    Cipher, Driver, EncryptionConfig, Key, Keyring, RecoveryManager, RecoveryMode, RetentionPolicy,
    SegmentCache, StartPosition, Stream, StreamConfig, StreamOptions, FIRST_OFFSET,
};
use std::path::Path;
use std::sync::Arc;

fn open_memory(
    file_system: &MemoryFileSystem,
    options: StreamOptions,
) -> (Stream, natswal::RecoveryReport) {
    Stream::open(
        Arc::new(file_system.clone()),
        Path::new("/data/s"),
        "s",
        Arc::new(SegmentCache::new(2)),
        options,
    )
    .unwrap()
}

#[tokio::test]
async fn a_clean_shutdown_is_forgotten_before_the_next_write() {
    let file_system = MemoryFileSystem::new();
    let (stream, _) = open_memory(&file_system, options(small_config()));
    append_all(&stream, &(0..500).map(record).collect::<Vec<_>>()).await;
    stream.close().unwrap();
    drop(stream);
    let (stream, report) = open_memory(&file_system, options(small_config()));
    assert!(report.clean_shutdown);
    let expected: Vec<_> = (0..501).map(record).collect();
    stream.append(record(500)).await.unwrap();
    // Power loss right after the acknowledged append: the open must not
    // take the old clean mark for this crash; it validates the tail.
    std::mem::forget(stream);
    for seed in 0..8 {
        let (reopened, report) = open_memory(&file_system.crash(seed), options(small_config()));
        assert!(!report.clean_shutdown, "seed {seed}: {report:?}");
        assert!(
            report.validated_bytes > 0,
            "seed {seed}: the tail was validated: {report:?}"
        );
        assert_exactly(&read_all(&reopened).unwrap(), &expected);
    }
}

#[tokio::test]
async fn a_new_key_with_an_empty_active_segment_replaces_it() {
    let directory = tempfile::tempdir().unwrap();
    let keyring = Arc::new(Keyring::new([Key::new(1, [1; 32]), Key::new(2, [2; 32])]));
    let with_key = |key_id| StreamOptions {
        config: StreamConfig {
            encryption: Some(EncryptionConfig {
                cipher: Cipher::Aes256Gcm,
                key_id,
            }),
            ..small_config()
        },
        keyring: Arc::clone(&keyring),
        ..StreamOptions::default()
    };
    let (stream, _) = open_reported(&os_file_system(), directory.path(), with_key(1)).unwrap();
    let first: Vec<_> = (0..2000).map(record).collect();
    append_all(&stream, &first).await;
    // A truncation at the active segment's first offset leaves it empty.
    let active_base = stream.log().segments().last().unwrap().base_offset();
    stream.log().truncate_from_offset(active_base).unwrap();
    stream.close().unwrap();
    drop(stream);
    let (stream, _) = open_reported(&os_file_system(), directory.path(), with_key(2)).unwrap();
    let kept = (active_base - FIRST_OFFSET) as usize;
    let more: Vec<_> = (kept as u64..kept as u64 + 50).map(record).collect();
    for record in &more {
        stream.append(record.clone()).await.unwrap();
    }
    assert!(stream.status().poisoned.is_none());
    let last = stream.log().segments().last().unwrap().header().key_id;
    assert_eq!(last, 2, "the replaced segment is written with the new key");
    let mut expected = first[..kept].to_vec();
    expected.extend(more);
    assert_exactly(&read_all(&stream).unwrap(), &expected);
}

#[tokio::test]
async fn a_sealed_segment_that_is_last_again_takes_appends_and_survives_a_crash() {
    let file_system = MemoryFileSystem::new();
    let (stream, _) = open_memory(&file_system, options(small_config()));
    let first: Vec<_> = (0..2000).map(record).collect();
    append_all(&stream, &first).await;
    let active_base = stream.log().segments().last().unwrap().base_offset();
    stream.log().truncate_from_offset(active_base).unwrap();
    stream.close().unwrap();
    drop(stream);
    // The empty segment after the sealed one goes, as when the creation
    // of a next segment did not complete: the sealed segment (with its
    // sealed index) is the last one again. A repair walks it instead of
    // trusting its index and makes it the active segment.
    let empty = Path::new("/data/s").join(natswal::format::segment_file_name(active_base));
    file_system.remove(&empty).unwrap();
    let repair = StreamOptions {
        recovery_mode: RecoveryMode::Repair,
        ..options(small_config())
    };
    let (stream, _) = open_memory(&file_system, repair);
    let kept = (active_base - FIRST_OFFSET) as usize;
    let more: Vec<_> = (kept as u64..kept as u64 + 5).map(record).collect();
    for record in &more {
        stream.append(record.clone()).await.unwrap();
    }
    std::mem::forget(stream);
    let mut expected = first[..kept].to_vec();
    expected.extend(more);
    for seed in 0..4 {
        // The seal's index must not claim the segment ends where the
        // acknowledged appends begin.
        let (reopened, report) = open_memory(&file_system.crash(seed), options(small_config()));
        assert!(report.lost.is_empty(), "seed {seed}: {report:?}");
        assert_exactly(&read_all(&reopened).unwrap(), &expected);
    }
}

#[tokio::test]
async fn a_repair_reports_the_torn_tail_it_cuts_and_keeps_its_bytes() {
    let file_system = MemoryFileSystem::new();
    let (stream, _) = open_memory(&file_system, options(small_config()));
    let written: Vec<_> = (0..300).map(record).collect();
    append_all(&stream, &written).await;
    let active = stream.log().segments().last().unwrap().path().to_path_buf();
    std::mem::forget(stream);
    // A power loss after every append was synced; then a bit flips in the
    // first frame of the active segment (damage: later frames prove it
    // durable), and bytes that are not a frame follow the last one.
    let crashed = file_system.crash(7);
    let bytes = crashed.read(&active).unwrap();
    let end = bytes.iter().rposition(|byte| *byte != 0).unwrap() as u64 + 1;
    crashed.flip_bit(&active, (64 + 40) * 8).unwrap();
    let garbage = vec![0xab; 300];
    crashed
        .open(&active, true)
        .unwrap()
        .write_at(end, &garbage)
        .unwrap();
    let repair = StreamOptions {
        recovery_mode: RecoveryMode::Repair,
        ..options(small_config())
    };
    let (repaired, report) = open_memory(&crashed, repair);
    assert_eq!(report.truncated.len(), 1, "{report:?}");
    assert_eq!(report.truncated[0].position, end, "{report:?}");
    let kept = report
        .quarantined
        .iter()
        .find(|range| range.reason.starts_with("torn tail cut by a repair"))
        .unwrap_or_else(|| panic!("the torn tail's bytes are kept: {report:?}"));
    assert_eq!((kept.start, kept.end), (end, end + garbage.len() as u64));
    assert_eq!(crashed.read(&kept.saved_to).unwrap(), garbage);
    assert_eq!(
        report.lost.len(),
        1,
        "only the damaged frame is lost: {report:?}"
    );
    let lost = &report.lost[0];
    let records = read_all(&repaired).unwrap();
    assert_eq!(
        records.len() as u64,
        written.len() as u64 - (lost.next_offset - lost.first_offset)
    );
}

#[tokio::test]
async fn retention_removes_by_identity_and_recycles_segment_files() {
    let directory = tempfile::tempdir().unwrap();
    let config = StreamConfig {
        retention: RetentionPolicy {
            messages_max: Some(1000),
            ..RetentionPolicy::default()
        },
        maintenance_interval_ms: 3_600_000,
        recycle_segments_max: 2,
        ..small_config()
    };
    let stream = Arc::new(open(&os_file_system(), directory.path(), config).unwrap());
    append_all(&stream, &(0..6000).map(record).collect::<Vec<_>>()).await;
    wait_sealed_segments_indexed(&stream).await;
    let before = stream.status();
    // Two retention passes at once: each segment is removed once, by one.
    let passes: Vec<_> = (0..2)
        .map(|_| {
            let stream = Arc::clone(&stream);
            std::thread::spawn(move || stream.enforce_retention().unwrap())
        })
        .collect();
    let mut removed: Vec<u64> = passes
        .into_iter()
        .flat_map(|pass| pass.join().unwrap())
        .map(|deletion| deletion.base_offset)
        .collect();
    removed.sort_unstable();
    let unique = removed.len();
    removed.dedup();
    assert_eq!(
        removed.len(),
        unique,
        "a segment was removed twice: {removed:?}"
    );
    let after = stream.status();
    assert_eq!(after.segments + removed.len(), before.segments);
    assert!(after.records <= 1000 + 1000, "{after:?}");
    // Their files wait in recycle/ (at most recycle_segments_max), and new
    // segments reuse them.
    let recycle = directory.path().join("recycle");
    let waiting = std::fs::read_dir(&recycle).unwrap().count();
    assert!((1..=2).contains(&waiting), "{waiting} files in recycle/");
    let next = after.next_offset - FIRST_OFFSET;
    append_all(
        &stream,
        &(next..next + 1500).map(record).collect::<Vec<_>>(),
    )
    .await;
    assert!(
        std::fs::read_dir(&recycle).unwrap().count() < waiting,
        "a new segment took a recycled file"
    );
    let mut reader = stream
        .reader(StartPosition::Offset(after.next_offset), None)
        .unwrap();
    for offset in after.next_offset..after.next_offset + 1500 {
        assert_record(
            &reader.next().unwrap().unwrap(),
            &record(offset - FIRST_OFFSET),
            offset,
        );
    }
}

#[tokio::test]
async fn offline_commands_allocate_nothing() {
    let directory = tempfile::tempdir().unwrap();
    let config = StreamConfig {
        segment_bytes_max: 256 * 1024,
        ..small_config()
    };
    let stream = open(&os_file_system(), directory.path(), config).unwrap();
    append_all(&stream, &(0..3000).map(record).collect::<Vec<_>>()).await;
    std::mem::forget(stream);
    let copy = tempfile::tempdir().unwrap();
    copy_directory(directory.path(), copy.path());
    let lengths = || {
        segment_files(copy.path())
            .iter()
            .map(|path| std::fs::metadata(path).unwrap().len())
            .collect::<Vec<_>>()
    };
    let before = lengths();
    assert!(
        before.iter().all(|length| *length <= 256 * 1024),
        "{before:?}"
    );
    RecoveryManager::verify(&os_file_system(), copy.path(), &mut |_| {}).unwrap();
    RecoveryManager::recover(&os_file_system(), copy.path(), RecoveryMode::Repair).unwrap();
    let after = lengths();
    assert_eq!(before.len(), after.len());
    for (before, after) in before.iter().zip(&after) {
        assert!(
            after <= before,
            "an offline command grew a segment from {before} to {after}"
        );
    }
}

#[tokio::test]
async fn an_index_rebuilt_for_a_reader_is_written_by_maintenance() {
    let file_system = MemoryFileSystem::new();
    let options = StreamOptions {
        config: small_config(),
        driver: Driver::Manual,
        ..StreamOptions::default()
    };
    let (stream, _) = open_memory(&file_system, options);
    let records: Vec<_> = (0..3000).map(record).collect();
    for record in &records {
        let request = natswal::AppendRequest {
            records: vec![record.clone()],
            ..natswal::AppendRequest::default()
        };
        stream
            .try_submit(request, natswal::Completion::None)
            .unwrap()
            .unwrap();
        while stream.step_write(1) {}
        while stream.step_sync() {}
    }
    let sealed = stream.sealed_segments();
    assert!(sealed.len() >= 3);
    // The index of a sealed segment disappears while the stream is open,
    // and the cache forgets it (a capacity of 2, three segments read).
    let victim = &sealed[0];
    let index = victim.path.with_extension("idx");
    file_system.remove(&index).unwrap();
    for segment in &sealed[1..] {
        let mut reader = stream
            .reader(StartPosition::Offset(segment.base_offset), None)
            .unwrap();
        reader.next().unwrap().unwrap();
    }
    let middle = (victim.base_offset + victim.next_offset) / 2;
    let mut reader = stream.reader(StartPosition::Offset(middle), None).unwrap();
    assert_record(
        &reader.next().unwrap().unwrap(),
        &records[index_of(middle)],
        middle,
    );
    assert!(
        !file_system.exists(&index),
        "the reader rebuilt it in memory only"
    );
    stream.step_maintenance(1);
    assert!(file_system.exists(&index), "maintenance wrote it");
    let (header, _) =
        natswal::format::index::decode_index(&file_system.read(&index).unwrap()).unwrap();
    assert_eq!(header.next_offset, victim.next_offset);
}
