//! Raft replication for natswal: each replicated stream is one openraft
//! group whose Raft log is the stream's own log (one entry, one frame; no
//! second log). This crate keeps openraft behind its own API, so an
//! upgrade of the pinned alpha stays inside `replication/`.
//!
//! Modules follow the path of an entry: [`types`] (the Raft type
//! configuration and proposals), [`entry`] (entry <-> frame), [`membership`]
//! (the on-disk body of a membership entry), [`log_store`] (openraft's log
//! storage over the engine's Log API), [`syncer`] (the flush callbacks and
//! the commit index, after syncs), [`state_machine`] and [`snapshot`]
//! (applying, and snapshots as manifests of sealed segments), [`shipping`]
//! (a follower downloading and installing the segments a snapshot names),
//! [`scrub`] (re-checking sealed segments in the background), [`codec`],
//! [`identity`] and [`network`] (node-to-node frames; who a peer is), [`group`] (one stream's group on one
//! node: open, initialize, propose with a quorum ack). The design
//! and its decisions are in docs/DESIGN-REPLICATION.md.

pub mod codec;
pub mod entry;
pub mod error;
pub mod group;
pub mod identity;
pub mod log_store;
pub mod membership;
pub mod network;
pub mod scrub;
pub mod shipping;
pub mod snapshot;
pub mod state_machine;
pub mod syncer;
pub mod tls;
pub mod types;

pub use error::{Error, Result};
pub use group::{
    GroupOptions, GroupStatus, RaftTiming, ReplicaStatus, ReplicatedStream, SnapshotSettings,
};
pub use identity::Identity;
pub use log_store::{StreamLogReader, StreamLogStore};
pub use network::{serve, Peers, Registry};
pub use scrub::ScrubCounters;
pub use shipping::ShippingCounters;
pub use snapshot::SnapshotManifest;
pub use state_machine::StreamStateMachine;
pub use types::{Applied, Command, ProposedRecord, RecordBatch, StreamRaft};
