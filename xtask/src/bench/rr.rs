//! The request/response test: a 1-byte ping-pong over one TCP connection
//! (`TCP_NODELAY` on both ends) for a fixed time. The server and the client are
//! threads of this process placed in the two namespaces, so no tool is needed; every
//! round trip is timed on the client.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use weft_testbed::{
    interrupted,
    netns::{join, spawn_in},
    traffic::accept_within,
};

/// Longest a single round trip may take before the test fails.
const STALL: Duration = Duration::from_secs(5);

/// What a request/response run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct RrResult {
    /// Round trips completed.
    pub transactions: u64,
    /// Wall time of the loop, seconds.
    pub seconds: f64,
    /// Round-trip time percentiles and extremes, nanoseconds.
    pub p50_ns: u64,
    /// See [`RrResult::p50_ns`].
    pub p90_ns: u64,
    /// See [`RrResult::p50_ns`].
    pub p99_ns: u64,
    /// See [`RrResult::p50_ns`].
    pub min_ns: u64,
    /// See [`RrResult::p50_ns`].
    pub max_ns: u64,
}

/// Runs the ping-pong from namespace `client_ns` to a server in `server_ns` listening
/// on `server_addr`, for `time`.
pub fn run(
    client_ns: &str,
    server_ns: &str,
    server_addr: Ipv4Addr,
    time: Duration,
) -> Result<RrResult> {
    let bind = SocketAddr::from((server_addr, 0));
    let listener = join(
        spawn_in(server_ns, move || {
            TcpListener::bind(bind).with_context(|| format!("bind {bind}"))
        }),
        "rr bind",
    )?;
    let port = listener.local_addr()?.port();
    // The listening socket belongs to the server's namespace whichever thread uses it.
    let server = std::thread::spawn(move || serve(listener));
    let dst = SocketAddr::from((server_addr, port));
    let client = spawn_in(client_ns, move || ping_pong(dst, time));
    let rtts = join(client, "rr client");
    let served = match server.join() {
        Ok(r) => r,
        Err(_) => bail!("rr server thread panicked"),
    };
    let (mut rtts, seconds) = rtts?;
    let echoed = served?;
    ensure!(
        echoed == rtts.len() as u64,
        "the server echoed {echoed} bytes but the client completed {} round trips",
        rtts.len()
    );
    summarize(&mut rtts, seconds)
}

/// Percentiles of `rtts` (sorted in place).
fn summarize(rtts: &mut [u64], seconds: f64) -> Result<RrResult> {
    ensure!(!rtts.is_empty(), "no round trip completed");
    rtts.sort_unstable();
    let pct = |p: usize| rtts[(rtts.len() * p / 100).min(rtts.len() - 1)];
    Ok(RrResult {
        transactions: rtts.len() as u64,
        seconds,
        p50_ns: pct(50),
        p90_ns: pct(90),
        p99_ns: pct(99),
        min_ns: rtts[0],
        max_ns: rtts[rtts.len() - 1],
    })
}

/// Accepts one connection and echoes each byte until the client closes it; returns
/// the bytes echoed.
fn serve(listener: TcpListener) -> Result<u64> {
    let mut s = accept_within(&listener, Duration::from_secs(5), "rr server")?;
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(STALL))?;
    let mut b = [0u8; 1];
    let mut n = 0u64;
    loop {
        match s.read(&mut b).context("rr server: read")? {
            0 => return Ok(n),
            _ => {
                s.write_all(&b).context("rr server: write")?;
                n += 1;
            }
        }
    }
}

/// Connects to `dst` and does 1-byte round trips for `time`; returns each round trip
/// in nanoseconds and the loop's wall time in seconds.
fn ping_pong(dst: SocketAddr, time: Duration) -> Result<(Vec<u64>, f64)> {
    let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(3))
        .with_context(|| format!("rr client: connect to {dst}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(STALL))?;
    s.set_write_timeout(Some(STALL))?;
    let mut rtts = Vec::with_capacity(1 << 20);
    let mut b = [0u8; 1];
    let start = Instant::now();
    let end = start + time;
    loop {
        let t0 = Instant::now();
        if t0 >= end {
            break;
        }
        s.write_all(&[0x5a]).context("rr client: write")?;
        s.read_exact(&mut b).context("rr client: read")?;
        ensure!(b[0] == 0x5a, "rr client: the server echoed {:#x}", b[0]);
        let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
        rtts.push(ns);
        if rtts.len() % 1024 == 0 && interrupted() {
            bail!("interrupted");
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    s.shutdown(std::net::Shutdown::Write)?;
    Ok((rtts, seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut v: Vec<u64> = (1..=100).rev().collect();
        let r = summarize(&mut v, 2.0).unwrap();
        assert_eq!((r.transactions, r.min_ns, r.max_ns), (100, 1, 100));
        assert_eq!((r.p50_ns, r.p90_ns, r.p99_ns), (51, 91, 100));
        assert!(summarize(&mut [], 1.0).is_err());
    }

    #[test]
    fn ping_pong_over_loopback() {
        // Runs in this process's own namespace, on loopback only.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let dst = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || serve(listener));
        let (rtts, secs) = ping_pong(dst, Duration::from_millis(100)).unwrap();
        assert_eq!(server.join().unwrap().unwrap(), rtts.len() as u64);
        assert!(!rtts.is_empty() && secs >= 0.1);
    }
}
