//! Mesh mode (`weft run [PEER...]`): weft as a peer of a Weave mesh.
//!
//! One task, the node, owns the mesh's state machine ([`Mesh`]), every connection's
//! overlays (the sleeve's [`SleeveForwarder`] and the fast datapath's
//! [`FastdpForwarder`]) and the choice between them, and keeps the eBPF datapath and
//! the sleeve's data path equal to that state. Everything else reports to it over a
//! channel: connection tasks ([`peering`]), the listener, dialling tasks, and the
//! sleeve's data path (special frames, fast-datapath heartbeats). It reads the clock
//! on a short tick, so timers of all state machines run from one place.
//!
//! Per connection, as Weave: the overlays both ends offer (fastdp first, then sleeve)
//! are each set up; traffic takes the fast datapath while its heartbeats are
//! acknowledged and keep arriving, else the sleeve. Between wefts heartbeats come every
//! 500 ms, so a blocked fast path falls back within about 3 s and returns as soon as
//! heartbeats arrive again. With a password, the fast datapath is offered only where
//! the kernel has ESP: its traffic is IPsec-encrypted ([`esp`], [`IpsecSession`]);
//! elsewhere every connection uses the encrypted sleeve, and status says why.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::mpsc;
use weft::{
    fastdp::{self, ControlOutcome, FastdpAction, FastdpForwarder},
    ipsec::{self, IpsecSession, SUBTAG_CRYPTO_INIT_SA_REMOTE},
    mesh::{
        PeerName, SessionKey, ShortId,
        connection::{ConnectionConfig, LocalIdentity, RemoteIntro},
        crypto::Password,
        gossip::{self, TOPOLOGY_CHANNEL},
        router::{Action, ConnInfo, ConnKey, DirectPeer, Mesh, MeshConfig, parse_host_port},
        topology::RandomSource,
        wire::Message,
    },
    sleeve::{SleeveAction, SleeveForwarder, forwarder::SpecialOutcome},
};
use weft_common::{maps::IPSEC_MARK, wire::vni};

use crate::{
    agent::{self, LocalPeer, Prepared},
    cli::RunArgs,
    control,
    datapath::{Datapath, LocalSettings, RemotePeer},
    esp::Esp,
    loader,
    maps::BpfMaps,
    netdev::Netdev,
    peering::{self, ConnEvent, ConnHandle},
    sleeve_io::{Dataplane, DataplaneEvent, PeerSpec, SpecialSendError},
    status::{Connection, IpsecStatus, Overlay, Status, Target, Traffic},
};

/// The node's clock tick: the granularity of every timer (heartbeats are 500 ms).
const TICK: Duration = Duration::from_millis(100);
/// How long a peer's datapath entry outlives its connection (or, after a restart,
/// an adopted entry waits for its peer to reconnect): a restart of either end does
/// not interrupt fast-datapath traffic.
const LINGER: Duration = Duration::from_secs(30);
/// How long the fast datapath must stay healthy before traffic moves (back) to it.
const FASTDP_HOLD: Duration = Duration::from_secs(1);
/// Most connection attempts in flight at once (discovery may name many peers).
const MAX_DIALS: usize = 32;
/// How often the status snapshot is rebuilt when nothing changes.
const SNAPSHOT_INTERVAL: Duration = Duration::from_millis(500);
/// Largest password file read.
const MAX_PASSWORD_FILE: u64 = 4096;

/// Name of the overlay carried in the kernel.
const FASTDP: &str = "fastdp";
/// Name of Weave's userspace overlay.
const SLEEVE: &str = "sleeve";

/// Randomness from the OS.
struct OsRandom;

impl RandomSource for OsRandom {
    fn next_u64(&mut self) -> u64 {
        random_u64()
    }
}

/// A random u64 from the OS.
pub(crate) fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // The kernel's CSPRNG does not fail once the system is up.
    getrandom::fill(&mut b).expect("getrandom");
    u64::from_ne_bytes(b)
}

/// 32 random bytes from the OS.
fn random_32() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("getrandom");
    b
}

/// The Secret the manifest passes as `WEAVE_PASSWORD` (Weave's name for it, so a
/// cluster moving from Weave keeps its Secret).
pub const PASSWORD_SECRET: &str = "weave-passwd";

/// The password, as the encryption switch decides: with `--encrypt-network=false`
/// none (a password given is ignored); otherwise `--password-file` (one trailing
/// newline dropped), else `WEAVE_PASSWORD`, and with `--encrypt-network=true` one
/// must be given. Never logged.
fn load_password(args: &RunArgs) -> anyhow::Result<Option<Password>> {
    let env_password = || std::env::var_os("WEAVE_PASSWORD").filter(|p| !p.is_empty());
    if args.encrypt_network == Some(false) {
        if args.password_file.is_some() || env_password().is_some() {
            tracing::info!(
                "encryption is off (--encrypt-network=false): the password given is ignored"
            );
        }
        return Ok(None);
    }
    let password = match &args.password_file {
        Some(path) => Some(read_password_file(path)?),
        None => env_password().map(|p| Password::new(std::os::unix::ffi::OsStringExt::into_vec(p))),
    };
    if password.is_none() && args.encrypt_network == Some(true) {
        bail!(
            "encryption is on (--encrypt-network=true, or WEFT_ENCRYPT_NETWORK) but no \
             password is set: on Kubernetes create the Secret {PASSWORD_SECRET} in the \
             agent's namespace (kubectl -n kube-system create secret generic \
             {PASSWORD_SECRET} --from-file={PASSWORD_SECRET}=FILE), which the manifest \
             passes as WEAVE_PASSWORD; elsewhere set WEAVE_PASSWORD or --password-file; \
             or run unencrypted with --encrypt-network=false"
        );
    }
    Ok(password)
}

/// Reads a password file: at most [`MAX_PASSWORD_FILE`] bytes, one trailing newline
/// dropped, not empty.
fn read_password_file(path: &std::path::Path) -> anyhow::Result<Password> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PASSWORD_FILE + 1).read_to_end(&mut bytes))
        .with_context(|| format!("reading the password file {}", path.display()))?;
    if bytes.len() as u64 > MAX_PASSWORD_FILE {
        bail!(
            "the password file {} is longer than {MAX_PASSWORD_FILE} bytes",
            path.display()
        );
    }
    if bytes.ends_with(b"\n") {
        bytes.pop();
        if bytes.ends_with(b"\r") {
            bytes.pop();
        }
    }
    if bytes.is_empty() {
        bail!("the password file {} is empty", path.display());
    }
    Ok(Password::new(bytes))
}

/// The host name, for the default nickname.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// Weave's default peer name: the MAC of a bridge weft made (weft gives it the
/// peer's name, as Weave does), else one derived from the machine's IDs
/// (`/etc/machine-id` and the DMI/hypervisor UUID) so it is stable across restarts,
/// else random.
async fn default_name(net: &Netdev, bridge: &str) -> anyhow::Result<PeerName> {
    if let Some(link) = net.link(bridge).await?
        && link.is_ours()
        && link.mac != [0; 6]
    {
        return Ok(PeerName(link.mac));
    }
    let read = |paths: &[&str]| {
        paths
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .unwrap_or_default()
    };
    let machine_id = read(&["/etc/machine-id", "/var/lib/dbus/machine-id"]);
    let uuid = read(&["/sys/class/dmi/id/product_uuid", "/sys/hypervisor/uuid"]);
    let mut system_id = machine_id;
    system_id.extend_from_slice(&uuid);
    Ok(if system_id.is_empty() {
        let b = random_u64().to_be_bytes();
        PeerName::from_system_id(&b)
    } else {
        PeerName::from_system_id(&system_id)
    })
}

/// `weft run` in mesh mode.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    // 1. Checks that change nothing.
    let password = load_password(&args)?;
    let peer_specs = args.initial_peers().map_err(anyhow::Error::msg)?;
    #[cfg(not(feature = "kubernetes"))]
    if args.kube_peers {
        bail!(
            "--kube-peers (WEFT_KUBE_PEERS): this weft was built without the `kubernetes` \
             feature; give the peers in KUBE_PEERS or as arguments"
        );
    }
    let net = Netdev::connect()?;
    let (underlay, addrs) = agent::underlay(&args, &net).await?;
    let Some(&(address, _)) = addrs.first() else {
        bail!(
            "{} has no IPv4 address: peers could not reach this host (--iface)",
            underlay.name
        );
    };
    let name = match args.name {
        Some(name) => name,
        None => default_name(&net, &args.bridge).await?,
    };
    let nickname = args.nickname.clone().unwrap_or_else(hostname);
    #[cfg(feature = "kubernetes")]
    let kube = match args.kube_peers {
        true => {
            let me = crate::kube_peers::Me {
                node_name: nickname.clone(),
                addresses: addrs.iter().map(|(a, _)| *a).collect(),
            };
            let follower = crate::kube_peers::Follower::new(me, peer_specs.clone()).await?;
            Some(follower.with_interval(Duration::from_secs(args.kube_peers_interval)))
        }
        false => None,
    };
    let mut targets = Vec::new();
    for spec in &peer_specs {
        targets.push(resolve_target(spec, args.port).await?);
    }
    let Prepared {
        pins,
        lock: _lock,
        mut rollback,
        mut ebpf,
        socket,
        mut signals,
        http,
    } = agent::prepare(&args, &net).await?;

    // 2. Kernel state: bridge, the sleeve's TAP device, the datapath.
    let setup = async {
        let bridge = agent::bridge(&args, &net, &mut rollback).await?;
        if bridge.is_ours() && bridge.mac != name.0 {
            // As Weave does: the bridge carries the peer's name, which keeps the
            // default name stable across restarts.
            net.set_mac(bridge.index, name.0).await?;
        }
        let tap = crate::tap::Tap::create(SLEEVE_DEVICE, Some(u32::from(args.mtu)))
            .with_context(|| format!("creating the sleeve's TAP device {SLEEVE_DEVICE}"))?;
        let tap_index = tap.ifindex()?;
        net.set_up(tap_index, Some(u32::from(args.mtu)), Some(bridge.index))
            .await
            .with_context(|| format!("attaching {SLEEVE_DEVICE} to {}", args.bridge))?;
        // The ShortID and the peers an earlier run left are kept (peers' datapaths
        // name this host; traffic goes on while the mesh reconnects).
        let local = LocalPeer {
            name,
            short_id: None,
            address,
            sleeve_ifindex: tap_index,
        };
        let (datapath, settings) =
            agent::setup(&args, &net, &local, None, &pins, &mut ebpf, &mut rollback).await?;
        let lingering = datapath.peers();
        anyhow::Ok((tap, datapath, settings, lingering))
    }
    .await;
    let stop = match &setup {
        Ok(_) => signals.pending_stop().await,
        Err(_) => None,
    };
    let (tap, mut datapath, settings, lingering) = match (setup, stop) {
        (Ok(ready), None) => ready,
        (outcome, stop) => {
            if let Some(sig) = stop {
                tracing::info!("{sig} during setup: undoing it");
            }
            // The TAP device goes first (with its fd), so a bridge this run made
            // has no port left and goes too.
            let outcome = outcome.map(drop);
            drop(ebpf);
            rollback.run(&net).await;
            return outcome;
        }
    };

    // 3. The mesh's sockets: a port taken (another Weave router on this host, say)
    //    undoes the set-up, as any failure before the datapath is complete does.
    let (events_tx, events) = mpsc::unbounded_channel();
    let (dp_tx, dp_events) = mpsc::unbounded_channel();
    let sockets = (|| {
        let listener = peering::listen(args.port)
            .with_context(|| format!("listening on TCP port {}", args.port))?;
        let fastdp_socket =
            heartbeat_socket(address, None).context("opening the fast-datapath socket")?;
        let dataplane = Dataplane::start(tap, args.port, name, dp_tx)
            .context("starting the sleeve's data path (UDP 6783)")?;
        anyhow::Ok((listener, fastdp_socket, dataplane))
    })();
    let (listener, fastdp_socket, dataplane) = match sockets {
        Ok(s) => s,
        Err(e) => {
            drop(datapath);
            drop(ebpf);
            rollback.run(&net).await;
            return Err(e);
        }
    };
    drop(rollback);
    let uid = random_u64() | 1;
    let now = Instant::now();
    let mut config = MeshConfig::new(name, nickname.clone(), uid, settings.short_id);
    config.port = args.port;
    config.conn_limit = args.conn_limit;
    let mut mesh = Mesh::new(config, now, Box::new(OsRandom));
    mesh.set_local_addresses([IpAddr::V4(address)]);
    // With a password the fast datapath needs ESP.
    let (esp, fastdp_unavailable) = match (&password, args.no_fastdp) {
        (Some(_), false) => match Esp::start(address, &underlay.name, LINGER, now) {
            Ok(esp) => (Some(esp), None),
            Err(e) => (None, Some(e.to_string())),
        },
        _ => (None, None),
    };
    if esp.is_some() {
        let needed = u32::from(args.mtu) + u32::from(ESP_OVERHEAD_MAX) + 50;
        if underlay.mtu < needed {
            tracing::warn!(
                "--mtu {} with IPsec needs an underlay MTU of at least {needed} (VXLAN and up \
                 to {ESP_OVERHEAD_MAX} bytes of ESP), but {} has {}: the fast datapath's \
                 heartbeats will not fit, so connections use the sleeve (lower --mtu; \
                 Weave's default 1376 fits a 1500-byte underlay)",
                args.mtu,
                underlay.name,
                underlay.mtu
            );
        }
    }
    // An earlier run's peers keep forwarding while they reconnect, unless the
    // encryption changed: a plaintext entry would carry pod traffic in clear with a
    // password set, an encrypted one cannot work without IPsec. They go from the
    // datapath before weft's XFRM state (an encrypted entry without its policies
    // would send in clear).
    let lingering: Vec<RemotePeer> = lingering
        .into_iter()
        .filter(|p| {
            if p.encrypted {
                esp.is_some()
            } else {
                password.is_none()
            }
        })
        .collect();
    if let Err(e) = datapath.apply(&settings, &lingering) {
        tracing::warn!("dropping an earlier run's peers of another encryption setting: {e}");
    }
    // The underlay guards, a check of the datapath's own beside XFRM's: on while the
    // fast datapath is encrypted, off otherwise (an earlier run's, perhaps on
    // another interface, removed).
    if esp.is_some() {
        match loader::attach_guards(&mut ebpf, &pins, underlay.index) {
            Ok(()) => tracing::info!(
                iface = %underlay.name,
                "underlay guards attached: marked plaintext VXLAN never leaves, plaintext \
                 VXLAN from encrypted peers never enters"
            ),
            Err(e) => tracing::error!(
                iface = %underlay.name,
                error = %format!("{:#}", anyhow::Error::from(e)),
                "attaching the underlay guards failed; XFRM's block policy alone keeps \
                 marked traffic from leaving in clear"
            ),
        }
    } else {
        let ifindexes = match loader::uses_tcx() {
            true => Vec::new(),
            false => net.links().await.map_or_else(
                |_| Vec::new(),
                |links| links.into_iter().map(|l| l.index).collect(),
            ),
        };
        let n = loader::detach_guards(&pins, ifindexes);
        if n > 0 {
            tracing::info!("removed {n} underlay guard attachments of an earlier run");
        }
    }
    drop(ebpf);
    if esp.is_none() {
        match Esp::remove_all() {
            Ok(0) => {}
            Ok(n) => tracing::info!("removed {n} XFRM entries of an earlier run of weft"),
            Err(e) => tracing::warn!("removing weft's XFRM state of an earlier run: {e}"),
        }
    }
    let marked_socket = match esp {
        Some(_) => Some(
            heartbeat_socket(address, Some(IPSEC_MARK))
                .context("opening the encrypted fast datapath's heartbeat socket")?,
        ),
        None => None,
    };
    let fastdp_enabled = !args.no_fastdp && (password.is_none() || esp.is_some());
    let overlays = if fastdp_enabled {
        format!("{FASTDP} {SLEEVE}")
    } else {
        SLEEVE.to_owned()
    };
    tracing::info!(
        %name,
        nickname = %nickname,
        short_id = settings.short_id,
        %address,
        encryption = password.is_some(),
        overlays = %overlays,
        "weft: joining the mesh"
    );
    match (&password, &fastdp_unavailable) {
        (Some(_), Some(reason)) => tracing::warn!(
            "a password is set: connections and the sleeve are encrypted; the fast \
             datapath is not offered ({reason}), so traffic uses the encrypted sleeve"
        ),
        (Some(_), None) if esp.is_some() => tracing::info!(
            "a password is set: connections, the sleeve and the fast datapath (IPsec ESP) \
             are encrypted"
        ),
        _ => {}
    }
    let shared = Arc::new(Mutex::new(Status::default_for(name, &nickname)));
    let mut node = Node {
        mesh,
        conns: HashMap::new(),
        next_conn: 1,
        identity: LocalIdentity {
            name,
            nickname,
            uid,
            short_id: Some(settings.short_id),
        },
        password,
        overlays,
        port: args.port,
        mtu: args.mtu,
        address,
        events_tx: events_tx.clone(),
        datapath,
        settings,
        dataplane,
        fastdp_socket,
        marked_socket,
        esp,
        fastdp_unavailable,
        rekey_interval: Duration::from_secs(args.ipsec_rekey_interval),
        lingering: lingering
            .into_iter()
            .map(|p| (p.short_id, (p, now + LINGER)))
            .collect(),
        status: shared.clone(),
        dialling: 0,
        next_snapshot: now,
        dirty: true,
        ipam: args.ipam()?,
        bridge: args.bridge.clone(),
        net: net.clone(),
    };
    let actions = node.mesh.add_targets(now, targets, false);
    node.apply(actions, now);

    let server = tokio::spawn(socket.serve(NodeHandler {
        status: shared.clone(),
        events: events_tx.clone(),
    }));
    let source: Arc<dyn crate::api::StatusSource> = Arc::new(move || {
        shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    });
    let http = agent::serve_http(http, source);
    tokio::spawn(accept_loop(listener, events_tx.clone()));
    #[cfg(feature = "kubernetes")]
    let kube = kube.map(|follower| {
        let events = events_tx.clone();
        tokio::spawn(follower.run(move |change| {
            let send = |connect: bool, specs: Vec<String>| {
                if specs.is_empty() {
                    return Ok(());
                }
                let peers = match connect {
                    true => specs
                        .iter()
                        .filter_map(|s| DirectPeer::parse_literal(s).ok())
                        .collect(),
                    false => Vec::new(),
                };
                events
                    .send(Input::Targets {
                        connect,
                        peers,
                        specs,
                    })
                    .map_err(|_| "the agent is stopping".to_owned())
            };
            send(true, change.added)?;
            send(false, change.removed)
        }))
    });
    let outcome = node.serve(events, dp_events, &mut signals).await;
    for task in &http {
        task.abort();
    }
    #[cfg(feature = "kubernetes")]
    if let Some(task) = kube {
        task.abort();
    }
    server.abort();
    let _ = server.await;
    outcome
}

/// Name of the sleeve's TAP device, a port of the bridge.
pub const SLEEVE_DEVICE: &str = "weft-sleeve";

/// Resolves `host[:port]` (host names through the system resolver).
async fn resolve_target(spec: &str, port: u16) -> anyhow::Result<DirectPeer> {
    if let Ok(peer) = DirectPeer::parse_literal(spec) {
        return Ok(peer);
    }
    let (host, p) = parse_host_port(spec)?;
    let p = p.unwrap_or(port);
    let addr = tokio::net::lookup_host((host.as_str(), p))
        .await
        .with_context(|| format!("resolving peer {spec:?}"))?
        .find(SocketAddr::is_ipv4)
        .with_context(|| format!("peer {spec:?} has no IPv4 address"))?;
    Ok(DirectPeer {
        spec: spec.to_owned(),
        ip: addr.ip(),
        port: Some(p),
    })
}

/// A UDP socket for fast-datapath heartbeats: from our underlay address, DF set
/// (they prove the path MTU); with `mark`, for encrypted peers (the mark makes their
/// XFRM policy put the heartbeats into ESP, as the datapath's frames).
fn heartbeat_socket(address: Ipv4Addr, mark: Option<u32>) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::AsRawFd;
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let set = |level: libc::c_int, option: libc::c_int, value: libc::c_int| {
        // SAFETY: a valid socket descriptor and an option value of the size given.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                level,
                option,
                (&raw const value).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    set(
        libc::IPPROTO_IP,
        libc::IP_MTU_DISCOVER,
        libc::IP_PMTUDISC_DO,
    )?;
    if let Some(mark) = mark {
        set(libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int)?;
    }
    socket.bind(&SocketAddr::from((address, 0)).into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Accepts connections and hands them to the node (which applies the rate limit).
async fn accept_loop(listener: tokio::net::TcpListener, events: mpsc::UnboundedSender<Input>) {
    loop {
        match listener.accept().await {
            Ok((stream, from)) => {
                if events.send(Input::Accepted(stream, from)).is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "mesh listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What reaches the node.
#[derive(Debug)]
enum Input {
    /// An inbound TCP connection.
    Accepted(tokio::net::TcpStream, SocketAddr),
    /// A dial finished.
    Dialled(SocketAddr, Result<tokio::net::TcpStream, String>),
    /// A connection task's report.
    Conn(ConnKey, ConnEvent),
    /// `weft connect` / `weft forget`.
    Targets {
        connect: bool,
        peers: Vec<DirectPeer>,
        specs: Vec<String>,
    },
}

fn wrap(conn: ConnKey, event: ConnEvent) -> Input {
    Input::Conn(conn, event)
}

/// One TCP connection as the node sees it.
struct Conn {
    handle: ConnHandle,
    outbound: bool,
    remote: SocketAddr,
    ready: Option<Ready>,
}

/// Most bytes transport-mode ESP with `rfc4106(gcm(aes))` adds to a packet: SPI and
/// sequence number 8, IV 8, padding up to 3, pad length and next header 2, ICV 16.
const ESP_OVERHEAD_MAX: u16 = 37;
/// A connection past its handshake, with its overlays.
struct Ready {
    name: PeerName,
    nickname: String,
    short_id: Option<ShortId>,
    conn_uid: u64,
    key: Option<SessionKey>,
    /// The remote sent no `Overlays`: sleeve control messages are bare tags 1..3.
    compat: bool,
    sleeve: Option<(u8, SleeveForwarder)>,
    fastdp: Option<(u8, FastdpForwarder)>,
    /// The fast datapath's IPsec (with a password).
    ipsec: Option<IpsecSession>,
    /// The last IPsec error of the fast datapath (cleared by a success), for status.
    ipsec_error: Option<String>,
    /// The last heartbeat send error (cleared by a send that works), for status.
    heartbeat_error: Option<String>,
    /// Reported established to the mesh.
    established: bool,
    /// The fast datapath carries the traffic now.
    on_fastdp: bool,
    /// Since when the fast datapath has been healthy without a break.
    healthy_since: Option<Instant>,
}

impl Ready {
    fn label(&self) -> String {
        format!("{}({})", self.name, self.nickname)
    }

    /// The overlay carrying traffic now, if any.
    fn overlay(&self) -> Option<&'static str> {
        if self.on_fastdp {
            Some(FASTDP)
        } else if self
            .sleeve
            .as_ref()
            .is_some_and(|(_, s)| s.is_established())
        {
            Some(SLEEVE)
        } else {
            None
        }
    }
}

/// The node: see the module documentation.
struct Node {
    mesh: Mesh,
    conns: HashMap<ConnKey, Conn>,
    next_conn: ConnKey,
    identity: LocalIdentity,
    password: Option<Password>,
    overlays: String,
    port: u16,
    mtu: u16,
    address: Ipv4Addr,
    events_tx: mpsc::UnboundedSender<Input>,
    datapath: Datapath<BpfMaps>,
    settings: LocalSettings,
    dataplane: Dataplane,
    fastdp_socket: std::net::UdpSocket,
    /// The heartbeat socket for encrypted peers (its packets carry the IPsec mark).
    marked_socket: Option<std::net::UdpSocket>,
    /// The fast datapath's XFRM state, with a password on a kernel with ESP.
    esp: Option<Esp>,
    /// Why the fast datapath is not offered at all (a password, but no ESP).
    fastdp_unavailable: Option<String>,
    /// How often IPsec keys are renewed (between wefts; Weave never rekeys).
    rekey_interval: Duration,
    /// Datapath entries kept for a while without a connection: ShortID -> (entry,
    /// until).
    lingering: BTreeMap<ShortId, (RemotePeer, Instant)>,
    status: Arc<Mutex<Status>>,
    /// Connection attempts in flight.
    dialling: usize,
    /// When the status snapshot is rebuilt next (counters move on their own).
    next_snapshot: Instant,
    /// The datapath, the sleeve's peers or the status need a refresh.
    dirty: bool,
    /// Netlink, for the bridge's address.
    net: Netdev,
    /// The bridge's name.
    bridge: String,
    /// The IPAM blocks (`--ipalloc-range`).
    ipam: Option<crate::ipam::Blocks>,
}

impl Node {
    /// Runs until SIGTERM/SIGINT.
    async fn serve(
        mut self,
        mut events: mpsc::UnboundedReceiver<Input>,
        mut dp_events: mpsc::UnboundedReceiver<DataplaneEvent>,
        signals: &mut agent::Signals,
    ) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = signals.term.recv() => break self.stop("SIGTERM"),
                _ = signals.int.recv() => break self.stop("SIGINT"),
                _ = signals.hup.recv() => {
                    tracing::info!("SIGHUP: nothing to reload in mesh mode (use weft connect/forget)");
                }
                Some(input) = events.recv() => self.on_input(input, Instant::now()),
                Some(event) = dp_events.recv() => self.on_dataplane(event, Instant::now()),
                _ = tick.tick() => self.on_tick(Instant::now()),
            }
            if self.dirty {
                self.dirty = false;
                self.sync(Instant::now());
            }
        }
        Ok(())
    }

    fn stop(&mut self, sig: &str) {
        tracing::info!(
            "{sig}: stopping the agent; the fast datapath keeps forwarding (weft reset removes it)"
        );
        for conn in self.conns.values() {
            conn.handle.close();
        }
    }

    fn on_input(&mut self, input: Input, now: Instant) {
        // A message changes the datapath or status only through what it makes the
        // mesh or an overlay do (they mark the node dirty themselves); anything else
        // (a connection starting or ending, targets) refreshes it.
        if !matches!(input, Input::Conn(_, ConnEvent::Message(_))) {
            self.dirty = true;
        }
        match input {
            Input::Accepted(stream, from) => {
                if !self.mesh.accept_allowed(now) {
                    tracing::debug!(%from, "connection refused: accept rate limit");
                    return;
                }
                self.start_connection(stream, from, false);
            }
            Input::Dialled(addr, Ok(stream)) => {
                self.dialling = self.dialling.saturating_sub(1);
                self.start_connection(stream, addr, true);
            }
            Input::Dialled(addr, Err(reason)) => {
                self.dialling = self.dialling.saturating_sub(1);
                tracing::info!("->[{addr}] attempt failed: {reason}");
                let actions = self.mesh.dial_failed(now, addr, &reason);
                self.apply(actions, now);
            }
            Input::Conn(conn, event) => self.on_conn(conn, event, now),
            Input::Targets {
                connect,
                peers,
                specs,
            } => {
                let actions = if connect {
                    self.mesh.add_targets(now, peers, false)
                } else {
                    self.mesh.forget_targets(now, &specs)
                };
                self.apply(actions, now);
            }
        }
    }

    fn start_connection(
        &mut self,
        stream: tokio::net::TcpStream,
        remote: SocketAddr,
        outbound: bool,
    ) {
        let conn = self.next_conn;
        self.next_conn += 1;
        let config = ConnectionConfig {
            identity: LocalIdentity {
                short_id: Some(self.mesh.local().short_id.unwrap_or(self.settings.short_id)),
                ..self.identity.clone()
            },
            password: self.password.clone(),
            overlays: Some(self.overlays.clone()),
            trusted: false,
            fast_heartbeat: self.overlays.starts_with(FASTDP),
            outbound,
            conn_id: random_u64(),
            key_random: random_32(),
        };
        let handle = peering::spawn_connection(conn, stream, config, self.events_tx.clone(), wrap);
        self.conns.insert(
            conn,
            Conn {
                handle,
                outbound,
                remote,
                ready: None,
            },
        );
    }

    fn on_conn(&mut self, conn: ConnKey, event: ConnEvent, now: Instant) {
        match event {
            ConnEvent::Ready(intro) => self.on_ready(conn, *intro, now),
            ConnEvent::Message(msg) => self.on_message(conn, msg, now),
            ConnEvent::Closed { reason, ready } => {
                let Some(mut c) = self.conns.remove(&conn) else {
                    return;
                };
                let who = c.ready.as_ref().map_or_else(
                    || c.remote.to_string(),
                    |r| format!("{}|{}", c.remote, r.label()),
                );
                let arrow = if c.outbound { "->" } else { "<-" };
                tracing::info!("{arrow}[{who}]: connection shutting down due to error: {reason}");
                self.linger(&mut c, now);
                let actions = if ready {
                    self.mesh.connection_closed(now, conn, &reason)
                } else if c.outbound {
                    self.mesh.handshake_failed(now, c.remote, &reason)
                } else {
                    Vec::new()
                };
                self.apply(actions, now);
            }
        }
    }

    /// Keeps a closed connection's datapath entry for [`LINGER`], so traffic on the
    /// fast datapath goes on while the peer (or this agent) restarts and reconnects.
    fn linger(&mut self, c: &mut Conn, now: Instant) {
        let Some(r) = c.ready.as_mut() else { return };
        if let (Some(session), Some(esp), IpAddr::V4(addr)) =
            (r.ipsec.take(), self.esp.as_mut(), c.remote.ip())
        {
            esp.retire(addr, session, now + LINGER);
        }
        if let (Some(short_id), IpAddr::V4(addr)) = (r.short_id, c.remote.ip()) {
            let entry = RemotePeer {
                short_id,
                addr,
                sleeve: !r.on_fastdp,
                no_fastdp: r.fastdp.is_none(),
                encrypted: r.key.is_some(),
            };
            self.lingering.insert(short_id, (entry, now + LINGER));
        }
    }

    fn on_ready(&mut self, conn: ConnKey, intro: RemoteIntro, now: Instant) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let features = &intro.features;
        let (outbound, remote) = (c.outbound, c.remote);
        // The overlays both ends offer, in Weave's order (fastdp, sleeve).
        let shared: Vec<&str> = match &features.overlays {
            None => vec![SLEEVE],
            Some(theirs) => self
                .overlays
                .split_whitespace()
                .filter(|o| theirs.iter().any(|t| t == o))
                .collect(),
        };
        if shared.is_empty() {
            c.handle.close();
            let reason = "no overlays in common with peer";
            tracing::info!("connection to {remote} refused: {reason}");
            self.conns.remove(&conn);
            if outbound {
                let actions = self.mesh.handshake_failed(now, remote, reason);
                self.apply(actions, now);
            }
            return;
        }
        let info = ConnInfo {
            name: features.name,
            nickname: features.nickname.clone(),
            uid: features.uid,
            short_id: features.short_id,
            conn_uid: intro.conn_uid,
            remote_addr: remote,
            outbound,
        };
        let actions = self.mesh.connection_ready(now, conn, info);
        let rejected = actions
            .iter()
            .any(|a| matches!(a, Action::Close { conn: k, .. } if *k == conn));
        if !rejected {
            let key = intro.session_key.clone();
            let sleeve_index = shared.iter().position(|o| *o == SLEEVE);
            let fastdp_index = shared.iter().position(|o| *o == FASTDP);
            // The sleeve's UDP address: the TCP address we dialled (Weave listens on the
            // same port for both); an inbound peer's is learnt from its heartbeats.
            let udp = outbound.then_some(remote);
            let sleeve = sleeve_index.map(|i| {
                (
                    i as u8,
                    SleeveForwarder::new(
                        self.identity.name,
                        features.name,
                        intro.conn_uid,
                        outbound,
                        key.as_ref(),
                        udp,
                        now,
                    ),
                )
            });
            let fastdp = fastdp_index
                .filter(|_| features.short_id.is_some() && remote.is_ipv4())
                .map(|i| {
                    (
                        i as u8,
                        FastdpForwarder::new(
                            intro.conn_uid,
                            self.mtu,
                            features.fast_heartbeat,
                            now,
                        ),
                    )
                });
            // With a password the fast datapath is IPsec-encrypted; keys are renewed
            // only between wefts (a weaver handles one exchange per connection).
            let ipsec = match (&fastdp, &key, &self.esp) {
                (Some(_), Some(session_key), Some(_)) => Some(IpsecSession::new(
                    self.identity.name,
                    features.name,
                    session_key.clone(),
                    features.fast_heartbeat.then_some(self.rekey_interval),
                    now,
                )),
                _ => None,
            };
            let arrow = if outbound { "->" } else { "<-" };
            tracing::info!(
                "{arrow}[{remote}|{}({})]: connection ready; overlays: {}",
                features.name,
                features.nickname,
                shared.join(" ")
            );
            if let Some(c) = self.conns.get_mut(&conn) {
                c.ready = Some(Ready {
                    name: features.name,
                    nickname: features.nickname.clone(),
                    short_id: features.short_id,
                    conn_uid: intro.conn_uid,
                    key,
                    compat: features.overlays.is_none(),
                    sleeve,
                    fastdp,
                    ipsec,
                    ipsec_error: None,
                    heartbeat_error: None,
                    established: false,
                    on_fastdp: false,
                    healthy_since: None,
                });
            }
        }
        self.apply(actions, now);
        self.poll_overlays(conn, now);
    }

    fn on_message(&mut self, conn: ConnKey, msg: Message, now: Instant) {
        match msg {
            Message::Heartbeat => {}
            Message::Gossip {
                channel, payload, ..
            }
            | Message::GossipBroadcast {
                channel, payload, ..
            } if channel == TOPOLOGY_CHANNEL => match gossip::decode_topology(&payload) {
                Ok(updates) => {
                    let actions = self.mesh.topology_received(now, conn, updates);
                    self.apply(actions, now);
                }
                Err(e) => self.close(conn, &format!("topology gossip: {e}")),
            },
            Message::GossipUnicast { channel, .. } if channel == TOPOLOGY_CHANNEL => {
                self.close(conn, "unexpected topology gossip unicast");
            }
            // IPAM and DNS gossip: not weft's concern.
            Message::Gossip { .. }
            | Message::GossipUnicast { .. }
            | Message::GossipBroadcast { .. } => {}
            Message::CompatSleeve { tag, body } => {
                self.on_overlay_control(conn, None, tag, &body, now)
            }
            Message::OverlayControl {
                index,
                subtag,
                body,
            } => self.on_overlay_control(conn, Some(index), subtag, &body, now),
        }
    }

    fn on_overlay_control(
        &mut self,
        conn: ConnKey,
        index: Option<u8>,
        subtag: u8,
        body: &[u8],
        now: Instant,
    ) {
        let Some(r) = self.conns.get_mut(&conn).and_then(|c| c.ready.as_mut()) else {
            return;
        };
        let label = r.label();
        let fastdp_index = r.fastdp.as_ref().map(|(i, _)| *i);
        match (index, r.fastdp.as_mut()) {
            (Some(i), Some(_))
                if fastdp_index == Some(i) && subtag == SUBTAG_CRYPTO_INIT_SA_REMOTE =>
            {
                let outcome = r.ipsec.as_mut().map(|s| s.on_sa_init(body, now));
                match outcome {
                    Some(Ok(actions)) => self.ipsec_actions(conn, actions, now),
                    Some(Err(e)) => {
                        tracing::warn!("[{label}]: fastdp: IPsec: {e}");
                        if let Some(r) = self.conns.get_mut(&conn).and_then(|c| c.ready.as_mut()) {
                            r.ipsec_error = Some(e.to_string());
                        }
                    }
                    None => tracing::warn!(
                        "[{label}]: the peer asked for IPsec on the fast datapath without a \
                         password here: its fast datapath stays down, traffic uses the sleeve"
                    ),
                }
            }
            (Some(i), Some((_, fwd))) if fastdp_index == Some(i) => {
                match fwd.on_control(subtag, now) {
                    Ok(ControlOutcome::Acknowledged) => {
                        tracing::info!("[{label}]: fastdp: heartbeats acknowledged");
                    }
                    Ok(ControlOutcome::Repeated) => {}
                    Ok(ControlOutcome::Unsupported) => tracing::warn!(
                        "[{label}]: the peer asked for IPsec on the fast datapath, which weft does \
                         not do yet: its traffic stays on the sleeve"
                    ),
                    Err(e) => tracing::warn!("[{label}]: {e}"),
                }
            }
            (Some(i), _) if r.sleeve.as_ref().is_none_or(|(si, _)| *si != i) => {
                tracing::warn!(
                    "[{label}]: overlay control message for unknown overlay {i}; ignored"
                );
            }
            _ => {
                if let Some((_, fwd)) = r.sleeve.as_mut()
                    && let Err(e) = fwd.on_control(subtag, body, now)
                {
                    tracing::warn!("[{label}]: sleeve: {e}");
                }
            }
        }
        self.poll_overlays(conn, now);
    }

    fn on_dataplane(&mut self, event: DataplaneEvent, now: Instant) {
        match event {
            DataplaneEvent::Special {
                sender,
                from,
                frame,
            } => {
                let Some((conn, r)) = self
                    .conns
                    .iter_mut()
                    .filter_map(|(k, c)| c.ready.as_mut().map(|r| (*k, r)))
                    .find(|(_, r)| r.name == sender)
                else {
                    return;
                };
                if let Some((_, fwd)) = r.sleeve.as_mut() {
                    match fwd.on_special_frame(from, &frame, now) {
                        Ok(SpecialOutcome::WrongConnUid(_)) | Err(_) => {}
                        Ok(_) => {}
                    }
                }
                self.poll_overlays(conn, now);
            }
            DataplaneEvent::FastdpHeartbeat { conn_uid, hears_us } => {
                let Some(conn) = self
                    .conns
                    .iter()
                    .find(|(_, c)| c.ready.as_ref().is_some_and(|r| r.conn_uid == conn_uid))
                    .map(|(k, _)| *k)
                else {
                    return;
                };
                let actions = self
                    .conns
                    .get_mut(&conn)
                    .and_then(|c| c.ready.as_mut())
                    .and_then(|r| r.fastdp.as_mut())
                    .map(|(_, f)| f.on_heartbeat(now, hears_us))
                    .unwrap_or_default();
                self.fastdp_actions(conn, actions);
                self.poll_overlays(conn, now);
            }
        }
    }

    fn on_tick(&mut self, now: Instant) {
        if now >= self.mesh.next_deadline() {
            let actions = self.mesh.poll(now);
            self.apply(actions, now);
        }
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for conn in keys {
            self.poll_overlays(conn, now);
        }
        if let Some(esp) = self.esp.as_mut() {
            esp.poll(now);
        }
        let before = self.lingering.len();
        self.lingering.retain(|_, (_, until)| *until > now);
        if self.lingering.len() != before {
            self.dirty = true;
        }
        // Counters move without state changes: refresh the snapshot now and then.
        if now >= self.next_snapshot {
            self.publish_status(now);
        }
    }

    /// Rebuilds the status snapshot the control socket and HTTP endpoints serve.
    fn publish_status(&mut self, now: Instant) {
        self.next_snapshot = now + SNAPSHOT_INTERVAL;
        let status = self.snapshot();
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = status;
    }

    /// Runs a connection's overlay timers and acts on what they ask; re-evaluates
    /// which overlay carries its traffic.
    fn poll_overlays(&mut self, conn: ConnKey, now: Instant) {
        let Some(r) = self.conns.get_mut(&conn).and_then(|c| c.ready.as_mut()) else {
            return;
        };
        let sleeve_actions = r
            .sleeve
            .as_mut()
            .map(|(_, f)| f.poll(now))
            .unwrap_or_default();
        let fastdp_actions = r
            .fastdp
            .as_mut()
            .map(|(_, f)| f.poll(now))
            .unwrap_or_default();
        let ipsec_actions = r.ipsec.as_mut().map(|s| s.poll(now)).unwrap_or_default();
        // IPsec first: a sleeve or fast-datapath action may close the connection, and
        // the session's due deletions must not be lost with it.
        if !ipsec_actions.is_empty() {
            self.ipsec_actions(conn, ipsec_actions, now);
        }
        for action in sleeve_actions {
            self.sleeve_action(conn, action, now);
        }
        self.fastdp_actions(conn, fastdp_actions);
        let Some(r) = self.conns.get_mut(&conn).and_then(|c| c.ready.as_mut()) else {
            return;
        };
        let healthy = r.fastdp.as_ref().is_some_and(|(_, f)| f.is_healthy(now));
        if !healthy {
            r.healthy_since = None;
        } else if r.healthy_since.is_none() {
            r.healthy_since = Some(now);
        }
        // Leave the fast datapath at once; take it (back) only once it has stayed
        // healthy for a while, so a lossy path does not flap.
        let fastdp_ok = healthy
            && (r.on_fastdp
                || r.healthy_since
                    .is_some_and(|t| now.saturating_duration_since(t) >= FASTDP_HOLD));
        if fastdp_ok != r.on_fastdp {
            r.on_fastdp = fastdp_ok;
            let label = r.label();
            tracing::info!(
                "[{label}]: using {}",
                if fastdp_ok { FASTDP } else { SLEEVE }
            );
            self.dirty = true;
        }
        let Some(r) = self.conns.get_mut(&conn).and_then(|c| c.ready.as_mut()) else {
            return;
        };
        let sleeve_failed = r.sleeve.as_ref().is_some_and(|(_, s)| s.is_failed());
        if sleeve_failed && !r.on_fastdp {
            // The sleeve failed while the fast path was carrying traffic, and now
            // that is gone too: nothing works (Weave closes such a connection).
            let reason = format!("no working forwarders to {}", r.label());
            self.close(conn, &reason);
            return;
        }
        let any = r.on_fastdp
            || r.sleeve.as_ref().is_some_and(|(_, s)| s.is_established())
            || r.fastdp.as_ref().is_some_and(|(_, f)| f.is_established());
        if any && !r.established {
            r.established = true;
            tracing::info!("[{}]: connection fully established", r.label());
            let actions = self.mesh.connection_established(now, conn);
            self.apply(actions, now);
            self.dirty = true;
        }
    }

    fn sleeve_action(&mut self, conn: ConnKey, action: SleeveAction, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let Some(r) = c.ready.as_mut() else {
            return;
        };
        match action {
            SleeveAction::SendSpecial { frame, df } => {
                match self.dataplane.send_special(r.name, &frame, df) {
                    Ok(()) | Err(SpecialSendError::NoAddress) => {}
                    Err(SpecialSendError::MessageTooBig {
                        path_mtu: Some(pmtu),
                    }) => {
                        if let Some((_, f)) = r.sleeve.as_mut() {
                            f.on_path_mtu(pmtu, now);
                        }
                    }
                    Err(e) => tracing::debug!("[{}]: sleeve send: {e}", r.label()),
                }
            }
            SleeveAction::SendControl { subtag, body } => {
                let msg = if r.compat {
                    Message::CompatSleeve { tag: subtag, body }
                } else {
                    let index = r.sleeve.as_ref().map_or(0, |(i, _)| *i);
                    Message::OverlayControl {
                        index,
                        subtag,
                        body,
                    }
                };
                c.handle.send(msg);
            }
            SleeveAction::Established => {
                tracing::info!("[{}]: sleeve established", r.label());
                self.dirty = true;
            }
            SleeveAction::RemoteAddr(_) | SleeveAction::MtuChanged(_) => self.dirty = true,
            SleeveAction::StackFragVerified => {}
            SleeveAction::Failed(failure) => {
                let healthy_fastdp = r.on_fastdp;
                let label = r.label();
                if !healthy_fastdp {
                    let reason = if r.compat {
                        failure.to_string()
                    } else {
                        format!("no working forwarders to {label}")
                    };
                    self.close(conn, &reason);
                } else {
                    tracing::warn!("[{label}]: sleeve: {failure}");
                }
            }
        }
    }

    fn fastdp_actions(&mut self, conn: ConnKey, actions: Vec<FastdpAction>) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let Some(r) = c.ready.as_ref() else {
            return;
        };
        let Some((index, fwd)) = r.fastdp.as_ref() else {
            return;
        };
        // The last heartbeat send's error (`Some(None)`: it went out).
        let mut send_error: Option<Option<String>> = None;
        for action in actions {
            match action {
                FastdpAction::SendAck => c.handle.send(Message::OverlayControl {
                    index: *index,
                    subtag: fastdp::SUBTAG_HEARTBEAT_ACK,
                    body: Vec::new(),
                }),
                FastdpAction::SendHeartbeat => {
                    let (Some(peer_id), IpAddr::V4(ip)) = (r.short_id, c.remote.ip()) else {
                        continue;
                    };
                    // An encrypted peer's heartbeats go inside ESP, once its outbound
                    // SA is there (before, XFRM would only drop them).
                    let socket = match (&r.ipsec, &self.marked_socket) {
                        (None, _) => &self.fastdp_socket,
                        (Some(s), Some(marked)) if s.outbound_spi().is_some() => marked,
                        (Some(_), _) => continue,
                    };
                    let local_id = self.settings.short_id;
                    let mut datagram = vxlan_header(vni(peer_id, local_id)).to_vec();
                    datagram.extend_from_slice(&fastdp::heartbeat(
                        fwd.conn_uid(),
                        fwd.mtu(),
                        fwd.hears_peer(Instant::now()),
                    ));
                    // The peer receives VXLAN on its control port + 1 (Weave's rule:
                    // the dialled port if we dialled, else our own).
                    let port = if c.outbound {
                        c.remote.port()
                    } else {
                        self.port
                    } + 1;
                    match socket.send_to(&datagram, SocketAddrV4::new(ip, port)) {
                        Ok(_) => send_error = Some(None),
                        Err(e) => {
                            tracing::debug!("[{}]: fastdp heartbeat: {e}", r.label());
                            send_error = Some(Some(e.to_string()));
                        }
                    }
                }
            }
        }
        // A heartbeat that cannot be sent (say, too big for the underlay with the
        // ESP overhead) is why the fast datapath stays down: status says so.
        if let Some(error) = send_error
            && let Some(r) = self.conns.get_mut(&conn).and_then(|c| c.ready.as_mut())
            && r.heartbeat_error != error
        {
            r.heartbeat_error = error;
            self.dirty = true;
        }
    }

    /// Carries out what a connection's IPsec session asks: XFRM changes through
    /// [`Esp`], its SPI messages over the control connection.
    fn ipsec_actions(&mut self, conn: ConnKey, actions: Vec<ipsec::IpsecAction>, now: Instant) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        let (Some(r), Some(esp), IpAddr::V4(remote)) =
            (c.ready.as_mut(), self.esp.as_mut(), c.remote.ip())
        else {
            return;
        };
        let (Some(session), Some((index, _))) = (r.ipsec.as_mut(), r.fastdp.as_ref()) else {
            return;
        };
        let outcome = esp.execute(remote, session, actions, now);
        for body in outcome.send {
            c.handle.send(Message::OverlayControl {
                index: *index,
                subtag: SUBTAG_CRYPTO_INIT_SA_REMOTE,
                body: body.to_vec(),
            });
        }
        match outcome.error {
            Some(e) if outcome.fatal => {
                // As Weave: the connection starts over, and its exchange with it.
                let reason = format!("fastdp: IPsec: {e}");
                self.close(conn, &reason);
                return;
            }
            Some(e) => {
                tracing::warn!("[{}]: fastdp: IPsec: {e}", r.label());
                r.ipsec_error = Some(e);
            }
            None => r.ipsec_error = None,
        }
        self.dirty = true;
    }

    /// Closes a connection (the mesh forgets it).
    fn close(&mut self, conn: ConnKey, reason: &str) {
        if let Some(c) = self.conns.get(&conn) {
            c.handle.close();
            tracing::info!("[{}]: closing: {reason}", c.remote);
        }
        let now = Instant::now();
        if let Some(mut c) = self.conns.remove(&conn) {
            self.linger(&mut c, now);
            let actions = self.mesh.connection_closed(now, conn, reason);
            self.apply(actions, now);
        }
        self.dirty = true;
    }

    /// Carries out the mesh's actions.
    fn apply(&mut self, actions: Vec<Action>, now: Instant) {
        for action in actions {
            match action {
                Action::Dial(addr) => {
                    if self.dialling >= MAX_DIALS {
                        let reason = "too many connection attempts in flight";
                        let actions = self.mesh.dial_failed(now, addr, reason);
                        self.apply(actions, now);
                        continue;
                    }
                    self.dialling += 1;
                    let events = self.events_tx.clone();
                    let local = Some(IpAddr::V4(self.address));
                    tokio::spawn(async move {
                        let result = peering::dial(addr, local).await;
                        let _ = events.send(Input::Dialled(addr, result));
                    });
                }
                Action::SendTopology { conn, updates } => {
                    if let Some(c) = self.conns.get(&conn) {
                        c.handle.send(Message::Gossip {
                            channel: TOPOLOGY_CHANNEL.to_owned(),
                            source: self.identity.name,
                            payload: gossip::encode_topology(&updates),
                        });
                    }
                }
                Action::Close { conn, reason } => {
                    if let Some(mut c) = self.conns.remove(&conn) {
                        tracing::info!("[{}]: {reason}", c.remote);
                        c.handle.close();
                        self.linger(&mut c, now);
                    }
                    self.dirty = true;
                }
                Action::TopologyChanged => self.dirty = true,
            }
        }
    }

    /// Makes the datapath, the sleeve's peers and the status match the node's state.
    fn sync(&mut self, now: Instant) {
        // Our ShortID may have changed (a clash we lost).
        if let Some(id) = self.mesh.local().short_id
            && id != self.settings.short_id
        {
            tracing::info!(
                old = self.settings.short_id,
                new = id,
                "our ShortID changed"
            );
            self.settings.short_id = id;
            self.identity.short_id = Some(id);
            if let Some(blocks) = self.ipam {
                // The block moves with the ShortID: so does the bridge's address.
                let (net, bridge) = (self.net.clone(), self.bridge.clone());
                tokio::spawn(async move {
                    let exposed = async {
                        let link = net
                            .link(&bridge)
                            .await?
                            .ok_or_else(|| anyhow::anyhow!("the bridge {bridge} is gone"))?;
                        agent::expose(&net, &link, &blocks, id).await
                    };
                    if let Err(e) = exposed.await {
                        tracing::error!(
                            error = %format!("{e:#}"),
                            "moving the bridge's address to the new ShortID's block failed"
                        );
                    }
                });
            }
        }
        let mut desired: BTreeMap<ShortId, RemotePeer> = BTreeMap::new();
        let mut sleeve_peers = Vec::new();
        for c in self.conns.values() {
            let Some(r) = &c.ready else { continue };
            // A ShortID two peers claim goes to its owner by Weave's rule (the lower
            // name) until the other re-picks; the other stays off the fast datapath.
            let owner = r
                .short_id
                .and_then(|id| self.mesh.topology().short_id_owner(id));
            // Until a new connection has an overlay working, the entry the peer had
            // (its earlier connection's, or an earlier run's) keeps carrying traffic:
            // a restart of either end does not interrupt it.
            let previous_works = |short_id: ShortId, addr: Ipv4Addr| {
                r.overlay().is_none()
                    && self.lingering.get(&short_id).is_some_and(|(e, until)| {
                        *until > now && e.addr == addr && e.encrypted == r.key.is_some()
                    })
            };
            if let (Some(short_id), IpAddr::V4(addr)) = (r.short_id, c.remote.ip())
                && short_id != self.settings.short_id
                && owner.is_none_or(|o| o == r.name)
                && !previous_works(short_id, addr)
            {
                desired.entry(short_id).or_insert(RemotePeer {
                    short_id,
                    addr,
                    sleeve: !r.on_fastdp,
                    no_fastdp: r.fastdp.is_none(),
                    encrypted: r.key.is_some(),
                });
            }
            if let Some((_, fwd)) = &r.sleeve {
                sleeve_peers.push(PeerSpec {
                    name: r.name,
                    conn_uid: r.conn_uid,
                    outbound: c.outbound,
                    key: r.key.clone(),
                    addr: fwd.remote_addr(),
                    mtu: fwd.mtu(),
                    carries: !r.on_fastdp && fwd.is_established(),
                    established: fwd.is_established(),
                });
            }
        }
        for (id, (entry, until)) in &self.lingering {
            if *until > now && *id != self.settings.short_id {
                desired.entry(*id).or_insert(*entry);
            }
        }
        let peers: Vec<RemotePeer> = desired.into_values().collect();
        if let Err(e) = self.datapath.apply(&self.settings, &peers) {
            tracing::error!(error = %e, "updating the datapath (retried on the next change)");
            self.dirty = true;
        }
        self.dataplane.set_peers(sleeve_peers);
        self.publish_status(now);
    }

    /// The status snapshot: the mesh's connections and targets in Weave's terms, each
    /// connection's overlay and counters, the peers as gossip describes them.
    fn snapshot(&self) -> Status {
        let stats = self.dataplane.stats();
        let now = Instant::now();
        let mut connections = Vec::new();
        for cs in self.mesh.connections() {
            let Some(c) = self.conns.get(&cs.conn) else {
                continue;
            };
            let Some(r) = &c.ready else { continue };
            let mtu = if r.on_fastdp {
                self.mtu
            } else {
                r.sleeve.as_ref().map_or(self.mtu, |(_, s)| s.mtu())
            };
            let mut conn = Connection::from_mesh(&cs, r.short_id, mtu);
            conn.encrypted = r.key.is_some();
            conn.ipsec = r.ipsec.as_ref().map(|s| IpsecStatus {
                outbound_spi: s.outbound_spi(),
                inbound_spis: s.inbound_spis().collect(),
            });
            // Why the fast datapath does not carry this connection, when known.
            let fastdp_note = match &self.fastdp_unavailable {
                Some(reason) if r.key.is_some() => Some(reason.clone()),
                _ if r.on_fastdp => None,
                _ => r
                    .ipsec_error
                    .as_ref()
                    .map(|e| format!("IPsec: {e}"))
                    .or_else(|| {
                        r.heartbeat_error
                            .as_ref()
                            .map(|e| format!("sending heartbeats: {e}"))
                    }),
            };
            if let Some(note) = fastdp_note {
                conn.info.get_or_insert(format!("fastdp: {note}"));
            }
            conn.overlay = match r.overlay() {
                Some(FASTDP) => Some(Overlay::Fastdp),
                Some(_) => Some(Overlay::Sleeve),
                None => None,
            };
            let fast = r
                .short_id
                .and_then(|id| self.datapath.peer_stats(id).ok())
                .unwrap_or_default();
            conn.tx_packets = fast.tx_packets;
            conn.tx_bytes = fast.tx_bytes;
            conn.rx_packets = fast.rx_packets;
            conn.rx_bytes = fast.rx_bytes;
            if let Some(slow) = stats.peers.get(&r.name) {
                conn.sleeve = Some(Traffic {
                    tx_packets: slow.tx_packets,
                    tx_bytes: slow.tx_bytes,
                    rx_packets: slow.rx_packets,
                    rx_bytes: slow.rx_bytes,
                });
            }
            connections.push(conn);
        }
        let counters = self.datapath.counters_by_name();
        let wall = std::time::SystemTime::now();
        let local = self.mesh.local();
        let mut status = Status {
            uid: local.uid,
            peer_version: local.version,
            short_id: self.settings.short_id,
            address: IpAddr::V4(self.address),
            port: self.port,
            mtu: self.mtu,
            encryption: self.password.is_some(),
            targets: self.mesh.direct_targets(),
            target_states: self
                .mesh
                .targets()
                .iter()
                .map(|t| Target::from_mesh(t, now, wall))
                .collect(),
            connections,
            termination_count: self.mesh.termination_count(),
            counters,
            sleeve_counters: stats
                .drops
                .iter()
                .map(|(k, v)| (format!("drop_{k}"), *v))
                .collect(),
            ..Status::default_for(self.identity.name, &self.identity.nickname)
        };
        status.set_peers_from_topology(self.mesh.topology());
        status
    }
}

/// A VXLAN header (flags: VNI valid) for `vni`.
fn vxlan_header(vni: u32) -> [u8; 8] {
    let v = vni.to_be_bytes();
    [0x08, 0, 0, 0, v[1], v[2], v[3], 0]
}

/// Control requests in mesh mode.
struct NodeHandler {
    status: Arc<Mutex<Status>>,
    events: mpsc::UnboundedSender<Input>,
}

impl NodeHandler {
    fn targets(&self, connect: bool, specs: Vec<String>) -> Result<(), String> {
        let mut peers = Vec::new();
        if connect {
            for spec in &specs {
                // Host names are resolved by `weft connect`'s caller side? No: the
                // agent takes literal addresses here and names through the resolver.
                match DirectPeer::parse_literal(spec) {
                    Ok(p) => peers.push(p),
                    Err(_) => {
                        let resolved = std::net::ToSocketAddrs::to_socket_addrs(&(
                            parse_host_port(spec).map_err(|e| e.to_string())?.0.as_str(),
                            0,
                        ))
                        .map_err(|e| format!("resolving {spec:?}: {e}"))?
                        .find(SocketAddr::is_ipv4)
                        .ok_or_else(|| format!("{spec:?} has no IPv4 address"))?;
                        let port = parse_host_port(spec).map_err(|e| e.to_string())?.1;
                        peers.push(DirectPeer {
                            spec: spec.clone(),
                            ip: resolved.ip(),
                            port,
                        });
                    }
                }
            }
        }
        self.events
            .send(Input::Targets {
                connect,
                peers,
                specs,
            })
            .map_err(|_| "the agent is stopping".to_owned())
    }
}

impl control::Handler for NodeHandler {
    fn status(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn connect(&self, peers: Vec<String>) -> Result<(), String> {
        self.targets(true, peers)
    }

    fn forget(&self, peers: Vec<String>) -> Result<(), String> {
        self.targets(false, peers)
    }
}
