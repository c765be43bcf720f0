//! Target `exit_dispatch`: vcpu-runner's `dispatch()` fed synthetic exits built from the
//! input, as `KVM_RUN` could return them: port I/O to the VMM's devices, MMIO, MSR accesses
//! answered by the emulated IA32_FEATURE_CONTROL, system events and the exits the loop
//! does not handle. Checked: the outcome each exit maps to, the counters, and what the
//! devices and the MSR handler answered.

use std::sync::{Arc, Mutex};

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{MsrExitReason, ReadMsrExit, VcpuExit, WriteMsrExit};
use msr_featctl::sys::MSR_IA32_FEAT_CTL;
use msr_featctl::{EmulatedFeatureControl, FeatureControl, GuestCpuidFeatures};
use vcpu_runner::{dispatch, ExitOutcome, ExitRecord, ExitStats, SystemEvent, UnhandledExit};
use vmm_reference::devices::pvpanic::PvPanic;
use vmm_reference::devices::rtc::CmosRtc;
use vmm_reference::devices::GuestEnd;

use crate::devices::CANARY;
use crate::input::Input;
use crate::platform::{Device, Platform};

/// MMIO devices: an RTC and a pvpanic register, at addresses of the 32-bit MMIO hole.
const MMIO_RTC: u64 = 0xd000_0000;
const MMIO_PVPANIC: u64 = 0xd000_1000;
const MMIO_DEVICES: [(u64, u64); 2] = [(MMIO_RTC, 2), (MMIO_PVPANIC, 1)];
/// At most this many data words in a system event (KVM's `system_event.data[16]`).
const MAX_EVENT_WORDS: u8 = 16;

fn port(input: &mut Input<'_>) -> u16 {
    match input.u8() % 8 {
        0 | 1 => input.u16(),
        n => {
            let (base, len) = Device::ALL[usize::from(n) % Device::ALL.len()].ports();
            (base + u64::from(input.u8()) % (len + 1)) as u16
        }
    }
}

fn mmio_addr(input: &mut Input<'_>) -> u64 {
    match input.u8() % 4 {
        0 => input.u64(),
        1 => u64::MAX - u64::from(input.u8() % 16),
        2 => MMIO_RTC + u64::from(input.u8() % 4),
        _ => MMIO_PVPANIC + u64::from(input.u8() % 4) - 1,
    }
}

fn mmio_claims(addr: u64, len: usize) -> bool {
    MMIO_DEVICES
        .iter()
        .any(|&(base, n)| addr >= base && u128::from(addr) + len as u128 <= u128::from(base + n))
}

/// The MSR a guest could access, with 0x3a most often.
fn msr_index(input: &mut Input<'_>) -> u32 {
    match input.u8() % 4 {
        0 => input.u32(),
        _ => MSR_IA32_FEAT_CTL,
    }
}

/// IA32_FEATURE_CONTROL as KVM keeps it for a guest (`vmx_set_msr`): the model the handler's
/// answers are checked against.
struct FeatCtlModel {
    value: u64,
    valid: u64,
}

impl FeatCtlModel {
    fn write(&mut self, value: u64) -> bool {
        let locked = self.value & FeatureControl::LOCKED.bits() != 0;
        let accepted = !locked && value & !self.valid == 0;
        if accepted {
            self.value = value;
        }
        accepted
    }
}

/// Dispatches the exits the input describes.
pub fn exit_dispatch(data: &[u8]) {
    let mut input = Input::new(data);
    let bits = input.u8();
    let features = GuestCpuidFeatures {
        vmx: bits & 1 != 0,
        smx: bits & 2 != 0,
        sgx: bits & 4 != 0,
        sgx_lc: bits & 8 != 0,
        lmce: bits & 16 != 0,
    };
    let (mut msr, mut model) = match bits & 32 {
        0 => (EmulatedFeatureControl::new(features), 0),
        _ => (
            EmulatedFeatureControl::with_firmware_value(features),
            features.firmware_value().bits(),
        ),
    };
    let mut model = FeatCtlModel {
        value: std::mem::take(&mut model),
        valid: features.valid_bits().bits(),
    };
    let mut platform = Platform::new();
    platform
        .buses
        .mmio
        .insert(MMIO_RTC, 2, Arc::new(Mutex::new(CmosRtc::with_clock(|| 0))))
        .unwrap();
    platform
        .buses
        .mmio
        .insert(
            MMIO_PVPANIC,
            1,
            Arc::new(Mutex::new(PvPanic::new(Arc::new(GuestEnd::new())))),
        )
        .unwrap();
    let mut stats = ExitStats::default();
    while !input.is_empty() {
        let before = stats;
        let kind = input.u8() % 16;
        let mut buf = vec![CANARY; input.access_size()];
        let (mut error, mut msr_data) = (CANARY, u64::from(CANARY));
        let words: Vec<u64> = (0..input.u8() % (MAX_EVENT_WORDS + 1))
            .map(|_| input.u64())
            .collect();
        let mut exit = match kind {
            0 => VcpuExit::IoIn(port(&mut input), &mut buf),
            1 => {
                let port = port(&mut input);
                buf.iter_mut().for_each(|b| *b = input.u8());
                VcpuExit::IoOut(port, &buf)
            }
            2 => VcpuExit::MmioRead(mmio_addr(&mut input), &mut buf),
            3 => {
                let addr = mmio_addr(&mut input);
                buf.iter_mut().for_each(|b| *b = input.u8());
                VcpuExit::MmioWrite(addr, &buf)
            }
            4 => VcpuExit::X86Rdmsr(ReadMsrExit {
                error: &mut error,
                reason: MsrExitReason::Filter,
                index: msr_index(&mut input),
                data: &mut msr_data,
            }),
            5 => VcpuExit::X86Wrmsr(WriteMsrExit {
                error: &mut error,
                reason: MsrExitReason::Filter,
                index: msr_index(&mut input),
                data: match input.u8() % 2 {
                    0 => input.u64(),
                    _ => input.u64() & FeatureControl::SUPPORTED.bits(),
                },
            }),
            6 => VcpuExit::Intr,
            7 => VcpuExit::Hlt,
            8 => VcpuExit::Shutdown,
            9 => {
                let other = u32::from(input.u8());
                let kinds = [
                    KVM_SYSTEM_EVENT_SHUTDOWN,
                    KVM_SYSTEM_EVENT_RESET,
                    KVM_SYSTEM_EVENT_CRASH,
                    other,
                ];
                VcpuExit::SystemEvent(input.pick(&kinds), &words)
            }
            10 => VcpuExit::FailEntry(input.u64(), input.u32()),
            11 => VcpuExit::InternalError,
            12 => VcpuExit::MemoryFault {
                flags: input.u64(),
                gpa: input.u64(),
                size: input.u64(),
            },
            13 => VcpuExit::Unsupported(input.u32()),
            14 => VcpuExit::IoapicEoi(input.u8()),
            _ => match input.u8() % 5 {
                0 => VcpuExit::Unknown,
                1 => VcpuExit::Exception,
                2 => VcpuExit::IrqWindowOpen,
                3 => VcpuExit::Nmi,
                _ => VcpuExit::Hyperv,
            },
        };
        let in_flight = ExitOutcome::leaves_instruction_in_flight(&exit);
        let outcome = dispatch(&mut exit, &platform.buses, &mut msr, &mut stats);
        let record = ExitRecord::of(&exit);
        assert_eq!(stats.exits, before.exits + 1);
        assert_eq!(in_flight, (0..=5).contains(&kind), "exit kind {kind}");
        if in_flight {
            assert_eq!(outcome, ExitOutcome::Continue);
        }
        match exit {
            VcpuExit::IoIn(port, _) => {
                let port = u64::from(port);
                assert_eq!(
                    record,
                    ExitRecord::PortRead {
                        port: port as u16,
                        data: buf.clone()
                    }
                );
                assert_eq!(stats.pio_reads, before.pio_reads + 1);
                let unclaimed = Device::at(port, buf.len()).is_none();
                assert_eq!(
                    stats.unclaimed_pio,
                    before.unclaimed_pio + u64::from(unclaimed)
                );
                platform.read(port, &buf, CANARY);
            }
            VcpuExit::IoOut(port, data) => {
                assert_eq!(stats.pio_writes, before.pio_writes + 1);
                let unclaimed = Device::at(u64::from(port), data.len()).is_none();
                assert_eq!(
                    stats.unclaimed_pio,
                    before.unclaimed_pio + u64::from(unclaimed)
                );
                platform.wrote(u64::from(port), data);
            }
            VcpuExit::MmioRead(addr, _) => {
                assert_eq!(stats.mmio_reads, before.mmio_reads + 1);
                let claimed = mmio_claims(addr, buf.len());
                assert_eq!(
                    stats.unclaimed_mmio,
                    before.unclaimed_mmio + u64::from(!claimed)
                );
                if claimed {
                    assert!(
                        buf[1..].iter().all(|&b| b != CANARY),
                        "{buf:02x?} at {addr:#x}"
                    );
                } else {
                    assert!(buf.iter().all(|&b| b == 0xff), "{buf:02x?} at {addr:#x}");
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                assert_eq!(stats.mmio_writes, before.mmio_writes + 1);
                let claimed = mmio_claims(addr, data.len());
                assert_eq!(
                    stats.unclaimed_mmio,
                    before.unclaimed_mmio + u64::from(!claimed)
                );
            }
            VcpuExit::X86Rdmsr(read) => {
                assert_eq!(stats.msr, before.msr + 1);
                if read.index == MSR_IA32_FEAT_CTL {
                    assert_eq!((*read.error, *read.data), (0, model.value));
                    assert_eq!(model.value & !model.valid, 0);
                } else {
                    assert_eq!((*read.error, *read.data), (1, u64::from(CANARY)));
                    assert_eq!(stats.unclaimed_msr, before.unclaimed_msr + 1);
                }
            }
            VcpuExit::X86Wrmsr(write) => {
                assert_eq!(stats.msr, before.msr + 1);
                if write.index == MSR_IA32_FEAT_CTL {
                    let accepted = model.write(write.data);
                    assert_eq!(
                        *write.error,
                        u8::from(!accepted),
                        "WRMSR 0x3a {:#x}",
                        write.data
                    );
                } else {
                    assert_eq!(*write.error, 1);
                    assert_eq!(stats.unclaimed_msr, before.unclaimed_msr + 1);
                }
            }
            VcpuExit::Intr => {
                assert_eq!(outcome, ExitOutcome::Interrupted);
                assert_eq!(stats.interrupts, before.interrupts + 1);
            }
            VcpuExit::Hlt => assert_eq!(outcome, ExitOutcome::Halted),
            VcpuExit::Shutdown => assert_eq!(outcome, ExitOutcome::TripleFault),
            VcpuExit::SystemEvent(kind, data) => {
                let expected = match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => SystemEvent::Shutdown,
                    KVM_SYSTEM_EVENT_RESET => SystemEvent::Reset,
                    KVM_SYSTEM_EVENT_CRASH => SystemEvent::Crash {
                        data: data.to_vec(),
                    },
                    kind => SystemEvent::Other {
                        kind,
                        data: data.to_vec(),
                    },
                };
                assert_eq!(outcome, ExitOutcome::SystemEvent(expected));
            }
            VcpuExit::FailEntry(reason, cpu) => assert_eq!(
                outcome,
                ExitOutcome::FailEntry {
                    hardware_entry_failure_reason: reason,
                    cpu
                }
            ),
            VcpuExit::InternalError => assert_eq!(outcome, ExitOutcome::InternalError),
            VcpuExit::MemoryFault { flags, gpa, size } => assert_eq!(
                outcome,
                ExitOutcome::Unhandled(UnhandledExit::MemoryFault { flags, gpa, size })
            ),
            VcpuExit::Unsupported(nr) => {
                assert_eq!(
                    outcome,
                    ExitOutcome::Unhandled(UnhandledExit::Unsupported(nr))
                );
            }
            _ => assert!(
                matches!(outcome, ExitOutcome::Unhandled(UnhandledExit::Known(name)) if name.starts_with("KVM_EXIT_")),
                "{outcome:?}"
            ),
        }
        if !matches!(kind, 0 | 1) {
            assert_eq!(
                (stats.pio_reads, stats.pio_writes),
                (before.pio_reads, before.pio_writes)
            );
        }
    }
}
