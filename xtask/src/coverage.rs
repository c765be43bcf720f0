//! The per-crate line-coverage gate, configured by `coverage_config_x86_64.json`.
//!
//! The file has rust-vmm-ci's format: `coverage_score` (percent), `exclude_path` (comma
//! separated path prefixes, relative to the workspace, that are not measured) and
//! `crate_features` (features to test with, empty for the defaults). Unlike rust-vmm-ci, which
//! gates one repository-wide figure, the score applies to each crate on its own, so that every
//! crate ships its own tested code and a well-tested crate cannot carry an untested one.
//!
//! Coverage is measured by `cargo tarpaulin --engine ptrace` (the toolchain here has no
//! `llvm-tools`, which the LLVM engine and `cargo llvm-cov` need), with `REQUIRE_KVM=1`, so
//! KVM tests count on a host with KVM and cannot quietly skip.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;

/// The config file's name at the workspace root.
pub const CONFIG_FILE: &str = "coverage_config_x86_64.json";

/// Errors from the coverage gate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The config or tarpaulin's report is not what this module expects.
    #[error("cannot parse {path}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The config's score is not a percentage.
    #[error("coverage_score {0} in {CONFIG_FILE} is not between 0 and 100")]
    Score(f64),
    /// cargo-tarpaulin could not be started.
    #[error(
        "cannot start cargo-tarpaulin (install it with `cargo install cargo-tarpaulin --locked`)"
    )]
    Spawn(#[source] std::io::Error),
    /// cargo-tarpaulin failed (a test failed under it, or the build did).
    #[error("cargo tarpaulin failed ({0})")]
    Tarpaulin(std::process::ExitStatus),
    /// At least one crate is below the score.
    #[error("coverage below {score}% in: {crates}")]
    BelowScore {
        /// The configured score.
        score: f64,
        /// The crates below it, with their figures.
        crates: String,
    },
}

/// Result alias for this module.
pub type Result<T> = std::result::Result<T, Error>;

/// `coverage_config_x86_64.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The minimum line coverage of each crate, in percent.
    pub coverage_score: f64,
    /// Comma-separated path prefixes that are not measured.
    #[serde(default)]
    pub exclude_path: String,
    /// Features to measure with; empty for the defaults.
    #[serde(default)]
    pub crate_features: String,
}

impl Config {
    /// Reads and checks the config at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    fn parse(text: &str, path: &Path) -> Result<Self> {
        let config: Config = serde_json::from_str(text).map_err(|source| Error::Parse {
            path: path.to_owned(),
            source,
        })?;
        if !(0.0..=100.0).contains(&config.coverage_score) {
            return Err(Error::Score(config.coverage_score));
        }
        Ok(config)
    }

    /// The excluded prefixes, trimmed, empty ones dropped.
    pub fn excluded(&self) -> Vec<&str> {
        self.exclude_path
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect()
    }
}

/// Lines covered and coverable.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Lines {
    /// Lines run by at least one test.
    pub covered: u64,
    /// Lines with code.
    pub coverable: u64,
}

impl Lines {
    /// Percentage covered; `None` for a crate with no code.
    pub fn percent(&self) -> Option<f64> {
        (self.coverable > 0).then(|| self.covered as f64 * 100.0 / self.coverable as f64)
    }
}

/// Coverage per crate, and the verdict against the score.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The configured score.
    pub score: f64,
    /// Crate directory (`crates/vm-types`) → its lines.
    pub crates: BTreeMap<String, Lines>,
}

impl Report {
    /// Crates below the score, as `name NN.N%`.
    pub fn below(&self) -> Vec<String> {
        self.crates
            .iter()
            .filter_map(|(name, lines)| {
                let percent = lines.percent()?;
                (percent < self.score).then(|| format!("{name} {percent:.1}%"))
            })
            .collect()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "line coverage per crate (gate: {}% each):", self.score)?;
        for (name, lines) in &self.crates {
            match lines.percent() {
                Some(p) => writeln!(
                    f,
                    "  {name:<28} {p:>5.1}%  {}/{} lines  {}",
                    lines.covered,
                    lines.coverable,
                    if p >= self.score { "ok" } else { "BELOW" }
                )?,
                None => writeln!(f, "  {name:<28}     -   no code yet")?,
            }
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct TarpaulinReport {
    files: Vec<TarpaulinFile>,
}

#[derive(Deserialize)]
struct TarpaulinFile {
    path: Vec<String>,
    covered: u64,
    coverable: u64,
}

/// The crate a workspace-relative source path belongs to: `crates/<name>` for member crates,
/// otherwise its first directory.
fn crate_of(relative: &str) -> Option<String> {
    let mut parts = relative.split('/');
    let first = parts.next()?;
    if first == "crates" {
        Some(format!("crates/{}", parts.next()?))
    } else {
        parts.next().map(|_| first.to_owned())
    }
}

/// Groups tarpaulin's per-file figures by crate, dropping excluded paths and files outside
/// the workspace.
fn group(report: TarpaulinReport, workspace: &Path, config: &Config) -> Report {
    let excluded = config.excluded();
    let mut crates: BTreeMap<String, Lines> = BTreeMap::new();
    for file in report.files {
        let path: PathBuf = file.path.iter().collect();
        let Ok(relative) = path.strip_prefix(workspace) else {
            continue;
        };
        let relative = relative.to_string_lossy();
        if excluded.iter().any(|prefix| relative.starts_with(prefix)) {
            continue;
        }
        // Only a crate's own sources count: its tests and benches measure it, not themselves.
        if !relative.contains("/src/") {
            continue;
        }
        if let Some(name) = crate_of(&relative) {
            let lines = crates.entry(name).or_default();
            lines.covered += file.covered;
            lines.coverable += file.coverable;
        }
    }
    Report {
        score: config.coverage_score,
        crates,
    }
}

/// Measures coverage of `workspace` with tarpaulin and checks every crate against the score.
pub fn run(workspace: &Path) -> Result<Report> {
    let config = Config::load(&workspace.join(CONFIG_FILE))?;
    let target = workspace.join("target");
    let output_dir = target.join("coverage");
    let mut tarpaulin = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    tarpaulin
        .current_dir(workspace)
        .args(["tarpaulin", "--engine", "ptrace", "--workspace", "--locked"])
        // workspace-tests measures only the excluded vmm-reference, and boots L1 to do it;
        // vmm-reference's own coverage is not gated (its boot path runs only in L1), and its
        // signal, pty and console-thread tests upset tarpaulin's ptrace engine (EINVAL while
        // waiting for the test). Their tests run in the unit and kvm-local tiers.
        .args(["--exclude", "xtask", "--exclude", "workspace-tests"])
        .args(["--exclude", "vmm-reference"])
        .args(["--skip-clean", "--out", "Json"])
        .arg("--output-dir")
        .arg(&output_dir)
        .arg("--target-dir")
        .arg(target.join("tarpaulin"))
        .env("REQUIRE_KVM", "1")
        .stdin(Stdio::null());
    if !config.crate_features.trim().is_empty() {
        tarpaulin.args(["--features", config.crate_features.trim()]);
    }
    let status = tarpaulin.status().map_err(Error::Spawn)?;
    if !status.success() {
        return Err(Error::Tarpaulin(status));
    }
    let report_path = output_dir.join("tarpaulin-report.json");
    let text = std::fs::read_to_string(&report_path).map_err(|source| Error::Read {
        path: report_path.clone(),
        source,
    })?;
    let raw: TarpaulinReport = serde_json::from_str(&text).map_err(|source| Error::Parse {
        path: report_path,
        source,
    })?;
    let report = group(raw, workspace, &config);
    print!("{report}");
    let below = report.below();
    if below.is_empty() {
        Ok(report)
    } else {
        Err(Error::BelowScore {
            score: config.coverage_score,
            crates: below.join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(score: f64, exclude: &str) -> Config {
        Config {
            coverage_score: score,
            exclude_path: exclude.into(),
            crate_features: String::new(),
        }
    }

    fn file(path: &str, covered: u64, coverable: u64) -> TarpaulinFile {
        TarpaulinFile {
            path: std::iter::once("/".to_owned())
                .chain(path.trim_start_matches('/').split('/').map(str::to_owned))
                .collect(),
            covered,
            coverable,
        }
    }

    #[test]
    fn parses_the_rust_vmm_ci_format_and_rejects_unknown_keys() {
        let p = Path::new("c.json");
        let c = Config::parse(
            r#"{"coverage_score": 81.5, "exclude_path": "xtask/, tests/", "crate_features": ""}"#,
            p,
        )
        .unwrap();
        assert_eq!(c.coverage_score, 81.5);
        assert_eq!(c.excluded(), vec!["xtask/", "tests/"]);
        assert!(Config::parse(r#"{"coverage_score": 80, "typo": 1}"#, p).is_err());
        assert!(matches!(
            Config::parse(r#"{"coverage_score": 180}"#, p),
            Err(Error::Score(_))
        ));
    }

    #[test]
    fn groups_by_crate_and_gates_each_one() {
        let raw = TarpaulinReport {
            files: vec![
                file("/w/crates/a/src/lib.rs", 9, 10),
                file("/w/crates/a/src/sys.rs", 1, 10),
                file("/w/crates/b/src/lib.rs", 10, 10),
                file("/w/crates/b/tests/kvm.rs", 0, 50),
                file("/w/xtask/src/main.rs", 0, 100),
                file("/elsewhere/registry/src/lib.rs", 0, 100),
            ],
        };
        let report = group(raw, Path::new("/w"), &config(80.0, "xtask/"));
        assert_eq!(report.crates.len(), 2);
        assert_eq!(
            report.crates["crates/a"],
            Lines {
                covered: 10,
                coverable: 20
            }
        );
        assert_eq!(report.below(), vec!["crates/a 50.0%".to_owned()]);
        assert!(report.to_string().contains("crates/b"));
    }

    #[test]
    fn a_crate_without_code_is_reported_not_gated() {
        let lines = Lines::default();
        assert_eq!(lines.percent(), None);
        let mut crates = BTreeMap::new();
        crates.insert("crates/empty".to_owned(), lines);
        let report = Report {
            score: 80.0,
            crates,
        };
        assert!(report.below().is_empty());
        assert!(report.to_string().contains("no code yet"));
    }

    #[test]
    fn crate_names_come_from_the_path() {
        assert_eq!(
            crate_of("crates/vm-types/src/lib.rs").as_deref(),
            Some("crates/vm-types")
        );
        assert_eq!(
            crate_of("vmm-reference/src/main.rs").as_deref(),
            Some("vmm-reference")
        );
        assert_eq!(crate_of("build.rs"), None);
    }
}
