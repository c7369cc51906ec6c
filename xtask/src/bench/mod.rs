//! `cargo xtask bench`: weft's datapath measured side by side with the kernel's and
//! with no overlay at all, in one run, on the netns testbed.
//!
//! - Per mode ([`modes`]): two hosts on the veth underlay, one pod each (or the two
//!   hosts themselves for `raw`), each mode in its own testbed kept up for the whole
//!   run, so rounds interleave the modes (A B C A B C ...) at no switching cost and
//!   machine drift hits all of them alike. Figures ([`measure`]): TCP throughput with 1
//!   and 4 streams (iperf3), a 1-byte TCP ping-pong ([`rr`]), 64-byte UDP packets per
//!   second received (iperf3), and CPU seconds per GB of the 1-stream test, with the
//!   bytes per packet the receiver got and per frame on the wire during it. The
//!   `weave-sleeve` modes run a real Weave Net router (`WEFT_WEAVER`; skipped when
//!   unset) and only the 1-stream test: sleeve is a userspace path.
//! - Per underlay profile ([`profile`]): `veth` (offloads on, super-packets cross the
//!   wire whole) and `nic` (senders segment, receivers coalesce). Each round runs every
//!   profile in turn, switching all modes' hosts at once, so the modes compared in a
//!   round ran under the same profile; ratios are paired per round.
//! - Not per mode ([`micro`]): each eBPF program's cost per packet through
//!   `BPF_PROG_TEST_RUN`, the time and kernel memory to program 4,096 peers and 100,000
//!   MACs, the agent's RSS idle and with 4,096 peers, the stripped agent's size.
//! - Output ([`report`]): a Markdown table (printed, and `bench.md`) and every raw
//!   sample (`bench.json`) in `--out`.
//!
//! Everything the bench sets up lives in network namespaces tagged [`TAG`] (or in a
//! namespace private to one thread), torn down on success, failure and Ctrl-C.

mod live;
mod measure;
mod micro;
mod modes;
mod profile;
mod report;
mod rr;

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use weft_testbed::{install_interrupt_handler, interrupted};

use crate::{
    build,
    workspace::{Workspace, is_root},
};

/// Namespace tag of every testbed the bench creates (`wbench<pid>-<n>-...`).
pub const TAG: &str = "wbench";

/// Options of `cargo xtask bench`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// A one-minute smoke run: one round, 1-second tests; checks that every figure is
    /// there and nonzero, and that the `nic` profile kept super-packets off the wire.
    #[arg(long)]
    pub quick: bool,
    /// Underlay profiles: `veth` (the veth defaults: TSO and GSO on, super-packets
    /// cross the wire whole), `nic` (TSO and GSO off on the hosts' underlay interface,
    /// so senders segment to MTU-sized frames; GRO on, so receivers coalesce), or
    /// `all` (both, in turn in every round).
    #[arg(long, value_enum, default_value_t)]
    pub profile: profile::Choice,
    /// Modes to measure, comma-separated, in this order (default: every registered
    /// mode).
    #[arg(long, value_delimiter = ',')]
    pub modes: Vec<String>,
    /// Rounds: each mode is measured once per round, interleaved [default: 3, or 1
    /// with --quick].
    #[arg(long)]
    pub rounds: Option<u32>,
    /// Directory for bench.md and bench.json [default: <target>/bench/<UTC time>].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// How long each per-mode test runs.
#[derive(Debug, Clone, Copy)]
pub struct Durations {
    /// Each TCP throughput test (1 and 4 streams).
    pub tcp: Duration,
    /// The request/response test.
    pub rr: Duration,
    /// The 64-byte UDP test.
    pub udp: Duration,
}

impl Durations {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                tcp: Duration::from_secs(1),
                rr: Duration::from_secs(1),
                udp: Duration::from_secs(1),
            }
        } else {
            Self {
                tcp: Duration::from_secs(10),
                rr: Duration::from_secs(5),
                udp: Duration::from_secs(5),
            }
        }
    }
}

/// `cargo xtask bench`: builds the release agent, then runs the bench with it.
pub fn run(ws: &Workspace, args: &Args) -> Result<()> {
    ensure_root()?;
    // Reject unknown modes before the build, not minutes later.
    modes::select(&args.modes)?;
    let agent = build::run(ws, &build::Args::default())?;
    run_with(ws, args, &agent).map(drop)
}

/// The smoke run `cargo xtask test` ends with: `bench --quick` with an agent already
/// built, which fails unless every mode produced every figure.
pub fn smoke(ws: &Workspace, agent: &Path) -> Result<()> {
    ensure_root()?;
    let args = Args {
        quick: true,
        ..Args::default()
    };
    run_with(ws, &args, agent).map(drop)
}

fn ensure_root() -> Result<()> {
    if !is_root() {
        bail!(
            "the bench creates network namespaces and loads eBPF programs: run it as root \
             (`sudo -E cargo xtask bench`)"
        );
    }
    Ok(())
}

/// Runs the bench with the agent binary `agent`; returns the output directory.
pub fn run_with(ws: &Workspace, args: &Args, agent: &Path) -> Result<PathBuf> {
    install_interrupt_handler()?;
    let result = run_inner(ws, args, agent);
    if interrupted() {
        eprintln!("bench: interrupted; everything set up was torn down");
        return result.and_then(|_| Err(anyhow::anyhow!("interrupted")));
    }
    result
}

fn run_inner(ws: &Workspace, args: &Args, agent: &Path) -> Result<PathBuf> {
    ensure!(
        agent.is_file(),
        "agent binary {} not found (run `cargo xtask build`)",
        agent.display()
    );
    let ebpf_object = ws.ebpf_object();
    ensure!(
        ebpf_object.is_file(),
        "eBPF object {} not found (run `cargo xtask build`)",
        ebpf_object.display()
    );
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 });
    ensure!(rounds >= 1, "--rounds must be at least 1");
    let durations = Durations::new(args.quick);
    let started = report::utc_now();
    let out = match &args.out {
        Some(dir) => dir.clone(),
        None => ws.target_dir.join("bench").join(format!(
            "{}{}",
            started.dir_name(),
            if args.quick { "-quick" } else { "" }
        )),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;

    let (selected, skipped) = modes::select(&args.modes)?;
    ensure!(!selected.is_empty(), "no mode to measure");
    let mut rep = report::Report::new(started, args.quick, rounds, durations);
    for (name, reason) in &skipped {
        eprintln!("bench: skipping mode {name}: {reason}");
        rep.skipped.push((name.to_string(), reason.clone()));
    }
    let clock = Instant::now();

    // Not per mode first: quick, and it fails fast if the object does not load.
    progress_line(&format!(
        "eBPF programs: per-packet cost (BPF_PROG_TEST_RUN), {} runs each",
        micro::test_runs(args.quick)
    ));
    rep.prog_costs = micro::prog_costs(&ebpf_object, args.quick)?;
    check_interrupt()?;
    progress_line("control plane: 4,096 peers and 100,000 MACs into the maps");
    rep.map_scale = Some(micro::map_scale(&ebpf_object)?);
    check_interrupt()?;
    progress_line("agent: RSS idle and with 4,096 peers; stripped size");
    rep.agent = Some(micro::agent_footprint(agent)?);
    check_interrupt()?;
    progress_line("agent: sleeve cipher speed, one core (weft cipher-speed)");
    rep.cipher = Some(micro::cipher_speed(agent, args.quick)?);
    check_interrupt()?;

    // Per mode: set every mode up once, then interleave the rounds.
    let ctx = modes::Ctx { agent };
    let mut running = Vec::new();
    for m in &selected {
        progress_line(&format!("setting up mode {}: {}", m.name(), m.about()));
        let r = m
            .setup(&ctx)
            .with_context(|| format!("setting up mode {}", m.name()))?;
        running.push((m.name(), r));
        check_interrupt()?;
    }
    let profiles = args.profile.profiles();
    apply_profile(&running, profiles[0])?;
    for (name, r) in &running {
        progress_line(&format!("warming up {name}"));
        measure::warm_up(r).with_context(|| format!("warming up {name}"))?;
    }
    for (name, r) in &running {
        rep.set_mode_tests(name, r.tests);
    }
    let total = rounds as usize
        * profiles.len()
        * running.iter().map(|(_, r)| r.tests.len()).sum::<usize>();
    let mut done = 0usize;
    let tests = measure::Test::ALL;
    let per_test_secs = tests
        .iter()
        .map(|t| t.duration(&durations).as_secs_f64() + 1.0)
        .sum::<f64>()
        / tests.len() as f64;
    for round in 1..=rounds {
        for &profile in &profiles {
            apply_profile(&running, profile)?;
            for (name, r) in &running {
                for &test in r.tests {
                    check_interrupt()?;
                    let left = (total - done) as f64 * per_test_secs;
                    let p = profile.name();
                    progress(&format!(
                        "[{}/{total} {} elapsed, ~{} left] round {round}/{rounds} {p} {name}: {}",
                        done + 1,
                        fmt_secs(clock.elapsed().as_secs_f64()),
                        fmt_secs(left),
                        test.label()
                    ));
                    let samples = measure::run(test, r, &durations).with_context(|| {
                        format!("round {round}, profile {p}, mode {name}: {}", test.label())
                    })?;
                    for s in samples {
                        rep.add_sample(round, profile, name, s);
                    }
                    done += 1;
                }
            }
        }
    }
    progress_done();

    for (name, r) in &running {
        if !r.has_agents() || !r.ebpf_carries {
            continue;
        }
        for &profile in &profiles {
            let p = profile.name();
            progress_line(&format!(
                "{p} {name}: eBPF run-time statistics on live traffic (outside the rounds)"
            ));
            r.apply_profile(profile)
                .with_context(|| format!("{name}: underlay profile {p}"))?;
            let costs = live::profile(name, profile, r, &durations)
                .with_context(|| format!("profiling {name} under {p}"))?;
            rep.live.extend(costs);
        }
    }
    for (name, r) in &mut running {
        rep.diagnostics.push((name.to_string(), r.diagnostics()));
    }
    let mut teardown_errors = Vec::new();
    for (name, r) in running.drain(..) {
        if let Err(e) = r.teardown() {
            teardown_errors.push(format!("{name}: {e:#}"));
        }
    }
    ensure!(
        teardown_errors.is_empty(),
        "teardown: {}",
        teardown_errors.join("; ")
    );

    rep.elapsed = clock.elapsed();
    let md = rep.markdown();
    let json = rep.json();
    std::fs::write(out.join("bench.md"), &md)
        .with_context(|| format!("cannot write {}", out.join("bench.md").display()))?;
    let json_text = serde_json::to_string_pretty(&json).context("serialising bench.json")?;
    std::fs::write(out.join("bench.json"), json_text)
        .with_context(|| format!("cannot write {}", out.join("bench.json").display()))?;
    println!("{md}");
    eprintln!("bench: wrote {}/bench.md and bench.json", out.display());
    if args.quick {
        rep.check_sane()
            .context("the quick bench run is incomplete")?;
        eprintln!(
            "bench: smoke check passed (every mode produced every figure under every profile)"
        );
    }
    Ok(out)
}

/// Switches every running mode's hosts to `profile`.
fn apply_profile(running: &[(&str, modes::Running)], profile: profile::Profile) -> Result<()> {
    for (name, r) in running {
        r.apply_profile(profile)
            .with_context(|| format!("{name}: underlay profile {}", profile.name()))?;
    }
    Ok(())
}

fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

/// A one-off step, on its own line.
fn progress_line(msg: &str) {
    progress_done();
    eprintln!("bench: {msg}");
}

/// The running progress line: rewritten in place on a terminal, one line each in a
/// log.
fn progress(msg: &str) {
    if std::io::stderr().is_terminal() {
        eprint!("\r\x1b[2Kbench: {msg}");
        PROGRESS_OPEN.store(true, std::sync::atomic::Ordering::Relaxed);
    } else {
        eprintln!("bench: {msg}");
    }
}

static PROGRESS_OPEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn progress_done() {
    if PROGRESS_OPEN.swap(false, std::sync::atomic::Ordering::Relaxed) {
        eprintln!();
    }
}

/// `75.4` -> `1m15s`.
fn fmt_secs(s: f64) -> String {
    // Display only.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let s = s.max(0.0).round() as u64;
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_format() {
        assert_eq!(fmt_secs(5.4), "5s");
        assert_eq!(fmt_secs(75.4), "1m15s");
        assert_eq!(fmt_secs(-1.0), "0s");
    }
}
