//! KVM tests of xstate-perm on the running kernel.
//!
//! The guest permission is per process, changes when granted and freezes when the process
//! creates its first vCPU, while libtest runs tests as threads of one process. So every
//! test that needs a pristine process, or that may change the permission, runs its
//! scenario in a child: this binary re-executed with `XSTATE_PERM_CHILD=<scenario>`, which
//! prints `key=value` lines and exits. Tests in the parent only query, and the ones that
//! create vCPUs never request anything, so no test changes what another one asserts.
//!
//! Expectations are derived from the queries (CPU, KVM, permission), never from this
//! machine's values: the same tests run in the nested kvm-amd host, whose CPU has no AMX.

use std::collections::HashMap;
use std::process::Command;

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use kvm_test_support::{
    ensure, ensure_eq, harness, GuestExit, KvmTest, TestError, TestResult, TinyGuest,
};
use xstate_perm::host::{self, RequestPath, SystemHost, XstateHost};
use xstate_perm::permission::kvm_filtered_xcr0;
use xstate_perm::{
    CpuidError, GuestPermission, RequestError, VcpuXstate, XFeature, XFeatureSet, XsaveLayout,
    XsaveState,
};

const CHILD_ENV: &str = "XSTATE_PERM_CHILD";

// ---------------------------------------------------------------------------------------
// Child side: one scenario per process.
// ---------------------------------------------------------------------------------------

/// The outcome of a raw kernel call: `ok` or the errno.
fn raw(result: host::Result<()>) -> String {
    match result {
        Ok(()) => "ok".into(),
        Err(e) => e.errno().to_string(),
    }
}

/// The outcome of a policy request, by variant.
fn outcome(result: &Result<GuestPermission, RequestError>) -> &'static str {
    match result {
        Ok(_) => "Ok",
        Err(RequestError::UnknownComponent { .. }) => "UnknownComponent",
        Err(RequestError::SupervisorComponent { .. }) => "SupervisorComponent",
        Err(RequestError::CpuLacks { .. }) => "CpuLacks",
        Err(RequestError::KvmWillNotExpose { .. }) => "KvmWillNotExpose",
        Err(RequestError::KernelTooOld { .. }) => "KernelTooOld",
        Err(RequestError::TooLate { .. }) => "TooLate",
        Err(RequestError::NotRequestable { .. }) => "NotRequestable",
        Err(RequestError::Query(_)) => "Query",
        Err(RequestError::Request(_)) => "Request",
        Err(RequestError::NotGranted { .. }) => "NotGranted",
    }
}

/// The real kernel, except that KVM is said to expose whatever the CPU has. It lets the
/// policy reach the kernel's own answers (EBUSY) on a host whose KVM exposes no AMX.
struct KvmClaimsCpu<'a>(SystemHost<'a>);

impl XstateHost for KvmClaimsCpu<'_> {
    fn cpu_supported(&self) -> host::Result<XFeatureSet> {
        self.0.cpu_supported()
    }
    fn guest_permitted(&self) -> host::Result<XFeatureSet> {
        self.0.guest_permitted()
    }
    fn kvm_guest_supported(&self) -> host::Result<Option<XFeatureSet>> {
        self.0.cpu_supported().map(Some)
    }
    fn request_guest_perm(&self, via: RequestPath, component: u32) -> host::Result<()> {
        self.0.request_guest_perm(via, component)
    }
}

fn check_outcome(result: &Result<(), CpuidError>) -> String {
    match result {
        Ok(()) => "Ok".into(),
        Err(CpuidError::WouldBeRefused { missing, .. }) => format!("WouldBeRefused:{missing:#x}"),
        Err(CpuidError::AdvertisesUnusable { unusable, .. }) => {
            format!("AdvertisesUnusable:{unusable:#x}")
        }
    }
}

/// KVM's supported CPUID with AMX advertised as a VMM that wants AMX would: tile
/// configuration and data in leaf 0xD subleaf 0, AMX-TILE in leaf 7.
fn amx_table(kvm: &Kvm) -> Result<CpuId, Box<dyn std::error::Error>> {
    let mut table = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    for e in table.as_mut_slice() {
        match (e.function, e.index) {
            (0xd, 0) => e.eax |= XFeatureSet::AMX.bits() as u32,
            (7, 0) => e.edx |= 1 << 24,
            _ => {}
        }
    }
    Ok(table)
}

struct Report(Vec<(String, String)>);

impl Report {
    fn put(&mut self, key: &str, value: impl ToString) {
        self.0.push((key.to_string(), value.to_string()));
    }
    fn set(&mut self, key: &str, set: XFeatureSet) {
        self.put(key, format!("{:#x}", set));
    }
}

fn child(scenario: &str) -> Result<Report, Box<dyn std::error::Error>> {
    let kvm = Kvm::new()?;
    let host = SystemHost::new(&kvm);
    let mut r = Report(Vec::new());
    r.set("cpu", host.cpu_supported()?);
    r.set("perm_before", host.guest_permitted()?);
    match host.kvm_guest_supported()? {
        Some(kvm_supp) => r.set("kvm", kvm_supp),
        None => r.put("kvm", "none"),
    }
    match scenario {
        "pristine" => {}
        "policy-18" => {
            let result = GuestPermission::request_feature(&host, XFeature::XtileData);
            r.put("policy", outcome(&result));
            if let Err(e) = &result {
                r.put("policy_message", e);
            }
            if let Ok(permission) = &result {
                r.put("via", format!("{:?}", permission.requested_via()));
                r.set("guest", permission.guest_features());
            }
        }
        "raw-18" => {
            r.put(
                "raw",
                raw(host.request_guest_perm(RequestPath::ArchPrctl, 18)),
            );
            r.put("xsave2", kvm.check_extension_int(Cap::Xsave2));
            let again = GuestPermission::request_feature(&host, XFeature::XtileData);
            r.put("policy", outcome(&again));
        }
        "raw-2" => r.put(
            "raw",
            raw(host.request_guest_perm(RequestPath::ArchPrctl, 2)),
        ),
        "raw-19" => r.put(
            "raw",
            raw(host.request_guest_perm(RequestPath::ArchPrctl, 19)),
        ),
        "raw-64" => {
            r.put(
                "raw",
                raw(host.request_guest_perm(RequestPath::ArchPrctl, 64)),
            );
            let policy = GuestPermission::request(&host, XFeatureSet::from_bits(1 << 63));
            r.put("policy", outcome(&policy));
        }
        "attr" => r.put(
            "raw",
            raw(host.request_guest_perm(RequestPath::KvmDeviceAttr, 18)),
        ),
        "cpuid-first" => {
            // The KVM here may offer no AMX; the kernel's own answer is what is shown, so
            // KVM is said to expose what the CPU has.
            let claimed = KvmClaimsCpu(host);
            let table = amx_table(&kvm)?;
            let result = GuestPermission::request_for_cpuid(&claimed, &table);
            r.put("policy", outcome(&result));
            if let Err(e) = &result {
                r.put("policy_message", e);
            }
            if let Ok(permission) = &result {
                r.put("via", format!("{:?}", permission.requested_via()));
                r.put("check", check_outcome(&permission.check_cpuid(&table)));
            }
        }
        "check-18" => {
            let permission = GuestPermission::request(&host, XFeatureSet::LEGACY)?;
            let table = amx_table(&kvm)?;
            let check = permission.check_cpuid(&table);
            r.put("check", check_outcome(&check));
            if let Err(e) = &check {
                r.put("check_message", e);
            }
            let vm = kvm.create_vm()?;
            let vcpu = permission.create_vcpu(&vm, 0)?;
            r.put(
                "set_cpuid2",
                match vcpu.set_cpuid2(&table) {
                    Ok(()) => "ok".to_string(),
                    Err(e) => e.errno().to_string(),
                },
            );
        }
        "ebusy" => {
            let vm = kvm.create_vm()?;
            let _vcpu = vm.create_vcpu(0)?;
            let table = amx_table(&kvm)?;
            let late = GuestPermission::request_for_cpuid(&KvmClaimsCpu(host), &table);
            r.put("cpuid_first", outcome(&late));
            if let Err(e) = &late {
                r.put("cpuid_first_message", e);
            }
            r.put(
                "raw",
                raw(host.request_guest_perm(RequestPath::ArchPrctl, 18)),
            );
            let claimed = KvmClaimsCpu(host);
            let policy = GuestPermission::request(&claimed, XFeatureSet::DYNAMIC);
            r.put("policy", outcome(&policy));
            if let Err(e) = &policy {
                r.put("policy_message", e);
            }
            let legacy = GuestPermission::request(&host, XFeatureSet::LEGACY)?;
            r.put("legacy_via", format!("{:?}", legacy.requested_via()));
        }
        "amx-guest" => {
            amx_guest(&kvm, &host)?;
            r.put("amx", "ok");
        }
        other => return Err(format!("unknown scenario {other}").into()),
    }
    r.set("perm_after", host.guest_permitted()?);
    Ok(r)
}

// ---------------------------------------------------------------------------------------
// Parent side.
// ---------------------------------------------------------------------------------------

/// What a child reported.
struct Child(HashMap<String, String>);

impl Child {
    fn run(scenario: &str) -> Result<Self, TestError> {
        let exe = std::env::current_exe()?;
        let out = Command::new(exe).env(CHILD_ENV, scenario).output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "child {scenario} failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!("child {scenario}: {}", stdout.trim().replace('\n', " "));
        Ok(Child(
            stdout
                .lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        ))
    }

    fn get(&self, key: &str) -> Result<&str, TestError> {
        self.0
            .get(key)
            .map(String::as_str)
            .ok_or_else(|| TestError::fail(format!("child did not report {key}")))
    }

    fn set(&self, key: &str) -> Result<XFeatureSet, TestError> {
        let v = self.get(key)?;
        u64::from_str_radix(v.trim_start_matches("0x"), 16)
            .map(XFeatureSet::from_bits)
            .map_err(|_| TestError::fail(format!("{key}={v} is not a mask")))
    }

    /// KVM_X86_XCOMP_GUEST_SUPP, which every kernel these tests run on (5.17+) has.
    fn kvm(&self) -> Result<XFeatureSet, TestError> {
        match self.get("kvm")? {
            "none" => Err(TestError::skip(
                "KVM_X86_XCOMP_GUEST_SUPP is missing: a kernel older than 5.17",
            )),
            _ => self.set("kvm"),
        }
    }

    fn errno(&self, key: &str) -> Result<Option<i32>, TestError> {
        match self.get(key)? {
            "ok" => Ok(None),
            v => v
                .parse()
                .map(Some)
                .map_err(|_| TestError::fail(format!("{key}={v} is not an errno"))),
        }
    }
}

/// The three queries in a pristine process agree with each other and with the kernel's
/// documented defaults.
fn queries_in_a_pristine_process(kvm: &Kvm) -> TestResult {
    let c = Child::run("pristine")?;
    let (cpu, perm, kvm_supp) = (c.set("cpu")?, c.set("perm_before")?, c.kvm()?);
    ensure!(
        cpu.contains_all(XFeatureSet::LEGACY),
        "cpu {cpu} lacks x87|sse"
    );
    ensure!(
        cpu.contains_all(perm),
        "guest permission {perm} exceeds cpu {cpu}"
    );
    ensure!(
        cpu.contains_all(kvm_supp),
        "KVM {kvm_supp} exceeds cpu {cpu}"
    );
    ensure_eq!(
        perm,
        cpu.difference(XFeatureSet::DYNAMIC),
        "pristine guest permission {perm} is not cpu {cpu} without dynamic components"
    );
    // The parent process sees the same CPU and KVM (they are not per process).
    let parent = SystemHost::new(kvm);
    ensure_eq!(
        parent.cpu_supported()?,
        cpu,
        "parent and child disagree on cpu"
    );
    ensure_eq!(
        parent.kvm_guest_supported()?,
        Some(kvm_supp),
        "parent and child disagree on KVM"
    );
    let sys_attributes = kvm.check_extension_raw(xstate_perm::sys::KVM_CAP_SYS_ATTRIBUTES.into());
    ensure!(
        sys_attributes > 0,
        "attribute present but KVM_CAP_SYS_ATTRIBUTES is 0"
    );
    Ok(())
}

/// The policy request for tile data: refused for the CPU where it lacks AMX, refused for KVM
/// (with no kernel call, the permission unchanged) where KVM exposes none, granted
/// otherwise.
fn policy_request_for_tiledata(_kvm: &Kvm) -> TestResult {
    let c = Child::run("policy-18")?;
    let (cpu, kvm_supp) = (c.set("cpu")?, c.kvm()?);
    let (before, after) = (c.set("perm_before")?, c.set("perm_after")?);
    let policy = c.get("policy")?;
    if !cpu.contains(XFeature::XtileData) {
        ensure_eq!(
            policy,
            "CpuLacks",
            "cpu {cpu} lacks AMX but the policy said {policy}"
        );
        ensure_eq!(after, before, "permission changed from {before} to {after}");
    } else if !kvm_supp.contains(XFeature::XtileData) {
        ensure_eq!(
            policy,
            "KvmWillNotExpose",
            "KVM {kvm_supp} exposes no AMX but the policy said {policy}"
        );
        let message = c.get("policy_message")?;
        ensure!(
            message.contains("KVM will not expose xtilecfg|xtiledata"),
            "message: {message}"
        );
        ensure!(
            after == before && !after.contains(XFeature::XtileData),
            "the refused request changed the permission from {before} to {after}"
        );
    } else {
        ensure_eq!(policy, "Ok", "KVM exposes AMX but the policy said {policy}");
        ensure!(
            after.contains_all(XFeatureSet::AMX),
            "permission {after} lacks AMX"
        );
        ensure!(
            c.set("guest")?.contains_all(XFeatureSet::AMX),
            "guest features lack AMX"
        );
    }
    Ok(())
}

/// The kernel's own answer to `ARCH_REQ_XCOMP_GUEST_PERM(18)`: granted wherever the CPU has
/// AMX, even where KVM would not expose it, and KVM_CAP_XSAVE2 then follows KVM's filter.
fn kernel_grants_tiledata_where_the_cpu_has_it(kvm: &Kvm) -> TestResult {
    let c = Child::run("raw-18")?;
    let (cpu, kvm_supp) = (c.set("cpu")?, c.kvm()?);
    let (before, after) = (c.set("perm_before")?, c.set("perm_after")?);
    let errno = c.errno("raw")?;
    if cpu.contains(XFeature::XtileData) {
        ensure!(
            errno.is_none(),
            "request for 18 failed with errno {errno:?}"
        );
        ensure_eq!(
            after,
            before.union(XFeatureSet::DYNAMIC),
            "permission went from {before} to {after}"
        );
    } else {
        ensure_eq!(
            errno,
            Some(libc::EOPNOTSUPP),
            "cpu {cpu} lacks 18, errno {errno:?}"
        );
        ensure_eq!(after, before, "permission changed to {after}");
    }
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    let layout = XsaveLayout::from_kvm_cpuid(&supported)?;
    let xsave2: i32 = c
        .get("xsave2")?
        .parse()
        .map_err(|_| TestError::fail("xsave2 not a number"))?;
    layout.check_xsave2(xsave2, kvm_filtered_xcr0(kvm_supp, after))?;
    // The policy still refuses what KVM will not expose, permission or not.
    let policy = c.get("policy")?;
    let expected = if !cpu.contains(XFeature::XtileData) {
        "CpuLacks"
    } else if !kvm_supp.contains(XFeature::XtileData) {
        "KvmWillNotExpose"
    } else {
        "Ok"
    };
    ensure_eq!(
        policy,
        expected,
        "policy after the grant: {policy}, expected {expected}"
    );
    if !cpu.contains(XFeature::XtileData) {
        return Err(TestError::skip(format!(
            "the CPU ({cpu}) has no AMX: checked that the kernel refuses component 18 with \
             EOPNOTSUPP, but a grant cannot be shown here"
        )));
    }
    Ok(())
}

/// EINVAL: a component beyond every kernel's XFEATURE_MAX. The policy refuses it itself.
fn einval_for_a_component_beyond_the_kernel(_kvm: &Kvm) -> TestResult {
    let c = Child::run("raw-64")?;
    let errno = c.errno("raw")?;
    ensure_eq!(errno, Some(libc::EINVAL), "component 64: errno {errno:?}");
    let policy = c.get("policy")?;
    ensure_eq!(policy, "UnknownComponent", "policy for bit 63: {policy}");
    ensure_eq!(
        c.set("perm_after")?,
        c.set("perm_before")?,
        "permission changed"
    );
    Ok(())
}

/// EOPNOTSUPP: a component that is not dynamic (AVX, 2) has no permission to grant; and
/// APX (19), which this CPU may lack, is refused too.
fn eopnotsupp_for_a_static_component(_kvm: &Kvm) -> TestResult {
    let c = Child::run("raw-2")?;
    let errno = c.errno("raw")?;
    ensure_eq!(
        errno,
        Some(libc::EOPNOTSUPP),
        "component 2: errno {errno:?}"
    );
    let c = Child::run("raw-19")?;
    let errno = c.errno("raw")?;
    if !c.set("cpu")?.contains(XFeature::Apx) {
        // EOPNOTSUPP where the kernel knows APX, EINVAL where its XFEATURE_MAX is 19.
        ensure!(
            errno == Some(libc::EOPNOTSUPP) || errno == Some(libc::EINVAL),
            "component 19 without APX: errno {errno:?}"
        );
    }
    ensure_eq!(
        c.set("perm_after")?,
        c.set("perm_before")?,
        "permission changed"
    );
    Ok(())
}

/// The CPUID-first door with a table that advertises AMX: where the CPU has AMX the kernel
/// grants component 18 (through the KVM attribute where the kernel has it, else
/// arch_prctl), and the table then passes the check; where it does not, the policy says the
/// CPU lacks it, with no request.
fn cpuid_first_request_grants_tiledata(_kvm: &Kvm) -> TestResult {
    let c = Child::run("cpuid-first")?;
    let cpu = c.set("cpu")?;
    let (before, after) = (c.set("perm_before")?, c.set("perm_after")?);
    let policy = c.get("policy")?;
    if !cpu.contains(XFeature::XtileData) {
        ensure_eq!(
            policy,
            "CpuLacks",
            "cpu {cpu} lacks AMX, policy said {policy}"
        );
        ensure_eq!(after, before, "permission changed from {before} to {after}");
        return Err(TestError::skip(format!(
            "the CPU ({cpu}) has no AMX: checked that the CPUID-first request says so \
             without a request, but a grant cannot be shown here"
        )));
    }
    ensure_eq!(
        policy,
        "Ok",
        "policy: {policy}: {:?}",
        c.get("policy_message")
    );
    ensure_eq!(
        after,
        before.with(XFeature::XtileData),
        "permission went from {before} to {after}"
    );
    let via = c.get("via")?;
    ensure!(
        via == "Some(ArchPrctl)" || via == "Some(KvmDeviceAttr)",
        "granted via {via}"
    );
    ensure_eq!(
        c.get("check")?,
        "Ok",
        "check after the grant: {}",
        c.get("check")?
    );
    Ok(())
}

/// The check of a table that advertises AMX, against a permission without tile data, names
/// component 18, and KVM_SET_CPUID2 of that table does answer EPERM (`kvm_check_cpuid` →
/// `__xfd_enable_feature`), on any CPU.
fn cpuid_check_names_the_component_kvm_refuses(_kvm: &Kvm) -> TestResult {
    let c = Child::run("check-18")?;
    let check = c.get("check")?;
    ensure_eq!(
        check,
        "WouldBeRefused:0x40000",
        "check of an AMX table without permission: {check}"
    );
    let message = c.get("check_message")?;
    ensure!(
        message.contains("component 18 (xtiledata)") && message.contains("EPERM"),
        "message: {message}"
    );
    let set = c.errno("set_cpuid2")?;
    ensure_eq!(
        set,
        Some(libc::EPERM),
        "KVM_SET_CPUID2 of the AMX table: errno {set:?}, the check predicted EPERM"
    );
    Ok(())
}

/// EBUSY: once a vCPU exists the permission is frozen; the policy says "too late", and a
/// request for what is already permitted still succeeds without a kernel call.
fn ebusy_after_the_first_vcpu(_kvm: &Kvm) -> TestResult {
    let c = Child::run("ebusy")?;
    let cpu = c.set("cpu")?;
    let errno = c.errno("raw")?;
    ensure_eq!(c.get("legacy_via")?, "None", "legacy request made a call");
    ensure_eq!(
        c.set("perm_after")?,
        c.set("perm_before")?,
        "permission changed"
    );
    if !cpu.contains(XFeature::XtileData) {
        ensure_eq!(
            errno,
            Some(libc::EOPNOTSUPP),
            "cpu {cpu} lacks 18, errno {errno:?}"
        );
        return Err(TestError::skip(format!(
            "the CPU ({cpu}) has no dynamic component, so the kernel answers EOPNOTSUPP \
             before it checks the vCPU lock"
        )));
    }
    ensure_eq!(
        errno,
        Some(libc::EBUSY),
        "request after a vCPU: errno {errno:?}"
    );
    let policy = c.get("policy")?;
    ensure_eq!(policy, "TooLate", "policy after a vCPU: {policy}");
    let late = c.get("cpuid_first")?;
    ensure_eq!(late, "TooLate", "CPUID-first request after a vCPU: {late}");
    ensure!(
        c.get("cpuid_first_message")?
            .starts_with("too late: a vCPU already exists"),
        "message: {}",
        c.get("cpuid_first_message")?
    );
    ensure!(
        c.get("policy_message")?
            .starts_with("too late: a vCPU already exists"),
        "message: {}",
        c.get("policy_message")?
    );
    Ok(())
}

/// The proposed KVM attribute, with the component number in `addr`: a kernel without it
/// answers EINVAL or ENXIO and nothing changes (the policy then falls back to arch_prctl); a
/// kernel with it grants component 18 where KVM supports it and answers EOPNOTSUPP where KVM
/// does not.
fn kvm_guest_perm_attribute(_kvm: &Kvm) -> TestResult {
    let c = Child::run("attr")?;
    let errno = c.errno("raw")?;
    let (before, after) = (c.set("perm_before")?, c.set("perm_after")?);
    match errno {
        Some(libc::EINVAL) | Some(libc::ENXIO) => {
            ensure_eq!(after, before, "permission changed from {before} to {after}");
        }
        Some(libc::EOPNOTSUPP) => {
            ensure!(
                !c.kvm()?.contains(XFeature::XtileData) && after == before,
                "EOPNOTSUPP although KVM supports {}; permission {before} -> {after}",
                c.kvm()?
            );
        }
        None => {
            ensure!(
                after.contains(XFeature::XtileData),
                "the attribute succeeded but the permission is {after}"
            );
        }
        Some(e) => ensure!(false, "KVM_SET_DEVICE_ATTR(attr 1, 18): errno {e}"),
    }
    Ok(())
}

/// Requests every kernel refuses leave this process's permission alone, so they can run in
/// the test process itself: component 64 (EINVAL), AVX (EOPNOTSUPP) and, where KVM does not
/// offer it, the proposed KVM attribute.
fn refused_requests_change_nothing(kvm: &Kvm) -> TestResult {
    let host = SystemHost::new(kvm);
    let before = host.guest_permitted()?;
    let errno = |r: host::Result<()>| r.err().map(|e| e.errno());
    let e = errno(host.request_guest_perm(RequestPath::ArchPrctl, 64));
    ensure_eq!(e, Some(libc::EINVAL), "component 64: {e:?}");
    let e = errno(host.request_guest_perm(RequestPath::ArchPrctl, XFeature::Avx.index()));
    ensure_eq!(e, Some(libc::EOPNOTSUPP), "component 2: {e:?}");
    // Component 64 through the proposed attribute: EINVAL on a kernel without it and on
    // one with it (whose xstate_request_perm refuses it too) alike.
    let e = errno(host.request_guest_perm(RequestPath::KvmDeviceAttr, 64));
    ensure!(
        matches!(
            e,
            Some(libc::EINVAL) | Some(libc::ENXIO) | Some(libc::EOPNOTSUPP)
        ),
        "attr 1 for component 64: {e:?}"
    );
    ensure_eq!(
        host.guest_permitted()?,
        before,
        "a refused request changed the permission"
    );
    Ok(())
}

/// The layout KVM reports agrees with the host CPU's, and KVM_CAP_XSAVE2 is the standard
/// size of what guests of this process may use. (No test in this process requests.)
fn xsave2_size_matches_the_layout(kvm: &Kvm) -> TestResult {
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    let layout = XsaveLayout::from_kvm_cpuid(&supported)?;
    let host_layout = XsaveLayout::host()?;
    for i in layout.enumerated().indices() {
        if let (Some(a), Some(b)) = (layout.component(i), host_layout.component(i)) {
            ensure_eq!(
                (a.size, a.offset),
                (b.size, b.offset),
                "component {i}: KVM {a:?}, host {b:?}"
            );
        }
    }
    let host = SystemHost::new(kvm);
    let Some(kvm_supp) = host.kvm_guest_supported()? else {
        return Err(TestError::skip(
            "KVM_X86_XCOMP_GUEST_SUPP missing (pre-5.17)",
        ));
    };
    let guest = kvm_filtered_xcr0(kvm_supp, host.guest_permitted()?);
    ensure_eq!(
        layout.xcr0_supported(),
        guest,
        "KVM_GET_SUPPORTED_CPUID leaf 0xD has {}, filtered xcr0 is {guest}",
        layout.xcr0_supported()
    );
    let vm = kvm.create_vm()?;
    let size = layout.check_xsave2(vm.check_extension_int(Cap::Xsave2), guest)?;
    eprintln!("KVM_CAP_XSAVE2 = {size} for guest features {guest}");
    let permission = GuestPermission::request(&host, XFeatureSet::LEGACY)?;
    ensure!(
        permission.requested_via().is_none(),
        "legacy request made a call"
    );
    ensure_eq!(
        permission.xsave2_size(&layout)?,
        size,
        "permission's size differs"
    );
    Ok(())
}

/// Get/set round trip: a guest loads XMM0, the host reads it from the XSAVE image, writes
/// XMM1 into the image, and the guest stores XMM1 back; the image also moves into a new
/// vCPU. (`movdqu` is used because KVM's instruction emulator, which runs guest ring-0 code
/// on PVM hosts, implements it.)
fn xsave_round_trip(kvm: &Kvm) -> TestResult {
    const XMM0: u128 = 0x0011_2233_4455_6677_0123_4567_89ab_cdef;
    const XMM1: u128 = 0x8899_aabb_ccdd_eeff_feed_face_cafe_f00d;
    const XMM0_SRC: u64 = 0x9100;
    const XMM1_DST: u64 = 0x9000;
    let code = [
        0xf3, 0x0f, 0x6f, 0x04, 0x25, 0x00, 0x91, 0x00, 0x00, // movdqu xmm0, [XMM0_SRC]
        0xf4, // hlt
        0xf3, 0x0f, 0x7f, 0x0c, 0x25, 0x00, 0x90, 0x00, 0x00, // movdqu [XMM1_DST], xmm1
        0xf4, // hlt
    ];
    let host = SystemHost::new(kvm);
    let permission = GuestPermission::request(&host, XFeatureSet::LEGACY)?;
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    let layout = XsaveLayout::from_kvm_cpuid(&supported)?;
    let mut guest = TinyGuest::long_mode(kvm, &code)?;
    guest.write(XMM0_SRC, &XMM0.to_le_bytes())?;
    guest
        .vcpu
        .set_cpuid2(&permission.guest_cpuid(&supported)?)?;
    guest.expect_exit(GuestExit::Hlt)?;

    let mut state = XsaveState::get(&guest.vm, &guest.vcpu)?;
    ensure_eq!(
        state.as_bytes().len(),
        kvm_ioctls_xsave2(&guest.vm)?,
        "image size differs from KVM_CAP_XSAVE2"
    );
    let sse = state
        .component(&layout, XFeature::Sse.index())
        .ok_or_else(|| TestError::fail("no SSE component"))?;
    ensure_eq!(
        sse[..16],
        XMM0.to_le_bytes(),
        "XMM0 in the image is {:02x?}",
        &sse[..16]
    );
    let sse = state
        .component_mut(&layout, XFeature::Sse.index())
        .ok_or_else(|| TestError::fail("no SSE component"))?;
    sse[16..32].copy_from_slice(&XMM1.to_le_bytes());
    state.set(&guest.vm, &guest.vcpu)?;
    let reread = XsaveState::get(&guest.vm, &guest.vcpu)?;
    ensure_eq!(
        reread.component(&layout, 1),
        state.component(&layout, 1),
        "SSE state did not survive KVM_SET_XSAVE"
    );
    guest.expect_exit(GuestExit::Hlt)?;
    let stored = guest.read(XMM1_DST, 16)?;
    ensure_eq!(
        stored,
        XMM1.to_le_bytes(),
        "guest read XMM1 as {stored:02x?}"
    );

    // The same image in a second vCPU, created through the permission.
    let second = permission.create_vcpu(&guest.vm, 1)?;
    state.set(&guest.vm, &second)?;
    let moved = XsaveState::get(&guest.vm, &second)?;
    ensure_eq!(
        moved.component(&layout, 1),
        state.component(&layout, 1),
        "SSE state did not move into a new vCPU"
    );
    let short = XsaveState::from_bytes(state.as_bytes()[..4096].to_vec())?;
    if state.as_bytes().len() > 4096 {
        ensure!(
            short.set(&guest.vm, &second).is_err(),
            "a short image was accepted"
        );
    }
    Ok(())
}

fn kvm_ioctls_xsave2(vm: &kvm_ioctls::VmFd) -> Result<usize, TestError> {
    usize::try_from(vm.check_extension_int(Cap::Xsave2))
        .map_err(|_| TestError::fail("KVM_CAP_XSAVE2 negative"))
}

/// A guest loads an AMX tile; its state survives KVM_GET_XSAVE2 → KVM_SET_XSAVE into a new
/// vCPU, which stores the tile back to memory.
fn amx_tiles_survive_save_restore(kvm: &Kvm) -> TestResult {
    let host = SystemHost::new(kvm);
    let cpu = host.cpu_supported()?;
    let kvm_supp = host
        .kvm_guest_supported()?
        .ok_or_else(|| TestError::skip("KVM_X86_XCOMP_GUEST_SUPP missing (pre-5.17)"))?;
    if !kvm_supp.contains(XFeature::XtileData) {
        return Err(TestError::skip(format!(
            "KVM_X86_XCOMP_GUEST_SUPP is {kvm_supp:#x} ({kvm_supp}): KVM exposes no AMX tile \
             data (bit 18) to guests here (CPU: {cpu})"
        )));
    }
    let c = Child::run("amx-guest")?;
    ensure_eq!(c.get("amx")?, "ok", "AMX guest: {}", c.get("amx")?);
    Ok(())
}

const VEC_SRC: u64 = 0x9100;
const VEC_DST: u64 = 0x9000;

/// A tiny guest sets XCR0 (x87|sse, and AVX where the guest CPUID has it) and loads xmm0;
/// the host also puts a value into ymm0's upper half in the saved image where AVX is
/// enabled. The extended state, saved and put through serde, restores into a fresh vCPU of
/// a new VM, whose guest reads XCR0 and xmm0 back, and whose saved image holds the same
/// upper half; XCR0 is read from the new vCPU after its guest ran. (`movdqu` and `xsetbv`
/// only: on PVM hosts guest ring-0 code goes through KVM's instruction emulator, which has
/// neither VEX moves nor `xgetbv`.)
fn extended_state_moves_to_a_new_vm(kvm: &Kvm) -> TestResult {
    let host = SystemHost::new(kvm);
    let permission = GuestPermission::request(&host, XFeatureSet::LEGACY)?;
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    let cpuid = permission.guest_cpuid(&supported)?;
    let layout = XsaveLayout::from_kvm_cpuid(&cpuid)?;
    let guest_xcr0 = xstate_perm::cpuid::xcr0_enumerated(cpuid.as_slice());
    let avx = guest_xcr0.contains(XFeature::Avx);
    let xcr0: u8 = if avx { 0b111 } else { 0b11 };
    let load = [
        0x31, 0xc9, // xor ecx, ecx
        0xb8, xcr0, 0x00, 0x00, 0x00, // mov eax, xcr0
        0x31, 0xd2, // xor edx, edx
        0x0f, 0x01, 0xd1, // xsetbv
        0xf3, 0x0f, 0x6f, 0x04, 0x25, 0x00, 0x91, 0x00, 0x00, // movdqu xmm0, [VEC_SRC]
        0xf4, // hlt
    ];
    let store = [
        0xf3, 0x0f, 0x7f, 0x04, 0x25, 0x00, 0x90, 0x00, 0x00, // movdqu [VEC_DST], xmm0
        0xf4, // hlt
    ];
    let value: Vec<u8> = (0..32u8).map(|i| 0xa5 ^ i.wrapping_mul(29)).collect();
    let (xmm0, ymm0_high) = value.split_at(16);

    let mut first = TinyGuest::long_mode(kvm, &load)?;
    first.write(VEC_SRC, &value)?;
    enable_xsave(&first.vcpu, &cpuid).map_err(|e| TestError::fail(e.to_string()))?;
    first.expect_exit(GuestExit::Hlt)?;
    let mut xcrs = first.vcpu.get_xcrs()?;
    if xcrs.nr_xcrs >= 1 && xcrs.xcrs[0].value != u64::from(xcr0) {
        // The guest's XSETBV did not reach KVM. Only the reset value is acceptable here: that
        // is what a layer below KVM that runs XSETBV without its SVM intercept leaves (QEMU
        // 7.2's TCG, under the nested test host). KVM's view is what migrates, so set it
        // from the host to the value the guest chose.
        ensure_eq!(
            xcrs.xcrs[0].value,
            1,
            "after the guest's XSETBV({xcr0:#x}) KVM reports XCR0 {:#x}",
            xcrs.xcrs[0].value
        );
        eprintln!(
            "the guest's XSETBV did not reach KVM (XCR0 still 0x1); setting XCR0 {xcr0:#x} with \
             KVM_SET_XCRS"
        );
        xcrs.xcrs[0].value = u64::from(xcr0);
        first.vcpu.set_xcrs(&xcrs)?;
    }
    let saved = VcpuXstate::save(&first.vm, &first.vcpu)?;
    ensure_eq!(
        saved.xcr0(),
        Some(XFeatureSet::from_bits(u64::from(xcr0))),
        "saved XCR0 {:?}, the guest set {xcr0:#x}",
        saved.xcr0()
    );
    ensure_eq!(
        (saved.xfd, saved.xfd_err),
        (0, 0),
        "XFD {:#x}, XFD_ERR {:#x} in a guest that never touched them",
        saved.xfd,
        saved.xfd_err
    );
    let mut saved = saved;
    if avx {
        let upper = saved
            .xsave
            .component_mut(&layout, XFeature::Avx.index())
            .ok_or_else(|| TestError::fail("no AVX component in the image"))?;
        upper[..16].copy_from_slice(ymm0_high);
        let bv = saved.xsave.xstate_bv().with(XFeature::Avx).bits();
        saved.xsave.as_bytes_mut()[512..520].copy_from_slice(&bv.to_le_bytes());
    }
    let json = serde_json::to_vec(&saved).map_err(|e| TestError::fail(e.to_string()))?;
    let moved: VcpuXstate =
        serde_json::from_slice(&json).map_err(|e| TestError::fail(e.to_string()))?;
    drop(first);

    let mut second = TinyGuest::long_mode(kvm, &store)?;
    enable_xsave(&second.vcpu, &cpuid).map_err(|e| TestError::fail(e.to_string()))?;
    moved.restore(&permission, &second.vm, &second.vcpu)?;
    let again = VcpuXstate::save(&second.vm, &second.vcpu)?;
    ensure!(
        again.xcrs == moved.xcrs && (again.xfd, again.xfd_err) == (moved.xfd, moved.xfd_err),
        "restored XCRs/XFD read back as {:?}",
        (&again.xcrs, again.xfd, again.xfd_err)
    );
    second.expect_exit(GuestExit::Hlt)?;
    let after = VcpuXstate::save(&second.vm, &second.vcpu)?;
    ensure_eq!(
        after.xcr0(),
        Some(XFeatureSet::from_bits(u64::from(xcr0))),
        "XCR0 of the restored vCPU after its guest ran: {:?}",
        after.xcr0()
    );
    let stored = second.read(VEC_DST, 16)?;
    ensure_eq!(
        stored,
        xmm0,
        "the restored guest stored xmm0 as {stored:02x?}, expected {xmm0:02x?}"
    );
    if avx {
        let upper = after
            .xsave
            .component(&layout, XFeature::Avx.index())
            .ok_or_else(|| TestError::fail("no AVX component after the restore"))?;
        ensure_eq!(
            &upper[..16],
            ymm0_high,
            "ymm0's upper half after the move is {:02x?}",
            &upper[..16]
        );
    }

    // A state that does not fit the target is refused before anything is written. What the
    // target enables is KVM's view of its CPUID (KVM_GET_CPUID2), queried here too: PVM
    // hosts report their own table there whatever KVM_SET_CPUID2 was given.
    let legacy = xstate_perm::layout::guest_cpuid(&supported, XFeatureSet::LEGACY)?;
    let third = TinyGuest::long_mode(kvm, &store)?;
    third.vcpu.set_cpuid2(&legacy)?;
    let target = xstate_perm::cpuid::xcr0_enumerated(
        third.vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES)?.as_slice(),
    )
    .intersection(permission.kvm_supported());
    eprintln!("target vCPU enables {target} (KVM_GET_CPUID2)");
    let before = VcpuXstate::save(&third.vm, &third.vcpu)?;
    if avx && !target.contains(XFeature::Avx) {
        let refused = moved.restore(&permission, &third.vm, &third.vcpu);
        ensure!(
            matches!(
                refused,
                Err(xstate_perm::state::Error::Rejected(
                    xstate_perm::state::StateRule::Xcr0OutsideGuest { .. }
                ))
            ),
            "restore of XCR0 {xcr0:#x} into a vCPU enabling {target}: {refused:?}"
        );
    }
    if !target.contains(XFeature::XtileData) {
        // IA32_XFD arming tile data, for a vCPU without tile data: refused by the check, and
        // by KVM itself, which processes none of the entry (kvm_set_msr_common).
        // The target's own state fits it but for the XFD.
        let mut armed = before.clone();
        armed.xfd = XFeatureSet::DYNAMIC.bits();
        let refused = armed.restore(&permission, &third.vm, &third.vcpu);
        ensure!(
            matches!(
                refused,
                Err(xstate_perm::state::Error::Rejected(
                    xstate_perm::state::StateRule::XfdOutsideGuest { msr: 0x1c4, .. }
                ))
            ),
            "restore of XFD 1<<18 into a vCPU enabling {target}: {refused:?}"
        );
        let raw = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: xstate_perm::sys::MSR_IA32_XFD,
            data: XFeatureSet::DYNAMIC.bits(),
            ..Default::default()
        }])
        .map_err(|e| TestError::fail(format!("{e:?}")))?;
        let processed = third.vcpu.set_msrs(&raw)?;
        ensure_eq!(
            processed,
            0,
            "KVM accepted XFD 1<<18 for a vCPU enabling {target}"
        );
    }
    ensure_eq!(
        VcpuXstate::save(&third.vm, &third.vcpu)?,
        before,
        "a refused restore changed the vCPU"
    );
    Ok(())
}

const TILE_CFG: u64 = 0x2_0000;
const TILE_DATA: u64 = 0x2_1000;
const TILE_OUT: u64 = 0x2_2000;

fn amx_guest(kvm: &Kvm, host: &SystemHost<'_>) -> Result<(), Box<dyn std::error::Error>> {
    let permission = GuestPermission::request_feature(host, XFeature::XtileData)?;
    let load = [
        0x31, 0xc9, // xor ecx, ecx
        0xb8, 0x03, 0x00, 0x06, 0x00, // mov eax, 0x60003 (x87|sse|tilecfg|tiledata)
        0x31, 0xd2, // xor edx, edx
        0x0f, 0x01, 0xd1, // xsetbv
        0xbf, 0x00, 0x00, 0x02, 0x00, // mov edi, TILE_CFG
        0xc4, 0xe2, 0x78, 0x49, 0x07, // ldtilecfg [rdi]
        0xbe, 0x00, 0x10, 0x02, 0x00, // mov esi, TILE_DATA
        0xba, 0x40, 0x00, 0x00, 0x00, // mov edx, 64 (stride)
        0xc4, 0xe2, 0x7b, 0x4b, 0x04, 0x16, // tileloadd tmm0, [rsi+rdx*1]
        0xf4, // hlt
    ];
    let store = [
        0xbe, 0x00, 0x20, 0x02, 0x00, // mov esi, TILE_OUT
        0xba, 0x40, 0x00, 0x00, 0x00, // mov edx, 64
        0xc4, 0xe2, 0x7a, 0x4b, 0x04, 0x16, // tilestored [rsi+rdx*1], tmm0
        0xf4, // hlt
    ];
    // Palette 1; tmm0: 16 rows of 64 bytes (colsb[0] at byte 16, rows[0] at byte 48).
    let mut cfg = [0u8; 64];
    cfg[0] = 1;
    cfg[16..18].copy_from_slice(&64u16.to_le_bytes());
    cfg[48] = 16;
    let data: Vec<u8> = (0..1024u32).map(|i| (i * 7 + 3) as u8).collect();

    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    let cpuid = permission.guest_cpuid(&supported)?;
    let layout = XsaveLayout::from_kvm_cpuid(&cpuid)?;
    let mut guest = TinyGuest::long_mode(kvm, &load)?;
    guest.write(TILE_CFG, &cfg)?;
    guest.write(TILE_DATA, &data)?;
    enable_xsave(&guest.vcpu, &cpuid)?;
    guest.expect_exit(GuestExit::Hlt)?;

    let state = XsaveState::get(&guest.vm, &guest.vcpu)?;
    if !state.xstate_bv().contains_all(XFeatureSet::AMX) {
        return Err(format!("XSTATE_BV {} lacks AMX after tileloadd", state.xstate_bv()).into());
    }
    let tiles = state
        .component(&layout, XFeature::XtileData.index())
        .ok_or("no tile data in the image")?;
    if tiles[..1024] != data[..] {
        return Err("tmm0 in the XSAVE image differs from the loaded data".into());
    }

    // The whole extended state, through serde, into a vCPU of a new VM whose code stores
    // tmm0 to its own memory.
    let saved = VcpuXstate::save(&guest.vm, &guest.vcpu)?;
    if saved.xcr0() != Some(XFeatureSet::from_bits(0x60003)) {
        return Err(format!("saved XCR0 {:?}, the guest set 0x60003", saved.xcr0()).into());
    }
    let moved: VcpuXstate = serde_json::from_slice(&serde_json::to_vec(&saved)?)?;
    let mut restored = TinyGuest::long_mode(kvm, &store)?;
    enable_xsave(&restored.vcpu, &cpuid)?;
    moved.restore(&permission, &restored.vm, &restored.vcpu)?;
    restored.expect_exit(GuestExit::Hlt)?;
    if restored.read(TILE_OUT, 1024)? != data {
        return Err("tmm0 stored by the vCPU of the new VM differs".into());
    }
    Ok(())
}

/// Sets the guest CPUID (XSAVE and AMX) and CR4.OSXSAVE so that the guest may XSETBV.
fn enable_xsave(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), Box<dyn std::error::Error>> {
    const CR4_OSXSAVE: u64 = 1 << 18;
    vcpu.set_cpuid2(cpuid)?;
    let mut sregs = vcpu.get_sregs()?;
    sregs.cr4 |= CR4_OSXSAVE;
    vcpu.set_sregs(&sregs)?;
    Ok(())
}

/// Guest CPUID for a real guest: only the XSTATE leaves change (0xD, 7, 0x1D, 0x1E), and what
/// the result advertises is what guests of this process can use.
fn guest_cpuid_keeps_other_leaves(kvm: &Kvm) -> TestResult {
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    let host = SystemHost::new(kvm);
    let permission = GuestPermission::request(&host, XFeatureSet::LEGACY)?;
    let guest = permission.guest_cpuid(&supported)?;
    let not_d = |c: &CpuId| -> Vec<kvm_cpuid_entry2> {
        c.as_slice()
            .iter()
            .filter(|e| !matches!(e.function, 0x7 | 0xd | 0x1d | 0x1e))
            .copied()
            .collect()
    };
    ensure_eq!(not_d(&guest), not_d(&supported), "other leaves changed");
    permission.check_cpuid(&guest)?;
    ensure!(
        permission
            .guest_features()
            .contains_all(xstate_perm::cpuid::advertised(&guest)),
        "guest CPUID advertises {}, permission gives {}",
        xstate_perm::cpuid::advertised(&guest),
        permission.guest_features()
    );
    let layout = XsaveLayout::from_kvm_cpuid(&guest)?;
    ensure_eq!(
        layout.xcr0_supported(),
        permission.guest_features(),
        "guest leaf 0xD has {}, permission gives {}",
        layout.xcr0_supported(),
        permission.guest_features()
    );
    let cost = permission.cost(&layout)?;
    ensure_eq!(
        cost.components,
        permission.guest_features().intersection(XFeatureSet::AMX),
        "cost counts {}",
        cost.components
    );
    eprintln!("per-vCPU cost here: {cost:?}");
    Ok(())
}

fn main() {
    if let Ok(scenario) = std::env::var(CHILD_ENV) {
        match child(&scenario) {
            Ok(report) => {
                for (k, v) in report.0 {
                    println!("{k}={v}");
                }
                std::process::exit(0);
            }
            Err(e) => {
                eprintln!("scenario {scenario}: {e}");
                std::process::exit(2);
            }
        }
    }
    harness::main(vec![
        KvmTest::new(
            "queries_in_a_pristine_process",
            queries_in_a_pristine_process,
        ),
        KvmTest::new("policy_request_for_tiledata", policy_request_for_tiledata),
        KvmTest::new(
            "kernel_grants_tiledata_where_the_cpu_has_it",
            kernel_grants_tiledata_where_the_cpu_has_it,
        ),
        KvmTest::new(
            "einval_for_a_component_beyond_the_kernel",
            einval_for_a_component_beyond_the_kernel,
        ),
        KvmTest::new(
            "eopnotsupp_for_a_static_component",
            eopnotsupp_for_a_static_component,
        ),
        KvmTest::new("ebusy_after_the_first_vcpu", ebusy_after_the_first_vcpu),
        KvmTest::new(
            "cpuid_first_request_grants_tiledata",
            cpuid_first_request_grants_tiledata,
        ),
        KvmTest::new(
            "cpuid_check_names_the_component_kvm_refuses",
            cpuid_check_names_the_component_kvm_refuses,
        ),
        KvmTest::new(
            "extended_state_moves_to_a_new_vm",
            extended_state_moves_to_a_new_vm,
        ),
        KvmTest::new("kvm_guest_perm_attribute", kvm_guest_perm_attribute),
        KvmTest::new(
            "refused_requests_change_nothing",
            refused_requests_change_nothing,
        ),
        KvmTest::new(
            "xsave2_size_matches_the_layout",
            xsave2_size_matches_the_layout,
        ),
        KvmTest::new("xsave_round_trip", xsave_round_trip),
        KvmTest::new(
            "guest_cpuid_keeps_other_leaves",
            guest_cpuid_keeps_other_leaves,
        ),
        KvmTest::new(
            "amx_tiles_survive_save_restore",
            amx_tiles_survive_save_restore,
        ),
    ])
}
