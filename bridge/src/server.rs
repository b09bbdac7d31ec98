//! `natswal serve`: opens the streams, connects to NATS, runs ingest, the
//! API and the HTTP endpoint, and shuts down gracefully on SIGTERM/SIGINT:
//! stop intake, write and sync what was accepted, send the acks that are
//! due, close the streams, exit 0.

use crate::config::Config;
use crate::dedup::{now_ns, DuplicateWindow};
use crate::error::{BridgeError, Result};
use crate::metrics::BridgeMetrics;
use natswal::{Store, Stream, StreamOptions};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// What SIGHUP re-reads: the config file (with the same overrides). Only
/// `[[access]]` rules take effect without a restart.
pub struct Reload {
    pub path: Option<std::path::PathBuf>,
    pub overrides: crate::config::Overrides,
}

pub async fn serve(config: Config, reload: Reload) -> Result<()> {
    let audit = Arc::new(crate::audit::AuditLog::open(&config.audit_path())?);
    let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let result = start_and_serve(config, reload, Arc::clone(&audit), Arc::clone(&started)).await;
    if let Err(error) = &result {
        if !started.load(Ordering::Acquire) {
            // The start is audited once: ok when serving, or why it failed.
            audit.record_or_log(
                "server_start",
                "natswal",
                "server",
                "error",
                serde_json::json!({"pid": std::process::id(), "error": error.to_string()}),
            );
        }
    }
    result
}

async fn start_and_serve(
    config: Config,
    reload: Reload,
    audit: Arc<crate::audit::AuditLog>,
    started: Arc<std::sync::atomic::AtomicBool>,
) -> Result<()> {
    let metrics = Arc::new(BridgeMetrics::default());
    let keyring = Arc::new(config.keyring()?);
    let mut store = Store::open(
        &config.data_dir,
        config.write_mode()?,
        config.storage.open_segments_max,
    )?;
    store = store.with_open_files_max(config.storage.open_files_max)?;
    if config.storage.io_threads > 0 {
        store = store.with_io_threads(config.storage.io_threads)?;
    }
    if !config.storage.group_sync {
        store = store.without_group_sync()?;
    }
    if let Some(group) = store.group_sync() {
        let _ = metrics.group_sync.set(Arc::clone(group));
    }
    let store = Arc::new(store);
    // Replicated streams are Raft groups with logs of their own, opened
    // (and repaired from peers) before anything is served.
    let cluster =
        crate::cluster::ClusterNode::start(&config, &keyring, store.cache(), &audit).await?;
    let standalone: Vec<&crate::config::StreamSection> = config
        .streams
        .iter()
        .filter(|section| !section.is_replicated())
        .collect();
    let mut streams: BTreeMap<String, Arc<Stream>> = BTreeMap::new();
    let mut windows = BTreeMap::new();
    // Streams open in parallel (recovery is mostly waiting on the disk),
    // a bounded number at once; what follows runs in config order.
    let permits = Arc::new(tokio::sync::Semaphore::new(natswal::store::PARALLELISM));
    let mut opening = Vec::with_capacity(standalone.len());
    for section in standalone.iter().copied() {
        let retention_audit = Arc::clone(&audit);
        let rotation_audit = Arc::clone(&audit);
        let options = StreamOptions {
            config: section.engine_config()?,
            keyring: Arc::clone(&keyring),
            hooks: natswal::stream::StreamHooks {
                on_retention: Some(Arc::new(
                    move |deletion: &natswal::retention::RetentionDeletion| {
                        retention_audit.record_or_log(
                            "retention_delete",
                            "natswal",
                            &deletion.stream,
                            "ok",
                            serde_json::json!({
                                "segment": deletion.segment.display().to_string(),
                                "offsets": [deletion.base_offset, deletion.next_offset],
                                "records": deletion.records,
                                "bytes": deletion.bytes,
                                "limit": deletion.reason,
                            }),
                        );
                    },
                )),
                on_key_rotation: Some(Arc::new(move |stream: &str, from: u32, to: u32| {
                    rotation_audit.record_or_log(
                        "key_rotation",
                        "natswal",
                        stream,
                        "ok",
                        serde_json::json!({"from_key_id": from, "to_key_id": to}),
                    );
                })),
            },
            ..StreamOptions::default()
        };
        let opened_store = Arc::clone(&store);
        let name = section.name.clone();
        let permit = Arc::clone(&permits)
            .acquire_owned()
            .await
            .map_err(|_| BridgeError::InvalidArgument("the open permits closed".to_string()))?;
        opening.push(tokio::task::spawn_blocking(move || {
            let _permit = permit;
            opened_store.open_stream(&name, options)
        }));
    }
    for (section, opening) in standalone.iter().copied().zip(opening) {
        let (stream, report) = opening.await.map_err(|error| {
            BridgeError::InvalidArgument(format!("opening a stream panicked: {error}"))
        })??;
        for tail in &report.truncated {
            tracing::warn!(stream = %section.name, segment = %tail.segment.display(), position = tail.position, reason = %tail.reason, "truncated a torn tail (nothing acknowledged was in it)");
            audit.record(
                "truncate",
                "natswal",
                &section.name,
                "ok",
                serde_json::json!({
                    "torn_tail": true,
                    "segment": tail.segment.display().to_string(),
                    "position": tail.position,
                    "reason": tail.reason,
                }),
            )?;
        }
        for range in &report.quarantined {
            audit.record(
                "repair",
                "natswal",
                &section.name,
                "ok",
                serde_json::json!({
                    "segment": range.segment.display().to_string(),
                    "quarantined": [range.start, range.end],
                    "saved_to": range.saved_to.display().to_string(),
                    "reason": range.reason,
                }),
            )?;
        }
        let mut window = DuplicateWindow::new(section.duplicate_window, section.duplicate_ids_max);
        let loaded = window.rebuild(&section.name, |start| stream.reader(start, None), now_ns())?;
        let status = stream.status();
        tracing::info!(
            stream = %section.name,
            next_offset = status.next_offset,
            records = status.records,
            duplicate_ids = loaded,
            clean_shutdown = report.clean_shutdown,
            "stream ready"
        );
        // The writer checks Nats-Expected-Last-Msg-Id against the last
        // stored record's id: read it from the log.
        let last_record = match stream.last_record() {
            Ok(record) => record,
            Err(natswal::Error::KeyUnavailable { key_id, .. }) => {
                tracing::warn!(stream = %section.name, key_id, "the last record's key is not configured: Nats-Expected-Last-Msg-Id fails until a new record is stored");
                None
            }
            Err(error) => return Err(error.into()),
        };
        let last_id = last_record.and_then(|record| {
            crate::headers::find(&record.headers, crate::batch::HEADER_MSG_ID).map(Arc::<str>::from)
        });
        stream.set_last_message_id(last_id);
        windows.insert(section.name.clone(), Arc::new(Mutex::new(window)));
        streams.insert(section.name.clone(), stream);
    }
    let streams = Arc::new(streams);
    let (shutdown_sender, shutdown) = watch::channel(false);
    let (abandon_sender, abandon) = watch::channel(false);
    let readiness = Arc::new(crate::http::Readiness::default());
    let http_task = if config.http.listen.is_empty() {
        None
    } else {
        let listener = crate::http::bind(&config.http.listen).await?;
        tracing::info!(listen = %config.http.listen, "HTTP endpoints /metrics /healthz /readyz");
        Some(tokio::spawn(crate::http::run(
            listener,
            Arc::clone(&metrics),
            Arc::clone(&readiness),
            Arc::clone(&streams),
            shutdown.clone(),
        )))
    };
    let server_limits = Arc::new(crate::batch::ServerBatchLimits::new(
        config.limits.atomic_batches_max,
        config.limits.fast_batches_max,
    ));
    let ingest_client =
        crate::nats::connect_wire(&config.nats, "ingest", Arc::clone(&metrics)).await?;
    let api_client = crate::nats::connect_wire(&config.nats, "api", Arc::clone(&metrics)).await?;
    let mut ingest_tasks = Vec::new();
    for section in standalone.iter().copied() {
        let stream = Arc::clone(&streams[&section.name]);
        let subscription = ingest_client.subscribe_all(&section.subjects);
        let context = crate::ingest::IngestContext {
            counters: metrics.register(Arc::clone(&stream)),
            stream,
            client: ingest_client.clone(),
            duplicates: Arc::clone(&windows[&section.name]),
            max_message_bytes: section.max_message_bytes,
            limits: crate::batch::BatchLimits::of_section(section, &server_limits),
            // A quarter of the subscription's buffer for fast-ingest
            // windows leaves the rest for ordinary publishers.
            fast: Arc::new(Mutex::new(crate::batch::FastBatches::new(
                config.nats.subscription_capacity as u64 / 4,
            ))),
            api_prefix: config.api.prefix.clone(),
            abandon: abandon.clone(),
        };
        ingest_tasks.push(tokio::spawn(crate::ingest::run(
            context,
            subscription,
            shutdown.clone(),
        )));
    }
    let groups = cluster
        .as_ref()
        .map(|node| Arc::clone(&node.groups))
        .unwrap_or_default();
    if cluster.is_some() {
        let _ = metrics.raft_groups.set(Arc::downgrade(&groups));
    }
    if let Some(node) = &cluster {
        for section in config
            .streams
            .iter()
            .filter(|section| section.is_replicated())
        {
            let context = crate::cluster::intake::IntakeContext {
                group: Arc::clone(&node.groups[&section.name]),
                section: section.clone(),
                client: ingest_client.clone(),
                commit_timeout: node.config.commit_timeout,
                quorum_contact_max: node.timing.quorum_contact_max(),
                limits: crate::batch::BatchLimits::of_section(section, &server_limits),
            };
            ingest_tasks.push(tokio::spawn(crate::cluster::intake::run(
                context,
                shutdown.clone(),
            )));
        }
        let admin = crate::cluster::admin::AdminService::new(
            node,
            api_client.clone(),
            &config.api.prefix,
            Arc::clone(&audit),
        );
        ingest_tasks.push(tokio::spawn(crate::cluster::admin::run(
            admin,
            shutdown.clone(),
        )));
    }
    let access = Arc::new(std::sync::RwLock::new(crate::api::AccessRules::new(
        &config.access,
    )?));
    let api = crate::api::ApiService {
        client: api_client.clone(),
        streams: Arc::clone(&streams),
        replicated: Arc::clone(&groups),
        // A cluster's nodes share the API's requests: each is answered once.
        queue: cluster.as_ref().map(|_| "natswal-api".to_string()),
        stream_subjects: Arc::new(
            config
                .streams
                .iter()
                .map(|section| {
                    let patterns = section
                        .subjects
                        .iter()
                        .map(|subject| natswal::SubjectPattern::parse(subject).expect("validated"))
                        .collect();
                    (section.name.clone(), patterns)
                })
                .collect(),
        ),
        metrics: Arc::clone(&metrics),
        prefix: config.api.prefix.clone(),
        replays: Arc::new(tokio::sync::Semaphore::new(config.api.replays_max)),
        replays_max: config.api.replays_max,
        access: Arc::clone(&access),
        audit: Arc::clone(&audit),
    };
    let api_subscriptions = crate::api::subscribe(&api);
    let jetstream_task = start_jetstream(
        &config,
        &api_client,
        &streams,
        &api.stream_subjects,
        &access,
        &metrics,
        &shutdown,
    )
    .await?;
    let api_task = tokio::spawn(crate::api::run(api, api_subscriptions, shutdown.clone()));
    // The server has processed every subscription before natswal calls
    // itself ready (a flush only reaches the socket: a request right after
    // "ready" could still find no responder).
    let confirmed = [
        ingest_client
            .round_trip(Some(config.nats.connect_timeout))
            .await,
        api_client
            .round_trip(Some(config.nats.connect_timeout))
            .await,
    ];
    for (confirmed, role) in confirmed.into_iter().zip(["ingest", "api"]) {
        if !confirmed {
            return Err(BridgeError::Nats(format!(
                "the {role} connection's subscriptions were not confirmed by NATS"
            )));
        }
    }
    readiness.serving.store(true, Ordering::Release);
    audit.record(
        "server_start",
        "natswal",
        "server",
        "ok",
        serde_json::json!({"pid": std::process::id(), "streams": config.streams.iter().map(|stream| &stream.name).collect::<Vec<_>>()}),
    )?;
    started.store(true, Ordering::Release);
    tracing::info!(
        streams = streams.len(),
        servers = %config.nats.servers.join(","),
        api = %format!("{}.REPLAY.<stream>, {}.STATUS", config.api.prefix, config.api.prefix),
        "natswal serving"
    );
    println!(
        "natswal ready: {} stream(s), NATS {}",
        streams.len(),
        config.nats.servers.join(",")
    );
    wait_for_signal(&reload, &access, &audit).await?;
    let shutdown_timeout = config.nats.shutdown_timeout;
    tracing::info!(
        timeout = %humantime::format_duration(shutdown_timeout),
        "shutting down: stopping intake, syncing, sending due acks (a second SIGTERM or SIGINT gives up on NATS at once)"
    );
    readiness.serving.store(false, Ordering::Release);
    let _ = shutdown_sender.send(true);
    let give_up = tokio::spawn(give_up_on_nats(shutdown_timeout, abandon_sender));
    for task in ingest_tasks {
        let _ = task.await;
    }
    let _ = api_task.await;
    if let Some(task) = jetstream_task {
        let _ = task.await;
    }
    drop(groups);
    let cluster_closed = match cluster {
        Some(node) => node.shutdown().await,
        None => Ok(()),
    };
    // Everything accepted is synced, whatever NATS does.
    let closing = Arc::clone(&store);
    let closed = tokio::task::spawn_blocking(move || closing.close())
        .await
        .map_err(|error| {
            BridgeError::InvalidArgument(format!("closing streams panicked: {error}"))
        })?;
    let flushed = if *abandon.borrow() {
        false
    } else {
        let mut abandon = abandon.clone();
        tokio::select! {
            true = crate::ingest::gave_up(&mut abandon) => false,
            (ingest, api) = futures_util::future::join(ingest_client.round_trip(None), api_client.round_trip(None)) => ingest && api,
        }
    };
    give_up.abort();
    ingest_client.close();
    api_client.close();
    if let Some(task) = http_task {
        let _ = task.await;
    }
    closed?;
    cluster_closed?;
    for line in metrics.summary() {
        tracing::info!("{line}");
    }
    let undelivered = metrics.replies_undelivered();
    if undelivered > 0 || !flushed {
        tracing::warn!(
            replies_undelivered = undelivered,
            flushed,
            "stopped without reaching NATS: {undelivered} acks or replies were not sent{}; everything accepted is synced, and publishers retry what they did not get an ack for",
            if flushed { "" } else { ", and replies handed to the NATS client may not have reached the server" }
        );
    }
    tracing::info!("natswal stopped cleanly");
    Ok(())
}

/// Gives up on NATS after `timeout` or at a second SIGTERM or SIGINT.
async fn give_up_on_nats(timeout: std::time::Duration, abandon: watch::Sender<bool>) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tokio::time::sleep(timeout).await;
        let _ = abandon.send(true);
        return;
    };
    tokio::select! {
        _ = tokio::time::sleep(timeout) => tracing::warn!(
            timeout = %humantime::format_duration(timeout),
            "nats.shutdown_timeout passed: giving up on NATS"
        ),
        _ = terminate.recv() => tracing::warn!("second SIGTERM: giving up on NATS"),
        _ = interrupt.recv() => tracing::warn!("SIGINT during shutdown: giving up on NATS"),
    }
    let _ = abandon.send(true);
}

async fn wait_for_signal(
    reload: &Reload,
    access: &std::sync::RwLock<crate::api::AccessRules>,
    audit: &crate::audit::AuditLog,
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup())
        .map_err(|error| BridgeError::io("cannot handle SIGHUP", error))?;
    let mut terminate = signal(SignalKind::terminate())
        .map_err(|error| BridgeError::io("cannot handle SIGTERM", error))?;
    let mut interrupt = signal(SignalKind::interrupt())
        .map_err(|error| BridgeError::io("cannot handle SIGINT", error))?;
    loop {
        tokio::select! {
            _ = terminate.recv() => {
                tracing::info!("SIGTERM received");
                break;
            }
            _ = interrupt.recv() => {
                tracing::info!("SIGINT received");
                break;
            }
            _ = hangup.recv() => reload_access(reload, access, audit),
        }
    }
    audit.record_or_log(
        "server_stop",
        "natswal",
        "server",
        "ok",
        serde_json::json!({}),
    );
    Ok(())
}

/// SIGHUP: re-reads the config and applies its `[[access]]` rules; other
/// changes need a restart (and are logged as such).
fn reload_access(
    reload: &Reload,
    access: &std::sync::RwLock<crate::api::AccessRules>,
    audit: &crate::audit::AuditLog,
) {
    let file = reload
        .path
        .as_ref()
        .map(|path| path.display().to_string())
        .unwrap_or_else(|| "(defaults)".to_string());
    let loaded = Config::load(reload.path.as_deref(), &reload.overrides)
        .and_then(|config| crate::api::AccessRules::new(&config.access));
    match loaded {
        Ok(rules) => {
            let count = rules.len();
            *access
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = rules;
            tracing::info!(
                file,
                rules = count,
                "configuration reloaded: access rules applied (other changes need a restart)"
            );
            audit.record_or_log(
                "config_reload",
                "signal:SIGHUP",
                &file,
                "ok",
                serde_json::json!({"access_rules": count}),
            );
        }
        Err(error) => {
            tracing::error!(file, %error, "configuration reload refused; the running configuration stays");
            audit.record_or_log(
                "config_reload",
                "signal:SIGHUP",
                &file,
                "error",
                serde_json::json!({"error": error.to_string()}),
            );
        }
    }
}

/// Starts natswal's JetStream API unless it is disabled or another
/// JetStream already answers at its prefix (then it says why and stays
/// off: two servers answering one request would give clients whichever
/// answer came first).
async fn start_jetstream(
    config: &Config,
    client: &crate::wire::Client,
    streams: &Arc<BTreeMap<String, Arc<natswal::Stream>>>,
    stream_subjects: &Arc<BTreeMap<String, Vec<natswal::SubjectPattern>>>,
    access: &Arc<std::sync::RwLock<crate::api::AccessRules>>,
    metrics: &Arc<BridgeMetrics>,
    shutdown: &tokio::sync::watch::Receiver<bool>,
) -> Result<Option<tokio::task::JoinHandle<()>>> {
    if !config.jetstream.enabled {
        return Ok(None);
    }
    let domain = config.jetstream.domain.clone();
    let prefix = crate::jetstream::prefix(domain.as_deref());
    if let Some(answer) = crate::jetstream::other_jetstream(client, &prefix).await {
        tracing::warn!(
            %prefix,
            %answer,
            "not serving the JetStream API: another JetStream answers {prefix}.INFO in this account; set jetstream.domain to serve natswal's streams under a domain of their own"
        );
        return Ok(None);
    }
    let deliveries = match &config.jetstream.leafnode_url {
        Some(url) => crate::nats::connect_leaf(&config.nats, url, Arc::clone(metrics)).await?,
        None => client.clone(),
    };
    let sections = config
        .streams
        .iter()
        .filter(|section| !section.is_replicated())
        .map(|section| (section.name.clone(), section.clone()))
        .collect();
    let service = crate::jetstream::JetStreamService {
        client: client.clone(),
        streams: Arc::clone(streams),
        sections: Arc::new(sections),
        stream_subjects: Arc::clone(stream_subjects),
        prefix,
        domain,
        access: Arc::clone(access),
        counters: Arc::default(),
        consumers: Arc::default(),
        leaf: config.jetstream.leafnode_url.is_some(),
        deliveries,
        data_dir: config.data_dir.clone(),
        fs: Arc::new(natswal::io::os::OsFileSystem::new(
            natswal::io::WriteMode::Pwrite,
        )),
    };
    let restored = crate::jetstream::restore_consumers(&service);
    if restored > 0 {
        tracing::info!(restored, "durable JetStream consumers restored");
    }
    let subscription = crate::jetstream::subscribe(&service);
    Ok(Some(tokio::spawn(crate::jetstream::run(
        service,
        subscription,
        shutdown.clone(),
    ))))
}
