//! All file I/O of the engine goes through [`FileSystem`]: segment files,
//! index files, directories. Three implementations:
//! - [`os::OsFileSystem`] with [`WriteMode::Mmap`] (default): appends are
//!   copies into a shared memory map, durability is `msync(MS_SYNC)`;
//! - [`os::OsFileSystem`] with [`WriteMode::Pwrite`]: `pwrite` + `fdatasync`,
//!   so the two write paths can be measured against each other;
//! - [`memory::MemoryFileSystem`]: for tests; simulates a crash (only synced
//!   bytes are sure to survive, the rest may be torn) and injects faults.
//!
//! Reads are always through [`ReadableFile::bytes`], which hands out
//! `bytes::Bytes` that borrow the map (OS backends) without copying.

pub mod memory;
mod mmap;
pub mod os;
mod pwrite;

use crate::error::Result;
use bytes::Bytes;
use std::path::Path;
use std::sync::Arc;

/// How the OS backend writes segment data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteMode {
    /// Copy into a shared writable map; sync with `msync(MS_SYNC)`.
    #[default]
    Mmap,
    /// `pwrite` into the file; sync with `fdatasync`.
    Pwrite,
}

impl std::str::FromStr for WriteMode {
    type Err = String;

    fn from_str(text: &str) -> std::result::Result<Self, Self::Err> {
        match text {
            "mmap" => Ok(WriteMode::Mmap),
            "pwrite" => Ok(WriteMode::Pwrite),
            other => Err(format!(
                "unknown write mode '{other}' (expected mmap or pwrite)"
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
    /// Creates a new file of `capacity_bytes`, with its blocks allocated
    /// (`fallocate`), so later writes into it cannot fail for lack of space.
    /// Fails if the file exists. The caller syncs the directory.
    fn create_preallocated(
        &self,
        path: &Path,
        capacity_bytes: u64,
    ) -> Result<Arc<dyn WritableFile>>;

    /// Opens an existing file for writing and allocates it up to
    /// `capacity_bytes` (it may have been cut shorter when it was sealed).
    fn open_writable(&self, path: &Path, capacity_bytes: u64) -> Result<Arc<dyn WritableFile>>;

    /// Opens an existing file for zero-copy reading. The handle needs no open
    /// file descriptor once mapped.
    fn open_readable(&self, path: &Path) -> Result<Arc<dyn ReadableFile>>;

    /// Reads a whole small file (indexes, reports).
    fn read(&self, path: &Path) -> Result<Vec<u8>>;

    /// Reads at most `length` bytes from the start of a file.
    fn read_prefix(&self, path: &Path, length: usize) -> Result<Vec<u8>>;

    /// Replaces `path` atomically: writes `path.tmp`, syncs it, renames it
    /// over `path` and syncs the directory.
    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()>;

    /// Removes a file (the caller syncs the directory).
    fn remove(&self, path: &Path) -> Result<()>;

    /// Renames a file (the caller syncs the directory).
    fn rename(&self, from: &Path, to: &Path) -> Result<()>;

    /// Names of the files in a directory, sorted.
    fn list(&self, directory: &Path) -> Result<Vec<String>>;

    /// Creates a directory and its parents, syncing the parent.
    fn create_directory(&self, path: &Path) -> Result<()>;

    /// Makes the directory's entries durable.
    fn sync_directory(&self, path: &Path) -> Result<()>;

    /// Length of a file in bytes.
    fn file_length(&self, path: &Path) -> Result<u64>;

    fn exists(&self, path: &Path) -> bool;

    /// Takes the exclusive lock of a stream directory, held until the guard
    /// drops, so two processes (a server and an offline repair, or two
    /// servers on one data directory) never write one stream. Fails at once
    /// with [`Error::Locked`](crate::Error::Locked) if another holds it.
    /// Backends without other processes need no lock.
    fn lock_directory(&self, _directory: &Path) -> Result<DirectoryLock> {
        Ok(DirectoryLock::default())
    }
}

/// Holds a directory's lock while it lives (the kernel also releases it
/// when the process dies, so a SIGKILL leaves nothing stale).
#[derive(Debug, Default)]
pub struct DirectoryLock {
    _file: Option<std::fs::File>,
}

impl DirectoryLock {
    pub(crate) fn held(file: std::fs::File) -> DirectoryLock {
        DirectoryLock { _file: Some(file) }
    }
}

/// A file being appended to by one writer thread while readers read the
/// part of it that is published.
pub trait WritableFile: Send + Sync {
    /// Copies `bytes` to `position`. The range must lie inside the capacity.
    fn write_at(&self, position: u64, bytes: &[u8]) -> Result<()>;

    /// Writes zeros over `[start, end)`.
    fn zero_range(&self, start: u64, end: u64) -> Result<()>;

    /// Makes `[start, end)` durable. An error here is final: the caller must
    /// never retry and assume durability (fsyncgate).
    fn sync_range(&self, start: u64, end: u64) -> Result<()>;

    /// Makes the file's data and metadata (its length) durable.
    fn sync_all(&self) -> Result<()>;

    /// Sets the file length (cutting a sealed segment to its data).
    fn set_length(&self, length_bytes: u64) -> Result<()>;

    /// Bytes that may be written.
    fn capacity(&self) -> u64;

    /// A read view of the same file.
    fn view(&self) -> Arc<dyn ReadableFile>;

    /// Prepares `[start, end)` for writing ahead of time (maps the pages
    /// writable), so the writer does not stop on page faults. A hint.
    fn prepare_range(&self, _start: u64, _end: u64) {}
}

/// Zero-copy read access to a file.
pub trait ReadableFile: Send + Sync {
    /// Readable length in bytes.
    fn length(&self) -> u64;

    /// The bytes `[start, end)`. The caller guarantees the range is not
    /// written while the returned `Bytes` lives (it lies below the stream's
    /// published position, which only moves forward while the stream is open).
    fn bytes(&self, start: u64, end: u64) -> Result<Bytes>;
}

/// Checks a read range against a length, for implementations.
pub(crate) fn check_range(start: u64, end: u64, length: u64) -> Result<()> {
    if start > end || end > length {
        return Err(crate::error::Error::InvalidInput(format!(
            "read of [{start}, {end}) outside a file of {length} bytes"
        )));
    }
    Ok(())
}
