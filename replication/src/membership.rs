//! The on-disk body of a membership entry (an opaque frame), written by
//! hand like every natswal format; the frame's body CRC guards it.
//!
//! ```text
//! u8   kind            1 = membership
//! u32  config_count    1, or 2 while a joint change is in progress
//!      per config: u32 voter_count, then voter_count x u64 node id
//! u32  node_count      voters and learners
//!      per node: u64 node id, u32 address_length, address (UTF-8)
//! ```
//! All integers little-endian. Decoding checks every length against the
//! bytes left and refuses trailing bytes.

use crate::error::{Error, Result};
use crate::types::{Membership, Node, NodeId};
use std::collections::{BTreeMap, BTreeSet};

/// First byte of an opaque frame body that holds a membership.
pub const OPAQUE_KIND_MEMBERSHIP: u8 = 1;
/// A membership holds at most this many nodes (a Raft group of 5 voters
/// plus learners joining).
pub const MEMBERSHIP_NODES_MAX: u32 = 64;
const ADDRESS_BYTES_MAX: u32 = 1024;

pub fn encode_membership(membership: &Membership) -> Vec<u8> {
    let mut out = vec![OPAQUE_KIND_MEMBERSHIP];
    let configs = membership.get_joint_config();
    out.extend_from_slice(&(configs.len() as u32).to_le_bytes());
    for config in configs {
        out.extend_from_slice(&(config.len() as u32).to_le_bytes());
        for node_id in config {
            out.extend_from_slice(&node_id.to_le_bytes());
        }
    }
    let nodes: Vec<(&NodeId, &Node)> = membership.nodes().collect();
    out.extend_from_slice(&(nodes.len() as u32).to_le_bytes());
    for (node_id, node) in nodes {
        out.extend_from_slice(&node_id.to_le_bytes());
        out.extend_from_slice(&(node.addr.len() as u32).to_le_bytes());
        out.extend_from_slice(node.addr.as_bytes());
    }
    out
}

pub fn decode_membership(body: &[u8]) -> Result<Membership> {
    let mut cursor = Cursor { bytes: body };
    let kind = cursor.take(1)?[0];
    if kind != OPAQUE_KIND_MEMBERSHIP {
        return Err(Error::Format(format!(
            "opaque entry of kind {kind} is not a membership (kind {OPAQUE_KIND_MEMBERSHIP})"
        )));
    }
    let config_count = cursor.count("configs", 2)?;
    let mut configs = Vec::with_capacity(config_count as usize);
    for _ in 0..config_count {
        let voter_count = cursor.count("voters", MEMBERSHIP_NODES_MAX)?;
        let mut config = BTreeSet::new();
        for _ in 0..voter_count {
            config.insert(cursor.u64()?);
        }
        configs.push(config);
    }
    let node_count = cursor.count("nodes", MEMBERSHIP_NODES_MAX)?;
    let mut nodes = BTreeMap::new();
    for _ in 0..node_count {
        let node_id = cursor.u64()?;
        let length = cursor.count("address bytes", ADDRESS_BYTES_MAX)?;
        let address = std::str::from_utf8(cursor.take(length as usize)?)
            .map_err(|_| Error::Format(format!("address of node {node_id} is not UTF-8")))?;
        nodes.insert(
            node_id,
            Node {
                addr: address.to_string(),
            },
        );
    }
    if !cursor.bytes.is_empty() {
        return Err(Error::Format(format!(
            "membership entry has {} trailing bytes",
            cursor.bytes.len()
        )));
    }
    Membership::new(configs, nodes)
        .map_err(|error| Error::Format(format!("membership entry is inconsistent: {error}")))
}

struct Cursor<'a> {
    bytes: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, length: usize) -> Result<&'a [u8]> {
        if self.bytes.len() < length {
            return Err(Error::Format(format!(
                "membership entry ends early: {length} bytes needed, {} left",
                self.bytes.len()
            )));
        }
        let (taken, rest) = self.bytes.split_at(length);
        self.bytes = rest;
        Ok(taken)
    }

    fn u64(&mut self) -> Result<u64> {
        let bytes = self.take(8)?;
        Ok(u64::from_le_bytes(bytes.try_into().expect("8 bytes taken")))
    }

    fn count(&mut self, what: &str, maximum: u32) -> Result<u32> {
        let bytes = self.take(4)?;
        let count = u32::from_le_bytes(bytes.try_into().expect("4 bytes taken"));
        if count > maximum {
            return Err(Error::Format(format!(
                "membership entry claims {count} {what}, more than {maximum}"
            )));
        }
        Ok(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Membership {
        let nodes: BTreeMap<NodeId, Node> = [1u64, 2, 3, 4]
            .into_iter()
            .map(|id| {
                (
                    id,
                    Node {
                        addr: format!("127.0.0.1:{}", 7000 + id),
                    },
                )
            })
            .collect();
        Membership::new(
            vec![BTreeSet::from([1, 2, 3]), BTreeSet::from([2, 3, 4])],
            nodes,
        )
        .unwrap()
    }

    #[test]
    fn round_trips_a_joint_membership_with_addresses() {
        let membership = sample();
        let encoded = encode_membership(&membership);
        assert_eq!(decode_membership(&encoded).unwrap(), membership);
    }

    #[test]
    fn every_cut_and_trailing_byte_is_refused() {
        let encoded = encode_membership(&sample());
        for length in 0..encoded.len() {
            assert!(
                decode_membership(&encoded[..length]).is_err(),
                "a body cut to {length} bytes decoded"
            );
        }
        let mut longer = encoded.clone();
        longer.push(0);
        let error = decode_membership(&longer).unwrap_err().to_string();
        assert!(error.contains("trailing"), "{error}");
    }

    #[test]
    fn forged_counts_are_refused_before_allocating() {
        let mut forged = vec![OPAQUE_KIND_MEMBERSHIP];
        forged.extend_from_slice(&u32::MAX.to_le_bytes());
        let error = decode_membership(&forged).unwrap_err().to_string();
        assert!(error.contains("more than 2"), "{error}");
    }
}
