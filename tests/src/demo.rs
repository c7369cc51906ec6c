//! `cargo xtask demo`: three hosts with two pods each, a weft agent per host, then
//! cross-host ping, a TCP transfer and each host's connection status. Tears down on
//! success, on failure and on Ctrl-C.

use std::{path::Path, time::Duration};

use anyhow::{Context, Result, bail};

use crate::{
    signal::{install_interrupt_handler, interrupted},
    testbed::Testbed,
    traffic::{ping, tcp_transfer, wait_ping},
};

const HOSTS: u8 = 3;
const PODS: u8 = 2;
const TRANSFER_BYTES: u64 = 256 << 20;

/// Runs the demo with the agent binary `agent_bin`. Needs root.
pub fn demo(agent_bin: &Path) -> Result<()> {
    install_interrupt_handler()?;
    let result = run(agent_bin);
    if interrupted() {
        println!("demo: interrupted; testbed torn down");
    }
    result.map_err(|e| {
        if interrupted() {
            e.context("interrupted")
        } else {
            e
        }
    })
}

fn step(msg: &str) -> Result<()> {
    if interrupted() {
        bail!("interrupted before: {msg}");
    }
    println!("==> {msg}");
    Ok(())
}

fn run(agent_bin: &Path) -> Result<()> {
    if !agent_bin.is_file() {
        bail!(
            "agent binary {} not found (build it first)",
            agent_bin.display()
        );
    }
    step(&format!(
        "building a testbed: {HOSTS} hosts x {PODS} pods on one underlay switch"
    ))?;
    let mut tb = Testbed::with_hosts(HOSTS, PODS)?;
    for h in tb.hosts() {
        let pods: Vec<String> = h
            .pods
            .iter()
            .map(|p| format!("{} {}", p.label(), p.addr))
            .collect();
        println!(
            "    host{} {} ({}): pods {}",
            h.n,
            h.addr,
            h.peer_name(),
            pods.join(", ")
        );
    }
    for n in 1..=HOSTS {
        step(&format!("starting weft on host{n}"))?;
        tb.start_agent(n, agent_bin, &[])?;
    }
    step("cross-host ping between pods")?;
    for (a, b) in [((1, 1), (2, 1)), ((2, 2), (3, 1)), ((3, 2), (1, 2))] {
        let from = tb.pod(a.0, a.1)?.clone();
        let to = tb.pod(b.0, b.1)?.clone();
        wait_ping(&from, to.addr, Duration::from_secs(10))
            .with_context(|| format!("first contact {} -> {}", from.label(), to.label()))?;
        let r = ping(&from, to.addr, 5)?;
        let rtts: Vec<String> = r.rtts_ms.iter().map(|t| format!("{t:.3}")).collect();
        println!(
            "    {} {} -> {} {}: {}/{} replies, rtt ms [{}]",
            from.label(),
            from.addr,
            to.label(),
            to.addr,
            r.received,
            r.transmitted,
            rtts.join(" ")
        );
    }
    step(&format!(
        "TCP transfer of {} MiB, h1p1 -> h2p1",
        TRANSFER_BYTES >> 20
    ))?;
    let t = tcp_transfer(tb.pod(1, 1)?, tb.pod(2, 1)?, TRANSFER_BYTES)?;
    println!(
        "    {} bytes in {:.3} s: {:.2} Gbit/s",
        t.bytes_received,
        t.seconds,
        t.bits_per_second / 1e9
    );
    for n in 1..=HOSTS {
        step(&format!("weft status connections on host{n}"))?;
        let text = tb.status(n, &["connections"])?;
        for line in text.lines() {
            println!("    {line}");
        }
    }
    step("agent memory (VmRSS)")?;
    for n in 1..=HOSTS {
        let pid = tb.agent_pid(n)?;
        println!("    host{n}: {}", vm_rss(pid)?);
    }
    step("tearing down")?;
    tb.teardown()?;
    println!("demo: done");
    Ok(())
}

/// The `VmRSS` line of a process, e.g. `6144 kB`.
fn vm_rss(pid: u32) -> Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}
