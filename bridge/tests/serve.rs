//! `natswal serve` against a real nats-server: publish acks (including from
//! a JetStream client), deduplication across restarts, the replay protocol,
//! the HTTP endpoints and configuration errors.

mod support;

use bytes::Bytes;
use serde_json::json;
use std::time::Duration;
use support::*;

async fn request(
    client: &async_nats::Client,
    subject: &str,
    payload: &str,
    headers: Option<async_nats::HeaderMap>,
) -> serde_json::Value {
    let message = match headers {
        Some(headers) => {
            client
                .request_with_headers(
                    subject.to_string(),
                    headers,
                    Bytes::from(payload.to_string()),
                )
                .await
        }
        None => {
            client
                .request(subject.to_string(), Bytes::from(payload.to_string()))
                .await
        }
    }
    .expect("ack arrives");
    serde_json::from_slice(&message.payload).expect("ack is JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_client_gets_valid_pub_acks() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), EVENTS_STREAM);
    let client = connect(&nats.url()).await;
    let jetstream = async_nats::jetstream::new(client.clone());
    for expected in 0..5u64 {
        let ack = jetstream
            .publish("events.orders", Bytes::from(format!("order {expected}")))
            .await
            .expect("publish")
            .await
            .expect("a PubAck JetStream clients accept");
        assert_eq!(ack.stream, "events");
        assert_eq!(ack.sequence, expected + natswal::FIRST_OFFSET);
        assert!(!ack.duplicate);
    }
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "order-7");
    let first = jetstream
        .publish_with_headers(
            "events.orders",
            headers.clone(),
            Bytes::from_static(b"seven"),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let second = jetstream
        .publish_with_headers("events.orders", headers, Bytes::from_static(b"seven"))
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate, "second copy is reported as duplicate");
    assert_eq!(second.sequence, first.sequence);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_not_stored_also_after_a_restart() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let mut natswal = Natswal::start(&nats.url(), data.path(), EVENTS_STREAM);
    let client = connect(&nats.url()).await;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "abc");
    let first = request(&client, "events.a", "one", Some(headers.clone())).await;
    assert_eq!(first, json!({"stream": "events", "seq": 1}));
    request(&client, "events.a", "other", None).await;
    let again = request(&client, "events.a", "one", Some(headers.clone())).await;
    assert_eq!(
        again,
        json!({"stream": "events", "seq": 1, "duplicate": true})
    );
    natswal.restart();
    let after_restart = request(&client, "events.a", "one", Some(headers.clone())).await;
    assert_eq!(
        after_restart,
        json!({"stream": "events", "seq": 1, "duplicate": true})
    );
    let next = request(&client, "events.a", "two", None).await;
    assert_eq!(next["seq"], 3, "duplicates stored nothing: {next}");
    let records = replay_all(&client, "events", json!({})).await;
    assert_eq!(records.len(), 3);
    assert_eq!(
        records
            .iter()
            .filter(|record| record.payload == "one")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_window_memory_is_bounded_by_configuration() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let config = format!("{EVENTS_STREAM}duplicate_ids_max = 2\n");
    let _natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    for id in ["a", "b", "c"] {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", id);
        request(&client, "events.x", id, Some(headers)).await;
    }
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "a");
    let forgotten = request(&client, "events.x", "a", Some(headers)).await;
    assert!(
        forgotten.get("duplicate").is_none(),
        "the oldest id was forgotten: {forgotten}"
    );
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", "c");
    let remembered = request(&client, "events.x", "c", Some(headers)).await;
    assert_eq!(remembered["duplicate"], true);
}

async fn publish_fixture(client: &async_nats::Client) -> Vec<i64> {
    // 30 records: subjects events.<region>.<n> with region in {eu, us, ap}.
    let mut timestamps = Vec::new();
    for index in 0..30u64 {
        let region = ["eu", "us", "ap"][(index % 3) as usize];
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("X-Index", index.to_string().as_str());
        let ack = request(
            client,
            &format!("events.{region}.{index}"),
            &format!("payload-{index}"),
            Some(headers),
        )
        .await;
        assert_eq!(ack["seq"], index + natswal::FIRST_OFFSET);
        timestamps.push(0);
    }
    timestamps
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_start_kinds_filters_bounds_and_errors() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), EVENTS_STREAM);
    let client = connect(&nats.url()).await;
    publish_fixture(&client).await;
    let all = replay_all(&client, "events", json!({"batch": 7})).await;
    assert_eq!(all.len(), 30);
    for (index, record) in all.iter().enumerate() {
        assert_eq!(record.offset, index as u64 + natswal::FIRST_OFFSET);
        assert_eq!(record.payload, format!("payload-{index}"));
        assert_eq!(
            record.headers,
            vec![("X-Index".to_string(), index.to_string())]
        );
    }
    // Offset start and end bound (inclusive).
    let range = replay_all(
        &client,
        "events",
        json!({"start": {"offset": 10}, "end": {"offset": 14}}),
    )
    .await;
    assert_eq!(
        range.iter().map(|record| record.offset).collect::<Vec<_>>(),
        vec![10, 11, 12, 13, 14]
    );
    // Time start and end, from the stored timestamps.
    let time_start = all[20].timestamp_ns;
    let by_time = replay_all(
        &client,
        "events",
        json!({"start": {"time": time_start}, "end": {"time": all[22].timestamp_ns}}),
    )
    .await;
    assert_eq!(
        by_time
            .iter()
            .map(|record| record.offset)
            .collect::<Vec<_>>(),
        all[20..=22]
            .iter()
            .map(|record| record.offset)
            .collect::<Vec<_>>()
    );
    // RFC 3339 start far in the past gives everything.
    let rfc = replay_all(
        &client,
        "events",
        json!({"start": {"time": "2000-01-01T00:00:00Z"}}),
    )
    .await;
    assert_eq!(rfc.len(), 30);
    // Filters with * and >.
    let eu = replay_all(&client, "events", json!({"filter": "events.eu.*"})).await;
    assert_eq!(eu.len(), 10);
    assert!(eu
        .iter()
        .all(|record| record.subject.starts_with("events.eu.")));
    let tail = replay_all(
        &client,
        "events",
        json!({"filter": "events.>", "start": {"offset": 26}}),
    )
    .await;
    assert_eq!(tail.len(), 5);
    let none = replay_all(&client, "events", json!({"filter": "events.mars.>"})).await;
    assert!(none.is_empty());
    // Limit and batched mode.
    let limited = replay_once(&client, "events", json!({"limit": 4, "batch": 100})).await;
    assert_eq!(limited.records.len(), 4);
    assert_eq!(limited.status, 204);
    let batched = replay_all(&client, "events", json!({"mode": "batched", "batch": 9})).await;
    assert_eq!(batched, all);
    // Empty range: latest start on an idle stream, and an end before the start.
    let latest = replay_once(&client, "events", json!({"start": "latest"})).await;
    assert!(latest.records.is_empty());
    assert_eq!(latest.status, 404);
    assert_eq!(latest.next_offset, Some(31));
    let empty = replay_once(
        &client,
        "events",
        json!({"start": {"offset": 12}, "end": {"offset": 11}}),
    )
    .await;
    assert!(empty.records.is_empty());
    assert_eq!(empty.status, 204);
    assert_eq!(
        empty.next_offset,
        Some(12),
        "the reader stands at its start"
    );
    // Malformed requests get an error reply and the server keeps serving.
    for bad in [
        json!("not an object"),
        json!({"start": {"offset": "x"}}),
        json!({"filter": "a..b"}),
        json!({"batch": 0}),
        json!({"strat": 1}),
    ] {
        let response = replay_once(&client, "events", bad.clone()).await;
        assert_eq!(response.status, 400, "{bad}: {}", response.description);
        assert!(
            response.description.starts_with("Bad Request"),
            "{}",
            response.description
        );
    }
    let unknown = replay_once(&client, "nope", json!({})).await;
    assert_eq!(unknown.status, 410);
    let still = replay_all(&client, "events", json!({"start": {"offset": 30}})).await;
    assert_eq!(still.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_delivers_new_records_and_a_paused_reader_is_not_dropped() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), EVENTS_STREAM);
    let client = connect(&nats.url()).await;
    for index in 0..2000 {
        client
            .publish(format!("events.bulk.{index}"), Bytes::from(vec![b'x'; 512]))
            .await
            .unwrap();
    }
    request(&client, "events.bulk.last", "last", None).await;
    // Ask for 1500 records, then do not read for 3 seconds.
    let inbox = client.new_inbox();
    let mut subscription = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(
            "$NWAL.REPLAY.events",
            inbox,
            Bytes::from(json!({"batch": 1500}).to_string()),
        )
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut received = 0;
    let mut status = None;
    while status.is_none() {
        let message = tokio::time::timeout(
            Duration::from_secs(10),
            futures_util::StreamExt::next(&mut subscription),
        )
        .await
        .expect("messages are still there after the pause")
        .unwrap();
        match message
            .headers
            .as_ref()
            .and_then(|headers| headers.get("Nwal-Status"))
        {
            Some(value) => status = Some(value.as_str().to_string()),
            None => received += 1,
        }
    }
    assert_eq!(received, 1500, "exactly the requested batch, none dropped");
    assert_eq!(status.as_deref(), Some("100"));
    // Long poll: a request at the end waits for the next record.
    let waiting = {
        let client = client.clone();
        tokio::spawn(async move {
            replay_once(
                &client,
                "events",
                json!({"start": {"offset": 2002}, "wait_ms": 10000}),
            )
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    request(&client, "events.late", "late", None).await;
    let response = waiting.await.unwrap();
    assert_eq!(response.records.len(), 1);
    assert_eq!(response.records[0].payload, "late");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoints_and_status() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let natswal = Natswal::start(&nats.url(), data.path(), EVENTS_STREAM);
    let client = connect(&nats.url()).await;
    request(&client, "events.one", "1", None).await;
    let (code, body) = natswal.http_get("/healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, _) = natswal.http_get("/readyz");
    assert_eq!(code, 200);
    let (code, metrics) = natswal.http_get("/metrics");
    assert_eq!(code, 200);
    for needle in [
        "natswal_ingest_messages_total{stream=\"events\"} 1",
        "natswal_acks_total{stream=\"events\"} 1",
        "natswal_sync_latency_seconds_count{stream=\"events\"}",
        "natswal_batch_records_bucket{stream=\"events\",le=\"1\"}",
        "natswal_slow_consumer_events_total 0",
        "natswal_nats_connections 2",
        // The first append created the stream's first segment file.
        "natswal_segment_files_created_total{stream=\"events\"} 1",
        "natswal_segment_files_recycled_total{stream=\"events\"} 0",
        // The one acknowledged message's sync went through the group sync,
        // as a group of one.
        "natswal_group_syncs_total 1",
        "natswal_group_sync_requests_total 1",
    ] {
        assert!(metrics.contains(needle), "missing {needle} in\n{metrics}");
    }
    let status = client.request("$NWAL.STATUS", Bytes::new()).await.unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.payload).unwrap();
    assert_eq!(status["streams"][0]["name"], "events");
    assert_eq!(status["streams"][0]["next_offset"], 2);
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_natswal"))
        .args(["status", "--nats-url", &nats.url()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{text}");
    assert!(
        text.lines()
            .any(|line| line.starts_with("events") && line.contains(" ok")),
        "{text}"
    );
}

#[test]
fn bad_configuration_is_refused_with_the_key_named() {
    let data = tempfile::tempdir().unwrap();
    let cases = [
        ("[[streams]]\nname = \"a\"\nsubjects = [\"x.>\"]\nretention = 5\n", "retention"),
        ("[[streams]]\nname = \"a\"\nsubjects = [\"x.*\"]\n[[streams]]\nname = \"b\"\nsubjects = [\"x.y\"]\n", "streams[1].subjects"),
        ("[[streams]]\nname = \"a\"\nsubjects = [\"$NWAL.REPLAY.a\"]\n", "API subjects"),
        ("[[streams]]\nname = \"a\"\nsubjects = [\"x\"]\nsegment_bytes = \"2KiB\"\n", "streams[0].segment_bytes"),
    ];
    for (config, needle) in cases {
        let path = data.path().join("bad.toml");
        std::fs::write(&path, config).unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_natswal"))
            .args(["serve", "--check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{config} was accepted");
        assert!(
            stderr.contains(needle),
            "error for {config} should name {needle}: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_get_a_jetstream_error() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let config = format!("{EVENTS_STREAM}max_message_bytes = 1000\n");
    let _natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    let answer = request(&client, "events.big", &"x".repeat(2000), None).await;
    assert_eq!(answer["error"]["code"], 400);
    assert_eq!(answer["error"]["err_code"], 10054);
    let fine = request(&client, "events.small", "x", None).await;
    assert_eq!(fine, json!({"stream": "events", "seq": 1}));
}
