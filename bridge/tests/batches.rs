//! JetStream's batch protocols and publish preconditions against natswal:
//! real client libraries (jetstream-extra on async-nats 0.48), raw headers
//! and reply subjects for every error code, crashes during batches, and
//! racing optimistic-concurrency publishers.

mod support;

use bytes::Bytes;
use futures_util::StreamExt;
use natswal::FIRST_OFFSET;
use rand::Rng;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

const BATCH_STREAM: &str =
    "[[streams]]\nname = \"events\"\nsubjects = [\"events.>\"]\nallow_atomic = true\nallow_batched = true\n";
const PLAIN_STREAM: &str = "[[streams]]\nname = \"plain\"\nsubjects = [\"plain.>\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_extra_atomic_batches_get_correct_acks() {
    use jetstream_extra::batch_publish::BatchPublishExt;
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), BATCH_STREAM);
    let client = async_nats_048::connect(nats.url()).await.unwrap();
    let jetstream = async_nats_048::jetstream::new(client);
    let mut batch = jetstream.batch_publish().build();
    for index in 0..9 {
        batch
            .add("events.order", Bytes::from(format!("item {index}")))
            .await
            .unwrap();
    }
    let batch_id = batch.batch_id().to_string();
    let ack = batch
        .commit("events.order", Bytes::from_static(b"item 9"))
        .await
        .unwrap();
    assert_eq!(ack.stream, "events");
    assert_eq!(ack.batch_id, batch_id);
    assert_eq!(ack.batch_size, 10);
    assert_eq!(
        ack.sequence,
        FIRST_OFFSET + 9,
        "seq is the batch's last offset"
    );
    let mut second = jetstream.batch_publish().ack_every(2).build();
    for index in 0..4 {
        second
            .add("events.pay", Bytes::from(format!("pay {index}")))
            .await
            .unwrap();
    }
    let ack = second
        .commit("events.pay", Bytes::from_static(b"pay 4"))
        .await
        .unwrap();
    assert_eq!((ack.batch_size, ack.sequence), (5, FIRST_OFFSET + 14));
    let native = connect(&nats.url()).await;
    let records = replay_all(&native, "events", json!({})).await;
    assert_eq!(records.len(), 15);
    let first_batch: Vec<_> = records.iter().take(10).collect();
    assert!(first_batch.iter().all(|record| record
        .headers
        .contains(&("Nats-Batch-Id".to_string(), batch_id.clone()))));
    assert!(first_batch[9]
        .headers
        .contains(&("Nats-Batch-Commit".to_string(), "1".to_string())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_extra_fast_ingest_gets_flow_acks_and_a_final_ack() {
    use jetstream_extra::batch_publish_fast::FastPublishExt;
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), BATCH_STREAM);
    let client = async_nats_048::connect(nats.url()).await.unwrap();
    let jetstream = async_nats_048::jetstream::new(client);
    let mut publisher = jetstream.fast_publish().flow(100).build().unwrap();
    let mut highest_ack = 0;
    for index in 0..2000u64 {
        let ack = publisher
            .add("events.fast", Bytes::from(format!("fast {index}")))
            .await
            .unwrap();
        assert_eq!(ack.batch_sequence, index + 1);
        assert!(
            ack.ack_sequence >= highest_ack,
            "flow acks only move forward"
        );
        highest_ack = ack.ack_sequence;
    }
    assert!(
        highest_ack >= 1000,
        "flow acks arrived while publishing (last {highest_ack})"
    );
    let ack = publisher
        .commit("events.fast", Bytes::from_static(b"fast 2000"))
        .await
        .unwrap();
    assert_eq!(ack.batch_size, 2001);
    assert_eq!(ack.sequence, FIRST_OFFSET + 2000);
    // Commit without storing the last message (EOB).
    let mut closing = jetstream.fast_publish().build().unwrap();
    for index in 0..10 {
        closing
            .add("events.fast", Bytes::from(format!("eob {index}")))
            .await
            .unwrap();
    }
    let ack = closing.close().await.unwrap();
    assert_eq!(ack.batch_size, 10);
    assert_eq!(ack.sequence, FIRST_OFFSET + 2010);
    let native = connect(&nats.url()).await;
    let records = replay_all(&native, "events", json!({"mode": "batched"})).await;
    assert_eq!(records.len(), 2011);
    for (index, record) in records.iter().take(2001).enumerate() {
        assert_eq!(record.payload, format!("fast {index}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn atomic_batch_errors_have_jetstream_codes() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let config = format!(
        "[limits]\natomic_batches_max = 3\n{BATCH_STREAM}atomic_batch_max_messages = 3\natomic_batches_max = 2\nmax_message_bytes = \"1KiB\"\natomic_staging_bytes = \"3KiB\"\n{PLAIN_STREAM}allow_atomic = true\n[[streams]]\nname = \"off\"\nsubjects = [\"off.>\"]\n"
    );
    let _natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    let id = |name: &str| format!("batch-{name}");
    // Disabled on the stream.
    let reply = request_with_pairs(
        &client,
        "off.x",
        &[("Nats-Batch-Id", "b"), ("Nats-Batch-Sequence", "1")],
        "x",
    )
    .await;
    assert_eq!(err_code(&reply), 10174);
    // Invalid id, missing sequence, invalid commit.
    let long = "x".repeat(65);
    assert_eq!(
        err_code(
            &request_with_pairs(
                &client,
                "events.a",
                &[("Nats-Batch-Id", &long), ("Nats-Batch-Sequence", "1")],
                "x"
            )
            .await
        ),
        10179
    );
    assert_eq!(
        err_code(
            &request_with_pairs(&client, "events.a", &[("Nats-Batch-Id", &id("m"))], "x").await
        ),
        10175
    );
    let invalid = request_with_pairs(
        &client,
        "events.a",
        &[
            ("Nats-Batch-Id", &id("c")),
            ("Nats-Batch-Sequence", "1"),
            ("Nats-Batch-Commit", "yes"),
        ],
        "x",
    )
    .await;
    assert_eq!(err_code(&invalid), 10200);
    // Incomplete: unknown batch, gap, repeat, eob first.
    assert_eq!(
        err_code(
            &request_with_pairs(
                &client,
                "events.a",
                &[("Nats-Batch-Id", &id("u")), ("Nats-Batch-Sequence", "2")],
                "x"
            )
            .await
        ),
        10176
    );
    let started = request_with_pairs(
        &client,
        "events.a",
        &[("Nats-Batch-Id", &id("g")), ("Nats-Batch-Sequence", "1")],
        "x",
    )
    .await;
    assert_eq!(
        started,
        Value::Null,
        "the first message gets an empty reply"
    );
    assert_eq!(
        err_code(
            &request_with_pairs(
                &client,
                "events.a",
                &[("Nats-Batch-Id", &id("g")), ("Nats-Batch-Sequence", "3")],
                "x"
            )
            .await
        ),
        10176
    );
    assert_eq!(
        err_code(
            &request_with_pairs(
                &client,
                "events.a",
                &[("Nats-Batch-Id", &id("g")), ("Nats-Batch-Sequence", "2")],
                "x"
            )
            .await
        ),
        10176,
        "the gap abandoned the batch"
    );
    request_with_pairs(
        &client,
        "events.a",
        &[("Nats-Batch-Id", &id("r")), ("Nats-Batch-Sequence", "1")],
        "x",
    )
    .await;
    assert_eq!(
        err_code(
            &request_with_pairs(
                &client,
                "events.a",
                &[("Nats-Batch-Id", &id("r")), ("Nats-Batch-Sequence", "1")],
                "x"
            )
            .await
        ),
        10176
    );
    assert_eq!(
        err_code(
            &request_with_pairs(
                &client,
                "events.a",
                &[
                    ("Nats-Batch-Id", &id("e")),
                    ("Nats-Batch-Sequence", "1"),
                    ("Nats-Batch-Commit", "eob")
                ],
                "x"
            )
            .await
        ),
        10176
    );
    // Sequence 0 with `eob` on a new batch: refused, never an underflow
    // (a panic in debug builds would kill natswal's ingest).
    assert_eq!(
        err_code(
            &request_with_pairs(
                &client,
                "events.a",
                &[
                    ("Nats-Batch-Id", &id("z")),
                    ("Nats-Batch-Sequence", "0"),
                    ("Nats-Batch-Commit", "eob")
                ],
                "x"
            )
            .await
        ),
        10176
    );
    // Too large (max 3 messages), also for an unknown batch far along.
    for sequence in 1..=3 {
        request_with_pairs(
            &client,
            "events.a",
            &[
                ("Nats-Batch-Id", &id("l")),
                ("Nats-Batch-Sequence", &sequence.to_string()),
            ],
            "x",
        )
        .await;
    }
    let large = request_with_pairs(
        &client,
        "events.a",
        &[("Nats-Batch-Id", &id("l")), ("Nats-Batch-Sequence", "4")],
        "x",
    )
    .await;
    assert_eq!(err_code(&large), 10199);
    assert_eq!(
        err_code(
            &request_with_pairs(
                &client,
                "events.a",
                &[("Nats-Batch-Id", &id("z")), ("Nats-Batch-Sequence", "9")],
                "x"
            )
            .await
        ),
        10199
    );
    // Duplicate Nats-Msg-Id inside a batch.
    request_with_pairs(
        &client,
        "events.a",
        &[
            ("Nats-Batch-Id", &id("d")),
            ("Nats-Batch-Sequence", "1"),
            ("Nats-Msg-Id", "m1"),
        ],
        "x",
    )
    .await;
    let duplicate = request_with_pairs(
        &client,
        "events.a",
        &[
            ("Nats-Batch-Id", &id("d")),
            ("Nats-Batch-Sequence", "2"),
            ("Nats-Msg-Id", "m1"),
            ("Nats-Batch-Commit", "1"),
        ],
        "x",
    )
    .await;
    assert_eq!(err_code(&duplicate), 10201);
    // Unsupported header and required API level.
    let unsupported = request_with_pairs(
        &client,
        "events.a",
        &[
            ("Nats-Batch-Id", &id("h")),
            ("Nats-Batch-Sequence", "1"),
            ("Nats-Expected-Last-Msg-Id", "x"),
        ],
        "x",
    )
    .await;
    assert_eq!(err_code(&unsupported), 10177);
    let level = request_with_pairs(
        &client,
        "events.a",
        &[
            ("Nats-Batch-Id", &id("v")),
            ("Nats-Batch-Sequence", "1"),
            ("Nats-Required-Api-Level", "9"),
        ],
        "x",
    )
    .await;
    assert_eq!(err_code(&level), 10185);
    assert_eq!(level["error"]["code"], 412);
    // Too many open batches: per stream (2), then per server (3).
    request_with_pairs(
        &client,
        "events.a",
        &[("Nats-Batch-Id", &id("o1")), ("Nats-Batch-Sequence", "1")],
        "x",
    )
    .await;
    request_with_pairs(
        &client,
        "events.a",
        &[("Nats-Batch-Id", &id("o2")), ("Nats-Batch-Sequence", "1")],
        "x",
    )
    .await;
    let per_stream = request_with_pairs(
        &client,
        "events.a",
        &[("Nats-Batch-Id", &id("o3")), ("Nats-Batch-Sequence", "1")],
        "x",
    )
    .await;
    assert_eq!(
        (err_code(&per_stream), per_stream["error"]["code"].as_u64()),
        (10210, Some(429))
    );
    request_with_pairs(
        &client,
        "plain.a",
        &[("Nats-Batch-Id", &id("p1")), ("Nats-Batch-Sequence", "1")],
        "x",
    )
    .await;
    let per_server = request_with_pairs(
        &client,
        "plain.a",
        &[("Nats-Batch-Id", &id("p2")), ("Nats-Batch-Sequence", "1")],
        "x",
    )
    .await;
    assert_eq!(err_code(&per_server), 10210);
    // Finishing o1 frees a slot; it commits with eob: 1 message counted.
    let done = request_with_pairs(
        &client,
        "events.a",
        &[
            ("Nats-Batch-Id", &id("o1")),
            ("Nats-Batch-Sequence", "2"),
            ("Nats-Batch-Commit", "eob"),
        ],
        "",
    )
    .await;
    assert_eq!(done["count"], 1);
    assert_eq!(done["batch"], id("o1"));
    let before = replay_all(&client, "events", json!({})).await.len();
    // The staging budget (3 KiB for all open batches of the stream).
    let kilobyte = "k".repeat(900);
    request_with_pairs(
        &client,
        "events.a",
        &[("Nats-Batch-Id", &id("big")), ("Nats-Batch-Sequence", "1")],
        &kilobyte,
    )
    .await;
    let over = request_with_pairs(
        &client,
        "events.a",
        &[("Nats-Batch-Id", &id("big")), ("Nats-Batch-Sequence", "2")],
        &kilobyte,
    )
    .await;
    assert!(over.get("error").is_none(), "{over}");
    let third = request_with_pairs(
        &client,
        "events.a",
        &[
            ("Nats-Batch-Id", &id("big")),
            ("Nats-Batch-Sequence", "3"),
            ("Nats-Batch-Commit", "1"),
        ],
        &kilobyte,
    )
    .await;
    assert_eq!(err_code(&third), 10199);
    assert!(
        third["error"]["description"]
            .as_str()
            .unwrap()
            .contains("budget"),
        "{third}"
    );
    // A failed precondition fails the whole batch at commit.
    request_with_pairs(
        &client,
        "events.a",
        &[
            ("Nats-Batch-Id", &id("pre")),
            ("Nats-Batch-Sequence", "1"),
            ("Nats-Expected-Last-Sequence", "999"),
        ],
        "x",
    )
    .await;
    let failed = request_with_pairs(
        &client,
        "events.a",
        &[
            ("Nats-Batch-Id", &id("pre")),
            ("Nats-Batch-Sequence", "2"),
            ("Nats-Batch-Commit", "1"),
        ],
        "x",
    )
    .await;
    assert_eq!(err_code(&failed), 10071);
    let after = replay_all(&client, "events", json!({})).await;
    assert_eq!(
        after.len(),
        before,
        "no failed or abandoned batch stored anything"
    );
    assert_eq!(
        after
            .last()
            .unwrap()
            .headers
            .iter()
            .find(|(name, _)| name == "Nats-Batch-Commit")
            .map(|(_, value)| value.as_str()),
        Some("1"),
        "eob stores the last message with commit 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_batches_time_out_with_an_advisory() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let config = format!("{BATCH_STREAM}batch_timeout = \"1s\"\n");
    let _natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    let mut advisories = client
        .subscribe("$NWAL.ADVISORY.BATCH_ABANDONED.events")
        .await
        .unwrap();
    client.flush().await.unwrap();
    request_with_pairs(
        &client,
        "events.a",
        &[("Nats-Batch-Id", "slow"), ("Nats-Batch-Sequence", "1")],
        "x",
    )
    .await;
    let advisory = tokio::time::timeout(Duration::from_secs(10), advisories.next())
        .await
        .expect("an advisory within 10 s")
        .unwrap();
    let advisory: Value = serde_json::from_slice(&advisory.payload).unwrap();
    assert_eq!(advisory["batch"], "slow");
    assert_eq!(advisory["reason"], "timeout");
    assert_eq!(
        advisory["type"],
        "io.nats.jetstream.advisory.v1.stream_batch_abandoned"
    );
    let late = request_with_pairs(
        &client,
        "events.a",
        &[
            ("Nats-Batch-Id", "slow"),
            ("Nats-Batch-Sequence", "2"),
            ("Nats-Batch-Commit", "1"),
        ],
        "x",
    )
    .await;
    assert_eq!(err_code(&late), 10176);
    assert!(replay_all(&client, "events", json!({})).await.is_empty());
}

/// Sends fast-ingest messages by hand and collects the control channel.
struct FastChannel {
    client: async_nats::Client,
    inbox: String,
    messages: async_nats::Subscriber,
}

impl FastChannel {
    async fn open(client: &async_nats::Client, id: &str) -> FastChannel {
        let inbox = format!("_INBOX.{id}");
        let messages = client.subscribe(format!("{inbox}.>")).await.unwrap();
        client.flush().await.unwrap();
        FastChannel {
            client: client.clone(),
            inbox,
            messages,
        }
    }

    async fn send(
        &self,
        subject: &str,
        flow: u16,
        gap: &str,
        sequence: u64,
        operation: u8,
        payload: &str,
    ) {
        let reply = format!("{}.{flow}.{gap}.{sequence}.{operation}.$FI", self.inbox);
        self.client
            .publish_with_reply(subject.to_string(), reply, Bytes::from(payload.to_string()))
            .await
            .unwrap();
    }

    /// Like [`FastChannel::send`], with headers.
    #[allow(clippy::too_many_arguments)]
    async fn send_with_headers(
        &self,
        subject: &str,
        gap: &str,
        sequence: u64,
        operation: u8,
        pairs: &[(&str, &str)],
        payload: &str,
    ) {
        let reply = format!("{}.10.{gap}.{sequence}.{operation}.$FI", self.inbox);
        self.client
            .publish_with_reply_and_headers(
                subject.to_string(),
                reply,
                header_map(pairs),
                Bytes::from(payload.to_string()),
            )
            .await
            .unwrap();
    }

    /// Control messages up to and including the batch's final reply (the
    /// PubAck or an error), which is returned.
    async fn final_reply(&mut self) -> Value {
        loop {
            let reply = self.next().await;
            if reply.get("batch").is_some() || reply.get("error").is_some() {
                return reply;
            }
        }
    }

    async fn next(&mut self) -> Value {
        let message = tokio::time::timeout(Duration::from_secs(10), self.messages.next())
            .await
            .expect("a control message within 10 s")
            .unwrap();
        serde_json::from_slice(&message.payload).expect("JSON control message")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_ingest_errors_and_gaps() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let config = format!("{BATCH_STREAM}fast_batches_max = 2\n{PLAIN_STREAM}");
    let _natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    let mut off = FastChannel::open(&client, "off").await;
    off.send("plain.a", 10, "ok", 1, 0, "x").await;
    assert_eq!(err_code(&off.next().await), 10205);
    let mut bad = FastChannel::open(&client, "bad").await;
    bad.send("events.a", 10, "maybe", 1, 0, "x").await;
    assert_eq!(err_code(&bad.next().await), 10206);
    let long = "l".repeat(65);
    let mut long_id = FastChannel::open(&client, &long).await;
    long_id.send("events.a", 10, "ok", 1, 0, "x").await;
    assert_eq!(err_code(&long_id.next().await), 10207);
    let mut unknown = FastChannel::open(&client, "unknown").await;
    unknown.send("events.a", 10, "ok", 2, 1, "x").await;
    assert_eq!(err_code(&unknown.next().await), 10208);
    // Gap in `ok` mode: reported, the batch goes on.
    let mut ok = FastChannel::open(&client, "gapok").await;
    ok.send("events.ok", 2, "ok", 1, 0, "1").await;
    assert_eq!(ok.next().await, json!({"type": "ack", "seq": 0, "msgs": 2}));
    ok.send("events.ok", 2, "ok", 3, 1, "3").await;
    assert_eq!(
        ok.next().await,
        json!({"type": "gap", "last_seq": 2, "seq": 3})
    );
    ok.send("events.ok", 2, "ok", 4, 2, "4").await;
    let mut replies = vec![ok.next().await, ok.next().await];
    replies.sort_by_key(|reply| reply.get("type").is_none());
    assert_eq!(
        replies[0]["type"], "ack",
        "a flow ack after 2 durable messages: {replies:?}"
    );
    assert_eq!(replies[1]["count"], 4);
    assert_eq!(replies[1]["batch"], "gapok");
    // A second open batch fills the stream's limit of 2; a third is refused.
    let mut first = FastChannel::open(&client, "one").await;
    first.send("events.f", 10, "fail", 1, 0, "a").await;
    assert_eq!(first.next().await["type"], "ack");
    let mut second = FastChannel::open(&client, "two").await;
    second.send("events.f", 10, "ok", 1, 0, "b").await;
    second.next().await;
    let mut third = FastChannel::open(&client, "three").await;
    third.send("events.f", 10, "ok", 1, 0, "c").await;
    let refused = third.next().await;
    assert_eq!(
        (err_code(&refused), refused["error"]["code"].as_u64()),
        (10211, Some(429))
    );
    // Gap in `fail` mode: reported, and the batch ends with what came before.
    first.send("events.f", 10, "fail", 3, 1, "c").await;
    assert_eq!(
        first.next().await,
        json!({"type": "gap", "last_seq": 2, "seq": 3})
    );
    let end = first.next().await;
    assert_eq!(
        (end["count"].as_u64(), end["batch"].as_str()),
        (Some(1), Some("one"))
    );
    let stored: Vec<String> = replay_all(&client, "events", json!({}))
        .await
        .iter()
        .map(|record| String::from_utf8_lossy(&record.payload).to_string())
        .collect();
    assert_eq!(stored, vec!["1", "3", "4", "a", "b"]);
}

/// The duplicate window follows what fast ingest stored: a stored id is a
/// duplicate for plain publishes (with its offset), and an id whose message
/// failed is forgotten, so a retried batch stores it instead of getting a
/// PubAck for data that is not on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_ingest_message_ids_follow_what_was_stored() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), BATCH_STREAM);
    let client = connect(&nats.url()).await;
    let mut stored = FastChannel::open(&client, "stored").await;
    stored
        .send_with_headers("events.a", "fail", 1, 0, &[("Nats-Msg-Id", "m1")], "1")
        .await;
    stored
        .send_with_headers("events.a", "fail", 2, 2, &[("Nats-Msg-Id", "m2")], "2")
        .await;
    let committed = stored.final_reply().await;
    assert_eq!(
        (committed["count"].as_u64(), committed["seq"].as_u64()),
        (Some(2), Some(FIRST_OFFSET + 1)),
        "{committed}"
    );
    let again = request_with_pairs(&client, "events.a", &[("Nats-Msg-Id", "m1")], "1").await;
    assert_eq!(
        (again["seq"].as_u64(), again["duplicate"].as_bool()),
        (Some(FIRST_OFFSET), Some(true)),
        "a fast-ingest id is a duplicate at its offset: {again}"
    );
    // The first try fails in the engine (a wrong expected sequence).
    let mut failed = FastChannel::open(&client, "retry1").await;
    failed
        .send_with_headers(
            "events.a",
            "fail",
            1,
            2,
            &[
                ("Nats-Msg-Id", "p1"),
                ("Nats-Expected-Last-Sequence", "999"),
            ],
            "p",
        )
        .await;
    let refused = failed.final_reply().await;
    assert_ne!(refused["count"].as_u64(), Some(1), "{refused}");
    let mut retried = FastChannel::open(&client, "retry2").await;
    retried
        .send_with_headers("events.a", "fail", 1, 2, &[("Nats-Msg-Id", "p1")], "p")
        .await;
    let retry = retried.final_reply().await;
    assert_eq!(
        (retry["count"].as_u64(), retry["seq"].as_u64()),
        (Some(1), Some(FIRST_OFFSET + 2)),
        "the retry is stored, at the next offset: {retry}"
    );
    let payloads: Vec<String> = replay_all(&client, "events", json!({}))
        .await
        .iter()
        .map(|record| String::from_utf8_lossy(&record.payload).to_string())
        .collect();
    assert_eq!(payloads, vec!["1", "2", "p"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preconditions_are_never_ignored() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), BATCH_STREAM);
    let client = connect(&nats.url()).await;
    let first = request_with_pairs(
        &client,
        "events.a",
        &[("Nats-Expected-Last-Sequence", "0"), ("Nats-Msg-Id", "one")],
        "1",
    )
    .await;
    assert_eq!(first["seq"], FIRST_OFFSET, "0 means the stream is empty");
    let wrong = request_with_pairs(
        &client,
        "events.a",
        &[("Nats-Expected-Last-Sequence", "0")],
        "x",
    )
    .await;
    assert_eq!(err_code(&wrong), 10071);
    assert_eq!(
        wrong["error"]["description"],
        format!("wrong last sequence: {FIRST_OFFSET}")
    );
    let by_id = request_with_pairs(
        &client,
        "events.a",
        &[("Nats-Expected-Last-Msg-Id", "one")],
        "2",
    )
    .await;
    assert_eq!(by_id["seq"], FIRST_OFFSET + 1);
    let stale_id = request_with_pairs(
        &client,
        "events.a",
        &[("Nats-Expected-Last-Msg-Id", "one")],
        "x",
    )
    .await;
    assert_eq!(err_code(&stale_id), 10070);
    let stream = request_with_pairs(
        &client,
        "events.a",
        &[("Nats-Expected-Stream", "orders")],
        "x",
    )
    .await;
    assert_eq!(err_code(&stream), 10060);
    let right_stream = request_with_pairs(
        &client,
        "events.a",
        &[("Nats-Expected-Stream", "events")],
        "3",
    )
    .await;
    assert_eq!(right_stream["seq"], FIRST_OFFSET + 2);
    let subject_sequence = request_with_pairs(
        &client,
        "events.a",
        &[("Nats-Expected-Last-Subject-Sequence", "1")],
        "x",
    )
    .await;
    assert_eq!(subject_sequence["error"]["code"], 400);
    assert!(
        subject_sequence["error"]["description"]
            .as_str()
            .unwrap()
            .contains("Nats-Expected-Last-Subject-Sequence"),
        "{subject_sequence}"
    );
    let level = request_with_pairs(
        &client,
        "events.a",
        &[("Nats-Required-Api-Level", "5")],
        "x",
    )
    .await;
    assert_eq!(err_code(&level), 10185);
    assert_eq!(
        replay_all(&client, "events", json!({})).await.len(),
        3,
        "only the three that passed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_publishers_race_on_expected_last_sequence() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    // Durability does not change who wins; `none` keeps 10 000 rounds quick.
    let config = format!("{BATCH_STREAM}durability = \"none\"\n");
    let _natswal = Natswal::start(&nats.url(), data.path(), &config);
    let publishers = [connect(&nats.url()).await, connect(&nats.url()).await];
    for round in 0..10_000u64 {
        let last = FIRST_OFFSET - 1 + round;
        let expected = last.to_string();
        let pairs = [("Nats-Expected-Last-Sequence", expected.as_str())];
        let (first, second) = tokio::join!(
            request_with_pairs(&publishers[0], "events.race", &pairs, "p0"),
            request_with_pairs(&publishers[1], "events.race", &pairs, "p1"),
        );
        let winners: Vec<u64> = [&first, &second]
            .iter()
            .filter_map(|reply| reply["seq"].as_u64())
            .collect();
        assert_eq!(
            winners,
            vec![last + 1],
            "round {round}: exactly one wins ({first}, {second})"
        );
        let loser = if first.get("seq").is_some() {
            &second
        } else {
            &first
        };
        assert_eq!(err_code(loser), 10071, "round {round}");
    }
    let records = replay_all(
        &client_of(&publishers),
        "events",
        json!({"mode": "batched", "batch": 20000}),
    )
    .await;
    assert_eq!(records.len(), 10_000);
    for (index, record) in records.iter().enumerate() {
        assert_eq!(
            record.offset,
            FIRST_OFFSET + index as u64,
            "no gap, no duplicate"
        );
    }
}

fn client_of(publishers: &[async_nats::Client; 2]) -> async_nats::Client {
    publishers[0].clone()
}

/// Batch id -> (size, commit sent, acknowledged last offset).
type Ledger = BTreeMap<String, (u64, bool, Option<u64>)>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_atomic_batches_keeps_acked_batches_whole() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let config = format!("{BATCH_STREAM}segment_bytes = \"1MiB\"\nmax_message_bytes = \"64KiB\"\n");
    let mut natswal = Natswal::start(&nats.url(), data.path(), &config);
    let stop = Arc::new(AtomicBool::new(false));
    let acked_batches = Arc::new(AtomicU64::new(0));
    let ledger: Arc<Mutex<Ledger>> = Arc::new(Mutex::new(BTreeMap::new()));
    let mut tasks = Vec::new();
    for publisher in 0..4 {
        let client = connect(&nats.url()).await;
        let stop = Arc::clone(&stop);
        let acked_batches = Arc::clone(&acked_batches);
        let ledger = Arc::clone(&ledger);
        tasks.push(tokio::spawn(async move {
            let mut number = 0;
            while !stop.load(Ordering::Relaxed) {
                number += 1;
                let id = format!("p{publisher}-b{number}");
                let size = rand::rng().random_range(1..=20u64);
                ledger
                    .lock()
                    .unwrap()
                    .insert(id.clone(), (size, false, None));
                for sequence in 1..=size {
                    let sequence_text = sequence.to_string();
                    let mut pairs = vec![
                        ("Nats-Batch-Id", id.as_str()),
                        ("Nats-Batch-Sequence", sequence_text.as_str()),
                    ];
                    if sequence == size {
                        pairs.push(("Nats-Batch-Commit", "1"));
                        ledger.lock().unwrap().get_mut(&id).unwrap().1 = true;
                    }
                    let payload = format!("{id}:{sequence}");
                    let answer = tokio::time::timeout(
                        Duration::from_secs(2),
                        client.request_with_headers(
                            "events.batch",
                            header_map(&pairs),
                            Bytes::from(payload),
                        ),
                    )
                    .await;
                    let Ok(Ok(answer)) = answer else { return };
                    if sequence == size {
                        let Ok(ack) = serde_json::from_slice::<Value>(&answer.payload) else {
                            return;
                        };
                        if let Some(seq) = ack["seq"].as_u64() {
                            assert_eq!(ack["count"], size);
                            assert_eq!(ack["batch"], id.as_str());
                            ledger.lock().unwrap().get_mut(&id).unwrap().2 = Some(seq);
                            acked_batches.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }
    let kill_after = rand::rng().random_range(100..400u64);
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked_batches.load(Ordering::Relaxed) < kill_after {
        assert!(Instant::now() < deadline, "batches stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    natswal.kill();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.unwrap();
    }
    natswal.restart();
    let client = connect(&nats.url()).await;
    let records = replay_all(
        &client,
        "events",
        json!({"mode": "batched", "batch": 20000}),
    )
    .await;
    let ledger = ledger.lock().unwrap().clone();
    // Group the stored records by batch.
    let mut stored: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    for record in &records {
        let text = String::from_utf8_lossy(&record.payload).to_string();
        let (id, sequence) = text.split_once(':').expect("payload id:sequence");
        stored
            .entry(id.to_string())
            .or_default()
            .push((record.offset, sequence.parse().unwrap()));
    }
    for (id, entries) in &stored {
        let (size, commit_sent, _) = ledger
            .get(id)
            .unwrap_or_else(|| panic!("{id} was never published"));
        assert!(
            commit_sent,
            "batch {id} is stored although its commit was never sent"
        );
        assert_eq!(entries.len() as u64, *size, "batch {id} is stored whole");
        for (position, (offset, sequence)) in entries.iter().enumerate() {
            assert_eq!(*sequence, position as u64 + 1, "batch {id} in order");
            assert_eq!(
                *offset,
                entries[0].0 + position as u64,
                "batch {id} in one piece"
            );
        }
    }
    let mut acked = 0;
    for (id, (size, _, acked_offset)) in &ledger {
        if let Some(last) = acked_offset {
            acked += 1;
            let entries = stored
                .get(id)
                .unwrap_or_else(|| panic!("acknowledged batch {id} is missing"));
            assert_eq!(
                entries.last().unwrap().0,
                *last,
                "batch {id} ends at its acked seq"
            );
            assert_eq!(entries.len() as u64, *size);
        }
    }
    eprintln!(
        "killed after {kill_after} acked batches; {acked} acked, {} stored",
        stored.len()
    );
    assert!(acked as u64 >= kill_after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_fast_ingest_keeps_everything_flow_acked() {
    use jetstream_extra::batch_publish_fast::FastPublishExt;
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let mut natswal = Natswal::start(&nats.url(), data.path(), BATCH_STREAM);
    let acknowledged: Arc<Mutex<HashMap<String, u64>>> = Arc::new(Mutex::new(HashMap::new()));
    let total = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for publisher in 0..3 {
        let client = async_nats_048::connect(nats.url()).await.unwrap();
        let acknowledged = Arc::clone(&acknowledged);
        let total = Arc::clone(&total);
        tasks.push(tokio::spawn(async move {
            let jetstream = async_nats_048::jetstream::new(client);
            let mut fast = jetstream
                .fast_publish()
                .flow(50)
                .ack_timeout(Duration::from_secs(2))
                .build()
                .unwrap();
            let id = format!("fast-{publisher}");
            for sequence in 1..=1_000_000u64 {
                let mut headers = async_nats_048::HeaderMap::new();
                headers.insert("X-Batch", id.as_str());
                headers.insert("X-Seq", sequence.to_string().as_str());
                let message = async_nats_048::jetstream::message::OutboundMessage {
                    subject: "events.fast".into(),
                    payload: Bytes::from(format!("{id}:{sequence}")),
                    headers: Some(headers),
                };
                match fast.add_message(message).await {
                    Ok(ack) => {
                        acknowledged
                            .lock()
                            .unwrap()
                            .insert(id.clone(), ack.ack_sequence);
                        total.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    let kill_after = rand::rng().random_range(20_000..60_000u64);
    let deadline = Instant::now() + Duration::from_secs(120);
    while total.load(Ordering::Relaxed) < kill_after {
        assert!(Instant::now() < deadline, "fast ingest stalled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    natswal.kill();
    for task in tasks {
        task.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    natswal.restart();
    let client = connect(&nats.url()).await;
    let records = replay_all(
        &client,
        "events",
        json!({"mode": "batched", "batch": 50000}),
    )
    .await;
    let mut highest: HashMap<String, Vec<u64>> = HashMap::new();
    for record in &records {
        let text = String::from_utf8_lossy(&record.payload).to_string();
        let (id, sequence) = text.split_once(':').unwrap();
        highest
            .entry(id.to_string())
            .or_default()
            .push(sequence.parse().unwrap());
    }
    for (id, acked) in &acknowledged {
        let sequences = highest.get(id).cloned().unwrap_or_default();
        // Everything up to the last flow-acked sequence is there, in order.
        for expected in 1..=*acked {
            assert_eq!(
                sequences.get(expected as usize - 1),
                Some(&expected),
                "batch {id}: message {expected} of {acked} flow-acked"
            );
        }
    }
    eprintln!(
        "killed after {kill_after} messages; flow-acked {acknowledged:?}; stored {}",
        records.len()
    );
    assert!(
        acknowledged.values().any(|acked| *acked > 0),
        "some flow acks arrived before the kill"
    );
}
