//! weft's protocols, free of I/O: Weave Net's mesh control plane (TCP 6783), its
//! sleeve overlay (UDP 6783), the fast datapath's heartbeat protocol and its IPsec
//! key exchange.
//!
//! As boringtun keeps its Noise state machine apart from its sockets, these modules
//! take bytes and time and return what to send; the `weft` binary owns the sockets,
//! the TAP device and the eBPF datapath around them. Being a library lets the fuzz
//! targets and the tests drive the parsers directly.

pub mod fastdp;
pub mod ipsec;
pub mod mesh;
pub mod sleeve;
