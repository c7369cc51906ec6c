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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sleeve::{
        SleeveRx, SleeveTx,
        frame::{DatagramBuilder, heartbeat},
    };

    const A: PeerName = PeerName([0xaa, 0, 0, 0, 0, 2]);
    const B: PeerName = PeerName([0xaa, 0, 0, 0, 0, 1]);
    const UID: u64 = 0xc350_c9d6_1fdf_9916;
    const KEY: SessionKey = SessionKey([0x42; 32]);

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[derive(Debug)]
    struct Side {
        fwd: SleeveForwarder,
        tx: SleeveTx,
        rx: SleeveRx,
        builder: DatagramBuilder,
        addr: SocketAddr,
        acks_sent: usize,
        frag_replies: usize,
        established: usize,
        heartbeats_sent: usize,
        mtu_changes: Vec<u16>,
        failures: Vec<(SleeveFailure, Instant)>,
        sent: Vec<Vec<u8>>,
    }

    struct Net {
        /// What the local kernels know (EMSGSIZE above it, for DF).
        local_mtu: usize,
        /// What the path carries (silently dropped above it, for DF).
        path_mtu: usize,
        drop_all: bool,
    }

    struct Sim {
        sides: [Side; 2],
        net: Net,
        now: Instant,
        t0: Instant,
    }

    impl Sim {
        fn new(key: Option<&SessionKey>, local_mtu: usize, path_mtu: usize) -> Sim {
            let now = Instant::now();
            let a_addr = addr("192.168.77.2:6783");
            let b_addr = addr("192.168.77.1:6783");
            let side = |local, remote, outbound, raddr, own| Side {
                fwd: SleeveForwarder::new(local, remote, UID, outbound, key, raddr, now),
                tx: SleeveTx::new(key, outbound),
                rx: SleeveRx::new(key, outbound),
                builder: DatagramBuilder::new(local, key.is_some()),
                addr: own,
                acks_sent: 0,
                frag_replies: 0,
                established: 0,
                heartbeats_sent: 0,
                mtu_changes: Vec::new(),
                failures: Vec::new(),
                sent: Vec::new(),
            };
            Sim {
                // A dialled B: it knows B's address (TCP remote ip + port).
                sides: [
                    side(A, B, true, Some(b_addr), a_addr),
                    side(B, A, false, None, b_addr),
                ],
                net: Net {
                    local_mtu,
                    path_mtu,
                    drop_all: false,
                },
                now,
                t0: now,
            }
        }

        fn handle(&mut self, i: usize, action: SleeveAction) {
            let now = self.now;
            let (x, y) = {
                let (l, r) = self.sides.split_at_mut(1);
                if i == 0 {
                    (&mut l[0], &mut r[0])
                } else {
                    (&mut r[0], &mut l[0])
                }
            };
            match action {
                SleeveAction::SendSpecial { frame, df } => {
                    assert!(x.fwd.remote_addr().is_some(), "send without address");
                    if frame.len() == HEARTBEAT_LEN {
                        x.heartbeats_sent += 1;
                    }
                    x.builder.clear();
                    x.builder
                        .try_push(x.fwd.local(), x.fwd.remote(), &frame)
                        .unwrap();
                    let bytes = x.tx.finish(&mut x.builder, df).unwrap().to_vec();
                    x.sent.push(bytes.clone());
                    let ip_len = bytes.len() + UDP_OVERHEAD;
                    if df && ip_len > self.net.local_mtu {
                        x.fwd.on_path_mtu(self.net.local_mtu, now);
                        return;
                    }
                    if (df && ip_len > self.net.path_mtu) || self.net.drop_all {
                        return;
                    }
                    let mut buf = bytes;
                    let frames: Vec<(PeerName, PeerName, Vec<u8>)> =
                        y.rx.open(&mut buf)
                            .unwrap()
                            .map(|f| {
                                let f = f.unwrap();
                                (f.src, f.dst, f.frame.to_vec())
                            })
                            .collect();
                    for (src, dst, f) in frames {
                        assert!(y.fwd.accepts_special(src, dst));
                        y.fwd.on_special_frame(x.addr, &f, now).unwrap();
                    }
                }
                SleeveAction::SendControl { subtag, body } => {
                    match subtag {
                        SUBTAG_CONNECTION_ESTABLISHED => x.acks_sent += 1,
                        SUBTAG_FRAGMENTATION_RECEIVED => x.frag_replies += 1,
                        _ => {}
                    }
                    y.fwd.on_control(subtag, &body, now).unwrap();
                }
                SleeveAction::Established => x.established += 1,
                SleeveAction::MtuChanged(m) => x.mtu_changes.push(m),
                SleeveAction::Failed(f) => x.failures.push((f, now)),
                SleeveAction::RemoteAddr(_) | SleeveAction::StackFragVerified => {}
            }
        }

        fn settle(&mut self) {
            for _ in 0..1000 {
                let a = self.sides[0].fwd.poll(self.now);
                let b = self.sides[1].fwd.poll(self.now);
                if a.is_empty() && b.is_empty() {
                    return;
                }
                for act in a {
                    self.handle(0, act);
                }
                for act in b {
                    self.handle(1, act);
                }
            }
            panic!("no quiescence");
        }

        fn run_for(&mut self, d: Duration) {
            let end = self.now + d;
            for _ in 0..1_000_000 {
                self.settle();
                let next = [
                    self.sides[0].fwd.next_deadline(),
                    self.sides[1].fwd.next_deadline(),
                ]
                .into_iter()
                .flatten()
                .min();
                match next {
                    Some(t) if t <= end => {
                        assert!(t >= self.now, "deadline in the past after poll");
                        self.now = t;
                    }
                    _ => {
                        self.now = end;
                        self.settle();
                        return;
                    }
                }
            }
            panic!("timer storm");
        }
    }

    fn handshake(key: Option<&SessionKey>, local_mtu: usize, path_mtu: usize, expect: u16) {
        let mut sim = Sim::new(key, local_mtu, path_mtu);
        // Before anything: the inbound side has no address and sends nothing.
        assert!(sim.sides[1].fwd.remote_addr().is_none());
        sim.run_for(Duration::from_secs(60));
        for s in &sim.sides {
            assert_eq!(s.acks_sent, 1, "{:?}", s.fwd.local());
            assert_eq!(s.established, 1);
            assert!(s.fwd.is_established());
            assert!(s.fwd.mtu_verified());
            assert_eq!(s.fwd.mtu(), expect);
            assert_eq!(
                s.fwd.max_df_payload(),
                usize::from(expect) + s.fwd.overhead() - 28
            );
            assert!(s.fwd.stack_frag());
            assert!(s.failures.is_empty());
            assert!(s.frag_replies >= 1);
        }
        assert_eq!(
            sim.sides[1].fwd.remote_addr(),
            Some(addr("192.168.77.2:6783"))
        );
        // Established: slow heartbeats keep the connection alive, no failure, no re-ack.
        let hb = sim.sides[0].heartbeats_sent;
        sim.run_for(Duration::from_secs(300));
        for s in &sim.sides {
            assert!(s.failures.is_empty());
            assert_eq!(s.acks_sent, 1);
            assert_eq!(s.established, 1);
            assert_eq!(s.fwd.mtu(), expect);
        }
        let slow = sim.sides[0].heartbeats_sent - hb;
        assert!((29..=31).contains(&slow), "{slow} heartbeats in 300 s");
    }

    #[test]
    fn plain_handshake_and_mtu_on_1500() {
        handshake(None, 1500, 1500, 1438);
    }

    #[test]
    fn encrypted_handshake_and_mtu_on_1500() {
        handshake(Some(&KEY), 1500, 1500, 1414);
    }

    #[test]
    fn mtu_search_finds_a_1400_path_behind_a_1500_link() {
        handshake(None, 1500, 1400, 1338);
        handshake(Some(&KEY), 1500, 1400, 1314);
    }

    #[test]
    fn mtu_on_a_1400_link() {
        handshake(None, 1400, 1400, 1338);
    }

    #[test]
    fn first_datagrams_and_nonces_follow_weave() {
        let mut sim = Sim::new(Some(&KEY), 1500, 1500);
        sim.run_for(Duration::from_millis(200));
        // Outbound A: heartbeat on the DF stream first (seq 0 with the DF bit).
        let first = &sim.sides[0].sent[0];
        assert_eq!(first.len(), 66);
        assert_eq!(&first[..6], &A.0);
        assert_eq!(&first[6..14], &(1u64 << 63).to_be_bytes());
        // B's first datagram is its heartbeat, DF seq 0 too.
        assert_eq!(sim.sides[1].sent[0].len(), 66);
        // A frag test went non-DF seq 0 (60001 + 14 + 30).
        assert!(
            sim.sides[0]
                .sent
                .iter()
                .any(|d| d.len() == 60045 && d[6..14] == [0; 8])
        );
        // MTU probes of 1472 bytes (1428-byte frames) on a 1500 path.
        assert!(sim.sides[0].sent.iter().any(|d| d.len() == 1472));
    }

    #[test]
    fn heartbeat_schedule() {
        let t0 = Instant::now();
        let mut f = SleeveForwarder::new(A, B, UID, true, None, Some(addr("10.0.0.1:6783")), t0);
        let count = |acts: Vec<SleeveAction>| {
            acts.iter()
                .filter(|a| matches!(a, SleeveAction::SendSpecial { frame, df: true } if frame.len() == 22))
                .count()
        };
        assert_eq!(count(f.poll(t0)), 1);
        assert_eq!(f.next_deadline(), Some(t0 + FAST_HEARTBEAT));
        let mut n = 0;
        for ms in (100..=2000).step_by(100) {
            n += count(f.poll(t0 + Duration::from_millis(ms)));
        }
        assert_eq!(n, 4);
        let t = t0 + Duration::from_millis(2100);
        f.on_control(SUBTAG_CONNECTION_ESTABLISHED, &[], t).unwrap();
        let acts = f.poll(t);
        assert_eq!(acts[0], SleeveAction::Established);
        assert!(acts.iter().any(|a| matches!(a, SleeveAction::SendSpecial { frame, df: false } if frame.len() == FRAG_TEST_LEN)));
        assert!(acts.iter().any(|a| matches!(a, SleeveAction::SendSpecial { frame, df: true } if frame.len() == PMTU_DISCOVERY_LEN)));
        assert_eq!(count(f.poll(t + Duration::from_millis(9999))), 0);
        assert_eq!(count(f.poll(t + Duration::from_secs(10))), 1);
        // No valid heartbeat received at all: fails 60 s after creation.
        let acts = f.poll(t0 + Duration::from_secs(60));
        assert_eq!(
            acts,
            vec![SleeveAction::Failed(SleeveFailure::HeartbeatTimeout)]
        );
        assert_eq!(
            SleeveFailure::HeartbeatTimeout.to_string(),
            "timed out waiting for UDP heartbeat"
        );
        assert!(f.is_failed());
        assert_eq!(f.next_deadline(), None);
        assert!(f.poll(t0 + Duration::from_secs(100)).is_empty());
    }

    #[test]
    fn timeout_after_60s_of_silence() {
        let mut sim = Sim::new(None, 1500, 1500);
        sim.run_for(Duration::from_secs(30));
        assert_eq!(sim.sides[0].established, 1);
        let cut = sim.now;
        sim.net.drop_all = true;
        sim.run_for(Duration::from_secs(120));
        for s in &sim.sides {
            assert_eq!(s.failures.len(), 1);
            let (why, at) = s.failures[0];
            assert_eq!(why, SleeveFailure::HeartbeatTimeout);
            // The last valid heartbeat came at most 10 s before the cut.
            let after_cut = at - cut;
            assert!(
                after_cut > Duration::from_secs(50) && after_cut <= Duration::from_secs(60),
                "{after_cut:?}"
            );
            assert!(s.fwd.is_failed());
        }
        let _ = sim.t0;
    }

    #[test]
    fn wrong_conn_uid_is_ignored_and_address_is_followed() {
        let t = Instant::now();
        let mut f = SleeveForwarder::new(B, A, UID, false, None, None, t);
        assert!(f.poll(t).is_empty());
        let from = addr("192.168.77.2:6783");
        assert_eq!(
            f.on_special_frame(from, &heartbeat(UID ^ 1), t),
            Ok(SpecialOutcome::WrongConnUid(UID ^ 1))
        );
        assert!(f.poll(t).is_empty());
        assert_eq!(f.remote_addr(), None);
        assert_eq!(
            f.on_special_frame(from, &heartbeat(UID), t),
            Ok(SpecialOutcome::Heartbeat)
        );
        let acts = f.poll(t);
        assert_eq!(acts.len(), 3, "{acts:?}");
        assert_eq!(acts[0], SleeveAction::RemoteAddr(from));
        assert!(
            matches!(&acts[1], SleeveAction::SendSpecial { frame, df: true } if frame[..] == heartbeat(UID))
        );
        assert_eq!(
            acts[2],
            SleeveAction::SendControl {
                subtag: 1,
                body: vec![]
            }
        );
        // Second heartbeat from a new address: followed, not acked again.
        let moved = addr("192.168.77.2:40000");
        f.on_special_frame(moved, &heartbeat(UID), t).unwrap();
        assert_eq!(f.poll(t), vec![SleeveAction::RemoteAddr(moved)]);
        assert_eq!(f.remote_addr(), Some(moved));
        // Heartbeats reset the timeout; a wrong-UID one does not.
        let t50 = t + Duration::from_secs(50);
        f.on_special_frame(moved, &heartbeat(UID), t50).unwrap();
        f.on_special_frame(moved, &heartbeat(7), t50 + Duration::from_secs(55))
            .unwrap();
        let acts = f.poll(t + Duration::from_secs(100));
        assert!(!acts.iter().any(|a| matches!(a, SleeveAction::Failed(_))));
        let acts = f.poll(t50 + HEARTBEAT_TIMEOUT);
        assert!(acts.contains(&SleeveAction::Failed(SleeveFailure::HeartbeatTimeout)));
    }

    #[test]
    fn answers_frag_tests_and_probes() {
        let t = Instant::now();
        let from = addr("10.0.0.1:6783");
        let mut f = SleeveForwarder::new(B, A, UID, false, None, None, t);
        assert_eq!(
            f.on_special_frame(from, &vec![0; FRAG_TEST_LEN], t),
            Ok(SpecialOutcome::FragTest)
        );
        let mut bad = vec![0; FRAG_TEST_LEN];
        bad[100] = 1;
        assert_eq!(
            f.on_special_frame(from, &bad, t),
            Ok(SpecialOutcome::BadFragTest)
        );
        assert_eq!(
            f.on_special_frame(from, &mtu_probe(1438), t),
            Ok(SpecialOutcome::MtuProbe(1438))
        );
        assert_eq!(
            f.on_special_frame(from, &[0; 14], t),
            Ok(SpecialOutcome::MtuProbe(0))
        );
        assert_eq!(
            f.poll(t),
            vec![
                SleeveAction::SendControl {
                    subtag: 2,
                    body: vec![]
                },
                SleeveAction::SendControl {
                    subtag: 3,
                    body: vec![0x05, 0x9e]
                },
                SleeveAction::SendControl {
                    subtag: 3,
                    body: vec![0, 0]
                },
            ]
        );
        assert_eq!(
            f.on_special_frame(from, &[1; 22], t),
            Err(ControlError::NotSpecial(22))
        );
    }

    #[test]
    fn bad_control_messages_are_errors() {
        let t = Instant::now();
        let mut f = SleeveForwarder::new(A, B, UID, true, None, Some(addr("10.0.0.1:6783")), t);
        assert_eq!(
            f.on_control(3, &[5], t),
            Err(ControlError::TruncatedPmtuVerified(1))
        );
        assert_eq!(f.on_control(9, &[], t), Err(ControlError::UnknownSubtag(9)));
        // A PMTUVerified for a value not under test changes nothing.
        f.on_control(3, &[0x05, 0x9e], t).unwrap();
        assert!(!f.mtu_verified());
    }

    #[test]
    fn garbage_never_panics() {
        let t = Instant::now();
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let from = addr("10.0.0.1:6783");
        for key in [None, Some(&KEY)] {
            let mut f = SleeveForwarder::new(B, A, UID, false, key, None, t);
            let mut rx = SleeveRx::new(key, false);
            for i in 0..3000u64 {
                let len = (rnd() % 200) as usize;
                let mut buf: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
                if i % 3 == 0 && buf.len() > 20 {
                    buf[6..20].fill(0);
                }
                if let Ok(frames) = rx.open(&mut buf) {
                    for fr in frames.flatten() {
                        let _ = f.on_special_frame(from, fr.frame, t);
                    }
                }
                let _ = f.on_special_frame(from, &buf, t);
                let _ = f.on_control((rnd() % 5) as u8, &buf[..len.min(3)], t);
                f.on_path_mtu((rnd() % 70000) as usize, t);
                let _ = f.poll(t + Duration::from_millis(i));
            }
        }
    }
}
