//! Command-line interface of the `weft` binary.
//!
//! ```text
//! weft run [--name PEERNAME] [--nickname NICK] [--password-file FILE] [--no-fastdp]
//!          [--encrypt-network BOOL] [--kube-peers]
//!          [--iface IFACE] [--mtu N] [--bridge NAME] [--port N] [--socket PATH]
//!          [--http-addr ADDR] [--status-addr ADDR] [--bpffs PATH]
//!          [--ipalloc-range CIDR [--ipalloc-default-subnet CIDR]] [PEER...]
//! weft run --name PEERNAME --peers-file FILE [...]          (static peers, no mesh)
//! weft connect PEER... | weft forget PEER...               (the running agent's targets)
//! weft status [connections|peers] [--json] [--socket PATH]
//! weft reset [--bridge NAME] [--socket PATH] [--bpffs PATH]
//! weft install-cni [--bin-dir DIR] [--conf-dir DIR] [--ipalloc-range CIDR]
//! weft cipher-speed [--datagram-len BYTES] [--millis MS] [--json]
//! weft-cni                                   (the CNI plugin: CNI_* env, config on stdin)
//! ```
//!
//! As with `weave launch`, a PEER is `host[:port]` (port 6783 by default) and the
//! password comes from `WEAVE_PASSWORD` unless `--password-file` is given.
//!
//! `weft run` also takes its options from the environment variables Weave's
//! DaemonSet sets (`WEAVE_MTU`, `CONN_LIMIT`, `WEAVE_NO_FASTDP`, `HOSTNAME` for the
//! nickname, `KUBE_PEERS` for the peers, `WEAVE_HTTP_ADDR`, `WEAVE_METRICS_ADDR`)
//! and weft's own (`WEFT_ENCRYPT_NETWORK`, `WEFT_KUBE_PEERS`). A flag on the command
//! line wins over its variable; as in Weave's launch script, an empty variable counts
//! as unset ([`command`]).

use std::{ffi::OsString, net::SocketAddr, path::PathBuf};

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum, builder::BoolishValueParser};
use weft_common::wire::{CONTROL_PORT, DEFAULT_MTU};

use crate::{
    control::DEFAULT_SOCKET,
    ipam::{Blocks, DEFAULT_RANGE, IpamError, Ipv4Net},
    peers::PeerName,
};

/// Smallest accepted overlay MTU (the IPv4 minimum datagram every host must accept).
pub const MIN_MTU: u16 = 576;
/// Largest accepted overlay MTU (leaves room for the 50 bytes of encapsulation).
pub const MAX_MTU: u16 = 65000;
/// Where bpffs is normally mounted.
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";
/// Longest Linux interface name (`IFNAMSIZ` - 1).
pub const MAX_IFNAME: usize = 15;

/// weft: an eBPF fast datapath for Weave Net-compatible overlay networks.
#[derive(Debug, Parser)]
#[command(name = "weft", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent in the foreground until SIGINT or SIGTERM (SIGHUP reloads the
    /// peers file). The datapath keeps forwarding after the agent stops; a new agent
    /// adopts it.
    Run(Box<RunArgs>),
    /// Show the running agent's status.
    Status(StatusArgs),
    /// Add peers for the running agent to connect to (Weave's `weave connect`).
    Connect(TargetsArgs),
    /// Remove peers from the running agent's targets (Weave's `weave forget`); open
    /// connections stay until they break.
    Forget(TargetsArgs),
    /// Remove everything weft set up in this network namespace (programs, maps,
    /// devices), as `weave reset` does. The agent must be stopped first.
    Reset(ResetArgs),
    /// Install the CNI plugin (this binary, as `weft-cni`) and its network
    /// configuration, each atomically: a DaemonSet's init step.
    InstallCni(InstallCniArgs),
    /// Measure how fast one core of this machine seals and opens encrypted sleeve
    /// datagrams (XSalsa20-Poly1305): the bound on what the encrypted sleeve carries.
    CipherSpeed(CipherSpeedArgs),
}

/// Options of `weft run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Underlay interface carrying VXLAN [default: the interface of the default route].
    #[arg(long, value_name = "IFACE", value_parser = parse_ifname)]
    pub iface: Option<String>,
    /// Peers to connect to, `host[:port]` (port 6783 by default); more are found
    /// through the mesh's gossip.
    #[arg(value_name = "PEER", value_parser = parse_target)]
    pub peers: Vec<String>,
    /// This host's peer name (like aa:00:00:00:00:01) [default: the bridge's MAC if
    /// the bridge exists, else derived from the machine id as Weave derives it].
    #[arg(long, value_name = "PEERNAME")]
    pub name: Option<PeerName>,
    /// This host's nickname, shown in status [default: the host name]. Weave's
    /// DaemonSet sets HOSTNAME to the node's name.
    #[arg(long, value_name = "NICK", env = "HOSTNAME")]
    pub nickname: Option<String>,
    /// File holding the mesh password [default: the WEAVE_PASSWORD environment
    /// variable]. With a password, control connections and the sleeve are encrypted,
    /// and the fast datapath uses IPsec ESP; where the kernel has no ESP, encrypted
    /// connections use the sleeve.
    #[arg(long, value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Encryption: `true` refuses to start without a password, `false` runs
    /// unencrypted and ignores any password (Weave's `encrypt-network=0`) [default:
    /// encrypted if and only if a password is given].
    #[arg(long, value_name = "BOOL", env = "WEFT_ENCRYPT_NETWORK", value_parser = BoolishValueParser::new())]
    pub encrypt_network: Option<bool>,
    /// Seconds between renewals of a connection's IPsec keys (between wefts; a
    /// Weave router keeps its first keys).
    #[arg(long, value_name = "SECS", default_value_t = 3600, value_parser = clap::value_parser!(u64).range(5..=86_400 * 30))]
    pub ipsec_rekey_interval: u64,
    /// Never use the fast datapath: every connection uses the sleeve. The variable
    /// takes true/false, 1/0, yes/no, on/off.
    #[arg(
        long,
        env = "WEAVE_NO_FASTDP",
        num_args = 0,
        default_missing_value = "true",
        default_value = "false",
        value_parser = BoolishValueParser::new(),
    )]
    pub no_fastdp: bool,
    /// Peers from the Kubernetes API: every node's InternalIP (this node's
    /// excepted), followed as nodes come and go (Weave's DaemonSet's way). Needs the
    /// pod's service account, or a KUBECONFIG.
    #[arg(
        long,
        env = "WEFT_KUBE_PEERS",
        num_args = 0,
        default_missing_value = "true",
        default_value = "false",
        value_parser = BoolishValueParser::new(),
    )]
    pub kube_peers: bool,
    /// Seconds between reads of the Kubernetes node list (tests).
    #[arg(long, value_name = "SECS", default_value_t = 60, hide = true, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub kube_peers_interval: u64,
    /// Most control connections at once (Weave's `--conn-limit`).
    #[arg(long, value_name = "N", env = "CONN_LIMIT", default_value_t = 200)]
    pub conn_limit: usize,
    /// Weave's HTTP status endpoints (`/status`, `/status/connections`,
    /// `/status/peers`, `/report`); an empty value turns them off.
    #[arg(long, value_name = "ADDR", env = "WEAVE_HTTP_ADDR", default_value = "127.0.0.1:6784", value_parser = parse_optional_addr)]
    pub http_addr: Endpoint,
    /// Status and Prometheus metrics (`/metrics`), as Weave's `--status-addr`; an
    /// empty value turns it off.
    #[arg(long, value_name = "ADDR", env = "WEAVE_METRICS_ADDR", default_value = "0.0.0.0:6782", value_parser = parse_optional_addr)]
    pub status_addr: Endpoint,
    /// Static mode: the peers file (TOML, one [[peer]] entry per host, this one
    /// included) instead of a mesh; needs --name.
    #[arg(long, value_name = "FILE", requires = "name", conflicts_with_all = ["peers", "password_file", "no_fastdp", "kube_peers"])]
    pub peers_file: Option<PathBuf>,
    /// Overlay MTU: the largest IP packet containers may send.
    #[arg(
        long,
        value_name = "N",
        env = "WEAVE_MTU",
        default_value_t = DEFAULT_MTU,
        value_parser = clap::value_parser!(u16).range(i64::from(MIN_MTU)..=i64::from(MAX_MTU)),
    )]
    pub mtu: u16,
    /// Bridge containers attach to (created if absent).
    #[arg(long, value_name = "NAME", default_value = "weave", value_parser = parse_ifname)]
    pub bridge: String,
    /// Control port; VXLAN uses the next port (default 6784).
    #[arg(
        long,
        value_name = "N",
        default_value_t = CONTROL_PORT,
        value_parser = clap::value_parser!(u16).range(1..=65534),
    )]
    pub port: u16,
    /// Control socket `weft status` talks to.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Where bpffs is mounted: the datapath's maps and links are pinned below it,
    /// in a directory of this network namespace's own.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// Load the eBPF programs from this object file instead of the ones built in
    /// (development, and tests of upgrades between different programs).
    #[arg(long, value_name = "FILE", hide = true)]
    pub ebpf_object: Option<PathBuf>,
    /// Allocate pod addresses from this range (Weave's `--ipalloc-range`; IPAM is
    /// off without it): each peer owns the 1/4096th of it its ShortID names, puts the
    /// first address of that block on the bridge, and the `weft-cni` plugin hands
    /// out the rest. The prefix must be /18 or shorter.
    #[arg(long, value_name = "CIDR", env = "IPALLOC_RANGE", value_parser = parse_net)]
    pub ipalloc_range: Option<Ipv4Net>,
    /// The subnet pods and the bridge are in (Weave's `--ipalloc-default-subnet`): it
    /// must contain --ipalloc-range [default: the range itself]. A subnet bigger than
    /// the range shares one segment with Weave routers allocating from another part.
    #[arg(long, value_name = "CIDR", requires = "ipalloc_range", value_parser = parse_net)]
    pub ipalloc_default_subnet: Option<Ipv4Net>,
}

impl RunArgs {
    /// The IPAM blocks, when `--ipalloc-range` is given.
    pub fn ipam(&self) -> Result<Option<Blocks>, IpamError> {
        self.ipalloc_range
            .map(|range| Blocks::new(range, self.ipalloc_default_subnet))
            .transpose()
    }
}

/// Options of `weft install-cni`.
#[derive(Debug, Args)]
pub struct InstallCniArgs {
    /// Where the plugin binary goes (as `weft-cni`).
    #[arg(long, value_name = "DIR", default_value = "/opt/cni/bin")]
    pub bin_dir: PathBuf,
    /// Where the network configuration goes (as `10-weft.conflist`).
    #[arg(long, value_name = "DIR", default_value = "/etc/cni/net.d")]
    pub conf_dir: PathBuf,
    /// The agents' allocation range, written into the configuration (it must be the
    /// one `weft run` is given).
    #[arg(long, value_name = "CIDR", env = "IPALLOC_RANGE", default_value = DEFAULT_RANGE, value_parser = parse_net)]
    pub ipalloc_range: Ipv4Net,
    /// The bridge pods attach to (as `weft run --bridge`).
    #[arg(long, value_name = "NAME", default_value = "weave", value_parser = parse_ifname)]
    pub bridge: String,
    /// Where the plugin keeps its allocations (the configuration's `dataDir`; an
    /// absolute path on the node).
    #[arg(long, value_name = "DIR", default_value = crate::cni::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
}

/// Options of `weft connect` and `weft forget`.
#[derive(Debug, Args)]
pub struct TargetsArgs {
    /// Peers, `host[:port]` (port 6783 by default).
    #[arg(value_name = "PEER", required = true, value_parser = parse_target)]
    pub peers: Vec<String>,
    /// Control socket of the running agent.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// Options of `weft reset`.
#[derive(Debug, Args)]
pub struct ResetArgs {
    /// The bridge; removed only if weft created it and no pod is attached.
    #[arg(long, value_name = "NAME", default_value = "weave", value_parser = parse_ifname)]
    pub bridge: String,
    /// Control socket of the agent (which must not be running).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Where bpffs is mounted (as given to `weft run`).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

/// Options of `weft cipher-speed`.
#[derive(Debug, Args)]
pub struct CipherSpeedArgs {
    /// Datagram length, bytes (1472 fills a 1500-byte underlay MTU; at most 65507,
    /// the largest UDP datagram).
    #[arg(
        long,
        value_name = "BYTES",
        default_value_t = 1472,
        value_parser = clap::value_parser!(u16).range(64..=65507)
    )]
    pub datagram_len: u16,
    /// Milliseconds spent sealing, and then opening (the run takes about three
    /// times this: datagrams to open are sealed untimed).
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(1..=60_000)
    )]
    pub millis: u64,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Options of `weft status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// What to show [default: a summary].
    #[arg(value_enum, value_name = "WHAT")]
    pub what: Option<StatusWhat>,
    /// Print the whole status as JSON (whatever WHAT is).
    #[arg(long)]
    pub json: bool,
    /// Control socket of the running agent.
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

/// The views of `weft status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusWhat {
    /// One line per connection.
    Connections,
    /// This peer and its connections.
    Peers,
}

/// The environment variable holding the static peers of Weave's DaemonSet, separated
/// by whitespace; read when no PEER is given on the command line.
pub const KUBE_PEERS_VAR: &str = "KUBE_PEERS";

impl RunArgs {
    /// The peers to connect to at start: the PEER arguments, else those of
    /// `KUBE_PEERS`.
    pub fn initial_peers(&self) -> Result<Vec<String>, String> {
        if !self.peers.is_empty() {
            return Ok(self.peers.clone());
        }
        match std::env::var_os(KUBE_PEERS_VAR) {
            None => Ok(Vec::new()),
            Some(list) => {
                let list = list
                    .into_string()
                    .map_err(|_| format!("{KUBE_PEERS_VAR} is not valid UTF-8"))?;
                split_peer_list(&list).map_err(|e| format!("{KUBE_PEERS_VAR}: {e}"))
            }
        }
    }
}

/// Splits a whitespace-separated peer list (as Weave's launch script passes
/// `KUBE_PEERS`), checking each entry as [`parse_target`] does.
pub fn split_peer_list(list: &str) -> Result<Vec<String>, String> {
    list.split_whitespace().map(parse_target).collect()
}

/// The command-line definition, with the environment variables that are set but
/// empty taken as unset (as Weave's launch script takes them; clap would otherwise
/// parse the empty value).
pub fn command() -> clap::Command {
    Cli::command().mut_subcommand("run", |run| {
        let empty: Vec<clap::Id> = run
            .get_arguments()
            .filter(|a| {
                a.get_env()
                    .and_then(std::env::var_os)
                    .is_some_and(|v| v.is_empty())
            })
            .map(|a| a.get_id().clone())
            .collect();
        empty
            .into_iter()
            .fold(run, |run, id| run.mut_arg(id, |a| a.env(None::<&str>)))
    })
}

/// Parses the process's arguments and environment; on bad input exits with clap's
/// message (and status 2), naming the environment variable a bad value came from.
pub fn parse() -> Cli {
    use clap::FromArgMatches;
    let cmd = command();
    let args: Vec<OsString> = std::env::args_os().collect();
    let result = cmd
        .clone()
        .try_get_matches_from(&args)
        .and_then(|m| Cli::from_arg_matches(&m));
    match result {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            if let Some(var) = env_source(&cmd, &e, &args) {
                eprintln!("(the value comes from the environment variable {var})");
            }
            std::process::exit(e.exit_code())
        }
    }
}

/// The environment variable a rejected value of `weft run` came from: the argument
/// the error names has one, it is set, and the flag is not on the command line.
fn env_source(cmd: &clap::Command, e: &clap::Error, args: &[OsString]) -> Option<String> {
    use clap::error::{ContextKind, ContextValue};
    let Some(ContextValue::String(named)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let run = cmd.find_subcommand("run")?;
    let arg = run.get_arguments().find(|a| {
        a.get_long()
            .is_some_and(|l| named.split(' ').next() == Some(&format!("--{l}")))
    })?;
    let long = format!("--{}", arg.get_long()?);
    let on_command_line = args.iter().any(|a| {
        a.to_str()
            .is_some_and(|a| a == long || a.starts_with(&format!("{long}=")))
    });
    let var = arg.get_env()?;
    (!on_command_line && std::env::var_os(var).is_some())
        .then(|| var.to_string_lossy().into_owned())
}

/// Accepts a peer address as Weave does: `host`, `host:port`, `[v6]:port`; the host
/// is resolved when it is dialled.
pub fn parse_target(s: &str) -> Result<String, String> {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') || (h.starts_with('[') && h.ends_with(']')) => {
            (h, Some(p))
        }
        _ => (s, None),
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(format!("{s:?} is not a peer address (host[:port])"));
    }
    if let Some(port) = port {
        match port.parse::<u16>() {
            Ok(p) if p > 0 => {}
            _ => return Err(format!("{s:?}: {port:?} is not a port (1..65535)")),
        }
    }
    Ok(s.to_owned())
}

/// An IPv4 CIDR with no host bits set.
fn parse_net(s: &str) -> Result<Ipv4Net, String> {
    s.parse().map_err(|e: IpamError| e.to_string())
}

/// A listening address, or none (the endpoint is turned off).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint(pub Option<SocketAddr>);

/// An address, or none for an empty string.
fn parse_optional_addr(s: &str) -> Result<Endpoint, String> {
    if s.is_empty() {
        return Ok(Endpoint(None));
    }
    s.parse()
        .map(|a| Endpoint(Some(a)))
        .map_err(|_| format!("{s:?} is not an address like 127.0.0.1:6784"))
}

/// Accepts a valid Linux interface name: 1 to 15 bytes, not `.` or `..`, without `/`,
/// `:`, whitespace or NUL (the kernel's `dev_valid_name`).
pub fn parse_ifname(s: &str) -> Result<String, String> {
    if s.is_empty() {
        return Err("an interface name cannot be empty".to_owned());
    }
    if s.len() > MAX_IFNAME {
        return Err(format!(
            "an interface name is at most {MAX_IFNAME} bytes, {s:?} has {}",
            s.len()
        ));
    }
    if s == "." || s == ".." {
        return Err(format!("{s:?} is not a valid interface name"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| *c == '/' || *c == ':' || *c == '\0' || c.is_whitespace())
    {
        return Err(format!(
            "an interface name cannot contain {c:?} (nor '/', ':' or whitespace)"
        ));
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, error::ErrorKind};

    use super::*;

    const NAME: &str = "aa:00:00:00:00:01";

    fn run(extra: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut args = vec![
            "weft",
            "run",
            "--name",
            NAME,
            "--peers-file",
            "/etc/weft/peers.toml",
        ];
        args.extend_from_slice(extra);
        match Cli::try_parse_from(args)?.command {
            Command::Run(r) => Ok(*r),
            other => panic!("parsed as {other:?}"),
        }
    }

    fn status(args: &[&str]) -> Result<StatusArgs, clap::Error> {
        let args = ["weft", "status"].iter().chain(args);
        match Cli::try_parse_from(args)?.command {
            Command::Status(s) => Ok(s),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults() {
        let r = run(&[]).unwrap();
        assert_eq!(r.iface, None);
        assert_eq!(r.name, Some(NAME.parse().unwrap()));
        assert_eq!(r.peers_file, Some(PathBuf::from("/etc/weft/peers.toml")));
        assert_eq!(r.mtu, 1376);
        assert_eq!(r.bridge, "weave");
        assert_eq!(r.port, 6783);
        assert_eq!(r.socket, PathBuf::from("/run/weft/weft.sock"));
    }

    #[test]
    fn run_all_options() {
        let r = run(&[
            "--iface",
            "eth1",
            "--mtu",
            "8950",
            "--bridge",
            "br-weft",
            "--port",
            "7000",
            "--socket",
            "/var/lib/weft/w.sock",
        ])
        .unwrap();
        assert_eq!(r.iface.as_deref(), Some("eth1"));
        assert_eq!(r.mtu, 8950);
        assert_eq!(r.bridge, "br-weft");
        assert_eq!(r.port, 7000);
        assert_eq!(r.socket, PathBuf::from("/var/lib/weft/w.sock"));
        // Range limits are inclusive.
        assert_eq!(run(&["--mtu", "576"]).unwrap().mtu, 576);
        assert_eq!(run(&["--mtu", "65000"]).unwrap().mtu, 65000);
        assert_eq!(run(&["--port", "65534"]).unwrap().port, 65534);
        assert_eq!(
            run(&["--iface", "abcdefghijklmno"])
                .unwrap()
                .iface
                .unwrap()
                .len(),
            15
        );
    }

    fn mesh(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let args = ["weft", "run"].iter().chain(args);
        match Cli::try_parse_from(args)?.command {
            Command::Run(r) => Ok(*r),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn static_mode_requires_name_and_excludes_mesh_options() {
        let e = Cli::try_parse_from(["weft", "run", "--peers-file", "p"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
        assert!(e.to_string().contains("--name <PEERNAME>"), "{e}");
        let e = run(&["192.168.48.12"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ArgumentConflict, "{e}");
        let e = run(&["--no-fastdp"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ArgumentConflict, "{e}");
    }

    #[test]
    fn mesh_mode_takes_peers_as_weave_does() {
        let r = mesh(&[]).unwrap();
        assert_eq!(r.name, None);
        assert_eq!(r.peers_file, None);
        assert!(r.peers.is_empty());
        assert!(!r.no_fastdp);
        assert_eq!(r.conn_limit, 200);
        assert_eq!(r.http_addr.0, Some("127.0.0.1:6784".parse().unwrap()));
        assert_eq!(r.status_addr.0, Some("0.0.0.0:6782".parse().unwrap()));
        let r = mesh(&[
            "--name",
            NAME,
            "--nickname",
            "h1",
            "--password-file",
            "/etc/weft/pw",
            "--no-fastdp",
            "--http-addr",
            "",
            "192.168.48.12",
            "host3:7000",
            "[fd00::3]:6783",
        ])
        .unwrap();
        assert_eq!(r.nickname.as_deref(), Some("h1"));
        assert_eq!(r.password_file, Some(PathBuf::from("/etc/weft/pw")));
        assert!(r.no_fastdp);
        assert_eq!(r.http_addr.0, None);
        assert_eq!(r.peers, ["192.168.48.12", "host3:7000", "[fd00::3]:6783"]);
        for bad in ["host:0", "host:99999", "host:x", ":6783", "a b", "a/b"] {
            let e = mesh(&[bad]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ValueValidation, "{bad}: {e}");
        }
        let e = mesh(&["--http-addr", "localhost"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
    }

    #[test]
    fn run_options_take_weaves_daemonset_variables() {
        let cmd = Cli::command();
        let run = cmd.find_subcommand("run").unwrap();
        let env = |id: &str| {
            run.get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_env())
                .map(|v| v.to_string_lossy().into_owned())
        };
        assert_eq!(env("mtu").as_deref(), Some("WEAVE_MTU"));
        assert_eq!(env("conn_limit").as_deref(), Some("CONN_LIMIT"));
        assert_eq!(env("no_fastdp").as_deref(), Some("WEAVE_NO_FASTDP"));
        assert_eq!(env("nickname").as_deref(), Some("HOSTNAME"));
        assert_eq!(env("kube_peers").as_deref(), Some("WEFT_KUBE_PEERS"));
        assert_eq!(
            env("encrypt_network").as_deref(),
            Some("WEFT_ENCRYPT_NETWORK")
        );
        assert_eq!(env("http_addr").as_deref(), Some("WEAVE_HTTP_ADDR"));
        assert_eq!(env("status_addr").as_deref(), Some("WEAVE_METRICS_ADDR"));
        // The password never goes through clap (its help would show the value).
        assert!(
            run.get_arguments()
                .all(|a| a.get_env().is_none_or(|v| v != "WEAVE_PASSWORD"))
        );
    }

    #[test]
    fn encryption_switch_and_no_fastdp_values() {
        assert_eq!(mesh(&[]).unwrap().encrypt_network, None);
        for (v, want) in [
            ("true", true),
            ("1", true),
            ("yes", true),
            ("false", false),
            ("0", false),
            ("off", false),
        ] {
            assert_eq!(
                mesh(&["--encrypt-network", v]).unwrap().encrypt_network,
                Some(want),
                "{v}"
            );
        }
        for bad in ["", "maybe", "2"] {
            let e = mesh(&["--encrypt-network", bad]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ValueValidation, "{bad:?}: {e}");
        }
        // --no-fastdp stays a plain flag on the command line.
        assert!(mesh(&["--no-fastdp"]).unwrap().no_fastdp);
        assert!(mesh(&["--no-fastdp", "10.0.0.1"]).unwrap().no_fastdp);
    }

    #[test]
    fn kube_peers_lists_split_on_whitespace() {
        assert_eq!(
            split_peer_list(" 10.0.0.1  node2:7000\n\t[fd00::3]:6783 ").unwrap(),
            ["10.0.0.1", "node2:7000", "[fd00::3]:6783"]
        );
        assert!(split_peer_list("").unwrap().is_empty());
        assert!(split_peer_list("   ").unwrap().is_empty());
        let e = split_peer_list("10.0.0.1 h:0").unwrap_err();
        assert!(e.contains("\"h:0\""), "{e}");
    }

    #[test]
    fn connect_and_forget_need_peers() {
        let c = Cli::try_parse_from(["weft", "connect", "10.0.0.1", "h2:6783"]).unwrap();
        match c.command {
            Command::Connect(t) => assert_eq!(t.peers, ["10.0.0.1", "h2:6783"]),
            other => panic!("parsed as {other:?}"),
        }
        let e = Cli::try_parse_from(["weft", "forget"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn cipher_speed_defaults_and_bounds() {
        match Cli::try_parse_from(["weft", "cipher-speed"])
            .unwrap()
            .command
        {
            Command::CipherSpeed(a) => {
                assert_eq!((a.datagram_len, a.millis, a.json), (1472, 1000, false));
            }
            other => panic!("parsed as {other:?}"),
        }
        let ok = [
            "weft",
            "cipher-speed",
            "--datagram-len",
            "65507",
            "--millis",
            "1",
        ];
        assert!(Cli::try_parse_from(ok).is_ok());
        for bad in [
            ["--datagram-len", "63"],
            ["--datagram-len", "65508"],
            ["--millis", "0"],
            ["--millis", "60001"],
        ] {
            let e = Cli::try_parse_from(["weft", "cipher-speed", bad[0], bad[1]]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ValueValidation, "{bad:?}");
        }
    }

    #[test]
    fn bad_peer_name_is_a_clap_error() {
        let e = Cli::try_parse_from(["weft", "run", "--name", "host1", "--peers-file", "p"])
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ValueValidation);
        let text = e.to_string();
        assert!(
            text.contains("invalid value 'host1' for '--name <PEERNAME>'"),
            "{text}"
        );
        assert!(text.contains("is not a peer name"), "{text}");
    }

    #[test]
    fn mtu_and_port_ranges() {
        for bad in ["575", "65001", "0", "abc"] {
            let e = run(&["--mtu", bad]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ValueValidation, "--mtu {bad}");
        }
        // A negative number reads as an unknown flag; rejected all the same.
        assert!(run(&["--mtu", "-1"]).is_err());
        assert!(
            run(&["--mtu", "575"])
                .unwrap_err()
                .to_string()
                .contains("576..=65000")
        );
        for bad in ["0", "65535", "70000"] {
            let e = run(&["--port", bad]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ValueValidation, "--port {bad}");
        }
    }

    #[test]
    fn interface_names() {
        for bad in [
            "",
            ".",
            "..",
            "a/b",
            "a:b",
            "a b",
            "a\tb",
            "abcdefghijklmnop",
        ] {
            assert!(parse_ifname(bad).is_err(), "{bad:?}");
            let e = run(&["--bridge", bad]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ValueValidation, "--bridge {bad:?}");
            let e = run(&["--iface", bad]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ValueValidation, "--iface {bad:?}");
        }
        assert_eq!(
            parse_ifname("abcdefghijklmnop").unwrap_err(),
            "an interface name is at most 15 bytes, \"abcdefghijklmnop\" has 16"
        );
        assert_eq!(
            parse_ifname("a:b").unwrap_err(),
            "an interface name cannot contain ':' (nor '/', ':' or whitespace)"
        );
        for good in ["weave", "eth0", "br-0.1", "x"] {
            assert_eq!(parse_ifname(good).unwrap(), good);
        }
    }

    #[test]
    fn status_forms() {
        let s = status(&[]).unwrap();
        assert_eq!(s.what, None);
        assert!(!s.json);
        assert_eq!(s.socket, PathBuf::from("/run/weft/weft.sock"));

        let s = status(&["connections"]).unwrap();
        assert_eq!(s.what, Some(StatusWhat::Connections));
        let s = status(&["peers", "--json", "--socket", "/x.sock"]).unwrap();
        assert_eq!(s.what, Some(StatusWhat::Peers));
        assert!(s.json);
        assert_eq!(s.socket, PathBuf::from("/x.sock"));

        let e = status(&["dns"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidValue);
    }

    #[test]
    fn ipalloc_flags() {
        let r = mesh(&[
            "--ipalloc-range",
            "10.40.0.0/13",
            "--ipalloc-default-subnet",
            "10.32.0.0/12",
        ])
        .unwrap();
        let blocks = r.ipam().unwrap().unwrap();
        assert_eq!(blocks.range().to_string(), "10.40.0.0/13");
        assert_eq!(blocks.subnet().to_string(), "10.32.0.0/12");
        // Checked by clap: syntax and host bits; by ipam(): size and containment.
        assert!(mesh(&["--ipalloc-range", "10.40.0.1/13"]).is_err());
        assert!(mesh(&["--ipalloc-range", "bogus"]).is_err());
        assert!(mesh(&["--ipalloc-default-subnet", "10.32.0.0/12"]).is_err());
        let small = mesh(&["--ipalloc-range", "10.40.0.0/20"]).unwrap();
        assert!(small.ipam().unwrap_err().to_string().contains("too small"));
        let outside = mesh(&[
            "--ipalloc-range",
            "10.40.0.0/13",
            "--ipalloc-default-subnet",
            "10.32.0.0/13",
        ])
        .unwrap();
        assert!(outside.ipam().is_err());
        let install = |args: &[&str]| {
            let args = ["weft", "install-cni"].iter().chain(args);
            match Cli::try_parse_from(args)?.command {
                Command::InstallCni(a) => Ok(a),
                other => panic!("{other:?}"),
            }
        };
        let i: InstallCniArgs = install(&[]).map_err(|e: clap::Error| e).unwrap();
        assert_eq!(i.bin_dir, PathBuf::from("/opt/cni/bin"));
        assert_eq!(i.conf_dir, PathBuf::from("/etc/cni/net.d"));
        assert_eq!(i.data_dir, PathBuf::from("/var/lib/weft/ipam"));
        assert!(install(&["--ipalloc-range", "x"]).is_err());
    }

    #[test]
    fn subcommand_is_required() {
        let e = Cli::try_parse_from(["weft"]).unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        );
        let e = Cli::try_parse_from(["weft", "frobnicate"]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidSubcommand);
    }
}
