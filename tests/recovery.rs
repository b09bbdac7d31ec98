//! RecoveryManager on open (checkpoints, rebuilt indexes, damage, versions,
//! unfinished segments) and its offline operations (point-in-time restore,
//! durable suffix truncation).

mod common;

use common::*;
use natswal::format::index::decode_index;
use natswal::format::segment_file_name;
use natswal::io::memory::MemoryFileSystem;
use natswal::io::FileSystem;
use natswal::{
    Error, PointInTime, Record, RecoveryManager, RecoveryMode, StartPosition, Stream, StreamConfig,
    StreamOptions, FIRST_OFFSET,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

const BASE_TIME_NS: i64 = 1_700_000_000_000_000_000;

/// Record `index` with an explicit timestamp that grows with it.
fn timed(index: u64) -> Record {
    let mut record = record(index);
    record.timestamp_ns = BASE_TIME_NS + index as i64 * 1000;
    record
}

/// A cleanly closed multi-segment stream of `count` timed records, written
/// with many appends in flight (so frames hold several records).
async fn closed_stream(directory: &Path, count: u64) -> Vec<Record> {
    let expected: Vec<Record> = (0..count).map(timed).collect();
    let stream = open(&os_file_system(), directory, small_config()).unwrap();
    append_all(&stream, &expected).await;
    assert!(stream.status().segments >= 3, "{:?}", stream.status());
    stream.close().unwrap();
    expected
}

/// Appends timed records `first..first + count` to the stream in
/// `directory` (as `closed_stream` does) and closes it; returns them.
async fn closed_stream_continued(directory: &Path, first: u64, count: u64) -> Vec<Record> {
    let records: Vec<Record> = (first..first + count).map(timed).collect();
    let stream = open(&os_file_system(), directory, small_config()).unwrap();
    let outcomes = append_all(&stream, &records).await;
    assert_eq!(outcomes[0].first_offset, FIRST_OFFSET + first);
    assert!(stream.status().segments >= 3, "{:?}", stream.status());
    stream.close().unwrap();
    records
}

fn repair_options(config: StreamConfig) -> StreamOptions {
    StreamOptions {
        config,
        recovery_mode: RecoveryMode::Repair,
        ..StreamOptions::default()
    }
}

#[tokio::test]
async fn clean_reopen_validates_nothing() {
    let directory = tempfile::tempdir().unwrap();
    let expected = closed_stream(directory.path(), 3000).await;
    let (stream, report) =
        open_reported(&os_file_system(), directory.path(), options(small_config())).unwrap();
    assert!(report.clean_shutdown, "{report:?}");
    assert_eq!(report.validated_bytes, 0, "{report:?}");
    assert!(report.truncated.is_empty() && report.rebuilt_indexes.is_empty());
    assert_eq!(report.segments, stream.status().segments);
    assert_exactly(&read_all(&stream).unwrap(), &expected);
}

#[tokio::test]
async fn after_a_crash_only_the_tail_past_the_checkpoint_is_validated() {
    let directory = tempfile::tempdir().unwrap();
    // One large active segment, so validating all of it would be far more
    // than the tail past its last checkpoint.
    let config = StreamConfig {
        segment_bytes_max: 4 << 20,
        ..small_config()
    };
    let bound = config.checkpoint_interval_bytes + config.frame_bytes_max + 96;
    let expected: Vec<Record> = (0..8000).map(record).collect();
    let stream = open(&os_file_system(), directory.path(), config.clone()).unwrap();
    append_all(&stream, &expected).await;
    let status = stream.status();
    assert_eq!(status.segments, 1);
    assert!(status.bytes > 10 * bound, "{status:?}");
    std::mem::forget(stream);
    let crashed = tempfile::tempdir().unwrap();
    copy_directory(directory.path(), crashed.path());
    let (stream, report) =
        open_reported(&os_file_system(), crashed.path(), options(config)).unwrap();
    assert!(!report.clean_shutdown, "{report:?}");
    assert!(
        report.validated_bytes <= bound,
        "validated {} bytes, more than a checkpoint interval and a frame ({bound})",
        report.validated_bytes
    );
    assert!(
        report.rebuilt_indexes.is_empty(),
        "the checkpoint was used: {report:?}"
    );
    assert_exactly(&read_all(&stream).unwrap(), &expected);
}

fn flip_byte(path: &Path, position: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[position] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn missing_or_corrupted_sealed_indexes_are_rebuilt() {
    let directory = tempfile::tempdir().unwrap();
    let expected = closed_stream(directory.path(), 4000).await;
    let segments = segment_files(directory.path());
    assert!(segments.len() >= 4, "{segments:?}");
    let indexes: Vec<PathBuf> = segments
        .iter()
        .map(|path| path.with_extension("idx"))
        .collect();
    std::fs::remove_file(&indexes[0]).unwrap();
    flip_byte(&indexes[1], 20); // header: caught on open
    let entries_length = std::fs::read(&indexes[2]).unwrap().len();
    flip_byte(&indexes[2], entries_length - 8); // entries: caught on first use
    let (stream, report) =
        open_reported(&os_file_system(), directory.path(), options(small_config())).unwrap();
    assert!(report.rebuilt_indexes.contains(&indexes[0]), "{report:?}");
    assert!(report.rebuilt_indexes.contains(&indexes[1]), "{report:?}");
    assert_exactly(&read_all(&stream).unwrap(), &expected);
    // Offset and time seeks land exactly, in every damaged segment.
    for segment in &segments[..3] {
        let bytes = std::fs::read(segment).unwrap();
        let frames = frames_of(&bytes);
        let middle = frames[frames.len() / 2];
        let offset = middle.base_offset + u64::from(middle.record_count) / 2;
        let mut reader = stream.reader(StartPosition::Offset(offset), None).unwrap();
        assert_record(
            &reader.next().unwrap().unwrap(),
            &expected[index_of(offset)],
            offset,
        );
        let time = expected[index_of(offset)].timestamp_ns;
        for (start, first) in [(time, offset), (time - 1, offset), (time + 1, offset + 1)] {
            let mut reader = stream.reader(StartPosition::Time(start), None).unwrap();
            let stored = reader.next().unwrap().unwrap();
            assert_record(&stored, &expected[index_of(first)], first);
        }
    }
    // The rebuilt indexes are on disk again, whole and matching.
    for (segment, index) in segments.iter().zip(&indexes).take(3) {
        let (header, entries) = decode_index(&std::fs::read(index).unwrap())
            .unwrap_or_else(|error| panic!("{}: {error}", index.display()));
        assert!(header.is_sealed());
        assert_eq!(
            header.data_length,
            std::fs::metadata(segment).unwrap().len()
        );
        assert!(!entries.is_empty());
    }
}

#[tokio::test]
async fn damage_in_the_middle_of_the_active_segment_is_refused_then_quarantined() {
    let directory = tempfile::tempdir().unwrap();
    let config = StreamConfig {
        segment_bytes_max: 1 << 20,
        ..small_config()
    };
    let expected: Vec<Record> = (0..300).map(record).collect();
    {
        // One append at a time: each frame is synced before the next one is
        // written, so every later frame proves the earlier ones were durable.
        let stream = open(&os_file_system(), directory.path(), config.clone()).unwrap();
        for record in &expected {
            stream.append(record.clone()).await.unwrap();
        }
        stream.close().unwrap();
    }
    let log = segment_files(directory.path()).pop().unwrap();
    // As after a crash: no checkpoint, so open validates the whole segment.
    std::fs::remove_file(log.with_extension("idx")).unwrap();
    let frames = frames_of(&std::fs::read(&log).unwrap());
    assert_eq!(frames.len(), expected.len());
    let damaged = frames[150];
    assert_eq!(damaged.base_offset, FIRST_OFFSET + 150);
    flip_byte(&log, (damaged.start + 120) as usize);
    let damaged_bytes =
        std::fs::read(&log).unwrap()[damaged.start as usize..damaged.end as usize].to_vec();

    let error = open_reported(&os_file_system(), directory.path(), options(config.clone()))
        .expect_err("strict open refuses damage that is not a torn write");
    match &error {
        Error::Corruption { path, position, .. } => {
            assert_eq!(path, &log);
            assert_eq!(*position, damaged.start);
        }
        other => panic!("expected corruption, got {other}"),
    }
    let message = error.to_string();
    assert!(message.contains(&log.display().to_string()), "{message}");
    assert!(
        message.contains(&format!("byte {}", damaged.start)),
        "{message}"
    );

    let (stream, report) = open_reported(
        &os_file_system(),
        directory.path(),
        repair_options(config.clone()),
    )
    .unwrap();
    assert_eq!(report.quarantined.len(), 1, "{report:?}");
    let range = &report.quarantined[0];
    assert_eq!((range.start, range.end), (damaged.start, damaged.end));
    assert_eq!(range.segment, log);
    let log_name = log.file_name().unwrap().to_string_lossy().to_string();
    let quarantine = directory.path().join("quarantine");
    let saved = quarantine.join(format!(
        "{log_name}.at-{}-{}.bin",
        damaged.start, damaged.end
    ));
    assert_eq!(range.saved_to, saved);
    assert_eq!(
        std::fs::read(&saved).unwrap(),
        damaged_bytes,
        "the .bin holds exactly the damaged range"
    );
    assert!(quarantine
        .join(format!(
            "{log_name}.at-{}-{}.txt",
            damaged.start, damaged.end
        ))
        .exists());
    let check = |stream: &Stream, appended: bool| {
        let records = read_all(stream).unwrap();
        let total = expected.len() - 1 + usize::from(appended);
        assert_eq!(records.len(), total);
        for stored in &records {
            assert_ne!(
                stored.offset,
                FIRST_OFFSET + 150,
                "the damaged record is gone"
            );
            let want = expected
                .get(index_of(stored.offset))
                .cloned()
                .unwrap_or_else(|| record(300));
            assert_record(stored, &want, stored.offset);
        }
    };
    check(&stream, false);
    assert_eq!(
        stream.append(record(300)).await.unwrap().first_offset,
        FIRST_OFFSET + 300
    );
    check(&stream, true);
    stream.close().unwrap();
    drop(stream);
    // The repair is durable: a strict open now finds the same log.
    let (stream, report) =
        open_reported(&os_file_system(), directory.path(), options(config)).unwrap();
    assert!(
        report.quarantined.is_empty() && report.truncated.is_empty(),
        "{report:?}"
    );
    check(&stream, true);
}

fn set_segment_version(path: &Path, version: u16) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[8..10].copy_from_slice(&version.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn a_segment_of_another_format_version_is_refused_and_left_alone() {
    let directory = tempfile::tempdir().unwrap();
    closed_stream(directory.path(), 3000).await;
    let segments = segment_files(directory.path());
    let supported = natswal::format::FORMAT_VERSION;
    for (version, hint) in [
        (supported + 1, "upgrade natswal"),
        (supported - 1, "earlier natswal"),
    ] {
        for target in [&segments[0], segments.last().unwrap()] {
            let trial = tempfile::tempdir().unwrap();
            copy_directory(directory.path(), trial.path());
            let path = trial.path().join(target.file_name().unwrap());
            set_segment_version(&path, version);
            let before = directory_contents(trial.path());
            for mode in [RecoveryMode::Strict, RecoveryMode::Repair] {
                let options = StreamOptions {
                    config: small_config(),
                    recovery_mode: mode,
                    ..StreamOptions::default()
                };
                let error = open_reported(&os_file_system(), trial.path(), options)
                    .expect_err("another format version is refused");
                match &error {
                    Error::UnsupportedVersion {
                        path: named,
                        found,
                        supported: reads,
                    } => {
                        assert_eq!(named, &path);
                        assert_eq!((*found, *reads), (version, supported));
                    }
                    other => panic!("expected UnsupportedVersion, got {other}"),
                }
                let message = error.to_string();
                assert!(message.contains(&format!("version {version}")), "{message}");
                assert!(message.contains(hint), "{message}");
                assert!(message.contains(&path.display().to_string()), "{message}");
                assert_eq!(
                    directory_contents(trial.path()),
                    before,
                    "{mode:?} changed nothing"
                );
            }
        }
    }
}

#[tokio::test]
async fn an_unfinished_segment_creation_leaves_nothing_and_a_zeroed_segment_is_repaired() {
    let directory = tempfile::tempdir().unwrap();
    let expected = closed_stream(directory.path(), 3000).await;
    let next = expected.len() as u64;
    // A crash while creating the next segment leaves only its temporary
    // file: segments appear under their name whole (header synced, then
    // renamed in).
    for zeros in [0u64, 64 * 1024] {
        let trial = tempfile::tempdir().unwrap();
        copy_directory_with_temporaries(directory.path(), trial.path());
        let leftover = trial
            .path()
            .join(format!("{}.tmp", segment_file_name(FIRST_OFFSET + next)));
        std::fs::write(&leftover, vec![0u8; zeros as usize]).unwrap();
        let (stream, report) =
            open_reported(&os_file_system(), trial.path(), options(small_config())).unwrap();
        assert!(report.removed_files.contains(&leftover), "{report:?}");
        assert!(!leftover.exists(), "{} was removed", leftover.display());
        assert_exactly(&read_all(&stream).unwrap(), &expected);
        let outcome = stream.append(record(next)).await.unwrap();
        assert_eq!(outcome.first_offset, FIRST_OFFSET + next);
        stream.close().unwrap();
    }
    // A segment whose header is zeros under its real name is damage: the
    // strict open names it, a repair rebuilds its header from its frames.
    let trial = tempfile::tempdir().unwrap();
    copy_directory(directory.path(), trial.path());
    let last = segment_files(trial.path()).pop().unwrap();
    let mut bytes = std::fs::read(&last).unwrap();
    bytes[..64].fill(0);
    std::fs::write(&last, &bytes).unwrap();
    let error = open_reported(&os_file_system(), trial.path(), options(small_config()))
        .expect_err("a zeroed header is refused");
    assert!(
        error.to_string().contains(&last.display().to_string()) && error.is_corruption(),
        "{error}"
    );
    let (stream, report) = open_reported(
        &os_file_system(),
        trial.path(),
        repair_options(small_config()),
    )
    .unwrap();
    assert_eq!(report.quarantined.len(), 1, "{report:?}");
    assert_eq!(
        (report.quarantined[0].start, report.quarantined[0].end),
        (0, 64)
    );
    assert_exactly(&read_all(&stream).unwrap(), &expected);
    let outcome = stream.append(record(next)).await.unwrap();
    assert_eq!(outcome.first_offset, FIRST_OFFSET + next);
}

#[tokio::test]
async fn restore_to_an_offset_or_a_time_gives_exactly_the_prefix() {
    let directory = tempfile::tempdir().unwrap();
    let source = directory.path().join("source");
    let mut expected = closed_stream(&source, 3000).await;
    {
        // Atomic batches after the bulk, in the last segment.
        let stream = open(&os_file_system(), &source, small_config()).unwrap();
        for _ in 0..5 {
            let first = expected.len() as u64;
            let batch: Vec<Record> = (first..first + 4).map(timed).collect();
            stream.append_batch(batch.clone()).await.unwrap();
            expected.extend(batch);
            let single = timed(expected.len() as u64);
            stream.append(single.clone()).await.unwrap();
            expected.push(single);
        }
        stream.close().unwrap();
    }
    let before = directory_contents(&source);
    let segments = segment_files(&source);
    let all_frames: Vec<(usize, FrameSpan)> = segments
        .iter()
        .enumerate()
        .flat_map(|(index, path)| {
            frames_of(&std::fs::read(path).unwrap())
                .into_iter()
                .map(move |frame| (index, frame))
        })
        .collect();
    // A multi-record frame in the first segment, and an atomic batch.
    let &(_, split) = all_frames
        .iter()
        .find(|(segment, frame)| *segment == 0 && frame.record_count >= 3 && !frame.atomic)
        .expect("a multi-record frame in the first segment");
    let &(_, atomic) = all_frames
        .iter()
        .find(|(_, frame)| frame.atomic)
        .expect("an atomic batch");
    assert!(atomic.record_count == 4);
    // Each case: the point, and the offset after the last record kept.
    let cut = split.base_offset + 1;
    let cases = [
        ("offset", PointInTime::Offset(cut), cut + 1),
        (
            "time",
            PointInTime::Time(expected[index_of(cut)].timestamp_ns),
            cut + 1,
        ),
        (
            "time between records",
            PointInTime::Time(expected[index_of(cut)].timestamp_ns + 1),
            cut + 1,
        ),
        (
            "offset in an atomic batch",
            PointInTime::Offset(atomic.base_offset + 2),
            atomic.base_offset,
        ),
        (
            "everything",
            PointInTime::Offset(u64::MAX),
            FIRST_OFFSET + expected.len() as u64,
        ),
    ];
    let file_system = os_file_system();
    for (index, (name, point, next_offset)) in cases.into_iter().enumerate() {
        // The records before `next_offset`, all of which are kept.
        let kept = index_of(next_offset);
        let target = directory.path().join(format!("restored-{index}"));
        let report = RecoveryManager::restore(&file_system, &source, &target, point)
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        assert_eq!(report.next_offset, next_offset, "{name}: {report:?}");
        assert_eq!(report.records_kept, kept as u64, "{name}: {report:?}");
        assert_eq!(
            report.records_kept + report.records_removed,
            expected.len() as u64,
            "{name}: {report:?}"
        );
        if next_offset == cut + 1 {
            // The cut is in the first segment: every later one goes.
            assert_eq!(
                report.segments_removed,
                segments.len() - 1,
                "{name}: {report:?}"
            );
            assert_eq!(segment_files(&target).len(), 1, "{name}");
        }
        assert_eq!(
            directory_contents(&source),
            before,
            "{name}: the source is unchanged"
        );
        let stream = open(&file_system, &target, small_config()).unwrap();
        assert_exactly(&read_all(&stream).unwrap(), &expected[..kept]);
        let outcome = stream.append(record(kept as u64)).await.unwrap();
        assert_eq!(outcome.first_offset, next_offset, "{name}");
    }
    // The target must be new or empty.
    let error = RecoveryManager::restore(
        &file_system,
        &source,
        &directory.path().join("restored-0"),
        PointInTime::Offset(FIRST_OFFSET + 1),
    )
    .unwrap_err();
    assert!(error.to_string().contains("not empty"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_suffix_is_durable_and_appends_continue_at_the_cut() {
    let file_system = MemoryFileSystem::new();
    let shared: Arc<dyn FileSystem> = Arc::new(file_system.clone());
    let directory = Path::new("/data/s");
    let expected: Vec<Record> = (0..3000).map(record).collect();
    {
        let stream = open(&shared, directory, small_config()).unwrap();
        append_all(&stream, &expected).await;
        assert!(stream.status().segments >= 3);
        stream.close().unwrap();
    }
    let names = file_system.list(directory).unwrap();
    let segments: Vec<PathBuf> = names
        .iter()
        .filter(|name| name.ends_with(".log"))
        .map(|name| directory.join(name))
        .collect();
    // A multi-record frame in the second segment: the cut splits it.
    let frames = frames_of(&file_system.read(&segments[1]).unwrap());
    let split = frames
        .iter()
        .find(|frame| frame.record_count >= 3 && !frame.atomic)
        .expect("a multi-record frame");
    let cut = split.base_offset + 2;
    // The records before the cut, all of which are kept.
    let kept = index_of(cut);
    let report = RecoveryManager::truncate_suffix(&shared, directory, cut).unwrap();
    assert_eq!(report.next_offset, cut);
    assert_eq!(report.records_kept, kept as u64);
    assert_eq!(report.segments_removed, segments.len() - 2);
    // Power loss right after: the cut must have been durable.
    for seed in 0..4 {
        let crashed: Arc<dyn FileSystem> = Arc::new(file_system.crash(seed));
        let stream = open(&crashed, directory, small_config()).unwrap();
        assert_exactly(&read_all(&stream).unwrap(), &expected[..kept]);
        let outcome = stream.append(record(kept as u64)).await.unwrap();
        assert_eq!(outcome.first_offset, cut);
        stream.close().unwrap();
        drop(stream);
        let stream = open(&crashed, directory, small_config()).unwrap();
        let mut records = read_all(&stream).unwrap();
        let appended = records.pop().unwrap();
        assert_record(&appended, &record(kept as u64), cut);
        assert_exactly(&records, &expected[..kept]);
    }
}

/// A cut before the first record (by offset, by time, or inside an atomic
/// batch that is the first frame) leaves an empty stream whose next offset
/// is `FIRST_OFFSET`, as the report says, and appends start there again.
#[tokio::test]
async fn a_cut_before_the_first_record_leaves_an_empty_stream_at_the_first_offset() {
    let directory = tempfile::tempdir().unwrap();
    let source = directory.path().join("source");
    let mut expected: Vec<Record> = (0..4).map(timed).collect();
    {
        // The first frame is an atomic batch.
        let stream = open(&os_file_system(), &source, small_config()).unwrap();
        let outcome = stream.append_batch(expected.clone()).await.unwrap();
        assert_eq!((outcome.first_offset, outcome.count), (FIRST_OFFSET, 4));
        stream.close().unwrap();
    }
    expected.extend(closed_stream_continued(&source, 4, 3000).await);
    let first_frame = frames_of(&std::fs::read(&segment_files(&source)[0]).unwrap())[0];
    assert_eq!(first_frame.base_offset, FIRST_OFFSET);
    assert!(first_frame.atomic && first_frame.record_count == 4);
    let segments = segment_files(&source).len();
    let file_system = os_file_system();
    let cases = [
        (
            "offset before the first",
            PointInTime::Offset(FIRST_OFFSET - 1),
        ),
        (
            "time before the first",
            PointInTime::Time(expected[0].timestamp_ns - 1),
        ),
        (
            "offset inside the first, atomic, frame",
            PointInTime::Offset(FIRST_OFFSET + 1),
        ),
    ];
    let mut targets = Vec::new();
    for (index, (name, point)) in cases.into_iter().enumerate() {
        let target = directory.path().join(format!("restored-{index}"));
        let report = RecoveryManager::restore(&file_system, &source, &target, point)
            .unwrap_or_else(|error| panic!("{name}: {error}"));
        assert_eq!(report.next_offset, FIRST_OFFSET, "{name}: {report:?}");
        assert_eq!(report.records_kept, 0, "{name}: {report:?}");
        assert_eq!(
            report.records_removed,
            expected.len() as u64,
            "{name}: {report:?}"
        );
        assert_eq!(report.segments_removed, segments - 1, "{name}: {report:?}");
        targets.push((name, target));
    }
    // The same cut by truncation, in place.
    let truncated = directory.path().join("truncated");
    copy_directory(&source, &truncated);
    let report = RecoveryManager::truncate_suffix(&file_system, &truncated, FIRST_OFFSET).unwrap();
    assert_eq!(report.next_offset, FIRST_OFFSET, "{report:?}");
    assert_eq!(report.records_kept, 0, "{report:?}");
    assert_eq!(report.records_removed, expected.len() as u64, "{report:?}");
    assert_eq!(report.segments_removed, segments - 1, "{report:?}");
    targets.push(("truncate", truncated));
    for (name, target) in targets {
        let stream = open(&file_system, &target, small_config()).unwrap();
        assert!(read_all(&stream).unwrap().is_empty(), "{name}");
        let status = stream.status();
        assert_eq!(
            (status.first_offset, status.next_offset, status.records),
            (FIRST_OFFSET, FIRST_OFFSET, 0),
            "{name}: {status:?}"
        );
        let outcome = stream.append(record(0)).await.unwrap();
        assert_eq!(outcome.first_offset, FIRST_OFFSET, "{name}");
        assert_exactly(&read_all(&stream).unwrap(), &[record(0)]);
    }
}

/// A stream that never took an append has no segment; verify and restore
/// say its next offset is `FIRST_OFFSET`, as its status does.
#[tokio::test]
async fn a_stream_without_records_is_at_the_first_offset_offline_too() {
    let directory = tempfile::tempdir().unwrap();
    let source = directory.path().join("source");
    let file_system = os_file_system();
    {
        let stream = open(&file_system, &source, small_config()).unwrap();
        assert_eq!(stream.status().next_offset, FIRST_OFFSET);
        stream.close().unwrap();
    }
    assert!(segment_files(&source).is_empty());
    let verified = RecoveryManager::verify(&file_system, &source, &mut |_| {}).unwrap();
    assert!(verified.is_healthy(), "{verified:?}");
    assert_eq!(
        (verified.segments, verified.records, verified.next_offset),
        (0, 0, FIRST_OFFSET),
        "{verified:?}"
    );
    let target = directory.path().join("restored");
    let report = RecoveryManager::restore(
        &file_system,
        &source,
        &target,
        PointInTime::Offset(u64::MAX),
    )
    .unwrap();
    assert_eq!(
        report,
        natswal::TruncateReport {
            next_offset: FIRST_OFFSET,
            ..Default::default()
        }
    );
    let stream = open(&file_system, &target, small_config()).unwrap();
    assert_eq!(stream.status().next_offset, FIRST_OFFSET);
    assert_eq!(
        stream.append(record(0)).await.unwrap().first_offset,
        FIRST_OFFSET
    );
}

// ---------------------------------------------------------------------------
// A segment whose sealing a crash interrupted, or that lost frames.

/// Makes `segment` look like the writer had moved on from it but a crash
/// came before it was cut and indexed: still allocated to its full size,
/// no index. With `lost_frames`, its last frames are also gone (zeros) or
/// damaged (half of them zeroed): damage, since every frame of a segment
/// was durable before the next segment was created.
fn interrupt_seal(segment: &Path, lost_frames: usize, torn: bool) -> u64 {
    let bytes = std::fs::read(segment).unwrap();
    let frames = frames_of(&bytes);
    let mut image = bytes.clone();
    let next_offset = match lost_frames {
        0 => {
            let last = frames.last().unwrap();
            last.base_offset + u64::from(last.record_count)
        }
        _ => {
            let first_lost = frames[frames.len() - lost_frames];
            let lost_from = if torn {
                (first_lost.start + (first_lost.end - first_lost.start) / 2) as usize
            } else {
                first_lost.start as usize
            };
            image[lost_from..].fill(0);
            first_lost.base_offset
        }
    };
    image.resize(64 * 1024, 0);
    std::fs::write(segment, image).unwrap();
    std::fs::remove_file(segment.with_extension("idx")).unwrap();
    next_offset
}

#[tokio::test]
async fn an_interrupted_seal_is_finished_on_open() {
    let directory = tempfile::tempdir().unwrap();
    let expected = closed_stream(directory.path(), 4000).await;
    let segments = segment_files(directory.path());
    let unfinished = &segments[1];
    let length = std::fs::metadata(unfinished).unwrap().len();
    interrupt_seal(unfinished, 0, false);
    let (stream, report) =
        open_reported(&os_file_system(), directory.path(), options(small_config())).unwrap();
    assert!(report.completed_seals.contains(unfinished), "{report:?}");
    assert!(
        report.truncated.is_empty() && report.removed_files.is_empty(),
        "{report:?}"
    );
    assert_eq!(
        std::fs::metadata(unfinished).unwrap().len(),
        length,
        "cut to its frames again"
    );
    assert!(unfinished.with_extension("idx").exists());
    assert_exactly(&read_all(&stream).unwrap(), &expected);
    stream.close().unwrap();
    drop(stream);
    let report = RecoveryManager::verify(&os_file_system(), directory.path(), &mut |_| {}).unwrap();
    assert!(report.is_healthy(), "{report:?}");
}

#[tokio::test]
async fn a_sealed_segment_that_lost_frames_is_damage_and_costs_only_those_frames() {
    let directory = tempfile::tempdir().unwrap();
    let expected = closed_stream(directory.path(), 4000).await;
    for torn in [false, true] {
        let trial = tempfile::tempdir().unwrap();
        copy_directory(directory.path(), trial.path());
        let segments = segment_files(trial.path());
        assert!(segments.len() >= 4);
        let damaged = &segments[1];
        let first_lost = interrupt_seal(damaged, 3, torn);
        let next_base: u64 = segments[2]
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .parse()
            .unwrap();
        let error = open_reported(&os_file_system(), trial.path(), options(small_config()))
            .expect_err("lost frames of a sealed segment are refused");
        match &error {
            Error::Corruption { path, .. } => assert_eq!(path, damaged),
            other => panic!("expected corruption, got {other}"),
        }
        assert!(error.to_string().contains("natswal repair"), "{error}");
        // Nothing was changed by the refusal, and no later segment was
        // touched (the bug this replaces deleted them all).
        for later in &segments[2..] {
            assert!(later.exists());
        }
        let (stream, report) = open_reported(
            &os_file_system(),
            trial.path(),
            repair_options(small_config()),
        )
        .unwrap();
        assert_eq!(report.lost.len(), 1, "torn {torn}: {report:?}");
        assert_eq!(
            (report.lost[0].first_offset, report.lost[0].next_offset),
            (first_lost, next_base),
            "exactly the lost frames' offsets are recorded"
        );
        if torn {
            assert_eq!(report.quarantined.len(), 1, "{report:?}");
        }
        let records = read_all(&stream).unwrap();
        let kept: Vec<u64> = (FIRST_OFFSET..first_lost)
            .chain(next_base..FIRST_OFFSET + expected.len() as u64)
            .collect();
        assert_eq!(records.len(), kept.len());
        for (stored, offset) in records.iter().zip(kept) {
            assert_record(stored, &expected[index_of(offset)], offset);
        }
        // Appends continue at the end, never reusing the lost offsets.
        let next = expected.len() as u64;
        assert_eq!(
            stream.append(record(next)).await.unwrap().first_offset,
            FIRST_OFFSET + next
        );
        stream.close().unwrap();
        drop(stream);
        let report = RecoveryManager::verify(&os_file_system(), trial.path(), &mut |_| {}).unwrap();
        assert!(report.is_healthy(), "torn {torn}: {report:?}");
        assert_eq!(
            report.recorded_gaps,
            vec![(first_lost, next_base)],
            "verify lists the loss the repair recorded"
        );
        let stream = open(&os_file_system(), trial.path(), small_config()).unwrap();
        assert_eq!(read_all(&stream).unwrap().len(), records.len() + 1);
        drop(stream);
        // A truncation inside the recorded gap cuts exactly there: a
        // shorter gap stays, and no offset below the cut is reused.
        assert!(next_base > first_lost + 1, "the gap spans several offsets");
        let cut = first_lost + 1;
        let truncated =
            RecoveryManager::truncate_suffix(&os_file_system(), trial.path(), cut).unwrap();
        assert_eq!(truncated.next_offset, cut, "torn {torn}: {truncated:?}");
        let stream = open(&os_file_system(), trial.path(), small_config()).unwrap();
        assert_eq!(stream.append(record(0)).await.unwrap().first_offset, cut);
        assert_eq!(read_all(&stream).unwrap().len(), index_of(first_lost) + 1);
    }
}

#[tokio::test]
async fn a_missing_segment_is_a_gap_that_only_a_repair_records() {
    let directory = tempfile::tempdir().unwrap();
    let expected = closed_stream(directory.path(), 4000).await;
    let segments = segment_files(directory.path());
    std::fs::remove_file(&segments[1]).unwrap();
    std::fs::remove_file(segments[1].with_extension("idx")).unwrap();
    let error = open_reported(&os_file_system(), directory.path(), options(small_config()))
        .expect_err("a gap between segments is refused");
    let message = error.to_string();
    assert!(
        message.contains(&segments[0].display().to_string())
            && message.contains(&segments[2].display().to_string()),
        "the error names both files: {message}"
    );
    let (stream, report) = open_reported(
        &os_file_system(),
        directory.path(),
        repair_options(small_config()),
    )
    .unwrap();
    let second_base: u64 = segments[1]
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .parse()
        .unwrap();
    let third_base: u64 = segments[2]
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .parse()
        .unwrap();
    assert_eq!(report.lost.len(), 1, "{report:?}");
    assert_eq!(
        (report.lost[0].first_offset, report.lost[0].next_offset),
        (second_base, third_base)
    );
    let records = read_all(&stream).unwrap();
    let kept: Vec<u64> = (FIRST_OFFSET..second_base)
        .chain(third_base..FIRST_OFFSET + expected.len() as u64)
        .collect();
    assert_eq!(records.len(), kept.len());
    for (stored, offset) in records.iter().zip(kept) {
        assert_record(stored, &expected[index_of(offset)], offset);
    }
    stream.close().unwrap();
    drop(stream);
    let report = RecoveryManager::verify(&os_file_system(), directory.path(), &mut |_| {}).unwrap();
    assert!(report.is_healthy(), "{report:?}");
}

#[tokio::test]
async fn a_stream_directory_is_locked_while_open_and_free_after() {
    let directory = tempfile::tempdir().unwrap();
    let file_system = os_file_system();
    let stream = open(&file_system, directory.path(), small_config()).unwrap();
    stream.append(record(1)).await.unwrap();
    let lock = directory.path().join("LOCK");
    let is_locked = |result: natswal::Result<()>| match result {
        Err(Error::Locked { path }) => path == lock,
        other => panic!("expected Locked, got {other:?}"),
    };
    // A second writer, an offline repair, a truncation and a restore are
    // all refused while the stream is open, and the error says why.
    let second = open(&file_system, directory.path(), small_config());
    assert!(is_locked(second.map(drop)));
    let repaired = RecoveryManager::recover(&file_system, directory.path(), RecoveryMode::Repair);
    assert!(is_locked(repaired.map(drop)));
    let truncated = RecoveryManager::truncate_suffix(&file_system, directory.path(), 1);
    assert!(is_locked(truncated.map(drop)));
    let target = tempfile::tempdir().unwrap();
    let restored = RecoveryManager::restore(
        &file_system,
        directory.path(),
        &target.path().join("restored"),
        PointInTime::Offset(1),
    );
    assert!(is_locked(restored.map(drop)));
    let message = open(&file_system, directory.path(), small_config())
        .unwrap_err()
        .to_string();
    assert!(message.contains("held by another process"), "{message}");
    // Readers keep the stream (and its lock) alive; once all is dropped the
    // directory opens again with its data.
    let reader = stream.reader(StartPosition::Earliest, None).unwrap();
    stream.close().unwrap();
    drop(stream);
    assert!(is_locked(
        open(&file_system, directory.path(), small_config()).map(drop)
    ));
    drop(reader);
    let reopened = open(&file_system, directory.path(), small_config()).unwrap();
    assert_eq!(read_all(&reopened).unwrap().len(), 1);
}
