//! Who a node is across restarts: its data directory's incarnation, and
//! the incarnation of every peer it has met.
//!
//! A node's Raft state (its votes, the entries it acknowledged) lives in
//! its data directory. A node that comes back with an emptied directory
//! under its old id has forgotten both: if it took part again it could
//! vote twice in a term, or count towards a quorum for entries it no
//! longer holds. So a data directory gets a random incarnation on its
//! first start (`node.identity`), every connection between nodes begins
//! with both sides naming their node id and incarnation ([`Hello`]), and a
//! node remembers the incarnation it first met for each peer id
//! (`peers.known`, written atomically before the connection is used). A
//! peer id that comes back with another incarnation is refused, both ways,
//! and the refusal logged and counted; the operator adds the node again
//! under a new id (docs/OPERATIONS.md, "Replacing a dead node").
//!
//! Both files are hand-written, little-endian, with a CRC32C:
//!
//! ```text
//! node.identity  8 magic "NWNODE01" | 4 crc32c of the rest | 8 node id | 8 incarnation
//! peers.known    8 magic "NWPEER01" | 4 crc32c of the rest | 4 count (<= 65535)
//!                | count x (8 node id | 8 incarnation), ids ascending
//! ```
//!
//! Invariant: an incarnation recorded for a peer id never changes; a
//! damaged file is an error naming it, never a default (a default would
//! forget the peers it guards against).

use crate::error::{Error, Result};
use crate::types::NodeId;
use natswal::io::FileSystem;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub const IDENTITY_FILE_NAME: &str = "node.identity";
pub const KNOWN_PEERS_FILE_NAME: &str = "peers.known";
const IDENTITY_MAGIC: &[u8; 8] = b"NWNODE01";
const KNOWN_PEERS_MAGIC: &[u8; 8] = b"NWPEER01";
const KNOWN_PEERS_MAX: usize = 65_535;

/// What each side of a new connection says first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub node_id: NodeId,
    pub incarnation: u64,
}

/// The server's answer to a client's [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    Accepted(Hello),
    Refused(String),
}

/// This node's identity and the peers' incarnations it has met.
pub struct Identity {
    me: Hello,
    known: Mutex<BTreeMap<NodeId, u64>>,
    /// Where `known` is kept (`None`: in memory only, for tests and
    /// benchmarks in one process).
    storage: Option<(Arc<dyn FileSystem>, PathBuf)>,
}

impl Identity {
    /// Loads this node's identity from `data_dir` (creating it on the
    /// first start) and the peers it has met.
    pub fn open(
        file_system: Arc<dyn FileSystem>,
        data_dir: &Path,
        node_id: NodeId,
    ) -> Result<Identity> {
        let identity_path = data_dir.join(IDENTITY_FILE_NAME);
        let me = match read_optional(file_system.as_ref(), &identity_path)? {
            Some(bytes) => decode_identity(&bytes, &identity_path)?,
            None => {
                let created = Hello {
                    node_id,
                    incarnation: random_incarnation(file_system.as_ref()),
                };
                write(
                    file_system.as_ref(),
                    &identity_path,
                    &encode_identity(created),
                )?;
                created
            }
        };
        if me.node_id != node_id {
            return Err(Error::Invalid(format!(
                "{}: this data directory belongs to node {}, but the config says node_id = {node_id}; a data directory keeps the id it was created with (its votes were cast under it)",
                identity_path.display(),
                me.node_id
            )));
        }
        let known_path = data_dir.join(KNOWN_PEERS_FILE_NAME);
        let known = match read_optional(file_system.as_ref(), &known_path)? {
            Some(bytes) => decode_known(&bytes, &known_path)?,
            None => BTreeMap::new(),
        };
        Ok(Identity {
            me,
            known: Mutex::new(known),
            storage: Some((file_system, known_path)),
        })
    }

    /// An identity kept in memory only, with a fresh incarnation.
    pub fn in_memory(node_id: NodeId, incarnation: u64) -> Identity {
        Identity {
            me: Hello {
                node_id,
                incarnation,
            },
            known: Mutex::new(BTreeMap::new()),
            storage: None,
        }
    }

    pub fn hello(&self) -> Hello {
        self.me
    }

    /// Accepts a peer's hello if its incarnation is the one met before
    /// (recording it durably the first time); otherwise says why not.
    pub fn check(&self, peer: Hello) -> Result<(), String> {
        if peer.node_id == self.me.node_id {
            return Err(format!(
                "the peer says it is node {}, this node's own id",
                peer.node_id
            ));
        }
        let mut known = self
            .known
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match known.get(&peer.node_id) {
            Some(incarnation) if *incarnation == peer.incarnation => Ok(()),
            Some(incarnation) => Err(format!(
                "node {} comes back with incarnation {:016x}, but this node met it as {incarnation:016x}: its data directory was replaced, so it has forgotten its votes and the entries it acknowledged; it must rejoin under a new node id (docs/OPERATIONS.md, \"Replacing a dead node\")",
                peer.node_id, peer.incarnation
            )),
            None => {
                let mut updated = known.clone();
                updated.insert(peer.node_id, peer.incarnation);
                if let Some((file_system, path)) = &self.storage {
                    write(file_system.as_ref(), path, &encode_known(&updated)).map_err(
                        |error| format!("cannot record node {}'s incarnation: {error}", peer.node_id),
                    )?;
                }
                *known = updated;
                Ok(())
            }
        }
    }
}

fn random_incarnation(file_system: &dyn FileSystem) -> u64 {
    // Zero is never an incarnation (it reads as "none" in a dump).
    file_system.entropy().max(1)
}

fn read_optional(file_system: &dyn FileSystem, path: &Path) -> Result<Option<Vec<u8>>> {
    if !file_system.exists(path) {
        return Ok(None);
    }
    file_system
        .read(path)
        .map(Some)
        .map_err(|error| Error::Invalid(format!("cannot read {}: {error}", path.display())))
}

fn write(file_system: &dyn FileSystem, path: &Path, bytes: &[u8]) -> Result<()> {
    file_system
        .write_atomic(path, bytes)
        .map_err(|error| Error::Invalid(format!("cannot write {}: {error}", path.display())))
}

fn seal(magic: &[u8; 8], body: &[u8]) -> Vec<u8> {
    let mut bytes = magic.to_vec();
    bytes.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    bytes.extend_from_slice(body);
    bytes
}

/// The body after magic and CRC, if both are right.
fn unseal<'a>(magic: &[u8; 8], bytes: &'a [u8], path: &Path) -> Result<&'a [u8]> {
    let damaged = |why: &str| {
        Error::Format(format!(
            "{}: {why}; the file is kept as it is (move it away only if this node's data directory is new)",
            path.display()
        ))
    };
    if bytes.len() < 12 || &bytes[..8] != magic {
        return Err(damaged("not a natswal identity file (magic)"));
    }
    let body = &bytes[12..];
    let crc = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if crc32c::crc32c(body) != crc {
        return Err(damaged("checksum mismatch (damaged)"));
    }
    Ok(body)
}

fn read_u64(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

fn encode_identity(identity: Hello) -> Vec<u8> {
    let mut body = identity.node_id.to_le_bytes().to_vec();
    body.extend_from_slice(&identity.incarnation.to_le_bytes());
    seal(IDENTITY_MAGIC, &body)
}

fn decode_identity(bytes: &[u8], path: &Path) -> Result<Hello> {
    let body = unseal(IDENTITY_MAGIC, bytes, path)?;
    if body.len() != 16 {
        return Err(Error::Format(format!(
            "{}: {} body bytes, expected 16",
            path.display(),
            body.len()
        )));
    }
    Ok(Hello {
        node_id: read_u64(body, 0),
        incarnation: read_u64(body, 8),
    })
}

fn encode_known(known: &BTreeMap<NodeId, u64>) -> Vec<u8> {
    assert!(
        known.len() <= KNOWN_PEERS_MAX,
        "at most {KNOWN_PEERS_MAX} peers"
    );
    let mut body = (known.len() as u32).to_le_bytes().to_vec();
    for (node_id, incarnation) in known {
        body.extend_from_slice(&node_id.to_le_bytes());
        body.extend_from_slice(&incarnation.to_le_bytes());
    }
    seal(KNOWN_PEERS_MAGIC, &body)
}

fn decode_known(bytes: &[u8], path: &Path) -> Result<BTreeMap<NodeId, u64>> {
    let body = unseal(KNOWN_PEERS_MAGIC, bytes, path)?;
    let invalid = |why: String| Error::Format(format!("{}: {why}", path.display()));
    if body.len() < 4 {
        return Err(invalid("no peer count".into()));
    }
    let count = u32::from_le_bytes(body[..4].try_into().expect("4 bytes")) as usize;
    if count > KNOWN_PEERS_MAX || body.len() != 4 + count * 16 {
        return Err(invalid(format!(
            "{count} peers in {} body bytes",
            body.len()
        )));
    }
    let mut known = BTreeMap::new();
    for peer in 0..count {
        let at = 4 + peer * 16;
        let node_id = read_u64(body, at);
        if known.insert(node_id, read_u64(body, at + 8)).is_some() {
            return Err(invalid(format!("node {node_id} is listed twice")));
        }
    }
    Ok(known)
}

#[cfg(test)]
mod tests {
    use super::*;
    use natswal::io::memory::MemoryFileSystem;

    fn memory() -> Arc<dyn FileSystem> {
        Arc::new(MemoryFileSystem::new())
    }

    #[test]
    fn a_peer_is_known_by_the_incarnation_met_first_across_restarts() {
        let file_system = memory();
        let directory = Path::new("/data");
        file_system.create_directory(directory).unwrap();
        let identity = Identity::open(Arc::clone(&file_system), directory, 1).unwrap();
        let me = identity.hello();
        assert_eq!(me.node_id, 1);
        let peer = Hello {
            node_id: 2,
            incarnation: 77,
        };
        identity.check(peer).unwrap();
        drop(identity);
        let reopened = Identity::open(Arc::clone(&file_system), directory, 1).unwrap();
        assert_eq!(reopened.hello(), me, "the incarnation survives restarts");
        reopened.check(peer).unwrap();
        let wiped = Hello {
            node_id: 2,
            incarnation: 78,
        };
        let refusal = reopened.check(wiped).unwrap_err();
        assert!(refusal.contains("new node id"), "{refusal}");
        assert!(reopened.check(me).is_err(), "a peer with this node's id");
        let error = Identity::open(file_system, directory, 9).err().unwrap();
        assert!(error.to_string().contains("belongs to node 1"), "{error}");
    }

    #[test]
    fn every_flipped_bit_of_either_file_is_an_error_naming_it() {
        let file_system = memory();
        let directory = Path::new("/data");
        file_system.create_directory(directory).unwrap();
        let identity = Identity::open(Arc::clone(&file_system), directory, 1).unwrap();
        identity
            .check(Hello {
                node_id: 3,
                incarnation: 5,
            })
            .unwrap();
        for name in [IDENTITY_FILE_NAME, KNOWN_PEERS_FILE_NAME] {
            let path = directory.join(name);
            let good = file_system.read(&path).unwrap();
            for bit in 0..good.len() * 8 {
                let mut bad = good.clone();
                bad[bit / 8] ^= 1 << (bit % 8);
                file_system.write_atomic(&path, &bad).unwrap();
                let error = Identity::open(Arc::clone(&file_system), directory, 1)
                    .err()
                    .unwrap_or_else(|| panic!("{name} bit {bit} went unnoticed"));
                assert!(error.to_string().contains(name), "{error}");
            }
            for length in 0..good.len() {
                file_system.write_atomic(&path, &good[..length]).unwrap();
                assert!(Identity::open(Arc::clone(&file_system), directory, 1).is_err());
            }
            file_system.write_atomic(&path, &good).unwrap();
        }
    }
}
