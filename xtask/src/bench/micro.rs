//! The figures that are not per mode: each eBPF program's cost per packet
//! (`BPF_PROG_TEST_RUN`), the time and kernel memory to program the maps at scale, and
//! the agent's footprint (RSS idle and with 4,096 peers, stripped size), and how fast
//! one core seals and opens encrypted sleeve datagrams (`weft cipher-speed`).
//!
//! The eBPF object is loaded by a thread that first moves into a network namespace of
//! its own (`unshare(CLONE_NEWNET)`) holding an underlay veth `ul0`, as the
//! `prog_test_run` tests do: flood copies then have a real device to leave by, and
//! the namespace (and the programs and maps) vanish with the thread.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData},
    programs::{SchedClassifier, TestRun, TestRunOptions},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use weft_common::maps::{FLOOD_MAP, MACS_MAP, MacEntry, MacKey, PEERS_MAP, PeerEntry, programs};
use weft_testbed::{
    Testbed,
    peers::write_atomic,
    synthetic::{self, POD_LOCAL, POD_REMOTE, arp_request, inner_frame, map_mut, monotonic_ns},
};

use super::TAG;
use crate::workspace::find_binary;

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

/// Overlay MTU.
const MTU: usize = synthetic::MTU as usize;

/// Peers programmed by the scale figures (every 12-bit ShortID).
pub const SCALE_PEERS: u32 = 4096;
/// Learned MACs programmed by the scale figures.
pub const SCALE_MACS: u32 = 100_000;

/// How many `BPF_PROG_TEST_RUN` calls each case gets.
pub fn test_runs(quick: bool) -> u32 {
    if quick { 2_000 } else { 50_000 }
}

/// One program on one kind of packet.
#[derive(Debug, Clone)]
pub struct ProgCost {
    /// Program name.
    pub program: &'static str,
    /// Which path through it.
    pub case: &'static str,
    /// Input frame length, bytes.
    pub frame_len: usize,
    /// TC action it returned (checked against the expected one).
    pub action: u32,
    /// Kernel-timed ns of one run: median over the calls.
    pub ns_median: f64,
    /// Kernel-timed ns of one run: mean over the calls.
    pub ns_mean: f64,
    /// Calls made.
    pub runs: u32,
}

impl ProgCost {
    /// For bench.json.
    pub fn json(&self) -> Value {
        json!({
            "program": self.program, "case": self.case, "frame_len": self.frame_len,
            "action": self.action, "ns_median": self.ns_median, "ns_mean": self.ns_mean,
            "runs": self.runs,
        })
    }
}

/// Runs `f` on a thread inside a fresh network namespace holding `ul0` (a veth whose
/// peer `ul0p` swallows whatever leaves). The namespace dies with the thread.
fn in_private_netns<T: Send + 'static>(
    f: impl FnOnce(u32) -> Result<T> + Send + 'static,
) -> Result<T> {
    let h = std::thread::spawn(move || f(synthetic::private_underlay()?));
    h.join()
        .map_err(|_| anyhow!("eBPF bench thread panicked"))?
}

/// Per-packet cost of each program on each path, `runs` calls each.
pub fn prog_costs(object: &Path, quick: bool) -> Result<Vec<ProgCost>> {
    let object = object.to_path_buf();
    let runs = test_runs(quick);
    in_private_netns(move |vx0| {
        let pins = synthetic::TempPins::new()?;
        let mut ebpf = synthetic::load_datapath(&object, pins.path())?;
        synthetic::fill_scene(&mut ebpf, vx0)?;
        synthetic::learn(&mut ebpf, POD_REMOTE, 2)?;
        let small = inner_frame(POD_REMOTE, POD_LOCAL, 64);
        let full = inner_frame(POD_REMOTE, POD_LOCAL, MTU - 28);
        let arp = arp_request(POD_LOCAL);
        let from_remote = inner_frame(POD_LOCAL, POD_REMOTE, 64);
        // The decapsulation program's real input (a frame with the tunnel key of the
        // VXLAN socket) cannot be made in a test run; its live cost is measured in
        // the throughput rounds (run_time_ns).
        let cases: [(&'static str, &'static str, &[u8], u32); 4] = [
            (
                programs::EGRESS,
                "unicast, 64-byte UDP payload",
                &small,
                TC_ACT_OK,
            ),
            (
                programs::EGRESS,
                "unicast, MTU-sized frame",
                &full,
                TC_ACT_OK,
            ),
            (
                programs::EGRESS,
                "flood (ARP broadcast) to 2 peers (one copy sent through vx0)",
                &arp,
                TC_ACT_OK,
            ),
            (
                programs::INGRESS,
                "no tunnel key: refused (floor: includes the timer)",
                &from_remote,
                TC_ACT_SHOT,
            ),
        ];
        let mut out = Vec::new();
        for (program, case, packet, expected) in cases {
            let prog: &SchedClassifier = ebpf
                .program(program)
                .with_context(|| format!("no program {program}"))?
                .try_into()?;
            let cost = time_program(prog, program, case, packet, expected, runs)?;
            out.push(cost);
        }
        Ok(out)
    })
}

/// Times `prog` on `packet`: `runs` calls of `BPF_PROG_TEST_RUN` with `repeat` = 1,
/// each on a fresh copy of the packet, timed by the kernel around the program.
///
/// (`repeat` > 1 runs the program again on the SAME buffer: an encapsulating or
/// decapsulating program would then see its own output and take another path.)
fn time_program(
    prog: &SchedClassifier,
    program: &'static str,
    case: &'static str,
    packet: &[u8],
    expected: u32,
    runs: u32,
) -> Result<ProgCost> {
    let mut out = vec![0u8; packet.len() + 256];
    let mut ns = Vec::with_capacity(runs as usize);
    let mut action = u32::MAX;
    for _ in 0..runs {
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = Some(&mut out);
        opts.repeat = 1;
        let r = prog
            .test_run(opts)
            .with_context(|| format!("BPF_PROG_TEST_RUN of {program} ({case})"))?;
        action = r.return_value;
        ensure!(
            action == expected,
            "{program} ({case}) returned TC action {action}, expected {expected}"
        );
        ns.push(r.duration.as_nanos() as f64);
    }
    ns.sort_by(f64::total_cmp);
    let mean = ns.iter().sum::<f64>() / ns.len().max(1) as f64;
    Ok(ProgCost {
        program,
        case,
        frame_len: packet.len(),
        action,
        ns_median: ns.get(ns.len() / 2).copied().unwrap_or(0.0),
        ns_mean: mean,
        runs,
    })
}

/// Time and memory to program the maps at scale.
#[derive(Debug, Clone)]
pub struct MapScale {
    /// Peers inserted into the peer table (and the first 64 into the flood list).
    pub peers: u32,
    /// Time for those inserts.
    pub peers_time: Duration,
    /// MACs inserted into the learned-MAC table.
    pub macs: u32,
    /// Time for those inserts.
    pub macs_time: Duration,
    /// Time to walk the full MAC table (keys and values), as the agent does once
    /// when a reload removes or moves a peer.
    pub macs_walk_time: Duration,
    /// Entries the walk found.
    pub macs_walked: u64,
    /// Each map's kernel memory (`memlock` in its fdinfo, what `bpftool map show`
    /// prints) before filling, bytes.
    pub memlock_before: BTreeMap<String, u64>,
    /// The same after filling.
    pub memlock_after: BTreeMap<String, u64>,
}

impl MapScale {
    /// Sum of [`MapScale::memlock_after`].
    pub fn memlock_total_after(&self) -> u64 {
        self.memlock_after.values().sum()
    }

    /// Sum of [`MapScale::memlock_before`].
    pub fn memlock_total_before(&self) -> u64 {
        self.memlock_before.values().sum()
    }

    /// For bench.json.
    pub fn json(&self) -> Value {
        json!({
            "peers": self.peers, "peers_ms": ms(self.peers_time),
            "macs": self.macs, "macs_ms": ms(self.macs_time),
            "macs_walk_ms": ms(self.macs_walk_time), "macs_walked": self.macs_walked,
            "memlock_bytes_before": self.memlock_before,
            "memlock_bytes_after": self.memlock_after,
        })
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Loads the object and programs [`SCALE_PEERS`] peers and [`SCALE_MACS`] MACs into
/// its maps from user space (one `BPF_MAP_UPDATE_ELEM` each, as the agent does).
pub fn map_scale(object: &Path) -> Result<MapScale> {
    let object = object.to_path_buf();
    in_private_netns(move |_| {
        let pins = synthetic::TempPins::new()?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pins.path())
            .load_file(&object)
            .with_context(|| format!("loading {}", object.display()))?;
        let memlock_before = memlock(&ebpf)?;
        let start = Instant::now();
        {
            let mut peers: Array<&mut MapData, PeerEntry> =
                Array::try_from(map_mut(&mut ebpf, PEERS_MAP)?)?;
            for id in 0..SCALE_PEERS {
                let addr = scale_peer_addr(id).octets();
                let entry = PeerEntry { addr, flags: 0 };
                peers.set(id, &entry, 0)?;
            }
        }
        {
            let mut flood: Array<&mut MapData, u32> =
                Array::try_from(map_mut(&mut ebpf, FLOOD_MAP)?)?;
            for i in 0..SCALE_PEERS {
                flood.set(i, &i, 0)?;
            }
        }
        let peers_time = start.elapsed();
        let now = monotonic_ns();
        let start = Instant::now();
        {
            let mut macs: HashMap<&mut MapData, MacKey, MacEntry> =
                HashMap::try_from(map_mut(&mut ebpf, MACS_MAP)?)?;
            for i in 0..SCALE_MACS {
                let b = i.to_be_bytes();
                let entry = MacEntry {
                    short_id: i % SCALE_PEERS,
                    pad: 0,
                    seen_ns: now,
                };
                macs.insert(
                    &MacKey::new([0x02, 0x42, b[0], b[1], b[2], b[3]]),
                    &entry,
                    0,
                )?;
            }
        }
        let macs_time = start.elapsed();
        let start = Instant::now();
        let macs_walked = {
            let macs: HashMap<&MapData, MacKey, MacEntry> =
                HashMap::try_from(ebpf.map(MACS_MAP).context("no MAC map")?)?;
            let mut n = 0u64;
            for entry in macs.iter() {
                entry?;
                n += 1;
            }
            n
        };
        let macs_walk_time = start.elapsed();
        ensure!(
            macs_walked == u64::from(SCALE_MACS),
            "walked {macs_walked} MACs after inserting {SCALE_MACS}"
        );
        Ok(MapScale {
            peers: SCALE_PEERS,
            peers_time,
            macs: SCALE_MACS,
            macs_time,
            macs_walk_time,
            macs_walked,
            memlock_before,
            memlock_after: memlock(&ebpf)?,
        })
    })
}

/// Underlay address of scale peer `id`: 10.200.0.0/16, a prefix no testbed uses.
fn scale_peer_addr(id: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 1)) + id)
}

/// `memlock` of every map of `ebpf`, from `/proc/self/fdinfo/<map fd>`.
fn memlock(ebpf: &Ebpf) -> Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for (name, map) in ebpf.maps() {
        let data = match map {
            Map::Array(d)
            | Map::HashMap(d)
            | Map::LruHashMap(d)
            | Map::PerCpuArray(d)
            | Map::ProgramArray(d) => d,
            _ => bail!("map {name} has a type the bench does not expect"),
        };
        let fd = data.fd().as_fd().as_raw_fd();
        let path = format!("/proc/self/fdinfo/{fd}");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        let bytes = text
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
            .with_context(|| format!("{path} has no memlock line"))?;
        out.insert(name.to_string(), bytes);
    }
    Ok(out)
}

/// `VmRSS` of process `pid`, KiB.
pub fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS:")
}

fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{path} has no {key} line"))
}

/// The agent's footprint.
#[derive(Debug, Clone)]
pub struct AgentFootprint {
    /// With 2 peers (itself and one other): start to "datapath ready".
    pub idle_ready: Duration,
    /// With 2 peers: VmRSS and VmHWM, KiB, 2 s after ready.
    pub idle_rss_kib: u64,
    /// See [`AgentFootprint::idle_rss_kib`].
    pub idle_hwm_kib: u64,
    /// Peers in the scale run's peers file (itself included).
    pub scale_peers: u32,
    /// With [`SCALE_PEERS`] peers: start to "datapath ready".
    pub scale_ready: Duration,
    /// With [`SCALE_PEERS`] peers: VmRSS and VmHWM, KiB, 2 s after ready.
    pub scale_rss_kib: u64,
    /// See [`AgentFootprint::scale_rss_kib`].
    pub scale_hwm_kib: u64,
    /// Connections `weft status` reported at scale.
    pub scale_connections: usize,
    /// Size of the agent binary as built, bytes.
    pub binary_bytes: u64,
    /// Size of a copy stripped of all symbols (`strip --strip-all`), bytes.
    pub stripped_bytes: u64,
}

impl AgentFootprint {
    /// For bench.json.
    pub fn json(&self) -> Value {
        json!({
            "idle_peers": 2, "idle_ready_ms": ms(self.idle_ready),
            "idle_rss_kib": self.idle_rss_kib, "idle_hwm_kib": self.idle_hwm_kib,
            "scale_peers": self.scale_peers, "scale_ready_ms": ms(self.scale_ready),
            "scale_rss_kib": self.scale_rss_kib, "scale_hwm_kib": self.scale_hwm_kib,
            "scale_connections": self.scale_connections,
            "binary_bytes": self.binary_bytes, "stripped_bytes": self.stripped_bytes,
        })
    }
}

/// Starts the agent on a one-host testbed, first with 2 peers, then with
/// [`SCALE_PEERS`] (in 10.200.0.0/16, reached through a default gateway), and reads
/// its memory; strips a copy of the binary.
pub fn agent_footprint(agent: &Path) -> Result<AgentFootprint> {
    let mut tb = Testbed::with_tag(TAG)?;
    tb.add_host(0)?;
    tb.add_host(0)?;
    tb.add_default_route(1)?;
    tb.write_peers(1, &[1, 2])?;
    let (idle_ready, idle_rss_kib, idle_hwm_kib) = start_and_measure(&mut tb, agent)?;
    tb.stop_agent(1)?;

    write_atomic(&tb.peers_path(1), &scale_peers_toml(&tb)?)?;
    let (scale_ready, scale_rss_kib, scale_hwm_kib) = start_and_measure(&mut tb, agent)?;
    let status = tb.status_json(1)?;
    let scale_connections = status["connections"]
        .as_array()
        .map(Vec::len)
        .context("`weft status --json` has no connections array")?;
    ensure!(
        scale_connections == SCALE_PEERS as usize - 1,
        "the agent with {SCALE_PEERS} peers reports {scale_connections} connections"
    );
    tb.stop_agent(1)?;
    tb.teardown()?;

    let binary_bytes = std::fs::metadata(agent)
        .with_context(|| format!("reading {}", agent.display()))?
        .len();
    let stripped_bytes = stripped_size(agent)?;
    Ok(AgentFootprint {
        idle_ready,
        idle_rss_kib,
        idle_hwm_kib,
        scale_peers: SCALE_PEERS,
        scale_ready,
        scale_rss_kib,
        scale_hwm_kib,
        scale_connections,
        binary_bytes,
        stripped_bytes,
    })
}

/// How fast one core seals and opens encrypted sleeve datagrams: the JSON of
/// `weft cipher-speed --json`, as bench.json keeps it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct CipherSpeed {
    /// Datagram length, bytes.
    pub datagram_len: u64,
    /// Datagram bytes sealed per second, one core.
    pub seal_bytes_per_sec: f64,
    /// Datagram bytes opened per second, one core.
    pub open_bytes_per_sec: f64,
}

impl CipherSpeed {
    /// The most one encrypted sleeve stream can carry, datagram bits per second:
    /// each agent seals on one thread and opens on another, so a stream is bounded by
    /// the slower of the two on one core, and by `cpus` CPUs doing nothing but sealing
    /// and opening it (each byte sealed once, opened once). An upper bound: it leaves
    /// out the TCP stacks, copies, system calls, headers and the ACKs' datagrams.
    /// `None` without a CPU count or a speed.
    pub fn ceiling_bits_per_sec(&self, cpus: usize) -> Option<f64> {
        if cpus == 0 || self.seal_bytes_per_sec <= 0.0 || self.open_bytes_per_sec <= 0.0 {
            return None;
        }
        let secs_per_byte = 1.0 / self.seal_bytes_per_sec + 1.0 / self.open_bytes_per_sec;
        let bytes = (cpus as f64 / secs_per_byte)
            .min(self.seal_bytes_per_sec)
            .min(self.open_bytes_per_sec);
        Some(bytes * 8.0)
    }
}

/// Runs `weft cipher-speed --json` (1,472-byte datagrams, 1 s of sealing and 1 s of
/// opening; 0.2 s each with `--quick`).
pub fn cipher_speed(agent: &Path, quick: bool) -> Result<CipherSpeed> {
    let millis = if quick { "200" } else { "1000" };
    let out = Command::new(agent)
        .args([
            "cipher-speed",
            "--json",
            "--datagram-len",
            "1472",
            "--millis",
            millis,
        ])
        .output()
        .with_context(|| format!("running {} cipher-speed", agent.display()))?;
    ensure!(
        out.status.success(),
        "{} cipher-speed failed: {}",
        agent.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout).context("parsing the JSON of weft cipher-speed")
}

/// Starts host 1's agent, waits 2 s after it is ready; (start to ready, VmRSS, VmHWM).
fn start_and_measure(tb: &mut Testbed, agent: &Path) -> Result<(Duration, u64, u64)> {
    let start = Instant::now();
    tb.start_agent(1, agent, &[])?;
    let ready = start.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let pid = tb.agent_pid(1)?;
    Ok((ready, rss_kib(pid)?, status_kib(pid, "VmHWM:")?))
}

/// A peers file with host 1 of `tb` (ShortID 1) and [`SCALE_PEERS`] - 1 others.
fn scale_peers_toml(tb: &Testbed) -> Result<String> {
    let me = tb.host(1)?;
    let mut s = weft_testbed::peers_toml([me]);
    for id in (0..SCALE_PEERS).filter(|&id| id != u32::from(me.short_id())) {
        let _ = write!(
            s,
            "[[peer]]\nname = \"ee:00:00:00:{:02x}:{:02x}\"\nnickname = \"scale{id}\"\n\
             short_id = {id}\naddress = \"{}\"\n\n",
            id >> 8,
            id & 0xff,
            scale_peer_addr(id)
        );
    }
    Ok(s)
}

/// Size of a copy of `binary` stripped of all symbols (the copy is removed).
fn stripped_size(binary: &Path) -> Result<u64> {
    let strip = find_binary("strip").context("`strip` (binutils) is not installed")?;
    let copy: PathBuf =
        std::env::temp_dir().join(format!("weft-bench-{}.stripped", std::process::id()));
    let result = crate::exec::output(
        Command::new(strip)
            .arg("--strip-all")
            .arg("-o")
            .arg(&copy)
            .arg(binary),
    )
    .and_then(|_| {
        Ok(std::fs::metadata(&copy)
            .with_context(|| format!("reading {}", copy.display()))?
            .len())
    });
    let _ = std::fs::remove_file(&copy);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cipher_ceiling_is_cpus_over_seal_plus_open_time() {
        let c = CipherSpeed {
            datagram_len: 1472,
            seal_bytes_per_sec: 200e6,
            open_bytes_per_sec: 200e6,
        };
        // Each byte costs 10 ns of one CPU: 2 CPUs carry 200 MB/s, 1.6 Gbit/s.
        assert!((c.ceiling_bits_per_sec(2).unwrap() - 1.6e9).abs() < 1.0);
        // One CPU: half of that.
        assert!((c.ceiling_bits_per_sec(1).unwrap() - 0.8e9).abs() < 1.0);
        // More CPUs do not help one stream past its one sealing thread.
        assert!((c.ceiling_bits_per_sec(8).unwrap() - 1.6e9).abs() < 1.0);
        let slow_open = CipherSpeed {
            open_bytes_per_sec: 100e6,
            ..c
        };
        assert!((slow_open.ceiling_bits_per_sec(64).unwrap() - 0.8e9).abs() < 1.0);
        let none = CipherSpeed {
            open_bytes_per_sec: 0.0,
            ..c
        };
        assert_eq!(none.ceiling_bits_per_sec(2), None);
        assert_eq!(c.ceiling_bits_per_sec(0), None);
    }

    #[test]
    fn scale_addresses_are_distinct() {
        assert_eq!(scale_peer_addr(0), Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(scale_peer_addr(4095), Ipv4Addr::new(10, 200, 16, 0));
    }
}
