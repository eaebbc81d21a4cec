//! Parsing one virtio-blk request from a descriptor chain (virtio 1.2 §5.2.6).
//!
//! Pure: reads the header (and a discard / write-zeroes range) from guest memory, checks every
//! descriptor's direction and that its buffer lies in guest memory, and touches nothing else.
//! The device then executes the [`Request`] against its backend.
//!
//! Layout expected (the one Linux uses): the 16-byte header in the first, device-readable
//! descriptor; data in the descriptors between; the status byte in the first byte of the last,
//! device-writable descriptor.
//!
//! What virtio-queue's [`DescriptorChain`] does and does not check: it stops (yields `None`)
//! at a `next` index beyond the queue size, after `queue size` descriptors (so loops end), at an
//! unreadable descriptor, at a nested or misaligned indirect table and when the chain's total
//! length would pass 2^32 bytes — but it does not say whether it stopped at the real end of the
//! chain. A chain is complete only if its last yielded descriptor has no `NEXT` flag; otherwise
//! it was cut short and its last descriptor is not the status byte, so such a chain gets no
//! status at all ([`ParsedChain::status`] is `None`). It does not check that buffers lie in
//! guest memory: this module does, before any I/O.

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::{QUEUE_SIZE, SECTOR_SIZE};

/// Length of `struct virtio_blk_outhdr`.
pub const HEADER_LEN: u32 = 16;
/// Length of one `struct virtio_blk_discard_write_zeroes`.
pub const RANGE_LEN: u64 = RANGE_BYTES as u64;
const RANGE_BYTES: usize = 16;
/// Longest chain accepted: without `VIRTIO_RING_F_INDIRECT_DESC` a chain cannot hold more
/// descriptors than the queue.
pub const MAX_DESCRIPTORS: usize = QUEUE_SIZE as usize;

/// One guest buffer of a request's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address (checked to be guest memory for `len` bytes).
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// The range of a discard or write-zeroes request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SectorRange {
    /// First sector.
    pub sector: u64,
    /// Number of sectors.
    pub num_sectors: u32,
    /// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
    pub unmap: bool,
}

/// A well-formed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Read `data` (total a multiple of 512 bytes) from `sector` on.
    In {
        /// First sector.
        sector: u64,
        /// Device-writable buffers.
        data: Vec<Segment>,
    },
    /// Write `data` (total a multiple of 512 bytes) at `sector` on.
    Out {
        /// First sector.
        sector: u64,
        /// Device-readable buffers.
        data: Vec<Segment>,
    },
    /// Make completed writes durable.
    Flush,
    /// Write the device's 20-byte serial into `data`.
    GetId {
        /// Device-writable buffers.
        data: Vec<Segment>,
    },
    /// Discard a range.
    Discard(SectorRange),
    /// Zero a range.
    WriteZeroes(SectorRange),
    /// A type the device does not implement (completes with `VIRTIO_BLK_S_UNSUPP`).
    Unsupported(u32),
}

impl Request {
    /// Total length of the data buffers (0 for requests without data).
    pub fn data_len(&self) -> u64 {
        match self {
            Request::In { data, .. } | Request::Out { data, .. } | Request::GetId { data } => {
                data.iter().map(|s| u64::from(s.len)).sum()
            }
            _ => 0,
        }
    }
}

/// Why a chain is not a valid request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain yielded no descriptor (bad head index, unreadable or invalid indirect table).
    #[error("empty descriptor chain")]
    EmptyChain,
    /// More descriptors than a chain can hold.
    #[error("descriptor chain longer than {MAX_DESCRIPTORS} descriptors")]
    TooLong,
    /// The chain stopped before a descriptor without `NEXT` (loop, bad `next` index, bad
    /// indirect table, unreadable descriptor, more than 4 GiB in total).
    #[error("descriptor chain cut short after {0} descriptors")]
    Truncated(usize),
    /// The last descriptor cannot take the status byte (device-readable, empty, or not in
    /// guest memory).
    #[error("last descriptor is not a usable status byte")]
    BadStatus,
    /// Only a status descriptor.
    #[error("no request header")]
    MissingHeader,
    /// The header descriptor is device-writable.
    #[error("request header is device-writable")]
    HeaderWritable,
    /// The header descriptor holds fewer than 16 bytes.
    #[error("request header of {0} bytes, expected {HEADER_LEN}")]
    ShortHeader(u32),
    /// The header is not in guest memory.
    #[error("request header at {0:#x} is not in guest memory")]
    HeaderUnreadable(u64),
    /// A data descriptor has the wrong direction for the request type.
    #[error("data descriptor {0} has the wrong direction")]
    DataDirection(usize),
    /// A data buffer is not entirely guest memory.
    #[error("data descriptor {index} ({addr:#x}+{len:#x}) is not in guest memory")]
    DataNotInMemory {
        /// Position in the chain.
        index: usize,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// Read or write length not a multiple of the sector size.
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    UnalignedLength(u64),
    /// A request that needs data has none.
    #[error("request has no data buffer")]
    MissingData,
    /// Discard / write-zeroes payload is not exactly one 16-byte range.
    #[error("discard/write-zeroes payload of {0} bytes, expected one {RANGE_LEN}-byte range")]
    BadRangePayload(u64),
    /// Discard / write-zeroes with flags the device must refuse.
    #[error("discard/write-zeroes flags {0:#x} not supported")]
    UnsupportedFlags(u32),
}

impl RequestError {
    /// Whether the guest gets `VIRTIO_BLK_S_UNSUPP` (rather than `VIRTIO_BLK_S_IOERR`).
    pub fn is_unsupported(&self) -> bool {
        matches!(self, RequestError::UnsupportedFlags(_))
    }
}

/// A parsed chain: where its status goes (if anywhere) and the request or why it is invalid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedChain {
    /// Head index, for the used ring.
    pub head_index: u16,
    /// The status byte, when the chain has a usable one. `None` means the chain is malformed
    /// beyond answering: it goes on the used ring with length 0.
    pub status: Option<GuestAddress>,
    /// The request.
    pub request: Result<Request, RequestError>,
}

impl ParsedChain {
    /// Bytes the rate limiter's bandwidth bucket charges: the data of reads and writes (other
    /// requests, and malformed ones, cost one operation and no bytes).
    pub fn rate_cost(&self) -> u64 {
        match &self.request {
            Ok(r @ (Request::In { .. } | Request::Out { .. })) => r.data_len(),
            _ => 0,
        }
    }
}

/// Parse one chain. Never panics and never touches memory outside the guest's.
pub fn parse<M>(chain: DescriptorChain<M>) -> ParsedChain
where
    M: Deref,
    M::Target: GuestMemory,
{
    let head_index = chain.head_index();
    let mut chain = chain;
    let mut descs: Vec<Descriptor> = Vec::with_capacity(4);
    let mut too_long = false;
    for d in chain.by_ref() {
        if descs.len() == MAX_DESCRIPTORS {
            too_long = true;
            break;
        }
        descs.push(d);
    }
    let mem = chain.memory();
    let fail = |status, e| ParsedChain {
        head_index,
        status,
        request: Err(e),
    };
    let Some(last) = descs.last() else {
        return fail(None, RequestError::EmptyChain);
    };
    if too_long {
        return fail(None, RequestError::TooLong);
    }
    if last.has_next() {
        return fail(None, RequestError::Truncated(descs.len()));
    }
    if !last.is_write_only() || last.len() == 0 || !mem.check_range(last.addr(), 1) {
        return fail(None, RequestError::BadStatus);
    }
    let status = Some(last.addr());
    ParsedChain {
        head_index,
        status,
        request: parse_request(mem, &descs),
    }
}

/// Parse a chain whose status descriptor (the last) is known to be usable.
fn parse_request<M: GuestMemory + ?Sized>(
    mem: &M,
    descs: &[Descriptor],
) -> Result<Request, RequestError> {
    if descs.len() < 2 {
        return Err(RequestError::MissingHeader);
    }
    let header = descs[0];
    if header.is_write_only() {
        return Err(RequestError::HeaderWritable);
    }
    if header.len() < HEADER_LEN {
        return Err(RequestError::ShortHeader(header.len()));
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, header.addr())
        .map_err(|_| RequestError::HeaderUnreadable(header.addr().0))?;
    let request_type = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    // raw[4..8] is ioprio, unused.
    let sector = u64::from_le_bytes([
        raw[8], raw[9], raw[10], raw[11], raw[12], raw[13], raw[14], raw[15],
    ]);

    let data_descs = &descs[1..descs.len() - 1];
    let writable = match request_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => true,
        VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => false,
        // A flush carries no data; any buffers are ignored, as are those of unknown types.
        VIRTIO_BLK_T_FLUSH => return Ok(Request::Flush),
        other => return Ok(Request::Unsupported(other)),
    };
    let data = segments(mem, data_descs, writable)?;
    let total: u64 = data.iter().map(|s| u64::from(s.len)).sum();
    match request_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            if !total.is_multiple_of(SECTOR_SIZE) {
                return Err(RequestError::UnalignedLength(total));
            }
            if request_type == VIRTIO_BLK_T_IN {
                Ok(Request::In { sector, data })
            } else {
                Ok(Request::Out { sector, data })
            }
        }
        VIRTIO_BLK_T_GET_ID => {
            if total == 0 {
                return Err(RequestError::MissingData);
            }
            Ok(Request::GetId { data })
        }
        _ => {
            let range = read_range(mem, &data, total)?;
            if request_type == VIRTIO_BLK_T_DISCARD {
                Ok(Request::Discard(range))
            } else {
                Ok(Request::WriteZeroes(range))
            }
        }
    }
}

/// The data descriptors as segments, each checked for direction and guest memory.
fn segments<M: GuestMemory + ?Sized>(
    mem: &M,
    descs: &[Descriptor],
    writable: bool,
) -> Result<Vec<Segment>, RequestError> {
    let mut data = Vec::with_capacity(descs.len());
    for (i, d) in descs.iter().enumerate() {
        // Position in the whole chain (the header is 0).
        let index = i + 1;
        if d.is_write_only() != writable {
            return Err(RequestError::DataDirection(index));
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return Err(RequestError::DataNotInMemory {
                index,
                addr: d.addr().0,
                len: d.len(),
            });
        }
        if d.len() > 0 {
            data.push(Segment {
                addr: d.addr(),
                len: d.len(),
            });
        }
    }
    Ok(data)
}

/// Read the single 16-byte range of a discard / write-zeroes request (it may be split over
/// several buffers).
fn read_range<M: GuestMemory + ?Sized>(
    mem: &M,
    data: &[Segment],
    total: u64,
) -> Result<SectorRange, RequestError> {
    if total != RANGE_LEN {
        return Err(RequestError::BadRangePayload(total));
    }
    let mut raw = [0u8; RANGE_BYTES];
    let mut filled = 0usize;
    for s in data {
        let n = s.len as usize;
        // `total` is 16, so every segment fits in what is left of `raw`.
        let dst = raw
            .get_mut(filled..filled + n)
            .ok_or(RequestError::BadRangePayload(total))?;
        mem.read_slice(dst, s.addr)
            .map_err(|_| RequestError::BadRangePayload(total))?;
        filled += n;
    }
    let sector = u64::from_le_bytes([
        raw[0], raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7],
    ]);
    let num_sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
    let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);
    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
        return Err(RequestError::UnsupportedFlags(flags));
    }
    Ok(SectorRange {
        sector,
        num_sectors,
        unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_util::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT};
    use vm_memory::GuestMemoryMmap;

    const W: u16 = VRING_DESC_F_WRITE;
    const N: u16 = VRING_DESC_F_NEXT;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20000)]).unwrap()
    }

    fn header(mem: &GuestMemoryMmap, addr: u64, t: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(addr)).unwrap();
    }

    fn d(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    /// Parse a chain of `descs` (NEXT links set by the mock).
    fn parse_descs(m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> ParsedChain {
        let vq = MockSplitQueue::new(m, 16);
        parse(vq.build_desc_chain(descs).unwrap())
    }

    /// Parse a chain of raw descriptors exactly as given (links untouched), head 0.
    fn parse_raw(m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> ParsedChain {
        let vq = MockSplitQueue::new(m, 16);
        for (i, desc) in descs.iter().enumerate() {
            vq.desc_table()
                .store(u16::try_from(i).unwrap(), *desc)
                .unwrap();
        }
        vq.avail().ring().ref_at(0).unwrap().store(0);
        vq.avail().idx().store(1);
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.iter(m).unwrap().next().unwrap();
        parse(chain)
    }

    #[test]
    fn read_write_flush_get_id() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 7);
        let p = parse_descs(
            &m,
            &[
                d(0x1000, 16, 0),
                d(0x2000, 512, W),
                d(0x2200, 512, W),
                d(0x3000, 1, W),
            ],
        );
        assert_eq!(p.status, Some(GuestAddress(0x3000)));
        let r = p.request.unwrap();
        assert_eq!(r.data_len(), 1024);
        assert!(matches!(r, Request::In { sector: 7, ref data } if data.len() == 2));

        header(&m, 0x1000, VIRTIO_BLK_T_OUT, 1);
        let p = parse_descs(&m, &[d(0x1000, 16, 0), d(0x2000, 1024, 0), d(0x3000, 1, W)]);
        assert!(matches!(p.request, Ok(Request::Out { sector: 1, .. })));

        header(&m, 0x1000, VIRTIO_BLK_T_FLUSH, 0);
        let p = parse_descs(&m, &[d(0x1000, 16, 0), d(0x3000, 1, W)]);
        assert_eq!(p.request, Ok(Request::Flush));

        header(&m, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
        let p = parse_descs(&m, &[d(0x1000, 16, 0), d(0x2000, 20, W), d(0x3000, 1, W)]);
        assert!(matches!(p.request, Ok(Request::GetId { .. })));

        header(&m, 0x1000, 99, 0);
        let p = parse_descs(&m, &[d(0x1000, 16, 0), d(0x3000, 1, W)]);
        assert_eq!(p.request, Ok(Request::Unsupported(99)));
    }

    #[test]
    fn malformed_requests_keep_their_status() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        let cases: Vec<(Vec<RawDescriptor>, RequestError)> = vec![
            (vec![d(0x3000, 1, W)], RequestError::MissingHeader),
            (
                vec![d(0x1000, 16, W), d(0x3000, 1, W)],
                RequestError::HeaderWritable,
            ),
            (
                vec![d(0x1000, 8, 0), d(0x3000, 1, W)],
                RequestError::ShortHeader(8),
            ),
            (
                vec![d(0x1000, 16, 0), d(0x2000, 512, 0), d(0x3000, 1, W)],
                RequestError::DataDirection(1),
            ),
            (
                vec![d(0x1000, 16, 0), d(0x2000, 500, W), d(0x3000, 1, W)],
                RequestError::UnalignedLength(500),
            ),
            (
                vec![d(0x1000, 16, 0), d(0x1f000, 0x2000, W), d(0x3000, 1, W)],
                RequestError::DataNotInMemory {
                    index: 1,
                    addr: 0x1f000,
                    len: 0x2000,
                },
            ),
            (
                vec![d(0xffff_ffff_fff0, 16, 0), d(0x3000, 1, W)],
                RequestError::HeaderUnreadable(0xffff_ffff_fff0),
            ),
        ];
        for (descs, err) in cases {
            let p = parse_descs(&m, &descs);
            assert_eq!(p.status, Some(GuestAddress(0x3000)), "{err}");
            assert_eq!(p.request, Err(err));
        }
        header(&m, 0x1000, VIRTIO_BLK_T_GET_ID, 0);
        let p = parse_descs(&m, &[d(0x1000, 16, 0), d(0x3000, 1, W)]);
        assert_eq!(p.request, Err(RequestError::MissingData));
    }

    #[test]
    fn unusable_status() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        for last in [d(0x3000, 1, 0), d(0x3000, 0, W), d(0x40000, 1, W)] {
            let p = parse_descs(&m, &[d(0x1000, 16, 0), last]);
            assert_eq!(p.status, None);
            assert_eq!(p.request, Err(RequestError::BadStatus));
        }
    }

    #[test]
    fn discard_and_write_zeroes_ranges() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_DISCARD, 0);
        let mut range = [0u8; 16];
        range[..8].copy_from_slice(&5u64.to_le_bytes());
        range[8..12].copy_from_slice(&3u32.to_le_bytes());
        m.write_slice(&range, GuestAddress(0x2000)).unwrap();
        // Split over two buffers.
        let p = parse_descs(
            &m,
            &[
                d(0x1000, 16, 0),
                d(0x2000, 8, 0),
                d(0x2008, 8, 0),
                d(0x3000, 1, W),
            ],
        );
        assert_eq!(
            p.request,
            Ok(Request::Discard(SectorRange {
                sector: 5,
                num_sectors: 3,
                unmap: false
            }))
        );
        header(&m, 0x1000, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        range[12..].copy_from_slice(&1u32.to_le_bytes());
        m.write_slice(&range, GuestAddress(0x2000)).unwrap();
        let p = parse_descs(&m, &[d(0x1000, 16, 0), d(0x2000, 16, 0), d(0x3000, 1, W)]);
        assert_eq!(
            p.request,
            Ok(Request::WriteZeroes(SectorRange {
                sector: 5,
                num_sectors: 3,
                unmap: true
            }))
        );
        range[12..].copy_from_slice(&6u32.to_le_bytes());
        m.write_slice(&range, GuestAddress(0x2000)).unwrap();
        let p = parse_descs(&m, &[d(0x1000, 16, 0), d(0x2000, 16, 0), d(0x3000, 1, W)]);
        let err = p.request.unwrap_err();
        assert_eq!(err, RequestError::UnsupportedFlags(6));
        assert!(err.is_unsupported());
        // Two ranges: more than max_*_seg.
        let p = parse_descs(&m, &[d(0x1000, 16, 0), d(0x2000, 32, 0), d(0x3000, 1, W)]);
        assert_eq!(p.request, Err(RequestError::BadRangePayload(32)));
        let p = parse_descs(&m, &[d(0x1000, 16, 0), d(0x2000, 16, W), d(0x3000, 1, W)]);
        assert_eq!(p.request, Err(RequestError::DataDirection(1)));
    }

    #[test]
    fn broken_chains_get_no_status() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        // A loop: 0 -> 1 -> 0.
        let looped = [
            RawDescriptor::from(Descriptor::new(0x1000, 16, N, 1)),
            RawDescriptor::from(Descriptor::new(0x3000, 1, N | W, 0)),
        ];
        let p = parse_raw(&m, &looped);
        assert_eq!(p.status, None);
        assert_eq!(p.request, Err(RequestError::Truncated(16)));
        // `next` beyond the queue.
        let bad_next = [
            RawDescriptor::from(Descriptor::new(0x1000, 16, N, 200)),
            RawDescriptor::from(Descriptor::new(0x3000, 1, W, 0)),
        ];
        let p = parse_raw(&m, &bad_next);
        assert_eq!(p.request, Err(RequestError::Truncated(1)));
        // An indirect table outside guest memory as the head: nothing is yielded.
        let indirect = [RawDescriptor::from(Descriptor::new(
            0x10_0000_0000,
            64,
            VRING_DESC_F_INDIRECT,
            0,
        ))];
        let p = parse_raw(&m, &indirect);
        assert_eq!(p.request, Err(RequestError::EmptyChain));
        // An indirect table containing an indirect descriptor (forbidden).
        m.write_obj(
            RawDescriptor::from(Descriptor::new(0x8000, 16, VRING_DESC_F_INDIRECT, 0)),
            GuestAddress(0x8000),
        )
        .unwrap();
        let nested = [
            RawDescriptor::from(Descriptor::new(0x1000, 16, N, 1)),
            RawDescriptor::from(Descriptor::new(0x8000, 16, VRING_DESC_F_INDIRECT, 0)),
        ];
        let p = parse_raw(&m, &nested);
        assert_eq!(p.request, Err(RequestError::Truncated(1)));
    }

    #[test]
    fn too_long_chain_via_indirect_table() {
        let m = mem();
        header(&m, 0x1000, VIRTIO_BLK_T_IN, 0);
        // An indirect table of 300 descriptors (more than the queue could hold).
        let n = 300u16;
        for i in 0..n {
            let flags = if i + 1 < n { N | W } else { W };
            m.write_obj(
                RawDescriptor::from(Descriptor::new(0x3000, 1, flags, i + 1)),
                GuestAddress(0x10000 + u64::from(i) * 16),
            )
            .unwrap();
        }
        let table = [RawDescriptor::from(Descriptor::new(
            0x10000,
            u32::from(n) * 16,
            VRING_DESC_F_INDIRECT,
            0,
        ))];
        let p = parse_raw(&m, &table);
        assert_eq!(p.status, None);
        assert_eq!(p.request, Err(RequestError::TooLong));
    }
}
