//! Many producers, many appends in flight, one reader following along:
//! offsets are unique and dense, each producer's appends keep their order,
//! and the reader sees a growing prefix with no gaps while appends go on.

mod common;

use bytes::Bytes;
use natswal::{
    AppendRequest, Completed, Completion, Record, StartPosition, StoredRecord, FIRST_OFFSET,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};

const PRODUCERS: u64 = 8;
const PER_PRODUCER: u64 = 100_000;
const TOTAL: u64 = PRODUCERS * PER_PRODUCER;
const IN_FLIGHT: usize = 2048;
const DEADLINE: Duration = Duration::from_secs(90);

fn submitted(producer: u64, sequence: u64) -> Record {
    Record::new(
        format!("c.{producer}"),
        Bytes::from(format!("{producer}:{sequence}")),
    )
}

/// Which append a stored record is, checked byte for byte.
fn identify(stored: &StoredRecord) -> (u64, u64) {
    let payload = std::str::from_utf8(&stored.payload).expect("payload is text");
    let (producer, sequence) = payload.split_once(':').expect("producer:sequence");
    let identity: (u64, u64) = (producer.parse().unwrap(), sequence.parse().unwrap());
    assert!(
        identity.0 < PRODUCERS && identity.1 < PER_PRODUCER,
        "{payload}"
    );
    common::assert_record(stored, &submitted(identity.0, identity.1), stored.offset);
    identity
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_producers_and_a_concurrent_reader() {
    let directory = tempfile::tempdir().unwrap();
    let config = natswal::StreamConfig {
        segment_bytes_max: 4 << 20,
        record_bytes_max: 64 * 1024,
        ..natswal::StreamConfig::default()
    };
    let stream =
        Arc::new(common::open(&common::os_file_system(), directory.path(), config).unwrap());
    let appending = Arc::new(AtomicBool::new(true));

    // The reader starts first and follows the log while it grows.
    let reader_stream = Arc::clone(&stream);
    let reader_appending = Arc::clone(&appending);
    let reader = tokio::spawn(async move {
        let mut reader = reader_stream.reader(StartPosition::Earliest, None).unwrap();
        let mut next_sequence = [0u64; PRODUCERS as usize];
        let mut read = 0u64;
        let mut read_while_appending = 0u64;
        let mut catch_ups = 0u64;
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while read < TOTAL {
            match reader.next().unwrap() {
                Some(stored) => {
                    assert_eq!(stored.offset, FIRST_OFFSET + read, "the reader sees no gap");
                    let (producer, sequence) = identify(&stored);
                    assert_eq!(
                        sequence, next_sequence[producer as usize],
                        "producer {producer}'s appends are in submission order"
                    );
                    next_sequence[producer as usize] += 1;
                    read += 1;
                    if reader_appending.load(Ordering::Acquire) {
                        read_while_appending += 1;
                    }
                }
                None => {
                    catch_ups += 1;
                    let now = tokio::time::Instant::now();
                    assert!(
                        now < deadline,
                        "reader stuck at offset {}",
                        FIRST_OFFSET + read
                    );
                    let _ = tokio::time::timeout(deadline - now, reader.wait()).await;
                }
            }
        }
        assert!(
            reader.next().unwrap().is_none(),
            "no record past the last append"
        );
        (read, read_while_appending, catch_ups)
    });

    let acknowledged = Arc::new(AtomicU64::new(0));
    let producers: Vec<_> = (0..PRODUCERS)
        .map(|producer| {
            let stream = Arc::clone(&stream);
            let acknowledged = Arc::clone(&acknowledged);
            tokio::spawn(async move {
                let window = Arc::new(Semaphore::new(IN_FLIGHT));
                let (sender, mut receiver) = mpsc::unbounded_channel::<Completed>();
                let drain_window = Arc::clone(&window);
                let drain = tokio::spawn(async move {
                    let mut offsets = Vec::with_capacity(PER_PRODUCER as usize);
                    while let Some(completed) = receiver.recv().await {
                        drain_window.add_permits(1);
                        assert_eq!(
                            completed.token,
                            offsets.len() as u64,
                            "completions arrive in submission order"
                        );
                        let outcome = completed.result.unwrap();
                        assert_eq!(outcome.count, 1);
                        offsets.push(outcome.first_offset);
                        acknowledged.fetch_add(1, Ordering::Relaxed);
                    }
                    offsets
                });
                for sequence in 0..PER_PRODUCER {
                    window.acquire().await.unwrap().forget();
                    let request = AppendRequest {
                        records: vec![submitted(producer, sequence)],
                        ..AppendRequest::default()
                    };
                    let completion = Completion::Channel {
                        sender: sender.clone(),
                        token: sequence,
                    };
                    stream.submit(request, completion).await.unwrap();
                }
                drop(sender);
                drain.await.unwrap()
            })
        })
        .collect();

    let mut all_offsets = Vec::with_capacity(TOTAL as usize);
    for producer in producers {
        let offsets = tokio::time::timeout(DEADLINE, producer)
            .await
            .expect("producers finish in time")
            .unwrap();
        assert_eq!(offsets.len() as u64, PER_PRODUCER);
        assert!(
            offsets.windows(2).all(|pair| pair[0] < pair[1]),
            "a producer's offsets grow with its submissions"
        );
        all_offsets.extend(offsets);
    }
    appending.store(false, Ordering::Release);
    assert_eq!(acknowledged.load(Ordering::Relaxed), TOTAL);
    all_offsets.sort_unstable();
    assert!(
        all_offsets
            .iter()
            .copied()
            .eq(FIRST_OFFSET..FIRST_OFFSET + TOTAL),
        "offsets are unique and dense {FIRST_OFFSET}..{}",
        FIRST_OFFSET + TOTAL
    );

    let (read, read_while_appending, catch_ups) = tokio::time::timeout(DEADLINE, reader)
        .await
        .expect("the reader finishes in time")
        .unwrap();
    assert_eq!(read, TOTAL);
    assert!(
        read_while_appending > 0 && catch_ups > 0,
        "the reader followed the appends: {read_while_appending} records read while appending, caught up {catch_ups} times"
    );
    let status = stream.status();
    assert_eq!(
        (status.records, status.next_offset),
        (TOTAL, FIRST_OFFSET + TOTAL)
    );
    assert!(
        status.segments > 2,
        "the log rotated while read: {status:?}"
    );
    stream.close().unwrap();
}
