//! A libtest-compatible harness for tests that need `/dev/kvm`.
//!
//! Skips are honest: a test whose requirements the host does not meet is reported by libtest
//! as `ignored, <reason>`, and the summary line counts it under `ignored`, never under
//! `passed`. Running such a test anyway (`--include-ignored` has nothing to include: the
//! decision is taken at run time) cannot turn it into a pass either.
//!
//! Environment:
//! * `REQUIRE_KVM=1` — a missing or unusable `/dev/kvm` fails every KVM test instead of
//!   skipping it. Missing *features* (a capability, a VM type) still skip: no host has all.
//! * `NESTED_KVM_VENDOR=<module>` — set by the nested test host; [`Requirement::VendorModule`]
//!   and [`vendor_module`] use it to prove which KVM a run was on.

use std::fmt;
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};
use libtest_mimic::{Arguments, Completion, Failed, Trial};

/// Why a test did not pass: it failed, or it could not run on this host.
///
/// Any error converts into [`TestError::Fail`], so test bodies can use `?` freely.
#[derive(Debug)]
pub enum TestError {
    /// The test ran and its expectation did not hold.
    Fail(String),
    /// The host lacks something the test needs; the message says what.
    Skip(String),
}

impl TestError {
    /// A skip with the given reason.
    pub fn skip(reason: impl Into<String>) -> Self {
        TestError::Skip(reason.into())
    }

    /// A failure with the given message.
    pub fn fail(message: impl Into<String>) -> Self {
        TestError::Fail(message.into())
    }
}

impl<E: std::error::Error> From<E> for TestError {
    fn from(e: E) -> Self {
        let mut message = e.to_string();
        let mut source = e.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        TestError::Fail(message)
    }
}

impl fmt::Display for TestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TestError::Fail(m) => write!(f, "{m}"),
            TestError::Skip(m) => write!(f, "skipped: {m}"),
        }
    }
}

/// What a test body returns.
pub type TestResult = Result<(), TestError>;

/// Returns `Err(TestError::Fail)` with the formatted message unless the condition holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err($crate::TestError::fail(format!($($fmt)+)));
        }
    };
}

/// Returns `Err(TestError::Fail)` unless the two values are equal; the message says what was
/// compared, with both values (`Debug`), and the optional formatted context.
///
/// ```
/// use kvm_test_support::{ensure_eq, TestResult};
///
/// fn check(rax: u64) -> TestResult {
///     ensure_eq!(rax, 0x42, "RAX after the guest's `mov`");
///     Ok(())
/// }
/// assert!(check(0x42).is_ok());
/// let message = check(7).unwrap_err().to_string();
/// assert_eq!(message, "RAX after the guest's `mov`: `rax` is 7, expected 66 (`0x42`)");
/// ```
#[macro_export]
macro_rules! ensure_eq {
    ($left:expr, $right:expr $(,)?) => {
        $crate::ensure_eq!($left, $right, "values differ")
    };
    ($left:expr, $right:expr, $($fmt:tt)+) => {
        match (&$left, &$right) {
            (left, right) => {
                if !(*left == *right) {
                    return Err($crate::TestError::fail(format!(
                        "{}: `{}` is {:?}, expected {:?} (`{}`)",
                        format_args!($($fmt)+),
                        stringify!($left),
                        left,
                        right,
                        stringify!($right),
                    )));
                }
            }
        }
    };
}

/// A host feature a test needs before it can run.
#[derive(Debug, Clone)]
pub enum Requirement {
    /// A `KVM_CHECK_EXTENSION` capability that must be non-zero.
    Cap(Cap),
    /// A capability given by its raw number (for capabilities kvm-ioctls does not name);
    /// the second field is the capability's name for the skip message.
    RawCap(u32, &'static str),
    /// A raw capability whose value must contain every bit of the mask.
    RawCapMask(u32, &'static str, u64),
    /// The KVM vendor module (`kvm_amd`, `kvm_intel`, `kvm_pvm`) that must be loaded.
    VendorModule(&'static str),
}

impl Requirement {
    /// `Ok(())` when `kvm` meets the requirement, otherwise the reason it does not.
    pub fn check(&self, kvm: &Kvm) -> Result<(), String> {
        match self {
            Requirement::Cap(cap) => {
                if kvm.check_extension(*cap) {
                    Ok(())
                } else {
                    Err(format!("KVM lacks capability {cap:?}"))
                }
            }
            Requirement::RawCap(nr, name) => {
                if kvm.check_extension_raw(libc::c_ulong::from(*nr)) > 0 {
                    Ok(())
                } else {
                    Err(format!("KVM lacks capability {name} ({nr})"))
                }
            }
            Requirement::RawCapMask(nr, name, mask) => {
                let value = kvm.check_extension_raw(libc::c_ulong::from(*nr));
                // A negative return is an error, not a mask: treat it as "nothing".
                let value = u64::try_from(value).unwrap_or(0);
                if value & mask == *mask {
                    Ok(())
                } else {
                    Err(format!(
                        "KVM capability {name} ({nr}) is {value:#x}, needs bits {mask:#x}"
                    ))
                }
            }
            Requirement::VendorModule(module) => match vendor_module() {
                Some(found) if found == *module => Ok(()),
                Some(found) => Err(format!("KVM vendor module is {found}, test needs {module}")),
                None => Err(format!("no KVM vendor module found, test needs {module}")),
            },
        }
    }
}

/// The loaded KVM vendor module, read from `/sys/module`.
pub fn vendor_module() -> Option<&'static str> {
    ["kvm_amd", "kvm_intel", "kvm_pvm"]
        .into_iter()
        .find(|m| Path::new("/sys/module").join(m).exists())
}

/// Whether `REQUIRE_KVM=1` is set.
pub fn kvm_required() -> bool {
    std::env::var("REQUIRE_KVM").is_ok_and(|v| v == "1")
}

type Body = Box<dyn FnOnce(&Kvm) -> TestResult + Send>;

/// A test that needs `/dev/kvm`, with the features it requires.
pub struct KvmTest {
    name: String,
    requires: Vec<Requirement>,
    body: Body,
}

impl KvmTest {
    /// A test with no requirement beyond a usable `/dev/kvm`.
    pub fn new<F>(name: impl Into<String>, body: F) -> Self
    where
        F: FnOnce(&Kvm) -> TestResult + Send + 'static,
    {
        KvmTest {
            name: name.into(),
            requires: Vec::new(),
            body: Box::new(body),
        }
    }

    /// Adds a requirement; the test is skipped with its reason where the host lacks it.
    pub fn requires(mut self, requirement: Requirement) -> Self {
        self.requires.push(requirement);
        self
    }

    /// The test's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn into_trial(self) -> Trial {
        let KvmTest {
            name,
            requires,
            body,
        } = self;
        Trial::ignorable_test(name, move || {
            let kvm = match Kvm::new() {
                Ok(kvm) => kvm,
                Err(e) if kvm_required() => {
                    return Err(Failed::from(format!(
                        "REQUIRE_KVM=1 but /dev/kvm is unusable: {e}"
                    )))
                }
                Err(e) => {
                    return Ok(Completion::ignored_with(format!(
                        "/dev/kvm is unusable: {e}"
                    )))
                }
            };
            for requirement in &requires {
                if let Err(reason) = requirement.check(&kvm) {
                    return Ok(Completion::ignored_with(reason));
                }
            }
            match body(&kvm) {
                Ok(()) => Ok(Completion::Completed),
                Err(TestError::Skip(reason)) => Ok(Completion::ignored_with(reason)),
                Err(TestError::Fail(message)) => Err(Failed::from(message)),
            }
        })
        .with_kind("kvm")
    }
}

/// A test that needs no KVM, for binaries that mix both kinds.
pub fn unit_test<F>(name: impl Into<String>, body: F) -> Trial
where
    F: FnOnce() -> TestResult + Send + 'static,
{
    Trial::test(name, move || {
        body().map_err(|e| Failed::from(e.to_string()))
    })
}

/// Runs the tests as a libtest-compatible binary and exits with its status.
///
/// Prints one line first saying which KVM this run is on, so a log shows which tier ran.
pub fn main(tests: Vec<KvmTest>) -> ! {
    run(tests.into_iter().map(KvmTest::into_trial).collect())
}

/// Like [`main`], for a mix of KVM tests and plain trials.
pub fn run(trials: Vec<Trial>) -> ! {
    let args = Arguments::from_args();
    if !args.list {
        eprintln!(
            "kvm-test-support: vendor module {}, REQUIRE_KVM={}",
            vendor_module().unwrap_or("none"),
            if kvm_required() { "1" } else { "0" }
        );
    }
    libtest_mimic::run(&args, trials).exit()
}

/// Converts a list of KVM tests into trials, for use with [`run`].
pub fn trials(tests: Vec<KvmTest>) -> Vec<Trial> {
    tests.into_iter().map(KvmTest::into_trial).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Inner;
    impl fmt::Display for Inner {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "inner cause")
        }
    }
    impl std::error::Error for Inner {}

    #[derive(Debug)]
    struct Outer(Inner);
    impl fmt::Display for Outer {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "outer")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn error_conversion_keeps_the_chain() {
        let e: TestError = Outer(Inner).into();
        assert!(matches!(e, TestError::Fail(ref m) if m == "outer: inner cause"));
    }

    #[test]
    fn skip_displays_its_reason() {
        assert_eq!(TestError::skip("no SEV").to_string(), "skipped: no SEV");
    }
}
