//! KVM tests of the run loop with tiny long-mode guests from kvm-test-support: port I/O and
//! MMIO round trips through the buses, HLT, a triple fault, MSR exits, pause/resume under
//! load, four vCPUs, and a vCPU error that stops the VM.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{Cap, Kvm, VcpuFd};
use kvm_test_support::guest::{TinyGuest, CODE_ADDR};
use kvm_test_support::{ensure, ensure_eq, harness, KvmTest, Requirement, TestError, TestResult};
use sync_regs::RegisterCache;
use sync_regs::Registers;
use vcpu_runner::profile::ExitKey;
use vcpu_runner::{
    BusDevice, Buses, Command, ExitHook, ExitOutcome, ExitRecord, MsrHandler, NoMsrs, StopReason,
    Vcpu, VcpuState, VmOutcome, VmRunner,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vm_types::VmType;

const WAIT: Duration = Duration::from_secs(10);

/// Cycle counts of the pause tests. Under cargo-tarpaulin's ptrace engine (which builds with
/// `--cfg tarpaulin`) every executed line traps to the tracer, which makes a cycle about a
/// hundred times slower, and tarpaulin gives up on a test silent for 60 s; coverage runs
/// therefore do a tenth of the cycles. The test tiers always run the full counts.
#[allow(unexpected_cfgs)]
const CYCLE_DIVISOR: u32 = if cfg!(tarpaulin) { 10 } else { 1 };

/// Answers reads with `value` (little-endian, truncated to the access) and records writes.
struct Latch {
    value: u64,
    writes: Vec<(u64, Vec<u8>)>,
}

impl BusDevice for Latch {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let bytes = self.value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
}

fn latch(value: u64) -> Arc<Mutex<Latch>> {
    Arc::new(Mutex::new(Latch {
        value,
        writes: Vec::new(),
    }))
}

fn writes(dev: &Arc<Mutex<Latch>>) -> Vec<(u64, Vec<u8>)> {
    dev.lock().unwrap().writes.clone()
}

/// A register cache for a vCPU of `vm`.
fn cache(vm: &kvm_ioctls::VmFd) -> RegisterCache {
    RegisterCache::new(vm, VmType::Default)
}

/// A long-mode guest split into the parts the runner needs.
struct Rig {
    vm: kvm_ioctls::VmFd,
    mem: GuestMemoryMmap,
    vcpu0: VcpuFd,
}

fn rig(kvm: &Kvm, code: &[u8]) -> Result<Rig, TestError> {
    let guest = TinyGuest::long_mode(kvm, code)?;
    let TinyGuest { vm, vcpu, mem, .. } = guest;
    Ok(Rig {
        vm,
        mem,
        vcpu0: vcpu,
    })
}

fn counter(mem: &GuestMemoryMmap, addr: u64) -> Result<u64, TestError> {
    mem.read_obj::<u64>(GuestAddress(addr))
        .map_err(|e| TestError::fail(format!("reading guest counter: {e}")))
}

/// Runs one vCPU under a VmRunner until its outcome, and returns it.
fn run_single(vcpu: Vcpu) -> Result<VmOutcome, TestError> {
    let runner = VmRunner::spawn(vec![vcpu])?;
    runner.start()?;
    ensure!(runner.wait(WAIT), "no outcome within {WAIT:?}");
    Ok(runner.shutdown(WAIT)?)
}

/// `in eax, dx` from one device, `out dx, eax` to another: the value makes the round trip.
fn pio_round_trip(kvm: &Kvm) -> TestResult {
    let code = [
        0x66, 0xba, 0x60, 0x00, // mov dx, 0x60
        0xed, // in eax, dx
        0x66, 0xba, 0x64, 0x00, // mov dx, 0x64
        0xef, // out dx, eax
        0xe4, 0x90, // in al, 0x90 (no device: all ones)
        0xe6, 0x68, // out 0x68, al
        0xf4, // hlt
    ];
    let rig = rig(kvm, &code)?;
    let source = latch(0x1122_3344);
    let sink = latch(0);
    let mut buses = Buses::new();
    buses.pio.insert(0x60, 4, source.clone())?;
    buses.pio.insert(0x64, 8, sink.clone())?;
    let vcpu = Vcpu::new(
        0,
        rig.vcpu0,
        cache(&rig.vm),
        Arc::new(buses),
        Box::new(NoMsrs),
    );
    let outcome = run_single(vcpu)?;
    ensure!(matches!(outcome, VmOutcome::Halted), "outcome {outcome}");
    ensure_eq!(
        writes(&sink),
        vec![(0, 0x1122_3344u32.to_le_bytes().to_vec()), (4, vec![0xff])],
        "sink saw {:x?}",
        writes(&sink)
    );
    Ok(())
}

/// `mov rax, [mmio]` then `mov [mmio + 8], rax` on an address no memory slot backs.
fn mmio_round_trip(kvm: &Kvm) -> TestResult {
    const MMIO: u64 = 0x1000_0000;
    let mut code = vec![0x48, 0xa1]; // mov rax, [moffs64]
    code.extend_from_slice(&MMIO.to_le_bytes());
    code.extend_from_slice(&[0x48, 0xa3]); // mov [moffs64], rax
    code.extend_from_slice(&(MMIO + 8).to_le_bytes());
    code.push(0xf4); // hlt
    let rig = rig(kvm, &code)?;
    let dev = latch(0x0102_0304_0506_0708);
    let mut buses = Buses::new();
    buses.mmio.insert(MMIO, 0x10, dev.clone())?;
    let buses = Arc::new(buses);
    let thread = Vcpu::new(0, rig.vcpu0, cache(&rig.vm), buses, Box::new(NoMsrs)).spawn()?;
    thread.handle().resume()?;
    let reason = thread.handle().wait_exited(WAIT)?;
    ensure_eq!(reason, StopReason::Halted, "stopped with {reason:?}");
    let (vcpu, _) = thread.join(WAIT)?;
    ensure_eq!(
        writes(&dev),
        vec![(8, 0x0102_0304_0506_0708u64.to_le_bytes().to_vec())],
        "device saw {:x?}",
        writes(&dev)
    );
    let stats = vcpu.stats();
    ensure!(
        stats.mmio_reads == 1 && stats.mmio_writes == 1 && stats.unclaimed_mmio == 0,
        "stats {stats}"
    );
    Ok(())
}

fn hlt(kvm: &Kvm) -> TestResult {
    let rig = rig(kvm, &[0xf4])?;
    let thread = Vcpu::new(
        0,
        rig.vcpu0,
        cache(&rig.vm),
        Arc::new(Buses::new()),
        Box::new(NoMsrs),
    )
    .spawn()?;
    ensure_eq!(
        thread.handle().state(),
        VcpuState::Created,
        "state {}",
        thread.handle().state()
    );
    thread.handle().resume()?;
    let reason = thread.handle().wait_exited(WAIT)?;
    ensure_eq!(reason, StopReason::Halted, "stopped with {reason:?}");
    let (vcpu, reason) = thread.join(WAIT)?;
    ensure_eq!(reason, StopReason::Halted, "joined with {reason:?}");
    let rip = vcpu.fd().get_regs()?.rip;
    ensure_eq!(rip, CODE_ADDR + 1, "rip after hlt {rip:#x}");
    Ok(())
}

/// An IDT with limit 0: `ud2` raises #UD, its delivery faults (#GP), that one's too (#DF),
/// and the CPU shuts down: KVM_EXIT_SHUTDOWN.
fn triple_fault(kvm: &Kvm) -> TestResult {
    let rig = rig(kvm, &[0x0f, 0x0b])?; // ud2
    let mut sregs = rig.vcpu0.get_sregs()?;
    sregs.idt.limit = 0;
    rig.vcpu0.set_sregs(&sregs)?;
    let vcpu = Vcpu::new(
        0,
        rig.vcpu0,
        cache(&rig.vm),
        Arc::new(Buses::new()),
        Box::new(NoMsrs),
    );
    let outcome = run_single(vcpu)?;
    let VmOutcome::TripleFault {
        vcpu: 0,
        diagnostics: Some(diagnostics),
    } = &outcome
    else {
        return Err(TestError::fail(format!("outcome {outcome}")));
    };
    let dump = diagnostics
        .registers
        .as_ref()
        .map_err(|e| TestError::fail(format!("no register dump: {e}")))?;
    let (rip, cs) = (dump.regs.rip, dump.sregs.cs.selector);
    if harness::vendor_module() == Some("kvm_amd") {
        // shutdown_interception() (arch/x86/kvm/svm/svm.c) INITs the vCPU before the exit.
        ensure!(
            rip == 0xfff0 && cs == 0xf000,
            "kvm_amd: expected the INIT state at the dump, got CS {cs:#x} RIP {rip:#x}"
        );
    } else {
        ensure!(
            rip == CODE_ADDR && dump.sregs.idt.limit == 0,
            "dump not at the faulting ud2: CS {cs:#x} RIP {rip:#x}\n{dump}"
        );
    }
    ensure!(
        outcome.to_string().contains("RIP="),
        "outcome text lacks the dump: {outcome}"
    );
    Ok(())
}

/// Reads RAX and RIP at each port write and writes RAX + 1 back, through the exit hook.
struct Incrementer {
    seen: Arc<Mutex<Vec<(u8, u64)>>>,
}

impl ExitHook for Incrementer {
    fn after_exit(
        &mut self,
        exit: &ExitRecord,
        _outcome: &ExitOutcome,
        registers: &mut Registers<'_>,
    ) -> sync_regs::Result<()> {
        if let ExitRecord::PortWrite { port: 0x80, data } = exit {
            let regs = registers.regs_mut()?;
            self.seen.lock().unwrap().push((data[0], regs.rip));
            regs.rax += 1;
        }
        Ok(())
    }
}

/// An exit hook gets each exit and the registers together: it increments RAX at every
/// `out`, and the guest, which loops until AL is 5, writes 0 to 4 and halts. A write the run
/// loop lost or applied late would repeat a value or never reach 5.
fn exit_hook_reads_and_writes_registers(kvm: &Kvm) -> TestResult {
    let code = [
        0xe6, 0x80, // 0: out 0x80, al
        0x3c, 0x05, // 2: cmp al, 5
        0x75, 0xfa, // 4: jne 0
        0xf4, // 6: hlt
    ];
    let rig = rig(kvm, &code)?;
    let sink = latch(0);
    let mut buses = Buses::new();
    buses.pio.insert(0x80, 1, sink.clone())?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let hook = Box::new(Incrementer { seen: seen.clone() });
    let vcpu = Vcpu::new(
        0,
        rig.vcpu0,
        cache(&rig.vm),
        Arc::new(buses),
        Box::new(NoMsrs),
    )
    .with_exit_hook(hook);
    let outcome = run_single(vcpu)?;
    ensure!(matches!(outcome, VmOutcome::Halted), "outcome {outcome}");
    let values: Vec<u8> = writes(&sink).into_iter().map(|(_, d)| d[0]).collect();
    ensure_eq!(values, [0, 1, 2, 3, 4], "guest wrote {values:?}");
    let seen = seen.lock().unwrap().clone();
    ensure_eq!(seen.len(), 5, "hook saw {seen:?}");
    for (value, rip) in seen {
        ensure!(
            rip == CODE_ADDR || rip == CODE_ADDR + 2,
            "RIP {rip:#x} at the out of {value}"
        );
    }
    Ok(())
}

/// Guest RDMSR/WRMSR of IA32_FEATURE_CONTROL answered by msr-featctl through the runner.
fn msr_exits_reach_feature_control(kvm: &Kvm) -> TestResult {
    let code = [
        0xb9, 0x3a, 0x00, 0x00, 0x00, // mov ecx, 0x3a
        0x0f, 0x32, // rdmsr
        0xe6, 0x80, // out 0x80, al
        0xf4, // hlt
    ];
    let rig = rig(kvm, &code)?;
    msr_featctl::emulated::enable_emulation(&rig.vm)?;
    let features = msr_featctl::GuestCpuidFeatures {
        vmx: true,
        ..Default::default()
    };
    let featctl = msr_featctl::EmulatedFeatureControl::with_firmware_value(features);
    let expected = featctl.value().bits() as u8;
    let port = latch(0);
    let mut buses = Buses::new();
    buses.pio.insert(0x80, 1, port.clone())?;
    let handler: Box<dyn MsrHandler> = Box::new(featctl);
    let vcpu = Vcpu::new(0, rig.vcpu0, cache(&rig.vm), Arc::new(buses), handler);
    let outcome = run_single(vcpu)?;
    ensure!(matches!(outcome, VmOutcome::Halted), "outcome {outcome}");
    ensure_eq!(
        writes(&port),
        vec![(0, vec![expected])],
        "port saw {:x?}, expected {expected:#x}",
        writes(&port)
    );
    Ok(())
}

/// A guest that never exits on its own: 10,000 pause/resume cycles. Every pause must arrive
/// (a lost kick would hang it until the timeout) and the counter must not move while paused.
/// On even cycles the test waits until the guest has run again before pausing, so the kick
/// finds the vCPU inside KVM_RUN; on odd cycles it pauses right after resuming, so the kick
/// races with the vCPU thread's way back into KVM_RUN.
fn pause_resume_10000_times(kvm: &Kvm) -> TestResult {
    const COUNTER: u64 = 0x9000;
    const CYCLES: u32 = 10_000 / CYCLE_DIVISOR;
    let code = [
        0x48, 0xff, 0x04, 0x25, 0x00, 0x90, 0x00, 0x00, // inc qword [0x9000]
        0xeb, 0xf6, // jmp back to the inc
    ];
    let rig = rig(kvm, &code)?;
    let thread = Vcpu::new(
        0,
        rig.vcpu0,
        cache(&rig.vm),
        Arc::new(Buses::new()),
        Box::new(NoMsrs),
    )
    .spawn()?;
    let handle = thread.handle().clone();
    let start = Instant::now();
    handle.resume()?;
    let mut last = 0;
    for i in 0..CYCLES {
        if i % 2 == 0 {
            let deadline = Instant::now() + Duration::from_secs(5);
            while counter(&rig.mem, COUNTER)? == last {
                ensure!(Instant::now() < deadline, "no progress after resume {i}");
                std::hint::spin_loop();
            }
        }
        handle.pause(Duration::from_secs(5))?;
        let paused_at = counter(&rig.mem, COUNTER)?;
        ensure!(paused_at >= last, "counter went back: {paused_at} < {last}");
        if i % 1000 == 0 {
            std::thread::sleep(Duration::from_millis(2));
            let later = counter(&rig.mem, COUNTER)?;
            ensure_eq!(
                later,
                paused_at,
                "counter moved while paused: {paused_at} -> {later}"
            );
        }
        last = paused_at;
        handle.resume()?;
    }
    let elapsed = start.elapsed();
    ensure!(
        elapsed < Duration::from_secs(120),
        "{CYCLES} cycles took {elapsed:?}"
    );
    let (vcpu, reason) = thread.join(WAIT)?;
    ensure_eq!(reason, StopReason::Stopped, "joined with {reason:?}");
    let stats = vcpu.stats();
    // Each waited-for cycle had the guest running, so its pause interrupted KVM_RUN.
    ensure!(
        stats.interrupts >= u64::from(CYCLES / 2),
        "only {} KVM_RUN interruptions for {} in-guest pauses",
        stats.interrupts,
        CYCLES / 2
    );
    eprintln!(
        "{CYCLES} pause/resume cycles in {elapsed:?}; guest counter {}; {stats}",
        counter(&rig.mem, COUNTER)?
    );
    Ok(())
}

/// Pausing completes an in-flight `in`: when paused at the `in`, it has not been dispatched
/// yet; anywhere else, every `in` dispatched has also landed in the guest.
fn pause_completes_in_flight_port_io(kvm: &Kvm) -> TestResult {
    const ATTEMPTS: u64 = 0x9000;
    const IN_AT: u64 = CODE_ADDR + 8;
    let code = [
        0x48, 0xff, 0x04, 0x25, 0x00, 0x90, 0x00, 0x00, // 0: inc qword [0x9000]
        0xe4, 0x81, // 8: in al, 0x81
        0x88, 0x04, 0x25, 0x08, 0x90, 0x00, 0x00, // 10: mov [0x9008], al
        0xeb, 0xed, // 17: jmp 0
    ];
    let rig = rig(kvm, &code)?;
    let mut buses = Buses::new();
    buses.pio.insert(0x81, 1, latch(0x77))?;
    let thread = Vcpu::new(
        0,
        rig.vcpu0,
        cache(&rig.vm),
        Arc::new(buses),
        Box::new(NoMsrs),
    )
    .spawn()?;
    let handle = thread.handle().clone();
    handle.resume()?;
    let (mut at_in, mut elsewhere) = (0u32, 0u32);
    // At least CYCLES pauses, more (up to ten times as many) until one has landed away from
    // the `in`: where the vCPU thread is slow (tarpaulin's ptrace), a pause sent right after
    // the resume nearly always finds it handling the first `in`, so the guest also gets a
    // growing moment to run before the pause.
    const CYCLES: u32 = 2000 / CYCLE_DIVISOR;
    for cycle in 0..CYCLES * 10 {
        if cycle >= CYCLES && elsewhere > 0 {
            break;
        }
        std::thread::sleep(Duration::from_micros(u64::from(cycle % 8) * 100));
        handle.pause(Duration::from_secs(5))?;
        let (rip, reads) = handle.run_on_vcpu(
            |ctx| {
                let regs = ctx.registers().regs().map(|r| (r.rip, r.rax as u8));
                (regs, ctx.stats().pio_reads)
            },
            WAIT,
        )?;
        let (rip, al) = rip?;
        let attempts = counter(&rig.mem, ATTEMPTS)?;
        if rip == IN_AT {
            at_in += 1;
            ensure_eq!(
                reads + 1,
                attempts,
                "paused at the in with {reads} reads dispatched and {attempts} attempts"
            );
        } else {
            elsewhere += 1;
            ensure_eq!(
                reads,
                attempts,
                "paused at {rip:#x} with {reads} reads dispatched and {attempts} attempts"
            );
            if rip == IN_AT + 2 {
                ensure_eq!(al, 0x77, "in completed but al is {al:#x}");
            }
        }
        handle.resume()?;
    }
    thread.join(WAIT)?;
    eprintln!("paused at the in {at_in} times, elsewhere {elsewhere} times");
    ensure!(elsewhere > 0, "never paused after an in");
    Ok(())
}

/// A second vCPU on the kit's VM, sharing vCPU 0's segments and page tables.
fn extra_vcpu(rig: &Rig, id: u64, rip: u64, rsp: u64) -> Result<VcpuFd, TestError> {
    let fd = rig.vm.create_vcpu(id)?;
    fd.set_sregs(&rig.vcpu0.get_sregs()?)?;
    let mut regs = rig.vcpu0.get_regs()?;
    regs.rip = rip;
    regs.rsp = rsp;
    fd.set_regs(&regs)?;
    Ok(fd)
}

/// Four vCPUs, each with its own code and stack, each writing its index to its own port.
fn four_vcpus_each_write_their_port(kvm: &Kvm) -> TestResult {
    let code_of = |i: u8| [0xb0, i, 0xe6, 0x70 + i, 0xf4]; // mov al, i ; out 0x70+i, al ; hlt
    let rig = rig(kvm, &code_of(0))?;
    let ports: Vec<_> = (0..4).map(|_| latch(0)).collect();
    let mut buses = Buses::new();
    for (i, port) in ports.iter().enumerate() {
        buses.pio.insert(0x70 + i as u64, 1, port.clone())?;
    }
    let buses = Arc::new(buses);
    let mut fds = Vec::new();
    for i in 1..4u8 {
        let rip = CODE_ADDR + 0x100 * u64::from(i);
        rig.mem
            .write_slice(&code_of(i), GuestAddress(rip))
            .map_err(|e| TestError::fail(e.to_string()))?;
        fds.push(extra_vcpu(
            &rig,
            u64::from(i),
            rip,
            0x8000 - 0x800 * u64::from(i),
        )?);
    }
    let mut vcpus = vec![Vcpu::new(
        0,
        rig.vcpu0,
        cache(&rig.vm),
        buses.clone(),
        Box::new(NoMsrs),
    )];
    for (i, fd) in fds.into_iter().enumerate() {
        vcpus.push(Vcpu::new(
            i as u32 + 1,
            fd,
            cache(&rig.vm),
            buses.clone(),
            Box::new(NoMsrs),
        ));
    }
    let runner = VmRunner::spawn(vcpus)?;
    ensure_eq!(runner.handles().len(), 4, "{runner:?}");
    runner.start()?;
    ensure!(runner.wait(WAIT), "no outcome within {WAIT:?}");
    let outcome = runner.shutdown(WAIT)?;
    ensure!(matches!(outcome, VmOutcome::Halted), "outcome {outcome}");
    for (i, port) in ports.iter().enumerate() {
        ensure_eq!(
            writes(port),
            vec![(0, vec![i as u8])],
            "port {:#x} saw {:x?}",
            0x70 + i,
            writes(port)
        );
    }
    Ok(())
}

/// One vCPU spins; another hits an exit the runner does not handle (a single-step debug
/// exit). The error stops the spinning vCPU and is the VM's outcome, with diagnostics.
fn one_vcpu_error_stops_the_vm(kvm: &Kvm) -> TestResult {
    let spin = [0xeb, 0xfe]; // jmp $
    let rig = rig(kvm, &spin)?;
    let rip = CODE_ADDR + 0x100;
    rig.mem
        .write_slice(&[0x90, 0xf4], GuestAddress(rip)) // nop ; hlt
        .map_err(|e| TestError::fail(e.to_string()))?;
    let stepper = extra_vcpu(&rig, 1, rip, 0x7000)?;
    let debug = kvm_bindings::kvm_guest_debug {
        control: kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_SINGLESTEP,
        ..Default::default()
    };
    if let Err(e) = stepper.set_guest_debug(&debug) {
        return Err(TestError::skip(format!(
            "KVM_SET_GUEST_DEBUG(single-step) refused on this host: {e}"
        )));
    }
    let buses = Arc::new(Buses::new());
    let runner = VmRunner::spawn(vec![
        Vcpu::new(
            0,
            rig.vcpu0,
            cache(&rig.vm),
            buses.clone(),
            Box::new(NoMsrs),
        ),
        Vcpu::new(1, stepper, cache(&rig.vm), buses, Box::new(NoMsrs)),
    ])?;
    runner.start()?;
    ensure!(runner.wait(WAIT), "no outcome within {WAIT:?}");
    let spinner = runner.handles()[0].clone();
    let outcome = runner.shutdown(WAIT)?;
    let VmOutcome::Error { vcpu: 1, error } = outcome else {
        return Err(TestError::fail(format!("outcome {outcome}")));
    };
    let text = error.to_string();
    ensure!(text.contains("KVM_EXIT_DEBUG"), "error: {text}");
    ensure!(text.contains("RIP="), "no register dump in: {text}");
    ensure_eq!(
        spinner.state(),
        VcpuState::Exited(StopReason::Stopped),
        "spinning vCPU is {}",
        spinner.state()
    );
    Ok(())
}

/// Shutdown of a VM whose guests never exit, and Drop of a running one, both return promptly.
fn shutdown_and_drop_of_a_running_vm(kvm: &Kvm) -> TestResult {
    let first = rig(kvm, &[0xeb, 0xfe])?; // jmp $
    let runner = VmRunner::spawn(vec![Vcpu::new(
        0,
        first.vcpu0,
        cache(&first.vm),
        Arc::new(Buses::new()),
        Box::new(NoMsrs),
    )])?;
    runner.start()?;
    ensure!(
        !runner.wait(Duration::from_millis(50)),
        "spinning guest decided an outcome"
    );
    let outcome = runner.shutdown(WAIT)?;
    ensure!(matches!(outcome, VmOutcome::Stopped), "outcome {outcome}");

    let second = rig(kvm, &[0xeb, 0xfe])?;
    let handle;
    {
        let runner = VmRunner::spawn(vec![Vcpu::new(
            0,
            second.vcpu0,
            cache(&second.vm),
            Arc::new(Buses::new()),
            Box::new(NoMsrs),
        )])?;
        runner.start()?;
        handle = runner.handles()[0].clone();
        let start = Instant::now();
        drop(runner);
        ensure!(
            start.elapsed() < Duration::from_millis(500),
            "drop blocked for {:?}",
            start.elapsed()
        );
    }
    let reason = handle.wait_exited(WAIT)?;
    ensure_eq!(
        reason,
        StopReason::Stopped,
        "dropped VM's vCPU ended with {reason:?}"
    );
    ensure!(
        handle.pause(WAIT).is_err(),
        "an exited vCPU accepted a pause"
    );
    Ok(())
}

/// A jump to guest-physical memory no slot backs: KVM cannot fetch the instruction and
/// stops the vCPU with an internal error (emulation failure), reported with its suberror,
/// data and a register dump.
fn internal_error_is_reported_with_diagnostics(kvm: &Kvm) -> TestResult {
    let code = [
        0x48, 0xb8, 0x00, 0x00, 0x00, 0x20, 0x00, 0x00, 0x00, 0x00, // mov rax, 0x20000000
        0xff, 0xe0, // jmp rax
    ];
    let rig = rig(kvm, &code)?;
    let vcpu = Vcpu::new(
        0,
        rig.vcpu0,
        cache(&rig.vm),
        Arc::new(Buses::new()),
        Box::new(NoMsrs),
    );
    let outcome = run_single(vcpu)?;
    let VmOutcome::Error { vcpu: 0, error } = outcome else {
        return Err(TestError::fail(format!("outcome {outcome}")));
    };
    let text = error.to_string();
    match error {
        vcpu_runner::vcpu::Error::InternalError { info, .. } => {
            ensure_eq!(info.suberror, 1, "suberror {info}");
        }
        other => return Err(TestError::fail(format!("unexpected error: {other}"))),
    }
    ensure!(text.contains("KVM_INTERNAL_ERROR_EMULATION"), "{text}");
    ensure!(text.contains("RIP="), "no register dump in: {text}");
    Ok(())
}

/// Bounded waits end with typed errors when the vCPU thread is busy: a closure that takes
/// longer than the caller waits, a join and a VM shutdown that time out (the threads are
/// detached and finish on their own).
fn bounded_waits_time_out(kvm: &Kvm) -> TestResult {
    let busy = || Command::Run(Box::new(|_| std::thread::sleep(Duration::from_millis(300))));
    let first = rig(kvm, &[0xeb, 0xfe])?; // jmp $
    let thread = Vcpu::new(
        0,
        first.vcpu0,
        cache(&first.vm),
        Arc::new(Buses::new()),
        Box::new(NoMsrs),
    )
    .spawn()?;
    let handle = thread.handle().clone();
    ensure!(format!("{thread:?}").contains("VcpuThread"), "{thread:?}");
    handle.resume()?;
    let slow = handle.run_on_vcpu(
        |_| std::thread::sleep(Duration::from_millis(300)),
        Duration::from_millis(20),
    );
    ensure!(
        matches!(slow, Err(vcpu_runner::vcpu::Error::Timeout { .. })),
        "run_on_vcpu: {slow:?}"
    );
    handle.send(busy())?;
    let joined = thread.join(Duration::from_millis(20));
    ensure!(
        matches!(joined, Err(vcpu_runner::vcpu::Error::Timeout { .. })),
        "join: {:?}",
        joined.map(|(v, r)| (format!("{v:?}"), r))
    );
    handle.wait_exited(WAIT)?;

    let second = rig(kvm, &[0xeb, 0xfe])?;
    let runner = VmRunner::spawn(vec![Vcpu::new(
        0,
        second.vcpu0,
        cache(&second.vm),
        Arc::new(Buses::new()),
        Box::new(NoMsrs),
    )])?;
    runner.start()?;
    let handle = runner.handles()[0].clone();
    handle.send(busy())?;
    let err = runner.shutdown(Duration::from_millis(20)).unwrap_err();
    ensure!(
        matches!(&err, vcpu_runner::vm::Error::JoinTimeout { vcpus, .. } if vcpus == &[0]),
        "shutdown: {err}"
    );
    let reason = handle.wait_exited(WAIT)?;
    ensure_eq!(
        reason,
        StopReason::Stopped,
        "detached vCPU ended with {reason:?}"
    );
    Ok(())
}

/// A profiled guest: 50 `out`s to one port, 3 `in`s from another, one MMIO write, then HLT.
/// The profile counts each by kind and address, and its first `KVM_RUN` is after the spawn.
fn profile_counts_exits_by_kind_and_address(kvm: &Kvm) -> TestResult {
    const MMIO: u64 = 0x1000_0000;
    let mut code = vec![
        0xb9, 0x32, 0x00, 0x00, 0x00, // mov ecx, 50
        0xe6, 0x80, // 5: out 0x80, al
        0xe2, 0xfc, // loop 5
        0xe4, 0x61, // in al, 0x61
        0xe4, 0x61, // in al, 0x61
        0xe4, 0x61, // in al, 0x61
        0x48, 0xa3, // mov [moffs64], rax
    ];
    code.extend_from_slice(&MMIO.to_le_bytes());
    code.push(0xf4); // hlt
    let rig = rig(kvm, &code)?;
    let mut buses = Buses::new();
    buses.pio.insert(0x80, 1, latch(0))?;
    buses.pio.insert(0x61, 1, latch(0x20))?;
    buses.mmio.insert(MMIO, 8, latch(0))?;
    let slot = Arc::new(Mutex::new(None));
    let vcpu = Vcpu::new(
        0,
        rig.vcpu0,
        cache(&rig.vm),
        Arc::new(buses),
        Box::new(NoMsrs),
    )
    .with_profile(slot.clone());
    let before = Instant::now();
    let outcome = run_single(vcpu)?;
    ensure!(matches!(outcome, VmOutcome::Halted), "outcome {outcome}");
    let profile = slot
        .lock()
        .unwrap()
        .take()
        .ok_or_else(|| TestError::fail("the vCPU published no profile"))?;
    let count = |key| profile.get(key).map_or(0, |f| f.count);
    ensure_eq!(count(ExitKey::PortWrite(0x80)), 50, "{profile}");
    ensure_eq!(count(ExitKey::PortRead(0x61)), 3, "{profile}");
    ensure_eq!(count(ExitKey::MmioWrite(MMIO)), 1, "{profile}");
    ensure_eq!(count(ExitKey::Hlt), 1, "{profile}");
    // Kicks may add `Interrupted` rows; nothing else may appear.
    let total = profile.total();
    ensure_eq!(total.count - count(ExitKey::Interrupted), 55, "{profile}");
    ensure!(total.handling > Duration::ZERO, "{profile}");
    ensure!(total.in_kvm_run >= total.handling / 1000, "{profile}");
    let first = profile
        .first_run()
        .ok_or_else(|| TestError::fail("no first KVM_RUN recorded"))?;
    ensure!(first >= before, "first KVM_RUN before the spawn");
    Ok(())
}

fn main() {
    let msr_caps = |t: KvmTest| {
        t.requires(Requirement::Cap(Cap::X86UserSpaceMsr))
            .requires(Requirement::Cap(Cap::X86MsrFilter))
    };
    harness::main(vec![
        KvmTest::new("pio_round_trip", pio_round_trip),
        KvmTest::new("mmio_round_trip", mmio_round_trip),
        KvmTest::new("hlt", hlt),
        KvmTest::new("triple_fault", triple_fault),
        KvmTest::new(
            "exit_hook_reads_and_writes_registers",
            exit_hook_reads_and_writes_registers,
        ),
        msr_caps(KvmTest::new(
            "msr_exits_reach_feature_control",
            msr_exits_reach_feature_control,
        )),
        KvmTest::new("pause_resume_10000_times", pause_resume_10000_times),
        KvmTest::new(
            "pause_completes_in_flight_port_io",
            pause_completes_in_flight_port_io,
        ),
        KvmTest::new(
            "four_vcpus_each_write_their_port",
            four_vcpus_each_write_their_port,
        ),
        KvmTest::new("one_vcpu_error_stops_the_vm", one_vcpu_error_stops_the_vm),
        KvmTest::new(
            "shutdown_and_drop_of_a_running_vm",
            shutdown_and_drop_of_a_running_vm,
        ),
        KvmTest::new(
            "internal_error_is_reported_with_diagnostics",
            internal_error_is_reported_with_diagnostics,
        ),
        KvmTest::new("bounded_waits_time_out", bounded_waits_time_out),
        KvmTest::new(
            "profile_counts_exits_by_kind_and_address",
            profile_counts_exits_by_kind_and_address,
        ),
    ])
}
