//! The per-mode tests: iperf3 TCP (1 and 4 streams) and 64-byte UDP, the 1-byte
//! request/response test, and around the 1-stream test: CPU time from `/proc/stat`,
//! and packet sizes from interface counters (what the receiver gets, what crosses the
//! wire).

use std::{
    os::unix::process::CommandExt,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use weft_testbed::{
    cmd::{command_line, ns_command, output},
    interrupted,
};

use super::{
    Durations,
    modes::{Endpoint, Port, Running},
    rr,
};

/// The iperf3 server's port (each mode's server runs in its own namespace).
const IPERF_PORT: u16 = 5201;
/// UDP payload bytes of the small-packet test.
pub const UDP_PAYLOAD: usize = 64;
/// How long an iperf3 server may take to listen.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// A test run once per mode per round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Test {
    /// iperf3, one TCP stream; also gives the CPU cost.
    Tcp1,
    /// iperf3, four TCP streams.
    Tcp4,
    /// 1-byte TCP ping-pong over one connection.
    Rr,
    /// iperf3 UDP, 64-byte payloads, unlimited rate.
    Udp64,
}

impl Test {
    /// Every test, in the order a round runs them.
    pub const ALL: [Test; 4] = [Test::Tcp1, Test::Tcp4, Test::Rr, Test::Udp64];

    /// For progress lines.
    pub fn label(self) -> &'static str {
        match self {
            Test::Tcp1 => "TCP, 1 stream",
            Test::Tcp4 => "TCP, 4 streams",
            Test::Rr => "TCP request/response",
            Test::Udp64 => "UDP, 64-byte packets",
        }
    }

    /// The figures it produces.
    pub fn metrics(self) -> &'static [Metric] {
        match self {
            Test::Tcp1 => &[
                Metric::Tcp1Gbps,
                Metric::CpuSecPerGb,
                Metric::RxBytesPerPacket,
                Metric::RxIpBytesPerPacket,
                Metric::WireBytesPerFrame,
            ],
            Test::Tcp4 => &[Metric::Tcp4Gbps],
            Test::Rr => &[Metric::RrTps, Metric::RrP50Us, Metric::RrP99Us],
            Test::Udp64 => &[Metric::UdpMpps],
        }
    }

    /// How long it runs.
    pub fn duration(self, d: &Durations) -> Duration {
        match self {
            Test::Tcp1 | Test::Tcp4 => d.tcp,
            Test::Rr => d.rr,
            Test::Udp64 => d.udp,
        }
    }
}

/// A figure the tables show.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Metric {
    /// TCP, 1 stream, Gbit/s received.
    Tcp1Gbps,
    /// TCP, 4 streams, Gbit/s received.
    Tcp4Gbps,
    /// Request/response transactions per second.
    RrTps,
    /// Request/response round trip, median, microseconds.
    RrP50Us,
    /// Request/response round trip, 99th percentile, microseconds.
    RrP99Us,
    /// 64-byte UDP packets received per second (millions).
    UdpMpps,
    /// CPU seconds (all cores) per GB received in the 1-stream TCP test.
    CpuSecPerGb,
    /// Bytes per packet the receiving end's `eth0` got in the 1-stream TCP test.
    RxBytesPerPacket,
    /// Bytes per IP packet the receiving end's stack got in the 1-stream TCP test.
    RxIpBytesPerPacket,
    /// Bytes per frame the client's host put on the wire in the 1-stream TCP test.
    WireBytesPerFrame,
}

impl Metric {
    /// Every metric, in table order.
    pub const ALL: [Metric; 10] = [
        Metric::Tcp1Gbps,
        Metric::Tcp4Gbps,
        Metric::RrTps,
        Metric::RrP50Us,
        Metric::RrP99Us,
        Metric::UdpMpps,
        Metric::CpuSecPerGb,
        Metric::RxBytesPerPacket,
        Metric::RxIpBytesPerPacket,
        Metric::WireBytesPerFrame,
    ];

    /// Its key in bench.json.
    pub fn key(self) -> &'static str {
        match self {
            Metric::Tcp1Gbps => "tcp_1_stream_gbps",
            Metric::Tcp4Gbps => "tcp_4_streams_gbps",
            Metric::RrTps => "rr_transactions_per_s",
            Metric::RrP50Us => "rr_p50_us",
            Metric::RrP99Us => "rr_p99_us",
            Metric::UdpMpps => "udp_64b_mpps_received",
            Metric::CpuSecPerGb => "cpu_s_per_gb_tcp_1_stream",
            Metric::RxBytesPerPacket => "tcp_1_stream_receiver_eth0_bytes_per_packet",
            Metric::RxIpBytesPerPacket => "tcp_1_stream_receiver_ip_bytes_per_packet",
            Metric::WireBytesPerFrame => "tcp_1_stream_wire_bytes_per_frame",
        }
    }

    /// Its row label in the table.
    pub fn label(self) -> &'static str {
        match self {
            Metric::Tcp1Gbps => "TCP 1 stream, Gbit/s",
            Metric::Tcp4Gbps => "TCP 4 streams, Gbit/s",
            Metric::RrTps => "TCP 1-byte req/resp, transactions/s",
            Metric::RrP50Us => "TCP 1-byte req/resp, p50 µs (lower is better)",
            Metric::RrP99Us => "TCP 1-byte req/resp, p99 µs (lower is better)",
            Metric::UdpMpps => "UDP 64-byte payload, Mpackets/s received",
            Metric::CpuSecPerGb => "CPU s per GB, TCP 1 stream (lower is better)",
            Metric::RxBytesPerPacket => "TCP 1 stream, bytes per packet into receiver's eth0",
            Metric::RxIpBytesPerPacket => "TCP 1 stream, bytes per IP packet into receiver",
            Metric::WireBytesPerFrame => "TCP 1 stream, bytes per frame on the wire",
        }
    }

    /// Whether the ratio columns apply (not to the packet sizes, which are evidence of
    /// the profile rather than a performance figure).
    pub fn compared(self) -> bool {
        !matches!(
            self,
            Metric::RxBytesPerPacket | Metric::RxIpBytesPerPacket | Metric::WireBytesPerFrame
        )
    }

    /// Decimal places in the table.
    pub fn decimals(self) -> usize {
        match self {
            Metric::RrTps
            | Metric::RxBytesPerPacket
            | Metric::RxIpBytesPerPacket
            | Metric::WireBytesPerFrame => 0,
            Metric::Tcp1Gbps | Metric::Tcp4Gbps | Metric::RrP50Us | Metric::RrP99Us => 1,
            Metric::UdpMpps | Metric::CpuSecPerGb => 3,
        }
    }
}

/// One measured value, with the details it was computed from.
#[derive(Debug, Clone)]
pub struct Sample {
    /// What it measures.
    pub metric: Metric,
    /// The value, in the metric's unit.
    pub value: f64,
    /// The inputs (bytes, seconds, packets, CPU jiffies...), for bench.json.
    pub detail: Value,
}

/// Runs `test` from `r`'s client to its server; returns its samples.
pub fn run(test: Test, r: &Running, d: &Durations) -> Result<Vec<Sample>> {
    let (client, server) = (&r.client, &r.server);
    match test {
        Test::Tcp1 => {
            let receiver = Port {
                ns: server.ns.clone(),
                dev: "eth0".into(),
            };
            let rx0 = link_rx(&receiver)?;
            let ip0 = ip_rx(&server.ns)?;
            let wire0 = link_rx(&r.wire)?;
            let cpu0 = CpuTimes::read()?;
            let out = iperf(client, server, &["-P", "1"], d.tcp)?;
            let cpu1 = CpuTimes::read()?;
            let rx = per_packet(rx0, link_rx(&receiver)?);
            let ip = per_packet(ip0, ip_rx(&server.ns)?);
            let wire = per_packet(wire0, link_rx(&r.wire)?);
            let (bps, bytes, secs) = tcp_received(&out)?;
            let busy = cpu1.busy_seconds_since(&cpu0);
            let gb = bytes / 1e9;
            ensure!(gb > 0.0, "iperf3 received no bytes");
            Ok(vec![
                Sample {
                    metric: Metric::Tcp1Gbps,
                    value: bps / 1e9,
                    detail: serde_json::json!({
                        "bytes": bytes, "seconds": secs, "bits_per_second": bps,
                        "retransmits": out["end"]["sum_sent"]["retransmits"],
                    }),
                },
                Sample {
                    metric: Metric::CpuSecPerGb,
                    value: busy / gb,
                    detail: serde_json::json!({
                        "cpu_busy_seconds_all_cores": busy, "bytes": bytes,
                        "wall_seconds": cpu1.wall.duration_since(cpu0.wall).as_secs_f64(),
                    }),
                },
                rx.sample(
                    Metric::RxBytesPerPacket,
                    serde_json::json!({"namespace": receiver.ns, "interface": receiver.dev}),
                ),
                ip.sample(
                    Metric::RxIpBytesPerPacket,
                    serde_json::json!({"namespace": server.ns, "counters": "Ip InReceives, IpExt InOctets"}),
                ),
                wire.sample(
                    Metric::WireBytesPerFrame,
                    serde_json::json!({"namespace": r.wire.ns, "interface": r.wire.dev}),
                ),
            ])
        }
        Test::Tcp4 => {
            let r = iperf(client, server, &["-P", "4"], d.tcp)?;
            let (bps, bytes, secs) = tcp_received(&r)?;
            Ok(vec![Sample {
                metric: Metric::Tcp4Gbps,
                value: bps / 1e9,
                detail: serde_json::json!({
                    "bytes": bytes, "seconds": secs, "bits_per_second": bps,
                    "retransmits": r["end"]["sum_sent"]["retransmits"],
                }),
            }])
        }
        Test::Rr => {
            let r = rr::run(&client.ns, &server.ns, server.addr, d.rr)?;
            let detail = serde_json::json!({
                "transactions": r.transactions, "seconds": r.seconds,
                "p50_ns": r.p50_ns, "p90_ns": r.p90_ns, "p99_ns": r.p99_ns,
                "min_ns": r.min_ns, "max_ns": r.max_ns,
            });
            Ok(vec![
                Sample {
                    metric: Metric::RrTps,
                    value: r.transactions as f64 / r.seconds,
                    detail: detail.clone(),
                },
                Sample {
                    metric: Metric::RrP50Us,
                    value: r.p50_ns as f64 / 1e3,
                    detail: detail.clone(),
                },
                Sample {
                    metric: Metric::RrP99Us,
                    value: r.p99_ns as f64 / 1e3,
                    detail,
                },
            ])
        }
        Test::Udp64 => {
            let len = UDP_PAYLOAD.to_string();
            let r = iperf(client, server, &["-u", "-l", &len, "-b", "0"], d.udp)?;
            let rx = &r["end"]["sum_received"];
            let packets = num(rx, "packets")?;
            let lost = num(rx, "lost_packets")?;
            let secs = num(rx, "seconds")?;
            ensure!(secs > 0.0, "iperf3 UDP test lasted 0 s");
            let sent = num(&r["end"]["sum_sent"], "packets")?;
            let received = (packets - lost).max(0.0);
            Ok(vec![Sample {
                metric: Metric::UdpMpps,
                value: received / secs / 1e6,
                detail: serde_json::json!({
                    "packets_sent": sent, "packets_received": received,
                    "lost_packets": lost, "seconds": secs,
                }),
            }])
        }
    }
}

/// A short unrecorded TCP run, so ARP, MAC tables and caches are warm for round 1.
pub fn warm_up(r: &Running) -> Result<()> {
    iperf(&r.client, &r.server, &["-P", "1"], Duration::from_secs(1)).map(drop)
}

fn num(v: &Value, key: &str) -> Result<f64> {
    v[key]
        .as_f64()
        .with_context(|| format!("iperf3 JSON lacks a number {key:?} in {v}"))
}

/// (bits/s, bytes, seconds) received in a TCP test.
fn tcp_received(r: &Value) -> Result<(f64, f64, f64)> {
    let rx = &r["end"]["sum_received"];
    Ok((
        num(rx, "bits_per_second")?,
        num(rx, "bytes")?,
        num(rx, "seconds")?,
    ))
}

/// Runs one iperf3 test (`-J`) against a one-off server in `server`'s namespace and
/// returns the client's JSON report.
fn iperf(client: &Endpoint, server: &Endpoint, args: &[&str], time: Duration) -> Result<Value> {
    let _server = IperfServer::start(&server.ns)?;
    let port = IPERF_PORT.to_string();
    let secs = time.as_secs().max(1).to_string();
    let addr = server.addr.to_string();
    let mut cmd = ns_command(&client.ns, "iperf3");
    cmd.args(["-c", &addr, "-p", &port, "-t", &secs, "-J"])
        .args(args);
    let line = command_line(&cmd);
    let out = output(&mut cmd, time + Duration::from_secs(20))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("`{line}` printed no JSON: {}", text.trim()))?;
    if let Some(e) = v["error"].as_str() {
        bail!("`{line}` failed: {e}");
    }
    ensure!(
        out.status.success(),
        "`{line}` failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(v)
}

/// A one-test iperf3 server (`iperf3 -s -1`) in a namespace; killed on drop if it
/// is still running.
struct IperfServer {
    child: Child,
}

impl IperfServer {
    fn start(ns: &str) -> Result<Self> {
        let port = IPERF_PORT.to_string();
        let mut cmd = ns_command(ns, "iperf3");
        cmd.args(["-s", "-1", "-p", &port])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        let line = command_line(&cmd);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{line}`"))?;
        let mut server = Self { child };
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        let filter = format!("sport = :{IPERF_PORT}");
        loop {
            let ss = output(
                ns_command(ns, "ss").args(["-Htln", &filter]),
                Duration::from_secs(5),
            )?;
            if !ss.stdout.is_empty() {
                return Ok(server);
            }
            if let Some(status) = server.child.try_wait()? {
                bail!("`{line}` exited ({status}) before listening");
            }
            if interrupted() {
                bail!("interrupted");
            }
            ensure!(
                Instant::now() < deadline,
                "`{line}` not listening within {LISTEN_TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for IperfServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait()
            && let Ok(pid) = libc::pid_t::try_from(self.child.id())
        {
            // SAFETY: kill(2) has no memory-safety preconditions; the process group
            // is the server's own (process_group(0) above).
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        let _ = self.child.wait();
    }
}

/// What an interface received between two reads of its counters.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Received {
    bytes: u64,
    packets: u64,
}

/// The counters' difference from `before` to `after`, each (rx bytes, rx packets).
fn per_packet(before: (u64, u64), after: (u64, u64)) -> Received {
    Received {
        bytes: after.0.saturating_sub(before.0),
        packets: after.1.saturating_sub(before.1),
    }
}

impl Received {
    /// Average bytes per packet (0 when none came).
    fn average(self) -> f64 {
        if self.packets == 0 {
            0.0
        } else {
            self.bytes as f64 / self.packets as f64
        }
    }

    /// Its average as a sample of `metric`, `source` saying where it was counted.
    fn sample(self, metric: Metric, source: Value) -> Sample {
        Sample {
            metric,
            value: self.average(),
            detail: serde_json::json!({
                "source": source, "rx_bytes": self.bytes, "rx_packets": self.packets,
            }),
        }
    }
}

/// (rx bytes, rx packets) of `port`. A veth counts each skb once, with its Ethernet
/// header, so bytes per packet far above the MTU mean super-packets arrived (whole
/// from a sender with TSO, or merged by GRO before the device). A veth with GRO on
/// counts what it got before its own GRO merges it: see [`ip_rx`].
fn link_rx(port: &Port) -> Result<(u64, u64)> {
    let text = weft_testbed::cmd::run_in(
        &port.ns,
        "ip",
        &["-s", "-j", "link", "show", "dev", &port.dev],
    )?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("ip -j printed {text}"))?;
    let rx = &v[0]["stats64"]["rx"];
    Ok((
        rx["bytes"].as_u64().context("no rx bytes")?,
        rx["packets"].as_u64().context("no rx packets")?,
    ))
}

/// (bytes, packets) the IP layer of namespace `ns` received: `IpExt InOctets` and
/// `Ip InReceives`, counted once per skb after GRO.
fn ip_rx(ns: &str) -> Result<(u64, u64)> {
    let text = weft_testbed::cmd::run_in(ns, "cat", &["/proc/net/snmp", "/proc/net/netstat"])?;
    Ok((
        snmp_counter(&text, "IpExt", "InOctets")?,
        snmp_counter(&text, "Ip", "InReceives")?,
    ))
}

/// Counter `name` of group `group` in `/proc/net/snmp` or `/proc/net/netstat` text:
/// a `group: names...` line followed by a `group: values...` line.
fn snmp_counter(text: &str, group: &str, name: &str) -> Result<u64> {
    let prefix = format!("{group}:");
    let mut lines = text
        .lines()
        .filter(|l| l.split_whitespace().next() == Some(&prefix));
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if let Some(i) = names.split_whitespace().position(|n| n == name) {
            let v = values.split_whitespace().nth(i);
            return v
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("bad {group} {name} value in {values:?}"));
        }
    }
    bail!("no {group} {name} counter")
}

/// The `cpu` line of `/proc/stat` (all cores), in clock ticks.
struct CpuTimes {
    busy: u64,
    wall: Instant,
}

impl CpuTimes {
    fn read() -> Result<Self> {
        let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let wall = Instant::now();
        let line = text
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("/proc/stat has no `cpu` line")?;
        Ok(Self {
            busy: busy_ticks(line)?,
            wall,
        })
    }

    fn busy_seconds_since(&self, earlier: &Self) -> f64 {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let hz = if hz > 0 { hz as f64 } else { 100.0 };
        self.busy.saturating_sub(earlier.busy) as f64 / hz
    }
}

/// Busy ticks of a `/proc/stat` cpu line: user + nice + system + irq + softirq +
/// steal (idle and iowait left out; guest time is already inside user).
fn busy_ticks(line: &str) -> Result<u64> {
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad /proc/stat line {line:?}"))?;
    ensure!(fields.len() >= 8, "short /proc/stat line {line:?}");
    Ok(fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_ticks_leave_out_idle_and_iowait() {
        let line = "cpu  10 1 5 1000 7 2 3 4 0 0";
        assert_eq!(busy_ticks(line).unwrap(), 10 + 1 + 5 + 2 + 3 + 4);
        assert!(busy_ticks("cpu 1 2").is_err());
        assert!(busy_ticks("cpu a b c d e f g h").is_err());
    }

    #[test]
    fn bytes_per_packet_from_counter_deltas() {
        let r = per_packet((1_000, 10), (1_000 + 3 * 1514, 13));
        assert_eq!(
            r,
            Received {
                bytes: 4542,
                packets: 3
            }
        );
        assert_eq!(r.average(), 1514.0);
        assert_eq!(per_packet((5, 5), (5, 5)).average(), 0.0);
        // A counter that went backwards (a recreated link) gives 0, not a wrap.
        assert_eq!(per_packet((9, 9), (1, 1)).packets, 0);
    }

    #[test]
    fn snmp_counters_by_group_and_name() {
        let text = "Ip: Forwarding DefaultTTL InReceives\nIp: 1 64 10524\n\
                    Icmp: InMsgs InReceives\nIcmp: 7 8\n\
                    IpExt: InNoRoutes InOctets\nIpExt: 0 664568160\n";
        assert_eq!(snmp_counter(text, "Ip", "InReceives").unwrap(), 10524);
        assert_eq!(snmp_counter(text, "Icmp", "InReceives").unwrap(), 8);
        assert_eq!(
            snmp_counter(text, "IpExt", "InOctets").unwrap(),
            664_568_160
        );
        assert!(snmp_counter(text, "Ip", "InOctets").is_err());
        assert!(snmp_counter("Ip: A B\nIp: 1\n", "Ip", "B").is_err());
    }

    #[test]
    fn tcp_figures_come_from_the_receiver() {
        let v = serde_json::json!({"end": {"sum_received": {
            "bits_per_second": 8e9, "bytes": 1e10, "seconds": 10.0}}});
        assert_eq!(tcp_received(&v).unwrap(), (8e9, 1e10, 10.0));
        assert!(tcp_received(&serde_json::json!({})).is_err());
    }
}
