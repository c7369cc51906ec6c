//! A multi-host testbed on network namespaces for weft, used by the privileged
//! integration tests (`tests/*.rs`), by `cargo xtask demo` and by the benchmark.
//!
//! - [`Testbed`]: an underlay switch with hosts and pods in network namespaces
//!   (layout in [`testbed`]); kernel-VXLAN hosts laid out like Weave's fast datapath.
//! - Agent control on [`Testbed`]: [`Testbed::start_agent`], [`Testbed::stop_agent`],
//!   [`Testbed::kill9_agent`], [`Testbed::sighup_agent`], [`Testbed::status_json`].
//! - Traffic: [`pod_exec`], [`ping`], [`ping_unanswered`], [`wait_ping`],
//!   [`tcp_transfer`], [`capture_vxlan`].
//! - A real Weave Net router on a host ([`weaver`]): [`Testbed::start_weaver`],
//!   [`Weaver::wait_connection_established`], [`Weaver::status_text`],
//!   [`Weaver::report_json`]; binary from `WEFT_WEAVER` ([`skip_without_weaver`]).
//! - The CNI plugin called as a runtime calls it ([`cni`]): [`CniCall`],
//!   [`Testbed::cni_add`]; by podman: [`podman::Podman`].
//! - Hygiene: [`cleanup_stale`] removes leftovers of crashed runs;
//!   [`install_interrupt_handler`] lets a driver tear down on Ctrl-C.
//!
//! Everything runs external tools (`ip`, `bridge`, `ping`, `tcpdump`, `iperf3`) through
//! [`cmd::run`], whose errors name the command line, exit status and stderr. Every
//! wait is bounded. Needs root.

pub mod agent;
pub mod bench_topology;
pub mod bpf;
pub mod cmd;
pub mod cni;
pub mod demo;
pub mod fake_kube;
pub mod kube_play;
pub mod manifest;
pub mod netns;
pub mod pcap;
pub mod peers;
pub mod podman;
pub mod signal;
pub mod synthetic;
pub mod testbed;
pub mod traffic;
pub mod weaver;

pub use agent::AgentExit;
pub use bpf::{TcxProg, attached_programs, prog_exists, tcx_programs, tcx_supported};
pub use cni::{CniCall, CniContainer, CniOutcome, net_conf};
pub use demo::demo;
pub use pcap::{Capture, Packet};
pub use peers::{peers_toml, write_peers_file};
pub use signal::{install_interrupt_handler, interrupted};
pub use testbed::{
    Host, Pod, Testbed, cleanup_stale, is_root, kernel_has_esp, kernel_has_openvswitch, serial,
};
pub use traffic::{
    PingReport, Transfer, capture_vxlan, links_with_prefix, ns_exec, ping, ping_stream,
    ping_unanswered, pod_exec, pod_mac, tcp_transfer, wait_ping,
};
pub use weaver::{
    WeaveConnection, Weaver, WeaverOptions, skip_without_weaver, start_weaver_pair,
    tx_checksum_off, weaver_path,
};
