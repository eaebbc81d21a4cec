//! Serving one virtio-fs chain with the FUSE server (on the event loop or a worker thread):
//! the request-size and ioctl checks done before the server sees a chain, and the pass over a
//! queue that both use.

use std::panic::{self, AssertUnwindSafe};

use fuse_backend_rs::abi::fuse_abi::{InHeader, Opcode, OutHeader};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter, Writer};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::server::FuseServer;
use super::{FsMetrics, MAX_REQUEST_BYTES};
use crate::virtio::{len_u32, notify_used, serve_queue, Served, VirtioInterrupt};

/// How one chain ended.
enum Outcome {
    /// Used length to report.
    Done(u32),
    /// The FUSE server panicked; the chain is completed with length 0 and the device fails.
    Panicked,
}

/// Readable and writable bytes of `chain` (each descriptor counted as often as it appears).
fn chain_lengths(chain: &DescriptorChain<&GuestMemoryMmap>) -> (u64, u64) {
    chain.clone().fold((0, 0), |(r, w), d| {
        let len = u64::from(d.len());
        if d.is_write_only() {
            (r, w.saturating_add(len))
        } else {
            (r.saturating_add(len), w)
        }
    })
}

/// The request header at the start of the chain's readable bytes (it may span descriptors),
/// or `None` when they are too short or outside guest memory.
fn peek_header(
    mem: &GuestMemoryMmap,
    chain: &DescriptorChain<&GuestMemoryMmap>,
) -> Option<InHeader> {
    let mut h = InHeader::default();
    let buf = h.as_mut_slice();
    let mut got = 0;
    for d in chain.clone().readable() {
        if got == buf.len() {
            break;
        }
        let n = (d.len() as usize).min(buf.len() - got);
        mem.read_slice(&mut buf[got..got + n], d.addr()).ok()?;
        got += n;
    }
    (got == buf.len()).then_some(h)
}

/// Answer the request of `chain` with `errno` without the FUSE server: the reply header goes
/// to `reply_at` (the first writable descriptor, when it can hold one). FORGET and
/// BATCH_FORGET get no reply, nor does a chain without a readable header.
fn reply_error(
    mem: &GuestMemoryMmap,
    header: Option<&InHeader>,
    reply_at: Option<GuestAddress>,
    errno: i32,
    metrics: &mut FsMetrics,
) -> Outcome {
    let (Some(h), Some(at)) = (header, reply_at) else {
        return Outcome::Done(0);
    };
    if h.opcode == Opcode::Forget as u32 || h.opcode == Opcode::BatchForget as u32 {
        return Outcome::Done(0);
    }
    let len = len_u32(std::mem::size_of::<OutHeader>());
    let out = OutHeader {
        len,
        error: -errno,
        unique: h.unique,
    };
    match mem.write_obj(out, at) {
        Ok(()) => {
            metrics.error_replies += 1;
            Outcome::Done(len)
        }
        Err(_) => Outcome::Done(0),
    }
}

/// Serve one chain with `server`. Returns the used length (the reply's length).
fn serve_chain(
    server: &FuseServer,
    metrics: &mut FsMetrics,
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Outcome {
    // Where the reply's header goes, to count error replies.
    let reply_at = chain
        .clone()
        .writable()
        .next()
        .filter(|d| d.len() as usize >= std::mem::size_of::<OutHeader>())
        .map(|d| d.addr());
    let header = peek_header(mem, &chain);
    // Before anything sized by the chain is built or allocated.
    let (readable, writable) = chain_lengths(&chain);
    let max = u64::from(MAX_REQUEST_BYTES);
    if readable > max || writable > max {
        tracing::debug!(
            "virtio-fs: chain of {readable} readable and {writable} writable bytes refused \
             (limit {max})"
        );
        metrics.oversized_chains += 1;
        return reply_error(mem, header.as_ref(), reply_at, libc::ENOMEM, metrics);
    }
    if header.is_some_and(|h| h.opcode == Opcode::Ioctl as u32) {
        metrics.refused_ioctls += 1;
        return reply_error(mem, header.as_ref(), reply_at, libc::ENOTTY, metrics);
    }
    let reader = Reader::from_descriptor_chain(mem, chain.clone())
        .map_err(|e| format!("unusable readable buffers: {e}"));
    let writer =
        VirtioFsWriter::new(mem, chain).map_err(|e| format!("unusable writable buffers: {e}"));
    match reader.and_then(|r| writer.map(|w| (r, w))) {
        Ok((reader, writer)) => run_server(server, metrics, mem, reader, writer, reply_at),
        Err(e) => {
            tracing::debug!("virtio-fs: {e}");
            metrics.malformed_chains += 1;
            Outcome::Done(0)
        }
    }
}

/// Hand a request to the FUSE server and count how it ended; the reply header at `reply_at`
/// tells an error reply.
fn run_server(
    server: &FuseServer,
    metrics: &mut FsMetrics,
    mem: &GuestMemoryMmap,
    reader: Reader<'_>,
    writer: VirtioFsWriter<'_>,
    reply_at: Option<GuestAddress>,
) -> Outcome {
    // A bug in the FUSE server must not take down the event loop (and every other device of
    // the VM with it): the device fails instead, and a driver reset rebuilds the server.
    let res = panic::catch_unwind(AssertUnwindSafe(|| {
        server.handle_message(reader, Writer::from(writer), None, None)
    }));
    match res {
        Ok(Ok(len)) => {
            let replied = reply_at.filter(|_| len >= std::mem::size_of::<OutHeader>());
            if let Some(h) = replied.and_then(|at| mem.read_obj::<OutHeader>(at).ok()) {
                if h.error != 0 {
                    metrics.error_replies += 1;
                }
            }
            // A reply is at most the chain's writable length, below 4 GiB.
            Outcome::Done(len_u32(len))
        }
        Ok(Err(e)) => {
            tracing::debug!("virtio-fs: request not served: {e}");
            metrics.failed_requests += 1;
            Outcome::Done(0)
        }
        Err(_) => {
            metrics.panics += 1;
            Outcome::Panicked
        }
    }
}

impl FsMetrics {
    pub(super) fn add(&mut self, o: &FsMetrics) {
        self.requests += o.requests;
        self.hiprio_requests += o.hiprio_requests;
        self.worker_requests += o.worker_requests;
        self.error_replies += o.error_replies;
        self.failed_requests += o.failed_requests;
        self.malformed_chains += o.malformed_chains;
        self.queue_errors += o.queue_errors;
        self.panics += o.panics;
        self.interrupts += o.interrupts;
        self.oversized_chains += o.oversized_chains;
        self.refused_ioctls += o.refused_ioctls;
    }
}

/// Serve the available chains of `queue` (at most `limit`), then notify the guest if it wants
/// to be. Returns `Err` with the reason when the ring is broken or the server panicked (the
/// device must then fail), `Ok(true)` when chains are left (the limit was reached).
pub(super) fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    server: &FuseServer,
    interrupt: &VirtioInterrupt,
    metrics: &mut FsMetrics,
    hiprio: bool,
    limit: usize,
) -> Result<bool, String> {
    let pass = serve_queue(queue, mem, limit, |chain| {
        if hiprio {
            metrics.hiprio_requests += 1;
        } else {
            metrics.requests += 1;
        }
        match serve_chain(server, metrics, mem, chain) {
            Outcome::Done(len) => Served::Used(len),
            Outcome::Panicked => Served::UsedAndStop(0),
        }
    });
    if pass.used > 0 && notify_used(queue, mem, interrupt) {
        metrics.interrupts += 1;
    }
    let result = match pass.ring_error {
        Some(why) => Err(why),
        None if pass.stopped => Err("the FUSE server panicked".to_string()),
        None => Ok(pass.limit_reached),
    };
    if result.is_err() && metrics.panics == 0 {
        metrics.queue_errors += 1;
    }
    result
}

/// Tell `hook` of the panics counted in `m` (one pass's counters).
pub(super) fn report_panics(m: &FsMetrics, hook: Option<&crate::DevicePanicHook>) {
    if let Some(hook) = hook {
        for _ in 0..m.panics {
            hook();
        }
    }
}
