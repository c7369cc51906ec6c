//! weft's programs timed in the running datapath: after the rounds, each weft mode
//! gets one more TCP and UDP test per underlay profile with the kernel's BPF run-time statistics on
//! (`BPF_ENABLE_STATS`, held by a file descriptor, so they switch off when it closes
//! or the process dies), and the programs' `run_time_ns` / `run_cnt` deltas give the
//! average cost of one run on real traffic. Not during the rounds: the statistics
//! themselves add two clock reads to every run of every BPF program.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use weft_testbed::cmd::run_args;

use super::{
    Durations,
    measure::{self, Test},
    modes::Running,
    profile::Profile,
};

/// One program on one host during one test.
#[derive(Debug, Clone)]
pub struct LiveCost {
    /// The underlay profile.
    pub profile: Profile,
    /// The mode.
    pub mode: String,
    /// The test that ran.
    pub test: &'static str,
    /// `host1` (client side) or `host2` (server side).
    pub host: String,
    /// Program name.
    pub program: String,
    /// Runs during the test.
    pub runs: u64,
    /// Average ns per run.
    pub ns_per_run: f64,
}

impl LiveCost {
    /// For bench.json.
    pub fn json(&self) -> Value {
        json!({
            "profile": self.profile.name(), "mode": self.mode, "test": self.test, "host": self.host,
            "program": self.program, "runs": self.runs, "ns_per_run": self.ns_per_run,
        })
    }
}

/// Runs a TCP (1 stream) and a 64-byte UDP test on `r` (already under `underlay`)
/// with run-time statistics on; returns each weft program's runs and average ns per
/// run.
pub fn profile(mode: &str, underlay: Profile, r: &Running, d: &Durations) -> Result<Vec<LiveCost>> {
    let progs = r.weft_programs()?;
    if progs.is_empty() {
        return Ok(Vec::new());
    }
    let _stats =
        aya::sys::enable_stats(aya::sys::Stats::RunTime).context("BPF_ENABLE_STATS (run time)")?;
    let short = Durations {
        tcp: d.tcp.min(Duration::from_secs(5)),
        rr: d.rr,
        udp: d.udp.min(Duration::from_secs(5)),
    };
    let mut out = Vec::new();
    for (test, label) in [(Test::Tcp1, "TCP 1 stream"), (Test::Udp64, "UDP 64-byte")] {
        let before = snapshot(&progs)?;
        measure::run(test, r, &short)?;
        let after = snapshot(&progs)?;
        for (((host, name, _), b), a) in progs.iter().zip(&before).zip(&after) {
            let runs = a.1.saturating_sub(b.1);
            let ns = a.0.saturating_sub(b.0);
            out.push(LiveCost {
                profile: underlay,
                mode: mode.to_string(),
                test: label,
                host: host.clone(),
                program: name.clone(),
                runs,
                ns_per_run: if runs == 0 {
                    0.0
                } else {
                    ns as f64 / runs as f64
                },
            });
        }
    }
    Ok(out)
}

/// (run_time_ns, run_cnt) of each program, from `bpftool prog show id`.
fn snapshot(progs: &[(String, String, u32)]) -> Result<Vec<(u64, u64)>> {
    progs
        .iter()
        .map(|(_, _, id)| {
            let text = run_args("bpftool", &["-j", "prog", "show", "id", &id.to_string()])?;
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("bpftool printed no JSON: {text}"))?;
            Ok((
                v["run_time_ns"].as_u64().unwrap_or(0),
                v["run_cnt"].as_u64().unwrap_or(0),
            ))
        })
        .collect()
}
