//! `natswal cluster init|status|add|remove|transfer-leader`: the admin API
//! of [`super::admin`] from the command line, through NATS.

use crate::client::ConnectionArgs;
use crate::error::{BridgeError, Result};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::Value;
use std::time::Duration;

#[derive(Debug, clap::Subcommand)]
pub enum ClusterCommand {
    /// Make the configured nodes the first voters of every replicated stream not yet initialized, and spread the streams' leaders over them (once, on a new cluster).
    Init(ConnectionArgs),
    /// Each replicated stream: leader, term, commit and applied index, and each replica's lag.
    Status {
        #[command(flatten)]
        connection: ConnectionArgs,
        /// Print the nodes' JSON answers.
        #[arg(long)]
        json: bool,
        /// How long to collect the nodes' answers (ms).
        #[arg(long, default_value_t = 1000)]
        wait_ms: u64,
    },
    /// Add a node as a voter (it first catches up as a learner); every replicated stream unless --stream.
    Add {
        #[command(flatten)]
        connection: ConnectionArgs,
        #[arg(long)]
        node_id: u64,
        /// The new node's replication address (host:port).
        #[arg(long)]
        address: String,
        #[arg(long)]
        stream: Option<String>,
    },
    /// Remove a node from the voters; every replicated stream unless --stream.
    Remove {
        #[command(flatten)]
        connection: ConnectionArgs,
        #[arg(long)]
        node_id: u64,
        #[arg(long)]
        stream: Option<String>,
    },
    /// Hand a stream's leadership to another voter.
    TransferLeader {
        #[command(flatten)]
        connection: ConnectionArgs,
        #[arg(long)]
        stream: String,
        #[arg(long)]
        to: u64,
    },
}

pub async fn run(command: ClusterCommand) -> Result<()> {
    match command {
        ClusterCommand::Init(connection) => {
            let wait = Duration::from_secs(connection.timeout);
            let answer = request(&connection, "INIT", Bytes::new(), wait).await?;
            print_answer(&answer)
        }
        ClusterCommand::Status {
            connection,
            json,
            wait_ms,
        } => status(&connection, json, Duration::from_millis(wait_ms)).await,
        ClusterCommand::Add {
            connection,
            node_id,
            address,
            stream,
        } => {
            let body = serde_json::json!({"node_id": node_id, "address": address});
            let wait = Duration::from_secs(connection.timeout).max(ADD_WAIT_MIN);
            each_stream(&connection, stream, "ADD", &body, wait).await
        }
        ClusterCommand::Remove {
            connection,
            node_id,
            stream,
        } => {
            let body = serde_json::json!({"node_id": node_id});
            let wait = Duration::from_secs(connection.timeout);
            each_stream(&connection, stream, "REMOVE", &body, wait).await
        }
        ClusterCommand::TransferLeader {
            connection,
            stream,
            to,
        } => {
            let body = serde_json::json!({"to": to});
            let answer = request(
                &connection,
                &format!("TRANSFER.{stream}"),
                Bytes::from(body.to_string()),
                Duration::from_secs(connection.timeout),
            )
            .await?;
            print_answer(&answer)
        }
    }
}

/// `verb` with `body` for the stream named, or for every replicated stream
/// the nodes report, each answered by its leader.
async fn each_stream(
    connection: &ConnectionArgs,
    named: Option<String>,
    verb: &str,
    body: &Value,
    wait: Duration,
) -> Result<()> {
    for stream in streams(connection, named).await? {
        let subject = format!("{verb}.{stream}");
        let answer = request(connection, &subject, Bytes::from(body.to_string()), wait).await?;
        print_answer(&answer)?;
    }
    Ok(())
}

/// One request answered by one node (the leader, or the `INIT` queue's),
/// waiting up to `wait` (async-nats's own request timeout is not used: a
/// learner's catch-up can take minutes).
async fn request(
    connection: &ConnectionArgs,
    verb: &str,
    body: Bytes,
    wait: Duration,
) -> Result<Value> {
    let (client, prefix) = connection.connect().await?;
    let subject = format!("{prefix}.CLUSTER.{verb}");
    let inbox = client.new_inbox();
    let mut answers = client
        .subscribe(inbox.clone())
        .await
        .map_err(|error| BridgeError::nats("cannot subscribe to the reply inbox", error))?;
    client
        .publish_with_reply(subject.clone(), inbox, body)
        .await
        .map_err(|error| BridgeError::nats(format!("cannot send {subject}"), error))?;
    let answer = tokio::time::timeout(wait, answers.next())
        .await
        .ok()
        .flatten()
        .ok_or_else(|| BridgeError::Nats(format!("no node answered {subject} within {} s (is a natswal cluster node running? for a stream: it may have no leader now; retry)", wait.as_secs())))?;
    serde_json::from_slice(&answer.payload).map_err(|error| {
        BridgeError::InvalidArgument(format!("unexpected answer on {subject}: {error}"))
    })
}

/// How long `add` waits: the learner catches up with the whole log first.
const ADD_WAIT_MIN: Duration = Duration::from_secs(300);

fn print_answer(answer: &Value) -> Result<()> {
    if let Some(error) = answer.get("error") {
        return Err(BridgeError::InvalidArgument(format!(
            "node {} refused: {}",
            answer["node_id"],
            error.as_str().unwrap_or_default()
        )));
    }
    println!("{answer}");
    Ok(())
}

/// Every node's status answer, gathered for `wait`.
async fn gather_status(connection: &ConnectionArgs, wait: Duration) -> Result<Vec<Value>> {
    let (client, prefix) = connection.connect().await?;
    let inbox = client.new_inbox();
    let mut answers = client
        .subscribe(inbox.clone())
        .await
        .map_err(|error| BridgeError::nats("cannot subscribe to the reply inbox", error))?;
    let subject = format!("{prefix}.CLUSTER.STATUS");
    client
        .publish_with_reply(subject.clone(), inbox, Bytes::new())
        .await
        .map_err(|error| BridgeError::nats(format!("cannot send {subject}"), error))?;
    let mut nodes = Vec::new();
    let deadline = tokio::time::Instant::now() + wait;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, answers.next()).await {
        match serde_json::from_slice::<Value>(&message.payload) {
            Ok(node) => nodes.push(node),
            Err(error) => tracing::warn!(%error, "a node's status answer is not JSON"),
        }
    }
    if nodes.is_empty() {
        return Err(BridgeError::Nats(format!(
            "no node answered {subject}: is a natswal cluster node running?"
        )));
    }
    nodes.sort_by_key(|node| node["node_id"].as_u64());
    Ok(nodes)
}

/// The streams a command applies to: the one named, or every replicated
/// stream the nodes report.
async fn streams(connection: &ConnectionArgs, named: Option<String>) -> Result<Vec<String>> {
    if let Some(name) = named {
        return Ok(vec![name]);
    }
    let nodes = gather_status(connection, Duration::from_millis(1000)).await?;
    Ok(stream_names(&nodes))
}

/// The streams the nodes' status answers name, sorted, each once.
fn stream_names(nodes: &[Value]) -> Vec<String> {
    let mut names: Vec<String> = nodes
        .iter()
        .flat_map(|node| node["streams"].as_array().cloned().unwrap_or_default())
        .filter_map(|stream| stream["stream"].as_str().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    names
}

async fn status(connection: &ConnectionArgs, json: bool, wait: Duration) -> Result<()> {
    let nodes = gather_status(connection, wait).await?;
    if json {
        for node in &nodes {
            println!("{node}");
        }
        return Ok(());
    }
    println!(
        "{:<20} {:>6} {:>8} {:>12} {:>12} {:>14}  REPLICAS (node: role, applied, lag)",
        "STREAM", "LEADER", "TERM", "COMMITTED", "APPLIED", "NEXT OFFSET"
    );
    for name in stream_names(&nodes) {
        let views: Vec<(&Value, Value)> = nodes
            .iter()
            .filter_map(|node| {
                node["streams"]
                    .as_array()
                    .and_then(|streams| {
                        streams
                            .iter()
                            .find(|stream| stream["stream"] == name.as_str())
                    })
                    .map(|stream| (node, stream.clone()))
            })
            .collect();
        // The leader's view has the replicas' lag; else any node's.
        let leader_view = views
            .iter()
            .find(|(_, stream)| stream["is_leader"] == true)
            .or(views.first())
            .map(|(_, stream)| stream.clone())
            .unwrap_or_default();
        let replicas: Vec<String> = views
            .iter()
            .map(|(node, stream)| {
                let id = node["node_id"].as_u64().unwrap_or_default();
                let role = if stream["is_leader"] == true {
                    "leader"
                } else {
                    "follower"
                };
                let lag = leader_view["replicas"]
                    .as_array()
                    .and_then(|replicas| {
                        replicas
                            .iter()
                            .find(|replica| replica["node_id"].as_u64() == Some(id))
                    })
                    .map_or("?".to_string(), |replica| {
                        replica["lag_entries"].to_string()
                    });
                format!("{id}: {role}, {}, {lag}", text(&stream["applied"]))
            })
            .collect();
        println!(
            "{:<20} {:>6} {:>8} {:>12} {:>12} {:>14}  {}",
            name,
            text(&leader_view["leader"]),
            text(&leader_view["term"]),
            text(&leader_view["committed"]),
            text(&leader_view["applied"]),
            text(&leader_view["next_offset"]),
            replicas.join("; ")
        );
    }
    Ok(())
}

fn text(value: &Value) -> String {
    match value {
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}
