//! What a vCPU does after `KVM_RUN` returns: the decisions, separate from the KVM calls that
//! carry them out (in `super`), so they can be tested without `/dev/kvm`.

use kvm_bindings::{
    KVM_INTERNAL_ERROR_EMULATION, KVM_MP_STATE_INIT_RECEIVED, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::VcpuExit;

use super::VcpuShared;
use crate::exit::{VcpuFault, VmExit};
use crate::metrics::VmCounters;
use crate::pvfpu;

/// Next step after one exit.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Run the guest again.
    Continue,
    /// Stop the VM for this reason.
    Exit(VmExit),
    /// `KVM_EXIT_INTERNAL_ERROR`: look at the sub-error (and maybe assist).
    InternalError,
    /// `KVM_RUN` returned EAGAIN: maybe an AP waiting for a SIPI that never comes.
    Again,
    /// The guest asked for an extended-state save or load (paravirtual FPU assist).
    XState(pvfpu::Request),
}

/// Dispatch one exit: port and MMIO accesses go to the buses (an access no device claims
/// reads as all ones and is counted), guest power events end the VM, anything unexpected ends
/// it naming the exit.
pub(crate) fn handle_exit(s: &VcpuShared, id: u32, exit: VcpuExit<'_>) -> Step {
    match exit {
        VcpuExit::IoIn(port, data) => {
            VmCounters::bump(&s.counters.pio_exits);
            if !s.pio.read(u64::from(port), data) {
                unhandled(s, "port read", u64::from(port), Some(data));
            }
            Step::Continue
        }
        VcpuExit::IoOut(port, data) => {
            VmCounters::bump(&s.counters.pio_exits);
            if s.pvfpu {
                if let Some(req) = pvfpu::decode(port, data) {
                    return Step::XState(req);
                }
            }
            if !s.pio.write(u64::from(port), data) {
                unhandled(s, "port write", u64::from(port), None);
            }
            Step::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            VmCounters::bump(&s.counters.mmio_exits);
            if !s.mmio.read(addr, data) {
                unhandled(s, "MMIO read", addr, Some(data));
            }
            Step::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            VmCounters::bump(&s.counters.mmio_exits);
            if !s.mmio.write(addr, data) {
                unhandled(s, "MMIO write", addr, None);
            }
            Step::Continue
        }
        VcpuExit::Intr => {
            VmCounters::bump(&s.counters.run_interrupted);
            Step::Continue
        }
        VcpuExit::InternalError => Step::InternalError,
        other => Step::Exit(stop_reason(id, &other)),
    }
}

/// An access no device claimed: counted; a read sees all ones.
fn unhandled(s: &VcpuShared, what: &str, addr: u64, data: Option<&mut [u8]>) {
    VmCounters::bump(&s.counters.unhandled_accesses);
    tracing::trace!("unhandled {what} {addr:#x}");
    if let Some(d) = data {
        d.fill(0xff);
    }
}

/// Why the VM stops after an exit that is not an access to a device.
fn stop_reason(id: u32, exit: &VcpuExit<'_>) -> VmExit {
    let failed = |fault| VmExit::Failed { vcpu: id, fault };
    match exit {
        VcpuExit::Shutdown => VmExit::TripleFault,
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _) => VmExit::Reset,
        VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _) => VmExit::Shutdown,
        VcpuExit::SystemEvent(other, _) => failed(VcpuFault::UnexpectedExit {
            exit: format!("KVM_EXIT_SYSTEM_EVENT type {other}"),
        }),
        VcpuExit::FailEntry(reason, _) => failed(VcpuFault::FailEntry { reason: *reason }),
        other => failed(VcpuFault::UnexpectedExit {
            exit: exit_name(other),
        }),
    }
}

fn exit_name(exit: &VcpuExit<'_>) -> String {
    match exit {
        VcpuExit::Unknown => "KVM_EXIT_UNKNOWN".into(),
        VcpuExit::Exception => "KVM_EXIT_EXCEPTION".into(),
        VcpuExit::Hypercall(_) => "KVM_EXIT_HYPERCALL".into(),
        VcpuExit::Debug(_) => "KVM_EXIT_DEBUG".into(),
        VcpuExit::Hlt => "KVM_EXIT_HLT".into(),
        VcpuExit::IrqWindowOpen => "KVM_EXIT_IRQ_WINDOW_OPEN".into(),
        VcpuExit::Nmi => "KVM_EXIT_NMI".into(),
        VcpuExit::Unsupported(n) => format!("exit reason {n}"),
        _ => "an unhandled KVM exit".into(),
    }
}

/// What `KVM_RUN` failing with `errno` means: a signal (the kick) runs the loop again, EAGAIN
/// may be an AP to start, anything else ends the VM.
pub(crate) fn run_error(counters: &VmCounters, id: u32, errno: i32) -> Step {
    match errno {
        libc::EINTR => {
            VmCounters::bump(&counters.run_interrupted);
            Step::Continue
        }
        libc::EAGAIN => Step::Again,
        errno => Step::Exit(VmExit::Failed {
            vcpu: id,
            fault: VcpuFault::Run { errno },
        }),
    }
}

/// `KVM_EXIT_INTERNAL_ERROR` with `suberror`: only emulation failures may be assisted
/// (`None`: go on and look at the instruction); any other sub-error ends the VM.
pub(crate) fn internal_error(id: u32, suberror: u32) -> Option<VmExit> {
    (suberror != KVM_INTERNAL_ERROR_EMULATION).then_some(VmExit::Failed {
        vcpu: id,
        fault: VcpuFault::InternalError { suberror },
    })
}

/// An instruction KVM could not emulate that Kestrel completes itself (docs/nested-kvm.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Assist {
    /// `INT3`: skip it and inject #BP, as the CPU would have.
    Int3,
    /// `FWAIT` with no pending x87 exception: a no-op, skip it.
    Fwait,
}

/// Which assist the instruction starting with `bytes` gets, if any.
pub(crate) fn emulation_assist(bytes: &[u8]) -> Option<Assist> {
    match bytes.first() {
        Some(0xcc) => Some(Assist::Int3),
        Some(0x9b) => Some(Assist::Fwait),
        _ => None,
    }
}

/// For an AP that `KVM_RUN` refused with EAGAIN: where to start it (segment, offset), from the
/// warm-reset vector Linux wrote at 0x467 (offset) / 0x469 (segment) before sending INIT.
/// `None` when the vCPU has not received INIT or no vector is there yet (the guest did not
/// ask for a start: wait for the next event).
pub(crate) fn ap_start_vector(
    mp_state: u32,
    offset: Option<u16>,
    segment: Option<u16>,
) -> Option<(u16, u16)> {
    if mp_state != KVM_MP_STATE_INIT_RECEIVED {
        return None;
    }
    match (segment, offset) {
        (Some(s), Some(o)) if (s, o) != (0, 0) => Some((s, o)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};

    use kestrel_devices::{Bus, BusDevice};
    use kvm_bindings::KVM_MP_STATE_RUNNABLE;
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

    use super::*;
    use crate::exit::ExitState;

    /// Records writes; reads return its fill byte.
    struct Probe {
        fill: u8,
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, _: u64, data: &mut [u8]) {
            data.fill(self.fill);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn probe(fill: u8) -> Arc<Mutex<Probe>> {
        Arc::new(Mutex::new(Probe {
            fill,
            writes: Vec::new(),
        }))
    }

    /// Shared state with a port device at 0x3f8..0x400 and an MMIO device at 0xd000_0000.
    fn shared(pvfpu: bool) -> (VcpuShared, Arc<Mutex<Probe>>, Arc<Mutex<Probe>>) {
        let (port, mmio_dev) = (probe(0x11), probe(0x22));
        let mut pio = Bus::new();
        pio.insert(port.clone(), 0x3f8, 8).unwrap();
        let mut mmio = Bus::new();
        mmio.insert(mmio_dev.clone(), 0xd000_0000, 0x1000).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        let s = VcpuShared {
            mem: GuestMemoryAtomic::new(mem),
            pio,
            mmio,
            exit: Arc::new(ExitState::new().unwrap()),
            counters: Arc::default(),
            first_run: std::sync::OnceLock::new(),
            pvfpu,
        };
        (s, port, mmio_dev)
    }

    fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    #[test]
    fn port_accesses_reach_the_bus_and_unclaimed_ones_read_all_ones() {
        let (s, port, _) = shared(false);
        let mut data = [0u8; 1];
        assert_eq!(
            handle_exit(&s, 0, VcpuExit::IoIn(0x3fd, &mut data)),
            Step::Continue
        );
        assert_eq!(data, [0x11]);
        let mut data = [0u8; 2];
        assert_eq!(
            handle_exit(&s, 0, VcpuExit::IoIn(0x80, &mut data)),
            Step::Continue
        );
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(
            handle_exit(&s, 0, VcpuExit::IoOut(0x3f8, b"A")),
            Step::Continue
        );
        assert_eq!(
            handle_exit(&s, 0, VcpuExit::IoOut(0x81, b"B")),
            Step::Continue
        );
        assert_eq!(port.lock().unwrap().writes, vec![(0, b"A".to_vec())]);
        assert_eq!(count(&s.counters.pio_exits), 4);
        assert_eq!(count(&s.counters.unhandled_accesses), 2);
        assert_eq!(count(&s.counters.mmio_exits), 0);
    }

    #[test]
    fn mmio_accesses_reach_the_bus_and_unclaimed_ones_read_all_ones() {
        let (s, _, dev) = shared(false);
        let mut data = [0u8; 4];
        let step = handle_exit(&s, 0, VcpuExit::MmioRead(0xd000_0070, &mut data));
        assert_eq!(step, Step::Continue);
        assert_eq!(data, [0x22; 4]);
        let step = handle_exit(&s, 0, VcpuExit::MmioRead(0xe000_0000, &mut data));
        assert_eq!(step, Step::Continue);
        assert_eq!(data, [0xff; 4]);
        let step = handle_exit(&s, 0, VcpuExit::MmioWrite(0xd000_0050, &[1, 0, 0, 0]));
        assert_eq!(step, Step::Continue);
        let step = handle_exit(&s, 0, VcpuExit::MmioWrite(0xe000_0000, &[1]));
        assert_eq!(step, Step::Continue);
        assert_eq!(dev.lock().unwrap().writes, vec![(0x50, vec![1, 0, 0, 0])]);
        assert_eq!(count(&s.counters.mmio_exits), 4);
        assert_eq!(count(&s.counters.unhandled_accesses), 2);
    }

    #[test]
    fn pvfpu_ports_are_served_only_when_the_assist_is_on() {
        let addr = (0x8000u32 >> 6).to_le_bytes();
        let (on, _, _) = shared(true);
        assert_eq!(
            handle_exit(&on, 0, VcpuExit::IoOut(pvfpu::PORT_SAVE, &addr)),
            Step::XState(pvfpu::Request::Save(GuestAddress(0x8000)))
        );
        assert_eq!(
            handle_exit(&on, 0, VcpuExit::IoOut(pvfpu::PORT_LOAD, &addr)),
            Step::XState(pvfpu::Request::Load(GuestAddress(0x8000)))
        );
        let (off, _, _) = shared(false);
        assert_eq!(
            handle_exit(&off, 0, VcpuExit::IoOut(pvfpu::PORT_SAVE, &addr)),
            Step::Continue
        );
        assert_eq!(count(&off.counters.unhandled_accesses), 1);
    }

    #[test]
    fn guest_power_events_and_faults_end_the_vm_with_their_reason() {
        let (s, _, _) = shared(false);
        let failed = |fault| Step::Exit(VmExit::Failed { vcpu: 3, fault });
        let cases: Vec<(VcpuExit<'_>, Step)> = vec![
            (VcpuExit::Shutdown, Step::Exit(VmExit::TripleFault)),
            (
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, &[]),
                Step::Exit(VmExit::Reset),
            ),
            (
                VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, &[]),
                Step::Exit(VmExit::Shutdown),
            ),
            (
                VcpuExit::SystemEvent(9, &[]),
                failed(VcpuFault::UnexpectedExit {
                    exit: "KVM_EXIT_SYSTEM_EVENT type 9".into(),
                }),
            ),
            (
                VcpuExit::FailEntry(0x21, 0),
                failed(VcpuFault::FailEntry { reason: 0x21 }),
            ),
            (
                VcpuExit::Hlt,
                failed(VcpuFault::UnexpectedExit {
                    exit: "KVM_EXIT_HLT".into(),
                }),
            ),
            (
                VcpuExit::Unsupported(77),
                failed(VcpuFault::UnexpectedExit {
                    exit: "exit reason 77".into(),
                }),
            ),
            (
                VcpuExit::Watchdog,
                failed(VcpuFault::UnexpectedExit {
                    exit: "an unhandled KVM exit".into(),
                }),
            ),
            (VcpuExit::InternalError, Step::InternalError),
        ];
        for (exit, want) in cases {
            let name = format!("{exit:?}");
            assert_eq!(handle_exit(&s, 3, exit), want, "{name}");
        }
        assert_eq!(handle_exit(&s, 3, VcpuExit::Intr), Step::Continue);
        assert_eq!(count(&s.counters.run_interrupted), 1);
    }

    #[test]
    fn run_errors_kicks_continue_eagain_retries_others_fail() {
        let c = VmCounters::default();
        assert_eq!(run_error(&c, 1, libc::EINTR), Step::Continue);
        assert_eq!(count(&c.run_interrupted), 1);
        assert_eq!(run_error(&c, 1, libc::EAGAIN), Step::Again);
        assert_eq!(
            run_error(&c, 1, libc::EFAULT),
            Step::Exit(VmExit::Failed {
                vcpu: 1,
                fault: VcpuFault::Run {
                    errno: libc::EFAULT
                }
            })
        );
    }

    #[test]
    fn only_emulation_failures_of_int3_and_fwait_are_assisted() {
        assert_eq!(internal_error(0, KVM_INTERNAL_ERROR_EMULATION), None);
        assert_eq!(
            internal_error(2, 3),
            Some(VmExit::Failed {
                vcpu: 2,
                fault: VcpuFault::InternalError { suberror: 3 }
            })
        );
        assert_eq!(emulation_assist(&[0xcc]), Some(Assist::Int3));
        assert_eq!(emulation_assist(&[0x9b, 0x90]), Some(Assist::Fwait));
        assert_eq!(emulation_assist(&[0xf3, 0x48, 0x0f, 0xb8]), None);
        assert_eq!(emulation_assist(&[]), None);
    }

    #[test]
    fn aps_start_at_the_warm_reset_vector_once_init_arrived() {
        let init = KVM_MP_STATE_INIT_RECEIVED;
        assert_eq!(
            ap_start_vector(init, Some(0x1234), Some(0x9a)),
            Some((0x9a, 0x1234))
        );
        assert_eq!(ap_start_vector(init, Some(0), Some(0x9a)), Some((0x9a, 0)));
        assert_eq!(
            ap_start_vector(init, Some(0), Some(0)),
            None,
            "no vector yet"
        );
        assert_eq!(ap_start_vector(init, None, Some(0x9a)), None, "unreadable");
        assert_eq!(
            ap_start_vector(KVM_MP_STATE_RUNNABLE, Some(0x1234), Some(0x9a)),
            None,
            "hardware KVM: the SIPI made it runnable"
        );
    }
}
