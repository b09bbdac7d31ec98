//! Many streams at a bounded cost, on real files: a store's streams run on
//! its I/O pool (no thread per stream), hold at most its open-files limit
//! of descriptors (idle ones, active segments included, are closed and
//! reopened on demand), and take disk in proportion to what they hold (the
//! active segment grows in steps, it is not preallocated whole). The store
//! holds one lock for all its streams, and an offline tool on one of them
//! is refused while it runs. A full disk in the middle of a segment fails
//! the append that needed the space, nothing else.
//!
//! This binary's tests count natswal's threads and the descriptors of the
//! whole process: they run one at a time (a mutex), so they do not count
//! each other.

mod common;

use natswal::io::memory::MemoryFileSystem;
use natswal::io::{FileSystem, WriteMode};
use natswal::{
    Durability, Error, Record, RecoveryManager, SegmentCache, Store, Stream, StreamConfig,
    StreamOptions, FIRST_OFFSET,
};
use std::path::Path;
use std::sync::Arc;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const STREAMS: usize = 300;
const IO_THREADS: usize = 3;
const OPEN_FILES_MAX: usize = 16;

/// Threads of this process that natswal started (its pools and its group
/// sync are named `natswal-*`; the test harness's and tokio's are not, and
/// come and go with the other tests of this binary).
fn process_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("natswal-"))
        .count()
}

/// Descriptors of this process open on files under `directory`.
fn descriptors_under(directory: &Path) -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|target| target.starts_with(directory))
        .count()
}

/// Bytes the files under `path` occupy on disk (allocated blocks).
fn disk_used(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(path)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let metadata = entry.metadata().unwrap();
            let own = metadata.blocks() * 512;
            if metadata.is_dir() {
                own + disk_used(&entry.path())
            } else {
                own
            }
        })
        .sum()
}

fn stream_record(stream: usize) -> Record {
    Record::new(format!("tenant.{stream}"), format!("hello from {stream}"))
}

fn open_store(root: &Path) -> Store {
    Store::open(root, WriteMode::Pwrite, 8)
        .unwrap()
        .with_io_threads(IO_THREADS)
        .unwrap()
        .with_open_files_max(OPEN_FILES_MAX)
        .unwrap()
}

fn options() -> StreamOptions {
    // The default segment size (128 MiB): preallocated whole, 300 streams
    // would take 37 GiB.
    StreamOptions {
        config: StreamConfig {
            durability: Durability::Fsync,
            ..StreamConfig::default()
        },
        ..StreamOptions::default()
    }
}

fn assert_each_stream_holds_its_record(store: &Store) {
    for index in 0..STREAMS {
        let stream = store.stream(&format!("s{index}")).unwrap();
        common::assert_exactly(&common::read_all(&stream).unwrap(), &[stream_record(index)]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_cost_no_thread_each_few_descriptors_and_disk_in_proportion() {
    let _serial = SERIAL.lock().await;
    let root = tempfile::tempdir().unwrap();
    let threads_before = process_threads();
    let store = open_store(root.path());
    for index in 0..STREAMS {
        let (stream, _) = store.open_stream(&format!("s{index}"), options()).unwrap();
        let outcome = stream.append(stream_record(index)).await.unwrap();
        assert_eq!(outcome.first_offset, FIRST_OFFSET);
    }
    let added_threads = process_threads() - threads_before;
    assert!(
        added_threads <= IO_THREADS + 1,
        "{STREAMS} streams added {added_threads} threads; the pool has {IO_THREADS}, the group sync one"
    );
    // Every append was synced, so every handle is clean: the limit holds
    // (plus the store's lock file).
    let descriptors = descriptors_under(root.path());
    assert!(
        descriptors <= OPEN_FILES_MAX + 1,
        "{descriptors} descriptors open for {STREAMS} streams, limit {OPEN_FILES_MAX}"
    );
    assert!(store.handles().open_count() <= OPEN_FILES_MAX);
    let (closed, _) = store.handles().closed_and_reopened_total();
    assert!(closed > 0, "idle handles were closed");
    let per_stream = disk_used(root.path()) / STREAMS as u64;
    assert!(
        per_stream < 128 * 1024,
        "a stream with one record takes {per_stream} bytes of disk"
    );
    // Reads and appends reopen what was closed.
    assert_each_stream_holds_its_record(&store);
    let (_, reopened) = store.handles().closed_and_reopened_total();
    assert!(reopened > 0, "closed handles were reopened to read");
    store.close().unwrap();
    drop(store);

    let store = open_store(root.path());
    for index in 0..STREAMS {
        let (_stream, report) = store.open_stream(&format!("s{index}"), options()).unwrap();
        assert!(report.clean_shutdown, "stream s{index}: {report:?}");
    }
    assert_each_stream_holds_its_record(&store);
    assert!(descriptors_under(root.path()) <= OPEN_FILES_MAX + 1);
    store.close().unwrap();
}

/// Streams that append at once share syncs of the file system (group
/// sync), and a file synced that way is clean: the limit still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_appending_at_once_share_syncs_and_still_close_their_files() {
    let _serial = SERIAL.lock().await;
    let root = tempfile::tempdir().unwrap();
    let store = open_store(root.path());
    let streams: Vec<_> = (0..STREAMS)
        .map(|index| {
            store
                .open_stream(&format!("s{index}"), options())
                .unwrap()
                .0
        })
        .collect();
    let appends: Vec<_> = streams
        .iter()
        .enumerate()
        .map(|(index, stream)| {
            let stream = Arc::clone(stream);
            tokio::spawn(async move { stream.append(stream_record(index)).await })
        })
        .collect();
    for append in appends {
        append.await.unwrap().unwrap();
    }
    let (syncs, requests) = store.group_sync().expect("group sync is on").totals();
    assert!(
        requests >= STREAMS as u64 && syncs < requests,
        "{requests} stream syncs went through the group in {syncs} syncs"
    );
    let descriptors = descriptors_under(root.path());
    assert!(
        descriptors <= OPEN_FILES_MAX + 1,
        "{descriptors} descriptors open after grouped syncs, limit {OPEN_FILES_MAX}"
    );
    assert_each_stream_holds_its_record(&store);
    store.close().unwrap();
}

#[tokio::test]
async fn a_running_store_excludes_offline_tools_and_a_second_store() {
    let _serial = SERIAL.lock().await;
    let root = tempfile::tempdir().unwrap();
    let store = open_store(root.path());
    let (stream, _) = store.open_stream("orders", options()).unwrap();
    stream.append(stream_record(0)).await.unwrap();
    let file_system = common::os_file_system();
    let directory = store.stream_directory("orders");
    let store_lock = root.path().join("streams").join("LOCK");
    match RecoveryManager::verify(&file_system, &directory, &mut |_| {}) {
        Err(Error::Locked { path }) => assert_eq!(path, store_lock),
        other => panic!("verify beside a running store: {other:?}"),
    }
    match Store::open(root.path(), WriteMode::Pwrite, 8) {
        Err(Error::Locked { path }) => assert_eq!(path, store_lock),
        other => panic!("a second store on one directory: {other:?}"),
    }
    store.close().unwrap();
    drop(stream);
    drop(store);
    // Offline tools take the store's lock shared: one working on another
    // stream does not keep this one out, but it does keep a server out.
    let other_tool = file_system
        .lock_directory_shared(&root.path().join("streams"))
        .unwrap();
    let report = RecoveryManager::verify(&file_system, &directory, &mut |_| {}).unwrap();
    assert!(report.problems.is_empty(), "{report:?}");
    assert_eq!(report.records, 1);
    match Store::open(root.path(), WriteMode::Pwrite, 8) {
        Err(Error::Locked { path }) => assert_eq!(path, store_lock),
        other => panic!("a store beside an offline tool: {other:?}"),
    }
    drop(other_tool);
    Store::open(root.path(), WriteMode::Pwrite, 8).unwrap();
}

#[tokio::test]
async fn a_full_disk_in_the_middle_of_a_segment_fails_only_the_append_that_needed_the_space() {
    let _serial = SERIAL.lock().await;
    let file_system = MemoryFileSystem::new();
    let config = StreamConfig {
        segment_bytes_max: 8 * 1024 * 1024,
        ..common::small_config()
    };
    let open = || {
        Stream::open(
            Arc::new(file_system.clone()),
            Path::new("/data/s"),
            "s",
            Arc::new(SegmentCache::new(8)),
            StreamOptions {
                config: config.clone(),
                ..StreamOptions::default()
            },
        )
        .map(|(stream, _)| stream)
    };
    let stream = open().unwrap();
    let first = common::record(0);
    stream.append(first.clone()).await.unwrap();
    let segment = Path::new("/data/s").join(natswal::format::segment_file_name(FIRST_OFFSET));
    let allocated = file_system.file_length(&segment).unwrap();
    assert!(
        allocated < config.segment_bytes_max,
        "the first allocation ({allocated} bytes) is a step, not the whole segment"
    );
    // No room for the next step: the append that needs it fails, cleanly.
    file_system.set_space_limit(0);
    let mut expected = vec![first];
    let failure = common::append_until_error(&stream, &mut expected, 10_000).await;
    let error = failure.expect("the disk filled up before the segment did");
    assert!(matches!(error, Error::DiskFull { .. }), "{error}");
    assert!(
        error.to_string().contains(&segment.display().to_string()),
        "the error names the segment it could not extend: {error}"
    );
    assert!(
        stream.status().poisoned.is_none(),
        "a full disk does not poison"
    );
    let failure = stream.status().append_failure;
    assert!(
        failure
            .as_deref()
            .is_some_and(|cause| cause.contains("disk full")),
        "the status says why the stream cannot take writes: {failure:?}"
    );
    common::assert_exactly(&common::read_all(&stream).unwrap(), &expected);
    file_system.set_space_limit(u64::MAX);
    let next = common::record(expected.len() as u64);
    let outcome = stream.append(next.clone()).await.unwrap();
    assert_eq!(
        stream.status().append_failure,
        None,
        "a successful append ends the failure"
    );
    assert_eq!(outcome.first_offset, FIRST_OFFSET + expected.len() as u64);
    expected.push(next);
    assert!(file_system.file_length(&segment).unwrap() > allocated);
    stream.close().unwrap();
    drop(stream);
    let reopened = open().unwrap();
    common::assert_exactly(&common::read_all(&reopened).unwrap(), &expected);
}

/// With `durability = none` nothing asks for a sync, yet an idle stream's
/// file must become closable: the maintenance syncs writes that sat a whole
/// interval with nothing after them, and the limit then holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_without_durability_are_synced_and_their_files_closed() {
    let _serial = SERIAL.lock().await;
    const NONE_STREAMS: usize = 60;
    let root = tempfile::tempdir().unwrap();
    let store = open_store(root.path());
    let options = StreamOptions {
        config: StreamConfig {
            durability: Durability::None,
            maintenance_interval_ms: 20,
            ..StreamConfig::default()
        },
        ..StreamOptions::default()
    };
    for index in 0..NONE_STREAMS {
        let (stream, _) = store
            .open_stream(&format!("s{index}"), options.clone())
            .unwrap();
        stream.append(stream_record(index)).await.unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let synced = store
            .streams()
            .iter()
            .all(|stream| stream.log().durable().sequence == stream.log().written().sequence);
        if synced && descriptors_under(root.path()) <= OPEN_FILES_MAX + 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "idle streams still hold {} descriptors (limit {OPEN_FILES_MAX}); all synced: {synced}",
            descriptors_under(root.path())
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    store.close().unwrap();
}
