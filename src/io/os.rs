//! The real file system: segment files through a shared memory map (or
//! pwrite), durability through msync/fdatasync, directories synced after
//! every create, rename and delete.

use super::{check_range, DirectoryLock, FileSystem, ReadableFile, WritableFile, WriteMode};
use crate::error::{Error, Result};
use bytes::Bytes;
use memmap2::MmapRaw;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The operating system's file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsFileSystem {
    write_mode: WriteMode,
}

impl OsFileSystem {
    pub fn new(write_mode: WriteMode) -> OsFileSystem {
        OsFileSystem { write_mode }
    }

    pub fn write_mode(&self) -> WriteMode {
        self.write_mode
    }

    fn writable(
        &self,
        file: File,
        path: &Path,
        capacity_bytes: u64,
    ) -> Result<Arc<dyn WritableFile>> {
        Ok(match self.write_mode {
            WriteMode::Mmap => Arc::new(super::mmap::MmapFile::new(file, path, capacity_bytes)?),
            WriteMode::Pwrite => {
                Arc::new(super::pwrite::PwriteFile::new(file, path, capacity_bytes)?)
            }
        })
    }
}

/// Allocates `[0, length)` of the file so writes into it cannot hit ENOSPC.
pub(crate) fn allocate(file: &File, path: &Path, length: u64) -> Result<()> {
    let length_signed = i64::try_from(length)
        .map_err(|_| Error::InvalidInput(format!("allocation of {length} bytes is too large")))?;
    // SAFETY: fallocate takes a valid open descriptor and plain integers; it
    // does not touch our memory.
    let status = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, length_signed) };
    if status == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(Error::io(
            format!("cannot preallocate {length} bytes for {}", path.display()),
            error,
        ));
    }
    // The file system cannot fallocate: write zeros so the blocks exist.
    let current = file
        .metadata()
        .map_err(|error| Error::io(format!("cannot stat {}", path.display()), error))?
        .len();
    let zeros = vec![0u8; 1 << 20];
    let mut position = current;
    while position < length {
        let chunk = (length - position).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..chunk], position)
            .map_err(|error| {
                Error::io(
                    format!("cannot preallocate {length} bytes for {}", path.display()),
                    error,
                )
            })?;
        position += chunk as u64;
    }
    Ok(())
}

pub(crate) fn sync_directory_path(path: &Path) -> Result<()> {
    let directory = File::open(path)
        .map_err(|error| Error::io(format!("cannot open directory {}", path.display()), error))?;
    directory
        .sync_all()
        .map_err(|error| Error::io(format!("cannot sync directory {}", path.display()), error))
}

fn parent_of(path: &Path) -> PathBuf {
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

impl FileSystem for OsFileSystem {
    fn create_preallocated(
        &self,
        path: &Path,
        capacity_bytes: u64,
    ) -> Result<Arc<dyn WritableFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|error| Error::io(format!("cannot create {}", path.display()), error))?;
        if let Err(error) = allocate(&file, path, capacity_bytes) {
            // Leave no half-allocated file behind for recovery to puzzle over.
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(error);
        }
        self.writable(file, path, capacity_bytes)
    }

    fn open_writable(&self, path: &Path, capacity_bytes: u64) -> Result<Arc<dyn WritableFile>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|error| Error::io(format!("cannot open {}", path.display()), error))?;
        allocate(&file, path, capacity_bytes)?;
        self.writable(file, path, capacity_bytes)
    }

    fn open_readable(&self, path: &Path) -> Result<Arc<dyn ReadableFile>> {
        let file = File::open(path)
            .map_err(|error| Error::io(format!("cannot open {}", path.display()), error))?;
        Ok(Arc::new(ReadOnlyMap::new(&file, path)?))
    }

    fn read(&self, path: &Path) -> Result<Vec<u8>> {
        std::fs::read(path)
            .map_err(|error| Error::io(format!("cannot read {}", path.display()), error))
    }

    fn read_prefix(&self, path: &Path, length: usize) -> Result<Vec<u8>> {
        let file = File::open(path)
            .map_err(|error| Error::io(format!("cannot open {}", path.display()), error))?;
        let mut bytes = Vec::with_capacity(length);
        file.take(length as u64)
            .read_to_end(&mut bytes)
            .map_err(|error| Error::io(format!("cannot read {}", path.display()), error))?;
        Ok(bytes)
    }

    fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let temporary = temporary_path(path);
        let context = || format!("cannot write {}", temporary.display());
        let mut file = File::create(&temporary).map_err(|error| Error::io(context(), error))?;
        file.write_all(bytes)
            .map_err(|error| Error::io(context(), error))?;
        file.sync_all()
            .map_err(|error| Error::io(format!("cannot sync {}", temporary.display()), error))?;
        drop(file);
        std::fs::rename(&temporary, path).map_err(|error| {
            Error::io(
                format!(
                    "cannot rename {} to {}",
                    temporary.display(),
                    path.display()
                ),
                error,
            )
        })?;
        sync_directory_path(&parent_of(path))
    }

    fn remove(&self, path: &Path) -> Result<()> {
        std::fs::remove_file(path)
            .map_err(|error| Error::io(format!("cannot remove {}", path.display()), error))
    }

    fn rename(&self, from: &Path, to: &Path) -> Result<()> {
        std::fs::rename(from, to).map_err(|error| {
            Error::io(
                format!("cannot rename {} to {}", from.display(), to.display()),
                error,
            )
        })
    }

    fn list(&self, directory: &Path) -> Result<Vec<String>> {
        let entries = std::fs::read_dir(directory)
            .map_err(|error| Error::io(format!("cannot list {}", directory.display()), error))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|error| {
                Error::io(format!("cannot list {}", directory.display()), error)
            })?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn create_directory(&self, path: &Path) -> Result<()> {
        if path.is_dir() {
            return Ok(());
        }
        std::fs::create_dir_all(path).map_err(|error| {
            Error::io(format!("cannot create directory {}", path.display()), error)
        })?;
        sync_directory_path(&parent_of(path))
    }

    fn sync_directory(&self, path: &Path) -> Result<()> {
        sync_directory_path(path)
    }

    fn lock_directory(&self, directory: &Path) -> Result<DirectoryLock> {
        let path = directory.join("LOCK");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|error| {
                Error::io(format!("cannot open lock file {}", path.display()), error)
            })?;
        // SAFETY: flock(2) on a descriptor this function owns; no memory is
        // passed.
        let result = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if result != 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::WouldBlock {
                return Err(Error::Locked { path });
            }
            return Err(Error::io(format!("cannot lock {}", path.display()), error));
        }
        Ok(DirectoryLock::held(file))
    }

    fn file_length(&self, path: &Path) -> Result<u64> {
        std::fs::metadata(path)
            .map(|metadata| metadata.len())
            .map_err(|error| Error::io(format!("cannot stat {}", path.display()), error))
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
}

/// A read-only shared map of a whole file. The descriptor is closed once
/// mapped, so open maps do not hold file handles.
pub(crate) struct ReadOnlyMap {
    map: Option<Arc<MmapRaw>>,
    length: u64,
}

impl ReadOnlyMap {
    fn new(file: &File, path: &Path) -> Result<ReadOnlyMap> {
        let length = file
            .metadata()
            .map_err(|error| Error::io(format!("cannot stat {}", path.display()), error))?
            .len();
        if length == 0 {
            // An empty file cannot be mapped; it has nothing to read anyway.
            return Ok(ReadOnlyMap { map: None, length });
        }
        let map = memmap2::MmapOptions::new()
            .map_raw_read_only(file)
            .map_err(|error| Error::io(format!("cannot map {}", path.display()), error))?;
        Ok(ReadOnlyMap {
            map: Some(Arc::new(map)),
            length,
        })
    }

    pub(crate) fn from_map(map: Arc<MmapRaw>, length: u64) -> ReadOnlyMap {
        ReadOnlyMap {
            map: Some(map),
            length,
        }
    }
}

impl ReadableFile for ReadOnlyMap {
    fn length(&self) -> u64 {
        self.length
    }

    fn bytes(&self, start: u64, end: u64) -> Result<Bytes> {
        check_range(start, end, self.length)?;
        match &self.map {
            Some(map) if start < end => Ok(Bytes::from_owner(MapSlice {
                map: Arc::clone(map),
                start: start as usize,
                end: end as usize,
            })),
            _ => Ok(Bytes::new()),
        }
    }
}

/// Owner of a `Bytes` that borrows a range of a shared map.
struct MapSlice {
    map: Arc<MmapRaw>,
    start: usize,
    end: usize,
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        debug_assert!(self.start <= self.end && self.end <= self.map.len());
        // SAFETY: the range was checked against the mapped length when the
        // slice was made, the map lives as long as `self` (Arc), and the
        // engine never writes a range below its published position, so no
        // one mutates these bytes while this shared slice exists.
        unsafe {
            std::slice::from_raw_parts(self.map.as_ptr().add(self.start), self.end - self.start)
        }
    }
}
