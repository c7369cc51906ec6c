//! The CNI plugin (`weft-cni`): pods on the `weave` bridge, addresses from this
//! node's IPAM block.
//!
//! The `weft` binary is the plugin when it runs as `weft-cni` or with `CNI_COMMAND`
//! set and no arguments ([`is_plugin_invocation`]). It speaks CNI 1.0 (and the
//! 0.3.0-0.4.0 results): ADD, DEL, CHECK, VERSION, with errors as CNI error JSON on
//! stdout and exit status 1.
//!
//! ADD reads the bridge's address, which the agent put there ([`crate::agent::expose`]):
//! its block (of the configured range) is this node's. It takes the lowest free
//! address of the block ([`Store`]), creates a veth pair whose host end (named from a
//! hash of the container id and interface name, so DEL finds it without the netns)
//! joins the bridge and whose other end moves into the container's netns, and there
//! sets the address, the bridge's MTU and a default route via the bridge's address.
//! Whatever fails part-way is undone. DEL releases the container's addresses and
//! removes the host end (which takes the other end along), whatever state ADD left.
//!
//! `weft install-cni` ([`install`]) copies the binary and writes the configuration.

use std::{
    fs::File,
    future::Future,
    io::{Read, Write},
    net::Ipv4Addr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::ExitCode,
};

use serde::Deserialize;
use serde_json::{Value, json};
use sha2::Digest;

use crate::{
    cli::InstallCniArgs,
    ipam::{Blocks, DEFAULT_RANGE, Ipv4Net, Owner, Store},
    netdev::{Link, Netdev},
};

/// The CNI versions this plugin speaks.
pub const SUPPORTED_VERSIONS: [&str; 4] = ["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
/// The name of the plugin binary (and its `type` in the configuration).
pub const PLUGIN_NAME: &str = "weft-cni";
/// Where allocations are kept by default: `<dataDir>/<network name>/<address>`.
pub const DEFAULT_DATA_DIR: &str = "/var/lib/weft/ipam";
/// The bridge pods attach to by default.
pub const DEFAULT_BRIDGE: &str = "weave";
/// The network name `install-cni` writes: Weave's, so that a node moved from Weave
/// keeps the name its runtime (and tooling keyed on it) knows.
pub const NETWORK_NAME: &str = "weave";
/// The configuration file `install-cni` writes.
pub const CONFLIST_NAME: &str = "10-weft.conflist";
/// Prefix of host-side veth names (then 8 hex digits).
pub const HOST_VETH_PREFIX: &str = "wft";

// CNI's well-known error codes.
/// Incompatible CNI version.
pub const E_VERSION: u32 = 1;
/// Container unknown or does not exist.
pub const E_CONTAINER: u32 = 3;
/// Invalid necessary environment variables.
pub const E_ENV: u32 = 4;
/// I/O failure.
pub const E_IO: u32 = 5;
/// Failed to decode content.
pub const E_DECODE: u32 = 6;
/// Invalid network config.
pub const E_CONFIG: u32 = 7;
/// Try again later.
pub const E_TRY_AGAIN: u32 = 11;
/// This node's block has no free address (plugin-specific code, >= 100).
pub const E_BLOCK_FULL: u32 = 100;

/// A CNI error: printed as CNI error JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// CNI error code.
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Details (the cause), possibly empty.
    pub details: String,
}

impl CniError {
    /// An error with a code and message.
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// With details (an underlying error, rendered with its causes).
    fn details(mut self, e: impl Into<anyhow::Error>) -> Self {
        self.details = format!("{:#}", e.into());
        self
    }

    /// The CNI error JSON.
    pub fn to_json(&self, version: &str) -> Value {
        let mut v = json!({"cniVersion": version, "code": self.code, "msg": self.msg});
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }
}

/// A CNI command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Attach a container.
    Add,
    /// Detach it.
    Del,
    /// Verify the attachment.
    Check,
    /// Report the supported versions.
    Version,
}

/// The CNI environment of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    /// `CNI_COMMAND`.
    pub command: Command,
    /// `CNI_CONTAINERID` (not for VERSION).
    pub container_id: String,
    /// `CNI_NETNS` (DEL may lack it: the netns may be gone).
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`.
    pub ifname: String,
}

/// Reads the CNI environment through `var`.
pub fn parse_env(var: impl Fn(&str) -> Option<String>) -> Result<Env, CniError> {
    let command = match var("CNI_COMMAND").as_deref() {
        Some("ADD") => Command::Add,
        Some("DEL") => Command::Del,
        Some("CHECK") => Command::Check,
        Some("VERSION") => Command::Version,
        Some(other) => {
            return Err(CniError::new(
                E_ENV,
                format!("CNI_COMMAND={other:?} is not supported (ADD, DEL, CHECK, VERSION)"),
            ));
        }
        None => return Err(CniError::new(E_ENV, "CNI_COMMAND is not set")),
    };
    let mut env = Env {
        command,
        container_id: String::new(),
        netns: None,
        ifname: String::new(),
    };
    if command == Command::Version {
        return Ok(env);
    }
    let required = |name: &str| {
        var(name)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| CniError::new(E_ENV, format!("{name} is not set")))
    };
    env.container_id = required("CNI_CONTAINERID")?;
    if !env
        .container_id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
    {
        return Err(CniError::new(
            E_ENV,
            format!(
                "CNI_CONTAINERID={:?} has characters other than letters, digits, '_', '.' and '-'",
                env.container_id
            ),
        ));
    }
    env.ifname = required("CNI_IFNAME")?;
    crate::cli::parse_ifname(&env.ifname)
        .map_err(|e| CniError::new(E_ENV, format!("CNI_IFNAME: {e}")))?;
    env.netns = match command {
        Command::Del => var("CNI_NETNS")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from),
        _ => Some(PathBuf::from(required("CNI_NETNS")?)),
    };
    Ok(env)
}

/// The network configuration on stdin (the keys weft reads; others are ignored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    /// `cniVersion`.
    pub cni_version: String,
    /// `name`: the network, also the allocations' directory.
    pub name: String,
    /// `bridge` (default `weave`).
    pub bridge: String,
    /// `dataDir` (default [`DEFAULT_DATA_DIR`]).
    pub data_dir: PathBuf,
    /// `ipallocRange`: the agents' `--ipalloc-range` (default 10.32.0.0/12).
    pub range: Ipv4Net,
    /// `prevResult` (CHECK and DEL).
    pub prev_result: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConf {
    cni_version: Option<String>,
    name: Option<String>,
    bridge: Option<String>,
    data_dir: Option<PathBuf>,
    ipalloc_range: Option<String>,
    prev_result: Option<Value>,
}

/// Parses and checks the network configuration.
pub fn parse_conf(bytes: &[u8]) -> Result<NetConf, CniError> {
    let raw: RawConf = serde_json::from_slice(bytes).map_err(|e| {
        CniError::new(
            E_DECODE,
            "the network configuration on stdin is not valid JSON",
        )
        .details(e)
    })?;
    let cni_version = raw
        .cni_version
        .ok_or_else(|| CniError::new(E_CONFIG, "the network configuration has no cniVersion"))?;
    if !SUPPORTED_VERSIONS.contains(&cni_version.as_str()) {
        return Err(CniError::new(
            E_VERSION,
            format!(
                "CNI version {cni_version:?} is not supported (supported: {})",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    let name = raw
        .name
        .ok_or_else(|| CniError::new(E_CONFIG, "the network configuration has no name"))?;
    // CNI's rule for network names; it also keeps the name a plain directory name.
    let valid_name = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if !valid_name {
        return Err(CniError::new(
            E_CONFIG,
            format!("network name {name:?} is not valid (letters, digits, '_', '.', '-')"),
        ));
    }
    let bridge = raw.bridge.unwrap_or_else(|| DEFAULT_BRIDGE.to_owned());
    crate::cli::parse_ifname(&bridge)
        .map_err(|e| CniError::new(E_CONFIG, format!("bridge: {e}")))?;
    let data_dir = raw
        .data_dir
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
    if !data_dir.is_absolute() {
        return Err(CniError::new(
            E_CONFIG,
            format!("dataDir {:?} is not an absolute path", data_dir.display()),
        ));
    }
    let range = raw.ipalloc_range.as_deref().unwrap_or(DEFAULT_RANGE);
    let range: Ipv4Net = range
        .parse()
        .map_err(|e| CniError::new(E_CONFIG, format!("ipallocRange: {e}")))?;
    Blocks::new(range, None).map_err(|e| CniError::new(E_CONFIG, format!("ipallocRange: {e}")))?;
    Ok(NetConf {
        cni_version,
        name,
        bridge,
        data_dir,
        range,
        prev_result: raw.prev_result,
    })
}

/// The host end's name for a container's interface: [`HOST_VETH_PREFIX`] and 12 hex
/// digits (48 bits) of SHA-256(container id, interface name), as Cilium names its
/// `lxc` ends: two live pods of one node share a name with odds below 1e-10 for
/// 255 pods (ADD replaces, and DEL removes, the end of that name).
pub fn host_veth_name(container_id: &str, ifname: &str) -> String {
    format!("{HOST_VETH_PREFIX}{}", short_hash(container_id, ifname, 6))
}

/// The other end's name while it is still in the host's netns.
fn temp_peer_name(container_id: &str, ifname: &str) -> String {
    format!("wftp{}", short_hash(container_id, ifname, 5))
}

/// The first `bytes` bytes of SHA-256(container id, 0, interface name), in hex.
fn short_hash(container_id: &str, ifname: &str, bytes: usize) -> String {
    let mut h = sha2::Sha256::new();
    h.update(container_id.as_bytes());
    h.update([0]);
    h.update(ifname.as_bytes());
    h.finalize()[..bytes]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What ADD made, for the result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    /// Host end: name and MAC.
    pub host: (String, [u8; 6]),
    /// Container end: name, MAC and the netns path.
    pub container: (String, [u8; 6], String),
    /// The address and the subnet's prefix.
    pub address: (Ipv4Addr, u8),
    /// The gateway (the bridge's address).
    pub gateway: Ipv4Addr,
    /// MTU of both ends.
    pub mtu: u32,
}

fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The ADD result in the format of `version`.
pub fn add_result(version: &str, a: &Attachment) -> Value {
    let (addr, prefix) = a.address;
    let mut ip = json!({
        "address": format!("{addr}/{prefix}"),
        "gateway": a.gateway.to_string(),
        "interface": 1,
    });
    if version != "1.0.0" {
        ip["version"] = json!("4");
    }
    json!({
        "cniVersion": version,
        "interfaces": [
            {"name": a.host.0, "mac": mac_string(&a.host.1), "mtu": a.mtu},
            {"name": a.container.0, "mac": mac_string(&a.container.1), "mtu": a.mtu,
             "sandbox": a.container.2},
        ],
        "ips": [ip],
        "routes": [{"dst": "0.0.0.0/0", "gw": a.gateway.to_string()}],
        "dns": {},
    })
}

/// Whether this process is the CNI plugin: run as `weft-cni`, or with `CNI_COMMAND`
/// set and no arguments.
pub fn is_plugin_invocation() -> bool {
    let mut args = std::env::args_os();
    let argv0 = args.next();
    let named = argv0
        .as_deref()
        .map(Path::new)
        .and_then(Path::file_name)
        .is_some_and(|n| n == PLUGIN_NAME);
    named || (std::env::var_os("CNI_COMMAND").is_some() && args.next().is_none())
}

/// The plugin's entry point: one CNI call, its result or error on stdout.
pub fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let read = std::io::stdin().read_to_end(&mut stdin);
    // Error JSON carries the configuration's version when it has a readable one.
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| "1.0.0".to_owned());
    let outcome = match read {
        Ok(_) => run(&stdin, |k| std::env::var(k).ok()),
        Err(e) => Err(CniError::new(E_IO, "reading stdin failed").details(e)),
    };
    let (value, code) = match outcome {
        Ok(Some(v)) => (Some(v), ExitCode::SUCCESS),
        Ok(None) => (None, ExitCode::SUCCESS),
        Err(e) => (Some(e.to_json(&version)), ExitCode::FAILURE),
    };
    if let Some(v) = value {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
        let _ = out.flush();
    }
    code
}

/// One call: the JSON to print, if any.
fn run(stdin: &[u8], var: impl Fn(&str) -> Option<String>) -> Result<Option<Value>, CniError> {
    let env = parse_env(var)?;
    if env.command == Command::Version {
        let version = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| v.get("cniVersion")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| "1.0.0".to_owned());
        return Ok(Some(
            json!({"cniVersion": version, "supportedVersions": SUPPORTED_VERSIONS}),
        ));
    }
    let conf = parse_conf(stdin)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(E_IO, "cannot start the async runtime").details(e))?;
    runtime.block_on(async {
        let net = Netdev::connect()
            .map_err(|e| CniError::new(E_IO, "opening a netlink socket failed").details(e))?;
        match env.command {
            Command::Add => add(&net, &env, &conf).await.map(Some),
            Command::Del => del(&net, &env, &conf).await.map(|()| None),
            Command::Check => check(&net, &env, &conf).await.map(|()| None),
            Command::Version => unreachable!("handled above"),
        }
    })
}

fn owner(env: &Env) -> Owner {
    Owner {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    }
}

fn store(conf: &NetConf) -> Store {
    Store::new(conf.data_dir.join(&conf.name))
}

/// This node's bridge and block, from the bridge's address.
struct Node {
    bridge: Link,
    blocks: Blocks,
    short_id: u16,
    gateway: Ipv4Addr,
}

async fn node(net: &Netdev, conf: &NetConf) -> Result<Node, CniError> {
    let not_ready = |why: String| {
        CniError::new(
            E_TRY_AGAIN,
            format!("the weft agent has not set up the bridge yet ({why})"),
        )
    };
    let io = |e| CniError::new(E_IO, "netlink").details(e);
    let bridge = net
        .link(&conf.bridge)
        .await
        .map_err(io)?
        .ok_or_else(|| not_ready(format!("no interface {}", conf.bridge)))?;
    if bridge.kind.as_deref() != Some("bridge") {
        return Err(CniError::new(
            E_CONFIG,
            format!("{} is not a bridge", conf.bridge),
        ));
    }
    let (gateway, prefix) = net
        .ipv4_addresses(bridge.index)
        .await
        .map_err(io)?
        .into_iter()
        .find(|(a, _)| conf.range.contains(*a))
        .ok_or_else(|| {
            not_ready(format!(
                "{} has no address in the allocation range {}; is the agent running with \
                 --ipalloc-range {}?",
                conf.bridge, conf.range, conf.range
            ))
        })?;
    let mismatch = |why: String| {
        CniError::new(
            E_CONFIG,
            format!(
                "the bridge's address {gateway}/{prefix} does not fit ipallocRange {} ({why}): \
                 the agent's --ipalloc-range and the CNI configuration must be the same",
                conf.range
            ),
        )
    };
    let blocks = Blocks::new(conf.range, Some(Ipv4Net::containing(gateway, prefix)))
        .map_err(|e| mismatch(e.to_string()))?;
    let short_id = blocks
        .block_of(gateway)
        .map_err(|e| mismatch(e.to_string()))?;
    if blocks.bridge_address(short_id) != gateway {
        return Err(mismatch(format!(
            "not the first address of a block, {}",
            blocks.bridge_address(short_id)
        )));
    }
    Ok(Node {
        bridge,
        blocks,
        short_id,
        gateway,
    })
}

/// Runs `job` with a netlink connection inside the netns open as `netns`, on a
/// thread of its own (a thread's netns is its own; this one ends with the job).
fn in_netns<T, F, Fut>(netns: &File, job: F) -> Result<T, CniError>
where
    T: Send,
    F: FnOnce(Netdev) -> Fut + Send,
    Fut: Future<Output = Result<T, CniError>>,
{
    let fd = netns.as_raw_fd();
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                // SAFETY: setns on a valid open fd; it changes only this thread's
                // network namespace, and this thread ends with the job.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(CniError::new(
                        E_CONTAINER,
                        "entering the container's netns failed",
                    )
                    .details(std::io::Error::last_os_error()));
                }
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| {
                        CniError::new(E_IO, "cannot start the async runtime").details(e)
                    })?;
                runtime.block_on(async {
                    let net = Netdev::connect().map_err(|e| {
                        CniError::new(E_IO, "opening a netlink socket in the container failed")
                            .details(e)
                    })?;
                    job(net).await
                })
            })
            .join()
            .unwrap_or_else(|_| Err(CniError::new(E_IO, "the netns thread panicked")))
    })
}

fn open_netns(path: &Path) -> Result<File, CniError> {
    File::open(path).map_err(|e| {
        CniError::new(
            E_CONTAINER,
            format!("cannot open the container's netns {}", path.display()),
        )
        .details(e)
    })
}

async fn add(net: &Netdev, env: &Env, conf: &NetConf) -> Result<Value, CniError> {
    let node = node(net, conf).await?;
    let netns_path = env.netns.as_deref().expect("ADD has CNI_NETNS");
    let netns = open_netns(netns_path)?;
    let owner = owner(env);
    let store = store(conf);
    let (addr, _) = store
        .allocate(node.blocks.pod_addresses(node.short_id), &owner)
        .map_err(|e| {
            CniError::new(
                E_IO,
                format!("recording the allocation in {}", conf.data_dir.display()),
            )
            .details(e)
        })?
        .ok_or_else(|| {
            let (first, last) = node.blocks.block(node.short_id);
            CniError::new(
                E_BLOCK_FULL,
                format!("this node's address block {first}-{last} has no free address"),
            )
        })?;
    let host = host_veth_name(&env.container_id, &env.ifname);
    let attached = attach(net, env, &node, &netns, netns_path, &host, addr).await;
    match attached {
        Ok(a) => Ok(add_result(&conf.cni_version, &a)),
        Err(e) => {
            // Undo: the host end takes the other end along, wherever it is.
            if let Ok(Some(link)) = net.link(&host).await {
                let _ = net.delete_link(link.index, &host).await;
            }
            let peer = temp_peer_name(&env.container_id, &env.ifname);
            if let Ok(Some(link)) = net.link(&peer).await {
                let _ = net.delete_link(link.index, &peer).await;
            }
            let _ = store.release_addr(addr, &owner);
            Err(e)
        }
    }
}

async fn attach(
    net: &Netdev,
    env: &Env,
    node: &Node,
    netns: &File,
    netns_path: &Path,
    host: &str,
    addr: Ipv4Addr,
) -> Result<Attachment, CniError> {
    let nl = |e| CniError::new(E_IO, "netlink").details(e);
    // A host end of an earlier ADD of this container and interface goes first.
    if let Some(stale) = net.link(host).await.map_err(nl)? {
        net.delete_link(stale.index, host).await.map_err(nl)?;
    }
    let peer = temp_peer_name(&env.container_id, &env.ifname);
    if let Some(stale) = net.link(&peer).await.map_err(nl)? {
        net.delete_link(stale.index, &peer).await.map_err(nl)?;
    }
    let mtu = node.bridge.mtu;
    let host_link = net
        .create_veth(host, &peer)
        .await
        .map_err(|e| CniError::new(E_IO, format!("creating the veth pair {host}")).details(e))?;
    let peer_link = net
        .link(&peer)
        .await
        .map_err(nl)?
        .ok_or_else(|| CniError::new(E_IO, format!("the veth end {peer} vanished")))?;
    net.move_to_netns(peer_link.index, netns.as_raw_fd(), &env.ifname)
        .await
        .map_err(|e| {
            CniError::new(
                E_IO,
                format!("moving the veth end into the container as {}", env.ifname),
            )
            .details(e)
        })?;
    net.set_up(host_link.index, Some(mtu), Some(node.bridge.index))
        .await
        .map_err(|e| CniError::new(E_IO, format!("attaching {host} to the bridge")).details(e))?;
    // As Weave's plugin does by default (`hairpinMode`): a pod reaching itself
    // through a Service address gets its packets back on its own port.
    net.set_hairpin(host_link.index)
        .await
        .map_err(|e| CniError::new(E_IO, format!("hairpin mode on {host}")).details(e))?;
    let prefix = node.blocks.subnet().prefix();
    let gateway = node.gateway;
    let ifname = env.ifname.clone();
    let (container_index, container_mac) = in_netns(netns, move |cnet| async move {
        let err =
            |what: &str, e| CniError::new(E_IO, format!("in the container: {what}")).details(e);
        let link = cnet
            .link(&ifname)
            .await
            .map_err(|e| err("looking up the interface", e))?
            .ok_or_else(|| CniError::new(E_IO, format!("{ifname} is not in the container")))?;
        cnet.add_ipv4_address(link.index, addr, prefix)
            .await
            .map_err(|e| err("adding the address", e))?;
        cnet.set_up(link.index, Some(mtu), None)
            .await
            .map_err(|e| err("setting the interface up", e))?;
        cnet.add_default_route(link.index, gateway)
            .await
            .map_err(|e| err("adding the default route", e))?;
        Ok((link.index, link.mac))
    })?;
    announce(net, netns, host, container_index, container_mac, addr).await;
    Ok(Attachment {
        host: (host.to_owned(), host_link.mac),
        container: (
            env.ifname.clone(),
            container_mac,
            netns_path.display().to_string(),
        ),
        address: (addr, prefix),
        gateway,
        mtu,
    })
}

/// Announces a new pod's address with a gratuitous ARP from inside the container.
///
/// Addresses come back to new pods at once (the lowest free one is taken): pods and
/// hosts that still map the address to the previous pod's MAC would otherwise keep
/// sending there until their neighbour entries time out (15 s at the earliest, more
/// once a probe to the dead MAC has to fail). The kernel's own announcement
/// (`arp_notify`) goes out as the interface comes up, before the bridge has enabled
/// the host end (it does so when it sees the carrier, asynchronously) and is lost;
/// so this waits (up to a second) for the host end to forward, then sends. Best
/// effort: a failure here costs only the fast update.
async fn announce(
    net: &Netdev,
    netns: &File,
    host: &str,
    ifindex: u32,
    mac: [u8; 6],
    addr: Ipv4Addr,
) {
    for _ in 0..100 {
        match net.link(host).await {
            Ok(Some(link)) if !link.forwarding => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            _ => break,
        }
    }
    let sent = in_netns(netns, move |_| async move {
        send_gratuitous_arp(ifindex, mac, addr)
            .map_err(|e| CniError::new(E_IO, "sending a gratuitous ARP").details(e))
    });
    if let Err(e) = sent {
        eprintln!("weft-cni: {}: {}", e.msg, e.details);
    }
}

/// The ARP request `addr` is at `mac`, asking for `addr` (a gratuitous ARP), to the
/// Ethernet broadcast address.
fn gratuitous_arp_frame(mac: [u8; 6], addr: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes()); // ARP
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&addr.octets());
    // Target hardware address: zero.
    f[38..42].copy_from_slice(&addr.octets());
    f
}

/// Sends [`gratuitous_arp_frame`] out of link `ifindex` of this thread's netns.
fn send_gratuitous_arp(ifindex: u32, mac: [u8; 6], addr: Ipv4Addr) -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: socket(2) with constant arguments; protocol 0 receives nothing.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a socket just opened and owned by nothing else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let frame = gratuitous_arp_frame(mac, addr);
    // SAFETY: sockaddr_ll is plain data, valid all zero.
    let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    to.sll_family = libc::AF_PACKET as u16;
    to.sll_protocol = 0x0806u16.to_be();
    to.sll_ifindex = ifindex as i32;
    to.sll_halen = 6;
    to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    // SAFETY: the frame and the address are valid for the lengths given, for the
    // duration of the call.
    let n = unsafe {
        libc::sendto(
            sock.as_raw_fd(),
            frame.as_ptr().cast(),
            frame.len(),
            0,
            (&to as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

async fn del(net: &Netdev, env: &Env, conf: &NetConf) -> Result<(), CniError> {
    store(conf).release(&owner(env)).map_err(|e| {
        CniError::new(
            E_IO,
            format!("releasing the allocation in {}", conf.data_dir.display()),
        )
        .details(e)
    })?;
    let nl = |e| CniError::new(E_IO, "netlink").details(e);
    for name in [
        host_veth_name(&env.container_id, &env.ifname),
        temp_peer_name(&env.container_id, &env.ifname),
    ] {
        if let Some(link) = net.link(&name).await.map_err(nl)? {
            net.delete_link(link.index, &name).await.map_err(nl)?;
        }
    }
    Ok(())
}

async fn check(net: &Netdev, env: &Env, conf: &NetConf) -> Result<(), CniError> {
    if conf.cni_version.starts_with("0.3.") {
        return Err(CniError::new(
            E_VERSION,
            format!(
                "CHECK needs CNI 0.4.0 or later, the configuration has {}",
                conf.cni_version
            ),
        ));
    }
    let prev = conf
        .prev_result
        .as_ref()
        .ok_or_else(|| CniError::new(E_CONFIG, "CHECK needs prevResult"))?;
    let expected: Ipv4Addr = prev["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split_once('/'))
        .and_then(|(a, _)| a.parse().ok())
        .ok_or_else(|| CniError::new(E_CONFIG, "prevResult has no IPv4 address"))?;
    let node = node(net, conf).await?;
    let failed = |msg: String| CniError::new(E_IO, msg);
    let held = store(conf)
        .held_by(&owner(env))
        .map_err(|e| CniError::new(E_IO, "reading the allocations").details(e))?;
    if !held.contains(&expected) {
        return Err(failed(format!(
            "{expected} is not allocated to this container (it holds {held:?})"
        )));
    }
    let nl = |e| CniError::new(E_IO, "netlink").details(e);
    let host = host_veth_name(&env.container_id, &env.ifname);
    let host_link = net
        .link(&host)
        .await
        .map_err(nl)?
        .ok_or_else(|| failed(format!("the host end {host} is missing")))?;
    if host_link.controller != Some(node.bridge.index) {
        return Err(failed(format!("{host} is not attached to {}", conf.bridge)));
    }
    let netns = open_netns(env.netns.as_deref().expect("CHECK has CNI_NETNS"))?;
    let prefix = node.blocks.subnet().prefix();
    let ifname = env.ifname.clone();
    let gateway = node.gateway;
    in_netns(&netns, move |cnet| async move {
        let nl = |e| CniError::new(E_IO, "netlink in the container").details(e);
        let link =
            cnet.link(&ifname).await.map_err(nl)?.ok_or_else(|| {
                CniError::new(E_IO, format!("{ifname} is missing in the container"))
            })?;
        let addrs = cnet.ipv4_addresses(link.index).await.map_err(nl)?;
        if !addrs.contains(&(expected, prefix)) {
            return Err(CniError::new(
                E_IO,
                format!("{ifname} lacks {expected}/{prefix} (it has {addrs:?})"),
            ));
        }
        match cnet.default_route().await.map_err(nl)? {
            Some((oif, Some(gw))) if oif == link.index && gw == gateway => Ok(()),
            other => Err(CniError::new(
                E_IO,
                format!(
                    "the container's default route is not via {gateway} on {ifname} ({other:?})"
                ),
            )),
        }
    })
}

/// `weft install-cni`: this binary as `<bin-dir>/weft-cni`, the configuration as
/// `<conf-dir>/10-weft.conflist`, each written aside and renamed into place.
pub fn install(args: &InstallCniArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    Blocks::new(args.ipalloc_range, None)?;
    anyhow::ensure!(
        args.data_dir.is_absolute(),
        "--data-dir {:?} is not an absolute path",
        args.data_dir.display()
    );
    let exe = std::fs::read("/proc/self/exe").context("reading this binary (/proc/self/exe)")?;
    let bin = args.bin_dir.join(PLUGIN_NAME);
    write_atomically(&bin, &exe, 0o755)?;
    let conf = conflist(&args.ipalloc_range, &args.bridge, &args.data_dir);
    let path = args.conf_dir.join(CONFLIST_NAME);
    write_atomically(
        &path,
        (serde_json::to_string_pretty(&conf)? + "\n").as_bytes(),
        0o644,
    )?;
    println!("installed {} and {}", bin.display(), path.display());
    Ok(())
}

/// The network configuration `install-cni` writes.
pub fn conflist(range: &Ipv4Net, bridge: &str, data_dir: &Path) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "name": NETWORK_NAME,
        "plugins": [{
            "type": PLUGIN_NAME,
            "bridge": bridge,
            "ipallocRange": range.to_string(),
            "dataDir": data_dir,
        }],
    })
}

fn write_atomically(path: &Path, content: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};

    use anyhow::Context;
    let dir = path.parent().context("no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = path.file_name().context("no file name")?.to_string_lossy();
    let temp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)?;
        f.write_all(content)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        // Closed before the rename: a plugin still open for writing cannot be
        // executed (ETXTBSY), and runtimes may run it as soon as it is in place.
        drop(f);
        std::fs::rename(&temp, path)
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env_of(pairs: &[(&str, &str)]) -> Result<Env, CniError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        parse_env(|k| map.get(k).cloned())
    }

    const FULL: [(&str, &str); 4] = [
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
    ];

    #[test]
    fn env() {
        let e = env_of(&FULL).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.netns, Some(PathBuf::from("/run/netns/x")));
        assert_eq!(
            env_of(&[("CNI_COMMAND", "VERSION")]).unwrap().command,
            Command::Version
        );
        assert_eq!(env_of(&[]).unwrap_err().code, E_ENV);
        assert_eq!(env_of(&[("CNI_COMMAND", "GC")]).unwrap_err().code, E_ENV);
        for missing in ["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            let pairs: Vec<_> = FULL
                .iter()
                .copied()
                .filter(|(k, _)| *k != missing)
                .collect();
            let err = env_of(&pairs).unwrap_err();
            assert_eq!(err.code, E_ENV);
            assert_eq!(err.msg, format!("{missing} is not set"));
        }
        // DEL without a netns is fine.
        let del: Vec<_> = [("CNI_COMMAND", "DEL")]
            .into_iter()
            .chain(FULL[1..].iter().copied().filter(|(k, _)| *k != "CNI_NETNS"))
            .collect();
        assert_eq!(env_of(&del).unwrap().netns, None);
        let mut bad = FULL.to_vec();
        bad[1] = ("CNI_CONTAINERID", "../etc");
        assert_eq!(env_of(&bad).unwrap_err().code, E_ENV);
        bad[1] = ("CNI_CONTAINERID", "abc");
        bad[3] = ("CNI_IFNAME", "a-very-long-interface");
        assert_eq!(env_of(&bad).unwrap_err().code, E_ENV);
    }

    #[test]
    fn conf() {
        let c = parse_conf(br#"{"cniVersion":"1.0.0","name":"weave","type":"weft-cni"}"#).unwrap();
        assert_eq!(c.bridge, "weave");
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.range.to_string(), DEFAULT_RANGE);
        let c = parse_conf(
            br#"{"cniVersion":"0.4.0","name":"n","bridge":"br1","dataDir":"/d",
                 "ipallocRange":"10.40.0.0/13","prevResult":{"ips":[]},"other":1}"#,
        )
        .unwrap();
        assert_eq!((c.bridge.as_str(), c.range.prefix()), ("br1", 13));
        assert!(c.prev_result.is_some());
        for (input, code) in [
            (&b""[..], E_DECODE),
            (b"garbage", E_DECODE),
            (b"[1,2]", E_DECODE),
            (br#"{"cniVersion":1}"#, E_DECODE),
            (br#"{"name":"n"}"#, E_CONFIG),
            (br#"{"cniVersion":"0.2.0","name":"n"}"#, E_VERSION),
            (br#"{"cniVersion":"1.0.0"}"#, E_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":"../x"}"#, E_CONFIG),
            (br#"{"cniVersion":"1.0.0","name":""}"#, E_CONFIG),
            (
                br#"{"cniVersion":"1.0.0","name":"n","dataDir":"rel"}"#,
                E_CONFIG,
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"n","bridge":"a/b"}"#,
                E_CONFIG,
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"n","ipallocRange":"10.0.0.0/24"}"#,
                E_CONFIG,
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"n","ipallocRange":"10.0.0.1/12"}"#,
                E_CONFIG,
            ),
        ] {
            let err = parse_conf(input).unwrap_err();
            assert_eq!(
                err.code,
                code,
                "{}: {err:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn veth_names_are_deterministic_and_fit() {
        let a = host_veth_name("abc", "eth0");
        assert_eq!(a, host_veth_name("abc", "eth0"));
        assert_ne!(a, host_veth_name("abc", "eth1"));
        assert_ne!(a, host_veth_name("abd", "eth0"));
        assert_eq!(a.len(), 15);
        assert!(crate::cli::parse_ifname(&a).is_ok());
        assert!(crate::cli::parse_ifname(&temp_peer_name("abc", "eth0")).is_ok());
    }

    #[test]
    fn results_by_version() {
        let a = Attachment {
            host: ("wft0123456789ab".into(), [2, 0, 0, 0, 0, 1]),
            container: ("eth0".into(), [2, 0, 0, 0, 0, 2], "/run/netns/x".into()),
            address: ("10.32.1.2".parse().unwrap(), 12),
            gateway: "10.32.1.1".parse().unwrap(),
            mtu: 1376,
        };
        let r = add_result("1.0.0", &a);
        assert_eq!(r["ips"][0]["address"], "10.32.1.2/12");
        assert_eq!(r["ips"][0]["interface"], 1);
        assert_eq!(r["interfaces"][1]["sandbox"], "/run/netns/x");
        assert_eq!(r["interfaces"][1]["mac"], "02:00:00:00:00:02");
        assert_eq!(r["routes"][0]["gw"], "10.32.1.1");
        assert!(r["ips"][0].get("version").is_none());
        assert_eq!(add_result("0.3.1", &a)["ips"][0]["version"], "4");
        let e = CniError::new(E_TRY_AGAIN, "later").to_json("1.0.0");
        assert_eq!(
            e,
            json!({"cniVersion": "1.0.0", "code": 11, "msg": "later"})
        );
    }

    #[test]
    fn gratuitous_arp_frame_layout() {
        let mac = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
        let f = gratuitous_arp_frame(mac, Ipv4Addr::new(10, 40, 1, 2));
        let hex: String = f.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            concat!(
                "ffffffffffff",
                "021122334455",
                "0806", // Ethernet: broadcast, ARP
                "0001",
                "0800",
                "06",
                "04",
                "0001", // Ethernet/IPv4, request
                "021122334455",
                "0a280102", // sender: the pod
                "000000000000",
                "0a280102", // target: the same address
            )
        );
    }

    #[test]
    fn version_and_bad_input_never_touch_the_system() {
        let v = run(b"", |k| (k == "CNI_COMMAND").then(|| "VERSION".to_owned()))
            .unwrap()
            .unwrap();
        assert_eq!(v["supportedVersions"], json!(SUPPORTED_VERSIONS));
        let map: HashMap<&str, &str> = FULL.into_iter().collect();
        let err = run(b"{not json", |k| map.get(k).map(|v| v.to_string())).unwrap_err();
        assert_eq!(err.code, E_DECODE);
    }

    #[test]
    fn conflist_names_the_plugin() {
        let c = conflist(
            &DEFAULT_RANGE.parse().unwrap(),
            "weave",
            Path::new(DEFAULT_DATA_DIR),
        );
        assert_eq!(c["plugins"][0]["type"], PLUGIN_NAME);
        assert_eq!(c["plugins"][0]["ipallocRange"], DEFAULT_RANGE);
        assert_eq!(c["plugins"][0]["dataDir"], DEFAULT_DATA_DIR);
        let parsed = parse_conf(
            serde_json::to_string(&json!({
                "cniVersion": c["cniVersion"], "name": c["name"],
                "ipallocRange": c["plugins"][0]["ipallocRange"],
                "bridge": c["plugins"][0]["bridge"],
            }))
            .unwrap()
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(parsed.name, NETWORK_NAME);
    }
}
