//! Vsock packet headers (virtio 1.2 §5.10.6) and the glue between descriptor chains and
//! `virtio_vsock::packet::VsockPacket`, which does the chain parsing and the bounds checks
//! against guest memory.

use thiserror::Error;
use virtio_queue::DescriptorChain;
use virtio_vsock::packet::{VsockPacket, PKT_HEADER_SIZE};
use vm_memory::GuestMemoryMmap;

use crate::virtio::len_u32;

/// The host's context id: the only destination the guest may address.
pub const HOST_CID: u64 = 2;
/// Size of the packet header.
pub const HDR_SIZE: usize = PKT_HEADER_SIZE;
/// Largest payload of one packet, both ways (Linux's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PKT_DATA: usize = 64 * 1024;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type this device offers.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (`VIRTIO_VSOCK_OP_*`).
pub mod op {
    /// Connection request.
    pub const REQUEST: u16 = 1;
    /// Connection accepted.
    pub const RESPONSE: u16 = 2;
    /// Connection reset (refused, aborted, or the last step of a close).
    pub const RST: u16 = 3;
    /// No more data one or both ways (see the `SHUTDOWN_*` flags).
    pub const SHUTDOWN: u16 = 4;
    /// Payload.
    pub const RW: u16 = 5;
    /// The sender's `buf_alloc` / `fwd_cnt` changed.
    pub const CREDIT_UPDATE: u16 = 6;
    /// Please send a credit update.
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `VIRTIO_VSOCK_SHUTDOWN_RCV`: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_SEND`: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;
/// Both shutdown flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// A packet header as plain values (the wire format is little-endian and packed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation ([`op`]).
    pub op: u16,
    /// Operation flags (shutdown flags).
    pub flags: u32,
    /// The sender's receive buffer size for this connection.
    pub buf_alloc: u32,
    /// Payload bytes the sender has consumed on this connection (wrapping).
    pub fwd_cnt: u32,
}

impl Header {
    /// The wire format.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Parse the wire format.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }
}

/// Why a packet from the guest, or a receive buffer, was not usable. The packet is dropped
/// (and counted); the device keeps running.
#[derive(Debug, Error)]
pub enum PacketError {
    /// The descriptor chain does not hold a packet (too short, wrong direction, payload
    /// longer than its buffer or than [`MAX_PKT_DATA`], outside guest memory).
    #[error("malformed descriptor chain: {0}")]
    Chain(#[source] virtio_vsock::packet::Error),
    /// The socket type is not `STREAM`.
    #[error("unsupported socket type {0}")]
    Type(u16),
    /// The source is not the guest's CID.
    #[error("source CID {0} is not the guest's")]
    SrcCid(u64),
    /// The destination is not the host (CID 2).
    #[error("destination CID {0} is not the host")]
    DstCid(u64),
    /// Unknown operation code.
    #[error("unknown operation {0}")]
    Op(u16),
    /// A control operation carries a payload.
    #[error("operation {op} carries {len} payload bytes")]
    UnexpectedPayload {
        /// The operation.
        op: u16,
        /// Its `len` field.
        len: u32,
    },
    /// The chain holds fewer readable bytes than a packet header.
    #[error("descriptor chain holds {0} readable bytes, less than a packet header")]
    ShortHeader(usize),
    /// The header's `len` exceeds the chain's readable bytes or the payload limit.
    #[error("payload of {len} bytes does not fit the chain ({avail} bytes left) or the {max}-byte limit")]
    Payload {
        /// The header's `len`.
        len: u32,
        /// Readable bytes after the header.
        avail: usize,
        /// The limit.
        max: usize,
    },
    /// The chain points outside guest memory or overflows.
    #[error("descriptor chain: {0}")]
    Queue(#[source] virtio_queue::Error),
    /// A receive buffer has no room for payload.
    #[error("receive buffer has no room for payload")]
    RxBufferTooSmall,
}

/// Check the fields of a header the guest sent.
pub fn validate(hdr: &Header, guest_cid: u64) -> Result<(), PacketError> {
    if hdr.type_ != TYPE_STREAM {
        return Err(PacketError::Type(hdr.type_));
    }
    if hdr.src_cid != guest_cid {
        return Err(PacketError::SrcCid(hdr.src_cid));
    }
    if hdr.dst_cid != HOST_CID {
        return Err(PacketError::DstCid(hdr.dst_cid));
    }
    if !(op::REQUEST..=op::CREDIT_REQUEST).contains(&hdr.op) {
        return Err(PacketError::Op(hdr.op));
    }
    if hdr.op != op::RW && hdr.len != 0 {
        return Err(PacketError::UnexpectedPayload {
            op: hdr.op,
            len: hdr.len,
        });
    }
    Ok(())
}

/// Parse and validate a tx-queue chain; the payload is copied into `payload` (which must hold
/// [`MAX_PKT_DATA`] bytes) and its length is `hdr.len`.
pub fn read_tx(
    mem: &GuestMemoryMmap,
    chain: &mut DescriptorChain<&GuestMemoryMmap>,
    guest_cid: u64,
    payload: &mut [u8],
) -> Result<Header, PacketError> {
    // Header and payload may be spread over any number of driver-readable descriptors
    // (Linux sends non-linear skbs as one descriptor per page fragment).
    let mut r = virtio_queue::Reader::<()>::new(mem, chain.clone()).map_err(PacketError::Queue)?;
    let mut raw = [0u8; HDR_SIZE];
    if r.available_bytes() < HDR_SIZE {
        return Err(PacketError::ShortHeader(r.available_bytes()));
    }
    std::io::Read::read_exact(&mut r, &mut raw).map_err(|_| PacketError::ShortHeader(0))?;
    let hdr = Header::from_bytes(&raw);
    validate(&hdr, guest_cid)?;
    let len = hdr.len as usize;
    let max = payload.len().min(MAX_PKT_DATA);
    if len > max || len > r.available_bytes() {
        return Err(PacketError::Payload {
            len: hdr.len,
            avail: r.available_bytes(),
            max,
        });
    }
    std::io::Read::read_exact(&mut r, &mut payload[..len]).map_err(|_| PacketError::Payload {
        len: hdr.len,
        avail: 0,
        max,
    })?;
    Ok(hdr)
}

/// A receive buffer the guest posted on the rx queue.
pub struct RxBuffer<'a> {
    pkt: VsockPacket<'a, ()>,
}

impl<'a> RxBuffer<'a> {
    /// Parse an rx-queue chain.
    pub fn new(
        mem: &'a GuestMemoryMmap,
        chain: &mut DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<Self, PacketError> {
        let pkt = VsockPacket::from_rx_virtq_chain(mem, chain, len_u32(MAX_PKT_DATA))
            .map_err(PacketError::Chain)?;
        let buf = RxBuffer { pkt };
        if buf.capacity() == 0 {
            return Err(PacketError::RxBufferTooSmall);
        }
        Ok(buf)
    }

    /// Payload bytes the buffer can take (at most [`MAX_PKT_DATA`]).
    pub fn capacity(&self) -> usize {
        self.pkt
            .data_slice()
            .map_or(0, |d| d.len())
            .min(MAX_PKT_DATA)
    }

    /// Write a packet; returns the bytes written (the used length). `hdr.len` must equal
    /// `data.len()`, and `data` must fit [`RxBuffer::capacity`].
    pub fn write(&mut self, hdr: &Header, data: &[u8]) -> Result<u32, PacketError> {
        if data.len() > self.capacity() || hdr.len as usize != data.len() {
            return Err(PacketError::RxBufferTooSmall);
        }
        self.pkt
            .set_header_from_raw(&hdr.to_bytes())
            .map_err(PacketError::Chain)?;
        if !data.is_empty() {
            if let Some(slice) = self.pkt.data_slice() {
                slice.copy_from(data);
            }
        }
        Ok(len_u32(HDR_SIZE + data.len()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdr() -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1000,
            dst_port: 52,
            len: 0,
            type_: TYPE_STREAM,
            op: op::REQUEST,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trip_matches_wire_layout() {
        let mut h = hdr();
        h.len = 0x0102_0304;
        h.flags = SHUTDOWN_BOTH;
        let b = h.to_bytes();
        assert_eq!(b.len(), 44);
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[24..28], &[4, 3, 2, 1]);
        assert_eq!(&b[30..32], &op::REQUEST.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
    }

    #[test]
    fn validation_rejects_bad_fields() {
        assert!(validate(&hdr(), 3).is_ok());
        let mut h = hdr();
        h.type_ = 2;
        assert!(matches!(validate(&h, 3), Err(PacketError::Type(2))));
        let mut h = hdr();
        h.src_cid = 4;
        assert!(matches!(validate(&h, 3), Err(PacketError::SrcCid(4))));
        let mut h = hdr();
        h.dst_cid = 1;
        assert!(matches!(validate(&h, 3), Err(PacketError::DstCid(1))));
        for bad in [0, 8, u16::MAX] {
            let mut h = hdr();
            h.op = bad;
            assert!(matches!(validate(&h, 3), Err(PacketError::Op(_))));
        }
        let mut h = hdr();
        h.len = 1;
        assert!(matches!(
            validate(&h, 3),
            Err(PacketError::UnexpectedPayload { .. })
        ));
        h.op = op::RW;
        assert!(validate(&h, 3).is_ok());
    }
}
