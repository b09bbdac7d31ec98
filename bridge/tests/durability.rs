//! Acknowledged means stored: SIGKILL of natswal mid-stream, NATS restarts
//! under load, graceful shutdown, TLS with credentials, and a cross-check
//! with nats-py, a client natswal's authors did not write.

mod support;

use bytes::Bytes;
use futures_util::StreamExt;
use rand::Rng;
use serde_json::json;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::*;

/// Deterministic payload of message `index` (varying length and bytes).
fn payload(index: u64) -> Bytes {
    let length = 20 + (index * 7919 % 300) as usize;
    Bytes::from(
        (0..length)
            .map(|position| (index as usize * 31 + position) as u8)
            .collect::<Vec<u8>>(),
    )
}

fn subject(index: u64) -> String {
    format!("events.load.{}", index % 10)
}

/// Publishes `count` messages with reply subjects, keeping `in_flight`
/// outstanding, and records each ack's offset. Stops early when `stop`.
struct Publisher {
    acked: Arc<Mutex<HashMap<u64, u64>>>,
    ack_count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Publisher {
    async fn start(
        client: async_nats::Client,
        count: u64,
        in_flight: usize,
        pace: Option<Duration>,
    ) -> (Publisher, tokio::task::JoinHandle<u64>) {
        let acked = Arc::new(Mutex::new(HashMap::new()));
        let ack_count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let prefix = format!("acks.{}", client.new_inbox().replace('.', "_"));
        let mut acks = client.subscribe(format!("{prefix}.*")).await.unwrap();
        let window = Arc::new(tokio::sync::Semaphore::new(in_flight));
        {
            let acked = Arc::clone(&acked);
            let ack_count = Arc::clone(&ack_count);
            let window = Arc::clone(&window);
            tokio::spawn(async move {
                while let Some(message) = acks.next().await {
                    window.add_permits(1);
                    if message.status.is_some() {
                        // 503 No Responders: nobody (natswal) was subscribed.
                        continue;
                    }
                    let index: u64 = message.subject.rsplit('.').next().unwrap().parse().unwrap();
                    let ack: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
                    if let Some(seq) = ack["seq"].as_u64() {
                        assert_eq!(ack["stream"], "events");
                        acked.lock().unwrap().insert(index, seq);
                        ack_count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
        let publishing = {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut sent = 0;
                for index in 0..count {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    // Permits come back with acks; a lost ack frees its
                    // slot after a timeout so the load keeps going.
                    if let Ok(permit) =
                        tokio::time::timeout(Duration::from_secs(1), window.acquire()).await
                    {
                        permit.unwrap().forget();
                    }
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("X-Index", index.to_string().as_str());
                    if client
                        .publish_with_reply_and_headers(
                            subject(index),
                            format!("{prefix}.{index}"),
                            headers,
                            payload(index),
                        )
                        .await
                        .is_err()
                    {
                        break;
                    }
                    sent += 1;
                    if let Some(pace) = pace {
                        tokio::time::sleep(pace).await;
                    }
                }
                let _ = client.flush().await;
                sent
            })
        };
        (
            Publisher {
                acked,
                ack_count,
                stop,
            },
            publishing,
        )
    }
}

/// Every acknowledged message is present at its acknowledged offset, with
/// the subject, headers and payload it was published with; offsets are
/// dense; no record is something that was never published.
fn check_acknowledged(records: &[Replayed], acked: &HashMap<u64, u64>) {
    for (position, record) in records.iter().enumerate() {
        assert_eq!(
            record.offset,
            position as u64 + natswal::FIRST_OFFSET,
            "offsets are dense"
        );
        let index: u64 = record
            .headers
            .iter()
            .find(|(name, _)| name == "X-Index")
            .map(|(_, value)| value.parse().unwrap())
            .expect("every record is a published message");
        assert_eq!(record.subject, subject(index));
        assert_eq!(record.payload, payload(index), "payload of message {index}");
    }
    let by_offset: HashMap<u64, &Replayed> = records
        .iter()
        .map(|record| (record.offset, record))
        .collect();
    for (index, offset) in acked {
        let record = by_offset.get(offset).unwrap_or_else(|| {
            panic!("acknowledged message {index} at offset {offset} is missing")
        });
        assert_eq!(
            record.headers,
            vec![("X-Index".to_string(), index.to_string())]
        );
        assert_eq!(record.payload, payload(*index));
    }
}

/// Replays the whole stream and checks every acknowledged message in it.
async fn replay_acknowledged(
    client: &async_nats::Client,
    acked: &HashMap<u64, u64>,
) -> Vec<Replayed> {
    let records = replay_all(client, "events", json!({"mode": "batched", "batch": 20000})).await;
    check_acknowledged(&records, acked);
    records
}

/// The config of the `events` stream on `nats` with this
/// `nats.shutdown_timeout`.
fn config_with_shutdown_timeout(nats: &NatsServer, timeout: &str) -> String {
    format!(
        "[nats]\nservers = [\"{}\"]\nconnect_timeout = \"5s\"\nshutdown_timeout = \"{timeout}\"\n{EVENTS_STREAM}",
        nats.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_stream_loses_no_acknowledged_message() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    // Small segments, so the kill can also land near a rotation.
    let config =
        format!("{EVENTS_STREAM}segment_bytes = \"1MiB\"\nmax_message_bytes = \"64KiB\"\n");
    let mut natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    let kill_after = rand::rng().random_range(10_000..90_000u64);
    let (publisher, publishing) = Publisher::start(client.clone(), 100_000, 4000, None).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    while publisher.ack_count.load(Ordering::Relaxed) < kill_after {
        assert!(
            Instant::now() < deadline,
            "acks stalled at {}",
            publisher.ack_count.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    natswal.kill();
    publisher.stop.store(true, Ordering::Relaxed);
    let sent = publishing.await.unwrap();
    let acked = publisher.acked.lock().unwrap().clone();
    assert!(acked.len() as u64 >= kill_after);
    natswal.restart();
    let records = replay_acknowledged(&client, &acked).await;
    eprintln!(
        "killed after {kill_after} acks; sent {sent}, acked {}, stored {}",
        acked.len(),
        records.len()
    );
    assert!(records.len() >= acked.len());
    // Appends continue after the restart at the next offset.
    let answer = client
        .request("events.after", Bytes::from_static(b"after"))
        .await
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(answer["seq"], records.len() as u64 + natswal::FIRST_OFFSET);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarts_under_load_lose_no_acknowledged_message() {
    let mut nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), EVENTS_STREAM);
    let client = connect(&nats.url()).await;
    let (publisher, publishing) =
        Publisher::start(client.clone(), 40_000, 500, Some(Duration::from_micros(50))).await;
    for restart in 0..2 {
        let before = publisher.ack_count.load(Ordering::Relaxed);
        wait_until_async("acks to flow", || {
            publisher.ack_count.load(Ordering::Relaxed) > before + 2000
        })
        .await;
        nats.restart();
        let after_restart = publisher.ack_count.load(Ordering::Relaxed);
        wait_until_async(&format!("acks after NATS restart {restart}"), || {
            publisher.ack_count.load(Ordering::Relaxed) > after_restart + 1000
        })
        .await;
    }
    publisher.stop.store(true, Ordering::Relaxed);
    publishing.await.unwrap();
    let acked = publisher.acked.lock().unwrap().clone();
    replay_acknowledged(&client, &acked).await;
}

async fn wait_until_async(what: &str, condition: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_acks_and_exits_zero() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    // Time enough to send every ack on a loaded machine: this test is about
    // draining, the bound has tests of its own.
    let config = config_with_shutdown_timeout(&nats, "5m");
    let mut natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    let (publisher, publishing) = Publisher::start(client.clone(), 30_000, 2000, None).await;
    wait_until_async("some acks", || {
        publisher.ack_count.load(Ordering::Relaxed) > 5000
    })
    .await;
    let status = tokio::task::spawn_blocking(move || {
        let status = natswal.terminate();
        (status, natswal)
    })
    .await
    .unwrap();
    assert!(
        status.0.success(),
        "natswal exits 0 on SIGTERM: {:?}",
        status.0
    );
    let mut natswal = status.1;
    publisher.stop.store(true, Ordering::Relaxed);
    publishing.await.unwrap();
    // natswal reports how many acks it published before exiting; all of
    // them must reach the publisher. (Messages NATS routed to natswal after
    // its unsubscribe took effect are neither stored nor acknowledged:
    // publishers retry those, as after any missing ack.)
    let summary = natswal
        .output()
        .into_iter()
        .find(|line| line.contains("stream events: received"))
        .expect("natswal logs its shutdown summary");
    let acknowledged: usize = summary
        .split("acknowledged ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|number| number.parse().ok())
        .expect("acknowledged count in the summary");
    wait_until_async("every published ack to arrive", || {
        publisher.ack_count.load(Ordering::Relaxed) as usize >= acknowledged
    })
    .await;
    let acked = publisher.acked.lock().unwrap().clone();
    natswal.restart();
    let records = replay_acknowledged(&client, &acked).await;
    assert_eq!(
        records.len(),
        acked.len(),
        "every stored message got its ack before exit"
    );
}

/// What `timeout scripts/run`, `docker compose down`, systemd and a pod
/// deletion do: SIGTERM to NATS and natswal at the same moment. natswal
/// exits 0 within its shutdown bound and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_nats_and_natswal_together_exits_within_the_bound() {
    let mut nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let config = config_with_shutdown_timeout(&nats, "2s");
    let mut natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    let (publisher, publishing) = Publisher::start(client.clone(), 1_000_000, 1000, None).await;
    wait_until_async("some acks", || {
        publisher.ack_count.load(Ordering::Relaxed) > 3000
    })
    .await;
    nats.signal(libc::SIGTERM);
    natswal.signal(libc::SIGTERM);
    let stopping = Instant::now();
    let (exited, mut natswal) =
        tokio::task::spawn_blocking(move || (natswal.wait_exit(Duration::from_secs(60)), natswal))
            .await
            .unwrap();
    let status = exited.expect("natswal exits although NATS went away at the same moment");
    let took = stopping.elapsed();
    assert!(status.success(), "natswal exits 0: {status:?}");
    eprintln!("natswal exited {took:?} after SIGTERM");
    assert!(
        took < Duration::from_secs(20),
        "2 s of shutdown_timeout, then the sync: {took:?}"
    );
    publisher.stop.store(true, Ordering::Relaxed);
    nats.wait_exit();
    let acked = publisher.acked.lock().unwrap().clone();
    nats.start_again();
    let _ = publishing.await;
    natswal.restart();
    let reader = connect(&nats.url()).await;
    replay_acknowledged(&reader, &acked).await;
}

/// With NATS unresponsive (stopped, its sockets open), shutdown waits for
/// it up to `shutdown_timeout`; a second SIGTERM gives up at once, after
/// the sync, and nothing acknowledged is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_gives_up_on_an_unresponsive_nats() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let config = config_with_shutdown_timeout(&nats, "10m");
    let mut natswal = Natswal::start(&nats.url(), data.path(), &config);
    let client = connect(&nats.url()).await;
    let (publisher, publishing) = Publisher::start(client.clone(), 1_000_000, 500, None).await;
    wait_until_async("some acks", || {
        publisher.ack_count.load(Ordering::Relaxed) > 2000
    })
    .await;
    publisher.stop.store(true, Ordering::Relaxed);
    nats.signal(libc::SIGSTOP);
    natswal.signal(libc::SIGTERM);
    let (still_running, mut natswal) =
        tokio::task::spawn_blocking(move || (natswal.wait_exit(Duration::from_secs(2)), natswal))
            .await
            .unwrap();
    assert!(
        still_running.is_none(),
        "shutdown waits for NATS while shutdown_timeout allows: {still_running:?}"
    );
    natswal.signal(libc::SIGTERM);
    let (exited, mut natswal) =
        tokio::task::spawn_blocking(move || (natswal.wait_exit(Duration::from_secs(20)), natswal))
            .await
            .unwrap();
    let status = exited.expect("a second SIGTERM ends the shutdown at once");
    assert!(status.success(), "{status:?}");
    let output = natswal.output().join("\n");
    assert!(
        output.contains("second SIGTERM: giving up on NATS"),
        "{output}"
    );
    nats.signal(libc::SIGCONT);
    let _ = publishing.await;
    let acked = publisher.acked.lock().unwrap().clone();
    natswal.restart();
    replay_acknowledged(&client, &acked).await;
}

struct Certificates {
    directory: tempfile::TempDir,
}

impl Certificates {
    fn generate() -> Certificates {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let directory = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(directory.path().join("ca.pem"), ca.pem()).unwrap();
        for (name, names) in [
            (
                "server",
                vec!["127.0.0.1".to_string(), "localhost".to_string()],
            ),
            ("client", vec!["natswal".to_string()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let certificate = CertificateParams::new(names)
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            std::fs::write(
                directory.path().join(format!("{name}.pem")),
                certificate.pem(),
            )
            .unwrap();
            std::fs::write(
                directory.path().join(format!("{name}-key.pem")),
                key.serialize_pem(),
            )
            .unwrap();
        }
        Certificates { directory }
    }

    fn path(&self, name: &str) -> String {
        self.directory.path().join(name).display().to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates_and_credentials() {
    let certificates = Certificates::generate();
    let nats = NatsServer::start_with_config(Some(format!(
        "tls {{\n cert_file: \"{}\"\n key_file: \"{}\"\n ca_file: \"{}\"\n verify: true\n timeout: 3\n}}\nauthorization {{\n user: natswal\n password: s3cret\n}}\n",
        certificates.path("server.pem"),
        certificates.path("server-key.pem"),
        certificates.path("ca.pem")
    )));
    let tls_url = format!("tls://127.0.0.1:{}", nats.port);
    let nats_section = |password: &str| {
        format!(
            "[nats]\nservers = [\"{tls_url}\"]\nuser = \"natswal\"\npassword = \"{password}\"\nconnect_timeout = \"3s\"\n[nats.tls]\nca_file = \"{}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n{EVENTS_STREAM}",
            certificates.path("ca.pem"),
            certificates.path("client.pem"),
            certificates.path("client-key.pem")
        )
    };
    let data = tempfile::tempdir().unwrap();
    let natswal = Natswal::start(&tls_url, data.path(), &nats_section("s3cret"));
    let client =
        async_nats::ConnectOptions::with_user_and_password("natswal".into(), "s3cret".into())
            .add_root_certificates(certificates.directory.path().join("ca.pem"))
            .add_client_certificate(
                certificates.directory.path().join("client.pem"),
                certificates.directory.path().join("client-key.pem"),
            )
            .require_tls(true)
            .connect(tls_url.as_str())
            .await
            .expect("test client connects over TLS");
    let answer = client
        .request("events.secure", Bytes::from_static(b"hi"))
        .await
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(answer, json!({"stream": "events", "seq": 1}));
    drop(natswal);
    // Wrong credentials: a clear error, and natswal does not run.
    let other = tempfile::tempdir().unwrap();
    let refused = Natswal::try_start(&tls_url, other.path(), &nats_section("wrong"))
        .err()
        .expect("wrong password is refused");
    assert!(
        refused.contains("authorization"),
        "error should say why: {refused}"
    );
    // No TLS client config against a TLS server: a clear error too.
    let plain = format!(
        "[nats]\nservers = [\"nats://127.0.0.1:{}\"]\nconnect_timeout = \"3s\"\n{EVENTS_STREAM}",
        nats.port
    );
    let third = tempfile::tempdir().unwrap();
    let refused = Natswal::try_start(&tls_url, third.path(), &plain)
        .err()
        .expect("TLS is required");
    assert!(refused.contains("cannot connect"), "{refused}");
}

/// The nkey seed signs the server's nonce, on the ingest connection
/// (natswal's own client) as on the api connection (async-nats): both must
/// be accepted for a publish to be acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nkey_authentication_on_both_connections() {
    let user = nkeys::KeyPair::new_user();
    let nats = NatsServer::start_with_config(Some(format!(
        "authorization {{\n users: [ {{ nkey: {} }} ]\n}}\n",
        user.public_key()
    )));
    let url = format!("nats://127.0.0.1:{}", nats.port);
    let keys = tempfile::tempdir().unwrap();
    let nats_section = |seed: &str| {
        let path = keys.path().join(format!("{}.nk", &seed[..12]));
        std::fs::write(&path, format!("{seed}\n")).unwrap();
        format!(
            "[nats]\nservers = [\"{url}\"]\nnkey_seed_file = \"{}\"\nconnect_timeout = \"3s\"\n{EVENTS_STREAM}",
            path.display()
        )
    };
    let data = tempfile::tempdir().unwrap();
    let natswal = Natswal::start(&url, data.path(), &nats_section(&user.seed().unwrap()));
    let client = async_nats::ConnectOptions::with_nkey(user.seed().unwrap())
        .connect(url.as_str())
        .await
        .expect("test client connects with the nkey");
    let answer = client
        .request("events.signed", Bytes::from_static(b"hi"))
        .await
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&answer.payload).unwrap();
    assert_eq!(answer, json!({"stream": "events", "seq": 1}));
    drop(natswal);
    let stranger = nkeys::KeyPair::new_user();
    let other = tempfile::tempdir().unwrap();
    let refused = Natswal::try_start(&url, other.path(), &nats_section(&stranger.seed().unwrap()))
        .err()
        .expect("an unknown nkey is refused");
    assert!(
        refused.contains("authorization"),
        "error should say why: {refused}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_py_publishes_with_acks_and_replays() {
    let nats = NatsServer::start();
    let data = tempfile::tempdir().unwrap();
    let _natswal = Natswal::start(&nats.url(), data.path(), EVENTS_STREAM);
    let script = r#"
import asyncio, json, sys
import nats
async def main(url):
    nc = await nats.connect(url)
    acks = []
    for i in range(50):
        reply = await nc.request("events.py.%d" % (i % 5), ("py-%d" % i).encode(), headers={"X-Py": str(i)}, timeout=5)
        acks.append(json.loads(reply.data))
    dup = await nc.request("events.py.0", b"d", headers={"Nats-Msg-Id": "py-dup"}, timeout=5)
    dup2 = await nc.request("events.py.0", b"d", headers={"Nats-Msg-Id": "py-dup"}, timeout=5)
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    replayed = []
    start = {"offset": 0}
    while True:
        await nc.publish("$NWAL.REPLAY.events", json.dumps({"start": start, "filter": "events.py.3", "batch": 4}).encode(), reply=inbox)
        while True:
            m = await sub.next_msg(timeout=5)
            if m.headers and "Nwal-Status" in m.headers:
                break
            replayed.append({"offset": int(m.headers["Nwal-Offset"]), "subject": m.headers["Nwal-Subject"], "x": m.headers["X-Py"], "data": m.data.decode()})
        if m.headers["Nwal-Status"] != "100":
            break
        start = {"offset": int(m.headers["Nwal-Next-Offset"])}
    print(json.dumps({"acks": acks, "dup": [json.loads(dup.data), json.loads(dup2.data)], "replayed": replayed}))
    await nc.close()
asyncio.run(main(sys.argv[1]))
"#;
    let result = support::run_nats_py(script, &nats.url()).await;
    for (index, ack) in result["acks"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            ack,
            &json!({"stream": "events", "seq": index as u64 + natswal::FIRST_OFFSET})
        );
    }
    assert_eq!(result["dup"][1]["duplicate"], true);
    assert_eq!(result["dup"][1]["seq"], result["dup"][0]["seq"]);
    let replayed = result["replayed"].as_array().unwrap();
    assert_eq!(replayed.len(), 10);
    for record in replayed {
        let index = record["offset"].as_u64().unwrap() - natswal::FIRST_OFFSET;
        assert_eq!(index % 5, 3);
        assert_eq!(record["subject"], "events.py.3");
        assert_eq!(record["x"], index.to_string());
        assert_eq!(record["data"], format!("py-{index}"));
    }
}
