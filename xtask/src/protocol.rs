//! The line protocol between L1's `/init` and the host: markers printed on the serial console.
//!
//! L1 can only report through its console (QEMU's stdout), and `poweroff -f` does not carry
//! an exit status, so `/init` prints one marker line per event:
//!
//! ```text
//! NESTED-BEGIN <label>          a step (one command) starts
//! NESTED-END <label> rc=<N>     it exited with status N
//! NESTED-TIMEOUT <label>        it overstayed the step timeout and is being killed
//! NESTED-ERROR <message>        L1 could not provide kvm-amd; no step ran
//! NESTED-RESULT rc=<N>          the last line before power-off: the overall status
//! ```
//!
//! A run whose console has no `NESTED-RESULT` line did not finish (kernel panic, `/init`
//! crash, timeout) and must never be taken as a pass.

/// Prefix of the line that starts a step.
pub const BEGIN: &str = "NESTED-BEGIN";
/// Prefix of the line that ends a step.
pub const END: &str = "NESTED-END";
/// Prefix of the line that reports a step killed for overstaying its time.
pub const TIMEOUT: &str = "NESTED-TIMEOUT";
/// Prefix of the line that reports why L1 has no usable KVM.
pub const ERROR: &str = "NESTED-ERROR";
/// Prefix of the final line.
pub const RESULT: &str = "NESTED-RESULT";
/// The overall status `/init` reports when L1 could not load kvm-amd.
pub const SETUP_FAILED_RC: u8 = 97;

/// The line libtest (and libtest-mimic) prints at the end of a test binary's run.
const TEST_RESULT: &str = "test result:";

/// One marker line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    /// `NESTED-BEGIN <label>`.
    Begin {
        /// The step's label.
        label: String,
    },
    /// `NESTED-END <label> rc=<N>`.
    End {
        /// The step's label.
        label: String,
        /// Its exit status.
        rc: u8,
    },
    /// `NESTED-TIMEOUT <label>`.
    Timeout {
        /// The step's label.
        label: String,
    },
    /// `NESTED-ERROR <message>`.
    SetupError {
        /// Why L1 has no usable KVM.
        message: String,
    },
    /// `NESTED-RESULT rc=<N>`.
    Result {
        /// The overall exit status.
        rc: u8,
    },
}

impl Marker {
    /// Parses a console line (with any trailing `\r` and ANSI colour codes already removed).
    ///
    /// A marker may follow other text on the same line: the kernel's console output can land
    /// in front of it without a line break.
    pub fn parse(line: &str) -> Option<Self> {
        let line = line.trim_end();
        if let Some(rest) = after(line, RESULT) {
            return Some(Self::Result {
                rc: parse_rc(rest)?,
            });
        }
        if let Some(rest) = after(line, END) {
            let (label, rc) = rest.rsplit_once(' ')?;
            return Some(Self::End {
                label: label.trim().to_owned(),
                rc: parse_rc(rc)?,
            });
        }
        if let Some(rest) = after(line, TIMEOUT) {
            return Some(Self::Timeout {
                label: rest.trim().to_owned(),
            });
        }
        if let Some(rest) = after(line, BEGIN) {
            return Some(Self::Begin {
                label: rest.trim().to_owned(),
            });
        }
        after(line, ERROR).map(|rest| Self::SetupError {
            message: rest.trim().to_owned(),
        })
    }
}

/// The text after `marker ` in `line`, if `line` contains it.
fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    let start = line.find(marker)? + marker.len();
    line[start..].strip_prefix(' ')
}

/// Parses `rc=<N>` with N an exit status (0..=255).
fn parse_rc(text: &str) -> Option<u8> {
    text.trim().strip_prefix("rc=")?.parse().ok()
}

/// Removes ANSI escape sequences (`ESC [ ... final-byte`), which a test binary writing to a
/// terminal (L1's console is one) may use for colour.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.next() == Some('[') {
            // Parameters and intermediates run up to a final byte in '@'..='~'.
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// What one step reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepReport {
    /// The step's label.
    pub label: String,
    /// Its exit status, or `None` if L1 ended before the step did.
    pub rc: Option<u8>,
    /// The `test result:` lines it printed, for a test binary.
    pub test_results: Vec<String>,
    /// Whether `/init` killed it for overstaying the step timeout.
    pub timed_out: bool,
}

/// Everything L1 reported, accumulated line by line from its console.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Transcript {
    /// The steps that started, in order.
    pub steps: Vec<StepReport>,
    /// The setup error, if L1 reported one.
    pub setup_error: Option<String>,
    /// The final status, if L1 got as far as printing it.
    pub result: Option<u8>,
}

impl Transcript {
    /// Takes in one console line and returns the marker on it, if any.
    pub fn observe(&mut self, raw_line: &str) -> Option<Marker> {
        let line = strip_ansi(raw_line.trim_end_matches(['\r', '\n']));
        let marker = Marker::parse(&line);
        match &marker {
            Some(Marker::Begin { label }) => self.steps.push(StepReport {
                label: label.clone(),
                rc: None,
                test_results: Vec::new(),
                timed_out: false,
            }),
            Some(Marker::Timeout { label }) => {
                if let Some(step) = self.steps.iter_mut().rev().find(|s| &s.label == label) {
                    step.timed_out = true;
                }
            }
            Some(Marker::End { label, rc }) => {
                if let Some(step) = self.steps.iter_mut().rev().find(|s| &s.label == label) {
                    step.rc = Some(*rc);
                }
            }
            Some(Marker::SetupError { message }) => self.setup_error = Some(message.clone()),
            Some(Marker::Result { rc }) => self.result = Some(*rc),
            None => {
                if let (Some(step), Some(start)) = (self.steps.last_mut(), line.find(TEST_RESULT)) {
                    if step.rc.is_none() {
                        step.test_results.push(line[start..].trim().to_owned());
                    }
                }
            }
        }
        marker
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn result_line_parses() {
        assert_eq!(
            Marker::parse("NESTED-RESULT rc=3"),
            Some(Marker::Result { rc: 3 })
        );
        assert_eq!(
            Marker::parse("NESTED-RESULT rc=0  "),
            Some(Marker::Result { rc: 0 })
        );
    }

    #[test]
    fn result_line_after_kernel_noise_parses() {
        assert_eq!(
            Marker::parse("[   12.3] reboot: Power downNESTED-RESULT rc=255"),
            Some(Marker::Result { rc: 255 })
        );
    }

    #[test]
    fn malformed_result_lines_are_not_markers() {
        assert_eq!(Marker::parse("NESTED-RESULT rc=256"), None);
        assert_eq!(Marker::parse("NESTED-RESULT rc=-1"), None);
        assert_eq!(Marker::parse("NESTED-RESULT"), None);
        assert_eq!(Marker::parse("NESTED-RESULTrc=1"), None);
        assert_eq!(Marker::parse("echo NESTED-RESULT"), None);
    }

    #[test]
    fn step_markers_parse_labels_with_slashes() {
        assert_eq!(
            Marker::parse("NESTED-BEGIN sync-regs/kvm"),
            Some(Marker::Begin {
                label: "sync-regs/kvm".into()
            })
        );
        assert_eq!(
            Marker::parse("NESTED-END sync-regs/kvm rc=101"),
            Some(Marker::End {
                label: "sync-regs/kvm".into(),
                rc: 101
            })
        );
    }

    #[test]
    fn timeout_marks_its_step() {
        let mut transcript = Transcript::default();
        for line in [
            "NESTED-BEGIN a/kvm",
            "NESTED-TIMEOUT a/kvm",
            "NESTED-END a/kvm rc=143",
        ] {
            transcript.observe(line);
        }
        assert!(transcript.steps[0].timed_out);
        assert_eq!(transcript.steps[0].rc, Some(143));
    }

    #[test]
    fn setup_error_parses() {
        assert_eq!(
            Marker::parse("NESTED-ERROR kvm_amd is not loaded"),
            Some(Marker::SetupError {
                message: "kvm_amd is not loaded".into()
            })
        );
    }

    #[test]
    fn ansi_colour_is_removed() {
        assert_eq!(
            strip_ansi("test result: \u{1b}[32mok\u{1b}[0m. 1 passed"),
            "test result: ok. 1 passed"
        );
    }

    #[test]
    fn transcript_collects_steps_results_and_status() {
        let mut transcript = Transcript::default();
        for line in [
            "NESTED-BEGIN a/kvm\r\n",
            "test result: \u{1b}[32mok\u{1b}[0m. 2 passed; 0 failed\r\n",
            "NESTED-END a/kvm rc=0\r\n",
            "NESTED-BEGIN b/smoke\r\n",
            "test result: FAILED. 1 passed; 1 failed\r\n",
            "NESTED-END b/smoke rc=101\r\n",
            "NESTED-BEGIN c/kvm\r\n",
            "NESTED-RESULT rc=101\r\n",
        ] {
            transcript.observe(line);
        }
        assert_eq!(transcript.result, Some(101));
        assert_eq!(transcript.steps.len(), 3);
        assert_eq!(transcript.steps[0].rc, Some(0));
        assert_eq!(
            transcript.steps[0].test_results,
            ["test result: ok. 2 passed; 0 failed"]
        );
        assert_eq!(transcript.steps[1].rc, Some(101));
        assert_eq!(transcript.steps[2].rc, None);
    }
}
