//! The datapaths the bench compares. A mode brings up its own testbed (two hosts on
//! the veth underlay, one pod each) and names the two ends traffic runs between.
//!
//! Adding a mode is one line in [`registry`]. A weft mode that only differs in the
//! agent's options (sleeve, encryption, ESP) is a [`WeftMode`] with its extra
//! arguments and, if it needs a kernel feature, a check that says why it cannot run
//! here (the mode is then reported as skipped with that reason).

use std::{
    net::Ipv4Addr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use weft_testbed::{
    Host, Pod, Testbed,
    bench_topology::add_flat_kernel_vxlan,
    cmd::{ns_command, output},
    interrupted, start_weaver_pair, tcx_programs,
    weaver::{WEAVER_ENV, weaver_path},
};

use super::{
    TAG,
    measure::Test,
    profile::{End, Profile, UNDERLAY_DEV},
};

/// VNI of the kernel-VXLAN baseline (any fixed value costs the kernel the same).
const KERNEL_VXLAN_VNI: u32 = 1;
/// How long a mode's two ends may take to reach each other after setup.
const REACH_TIMEOUT: Duration = Duration::from_secs(20);
/// How long two weavers may take to establish their connection.
const WEAVER_ESTABLISH: Duration = Duration::from_secs(30);
/// The mesh password of the encrypted Weave mode.
const WEAVE_BENCH_PASSWORD: &str = "bench-password";

/// One end of a mode's traffic: a network namespace and the address it is reached at.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// The network namespace (a host's or a pod's).
    pub ns: String,
    /// Its address on the path being measured.
    pub addr: Ipv4Addr,
}

impl From<&Host> for Endpoint {
    fn from(h: &Host) -> Self {
        Endpoint {
            ns: h.ns.clone(),
            addr: h.addr,
        }
    }
}

impl From<&Pod> for Endpoint {
    fn from(p: &Pod) -> Self {
        Endpoint {
            ns: p.ns.clone(),
            addr: p.addr,
        }
    }
}

/// A network interface in a namespace.
#[derive(Debug, Clone)]
pub struct Port {
    /// The network namespace.
    pub ns: String,
    /// The interface.
    pub dev: String,
}

/// What modes need to set up.
pub struct Ctx<'a> {
    /// The release agent binary.
    pub agent: &'a Path,
}

/// A datapath to measure.
pub trait Mode {
    /// Its name on the command line and in the table (`raw`, `kernel-vxlan`, ...).
    fn name(&self) -> &'static str;
    /// One line on what it is.
    fn about(&self) -> &'static str;
    /// Why this machine cannot run it (a missing kernel feature), or `None`.
    fn unavailable(&self) -> Option<String> {
        None
    }
    /// Brings it up in a testbed of its own; it stays up until torn down.
    fn setup(&self, ctx: &Ctx) -> Result<Running>;
    /// The tests it runs each round (all by default).
    fn tests(&self) -> &'static [Test] {
        &Test::ALL
    }
}

/// The registered modes, in the order they are measured (and shown). `raw` and
/// `kernel-vxlan` are the references every other mode's ratios are taken against.
pub fn registry() -> Vec<Box<dyn Mode>> {
    vec![
        Box::new(Raw),
        Box::new(KernelVxlan),
        Box::new(WeftMode {
            name: "weft-fastdp",
            about: "pod to pod through weft's eBPF fast datapath",
            agent_args: &[],
            requires: None,
        }),
        Box::new(WeftSleeveMode {
            name: "weft-sleeve",
            about: "pod to pod through weft's userspace sleeve (mesh mode, --no-fastdp), no password",
            password: None,
        }),
        Box::new(WeftSleeveMode {
            name: "weft-sleeve-encrypted",
            about: "pod to pod through weft's sleeve, password (the encrypted sleeve, as Weave's)",
            password: Some(WEAVE_BENCH_PASSWORD),
        }),
        Box::new(WeaveMode {
            name: "weave-sleeve",
            about: "pod to pod through two real Weave Net 2.8.1 routers, sleeve, no password",
            password: None,
        }),
        Box::new(WeaveMode {
            name: "weave-sleeve-encrypted",
            about: "pod to pod through two real Weave Net 2.8.1 routers, sleeve, password",
            password: Some(WEAVE_BENCH_PASSWORD),
        }),
    ]
}

/// Modes picked to run, and the ones skipped with the reason.
pub type Selection = (Vec<Box<dyn Mode>>, Vec<(&'static str, String)>);

/// The registered modes named in `wanted` (all when empty), in the order given, and
/// the unavailable ones with the reason. Unknown names are an error listing the known.
pub fn select(wanted: &[String]) -> Result<Selection> {
    let mut all = registry();
    let known: Vec<&str> = all.iter().map(|m| m.name()).collect();
    let mut picked = Vec::new();
    if wanted.is_empty() {
        picked = std::mem::take(&mut all);
    } else {
        for w in wanted {
            let w = w.trim();
            if picked.iter().any(|m| m.name() == w) {
                bail!("mode {w:?} given twice");
            }
            let Some(i) = all.iter().position(|m| m.name() == w) else {
                bail!("unknown mode {w:?}; known modes: {}", known.join(", "));
            };
            picked.push(all.remove(i));
        }
    }
    let mut available = Vec::new();
    let mut skipped = Vec::new();
    for m in picked {
        match m.unavailable() {
            Some(reason) => skipped.push((m.name(), reason)),
            None => available.push(m),
        }
    }
    Ok((available, skipped))
}

/// A mode that is up: its testbed and the two ends of its traffic.
pub struct Running {
    tb: Testbed,
    /// Where clients run (the sending side of throughput tests).
    pub client: Endpoint,
    /// Where servers run.
    pub server: Endpoint,
    /// The underlay switch's port that receives what the client's host sends: the
    /// frames on the wire.
    pub wire: Port,
    /// Both ends of every host's underlay link (the underlay profile's interfaces).
    underlay_links: Vec<(Port, End)>,
    /// Hosts running a weft agent.
    agent_hosts: Vec<u8>,
    /// Hosts running a Weave router.
    weaver_hosts: Vec<u8>,
    /// The tests run in each round.
    pub tests: &'static [Test],
    /// Whether weft's eBPF programs carry the traffic (not in the sleeve modes): the
    /// live run-time statistics are taken only then.
    pub ebpf_carries: bool,
}

impl Running {
    /// What the mode's agents report after the run (`weft status --json` per host,
    /// plus the agent's RSS), or null when it runs none.
    pub fn diagnostics(&mut self) -> serde_json::Value {
        if !self.weaver_hosts.is_empty() {
            return self.weaver_diagnostics();
        }
        if self.agent_hosts.is_empty() {
            return serde_json::Value::Null;
        }
        let mut per_host = serde_json::Map::new();
        for &n in &self.agent_hosts.clone() {
            let status = self
                .tb
                .status_json(n)
                .unwrap_or_else(|e| serde_json::json!({ "error": format!("{e:#}") }));
            let rss = self
                .tb
                .agent_pid(n)
                .ok()
                .and_then(|pid| super::micro::rss_kib(pid).ok());
            per_host.insert(
                format!("host{n}"),
                serde_json::json!({ "status": status, "rss_kib": rss }),
            );
        }
        serde_json::Value::Object(per_host)
    }

    /// Per Weave host: its `/status/connections` and its RSS.
    fn weaver_diagnostics(&mut self) -> serde_json::Value {
        let mut per_host = serde_json::Map::new();
        for &n in &self.weaver_hosts.clone() {
            let connections = self
                .tb
                .weaver(n)
                .and_then(|w| w.status_text("/status/connections"))
                .unwrap_or_else(|e| format!("error: {e:#}"));
            let rss = self
                .tb
                .weaver_mut(n)
                .and_then(|w| w.pid())
                .ok()
                .and_then(|pid| super::micro::rss_kib(pid).ok());
            per_host.insert(
                format!("host{n}"),
                serde_json::json!({ "weaver_connections": connections, "weaver_rss_kib": rss }),
            );
        }
        serde_json::Value::Object(per_host)
    }

    /// Switches every host's underlay link to `profile` (and checks it took).
    pub fn apply_profile(&self, profile: Profile) -> Result<()> {
        for (port, end) in &self.underlay_links {
            profile.apply(port, *end)?;
        }
        Ok(())
    }

    /// Whether weft agents run in this mode.
    pub fn has_agents(&self) -> bool {
        !self.agent_hosts.is_empty()
    }

    /// weft's programs attached in this mode: (host label, program name, id), for
    /// each agent host's VXLAN device (`weft-vxlan`).
    pub fn weft_programs(&self) -> Result<Vec<(String, String, u32)>> {
        let mut out = Vec::new();
        for &n in &self.agent_hosts {
            let ns = &self.tb.host(n)?.ns;
            for dev in ["weft-vxlan"] {
                for p in tcx_programs(ns, dev)? {
                    if p.name.starts_with("weft_") {
                        out.push((format!("host{n}"), p.name, p.id));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Stops the agents and removes the testbed (which kills the Weave routers),
    /// reporting what could not be undone.
    pub fn teardown(self) -> Result<()> {
        let mut tb = self.tb;
        let mut errors = Vec::new();
        for n in self.agent_hosts {
            if let Err(e) = tb.stop_agent(n) {
                errors.push(format!("{e:#}"));
            }
        }
        if let Err(e) = tb.teardown() {
            errors.push(format!("{e:#}"));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("{}", errors.join("; "))
        }
    }
}

/// Host to host over the underlay: no overlay, the machine's limit.
struct Raw;

impl Mode for Raw {
    fn name(&self) -> &'static str {
        "raw"
    }
    fn about(&self) -> &'static str {
        "host to host over the veth underlay (MTU 1500), no overlay"
    }
    fn setup(&self, _ctx: &Ctx) -> Result<Running> {
        let mut tb = Testbed::with_tag(TAG)?;
        tb.add_host(0)?;
        tb.add_host(0)?;
        let (client, server) = (tb.host(1)?.into(), tb.host(2)?.into());
        running(tb, client, server, Vec::new())
    }
}

/// Pod to pod through the Linux bridge and one kernel VXLAN device per host.
struct KernelVxlan;

impl Mode for KernelVxlan {
    fn name(&self) -> &'static str {
        "kernel-vxlan"
    }
    fn about(&self) -> &'static str {
        "pod to pod: bridge + one kernel vxlan device per host, UDP 6784, fixed VNI"
    }
    fn setup(&self, _ctx: &Ctx) -> Result<Running> {
        let mut tb = Testbed::with_tag(TAG)?;
        tb.add_host(1)?;
        tb.add_host(1)?;
        add_flat_kernel_vxlan(&tb, 1, &[2], KERNEL_VXLAN_VNI)?;
        add_flat_kernel_vxlan(&tb, 2, &[1], KERNEL_VXLAN_VNI)?;
        pods_running(tb, Vec::new())
    }
}

/// Pod to pod with a weft agent on both hosts, started with `agent_args`.
pub struct WeftMode {
    /// The mode's name.
    pub name: &'static str,
    /// One line on what it is.
    pub about: &'static str,
    /// Options given to `weft run` on top of the testbed's.
    pub agent_args: &'static [&'static str],
    /// A check of what the mode needs from the kernel: `Err(reason)` skips it.
    pub requires: Option<fn() -> Result<(), String>>,
}

impl Mode for WeftMode {
    fn name(&self) -> &'static str {
        self.name
    }
    fn about(&self) -> &'static str {
        self.about
    }
    fn unavailable(&self) -> Option<String> {
        self.requires.and_then(|check| check().err())
    }
    fn setup(&self, ctx: &Ctx) -> Result<Running> {
        let mut tb = Testbed::with_tag(TAG)?;
        tb.add_host(1)?;
        tb.add_host(1)?;
        for n in [1, 2] {
            tb.start_agent(n, ctx.agent, self.agent_args)?;
        }
        pods_running(tb, vec![1, 2])
    }
}

/// Pod to pod through two wefts in mesh mode whose connection uses the sleeve
/// (`--no-fastdp`, or a password: the fast datapath is not offered then), the same
/// testbed shape and test as [`WeaveMode`], so the table sets them side by side.
pub struct WeftSleeveMode {
    /// The mode's name.
    pub name: &'static str,
    /// One line on what it is.
    pub about: &'static str,
    /// The mesh password, if the mode encrypts.
    pub password: Option<&'static str>,
}

impl Mode for WeftSleeveMode {
    fn name(&self) -> &'static str {
        self.name
    }
    fn about(&self) -> &'static str {
        self.about
    }
    fn tests(&self) -> &'static [Test] {
        &[Test::Tcp1]
    }
    fn setup(&self, ctx: &Ctx) -> Result<Running> {
        let mut tb = Testbed::with_tag(TAG)?;
        tb.add_host(1)?;
        tb.add_host(1)?;
        let mut extra = vec!["--no-fastdp".to_owned()];
        if let Some(pw) = self.password {
            let file = tb.dir().join("bench.password");
            std::fs::write(&file, pw)?;
            extra.push("--password-file".to_owned());
            extra.push(file.display().to_string());
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        tb.start_mesh_agent(1, ctx.agent, &[], &extra)?;
        tb.start_mesh_agent(2, ctx.agent, &[1], &extra)?;
        let mut r = pods_running(tb, vec![1, 2])?;
        r.tests = self.tests();
        r.ebpf_carries = false;
        Ok(r)
    }
}

/// Pod to pod through two real Weave Net routers (`weaver`, from [`WEAVER_ENV`]), sleeve
/// only (this kernel has no openvswitch for Weave's fast path), with or without a
/// password. Runs the 1-stream TCP test only.
pub struct WeaveMode {
    /// The mode's name.
    pub name: &'static str,
    /// One line on what it is.
    pub about: &'static str,
    /// The mesh password, if the mode encrypts.
    pub password: Option<&'static str>,
}

impl Mode for WeaveMode {
    fn name(&self) -> &'static str {
        self.name
    }
    fn about(&self) -> &'static str {
        self.about
    }
    fn unavailable(&self) -> Option<String> {
        match weaver_path() {
            None => Some(format!("{WEAVER_ENV} unset")),
            Some(p) if !p.is_file() => Some(format!("{WEAVER_ENV}={} is not a file", p.display())),
            Some(_) => None,
        }
    }
    fn tests(&self) -> &'static [Test] {
        &[Test::Tcp1]
    }
    fn setup(&self, _ctx: &Ctx) -> Result<Running> {
        let Some(bin) = weaver_path() else {
            bail!("{WEAVER_ENV} unset");
        };
        let mut tb = Testbed::with_tag(TAG)?;
        tb.add_host(1)?;
        tb.add_host(1)?;
        start_weaver_pair(&mut tb, &bin, (1, 2), self.password, WEAVER_ESTABLISH)?;
        let mut r = pods_running(tb, Vec::new())?;
        r.weaver_hosts = vec![1, 2];
        r.tests = self.tests();
        Ok(r)
    }
}

/// The ends are pod 1 of host 1 (client) and pod 1 of host 2 (server).
fn pods_running(tb: Testbed, agent_hosts: Vec<u8>) -> Result<Running> {
    let (client, server) = (tb.pod(1, 1)?.into(), tb.pod(2, 1)?.into());
    running(tb, client, server, agent_hosts)
}

/// A mode whose client runs on host 1 and server on host 2, once they reach each
/// other.
fn running(
    tb: Testbed,
    client: Endpoint,
    server: Endpoint,
    agent_hosts: Vec<u8>,
) -> Result<Running> {
    let switch_port = |n| Port {
        ns: tb.underlay_ns(),
        dev: Testbed::underlay_port(n),
    };
    let mut underlay_links = Vec::new();
    for h in tb.hosts() {
        let eth0 = Port {
            ns: h.ns.clone(),
            dev: UNDERLAY_DEV.into(),
        };
        underlay_links.push((eth0, End::Host));
        underlay_links.push((switch_port(h.n), End::Switch));
    }
    let r = Running {
        wire: switch_port(1),
        underlay_links,
        tb,
        client,
        server,
        agent_hosts,
        weaver_hosts: Vec::new(),
        tests: &Test::ALL,
        ebpf_carries: true,
    };
    wait_reachable(&r.client, &r.server)?;
    Ok(r)
}

/// Pings `to` from `from` until a reply comes, for at most [`REACH_TIMEOUT`].
fn wait_reachable(from: &Endpoint, to: &Endpoint) -> Result<()> {
    let start = Instant::now();
    let to_s = to.addr.to_string();
    let mut last = String::new();
    while start.elapsed() < REACH_TIMEOUT {
        if interrupted() {
            bail!("interrupted");
        }
        let out = output(
            ns_command(&from.ns, "ping").args(["-n", "-c", "1", "-W", "1", &to_s]),
            Duration::from_secs(5),
        )?;
        if out.status.success() {
            return Ok(());
        }
        last = String::from_utf8_lossy(&out.stdout).trim().to_string();
        std::thread::sleep(Duration::from_millis(200));
    }
    bail!(
        "{} ({}) got no ping reply from {} ({to_s}) within {REACH_TIMEOUT:?}; last attempt: {last}",
        from.ns,
        from.addr,
        to.ns
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_are_unique_and_references_come_first() {
        let names: Vec<&str> = registry().iter().map(|m| m.name()).collect();
        assert_eq!(&names[..2], &["raw", "kernel-vxlan"]);
        for (i, n) in names.iter().enumerate() {
            assert!(!names[i + 1..].contains(n), "{n} registered twice");
        }
    }

    #[test]
    fn select_keeps_order_and_rejects_unknown_or_repeated() {
        let (m, skipped) = select(&["weft-fastdp".into(), "raw".into()]).unwrap();
        let names: Vec<&str> = m.iter().map(|m| m.name()).collect();
        assert_eq!(names, ["weft-fastdp", "raw"]);
        assert!(skipped.is_empty());
        let e = select(&["nope".into()]).err().unwrap();
        assert!(format!("{e}").contains("known modes: raw"), "{e}");
        assert!(select(&["raw".into(), "raw".into()]).is_err());
    }

    #[test]
    fn weave_modes_run_one_tcp_stream_and_need_the_router() {
        let all = registry();
        for name in ["weave-sleeve", "weave-sleeve-encrypted"] {
            let m = all.iter().find(|m| m.name() == name).unwrap();
            assert_eq!(m.tests(), [Test::Tcp1]);
            if weaver_path().is_none() {
                assert_eq!(m.unavailable().as_deref(), Some("WEFT_WEAVER unset"));
            }
        }
    }

    #[test]
    fn a_mode_missing_a_kernel_feature_is_skipped_with_its_reason() {
        let m = WeftMode {
            name: "x",
            about: "",
            agent_args: &[],
            requires: Some(|| Err("no esp4".into())),
        };
        assert_eq!(m.unavailable().as_deref(), Some("no esp4"));
    }
}
