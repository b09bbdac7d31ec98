//! A durable consumer's state on disk: one small file per consumer,
//! `<data_dir>/consumers/<stream>/<name>.consumer`, replaced whole.
//!
//! Layout (docs/FORMAT.md, "Consumer files"), little-endian:
//!
//! | bytes | field |
//! | --- | --- |
//! | 4 | magic `NWCS` |
//! | 2 | version (1) |
//! | 4 | body length |
//! | body | config length (4), config (the echoed JSON), delivered consumer and stream sequence (8 + 8), ack floor consumer and stream sequence (8 + 8), pending count (4), then per pending record: stream sequence, consumer sequence, deliveries (8 + 8 + 8) |
//! | 4 | CRC-32C of everything before it |
//!
//! Commit: the new state goes to `<name>.consumer.tmp`, which is synced,
//! renamed over the old file, and the directory synced. A crash at any
//! step leaves the old file or the new one, whole; a leftover `.tmp` is
//! ignored and replaced by the next save. A file that fails its checks is
//! reported with its path and the reason, never read in part.

use natswal::io::FileSystem;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const MAGIC: &[u8; 4] = b"NWCS";
const VERSION: u16 = 1;
/// Bound on a file's size: a forged length cannot make a load allocate
/// more (1000 pending records take 24 KB; this allows millions).
const FILE_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// What a save keeps.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SavedState {
    pub config: Vec<u8>,
    pub delivered: (u64, u64),
    pub ack_floor: (u64, u64),
    /// Stream sequence, consumer sequence, deliveries.
    pub pending: Vec<(u64, u64, u64)>,
}

pub fn encode(state: &SavedState) -> Vec<u8> {
    let mut body = Vec::with_capacity(64 + state.config.len() + state.pending.len() * 24);
    body.extend_from_slice(&(state.config.len() as u32).to_le_bytes());
    body.extend_from_slice(&state.config);
    for value in [
        state.delivered.0,
        state.delivered.1,
        state.ack_floor.0,
        state.ack_floor.1,
    ] {
        body.extend_from_slice(&value.to_le_bytes());
    }
    body.extend_from_slice(&(state.pending.len() as u32).to_le_bytes());
    for (stream_sequence, consumer_sequence, deliveries) in &state.pending {
        for value in [stream_sequence, consumer_sequence, deliveries] {
            body.extend_from_slice(&value.to_le_bytes());
        }
    }
    let mut out = Vec::with_capacity(body.len() + 14);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Reads fixed-size fields off the front of a body.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl Cursor<'_> {
    fn take(&mut self, count: usize, what: &str) -> Result<&[u8], String> {
        if self.rest.len() < count {
            return Err(format!("the body ends inside {what}"));
        }
        let (taken, rest) = self.rest.split_at(count);
        self.rest = rest;
        Ok(taken)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let bytes = self.take(4, what)?;
        Ok(u32::from_le_bytes(bytes.try_into().expect("4 bytes")))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let bytes = self.take(8, what)?;
        Ok(u64::from_le_bytes(bytes.try_into().expect("8 bytes")))
    }
}

pub fn decode(bytes: &[u8]) -> Result<SavedState, String> {
    if bytes.len() < 14 {
        return Err(format!(
            "{} bytes is shorter than a consumer file's frame",
            bytes.len()
        ));
    }
    if &bytes[..4] != MAGIC {
        return Err("not a consumer file (no NWCS magic)".to_string());
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != VERSION {
        return Err(format!(
            "version {version}, this natswal reads version {VERSION}"
        ));
    }
    let length = u32::from_le_bytes(bytes[6..10].try_into().expect("4 bytes")) as usize;
    if bytes.len() != 10 + length + 4 {
        return Err(format!(
            "the header says {length} body bytes, the file holds {}",
            bytes.len().saturating_sub(14)
        ));
    }
    let stored = u32::from_le_bytes(bytes[10 + length..].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(&bytes[..10 + length]);
    if stored != computed {
        return Err(format!(
            "checksum mismatch (stored {stored:08x}, computed {computed:08x})"
        ));
    }
    let mut cursor = Cursor {
        rest: &bytes[10..10 + length],
    };
    let config_length = cursor.u32("the config length")? as usize;
    let config = cursor.take(config_length, "the config")?.to_vec();
    let delivered = (cursor.u64("delivered")?, cursor.u64("delivered")?);
    let ack_floor = (cursor.u64("the ack floor")?, cursor.u64("the ack floor")?);
    let count = cursor.u32("the pending count")? as usize;
    if count.saturating_mul(24) != cursor.rest.len() {
        return Err(format!(
            "{count} pending records need {} bytes, {} remain",
            count.saturating_mul(24),
            cursor.rest.len()
        ));
    }
    let mut pending = Vec::with_capacity(count);
    for _ in 0..count {
        pending.push((
            cursor.u64("a pending record")?,
            cursor.u64("a pending record")?,
            cursor.u64("a pending record")?,
        ));
    }
    Ok(SavedState {
        config,
        delivered,
        ack_floor,
        pending,
    })
}

/// One consumer's file, through the engine's [`FileSystem`] (the OS's, or
/// the in-memory one that crash tests stop at any operation).
#[derive(Debug, Clone)]
pub struct ConsumerFile {
    pub path: PathBuf,
    fs: Arc<dyn FileSystem>,
}

impl ConsumerFile {
    pub fn new(fs: Arc<dyn FileSystem>, directory: &Path, name: &str) -> ConsumerFile {
        ConsumerFile {
            path: directory.join(format!("{name}.consumer")),
            fs,
        }
    }

    fn directory(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Makes `directory` and its missing parents, each made durable in its
    /// parent.
    fn make_directories(&self, directory: &Path) -> natswal::Result<()> {
        if self.fs.is_directory(directory) {
            return Ok(());
        }
        let parent = directory.parent().unwrap_or(Path::new("/"));
        self.make_directories(parent)?;
        self.fs.make_directory(directory)?;
        self.fs.sync_directory(parent)
    }

    /// Replaces the file with `state`, crash-atomically (module docs).
    pub fn save(&self, state: &SavedState) -> natswal::Result<()> {
        let directory = self.directory().to_path_buf();
        self.make_directories(&directory)?;
        let temporary = self.path.with_extension("consumer.tmp");
        if self.fs.exists(&temporary) {
            self.fs.remove(&temporary)?;
        }
        let file = self.fs.create(&temporary)?;
        file.write_at(0, &encode(state))?;
        file.sync_all()?;
        drop(file);
        self.fs.rename(&temporary, &self.path)?;
        self.fs.sync_directory(&directory)
    }

    pub fn load(&self) -> Result<SavedState, String> {
        let describe = |reason: String| format!("{}: {reason}", self.path.display());
        let length = self
            .fs
            .file_length(&self.path)
            .map_err(|error| describe(error.to_string()))?;
        if length > FILE_BYTES_MAX {
            return Err(describe(format!(
                "{length} bytes is more than a consumer file holds"
            )));
        }
        let bytes = self
            .fs
            .read(&self.path)
            .map_err(|error| describe(error.to_string()))?;
        decode(&bytes).map_err(describe)
    }

    /// Removes the file (a deleted consumer), durably.
    pub fn remove(&self) -> natswal::Result<()> {
        if !self.fs.exists(&self.path) {
            return Ok(());
        }
        self.fs.remove(&self.path)?;
        self.fs.sync_directory(self.directory())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> SavedState {
        SavedState {
            config: br#"{"durable_name":"d1"}"#.to_vec(),
            delivered: (12, 40),
            ack_floor: (7, 30),
            pending: vec![(31, 8, 1), (35, 10, 3)],
        }
    }

    #[test]
    fn a_state_round_trips_and_every_damage_is_named() {
        let bytes = encode(&sample());
        assert_eq!(decode(&bytes), Ok(sample()));
        // Every cut and every flipped byte is refused, never half read.
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        for position in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[position] ^= 0x40;
            assert!(decode(&damaged).is_err(), "flip at {position}");
        }
        let mut forged = bytes.clone();
        forged[6..10].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&forged).unwrap_err().contains("header says"));
    }

    fn os() -> Arc<dyn FileSystem> {
        Arc::new(natswal::io::os::OsFileSystem::new(
            natswal::io::WriteMode::Pwrite,
        ))
    }

    #[test]
    fn a_save_replaces_the_file_and_ignores_a_leftover_temporary() {
        let directory = tempfile::tempdir().unwrap();
        let file = ConsumerFile::new(os(), &directory.path().join("consumers/orders"), "d1");
        file.save(&SavedState::default()).unwrap();
        std::fs::write(file.path.with_extension("consumer.tmp"), b"half a save").unwrap();
        file.save(&sample()).unwrap();
        assert_eq!(file.load(), Ok(sample()));
        let mut later = sample();
        later.pending.clear();
        file.save(&later).unwrap();
        assert_eq!(file.load(), Ok(later));
        std::fs::write(&file.path, b"NWCS junk").unwrap();
        let error = file.load().unwrap_err();
        assert!(error.contains("d1.consumer"), "{error}");
        file.remove().unwrap();
        assert!(!file.path.exists());
    }

    #[test]
    fn a_crash_at_any_step_of_a_save_leaves_the_old_state_or_the_new() {
        use natswal::io::memory::MemoryFileSystem;
        let old = sample();
        let mut new = sample();
        new.pending = vec![(36, 11, 1)];
        new.delivered = (13, 41);
        let mut outcomes = (0, 0);
        for crash_at in 1..=12u64 {
            for seed in 0..4 {
                let memory = MemoryFileSystem::new();
                memory.make_directory(Path::new("/data")).unwrap();
                memory.sync_directory(Path::new("/")).unwrap();
                let fs: Arc<dyn FileSystem> = Arc::new(memory.clone());
                let file = ConsumerFile::new(fs, Path::new("/data/consumers/orders"), "d1");
                file.save(&old).unwrap();
                memory.crash_after_operations(crash_at);
                let saved = file.save(&new);
                let after: Arc<dyn FileSystem> = Arc::new(memory.crash(seed));
                let reopened = ConsumerFile::new(after, Path::new("/data/consumers/orders"), "d1");
                let found = reopened.load().expect("the old or the new state, whole");
                if found == old {
                    outcomes.0 += 1;
                } else {
                    assert_eq!(found, new, "crash at {crash_at}, seed {seed}");
                    outcomes.1 += 1;
                }
                if saved.is_ok() {
                    assert_eq!(found, new, "a save that returned is durable");
                }
            }
        }
        assert!(outcomes.0 > 0 && outcomes.1 > 0, "{outcomes:?}");
    }
}
