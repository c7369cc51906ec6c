//! Shared setup of the privileged integration tests: environment checks and a
//! serialised testbed.

#![allow(dead_code, reason = "each test binary uses a subset of these helpers")]

use std::{
    ops::{Deref, DerefMut},
    path::PathBuf,
    sync::MutexGuard,
    time::{Duration, Instant},
};

use serde_json::Value;
use weft_testbed::{Testbed, is_root, serial};

/// Panics unless running as root.
pub fn require_root() {
    assert!(is_root(), "needs root (CI runs as root)");
}

/// The agent binary named by `WEFT_AGENT_BIN` (after checking for root).
pub fn agent_bin() -> PathBuf {
    require_root();
    let bin = std::env::var_os("WEFT_AGENT_BIN")
        .map(PathBuf::from)
        .expect("WEFT_AGENT_BIN not set: run through `cargo xtask test`");
    assert!(
        bin.is_file(),
        "WEFT_AGENT_BIN={} is not a file",
        bin.display()
    );
    bin
}

/// A testbed that holds the process-wide testbed lock until dropped (tests of one
/// binary run on parallel threads; agents and captures are timing-sensitive).
pub struct Bed {
    // Field order matters: the testbed is torn down before the lock is released.
    pub tb: Testbed,
    _guard: MutexGuard<'static, ()>,
}

impl Deref for Bed {
    type Target = Testbed;
    fn deref(&self) -> &Testbed {
        &self.tb
    }
}

impl DerefMut for Bed {
    fn deref_mut(&mut self) -> &mut Testbed {
        &mut self.tb
    }
}

/// `hosts` hosts with `pods` pods each.
pub fn bed(hosts: u8, pods: u8) -> Bed {
    require_root();
    let guard = serial();
    let tb = Testbed::with_hosts(hosts, pods).unwrap_or_else(|e| panic!("testbed setup: {e:#}"));
    Bed { tb, _guard: guard }
}

/// Starts the agent on each of `hosts`, panicking with the reason on failure.
pub fn start_agents(tb: &mut Testbed, bin: &std::path::Path, hosts: &[u8]) {
    for &n in hosts {
        tb.start_agent(n, bin, &[])
            .unwrap_or_else(|e| panic!("starting agent on host {n}: {e:#}"));
    }
}

/// Two hosts with one pod each and agents running on both: (testbed, host1's pod,
/// host2's pod).
pub fn running_pair(bin: &std::path::Path) -> (Bed, weft_testbed::Pod, weft_testbed::Pod) {
    let mut tb = bed(2, 1);
    start_agents(&mut tb, bin, &[1, 2]);
    let p1 = tb.pod(1, 1).must("pod").clone();
    let p2 = tb.pod(2, 1).must("pod").clone();
    (tb, p1, p2)
}

/// How long a freshly started datapath may take to carry the first ping.
pub const FIRST_CONTACT: Duration = Duration::from_secs(10);

/// Unwraps with the full error chain in the panic message.
pub trait Must<T> {
    /// Unwraps, panicking with `what` and the error chain.
    fn must(self, what: &str) -> T;
}

impl<T> Must<T> for anyhow::Result<T> {
    fn must(self, what: &str) -> T {
        self.unwrap_or_else(|e| panic!("{what}: {e:#}"))
    }
}

/// Waits until host `n` reports its connection to host `peer` and `check` accepts
/// it; returns the connection (JSON). Fails with the last status seen.
pub fn wait_connection(
    tb: &Testbed,
    n: u8,
    peer: u8,
    timeout: Duration,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let name = tb.host(peer).must("host").peer_name();
    let deadline = Instant::now() + timeout;
    let mut last = Value::Null;
    loop {
        if let Ok(s) = tb.status_json(n) {
            if let Some(c) = s["connections"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["name"] == name.as_str()))
                && check(c)
            {
                return c.clone();
            }
            last = s;
        }
        assert!(
            Instant::now() < deadline,
            "host{n}: no satisfying connection to host{peer} within {timeout:?}; last status: \
             {last:#}\nagent log:\n{}",
            tb.agent_log(n)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn established_over(overlay: &'static str) -> impl Fn(&Value) -> bool {
    move |c| c["state"] == "established" && c["overlay"] == overlay
}

/// A firewall in a host's namespace (nftables table `weft_test`, hooks input and
/// output) dropping what the given matches select; [`Firewall::remove`] deletes it.
pub struct Firewall {
    ns: String,
}

impl Firewall {
    /// Drops, in namespace `ns`, incoming packets matching each of `inbound` and
    /// outgoing packets matching each of `outbound` (nft match expressions, such as
    /// `udp dport 6784` or `meta l4proto esp`).
    pub fn drop(ns: &str, inbound: &[&str], outbound: &[&str]) -> Self {
        let nft = |rule: &str| {
            weft_testbed::ns_exec(ns, &["nft", rule]).must(rule);
        };
        nft("add table inet weft_test");
        nft("add chain inet weft_test in { type filter hook input priority 0 ; }");
        nft("add chain inet weft_test out { type filter hook output priority 0 ; }");
        for m in inbound {
            nft(&format!("add rule inet weft_test in {m} drop"));
        }
        for m in outbound {
            nft(&format!("add rule inet weft_test out {m} drop"));
        }
        Self { ns: ns.to_owned() }
    }

    /// Deletes the firewall.
    pub fn remove(self) {
        weft_testbed::ns_exec(&self.ns, &["nft", "delete table inet weft_test"])
            .must("deleting the test firewall");
    }
}
