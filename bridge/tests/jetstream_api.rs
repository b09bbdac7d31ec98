//! natswal's JetStream API read by JetStream clients natswal's authors did
//! not write: async-nats's `jetstream` module and nats-py's `js` manager,
//! against a real nats-server; and the start-up check that keeps natswal's
//! API off an account where a real JetStream already answers.

mod support;

use async_nats::jetstream;
use serde_json::Value;
use std::time::Duration;
use support::{connect, NatsServer, Natswal};

/// A nats-server with a leafnode port, and natswal's `[jetstream]` table
/// pointing at it (consumer deliveries go through the leafnode).
fn leaf_server() -> (NatsServer, String) {
    let port = support::free_port();
    let nats = NatsServer::start_with_config(Some(format!(
        "leafnodes {{ listen: \"127.0.0.1:{port}\" }}\n"
    )));
    let table = format!("[jetstream]\nleafnode_url = \"nats://127.0.0.1:{port}\"\n{ORDERS}");
    (nats, table)
}

const ORDERS: &str = "[[streams]]\nname = \"orders\"\nsubjects = [\"orders.>\"]\nmax_age = \"1h\"\n[[streams]]\nname = \"audit\"\nsubjects = [\"audit.*\"]\n";

/// Where `fill_orders` stores the record of stream sequence `sequence`.
fn order_subject(sequence: u64) -> &'static str {
    if sequence % 2 == 1 {
        "orders.a"
    } else {
        "orders.b"
    }
}

/// Stores `count` messages on `orders.a` / `orders.b` (odd / even), each
/// with an `X-Index` header, through JetStream publishes with acks.
async fn fill_orders(client: &async_nats::Client, count: u64) {
    let context = jetstream::new(client.clone());
    for index in 1..=count {
        let subject = order_subject(index);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("X-Index", index.to_string().as_str());
        let ack = context
            .publish_with_headers(subject, headers, format!("order-{index}").into())
            .await
            .expect("published")
            .await
            .expect("acked");
        assert_eq!(ack.sequence, index);
    }
}

/// Every name a JetStream names listing yields.
async fn all_names<E: std::fmt::Debug>(
    names: impl futures_util::Stream<Item = Result<String, E>>,
) -> Vec<String> {
    use futures_util::StreamExt;
    let mut names = std::pin::pin!(names);
    let mut listed = Vec::new();
    while let Some(name) = names.next().await {
        listed.push(name.expect("name"));
    }
    listed
}

/// A raw request: the reply's headers (status line included) and body.
async fn raw(client: &async_nats::Client, subject: &str, body: &str) -> (String, Value) {
    raw_with_headers(client, subject, async_nats::HeaderMap::new(), body).await
}

async fn raw_with_headers(
    client: &async_nats::Client,
    subject: &str,
    headers: async_nats::HeaderMap,
    body: &str,
) -> (String, Value) {
    let reply = tokio::time::timeout(
        Duration::from_secs(10),
        client.request_with_headers(subject.to_string(), headers, body.to_string().into()),
    )
    .await
    .expect("answered in time")
    .expect("answered");
    let status = reply
        .status
        .map(|status| {
            format!(
                "{} {}",
                status.as_u16(),
                reply.description.unwrap_or_default()
            )
        })
        .unwrap_or_default();
    let json = serde_json::from_slice(&reply.payload).unwrap_or(Value::Null);
    (status, json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_nats_reads_stream_info_and_messages() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), ORDERS);
    let client = connect(&nats.url()).await;
    fill_orders(&client, 10).await;
    let context = jetstream::new(client.clone());

    let account = context.query_account().await.expect("account info");
    assert_eq!(account.streams, 2);
    assert!(account.storage > 0, "{account:?}");

    let mut stream = context.get_stream("orders").await.expect("stream");
    let info = stream.info().await.expect("info").clone();
    assert_eq!(info.config.name, "orders");
    assert_eq!(info.config.subjects, vec!["orders.>".to_string()]);
    assert_eq!(info.config.max_age, Duration::from_secs(3600));
    assert_eq!(info.state.messages, 10);
    assert_eq!(info.state.first_sequence, 1);
    assert_eq!(info.state.last_sequence, 10);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let age = now - info.state.last_timestamp.unix_timestamp();
    assert!(age.abs() < 60, "last message {age} s ago");
    let empty = context.get_stream("audit").await.expect("audit");
    let empty_state = &empty.cached_info().state;
    assert_eq!(
        (
            empty_state.messages,
            empty_state.first_sequence,
            empty_state.last_sequence
        ),
        (0, 0, 0)
    );

    let raw_message = stream.get_raw_message(4).await.expect("message 4");
    assert_eq!(raw_message.subject.as_str(), "orders.b");
    assert_eq!(raw_message.sequence, 4);
    assert_eq!(&raw_message.payload[..], b"order-4");
    assert_eq!(
        raw_message.headers.get("X-Index").map(|v| v.as_str()),
        Some("4")
    );

    let direct = stream.direct_get(7).await.expect("direct 7");
    assert_eq!(direct.subject.as_str(), "orders.a");
    assert_eq!(direct.sequence, 7);
    assert_eq!(&direct.payload[..], b"order-7");
    assert_eq!(direct.headers.get("X-Index").map(|v| v.as_str()), Some("7"));
    let next = stream
        .direct_get_next_for_subject("orders.b", Some(5))
        .await
        .expect("next orders.b from 5");
    assert_eq!(next.sequence, 6);
    let missing = stream.direct_get(99).await.expect_err("no message 99");
    assert_eq!(
        missing.kind(),
        jetstream::stream::DirectGetErrorKind::NotFound
    );
    let last = stream.direct_get_last_for_subject("orders.a").await;
    assert!(last.is_err(), "last_by_subj needs an index natswal lacks");

    let mut listed = all_names(context.stream_names()).await;
    listed.sort();
    assert_eq!(listed, vec!["audit".to_string(), "orders".to_string()]);

    let not_found = context
        .get_stream("nothing")
        .await
        .expect_err("no such stream");
    assert!(
        not_found.to_string().contains("stream not found"),
        "{not_found}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configuration_changes_are_refused_with_jetstream_codes() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), ORDERS);
    let client = connect(&nats.url()).await;
    fill_orders(&client, 3).await;
    let context = jetstream::new(client.clone());

    // Declaring the stream as it is succeeds (applications that create
    // their streams at start keep working); anything else is refused.
    let same = context
        .get_or_create_stream(jetstream::stream::Config {
            name: "orders".to_string(),
            subjects: vec!["orders.>".to_string()],
            max_age: Duration::from_secs(3600),
            ..Default::default()
        })
        .await
        .expect("the same configuration");
    assert_eq!(same.cached_info().state.messages, 3);
    let (_, other) = raw(
        &client,
        "$JS.API.STREAM.CREATE.orders",
        r#"{"name":"orders","subjects":["orders.*"],"storage":"memory"}"#,
    )
    .await;
    assert_eq!(
        other["type"],
        "io.nats.jetstream.api.v1.stream_create_response"
    );
    assert_eq!(other["error"]["err_code"], 10058, "{other}");
    let description = other["error"]["description"].as_str().unwrap();
    assert!(
        description.contains("subjects") && description.contains("storage"),
        "{description}"
    );
    let (_, created) = raw(
        &client,
        "$JS.API.STREAM.CREATE.fresh",
        r#"{"name":"fresh"}"#,
    )
    .await;
    assert_eq!(created["error"]["err_code"], 10049, "{created}");
    assert!(created["error"]["description"]
        .as_str()
        .unwrap()
        .contains("[[streams]]"));
    for (subject, code) in [
        ("$JS.API.STREAM.DELETE.orders", 10050),
        ("$JS.API.STREAM.PURGE.orders", 10110),
        ("$JS.API.STREAM.MSG.DELETE.orders", 10057),
        ("$JS.API.STREAM.INFO.nothing", 10059),
        ("$JS.API.CONSUMER.INFO.orders.c1", 10014),
        ("$JS.API.CONSUMER.DELETE.orders.c1", 10014),
    ] {
        let (_, response) = raw(&client, subject, "{}").await;
        assert_eq!(response["error"]["err_code"], code, "{subject}: {response}");
        // JetStream's shape: the type and the error, nothing else.
        assert_eq!(
            response.as_object().unwrap().len(),
            2,
            "{subject}: {response}"
        );
    }
    let deleted = context.delete_stream("orders").await;
    assert!(deleted.is_err(), "deleting is refused");
    assert_eq!(
        context
            .get_stream("orders")
            .await
            .unwrap()
            .cached_info()
            .state
            .messages,
        3
    );

    // Success carries no "error" key; a bad request names its fault.
    let (_, info) = raw(&client, "$JS.API.STREAM.INFO.orders", "").await;
    assert!(info.get("error").is_none(), "{info}");
    assert_eq!(info["state"]["messages"], 3);
    let (_, malformed) = raw(&client, "$JS.API.STREAM.MSG.GET.orders", "{seq:").await;
    assert_eq!(malformed["error"]["err_code"], 10025, "{malformed}");

    // An API level natswal does not have: 412, as from an older server.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Required-Api-Level", "99");
    let (_, level) =
        raw_with_headers(&client, "$JS.API.STREAM.INFO.orders", headers.clone(), "").await;
    assert_eq!(level["error"]["err_code"], 10185, "{level}");
    let (status, _) = raw_with_headers(
        &client,
        "$JS.API.DIRECT.GET.orders",
        headers,
        r#"{"seq":1}"#,
    )
    .await;
    assert!(status.starts_with("412"), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_rules_apply_to_jetstream_reads() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let rules = "[[access]]\nname = \"a-reader\"\nreply_prefixes = [\"_INBOX.reader-a.\"]\nreplay = [\"orders.a\"]\nstatus = true\n";
    let _natswal = Natswal::start(&nats.url(), data.path(), &format!("{ORDERS}{rules}"));
    let client = connect(&nats.url()).await;
    fill_orders(&client, 4).await;
    let ask = |sequence: u64| {
        let client = client.clone();
        async move {
            let inbox = format!("_INBOX.reader-a.{sequence}");
            let mut answers = client.subscribe(inbox.clone()).await.unwrap();
            client.flush().await.unwrap();
            client
                .publish_with_reply(
                    "$JS.API.STREAM.MSG.GET.orders",
                    inbox,
                    format!(r#"{{"seq":{sequence}}}"#).into(),
                )
                .await
                .unwrap();
            let answer = tokio::time::timeout(
                Duration::from_secs(10),
                futures_util::StreamExt::next(&mut answers),
            )
            .await
            .expect("answered")
            .expect("message");
            serde_json::from_slice::<Value>(&answer.payload).unwrap()
        }
    };
    let allowed = ask(1).await;
    assert_eq!(allowed["message"]["subject"], "orders.a", "{allowed}");
    let denied = ask(2).await;
    assert_eq!(denied["error"]["code"], 403, "{denied}");
    assert!(denied.get("message").is_none());
    // Outside every rule's reply prefixes: refused.
    let (_, stranger) = raw(&client, "$JS.API.STREAM.MSG.GET.orders", r#"{"seq":1}"#).await;
    assert_eq!(stranger["error"]["code"], 403, "{stranger}");
    for subject in [
        "$JS.API.STREAM.INFO.orders",
        "$JS.API.CONSUMER.NAMES.orders",
        "$JS.API.CONSUMER.LIST.orders",
        "$JS.API.CONSUMER.CREATE.orders",
    ] {
        let (_, refused) = raw(&client, subject, "").await;
        assert_eq!(refused["error"]["code"], 403, "{subject}: {refused}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_py_reads_stream_info_and_messages() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), ORDERS);
    let client = connect(&nats.url()).await;
    fill_orders(&client, 6).await;
    let script = r#"
import asyncio, json, sys
import nats
from nats.js.errors import NotFoundError, APIError
async def main(url):
    nc = await nats.connect(url)
    js = nc.jetstream()
    info = await js.stream_info("orders")
    got = await js.get_msg("orders", 3)
    direct = await js.get_msg("orders", 4, direct=True)
    names = await js.streams_info()
    found = await js.find_stream_name_by_subject("orders.x")
    account = await js.account_info()
    try:
        await js.get_msg("orders", 60)
        missing = "found"
    except NotFoundError:
        missing = "not found"
    try:
        await js.get_last_msg("orders", "orders.a")
        last = "served"
    except APIError as error:
        last = "refused: %s" % error.description
    print(json.dumps({
        "messages": info.state.messages, "first": info.state.first_seq, "last": info.state.last_seq,
        "subjects": info.config.subjects, "storage": getattr(info.config.storage, "value", info.config.storage),
        "got": [got.subject, got.seq, got.data.decode(), got.headers["X-Index"]],
        "direct": [direct.subject, direct.seq, direct.data.decode(), direct.headers["X-Index"]],
        "names": sorted(s.config.name for s in names), "found": found,
        "account_streams": account.streams, "missing": missing, "last_msg": last}))
    await nc.close()
asyncio.run(main(sys.argv[1]))
"#;
    let result = support::run_nats_py(script, &nats.url()).await;
    assert_eq!(result["messages"], 6);
    assert_eq!(
        (result["first"].clone(), result["last"].clone()),
        (1.into(), 6.into())
    );
    assert_eq!(result["subjects"], serde_json::json!(["orders.>"]));
    assert_eq!(result["storage"], "file");
    assert_eq!(
        result["got"],
        serde_json::json!(["orders.a", 3, "order-3", "3"])
    );
    assert_eq!(
        result["direct"],
        serde_json::json!(["orders.b", 4, "order-4", "4"])
    );
    assert_eq!(result["names"], serde_json::json!(["audit", "orders"]));
    assert_eq!(result["found"], "orders");
    assert_eq!(result["account_streams"], 2);
    assert_eq!(result["missing"], "not found");
    let last = result["last_msg"].as_str().unwrap();
    assert!(
        last.starts_with("refused") && last.contains("per-subject index"),
        "{last}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_jetstream_keeps_natswals_api_off_unless_it_has_a_domain() {
    let store = tempfile::tempdir().unwrap();
    let nats = NatsServer::start_with_config(Some(format!(
        "jetstream {{ store_dir: \"{}\" }}\n",
        store.path().display()
    )));
    let client = connect(&nats.url()).await;
    let context = jetstream::new(client.clone());
    context
        .create_stream(jetstream::stream::Config {
            name: "theirs".to_string(),
            subjects: vec!["theirs.>".to_string()],
            ..Default::default()
        })
        .await
        .expect("a stream of the real JetStream");

    let data = tempfile::tempdir().unwrap();
    let mut natswal = Natswal::start(&nats.url(), data.path(), ORDERS);
    let said = natswal.output_until("not serving the JetStream API", Duration::from_secs(10));
    assert!(said.contains("not serving the JetStream API"), "{said}");
    // The real JetStream alone answers: it knows no stream "orders".
    let names = all_names(context.stream_names()).await;
    assert_eq!(names, vec!["theirs".to_string()]);
    drop(natswal);

    let data = tempfile::tempdir().unwrap();
    let config = format!("[jetstream]\ndomain = \"nwal\"\n{ORDERS}");
    let _natswal = Natswal::start(&nats.url(), data.path(), &config);
    fill_orders(&client, 2).await;
    let ours = jetstream::with_domain(client.clone(), "nwal");
    let stream = ours.get_stream("orders").await.expect("natswal's domain");
    assert_eq!(stream.cached_info().state.messages, 2);
    assert_eq!(
        context
            .get_stream("theirs")
            .await
            .unwrap()
            .cached_info()
            .config
            .name,
        "theirs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_nats_pull_consumers_fetch_ack_and_redeliver() {
    use futures_util::StreamExt;
    let (nats, config) = leaf_server();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    fill_orders(&client, 20).await;
    let context = jetstream::new(client.clone());
    let stream = context.get_stream("orders").await.unwrap();

    // Every record once, in order, with its stored subject beside the inbox.
    let all: jetstream::consumer::PullConsumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("all".to_string()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .expect("durable pull consumer");
    let mut sequences = Vec::new();
    let mut batch = all.fetch().max_messages(15).messages().await.unwrap();
    while let Some(message) = batch.next().await {
        let message = message.expect("delivery");
        let info = message.info().expect("ack metadata");
        sequences.push(info.stream_sequence);
        assert_eq!(info.consumer_sequence, sequences.len() as u64);
        let expected = order_subject(info.stream_sequence);
        assert_eq!(message.subject.as_str(), expected);
        let index = message
            .headers
            .as_ref()
            .and_then(|h| h.get("X-Index"))
            .map(|v| v.to_string());
        assert_eq!(index, Some(info.stream_sequence.to_string()));
        assert_eq!(
            message.payload,
            format!("order-{}", info.stream_sequence).as_bytes()
        );
        message.ack().await.expect("ack");
    }
    assert_eq!(sequences, (1..=15).collect::<Vec<u64>>());
    // no_wait past the end: the 5 left, then "no messages".
    let mut rest = all
        .batch()
        .max_messages(10)
        .expires(Duration::from_millis(500))
        .messages()
        .await
        .unwrap();
    let mut left = Vec::new();
    while let Some(message) = rest.next().await {
        let message = message.expect("delivery");
        left.push(message.info().unwrap().stream_sequence);
        message.double_ack().await.expect("double ack");
    }
    assert_eq!(left, (16..=20).collect::<Vec<u64>>());
    let mut info = all.clone();
    let info = info.info().await.unwrap();
    assert_eq!(info.num_ack_pending, 0, "{info:?}");
    assert_eq!(info.num_pending, 0, "{info:?}");
    assert_eq!(info.ack_floor.stream_sequence, 20);
    assert_eq!(info.delivered.consumer_sequence, 20);

    // A filtered consumer with a short ack_wait: an unacked delivery comes
    // back, counted as a second delivery.
    let filtered: jetstream::consumer::PullConsumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("b-only".to_string()),
            filter_subject: "orders.b".to_string(),
            ack_wait: Duration::from_millis(500),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut first = filtered.fetch().max_messages(2).messages().await.unwrap();
    let mut taken = Vec::new();
    while let Some(message) = first.next().await {
        let message = message.unwrap();
        taken.push(message.info().unwrap().stream_sequence);
        if taken.len() == 2 {
            message.ack().await.unwrap();
        }
    }
    assert_eq!(taken, vec![2, 4]);
    // Record 2 comes back once its ack_wait has passed; what comes before
    // it is new (6, 8, ...) and acked.
    let mut again = filtered
        .batch()
        .max_messages(20)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .unwrap();
    let redelivered = loop {
        let message = again
            .next()
            .await
            .expect("a redelivery within 5 s")
            .unwrap();
        if message.info().unwrap().stream_sequence == 2 {
            break message;
        }
        assert_eq!(message.info().unwrap().delivered, 1);
        message.ack().await.unwrap();
    };
    let redelivered_info = redelivered.info().unwrap();
    assert_eq!(redelivered_info.delivered, 2);
    redelivered.ack().await.unwrap();

    // An ordered consumer (ephemeral pull, ack none) streams it all.
    let ordered = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = ordered.messages().await.unwrap();
    for expected in 1..=20u64 {
        let message = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("in time")
            .expect("message")
            .expect("delivery");
        assert_eq!(message.info().unwrap().stream_sequence, expected);
    }

    let listed = all_names(stream.consumer_names()).await;
    assert!(
        listed.contains(&"all".to_string()) && listed.contains(&"b-only".to_string()),
        "{listed:?}"
    );
    // The same name with another filter is refused, not silently the old.
    let (_, clash) = raw(
        &client,
        "$JS.API.CONSUMER.CREATE.orders.b-only",
        r#"{"stream_name":"orders","config":{"durable_name":"b-only","filter_subject":"orders.a"},"action":"create"}"#,
    )
    .await;
    assert_eq!(clash["error"]["err_code"], 10148, "{clash}");
    assert!(clash["error"]["description"]
        .as_str()
        .unwrap()
        .contains("filter_subject"));
    // An update of its limits is applied; of what it delivers, refused.
    let (_, updated) = raw(
        &client,
        "$JS.API.CONSUMER.CREATE.orders.b-only",
        r#"{"stream_name":"orders","config":{"durable_name":"b-only","filter_subject":"orders.b","ack_wait":7000000000,"max_deliver":4},"action":"update"}"#,
    )
    .await;
    assert_eq!(updated["config"]["ack_wait"], 7_000_000_000u64, "{updated}");
    assert_eq!(updated["config"]["max_deliver"], 4, "{updated}");
    let (_, info) = raw(&client, "$JS.API.CONSUMER.INFO.orders.b-only", "").await;
    assert_eq!(info["config"]["max_deliver"], 4, "{info}");
    let (_, refused) = raw(
        &client,
        "$JS.API.CONSUMER.CREATE.orders.b-only",
        r#"{"stream_name":"orders","config":{"durable_name":"b-only","filter_subject":"orders.a"},"action":"update"}"#,
    )
    .await;
    assert_eq!(refused["error"]["err_code"], 10012, "{refused}");
    let description = refused["error"]["description"].as_str().unwrap();
    // The one field it cannot change, not the limits that differ too.
    assert!(
        description.starts_with("natswal cannot change a consumer's filter_subject ("),
        "{description}"
    );
    let (_, update) = raw(
        &client,
        "$JS.API.CONSUMER.CREATE.orders.nobody",
        r#"{"stream_name":"orders","config":{"durable_name":"nobody"},"action":"update"}"#,
    )
    .await;
    assert_eq!(update["error"]["err_code"], 10149, "{update}");
    stream.delete_consumer("b-only").await.expect("deleted");
    let gone = stream
        .get_consumer::<jetstream::consumer::pull::Config>("b-only")
        .await;
    assert!(gone.is_err());
    // A new consumer from the end has nothing pending; from the start, all.
    for (policy, pending) in [
        (jetstream::consumer::DeliverPolicy::New, 0),
        (jetstream::consumer::DeliverPolicy::All, 20),
    ] {
        let mut fresh: jetstream::consumer::PullConsumer = stream
            .create_consumer(jetstream::consumer::pull::Config {
                deliver_policy: policy,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(
            fresh.info().await.unwrap().num_pending,
            pending,
            "{policy:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_py_pull_subscribe_fetches() {
    let (nats, config) = leaf_server();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    fill_orders(&client, 12).await;
    let script = r#"
import asyncio, json, sys
import nats
async def main(url):
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.pull_subscribe("orders.>", "py-durable", stream="orders")
    got = []
    for _ in range(3):
        for m in await sub.fetch(4, timeout=5):
            got.append([m.metadata.sequence.stream, m.subject, m.data.decode()])
            await m.ack()
    try:
        await sub.fetch(1, timeout=1)
        more = "more"
    except nats.errors.TimeoutError:
        more = "none"
    info = await js.consumer_info("orders", "py-durable")
    print(json.dumps({"got": got, "more": more, "pending": info.num_ack_pending, "floor": info.ack_floor.stream_seq}))
    await nc.close()
asyncio.run(main(sys.argv[1]))
"#;
    let result = support::run_nats_py(script, &nats.url()).await;
    let got = result["got"].as_array().unwrap();
    assert_eq!(got.len(), 12);
    for (index, entry) in got.iter().enumerate() {
        let sequence = index as u64 + 1;
        let subject = order_subject(sequence);
        assert_eq!(
            entry,
            &serde_json::json!([sequence, subject, format!("order-{sequence}")])
        );
    }
    assert_eq!(result["more"], "none");
    assert_eq!(result["pending"], 0);
    assert_eq!(result["floor"], 12);
}

/// CPU seconds (user and system) natswal has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_name = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime: fields 14 and 15 of stat, 12 and 13 after the name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_consumers_cost_no_cpu() {
    use futures_util::StreamExt;
    let (nats, config) = leaf_server();
    let data = tempfile::tempdir().unwrap();
    let natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    fill_orders(&client, 3).await;
    let stream = jetstream::new(client.clone())
        .get_stream("orders")
        .await
        .unwrap();
    // An unacked delivery whose ack_wait passes while no request waits
    // for its redelivery.
    let unacked: jetstream::consumer::PullConsumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("unacked".to_string()),
            ack_wait: Duration::from_millis(100),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut batch = unacked.fetch().max_messages(1).messages().await.unwrap();
    let first = batch.next().await.expect("a delivery").unwrap();
    assert_eq!(first.info().unwrap().stream_sequence, 1);
    drop(batch);
    // An ephemeral consumer whose long poll outlasts its inactive threshold.
    let polling: jetstream::consumer::PullConsumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            filter_subject: "orders.none".to_string(),
            inactive_threshold: Duration::from_millis(200),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut long_poll = polling
        .batch()
        .max_messages(1)
        .expires(Duration::from_secs(3))
        .messages()
        .await
        .unwrap();
    // A push consumer caught up with its subscriber (a heartbeat each
    // 500 ms), and one whose subscriber left with a delivery unacked (its
    // ack_wait passes with no one to deliver it to again).
    let listener = connect(&nats.url()).await;
    let mut heard = listener.subscribe("idle.heard").await.unwrap();
    let mut left = listener.subscribe("idle.left").await.unwrap();
    listener.flush().await.unwrap();
    for (name, config) in [
        (
            "heard",
            r#""deliver_subject":"idle.heard","ack_policy":"none","idle_heartbeat":500000000"#,
        ),
        (
            "left",
            r#""deliver_subject":"idle.left","ack_policy":"explicit","ack_wait":100000000"#,
        ),
    ] {
        let (_, created) = raw(
            &client,
            &format!("$JS.API.CONSUMER.DURABLE.CREATE.orders.{name}"),
            &format!(r#"{{"stream_name":"orders","config":{{"durable_name":"{name}",{config}}}}}"#),
        )
        .await;
        assert_eq!(created["name"], name, "{created}");
    }
    for _ in 0..3 {
        assert!(next_message(&mut heard).await.status.is_none());
    }
    assert!(next_message(&mut left).await.status.is_none());
    drop(left);
    listener.flush().await.unwrap();
    await_info(&client, "left", "interest gone", |info| {
        info.get("push_bound").is_none()
    })
    .await;
    let before = cpu_seconds(natswal.pid());
    let started = std::time::Instant::now();
    assert!(
        long_poll.next().await.is_none(),
        "nothing matches orders.none"
    );
    let heartbeat = next_message(&mut heard).await;
    assert_eq!(heartbeat.status.map(|status| status.as_u16()), Some(100));
    let idle = started.elapsed().as_secs_f64();
    let used = cpu_seconds(natswal.pid()) - before;
    // A task that wakes itself in a loop burns a whole core meanwhile.
    assert!(idle > 1.0, "the long poll ended after {idle} s");
    assert!(
        used < 0.3 * idle,
        "natswal used {used} s of CPU in {idle} s idle"
    );
    // The redelivery still comes when asked for.
    let mut again = unacked.fetch().max_messages(1).messages().await.unwrap();
    let redelivered = again.next().await.expect("the redelivery").unwrap();
    assert_eq!(redelivered.info().unwrap().stream_sequence, 1);
    assert!(redelivered.info().unwrap().delivered >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_consumer_resumes_after_sigkill_with_its_unacked_redelivered() {
    use futures_util::StreamExt;
    let (nats, config) = leaf_server();
    let data = tempfile::tempdir().unwrap();
    let mut natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    fill_orders(&client, 20).await;
    let context = jetstream::new(client.clone());
    let stream = context.get_stream("orders").await.unwrap();
    let durable: jetstream::consumer::PullConsumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            durable_name: Some("resumes".to_string()),
            ..Default::default()
        })
        .await
        .unwrap();
    // 10 delivered; the first 5 acked (double acks: answered once the ack
    // is on disk), the other 5 left pending.
    let mut batch = durable.fetch().max_messages(10).messages().await.unwrap();
    let mut delivered = Vec::new();
    while let Some(message) = batch.next().await {
        let message = message.unwrap();
        let sequence = message.info().unwrap().stream_sequence;
        delivered.push(sequence);
        if sequence <= 5 {
            message.double_ack().await.expect("the ack is durable");
        }
    }
    assert_eq!(delivered, (1..=10).collect::<Vec<u64>>());

    natswal.kill();
    natswal.restart();

    // The unacked five come again first, then the rest; nothing acked does.
    let mut after = Vec::new();
    let mut batch = durable
        .batch()
        .max_messages(15)
        .expires(Duration::from_secs(5))
        .messages()
        .await
        .unwrap();
    while let Some(message) = batch.next().await {
        let message = message.unwrap();
        let info = message.info().unwrap();
        after.push(info.stream_sequence);
        message.ack().await.unwrap();
        if after.len() == 15 {
            break;
        }
    }
    assert_eq!(after, (6..=20).collect::<Vec<u64>>());
    let mut info_handle = durable.clone();
    let info = info_handle.info().await.unwrap().clone();
    assert_eq!(info.config.durable_name.as_deref(), Some("resumes"));

    // A damaged file is reported by path, and natswal starts without it.
    natswal.terminate();
    let file = data.path().join("consumers/orders/resumes.consumer");
    let mut bytes = std::fs::read(&file).expect("the consumer's file");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    natswal.restart();
    let said = natswal.output_until("resumes.consumer", Duration::from_secs(10));
    assert!(
        said.contains("resumes.consumer") && said.contains("checksum"),
        "{said}"
    );
    let gone = stream
        .get_consumer::<jetstream::consumer::pull::Config>("resumes")
        .await;
    assert!(gone.is_err(), "a damaged consumer is not served half-read");
}

/// Stores `count` records of `size` bytes on `orders.big`, publishing them
/// all before awaiting the acks.
async fn fill_large(client: &async_nats::Client, count: u64, size: usize) {
    let context = jetstream::new(client.clone());
    let mut acks = Vec::new();
    for index in 0..count {
        let mut payload = vec![b'x'; size];
        payload[..8].copy_from_slice(&index.to_be_bytes());
        acks.push(
            context
                .publish("orders.big", payload.into())
                .await
                .expect("published"),
        );
    }
    for ack in acks {
        ack.await.expect("acked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_nats_ordered_push_consumer_streams_through_flow_control_and_follows_the_tail() {
    let (nats, config) = leaf_server();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    fill_orders(&client, 20).await;
    // 8 MiB: past the first flow control window (2 MiB) several times, so
    // delivery stalls for good unless the client's answers open it.
    fill_large(&client, 512, 16 * 1024).await;
    let context = jetstream::new(client.clone());
    let stream = context.get_stream("orders").await.unwrap();
    let ordered = stream
        .create_consumer(jetstream::consumer::push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            ..Default::default()
        })
        .await
        .expect("ordered push consumer");
    let name = ordered.cached_info().name.clone();
    let mut messages = ordered.messages().await.unwrap();
    for expected in 1..=20u64 {
        let message = next_ordered(&mut messages, expected, &name).await;
        let subject = order_subject(expected);
        assert_eq!(message.subject.as_str(), subject);
        assert_eq!(message.payload, format!("order-{expected}").as_bytes());
        assert_eq!(
            message
                .headers
                .as_ref()
                .unwrap()
                .get("X-Index")
                .unwrap()
                .as_str(),
            expected.to_string()
        );
    }
    for index in 0..512u64 {
        let message = next_ordered(&mut messages, 21 + index, &name).await;
        assert_eq!(message.subject.as_str(), "orders.big");
        assert_eq!(message.payload.len(), 16 * 1024);
        assert_eq!(message.payload[..8], index.to_be_bytes());
    }
    // Records stored after the consumer caught up follow at once.
    fill_orders_from(&client, 533, 5).await;
    for expected in 533..538u64 {
        next_ordered(&mut messages, expected, &name).await;
    }
}

/// The next record of an ordered consumer: stream sequence `expected`,
/// from the consumer `name` with that consumer sequence (the client
/// recreates its consumer silently on a gap: this shows it never did).
async fn next_ordered(
    messages: &mut jetstream::consumer::push::Ordered,
    expected: u64,
    name: &str,
) -> jetstream::Message {
    use futures_util::StreamExt;
    let message = tokio::time::timeout(Duration::from_secs(20), messages.next())
        .await
        .unwrap_or_else(|_| panic!("record {expected} in time"))
        .expect("message")
        .expect("delivery");
    let info = message.info().unwrap();
    assert_eq!(info.stream_sequence, expected);
    assert_eq!(info.consumer_sequence, expected);
    assert_eq!(info.consumer, name);
    message
}

async fn next_message(subscriber: &mut async_nats::Subscriber) -> async_nats::Message {
    use futures_util::StreamExt;
    tokio::time::timeout(Duration::from_secs(10), subscriber.next())
        .await
        .expect("in time")
        .expect("open")
}

/// Stores `count` records on `orders.tail` from stream sequence `first`.
async fn fill_orders_from(client: &async_nats::Client, first: u64, count: u64) {
    let context = jetstream::new(client.clone());
    for sequence in first..first + count {
        let ack = context
            .publish("orders.tail", format!("tail-{sequence}").into())
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(ack.sequence, sequence);
    }
}

/// Waits (up to 10 s) until the info of consumer `name` of `orders`
/// shows `condition`, which `what` describes; returns that info.
async fn await_info(
    client: &async_nats::Client,
    name: &str,
    what: &str,
    condition: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, info) = raw(client, &format!("$JS.API.CONSUMER.INFO.orders.{name}"), "").await;
        if condition(&info) {
            return info;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {info}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CONSUMER.INFO's delivered consumer sequence, or the error code.
async fn delivered(client: &async_nats::Client, name: &str) -> Result<u64, i64> {
    let (_, info) = raw(client, &format!("$JS.API.CONSUMER.INFO.orders.{name}"), "").await;
    match info["delivered"]["consumer_seq"].as_u64() {
        Some(sequence) => Ok(sequence),
        None => Err(info["error"]["err_code"].as_i64().unwrap_or(-1)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_consumers_deliver_only_while_someone_listens() {
    let (nats, config) = leaf_server();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    fill_orders(&client, 10).await;
    // A durable push consumer whose deliver subject nobody listens to yet.
    let (_, created) = raw(
        &client,
        "$JS.API.CONSUMER.DURABLE.CREATE.orders.late",
        r#"{"stream_name":"orders","config":{"durable_name":"late","deliver_subject":"late.inbox","ack_policy":"explicit","idle_heartbeat":200000000}}"#,
    )
    .await;
    assert_eq!(
        created["config"]["deliver_subject"], "late.inbox",
        "{created}"
    );
    assert!(created["config"].get("max_waiting").is_none(), "{created}");
    // An ephemeral one nobody ever listens to is collected.
    let (_, ephemeral) = raw(
        &client,
        "$JS.API.CONSUMER.CREATE.orders.unheard",
        r#"{"stream_name":"orders","config":{"name":"unheard","deliver_subject":"unheard.inbox","inactive_threshold":300000000}}"#,
    )
    .await;
    assert_eq!(ephemeral["name"], "unheard", "{ephemeral}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while delivered(&client, "unheard").await != Err(10014) {
        assert!(std::time::Instant::now() < deadline, "never collected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The collection took longer than a heartbeat interval of "late":
    // without interest it delivered nothing.
    assert_eq!(delivered(&client, "late").await, Ok(0));

    let listener = connect(&nats.url()).await;
    let mut inbox = listener.subscribe("late.inbox").await.unwrap();
    for expected in 1..=10u64 {
        let message = next_message(&mut inbox).await;
        let reply = message.reply.clone().expect("ack subject").to_string();
        let tokens: Vec<&str> = reply.split('.').collect();
        assert_eq!(&tokens[..4], ["$JS", "ACK", "orders", "late"], "{reply}");
        assert_eq!(tokens[5], expected.to_string(), "{reply}");
        assert_eq!(tokens[6], expected.to_string(), "{reply}");
        let subject = order_subject(expected);
        assert_eq!(message.subject.as_str(), subject);
        listener.publish(reply, "+ACK".into()).await.unwrap();
    }
    // Then a heartbeat: the last delivery and nothing stalled.
    let heartbeat = next_message(&mut inbox).await;
    assert_eq!(heartbeat.status.map(|status| status.as_u16()), Some(100));
    let headers = heartbeat.headers.expect("heartbeat headers");
    assert_eq!(headers.get("Nats-Last-Consumer").unwrap().as_str(), "10");
    assert_eq!(headers.get("Nats-Last-Stream").unwrap().as_str(), "10");
    assert!(headers.get("Nats-Consumer-Stalled").is_none());
    listener.flush().await.unwrap();
    await_info(&client, "late", "acks applied", |info| {
        info["ack_floor"]["stream_seq"] == 10 && info["num_ack_pending"] == 0
    })
    .await;

    // Unsubscribed, it holds back what comes next; resubscribed, it goes on.
    let (_, bound) = raw(&client, "$JS.API.CONSUMER.INFO.orders.late", "").await;
    assert_eq!(bound["push_bound"], true, "{bound}");
    drop(inbox);
    listener.flush().await.unwrap();
    await_info(&client, "late", "interest gone", |info| {
        info.get("push_bound").is_none()
    })
    .await;
    fill_orders_from(&client, 11, 3).await;
    // Given the time to deliver (two heartbeat intervals), it did not.
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(delivered(&client, "late").await, Ok(10));
    let mut inbox = listener.subscribe("late.inbox").await.unwrap();
    let mut sequences = Vec::new();
    while sequences.len() < 3 {
        let message = next_message(&mut inbox).await;
        if message.status.is_none() {
            sequences.push(message.payload.clone());
        }
    }
    assert_eq!(sequences, ["tail-11", "tail-12", "tail-13"]);

    // A pull request to a push consumer is refused by name.
    let (status, _) = raw(&client, "$JS.API.CONSUMER.MSG.NEXT.orders.late", "").await;
    assert_eq!(status, "409 Consumer is push based");
    // Flow control without heartbeats is JetStream's error.
    let (_, refused) = raw(
        &client,
        "$JS.API.CONSUMER.CREATE.orders",
        r#"{"stream_name":"orders","config":{"deliver_subject":"x.inbox","flow_control":true}}"#,
    )
    .await;
    assert_eq!(refused["error"]["err_code"], 10108, "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_py_ordered_consumer_reads_the_stream() {
    let (nats, config) = leaf_server();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    fill_orders(&client, 30).await;
    fill_large(&client, 256, 16 * 1024).await;
    let script = r#"
import asyncio, json, sys
import nats
async def main(url):
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.subscribe("orders.>", ordered_consumer=True)
    got = []
    big = 0
    while len(got) + big < 286:
        m = await sub.next_msg(timeout=10)
        if m.subject == "orders.big":
            assert int.from_bytes(m.data[:8], "big") == big
            big += 1
        else:
            got.append([m.metadata.sequence.stream, m.metadata.sequence.consumer, m.subject, m.data.decode()])
    print(json.dumps({"got": got, "big": big}))
    await nc.close()
asyncio.run(main(sys.argv[1]))
"#;
    let result = support::run_nats_py(script, &nats.url()).await;
    let got = result["got"].as_array().unwrap();
    assert_eq!(got.len(), 30);
    for (index, entry) in got.iter().enumerate() {
        let sequence = index as u64 + 1;
        let subject = order_subject(sequence);
        assert_eq!(
            entry,
            &serde_json::json!([sequence, sequence, subject, format!("order-{sequence}")])
        );
    }
    assert_eq!(result["big"], 256);
}

/// The stored subject of record `sequence` in the million-record test.
fn million_subject(sequence: u64) -> String {
    format!("orders.m{}", sequence % 4)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_records_stream_in_order_through_ordered_push_and_pull_consumers() {
    use futures_util::StreamExt;
    const COUNT: u64 = 1_000_000;
    let (nats, config) = leaf_server();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    let context = jetstream::new(client.clone());
    // Published in windows of acks outstanding, as a fast producer does.
    let mut sequence = 0u64;
    while sequence < COUNT {
        let mut acks = Vec::new();
        for _ in 0..4096.min(COUNT - sequence) {
            sequence += 1;
            let ack = context
                .publish(
                    million_subject(sequence),
                    sequence.to_be_bytes().to_vec().into(),
                )
                .await
                .expect("published");
            acks.push(ack);
        }
        for ack in acks {
            ack.await.expect("acked");
        }
    }
    let stream = context.get_stream("orders").await.unwrap();
    let push = stream
        .create_consumer(jetstream::consumer::push::OrderedConfig {
            deliver_subject: client.new_inbox(),
            ..Default::default()
        })
        .await
        .unwrap()
        .messages()
        .await
        .unwrap()
        .map(|message| message.map_err(|error| error.to_string()))
        .boxed();
    let pull = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap()
        .messages()
        .await
        .unwrap()
        .map(|message| message.map_err(|error| error.to_string()))
        .boxed();
    for (kind, mut messages) in [("ordered push", push), ("ordered pull", pull)] {
        for expected in 1..=COUNT {
            let message = tokio::time::timeout(Duration::from_secs(20), messages.next())
                .await
                .unwrap_or_else(|_| panic!("{kind}: record {expected} in time"))
                .expect("message")
                .expect("delivery");
            let info = message.info().unwrap();
            assert_eq!(info.stream_sequence, expected, "{kind}");
            assert_eq!(
                message.subject.as_str(),
                million_subject(expected),
                "{kind}"
            );
            assert_eq!(message.payload[..], expected.to_be_bytes(), "{kind}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_consumer_redelivers_the_unacked_until_max_deliver() {
    let (nats, config) = leaf_server();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    let listener = connect(&nats.url()).await;
    let mut inbox = listener.subscribe("redo.inbox").await.unwrap();
    listener.flush().await.unwrap();
    let (_, created) = raw(
        &client,
        "$JS.API.CONSUMER.DURABLE.CREATE.orders.redo",
        r#"{"stream_name":"orders","config":{"durable_name":"redo","deliver_subject":"redo.inbox","ack_policy":"explicit","ack_wait":300000000,"max_deliver":3}}"#,
    )
    .await;
    assert_eq!(created["name"], "redo", "{created}");
    fill_orders(&client, 3).await;
    // (stream sequence, deliveries) of each delivery, in order.
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let message = next_message(&mut inbox).await;
        let reply = message.reply.expect("ack subject").to_string();
        let tokens: Vec<&str> = reply.split('.').collect();
        let (deliveries, sequence) = (
            tokens[4].parse::<u64>().unwrap(),
            tokens[5].parse::<u64>().unwrap(),
        );
        seen.push((sequence, deliveries));
        if sequence != 2 {
            listener.publish(reply, "+ACK".into()).await.unwrap();
        }
    }
    assert_eq!(seen, [(1, 1), (2, 1), (3, 1), (2, 2), (2, 3)]);
    // Delivered as often as allowed: no fourth time (three ack waits on).
    let quiet = tokio::time::timeout(Duration::from_millis(1000), {
        use futures_util::StreamExt;
        inbox.next()
    })
    .await;
    assert!(quiet.is_err(), "delivered a fourth time: {quiet:?}");
    let (_, info) = raw(&client, "$JS.API.CONSUMER.INFO.orders.redo", "").await;
    assert_eq!(info["num_redelivered"], 2, "{info}");
    assert_eq!(info["num_ack_pending"], 1, "{info}");
    assert_eq!(info["ack_floor"]["stream_seq"], 1, "{info}");
}

/// Sends one `CONSUMER.MSG.NEXT` request of `body` for `consumer` and
/// collects what comes to its inbox until a status that ends the request
/// (or `messages` records): the records' stream sequences and the
/// statuses in order.
async fn pull_raw(
    client: &async_nats::Client,
    consumer: &str,
    body: &str,
    messages: usize,
) -> (Vec<u64>, Vec<String>) {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(
            format!("$JS.API.CONSUMER.MSG.NEXT.orders.{consumer}"),
            inbox,
            body.to_string().into(),
        )
        .await
        .unwrap();
    let (mut sequences, mut statuses) = (Vec::new(), Vec::new());
    while sequences.len() < messages {
        let message = next_message(&mut replies).await;
        if let Some(status) = message.status {
            let pending = message
                .headers
                .as_ref()
                .and_then(|headers| headers.get("Nats-Pending-Messages"))
                .map(|value| format!(" pending {}", value.as_str()))
                .unwrap_or_default();
            statuses.push(format!("{}{pending}", status.as_u16()));
            if status.as_u16() != 100 {
                break;
            }
            continue;
        }
        let reply = message.reply.expect("ack subject").to_string();
        sequences.push(reply.split('.').nth(5).unwrap().parse().unwrap());
        client.publish(reply, "+ACK".into()).await.unwrap();
    }
    (sequences, statuses)
}

/// The requests of the `nats` CLI (which the setup cannot install: it is
/// in no registry it may use), sent as the CLI sends them: `stream view`'s
/// durable pager (`no_wait` pages, each message `+ACK`ed), `sub --stream`'s
/// long pull with idle heartbeats, `consumer next`'s single long poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nats_cli_requests_page_pull_with_heartbeats_and_wait_for_the_next() {
    let (nats, config) = leaf_server();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    fill_orders(&client, 12).await;
    let (_, created) = raw(
        &client,
        "$JS.API.CONSUMER.DURABLE.CREATE.orders.pager",
        r#"{"stream_name":"orders","config":{"durable_name":"pager","ack_policy":"explicit","deliver_policy":"all"}}"#,
    )
    .await;
    assert_eq!(created["name"], "pager", "{created}");
    let page = r#"{"batch":5,"no_wait":true}"#;
    assert_eq!(pull_raw(&client, "pager", page, 5).await.0, [1, 2, 3, 4, 5]);
    assert_eq!(
        pull_raw(&client, "pager", page, 5).await.0,
        [6, 7, 8, 9, 10]
    );
    assert_eq!(
        pull_raw(&client, "pager", page, 5).await,
        (vec![11, 12], vec!["404".to_string()])
    );
    // A long pull with heartbeats: heartbeats while nothing comes, then
    // the timeout with what the request still wanted.
    let (sequences, statuses) = pull_raw(
        &client,
        "pager",
        r#"{"batch":100,"expires":1000000000,"idle_heartbeat":200000000}"#,
        100,
    )
    .await;
    assert!(sequences.is_empty());
    let heartbeats = statuses.iter().filter(|status| *status == "100").count();
    assert!((3..=5).contains(&heartbeats), "{statuses:?}");
    assert_eq!(statuses.last().unwrap(), "408 pending 100", "{statuses:?}");
    // `consumer next`: one message, waiting for it to be published.
    let waiting = tokio::spawn({
        let client = client.clone();
        async move { pull_raw(&client, "pager", r#"{"batch":1,"expires":10000000000}"#, 1).await }
    });
    await_info(&client, "pager", "request waits", |info| {
        info["num_waiting"] == 1
    })
    .await;
    fill_orders_from(&client, 13, 1).await;
    assert_eq!(waiting.await.unwrap(), (vec![13], vec![]));
    await_info(&client, "pager", "all acked", |info| {
        info["ack_floor"]["stream_seq"] == 13
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_of_a_requester_gone_does_not_take_records() {
    let (nats, config) = leaf_server();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    let (_, created) = raw(
        &client,
        "$JS.API.CONSUMER.DURABLE.CREATE.orders.shared",
        r#"{"stream_name":"orders","config":{"durable_name":"shared","ack_policy":"explicit","deliver_policy":"new"}}"#,
    )
    .await;
    assert_eq!(created["name"], "shared", "{created}");
    // A reader asks for 10 without expiry, then goes away.
    let gone = connect(&nats.url()).await;
    let inbox = gone.new_inbox();
    let mut replies = gone.subscribe(inbox.clone()).await.unwrap();
    gone.flush().await.unwrap();
    gone.publish_with_reply(
        "$JS.API.CONSUMER.MSG.NEXT.orders.shared",
        inbox,
        r#"{"batch":10}"#.into(),
    )
    .await
    .unwrap();
    gone.flush().await.unwrap();
    await_info(&client, "shared", "1 waiting", |info| {
        info["num_waiting"] == 1
    })
    .await;
    replies.unsubscribe().await.unwrap();
    gone.flush().await.unwrap();
    drop(replies);
    drop(gone);
    // Its request is dropped once the hub reports its inbox unsubscribed.
    await_info(&client, "shared", "none waiting", |info| {
        info["num_waiting"] == 0
    })
    .await;
    fill_orders(&client, 3).await;
    let (sequences, statuses) =
        pull_raw(&client, "shared", r#"{"batch":3,"expires":5000000000}"#, 3).await;
    assert_eq!((sequences, statuses), (vec![1, 2, 3], vec![]));
}
