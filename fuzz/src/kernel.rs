//! Target `kernel_image`: a kernel file as the VMM reads it. The header checks of
//! `kernel_image` run on the bytes as they are; a file they accept then goes through the
//! config checks, linux-loader's bzImage or ELF/PVH loader and the boot parameters.

use std::io::Cursor;

use vmm_reference::config::{required_mem_bytes, MIN_MEM_MIB};
use vmm_reference::kernel_image::{KernelFormat, KernelInfo};
use vmm_reference::sys::HIMEM_START;

use crate::guest_boot;

/// The most guest memory this target maps for a kernel (a header may ask for up to 4 GiB);
/// kernels needing more are only checked to be refused.
const MAX_FUZZ_MEM_MIB: u64 = 1024;

/// Runs `data` as a kernel file through the VMM.
pub fn kernel_image(data: &[u8]) {
    let info = KernelInfo::inspect(&mut Cursor::new(data));
    let format = KernelFormat::detect(&mut Cursor::new(data));
    assert_eq!(
        info.as_ref().ok().map(|i| i.format),
        format.as_ref().ok().copied(),
        "inspect() and detect() disagree"
    );
    let Ok(info) = info else {
        // The config checks refuse it the same way; nothing is loaded.
        assert!(guest_boot::prepare(data, None, MIN_MEM_MIB, 1).is_none());
        return;
    };
    if info.format == KernelFormat::BzImage {
        // The 64-bit boot protocol loads the kernel at 1 MiB and it occupies memory above.
        assert!(info.mem_end >= HIMEM_START, "{info:?}");
    }
    let needed_mib = required_mem_bytes(info.mem_end, 0).div_ceil(1 << 20);
    if needed_mib > MAX_FUZZ_MEM_MIB {
        assert!(guest_boot::prepare(data, None, MIN_MEM_MIB, 1).is_none());
        return;
    }
    guest_boot::prepare(data, None, needed_mib.max(MIN_MEM_MIB), 1);
}
