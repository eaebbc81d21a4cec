//! A drive's image is flushed (`fdatasync` on its open descriptor) before a swap of its backing
//! (`BlockControl::swap_backing`) replaces it, before a detach empties the slot, and before the VM's drop closes it — proved
//! on the real call: this test binary defines `fdatasync` itself, so the libc call Rust's
//! `File::sync_data` makes lands here first; it records which file (device and inode, from
//! `fstat` on the descriptor, so the descriptor was still open) and then makes the real system
//! call. A tiny guest dirties the first image through virtio-blk beforehand.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use kestrel_api::{DriveConfig, SerialOutput, VmConfig};
use kestrel_tests::virtio_script::Script;
use kestrel_tests::*;
use kestrel_vmm::{Vm, VmExit};

/// (st_dev, st_ino) of every descriptor `fdatasync` was called on, in order.
static SYNCED: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

/// Interposes glibc's `fdatasync` for this executable (the definition in the executable wins
/// over the shared library's for its own references): record the file, then do the call.
#[no_mangle]
pub extern "C" fn fdatasync(fd: libc::c_int) -> libc::c_int {
    // SAFETY: all-zero bytes are a valid `stat`; fstat writes into it and nothing else.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid out-pointer for the duration of the call.
    if unsafe { libc::fstat(fd, &mut st) } == 0 {
        SYNCED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((st.st_dev, st.st_ino));
    }
    // SAFETY: fdatasync takes a descriptor by value; errors come back through errno.
    let r = unsafe { libc::syscall(libc::SYS_fdatasync, fd) };
    // 0 or -1: both fit.
    libc::c_int::try_from(r).unwrap_or(-1)
}

fn id(p: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap();
    (m.dev(), m.ino())
}

/// A tiny guest with drive `d0` on `image` that writes sector 2 of it; returned once the
/// write completed, with its config.
fn guest_writes_sector_2(dir: &Path, image: &Path) -> (Vm, VmConfig) {
    let mut s = Script::new();
    let blk = s.device(0, 1);
    let mut hdr = 1u32.to_le_bytes().to_vec(); // VIRTIO_BLK_T_OUT
    hdr.extend_from_slice(&0u32.to_le_bytes());
    hdr.extend_from_slice(&2u64.to_le_bytes());
    let (h, d, st) = (s.buf(&hdr), s.buf(&[0xc3; 512]), s.out_buf(1));
    s.chain(&blk, 0, &[h, d, st]);
    s.notify(&blk, 0);
    let kernel = dir.join("guest.elf");
    std::fs::write(&kernel, s.guest_elf()).unwrap();
    let mut cfg = VmConfig::new(&kernel, 1, 32);
    cfg.serial.output = SerialOutput::None;
    cfg.drives.push(DriveConfig {
        drive_id: "d0".into(),
        path_on_host: Some(image.to_path_buf()),
        ..DriveConfig::default()
    });
    let vm = Vm::create(&cfg).unwrap();
    s.apply(&vm.guest_memory());
    vm.start().unwrap();
    let mem = vm.guest_memory();
    assert!(Script::wait_done(&mem, Duration::from_secs(20)));
    assert_eq!(s.used(&blk, 0).wait(&mem, 1, Duration::from_secs(20)), 1);
    (vm, cfg)
}

/// Swap: the old image `a` is synced before swap_backing returns (once by the swap, which
/// reports a failure, once more when its descriptor is closed); detaching does the same for
/// `b`, the image that goes. Each counts one backing flush.
fn check_swap_and_detach_sync_the_image_that_goes(vm: &Vm, a: &Path, b: &Path) {
    let dev = vm.device("d0").expect("drive d0");
    let d0 = dev.block().expect("a block device");
    d0.swap_backing(Some(b), false).unwrap();
    let synced = take_synced();
    assert!(!synced.is_empty(), "no fdatasync at all on swap");
    assert!(synced.iter().all(|f| *f == id(a)), "{synced:?}");
    assert_eq!(dev.metrics().block().unwrap().backing_flushes, 1);
    d0.swap_backing(None, false).unwrap();
    let synced = take_synced();
    assert!(
        !synced.is_empty() && synced.iter().all(|f| *f == id(b)),
        "{synced:?}"
    );
    assert_eq!(dev.metrics().block().unwrap().backing_flushes, 2);
}

/// Syncs recorded since the last call.
fn take_synced() -> Vec<(u64, u64)> {
    std::mem::take(&mut *SYNCED.lock().unwrap_or_else(|p| p.into_inner()))
}

#[test]
fn swap_detach_and_drop_fdatasync_the_image_before_letting_go() {
    let dir = scratch_dir().join("block-flush");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let [a, b, c] = ["a.img", "b.img", "c.img"].map(|n| {
        let p = dir.join(n);
        std::fs::write(&p, vec![0u8; 64 << 10]).unwrap();
        p
    });

    let (vm, mut cfg) = guest_writes_sector_2(&dir, &a);
    assert_eq!(std::fs::read(&a).unwrap()[1024..1536], [0xc3; 512]);
    take_synced();
    check_swap_and_detach_sync_the_image_that_goes(&vm, &a, &b);
    let d0 = vm.device("d0").and_then(|d| d.block()).expect("drive d0");

    // Attaching to an empty slot has nothing to flush.
    d0.swap_backing(Some(&c), false).unwrap();
    assert_eq!(take_synced(), []);

    // Drop: the attached image is synced while its descriptor is still open.
    assert_eq!(vm.stop(), VmExit::Stopped);
    assert_eq!(take_synced(), [], "stopping alone closes nothing");
    drop(vm);
    let synced = take_synced();
    assert_eq!(synced, [id(&c)], "drop");

    // A read-only image is never synced.
    cfg.drives[0].path_on_host = Some(a.clone());
    cfg.drives[0].is_read_only = true;
    let vm = Vm::create(&cfg).unwrap();
    drop(vm);
    assert_eq!(take_synced(), []);
}
