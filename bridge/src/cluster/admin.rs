//! The cluster's admin API over NATS, under `<api prefix>.CLUSTER.`:
//! - `STATUS`: every node answers with its view of each group (leader,
//!   term, commit and applied index; on the leader each replica's lag);
//! - `INIT`: one node (a queue group) makes the configured nodes the first
//!   voters of every group not yet initialized, then hands each stream's
//!   leadership to a node in turn, so leaders spread over the cluster;
//! - `TRANSFER.<stream>` `{"to":N}`, `ADD.<stream>` `{"node_id":N,
//!   "address":"host:port"}`, `REMOVE.<stream>` `{"node_id":N}`: only the
//!   stream's leader answers (no answer: no leader now; retry).
//!
//! Membership changes are audited.

use super::{ClusterNode, Groups};
use crate::audit::AuditLog;
use crate::wire::{Client, Message};
use futures_util::StreamExt;
use natswal_replication::{GroupStatus, ReplicatedStream};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Queue group of `INIT`: exactly one node initializes.
const INIT_QUEUE: &str = "natswal-cluster-init";
/// How long `INIT` waits for this node to lead a group it initialized.
const LEAD_WAIT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct AdminService {
    pub client: Client,
    pub prefix: String,
    pub node_id: u64,
    pub address: String,
    /// Every configured node: id and address.
    pub members: BTreeMap<u64, String>,
    pub groups: Groups,
    pub registry: Arc<natswal_replication::Registry>,
    pub audit: Arc<AuditLog>,
}

impl AdminService {
    pub fn new(node: &ClusterNode, client: Client, prefix: &str, audit: Arc<AuditLog>) -> Self {
        AdminService {
            client,
            prefix: format!("{prefix}.CLUSTER"),
            node_id: node.config.node_id,
            address: node.config.advertised().to_string(),
            members: node.config.members(),
            groups: Arc::clone(&node.groups),
            registry: Arc::clone(&node.registry),
            audit,
        }
    }
}

/// Serves admin requests until `shutdown`.
pub async fn run(service: AdminService, mut shutdown: watch::Receiver<bool>) {
    let mut requests = service.client.subscribe_all(&[
        format!("{}.STATUS", service.prefix),
        format!("{}.TRANSFER.*", service.prefix),
        format!("{}.ADD.*", service.prefix),
        format!("{}.REMOVE.*", service.prefix),
    ]);
    let mut init = service
        .client
        .subscribe_all_in(&[format!("{}.INIT", service.prefix)], Some(INIT_QUEUE));
    loop {
        let message = tokio::select! {
            biased;
            _ = shutdown.wait_for(|stop| *stop) => return,
            Some(message) = init.next() => message,
            Some(message) = requests.next() => message,
            else => return,
        };
        let service = service.clone();
        tokio::spawn(async move { service.answer(message).await });
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferRequest {
    to: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddRequest {
    node_id: u64,
    address: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveRequest {
    node_id: u64,
}

impl AdminService {
    async fn answer(&self, message: Message) {
        let subject = message.subject_text().to_string();
        let Some(verb) = subject.strip_prefix(&format!("{}.", self.prefix)) else {
            return;
        };
        let answer = match verb.split_once('.') {
            None if verb == "STATUS" => Some(Ok(self.status())),
            None if verb == "INIT" => Some(self.init().await),
            Some((action, stream)) => match self.groups.get(stream) {
                None => Some(Err(format!("no replicated stream named '{stream}'"))),
                // Only the leader acts and answers.
                Some(group) if !group.status().is_leader => None,
                Some(group) => Some(self.change(action, group, &message.payload).await),
            },
            None => Some(Err(format!("unknown cluster request '{verb}'"))),
        };
        let (Some(answer), Some(reply)) = (answer, message.reply) else {
            return;
        };
        let body = match answer {
            Ok(value) => value,
            Err(error) => json!({"error": error, "node_id": self.node_id}),
        };
        if let Err(error) = self.client.publish(&reply, body.to_string().as_bytes()) {
            tracing::warn!(%error, "cannot send a cluster admin answer");
        }
    }

    fn status(&self) -> Value {
        let streams: Vec<Value> = self
            .groups
            .values()
            .map(|group| status_json(&group.status(), group.applied_offset()))
            .collect();
        json!({
            "node_id": self.node_id,
            "address": self.address,
            "refused_connections": self.registry.refused_connections(),
            "streams": streams,
        })
    }

    /// Initializes the groups that have no membership yet, with every
    /// configured node as a voter, then spreads their leaders.
    async fn init(&self) -> Result<Value, String> {
        let members: BTreeMap<u64, natswal_replication::types::Node> = self
            .members
            .iter()
            .map(|(id, address)| {
                (
                    *id,
                    natswal_replication::types::Node {
                        addr: address.clone(),
                    },
                )
            })
            .collect();
        let node_ids: Vec<u64> = members.keys().copied().collect();
        let mut initialized = Vec::new();
        let mut already = Vec::new();
        for (index, (name, group)) in self.groups.iter().enumerate() {
            if initialized_elsewhere(group) {
                already.push(name.clone());
                continue;
            }
            if let Err(error) = group.initialize(members.clone()).await {
                // Another node's init reached this node between the check
                // and here: the group is initialized.
                if initialized_elsewhere(group) {
                    already.push(name.clone());
                    continue;
                }
                return Err(error.to_string());
            }
            self.audit.record_or_log(
                "cluster_init",
                "natswal",
                name,
                "ok",
                json!({"voters": node_ids, "by_node": self.node_id}),
            );
            // Stream i is led by the i-th node: leaders spread.
            let target = node_ids[index % node_ids.len()];
            if target != self.node_id {
                if let Err(error) = group.wait_to_lead(LEAD_WAIT).await {
                    // Two inits at once (both nodes untouched when asked)
                    // made the same membership; the other node leads and
                    // spreads the leaders.
                    if group
                        .status()
                        .leader
                        .is_some_and(|leader| leader != self.node_id)
                    {
                        already.push(name.clone());
                        continue;
                    }
                    return Err(error.to_string());
                }
                group
                    .transfer_leader(target)
                    .await
                    .map_err(|error| error.to_string())?;
            }
            initialized.push(json!({"stream": name, "leader": target}));
        }
        Ok(
            json!({"node_id": self.node_id, "initialized": initialized, "already_initialized": already}),
        )
    }

    async fn change(
        &self,
        action: &str,
        group: &ReplicatedStream,
        payload: &[u8],
    ) -> Result<Value, String> {
        let stream = group.name();
        let invalid = |error: serde_json::Error| format!("invalid {action} request: {error}");
        let (event, detail) = match action {
            "TRANSFER" => {
                let request: TransferRequest = serde_json::from_slice(payload).map_err(invalid)?;
                let status = group.status();
                if !status.voters.contains(&request.to) {
                    return Err(format!(
                        "node {} is not a voter of '{stream}' (voters: {:?})",
                        request.to, status.voters
                    ));
                }
                group
                    .transfer_leader(request.to)
                    .await
                    .map_err(|error| error.to_string())?;
                (
                    "cluster_transfer_leader",
                    json!({"from": self.node_id, "to": request.to}),
                )
            }
            "ADD" => {
                let request: AddRequest = serde_json::from_slice(payload).map_err(invalid)?;
                let status = group.status();
                if status.voters.contains(&request.node_id) {
                    return Err(format!(
                        "node {} is already a voter of '{stream}'",
                        request.node_id
                    ));
                }
                // A learner first: it catches up before it counts toward
                // the quorum.
                group
                    .add_learner(request.node_id, &request.address)
                    .await
                    .map_err(|error| error.to_string())?;
                let mut voters: BTreeSet<u64> = status.voters.iter().copied().collect();
                voters.insert(request.node_id);
                group
                    .change_voters(voters.clone())
                    .await
                    .map_err(|error| error.to_string())?;
                (
                    "cluster_add",
                    json!({"node_id": request.node_id, "address": request.address, "voters": voters}),
                )
            }
            "REMOVE" => {
                let request: RemoveRequest = serde_json::from_slice(payload).map_err(invalid)?;
                let status = group.status();
                let mut voters: BTreeSet<u64> = status.voters.iter().copied().collect();
                if !voters.remove(&request.node_id) {
                    return Err(format!(
                        "node {} is not a voter of '{stream}'",
                        request.node_id
                    ));
                }
                if voters.is_empty() {
                    return Err(format!(
                        "removing node {} would leave '{stream}' without voters",
                        request.node_id
                    ));
                }
                group
                    .change_voters(voters.clone())
                    .await
                    .map_err(|error| error.to_string())?;
                (
                    "cluster_remove",
                    json!({"node_id": request.node_id, "voters": voters}),
                )
            }
            other => return Err(format!("unknown cluster request '{other}'")),
        };
        self.audit
            .record_or_log(event, "natswal", stream, "ok", detail.clone());
        Ok(json!({"stream": stream, "node_id": self.node_id, "done": detail}))
    }
}

/// One group's status as JSON (what `natswal cluster status` prints).
pub fn status_json(status: &GroupStatus, applied_offset: u64) -> Value {
    let replicas: Vec<Value> = status
        .replicas
        .iter()
        .map(|replica| json!({"node_id": replica.node_id, "matched": replica.matched, "lag_entries": replica.lag_entries}))
        .collect();
    json!({
        "stream": status.stream,
        "leader": status.leader,
        "is_leader": status.is_leader,
        "term": status.term,
        "last_index": status.last_index,
        "committed": status.committed,
        "applied": status.applied,
        "purged": status.purged,
        "next_offset": applied_offset,
        "voters": status.voters,
        "learners": status.learners,
        "replicas": replicas,
        "elections": status.elections,
        "leader_changes": status.leader_changes,
        "repaired_entries": status.repaired_entries,
        "snapshots_installed": status.shipping.snapshots_installed,
        "segments_received": status.shipping.segments_received,
        "segment_bytes_received": status.shipping.bytes_received,
        "snapshot_transfers_failed": status.shipping.transfers_failed,
        "scrub_segments_checked": status.scrub.segments_checked,
        "scrub_damaged_segments": status.scrub.damaged_segments,
        "scrub_restored_segments": status.scrub.restored_segments,
    })
}

/// Whether the group has a membership, or a vote or an entry without one
/// yet (another node's init reached this node first and its entries are on
/// the way).
fn initialized_elsewhere(group: &natswal_replication::ReplicatedStream) -> bool {
    let status = group.status();
    !status.voters.is_empty() || status.term > 0 || status.last_index.is_some()
}
