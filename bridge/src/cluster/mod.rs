//! This node's part in a natswal cluster: the replication transport (one
//! listener for every group), the Raft group of each replicated stream
//! (`replicas` 3 or 5), their leader-only intake ([`intake`]) and the
//! cluster's admin API over NATS ([`admin`]), which `natswal cluster`
//! ([`cli`]) talks to.
//!
//! A replicated stream lives in `<data_dir>/replicated/<name>`, apart from
//! the standalone streams of `<data_dir>/streams`: its log is a Raft log
//! (every frame carries its term and index), which a standalone stream's
//! tools must not take for their own.

pub mod admin;
pub mod cli;
pub mod intake;

use crate::config::{ClusterConfig, Config};
use crate::error::{BridgeError, Result};
use natswal::io::os::OsFileSystem;
use natswal::io::{FileSystem, WriteMode};
use natswal::{Keyring, SegmentCache};
use natswal_replication::tls::{TlsFiles, TransportSecurity};
use natswal_replication::{
    GroupOptions, Identity, Peers, RaftTiming, Registry, ReplicatedStream, SnapshotSettings,
};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The directory of replicated streams under `data_dir`.
pub const REPLICATED_DIRECTORY: &str = "replicated";

/// The replicated streams of this node, by name.
pub type Groups = Arc<BTreeMap<String, Arc<ReplicatedStream>>>;
pub type WeakGroups = std::sync::Weak<BTreeMap<String, Arc<ReplicatedStream>>>;

/// This node in its cluster.
pub struct ClusterNode {
    pub config: ClusterConfig,
    pub groups: Groups,
    pub registry: Arc<Registry>,
    pub timing: RaftTiming,
    server: tokio::task::JoinHandle<()>,
}

/// Audits each sealed segment the scrub restores from peers.
fn scrub_restore_audit(
    audit: Arc<crate::audit::AuditLog>,
    node_id: u64,
) -> natswal_replication::scrub::RestoreHook {
    Arc::new(move |restored: &natswal_replication::scrub::ScrubRestore| {
        audit.record_or_log(
            "replica_repair",
            "natswal",
            &restored.stream,
            "ok",
            serde_json::json!({
                "node_id": node_id,
                "by": "scrub",
                "segment": restored.segment.display().to_string(),
                "damaged_entries_restored_in_place": restored.entries,
            }),
        );
    })
}

pub fn replication_error(error: natswal_replication::Error) -> BridgeError {
    BridgeError::InvalidArgument(error.to_string())
}

impl ClusterNode {
    /// Binds the replication listener and opens the group of every
    /// replicated stream (repairing each log before its Raft starts; a
    /// repair is audited).
    pub async fn start(
        config: &Config,
        keyring: &Arc<Keyring>,
        cache: &Arc<SegmentCache>,
        audit: &Arc<crate::audit::AuditLog>,
    ) -> Result<Option<ClusterNode>> {
        let Some(cluster) = config.cluster.clone() else {
            return Ok(None);
        };
        let security = match &cluster.tls {
            Some(tls) => TransportSecurity::mutual_tls(&TlsFiles {
                ca_file: &tls.ca_file,
                cert_file: &tls.cert_file,
                key_file: &tls.key_file,
            })
            .map_err(replication_error)?,
            None => TransportSecurity::Plain,
        };
        let listener = tokio::net::TcpListener::bind(&cluster.listen)
            .await
            .map_err(|error| {
                BridgeError::io(
                    format!("cannot listen for replication on {}", cluster.listen),
                    error,
                )
            })?;
        let file_system: Arc<dyn FileSystem> = Arc::new(OsFileSystem::new(WriteMode::Pwrite));
        let identity = Arc::new(
            Identity::open(Arc::clone(&file_system), &config.data_dir, cluster.node_id)
                .map_err(replication_error)?,
        );
        let registry = Arc::new(Registry::default());
        let server = tokio::spawn(natswal_replication::serve(
            listener,
            Arc::clone(&registry),
            security.clone(),
            Arc::clone(&identity),
        ));
        let peers = Arc::new(
            Peers::new(security, identity).with_configured_addresses(
                cluster
                    .peers
                    .iter()
                    .map(|peer| (peer.id, peer.address.clone())),
            ),
        );
        let peer_addresses: Vec<String> = cluster
            .peers
            .iter()
            .map(|peer| peer.address.clone())
            .collect();
        let timing = RaftTiming::default();
        let mut groups = BTreeMap::new();
        for section in config
            .streams
            .iter()
            .filter(|section| section.is_replicated())
        {
            let directory = config
                .data_dir
                .join(REPLICATED_DIRECTORY)
                .join(&section.name);
            std::fs::create_dir_all(&directory).map_err(|error| {
                BridgeError::io(format!("cannot create {}", directory.display()), error)
            })?;
            let options = GroupOptions {
                node_id: cluster.node_id,
                name: &section.name,
                directory: &directory,
                config: section.engine_config()?,
                keyring: Arc::clone(keyring),
                cache: Arc::clone(cache),
                timing,
                snapshots: SnapshotSettings {
                    entries_between: cluster.snapshot_entries,
                    kept_entries: cluster.snapshot_kept_entries,
                },
                scrub_bytes_per_second: cluster.scrub_bytes_per_second,
                peer_addresses: peer_addresses.clone(),
                on_scrub_restore: Some(scrub_restore_audit(Arc::clone(audit), cluster.node_id)),
            };
            let group = ReplicatedStream::open(
                Arc::clone(&file_system),
                options,
                Arc::clone(&peers),
                Arc::clone(&registry),
            )
            .await
            .map_err(replication_error)?;
            tracing::info!(
                stream = %section.name,
                node_id = cluster.node_id,
                last_index = ?group.status().last_index,
                fetched_from_peers = group.fetched_on_open(),
                restored_in_place = group.restored_on_open(),
                "replicated stream open"
            );
            if group.fetched_on_open() + group.restored_on_open() > 0 {
                audit.record_or_log(
                    "replica_repair",
                    "natswal",
                    &section.name,
                    "ok",
                    serde_json::json!({
                        "node_id": cluster.node_id,
                        "damaged_entries_restored_in_place": group.restored_on_open(),
                        "lost_entries_fetched": group.fetched_on_open(),
                    }),
                );
            }
            groups.insert(section.name.clone(), Arc::new(group));
        }
        tracing::info!(
            node_id = cluster.node_id,
            listen = %cluster.listen,
            peers = cluster.peers.len(),
            tls = cluster.tls.is_some(),
            "cluster node: serving replication"
        );
        Ok(Some(ClusterNode {
            config: cluster,
            groups: Arc::new(groups),
            registry,
            timing,
            server,
        }))
    }

    /// Stops every group (closing its log) and the transport, once the
    /// API and intake tasks let go of the groups (they stop first).
    pub async fn shutdown(self) -> Result<()> {
        let mut first_error = None;
        let groups: BTreeMap<String, Arc<ReplicatedStream>> = (*self.groups).clone();
        drop(self.groups);
        for (name, group) in groups {
            let Some(group) = sole_owner(group).await else {
                tracing::error!(stream = %name, "a replicated stream is still in use at shutdown; its log is synced but not closed");
                first_error.get_or_insert(BridgeError::InvalidArgument(format!(
                    "replicated stream '{name}' was still in use at shutdown"
                )));
                continue;
            };
            if let Err(error) = group.shutdown().await {
                tracing::error!(stream = %name, %error, "stopping a replicated stream failed");
                first_error.get_or_insert(replication_error(error));
            }
        }
        self.server.abort();
        first_error.map_or(Ok(()), Err)
    }
}

/// How long shutdown waits for replays of a replicated stream to end.
const RELEASE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The group once every other holder dropped it (`None` after a wait).
async fn sole_owner(mut group: Arc<ReplicatedStream>) -> Option<ReplicatedStream> {
    let deadline = tokio::time::Instant::now() + RELEASE_WAIT;
    loop {
        match Arc::try_unwrap(group) {
            Ok(group) => return Some(group),
            Err(shared) if tokio::time::Instant::now() < deadline => {
                group = shared;
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            Err(_) => return None,
        }
    }
}
