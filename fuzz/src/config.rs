//! Target `config`: a JSON config file, parsed as text and as a file, printed as the
//! binary prints its errors, and validated with the kernel and initramfs it names replaced
//! by files of this target (a config names host paths; fuzzing must not open arbitrary
//! ones).

use std::path::Path;

use vmm_reference::cli::error_chain;
use vmm_reference::config::{self, required_mem_bytes, Overrides, VmConfig};
use vmm_reference::config::{MAX_MEM_MIB, MIN_MEM_MIB};
use vmm_reference::sys::{CMDLINE_MAX_LEN, MAX_VCPUS};

use crate::guest_boot::temp_file;
use crate::images::{bzimage, BzImageFields};

/// The initramfs the validated configs name.
const INITRAMFS: &[u8] = b"070701 not unpacked by the VMM";

/// Parses and validates `data` as a config file.
pub fn config(data: &[u8]) {
    let file = temp_file(data);
    let from_file = VmConfig::from_file(file.path());
    let Ok(text) = std::str::from_utf8(data) else {
        // Not UTF-8: reading the file as text fails.
        assert!(matches!(from_file, Err(config::Error::ReadConfig { .. })));
        return;
    };
    let parsed = VmConfig::from_json(text, Path::new("fuzz.json"));
    match (&parsed, &from_file) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(config::Error::ParseConfig { .. }), Err(config::Error::ParseConfig { .. })) => {}
        _ => panic!("the text gave {parsed:?}, the file {from_file:?}"),
    }
    let config = match parsed {
        Ok(config) => config,
        Err(e) => {
            assert!(!error_chain(&e).is_empty());
            return;
        }
    };
    // What was parsed is what would be written back.
    let json = serde_json::to_string(&config).expect("a parsed config serializes");
    assert_eq!(
        VmConfig::from_json(&json, Path::new("again.json")).unwrap(),
        config
    );
    // The file with no flags given is the file.
    let unflagged = VmConfig::from_file_and_flags(Some(file.path()), Overrides::default());
    assert_eq!(unflagged.unwrap(), config);
    validate(config);
}

fn validate(mut config: VmConfig) {
    let fields = BzImageFields::default();
    let kernel = temp_file(&bzimage(fields));
    let initramfs = config.initramfs.as_ref().map(|_| temp_file(INITRAMFS));
    config.kernel = kernel.path().to_path_buf();
    config.initramfs = initramfs.as_ref().map(|f| f.path().to_path_buf());
    let values_ok = (1..=u32::from(MAX_VCPUS)).contains(&config.vcpus)
        && (MIN_MEM_MIB..=MAX_MEM_MIB).contains(&config.mem_mib)
        && config.cmdline.len() < CMDLINE_MAX_LEN;
    let result = config.clone().validate();
    if let Err(e) = &result {
        assert!(!error_chain(e).is_empty());
    }
    if !values_ok {
        assert!(
            matches!(
                result,
                Err(config::Error::NoVcpus
                    | config::Error::TooManyVcpus { .. }
                    | config::Error::TooLittleMemory { .. }
                    | config::Error::TooMuchMemory { .. }
                    | config::Error::CmdlineTooLong { .. })
            ),
            "{config:?} gave {result:?}"
        );
        return;
    }
    let initramfs_len = initramfs.as_ref().map_or(0, |_| INITRAMFS.len() as u64);
    let kernel_end = fields.pref_address + u64::from(fields.init_size);
    if config.mem_mib << 20 < required_mem_bytes(kernel_end, initramfs_len) {
        assert!(
            matches!(result, Err(config::Error::TooLittleMemoryForGuest { .. })),
            "{config:?} gave {result:?}"
        );
        return;
    }
    let valid = result.unwrap_or_else(|e| panic!("{config:?} refused: {e:?}"));
    assert_eq!(valid.config(), &config);
    assert_eq!(valid.mem_bytes(), config.mem_mib << 20);
}
