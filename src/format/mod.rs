//! The on-disk format of docs/FORMAT.md, byte for byte: segment header, batch
//! frame, record and index file. Every decoder here takes untrusted bytes:
//! it checks each length against what remains before reading, never panics,
//! and never allocates more than the input holds.

pub mod frame;
pub mod index;
pub mod intent;
pub mod metadata;
pub mod record;
pub mod segment_header;

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u16 = 2;

/// Width of the zero-padded base offset in segment file names.
const FILE_NAME_DIGITS: usize = 20;

/// Segment file name for a base offset: `00000000000000000042.log`.
pub fn segment_file_name(base_offset: u64) -> String {
    format!("{base_offset:0width$}.log", width = FILE_NAME_DIGITS)
}

/// Index file name for a base offset: `00000000000000000042.idx`.
pub fn index_file_name(base_offset: u64) -> String {
    format!("{base_offset:0width$}.idx", width = FILE_NAME_DIGITS)
}

/// Parses `<20 digits>.log` into a base offset; `None` for anything else.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".log")?;
    if digits.len() != FILE_NAME_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Bounds-checked little-endian reads from a byte slice at fixed positions.
/// Callers check the slice length once; these helpers then cannot panic for
/// positions inside it.
pub(crate) fn read_u16(bytes: &[u8], position: usize) -> u16 {
    u16::from_le_bytes([bytes[position], bytes[position + 1]])
}

pub(crate) fn read_u32(bytes: &[u8], position: usize) -> u32 {
    let mut array = [0u8; 4];
    array.copy_from_slice(&bytes[position..position + 4]);
    u32::from_le_bytes(array)
}

pub(crate) fn read_u64(bytes: &[u8], position: usize) -> u64 {
    let mut array = [0u8; 8];
    array.copy_from_slice(&bytes[position..position + 8]);
    u64::from_le_bytes(array)
}

pub(crate) fn read_i64(bytes: &[u8], position: usize) -> i64 {
    read_u64(bytes, position) as i64
}

pub(crate) fn write_u16(bytes: &mut [u8], position: usize, value: u16) {
    bytes[position..position + 2].copy_from_slice(&value.to_le_bytes());
}

pub(crate) fn write_u32(bytes: &mut [u8], position: usize, value: u32) {
    bytes[position..position + 4].copy_from_slice(&value.to_le_bytes());
}

pub(crate) fn write_u64(bytes: &mut [u8], position: usize, value: u64) {
    bytes[position..position + 8].copy_from_slice(&value.to_le_bytes());
}

pub(crate) fn write_i64(bytes: &mut [u8], position: usize, value: i64) {
    write_u64(bytes, position, value as u64);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_sort_in_offset_order_and_parse_back() {
        let small = segment_file_name(42);
        let large = segment_file_name(1_000_000);
        assert_eq!(small, "00000000000000000042.log");
        assert!(small < large);
        assert_eq!(parse_segment_file_name(&small), Some(42));
        assert_eq!(
            parse_segment_file_name(&segment_file_name(u64::MAX)),
            Some(u64::MAX)
        );
        assert_eq!(parse_segment_file_name("42.log"), None);
        assert_eq!(parse_segment_file_name("0000000000000000004x.log"), None);
        assert_eq!(parse_segment_file_name(&index_file_name(42)), None);
    }
}
