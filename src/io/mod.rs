//! All file I/O of the engine goes through [`FileSystem`] and [`File`]:
//! segment files, index files, metadata, directories. Two implementations:
//! - [`os::OsFileSystem`]: the real file system. Segment data is written
//!   with `pwrite`/`pwritev` and made durable with `fdatasync`
//!   ([`WriteMode::Pwrite`], the default and the measured fastest), or
//!   copied into a shared writable map and made durable with `msync`
//!   ([`WriteMode::Mmap`]);
//! - [`memory::MemoryFileSystem`]: for tests and the simulator; it can
//!   crash after its k-th operation (what was synced survives, the rest may
//!   be torn), and inject faults (a failed sync once or for good, ENOSPC,
//!   bit flips).
//!
//! Reads are always `pread` into buffers the caller owns ([`read_exact`]):
//! a file cut short by another program is an error naming the file and the
//! position, never a SIGBUS, and no buffer handed to a reader ever aliases
//! memory the writer writes.
//!
//! Multi-step operations ([`FileSystem::write_atomic`],
//! [`FileSystem::create_directory`]) are built from the primitives here, so
//! a crash between any two of their steps is simulated like any other.

pub mod handles;
pub mod memory;
pub mod os;

use crate::error::{Error, Result};
use bytes::Bytes;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How the OS backend writes segment data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteMode {
    /// `pwrite` into the file; sync with `fdatasync`.
    #[default]
    Pwrite,
    /// Copy into a shared writable map of the allocated part of the file;
    /// sync with `msync(MS_SYNC)`. A program that cuts the active segment
    /// while natswal writes it kills natswal with SIGBUS in this mode.
    Mmap,
}

impl std::str::FromStr for WriteMode {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        match text {
            "mmap" => Ok(WriteMode::Mmap),
            "pwrite" => Ok(WriteMode::Pwrite),
            other => Err(format!(
                "unknown write mode '{other}' (expected pwrite or mmap)"
            )),
        }
    }
}

impl std::fmt::Display for WriteMode {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(match self {
            WriteMode::Mmap => "mmap",
            WriteMode::Pwrite => "pwrite",
        })
    }
}

/// The engine's view of a file system.
pub trait FileSystem: Send + Sync + std::fmt::Debug + 'static {
    /// Creates a new, empty file for reading and writing; fails if it
    /// exists. The caller syncs the directory.
    fn create(&self, path: &Path) -> Result<Arc<dyn File>>;

    /// Opens an existing file, for reading and also writing if `writable`.
    fn open(&self, path: &Path, writable: bool) -> Result<Arc<dyn File>>;

    /// Reads a whole small file (indexes, metadata, reports).
    fn read(&self, path: &Path) -> Result<Vec<u8>>;

    /// Removes a file (the caller syncs the directory).
    fn remove(&self, path: &Path) -> Result<()>;

    /// Renames a file, replacing `to` if it exists (the caller syncs the
    /// directories).
    fn rename(&self, from: &Path, to: &Path) -> Result<()>;

    /// Names of the entries (files and directories) of a directory, sorted.
    fn list(&self, directory: &Path) -> Result<Vec<String>>;

    /// Creates one directory whose parent exists (the caller syncs the
    /// parent).
    fn make_directory(&self, path: &Path) -> Result<()>;

    fn is_directory(&self, path: &Path) -> bool;

    /// Makes the directory's entries durable.
    fn sync_directory(&self, path: &Path) -> Result<()>;

    /// Length of a file in bytes.
    fn file_length(&self, path: &Path) -> Result<u64>;

    fn exists(&self, path: &Path) -> bool;

    /// Random bits for salts and nonce epochs: the OS's for real files, the
    /// seed's for the in-memory one (so a simulation replays exactly).
    fn entropy(&self) -> u64;

    /// Takes the exclusive lock of a stream directory, held until the guard
    /// drops, so two processes (a server and an offline repair, or two
    /// servers on one data directory) never write one stream. Fails at once
    /// with [`Error::Locked`] if another holds it. Backends without other
    /// processes need no lock.
    fn lock_directory(&self, _directory: &Path) -> Result<DirectoryLock> {
        Ok(DirectoryLock::default())
    }

    /// A syncer of the whole file system that holds `directory` (Linux
    /// `syncfs`), opened now: it reports every write-back error on that file
    /// system from now on, whichever file it struck. `None`: this backend
    /// has none, and every file is synced on its own.
    fn file_system_sync(&self, _directory: &Path) -> Result<Option<Arc<dyn FileSystemSync>>> {
        Ok(None)
    }

    /// Whether `a` and `b` (both existing) are on one file system, so that
    /// one [`FileSystemSync`] covers the files of both.
    fn same_file_system(&self, _a: &Path, _b: &Path) -> bool {
        false
    }

    /// Takes a shared lock of a directory: any number of holders, none
    /// while someone holds it exclusively. An offline tool working on one
    /// stream of a store takes the store's lock shared, so that it and a
    /// server (which holds it exclusively) exclude each other.
    fn lock_directory_shared(&self, _directory: &Path) -> Result<DirectoryLock> {
        Ok(DirectoryLock::default())
    }

    /// Replaces `path` atomically: writes `path.tmp`, syncs it, renames it
    /// over `path` and syncs the directory. A crash at any step leaves the
    /// old contents or the new ones (and maybe a `.tmp` file, which open
    /// deletes).
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let temporary = temporary_path(path);
        if self.exists(&temporary) {
            self.remove(&temporary)?;
        }
        let written = self.create(&temporary).and_then(|file| {
            file.write_at(0, bytes)?;
            file.sync_all()
        });
        if let Err(error) = written {
            let _ = self.remove(&temporary);
            return Err(error);
        }
        self.rename(&temporary, path)?;
        self.sync_directory(&parent_of(path))
    }

    /// Creates a directory and every missing parent, syncing the parent of
    /// each directory it creates (so the new entries are durable).
    fn create_directory(&self, path: &Path) -> Result<()> {
        let mut missing = Vec::new();
        let mut current = Some(path);
        while let Some(directory) = current {
            if directory.as_os_str().is_empty() || self.is_directory(directory) {
                break;
            }
            missing.push(directory.to_path_buf());
            current = directory.parent();
        }
        for directory in missing.iter().rev() {
            self.make_directory(directory)?;
            self.sync_directory(&parent_of(directory))?;
        }
        Ok(())
    }
}

/// Holds a directory's lock while it lives (the kernel also releases it
/// when the process dies, so a SIGKILL leaves nothing stale).
#[derive(Debug, Default)]
pub struct DirectoryLock {
    _files: Vec<std::fs::File>,
}

impl DirectoryLock {
    pub(crate) fn held(file: std::fs::File) -> DirectoryLock {
        DirectoryLock { _files: vec![file] }
    }

    /// Both locks, held together.
    pub(crate) fn and(mut self, other: DirectoryLock) -> DirectoryLock {
        self._files.extend(other._files);
        self
    }
}

/// Proof that a [`Store`](crate::store::Store) holds the exclusive lock of
/// the directory its streams live in, so a stream it opens needs no lock
/// (and no descriptor) of its own. Only a store can make one.
#[derive(Debug, Clone)]
pub struct StoreLocked {
    _private: (),
}

impl StoreLocked {
    pub(crate) fn new() -> StoreLocked {
        StoreLocked { _private: () }
    }
}

/// Makes everything written to one file system durable in one call: a
/// group commit across the files of many streams.
pub trait FileSystemSync: Send + Sync + std::fmt::Debug {
    /// Syncs every file of the file system (`syncfs`). An error may come
    /// from any file written since the previous call: every write it may
    /// cover is to be taken as lost (never retried, fsyncgate).
    fn sync(&self) -> Result<()>;
}

/// An open file. Positioned reads and writes; any number of threads may
/// read while one writes.
pub trait File: Send + Sync {
    fn path(&self) -> &Path;

    /// Reads up to `buffer.len()` bytes at `position`; fewer only at the end
    /// of the file.
    fn read_at(&self, position: u64, buffer: &mut [u8]) -> Result<usize>;

    /// Writes all of `bytes` at `position`, growing the file if needed.
    fn write_at(&self, position: u64, bytes: &[u8]) -> Result<()>;

    /// Writes `parts` one after another from `position` (`pwritev`).
    fn write_vectored_at(&self, position: u64, parts: &[&[u8]]) -> Result<()> {
        let mut at = position;
        for part in parts {
            self.write_at(at, part)?;
            at += part.len() as u64;
        }
        Ok(())
    }

    /// Makes the data written in `[start, end)` durable (`fdatasync`, or
    /// `msync` of that range in mmap mode). An error here is final: the
    /// caller must never retry and assume durability (fsyncgate).
    fn sync_range(&self, start: u64, end: u64) -> Result<()>;

    /// Makes the file's data and metadata (its length) durable (`fsync`).
    fn sync_all(&self) -> Result<()>;

    /// Sets the file length (cutting a sealed segment to its data).
    fn set_length(&self, length_bytes: u64) -> Result<()>;

    /// `sync_range` makes everything written to the file durable, whatever
    /// the range (`fdatasync` does; `msync` of a range does not).
    fn syncs_whole_file(&self) -> bool {
        false
    }

    /// Writes through this handle that have finished so far: a
    /// [`FileSystemSync`] that begins after this count covers them (see
    /// [`synced_by_file_system`](File::synced_by_file_system)).
    fn writes_finished(&self) -> u64 {
        0
    }

    /// A [`FileSystemSync`] that began after `writes_finished` writes had
    /// finished succeeded: they are durable, as after a whole-file sync.
    fn synced_by_file_system(&self, _writes_finished: u64) {}

    /// Allocates `[0, length_bytes)` (`fallocate`), so that writes inside it
    /// cannot fail for lack of space; grows the file length to it.
    fn allocate(&self, length_bytes: u64) -> Result<()>;

    /// Current length in bytes.
    fn length(&self) -> Result<u64>;
}

/// Reads exactly `[position, position + length)` into a new buffer. A file
/// shorter than that is corruption (something cut it), named with its path.
pub fn read_exact(file: &dyn File, position: u64, length: usize) -> Result<Bytes> {
    let mut buffer = vec![0u8; length];
    let mut filled = 0;
    while filled < length {
        let read = file.read_at(position + filled as u64, &mut buffer[filled..])?;
        if read == 0 {
            return Err(Error::corruption(
                file.path(),
                position + filled as u64,
                format!(
                    "the file ends at byte {}, but {} bytes from byte {position} were expected (was it cut by another program?)",
                    position + filled as u64,
                    length
                ),
            ));
        }
        filled += read;
    }
    Ok(Bytes::from(buffer))
}

/// Reads at most `length` bytes from `position` (fewer at the end).
pub fn read_up_to(file: &dyn File, position: u64, length: usize) -> Result<Bytes> {
    let mut buffer = vec![0u8; length];
    let mut filled = 0;
    while filled < length {
        let read = file.read_at(position + filled as u64, &mut buffer[filled..])?;
        if read == 0 {
            break;
        }
        filled += read;
    }
    buffer.truncate(filled);
    Ok(Bytes::from(buffer))
}

pub(crate) fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

pub(crate) fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".tmp");
    PathBuf::from(name)
}
