//! Appends, reads, reopen and rotation on real files.

mod common;

use common::*;
use natswal::{Durability, StartPosition, SubjectPattern, FIRST_OFFSET};

#[tokio::test]
async fn append_read_reopen_across_segments() {
    let directory = tempfile::tempdir().unwrap();
    let file_system = os_file_system();
    let expected: Vec<_> = (0..3000).map(record).collect();
    {
        let stream = open(&file_system, directory.path(), small_config()).unwrap();
        for (index, record) in expected.iter().enumerate() {
            let outcome = stream.append(record.clone()).await.unwrap();
            assert_eq!(outcome.first_offset, FIRST_OFFSET + index as u64);
        }
        assert!(
            stream.status().segments > 3,
            "small segments rotate: {:?}",
            stream.status()
        );
        assert_prefix(&read_all(&stream).unwrap(), &expected);
        stream.close().unwrap();
    }
    let stream = open(&file_system, directory.path(), small_config()).unwrap();
    let stored = read_all(&stream).unwrap();
    assert_eq!(stored.len(), expected.len());
    assert_prefix(&stored, &expected);
    // Appends continue at the next offset after a reopen.
    let outcome = stream.append(record(3000)).await.unwrap();
    assert_eq!(outcome.first_offset, FIRST_OFFSET + 3000);
}

#[tokio::test]
async fn readers_seek_by_offset_time_and_filter() {
    let directory = tempfile::tempdir().unwrap();
    let file_system = os_file_system();
    let config = natswal::StreamConfig {
        durability: Durability::None,
        ..small_config()
    };
    let stream = open(&file_system, directory.path(), config).unwrap();
    for index in 0..2000u64 {
        let mut record = record(index);
        record.timestamp_ns = 1_000_000 + index as i64 * 10;
        stream.append(record).await.unwrap();
    }
    let mut reader = stream
        .reader(StartPosition::Offset(FIRST_OFFSET + 1234), None)
        .unwrap();
    assert_eq!(reader.next().unwrap().unwrap().offset, FIRST_OFFSET + 1234);
    let mut reader = stream
        .reader(StartPosition::Time(1_000_000 + 777 * 10), None)
        .unwrap();
    assert_eq!(reader.next().unwrap().unwrap().offset, FIRST_OFFSET + 777);
    let mut reader = stream
        .reader(StartPosition::Time(1_000_000 + 777 * 10 - 5), None)
        .unwrap();
    assert_eq!(reader.next().unwrap().unwrap().offset, FIRST_OFFSET + 777);
    let filter = SubjectPattern::parse("orders.1.*").unwrap();
    let mut reader = stream
        .reader(StartPosition::Offset(FIRST_OFFSET + 100), Some(filter))
        .unwrap();
    let mut count = 0;
    while let Some(record) = reader.next().unwrap() {
        // Record `index` has offset FIRST_OFFSET + index and subject
        // orders.{index % 3}.{index}.
        assert!(record.offset >= FIRST_OFFSET + 100);
        assert_eq!((record.offset - FIRST_OFFSET) % 3, 1);
        count += 1;
    }
    assert_eq!(count, (100..2000).filter(|index| index % 3 == 1).count());
    let mut reader = stream.reader(StartPosition::Latest, None).unwrap();
    assert!(reader.next().unwrap().is_none());
    stream.append(record(5)).await.unwrap();
    assert_eq!(reader.next().unwrap().unwrap().offset, FIRST_OFFSET + 2000);
}
