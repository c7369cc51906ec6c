//! Traffic between pods: commands in pods, ping, TCP transfers, and VXLAN capture on
//! a host's underlay interface.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::ExitStatus,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::{
    cmd::{
        DEFAULT_TIMEOUT, POLL, command_line, describe_status, ns_command, output, run, run_timeout,
    },
    pcap::Packet,
    signal::interrupted,
    testbed::{Host, Pod, VXLAN_PORT},
};

/// Runs `args[0] args[1..]` in `pod` and returns its stdout; fails on a nonzero exit.
pub fn pod_exec(pod: &Pod, args: &[&str]) -> Result<String> {
    ns_exec(&pod.ns, args)
}

/// Runs `args[0] args[1..]` in namespace `ns` and returns its stdout; fails on a
/// nonzero exit.
pub fn ns_exec(ns: &str, args: &[&str]) -> Result<String> {
    let (program, rest) = args.split_first().ok_or_else(|| anyhow!("empty command"))?;
    run(ns_command(ns, program).args(rest))
}

/// The MAC address of `pod`'s `eth0`, as `ip` prints it (lowercase, colon-separated).
pub fn pod_mac(pod: &Pod) -> Result<String> {
    Ok(pod_exec(pod, &["cat", "/sys/class/net/eth0/address"])?
        .trim()
        .to_string())
}

/// What a ping run saw.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PingReport {
    /// Echo requests sent.
    pub transmitted: u32,
    /// Echo replies received.
    pub received: u32,
    /// Round-trip time of each reply, in milliseconds.
    pub rtts_ms: Vec<f64>,
}

impl PingReport {
    /// Parses iputils `ping` output.
    pub fn parse(text: &str) -> Self {
        let mut r = PingReport::default();
        for line in text.lines() {
            if let Some(t) = line.split(" time=").nth(1)
                && let Some(ms) = t.split_whitespace().next().and_then(|v| v.parse().ok())
            {
                r.rtts_ms.push(ms);
            }
            if line.contains("packets transmitted") {
                let mut words = line.split(|c: char| c == ',' || c.is_whitespace());
                let nums: Vec<u32> = std::iter::from_fn(|| words.next())
                    .filter_map(|w| w.parse().ok())
                    .collect();
                if nums.len() >= 2 {
                    r.transmitted = nums[0];
                    r.received = nums[1];
                }
            }
        }
        r
    }

    /// Mean round-trip time in milliseconds, if any reply came.
    pub fn mean_rtt_ms(&self) -> Option<f64> {
        (!self.rtts_ms.is_empty())
            .then(|| self.rtts_ms.iter().sum::<f64>() / self.rtts_ms.len() as f64)
    }
}

/// Pings `to` from `from` `count` times (0.2 s apart, each reply awaited up to 2 s).
/// Ok only if at least one reply came; the report says how many.
pub fn ping(from: &Pod, to: Ipv4Addr, count: u32) -> Result<PingReport> {
    // `-w`: stop at the deadline even if replies are missing.
    let deadline = (count / 5 + 3).to_string();
    let run = run_ping(from, to, count, &["-w", &deadline])?;
    if run.report.received == 0 {
        bail!(
            "expected replies, got none of {}; {run}",
            run.report.transmitted
        );
    }
    Ok(run.report)
}

/// Pings `to` from `from` `count` times (0.2 s apart, the last awaited up to 2 s),
/// expecting no answer: Ok only if ping ran, sent all `count` probes and received no
/// reply (iputils then exits with 1; 2 means it could not ping at all).
pub fn ping_unanswered(from: &Pod, to: Ipv4Addr, count: u32) -> Result<PingReport> {
    let run = run_ping(from, to, count, &[])?;
    let r = &run.report;
    ensure!(
        r.transmitted == count && r.received == 0 && run.status.code() == Some(1),
        "expected {count} probes sent and none answered; {run}"
    );
    Ok(run.report)
}

/// One run of iputils `ping`: what it reported and how it ended.
struct PingRun {
    report: PingReport,
    status: ExitStatus,
    /// Names the pods, the command line, its exit and its output, for messages.
    context: String,
}

impl std::fmt::Display for PingRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.context)
    }
}

/// Runs `ping -n -c <count> -i 0.2 -W 2 <extra> <to>` in `from`'s namespace.
fn run_ping(from: &Pod, to: Ipv4Addr, count: u32, extra: &[&str]) -> Result<PingRun> {
    ensure!(count > 0, "ping count must be positive");
    let count_s = count.to_string();
    let to_s = to.to_string();
    let mut cmd = ns_command(&from.ns, "ping");
    cmd.args(["-n", "-c", &count_s, "-i", "0.2", "-W", "2"])
        .args(extra)
        .arg(&to_s);
    let line = command_line(&cmd);
    let out = output(&mut cmd, Duration::from_secs(u64::from(count / 5 + 10)))?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(PingRun {
        report: PingReport::parse(&text),
        status: out.status,
        context: format!(
            "ping from pod {} ({}) to {to}: `{line}` {}, printed: {} {}",
            from.label(),
            from.addr,
            describe_status(&out.status),
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
    })
}

/// Pings `to` from `from` `count` times `interval` apart (root may go below 0.2 s),
/// each reply awaited up to 1 s, and reports how many came back: for measuring loss
/// across an event (an agent restart, say) that happens meanwhile.
pub fn ping_stream(from: &Pod, to: Ipv4Addr, count: u32, interval: Duration) -> Result<PingReport> {
    ensure!(count > 0, "ping count must be positive");
    let count_s = count.to_string();
    let interval_s = format!("{:.3}", interval.as_secs_f64());
    // No -w: with it, ping keeps probing past `count` while replies are missing.
    let span = interval.as_secs_f64() * f64::from(count);
    let to_s = to.to_string();
    let mut cmd = ns_command(&from.ns, "ping");
    cmd.args([
        "-n",
        "-q",
        "-c",
        &count_s,
        "-i",
        &interval_s,
        "-W",
        "1",
        &to_s,
    ]);
    let line = command_line(&cmd);
    let out = output(&mut cmd, Duration::from_secs_f64(span * 2.0 + 10.0))?;
    let report = PingReport::parse(&String::from_utf8_lossy(&out.stdout));
    ensure!(
        report.transmitted > 0,
        "`{line}` sent nothing ({}): {}",
        describe_status(&out.status),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(report)
}

/// Pings `to` from `from` once a second-ish until a reply comes, for at most
/// `timeout`; returns how long it took. For waiting until a datapath works.
pub fn wait_ping(from: &Pod, to: Ipv4Addr, timeout: Duration) -> Result<Duration> {
    let start = Instant::now();
    let to_s = to.to_string();
    let mut last = String::new();
    while start.elapsed() < timeout {
        if interrupted() {
            bail!("interrupted");
        }
        let mut cmd = ns_command(&from.ns, "ping");
        cmd.args(["-n", "-c", "1", "-W", "1", &to_s]);
        let out = output(&mut cmd, Duration::from_secs(5))?;
        if PingReport::parse(&String::from_utf8_lossy(&out.stdout)).received > 0 {
            return Ok(start.elapsed());
        }
        last = String::from_utf8_lossy(&out.stdout).trim().to_string();
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!(
        "pod {} ({}) got no ping reply from {to} within {timeout:?}; last attempt: {last}",
        from.label(),
        from.addr
    )
}

/// Result of a TCP transfer.
#[derive(Clone, Debug, PartialEq)]
pub struct Transfer {
    /// Bytes the sender wrote.
    pub bytes_sent: u64,
    /// Bytes the receiver read, each checked against the pattern sent.
    pub bytes_received: u64,
    /// Duration of the transfer as the receiver measured it (accept to end of
    /// stream), in seconds.
    pub seconds: f64,
    /// Receiver-side throughput, bits per second.
    pub bits_per_second: f64,
}

/// Bytes of the repeating pattern a transfer sends (a prime, so a shifted or dropped
/// chunk never lines up again).
const PATTERN_PERIOD: usize = 251;
/// Size of one write or read.
const CHUNK: usize = 256 * 1024;
/// Longest silence (no byte moving) a transfer tolerates.
const STALL_TIMEOUT: Duration = Duration::from_secs(10);

fn pattern() -> Vec<u8> {
    (0..PATTERN_PERIOD * (CHUNK / PATTERN_PERIOD + 2))
        .map(|i| (i % PATTERN_PERIOD) as u8)
        .collect()
}

/// Sends `bytes` bytes over one TCP connection from pod `from` to pod `to` and checks
/// that the receiver read exactly those bytes (a known pattern, compared byte for
/// byte). Both ends are threads of this process placed in the pods' namespaces, so no
/// tool is needed. Bounded: connect within 3 s, no stall longer than 10 s, the
/// whole transfer within 120 s.
pub fn tcp_transfer(from: &Pod, to: &Pod, bytes: u64) -> Result<Transfer> {
    let what = format!(
        "TCP transfer of {bytes} bytes from pod {} to pod {} ({})",
        from.label(),
        to.label(),
        to.addr
    );
    let listen_addr = SocketAddr::from((to.addr, 0));
    let listener = crate::netns::join(
        crate::netns::spawn_in(&to.ns, move || {
            TcpListener::bind(listen_addr).with_context(|| format!("bind {listen_addr}"))
        }),
        "bind",
    )
    .with_context(|| what.clone())?;
    let port = listener.local_addr()?.port();
    // The listening socket stays in `to`'s namespace whichever thread accepts on it.
    let receiver = std::thread::spawn(move || receive(listener));
    let dst = SocketAddr::from((to.addr, port));
    let sender = crate::netns::spawn_in(&from.ns, move || send(dst, bytes));
    let sent = crate::netns::join(sender, "sender").with_context(|| what.clone());
    let received = match receiver.join() {
        Ok(r) => r.with_context(|| what.clone()),
        Err(_) => bail!("{what}: receiver thread panicked"),
    };
    let bytes_sent = sent?;
    let (bytes_received, elapsed) = received?;
    ensure!(
        bytes_received == bytes,
        "{what}: expected {bytes} bytes at the receiver, got {bytes_received} (sender wrote {bytes_sent})"
    );
    let seconds = elapsed.as_secs_f64().max(1e-9);
    Ok(Transfer {
        bytes_sent,
        bytes_received,
        seconds,
        bits_per_second: bytes_received as f64 * 8.0 / seconds,
    })
}

fn send(dst: SocketAddr, bytes: u64) -> Result<u64> {
    let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))
        .with_context(|| format!("connect to {dst}"))?;
    s.set_write_timeout(Some(STALL_TIMEOUT))?;
    let pat = pattern();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut sent = 0u64;
    while sent < bytes {
        ensure!(
            Instant::now() < deadline,
            "sender: not done after 120 s ({sent} bytes written)"
        );
        ensure!(!interrupted(), "interrupted");
        let off = (sent % PATTERN_PERIOD as u64) as usize;
        let n = CHUNK.min(usize::try_from(bytes - sent).unwrap_or(CHUNK));
        s.write_all(&pat[off..off + n])
            .with_context(|| format!("write after {sent} bytes"))?;
        sent += n as u64;
    }
    s.shutdown(Shutdown::Write)?;
    Ok(sent)
}

/// Accepts one connection on `listener` within `timeout` (and unless interrupted);
/// `who` names the waiting side in errors. The stream is left non-blocking.
pub fn accept_within(listener: &TcpListener, timeout: Duration, who: &str) -> Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((s, _)) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                ensure!(
                    Instant::now() < deadline,
                    "{who}: no connection within {timeout:?}"
                );
                ensure!(!interrupted(), "interrupted");
                std::thread::sleep(POLL);
            }
            Err(e) => return Err(e).with_context(|| format!("{who}: accept")),
        }
    }
}

fn receive(listener: TcpListener) -> Result<(u64, Duration)> {
    let mut s = accept_within(&listener, Duration::from_secs(5), "receiver")?;
    s.set_nonblocking(false)?;
    s.set_read_timeout(Some(STALL_TIMEOUT))?;
    let start = Instant::now();
    let pat = pattern();
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    loop {
        let n = s
            .read(&mut buf)
            .with_context(|| format!("read after {got} bytes"))?;
        if n == 0 {
            return Ok((got, start.elapsed()));
        }
        let off = (got % PATTERN_PERIOD as u64) as usize;
        if buf[..n] != pat[off..off + n] {
            let i = buf[..n]
                .iter()
                .zip(&pat[off..])
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            bail!(
                "receiver: byte {} differs from what was sent",
                got + i as u64
            );
        }
        got += n as u64;
        ensure!(
            start.elapsed() < Duration::from_secs(120),
            "receiver: not done after 120 s"
        );
    }
}

/// Captures up to `count` VXLAN packets (UDP port 6784) on `host`'s `eth0` while
/// `during` runs, waiting at most `timeout` after it returns for the count to be
/// reached. Returns the raw Ethernet frames (outer headers first), for decoding with
/// `weft_common::wire::Vxlan`. The capture file goes to `dir`.
pub fn capture_vxlan(
    host: &Host,
    dir: &Path,
    count: usize,
    timeout: Duration,
    during: impl FnOnce() -> Result<()>,
) -> Result<Vec<Packet>> {
    let file = dir.join(format!("h{}-vxlan-{}.pcap", host.n, unique()));
    let filter = format!("udp port {VXLAN_PORT}");
    crate::pcap::capture_while(&host.ns, "eth0", &filter, count, timeout, &file, during)
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::SeqCst)
}

/// Checks that `ns` has no interface whose name starts with `prefix`; returns the
/// names found otherwise.
pub fn links_with_prefix(ns: &str, prefix: &str) -> Result<Vec<String>> {
    let out = run_timeout(
        ns_command(ns, "ip").args(["-o", "link", "show"]),
        DEFAULT_TIMEOUT,
    )?;
    Ok(out
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with(prefix))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_output() {
        let text = "PING 10.32.2.1 (10.32.2.1) 56(84) bytes of data.\n\
            64 bytes from 10.32.2.1: icmp_seq=1 ttl=64 time=0.101 ms\n\
            64 bytes from 10.32.2.1: icmp_seq=2 ttl=64 time=0.050 ms\n\n\
            --- 10.32.2.1 ping statistics ---\n\
            3 packets transmitted, 2 received, 33.3333% packet loss, time 402ms\n\
            rtt min/avg/max/mdev = 0.050/0.075/0.101/0.025 ms\n";
        let r = PingReport::parse(text);
        assert_eq!(r.transmitted, 3);
        assert_eq!(r.received, 2);
        assert_eq!(r.rtts_ms, vec![0.101, 0.050]);
        assert!((r.mean_rtt_ms().unwrap() - 0.0755).abs() < 1e-9);
        let none = PingReport::parse("2 packets transmitted, 0 received, 100% packet loss");
        assert_eq!((none.transmitted, none.received), (2, 0));
        assert_eq!(none.mean_rtt_ms(), None);
    }
}
