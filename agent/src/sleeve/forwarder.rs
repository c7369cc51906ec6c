//! The per-connection sleeve control state machine, free of I/O.
//!
//! One [`SleeveForwarder`] per mesh connection using sleeve. Creating it is Weave's
//! "confirm": the wiring makes it once the mesh connection is registered. It is fed the
//! special frames the I/O layer receives from the remote peer ([`SleeveForwarder::on_special_frame`]),
//! the sleeve control messages that arrive over TCP ([`SleeveForwarder::on_control`]),
//! the path MTU the kernel reports ([`SleeveForwarder::on_path_mtu`]) and time; it returns
//! [`SleeveAction`]s from [`SleeveForwarder::poll`]. Call `poll` after every input and when
//! [`SleeveForwarder::next_deadline`] passes.
//!
//! Behaviour (Weave 2.8.1's sleeve forwarder):
//! - Heartbeats (22-byte DF special frames with the ConnUID) go to the remote UDP address
//!   every 500 ms until the remote acks, then every 10 s. The outbound side knows the
//!   address from the start (TCP remote ip + TCP port); the inbound side learns it from
//!   the first valid heartbeat, and sends its own at once.
//! - The first valid heartbeat received (right ConnUID; a wrong one is ignored silently)
//!   is acked once (sub-tag 1). Every valid heartbeat restarts the 60 s timeout and moves
//!   the remote address to the heartbeat's source.
//! - The remote's ack makes the sleeve established; then a frag test (60001-byte non-DF
//!   special, again every 5 min) and a 60000-byte DF special that the local kernel
//!   refuses with EMSGSIZE, which starts path-MTU discovery.
//! - Path-MTU discovery: on a reported path MTU, candidate = PMTU - overhead (62 plain,
//!   86 encrypted); MTU probes (candidate + 14 bytes, DF) wait 10 ms doubling for 8 tries;
//!   a PMTUVerified reply (sub-tag 3) with the candidate accepts it; a binary search
//!   between 552 and the candidate finds the largest that passes.
//!
//! MTU before discovery: Weave uses 65535 (no limit) until the kernel first reports a
//! path MTU. Here [`SleeveForwarder::mtu`] starts at what a 1500-byte underlay gives
//! (1438 plain, 1414 encrypted), so frames sent before discovery ends are sized for the
//! common case; the first report replaces it (as in Weave, the candidate is used at once
//! and the search may lower it).

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use thiserror::Error;

use super::frame::{
    ETH_HEADER_LEN, FRAG_TEST_LEN, HEARTBEAT_LEN, MAX_DATAGRAM_LEN, OVERHEAD_ENCRYPTED,
    OVERHEAD_PLAIN, PMTU_DISCOVERY_LEN, UDP_OVERHEAD, heartbeat, is_special, mtu_probe,
};
use crate::mesh::{PeerName, SessionKey};

/// Overlay control sub-tag (and compat-mode TCP tag) of the heartbeat ack.
pub const SUBTAG_CONNECTION_ESTABLISHED: u8 = 1;
/// Overlay control sub-tag (and compat-mode TCP tag) of the frag-test reply.
pub const SUBTAG_FRAGMENTATION_RECEIVED: u8 = 2;
/// Overlay control sub-tag (and compat-mode TCP tag) of the MTU-probe reply (u16 BE MTU).
pub const SUBTAG_PMTU_VERIFIED: u8 = 3;

/// Heartbeat interval until the remote acks.
pub const FAST_HEARTBEAT: Duration = Duration::from_millis(500);
/// Heartbeat interval once established.
pub const SLOW_HEARTBEAT: Duration = Duration::from_secs(10);
/// Silence after which the sleeve connection fails.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval of the repeated frag test.
pub const FRAG_TEST_INTERVAL: Duration = Duration::from_secs(300);
/// First MTU-probe wait; doubled per try.
pub const MTU_VERIFY_TIMEOUT: Duration = Duration::from_millis(10);
/// MTU-probe tries per candidate.
pub const MTU_VERIFY_ATTEMPTS: u32 = 8;
/// Lowest sleeve MTU the search assumes good.
pub const MIN_MTU: usize = 552;
/// Underlay MTU assumed until the kernel reports one.
pub const ASSUMED_UNDERLAY_MTU: usize = 1500;

/// What the I/O layer and the wiring must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SleeveAction {
    /// Send this special frame (src = local, dst = remote) to
    /// [`SleeveForwarder::remote_addr`], sealed if the connection is encrypted, as a DF
    /// datagram (raw socket, DF set) or not. An EMSGSIZE on a DF send is reported back
    /// with [`SleeveForwarder::on_path_mtu`].
    SendSpecial {
        /// The special frame.
        frame: Vec<u8>,
        /// Whether to send with DF.
        df: bool,
    },
    /// Send a sleeve control message over the TCP connection: overlay control
    /// `[7][overlay index][subtag][body]`, or in compat mode the bare tag `[subtag][body]`.
    SendControl {
        /// The sub-tag (1, 2 or 3).
        subtag: u8,
        /// The body (empty, or the u16 BE MTU for sub-tag 3).
        body: Vec<u8>,
    },
    /// The remote acked our heartbeat: the sleeve is established (once).
    Established,
    /// The remote UDP address was learnt or changed (Weave logs
    /// `Peer UDP address changed to …`).
    RemoteAddr(SocketAddr),
    /// The sleeve MTU changed (frames over it with DF get ICMP frag-needed).
    MtuChanged(u16),
    /// The kernel's fragmentation of large non-DF datagrams works (frag test answered):
    /// non-DF frames may exceed the MTU.
    StackFragVerified,
    /// The sleeve failed; the connection (or its sleeve overlay) must be closed.
    Failed(SleeveFailure),
}

/// Why a sleeve forwarder failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SleeveFailure {
    /// No valid heartbeat for 60 s.
    #[error("timed out waiting for UDP heartbeat")]
    HeartbeatTimeout,
}

/// A control message or special frame that was not acted on (not fatal: log it).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ControlError {
    /// A sub-tag sleeve does not know (Weave logs and ignores it).
    #[error("ignoring unknown sleeve control message tag: {0}")]
    UnknownSubtag(u8),
    /// A PMTUVerified body shorter than 2 bytes.
    #[error("received truncated MTU test ack ({0} bytes)")]
    TruncatedPmtuVerified(usize),
    /// A frame handed to `on_special_frame` that is not a special frame.
    #[error("not a sleeve special frame ({0} bytes)")]
    NotSpecial(usize),
}

/// What a special frame turned out to be (for counters and logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialOutcome {
    /// A heartbeat with our ConnUID.
    Heartbeat,
    /// A heartbeat with another ConnUID: ignored, as Weave does.
    WrongConnUid(u64),
    /// The all-zero frag test (answered).
    FragTest,
    /// A 60001-byte special frame that is not all zero: ignored.
    BadFragTest,
    /// An MTU probe testing this MTU (answered).
    MtuProbe(u16),
    /// The forwarder has failed: ignored.
    Failed,
}

/// The sleeve control state of one connection.
#[derive(Debug)]
pub struct SleeveForwarder {
    local: PeerName,
    remote: PeerName,
    conn_uid: u64,
    outbound: bool,
    encrypted: bool,
    remote_addr: Option<SocketAddr>,
    actions: Vec<SleeveAction>,
    failed: bool,

    heartbeat_interval: Duration,
    next_heartbeat: Option<Instant>,
    heartbeat_deadline: Instant,
    acked_heartbeat: bool,
    established: bool,

    next_frag_test: Option<Instant>,
    stack_frag: bool,

    mtu: usize,
    max_df_payload: usize,
    mtu_candidate: usize,
    mtu_highest_good: usize,
    mtu_lowest_bad: usize,
    mtu_tests_sent: u32,
    mtu_test_deadline: Option<Instant>,
    mtu_verified: bool,
}

impl SleeveForwarder {
    /// A confirmed forwarder. `session_key` is `None` for a plain or trusted connection;
    /// `remote_addr` is the TCP remote ip and TCP port on the outbound side, `None` on
    /// the inbound side (learnt from heartbeats). Sleeve never keeps the key: it only
    /// decides the overhead; the I/O layer makes the
    /// [`super::crypto::SleeveSealer`]/[`super::crypto::SleeveOpener`] from it.
    pub fn new(
        local: PeerName,
        remote: PeerName,
        conn_uid: u64,
        outbound: bool,
        session_key: Option<&SessionKey>,
        remote_addr: Option<SocketAddr>,
        now: Instant,
    ) -> Self {
        let encrypted = session_key.is_some();
        let overhead = if encrypted {
            OVERHEAD_ENCRYPTED
        } else {
            OVERHEAD_PLAIN
        };
        let mut fwd = SleeveForwarder {
            local,
            remote,
            conn_uid,
            outbound,
            encrypted,
            remote_addr,
            actions: Vec::new(),
            failed: false,
            heartbeat_interval: FAST_HEARTBEAT,
            next_heartbeat: None,
            heartbeat_deadline: now + HEARTBEAT_TIMEOUT,
            acked_heartbeat: false,
            established: false,
            next_frag_test: None,
            stack_frag: false,
            mtu: ASSUMED_UNDERLAY_MTU - overhead,
            max_df_payload: ASSUMED_UNDERLAY_MTU - UDP_OVERHEAD,
            mtu_candidate: 0,
            mtu_highest_good: 0,
            mtu_lowest_bad: 0,
            mtu_tests_sent: 0,
            mtu_test_deadline: None,
            mtu_verified: false,
        };
        if fwd.remote_addr.is_some() {
            fwd.send_heartbeat(now);
        }
        fwd
    }

    /// The local peer.
    pub fn local(&self) -> PeerName {
        self.local
    }

    /// The remote peer.
    pub fn remote(&self) -> PeerName {
        self.remote
    }

    /// The connection's ConnUID.
    pub fn conn_uid(&self) -> u64 {
        self.conn_uid
    }

    /// Whether this side dialled the TCP connection.
    pub fn outbound(&self) -> bool {
        self.outbound
    }

    /// Whether datagrams are sealed.
    pub fn encrypted(&self) -> bool {
        self.encrypted
    }

    /// Where to send datagrams; `None` until known (then data frames cannot be sent:
    /// Weave logs `Cannot forward frame yet - awaiting contact`).
    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.remote_addr
    }

    /// Whether the remote acked our heartbeat.
    pub fn is_established(&self) -> bool {
        self.established
    }

    /// Whether the forwarder failed (it does nothing more).
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    /// The sleeve MTU: the largest overlay IP packet carried (frame length - 14).
    pub fn mtu(&self) -> u16 {
        u16::try_from(self.mtu).unwrap_or(u16::MAX)
    }

    /// Whether the path-MTU search has finished at least once.
    pub fn mtu_verified(&self) -> bool {
        self.mtu_verified
    }

    /// The largest DF datagram (UDP payload bytes) to build: the limit for the
    /// [`super::frame::DatagramBuilder`] of DF frames.
    pub fn max_df_payload(&self) -> usize {
        self.max_df_payload
    }

    /// Whether the remote answered the frag test, so the kernel may fragment large
    /// non-DF datagrams.
    pub fn stack_frag(&self) -> bool {
        self.stack_frag
    }

    /// Whether a special frame with these names is for this forwarder (Weave handles a
    /// special frame only if src is the remote peer and dst the local one).
    pub fn accepts_special(&self, src: PeerName, dst: PeerName) -> bool {
        src == self.remote && dst == self.local
    }

    fn overhead(&self) -> usize {
        if self.encrypted {
            OVERHEAD_ENCRYPTED
        } else {
            OVERHEAD_PLAIN
        }
    }

    fn send_special(&mut self, frame: Vec<u8>, df: bool) {
        self.actions.push(SleeveAction::SendSpecial { frame, df });
    }

    fn send_control(&mut self, subtag: u8, body: Vec<u8>) {
        self.actions
            .push(SleeveAction::SendControl { subtag, body });
    }

    fn send_heartbeat(&mut self, now: Instant) {
        self.next_heartbeat = Some(now + self.heartbeat_interval);
        self.send_special(heartbeat(self.conn_uid).to_vec(), true);
    }

    fn set_mtu(&mut self, mtu: usize) {
        if mtu != self.mtu {
            self.mtu = mtu;
            self.actions.push(SleeveAction::MtuChanged(
                u16::try_from(mtu).unwrap_or(u16::MAX),
            ));
        }
    }

    /// Handles a special frame received from `from` with src = remote and dst = local
    /// (check with [`Self::accepts_special`]). Kinds are told apart by length: 22 =
    /// heartbeat, 60001 = frag test, anything else = MTU probe.
    pub fn on_special_frame(
        &mut self,
        from: SocketAddr,
        frame: &[u8],
        now: Instant,
    ) -> Result<SpecialOutcome, ControlError> {
        if !is_special(frame) {
            return Err(ControlError::NotSpecial(frame.len()));
        }
        if self.failed {
            return Ok(SpecialOutcome::Failed);
        }
        match frame.len() {
            HEARTBEAT_LEN => {
                let mut uid = [0u8; 8];
                uid.copy_from_slice(&frame[ETH_HEADER_LEN..]);
                let uid = u64::from_be_bytes(uid);
                if uid != self.conn_uid {
                    return Ok(SpecialOutcome::WrongConnUid(uid));
                }
                match self.remote_addr {
                    None => {
                        self.remote_addr = Some(from);
                        self.actions.push(SleeveAction::RemoteAddr(from));
                        self.send_heartbeat(now);
                    }
                    Some(addr) if addr != from => {
                        self.remote_addr = Some(from);
                        self.actions.push(SleeveAction::RemoteAddr(from));
                    }
                    Some(_) => {}
                }
                if !self.acked_heartbeat {
                    self.acked_heartbeat = true;
                    self.send_control(SUBTAG_CONNECTION_ESTABLISHED, Vec::new());
                }
                self.heartbeat_deadline = now + HEARTBEAT_TIMEOUT;
                Ok(SpecialOutcome::Heartbeat)
            }
            FRAG_TEST_LEN => {
                if frame.iter().any(|&b| b != 0) {
                    return Ok(SpecialOutcome::BadFragTest);
                }
                self.send_control(SUBTAG_FRAGMENTATION_RECEIVED, Vec::new());
                Ok(SpecialOutcome::FragTest)
            }
            n => {
                let mtu = u16::try_from(n - ETH_HEADER_LEN).unwrap_or(u16::MAX);
                self.send_control(SUBTAG_PMTU_VERIFIED, mtu.to_be_bytes().to_vec());
                Ok(SpecialOutcome::MtuProbe(mtu))
            }
        }
    }

    /// Handles a sleeve control message from the remote (overlay sub-tag, or compat-mode
    /// TCP tag 1/2/3). Errors are not fatal: the message is ignored.
    pub fn on_control(
        &mut self,
        subtag: u8,
        body: &[u8],
        now: Instant,
    ) -> Result<(), ControlError> {
        if self.failed {
            return Ok(());
        }
        match subtag {
            SUBTAG_CONNECTION_ESTABLISHED => {
                if self.heartbeat_interval != SLOW_HEARTBEAT {
                    self.heartbeat_interval = SLOW_HEARTBEAT;
                    if self.next_heartbeat.is_some() {
                        self.next_heartbeat = Some(now + SLOW_HEARTBEAT);
                    }
                    self.established = true;
                    self.actions.push(SleeveAction::Established);
                }
                // As Weave: every ack (re)starts the frag test and path-MTU discovery.
                self.send_frag_test(now);
                self.send_special(vec![0; PMTU_DISCOVERY_LEN], true);
                Ok(())
            }
            SUBTAG_FRAGMENTATION_RECEIVED => {
                if !self.stack_frag {
                    self.stack_frag = true;
                    self.actions.push(SleeveAction::StackFragVerified);
                }
                Ok(())
            }
            SUBTAG_PMTU_VERIFIED => {
                if body.len() < 2 {
                    return Err(ControlError::TruncatedPmtuVerified(body.len()));
                }
                let mtu = usize::from(u16::from_be_bytes([body[0], body[1]]));
                if mtu == 0 || mtu != self.mtu_candidate {
                    return Ok(());
                }
                self.mtu_highest_good = mtu;
                self.search_mtu(now);
                Ok(())
            }
            other => Err(ControlError::UnknownSubtag(other)),
        }
    }

    fn send_frag_test(&mut self, now: Instant) {
        self.stack_frag = false;
        self.next_frag_test = Some(now + FRAG_TEST_INTERVAL);
        self.send_special(vec![0; FRAG_TEST_LEN], false);
    }

    /// Reports the underlay path MTU the kernel gave (IP_MTU after an EMSGSIZE on a DF
    /// send). Starts (or restarts, if lower than the candidate under test) the MTU search.
    pub fn on_path_mtu(&mut self, path_mtu: usize, now: Instant) {
        if self.failed {
            return;
        }
        let path_mtu = path_mtu.min(MAX_DATAGRAM_LEN + UDP_OVERHEAD);
        let mtu = path_mtu.saturating_sub(self.overhead());
        if self.mtu_candidate != 0 && mtu >= self.mtu_candidate {
            return;
        }
        self.mtu_highest_good = MIN_MTU;
        self.mtu_lowest_bad = mtu + 1;
        self.mtu_candidate = mtu;
        self.mtu_tests_sent = 0;
        self.max_df_payload = path_mtu.saturating_sub(UDP_OVERHEAD);
        self.set_mtu(mtu);
        self.send_mtu_test(now);
    }

    fn send_mtu_test(&mut self, now: Instant) {
        let probe = mtu_probe(self.mtu_candidate);
        self.send_special(probe, true);
        self.mtu_test_deadline = Some(now + MTU_VERIFY_TIMEOUT * (1 << self.mtu_tests_sent));
        self.mtu_tests_sent += 1;
    }

    fn search_mtu(&mut self, now: Instant) {
        if self.mtu_highest_good + 1 >= self.mtu_lowest_bad {
            let mtu = self.mtu_highest_good;
            self.mtu_test_deadline = None;
            self.mtu_candidate = 0;
            self.max_df_payload = mtu + self.overhead() - UDP_OVERHEAD;
            self.mtu_verified = true;
            self.set_mtu(mtu);
            return;
        }
        self.mtu_candidate = (self.mtu_highest_good + self.mtu_lowest_bad) / 2;
        self.mtu_tests_sent = 0;
        self.send_mtu_test(now);
    }

    /// Fires due timers and returns everything to do, in order.
    pub fn poll(&mut self, now: Instant) -> Vec<SleeveAction> {
        if !self.failed {
            if now >= self.heartbeat_deadline {
                self.failed = true;
                self.next_heartbeat = None;
                self.next_frag_test = None;
                self.mtu_test_deadline = None;
                self.actions
                    .push(SleeveAction::Failed(SleeveFailure::HeartbeatTimeout));
            } else {
                if self.next_heartbeat.is_some_and(|t| now >= t) {
                    self.send_heartbeat(now);
                }
                if self.next_frag_test.is_some_and(|t| now >= t) {
                    self.send_frag_test(now);
                }
                if self.mtu_test_deadline.is_some_and(|t| now >= t) {
                    if self.mtu_tests_sent < MTU_VERIFY_ATTEMPTS {
                        self.send_mtu_test(now);
                    } else {
                        self.mtu_lowest_bad = self.mtu_candidate;
                        self.search_mtu(now);
                    }
                }
            }
        }
        std::mem::take(&mut self.actions)
    }

    /// The earliest time [`Self::poll`] has something to do; `None` once failed.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.failed {
            return None;
        }
        [
            Some(self.heartbeat_deadline),
            self.next_heartbeat,
            self.next_frag_test,
            self.mtu_test_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
    }
}
