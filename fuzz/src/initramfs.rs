//! Target `initramfs`: the VMM treats the initramfs as opaque bytes (the guest kernel
//! unpacks the cpio), so what it does with one is size it against guest memory and the
//! kernel's footprint, choose where it goes and copy it there. The input picks the memory
//! size, the vCPU count and the kernel header fields that move the footprint and the
//! `initrd_addr_max` limit; the rest of it is the initramfs.

use vmm_reference::config::MIN_MEM_MIB;
use vmm_reference::sys::MAX_VCPUS;

use crate::guest_boot;
use crate::images::{bzimage, BzImageFields};
use crate::input::Input;

/// Guest memory sizes to try, in MiB: the minimum and a few above it.
const MEM_MIB: [u64; 4] = [MIN_MEM_MIB, 96, 128, 256];

/// Loads the initramfs the input describes with a kernel it describes.
pub fn initramfs(data: &[u8]) {
    let mut input = Input::new(data);
    let mem_mib = input.pick(&MEM_MIB);
    let vcpus = u32::from(input.u8() % MAX_VCPUS) + 1;
    let fields = BzImageFields {
        syssize: input.u16() % 0x100,
        initrd_addr_max: input.u32(),
        kernel_alignment: 1 << (input.u8() % 32),
        pref_address: u64::from(input.u32()),
        init_size: input.u32() % (256 << 20),
    };
    let with_initramfs = input.u8() % 8 != 0;
    let content = input.rest();
    guest_boot::prepare(
        &bzimage(fields),
        with_initramfs.then_some(content),
        mem_mib,
        vcpus,
    );
}
