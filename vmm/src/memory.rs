//! Guest memory: boot RAM and hot-pluggable blocks, each one KVM memory slot.
//!
//! Memory is anonymous `MAP_PRIVATE|MAP_NORESERVE` by default, or memfd-backed `MAP_SHARED` when
//! a vhost-user backend must map it too. Devices see it through a [`GuestMem`]
//! (`GuestMemoryAtomic`), so adding or removing a block publishes a new layout without stopping
//! them.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use kestrel_arch::layout;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    FileOffset, GuestAddress, GuestAddressSpace, GuestMemory, GuestMemoryAtomic, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress,
};

/// Guest memory as devices and vCPUs see it.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;

/// Memory hotplug failures.
#[derive(Debug, Error)]
pub enum MemoryError {
    /// The VM has no hotplug region (`max_mem_size_mib` absent or equal to the boot size).
    #[error("memory hotplug is not enabled (machine-config.max_mem_size_mib)")]
    NoHotplugRegion,
    /// Size is zero or not a multiple of the block size.
    #[error("{size:#x} bytes is not a positive multiple of the {block:#x}-byte memory block")]
    BadSize {
        /// Requested size.
        size: u64,
        /// Block size.
        block: u64,
    },
    /// No free range of that size is left in the hotplug region.
    #[error(
        "no free {size:#x}-byte range left in the hotplug region ({used:#x} of {total:#x} used)"
    )]
    NoSpace {
        /// Requested size.
        size: u64,
        /// Bytes plugged.
        used: u64,
        /// Region size.
        total: u64,
    },
    /// No plugged block range starts at that address with that size.
    #[error("no plugged memory at {addr:#x} of {size:#x} bytes")]
    NotPlugged {
        /// Address.
        addr: u64,
        /// Size.
        size: u64,
    },
    /// mmap/memfd failed.
    #[error("cannot map {size:#x} bytes of guest memory: {source}")]
    Map {
        /// Size.
        size: u64,
        /// Error.
        #[source]
        source: std::io::Error,
    },
    /// vm-memory rejected the new layout.
    #[error("guest memory layout: {0}")]
    Layout(String),
    /// KVM refused the slot change.
    #[error("KVM_SET_USER_MEMORY_REGION (slot {slot}): {source}")]
    Kvm {
        /// Slot.
        slot: u32,
        /// Error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

fn memfd(size: u64) -> Result<File, MemoryError> {
    let map_err = |source| MemoryError::Map { size, source };
    // SAFETY: the name is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(c"kestrel-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(map_err(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a freshly created, owned file descriptor.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).map_err(map_err)?;
    Ok(f)
}

fn new_region(addr: u64, size: u64, shared: bool) -> Result<GuestRegionMmap, MemoryError> {
    let map_err = |e: vm_memory::mmap::MmapRegionError| MemoryError::Map {
        size,
        source: std::io::Error::other(e.to_string()),
    };
    let len = usize::try_from(size).map_err(|_| MemoryError::Map {
        size,
        source: std::io::Error::other("larger than the address space"),
    })?;
    let mapping = if shared {
        MmapRegion::from_file(FileOffset::new(memfd(size)?, 0), len).map_err(map_err)?
    } else {
        MmapRegion::new(len).map_err(map_err)?
    };
    GuestRegionMmap::new(mapping, GuestAddress(addr))
        .ok_or_else(|| MemoryError::Layout(format!("region {addr:#x}+{size:#x} overflows")))
}

fn set_slot(vm: &VmFd, slot: u32, addr: u64, size: u64, host: u64) -> Result<(), MemoryError> {
    let r = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: addr,
        memory_size: size,
        userspace_addr: host,
    };
    // SAFETY: `host..host+size` is a live mapping owned by the guest memory object, which keeps
    // it mapped at least until the slot is deleted (size 0) or the VM fd is closed.
    unsafe { vm.set_user_memory_region(r) }.map_err(|source| MemoryError::Kvm { slot, source })
}

fn host_addr(r: &GuestRegionMmap) -> u64 {
    r.get_host_address(MemoryRegionAddress(0))
        .map(|p| p as u64)
        .unwrap_or(0)
}

/// A plugged block range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PluggedRange {
    /// Guest-physical address.
    pub addr: u64,
    /// Bytes.
    pub size: u64,
    slot: u32,
}

/// Owns the guest's memory layout and its KVM slots.
pub(crate) struct MemoryManager {
    mem: GuestMem,
    shared: bool,
    hotplug: Option<(u64, u64)>,
    plugged: BTreeMap<u64, PluggedRange>,
    next_slot: u32,
    free_slots: Vec<u32>,
}

impl MemoryManager {
    /// Map boot RAM (`mem_size` bytes) and register it with KVM.
    pub(crate) fn new(
        vm: &VmFd,
        mem_size: u64,
        max_mem_size: u64,
        shared: bool,
    ) -> Result<Self, MemoryError> {
        let mut regions = Vec::new();
        for (a, s) in layout::ram_regions(mem_size) {
            regions.push(Arc::new(new_region(a.0, s as u64, shared)?));
        }
        let gm = GuestMemoryMmap::from_arc_regions(regions)
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        let mut next_slot = 0;
        for r in gm.iter() {
            set_slot(vm, next_slot, r.start_addr().0, r.len(), host_addr(r))?;
            next_slot += 1;
        }
        Ok(MemoryManager {
            mem: GuestMemoryAtomic::new(gm),
            shared,
            hotplug: layout::hotplug_region(mem_size, max_mem_size).map(|(a, s)| (a.0, s)),
            plugged: BTreeMap::new(),
            next_slot,
            free_slots: Vec::new(),
        })
    }

    /// Guest memory of a restored VM: `regions` (boot RAM and the hot-plugged ranges
    /// `plugged`, each `(addr, size)`, as the snapshot had them) registered with KVM, one slot
    /// each, with the hotplug region `hotplug`.
    pub(crate) fn from_regions(
        vm: &VmFd,
        regions: Vec<GuestRegionMmap>,
        plugged: &[(u64, u64)],
        hotplug: Option<(u64, u64)>,
        shared: bool,
    ) -> Result<Self, MemoryError> {
        let gm = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        let mut next_slot = 0;
        let mut plugged_map = BTreeMap::new();
        for r in gm.iter() {
            let (addr, size) = (r.start_addr().0, r.len());
            set_slot(vm, next_slot, addr, size, host_addr(r))?;
            if plugged.contains(&(addr, size)) {
                let p = PluggedRange {
                    addr,
                    size,
                    slot: next_slot,
                };
                plugged_map.insert(addr, p);
            }
            next_slot += 1;
        }
        if plugged_map.len() != plugged.len() {
            return Err(MemoryError::Layout(
                "a hot-plugged range of the snapshot is not one of its memory regions".into(),
            ));
        }
        Ok(MemoryManager {
            mem: GuestMemoryAtomic::new(gm),
            shared,
            hotplug,
            plugged: plugged_map,
            next_slot,
            free_slots: Vec::new(),
        })
    }

    /// A new region of `size` bytes at `addr`, mapped as this VM maps its RAM (for a restore
    /// that must copy a snapshot's memory into shared memory).
    pub(crate) fn new_region(
        addr: u64,
        size: u64,
        shared: bool,
    ) -> Result<GuestRegionMmap, MemoryError> {
        new_region(addr, size, shared)
    }

    /// The atomic handle devices and vCPUs read memory through.
    pub(crate) fn guest_memory(&self) -> GuestMem {
        self.mem.clone()
    }

    /// Whether guest RAM is memfd-backed and shareable with another process.
    pub(crate) fn is_shared(&self) -> bool {
        self.shared
    }

    /// The hotplug region (address, size), if any.
    pub(crate) fn hotplug_region(&self) -> Option<(u64, u64)> {
        self.hotplug
    }

    /// Bytes currently hot-plugged.
    pub(crate) fn plugged_bytes(&self) -> u64 {
        self.plugged.values().map(|p| p.size).sum()
    }

    /// Plugged ranges, lowest address first.
    pub(crate) fn plugged(&self) -> Vec<PluggedRange> {
        self.plugged.values().copied().collect()
    }

    fn find_gap(&self, size: u64) -> Option<u64> {
        let (base, total) = self.hotplug?;
        let mut cursor = base;
        for p in self.plugged.values() {
            if p.addr >= cursor + size {
                break;
            }
            cursor = cursor.max(p.addr + p.size);
        }
        (cursor + size <= base + total).then_some(cursor)
    }

    /// Plug `size` bytes (a multiple of `block`) at the lowest free address of the hotplug
    /// region: map it, register a KVM slot, publish the new layout. Returns the range.
    pub(crate) fn add(
        &mut self,
        vm: &VmFd,
        size: u64,
        block: u64,
    ) -> Result<PluggedRange, MemoryError> {
        let (_, total) = self.hotplug.ok_or(MemoryError::NoHotplugRegion)?;
        if size == 0 || block == 0 || !size.is_multiple_of(block) {
            return Err(MemoryError::BadSize { size, block });
        }
        let addr = self.find_gap(size).ok_or(MemoryError::NoSpace {
            size,
            used: self.plugged_bytes(),
            total,
        })?;
        let region = Arc::new(new_region(addr, size, self.shared)?);
        let new = self
            .mem
            .memory()
            .insert_region(region.clone())
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        let slot = self.free_slots.pop().unwrap_or(self.next_slot);
        if slot == self.next_slot {
            self.next_slot += 1;
        }
        if let Err(e) = set_slot(vm, slot, addr, size, host_addr(&region)) {
            self.free_slots.push(slot);
            return Err(e);
        }
        self.publish(new);
        let p = PluggedRange { addr, size, slot };
        self.plugged.insert(addr, p);
        tracing::info!("hot-plugged {size:#x} bytes at {addr:#x} (slot {slot})");
        Ok(p)
    }

    /// Unplug a range added by [`MemoryManager::add`]: delete the KVM slot, drop the host pages
    /// (`MADV_DONTNEED`) and publish the layout without it; the mapping goes away when the last
    /// device snapshot drops.
    pub(crate) fn remove(&mut self, vm: &VmFd, addr: u64, size: u64) -> Result<(), MemoryError> {
        let p = match self.plugged.get(&addr) {
            Some(p) if p.size == size => *p,
            _ => return Err(MemoryError::NotPlugged { addr, size }),
        };
        set_slot(vm, p.slot, addr, 0, 0)?;
        let (new, removed) = self
            .mem
            .memory()
            .remove_region(GuestAddress(addr), size)
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        let host = host_addr(&removed);
        // The region was mapped with this size, so it fits both.
        let (len, off_len) = (
            usize::try_from(size).unwrap_or(0),
            libc::off_t::try_from(size).unwrap_or(0),
        );
        if host != 0 {
            // SAFETY: `host..host+size` is the removed region's live mapping; the guest can no
            // longer reach it (slot deleted) and dropping its pages is what unplug means.
            unsafe { libc::madvise(host as *mut libc::c_void, len, libc::MADV_DONTNEED) };
        }
        if self.shared {
            if let Some(fo) = removed.file_offset() {
                // Give the memfd's pages back too (MADV_DONTNEED keeps shared file pages).
                // SAFETY: plain fallocate on our own memfd.
                unsafe {
                    libc::fallocate(
                        std::os::fd::AsRawFd::as_raw_fd(fo.file()),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        0,
                        off_len,
                    )
                };
            }
        }
        drop(removed);
        self.publish(new);
        self.plugged.remove(&addr);
        self.free_slots.push(p.slot);
        tracing::info!("unplugged {size:#x} bytes at {addr:#x} (slot {})", p.slot);
        Ok(())
    }

    fn publish(&self, new: GuestMemoryMmap) {
        match self.mem.lock() {
            Ok(g) => g.replace(new),
            Err(p) => p.into_inner().replace(new),
        }
    }

    /// Host address ranges of all guest RAM (for RSS accounting).
    pub(crate) fn host_ranges(&self) -> Vec<(u64, u64)> {
        self.mem
            .memory()
            .iter()
            .map(|r| {
                let h = host_addr(r);
                (h, h + r.len())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::Kvm;
    use vm_memory::Bytes;

    #[test]
    fn plug_and_unplug_blocks() {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let block = 128 << 20;
        let mut mm = MemoryManager::new(&vm, 256 << 20, 1 << 30, false).unwrap();
        assert_eq!(mm.hotplug_region(), Some((1 << 30, 768 << 20)));
        let a = mm.add(&vm, block, block).unwrap();
        assert_eq!(a.addr, 1 << 30);
        let b = mm.add(&vm, 2 * block, block).unwrap();
        assert_eq!(b.addr, (1 << 30) + block);
        let m = mm.guest_memory();
        m.memory()
            .write_obj(0x55u8, GuestAddress(b.addr + 5))
            .unwrap();
        assert!(matches!(
            mm.add(&vm, 4 * block, block),
            Err(MemoryError::NoSpace { .. })
        ));
        assert!(matches!(
            mm.add(&vm, 1000, block),
            Err(MemoryError::BadSize { .. })
        ));
        mm.remove(&vm, a.addr, a.size).unwrap();
        assert!(m.memory().read_obj::<u8>(GuestAddress(a.addr)).is_err());
        assert!(matches!(
            mm.remove(&vm, a.addr, a.size),
            Err(MemoryError::NotPlugged { .. })
        ));
        // The freed gap is reused.
        let c = mm.add(&vm, block, block).unwrap();
        assert_eq!(c.addr, 1 << 30);
        assert_eq!(mm.plugged_bytes(), 3 * block);
        assert_eq!(
            m.memory().read_obj::<u8>(GuestAddress(b.addr + 5)).unwrap(),
            0x55
        );
    }

    #[test]
    fn no_hotplug_without_max() {
        let kvm = Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        let mut mm = MemoryManager::new(&vm, 64 << 20, 64 << 20, true).unwrap();
        assert!(mm.is_shared());
        assert!(matches!(
            mm.add(&vm, 128 << 20, 128 << 20),
            Err(MemoryError::NoHotplugRegion)
        ));
    }
}
