//! Collecting samples, and the two outputs: a Markdown table per underlay profile
//! (medians with min and max, and paired per-round ratios to `raw` and
//! `kernel-vxlan`) and a JSON file with every raw sample.

use std::{
    fmt::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Result, bail};
use serde_json::{Value, json};
use weft_testbed::testbed::UNDERLAY_MTU;

use super::{
    Durations,
    live::LiveCost,
    measure::{Metric, Sample, Test, UDP_PAYLOAD},
    micro::{AgentFootprint, CipherSpeed, MapScale, ProgCost},
    profile::Profile,
};

/// Reference modes the ratio columns are taken against.
const RAW: &str = "raw";
const KERNEL_VXLAN: &str = "kernel-vxlan";
/// The largest frame an underlay veth counts when nothing crosses it whole: the MTU
/// plus the Ethernet header.
const WIRE_FRAME_MAX: f64 = UNDERLAY_MTU as f64 + 14.0;

/// One recorded sample.
struct Recorded {
    round: u32,
    profile: Profile,
    mode: String,
    sample: Sample,
}

/// A wall-clock time in UTC, seconds since the epoch.
#[derive(Debug, Clone, Copy)]
pub struct UtcTime(u64);

/// Now.
pub fn utc_now() -> UtcTime {
    UtcTime(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    )
}

impl UtcTime {
    /// (year, month, day, hour, minute, second).
    fn civil(self) -> (i64, u32, u32, u32, u32, u32) {
        let days = (self.0 / 86_400) as i64;
        let rem = self.0 % 86_400;
        // Howard Hinnant's days-to-civil.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        (
            year,
            month,
            day,
            (rem / 3600) as u32,
            (rem / 60 % 60) as u32,
            (rem % 60) as u32,
        )
    }

    /// `20261012T083005Z`, for directory names.
    pub fn dir_name(self) -> String {
        let (y, mo, d, h, mi, s) = self.civil();
        format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
    }

    /// `2026-10-12 08:30 UTC`.
    pub fn human(self) -> String {
        let (y, mo, d, h, mi, _) = self.civil();
        format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02} UTC")
    }
}

/// Everything one bench run measured.
pub struct Report {
    started: UtcTime,
    quick: bool,
    rounds: u32,
    durations: Durations,
    /// Modes not run: (name, why).
    pub skipped: Vec<(String, String)>,
    /// Modes in the order they were measured.
    modes: Vec<String>,
    /// Per mode, the figures its tests produce (every figure for a mode not listed).
    mode_metrics: Vec<(String, Vec<Metric>)>,
    /// Underlay profiles in the order they were measured.
    profiles: Vec<Profile>,
    samples: Vec<Recorded>,
    /// eBPF per-packet costs.
    pub prog_costs: Vec<ProgCost>,
    /// weft's programs timed on live traffic.
    pub live: Vec<LiveCost>,
    /// Map programming at scale.
    pub map_scale: Option<MapScale>,
    /// Agent footprint.
    pub agent: Option<AgentFootprint>,
    /// The sleeve cipher's speed on one core.
    pub cipher: Option<CipherSpeed>,
    /// Per mode: what its agents reported after the rounds (null if none).
    pub diagnostics: Vec<(String, Value)>,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

/// Median, min and max of some samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Median (mean of the middle two for an even count).
    pub median: f64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
}

/// Stats of `values`, or `None` if there are none.
pub fn stats(values: &[f64]) -> Option<Stats> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    Some(Stats {
        median,
        min: v[0],
        max: v[n - 1],
    })
}

/// Paired per-round ratios: for each round in which both `mode` and `reference` have
/// a sample (and the reference's is not 0), `mode`'s over `reference`'s. Samples are
/// (round, value). Pairing within a round cancels the machine's drift between rounds,
/// which a ratio of medians would not.
pub fn paired_ratios(mode: &[(u32, f64)], reference: &[(u32, f64)]) -> Vec<f64> {
    mode.iter()
        .filter_map(|(round, a)| {
            let (_, b) = reference.iter().find(|(r, _)| r == round)?;
            (*b != 0.0).then(|| a / b)
        })
        .collect()
}

/// `0.93x (0.88-1.02)`: the median of the per-round ratios, with min and max when
/// they differ; `-` for none.
/// Decimal places for a figure of `metric` whose median is `median`: two more than
/// usual for a one-decimal figure below 1 (a userspace overlay's 0.12 Gbit/s would
/// otherwise show as 0.1).
fn shown_decimals(metric: Metric, median: f64) -> usize {
    let d = metric.decimals();
    if d == 1 && median.abs() < 1.0 {
        d + 2
    } else {
        d
    }
}

fn fmt_ratio(r: Option<Stats>) -> String {
    match r {
        None => "-".into(),
        Some(st) if st.min == st.max => format!("{:.2}x", st.median),
        Some(st) => format!("{:.2}x ({:.2}-{:.2})", st.median, st.min, st.max),
    }
}

fn ratio_json(r: Option<Stats>, per_round: &[f64]) -> Value {
    r.map_or(
        Value::Null,
        |st| json!({"median": st.median, "min": st.min, "max": st.max, "per_round": per_round}),
    )
}

impl Report {
    /// An empty report.
    pub fn new(started: UtcTime, quick: bool, rounds: u32, durations: Durations) -> Self {
        Self {
            started,
            quick,
            rounds,
            durations,
            skipped: Vec::new(),
            modes: Vec::new(),
            mode_metrics: Vec::new(),
            profiles: Vec::new(),
            samples: Vec::new(),
            prog_costs: Vec::new(),
            live: Vec::new(),
            map_scale: None,
            agent: None,
            cipher: None,
            diagnostics: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }

    /// Records that `mode` runs only `tests`: [`Report::check_sane`] then expects only
    /// their figures from it.
    pub fn set_mode_tests(&mut self, mode: &str, tests: &[Test]) {
        let metrics = tests.iter().flat_map(|t| t.metrics()).copied().collect();
        self.mode_metrics.retain(|(m, _)| m != mode);
        self.mode_metrics.push((mode.to_string(), metrics));
    }

    /// The figures `mode` is expected to produce.
    fn expected_metrics(&self, mode: &str) -> Vec<Metric> {
        self.mode_metrics
            .iter()
            .find(|(m, _)| m == mode)
            .map_or_else(|| Metric::ALL.to_vec(), |(_, v)| v.clone())
    }

    /// Records a sample of `mode` under `profile` in `round`.
    pub fn add_sample(&mut self, round: u32, profile: Profile, mode: &str, sample: Sample) {
        if !self.modes.iter().any(|m| m == mode) {
            self.modes.push(mode.to_string());
        }
        if !self.profiles.contains(&profile) {
            self.profiles.push(profile);
        }
        self.samples.push(Recorded {
            round,
            profile,
            mode: mode.to_string(),
            sample,
        });
    }

    /// (round, value) of every sample of `mode` under `profile`.
    fn rounds(&self, profile: Profile, mode: &str, metric: Metric) -> Vec<(u32, f64)> {
        self.samples
            .iter()
            .filter(|r| r.profile == profile && r.mode == mode && r.sample.metric == metric)
            .map(|r| (r.round, r.sample.value))
            .collect()
    }

    fn values(&self, profile: Profile, mode: &str, metric: Metric) -> Vec<f64> {
        let rounds = self.rounds(profile, mode, metric);
        rounds.into_iter().map(|(_, v)| v).collect()
    }

    fn stats(&self, profile: Profile, mode: &str, metric: Metric) -> Option<Stats> {
        stats(&self.values(profile, mode, metric))
    }

    /// The per-round ratios of `mode` over `reference` under `profile` (empty unless
    /// both ran, or for figures that are not compared).
    fn ratios(&self, profile: Profile, mode: &str, reference: &str, metric: Metric) -> Vec<f64> {
        if !metric.compared() {
            return Vec::new();
        }
        paired_ratios(
            &self.rounds(profile, mode, metric),
            &self.rounds(profile, reference, metric),
        )
    }

    /// Fails unless every mode produced every figure with a finite value above zero
    /// under every profile, the `nic` profile kept super-packets off the wire, and the
    /// figures that are not per mode are all there.
    pub fn check_sane(&self) -> Result<()> {
        let mut missing = Vec::new();
        for &profile in &self.profiles {
            for mode in &self.modes {
                for metric in self.expected_metrics(mode) {
                    let v = self.values(profile, mode, metric);
                    if v.is_empty() || v.iter().any(|x| !x.is_finite() || *x <= 0.0) {
                        missing.push(format!(
                            "{} {mode}: {} = {v:?}",
                            profile.name(),
                            metric.key()
                        ));
                    }
                }
                let wire = self.values(profile, mode, Metric::WireBytesPerFrame);
                if profile == Profile::Nic && wire.iter().any(|x| *x > WIRE_FRAME_MAX) {
                    missing.push(format!(
                        "nic {mode}: frames on the wire above {WIRE_FRAME_MAX} bytes \
                         ({wire:?}): senders did not segment"
                    ));
                }
            }
        }
        if self.prog_costs.is_empty() || self.prog_costs.iter().any(|c| c.ns_median <= 0.0) {
            missing.push("eBPF per-packet costs".into());
        }
        for c in &self.live {
            if c.test.starts_with("TCP") && c.runs == 0 {
                missing.push(format!("{} {} {}: no live runs", c.mode, c.host, c.program));
            }
        }
        match &self.map_scale {
            Some(s) if s.memlock_total_after() > 0 && s.macs_walked > 0 => {}
            _ => missing.push("map scale figures".into()),
        }
        match &self.agent {
            Some(a) if a.idle_rss_kib > 0 && a.scale_rss_kib > 0 && a.stripped_bytes > 0 => {}
            _ => missing.push("agent footprint".into()),
        }
        match &self.cipher {
            Some(c)
                if [c.seal_bytes_per_sec, c.open_bytes_per_sec]
                    .iter()
                    .all(|v| v.is_finite() && *v > 0.0) => {}
            _ => missing.push("sleeve cipher speed".into()),
        }
        if !missing.is_empty() {
            bail!("missing or zero: {}", missing.join("; "));
        }
        Ok(())
    }

    /// The Markdown report.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## weft bench, {}{}\n",
            self.started.human(),
            if self.quick {
                " (--quick smoke run: figures are not comparable)"
            } else {
                ""
            }
        );
        let profiles: Vec<&str> = self.profiles.iter().map(|p| p.name()).collect();
        let _ = writeln!(
            s,
            "Machine: {}. {} round(s); in each round, underlay profile(s) {} in turn, and \
             under each the modes one after the other. TCP tests {} s, request/response \
             {} s, UDP {} s each. Run time {}. Reproduce (as root): `cargo xtask bench`.\n",
            machine_line(),
            self.rounds,
            profiles.join(", "),
            self.durations.tcp.as_secs(),
            self.durations.rr.as_secs(),
            self.durations.udp.as_secs(),
            super::fmt_secs(self.elapsed.as_secs_f64()),
        );
        let _ = writeln!(
            s,
            "Each figure: median over the rounds, with min and max. Ratio columns: paired \
             per round (the mode's sample over the reference's in the same round and \
             profile), median of those ratios with their min and max in brackets. Pod MTU \
             1376, underlay MTU 1500 (raw runs host to host at 1500)."
        );
        for &profile in &self.profiles {
            self.markdown_profile(&mut s, profile);
        }
        let _ = writeln!(
            s,
            "\nUDP: iperf3 `-u -l {UDP_PAYLOAD} -b 0`, packets the receiver got per second. \
             CPU: busy time of all cores from /proc/stat over the 1-stream test, per GB \
             received (the whole machine, so other load on it counts too).\n\n\
             Packet sizes over the 1-stream test (the GRO evidence): rx bytes / rx \
             packets of the receiving pod's eth0 (raw: the receiving host's), Ethernet \
             header included, so above {WIRE_FRAME_MAX} the pod got super-packets (whole \
             from the wire under `veth`; under `nic` merged by GRO at the receiving host \
             or by the kernel VXLAN device's own GRO). A veth with GRO on counts before it \
             merges, so raw's eth0 figure stays at frame size under `nic`: the IP row \
             (IpExt InOctets / Ip InReceives in the receiving namespace, once per packet \
             after GRO) shows what its stack got. Frames on the wire: rx bytes / rx \
             packets at the underlay switch's port from the sending host."
        );
        for (name, why) in &self.skipped {
            let _ = writeln!(s, "\nSkipped mode `{name}`: {why}.");
        }
        self.markdown_micro(&mut s);
        self.markdown_notes(&mut s);
        s
    }

    /// One profile's table.
    fn markdown_profile(&self, s: &mut String, profile: Profile) {
        let _ = writeln!(
            s,
            "\n### Underlay profile `{}`\n\n{}.\n\n\
             | figure | mode | median | min | max | vs raw | vs kernel-vxlan |\n\
             |---|---|--:|--:|--:|--:|--:|",
            profile.name(),
            profile.about()
        );
        for metric in Metric::ALL {
            for mode in &self.modes {
                let Some(st) = self.stats(profile, mode, metric) else {
                    continue;
                };
                let d = shown_decimals(metric, st.median);
                let r = |reference: &str| {
                    fmt_ratio(stats(&self.ratios(profile, mode, reference, metric)))
                };
                let _ = writeln!(
                    s,
                    "| {} | {mode} | {:.d$} | {:.d$} | {:.d$} | {} | {} |",
                    metric.label(),
                    st.median,
                    st.min,
                    st.max,
                    r(RAW),
                    r(KERNEL_VXLAN),
                );
            }
        }
        for (name, why) in &self.skipped {
            let _ = writeln!(s, "| all figures | {name} | skipped ({why}) | | | | |");
        }
    }

    fn markdown_micro(&self, s: &mut String) {
        if let Some(c) = self.prog_costs.first() {
            let _ = writeln!(
                s,
                "\n### eBPF programs, per packet\n\n`BPF_PROG_TEST_RUN`, {} calls per case, each \
                 on a fresh copy of the packet (repeat = 1: repeating on one buffer would feed \
                 an encapsulating program its own output), kernel-timed around the program \
                 run. Redirects are decided but not carried out; flood copies are sent \
                 (`bpf_clone_redirect` to a veth).\n",
                c.runs
            );
            let _ = writeln!(
                s,
                "| program | path | frame bytes | ns/packet median | mean |\n|---|---|--:|--:|--:|"
            );
            for c in &self.prog_costs {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {:.0} | {:.0} |",
                    c.program, c.case, c.frame_len, c.ns_median, c.ns_mean
                );
            }
        }
        if !self.live.is_empty() {
            let _ = writeln!(
                s,
                "\n### eBPF programs on live traffic\n\nOne more test per weft mode and \
                 underlay profile after the rounds, with the kernel's BPF run-time statistics on (they cost every BPF \
                 program two clock reads per run, so they stay off during the rounds). \
                 host1 sends, host2 receives; a TCP run handles a GSO super-packet or an \
                 ACK.\n"
            );
            let _ = writeln!(
                s,
                "| profile | mode | test | host | program | runs | ns/run |\n\
                 |---|---|---|---|---|--:|--:|"
            );
            for c in &self.live {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} | {:.0} |",
                    c.profile.name(),
                    c.mode,
                    c.test,
                    c.host,
                    c.program,
                    c.runs,
                    c.ns_per_run
                );
            }
        }
        let _ = writeln!(
            s,
            "\n### Control plane and agent\n\n| figure | value |\n|---|--:|"
        );
        if let Some(m) = &self.map_scale {
            let _ = writeln!(
                s,
                "| program {} peers into WEFT_PEERS (+ flood list) | {:.1} ms ({:.2} µs/peer) |",
                m.peers,
                m.peers_time.as_secs_f64() * 1e3,
                m.peers_time.as_secs_f64() * 1e6 / f64::from(m.peers)
            );
            let _ = writeln!(
                s,
                "| program {} learned MACs into WEFT_MACS | {:.1} ms ({:.2} µs/MAC) |",
                m.macs,
                m.macs_time.as_secs_f64() * 1e3,
                m.macs_time.as_secs_f64() * 1e6 / f64::from(m.macs)
            );
            let _ = writeln!(
                s,
                "| walk all {} MACs (once per reload that removes or moves a peer) | {:.1} ms |",
                m.macs_walked,
                m.macs_walk_time.as_secs_f64() * 1e3
            );
            let _ = writeln!(
                s,
                "| kernel memory of the 6 maps (fdinfo `memlock`), empty / filled | {} / {} |",
                mib(m.memlock_total_before()),
                mib(m.memlock_total_after())
            );
            let mut by_map: Vec<_> = m.memlock_after.iter().collect();
            by_map.sort_by(|a, b| b.1.cmp(a.1));
            let parts: Vec<String> = by_map
                .iter()
                .map(|(name, bytes)| format!("{name} {}", mib(**bytes)))
                .collect();
            let _ = writeln!(s, "| ... by map | {} |", parts.join(", "));
        }
        if let Some(a) = &self.agent {
            let _ = writeln!(
                s,
                "| agent RSS idle, 2 peers (VmRSS; peak VmHWM) | {} ({}) |",
                kib(a.idle_rss_kib),
                kib(a.idle_hwm_kib)
            );
            let _ = writeln!(
                s,
                "| agent RSS with {} peers (VmRSS; peak VmHWM) | {} ({}) |",
                a.scale_peers,
                kib(a.scale_rss_kib),
                kib(a.scale_hwm_kib)
            );
            let _ = writeln!(
                s,
                "| agent start to \"datapath ready\", 2 / {} peers | {:.0} ms / {:.0} ms |",
                a.scale_peers,
                a.idle_ready.as_secs_f64() * 1e3,
                a.scale_ready.as_secs_f64() * 1e3
            );
            let _ = writeln!(
                s,
                "| agent binary, as built / stripped (`strip --strip-all`) | {} / {} |",
                mib(a.binary_bytes),
                mib(a.stripped_bytes)
            );
        }
        if let Some(c) = &self.cipher {
            let _ = writeln!(
                s,
                "| sleeve cipher (XSalsa20-Poly1305), one core, {}-byte datagrams: seal / open | \
                 {:.0} MB/s / {:.0} MB/s |",
                c.datagram_len,
                c.seal_bytes_per_sec / 1e6,
                c.open_bytes_per_sec / 1e6
            );
            let cpus = cpu_count();
            let _ = writeln!(
                s,
                "| encrypted sleeve ceiling, one stream (one sealing and one opening \
                 thread sharing {cpus} CPUs, nothing else; datagram bits) | {} |",
                c.ceiling_bits_per_sec(cpus)
                    .map_or_else(|| "-".into(), |b| format!("{:.2} Gbit/s", b / 1e9))
            );
        }
    }

    /// Agent RSS after the traffic, and any nonzero drop counters of weft modes.
    fn markdown_notes(&self, s: &mut String) {
        let mut notes = Vec::new();
        for (mode, diag) in &self.diagnostics {
            let Some(hosts) = diag.as_object() else {
                continue;
            };
            for (host, d) in hosts {
                if let Some(rss) = d["rss_kib"].as_u64() {
                    notes.push(format!(
                        "{mode} {host}: agent RSS after the rounds {}",
                        kib(rss)
                    ));
                }
                if let Some(rss) = d["weaver_rss_kib"].as_u64() {
                    notes.push(format!(
                        "{mode} {host}: weaver RSS after the rounds {}",
                        kib(rss)
                    ));
                }
                if let Some(conns) = d["weaver_connections"].as_str() {
                    for line in conns.lines().filter(|l| !l.trim().is_empty()) {
                        notes.push(format!(
                            "{mode} {host}: weaver connection `{}`",
                            line.trim()
                        ));
                    }
                }
                if let Some(e) = d["status"]["error"].as_str() {
                    notes.push(format!("{mode} {host}: `weft status` failed: {e}"));
                }
                if let Some(counters) = d["status"]["counters"].as_object() {
                    let drops: Vec<String> = counters
                        .iter()
                        .filter(|(k, v)| {
                            (k.starts_with("drop_") || k.starts_with("flood_"))
                                && v.as_u64().unwrap_or(0) > 0
                        })
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    if !drops.is_empty() {
                        notes.push(format!(
                            "{mode} {host}: datapath counters {}",
                            drops.join(" ")
                        ));
                    }
                }
            }
        }
        if !notes.is_empty() {
            let _ = writeln!(s, "\nAfter the rounds:\n");
            for n in notes {
                let _ = writeln!(s, "- {n}");
            }
        }
    }

    /// bench.json: settings, every raw sample, the summary and the other figures.
    pub fn json(&self) -> Value {
        let samples: Vec<Value> = self
            .samples
            .iter()
            .map(|r| {
                json!({
                    "round": r.round, "profile": r.profile.name(), "mode": r.mode,
                    "metric": r.sample.metric.key(), "value": r.sample.value,
                    "detail": r.sample.detail,
                })
            })
            .collect();
        let mut summary = Vec::new();
        for &profile in &self.profiles {
            for metric in Metric::ALL {
                for mode in &self.modes {
                    let Some(st) = self.stats(profile, mode, metric) else {
                        continue;
                    };
                    let ratio = |reference: &str| {
                        let per_round = self.ratios(profile, mode, reference, metric);
                        ratio_json(stats(&per_round), &per_round)
                    };
                    summary.push(json!({
                        "profile": profile.name(), "metric": metric.key(), "mode": mode,
                        "median": st.median, "min": st.min, "max": st.max,
                        "vs_raw": ratio(RAW),
                        "vs_kernel_vxlan": ratio(KERNEL_VXLAN),
                    }));
                }
            }
        }
        json!({
            "started_utc": self.started.human(),
            "machine": machine_line(),
            "quick": self.quick,
            "rounds": self.rounds,
            "durations_s": {
                "tcp": self.durations.tcp.as_secs_f64(),
                "rr": self.durations.rr.as_secs_f64(),
                "udp": self.durations.udp.as_secs_f64(),
            },
            "elapsed_s": self.elapsed.as_secs_f64(),
            "modes": self.modes,
            "profiles": self.profiles.iter()
                .map(|p| json!({"name": p.name(), "about": p.about()}))
                .collect::<Vec<_>>(),
            "skipped": self.skipped.iter().map(|(n, w)| json!({"mode": n, "reason": w}))
                .collect::<Vec<_>>(),
            "summary": summary,
            "samples": samples,
            "ebpf_per_packet": self.prog_costs.iter().map(ProgCost::json).collect::<Vec<_>>(),
            "ebpf_live": self.live.iter().map(LiveCost::json).collect::<Vec<_>>(),
            "map_scale": self.map_scale.as_ref().map(MapScale::json),
            "agent": self.agent.as_ref().map(AgentFootprint::json),
            "sleeve_cipher": self.cipher,
            "diagnostics": self.diagnostics.iter().map(|(m, d)| json!({"mode": m, "agents": d}))
                .collect::<Vec<_>>(),
        })
    }
}

/// `2 CPUs (AMD EPYC ...), Linux 6.18.44, TCP congestion control bbr` (the congestion
/// control of xtask's own network namespace, the host's default when run from it).
fn machine_line() -> String {
    let cpus = cpu_count();
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|k| k.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    // Every namespace of the testbed starts with the host's default congestion
    // control, and it shapes single-stream figures (pacing, in-flight limits).
    let congestion = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
        .map(|c| c.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    format!("{cpus} CPUs ({model}), Linux {kernel}, TCP congestion control {congestion}")
}

fn cpu_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0)
}

fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn kib(k: u64) -> String {
    format!("{:.1} MiB", k as f64 / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_civil_dates() {
        assert_eq!(UtcTime(0).dir_name(), "19700101T000000Z");
        // 2024-02-29 12:34:56 UTC (a leap day).
        assert_eq!(UtcTime(1_709_210_096).dir_name(), "20240229T123456Z");
        assert_eq!(UtcTime(1_709_210_096).human(), "2024-02-29 12:34 UTC");
    }

    #[test]
    fn stats_median_min_max() {
        assert_eq!(stats(&[]), None);
        let s = stats(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(stats(&[4.0, 1.0, 2.0, 3.0]).unwrap().median, 2.5);
    }

    fn sample(metric: Metric, value: f64) -> Sample {
        Sample {
            metric,
            value,
            detail: Value::Null,
        }
    }

    #[test]
    fn paired_ratios_pair_samples_of_the_same_round() {
        let mode = [(1, 10.0), (2, 20.0), (3, 30.0)];
        let reference = [(3, 40.0), (1, 20.0), (2, 10.0)];
        assert_eq!(paired_ratios(&mode, &reference), [0.5, 2.0, 0.75]);
        let st = stats(&paired_ratios(&mode, &reference)).unwrap();
        assert_eq!((st.median, st.min, st.max), (0.75, 0.5, 2.0));
        // The ratio of the medians would have been 20 / 20 = 1.
        // Rounds without a partner, and zero references, give no ratio.
        assert_eq!(paired_ratios(&mode, &[(2, 10.0), (3, 0.0)]), [2.0]);
        assert!(paired_ratios(&mode, &[]).is_empty());
        assert_eq!(fmt_ratio(Some(st)), "0.75x (0.50-2.00)");
        assert_eq!(fmt_ratio(stats(&[1.2])), "1.20x");
        assert_eq!(fmt_ratio(None), "-");
    }

    /// A report of 3 rounds under both profiles; under `nic`, weft's round 2 is slow
    /// while the references are not.
    fn three_rounds() -> Report {
        let mut r = Report::new(UtcTime(0), false, 3, Durations::new(false));
        for round in 1..=3 {
            for profile in Profile::ALL {
                for (mode, v) in [("raw", 20.0), ("kernel-vxlan", 10.0), ("weft-fastdp", 12.0)] {
                    let v = match (profile, mode, round) {
                        (Profile::Nic, "weft-fastdp", 2) => 5.0,
                        (Profile::Nic, _, _) => v / 2.0 * f64::from(round),
                        _ => v,
                    };
                    for m in Metric::ALL {
                        let v = if m == Metric::WireBytesPerFrame && profile == Profile::Nic {
                            1514.0
                        } else {
                            v
                        };
                        r.add_sample(round, profile, mode, sample(m, v));
                    }
                }
            }
        }
        r
    }

    #[test]
    fn ratio_columns_are_paired_per_round_and_per_profile() {
        let r = three_rounds();
        let weft = |p, reference| r.ratios(p, "weft-fastdp", reference, Metric::Tcp1Gbps);
        assert_eq!(weft(Profile::Veth, RAW), [0.6, 0.6, 0.6]);
        // nic: weft 6, 5, 18 against kernel-vxlan 5, 10, 15.
        assert_eq!(weft(Profile::Nic, KERNEL_VXLAN), [1.2, 0.5, 1.2]);
        assert!(
            r.ratios(Profile::Nic, "weft-fastdp", RAW, Metric::WireBytesPerFrame)
                .is_empty()
        );
        let md = r.markdown();
        for row in [
            "### Underlay profile `nic`",
            "| TCP 1 stream, Gbit/s | weft-fastdp | 12.0 | 12.0 | 12.0 | 0.60x | 1.20x |",
            "| TCP 1 stream, Gbit/s | weft-fastdp | 6.0 | 5.0 | 18.0 | 0.60x (0.25-0.60) \
             | 1.20x (0.50-1.20) |",
            "| TCP 1 stream, bytes per frame on the wire | weft-fastdp | 1514 | 1514 | 1514 \
             | - | - |",
        ] {
            assert!(md.contains(row), "{row} not in {md}");
        }
        let j = r.json();
        let nic_weft = j["summary"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| {
                e["profile"] == "nic"
                    && e["mode"] == "weft-fastdp"
                    && e["metric"] == Metric::Tcp1Gbps.key()
            })
            .unwrap()
            .clone();
        assert_eq!(nic_weft["vs_kernel_vxlan"]["median"], 1.2);
        assert_eq!(nic_weft["vs_kernel_vxlan"]["min"], 0.5);
        assert_eq!(
            nic_weft["vs_raw"]["per_round"],
            serde_json::json!([0.6, 0.25, 0.6])
        );
        assert_eq!(j["samples"][0]["profile"], "veth");
        assert_eq!(j["profiles"][1]["name"], "nic");
        assert_eq!(
            j["samples"].as_array().unwrap().len(),
            3 * 2 * 3 * Metric::ALL.len()
        );
    }

    #[test]
    fn sanity_needs_every_figure_and_segmented_frames_under_nic() {
        let mut r = three_rounds();
        // Per-mode figures are complete, but the other figures are missing.
        let e = r.check_sane().unwrap_err();
        assert!(format!("{e}").contains("eBPF per-packet costs"), "{e}");
        assert!(format!("{e}").contains("sleeve cipher speed"), "{e}");
        assert!(!format!("{e}").contains("senders did not segment"), "{e}");
        // A cipher figure that is not a finite positive rate counts as missing.
        r.cipher = Some(CipherSpeed {
            datagram_len: 1472,
            seal_bytes_per_sec: f64::INFINITY,
            open_bytes_per_sec: 1e8,
        });
        let e = r.check_sane().unwrap_err();
        assert!(format!("{e}").contains("sleeve cipher speed"), "{e}");
        r.cipher = Some(CipherSpeed {
            datagram_len: 1472,
            seal_bytes_per_sec: 1e8,
            open_bytes_per_sec: 1e8,
        });
        let e = r.check_sane().unwrap_err();
        assert!(!format!("{e}").contains("sleeve cipher speed"), "{e}");
        r.add_sample(1, Profile::Veth, "raw", sample(Metric::UdpMpps, 0.0));
        r.add_sample(
            1,
            Profile::Nic,
            "raw",
            sample(Metric::WireBytesPerFrame, 9000.0),
        );
        let e = format!("{}", r.check_sane().unwrap_err());
        assert!(e.contains("veth raw: udp_64b_mpps_received"), "{e}");
        assert!(e.contains("nic raw: frames on the wire above 1514"), "{e}");
    }

    #[test]
    fn a_mode_running_only_some_tests_is_held_to_their_figures() {
        let mut r = three_rounds();
        r.set_mode_tests("weave-sleeve", &[Test::Tcp1]);
        for profile in Profile::ALL {
            for &m in Test::Tcp1.metrics() {
                r.add_sample(1, profile, "weave-sleeve", sample(m, 0.3));
            }
        }
        r.skipped
            .push(("weave-sleeve-encrypted".into(), "WEFT_WEAVER unset".into()));
        let e = format!("{}", r.check_sane().unwrap_err());
        assert!(!e.contains("weave-sleeve"), "{e}");
        let md = r.markdown();
        let row = "| TCP 1 stream, Gbit/s | weave-sleeve | 0.300 | 0.300 | 0.300 | 0.01x | 0.03x |";
        assert!(md.contains(row), "{row} not in {md}");
        let row = "| all figures | weave-sleeve-encrypted | skipped (WEFT_WEAVER unset) | | | | |";
        assert!(md.contains(row), "{row} not in {md}");
        r.add_sample(
            2,
            Profile::Veth,
            "weave-sleeve",
            sample(Metric::Tcp1Gbps, 0.0),
        );
        let e = format!("{}", r.check_sane().unwrap_err());
        assert!(e.contains("veth weave-sleeve: tcp_1_stream_gbps"), "{e}");
    }
}
