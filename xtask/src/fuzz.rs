//! `cargo xtask fuzz [--seconds N] [TARGET...]`: builds the fuzz targets of
//! `agent/fuzz` with cargo-fuzz (libFuzzer, AddressSanitizer, debug assertions) and
//! runs each one for N seconds, one after the other. `cargo xtask test` runs them all
//! briefly ([`smoke`]).
//!
//! The committed seed corpus (`agent/fuzz/corpus/<target>`) is only read: new inputs go
//! to `target/fuzz/corpus/<target>`, which later runs start from, and crashing inputs
//! to `target/fuzz/artifacts/<target>/`. A crash fails the task and names the input;
//! replay it with `<target binary> <input>`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context, Result, bail};

use crate::{exec, setup, workspace::Workspace};

/// Seconds per target of `cargo xtask fuzz` without `--seconds`.
const DEFAULT_SECONDS: u64 = 10;
/// Seconds per target of the smoke run in `cargo xtask test`.
const SMOKE_SECONDS: u64 = 5;

/// Arguments of `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How long to run each target.
    #[arg(long, default_value_t = DEFAULT_SECONDS)]
    pub seconds: u64,
    /// Targets to run (default: all of `agent/fuzz/fuzz_targets`).
    pub targets: Vec<String>,
}

/// The fuzz crate, relative to the repository root.
const FUZZ_DIR: &str = "agent/fuzz";

/// What one target's run reported.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Stats {
    /// Inputs executed.
    runs: Option<u64>,
    /// Coverage points (libFuzzer's `cov:`).
    cov: Option<u64>,
    /// Features (libFuzzer's `ft:`).
    ft: Option<u64>,
    /// Executions per second.
    exec_per_sec: Option<u64>,
}

/// `cargo xtask fuzz`.
pub fn run(ws: &Workspace, args: &Args) -> Result<()> {
    setup::run(ws, setup::Mode::Quiet)?;
    fuzz(ws, &args.targets, args.seconds)
}

/// The smoke run of `cargo xtask test` (setup has run): every target for a few seconds.
pub fn smoke(ws: &Workspace) -> Result<()> {
    fuzz(ws, &[], SMOKE_SECONDS)
}

fn fuzz(ws: &Workspace, wanted: &[String], seconds: u64) -> Result<()> {
    let all = targets(&ws.root.join(FUZZ_DIR))?;
    for t in wanted {
        if !all.contains(t) {
            bail!("no fuzz target `{t}`; there are: {}", all.join(", "));
        }
    }
    let targets = if wanted.is_empty() { &all } else { wanted };
    let fuzz_target_dir = ws.target_dir.join("fuzz");

    let started = Instant::now();
    let mut build = cargo_fuzz(ws)?;
    build
        .args([
            "build",
            "--fuzz-dir",
            FUZZ_DIR,
            "--debug-assertions",
            "--target-dir",
        ])
        .arg(&fuzz_target_dir)
        .args(targets.iter().take(usize::from(targets.len() == 1)));
    exec::run(&mut build)?;
    eprintln!(
        "fuzz: targets built in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let bin_dir = fuzz_target_dir.join(host_triple(ws)?).join("release");
    let mut crashes = Vec::new();
    for t in targets {
        let corpus = fuzz_target_dir.join("corpus").join(t);
        let artifacts = fuzz_target_dir.join("artifacts").join(t);
        let log = fuzz_target_dir.join("logs").join(format!("{t}.log"));
        for dir in [
            &corpus,
            &artifacts,
            &log.parent().unwrap_or(Path::new(".")).to_path_buf(),
        ] {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let seeds = ws.root.join(FUZZ_DIR).join("corpus").join(t);
        let before = artifact_files(&artifacts)?;
        let mut cmd = Command::new(bin_dir.join(t));
        cmd.current_dir(&ws.root)
            .arg(format!("-max_total_time={seconds}"))
            // A hang is a bug too; libFuzzer's default waits 20 minutes.
            .arg("-timeout=10")
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1")
            .arg(&corpus);
        if seeds.is_dir() {
            cmd.arg(&seeds);
        }
        let log_file =
            fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        eprintln!("$ {} 2> {}", exec::render(&cmd), log.display());
        let status = cmd
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .status()
            .with_context(|| format!("could not start the fuzz target {t}"))?;
        let text = fs::read_to_string(&log).unwrap_or_default();
        let stats = parse_stats(&text);
        let new: Vec<PathBuf> = artifact_files(&artifacts)?
            .into_iter()
            .filter(|f| !before.contains(f))
            .collect();
        if status.success() && new.is_empty() {
            eprintln!("fuzz: {t}: ok, {}", stats.describe(seconds));
            continue;
        }
        // The end of the log holds the panic message and the backtrace.
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        for line in tail.iter().rev() {
            eprintln!("  | {line}");
        }
        let inputs: Vec<String> = new.iter().map(|p| p.display().to_string()).collect();
        eprintln!(
            "fuzz: {t}: FAILED ({status}); crashing input: {}; full log: {}",
            if inputs.is_empty() {
                "none written".to_owned()
            } else {
                inputs.join(", ")
            },
            log.display()
        );
        crashes.push(match inputs.first() {
            Some(input) => format!("{t} ({input})"),
            None => format!("{t} ({status})"),
        });
    }
    if !crashes.is_empty() {
        bail!("fuzz targets failed: {}", crashes.join(", "));
    }
    Ok(())
}

/// `cargo fuzz` from `.tools/cargo-fuzz`.
fn cargo_fuzz(ws: &Workspace) -> Result<Command> {
    let bin = setup::cargo_fuzz_root(ws).join("bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(&path)))
        .context("PATH")?;
    let mut cmd = ws.cargo();
    cmd.arg("fuzz").env("PATH", path);
    Ok(cmd)
}

/// The host target triple, under which cargo-fuzz puts the binaries.
fn host_triple(ws: &Workspace) -> Result<String> {
    let out = exec::output(ws.command("rustc").arg("-vV"))?;
    out.lines()
        .find_map(|l| l.strip_prefix("host: "))
        .map(|h| h.trim().to_owned())
        .context("`rustc -vV` printed no host")
}

/// The targets (`[[bin]]` names) of the fuzz crate's manifest.
fn targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let path = fuzz_dir.join("Cargo.toml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    parse_targets(&text).with_context(|| format!("parsing {}", path.display()))
}

fn parse_targets(manifest: &str) -> Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Manifest {
        #[serde(default)]
        bin: Vec<Bin>,
    }
    #[derive(serde::Deserialize)]
    struct Bin {
        name: String,
    }
    let m: Manifest = toml::from_str(manifest)?;
    if m.bin.is_empty() {
        bail!("no [[bin]] targets");
    }
    Ok(m.bin.into_iter().map(|b| b.name).collect())
}

/// Files libFuzzer wrote for failures (`crash-…`, `leak-…`, `timeout-…`, `oom-…`).
fn artifact_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Reads libFuzzer's last status line (`#1234 DONE cov: 56 ft: 78 corp: … exec/s: 90 …`)
/// and its final stats (`stat::number_of_executed_units: 1234`).
fn parse_stats(log: &str) -> Stats {
    let mut stats = Stats::default();
    for line in log.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first().is_some_and(|w| w.starts_with('#'))
            && words
                .get(1)
                .is_some_and(|w| w.chars().all(|c| c.is_ascii_uppercase()))
        {
            let value = |key: &str| {
                words
                    .iter()
                    .position(|w| *w == key)
                    .and_then(|i| words.get(i + 1))
                    .and_then(|v| v.parse().ok())
            };
            stats.runs = words[0][1..].parse().ok().or(stats.runs);
            stats.cov = value("cov:").or(stats.cov);
            stats.ft = value("ft:").or(stats.ft);
            stats.exec_per_sec = value("exec/s:").or(stats.exec_per_sec);
        }
        if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
            stats.runs = v.trim().parse().ok().or(stats.runs);
        }
    }
    stats
}

impl Stats {
    fn describe(&self, seconds: u64) -> String {
        let n = |v: Option<u64>| v.map_or("?".to_owned(), |v| v.to_string());
        let exec_per_sec = self
            .exec_per_sec
            .or_else(|| self.runs.map(|r| r / seconds.max(1)));
        format!(
            "{} runs in {seconds}s ({} exec/s), cov {}, ft {}",
            n(self.runs),
            n(exec_per_sec),
            n(self.cov),
            n(self.ft)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_libfuzzer_status_lines() {
        let log = "INFO: Seed: 1\n\
                   #2\tINITED cov: 10 ft: 11 corp: 1/1b exec/s: 0 rss: 30Mb\n\
                   #1024\tpulse  cov: 50 ft: 80 corp: 9/99b lim: 4 exec/s: 512 rss: 31Mb\n\
                   #4096\tNEW    cov: 61 ft: 90 corp: 10/120b lim: 4 exec/s: 800 rss: 31Mb L: 3/4\n\
                   #5000\tDONE   cov: 62 ft: 91 corp: 10/120b lim: 4 exec/s: 833 rss: 31Mb\n\
                   Done 5000 runs in 6 second(s)\n\
                   stat::number_of_executed_units: 5001\n";
        assert_eq!(
            parse_stats(log),
            Stats {
                runs: Some(5001),
                cov: Some(62),
                ft: Some(91),
                exec_per_sec: Some(833),
            }
        );
        assert_eq!(parse_stats("garbage\n"), Stats::default());
    }

    #[test]
    fn reads_the_targets_of_the_fuzz_manifest() {
        let ws = Workspace::locate().unwrap();
        let all = targets(&ws.root.join(FUZZ_DIR)).unwrap();
        for t in ["gob", "connection_plain", "topology_merge"] {
            assert!(all.iter().any(|a| a == t), "{all:?}");
        }
        // Every target has its source file and a seed corpus or none.
        for t in &all {
            let src = ws
                .root
                .join(FUZZ_DIR)
                .join("fuzz_targets")
                .join(format!("{t}.rs"));
            assert!(src.is_file(), "{}", src.display());
        }
        assert!(parse_targets("[package]\nname = \"x\"\n").is_err());
    }
}
