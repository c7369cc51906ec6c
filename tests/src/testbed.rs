//! The testbed: an underlay switch, hosts and pods, each in its own network namespace.
//!
//! ```text
//!  <prefix>-ul            <prefix>-h1                          <prefix>-h1p1
//!  +--------+  veth   +--------------------------+  veth   +----------------+
//!  |  br0   |---------| eth0 192.168.48.11/24    |         | eth0           |
//!  |        |  h1     |                          |         | 10.32.1.1/12   |
//!  |        |         | weave (bridge) ----------|---------|                |
//!  |        |         |  vethwepl1, vethwepl2... | vethwepl1 +--------------+
//!  |        |---------| (h2 ...)                 |
//!  +--------+         +--------------------------+
//! ```
//!
//! Host N (1-based) is namespace `<prefix>-h<N>` with `eth0` at 192.168.48.(10+N)/24
//! (MTU 1500), bridge `weave` (MTU 1376) and pods. Pod M of host N is namespace
//! `<prefix>-h<N>p<M>` with `eth0` at 10.32.N.M/12 (MTU 1376), whose host-side veth
//! `vethwepl<M>` is a port of `weave`. All pods share one flat 10.32.0.0/12 segment, as
//! with Weave Net. Peer identity of host N: PeerName `aa:00:00:00:00:<N in hex>`,
//! nickname `host<N>`, ShortID N.
//!
//! The prefix is `<tag><pid>-<counter>`, unique per testbed and per process, so
//! parallel runs never collide and [`cleanup_stale`] can tell leftovers of dead
//! processes from live testbeds. Veth pairs are created with both ends directly in
//! their namespaces (`ip link add A netns X type veth peer name B netns Y`), so no
//! interface name ever exists in the caller's namespace.
//!
//! Everything is removed on `Drop` (agents stopped, Weave routers killed, namespaces
//! deleted, which deletes their interfaces) or by [`Testbed::teardown`], which also
//! reports what failed.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicU32, Ordering},
    },
};

use anyhow::{Context, Result, anyhow, bail, ensure};

use crate::{
    agent::AgentProc,
    cmd::{run_args, run_in},
};

/// Tag that starts every namespace name made by [`Testbed::new`].
pub const DEFAULT_TAG: &str = "wt";
/// Overlay MTU the testbed gives bridges and pods (weft's and Weave's default).
pub const OVERLAY_MTU: u16 = 1376;
/// Underlay MTU of the hosts' `eth0`.
pub const UNDERLAY_MTU: u16 = 1500;
/// Weave Net's fast-datapath VXLAN port.
pub const VXLAN_PORT: u16 = 6784;
/// Name of the overlay bridge on every host.
pub const BRIDGE: &str = "weave";
/// Largest host number (192.168.48.(10+N) must stay a host address).
pub const MAX_HOSTS: u8 = 200;

static COUNTER: AtomicU32 = AtomicU32::new(0);
static SERIAL: Mutex<()> = Mutex::new(());

/// Serialises testbeds within one process: integration tests of one binary run on
/// threads, and agents and captures are timing-sensitive on a small machine. Hold the
/// guard for the test's duration. A poisoned lock (an earlier test panicked) is fine.
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A simulated host (network namespace `ns`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// Host number N, 1-based; also its ShortID.
    pub n: u8,
    /// Its network namespace.
    pub ns: String,
    /// Its underlay address, 192.168.48.(10+N).
    pub addr: Ipv4Addr,
    /// Its pods, in creation order (pod M at index M-1).
    pub pods: Vec<Pod>,
    /// Remote hosts it reaches through kernel VXLAN devices (empty for weft hosts).
    pub kernel_vxlan_peers: Vec<u8>,
}

impl Host {
    pub(crate) fn new(prefix: &str, n: u8) -> Self {
        Host {
            n,
            ns: format!("{prefix}-h{n}"),
            addr: Ipv4Addr::new(192, 168, 48, 10 + n),
            pods: Vec::new(),
            kernel_vxlan_peers: Vec::new(),
        }
    }

    /// Its PeerName, `aa:00:00:00:00:<N>`.
    pub fn peer_name(&self) -> String {
        format!("aa:00:00:00:00:{:02x}", self.n)
    }

    /// Its nickname, `host<N>`.
    pub fn nickname(&self) -> String {
        format!("host{}", self.n)
    }

    /// Its ShortID, N.
    pub fn short_id(&self) -> u16 {
        u16::from(self.n)
    }

    /// Whether it is a kernel-VXLAN host (see [`Testbed::make_kernel_vxlan_host`]).
    pub fn is_kernel_vxlan(&self) -> bool {
        !self.kernel_vxlan_peers.is_empty()
    }
}

/// A simulated pod (network namespace `ns`, interface `eth0`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// Number of the host it lives on.
    pub host: u8,
    /// Its index M on that host, 1-based.
    pub index: u8,
    /// Its network namespace.
    pub ns: String,
    /// Its address, 10.32.N.M (prefix length 12).
    pub addr: Ipv4Addr,
}

impl Pod {
    /// A short label, `h<N>p<M>`, for messages.
    pub fn label(&self) -> String {
        format!("h{}p{}", self.host, self.index)
    }
}

/// A set of hosts on one underlay switch. See the module documentation for the layout.
#[derive(Debug)]
pub struct Testbed {
    prefix: String,
    dir: PathBuf,
    hosts: Vec<Host>,
    pub(crate) agents: BTreeMap<u8, AgentProc>,
    /// Weave routers started by [`Testbed::start_weaver`], by host.
    pub(crate) weavers: BTreeMap<u8, crate::weaver::Weaver>,
    /// Directory on bpffs the agents pin their datapaths under (`--bpffs`).
    bpffs: PathBuf,
    /// Namespaces created, in creation order (torn down in reverse).
    namespaces: Vec<String>,
    torn_down: bool,
}

impl Testbed {
    /// Creates an empty testbed (just the underlay switch) with tag [`DEFAULT_TAG`],
    /// after removing leftovers of dead earlier runs ([`cleanup_stale`]).
    pub fn new() -> Result<Self> {
        Self::with_tag(DEFAULT_TAG)
    }

    /// As [`Testbed::new`] with another namespace tag (letters only), so that tools
    /// (the benchmark, say) keep their namespaces apart from the tests'.
    pub fn with_tag(tag: &str) -> Result<Self> {
        ensure!(
            !tag.is_empty() && tag.chars().all(|c| c.is_ascii_lowercase()),
            "testbed tag {tag:?} must be lowercase letters"
        );
        ensure!(
            is_root(),
            "the testbed needs root (network namespaces, veth, bridges)"
        );
        for msg in cleanup_stale(tag)? {
            eprintln!("testbed: removed stale {msg}");
        }
        let prefix = format!(
            "{tag}{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(format!("weft-testbed-{prefix}"));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let bpffs = Path::new(BPFFS).join(format!("weft-testbed-{prefix}"));
        let mut tb = Testbed {
            prefix,
            dir,
            bpffs,
            hosts: Vec::new(),
            agents: BTreeMap::new(),
            weavers: BTreeMap::new(),
            namespaces: Vec::new(),
            torn_down: false,
        };
        let ul = tb.underlay_ns();
        tb.add_namespace(&ul)?;
        run_in(&ul, "ip", &["link", "add", "br0", "type", "bridge"])?;
        run_in(&ul, "ip", &["link", "set", "br0", "up"])?;
        Ok(tb)
    }

    /// A testbed with `hosts` hosts of `pods_per_host` pods each.
    pub fn with_hosts(hosts: u8, pods_per_host: u8) -> Result<Self> {
        let mut tb = Self::new()?;
        for _ in 0..hosts {
            tb.add_host(pods_per_host)?;
        }
        Ok(tb)
    }

    /// This testbed's name prefix, `<tag><pid>-<counter>`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Directory holding agents' logs, sockets, peers files and captures.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Directory on bpffs under which this testbed's agents pin their datapaths
    /// (each in a subdirectory of its own network namespace): removed at teardown,
    /// so a torn-down testbed leaves no maps behind.
    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs
    }

    /// The underlay switch's namespace, `<prefix>-ul`.
    pub fn underlay_ns(&self) -> String {
        format!("{}-ul", self.prefix)
    }

    /// The underlay switch's port towards host `n` (in [`Testbed::underlay_ns`]): it
    /// receives what host `n` sends on the wire.
    pub fn underlay_port(n: u8) -> String {
        format!("h{n}")
    }

    /// All hosts, host N at index N-1.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Host `n`.
    pub fn host(&self, n: u8) -> Result<&Host> {
        self.hosts
            .get(usize::from(n).wrapping_sub(1))
            .ok_or_else(|| {
                anyhow!(
                    "no host {n} in testbed {} ({} hosts)",
                    self.prefix,
                    self.hosts.len()
                )
            })
    }

    /// Pod `m` of host `n`.
    pub fn pod(&self, n: u8, m: u8) -> Result<&Pod> {
        let h = self.host(n)?;
        h.pods
            .get(usize::from(m).wrapping_sub(1))
            .ok_or_else(|| anyhow!("no pod {m} on host {n} ({} pods)", h.pods.len()))
    }

    /// Every pod of every host.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.hosts.iter().flat_map(|h| h.pods.iter())
    }

    /// Adds the next host (N = number of hosts + 1) with `pods` pods: namespace,
    /// `eth0` on the underlay switch, bridge `weave`, pods. Returns N.
    pub fn add_host(&mut self, pods: u8) -> Result<u8> {
        let n = u8::try_from(self.hosts.len() + 1)
            .ok()
            .filter(|n| *n <= MAX_HOSTS)
            .ok_or_else(|| anyhow!("at most {MAX_HOSTS} hosts"))?;
        let host = Host::new(&self.prefix, n);
        let ns = host.ns.clone();
        let ul = self.underlay_ns();
        self.add_namespace(&ns)?;
        let ul_port = Self::underlay_port(n);
        run_args(
            "ip",
            &[
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &ul_port,
                "netns", &ul,
            ],
        )?;
        run_in(&ul, "ip", &["link", "set", &ul_port, "master", "br0", "up"])?;
        let cidr = format!("{}/24", host.addr);
        let mtu = UNDERLAY_MTU.to_string();
        run_in(&ns, "ip", &["addr", "add", &cidr, "dev", "eth0"])?;
        run_in(&ns, "ip", &["link", "set", "eth0", "mtu", &mtu, "up"])?;
        self.hosts.push(host);
        self.ensure_bridge(n)?;
        for _ in 0..pods {
            self.add_pod(n)?;
        }
        Ok(n)
    }

    /// Gives host `n` an IPv4 default route via 192.168.48.1 on `eth0` (an address
    /// nobody holds: enough for route lookups, never for traffic).
    pub fn add_default_route(&self, n: u8) -> Result<()> {
        let ns = &self.host(n)?.ns;
        let args = [
            "route",
            "add",
            "default",
            "via",
            "192.168.48.1",
            "dev",
            "eth0",
        ];
        run_in(ns, "ip", &args).map(drop)
    }

    /// Creates bridge `weave` on host `n` if absent (MTU [`OVERLAY_MTU`], up).
    pub fn ensure_bridge(&mut self, n: u8) -> Result<()> {
        let ns = self.host(n)?.ns.clone();
        let exists = crate::cmd::output(
            crate::cmd::ns_command(&ns, "ip").args(["link", "show", BRIDGE]),
            crate::cmd::DEFAULT_TIMEOUT,
        )?
        .status
        .success();
        if !exists {
            run_in(&ns, "ip", &["link", "add", BRIDGE, "type", "bridge"])?;
        }
        let mtu = OVERLAY_MTU.to_string();
        run_in(&ns, "ip", &["link", "set", BRIDGE, "mtu", &mtu, "up"])?;
        Ok(())
    }

    /// Adds the next pod (M = number of pods + 1) to host `n`: namespace, `eth0` with
    /// 10.32.N.M/12, host side `vethwepl<M>` in bridge `weave`.
    pub fn add_pod(&mut self, n: u8) -> Result<Pod> {
        let host = self.host(n)?;
        let m = u8::try_from(host.pods.len() + 1)
            .ok()
            .filter(|m| *m < 255)
            .ok_or_else(|| anyhow!("at most 254 pods per host"))?;
        let host_ns = host.ns.clone();
        let pod = Pod {
            host: n,
            index: m,
            ns: format!("{}p{m}", host.ns),
            addr: Ipv4Addr::new(10, 32, n, m),
        };
        self.add_namespace(&pod.ns)?;
        let port = format!("vethwepl{m}");
        run_args(
            "ip",
            &[
                "link", "add", "eth0", "netns", &pod.ns, "type", "veth", "peer", "name", &port,
                "netns", &host_ns,
            ],
        )?;
        let mtu = OVERLAY_MTU.to_string();
        run_in(
            &host_ns,
            "ip",
            &["link", "set", &port, "mtu", &mtu, "master", BRIDGE, "up"],
        )?;
        let cidr = format!("{}/12", pod.addr);
        run_in(&pod.ns, "ip", &["addr", "add", &cidr, "dev", "eth0"])?;
        run_in(&pod.ns, "ip", &["link", "set", "eth0", "mtu", &mtu, "up"])?;
        self.hosts[usize::from(n) - 1].pods.push(pod.clone());
        Ok(pod)
    }

    /// Turns host `n` into a *kernel-VXLAN host*: its pods reach each host in `peers`
    /// through the Linux kernel's own VXLAN devices laid out as Weave's fast datapath
    /// (see [`Testbed::add_kernel_vxlan_peer`]). Such a host runs no agent; it is the
    /// interop partner of weft hosts and the benchmark's kernel baseline.
    pub fn make_kernel_vxlan_host(&mut self, n: u8, peers: &[u8]) -> Result<()> {
        for &p in peers {
            self.add_kernel_vxlan_peer(n, p)?;
        }
        Ok(())
    }

    /// Makes host `n` reach host `peer` by kernel VXLAN, Weave's fast-datapath way.
    ///
    /// Weave's VNI names both ends: VNI = (destination ShortID << 12) | source ShortID,
    /// on UDP 6784. A Linux VXLAN device receives on ONE VNI but may send with another
    /// per FDB entry, so per remote peer P this host S gets its own device `vxlan-<P>`:
    ///
    /// - `ip link add vxlan-P type vxlan id ((S<<12)|P) dstport 6784 local <S addr>
    ///   nolearning ttl 64 df set noudpcsum`: receives exactly what P sends to S;
    /// - `bridge fdb append 00:00:00:00:00:00 dev vxlan-P dst <P addr> vni ((P<<12)|S)
    ///   self permanent`: everything the bridge sends out this port goes to P with the
    ///   VNI P expects from S;
    /// - the device is a port of `weave` (MTU 1376) with `isolated on`: the bridge
    ///   never forwards a frame from one peer's port to another peer's port. That is
    ///   Weave's split horizon (a peer never re-floods what it received from a peer),
    ///   so a mesh mixing kernel hosts and weft hosts has no broadcast loops and no
    ///   duplicate floods that would teach weft a MAC behind the wrong peer.
    ///
    /// All devices of a host share the one UDP socket on port 6784 (same local address
    /// and flags), and the kernel dispatches received frames by VNI.
    pub fn add_kernel_vxlan_peer(&mut self, n: u8, peer: u8) -> Result<()> {
        ensure!(n != peer, "host {n} cannot be its own kernel-VXLAN peer");
        ensure!(
            !self.agents.get(&n).is_some_and(AgentProc::is_running),
            "host {n} runs an agent; a kernel-VXLAN host must not"
        );
        let (me, ns) = {
            let h = self.host(n)?;
            (h.clone(), h.ns.clone())
        };
        let other = self.host(peer)?.clone();
        ensure!(
            !me.kernel_vxlan_peers.contains(&peer),
            "host {n} already reaches host {peer} by kernel VXLAN"
        );
        let dev = format!("vxlan-{peer}");
        let rx_vni = (u32::from(me.short_id()) << 12 | u32::from(other.short_id())).to_string();
        let tx_vni = (u32::from(other.short_id()) << 12 | u32::from(me.short_id())).to_string();
        let local = me.addr.to_string();
        add_bridged_vxlan(&ns, &dev, &rx_vni, &local, false)?;
        run_in(
            &ns,
            "bridge",
            &["link", "set", "dev", &dev, "isolated", "on"],
        )?;
        run_in(
            &ns,
            "bridge",
            &[
                "fdb",
                "append",
                "00:00:00:00:00:00",
                "dev",
                &dev,
                "dst",
                &other.addr.to_string(),
                "vni",
                &tx_vni,
                "self",
                "permanent",
            ],
        )?;
        self.hosts[usize::from(n) - 1].kernel_vxlan_peers.push(peer);
        Ok(())
    }

    /// Creates namespace `name` (recorded for teardown), with loopback up and IPv6 off
    /// (no router solicitations or MLD reports in captures).
    pub(crate) fn add_namespace(&mut self, name: &str) -> Result<()> {
        run_args("ip", &["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        run_in(
            name,
            "sysctl",
            &[
                "-q",
                "-w",
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ],
        )?;
        run_in(name, "ip", &["link", "set", "lo", "up"])?;
        Ok(())
    }

    /// Tears everything down now (agents stopped, namespaces and files removed) and
    /// reports what could not be undone. `Drop` does the same, ignoring errors.
    pub fn teardown(mut self) -> Result<()> {
        let errors = self.teardown_inner();
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("teardown of testbed {}: {}", self.prefix, errors.join("; "))
        }
    }

    fn teardown_inner(&mut self) -> Vec<String> {
        if self.torn_down {
            return Vec::new();
        }
        self.torn_down = true;
        let mut errors = Vec::new();
        let panicking = std::thread::panicking();
        let hosts: Vec<u8> = self.agents.keys().copied().collect();
        for n in hosts {
            if panicking {
                eprintln!(
                    "---- testbed {}: agent log of host {n} (tail) ----",
                    self.prefix
                );
                eprintln!("{}", crate::cmd::tail(&self.agent_log(n), 4000));
            }
            if let Some(mut a) = self.agents.remove(&n)
                && a.is_running()
                && let Err(e) = a.terminate()
            {
                errors.push(format!("agent on host {n}: {e:#}"));
            }
        }
        // weaver cleans nothing up on exit; its bridge, veths and iptables rules go
        // with the namespaces below.
        self.kill_weavers(panicking);
        for ns in self.namespaces.drain(..).rev() {
            if let Err(e) = delete_namespace(&ns) {
                errors.push(format!("{e:#}"));
            }
        }
        // The namespaces' devices are gone, so their pinned links are defunct; the
        // pins themselves (and the maps) go with the directory.
        if let Err(e) = remove_pins(&self.bpffs) {
            errors.push(e);
        }
        if panicking {
            eprintln!(
                "testbed {}: files kept in {}",
                self.prefix,
                self.dir.display()
            );
        } else if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            errors.push(format!("cannot remove {}: {e}", self.dir.display()));
        }
        errors
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for e in self.teardown_inner() {
            eprintln!("testbed {}: teardown: {e}", self.prefix);
        }
    }
}

/// Where bpffs is mounted (`cargo xtask setup` mounts it).
const BPFFS: &str = "/sys/fs/bpf";

/// Removes a directory of pins (absent is fine).
fn remove_pins(dir: &Path) -> std::result::Result<(), String> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(format!("cannot remove {}: {e}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// Kills every process still inside namespace `ns`, then deletes it. Not cut short by
/// an interrupt.
fn delete_namespace(ns: &str) -> Result<()> {
    let pids = crate::cmd::output_uninterruptible(
        std::process::Command::new("ip").args(["netns", "pids", ns]),
        crate::cmd::DEFAULT_TIMEOUT,
    )?;
    for pid in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
        if let Ok(pid) = pid.parse::<u32>() {
            let _ = crate::cmd::signal_pid(pid, libc::SIGKILL);
        }
    }
    crate::cmd::run_uninterruptible(std::process::Command::new("ip").args(["netns", "delete", ns]))
        .map(drop)
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Whether the kernel can do what weft's encrypted fast datapath needs: transport-mode
/// ESP with `rfc4106(gcm(aes))`. Checked by installing such an SA in a throwaway
/// network namespace (`unshare -n ip xfrm state add ...`), so nothing of the host's
/// changes. Needs root.
pub fn kernel_has_esp() -> bool {
    let key = format!("0x{}", "11".repeat(36));
    // iproute2's `ip` by path: a busybox `unshare` would run its own `ip` applet,
    // which has no xfrm.
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("ip");
    std::process::Command::new("unshare")
        .args([
            "-n",
            ip,
            "xfrm",
            "state",
            "add",
            "src",
            "192.0.2.1",
            "dst",
            "192.0.2.2",
            "proto",
            "esp",
            "spi",
            "0x100",
            "mode",
            "transport",
            "aead",
            "rfc4106(gcm(aes))",
            &key,
            "128",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether the kernel has openvswitch, which a weaver's own fast datapath needs
/// (loads the module where it is one).
pub fn kernel_has_openvswitch() -> bool {
    let _ = std::process::Command::new("modprobe")
        .arg("openvswitch")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    Path::new("/sys/module/openvswitch").exists()
}

/// The pid encoded in a testbed name `<tag><pid>-<counter>...`, if `name` is one.
pub fn creator_pid(tag: &str, name: &str) -> Option<u32> {
    let rest = name.strip_prefix(tag)?;
    let (pid, rest) = rest.split_once('-')?;
    let counter_end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) || counter_end == 0 {
        return None;
    }
    if !(rest[counter_end..].is_empty() || rest[counter_end..].starts_with('-')) {
        return None;
    }
    pid.parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    let Ok(p) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(p, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Removes leftovers of earlier runs that died without tearing down: namespaces named
/// `<tag><pid>-<counter>-...` (and their temporary directories) whose creating process
/// `pid` no longer exists. Processes still inside such a namespace (an orphaned agent)
/// are killed first. Live testbeds, of this or another process, are left alone.
/// Returns a description of each thing removed.
pub fn cleanup_stale(tag: &str) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut errors = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        // Pods before hosts before the underlay: reverse order of creation.
        names.sort_by(|a, b| b.len().cmp(&a.len()).then(b.cmp(a)));
        for name in names {
            let Some(pid) = creator_pid(tag, &name) else {
                continue;
            };
            if pid_alive(pid) {
                continue;
            }
            match delete_namespace(&name) {
                Ok(()) => removed.push(format!("namespace {name}")),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(BPFFS) {
        for e in entries.flatten() {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            let Some(pid) = name
                .strip_prefix("weft-testbed-")
                .and_then(|rest| creator_pid(tag, rest))
            else {
                continue;
            };
            if !pid_alive(pid) {
                match remove_pins(&e.path()) {
                    Ok(()) => removed.push(format!("pins {}", e.path().display())),
                    Err(err) => errors.push(err),
                }
            }
        }
    }
    let tmp = std::env::temp_dir();
    if let Ok(entries) = std::fs::read_dir(&tmp) {
        for e in entries.flatten() {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            let Some(rest) = name.strip_prefix("weft-testbed-") else {
                continue;
            };
            let Some(pid) = creator_pid(tag, rest) else {
                continue;
            };
            if !pid_alive(pid) {
                match std::fs::remove_dir_all(e.path()) {
                    Ok(()) => removed.push(format!("directory {}", e.path().display())),
                    Err(err) => errors.push(format!("cannot remove {}: {err}", e.path().display())),
                }
            }
        }
    }
    if errors.is_empty() {
        Ok(removed)
    } else {
        bail!("cleaning up stale testbeds: {}", errors.join("; "))
    }
}

/// Creates a kernel VXLAN device `dev` in namespace `ns` with Weave's fast-datapath
/// settings (UDP 6784, TTL 64, DF, no UDP checksum), receive VNI `vni` and local
/// address `local`, with or without FDB learning, and enslaves it to `weave` at the
/// overlay MTU. Remote destinations are FDB entries the caller adds.
pub(crate) fn add_bridged_vxlan(
    ns: &str,
    dev: &str,
    vni: &str,
    local: &str,
    learning: bool,
) -> Result<()> {
    let port = VXLAN_PORT.to_string();
    let learn = if learning { "learning" } else { "nolearning" };
    let add = [
        "link",
        "add",
        dev,
        "type",
        "vxlan",
        "id",
        vni,
        "dstport",
        &port,
        "local",
        local,
        learn,
        "ttl",
        "64",
        "df",
        "set",
        "noudpcsum",
    ];
    run_in(ns, "ip", &add)?;
    let mtu = OVERLAY_MTU.to_string();
    run_in(
        ns,
        "ip",
        &["link", "set", dev, "mtu", &mtu, "master", BRIDGE, "up"],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_identity() {
        let h = Host::new("wt12-3", 2);
        assert_eq!(h.ns, "wt12-3-h2");
        assert_eq!(h.addr, Ipv4Addr::new(192, 168, 48, 12));
        assert_eq!(h.peer_name(), "aa:00:00:00:00:02");
        assert_eq!(h.nickname(), "host2");
        assert_eq!(h.short_id(), 2);
    }

    #[test]
    fn creator_pid_parses_only_testbed_names() {
        assert_eq!(creator_pid("wt", "wt123-0-h1p2"), Some(123));
        assert_eq!(creator_pid("wt", "wt123-45-ul"), Some(123));
        assert_eq!(creator_pid("wt", "wt123-45"), Some(123));
        assert_eq!(creator_pid("wt", "wtx-1-h1"), None);
        assert_eq!(creator_pid("wt", "wt123-h1"), None);
        assert_eq!(creator_pid("wt", "wt123-4x"), None);
        assert_eq!(creator_pid("wt", "other"), None);
        assert_eq!(creator_pid("wb", "wt1-1-h1"), None);
    }

    #[test]
    fn own_process_is_alive() {
        assert!(pid_alive(std::process::id()));
    }
}
