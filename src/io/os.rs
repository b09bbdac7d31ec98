//! The real file system. Reads are `pread`; segment data is written with
//! `pwrite`/`pwritev` (or, in mmap mode, copied into a shared writable map
//! of the allocated part of the file); directories are synced by the
//! callers after every create, rename and delete.

use super::{DirectoryLock, File, FileSystem, FileSystemSync, WriteMode};
use crate::error::{Error, Result};
use memmap2::MmapRaw;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

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

    fn wrap(&self, file: std::fs::File, path: &Path, writable: bool) -> Arc<dyn File> {
        Arc::new(OsFile {
            file,
            path: path.to_path_buf(),
            map: RwLock::new(None),
            mapped_writes: writable && self.write_mode == WriteMode::Mmap,
            written_outside_map: AtomicBool::new(false),
        })
    }
}

fn io_error(what: &str, path: &Path, error: std::io::Error) -> Error {
    Error::io(format!("{what} {}", path.display()), error)
}

fn open_directory(path: &Path) -> Result<std::fs::File> {
    std::fs::File::open(path).map_err(|error| io_error("cannot open directory", path, error))
}

pub(crate) fn sync_directory_path(path: &Path) -> Result<()> {
    open_directory(path)?
        .sync_all()
        .map_err(|error| io_error("cannot sync directory", path, error))
}

impl FileSystem for OsFileSystem {
    fn create(&self, path: &Path) -> Result<Arc<dyn File>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|error| io_error("cannot create", path, error))?;
        Ok(self.wrap(file, path, true))
    }

    fn open(&self, path: &Path, writable: bool) -> Result<Arc<dyn File>> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|error| io_error("cannot open", path, error))?;
        Ok(self.wrap(file, path, writable))
    }

    fn read(&self, path: &Path) -> Result<Vec<u8>> {
        std::fs::read(path).map_err(|error| io_error("cannot read", path, error))
    }

    fn remove(&self, path: &Path) -> Result<()> {
        std::fs::remove_file(path).map_err(|error| io_error("cannot remove", path, error))
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
            .map_err(|error| io_error("cannot list", directory, error))?;
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|error| io_error("cannot list", directory, error))?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        names.sort();
        Ok(names)
    }

    fn make_directory(&self, path: &Path) -> Result<()> {
        match std::fs::create_dir(path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists && path.is_dir() => {
                Ok(())
            }
            Err(error) => Err(io_error("cannot create directory", path, error)),
        }
    }

    fn is_directory(&self, path: &Path) -> bool {
        path.is_dir()
    }

    fn sync_directory(&self, path: &Path) -> Result<()> {
        sync_directory_path(path)
    }

    fn file_length(&self, path: &Path) -> Result<u64> {
        std::fs::metadata(path)
            .map(|metadata| metadata.len())
            .map_err(|error| io_error("cannot stat", path, error))
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn entropy(&self) -> u64 {
        let mut bytes = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .expect("the operating system's random source works");
        u64::from_le_bytes(bytes)
    }

    fn lock_directory(&self, directory: &Path) -> Result<DirectoryLock> {
        lock_file(directory, libc::LOCK_EX)
    }

    fn lock_directory_shared(&self, directory: &Path) -> Result<DirectoryLock> {
        lock_file(directory, libc::LOCK_SH)
    }

    fn file_system_sync(&self, directory: &Path) -> Result<Option<Arc<dyn FileSystemSync>>> {
        if !syncfs_reports_errors() {
            tracing::warn!("this kernel's syncfs does not report write-back errors (Linux 5.8 and later do): every stream syncs its own files");
            return Ok(None);
        }
        Ok(Some(Arc::new(OsFileSystemSync {
            directory: directory.to_path_buf(),
            file: open_directory(directory)?,
        })))
    }

    fn same_file_system(&self, a: &Path, b: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev(),
            _ => false,
        }
    }
}

/// `syncfs` of the file system holding `directory`, through a descriptor
/// opened before any write it is to cover: the kernel reports to it every
/// write-back error of the file system since it was opened (or since its
/// previous call), exactly once.
#[derive(Debug)]
struct OsFileSystemSync {
    directory: PathBuf,
    file: std::fs::File,
}

impl FileSystemSync for OsFileSystemSync {
    fn sync(&self) -> Result<()> {
        // SAFETY: syncfs(2) on a descriptor this value owns; no memory is
        // passed.
        let result = unsafe { libc::syncfs(self.file.as_raw_fd()) };
        if result != 0 {
            return Err(io_error(
                "cannot sync the file system of",
                &self.directory,
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

/// Linux reports write-back errors to `syncfs` since 5.8; before, it
/// returned success whatever happened.
fn syncfs_reports_errors() -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    kernel_at_least(&release, (5, 8))
}

fn kernel_at_least(release: &str, minimum: (u64, u64)) -> bool {
    let mut parts = release
        .trim()
        .split(|character: char| !character.is_ascii_digit())
        .map(|part| part.parse::<u64>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= minimum
}

/// `flock` of `<directory>/LOCK` with `operation`, without waiting.
fn lock_file(directory: &Path, operation: libc::c_int) -> Result<DirectoryLock> {
    let path = directory.join("LOCK");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|error| io_error("cannot open lock file", &path, error))?;
    // SAFETY: flock(2) on a descriptor this function owns; no memory is
    // passed.
    let result = unsafe { libc::flock(file.as_raw_fd(), operation | libc::LOCK_NB) };
    if result != 0 {
        let error = std::io::Error::last_os_error();
        if error.kind() == std::io::ErrorKind::WouldBlock {
            return Err(Error::Locked { path });
        }
        return Err(io_error("cannot lock", &path, error));
    }
    Ok(DirectoryLock::held(file))
}

/// One open file. In mmap mode a writable segment also has a shared map of
/// its allocated part, which only this file's `write_at` stores into.
struct OsFile {
    file: std::fs::File,
    path: PathBuf,
    map: RwLock<Option<MmapRaw>>,
    mapped_writes: bool,
    /// A write went around the map (beyond it) since the last sync, so the
    /// next sync must be an fdatasync.
    written_outside_map: AtomicBool,
}

impl OsFile {
    fn fdatasync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|error| io_error("fdatasync of", &self.path, error))
    }
}

/// Allocates `[0, length)` of the file so writes into it cannot hit ENOSPC.
fn fallocate(file: &std::fs::File, path: &Path, length: u64) -> Result<()> {
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
            format!("cannot allocate {length} bytes for {}", path.display()),
            error,
        ));
    }
    // The file system cannot fallocate: write zeros so the blocks exist.
    let current = file
        .metadata()
        .map_err(|error| io_error("cannot stat", path, error))?
        .len();
    let zeros = vec![0u8; 1 << 20];
    let mut position = current;
    while position < length {
        let chunk = (length - position).min(zeros.len() as u64) as usize;
        file.write_all_at(&zeros[..chunk], position)
            .map_err(|error| {
                Error::io(
                    format!("cannot allocate {length} bytes for {}", path.display()),
                    error,
                )
            })?;
        position += chunk as u64;
    }
    Ok(())
}

impl File for OsFile {
    fn path(&self) -> &Path {
        &self.path
    }

    fn read_at(&self, position: u64, buffer: &mut [u8]) -> Result<usize> {
        loop {
            match self.file.read_at(buffer, position) {
                Ok(read) => return Ok(read),
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(error) => {
                    return Err(Error::io(
                        format!("cannot read {} at byte {position}", self.path.display()),
                        error,
                    ))
                }
            }
        }
    }

    fn write_at(&self, position: u64, bytes: &[u8]) -> Result<()> {
        let end = position + bytes.len() as u64;
        if self.mapped_writes {
            let map = self
                .map
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(map) = map.as_ref().filter(|map| end <= map.len() as u64) {
                // SAFETY: the destination lies inside the map (checked
                // above). Only this file's writer stores into the map, and
                // nothing hands out references into it: readers use pread,
                // which copies from the page cache.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        map.as_mut_ptr().add(position as usize),
                        bytes.len(),
                    );
                }
                return Ok(());
            }
            self.written_outside_map.store(true, Ordering::Release);
        }
        self.file.write_all_at(bytes, position).map_err(|error| {
            Error::io(
                format!(
                    "pwrite to {} at byte {position} failed",
                    self.path.display()
                ),
                error,
            )
        })
    }

    fn write_vectored_at(&self, position: u64, parts: &[&[u8]]) -> Result<()> {
        if self.mapped_writes {
            let mut at = position;
            for part in parts {
                self.write_at(at, part)?;
                at += part.len() as u64;
            }
            return Ok(());
        }
        pwritev_all(&self.file, &self.path, position, parts)
    }

    fn sync_range(&self, start: u64, end: u64) -> Result<()> {
        if self.mapped_writes {
            let map = self
                .map
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(map) = map.as_ref() {
                let mapped_end = end.min(map.len() as u64);
                if start < mapped_end {
                    map.flush_range(start as usize, (mapped_end - start) as usize)
                        .map_err(|error| {
                            Error::io(
                                format!(
                                    "msync of {} [{start}, {mapped_end}) failed",
                                    self.path.display()
                                ),
                                error,
                            )
                        })?;
                }
                if !self.written_outside_map.swap(false, Ordering::AcqRel) {
                    return Ok(());
                }
            }
        }
        self.fdatasync()
    }

    fn sync_all(&self) -> Result<()> {
        self.file
            .sync_all()
            .map_err(|error| io_error("fsync of", &self.path, error))
    }

    fn syncs_whole_file(&self) -> bool {
        // In mmap mode a range sync is an msync of that range.
        !self.mapped_writes
    }

    fn set_length(&self, length_bytes: u64) -> Result<()> {
        if self.mapped_writes {
            // A map beyond the new end would fault on its next store.
            *self
                .map
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
        }
        self.file
            .set_len(length_bytes)
            .map_err(|error| io_error("cannot set the length of", &self.path, error))
    }

    fn allocate(&self, length_bytes: u64) -> Result<()> {
        fallocate(&self.file, &self.path, length_bytes)?;
        if self.mapped_writes {
            let mut map = self
                .map
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            if map
                .as_ref()
                .is_none_or(|map| (map.len() as u64) < length_bytes)
            {
                let length = usize::try_from(length_bytes)
                    .map_err(|_| Error::InvalidInput(format!("cannot map {length_bytes} bytes")))?;
                *map = Some(
                    memmap2::MmapOptions::new()
                        .len(length)
                        .map_raw(&self.file)
                        .map_err(|error| io_error("cannot map", &self.path, error))?,
                );
            }
        }
        Ok(())
    }

    fn length(&self) -> Result<u64> {
        self.file
            .metadata()
            .map(|metadata| metadata.len())
            .map_err(|error| io_error("cannot stat", &self.path, error))
    }
}

/// `pwritev` of every part, resuming after short writes and EINTR.
fn pwritev_all(file: &std::fs::File, path: &Path, position: u64, parts: &[&[u8]]) -> Result<()> {
    const IOV_MAX: usize = 1024;
    let mut vectors: Vec<libc::iovec> = Vec::with_capacity(parts.len().min(IOV_MAX));
    let mut part_index = 0;
    let mut part_done = 0usize;
    let mut at = position;
    while part_index < parts.len() {
        vectors.clear();
        let mut expected = 0usize;
        for (index, part) in parts.iter().enumerate().skip(part_index).take(IOV_MAX) {
            let skip = if index == part_index { part_done } else { 0 };
            let rest = &part[skip..];
            if rest.is_empty() {
                continue;
            }
            vectors.push(libc::iovec {
                iov_base: rest.as_ptr() as *mut libc::c_void,
                iov_len: rest.len(),
            });
            expected += rest.len();
        }
        if vectors.is_empty() {
            return Ok(());
        }
        let offset = libc::off_t::try_from(at)
            .map_err(|_| Error::InvalidInput(format!("write position {at} is too large")))?;
        // SAFETY: every iovec points into a live slice of `parts`, which
        // outlives this call, and `vectors.len()` is at most IOV_MAX; the
        // kernel only reads from them.
        let written = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                vectors.as_ptr(),
                vectors.len() as libc::c_int,
                offset,
            )
        };
        if written < 0 {
            let error = std::io::Error::last_os_error();
            if error.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(Error::io(
                format!("pwritev to {} at byte {at} failed", path.display()),
                error,
            ));
        }
        if written == 0 {
            return Err(Error::io(
                format!("pwritev to {} at byte {at} wrote nothing", path.display()),
                std::io::Error::from(std::io::ErrorKind::WriteZero),
            ));
        }
        let mut advanced = written as usize;
        debug_assert!(advanced <= expected);
        at += advanced as u64;
        while advanced > 0 && part_index < parts.len() {
            let left = parts[part_index].len() - part_done;
            if advanced >= left {
                advanced -= left;
                part_index += 1;
                part_done = 0;
            } else {
                part_done += advanced;
                advanced = 0;
            }
        }
        while part_index < parts.len() && parts[part_index].len() == part_done {
            part_index += 1;
            part_done = 0;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syncfs_is_trusted_from_linux_5_8() {
        assert!(kernel_at_least("6.18.44-fc-v769\n", (5, 8)));
        assert!(kernel_at_least("5.8.0", (5, 8)));
        assert!(!kernel_at_least("5.7.19-generic", (5, 8)));
        assert!(!kernel_at_least("4.19.0", (5, 8)));
        assert!(!kernel_at_least("garbage", (5, 8)));
    }
}
