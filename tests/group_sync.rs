//! Group sync: the streams of one store that wait for a sync at once share
//! one sync of the file system. On the in-memory file system, where a sync
//! can be held (to line requests up behind it), fail, or be a crash point:
//! no append completes before a sync that covered it, the requests that
//! queued behind a sync all go in the next one, a failed sync of the file
//! system poisons every stream of its group and acknowledges nothing it
//! covered, and a crash at any operation keeps every acknowledged record.

mod common;

use natswal::io::memory::{Fault, MemoryFileSystem, Operation};
use natswal::{Error, Record, Store, Stream, StreamConfig, StreamOptions};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const STREAMS: usize = 12;

fn open_store(file_system: &MemoryFileSystem) -> Store {
    Store::with_file_system(Arc::new(file_system.clone()), Path::new("/data"), 8)
        .unwrap()
        .with_io_threads(2)
        .unwrap()
}

fn options() -> StreamOptions {
    StreamOptions {
        config: StreamConfig {
            // No maintenance during a test: its syncs would wait on a held
            // sync too, and take the pool's threads.
            maintenance_interval_ms: 3_600_000,
            ..common::small_config()
        },
        ..StreamOptions::default()
    }
}

fn open_streams(store: &Store) -> Vec<Arc<Stream>> {
    (0..STREAMS)
        .map(|index| {
            store
                .open_stream(&format!("s{index}"), options())
                .unwrap()
                .0
        })
        .collect()
}

fn record_of(stream: usize, round: usize) -> Record {
    Record::new(
        format!("tenant.{stream}"),
        format!("round {round} of {stream}"),
    )
}

/// A store whose streams hold one acknowledged record each (round 0): their
/// segments exist, so no later append creates one (a new segment's syncs
/// are not grouped, and would hold the pool's threads while syncs are).
async fn store_with_a_record_each(file_system: &MemoryFileSystem) -> (Store, Vec<Arc<Stream>>) {
    let store = open_store(file_system);
    let streams = open_streams(&store);
    for (index, stream) in streams.iter().enumerate() {
        stream.append(record_of(index, 0)).await.unwrap();
    }
    (store, streams)
}

/// Waits (bounded) until `condition` holds; says whether it did.
async fn wait_until(mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    true
}

type Appends = Vec<tokio::task::JoinHandle<natswal::Result<natswal::AppendOutcome>>>;

/// With syncs held: one append to stream 0 (its sync is taken alone and
/// waits), then one to every other stream, queued behind it.
async fn line_up(
    file_system: &MemoryFileSystem,
    store: &Store,
    streams: &[Arc<Stream>],
    round: usize,
) -> Appends {
    let group = Arc::clone(store.group_sync().expect("the store syncs in groups"));
    file_system.pause_syncs();
    let (syncs_before, _) = group.totals();
    let mut appends = Vec::new();
    let first = Arc::clone(&streams[0]);
    appends.push(tokio::spawn(async move {
        first.append(record_of(0, round)).await
    }));
    assert!(
        wait_until(|| group.totals().0 > syncs_before).await,
        "the first stream's sync started"
    );
    for (index, stream) in streams.iter().enumerate().skip(1) {
        let stream = Arc::clone(stream);
        appends.push(tokio::spawn(async move {
            stream.append(record_of(index, round)).await
        }));
    }
    assert!(
        wait_until(|| group.waiting() == STREAMS - 1).await,
        "every other stream's sync queued behind the first ({} queued)",
        group.waiting()
    );
    appends
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_streams_waiting_behind_a_sync_share_the_next_one() {
    let file_system = MemoryFileSystem::new();
    let (store, streams) = store_with_a_record_each(&file_system).await;
    let appends = line_up(&file_system, &store, &streams, 1).await;
    let group = store.group_sync().unwrap();
    let (syncs, requests) = group.totals();
    assert!(
        appends.iter().all(|append| !append.is_finished()),
        "no append completes while its sync is held"
    );
    file_system.resume_syncs();
    for append in appends {
        append.await.unwrap().unwrap();
    }
    assert_eq!(
        group.totals(),
        (syncs + 1, requests + STREAMS as u64 - 1),
        "one sync covered the {} streams that queued",
        STREAMS - 1
    );
    store.close().unwrap();
    drop((streams, store));
    let reopened = open_store(&file_system.crash(1));
    for (index, stream) in open_streams(&reopened).iter().enumerate() {
        common::assert_exactly(
            &common::read_all(stream).unwrap(),
            &[record_of(index, 0), record_of(index, 1)],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_group_sync_fails_every_stream_of_the_group_and_acknowledges_none() {
    let file_system = MemoryFileSystem::new();
    let (store, streams) = store_with_a_record_each(&file_system).await;
    let appends = line_up(&file_system, &store, &streams, 1).await;
    file_system.inject(Fault {
        operation: Operation::SyncFileSystem,
        path_contains: String::new(),
        errno: libc::EIO,
        after: 0,
        count: Some(1),
    });
    file_system.resume_syncs();
    let mut outcomes = Vec::new();
    for append in appends {
        outcomes.push(append.await.unwrap());
    }
    assert!(
        outcomes[0].is_ok(),
        "stream 0 synced alone: {:?}",
        outcomes[0]
    );
    for (index, outcome) in outcomes.iter().enumerate().skip(1) {
        assert!(
            matches!(outcome, Err(Error::Poisoned { .. })),
            "stream {index}'s append was in the failed sync: {outcome:?}"
        );
        let cause = streams[index]
            .status()
            .poisoned
            .expect("the stream is poisoned");
        assert!(
            cause.contains("/data/streams"),
            "the cause names the synced file system's directory: {cause}"
        );
        assert!(matches!(
            streams[index].append(record_of(index, 2)).await,
            Err(Error::Poisoned { .. })
        ));
    }
    assert!(
        streams[0].status().poisoned.is_none(),
        "stream 0 was not in the group"
    );
    streams[0].append(record_of(0, 2)).await.unwrap();
    drop((streams, store));
    // What was acknowledged survives a crash; what the failed sync covered
    // may or may not (it was never acknowledged).
    let reopened = open_store(&file_system.crash(2));
    for (index, stream) in open_streams(&reopened).iter().enumerate() {
        let stored = common::read_all(stream).unwrap();
        if index == 0 {
            common::assert_exactly(
                &stored,
                &[record_of(0, 0), record_of(0, 1), record_of(0, 2)],
            );
        } else {
            assert!(
                !stored.is_empty(),
                "stream {index} keeps its acknowledged record"
            );
            common::assert_prefix(&stored, &[record_of(index, 0), record_of(index, 1)]);
        }
    }
}

/// A crash at each operation of a load that lines syncs up in groups:
/// every acknowledged record survives, in order, and nothing else appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_any_operation_of_grouped_syncs_keeps_every_acknowledged_record() {
    const ROUNDS: usize = 4;
    let mut crashes = 0;
    let mut crash_point = 1;
    loop {
        let file_system = MemoryFileSystem::with_seed(crash_point);
        let (store, streams) = store_with_a_record_each(&file_system).await;
        let mut acknowledged: Vec<Vec<Record>> = (0..STREAMS)
            .map(|index| vec![record_of(index, 0)])
            .collect();
        file_system.crash_after_operations(crash_point);
        for round in 1..ROUNDS {
            if file_system.has_crashed() {
                break;
            }
            let appends = line_up_or_crash(&file_system, &store, &streams, round).await;
            for (index, append) in appends.into_iter().enumerate() {
                if append.await.unwrap().is_ok() {
                    acknowledged[index].push(record_of(index, round));
                }
            }
        }
        let crashed = file_system.has_crashed();
        drop((streams, store));
        let reopened = open_store(&file_system.crash(crash_point));
        for (index, stream) in open_streams(&reopened).iter().enumerate() {
            let stored = common::read_all(stream).unwrap();
            let written: Vec<Record> = (0..ROUNDS).map(|round| record_of(index, round)).collect();
            assert!(
                stored.len() >= acknowledged[index].len(),
                "crash at operation {crash_point}: stream {index} lost acknowledged records ({} stored, {} acknowledged)",
                stored.len(),
                acknowledged[index].len()
            );
            common::assert_prefix(&stored, &written);
        }
        if !crashed {
            break;
        }
        crashes += 1;
        crash_point += 1;
    }
    assert!(crashes > 20, "the load crossed {crashes} crash points");
}

/// [`line_up`], except that after a crash the appends fail instead of
/// queuing: then it lets them finish.
async fn line_up_or_crash(
    file_system: &MemoryFileSystem,
    store: &Store,
    streams: &[Arc<Stream>],
    round: usize,
) -> Appends {
    let group = Arc::clone(store.group_sync().unwrap());
    file_system.pause_syncs();
    let (_, taken_before) = group.totals();
    let mut appends: Appends = Vec::new();
    for (index, stream) in streams.iter().enumerate() {
        let stream = Arc::clone(stream);
        appends.push(tokio::spawn(async move {
            stream.append(record_of(index, round)).await
        }));
    }
    wait_until(|| {
        file_system.has_crashed()
            || group.totals().1 - taken_before + group.waiting() as u64 == STREAMS as u64
            || appends.iter().all(|append| append.is_finished())
    })
    .await;
    file_system.resume_syncs();
    appends
}
