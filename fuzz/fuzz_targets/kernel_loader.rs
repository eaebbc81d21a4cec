//! The kernel loaders as Kestrel runs them (`vmm/src/boot.rs` `load_kernel`): linux-loader's
//! `Elf::load`, and `BzImage::load` when the image has no ELF magic, both with no kernel offset
//! and high memory at `kestrel_arch::layout::HIMEM_START`, into 64 MiB of guest memory read from
//! a file; then the zero page built from the bzImage setup header (`configure_system`), as boot
//! does.
//!
//! | input bytes | use                                                                        |
//! |-------------|----------------------------------------------------------------------------|
//! | `[0]`       | control: bit 0 also try `BzImage::load` on an ELF (the loaders on their own), |
//! |             | bit 1 guest memory in two regions (a hole at 32..40 MiB)                   |
//! | the rest    | the kernel image (a memfd, read like Kestrel reads the kernel file)        |
//!
//! Nothing is asserted beyond "no panic" and that what a loader reports lies in guest memory.

#![no_main]

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::sync::{Mutex, OnceLock};

use kestrel_arch::layout;
use libfuzzer_sys::fuzz_target;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, Error as ElfError};
use linux_loader::loader::{load_cmdline, Error as LoaderError, KernelLoader, KernelLoaderResult};
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};

const MIB: usize = 1 << 20;
const MEM_SIZE: usize = 64 * MIB;

/// The kernel "file": one memfd, rewritten for every input.
fn kernel_file() -> &'static Mutex<File> {
    static FILE: OnceLock<Mutex<File>> = OnceLock::new();
    FILE.get_or_init(|| Mutex::new(kestrel_fuzz::memfd(c"kestrel-fuzz-kernel")))
}

fn check(mem: &GuestMemoryMmap, r: &KernelLoaderResult) {
    // What the VMM does with the result: the entry point, the end for the initrd placement, the
    // setup header for the zero page.
    let _ = r.kernel_load.0.checked_add(0x200);
    let _ = mem.address_in_range(r.kernel_load);
    let _ = mem.address_in_range(GuestAddress(r.kernel_end));
    let mut cmdline = Cmdline::new(layout::CMDLINE_MAX_SIZE).unwrap();
    cmdline
        .insert_str("console=ttyS0 reboot=k panic=1")
        .unwrap();
    let cmdline_addr = GuestAddress(layout::CMDLINE_START);
    load_cmdline(mem, cmdline_addr, &cmdline).unwrap();
    let len = cmdline.as_cstring().unwrap().as_bytes().len();
    let _ = kestrel_arch::boot::configure_system(
        mem,
        MEM_SIZE as u64,
        cmdline_addr,
        len + 1,
        None,
        r.setup_header,
    );
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, image)) = data.split_first() else {
        return;
    };
    let both = control & 1 != 0;
    let ranges: Vec<(GuestAddress, usize)> = if control & 2 != 0 {
        vec![
            (GuestAddress(0), 32 * MIB),
            (GuestAddress(40 * MIB as u64), MEM_SIZE - 32 * MIB),
        ]
    } else {
        vec![(GuestAddress(0), MEM_SIZE)]
    };
    let mem = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
    let mut f = kernel_file().lock().unwrap();
    f.set_len(0).unwrap();
    f.seek(SeekFrom::Start(0)).unwrap();
    f.write_all(image).unwrap();

    let himem = Some(GuestAddress(layout::HIMEM_START));
    f.seek(SeekFrom::Start(0)).unwrap();
    let elf = Elf::load(&mem, None, &mut *f, himem);
    let try_bz = match &elf {
        Ok(r) => {
            check(&mem, r);
            both
        }
        Err(LoaderError::Elf(ElfError::InvalidElfMagicNumber)) => true,
        Err(_) => both,
    };
    if try_bz {
        f.seek(SeekFrom::Start(0)).unwrap();
        if let Ok(r) = BzImage::load(&mem, None, &mut *f, himem) {
            check(&mem, &r);
        }
    }
});
