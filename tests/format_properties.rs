//! Property tests of the on-disk format (docs/FORMAT.md sections 2 to 4):
//! frames round-trip, the decoders never panic on random or damaged input,
//! a damaged frame or index is never accepted with different content, and
//! length fields that claim huge sizes cannot make a decoder allocate more
//! than a small multiple of its input.

use bytes::Bytes;
use natswal::format::frame::{
    check_frame, encode_plain_frame, flags, FrameCheck, FrameDefect, FrameHeader,
    FRAME_HEADER_LENGTH,
};
use natswal::format::index::{
    decode_index, encode_index, IndexEntry, IndexHeader, INDEX_ENTRY_LENGTH, INDEX_HEADER_LENGTH,
};
use natswal::format::record::RECORD_OVERHEAD;
use natswal::format::segment_header::{SegmentHeader, SEGMENT_HEADER_LENGTH};
use natswal::Record;
use proptest::collection::vec;
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

// ---------------------------------------------------------------------------
// Allocation counting: every allocation of this test binary goes through
// here; only the bytes asked for on the current thread are counted, so tests
// running in parallel do not disturb each other's measurements.

struct CountingAllocator;

thread_local! {
    // `const` initialization and a type without `Drop`: accessing it never
    // allocates or registers a destructor, so it is safe inside the allocator.
    static ALLOCATED_BYTES: Cell<u64> = const { Cell::new(0) };
}

fn count_allocation(bytes: usize) {
    let _ = ALLOCATED_BYTES.try_with(|total| total.set(total.get() + bytes as u64));
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counting only touches a thread-local integer.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_allocation(layout.size());
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_allocation(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // Counted as a whole new block: what the process may hold at once.
        count_allocation(new_size);
        unsafe { System.realloc(pointer, layout, new_size) }
    }

    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        unsafe { System.dealloc(pointer, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

/// Runs `work` and returns its result and the bytes it allocated on this
/// thread.
fn allocated_by<T>(work: impl FnOnce() -> T) -> (T, u64) {
    let before = ALLOCATED_BYTES.with(Cell::get);
    let result = work();
    let after = ALLOCATED_BYTES.with(Cell::get);
    (result, after - before)
}

/// What decoding `input_length` bytes may allocate: a small multiple of the
/// input, plus room for one error message.
fn allocation_bound(input_length: usize) -> u64 {
    2 * input_length as u64 + 1024
}

// ---------------------------------------------------------------------------
// Helpers.

#[derive(Debug, Clone)]
struct TimedRecord {
    record: Record,
    timestamp_ns: i64,
}

fn timed_record() -> impl Strategy<Value = TimedRecord> {
    (
        vec(0x21u8..0x7f, 1..48),
        vec(any::<u8>(), 0..64),
        vec(any::<u8>(), 0..300),
        any::<i64>(),
    )
        .prop_map(|(subject, headers, payload, timestamp_ns)| TimedRecord {
            record: Record {
                timestamp_ns: 0,
                subject: Bytes::from(subject),
                headers: Bytes::from(headers),
                payload: Bytes::from(payload),
            },
            timestamp_ns,
        })
}

fn build_frame(
    base_offset: u64,
    raft: (u64, u64),
    records: &[TimedRecord],
    extra_flags: u16,
) -> (Vec<u8>, Option<FrameHeader>) {
    let timed: Vec<(Record, i64)> = records
        .iter()
        .map(|timed| (timed.record.clone(), timed.timestamp_ns))
        .collect();
    let bytes = encode_plain_frame(base_offset, &timed, extra_flags, raft.0, raft.1);
    let header = match check_frame(&bytes) {
        FrameCheck::Valid(header) => Some(header),
        _ => None,
    };
    (bytes, header)
}

/// Iterates every record of a frame `check_frame` accepted, to the end,
/// and returns how many decoded. Panics (failing the test) only if the
/// iterator does not stop.
fn drain_records(header: &FrameHeader, frame: &[u8]) -> u64 {
    let frame = Bytes::copy_from_slice(&frame[..header.frame_length as usize]);
    let mut decoded = 0u64;
    let mut items = 0u64;
    for item in header.plain_records(&frame) {
        items += 1;
        assert!(
            items <= u64::from(header.record_count) + 1,
            "record iterator ran past its record count"
        );
        if item.is_ok() {
            decoded += 1;
        }
    }
    decoded
}

/// A frame with a correct checksum around arbitrary header fields and body:
/// what damage that happens to keep the CRC, or a hostile writer, looks like.
#[derive(Debug, Clone)]
struct ForgedFrame {
    flags: u16,
    base_offset: u64,
    record_count: u32,
    body_length_plain: Option<u32>,
    body: Vec<u8>,
}

fn forge(frame: &ForgedFrame) -> Vec<u8> {
    let length = FRAME_HEADER_LENGTH + frame.body.len();
    let mut bytes = vec![0u8; length];
    bytes[0..4].copy_from_slice(b"NWF2");
    bytes[8..12].copy_from_slice(&(length as u32).to_le_bytes());
    bytes[16..24].copy_from_slice(&frame.base_offset.to_le_bytes());
    bytes[24..28].copy_from_slice(&frame.record_count.to_le_bytes());
    let body_length = frame.body_length_plain.unwrap_or(frame.body.len() as u32);
    bytes[28..32].copy_from_slice(&body_length.to_le_bytes());
    bytes[64..66].copy_from_slice(&frame.flags.to_le_bytes());
    bytes[84..86].copy_from_slice(&(FRAME_HEADER_LENGTH as u16).to_le_bytes());
    bytes[FRAME_HEADER_LENGTH..].copy_from_slice(&frame.body);
    let body_crc = crc32c::crc32c(&bytes[FRAME_HEADER_LENGTH..]);
    bytes[12..16].copy_from_slice(&body_crc.to_le_bytes());
    let crc = crc32c::crc32c(&bytes[8..FRAME_HEADER_LENGTH]);
    bytes[4..8].copy_from_slice(&crc.to_le_bytes());
    bytes
}

/// One record's fixed fields with chosen (possibly lying) lengths.
fn forged_record(record_length: u32, subject_length: u16, headers_length: u32) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(RECORD_OVERHEAD);
    bytes.extend_from_slice(&record_length.to_le_bytes());
    bytes.extend_from_slice(&7i64.to_le_bytes());
    bytes.extend_from_slice(&subject_length.to_le_bytes());
    bytes.extend_from_slice(&headers_length.to_le_bytes());
    bytes
}

/// Lengths a hostile record may claim: zero, small, near the record's real
/// size, and huge.
fn claimed_length() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        0u32..64,
        14u32..80,
        Just(u32::MAX / 2),
        Just(u32::MAX - 3),
        Just(u32::MAX),
        any::<u32>(),
    ]
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(usize),
    Overwrite { at: usize, bytes: Vec<u8> },
    Truncate(usize),
    Extend(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        any::<usize>().prop_map(Mutation::FlipBit),
        (any::<usize>(), vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Overwrite { at, bytes }),
        any::<usize>().prop_map(Mutation::Truncate),
        vec(any::<u8>(), 1..64).prop_map(Mutation::Extend),
    ]
}

fn apply(mutation: &Mutation, original: &[u8]) -> Vec<u8> {
    let mut bytes = original.to_vec();
    match mutation {
        Mutation::FlipBit(bit) => {
            let bit = bit % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
        }
        Mutation::Overwrite { at, bytes: new } => {
            let at = at % bytes.len();
            for (index, byte) in new.iter().enumerate() {
                if let Some(slot) = bytes.get_mut(at + index) {
                    *slot = *byte;
                }
            }
        }
        Mutation::Truncate(length) => bytes.truncate(length % bytes.len()),
        Mutation::Extend(tail) => bytes.extend_from_slice(tail),
    }
    bytes
}

fn index_strategy() -> impl Strategy<Value = (IndexHeader, Vec<IndexEntry>)> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<i64>(),
        any::<i64>(),
        any::<u32>(),
        any::<u64>(),
        any::<bool>(),
        vec((0u32..1000, 1u32..5000, 0i64..1_000_000), 0..40),
    )
        .prop_map(
            |(base_offset, next_offset, first, last, crc, records, sealed, steps)| {
                let mut entries = Vec::with_capacity(steps.len());
                let (mut relative, mut position, mut time) = (0u32, 64u32, i64::MIN);
                for (index, (offset_step, position_step, time_step)) in
                    steps.into_iter().enumerate()
                {
                    if index > 0 {
                        relative += offset_step;
                        position += position_step;
                        time = if time == i64::MIN {
                            time_step
                        } else {
                            time + time_step
                        };
                    }
                    entries.push(IndexEntry {
                        relative_offset: relative,
                        position,
                        timestamp_max_before: time,
                        relative_raft_index: relative / 2,
                    });
                }
                let header = IndexHeader {
                    flags: u32::from(sealed),
                    base_offset,
                    next_offset,
                    data_length: u64::from(position) + 1 + (records % 100_000),
                    first_timestamp_ns: first,
                    last_timestamp_ns: last,
                    segment_crc: crc,
                    record_count: records,
                    salt: base_offset ^ next_offset,
                    first_raft_index: records / 3,
                    last_raft_term: records / 5,
                    last_raft_index: records / 2,
                };
                (header, entries)
            },
        )
}

// ---------------------------------------------------------------------------
// (a) Round trips.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn frames_round_trip(
        records in vec(timed_record(), 1..20),
        base_offset in prop_oneof![0u64..1 << 40, any::<u64>()],
        raft in (any::<u64>(), any::<u64>()),
        atomic in any::<bool>(),
        trailing in vec(any::<u8>(), 0..32),
    ) {
        let extra_flags = if atomic { flags::ATOMIC } else { 0 };
        let (bytes, built) = build_frame(base_offset, raft, &records, extra_flags);
        // Whatever follows a frame (the next slot, zeros) does not change it.
        let mut followed = bytes.clone();
        followed.extend_from_slice(&trailing);
        let overflows = base_offset.checked_add(records.len() as u64).is_none();
        let header = match check_frame(&followed) {
            FrameCheck::Valid(header) => header,
            FrameCheck::Unsupported(reason) if overflows => {
                prop_assert!(reason.contains("overflow"), "{}", reason);
                return Ok(());
            }
            other => return Err(TestCaseError::fail(format!("frame not valid: {other:?}"))),
        };
        prop_assert!(!overflows, "a frame whose offsets overflow was accepted");
        prop_assert_eq!(Some(header), built);
        prop_assert_eq!(header.frame_length as usize, bytes.len());
        prop_assert_eq!(header.body_length_plain as usize, bytes.len() - FRAME_HEADER_LENGTH);
        prop_assert_eq!(header.base_offset, base_offset);
        prop_assert_eq!(header.record_count as usize, records.len());
        prop_assert_eq!((header.raft_term, header.raft_index), raft);
        prop_assert_eq!(header.is_atomic(), atomic);
        prop_assert_eq!(header.first_timestamp_ns, records[0].timestamp_ns);
        prop_assert_eq!(
            header.last_timestamp_ns,
            records.iter().map(|timed| timed.timestamp_ns).max().unwrap()
        );
        let decoded: Vec<_> = header
            .plain_records(&Bytes::from(followed))
            .collect::<Result<_, _>>()
            .map_err(TestCaseError::fail)?;
        prop_assert_eq!(decoded.len(), records.len());
        for (index, (got, want)) in decoded.iter().zip(&records).enumerate() {
            prop_assert_eq!(got.offset, base_offset + index as u64);
            prop_assert_eq!(got.timestamp_ns, want.timestamp_ns);
            prop_assert_eq!(&got.subject, &want.record.subject);
            prop_assert_eq!(&got.headers, &want.record.headers);
            prop_assert_eq!(&got.payload, &want.record.payload);
        }
    }

    #[test]
    fn indexes_and_segment_headers_round_trip(
        (header, entries) in index_strategy(),
        segment in (any::<u64>(), any::<i64>(), any::<u32>(), any::<u8>(), any::<u64>()),
    ) {
        let bytes = encode_index(&header, &entries);
        prop_assert_eq!(decode_index(&bytes), Ok((header, entries)));
        let segment = SegmentHeader {
            base_offset: segment.0,
            created_at_ns: segment.1,
            key_id: segment.2,
            compression: segment.3,
            cipher: segment.3.wrapping_add(1),
            salt: segment.4,
        };
        let encoded = segment.encode();
        prop_assert_eq!(encoded.len(), SEGMENT_HEADER_LENGTH);
        prop_assert_eq!(SegmentHeader::decode(&encoded, Path::new("x.log")).unwrap(), segment);
    }
}

// ---------------------------------------------------------------------------
// (b) Random and damaged input.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn random_bytes_never_panic_the_decoders(
        bytes in vec(any::<u8>(), 0..600),
        prefix in prop_oneof![Just(&b""[..]), Just(&b"NWF2"[..]), Just(&b"NATSWALI"[..]), Just(&b"NATSWALS"[..])],
    ) {
        let mut input = prefix.to_vec();
        input.extend_from_slice(&bytes);
        if let FrameCheck::Valid(header) = check_frame(&input) {
            drain_records(&header, &input);
        }
        let _ = decode_index(&input);
        let _ = SegmentHeader::decode(&input, Path::new("random.log"));
    }

    #[test]
    fn damaged_frames_are_never_accepted_with_other_content(
        records in vec(timed_record(), 1..8),
        base_offset in 0u64..1 << 40,
        mutations in vec(mutation(), 1..4),
    ) {
        let (original, built) = build_frame(base_offset, (0, 0), &records, 0);
        let built = built.expect("a built frame is valid");
        let mut damaged = original.clone();
        for mutation in &mutations {
            if damaged.is_empty() {
                break;
            }
            damaged = apply(mutation, &damaged);
        }
        match check_frame(&damaged) {
            FrameCheck::Valid(header) => {
                // Only an unchanged frame (maybe with bytes after it) passes.
                prop_assert_eq!(header, built);
                prop_assert_eq!(&damaged[..original.len()], &original[..]);
                prop_assert_eq!(drain_records(&header, &damaged), records.len() as u64);
            }
            FrameCheck::Defect(_) | FrameCheck::Unsupported(_) => {}
        }
    }

    #[test]
    fn damaged_indexes_and_headers_are_never_accepted_with_other_content(
        (header, entries) in index_strategy(),
        mutations in vec(mutation(), 1..4),
    ) {
        let original = encode_index(&header, &entries);
        let mut damaged = original.clone();
        for mutation in &mutations {
            if damaged.is_empty() {
                break;
            }
            damaged = apply(mutation, &damaged);
        }
        if let Ok(decoded) = decode_index(&damaged) {
            prop_assert_eq!(&damaged, &original);
            prop_assert_eq!(decoded, (header, entries));
        }
        let segment = SegmentHeader { base_offset: header.base_offset, created_at_ns: 5, key_id: 0, compression: 0, cipher: 0, salt: 9 };
        let encoded = segment.encode();
        let mut damaged = encoded.to_vec();
        for mutation in &mutations {
            if damaged.is_empty() {
                break;
            }
            damaged = apply(mutation, &damaged);
        }
        if let Ok(decoded) = SegmentHeader::decode(&damaged, Path::new("x.log")) {
            prop_assert_eq!(&damaged[..SEGMENT_HEADER_LENGTH], &encoded[..]);
            prop_assert_eq!(decoded, segment);
        }
    }

    /// Frames whose checksum is right but whose header and records lie:
    /// the checks and the record iterator stop with an error, never panic,
    /// never run past the body, and allocate only in proportion to the input.
    #[test]
    fn forged_frames_with_valid_checksums_are_decoded_safely(
        flags in prop_oneof![Just(0u16), Just(flags::ATOMIC), any::<u16>()],
        base_offset in prop_oneof![0u64..1000, Just(u64::MAX - 1), any::<u64>()],
        record_count in prop_oneof![1u32..4, Just(u32::MAX), any::<u32>()],
        lie_about_body in any::<bool>(),
        records in vec((claimed_length(), any::<u16>(), claimed_length(), vec(any::<u8>(), 0..40), any::<bool>()), 1..6),
        body_length_seed in any::<u32>(),
    ) {
        let mut body = Vec::new();
        for (record_length, subject_length, headers_length, rest, honest) in &records {
            if *honest {
                // A well-formed record among the forged ones.
                let subject_length = (*subject_length as usize % 8) + 1;
                let mut rest = rest.clone();
                rest.resize(rest.len().max(subject_length), b'a');
                body.extend_from_slice(&forged_record((14 + rest.len()) as u32, subject_length as u16, 0));
                body.extend_from_slice(&rest);
            } else {
                body.extend_from_slice(&forged_record(*record_length, *subject_length, *headers_length));
                body.extend_from_slice(rest);
            }
        }
        let forged = ForgedFrame {
            flags,
            base_offset,
            record_count,
            body_length_plain: lie_about_body.then_some(body_length_seed),
            body,
        };
        let bytes = forge(&forged);
        let (check, allocated) = allocated_by(|| {
            let check = check_frame(&bytes);
            if let FrameCheck::Valid(header) = &check {
                let body = Bytes::copy_from_slice(&bytes);
                let mut items = 0u64;
                for item in header.plain_records(&body) {
                    items += 1;
                    if items > u64::from(header.record_count) + 1 {
                        return Err(items);
                    }
                    drop(item);
                }
            }
            Ok(check)
        });
        let check = check.map_err(|items| TestCaseError::fail(format!("iterator yielded {items} items")))?;
        prop_assert!(
            allocated <= allocation_bound(bytes.len()),
            "{} bytes allocated decoding a {}-byte forged frame ({:?})",
            allocated, bytes.len(), check
        );
        if let FrameCheck::Valid(header) = check {
            prop_assert_eq!(header.flags & !flags::KNOWN, 0);
            prop_assert!(header.base_offset.checked_add(u64::from(header.record_count)).is_some());
        }
    }

    /// Indexes whose checksums are right but whose counts and entries lie.
    #[test]
    fn forged_indexes_with_valid_checksums_are_decoded_safely(
        (header, entries) in index_strategy(),
        claimed_entries in prop_oneof![Just(u32::MAX), Just(u32::MAX / 16), any::<u32>(), 0u32..50],
        shuffle in any::<bool>(),
    ) {
        let mut bytes = encode_index(&header, &entries);
        bytes[56..60].copy_from_slice(&claimed_entries.to_le_bytes());
        if shuffle && bytes.len() > INDEX_HEADER_LENGTH + 2 * INDEX_ENTRY_LENGTH + 4 {
            // Swap two entries and fix the entries checksum: out of order.
            let (first, second) = (INDEX_HEADER_LENGTH, INDEX_HEADER_LENGTH + INDEX_ENTRY_LENGTH);
            let copy = bytes[first..first + INDEX_ENTRY_LENGTH].to_vec();
            bytes.copy_within(second..second + INDEX_ENTRY_LENGTH, first);
            bytes[second..second + INDEX_ENTRY_LENGTH].copy_from_slice(&copy);
            let end = bytes.len() - 4;
            let crc = crc32c::crc32c(&bytes[INDEX_HEADER_LENGTH..end]);
            bytes[end..].copy_from_slice(&crc.to_le_bytes());
        }
        let crc = crc32c::crc32c(&bytes[..124]);
        bytes[124..128].copy_from_slice(&crc.to_le_bytes());
        let (decoded, allocated) = allocated_by(|| decode_index(&bytes));
        prop_assert!(
            allocated <= allocation_bound(bytes.len()),
            "{} bytes allocated decoding a {}-byte index claiming {} entries",
            allocated, bytes.len(), claimed_entries
        );
        if let Ok((_, decoded_entries)) = decoded {
            prop_assert_eq!(decoded_entries.len() as u32, claimed_entries);
            prop_assert_eq!(bytes.len(), INDEX_HEADER_LENGTH + decoded_entries.len() * INDEX_ENTRY_LENGTH + 4);
            for pair in decoded_entries.windows(2) {
                prop_assert!(pair[0].position < pair[1].position);
                prop_assert!(pair[0].relative_offset <= pair[1].relative_offset);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// (c) Allocation bounds for specific hostile length fields.

#[test]
fn frame_claiming_four_gib_allocates_nothing_large() {
    let records: Vec<_> = (0..40)
        .map(|index| TimedRecord {
            record: Record::new(format!("orders.{index}"), vec![b'x'; 100]),
            timestamp_ns: index,
        })
        .collect();
    let (mut bytes, _) = build_frame(0, (0, 0), &records, 0);
    bytes[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    let plain = u32::MAX - FRAME_HEADER_LENGTH as u32;
    bytes[28..32].copy_from_slice(&plain.to_le_bytes());
    // The header checksum is right: only the length check stands in the way.
    let crc = crc32c::crc32c(&bytes[8..FRAME_HEADER_LENGTH]);
    bytes[4..8].copy_from_slice(&crc.to_le_bytes());
    let (check, allocated) = allocated_by(|| check_frame(&bytes));
    assert_eq!(
        check,
        FrameCheck::Defect(FrameDefect::Incomplete {
            frame_length: u64::from(u32::MAX),
            available: bytes.len() as u64
        })
    );
    assert!(
        allocated <= allocation_bound(bytes.len()),
        "{allocated} bytes allocated for a {}-byte input",
        bytes.len()
    );
}

#[test]
fn index_claiming_u32_max_entries_allocates_nothing_large() {
    let entries: Vec<_> = (0..200u32)
        .map(|index| IndexEntry {
            relative_offset: index * 10,
            position: 64 + index * 1000,
            timestamp_max_before: i64::from(index),
            relative_raft_index: index,
        })
        .collect();
    let header = IndexHeader {
        flags: 1,
        base_offset: 0,
        next_offset: 2000,
        data_length: 1_000_000,
        first_timestamp_ns: 0,
        last_timestamp_ns: 200,
        segment_crc: 0,
        record_count: 2000,
        salt: 3,
        first_raft_index: 1,
        last_raft_term: 1,
        last_raft_index: 200,
    };
    let mut bytes = encode_index(&header, &entries);
    bytes[56..60].copy_from_slice(&u32::MAX.to_le_bytes());
    // The header checksum is right: only the length check stands in the way.
    let crc = crc32c::crc32c(&bytes[..124]);
    bytes[124..128].copy_from_slice(&crc.to_le_bytes());
    let (decoded, allocated) = allocated_by(|| decode_index(&bytes));
    let error = decoded.unwrap_err();
    assert!(error.contains("4294967295 entries"), "{error}");
    assert!(
        allocated <= allocation_bound(bytes.len()),
        "{allocated} bytes allocated for a {}-byte index",
        bytes.len()
    );
}

#[test]
fn records_claiming_huge_lengths_in_a_valid_frame_allocate_nothing_large() {
    let honest = {
        let mut record = forged_record(14 + 1000, 5, 0);
        record.extend_from_slice(&[b's'; 1000]);
        record
    };
    let hostile_records = [
        // Subject and headers lengths far beyond the record and the body.
        forged_record(u32::MAX, u16::MAX, u32::MAX),
        forged_record(4000, u16::MAX, u32::MAX),
        forged_record(4000, 5, u32::MAX - 10),
        forged_record(u32::MAX - 3, 5, 0),
    ];
    for hostile in &hostile_records {
        for record_count in [2u32, 3, 1000, u32::MAX] {
            let mut body = Vec::new();
            body.extend_from_slice(&honest);
            body.extend_from_slice(hostile);
            body.resize(body.len() + 3000, 0x41);
            let bytes = forge(&ForgedFrame {
                flags: 0,
                base_offset: 10,
                record_count,
                body_length_plain: None,
                body,
            });
            let (outcome, allocated) = allocated_by(|| {
                let FrameCheck::Valid(header) = check_frame(&bytes) else {
                    panic!("the forged frame has a valid checksum");
                };
                let frame = Bytes::copy_from_slice(&bytes);
                let mut good = 0u32;
                let mut errors = Vec::new();
                for item in header.plain_records(&frame).take(10) {
                    match item {
                        Ok(_) => good += 1,
                        Err(reason) => errors.push(reason),
                    }
                }
                (good, errors)
            });
            let (good, errors) = outcome;
            assert_eq!(good, 1, "only the honest record decodes");
            assert_eq!(errors.len(), 1, "one error, then the iterator stops");
            assert!(
                allocated <= allocation_bound(bytes.len()),
                "{allocated} bytes allocated for a {}-byte frame: {errors:?}",
                bytes.len()
            );
        }
    }
}

#[test]
fn segment_header_decoding_allocates_only_for_its_error() {
    let header = SegmentHeader {
        base_offset: 1,
        created_at_ns: 2,
        key_id: 0,
        compression: 0,
        cipher: 0,
        salt: 4,
    }
    .encode();
    let mut damaged = header.to_vec();
    damaged.resize(4096, 0xff);
    damaged[20] ^= 1;
    let (result, allocated) = allocated_by(|| SegmentHeader::decode(&damaged, Path::new("x.log")));
    assert!(result.unwrap_err().is_corruption());
    assert!(allocated <= 1024, "{allocated} bytes allocated");
}

#[test]
fn the_allocation_counter_counts() {
    // Guards the measurements above: a real allocation is seen.
    let (vector, allocated) = allocated_by(|| vec![0u8; 1 << 20]);
    assert_eq!(vector.len(), 1 << 20);
    assert!(allocated >= 1 << 20, "{allocated}");
}
